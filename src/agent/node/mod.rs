//! A node's state: the VMs it hosts, its migrations in and out, the queue that
//! keeps at most `max_concurrent_migrations` outgoing ones running, and the
//! counters its metrics show.

mod base;
mod entry;
mod incoming;
mod kin;
mod limit;
mod outgoing;
mod resolve;
mod spec;
mod tasks;
mod vms;

use super::cluster::{Cluster, NodeSpec};
use super::records::{Priority, Restart};
use crate::memory::{FillSpec, GuestMemory, Workload, WorkloadPattern};
use crate::migration::{MigratableGuest, MigrationConfig, Outcome, Report};
use crate::transport::{migrate, Incoming, Phase, RunContext};
use crate::wire::{GuestKind, SessionLabel, SessionSetup};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

pub(in crate::agent) use entry::MigrationEntry;
pub use entry::{MigrationView, ProgressView, Resolution};
pub use kin::{KinCopy, TagError};
use spec::default_seed;
pub use spec::{new_incarnation, valid_name, VmSpec, VmView, MAX_IMAGE_PATH};

/// Whether a node takes VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeMode {
    /// Hosts VMs and takes new ones.
    Active,
    /// Moving its VMs away; takes none.
    Draining,
    /// Takes no VMs (after a drain, or paused by an operator).
    Paused,
}

/// Where a VM is in its life on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmState {
    /// Running here.
    Running,
    /// Here, stopped (left paused by a hand-off, or unresolved).
    Paused,
    /// Running here while it migrates away.
    MigratingOut,
    /// Arriving: its memory is being received.
    MigratingIn,
    /// Being created: its memory is filled (or read from its image) and,
    /// its record written in etcd; it runs next.
    Creating,
    /// Paused because the node could not renew its lease in etcd; it runs
    /// again if the lease is renewed in time.
    Fenced,
    /// Paused for good: the node's lease expired while it was fenced, so
    /// the cluster may run it elsewhere. Kept until an operator deletes it.
    Superseded,
}

/// Where a migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MigrationState {
    /// Waiting for one of the node's migration slots.
    Queued,
    /// Moving memory.
    Running,
    /// The VM runs on the target.
    Completed,
    /// The VM runs on the source.
    Failed,
    /// Cancelled; the VM runs on the source.
    Cancelled,
    /// The hand-off was interrupted after GO: the source holds the paused VM
    /// and the target may run it; an operator must settle which.
    Unresolved,
}

impl MigrationState {
    /// Whether the migration has ended.
    pub fn is_final(self) -> bool {
        !matches!(self, Self::Queued | Self::Running)
    }

    fn of(outcome: Outcome) -> Self {
        match outcome {
            Outcome::Completed => Self::Completed,
            Outcome::Failed => Self::Failed,
            Outcome::Cancelled => Self::Cancelled,
            Outcome::Unresolved => Self::Unresolved,
        }
    }
}

/// Which way a migration goes, seen from this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// This node is the source.
    Outgoing,
    /// This node is the target.
    Incoming,
}

/// A warm copy: the memory a VM left this node with, untouched since.
pub(super) struct Warm {
    /// The migration it left by.
    pub(super) migration: String,
    pub(super) memory: Arc<crate::memory::GuestMemory>,
    pub(super) at: Instant,
    /// The VM's incarnation (`VmSpec::incarnation`), kept with its image.
    pub(super) incarnation: u64,
    /// The RAM image the VM was made from (`VmSpec::image`): VMs of the
    /// same one may start from each other's copies.
    pub(super) image: Option<String>,
}

pub(super) struct Vm {
    pub(super) spec: VmSpec,
    pub(super) state: VmState,
    pub(super) guest: Option<Arc<dyn MigratableGuest>>,
    /// While it arrives: the incoming session that reserved it. Only that
    /// session's end can remove or complete the record.
    arriving: Option<u64>,
    /// The node's lease expired while it was here: it never runs here
    /// again, whatever its migration or resolution does afterwards.
    pub(super) superseded: bool,
    /// Its guest is held paused by this node until it may run: created
    /// paused until its record is written, or paused by the node's fence.
    pub(super) held: bool,
    /// The memory it arrived with, by its pages' hashes: offered as the
    /// base when it goes back to the node it came from.
    pub(super) base: Option<crate::migration::delta::Base>,
}

