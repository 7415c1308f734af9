//! A session's drive: answers its setup, registers it for binds and makes
//! its session machine, then hands it to the controller.

use super::*;
use crate::digest::PageHashes;
use crate::migration::auth::random_bytes;
use crate::migration::dest_session::{DestParams, DestSession};
use crate::migration::report::PageCounter;
use crate::migration::{MigratableGuest, MigrationError};
use crate::transport::accept::Admitted;
use crate::transport::{FrameReader, FrameWriter};
use crate::wire::{Command, Header, Message, SETUP_FRAME_MAC};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

impl Session {
    /// Runs an admitted session: answers its setup, then follows it through
    /// the controller to GO and the linger after it (`Ok`), or a failure
    /// the source is told of.
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
            mut bind_rx,
            mut events,
            reader,
            writer,
        } = self
            .open(peer, (reader, writer), admitted, tally, (cancel, at))
            .await?;
        *shared_out = Some(sh.clone());
        let mut c = Controller {
            session: self,
            sh: sh.clone(),
            cancel,
            tasks,
            tally,
            guest_out,
        };
        c.start(ChannelId::CONTROL, reader, writer);
        let result = c.run(&mut bind_rx, &mut events).await;
        tally.count(sh.session().tallies());
        result
    }
}

/// A session set up: what its controller goes on with.
struct Opened {
    sh: Arc<Shared>,
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
        (cancel, at): (&CancellationToken, Instant),
    ) -> Result<Opened, MigrationError> {
        let token = random_bytes::<16>();
        let secret = crate::transport::accept::bind_secret(&self.config, &admitted, &token);
        let refs_key = secret.refs_key(admitted.session_id);
        let streams = (admitted.machine.codecs() & crate::codec::CodecId::ZstdStream.bit() != 0)
            .then(|| self.config.kept_streams.clone());
        let Admitted {
            machine,
            setup,
            limits,
            memory,
            session_id,
            source_nonce,
            nonce,
            negotiation,
            proved_key: _,
            slot: _,
        } = admitted;
        let key = self.config.key.as_ref();
        let handshake = crate::migration::auth::Handshake {
            source_nonce: &source_nonce,
            dest_nonce: &nonce,
            negotiation: &negotiation,
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
        {
            let mut sessions = self.sessions.lock().unwrap_or_else(PoisonError::into_inner);
            let now = Instant::now();
            sessions.retain(|_, e| !e.expired(now));
            let entry = SessionEntry {
                secret,
                channels: setup.channels,
                nonces: Default::default(),
                route: Route::Live(bind_tx),
                frame_mac,
            };
            sessions.insert(session_id, entry);
        }
        tracing::info!(%peer, session = format!("{session_id:016x}"), memory = setup.memory_bytes, channels = setup.channels, "incoming migration");
        let (events_tx, events) = mpsc::unbounded_channel();
        let params = DestParams {
            channels: setup.channels,
            idle_timeout: self.config.idle_timeout,
            leave_paused: setup.flags & crate::wire::SETUP_LEAVE_PAUSED != 0,
        };
        let hashes = PageHashes::new(limits.guest_pages);
        let (hashes, delta, memory) = self.start_from_base(&setup, memory, hashes, tally).await?;
        let session = DestSession::new(machine, params, at, Instant::now());
        let mut sh = self.shared(
            session,
            limits,
            memory,
            session_id,
            events_tx,
            (cancel, refs_key),
        );
        sh.hashes = hashes;
        sh.prefilled = delta;
        sh.streams = streams;
        let sh = Arc::new(sh);
        self.answer_setup(&mut writer, &sh, &token, &handshake, delta)
            .await?;
        if let Some(keys) = frame_keys {
            reader.authenticate(keys.to_dest);
            writer.authenticate(keys.to_source);
            tally.frames_authenticated = true;
        }
        Ok(Opened {
            sh,
            bind_rx,
            events,
            reader,
            writer,
        })
    }

    /// What a session's tasks share.
    fn shared(
        &self,
        session: DestSession,
        limits: crate::wire::Limits,
        memory: Arc<crate::memory::GuestMemory>,
        session_id: u64,
        events: mpsc::UnboundedSender<Event>,
        (cancel, refs_key): (&CancellationToken, [u8; 32]),
    ) -> Shared {
        Shared {
            hashes: PageHashes::new(limits.guest_pages),
            refs_key,
            streams: None,
            prefilled: false,
            memory,
            limits,
            session: Mutex::new(session),
            counts: PageCounter::default(),
            events,
            session_id,
            next_msg: AtomicU64::new(1),
            cancel: cancel.clone(),
            reply_wait: self.config.idle_timeout,
            next_gen: std::sync::atomic::AtomicU32::new(1),
            claims_changed: tokio::sync::Notify::new(),
            chans: Mutex::new(HashMap::new()),
            retired: Mutex::new(Vec::new()),
            fault: Mutex::new(self.config.fault),
            fault_armed: std::sync::atomic::AtomicBool::new(self.config.fault.is_some()),
            panic_armed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// With a delta base offered and this receiver holding it: the guest's
    /// memory and hashes start as that image (on the blocking pool), a warm
    /// copy taken over in place of `memory`. Returns the hashes, whether the
    /// base was taken, and the guest's memory; a base not taken is said in
    /// the report and the session sends every page.
    async fn start_from_base(
        &self,
        setup: &crate::wire::SessionSetup,
        memory: Arc<crate::memory::GuestMemory>,
        hashes: PageHashes,
        tally: &mut Tally,
    ) -> Result<(PageHashes, bool, Arc<crate::memory::GuestMemory>), MigrationError> {
        let (Some(base), Some(find)) = (setup.base.clone(), self.config.delta_base.clone()) else {
            return Ok((hashes, false, memory));
        };
        let offered = setup.clone();
        let t = Instant::now();
        // Finding the image opens a file and reads its hash table: blocking
        // work, as is loading it.
        let (hashes, taken, memory) = tokio::task::spawn_blocking(move || {
            use super::prefill::{adopt, prefill, BaseImage};
            let image = match find(&offered) {
                Ok(image) => image,
                Err(why) => return (hashes, Err(Declined::NotHere(why)), memory),
            };
            let unusable = |why| Err(Declined::Unusable(why));
            match image {
                BaseImage::Memory(warm) if warm.len_bytes() == memory.len_bytes() => {
                    match adopt(&warm, &hashes, &base) {
                        Ok(pages) => (hashes, Ok(pages), warm),
                        Err(why) => (hashes, unusable(why), memory),
                    }
                }
                BaseImage::Memory(warm) => {
                    let why = format!(
                        "the warm copy holds {} bytes, the guest {}",
                        warm.len_bytes(),
                        memory.len_bytes()
                    );
                    (hashes, unusable(why), memory)
                }
                BaseImage::File(file) => {
                    let taken = prefill(&memory, &hashes, &file, &base).map_err(Declined::Unusable);
                    (hashes, taken, memory)
                }
            }
        })
        .await
        .map_err(|e| crate::transport::task_failed(crate::migration::Task::Delta, &e))?;
        match taken {
            Ok(pages) => {
                tracing::info!(
                    base = setup.base.as_ref().map_or("", |b| &b.migration_id),
                    pages,
                    ms = t.elapsed().as_millis() as u64,
                    "failback by delta: the guest starts from the retained image"
                );
                tally.delta.used = true;
                tally.delta.pages_skipped = pages;
                Ok((hashes, true, memory))
            }
            Err(Declined::NotHere(why)) => {
                tracing::info!(%why, "the offered delta base is not here: every page is sent");
                tally.delta.declined = Some(why);
                Ok((hashes, false, memory))
            }
            Err(Declined::Unusable(why)) => {
                tracing::warn!(%why, "the retained image is not usable: every page is sent");
                tally.delta.declined = Some(why);
                Ok((hashes, false, memory))
            }
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
        delta: bool,
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
                    key,
                    handshake,
                    session_id,
                    token,
                    (credits, delta),
                )),
            )
            .await?;
        Ok(())
    }
}

/// Why an offered delta base was not used.
enum Declined {
    /// The destination holds no image of that migration.
    NotHere(String),
    /// It holds one, but it does not check out (its memory zeroed again).
    Unusable(String),
}
