//! The simulated source: the real session machine, a guest that dirties
//! pages, the channel writers, the pre-copy rounds and the hand-off as the
//! driver runs them, and the seeded faults.

mod driver;
mod faults;

use super::dest::{Hostile, Reply, SimDest, HOSTILE_ID};
use super::net::{Dir, Frame, Net, Payload};
use super::Rng;
use crate::memory::DirtySnapshot;
use crate::migration::credits::Credits;
use crate::migration::fault::{FaultKind, FaultPoint};
use crate::migration::policy::ConvergencePolicy;
use crate::migration::source_machine::{
    Begin, Handled, Next, Rounds, SourceMachine, Transmit, Work,
};
use crate::page::PageIndex;
use crate::wire::ChannelId;
use crate::wire::{Header, Message};
use std::time::{Duration, Instant};

const PEER_TIMEOUT_MS: u64 = 1_000;
const HANDOFF_MS: u64 = 10_000;
const COMPLETION_MS: u64 = 60_000;

/// The convergence policy the simulated source runs: the defaults, with
/// the completion timeout of the simulation.
fn policy() -> ConvergencePolicy {
    ConvergencePolicy {
        completion_timeout: Duration::from_millis(COMPLETION_MS),
        progress_timeout: Duration::from_millis(COMPLETION_MS / 3),
        ..ConvergencePolicy::for_memory(0)
    }
}

/// How the source's migration ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    Completed,
    Failed(String),
    /// The convergence policy gave up on a guest that outran the link.
    GaveUp(String),
    Cancelled,
    Unresolved(String),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    /// A round is on ([`Rounds`] says which, and whether the last).
    Rounds,
    AwaitReady {
        until: u64,
    },
    AwaitComplete {
        until: u64,
    },
    /// Ended; the channels close at `close_at` (after a last ABORT).
    Closing {
        close_at: u64,
    },
    Closed,
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    Reset(ChannelId),
    Stall(ChannelId, u64),
    Partition(u64),
    CrashDest,
    Cancel,
}

/// A writer's encoded batch waiting for credit: its connection, the work
/// and the pages as they were read.
type Held = (u32, Work, Vec<(u64, u64)>);

/// One simulated migration.
pub struct SimSource {
    pub now: u64,
    epoch: Instant,
    rng: Rng,
    pub m: SourceMachine,
    /// The rounds and the hand-off, with the real convergence policy.
    rounds: Rounds,
    /// The auto-converge throttle in force, percent of writes skipped.
    throttle: u8,
    dest: SimDest,
    net: Net,
    memory: Vec<u64>,
    dirty: DirtySnapshot,
    /// The version each page had when last encoded: the source's hashes.
    sent: Vec<u64>,
    version: u64,
    hot: u64,
    write_rate: u64,
    batch_pages: u32,
    round_pages: u64,
    held: Vec<Option<Held>>,
    phase: Phase,
    paused: bool,
    go_sent: bool,
    cancel: bool,
    at_pause: Option<Vec<u64>>,
    rebinds: Vec<(u64, ChannelId, u32)>,
    partitioned_until: u64,
    /// When the paused last round must have drained, as the real source's
    /// hand-off timeout bounds it.
    final_until: Option<u64>,
    faults_due: Vec<(u64, Fault)>,
    drawn: Vec<(u64, Fault)>,
    dest_fault: Option<(FaultPoint, FaultKind)>,
    /// A hostile destination's frame reached the source before GO.
    hostile_hit: bool,
    hostile_kind: Option<Hostile>,
    /// Whether every fault drawn is one to survive: then it must complete.
    benign: bool,
    pub faults: u32,
    pub end: Option<End>,
}

impl SimSource {
    /// The rounds machine, as it stands.
    pub fn rounds(&self) -> &Rounds {
        &self.rounds
    }

