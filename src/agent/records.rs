//! VM records in etcd, `{prefix}vms/{name}`: what each VM is (its spec,
//! priority and preferred owners), where it runs, where it is moving, and
//! how often it was restarted elsewhere. The node a record names writes it
//! (on create, migration, resolve and delete), each write a transaction on
//! the record's revision that first checks the record still names this
//! node; the coordinator rewrites it when it restarts the VM elsewhere.

use super::etcd::{Cmp, Etcd, EtcdError, Op, Txn};
use super::mirror::Versioned;
use super::node::{Node, NodeError, VmSpec, VmView};
use super::store::LAYOUT_VERSION;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// Which VMs a node's death restarts first; `off` ones never.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// Never restarted elsewhere.
    Off,
    /// Restarted after the others.
    Low,
    /// The default.
    #[default]
    Medium,
    /// Restarted first.
    High,
}

impl std::str::FromStr for Priority {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "high" => Ok(Self::High),
            "medium" => Ok(Self::Medium),
            "low" => Ok(Self::Low),
            "off" => Ok(Self::Off),
            _ => Err(format!("{s:?} is not high, medium, low or off")),
        }
    }
}

/// Where a VM's record says it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordState {
    /// It runs on the record's node.
    Running,
    /// The coordinator asked the record's node to start it again.
    Restarting,
    /// Its node died and no live node can take it: the error says why.
    Failed,
}

/// A restart elsewhere, as `GET /v1/vms/{name}` shows the last one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Restart {
    /// When the coordinator decided it, ms since the Unix epoch.
    pub at_ms: u64,
    /// Why.
    pub reason: String,
    /// The node it ran on.
    pub from: String,
    /// The node it was started on.
    pub to: String,
}

/// A VM's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmRecord {
    /// The layout's version.
    pub version: u32,
    /// What it is.
    pub spec: VmSpec,
    /// The node that runs it (or must start it).
    pub node: String,
    /// Set while a migration to that node may hand it over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migrating_to: Option<String>,
    /// Running, restarting, or failed.
    pub state: RecordState,
    /// Times it was restarted on another node.
    #[serde(default)]
    pub restarts: u32,
    /// The last restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_restart: Option<Restart>,
    /// Why it is failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Versioned for VmRecord {
    fn version(&self) -> u32 {
        self.version
    }
}

/// Longest node name or reason a record may hold.
const MAX_TEXT: usize = 4096;

impl VmRecord {
    /// A new record of `spec` running on `node`.
    pub fn new(spec: VmSpec, node: &str) -> Self {
        Self {
            version: LAYOUT_VERSION,
            spec,
            node: node.to_string(),
            migrating_to: None,
            state: RecordState::Running,
            restarts: 0,
            last_restart: None,
            error: None,
        }
    }

    /// Checks a record read from etcd under `name`, as API input is.
    pub fn check(&self, name: &str) -> Result<(), String> {
        if self.spec.name != name {
            return Err(format!("record of VM {:?} under {name:?}", self.spec.name));
        }
        self.spec.check()?;
        let texts = [
            Some(&self.node),
            self.migrating_to.as_ref(),
            self.error.as_ref(),
        ];
        if texts.iter().flatten().any(|t| t.len() > MAX_TEXT) {
            return Err("a field is longer than 4 KiB".into());
        }
        if let Some(r) = &self.last_restart {
            if r.reason.len() > MAX_TEXT || r.from.len() > MAX_TEXT || r.to.len() > MAX_TEXT {
                return Err("last_restart: a field is longer than 4 KiB".into());
            }
        }
        Ok(())
    }

    /// The JSON etcd holds.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("records serialize")
    }
}

/// The coordinator's key, `{prefix}coordinator`, bound to its lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoordinatorRecord {
    /// The layout's version.
    pub version: u32,
    /// The elected node.
    pub node: String,
    /// Its lease.
    pub lease: i64,
}

impl Versioned for CoordinatorRecord {
    fn version(&self) -> u32 {
        self.version
    }
}

