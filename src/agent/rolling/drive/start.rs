//! Starting a turn's phase on its node: the drain, update or resume asked
//! for with a request id that makes a retry the same request, the
//! operation recorded in the run, and one the node already runs adopted.

use super::*;

/// Writes the intent of turn `i`'s `phase`, then asks the node for its
/// operation and records it.
pub(super) async fn start(
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
    let Some(spec) = node.member(&run.nodes[i].node) else {
        return Step::Wait;
    };
    // The same phase asked again (by the next coordinator, say) gets the
    // operation the first ask started.
    let request_id = Some(request_id(run, i, phase));
    let command = |command: &Option<String>, stage: &str| Update {
        command: command.clone().unwrap_or_default(),
        force: false,
        stage: Some(stage.to_string()),
        request_id: request_id.clone(),
    };
    // Started in turn with the cluster operations asked of any agent, and
    // never holding that turn longer than a start may take.
    let Ok(cluster_turn) = node.cluster_turn().await else {
        return Step::Wait;
    };
    let asked = tokio::time::timeout(crate::agent::relay::START_WAIT, async {
        match phase {
            Phase::Draining => {
                let d = Drain {
                    request_id: request_id.clone(),
                    delta: off(run.delta),
                    ..Drain::default()
                };
                node.peers.drain(&spec, &d).await
            }
            Phase::PreUpdate => {
                let u = command(&run.pre_update, "pre");
                node.peers.update(&spec, &u).await
            }
            Phase::PostUpdate => {
                let u = command(&run.post_update, "post");
                node.peers.update(&spec, &u).await
            }
            Phase::Updating => {
                let u = Update {
                    command: run.command.clone(),
                    force: false,
                    stage: None,
                    request_id: request_id.clone(),
                };
                node.peers.update(&spec, &u).await
            }
            _ => {
                let r = Resume {
                    failback: Some(run.failback),
                    clear_quarantine: None,
                    request_id: request_id.clone(),
                    delta: off(run.delta),
                };
                node.peers.resume(&spec, &r).await
            }
        }
    })
    .await
    .unwrap_or_else(|_| {
        Err(PeerError::Unreachable {
            node: spec.name.clone(),
            message: "it did not answer in time; its operation is looked for next round".into(),
        })
    });
    drop(cluster_turn);
    match asked {
        Ok(op) => {
            tracing::info!(id = %run.id, node = %spec.name, op = %op.id, "rolling update: {}", what(phase));
            if record_op(run, i, phase, &op.id, w).await {
                Step::Moved
            } else {
                Step::Wait
            }
        }
        Err(PeerError::Api {
            status, message, ..
        }) if status != 503 => {
            let why = format!("the {}: {message}", what(phase));
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

/// Records operation `id` of `phase` in turn `i`.
pub(super) async fn record_op(
    run: &mut UpdateRun,
    i: usize,
    phase: Phase,
    id: &str,
    w: &mut Writer<'_>,
) -> bool {
    *slot_of(&mut run.nodes[i], phase) = Some(id.to_string());
    w.put(run).await
}

/// What a phase's operation is called in errors.
pub(super) fn what(phase: Phase) -> &'static str {
    match phase {
        Phase::PreUpdate => "pre-update command",
        Phase::Draining => "drain",
        Phase::Updating => "update",
        Phase::Resuming => "resume",
        _ => "post-update command",
    }
}

/// The kind of operation a phase runs on its node.
pub(super) fn kind_of(phase: Phase) -> OpKind {
    match phase {
        Phase::Draining => OpKind::Drain,
        Phase::Resuming => OpKind::Resume,
        _ => OpKind::Update,
    }
}

/// The `stage` an update operation of `phase` is asked with.
pub(super) fn stage_of(phase: Phase) -> Option<&'static str> {
    match phase {
        Phase::PreUpdate => Some("pre"),
        Phase::PostUpdate => Some("post"),
        _ => None,
    }
}

/// Where turn `t` records the operation of `phase`.
pub(super) fn slot_of(t: &mut crate::agent::rolling::Turn, phase: Phase) -> &mut Option<String> {
    match phase {
        Phase::PreUpdate => &mut t.pre,
        Phase::Draining => &mut t.drain,
        Phase::Updating => &mut t.update,
        Phase::Resuming => &mut t.resume,
        _ => &mut t.post,
    }
}

/// The operation of `phase` turn `t` recorded.
pub(super) fn recorded(t: &crate::agent::rolling::Turn, phase: Phase) -> Option<String> {
    let mut t = t.clone();
    slot_of(&mut t, phase).take()
}

/// The request id of turn `i`'s `phase` in its current attempt.
pub(super) fn request_id(run: &UpdateRun, i: usize, phase: Phase) -> String {
    let t = &run.nodes[i];
    format!(
        "{}/{}/{}/{}",
        run.id,
        t.node,
        crate::agent::node::name_of(&phase),
        t.attempts
    )
}

/// The operation of `kind` a phase's intent (written at `since_ms`) may
/// have started on the node before its coordinator died: the one asked
/// with the phase's request id, or (from an agent that keeps no request
/// ids) the latest of its kind and stage started since.
pub(super) async fn adopt(
    node: &Node,
    spec: &crate::agent::cluster::NodeSpec,
    phase: Phase,
    turn: &crate::agent::rolling::Turn,
    request_id: &str,
) -> Option<OperationView> {
    let ops = node.peers.operations(spec).await.ok()?;
    let recorded = [
        &turn.pre,
        &turn.drain,
        &turn.update,
        &turn.resume,
        &turn.post,
    ];
    ops.into_iter().rev().find(|o| {
        let asked = match o.params["request_id"].as_str() {
            Some(r) => r == request_id,
            None => {
                o.kind == kind_of(phase)
                    && o.params["stage"].as_str() == stage_of(phase)
                    && o.started_at_ms + CLOCK_SLACK_MS >= turn.since_ms
            }
        };
        asked
            && !turn.discarded.contains(&o.id)
            && !recorded.iter().any(|r| r.as_deref() == Some(o.id.as_str()))
    })
}

/// A drain's or resume's `delta` for a run with `delta` on or off.
fn off(delta: bool) -> Option<crate::agent::request::Switch> {
    (!delta).then(|| crate::agent::request::Switch::Text("off".into()))
}
