//! Resume: the node takes VMs again, with or without failback of what its
//! last drain moved.

use super::*;

impl Node {
    /// `POST /v1/node/resume`: the node takes VMs again. With `failback`,
    /// each VM the last drain moved away and that is still where it went is
    /// migrated back, as an operation returned at once.
    pub async fn resume(
        self: &Arc<Self>,
        failback: bool,
        delta: bool,
        request_id: Option<&str>,
    ) -> Result<OperationView, NodeError> {
        let _turn = self.op_turn.lock().await;
        self.refuse_if_closing()?;
        if let Some(op) = self.asked_before(OpKind::Resume, request_id)? {
            return Ok(op);
        }
        if self.mode() == NodeMode::Draining {
            return Err(NodeError::Conflict(format!(
                "node {} is draining; cancel the drain first",
                self.spec.name
            )));
        }
        let moved: Vec<Step> = if failback {
            let ops = self.ops.lock().unwrap();
            ops.iter()
                .rev()
                .find(|o| o.view.kind == OpKind::Drain)
                .map(|o| {
                    o.view
                        .steps
                        .iter()
                        .filter(|s| s.state == "completed")
                        .cloned()
                        .collect()
                })
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        // Where each is now, asked all at once, each within ASK_NODE.
        let asked = moved.into_iter().filter_map(|s| {
            let node = self.member(&s.target)?;
            Some(async move {
                let here = tokio::time::timeout(ASK_NODE, self.peers.vm(&node, &s.vm)).await;
                (s, here)
            })
        });
        let answers = futures_util::future::join_all(asked).await;
        self.set_mode(NodeMode::Active);
        let mut steps = Vec::new();
        for (s, here) in answers {
            let (state, error) = match here {
                Ok(Ok(v)) if v.state == VmState::Running => ("planned", None),
                Ok(Ok(v)) => (
                    "skipped",
                    Some(format!("it is {} on node {}", name_of(v.state), s.target)),
                ),
                Ok(Err(e)) => (
                    "skipped",
                    Some(format!("it is no longer on node {}: {e}", s.target)),
                ),
                Err(_) => (
                    "skipped",
                    Some(format!(
                        "node {} did not answer within {ASK_NODE:?}",
                        s.target
                    )),
                ),
            };
            steps.push(Step {
                vm: s.vm,
                memory: s.memory,
                source: s.target,
                target: self.spec.name.clone(),
                state: state.into(),
                migration_id: None,
                error,
                started_at_ms: None,
                finished_at_ms: None,
                tried: Vec::new(),
            });
        }
        let mut params = json!({ "failback": failback });
        if !delta {
            params["delta"] = json!("off");
        }
        with_request_id(&mut params, request_id);
        let (id, cancel) = self.new_op(OpKind::Resume, params, steps);
        let node = self.clone();
        let op = id.clone();
        self.tasks
            .spawn(async move { node.run_failback(op, delta, cancel).await });
        self.operation(&id)
    }

    pub(super) async fn run_failback(
        self: Arc<Self>,
        op: String,
        delta: bool,
        cancel: CancellationToken,
    ) {
        // Ask each VM's current node to send it back; each node's own limit
        // paces its share.
        let steps = self.with_op(&op, |v| v.steps.clone()).unwrap_or_default();
        for (i, s) in steps
            .iter()
            .enumerate()
            .filter(|(_, s)| s.state == "planned")
        {
            let Some(node) = self.member(&s.source) else {
                continue;
            };
            let node = &node;
            let body = CreateMigration {
                vm: s.vm.clone(),
                target: self.spec.name.clone(),
                params: MigrationParams {
                    delta: (!delta).then(|| crate::agent::request::Switch::Text("off".into())),
                    ..MigrationParams::default()
                },
            };
            let asked = self.peers.migrate(node, &body).await;
            self.with_op(&op, |v| v.steps[i].asked(asked.map(|m| m.id)));
        }
        let mut cancel_sent = false;
        loop {
            let steps = self.with_op(&op, |v| v.steps.clone()).unwrap_or_default();
            for (i, s) in steps.iter().enumerate() {
                let (Some(id), false) = (&s.migration_id, s.is_final()) else {
                    continue;
                };
                let Some(node) = self.member(&s.source) else {
                    continue;
                };
                let node = &node;
                if cancel.is_cancelled() && !cancel_sent {
                    let _ = self.peers.cancel_migration(node, id).await;
                }
                if let Ok(m) = self.peers.migration(node, id).await {
                    self.with_op(&op, |v| {
                        let step = &mut v.steps[i];
                        step.state = name_of(m.state);
                        step.error = m.error;
                        step.started_at_ms = m.started_at_ms;
                        step.finished_at_ms = m.finished_at_ms;
                    });
                }
            }
            cancel_sent |= cancel.is_cancelled();
            let steps = self.with_op(&op, |v| v.steps.clone()).unwrap_or_default();
            if steps.iter().all(Step::is_final) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let cancelled = cancel.is_cancelled();
        self.with_op(&op, |v| {
            let bad: Vec<String> = v
                .steps
                .iter()
                .filter(|s| s.state != "completed" && s.state != "skipped")
                .map(|s| format!("{}: {}", s.vm, s.error.as_deref().unwrap_or(&s.state)))
                .collect();
            v.state = if cancelled {
                OpState::Cancelled
            } else if bad.is_empty() {
                OpState::Completed
            } else {
                OpState::Failed
            };
            if !bad.is_empty() {
                v.error = Some(format!("not moved back: {}", bad.join("; ")));
            }
            v.finished_at_ms = Some(now_ms());
        });
    }
}
