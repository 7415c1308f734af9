//! A channel's bind into a live session: its proof over a fresh nonce, and
//! the secrets that check it.

use super::*;
use crate::migration::handshake::BindCheck;

/// A bind joins a live session as one of its channels, proves the session's
/// secret over a nonce never used before in it, and may replace a channel
/// that failed (the same number again). Proved, the connection goes to its
/// session.
pub(super) fn route_bind(
    rx: &Shared,
    h: &Header,
    b: &crate::wire::ChannelBind,
    binding: &[u8],
    mut reader: FrameReader,
    mut writer: FrameWriter,
) -> Result<(), (Refusal, MigrationError, FrameWriter)> {
    let mut map = rx.sessions.lock().unwrap();
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
    let _ = s.tx.send(Bind {
        channel: h.channel,
        reader: reader.open_up(),
        writer,
        proof: answer.proof,
        send_key: done.frame_keys.map(|k| k.to_source),
    });
    Ok(())
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
