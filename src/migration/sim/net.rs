//! The simulation's network: one FIFO per connection and direction, with
//! seeded latency, stalls and resets, on a virtual clock in milliseconds.

use super::Rng;
use crate::wire::ChannelId;
use crate::wire::{Header, Message};
use std::collections::BTreeMap;

/// Which way a frame travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Dir {
    ToDest,
    ToSource,
}

/// What a frame carries: a message, or a batch's pages as (page, version).
#[derive(Debug, Clone)]
pub enum Payload {
    Msg(Message),
    Batch {
        round: u32,
        pages: Vec<(u64, u64)>,
    },
    /// The sender closed the connection after everything before this.
    Eof,
}

/// A frame on the wire.
#[derive(Debug, Clone)]
pub struct Frame {
    pub chan: ChannelId,
    pub gen: u32,
    pub header: Header,
    pub payload: Payload,
}

struct Queued {
    at: u64,
    seq: u64,
    dir: Dir,
    frame: Frame,
}

/// The frames in flight and the connections up.
#[derive(Default)]
pub struct Net {
    queue: Vec<Queued>,
    seq: u64,
    /// Each connection's last delivery time per direction (FIFO), and any
    /// stall that holds its frames until a time.
    last_at: BTreeMap<(Dir, ChannelId, u32), u64>,
    stalled_until: BTreeMap<(ChannelId, u32), u64>,
    /// Connections up: channel → generation.
    pub up: BTreeMap<ChannelId, u32>,
    /// Frames delivered to the destination per connection: the source's
    /// socket progress.
    pub delivered: BTreeMap<(ChannelId, u32), u64>,
}

impl Net {
    /// Sends a frame at `now` with a seeded latency, behind every earlier
    /// frame of its connection and direction. Dropped if the connection is
    /// down.
    pub fn send(&mut self, rng: &mut Rng, now: u64, dir: Dir, frame: Frame) {
        if self.up.get(&frame.chan) != Some(&frame.gen) {
            return;
        }
        let latency = if rng.chance(20) {
            20 + rng.below(60)
        } else {
            rng.below(4)
        };
        let key = (dir, frame.chan, frame.gen);
        let stall = self
            .stalled_until
            .get(&(frame.chan, frame.gen))
            .copied()
            .unwrap_or(0);
        let at = (now + latency)
            .max(stall)
            .max(self.last_at.get(&key).copied().unwrap_or(0));
        self.last_at.insert(key, at);
        self.seq += 1;
        self.queue.push(Queued {
            at,
            seq: self.seq,
            dir,
            frame,
        });
    }

    /// Takes the next frame due by `now`, earliest first.
    pub fn next_due(&mut self, now: u64) -> Option<(Dir, Frame)> {
        let i = self
            .queue
            .iter()
            .enumerate()
            .filter(|(_, q)| q.at <= now)
            .min_by_key(|(_, q)| (q.at, q.seq))
            .map(|(i, _)| i)?;
        let q = self.queue.swap_remove(i);
        if q.dir == Dir::ToDest {
            *self
                .delivered
                .entry((q.frame.chan, q.frame.gen))
                .or_default() += 1;
        }
        Some((q.dir, q.frame))
    }

    /// When the next frame is due.
    pub fn next_at(&self) -> Option<u64> {
        self.queue.iter().map(|q| q.at).min()
    }

    /// Opens connection `gen` of `chan`, replacing any before it.
    pub fn open(&mut self, chan: ChannelId, gen: u32) {
        if let Some(old) = self.up.insert(chan, gen) {
            self.drop_conn(chan, old);
        }
    }

    /// Closes connection `gen` of `chan`: its frames in flight are lost.
    pub fn close(&mut self, chan: ChannelId, gen: u32) {
        if self.up.get(&chan) == Some(&gen) {
            self.up.remove(&chan);
        }
        self.drop_conn(chan, gen);
    }

    fn drop_conn(&mut self, chan: ChannelId, gen: u32) {
        self.queue
            .retain(|q| !(q.frame.chan == chan && q.frame.gen == gen));
    }

    /// The source closes connection `gen` of `chan`: what its socket took
    /// still reaches the destination, then the end of the stream; what the
    /// destination sent it is lost.
    pub fn close_from_source(&mut self, rng: &mut Rng, now: u64, chan: ChannelId, gen: u32) {
        if self.up.get(&chan) != Some(&gen) {
            return;
        }
        let header = crate::wire::Header::new(crate::wire::Command::Abort);
        let eof = Frame {
            chan,
            gen,
            header,
            payload: Payload::Eof,
        };
        self.send(rng, now, Dir::ToDest, eof);
        self.up.remove(&chan);
        self.queue
            .retain(|q| !(q.dir == Dir::ToSource && q.frame.chan == chan && q.frame.gen == gen));
    }

    /// Holds every frame of the connection on `chan` until `until`.
    pub fn stall(&mut self, chan: ChannelId, until: u64) {
        if let Some(&gen) = self.up.get(&chan) {
            // A shorter stall does not shorten a longer one, and frames sent
            // later stay behind the held ones (FIFO).
            let held = self.stalled_until.entry((chan, gen)).or_default();
            *held = (*held).max(until);
            for q in self.queue.iter_mut() {
                if q.frame.chan == chan && q.frame.gen == gen {
                    q.at = q.at.max(until);
                }
            }
            for dir in [Dir::ToDest, Dir::ToSource] {
                let last = self.last_at.entry((dir, chan, gen)).or_default();
                *last = (*last).max(until);
            }
        }
    }
}
