//! Data-path stages, each beside its physical limit: memcpy for page
//! handling, a byte-by-byte scan for zero detection.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ferry::codec::{self, is_zero_page, Codec};
use ferry::digest::page_hash;
use ferry::memory::{ContentKind, DirtyBitmap, DirtySnapshot, FillSpec, GuestMemory, PAGE_SIZE};
use ferry::page::PageIndex;
use ferry::wire::{encode_header, BatchEncoder, Command, FrameDecoder, Header};
use rand_chacha::rand_core::SeedableRng;
use std::hint::black_box;
use std::time::Duration;

const MIB: usize = 1 << 20;

fn pages_of(kind: ContentKind, n: usize) -> Vec<u8> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let mut v = vec![0u8; n * PAGE_SIZE];
    for p in v.chunks_exact_mut(PAGE_SIZE) {
        kind.generate(&mut rng, p);
    }
    v
}

fn baseline(c: &mut Criterion) {
    let mut g = c.benchmark_group("baseline");
    g.throughput(Throughput::Bytes(MIB as u64));
    let src = pages_of(ContentKind::Random, 256);
    let mut dst = vec![0u8; MIB];
    g.bench_function("memcpy/1MiB", |b| {
        b.iter(|| dst.copy_from_slice(black_box(&src)))
    });
    g.finish();
}

/// Guest memory's accessors (8-byte atomic words, no references into memory
/// a guest may be writing) beside plain copies of the same bytes.
fn guest_memory(c: &mut Criterion) {
    let mut g = c.benchmark_group("guest_memory");
    g.throughput(Throughput::Bytes(MIB as u64));
    let mem = GuestMemory::new(MIB as u64).unwrap();
    let data = pages_of(ContentKind::Random, 256);
    for (i, p) in data.chunks_exact(PAGE_SIZE).enumerate() {
        mem.write_page(PageIndex(i as u64), p);
    }
    let zeros = GuestMemory::new(MIB as u64).unwrap();
    for i in 0..256 {
        zeros.zero_page(PageIndex(i));
    }
    let mut page = vec![0u8; PAGE_SIZE];
    let mut plain = data.clone();
    g.bench_function("memcpy_pages/1MiB", |b| {
        b.iter(|| {
            for (d, s) in plain
                .chunks_exact_mut(PAGE_SIZE)
                .zip(data.chunks_exact(PAGE_SIZE))
            {
                page.copy_from_slice(black_box(s));
                d.copy_from_slice(&page);
            }
        })
    });
    g.bench_function("read_page/1MiB", |b| {
        b.iter(|| {
            for i in 0..256 {
                mem.read_page(black_box(PageIndex(i)), &mut page);
            }
        })
    });
    g.bench_function("write_page/1MiB", |b| {
        b.iter(|| {
            for i in 0..256 {
                mem.write_page(black_box(PageIndex(i)), &data[..PAGE_SIZE]);
            }
        })
    });
    g.bench_function("read_page_unless_zero/data", |b| {
        b.iter(|| {
            (0..256)
                .filter(|&i| mem.read_page_unless_zero(black_box(PageIndex(i)), &mut page))
                .count()
        })
    });
    g.bench_function("read_page_unless_zero/zero", |b| {
        b.iter(|| {
            (0..256)
                .filter(|&i| zeros.read_page_unless_zero(black_box(PageIndex(i)), &mut page))
                .count()
        })
    });
    g.bench_function("plain_check_then_copy/data", |b| {
        b.iter(|| {
            data.chunks_exact(PAGE_SIZE)
                .filter(|p| {
                    let zero = is_zero_page(black_box(p));
                    if !zero {
                        page.copy_from_slice(p);
                    }
                    zero
                })
                .count()
        })
    });
    g.finish();
}

