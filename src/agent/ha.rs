//! Restart elsewhere: when a node's lease has expired and more than half
//! of the registered nodes are live, the coordinator starts that node's
//! VMs again on the others from their records (a cold start), highest
//! priority first, `off` never, each onto a node with the memory, its
//! preferred owners first. Each restart is first written to the VM's record
//! (checking the coordinator's token and the record's revision), naming the
//! node that must start it, so it happens once; a VM whose migration may
//! have handed it over is first looked for on the migration's target.

use super::client::name_of;
use super::coordinator;
use super::etcd::{Cmp, Op, Txn};
use super::mirror::Mirror;
use super::node::{Node, NodeMode};
use super::peer::PeerError;
use super::records::{vm_key, Priority, RecordState, Restart, VmRecord};
use super::request::CreateVm;
use super::store::Liveness;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// The coordinator's restarts; remembers what it last said, to say it
/// once.
#[derive(Default)]
pub struct Restarter {
    told: String,
    /// Lost leases already counted toward quarantine, by node.
    counted: BTreeSet<(String, i64)>,
}

/// A restart to make: the record, its revision, and the dead node.
type Todo = (VmRecord, i64);

impl Restarter {
    /// One look at the cluster: settles what dead nodes left.
    pub async fn round(&mut self, node: &Arc<Node>, live: &Liveness, mirror: &Mirror, token: i64) {
        let nodes = mirror.nodes();
        let alive = mirror.alive();
        self.count_losses(live, token, &nodes, &alive).await;
        let mut todo: Vec<Todo> = Vec::new();
        let mut starting: Vec<Todo> = Vec::new();
        for (r, rev) in mirror.vms().into_values() {
            let gone = !alive.contains(&r.node);
            if gone && r.spec.priority != Priority::Off {
                todo.push((r, rev));
            } else if !gone && r.state == RecordState::Restarting {
                starting.push((r, rev));
            }
        }
        for (r, rev) in starting {
            if let Some(t) = r.migrating_to.clone().filter(|t| alive.contains(t)) {
                // Restarting where a migration may have handed it over.
                if self.found_on(node, live, token, &r, rev, &t).await != Some(false) {
                    continue;
                }
            }
            self.start(node, live, token, r, rev).await;
        }
        if todo.is_empty() {
            self.told.clear();
            return;
        }
        // Without a majority of the nodes live, this side may be the one cut
        // off: restarting here could run a VM twice.
        if alive.len() * 2 <= nodes.len() {
            self.say(format!(
                "{} of {} registered nodes are live, not a majority: restarting nothing",
                alive.len(),
                nodes.len()
            ));
            return;
        }
        let mut left = Vec::new();
        for (r, rev) in todo {
            if let Some(t) = r.migrating_to.clone().filter(|t| alive.contains(t)) {
                // It may run there already: ask before restarting it.
                match self.found_on(node, live, token, &r, rev, &t).await {
                    Some(true) => continue,
                    Some(false) => {}
                    None => continue,
                }
            }
            left.push((r, rev));
        }
        let mut free = free_memory(node, mirror, &alive).await;
        left.sort_by(|a, b| {
            (b.0.spec.priority, &a.0.spec.name).cmp(&(a.0.spec.priority, &b.0.spec.name))
        });
        for (r, rev) in left {
            match pick(&r, &free) {
                Some(target) => {
                    if let Some(f) = free.get_mut(&target) {
                        *f -= r.spec.memory;
                    }
                    self.restart(node, live, token, r, rev, &target).await;
                }
                None => self.failed(live, token, r, rev).await,
            }
        }
    }

