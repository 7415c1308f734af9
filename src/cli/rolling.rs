//! `ferry cluster update` on a cluster on etcd: the run is handed to the
//! cluster (any agent that answers takes it; the coordinator carries it
//! out), then followed until it ends unless `--detach`; `status` and
//! `cancel` read and stop it from any terminal.

use super::orchestrate::{name_of, print_json, Ctx, Output};
use super::update::{print_run, NodeRun, RunReport};
use anyhow::{bail, Result};
use ferry::agent::peer::PeerError;
use ferry::agent::rolling::{Phase, RunState, StartUpdate, UpdateRun};
use std::process::ExitCode;
use std::time::Duration;

/// A turn's phases, in order.
const PHASES: [Phase; 4] = [
    Phase::Draining,
    Phase::Updating,
    Phase::Resuming,
    Phase::Done,
];

/// How often a follower reads the run again.
const POLL: Duration = Duration::from_millis(500);

/// Calls `f` on each node in turn until one answers (an agent's own error
/// is the answer; an unreachable agent gives way to the next).
fn any_agent<T>(
    ctx: &Ctx,
    f: impl Fn(&ferry::agent::NodeSpec) -> Result<T, PeerError>,
) -> Result<T> {
    let mut last = None;
    for n in &ctx.cluster.nodes {
        match f(n) {
            Err(e @ PeerError::Unreachable { .. }) => last = Some(e),
            Err(e @ PeerError::Api { status: 503, .. }) => last = Some(e),
            other => return Ok(other?),
        }
    }
    match last {
        Some(e) => bail!("no agent of the cluster answers: {e}"),
        None => bail!("the cluster file names no node"),
    }
}

/// Asks the cluster for the run, then follows it unless `detach`.
pub fn start(ctx: &Ctx, req: StartUpdate, detach: bool, out: &Output) -> Result<ExitCode> {
    let run = any_agent(ctx, |n| ctx.run(ctx.peers.start_update(n, &req)))?;
    if detach {
        if out.json {
            print_json(&run);
        } else {
            println!(
                "rolling update {} handed to the cluster: {} nodes, one at a time; `ferry cluster update status` follows it",
                run.id,
                run.nodes.len()
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    follow(ctx, &run.id, out)
}

/// Prints each node's phase as it changes until run `id` ends, then the
/// report.
fn follow(ctx: &Ctx, id: &str, out: &Output) -> Result<ExitCode> {
    let mut told: Vec<(String, Phase)> = Vec::new();
    let run = loop {
        let run = any_agent(ctx, |n| ctx.run(ctx.peers.update_run(n)))?;
        if run.id != id {
            bail!("rolling update {id} was replaced by {}", run.id);
        }
        // Every phase a turn went through, in order (one may pass between
        // two reads).
        for t in &run.nodes {
            let through = match t.phase {
                Phase::Pending => 0,
                Phase::Draining => 1,
                Phase::Updating => 2,
                Phase::Resuming => 3,
                Phase::Done => 4,
                Phase::Failed => 0,
            };
            let passed = PHASES[..through].iter().copied();
            let failed = (t.phase == Phase::Failed).then_some(Phase::Failed);
            for phase in passed.chain(failed) {
                if !told.contains(&(t.node.clone(), phase)) {
                    eprintln!("node {}: {}", t.node, name_of(phase));
                    told.push((t.node.clone(), phase));
                }
            }
        }
        if run.state != RunState::Running {
            break run;
        }
        std::thread::sleep(POLL);
    };
    report(ctx, &run, out)
}

/// The run's report, with each node's operations as its agent shows them.
fn report(ctx: &Ctx, run: &UpdateRun, out: &Output) -> Result<ExitCode> {
    let mut nodes = Vec::new();
    for t in run.nodes.iter().filter(|t| t.phase != Phase::Pending) {
        let op = |id: &Option<String>| {
            let n = ctx.cluster.node(&t.node)?;
            ctx.run(ctx.peers.operation(n, id.as_ref()?)).ok()
        };
        nodes.push(NodeRun {
            node: t.node.clone(),
            drain: op(&t.drain),
            update: op(&t.update),
            resume: op(&t.resume),
        });
    }
    let failed = run.nodes.iter().find(|t| t.phase == Phase::Failed);
    let state = match run.state {
        RunState::Running => "running",
        RunState::Completed => "completed",
        RunState::Failed => "failed",
        RunState::Cancelled => "cancelled",
    };
    if out.json {
        print_json(&RunReport {
            id: Some(&run.id),
            command: &run.command,
            state,
            nodes: &nodes,
            stopped_at: failed.map(|t| t.node.as_str()),
            error: run.error.as_deref(),
            coordinators: Some(&run.coordinators),
        });
    } else if run.state == RunState::Running {
        print_status(run);
    } else {
        let failure = failed.map(|t| (t.node.clone(), t.error.clone().unwrap_or_default()));
        print_run(&nodes, failure.as_ref());
        if run.state == RunState::Cancelled {
            println!("{}", run.error.as_deref().unwrap_or("cancelled"));
        }
        println!("carried by: {}", run.coordinators.join(" → "));
    }
    Ok(match run.state {
        RunState::Completed | RunState::Running => ExitCode::SUCCESS,
        _ => ExitCode::from(1),
    })
}

/// A line per node: its phase and operations.
fn print_status(run: &UpdateRun) {
    println!(
        "rolling update {} ({}): {:?}",
        run.id,
        name_of(run.state),
        run.command
    );
    for t in &run.nodes {
        let ops: Vec<String> = [
            ("drain", &t.drain),
            ("update", &t.update),
            ("resume", &t.resume),
        ]
        .iter()
        .filter_map(|(k, id)| id.as_ref().map(|id| format!("{k} {id}")))
        .collect();
        let mut line = format!("  node {:<12} {:<9}", t.node, name_of(t.phase));
        if !ops.is_empty() {
            line += &format!(" ({})", ops.join(", "));
        }
        if let Some(e) = &t.error {
            line += &format!(": {e}");
        }
        println!("{}", line.trim_end());
    }
    if let Some(e) = &run.error {
        println!("  {e}");
    }
    if !run.coordinators.is_empty() {
        println!("  carried by: {}", run.coordinators.join(" → "));
    }
}

/// `ferry cluster update status`.
pub fn status(ctx: &Ctx, out: &Output) -> Result<ExitCode> {
    let run = any_agent(ctx, |n| ctx.run(ctx.peers.update_run(n)))?;
    if out.json {
        print_json(&run);
    } else {
        print_status(&run);
    }
    Ok(ExitCode::SUCCESS)
}

/// `ferry cluster update cancel`.
pub fn cancel(ctx: &Ctx, out: &Output) -> Result<ExitCode> {
    let run = any_agent(ctx, |n| ctx.run(ctx.peers.cancel_update(n)))?;
    if out.json {
        print_json(&run);
    } else {
        println!(
            "rolling update {} stops once the current node's turn ends",
            run.id
        );
    }
    Ok(ExitCode::SUCCESS)
}
