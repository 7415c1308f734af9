//! What a destination session's tasks share: guest memory and its hashes,
//! the session machine (with the claim ledger), the channels up, and the
//! replies.

use crate::codec::CodecId;
use crate::digest::{page_hash, ref_tag, zero_page_hash, PageHashes};
use crate::memory::{GuestMemory, PAGE_SIZE};
use crate::migration::dest_ledger::{Claim, Claimed, Settle};
use crate::migration::dest_session::DestSession;
#[cfg(feature = "faults")]
use crate::migration::fault::FaultKind;
use crate::migration::fault::{Fault, FaultPoint};
use crate::migration::report::PageCounter;
use crate::migration::{ChannelLoss, MigrationError};
use crate::migration::{PatchCause, Violation};
use crate::page::PageIndex;
use crate::transport::FrameWriter;
use crate::wire::ChannelId;
use crate::wire::{Header, Limits, Message, Page, PageBatch};
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub(super) enum Event {
    Control(Header, Message),
    Failed(ChannelId, u32, MigrationError),
}

/// A channel's current connection.
pub(super) struct DestChan {
    pub(super) gen: u32,
    pub(super) writer: Arc<tokio::sync::Mutex<FrameWriter>>,
    pub(super) stop: CancellationToken,
    /// For an injected reset (the `faults` feature).
    #[cfg_attr(not(feature = "faults"), allow(dead_code))]
    pub(super) fd: std::os::fd::RawFd,
}

pub(super) struct Shared {
    pub(super) memory: Arc<GuestMemory>,
    pub(super) hashes: PageHashes,
    /// The key of dense-page references' tags (from the bind secret).
    pub(super) refs_key: [u8; 32],
    /// With kept zstd streams agreed: the receiver's budget of them.
    pub(super) streams: Option<super::StreamBudget>,
    /// Whether the memory started as a failback's retained image rather
    /// than all zeros.
    pub(super) prefilled: bool,
    pub(super) limits: Limits,
    /// The session's protocol: the machine, its ledgers and timers.
    pub(super) session: Mutex<DestSession>,
    pub(super) counts: PageCounter,
    pub(super) events: mpsc::UnboundedSender<Event>,
    pub(super) session_id: u64,
    pub(super) next_msg: AtomicU64,
    pub(super) cancel: CancellationToken,
    /// The next connection's number (unique in the session).
    pub(super) next_gen: std::sync::atomic::AtomicU32,
    /// Longest wait for a connection to take a reply (the idle timeout).
    pub(super) reply_wait: Duration,
    /// Wakes resends waiting on a claim when one changes.
    pub(super) claims_changed: tokio::sync::Notify,
    /// Channels up now.
    pub(super) chans: Mutex<HashMap<ChannelId, DestChan>>,
    /// Connections that may hold half a frame (their task panicked): no
    /// reply goes out on them, and they stay open until the session ends,
    /// so the source reads its ABORT before it sees one close.
    pub(super) retired: Mutex<Vec<DestChan>>,
    /// The fault to inject, until it has been; `fault_armed` keeps the
    /// per-batch checks to one load when there is none (always, but in tests).
    #[cfg_attr(not(feature = "faults"), allow(dead_code))]
    pub(super) fault: Mutex<Option<Fault>>,
    pub(super) fault_armed: std::sync::atomic::AtomicBool,
    /// An injected panic waits for the next batch's apply.
    #[cfg_attr(not(feature = "faults"), allow(dead_code))]
    pub(super) panic_armed: std::sync::atomic::AtomicBool,
}

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl Shared {
    /// Decodes a kept stream's batch that is not applied (a repeat), so
    /// that the connection's stream stays in step.
    pub(super) fn skip_stream(
        batch: &PageBatch,
        stream: &mut crate::codec::StreamDecoder,
    ) -> Result<(), MigrationError> {
        SCRATCH.with(|s| batch.decoded(&mut s.borrow_mut(), Some(stream)).map(|_| ()))?;
        Ok(())
    }

    /// Applies a batch, a kept stream's with its connection's `stream`.
    pub(super) fn apply(
        &self,
        batch: &PageBatch,
        stream: Option<&mut crate::codec::StreamDecoder>,
    ) -> Result<(), MigrationError> {
        #[cfg(feature = "faults")]
        if self.panic_armed.swap(false, Ordering::Relaxed) {
            panic!("injected fault: a page batch's apply panics");
        }
        let zero_hash = zero_page_hash();
        let first_pass = batch.round == 0 && !self.prefilled;
        let mut bad = None;
        SCRATCH.with(|s| {
            batch.apply_with(&mut s.borrow_mut(), stream, |page, data| match data {
                Page::Data(bytes) => {
                    self.memory.write_page(page, bytes);
                    self.hashes.set(page, page_hash(bytes));
                }
                // The target's bytes here must carry the tag the source
                // made of the page's, under the session's key.
                Page::Same { target, hash: tag } => {
                    let mut copy = [0u8; PAGE_SIZE];
                    self.memory.read_page(target, &mut copy);
                    if ref_tag(&self.refs_key, &copy) == tag {
                        self.memory.write_page(page, &copy);
                        self.hashes.set(page, page_hash(&copy));
                    } else {
                        bad.get_or_insert(Violation::BadReference {
                            page: page.0,
                            target: target.0,
                        });
                    }
                }
                Page::Patch { base, tag, ops } => {
                    if let Err(cause) = self.apply_patch(page, base, tag, ops) {
                        bad.get_or_insert(Violation::BadPatch {
                            page: page.0,
                            base,
                            cause,
                        });
                    }
                }
                // Hashed as it was read and CRC-checked (read_placing).
                Page::Placed => {}
                Page::Zero => {
                    // Round 0 is every page's first copy and fresh memory is
                    // zero (unless a retained image filled it): leave zero
                    // pages unbacked.
                    if !first_pass {
                        self.memory.zero_page(page);
                    }
                    self.hashes.set(page, zero_hash);
                }
            })
        })?;
        if let Some(v) = bad {
            return Err(v.into());
        }
        let pages = u64::from(batch.page_count());
        let patches = u64::from(batch.patch_pages());
        let nonzero = u64::from(batch.nonzero_pages());
        let refs = u64::from(batch.ref_pages());
        let (raw, compressed) = if batch.codec == CodecId::None {
            (nonzero - refs, 0)
        } else {
            (0, nonzero - refs)
        };
        self.counts.add(
            batch.codec,
            [pages, pages - nonzero, raw, compressed, refs, patches],
        );
        Ok(())
    }

    /// Builds page `page` from the 4096 bytes of guest memory at byte
    /// `base` and `ops`, if those bytes carry the tag `tag` the source made
    /// of them under the session's key (decode checked the region is
    /// inside the guest).
    fn apply_patch(
        &self,
        page: PageIndex,
        base: u64,
        tag: u64,
        ops: &[u8],
    ) -> Result<(), PatchCause> {
        let mut two = [0u8; 2 * PAGE_SIZE];
        let first = PageIndex(base / PAGE_SIZE as u64);
        let at = (base % PAGE_SIZE as u64) as usize;
        self.memory.read_page(first, &mut two[..PAGE_SIZE]);
        if at > 0 {
            self.memory
                .read_page(PageIndex(first.0 + 1), &mut two[PAGE_SIZE..]);
        }
        let region = &two[at..at + PAGE_SIZE];
        if ref_tag(&self.refs_key, region) != tag {
            return Err(PatchCause::Region);
        }
        let mut built = [0u8; PAGE_SIZE];
        crate::wire::patch::apply(region, ops, &mut built).map_err(PatchCause::Ops)?;
        self.memory.write_page(page, &built);
        self.hashes.set(page, page_hash(&built));
        Ok(())
    }
}

