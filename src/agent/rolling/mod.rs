//! Cluster-Aware Updating as a cluster role. `POST /v1/cluster/update` on
//! any agent writes a rolling update's run to etcd (`{prefix}update/run`);
//! the coordinator carries it out one node at a time (drain, the update
//! command through the node's hook, resume with or without failback),
//! writing each phase's intent before it acts and the operation it started
//! after, in transactions that check its fencing token and the run's
//! revision. A coordinator that dies leaves the run where it was: the next
//! one reads it back, asks the node for the operation an intent may have
//! started, and carries on. Before its own node's turn the coordinator
//! hands the role over (it resigns), and a node whose turn it is does not
//! campaign while another node is live.

use super::etcd::{Cmp, Op, Txn};
use super::mirror::{parse_json, Mirror, Versioned};
use super::node::{now_ms, valid_name, Node, NodeError};
use super::store::{Liveness, LAYOUT_VERSION};
use serde::{Deserialize, Serialize};

mod drive;
mod types;
pub use drive::{drive, Lead};
pub use types::*;

/// The longest update command.
pub const MAX_COMMAND: usize = 4096;
/// How long a node's update may take by default (`stop_after`).
pub const DEFAULT_STOP_AFTER_MS: u64 = 3_600_000;
/// The range of `stop_after`.
const STOP_AFTER_MS: (u64, u64) = (1_000, 7 * 86_400_000);

fn delta_on() -> bool {
    true
}

fn default_stop_after() -> u64 {
    DEFAULT_STOP_AFTER_MS
}

/// How long before a phase's intent an operation found on its node may
/// have started (the clocks of two hosts differ a little).
const CLOCK_SLACK_MS: u64 = 5_000;

/// How often a cancel reads the run again after racing its coordinator.
const CANCEL_TRIES: usize = 10;

/// The most retries per node.
pub const MAX_RETRIES: u32 = 100;

/// A request, checked.
pub(crate) struct Checked {
    failback: bool,
    stop_after_ms: u64,
    order: Vec<String>,
    max_failed_nodes: u32,
    max_retries_per_node: u32,
    require_all_nodes_online: bool,
    delta: bool,
}

/// The run's key.
pub fn run_key(prefix: &str) -> Vec<u8> {
    format!("{prefix}update/run").into_bytes()
}

/// A run's JSON, checked.
pub fn parse_run(bytes: &[u8]) -> Result<UpdateRun, String> {
    let run: UpdateRun = parse_json(bytes)?;
    run.check()?;
    Ok(run)
}

impl Mirror {
    /// The rolling update, if one was ever asked for.
    pub fn update_run(&self) -> Option<UpdateRun> {
        let bytes = self.value(&run_key(self.prefix()))?;
        parse_run(&bytes)
            .inspect_err(|e| tracing::warn!(error = %e, "ignoring a bad rolling update record"))
            .ok()
    }
}

/// Whether it is node `me`'s turn in a running rolling update while
/// another node is live: it neither campaigns nor leads meanwhile.
pub fn my_turn(mirror: &Mirror, me: &str) -> bool {
    let Some(run) = mirror.update_run() else {
        return false;
    };
    run.state == RunState::Running
        && run.current().is_some_and(|t| t.node == me)
        && mirror.alive().iter().any(|n| n != me)
}

/// The store failed: the API's 503.
pub(super) fn unavailable(e: impl std::fmt::Display) -> NodeError {
    NodeError::Unavailable(format!("the cluster's store: {e}"))
}

impl Node {
    /// The node's store, for `what`: set once the agent has registered
    /// (before its API serves), so missing only while it starts.
    pub(crate) fn store_for(&self, what: &str) -> Result<&Liveness, NodeError> {
        self.liveness.get().map(|l| &**l).ok_or_else(|| {
            NodeError::Unavailable(format!("{what}: this agent has not registered in etcd yet"))
        })
    }

    fn store(&self) -> Result<&Liveness, NodeError> {
        self.store_for("a rolling update run by the cluster")
    }

