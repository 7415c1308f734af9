//! `ferry bench cycle`: the operator's maintenance cycle, measured. Three
//! in-process agents (on loopback, or each in a network namespace of its own
//! behind a shaped link) with VMs on each; a rolling update drains,
//! updates (a no-op hook) and resumes with failback every node in turn; the
//! run's total and each phase's time and wire bytes.

use super::args::{CycleBenchArgs, GuestBackend};
use super::bench_agents::{
    bench_dir, capacity, guest_labels, guest_memory, unix_time, LocalAgents, Topology,
};
use super::demo_cluster::write_cluster_at;
use super::local_etcd::LocalEtcd;
use crate::{cancel_on_signals, check_kvm};
use anyhow::{bail, Context, Result};
use ferry::agent::request::Concurrency;
use ferry::agent::rolling::{RunState, StartUpdate, Turn, UpdateRun};
use ferry::agent::{NodeSpec, OperationView};
use ferry::bench::cycle::{summarize, table, CycleMeta, CycleRun, PhaseRun};
use std::process::ExitCode;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const NODES: [&str; 3] = ["a", "b", "c"];

/// Runs the cycle `--repeats` times on one cluster, fresh VMs each time.
pub(crate) fn bench_cycle(a: CycleBenchArgs) -> Result<ExitCode> {
    let memory = guest_memory(&a.guest)?;
    if a.guest.backend == GuestBackend::Kvm {
        check_kvm()?;
    }
    let dir = bench_dir("cycle")?;
    let cancel = CancellationToken::new();
    cancel_on_signals(cancel.clone());
    // Two nodes hold all three's VMs during a turn.
    let capacity = capacity(memory, a.vms.saturating_mul(2));
    let delta = a.delta == "on";
    let retention = match a.retention.as_str() {
        "auto" if delta => capacity / 4,
        "auto" => 0,
        r => ferry::units::parse_size(r).map_err(|e| crate::usage(format!("--retention: {e}")))?,
    };
    let mut topology = Topology::star(&a.link)?;
    let cap = topology.set_link(a.bandwidth.0)?;
    // On its own thread: with tbf links it moves to the hub, where etcd and
    // the client live.
    let result = std::thread::scope(|s| {
        s.spawn(|| {
            let (host, netns) = topology.enter_client_side()?;
            let etcd = LocalEtcd::start_at(&dir, host, netns.as_deref())?;
            // The command goes last: `sleep SECONDS`, or `true no-op`.
            let hook = if a.update_time.is_zero() { "true" } else { "sleep" };
            let settings = format!(
                "[defaults]\ncodec = \"{}\"\ndense = {}\nmax_concurrent_migrations = {}\nupdate_hook = [\"{hook}\"]\nfailback_retention = {retention}\n{}",
                a.codec,
                a.dense == "on",
                match a.max_concurrent {
                    Concurrency::Fixed(n) => n.to_string(),
                    Concurrency::Auto => "\"auto\"".into(),
                },
                cap.map_or(String::new(), |b| format!("max_bandwidth = {b}\n"))
            );
            let addrs = topology.addrs(0)?;
            let file = write_cluster_at(&dir, &etcd.endpoint, &settings, capacity, &addrs)?;
            let agents = LocalAgents::start_in(&file, topology.places())?;
            let runs = repeat(&a, &agents, memory, &cancel, delta);
            agents.stop();
            runs
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the bench's thread panicked"))?
    });
    let _ = std::fs::remove_dir_all(&dir);
    let runs = result?;
    if cancel.is_cancelled() {
        eprintln!("interrupted: bench stopped, nothing written");
        return Ok(ExitCode::from(130));
    }
    let summary = summarize(&runs);
    if let Some(out) = &a.out {
        let meta = CycleMeta {
            vms_per_node: a.vms,
            guests: guest_labels(&a.guest, memory),
            link_bps: a.bandwidth.0,
            link: a.link.clone(),
            codec: a.codec.to_string(),
            max_concurrent: match a.max_concurrent {
                Concurrency::Fixed(n) => n,
                Concurrency::Auto => ferry::agent::cluster::DEFAULT_MAX_CONCURRENT_MIGRATIONS,
            },
            max_concurrent_auto: a.max_concurrent == Concurrency::Auto,
            delta,
            dense: a.dense == "on",
            retention_bytes: retention,
            update_ms: a.update_time.as_millis() as u64,
            repeats: a.repeats,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            unix_time: unix_time(),
        };
        ferry::bench::cycle::write_outputs(out, &meta, &summary, &runs)
            .with_context(|| format!("writing results to {}", out.display()))?;
    }
    if a.json {
        println!(
            "{}",
            serde_json::json!({ "summary": summary, "runs": runs })
        );
    } else {
        print!("{}", table(&summary));
    }
    Ok(ExitCode::from(u8::from(summary.failures > 0)))
}

/// The runs: VMs created on every node, a rolling update, the VMs deleted.
fn repeat(
    a: &CycleBenchArgs,
    agents: &LocalAgents,
    memory: u64,
    cancel: &CancellationToken,
    delta: bool,
) -> Result<Vec<CycleRun>> {
    let mut runs = Vec::new();
    for r in 0..a.repeats {
        if cancel.is_cancelled() {
            break;
        }
        for n in NODES {
            let names: Vec<String> = (1..=a.vms).map(|i| format!("{n}-vm{i}")).collect();
            agents.create_vms(&agents.node(n)?, &names, &a.guest, memory)?;
        }
        // Let busy workloads reach their steady state.
        std::thread::sleep(Duration::from_millis(300));
        eprintln!("bench cycle: rolling update {} of {}", r + 1, a.repeats);
        let run = cycle_once(agents, cancel, (delta, a.update_time))?;
        if !run.completed {
            // A failed turn leaves its node paused, as a rolling update
            // must: the next run could not place its VMs. Stop here and
            // report what ran.
            eprintln!(
                "bench cycle: rolling update {} did not complete ({}); no more runs",
                r + 1,
                run.error.as_deref().unwrap_or("cancelled")
            );
            runs.push(run);
            break;
        }
        delete_all(agents)?;
        runs.push(run);
    }
    Ok(runs)
}

/// Polls of the rolling update in a row that may fail (at 250 ms apart)
/// before the bench gives up on the cluster.
const POLL_FAILURES: u32 = 40;

/// One rolling update, waited for and read back phase by phase.
fn cycle_once(
    agents: &LocalAgents,
    cancel: &CancellationToken,
    (delta, update_time): (bool, Duration),
) -> Result<CycleRun> {
    let (ctx, a_node) = (&agents.ctx, agents.node("a")?);
    let command = if update_time.is_zero() {
        "no-op".to_string()
    } else {
        format!("{:.3}", update_time.as_secs_f64())
    };
    let start = StartUpdate {
        command,
        failback: Some("immediate".into()),
        delta: Some(if delta { "on" } else { "off" }.into()),
        ..StartUpdate::default()
    };
    let started = ctx.run(ctx.peers.start_update(&a_node, &start))?;
    let (mut cancel_sent, mut failures) = (false, 0);
    let run: UpdateRun = loop {
        std::thread::sleep(Duration::from_millis(250));
        if cancel.is_cancelled() && !cancel_sent {
            cancel_sent = true;
            let _ = ctx.run(ctx.peers.cancel_update(&a_node));
        }
        // An agent answers 503 for a moment while etcd is slow to answer
        // it: the run goes on in the cluster, so the poll does too.
        let now = match ctx.run(ctx.peers.update_run(&a_node)) {
            Ok(now) => {
                failures = 0;
                now
            }
            Err(e) if failures < POLL_FAILURES => {
                failures += 1;
                eprintln!(
                    "bench cycle: asking for the rolling update failed ({e:#}); asking again"
                );
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        if now.id == started.id && now.state != RunState::Running {
            break now;
        }
    };
    let mut phases = Vec::new();
    for turn in &run.nodes {
        phases.extend(turn_phases(agents, turn)?);
    }
    let mut error = run.error.clone();
    if run.state == RunState::Completed {
        error = error.or(misplaced(agents)?);
    }
    Ok(CycleRun {
        total_ms: run
            .finished_at_ms
            .unwrap_or(run.started_at_ms)
            .saturating_sub(run.started_at_ms) as f64,
        completed: run.state == RunState::Completed && error.is_none(),
        error,
        phases,
    })
}

/// A node's turn as phases: its drain, its update, its failback.
fn turn_phases(agents: &LocalAgents, turn: &Turn) -> Result<Vec<PhaseRun>> {
    let node = agents.node(&turn.node)?;
    let mut out = Vec::new();
    for (phase, id) in [
        ("drain", &turn.drain),
        ("update", &turn.update),
        ("failback", &turn.resume),
    ] {
        let Some(id) = id else { continue };
        let op: OperationView = agents.ctx.run(agents.ctx.peers.operation(&node, id))?;
        let ms = op
            .finished_at_ms
            .unwrap_or(op.started_at_ms)
            .saturating_sub(op.started_at_ms);
        let mut p = PhaseRun {
            node: turn.node.clone(),
            phase: phase.into(),
            ms: ms as f64,
            wire_bytes: 0,
            migrations: 0,
            downtime_ms_max: 0.0,
            by_delta: 0,
        };
        for s in op.steps.iter().filter(|s| s.state == "completed") {
            let (Some(mid), Ok(source)) = (&s.migration_id, agents.node(&s.source)) else {
                continue;
            };
            let m = agents.ctx.run(agents.ctx.peers.migration(&source, mid))?;
            if let Some(r) = &m.report {
                p.wire_bytes += r.wire_bytes;
                p.migrations += 1;
                p.downtime_ms_max = p.downtime_ms_max.max(r.downtime_ms);
                p.by_delta += u32::from(r.delta.used);
            }
        }
        out.push(p);
    }
    Ok(out)
}

/// Says which VMs are not back on their own node after a failback.
fn misplaced(agents: &LocalAgents) -> Result<Option<String>> {
    let mut away = Vec::new();
    for n in NODES {
        for vm in agents.ctx.run(agents.ctx.peers.vms(&agents.node(n)?))? {
            if !vm.spec.name.starts_with(&format!("{n}-")) {
                away.push(format!("{} on {n}", vm.spec.name));
            }
        }
    }
    Ok((!away.is_empty()).then(|| format!("not back home: {}", away.join(", "))))
}

/// Deletes every VM of the cluster.
fn delete_all(agents: &LocalAgents) -> Result<()> {
    for n in NODES {
        let node: NodeSpec = agents.node(n)?;
        for vm in agents.ctx.run(agents.ctx.peers.vms(&node))? {
            agents.wait_running(&node, &vm.spec.name, Duration::from_secs(30))?;
            agents
                .ctx
                .run(agents.ctx.peers.delete_vm(&node, &vm.spec.name, false))
                .with_context(|| format!("deleting {} on {n}", vm.spec.name))?;
        }
    }
    if misplaced(agents)?.is_some() {
        bail!("VMs remain after they were deleted");
    }
    Ok(())
}
