//! The destination driver: accepts sessions and channel binds, applies page
//! batches, verifies the digest and takes the guest over on GO.
//!
//! Every accepted connection's first frame says what it is: NEGOTIATE opens a
//! session, CHANNEL_BIND joins one by id and token. Each channel's task reads
//! frames, applies batches on the blocking pool and acknowledges them with one
//! more credit; control messages go to the session's controller, which drives
//! the [`DestMachine`].

use super::auth::{random_bytes, BindSecret, SessionKey};
use super::dest_state::{DestMachine, DestState};
use super::fault::{Fault, FaultKind, FaultPoint};
use super::progress::RunContext;
use super::report::{round3, CpuMs, MemoryUse, Outcome, PageCounter, PageCounts, Report, Side};
use super::{restore_guest, MigratableGuest, MigrationError, DEFAULT_INITIAL_CREDITS};
use crate::codec::CodecId;
use crate::digest::{full_digest, page_hash, zero_page_hash, PageHashes};
use crate::memory::GuestMemory;
use crate::transport::{Conn, FrameReader, FrameWriter, Received};
use crate::wire::{
    Abort, BatchAck, ChannelBindResponse, Command, Complete, GuestKind, Header, Limits, Message,
    Page, PageBatch, SessionLabel, SessionSetup, SessionSetupResponse, VerifyMode, FLAG_RESEND,
    SETUP_LEAVE_PAUSED,
};
use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Memory one channel of a session may hold at once: a frame being read and
/// a batch's decompressed pages.
pub const CHANNEL_MEMORY: u64 = crate::wire::MAX_FRAME_LEN as u64
    + crate::wire::MAX_PAGES_PER_BATCH as u64 * crate::memory::PAGE_SIZE as u64;

/// Decides whether a session may start, from its setup, once its peer is
/// authenticated (an agent checks that it takes VMs, has the memory, and
/// hosts none of that name); `Err(reason)` refuses it before any memory is
/// allocated.
pub type AdmitFn = Arc<dyn Fn(&SessionSetup) -> Result<(), String> + Send + Sync>;

/// Told at GO, the moment a guest runs (or waits paused) here: its session's
/// label, the guest, and whether it was resumed. The session's report
/// follows when the session ends.
pub type OnGoFn = Arc<dyn Fn(Option<&SessionLabel>, &Arc<dyn MigratableGuest>, bool) + Send + Sync>;

/// Whom a receiver without a key takes sessions from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Unauthenticated {
    /// Nobody: every session must prove the key.
    Refuse,
    /// Peers on loopback addresses only (the default).
    #[default]
    Loopback,
    /// Anyone (`--insecure`): for trusted, isolated links.
    Anywhere,
}

/// Receiver limits.
#[derive(Clone)]
pub struct ReceiverConfig {
    /// Largest guest accepted, bytes. Default: 1 TiB.
    pub max_memory: u64,
    /// Batches in flight per channel. Default: 4.
    pub initial_credits: u16,
    /// Longest time without a byte from the source on any channel of a session
    /// before giving up on it (sources keep idle channels alive every 3 s at
    /// most). Default: 10 s.
    pub idle_timeout: Duration,
    /// Admission of each session (default: every session within the limits).
    pub admit: Option<AdmitFn>,
    /// Told when a guest is handed over (agents list the VM as running then).
    pub on_go: Option<OnGoFn>,
    /// The shared key every session must prove (and this receiver proves
    /// back). Default: none.
    pub key: Option<SessionKey>,
    /// Without a key: whom to take sessions from. Default: loopback peers.
    pub unauthenticated: Unauthenticated,
    /// A fault to inject (tests of the hand-off rules only).
    pub fault: Option<Fault>,
    /// Longest wait for a connection's first frame, and for a session's
    /// setup after it. Default: 10 s.
    pub handshake_timeout: Duration,
    /// Sessions received at once; more are refused at NEGOTIATE. Default: 16.
    pub max_sessions: usize,
    /// Connections that have not yet sent their first frame; more are
    /// closed at once (slowloris). Default: 64.
    pub max_pending: usize,
    /// Frame and batch memory a session's channels may hold at once
    /// (channels × [`CHANNEL_MEMORY`]); a session that could hold more is
    /// refused before anything is allocated. Default: 768 MiB (64 channels).
    pub max_inflight_bytes: u64,
    /// TLS 1.3 on every channel (sources without it are refused). Default:
    /// none: plain, CRC-checked frames.
    pub tls: Option<crate::transport::tls::TlsServer>,
    /// Read a resumed guest's counter again this long after GO, for the
    /// report's `guest_counter_after_resume` (the report waits for it; the
    /// wait is not part of `total_ms`). Default: none (`ferry receive`: 1 s).
    pub resume_check: Option<Duration>,
}

impl std::fmt::Debug for ReceiverConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReceiverConfig")
            .field("max_memory", &self.max_memory)
            .field("initial_credits", &self.initial_credits)
            .field("idle_timeout", &self.idle_timeout)
            .field("admit", &self.admit.is_some())
            .field("key", &self.key)
            .field("unauthenticated", &self.unauthenticated)
            .field("fault", &self.fault)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("max_sessions", &self.max_sessions)
            .field("max_pending", &self.max_pending)
            .field("max_inflight_bytes", &self.max_inflight_bytes)
            .field("tls", &self.tls.is_some())
            .field("resume_check", &self.resume_check)
            .finish()
    }
}

