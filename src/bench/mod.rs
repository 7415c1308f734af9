//! Measurements behind `ferry bench`: the codecs on a guest's own memory (per
//! core), the KVM guest's parts, and, with the `net` feature, the raw TCP
//! ceiling of a path.

#[cfg(feature = "net")]
pub mod charts;
pub mod cycle;
pub mod dense;
pub mod drain;
#[cfg(feature = "net")]
pub mod hostile;
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
pub mod kvm;
#[cfg(feature = "net")]
mod link;
pub mod sweep;

#[cfg(feature = "net")]
pub use link::{link_once, serve_link_sink, LinkResult};

use crate::codec::{is_zero_page, Codec};
use crate::memory::{GuestMemory, PAGE_SIZE};
use crate::page::PageIndex;
use crate::wire::{BatchEncoder, Limits, Page, PageBatch, Read};
use serde::Serialize;
use std::time::{Duration, Instant};

/// Median and spread of repeated measurements.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Spread {
    /// The median (mean of the two middle values for an even count).
    pub median: f64,
    /// The smallest value.
    pub min: f64,
    /// The largest value.
    pub max: f64,
}

impl Spread {
    /// The spread of `values`; `None` when there are none.
    pub fn of(values: &[f64]) -> Option<Spread> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Spread {
            median,
            min: v[0],
            max: v[n - 1],
        })
    }
}

/// One codec measured on a guest's memory.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CodecResult {
    /// The codec, as given (`lz4`, `zstd:1`).
    pub codec: String,
    /// Guest bytes measured.
    pub guest_bytes: u64,
    /// Of which in zero pages (sent as a bit).
    pub zero_bytes: u64,
    /// Payload bytes the batches took (headers, runs and zero bitmaps included).
    pub encoded_bytes: u64,
    /// `guest_bytes / encoded_bytes`: the ratio the wire sees.
    pub ratio: f64,
    /// Guest bytes per second encoded by one core (copy, zero check, compress).
    pub encode_bps: f64,
    /// Guest bytes per second decoded by one core (check, decompress, copy
    /// each page into place).
    pub decode_bps: f64,
}

