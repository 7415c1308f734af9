//! The session controller's loop: binds, channel losses, the watchdog on the
//! source's silence and the control messages (ROUND_END, SWITCHOVER, GO),
//! each a step of its own; then the linger after COMPLETE.

use super::*;
use crate::migration::dest_ledger::{ControlLog, Seen};
use crate::migration::dest_state::DestState;
use crate::migration::{MigratableGuest, MigrationError, Violation};
use crate::transport::{FrameReader, FrameWriter};
use crate::wire::ChannelId;
use crate::wire::{Abort, Header, Message, FLAG_RESEND};
use std::collections::HashSet;
use std::ops::ControlFlow;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Go on, or end the session with this result.
type Flow = ControlFlow<Result<(), MigrationError>>;

/// What woke the controller.
enum Wake {
    Cancelled,
    Tick,
    Bind(Option<Bind>),
    Event(Option<Event>),
}

/// The controller of one session after its setup.
pub(super) struct Controller<'a> {
    pub(super) session: &'a Session,
    pub(super) sh: Arc<Shared>,
    pub(super) cancel: &'a CancellationToken,
    pub(super) tasks: &'a TaskTracker,
    pub(super) tally: &'a mut Tally,
    pub(super) guest_out: &'a mut Option<Arc<dyn MigratableGuest>>,
    /// Channels the setup asked for.
    pub(super) channels: u16,
    /// Whether the guest stays paused after GO.
    pub(super) leave_paused: bool,
    /// When the session's first frame arrived.
    pub(super) at: Instant,
    /// Control ids seen, and the last reply with the id it answered: a
    /// control message sent again after its channel failed gets the same
    /// reply again, and is not acted on twice.
    pub(super) control: ControlLog,
    ever_bound: HashSet<ChannelId>,
    last_loss: Option<String>,
    quiet: Quiet,
}

/// The source is silent when no byte arrives on any channel: a single
/// channel may rightly idle for long while others carry the rounds.
struct Quiet {
    limit: Duration,
    last_bytes: u64,
    since: Instant,
}

