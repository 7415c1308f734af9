//! The source driver: connects the channels, runs the pre-copy rounds, switches
//! over and hands the guest off.
//!
//! The session's protocol (credits, batches in flight, resends, control
//! messages, keepalives) lives in [`SourceMachine`]; the tasks in
//! [`channels`] move bytes and feed it. Jobs come from one shared queue, so a
//! channel that is free takes the next batch: every channel stays busy. A
//! round ends when every one of its batches is acknowledged, which also orders
//! rounds: no page of round `r + 1` can be applied before its round-`r` copy.

mod channels;
mod connect;
mod encode;
mod rounds;

use super::progress::{Phase, RunContext};
use crate::codec::{AutoChooser, SocketRate};
use crate::digest::PageHashes;
use crate::memory::DirtySnapshot;
use crate::migration::credits::Credits;
use crate::migration::report::{
    round3, CpuMs, MemoryUse, Outcome, PageCounter, PageCounts, Report, Side,
};
use crate::migration::sent::SentIndex;
use crate::migration::similar::AnchorIndex;
use crate::migration::source_machine::{RoundTotals, SourceEvent, SourceMachine};
use crate::migration::Violation;
use crate::migration::{MigratableGuest, MigrationConfig, MigrationError};
use crate::wire::ChannelId;
use crate::wire::{Abort, Message};
use channels::Shared;
use encode::Encoder;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the driver counts besides the shared counters.
#[derive(Debug, Default)]
struct Tally {
    session_id: u64,
    setup: Duration,
    /// A round trip to the destination: the quickest handshake exchange.
    rtt: Duration,
    totals: RoundTotals,
    downtime: Duration,
    verify: Duration,
    verified: bool,
    destination_cpu_ms: Option<f64>,
    go_sent: bool,
    paused: bool,
    counter_at_pause: Option<u64>,
    authenticated: bool,
    frames_authenticated: bool,
    channel_failures: u32,
    batches_resent: u64,
    channel_rebinds: u32,
    delta: crate::migration::report::DeltaUse,
    /// The key of dense pages' references, when the destination takes them.
    refs_key: Option<[u8; 32]>,
    /// Whether the destination takes patches (with `refs_key`).
    patches: bool,
    /// Whether the destination decodes kept streams (`auto` may use one).
    kept_stream: bool,
}

struct Driver {
    sh: Arc<Shared>,
    batch_pages: u32,
    deadline: Instant,
    timeout: Duration,
    handoff: Duration,
}

impl Driver {
    /// Splits a dirty set into batch jobs and queues them. Returns the pages.
    fn enqueue(&mut self, snap: &DirtySnapshot, round: u32) -> u64 {
        let n = self
            .sh
            .m
            .lock()
            .unwrap()
            .enqueue(snap, round, self.batch_pages);
        self.sh.wake_writers();
        n
    }

    /// Waits until `check` answers, `until` passes (`None`), or, when
    /// `cancellable`, an operator cancels.
    async fn wait_for<T>(
        &self,
        until: Instant,
        cancellable: bool,
        mut check: impl FnMut(&mut SourceMachine) -> Option<T>,
    ) -> Result<Option<T>, MigrationError> {
        loop {
            let changed = self.sh.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(t) = check(&mut self.sh.m.lock().unwrap()) {
                return Ok(Some(t));
            }
            tokio::select! {
                biased;
                _ = self.sh.ctx.cancel.cancelled(), if cancellable => return Err(MigrationError::Cancelled),
                _ = &mut changed => {}
                _ = tokio::time::sleep_until(until.into()) => return Ok(None),
            }
        }
    }

    /// Sends a control message and waits until it is written.
    async fn send_control(&self, msg: Message) -> Result<(), MigrationError> {
        let id = self.sh.queue_control(msg);
        let far = Instant::now() + Duration::from_secs(30 * 86_400);
        let written = self
            .wait_for(far, false, |m| {
                if m.control_written(id) {
                    Some(Ok(()))
                } else if m.gave_up() {
                    Some(Err(m.lost_error()))
                } else {
                    m.take_failure().map(Err)
                }
            })
            .await?;
        written.unwrap_or(Err(MigrationError::Internal(
            crate::migration::LocalFault::Unreachable(
                "a control message's wait passed its far deadline",
            ),
        )))
    }

