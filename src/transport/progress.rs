//! Live progress of a migration, for progress bars and (later) the agent API.

use crate::cpu::CpuMeter;
use crate::migration::RoundLog;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;

/// Where a migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Connecting and binding channels.
    #[default]
    Setup,
    /// Pre-copy rounds, guest running.
    Precopy,
    /// Guest paused: the last pages, the state, the digest.
    Switchover,
    /// READY/GO exchanged; waiting for the destination to take over.
    Handoff,
    /// Finished (any outcome).
    Done,
}

/// A point-in-time view of a migration.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ProgressSnapshot {
    /// The phase.
    pub phase: Phase,
    /// The round in progress.
    pub round: u32,
    /// Pages the current round sends.
    pub round_pages: u64,
    /// Pages of the current round acknowledged so far.
    pub round_pages_done: u64,
    /// Pages dirty at the end of the last round (what the next round sends).
    pub dirty_pages: u64,
    /// Measured guest throughput, bytes/s.
    pub throughput_bps: f64,
    /// What the guest dirtied during the last round (distinct pages), per
    /// second of it, bytes/s.
    pub dirty_rate_bps: f64,
    /// Expected pause if the guest stopped now, ms.
    pub expected_downtime_ms: Option<f64>,
    /// Auto-converge throttle in force, percent.
    pub throttle_pct: u8,
    /// Bytes written to the wire so far.
    pub wire_bytes: u64,
    /// Pages sent with the guest paused, once the switchover started.
    pub final_pages: Option<u64>,
}

/// Shared between a migration and its observers.
#[derive(Debug, Default)]
pub struct Progress {
    snap: Mutex<ProgressSnapshot>,
    rounds: Mutex<Vec<RoundLog>>,
    round_base: AtomicU64,
    /// Pages acknowledged by the destination, all rounds.
    pub pages_acked: AtomicU64,
    /// Bytes on the wire, source to destination.
    pub wire_bytes: Arc<AtomicU64>,
    /// Whether a cancel still keeps the guest on the source: [`OPEN`], a
    /// cancel asked ([`CANCELLING`]), or GO about to go out ([`COMMITTED`]).
    /// The first of a cancel and a commit wins.
    gate: AtomicU8,
}

const OPEN: u8 = 0;
const CANCELLING: u8 = 1;
const COMMITTED: u8 = 2;

impl Progress {
    /// A fresh progress record.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The current view.
    pub fn snapshot(&self) -> ProgressSnapshot {
        let mut s = self.snap.lock().unwrap().clone();
        let acked = self.pages_acked.load(Ordering::Relaxed);
        s.round_pages_done = acked
            .saturating_sub(self.round_base.load(Ordering::Relaxed))
            .min(s.round_pages);
        s.wire_bytes = self.wire_bytes.load(Ordering::Relaxed);
        s
    }

    /// The pre-copy rounds finished so far, in order.
    pub fn completed_rounds(&self) -> Vec<RoundLog> {
        self.rounds.lock().unwrap().clone()
    }

    pub(crate) fn round_done(&self, log: RoundLog) {
        self.rounds.lock().unwrap().push(log);
    }

    pub(crate) fn update(&self, f: impl FnOnce(&mut ProgressSnapshot)) {
        f(&mut self.snap.lock().unwrap());
    }

    /// The source is about to send GO: `true` when no cancel came first (from
    /// then on cancels are refused and the hand-off finishes), `false` when
    /// one did.
    pub(crate) fn commit(&self) -> bool {
        match self
            .gate
            .compare_exchange(OPEN, COMMITTED, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => true,
            Err(now) => now == COMMITTED,
        }
    }

    /// Whether GO has gone out (or is going): the guest will run on the
    /// destination and the migration can no longer be cancelled.
    pub fn committed(&self) -> bool {
        self.gate.load(Ordering::Acquire) == COMMITTED
    }

    pub(crate) fn start_round(&self, phase: Phase, round: u32, pages: u64) {
        self.round_base
            .store(self.pages_acked.load(Ordering::Relaxed), Ordering::Relaxed);
        self.update(|s| {
            s.phase = phase;
            s.round = round;
            s.round_pages = pages;
            if phase == Phase::Switchover {
                s.final_pages = Some(pages);
            }
        });
    }
}

/// What a running migration side is given by its caller: where to publish
/// progress, how to be cancelled, and which threads' CPU time is its own.
#[derive(Debug, Clone, Default)]
pub struct RunContext {
    /// Published progress.
    pub progress: Arc<Progress>,
    /// Cancels the migration (the guest stays on the source).
    pub cancel: CancellationToken,
    /// CPU time of this side's threads.
    pub cpu: CpuMeter,
    /// A bandwidth cap shared with other migrations (a node's), on top of the
    /// migration's own.
    pub shared_bucket: Option<Arc<crate::transport::TokenBucket>>,
    /// A source's TLS 1.3 on every channel. Default: none (plain,
    /// CRC-checked frames). A receiver's is in its [`super::ReceiverConfig`].
    pub tls: Option<super::tls::TlsClient>,
}

impl RunContext {
    /// Asks the migration to stop with its guest on the source. `true`: it
    /// will (or has). `false`: GO has gone out, so the hand-off finishes and
    /// the guest runs on the destination; nothing is cancelled. (Cancelling
    /// `cancel` directly after GO is ignored the same way.)
    pub fn request_cancel(&self) -> bool {
        let gate = &self.progress.gate;
        match gate.compare_exchange(OPEN, CANCELLING, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) | Err(CANCELLING) => {
                self.cancel.cancel();
                true
            }
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_of_a_cancel_and_go_wins() {
        let ctx = RunContext::default();
        assert!(ctx.request_cancel());
        assert!(ctx.cancel.is_cancelled());
        assert!(!ctx.progress.commit(), "GO after a cancel does not go out");
        assert!(ctx.request_cancel(), "a second cancel is still a cancel");

        let ctx = RunContext::default();
        assert!(ctx.progress.commit());
        assert!(ctx.progress.committed());
        assert!(!ctx.request_cancel(), "no cancel after GO");
        assert!(!ctx.cancel.is_cancelled());
        assert!(ctx.progress.commit(), "committing twice is harmless");
    }
}
