//! A channel's task: reads frames, applies page batches on the blocking
//! pool and acknowledges them; and the answer to a proven bind.

use super::StreamPermit;
use super::*;
use crate::codec::{CodecId, StreamDecoder};
use crate::digest::page_hash;
use crate::migration::dest_ledger::{Claim, Claimed};
use crate::migration::fault::FaultPoint;
use crate::migration::MigrationError;
use crate::migration::Violation;
use crate::page::PageIndex;
use crate::transport::{FrameReader, FrameWriter, Received};
use crate::wire::ChannelId;
use crate::wire::{BatchAck, ChannelBindResponse, Command, Header, Message, PageBatch};
use futures_util::FutureExt;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use tokio_util::sync::CancellationToken;

pub(super) async fn channel_task(
    sh: Arc<Shared>,
    ch: ChannelId,
    gen: u32,
    rd: FrameReader,
    wr: Arc<tokio::sync::Mutex<FrameWriter>>,
    stop: CancellationToken,
) {
    let conn = Conn {
        sh: &sh,
        ch,
        gen,
        wr: &wr,
        stop: &stop,
        kept: Default::default(),
    };
    // A panic of this side's own ends the session as a local fault: never
    // blamed on the peer, never a channel left silently unread. Its text
    // stays in this side's log; the peer only hears that it happened. The
    // connection may hold half a frame: no reply goes out on it again.
    let result = match AssertUnwindSafe(conn.serve(rd)).catch_unwind().await {
        Ok(r) => r,
        Err(panic) => {
            let text = panic_text(&*panic);
            tracing::error!(channel = %ch, gen, panic = text, "a channel's task panicked");
            sh.retire_channel(ch, gen);
            Err(MigrationError::Internal(
                crate::migration::LocalFault::Task {
                    task: crate::migration::Task::Channel(ch),
                    panicked: true,
                },
            ))
        }
    };
    sh.release(ch, gen);
    if let Err(e) = result {
        if !sh.cancel.is_cancelled() && !stop.is_cancelled() {
            let _ = sh.events.send(Event::Failed(ch, gen, e));
        }
    }
}

/// Forgets a batch's claim unless its apply finished.
struct ClaimGuard<'a> {
    sh: &'a Shared,
    id: u64,
    done: bool,
}

impl Drop for ClaimGuard<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.sh.set_claim(self.id, None);
        }
    }
}

/// What a panic said, if it said it in text.
fn panic_text(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("no message")
}

/// A page batch read off the channel: its header, and whether it is new
/// (not a repeat of one already applied).
type Arrived = (Header, PageBatch, bool);

/// One connection of a channel, as its task sees it.
struct Conn<'a> {
    sh: &'a Arc<Shared>,
    ch: ChannelId,
    gen: u32,
    wr: &'a Arc<tokio::sync::Mutex<FrameWriter>>,
    stop: &'a CancellationToken,
    /// The connection's kept zstd stream, made by its first stream batch,
    /// with its share of the receiver's budget.
    kept: Arc<Mutex<Option<(StreamDecoder, StreamPermit)>>>,
}