    /// Counts each dead node's last lease toward its quarantine, once.
    async fn count_losses(
        &mut self,
        live: &Liveness,
        token: i64,
        nodes: &BTreeMap<String, super::store::NodeRecord>,
        alive: &BTreeSet<String>,
    ) {
        let now = super::node::now_ms();
        for (name, n) in nodes {
            let seen = (name.clone(), n.lease);
            if alive.contains(name) || n.lease <= 0 || self.counted.contains(&seen) {
                continue;
            }
            let counted =
                super::quarantine::update(live.etcd(), live.prefix(), name, Some(token), |r| {
                    r.lost(n.lease, now)
                })
                .await;
            match counted {
                Ok(Some(r)) => {
                    if r.quarantined(now) {
                        tracing::error!(node = %name, "the node lost its lease {} times within an hour: quarantined", super::quarantine::LOSSES);
                    }
                    self.counted.insert(seen);
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(node = %name, error = %e, "counting the node's lost lease failed")
                }
            }
        }
    }

    fn say(&mut self, text: String) {
        if text != self.told {
            tracing::warn!("{text}");
            self.told = text;
        }
    }

    /// Whether `target` of `r`'s migration holds it; if so the record names
    /// it. `None` when that cannot be known now.
    async fn found_on(
        &self,
        node: &Node,
        live: &Liveness,
        token: i64,
        r: &VmRecord,
        rev: i64,
        target: &str,
    ) -> Option<bool> {
        let spec = node.cluster.node(target)?;
        match node.peers.vm(spec, &r.spec.name).await {
            Ok(_) => {
                let moved = VmRecord {
                    node: target.to_string(),
                    migrating_to: None,
                    state: RecordState::Running,
                    ..r.clone()
                };
                tracing::warn!(vm = %r.spec.name, from = %r.node, %target, "the VM's node died after handing it over: it runs on the target");
                write(live, token, &moved, rev).await;
                Some(true)
            }
            Err(PeerError::Api { status: 404, .. }) => Some(false),
            Err(e) => {
                tracing::warn!(vm = %r.spec.name, error = %e, "cannot ask the migration's target about the VM; asking again");
                None
            }
        }
    }

    /// Names `target` in the record, then asks it to start the VM.
    async fn restart(
        &self,
        node: &Node,
        live: &Liveness,
        token: i64,
        r: VmRecord,
        rev: i64,
        target: &str,
    ) {
        let restarted = VmRecord {
            node: target.to_string(),
            migrating_to: None,
            state: RecordState::Restarting,
            restarts: r.restarts.saturating_add(1),
            last_restart: Some(Restart {
                at_ms: super::node::now_ms(),
                reason: format!("node {} lost its lease", r.node),
                from: r.node.clone(),
                to: target.to_string(),
            }),
            error: None,
            ..r
        };
        let Some(rev) = write(live, token, &restarted, rev).await else {
            return;
        };
        tracing::warn!(vm = %restarted.spec.name, from = %r.node, to = %target, "restarting the VM elsewhere");
        self.start(node, live, token, restarted, rev).await;
    }

    /// Asks the record's node to start the VM (again: the call is safe to
    /// repeat, the node checks the record).
    async fn start(&self, node: &Node, live: &Liveness, token: i64, r: VmRecord, rev: i64) {
        let Some(spec) = node.cluster.node(&r.node) else {
            return;
        };
        match node.peers.vm(spec, &r.spec.name).await {
            Ok(_) => {
                // Started, but its node did not record it: say so here.
                let running = VmRecord {
                    state: RecordState::Running,
                    ..r
                };
                write(live, token, &running, rev).await;
            }
            Err(PeerError::Api { status: 404, .. }) => {
                if let Err(e) = node.peers.create_vm(spec, &CreateVm::from(&r.spec)).await {
                    tracing::warn!(vm = %r.spec.name, node = %r.node, error = %e, "starting the VM failed; trying again");
                }
            }
            Err(e) => {
                tracing::warn!(vm = %r.spec.name, error = %e, "cannot reach the VM's new node; trying again")
            }
        }
    }