impl Vm {
    /// A VM reserved under `name` with no guest yet.
    fn reserved(spec: VmSpec, arriving: Option<u64>) -> Self {
        Self {
            spec,
            state: if arriving.is_some() {
                VmState::MigratingIn
            } else {
                VmState::Creating
            },
            guest: None,
            arriving,
            superseded: false,
            held: false,
            base: None,
        }
    }

    /// A paused copy read back from the node's disk after a restart.
    pub(super) fn kept(spec: VmSpec, state: VmState, guest: Arc<dyn MigratableGuest>) -> Self {
        Self {
            spec,
            state,
            guest: Some(guest),
            arriving: None,
            superseded: state == VmState::Superseded,
            held: true,
            base: None,
        }
    }

    /// Whether it arrives now.
    pub(super) fn arriving(&self) -> bool {
        self.arriving.is_some()
    }

    /// After a migration that handed nothing over, or once created or
    /// arrived: it runs here, stays paused while the node is fenced, or for
    /// good once superseded. False when superseded.
    pub(super) fn run_unless_fenced(&mut self, fenced: bool) -> bool {
        if self.superseded {
            if let Some(g) = &self.guest {
                g.pause();
            }
            self.state = VmState::Superseded;
            return false;
        }
        if fenced {
            if let Some(g) = &self.guest {
                g.pause();
            }
            self.held = true;
            self.state = VmState::Fenced;
        } else {
            if let Some(g) = self.guest.as_ref().filter(|_| self.held) {
                g.resume();
            }
            self.held = false;
            self.state = VmState::Running;
        }
        true
    }

    fn view(&self) -> VmView {
        VmView {
            spec: self.spec.clone(),
            state: self.state,
            pages_written: self.guest.as_ref().map_or(0, |g| g.progress_counter()),
            lost: None,
            record: None,
            restarts: 0,
            last_restart: None,
        }
    }
}

/// The node's figures for `GET /v1/node`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeView {
    /// Its name.
    pub name: String,
    /// Whether it takes VMs.
    pub state: NodeMode,
    /// What its VMs may use in total, bytes.
    pub memory_capacity: u64,
    /// What its VMs (arriving ones included) use, bytes, with the warm
    /// copies of guests that left (see `memory_reclaimable`).
    pub memory_used: u64,
    /// Of `memory_used`, the warm copies of guests that left, kept for
    /// their failback: dropped as soon as a VM needs the room.
    #[serde(default)]
    pub memory_reclaimable: u64,
    /// Its VMs.
    pub vms: Vec<VmView>,
    /// Migrations moving memory now, in and out.
    pub migrations_in_flight: usize,
    /// Outgoing migrations waiting for a slot.
    pub migrations_queued: usize,
    /// Its limits.
    pub limits: Limits,
    /// Its lease in etcd (TTL and time left).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<super::store::LeaseView>,
    /// The elected coordinator's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coordinator: Option<String>,
    /// Until when the node is quarantined (it lost its lease
    /// three times within an hour), ms since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantined_until_ms: Option<u64>,
    /// The agent's ferry version.
    #[serde(default)]
    pub version: String,
    /// The update hook its agent runs update commands through (a node that
    /// joined without a `[[node]]` entry knows its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_hook: Option<Vec<String>>,
    /// The images of VMs that left it, kept for their failback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failback_retention: Option<super::retain::RetentionView>,
}

impl NodeView {
    /// Memory a VM may still take here: its warm copies give way.
    pub fn free_memory(&self) -> u64 {
        self.memory_capacity
            .saturating_sub(self.memory_used.saturating_sub(self.memory_reclaimable))
    }
}

