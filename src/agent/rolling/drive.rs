//! The coordinator's side of the rolling update: each round it moves the
//! current node's turn on as far as it can without waiting, writing each
//! phase's intent before acting and the operation it started after.

use super::{parse_run, run_key, Phase, RunState, UpdateRun, CLOCK_SLACK_MS};
use crate::agent::etcd::{Cmp, Op, Txn};
use crate::agent::mirror::Mirror;
use crate::agent::node::{now_ms, Node};
use crate::agent::ops::{Interruption, OpKind, OpState, OperationView};
use crate::agent::peer::PeerError;
use crate::agent::request::{Drain, Resume, Update};
use crate::agent::store::Liveness;

mod start;

use start::{adopt, record_op, recorded, request_id, slot_of, start, what};

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
        let coordinator = crate::agent::coordinator::key(self.live.prefix());
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
            Ok(_) => {
                tracing::info!(id = %run.id, "the rolling update changed in etcd, or this coordinator was deposed: reading it again");
                false
            }
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
    // The mirror says whether one runs; etcd, as it stands, what it is.
    if mirror
        .update_run()
        .is_none_or(|r| r.state != RunState::Running)
    {
        return Lead::Stay;
    }
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

/// One step of the run: the current node's turn moves on as far as its
/// operation allows.
async fn advance(node: &Node, mirror: &Mirror, run: &mut UpdateRun, w: &mut Writer<'_>) -> Step {
    let current = run
        .nodes
        .iter()
        .position(|t| !matches!(t.phase, Phase::Done | Phase::Failed));
    let Some(i) = current else {
        finish(run, w).await;
        return Step::Wait;
    };
    let turn = run.nodes[i].clone();
    let Some(spec) = node.member(&turn.node) else {
        let why = format!("node {} left the cluster", turn.node);
        fail(run, i, w, why).await;
        return Step::Wait;
    };
    if turn.phase == Phase::Pending {
        if let Some(step) = before_turn(node, mirror, run, i, w).await {
            return step;
        }
        let first = if run.pre_update.is_some() {
            Phase::PreUpdate
        } else {
            Phase::Draining
        };
        return start(node, run, i, w, first).await;
    }
    let asked = recorded(&turn, turn.phase);
    // The phase's operation: as recorded, or the one its intent started.
    let op = match &asked {
        Some(id) => node.peers.operation(&spec, id).await,
        None => match adopt(
            node,
            &spec,
            turn.phase,
            &turn,
            &request_id(run, i, turn.phase),
        )
        .await
        {
            Some(op) => Ok(op),
            None => return start(node, run, i, w, turn.phase).await,
        },
    };
    // stop_after bounds every command a turn runs, and how long its node
    // may be out of reach in any phase.
    let overdue = now_ms().saturating_sub(turn.since_ms) > run.stop_after_ms;
    let op = match op {
        Ok(op) => op,
        Err(e) => return unreachable_node(run, i, w, e, asked.is_some(), overdue).await,
    };
    // The recorded id now names another request's operation: the node
    // lost the recorded one in a crash and numbered a later one the same.
    let ours = request_id(run, i, turn.phase);
    if asked.is_some() && op.params["request_id"].as_str().is_some_and(|r| r != ours) {
        let why = lost(&turn, " (its id now names another operation)");
        fail(run, i, w, why).await;
        return Step::Wait;
    }
    if asked.is_none() && !record_op(run, i, turn.phase, &op.id, w).await {
        return Step::Wait;
    }
    follow(node, &spec, run, i, w, op, overdue).await
}

/// Every turn is over: the run completes, or fails naming its failed nodes
/// (within max_failed_nodes).
async fn finish(run: &mut UpdateRun, w: &mut Writer<'_>) {
    let failed: Vec<String> = run
        .nodes
        .iter()
        .filter(|t| t.phase == Phase::Failed)
        .map(|t| {
            format!(
                "node {}: {}",
                t.node,
                t.error.as_deref().unwrap_or("failed")
            )
        })
        .collect();
    if failed.is_empty() {
        end(run, w, RunState::Completed, None).await;
    } else {
        let why = format!("{} (within max_failed_nodes)", failed.join("; "));
        end(run, w, RunState::Failed, Some(why)).await;
    }
}

