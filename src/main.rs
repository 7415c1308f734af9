//! The `ferry` command line: the migration engine (`demo`, `send`, `receive`, `bench`, `image`), the node agent (`agent`) and the orchestrator's commands (`vm`, `migrate`, `node`, `cluster`).

use anyhow::{Context, Result};
use clap::Parser;
use ferry::cpu::CpuMeter;
use ferry::memory::{FillSpec, GuestMemory, Workload, WorkloadPattern};
use ferry::migration::{MigratableGuest, Outcome};
use ferry::transport::{migrate_over_loopback, ReceiverConfig, RunContext};
use ferry::units::{compact_size, Bytes, Rate};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

mod cli {
    pub mod analyze;
    pub mod args;
    pub mod bench;
    pub mod demo_cluster;
    pub mod hostile;
    pub mod local_etcd;
    pub mod orchestrate;
    pub mod progress;
    pub mod receive;
    pub mod rolling;
    pub mod send;
    pub mod sim;
    pub mod soak;
    pub mod update;
}
use cli::args::*;
use cli::bench::*;
use cli::orchestrate;
use cli::progress::*;

/// A usage error found after parsing: one line, exit status 2.
#[derive(Debug)]
struct UsageError(String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for UsageError {}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                e.exit();
            }
            // A bad flag or value: one line, exit status 2.
            // Clap's message ends at its first blank line; fold it into one line.
            let text = e.to_string();
            let line: Vec<&str> = text
                .lines()
                .map(str::trim)
                .take_while(|l| !l.is_empty())
                .collect();
            eprintln!("{}", line.join(" "));
            return ExitCode::from(2);
        }
    };
    // The demo and the benches run many sessions in-process: keep them quiet.
    let default_log = match cli.command {
        Command::Demo(_) | Command::Bench(_) => "warn",
        _ => "info",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_log));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    let result = match cli.command {
        Command::Demo(a) => demo(a),
        Command::Send(a) => cli::send::send(a),
        Command::Receive(a) => cli::receive::receive(a),
        Command::Bench(BenchCommand::Link(a)) => bench_link(a),
        Command::Bench(BenchCommand::Codecs(a)) => bench_codecs(a),
        Command::Bench(BenchCommand::Sweep(a)) => bench_sweep(a),
        Command::Bench(BenchCommand::Kvm(a)) => bench_kvm(a),
        Command::Bench(BenchCommand::Soak(a)) => cli::soak::soak(a),
        Command::Bench(BenchCommand::Hostile(a)) => cli::hostile::hostile(a),
        Command::Bench(BenchCommand::Sim(a)) => cli::sim::sim(a),
        Command::Image(a) => image(a),
        Command::TlsCert(a) => tls_cert(a),
        Command::Agent(a) => agent(a),
        Command::Vm(a) => orchestrate::vm(a.cmd, &a.cluster),
        Command::Migrate(a) => orchestrate::migrate(a.args, &a.cluster),
        Command::Resolve(a) => orchestrate::resolve(a.args, &a.cluster),
        Command::Node(a) => orchestrate::node(a.cmd, &a.cluster),
        Command::Cluster(a) => cli::update::cluster(a.cmd, &a.cluster),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.downcast_ref::<UsageError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}

