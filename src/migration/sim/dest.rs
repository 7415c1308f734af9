//! The simulated destination: the real protocol state machine and ledgers,
//! guest memory as one version number per page.

use super::digest;
use super::net::{Frame, Payload};
use crate::migration::dest_ledger::{BatchLedger, Claim, Claimed, ControlLog, Seen, Settle};
use crate::migration::dest_state::{DestMachine, DestState};
use crate::migration::fault::{FaultKind, FaultPoint};
use crate::migration::MigrationError;
use crate::migration::{Shortfall, Violation};
use crate::wire::ChannelId;
use crate::wire::{BatchAck, Command, Complete, Header, Message, Negotiate};
use crate::wire::{SessionSetup, VERSION};

/// The destination of one simulated session.
pub struct SimDest {
    pub machine: DestMachine,
    pub memory: Vec<u64>,
    ledger: BatchLedger,
    control: ControlLog,
    pub session_id: u64,
    /// Connections it reads, by channel.
    pub conns: std::collections::BTreeMap<ChannelId, u32>,
    /// When a frame last arrived on any channel.
    pub last_rx: u64,
    pub crashed: bool,
    /// Stopped rather than dead: its sockets take connections, nothing answers.
    pub silent: bool,
    /// Why it ended the session, if it did.
    pub ended: Option<String>,
    /// The fault to inject at a point of the protocol, until it has been,
    /// and one struck that the network must carry out (a reset, a crash).
    pub fault: Option<(FaultPoint, FaultKind)>,
    pub struck: Option<FaultKind>,
    pub hostile: Option<Hostile>,
    round0_applied: u64,
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
    pub fn new(pages: u64, channels: u16, session_id: u64, now: u64) -> Self {
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
        Self {
            machine,
            memory: vec![0; pages as usize],
            ledger: BatchLedger::default(),
            control: ControlLog::default(),
            session_id,
            conns: (0..channels).map(|c| (ChannelId(c), 0)).collect(),
            last_rx: now,
            crashed: false,
            silent: false,
            ended: None,
            fault: None,
            struck: None,
            hostile: None,
            round0_applied: 0,
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

    /// Whether the guest runs here.
    pub fn running(&self) -> bool {
        self.machine.state() == DestState::Running && !self.crashed
    }

    /// Ends the session with `why` (unless the guest is already ours).
    pub fn end(&mut self, why: String) {
        self.machine.abort();
        if self.machine.state() != DestState::Running {
            self.ended.get_or_insert(why);
        }
    }

    /// A connection closed: what it was reading is forgotten.
    pub fn lost(&mut self, chan: ChannelId, gen: u32) {
        if self.conns.get(&chan) == Some(&gen) {
            self.conns.remove(&chan);
        }
        self.ledger.release(chan, gen);
    }

    /// Connection `gen` of `chan` bound, replacing the one before.
    pub fn bound(&mut self, chan: ChannelId, gen: u32) {
        if let Some(old) = self.conns.insert(chan, gen) {
            self.ledger.release(chan, old);
        }
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
                        return Err(MigrationError::Internal(format!(
                            "injected panic at {point:?}"
                        )))
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

    /// Handles a frame; returns what to send back, or ends the session.
    pub fn handle(&mut self, now: u64, f: Frame) -> Vec<Reply> {
        if self.crashed || self.ended.is_some() || self.conns.get(&f.chan) != Some(&f.gen) {
            return Vec::new();
        }
        if let Payload::Eof = f.payload {
            self.lost(f.chan, f.gen);
            return Vec::new();
        }
        self.last_rx = now;
        let result = match f.payload {
            Payload::Eof => Ok(Vec::new()),
            Payload::Batch { round, pages } => self.batch(f.chan, &f.header, round, &pages),
            Payload::Msg(m) => self.message(f.chan, &f.header, m),
        };
        match result {
            Ok(replies) => replies,
            Err(e) => {
                let abort = (f.chan, self.header(Command::Abort), abort_of(&e));
                self.end(e.to_string());
                vec![abort]
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
        let fresh = match self.ledger.claim(h, Claim::Applying)? {
            Claimed::New => true,
            Claimed::Stale => false,
            Claimed::Repeat => match self.ledger.settle(h.message_id) {
                Settle::Apply => true,
                Settle::AckOnly => false,
                Settle::Wait(_) => {
                    return Err(MigrationError::Internal(
                        "a batch is applied at once here: nothing to wait for".into(),
                    ))
                }
            },
        };
        if fresh {
            self.machine.check_batch(round)?;
            for &(page, version) in pages {
                self.memory[page as usize] = version;
            }
            self.ledger.set(h.message_id, Some(Claim::Done { round }));
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

    fn message(
        &mut self,
        chan: ChannelId,
        h: &Header,
        m: Message,
    ) -> Result<Vec<Reply>, MigrationError> {
        if let Message::Echo(e) = m {
            return Ok(vec![(
                chan,
                self.header(Command::EchoResponse),
                Message::EchoResponse(e),
            )]);
        }
        match self.control.see(h)? {
            Seen::Again(Some(reply)) => {
                return Ok(vec![(chan, self.header(reply.command()), reply)])
            }
            Seen::Again(None) => return Ok(Vec::new()),
            Seen::New => {}
        }
        let reply = match m {
            Message::Abort(a) => {
                self.end(format!("the source aborted: {}", a.message));
                return Ok(Vec::new());
            }
            Message::RoundEnd(r) => {
                self.machine.handle_round_end(&r)?;
                self.ledger.round_began(r.round);
                return Ok(Vec::new());
            }
            Message::Switchover(s) => {
                self.fault_at(FaultPoint::BeforeReady)?;
                let d = digest(&self.memory);
                let mut ready = self.machine.handle_switchover(&s, d)?;
                let mut header = self.header(Command::Ready);
                if self.hostile == Some(Hostile::WrongDigest) {
                    ready.digest ^= 1;
                    header.message_id = HOSTILE_ID;
                }
                let ready = Message::Ready(ready);
                self.control.replied(h.message_id, &ready);
                let mut out = vec![(chan, header, ready)];
                if let Err(e) = self.fault_at(FaultPoint::AfterReady) {
                    out.push((chan, self.header(Command::Abort), abort_of(&e)));
                    self.end(e.to_string());
                }
                return Ok(out);
            }
            Message::Go => {
                self.machine.handle_go()?;
                if let Err(e) = self.fault_at(FaultPoint::AfterGo) {
                    // The guest is ours; the session ends without COMPLETE.
                    self.ended = Some(e.to_string());
                    return Ok(Vec::new());
                }
                Message::Complete(Complete {
                    destination_cpu_ms: 0,
                    resumed: true,
                })
            }
            other => {
                return Err(Violation::Unexpected {
                    want: "ROUND_END, SWITCHOVER, GO or ABORT",
                    got: other.command(),
                }
                .into())
            }
        };
        self.control.replied(h.message_id, &reply);
        Ok(vec![(chan, self.header(reply.command()), reply)])
    }
}

fn abort_of(e: &MigrationError) -> Message {
    Message::Abort(crate::wire::Abort {
        code: e.abort_code(),
        message: e.to_string(),
    })
}
