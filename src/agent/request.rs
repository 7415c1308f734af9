//! The bodies of the control API's requests, one definition for both ends:
//! the API reads them (and checks every value, naming the field), the typed
//! client writes them. Keys are the CLI's flag names in snake_case.

use serde::{Deserialize, Serialize};

/// A size, rate or duration as the CLI writes it (`"1GiB"`, `"1Gbit/s"`,
/// `"300ms"`), or a plain integer (bytes, bytes/s, milliseconds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Amount {
    /// Bytes, bytes per second or milliseconds.
    Int(u64),
    /// With its unit, as the CLI takes it.
    Text(String),
}

/// `on`/`off` as the CLI takes it, or a JSON boolean.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Switch {
    /// A JSON boolean.
    Bool(bool),
    /// `on` or `off`.
    Text(String),
}

/// `POST /v1/vms`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVm {
    /// Unique in the cluster: letters, digits, `-`, `_`, `.`.
    pub name: String,
    /// Guest memory.
    pub memory: Amount,
    /// Write pattern (default `hot:64MiB`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    /// Bytes written per second (default 100 MB/s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dirty_rate: Option<Amount>,
    /// Initial content mix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fill: Option<String>,
    /// `sim` (default) or `kvm`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<String>,
    /// `high`, `medium` (default), `low` or `off`: the order of restarts
    /// elsewhere when its node dies (`off`: never restarted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<String>,
    /// The nodes a restart elsewhere tries first, in order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preferred_owners: Option<Vec<String>>,
    /// An absolute path every node can read: a raw RAM image of `memory`
    /// bytes, the VM's memory at creation and at every restart elsewhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The seed of its content and workload (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

impl From<&crate::agent::VmSpec> for CreateVm {
    /// The request that creates a VM of `spec` (a restart elsewhere).
    fn from(spec: &crate::agent::VmSpec) -> Self {
        Self {
            name: spec.name.clone(),
            memory: Amount::Int(spec.memory),
            workload: Some(spec.workload.to_string()),
            dirty_rate: Some(Amount::Int(spec.dirty_rate)),
            fill: Some(spec.fill.to_string()),
            guest: Some(crate::agent::client::name_of(spec.guest)),
            priority: Some(crate::agent::client::name_of(spec.priority)),
            preferred_owners: (!spec.preferred_owners.is_empty())
                .then(|| spec.preferred_owners.clone()),
            image: spec.image.clone(),
            seed: Some(spec.seed),
        }
    }
}

/// The migration parameters as the CLI names them; unset ones take the
/// engine's defaults.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationParams {
    /// TCP channels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channels: Option<u16>,
    /// `none`, `lz4`, `zstd[:level]` or `auto`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub codec: Option<String>,
    /// Cap on wire bytes/s (0: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bandwidth: Option<Amount>,
    /// The pause to aim under.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_limit: Option<Amount>,
    /// `fast` or `full`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<String>,
    /// Throttle a guest that writes faster than the link.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_converge: Option<Switch>,
    /// Give up after this long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_timeout: Option<Amount>,
    /// Give up when the remaining bytes stop falling for this long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress_timeout: Option<Amount>,
    /// Declare a silent target dead after this long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_timeout: Option<Amount>,
    /// Leave the VM paused on the target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leave_paused: Option<bool>,
    /// Back to a node that kept the image the VM left it with: send only
    /// the pages that changed since (`on`, the default, or `off`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<Switch>,
    /// Dense pages: a page identical to one the target already holds from
    /// this round goes as a reference (`on`, the default, or `off`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dense: Option<Switch>,
}

/// `POST /v1/migrations`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateMigration {
    /// The VM, on this node.
    pub vm: String,
    /// The node to move it to.
    pub target: String,
    /// How.
    #[serde(flatten)]
    pub params: MigrationParams,
}

/// `POST /v1/migrations/{id}/resolve`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resolve {
    /// `source` or `destination`.
    pub run_on: String,
    /// Settle it although the other node cannot be asked.
    #[serde(default)]
    pub force: bool,
}

