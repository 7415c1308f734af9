//! How a VM's record follows the VM: the node that runs it writes it on
//! create, migration, resolve and delete; a migration's target claims it
//! when the guest arrives; the coordinator rewrites it only to restart the
//! VM. Each write is a transaction on the record's revision, decided by an
//! idempotent edit of the record as it is now: a write whose answer was
//! lost is read back on the next try and found done, never applied twice.

use super::etcd::{Cmp, EtcdError, Op, Txn};
use super::node::{now_ms, Node, NodeError, VmSpec, VmView};
use super::records::{read, vm_key, RecordState, Restart, VmRecord};
use std::sync::Arc;
use std::time::Duration;

/// What an edit does to a record, given the record as it is now.
pub(super) enum Edit {
    /// Write this record.
    Put(Box<VmRecord>),
    /// Delete the record.
    Delete,
    /// It is as wanted already (perhaps by an earlier try).
    Done,
    /// It cannot be done: the record says otherwise (why).
    Refuse(String),
}

/// Why an edit of a record did not happen.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The record names another node, or none.
    #[error("{0}")]
    Refused(String),
    /// The store could not be asked, or the record kept changing.
    #[error("the cluster's store: {0}")]
    Store(#[from] EtcdError),
}

/// How often a background edit tries again a record that does not parse.
const INVALID_RETRY: Duration = Duration::from_secs(60);

impl From<RecordError> for NodeError {
    fn from(e: RecordError) -> Self {
        match e {
            RecordError::Refused(why) => NodeError::Conflict(why),
            RecordError::Store(e) => NodeError::Unavailable(format!("the cluster's store: {e}")),
        }
    }
}

/// How long `DELETE /v1/vms/{name}` waits for the VM's record to go.
const RECORD_WAIT: Duration = Duration::from_secs(5);

/// Tries of one edit before it fails.
const TRIES: u32 = 8;

impl Node {
    /// Applies `edit` to VM `name`'s record until what it asks is written
    /// or it asks nothing more; before the agent registered, nothing is
    /// written and it says so.
    pub(super) async fn edit(
        &self,
        name: &str,
        edit: impl Fn(Option<&VmRecord>) -> Edit,
    ) -> Result<(), RecordError> {
        let Some(live) = self.liveness.get() else {
            return Err(RecordError::Store(EtcdError::Unavailable(
                "this agent has not registered in etcd yet".into(),
            )));
        };
        let (etcd, key) = (live.etcd(), vm_key(live.prefix(), name));
        let mut last = None;
        for attempt in 0..TRIES {
            if attempt > 0 && last.is_some() {
                tokio::time::sleep(Duration::from_millis(100 << attempt.min(4))).await;
            }
            let now = match read(etcd, &key).await {
                Ok(now) => now,
                // Reading it again at once changes nothing.
                Err(e @ EtcdError::Invalid(_)) => return Err(e.into()),
                Err(e) => {
                    last = Some(e);
                    continue;
                }
            };
            let op = match edit(now.as_ref().map(|(r, _)| r)) {
                Edit::Done => return Ok(()),
                Edit::Refuse(why) => return Err(RecordError::Refused(why)),
                Edit::Put(r) => Op::put(&key, &r.to_json(), None),
                Edit::Delete => Op::delete(&key),
            };
            let when = match &now {
                Some((_, rev)) => Cmp::modified_at(&key, *rev),
                None => Cmp::absent(&key),
            };
            match etcd.txn(&Txn::new().when(when).then(op)).await {
                Ok(t) if t.succeeded => return Ok(()),
                Ok(_) => last = None,
                // It may have been written all the same: read back next.
                Err(e) => last = Some(e),
            }
        }
        Err(RecordError::Store(last.unwrap_or_else(|| {
            EtcdError::Unavailable(format!("the record of VM {name} kept changing"))
        })))
    }