/// A pending turn's checks before it starts: a cancel, a node that must
/// be online and is not, and the coordinator's own turn (it resigns).
/// `Some` ends this step.
async fn before_turn(
    node: &Node,
    mirror: &Mirror,
    run: &mut UpdateRun,
    i: usize,
    w: &mut Writer<'_>,
) -> Option<Step> {
    let turn = run.nodes[i].clone();
    if run.cancel_requested {
        let why = format!("cancelled before node {}'s turn", turn.node);
        end(run, w, RunState::Cancelled, Some(why)).await;
        return Some(Step::Wait);
    }
    if run.require_all_nodes_online {
        let alive = mirror.alive();
        if let Some(down) = run.nodes.iter().find(|t| !alive.contains(&t.node)) {
            tracing::info!(id = %run.id, node = %down.node, "the rolling update waits: require_all_nodes_online, and the node holds no lease");
            return Some(Step::Wait);
        }
    }
    if turn.node == node.name() {
        if mirror.alive().iter().any(|n| n != node.name()) {
            tracing::info!(id = %run.id, "this node's turn in the rolling update: handing the coordinator role over");
            return Some(Step::Resign);
        }
        let why = "no other live node to hand the coordinator role to".to_string();
        fail(run, i, w, why).await;
        return Some(Step::Wait);
    }
    None
}

/// The turn's node could not be asked for its operation.
async fn unreachable_node(
    run: &mut UpdateRun,
    i: usize,
    w: &mut Writer<'_>,
    e: PeerError,
    recorded: bool,
    overdue: bool,
) -> Step {
    let turn = run.nodes[i].clone();
    match e {
        e if run.cancel_requested => {
            let why = format!(
                "cancelled while node {} could not be asked ({e}); it is left as it was",
                turn.node
            );
            end(run, w, RunState::Cancelled, Some(why)).await;
        }
        // Recorded, yet unknown to its node: only an agent that ended
        // without a clean stop, before its record reached etcd, forgets one.
        PeerError::Api { status: 404, .. } if recorded => fail(run, i, w, lost(&turn, "")).await,
        e if overdue => {
            let why = format!("not back after stop_after ({e})");
            fail(run, i, w, why).await;
        }
        // Not reachable now (its agent may be restarting): ask again.
        e => {
            tracing::info!(node = %turn.node, error = %e, "the rolling update waits for the node");
        }
    }
    Step::Wait
}

/// The turn's operation as its node reports it: still running, its
/// command overdue, done (on to the next phase), or failed.
async fn follow(
    node: &Node,
    spec: &crate::agent::cluster::NodeSpec,
    run: &mut UpdateRun,
    i: usize,
    w: &mut Writer<'_>,
    op: OperationView,
    overdue: bool,
) -> Step {
    let turn = run.nodes[i].clone();
    let command = matches!(
        turn.phase,
        Phase::PreUpdate | Phase::Updating | Phase::PostUpdate
    );
    let late = overdue && command;
    // The update command restarted the node's agent (a clean stop; an
    // older agent does not say), which came back in time: the update did
    // its work. A crash during the command fails the turn.
    let restarted = turn.phase == Phase::Updating
        && op.interrupted
        && op.interruption != Some(Interruption::Crash)
        && !late;
    match op.state {
        OpState::Running if late => {
            let _ = node.peers.cancel_operation(spec, &op.id).await;
            let why = format!(
                "the {} still ran after stop_after ({} s): cancelled",
                what(turn.phase),
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
                Phase::PreUpdate => Phase::Draining,
                Phase::Draining => Phase::Updating,
                Phase::Updating => Phase::Resuming,
                Phase::Resuming if run.post_update.is_some() => Phase::PostUpdate,
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
                what(turn.phase),
                crate::agent::node::name_of(&state),
                op.error.unwrap_or_default()
            );
            fail(run, i, w, why).await;
            Step::Wait
        }
    }
}

/// Why a turn fails whose recorded operation its node no longer has.
fn lost(turn: &super::Turn, detail: &str) -> String {
    format!(
        "the {} is unknown to node {}: its agent ended without a clean stop before recording it{detail}",
        what(turn.phase),
        turn.node
    )
}

/// Turn `i`'s phase failed: it is tried again while retries are left;
/// else the turn fails, and the run with it past `max_failed_nodes`.
async fn fail(run: &mut UpdateRun, i: usize, w: &mut Writer<'_>, why: String) {
    let retries = run.max_retries_per_node;
    let t = &mut run.nodes[i];
    if t.attempts < retries && t.phase != Phase::Pending {
        t.attempts += 1;
        tracing::warn!(id = %run.id, node = %t.node, attempt = t.attempts, error = %why, "rolling update: trying the phase again");
        t.error = Some(format!("attempt {} failed: {why}", t.attempts));
        let phase = t.phase;
        let op = slot_of(t, phase).take();
        t.discarded.extend(op);
        t.since_ms = now_ms();
        w.put(run).await;
        return;
    }
    t.phase = Phase::Failed;
    t.error = Some(why.clone());
    let failed = run
        .nodes
        .iter()
        .filter(|t| t.phase == Phase::Failed)
        .count();
    if failed as u64 > u64::from(run.max_failed_nodes) {
        let why = format!("node {}: {why}", run.nodes[i].node);
        end(run, w, RunState::Failed, Some(why)).await;
    } else {
        tracing::warn!(id = %run.id, node = %run.nodes[i].node, error = %why, "rolling update: the node's turn failed; going on (max_failed_nodes)");
        w.put(run).await;
    }
}
