//! Outgoing migrations: the request, the queue that keeps at most
//! `max_concurrent_migrations` running, each run, and cancel.

use super::*;

impl Node {
    /// What this node's outgoing migrations use where a request names
    /// nothing: the engine's defaults, with the node's codec.
    pub fn migration_defaults(&self) -> MigrationConfig {
        MigrationConfig {
            codec: self.spec.codec,
            dense: self.spec.dense,
            ..MigrationConfig::default()
        }
    }

    /// `POST /v1/migrations`: queues the migration of `vm` to `target`;
    /// it starts when one of the node's slots is free.
    pub fn request_migration(
        self: &Arc<Self>,
        vm: &str,
        target: &str,
        config: MigrationConfig,
        operation: Option<String>,
    ) -> Result<MigrationView, NodeError> {
        let target_spec = self.member(target).ok_or_else(|| {
            let names: Vec<String> = self.members().into_iter().map(|n| n.name).collect();
            NodeError::BadRequest(format!(
                "target: no node {target:?} in the cluster (nodes: {})",
                names.join(", ")
            ))
        })?;
        if target_spec.name == self.spec.name {
            return Err(NodeError::BadRequest(format!(
                "VM {vm} is already on node {target}"
            )));
        }
        config
            .validate()
            .map_err(|e| NodeError::BadRequest(e.to_string()))?;
        let view =
            {
                let mut st = self.state.lock().unwrap();
                let Some(v) = st.vms.get(vm) else {
                    return Err(NodeError::NotFound(format!(
                        "no VM {vm:?} on node {}",
                        self.spec.name
                    )));
                };
                if v.state != VmState::Running {
                    return Err(NodeError::Conflict(format!(
                        "VM {vm} is {}, not running",
                        name_of(&v.state)
                    )));
                }
                if st.migrations.iter().any(|m| {
                    m.vm == vm && m.direction == Direction::Outgoing && !m.state.is_final()
                }) {
                    return Err(NodeError::Conflict(format!("VM {vm} is already migrating")));
                }
                st.next_id += 1;
                let id = format!(
                    "{}-{}-{}",
                    self.spec.name,
                    now_ms() % 1_000_000_000,
                    st.next_id
                );
                st.migrations.push(MigrationEntry {
                    id: id.clone(),
                    vm: vm.to_string(),
                    source: self.spec.name.clone(),
                    target: target.to_string(),
                    direction: Direction::Outgoing,
                    state: MigrationState::Queued,
                    created_at_ms: now_ms(),
                    started_at_ms: None,
                    finished_at_ms: None,
                    created: Instant::now(),
                    started: None,
                    operation,
                    config,
                    ctx: RunContext::default(),
                    report: None,
                    error: None,
                    eta_end: None,
                    resolution: None,
                    session: None,
                });
                st.prune_migrations();
                st.queue.push_back(id.clone());
                st.entry(&id).expect("just pushed").view(false)
            };
        self.pump();
        Ok(view)
    }

    /// Starts queued migrations while slots are free.
    pub(super) fn pump(self: &Arc<Self>) {
        let mut st = self.state.lock().unwrap();
        // The limit is chosen only while something waits for it.
        while !st.queue.is_empty() {
            if st.running_out >= self.queue_limit(&mut st) {
                break;
            }
            let Some(id) = st.queue.pop_front() else {
                break;
            };
            let Some(entry) = st.entry(&id) else { continue };
            entry.state = MigrationState::Running;
            entry.started = Some(Instant::now());
            entry.started_at_ms = Some(now_ms());
            let vm_name = entry.vm.clone();
            let mut config = entry.config.clone();
            let ctx = entry.ctx.clone();
            let target = entry.target.clone();
            let Some(vm) = st.vms.get_mut(&vm_name) else {
                let e = st.entry(&id).expect("found above");
                e.state = MigrationState::Failed;
                e.finished_at_ms = Some(now_ms());
                e.error = Some(format!("VM {vm_name} is gone"));
                continue;
            };
            let Some(guest) = vm.guest.clone().filter(|_| vm.state == VmState::Running) else {
                let why = format!("VM {vm_name} is {}, not running", name_of(&vm.state));
                let e = st.entry(&id).expect("found above");
                e.state = MigrationState::Failed;
                e.finished_at_ms = Some(now_ms());
                e.error = Some(why);
                continue;
            };
            // Back to the node it came from: offer what it arrived with
            // (any other target is asked for an image when the run starts).
            if config.delta {
                config.base = vm.base.clone().filter(|b| b.from_node == target);
            }
            vm.state = VmState::MigratingOut;
            st.running_out += 1;
            let node = self.clone();
            self.tasks.spawn(async move {
                node.run_outgoing(id, vm_name, target, guest, config, ctx)
                    .await
            });
        }
    }

