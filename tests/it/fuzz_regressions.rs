//! Replays `fuzz/regressions/` through the fuzz properties, and runs a
//! deterministic mutation sweep over valid frames, so every CI run exercises
//! the decoders on hostile input even without a fuzzer.

use ferry::codec::{Codec, CodecId};
use ferry::fuzz;
use ferry::migration::dest_state::DestState;
use ferry::page::PageIndex;
use ferry::page::PageRun;
use ferry::wire::{encode_frame, BatchEncoder, Command, Header};
use std::path::Path;

/// A fuzz target's property.
type Property = fn(&[u8]);

/// Every target, as `cargo fuzz` names it, with the property it checks.
const TARGETS: [(&str, Property); 13] = [
    ("frame_decode", fuzz::frame),
    ("batch_decode", fuzz::batch),
    ("stream_decode", fuzz::stream),
    ("lz4_decode", |d| fuzz::codec(CodecId::Lz4, d)),
    ("zstd_decode", |d| fuzz::codec(CodecId::Zstd, d)),
    ("kept_stream_decode", fuzz::kept_stream),
    ("receiver", |d| {
        fuzz::receiver(d);
    }),
    ("guest_state", fuzz::guest_state),
    ("guest_restore", fuzz::guest_restore),
    ("retained_image", fuzz::retained_image),
    ("records", |d| {
        ferry::agent::fuzz::records(d);
    }),
    ("live_events", ferry::agent::fuzz::live_events),
    ("patch_apply", fuzz::patch),
];

/// Runs every file of `fuzz/<kind>/<target>/` through the target's property.
fn replay(kind: &str, target: &str, property: Property) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join(kind)
        .join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return 0;
    };
    let mut n = 0;
    for entry in entries {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        property(&data);
        n += 1;
    }
    n
}

#[test]
fn regressions_and_seeds_replay() {
    for (target, property) in TARGETS {
        let n = replay("regressions", target, property) + replay("seeds", target, property);
        assert!(n > 0, "no saved inputs for {target}");
    }
}

#[test]
fn the_receiver_seed_is_a_whole_session() {
    // The committed seed is what the generator makes, and it runs a guest:
    // the fuzzer starts from every state.
    let seed = fuzz::receiver_seed();
    assert_eq!(fuzz::receiver(&seed), DestState::Running);
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/receiver/session.bin");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        seed,
        "regenerate with write_seeds"
    );
    // Cut anywhere, it stops short of running.
    for cut in [10, seed.len() / 2, seed.len() - 4] {
        assert_ne!(fuzz::receiver(&seed[..cut]), DestState::Running);
    }
}

/// Writes the seed corpus (`cargo test --test it fuzz_regressions -- --ignored`).
#[test]
#[ignore]
fn write_seeds() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
    let put = |target: &str, name: &str, data: &[u8]| {
        std::fs::create_dir_all(root.join(target)).unwrap();
        std::fs::write(root.join(target).join(name), data).unwrap();
    };
    put("receiver", "session.bin", &fuzz::receiver_seed());
    put("retained_image", "eight-pages.bin", &retained_seed());
    for (kind, data) in ferry::agent::fuzz::seeds() {
        put("records", &format!("{kind}.json"), &data);
    }
    for (i, (frame, payload)) in seeds().into_iter().enumerate() {
        put("frame_decode", &format!("batch-{i}.bin"), &frame);
        put("stream_decode", &format!("batch-{i}.bin"), &frame);
        put("batch_decode", &format!("batch-{i}.bin"), &payload);
    }
    // Control messages too, so the fuzzer starts inside every decoder.
    for (i, seed) in fuzz::receiver_seed_frames().into_iter().enumerate() {
        put("frame_decode", &format!("message-{i}.bin"), &seed);
    }
    let page: Vec<u8> = (0..8192u32)
        .map(|i| (i % 251) as u8 ^ (i / 97) as u8)
        .collect();
    for (target, codec) in [
        ("lz4_decode", Codec::Lz4),
        ("zstd_decode", Codec::Zstd { level: 3 }),
    ] {
        let mut out = bytes::BytesMut::new();
        ferry::codec::compress(codec, &page, &mut out).unwrap();
        let mut data = (page.len() as u32).to_le_bytes().to_vec();
        data.extend_from_slice(&out);
        put(target, "two-pages.bin", &data);
    }
    put(
        "kept_stream_decode",
        "three-pieces.bin",
        &kept_stream_seed(&page),
    );
    // A region, then a page sharing most of it: as ops, and as a page.
    let region = &page[..4096];
    let mut changed = region.to_vec();
    changed[1000..1100].fill(7);
    let mut ops = vec![0u8; 4096];
    let n = ferry::wire::patch::diff(&changed, region, &mut ops).unwrap();
    put("patch_apply", "ops.bin", &[region, &ops[..n]].concat());
    put("patch_apply", "page.bin", &[region, &changed].concat());
}

