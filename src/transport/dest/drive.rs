//! The session controller: answers the setup, starts channels, and follows
//! the control messages (ROUND_END, SWITCHOVER, GO) through the machine.

use super::*;
use crate::digest::{full_digest, PageHashes};
use crate::migration::auth::random_bytes;
use crate::migration::dest_ledger::{BatchLedger, ControlLog, Seen};
use crate::migration::dest_state::DestState;
use crate::migration::fault::FaultPoint;
use crate::migration::report::PageCounter;
use crate::migration::Violation;
use crate::migration::{restore_guest, MigratableGuest, MigrationError};
use crate::transport::accept::Admitted;
use crate::transport::{FrameReader, FrameWriter};
use crate::wire::{
    Abort, Command, Complete, GuestKind, Header, Message, SessionSetupResponse, Switchover,
    VerifyMode, FLAG_RESEND, SETUP_FRAME_MAC, SETUP_LEAVE_PAUSED,
};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

impl Session {
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn drive(
        &self,
        peer: SocketAddr,
        reader: FrameReader,
        writer: FrameWriter,
        admitted: Admitted,
        tally: &mut Tally,
        shared_out: &mut Option<Arc<Shared>>,
        guest_out: &mut Option<Arc<dyn MigratableGuest>>,
        (cancel, tasks): (&CancellationToken, &TaskTracker),
        at: Instant,
    ) -> Result<(), MigrationError> {
        let Opened {
            sh,
            setup,
            mut bind_rx,
            mut events,
            reader,
            writer,
        } = self
            .open(peer, (reader, writer), admitted, tally, cancel)
            .await?;
        *shared_out = Some(sh.clone());
        let credits = self.config.initial_credits;
        // Starts a connection as channel `channel`, replacing (and stopping)
        // the one before it.
        let start = |channel: u16, reader: FrameReader, writer: FrameWriter| {
            let writer = Arc::new(tokio::sync::Mutex::new(writer));
            let stop = cancel.child_token();
            let gen = {
                let mut chans = sh.chans.lock().unwrap();
                let gen = chans.get(&channel).map_or(1, |c| {
                    c.stop.cancel();
                    c.gen + 1
                });
                let fd = writer.try_lock().expect("new").raw_fd();
                chans.insert(
                    channel,
                    DestChan {
                        gen,
                        writer: writer.clone(),
                        stop: stop.clone(),
                        fd,
                    },
                );
                gen
            };
            tasks.spawn(channel_task(sh.clone(), channel, gen, reader, writer, stop));
        };
        start(0, reader, writer);
        let mut ever_bound = std::collections::HashSet::from([0u16]);
        // Control ids seen, and the last reply with the id it answered: a
        // control message sent again after its channel failed gets the same
        // reply again, and is not acted on twice.
        let mut control = ControlLog::default();
        let mut last_loss: Option<String> = None;
        // The source is silent when no byte arrives on any channel: a single
        // channel may rightly idle for long while others carry the rounds.
        let idle = self.config.idle_timeout;
        let mut watchdog = tokio::time::interval(Duration::from_secs(1).min(idle));
        let mut last_bytes = self.rx_bytes.load(Ordering::Relaxed);
        let mut last_change = Instant::now();
        if setup.channels == 1 {
            tally.setup = Some(at.elapsed());
        }
        let leave_paused = setup.flags & SETUP_LEAVE_PAUSED != 0;
        let result = loop {
            let ev = tokio::select! {
                biased;
                _ = cancel.cancelled() => break Err(MigrationError::Cancelled),
                _ = watchdog.tick() => {
                    let now = self.rx_bytes.load(Ordering::Relaxed);
                    if now != last_bytes {
                        last_bytes = now;
                        last_change = Instant::now();
                    } else if last_change.elapsed() >= idle {
                        break Err(match &last_loss {
                            None => MigrationError::Timeout { what: "the source (no frame on any channel)", after: idle },
                            Some(why) => MigrationError::SessionLost(format!(
                                "no frame on any channel for {idle:?} after {why}"
                            )),
                        });
                    }
                    continue;
                }
                b = bind_rx.recv() => {
                    let Some(b) = b else { continue };
                    let (channel, reader, writer) = match answer_bind(b, &sh, credits, &self.rx_bytes).await {
                        Ok(bound) => bound,
                        Err(e) => break Err(e),
                    };
                    if !ever_bound.insert(channel) {
                        tally.rebinds += 1;
                        tracing::info!(channel, "channel rebound to the session");
                    }
                    start(channel, reader, writer);
                    if ever_bound.len() == usize::from(setup.channels) && tally.setup.is_none() {
                        tally.setup = Some(at.elapsed());
                    }
                    continue;
                }
                ev = events.recv() => ev,
            };
            let Some(ev) = ev else {
                break Err(MigrationError::SessionLost("every channel ended".into()));
            };
            if let Event::Control(h, _) = &ev {
                match control.see(h) {
                    Err(e) => break Err(e),
                    Ok(Seen::New) => {}
                    Ok(Seen::Again(reply)) => {
                        if let Some(reply) = reply {
                            let _ = sh.reply(h.channel, &reply).await;
                        }
                        continue;
                    }
                }
            }
            match ev {
                Event::Failed(ch, gen, e) if e.is_channel_loss() => {
                    sh.forget_channel(ch, gen);
                    last_loss = Some(e.to_string());
                    // The source sends its batches again on the others and
                    // rebinds it; silence on every channel ends the session.
                    tally.failures += 1;
                    tracing::warn!(ch, error = %e, "channel lost; waiting for the source to rebind it");
                    continue;
                }
                Event::Failed(ch, _, e) => {
                    tracing::debug!(ch, error = %e, "channel failed");
                    // A source that aborts closes its channels right after:
                    // prefer the abort's reason to the closed channel.
                    if matches!(e, MigrationError::PeerClosed { .. }) {
                        if let Some(a) = abort_after_close(&mut events).await {
                            break Err(MigrationError::RemoteAbort {
                                code: a.code,
                                message: a.message,
                            });
                        }
                    }
                    break Err(e);
                }
                Event::Control(_, Message::Abort(a)) => {
                    break Err(MigrationError::RemoteAbort {
                        code: a.code,
                        message: a.message,
                    })
                }
                Event::Control(_, Message::RoundEnd(m)) => {
                    if let Err(e) = sh.machine.lock().unwrap().handle_round_end(&m) {
                        break Err(e);
                    }
                    // Every batch of earlier rounds was acknowledged: none
                    // comes again.
                    sh.claims.lock().unwrap().round_began(m.round);
                    if m.final_next {
                        tally.paused_at = Some(Instant::now());
                    }
                }
                Event::Control(h, Message::Switchover(m)) => {
                    if let Err(e) = self
                        .on_switchover(&sh, &h, &m, tally, guest_out, &mut control)
                        .await
                    {
                        break Err(e);
                    }
                }
                Event::Control(h, Message::Go) => {
                    let ours = (leave_paused, at);
                    break self
                        .on_go(&sh, &h, tally, guest_out, &mut control, ours)
                        .await;
                }
                Event::Control(_, m) => {
                    break Err(Violation::Unexpected {
                        want: "ROUND_END, SWITCHOVER, GO or ABORT",
                        got: m.command(),
                    }
                    .into())
                }
            }
        };
        if result.is_ok() {
            self.linger(&sh, &mut bind_rx, &mut events, &control, tally, &start)
                .await;
        }
        if let Err(e) = &result {
            tell_source(&sh, e).await;
        }
        result
    }
}

