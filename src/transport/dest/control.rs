//! The session controller: the driver of a [`DestSession`] after the
//! setup. It waits for a bind, a channel's end, a control message, the
//! session's next deadline or the stop; hands each to the machine with the
//! time; then sends what the machine asks to send and carries out the
//! hand-off steps it asks for (the digest and the guest built for
//! SWITCHOVER, the guest resumed for GO).

use super::*;
use crate::digest::full_digest;
use crate::migration::dest_session::{DestEvent, DestSession};
use crate::migration::fault::FaultPoint;
use crate::migration::{restore_guest, LocalFault, MigratableGuest, MigrationError, Mismatch};
use crate::transport::{FrameReader, FrameWriter};
use crate::wire::{ChannelId, GuestKind, Message, Switchover, VerifyMode};
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Longest wait to tell the source why the session failed.
const ABORT_WAIT: Duration = Duration::from_secs(1);

/// What woke the controller.
enum Wake {
    Cancelled,
    Timer,
    Bind(Bind),
    Event(Event),
}

/// The controller of one session after its setup.
pub(super) struct Controller<'a> {
    pub(super) session: &'a Session,
    pub(super) sh: Arc<Shared>,
    pub(super) cancel: &'a CancellationToken,
    pub(super) tasks: &'a TaskTracker,
    pub(super) tally: &'a mut Tally,
    pub(super) guest_out: &'a mut Option<Arc<dyn MigratableGuest>>,
}

