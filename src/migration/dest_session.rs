//! The destination's session after its setup, free of sockets, tasks and
//! clocks: its connections, the batch ledger and the control log around
//! the [`DestMachine`], the watchdog on the source's silence, the hand-off
//! steps it asks its driver to carry out, and the linger after COMPLETE.
//! The driver passes the time in, feeds it what happened, sends what
//! [`DestSession::poll_transmit`] yields and carries out what
//! [`DestSession::poll_event`] asks.
//!
//! ```text
//! Open ─SWITCHOVER─▶ Verify ─digest─▶ (guest built) ─ready─▶ READY
//! Open ─GO─▶ Go ─(guest resumed)─▶ complete: COMPLETE, Linger
//! Linger ─5 s, or no connection left, or a local stop─▶ Ended(Ok)
//! Linger ─the last connection closed right after COMPLETE─▶ Ended(Ok), Completed kept
//! Open ─violation, ABORT, silence past the idle timeout, local fault─▶ Ended(Err)
//! ```
//!
//! A session that fails before GO tells the source why (an ABORT on
//! channel 0, or any channel up), unless the source aborted first; after
//! GO the guest is ours whatever happens, and nothing is sent.

use super::dest_ledger::{BatchLedger, Claim, Claimed, ControlLog, Seen, Settle};
use super::dest_state::{DestMachine, DestState};
use super::{MigrationError, SessionLoss, Violation};
use crate::wire::{Abort, ChannelId, Complete, Header, Message, Ready, Switchover};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

mod record;
#[cfg(test)]
mod tests;

pub use record::Completed;

/// How long a completed session waits, past its idle timeout, for the
/// source to close its channels, answering a GO it sends again with
/// COMPLETE: a source whose COMPLETE was lost gives up on its connection
/// after its peer timeout (by default the same as the idle timeout) and
/// rebinds.
pub const LINGER: Duration = Duration::from_secs(5);

/// The source closing its last channel this soon after COMPLETE went out
/// read it, and the linger ends. A later close may be the source giving up
/// on a connection that went silent (COMPLETE lost on it): it rebinds to
/// send GO again, so the linger runs its course.
pub const ORDERLY_CLOSE: Duration = Duration::from_millis(500);

/// What a session is set up with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DestParams {
    /// Channels the setup asked for.
    pub channels: u16,
    /// Longest time without a byte on any channel before the source counts
    /// as gone.
    pub idle_timeout: Duration,
    /// Whether the guest stays paused after GO.
    pub leave_paused: bool,
}

/// A message to send: on channel `on` if it is up, else on any that is.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// The channel it answers on.
    pub on: ChannelId,
    /// The message.
    pub msg: Message,
}

/// A hand-off step for the driver to carry out.
#[derive(Debug, Clone, PartialEq)]
pub enum DestEvent {
    /// SWITCHOVER: compute the digest as `verify` says, then call
    /// [`DestSession::handle_digest`].
    Verify(Switchover),
    /// GO: the guest is ours. Resume it when `resume` (then
    /// [`DestSession::handle_resumed`]), and call
    /// [`DestSession::complete`].
    Go {
        /// Whether to resume it (the setup did not ask to leave it paused).
        resume: bool,
    },
}

/// What the session counts for its report.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DestTallies {
    /// Connections lost.
    pub failures: u32,
    /// Channels bound again after their first connection.
    pub rebinds: u32,
    /// From the session's first frame to every channel bound.
    pub setup: Option<Duration>,
    /// From the final round's start (the guest paused on the source) to
    /// the guest resumed here.
    pub downtime: Duration,
    /// From the session's first frame to COMPLETE.
    pub finished: Option<Duration>,
}

enum Phase {
    Open,
    /// COMPLETE went out at `since`.
    Linger {
        since: Instant,
        until: Instant,
    },
    Ended,
}

/// The silence watchdog: no byte on any channel (a single one may rightly
/// idle while the others carry the rounds).
struct Quiet {
    limit: Duration,
    period: Duration,
    last_bytes: u64,
    since: Instant,
    next_check: Instant,
}

/// The destination's session protocol after its setup.
pub struct DestSession {
    machine: DestMachine,
    ledger: BatchLedger,
    control: ControlLog,
    params: DestParams,
    started: Instant,
    conns: BTreeMap<ChannelId, u32>,
    ever_bound: BTreeSet<ChannelId>,
    quiet: Quiet,
    last_loss: Option<MigrationError>,
    /// The control message a hand-off step answers: its channel and id.
    pending: Option<(ChannelId, u64)>,
    /// The READY a matching digest earned, until the guest is built.
    ready: Option<Ready>,
    paused_at: Option<Instant>,
    /// GO's id and the COMPLETE that answered it.
    answered: Option<(u64, Message)>,
    /// What it leaves when the linger ended early.
    left: Option<Completed>,
    phase: Phase,
    outcome: Option<Result<(), MigrationError>>,
    transmits: VecDeque<Reply>,
    events: VecDeque<DestEvent>,
    tallies: DestTallies,
}