/// Encodes and decodes up to `sample_bytes` of `mem` (evenly spread batches of
/// `batch_pages`) with each codec on the calling thread, as the migration's
/// encoder does, and reports speed per core and the ratio.
pub fn measure_codecs(
    mem: &GuestMemory,
    codecs: &[Codec],
    batch_pages: u32,
    sample_bytes: u64,
) -> Vec<CodecResult> {
    let batch_pages = u64::from(batch_pages.clamp(1, crate::wire::MAX_PAGES_PER_BATCH));
    let batches = mem.pages().div_ceil(batch_pages);
    let wanted = (sample_bytes / (batch_pages * PAGE_SIZE as u64)).max(1);
    let stride = (batches / wanted).max(1);
    let limits = Limits {
        guest_pages: mem.pages(),
    };
    codecs
        .iter()
        .map(|&codec| {
            let mut enc = BatchEncoder::new();
            let mut scratch = Vec::new();
            // A kept stream: one over the sampled batches, as one channel's.
            let mut streams = codec.level().filter(|_| codec.is_stream()).map(|level| {
                let e = crate::codec::StreamEncoder::new(level, true).expect("a zstd stream");
                (
                    e,
                    crate::codec::StreamDecoder::new().expect("a zstd stream"),
                )
            });
            // Decoded pages land in one batch-sized buffer, as into memory that
            // is already backed: the codec's cost, not the kernel's first touch.
            let mut placed = vec![0u8; batch_pages as usize * PAGE_SIZE];
            let (mut guest_bytes, mut zero_bytes, mut encoded_bytes) = (0u64, 0u64, 0u64);
            let (mut encode, mut decode) = (Duration::ZERO, Duration::ZERO);
            let mut b = 0;
            while b < batches {
                let first = b * batch_pages;
                let n = batch_pages.min(mem.pages() - first) as u32;
                let t = Instant::now();
                let batch = enc
                    .encode_stream(
                        0,
                        codec,
                        &[crate::page::PageRun::new(PageIndex(first), n)],
                        false,
                        streams.as_mut().map(|s| &mut s.0),
                        |p, buf| {
                            mem.read_page(p, buf);
                            if is_zero_page(buf) {
                                Read::Zero
                            } else {
                                Read::Data
                            }
                        },
                    )
                    .expect("compression of a page batch");
                encode += t.elapsed();
                let t = Instant::now();
                let decoded =
                    PageBatch::decode(batch.payload.clone(), limits).expect("own batches decode");
                decoded
                    .apply_with(
                        &mut scratch,
                        streams.as_mut().map(|s| &mut s.1),
                        |p, data| {
                            let at = (PageIndex(first).until(p) as usize) * PAGE_SIZE;
                            match data {
                                Page::Data(d) => placed[at..at + PAGE_SIZE].copy_from_slice(d),
                                Page::Zero => placed[at..at + PAGE_SIZE].fill(0),
                                Page::Placed | Page::Same { .. } | Page::Patch { .. } => {
                                    unreachable!("whole payloads without references")
                                }
                            }
                        },
                    )
                    .expect("own batches apply");
                decode += t.elapsed();
                std::hint::black_box(&placed);
                guest_bytes += u64::from(n) * PAGE_SIZE as u64;
                zero_bytes += u64::from(batch.zero) * PAGE_SIZE as u64;
                encoded_bytes += batch.payload.len() as u64;
                b += stride;
            }
            let rate = |d: Duration| guest_bytes as f64 / d.as_secs_f64().max(1e-9);
            CodecResult {
                codec: codec.to_string(),
                guest_bytes,
                zero_bytes,
                encoded_bytes,
                ratio: guest_bytes as f64 / encoded_bytes.max(1) as f64,
                encode_bps: rate(encode),
                decode_bps: rate(decode),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{ContentKind, FillSpec};

    #[test]
    fn spread() {
        assert_eq!(Spread::of(&[]), None);
        assert_eq!(
            Spread::of(&[3.0]).unwrap(),
            Spread {
                median: 3.0,
                min: 3.0,
                max: 3.0
            }
        );
        assert_eq!(Spread::of(&[5.0, 1.0, 3.0]).unwrap().median, 3.0);
        assert_eq!(
            Spread::of(&[4.0, 1.0, 3.0, 2.0]).unwrap(),
            Spread {
                median: 2.5,
                min: 1.0,
                max: 4.0
            }
        );
        assert_eq!(Spread::of(&[f64::NAN, 2.0]).unwrap().median, 2.0);
    }

    #[test]
    fn codec_ratios_follow_the_content() {
        let mem = GuestMemory::new(8 << 20).unwrap();
        FillSpec::only(ContentKind::Text).fill(&mem, 1, 2);
        let codecs = [Codec::None, Codec::Lz4, Codec::Zstd { level: 3 }];
        let r = measure_codecs(&mem, &codecs, 256, 8 << 20);
        assert_eq!(r[0].codec, "none");
        assert!(r[0].ratio > 0.99 && r[0].ratio < 1.01, "{r:?}");
        assert!(r[1].ratio > 1.8, "lz4 on text: {}", r[1].ratio);
        assert!(r[2].ratio > r[1].ratio, "zstd:3 beats lz4 on ratio");
        assert!(r
            .iter()
            .all(|c| c.guest_bytes == 8 << 20 && c.encode_bps > 0.0 && c.decode_bps > 0.0));

        let zeros = GuestMemory::new(4 << 20).unwrap();
        let r = measure_codecs(&zeros, &[Codec::Lz4], 256, 4 << 20);
        assert_eq!(r[0].zero_bytes, 4 << 20);
        assert!(r[0].ratio > 1000.0, "zero pages are bits: {}", r[0].ratio);
    }

    #[test]
    fn sampling_bounds_the_work() {
        let mem = GuestMemory::new(16 << 20).unwrap();
        let r = measure_codecs(&mem, &[Codec::None], 256, 4 << 20);
        assert_eq!(r[0].guest_bytes, 4 << 20);
    }
}
