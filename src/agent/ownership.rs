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

impl From<RecordError> for NodeError {
    fn from(e: RecordError) -> Self {
        match e {
            RecordError::Refused(why) => NodeError::Conflict(why),
            RecordError::Store(e) => NodeError::Unavailable(format!("the cluster's store: {e}")),
        }
    }
}

/// Tries of one edit before it fails.
const TRIES: u32 = 8;

impl Node {
    /// Applies `edit` to VM `name`'s record until what it asks is written
    /// or it asks nothing more. Without a store there is nothing to edit.
    pub(super) async fn edit(
        &self,
        name: &str,
        edit: impl Fn(Option<&VmRecord>) -> Edit,
    ) -> Result<(), RecordError> {
        let Some(live) = self.liveness.get() else {
            return Ok(());
        };
        let (etcd, key) = (live.etcd(), vm_key(live.prefix(), name));
        let mut last = None;
        for attempt in 0..TRIES {
            if attempt > 0 && last.is_some() {
                tokio::time::sleep(Duration::from_millis(100 << attempt.min(4))).await;
            }
            let now = match read(etcd, &key).await {
                Ok(now) => now,
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
        let Some(node) = self
            .this
            .upgrade()
            .filter(|_| self.liveness.get().is_some())
        else {
            return;
        };
        let vm = name.to_string();
        tokio::spawn(async move {
            let mut wait = Duration::from_millis(250);
            loop {
                match node.edit(&vm, &edit).await {
                    Ok(()) => return,
                    Err(RecordError::Refused(why)) => {
                        tracing::error!(%vm, "{what}: refused: {why}");
                        return;
                    }
                    Err(e) => tracing::warn!(%vm, error = %e, "{what} failed; trying again"),
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        });
    }

    /// `POST /v1/vms`: creates the VM here, paused, then its record, then
    /// runs it (unless the node fenced itself meanwhile). A record that
    /// names another node refuses the name; one that names this node as
    /// restarting is the coordinator's restart, which this completes.
    pub async fn create_vm_recorded(self: &Arc<Self>, spec: VmSpec) -> Result<VmView, NodeError> {
        let node = self.clone();
        let local = spec.clone();
        // Filling a large guest's memory takes a while: off the runtime's workers.
        tokio::task::spawn_blocking(move || node.build_vm(local))
            .await
            .map_err(|e| NodeError::Unavailable(format!("creating the VM failed: {e}")))??;
        let me = self.name().to_string();
        let recorded = self
            .edit(&spec.name, |r| match r {
                None => Edit::Put(Box::new(VmRecord::new(spec.clone(), &me))),
                Some(r) if r.node == me && r.state == RecordState::Restarting => {
                    Edit::Put(Box::new(VmRecord {
                        state: RecordState::Running,
                        error: None,
                        ..r.clone()
                    }))
                }
                Some(r) if r.node == me && r.state == RecordState::Running => Edit::Done,
                Some(r) => Edit::Refuse(format!(
                    "VM {} is already on node {} ({})",
                    spec.name,
                    r.node,
                    super::node::name_of(&r.state)
                )),
            })
            .await;
        if let Err(e) = recorded {
            // Never ran: nothing of it is lost.
            self.unbuild(&spec.name);
            return Err(e.into());
        }
        if !self.run_created(&spec.name) {
            // Its lease lapsed meanwhile: started again by the coordinator.
            self.restart_superseded(&spec.name);
        }
        self.vm(&spec.name)
    }

    /// Before a migration of `vm` to `target`: marks the record, so that a
    /// restart after this node's death first asks `target`. The record must
    /// name this node, or be handed to it by the migration that brought the
    /// VM here (then this claims it).
    pub(super) async fn record_moving(&self, vm: &str, target: &str) -> Result<(), RecordError> {
        let me = self.name().to_string();
        self.edit(vm, |r| match r {
            Some(r) if r.node == me && r.migrating_to.as_deref() == Some(target) => Edit::Done,
            Some(r) if r.node == me || r.migrating_to.as_deref() == Some(me.as_str()) => {
                Edit::Put(Box::new(VmRecord {
                    node: me.clone(),
                    migrating_to: Some(target.to_string()),
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

    /// After a migration of `vm` to `target`: the record names the target
    /// when it runs there, and no move otherwise; written in the background
    /// until it is (the target's own claim may come first).
    pub(super) fn record_moved(&self, vm: &str, target: &str, handed_over: bool) {
        let (me, target) = (self.name().to_string(), target.to_string());
        self.edit_in_background(vm, "recording the migration's end", move |r| match r {
            Some(r) if r.node == me && r.migrating_to.as_deref() == Some(target.as_str()) => {
                Edit::Put(Box::new(VmRecord {
                    node: if handed_over {
                        target.clone()
                    } else {
                        me.clone()
                    },
                    migrating_to: None,
                    ..r.clone()
                }))
            }
            // Claimed by the target, moved on since, or deleted.
            _ => Edit::Done,
        });
    }

    /// A guest of `source` arrived here: the record names this node from
    /// now (the source writes the same when it learns of the hand-off).
    pub(super) fn claim_arrived(&self, vm: &str, source: &str) {
        let (me, source) = (self.name().to_string(), source.to_string());
        self.edit_in_background(vm, "claiming the arrived VM's record", move |r| match r {
            Some(r) if r.node == me => Edit::Done,
            Some(r) if r.node == source && r.migrating_to.as_deref() == Some(me.as_str()) => {
                Edit::Put(Box::new(VmRecord {
                    node: me.clone(),
                    migrating_to: None,
                    state: RecordState::Running,
                    ..r.clone()
                }))
            }
            Some(r) => Edit::Refuse(format!(
                "the record names node {} (moving to {:?}), not a hand-off from {source}",
                r.node, r.migrating_to
            )),
            None => Edit::Refuse("the VM has no record in the cluster's store".into()),
        });
    }

    /// At start: records that name this node are of VMs that died with its
    /// agent's last process (a fresh agent hosts nothing). Each is marked
    /// `restarting` here, so the coordinator starts it again (on this node,
    /// after asking the target of a migration it was marked for).
    pub(super) async fn adopt_records(&self) -> Result<usize, EtcdError> {
        let Some(live) = self.liveness.get() else {
            return Ok(0);
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
            if r.node != self.name() || r.check(&r.spec.name.clone()).is_err() {
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
    /// [`forgotten`]).
    pub(super) async fn forget_record(&self, name: &str) -> Result<(), RecordError> {
        self.edit(name, forgotten(self.name())).await
    }

    /// VM `name` was deleted here: its record goes, in the background (see
    /// [`forgotten`]).
    pub(super) fn record_deleted(&self, name: &str) {
        self.edit_in_background(name, "deleting the VM's record", forgotten(self.name()));
    }

    /// VM `name` is superseded here (this node's lease expired): if its
    /// record still names this node as running it (or hands it here), it is
    /// marked restarting, so the coordinator starts it on another node (the
    /// copy here never runs again).
    pub(super) fn restart_superseded(&self, name: &str) {
        let me = self.name().to_string();
        let mark = restarting_here(&me, &format!("node {me} lost its lease"));
        self.edit_in_background(
            name,
            "marking the superseded VM for a restart",
            move |r| match r {
                Some(r)
                    if r.state == RecordState::Running
                        && (r.node == me || r.migrating_to.as_deref() == Some(me.as_str())) =>
                {
                    let here = VmRecord {
                        node: me.clone(),
                        migrating_to: None,
                        ..r.clone()
                    };
                    mark(Some(&here))
                }
                _ => Edit::Done,
            },
        );
    }
}

/// The edit that marks a record naming `me` as restarting there, for `why`.
fn restarting_here(me: &str, why: &str) -> impl Fn(Option<&VmRecord>) -> Edit + Send + Sync {
    let (me, why) = (me.to_string(), why.to_string());
    move |r| match r {
        Some(r) if r.node == me && r.state != RecordState::Restarting => {
            Edit::Put(Box::new(VmRecord {
                state: RecordState::Restarting,
                restarts: r.restarts.saturating_add(1),
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
/// names `me`. One marked for a migration is handed to the target instead,
/// to be restarted there unless it runs there already: the target may hold
/// the last copy.
fn forgotten(me: &str) -> impl Fn(Option<&VmRecord>) -> Edit + Send + Sync {
    let me = me.to_string();
    move |r| match r {
        Some(r) if r.node == me => match &r.migrating_to {
            Some(t) => Edit::Put(Box::new(VmRecord {
                node: t.clone(),
                migrating_to: None,
                state: RecordState::Restarting,
                last_restart: Some(Restart {
                    at_ms: now_ms(),
                    reason: format!("node {me} discarded its copy during a hand-off"),
                    from: me.clone(),
                    to: t.clone(),
                }),
                ..r.clone()
            })),
            None => Edit::Delete,
        },
        _ => Edit::Done,
    }
}
