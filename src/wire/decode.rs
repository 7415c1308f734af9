//! Each message's payload decoded, every field checked and named in the
//! error: the one place bytes from the peer become a [`Message`].

use super::message::{
    Abort, AbortCode, BatchAck, ChannelBind, ChannelBindResponse, Complete, DeltaBase, Echo,
    GuestKind, Message, Negotiate, NegotiateResponse, Ready, RoundEnd, SessionLabel, SessionSetup,
    SessionSetupResponse, Switchover, VerifyMode, SETUP_DELTA, SETUP_LABELLED, SETUP_PROVEN,
};
use super::{
    Command, DecodeError, Header, Limits, PageBatch, Reader, MAX_ABORT_MESSAGE, MAX_CHANNELS,
};
use bytes::Bytes;

impl Message {
    /// Decodes the payload of a frame whose header was already checked.
    pub fn decode(header: &Header, payload: Bytes, limits: Limits) -> Result<Message, DecodeError> {
        let cmd = header.command;
        if cmd == Command::PageBatch {
            return PageBatch::decode(payload, limits).map(Self::PageBatch);
        }
        let mut r = Reader::new(&payload);
        let msg = match cmd {
            Command::Negotiate => Self::Negotiate(negotiate(&mut r)?),
            Command::NegotiateResponse => Self::NegotiateResponse(negotiate_response(&mut r)?),
            Command::SessionSetup => Self::SessionSetup(session_setup(&mut r)?),
            Command::SessionSetupResponse => Self::SessionSetupResponse(setup_response(&mut r)?),
            Command::ChannelBind => Self::ChannelBind(ChannelBind {
                nonce: r.bytes(16, "bind.nonce")?.try_into().expect("16 bytes"),
                proof: r.bytes(32, "bind.proof")?.try_into().expect("32 bytes"),
            }),
            Command::ChannelBindResponse => Self::ChannelBindResponse(ChannelBindResponse {
                proof: r
                    .bytes(32, "bind_response.proof")?
                    .try_into()
                    .expect("32 bytes"),
            }),
            Command::Echo => Self::Echo(Echo {
                value: r.u64("echo.value")?,
            }),
            Command::EchoResponse => Self::EchoResponse(Echo {
                value: r.u64("echo_response.value")?,
            }),
            Command::BatchAck => Self::BatchAck(BatchAck {
                message_id: r.u64("ack.message_id")?,
                pages: r.u32("ack.pages")?,
            }),
            Command::RoundEnd => Self::RoundEnd(RoundEnd {
                round: r.u32("round_end.round")?,
                pages: r.u64("round_end.pages")?,
                final_next: decode_bool(r.u8("round_end.final_next")?, "round_end.final_next")?,
            }),
            Command::Switchover => Self::Switchover(switchover(&mut r, &payload)?),
            Command::Ready => Self::Ready(Ready {
                digest: r.u64("ready.digest")?,
            }),
            Command::Go => Self::Go,
            Command::Complete => Self::Complete(Complete {
                destination_cpu_ms: r.u64("complete.destination_cpu_ms")?,
                resumed: decode_bool(r.u8("complete.resumed")?, "complete.resumed")?,
            }),
            Command::Abort => Self::Abort(abort(&mut r)?),
            Command::PageBatch => unreachable!("handled above"),
        };
        r.finish(cmd)?;
        Ok(msg)
    }
}

fn negotiate(r: &mut Reader<'_>) -> Result<Negotiate, DecodeError> {
    let min_version = r.u8("negotiate.min_version")?;
    let max_version = r.u8("negotiate.max_version")?;
    if r.u16("negotiate.reserved")? != 0 {
        return Err(DecodeError::Reserved {
            field: "negotiate.reserved",
        });
    }
    if min_version > max_version {
        return Err(DecodeError::Invalid {
            field: "negotiate.min_version",
        });
    }
    Ok(Negotiate {
        min_version,
        max_version,
        capabilities: r.u32("negotiate.capabilities")?,
        codecs: r.u32("negotiate.codecs")?,
        page_size: r.u32("negotiate.page_size")?,
        nonce: r
            .bytes(16, "negotiate.nonce")?
            .try_into()
            .expect("16 bytes"),
    })
}

fn negotiate_response(r: &mut Reader<'_>) -> Result<NegotiateResponse, DecodeError> {
    let version = r.u8("negotiate_response.version")?;
    if r.bytes(3, "negotiate_response.reserved")? != [0, 0, 0] {
        return Err(DecodeError::Reserved {
            field: "negotiate_response.reserved",
        });
    }
    Ok(NegotiateResponse {
        version,
        capabilities: r.u32("negotiate_response.capabilities")?,
        codecs: r.u32("negotiate_response.codecs")?,
        page_size: r.u32("negotiate_response.page_size")?,
        nonce: r
            .bytes(16, "negotiate_response.nonce")?
            .try_into()
            .expect("16 bytes"),
    })
}

