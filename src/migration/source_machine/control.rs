//! The source machine's control messages: written one at a time, in order,
//! on one connection while it lives, and kept until an answer proves they
//! arrived.

use super::{ControlTx, SourceMachine};
use crate::wire::ChannelId;
use crate::wire::{Header, Message, FLAG_RESEND};

/// A control message written and not yet known to have arrived: sent
/// again on another channel when its connection fails. Nothing answers a
/// ROUND_END, so every control message stays here until the answer to a
/// later one proves the destination read it (READY: everything up to the
/// SWITCHOVER; COMPLETE or ABORT: everything). A connection that fails can
/// lose every frame its socket had taken, not just the last.
pub(super) struct Unconfirmed {
    pub id: u64,
    pub msg: Message,
    pub chan: ChannelId,
    pub gen: u32,
    pub resend: bool,
}

impl SourceMachine {
    /// Queues a control message; returns its message id.
    pub fn queue_control(&mut self, msg: Message) -> u64 {
        let id = self.take_id();
        self.controls.push_back((id, msg));
        id
    }

    /// Whether control message `id` has been written at least once.
    pub fn control_written(&self, id: u64) -> bool {
        self.control_written >= id
    }

    /// The control message to write now, one at a time and in order, on the
    /// connection the last one went on while it lives (else the
    /// lowest-numbered live one): lost ones again (flagged as resends)
    /// before any new one. `None` while one is being written, when none
    /// waits, or when no channel is live.
    pub fn poll_control(&mut self) -> Option<ControlTx> {
        if self.control_writing || self.closed {
            return None;
        }
        // Control messages keep to one connection while it lives: on two,
        // a later one could overtake an earlier one.
        let (chan, gen) = match self.control_chan {
            Some((c, g)) if self.is_live(c, g) => (c, g),
            _ => self.live_channel()?,
        };
        self.control_chan = Some((chan, gen));
        let session_id = self.session_id;
        let tx = |id, msg: &Message, resend: bool| ControlTx {
            chan,
            gen,
            header: Header {
                message_id: id,
                session_id,
                flags: if resend { FLAG_RESEND } else { 0 },
                ..Header::new(msg.command())
            },
            msg: msg.clone(),
        };
        if let Some(c) = self.unconfirmed.iter_mut().find(|c| c.resend) {
            (c.resend, c.chan, c.gen) = (false, chan, gen);
            self.control_writing = true;
            return Some(tx(c.id, &c.msg, true));
        }
        let (id, msg) = self.controls.pop_front()?;
        let out = tx(id, &msg, false);
        self.unconfirmed.push(Unconfirmed {
            id,
            msg,
            chan,
            gen,
            resend: false,
        });
        self.control_writing = true;
        Some(out)
    }

    /// The control message from [`poll_control`](Self::poll_control) was
    /// written (`ok`) or its write failed (the caller also reports the
    /// connection lost).
    pub fn control_done(&mut self, tx: &ControlTx, ok: bool) {
        self.control_writing = false;
        let current = self.is_live(tx.chan, tx.gen);
        if let Some(c) = self
            .unconfirmed
            .iter_mut()
            .find(|c| c.id == tx.header.message_id)
        {
            // Failed just after the write: its failure may have missed it.
            if !ok || !current {
                c.resend = true;
            }
        }
        if ok {
            self.control_written = self.control_written.max(tx.header.message_id);
        }
    }

    /// Whether a control message waits to be written.
    pub fn control_pending(&self) -> bool {
        !self.controls.is_empty() || self.unconfirmed.iter().any(|c| c.resend)
    }
}
