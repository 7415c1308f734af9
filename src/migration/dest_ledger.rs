//! The destination's ledgers, free of sockets and clocks: which batch ids
//! are claimed, applied or being read (each id is applied once, however
//! often a failing channel makes the source send it), and which control
//! messages were seen and what they were answered (one sent again gets the
//! same answer and is not acted on twice).
//!
//! A connection the source gave up on (silent past its timeout) may still
//! deliver what its socket held once the path clears, after the copies the
//! source sent again elsewhere: such a late original carries no resend flag
//! and is acknowledged and never applied. An id repeated without the flag
//! and never sent again is the peer's error.

use super::MigrationError;
use crate::migration::Violation;
use crate::wire::ChannelId;
use crate::wire::{Header, Message, FLAG_RESEND};
use std::collections::{HashMap, HashSet};

/// Where a batch's message id stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Its pages are being read into guest memory on this connection.
    Receiving {
        /// The channel.
        chan: ChannelId,
        /// Its connection.
        gen: u32,
    },
    /// Received whole and being applied.
    Applying,
    /// Applied (in this round).
    Done {
        /// Its round.
        round: u32,
    },
}

/// What a batch's id says on arrival.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claimed {
    /// New: check its round and apply it.
    New,
    /// A resend of an id already here: settle it.
    Repeat,
    /// A late copy of a batch that was sent again: acknowledge only.
    Stale,
}

/// What to do with a batch sent again whose id is already claimed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// Its first copy never landed: apply this one (now claimed `Applying`).
    Apply,
    /// It is applied: acknowledge only.
    AckOnly,
    /// Another connection still holds it (`Some`: reading it, and the source
    /// has given up on that connection, so stop it): wait and ask again.
    Wait(Option<(ChannelId, u32)>),
}

/// Batch ids seen this round and the last.
#[derive(Debug, Default)]
pub struct BatchLedger {
    claims: HashMap<u64, Claim>,
    /// Ids whose first copy came flagged as a resend, until their late
    /// original arrives (at most as many as batches were sent again).
    resent_first: HashSet<u64>,
}

impl BatchLedger {
    /// Claims a batch's id for `state` if it is new. A duplicate id
    /// without the resend flag, of a batch never sent again, is the peer's
    /// error.
    pub fn claim(&mut self, h: &Header, state: Claim) -> Result<Claimed, MigrationError> {
        let id = h.message_id;
        let resend = h.flags & FLAG_RESEND != 0;
        // The one copy without the flag of a batch first seen as a resend.
        let late = !resend && self.resent_first.remove(&id);
        if let std::collections::hash_map::Entry::Vacant(e) = self.claims.entry(id) {
            if late {
                // Its resend was applied, and its round has passed.
                return Ok(Claimed::Stale);
            }
            e.insert(state);
            if resend {
                self.resent_first.insert(id);
            }
            return Ok(Claimed::New);
        }
        match (resend, late) {
            (true, _) => Ok(Claimed::Repeat),
            (false, true) => Ok(Claimed::Stale),
            (false, false) => Err(Violation::Duplicate {
                channel: h.channel,
                id,
                command: h.command,
            }
            .into()),
        }
    }

    /// Moves `id` to `state`, or forgets it (`None`: its apply failed).
    pub fn set(&mut self, id: u64, state: Option<Claim>) {
        match state {
            Some(s) => self.claims.insert(id, s),
            None => self.claims.remove(&id),
        };
    }

    /// Settles a resend of `id`.
    pub fn settle(&mut self, id: u64) -> Settle {
        match self.claims.get(&id).copied() {
            None => {
                self.claims.insert(id, Claim::Applying);
                Settle::Apply
            }
            Some(Claim::Done { .. }) => Settle::AckOnly,
            Some(Claim::Applying) => Settle::Wait(None),
            Some(Claim::Receiving { chan, gen }) => Settle::Wait(Some((chan, gen))),
        }
    }

    /// Forgets what connection `gen` of `chan`, which ended, was reading.
    pub fn release(&mut self, chan: ChannelId, gen: u32) {
        self.claims
            .retain(|_, c| *c != Claim::Receiving { chan, gen });
    }

    /// Round `round` began: every batch of earlier rounds was acknowledged,
    /// so none comes again.
    pub fn round_began(&mut self, round: u32) {
        self.claims
            .retain(|_, c| !matches!(c, Claim::Done { round: r } if *r < round));
    }

    /// Ids remembered now.
    pub fn len(&self) -> usize {
        self.claims.len()
    }

    /// Whether none is remembered.
    pub fn is_empty(&self) -> bool {
        self.claims.is_empty()
    }
}

/// What a control message's id says.
#[derive(Debug, Clone, PartialEq)]
pub enum Seen {
    /// First time: act on it.
    New,
    /// Sent again: do not act; send this answer again, if it had one.
    Again(Option<Message>),
}

