//! `ferry cluster update` on a cluster on etcd: the run is handed to the
//! cluster (any agent that answers takes it; the coordinator carries it
//! out), then followed until it ends unless `--detach`; `status` and
//! `cancel` read and stop it from any terminal.

use super::orchestrate::{name_of, print_json, Ctx, Output};
use super::update::{print_run, NodeRun, RunReport};
use anyhow::{bail, Result};
use ferry::agent::peer::PeerError;
use ferry::agent::rolling::{Phase, RunState, StartUpdate, UpdateRun};
use ferry::agent::schedule::{SetSchedule, UpdateSchedule};
use std::process::ExitCode;
use std::time::Duration;

/// A turn's phases, in order.
const PHASES: [Phase; 6] = [
    Phase::PreUpdate,
    Phase::Draining,
    Phase::Updating,
    Phase::Resuming,
    Phase::PostUpdate,
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
        let phases: Vec<Phase> = PHASES
            .into_iter()
            .filter(|p| match p {
                Phase::PreUpdate => run.pre_update.is_some(),
                Phase::PostUpdate => run.post_update.is_some(),
                _ => true,
            })
            .collect();
        for t in &run.nodes {
            let through = phases
                .iter()
                .position(|p| *p == t.phase)
                .map_or(0, |i| i + 1);
            let passed = phases[..through].iter().copied();
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
            ("pre-update", &t.pre),
            ("drain", &t.drain),
            ("update", &t.update),
            ("resume", &t.resume),
            ("post-update", &t.post),
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

/// `ferry cluster update status`: the run (if any), then the schedule.
pub fn status(ctx: &Ctx, out: &Output) -> Result<ExitCode> {
    let run = any_agent(ctx, |n| match ctx.run(ctx.peers.update_run(n)) {
        Err(PeerError::Api { status: 404, .. }) => Ok(None),
        other => other.map(Some),
    })?;
    let schedule = any_agent(ctx, |n| match ctx.run(ctx.peers.update_schedule(n)) {
        Err(PeerError::Api { status: 404, .. }) => Ok(None),
        other => other.map(Some),
    })?;
    if out.json {
        // The run's own fields, with the schedule beside them.
        let mut v = match &run {
            Some(run) => serde_json::to_value(run).expect("views serialize"),
            None => serde_json::json!({}),
        };
        if let (Some(o), Some(s)) = (v.as_object_mut(), &schedule) {
            o.insert(
                "schedule".into(),
                serde_json::to_value(s).expect("views serialize"),
            );
        }
        print_json(&v);
        return Ok(ExitCode::SUCCESS);
    }
    match &run {
        Some(run) => print_status(run),
        None => println!("no rolling update has run"),
    }
    match &schedule {
        Some(s) => println!("{}", scheduled(s)),
        None => println!("no update is scheduled"),
    }
    Ok(ExitCode::SUCCESS)
}

/// A schedule in words.
fn scheduled(s: &UpdateSchedule) -> String {
    format!(
        "scheduled {:?}: {:?}, next at {} UTC{}",
        s.schedule,
        s.request.command,
        utc(s.next_at_ms),
        s.last_run
            .as_ref()
            .map_or(String::new(), |r| format!(" (last: {r})"))
    )
}

/// `ms` since the Unix epoch as `YYYY-MM-DD HH:MM:SS`.
fn utc(ms: u64) -> String {
    let (days, secs) = (ms / 86_400_000, ms / 1000 % 86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// `ferry cluster update --run CMD --schedule WHEN`.
pub fn schedule(ctx: &Ctx, when: String, req: StartUpdate, out: &Output) -> Result<ExitCode> {
    let body = SetSchedule {
        schedule: when,
        request: req,
    };
    let s = any_agent(ctx, |n| ctx.run(ctx.peers.set_update_schedule(n, &body)))?;
    if out.json {
        print_json(&s);
    } else {
        println!("{}", scheduled(&s));
    }
    Ok(ExitCode::SUCCESS)
}

/// `ferry cluster update unschedule`.
pub fn unschedule(ctx: &Ctx, out: &Output) -> Result<ExitCode> {
    let s = any_agent(ctx, |n| ctx.run(ctx.peers.remove_update_schedule(n)))?;
    if out.json {
        print_json(&s);
    } else {
        println!("removed the schedule {:?}", s.schedule);
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
