//! What outlives an agent's process: its migration records, operation
//! journals and administrative state in etcd ([`super::journal`]), and the
//! paused last copies of VMs on its disk ([`super::kept`]). Written as they
//! change; read back when the agent starts, so `migrate`, `drain`,
//! `resume --failback` and `resolve` work after a restart as before it.

use super::etcd::EtcdError;
use super::journal::Folder;
use super::kept::{self, KeptVm};
use super::mirror::{parse_json, Versioned};
use super::node::{
    now_ms, valid_name, Direction, MigrationEntry, MigrationState, MigrationView, Node, NodeMode,
    Vm, VmState,
};
use super::ops::{OpState, Operation, OperationView};
use super::store::LAYOUT_VERSION;
use crate::migration::MigratableGuest;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// `{prefix}migrations/{node}/{id}`: a migration once it ended (and again
/// when resolved, or when its paused guest is saved).
#[derive(Serialize, Deserialize)]
pub struct MigrationRecord {
    /// The layout's version.
    pub version: u32,
    /// The migration as the API shows it.
    #[serde(flatten)]
    pub view: MigrationView,
}

/// `{prefix}operations/{node}/{id}`: an operation, written as each step
/// changes.
#[derive(Serialize, Deserialize)]
pub struct OperationRecord {
    /// The layout's version.
    pub version: u32,
    /// The operation as the API shows it.
    #[serde(flatten)]
    pub op: OperationView,
}

/// `{prefix}admin/{node}`: whether an operator left the node taking VMs.
#[derive(Serialize, Deserialize)]
pub struct AdminRecord {
    /// The layout's version.
    pub version: u32,
    /// `active`, `draining` or `paused`.
    pub state: NodeMode,
}

impl Versioned for MigrationRecord {
    fn version(&self) -> u32 {
        self.version
    }
}
impl Versioned for OperationRecord {
    fn version(&self) -> u32 {
        self.version
    }
}
impl Versioned for AdminRecord {
    fn version(&self) -> u32 {
        self.version
    }
}

/// How long a copy that could not be saved waits before the next try.
const SAVE_RETRY: Duration = Duration::from_secs(60);

/// The longest error or state text a record may hold.
const MAX_TEXT: usize = 1 << 20;
/// The most steps an operation record may hold.
const MAX_STEPS: usize = 100_000;

fn text(field: &str, v: &Option<String>) -> Result<(), String> {
    match v {
        Some(t) if t.len() > MAX_TEXT => Err(format!("{field} is over {MAX_TEXT} bytes")),
        _ => Ok(()),
    }
}

/// Checks a migration record read from etcd as API input is checked.
pub fn check_migration(v: &MigrationView, node: &str) -> Result<(), String> {
    for (field, name) in [
        ("id", &v.id),
        ("vm", &v.vm),
        ("source", &v.source),
        ("target", &v.target),
    ] {
        if !valid_name(name) {
            return Err(format!("{field} {name:?} is not a valid name"));
        }
    }
    let here = match v.direction {
        Direction::Outgoing => &v.source,
        Direction::Incoming => &v.target,
    };
    if here != node {
        return Err(format!("a {:?} migration of node {here}", v.direction));
    }
    if !v.state.is_final() {
        return Err(format!("state {:?} is not an end", v.state));
    }
    text("error", &v.error)?;
    text("operation", &v.operation)
}

/// Migration record `id` of node `node` as read from etcd, checked.
pub fn decode_migration(bytes: &[u8], id: &str, node: &str) -> Result<MigrationView, String> {
    let r = parse_json::<MigrationRecord>(bytes)?;
    check_migration(&r.view, node)?;
    (r.view.id == id)
        .then_some(r.view)
        .ok_or_else(|| "id differs".into())
}

/// Operation record `id` of node `node` as read from etcd, checked.
pub fn decode_operation(bytes: &[u8], id: &str, node: &str) -> Result<OperationView, String> {
    let r = parse_json::<OperationRecord>(bytes)?;
    check_operation(&r.op, node)?;
    (r.op.id == id)
        .then_some(r.op)
        .ok_or_else(|| "id differs".into())
}

/// A node's administrative record as read from etcd.
pub fn decode_admin(bytes: &[u8]) -> Result<AdminRecord, String> {
    parse_json::<AdminRecord>(bytes)
}

