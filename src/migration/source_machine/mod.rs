//! The source's session machine: channels and their credits, batches queued,
//! held, in flight and to send again, control messages and their resends,
//! keepalives and the peer timeout. No sockets, tasks or clocks: the caller
//! passes the time in, feeds it what happened and carries out what it asks.
//!
//! ```text
//! enqueue ─▶ queue ─next_work─▶ held ─begin_batch─▶ in flight ─ack─▶ acked
//!              ▲                  │ (channel lost)      │ (channel lost)
//!              └──── again ◀──────┴─────────────────────┘
//! ```
//!
//! Every batch is in exactly one of those places: `queued` batches are the
//! sum of the queue, the resend queue, the held, the in-flight and the
//! acknowledged ([`SourceMachine::check`]). A batch that went out on a
//! connection that failed goes again under its message id with the resend
//! flag; the destination applies each id once.

mod control;
mod links;
mod rounds;

use super::credits::Credits;
use super::{MigrationError, SessionLoss};
use crate::memory::DirtySnapshot;
use crate::migration::Violation;
use crate::page::PageRun;
use crate::wire::ChannelId;
use crate::wire::{Command, Header, Message, FLAG_RESEND, MAX_RUNS_PER_BATCH};
use control::Unconfirmed;
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// A connection's socket progress before the first check.
const UNSEEN: u64 = u64::MAX;

mod types;
pub use rounds::{unexpected, RoundTotals, Rounds, Stage, Verdict};
pub use types::*;

struct Chan {
    gen: u32,
    live: bool,
    credits: Credits,
    outstanding: u32,
    /// When it last received a frame, and when its socket last took bytes.
    last_rx: Instant,
    moved: (u64, Instant),
    echo_pending: bool,
}

struct Inflight {
    chan: ChannelId,
    gen: u32,
    job: BatchJob,
    pages: u32,
    bytes: usize,
    /// Sent again after a connection failed.
    again: bool,
}

/// The source's session protocol.
pub struct SourceMachine {
    session_id: u64,
    peer_timeout: Duration,
    next_msg: u64,
    chans: Vec<Chan>,
    queue: VecDeque<BatchJob>,
    again: VecDeque<Work>,
    held: u64,
    inflight: HashMap<u64, Inflight>,
    queued: u64,
    acked: u64,
    controls: VecDeque<(u64, Message)>,
    unconfirmed: Vec<Unconfirmed>,
    control_chan: Option<(ChannelId, u32)>,
    control_writing: bool,
    control_written: u64,
    transmits: VecDeque<Transmit>,
    events: VecDeque<SourceEvent>,
    all_dead_since: Option<Instant>,
    gave_up: Option<SessionLoss>,
    closed: bool,
    next_tick: Instant,
    tallies: Tallies,
}

impl SourceMachine {
    /// A session `session_id` whose channels were all bound at `now` with
    /// `credits[i]` open on channel `i`.
    pub fn new(session_id: u64, credits: &[Credits], peer_timeout: Duration, now: Instant) -> Self {
        let chans = credits
            .iter()
            .map(|&credits| Chan::bound(0, credits, now))
            .collect();
        Self {
            session_id,
            peer_timeout,
            next_msg: 1,
            chans,
            queue: VecDeque::new(),
            again: VecDeque::new(),
            held: 0,
            inflight: HashMap::new(),
            queued: 0,
            acked: 0,
            controls: VecDeque::new(),
            unconfirmed: Vec::new(),
            control_chan: None,
            control_writing: false,
            control_written: 0,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            all_dead_since: None,
            gave_up: None,
            closed: false,
            next_tick: now + Self::tick_of(peer_timeout),
            tallies: Tallies::default(),
        }
    }

    fn tick_of(peer_timeout: Duration) -> Duration {
        (peer_timeout / 10).clamp(Duration::from_millis(10), Duration::from_secs(1))
    }

    fn take_id(&mut self) -> u64 {
        let id = self.next_msg;
        self.next_msg += 1;
        id
    }

    /// Whether connection `gen` of `chan` is the channel's live one.
    pub fn is_live(&self, chan: ChannelId, gen: u32) -> bool {
        self.chans
            .get(chan.index())
            .is_some_and(|c| c.live && c.gen == gen)
    }

