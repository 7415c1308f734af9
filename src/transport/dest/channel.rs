//! A channel's task: reads frames, applies page batches on the blocking
//! pool and acknowledges them; and the answer to a proven bind.

use super::*;
use crate::codec::CodecId;
use crate::digest::page_hash;
use crate::migration::dest_ledger::{Claim, Claimed};
use crate::migration::fault::FaultPoint;
use crate::migration::MigrationError;
use crate::transport::{FrameReader, FrameWriter, Received};
use crate::wire::{BatchAck, ChannelBindResponse, Command, Header, Message, PageBatch};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;

pub(super) async fn channel_task(
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
pub(super) async fn answer_bind(
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
