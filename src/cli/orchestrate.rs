//! The orchestrator's commands: `ferry vm`, `ferry migrate`, `ferry node`.
//! Each reads the cluster file, talks to the agents' control APIs, and for
//! long operations waits with progress bars (or returns the id with
//! `--detach`); `--json` prints the final record as one line on stdout.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
pub(crate) use ferry::agent::client::name_of;
use ferry::agent::peer::{PeerError, Peers};
use ferry::agent::request::{
    Amount, CreateMigration, CreateVm, Drain, MigrationParams, Resolve, Resume, Stop, Switch,
};
use ferry::agent::{
    Cluster, MigrationState, MigrationView, NodeSpec, OpState, OperationView, VmView,
};
use ferry::units::{Bytes, Rate};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

mod node;
mod vm;
mod watch;

pub use node::{agent_stop, node};
pub(crate) use node::{print_steps, took, watch_op};
pub use vm::{migrate, resolve, vm};

/// Where the cluster file is.
#[derive(Args, Debug, Clone)]
pub struct ClusterArg {
    /// The cluster file (nodes, addresses, token).
    #[arg(
        long,
        default_value = "cluster.toml",
        value_name = "FILE",
        global = true
    )]
    pub cluster: PathBuf,
}

/// How a command reports.
#[derive(Args, Debug, Clone)]
pub struct Output {
    /// Print the final result as one line of JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// How a long command waits.
#[derive(Args, Debug, Clone)]
pub struct Wait {
    /// Print the migration or operation id and return at once.
    #[arg(long)]
    pub detach: bool,
}

/// `ferry vm ...`
#[derive(Subcommand, Debug)]
// Parsed once per run: its size does not matter.
#[allow(clippy::large_enum_variant)]
pub enum VmCommand {
    /// Every VM of the cluster, by node.
    List {
        #[command(flatten)]
        out: Output,
    },
    /// Create and start a VM on a node.
    Create {
        /// Its name, unique in the cluster.
        name: String,
        /// The node to run it on.
        #[arg(long)]
        node: String,
        /// Guest memory (e.g. 512MiB, 4GiB) [default: 1GiB, or the image's
        /// size].
        #[arg(long)]
        memory: Option<String>,
        /// Write pattern: idle, uniform, sequential, hot:<size> [default: hot:64MiB].
        #[arg(long)]
        workload: Option<String>,
        /// Bytes written per second [default: 100MB/s].
        #[arg(long)]
        dirty_rate: Option<String>,
        /// Initial content mix.
        #[arg(long)]
        fill: Option<String>,
        /// Backend: sim (synthetic) or kvm.
        #[arg(long, default_value = "sim")]
        guest: String,
        /// Restart order when its node dies: high, medium, low, or off
        /// (never restarted elsewhere) [default: medium].
        #[arg(long)]
        priority: Option<String>,
        /// Nodes a restart elsewhere tries first, in order (comma-separated).
        #[arg(long, value_delimiter = ',')]
        preferred_owners: Vec<String>,
        /// A raw RAM image every node can read at this path (as shared
        /// storage; `ferry image` writes one): the VM's memory at creation
        /// and at each restart elsewhere, instead of --fill.
        #[arg(long)]
        image: Option<PathBuf>,
        /// The seed of its content and workload [default: 1].
        #[arg(long)]
        seed: Option<u64>,
        #[command(flatten)]
        out: Output,
    },
    /// Stop and remove a VM, wherever it runs.
    Delete {
        /// The VM.
        name: String,
        /// Remove it even when it is paused: the source's copy of an
        /// unresolved migration, or a guest left paused, may be its last.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        out: Output,
    },
}

/// `ferry node ...`
#[derive(Subcommand, Debug)]
pub enum NodeCommand {
    /// Every node's state, memory, VMs and migrations.
    Status {
        #[command(flatten)]
        out: Output,
    },
    /// Pause a node and move all its VMs to the other active nodes.
    Drain {
        /// The node.
        node: String,
        /// Migrations of this drain at once (1 to 64), or `auto`: chosen
        /// from the node's link and its VMs' write rates, the reason in the
        /// operation's `params.auto` [default: the node's limit].
        #[arg(long, value_parser = super::args::concurrency_arg)]
        max_concurrent: Option<ferry::agent::request::Concurrency>,
        /// Move what fits when the other nodes cannot hold every VM.
        #[arg(long)]
        allow_partial: bool,
        /// on or off: a VM going back to the node it came from sends only the
        /// pages that changed since, where that node kept its image [default: on].
        #[arg(long, value_parser = ["on", "off"])]
        delta: Option<String>,
        #[command(flatten)]
        wait: Wait,
        #[command(flatten)]
        out: Output,
    },
    /// Let a node take VMs again.
    Resume {
        /// The node.
        node: String,
        /// Bring back the VMs its last drain moved away.
        #[arg(long)]
        failback: bool,
        /// Lift its quarantine (it lost its lease three times within an
        /// hour), letting the cluster place VMs on it again.
        #[arg(long)]
        clear_quarantine: bool,
        /// on or off: with --failback, each VM sends only the pages that
        /// changed since it left, where this node kept its image [default: on].
        #[arg(long, value_parser = ["on", "off"])]
        delta: Option<String>,
        #[command(flatten)]
        wait: Wait,
        #[command(flatten)]
        out: Output,
    },
    /// Take a node out of the cluster for good: its agent must
    /// be stopped, and no VM's record may name it.
    Remove {
        /// The node.
        node: String,
        /// Discard the records of VMs that still name it (they run
        /// nowhere: its lease expired and they were not restarted).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        out: Output,
    },
}

/// `ferry migrate VM --to NODE`.
#[derive(Args, Debug)]
pub struct MigrateVmArgs {
    /// The VM (found on whichever node runs it).
    pub vm: String,
    /// The node to move it to.
    #[arg(long)]
    pub to: String,
    /// TCP channels.
    #[arg(long)]
    pub channels: Option<u16>,
    /// none, lz4, zstd[:level] or auto.
    #[arg(long)]
    pub codec: Option<String>,
    /// Cap on wire bytes/s (e.g. 1Gbit/s).
    #[arg(long)]
    pub max_bandwidth: Option<String>,
    /// The pause to aim under (e.g. 300ms).
    #[arg(long)]
    pub downtime_limit: Option<String>,
    /// fast or full.
    #[arg(long)]
    pub verify: Option<String>,
    /// on or off.
    #[arg(long)]
    pub auto_converge: Option<String>,
    /// Give up after this long.
    #[arg(long)]
    pub completion_timeout: Option<String>,
    /// Give up when the remaining bytes stop falling for this long.
    #[arg(long)]
    pub progress_timeout: Option<String>,
    /// Declare a silent target dead after this long (e.g. 10s).
    #[arg(long)]
    pub peer_timeout: Option<String>,
    /// Leave the VM paused on the target.
    #[arg(long)]
    pub leave_paused: bool,
    /// on or off: back to the node it came from, send only the pages that
    /// changed since, where that node kept its image [default: on].
    #[arg(long, value_parser = ["on", "off"])]
    pub delta: Option<String>,
    /// on or off: a page identical to one the target already holds from
    /// this round goes as a reference [default: on].
    #[arg(long, value_parser = ["on", "off"])]
    pub dense: Option<String>,
    #[command(flatten)]
    pub wait: Wait,
    #[command(flatten)]
    pub out: Output,
}

/// `ferry resolve ID --run-on source|destination`.
#[derive(Args, Debug)]
pub struct ResolveArgs {
    /// The unresolved migration's id.
    pub id: String,
    /// Where the VM is to run: source or destination.
    #[arg(long, value_parser = ["source", "destination"])]
    pub run_on: String,
    /// Settle it even though the other node cannot be asked (only once it is
    /// known to be down for good).
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub out: Output,
}

/// The cluster file, a typed client of its agents, and a runtime to wait on.
pub(crate) struct Ctx {
    pub(crate) cluster: Cluster,
    pub(crate) peers: Peers,
    rt: tokio::runtime::Runtime,
}

impl Ctx {
    pub(crate) fn new(cluster: &ClusterArg) -> Result<Self> {
        let mut cluster =
            Cluster::load(&cluster.cluster).map_err(|e| crate::usage(e.to_string()))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        // Nodes that joined by registering in etcd, with their live
        // addresses; without etcd at hand, the file's nodes.
        if let Some(store) = cluster.store.clone() {
            // Bounded: with quorum lost the store would keep this command
            // waiting, when the file's nodes can still be asked.
            let read = rt.block_on(async {
                let asked = async {
                    let etcd = ferry::agent::etcd::Etcd::new(&store.client)?;
                    etcd.authenticate().await?;
                    ferry::agent::members::read(&cluster, &etcd, &store.prefix).await
                };
                match tokio::time::timeout(ETCD_READ, asked).await {
                    Ok(read) => read.map_err(|e| e.to_string()),
                    Err(_) => Err(format!("no answer within {ETCD_READ:?}")),
                }
            });
            match read {
                Ok(nodes) => cluster.nodes = nodes,
                Err(e) if cluster.nodes.is_empty() => {
                    bail!("the cluster file names no node and etcd cannot say which joined: {e}")
                }
                Err(e) => {
                    tracing::warn!(error = %e, "etcd cannot say which nodes joined the cluster; using the cluster file's")
                }
            }
        }
        Ok(Self {
            peers: Peers::new(&cluster),
            cluster,
            rt,
        })
    }

