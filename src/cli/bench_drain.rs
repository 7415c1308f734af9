//! `ferry bench drain`: N VMs on node a of three in-process agents on
//! loopback, drained to b and c through a's one link (its `max_bandwidth`,
//! shared by all its migrations), for each link speed × codec × migrations
//! at once, with the drain time, each VM's report and the agents' CPU.

use super::args::{DrainBenchArgs, GuestBackend};
use super::bench_agents::{
    bench_dir, capacity, guest_labels, guest_memory, unix_time, LocalAgents, Topology,
};
use super::local_etcd::LocalEtcd;
use crate::{cancel_on_signals, check_kvm};
use anyhow::{anyhow, Context, Result};
use ferry::agent::cluster::MAX_CONCURRENT;
use ferry::agent::request::{Concurrency, Drain, Resume};
use ferry::agent::{NodeSpec, OpState, OperationView};
use ferry::bench::drain::{mark_best, summarize, table, DrainMeta, DrainRun, VmRun};
use ferry::bench::sweep::link_label;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::process::ExitCode;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// How often a drain is looked at, and the agents' CPU sampled.
const TICK: Duration = Duration::from_millis(250);

/// The bench: every link speed × codec on a fresh cluster, every
/// concurrency × repeat a drain on it.
pub(crate) fn bench_drain(a: DrainBenchArgs) -> Result<ExitCode> {
    let memory = guest_memory(&a.guest)?;
    if a.guest.backend == GuestBackend::Kvm {
        check_kvm()?;
    }
    let dir = bench_dir("drain")?;
    let mut topology = Topology::new(&a.link)?;
    let cancel = CancellationToken::new();
    cancel_on_signals(cancel.clone());
    // On its own thread: with a tbf link it moves to b's and c's side, where
    // etcd and the client live.
    let result = std::thread::scope(|s| {
        s.spawn(|| {
            let (host, netns) = topology.enter_client_side()?;
            let etcd = LocalEtcd::start_at(&dir, host, netns.as_deref())?;
            grid(&a, memory, &dir, &etcd.endpoint, &cancel, &mut topology)
        })
        .join()
        .map_err(|_| anyhow!("the bench's thread panicked"))?
    });
    let _ = std::fs::remove_dir_all(&dir);
    let Some(mut cells) = result? else {
        eprintln!("interrupted: bench stopped, nothing written");
        return Ok(ExitCode::from(130));
    };
    mark_best(&mut cells);
    if let Some(out) = &a.out {
        write(&a, memory, out, &cells)?;
    }
    if a.json {
        println!("{}", serde_json::json!({ "cells": cells }));
    } else {
        print!("{}", table(&cells));
    }
    let failed = cells.iter().any(|c| c.failures > 0);
    Ok(ExitCode::from(u8::from(failed)))
}