    /// Retries `edit` in the background until it is done or refused (the
    /// store may be away for a while); a refusal is logged.
    fn edit_in_background(
        &self,
        name: &str,
        what: &'static str,
        edit: impl Fn(Option<&VmRecord>) -> Edit + Send + Sync + 'static,
    ) {
        let Some(node) = self.this.upgrade() else {
            return;
        };
        let vm = name.to_string();
        self.tasks.spawn(async move {
            let mut wait = Duration::from_millis(250);
            loop {
                match node.edit(&vm, &edit).await {
                    Ok(()) => return,
                    Err(RecordError::Refused(why)) => {
                        tracing::error!(%vm, "{what}: refused: {why}");
                        return;
                    }
                    // A record that does not parse stays so until an
                    // operator mends it: said once, then tried each minute.
                    Err(RecordError::Store(EtcdError::Invalid(why))) => {
                        if wait < INVALID_RETRY {
                            tracing::error!(%vm, "{what}: the VM's record in etcd is invalid ({why}); trying again each minute until it is mended");
                        }
                        wait = INVALID_RETRY;
                    }
                    Err(e) => {
                        tracing::warn!(%vm, error = %e, "{what} failed; trying again");
                        wait = (wait * 2).min(Duration::from_secs(5));
                    }
                }
                tokio::time::sleep(wait).await;
            }
        });
    }

    /// `POST /v1/vms`: creates the VM here, paused, then its record, then
    /// runs it (unless the node fenced itself meanwhile). A record that
    /// names another node, or marks a migration, refuses the name; one that
    /// names this node as restarting is the coordinator's restart, which
    /// this completes. When etcd cannot say whether the record was written,
    /// the VM stays held here and runs once it can.
    pub async fn create_vm_recorded(self: &Arc<Self>, spec: VmSpec) -> Result<VmView, NodeError> {
        let node = self.clone();
        let local = spec.clone();
        // Filling a large guest's memory takes a while: off the runtime's workers.
        tokio::task::spawn_blocking(move || node.build_vm(local))
            .await
            .map_err(|e| NodeError::Unavailable(format!("creating the VM failed: {e}")))??;
        // A new guest of that name: an image an earlier one left with is
        // not its own.
        self.retention.remove(&spec.name);
        let created = created(self.name(), &spec);
        match self.edit(&spec.name, &created).await {
            Ok(()) => {}
            Err(RecordError::Refused(why)) => {
                // Never ran: nothing of it is lost.
                self.unbuild(&spec.name);
                return Err(NodeError::Conflict(why));
            }
            Err(e) => {
                // Perhaps written: held until etcd says.
                let (node, name) = (self.clone(), spec.name.clone());
                self.tasks
                    .spawn(async move { node.finish_create(&name, created).await });
                return Err(NodeError::Unavailable(format!(
                    "VM {} waits, paused, for its record ({e}); it runs once etcd answers",
                    spec.name
                )));
            }
        }
        self.start_created(&spec.name);
        self.vm(&spec.name)
    }

    /// Runs a VM whose record is written (or marks it for a restart
    /// elsewhere if the node's lease lapsed meanwhile).
    fn start_created(&self, name: &str) {
        if !self.run_created(name) {
            self.restart_superseded(name);
        }
    }

    /// Retries a create's record edit until etcd says; then runs the VM, or
    /// drops it if the record names another node.
    async fn finish_create(&self, name: &str, created: impl Fn(Option<&VmRecord>) -> Edit) {
        let mut wait = Duration::from_millis(250);
        loop {
            match self.edit(name, &created).await {
                Ok(()) => return self.start_created(name),
                Err(RecordError::Refused(why)) => {
                    tracing::warn!(vm = %name, "not created: {why}");
                    return self.unbuild(name);
                }
                Err(e) => {
                    tracing::warn!(vm = %name, error = %e, "writing the new VM's record failed; trying again")
                }
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(5));
        }
    }

