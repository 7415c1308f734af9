//! The simulated source's driver: the pre-copy rounds, the switchover and
//! the hand-off as `precopy_and_handoff` runs them, and the invariants of a
//! finished schedule.

use super::{End, Phase, SimSource, COMPLETION_MS, HANDOFF_MS};
use crate::memory::DirtySnapshot;
use crate::migration::dest_state::DestState;
use crate::migration::sim::digest;
use crate::migration::sim::net::Dir;
use crate::migration::source_machine::{ControlTx, SourceEvent};
use crate::wire::{Message, RoundEnd, Switchover, VerifyMode};

impl SimSource {
    fn control(&mut self, msg: Message) {
        self.m.queue_control(msg);
        self.flush_control();
    }

    fn flush_control(&mut self) {
        while let Some(tx) = self.m.poll_control() {
            let ControlTx {
                chan,
                gen,
                header,
                msg,
            } = tx.clone();
            let up = self.net.up.get(&chan) == Some(&gen);
            if up {
                self.send_msg(Dir::ToDest, (chan, gen), header, msg);
            }
            self.m.control_done(&tx, up);
            if !up {
                self.m.handle_lost(self.instant(), chan, gen);
            }
        }
    }

    /// The driver: rounds, switchover, hand-off, as `precopy_and_handoff`.
    pub(super) fn drive(&mut self) {
        self.flush_control();
        match self.phase {
            Phase::Round(round) | Phase::Final(round) => {
                if let Some(ev) = self.m.poll_event() {
                    return self.finish_with(ev);
                }
                if self.cancel {
                    return self.finish(End::Cancelled);
                }
                if self.now > COMPLETION_MS {
                    return self.finish(End::Failed("did not converge".into()));
                }
                if self.m.all_acked() {
                    match self.phase {
                        Phase::Round(_) => self.next_round(round),
                        _ => self.switchover(round),
                    }
                }
            }
            Phase::AwaitReady { digest, until } => match self.m.poll_event() {
                Some(SourceEvent::Reply(Message::Ready(r))) if r.digest == digest => {
                    if self.cancel {
                        return self.finish(End::Cancelled);
                    }
                    self.go_sent = true;
                    self.control(Message::Go);
                    let until = self.now + HANDOFF_MS;
                    self.phase = Phase::AwaitComplete { until };
                }
                Some(SourceEvent::Reply(Message::Ready(_))) => {
                    self.finish(End::Failed("digest mismatch".into()))
                }
                Some(ev) => self.finish_with(ev),
                None if self.cancel => self.finish(End::Cancelled),
                None if self.now > until => self.finish(End::Failed("no READY".into())),
                None => {}
            },
            Phase::AwaitComplete { until } => match self.m.poll_event() {
                Some(SourceEvent::Reply(Message::Complete(_))) => self.finish(End::Completed),
                Some(SourceEvent::Reply(Message::Ready(_))) => {}
                Some(ev) => self.finish_with(ev),
                None if self.now > until => self.finish(End::Unresolved("no COMPLETE".into())),
                None => {}
            },
            Phase::Closing { close_at } if self.now >= close_at => {
                self.m.close();
                let up: Vec<(u16, u32)> = self.net.up.iter().map(|(&c, &g)| (c, g)).collect();
                for (chan, gen) in up {
                    self.close_conn(chan, gen);
                }
                self.phase = Phase::Closed;
            }
            Phase::Closing { .. } | Phase::Closed => {}
        }
    }

    fn next_round(&mut self, round: u32) {
        let dirty = self.dirty.count();
        let last = dirty <= u64::from(self.batch_pages) || round >= 6;
        let pages = self.round_pages;
        self.control(Message::RoundEnd(RoundEnd {
            round,
            pages,
            final_next: last,
        }));
        if last {
            self.paused = true;
            self.at_pause = Some(self.memory.clone());
        }
        let snap = std::mem::replace(
            &mut self.dirty,
            DirtySnapshot::from_words(
                vec![0; self.memory.len().div_ceil(64)],
                self.memory.len() as u64,
            ),
        );
        self.round_pages = self.m.enqueue(&snap, round + 1, self.batch_pages);
        self.phase = if last {
            Phase::Final(round + 1)
        } else {
            Phase::Round(round + 1)
        };
    }

    fn switchover(&mut self, round: u32) {
        let digest = digest(&self.sent);
        self.control(Message::Switchover(Switchover {
            final_round: round,
            digest,
            verify: VerifyMode::Fast,
            rounds: round,
            dirty_rate_bps: 0,
            throttle_pct_max: 0,
            source_cpu_ms: 0,
            state: Default::default(),
        }));
        let until = self.now + HANDOFF_MS;
        self.phase = Phase::AwaitReady { digest, until };
    }

    fn finish_with(&mut self, ev: SourceEvent) {
        let why = match ev {
            SourceEvent::Failed(e) => e.to_string(),
            SourceEvent::Reply(m) => format!("{m:?}"),
        };
        self.finish(if self.go_sent {
            End::Unresolved(why)
        } else {
            End::Failed(why)
        });
    }

    /// Ends the migration: before GO the guest runs here again and the
    /// destination is told to discard its copy; after, the copy stays.
    fn finish(&mut self, end: End) {
        if !self.go_sent {
            self.paused = false;
            let abort = crate::wire::Abort {
                code: crate::wire::AbortCode::Cancelled,
                message: format!("{end:?}"),
            };
            self.control(Message::Abort(abort));
        }
        self.end = Some(end);
        self.phase = Phase::Closing {
            close_at: self.now + 1_000,
        };
    }

    /// The invariants of a finished schedule.
    pub fn check_end(&self) -> Result<(), String> {
        // Ran there at some point (a crash after GO takes the guest with the
        // process, which is no decision of ferry's).
        let ran_there = self.dest.machine.state() == DestState::Running;
        if ran_there && !self.go_sent {
            return Err("the destination runs the guest without GO".into());
        }
        if self.benign && self.end != Some(End::Completed) {
            return Err(format!(
                "only survivable faults ({:?}, destination {:?}), and it ended {:?} (destination: {:?})",
                self.drawn, self.dest_fault, self.end, self.dest.ended
            ));
        }
        if self.hostile_hit && !matches!(self.end, Some(End::Failed(_) | End::Cancelled)) {
            return Err(format!(
                "a hostile destination's frame ({:?}) reached the source before GO, and it ended {:?}",
                self.hostile_kind, self.end
            ));
        }
        match &self.end {
            Some(End::Completed) => {
                if !ran_there {
                    return Err("completed, and the destination does not run the guest".into());
                }
                if !self.paused {
                    return Err("completed, and the source resumed the guest".into());
                }
                if self.at_pause.as_deref() != Some(&self.dest.memory[..]) {
                    return Err(
                        "completed, and memory differs from the source's at the pause".into(),
                    );
                }
                Ok(())
            }
            Some(End::Failed(_) | End::Cancelled) => {
                if self.go_sent || self.paused {
                    return Err("failed, and the source does not run the guest".into());
                }
                if ran_there {
                    return Err("failed, and the destination runs the guest too".into());
                }
                Ok(())
            }
            Some(End::Unresolved(_)) => {
                if !self.paused {
                    return Err("unresolved, and the source let go of its paused copy".into());
                }
                Ok(())
            }
            None => Err("no outcome".into()),
        }
    }
}
