//! Drain: pause the node and move every running VM to the other active
//! nodes, largest first, where free memory allows, a few at a time.

use super::*;
use crate::agent::node::VmState;

/// A drain step's state while its VM is still arriving on the drained node:
/// its target is chosen once it lands.
pub(in crate::agent) const ARRIVING: &str = "arriving";

impl Node {
    /// `POST /v1/node/drain`: pauses the node and moves every running VM to
    /// the other active nodes. Refuses, before moving anything, when they
    /// cannot hold every VM, naming the shortfall, unless `allow_partial`.
    /// Returns the operation at once; it runs in the background.
    pub async fn drain(self: &Arc<Self>, req: DrainRequest) -> Result<OperationView, NodeError> {
        // Until this drain is recorded, no other drain or resume starts.
        let _turn = self.op_turn.lock().await;
        self.refuse_if_closing()?;
        if let Some(op) = self.asked_before(OpKind::Drain, req.request_id.as_deref())? {
            return Ok(op);
        }
        if self.mode() == NodeMode::Draining {
            return Err(NodeError::Conflict(format!(
                "node {} is already draining",
                self.spec.name
            )));
        }
        let (max, auto) = self.drain_concurrency(req.max_concurrent);
        if max == 0 {
            return Err(NodeError::BadRequest(
                "max_concurrent must be at least 1".into(),
            ));
        }
        let (active, excluded) = self.elsewhere().await;
        let free = free_of(&active);
        // Asked before the node turns away arrivals: a VM that starts
        // running here after this holds nothing elsewhere, as far as the
        // plan knows.
        let near = self.near_for(req.delta, &self.running_vms(), &active).await;
        // From here no VM is admitted, so the plan sees every VM there will
        // be. A VM arriving now leaves too once it lands: the plan must have
        // room for it, though its target is chosen only then.
        let prior = self.hold_mode(Some(NodeMode::Draining));
        let mut vms = self.running_vms();
        let arriving = self.arriving_vms();
        vms.extend(arriving.iter().cloned());
        let (placed, left) = place_near(&vms, &free, &near);
        if !left.is_empty() && !req.allow_partial {
            self.release_mode(prior);
            let need: u64 = left.iter().map(|(_, m)| m).sum();
            let names: Vec<String> = left
                .iter()
                .map(|(v, m)| format!("{v} ({})", gib(*m)))
                .collect();
            let room: Vec<String> = free
                .iter()
                .map(|(n, f)| format!("{n} {} free", gib(*f)))
                .collect();
            return Err(NodeError::InsufficientMemory(format!(
                "cannot drain node {}: the other nodes cannot hold {} of its VMs, {} short: {}; {}{}",
                self.spec.name,
                left.len(),
                gib(need),
                names.join(", "),
                if room.is_empty() { "no other node is active".to_string() } else { room.join(", ") },
                if excluded.is_empty() { String::new() } else { format!(" ({})", excluded.join(", ")) }
            )));
        }
        let steps = self.plan_steps(&placed, &left, &arriving);
        self.mode_changed(prior, NodeMode::Draining);
        let mut params = json!({ "max_concurrent": max, "allow_partial": req.allow_partial });
        if !req.delta {
            params["delta"] = json!("off");
        }
        if let Some(why) = &auto {
            params["auto"] = json!(why);
        }
        with_request_id(&mut params, req.request_id.as_deref());
        let (id, cancel) = self.new_op(OpKind::Drain, params, steps);
        tracing::info!(op = %id, vms = placed.len(), left = left.len(), max_concurrent = max, "drain started");
        for ((vm, to), held) in placed.iter().zip(near.bases(&placed)) {
            if !held.is_none() {
                tracing::info!(op = %id, %vm, %to, ?held, "drain: sent where a copy of its memory is held");
            }
        }
        if let Some(why) = auto {
            tracing::info!(op = %id, max_concurrent = max, "drain's concurrency chosen: {why}");
        }
        let node = self.clone();
        let op = id.clone();
        self.tasks
            .spawn(async move { node.run_drain(op, (max as usize, req.delta), cancel).await });
        self.operation(&id)
    }

