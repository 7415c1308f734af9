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
use super::node::{Node, NodeMode, VmState};
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
    /// Failed starts of a VM on the node its record names, by VM.
    failures: BTreeMap<String, (String, u32)>,
}

/// Starts refused by one node before a VM is placed on another.
const MAX_FAILURES: u32 = 3;

/// What a node says of a VM it was asked about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Found {
    /// It runs there (or is held there: paused, fenced, leaving).
    Runs,
    /// Being created or arriving there: wait.
    Coming,
    /// A superseded copy: it never runs there again.
    Superseded,
    /// Not there.
    Absent,
    /// The node could not be asked.
    Unknown,
}

/// Asks `on` about VM `vm`.
async fn ask(node: &Node, on: &str, vm: &str) -> Found {
    let Some(spec) = node.member(on) else {
        return Found::Unknown;
    };
    let view = if on == node.name() {
        match node.vm(vm) {
            Ok(v) => Ok(v),
            Err(_) => return Found::Absent,
        }
    } else {
        node.peers.vm(&spec, vm).await
    };
    match view {
        Ok(v) => match v.state {
            VmState::Running | VmState::Paused | VmState::MigratingOut | VmState::Fenced => {
                Found::Runs
            }
            VmState::MigratingIn | VmState::Creating => Found::Coming,
            VmState::Superseded => Found::Superseded,
        },
        Err(PeerError::Api { status: 404, .. }) => Found::Absent,
        Err(e) => {
            tracing::warn!(%vm, node = %on, error = %e, "cannot ask the node about the VM; asking again");
            Found::Unknown
        }
    }
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
            let failed = r.state == RecordState::Failed;
            if (gone || failed) && r.spec.priority != Priority::Off {
                // A failed one is tried again each round: room may have
                // come free.
                todo.push((r, rev));
            } else if !gone && r.state == RecordState::Restarting {
                starting.push((r, rev));
            }
        }
        for (r, rev) in starting {
            if let Some(t) = r.migrating_to.clone().filter(|t| alive.contains(t)) {
                // Restarting where a migration may have handed it over.
                if !matches!(
                    self.found_on(node, live, token, &r, rev, &t).await,
                    Found::Absent | Found::Superseded
                ) {
                    continue;
                }
            }
            self.start(node, live, mirror, token, r, rev).await;
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
            // A live node that failed to take it (or holds a superseded
            // copy) is not asked again.
            let mut not_on = alive.contains(&r.node).then(|| r.node.clone());
            if let Some(t) = r.migrating_to.clone().filter(|t| alive.contains(t)) {
                // It may run there already: ask before restarting it.
                match self.found_on(node, live, token, &r, rev, &t).await {
                    Found::Absent => {}
                    Found::Superseded => not_on = Some(t),
                    Found::Runs | Found::Coming | Found::Unknown => continue,
                }
            }
            left.push((r, rev, not_on));
        }
        let mut free = free_memory(node, mirror, &alive).await;
        left.sort_by(|a, b| {
            (b.0.spec.priority, &a.0.spec.name).cmp(&(a.0.spec.priority, &b.0.spec.name))
        });
        let mut plans = Vec::new();
        for (r, rev, not_on) in left {
            let why = format!("node {} lost its lease", r.node);
            let not_on = not_on.as_deref();
            // A record marked restarting or failed counted its loss already:
            // tries that follow one loss count once.
            let count = r.state == RecordState::Running;
            plans.extend(
                self.place(live, token, &mut free, (r, rev), not_on, why, count)
                    .await,
            );
        }
        // Placed one after another (each takes its memory), started at once.
        let starts = plans.into_iter().map(|p| restart(node, live, token, p));
        futures_util::future::join_all(starts).await;
    }

    /// Plans the restart of `r` on the node with room that [`pick`] names,
    /// other than `not_on`, counting the restart unless its record counted
    /// it already; marks it failed when there is none.
    #[allow(clippy::too_many_arguments)]
    async fn place(
        &mut self,
        live: &Liveness,
        token: i64,
        free: &mut BTreeMap<String, u64>,
        (r, rev): Todo,
        not_on: Option<&str>,
        why: String,
        count: bool,
    ) -> Option<Plan> {
        let mut room = free.clone();
        if let Some(n) = not_on {
            room.remove(n);
        }
        match pick(&r, &room) {
            Some(target) => {
                if let Some(f) = free.get_mut(&target) {
                    *f -= r.spec.memory;
                }
                self.failures.remove(&r.spec.name);
                Some(Plan {
                    todo: (r, rev),
                    target,
                    why,
                    count,
                })
            }
            None => {
                let error = format!(
                    "{why} and no other live node has {} free",
                    crate::units::Bytes(r.spec.memory)
                );
                self.failed(live, token, (r, rev), error, count).await;
                None
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

    /// Whether `target` of `r`'s migration holds it; if it runs there, the
    /// record names it from now.
    async fn found_on(
        &self,
        node: &Node,
        live: &Liveness,
        token: i64,
        r: &VmRecord,
        rev: i64,
        target: &str,
    ) -> Found {
        let found = ask(node, target, &r.spec.name).await;
        if found == Found::Runs {
            let moved = VmRecord {
                node: target.to_string(),
                migrating_to: None,
                migration: None,
                state: RecordState::Running,
                ..r.clone()
            };
            tracing::warn!(vm = %r.spec.name, from = %r.node, %target, "the VM's node died after handing it over: it runs on the target");
            write(live, token, &moved, rev).await;
        }
        found
    }

    /// Asks the record's node to start the VM (again: the call is safe to
    /// repeat, the node checks the record). A node that holds a superseded
    /// copy, or refused the start [`MAX_FAILURES`] times, gives it up to
    /// another.
    async fn start(
        &mut self,
        node: &Node,
        live: &Liveness,
        mirror: &Mirror,
        token: i64,
        r: VmRecord,
        rev: i64,
    ) {
        let name = r.spec.name.clone();
        let refused = match ask(node, &r.node, &name).await {
            Found::Runs => {
                // Started, but its node did not record it yet: say so here.
                let running = VmRecord {
                    state: RecordState::Running,
                    ..r
                };
                write(live, token, &running, rev).await;
                return;
            }
            Found::Coming | Found::Unknown => return,
            // Marked by that node when it came back after its lease lapsed.
            Found::Superseded => r
                .last_restart
                .as_ref()
                .map(|l| l.reason.clone())
                .unwrap_or_else(|| format!("node {} holds a superseded copy", r.node)),
            Found::Absent => {
                let Some(spec) = node.member(&r.node) else {
                    return;
                };
                let Err(e) = node.peers.create_vm(&spec, &CreateVm::from(&r.spec)).await else {
                    self.failures.remove(&name);
                    return;
                };
                tracing::warn!(vm = %name, node = %r.node, error = %e, "starting the VM failed; trying again");
                let n = match self.failures.get_mut(&name) {
                    Some((on, n)) if *on == r.node => {
                        *n += 1;
                        *n
                    }
                    _ => {
                        self.failures.insert(name.clone(), (r.node.clone(), 1));
                        1
                    }
                };
                if n < MAX_FAILURES {
                    return;
                }
                format!("node {} could not start it: {e}", r.node)
            }
        };
        self.failures.remove(&name);
        if r.spec.priority == Priority::Off {
            let error = format!("{refused}; its priority is off: never restarted elsewhere");
            self.failed(live, token, (r, rev), error, false).await;
            return;
        }
        let alive = mirror.alive();
        let mut free = free_memory(node, mirror, &alive).await;
        let not_on = r.node.clone();
        let counted = r.state == RecordState::Restarting;
        let plan = self
            .place(
                live,
                token,
                &mut free,
                (r, rev),
                Some(&not_on),
                refused,
                !counted,
            )
            .await;
        if let Some(plan) = plan {
            restart(node, live, token, plan).await;
        }
    }

    /// Marks a VM no live node can take as failed, saying why, counting
    /// the loss of its node if `count` (its record had not yet).
    async fn failed(
        &mut self,
        live: &Liveness,
        token: i64,
        (r, rev): Todo,
        error: String,
        count: bool,
    ) {
        if r.state == RecordState::Failed && r.error.as_ref() == Some(&error) {
            return;
        }
        tracing::error!(vm = %r.spec.name, "{error}");
        let failed = VmRecord {
            state: RecordState::Failed,
            restarts: r.restarts.saturating_add(count as u32),
            error: Some(error),
            ..r
        };
        write(live, token, &failed, rev).await;
    }
}

/// A restart the coordinator decided.
struct Plan {
    todo: Todo,
    target: String,
    why: String,
    count: bool,
}

/// Names the plan's target in the record, then asks it to start the VM.
async fn restart(node: &Node, live: &Liveness, token: i64, plan: Plan) {
    let Plan {
        todo: (r, rev),
        target,
        why,
        count,
    } = plan;
    let restarted = VmRecord {
        node: target.clone(),
        migrating_to: None,
        migration: None,
        state: RecordState::Restarting,
        restarts: r.restarts.saturating_add(count as u32),
        last_restart: Some(Restart {
            at_ms: super::node::now_ms(),
            reason: why,
            from: r.node.clone(),
            to: target.clone(),
        }),
        error: None,
        ..r
    };
    if write(live, token, &restarted, rev).await.is_none() {
        return;
    }
    tracing::warn!(vm = %restarted.spec.name, from = %r.node, to = %target, "restarting the VM elsewhere");
    if let Some(spec) = node.member(&target) {
        if let Err(e) = node
            .peers
            .create_vm(&spec, &CreateVm::from(&restarted.spec))
            .await
        {
            tracing::warn!(vm = %restarted.spec.name, node = %target, error = %e, "starting the VM failed; trying again");
        }
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

/// Free memory of each live node that takes VMs now (not quarantined),
/// all asked at once.
async fn free_memory(
    node: &Node,
    mirror: &Mirror,
    alive: &BTreeSet<String>,
) -> BTreeMap<String, u64> {
    let asked = alive
        .iter()
        .filter(|name| mirror.quarantined_until(name).is_none())
        .filter_map(|name| node.member(name))
        .map(|spec| async move {
            let view = if spec.name == node.name() {
                Ok(node.view())
            } else {
                node.peers.node(&spec).await
            };
            (spec.name.clone(), view)
        });
    let mut free = BTreeMap::new();
    for (name, view) in futures_util::future::join_all(asked).await {
        match view {
            Ok(v)
                if v.state == NodeMode::Active
                    && v.lease.as_ref().is_none_or(|l| name_of(l.state) == "live") =>
            {
                free.insert(name, v.free_memory());
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
            image: None,
            seed: 1,
            incarnation: 0,
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