    /// `GET /v1/cluster/update`: the rolling update as etcd holds it now.
    pub async fn update_run(&self) -> Result<(UpdateRun, i64), NodeError> {
        let live = self.store()?;
        let kv = live
            .etcd()
            .get(&run_key(live.prefix()))
            .await
            .map_err(unavailable)?
            .ok_or_else(|| NodeError::NotFound("no rolling update was asked for".into()))?;
        let run = parse_run(&kv.value).map_err(unavailable)?;
        Ok((run, kv.mod_revision))
    }

    /// `POST /v1/cluster/update`: asks the cluster for a rolling update;
    /// refused while one runs.
    pub async fn start_update(&self, req: StartUpdate) -> Result<UpdateRun, NodeError> {
        self.start_run(req, None).await
    }

    /// Checks a rolling update's request: its command, failback, stop_after
    /// and order; gives the last three.
    pub(crate) fn check_update(&self, req: &StartUpdate) -> Result<Checked, NodeError> {
        let bad = |m: String| Err(NodeError::BadRequest(m));
        for (field, c) in [
            ("command", Some(&req.command)),
            ("pre_update", req.pre_update.as_ref()),
            ("post_update", req.post_update.as_ref()),
        ] {
            if c.is_some_and(|c| c.trim().is_empty() || c.len() > MAX_COMMAND) {
                return bad(format!("{field}: 1 to {MAX_COMMAND} bytes"));
            }
        }
        let delta = match req.delta.as_deref() {
            None | Some("on") => true,
            Some("off") => false,
            Some(d) => return bad(format!("delta {d:?}: on or off")),
        };
        let failback = match req.failback.as_deref() {
            None | Some("immediate") => true,
            Some("none") => false,
            Some(f) => return bad(format!("failback {f:?}: none or immediate")),
        };
        let stop_after_ms = match &req.stop_after {
            None => DEFAULT_STOP_AFTER_MS,
            Some(t) => {
                let d = crate::units::parse_duration(t)
                    .map_err(|e| NodeError::BadRequest(format!("stop_after: {e}")))?;
                let ms = d.as_millis().min(u128::from(u64::MAX)) as u64;
                let (lo, hi) = STOP_AFTER_MS;
                if !(lo..=hi).contains(&ms) {
                    return bad(format!("stop_after: {t} is out of range (1s to 7 days)"));
                }
                ms
            }
        };
        let order: Vec<String> = match &req.node_order {
            Some(o) => o.clone(),
            None => self.members().iter().map(|n| n.name.clone()).collect(),
        };
        if order.is_empty() {
            return bad("node_order: name at least one node".into());
        }
        for (i, n) in order.iter().enumerate() {
            let Some(spec) = self.member(n) else {
                return bad(format!("node_order: no node {n:?} in the cluster"));
            };
            if order[..i].contains(n) {
                return bad(format!("node_order: node {n} is named twice"));
            }
            // A node that joined without a [[node]] entry keeps its hooks
            // to itself: its own agent refuses a command it has no hook for.
            if spec.update_hook.is_none() && self.cluster.node(n).is_some() {
                return Err(NodeError::Conflict(format!(
                    "node {n} has no update_hook in the cluster file: it runs no update commands"
                )));
            }
        }
        let max_retries_per_node = req.max_retries_per_node.unwrap_or(0);
        if max_retries_per_node > MAX_RETRIES {
            return bad(format!(
                "max_retries_per_node: {max_retries_per_node} is out of range (0 to {MAX_RETRIES})"
            ));
        }
        let max_failed_nodes = req.max_failed_nodes.unwrap_or(0);
        if max_failed_nodes as usize >= order.len() && max_failed_nodes > 0 {
            return bad(format!(
                "max_failed_nodes: {max_failed_nodes} is out of range (0 to {}, fewer than the nodes)",
                order.len() - 1
            ));
        }
        let require_all_nodes_online = req.require_all_nodes_online.unwrap_or(false);
        if require_all_nodes_online {
            let alive = self.mirror.get().map(|m| m.alive()).unwrap_or_default();
            let down: Vec<&str> = order
                .iter()
                .filter(|n| !alive.contains(*n))
                .map(String::as_str)
                .collect();
            if !down.is_empty() {
                return Err(NodeError::Conflict(format!(
                    "require_all_nodes_online: node {} holds no lease",
                    down.join(", ")
                )));
            }
        }
        Ok(Checked {
            failback,
            stop_after_ms,
            order,
            max_failed_nodes,
            max_retries_per_node,
            require_all_nodes_online,
            delta,
        })
    }

