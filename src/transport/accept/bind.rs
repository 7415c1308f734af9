//! A channel's bind into a live session: its proof over a fresh nonce, and
//! the secrets that check it.

use super::*;
use crate::migration::dest_session::Completed;
use crate::migration::handshake::BindCheck;
use crate::transport::dest::Route;
use std::sync::PoisonError;
use tokio_util::sync::CancellationToken;

/// A bind proved to a completed session's record: the connection, what
/// the session left, and the token that stops it when its channel is bound
/// again.
pub(super) type LateBind = (Bind, Completed, CancellationToken);

/// A bind joins a live session as one of its channels, proves the session's
/// secret over a nonce never used before in it, and may replace a channel
/// that failed (the same number again). Proved, the connection goes to its
/// session; one to a completed session's record comes back to be answered
/// from it.
pub(super) fn route_bind(
    rx: &Shared,
    h: &Header,
    b: &crate::wire::ChannelBind,
    binding: &[u8],
    mut reader: FrameReader,
    mut writer: FrameWriter,
) -> Result<Option<LateBind>, (Refusal, MigrationError, FrameWriter)> {
    let mut map = rx.sessions.lock().unwrap_or_else(PoisonError::into_inner);
    let now = Instant::now();
    map.retain(|_, e| !e.expired(now));
    let Some(s) = map.get_mut(&h.session_id) else {
        let e = Violation::UnknownSession {
            channel: h.channel,
            session: h.session_id,
        };
        return Err((Refusal::BadBind, e.into(), writer));
    };
    let mut check = BindCheck {
        secret: &s.secret,
        channels: s.channels,
        nonces: &mut s.nonces,
        frame_mac: s.frame_mac,
        credits: rx.config.initial_credits,
    };
    let (answer, done) = match check.check(h, b, binding) {
        Ok(r) => r,
        Err(e) => return Err((Refusal::BadBind, e, writer)),
    };
    reader.set_channel(h.channel);
    writer.set_channel(h.channel);
    // The source sends nothing more on it before the response: its frames
    // are tagged from the next one on.
    if let Some(k) = &done.frame_keys {
        reader.authenticate(k.to_dest);
    }
    let mut bind = Bind {
        channel: h.channel,
        reader,
        writer,
        proof: answer.proof,
        send_key: done.frame_keys.map(|k| k.to_source),
    };
    match &mut s.route {
        Route::Live(tx) => {
            bind.reader = bind.reader.open_up();
            let _ = tx.send(bind);
            Ok(None)
        }
        // Only control frames come: the reader keeps its handshake limit.
        Route::Completed(record, conns) => {
            let stop = CancellationToken::new();
            if let Some(before) = conns.insert(h.channel, stop.clone()) {
                before.cancel();
            }
            Ok(Some((bind, (**record).clone(), stop)))
        }
    }
}

/// Secrets proving the binds of a new session.
pub(in crate::transport) fn bind_secret(
    config: &ReceiverConfig,
    admitted: &Admitted,
    token: &[u8; 16],
) -> BindSecret {
    BindSecret::derive(
        config.key.as_ref(),
        &admitted.source_nonce,
        &admitted.nonce,
        admitted.session_id,
        token,
    )
}