    /// The number of channels.
    pub fn channels(&self) -> u16 {
        self.chans.len() as u16
    }

    /// Splits a dirty set into batches of at most `batch_pages` pages (and
    /// [`MAX_RUNS_PER_BATCH`] runs) and queues them. Returns the pages.
    pub fn enqueue(&mut self, snap: &DirtySnapshot, round: u32, batch_pages: u32) -> u64 {
        let max = u64::from(batch_pages.max(1));
        let mut runs = Vec::new();
        let (mut n, mut total) = (0u64, 0u64);
        for (mut first, mut len) in snap.runs() {
            while len > 0 {
                let take = len.min(max - n);
                runs.push(PageRun::new(first, take as u32));
                (n, first, len) = (n + take, first.plus(take), len - take);
                if n == max || runs.len() == usize::from(MAX_RUNS_PER_BATCH) {
                    total += n;
                    self.push(round, std::mem::take(&mut runs));
                    n = 0;
                }
            }
        }
        if n > 0 {
            total += n;
            self.push(round, runs);
        }
        total
    }

    fn push(&mut self, round: u32, runs: Vec<PageRun>) {
        self.queued += 1;
        self.queue.push_back(BatchJob { round, runs });
    }

    /// Whether every batch queued so far is acknowledged.
    pub fn all_acked(&self) -> bool {
        self.acked == self.queued
    }

    /// The next batch for connection `gen` of channel `chan`: one to send
    /// again first, else a new one. The writer holds it until it calls
    /// [`begin_batch`](Self::begin_batch) or [`requeue`](Self::requeue).
    pub fn next_work(&mut self, chan: ChannelId, gen: u32) -> Next {
        if !self.is_live(chan, gen) || self.closed {
            return Next::Dead;
        }
        let work = match self.again.pop_front() {
            Some(w) => w,
            None => match self.queue.pop_front() {
                Some(j) => Work::New(j),
                None => return Next::Idle,
            },
        };
        self.held += 1;
        Next::Work(work)
    }

    /// Puts held work back at the head of the queue (its connection died
    /// before it was sent).
    pub fn requeue(&mut self, work: Work) {
        self.held -= 1;
        self.again.push_front(work);
    }

    /// Sends held, encoded `work` of `pages` pages and `bytes` bytes on
    /// connection `gen` of channel `chan` if a credit is open there.
    pub fn begin_batch(
        &mut self,
        chan: ChannelId,
        gen: u32,
        work: Work,
        pages: u32,
        bytes: usize,
    ) -> Begin {
        if !self.is_live(chan, gen) {
            self.requeue(work);
            return Begin::Dead;
        }
        let c = &mut self.chans[chan.index()];
        if !c.credits.take() {
            return Begin::NoCredit(work);
        }
        c.outstanding += 1;
        self.held -= 1;
        let (message_id, job, flags) = match work {
            Work::New(job) => (self.take_id(), job, 0),
            Work::Again(id, job) => (id, job, FLAG_RESEND),
        };
        let inflight = Inflight {
            chan,
            gen,
            job,
            pages,
            bytes,
            again: flags == FLAG_RESEND,
        };
        self.inflight.insert(message_id, inflight);
        Begin::Send(Header {
            channel: chan,
            credit_request: 1,
            message_id,
            session_id: self.session_id,
            flags,
            ..Header::new(Command::PageBatch)
        })
    }

    /// Handles a decoded frame that arrived on connection `gen` of `chan`.
    pub fn handle_frame(
        &mut self,
        now: Instant,
        chan: ChannelId,
        gen: u32,
        header: &Header,
        msg: Message,
    ) -> Result<Handled, MigrationError> {
        if !self.is_live(chan, gen) {
            // Its batches were sent again: their acks count there.
            return Ok(Handled::Stale);
        }
        self.chans[chan.index()].last_rx = now;
        match msg {
            Message::BatchAck(ack) => self.ack(chan, gen, ack.message_id, header.credit_grant),
            Message::EchoResponse(_) => {
                self.chans[chan.index()].echo_pending = false;
                Ok(Handled::Other)
            }
            m @ (Message::Ready(_) | Message::Complete(_) | Message::Abort(_)) => {
                match m {
                    Message::Ready(_) => self.unconfirmed.retain(|c| c.msg == Message::Go),
                    _ => self.unconfirmed.clear(),
                }
                self.events.push_back(SourceEvent::Reply(m));
                Ok(Handled::Other)
            }
            other => Err(Violation::Unexpected {
                want: "a reply of the destination",
                got: other.command(),
            }
            .into()),
        }
    }