    pub(super) async fn run_outgoing(
        self: Arc<Self>,
        id: String,
        vm: String,
        target: String,
        guest: Arc<dyn MigratableGuest>,
        mut config: MigrationConfig,
        mut ctx: RunContext,
    ) {
        config.label = Some(SessionLabel {
            vm: vm.clone(),
            migration_id: id.clone(),
            source_node: self.spec.name.clone(),
        });
        config.session_key = Some(crate::migration::auth::SessionKey(self.cluster.key.clone()));
        if self.cluster.tls {
            ctx.tls = Some(crate::transport::tls::TlsClient::bound_to_key());
        }
        ctx.shared_bucket = self.bucket.clone();
        let addr = self.member(&target).map(|n| n.data).unwrap_or_default();
        tracing::info!(%id, %vm, %target, "migration started");
        if config.delta && config.base.is_none() {
            let memory = guest.memory().len_bytes();
            config.base = tokio::select! {
                b = self.base_held_by(&vm, &target, memory) => b,
                _ = ctx.cancel.cancelled() => None,
            };
        }
        // A restart after this node's death asks the target first.
        let recorded = self.record_moving(&vm, &target, &id).await;
        if recorded.is_err() {
            ctx.cancel.cancel();
        }
        let mut report = migrate(guest, &addr, &config, &ctx).await;
        if let Err(e) = recorded {
            report.outcome = Outcome::Failed;
            report.error = Some(format!("cannot record the move in etcd: {e}"));
        }
        match report.outcome {
            Outcome::Completed => self.record_moved(&vm, &target, &id, true),
            Outcome::Failed | Outcome::Cancelled => self.record_moved(&vm, &target, &id, false),
            // Settled by `resolve`.
            Outcome::Unresolved => {}
        }
        tracing::info!(%id, %vm, %target, outcome = ?report.outcome, error = ?report.error, "migration ended");
        let i = match report.outcome {
            Outcome::Completed => 0,
            Outcome::Failed => 1,
            Outcome::Cancelled => 2,
            Outcome::Unresolved => 3,
        };
        self.metrics.outcomes[i].fetch_add(1, Ordering::Relaxed);
        self.metrics
            .bytes_sent
            .fetch_add(report.wire_bytes, Ordering::Relaxed);
        self.metrics.duration.observe(report.total_ms / 1e3);
        self.metrics.wire_bytes.observe(report.wire_bytes as f64);
        if report.outcome == Outcome::Completed {
            self.metrics.downtime.observe(report.downtime_ms / 1e3);
        }
        let mut gone = None;
        let mut superseded = false;
        {
            let mut st = self.state.lock().unwrap();
            st.running_out -= 1;
            let fenced = st.fenced;
            match (report.outcome, st.vms.get_mut(&vm)) {
                // The guest runs on the target now; the paused copy here goes
                // (its memory held while its image is retained).
                (Outcome::Completed, _) => {
                    gone = st.vms.remove(&vm);
                    let left = gone.as_ref().and_then(|v| v.guest.as_ref());
                    let incarnation = gone.as_ref().map_or(0, |v| v.spec.incarnation);
                    let image = gone.as_ref().and_then(|v| v.spec.image.clone());
                    let budget = self.spec.failback_retention;
                    if let Some(g) = left.filter(|g| g.memory().len_bytes() <= budget) {
                        let warm = Warm {
                            migration: id.clone(),
                            memory: g.memory().clone(),
                            at: Instant::now(),
                            incarnation,
                            image,
                        };
                        st.warm.insert(vm.clone(), warm);
                        st.trim_warm(budget, &vm);
                    }
                }
                (Outcome::Unresolved, Some(v)) => {
                    // Superseded: restarted elsewhere, after the cluster
                    // has asked the target (the record still marks it).
                    superseded = v.superseded;
                    v.state = if v.superseded {
                        VmState::Superseded
                    } else {
                        VmState::Paused
                    };
                }
                (Outcome::Failed | Outcome::Cancelled, Some(v)) => {
                    superseded = !v.run_unless_fenced(fenced);
                }
                (_, None) => {}
            }
            if let Some(e) = st.entry(&id) {
                e.finished_at_ms = Some(now_ms());
                e.state = MigrationState::of(report.outcome);
                e.error = report.error.clone();
                e.report = Some(report);
            }
        }
        if gone.is_some() {
            // An image it left with before, kept here while it was home as
            // a copy for its kin, is past: the copy it leaves with now is
            // its base here. Dropped outside the node's lock (the store's
            // lock may be held across a rename and an fsync), and before
            // the new image's write starts, which it would cancel.
            self.retention.remove(&vm);
        }
        let left = gone.is_some() && self.spec.failback_retention > 0;
        // Its guest's threads are joined outside the node's lock.
        drop(gone);
        if left {
            self.retain_in_background(&vm, &id);
        }
        self.journal_migration(&id);
        if superseded {
            self.restart_superseded(&vm);
        }
        self.pump();
        self.changed.notify_waiters();
    }