fn agent(a: AgentArgs) -> Result<ExitCode> {
    if let Some(AgentCommand::Stop {
        node,
        force,
        cluster,
        json,
    }) = a.sub
    {
        return orchestrate::agent_stop(&node, force, json, &cluster);
    }
    let node = a
        .node
        .ok_or_else(|| usage("--node: which node of the cluster file to run"))?;
    let absolute = |p: Option<PathBuf>| p.map(|p| std::path::absolute(&p).unwrap_or(p));
    let join = ferry::agent::cluster::JoinNode {
        name: node.clone(),
        control: a.control,
        data: a.data,
        memory_capacity: a.memory_capacity,
        tls_cert: absolute(a.tls_cert),
        tls_key: absolute(a.tls_key),
    };
    let mut cluster =
        ferry::agent::Cluster::load_joining(&a.cluster, &join).map_err(|e| usage(e.to_string()))?;
    cluster
        .require_node(&node)
        .map_err(|e| usage(format!("--node: {e}")))?;
    if cluster.store.is_none() {
        return Err(usage(format!(
            "--cluster: {} names no etcd (`etcd = [\"host:port\", ...]`): agents keep the cluster's state there; standalone hosts use `ferry send`/`ferry receive`",
            a.cluster.display()
        )));
    }
    if let Some(dir) = a.state_dir {
        if let Some(n) = cluster.nodes.iter_mut().find(|n| n.name == node) {
            n.state_dir = dir;
        }
    }
    let cpu = CpuMeter::new();
    let rt = ferry::transport::runtime("ferry-agent", 2, &cpu)?;
    rt.block_on(async {
        let handle = ferry::agent::serve_agent_with(cluster, &node, a.fault)
            .await
            .with_context(|| format!("cannot start node {node}"))?;
        let scheme = if handle.node.cluster.insecure_api {
            "http"
        } else {
            "https"
        };
        eprintln!(
            "node {node} running: control API {scheme}://{}/v1, migrations on {}",
            handle.control_addr, handle.data_addr
        );
        tokio::select! {
            _ = wait_for_stop_signal() => {}
            _ = handle.node.stop.wait_asked() => {}
        }
        eprintln!(
            "stopping: moving node {node}'s VMs to the other nodes; it exits once it hosts nothing (`ferry agent stop --node {node} --force` stops now)"
        );
        // Further signals do not kill an agent that may hold a VM's only copy.
        tokio::spawn(async move {
            loop {
                wait_for_stop_signal().await;
                eprintln!("still stopping: the node's VMs are moving away (`ferry agent stop --force` stops now, discarding them)");
            }
        });
        match handle.drain_and_shutdown().await {
            ferry::agent::StopEnd::Empty => eprintln!("node {node} hosts nothing: stopped"),
            ferry::agent::StopEnd::Forced(vms) if vms.is_empty() => {
                eprintln!("node {node} stopped")
            }
            ferry::agent::StopEnd::Forced(vms) => {
                eprintln!("node {node} stopped with force; discarded: {}", vms.join(", "))
            }
        }
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Returns on SIGINT or SIGTERM.
async fn wait_for_stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn usage(msg: impl Into<String>) -> anyhow::Error {
    UsageError(msg.into()).into()
}

/// The workload asked for, or the default hot set (64 MiB, at most all memory).
fn workload_for(g: &GuestArgs, memory_bytes: u64) -> Result<WorkloadPattern> {
    match g.workload {
        None => Ok(WorkloadPattern::Hot {
            bytes: (64u64 << 20).min(memory_bytes),
        }),
        Some(WorkloadPattern::Hot { bytes }) if bytes > memory_bytes => Err(usage(format!(
            "--workload hot:{} is larger than the guest's {}",
            compact_size(bytes),
            compact_size(memory_bytes)
        ))),
        Some(w) => Ok(w),
    }
}

/// Guest memory from `--image` or `--memory` and `--fill`, and the content mix
/// its workload writes.
fn build_memory(m: &MemoryArgs, announce: bool) -> Result<(GuestMemory, FillSpec)> {
    match &m.image {
        Some(path) => {
            let mem = GuestMemory::from_image(path).map_err(|e| usage(format!("{e:#}")))?;
            if let Some(bytes) = m.memory {
                if bytes != mem.len_bytes() {
                    return Err(usage(format!(
                        "--memory {} disagrees with the image's size {} ({})",
                        bytes,
                        mem.len_bytes(),
                        path.display()
                    )));
                }
            }
            Ok((mem, FillSpec::default()))
        }
        None => {
            let bytes = m.memory.unwrap_or(1 << 30);
            let mem = GuestMemory::new(bytes).map_err(|e| usage(format!("--memory: {e}")))?;
            if announce {
                eprintln!("filling {} of guest memory...", Bytes(bytes));
            }
            m.fill.fill(&mem, m.seed, 2);
            Ok((mem, m.fill.clone()))
        }
    }
}

fn build_guest(
    g: &GuestArgs,
    backend: GuestBackend,
    announce: bool,
) -> Result<(Arc<dyn MigratableGuest>, WorkloadPattern)> {
    if backend == GuestBackend::Kvm {
        check_kvm()?;
        if g.writers != 1 {
            return Err(usage(
                "--writers applies to --guest sim: a KVM guest runs one vCPU",
            ));
        }
    }
    if g.dirty_rate > ferry::memory::MAX_DIRTY_RATE {
        return Err(usage(format!(
            "--dirty-rate: {} is out of range (at most {}/s)",
            g.dirty_rate,
            Bytes(ferry::memory::MAX_DIRTY_RATE)
        )));
    }
    if g.mem.image.is_none() {
        workload_for(g, g.mem.memory.unwrap_or(1 << 30))?;
    }
    let (memory, content) = build_memory(&g.mem, announce)?;
    let pattern = workload_for(g, memory.len_bytes())?;
    let workload = Workload {
        pattern,
        dirty_rate: g.dirty_rate,
        content,
        writers: g.writers,
        seed: g.mem.seed,
    };
    let guest = ferry::migration::start_guest(backend.kind(), Arc::new(memory), workload)
        .map_err(anyhow::Error::msg)?;
    Ok((guest, pattern))
}

/// `--guest kvm` needs a working `/dev/kvm`: one line saying so, if not.
fn check_kvm() -> Result<()> {
    match ferry::migration::kvm_unavailable() {
        Some(why) => Err(anyhow::anyhow!("--guest kvm needs a working {why}")),
        None => Ok(()),
    }
}

/// Where memory content comes from: `fill zero:35,...` or `image FILE`.
fn content_of(m: &MemoryArgs) -> String {
    match &m.image {
        Some(p) => format!("image {}", p.display()),
        None => format!("fill {}", m.fill),
    }
}

fn describe_guest(g: &GuestArgs, guest: &dyn MigratableGuest, pattern: WorkloadPattern) -> String {
    let kind = match guest.kind() {
        ferry::wire::GuestKind::Sim => "synthetic guest",
        ferry::wire::GuestKind::Kvm => "KVM guest (1 vCPU)",
    };
    format!(
        "{} {kind} ({}), workload {} at {}",
        Bytes(guest.memory().len_bytes()),
        content_of(&g.mem),
        pattern,
        Rate(g.dirty_rate as f64)
    )
}

/// Cancels `cancel` on SIGINT or SIGTERM, and exits on a second one, from a
/// thread of its own (for work that runs outside any long-lived runtime, such
/// as the sweep).
fn cancel_on_signals(cancel: tokio_util::sync::CancellationToken) {
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            let Ok(mut term) = signal(SignalKind::terminate()) else {
                return;
            };
            for second in [false, true] {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
                if second {
                    // Asked twice: leave now. A tbf link left behind is
                    // removed by the next sweep (its owner pid is gone).
                    eprintln!("interrupted again: exiting");
                    std::process::exit(130);
                }
                eprintln!("interrupted: cancelling (again to exit at once)");
                cancel.cancel();
            }
        });
    });
}