/// Checks an operation record read from etcd as API input is checked.
pub fn check_operation(v: &OperationView, node: &str) -> Result<(), String> {
    if !valid_name(&v.id) {
        return Err(format!("id {:?} is not a valid name", v.id));
    }
    if v.node != node {
        return Err(format!("an operation of node {}", v.node));
    }
    if v.steps.len() > MAX_STEPS {
        return Err(format!("over {MAX_STEPS} steps"));
    }
    for s in &v.steps {
        if !valid_name(&s.vm) || s.state.len() > 32 {
            return Err(format!("a step of VM {:?} is invalid", s.vm));
        }
        if s.tried.len() >= super::retarget::DRAIN_TRIES {
            return Err(format!(
                "step of VM {}: {} targets tried",
                s.vm,
                s.tried.len()
            ));
        }
        for n in [&s.source, &s.target].into_iter().chain(&s.tried) {
            if !n.is_empty() && !valid_name(n) {
                return Err(format!(
                    "step of VM {}: node {n:?} is not a valid name",
                    s.vm
                ));
            }
        }
        text("step error", &s.error)?;
    }
    text("error", &v.error)
}

impl Node {
    /// Writes migration `id`'s record, once it has ended.
    pub(super) fn journal_migration(&self, id: &str) {
        let Some(j) = self.journal.get() else { return };
        let Ok(mut view) = self.migration(id) else {
            return;
        };
        if !view.state.is_final() {
            return;
        }
        view.progress = None;
        // An unresolved hand-off's record stays until it is settled.
        let pinned = view.state == MigrationState::Unresolved;
        let record = MigrationRecord {
            version: LAYOUT_VERSION,
            view,
        };
        let json = serde_json::to_vec(&record).expect("records serialize");
        j.record(Folder::Migrations, id, json, pinned);
    }

    /// Writes operation `v`'s journal.
    pub(super) fn journal_op(&self, v: &OperationView) {
        let Some(j) = self.journal.get() else { return };
        let record = OperationRecord {
            version: LAYOUT_VERSION,
            op: v.clone(),
        };
        let json = serde_json::to_vec(&record).expect("records serialize");
        j.record(Folder::Operations, &v.id, json, v.state == OpState::Running);
    }

    /// Writes the node's administrative state.
    pub(super) fn journal_admin(&self, state: NodeMode) {
        let Some(j) = self.journal.get() else { return };
        let record = AdminRecord {
            version: LAYOUT_VERSION,
            state,
        };
        j.put(
            j.admin_key(),
            serde_json::to_vec(&record).expect("records serialize"),
        );
    }

    /// Adds where an unresolved migration's paused guest is saved.
    pub(super) fn with_saved(&self, v: &mut MigrationView) {
        if v.state != MigrationState::Unresolved || v.direction != Direction::Outgoing {
            return;
        }
        let kept = self.kept.lock().unwrap();
        if kept
            .get(&v.vm)
            .is_some_and(|k| k.migration.as_deref() == Some(&v.id))
        {
            let dir = kept::folder(&self.spec.state_dir);
            v.saved_guest = Some(kept::guest_path(&dir, &v.vm).display().to_string());
        }
    }

    /// At start: reads back the node's records from etcd and its kept copies
    /// from disk.
    pub(super) async fn restore(&self) -> Result<(), EtcdError> {
        let (history, ops, mode) = self.read_records().await?;
        let restored = {
            let dir = kept::folder(&self.spec.state_dir);
            tokio::task::spawn_blocking(move || kept::load_all(&dir))
                .await
                .unwrap_or_default()
        };
        *self.ops.lock().unwrap() = ops;
        let mut st = self.state.lock().unwrap();
        st.history = history;
        st.mode = mode;
        let mut kept = self.kept.lock().unwrap();
        for r in restored {
            let name = r.meta.spec.name.clone();
            if let Some(mid) = &r.meta.migration {
                let found = st.history.iter().position(|h| &h.id == mid);
                let view = match found {
                    Some(i) if st.history[i].state == MigrationState::Unresolved => {
                        st.history.remove(i)
                    }
                    Some(i) => {
                        tracing::error!(vm = %name, migration = %mid, state = ?st.history[i].state, file = %r.path.display(), "a kept copy of a settled migration: it stays on disk, not loaded");
                        continue;
                    }
                    None => self.unrecorded(&r.meta, mid),
                };
                st.migrations.push(MigrationEntry::restored(&view));
            }
            tracing::warn!(vm = %name, state = ?r.meta.state, file = %r.path.display(), "holding a kept copy again");
            st.vms.insert(
                name.clone(),
                Vm::kept(r.meta.spec.clone(), r.meta.state, r.guest),
            );
            kept.insert(name, r.meta);
        }
        Ok(())
    }

