//! The `ferry` command line: the migration engine (`demo`, `send`, `receive`, `bench`, `image`), the node agent (`agent`) and the orchestrator's commands (`vm`, `migrate`, `node`, `cluster`).

use anyhow::{Context, Result};
use clap::Parser;
use ferry::codec::Codec;
use ferry::cpu::CpuMeter;
use ferry::memory::{FillSpec, GuestMemory, Workload, WorkloadPattern};
use ferry::migration::{
    migrate_over_loopback, MigratableGuest, Outcome, Phase, Progress, ReceiverConfig, Report,
    RunContext,
};
use ferry::units::{compact_size, Bytes, Rate};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

mod cli {
    pub mod analyze;
    pub mod args;
    pub mod demo_cluster;
    pub mod hostile;
    pub mod local_etcd;
    pub mod orchestrate;
    pub mod receive;
    pub mod rolling;
    pub mod send;
    pub mod soak;
    pub mod update;
}
use cli::args::*;
use cli::orchestrate;

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

/// Draws one progress bar per phase on stderr until `done` is set: each
/// pre-copy round (live, then with its final figures, also for rounds too
/// short to be seen live) and the switchover.
fn progress_ui(progress: Arc<Progress>, done: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mp = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(10));
        let style = ProgressStyle::with_template(
            "{prefix:>11} [{bar:28}] {bytes:>10}/{total_bytes:<10} {msg}",
        )
        .expect("valid template")
        .progress_chars("=> ");
        let new_bar = |prefix: String, len: u64| {
            let bar = mp.add(ProgressBar::new(len));
            bar.set_style(style.clone());
            bar.set_prefix(prefix);
            bar
        };
        // The live bar: the round it shows (None for the switchover).
        let mut live: Option<(Option<u32>, ProgressBar)> = None;
        let mut drawn = 0usize;
        loop {
            let finished = done.load(Ordering::Acquire);
            let s = progress.snapshot();
            let rounds = progress.completed_rounds();
            for r in &rounds[drawn..] {
                let bar = match live.take() {
                    Some((Some(n), bar)) if n == r.round => bar,
                    other => {
                        live = other;
                        new_bar(format!("round {}", r.round), 0)
                    }
                };
                bar.set_length(r.pages * 4096);
                bar.set_position(r.pages * 4096);
                let mut msg = format!(
                    "in {}, {} dirty after",
                    ms(r.ms),
                    Bytes(r.dirty_pages_after * 4096)
                );
                if r.throttle_pct > 0 {
                    msg += &format!(", throttle {}%", r.throttle_pct);
                }
                bar.finish_with_message(msg);
            }
            drawn = rounds.len();
            let current = match s.phase {
                Phase::Precopy if s.round as usize >= drawn => Some(Some(s.round)),
                Phase::Switchover | Phase::Handoff => Some(None),
                _ => None,
            };
            if let Some(key) = current {
                if live.as_ref().map(|l| l.0) != Some(key) {
                    let prefix = key.map_or("switchover".to_string(), |r| format!("round {r}"));
                    live = Some((key, new_bar(prefix, s.round_pages * 4096)));
                }
                let (_, bar) = live.as_ref().unwrap();
                bar.set_length(s.round_pages * 4096);
                bar.set_position(s.round_pages_done * 4096);
                let left = s.round_pages.saturating_sub(s.round_pages_done) * 4096;
                let mut msg = format!("left {}", Bytes(left));
                if s.throughput_bps > 0.0 {
                    msg += &format!("  {}", Rate(s.throughput_bps));
                }
                if let Some(d) = s.expected_downtime_ms {
                    msg += &format!("  est. downtime {d:.1} ms");
                }
                if s.throttle_pct > 0 {
                    msg += &format!("  throttle {}%", s.throttle_pct);
                }
                if key.is_none() {
                    msg = if s.phase == Phase::Handoff {
                        "guest paused: state and digest sent, READY/GO".into()
                    } else {
                        "guest paused: the last dirty pages".into()
                    };
                }
                bar.set_message(msg);
            }
            if finished {
                let bar = match live.take() {
                    Some((None, bar)) => Some(bar),
                    Some((Some(_), bar)) => {
                        bar.abandon();
                        None
                    }
                    // A switchover too short to be seen live.
                    None => s
                        .final_pages
                        .map(|n| new_bar("switchover".into(), n * 4096)),
                };
                if let (Some(bar), Some(n)) = (bar, s.final_pages) {
                    bar.set_length(n * 4096);
                    bar.set_position(n * 4096);
                    bar.finish_with_message("the last dirty pages, sent with the guest paused");
                }
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })
}

