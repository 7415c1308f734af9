//! Connecting the source's channels: negotiate and set up the session on
//! channel 0, prove the key both ways, then bind channels 1..N (and rebind
//! any later) with a proof over a fresh nonce.

use super::Tally;
use crate::codec::{Codec, CodecChoice, CodecId, SETUP_CODEC_AUTO};
use crate::memory::PAGE_SIZE;
use crate::migration::auth;
use crate::migration::handshake::{SourceBind, SourceHandshake};
use crate::migration::{AuthFailure, ChannelLoss, ConfigError, Mismatch};
use crate::migration::{MigratableGuest, MigrationConfig, MigrationError};
use crate::transport::RunContext;
use crate::transport::{connect, Conn, FrameReader, FrameWriter, TokenBucket};
use crate::wire::{ChannelId, CAP_PAGE_PATCHES, CAP_PAGE_REFS};
use crate::wire::{Header, Limits, Message, SessionSetup, SETUP_FRAME_MAC, SETUP_LEAVE_PAUSED};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How fast a destination is allowed to load an offered delta base before
/// it answers SESSION_SETUP: a retained file read into fresh memory, whose
/// first touch alone ran at about 450 MB/s on the machine of BENCHMARKS.md.
const BASE_LOAD_BPS: u64 = 100_000_000;

/// How long the source waits for the answer to a SESSION_SETUP that offers
/// a base of `memory` bytes: the destination loads and checks the base
/// first (seconds for a large guest).
fn setup_wait(memory: u64) -> Duration {
    (CONNECT_TIMEOUT + Duration::from_secs(memory / BASE_LOAD_BPS)).min(MAX_SETUP_WAIT)
}

/// The longest the source waits for that answer: 5 minutes (a cancel ends
/// the wait at once).
const MAX_SETUP_WAIT: Duration = Duration::from_secs(300);

/// A bound connection: its halves and the credits it was granted.
pub(super) type Bound = (FrameReader, FrameWriter, u16);

/// What it takes to connect a channel and bind it to the session.
pub(super) struct Connector {
    target: String,
    buckets: Vec<Arc<TokenBucket>>,
    wire: Arc<AtomicU64>,
    rx_bytes: Arc<AtomicU64>,
    session_id: u64,
    secret: Arc<auth::BindSecret>,
    tls: Option<crate::transport::tls::TlsClient>,
    /// Keyed without TLS: every frame after a bind's response is tagged.
    frame_mac: bool,
}

impl Connector {
    /// Connects channel `ch` (TLS when asked); returns its halves and its
    /// TLS keying material (empty when plain).
    async fn connect(
        &self,
        ch: ChannelId,
    ) -> Result<(FrameReader, FrameWriter, Vec<u8>), MigrationError> {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, connect(&self.target))
            .await
            .map_err(|_| MigrationError::Timeout {
                what: "the TCP connection",
                after: CONNECT_TIMEOUT,
            })?
            .map_err(|e| {
                MigrationError::io(format!("connect channel {ch} to {}", self.target), e)
            })?;
        let (conn, binding) = match &self.tls {
            None => (Conn::Plain(stream), Vec::new()),
            Some(tls) => {
                let (s, b) = tokio::time::timeout(CONNECT_TIMEOUT, tls.connect(stream))
                    .await
                    .map_err(|_| MigrationError::Timeout {
                        what: "the TLS handshake",
                        after: CONNECT_TIMEOUT,
                    })?
                    .map_err(|e| Mismatch::TlsConnect {
                        channel: ch,
                        target: self.target.clone(),
                        why: e.to_string(),
                    })?;
                (Conn::Tls(Box::new(s)), b.to_vec())
            }
        };
        let (rd, wr) = conn.split(
            ch,
            self.rx_bytes.clone(),
            self.buckets.clone(),
            self.wire.clone(),
        );
        Ok((rd, wr, binding))
    }

    /// Connects channel `ch` and binds it to the session, each side proving
    /// the session's secret over a fresh nonce. Returns its credits.
    pub(super) async fn bind(
        &self,
        ch: ChannelId,
    ) -> Result<(FrameReader, FrameWriter, u16), MigrationError> {
        let (mut rd, mut wr, binding) = self.connect(ch).await?;
        let nonce = auth::random_bytes::<16>();
        let bind = SourceBind::new(self.session_id, ch, nonce, binding, self.frame_mac);
        let (header, msg) = bind.request(&self.secret);
        wr.send(header, &msg).await?;
        let (h, m) = handshake_read(&mut rd, "CHANNEL_BIND_RESPONSE", CONNECT_TIMEOUT).await?;
        let done = bind.handle(&self.secret, &h, m)?;
        if let Some(keys) = done.frame_keys {
            rd.authenticate(keys.to_source);
            wr.authenticate(keys.to_dest);
        }
        Ok((rd, wr, done.credits))
    }
}