/// Three pieces of one kept stream, the last a repeat of the first, in
/// `fuzz::kept_stream`'s format.
fn kept_stream_seed(page: &[u8]) -> Vec<u8> {
    let mut enc = ferry::codec::StreamEncoder::new(1, true).unwrap();
    let mut data = Vec::new();
    for input in [page, &page[..4096], page] {
        let mut out = bytes::BytesMut::new();
        enc.compress(input, &mut out).unwrap();
        data.extend_from_slice(&(input.len() as u32).to_le_bytes());
        data.extend_from_slice(&(out.len() as u16).to_le_bytes());
        data.extend_from_slice(&out);
    }
    data
}

/// A retained image of eight pages, three with content.
fn retained_seed() -> Vec<u8> {
    let mem = ferry::memory::GuestMemory::new(8 * 4096).unwrap();
    for i in [1u64, 4, 6] {
        mem.write_page(PageIndex(i), &[i as u8; 4096]);
    }
    let path = std::env::temp_dir().join(format!("ferry-retained-seed-{}", std::process::id()));
    ferry::migration::retained::write(&mem, &path, &|| false).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    bytes
}

/// A deterministic xorshift generator: the sweep is the same on every run.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn seeds() -> Vec<(Vec<u8>, Vec<u8>)> {
    // (frame, batch payload) pairs from real encoders.
    let mut out = vec![];
    for (codec, runs) in [
        (Codec::None, vec![PageRun::new(PageIndex(0), 3)]),
        (
            Codec::Lz4,
            vec![
                PageRun::new(PageIndex(1), 2),
                PageRun::new(PageIndex(10), 4),
            ],
        ),
        (
            Codec::Zstd { level: 1 },
            vec![
                PageRun::new(PageIndex(100), 1),
                PageRun::new(PageIndex(200), 7),
            ],
        ),
    ] {
        let b = BatchEncoder::new()
            .encode(2, codec, &runs, |PageIndex(p), buf| {
                if p % 3 == 0 {
                    buf.fill(0);
                    return true;
                }
                for (i, x) in buf.iter_mut().enumerate() {
                    *x = (i as u64 * p % 7) as u8;
                }
                false
            })
            .unwrap();
        let frame = encode_frame(&Header::new(Command::PageBatch), &b.payload);
        out.push((frame, b.payload.to_vec()));
    }
    // Zero pages, a reference, a patch and data, in one batch.
    let runs = [PageRun::new(PageIndex(300), 4)];
    let b = BatchEncoder::new()
        .encode_refs(2, Codec::Lz4, &runs, true, |PageIndex(p), buf| match p {
            300 => ferry::wire::Read::Zero,
            301 => ferry::wire::Read::Same {
                target: PageIndex(5),
                hash: 9,
            },
            302 => {
                let ops = [0u8, 0, 0xff, 0x0f, 1, 0, 7, 0, 0];
                buf[..ops.len()].copy_from_slice(&ops);
                ferry::wire::Read::Patch {
                    base: 4096 * 7 + 100,
                    tag: 11,
                    len: ops.len(),
                }
            }
            _ => {
                buf.fill(3);
                ferry::wire::Read::Data
            }
        })
        .unwrap();
    let frame = encode_frame(&Header::new(Command::PageBatch), &b.payload);
    out.push((frame, b.payload.to_vec()));
    // Dense pages: every third page a reference to one outside the batch.
    let runs = [PageRun::new(PageIndex(30), 9)];
    let b = BatchEncoder::new()
        .encode_refs(2, Codec::Lz4, &runs, true, |PageIndex(p), buf| {
            if p % 3 == 0 {
                return ferry::wire::Read::Same {
                    target: PageIndex(p / 3),
                    hash: p,
                };
            }
            buf.fill(p as u8);
            ferry::wire::Read::Data
        })
        .unwrap();
    let frame = encode_frame(&Header::new(Command::PageBatch), &b.payload);
    out.push((frame, b.payload.to_vec()));
    // A kept stream's first batch, as a connection's decoder takes it.
    let mut stream = ferry::codec::StreamEncoder::new(1, true).unwrap();
    let runs = [PageRun::new(PageIndex(50), 6)];
    let b = BatchEncoder::new()
        .encode_stream(
            2,
            Codec::ZstdStream { level: 1 },
            &runs,
            false,
            Some(&mut stream),
            |PageIndex(p), buf| {
                buf.fill((p % 5) as u8 + 1);
                ferry::wire::Read::Data
            },
        )
        .unwrap();
    let frame = encode_frame(&Header::new(Command::PageBatch), &b.payload);
    out.push((frame, b.payload.to_vec()));
    out
}