    /// Writes the warm copy VM `vm` left by migration `id` with as its
    /// retained image, only while the node moves nothing: its migrations
    /// have the disk and the cores first (the write waits for them, also
    /// midway), and the warm copy serves a failback meanwhile. Nothing is
    /// written if the copy is gone: taken over by the VM's failback, or
    /// dropped for a VM that needed the room.
    fn retain_in_background(&self, vm: &str, id: &str) {
        let Some(node) = self.this.upgrade() else {
            return;
        };
        let (vm, id) = (vm.to_string(), id.to_string());
        self.tasks.spawn(async move {
            // A thread of its own, not the runtime's blocking pool: a write
            // waits long for the node's migrations, which need that pool.
            let (done, keep) = tokio::sync::oneshot::channel();
            let (writer, vm2) = (node.clone(), vm.clone());
            let spawned = std::thread::Builder::new()
                .name("retain-writer".into())
                .spawn(move || {
                    let _ = done.send(writer.write_retained(&vm2, &id));
                });
            if let Err(e) = spawned {
                tracing::warn!(%vm, error = %e, "retaining the VM's image failed: no thread");
                return;
            }
            match keep.await {
                Ok(Ok(Some(v))) => {
                    tracing::info!(%vm, bytes = v.bytes, "retained the image the VM left with")
                }
                Ok(Ok(None)) => {
                    tracing::info!(%vm, budget = node.spec.failback_retention, "the VM's image is not retained: larger than failback_retention, its warm copy taken over or dropped, or the agent stopping")
                }
                Ok(Err(e)) => tracing::warn!(%vm, error = %e, "retaining the VM's image failed"),
                Err(e) => tracing::warn!(%vm, error = %e, "retaining the VM's image failed"),
            }
        });
    }

