//! Incoming migrations: admission, the VM's arrival at GO and the
//! session's end; and the node's idle wait and gauges.

use super::*;

impl Node {
    /// The receiver's admission of an incoming session, once its peer has
    /// proved the cluster's key: only labelled sessions from another node of
    /// the cluster, for a VM this node has room for while it takes VMs.
    /// Admitted, the VM is listed as arriving, under the session's id.
    pub fn admit_incoming(&self, session: u64, setup: &SessionSetup) -> Result<(), String> {
        let Some(label) = &setup.label else {
            tracing::warn!("refused an unlabelled session: not from an agent of this cluster");
            return Err(format!(
                "node {} takes migrations from its cluster's agents only",
                self.spec.name
            ));
        };
        if label.source_node == self.spec.name || self.member(&label.source_node).is_none() {
            return Err(format!(
                "node {:?} is not a node of this cluster",
                label.source_node
            ));
        }
        let mut st = self.state.lock().unwrap();
        let base = setup.base.as_ref().map(|b| b.migration_id.as_str());
        self.admit_locked(&mut st, &label.vm, setup.memory_bytes, base)
            .map_err(|e| e.to_string())?;
        st.vms.insert(
            label.vm.clone(),
            Vm::reserved(
                VmSpec {
                    name: label.vm.clone(),
                    memory: setup.memory_bytes,
                    workload: WorkloadPattern::Idle,
                    dirty_rate: 0,
                    fill: FillSpec::default(),
                    guest: setup.guest_kind,
                    priority: Priority::default(),
                    preferred_owners: Vec::new(),
                    image: None,
                    seed: default_seed(),
                    incarnation: 0,
                },
                Some(session),
            ),
        );
        st.migrations.push(MigrationEntry {
            id: label.migration_id.clone(),
            vm: label.vm.clone(),
            source: label.source_node.clone(),
            target: self.spec.name.clone(),
            direction: Direction::Incoming,
            state: MigrationState::Running,
            created_at_ms: now_ms(),
            started_at_ms: Some(now_ms()),
            finished_at_ms: None,
            created: Instant::now(),
            started: Some(Instant::now()),
            operation: None,
            config: MigrationConfig {
                leave_paused: setup.flags & crate::wire::SETUP_LEAVE_PAUSED != 0,
                ..MigrationConfig::default()
            },
            ctx: RunContext::default(),
            report: None,
            error: None,
            eta_end: None,
            resolution: None,
            session: Some(session),
        });
        st.prune_migrations();
        Ok(())
    }

    /// A guest handed over at GO by session `session`: the VM runs here from
    /// this moment (or waits paused), before the session's last messages and
    /// report.
    pub fn vm_arrived(&self, session: u64, guest: &Arc<dyn MigratableGuest>, resumed: bool) {
        let mut st = self.state.lock().unwrap();
        let fenced = st.fenced;
        let Some((name, source, id)) = st
            .migrations
            .iter()
            .find(|m| m.session == Some(session))
            .map(|m| (m.vm.clone(), m.source.clone(), m.id.clone()))
        else {
            return;
        };
        let Some(vm) = st
            .vms
            .get_mut(&name)
            .filter(|vm| vm.arriving == Some(session))
        else {
            return;
        };
        {
            // A migration carries only the guest: which VM it is, and the
            // RAM image it was made from, the cluster's record says.
            if let Some((r, _)) = self.mirror.get().and_then(|m| m.vm(&name)) {
                vm.spec.incarnation = r.spec.incarnation;
                vm.spec.image = r.spec.image.clone();
            }
            if let Some(w) = guest.workload() {
                vm.spec.workload = w.pattern;
                vm.spec.dirty_rate = w.dirty_rate;
                vm.spec.fill = w.content;
            }
            vm.guest = Some(guest.clone());
            if resumed {
                // Arrived at a node that fenced itself meanwhile: it waits.
                vm.run_unless_fenced(fenced);
            } else {
                vm.state = if vm.superseded {
                    VmState::Superseded
                } else {
                    VmState::Paused
                };
            }
            vm.arriving = None;
            self.metrics.received.fetch_add(1, Ordering::Relaxed);
        }
        let superseded = vm.superseded;
        let (image, incarnation) = (vm.spec.image.clone(), vm.spec.incarnation);
        drop(st);
        // It runs here again: an image it left with before is past as its
        // own base, but one of a VM made from a RAM image stays a copy for
        // its kin until it leaves again, unless another VM's copy of the
        // same image already serves them. Its warm copy goes.
        if !self.home_copy_for_kin(&name, image.as_deref(), incarnation) {
            self.retention.remove(&name);
        }
        self.state.lock().unwrap().warm.remove(&name);
        // The record names this node from now.
        self.claim_arrived(&name, &source, &id, superseded);
        self.changed.notify_waiters();
    }

    /// The retained image an admitted session's setup offers as its base:
    /// the one this node kept when the VM left by that migration.
    pub fn delta_base(&self, setup: &SessionSetup) -> Result<crate::transport::BaseImage, String> {
        let (Some(label), Some(base)) = (&setup.label, &setup.base) else {
            return Err("no base offered".into());
        };
        let vm = &label.vm;
        {
            let mut st = self.state.lock().unwrap();
            if st
                .warm
                .get(vm)
                .is_some_and(|w| w.migration == base.migration_id)
            {
                // Taken over by the session: no one else may use it now.
                let w = st.warm.remove(vm).expect("found above");
                return Ok(crate::transport::BaseImage::Memory(w.memory));
            }
        }
        let own = match self.retention.base(vm, &base.migration_id) {
            Ok(image) => return Ok(image),
            Err(why) => why,
        };
        self.kin_copy(vm, &base.migration_id)
            .map_err(|kin| format!("node {}: {own}; {kin}", self.spec.name))
    }

