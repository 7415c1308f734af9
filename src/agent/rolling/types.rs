//! A rolling update's run as etcd keeps it and the API shows it: its
//! state, each node's turn and phase, and the request that starts one.

use super::*;

/// Where a rolling update is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// Nodes are being updated.
    Running,
    /// Every node was updated.
    Completed,
    /// A node's turn failed: that node is left as its failure left it
    /// (paused after a drain or an update), the later ones untouched.
    Failed,
    /// Cancelled between two nodes' turns.
    Cancelled,
}

/// Where one node's turn is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Not started.
    Pending,
    /// The pre-update command runs on it (before its drain).
    PreUpdate,
    /// Its VMs move away.
    Draining,
    /// The update command runs on it.
    Updating,
    /// It takes VMs again (and its VMs come back, with failback).
    Resuming,
    /// The post-update command runs on it (after its resume).
    PostUpdate,
    /// Updated and resumed.
    Done,
    /// Its turn failed.
    Failed,
}

/// One node's turn: its phase and the operations it started on the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Turn {
    /// The node.
    pub node: String,
    /// Where its turn is.
    pub phase: Phase,
    /// When the phase's intent was written, ms since the Unix epoch.
    pub since_ms: u64,
    /// The drain's operation on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain: Option<String>,
    /// The update command's operation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update: Option<String>,
    /// The resume's operation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<String>,
    /// The pre-update command's operation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre: Option<String>,
    /// The post-update command's operation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post: Option<String>,
    /// Why it failed (or, retried, why its last attempt did).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Its failed attempts that were retried.
    #[serde(default)]
    pub attempts: u32,
    /// The operations of those attempts: never taken for a new attempt's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub discarded: Vec<String>,
}

/// A rolling update, as `GET /v1/cluster/update` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateRun {
    /// The layout's version.
    pub version: u32,
    /// Its id.
    pub id: String,
    /// The command each node's update hook runs.
    pub command: String,
    /// Whether a resumed node gets back the VMs its drain moved.
    pub failback: bool,
    /// How long a node's update command may take, ms; an update that
    /// restarts the node's agent succeeds if the agent is back within it.
    #[serde(default = "default_stop_after")]
    pub stop_after_ms: u64,
    /// How many nodes' turns may fail before the run stops (0: it stops at
    /// the first).
    #[serde(default)]
    pub max_failed_nodes: u32,
    /// How many times a node's failed phase is tried again before its turn
    /// fails.
    #[serde(default)]
    pub max_retries_per_node: u32,
    /// A turn starts only while every node of the run holds a lease.
    #[serde(default)]
    pub require_all_nodes_online: bool,
    /// Run on each node before its drain, through its update hook.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_update: Option<String>,
    /// Run on each node after its resume, through its update hook.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_update: Option<String>,
    /// Whether its drains and failbacks go by delta where they can.
    #[serde(default = "super::delta_on")]
    pub delta: bool,
    /// Where it is.
    pub state: RunState,
    /// The nodes' turns, in order.
    pub nodes: Vec<Turn>,
    /// When it was asked for, ms since the Unix epoch.
    pub started_at_ms: u64,
    /// When it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at_ms: Option<u64>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// An operator asked it to stop after the current node's turn.
    #[serde(default)]
    pub cancel_requested: bool,
    /// The coordinators that carried it, in turn (one hands over before its
    /// own node's turn).
    #[serde(default)]
    pub coordinators: Vec<String>,
    /// Started by the schedule, for its slot due then (ms since the Unix
    /// epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_for_ms: Option<u64>,
}

impl Versioned for UpdateRun {
    fn version(&self) -> u32 {
        self.version
    }
}

impl UpdateRun {
    /// Checks a run read from etcd as API input is checked.
    pub fn check(&self) -> Result<(), String> {
        if !valid_name(&self.id) {
            return Err(format!("id {:?} is not a valid name", self.id));
        }
        let commands = [
            Some(&self.command),
            self.pre_update.as_ref(),
            self.post_update.as_ref(),
        ];
        if commands
            .into_iter()
            .flatten()
            .any(|c| c.is_empty() || c.len() > MAX_COMMAND)
        {
            return Err(format!("command: 1 to {MAX_COMMAND} bytes"));
        }
        let (lo, hi) = STOP_AFTER_MS;
        if !(lo..=hi).contains(&self.stop_after_ms) {
            return Err(format!("stop_after_ms: {lo} to {hi}"));
        }
        if self.nodes.len() > 4096 || self.coordinators.len() > 4096 {
            return Err("over 4096 nodes".into());
        }
        if self.max_retries_per_node > MAX_RETRIES || self.max_failed_nodes > 4096 {
            return Err("max_retries_per_node or max_failed_nodes out of range".into());
        }
        if self.nodes.iter().any(|t| t.discarded.len() > 1024) {
            return Err("over 1024 discarded operations".into());
        }
        if let Some(id) = self
            .nodes
            .iter()
            .flat_map(|t| &t.discarded)
            .find(|id| !valid_name(id))
        {
            return Err(format!("discarded operation {id:?} is not a valid name"));
        }
        let names = self.nodes.iter().map(|t| &t.node);
        if let Some(n) = names.chain(&self.coordinators).find(|n| !valid_name(n)) {
            return Err(format!("node {n:?} is not a valid name"));
        }
        let texts = self.nodes.iter().flat_map(|t| {
            [&t.drain, &t.update, &t.resume, &t.pre, &t.post, &t.error]
                .into_iter()
                .flatten()
        });
        if texts.chain(&self.error).any(|t| t.len() > 64 << 10) {
            return Err("a field is over 64 KiB".into());
        }
        Ok(())
    }

    /// The turn under way: the first neither done nor failed.
    pub fn current(&self) -> Option<&Turn> {
        self.nodes
            .iter()
            .find(|t| !matches!(t.phase, Phase::Done | Phase::Failed))
    }
}

/// The body of `POST /v1/cluster/update`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartUpdate {
    /// The command each node's update hook runs.
    pub command: String,
    /// `immediate` (the default): a resumed node gets its VMs back; `none`:
    /// they stay where the drain put them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failback: Option<String>,
    /// The nodes in the order to update them (default: every node of the
    /// cluster file, in its order).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_order: Option<Vec<String>>,
    /// How long each node's update command may take (`"30m"`; default
    /// 1 h); an update that restarts the node's agent succeeds when the
    /// agent is back within it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_after: Option<String>,
    /// How many nodes' turns may fail before the run stops (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_failed_nodes: Option<u32>,
    /// How many times a node's failed phase is tried again (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries_per_node: Option<u32>,
    /// Start, and start each turn, only while every node holds a lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub require_all_nodes_online: Option<bool>,
    /// Run on each node before its drain, through its update hook.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_update: Option<String>,
    /// Run on each node after its resume, through its update hook.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_update: Option<String>,
    /// `on` (the default) or `off`: failbacks by delta, each VM sending
    /// only what changed since it left where its node kept its image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<String>,
}
