//! A session's drive: answers its setup and registers it for binds, hands
//! it to the controller, and the two hand-off steps the controller calls:
//! SWITCHOVER (digest, guest built, READY) and GO (resume, COMPLETE).

use super::*;
use crate::digest::{full_digest, PageHashes};
use crate::migration::auth::random_bytes;
use crate::migration::dest_ledger::{BatchLedger, ControlLog};
use crate::migration::fault::FaultPoint;
use crate::migration::report::PageCounter;
use crate::migration::{restore_guest, MigratableGuest, MigrationError, Mismatch};
use crate::transport::accept::Admitted;
use crate::transport::{FrameReader, FrameWriter};
use crate::wire::{
    Command, Complete, GuestKind, Header, Message, Switchover, VerifyMode, SETUP_FRAME_MAC,
};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

impl Session {
    /// Runs an admitted session: answers its setup, then follows it through
    /// the controller to GO (`Ok`) or a failure the source is told of.
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
        tasks: (&CancellationToken, &TaskTracker),
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
            .open(peer, (reader, writer), admitted, tally, tasks.0)
            .await?;
        *shared_out = Some(sh.clone());
        let mut c = Controller::new(self, sh.clone(), tasks, tally, guest_out, &setup, at);
        c.start(ChannelId::CONTROL, reader, writer);
        let result = c.run(&mut bind_rx, &mut events).await;
        match &result {
            Ok(()) => c.linger(&mut bind_rx, &mut events).await,
            Err(e) => tell_source(&sh, e).await,
        }
        result
    }
}

impl Session {
    /// SWITCHOVER: checks the digest through the machine, builds the guest
    /// (paused) so GO only has to resume it, and answers READY.
    pub(super) async fn on_switchover(
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
        let ready = sh
            .machine
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .handle_switchover(m, digest)?;
        let kind = tally.guest_kind.unwrap_or(GuestKind::Sim);
        let g = restore_guest(kind, sh.memory.clone(), &m.state)
            .map_err(|why| MigrationError::from(Mismatch::GuestState(why)))?;
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
    pub(super) async fn on_go(
        &self,
        sh: &Shared,
        h: &Header,
        tally: &mut Tally,
        guest_out: &Option<Arc<dyn MigratableGuest>>,
        control: &mut ControlLog,
        (leave_paused, at): (bool, Instant),
    ) -> Result<(), MigrationError> {
        sh.machine
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .handle_go()?;
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
        self.sessions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
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
        let sh = Arc::new(self.shared(machine, limits, memory, session_id, events_tx, cancel));
        self.answer_setup(&mut writer, &sh, &token, &handshake)
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

    /// What a session's tasks share.
    fn shared(
        &self,
        machine: crate::migration::dest_state::DestMachine,
        limits: crate::wire::Limits,
        memory: Arc<crate::memory::GuestMemory>,
        session_id: u64,
        events: mpsc::UnboundedSender<Event>,
        cancel: &CancellationToken,
    ) -> Shared {
        Shared {
            hashes: PageHashes::new(limits.guest_pages),
            memory,
            limits,
            machine: Mutex::new(machine),
            counts: PageCounter::default(),
            events,
            session_id,
            next_msg: AtomicU64::new(1),
            cancel: cancel.clone(),
            claims: Mutex::new(BatchLedger::default()),
            claims_changed: tokio::sync::Notify::new(),
            chans: Mutex::new(HashMap::new()),
            retired: Mutex::new(Vec::new()),
            fault: Mutex::new(self.config.fault),
            fault_armed: std::sync::atomic::AtomicBool::new(self.config.fault.is_some()),
            panic_armed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Answers SESSION_SETUP with the bind token, the initial credits and,
    /// with a key, the proof of it.
    async fn answer_setup(
        &self,
        writer: &mut FrameWriter,
        sh: &Shared,
        token: &[u8; 16],
        handshake: &crate::migration::auth::Handshake<'_>,
    ) -> Result<(), MigrationError> {
        let session_id = sh.session_id;
        let key = self.config.key.as_ref();
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
                &Message::SessionSetupResponse(crate::migration::handshake::setup_response(
                    key, handshake, session_id, token, credits,
                )),
            )
            .await?;
        Ok(())
    }
}