    fn event_error(ev: SourceEvent) -> MigrationError {
        match ev {
            SourceEvent::Failed(e) => e,
            SourceEvent::Reply(Message::Abort(a)) => MigrationError::RemoteAbort {
                code: a.code,
                message: a.message,
            },
            SourceEvent::Reply(m) => Violation::Unexpected {
                want: "no reply before the hand-off",
                got: m.command(),
            }
            .into(),
        }
    }

    /// A peer that aborts closes its channels right after: when a channel
    /// closes, look briefly for the abort that explains it.
    async fn explain(&self, ev: SourceEvent) -> MigrationError {
        if let SourceEvent::Failed(MigrationError::PeerClosed { .. }) = &ev {
            let until = Instant::now() + Duration::from_millis(250);
            let abort = self.wait_for(until, false, |m| {
                while let Some(e) = m.poll_event() {
                    if let SourceEvent::Reply(Message::Abort(a)) = e {
                        return Some(a);
                    }
                }
                None
            });
            if let Ok(Some(a)) = abort.await {
                return MigrationError::RemoteAbort {
                    code: a.code,
                    message: a.message,
                };
            }
        }
        Self::event_error(ev)
    }

    /// Waits until every queued batch is acknowledged.
    async fn drain(&mut self, deadline: Option<Instant>) -> Result<(), MigrationError> {
        let until = deadline.unwrap_or(self.deadline);
        let got = self
            .wait_for(until, true, |m| match m.poll_event() {
                Some(ev) => Some(Err(ev)),
                None => m.all_acked().then_some(Ok(())),
            })
            .await?;
        match got {
            Some(Ok(())) => Ok(()),
            Some(Err(ev)) => Err(self.explain(ev).await),
            None => Err(match deadline {
                None => MigrationError::NotConverging(
                    crate::migration::policy::GiveUp::CompletionTimeout(self.timeout),
                ),
                Some(_) => MigrationError::Timeout {
                    what: "the final pages to be applied",
                    after: self.handoff,
                },
            }),
        }
    }

    /// Waits for a hand-off reply; an operator's cancel ends the wait.
    async fn reply(
        &mut self,
        what: &'static str,
        timeout: Duration,
    ) -> Result<Message, MigrationError> {
        self.await_reply(what, timeout, true).await
    }

    /// Waits for the answer to GO: no cancel ends this wait (the guest is
    /// the destination's from GO on), only the answer or the timeout.
    async fn reply_committed(
        &mut self,
        what: &'static str,
        timeout: Duration,
    ) -> Result<Message, MigrationError> {
        self.await_reply(what, timeout, false).await
    }

    async fn await_reply(
        &mut self,
        what: &'static str,
        timeout: Duration,
        cancellable: bool,
    ) -> Result<Message, MigrationError> {
        let until = Instant::now() + timeout;
        loop {
            let ev = self
                .wait_for(until, cancellable, |m| m.poll_event())
                .await?;
            return match ev {
                None => Err(MigrationError::Timeout {
                    what,
                    after: timeout,
                }),
                Some(SourceEvent::Reply(Message::Abort(a))) => Err(MigrationError::RemoteAbort {
                    code: a.code,
                    message: a.message,
                }),
                // A second READY: the answer to a SWITCHOVER sent again after
                // its channel failed, when the first answer got through too.
                Some(SourceEvent::Reply(Message::Ready(_))) if what != "READY" => continue,
                Some(SourceEvent::Reply(m)) => Ok(m),
                Some(ev) => Err(self.explain(ev).await),
            };
        }
    }
}