    /// An unresolved migration whose copy is on disk but whose record is
    /// not in etcd (written in the moment the agent stopped).
    fn unrecorded(&self, meta: &KeptVm, id: &str) -> MigrationView {
        MigrationView {
            id: id.to_string(),
            vm: meta.spec.name.clone(),
            source: self.spec.name.clone(),
            target: meta.target.clone().unwrap_or_default(),
            direction: Direction::Outgoing,
            state: MigrationState::Unresolved,
            phase: None,
            created_at_ms: now_ms(),
            started_at_ms: None,
            finished_at_ms: None,
            queued_s: None,
            operation: None,
            error: Some("read back from this node's disk: its record in etcd is gone".into()),
            progress: None,
            report: None,
            resolution: None,
            saved_guest: None,
        }
    }

    /// The migrations, operations and administrative state in etcd.
    async fn read_records(
        &self,
    ) -> Result<(Vec<MigrationView>, Vec<Operation>, Option<NodeMode>), EtcdError> {
        let Some(j) = self.journal.get() else {
            return Ok(Default::default());
        };
        let name = self.name();
        let mut history = Vec::new();
        let unresolved = |id: &str, bytes: &[u8]| {
            decode_migration(bytes, id, name).is_ok_and(|v| v.state == MigrationState::Unresolved)
        };
        for (id, bytes) in j.load(Folder::Migrations, unresolved).await? {
            match decode_migration(&bytes, &id, name) {
                Ok(v) => history.push(v),
                Err(e) => tracing::warn!(%id, error = %e, "ignoring a bad migration record"),
            }
        }
        let mut ops = Vec::new();
        let running = |id: &str, bytes: &[u8]| {
            decode_operation(bytes, id, name).is_ok_and(|v| v.state == OpState::Running)
        };
        for (id, bytes) in j.load(Folder::Operations, running).await? {
            let mut op = match decode_operation(&bytes, &id, name) {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(%id, error = %e, "ignoring a bad operation record");
                    continue;
                }
            };
            if op.state == OpState::Running {
                op.state = OpState::Failed;
                op.interrupted = true;
                op.interruption = Some(super::ops::Interruption::Crash);
                op.error = Some(format!(
                    "interrupted: the agent of node {name} ended without a clean stop while it ran"
                ));
                op.finished_at_ms = Some(now_ms());
                self.journal_op(&op);
            }
            ops.push(Operation {
                view: op,
                cancel: CancellationToken::new(),
                command_started: false,
            });
        }
        let mode = match j.load_admin().await? {
            None => None,
            Some(bytes) => match decode_admin(&bytes) {
                // A drain its agent did not see to the end leaves the node
                // paused, as one that ended would.
                Ok(r) if r.state == NodeMode::Draining => Some(NodeMode::Paused),
                Ok(r) => Some(r.state),
                Err(e) => {
                    tracing::warn!(error = %e, "ignoring a bad administrative state");
                    None
                }
            },
        };
        Ok((history, ops, mode))
    }

    /// At start, after the records: each superseded copy read back from
    /// disk has its record marked for a restart away from this node, as
    /// the node's rejoin after a lapsed lease does.
    pub(super) fn restart_kept_superseded(&self) {
        let superseded: Vec<String> = self
            .state
            .lock()
            .unwrap()
            .vms
            .iter()
            .filter(|(_, v)| v.superseded)
            .map(|(n, _)| n.clone())
            .collect();
        for name in superseded {
            self.restart_superseded(&name);
        }
    }

    /// Whether VM `name`, as it is now, is saved on disk: a stopping agent
    /// leaves it there instead of waiting for it.
    pub(super) fn is_kept(&self, name: &str) -> bool {
        let Some(want) = self.kept_form(name) else {
            return false;
        };
        self.kept.lock().unwrap().get(name) == Some(&want.0)
    }

    /// What VM `name` is saved as while it is a paused last copy.
    fn kept_form(&self, name: &str) -> Option<(KeptVm, Arc<dyn MigratableGuest>)> {
        let st = self.state.lock().unwrap();
        let vm = st.vms.get(name)?;
        if !matches!(vm.state, VmState::Paused | VmState::Superseded) || vm.arriving() {
            return None;
        }
        let guest = vm.guest.clone()?;
        let migration = st
            .migrations
            .iter()
            .rev()
            .find(|m| {
                m.vm() == name
                    && m.direction == Direction::Outgoing
                    && m.state == MigrationState::Unresolved
            })
            .map(|m| (m.id.clone(), m.target().to_string()));
        Some((KeptVm::new(vm.spec.clone(), vm.state, migration), guest))
    }

    /// Removes VM `vm`'s saved copy from disk at once, if it is one no
    /// longer kept (the keeper would remove it at its next look).
    pub(super) async fn forget_kept(&self, vm: &str) {
        if self.kept_form(vm).is_some() || !self.kept.lock().unwrap().contains_key(vm) {
            return;
        }
        let dir = kept::folder(&self.spec.state_dir);
        let n = vm.to_string();
        match tokio::task::spawn_blocking(move || kept::remove(&dir, &n)).await {
            Ok(Ok(())) => {
                self.kept.lock().unwrap().remove(vm);
            }
            Ok(Err(e)) => tracing::warn!(%vm, error = %e, "cannot remove a copy no longer kept"),
            Err(_) => {}
        }
    }

    /// Keeps the disk in step with the node's paused last copies until
    /// `stop`: saves each as it becomes one, removes it once it is not.
    pub(super) async fn keep_copies(self: Arc<Self>, stop: CancellationToken) {
        // A copy that could not be saved (a full disk) waits before the
        // next try, as it is written whole each time.
        let mut failed: BTreeMap<String, std::time::Instant> = BTreeMap::new();
        loop {
            let changed = self.changed.notified();
            self.keep_once(&mut failed).await;
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = changed => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    async fn keep_once(self: &Arc<Self>, failed: &mut BTreeMap<String, std::time::Instant>) {
        let names: Vec<String> = self.state.lock().unwrap().vms.keys().cloned().collect();
        let dir = kept::folder(&self.spec.state_dir);
        let mut saved_any = false;
        for name in &names {
            let Some((meta, guest)) = self.kept_form(name) else {
                continue;
            };
            if self.kept.lock().unwrap().get(name) == Some(&meta) {
                continue;
            }
            if failed.get(name).is_some_and(|t| t.elapsed() < SAVE_RETRY) {
                continue;
            }
            let (d, m) = (dir.clone(), meta.clone());
            let saved = tokio::task::spawn_blocking(move || kept::save(&d, &m, &*guest)).await;
            match saved {
                Ok(Ok(path)) => {
                    failed.remove(name);
                    tracing::info!(vm = %name, file = %path.display(), state = ?meta.state, "paused copy saved");
                    let migration = meta.migration.clone();
                    self.kept.lock().unwrap().insert(name.clone(), meta);
                    if let Some(id) = migration {
                        self.journal_migration(&id);
                    }
                    saved_any = true;
                }
                Ok(Err(e)) => {
                    // Retained images are a cache and a last copy comes
                    // first: they go, and the save is tried again at once.
                    let dropped = self.retention.drop_all();
                    if dropped > 0 {
                        tracing::warn!(vm = %name, error = %e, dropped, "cannot save the paused copy: dropping the retained images to make room");
                        continue;
                    }
                    failed.insert(name.clone(), std::time::Instant::now());
                    tracing::error!(vm = %name, dir = %dir.display(), error = %e, retry_in = ?SAVE_RETRY, "cannot save the paused copy: it is held in memory only")
                }
                Err(e) => {
                    failed.insert(name.clone(), std::time::Instant::now());
                    tracing::error!(vm = %name, error = %e, "saving the paused copy failed")
                }
            }
        }
        let on_disk: Vec<String> = self.kept.lock().unwrap().keys().cloned().collect();
        let gone = on_disk.into_iter().filter(|k| self.kept_form(k).is_none());
        for name in gone {
            let d = dir.clone();
            let n = name.clone();
            match tokio::task::spawn_blocking(move || kept::remove(&d, &n)).await {
                Ok(Ok(())) => {
                    self.kept.lock().unwrap().remove(&name);
                }
                Ok(Err(e)) => {
                    tracing::warn!(vm = %name, error = %e, "cannot remove a copy no longer kept")
                }
                Err(_) => {}
            }
        }
        if saved_any {
            self.changed.notify_waiters();
        }
    }
}