    /// Before migration `id` of `vm` to `target`: marks the record, so that
    /// a restart after this node's death first asks `target`. The record
    /// must name this node (or be handed to it).
    pub(super) async fn record_moving(
        &self,
        vm: &str,
        target: &str,
        id: &str,
    ) -> Result<(), RecordError> {
        let me = self.name().to_string();
        self.edit(vm, |r| match r {
            Some(r) if r.node == me && r.migration.as_deref() == Some(id) => Edit::Done,
            // Or handed here by the migration that brought the VM, whose
            // claim has not landed yet: claimed now.
            Some(r) if r.node == me || r.migrating_to.as_deref() == Some(me.as_str()) => {
                Edit::Put(Box::new(VmRecord {
                    node: me.clone(),
                    migrating_to: Some(target.to_string()),
                    migration: Some(id.to_string()),
                    state: RecordState::Running,
                    ..r.clone()
                }))
            }
            Some(r) => Edit::Refuse(format!(
                "the record of VM {vm} names node {}, not this one",
                r.node
            )),
            None => Edit::Refuse(format!("VM {vm} has no record in the cluster's store")),
        })
        .await
    }

    /// After migration `id` of `vm` to `target`: the record names the
    /// target when it runs there, and no move otherwise; written in the
    /// background until it is (the target's own claim may come first). Only
    /// a record marked for this very migration changes.
    pub(super) fn record_moved(&self, vm: &str, target: &str, id: &str, handed_over: bool) {
        let (me, target, id) = (self.name().to_string(), target.to_string(), id.to_string());
        self.edit_in_background(vm, "recording the migration's end", move |r| match r {
            Some(r) if r.node == me && r.migration.as_deref() == Some(id.as_str()) => {
                Edit::Put(Box::new(VmRecord {
                    node: if handed_over {
                        target.clone()
                    } else {
                        me.clone()
                    },
                    migrating_to: None,
                    migration: None,
                    ..r.clone()
                }))
            }
            // Claimed by the target, moved on since, or deleted.
            _ => Edit::Done,
        });
    }

    /// Before resuming the source's copy of unresolved migration `id`: the
    /// record must still name this node for that migration, and loses the
    /// mark; refused when the cluster has moved the VM on meanwhile.
    pub(super) async fn record_kept(&self, vm: &str, id: &str) -> Result<(), RecordError> {
        let me = self.name().to_string();
        self.edit(vm, |r| match r {
            Some(r) if r.node == me && r.migration.as_deref() == Some(id) => {
                Edit::Put(Box::new(VmRecord {
                    migrating_to: None,
                    migration: None,
                    ..r.clone()
                }))
            }
            Some(r) if r.node == me && r.migration.is_none() => Edit::Done,
            Some(r) => Edit::Refuse(format!(
                "the record of VM {vm} names node {} ({}): the cluster moved it on, so the paused copy here must not run",
                r.node,
                super::node::name_of(&r.state)
            )),
            None => Edit::Refuse(format!(
                "VM {vm} has no record in the cluster's store any more: the paused copy here must not run"
            )),
        })
        .await
    }

    /// Guest of migration `id` from `source` arrived here: the record names
    /// this node from now (the source writes the same when it learns of the
    /// hand-off); as restarting elsewhere if the copy here is `superseded`.
    pub(super) fn claim_arrived(&self, vm: &str, source: &str, id: &str, superseded: bool) {
        let (me, source, id) = (self.name().to_string(), source.to_string(), id.to_string());
        let mark = restarting_here(&me, &format!("node {me} lost its lease"));
        self.edit_in_background(vm, "claiming the arrived VM's record", move |r| {
            let here = match r {
                Some(r) if r.node == me => r.clone(),
                Some(r) if r.node == source && r.migration.as_deref() == Some(id.as_str()) => {
                    VmRecord {
                        node: me.clone(),
                        migrating_to: None,
                        migration: None,
                        ..r.clone()
                    }
                }
                Some(r) => {
                    return Edit::Refuse(format!(
                        "the record names node {} (moving to {:?}), not a hand-off from {source}",
                        r.node, r.migrating_to
                    ))
                }
                None => return Edit::Refuse("the VM has no record in the cluster's store".into()),
            };
            match (superseded, Some(&here) == r) {
                (true, _) if here.state == RecordState::Running => mark(Some(&here)),
                (_, true) => Edit::Done,
                _ => Edit::Put(Box::new(here)),
            }
        });
    }