    pub fn new(seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let pages = 32 + rng.below(224);
        let channels = 1 + rng.below(4) as u16;
        let credits: Vec<Credits> = (0..channels)
            .map(|_| Credits::new(1 + rng.below(4) as u16).expect("in range"))
            .collect();
        let epoch = Instant::now();
        let timeout = Duration::from_millis(PEER_TIMEOUT_MS);
        let m = SourceMachine::new(7, &credits, timeout, epoch);
        let mut net = Net::default();
        for c in 0..channels {
            net.open(ChannelId(c), 0);
        }
        let faults_due = Self::draw_faults(&mut rng, channels);
        let dest_fault = Self::draw_dest_fault(&mut rng);
        let hostile = Self::draw_hostile(&mut rng);
        // Resets and stalls of connections the session must ride out; a
        // crash, a cancel or a partition (with every channel dead past the
        // peer timeout the source rightly gives up) may end it either way.
        let benign = faults_due
            .iter()
            .all(|(_, f)| matches!(f, Fault::Reset(_) | Fault::Stall(..)))
            && dest_fault.is_none_or(|(_, k)| k == FaultKind::Reset)
            && hostile.is_none();
        let drawn = faults_due.iter().rev().copied().collect();
        let mut s = Self {
            drawn,
            dest_fault,
            now: 0,
            epoch,
            m,
            rounds: Rounds::new(policy(), epoch),
            throttle: 0,
            dest: SimDest::new(pages, channels, 7, epoch)
                .faulting(dest_fault)
                .hostile(hostile),
            hostile_hit: false,
            hostile_kind: hostile,
            net,
            memory: vec![0; pages as usize],
            dirty: DirtySnapshot::from_words(vec![0; pages.div_ceil(64) as usize], pages),
            sent: vec![0; pages as usize],
            version: 0,
            hot: 1 + rng.below(pages / 2),
            write_rate: rng.below(3),
            batch_pages: 1 + rng.below(16) as u32,
            round_pages: 0,
            held: (0..channels).map(|_| None).collect(),
            phase: Phase::Rounds,
            paused: false,
            go_sent: false,
            cancel: false,
            at_pause: None,
            rebinds: Vec::new(),
            partitioned_until: 0,
            final_until: None,
            faults_due,
            benign,
            faults: 0,
            end: None,
            rng,
        };
        s.round_pages = s.m.enqueue(&DirtySnapshot::all(pages), 0, s.batch_pages);
        s.rounds.begin_round(epoch, s.round_pages);
        s
    }

    fn instant(&self) -> Instant {
        self.epoch + Duration::from_millis(self.now)
    }

    pub fn describe(&self) -> String {
        format!(
            "{:?} (all acked {}, live {:?}, dest {:?}, dest ended {:?})",
            self.phase,
            self.m.all_acked(),
            self.m.live_channel(),
            self.dest.state(),
            self.dest.ended()
        )
    }

    /// Whether the source has closed and the destination has settled.
    pub fn finished(&self) -> bool {
        self.phase == Phase::Closed
            && (self.dest.running() || self.dest.ended().is_some() || self.dest.crashed)
    }

    /// One step: faults due, frames due, timers, the guest, the writers and
    /// the driver; then the virtual clock moves to the next thing due.
    pub fn step(&mut self) -> Result<(), String> {
        self.inject_faults();
        while let Some((dir, frame)) = self.net.next_due(self.now) {
            match dir {
                Dir::ToDest => self.deliver_to_dest(frame),
                Dir::ToSource => self.deliver_to_source(frame),
            }
            self.after_change();
        }
        self.run_rebinds();
        if self.phase != Phase::Closed {
            let tx: Vec<u64> = (0..self.m.channels())
                .map(|c| {
                    let c = ChannelId(c);
                    self.net
                        .delivered
                        .get(&(c, self.live_gen(c)))
                        .copied()
                        .unwrap_or(0)
                })
                .collect();
            self.m.handle_timeout(self.instant(), &tx);
            self.after_change();
        }
        let replies = self.dest.tick(self.instant());
        self.send_dest_replies(None, replies);
        self.dirty_guest();
        self.write();
        self.drive();
        self.after_change();
        self.m.check()?;
        self.advance();
        Ok(())
    }

    fn live_gen(&self, chan: ChannelId) -> u32 {
        self.net.up.get(&chan).copied().unwrap_or(u32::MAX)
    }