fn ms(x: f64) -> String {
    if x >= 1000.0 {
        format!("{:.2} s", x / 1000.0)
    } else {
        format!("{x:.1} ms")
    }
}

fn summary(r: &Report, limit: Option<Duration>) -> String {
    let mut out = String::new();
    let where_ = match r.outcome {
        Outcome::Completed => "the guest now runs on the destination",
        Outcome::Unresolved => {
            "GO was sent but not acknowledged: the guest is paused on the source"
        }
        _ => "the guest keeps running on the source",
    };
    out += &format!("  outcome     {}: {where_}\n", outcome_name(r.outcome));
    if let Some(e) = &r.error {
        out += &format!("  error       {e}\n");
    }
    out += &format!(
        "  verified    {} ({} digest, {})\n",
        if r.verified {
            "yes, memory identical"
        } else {
            "no"
        },
        r.verify,
        ms(r.verify_ms)
    );
    let limit = limit
        .map(|l| format!(" (limit {})", ms(l.as_secs_f64() * 1e3)))
        .unwrap_or_default();
    out += &format!(
        "  time        total {}, setup {}, downtime {}{limit}\n",
        ms(r.total_ms),
        ms(r.setup_ms),
        ms(r.downtime_ms)
    );
    out += &format!(
        "  rounds      {} pre-copy + final; pages {} (zero {}, raw {}, compressed {})\n",
        r.rounds, r.pages.total, r.pages.zero, r.pages.raw, r.pages.compressed
    );
    out += &format!(
        "  data        {} of guest memory as {} on the wire (ratio {:.2}, {})\n",
        Bytes(r.guest_bytes_sent),
        Bytes(r.wire_bytes),
        r.compression_ratio,
        r.codec
    );
    let cap = r
        .max_bandwidth_bps
        .map(|b| format!(", cap {}", Rate(b as f64)))
        .unwrap_or_default();
    out += &format!(
        "  throughput  {} guest, {} wire over {} channels{cap}\n",
        Rate(r.throughput_guest_bps),
        Rate(r.throughput_wire_bps),
        r.channels
    );
    out += &format!(
        "  guest       {}, dirty rate {}, max throttle {}%\n",
        r.guest,
        Rate(r.dirty_rate_bps),
        r.throttle_pct_max
    );
    if let Some(at) = r.guest_counter_at_pause {
        let after = r
            .guest_counter_after_resume
            .map(|c| format!(", {c} a second after it resumed here"))
            .unwrap_or_default();
        out += &format!("  counter     {at} at the pause{after}\n");
    }
    let cpu = |v: Option<f64>| v.map(ms).unwrap_or_else(|| "n/a".into());
    out += &format!(
        "  cpu         source {}, destination {}\n",
        cpu(r.cpu_ms.source),
        cpu(r.cpu_ms.destination)
    );
    out += &format!(
        "  security    {}, {}\n",
        if r.authenticated {
            "authenticated (both sides proved the key)"
        } else {
            "NOT authenticated (no key)"
        },
        match (r.encrypted, r.frames_authenticated) {
            (true, _) => "encrypted (TLS 1.3)",
            (false, true) => "NOT encrypted, every frame authenticated (keyed BLAKE3)",
            (false, false) => "NOT encrypted, frames NOT authenticated (CRC only)",
        }
    );
    if let Some(file) = &r.saved_to {
        out += &format!("  saved       the paused guest is in {file}\n");
    }
    if r.channel_failures > 0 {
        out += &format!(
            "  failover    {} channel failures, {} batches resent\n",
            r.channel_failures, r.batches_resent
        );
    }
    out
}