    /// Another VM's copy by `migration`, offered for VM `vm` made from the
    /// same RAM image (the source compared their pages by keyed tags): its
    /// kept file, copied in, so the kin keeps its own base here; else its
    /// warm copy, taken over (a write of its image under way then stops and
    /// drops its file), unless that VM is arriving itself.
    fn kin_copy(&self, vm: &str, migration: &str) -> Result<crate::transport::BaseImage, String> {
        if !self.spec.kin_bases {
            return Err("kin bases are off here".into());
        }
        let Some(image) = self.made_from(vm) else {
            return Err(format!("VM {vm} was made from no RAM image"));
        };
        let file = self
            .retention
            .images_of(migration)
            .filter(|v| v.image.as_deref() == Some(image.as_str()));
        if let Some(v) = file {
            if let Ok(file) = self.retention.base(&v.vm, migration) {
                return Ok(file);
            }
        }
        let mut st = self.state.lock().unwrap();
        let kin = st
            .warm
            .iter()
            .find(|(_, w)| w.migration == migration && w.image.as_deref() == Some(image.as_str()))
            .map(|(name, _)| name.clone())
            .filter(|name| !st.vms.get(name).is_some_and(Vm::arriving));
        match kin.and_then(|name| st.warm.remove(&name)) {
            Some(w) => Ok(crate::transport::BaseImage::Memory(w.memory)),
            None => Err(format!(
                "no copy of a VM made from {image} by migration {migration}"
            )),
        }
    }

    /// An incoming session ended: the VM runs here, or its arrival is
    /// undone; the migration's record gets the report. Only an admitted
    /// session has a record, found by its id: a session refused before its
    /// admission touches nothing.
    pub fn incoming_done(&self, incoming: Incoming) {
        if !incoming.admitted {
            return;
        }
        let session = incoming.session_id;
        if let (Outcome::Completed, Some(guest)) = (incoming.report.outcome, &incoming.guest) {
            // Normally already told at GO.
            let resumed = incoming.report.guest_location == "destination"
                && !self
                    .state
                    .lock()
                    .unwrap()
                    .migrations
                    .iter()
                    .any(|m| m.session == Some(session) && m.config.leave_paused);
            self.vm_arrived(session, guest, resumed);
        }
        let mut st = self.state.lock().unwrap();
        let outcome = incoming.report.outcome;
        let Some(e) = st
            .migrations
            .iter_mut()
            .find(|m| m.session == Some(session))
        else {
            return;
        };
        e.finished_at_ms = Some(now_ms());
        e.state = MigrationState::of(outcome);
        e.error = incoming.report.error.clone();
        e.report = Some(incoming.report);
        let (vm, from, id) = (e.vm.clone(), e.source.clone(), e.id.clone());
        let arrived = outcome == Outcome::Completed && incoming.guest.is_some();
        if let (true, Some(hashes), Some(v)) = (arrived, incoming.hashes, st.vms.get_mut(&vm)) {
            // What it arrived with, for a failback to `from`.
            v.base = Some(crate::migration::delta::Base::new(
                id.clone(),
                from.clone(),
                hashes,
            ));
        }
        let gone = if !arrived && st.vms.get(&vm).is_some_and(|v| v.arriving == Some(session)) {
            st.vms.remove(&vm)
        } else {
            None
        };
        drop(st);
        drop(gone);
        self.journal_migration(&id);
        tracing::info!(%vm, %from, arrived, "incoming migration ended");
    }

    /// Cancels every outgoing migration, queued or running (the agent is
    /// shutting down): each guest stays here.
    pub fn cancel_all(&self) {
        let mut st = self.state.lock().unwrap();
        let queued: Vec<String> = st.queue.drain(..).collect();
        for id in &queued {
            if let Some(e) = st.entry(id) {
                e.finished_at_ms = Some(now_ms());
                e.state = MigrationState::Cancelled;
                e.error = Some("the agent shut down".into());
            }
        }
        for e in st.migrations.iter() {
            if e.direction == Direction::Outgoing && e.state == MigrationState::Running {
                e.ctx.cancel.cancel();
            }
        }
        drop(st);
        for id in &queued {
            self.journal_migration(id);
        }
    }

    /// Waits until no outgoing migration runs, at most `limit`.
    pub async fn wait_idle(&self, limit: std::time::Duration) {
        let deadline = Instant::now() + limit;
        while self.state.lock().unwrap().running_out > 0 && Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Counts for `/metrics`: VMs hosted, migrations running, queued.
    pub fn gauges(&self) -> (usize, usize, usize, f64) {
        let mut st = self.state.lock().unwrap();
        let running = st.running_out;
        let rate: f64 = st
            .migrations
            .iter_mut()
            .filter(|m| m.state == MigrationState::Running && m.direction == Direction::Outgoing)
            .map(|m| m.progress().wire_bps)
            .fold(0.0, |a, b| a + b);
        (st.vms.len(), running, st.queue.len(), rate)
    }

    /// Each outgoing migration running now: its id, VM, target and
    /// progress.
    pub fn running_out(&self) -> Vec<(String, String, String, ProgressView)> {
        let mut st = self.state.lock().unwrap();
        st.migrations
            .iter_mut()
            .filter(|m| m.state == MigrationState::Running && m.direction == Direction::Outgoing)
            .map(|m| (m.id.clone(), m.vm.clone(), m.target.clone(), m.progress()))
            .collect()
    }
}