impl<'a> Controller<'a> {
    /// A controller for a session whose first connection is channel 0.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        session: &'a Session,
        sh: Arc<Shared>,
        (cancel, tasks): (&'a CancellationToken, &'a TaskTracker),
        tally: &'a mut Tally,
        guest_out: &'a mut Option<Arc<dyn MigratableGuest>>,
        setup: &SessionSetup,
        at: Instant,
    ) -> Self {
        let quiet = Quiet {
            limit: session.config.idle_timeout,
            last_bytes: session.rx_bytes.load(Ordering::Relaxed),
            since: Instant::now(),
        };
        if setup.channels == 1 {
            tally.setup = Some(at.elapsed());
        }
        Self {
            session,
            sh,
            cancel,
            tasks,
            tally,
            guest_out,
            channels: setup.channels,
            leave_paused: setup.flags & crate::wire::SETUP_LEAVE_PAUSED != 0,
            at,
            control: ControlLog::default(),
            ever_bound: HashSet::from([ChannelId::CONTROL]),
            last_loss: None,
            quiet,
        }
    }

    /// Starts a connection as channel `channel`, replacing (and stopping)
    /// the one before it.
    pub(super) fn start(&self, channel: ChannelId, reader: FrameReader, writer: FrameWriter) {
        let writer = Arc::new(tokio::sync::Mutex::new(writer));
        let stop = self.cancel.child_token();
        let gen = {
            let mut chans = self.sh.chans.lock().unwrap_or_else(PoisonError::into_inner);
            let gen = chans.get(&channel).map_or(1, |c| {
                c.stop.cancel();
                c.gen + 1
            });
            let fd = writer.try_lock().expect("new").raw_fd();
            let chan = DestChan {
                gen,
                writer: writer.clone(),
                stop: stop.clone(),
                fd,
            };
            chans.insert(channel, chan);
            gen
        };
        let task = channel_task(self.sh.clone(), channel, gen, reader, writer, stop);
        self.tasks.spawn(task);
    }

    /// Runs the session to its end: GO handled (`Ok`) or a failure.
    pub(super) async fn run(
        &mut self,
        bind_rx: &mut mpsc::UnboundedReceiver<Bind>,
        events: &mut mpsc::UnboundedReceiver<Event>,
    ) -> Result<(), MigrationError> {
        let period = Duration::from_secs(1).min(self.quiet.limit);
        let mut watchdog = tokio::time::interval(period);
        loop {
            let wake = tokio::select! {
                biased;
                _ = self.cancel.cancelled() => Wake::Cancelled,
                _ = watchdog.tick() => Wake::Tick,
                b = bind_rx.recv() => Wake::Bind(b),
                ev = events.recv() => Wake::Event(ev),
            };
            let flow = match wake {
                Wake::Cancelled => Flow::Break(Err(MigrationError::Cancelled)),
                Wake::Tick => self.on_tick(),
                Wake::Bind(None) => Flow::Continue(()),
                Wake::Bind(Some(b)) => self.on_bind(b).await,
                Wake::Event(None) => Flow::Break(Err(MigrationError::SessionLost(
                    "every channel ended".into(),
                ))),
                Wake::Event(Some(ev)) => self.on_event(ev, events).await,
            };
            if let Flow::Break(result) = flow {
                return result;
            }
        }
    }

    /// Ends the session when no byte came on any channel for the idle
    /// timeout.
    fn on_tick(&mut self) -> Flow {
        let q = &mut self.quiet;
        let now = self.session.rx_bytes.load(Ordering::Relaxed);
        if now != q.last_bytes {
            q.last_bytes = now;
            q.since = Instant::now();
            return Flow::Continue(());
        }
        if q.since.elapsed() < q.limit {
            return Flow::Continue(());
        }
        let idle = q.limit;
        Flow::Break(Err(match &self.last_loss {
            None => MigrationError::Timeout {
                what: "the source (no frame on any channel)",
                after: idle,
            },
            Some(why) => MigrationError::SessionLost(format!(
                "no frame on any channel for {idle:?} after {why}"
            )),
        }))
    }

    /// A proven bind: answers it and starts its channel.
    async fn on_bind(&mut self, b: Bind) -> Flow {
        let credits = self.session.config.initial_credits;
        let rx = &self.session.rx_bytes;
        let (channel, reader, writer) = match answer_bind(b, &self.sh, credits, rx).await {
            Ok(bound) => bound,
            Err(e) => return Flow::Break(Err(e)),
        };
        if !self.ever_bound.insert(channel) {
            self.tally.rebinds += 1;
            tracing::info!(channel = %channel, "channel rebound to the session");
        }
        self.start(channel, reader, writer);
        let all = self.ever_bound.len() == usize::from(self.channels);
        if all && self.tally.setup.is_none() {
            self.tally.setup = Some(self.at.elapsed());
        }
        Flow::Continue(())
    }

    /// A channel's failure or a control message.
    async fn on_event(&mut self, ev: Event, events: &mut mpsc::UnboundedReceiver<Event>) -> Flow {
        match ev {
            Event::Failed(ch, gen, e) if e.is_channel_loss() => {
                self.sh.forget_channel(ch, gen);
                // The source sends its batches again on the others and
                // rebinds it; silence on every channel ends the session.
                self.tally.failures += 1;
                tracing::warn!(channel = %ch, error = %e, "channel lost; waiting for the source to rebind it");
                self.last_loss = Some(e.to_string());
                Flow::Continue(())
            }
            Event::Failed(ch, _, e) => {
                tracing::debug!(channel = %ch, error = %e, "channel failed");
                // A source that aborts closes its channels right after:
                // prefer the abort's reason to the closed channel.
                if matches!(e, MigrationError::PeerClosed { .. }) {
                    if let Some(a) = abort_after_close(events).await {
                        return Flow::Break(Err(remote_abort(a)));
                    }
                }
                Flow::Break(Err(e))
            }
            Event::Control(h, m) => match self.control.see(&h) {
                Err(e) => Flow::Break(Err(e)),
                Ok(Seen::New) => self.on_control(h, m).await,
                Ok(Seen::Again(reply)) => {
                    if let Some(reply) = reply {
                        let _ = self.sh.reply(h.channel, &reply).await;
                    }
                    Flow::Continue(())
                }
            },
        }
    }

    /// A control message seen for the first time.
    async fn on_control(&mut self, h: Header, m: Message) -> Flow {
        let step = match m {
            Message::Abort(a) => Err(remote_abort(a)),
            Message::RoundEnd(m) => self.on_round_end(&m),
            Message::Switchover(m) => {
                let s = self.session;
                s.on_switchover(
                    &self.sh,
                    &h,
                    &m,
                    self.tally,
                    self.guest_out,
                    &mut self.control,
                )
                .await
            }
            Message::Go => {
                let ours = (self.leave_paused, self.at);
                let (tally, guest) = (&mut *self.tally, &*self.guest_out);
                let s = self.session;
                let done = s.on_go(&self.sh, &h, tally, guest, &mut self.control, ours);
                return Flow::Break(done.await);
            }
            m => Err(Violation::Unexpected {
                want: "ROUND_END, SWITCHOVER, GO or ABORT",
                got: m.command(),
            }
            .into()),
        };
        match step {
            Ok(()) => Flow::Continue(()),
            Err(e) => Flow::Break(Err(e)),
        }
    }

    /// ROUND_END: the machine moves to the next round.
    fn on_round_end(&mut self, m: &crate::wire::RoundEnd) -> Result<(), MigrationError> {
        self.sh
            .machine
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .handle_round_end(m)?;
        // Every batch of earlier rounds was acknowledged: none comes again.
        self.sh
            .claims
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .round_began(m.round);
        if m.final_next {
            self.tally.paused_at = Some(Instant::now());
        }
        Ok(())
    }

    /// After COMPLETE the source ends the session: waits (briefly) for it
    /// to close its channels, so our closing does not race its reading
    /// COMPLETE, and answers a GO it sends again (its channel failed) with
    /// COMPLETE.
    pub(super) async fn linger(
        &mut self,
        bind_rx: &mut mpsc::UnboundedReceiver<Bind>,
        events: &mut mpsc::UnboundedReceiver<Event>,
    ) {
        let credits = self.session.config.initial_credits;
        let linger = tokio::time::sleep(Duration::from_secs(5));
        tokio::pin!(linger);
        loop {
            let wake = tokio::select! {
                _ = &mut linger => return,
                b = bind_rx.recv() => Wake::Bind(b),
                ev = events.recv() => Wake::Event(ev),
            };
            match wake {
                // A channel rebinding to send GO again.
                Wake::Bind(Some(b)) => {
                    let rx = &self.session.rx_bytes;
                    if let Ok((ch, reader, writer)) = answer_bind(b, &self.sh, credits, rx).await {
                        self.tally.rebinds += 1;
                        self.start(ch, reader, writer);
                    }
                }
                Wake::Event(None) => return,
                Wake::Event(Some(Event::Failed(ch, gen, _))) => {
                    self.sh.forget_channel(ch, gen);
                    if self
                        .sh
                        .chans
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .is_empty()
                    {
                        return;
                    }
                }
                Wake::Event(Some(Event::Control(h, Message::Go))) if h.flags & FLAG_RESEND != 0 => {
                    if let Some(reply) = self.control.last_reply() {
                        let _ = self.sh.reply(h.channel, reply).await;
                    }
                }
                _ => {}
            }
        }
    }
}

