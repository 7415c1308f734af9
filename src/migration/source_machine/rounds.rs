//! The source's rounds and hand-off as a machine: the round on, the
//! convergence policy's verdict on each drained round, the round log and its
//! totals, and SWITCHOVER, READY, GO and COMPLETE checked in order. Time is
//! passed in; the pages, the guest's state and the digest stay with the
//! driver, which runs the guest as the verdicts say.

use crate::memory::PAGE_SIZE;
use crate::migration::policy::{Convergence, ConvergencePolicy, Decision, RoundStats};
use crate::migration::report::{round3, RoundLog};
use crate::migration::Violation;
use crate::migration::{LocalFault, MigrationError};
use crate::wire::{Message, RoundEnd, Switchover, VerifyMode};
use bytes::Bytes;
use std::time::{Duration, Instant};

/// Where the session stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// A pre-copy round is on, the guest running.
    Precopy,
    /// The last round is on, the guest paused.
    Final,
    /// SWITCHOVER is out; READY is awaited.
    AwaitReady,
    /// READY matched: GO may go out (or the guest stays, on a cancel).
    Ready,
    /// GO is out: the guest is the destination's from here on.
    AwaitComplete,
    /// COMPLETE came, or the session ended otherwise.
    Done,
}

/// What the rounds add up to, for the report.
#[derive(Debug, Clone, Default)]
pub struct RoundTotals {
    /// Rounds finished (pre-copy ones).
    pub rounds: u32,
    /// Bytes the guest dirtied during pre-copy rounds.
    pub dirty_bytes: u64,
    /// How long those rounds took.
    pub dirty_time: Duration,
    /// The highest throttle asked for, percent.
    pub throttle_max: u8,
    /// One entry per pre-copy round, at most [`ROUND_LOG_MAX`]: the first
    /// [`ROUND_LOG_FIRST`] and the latest.
    pub log: Vec<RoundLog>,
}

/// The most rounds a report lists: a migration that runs for hours (a
/// throttled guest) must not grow its report and record without end.
pub const ROUND_LOG_MAX: usize = 256;
/// The rounds a full log keeps from its start; the middle gives way.
pub const ROUND_LOG_FIRST: usize = 16;

impl RoundTotals {
    /// Logs a round, dropping the oldest past the first ones when full.
    fn log_round(&mut self, round: RoundLog) {
        if self.log.len() >= ROUND_LOG_MAX {
            self.log.remove(ROUND_LOG_FIRST);
        }
        self.log.push(round);
    }
}

/// The policy's verdict on a drained pre-copy round.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// Go on, throttle, or switch over (a give-up is an error instead).
    pub decision: Decision,
    /// The round as logged.
    pub log: RoundLog,
    /// The ROUND_END to send; `final_next` says the next round is the last.
    pub end: RoundEnd,
}

/// The source's rounds, from round 0 to COMPLETE.
#[derive(Debug, Clone)]
pub struct Rounds {
    conv: Convergence,
    start: Instant,
    round: u32,
    round_start: Instant,
    round_pages: u64,
    pause_cost: Duration,
    stage: Stage,
    digest: u64,
    go_sent: bool,
    totals: RoundTotals,
}

impl Rounds {
    /// Round 0 of a migration that starts at `now`.
    pub fn new(policy: ConvergencePolicy, now: Instant) -> Self {
        Self {
            conv: Convergence::new(policy),
            start: now,
            round: 0,
            round_start: now,
            round_pages: 0,
            pause_cost: Duration::ZERO,
            stage: Stage::Precopy,
            digest: 0,
            go_sent: false,
            totals: RoundTotals::default(),
        }
    }

    /// The round on (the final round's number once paused).
    pub fn round(&self) -> u32 {
        self.round
    }

    /// Where the session stands.
    pub fn stage(&self) -> Stage {
        self.stage
    }

    /// The policy and what it has measured (throughput, throttle).
    pub fn convergence(&self) -> &Convergence {
        &self.conv
    }

    /// What the rounds add up to.
    pub fn totals(&self) -> &RoundTotals {
        &self.totals
    }

    /// Whether GO went out: from then on the source never resumes the guest.
    pub fn go_sent(&self) -> bool {
        self.go_sent
    }

    /// What the pause would cost besides sending the dirty pages, as the
    /// driver measured it last (see [`RoundStats::pause_cost`]).
    pub fn set_pause_cost(&mut self, cost: Duration) {
        self.pause_cost = cost;
    }

    /// The round's `pages` are queued at `now`: its clock starts.
    pub fn begin_round(&mut self, now: Instant, pages: u64) {
        self.round_start = now;
        self.round_pages = pages;
    }