/// `POST /v1/node/drain` (an empty body takes the defaults).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drain {
    /// Migrations of this drain at once (1 to 64, or `"auto"`: chosen from
    /// the node's link and its VMs' write rates; default the node's limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<Concurrency>,
    /// Move what fits when the other nodes cannot hold every VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_partial: Option<bool>,
    /// Failbacks by delta for the VMs it moves (`on`, the default, or `off`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<Switch>,
    /// The asker's key for this request (1 to 128 printable ASCII
    /// characters, no spaces): the same key again gets the operation it
    /// started back instead of a second one, so a request whose answer was
    /// lost may be sent again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Only say what the drain would do (a [`crate::agent::ops::DrainPlan`],
    /// answered `200`): nothing changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dry_run: Option<bool>,
}

/// How many migrations run at once: a number, or `"auto"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Concurrency {
    /// This many.
    Fixed(u32),
    /// As many as the link and the VMs' write rates call for.
    Auto,
}

impl std::fmt::Display for Concurrency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Fixed(n) => write!(f, "{n}"),
            Self::Auto => f.write_str("auto"),
        }
    }
}

impl std::str::FromStr for Concurrency {
    type Err = String;

    /// `auto` or a whole number (range-checked where it is used).
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "auto" => Ok(Self::Auto),
            t => t
                .parse()
                .map(Self::Fixed)
                .map_err(|_| format!("{s:?} is neither a whole number nor \"auto\"")),
        }
    }
}

impl Serialize for Concurrency {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Fixed(n) => s.serialize_u32(*n),
            Self::Auto => s.serialize_str("auto"),
        }
    }
}

impl<'de> Deserialize<'de> for Concurrency {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u32),
            Text(String),
        }
        match Raw::deserialize(d) {
            Ok(Raw::Number(n)) => Ok(Self::Fixed(n)),
            Ok(Raw::Text(t)) if t == "auto" => Ok(Self::Auto),
            _ => Err(serde::de::Error::custom(
                "max_concurrent: expected a whole number from 1 to 64 or \"auto\"",
            )),
        }
    }
}

/// `POST /v1/node/resume` (an empty body takes the defaults).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resume {
    /// Bring back the VMs the last drain moved away.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failback: Option<bool>,
    /// Lift the node's quarantine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clear_quarantine: Option<bool>,
    /// With failback: send only what changed since each VM left, where this
    /// node kept its image (`on`, the default, or `off`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<Switch>,
    /// The asker's key for this request (1 to 128 printable ASCII
    /// characters, no spaces): the same key again gets the operation it
    /// started back instead of a second one, so a request whose answer was
    /// lost may be sent again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// `POST /v1/node/update`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Update {
    /// The command, given to the node's update hook.
    pub command: String,
    /// Run it although the node still hosts VMs.
    #[serde(default)]
    pub force: bool,
    /// `pre` or `post`: a rolling update's pre- or post-update command,
    /// run whatever the node's state (before its drain, after its resume).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    /// The asker's key for this request (1 to 128 printable ASCII
    /// characters, no spaces): the same key again gets the operation it
    /// started back instead of a second one, so a request whose answer was
    /// lost may be sent again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// `POST /v1/node/stop` (an empty body takes the defaults).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stop {
    /// Stop now, discarding the VMs still here.
    #[serde(default)]
    pub force: bool,
}

/// The answer to `POST /v1/node/stop`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stopping {
    /// The node.
    pub node: String,
    /// Always true: the agent is stopping.
    pub stopping: bool,
    /// Whether it stops at once.
    pub force: bool,
    /// The VMs still on the node.
    pub vms: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_migration_request_with_a_field_it_does_not_know_is_refused() {
        let parse = |v: serde_json::Value| serde_json::from_value::<CreateMigration>(v);
        let ok = parse(serde_json::json!({"vm": "web", "target": "b", "codec": "lz4"})).unwrap();
        assert_eq!(ok.params.codec.as_deref(), Some("lz4"));
        let e = parse(serde_json::json!({"vm": "web", "target": "b", "bandwith": "1GB/s"}));
        assert!(e.unwrap_err().to_string().contains("bandwith"));
    }
}
