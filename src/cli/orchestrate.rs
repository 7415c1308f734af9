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
        /// Migrations of this drain at once [default: the node's limit].
        #[arg(long)]
        max_concurrent: Option<u32>,
        /// Move what fits when the other nodes cannot hold every VM.
        #[arg(long)]
        allow_partial: bool,
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

/// A VM and the node it runs on, as `vm list --json` prints it.
#[derive(Serialize)]
struct VmOnNode<'a> {
    #[serde(flatten)]
    vm: &'a VmView,
    node: &'a str,
}

/// `ferry vm ...`
pub fn vm(cmd: VmCommand, cluster: &ClusterArg) -> Result<ExitCode> {
    let ctx = Ctx::new(cluster)?;
    match cmd {
        VmCommand::List { out } => {
            let mut all = Vec::new();
            for n in &ctx.cluster.nodes {
                match ctx.run(ctx.peers.vms(n)) {
                    Ok(vms) => all.extend(vms.into_iter().map(|v| (n.name.as_str(), v))),
                    Err(e) => eprintln!("warning: {e}"),
                }
            }
            if out.json {
                let rows: Vec<VmOnNode> =
                    all.iter().map(|(node, vm)| VmOnNode { vm, node }).collect();
                print_json(&rows);
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "{:<16} {:<8} {:<5} {:>10} {:<14} {:<12} DIRTY RATE",
                "VM", "NODE", "GUEST", "MEMORY", "STATE", "WORKLOAD"
            );
            for (node, v) in &all {
                println!(
                    "{:<16} {:<8} {:<5} {:>10} {:<14} {:<12} {}",
                    v.spec.name,
                    node,
                    v.spec.guest.to_string(),
                    Bytes(v.spec.memory).to_string(),
                    name_of(v.state),
                    v.spec.workload.to_string(),
                    Rate(v.spec.dirty_rate as f64)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        VmCommand::Create {
            name,
            node,
            memory,
            workload,
            dirty_rate,
            fill,
            guest,
            priority,
            preferred_owners,
            image,
            seed,
            out,
        } => {
            let n = ctx.node(&node)?;
            let image = image.map(|p| std::path::absolute(&p)).transpose()?;
            let memory = match (memory, &image) {
                (Some(m), _) => Amount::Text(m),
                (None, None) => Amount::Text("1GiB".into()),
                (None, Some(p)) => Amount::Int(
                    std::fs::metadata(p)
                        .with_context(|| {
                            format!(
                                "reading the image's size (or give --memory): {}",
                                p.display()
                            )
                        })?
                        .len(),
                ),
            };
            let body = CreateVm {
                name: name.clone(),
                memory,
                workload,
                dirty_rate: dirty_rate.map(Amount::Text),
                fill,
                guest: Some(guest),
                priority,
                preferred_owners: (!preferred_owners.is_empty()).then_some(preferred_owners),
                image: image.map(|p| p.display().to_string()),
                seed,
            };
            let v = ctx.run(ctx.peers.create_vm(n, &body))?;
            if out.json {
                print_json(&v);
            } else {
                println!("VM {name} runs on node {node}");
            }
            Ok(ExitCode::SUCCESS)
        }
        VmCommand::Delete { name, force, out } => {
            let (n, _) = ctx.find_vm(&name)?;
            let v = ctx.run(ctx.peers.delete_vm(n, &name, force))?;
            if out.json {
                print_json(&v);
            } else {
                println!("VM {name} stopped and removed from node {}", n.name);
                if let Some(lost) = &v.lost {
                    println!("discarded: {lost}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

impl MigrateVmArgs {
    /// The flags as the API's migration parameters.
    fn params(&self) -> MigrationParams {
        let text = |v: &Option<String>| v.clone().map(Amount::Text);
        MigrationParams {
            channels: self.channels,
            codec: self.codec.clone(),
            max_bandwidth: text(&self.max_bandwidth),
            downtime_limit: text(&self.downtime_limit),
            verify: self.verify.clone(),
            auto_converge: self.auto_converge.clone().map(Switch::Text),
            completion_timeout: text(&self.completion_timeout),
            progress_timeout: text(&self.progress_timeout),
            peer_timeout: text(&self.peer_timeout),
            leave_paused: self.leave_paused.then_some(true),
        }
    }
}

/// `ferry migrate VM --to NODE`
pub fn migrate(a: MigrateVmArgs, cluster: &ClusterArg) -> Result<ExitCode> {
    let ctx = Ctx::new(cluster)?;
    ctx.node(&a.to)?;
    let (source, vm) = ctx.find_vm(&a.vm)?;
    let body = CreateMigration {
        vm: a.vm.clone(),
        target: a.to.clone(),
        params: a.params(),
    };
    let m = ctx.run(ctx.peers.migrate(source, &body))?;
    let id = m.id.clone();
    if a.wait.detach {
        if a.out.json {
            print_json(&m);
        } else {
            println!("{id}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!(
        "migrating {} from node {} to node {} ({id})",
        a.vm, source.name, a.to
    );
    let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr_with_hz(10));
    bar.set_style(bar_style());
    bar.set_prefix(a.vm.clone());
    let done = loop {
        let m = ctx.run(ctx.peers.migration(source, &id))?;
        if m.state.is_final() {
            break m;
        }
        show_migration(&bar, vm.spec.memory, &m);
        std::thread::sleep(Duration::from_millis(100));
    };
    bar.finish_and_clear();
    if a.out.json {
        print_json(&done);
    } else {
        print_migration_end(&done, &source.name);
    }
    Ok(match done.state {
        MigrationState::Completed => ExitCode::SUCCESS,
        MigrationState::Unresolved => ExitCode::from(3),
        _ => ExitCode::from(1),
    })
}

/// One line on how migration `m` from node `source` ended.
fn print_migration_end(m: &MigrationView, source: &str) {
    match (&m.state, &m.report) {
        (MigrationState::Completed, Some(r)) => println!(
            "{} runs on node {}: {} in {:.0} ms, downtime {:.1} ms, {} rounds, {} on the wire",
            m.vm,
            m.target,
            Bytes(r.memory_bytes),
            r.total_ms,
            r.downtime_ms,
            r.rounds,
            Bytes(r.wire_bytes)
        ),
        (state, _) => println!(
            "migration {} {}: {}; {} runs on node {}",
            m.id,
            name_of(state),
            m.error.as_deref().unwrap_or("no reason given"),
            m.vm,
            if *state == MigrationState::Unresolved {
                "(unresolved: see the agents)"
            } else if *state == MigrationState::Completed {
                &m.target
            } else {
                source
            }
        ),
    }
}

/// `ferry resolve`: settles an unresolved migration on its source node,
/// which first asks the target whether it runs the VM.
pub fn resolve(a: ResolveArgs, cluster: &ClusterArg) -> Result<ExitCode> {
    let ctx = Ctx::new(cluster)?;
    let mut source = None;
    for n in &ctx.cluster.nodes {
        match ctx.run(ctx.peers.migration(n, &a.id)) {
            Ok(m) if m.direction == ferry::agent::Direction::Outgoing => {
                source = Some(n);
                break;
            }
            Ok(_) | Err(PeerError::Api { status: 404, .. }) => continue,
            Err(e) => eprintln!("warning: {e}"),
        }
    }
    let Some(source) = source else {
        bail!(
            "no reachable node of {} sent migration {:?}",
            ctx.cluster.path.display(),
            a.id
        );
    };
    let body = Resolve {
        run_on: a.run_on.clone(),
        force: a.force,
    };
    let m = ctx.run(ctx.peers.resolve(source, &a.id, &body))?;
    if a.out.json {
        print_json(&m);
    } else {
        let node = if a.run_on == "source" {
            &m.source
        } else {
            &m.target
        };
        println!(
            "migration {} settled: {} runs on node {node} ({})",
            a.id,
            m.vm,
            m.resolution.as_ref().map_or("", |r| r.checked.as_str())
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `ferry node status`: every node's view, or why it did not answer.
fn status(ctx: &Ctx, out: &Output) {
    let views: Vec<_> = ctx
        .cluster
        .nodes
        .iter()
        .map(|n| (n, ctx.run(ctx.peers.node(n))))
        .collect();
    if out.json {
        let all: Vec<Value> = views
            .iter()
            .map(|(n, v)| match v {
                Ok(v) => json!(v),
                Err(e) => json!({ "name": n.name, "state": "unreachable", "error": e.to_string() }),
            })
            .collect();
        print_json(&all);
        return;
    }
    println!(
        "{:<8} {:<12} {:>21} {:>4} {:>9} {:>7}",
        "NODE", "STATE", "MEMORY USED", "VMS", "IN FLIGHT", "QUEUED"
    );
    for (n, v) in &views {
        let Ok(v) = v else {
            println!("{:<8} {:<12}", n.name, "unreachable");
            continue;
        };
        let used = format!("{} / {}", Bytes(v.memory_used), Bytes(v.memory_capacity));
        println!(
            "{:<8} {:<12} {:>21} {:>4} {:>9} {:>7}",
            v.name,
            name_of(v.state),
            used,
            v.vms.len(),
            v.migrations_in_flight,
            v.migrations_queued
        );
    }
}

/// `ferry node ...`
pub fn node(cmd: NodeCommand, cluster: &ClusterArg) -> Result<ExitCode> {
    let ctx = Ctx::new(cluster)?;
    match cmd {
        NodeCommand::Status { out } => {
            status(&ctx, &out);
            Ok(ExitCode::SUCCESS)
        }
        NodeCommand::Drain {
            node,
            max_concurrent,
            allow_partial,
            wait,
            out,
        } => {
            let n = ctx.node(&node)?;
            let body = Drain {
                max_concurrent,
                allow_partial: Some(allow_partial),
                request_id: Some(request_id()),
            };
            let op = start_op(&ctx, n, "drain", &body)?;
            follow(&ctx, n, op, &wait, &out)
        }
        NodeCommand::Resume {
            node,
            failback,
            clear_quarantine,
            wait,
            out,
        } => {
            let n = ctx.node(&node)?;
            let body = Resume {
                failback: Some(failback),
                clear_quarantine: clear_quarantine.then_some(true),
                request_id: Some(request_id()),
            };
            let op = start_op(&ctx, n, "resume", &body)?;
            follow(&ctx, n, op, &wait, &out)
        }
        NodeCommand::Remove { node, force, out } => remove(&ctx, &node, force, &out),
    }
}

/// The longest a command waits for etcd to list the nodes that joined.
const ETCD_READ: std::time::Duration = std::time::Duration::from_secs(3);

/// A key for one command's request, unique enough for one cluster.
fn request_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("cli-{}-{nanos}", std::process::id())
}

/// Asks node `n` (through its agent, which hands it to the coordinator)
/// for `action`; `body` carries a request id, so an answer lost on the
/// way (503, or no answer) is asked for again, up to 3 times a second
/// apart, without starting a second operation.
fn start_op(
    ctx: &Ctx,
    n: &NodeSpec,
    action: &str,
    body: &impl serde::Serialize,
) -> Result<OperationView> {
    let mut tries = 0;
    loop {
        match ctx.run(ctx.peers.act_on(n, &n.name, action, body)) {
            Err(PeerError::Api { status: 503, .. } | PeerError::Unreachable { .. })
                if tries < 3 =>
            {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
            answer => return Ok(answer?),
        }
    }
}

/// `ferry node remove`: asked of the first other node whose agent answers.
fn remove(ctx: &Ctx, node: &str, force: bool, out: &Output) -> Result<ExitCode> {
    for n in ctx.cluster.nodes.iter().filter(|n| n.name != node) {
        match ctx.run(ctx.peers.remove_node(n, node, force)) {
            Ok(r) => {
                if out.json {
                    print_json(&r);
                } else {
                    println!("node {} removed from the cluster", r.name);
                    if !r.discarded_vms.is_empty() {
                        println!("discarded VM records: {}", r.discarded_vms.join(", "));
                    }
                    println!("{}", r.note);
                }
                return Ok(ExitCode::SUCCESS);
            }
            Err(e @ PeerError::Api { .. }) => return Err(e.into()),
            Err(e) => eprintln!("warning: {e}"),
        }
    }
    bail!("no other node's agent answered")
}

/// Prints operation `op` (or its id with `--detach`), waiting for it first.
fn follow(
    ctx: &Ctx,
    node: &NodeSpec,
    op: OperationView,
    wait: &Wait,
    out: &Output,
) -> Result<ExitCode> {
    if wait.detach {
        if out.json {
            print_json(&op);
        } else {
            println!("{}", op.id);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let done = watch_op(ctx, node, op)?;
    if out.json {
        print_json(&done);
    } else {
        print_steps(&done);
        println!(
            "{} of node {} {}{}",
            name_of(done.kind),
            node.name,
            name_of(done.state),
            done.error
                .as_ref()
                .map_or(String::new(), |e| format!(" ({e})"))
        );
    }
    Ok(if done.state == OpState::Completed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

pub(crate) fn print_steps(op: &OperationView) {
    for s in &op.steps {
        println!(
            "  {:<16} {:>10}  {} → {}  {}{}",
            s.vm,
            Bytes(s.memory).to_string(),
            s.source,
            if s.target.is_empty() { "-" } else { &s.target },
            s.state,
            s.error.as_ref().map_or(String::new(), |e| format!(": {e}"))
        );
    }
}

fn step_ended(state: &str) -> bool {
    !matches!(state, "planned" | "queued" | "running")
}

/// Waits for operation `op` on `node` with bars: overall, and one per
/// migration in flight. Returns its final record.
pub(crate) fn watch_op(ctx: &Ctx, node: &NodeSpec, op: OperationView) -> Result<OperationView> {
    let id = op.id.clone();
    let mp = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(10));
    let total = op.steps.len() as u64;
    let overall = mp.add(ProgressBar::new(total.max(1)));
    overall.set_style(bar_style());
    overall.set_prefix(format!("{} {}", name_of(op.kind), node.name));
    let mut bars: HashMap<String, ProgressBar> = HashMap::new();
    let done = loop {
        let op = ctx.run(ctx.peers.operation(node, &id))?;
        let finished = op.steps.iter().filter(|s| step_ended(&s.state)).count() as u64;
        overall.set_position(finished);
        overall.set_message(match op.params["command"].as_str() {
            Some(cmd) => format!("running {cmd:?}"),
            None => format!("{finished}/{total} VMs"),
        });
        for s in &op.steps {
            match (s.state.as_str(), &s.migration_id) {
                ("running", Some(mid)) => {
                    let source = ctx.cluster.node(&s.source).unwrap_or(node);
                    let Ok(m) = ctx.run(ctx.peers.migration(source, mid)) else {
                        continue;
                    };
                    let bar = bars.entry(s.vm.clone()).or_insert_with(|| {
                        let b = mp.add(ProgressBar::new(1));
                        b.set_style(bar_style());
                        b.set_prefix(format!("{} → {}", s.vm, s.target));
                        b
                    });
                    show_migration(bar, s.memory, &m);
                }
                (state, _) if step_ended(state) => {
                    if let Some(b) = bars.remove(&s.vm) {
                        b.finish_and_clear();
                        mp.remove(&b);
                    }
                }
                _ => {}
            }
        }
        if op.state != OpState::Running {
            break op;
        }
        std::thread::sleep(Duration::from_millis(150));
    };
    for (_, b) in bars {
        b.finish_and_clear();
    }
    overall.finish_and_clear();
    Ok(done)
}

/// " in 4.21 s": an ended operation's time from its start to its end, or
/// nothing before it ends.
pub(crate) fn took(op: &OperationView) -> String {
    match op.finished_at_ms {
        Some(end) if end >= op.started_at_ms => {
            format!(" in {:.2} s", (end - op.started_at_ms) as f64 / 1000.0)
        }
        _ => String::new(),
    }
}

/// `ferry agent stop --node NODE [--force]`: asks the node's agent to stop.
pub fn agent_stop(node: &str, force: bool, json: bool, cluster: &ClusterArg) -> Result<ExitCode> {
    let ctx = Ctx::new(cluster)?;
    let n = ctx.node(node)?;
    let v = ctx.run(ctx.peers.stop(n, &Stop { force }))?;
    if json {
        print_json(&v);
        return Ok(ExitCode::SUCCESS);
    }
    let vms = v.vms.join(", ");
    match (force, v.vms.is_empty()) {
        (_, true) => println!("node {node} hosts nothing: its agent stops"),
        (false, false) => println!(
            "node {node} is stopping: moving {vms} to the other nodes; its agent exits once it hosts nothing"
        ),
        (true, false) => println!("node {node} stops now with force, discarding {vms}"),
    }
    Ok(ExitCode::SUCCESS)
}