impl DestSession {
    /// A session set up by `machine`, whose first frame came at `started`;
    /// its watchdog starts at `now`. No channel is bound yet.
    pub fn new(machine: DestMachine, params: DestParams, started: Instant, now: Instant) -> Self {
        let limit = params.idle_timeout;
        let period = limit.clamp(Duration::from_millis(10), Duration::from_secs(1));
        Self {
            machine,
            ledger: BatchLedger::default(),
            control: ControlLog::default(),
            params,
            started,
            conns: BTreeMap::new(),
            ever_bound: BTreeSet::new(),
            quiet: Quiet {
                limit,
                period,
                last_bytes: 0,
                since: now,
                next_check: now + period,
            },
            last_loss: None,
            pending: None,
            ready: None,
            paused_at: None,
            answered: None,
            left: None,
            phase: Phase::Open,
            outcome: None,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            tallies: DestTallies::default(),
        }
    }

    /// The protocol's state.
    pub fn state(&self) -> DestState {
        self.machine.state()
    }

    /// Whether the session is over: nothing more to do but report.
    pub fn is_ended(&self) -> bool {
        matches!(self.phase, Phase::Ended)
    }

    /// Whether a proven bind is still answered (not once it ended).
    pub fn takes_binds(&self) -> bool {
        !self.is_ended()
    }

    /// Whether connection `gen` of `chan` is the channel's current one.
    pub fn is_current(&self, chan: ChannelId, gen: u32) -> bool {
        self.conns.get(&chan) == Some(&gen)
    }

    /// What it leaves for a source that may send GO again: set when the
    /// source closed right after COMPLETE, ending the linger early.
    pub fn completed(&self) -> Option<&Completed> {
        self.left.as_ref()
    }