    /// A drain's steps: each VM `placed` to its target; each arriving VM
    /// waits to land; each left without room, and each VM that neither runs
    /// nor arrives, is skipped, saying why.
    fn plan_steps(
        &self,
        placed: &[(String, String)],
        left: &[(String, u64)],
        arriving: &[(String, u64)],
    ) -> Vec<Step> {
        let me = &self.spec.name;
        let here = self.vms();
        let memory_of = |vm: &str| {
            here.iter()
                .find(|v| v.spec.name == vm)
                .map_or(0, |v| v.spec.memory)
        };
        let is_arriving = |vm: &str| arriving.iter().any(|(n, _)| n == vm);
        let mut steps: Vec<Step> = placed
            .iter()
            .filter(|(vm, _)| !is_arriving(vm))
            .map(|(vm, to)| Step::new((vm.clone(), memory_of(vm)), me, to, ("planned", None)))
            .collect();
        steps.extend(
            arriving
                .iter()
                .map(|vm| Step::new(vm.clone(), me, "", (ARRIVING, None))),
        );
        let no_room = || Some("no active node has room for it".to_string());
        steps.extend(
            left.iter()
                .filter(|(vm, _)| !is_arriving(vm))
                .map(|vm| Step::new(vm.clone(), me, "", ("skipped", no_room()))),
        );
        // VMs that neither run nor arrive cannot move: they stay, and say why.
        steps.extend(
            here.into_iter()
                .filter(|v| {
                    !matches!(
                        v.state,
                        VmState::Running | VmState::MigratingIn | VmState::Creating
                    )
                })
                .map(|v| {
                    let why = format!(
                        "it is {} here: only running VMs move",
                        crate::agent::node::name_of(&v.state)
                    );
                    Step::new((v.spec.name, v.spec.memory), me, "", ("skipped", Some(why)))
                }),
        );
        steps
    }

    /// `max_concurrent: "auto"` (or none, on a node whose
    /// `max_concurrent_migrations` is `"auto"`): from the node's cap (or its
    /// fastest outgoing migration so far) and its running VMs' write rates.
    pub(super) fn auto_concurrency(&self) -> (u32, String) {
        use super::auto::choose;

        let running: Vec<_> = self
            .vms()
            .into_iter()
            .filter(|v| v.state == VmState::Running)
            .collect();
        let dirtiest =
            super::auto::dirtiest(running.iter().map(|v| (v.spec.workload, v.spec.dirty_rate)));
        let link = self.link();
        let (n, why) = choose(link, dirtiest, running.len(), super::auto::cores());
        let limit = self.spec.max_concurrent_migrations;
        if n > limit {
            return (
                limit,
                format!("{why}; held to the node's max_concurrent_migrations, {limit}"),
            );
        }
        (n, why)
    }

    /// Running VMs, (name, memory).
    pub(super) fn running_vms(&self) -> Vec<(String, u64)> {
        self.vms_in(VmState::Running)
    }

    /// VMs arriving here now, or being created here, (name, memory):
    /// each runs here soon.
    pub(super) fn arriving_vms(&self) -> Vec<(String, u64)> {
        let mut vms = self.vms_in(VmState::MigratingIn);
        vms.extend(self.vms_in(VmState::Creating));
        vms
    }

    fn vms_in(&self, state: VmState) -> Vec<(String, u64)> {
        self.vms()
            .into_iter()
            .filter(|v| v.state == state)
            .map(|v| (v.spec.name, v.spec.memory))
            .collect()
    }

