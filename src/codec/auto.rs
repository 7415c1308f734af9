//! The adaptive codec: picks a concrete codec per batch from live measurements.
//!
//! For each candidate it keeps an exponentially weighted estimate of its encode
//! speed per core and its ratio on the pages being sent now. The pipeline's
//! throughput with a candidate is the smaller of what the cores can encode and
//! what the link carries once compressed:
//!
//! ```text
//! throughput(c) = min(cores × encode_speed(c), link_rate × ratio(c))
//! ```
//!
//! The candidate with the highest throughput wins (a stronger one must beat a
//! cheaper one by 3%, so near-ties go to the cheaper). When the link is the
//! bottleneck this favours the best ratio; when the CPU is, the fastest encoder;
//! pages that measurably do not compress make every compressor's ratio 1, so
//! `none` wins. One batch in [`PROBE_EVERY`] tries another candidate in turn, so
//! the estimates follow the page mix as it changes.

use super::Codec;

/// Candidates, from cheapest to strongest.
pub const CANDIDATES: [Codec; 4] = [
    Codec::None,
    Codec::Lz4,
    Codec::Zstd { level: 1 },
    Codec::Zstd { level: 3 },
];
/// One batch in this many probes a candidate other than the best.
pub const PROBE_EVERY: u64 = 16;
/// Weight of a new sample in the moving averages.
const ALPHA: f64 = 0.2;
/// A stronger candidate must beat a cheaper one by this factor: at a near-tie
/// the cheaper codec costs less CPU for the same result.
const MARGIN: f64 = 1.03;

#[derive(Debug, Clone, Copy, Default)]
struct Estimate {
    /// Guest bytes per second of encoding on one core.
    speed: Option<f64>,
    /// Guest bytes per payload byte.
    ratio: Option<f64>,
}

fn ewma(old: Option<f64>, new: f64) -> Option<f64> {
    Some(old.map_or(new, |o| o + ALPHA * (new - o)))
}

/// The chooser's state. Not thread-safe by itself; the source shares one
/// behind a mutex, taken once per batch.
#[derive(Debug, Clone)]
pub struct AutoChooser {
    estimates: [Estimate; CANDIDATES.len()],
    cores: f64,
    link_bps: Option<f64>,
    batches: u64,
    next_probe: usize,
}

impl AutoChooser {
    /// A chooser for an encoder with `cores` cores.
    pub fn new(cores: usize) -> Self {
        Self {
            estimates: [Estimate::default(); CANDIDATES.len()],
            cores: cores.max(1) as f64,
            link_bps: None,
            batches: 0,
            next_probe: 0,
        }
    }

    /// Sets the link rate in wire bytes per second (a configured cap, or what
    /// the sockets are measured to absorb).
    pub fn set_link_rate(&mut self, bps: f64) {
        if bps.is_finite() && bps > 0.0 {
            self.link_bps = Some(bps);
        }
    }

    /// The link rate in use.
    pub fn link_rate(&self) -> Option<f64> {
        self.link_bps
    }

    /// Records one encoded batch: `guest_bytes` of pages took `payload_bytes`
    /// on the wire and `seconds` of one core with `codec`.
    pub fn record(&mut self, codec: Codec, guest_bytes: u64, payload_bytes: u64, seconds: f64) {
        let Some(i) = CANDIDATES.iter().position(|&c| c == codec) else {
            return;
        };
        if guest_bytes == 0 || payload_bytes == 0 || seconds <= 0.0 {
            return;
        }
        let e = &mut self.estimates[i];
        e.speed = ewma(e.speed, guest_bytes as f64 / seconds);
        e.ratio = ewma(e.ratio, guest_bytes as f64 / payload_bytes as f64);
    }

    /// Expected pipeline throughput (guest bytes/s) with candidate `i`.
    fn throughput(&self, i: usize) -> Option<f64> {
        let e = self.estimates[i];
        let cpu = self.cores * e.speed?;
        let wire = match self.link_bps {
            Some(link) => link * e.ratio?,
            None => f64::INFINITY,
        };
        Some(cpu.min(wire))
    }

    /// The best candidate by the current estimates, ignoring probes.
    pub fn best(&self) -> Codec {
        // Until every candidate has been measured, measure them in turn.
        if let Some(i) = (0..CANDIDATES.len()).find(|&i| self.estimates[i].speed.is_none()) {
            return CANDIDATES[i];
        }
        let mut best = 0;
        let mut best_tp = self.throughput(0).unwrap_or(0.0);
        for i in 1..CANDIDATES.len() {
            let tp = self.throughput(i).unwrap_or(0.0);
            if tp > best_tp * MARGIN {
                best = i;
                best_tp = tp;
            }
        }
        CANDIDATES[best]
    }