fn session_setup(r: &mut Reader<'_>) -> Result<SessionSetup, DecodeError> {
    let memory_bytes = r.u64("setup.memory_bytes")?;
    let channels = r.u16("setup.channels")?;
    if channels == 0 || channels > MAX_CHANNELS {
        return Err(DecodeError::OutOfRange {
            field: "setup.channels",
            value: channels.into(),
            limit: MAX_CHANNELS.into(),
        });
    }
    let codec = r.u8("setup.codec")?;
    if crate::codec::CodecId::from_u8(codec).is_none() && codec != crate::codec::SETUP_CODEC_AUTO {
        return Err(DecodeError::Invalid {
            field: "setup.codec",
        });
    }
    let codec_level = r.u8("setup.codec_level")? as i8;
    let guest_kind = match r.u8("setup.guest_kind")? {
        0 => GuestKind::Sim,
        1 => GuestKind::Kvm,
        _ => {
            return Err(DecodeError::Invalid {
                field: "setup.guest_kind",
            })
        }
    };
    let verify = decode_verify(r.u8("setup.verify")?, "setup.verify")?;
    if r.u16("setup.reserved")? != 0 {
        return Err(DecodeError::Reserved {
            field: "setup.reserved",
        });
    }
    let mut setup = SessionSetup {
        memory_bytes,
        channels,
        codec,
        codec_level,
        guest_kind,
        verify,
        max_bandwidth: r.u64("setup.max_bandwidth")?,
        flags: r.u32("setup.flags")?,
        label: None,
        base: None,
        proof: None,
    };
    let SessionSetup { flags, .. } = setup;
    if flags & SETUP_LABELLED != 0 {
        // Names as the cluster file allows them: letters, digits,
        // '-', '_', '.'; nothing a log line or terminal would
        // take as markup.
        setup.label = Some(SessionLabel {
            vm: name(r, "setup.label.vm")?,
            migration_id: name(r, "setup.label.migration_id")?,
            source_node: name(r, "setup.label.source_node")?,
        });
    }
    if flags & SETUP_DELTA != 0 {
        setup.base = Some(DeltaBase {
            migration_id: name(r, "setup.base.migration_id")?,
            digest: r.u64("setup.base.digest")?,
        });
    }
    if flags & SETUP_PROVEN != 0 {
        setup.proof = Some(r.bytes(32, "setup.proof")?.try_into().expect("32 bytes"));
    }
    Ok(setup)
}

/// A name as the cluster file allows them (a length byte, then 1 to 255
/// letters, digits, '-', '_', '.'): nothing a log line or terminal would
/// take as markup.
fn name(r: &mut Reader<'_>, field: &'static str) -> Result<String, DecodeError> {
    let len = r.u8(field)?;
    let bytes = r.bytes(len.into(), field)?;
    if bytes.is_empty()
        || !bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(b))
    {
        return Err(DecodeError::Invalid { field });
    }
    Ok(String::from_utf8(bytes.to_vec()).expect("checked ASCII"))
}

fn setup_response(r: &mut Reader<'_>) -> Result<SessionSetupResponse, DecodeError> {
    let bind_token = r
        .bytes(16, "setup_response.bind_token")?
        .try_into()
        .unwrap();
    let initial_credits = r.u16("setup_response.initial_credits")?;
    // Bit 0: a proof follows; bit 1: the delta base was taken.
    let flags = r.u8("setup_response.flags")?;
    if flags & !3 != 0 {
        return Err(DecodeError::Invalid {
            field: "setup_response.flags",
        });
    }
    let proof = if flags & 1 != 0 {
        Some(
            r.bytes(32, "setup_response.proof")?
                .try_into()
                .expect("32 bytes"),
        )
    } else {
        None
    };
    Ok(SessionSetupResponse {
        bind_token,
        initial_credits,
        proof,
        delta: flags & 2 != 0,
    })
}

fn switchover(r: &mut Reader<'_>, payload: &Bytes) -> Result<Switchover, DecodeError> {
    let final_round = r.u32("switchover.final_round")?;
    let digest = r.u64("switchover.digest")?;
    let verify = decode_verify(r.u8("switchover.verify")?, "switchover.verify")?;
    let throttle_pct_max = r.u8("switchover.throttle_pct_max")?;
    if throttle_pct_max > 99 {
        return Err(DecodeError::OutOfRange {
            field: "switchover.throttle_pct_max",
            value: throttle_pct_max.into(),
            limit: 99,
        });
    }
    let rounds = r.u32("switchover.rounds")?;
    let dirty_rate_bps = r.u64("switchover.dirty_rate_bps")?;
    let source_cpu_ms = r.u64("switchover.source_cpu_ms")?;
    let len = r.u32("switchover.state_len")? as usize;
    if len != r.remaining() {
        return Err(DecodeError::Mismatch {
            field: "switchover.state_len",
            declared: len as u64,
            actual: r.remaining() as u64,
        });
    }
    let start = r.position();
    r.bytes(len, "switchover.state")?;
    Ok(Switchover {
        final_round,
        digest,
        verify,
        rounds,
        dirty_rate_bps,
        throttle_pct_max,
        source_cpu_ms,
        state: payload.slice(start..start + len),
    })
}

fn abort(r: &mut Reader<'_>) -> Result<Abort, DecodeError> {
    let code = AbortCode::from_u16(r.u16("abort.code")?).ok_or(DecodeError::Invalid {
        field: "abort.code",
    })?;
    let len = r.u16("abort.message_len")? as usize;
    if len > MAX_ABORT_MESSAGE {
        return Err(DecodeError::OutOfRange {
            field: "abort.message_len",
            value: len as u64,
            limit: MAX_ABORT_MESSAGE as u64,
        });
    }
    let text = r.bytes(len, "abort.message")?;
    let message = std::str::from_utf8(text)
        .map_err(|_| DecodeError::Invalid {
            field: "abort.message",
        })?
        .to_string();
    Ok(Abort { code, message })
}

fn decode_bool(v: u8, field: &'static str) -> Result<bool, DecodeError> {
    match v {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(DecodeError::Invalid { field }),
    }
}

fn decode_verify(v: u8, field: &'static str) -> Result<VerifyMode, DecodeError> {
    match v {
        0 => Ok(VerifyMode::Fast),
        1 => Ok(VerifyMode::Full),
        _ => Err(DecodeError::Invalid { field }),
    }
}
