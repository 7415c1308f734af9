//! One destination session from its admission to its report: the tally,
//! the run, and the report it ends in.

use super::*;
use crate::codec::CodecId;
use crate::migration::dest_session::DestTallies;
use crate::migration::report::{round3, CpuMs, MemoryUse, Outcome, PageCounts, Report, Side};
use crate::migration::{MigratableGuest, MigrationError};
use crate::transport::accept::Admitted;
use crate::transport::progress::RunContext;
use crate::transport::{FrameReader, FrameWriter};
use crate::wire::{GuestKind, SessionLabel, VerifyMode};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

/// What the session controller counts.
#[derive(Default)]
pub(super) struct Tally {
    pub(super) session_id: u64,
    pub(super) memory_bytes: u64,
    pub(super) channels: u16,
    pub(super) codec: String,
    pub(super) max_bandwidth: Option<u64>,
    pub(super) setup: Option<Duration>,
    pub(super) downtime: Duration,
    pub(super) verify: VerifyMode,
    pub(super) verify_time: Duration,
    pub(super) verified: bool,
    pub(super) rounds: u32,
    pub(super) dirty_rate: u64,
    pub(super) throttle_max: u8,
    pub(super) source_cpu_ms: Option<f64>,
    pub(super) guest_kind: Option<GuestKind>,
    pub(super) counter_at_pause: Option<u64>,
    pub(super) resumed_at: Option<Instant>,
    pub(super) finished: Option<Duration>,
    pub(super) label: Option<SessionLabel>,
    pub(super) authenticated: bool,
    pub(super) frames_authenticated: bool,
    pub(super) failures: u32,
    pub(super) rebinds: u32,
    pub(super) delta: crate::migration::report::DeltaUse,
}

impl Tally {
    /// Takes the session machine's counts.
    pub(super) fn count(&mut self, t: DestTallies) {
        self.setup = t.setup;
        self.downtime = t.downtime;
        self.finished = t.finished;
        self.failures = t.failures;
        self.rebinds = t.rebinds;
    }

    /// The figures an admitted session starts with.
    pub(super) fn of(a: &Admitted) -> Self {
        let setup = &a.setup;
        Self {
            session_id: a.session_id,
            memory_bytes: setup.memory_bytes,
            channels: setup.channels,
            verify: setup.verify,
            guest_kind: Some(setup.guest_kind),
            max_bandwidth: (setup.max_bandwidth > 0).then_some(setup.max_bandwidth),
            codec: match CodecId::from_u8(setup.codec) {
                None if setup.codec == crate::codec::SETUP_CODEC_AUTO => "auto".into(),
                Some(CodecId::Zstd) => format!("zstd:{}", setup.codec_level),
                Some(CodecId::ZstdStream) => format!("zstd-stream:{}", setup.codec_level),
                Some(CodecId::Lz4) => "lz4".into(),
                _ => "none".into(),
            },
            // Kept only now that the session is proved and admitted.
            label: setup.label.clone(),
            delta: crate::migration::report::DeltaUse {
                base: setup.base.as_ref().map(|b| b.migration_id.clone()),
                ..Default::default()
            },
            authenticated: a.proved_key,
            ..Self::default()
        }
    }
}

pub(in crate::transport) struct Session {
    pub(super) config: ReceiverConfig,
    pub(super) ctx: RunContext,
    pub(super) sessions: Sessions,
    pub(super) rx_bytes: Arc<AtomicU64>,
    /// Channel 0's TLS keying material (empty when plain).
    pub(super) binding: Vec<u8>,
}

/// What a session leaves for its report.
pub(super) struct Ending {
    pub(super) slot: Option<crate::transport::accept::Slot>,
    pub(super) tally: Tally,
    pub(super) shared: Option<Arc<Shared>>,
    pub(super) guest: Option<Arc<dyn MigratableGuest>>,
    pub(super) result: Result<(), MigrationError>,
    pub(super) admitted: bool,
}

impl Session {
    pub(in crate::transport) fn new(
        config: ReceiverConfig,
        ctx: RunContext,
        sessions: Sessions,
        rx_bytes: Arc<AtomicU64>,
    ) -> Self {
        Self {
            config,
            ctx,
            sessions,
            rx_bytes,
            binding: Vec::new(),
        }
    }

    /// Runs an admitted session to its end.
    pub(in crate::transport) async fn run(
        mut self,
        at: Instant,
        peer: SocketAddr,
        reader: FrameReader,
        writer: FrameWriter,
        admitted: Admitted,
        binding: Vec<u8>,
    ) -> Incoming {
        self.binding = binding;
        let mut admitted = admitted;
        let slot = admitted.slot.take();
        let mut tally = Tally::of(&admitted);
        let mut shared: Option<Arc<Shared>> = None;
        let mut guest: Option<Arc<dyn MigratableGuest>> = None;
        let cancel = self.ctx.cancel.child_token();
        let tasks = TaskTracker::new();
        let result = self
            .drive(
                peer,
                reader,
                writer,
                admitted,
                &mut tally,
                &mut shared,
                &mut guest,
                (&cancel, &tasks),
                at,
            )
            .await;
        // The session's connections end with it.
        cancel.cancel();
        tasks.close();
        if tokio::time::timeout(CHANNELS_END_WAIT, tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(%peer, "a connection of the ended session is still stopping");
        }
        self.leave(tally.session_id, &result, shared.as_deref());
        match &result {
            Ok(()) => {
                tracing::info!(%peer, session = format!("{:016x}", tally.session_id), "incoming migration completed")
            }
            Err(e) => {
                tracing::warn!(%peer, error = %e, "incoming migration failed; copy discarded")
            }
        }
        let ending = Ending {
            slot,
            tally,
            shared,
            guest,
            result,
            admitted: true,
        };
        self.finish(at, ending).await
    }