#[test]
fn mutated_valid_frames_never_panic() {
    let mut rng = Rng(0x5eed_f00d_1234_5678);
    let seeds = seeds();
    for i in 0..30_000 {
        let (frame, payload) = &seeds[i % seeds.len()];
        let mut target = if i % 2 == 0 {
            frame.clone()
        } else {
            payload.clone()
        };
        for _ in 0..1 + rng.below(4) {
            if target.is_empty() {
                target.push(rng.next() as u8);
            }
            match rng.below(5) {
                0 => {
                    let at = rng.below(target.len());
                    target[at] ^= 1 << rng.below(8);
                }
                1 => {
                    let at = rng.below(target.len());
                    target[at] = rng.next() as u8;
                }
                2 => target.truncate(rng.below(target.len() + 1)),
                3 => target.extend((0..rng.below(9)).map(|_| rng.next() as u8)),
                _ => {
                    // Overwrite a 4-byte field (lengths, counts) with a big value.
                    if target.len() >= 4 {
                        let at = rng.below(target.len() - 3);
                        target[at..at + 4]
                            .copy_from_slice(&(rng.next() as u32 | 0x8000_0000).to_le_bytes());
                    }
                }
            }
        }
        if i % 2 == 0 {
            fuzz::frame(&target);
            fuzz::stream(&target);
        } else {
            fuzz::batch(&target);
        }
    }
}

#[test]
fn guest_state_seeds_decode_and_their_mutations_never_panic() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/guest_state");
    let kvm = std::fs::read(dir.join("kvm.bin")).unwrap();
    // The committed KVM state is a real one (a paused guest's), so the
    // fuzzer starts from inputs that pass every check.
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    {
        let st = ferry::kvm::KvmGuestState::decode(&kvm[1..], fuzz::FUZZ_GUEST_PAGES).unwrap();
        assert!(!st.vcpu.msrs.is_empty());
    }
    let sim = std::fs::read(dir.join("sim.bin")).unwrap();
    let mut rng = Rng(0x5eed);
    for seed in [kvm, sim] {
        for cut in (0..seed.len()).step_by(61) {
            fuzz::guest_state(&seed[..cut]);
        }
        for _ in 0..2000 {
            let mut m = seed.clone();
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(m.len());
                m[at] = rng.next() as u8;
            }
            fuzz::guest_state(&m);
        }
    }
}

#[test]
fn record_seeds_decode_and_their_mutations_never_panic() {
    use ferry::agent::fuzz::{records, seeds};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/records");
    let seeds = seeds();
    for (kind, data) in &seeds {
        // Each seed passes every check, so the fuzzer starts inside them.
        assert!(records(data), "the {kind} seed does not decode");
        let file = std::fs::read(dir.join(format!("{kind}.json"))).unwrap();
        assert_eq!(&file, data, "regenerate with write_seeds");
        // A VM's record under another VM's name is refused.
        let at = data.windows(5).position(|w| w == b"\"vm1\"");
        if let (Some(at), "vm" | "kept_vm") = (at, *kind) {
            let mut other = data.clone();
            other[at + 3] = b'9';
            assert!(!records(&other), "the {kind} seed decodes for VM vm9");
        }
    }
    // Mutations that keep it JSON: numbers out of range, long texts, wrong
    // types and names; and raw byte damage.
    let swaps: [(&str, &str); 8] = [
        ("1", "18446744073709551616"),
        ("1", "-1"),
        ("\"a\"", "\"../../etc\""),
        ("\"vm1\"", "\"vm2\""),
        ("true", "null"),
        ("\"running\"", "\"sleeping\""),
        ("[", "[[],"),
        (":", ":1e999,\"x\":"),
    ];
    let mut rng = Rng(0x7265_636f_7264_7321);
    let mut accepted = 0;
    for i in 0..20_000 {
        let (_, seed) = &seeds[i % seeds.len()];
        let mut data = seed.clone();
        if i % 2 == 0 {
            let text = String::from_utf8_lossy(&data[1..]).into_owned();
            let (from, to) = swaps[rng.below(swaps.len())];
            let hits: Vec<usize> = text.match_indices(from).map(|(at, _)| at).collect();
            if hits.is_empty() {
                continue;
            }
            let at = hits[rng.below(hits.len())];
            let text = format!("{}{to}{}", &text[..at], &text[at + from.len()..]);
            data.truncate(1);
            data.extend_from_slice(text.as_bytes());
        } else {
            let at = 1 + rng.below(data.len() - 1);
            match rng.below(3) {
                0 => data[at] ^= 1 << rng.below(8),
                1 => data.truncate(at),
                _ => data.insert(at, rng.next() as u8),
            }
        }
        accepted += usize::from(records(&data));
    }
    // Some mutations are still valid records, most are refused.
    assert!(accepted > 0 && accepted < 15_000, "{accepted} accepted");
}
