//! Live progress of a migration, for progress bars and (later) the agent API.

use super::RoundLog;
use crate::cpu::CpuMeter;
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;

/// Where a migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
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
}

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
}
