//! `ferry bench codecs --dense`: what denser pages would save on a guest's
//! memory before the wire carries them, per codec, on one core: pages
//! identical to one earlier in the sample sent as 8-byte references (found
//! by hash, confirmed by a full compare), and zstd keeping its window across
//! batches (one stream over all of them, flushed at each batch so each
//! decodes on arrival, with a 128 MiB long-distance window) instead of
//! starting cold on every batch. Both are upper bounds: a reference here may
//! point into its own batch or one not yet acknowledged, and a stream per
//! channel would see only its channel's batches. Compressed data only (the
//! batches' headers are the same in every option); the speeds leave out the
//! zero-page check, done once beforehand, so they are not those of the
//! engine's own table.

use crate::codec::{compress, is_zero_page, Codec};
use crate::memory::{GuestMemory, PAGE_SIZE};
use crate::page::PageIndex;
use serde::Serialize;
use std::collections::HashMap;
use std::io::Write;
use std::time::{Duration, Instant};

/// A reference to a page sent before: its index.
const REFERENCE: u64 = 8;
/// The long window of a kept stream: 2^27 bytes.
const WINDOW_LOG: u32 = 27;

/// One codec's dense options measured on a guest's memory.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DenseResult {
    /// The codec (`lz4`, `zstd:1`).
    pub codec: String,
    /// Guest bytes measured.
    pub guest_bytes: u64,
    /// Non-zero pages, and of them those identical to one sent before.
    pub pages: u64,
    /// Pages a reference would carry.
    pub duplicate_pages: u64,
    /// Compressed bytes, each batch on its own (as today).
    pub batch_bytes: u64,
    /// Compressed bytes with duplicates sent as references.
    pub dedup_bytes: u64,
    /// Compressed bytes as one kept zstd stream (zstd only).
    pub stream_bytes: Option<u64>,
    /// Both: references, and the rest as one kept stream (zstd only).
    pub dense_bytes: Option<u64>,
    /// Guest bytes per second one core encodes each way.
    pub batch_encode_bps: f64,
    /// With references (hashing and comparing included).
    pub dedup_encode_bps: f64,
    /// As one kept stream.
    pub stream_encode_bps: Option<f64>,
}

/// The non-zero pages of the `batch_pages`-page batches `bench codecs`
/// samples (every `stride`-th), batch by batch.
fn sampled(mem: &GuestMemory, batch_pages: u64, sample_bytes: u64) -> (u64, Vec<Vec<u64>>) {
    let batches = mem.pages().div_ceil(batch_pages);
    let wanted = (sample_bytes / (batch_pages * PAGE_SIZE as u64)).max(1);
    let stride = (batches / wanted).max(1);
    let mut page = vec![0u8; PAGE_SIZE];
    let (mut guest, mut out) = (0, Vec::new());
    let mut b = 0;
    while b < batches {
        let first = b * batch_pages;
        let n = batch_pages.min(mem.pages() - first);
        guest += n * PAGE_SIZE as u64;
        let nonzero = (first..first + n)
            .filter(|&p| {
                mem.read_page(PageIndex(p), &mut page);
                !is_zero_page(&page)
            })
            .collect();
        out.push(nonzero);
        b += stride;
    }
    (guest, out)
}

/// Measures each codec's dense options on the batches `bench codecs`
/// samples.
pub fn measure_dense(
    mem: &GuestMemory,
    codecs: &[Codec],
    batch_pages: u32,
    sample_bytes: u64,
) -> Vec<DenseResult> {
    let batch_pages = u64::from(batch_pages.clamp(1, crate::wire::MAX_PAGES_PER_BATCH));
    let (guest_bytes, batches) = sampled(mem, batch_pages, sample_bytes);
    codecs
        .iter()
        .map(|&codec| {
            let rate = |d: Duration| guest_bytes as f64 / d.as_secs_f64().max(1e-9);
            let (batch_bytes, t_batch) = per_batch(mem, codec, &batches, None);
            let t = Instant::now();
            let found = find_duplicates(mem, &batches);
            let (refs, t_dedup) = per_batch(mem, codec, &batches, Some(&found));
            let t_dedup = t_dedup + t.elapsed();
            let dup = found.len() as u64;
            let (stream, dense) = match codec {
                Codec::Zstd { level } => {
                    let (s, t_stream) = stream(mem, level, &batches, None);
                    let (d, _) = stream(mem, level, &batches, Some(&found));
                    (Some((s, t_stream)), Some(d + dup * REFERENCE))
                }
                _ => (None, None),
            };
            DenseResult {
                codec: codec.to_string(),
                guest_bytes,
                pages: batches.iter().map(|b| b.len() as u64).sum(),
                duplicate_pages: dup,
                batch_bytes,
                dedup_bytes: refs + dup * REFERENCE,
                stream_bytes: stream.map(|s| s.0),
                dense_bytes: dense,
                batch_encode_bps: rate(t_batch),
                dedup_encode_bps: rate(t_dedup),
                stream_encode_bps: stream.map(|s| rate(s.1)),
            }
        })
        .collect()
}