impl Controller<'_> {
    fn machine(&self) -> std::sync::MutexGuard<'_, DestSession> {
        self.sh.session()
    }

    /// Starts a connection as channel `channel`, replacing (and stopping)
    /// the one before it, and tells the machine it is bound.
    pub(super) fn start(&self, channel: ChannelId, reader: FrameReader, writer: FrameWriter) {
        let writer = Arc::new(tokio::sync::Mutex::new(writer));
        let stop = self.cancel.child_token();
        // Connections are numbered across the session, never again: one
        // dropped from the channels up (a reset) may still be reported
        // lost after its channel is bound again.
        let gen = self.sh.next_gen.fetch_add(1, Ordering::Relaxed);
        let rebound = {
            let mut chans = self.sh.chans.lock().unwrap_or_else(PoisonError::into_inner);
            let before = chans.get(&channel).map(|c| c.stop.cancel()).is_some();
            let fd = writer.try_lock().expect("new").raw_fd();
            let chan = DestChan {
                gen,
                writer: writer.clone(),
                stop: stop.clone(),
                fd,
            };
            chans.insert(channel, chan);
            before
        };
        if rebound {
            tracing::info!(channel = %channel, "channel rebound to the session");
        }
        self.machine().handle_bound(Instant::now(), channel, gen);
        let task = channel_task(self.sh.clone(), channel, gen, reader, writer, stop);
        self.tasks.spawn(task);
    }

    /// Runs the session to its end: `Ok` once GO was carried out (after
    /// the linger), or why it failed (the source told, where it may be).
    pub(super) async fn run(
        &mut self,
        binds: &mut mpsc::UnboundedReceiver<Bind>,
        events: &mut mpsc::UnboundedReceiver<Event>,
    ) -> Result<(), MigrationError> {
        loop {
            self.carry_out().await;
            let Some(deadline) = self.machine().poll_timeout() else {
                break;
            };
            // Neither queue closes while the session runs: its entry holds
            // the bind sender, `Shared` the event sender.
            let wake = tokio::select! {
                biased;
                _ = self.cancel.cancelled() => Wake::Cancelled,
                _ = tokio::time::sleep_until(deadline.into()) => Wake::Timer,
                Some(b) = binds.recv() => Wake::Bind(b),
                Some(ev) = events.recv() => Wake::Event(ev),
            };
            self.on_wake(wake).await;
        }
        self.carry_out().await;
        let outcome = self.machine().take_outcome();
        outcome.unwrap_or(Err(MigrationError::Cancelled))
    }

    /// Hands what woke the controller to the machine.
    async fn on_wake(&mut self, wake: Wake) {
        let now = Instant::now();
        match wake {
            Wake::Cancelled => self.machine().fail(MigrationError::Cancelled),
            Wake::Timer => {
                let rx = self.session.rx_bytes.load(Ordering::Relaxed);
                self.machine().handle_timeout(now, rx);
            }
            Wake::Bind(b) => self.on_bind(b).await,
            Wake::Event(Event::Failed(ch, gen, e)) => {
                let completed = matches!(self.machine().outcome(), Some(Ok(())));
                if e.is_channel_loss() {
                    self.sh.forget_channel(ch, gen);
                }
                if completed {
                    // The source closing its channels once it read COMPLETE.
                    tracing::debug!(channel = %ch, error = %e, "channel closed after COMPLETE");
                } else if e.is_channel_loss() {
                    // The source sends its batches again on the others and
                    // rebinds it; silence on every channel ends the session.
                    tracing::warn!(channel = %ch, error = %e, "channel lost; waiting for the source to rebind it");
                } else {
                    // The session ends: its ABORT may still go out on the
                    // channel (a violation leaves the connection whole).
                    tracing::debug!(channel = %ch, error = %e, "channel failed");
                }
                self.machine().handle_lost(now, ch, gen, e);
            }
            Wake::Event(Event::Control(h, m)) => self.machine().handle_control(now, &h, m),
        }
    }

    /// A proven bind: answers it and starts its channel, while the session
    /// takes binds.
    async fn on_bind(&mut self, b: Bind) {
        if !self.machine().takes_binds() {
            return;
        }
        let credits = self.session.config.initial_credits;
        let rx = &self.session.rx_bytes;
        match answer_bind(b, &self.sh, credits, rx).await {
            Ok((channel, reader, writer)) => self.start(channel, reader, writer),
            Err(e) => self.machine().handle_bind_failed(e),
        }
    }

    /// Sends what the machine asks to send and carries out its hand-off
    /// steps, until it asks for nothing more.
    async fn carry_out(&mut self) {
        loop {
            self.send_replies().await;
            let event = self.machine().poll_event();
            match event {
                None => return,
                Some(DestEvent::Verify(m)) => self.verify(m).await,
                Some(DestEvent::Go { resume }) => self.go(resume),
            }
        }
    }

    /// Sends the machine's replies; an ABORT waits at most a second.
    async fn send_replies(&self) {
        loop {
            let Some(reply) = self.machine().poll_transmit() else {
                return;
            };
            let sent = if matches!(reply.msg, Message::Abort(_)) {
                let send = self.sh.reply(reply.on, &reply.msg);
                tokio::time::timeout(ABORT_WAIT, send)
                    .await
                    .unwrap_or(Ok(()))
            } else {
                self.sh.reply(reply.on, &reply.msg).await
            };
            if let Err(e) = sent {
                // A reply is sent again when the source asks again on a
                // channel that is back; after GO the guest runs here
                // regardless.
                let what = reply.msg.command();
                tracing::warn!(error = %e, ?what, "could not send a reply yet");
            }
        }
    }

    /// SWITCHOVER: the digest through the machine, the guest built (paused)
    /// so GO only has to resume it, and READY.
    async fn verify(&mut self, m: Switchover) {
        if let Err(e) = self.sh.fault_at(FaultPoint::BeforeReady) {
            return self.machine().fail(e);
        }
        let tally = &mut *self.tally;
        tally.rounds = m.rounds;
        tally.dirty_rate = m.dirty_rate_bps;
        tally.throttle_max = m.throttle_pct_max;
        tally.source_cpu_ms = Some(m.source_cpu_ms as f64);
        let t = Instant::now();
        let digest = match m.verify {
            VerifyMode::Fast => self.sh.hashes.digest(),
            VerifyMode::Full => {
                let mem = self.sh.memory.clone();
                match tokio::task::spawn_blocking(move || full_digest(&mem, 2)).await {
                    Ok(d) => d,
                    Err(e) => {
                        let e = crate::transport::task_failed(crate::migration::Task::Digest, &e);
                        return self.machine().fail(e);
                    }
                }
            }
        };
        self.tally.verify = m.verify;
        self.tally.verify_time = t.elapsed();
        if !self.machine().handle_digest(&m, digest) {
            return;
        }
        let kind = self.tally.guest_kind.unwrap_or(GuestKind::Sim);
        match restore_guest(kind, self.sh.memory.clone(), &m.state) {
            Ok(g) => {
                self.tally.counter_at_pause = Some(g.progress_counter());
                *self.guest_out = Some(g);
                self.tally.verified = true;
                self.machine().ready();
            }
            Err(why) => return self.machine().fail(Mismatch::GuestState(why).into()),
        }
        self.send_replies().await;
        if let Err(e) = self.sh.fault_at(FaultPoint::AfterReady) {
            self.machine().fail(e);
        }
    }

    /// GO: the guest is ours from here, whatever happens to the
    /// connection. Resumes it (unless asked to leave it paused) and
    /// answers COMPLETE.
    fn go(&mut self, resume: bool) {
        let Some(guest) = self.guest_out.as_ref() else {
            let e = MigrationError::Internal(LocalFault::Unreachable("GO without a guest built"));
            return self.machine().fail(e);
        };
        if resume {
            guest.resume();
        }
        let now = Instant::now();
        // It runs here now: huge pages from here on (received into small
        // ones, see `GuestMemory::without_huge_pages`).
        self.sh.memory.advise_huge_pages();
        self.tally.resumed_at = resume.then_some(now);
        self.machine().handle_resumed(now);
        if let Some(on_go) = &self.session.config.on_go {
            on_go(
                self.tally.session_id,
                self.tally.label.as_ref(),
                guest,
                resume,
            );
        }
        if let Err(e) = self.sh.fault_at(FaultPoint::AfterGo) {
            return self.machine().fail(e);
        }
        let cpu_ms = self.session.ctx.cpu.total().as_millis() as u64;
        self.machine().complete(Instant::now(), cpu_ms);
    }
}
