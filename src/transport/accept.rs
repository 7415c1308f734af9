//! A receiver's connections up to their proof: TLS, the first frame, the
//! session handshake (negotiate, setup, the key's proof, the session slot,
//! admission) and channel binds. Nothing here is kept for a peer that has not
//! proved the key: no session slot, no record, no label, no report, and no
//! frame larger than the handshake needs ([`HANDSHAKE_MAX_PAYLOAD`]).
//!
//! [`HANDSHAKE_MAX_PAYLOAD`]: crate::transport::HANDSHAKE_MAX_PAYLOAD

use super::dest::{serve_completed, Bind, ReceiverConfig, Session, Sessions, Unauthenticated};
use super::gate::{Handshakes, ReceiverStats, Refusal, Ticket};
use super::progress::RunContext;
use super::Incoming;
use crate::memory::GuestMemory;
use crate::migration::auth::{random_bytes, BindSecret};
use crate::migration::dest_state::DestMachine;
use crate::migration::MigrationError;
use crate::migration::{Mismatch, Shortfall, Violation};
use crate::transport::{Conn, FrameReader, FrameWriter};
use crate::wire::ChannelId;
use crate::wire::{Abort, Command, Header, Limits, Message, Negotiate, SessionLabel, SessionSetup};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

mod bind;
mod handshake;

pub(super) use bind::bind_secret;
use bind::route_bind;
use handshake::session_handshake;

/// How long a receiver that stops serving waits for its sessions to end.
const SESSIONS_END_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// What every connection of one receiver shares.
pub(super) struct Shared {
    pub(super) config: ReceiverConfig,
    pub(super) sessions: Sessions,
    pub(super) session_count: Arc<AtomicUsize>,
    pub(super) handshakes: Arc<Handshakes>,
    pub(super) stats: Arc<ReceiverStats>,
}

/// One unit of a counted limit, given back on drop.
pub(super) struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(count: &Arc<AtomicUsize>, limit: usize) -> Option<Self> {
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

/// A session past its proof and admission.
pub(super) struct Admitted {
    pub(super) machine: DestMachine,
    pub(super) setup: SessionSetup,
    pub(super) limits: Limits,
    pub(super) memory: Arc<GuestMemory>,
    pub(super) session_id: u64,
    pub(super) source_nonce: [u8; 16],
    pub(super) nonce: [u8; 16],
    /// What NEGOTIATE and its answer said (`auth::negotiation`).
    pub(super) negotiation: [u8; crate::migration::auth::NEGOTIATION_LEN],
    /// Whether its peer proved the key (rather than being taken without one).
    pub(super) proved_key: bool,
    /// Its place among the receiver's sessions (taken by the session to
    /// hold until its report is handed over).
    pub(super) slot: Option<Slot>,
}

/// A session refused during its handshake.
pub(super) struct Refused {
    pub(super) error: MigrationError,
    /// What to count it as (`None`: the source gave up itself).
    why: Option<Refusal>,
    /// Whether its peer proved the key: only then is it reported.
    proved: bool,
    /// Its id and label, once the admission took it: the admitter must hear
    /// that it ended.
    admitted: Option<(u64, Option<SessionLabel>)>,
    /// The guest's size, for the report.
    memory_bytes: u64,
}

impl Refused {
    fn before_proof(error: MigrationError, why: Refusal) -> Self {
        Self {
            error,
            why: Some(why),
            proved: false,
            admitted: None,
            memory_bytes: 0,
        }
    }

    fn after_proof(error: MigrationError, why: Refusal, setup: &SessionSetup) -> Self {
        Self {
            error,
            why: Some(why),
            proved: true,
            admitted: None,
            memory_bytes: setup.memory_bytes,
        }
    }
}

/// Why a handshake was cut short from outside.
enum Cut {
    Evicted,
    Timeout,
}

/// Runs `f` until the connection is evicted or its handshake time is up.
async fn within<T>(
    ticket: &Ticket,
    deadline: tokio::time::Instant,
    f: impl std::future::Future<Output = T>,
) -> Result<T, Cut> {
    tokio::select! {
        biased;
        _ = ticket.evicted.cancelled() => Err(Cut::Evicted),
        r = tokio::time::timeout_at(deadline, f) => r.map_err(|_| Cut::Timeout),
    }
}

/// Sends an ABORT saying why, then closes.
pub(super) async fn reject(writer: &mut FrameWriter, e: &MigrationError) {
    let msg = Message::Abort(Abort {
        code: e.abort_code(),
        message: e.to_string(),
    });
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(1),
        writer.send(Header::new(Command::Abort), &msg),
    )
    .await;
    writer.shutdown().await;
}

