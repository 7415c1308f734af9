//! How many outgoing migrations the node's queue runs at once: its
//! `max_concurrent_migrations`, or with `"auto"` what [`choose`] calls for,
//! from the node's link and the write rates of the VMs it is moving,
//! decided again whenever the queue may start one.

use super::{Direction, MigrationState, Node, State};
use crate::agent::ops::auto::{choose, dirtiest, Link};
use crate::migration::Outcome;

impl State {
    /// What the node knows of its outgoing link: its cap `cap`, else the
    /// fastest wire rate its completed outgoing migrations reached.
    pub(in crate::agent) fn link(&self, me: &str, cap: Option<u64>) -> Link {
        let ours = self
            .migrations
            .iter()
            .filter(|m| m.direction == Direction::Outgoing)
            .filter_map(|m| m.report.as_ref());
        let before = self
            .history
            .iter()
            .filter(|m| m.source == me)
            .filter_map(|m| m.report.as_ref());
        let measured = ours
            .chain(before)
            .filter(|r| r.outcome == Outcome::Completed)
            .map(|r| r.throughput_wire_bps as u64)
            .max();
        match (cap, measured) {
            (Some(cap), _) => Link::Cap(cap),
            (None, Some(r)) if r > 0 => Link::Measured(r),
            _ => Link::Unknown,
        }
    }

    /// The VMs of the outgoing migrations running or queued: how many,
    /// and the fastest one's write rate.
    fn moving(&self) -> (usize, u64) {
        let running = self
            .migrations
            .iter()
            .filter(|m| m.direction == Direction::Outgoing && m.state == MigrationState::Running)
            .map(|m| &m.vm);
        let queued = self
            .queue
            .iter()
            .filter_map(|id| self.migrations.iter().find(|m| &m.id == id).map(|m| &m.vm));
        let vms: Vec<&String> = running.chain(queued).collect();
        let rates = vms
            .iter()
            .filter_map(|vm| self.vms.get(*vm))
            .map(|v| (v.spec.workload, v.spec.dirty_rate));
        (vms.len(), dirtiest(rates))
    }
}

impl Node {
    /// What the node knows of its outgoing link (see [`State::link`]).
    pub(in crate::agent) fn link(&self) -> Link {
        let st = self.state.lock().unwrap();
        st.link(&self.spec.name, self.spec.max_bandwidth)
    }

    /// The queue's limit now; with `"auto"`, decided from `st` (and the
    /// choice logged when it changes, shown in `GET /v1/node`).
    pub(super) fn queue_limit(&self, st: &mut State) -> usize {
        if !self.spec.auto_concurrency {
            return self.spec.max_concurrent_migrations as usize;
        }
        let link = st.link(&self.spec.name, self.spec.max_bandwidth);
        let (vms, fastest) = st.moving();
        let (n, why) = choose(link, fastest, vms, crate::agent::ops::auto::cores());
        let n = n.min(self.spec.max_concurrent_migrations);
        if st.auto_limit.as_ref().map(|(m, _)| *m) != Some(n) {
            tracing::info!(node = %self.spec.name, limit = n, "max_concurrent_migrations auto: {why}");
        }
        st.auto_limit = Some((n, why));
        n as usize
    }
}
