//! The simulated destination: the real session machine ([`DestSession`],
//! with the protocol machine and ledgers inside), guest memory as one
//! version number per page, and the receiver's fault points around it.

use super::digest;
use super::net::{Frame, Payload};
use crate::migration::dest_ledger::{Claim, Claimed, Settle};
use crate::migration::dest_session::{DestEvent, DestParams, DestSession};
use crate::migration::dest_state::{DestMachine, DestState};
use crate::migration::fault::{FaultKind, FaultPoint};
use crate::migration::Shortfall;
use crate::migration::{ChannelLoss, LocalFault, MigrationError};
use crate::wire::ChannelId;
use crate::wire::{BatchAck, Command, Complete, Header, Message, Negotiate};
use crate::wire::{SessionSetup, VERSION};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// The destination's idle timeout in the simulation.
const IDLE: Duration = Duration::from_secs(10);

/// The destination of one simulated session.
pub struct SimDest {
    pub session: DestSession,
    pub memory: Vec<u64>,
    pub session_id: u64,
    /// Frames received, for the session's watchdog.
    rx: u64,
    pub crashed: bool,
    /// Stopped rather than dead: its sockets take connections, nothing answers.
    pub silent: bool,
    /// The fault to inject at a point of the protocol, until it has been,
    /// and one struck that the network must carry out (a reset, a crash).
    pub fault: Option<(FaultPoint, FaultKind)>,
    pub struck: Option<FaultKind>,
    pub hostile: Option<Hostile>,
    round0_applied: u64,
    /// Connections bound to what the session left once it ended early.
    late: BTreeSet<(ChannelId, u32)>,
}

/// What the destination sends back: a frame on a channel of its choosing.
pub type Reply = (ChannelId, Header, Message);

/// The message id that marks a hostile destination's frame (its honest
/// frames carry 0).
pub const HOSTILE_ID: u64 = u64::MAX;

/// What a hostile (or broken) destination sends the source, once: issue 7's
/// protocol-level cases from the destination's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hostile {
    /// An acknowledgement of a batch never sent.
    AckUnknown,
    /// A real acknowledgement granting credits past the window.
    GrantOverflow,
    /// READY before any SWITCHOVER.
    EarlyReady,
    /// COMPLETE before any GO.
    EarlyComplete,
    /// A READY whose digest is not the memory's.
    WrongDigest,
}

impl SimDest {
    /// A destination set up for `pages` pages over `channels` channels,
    /// every one bound (as connection 0) at `now`.
    pub fn new(pages: u64, channels: u16, session_id: u64, now: Instant) -> Self {
        let mut machine = DestMachine::new(u64::MAX);
        let negotiate = Negotiate {
            min_version: VERSION,
            max_version: VERSION,
            capabilities: 0,
            codecs: 1,
            page_size: crate::memory::PAGE_SIZE as u32,
            nonce: [0; 16],
        };
        machine.handle_negotiate(&negotiate).expect("negotiates");
        let setup = SessionSetup {
            codec: 0,
            ..SessionSetup::plain(pages * crate::memory::PAGE_SIZE as u64, channels)
        };
        machine.handle_setup(&setup).expect("sets up");
        let params = DestParams {
            channels,
            idle_timeout: IDLE,
            leave_paused: false,
        };
        let mut session = DestSession::new(machine, params, now, now);
        for c in 0..channels {
            session.handle_bound(now, ChannelId(c), 0);
        }
        Self {
            session,
            memory: vec![0; pages as usize],
            session_id,
            rx: 0,
            crashed: false,
            silent: false,
            fault: None,
            struck: None,
            hostile: None,
            round0_applied: 0,
            late: BTreeSet::new(),
        }
    }

    /// The same destination, faulting at `fault`'s point.
    pub fn faulting(mut self, fault: Option<(FaultPoint, FaultKind)>) -> Self {
        self.fault = fault;
        self
    }

    /// The same destination, hostile in one way.
    pub fn hostile(mut self, hostile: Option<Hostile>) -> Self {
        self.hostile = hostile;
        self
    }

    /// The protocol's state.
    pub fn state(&self) -> DestState {
        self.session.state()
    }

    /// Whether the guest runs here.
    pub fn running(&self) -> bool {
        self.state() == DestState::Running && !self.crashed
    }

    /// Why it ended the session, if it failed.
    pub fn ended(&self) -> Option<String> {
        match self.session.outcome() {
            Some(Err(e)) => Some(e.to_string()),
            _ => None,
        }
    }