    fn ack(
        &mut self,
        chan: ChannelId,
        gen: u32,
        id: u64,
        grant: u16,
    ) -> Result<Handled, MigrationError> {
        match self.inflight.get(&id) {
            Some(b) if b.chan == chan && b.gen == gen => {}
            _ => {
                return Err(Violation::NotInFlight {
                    channel: chan,
                    batch: id,
                }
                .into())
            }
        }
        let c = &mut self.chans[chan.index()];
        c.credits
            .grant(grant)
            .map_err(|overflow| Violation::CreditOverflow {
                channel: chan,
                overflow,
            })?;
        c.outstanding -= 1;
        let b = self.inflight.remove(&id).expect("checked");
        self.acked += 1;
        Ok(Handled::Acked {
            pages: b.pages,
            bytes: b.bytes,
            once: (!b.again).then_some(b.job),
        })
    }

    /// Ends the session: nothing more is sent, rebound or timed.
    pub fn close(&mut self) {
        self.closed = true;
    }

    /// Records a local fault or a peer's violation that ends the session.
    pub fn fail(&mut self, e: MigrationError) {
        if !self.closed {
            self.events.push_back(SourceEvent::Failed(e));
        }
    }

    /// The lowest-numbered live channel and its connection.
    pub fn live_channel(&self) -> Option<(ChannelId, u32)> {
        self.chans
            .iter()
            .enumerate()
            .find(|(_, c)| c.live)
            .map(|(i, c)| (ChannelId::nth(i), c.gen))
    }

    /// The next event for the driver.
    pub fn poll_event(&mut self) -> Option<SourceEvent> {
        self.events.pop_front()
    }

    /// Takes the first failure waiting among the events, if any.
    pub fn take_failure(&mut self) -> Option<MigrationError> {
        let at = self
            .events
            .iter()
            .position(|e| matches!(e, SourceEvent::Failed(_)))?;
        match self.events.remove(at) {
            Some(SourceEvent::Failed(e)) => Some(e),
            _ => None,
        }
    }

    /// Whether an event waits.
    pub fn has_event(&self) -> bool {
        !self.events.is_empty()
    }

    /// The next keepalive to send or channel to rebind.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// Counts for the report.
    pub fn tallies(&self) -> Tallies {
        self.tallies
    }

    /// Checks the machine's accounting: every queued batch is in exactly one
    /// place, and each channel's outstanding count matches its in-flight
    /// batches. Returns what is wrong.
    pub fn check(&self) -> Result<(), String> {
        let places = self.queue.len() as u64
            + self.again.len() as u64
            + self.held
            + self.inflight.len() as u64
            + self.acked;
        if places != self.queued {
            return Err(format!(
                "{} batches queued, {places} accounted for (queue {}, again {}, held {}, in flight {}, acked {})",
                self.queued,
                self.queue.len(),
                self.again.len(),
                self.held,
                self.inflight.len(),
                self.acked
            ));
        }
        for (i, c) in self.chans.iter().enumerate().filter(|(_, c)| c.live) {
            let on = self
                .inflight
                .values()
                .filter(|b| b.chan.index() == i && b.gen == c.gen)
                .count();
            if on != c.outstanding as usize {
                return Err(format!(
                    "channel {i} counts {} outstanding, {on} in flight on it",
                    c.outstanding
                ));
            }
        }
        Ok(())
    }
}

impl Chan {
    fn bound(gen: u32, credits: Credits, now: Instant) -> Self {
        Self {
            gen,
            live: true,
            credits,
            outstanding: 0,
            last_rx: now,
            moved: (UNSEEN, now),
            echo_pending: false,
        }
    }
}

#[cfg(test)]
mod tests;