    fn advance(&mut self) {
        let mut next = self.now + 1_000;
        if !self.paused && self.write_rate > 0 && self.phase != Phase::Closed {
            next = self.now + 1;
        }
        let due = [
            self.net.next_at(),
            self.m
                .poll_timeout()
                .map(|t| (t - self.epoch).as_millis() as u64),
            self.dest
                .poll_timeout()
                .map(|t| (t - self.epoch).as_millis() as u64),
            self.rebinds.iter().map(|r| r.0).min(),
            self.faults_due.last().map(|f| f.0),
        ];
        for t in due.into_iter().flatten() {
            next = next.min(t);
        }
        self.now = next.max(self.now + 1);
    }

    fn deliver_to_dest(&mut self, f: Frame) {
        let (on, on_gen) = (f.chan, f.gen);
        let replies = self.dest.handle(self.instant(), f);
        self.send_dest_replies(Some((on, on_gen)), replies);
        self.dest_struck();
    }

    /// Sends the destination's replies: acknowledgements and echoes on the
    /// connection their frame came on (`own`), the rest on the channel
    /// they name if the destination has it up, else on any it has.
    fn send_dest_replies(&mut self, own: Option<(ChannelId, u32)>, replies: Vec<Reply>) {
        for (chan, header, msg) in replies {
            let mut up = self.dest.connections();
            up.sort_by_key(|&(c, _)| (c != chan, c));
            let to = match msg {
                Message::BatchAck(_) | Message::EchoResponse(_) => own,
                _ if self.dest.answers_late() => own,
                _ => up.first().copied(),
            };
            if let Some(conn) = to {
                self.send_msg(Dir::ToSource, conn, header, msg);
            }
        }
    }

    /// Carries out a fault the destination struck: the network's part.
    fn dest_struck(&mut self) {
        match self.dest.struck.take() {
            None | Some(FaultKind::Abort | FaultKind::Panic) => {}
            Some(FaultKind::Reset) => self.reset_all(),
            Some(FaultKind::Kill) => {
                self.dest.crashed = true;
                self.reset_all();
            }
            Some(FaultKind::Silent) => {
                // Stopped: its sockets stay open and take nothing more.
                self.dest.crashed = true;
                self.dest.silent = true;
                let chans: Vec<ChannelId> = self.net.up.keys().copied().collect();
                for chan in chans {
                    self.net.stall(chan, u64::MAX / 2);
                }
            }
        }
    }

    fn deliver_to_source(&mut self, f: Frame) {
        let Payload::Msg(msg) = f.payload else { return };
        let now = self.instant();
        let handled = self.m.handle_frame(now, f.chan, f.gen, &f.header, msg);
        let hostile = f.header.message_id == HOSTILE_ID;
        if hostile && !self.go_sent && !matches!(handled, Ok(Handled::Stale)) {
            self.hostile_hit = true;
        }
        match handled {
            Ok(Handled::Stale) => self.close_conn(f.chan, f.gen),
            Ok(_) => {}
            Err(e) => self.m.fail(e),
        }
    }

    /// Sends a message on connection `(chan, gen)`.
    fn send_msg(&mut self, dir: Dir, (chan, gen): (ChannelId, u32), header: Header, msg: Message) {
        let payload = Payload::Msg(msg);
        // As a channel's writer does: the header names the channel.
        let header = Header {
            channel: chan,
            ..header
        };
        let frame = Frame {
            chan,
            gen,
            header,
            payload,
        };
        self.net.send(&mut self.rng, self.now, dir, frame);
    }

    /// The source drops a connection it gave up on (or at the end).
    fn close_conn(&mut self, chan: ChannelId, gen: u32) {
        self.net
            .close_from_source(&mut self.rng, self.now, chan, gen);
    }

    /// Carries out what the machine asks; connections it declared dead
    /// close, and writers holding work on them give it back.
    fn after_change(&mut self) {
        while let Some(t) = self.m.poll_transmit() {
            match t {
                Transmit::Rebind { chan, gen } => {
                    let at = self.now + 5 + self.rng.below(20);
                    self.rebinds.push((at, chan, gen));
                }
                Transmit::Echo {
                    chan,
                    gen,
                    header,
                    msg,
                } => self.send_msg(Dir::ToDest, (chan, gen), header, msg),
            }
        }
        let up: Vec<(ChannelId, u32)> = self.net.up.iter().map(|(&c, &g)| (c, g)).collect();
        for (chan, gen) in up {
            if !self.m.is_live(chan, gen) {
                self.close_conn(chan, gen);
            }
        }
        for c in 0..self.held.len() {
            let stale = self.held[c]
                .as_ref()
                .is_some_and(|h| !self.m.is_live(ChannelId::nth(c), h.0));
            if stale {
                let (_, work, _) = self.held[c].take().expect("checked");
                self.m.requeue(work);
            }
        }
    }

