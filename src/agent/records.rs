//! VM records in etcd, `{prefix}vms/{name}`: what each VM is (its spec,
//! priority and preferred owners), where it runs, where it is moving, and
//! how often it was restarted elsewhere. [`super::ownership`] says who
//! writes them when.

use super::etcd::{Etcd, EtcdError};
use super::mirror::Versioned;
use super::node::VmSpec;
use super::store::LAYOUT_VERSION;
use serde::{Deserialize, Serialize};

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
    /// That migration's id: only its own end changes the mark.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<String>,
    /// Running, restarting, or failed.
    pub state: RecordState,
    /// Times it lost its node (a death, a lapsed lease, an agent's restart)
    /// and had to start again, each loss counted once however many tries
    /// the start took (one that found no room yet counts too).
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
            migration: None,
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
            self.migration.as_ref(),
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

/// A record read from etcd now, with its revision.
pub async fn read(etcd: &Etcd, key: &[u8]) -> Result<Option<(VmRecord, i64)>, EtcdError> {
    let Some(kv) = etcd.get(key).await? else {
        return Ok(None);
    };
    let name =
        String::from_utf8_lossy(&key[key.iter().rposition(|b| *b == b'/').map_or(0, |i| i + 1)..])
            .into_owned();
    let r = super::mirror::decode_vm(&kv.value, &name).map_err(EtcdError::Invalid)?;
    Ok(Some((r, kv.mod_revision)))
}
