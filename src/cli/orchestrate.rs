//! The orchestrator's commands: `ferry vm`, `ferry migrate`, `ferry node`.
//! Each reads the cluster file, talks to the agents' control APIs, and for
//! long operations waits with progress bars (or returns the id with
//! `--detach`); `--json` prints the final record as one line on stdout.

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use ferry::agent::peer::{PeerError, Peers};
use ferry::agent::{Cluster, NodeSpec};
use ferry::units::{Bytes, Rate};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use reqwest::Method;
use serde_json::{json, Map, Value};
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
        /// Guest memory (e.g. 512MiB, 4GiB).
        #[arg(long, default_value = "1GiB")]
        memory: String,
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
        #[command(flatten)]
        wait: Wait,
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

struct Ctx {
    cluster: Cluster,
    peers: Peers,
    rt: tokio::runtime::Runtime,
}

impl Ctx {
    fn new(cluster: &ClusterArg) -> Result<Self> {
        let cluster = Cluster::load(&cluster.cluster).map_err(|e| crate::usage(e.to_string()))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(Self {
            peers: Peers::new(&cluster),
            cluster,
            rt,
        })
    }

    fn node(&self, name: &str) -> Result<&NodeSpec> {
        self.cluster.require_node(name).map_err(crate::usage)
    }