/// The pages identical to one earlier in the sample: hashed, then compared
/// in full with the first of that hash (never on a hash alone).
fn find_duplicates(mem: &GuestMemory, batches: &[Vec<u64>]) -> std::collections::HashSet<u64> {
    let mut first: HashMap<u64, u64> = HashMap::new();
    let mut dup = std::collections::HashSet::new();
    let (mut page, mut other) = (vec![0u8; PAGE_SIZE], vec![0u8; PAGE_SIZE]);
    for &p in batches.iter().flatten() {
        mem.read_page(PageIndex(p), &mut page);
        let h = crate::digest::page_hash(&page);
        match first.get(&h) {
            Some(&q) => {
                mem.read_page(PageIndex(q), &mut other);
                if other == page {
                    dup.insert(p);
                }
            }
            None => {
                first.insert(h, p);
            }
        }
    }
    dup
}

/// Each batch's pages (less `skip`) compressed on their own: bytes, time.
fn per_batch(
    mem: &GuestMemory,
    codec: Codec,
    batches: &[Vec<u64>],
    skip: Option<&std::collections::HashSet<u64>>,
) -> (u64, Duration) {
    let mut raw = Vec::new();
    let mut out = bytes::BytesMut::new();
    let (mut total, mut took) = (0u64, Duration::ZERO);
    for batch in batches {
        let t = Instant::now();
        raw.clear();
        for &p in batch.iter().filter(|p| skip.is_none_or(|s| !s.contains(p))) {
            let at = raw.len();
            raw.resize(at + PAGE_SIZE, 0);
            mem.read_page(PageIndex(p), &mut raw[at..]);
        }
        if !raw.is_empty() {
            out.clear();
            let n = compress(codec, &raw, &mut out).expect("compressing a batch");
            total += n.min(raw.len()) as u64;
        }
        took += t.elapsed();
    }
    (total, took)
}

/// All batches' pages (less `skip`) through one zstd stream at `level`
/// with a long window, flushed at each batch: bytes, time.
fn stream(
    mem: &GuestMemory,
    level: i32,
    batches: &[Vec<u64>],
    skip: Option<&std::collections::HashSet<u64>>,
) -> (u64, Duration) {
    let t = Instant::now();
    let mut enc = zstd::stream::write::Encoder::new(Vec::new(), level).expect("a zstd stream");
    enc.window_log(WINDOW_LOG).expect("window log");
    enc.long_distance_matching(true)
        .expect("long distance matching");
    let mut page = vec![0u8; PAGE_SIZE];
    for batch in batches {
        for &p in batch.iter().filter(|p| skip.is_none_or(|s| !s.contains(p))) {
            mem.read_page(PageIndex(p), &mut page);
            enc.write_all(&page).expect("writing to memory");
        }
        enc.flush().expect("flushing to memory");
    }
    let bytes = enc.finish().expect("finishing in memory").len() as u64;
    (bytes, t.elapsed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_travel_as_references_and_a_kept_stream_finds_far_repeats() {
        // 64 pages: 16 of noise, repeated three times, the rest zero.
        let mem = GuestMemory::new(64 * PAGE_SIZE as u64).unwrap();
        let mut x = 0x9e37_79b9u32;
        let noise: Vec<Vec<u8>> = (0..16)
            .map(|_| {
                (0..PAGE_SIZE)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 17;
                        x ^= x << 5;
                        x as u8
                    })
                    .collect()
            })
            .collect();
        for copy in 0..3 {
            for (i, p) in noise.iter().enumerate() {
                mem.write_page(PageIndex(copy * 16 + i as u64), p);
            }
        }
        let r = measure_dense(&mem, &[Codec::Lz4, Codec::Zstd { level: 1 }], 8, 1 << 20);
        for r in &r {
            assert_eq!((r.pages, r.duplicate_pages), (48, 32), "{r:?}");
            // Noise does not compress within a batch; references carry
            // two thirds of it.
            assert!(r.batch_bytes >= 48 * PAGE_SIZE as u64 * 9 / 10, "{r:?}");
            assert!(r.dedup_bytes <= 17 * PAGE_SIZE as u64, "{r:?}");
        }
        assert_eq!(r[0].stream_bytes, None);
        // The kept stream finds the repeats 16 pages back on its own.
        let s = r[1].stream_bytes.unwrap();
        assert!(s <= 18 * PAGE_SIZE as u64, "{s}");
        assert!(r[1].dense_bytes.unwrap() <= 17 * PAGE_SIZE as u64);
    }
}
