//! A node's VMs: its view, creating, admitting and deleting them.

use super::*;

impl Node {
    /// `GET /v1/node`.
    pub fn view(&self) -> NodeView {
        let st = self.state.lock().unwrap();
        let in_flight = st
            .migrations
            .iter()
            .filter(|m| m.state == MigrationState::Running)
            .count();
        NodeView {
            name: self.spec.name.clone(),
            state: st.mode(),
            memory_capacity: self.spec.memory_capacity,
            memory_used: st.memory_used(),
            memory_reclaimable: st.warm_bytes(),
            vms: st
                .vms
                .values()
                .map(|v| self.with_record(v.view()))
                .collect(),
            migrations_in_flight: in_flight,
            migrations_queued: st.queue.len(),
            limits: Limits {
                max_concurrent_migrations: st
                    .auto_limit
                    .as_ref()
                    .map_or(self.spec.max_concurrent_migrations, |(n, _)| *n),
                auto: self.spec.auto_concurrency.then(|| {
                    st.auto_limit
                        .as_ref()
                        .map_or_else(|| "auto".to_string(), |(_, why)| why.clone())
                }),
                max_bandwidth: self.spec.max_bandwidth,
                codec: self.spec.codec.to_string(),
            },
            lease: self.liveness.get().map(|l| l.view()),
            coordinator: self
                .mirror
                .get()
                .and_then(|m| m.coordinator())
                .map(|(c, _)| c.node),
            quarantined_until_ms: self
                .mirror
                .get()
                .and_then(|m| m.quarantined_until(&self.spec.name)),
            version: env!("CARGO_PKG_VERSION").to_string(),
            update_hook: self.spec.update_hook.clone(),
            failback_retention: Some(self.retention.view()),
        }
    }

    /// `GET /v1/vms`.
    pub fn vms(&self) -> Vec<VmView> {
        let views: Vec<VmView> = self
            .state
            .lock()
            .unwrap()
            .vms
            .values()
            .map(Vm::view)
            .collect();
        views.into_iter().map(|v| self.with_record(v)).collect()
    }

    /// `GET /v1/vms/{name}`.
    pub fn vm(&self, name: &str) -> Result<VmView, NodeError> {
        let view = {
            let st = self.state.lock().unwrap();
            st.vms.get(name).map(Vm::view).ok_or_else(|| {
                NodeError::NotFound(format!("no VM {name:?} on node {}", self.spec.name))
            })?
        };
        Ok(self.with_record(view))
    }

    /// A VM's view with what its record in etcd adds: its restarts, and the
    /// priority and owners it was created with (a migration carries only
    /// the guest).
    pub(super) fn with_record(&self, mut v: VmView) -> VmView {
        let Some((r, _)) = self.mirror.get().and_then(|m| m.vm(&v.spec.name)) else {
            return v;
        };
        if r.node == self.spec.name {
            v.spec.priority = r.spec.priority;
            v.spec.preferred_owners = r.spec.preferred_owners;
            v.spec.image = r.spec.image;
            v.spec.seed = r.spec.seed;
            v.spec.incarnation = r.spec.incarnation;
            v.restarts = r.restarts;
            v.last_restart = r.last_restart;
        }
        v
    }

    /// The running guest of VM `name` (tests compare its memory).
    pub fn guest(&self, name: &str) -> Option<Arc<dyn MigratableGuest>> {
        self.state.lock().unwrap().vms.get(name)?.guest.clone()
    }

