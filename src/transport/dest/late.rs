//! A connection bound to a completed session's record: it answers a GO
//! sent again with the session's COMPLETE (and ECHO with its answer) until
//! the record expires, the source closes, its channel is bound again, or
//! the receiver stops. It reads control frames only, within the
//! handshake's frame limit, and fails on any other.

use super::Bind;
use crate::migration::dest_session::Completed;
use crate::migration::{MigrationError, Violation};
use crate::wire::{ChannelBindResponse, Command, Header, Limits, Message};
use std::time::Instant;
use tokio_util::sync::CancellationToken;

/// Longest wait to close the connection (a TLS close_notify to a peer that
/// stopped reading).
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Serves bind `b` of session `session_id` from `record`, until either of
/// `stops` (the receiver's, the channel's) fires.
pub(in crate::transport) async fn serve_completed(
    b: Bind,
    record: Completed,
    session_id: u64,
    credits: u16,
    stops: [&CancellationToken; 2],
) {
    let channel = b.channel;
    let deadline = tokio::time::Instant::from_std(record.until());
    let mut writer = None;
    let served = tokio::select! {
        biased;
        _ = stops[0].cancelled() => Ok(()),
        _ = stops[1].cancelled() => Ok(()),
        _ = tokio::time::sleep_until(deadline) => Ok(()),
        r = answer(b, &record, session_id, credits, &mut writer) => r,
    };
    if let Err(e) = served {
        tracing::debug!(%channel, error = %e, "a connection to a completed session ended");
    }
    if let Some(w) = writer.as_mut() {
        let _ = tokio::time::timeout(CLOSE_WAIT, w.shutdown()).await;
    }
}

/// Answers the bind, then every frame, until the source closes.
async fn answer(
    b: Bind,
    record: &Completed,
    session_id: u64,
    credits: u16,
    writer: &mut Option<crate::transport::FrameWriter>,
) -> Result<(), MigrationError> {
    let Bind {
        channel,
        mut reader,
        writer: w,
        proof,
        send_key,
    } = b;
    let w = writer.insert(w);
    let mut message_id = 0;
    let mut header = |command| {
        message_id += 1;
        Header {
            session_id,
            message_id,
            ..Header::new(command)
        }
    };
    let response = Header {
        credit_grant: credits,
        ..header(Command::ChannelBindResponse)
    };
    let bound = Message::ChannelBindResponse(ChannelBindResponse { proof });
    w.send(response, &bound).await?;
    if let Some(key) = send_key {
        w.authenticate(key);
    }
    while let Some(frame) = reader.read_frame().await? {
        if frame.header.session_id != session_id {
            return Err(Violation::WrongSession {
                channel,
                got: frame.header.session_id,
                session: session_id,
            }
            .into());
        }
        let msg = Message::decode(&frame.header, frame.payload, Limits::BEFORE_SETUP)?;
        let reply = match msg {
            Message::Echo(e) => Some(Message::EchoResponse(e)),
            m @ (Message::Go | Message::Abort(_)) => {
                record.answer(Instant::now(), &frame.header, &m)
            }
            other => {
                return Err(Violation::Unexpected {
                    want: "GO sent again, or ECHO",
                    got: other.command(),
                }
                .into())
            }
        };
        let Some(reply) = reply else { continue };
        if matches!(reply, Message::Complete(_)) {
            tracing::info!(%channel, session = format!("{session_id:016x}"), "answered a GO sent again after the session completed");
        }
        w.send(header(reply.command()), &reply).await?;
    }
    Ok(())
}