/// A node's migration limits.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Limits {
    /// Outgoing migrations at once (with `"auto"`, the limit chosen last).
    pub max_concurrent_migrations: u32,
    /// With `max_concurrent_migrations = "auto"`: why the limit is what it
    /// is (`"auto"` before the queue first chose).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto: Option<String>,
    /// Cap on all outgoing migrations together, bytes/s.
    pub max_bandwidth: Option<u64>,
    /// The codec of outgoing migrations that name none.
    #[serde(default = "auto_codec")]
    pub codec: String,
}

fn auto_codec() -> String {
    "auto".into()
}

/// Why the node refused a request; the API maps each to an HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    /// The request is malformed (400).
    #[error("{0}")]
    BadRequest(String),
    /// No such VM or migration (404).
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with the current state (409).
    #[error("{0}")]
    Conflict(String),
    /// Not enough memory on the node (409, code `insufficient_memory`).
    #[error("{0}")]
    InsufficientMemory(String),
    /// Not supported by this build (501).
    #[error("{0}")]
    Unsupported(String),
    /// The cluster's store cannot be reached (503, code `unavailable`).
    #[error("{0}")]
    Unavailable(String),
}

impl NodeError {
    /// The machine-readable code of the API's error body.
    pub fn code(&self) -> &'static str {
        match self {
            Self::BadRequest(_) => "bad_request",
            Self::NotFound(_) => "not_found",
            Self::Conflict(_) => "conflict",
            Self::InsufficientMemory(_) => "insufficient_memory",
            Self::Unsupported(_) => "unsupported",
            Self::Unavailable(_) => "unavailable",
        }
    }
}

use crate::agent::histogram::Histogram;

/// Counters and histograms for `/metrics`.
#[derive(Debug)]
pub struct Metrics {
    /// Finished outgoing migrations by outcome: completed, failed, cancelled,
    /// unresolved.
    pub outcomes: [AtomicU64; 4],
    /// Wire bytes of finished outgoing migrations.
    pub bytes_sent: AtomicU64,
    /// Incoming migrations completed here.
    pub received: AtomicU64,
    /// Total time of each finished outgoing migration, seconds.
    pub duration: Histogram,
    /// The pause of each completed outgoing migration, seconds.
    pub downtime: Histogram,
    /// Wire bytes of each finished outgoing migration.
    pub wire_bytes: Histogram,
    /// Event streams opened: this node's (`/v1/events`), the cluster's
    /// (`/v1/cluster/events`).
    pub event_streams: [AtomicU64; 2],
}

impl Default for Metrics {
    fn default() -> Self {
        use crate::agent::histogram::{BYTES_BOUNDS, DOWNTIME_BOUNDS, DURATION_BOUNDS};
        Self {
            outcomes: Default::default(),
            bytes_sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            duration: Histogram::new(DURATION_BOUNDS),
            downtime: Histogram::new(DOWNTIME_BOUNDS),
            wire_bytes: Histogram::new(BYTES_BOUNDS),
            event_streams: Default::default(),
        }
    }
}

#[derive(Default)]
pub(super) struct State {
    pub(super) mode: Option<NodeMode>,
    pub(super) vms: BTreeMap<String, Vm>,
    pub(super) migrations: Vec<MigrationEntry>,
    /// Migrations of the agent's earlier processes, read back from etcd.
    pub(super) history: Vec<MigrationView>,
    pub(super) queue: VecDeque<String>,
    /// The node could not renew its lease in time: its guests are paused
    /// and it takes no new work.
    pub(super) fenced: bool,
    /// With `max_concurrent_migrations = "auto"`: the queue's last limit
    /// and why.
    pub(super) auto_limit: Option<(u32, String)>,
    /// With retention: the memory each VM left with, held as it was (the
    /// warm copy a failback takes over without copying) until a VM needs
    /// the room or the VM comes back.
    pub(super) warm: BTreeMap<String, Warm>,
    running_out: usize,
    next_id: u64,
}