    /// The pre-copy round on is acknowledged at `now`, with `dirty_pages`
    /// written since its snapshot: the policy's verdict, and the next
    /// round (the last, paused, when it says switch over). A give-up ends
    /// the session with the guest on the source.
    pub fn round_drained(
        &mut self,
        now: Instant,
        dirty_pages: u64,
    ) -> Result<Verdict, MigrationError> {
        if self.stage != Stage::Precopy {
            return Err(MigrationError::Internal(LocalFault::OutOfStep {
                step: "a drained pre-copy round",
                stage: self.stage,
            }));
        }
        let duration = now.saturating_duration_since(self.round_start);
        let stats = RoundStats {
            round: self.round,
            elapsed: now.saturating_duration_since(self.start),
            duration,
            bytes_sent: self.round_pages * PAGE_SIZE as u64,
            dirty_bytes: dirty_pages * PAGE_SIZE as u64,
            pause_cost: self.pause_cost,
        };
        let decision = self.conv.decide(&stats);
        let t = &mut self.totals;
        t.rounds = self.round + 1;
        t.dirty_bytes += stats.dirty_bytes;
        t.dirty_time += duration;
        if let Decision::Throttle(p) = decision {
            t.throttle_max = t.throttle_max.max(p);
        }
        let log = RoundLog {
            round: self.round,
            pages: self.round_pages,
            ms: round3(duration.as_secs_f64() * 1e3),
            dirty_pages_after: dirty_pages,
            throttle_pct: self.conv.throttle_pct(),
        };
        t.log_round(log);
        if let Decision::GiveUp(g) = decision {
            self.stage = Stage::Done;
            return Err(MigrationError::NotConverging(g));
        }
        let end = RoundEnd {
            round: self.round,
            pages: self.round_pages,
            final_next: decision == Decision::Switchover,
        };
        self.round += 1;
        if end.final_next {
            self.stage = Stage::Final;
        }
        Ok(Verdict { decision, log, end })
    }

    /// The paused last round is acknowledged: the SWITCHOVER that carries
    /// the memory's `digest` and the guest's `state`.
    pub fn switchover(
        &mut self,
        digest: u64,
        verify: VerifyMode,
        state: Bytes,
        source_cpu_ms: u64,
    ) -> Result<Message, MigrationError> {
        if self.stage != Stage::Final {
            return Err(MigrationError::Internal(LocalFault::OutOfStep {
                step: "SWITCHOVER",
                stage: self.stage,
            }));
        }
        self.stage = Stage::AwaitReady;
        self.digest = digest;
        let t = &self.totals;
        Ok(Message::Switchover(Switchover {
            final_round: self.round,
            digest,
            verify,
            rounds: t.rounds,
            dirty_rate_bps: if t.dirty_time.is_zero() {
                0
            } else {
                (t.dirty_bytes as f64 / t.dirty_time.as_secs_f64()) as u64
            },
            throttle_pct_max: t.throttle_max,
            source_cpu_ms,
            state,
        }))
    }

    /// The reply to SWITCHOVER: READY with the same digest, or the session
    /// fails (the guest stays on the source).
    pub fn handle_ready(&mut self, reply: &Message) -> Result<(), MigrationError> {
        let verdict = match reply {
            _ if self.stage != Stage::AwaitReady => {
                Err(MigrationError::Internal(LocalFault::OutOfStep {
                    step: "a reply to SWITCHOVER",
                    stage: self.stage,
                }))
            }
            Message::Ready(r) if r.digest == self.digest => Ok(()),
            Message::Ready(r) => Err(MigrationError::DigestMismatch {
                source_digest: self.digest,
                destination_digest: r.digest,
            }),
            m => Err(unexpected("READY", m)),
        };
        self.stage = if verdict.is_ok() {
            Stage::Ready
        } else {
            Stage::Done
        };
        verdict
    }

    /// Commits: the GO to send. From here on the guest is the
    /// destination's, whatever happens.
    pub fn go(&mut self) -> Result<Message, MigrationError> {
        if self.stage != Stage::Ready {
            return Err(MigrationError::Internal(LocalFault::OutOfStep {
                step: "GO",
                stage: self.stage,
            }));
        }
        self.stage = Stage::AwaitComplete;
        self.go_sent = true;
        Ok(Message::Go)
    }

    /// The reply to GO: COMPLETE, with the destination's CPU time in ms.
    pub fn handle_complete(&mut self, reply: &Message) -> Result<u64, MigrationError> {
        if self.stage != Stage::AwaitComplete {
            return Err(MigrationError::Internal(LocalFault::OutOfStep {
                step: "a reply to GO",
                stage: self.stage,
            }));
        }
        match reply {
            Message::Complete(c) => {
                self.stage = Stage::Done;
                Ok(c.destination_cpu_ms)
            }
            m => Err(unexpected("COMPLETE", m)),
        }
    }
}