impl Session {
    /// SWITCHOVER: checks the digest through the machine, builds the guest
    /// (paused) so GO only has to resume it, and answers READY.
    async fn on_switchover(
        &self,
        sh: &Shared,
        h: &Header,
        m: &Switchover,
        tally: &mut Tally,
        guest_out: &mut Option<Arc<dyn MigratableGuest>>,
        control: &mut ControlLog,
    ) -> Result<(), MigrationError> {
        sh.fault_at(FaultPoint::BeforeReady)?;
        tally.rounds = m.rounds;
        tally.dirty_rate = m.dirty_rate_bps;
        tally.throttle_max = m.throttle_pct_max;
        tally.source_cpu_ms = Some(m.source_cpu_ms as f64);
        let t = Instant::now();
        let digest = match m.verify {
            VerifyMode::Fast => sh.hashes.digest(),
            VerifyMode::Full => {
                let mem = sh.memory.clone();
                tokio::task::spawn_blocking(move || full_digest(&mem, 2))
                    .await
                    .map_err(|e| MigrationError::Internal(format!("digest task: {e}")))?
            }
        };
        tally.verify = m.verify;
        tally.verify_time = t.elapsed();
        let ready = sh.machine.lock().unwrap().handle_switchover(m, digest)?;
        let kind = tally.guest_kind.unwrap_or(GuestKind::Sim);
        let g = restore_guest(kind, sh.memory.clone(), &m.state)
            .map_err(MigrationError::Incompatible)?;
        tally.counter_at_pause = Some(g.progress_counter());
        *guest_out = Some(g);
        tally.verified = true;
        let ready = Message::Ready(ready);
        control.replied(h.message_id, &ready);
        if let Err(e) = sh.reply(h.channel, &ready).await {
            // The source sends SWITCHOVER again once a channel is back.
            tracing::warn!(error = %e, "could not send READY yet");
        }
        sh.fault_at(FaultPoint::AfterReady)
    }

