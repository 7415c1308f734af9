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
use super::ops::{OpKind, OpState, OperationView};
use super::request::{Drain, Resume, Update};
use super::store::{Liveness, LAYOUT_VERSION};
use serde::{Deserialize, Serialize};

/// The longest update command.
pub const MAX_COMMAND: usize = 4096;
/// How long a node's update may take by default (`stop_after`).
pub const DEFAULT_STOP_AFTER_MS: u64 = 3_600_000;
/// The range of `stop_after`.
const STOP_AFTER_MS: (u64, u64) = (1_000, 7 * 86_400_000);

fn default_stop_after() -> u64 {
    DEFAULT_STOP_AFTER_MS
}

/// How long before a phase's intent an operation found on its node may
/// have started (the clocks of two hosts differ a little).
const CLOCK_SLACK_MS: u64 = 5_000;

/// Where a rolling update is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// Nodes are being updated.
    Running,
    /// Every node was updated.
    Completed,
    /// A node's turn failed: that node is left as its failure left it
    /// (paused after a drain or an update), the later ones untouched.
    Failed,
    /// Cancelled between two nodes' turns.
    Cancelled,
}

/// Where one node's turn is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Not started.
    Pending,
    /// Its VMs move away.
    Draining,
    /// The update command runs on it.
    Updating,
    /// It takes VMs again (and its VMs come back, with failback).
    Resuming,
    /// Updated and resumed.
    Done,
    /// Its turn failed.
    Failed,
}

/// One node's turn: its phase and the operations it started on the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Turn {
    /// The node.
    pub node: String,
    /// Where its turn is.
    pub phase: Phase,
    /// When the phase's intent was written, ms since the Unix epoch.
    pub since_ms: u64,
    /// The drain's operation on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain: Option<String>,
    /// The update command's operation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update: Option<String>,
    /// The resume's operation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<String>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A rolling update, as `GET /v1/cluster/update` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateRun {
    /// The layout's version.
    pub version: u32,
    /// Its id.
    pub id: String,
    /// The command each node's update hook runs.
    pub command: String,
    /// Whether a resumed node gets back the VMs its drain moved.
    pub failback: bool,
    /// How long a node's update command may take, ms; an update that
    /// restarts the node's agent succeeds if the agent is back within it.
    #[serde(default = "default_stop_after")]
    pub stop_after_ms: u64,
    /// Where it is.
    pub state: RunState,
    /// The nodes' turns, in order.
    pub nodes: Vec<Turn>,
    /// When it was asked for, ms since the Unix epoch.
    pub started_at_ms: u64,
    /// When it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at_ms: Option<u64>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// An operator asked it to stop after the current node's turn.
    #[serde(default)]
    pub cancel_requested: bool,
    /// The coordinators that carried it, in turn (one hands over before its
    /// own node's turn).
    #[serde(default)]
    pub coordinators: Vec<String>,
    /// Started by the schedule, for its slot due then (ms since the Unix
    /// epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_for_ms: Option<u64>,
}

impl Versioned for UpdateRun {
    fn version(&self) -> u32 {
        self.version
    }
}

impl UpdateRun {
    /// Checks a run read from etcd as API input is checked.
    pub fn check(&self) -> Result<(), String> {
        if !valid_name(&self.id) {
            return Err(format!("id {:?} is not a valid name", self.id));
        }
        if self.command.is_empty() || self.command.len() > MAX_COMMAND {
            return Err(format!("command: 1 to {MAX_COMMAND} bytes"));
        }
        let (lo, hi) = STOP_AFTER_MS;
        if !(lo..=hi).contains(&self.stop_after_ms) {
            return Err(format!("stop_after_ms: {lo} to {hi}"));
        }
        if self.nodes.len() > 4096 || self.coordinators.len() > 4096 {
            return Err("over 4096 nodes".into());
        }
        let names = self.nodes.iter().map(|t| &t.node);
        if let Some(n) = names.chain(&self.coordinators).find(|n| !valid_name(n)) {
            return Err(format!("node {n:?} is not a valid name"));
        }
        let texts = self.nodes.iter().flat_map(|t| {
            [&t.drain, &t.update, &t.resume, &t.error]
                .into_iter()
                .flatten()
        });
        if texts.chain(&self.error).any(|t| t.len() > 64 << 10) {
            return Err("a field is over 64 KiB".into());
        }
        Ok(())
    }

    /// The turn under way: the first not done.
    pub fn current(&self) -> Option<&Turn> {
        self.nodes.iter().find(|t| t.phase != Phase::Done)
    }
}