    /// Marks a VM no live node can take as failed, saying why.
    async fn failed(&mut self, live: &Liveness, token: i64, r: VmRecord, rev: i64) {
        let error = format!(
            "node {} lost its lease and no live node has {} free",
            r.node,
            crate::units::Bytes(r.spec.memory)
        );
        if r.state == RecordState::Failed && r.error.as_ref() == Some(&error) {
            return;
        }
        tracing::error!(vm = %r.spec.name, "{error}");
        let failed = VmRecord {
            state: RecordState::Failed,
            error: Some(error),
            ..r
        };
        write(live, token, &failed, rev).await;
    }
}

/// Writes `r` if this is still the coordinator of `token` and the record
/// is still at `rev`; the new revision.
async fn write(live: &Liveness, token: i64, r: &VmRecord, rev: i64) -> Option<i64> {
    let key = vm_key(live.prefix(), &r.spec.name);
    let txn = Txn::new()
        .when(Cmp::created_at(&coordinator::key(live.prefix()), token))
        .when(Cmp::modified_at(&key, rev))
        .then(Op::put(&key, &r.to_json(), None));
    match live.etcd().txn(&txn).await {
        Ok(t) if t.succeeded => Some(t.revision),
        Ok(_) => None,
        Err(e) => {
            tracing::warn!(vm = %r.spec.name, error = %e, "writing the VM's record failed");
            None
        }
    }
}

/// Free memory of each live node that takes VMs now (not quarantined).
async fn free_memory(
    node: &Node,
    mirror: &Mirror,
    alive: &BTreeSet<String>,
) -> BTreeMap<String, u64> {
    let mut free = BTreeMap::new();
    for name in alive {
        if mirror.quarantined_until(name).is_some() {
            continue;
        }
        let Some(spec) = node.cluster.node(name) else {
            continue;
        };
        let view = if name == node.name() {
            Ok(node.view())
        } else {
            node.peers.node(spec).await
        };
        match view {
            Ok(v)
                if v.state == NodeMode::Active
                    && v.lease.as_ref().is_none_or(|l| name_of(l.state) == "live") =>
            {
                free.insert(
                    name.clone(),
                    v.memory_capacity.saturating_sub(v.memory_used),
                );
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(node = %name, error = %e, "cannot ask a live node for its free memory")
            }
        }
    }
    free
}

/// Where `r` restarts: its first preferred owner with room, else the node
/// with the most room, if any has enough.
fn pick(r: &VmRecord, free: &BTreeMap<String, u64>) -> Option<String> {
    let fits = |n: &String| free.get(n).is_some_and(|f| *f >= r.spec.memory);
    r.spec
        .preferred_owners
        .iter()
        .find(|n| fits(n))
        .cloned()
        .or_else(|| {
            free.iter()
                .filter(|(_, f)| **f >= r.spec.memory)
                .max_by_key(|(n, f)| (**f, std::cmp::Reverse((*n).clone())))
                .map(|(n, _)| n.clone())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str, mem: u64, owners: &[&str]) -> VmRecord {
        let mut spec = crate::agent::VmSpec {
            name: name.into(),
            memory: mem,
            workload: crate::memory::WorkloadPattern::Idle,
            dirty_rate: 0,
            fill: Default::default(),
            guest: crate::wire::GuestKind::Sim,
            priority: Priority::Medium,
            preferred_owners: Vec::new(),
        };
        spec.preferred_owners = owners.iter().map(|s| s.to_string()).collect();
        VmRecord::new(spec, "dead")
    }

    #[test]
    fn picks_the_first_preferred_owner_with_room_else_the_roomiest() {
        let free: BTreeMap<String, u64> =
            [("a".to_string(), 100), ("b".into(), 50), ("c".into(), 300)].into();
        assert_eq!(
            pick(&record("v", 60, &["b", "a"]), &free).as_deref(),
            Some("a")
        );
        assert_eq!(pick(&record("v", 60, &["x"]), &free).as_deref(), Some("c"));
        assert_eq!(pick(&record("v", 400, &[]), &free), None);
    }
}
