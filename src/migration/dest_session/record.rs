//! What a completed session leaves behind when its linger ends early: the
//! COMPLETE it sent, for a source whose copy of it was lost.
//!
//! A source closing its last connection right after COMPLETE went out
//! usually read it, and the session reports at once. But a source whose GO
//! stalled may give up on that connection just as GO gets through: its
//! close then arrives right behind GO, and looks the same. Such a source
//! rebinds and sends GO again. Until the linger's full deadline the
//! receiver keeps this record (with the session's bind secret and spent
//! nonces, so only a proved bind reaches it) and answers that GO with the
//! same COMPLETE. It holds no memory and no slot.

use crate::wire::{Header, Message};
use std::time::Instant;

/// A completed session's answer to GO, kept until `until`.
#[derive(Debug, Clone, PartialEq)]
pub struct Completed {
    go_id: u64,
    complete: Message,
    until: Instant,
}

impl Completed {
    /// The record of a session that answered GO `go_id` with `complete`,
    /// kept until `until`.
    pub(super) fn new(go_id: u64, complete: Message, until: Instant) -> Self {
        Self {
            go_id,
            complete,
            until,
        }
    }

    /// When it is forgotten.
    pub fn until(&self) -> Instant {
        self.until
    }

    /// Whether it is past its time at `now`.
    pub fn expired(&self, now: Instant) -> bool {
        now >= self.until
    }

    /// The answer to `msg` arriving at `now` on a connection bound to the
    /// record: the same COMPLETE for the same GO sent again, nothing for
    /// anything else (the session is over; a new GO is no resend).
    pub fn answer(&self, now: Instant, header: &Header, msg: &Message) -> Option<Message> {
        let again = matches!(msg, Message::Go) && header.message_id == self.go_id;
        (again && !self.expired(now)).then(|| self.complete.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Command, Complete};
    use std::time::Duration;

    fn record(now: Instant) -> Completed {
        let complete = Message::Complete(Complete {
            destination_cpu_ms: 7,
            resumed: true,
        });
        Completed::new(9, complete, now + Duration::from_secs(1))
    }

    fn go(id: u64) -> Header {
        Header {
            message_id: id,
            ..Header::new(Command::Go)
        }
    }

    #[test]
    fn the_same_go_gets_the_same_complete_until_the_deadline() {
        let t = Instant::now();
        let r = record(t);
        let got = r.answer(t, &go(9), &Message::Go);
        assert!(matches!(got, Some(Message::Complete(c)) if c.destination_cpu_ms == 7));
        assert_eq!(
            r.answer(t + Duration::from_secs(1), &go(9), &Message::Go),
            None
        );
        assert!(r.expired(r.until()));
    }

    #[test]
    fn another_go_or_message_gets_nothing() {
        let t = Instant::now();
        let r = record(t);
        assert_eq!(r.answer(t, &go(10), &Message::Go), None);
        let h = Header {
            message_id: 9,
            ..Header::new(Command::Abort)
        };
        let abort = Message::Abort(crate::wire::Abort {
            code: crate::wire::AbortCode::Cancelled,
            message: String::new(),
        });
        assert_eq!(r.answer(t, &h, &abort), None);
    }
}