    /// Builds a VM, its guest held paused until [`Self::run_created`]
    /// (listed as `creating` meanwhile). Filling its memory takes a
    /// while for large guests, with the VM's name and memory reserved.
    pub(in crate::agent) fn build_vm(&self, spec: VmSpec) -> Result<(), NodeError> {
        if spec.guest == GuestKind::Kvm {
            if let Some(why) = crate::migration::kvm_unavailable() {
                return Err(NodeError::Unsupported(format!(
                    "this node has no working {why}; use \"guest\": \"sim\""
                )));
            }
        }
        {
            let mut st = self.state.lock().unwrap();
            self.admit_locked(&mut st, &spec.name, spec.memory, None)?;
            // Reserve the name and the memory while the guest is built.
            st.vms
                .insert(spec.name.clone(), Vm::reserved(spec.clone(), None));
        }
        let built = (|| {
            let memory = self.initial_memory(&spec)?;
            let workload = Workload {
                pattern: spec.workload,
                dirty_rate: spec.dirty_rate,
                content: spec.fill.clone(),
                writers: 1,
                seed: spec.seed,
            };
            let guest = crate::migration::start_guest(spec.guest, Arc::new(memory), workload)
                .map_err(|e| {
                    NodeError::Unsupported(format!("cannot create VM {}: {e}", spec.name))
                })?;
            guest.pause();
            Ok(guest)
        })();
        let mut st = self.state.lock().unwrap();
        match built {
            Ok(guest) => {
                let vm = st.vms.get_mut(&spec.name).expect("reserved above");
                vm.guest = Some(guest);
                vm.held = true;
                Ok(())
            }
            Err(e) => {
                let gone = st.vms.remove(&spec.name);
                drop(st);
                drop(gone);
                Err(e)
            }
        }
    }

    /// A new VM's memory: its image, or its fill from its seed.
    pub(super) fn initial_memory(&self, spec: &VmSpec) -> Result<GuestMemory, NodeError> {
        let Some(image) = &spec.image else {
            let memory = GuestMemory::new(spec.memory).map_err(|e| {
                NodeError::InsufficientMemory(format!("cannot create VM {}: {e}", spec.name))
            })?;
            spec.fill.fill(&memory, spec.seed, 2);
            return Ok(memory);
        };
        self.cluster
            .image_allowed(std::path::Path::new(image))
            .map_err(NodeError::BadRequest)?;
        // Checked before it is read: the memory reserved is `memory`.
        let len = std::fs::metadata(image)
            .map_err(|e| NodeError::BadRequest(format!("image {image}: {e}")))?
            .len();
        if len != spec.memory {
            return Err(NodeError::BadRequest(format!(
                "memory {} disagrees with image {image}'s size {}",
                crate::units::Bytes(spec.memory),
                crate::units::Bytes(len)
            )));
        }
        GuestMemory::from_image(std::path::Path::new(image))
            .map_err(|e| NodeError::BadRequest(format!("VM {}: {e:#}", spec.name)))
    }

    /// A VM built by [`Self::build_vm`] runs (or waits while the node is
    /// fenced); false when the node's lease expired meanwhile.
    pub(in crate::agent) fn run_created(&self, name: &str) -> bool {
        let mut st = self.state.lock().unwrap();
        let fenced = st.fenced;
        st.vms
            .get_mut(name)
            .is_some_and(|vm| vm.run_unless_fenced(fenced))
    }

    /// Drops a VM built by [`Self::build_vm`] that never ran.
    pub(in crate::agent) fn unbuild(&self, name: &str) {
        let gone = {
            let mut st = self.state.lock().unwrap();
            match st.vms.get(name) {
                Some(vm) if vm.state == VmState::Creating => st.vms.remove(name),
                _ => None,
            }
        };
        // Its guest's threads are joined outside the node's lock.
        drop(gone);
    }

    /// Whether a VM of `memory` bytes named `name` may be placed here.
    pub(super) fn admit_locked(
        &self,
        st: &mut State,
        name: &str,
        memory: u64,
        base: Option<&str>,
    ) -> Result<(), NodeError> {
        if st.fenced {
            return Err(NodeError::Conflict(format!(
                "node {} is fenced (it cannot renew its lease in etcd) and takes no new work",
                self.spec.name
            )));
        }
        if st.mode() != NodeMode::Active {
            return Err(NodeError::Conflict(format!(
                "node {} is {} and takes no VMs",
                self.spec.name,
                name_of(&st.mode())
            )));
        }
        if st.vms.contains_key(name) {
            return Err(NodeError::Conflict(format!(
                "node {} already hosts a VM named {name:?}",
                self.spec.name
            )));
        }
        // A VM's own warm copy becomes its memory when it comes back by a
        // delta from it: it needs nothing more. Any other copy of that name
        // will never be used: it goes.
        let own = st
            .warm
            .get(name)
            .filter(|w| base == Some(w.migration.as_str()) && w.memory.len_bytes() == memory)
            .map_or(0, |w| w.memory.len_bytes());
        if own == 0 {
            st.warm.remove(name);
        }
        let need = memory.saturating_sub(own);
        // The other warm copies give way, but only for a VM that then fits.
        let used = st.memory_used();
        if used.saturating_sub(st.warm_bytes()) + own + need > self.spec.memory_capacity {
            return Err(NodeError::InsufficientMemory(format!(
                "node {} has {} free, VM {name} needs {}",
                self.spec.name,
                crate::units::Bytes(self.spec.memory_capacity.saturating_sub(used)),
                crate::units::Bytes(memory)
            )));
        }
        st.make_room(need, self.spec.memory_capacity, name);
        let used = st.memory_used();
        if used + need > self.spec.memory_capacity {
            return Err(NodeError::InsufficientMemory(format!(
                "node {} has {} free, VM {name} needs {}",
                self.spec.name,
                crate::units::Bytes(self.spec.memory_capacity.saturating_sub(used)),
                crate::units::Bytes(memory)
            )));
        }
        Ok(())
    }