impl Default for ReceiverConfig {
    fn default() -> Self {
        Self {
            max_memory: 1 << 40,
            initial_credits: DEFAULT_INITIAL_CREDITS,
            idle_timeout: super::DEFAULT_PEER_TIMEOUT,
            admit: None,
            on_go: None,
            key: None,
            unauthenticated: Unauthenticated::default(),
            fault: None,
            handshake_timeout: Duration::from_secs(10),
            max_sessions: 16,
            max_pending: 64,
            max_inflight_bytes: 64 * CHANNEL_MEMORY,
            tls: None,
            resume_check: None,
        }
    }
}

/// A finished incoming migration: the report and, when it completed, the guest
/// that now runs here.
pub struct Incoming {
    /// The destination's report.
    pub report: Report,
    /// The guest, when the migration completed.
    pub guest: Option<Arc<dyn MigratableGuest>>,
    /// Its memory (also when the session failed after allocating it).
    pub memory: Option<Arc<GuestMemory>>,
    /// Who the session was for, as its setup said (agents' migrations).
    pub label: Option<SessionLabel>,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("report", &self.report)
            .finish()
    }
}

struct Bind {
    channel: u16,
    reader: FrameReader,
    writer: FrameWriter,
    /// The destination's proof for the CHANNEL_BIND_RESPONSE.
    proof: [u8; 32],
}

struct SessionEntry {
    secret: BindSecret,
    channels: u16,
    /// Bind nonces already used: each proves one bind only.
    nonces: std::collections::HashSet<[u8; 16]>,
    tx: mpsc::UnboundedSender<Bind>,
}

type Sessions = Arc<Mutex<HashMap<u64, SessionEntry>>>;

/// Listens for migrations.
pub struct Receiver {
    listener: TcpListener,
    config: ReceiverConfig,
}

