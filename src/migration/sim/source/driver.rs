//! The simulated source's driver: the pre-copy rounds, the switchover and
//! the hand-off as `precopy_and_handoff` runs them, and the invariants of a
//! finished schedule.

use super::{End, Phase, SimSource, COMPLETION_MS, HANDOFF_MS};
use crate::memory::DirtySnapshot;
use crate::migration::dest_state::DestState;
use crate::migration::policy::Decision;
use crate::migration::sim::digest;
use crate::migration::sim::net::Dir;
use crate::migration::source_machine::{ControlTx, SourceEvent, Stage};
use crate::migration::MigrationError;
use crate::wire::ChannelId;
use crate::wire::{Message, VerifyMode};

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
            Phase::Rounds => {
                if let Some(ev) = self.m.poll_event() {
                    return self.finish_with(ev);
                }
                if self.cancel {
                    return self.finish(End::Cancelled);
                }
                // The policy gives up at the completion timeout, once a
                // round drains; a round that never drains gives up here.
                if self.now > 2 * COMPLETION_MS {
                    return self.finish(End::Failed("a round never drained".into()));
                }
                if self.final_until.is_some_and(|until| self.now > until) {
                    return self.finish(End::Failed("the last round did not drain in time".into()));
                }
                if self.m.all_acked() {
                    match self.rounds.stage() {
                        Stage::Precopy => self.next_round(),
                        _ => self.switchover(),
                    }
                }
            }
            Phase::AwaitReady { until } => match self.m.poll_event() {
                Some(SourceEvent::Reply(reply)) => self.ready(&reply),
                Some(ev) => self.finish_with(ev),
                None if self.cancel => self.finish(End::Cancelled),
                None if self.now > until => self.finish(End::Failed("no READY".into())),
                None => {}
            },
            Phase::AwaitComplete { until } => match self.m.poll_event() {
                // A READY sent again (its resend crossed GO) is no answer.
                Some(SourceEvent::Reply(Message::Ready(_))) => {}
                Some(SourceEvent::Reply(reply)) => match self.rounds.handle_complete(&reply) {
                    Ok(_) => self.finish(End::Completed),
                    Err(e) => self.finish(End::Unresolved(e.to_string())),
                },
                Some(ev) => self.finish_with(ev),
                None if self.now > until => self.finish(End::Unresolved("no COMPLETE".into())),
                None => {}
            },
            Phase::Closing { close_at } if self.now >= close_at => {
                self.m.close();
                let up: Vec<(ChannelId, u32)> = self.net.up.iter().map(|(&c, &g)| (c, g)).collect();
                for (chan, gen) in up {
                    self.close_conn(chan, gen);
                }
                self.phase = Phase::Closed;
            }
            Phase::Closing { .. } | Phase::Closed => {}
        }
    }

    /// A pre-copy round drained: the policy's verdict, as
    /// `precopy` follows it.
    fn next_round(&mut self) {
        let dirty = self.dirty.count();
        let verdict = match self.rounds.round_drained(self.instant(), dirty) {
            Ok(v) => v,
            Err(e @ MigrationError::NotConverging(_)) => {
                return self.finish(End::GaveUp(e.to_string()))
            }
            Err(e) => return self.finish(End::Failed(e.to_string())),
        };
        if let Decision::Throttle(p) = verdict.decision {
            self.throttle = p;
        }
        let last = verdict.end.final_next;
        self.control(Message::RoundEnd(verdict.end));
        if last {
            self.paused = true;
            self.final_until = Some(self.now + HANDOFF_MS);
            self.throttle = 0;
            self.at_pause = Some(self.memory.clone());
        }
        let snap = std::mem::replace(
            &mut self.dirty,
            DirtySnapshot::from_words(
                vec![0; self.memory.len().div_ceil(64)],
                self.memory.len() as u64,
            ),
        );
        let round = self.rounds.round();
        self.round_pages = self.m.enqueue(&snap, round, self.batch_pages);
        self.rounds.begin_round(self.instant(), self.round_pages);
    }

    fn switchover(&mut self) {
        let digest = digest(&self.sent);
        match self
            .rounds
            .switchover(digest, VerifyMode::Fast, Default::default(), 0)
        {
            Ok(msg) => self.control(msg),
            Err(e) => return self.finish(End::Failed(e.to_string())),
        }
        let until = self.now + HANDOFF_MS;
        self.phase = Phase::AwaitReady { until };
    }

    /// The reply to SWITCHOVER: on a matching READY, GO (unless a cancel
    /// came first).
    fn ready(&mut self, reply: &Message) {
        if let Err(e) = self.rounds.handle_ready(reply) {
            return self.finish(End::Failed(e.to_string()));
        }
        if self.cancel {
            return self.finish(End::Cancelled);
        }
        match self.rounds.go() {
            Ok(go) => {
                self.go_sent = true;
                self.control(go);
            }
            Err(e) => return self.finish(End::Failed(e.to_string())),
        }
        let until = self.now + HANDOFF_MS;
        self.phase = Phase::AwaitComplete { until };
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
        let ran_there = self.dest.state() == DestState::Running;
        if ran_there && !self.go_sent {
            return Err("the destination runs the guest without GO".into());
        }
        // Only the policy may stop a schedule that meets no fault it
        // cannot ride out: a guest that outruns the link is given up on.
        if self.benign && !matches!(self.end, Some(End::Completed | End::GaveUp(_))) {
            return Err(format!(
                "only survivable faults ({:?}, destination {:?}), and it ended {:?} (destination: {:?})",
                self.drawn, self.dest_fault, self.end, self.dest.ended()
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
            Some(End::Failed(_) | End::GaveUp(_) | End::Cancelled) => {
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