/// Frames of another session on a channel end it.
pub(super) fn check_session(
    sh: &Shared,
    ch: ChannelId,
    header: &Header,
) -> Result<(), MigrationError> {
    if header.session_id != sh.session_id {
        return Err(Violation::WrongSession {
            channel: ch,
            got: header.session_id,
            session: sh.session_id,
        }
        .into());
    }
    Ok(())
}

impl Shared {
    /// The session machine.
    pub(super) fn session(&self) -> std::sync::MutexGuard<'_, DestSession> {
        self.session.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Claims a batch of `round` for this connection if it is new (and of
    /// a round the machine takes now).
    pub(super) fn claim(
        &self,
        h: &Header,
        round: u32,
        state: Claim,
    ) -> Result<Claimed, MigrationError> {
        self.session().claim_batch(h, round, state)
    }

    /// Checks a batch's codec is one the negotiation agreed on.
    pub(super) fn check_codec(&self, codec: crate::codec::CodecId) -> Result<(), MigrationError> {
        self.session().check_codec(codec)
    }

    pub(super) fn set_claim(&self, id: u64, state: Option<Claim>) {
        self.session().set_claim(id, state);
        self.claims_changed.notify_waiters();
    }

    /// Settles a resend of `id` (of `round`): waits while another
    /// connection still holds its first copy (stopping that connection,
    /// which the source has given up on, if it is stuck reading it).
    /// `Ok(true)`: the first copy never landed, apply this one; `Ok(false)`:
    /// it is applied, acknowledge only.
    pub(super) async fn settle_resend(&self, id: u64, round: u32) -> Result<bool, MigrationError> {
        loop {
            let changed = self.claims_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let settled = self.session().settle_resend(id, round)?;
            match settled {
                Settle::Apply => return Ok(true),
                Settle::AckOnly => return Ok(false),
                Settle::Wait(None) => {}
                Settle::Wait(Some((chan, gen))) => self.stop_channel(chan, gen),
            }
            tokio::select! {
                _ = self.cancel.cancelled() => return Err(MigrationError::Cancelled),
                _ = &mut changed => {}
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    }

    /// Stops connection `gen` of channel `chan` (replaced or given up on).
    pub(super) fn stop_channel(&self, chan: ChannelId, gen: u32) {
        if let Some(c) = self
            .chans
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&chan)
        {
            if c.gen == gen {
                c.stop.cancel();
            }
        }
    }

    /// Forgets what a connection that ended was reading.
    pub(super) fn release(&self, chan: ChannelId, gen: u32) {
        self.session().release(chan, gen);
        self.claims_changed.notify_waiters();
    }

    /// Without the `faults` feature there is nothing to inject.
    #[cfg(not(feature = "faults"))]
    pub(super) fn fault_at(&self, _point: FaultPoint) -> Result<(), MigrationError> {
        Ok(())
    }

    /// Injects the configured fault if it is for `point` (once).
    #[cfg(feature = "faults")]
    pub(super) fn fault_at(&self, point: FaultPoint) -> Result<(), MigrationError> {
        if !self.fault_armed.load(Ordering::Relaxed) {
            return Ok(());
        }
        let fault = {
            let mut f = self.fault.lock().unwrap_or_else(PoisonError::into_inner);
            match *f {
                Some(x) if x.point == point => {
                    self.fault_armed.store(false, Ordering::Relaxed);
                    f.take()
                }
                _ => None,
            }
        };
        let Some(fault) = fault else { return Ok(()) };
        match fault.kind {
            FaultKind::Reset => {}
            FaultKind::Abort => {
                tracing::warn!(?point, "injected fault: giving up on the session");
                return Err(crate::migration::Shortfall::Injected(point).into());
            }
            FaultKind::Panic => {
                tracing::warn!(?point, "injected fault: the next batch's apply panics");
                self.panic_armed.store(true, Ordering::Relaxed);
                return Ok(());
            }
            kind => {
                crate::migration::fault::strike_process(kind);
                return Ok(());
            }
        }
        // Every connection closes with an RST; the session takes rebinds.
        tracing::warn!(
            ?point,
            "injected fault: resetting every channel of the session"
        );
        let chans: Vec<(ChannelId, DestChan)> = self
            .chans
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain()
            .collect();
        for (channel, c) in chans {
            crate::migration::fault::linger_zero(c.fd);
            c.stop.cancel();
            // A stopped task reports nothing: the session hears of it here.
            let why = ChannelLoss::Reset;
            let lost = MigrationError::ChannelLost { channel, why };
            let _ = self.events.send(Event::Failed(channel, c.gen, lost));
        }
        Ok(())
    }

    /// Takes connection `gen` of `chan` out of the channels replies may use,
    /// keeping it open until the session ends.
    pub(super) fn retire_channel(&self, chan: ChannelId, gen: u32) {
        let mut chans = self.chans.lock().unwrap_or_else(PoisonError::into_inner);
        if chans.get(&chan).is_some_and(|c| c.gen == gen) {
            let c = chans.remove(&chan).expect("checked");
            self.retired
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(c);
        }
    }

    /// Drops a lost connection from the channels replies may use.
    pub(super) fn forget_channel(&self, chan: ChannelId, gen: u32) {
        let mut chans = self.chans.lock().unwrap_or_else(PoisonError::into_inner);
        if chans.get(&chan).is_some_and(|c| c.gen == gen) {
            chans.remove(&chan);
        }
    }

    /// Sends a reply on channel `on` if it is up, else on any channel that
    /// is. A connection that takes nothing for `reply_wait` (its peer
    /// stopped reading) is stopped, and the next one tried.
    pub(super) async fn reply(&self, on: ChannelId, msg: &Message) -> Result<(), MigrationError> {
        type Writer = Arc<tokio::sync::Mutex<FrameWriter>>;
        let mut order: Vec<(ChannelId, u32, Writer)> = {
            let chans = self.chans.lock().unwrap_or_else(PoisonError::into_inner);
            let up = chans.iter();
            up.map(|(&i, c)| (i, c.gen, c.writer.clone())).collect()
        };
        order.sort_by_key(|&(i, _, _)| (i != on, i));
        let mut last = MigrationError::ChannelLost {
            channel: on,
            why: ChannelLoss::NoneUp,
        };
        for (channel, gen, w) in order {
            let header = Header {
                session_id: self.session_id,
                message_id: self.next_msg.fetch_add(1, Ordering::Relaxed),
                ..Header::new(msg.command())
            };
            let send = async { w.lock().await.send(header, msg).await };
            match tokio::time::timeout(self.reply_wait, send).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) => last = e,
                Err(_) => {
                    // It may hold half a frame now: it carries nothing
                    // more, and stays open until the session ends.
                    self.stop_channel(channel, gen);
                    self.retire_channel(channel, gen);
                    last = MigrationError::Timeout {
                        what: "the source to take a reply",
                        after: self.reply_wait,
                    };
                }
            }
        }
        Err(last)
    }
}