    /// The connections it reads now: each channel's current one.
    pub fn connections(&self) -> impl Iterator<Item = (ChannelId, u32)> + '_ {
        self.conns.iter().map(|(&c, &g)| (c, g))
    }

    /// How it ended, once decided: `Ok` from COMPLETE on (through the
    /// linger), `Err` once it failed.
    pub fn outcome(&self) -> Option<&Result<(), MigrationError>> {
        self.outcome.as_ref()
    }

    /// Takes the outcome for the report.
    pub fn take_outcome(&mut self) -> Option<Result<(), MigrationError>> {
        self.outcome.take()
    }

    /// The counts so far.
    pub fn tallies(&self) -> DestTallies {
        self.tallies
    }

    /// The next message to send.
    pub fn poll_transmit(&mut self) -> Option<Reply> {
        self.transmits.pop_front()
    }

    /// The next hand-off step to carry out.
    pub fn poll_event(&mut self) -> Option<DestEvent> {
        self.events.pop_front()
    }

    /// When [`DestSession::handle_timeout`] is next due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            Phase::Open => Some(self.quiet.next_check),
            Phase::Linger { until, .. } => Some(until),
            Phase::Ended => None,
        }
    }

    fn send(&mut self, on: ChannelId, msg: Message) {
        self.transmits.push_back(Reply { on, msg });
    }

    /// Ends the session with `e` (a local fault, a stop, the peer's
    /// violation). Before GO the source hears why, unless it aborted
    /// first; after COMPLETE it only ends the linger.
    pub fn fail(&mut self, e: MigrationError) {
        if self.is_ended() {
            return;
        }
        self.phase = Phase::Ended;
        if self.outcome.is_some() {
            return;
        }
        self.machine.abort();
        self.events.clear();
        let theirs = matches!(e, MigrationError::RemoteAbort { .. });
        if self.machine.state() != DestState::Running && !theirs {
            let abort = Message::Abort(Abort {
                code: e.abort_code(),
                message: e.to_string(),
            });
            self.send(ChannelId::CONTROL, abort);
        }
        self.outcome = Some(Err(e));
    }

    /// Connection `gen` of `chan` was bound at `now`, replacing the one
    /// before it (which the driver stops).
    pub fn handle_bound(&mut self, now: Instant, chan: ChannelId, gen: u32) {
        if self.is_ended() {
            return;
        }
        // What the connection before it was reading is released when its
        // task has ended, not before: it may still be placing pages.
        self.conns.insert(chan, gen);
        if !self.ever_bound.insert(chan) {
            self.tallies.rebinds += 1;
        }
        let all = self.ever_bound.len() >= usize::from(self.params.channels);
        if all && self.tallies.setup.is_none() {
            self.tallies.setup = Some(now.saturating_duration_since(self.started));
        }
    }

    /// Connection `gen` of `chan` ended with `e` at `now`. A lost channel
    /// is waited for (the source sends its batches again on the others and
    /// rebinds it); anything else ends the session. After COMPLETE, the
    /// source closing the last connection soon after it ends the linger.
    pub fn handle_lost(&mut self, now: Instant, chan: ChannelId, gen: u32, e: MigrationError) {
        self.ledger.release(chan, gen);
        if self.conns.get(&chan) == Some(&gen) {
            self.conns.remove(&chan);
        }
        match self.phase {
            Phase::Ended => {}
            // The source closed its last channel right after COMPLETE: it
            // read it. A reset, or a close long after, may be followed by a
            // rebind to send GO again.
            Phase::Linger { since, until } => {
                let closed = matches!(e, MigrationError::PeerClosed { .. });
                let orderly = now.saturating_duration_since(since) <= ORDERLY_CLOSE;
                if closed && orderly && self.conns.is_empty() {
                    // It may also be a source that gave up on GO's
                    // connection as GO got through: keep COMPLETE for it.
                    self.left = self
                        .answered
                        .take()
                        .map(|(id, complete)| Completed::new(id, complete, until));
                    self.phase = Phase::Ended;
                }
            }
            Phase::Open if e.is_channel_loss() => {
                self.tallies.failures += 1;
                self.last_loss = Some(e);
            }
            Phase::Open => self.fail(e),
        }
    }

    /// A proven bind could not be answered: before COMPLETE that ends the
    /// session; after it, the source may bind again.
    pub fn handle_bind_failed(&mut self, e: MigrationError) {
        if matches!(self.phase, Phase::Open) {
            self.fail(e);
        }
    }

    /// The watchdog and the linger: `rx_bytes` is every byte received on
    /// the session's channels so far.
    pub fn handle_timeout(&mut self, now: Instant, rx_bytes: u64) {
        match self.phase {
            Phase::Ended => {}
            Phase::Linger { until, .. } => {
                if now >= until {
                    self.phase = Phase::Ended;
                }
            }
            Phase::Open => self.watch(now, rx_bytes),
        }
    }

    fn watch(&mut self, now: Instant, rx_bytes: u64) {
        let q = &mut self.quiet;
        if now < q.next_check {
            return;
        }
        q.next_check = now + q.period;
        if rx_bytes != q.last_bytes {
            q.last_bytes = rx_bytes;
            q.since = now;
            return;
        }
        if now.saturating_duration_since(q.since) < q.limit {
            return;
        }
        let after = q.limit;
        let e = match self.last_loss.take() {
            None => MigrationError::Timeout {
                what: "the source (no frame on any channel)",
                after,
            },
            Some(lost) => MigrationError::SessionLost(SessionLoss::Silent {
                after,
                lost: lost.to_string().into(),
            }),
        };
        self.fail(e);
    }
}

/// Control messages: each acted on once, a repeat answered again.
impl DestSession {
    /// A control message (ROUND_END, SWITCHOVER, GO, ABORT) that arrived
    /// at `now` on channel `header.channel`.
    pub fn handle_control(&mut self, now: Instant, header: &Header, msg: Message) {
        let seen = self.control.see(header);
        if !matches!(self.phase, Phase::Open) {
            // Lingering: a GO sent again gets its COMPLETE again.
            if let (Phase::Linger { until, .. }, Ok(Seen::Again(Some(reply)))) = (&self.phase, seen)
            {
                let until = *until;
                self.phase = Phase::Linger { since: now, until };
                self.send(header.channel, reply);
            }
            return;
        }
        match seen {
            Err(e) => self.fail(e),
            Ok(Seen::Again(Some(reply))) => self.send(header.channel, reply),
            Ok(Seen::Again(None)) => {}
            Ok(Seen::New) => {
                if let Err(e) = self.act(now, header, msg) {
                    self.fail(e);
                }
            }
        }
    }