    /// Writes the warm copy VM `vm` left by migration `id` with, on the
    /// calling thread, in the node's writer turn and only while the node
    /// is quiet; `None` when there was nothing to write or it was stopped.
    fn write_retained(
        &self,
        vm: &str,
        id: &str,
    ) -> Result<Option<crate::agent::retain::RetainedView>, String> {
        let gone = |st: &super::State| st.warm.get(vm).is_none_or(|w| w.migration != id);
        if self.closing.load(Ordering::Relaxed) || gone(&self.state.lock().unwrap()) {
            return Ok(None);
        }
        let _turn = self.retention.writer_turn();
        // Asked between steps: waits while the node moves a VM; stops for
        // an agent that stops, and for a copy taken over or dropped for
        // room (the write does not hold it).
        let gate = || loop {
            if self.closing.load(Ordering::Relaxed) {
                return true;
            }
            {
                let st = self.state.lock().unwrap();
                if gone(&st) {
                    return true;
                }
                if !st.busy() {
                    return false;
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        };
        // The node quiet first, the memory not yet held: an image reserves
        // its room, and evicts older ones, only when it is about to be
        // written.
        if gate() {
            return Ok(None);
        }
        let (memory, of) = {
            let st = self.state.lock().unwrap();
            let warm = st.warm.get(vm).filter(|w| w.migration == id);
            match warm.map(|w| (w.memory.clone(), (w.incarnation, w.image.clone()))) {
                Some(m) => m,
                None => return Ok(None),
            }
        };
        self.retention.keep(vm, id, of, &memory, &gate)
    }

    /// `GET /v1/migrations`, newest last.
    pub fn migrations(&self) -> Vec<MigrationView> {
        self.migration_views(false)
    }

    /// The migrations, newest last, the running ones with their progress
    /// (the live events).
    pub fn migrations_live(&self) -> Vec<MigrationView> {
        self.migration_views(true)
    }

    fn migration_views(&self, progress: bool) -> Vec<MigrationView> {
        let mut views = {
            let mut st = self.state.lock().unwrap();
            let st = &mut *st;
            let mut views = st.history.clone();
            views.extend(st.migrations.iter_mut().map(|m| m.view(progress)));
            views
        };
        for v in &mut views {
            self.with_saved(v);
        }
        views
    }

    /// `GET /v1/migrations/{id}`, with live progress while it runs.
    pub fn migration(&self, id: &str) -> Result<MigrationView, NodeError> {
        let mut view = {
            let mut st = self.state.lock().unwrap();
            match st.entry(id) {
                Some(m) => m.view(true),
                None => st
                    .history
                    .iter()
                    .find(|m| m.id == id)
                    .cloned()
                    .ok_or_else(|| {
                        NodeError::NotFound(format!(
                            "no migration {id:?} on node {}",
                            self.spec.name
                        ))
                    })?,
            }
        };
        self.with_saved(&mut view);
        Ok(view)
    }

    /// `DELETE /v1/migrations/{id}`: a queued migration is dropped from the
    /// queue, a running one is stopped (the VM stays on the source).
    pub fn cancel_migration(&self, id: &str) -> Result<MigrationView, NodeError> {
        let mut st = self.state.lock().unwrap();
        let Some(e) = st.entry(id) else {
            return Err(NodeError::NotFound(format!(
                "no migration {id:?} on node {}",
                self.spec.name
            )));
        };
        if e.direction == Direction::Incoming {
            return Err(NodeError::Conflict(format!(
                "migration {id} is incoming; cancel it on its source, node {}",
                e.source
            )));
        }
        match e.state {
            MigrationState::Queued => {
                e.finished_at_ms = Some(now_ms());
                e.state = MigrationState::Cancelled;
                e.error = Some("cancelled while queued".into());
                let view = e.view(false);
                st.queue.retain(|q| q != id);
                drop(st);
                self.journal_migration(id);
                self.changed.notify_waiters();
                Ok(view)
            }
            MigrationState::Running => {
                if !e.ctx.request_cancel() {
                    return Err(NodeError::Conflict(format!(
                        "migration {id} has sent GO: the hand-off finishes and VM {} runs on node {}; it can no longer be cancelled",
                        e.vm, e.target
                    )));
                }
                Ok(e.view(false))
            }
            s => Err(NodeError::Conflict(format!(
                "migration {id} has already ended ({})",
                name_of(&s)
            ))),
        }
    }
}
