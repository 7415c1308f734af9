//! Update: a drained node runs its update command through its hook, the
//! command marked started only once its operation is recorded.

use super::*;

impl Node {
    /// `POST /v1/node/update`: runs `command` on this node through its
    /// `update_hook` (the hook's program and arguments, the command last),
    /// with `FERRY_NODE` set to the node's name. The node must be paused and
    /// host no VM (a drained node), unless `force` overrides the latter; the
    /// command's exit status and output are kept in the operation. Returns
    /// the operation at once.
    pub fn update(
        self: &Arc<Self>,
        command: String,
        force: bool,
        stage: Option<&str>,
        request_id: Option<&str>,
    ) -> Result<OperationView, NodeError> {
        let Some(hook) = self.spec.update_hook.clone() else {
            return Err(NodeError::Conflict(format!(
                "node {} has no update_hook in the cluster file: it runs no update commands",
                self.spec.name
            )));
        };
        // Not while a drain or resume of the node starts.
        let _turn = self.op_turn.try_lock().map_err(|_| {
            NodeError::Conflict(format!(
                "node {} is starting another operation; ask again",
                self.spec.name
            ))
        })?;
        self.refuse_if_closing()?;
        if let Some(op) = self.asked_before(OpKind::Update, request_id)? {
            return Ok(op);
        }
        // A pre- or post-update command runs whatever the node's state.
        let force = force || stage.is_some();
        if self.mode() != NodeMode::Paused && stage.is_none() {
            return Err(NodeError::Conflict(format!(
                "node {} is {}: drain it before updating it",
                self.spec.name,
                crate::agent::node::name_of(&self.mode())
            )));
        }
        let hosted: Vec<String> = self.vms().into_iter().map(|v| v.spec.name).collect();
        if !hosted.is_empty() && !force {
            return Err(NodeError::Conflict(format!(
                "node {} still hosts {}: move them first, or update with force",
                self.spec.name,
                hosted.join(", ")
            )));
        }
        if self
            .ops
            .lock()
            .unwrap()
            .iter()
            .any(|o| o.view.kind == OpKind::Update && o.view.state == OpState::Running)
        {
            return Err(NodeError::Conflict(format!(
                "node {} is already running an update",
                self.spec.name
            )));
        }
        let mut argv = hook;
        argv.push(command.clone());
        let mut params = match stage {
            Some(s) => json!({ "command": command, "stage": s }),
            None => json!({ "command": command }),
        };
        with_request_id(&mut params, request_id);
        let (id, cancel) = self.new_op(OpKind::Update, params, Vec::new());
        let node = self.clone();
        let op = id.clone();
        let stage = stage.unwrap_or("update").to_string();
        self.tasks
            .spawn(async move { node.run_update(op, argv, stage, cancel).await });
        self.operation(&id)
    }

    pub(super) async fn run_update(
        self: Arc<Self>,
        op: String,
        argv: Vec<String>,
        stage: String,
        cancel: CancellationToken,
    ) {
        // The command may end this very agent (an update that restarts
        // it, or kills it): its operation's record reaches etcd first, so
        // the next process reads back how it ended.
        if let Some(j) = self.journal.get() {
            let flushed = tokio::select! {
                ok = j.flush(RECORD_WAIT) => ok,
                // Cancelled meanwhile: ended below, unrun.
                _ = cancel.cancelled() => true,
            };
            if !flushed {
                self.with_op(&op, |v| {
                    v.state = OpState::Failed;
                    v.error = Some(format!(
                        "not run: the cluster's store did not take the operation's record within {} s",
                        RECORD_WAIT.as_secs()
                    ));
                    v.finished_at_ms = Some(now_ms());
                });
                return;
            }
        }
        // A clean stop that came first ended the operation as not run; from
        // here on a stop counts as the command's own doing.
        if !self.start_command(&op).await {
            return;
        }
        tracing::info!(%op, ?argv, "update command started");
        let start = std::time::Instant::now();
        let mut cmd = tokio::process::Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .env("FERRY_NODE", &self.spec.name)
            .env("FERRY_UPDATE_STAGE", &stage)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        crate::agent::child::die_with_agent(&mut cmd);
        let child = (!cancel.is_cancelled()).then(|| cmd.spawn());
        let (exit_code, stdout, stderr, error, cancelled) = match child {
            None => (
                None,
                String::new(),
                String::new(),
                Some("cancelled before the command ran".into()),
                true,
            ),
            Some(Err(e)) => (
                None,
                String::new(),
                String::new(),
                Some(format!("cannot run {}: {e}", argv[0])),
                false,
            ),
            Some(Ok(child)) => {
                tokio::select! {
                    out = crate::agent::child::wait_keeping_tail(child, MAX_OUTPUT) => match out {
                        Ok(o) => {
                            let code = o.status.code();
                            let error = (!o.status.success())
                                .then(|| format!("the update command exited with {}", o.status));
                            (code, o.stdout, o.stderr, error, false)
                        }
                        Err(e) => (None, String::new(), String::new(), Some(format!("waiting for the update command: {e}")), false),
                    },
                    // Dropping the child kills it.
                    _ = cancel.cancelled() => (None, String::new(), String::new(), Some("cancelled: the command was killed".into()), true),
                }
            }
        };
        tracing::info!(%op, ?exit_code, "update command ended");
        self.with_op(&op, |v| {
            v.state = if cancelled {
                OpState::Cancelled
            } else if error.is_none() {
                OpState::Completed
            } else {
                OpState::Failed
            };
            v.error = error;
            v.update = Some(UpdateRun {
                argv,
                exit_code,
                stdout,
                stderr,
                duration_ms: start.elapsed().as_millis() as u64,
            });
            v.finished_at_ms = Some(now_ms());
        });
    }
}