    pub(crate) fn node(&self, name: &str) -> Result<&NodeSpec> {
        self.cluster.require_node(name).map_err(crate::usage)
    }

    /// Waits for a call of [`Peers`].
    pub(crate) fn run<T>(&self, call: impl std::future::Future<Output = T>) -> T {
        self.rt.block_on(call)
    }

    /// The node that runs `vm`.
    fn find_vm(&self, vm: &str) -> Result<(&NodeSpec, VmView)> {
        for n in &self.cluster.nodes {
            match self.run(self.peers.vm(n, vm)) {
                Ok(v) => return Ok((n, v)),
                Err(PeerError::Api { status: 404, .. }) => continue,
                Err(e) => eprintln!("warning: {e}"),
            }
        }
        bail!(
            "no node of {} runs a VM named {vm:?}",
            self.cluster.path.display()
        )
    }
}

pub(crate) fn print_json(v: &impl Serialize) {
    println!("{}", serde_json::to_string(v).expect("API views serialize"));
}

/// The longest a command waits for etcd to list the nodes that joined.
const ETCD_READ: std::time::Duration = std::time::Duration::from_secs(3);

fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template("{prefix:>14} [{bar:28}] {msg}")
        .expect("valid template")
        .progress_chars("=> ")
}

/// Shows migration `m` of a VM of `memory` bytes on `bar`: guest bytes sent
/// of the memory (what is left counts the dirty pages too), the phase,
/// round, rate, ETA and throttle.
fn show_migration(bar: &ProgressBar, memory: u64, m: &MigrationView) {
    let p = m.progress.as_ref();
    let left = p.map_or(0, |p| p.bytes_left);
    bar.set_length(memory.max(1));
    bar.set_position(memory.saturating_sub(left));
    if m.state == MigrationState::Queued {
        bar.set_message("queued");
        return;
    }
    let phase = match m.phase {
        Some(phase) => name_of(phase),
        None => name_of(m.state),
    };
    let mut msg = format!(
        "{phase} {}",
        p.map_or(String::new(), |p| format!("round {}", p.round))
    );
    if let Some(t) = p.map(|p| p.throughput_bps).filter(|t| *t > 0.0) {
        msg += &format!("  {}", Rate(t));
    }
    msg += &format!("  left {}", Bytes(left));
    if let Some(eta) = p.and_then(|p| p.eta_s) {
        msg += &format!("  ETA {eta:.1} s");
    }
    if let Some(t) = p.map(|p| p.throttle_pct).filter(|t| *t > 0) {
        msg += &format!("  throttle {t}%");
    }
    bar.set_message(msg);
}
