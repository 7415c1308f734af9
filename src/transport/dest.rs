//! The destination driver: accepts sessions and channel binds, applies page
//! batches, verifies the digest and takes the guest over on GO.
//!
//! Every accepted connection's first frame says what it is: NEGOTIATE opens a
//! session, CHANNEL_BIND joins one by id and token. Each channel's task reads
//! frames, applies batches on the blocking pool and acknowledges them with one
//! more credit; control messages go to the session's controller, which drives
//! the [`DestMachine`].

use super::accept::Admitted;
use super::gate::{Handshakes, ReceiverStats};
use super::progress::RunContext;
use crate::codec::CodecId;
use crate::digest::{full_digest, page_hash, zero_page_hash, PageHashes};
use crate::memory::GuestMemory;
use crate::migration::auth::{random_bytes, BindSecret, SessionKey};
use crate::migration::dest_ledger::{BatchLedger, Claim, Claimed, ControlLog, Seen, Settle};
use crate::migration::dest_state::{DestMachine, DestState};
#[cfg(feature = "faults")]
use crate::migration::fault::FaultKind;
use crate::migration::fault::{Fault, FaultPoint};
use crate::migration::report::{
    round3, CpuMs, MemoryUse, Outcome, PageCounter, PageCounts, Report, Side,
};
use crate::migration::{restore_guest, MigratableGuest, MigrationError, DEFAULT_INITIAL_CREDITS};
use crate::transport::{FrameReader, FrameWriter, Received};
use crate::wire::{
    Abort, BatchAck, ChannelBindResponse, Command, Complete, GuestKind, Header, Limits, Message,
    Page, PageBatch, SessionLabel, SessionSetup, SessionSetupResponse, VerifyMode, FLAG_RESEND,
    SETUP_FRAME_MAC, SETUP_LEAVE_PAUSED,
};
use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long an ended session waits for its connections' tasks to stop.
const CHANNELS_END_WAIT: Duration = Duration::from_secs(5);

/// Memory one channel of a session may hold at once: a frame being read and
/// a batch's decompressed pages.
pub const CHANNEL_MEMORY: u64 = crate::wire::MAX_FRAME_LEN as u64
    + crate::wire::MAX_PAGES_PER_BATCH as u64 * crate::memory::PAGE_SIZE as u64;

/// Decides whether a session may start, from its id and setup, once its peer
/// has proved the key (an agent checks that it takes VMs, has the memory,
/// and hosts none of that name); `Err(reason)` refuses it before any memory
/// is allocated. A session it admits always ends in an [`Incoming`] with
/// that id, so whatever the admission recorded can be settled by it.
pub type AdmitFn = Arc<dyn Fn(u64, &SessionSetup) -> Result<(), String> + Send + Sync>;

/// Told at GO, the moment a guest runs (or waits paused) here: its session's
/// id and label, the guest, and whether it was resumed. The session's report
/// follows when the session ends.
pub type OnGoFn =
    Arc<dyn Fn(u64, Option<&SessionLabel>, &Arc<dyn MigratableGuest>, bool) + Send + Sync>;

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
    /// Connections whose peer has not proved the key yet (in TLS, their
    /// first frame or the session handshake). When all are taken, a new
    /// connection evicts the oldest of the peer address holding the most,
    /// so a flood of silent connections cannot lock sources out. Memory:
    /// each holds at most a 4 KiB buffer and an 8 KiB frame. Default: 256.
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
            idle_timeout: crate::migration::DEFAULT_PEER_TIMEOUT,
            admit: None,
            on_go: None,
            key: None,
            unauthenticated: Unauthenticated::default(),
            fault: None,
            handshake_timeout: Duration::from_secs(10),
            max_sessions: 16,
            max_pending: 256,
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
    /// Who the session was for, as its setup said (agents' migrations);
    /// kept only once the session was proved and admitted.
    pub label: Option<SessionLabel>,
    /// The session's id (0 when it was refused before it had one).
    pub session_id: u64,
    /// Whether the session was admitted: a migration that ran here,
    /// completed or failed. `false`: its proved peer was refused in the
    /// handshake (too large, at the session limit, not admitted).
    pub admitted: bool,
    /// The session's slot, held until this report is handed to the
    /// receiver's owner, so a session counts as under way until then.
    pub(super) slot: Option<super::accept::Slot>,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("report", &self.report)
            .finish()
    }
}

pub(super) struct Bind {
    pub(super) channel: u16,
    pub(super) reader: FrameReader,
    pub(super) writer: FrameWriter,
    /// The destination's proof for the CHANNEL_BIND_RESPONSE.
    pub(super) proof: [u8; 32],
    /// The key of the frames this side sends on it after the response, when
    /// the session's frames are authenticated (its reader's is set).
    pub(super) send_key: Option<[u8; 32]>,
}

