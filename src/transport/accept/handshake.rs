//! A new session's handshake on channel 0, and the check of the source's
//! proof of the key.

use super::*;
use crate::migration::handshake::{check_setup, Taken};

/// A session's handshake on channel 0: NEGOTIATE (given), NEGOTIATE_RESPONSE,
/// SESSION_SETUP, the key's proof, then (proved) the session slot, the
/// setup's checks and the admission, and the guest's memory. Everything
/// after the last read is synchronous, so a cut (eviction, timeout) never
/// lands between an admission and its report.
pub(super) async fn session_handshake(
    rx: &Shared,
    peer: SocketAddr,
    reader: &mut FrameReader,
    writer: &mut FrameWriter,
    negotiate: &Negotiate,
    binding: &[u8],
) -> Result<Admitted, Refused> {
    let config = &rx.config;
    let mut machine = DestMachine::new(config.max_memory)
        .hosting_kvm(crate::transport::dest::kvm_here())
        .kept_streams(config.kept_streams.limit() > 0);
    let malformed = |e| Refused::before_proof(e, Refusal::Malformed);
    let mut response = machine.handle_negotiate(negotiate).map_err(malformed)?;
    // A fresh challenge per session: the setup proves the key over it, so a
    // recorded setup cannot be replayed.
    response.nonce = random_bytes::<16>();
    let nonce = response.nonce;
    let negotiation = crate::migration::auth::negotiation(negotiate, &response);
    writer
        .send(
            Header::new(Command::NegotiateResponse),
            &Message::NegotiateResponse(response),
        )
        .await
        .map_err(malformed)?;
    let setup = read_setup(reader).await?;
    let handshake = crate::migration::auth::Handshake {
        source_nonce: &negotiate.nonce,
        dest_nonce: &nonce,
        negotiation: &negotiation,
        binding,
    };
    let key = config.key.as_ref();
    let shown = peer.to_string();
    let from = (shown.as_str(), peer.ip().is_loopback());
    match check_setup(key, config.unauthenticated, from, &setup, &handshake) {
        Ok(Taken::Proved) => {}
        Ok(Taken::Unauthenticated) if config.unauthenticated == Unauthenticated::Anywhere => {
            tracing::warn!(%peer, "taking an unauthenticated session (--insecure)");
        }
        Ok(Taken::Unauthenticated) => {
            tracing::warn!(%peer, "taking an unauthenticated session from loopback (no --key)");
        }
        Err(e) => return Err(Refused::before_proof(e, Refusal::Unauthenticated)),
    }
    // Proved: from here on the session may hold a slot and be reported.
    let slot = Slot::take(&rx.session_count, config.max_sessions).ok_or_else(|| {
        let e = MigrationError::from(Shortfall::Sessions {
            limit: config.max_sessions,
        });
        Refused::after_proof(e, Refusal::SessionLimit, &setup)
    })?;
    let refused = |e| Refused::after_proof(e, Refusal::Refused, &setup);
    let limits = machine.handle_setup(&setup).map_err(refused)?;
    let inflight = u64::from(setup.channels) * crate::transport::CHANNEL_MEMORY;
    if inflight > config.max_inflight_bytes {
        return Err(refused(
            Shortfall::InFlight {
                channels: setup.channels,
                bytes: inflight,
                limit: config.max_inflight_bytes,
            }
            .into(),
        ));
    }
    let session_id = u64::from_le_bytes(random_bytes::<8>()) | 1;
    if let Some(admit) = &config.admit {
        admit(session_id, &setup).map_err(|why| refused(Shortfall::Refused(why).into()))?;
    }
    // Huge pages once the guest runs here (at GO), not while it arrives.
    let memory = GuestMemory::without_huge_pages(setup.memory_bytes).map_err(|e| Refused {
        admitted: Some((session_id, setup.label.clone())),
        ..refused(Shortfall::Memory(e).into())
    })?;
    Ok(Admitted {
        machine,
        limits,
        memory: Arc::new(memory),
        session_id,
        source_nonce: negotiate.nonce,
        nonce,
        negotiation,
        proved_key: config.key.is_some(),
        slot: Some(slot),
        setup,
    })
}

/// Reads the session's SESSION_SETUP (an ABORT instead is the source's
/// refusal, anything else malformed).
async fn read_setup(reader: &mut FrameReader) -> Result<SessionSetup, Refused> {
    let malformed = |e| Refused::before_proof(e, Refusal::Malformed);
    let frame = reader
        .read_frame()
        .await
        .map_err(malformed)?
        .ok_or_else(|| {
            malformed(MigrationError::PeerClosed {
                channel: ChannelId::CONTROL,
            })
        })?;
    match Message::decode(&frame.header, frame.payload, Limits::BEFORE_SETUP) {
        Ok(Message::SessionSetup(s)) => Ok(s),
        Ok(Message::Abort(a)) => Err(Refused {
            why: None,
            ..Refused::before_proof(
                MigrationError::RemoteAbort {
                    code: a.code,
                    message: a.message,
                },
                Refusal::Malformed,
            )
        }),
        Ok(m) => Err(malformed(
            Violation::Unexpected {
                want: "SESSION_SETUP",
                got: m.command(),
            }
            .into(),
        )),
        Err(e) => Err(malformed(e.into())),
    }
}
