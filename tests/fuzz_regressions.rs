//! Replays `fuzz/regressions/` through the fuzz properties, and runs a
//! deterministic mutation sweep over valid frames, so every CI run exercises
//! the decoders on hostile input even without a fuzzer.

use ferry::codec::Codec;
use ferry::wire::{encode_frame, fuzz, BatchEncoder, Command, Header};
use std::path::Path;

fn replay(dir: &str, property: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/regressions")
        .join(dir);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        property(&data);
        fuzz::stream(&data);
        n += 1;
    }
    n
}

#[test]
fn regressions_replay() {
    assert!(replay("frame", fuzz::frame) > 0);
    assert!(replay("batch", fuzz::batch) > 0);
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
        (Codec::None, vec![(0u64, 3u32)]),
        (Codec::Lz4, vec![(1, 2), (10, 4)]),
        (Codec::Zstd { level: 1 }, vec![(100, 1), (200, 7)]),
    ] {
        let b = BatchEncoder::new()
            .encode(2, codec, &runs, |p, buf| {
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