impl Receiver {
    /// Binds the listening socket.
    pub async fn bind(addr: &str, config: ReceiverConfig) -> std::io::Result<Self> {
        Ok(Self {
            listener: TcpListener::bind(addr).await?,
            config,
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts sessions until `ctx.cancel` fires, sending each finished one to
    /// `done`. Sessions run concurrently.
    pub async fn serve(self, ctx: RunContext, done: mpsc::UnboundedSender<Incoming>) {
        let sessions: Sessions = Arc::default();
        let counts = Arc::new(Counts::default());
        loop {
            let accepted = tokio::select! {
                biased;
                _ = ctx.cancel.cancelled() => return,
                a = self.listener.accept() => a,
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let at = Instant::now();
            let Some(pending) = Slot::take(&counts.pending, self.config.max_pending) else {
                tracing::warn!(%peer, limit = self.config.max_pending, "too many connections without a first frame; closing this one");
                continue;
            };
            let sessions = sessions.clone();
            let ctx = ctx.clone();
            let done = done.clone();
            let config = self.config.clone();
            let counts = counts.clone();
            tokio::spawn(async move {
                if let Some(incoming) =
                    handle_connection(stream, peer, at, sessions, config, ctx, pending, counts)
                        .await
                {
                    let _ = done.send(incoming);
                }
            });
        }
    }

    /// Serves until the first session ends and returns it.
    pub async fn receive_one(self, ctx: RunContext) -> Option<Incoming> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let stop = ctx.cancel.child_token();
        let serve_ctx = RunContext {
            cancel: stop.clone(),
            ..ctx.clone()
        };
        let server = tokio::spawn(self.serve(serve_ctx, tx));
        let got = tokio::select! {
            r = rx.recv() => r,
            _ = ctx.cancel.cancelled() => None,
        };
        stop.cancel();
        let _ = server.await;
        got
    }
}

/// Connections in their handshake and sessions under way, against the limits.
#[derive(Default)]
struct Counts {
    pending: Arc<std::sync::atomic::AtomicUsize>,
    sessions: Arc<std::sync::atomic::AtomicUsize>,
}

/// One unit of a counted limit, given back on drop.
struct Slot(Arc<std::sync::atomic::AtomicUsize>);

impl Slot {
    fn take(count: &Arc<std::sync::atomic::AtomicUsize>, limit: usize) -> Option<Self> {
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| Self(count.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[allow(clippy::too_many_arguments)]
async fn handle_connection(
    stream: TcpStream,
    peer: SocketAddr,
    at: Instant,
    sessions: Sessions,
    config: ReceiverConfig,
    ctx: RunContext,
    pending: Slot,
    counts: Arc<Counts>,
) -> Option<Incoming> {
    let _ = stream.set_nodelay(true);
    let rx_bytes = Arc::new(AtomicU64::new(0));
    let handshake = config.handshake_timeout;
    let (conn, binding) = match &config.tls {
        None => (Conn::Plain(stream), Vec::new()),
        Some(tls) => {
            // A plain ferry source on a TLS receiver: say so in its terms.
            let mut head = [0u8; 4];
            if let Ok(Ok(4)) = tokio::time::timeout(handshake, stream.peek(&mut head)).await {
                if u32::from_le_bytes(head) == crate::wire::MAGIC {
                    let (r, w) = stream.into_split();
                    drop(r);
                    let mut writer = FrameWriter::new(w, 0, Vec::new(), Arc::default());
                    let e = MigrationError::Incompatible(
                        "this receiver takes TLS only: start the source with --tls".into(),
                    );
                    tracing::warn!(%peer, error = %e, "rejected connection");
                    reject(&mut writer, &e).await;
                    return None;
                }
            }
            match tokio::time::timeout(handshake, tls.accept(stream)).await {
                Ok(Ok((s, b))) => (Conn::Tls(Box::new(s)), b.to_vec()),
                Ok(Err(e)) => {
                    tracing::warn!(%peer, error = %e, "rejected connection");
                    return None;
                }
                Err(_) => {
                    tracing::warn!(%peer, "no TLS handshake within {handshake:?}; closing");
                    return None;
                }
            }
        }
    };
    let (mut reader, mut writer) = conn.split(0, rx_bytes.clone(), Vec::new(), Arc::default());
    let first = match tokio::time::timeout(handshake, reader.read_frame()).await {
        Ok(Ok(Some(f))) => f,
        Ok(Ok(None)) => return None,
        Ok(Err(e)) => {
            // A TLS client hello where a frame should start.
            let e = match e {
                MigrationError::Decode(crate::wire::DecodeError::BadMagic { found })
                    if found & 0xffff == 0x0316 =>
                {
                    MigrationError::Incompatible(
                        "the source speaks TLS: this receiver runs without --tls".into(),
                    )
                }
                e => e,
            };
            tracing::warn!(%peer, error = %e, "rejected connection");
            reject(&mut writer, &e).await;
            return None;
        }
        Err(_) => {
            tracing::warn!(%peer, "no frame within the handshake timeout of {handshake:?}; closing");
            return None;
        }
    };
    match Message::decode(&first.header, first.payload.clone(), Limits::BEFORE_SETUP) {
        Ok(Message::Negotiate(n)) => {
            drop(pending);
            let Some(slot) = Slot::take(&counts.sessions, config.max_sessions) else {
                let e = MigrationError::Resources(format!(
                    "this receiver is at its limit of {} sessions at once",
                    config.max_sessions
                ));
                tracing::warn!(%peer, error = %e, "refused a session");
                reject(&mut writer, &e).await;
                return None;
            };
            let _slot = slot;
            let session = Session::new(config, ctx, sessions, rx_bytes);
            Some(session.run(at, peer, reader, writer, n, binding).await)
        }
        Ok(Message::ChannelBind(b)) => {
            let h = first.header;
            let bind = super::auth::Bind {
                session_id: h.session_id,
                channel: h.channel,
                nonce: &b.nonce,
                binding: &binding,
            };
            // A bind joins a live session as one of its channels, proves the
            // session's secret over a nonce never used before in it, and may
            // replace a channel that failed (the same number again).
            let routed = {
                let mut map = sessions.lock().unwrap();
                match map.get_mut(&h.session_id) {
                    None => Err(MigrationError::Protocol(format!(
                        "bind of channel {} to unknown session {:016x}",
                        h.channel, h.session_id
                    ))),
                    Some(s) if h.channel >= s.channels => Err(MigrationError::Protocol(format!(
                        "bind of channel {} to session {:016x} of {} channels",
                        h.channel, h.session_id, s.channels
                    ))),
                    Some(s) if !s.secret.verify_bind(&bind, &b.proof) => {
                        Err(MigrationError::Unauthenticated(format!(
                            "bind of channel {} to session {:016x} with a wrong proof",
                            h.channel, h.session_id
                        )))
                    }
                    Some(s) if s.nonces.contains(&b.nonce) => {
                        Err(MigrationError::Unauthenticated(format!(
                            "bind of channel {} to session {:016x} replays a used nonce",
                            h.channel, h.session_id
                        )))
                    }
                    Some(s) => Ok((
                        s.nonces.insert(b.nonce),
                        s.tx.clone(),
                        s.secret.bound_proof(&bind),
                    )),
                }
            };
            match routed {
                Ok((_, tx, proof)) => {
                    reader.set_channel(h.channel);
                    writer.set_channel(h.channel);
                    let _ = tx.send(Bind {
                        channel: h.channel,
                        reader,
                        writer,
                        proof,
                    });
                }
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "rejected channel bind");
                    reject(&mut writer, &e).await;
                }
            }
            None
        }
        Ok(m) => {
            let e = MigrationError::Protocol(format!(
                "first frame is {:?}, not NEGOTIATE or CHANNEL_BIND",
                m.command()
            ));
            tracing::warn!(%peer, error = %e, "rejected connection");
            reject(&mut writer, &e).await;
            None
        }
        Err(e) => {
            let e = MigrationError::from(e);
            tracing::warn!(%peer, error = %e, "rejected connection");
            reject(&mut writer, &e).await;
            None
        }
    }
}

async fn reject(writer: &mut FrameWriter, e: &MigrationError) {
    let msg = Message::Abort(Abort {
        code: e.abort_code(),
        message: e.to_string(),
    });
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        writer.send(Header::new(Command::Abort), &msg),
    )
    .await;
    writer.shutdown().await;
}

enum Event {
    Control(Header, Message),
    Failed(u16, u32, MigrationError),
}

/// A channel's current connection.
struct DestChan {
    gen: u32,
    writer: Arc<tokio::sync::Mutex<FrameWriter>>,
    stop: CancellationToken,
    fd: std::os::fd::RawFd,
}

struct Shared {
    memory: Arc<GuestMemory>,
    hashes: PageHashes,
    limits: Limits,
    machine: Mutex<DestMachine>,
    counts: PageCounter,
    events: mpsc::UnboundedSender<Event>,
    session_id: u64,
    next_msg: AtomicU64,
    cancel: CancellationToken,
    /// Each batch id seen this round and the last, and its wake-up.
    claims: Mutex<HashMap<u64, Claim>>,
    claims_changed: tokio::sync::Notify,
    /// Channels up now.
    chans: Mutex<HashMap<u16, DestChan>>,
    /// The fault to inject, until it has been; `fault_armed` keeps the
    /// per-batch checks to one load when there is none (always, but in tests).
    fault: Mutex<Option<Fault>>,
    fault_armed: std::sync::atomic::AtomicBool,
}

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl Shared {
    fn apply(&self, batch: &PageBatch) -> Result<(), MigrationError> {
        let zero_hash = zero_page_hash();
        let first_pass = batch.round == 0;
        SCRATCH.with(|s| {
            batch.apply(&mut s.borrow_mut(), |page, data| match data {
                Page::Data(bytes) => {
                    self.memory.write_page(page, bytes);
                    self.hashes.set(page, page_hash(bytes));
                }
                Page::Placed => {
                    let hash = self.memory.with_pages(page, 1, page_hash);
                    self.hashes.set(page, hash);
                }
                Page::Zero => {
                    // Round 0 is every page's first copy and fresh memory is
                    // zero: leave zero pages unbacked.
                    if !first_pass {
                        self.memory.zero_page(page);
                    }
                    self.hashes.set(page, zero_hash);
                }
            })
        })?;
        let pages = u64::from(batch.page_count());
        let nonzero = u64::from(batch.nonzero_pages());
        let (raw, compressed) = if batch.codec == CodecId::None {
            (nonzero, 0)
        } else {
            (0, nonzero)
        };
        self.counts.add(pages, pages - nonzero, raw, compressed);
        Ok(())
    }
}

/// Frames of another session on a channel end it.
fn check_session(sh: &Shared, ch: u16, header: &Header) -> Result<(), MigrationError> {
    if header.session_id != sh.session_id {
        return Err(MigrationError::Protocol(format!(
            "frame for session {:016x} on channel {ch} of session {:016x}",
            header.session_id, sh.session_id
        )));
    }
    Ok(())
}

/// Where a batch's message id stands. Each id is applied once: a batch sent
/// again after its channel failed (flagged as a resend) is applied only if
/// its first copy never arrived, and acknowledged either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Claim {
    /// Its pages are being read into guest memory on this connection.
    Receiving { chan: u16, gen: u32 },
    /// Received whole and being applied.
    Applying,
    /// Applied (in this round).
    Done { round: u32 },
}

impl Shared {
    /// Claims a batch's id for this connection. `Ok(true)`: new, apply it;
    /// `Ok(false)`: a resend of an id already here; a duplicate id without
    /// the resend flag is an error.
    fn claim(&self, h: &Header, state: Claim) -> Result<bool, MigrationError> {
        let mut claims = self.claims.lock().unwrap();
        if let std::collections::hash_map::Entry::Vacant(e) = claims.entry(h.message_id) {
            e.insert(state);
            return Ok(true);
        }
        if h.flags & FLAG_RESEND == 0 {
            return Err(MigrationError::Protocol(format!(
                "duplicate message id {} on channel {} (not marked as a resend)",
                h.message_id, h.channel
            )));
        }
        Ok(false)
    }

    fn set_claim(&self, id: u64, state: Option<Claim>) {
        let mut claims = self.claims.lock().unwrap();
        match state {
            Some(s) => claims.insert(id, s),
            None => claims.remove(&id),
        };
        drop(claims);
        self.claims_changed.notify_waiters();
    }

    /// Settles a resend of `id`: waits while another connection still holds
    /// its first copy (stopping that connection, which the source has given
    /// up on, if it is stuck reading it). `Ok(true)`: the first copy never
    /// landed, apply this one; `Ok(false)`: it is applied, acknowledge only.
    async fn settle_resend(&self, id: u64) -> Result<bool, MigrationError> {
        loop {
            let changed = self.claims_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let holder = {
                let mut claims = self.claims.lock().unwrap();
                match claims.get(&id).copied() {
                    None => {
                        claims.insert(id, Claim::Applying);
                        return Ok(true);
                    }
                    Some(Claim::Done { .. }) => return Ok(false),
                    Some(Claim::Applying) => None,
                    Some(Claim::Receiving { chan, gen }) => Some((chan, gen)),
                }
            };
            if let Some((chan, gen)) = holder {
                self.stop_channel(chan, gen);
            }
            tokio::select! {
                _ = self.cancel.cancelled() => return Err(MigrationError::Cancelled),
                _ = &mut changed => {}
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    }

    /// Stops connection `gen` of channel `chan` (replaced or given up on).
    fn stop_channel(&self, chan: u16, gen: u32) {
        if let Some(c) = self.chans.lock().unwrap().get(&chan) {
            if c.gen == gen {
                c.stop.cancel();
            }
        }
    }

    /// Forgets what a connection that ended was reading.
    fn release(&self, chan: u16, gen: u32) {
        self.claims
            .lock()
            .unwrap()
            .retain(|_, c| *c != Claim::Receiving { chan, gen });
        self.claims_changed.notify_waiters();
    }

    /// Injects the configured fault if it is for `point` (once).
    fn fault_at(&self, point: FaultPoint) -> Result<(), MigrationError> {
        if !self.fault_armed.load(Ordering::Relaxed) {
            return Ok(());
        }
        let fault = {
            let mut f = self.fault.lock().unwrap();
            match *f {
                Some(x) if x.point == point => {
                    self.fault_armed.store(false, Ordering::Relaxed);
                    f.take()
                }
                _ => None,
            }
        };
        let Some(fault) = fault else { return Ok(()) };
        match fault.kind {
            FaultKind::Reset => {}
            FaultKind::Abort => {
                tracing::warn!(?point, "injected fault: giving up on the session");
                return Err(MigrationError::Resources(format!(
                    "injected fault at {point:?}"
                )));
            }
            kind => {
                super::fault::strike_process(kind);
                return Ok(());
            }
        }
        // Every connection closes with an RST; the session takes rebinds.
        tracing::warn!(
            ?point,
            "injected fault: resetting every channel of the session"
        );
        let chans: Vec<DestChan> = self.chans.lock().unwrap().drain().map(|(_, c)| c).collect();
        for c in chans {
            super::fault::linger_zero(c.fd);
            c.stop.cancel();
        }
        Ok(())
    }

    /// Drops a lost connection from the channels replies may use.
    fn forget_channel(&self, chan: u16, gen: u32) {
        let mut chans = self.chans.lock().unwrap();
        if chans.get(&chan).is_some_and(|c| c.gen == gen) {
            chans.remove(&chan);
        }
    }

    /// Sends a reply on channel `on` if it is up, else on any channel that is.
    async fn reply(&self, on: u16, msg: &Message) -> Result<(), MigrationError> {
        let mut order: Vec<(u16, Arc<tokio::sync::Mutex<FrameWriter>>)> = {
            let chans = self.chans.lock().unwrap();
            chans.iter().map(|(&i, c)| (i, c.writer.clone())).collect()
        };
        order.sort_by_key(|&(i, _)| (i != on, i));
        let mut last = MigrationError::ChannelLost {
            channel: on,
            why: "no channel is up to reply on".into(),
        };
        for (_, w) in order {
            let header = Header {
                session_id: self.session_id,
                message_id: self.next_msg.fetch_add(1, Ordering::Relaxed),
                ..Header::new(msg.command())
            };
            match w.lock().await.send(header, msg).await {
                Ok(()) => return Ok(()),
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}

async fn channel_task(
    sh: Arc<Shared>,
    ch: u16,
    gen: u32,
    mut rd: FrameReader,
    wr: Arc<tokio::sync::Mutex<FrameWriter>>,
    stop: CancellationToken,
) {
    let result: Result<(), MigrationError> = async {
        loop {
            // A placed batch's pages land in guest memory: check the session,
            // the state and that this id is new before the first byte does.
            let accept = |h: &Header, b: &PageBatch| {
                check_session(&sh, ch, h)?;
                sh.machine.lock().unwrap().check_batch(b.round)?;
                sh.fault_at(FaultPoint::BeforeRound0)?;
                sh.claim(h, Claim::Receiving { chan: ch, gen })
            };
            let received = tokio::select! {
                biased;
                _ = stop.cancelled() => return Ok(()),
                f = rd.read_placing(&sh.memory, sh.limits, accept) => f?,
            };
            let (header, batch, fresh) = match received {
                None => return Err(MigrationError::PeerClosed { channel: ch }),
                Some(Received::Placed(header, batch)) => {
                    sh.set_claim(header.message_id, Some(Claim::Applying));
                    (header, batch, true)
                }
                Some(Received::Frame(frame)) if frame.header.command == Command::PageBatch => {
                    check_session(&sh, ch, &frame.header)?;
                    let batch = PageBatch::decode(frame.payload, sh.limits)?;
                    sh.machine.lock().unwrap().check_batch(batch.round)?;
                    sh.fault_at(FaultPoint::BeforeRound0)?;
                    let h = frame.header;
                    let fresh =
                        sh.claim(&h, Claim::Applying)? || sh.settle_resend(h.message_id).await?;
                    (h, batch, fresh)
                }
                Some(Received::Frame(frame)) => {
                    check_session(&sh, ch, &frame.header)?;
                    let msg = Message::decode(&frame.header, frame.payload, sh.limits)?;
                    match msg {
                        Message::Echo(e) => {
                            let header = Header {
                                session_id: sh.session_id,
                                message_id: sh.next_msg.fetch_add(1, Ordering::Relaxed),
                                ..Header::new(Command::EchoResponse)
                            };
                            wr.lock()
                                .await
                                .send(header, &Message::EchoResponse(e))
                                .await?;
                        }
                        Message::RoundEnd(_)
                        | Message::Switchover(_)
                        | Message::Go
                        | Message::Abort(_) => {
                            let _ = sh.events.send(Event::Control(frame.header, msg));
                        }
                        other => {
                            return Err(MigrationError::Protocol(format!(
                                "unexpected {:?} on channel {ch}",
                                other.command()
                            )))
                        }
                    }
                    continue;
                }
            };
            let pages = batch.page_count();
            if fresh {
                let round = batch.round;
                // Raw pages are a hash (placed) or a copy and a hash: cheaper
                // here than a hop to the blocking pool. Decompression goes to
                // the pool.
                let applied = if batch.codec == CodecId::None {
                    sh.apply(&batch)
                } else {
                    let sh2 = sh.clone();
                    tokio::task::spawn_blocking(move || sh2.apply(&batch))
                        .await
                        .map_err(|e| MigrationError::Protocol(format!("apply task failed: {e}")))?
                };
                if let Err(e) = applied {
                    sh.set_claim(header.message_id, None);
                    return Err(e);
                }
                sh.set_claim(header.message_id, Some(Claim::Done { round }));
                if round == 0
                    && sh.fault_armed.load(Ordering::Relaxed)
                    && sh.counts.snapshot().total * 2 >= sh.limits.guest_pages
                {
                    sh.fault_at(FaultPoint::MidRound)?;
                }
            }
            let ack_header = Header {
                credit_grant: 1,
                message_id: sh.next_msg.fetch_add(1, Ordering::Relaxed),
                session_id: sh.session_id,
                ..Header::new(Command::BatchAck)
            };
            let ack = Message::BatchAck(BatchAck {
                message_id: header.message_id,
                pages,
            });
            tokio::select! {
                biased;
                _ = stop.cancelled() => return Ok(()),
                r = async { wr.lock().await.send(ack_header, &ack).await } => r?,
            }
        }
    }
    .await;
    sh.release(ch, gen);
    if let Err(e) = result {
        if !sh.cancel.is_cancelled() && !stop.is_cancelled() {
            let _ = sh.events.send(Event::Failed(ch, gen, e));
        }
    }
}

/// Answers a proven bind with the channel's credits and the destination's
/// proof; the connection then counts into the session's received bytes.
async fn answer_bind(
    b: Bind,
    sh: &Shared,
    credits: u16,
    rx_bytes: &Arc<AtomicU64>,
) -> Result<(u16, FrameReader, FrameWriter), MigrationError> {
    let Bind {
        channel,
        mut reader,
        mut writer,
        proof,
    } = b;
    reader.share_counter(rx_bytes.clone());
    let header = Header {
        session_id: sh.session_id,
        channel,
        credit_grant: credits,
        message_id: sh.next_msg.fetch_add(1, Ordering::Relaxed),
        ..Header::new(Command::ChannelBindResponse)
    };
    writer
        .send(
            header,
            &Message::ChannelBindResponse(ChannelBindResponse { proof }),
        )
        .await?;
    Ok((channel, reader, writer))
}

/// What the session controller counts.
#[derive(Default)]
struct Tally {
    session_id: u64,
    memory_bytes: u64,
    channels: u16,
    codec: String,
    max_bandwidth: Option<u64>,
    setup: Option<Duration>,
    paused_at: Option<Instant>,
    downtime: Duration,
    verify: VerifyMode,
    verify_time: Duration,
    verified: bool,
    rounds: u32,
    dirty_rate: u64,
    throttle_max: u8,
    source_cpu_ms: Option<f64>,
    guest_kind: Option<GuestKind>,
    counter_at_pause: Option<u64>,
    resumed_at: Option<Instant>,
    finished: Option<Duration>,
    label: Option<SessionLabel>,
    authenticated: bool,
    failures: u32,
    rebinds: u32,
}

struct Session {
    config: ReceiverConfig,
    ctx: RunContext,
    sessions: Sessions,
    rx_bytes: Arc<AtomicU64>,
    /// Channel 0's TLS keying material (empty when plain).
    binding: Vec<u8>,
}

impl Session {
    fn new(
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

    async fn run(
        mut self,
        at: Instant,
        peer: SocketAddr,
        reader: FrameReader,
        writer: FrameWriter,
        negotiate: crate::wire::Negotiate,
        binding: Vec<u8>,
    ) -> Incoming {
        self.binding = binding;
        let mut tally = Tally::default();
        let mut shared: Option<Arc<Shared>> = None;
        let mut guest: Option<Arc<dyn MigratableGuest>> = None;
        let cancel = self.ctx.cancel.child_token();
        let result = self
            .drive(
                peer,
                reader,
                writer,
                negotiate,
                &mut tally,
                &mut shared,
                &mut guest,
                &cancel,
                at,
            )
            .await;
        cancel.cancel();
        self.sessions.lock().unwrap().remove(&tally.session_id);
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
                Some(format!("source cancelled: {message}")),
            ),
            Err(e) => (Outcome::Failed, Some(e.to_string())),
        };
        match &result {
            Ok(()) => {
                tracing::info!(%peer, session = format!("{:016x}", tally.session_id), "incoming migration completed")
            }
            Err(e) => {
                tracing::warn!(%peer, error = %e, "incoming migration failed; copy discarded")
            }
        }
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
            guest_location: "",
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
            channel_failures: tally.failures,
            batches_resent: 0,
            channel_rebinds: tally.rebinds,
            saved_to: None,
            round_log: Vec::new(),
            memory_use: MemoryUse::measure(shared.as_ref().map(|s| &*s.memory)),
        };
        report.finish_derived();
        Incoming {
            report,
            guest,
            memory: shared.map(|s| s.memory.clone()),
            label: tally.label,
        }
    }

    /// Checks the source's proof of the key, or that this receiver may take
    /// it without one.
    fn authenticate(
        &self,
        peer: SocketAddr,
        setup: &SessionSetup,
        handshake: &super::auth::Handshake,
    ) -> Result<(), MigrationError> {
        match (&self.config.key, &setup.proof) {
            (Some(key), Some(_)) => {
                if super::auth::verify_setup_proof(key, handshake, setup) {
                    Ok(())
                } else {
                    Err(MigrationError::Unauthenticated(
                        "the source's proof of the key is wrong: it holds another key".into(),
                    ))
                }
            }
            (Some(_), None) => Err(MigrationError::Unauthenticated(
                "this receiver requires the shared key and the source proved none (give the source --key)".into(),
            )),
            (None, Some(_)) => Err(MigrationError::Unauthenticated(
                "the source proves a key but this receiver has none to check it (give the receiver --key)".into(),
            )),
            (None, None) => match self.config.unauthenticated {
                Unauthenticated::Anywhere => {
                    tracing::warn!(%peer, "taking an unauthenticated session (--insecure)");
                    Ok(())
                }
                Unauthenticated::Loopback if peer.ip().is_loopback() => {
                    tracing::warn!(%peer, "taking an unauthenticated session from loopback (no --key)");
                    Ok(())
                }
                Unauthenticated::Loopback => Err(MigrationError::Unauthenticated(format!(
                    "unauthenticated session from {peer} refused: without --key this receiver takes loopback peers only (or --insecure)"
                ))),
                Unauthenticated::Refuse => Err(MigrationError::Unauthenticated(
                    "this receiver takes authenticated sessions only".into(),
                )),
            },
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn drive(
        &self,
        peer: SocketAddr,
        mut reader: FrameReader,
        mut writer: FrameWriter,
        negotiate: crate::wire::Negotiate,
        tally: &mut Tally,
        shared_out: &mut Option<Arc<Shared>>,
        guest_out: &mut Option<Arc<dyn MigratableGuest>>,
        cancel: &CancellationToken,
        at: Instant,
    ) -> Result<(), MigrationError> {
        let mut machine = DestMachine::new(self.config.max_memory).hosting_kvm(kvm_here());
        let mut response = match machine.handle_negotiate(&negotiate) {
            Ok(r) => r,
            Err(e) => {
                reject(&mut writer, &e).await;
                return Err(e);
            }
        };
        // A fresh challenge per session: the setup proves the key over it,
        // so a recorded setup cannot be replayed.
        response.nonce = random_bytes::<16>();
        let nonce = response.nonce;
        let source_nonce = negotiate.nonce;
        writer
            .send(
                Header::new(Command::NegotiateResponse),
                &Message::NegotiateResponse(response),
            )
            .await?;
        let handshake = self.config.handshake_timeout;
        let frame = tokio::time::timeout(handshake, reader.read_frame())
            .await
            .map_err(|_| MigrationError::Timeout {
                what: "SESSION_SETUP",
                after: handshake,
            })??
            .ok_or(MigrationError::PeerClosed { channel: 0 })?;
        let setup = match Message::decode(&frame.header, frame.payload, Limits::BEFORE_SETUP)? {
            Message::SessionSetup(s) => s,
            Message::Abort(a) => {
                return Err(MigrationError::RemoteAbort {
                    code: a.code,
                    message: a.message,
                })
            }
            m => {
                let e = MigrationError::Protocol(format!(
                    "expected SESSION_SETUP, got {:?}",
                    m.command()
                ));
                reject(&mut writer, &e).await;
                return Err(e);
            }
        };
        let limits = match machine.handle_setup(&setup) {
            Ok(l) => l,
            Err(e) => {
                reject(&mut writer, &e).await;
                return Err(e);
            }
        };
        tally.label = setup.label.clone();
        let inflight = u64::from(setup.channels) * CHANNEL_MEMORY;
        if inflight > self.config.max_inflight_bytes {
            let e = MigrationError::Resources(format!(
                "{} channels may hold {inflight} bytes of frames in flight, over this receiver's limit of {} bytes",
                setup.channels, self.config.max_inflight_bytes
            ));
            reject(&mut writer, &e).await;
            return Err(e);
        }
        let handshake = super::auth::Handshake {
            source_nonce: &source_nonce,
            dest_nonce: &nonce,
            binding: &self.binding,
        };
        if let Err(e) = self.authenticate(peer, &setup, &handshake) {
            tracing::warn!(%peer, error = %e, "refused a session");
            reject(&mut writer, &e).await;
            return Err(e);
        }
        tally.authenticated = self.config.key.is_some();
        if let Some(admit) = &self.config.admit {
            if let Err(why) = admit(&setup) {
                let e = MigrationError::Resources(why);
                reject(&mut writer, &e).await;
                return Err(e);
            }
        }
        tally.memory_bytes = setup.memory_bytes;
        tally.channels = setup.channels;
        tally.verify = setup.verify;
        tally.guest_kind = Some(setup.guest_kind);
        tally.max_bandwidth = (setup.max_bandwidth > 0).then_some(setup.max_bandwidth);
        tally.codec = match CodecId::from_u8(setup.codec) {
            None if setup.codec == crate::codec::SETUP_CODEC_AUTO => "auto".into(),
            Some(CodecId::Zstd) => format!("zstd:{}", setup.codec_level),
            Some(CodecId::Lz4) => "lz4".into(),
            _ => "none".into(),
        };
        let memory = match GuestMemory::new(setup.memory_bytes) {
            Ok(m) => Arc::new(m),
            Err(e) => {
                let e = MigrationError::Resources(e.to_string());
                reject(&mut writer, &e).await;
                return Err(e);
            }
        };
        let session_id = u64::from_le_bytes(random_bytes::<8>()) | 1;
        let token = random_bytes::<16>();
        tally.session_id = session_id;
        let key = self.config.key.as_ref();
        let (bind_tx, mut bind_rx) = mpsc::unbounded_channel();
        self.sessions.lock().unwrap().insert(
            session_id,
            SessionEntry {
                secret: BindSecret::derive(key, &source_nonce, &nonce, session_id, &token),
                channels: setup.channels,
                nonces: Default::default(),
                tx: bind_tx,
            },
        );
        tracing::info!(%peer, session = format!("{session_id:016x}"), memory = setup.memory_bytes, channels = setup.channels, "incoming migration");
        let (events_tx, mut events) = mpsc::unbounded_channel();
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
            claims: Mutex::new(HashMap::new()),
            claims_changed: tokio::sync::Notify::new(),
            chans: Mutex::new(HashMap::new()),
            fault: Mutex::new(self.config.fault),
            fault_armed: std::sync::atomic::AtomicBool::new(self.config.fault.is_some()),
        });
        *shared_out = Some(sh.clone());
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
                    proof: key
                        .map(|k| super::auth::response_proof(k, &handshake, session_id, &token)),
                }),
            )
            .await?;
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
            tokio::spawn(channel_task(sh.clone(), channel, gen, reader, writer, stop));
        };
        start(0, reader, writer);
        let mut ever_bound = std::collections::HashSet::from([0u16]);
        // Control ids seen, and the last reply with the id it answered: a
        // control message sent again after its channel failed gets the same
        // reply again, and is not acted on twice.
        let mut control_ids = std::collections::HashSet::new();
        let mut last_loss: Option<String> = None;
        let mut last_reply: Option<(u64, Message)> = None;
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
                break Err(MigrationError::Protocol("all channels ended".into()));
            };
            if let Event::Control(h, m) = &ev {
                if !control_ids.insert(h.message_id) {
                    if h.flags & FLAG_RESEND == 0 {
                        break Err(MigrationError::Protocol(format!(
                            "duplicate message id {} ({:?}) on channel {}",
                            h.message_id,
                            m.command(),
                            h.channel
                        )));
                    }
                    if let Some((id, reply)) = &last_reply {
                        if *id == h.message_id {
                            let _ = sh.reply(h.channel, reply).await;
                        }
                    }
                    continue;
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
                        let deadline = tokio::time::sleep(Duration::from_millis(250));
                        tokio::pin!(deadline);
                        let abort = loop {
                            tokio::select! {
                                _ = &mut deadline => break None,
                                next = events.recv() => match next {
                                    Some(Event::Control(_, Message::Abort(a))) => break Some(a),
                                    Some(_) => continue,
                                    None => break None,
                                },
                            }
                        };
                        if let Some(a) = abort {
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
                    sh.claims
                        .lock()
                        .unwrap()
                        .retain(|_, c| !matches!(c, Claim::Done { round } if *round < m.round));
                    if m.final_next {
                        tally.paused_at = Some(Instant::now());
                    }
                }
                Event::Control(h, Message::Switchover(m)) => {
                    if let Err(e) = sh.fault_at(FaultPoint::BeforeReady) {
                        break Err(e);
                    }
                    tally.rounds = m.rounds;
                    tally.dirty_rate = m.dirty_rate_bps;
                    tally.throttle_max = m.throttle_pct_max;
                    tally.source_cpu_ms = Some(m.source_cpu_ms as f64);
                    let t = Instant::now();
                    let digest = match m.verify {
                        VerifyMode::Fast => sh.hashes.digest(),
                        VerifyMode::Full => {
                            let mem = sh.memory.clone();
                            match tokio::task::spawn_blocking(move || full_digest(&mem, 2)).await {
                                Ok(d) => d,
                                Err(e) => {
                                    break Err(MigrationError::Protocol(format!(
                                        "digest task failed: {e}"
                                    )))
                                }
                            }
                        }
                    };
                    tally.verify = m.verify;
                    tally.verify_time = t.elapsed();
                    let ready = sh.machine.lock().unwrap().handle_switchover(&m, digest);
                    let ready = match ready {
                        Ok(r) => r,
                        Err(e) => break Err(e),
                    };
                    // Build the guest now (paused) so GO only has to resume it.
                    match restore_guest(
                        tally.guest_kind.unwrap_or(GuestKind::Sim),
                        sh.memory.clone(),
                        &m.state,
                    ) {
                        Ok(g) => {
                            tally.counter_at_pause = Some(g.progress_counter());
                            *guest_out = Some(g);
                        }
                        Err(e) => break Err(MigrationError::Incompatible(e)),
                    }
                    tally.verified = true;
                    let ready = Message::Ready(ready);
                    last_reply = Some((h.message_id, ready.clone()));
                    if let Err(e) = sh.reply(h.channel, &ready).await {
                        // The source sends SWITCHOVER again once a channel is back.
                        tracing::warn!(error = %e, "could not send READY yet");
                    }
                    if let Err(e) = sh.fault_at(FaultPoint::AfterReady) {
                        break Err(e);
                    }
                }
                Event::Control(h, Message::Go) => {
                    if let Err(e) = sh.machine.lock().unwrap().handle_go() {
                        break Err(e);
                    }
                    // The guest is ours now, whatever happens to the connection.
                    let guest = guest_out.as_ref().expect("guest restored before READY");
                    if !leave_paused {
                        guest.resume();
                        tally.resumed_at = Some(Instant::now());
                    }
                    if let Some(p) = tally.paused_at {
                        tally.downtime = p.elapsed();
                    }
                    if let Some(on_go) = &self.config.on_go {
                        on_go(tally.label.as_ref(), guest, !leave_paused);
                    }
                    if let Err(e) = sh.fault_at(FaultPoint::AfterGo) {
                        break Err(e);
                    }
                    let complete = Message::Complete(Complete {
                        destination_cpu_ms: self.ctx.cpu.total().as_millis() as u64,
                        resumed: !leave_paused,
                    });
                    last_reply = Some((h.message_id, complete.clone()));
                    if let Err(e) = sh.reply(h.channel, &complete).await {
                        tracing::warn!(error = %e, "could not acknowledge GO; the guest runs here regardless");
                    }
                    tally.finished = Some(at.elapsed());
                    break Ok(());
                }
                Event::Control(h, m) => {
                    break Err(MigrationError::Protocol(format!(
                        "unexpected {:?} on channel {}",
                        m.command(),
                        h.channel
                    )))
                }
            }
        };
        if result.is_ok() {
            // The source ends the session: wait (briefly) for it to close its
            // channels so our closing does not race its reading COMPLETE, and
            // answer a GO it sends again (its channel failed) with COMPLETE.
            let linger = tokio::time::sleep(Duration::from_secs(5));
            tokio::pin!(linger);
            loop {
                tokio::select! {
                    _ = &mut linger => break,
                    b = bind_rx.recv() => {
                        // A channel rebinding to send GO again.
                        let Some(b) = b else { continue };
                        if let Ok((channel, reader, writer)) = answer_bind(b, &sh, credits, &self.rx_bytes).await {
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
                            if let Some((_, reply)) = &last_reply {
                                let _ = sh.reply(h.channel, reply).await;
                            }
                        }
                        Some(_) => continue,
                    },
                }
            }
        }
        if let Err(e) = &result {
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
        result
    }
}

/// Whether this host runs KVM guests, asked once per process.
fn kvm_here() -> bool {
    static KVM: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *KVM.get_or_init(|| super::kvm_unavailable().is_none())
}