    fn run_rebinds(&mut self) {
        let due: Vec<(u64, ChannelId, u32)> = self
            .rebinds
            .iter()
            .filter(|r| r.0 <= self.now)
            .copied()
            .collect();
        self.rebinds.retain(|r| r.0 > self.now);
        for (_, chan, gen) in due {
            if self.phase == Phase::Closed {
                continue;
            }
            let refused = self.dest.refuses_binds(self.instant());
            // A stopped process's kernel takes the connection; nothing answers.
            let heals = match self.dest.silent {
                true => u64::MAX,
                false => self.partitioned_until.saturating_sub(self.now),
            };
            if !refused && heals > 0 && heals < PEER_TIMEOUT_MS {
                // The connection attempt gets through once the partition heals.
                self.rebinds.push((self.partitioned_until, chan, gen));
                continue;
            }
            if refused || heals > 0 {
                // Refused at once; a partition outlasting it times the attempt out.
                let again = self
                    .m
                    .handle_rebind_failed(chan, refused, "unreachable".into());
                if again {
                    let wait = if refused { 50 } else { PEER_TIMEOUT_MS };
                    self.rebinds.push((self.now + wait, chan, gen));
                }
                continue;
            }
            let credits = Credits::new(1 + self.rng.below(4) as u16).expect("in range");
            self.net.open(chan, gen);
            self.dest.bound(self.instant(), chan, gen);
            self.m.handle_bound(self.instant(), chan, gen, credits);
        }
    }

    fn dirty_guest(&mut self) {
        if self.paused || self.phase == Phase::Closed {
            return;
        }
        for _ in 0..self.write_rate {
            // Auto-converge: a throttled guest writes that much less.
            if self.throttle > 0 && self.rng.below(100) < u64::from(self.throttle) {
                continue;
            }
            let page = self.rng.below(self.hot);
            self.version += 1;
            self.memory[page as usize] = self.version;
            self.dirty.set(PageIndex(page));
        }
    }

    /// Every live channel's writer sends what its credits allow.
    fn write(&mut self) {
        for chan in (0..self.m.channels()).map(ChannelId) {
            while let Some(sent) = self.write_one(chan) {
                if !sent {
                    break;
                }
            }
        }
    }

    /// One batch on `chan`: `Some(true)` sent, `Some(false)` waits for
    /// credit, `None` nothing to do.
    fn write_one(&mut self, chan: ChannelId) -> Option<bool> {
        let gen = *self.net.up.get(&chan)?;
        if !self.m.is_live(chan, gen) {
            return None;
        }
        let (work, pages) = match self.held[chan.index()].take() {
            Some((_, w, p)) => (w, p),
            None => match self.m.next_work(chan, gen) {
                Next::Work(w) => {
                    let pages = self.encode(&w);
                    (w, pages)
                }
                Next::Idle | Next::Dead => return None,
            },
        };
        let round = work.job().round;
        match self
            .m
            .begin_batch(chan, gen, work, pages.len() as u32, pages.len() * 8)
        {
            Begin::Send(header) => {
                let payload = Payload::Batch { round, pages };
                let frame = Frame {
                    chan,
                    gen,
                    header,
                    payload,
                };
                self.net.send(&mut self.rng, self.now, Dir::ToDest, frame);
                Some(true)
            }
            Begin::NoCredit(work) => {
                self.held[chan.index()] = Some((gen, work, pages));
                Some(false)
            }
            Begin::Dead => None,
        }
    }

    /// Reads a batch's pages now and records them as sent.
    fn encode(&mut self, work: &Work) -> Vec<(u64, u64)> {
        let mut pages = Vec::new();
        for run in &work.job().runs {
            for page in run.pages() {
                let v = self.memory[page.0 as usize];
                self.sent[page.0 as usize] = v;
                pages.push((page.0, v));
            }
        }
        pages
    }
}
