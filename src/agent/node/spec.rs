//! What a VM is made of (`POST /v1/vms`'s body and its checks) and how
//! the API shows one.

use super::*;

/// What a VM is made of: the body of `POST /v1/vms`, checked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmSpec {
    /// Unique on the cluster.
    pub name: String,
    /// Guest memory, bytes.
    pub memory: u64,
    /// Where its writes land.
    #[serde(serialize_with = "as_display", deserialize_with = "from_text")]
    pub workload: WorkloadPattern,
    /// Bytes it writes per second.
    pub dirty_rate: u64,
    /// Its initial content mix.
    #[serde(serialize_with = "as_display", deserialize_with = "from_text")]
    pub fill: FillSpec,
    /// The backend: `sim` or `kvm`.
    pub guest: GuestKind,
    /// Which VMs a node's death restarts first (`off`: never).
    #[serde(default)]
    pub priority: Priority,
    /// The nodes a restart elsewhere tries first, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub preferred_owners: Vec<String>,
    /// A raw RAM image every node can read (as shared storage): its memory
    /// at creation and at every restart elsewhere, instead of `fill`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The seed of its content and workload.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Which VM of this name it is: drawn when the API creates it and kept
    /// through its migrations and restarts, so an image a node kept of an
    /// earlier VM of the same name is never its base (0: unknown, never a
    /// base).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub incarnation: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// A fresh incarnation: random, never 0.
pub fn new_incarnation() -> u64 {
    u64::from_le_bytes(crate::migration::auth::random_bytes::<8>()).max(1)
}

pub(super) fn default_seed() -> u64 {
    1
}

/// Most preferred owners a VM may name.
pub const MAX_PREFERRED_OWNERS: usize = 64;

impl VmSpec {
    /// Checks what the API checks of a new VM (a record read from etcd is
    /// checked the same way).
    pub fn check(&self) -> Result<(), String> {
        if !valid_name(&self.name) {
            return Err(format!(
                "name {:?}: use 1 to 255 letters, digits, '-', '_' and '.'",
                self.name
            ));
        }
        crate::memory::GuestMemory::check_size(self.memory).map_err(|e| format!("memory: {e}"))?;
        let workload = crate::memory::Workload {
            pattern: self.workload,
            dirty_rate: self.dirty_rate,
            content: FillSpec::default(),
            writers: 1,
            seed: 1,
        };
        workload.validate(self.memory)?;
        if self.preferred_owners.len() > MAX_PREFERRED_OWNERS {
            return Err(format!(
                "preferred_owners: at most {MAX_PREFERRED_OWNERS} nodes"
            ));
        }
        if let Some(bad) = self.preferred_owners.iter().find(|n| !valid_name(n)) {
            return Err(format!("preferred_owners: {bad:?} is not a node name"));
        }
        if let Some(image) = &self.image {
            if image.len() > MAX_IMAGE_PATH || !image.starts_with('/') || image.contains('\0') {
                return Err(format!(
                    "image: {image:?} is not an absolute path of at most {MAX_IMAGE_PATH} bytes"
                ));
            }
        }
        Ok(())
    }
}

/// Longest image path a VM may name.
pub const MAX_IMAGE_PATH: usize = 4096;

/// A VM's or node's name: 1 to 255 letters, digits, `-`, `_` and `.`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= crate::wire::MAX_LABEL_LEN
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

fn as_display<T: std::fmt::Display, S: serde::Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

/// Reads back what [`as_display`] wrote.
fn from_text<'de, T, D>(d: D) -> Result<T, D::Error>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
    D: serde::Deserializer<'de>,
{
    let text = String::deserialize(d)?;
    text.parse().map_err(serde::de::Error::custom)
}

/// A VM as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmView {
    /// What it is.
    #[serde(flatten)]
    pub spec: VmSpec,
    /// Where it is in its life here.
    pub state: VmState,
    /// Pages its workload has written (grows while it runs).
    pub pages_written: u64,
    /// `DELETE` with `force` only: what was discarded with it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lost: Option<String>,
    /// `DELETE` only, when the store did not answer in time: its record
    /// goes in the background.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<String>,
    /// Times the cluster restarted it on another node.
    #[serde(default)]
    pub restarts: u32,
    /// The last such restart (time and reason).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_restart: Option<Restart>,
}
