//! The simulated source's faults: what a seed draws (connection resets and
//! stalls, partitions, a crashing destination, a cancel, a destination
//! faulting at a point of the protocol or hostile) and their injection.

use super::*;

impl SimSource {
    /// A quarter of the schedules fault the destination at a point of the
    /// protocol, as the hand-off tests do with real processes.
    pub(super) fn draw_dest_fault(rng: &mut Rng) -> Option<(FaultPoint, FaultKind)> {
        if !rng.chance(25) {
            return None;
        }
        let point = match rng.below(5) {
            0 => FaultPoint::BeforeRound0,
            1 => FaultPoint::MidRound,
            2 => FaultPoint::BeforeReady,
            3 => FaultPoint::AfterReady,
            _ => FaultPoint::AfterGo,
        };
        let kind = match rng.below(10) {
            0..=4 => FaultKind::Reset,
            5..=6 => FaultKind::Abort,
            7..=8 => FaultKind::Kill,
            _ => FaultKind::Silent,
        };
        Some((point, kind))
    }

    /// One schedule in ten has a hostile destination.
    pub(super) fn draw_hostile(rng: &mut Rng) -> Option<Hostile> {
        if !rng.chance(10) {
            return None;
        }
        Some(match rng.below(5) {
            0 => Hostile::AckUnknown,
            1 => Hostile::GrantOverflow,
            2 => Hostile::EarlyReady,
            3 => Hostile::EarlyComplete,
            _ => Hostile::WrongDigest,
        })
    }

    pub(super) fn draw_faults(rng: &mut Rng, channels: u16) -> Vec<(u64, Fault)> {
        let n = rng.below(5);
        let mut faults: Vec<(u64, Fault)> = (0..n)
            .map(|_| {
                let at = rng.below(1_500);
                let chan = ChannelId(rng.below(channels.into()) as u16);
                let fault = match rng.below(20) {
                    0..=8 => Fault::Reset(chan),
                    9..=13 => Fault::Stall(chan, 200 + rng.below(2_500)),
                    14..=15 => Fault::Partition(100 + rng.below(3_000)),
                    16..=17 => Fault::CrashDest,
                    _ => Fault::Cancel,
                };
                (at, fault)
            })
            .collect();
        faults.sort_by_key(|f| std::cmp::Reverse(f.0));
        faults
    }

    pub(super) fn inject_faults(&mut self) {
        while self.faults_due.last().is_some_and(|f| f.0 <= self.now) {
            let (_, fault) = self.faults_due.pop().expect("checked");
            self.faults += 1;
            match fault {
                Fault::Reset(chan) => {
                    if let Some(&gen) = self.net.up.get(&chan) {
                        self.reset(chan, gen);
                    }
                }
                Fault::Stall(chan, ms) => self.net.stall(chan, self.now + ms),
                Fault::Partition(ms) => {
                    // Every connection stalls and no new one gets through.
                    self.partitioned_until = self.now + ms;
                    let chans: Vec<ChannelId> = self.net.up.keys().copied().collect();
                    for chan in chans {
                        self.net.stall(chan, self.now + ms);
                    }
                }
                Fault::CrashDest => {
                    self.dest.crashed = true;
                    self.reset_all();
                }
                Fault::Cancel => self.cancel = true,
            }
        }
    }

    pub(super) fn reset_all(&mut self) {
        let up: Vec<(ChannelId, u32)> = self.net.up.iter().map(|(&c, &g)| (c, g)).collect();
        for (chan, gen) in up {
            self.reset(chan, gen);
        }
    }

    /// A connection breaks: both ends see it at once.
    pub(super) fn reset(&mut self, chan: ChannelId, gen: u32) {
        self.net.close(chan, gen);
        self.dest.lost(self.instant(), chan, gen);
        self.m.handle_lost(self.instant(), chan, gen);
        self.after_change();
    }
}