pub(super) struct SessionEntry {
    pub(super) secret: BindSecret,
    pub(super) channels: u16,
    /// Bind nonces already used: each proves one bind only.
    pub(super) nonces: std::collections::HashSet<[u8; 16]>,
    pub(super) tx: mpsc::UnboundedSender<Bind>,
    /// Whether its frames are authenticated (keyed, without TLS).
    pub(super) frame_mac: bool,
}

pub(super) type Sessions = Arc<Mutex<HashMap<u64, SessionEntry>>>;

/// Listens for migrations.
pub struct Receiver {
    listener: TcpListener,
    config: ReceiverConfig,
    stats: Arc<ReceiverStats>,
    /// Sessions proved and holding a slot now.
    session_count: Arc<std::sync::atomic::AtomicUsize>,
}

impl Receiver {
    /// Binds the listening socket.
    pub async fn bind(addr: &str, config: ReceiverConfig) -> std::io::Result<Self> {
        Ok(Self {
            listener: TcpListener::bind(addr).await?,
            config,
            stats: Arc::default(),
            session_count: Arc::default(),
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Its counters of refused connections and sessions.
    pub fn stats(&self) -> Arc<ReceiverStats> {
        self.stats.clone()
    }

    /// Accepts sessions until `ctx.cancel` fires, sending each finished one
    /// whose peer proved the key to `done`. Sessions run concurrently.
    pub async fn serve(self, ctx: RunContext, done: mpsc::UnboundedSender<Incoming>) {
        let rx = Arc::new(super::accept::Shared {
            handshakes: Handshakes::new(self.config.max_pending),
            config: self.config,
            sessions: Arc::default(),
            session_count: self.session_count,
            stats: self.stats,
        });
        super::accept::serve(self.listener, rx, ctx, done).await
    }

    /// Serves until one migration ends (a session admitted here, completed
    /// or failed) and returns it. Sessions refused before their admission do
    /// not count.
    pub async fn receive_one(self, ctx: RunContext) -> Option<Incoming> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let stop = ctx.cancel.child_token();
        let serve_ctx = RunContext {
            cancel: stop.clone(),
            ..ctx.clone()
        };
        let in_flight = self.session_count.clone();
        let server = tokio::spawn(self.serve(serve_ctx, tx));
        let got = loop {
            tokio::select! {
                biased;
                r = rx.recv() => match r {
                    Some(i) if !i.admitted => continue,
                    other => break other,
                },
                _ = ctx.cancel.cancelled() => {
                    // Sessions under way end cancelled at once: report theirs.
                    let wait = async {
                        loop {
                            // A session hands its report over, then frees its
                            // slot: with none under way, every report is here.
                            let none_left = in_flight.load(Ordering::Acquire) == 0;
                            while let Ok(i) = rx.try_recv() {
                                if i.admitted {
                                    return Some(i);
                                }
                            }
                            if none_left {
                                return None;
                            }
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    };
                    break tokio::time::timeout(Duration::from_secs(2), wait)
                        .await
                        .ok()
                        .flatten();
                }
            }
        };
        stop.cancel();
        let _ = server.await;
        got
    }
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
    /// For an injected reset (the `faults` feature).
    #[cfg_attr(not(feature = "faults"), allow(dead_code))]
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
    claims: Mutex<BatchLedger>,
    claims_changed: tokio::sync::Notify,
    /// Channels up now.
    chans: Mutex<HashMap<u16, DestChan>>,
    /// The fault to inject, until it has been; `fault_armed` keeps the
    /// per-batch checks to one load when there is none (always, but in tests).
    #[cfg_attr(not(feature = "faults"), allow(dead_code))]
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
                // Hashed as it was read and CRC-checked (read_placing).
                Page::Placed => {}
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

impl Shared {
    /// Claims a batch's id for this connection if it is new.
    fn claim(&self, h: &Header, state: Claim) -> Result<Claimed, MigrationError> {
        self.claims.lock().unwrap().claim(h, state)
    }

    fn set_claim(&self, id: u64, state: Option<Claim>) {
        self.claims.lock().unwrap().set(id, state);
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
            let settled = self.claims.lock().unwrap().settle(id);
            match settled {
                Settle::Apply => return Ok(true),
                Settle::AckOnly => return Ok(false),
                Settle::Wait(None) => {}
                Settle::Wait(Some((chan, gen))) => self.stop_channel(chan, gen),
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
        self.claims.lock().unwrap().release(chan, gen);
        self.claims_changed.notify_waiters();
    }

    /// Without the `faults` feature there is nothing to inject.
    #[cfg(not(feature = "faults"))]
    fn fault_at(&self, _point: FaultPoint) -> Result<(), MigrationError> {
        Ok(())
    }

    /// Injects the configured fault if it is for `point` (once).
    #[cfg(feature = "faults")]
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
                crate::migration::fault::strike_process(kind);
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
            crate::migration::fault::linger_zero(c.fd);
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
            // What the claim said of a batch not placed, which then comes
            // back whole: claimed once, not twice.
            let verdict = Mutex::new(None);
            let accept = |h: &Header, b: &PageBatch| {
                check_session(&sh, ch, h)?;
                sh.fault_at(FaultPoint::BeforeRound0)?;
                match sh.claim(h, Claim::Receiving { chan: ch, gen })? {
                    Claimed::New => {
                        sh.machine.lock().unwrap().check_batch(b.round)?;
                        Ok(true)
                    }
                    other => {
                        *verdict.lock().unwrap() = Some(other);
                        Ok(false)
                    }
                }
            };
            let received = tokio::select! {
                biased;
                _ = stop.cancelled() => return Ok(()),
                f = rd.read_placing(&sh.memory, sh.limits, accept, |page, bytes| {
                    sh.hashes.set(page, page_hash(bytes))
                }) => f?,
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
                    let h = frame.header;
                    let claimed = match verdict.lock().unwrap().take() {
                        Some(c) => c,
                        None => {
                            sh.fault_at(FaultPoint::BeforeRound0)?;
                            sh.claim(&h, Claim::Applying)?
                        }
                    };
                    let fresh = match claimed {
                        Claimed::New => true,
                        Claimed::Repeat => sh.settle_resend(h.message_id).await?,
                        Claimed::Stale => false,
                    };
                    if fresh {
                        sh.machine.lock().unwrap().check_batch(batch.round)?;
                    }
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
        send_key,
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
    if let Some(key) = send_key {
        writer.authenticate(key);
    }
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
    frames_authenticated: bool,
    failures: u32,
    rebinds: u32,
}

impl Tally {
    /// The figures an admitted session starts with.
    fn of(a: &Admitted) -> Self {
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
                Some(CodecId::Lz4) => "lz4".into(),
                _ => "none".into(),
            },
            // Kept only now that the session is proved and admitted.
            label: setup.label.clone(),
            authenticated: a.proved_key,
            ..Self::default()
        }
    }
}

pub(super) struct Session {
    config: ReceiverConfig,
    ctx: RunContext,
    sessions: Sessions,
    rx_bytes: Arc<AtomicU64>,
    /// Channel 0's TLS keying material (empty when plain).
    binding: Vec<u8>,
}

/// What a session leaves for its report.
struct Ending {
    slot: Option<super::accept::Slot>,
    tally: Tally,
    shared: Option<Arc<Shared>>,
    guest: Option<Arc<dyn MigratableGuest>>,
    result: Result<(), MigrationError>,
    admitted: bool,
}

impl Session {
    pub(super) fn new(
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
    pub(super) async fn run(
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
        self.sessions.lock().unwrap().remove(&tally.session_id);
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

    /// The report of a session whose proved peer was refused in its
    /// handshake; `admitted` names it when the admission had taken it.
    pub(super) async fn refused(
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

    async fn finish(self, at: Instant, ending: Ending) -> Incoming {
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
        };
        report.finish_derived();
        Incoming {
            report,
            guest,
            memory: shared.map(|s| s.memory.clone()),
            label: tally.label,
            session_id: tally.session_id,
            admitted,
            slot,
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn drive(
        &self,
        peer: SocketAddr,
        mut reader: FrameReader,
        mut writer: FrameWriter,
        admitted: Admitted,
        tally: &mut Tally,
        shared_out: &mut Option<Arc<Shared>>,
        guest_out: &mut Option<Arc<dyn MigratableGuest>>,
        (cancel, tasks): (&CancellationToken, &TaskTracker),
        at: Instant,
    ) -> Result<(), MigrationError> {
        let token = random_bytes::<16>();
        let secret = super::accept::bind_secret(&self.config, &admitted, &token);
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
        let (bind_tx, mut bind_rx) = mpsc::unbounded_channel();
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
            claims: Mutex::new(BatchLedger::default()),
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
                break Err(MigrationError::Protocol("all channels ended".into()));
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
                    sh.claims.lock().unwrap().round_began(m.round);
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
                    control.replied(h.message_id, &ready);
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
                        on_go(tally.session_id, tally.label.as_ref(), guest, !leave_paused);
                    }
                    if let Err(e) = sh.fault_at(FaultPoint::AfterGo) {
                        break Err(e);
                    }
                    let complete = Message::Complete(Complete {
                        destination_cpu_ms: self.ctx.cpu.total().as_millis() as u64,
                        resumed: !leave_paused,
                    });
                    control.replied(h.message_id, &complete);
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
                            if let Some(reply) = control.last_reply() {
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
pub(super) fn kvm_here() -> bool {
    static KVM: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *KVM.get_or_init(|| crate::migration::kvm_unavailable().is_none())
}