/// The key of VM `name`'s record.
pub fn vm_key(prefix: &str, name: &str) -> Vec<u8> {
    format!("{prefix}vms/{name}").into_bytes()
}

fn unavailable(e: EtcdError) -> NodeError {
    NodeError::Unavailable(format!("the cluster's store: {e}"))
}

/// A record read from etcd now, with its revision.
pub async fn read(etcd: &Etcd, key: &[u8]) -> Result<Option<(VmRecord, i64)>, EtcdError> {
    let Some(kv) = etcd.get(key).await? else {
        return Ok(None);
    };
    let name =
        String::from_utf8_lossy(&key[key.iter().rposition(|b| *b == b'/').map_or(0, |i| i + 1)..])
            .into_owned();
    let r: VmRecord = super::mirror::parse_json(&kv.value).map_err(EtcdError::Invalid)?;
    r.check(&name).map_err(EtcdError::Invalid)?;
    Ok(Some((r, kv.mod_revision)))
}

impl Node {
    /// The store, with a cluster that has one: its client and key prefix.
    fn store(&self) -> Option<(&Etcd, &str)> {
        self.liveness.get().map(|l| (&**l.etcd(), l.prefix()))
    }

    /// `POST /v1/vms`: creates the VM here, then its record. A record that
    /// names another node refuses the name; one that names this node as
    /// restarting is the coordinator's restart, which this completes.
    pub async fn create_vm_recorded(self: &Arc<Self>, spec: VmSpec) -> Result<VmView, NodeError> {
        let node = self.clone();
        let local = spec.clone();
        // Filling a large guest's memory takes a while: off the runtime's workers.
        let view = tokio::task::spawn_blocking(move || node.create_vm(local))
            .await
            .map_err(|e| NodeError::Unavailable(format!("creating the VM failed: {e}")))??;
        let Some((etcd, prefix)) = self.store() else {
            return Ok(view);
        };
        let key = vm_key(prefix, &spec.name);
        let recorded = self.record_created(etcd, &key, spec).await;
        if let Err(e) = recorded {
            let _ = self.delete_vm(&view.spec.name, true);
            return Err(e);
        }
        Ok(self.vm(&view.spec.name).unwrap_or(view))
    }

    async fn record_created(&self, etcd: &Etcd, key: &[u8], spec: VmSpec) -> Result<(), NodeError> {
        for _ in 0..3 {
            let txn = match read(etcd, key).await.map_err(unavailable)? {
                None => Txn::new().when(Cmp::absent(key)).then(Op::put(
                    key,
                    &VmRecord::new(spec.clone(), self.name()).to_json(),
                    None,
                )),
                Some((r, rev)) if r.node == self.name() && r.state == RecordState::Restarting => {
                    let started = VmRecord {
                        state: RecordState::Running,
                        error: None,
                        ..r
                    };
                    Txn::new().when(Cmp::modified_at(key, rev)).then(Op::put(
                        key,
                        &started.to_json(),
                        None,
                    ))
                }
                Some((r, _)) => {
                    return Err(NodeError::Conflict(format!(
                        "VM {} is already on node {} ({})",
                        spec.name,
                        r.node,
                        super::node::name_of(&r.state)
                    )))
                }
            };
            if etcd.txn(&txn).await.map_err(unavailable)?.succeeded {
                return Ok(());
            }
        }
        Err(NodeError::Unavailable(format!(
            "the record of VM {} kept changing",
            spec.name
        )))
    }

    /// Changes VM `name`'s record with `change` if it names this node;
    /// retries on a concurrent write. `Ok(false)` when it names another node
    /// or is gone.
    async fn rewrite(
        &self,
        name: &str,
        change: impl Fn(VmRecord) -> Option<VmRecord>,
    ) -> Result<bool, EtcdError> {
        let Some((etcd, prefix)) = self.store() else {
            return Ok(true);
        };
        let key = vm_key(prefix, name);
        for _ in 0..5 {
            let Some((r, rev)) = read(etcd, &key).await? else {
                return Ok(false);
            };
            if r.node != self.name() {
                return Ok(false);
            }
            let op = match change(r) {
                Some(r) => Op::put(&key, &r.to_json(), None),
                None => Op::delete(&key),
            };
            let txn = Txn::new().when(Cmp::modified_at(&key, rev)).then(op);
            if etcd.txn(&txn).await?.succeeded {
                return Ok(true);
            }
        }
        Err(EtcdError::Unavailable(format!(
            "the record of VM {name} kept changing"
        )))
    }