fn exit_for(outcome: Outcome) -> ExitCode {
    match outcome {
        Outcome::Completed => ExitCode::SUCCESS,
        Outcome::Unresolved => ExitCode::from(3),
        Outcome::Failed | Outcome::Cancelled => ExitCode::from(1),
    }
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
    let tls = if a.migrate.tls {
        config.tls = Some(ferry::transport::tls::TlsClient::bound_to_key());
        Some(ferry::transport::tls::TlsServer::ephemeral().map_err(anyhow::Error::msg)?)
    } else {
        None
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
    let ctx = RunContext::default();
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

fn bench_link(a: LinkArgs) -> Result<ExitCode> {
    let rt = ferry::transport::runtime("ferry-bench", 2, &CpuMeter::new())?;
    let cancel = tokio_util::sync::CancellationToken::new();
    if a.bandwidth.is_some() && a.link != "tbf" {
        return Err(usage(
            "--bandwidth shapes a --link tbf; loopback and --to measure the path as it is",
        ));
    }
    if let Some(listen) = &a.listen {
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(listen))
            .with_context(|| format!("cannot listen on {listen}"))?;
        eprintln!(
            "link sink listening on {}; Ctrl-C to stop",
            listener.local_addr()?
        );
        let stop = cancel.clone();
        rt.spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            stop.cancel();
        });
        rt.block_on(ferry::bench::serve_link_sink(listener, cancel));
        return Ok(ExitCode::SUCCESS);
    }
    // With --link tbf: the sink runs in the destination's namespace, the
    // client (`rt`, rebuilt) in the source's; `_tbf` tears them down at the end.
    let (mut rt, mut _sink_rt, mut _tbf) = (rt, None, None);
    let (addr, path) = match &a.to {
        Some(to) => (to.clone(), to.clone()),
        None if a.link == "tbf" => {
            let rate = match a.bandwidth.as_ref().map(|l| &l.0[..]) {
                None => None,
                Some(&[rate]) => rate,
                Some(_) => return Err(usage("--link tbf takes one --bandwidth")),
            };
            ferry::transport::netns::tbf_available().map_err(usage)?;
            let mut link = ferry::transport::netns::TbfLink::new()
                .context("setting up the tbf link (network namespaces, veth, tc)")?;
            link.set_rate(rate).context("shaping the tbf link")?;
            let cpu = CpuMeter::new();
            let sink_rt = ferry::transport::runtime_in(
                "ferry-sink",
                2,
                &cpu,
                Some(link.destination().clone()),
            )?;
            rt = ferry::transport::runtime_in("ferry-bench", 2, &cpu, Some(link.source().clone()))?;
            let listen = link.listen_addr();
            let listener = sink_rt.block_on(
                sink_rt.spawn(async move { tokio::net::TcpListener::bind(listen).await }),
            )??;
            let addr = listener.local_addr()?.to_string();
            sink_rt.spawn(ferry::bench::serve_link_sink(listener, cancel.clone()));
            _sink_rt = Some(sink_rt);
            _tbf = Some(link);
            (
                addr,
                format!("tbf {}", ferry::bench::sweep::link_label(rate)),
            )
        }
        None => {
            let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
            let addr = listener.local_addr()?.to_string();
            rt.spawn(ferry::bench::serve_link_sink(listener, cancel.clone()));
            (addr, "loopback".to_string())
        }
    };
    let mut runs = Vec::new();
    for i in 0..a.repeats {
        // On a runtime thread: with --link tbf that is inside the source's namespace.
        let (to, channels, bytes) = (addr.clone(), a.channels, a.bytes);
        let r = rt
            .block_on(rt.spawn(async move { ferry::bench::link_once(&to, channels, bytes).await }))?
            .with_context(|| format!("link run {} to {addr}", i + 1))?;
        runs.push(r);
    }
    cancel.cancel();
    let bps = ferry::bench::Spread::of(&runs.iter().map(|r| r.bps).collect::<Vec<_>>())
        .expect("at least one run");
    if a.json {
        let out = serde_json::json!({
            "path": path,
            "channels": a.channels,
            "bytes": runs[0].bytes,
            "repeats": a.repeats,
            "bps": bps,
            "runs": runs,
        });
        println!("{out}");
    } else {
        println!(
            "link {path}: {} channels, {} per run, {} runs",
            a.channels,
            Bytes(runs[0].bytes),
            a.repeats
        );
        println!(
            "  throughput  {} median ({} to {})",
            Rate(bps.median),
            Rate(bps.min),
            Rate(bps.max)
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn bench_codecs(a: CodecsArgs) -> Result<ExitCode> {
    let (mem, _) = build_memory(&a.mem, !a.json)?;
    let codecs: Vec<Codec> = a.codecs.0.iter().map(|c| c.1).collect();
    let results = ferry::bench::measure_codecs(&mem, &codecs, a.batch_pages, a.sample);
    let sampled = results.first().map_or(0, |r| r.guest_bytes);
    if a.json {
        let out = serde_json::json!({
            "memory_bytes": mem.len_bytes(),
            "sampled_bytes": sampled,
            "batch_pages": a.batch_pages,
            "codecs": results,
        });
        println!("{out}");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "codecs on {} of guest memory ({}): {} sampled in {}-page batches, one core",
        Bytes(mem.len_bytes()),
        content_of(&a.mem),
        Bytes(sampled),
        a.batch_pages
    );
    println!(
        "  {:<9} {:>7} {:>14} {:>14} {:>11}",
        "codec", "ratio", "encode/core", "decode/core", "zero pages"
    );
    for r in &results {
        println!(
            "  {:<9} {:>7.2} {:>14} {:>14} {:>10.1}%",
            r.codec,
            r.ratio,
            Rate(r.encode_bps).to_string(),
            Rate(r.decode_bps).to_string(),
            r.zero_bytes as f64 * 100.0 / r.guest_bytes.max(1) as f64
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
fn bench_kvm(a: KvmBenchArgs) -> Result<ExitCode> {
    check_kvm()?;
    let (mem, _) = build_memory(&a.mem, !a.json)?;
    let r = ferry::bench::kvm::measure(Arc::new(mem), a.repeats)
        .map_err(|e| anyhow::Error::new(e).context("measuring the KVM guest"))?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(ExitCode::SUCCESS);
    }
    let sp = |s: ferry::bench::Spread, unit: &str| {
        format!("{:.1} {unit} ({:.1}-{:.1})", s.median, s.min, s.max)
    };
    println!(
        "KVM guest of {} ({}), {} samples each, medians (min-max)",
        Bytes(r.memory_bytes),
        content_of(&a.mem),
        r.repeats
    );
    println!(
        "  dirty log sync, clean   {}  = {:.1} µs per GiB",
        sp(r.sync_clean_us, "µs"),
        r.sync_clean_us_per_gib
    );
    println!(
        "  dirty log sync, dirty   {}  for {:.0} pages: {:.0} ns per dirty page",
        sp(r.sync_dirty_us, "µs"),
        r.sync_dirty_pages,
        r.sync_ns_per_dirty_page
    );
    println!(
        "  page writes/s, hot 4MiB {:.2} M not harvested, {:.2} M harvested every 100 ms, {:.2} M every 10 ms",
        r.writes_per_sec_hot_unharvested / 1e6,
        r.writes_per_sec_hot_harvest_100ms / 1e6,
        r.writes_per_sec_hot_harvest_10ms / 1e6
    );
    println!(
        "  page writes/s, uniform  {:.3} M: each a first write since a harvest, {:.1} µs apiece",
        r.writes_per_sec_uniform / 1e6,
        1e6 / r.writes_per_sec_uniform.max(1.0)
    );
    println!("  pause                   {}", sp(r.pause_us, "µs"));
    println!(
        "  save vCPU state         {}, {} serialized",
        sp(r.save_us, "µs"),
        Bytes(r.state_bytes)
    );
    println!("  restore on a new VM     {}", sp(r.restore_ms, "ms"));
    println!("  resume                  {}", sp(r.resume_us, "µs"));
    Ok(ExitCode::SUCCESS)
}

#[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
fn bench_kvm(_: KvmBenchArgs) -> Result<ExitCode> {
    check_kvm().map(|_| ExitCode::SUCCESS)
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

fn bench_sweep(a: SweepArgs) -> Result<ExitCode> {
    use ferry::bench::sweep::{
        mark_winners, run_cell, summarize, table, write_outputs, CellEnv, GuestSpec, SweepMeta,
        SweepPlan,
    };
    let memory = a.guest.mem.memory.unwrap_or(256 << 20);
    if a.backend == GuestBackend::Kvm {
        check_kvm()?;
    }
    let kind = a.backend.kind();
    let guests = match a.guest_set.as_deref() {
        Some("changing") => GuestSpec::changing_set(memory),
        Some(_) => GuestSpec::standard_set(memory),
        None => {
            let g = &a.guest;
            let bytes = match &g.mem.image {
                Some(p) => std::fs::metadata(p)
                    .map_err(|e| usage(format!("cannot read RAM image {}: {e}", p.display())))?
                    .len(),
                None => memory,
            };
            let workload = workload_for(g, bytes)?;
            let label = match &g.mem.image {
                Some(p) => p
                    .file_stem()
                    .map_or("image".into(), |s| s.to_string_lossy().into_owned()),
                None => format!("{}-{}", compact_size(bytes), workload),
            };
            vec![GuestSpec {
                label,
                memory: bytes,
                fill: g.mem.fill.clone(),
                image: g.mem.image.clone(),
                workload,
                dirty_rate: g.dirty_rate,
                kind: ferry::wire::GuestKind::Sim,
            }]
        }
    };
    let guests: Vec<GuestSpec> = guests.into_iter().map(|g| g.on(kind)).collect();
    let plan = SweepPlan {
        codecs: a.codecs.0.clone(),
        links: a.bandwidth.0.clone(),
        guests,
        repeats: a.repeats,
        channels: a.channels,
    };
    let mut env = CellEnv::loopback(plan.channels, plan.repeats);
    let mut tbf = None;
    if a.link == "tbf" {
        ferry::transport::netns::tbf_available().map_err(usage)?;
        let link = ferry::transport::netns::TbfLink::new()
            .context("setting up the tbf link (network namespaces, veth, tc)")?;
        env.path = ferry::migration::LocalPath {
            listen: link.listen_addr(),
            source_ns: Some(link.source().clone()),
            destination_ns: Some(link.destination().clone()),
        };
        env.kernel_shaped = true;
        tbf = Some(link);
    }
    // Interrupted: cancel the running migration, stop, and (on drop) tear the
    // tbf link down.
    cancel_on_signals(env.cancel.clone());
    let bar =
        ProgressBar::with_draw_target(Some(plan.runs()), ProgressDrawTarget::stderr_with_hz(10));
    bar.set_style(
        ProgressStyle::with_template("sweep [{bar:30}] {pos}/{len} migrations  {msg}  eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let mut cells = Vec::new();
    'grid: for spec in &plan.guests {
        bar.set_message(format!("building guest {}", spec.label));
        let guest = spec.build(a.guest.mem.seed).map_err(usage)?;
        guest.pause();
        for &link in &plan.links {
            if let Some(t) = tbf.as_mut() {
                t.set_rate(link).context("shaping the tbf link")?;
            }
            for (label, codec) in &plan.codecs {
                bar.set_message(format!(
                    "{} · {} · {label}",
                    spec.label,
                    ferry::bench::sweep::link_label(link)
                ));
                let reports = run_cell(&guest, *codec, link, &env, || bar.inc(1))
                    .context("setting up a migration pair")?;
                if env.cancel.is_cancelled() {
                    break 'grid;
                }
                cells.push(summarize(label, link, &spec.label, &reports));
            }
        }
    }
    if env.cancel.is_cancelled() {
        bar.abandon();
        drop(tbf);
        eprintln!("interrupted: sweep stopped, nothing written");
        return Ok(ExitCode::from(130));
    }
    bar.finish_and_clear();
    mark_winners(&mut cells);
    if let Some(dir) = &a.out {
        let meta = SweepMeta {
            link: a.link.clone(),
            channels: plan.channels,
            repeats: plan.repeats,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            unix_time: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        write_outputs(dir, &meta, &cells)
            .with_context(|| format!("writing results to {}", dir.display()))?;
        let charts = ferry::bench::charts::write_charts(dir, &cells)
            .map_err(|e| anyhow::anyhow!("drawing charts in {}: {e}", dir.display()))?;
        if !a.json {
            eprintln!(
                "wrote results.json, results.csv, report.md and {} charts to {}",
                charts.len(),
                dir.display()
            );
        }
    }
    if a.json {
        println!("{}", serde_json::json!({ "cells": cells }));
    } else {
        print!("{}", table(&cells));
    }
    let failed = cells.iter().any(|c| c.failures > 0);
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