impl Shared {
    /// Counts, logs and answers a refusal.
    async fn refuse(
        &self,
        peer: SocketAddr,
        writer: Option<&mut FrameWriter>,
        why: Refusal,
        e: &MigrationError,
    ) {
        self.stats.count(why);
        tracing::warn!(%peer, reason = why.name(), error = %e, "refused a connection");
        if let Some(w) = writer {
            reject(w, e).await;
        }
    }

    fn cut_error(&self, cut: Cut) -> (Refusal, MigrationError) {
        match cut {
            Cut::Evicted => (
                Refusal::Evicted,
                MigrationError::from(Shortfall::Pending {
                    limit: self.config.max_pending,
                }),
            ),
            Cut::Timeout => (
                Refusal::Timeout,
                MigrationError::Timeout {
                    what: "the handshake (the receiver's handshake timeout)",
                    after: self.config.handshake_timeout,
                },
            ),
        }
    }
}

/// Serves one accepted connection: its handshake, then its session or its
/// channel bind. Returns the session's end for the receiver's owner: only
/// for sessions whose peer proved the key.
pub(super) async fn handle_connection(
    stream: TcpStream,
    peer: SocketAddr,
    at: Instant,
    rx: Arc<Shared>,
    ctx: RunContext,
    ticket: Ticket,
) -> Option<Incoming> {
    let _ = stream.set_nodelay(true);
    let deadline = tokio::time::Instant::from_std(at + rx.config.handshake_timeout);
    let rx_bytes = Arc::new(AtomicU64::new(0));
    let (conn, binding) = match within(&ticket, deadline, accept_conn(stream, peer, &rx)).await {
        Ok(Some(c)) => c,
        Ok(None) => return None,
        Err(cut) => {
            let (why, e) = rx.cut_error(cut);
            rx.refuse(peer, None, why, &e).await;
            return None;
        }
    };
    let (mut reader, mut writer) = conn.split(
        ChannelId::CONTROL,
        rx_bytes.clone(),
        Vec::new(),
        Arc::default(),
    );
    let first = match within(&ticket, deadline, reader.read_frame()).await {
        Ok(Ok(Some(f))) => f,
        Ok(Ok(None)) => return None,
        Ok(Err(e)) => {
            let e = name_tls_hello(e);
            rx.refuse(peer, Some(&mut writer), Refusal::Malformed, &e)
                .await;
            return None;
        }
        Err(cut) => {
            let (why, e) = rx.cut_error(cut);
            rx.refuse(peer, Some(&mut writer), why, &e).await;
            return None;
        }
    };
    match Message::decode(&first.header, first.payload.clone(), Limits::BEFORE_SETUP) {
        Ok(Message::Negotiate(n)) => {
            let new = NewSession {
                peer,
                at,
                deadline,
                rx: &rx,
                ctx,
                rx_bytes,
                binding,
            };
            new.run(&n, reader, writer, ticket).await
        }
        Ok(Message::ChannelBind(b)) => {
            match route_bind(&rx, &first.header, &b, &binding, reader, writer) {
                Ok(None) => {}
                Ok(Some((bind, record, stop))) => {
                    drop(ticket);
                    let id = first.header.session_id;
                    let credits = rx.config.initial_credits;
                    let stops = [&ctx.cancel, &stop];
                    serve_completed(bind, record, id, credits, stops).await;
                }
                Err((why, e, mut writer)) => rx.refuse(peer, Some(&mut writer), why, &e).await,
            }
            None
        }
        Ok(m) => {
            let e = MigrationError::from(Violation::Unexpected {
                want: "NEGOTIATE or CHANNEL_BIND first",
                got: m.command(),
            });
            rx.refuse(peer, Some(&mut writer), Refusal::Malformed, &e)
                .await;
            None
        }
        Err(e) => {
            let e = MigrationError::from(e);
            rx.refuse(peer, Some(&mut writer), Refusal::Malformed, &e)
                .await;
            None
        }
    }
}

/// A connection that opened with NEGOTIATE: a session to admit or refuse.
struct NewSession<'a> {
    peer: SocketAddr,
    at: Instant,
    deadline: tokio::time::Instant,
    rx: &'a Arc<Shared>,
    ctx: RunContext,
    rx_bytes: Arc<AtomicU64>,
    binding: Vec<u8>,
}