fn zero_detection(c: &mut Criterion) {
    let mut g = c.benchmark_group("zero_detect");
    g.throughput(Throughput::Bytes(MIB as u64));
    let zeros = vec![0u8; MIB];
    g.bench_function("or_reduce/zero", |b| {
        b.iter(|| {
            black_box(&zeros)
                .chunks_exact(PAGE_SIZE)
                .filter(|p| is_zero_page(p))
                .count()
        })
    });
    g.bench_function("bytewise/zero", |b| {
        b.iter(|| {
            black_box(&zeros)
                .chunks_exact(PAGE_SIZE)
                .filter(|p| p.iter().all(|&x| x == 0))
                .count()
        })
    });
    let data = pages_of(ContentKind::Text, 256);
    g.bench_function("or_reduce/nonzero", |b| {
        b.iter(|| {
            black_box(&data)
                .chunks_exact(PAGE_SIZE)
                .filter(|p| is_zero_page(p))
                .count()
        })
    });
    g.finish();
}

fn bitmap(c: &mut Criterion) {
    // 1 GiB of guest: 262,144 pages.
    let pages = 262_144u64;
    let mut g = c.benchmark_group("bitmap");
    g.throughput(Throughput::Elements(pages));
    for pct in [0u64, 1, 50, 100] {
        let b = DirtyBitmap::new(pages);
        let mut snap = DirtySnapshot::new();
        let step = 100u64.checked_div(pct).unwrap_or(u64::MAX);
        g.bench_with_input(
            BenchmarkId::new("snapshot_and_clear", format!("{pct}pct")),
            &pct,
            |bench, _| {
                bench.iter(|| {
                    if pct > 0 {
                        let mut p = 0;
                        while p < pages {
                            b.mark(PageIndex(p));
                            p += step;
                        }
                    }
                    b.snapshot_and_clear(&mut snap);
                    black_box(snap.count())
                })
            },
        );
        g.bench_with_input(
            BenchmarkId::new("runs", format!("{pct}pct")),
            &pct,
            |bench, _| {
                let mut s = DirtySnapshot::from_words(vec![], pages);
                if pct > 0 {
                    let mut p = 0;
                    while p < pages {
                        s.set(PageIndex(p));
                        p += step;
                    }
                }
                bench.iter(|| black_box(&s).runs().map(|r| r.1).sum::<u64>())
            },
        );
    }
    g.finish();
}

fn codecs(c: &mut Criterion) {
    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Bytes(MIB as u64));
    for kind in [ContentKind::Text, ContentKind::Binary, ContentKind::Random] {
        let input = pages_of(kind, 256);
        for codec in [
            Codec::Lz4,
            Codec::Zstd { level: 1 },
            Codec::Zstd { level: 3 },
        ] {
            let name = format!("{kind:?}/{codec}").to_lowercase();
            let mut out = bytes::BytesMut::with_capacity(2 * MIB);
            g.bench_function(format!("compress/{name}"), |b| {
                b.iter(|| {
                    out.clear();
                    codec::compress(codec, black_box(&input), &mut out).unwrap()
                })
            });
            out.clear();
            codec::compress(codec, &input, &mut out).unwrap();
            let mut back = vec![0u8; MIB];
            g.bench_function(format!("decompress/{name}"), |b| {
                b.iter(|| codec::decompress(codec.id(), black_box(&out), &mut back).unwrap())
            });
        }
    }
    g.finish();
}