impl State {
    fn mode(&self) -> NodeMode {
        self.mode.unwrap_or(NodeMode::Active)
    }

    /// Whether a migration leaves, waits to leave or arrives here now.
    pub(super) fn busy(&self) -> bool {
        self.running_out > 0 || !self.queue.is_empty() || self.vms.values().any(Vm::arriving)
    }

    fn memory_used(&self) -> u64 {
        let vms: u64 = self.vms.values().map(|v| v.spec.memory).sum();
        vms.saturating_add(self.warm_bytes())
    }

    /// Memory of the warm copies, which give way to any VM that needs it.
    fn warm_bytes(&self) -> u64 {
        self.warm.values().map(|w| w.memory.len_bytes()).sum()
    }

    /// Drops the oldest warm copies (but `keep`'s) until `need` more bytes
    /// fit `capacity`.
    fn make_room(&mut self, need: u64, capacity: u64, keep: &str) {
        while self.memory_used().saturating_add(need) > capacity {
            if !self.drop_oldest_warm(keep) {
                return;
            }
        }
    }

    /// Drops the oldest warm copies (but `keep`'s) until they take at most
    /// `budget` bytes: the node's `failback_retention`, which bounds them as
    /// it bounds the images on disk.
    pub(super) fn trim_warm(&mut self, budget: u64, keep: &str) {
        while self.warm_bytes() > budget {
            if !self.drop_oldest_warm(keep) {
                return;
            }
        }
    }

    /// Drops the oldest warm copy but `keep`'s and those of VMs arriving
    /// now (a failback by delta about to take its copy over); false when
    /// there is none. Its memory is freed on a thread of its own: unmapping
    /// half a GiB takes long enough to matter under the node's lock.
    fn drop_oldest_warm(&mut self, keep: &str) -> bool {
        let arriving = |vm: &str| self.vms.get(vm).is_some_and(Vm::arriving);
        let Some(vm) = self
            .warm
            .iter()
            .filter(|(vm, _)| vm.as_str() != keep && !arriving(vm))
            .min_by_key(|(_, w)| w.at)
            .map(|(vm, _)| vm.clone())
        else {
            return false;
        };
        tracing::info!(%vm, "dropping the warm copy of a VM that left");
        if let Some(w) = self.warm.remove(&vm) {
            let _ = std::thread::Builder::new()
                .name("warm-free".into())
                .spawn(move || drop(w));
        }
        true
    }

    /// Forgets the oldest settled migrations (ended, and not unresolved)
    /// past the newest [`super::journal::MAX_MIGRATIONS`], as etcd keeps
    /// them: a long-lived agent's list does not grow without end.
    pub(super) fn prune_migrations(&mut self) {
        let settled = |s: MigrationState| s.is_final() && s != MigrationState::Unresolved;
        let count = self.history.iter().filter(|h| settled(h.state)).count()
            + self.migrations.iter().filter(|e| settled(e.state)).count();
        let mut over = count.saturating_sub(super::journal::MAX_MIGRATIONS);
        let mut drop_one = |state: MigrationState| {
            let gone = over > 0 && settled(state);
            over -= usize::from(gone);
            !gone
        };
        // The earlier processes' first, then this one's, oldest first.
        self.history.retain(|h| drop_one(h.state));
        self.migrations.retain(|e| drop_one(e.state));
    }

    pub(super) fn entry(&mut self, id: &str) -> Option<&mut MigrationEntry> {
        self.migrations.iter_mut().find(|m| m.id == id)
    }
}

