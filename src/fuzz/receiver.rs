//! The receiver's property: any sequence of messages, fed to the
//! destination's protocol machine and, once a session is set up, to its
//! session machine as the receiver's tasks and controller feed it.

use super::FUZZ_GUEST_PAGES;
use crate::digest::{page_hash, zero_page_hash, PageHashes};
use crate::migration::dest_ledger::{Claim, Claimed, Settle};
use crate::migration::dest_session::{DestEvent, DestParams, DestSession};
use crate::migration::dest_state::{DestMachine, DestState};
use crate::migration::MigrationError;
use crate::wire::PAGE_SIZE;
use crate::wire::{ChannelId, Command, Header, Limits, Message, Page, PageBatch, FLAG_RESEND};
use bytes::Bytes;
use std::time::{Duration, Instant};

/// A record's command byte: the command in its low five bits; bit 5 puts
/// the frame on channel 1 (else 0), bit 6 repeats the last message id (else
/// a fresh one), bit 7 sets the resend flag.
struct Tag {
    byte: u8,
    command: Option<Command>,
    channel: ChannelId,
    repeat: bool,
    resend: bool,
}

impl Tag {
    fn of(byte: u8) -> Self {
        Self {
            byte,
            command: Command::from_u8(byte & 0x1f),
            channel: ChannelId(u16::from(byte >> 5 & 1)),
            repeat: byte & 0x40 != 0,
            resend: byte & 0x80 != 0,
        }
    }
}

/// The session as the property drives it.
struct Receiver {
    machine: Option<DestMachine>,
    session: Option<DestSession>,
    hashes: PageHashes,
    limits: Limits,
    scratch: Vec<u8>,
    verified: bool,
    now: Instant,
    rx: u64,
}

/// Reads `data` as records `[tag u8][length u16 LE][payload]` and feeds
/// their messages to the receiver's machines (see [`Tag`]), applying the
/// batches they accept to the page hashes of a guest of
/// [`FUZZ_GUEST_PAGES`] (as the receiver does). Must not panic; every page
/// touched is inside the guest; a malformed or unexpected message aborts
/// the session, which never leaves `Aborted`; `Running` is reached only
/// through a SWITCHOVER whose digest matches the pages applied; READY goes
/// out only then, COMPLETE only once the guest runs, and no ABORT after
/// it does. Returns the final state.
pub fn receiver(data: &[u8]) -> DestState {
    let mut r = Receiver {
        machine: Some(DestMachine::new(FUZZ_GUEST_PAGES * PAGE_SIZE as u64)),
        session: None,
        hashes: PageHashes::new(FUZZ_GUEST_PAGES),
        limits: Limits::BEFORE_SETUP,
        scratch: Vec::new(),
        verified: false,
        now: Instant::now(),
        rx: 0,
    };
    let mut id = 0u64;
    let mut rest = data;
    while let Some((&[tag, l0, l1], tail)) = rest.split_first_chunk::<3>() {
        let len = usize::from(u16::from_le_bytes([l0, l1])).min(tail.len());
        let (payload, next) = tail.split_at(len);
        rest = next;
        let tag = Tag::of(tag);
        if !tag.repeat {
            id += 1;
        }
        let before = r.state();
        r.record(&tag, id, payload);
        if before == DestState::Aborted {
            assert_eq!(r.state(), DestState::Aborted, "left Aborted");
        }
        if before == DestState::Running {
            assert_eq!(r.state(), DestState::Running, "left Running");
        }
        if r.state() == DestState::Running {
            assert!(r.verified, "running without a verified switchover");
        }
    }
    r.state()
}

impl Receiver {
    fn state(&self) -> DestState {
        match (&self.session, &self.machine) {
            (Some(s), _) => s.state(),
            (None, Some(m)) => m.state(),
            (None, None) => DestState::Aborted,
        }
    }

    /// One record: before the setup to the protocol machine, after it to
    /// the session machine.
    fn record(&mut self, tag: &Tag, id: u64, payload: &[u8]) {
        self.now += Duration::from_millis(1);
        self.rx += payload.len() as u64 + 1;
        let Some(command) = tag.command else {
            let unknown = crate::wire::DecodeError::UnknownCommand { command: tag.byte };
            return self.fail(unknown.into());
        };
        let header = Header {
            channel: tag.channel,
            message_id: id,
            flags: if tag.resend { FLAG_RESEND } else { 0 },
            payload_len: payload.len() as u32,
            ..Header::new(command)
        };
        let msg = match Message::decode(&header, Bytes::copy_from_slice(payload), self.limits) {
            Ok(m) => m,
            Err(e) => return self.fail(e.into()),
        };
        match self.session.as_mut() {
            None => self.setup_step(msg),
            Some(s) => {
                s.handle_timeout(self.now, self.rx);
                match msg {
                    Message::PageBatch(b) => self.batch(&header, b),
                    m => {
                        s.handle_control(self.now, &header, m);
                        self.carry_out();
                    }
                }
            }
        }
        self.drain();
    }