/// Reads one message during the handshake, with a timeout.
async fn handshake_read(
    rd: &mut FrameReader,
    what: &'static str,
    wait: Duration,
) -> Result<(Header, Message), MigrationError> {
    let channel = rd.channel();
    // A receiver that refuses says why in an ABORT; one that closes or
    // resets the connection instead is named as such, with the OS's word.
    let closed = |error: Option<std::io::ErrorKind>| MigrationError::ChannelLost {
        channel,
        why: ChannelLoss::ClosedInsteadOf { what, error },
    };
    let frame = tokio::time::timeout(wait, rd.read_frame())
        .await
        .map_err(|_| MigrationError::Timeout { what, after: wait })?
        .map_err(|e| match e {
            MigrationError::Io { source, .. } => closed(Some(source.kind())),
            MigrationError::PeerClosed { .. } | MigrationError::ChannelLost { .. } => closed(None),
            e => e,
        })?
        .ok_or_else(|| closed(None))?;
    let msg = Message::decode(&frame.header, frame.payload, Limits::BEFORE_SETUP)?;
    if let Message::Abort(a) = msg {
        return Err(MigrationError::RemoteAbort {
            code: a.code,
            message: a.message,
        });
    }
    Ok((frame.header, msg))
}

/// Connects channel 0, negotiates and sets up the session (each side proving
/// the key when there is one), then binds channels 1..N concurrently.
/// Returns the connector for later rebinds and every channel, bound.
pub(super) async fn open_session(
    guest: &dyn MigratableGuest,
    target: &str,
    config: &MigrationConfig,
    ctx: &RunContext,
    tally: &mut Tally,
) -> Result<(Connector, Vec<Bound>), MigrationError> {
    let batch_pages = config.batch_pages();
    let own = config.max_bandwidth.map(|bps| {
        // Bursts of at most one batch (plus headers) or 10 ms at the rate.
        let batch = u64::from(batch_pages) * PAGE_SIZE as u64 + 4096;
        Arc::new(TokenBucket::new(bps, batch.max(bps / 100)))
    });
    let mut connector = Connector {
        target: target.to_string(),
        // The migration's own cap, and the one it shares with others (a node's).
        buckets: own.into_iter().chain(ctx.shared_bucket.clone()).collect(),
        wire: ctx.progress.wire_bytes.clone(),
        rx_bytes: Arc::new(AtomicU64::new(0)),
        session_id: 0,
        secret: Arc::new(auth::BindSecret::derive(
            None, &[0; 16], &[0; 16], 0, &[0; 16],
        )),
        tls: ctx.tls.clone(),
        frame_mac: config.session_key.is_some() && ctx.tls.is_none(),
    };
    if ctx.tls.as_ref().is_some_and(|t| !t.is_pinned()) && config.session_key.is_none() {
        return Err(ConfigError {
            field: "session_key",
            message: "TLS without a pinned certificate needs a shared key to know the receiver by"
                .into(),
        }
        .into());
    }
    let (mut rd0, mut wr0, binding0) = tokio::select! {
        biased;
        _ = ctx.cancel.cancelled() => return Err(MigrationError::Cancelled),
        c = connector.connect(ChannelId::CONTROL) => c?,
    };
    let setup = session_setup(guest, config, connector.frame_mac);
    let answer_wait = match setup.base {
        Some(_) => setup_wait(setup.memory_bytes),
        None => CONNECT_TIMEOUT,
    };
    let key = config.session_key.clone();
    let source_nonce = auth::random_bytes::<16>();
    let caps = if config.dense {
        CAP_PAGE_REFS | CAP_PAGE_PATCHES
    } else {
        0
    };
    let mut hs = SourceHandshake::new(setup, config.codec, key, source_nonce, binding0)
        .with_capabilities(caps);
    let mut rtt = None;
    let done = loop {
        let sent = Instant::now();
        while let Some((header, msg)) = hs.poll_transmit() {
            wr0.send(header, &msg).await?;
        }
        let what = hs.awaiting().unwrap_or("an answer");
        let wait = match hs.awaiting() {
            Some("SESSION_SETUP_RESPONSE") => answer_wait,
            _ => CONNECT_TIMEOUT,
        };
        let (header, msg) = tokio::select! {
            biased;
            _ = ctx.cancel.cancelled() => return Err(MigrationError::Cancelled),
            r = handshake_read(&mut rd0, what, wait) => r?,
        };
        // A round trip: the quickest of the handshake's exchanges, so that
        // one slow answer (a busy destination) does not count as the
        // path's and block the switchover's estimate for good.
        let took = sent.elapsed();
        rtt = Some(rtt.map_or(took, |r: std::time::Duration| r.min(took)));
        match hs.handle(&header, msg) {
            Ok(Some(done)) => break done,
            Ok(None) => {}
            Err(e) => {
                if matches!(e, MigrationError::Unauthenticated(AuthFailure::Destination)) {
                    tracing::warn!(%target, "{e}");
                }
                return Err(e);
            }
        }
    };
    tally.session_id = done.session_id;
    tally.rtt = rtt.unwrap_or_default();
    tally.authenticated = done.authenticated;
    tally.delta.base = config
        .base
        .as_ref()
        .filter(|_| config.delta)
        .map(|b| b.migration_id.clone());
    tally.delta.base_vm = config
        .base
        .as_ref()
        .filter(|_| config.delta)
        .and_then(|b| b.image_of.clone());
    tally.delta.used = done.delta;
    tally.kept_stream = done.codecs & CodecId::ZstdStream.bit() != 0;
    if done.capabilities & CAP_PAGE_REFS != 0 {
        tally.refs_key = Some(done.secret.refs_key(done.session_id));
        tally.patches = done.capabilities & CAP_PAGE_PATCHES != 0;
    }
    connector.session_id = done.session_id;
    connector.secret = Arc::new(done.secret);
    if let Some(keys) = done.frame_keys {
        rd0.authenticate(keys.to_source);
        wr0.authenticate(keys.to_dest);
        tally.frames_authenticated = true;
    }
    let first = (rd0, wr0, done.initial_credits);
    let bound = bind_rest(connector, first, config.channels, ctx).await?;
    Ok(bound)
}