/// Control message ids seen, and the last answer with the id it answered.
#[derive(Debug, Default)]
pub struct ControlLog {
    seen: HashSet<u64>,
    resent_first: HashSet<u64>,
    last_reply: Option<(u64, Message)>,
}

impl ControlLog {
    /// Records a control message's id. A repeat without the resend flag is
    /// the peer's error.
    pub fn see(&mut self, h: &Header) -> Result<Seen, MigrationError> {
        let resend = h.flags & FLAG_RESEND != 0;
        let late = !resend && self.resent_first.remove(&h.message_id);
        if self.seen.insert(h.message_id) {
            if resend {
                self.resent_first.insert(h.message_id);
            }
            return Ok(Seen::New);
        }
        if late {
            // The original of one sent again, arriving after it.
            return Ok(Seen::Again(None));
        }
        if !resend {
            return Err(Violation::Duplicate {
                channel: h.channel,
                id: h.message_id,
                command: h.command,
            }
            .into());
        }
        Ok(Seen::Again(
            self.last_reply
                .as_ref()
                .filter(|(id, _)| *id == h.message_id)
                .map(|(_, m)| m.clone()),
        ))
    }

    /// Records the answer to control message `id`.
    pub fn replied(&mut self, id: u64, reply: &Message) {
        self.last_reply = Some((id, reply.clone()));
    }

    /// The last answer, to send again to a GO repeated after the session
    /// ended.
    pub fn last_reply(&self) -> Option<&Message> {
        self.last_reply.as_ref().map(|(_, m)| m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Command;

    fn batch(id: u64, resend: bool) -> Header {
        Header {
            message_id: id,
            flags: if resend { FLAG_RESEND } else { 0 },
            ..Header::new(Command::PageBatch)
        }
    }

    #[test]
    fn each_batch_id_is_applied_once() {
        let mut l = BatchLedger::default();
        let reading = Claim::Receiving {
            chan: ChannelId(1),
            gen: 0,
        };
        assert_eq!(l.claim(&batch(7, false), reading).unwrap(), Claimed::New);
        assert!(l.claim(&batch(7, false), Claim::Applying).is_err());
        assert_eq!(
            l.claim(&batch(7, true), Claim::Applying).unwrap(),
            Claimed::Repeat
        );
        assert_eq!(l.settle(7), Settle::Wait(Some((ChannelId(1), 0))));
        l.release(ChannelId(1), 0);
        assert_eq!(l.settle(7), Settle::Apply);
        assert_eq!(l.settle(7), Settle::Wait(None));
        l.set(7, Some(Claim::Done { round: 0 }));
        assert_eq!(l.settle(7), Settle::AckOnly);
        l.round_began(1);
        assert!(l.is_empty());
    }

    #[test]
    fn a_late_original_after_its_resend_is_acknowledged_and_never_applied() {
        let mut l = BatchLedger::default();
        assert_eq!(
            l.claim(&batch(3, true), Claim::Applying).unwrap(),
            Claimed::New
        );
        l.set(3, Some(Claim::Done { round: 0 }));
        assert_eq!(
            l.claim(&batch(3, false), Claim::Applying).unwrap(),
            Claimed::Stale
        );
        // Once: another copy without the flag is a replay.
        assert!(l.claim(&batch(3, false), Claim::Applying).is_err());
        // Still so once its round has passed and the ledger forgot it.
        assert_eq!(
            l.claim(&batch(5, true), Claim::Applying).unwrap(),
            Claimed::New
        );
        l.set(5, Some(Claim::Done { round: 0 }));
        l.round_began(1);
        assert_eq!(
            l.claim(&batch(5, false), Claim::Applying).unwrap(),
            Claimed::Stale
        );
        // An id never sent again stays an error to repeat.
        assert_eq!(
            l.claim(&batch(4, false), Claim::Applying).unwrap(),
            Claimed::New
        );
        assert!(l.claim(&batch(4, false), Claim::Applying).is_err());
    }

    #[test]
    fn a_control_message_sent_again_gets_the_same_answer() {
        let mut log = ControlLog::default();
        let go = |resend| Header {
            message_id: 9,
            flags: if resend { FLAG_RESEND } else { 0 },
            ..Header::new(Command::Go)
        };
        assert_eq!(log.see(&go(false)).unwrap(), Seen::New);
        assert!(log.see(&go(false)).is_err());
        assert_eq!(log.see(&go(true)).unwrap(), Seen::Again(None));
        let done = Message::Go;
        log.replied(9, &done);
        assert_eq!(log.see(&go(true)).unwrap(), Seen::Again(Some(done)));
        // Sent again first, its original late: not acted on, no error.
        let end = |resend| Header {
            message_id: 4,
            flags: if resend { FLAG_RESEND } else { 0 },
            ..Header::new(Command::RoundEnd)
        };
        assert_eq!(log.see(&end(true)).unwrap(), Seen::New);
        assert_eq!(log.see(&end(false)).unwrap(), Seen::Again(None));
        assert!(
            log.see(&end(false)).is_err(),
            "a second original is a replay"
        );
    }
}
