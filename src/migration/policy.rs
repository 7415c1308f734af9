//! Convergence: after each pre-copy round, decide whether to switch over, go on,
//! throttle the guest, or give up.
//!
//! The rule, in order:
//! 1. Estimate the downtime as `dirty bytes now / measured throughput`, plus
//!    what the pause costs besides those bytes (the last dirty-log sync, the
//!    hand-off's round trips, the guest's state and its build on the
//!    destination), as the driver measured it.
//! 2. If the estimate is under the downtime limit, switch over, unless the
//!    rounds still shrink fast (the last one dirtied less than three quarters
//!    of what it sent), the estimate is above the switchover floor, and the
//!    completion budget has room for another round: then one more round
//!    shortens the pause (without throttling the guest for it). Rounds that
//!    stop shrinking switch over at once.
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
/// Below this time to send the dirty pages, switch over without trying
/// another round: 5 ms.
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
    /// Below this, the part of the pause another round could shorten
    /// (sending the dirty pages) is not worth a round. Default: 5 ms.
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

/// What the pause costs on top of the dirty-log sync and the hand-off's
/// round trips, which the driver measures: pausing the vCPUs, saving their
/// state, and building and resuming the guest on the destination. Measured
/// (BENCHMARKS.md, 2026-12-01): a KVM guest's vCPU pause 0.15-0.3 ms, its
/// state 0.05 ms, the destination's VM 0.8 ms; a synthetic guest's well
/// under 0.5 ms. Rounded up.
pub fn handoff_allowance(kind: crate::wire::GuestKind) -> Duration {
    match kind {
        crate::wire::GuestKind::Kvm => Duration::from_millis(2),
        _ => Duration::from_micros(500),
    }
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
    /// What the pause costs besides sending the dirty bytes: the last
    /// dirty-log sync, the hand-off's round trips, the guest's state and
    /// its build on the destination.
    pub pause_cost: Duration,
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

/// Rounds still shrink fast while each dirties less than this share of what
/// it sent (in quarters): three quarters.
const SHRINKING_QUARTERS: u64 = 3;

/// The policy plus what it has seen so far.
#[derive(Debug, Clone)]
pub struct Convergence {
    policy: ConvergencePolicy,
    throughput_bps: Option<f64>,
    /// Whether the rate came from a round of at least `MIN_MEASURED_BYTES`.
    throughput_measured: bool,
    bad_rounds: u32,
    throttle_pct: u8,
    best_remaining: u64,
    best_at: Duration,
    pause_cost: Duration,
    /// Whether the throttle went a step past its gentle ones for a pause
    /// already under the limit (once at most).
    stepped_for_pause: bool,
}

impl Convergence {
    /// A fresh tracker.
    pub fn new(policy: ConvergencePolicy) -> Self {
        Self {
            policy,
            throughput_bps: None,
            throughput_measured: false,
            bad_rounds: 0,
            throttle_pct: 0,
            best_remaining: u64::MAX,
            best_at: Duration::ZERO,
            pause_cost: Duration::ZERO,
            stepped_for_pause: false,
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

    /// The pause expected if the guest stopped with `dirty_bytes` left:
    /// sending them, and the pause's own cost as last measured.
    pub fn expected_downtime(&self, dirty_bytes: u64) -> Option<Duration> {
        Some(self.transfer_time(dirty_bytes)? + self.pause_cost)
    }

    /// How long sending `bytes` takes at the measured throughput.
    fn transfer_time(&self, bytes: u64) -> Option<Duration> {
        // Nothing to send takes no time, whatever the link.
        if bytes == 0 {
            return Some(Duration::ZERO);
        }
        let bps = self.throughput_bps.filter(|&b| b > 0.0)?;
        Duration::try_from_secs_f64(bytes as f64 / bps).ok()
    }

    /// Whether another round is worth running though the pause would be
    /// under the limit now: the rounds still shrink fast, the part of the
    /// pause a round can shorten (sending the dirty bytes, `transfer`) is
    /// above the floor, and the completion budget has room for that round
    /// and the pause after it.
    fn another_round_pays(&self, r: &RoundStats, transfer: Duration) -> bool {
        let shrinking = r.dirty_bytes * 4 < r.bytes_sent * SHRINKING_QUARTERS;
        shrinking && transfer > self.policy.switchover_floor && self.room(r, transfer)
    }

    /// Whether the completion budget has room for another round of about
    /// `transfer` and the pause after it.
    fn room(&self, r: &RoundStats, transfer: Duration) -> bool {
        r.elapsed + transfer + transfer + r.pause_cost < self.policy.completion_timeout
    }

    /// The throttle in force.
    pub fn throttle_pct(&self) -> u8 {
        self.throttle_pct
    }

    /// Takes one round's figures and decides.
    pub fn decide(&mut self, r: &RoundStats) -> Decision {
        let secs = r.duration.as_secs_f64();
        // A round that sent nothing (a failback by delta of an idle guest)
        // says nothing of the link.
        // One from a small round (a few pages of a delta's round 0, sent in
        // about a round trip) stands only until a later round replaces it.
        let sent = r.bytes_sent > 0;
        let measured = r.bytes_sent >= MIN_MEASURED_BYTES;
        if secs > 0.0 && sent && (measured || !self.throughput_measured) {
            self.throughput_bps = Some(r.bytes_sent as f64 / secs);
            self.throughput_measured |= measured;
        }
        self.pause_cost = r.pause_cost;
        if let Some(transfer) = self.transfer_time(r.dirty_bytes) {
            if transfer + r.pause_cost <= self.policy.downtime_limit {
                return self.under_limit(r, transfer);
            }
        }
        if r.elapsed >= self.policy.completion_timeout {
            return Decision::GiveUp(GiveUp::CompletionTimeout(self.policy.completion_timeout));
        }
        if !self.note_progress(r) {
            return Decision::GiveUp(GiveUp::NoProgress(self.policy.progress_timeout));
        }
        let not_converging = r.round > 0 && r.dirty_bytes * 2 >= r.bytes_sent;
        self.step(not_converging)
    }

    /// The pause would be under the limit: another round while rounds still
    /// shrink fast; while they do not but the pause is above a short one (a
    /// sixteenth of the limit), a step of the throttle, as far as its first
    /// two steps (30% by default), or, for a long pause (over a quarter of
    /// the limit) of a guest the throttle already holds past them, one step
    /// more, once: its rounds then shrink fast again, and a few of them cost
    /// the guest less than a long pause. Else switch over.
    fn under_limit(&mut self, r: &RoundStats, transfer: Duration) -> Decision {
        if self.another_round_pays(r, transfer) {
            self.note_progress(r);
            self.bad_rounds = 0;
            return Decision::Continue;
        }
        let short = self.policy.downtime_limit / 16;
        let gentle = self
            .policy
            .auto_converge
            .is_some_and(|ac| self.throttle_pct < ac.initial_pct.saturating_add(ac.increment_pct));
        let long = transfer + r.pause_cost > self.policy.downtime_limit / 4;
        let once_more = long && !self.stepped_for_pause;
        if transfer > short && (gentle || once_more) && self.room(r, transfer) {
            if let Some(p) = self.throttle_up() {
                self.stepped_for_pause |= !gentle;
                self.note_progress(r);
                return Decision::Throttle(p);
            }
        }
        Decision::Switchover
    }

    /// A new low of the remaining bytes, or `false` once none came for the
    /// progress timeout.
    fn note_progress(&mut self, r: &RoundStats) -> bool {
        if r.dirty_bytes < self.best_remaining {
            self.best_remaining = r.dirty_bytes;
            self.best_at = r.elapsed;
            return true;
        }
        r.elapsed.saturating_sub(self.best_at) < self.policy.progress_timeout
    }

    /// Another round, throttled one step further on the second round in a
    /// row that is not converging.
    fn step(&mut self, not_converging: bool) -> Decision {
        if !not_converging {
            self.bad_rounds = 0;
            return Decision::Continue;
        }
        self.bad_rounds += 1;
        if self.bad_rounds < 2 {
            return Decision::Continue;
        }
        self.throttle_up()
            .map_or(Decision::Continue, Decision::Throttle)
    }

    /// One step up of the auto-converge throttle, if it is on and below its
    /// ceiling.
    fn throttle_up(&mut self) -> Option<u8> {
        let ac = self.policy.auto_converge?;
        if self.throttle_pct >= ac.max_pct {
            return None;
        }
        self.throttle_pct = if self.throttle_pct == 0 {
            ac.initial_pct
        } else {
            self.throttle_pct.saturating_add(ac.increment_pct)
        }
        .min(ac.max_pct);
        Some(self.throttle_pct)
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
            pause_cost: Duration::ZERO,
        }
    }

    #[test]
    fn a_round_that_sent_nothing_switches_over_when_nothing_is_dirty() {
        // A failback by delta of an idle guest: round 0 leaves every page out.
        let mut c = Convergence::new(policy());
        assert_eq!(c.decide(&round(0, 0.1, 5, 0, 0)), Decision::Switchover);
        // Something dirty and no rate known yet: one more round measures it.
        let mut c = Convergence::new(policy());
        assert_eq!(c.decide(&round(0, 0.1, 5, 0, 1)), Decision::Continue);
        assert_eq!(c.throughput_bps(), None);
        assert_eq!(c.decide(&round(1, 0.2, 10, 1, 0)), Decision::Switchover);
    }

    #[test]
    fn a_rate_from_a_small_round_stands_only_until_a_larger_one() {
        // A delta's round 0 of 40 KB in a 20 ms round trip: 2 MB/s, far
        // below the link. The next round's 8 MB in 80 ms replaces it, and
        // 2 MB dirty then fit the limit.
        let mut c = Convergence::new(policy());
        let tiny = RoundStats {
            bytes_sent: 40_000,
            ..round(0, 0.1, 20, 0, 2)
        };
        c.decide(&tiny);
        assert_eq!(c.throughput_bps(), Some(2_000_000.0));
        c.decide(&round(1, 0.2, 80, 8, 2));
        assert_eq!(c.throughput_bps(), Some(100_000_000.0));
        // A measured rate is not replaced by a small round's.
        c.decide(&RoundStats {
            bytes_sent: 40_000,
            ..round(2, 0.3, 20, 0, 2)
        });
        assert_eq!(c.throughput_bps(), Some(100_000_000.0));
    }

    fn costing(r: RoundStats, cost_ms: u64) -> RoundStats {
        RoundStats {
            pause_cost: Duration::from_millis(cost_ms),
            ..r
        }
    }

    /// Rounds that throttle a guest writing faster than the link to 40%,
    /// then `rest`.
    fn firm_throttle(rest: Vec<(RoundStats, Decision)>) -> Vec<(RoundStats, Decision)> {
        use Decision::*;
        let mut rounds = vec![
            (round(0, 10.0, 10000, 1000, 64), Continue),
            (round(1, 10.64, 640, 64, 64), Continue),
            (round(2, 11.28, 640, 64, 64), Throttle(20)),
            (round(3, 11.92, 640, 64, 60), Throttle(30)),
            (round(4, 12.52, 600, 60, 50), Throttle(40)),
        ];
        rounds.extend(rest);
        rounds
    }

    #[test]
    fn table() {
        use Decision::*;
        // (round stats, expected decision) in sequence, one tracker per case.
        let cases: Vec<(&str, Vec<(RoundStats, Decision)>)> = vec![
            (
                "hot set converges: keep going while rounds shrink, then switch",
                vec![
                    // 1000 MB in 1 s: 1 GB/s; 40 MB left is 40 ms but halving → continue.
                    (round(0, 1.0, 1000, 1000, 40), Continue),
                    // 40 MB in 40 ms; 4 MB left: 4 ms, under the 5 ms floor.
                    (round(1, 1.04, 40, 40, 4), Switchover),
                ],
            ),
            (
                "a plateau at a short pause switches at once",
                vec![
                    (round(0, 1.0, 1000, 1000, 40), Continue),
                    (round(1, 1.1, 40, 40, 15), Continue),
                    // 15 MB in 15 ms, 14 MB left: 14 ms, under 300/16 ms.
                    (round(2, 1.12, 15, 15, 14), Switchover),
                ],
            ),
            (
                "a plateau under the limit but above a short pause throttles a step",
                vec![
                    (round(0, 1.0, 1000, 1000, 40), Continue),
                    (round(1, 1.1, 40, 40, 30), Throttle(20)),
                    (round(2, 1.14, 30, 30, 10), Continue),
                    (round(3, 1.15, 10, 10, 3), Switchover),
                ],
            ),
            (
                "a hot set rewritten whole is throttled two steps at most for a shorter pause",
                vec![
                    (round(0, 1.0, 1000, 1000, 40), Continue),
                    (round(1, 1.1, 40, 40, 38), Throttle(20)),
                    (round(2, 1.15, 38, 38, 37), Throttle(30)),
                    (round(3, 1.2, 37, 37, 36), Switchover),
                ],
            ),
            (
                "a long pause of a guest throttled past the gentle steps: one step more, once",
                firm_throttle(vec![
                    // 19 MB at 100 MB/s: 190 ms, under the limit and
                    // shrinking fast.
                    (round(5, 13.0, 400, 40, 19), Continue),
                    // 150 ms, no longer shrinking fast, over a quarter of
                    // the limit: one step past the gentle ones.
                    (round(6, 13.2, 190, 19, 15), Throttle(50)),
                    (round(7, 13.35, 150, 15, 9), Continue),
                    // 120 ms and not shrinking fast: no second such step.
                    (round(8, 13.44, 90, 9, 12), Switchover),
                ]),
            ),
            (
                "a pause under a quarter of the limit at a firm throttle switches over",
                firm_throttle(vec![
                    (round(5, 13.0, 400, 40, 9), Continue),
                    // 70 ms, not shrinking fast: under a quarter of 300 ms.
                    (round(6, 13.1, 90, 9, 7), Switchover),
                ]),
            ),
            (
                "rounds under the limit that still shrink go on (unthrottled) to a short pause",
                vec![
                    // 1000 MB at 125 MB/s; 64 MB left: 512 ms, over the limit.
                    (round(0, 8.0, 8000, 1000, 64), Continue),
                    // 35 MB left is 280 ms: under the limit, but the round
                    // left 55% of what it sent, so another round.
                    (round(1, 8.5, 512, 64, 35), Continue),
                    (round(2, 8.8, 280, 35, 20), Continue),
                    (round(3, 9.0, 160, 20, 12), Continue),
                    // 75%: no longer shrinking fast, and 72 ms is more
                    // than a short pause: a step of the throttle.
                    (round(4, 9.1, 96, 12, 9), Throttle(20)),
                    (round(5, 9.2, 72, 9, 4), Continue),
                    (round(6, 9.24, 32, 4, 1), Continue),
                    (round(7, 9.25, 8, 1, 0), Switchover),
                ],
            ),
            (
                "the pause's own cost counts against the limit",
                vec![
                    (round(0, 8.0, 8000, 1000, 64), Continue),
                    // 36.9 MB at 125 MB/s is 295 ms, and the pause costs
                    // 10 ms more: 305 ms, over the limit.
                    (costing(round(1, 8.5, 320, 40, 37), 10), Continue),
                    // Under it now (288 + 3 ms), but no longer shrinking:
                    // a step of the throttle towards a short pause.
                    (costing(round(2, 8.8, 296, 37, 36), 3), Throttle(20)),
                ],
            ),
            (
                "no room in the completion budget for another round",
                vec![
                    (round(0, 59.0, 8000, 1000, 64), Continue),
                    (round(1, 59.6, 512, 64, 35), Switchover),
                ],
            ),
            (
                "a trickle switches over once only the pause's own cost is left",
                vec![
                    (round(0, 1.0, 1000, 1000, 40), Continue),
                    // 1 MB is 1 ms at 1 GB/s, under the floor; the pause
                    // costs 8 ms, which another round cannot shorten.
                    (costing(round(1, 1.04, 40, 40, 1), 8), Switchover),
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