/// The SESSION_SETUP this migration asks for (without its proof).
fn session_setup(guest: &dyn MigratableGuest, config: &MigrationConfig, mac: bool) -> SessionSetup {
    let (codec, codec_level) = match config.codec {
        CodecChoice::Fixed(c @ (Codec::Zstd { level } | Codec::ZstdStream { level })) => {
            (c.id() as u8, level as i8)
        }
        CodecChoice::Fixed(c) => (c.id() as u8, 0),
        CodecChoice::Auto => (SETUP_CODEC_AUTO, 0),
    };
    let paused = if config.leave_paused {
        SETUP_LEAVE_PAUSED
    } else {
        0
    };
    SessionSetup {
        memory_bytes: guest.memory().len_bytes(),
        channels: config.channels,
        codec,
        codec_level,
        guest_kind: guest.kind(),
        verify: config.verify,
        max_bandwidth: config.max_bandwidth.unwrap_or(0),
        flags: paused | if mac { SETUP_FRAME_MAC } else { 0 },
        label: config.label.clone(),
        base: config
            .base
            .as_ref()
            .filter(|_| config.delta)
            .map(|b| b.offer()),
        proof: None,
    }
}

/// Binds channels 1..`channels` to the session concurrently.
async fn bind_rest(
    connector: Connector,
    first: Bound,
    channels: u16,
    ctx: &RunContext,
) -> Result<(Connector, Vec<Bound>), MigrationError> {
    let connector = Arc::new(connector);
    let mut binds = tokio::task::JoinSet::new();
    for ch in (1..channels).map(ChannelId) {
        let connector = connector.clone();
        binds.spawn(async move { connector.bind(ch).await.map(|b| (ch, b)) });
    }
    let mut bound: Vec<Option<Bound>> = (0..channels).map(|_| None).collect();
    bound[0] = Some(first);
    loop {
        let joined = tokio::select! {
            biased;
            _ = ctx.cancel.cancelled() => return Err(MigrationError::Cancelled),
            j = binds.join_next() => j,
        };
        let Some(joined) = joined else { break };
        let (ch, b) = joined
            .map_err(|e| crate::transport::task_failed(crate::migration::Task::Bind, &e))??;
        bound[ch.index()] = Some(b);
    }
    let connector =
        Arc::try_unwrap(connector).unwrap_or_else(|_| unreachable!("the bind tasks have ended"));
    Ok((
        connector,
        bound
            .into_iter()
            .map(|b| b.expect("every channel bound"))
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_base_offer_waits_for_the_destination_to_load_it() {
        assert_eq!(setup_wait(0), CONNECT_TIMEOUT);
        // 16 GiB read back from a file at 100 MB/s: 171 s more.
        assert_eq!(
            setup_wait(16 << 30),
            CONNECT_TIMEOUT + Duration::from_secs(171)
        );
    }
}
