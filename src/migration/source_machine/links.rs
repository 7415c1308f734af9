//! The source's channels as connections that die and come back: a
//! connection lost and its batches sent again, a rebind bound or refused,
//! the peer timeout that declares a silent connection dead, keepalives,
//! and the session given up once no channel is left.

use super::*;

impl SourceMachine {
    /// Declares connection `gen` of `chan` dead: its unacknowledged batches
    /// go back to the queue for the other channels, an unanswered control
    /// message on it is sent again, and the channel rebinds. `false` when it
    /// was already dead (or the session is over).
    pub fn handle_lost(&mut self, now: Instant, chan: ChannelId, gen: u32) -> bool {
        if self.closed || !self.is_live(chan, gen) {
            return false;
        }
        let c = &mut self.chans[chan.index()];
        c.live = false;
        c.outstanding = 0;
        let mut ids: Vec<u64> = self
            .inflight
            .iter()
            .filter(|(_, b)| b.chan == chan && b.gen == gen)
            .map(|(&id, _)| id)
            .collect();
        ids.sort_unstable();
        for id in &ids {
            let b = self.inflight.remove(id).expect("listed");
            self.again.push_back(Work::Again(*id, b.job));
        }
        self.tallies.failures += 1;
        self.tallies.resent += ids.len() as u64;
        for c in self.unconfirmed.iter_mut() {
            if c.chan == chan && c.gen == gen {
                c.resend = true;
            }
        }
        if self.live_channel().is_none() {
            self.all_dead_since.get_or_insert(now);
        }
        self.transmits
            .push_back(Transmit::Rebind { chan, gen: gen + 1 });
        true
    }

    /// Connection `gen` of `chan` is bound with `credits` open.
    pub fn handle_bound(&mut self, now: Instant, chan: ChannelId, gen: u32, credits: Credits) {
        if self.closed || chan.index() >= self.chans.len() {
            return;
        }
        self.chans[chan.index()] = Chan::bound(gen, credits, now);
        self.all_dead_since = None;
        self.tallies.rebinds += 1;
    }

    /// A rebind of `chan` failed; `definitive` when the peer refused it (a
    /// refused connection, an abort, a failed proof). With no channel left,
    /// that ends the session. Returns whether to try again.
    pub fn handle_rebind_failed(&mut self, chan: ChannelId, definitive: bool, why: String) -> bool {
        if self.closed || self.gave_up.is_some() {
            return false;
        }
        if definitive && self.live_channel().is_none() {
            self.give_up(SessionLoss::RebindRefused {
                channel: chan,
                why: why.into(),
            });
            return false;
        }
        true
    }

    fn give_up(&mut self, why: SessionLoss) {
        if self.gave_up.is_some() {
            return;
        }
        self.gave_up = Some(why);
        self.events
            .push_back(SourceEvent::Failed(self.lost_error()));
    }

    /// The session's error once every channel is lost for good.
    pub fn lost_error(&self) -> MigrationError {
        MigrationError::SessionLost(self.gave_up.clone().unwrap_or(SessionLoss::AllLost))
    }

    /// Whether the session gave up on its channels.
    pub fn gave_up(&self) -> bool {
        self.gave_up.is_some()
    }

    /// When [`handle_timeout`](Self::handle_timeout) wants to run next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        (!self.closed && self.gave_up.is_none()).then_some(self.next_tick)
    }

    /// Checks the channels at `now`, given how many bytes each channel's
    /// socket has taken so far (`tx_bytes[i]`, moving while the peer reads):
    /// a connection that owes an answer and has heard and sent nothing for
    /// the peer timeout is dead; an idle one gets a keepalive; with every
    /// channel dead for the peer timeout, the session gives up.
    pub fn handle_timeout(&mut self, now: Instant, tx_bytes: &[u64]) {
        if now < self.next_tick || self.closed {
            return;
        }
        self.next_tick = now + Self::tick_of(self.peer_timeout);
        let timeout = self.peer_timeout;
        // Keepalives at least every 3 s: receivers give up on a source
        // silent for their own timeout (10 s by default).
        let keepalive = (timeout / 3).min(Duration::from_secs(3));
        let mut dead = Vec::new();
        for (i, c) in self.chans.iter_mut().enumerate().filter(|(_, c)| c.live) {
            let progress = tx_bytes.get(i).copied().unwrap_or(c.moved.0);
            if c.moved.0 == UNSEEN {
                // First sight: what it took binding is no news.
                c.moved.0 = progress;
            } else if progress != c.moved.0 {
                c.moved = (progress, now);
            }
            let quiet = now.saturating_duration_since(c.last_rx.max(c.moved.1));
            let owed = c.outstanding > 0 || c.echo_pending;
            if owed && quiet > timeout {
                dead.push((ChannelId::nth(i), c.gen));
            } else if !owed && quiet > keepalive {
                c.echo_pending = true;
                let header = Header {
                    session_id: self.session_id,
                    message_id: self.next_msg,
                    ..Header::new(Command::Echo)
                };
                self.next_msg += 1;
                let value = now.saturating_duration_since(c.last_rx).as_millis() as u64;
                let msg = Message::Echo(crate::wire::Echo { value });
                let (chan, gen) = (ChannelId::nth(i), c.gen);
                self.transmits.push_back(Transmit::Echo {
                    chan,
                    gen,
                    header,
                    msg,
                });
            }
        }
        for (chan, gen) in dead {
            self.handle_lost(now, chan, gen);
        }
        if let Some(since) = self.all_dead_since {
            if self.live_channel().is_none() && now.saturating_duration_since(since) > timeout {
                self.give_up(SessionLoss::NoneRebound { within: timeout });
            }
        }
    }

    /// How long a connection that owes an answer may stay silent.
    pub fn peer_timeout(&self) -> Duration {
        self.peer_timeout
    }
}