    /// Before a migration of `vm` to `target`: marks the record, so that a
    /// restart after this node's death first asks `target`.
    pub(super) async fn record_moving(&self, vm: &str, target: &str) -> Result<(), EtcdError> {
        self.rewrite(vm, |r| {
            Some(VmRecord {
                migrating_to: Some(target.to_string()),
                ..r
            })
        })
        .await
        .map(|_| ())
    }

    /// After a migration of `vm` to `target`: the record names the target
    /// when it runs there, and no move otherwise. Retried in the background
    /// until it is written (a record left marked is settled by asking the
    /// target).
    pub(super) fn record_moved(self: &Arc<Self>, vm: &str, target: &str, handed_over: bool) {
        let (node, vm, target) = (self.clone(), vm.to_string(), target.to_string());
        tokio::spawn(async move {
            for _ in 0..120 {
                let written = node
                    .rewrite(&vm, |r| {
                        Some(VmRecord {
                            node: if handed_over {
                                target.clone()
                            } else {
                                r.node.clone()
                            },
                            migrating_to: None,
                            ..r
                        })
                    })
                    .await;
                match written {
                    Ok(_) => return,
                    Err(e) => {
                        tracing::warn!(%vm, error = %e, "recording the migration's end in etcd failed; trying again")
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            tracing::error!(%vm, %target, "could not record the migration's end in etcd");
        });
    }

    /// At start: records that name this node are of VMs that died with its
    /// agent's last process (a fresh agent hosts nothing). Each is marked
    /// `restarting` here, so the coordinator starts it again (on this node,
    /// after asking the target of a migration it was marked for).
    pub(super) async fn adopt_records(&self) -> Result<usize, EtcdError> {
        let Some((etcd, prefix)) = self.store() else {
            return Ok(0);
        };
        let (kvs, _) = etcd.list(format!("{prefix}vms/").as_bytes()).await?;
        let mut adopted = 0;
        for kv in kvs {
            let Ok(r) = super::mirror::parse_json::<VmRecord>(&kv.value) else {
                continue;
            };
            if r.node != self.name() || r.check(&r.spec.name.clone()).is_err() {
                continue;
            }
            let name = r.spec.name.clone();
            let reason = format!("the agent of node {} restarted", self.name());
            let done = self
                .rewrite(&name, |r| {
                    Some(VmRecord {
                        state: RecordState::Restarting,
                        restarts: r.restarts.saturating_add(1),
                        last_restart: Some(Restart {
                            at_ms: super::node::now_ms(),
                            reason: reason.clone(),
                            from: r.node.clone(),
                            to: r.node.clone(),
                        }),
                        error: None,
                        ..r
                    })
                })
                .await?;
            if done {
                tracing::warn!(vm = %name, "the VM died with this agent's last process: to be restarted");
                adopted += 1;
            }
        }
        Ok(adopted)
    }

    /// Deletes VM `name`'s record if it names this node (a VM discarded on
    /// purpose).
    pub(super) async fn forget_record(&self, name: &str) -> Result<bool, EtcdError> {
        self.rewrite(name, |_| None).await
    }

    /// After VM `name` was deleted here: its record goes, if it names this
    /// node (a superseded copy's record names the node that runs it now).
    pub(super) fn record_deleted(self: &Arc<Self>, name: &str) {
        let (node, vm) = (self.clone(), name.to_string());
        tokio::spawn(async move {
            for _ in 0..120 {
                match node.rewrite(&vm, |_| None).await {
                    Ok(_) => return,
                    Err(e) => {
                        tracing::warn!(%vm, error = %e, "deleting the VM's record in etcd failed; trying again")
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            tracing::error!(%vm, "could not delete the VM's record in etcd");
        });
    }
}