/// One node: its spec, its cluster, and everything it hosts and moves.
pub struct Node {
    /// The cluster it belongs to.
    pub cluster: Cluster,
    /// Its own entry in the cluster file.
    pub spec: NodeSpec,
    pub(super) state: Mutex<State>,
    /// Counters for `/metrics`.
    pub metrics: Metrics,
    /// The cap shared by all outgoing migrations, when the node has one.
    bucket: Option<Arc<crate::transport::TokenBucket>>,
    /// Calls to the other agents.
    pub(crate) peers: super::peer::Peers,
    /// Drains and resumes, oldest first.
    pub(crate) ops: Mutex<Vec<super::ops::Operation>>,
    /// Woken whenever a migration ends.
    pub(crate) changed: tokio::sync::Notify,
    /// The migration listener's refusals, once it listens.
    pub(crate) refusals: std::sync::OnceLock<Arc<crate::transport::ReceiverStats>>,
    /// Its registration and lease in etcd, once registered.
    pub(crate) liveness: std::sync::OnceLock<Arc<super::store::Liveness>>,
    /// The cluster's keys, kept current.
    pub(crate) mirror: std::sync::OnceLock<Arc<super::mirror::Mirror>>,
    /// The agent's stop, once asked (a drain on shutdown).
    pub stop: super::shutdown::Stop,
    /// The control API's refusals, by reason.
    pub api_stats: Arc<super::listen::ApiStats>,
    /// The control API's limits.
    pub api_limits: super::listen::ApiLimits,
    /// Serializes the fence's actions.
    pub(super) fence_actions: Mutex<()>,
    /// Itself, for the background tasks it starts.
    pub(super) this: std::sync::Weak<Node>,
    /// The writer of its own records in etcd.
    pub(super) journal: std::sync::OnceLock<Arc<super::journal::Journal>>,
    /// The paused copies saved on its disk, by VM.
    pub(super) kept: Mutex<BTreeMap<String, super::kept::KeptVm>>,
    /// Held while this agent, as coordinator, starts a cluster operation.
    pub(crate) cluster_turn: tokio::sync::Mutex<()>,
    /// Held while a drain or resume of this node starts, so that two never
    /// start at once.
    pub(crate) op_turn: tokio::sync::Mutex<()>,
    /// Set (under `op_turn`) once a stop has marked the running operations
    /// interrupted: no operation starts after, to be cut off by the exit.
    pub(crate) closing: std::sync::atomic::AtomicBool,
    /// Its background tasks: outgoing migrations, operations, record edits.
    pub(crate) tasks: tasks::Tasks,
    /// The images VMs left it with (failback retention).
    pub(crate) retention: super::retain::Retention,
    /// What changed, for `GET /v1/events`.
    pub(crate) events: super::events::Hub,
    /// A slot per `/v1/cluster/events` stream served.
    pub(crate) cluster_streams: Arc<tokio::sync::Semaphore>,
    /// The console's session cookies.
    pub(crate) sessions: super::session::Sessions,
    /// The session epoch this agent raised last (etcd's copy may not have
    /// reached its mirror yet).
    pub(crate) session_floor: AtomicU64,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("name", &self.spec.name)
            .finish()
    }
}

/// A state's name as the API writes it (`migrating-out`, `completed`, ...).
pub(crate) fn name_of<T: Serialize>(state: &T) -> String {
    match serde_json::to_value(state) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::new(),
    }
}

pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Node {
    /// Node `name` of `cluster`, hosting nothing yet.
    pub fn new(cluster: Cluster, name: &str) -> Result<Arc<Self>, String> {
        let spec = cluster.require_node(name)?.clone();
        let sessions =
            super::session::Sessions::new(&cluster.token, cluster.readonly_token.as_deref());
        let bucket = spec.max_bandwidth.map(|bps| {
            Arc::new(crate::transport::TokenBucket::new(
                bps,
                (bps / 100).max(1 << 20),
            ))
        });
        let api_limits = cluster.api;
        let retention = super::retain::Retention::open(
            &spec.failback_retention_dir,
            spec.failback_retention,
            spec.memory_capacity,
        );
        Ok(Arc::new_cyclic(|this| Self {
            peers: super::peer::Peers::new(&cluster),
            cluster,
            spec,
            state: Mutex::new(State::default()),
            metrics: Metrics::default(),
            bucket,
            ops: Mutex::new(Vec::new()),
            changed: tokio::sync::Notify::new(),
            refusals: std::sync::OnceLock::new(),
            liveness: std::sync::OnceLock::new(),
            mirror: std::sync::OnceLock::new(),
            stop: super::shutdown::Stop::default(),
            api_stats: Arc::default(),
            api_limits,
            fence_actions: Mutex::new(()),
            this: this.clone(),
            journal: std::sync::OnceLock::new(),
            kept: Mutex::default(),
            cluster_turn: tokio::sync::Mutex::new(()),
            op_turn: tokio::sync::Mutex::new(()),
            closing: std::sync::atomic::AtomicBool::new(false),
            tasks: tasks::Tasks::default(),
            retention,
            events: super::events::Hub::default(),
            sessions,
            cluster_streams: Arc::new(tokio::sync::Semaphore::new(
                super::events::MAX_CLUSTER_STREAMS,
            )),
            session_floor: AtomicU64::new(0),
        }))
    }

    /// The key-value requests this agent made to etcd,
    /// `(reads, writes)`.
    pub fn etcd_counts(&self) -> Option<(u64, u64)> {
        self.liveness.get().map(|l| l.etcd().counts())
    }

    /// The node's name.
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// Whether it takes VMs now.
    pub fn mode(&self) -> NodeMode {
        self.state.lock().unwrap().mode()
    }

    /// Sets whether it takes VMs; an operator's choice (not a stopping
    /// agent's) outlives the agent's restarts, in etcd.
    pub fn set_mode(&self, mode: NodeMode) {
        let before = self.state.lock().unwrap().mode.replace(mode);
        self.mode_changed(before, mode);
    }

    /// Sets whether it takes VMs in memory only, returning the setting
    /// before: a drain holds arrivals off while it plans, and sets it back
    /// if it refuses, or keeps it and calls [`Node::mode_changed`].
    pub(in crate::agent) fn hold_mode(&self, mode: Option<NodeMode>) -> Option<NodeMode> {
        std::mem::replace(&mut self.state.lock().unwrap().mode, mode)
    }

    /// A refused drain gives back the mode it held: `before`, unless
    /// something else (a stopping agent) changed it meanwhile.
    pub(in crate::agent) fn release_mode(&self, before: Option<NodeMode>) {
        let mut st = self.state.lock().unwrap();
        if st.mode == Some(NodeMode::Draining) {
            st.mode = before;
        }
    }

    /// The mode went from `before` to `mode`: an operator's choice is
    /// journaled.
    pub(in crate::agent) fn mode_changed(&self, before: Option<NodeMode>, mode: NodeMode) {
        if before != Some(mode) && !self.stop.asked() {
            self.journal_admin(mode);
        }
    }

    /// At start: takes VMs unless an operator left the node paused.
    pub(super) fn start_mode(&self) {
        self.state
            .lock()
            .unwrap()
            .mode
            .get_or_insert(NodeMode::Active);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn migration(id: usize, state: MigrationState) -> MigrationView {
        MigrationView {
            id: format!("m{id}"),
            vm: "vm".into(),
            source: "a".into(),
            target: "b".into(),
            direction: Direction::Outgoing,
            state,
            phase: None,
            created_at_ms: id as u64,
            started_at_ms: None,
            finished_at_ms: None,
            queued_s: None,
            operation: None,
            error: None,
            progress: None,
            report: None,
            resolution: None,
            saved_guest: None,
        }
    }

    fn warm(migration: &str, at: Instant) -> Warm {
        Warm {
            migration: migration.into(),
            memory: Arc::new(crate::memory::GuestMemory::new(1 << 20).unwrap()),
            at,
            incarnation: 1,
            image: None,
        }
    }

    #[test]
    fn warm_copies_give_way_oldest_first_but_never_an_arriving_vms() {
        let t = Instant::now();
        let mut st = State::default();
        for (i, vm) in ["old", "back", "new"].into_iter().enumerate() {
            st.warm.insert(
                vm.into(),
                warm("m", t + std::time::Duration::from_millis(i as u64)),
            );
        }
        // "back" is arriving: a failback by delta about to take its copy.
        let spec = VmSpec {
            name: "back".into(),
            memory: 1 << 20,
            workload: WorkloadPattern::Idle,
            dirty_rate: 0,
            fill: FillSpec::default(),
            guest: crate::wire::GuestKind::Sim,
            priority: Priority::default(),
            preferred_owners: Vec::new(),
            image: None,
            seed: spec::default_seed(),
            incarnation: 0,
        };
        st.vms.insert("back".into(), Vm::reserved(spec, Some(7)));
        // A budget of one copy: "old" goes, then "back" is passed over.
        st.trim_warm(1 << 20, "new");
        let left: Vec<&str> = st.warm.keys().map(String::as_str).collect();
        assert_eq!(left, ["back", "new"]);
        // Room for 3 MiB more in 4: everything that may go goes, no more.
        st.make_room(3 << 20, 4 << 20, "none");
        let left: Vec<&str> = st.warm.keys().map(String::as_str).collect();
        assert_eq!(left, ["back"]);
    }

    #[test]
    fn only_the_newest_settled_migrations_are_kept_and_no_unresolved_one_goes() {
        let max = super::super::journal::MAX_MIGRATIONS;
        let mut st = State {
            history: (0..10)
                .map(|i| migration(i, MigrationState::Completed))
                .collect(),
            ..State::default()
        };
        st.history.push(migration(10, MigrationState::Unresolved));
        st.migrations.push(MigrationEntry::restored(&migration(
            11,
            MigrationState::Running,
        )));
        for i in 12..12 + max + 2 {
            st.migrations.push(MigrationEntry::restored(&migration(
                i,
                MigrationState::Failed,
            )));
        }
        st.prune_migrations();
        // The ten of history and the oldest two of this process went.
        assert_eq!(
            st.history.iter().map(|h| h.id.as_str()).collect::<Vec<_>>(),
            ["m10"]
        );
        assert_eq!(st.migrations.len(), 1 + max);
        assert_eq!(st.migrations[0].id, "m11");
        assert_eq!(st.migrations[1].id, "m14");
    }
    use crate::transport::Progress;

    fn entry(progress: Arc<Progress>) -> MigrationEntry {
        MigrationEntry {
            id: "a-1".into(),
            vm: "vm".into(),
            source: "a".into(),
            target: "b".into(),
            direction: Direction::Outgoing,
            state: MigrationState::Running,
            created_at_ms: 0,
            started_at_ms: Some(0),
            finished_at_ms: None,
            created: Instant::now(),
            started: Some(Instant::now()),
            operation: None,
            config: MigrationConfig::default(),
            ctx: RunContext {
                progress,
                ..RunContext::default()
            },
            report: None,
            error: None,
            eta_end: None,
            resolution: None,
            session: None,
        }
    }

    #[test]
    fn the_eta_counts_down_even_when_the_rate_drops() {
        let progress = Progress::new();
        let mut e = entry(progress.clone());
        // 100 MB left at 10 MB/s: 10 s.
        progress.update(|s| {
            s.phase = Phase::Precopy;
            s.round_pages = 100_000_000 / 4096;
            s.throughput_bps = 10e6;
        });
        let first = e.progress().eta_s.unwrap();
        assert!((9.0..=10.1).contains(&first), "{first}");
        // The rate halves: the estimate doubles, the ETA does not go back.
        progress.update(|s| s.throughput_bps = 5e6);
        let second = e.progress().eta_s.unwrap();
        assert!(second <= first, "{second} after {first}");
        // The rate doubles: the ETA comes closer at once.
        progress.update(|s| s.throughput_bps = 40e6);
        let third = e.progress().eta_s.unwrap();
        assert!(third < 3.0, "{third}");
    }
}