    /// Writes a rolling update's run, for the schedule's slot
    /// `scheduled_for_ms` if the schedule starts it.
    pub(super) async fn start_run(
        &self,
        req: StartUpdate,
        scheduled_for_ms: Option<u64>,
    ) -> Result<UpdateRun, NodeError> {
        let live = self.store()?;
        let c = self.check_update(&req)?;
        let key = run_key(live.prefix());
        let before = match self.update_run().await {
            Ok((run, _)) if run.state == RunState::Running => {
                return Err(NodeError::Conflict(format!(
                    "rolling update {} is running; `ferry cluster update status` follows it",
                    run.id
                )))
            }
            Ok((_, rev)) => Some(rev),
            Err(NodeError::NotFound(_)) => None,
            Err(e) => return Err(e),
        };
        let now = now_ms();
        let run = UpdateRun {
            version: LAYOUT_VERSION,
            id: format!("update-{now}"),
            command: req.command,
            failback: c.failback,
            stop_after_ms: c.stop_after_ms,
            max_failed_nodes: c.max_failed_nodes,
            max_retries_per_node: c.max_retries_per_node,
            require_all_nodes_online: c.require_all_nodes_online,
            pre_update: req.pre_update,
            post_update: req.post_update,
            delta: c.delta,
            state: RunState::Running,
            nodes: c
                .order
                .into_iter()
                .map(|node| Turn {
                    node,
                    phase: Phase::Pending,
                    since_ms: now,
                    drain: None,
                    update: None,
                    resume: None,
                    pre: None,
                    post: None,
                    error: None,
                    attempts: 0,
                    discarded: Vec::new(),
                })
                .collect(),
            started_at_ms: now,
            finished_at_ms: None,
            error: None,
            cancel_requested: false,
            coordinators: Vec::new(),
            scheduled_for_ms,
        };
        let json = serde_json::to_vec(&run).expect("records serialize");
        let cmp = match before {
            Some(rev) => Cmp::modified_at(&key, rev),
            None => Cmp::absent(&key),
        };
        let txn = Txn::new().when(cmp).then(Op::put(&key, &json, None));
        let r = live.etcd().txn(&txn).await.map_err(unavailable)?;
        if !r.succeeded {
            return Err(NodeError::Conflict(
                "another rolling update was asked for meanwhile".into(),
            ));
        }
        tracing::info!(id = %run.id, "rolling update asked for");
        Ok(run)
    }

    /// `DELETE /v1/cluster/update`: the run stops once the current node's
    /// turn ends.
    pub async fn cancel_update(&self) -> Result<UpdateRun, NodeError> {
        let live = self.store()?;
        let key = run_key(live.prefix());
        // The coordinator writes the run as it goes: the flag is set on the
        // run as it stands, read again after each race.
        for _ in 0..CANCEL_TRIES {
            let (mut run, rev) = self.update_run().await?;
            if run.state != RunState::Running {
                return Err(NodeError::Conflict(format!(
                    "rolling update {} has already ended",
                    run.id
                )));
            }
            run.cancel_requested = true;
            let json = serde_json::to_vec(&run).expect("records serialize");
            let txn = Txn::new()
                .when(Cmp::modified_at(&key, rev))
                .then(Op::put(&key, &json, None));
            if live.etcd().txn(&txn).await.map_err(unavailable)?.succeeded {
                return Ok(run);
            }
        }
        Err(NodeError::Unavailable(
            "the rolling update kept changing; try again".into(),
        ))
    }
}