    fn fail(&mut self, e: MigrationError) {
        match (&mut self.session, &mut self.machine) {
            (Some(s), _) => s.fail(e),
            (None, Some(m)) => m.abort(),
            (None, None) => {}
        }
    }

    /// NEGOTIATE and SESSION_SETUP; a setup taken makes the session, its
    /// two channels bound.
    fn setup_step(&mut self, msg: Message) {
        let Some(m) = self.machine.as_mut() else {
            return;
        };
        let ok = match msg {
            Message::Negotiate(n) => m.handle_negotiate(&n).is_ok(),
            Message::SessionSetup(s) => match m.handle_setup(&s) {
                Ok(l) => {
                    assert!(l.guest_pages <= FUZZ_GUEST_PAGES);
                    self.limits = l;
                    let params = DestParams {
                        channels: 2,
                        idle_timeout: Duration::from_secs(10),
                        leave_paused: false,
                    };
                    let machine = self.machine.take().expect("here");
                    let mut session = DestSession::new(machine, params, self.now, self.now);
                    session.handle_bound(self.now, ChannelId(0), 1);
                    session.handle_bound(self.now, ChannelId(1), 1);
                    self.session = Some(session);
                    return;
                }
                Err(_) => false,
            },
            _ => false,
        };
        if !ok {
            m.abort();
        }
    }
}

/// After the setup: batches through the ledger, hand-off steps carried out
/// as the controller does, replies checked.
impl Receiver {
    fn batch(&mut self, header: &Header, b: PageBatch) {
        let Some(s) = self.session.as_mut() else {
            return;
        };
        let fresh = match s.claim_batch(header, b.round, Claim::Applying) {
            Ok(Claimed::New) => true,
            Ok(Claimed::Stale) => false,
            Ok(Claimed::Repeat) => match s.settle_resend(header.message_id, b.round) {
                Ok(Settle::Apply) => true,
                Ok(_) => false,
                Err(e) => return s.handle_lost(self.now, header.channel, 1, e),
            },
            Err(e) => return s.handle_lost(self.now, header.channel, 1, e),
        };
        if !fresh {
            return;
        }
        let (hashes, limits) = (&self.hashes, self.limits);
        let applied = b.apply(&mut self.scratch, |page, kind| {
            assert!(page.0 < limits.guest_pages, "page {page} outside the guest");
            let h = match kind {
                Page::Data(bytes) => page_hash(bytes),
                // This model holds hashes, not memory: a reference copies
                // its target's (the receiver checks the target's bytes
                // against the reference's keyed tag first).
                Page::Same { target, .. } => hashes.get(target),
                // Nor does it hold the region a patch names: its ops are
                // applied to zeros (the receiver checks the region's tag
                // first, and fails the session on ops that build no page).
                Page::Patch { ops, .. } => {
                    let mut out = [0u8; PAGE_SIZE];
                    match crate::wire::patch::apply(&[0u8; PAGE_SIZE], ops, &mut out) {
                        Ok(()) => page_hash(&out),
                        Err(_) => zero_page_hash(),
                    }
                }
                _ => zero_page_hash(),
            };
            hashes.set(page, h);
        });
        match applied {
            Ok(()) => s.set_claim(header.message_id, Some(Claim::Done { round: b.round })),
            Err(e) => {
                s.set_claim(header.message_id, None);
                s.handle_lost(self.now, header.channel, 1, e.into());
            }
        }
    }

    /// The hand-off steps the session asks for.
    fn carry_out(&mut self) {
        let Some(s) = self.session.as_mut() else {
            return;
        };
        while let Some(event) = s.poll_event() {
            match event {
                DestEvent::Verify(sw) => {
                    let digest = self.hashes.digest();
                    if s.handle_digest(&sw, digest) {
                        assert_eq!(sw.digest, digest, "a switchover taken with another digest");
                        self.verified = true;
                        s.ready();
                    }
                }
                DestEvent::Go { resume } => {
                    assert!(resume, "the setup did not ask to leave it paused");
                    s.handle_resumed(self.now);
                    s.complete(self.now, 0);
                }
            }
        }
    }

    /// What the session sends: READY only after a verified switchover,
    /// COMPLETE only once the guest runs, no ABORT after it does.
    fn drain(&mut self) {
        let Some(s) = self.session.as_mut() else {
            return;
        };
        let running = s.state() == DestState::Running;
        while let Some(reply) = s.poll_transmit() {
            match reply.msg {
                Message::Ready(_) => assert!(self.verified, "READY without a verified digest"),
                Message::Complete(_) => assert!(running, "COMPLETE before GO"),
                Message::Abort(_) => assert!(!running, "ABORT after GO"),
                ref m => panic!("the session sent {:?}", m.command()),
            }
        }
    }
}