    /// Whether a connection attempt is refused at `now`: by a dead process,
    /// or a session that ended, unless it left a record of COMPLETE.
    pub fn refuses_binds(&self, now: Instant) -> bool {
        self.crashed && !self.silent || !self.session.takes_binds() && !self.keeps_record(now)
    }

    /// Whether the ended session's record of COMPLETE is kept at `now`.
    fn keeps_record(&self, now: Instant) -> bool {
        let left = self.session.completed();
        left.is_some_and(|c| !c.expired(now))
    }

    /// Whether only the ended session's record answers: each reply on the
    /// connection its frame came on.
    pub fn answers_late(&self) -> bool {
        self.session.completed().is_some()
    }

    /// The connections it reads, by channel.
    pub fn connections(&self) -> Vec<(ChannelId, u32)> {
        self.session.connections().collect()
    }

    /// The session's watchdog and linger at `now`; returns what it sends
    /// (an ABORT when the source fell silent).
    pub fn tick(&mut self, now: Instant) -> Vec<Reply> {
        let mut out = Vec::new();
        if !self.crashed {
            self.session.handle_timeout(now, self.rx);
            self.drain(&mut out);
        }
        out
    }

    /// When [`SimDest::tick`] is next due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        (!self.crashed)
            .then(|| self.session.poll_timeout())
            .flatten()
    }

    /// A connection broke: the session hears it as the receiver's channel
    /// task reports it.
    pub fn lost(&mut self, now: Instant, chan: ChannelId, gen: u32) {
        self.late.remove(&(chan, gen));
        let why = ChannelLoss::Reset;
        self.session.handle_lost(
            now,
            chan,
            gen,
            MigrationError::ChannelLost { channel: chan, why },
        );
    }

    /// Connection `gen` of `chan` bound, replacing the one before.
    pub fn bound(&mut self, now: Instant, chan: ChannelId, gen: u32) {
        if self.session.is_ended() && self.keeps_record(now) {
            self.late.insert((chan, gen));
            return;
        }
        self.session.handle_bound(now, chan, gen);
    }

    /// A frame on a connection bound to the ended session's record: GO
    /// sent again gets COMPLETE again, ECHO its answer, the rest nothing.
    fn late_frame(&mut self, now: Instant, f: Frame) -> Vec<Reply> {
        let (Some(left), true) = (
            self.session.completed(),
            self.late.contains(&(f.chan, f.gen)),
        ) else {
            return Vec::new();
        };
        // Past its time the receiver closed the connection: nothing answers.
        if left.expired(now) {
            self.late.remove(&(f.chan, f.gen));
            return Vec::new();
        }
        let answer = match f.payload {
            Payload::Eof => {
                self.late.remove(&(f.chan, f.gen));
                None
            }
            Payload::Msg(Message::Echo(e)) => Some(Message::EchoResponse(e)),
            Payload::Msg(m) => left.answer(now, &f.header, &m),
            Payload::Batch { .. } => None,
        };
        answer
            .map(|m| (f.chan, self.header(m.command()), m))
            .into_iter()
            .collect()
    }

    /// Injects the fault if it is for `point` (once), as the receiver's
    /// `fault_at` does: an abort ends the session, a reset or a crash is
    /// left for the network to carry out once this frame's answers are out.
    fn fault_at(&mut self, point: FaultPoint) -> Result<(), MigrationError> {
        match self.fault {
            Some((p, kind)) if p == point => {
                self.fault = None;
                match kind {
                    FaultKind::Abort => return Err(Shortfall::Injected(point).into()),
                    // A task of the receiver's own panics.
                    FaultKind::Panic => {
                        return Err(MigrationError::Internal(LocalFault::Task {
                            task: crate::migration::Task::Apply,
                            panicked: true,
                        }))
                    }
                    _ => {}
                }
                self.struck = Some(kind);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn header(&self, command: Command) -> Header {
        Header {
            session_id: self.session_id,
            ..Header::new(command)
        }
    }

    /// Handles a frame at `now`; returns what to send back.
    pub fn handle(&mut self, now: Instant, f: Frame) -> Vec<Reply> {
        if self.crashed {
            return Vec::new();
        }
        if self.session.is_ended() {
            return self.late_frame(now, f);
        }
        if !self.session.is_current(f.chan, f.gen) {
            return Vec::new();
        }
        let mut out = Vec::new();
        match f.payload {
            Payload::Eof => {
                let closed = MigrationError::PeerClosed { channel: f.chan };
                self.session.handle_lost(now, f.chan, f.gen, closed);
            }
            Payload::Batch { round, pages } => {
                self.rx += 1;
                match self.batch(f.chan, &f.header, round, &pages) {
                    Ok(replies) => out = replies,
                    // The channel's task fails, and the session with it.
                    Err(e) => self.session.handle_lost(now, f.chan, f.gen, e),
                }
            }
            Payload::Msg(Message::Echo(e)) => {
                self.rx += 1;
                let echo = Message::EchoResponse(e);
                out.push((f.chan, self.header(Command::EchoResponse), echo));
            }
            Payload::Msg(m) => {
                self.rx += 1;
                self.session.handle_control(now, &f.header, m);
                self.carry_out(now);
            }
        }
        self.drain(&mut out);
        out
    }

    /// Carries out the hand-off steps the session asks for, with the
    /// receiver's fault points around them.
    fn carry_out(&mut self, now: Instant) {
        while let Some(event) = self.session.poll_event() {
            let done = match event {
                DestEvent::Verify(sw) => self.fault_at(FaultPoint::BeforeReady).map(|()| {
                    if self.session.handle_digest(&sw, digest(&self.memory)) {
                        self.session.ready();
                    }
                }),
                DestEvent::Go { .. } => self.fault_at(FaultPoint::AfterGo).map(|()| {
                    self.session.handle_resumed(now);
                    self.session.complete(now, 0);
                }),
            };
            if let Err(e) = done {
                self.session.fail(e);
            }
        }
    }

    /// What the session sends; AFTER_READY strikes once READY is out, and a
    /// hostile destination spoils the READY it sends.
    fn drain(&mut self, out: &mut Vec<Reply>) {
        while let Some(r) = self.session.poll_transmit() {
            let mut header = self.header(r.msg.command());
            let mut msg = r.msg;
            let ready = matches!(msg, Message::Ready(_));
            if let (Message::Ready(ready), Some(Hostile::WrongDigest)) = (&mut msg, self.hostile) {
                ready.digest ^= 1;
                header.message_id = HOSTILE_ID;
            }
            out.push((r.on, header, msg));
            if ready {
                if let Err(e) = self.fault_at(FaultPoint::AfterReady) {
                    self.session.fail(e);
                }
            }
        }
    }

    fn batch(
        &mut self,
        chan: ChannelId,
        h: &Header,
        round: u32,
        pages: &[(u64, u64)],
    ) -> Result<Vec<Reply>, MigrationError> {
        self.fault_at(FaultPoint::BeforeRound0)?;
        let fresh = match self.session.claim_batch(h, round, Claim::Applying)? {
            Claimed::New => true,
            Claimed::Stale => false,
            Claimed::Repeat => match self.session.settle_resend(h.message_id, round)? {
                Settle::Apply => true,
                Settle::AckOnly => false,
                Settle::Wait(_) => {
                    return Err(MigrationError::Internal(LocalFault::Unreachable(
                        "a batch is applied at once here: nothing to wait for",
                    )))
                }
            },
        };
        if fresh {
            for &(page, version) in pages {
                self.memory[page as usize] = version;
            }
            self.session
                .set_claim(h.message_id, Some(Claim::Done { round }));
            if round == 0 {
                self.round0_applied += pages.len() as u64;
                if self.round0_applied * 2 >= self.memory.len() as u64 {
                    self.fault_at(FaultPoint::MidRound)?;
                }
            }
        }
        let ack = BatchAck {
            message_id: h.message_id,
            pages: pages.len() as u32,
        };
        let header = Header {
            credit_grant: 1,
            ..self.header(Command::BatchAck)
        };
        let mut out = vec![(chan, header, Message::BatchAck(ack))];
        if fresh {
            self.misbehave(chan, &mut out);
        }
        Ok(out)
    }

    /// A hostile destination's one bad frame, at its first fresh batch.
    fn misbehave(&mut self, chan: ChannelId, out: &mut Vec<Reply>) {
        let marked = |command| Header {
            message_id: HOSTILE_ID,
            ..Header::new(command)
        };
        let bad = match self.hostile {
            Some(Hostile::AckUnknown) => Message::BatchAck(BatchAck {
                message_id: 1 << 40,
                pages: 1,
            }),
            Some(Hostile::GrantOverflow) => {
                out[0].1.credit_grant = u16::MAX;
                out[0].1.message_id = HOSTILE_ID;
                self.hostile = None;
                return;
            }
            Some(Hostile::EarlyReady) => Message::Ready(crate::wire::Ready { digest: 0 }),
            Some(Hostile::EarlyComplete) => Message::Complete(Complete {
                destination_cpu_ms: 0,
                resumed: true,
            }),
            Some(Hostile::WrongDigest) | None => return,
        };
        self.hostile = None;
        out.push((chan, marked(bad.command()), bad));
    }
}