impl NewSession<'_> {
    /// Runs the handshake within the deadline; an admitted session runs to
    /// its end, a refused one is answered, and reported when its peer had
    /// proved the key.
    async fn run(
        self,
        n: &Negotiate,
        mut reader: FrameReader,
        mut writer: FrameWriter,
        ticket: Ticket,
    ) -> Option<Incoming> {
        let (rx, peer) = (self.rx, self.peer);
        let hs = session_handshake(rx, peer, &mut reader, &mut writer, n, &self.binding);
        let refused = match within(&ticket, self.deadline, hs).await {
            Ok(Ok(admitted)) => {
                drop(ticket);
                let session = Session::new(
                    rx.config.clone(),
                    self.ctx,
                    rx.sessions.clone(),
                    self.rx_bytes,
                );
                let reader = reader.open_up();
                let end = session.run(self.at, peer, reader, writer, admitted, self.binding);
                return Some(end.await);
            }
            Ok(Err(refused)) => refused,
            Err(cut) => {
                let (why, e) = rx.cut_error(cut);
                Refused::before_proof(e, why)
            }
        };
        match refused.why {
            Some(why) => {
                rx.refuse(peer, Some(&mut writer), why, &refused.error)
                    .await
            }
            None => {
                tracing::info!(%peer, error = %refused.error, "the source gave up during the handshake")
            }
        }
        if !refused.proved {
            return None;
        }
        let session = Session::new(
            rx.config.clone(),
            self.ctx,
            rx.sessions.clone(),
            self.rx_bytes,
        );
        let Refused {
            error,
            admitted,
            memory_bytes,
            ..
        } = refused;
        Some(
            session
                .refused(self.at, error, admitted, memory_bytes, self.binding)
                .await,
        )
    }
}

/// A TLS client hello where a frame should start: say so in the source's terms.
fn name_tls_hello(e: MigrationError) -> MigrationError {
    match e {
        MigrationError::Decode(crate::wire::DecodeError::BadMagic { found })
            if found & 0xffff == 0x0316 =>
        {
            Mismatch::SourceSpeaksTls.into()
        }
        e => e,
    }
}

/// The connection, with TLS when the receiver takes TLS only; `None` when it
/// was refused (logged and counted here).
async fn accept_conn(stream: TcpStream, peer: SocketAddr, rx: &Shared) -> Option<(Conn, Vec<u8>)> {
    let Some(tls) = &rx.config.tls else {
        return Some((Conn::Plain(stream), Vec::new()));
    };
    // A plain ferry source on a TLS receiver: say so in its terms.
    let mut head = [0u8; 4];
    if let Ok(4) = stream.peek(&mut head).await {
        if u32::from_le_bytes(head) == crate::wire::MAGIC {
            let (r, w) = stream.into_split();
            drop(r);
            let mut writer = FrameWriter::new(w, ChannelId::CONTROL, Vec::new(), Arc::default());
            let e = MigrationError::from(Mismatch::TlsOnly);
            rx.refuse(peer, Some(&mut writer), Refusal::Malformed, &e)
                .await;
            return None;
        }
    }
    match tls.accept(stream).await {
        Ok((s, b)) => Some((Conn::Tls(Box::new(s)), b.to_vec())),
        Err(e) => {
            let e = MigrationError::from(Mismatch::TlsHandshake(e.to_string()));
            rx.refuse(peer, None, Refusal::Malformed, &e).await;
            None
        }
    }
}

/// Starts serving: one task per accepted connection, each through its
/// handshake with a ticket from the budget.
pub(super) async fn serve(
    listener: tokio::net::TcpListener,
    rx: Arc<Shared>,
    ctx: RunContext,
    done: tokio::sync::mpsc::UnboundedSender<Incoming>,
) {
    let cancel: &CancellationToken = &ctx.cancel;
    // Every connection's task (its handshake, and the session it may
    // carry) is tracked: serving ends once they have, or after a bound.
    let tasks = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let at = Instant::now();
        let ticket = rx.handshakes.enter(peer.ip(), at);
        let rx = rx.clone();
        let ctx = ctx.clone();
        let done = done.clone();
        tasks.spawn(async move {
            if let Some(mut incoming) = handle_connection(stream, peer, at, rx, ctx, ticket).await {
                let slot = incoming.slot.take();
                let _ = done.send(incoming);
                drop(slot);
            }
        });
    }
    // No one accepts any more: new connections are refused, not left in
    // the backlog while the sessions end.
    drop(listener);
    tasks.close();
    if tokio::time::timeout(SESSIONS_END_WAIT, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("stopped serving with sessions still ending");
    }
}
