//! A channel's bind into a live session: its proof over a fresh nonce, and
//! the secrets that check it.

use super::*;

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
    let bind = crate::migration::auth::Bind {
        session_id: h.session_id,
        channel: h.channel,
        nonce: &b.nonce,
        binding,
    };
    let mut map = rx.sessions.lock().unwrap();
    let s: &mut SessionEntry = match map.get_mut(&h.session_id) {
        None => {
            return Err((
                Refusal::BadBind,
                Violation::UnknownSession {
                    channel: h.channel,
                    session: h.session_id,
                }
                .into(),
                writer,
            ))
        }
        Some(s) => s,
    };
    let refuse = |e, writer| Err((Refusal::BadBind, e, writer));
    if h.channel.0 >= s.channels {
        return refuse(
            Violation::NoSuchChannel {
                channel: h.channel,
                session: h.session_id,
                channels: s.channels,
            }
            .into(),
            writer,
        );
    }
    if !s.secret.verify_bind(&bind, &b.proof) {
        return refuse(
            AuthFailure::BindProof {
                channel: h.channel,
                session: h.session_id,
            }
            .into(),
            writer,
        );
    }
    if !s.nonces.insert(b.nonce) {
        return refuse(
            AuthFailure::BindReplay {
                channel: h.channel,
                session: h.session_id,
            }
            .into(),
            writer,
        );
    }
    // Over the credits the session's answer will grant (the same config).
    let proof = s.secret.bound_proof(&bind, rx.config.initial_credits);
    reader.set_channel(h.channel);
    writer.set_channel(h.channel);
    // The source sends nothing more on it before the response: its frames
    // are tagged from the next one on.
    let keys = s.frame_mac.then(|| {
        let conn = crate::migration::auth::Connection::Bind(h.channel, &b.nonce);
        s.secret.frame_keys(h.session_id, conn)
    });
    if let Some(k) = &keys {
        reader.authenticate(k.to_dest);
    }
    let _ = s.tx.send(Bind {
        channel: h.channel,
        reader: reader.open_up(),
        writer,
        proof,
        send_key: keys.map(|k| k.to_source),
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
