//! A migration's entry on its node, and the views of it the API serves:
//! its live progress, its report, how an unresolved one was settled.

use super::*;

/// Live figures of a running migration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProgressView {
    /// The phase.
    pub phase: Phase,
    /// The pre-copy round.
    pub round: u32,
    /// Guest bytes still to send in this round and the dirty ones after it.
    pub bytes_left: u64,
    /// Guest bytes per second.
    pub throughput_bps: f64,
    /// Wire bytes per second since the start.
    pub wire_bps: f64,
    /// Wire bytes so far.
    pub wire_bytes: u64,
    /// The pause if the guest stopped now, ms.
    pub expected_downtime_ms: Option<f64>,
    /// Seconds to the end at the current rate; never later than the last
    /// estimate's end unless that end has passed.
    pub eta_s: Option<f64>,
    /// Auto-converge throttle, percent.
    pub throttle_pct: u8,
    /// What the guest dirtied in the last round, per second, bytes/s.
    #[serde(default)]
    pub dirty_rate_bps: f64,
    /// The pause it aims under, ms (what `expected_downtime_ms` is held
    /// against).
    #[serde(default)]
    pub downtime_limit_ms: f64,
}

/// A migration as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrationView {
    /// Its id (the source node's).
    pub id: String,
    /// The VM.
    pub vm: String,
    /// The source node.
    pub source: String,
    /// The target node.
    pub target: String,
    /// Seen from this node.
    pub direction: Direction,
    /// Where it is.
    pub state: MigrationState,
    /// While running: the engine's phase.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// When it was asked for, ms since the Unix epoch.
    pub created_at_ms: u64,
    /// When it started moving memory, ms since the Unix epoch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at_ms: Option<u64>,
    /// When it ended, ms since the Unix epoch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at_ms: Option<u64>,
    /// Seconds it waited in the queue.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queued_s: Option<f64>,
    /// The operation (drain, resume, update) that started it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operation: Option<String>,
    /// Why it failed, once finished.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Live figures (`GET /v1/migrations/{id}` while it runs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<ProgressView>,
    /// The engine's report, once finished.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub report: Option<Report>,
    /// How an unresolved migration was settled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resolution: Option<Resolution>,
    /// An unresolved migration's paused guest, saved on this node's disk
    /// so the agent holds it across restarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saved_guest: Option<String>,
}

pub(in crate::agent) struct MigrationEntry {
    pub(in crate::agent) id: String,
    pub(super) vm: String,
    pub(super) source: String,
    pub(super) target: String,
    pub(in crate::agent) direction: Direction,
    pub(in crate::agent) state: MigrationState,
    pub(super) created_at_ms: u64,
    pub(super) started_at_ms: Option<u64>,
    pub(in crate::agent) finished_at_ms: Option<u64>,
    pub(super) created: Instant,
    pub(super) started: Option<Instant>,
    pub(super) operation: Option<String>,
    pub(super) config: MigrationConfig,
    pub(in crate::agent) ctx: RunContext,
    pub(super) report: Option<Report>,
    pub(in crate::agent) error: Option<String>,
    /// The end the last ETA promised.
    pub(super) eta_end: Option<Instant>,
    pub(super) resolution: Option<Resolution>,
    /// Incoming: the receiving session's id, the key of its record here.
    pub(super) session: Option<u64>,
}

/// How an operator settled an unresolved migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resolution {
    /// Where the VM runs now: `source` or `destination`.
    pub run_on: String,
    /// What the check of the other node found.
    pub checked: String,
    /// Whether the operator overrode a check that could not be made.
    pub forced: bool,
    /// When, ms since the Unix epoch.
    pub at_ms: u64,
}