    fn call(
        &self,
        node: &NodeSpec,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, PeerError> {
        self.rt.block_on(self.peers.call(node, method, path, body))
    }

    /// The node that runs `vm`.
    fn find_vm(&self, vm: &str) -> Result<(&NodeSpec, Value)> {
        for n in &self.cluster.nodes {
            match self.call(n, Method::GET, &format!("/v1/vms/{vm}"), None) {
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

fn print_json(v: &Value) {
    println!(
        "{}",
        serde_json::to_string(v).expect("JSON values serialize")
    );
}

fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template("{prefix:>14} [{bar:28}] {msg}")
        .expect("valid template")
        .progress_chars("=> ")
}

/// Shows migration record `m` of a VM of `memory` bytes on `bar`: guest
/// bytes sent of the memory (what is left counts the dirty pages too), the
/// phase, round, rate, ETA and throttle.
fn show_migration(bar: &ProgressBar, memory: u64, m: &Value) {
    let p = &m["progress"];
    let left = p["bytes_left"].as_u64().unwrap_or(0);
    bar.set_length(memory.max(1));
    bar.set_position(memory.saturating_sub(left));
    if m["state"] == "queued" {
        bar.set_message("queued");
        return;
    }
    let mut msg = format!(
        "{} {}",
        m["phase"].as_str().or(m["state"].as_str()).unwrap_or(""),
        p["round"]
            .as_u64()
            .map_or(String::new(), |r| format!("round {r}"))
    );
    if let Some(t) = p["throughput_bps"].as_f64().filter(|t| *t > 0.0) {
        msg += &format!("  {}", Rate(t));
    }
    msg += &format!("  left {}", Bytes(left));
    if let Some(eta) = p["eta_s"].as_f64() {
        msg += &format!("  ETA {eta:.1} s");
    }
    if let Some(t) = p["throttle_pct"].as_u64().filter(|t| *t > 0) {
        msg += &format!("  throttle {t}%");
    }
    bar.set_message(msg);
}

/// `ferry vm ...`
pub fn vm(cmd: VmCommand, cluster: &ClusterArg) -> Result<ExitCode> {
    let ctx = Ctx::new(cluster)?;
    match cmd {
        VmCommand::List { out } => {
            let mut all = Vec::new();
            for n in &ctx.cluster.nodes {
                match ctx.call(n, Method::GET, "/v1/vms", None) {
                    Ok(Value::Array(vms)) => {
                        for mut v in vms {
                            v["node"] = json!(n.name);
                            all.push(v);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => eprintln!("warning: {e}"),
                }
            }
            if out.json {
                print_json(&Value::Array(all));
            } else {
                println!(
                    "{:<16} {:<8} {:<5} {:>10} {:<14} {:<12} DIRTY RATE",
                    "VM", "NODE", "GUEST", "MEMORY", "STATE", "WORKLOAD"
                );
                for v in &all {
                    println!(
                        "{:<16} {:<8} {:<5} {:>10} {:<14} {:<12} {}",
                        v["name"].as_str().unwrap_or(""),
                        v["node"].as_str().unwrap_or(""),
                        v["guest"].as_str().unwrap_or(""),
                        Bytes(v["memory"].as_u64().unwrap_or(0)).to_string(),
                        v["state"].as_str().unwrap_or(""),
                        v["workload"].as_str().unwrap_or(""),
                        Rate(v["dirty_rate"].as_f64().unwrap_or(0.0))
                    );
                }
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
            out,
        } => {
            let n = ctx.node(&node)?;
            let mut body = json!({ "name": name, "memory": memory, "guest": guest });
            for (k, v) in [
                ("workload", workload),
                ("dirty_rate", dirty_rate),
                ("fill", fill),
            ] {
                if let Some(v) = v {
                    body[k] = json!(v);
                }
            }
            let v = ctx.call(n, Method::POST, "/v1/vms", Some(&body))?;
            if out.json {
                print_json(&v);
            } else {
                println!("VM {name} runs on node {node}");
            }
            Ok(ExitCode::SUCCESS)
        }
        VmCommand::Delete { name, force, out } => {
            let (n, _) = ctx.find_vm(&name)?;
            let query = if force { "?force=true" } else { "" };
            let v = ctx.call(n, Method::DELETE, &format!("/v1/vms/{name}{query}"), None)?;
            if out.json {
                print_json(&v);
            } else {
                println!("VM {name} stopped and removed from node {}", n.name);
                if let Some(lost) = v["lost"].as_str() {
                    println!("discarded: {lost}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `ferry migrate VM --to NODE`
pub fn migrate(a: MigrateVmArgs, cluster: &ClusterArg) -> Result<ExitCode> {
    let ctx = Ctx::new(cluster)?;
    ctx.node(&a.to)?;
    let (source, vm) = ctx.find_vm(&a.vm)?;
    let memory = vm["memory"].as_u64().unwrap_or(0);
    let mut body = Map::new();
    body.insert("vm".into(), json!(a.vm));
    body.insert("target".into(), json!(a.to));
    if let Some(c) = a.channels {
        body.insert("channels".into(), json!(c));
    }
    for (k, v) in [
        ("codec", &a.codec),
        ("max_bandwidth", &a.max_bandwidth),
        ("downtime_limit", &a.downtime_limit),
        ("verify", &a.verify),
        ("auto_converge", &a.auto_converge),
        ("completion_timeout", &a.completion_timeout),
        ("progress_timeout", &a.progress_timeout),
        ("peer_timeout", &a.peer_timeout),
    ] {
        if let Some(v) = v {
            body.insert(k.into(), json!(v));
        }
    }
    if a.leave_paused {
        body.insert("leave_paused".into(), json!(true));
    }
    let m = ctx.call(
        source,
        Method::POST,
        "/v1/migrations",
        Some(&Value::Object(body)),
    )?;
    let id = m["id"]
        .as_str()
        .ok_or_else(|| anyhow!("the agent gave no migration id"))?
        .to_string();
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
        let m = ctx.call(source, Method::GET, &format!("/v1/migrations/{id}"), None)?;
        let state = m["state"].as_str().unwrap_or("").to_string();
        if state != "queued" && state != "running" {
            break m;
        }
        show_migration(&bar, memory, &m);
        std::thread::sleep(Duration::from_millis(100));
    };
    bar.finish_and_clear();
    let state = done["state"].as_str().unwrap_or("");
    if a.out.json {
        print_json(&done);
    } else {
        let r = &done["report"];
        match state {
            "completed" => println!(
                "{} runs on node {}: {} in {:.0} ms, downtime {:.1} ms, {} rounds, {} on the wire",
                a.vm,
                a.to,
                Bytes(r["memory_bytes"].as_u64().unwrap_or(0)),
                r["total_ms"].as_f64().unwrap_or(0.0),
                r["downtime_ms"].as_f64().unwrap_or(0.0),
                r["rounds"].as_u64().unwrap_or(0),
                Bytes(r["wire_bytes"].as_u64().unwrap_or(0))
            ),
            _ => println!(
                "migration {id} {state}: {}; {} runs on node {}",
                done["error"].as_str().unwrap_or("no reason given"),
                a.vm,
                if state == "unresolved" {
                    "(unresolved: see the agents)"
                } else {
                    &source.name
                }
            ),
        }
    }
    Ok(match state {
        "completed" => ExitCode::SUCCESS,
        "unresolved" => ExitCode::from(3),
        _ => ExitCode::from(1),
    })
}

/// `ferry resolve`: settles an unresolved migration on its source node,
/// which first asks the target whether it runs the VM.
pub fn resolve(a: ResolveArgs, cluster: &ClusterArg) -> Result<ExitCode> {
    let ctx = Ctx::new(cluster)?;
    let mut source = None;
    for n in &ctx.cluster.nodes {
        match ctx.call(n, Method::GET, &format!("/v1/migrations/{}", a.id), None) {
            Ok(m) if m["direction"] == "outgoing" => {
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
    let body = json!({"run_on": a.run_on, "force": a.force});
    let m = ctx.call(
        source,
        Method::POST,
        &format!("/v1/migrations/{}/resolve", a.id),
        Some(&body),
    )?;
    if a.out.json {
        print_json(&m);
    } else {
        let node = if a.run_on == "source" {
            &m["source"]
        } else {
            &m["target"]
        };
        println!(
            "migration {} settled: {} runs on node {} ({})",
            a.id,
            m["vm"].as_str().unwrap_or("?"),
            node.as_str().unwrap_or("?"),
            m["resolution"]["checked"].as_str().unwrap_or("")
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `ferry node ...`
pub fn node(cmd: NodeCommand, cluster: &ClusterArg) -> Result<ExitCode> {
    let ctx = Ctx::new(cluster)?;
    match cmd {
        NodeCommand::Status { out } => {
            let mut all = Vec::new();
            for n in &ctx.cluster.nodes {
                let v = match ctx.call(n, Method::GET, "/v1/node", None) {
                    Ok(v) => v,
                    Err(e) => {
                        json!({ "name": n.name, "state": "unreachable", "error": e.to_string() })
                    }
                };
                all.push(v);
            }
            if out.json {
                print_json(&Value::Array(all));
            } else {
                println!(
                    "{:<8} {:<12} {:>21} {:>4} {:>9} {:>7}",
                    "NODE", "STATE", "MEMORY USED", "VMS", "IN FLIGHT", "QUEUED"
                );
                for v in &all {
                    let used = format!(
                        "{} / {}",
                        Bytes(v["memory_used"].as_u64().unwrap_or(0)),
                        Bytes(v["memory_capacity"].as_u64().unwrap_or(0))
                    );
                    println!(
                        "{:<8} {:<12} {:>21} {:>4} {:>9} {:>7}",
                        v["name"].as_str().unwrap_or(""),
                        v["state"].as_str().unwrap_or(""),
                        used,
                        v["vms"].as_array().map_or(0, Vec::len),
                        v["migrations_in_flight"].as_u64().unwrap_or(0),
                        v["migrations_queued"].as_u64().unwrap_or(0)
                    );
                }
            }
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
            let mut body = json!({ "allow_partial": allow_partial });
            if let Some(m) = max_concurrent {
                body["max_concurrent"] = json!(m);
            }
            let op = ctx.call(n, Method::POST, "/v1/node/drain", Some(&body))?;
            follow(&ctx, n, op, &wait, &out)
        }
        NodeCommand::Resume {
            node,
            failback,
            wait,
            out,
        } => {
            let n = ctx.node(&node)?;
            let op = ctx.call(
                n,
                Method::POST,
                "/v1/node/resume",
                Some(&json!({ "failback": failback })),
            )?;
            follow(&ctx, n, op, &wait, &out)
        }
    }
}

/// Prints operation `op` (or its id with `--detach`), waiting for it first.
fn follow(ctx: &Ctx, node: &NodeSpec, op: Value, wait: &Wait, out: &Output) -> Result<ExitCode> {
    if wait.detach {
        if out.json {
            print_json(&op);
        } else {
            println!("{}", op["id"].as_str().unwrap_or(""));
        }
        return Ok(ExitCode::SUCCESS);
    }
    let done = watch_op(ctx, node, op)?;
    let state = done["state"].as_str().unwrap_or("");
    if out.json {
        print_json(&done);
    } else {
        print_steps(&done);
        println!(
            "{} of node {} {state}{}",
            done["kind"].as_str().unwrap_or("operation"),
            node.name,
            done["error"]
                .as_str()
                .map_or(String::new(), |e| format!(" ({e})"))
        );
    }
    Ok(if state == "completed" {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn print_steps(op: &Value) {
    for s in op["steps"].as_array().cloned().unwrap_or_default() {
        println!(
            "  {:<16} {:>10}  {} → {}  {}{}",
            s["vm"].as_str().unwrap_or(""),
            Bytes(s["memory"].as_u64().unwrap_or(0)).to_string(),
            s["source"].as_str().unwrap_or(""),
            s["target"]
                .as_str()
                .filter(|t| !t.is_empty())
                .unwrap_or("-"),
            s["state"].as_str().unwrap_or(""),
            s["error"]
                .as_str()
                .map_or(String::new(), |e| format!(": {e}"))
        );
    }
}

/// Waits for operation `op` on `node` with bars: overall, and one per
/// migration in flight. Returns its final record.
fn watch_op(ctx: &Ctx, node: &NodeSpec, op: Value) -> Result<Value> {
    let id = op["id"]
        .as_str()
        .context("the agent gave no operation id")?
        .to_string();
    let mp = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(10));
    let total = op["steps"].as_array().map_or(0, Vec::len) as u64;
    let overall = mp.add(ProgressBar::new(total.max(1)));
    overall.set_style(bar_style());
    overall.set_prefix(format!(
        "{} {}",
        op["kind"].as_str().unwrap_or(""),
        node.name
    ));
    let mut bars: HashMap<String, ProgressBar> = HashMap::new();
    let done = loop {
        let op = ctx.call(node, Method::GET, &format!("/v1/operations/{id}"), None)?;
        let steps = op["steps"].as_array().cloned().unwrap_or_default();
        let finished = steps
            .iter()
            .filter(|s| !matches!(s["state"].as_str(), Some("planned" | "queued" | "running")))
            .count() as u64;
        overall.set_position(finished);
        overall.set_message(match op["params"]["command"].as_str() {
            Some(cmd) => format!("running {cmd:?}"),
            None => format!("{finished}/{total} VMs"),
        });
        for s in &steps {
            let vm = s["vm"].as_str().unwrap_or("").to_string();
            let state = s["state"].as_str().unwrap_or("");
            match (state, s["migration_id"].as_str()) {
                ("running", Some(mid)) => {
                    let source = ctx
                        .cluster
                        .node(s["source"].as_str().unwrap_or(""))
                        .unwrap_or(node);
                    let Ok(m) =
                        ctx.call(source, Method::GET, &format!("/v1/migrations/{mid}"), None)
                    else {
                        continue;
                    };
                    let bar = bars.entry(vm.clone()).or_insert_with(|| {
                        let b = mp.add(ProgressBar::new(1));
                        b.set_style(bar_style());
                        b.set_prefix(format!("{vm} → {}", s["target"].as_str().unwrap_or("")));
                        b
                    });
                    show_migration(bar, s["memory"].as_u64().unwrap_or(0), &m);
                }
                (s, _) if !matches!(s, "planned" | "queued" | "running") => {
                    if let Some(b) = bars.remove(&vm) {
                        b.finish_and_clear();
                        mp.remove(&b);
                    }
                }
                _ => {}
            }
        }
        if op["state"] != "running" {
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

/// `ferry cluster ...`
#[derive(Subcommand, Debug)]
pub enum ClusterCommand {
    /// Roll an update through the cluster, one node at a time: drain it, run
    /// the command on it through its agent's update_hook, resume it with
    /// failback. Stops at the first failure, leaving that node paused.
    Update {
        /// The update command, given to each node's update_hook.
        #[arg(long, value_name = "COMMAND")]
        run: String,
        /// Print the plan (the order, where each VM would go) and move nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        out: Output,
    },
}

/// One node's part of a rolling update: drain, update, resume with failback.
fn update_node(ctx: &Ctx, n: &NodeSpec, run: &str, entry: &mut Value) -> Result<(), String> {
    let steps: [(&str, &str, Value); 3] = [
        ("drain", "/v1/node/drain", json!({})),
        ("update", "/v1/node/update", json!({ "command": run })),
        ("resume", "/v1/node/resume", json!({ "failback": true })),
    ];
    for (what, path, body) in steps {
        eprintln!("node {}: {what}", n.name);
        let op = ctx
            .call(n, Method::POST, path, Some(&body))
            .map_err(|e| format!("the {what}: {e}"))?;
        let op = watch_op(ctx, n, op).map_err(|e| format!("the {what}: {e}"))?;
        entry[what] = op.clone();
        if op["state"] != "completed" {
            return Err(format!(
                "the {what} {}: {}",
                op["state"].as_str().unwrap_or(""),
                op["error"].as_str().unwrap_or("")
            ));
        }
    }
    Ok(())
}

/// `ferry cluster ...`
pub fn cluster(cmd: ClusterCommand, cluster: &ClusterArg) -> Result<ExitCode> {
    let ctx = Ctx::new(cluster)?;
    let ClusterCommand::Update { run, dry_run, out } = cmd;
    let mut states = Vec::new();
    for n in &ctx.cluster.nodes {
        let v = ctx
            .call(n, Method::GET, "/v1/node", None)
            .with_context(|| {
                format!(
                    "a rolling update needs every node; node {} does not answer",
                    n.name
                )
            })?;
        states.push(v);
    }
    if dry_run {
        let plan = plan_update(&ctx, &states);
        if out.json {
            print_json(&json!({ "command": run, "plan": plan }));
        } else {
            println!("rolling update {run:?}, one node at a time:");
            for (i, step) in plan.iter().enumerate() {
                println!(
                    "{}. node {}: drain, run the command, resume with failback",
                    i + 1,
                    step["node"].as_str().unwrap_or("")
                );
                for m in step["moves"].as_array().cloned().unwrap_or_default() {
                    println!(
                        "     {:<16} {:>10} → {}",
                        m["vm"].as_str().unwrap_or(""),
                        Bytes(m["memory"].as_u64().unwrap_or(0)).to_string(),
                        m["target"].as_str().unwrap_or("")
                    );
                }
                for m in step["unplaced"].as_array().cloned().unwrap_or_default() {
                    println!(
                        "     {:<16} no node has room: the drain would be refused",
                        m["vm"].as_str().unwrap_or("")
                    );
                }
            }
        }
        let blocked = plan
            .iter()
            .any(|p| p["unplaced"].as_array().is_some_and(|u| !u.is_empty()));
        return Ok(if blocked {
            ExitCode::from(1)
        } else {
            ExitCode::SUCCESS
        });
    }
    let mut report = Vec::new();
    let mut failure: Option<(String, String)> = None;
    for n in &ctx.cluster.nodes {
        let mut entry = json!({ "node": n.name });
        let result = update_node(&ctx, n, &run, &mut entry);
        report.push(entry);
        if let Err(e) = result {
            failure = Some((n.name.clone(), e));
            break;
        }
    }
    if out.json {
        let mut v = json!({
            "command": run,
            "state": if failure.is_some() { "failed" } else { "completed" },
            "nodes": report,
        });
        if let Some((node, error)) = &failure {
            v["stopped_at"] = json!(node);
            v["error"] = json!(error);
        }
        print_json(&v);
    } else {
        for e in &report {
            let mut line = format!("node {}:", e["node"].as_str().unwrap_or(""));
            if let Some(d) = e.get("drain") {
                line += &format!(
                    " drained ({} VMs)",
                    d["steps"].as_array().map_or(0, Vec::len)
                );
            }
            if let Some(u) = e.get("update") {
                let code = u["update"]["exit_code"]
                    .as_i64()
                    .map_or("abnormally".to_string(), |c| c.to_string());
                line += &format!(
                    ", update exited {code} in {} ms",
                    u["update"]["duration_ms"].as_u64().unwrap_or(0)
                );
            }
            if let Some(r) = e.get("resume") {
                let back = r["steps"].as_array().map_or(0, |s| {
                    s.iter().filter(|s| s["state"] == "completed").count()
                });
                line += &format!(", resumed ({back} VMs back)");
            }
            println!("{line}");
        }
        match &failure {
            None => println!("rolling update completed on {} nodes", report.len()),
            Some((node, e)) => {
                println!("rolling update stopped at node {node}, which is left paused: {e}")
            }
        }
    }
    Ok(if failure.is_some() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// Where each node's VMs would go when it is drained in turn, the others as
/// they are now (each node's VMs come back before the next is drained).
fn plan_update(ctx: &Ctx, states: &[Value]) -> Vec<Value> {
    let nodes = || ctx.cluster.nodes.iter().zip(states);
    nodes()
        .map(|(n, st)| {
            let vms: Vec<(String, u64)> = st["vms"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .map(|v| {
                    let name = v["name"].as_str().unwrap_or("").to_string();
                    (name, v["memory"].as_u64().unwrap_or(0))
                })
                .collect();
            let free: Vec<(String, u64)> = nodes()
                .filter(|(o, s)| o.name != n.name && s["state"] == "active")
                .map(|(o, s)| {
                    let cap = s["memory_capacity"].as_u64().unwrap_or(0);
                    let used = s["memory_used"].as_u64().unwrap_or(cap);
                    (o.name.clone(), cap.saturating_sub(used))
                })
                .collect();
            let (placed, left) = ferry::agent::place(&vms, &free);
            let memory = |vm: &str| vms.iter().find(|(v, _)| v == vm).map_or(0, |(_, m)| *m);
            json!({
                "node": n.name,
                "moves": placed
                    .iter()
                    .map(|(vm, t)| json!({ "vm": vm, "memory": memory(vm), "target": t }))
                    .collect::<Vec<_>>(),
                "unplaced": left
                    .iter()
                    .map(|(vm, m)| json!({ "vm": vm, "memory": m }))
                    .collect::<Vec<_>>(),
            })
        })
        .collect()
}

/// `ferry demo cluster`.
#[derive(Args, Debug)]
pub struct DemoClusterArgs {
    /// VMs to create on node a.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=32))]
    pub vms: u32,
    /// Memory of each VM.
    #[arg(long, default_value = "256MiB")]
    pub memory: String,
    /// Bytes each VM writes per second.
    #[arg(long, default_value = "50MB/s")]
    pub dirty_rate: String,
    /// The VMs' backend: sim (synthetic guests) or kvm (KVM guests; needs
    /// /dev/kvm).
    #[arg(long, default_value = "sim", value_parser = ["sim", "kvm"])]
    pub guest: String,
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Three agents in this process: create VMs on a, drain a, fail back.
pub fn demo_cluster(a: DemoClusterArgs) -> Result<ExitCode> {
    let dir = std::env::temp_dir().join(format!("ferry-demo-cluster-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    // A random token, though the agents listen on loopback only and for
    // seconds: the demo should not teach a guessable one.
    let token: String = (0..2)
        .map(|_| {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u32(std::process::id());
            format!("{:016x}", h.finish())
        })
        .collect();
    ferry::migration::auth::write_secret_file(&dir.join("cluster.token"), token.as_bytes())?;
    let mut text =
        "token_file = \"cluster.token\"\n# a demo on loopback: plain HTTP\ninsecure_api = true\n[defaults]\nmax_concurrent_migrations = 2\n".to_string();
    for name in ["a", "b", "c"] {
        text += &format!(
            "[[node]]\nname = \"{name}\"\ncontrol = \"127.0.0.1:{}\"\ndata = \"127.0.0.1:{}\"\nmemory_capacity = \"16GiB\"\n",
            free_port()?,
            free_port()?
        );
    }
    let file = dir.join("cluster.toml");
    std::fs::write(&file, &text)?;
    let result = (|| {
        let cluster = Cluster::load(&file).map_err(|e| anyhow!("{e}"))?;
        let cpu = ferry::cpu::CpuMeter::new();
        let rt = ferry::transport::runtime("ferry-agents", 2, &cpu)?;
        let agents = ["a", "b", "c"]
            .iter()
            .map(|n| rt.block_on(ferry::agent::serve_agent(cluster.clone(), n)))
            .collect::<std::io::Result<Vec<_>>>()?;
        eprintln!(
            "ferry demo cluster: agents a, b and c on loopback ({}), at most 2 migrations per node at once",
            file.display()
        );
        let ctx = Ctx::new(&ClusterArg {
            cluster: file.clone(),
        })?;
        let a_node = ctx.node("a")?.clone();
        for i in 1..=a.vms {
            let body = json!({ "name": format!("vm{i}"), "memory": a.memory, "workload": "hot:32MiB", "dirty_rate": a.dirty_rate, "guest": a.guest });
            ctx.call(&a_node, Method::POST, "/v1/vms", Some(&body))?;
        }
        let show = |title: &str| -> Result<()> {
            println!("\n{title}");
            node(
                NodeCommand::Status {
                    out: Output { json: false },
                },
                &ClusterArg {
                    cluster: file.clone(),
                },
            )?;
            Ok(())
        };
        let kind = if a.guest == "kvm" { "KVM" } else { "synthetic" };
        show(&format!(
            "{} {kind} VMs of {} each on node a, each writing {}:",
            a.vms, a.memory, a.dirty_rate
        ))?;
        println!("\n$ ferry node drain a");
        let op = ctx.call(&a_node, Method::POST, "/v1/node/drain", Some(&json!({})))?;
        let drained = watch_op(&ctx, &a_node, op)?;
        print_steps(&drained);
        println!(
            "drain of node a {}{}",
            drained["state"].as_str().unwrap_or(""),
            took(&drained)
        );
        show("after the drain:")?;
        println!("\n$ ferry node resume a --failback");
        let op = ctx.call(
            &a_node,
            Method::POST,
            "/v1/node/resume",
            Some(&json!({ "failback": true })),
        )?;
        let resumed = watch_op(&ctx, &a_node, op)?;
        print_steps(&resumed);
        println!(
            "resume of node a {}{}",
            resumed["state"].as_str().unwrap_or(""),
            took(&resumed)
        );
        show("after the failback:")?;
        for agent in agents {
            rt.block_on(agent.shutdown());
        }
        let ok = drained["state"] == "completed" && resumed["state"] == "completed";
        Ok::<_, anyhow::Error>(if ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        })
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// " in 4.21 s": an ended operation's time from its start to its end, or
/// nothing when the record lacks either.
fn took(op: &Value) -> String {
    match (op["started_at_ms"].as_u64(), op["finished_at_ms"].as_u64()) {
        (Some(a), Some(b)) if b >= a => format!(" in {:.2} s", (b - a) as f64 / 1000.0),
        _ => String::new(),
    }
}

/// `ferry agent stop --node NODE [--force]`: asks the node's agent to stop.
pub fn agent_stop(node: &str, force: bool, json: bool, cluster: &ClusterArg) -> Result<ExitCode> {
    let ctx = Ctx::new(cluster)?;
    let n = ctx.node(node)?;
    let v = ctx.call(
        n,
        Method::POST,
        "/v1/node/stop",
        Some(&json!({ "force": force })),
    )?;
    if json {
        print_json(&v);
        return Ok(ExitCode::SUCCESS);
    }
    let vms: Vec<&str> = v["vms"]
        .as_array()
        .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
        .unwrap_or_default();
    match (force, vms.is_empty()) {
        (_, true) => println!("node {node} hosts nothing: its agent stops"),
        (false, false) => println!(
            "node {node} is stopping: moving {} to the other nodes; its agent exits once it hosts nothing",
            vms.join(", ")
        ),
        (true, false) => println!(
            "node {node} stops now with force, discarding {}",
            vms.join(", ")
        ),
    }
    Ok(ExitCode::SUCCESS)
}