/// The body of `POST /v1/cluster/update`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartUpdate {
    /// The command each node's update hook runs.
    pub command: String,
    /// `immediate` (the default): a resumed node gets its VMs back; `none`:
    /// they stay where the drain put them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failback: Option<String>,
    /// The nodes in the order to update them (default: every node of the
    /// cluster file, in its order).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_order: Option<Vec<String>>,
    /// How long each node's update command may take (`"30m"`; default
    /// 1 h); an update that restarts the node's agent succeeds when the
    /// agent is back within it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_after: Option<String>,
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

fn unavailable(e: impl std::fmt::Display) -> NodeError {
    NodeError::Unavailable(format!("the cluster's store: {e}"))
}

impl Node {
    fn store(&self) -> Result<&Liveness, NodeError> {
        self.liveness.get().map(|l| &**l).ok_or_else(|| {
            NodeError::Unsupported(
                "a rolling update run by the cluster needs its store (etcd in the cluster file)"
                    .into(),
            )
        })
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
    pub(super) fn check_update(
        &self,
        req: &StartUpdate,
    ) -> Result<(bool, u64, Vec<String>), NodeError> {
        let bad = |m: String| Err(NodeError::BadRequest(m));
        if req.command.trim().is_empty() || req.command.len() > MAX_COMMAND {
            return bad(format!("command: 1 to {MAX_COMMAND} bytes"));
        }
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
            None => self.cluster.nodes.iter().map(|n| n.name.clone()).collect(),
        };
        if order.is_empty() {
            return bad("node_order: name at least one node".into());
        }
        for (i, n) in order.iter().enumerate() {
            let Some(spec) = self.cluster.node(n) else {
                return bad(format!("node_order: no node {n:?} in the cluster"));
            };
            if order[..i].contains(n) {
                return bad(format!("node_order: node {n} is named twice"));
            }
            if spec.update_hook.is_none() {
                return Err(NodeError::Conflict(format!(
                    "node {n} has no update_hook in the cluster file: it runs no update commands"
                )));
            }
        }
        Ok((failback, stop_after_ms, order))
    }

    /// Writes a rolling update's run, for the schedule's slot
    /// `scheduled_for_ms` if the schedule starts it.
    pub(super) async fn start_run(
        &self,
        req: StartUpdate,
        scheduled_for_ms: Option<u64>,
    ) -> Result<UpdateRun, NodeError> {
        let live = self.store()?;
        let (failback, stop_after_ms, order) = self.check_update(&req)?;
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
            failback,
            stop_after_ms,
            state: RunState::Running,
            nodes: order
                .into_iter()
                .map(|node| Turn {
                    node,
                    phase: Phase::Pending,
                    since_ms: now,
                    drain: None,
                    update: None,
                    resume: None,
                    error: None,
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
        let (mut run, rev) = self.update_run().await?;
        if run.state != RunState::Running {
            return Err(NodeError::Conflict(format!(
                "rolling update {} has already ended",
                run.id
            )));
        }
        run.cancel_requested = true;
        let key = run_key(live.prefix());
        let json = serde_json::to_vec(&run).expect("records serialize");
        let txn = Txn::new()
            .when(Cmp::modified_at(&key, rev))
            .then(Op::put(&key, &json, None));
        let r = live.etcd().txn(&txn).await.map_err(unavailable)?;
        if !r.succeeded {
            return Err(NodeError::Conflict(
                "the rolling update changed meanwhile; try again".into(),
            ));
        }
        Ok(run)
    }
}

/// What a coordinator does after a round of the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lead {
    /// Leads on.
    Stay,
    /// Hands the role over: its own node's turn is next.
    Resign,
}

/// The coordinator's writes of the run: each a transaction on its token
/// and the run's revision as last read.
struct Writer<'a> {
    live: &'a Liveness,
    key: Vec<u8>,
    rev: i64,
    token: i64,
    me: &'a str,
}

impl Writer<'_> {
    async fn put(&mut self, run: &mut UpdateRun) -> bool {
        if run.coordinators.last().map(String::as_str) != Some(self.me) {
            run.coordinators.push(self.me.to_string());
        }
        let json = serde_json::to_vec(&*run).expect("records serialize");
        let coordinator = super::coordinator::key(self.live.prefix());
        let txn = Txn::new()
            .when(Cmp::created_at(&coordinator, self.token))
            .when(Cmp::modified_at(&self.key, self.rev))
            .then(Op::put(&self.key, &json, None));
        match self.live.etcd().txn(&txn).await {
            Ok(r) if r.succeeded => {
                self.rev = r.revision;
                true
            }
            // Deposed, or the run changed (a cancel): read again next round.
            Ok(_) => false,
            Err(e) => {
                tracing::warn!(error = %e, "writing the rolling update failed");
                false
            }
        }
    }
}