/// Migrates `guest` to the receiver at `target` (host:port). Always returns a
/// report; on any failure before GO the guest runs on the source again.
pub async fn migrate(
    guest: Arc<dyn MigratableGuest>,
    target: &str,
    config: &MigrationConfig,
    ctx: &RunContext,
) -> Report {
    let start = Instant::now();
    let mut tally = Tally::default();
    let counts = Arc::new(Mutex::new(PageCounts::default()));
    let result = match config.validate() {
        Err(e) => Err(e.into()),
        Ok(()) => {
            run(
                guest.clone(),
                target,
                config,
                ctx,
                start,
                &mut tally,
                &counts,
            )
            .await
        }
    };
    let total = start.elapsed();
    let (outcome, error) = settle(&*guest, ctx, &tally, &result);
    ctx.progress.update(|s| s.phase = Phase::Done);
    let mut report = Report {
        side: Side::Source,
        outcome,
        error,
        guest_location: String::new(),
        verified: tally.verified,
        verify: config.verify,
        verify_ms: round3(tally.verify.as_secs_f64() * 1e3),
        memory_bytes: guest.memory().len_bytes(),
        pages: *counts.lock().unwrap(),
        rounds: tally.totals.rounds,
        total_ms: round3(total.as_secs_f64() * 1e3),
        setup_ms: round3(tally.setup.as_secs_f64() * 1e3),
        downtime_ms: round3(tally.downtime.as_secs_f64() * 1e3),
        guest_bytes_sent: 0,
        wire_bytes: ctx.progress.wire_bytes.load(Ordering::Relaxed),
        compression_ratio: 0.0,
        throughput_guest_bps: 0.0,
        throughput_wire_bps: 0.0,
        dirty_rate_bps: if tally.totals.dirty_time.is_zero() {
            0.0
        } else {
            (tally.totals.dirty_bytes as f64 / tally.totals.dirty_time.as_secs_f64()).round()
        },
        throttle_pct_max: tally.totals.throttle_max,
        channels: config.channels,
        codec: config.codec.to_string(),
        max_bandwidth_bps: config.max_bandwidth,
        cpu_ms: CpuMs {
            source: Some(round3(ctx.cpu.total().as_secs_f64() * 1e3)),
            destination: tally.destination_cpu_ms,
        },
        guest: guest.kind(),
        guest_counter_at_pause: tally.counter_at_pause,
        guest_counter_after_resume: None,
        session_id: format!("{:016x}", tally.session_id),
        authenticated: tally.authenticated,
        encrypted: ctx.tls.is_some(),
        frames_authenticated: ctx.tls.is_some() || tally.frames_authenticated,
        channel_failures: tally.channel_failures,
        batches_resent: tally.batches_resent,
        channel_rebinds: tally.channel_rebinds,
        saved_to: None,
        round_log: std::mem::take(&mut tally.totals.log),
        memory_use: MemoryUse::measure(Some(guest.memory())),
        guests_here: None,
        delta: std::mem::take(&mut tally.delta),
    };
    report.finish_derived();
    report
}
/// The outcome of a migration that ended with `result`, and its error
/// text; before GO the guest runs here again, unthrottled.
fn settle(
    guest: &dyn MigratableGuest,
    ctx: &RunContext,
    tally: &Tally,
    result: &Result<(), MigrationError>,
) -> (Outcome, Option<String>) {
    let (outcome, error) = match result {
        Ok(()) => (Outcome::Completed, None),
        Err(e) => {
            let outcome = if tally.go_sent {
                Outcome::Unresolved
            } else if matches!(e, MigrationError::Cancelled) || ctx.cancel.is_cancelled() {
                // A cancel may surface first as its consequence (the peer
                // closing a channel mid-write): it is still a cancel.
                Outcome::Cancelled
            } else {
                Outcome::Failed
            };
            let error = if outcome == Outcome::Cancelled {
                MigrationError::Cancelled.to_string()
            } else {
                e.to_string()
            };
            (outcome, Some(error))
        }
    };
    if outcome != Outcome::Completed && outcome != Outcome::Unresolved {
        // Nothing was handed over: the guest runs here, unthrottled.
        guest.set_throttle(0);
        if tally.paused {
            guest.resume();
        }
    }
    if let Err(e) = result {
        tracing::warn!(error = %e, ?outcome, "migration did not complete");
    }
    (outcome, error)
}