/// A reply other than the one the step waits for: the peer's violation.
pub fn unexpected(want: &'static str, got: &Message) -> MigrationError {
    Violation::Unexpected {
        want,
        got: got.command(),
    }
    .into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::policy::GiveUp;
    use crate::wire::{Complete, Ready};

    const MS: Duration = Duration::from_millis(1);

    fn policy() -> ConvergencePolicy {
        ConvergencePolicy {
            completion_timeout: Duration::from_secs(10),
            ..ConvergencePolicy::for_memory(1 << 30)
        }
    }

    /// Round 0 of `pages` pages, drained after `ms` with `dirty` pages left.
    fn first_round(pages: u64, ms: u64, dirty: u64) -> (Rounds, Instant, Verdict) {
        let t = Instant::now();
        let mut r = Rounds::new(policy(), t);
        r.begin_round(t, pages);
        let v = r.round_drained(t + MS * ms as u32, dirty).unwrap();
        (r, t, v)
    }

    #[test]
    fn the_round_log_keeps_the_first_and_the_latest_rounds() {
        let mut t = RoundTotals::default();
        for round in 0..1_000 {
            t.log_round(RoundLog {
                round,
                pages: 1,
                ms: 1.0,
                dirty_pages_after: 1,
                throttle_pct: 0,
            });
        }
        let rounds: Vec<u32> = t.log.iter().map(|l| l.round).collect();
        assert_eq!(rounds.len(), ROUND_LOG_MAX);
        assert_eq!(rounds[..ROUND_LOG_FIRST], (0..16).collect::<Vec<_>>()[..]);
        assert_eq!(rounds[ROUND_LOG_FIRST], 1_000 - 240);
        assert_eq!(rounds.last(), Some(&999));
    }

    #[test]
    fn a_converging_guest_switches_over_and_hands_off_in_order() {
        // 1 GiB in 1 s, 100 pages dirty: a pause of well under 300 ms.
        let (mut r, _, v) = first_round(262_144, 1_000, 100);
        assert_eq!(v.decision, Decision::Switchover);
        assert_eq!(
            v.end,
            RoundEnd {
                round: 0,
                pages: 262_144,
                final_next: true
            }
        );
        assert_eq!((r.stage(), r.round()), (Stage::Final, 1));
        assert_eq!(r.totals().rounds, 1);
        assert_eq!(r.totals().log[0].dirty_pages_after, 100);
        // Out of order: GO before READY is the driver's bug, not the peer's.
        assert!(matches!(r.go(), Err(MigrationError::Internal(_))));
        let Message::Switchover(s) = r.switchover(7, VerifyMode::Fast, Bytes::new(), 3).unwrap()
        else {
            panic!("not a SWITCHOVER")
        };
        assert_eq!((s.final_round, s.digest, s.rounds), (1, 7, 1));
        assert_eq!(s.dirty_rate_bps, 100 * 4096);
        r.handle_ready(&Message::Ready(Ready { digest: 7 }))
            .unwrap();
        assert!(!r.go_sent());
        assert_eq!(r.go().unwrap(), Message::Go);
        assert!(r.go_sent());
        let done = Message::Complete(Complete {
            destination_cpu_ms: 42,
            resumed: true,
        });
        assert!(r.handle_complete(&Message::Go).is_err());
        assert_eq!(r.handle_complete(&done).unwrap(), 42);
        assert_eq!(r.stage(), Stage::Done);
    }

    #[test]
    fn a_wrong_digest_or_another_reply_ends_it_before_go() {
        for (reply, mismatch) in [
            (Message::Ready(Ready { digest: 8 }), true),
            (Message::Go, false),
        ] {
            let (mut r, _, _) = first_round(262_144, 1_000, 0);
            r.switchover(7, VerifyMode::Full, Bytes::new(), 0).unwrap();
            let e = r.handle_ready(&reply).unwrap_err();
            assert_eq!(matches!(e, MigrationError::DigestMismatch { .. }), mismatch);
            assert_eq!(r.stage(), Stage::Done);
            assert!(r.go().is_err() && !r.go_sent());
        }
    }

    #[test]
    fn a_guest_outrunning_the_link_is_throttled_then_given_up_on() {
        // 4 MiB a second sent, 4 MiB dirtied meanwhile: never converging.
        let (mut r, t, v) = first_round(1_024, 1_000, 1_024);
        assert_eq!(v.decision, Decision::Continue);
        r.begin_round(t + MS * 1_000, 1_024);
        let v = r.round_drained(t + MS * 2_000, 1_024).unwrap();
        assert_eq!(v.decision, Decision::Continue, "one bad round is not two");
        r.begin_round(t + MS * 2_000, 1_024);
        let v = r.round_drained(t + MS * 3_000, 1_024).unwrap();
        assert_eq!(v.decision, Decision::Throttle(20));
        assert_eq!(v.log.throttle_pct, 20);
        assert_eq!(r.totals().throttle_max, 20);
        // Past the completion timeout: the guest stays on the source.
        r.begin_round(t + MS * 3_000, 1_024);
        let e = r.round_drained(t + MS * 11_000, 1_024).unwrap_err();
        assert!(matches!(
            e,
            MigrationError::NotConverging(GiveUp::CompletionTimeout(_))
        ));
        assert_eq!(r.stage(), Stage::Done);
        assert_eq!(r.totals().rounds, 4);
        assert_eq!(r.totals().log.len(), 4);
        assert!(r.round_drained(t + MS * 12_000, 0).is_err());
    }
}
