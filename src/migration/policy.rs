//! Convergence: after each pre-copy round, decide whether to switch over, go on,
//! throttle the guest, or give up.
//!
//! The rule, in order:
//! 1. Estimate the downtime as `dirty bytes now / measured throughput`.
//! 2. If the estimate is under the downtime limit, switch over, unless the last
//!    round still halved the work (it dirtied less than half of what it sent)
//!    and the estimate is above the switchover floor: then one more round is
//!    cheap and shortens the pause.
//! 3. Past the completion timeout, or with no new low in the remaining bytes for
//!    the progress timeout, give up: the guest stays on the source.
//! 4. A round that dirtied at least half of what it sent is not converging; the
//!    second such round in a row steps the auto-converge throttle (20% first,
//!    +10% per step, 99% at most, as QEMU's defaults).

use std::time::Duration;

/// Auto-converge steps, in percent of guest time asleep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AutoConverge {
    /// The first throttle. Default: 20%.
    pub initial_pct: u8,
    /// Added at each further step. Default: 10%.
    pub increment_pct: u8,
    /// The ceiling. Default: 99%.
    pub max_pct: u8,
}

impl Default for AutoConverge {
    fn default() -> Self {
        Self {
            initial_pct: 20,
            increment_pct: 10,
            max_pct: 99,
        }
    }
}

/// The switchover pause the source aims under by default: 300 ms.
pub const DEFAULT_DOWNTIME_LIMIT: Duration = Duration::from_millis(300);
/// Below this estimated pause, switch over without trying another round: 5 ms.
pub const DEFAULT_SWITCHOVER_FLOOR: Duration = Duration::from_millis(5);
/// Give up when the remaining bytes make no new low for this long: 150 s.
pub const DEFAULT_PROGRESS_TIMEOUT: Duration = Duration::from_secs(150);
/// Completion timeout per GiB of guest memory: 150 s.
pub const COMPLETION_TIMEOUT_PER_GIB: Duration = Duration::from_secs(150);

/// The convergence rule's parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvergencePolicy {
    /// The pause to aim under. Default: 300 ms.
    pub downtime_limit: Duration,
    /// Estimated pauses below this switch over at once. Default: 5 ms.
    pub switchover_floor: Duration,
    /// Throttling steps, or `None` to never throttle.
    pub auto_converge: Option<AutoConverge>,
    /// Give up after this long in pre-copy.
    pub completion_timeout: Duration,
    /// Give up when remaining bytes make no new low for this long.
    pub progress_timeout: Duration,
}

impl ConvergencePolicy {
    /// The defaults for a guest of `memory_bytes`.
    pub fn for_memory(memory_bytes: u64) -> Self {
        Self {
            downtime_limit: DEFAULT_DOWNTIME_LIMIT,
            switchover_floor: DEFAULT_SWITCHOVER_FLOOR,
            auto_converge: Some(AutoConverge::default()),
            completion_timeout: completion_timeout_for(memory_bytes),
            progress_timeout: DEFAULT_PROGRESS_TIMEOUT,
        }
    }
}

/// 150 s per GiB of guest memory, at least 150 s.
pub fn completion_timeout_for(memory_bytes: u64) -> Duration {
    let gib = (memory_bytes as f64 / (1u64 << 30) as f64).max(1.0);
    COMPLETION_TIMEOUT_PER_GIB.mul_f64(gib)
}

/// What one pre-copy round did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoundStats {
    /// Round number, 0 first.
    pub round: u32,
    /// Time since the migration started.
    pub elapsed: Duration,
    /// How long the round took.
    pub duration: Duration,
    /// Guest bytes sent in the round.
    pub bytes_sent: u64,
    /// Guest bytes dirty now: what the next round would send.
    pub dirty_bytes: u64,
}

/// Why pre-copy gave up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GiveUp {
    /// The completion timeout passed.
    CompletionTimeout(Duration),
    /// The remaining bytes made no new low for the progress timeout.
    NoProgress(Duration),
}