fn frames_and_batches(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame");
    g.throughput(Throughput::Bytes(MIB as u64));
    let payload = pages_of(ContentKind::Random, 256);
    let header = Header::new(Command::PageBatch);
    g.bench_function("encode_header_crc/1MiB", |b| {
        b.iter(|| encode_header(&header, black_box(&payload)))
    });
    let frame = ferry::wire::encode_frame(&header, &payload);
    g.bench_function("decode/1MiB", |b| {
        b.iter(|| {
            let mut buf = bytes::BytesMut::from(black_box(&frame[..]));
            FrameDecoder::new().decode(&mut buf).unwrap().unwrap()
        })
    });
    // What an authenticated frame costs instead of its CRC: the tag over
    // the payload in one piece (a received or compressed batch), and page
    // by page (raw pages placed straight into guest memory).
    let raw = encode_header(&header, &payload);
    let mut mac = ferry::wire::FrameMac::new([7; 32]);
    g.bench_function("mac_tag/1MiB", |b| {
        b.iter(|| {
            let mut t = mac.begin(black_box(&raw));
            t.update(black_box(&payload));
            t.finish()
        })
    });
    g.bench_function("mac_tag_by_page/1MiB", |b| {
        b.iter(|| {
            let mut t = mac.begin(black_box(&raw));
            for page in black_box(&payload).chunks_exact(PAGE_SIZE) {
                t.update(page);
            }
            t.finish()
        })
    });
    g.bench_function("mac_tag_by_64KiB/1MiB", |b| {
        b.iter(|| {
            let mut t = mac.begin(black_box(&raw));
            for block in black_box(&payload).chunks_exact(16 * PAGE_SIZE) {
                t.update(block);
            }
            t.finish()
        })
    });
    g.bench_function("crc_by_page/1MiB", |b| {
        b.iter(|| {
            let mut c = ferry::wire::FrameCrc::new(black_box(&raw));
            for page in black_box(&payload).chunks_exact(PAGE_SIZE) {
                c.update(page);
            }
            c
        })
    });
    g.bench_function("xxh3_page_hash/1MiB", |b| {
        b.iter(|| {
            black_box(&payload)
                .chunks_exact(PAGE_SIZE)
                .map(page_hash)
                .fold(0u64, u64::wrapping_add)
        })
    });
    g.finish();

    // A whole batch from guest memory: copy, zero-detect, hash, compress.
    let mut g = c.benchmark_group("batch_encode");
    g.throughput(Throughput::Bytes(MIB as u64));
    let mem = GuestMemory::new(64 * MIB as u64).unwrap();
    FillSpec::default().fill(&mem, 1, 2);
    for codec in [Codec::None, Codec::Lz4, Codec::Zstd { level: 1 }] {
        let mut enc = BatchEncoder::new();
        let mut first = 0u64;
        g.bench_function(format!("mix/{codec}"), |b| {
            b.iter(|| {
                first = (first + 256) % mem.pages();
                enc.encode(
                    0,
                    codec,
                    &[ferry::page::PageRun::new(PageIndex(first), 256)],
                    |p, buf| {
                        mem.read_page(p, buf);
                        let z = is_zero_page(buf);
                        if !z {
                            black_box(page_hash(buf));
                        }
                        z
                    },
                )
                .unwrap()
            })
        });
    }
    g.finish();
}

/// The search for patches on the source: content-defined anchors over
/// pages of text, and their lookup and insertion in the anchor table. The
/// limit beside them is a byte-by-byte scan's (one dependent add a byte).
fn patches(c: &mut Criterion) {
    use ferry::migration::similar::{anchors, AnchorIndex};
    let mut g = c.benchmark_group("patches");
    g.throughput(Throughput::Bytes(MIB as u64));
    let pages = pages_of(ContentKind::Text, 256);
    g.bench_function("bytewise_sum/1MiB", |b| {
        b.iter(|| {
            black_box(&pages)
                .iter()
                .fold(0u64, |h, &x| h.wrapping_add(h).wrapping_add(u64::from(x)))
        })
    });
    let mut found = Vec::new();
    g.bench_function("anchors/1MiB", |b| {
        b.iter(|| {
            let mut n = 0;
            for page in black_box(&pages).chunks_exact(PAGE_SIZE) {
                anchors(page, &mut found);
                n += found.len();
            }
            n
        })
    });
    let index = AnchorIndex::new(1 << 18);
    g.bench_function("anchors_lookup_insert/1MiB", |b| {
        let mut at = 0u64;
        b.iter(|| {
            let mut hits = 0;
            for page in black_box(&pages).chunks_exact(PAGE_SIZE) {
                anchors(page, &mut found);
                hits += usize::from(index.base_for(&found).is_some());
                index.insert(at, &found);
                at = (at + PAGE_SIZE as u64) % (1 << 30);
            }
            hits
        })
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = baseline, guest_memory, zero_detection, bitmap, codecs, frames_and_batches, patches
}
criterion_main!(benches);