    /// At start: records that name this node are of VMs that died with its
    /// agent's last process (a fresh agent hosts nothing). Each is marked
    /// `restarting` here, so the coordinator starts it again (on this node,
    /// after asking the target of a migration it was marked for).
    pub(super) async fn adopt_records(&self) -> Result<usize, EtcdError> {
        let Some(live) = self.liveness.get() else {
            return Err(EtcdError::Unavailable(
                "this agent has not registered in etcd yet".into(),
            ));
        };
        let (kvs, _) = live
            .etcd()
            .list(format!("{}vms/", live.prefix()).as_bytes())
            .await?;
        let mut adopted = 0;
        for kv in kvs {
            let Ok(r) = super::mirror::parse_json::<VmRecord>(&kv.value) else {
                continue;
            };
            // A paused copy read back from disk is held here again.
            let held = self.state.lock().unwrap().vms.contains_key(&r.spec.name);
            if r.node != self.name() || held || r.check(&r.spec.name.clone()).is_err() {
                continue;
            }
            let why = format!("the agent of node {} restarted", self.name());
            match self
                .edit(&r.spec.name, restarting_here(self.name(), &why))
                .await
            {
                Ok(()) => {
                    tracing::warn!(vm = %r.spec.name, "the VM died with this agent's last process: to be restarted");
                    adopted += 1;
                }
                Err(RecordError::Refused(_)) => {}
                Err(RecordError::Store(e)) => return Err(e),
            }
        }
        Ok(adopted)
    }

    /// VM `name` was discarded by a forced stop: its record goes now (see
    /// [`forgotten`]); `unresolved` is the id of the unresolved migration
    /// whose paused copy it was.
    pub(super) async fn forget_record(
        &self,
        name: &str,
        unresolved: Option<String>,
    ) -> Result<(), RecordError> {
        self.edit(name, forgotten(self.name(), unresolved)).await
    }

    /// VM `name` was deleted here: its record goes (see [`forgotten`]), so
    /// the name is free when `DELETE` answers. When the store does not
    /// answer within [`RECORD_WAIT`], the record goes in the background,
    /// and the answer says so. The edit runs as the node's task: an asker
    /// that goes away does not stop it.
    pub(super) async fn record_deleted(
        &self,
        name: &str,
        unresolved: Option<String>,
    ) -> Option<String> {
        let node = self.this.upgrade()?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let vm = name.to_string();
        self.tasks.spawn(async move {
            let edit = forgotten(node.name(), unresolved);
            let why = match tokio::time::timeout(RECORD_WAIT, node.edit(&vm, &edit)).await {
                Ok(Ok(())) => None,
                Ok(Err(RecordError::Refused(why))) => {
                    tracing::error!(%vm, "deleting the VM's record: refused: {why}");
                    None
                }
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some(format!(
                    "the cluster's store did not answer within {RECORD_WAIT:?}"
                )),
            };
            let later = why.is_some();
            let _ = tx.send(why);
            if later {
                node.edit_in_background(&vm, "deleting the VM's record", edit);
            }
        });
        let why = rx
            .await
            .unwrap_or_else(|_| Some("the agent is stopping".into()))?;
        Some(format!(
            "its record in the cluster's store is deleted in the background ({why}); until then the name stays taken"
        ))
    }