    pub(super) async fn run_drain(
        self: Arc<Self>,
        op: String,
        (max, delta): (usize, bool),
        cancel: CancellationToken,
    ) {
        loop {
            // Listening before the steps are read: a migration that ends
            // from here on wakes the loop at once, and the next one starts
            // without waiting out the tick.
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            self.refresh_steps(&op);
            if !cancel.is_cancelled() {
                self.place_landed(&op).await;
            }
            // Start planned steps while this drain has room.
            let steps = self.with_op(&op, |v| v.steps.clone()).unwrap_or_default();
            let active = steps
                .iter()
                .filter(|s| matches!(s.state.as_str(), "queued" | "running"))
                .count();
            if !cancel.is_cancelled() {
                self.start_steps(&op, &steps, max.saturating_sub(active), delta);
            } else {
                self.stop_steps(&op, &steps);
            }
            self.refresh_steps(&op);
            if !cancel.is_cancelled() {
                self.retarget_failed(&op).await;
            }
            let steps = self.with_op(&op, |v| v.steps.clone()).unwrap_or_default();
            if steps.iter().all(Step::is_final) {
                break;
            }
            tokio::select! {
                _ = changed => {}
                _ = cancel.cancelled(), if !cancel.is_cancelled() => {}
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
        self.end_drain(&op, cancel.is_cancelled());
        tracing::info!(%op, "drain ended");
    }

    /// Asks for the migrations of up to `room` planned steps.
    pub(super) fn start_steps(
        self: &Arc<Self>,
        op: &str,
        steps: &[Step],
        mut room: usize,
        delta: bool,
    ) {
        for (i, s) in steps.iter().enumerate() {
            if room == 0 {
                break;
            }
            if s.state != "planned" {
                continue;
            }
            room -= 1;
            let config = crate::migration::MigrationConfig {
                delta,
                ..self.migration_defaults()
            };
            let asked = self.request_migration(&s.vm, &s.target, config, Some(op.to_string()));
            self.with_op(op, |v| v.steps[i].asked(asked.map(|m| m.id)));
        }
    }

    /// Cancelled: steps not started never will; those in flight stop.
    pub(super) fn stop_steps(&self, op: &str, steps: &[Step]) {
        self.with_op(op, |v| {
            for s in v
                .steps
                .iter_mut()
                .filter(|s| matches!(s.state.as_str(), "planned" | ARRIVING))
            {
                s.state = "cancelled".into();
                s.error = Some("the drain was cancelled".into());
            }
        });
        for s in steps {
            if let (Some(id), "queued" | "running") = (&s.migration_id, s.state.as_str()) {
                let _ = self.cancel_migration(id);
            }
        }
    }

    /// The drain's end: the node stays paused, and the operation says what
    /// moved, what did not and what is still on the node.
    pub(super) fn end_drain(&self, op: &str, cancelled: bool) {
        // A drained node takes no VMs until it is resumed, whatever happened.
        self.set_mode(NodeMode::Paused);
        let remaining: Vec<RemainingVm> = self
            .vms()
            .into_iter()
            .map(|v| RemainingVm {
                vm: v.spec.name,
                state: crate::agent::node::name_of(&v.state),
            })
            .collect();
        self.with_op(op, |v| {
            v.remaining = remaining;
            let failed: Vec<String> = v
                .steps
                .iter()
                .filter(|s| s.state != "completed")
                .map(|s| format!("{}: {}", s.vm, s.error.as_deref().unwrap_or(&s.state)))
                .collect();
            v.state = if cancelled {
                OpState::Cancelled
            } else if v
                .steps
                .iter()
                .any(|s| s.state != "completed" && s.state != "skipped")
            {
                OpState::Failed
            } else if !v.remaining.is_empty() {
                OpState::Partial
            } else {
                OpState::Completed
            };
            let mut why = Vec::new();
            if !failed.is_empty() {
                why.push(format!("not moved: {}", failed.join("; ")));
            }
            if !v.remaining.is_empty() {
                let names: Vec<String> = v
                    .remaining
                    .iter()
                    .map(|r| format!("{} ({})", r.vm, r.state))
                    .collect();
                why.push(format!("still on the node: {}", names.join(", ")));
            }
            if !why.is_empty() {
                v.error = Some(why.join("; "));
            }
            v.finished_at_ms = Some(now_ms());
        });
    }

    /// Copies this node's migration states into the operation's steps.
    pub(super) fn refresh_steps(&self, op: &str) {
        let migrations = self.migrations();
        self.with_op(op, |v| {
            for s in v.steps.iter_mut() {
                let Some(id) = &s.migration_id else { continue };
                if let Some(m) = migrations.iter().find(|m| &m.id == id) {
                    s.state = state_name(m.state).into();
                    s.error = m.error.clone();
                    s.started_at_ms = m.started_at_ms;
                    s.finished_at_ms = m.finished_at_ms;
                }
            }
        });
    }
}