async fn run(
    guest: Arc<dyn MigratableGuest>,
    target: &str,
    config: &MigrationConfig,
    ctx: &RunContext,
    start: Instant,
    tally: &mut Tally,
    counts_out: &Arc<Mutex<PageCounts>>,
) -> Result<(), MigrationError> {
    let memory_bytes = guest.memory().len_bytes();
    ctx.progress.start_round(Phase::Setup, 0, 0);
    let (connector, bound) = connect::open_session(&*guest, target, config, ctx, tally).await?;
    tally.setup = start.elapsed();
    let credits = (0u16..)
        .map(ChannelId)
        .zip(&bound)
        .map(|(channel, b)| {
            Credits::new(b.2).ok_or(Violation::Credits {
                channel: Some(channel),
                credits: b.2,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let machine = SourceMachine::new(
        tally.session_id,
        &credits,
        config.peer_timeout,
        Instant::now(),
    );
    let sh = Shared::start(
        machine,
        bound,
        Arc::new(encoder(&guest, config, ctx, tally)),
        connector,
        ctx,
    );
    // The channels outlive an operator's cancel long enough to carry the
    // ABORT that tells the destination to discard its copy: the driver
    // watches `ctx.cancel`, and this ends the tasks when it returns.
    let _stop_tasks = sh.cancel.clone().drop_guard();
    let policy = config.policy(memory_bytes);
    let mut driver = Driver {
        sh: sh.clone(),
        batch_pages: config.batch_pages(),
        // Far future rather than overflow (the range check bounds it anyway).
        deadline: start
            .checked_add(policy.completion_timeout)
            .unwrap_or(start + Duration::from_secs(30 * 86_400)),
        timeout: policy.completion_timeout,
        handoff: config.handoff_timeout,
    };
    let result = rounds::precopy_and_handoff(&mut driver, config, ctx, start, tally, policy).await;
    *counts_out.lock().unwrap() = sh.encoder.counts.snapshot();
    let t = sh.m.lock().unwrap().tallies();
    tally.channel_failures = t.failures;
    tally.batches_resent = t.resent;
    tally.channel_rebinds = t.rebinds;
    if let Err(e) = &result {
        if !tally.go_sent && !matches!(e, MigrationError::RemoteAbort { .. }) {
            // Tell the destination to discard its copy; best effort.
            let abort = Message::Abort(Abort {
                code: e.abort_code(),
                message: e.to_string(),
            });
            let _ = tokio::time::timeout(Duration::from_secs(1), driver.send_control(abort)).await;
        }
    }
    sh.m.lock().unwrap().close();
    sh.cancel.cancel();
    sh.tasks.close();
    for i in 0..sh.channels() {
        if let Ok(mut w) = sh.chan(ChannelId(i)).writer.try_lock() {
            w.shutdown().await;
        }
    }
    result
}

/// The batch encoder for this migration's guest and codec.
fn encoder(
    guest: &Arc<dyn MigratableGuest>,
    config: &MigrationConfig,
    ctx: &RunContext,
    tally: &Tally,
) -> Encoder {
    // The chooser leaves the receiving side its share of the cores.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut chooser = AutoChooser::new(cores)
        .with_stream(tally.kept_stream)
        .with_workers(config.channels.into());
    // A cap shared with other migrations is set per batch, as its share.
    if let Some(cap) = config.max_bandwidth {
        chooser.set_link_rate(cap as f64);
    }
    Encoder {
        guest: guest.clone(),
        hashes: PageHashes::new(guest.memory().pages()),
        codec: config.codec,
        chooser: Mutex::new(chooser),
        capped: config.max_bandwidth.is_some() || ctx.shared_bucket.is_some(),
        socket_bps: Mutex::new(SocketRate::default()),
        counts: PageCounter::default(),
        sent: tally
            .refs_key
            .map(|key| (SentIndex::new(guest.memory().pages()), key)),
        similar: (tally.refs_key.is_some() && tally.patches)
            .then(|| AnchorIndex::new(guest.memory().pages())),
        id: encode::new_encoder_id(),
        shared: ctx
            .shared_bucket
            .as_ref()
            .map(|b| (config.max_bandwidth, b.join())),
    }
}