fn remote_abort(a: Abort) -> MigrationError {
    MigrationError::RemoteAbort {
        code: a.code,
        message: a.message,
    }
}

/// A closed channel may be the source aborting (it closes its channels
/// right after): the ABORT that follows within 250 ms, if any.
async fn abort_after_close(events: &mut mpsc::UnboundedReceiver<Event>) -> Option<Abort> {
    let deadline = tokio::time::sleep(Duration::from_millis(250));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => return None,
            next = events.recv() => match next {
                Some(Event::Control(_, Message::Abort(a))) => return Some(a),
                Some(_) => continue,
                None => return None,
            },
        }
    }
}

/// A session that failed: the machine aborts, and unless the guest runs
/// here or the source aborted first, the source hears why (at most 1 s).
pub(super) async fn tell_source(sh: &Shared, e: &MigrationError) {
    let state = {
        let mut m = sh.machine.lock().unwrap_or_else(PoisonError::into_inner);
        m.abort();
        m.state()
    };
    if state != DestState::Running && !matches!(e, MigrationError::RemoteAbort { .. }) {
        let abort = Message::Abort(Abort {
            code: e.abort_code(),
            message: e.to_string(),
        });
        let _ = tokio::time::timeout(Duration::from_secs(1), sh.reply(ChannelId::CONTROL, &abort))
            .await;
    }
}