    /// GO: the guest is ours from here, whatever happens to the
    /// connection. Resumes it (unless asked to leave it paused) and
    /// answers COMPLETE.
    async fn on_go(
        &self,
        sh: &Shared,
        h: &Header,
        tally: &mut Tally,
        guest_out: &Option<Arc<dyn MigratableGuest>>,
        control: &mut ControlLog,
        (leave_paused, at): (bool, Instant),
    ) -> Result<(), MigrationError> {
        sh.machine.lock().unwrap().handle_go()?;
        let guest = guest_out.as_ref().expect("guest restored before READY");
        if !leave_paused {
            guest.resume();
            tally.resumed_at = Some(Instant::now());
        }
        if let Some(p) = tally.paused_at {
            tally.downtime = p.elapsed();
        }
        if let Some(on_go) = &self.config.on_go {
            on_go(tally.session_id, tally.label.as_ref(), guest, !leave_paused);
        }
        sh.fault_at(FaultPoint::AfterGo)?;
        let complete = Message::Complete(Complete {
            destination_cpu_ms: self.ctx.cpu.total().as_millis() as u64,
            resumed: !leave_paused,
        });
        control.replied(h.message_id, &complete);
        if let Err(e) = sh.reply(h.channel, &complete).await {
            tracing::warn!(error = %e, "could not acknowledge GO; the guest runs here regardless");
        }
        tally.finished = Some(at.elapsed());
        Ok(())
    }