impl Conn<'_> {
    /// Reads, applies and acknowledges batches until the channel stops
    /// (`Ok`) or fails.
    async fn serve(&self, mut rd: FrameReader) -> Result<(), MigrationError> {
        loop {
            let Some((header, batch, fresh)) = self.next_batch(&mut rd).await? else {
                return Ok(());
            };
            let pages = batch.page_count();
            if fresh {
                self.apply(&header, batch).await?;
            } else if batch.codec == CodecId::ZstdStream {
                self.on_stream(batch, |_, batch, stream| {
                    Shared::skip_stream(&batch, stream)
                })
                .await?;
            }
            if !self.ack(header.message_id, pages).await? {
                return Ok(());
            }
        }
    }

    /// The next page batch, answering ECHO and passing control messages on
    /// to the session on the way; `None` once the channel is told to stop.
    async fn next_batch(&self, rd: &mut FrameReader) -> Result<Option<Arrived>, MigrationError> {
        let (sh, ch) = (self.sh, self.ch);
        loop {
            // A placed batch's pages land in guest memory: check the session,
            // the state and that this id is new before the first byte does.
            // What the claim said of a batch not placed, which then comes
            // back whole: claimed once, not twice.
            let verdict = Mutex::new(None);
            let accept = |h: &Header, b: &PageBatch| {
                check_session(sh, ch, h)?;
                sh.check_codec(b.codec)?;
                sh.fault_at(FaultPoint::BeforeRound0)?;
                let claim = Claim::Receiving {
                    chan: ch,
                    gen: self.gen,
                };
                match sh.claim(h, b.round, claim)? {
                    Claimed::New => Ok(true),
                    other => {
                        *verdict.lock().unwrap_or_else(PoisonError::into_inner) = Some(other);
                        Ok(false)
                    }
                }
            };
            let received = tokio::select! {
                biased;
                _ = self.stop.cancelled() => return Ok(None),
                f = rd.read_placing(&sh.memory, sh.limits, accept, |page, bytes| {
                    sh.hashes.set(PageIndex(page), page_hash(bytes))
                }) => f?,
            };
            let frame = match received {
                None => return Err(MigrationError::PeerClosed { channel: ch }),
                Some(Received::Placed(header, batch)) => {
                    sh.set_claim(header.message_id, Some(Claim::Applying));
                    return Ok(Some((header, batch, true)));
                }
                Some(Received::Frame(frame)) => frame,
            };
            check_session(sh, ch, &frame.header)?;
            if frame.header.command == Command::PageBatch {
                let batch = PageBatch::decode(frame.payload, sh.limits)?;
                sh.check_codec(batch.codec)?;
                let claimed = verdict
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .take();
                return self
                    .whole_batch(frame.header, batch, claimed)
                    .await
                    .map(Some);
            }
            let msg = Message::decode(&frame.header, frame.payload, sh.limits)?;
            self.other_message(frame.header, msg).await?;
        }
    }

    /// A batch read whole (not placed): claims it, unless the placing read
    /// already did, and settles a resend.
    async fn whole_batch(
        &self,
        h: Header,
        batch: PageBatch,
        claimed: Option<Claimed>,
    ) -> Result<Arrived, MigrationError> {
        let sh = self.sh;
        let claimed = match claimed {
            Some(c) => c,
            None => {
                sh.fault_at(FaultPoint::BeforeRound0)?;
                sh.claim(&h, batch.round, Claim::Applying)?
            }
        };
        let fresh = match claimed {
            Claimed::New => true,
            Claimed::Repeat => sh.settle_resend(h.message_id, batch.round).await?,
            Claimed::Stale => false,
        };
        Ok((h, batch, fresh))
    }

    /// ECHO is answered here; control messages go to the session's driver.
    async fn other_message(&self, header: Header, msg: Message) -> Result<(), MigrationError> {
        let sh = self.sh;
        match msg {
            Message::Echo(e) => {
                let header = Header {
                    session_id: sh.session_id,
                    message_id: sh.next_msg.fetch_add(1, Ordering::Relaxed),
                    ..Header::new(Command::EchoResponse)
                };
                self.wr
                    .lock()
                    .await
                    .send(header, &Message::EchoResponse(e))
                    .await?;
            }
            Message::RoundEnd(_) | Message::Switchover(_) | Message::Go | Message::Abort(_) => {
                let _ = sh.events.send(Event::Control(header, msg));
            }
            other => {
                return Err(Violation::Unexpected {
                    want: "a page batch, ECHO or a control message",
                    got: other.command(),
                }
                .into())
            }
        }
        Ok(())
    }

    /// Applies a new batch: raw pages here (a hash, or a copy and a hash:
    /// cheaper than a hop), compressed ones on the blocking pool.
    async fn apply(&self, header: &Header, batch: PageBatch) -> Result<(), MigrationError> {
        let sh = self.sh;
        let round = batch.round;
        // Whatever ends the apply early (an error, a panic, a stop) forgets
        // the claim, so a resend of the batch is applied, not waited on.
        let mut claim = ClaimGuard {
            sh,
            id: header.message_id,
            done: false,
        };
        let applied = match batch.codec {
            CodecId::None => sh.apply(&batch, None),
            CodecId::ZstdStream => {
                self.on_stream(batch, |sh, batch, stream| sh.apply(&batch, Some(stream)))
                    .await
            }
            _ => {
                let sh2 = sh.clone();
                tokio::task::spawn_blocking(move || sh2.apply(&batch, None))
                    .await
                    .map_err(|e| crate::transport::task_failed(crate::migration::Task::Apply, &e))?
            }
        };
        applied?;
        claim.done = true;
        sh.set_claim(header.message_id, Some(Claim::Done { round }));
        if round == 0
            && sh.fault_armed.load(Ordering::Relaxed)
            && sh.counts.snapshot().total * 2 >= sh.limits.guest_pages
        {
            sh.fault_at(FaultPoint::MidRound)?;
        }
        Ok(())
    }

    /// Runs `f` on the blocking pool with the connection's kept stream
    /// (made by its first stream batch, if the session agreed the codec
    /// and the receiver's budget has room). The channel reads one batch at
    /// a time, so the stream is never contended; an error leaves it out,
    /// and the session ends with it.
    async fn on_stream(
        &self,
        batch: PageBatch,
        f: impl FnOnce(&Shared, PageBatch, &mut StreamDecoder) -> Result<(), MigrationError>
            + Send
            + 'static,
    ) -> Result<(), MigrationError> {
        let taken = self
            .kept
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let (mut stream, permit) = match taken {
            Some(s) => s,
            None => {
                let Some(budget) = &self.sh.streams else {
                    return Err(Violation::Unexpected {
                        want: "a batch in a codec the session agreed",
                        got: Command::PageBatch,
                    }
                    .into());
                };
                let permit = budget
                    .take()
                    .ok_or(crate::migration::Shortfall::KeptStreams {
                        limit: budget.limit(),
                    })?;
                (StreamDecoder::new()?, permit)
            }
        };
        let (sh, kept) = (self.sh.clone(), self.kept.clone());
        tokio::task::spawn_blocking(move || {
            f(&sh, batch, &mut stream)?;
            *kept.lock().unwrap_or_else(PoisonError::into_inner) = Some((stream, permit));
            Ok(())
        })
        .await
        .map_err(|e| crate::transport::task_failed(crate::migration::Task::Apply, &e))?
    }

    /// Acknowledges batch `id` with one credit; `false` once told to stop.
    async fn ack(&self, id: u64, pages: u32) -> Result<bool, MigrationError> {
        let sh = self.sh;
        let ack_header = Header {
            credit_grant: 1,
            message_id: sh.next_msg.fetch_add(1, Ordering::Relaxed),
            session_id: sh.session_id,
            ..Header::new(Command::BatchAck)
        };
        let ack = Message::BatchAck(BatchAck {
            message_id: id,
            pages,
        });
        tokio::select! {
            biased;
            _ = self.stop.cancelled() => Ok(false),
            r = async { self.wr.lock().await.send(ack_header, &ack).await } => r.map(|()| true),
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
) -> Result<(ChannelId, FrameReader, FrameWriter), MigrationError> {
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