fn demo(a: DemoArgs) -> Result<ExitCode> {
    if let Some(DemoCommand::Cluster(c)) = a.sub {
        return cli::demo_cluster::demo_cluster(c);
    }
    let mut config = a.migrate.config();
    config
        .validate()
        .map_err(|e| usage(format!("{}: {}", e.flag(), e.message)))?;
    // Both ends are in this process: they prove a one-off key to each other.
    let key = ferry::migration::auth::SessionKey::random();
    config.session_key = Some(key.clone());
    let (client_tls, tls) = if a.migrate.tls {
        (
            Some(ferry::transport::tls::TlsClient::bound_to_key()),
            Some(ferry::transport::tls::TlsServer::ephemeral().map_err(anyhow::Error::msg)?),
        )
    } else {
        (None, None)
    };
    let (guest, pattern) = build_guest(&a.guest, a.backend, true)?;
    eprintln!(
        "ferry demo: {}\n            {} channels, codec {}, over loopback",
        describe_guest(&a.guest, &*guest, pattern),
        config.channels,
        config.codec
    );
    // Let the workload reach its steady state before migrating.
    std::thread::sleep(Duration::from_millis(200));
    let ctx = RunContext {
        tls: client_tls,
        ..RunContext::default()
    };
    let done = Arc::new(AtomicBool::new(false));
    let ui = progress_ui(ctx.progress.clone(), done.clone());
    let receiver = ReceiverConfig {
        key: Some(key),
        tls,
        // Show the guest runs on there: its counter, a second after GO.
        resume_check: Some(Duration::from_secs(1)),
        ..ReceiverConfig::default()
    };
    let result = migrate_over_loopback(guest.clone(), &config, ctx, receiver);
    done.store(true, Ordering::Release);
    let _ = ui.join();
    let (mut report, incoming) = result.context("loopback migration")?;
    if let Some(i) = &incoming {
        report.guest_counter_after_resume = i.report.guest_counter_after_resume;
    }
    if a.migrate.json {
        println!("{}", report.to_json());
    } else {
        println!("migration {}", outcome_name(report.outcome));
        print!("{}", summary(&report, Some(config.downtime_limit)));
    }
    Ok(exit_for(report.outcome))
}

fn tls_cert(a: TlsCertArgs) -> Result<ExitCode> {
    let (cert, key) =
        ferry::transport::tls::TlsServer::generate_pem().map_err(anyhow::Error::msg)?;
    std::fs::write(&a.cert, cert)?;
    ferry::migration::auth::write_secret_file(&a.key, key.as_bytes())?;
    println!("wrote {} and {}", a.cert.display(), a.key.display());
    Ok(ExitCode::SUCCESS)
}

/// Reads a `--key` file, refusing one every user may read.
fn load_key(path: &std::path::Path) -> Result<ferry::migration::auth::SessionKey> {
    ferry::migration::auth::SessionKey::load(path).map_err(|e| usage(format!("--key: {e}")))
}

fn outcome_name(o: Outcome) -> &'static str {
    match o {
        Outcome::Completed => "completed",
        Outcome::Failed => "failed",
        Outcome::Cancelled => "cancelled",
        Outcome::Unresolved => "unresolved",
    }
}

fn image(a: ImageArgs) -> Result<ExitCode> {
    let mem = GuestMemory::new(a.memory).map_err(|e| usage(format!("--memory: {e}")))?;
    a.fill.fill(&mem, a.seed, 2);
    let written = mem
        .save_image(&a.out)
        .with_context(|| format!("writing the image {}", a.out.display()))?;
    println!(
        "wrote {} image to {}: fill {}, seed {}, {:.1}% non-zero pages",
        Bytes(a.memory),
        a.out.display(),
        a.fill,
        a.seed,
        100.0 * written as f64 / mem.pages() as f64
    );
    Ok(ExitCode::SUCCESS)
}
