//! `ferry bench codecs --dense`: what denser pages would save on a guest's
//! memory before the wire carries them, per codec, on one core: pages
//! identical to one earlier in the sample sent as 8-byte references (found
//! by hash, confirmed by a full compare), and zstd keeping its window across
//! batches (the engine's kept stream, [`crate::codec::StreamEncoder`]: one
//! per channel, the batches dealt to the default four channels in turn,
//! flushed at each batch so each decodes on arrival) instead of starting
//! cold on every batch. References are an upper bound: one here may point
//! into its own batch or one not yet acknowledged. Compressed data only (the
//! batches' headers are the same in every option); the speeds leave out the
//! zero-page check, done once beforehand, so they are not those of the
//! engine's own table.

use crate::codec::{compress, is_zero_page, Codec};
use crate::memory::{GuestMemory, PAGE_SIZE};
use crate::page::PageIndex;
use serde::Serialize;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// A reference to a page sent before: its index and tag.
const REFERENCE: u64 = 16;

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
/// samples (kept streams only as zstd's column: they are one already).
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
        .filter(|c| !c.is_stream())
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

/// All batches' pages (less `skip`) through kept zstd streams at `level`,
/// one per channel, the batches dealt in turn: bytes, time.
fn stream(
    mem: &GuestMemory,
    level: i32,
    batches: &[Vec<u64>],
    skip: Option<&std::collections::HashSet<u64>>,
) -> (u64, Duration) {
    let t = Instant::now();
    let channels = usize::from(crate::migration::DEFAULT_CHANNELS);
    let mut streams: Vec<_> = (0..channels)
        .map(|_| crate::codec::StreamEncoder::new(level, true).expect("a zstd stream"))
        .collect();
    let (mut raw, mut out, mut bytes) = (Vec::new(), bytes::BytesMut::new(), 0u64);
    for (i, batch) in batches.iter().enumerate() {
        raw.clear();
        for &p in batch.iter().filter(|p| skip.is_none_or(|s| !s.contains(p))) {
            let at = raw.len();
            raw.resize(at + PAGE_SIZE, 0);
            mem.read_page(PageIndex(p), &mut raw[at..]);
        }
        if !raw.is_empty() {
            out.clear();
            bytes += streams[i % channels]
                .compress(&raw, &mut out)
                .expect("compressing in memory") as u64;
        }
    }
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
        // The kept streams find the repeats on their own where the batch
        // of the first copy went to the same channel: batches 4 and 5 (of
        // 8 pages) repeat batches 0 and 1, on channels 0 and 1 of 4.
        let s = r[1].stream_bytes.unwrap();
        assert!(s <= 34 * PAGE_SIZE as u64, "{s}");
        assert!(s * 4 < r[1].batch_bytes * 3, "{s} {r:?}");
        assert!(r[1].dense_bytes.unwrap() <= 17 * PAGE_SIZE as u64);
    }
}
