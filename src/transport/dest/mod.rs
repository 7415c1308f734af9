//! The destination driver: accepts sessions and channel binds, applies page
//! batches, verifies the digest and takes the guest over on GO.
//!
//! Every accepted connection's first frame says what it is: NEGOTIATE opens a
//! session, CHANNEL_BIND joins one by id and token. Each channel's task reads
//! frames, applies batches on the blocking pool and acknowledges them with one
//! more credit; control messages go to the session's controller, which drives
//! the [`DestMachine`].

use super::gate::{Handshakes, ReceiverStats};
use super::progress::RunContext;
use crate::memory::GuestMemory;
use crate::migration::auth::{BindSecret, SessionKey};
use crate::migration::dest_session::Completed;
use crate::migration::fault::Fault;
use crate::migration::report::Report;
use crate::migration::{MigratableGuest, DEFAULT_INITIAL_CREDITS};
use crate::transport::{FrameReader, FrameWriter};
use crate::wire::ChannelId;
use crate::wire::{SessionLabel, SessionSetup};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;

mod channel;
mod control;
mod drive;
mod late;
mod prefill;
mod session;
mod shared;

use channel::*;
use control::*;
pub(super) use late::serve_completed;
pub(super) use session::Session;
use session::*;
use shared::*;

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

/// Finds the image a session's setup offers as its base (a failback by
/// delta): called once the session is proved and admitted, and only for a
/// labelled setup with a base. `Err(reason)`: this receiver does not hold
/// it, and the session sends every page.
pub type BaseFn = Arc<dyn Fn(&SessionSetup) -> Result<BaseImage, String> + Send + Sync>;

#[cfg(feature = "fuzzing")]
pub(crate) use prefill::prefill;
pub use prefill::BaseImage;

pub use crate::migration::handshake::Unauthenticated;

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
    /// Where offered delta bases are looked for (agents' retained images).
    /// Default: none (every session sends every page).
    pub delta_base: Option<BaseFn>,
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
    /// Kept zstd streams decoded at once over all sessions, each holding a
    /// 16 MiB window: a connection whose stream would pass it ends its
    /// session. With a limit of 0 the codec is not offered. Default: 32
    /// (about 520 MiB).
    pub kept_streams: StreamBudget,
}

/// How many kept zstd streams a receiver decodes at once; clones share the
/// count.
#[derive(Debug, Clone)]
pub struct StreamBudget {
    limit: usize,
    used: Arc<std::sync::atomic::AtomicUsize>,
}

impl StreamBudget {
    /// At most `limit` at once.
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            used: Default::default(),
        }
    }

    /// The limit.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Streams held now.
    pub fn used(&self) -> usize {
        self.used.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// One stream's share, until dropped; `None` at the limit.
    pub(crate) fn take(&self) -> Option<StreamPermit> {
        use std::sync::atomic::Ordering;
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.limit).then_some(n + 1)
            })
            .ok()
            .map(|_| StreamPermit(self.used.clone()))
    }
}

impl Default for StreamBudget {
    fn default() -> Self {
        Self::new(32)
    }
}

/// A kept stream's share of its receiver's [`StreamBudget`].
#[derive(Debug)]
pub(crate) struct StreamPermit(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for StreamPermit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl std::fmt::Debug for ReceiverConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReceiverConfig")
            .field("max_memory", &self.max_memory)
            .field("initial_credits", &self.initial_credits)
            .field("idle_timeout", &self.idle_timeout)
            .field("admit", &self.admit.is_some())
            .field("delta_base", &self.delta_base.is_some())
            .field("key", &self.key)
            .field("unauthenticated", &self.unauthenticated)
            .field("fault", &self.fault)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("max_sessions", &self.max_sessions)
            .field("max_pending", &self.max_pending)
            .field("max_inflight_bytes", &self.max_inflight_bytes)
            .field("tls", &self.tls.is_some())
            .field("resume_check", &self.resume_check)
            .field("kept_streams", &self.kept_streams.limit())
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
            delta_base: None,
            key: None,
            unauthenticated: Unauthenticated::default(),
            fault: None,
            handshake_timeout: Duration::from_secs(10),
            max_sessions: 16,
            max_pending: 256,
            max_inflight_bytes: 64 * CHANNEL_MEMORY,
            tls: None,
            resume_check: None,
            kept_streams: StreamBudget::default(),
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
    /// Each page's hash as it arrived, when the migration completed: what a
    /// later failback offers as its base.
    pub hashes: Option<Arc<[u64]>>,
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
    pub(super) channel: ChannelId,
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
    pub(super) route: Route,
    /// Whether its frames are authenticated (keyed, without TLS).
    pub(super) frame_mac: bool,
}

/// Where a proved bind goes.
pub(super) enum Route {
    /// To the session, which runs.
    Live(mpsc::UnboundedSender<Bind>),
    /// To a task of its own that answers a GO sent again with what the
    /// completed session left, until the record expires: one connection
    /// per channel (a new bind of a channel stops the one before it), so a
    /// record holds at most the session's channel count of them.
    Completed(
        Box<Completed>,
        HashMap<ChannelId, tokio_util::sync::CancellationToken>,
    ),
}

impl SessionEntry {
    /// Whether it is a record past its time at `now`.
    pub(super) fn expired(&self, now: std::time::Instant) -> bool {
        matches!(&self.route, Route::Completed(c, _) if c.expired(now))
    }
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

/// Whether this host runs KVM guests, asked once per process.
pub(super) fn kvm_here() -> bool {
    static KVM: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *KVM.get_or_init(|| crate::migration::kvm_unavailable().is_none())
}