    /// Takes the ended session out of the receiver's sessions, but keeps
    /// what a completed one left for a source that may send GO again (a
    /// bind to it is proved as before), and forgets records past their time.
    fn leave(&self, id: u64, result: &Result<(), MigrationError>, shared: Option<&Shared>) {
        let left = match (result, shared) {
            (Ok(()), Some(sh)) => sh.session().completed().cloned(),
            _ => None,
        };
        let mut map = self.sessions.lock().unwrap_or_else(PoisonError::into_inner);
        match (left, map.get_mut(&id)) {
            (Some(record), Some(entry)) => {
                entry.route = Route::Completed(Box::new(record), Default::default())
            }
            _ => drop(map.remove(&id)),
        }
        let now = Instant::now();
        map.retain(|_, e| !e.expired(now));
    }

    /// The report of a session whose proved peer was refused in its
    /// handshake; `admitted` names it when the admission had taken it.
    pub(in crate::transport) async fn refused(
        mut self,
        at: Instant,
        error: MigrationError,
        admitted: Option<(u64, Option<SessionLabel>)>,
        memory_bytes: u64,
        binding: Vec<u8>,
    ) -> Incoming {
        self.binding = binding;
        let (session_id, label) = admitted.clone().unwrap_or_default();
        let tally = Tally {
            session_id,
            label,
            memory_bytes,
            authenticated: self.config.key.is_some(),
            ..Tally::default()
        };
        let ending = Ending {
            slot: None,
            tally,
            shared: None,
            guest: None,
            result: Err(error),
            admitted: admitted.is_some(),
        };
        self.finish(at, ending).await
    }

    pub(super) async fn finish(self, at: Instant, ending: Ending) -> Incoming {
        let Ending {
            slot,
            tally,
            shared,
            mut guest,
            result,
            admitted,
        } = ending;
        let total = tally.finished.unwrap_or_else(|| at.elapsed());
        let (outcome, error) = match &result {
            Ok(()) => (Outcome::Completed, None),
            Err(MigrationError::Cancelled) => (
                Outcome::Cancelled,
                Some(MigrationError::Cancelled.to_string()),
            ),
            Err(MigrationError::RemoteAbort {
                code: crate::wire::AbortCode::Cancelled,
                message,
            }) => (
                Outcome::Cancelled,
                Some(format!(
                    "source cancelled: {}",
                    crate::wire::escape_text(message)
                )),
            ),
            Err(e) => (Outcome::Failed, Some(e.to_string())),
        };
        if outcome != Outcome::Completed {
            // Discard the copy: it must never run.
            guest = None;
        }
        let mut counter_after_resume = None;
        if let (Some(g), Some(at), Some(wait)) =
            (&guest, tally.resumed_at, self.config.resume_check)
        {
            // Show the guest runs on here: its counter, a while after GO.
            tokio::time::sleep_until((at + wait).into()).await;
            counter_after_resume = Some(g.progress_counter());
        }
        let pages = shared
            .as_ref()
            .map_or(PageCounts::default(), |sh| sh.counts.snapshot());
        let mut report = Report {
            side: Side::Destination,
            outcome,
            error,
            guest_location: String::new(),
            verified: tally.verified,
            verify: tally.verify,
            verify_ms: round3(tally.verify_time.as_secs_f64() * 1e3),
            memory_bytes: tally.memory_bytes,
            pages,
            rounds: tally.rounds,
            total_ms: round3(total.as_secs_f64() * 1e3),
            setup_ms: round3(tally.setup.unwrap_or_default().as_secs_f64() * 1e3),
            downtime_ms: round3(tally.downtime.as_secs_f64() * 1e3),
            guest_bytes_sent: 0,
            wire_bytes: self.rx_bytes.load(Ordering::Relaxed),
            compression_ratio: 0.0,
            throughput_guest_bps: 0.0,
            throughput_wire_bps: 0.0,
            dirty_rate_bps: tally.dirty_rate as f64,
            throttle_pct_max: tally.throttle_max,
            channels: tally.channels,
            codec: tally.codec.clone(),
            max_bandwidth_bps: tally.max_bandwidth,
            cpu_ms: CpuMs {
                source: tally.source_cpu_ms,
                destination: Some(round3(self.ctx.cpu.total().as_secs_f64() * 1e3)),
            },
            guest: tally.guest_kind.unwrap_or(GuestKind::Sim),
            guest_counter_at_pause: tally.counter_at_pause,
            guest_counter_after_resume: counter_after_resume,
            session_id: format!("{:016x}", tally.session_id),
            authenticated: tally.authenticated,
            encrypted: !self.binding.is_empty(),
            frames_authenticated: !self.binding.is_empty() || tally.frames_authenticated,
            channel_failures: tally.failures,
            batches_resent: 0,
            channel_rebinds: tally.rebinds,
            saved_to: None,
            round_log: Vec::new(),
            memory_use: MemoryUse::measure(shared.as_ref().map(|s| &*s.memory)),
            guests_here: None,
            delta: tally.delta.clone(),
        };
        report.finish_derived();
        // The hashes of what arrived, for a failback's base.
        let hashes = guest
            .as_ref()
            .and(shared.as_ref())
            .map(|s| Arc::from(s.hashes.to_vec()));
        Incoming {
            report,
            guest,
            hashes,
            memory: shared.map(|s| s.memory.clone()),
            label: tally.label,
            session_id: tally.session_id,
            admitted,
            slot,
        }
    }
}