/// One round of the coordinator's rolling update: advances the run as far
/// as it can without waiting.
pub async fn drive(node: &Node, live: &Liveness, mirror: &Mirror, token: i64) -> Lead {
    let key = run_key(live.prefix());
    let Ok(Some(kv)) = live.etcd().get(&key).await else {
        return Lead::Stay;
    };
    let Ok(mut run) = parse_run(&kv.value) else {
        return Lead::Stay;
    };
    if run.state != RunState::Running {
        return Lead::Stay;
    }
    let mut w = Writer {
        live,
        key,
        rev: kv.mod_revision,
        token,
        me: node.name(),
    };
    // Each pass moves the current turn one phase on, or waits.
    for _ in 0..4 * run.nodes.len() + 1 {
        match advance(node, mirror, &mut run, &mut w).await {
            Step::Moved => continue,
            Step::Wait => return Lead::Stay,
            Step::Resign => return Lead::Resign,
        }
    }
    Lead::Stay
}

enum Step {
    Moved,
    Wait,
    Resign,
}

/// Ends the run as `state`, naming why.
async fn end(run: &mut UpdateRun, w: &mut Writer<'_>, state: RunState, error: Option<String>) {
    run.state = state;
    run.error = error;
    run.finished_at_ms = Some(now_ms());
    if w.put(run).await {
        tracing::info!(id = %run.id, ?state, error = ?run.error, "rolling update ended");
    }
}

async fn advance(node: &Node, mirror: &Mirror, run: &mut UpdateRun, w: &mut Writer<'_>) -> Step {
    let Some(i) = run.nodes.iter().position(|t| t.phase != Phase::Done) else {
        end(run, w, RunState::Completed, None).await;
        return Step::Wait;
    };
    let turn = run.nodes[i].clone();
    let Some(spec) = node.cluster.node(&turn.node).cloned() else {
        let why = format!("node {} left the cluster", turn.node);
        fail(run, i, w, why).await;
        return Step::Wait;
    };
    if turn.phase == Phase::Failed {
        let why = turn.error.unwrap_or_default();
        end(run, w, RunState::Failed, Some(why)).await;
        return Step::Wait;
    }
    if turn.phase == Phase::Pending {
        if run.cancel_requested {
            let why = format!("cancelled before node {}'s turn", turn.node);
            end(run, w, RunState::Cancelled, Some(why)).await;
            return Step::Wait;
        }
        if turn.node == node.name() {
            if mirror.alive().iter().any(|n| n != node.name()) {
                tracing::info!(id = %run.id, "this node's turn in the rolling update: handing the coordinator role over");
                return Step::Resign;
            }
            let why = "no other live node to hand the coordinator role to".to_string();
            fail(run, i, w, why).await;
            return Step::Wait;
        }
    }
    let (kind, asked) = match turn.phase {
        Phase::Pending | Phase::Draining => (OpKind::Drain, &turn.drain),
        Phase::Updating => (OpKind::Update, &turn.update),
        _ => (OpKind::Resume, &turn.resume),
    };
    if turn.phase == Phase::Pending {
        return start(node, run, i, w, Phase::Draining).await;
    }
    // The phase's operation: as recorded, or the one its intent started.
    let op = match asked {
        Some(id) => node.peers.operation(&spec, id).await,
        None => match adopt(node, &spec, kind, turn.since_ms).await {
            Some(op) => Ok(op),
            None => return start(node, run, i, w, turn.phase).await,
        },
    };
    let late =
        turn.phase == Phase::Updating && now_ms().saturating_sub(turn.since_ms) > run.stop_after_ms;
    let op = match op {
        Ok(op) => op,
        Err(e) if late => {
            let why = format!("its agent is not back after stop_after ({e})");
            fail(run, i, w, why).await;
            return Step::Wait;
        }
        // Not reachable now (its agent may be restarting): ask again.
        Err(e) => {
            tracing::info!(node = %turn.node, error = %e, "the rolling update waits for the node");
            return Step::Wait;
        }
    };
    if asked.is_none() && !record_op(run, i, kind, &op.id, w).await {
        return Step::Wait;
    }
    // The update command restarted the node's agent, which came back in
    // time: the update did its work.
    let restarted = kind == OpKind::Update && op.interrupted && !late;
    match op.state {
        OpState::Running if late => {
            let _ = node.peers.cancel_operation(&spec, &op.id).await;
            let why = format!(
                "the update command still ran after stop_after ({} s): cancelled",
                run.stop_after_ms / 1000
            );
            fail(run, i, w, why).await;
            Step::Wait
        }
        OpState::Running => Step::Wait,
        OpState::Failed if restarted => {
            tracing::info!(id = %run.id, node = %turn.node, "the update command restarted the node's agent, back in time");
            start(node, run, i, w, Phase::Resuming).await
        }
        OpState::Completed => {
            let next = match turn.phase {
                Phase::Draining => Phase::Updating,
                Phase::Updating => Phase::Resuming,
                _ => Phase::Done,
            };
            if next == Phase::Done {
                run.nodes[i].phase = Phase::Done;
                run.nodes[i].since_ms = now_ms();
                tracing::info!(id = %run.id, node = %turn.node, "node updated");
                return if w.put(run).await {
                    Step::Moved
                } else {
                    Step::Wait
                };
            }
            start(node, run, i, w, next).await
        }
        state => {
            let why = format!(
                "the {} {}: {}",
                super::node::name_of(&kind),
                super::node::name_of(&state),
                op.error.unwrap_or_default()
            );
            fail(run, i, w, why).await;
            Step::Wait
        }
    }
}