    fn act(&mut self, now: Instant, h: &Header, msg: Message) -> Result<(), MigrationError> {
        match msg {
            Message::Abort(a) => Err(MigrationError::RemoteAbort {
                code: a.code,
                message: a.message,
            }),
            Message::RoundEnd(m) => {
                self.machine.handle_round_end(&m)?;
                // Every batch of earlier rounds was acknowledged: none
                // comes again.
                self.ledger.round_began(m.round);
                if m.final_next {
                    self.paused_at = Some(now);
                }
                Ok(())
            }
            Message::Switchover(m) => {
                // Out of turn, it ends the session before any digest is
                // computed for it.
                self.machine.check_switchover(&m)?;
                self.pending = Some((h.channel, h.message_id));
                self.events.push_back(DestEvent::Verify(m));
                Ok(())
            }
            Message::Go => {
                self.machine.handle_go()?;
                self.pending = Some((h.channel, h.message_id));
                let resume = !self.params.leave_paused;
                self.events.push_back(DestEvent::Go { resume });
                Ok(())
            }
            m => Err(Violation::Unexpected {
                want: "ROUND_END, SWITCHOVER, GO or ABORT",
                got: m.command(),
            }
            .into()),
        }
    }

    /// The digest of every page applied, for the SWITCHOVER of the last
    /// [`DestEvent::Verify`]. `true`: it matches the source's; build the
    /// guest (paused) and call [`DestSession::ready`]. `false`: the
    /// session failed.
    pub fn handle_digest(&mut self, switchover: &Switchover, digest: u64) -> bool {
        if self.is_ended() {
            return false;
        }
        match self.machine.handle_switchover(switchover, digest) {
            Ok(ready) => {
                self.ready = Some(ready);
                true
            }
            Err(e) => {
                self.fail(e);
                false
            }
        }
    }

    /// The guest is built: answers the SWITCHOVER with READY.
    pub fn ready(&mut self) {
        let (Some(ready), Some((on, id))) = (self.ready.take(), self.pending.take()) else {
            return;
        };
        if self.is_ended() {
            return;
        }
        let ready = Message::Ready(ready);
        self.control.replied(id, &ready);
        self.send(on, ready);
    }

    /// The guest was resumed at `now`: the pause ends.
    pub fn handle_resumed(&mut self, now: Instant) {
        if let Some(p) = self.paused_at {
            self.tallies.downtime = now.saturating_duration_since(p);
        }
    }

    /// GO is carried out: answers it with COMPLETE (this side's CPU time
    /// so far) and lingers.
    pub fn complete(&mut self, now: Instant, destination_cpu_ms: u64) {
        let Some((on, id)) = self.pending.take() else {
            return;
        };
        if self.is_ended() || self.state() != DestState::Running {
            return;
        }
        let complete = Message::Complete(Complete {
            destination_cpu_ms,
            resumed: !self.params.leave_paused,
        });
        self.control.replied(id, &complete);
        self.answered = Some((id, complete.clone()));
        self.send(on, complete);
        self.tallies.finished = Some(now.saturating_duration_since(self.started));
        self.outcome = Some(Ok(()));
        self.phase = Phase::Linger {
            since: now,
            until: now + self.params.idle_timeout + LINGER,
        };
    }
}

/// Page batches: the ledger that applies each id once, and the round check.
impl DestSession {
    /// Claims a batch of `round` arriving on a connection as `state`; a
    /// new one must be of a round the machine takes now.
    pub fn claim_batch(
        &mut self,
        h: &Header,
        round: u32,
        state: Claim,
    ) -> Result<Claimed, MigrationError> {
        let claimed = self.ledger.claim(h, state)?;
        if claimed == Claimed::New {
            self.machine.check_batch(round)?;
        }
        Ok(claimed)
    }

    /// Checks a batch's codec is one the negotiation agreed on.
    pub fn check_codec(&self, codec: crate::codec::CodecId) -> Result<(), MigrationError> {
        self.machine.check_codec(codec)
    }

    /// Settles a batch of `round` sent again whose id is claimed; one to
    /// apply must be of a round the machine takes now.
    pub fn settle_resend(&mut self, id: u64, round: u32) -> Result<Settle, MigrationError> {
        let settled = self.ledger.settle(id);
        if settled == Settle::Apply {
            self.machine.check_batch(round)?;
        }
        Ok(settled)
    }

    /// Moves batch `id` to `state`, or forgets it (`None`: its apply
    /// failed, so a resend of it is applied).
    pub fn set_claim(&mut self, id: u64, state: Option<Claim>) {
        self.ledger.set(id, state);
    }

    /// Forgets what connection `gen` of `chan`, which ended, was reading.
    pub fn release(&mut self, chan: ChannelId, gen: u32) {
        self.ledger.release(chan, gen);
    }

    /// Batch ids remembered now.
    pub fn claims(&self) -> usize {
        self.ledger.len()
    }
}