/// Runs the grid; `None` when interrupted.
fn grid(
    a: &DrainBenchArgs,
    memory: u64,
    dir: &std::path::Path,
    etcd: &str,
    cancel: &CancellationToken,
    topology: &mut Topology,
) -> Result<Option<Vec<ferry::bench::drain::DrainCell>>> {
    let levels = &a.max_concurrent.0;
    let groups = a.bandwidth.0.len() * a.codecs.0.len();
    let drains = (groups * levels.len()) as u64 * u64::from(a.repeats);
    let bar = ProgressBar::with_draw_target(Some(drains), ProgressDrawTarget::stderr_with_hz(4));
    bar.set_style(
        ProgressStyle::with_template("drain bench [{bar:30}] {pos}/{len} drains  {msg}  eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let mut cells = Vec::new();
    let mut group = 0u16;
    for &link in &a.bandwidth.0 {
        for (label, codec) in &a.codecs.0 {
            group += 1;
            let cap = topology.set_link(link)?;
            let settings = format!(
                "etcd_prefix = \"/ferry-bench-drain/{group}/\"\n[defaults]\ncodec = \"{codec}\"\n{}{}",
                cap.map_or(String::new(), |b| format!("max_bandwidth = {b}\n")),
                // The node's own limit out of the way: each drain's is the axis.
                format_args!("max_concurrent_migrations = {MAX_CONCURRENT}\n"),
            );
            let capacity = capacity(memory, a.vms);
            let file = super::demo_cluster::write_cluster_at(
                &dir.join(format!("cluster-{group}")),
                etcd,
                &settings,
                capacity,
                &topology.addrs(group)?,
            )?;
            let bench = Bench::start(&file, a, memory, topology)?;
            for (level_label, level) in levels {
                let mut runs = Vec::new();
                for _ in 0..a.repeats {
                    bar.set_message(format!(
                        "{} · {label} · {level_label} at once",
                        link_label(link)
                    ));
                    match bench.drain_once(*level, cancel, &bar)? {
                        Some(run) => runs.push(run),
                        None => {
                            bar.abandon();
                            bench.stop();
                            return Ok(None);
                        }
                    }
                    bar.inc(1);
                }
                cells.push(summarize(label, link, level_label, &runs));
            }
            bench.stop();
        }
    }
    bar.finish_and_clear();
    Ok(Some(cells))
}

/// The agents of one link speed × codec, and the drains' VMs.
struct Bench<'a> {
    agents: LocalAgents,
    args: &'a DrainBenchArgs,
    memory: u64,
}

impl<'a> Bench<'a> {
    fn start(
        file: &std::path::Path,
        args: &'a DrainBenchArgs,
        memory: u64,
        topology: &Topology,
    ) -> Result<Self> {
        Ok(Self {
            agents: LocalAgents::start_in(file, topology.places())?,
            args,
            memory,
        })
    }

    fn stop(self) {
        self.agents.stop();
    }

    /// Creates the VMs on a, drains a with `level` at once, reads every
    /// migration's report, then deletes the VMs and resumes a. `None` when
    /// interrupted (the drain cancelled, its VMs deleted wherever they run).
    fn drain_once(
        &self,
        level: Concurrency,
        cancel: &CancellationToken,
        bar: &ProgressBar,
    ) -> Result<Option<DrainRun>> {
        let (ctx, a_node) = (&self.agents.ctx, self.agents.node("a")?);
        let names: Vec<String> = (1..=self.args.vms).map(|i| format!("vm{i}")).collect();
        self.agents
            .create_vms(&a_node, &names, &self.args.guest, self.memory)?;
        // Let busy workloads reach their steady state.
        std::thread::sleep(Duration::from_millis(300));
        let drain = Drain {
            max_concurrent: Some(level),
            ..Drain::default()
        };
        let op: OperationView = ctx.run(ctx.peers.act_on(&a_node, "a", "drain", &drain))?;
        let (op, cpu_ms, peak) = self.watch(&a_node, op, cancel, bar)?;
        let run = self.collect(&op, cpu_ms, peak)?;
        self.clean_up(&a_node, &op)?;
        Ok((!cancel.is_cancelled()).then_some(run))
    }

    /// Waits for the drain to end, sampling the agents' CPU; cancels it when
    /// `cancel` fires. Returns its record, the agents' CPU ms over it, and
    /// their busiest tick in cores.
    fn watch(
        &self,
        node: &NodeSpec,
        op: OperationView,
        cancel: &CancellationToken,
        bar: &ProgressBar,
    ) -> Result<(OperationView, f64, f64)> {
        let ctx = &self.agents.ctx;
        let (start_cpu, mut last_cpu, mut last_at) = (
            self.agents.cpu.total(),
            self.agents.cpu.total(),
            Instant::now(),
        );
        let mut peak = 0.0f64;
        let mut cancelled = false;
        loop {
            std::thread::sleep(TICK);
            let (cpu, at) = (self.agents.cpu.total(), Instant::now());
            let wall = at.duration_since(last_at).as_secs_f64();
            if wall > 0.0 {
                peak = peak.max((cpu - last_cpu).as_secs_f64() / wall);
            }
            (last_cpu, last_at) = (cpu, at);
            if cancel.is_cancelled() && !cancelled {
                cancelled = true;
                let _ = ctx.run(ctx.peers.cancel_operation(node, &op.id));
            }
            let now = ctx.run(ctx.peers.operation(node, &op.id))?;
            let moved = now.steps.iter().filter(|s| s.state == "completed").count();
            bar.set_message(format!("draining: {moved}/{} moved", now.steps.len()));
            if now.state != OpState::Running {
                let cpu_ms = (self.agents.cpu.total() - start_cpu).as_secs_f64() * 1000.0;
                return Ok((now, cpu_ms, peak));
            }
        }
    }

    /// The drain's run from its record and its migrations' reports.
    fn collect(&self, op: &OperationView, cpu_ms: f64, peak: f64) -> Result<DrainRun> {
        let (ctx, a_node) = (&self.agents.ctx, self.agents.node("a")?);
        let since = |t: Option<u64>| t.map_or(0.0, |t| t.saturating_sub(op.started_at_ms) as f64);
        let mut vms = Vec::new();
        for s in &op.steps {
            let m = match &s.migration_id {
                Some(id) => Some(ctx.run(ctx.peers.migration(&a_node, id))?),
                None => None,
            };
            let report = m.as_ref().and_then(|m| m.report.as_ref());
            let completed = s.state == "completed";
            vms.push(VmRun {
                vm: s.vm.clone(),
                target: if completed {
                    s.target.clone()
                } else {
                    String::new()
                },
                completed,
                total_ms: report.map_or(0.0, |r| r.total_ms),
                downtime_ms: report.map_or(0.0, |r| r.downtime_ms),
                wire_bytes: report.map_or(0, |r| r.wire_bytes),
                waited_ms: since(s.started_at_ms),
                ended_ms: since(s.finished_at_ms),
                codec: report.map_or(String::new(), |r| r.codec.clone()),
                error: s.error.clone(),
            });
        }
        let first = op.steps.iter().filter_map(|s| s.started_at_ms).min();
        let last = op.steps.iter().filter_map(|s| s.finished_at_ms).max();
        let completed = op.state == OpState::Completed && vms.iter().all(|v| v.completed);
        Ok(DrainRun {
            drain_ms: first.zip(last).map(|(f, l)| l.saturating_sub(f) as f64),
            completed,
            cpu_ms,
            peak_cpu_cores: peak,
            max_concurrent: op.params["max_concurrent"].as_u64().unwrap_or(0) as u32,
            auto: op.params["auto"].as_str().map(String::from),
            vms,
        })
    }

    /// Deletes the drain's VMs wherever they run and resumes a.
    fn clean_up(&self, a_node: &NodeSpec, op: &OperationView) -> Result<()> {
        let ctx = &self.agents.ctx;
        for s in &op.steps {
            let on = if s.state == "completed" {
                &s.target
            } else {
                &s.source
            };
            let node = ctx.node(on)?;
            // Deleted once it has settled where it runs, not while it arrives.
            self.agents
                .wait_running(node, &s.vm, Duration::from_secs(30))?;
            ctx.run(ctx.peers.delete_vm(node, &s.vm, false))
                .with_context(|| format!("deleting {} on {on}", s.vm))?;
        }
        let resume: OperationView =
            ctx.run(ctx.peers.act_on(a_node, "a", "resume", &Resume::default()))?;
        self.agents
            .wait_op(a_node, &resume.id, Duration::from_secs(30))
            .context("resuming node a")?;
        Ok(())
    }
}

/// Writes results.json, results.csv, report.md and the charts to `dir`.
fn write(
    a: &DrainBenchArgs,
    memory: u64,
    dir: &std::path::Path,
    cells: &[ferry::bench::drain::DrainCell],
) -> Result<()> {
    let meta = DrainMeta {
        link: a.link.clone(),
        vms: a.vms,
        guests: guest_labels(&a.guest, memory),
        repeats: a.repeats,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        unix_time: unix_time(),
    };
    ferry::bench::drain::write_outputs(dir, &meta, cells)
        .with_context(|| format!("writing results to {}", dir.display()))?;
    let charts = ferry::bench::drain::write_charts(dir, cells)
        .map_err(|e| anyhow!("drawing charts in {}: {e}", dir.display()))?;
    if !a.json {
        eprintln!(
            "wrote results.json, results.csv, report.md and {} charts to {}",
            charts.len(),
            dir.display()
        );
    }
    Ok(())
}
