//! Node operations: drain (pause the node and move every VM to the other
//! active nodes, largest first, where free memory allows; `drain.rs`),
//! resume (take VMs again, with or without failback of what the last drain
//! moved; `resume.rs`) and update (`update.rs`). Each runs in the
//! background as an operation that can be watched and cancelled, and stays
//! in the node's log afterwards; this file holds their records and the
//! bookkeeping they share.

pub mod auto;
pub(super) mod drain;
mod near;
pub mod plan;
mod resume;
mod types;
mod update;

pub use near::{place_near, Held, Near};
pub use types::*;
use types::{ASK_NODE, MAX_OUTPUT};

use super::client::name_of;
use super::cluster::NodeSpec;
use super::node::{MigrationState, Node, NodeError, NodeMode, NodeView, VmState};
use super::request::{CreateMigration, MigrationParams};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Adds `request_id`, when given, to an operation's `params`.
fn with_request_id(params: &mut Value, request_id: Option<&str>) {
    if let (Some(rid), Some(map)) = (request_id, params.as_object_mut()) {
        map.insert("request_id".into(), Value::String(rid.to_string()));
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn gib(bytes: u64) -> String {
    crate::units::Bytes(bytes).to_string()
}

/// A placement: (vm, node) pairs, and the (vm, memory) that fit nowhere.
pub type Placement = (Vec<(String, String)>, Vec<(String, u64)>);

/// Places `vms` (name, memory) on `free` nodes (name, free bytes): largest VM
/// first, each on the node with the most free memory that holds it, so the
/// load spreads ([`place_near`] with nothing held anywhere).
pub fn place(vms: &[(String, u64)], free: &[(String, u64)]) -> Placement {
    place_near(vms, free, &Near::default())
}

impl Node {
    /// `GET /v1/operations`.
    pub fn operations(&self) -> Vec<OperationView> {
        self.ops
            .lock()
            .unwrap()
            .iter()
            .map(|o| o.view.clone())
            .collect()
    }

    /// `GET /v1/operations/{id}`.
    pub fn operation(&self, id: &str) -> Result<OperationView, NodeError> {
        self.ops
            .lock()
            .unwrap()
            .iter()
            .find(|o| o.view.id == id)
            .map(|o| o.view.clone())
            .ok_or_else(|| {
                NodeError::NotFound(format!("no operation {id:?} on node {}", self.spec.name))
            })
    }

    /// `DELETE /v1/operations/{id}`: stops a running operation. Migrations in
    /// flight are cancelled (their VMs stay where they were), steps not yet
    /// started never start.
    pub fn cancel_operation(&self, id: &str) -> Result<OperationView, NodeError> {
        let ops = self.ops.lock().unwrap();
        let op = ops.iter().find(|o| o.view.id == id).ok_or_else(|| {
            NodeError::NotFound(format!("no operation {id:?} on node {}", self.spec.name))
        })?;
        if op.view.state != OpState::Running {
            return Err(NodeError::Conflict(format!(
                "operation {id} has already ended ({})",
                super::node::name_of(&op.view.state)
            )));
        }
        op.cancel.cancel();
        Ok(op.view.clone())
    }

    fn new_op(&self, kind: OpKind, params: Value, steps: Vec<Step>) -> (String, CancellationToken) {
        let mut ops = self.ops.lock().unwrap();
        // Numbered on from the operations of the agent's earlier processes.
        let n = ops
            .iter()
            .filter_map(|o| o.view.id.rsplit('-').next()?.parse::<u64>().ok())
            .max()
            .unwrap_or(0)
            .saturating_add(1);
        let id = format!(
            "{}-{}-{n}",
            self.spec.name,
            match kind {
                OpKind::Drain => "drain",
                OpKind::Resume => "resume",
                OpKind::Update => "update",
            },
        );
        let cancel = CancellationToken::new();
        ops.push(Operation {
            command_started: false,
            view: OperationView {
                id: id.clone(),
                kind,
                node: self.spec.name.clone(),
                state: OpState::Running,
                params,
                started_at_ms: now_ms(),
                finished_at_ms: None,
                steps,
                error: None,
                update: None,
                remaining: Vec::new(),
                interrupted: false,
                interruption: None,
            },
            cancel: cancel.clone(),
        });
        let view = ops.last().map(|o| o.view.clone());
        drop(ops);
        if let Some(v) = view {
            self.journal_op(&v);
        }
        (id, cancel)
    }

    /// The operation asked before with `request_id`: the same request
    /// again gets it back; a request of another kind with that key is
    /// refused.
    fn asked_before(
        &self,
        kind: OpKind,
        request_id: Option<&str>,
    ) -> Result<Option<OperationView>, NodeError> {
        let Some(rid) = request_id else {
            return Ok(None);
        };
        let ops = self.ops.lock().unwrap();
        match ops
            .iter()
            .find(|o| o.view.params["request_id"].as_str() == Some(rid))
        {
            Some(o) if o.view.kind == kind => Ok(Some(o.view.clone())),
            Some(o) => Err(NodeError::Conflict(format!(
                "request_id {rid:?} already named operation {} of node {}",
                o.view.id, self.spec.name
            ))),
            None => Ok(None),
        }
    }

    /// A clean stop's last word on operations: from here none starts (the
    /// next process takes them; callers get 503 and ask again), and each
    /// running one is marked interrupted by the stop.
    pub async fn close_operations(&self) {
        let _turn = self.op_turn.lock().await;
        self.closing
            .store(true, std::sync::atomic::Ordering::Release);
        self.interrupt_operations();
    }

    fn refuse_if_closing(&self) -> Result<(), NodeError> {
        if self.closing.load(std::sync::atomic::Ordering::Acquire) {
            return Err(NodeError::Unavailable(format!(
                "the agent of node {} is stopping; ask again once it is back",
                self.spec.name
            )));
        }
        Ok(())
    }

    /// A clean stop: each running operation ends `failed`, `interrupted`
    /// by a `stop`, in its journal before the lease goes (an update command
    /// that restarts its agent this way did its work).
    fn interrupt_operations(&self) {
        let now = now_ms();
        let name = self.spec.name.clone();
        let ended: Vec<OperationView> = {
            let mut ops = self.ops.lock().unwrap();
            ops.iter_mut()
                .filter(|o| o.view.state == OpState::Running)
                .map(|o| {
                    let not_run = o.view.kind == OpKind::Update && !o.command_started;
                    let v = &mut o.view;
                    v.state = OpState::Failed;
                    if not_run {
                        v.error = Some(format!(
                            "not run: the agent of node {name} stopped before the command started"
                        ));
                    } else {
                        v.interrupted = true;
                        v.interruption = Some(Interruption::Stop);
                        v.error = Some(format!(
                            "interrupted: the agent of node {name} stopped cleanly while it ran"
                        ));
                    }
                    v.finished_at_ms = Some(now);
                    v.clone()
                })
                .collect()
        };
        for v in &ended {
            self.journal_op(v);
        }
        if !ended.is_empty() {
            self.changed.notify_waiters();
        }
    }

    /// Marks update `op`'s command started, under the node's operation turn
    /// so that a clean stop sees either a started command or none: false
    /// when the agent is stopping or the operation already ended.
    async fn start_command(&self, op: &str) -> bool {
        let _turn = self.op_turn.lock().await;
        if self.closing.load(std::sync::atomic::Ordering::Acquire) {
            return false;
        }
        let mut ops = self.ops.lock().unwrap();
        match ops.iter_mut().find(|o| o.view.id == op) {
            Some(o) if o.view.state == OpState::Running => {
                o.command_started = true;
                true
            }
            _ => false,
        }
    }

    /// Changes one operation; when that changes its state, wakes whoever
    /// waits on the node's changes (a stopping agent looks again once its
    /// drain ends).
    /// A step's change is written to the operation's journal in etcd.
    pub(super) fn with_op<R>(
        &self,
        id: &str,
        f: impl FnOnce(&mut OperationView) -> R,
    ) -> Option<R> {
        let (r, moved, changed) = {
            let mut ops = self.ops.lock().unwrap();
            // One its agent's stop ended stays as it was marked.
            let o = ops
                .iter_mut()
                .find(|o| o.view.id == id)
                .filter(|o| !o.view.interrupted)?;
            let (before, shape) = (o.view.state, journal_shape(&o.view));
            let r = f(&mut o.view);
            let changed = (journal_shape(&o.view) != shape).then(|| o.view.clone());
            (r, o.view.state != before, changed)
        };
        if let Some(v) = changed {
            self.journal_op(&v);
        }
        if moved {
            self.changed.notify_waiters();
        }
        Some(r)
    }

    /// The other nodes that take VMs now, with their free memory; and why the
    /// others do not. Asked all at once, each within [`ASK_NODE`]: a host
    /// that went dark holds nothing up.
    pub(crate) async fn free_elsewhere(&self) -> (Vec<(String, u64)>, Vec<String>) {
        let (active, excluded) = self.elsewhere().await;
        (free_of(&active), excluded)
    }

    /// The other nodes that take VMs now, with their views; and why the
    /// others do not, as [`Node::free_elsewhere`] asks them.
    pub(crate) async fn elsewhere(&self) -> (Vec<(NodeSpec, NodeView)>, Vec<String>) {
        let mut active = Vec::new();
        let mut excluded = Vec::new();
        let mut asked = Vec::new();
        for n in self
            .members()
            .into_iter()
            .filter(|n| n.name != self.spec.name)
        {
            if let Some(until) = self.mirror.get().and_then(|m| m.quarantined_until(&n.name)) {
                excluded.push(format!(
                    "{} is quarantined for {} more minutes",
                    n.name,
                    until.saturating_sub(super::node::now_ms()).div_ceil(60_000)
                ));
                continue;
            }
            asked.push(async move {
                let view = tokio::time::timeout(ASK_NODE, self.peers.node(&n)).await;
                (n, view)
            });
        }
        for (n, view) in futures_util::future::join_all(asked).await {
            let Ok(view) = view else {
                excluded.push(format!("{} did not answer within {ASK_NODE:?}", n.name));
                continue;
            };
            match view {
                Ok(v)
                    if v.state == NodeMode::Active
                        && v.lease
                            .as_ref()
                            .is_none_or(|l| l.state == super::fence::FenceState::Live) =>
                {
                    active.push((n, v));
                }
                Ok(v) if v.state != NodeMode::Active => {
                    excluded.push(format!("{} is {}", n.name, name_of(v.state)))
                }
                Ok(_) => excluded.push(format!("{} is fenced", n.name)),
                Err(e) => excluded.push(format!("{} is unreachable ({e})", n.name)),
            }
        }
        (active, excluded)
    }
}

/// Each node's free memory, as [`place`] takes it.
fn free_of(active: &[(NodeSpec, NodeView)]) -> Vec<(String, u64)> {
    active
        .iter()
        .map(|(n, v)| (n.name.clone(), v.free_memory()))
        .collect()
}

/// How long an update command waits for its operation's record to reach
/// etcd before it runs.
const RECORD_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// What of an operation its journal follows: its state, its end, and each
/// step's state and migration (not the progress in between).
type Shape = (OpState, Option<u64>, Vec<(String, Option<String>)>);

fn journal_shape(v: &OperationView) -> Shape {
    (
        v.state,
        v.finished_at_ms,
        v.steps
            .iter()
            .map(|s| (s.state.clone(), s.migration_id.clone()))
            .collect(),
    )
}

fn state_name(s: MigrationState) -> &'static str {
    match s {
        MigrationState::Queued => "queued",
        MigrationState::Running => "running",
        MigrationState::Completed => "completed",
        MigrationState::Failed => "failed",
        MigrationState::Cancelled => "cancelled",
        MigrationState::Unresolved => "unresolved",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 1 << 30;

    fn vms(list: &[(&str, u64)]) -> Vec<(String, u64)> {
        list.iter().map(|(n, m)| (n.to_string(), *m)).collect()
    }

    #[test]
    fn the_largest_go_first_each_to_the_emptiest_node_that_holds_it() {
        let (placed, left) = place(
            &vms(&[("a", G), ("b", 4 * G), ("c", 2 * G), ("d", G)]),
            &vms(&[("n1", 5 * G), ("n2", 4 * G)]),
        );
        // b (4) -> n1 (5 free, the emptiest), c (2) -> n2 (4 free), then a and
        // d (1 each) -> n2 (2 free), n1 (1 free) or the other way.
        assert_eq!(placed[0], ("b".into(), "n1".into()));
        assert_eq!(placed[1], ("c".into(), "n2".into()));
        assert_eq!(placed.len(), 4);
        assert!(left.is_empty());
        let on = |n: &str| placed.iter().filter(|(_, t)| t == n).count();
        assert_eq!(on("n1") + on("n2"), 4);
    }

    #[test]
    fn what_fits_nowhere_is_named() {
        let (placed, left) = place(
            &vms(&[("big", 8 * G), ("small", G)]),
            &vms(&[("n1", 4 * G), ("n2", 2 * G)]),
        );
        assert_eq!(placed, vec![("small".to_string(), "n1".to_string())]);
        assert_eq!(left, vec![("big".to_string(), 8 * G)]);
        let (placed, left) = place(&vms(&[("x", G)]), &[]);
        assert!(placed.is_empty());
        assert_eq!(left.len(), 1);
    }
}