    /// After COMPLETE the source ends the session: waits (briefly) for it
    /// to close its channels, so our closing does not race its reading
    /// COMPLETE, and answers a GO it sends again (its channel failed) with
    /// COMPLETE.
    async fn linger(
        &self,
        sh: &Shared,
        bind_rx: &mut mpsc::UnboundedReceiver<Bind>,
        events: &mut mpsc::UnboundedReceiver<Event>,
        control: &ControlLog,
        tally: &mut Tally,
        start: &impl Fn(u16, FrameReader, FrameWriter),
    ) {
        let credits = self.config.initial_credits;
        let linger = tokio::time::sleep(Duration::from_secs(5));
        tokio::pin!(linger);
        loop {
            tokio::select! {
                _ = &mut linger => break,
                b = bind_rx.recv() => {
                    // A channel rebinding to send GO again.
                    let Some(b) = b else { continue };
                    if let Ok((channel, reader, writer)) = answer_bind(b, sh, credits, &self.rx_bytes).await {
                        tally.rebinds += 1;
                        start(channel, reader, writer);
                    }
                }
                ev = events.recv() => match ev {
                    None => break,
                    Some(Event::Failed(ch, gen, _)) => {
                        sh.forget_channel(ch, gen);
                        if sh.chans.lock().unwrap().is_empty() {
                            break;
                        }
                    }
                    Some(Event::Control(h, Message::Go)) if h.flags & FLAG_RESEND != 0 => {
                        if let Some(reply) = control.last_reply() {
                            let _ = sh.reply(h.channel, reply).await;
                        }
                    }
                    Some(_) => continue,
                },
            }
        }
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
async fn tell_source(sh: &Shared, e: &MigrationError) {
    let state = {
        let mut m = sh.machine.lock().unwrap();
        m.abort();
        m.state()
    };
    if state != DestState::Running && !matches!(e, MigrationError::RemoteAbort { .. }) {
        let abort = Message::Abort(Abort {
            code: e.abort_code(),
            message: e.to_string(),
        });
        let _ = tokio::time::timeout(Duration::from_secs(1), sh.reply(0, &abort)).await;
    }
}

/// A session set up: what its controller goes on with.
struct Opened {
    sh: Arc<Shared>,
    setup: SessionSetup,
    bind_rx: mpsc::UnboundedReceiver<Bind>,
    events: mpsc::UnboundedReceiver<Event>,
    reader: FrameReader,
    writer: FrameWriter,
}

impl Session {
    /// Registers the admitted session for binds, makes what its tasks
    /// share, answers SESSION_SETUP (with the proof of the key when there
    /// is one) and turns on frame tags when asked.
    async fn open(
        &self,
        peer: SocketAddr,
        (mut reader, mut writer): (FrameReader, FrameWriter),
        admitted: Admitted,
        tally: &mut Tally,
        cancel: &CancellationToken,
    ) -> Result<Opened, MigrationError> {
        let token = random_bytes::<16>();
        let secret = crate::transport::accept::bind_secret(&self.config, &admitted, &token);
        let Admitted {
            machine,
            setup,
            limits,
            memory,
            session_id,
            source_nonce,
            nonce,
            proved_key: _,
            slot: _,
        } = admitted;
        let key = self.config.key.as_ref();
        let handshake = crate::migration::auth::Handshake {
            source_nonce: &source_nonce,
            dest_nonce: &nonce,
            binding: &self.binding,
        };
        let frame_mac = key.is_some() && setup.flags & SETUP_FRAME_MAC != 0;
        let frame_keys = frame_mac.then(|| {
            secret.frame_keys(
                session_id,
                crate::migration::auth::Connection::Setup(&source_nonce),
            )
        });
        let (bind_tx, bind_rx) = mpsc::unbounded_channel();
        self.sessions.lock().unwrap().insert(
            session_id,
            SessionEntry {
                secret,
                channels: setup.channels,
                nonces: Default::default(),
                tx: bind_tx,
                frame_mac,
            },
        );
        tracing::info!(%peer, session = format!("{session_id:016x}"), memory = setup.memory_bytes, channels = setup.channels, "incoming migration");
        let (events_tx, events) = mpsc::unbounded_channel();
        let sh = Arc::new(Shared {
            hashes: PageHashes::new(limits.guest_pages),
            memory,
            limits,
            machine: Mutex::new(machine),
            counts: PageCounter::default(),
            events: events_tx,
            session_id,
            next_msg: AtomicU64::new(1),
            cancel: cancel.clone(),
            claims: Mutex::new(BatchLedger::default()),
            claims_changed: tokio::sync::Notify::new(),
            chans: Mutex::new(HashMap::new()),
            fault: Mutex::new(self.config.fault),
            fault_armed: std::sync::atomic::AtomicBool::new(self.config.fault.is_some()),
            panic_armed: std::sync::atomic::AtomicBool::new(false),
        });
        let credits = self.config.initial_credits;
        let header = Header {
            session_id,
            credit_grant: credits,
            message_id: sh.next_msg.fetch_add(1, Ordering::Relaxed),
            ..Header::new(Command::SessionSetupResponse)
        };
        writer
            .send(
                header,
                &Message::SessionSetupResponse(SessionSetupResponse {
                    bind_token: token,
                    initial_credits: credits,
                    proof: key.map(|k| {
                        let r = crate::migration::auth::Response {
                            session_id,
                            token: &token,
                            credits,
                        };
                        crate::migration::auth::response_proof(k, &handshake, &r)
                    }),
                }),
            )
            .await?;
        if let Some(keys) = frame_keys {
            reader.authenticate(keys.to_dest);
            writer.authenticate(keys.to_source);
            tally.frames_authenticated = true;
        }
        Ok(Opened {
            sh,
            setup,
            bind_rx,
            events,
            reader,
            writer,
        })
    }
}