impl MigrationEntry {
    pub(in crate::agent) fn view(&mut self, with_progress: bool) -> MigrationView {
        let progress = (with_progress
            && self.state == MigrationState::Running
            && self.direction == Direction::Outgoing)
            .then(|| self.progress());
        MigrationView {
            id: self.id.clone(),
            vm: self.vm.clone(),
            source: self.source.clone(),
            target: self.target.clone(),
            direction: self.direction,
            state: self.state,
            phase: (self.state == MigrationState::Running)
                .then(|| self.ctx.progress.snapshot().phase),
            created_at_ms: self.created_at_ms,
            started_at_ms: self.started_at_ms,
            finished_at_ms: self.finished_at_ms,
            queued_s: self
                .started
                .map(|s| s.duration_since(self.created).as_secs_f64()),
            operation: self.operation.clone(),
            error: self.error.clone(),
            progress,
            report: self.report.clone(),
            resolution: self.resolution.clone(),
            saved_guest: None,
        }
    }

    /// An unresolved outgoing migration read back after a restart, so that
    /// `resolve` settles it as before.
    pub(in crate::agent) fn restored(view: &MigrationView) -> Self {
        Self {
            id: view.id.clone(),
            vm: view.vm.clone(),
            source: view.source.clone(),
            target: view.target.clone(),
            direction: view.direction,
            state: view.state,
            created_at_ms: view.created_at_ms,
            started_at_ms: view.started_at_ms,
            finished_at_ms: view.finished_at_ms,
            created: Instant::now(),
            started: None,
            operation: view.operation.clone(),
            config: MigrationConfig::default(),
            ctx: RunContext::default(),
            report: view.report.clone(),
            error: view.error.clone(),
            eta_end: None,
            resolution: view.resolution.clone(),
            session: None,
        }
    }

    /// The VM it moves.
    pub(in crate::agent) fn vm(&self) -> &str {
        &self.vm
    }

    /// Where it moves the VM.
    pub(in crate::agent) fn target(&self) -> &str {
        &self.target
    }

    pub(in crate::agent) fn progress(&mut self) -> ProgressView {
        let s = self.ctx.progress.snapshot();
        let left_pages = s.round_pages.saturating_sub(s.round_pages_done) + s.dirty_pages;
        let bytes_left = left_pages * crate::memory::PAGE_SIZE as u64;
        let elapsed = self.started.map_or(0.0, |t| t.elapsed().as_secs_f64());
        let wire_bps = if elapsed > 0.0 {
            s.wire_bytes as f64 / elapsed
        } else {
            0.0
        };
        let now = Instant::now();
        // The engine measures throughput at the end of each round; during the
        // first, the pages acknowledged so far tell.
        let acked = self.ctx.progress.pages_acked.load(Ordering::Relaxed) as f64
            * crate::memory::PAGE_SIZE as f64;
        let rate = if s.throughput_bps > 0.0 {
            s.throughput_bps
        } else if elapsed > 0.0 {
            acked / elapsed
        } else {
            0.0
        };
        let estimate =
            (rate > 0.0).then(|| std::time::Duration::from_secs_f64(bytes_left as f64 / rate));
        // The ETA counts down: a new estimate may bring the end closer, but
        // moves it later only once the promised end has passed.
        let end = match (estimate, self.eta_end) {
            (Some(e), Some(prev)) if prev > now => Some(prev.min(now + e)),
            (Some(e), _) => Some(now + e),
            (None, prev) => prev.filter(|p| *p > now),
        };
        self.eta_end = end;
        ProgressView {
            phase: s.phase,
            round: s.round,
            bytes_left,
            throughput_bps: rate,
            wire_bps,
            wire_bytes: s.wire_bytes,
            expected_downtime_ms: s.expected_downtime_ms,
            eta_s: end.map(|e| e.saturating_duration_since(now).as_secs_f64()),
            throttle_pct: s.throttle_pct,
            dirty_rate_bps: s.dirty_rate_bps.round(),
            downtime_limit_ms: self.config.downtime_limit.as_secs_f64() * 1000.0,
        }
    }
}