    /// VM `name` is superseded here (this node's lease expired): if its
    /// record still names this node as running it (or failed), it is marked
    /// restarting, so the coordinator starts it on another node (the copy
    /// here never runs again), after asking the target of a migration it is
    /// marked for.
    pub(super) fn restart_superseded(&self, name: &str) {
        let me = self.name().to_string();
        let mark = restarting_here(&me, &format!("node {me} lost its lease"));
        self.edit_in_background(
            name,
            "marking the superseded VM for a restart",
            move |r| match r {
                Some(r) if r.node == me => mark(Some(r)),
                _ => Edit::Done,
            },
        );
    }
}

/// The edit that writes a new VM's record, or completes a restart.
fn created(me: &str, spec: &VmSpec) -> impl Fn(Option<&VmRecord>) -> Edit + Send + Sync + 'static {
    let (me, spec) = (me.to_string(), spec.clone());
    move |r| match r {
        None => Edit::Put(Box::new(VmRecord::new(spec.clone(), &me))),
        Some(r) if r.node == me && r.state == RecordState::Restarting => {
            // The coordinator asked the migration's target first.
            Edit::Put(Box::new(VmRecord {
                state: RecordState::Running,
                migrating_to: None,
                migration: None,
                error: None,
                ..r.clone()
            }))
        }
        Some(r) if r.node == me && r.state == RecordState::Running && r.migration.is_none() => {
            Edit::Done
        }
        Some(r) => Edit::Refuse(format!(
            "VM {} is already on node {} ({}{})",
            spec.name,
            r.node,
            super::node::name_of(&r.state),
            r.migrating_to
                .as_ref()
                .map_or(String::new(), |t| format!(", moving to {t}"))
        )),
    }
}

/// The edit that marks a record naming `me` as restarting there, for `why`.
fn restarting_here(me: &str, why: &str) -> impl Fn(Option<&VmRecord>) -> Edit + Send + Sync {
    let (me, why) = (me.to_string(), why.to_string());
    move |r| match r {
        Some(r) if r.node == me && r.state != RecordState::Restarting => {
            Edit::Put(Box::new(VmRecord {
                state: RecordState::Restarting,
                // A failed record counted its loss already (`ha::failed`).
                restarts: r
                    .restarts
                    .saturating_add(u32::from(r.state == RecordState::Running)),
                last_restart: Some(Restart {
                    at_ms: now_ms(),
                    reason: why.clone(),
                    from: me.clone(),
                    to: me.clone(),
                }),
                error: None,
                ..r.clone()
            }))
        }
        Some(r) if r.node == me => Edit::Done,
        Some(r) => Edit::Refuse(format!("the record names node {}", r.node)),
        None => Edit::Done,
    }
}

/// The edit for a VM gone from node `me` for good: its record goes if it
/// names `me`, or is being handed to `me` by a migration whose claim has
/// not landed. If the VM was the paused copy of unresolved migration
/// `unresolved`, still marked in the record, the record is handed to that
/// migration's target instead, to be restarted there unless it runs there
/// already: the target may hold the last copy.
fn forgotten(
    me: &str,
    unresolved: Option<String>,
) -> impl Fn(Option<&VmRecord>) -> Edit + Send + Sync + 'static {
    let me = me.to_string();
    move |r| match r {
        Some(r) if r.node == me => match (&r.migrating_to, &r.migration) {
            (Some(t), Some(id)) if unresolved.as_ref() == Some(id) => {
                Edit::Put(Box::new(VmRecord {
                    node: t.clone(),
                    migrating_to: None,
                    migration: None,
                    state: RecordState::Restarting,
                    last_restart: Some(Restart {
                        at_ms: now_ms(),
                        reason: format!("node {me} discarded its copy during a hand-off"),
                        from: me.clone(),
                        to: t.clone(),
                    }),
                    ..r.clone()
                }))
            }
            _ => Edit::Delete,
        },
        Some(r) if r.migrating_to.as_deref() == Some(me.as_str()) => Edit::Delete,
        _ => Edit::Done,
    }
}