/// Fails turn `i` and the run.
async fn fail(run: &mut UpdateRun, i: usize, w: &mut Writer<'_>, why: String) {
    run.nodes[i].phase = Phase::Failed;
    run.nodes[i].error = Some(why.clone());
    let why = format!("node {}: {why}", run.nodes[i].node);
    end(run, w, RunState::Failed, Some(why)).await;
}

/// Writes the intent of turn `i`'s `phase`, then asks the node for its
/// operation and records it.
async fn start(
    node: &Node,
    run: &mut UpdateRun,
    i: usize,
    w: &mut Writer<'_>,
    phase: Phase,
) -> Step {
    let turn = &mut run.nodes[i];
    if turn.phase != phase {
        turn.phase = phase;
        turn.since_ms = now_ms();
        if !w.put(run).await {
            return Step::Wait;
        }
    }
    let Some(spec) = node.cluster.node(&run.nodes[i].node).cloned() else {
        return Step::Wait;
    };
    let (kind, asked) = match phase {
        Phase::Draining => (
            OpKind::Drain,
            node.peers.drain(&spec, &Drain::default()).await,
        ),
        Phase::Updating => (
            OpKind::Update,
            node.peers
                .update(
                    &spec,
                    &Update {
                        command: run.command.clone(),
                        force: false,
                    },
                )
                .await,
        ),
        _ => (
            OpKind::Resume,
            node.peers
                .resume(
                    &spec,
                    &Resume {
                        failback: Some(run.failback),
                        clear_quarantine: None,
                    },
                )
                .await,
        ),
    };
    match asked {
        Ok(op) => {
            tracing::info!(id = %run.id, node = %spec.name, op = %op.id, "rolling update: {}", super::node::name_of(&kind));
            if record_op(run, i, kind, &op.id, w).await {
                Step::Moved
            } else {
                Step::Wait
            }
        }
        Err(super::peer::PeerError::Api {
            status, message, ..
        }) if status != 503 => {
            let why = format!("the {}: {message}", super::node::name_of(&kind));
            fail(run, i, w, why).await;
            Step::Wait
        }
        // Unreachable or unavailable: the intent stands; asked again (or
        // the operation found) next round.
        Err(e) => {
            tracing::info!(node = %spec.name, error = %e, "the rolling update waits for the node");
            Step::Wait
        }
    }
}

/// Records operation `id` of `kind` in turn `i`.
async fn record_op(
    run: &mut UpdateRun,
    i: usize,
    kind: OpKind,
    id: &str,
    w: &mut Writer<'_>,
) -> bool {
    let turn = &mut run.nodes[i];
    *match kind {
        OpKind::Drain => &mut turn.drain,
        OpKind::Update => &mut turn.update,
        OpKind::Resume => &mut turn.resume,
    } = Some(id.to_string());
    w.put(run).await
}

/// The operation of `kind` a phase's intent (written at `since_ms`) may
/// have started on the node before its coordinator died.
async fn adopt(
    node: &Node,
    spec: &super::cluster::NodeSpec,
    kind: OpKind,
    since_ms: u64,
) -> Option<OperationView> {
    let ops = node.peers.operations(spec).await.ok()?;
    ops.into_iter()
        .rev()
        .find(|o| o.kind == kind && o.started_at_ms + CLOCK_SLACK_MS >= since_ms)
}