/// What to do after a round.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decision {
    /// Run another round.
    Continue,
    /// Run another round with the guest throttled to this percentage.
    Throttle(u8),
    /// Pause the guest and hand it over.
    Switchover,
    /// Stop: the guest stays on the source.
    GiveUp(GiveUp),
}

/// Don't trust the throughput of rounds smaller than this (latency dominates).
const MIN_MEASURED_BYTES: u64 = 4 << 20;

/// The policy plus what it has seen so far.
#[derive(Debug, Clone)]
pub struct Convergence {
    policy: ConvergencePolicy,
    throughput_bps: Option<f64>,
    bad_rounds: u32,
    throttle_pct: u8,
    best_remaining: u64,
    best_at: Duration,
}

impl Convergence {
    /// A fresh tracker.
    pub fn new(policy: ConvergencePolicy) -> Self {
        Self {
            policy,
            throughput_bps: None,
            bad_rounds: 0,
            throttle_pct: 0,
            best_remaining: u64::MAX,
            best_at: Duration::ZERO,
        }
    }

    /// The policy.
    pub fn policy(&self) -> &ConvergencePolicy {
        &self.policy
    }

    /// The measured throughput in guest bytes/s, once a round has measured it.
    pub fn throughput_bps(&self) -> Option<f64> {
        self.throughput_bps
    }

    /// The pause expected if the guest stopped with `dirty_bytes` left.
    pub fn expected_downtime(&self, dirty_bytes: u64) -> Option<Duration> {
        let bps = self.throughput_bps?;
        Duration::try_from_secs_f64(dirty_bytes as f64 / bps).ok()
    }

    /// The throttle in force.
    pub fn throttle_pct(&self) -> u8 {
        self.throttle_pct
    }