    /// The codec for the next batch.
    pub fn pick(&mut self) -> Codec {
        self.batches += 1;
        let best = self.best();
        if self.batches % PROBE_EVERY == 0 {
            // Probe the candidates other than the best, in turn.
            self.next_probe = (self.next_probe + 1) % CANDIDATES.len();
            if CANDIDATES[self.next_probe] == best {
                self.next_probe = (self.next_probe + 1) % CANDIDATES.len();
            }
            return CANDIDATES[self.next_probe];
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: f64 = 1e6;

    /// A chooser that has measured each candidate at (speed MB/s, ratio).
    fn measured(cores: usize, link_mbps: Option<f64>, stats: Stats) -> AutoChooser {
        let mut a = AutoChooser::new(cores);
        if let Some(l) = link_mbps {
            a.set_link_rate(l * MB);
        }
        for (c, (speed, ratio)) in CANDIDATES.iter().zip(stats) {
            let guest = 1 << 20;
            a.record(
                *c,
                guest,
                (guest as f64 / ratio) as u64,
                guest as f64 / (speed * MB),
            );
        }
        a
    }

    /// Measured (encode MB/s per core, ratio) of each candidate.
    type Stats = [(f64, f64); 4];

    /// This machine's figures on the realistic mix (ferry bench codecs).
    const MIX: Stats = [(5130.0, 1.57), (658.0, 2.52), (422.0, 3.06), (298.0, 3.17)];
    /// Incompressible pages: compressors try and fall back to raw.
    const RANDOM: Stats = [(5000.0, 1.0), (1170.0, 1.0), (2090.0, 1.0), (1500.0, 1.0)];

    #[test]
    fn the_link_decides() {
        // (cores, link MB/s, stats, expected)
        let table: [(usize, Option<f64>, Stats, Codec); 8] = [
            (2, None, MIX, Codec::None),         // loopback: nothing beats raw
            (2, Some(5000.0), MIX, Codec::None), // a link faster than lz4 can feed
            (2, Some(1250.0), MIX, Codec::None), // 10 Gbit/s: raw 1962 > lz4's 1316 (CPU-bound)
            (2, Some(250.0), MIX, Codec::Zstd { level: 1 }), // 2 Gbit/s: 765 > lz4 630 > zstd:3 596
            (2, Some(125.0), MIX, Codec::Zstd { level: 3 }), // 1 Gbit/s: 396 > zstd:1's 382
            (2, Some(12.5), MIX, Codec::Zstd { level: 3 }), // 100 Mbit/s: best ratio
            (2, Some(12.5), RANDOM, Codec::None), // incompressible: raw is fastest
            (1, Some(400.0), MIX, Codec::Lz4),   // one core: 658 vs zstd:1's 422
        ];
        for (i, (cores, link, stats, want)) in table.into_iter().enumerate() {
            assert_eq!(measured(cores, link, stats).best(), want, "case {i}");
        }
    }

    #[test]
    fn every_candidate_is_measured_first_and_then_probed() {
        let mut a = AutoChooser::new(2);
        a.set_link_rate(125.0 * MB);
        let first: Vec<Codec> = (0..4)
            .map(|_| {
                let c = a.pick();
                a.record(c, 1 << 20, 1 << 19, 0.001);
                c
            })
            .collect();
        assert_eq!(first, CANDIDATES.to_vec());
        let mut a = measured(2, Some(12.5), MIX);
        let picks: Vec<Codec> = (0..64).map(|_| a.pick()).collect();
        let best = Codec::Zstd { level: 3 };
        assert_eq!(
            picks.iter().filter(|&&c| c == best).count(),
            60,
            "15 of 16 batches use the best"
        );
        for c in CANDIDATES.iter().filter(|&&c| c != best) {
            assert!(picks.contains(c), "{c} is probed");
        }
    }

    #[test]
    fn estimates_follow_a_changing_page_mix() {
        let mut a = measured(2, Some(250.0), MIX);
        assert_eq!(a.best(), Codec::Zstd { level: 1 });
        // The guest starts writing incompressible pages: every probe says so.
        for _ in 0..20 {
            for (c, (speed, ratio)) in CANDIDATES.iter().zip(RANDOM) {
                let guest = 1u64 << 20;
                a.record(
                    *c,
                    guest,
                    (guest as f64 / ratio) as u64,
                    guest as f64 / (speed * MB),
                );
            }
        }
        assert_eq!(a.best(), Codec::None);
    }
}