    /// `DELETE /v1/vms/{name}`: stops and removes a VM that is not migrating.
    /// A paused VM may be the last copy of a guest (the source's copy of an
    /// unresolved migration, or one left paused by a hand-off): it is removed
    /// only with `force`, and the answer's `lost` says what went with it.
    pub fn delete_vm(&self, name: &str, force: bool) -> Result<VmView, NodeError> {
        let mut st = self.state.lock().unwrap();
        let vm = st.vms.get(name).ok_or_else(|| {
            NodeError::NotFound(format!("no VM {name:?} on node {}", self.spec.name))
        })?;
        if vm.state == VmState::Creating {
            return Err(NodeError::Conflict(format!(
                "VM {name} is being created; delete it once it runs"
            )));
        }
        if matches!(vm.state, VmState::MigratingIn | VmState::MigratingOut)
            || st
                .queue
                .iter()
                .any(|id| st.migrations.iter().any(|m| &m.id == id && m.vm == name))
        {
            return Err(NodeError::Conflict(format!(
                "VM {name} is migrating; cancel the migration first"
            )));
        }
        // A superseded copy may be the last one while its record still
        // names this node (the cluster has not started it elsewhere yet).
        let elsewhere = vm.state == VmState::Superseded
            && self
                .mirror
                .get()
                .and_then(|m| m.vm(name))
                .is_some_and(|(r, _)| r.node != self.spec.name);
        let keep = match vm.state {
            VmState::Paused | VmState::Fenced => true,
            VmState::Superseded => !elsewhere,
            _ => false,
        };
        let superseded = vm.state == VmState::Superseded;
        let lost = keep.then(|| {
            let unresolved = st.migrations.iter().rev().find(|m| {
                m.vm == name
                    && m.direction == Direction::Outgoing
                    && m.state == MigrationState::Unresolved
            });
            match unresolved {
                Some(m) => format!(
                    "the paused copy of VM {name} held for unresolved migration {} to node {}: if node {} does not run it, VM {name} is gone",
                    m.id, m.target, m.target
                ),
                None if superseded => format!(
                    "the superseded copy of VM {name}, whose record still names this node (the cluster has not started it elsewhere yet): it may be the last one"
                ),
                None => format!(
                    "VM {name}, paused here and running nowhere else as far as this node knows: it is gone"
                ),
            }
        });
        if let (Some(lost), false) = (&lost, force) {
            return Err(NodeError::Conflict(format!(
                "refusing to delete {lost} (resolve the migration, or delete with force)"
            )));
        }
        let vm = st.vms.remove(name).expect("checked above");
        drop(st);
        // An image it left with, kept here as a copy for its kin, goes too.
        self.retention.remove(name);
        if let Some(lost) = &lost {
            tracing::warn!(vm = %name, "deleted with force: {lost}");
        }
        let view = vm.view();
        // Its guest's threads are joined outside the node's lock.
        drop(vm);
        Ok(VmView { lost, ..view })
    }

    /// The id of the unresolved outgoing migration whose paused copy VM
    /// `name` is, if it is one.
    pub(in crate::agent) fn unresolved_of(&self, name: &str) -> Option<String> {
        let st = self.state.lock().unwrap();
        st.migrations
            .iter()
            .rev()
            .find(|m| {
                m.vm == name
                    && m.direction == Direction::Outgoing
                    && m.state == MigrationState::Unresolved
            })
            .map(|m| m.id.clone())
    }
}