    /// Takes one round's figures and decides.
    pub fn decide(&mut self, r: &RoundStats) -> Decision {
        let secs = r.duration.as_secs_f64();
        if secs > 0.0 && (r.bytes_sent >= MIN_MEASURED_BYTES || self.throughput_bps.is_none()) {
            self.throughput_bps = Some(r.bytes_sent as f64 / secs);
        }
        if let Some(est) = self.expected_downtime(r.dirty_bytes) {
            let halving = r.bytes_sent > 0 && r.dirty_bytes * 2 < r.bytes_sent;
            if est <= self.policy.downtime_limit
                && (!halving || est <= self.policy.switchover_floor)
            {
                return Decision::Switchover;
            }
        }
        if r.elapsed >= self.policy.completion_timeout {
            return Decision::GiveUp(GiveUp::CompletionTimeout(self.policy.completion_timeout));
        }
        if r.dirty_bytes < self.best_remaining {
            self.best_remaining = r.dirty_bytes;
            self.best_at = r.elapsed;
        } else if r.elapsed.saturating_sub(self.best_at) >= self.policy.progress_timeout {
            return Decision::GiveUp(GiveUp::NoProgress(self.policy.progress_timeout));
        }
        let not_converging = r.round > 0 && r.dirty_bytes * 2 >= r.bytes_sent;
        if !not_converging {
            self.bad_rounds = 0;
            return Decision::Continue;
        }
        self.bad_rounds += 1;
        match self.policy.auto_converge {
            Some(ac) if self.bad_rounds >= 2 && self.throttle_pct < ac.max_pct => {
                self.throttle_pct = if self.throttle_pct == 0 {
                    ac.initial_pct
                } else {
                    self.throttle_pct.saturating_add(ac.increment_pct)
                }
                .min(ac.max_pct);
                Decision::Throttle(self.throttle_pct)
            }
            _ => Decision::Continue,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1_000_000;

    fn policy() -> ConvergencePolicy {
        ConvergencePolicy {
            completion_timeout: Duration::from_secs(60),
            progress_timeout: Duration::from_secs(20),
            ..ConvergencePolicy::for_memory(1 << 30)
        }
    }

    fn round(round: u32, elapsed_s: f64, dur_ms: u64, sent_mb: u64, dirty_mb: u64) -> RoundStats {
        RoundStats {
            round,
            elapsed: Duration::from_secs_f64(elapsed_s),
            duration: Duration::from_millis(dur_ms),
            bytes_sent: sent_mb * MB,
            dirty_bytes: dirty_mb * MB,
        }
    }

    #[test]
    fn table() {
        use Decision::*;
        // (round stats, expected decision) in sequence, one tracker per case.
        let cases: Vec<(&str, Vec<(RoundStats, Decision)>)> = vec![
            (
                "hot set converges: keep going while rounds halve, then switch",
                vec![
                    // 1000 MB in 1 s: 1 GB/s; 40 MB left is 40 ms but halving → continue.
                    (round(0, 1.0, 1000, 1000, 40), Continue),
                    // 40 MB in 40 ms; 4 MB left: 4 ms, under the 5 ms floor.
                    (round(1, 1.04, 40, 40, 4), Switchover),
                ],
            ),
            (
                "a plateau under the limit switches at once",
                vec![
                    (round(0, 1.0, 1000, 1000, 40), Continue),
                    (round(1, 1.1, 40, 40, 30), Switchover),
                ],
            ),
            (
                "a dirty rate above the link throttles on the second bad round",
                vec![
                    (round(0, 1.0, 1000, 100, 64), Continue),
                    (round(1, 1.64, 640, 64, 64), Continue),
                    (round(2, 2.3, 640, 64, 64), Throttle(20)),
                    (round(3, 2.9, 640, 64, 60), Throttle(30)),
                    (round(4, 3.5, 600, 60, 20), Continue),
                    // 2 MB left is 20 ms: under the limit, but the round still
                    // halved the work, so one more short round.
                    (round(5, 3.7, 200, 20, 2), Continue),
                    (round(6, 3.72, 20, 2, 0), Switchover),
                ],
            ),
            (
                "the throttle stops at 99%",
                (0..14)
                    .map(|i| {
                        let d = match i {
                            0 | 1 => Continue,
                            2..=9 => Throttle(20 + 10 * (i as u8 - 2)),
                            10 => Throttle(99),
                            _ => Continue,
                        };
                        (round(i, 1.0 + i as f64 * 0.6, 640, 64, 64), d)
                    })
                    .collect(),
            ),
            (
                "completion timeout",
                vec![
                    (round(0, 1.0, 1000, 100, 64), Continue),
                    (
                        round(1, 61.0, 640, 64, 64),
                        GiveUp(super::GiveUp::CompletionTimeout(Duration::from_secs(60))),
                    ),
                ],
            ),
            (
                "no progress",
                vec![
                    (round(0, 1.0, 1000, 100, 64), Continue),
                    (round(1, 10.0, 640, 64, 65), Continue),
                    (
                        round(2, 22.0, 640, 64, 66),
                        GiveUp(super::GiveUp::NoProgress(Duration::from_secs(20))),
                    ),
                ],
            ),
        ];
        for (name, rounds) in cases {
            let mut policy = policy();
            if name == "no progress" {
                policy.auto_converge = None;
            }
            let mut c = Convergence::new(policy);
            for (i, (r, want)) in rounds.iter().enumerate() {
                assert_eq!(c.decide(r), *want, "{name}: round {i}");
            }
        }
    }

    #[test]
    fn without_auto_converge_it_never_throttles() {
        let mut c = Convergence::new(ConvergencePolicy {
            auto_converge: None,
            ..policy()
        });
        for i in 0..10 {
            assert_eq!(
                c.decide(&round(i, 1.0 + f64::from(i), 640, 64, 64)),
                Decision::Continue
            );
        }
    }

    #[test]
    fn completion_timeout_scales_with_memory() {
        assert_eq!(completion_timeout_for(1 << 30), Duration::from_secs(150));
        assert_eq!(completion_timeout_for(4 << 30), Duration::from_secs(600));
        assert_eq!(completion_timeout_for(64 << 20), Duration::from_secs(150));
    }
}
