//! `ferry cluster update`: a rolling update in the manner of Cluster-Aware
//! Updating, one node at a time (drain, run the command through the node's
//! update hook, resume with failback), and its `--dry-run` plan.

use super::orchestrate::{print_json, ClusterArg, Ctx, Output};
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use ferry::agent::{NodeMode, NodeView, OperationView};
use ferry::units::Bytes;
use serde::Serialize;
use std::process::ExitCode;

/// `ferry cluster ...`
#[derive(Subcommand, Debug)]
pub enum ClusterCommand {
    /// Roll an update through the cluster, one node at a time: drain it, run
    /// the command on it through its agent's update_hook, resume it with
    /// failback. Stops at the first failure, leaving that node paused. The
    /// cluster runs it (its coordinator), not this terminal.
    Update(UpdateArgs),
}

/// `ferry cluster update`.
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct UpdateArgs {
    #[command(subcommand)]
    sub: Option<UpdateSub>,
    /// The update command, given to each node's update_hook.
    #[arg(long, value_name = "COMMAND")]
    run: Option<String>,
    /// Print the plan (the order, where each VM would go) and move nothing.
    #[arg(long)]
    dry_run: bool,
    /// Check whether the cluster is ready for a rolling update (every node
    /// online and reachable, hooks present, each node's VMs fitting on the
    /// others, etcd healthy, one version everywhere); move nothing.
    #[arg(long, conflicts_with_all = ["dry_run", "preview"])]
    analyze: bool,
    /// Run each node's preview_hook (never its update hook) to show what the
    /// update would install; move nothing.
    #[arg(long, conflicts_with = "dry_run")]
    preview: bool,
    /// return once the cluster has the run (`ferry cluster
    /// update status` follows it).
    #[arg(long)]
    detach: bool,
    /// whether a resumed node gets back the VMs its drain moved.
    #[arg(long, value_name = "none|immediate")]
    failback: Option<String>,
    /// on or off: each VM failed back sends only the pages that changed
    /// since it left, where its node kept its image [default: on].
    #[arg(long, value_parser = ["on", "off"])]
    delta: Option<String>,
    /// the nodes in the order to update them, comma-separated
    /// [default: the cluster file's order].
    #[arg(long, value_name = "NODES", value_delimiter = ',')]
    node_order: Vec<String>,
    /// how many nodes' turns may fail before the run stops
    /// [default: 0, the first failure stops it].
    #[arg(long, value_name = "N")]
    max_failed_nodes: Option<u32>,
    /// how many times a node's failed phase (drain, update
    /// command, resume) is tried again before its turn fails [default: 0].
    #[arg(long, value_name = "N")]
    max_retries_per_node: Option<u32>,
    /// start, and start each node's turn, only while every node
    /// of the run holds its lease.
    #[arg(long)]
    require_all_nodes_online: bool,
    /// a command each node's update hook runs before its drain.
    #[arg(long, value_name = "COMMAND")]
    pre_update: Option<String>,
    /// a command each node's update hook runs after its resume.
    #[arg(long, value_name = "COMMAND")]
    post_update: Option<String>,
    /// run it on a schedule instead of now: "sun 03:00" (a
    /// weekday and a time, UTC) or "every 24h"; the cluster starts each run
    /// itself. Replaces the schedule there was.
    #[arg(long, value_name = "WHEN")]
    schedule: Option<String>,
    /// how long each node's update command may take; one that
    /// restarts the node's agent succeeds when the agent is back within it
    /// [default: 1h].
    #[arg(long, value_name = "DURATION")]
    stop_after: Option<String>,
    #[command(flatten)]
    out: Output,
}

/// `ferry cluster update status|cancel`.
#[derive(Subcommand, Debug)]
pub enum UpdateSub {
    /// The cluster's rolling update: each node's phase and operations.
    Status {
        #[command(flatten)]
        out: Output,
    },
    /// Stop the cluster's rolling update once the current node's turn ends.
    Cancel {
        #[command(flatten)]
        out: Output,
    },
    /// Remove the cluster's update schedule (a run under way goes on).
    Unschedule {
        #[command(flatten)]
        out: Output,
    },
}

/// One node's run of the update: its three operations, as far as they went.
#[derive(Debug, Serialize)]
pub(crate) struct NodeRun {
    pub(crate) node: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) drain: Option<OperationView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) update: Option<OperationView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) resume: Option<OperationView>,
}

/// How the whole run went, as `--json` prints it.
#[derive(Debug, Serialize)]
pub(crate) struct RunReport<'a> {
    /// the run's id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) id: Option<&'a str>,
    pub(crate) command: &'a str,
    pub(crate) state: &'static str,
    pub(crate) nodes: &'a [NodeRun],
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) stopped_at: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<&'a str>,
    /// the coordinators that carried it, in turn.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) coordinators: Option<&'a [String]>,
}

/// `ferry cluster ...`
pub fn cluster(cmd: ClusterCommand, cluster: &ClusterArg) -> Result<ExitCode> {
    let ctx = Ctx::new(cluster)?;
    let ClusterCommand::Update(args) = cmd;
    let UpdateArgs {
        sub,
        run,
        dry_run,
        analyze,
        preview,
        detach,
        failback,
        delta,
        node_order,
        stop_after,
        schedule,
        max_failed_nodes,
        max_retries_per_node,
        require_all_nodes_online,
        pre_update,
        post_update,
        out,
    } = args;
    match sub {
        Some(UpdateSub::Status { out }) => return super::rolling::status(&ctx, &out),
        Some(UpdateSub::Cancel { out }) => return super::rolling::cancel(&ctx, &out),
        Some(UpdateSub::Unschedule { out }) => return super::rolling::unschedule(&ctx, &out),
        None => {}
    }
    if analyze {
        return super::analyze::analyze(&ctx, &out);
    }
    let run = run.ok_or_else(|| crate::usage("--run: the update command each node's hook runs"))?;
    if preview {
        return super::analyze::preview(&ctx, &run, &out);
    }
    if dry_run {
        let mut states = Vec::new();
        for n in &ctx.cluster.nodes {
            let v = ctx.run(ctx.peers.node(n)).with_context(|| {
                format!(
                    "a rolling update needs every node; node {} does not answer",
                    n.name
                )
            })?;
            states.push(v);
        }
        let delta = delta.as_deref() != Some("off");
        return dry(&ctx, (&run, delta), &states, &out);
    }
    let start = ferry::agent::rolling::StartUpdate {
        command: run,
        failback,
        node_order: (!node_order.is_empty()).then_some(node_order),
        stop_after,
        max_failed_nodes,
        max_retries_per_node,
        require_all_nodes_online: require_all_nodes_online.then_some(true),
        pre_update,
        post_update,
        delta,
    };
    if let Some(when) = schedule {
        return super::rolling::schedule(&ctx, when, start, &out);
    }
    super::rolling::start(&ctx, start, detach, &out)
}

/// A line per node of a run, then how it ended.
pub(crate) fn print_run(report: &[NodeRun], failure: Option<&(String, String)>) {
    for e in report {
        let mut line = format!("node {}:", e.node);
        if let Some(d) = &e.drain {
            line += &format!(" drained ({} VMs)", d.steps.len());
        }
        if let Some(run) = e.update.as_ref().and_then(|u| u.update.as_ref()) {
            let code = run
                .exit_code
                .map_or("abnormally".to_string(), |c| c.to_string());
            line += &format!(", update exited {code} in {} ms", run.duration_ms);
        }
        if let Some(r) = &e.resume {
            let back = r.steps.iter().filter(|s| s.state == "completed").count();
            line += &format!(", resumed ({back} VMs back)");
        }
        println!("{line}");
    }
    match failure {
        None => println!("rolling update completed on {} nodes", report.len()),
        Some((node, e)) => {
            println!("rolling update stopped at node {node}, which is left paused: {e}")
        }
    }
}

/// `--dry-run`: prints the plan; exit 1 when a drain would be refused.
fn dry(
    ctx: &Ctx,
    (run, delta): (&str, bool),
    states: &[NodeView],
    out: &Output,
) -> Result<ExitCode> {
    let plan = plan_update(ctx, states, delta);
    if out.json {
        #[derive(Serialize)]
        struct Dry<'a> {
            command: &'a str,
            plan: &'a [PlanStep],
        }
        print_json(&Dry {
            command: run,
            plan: &plan,
        });
    } else {
        println!("rolling update {run:?}, one node at a time:");
        for (i, step) in plan.iter().enumerate() {
            println!(
                "{}. node {}: drain, run the command, resume with failback",
                i + 1,
                step.node
            );
            for m in &step.moves {
                let memory = Bytes(m.memory).to_string();
                let base = match m.base {
                    ferry::agent::Held::Own => " (it keeps the VM's image)",
                    ferry::agent::Held::Kin => " (it keeps a kin's copy)",
                    ferry::agent::Held::None => "",
                };
                println!("     {:<16} {memory:>10} → {}{base}", m.vm, m.target);
            }
            for m in &step.unplaced {
                println!(
                    "     {:<16} no node has room: the drain would be refused",
                    m.vm
                );
            }
        }
    }
    let blocked = plan.iter().any(|p| !p.unplaced.is_empty());
    Ok(if blocked {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// One node's drain in the plan.
#[derive(Debug, Serialize)]
pub(crate) struct PlanStep {
    pub(crate) node: String,
    moves: Vec<Move>,
    pub(crate) unplaced: Vec<Unplaced>,
}

#[derive(Debug, Serialize)]
struct Move {
    vm: String,
    memory: u64,
    target: String,
    /// What the target holds that the VM would start from.
    #[serde(skip_serializing_if = "ferry::agent::Held::is_none")]
    base: ferry::agent::Held,
}

#[derive(Debug, Serialize)]
pub(crate) struct Unplaced {
    vm: String,
    memory: u64,
}

/// Where each node's VMs would go when it is drained in turn, the others as
/// they are now (each node's VMs come back before the next is drained);
/// with `delta`, preferring nodes whose views show a copy of a VM's memory.
pub(crate) fn plan_update(ctx: &Ctx, states: &[NodeView], delta: bool) -> Vec<PlanStep> {
    let nodes = || ctx.cluster.nodes.iter().zip(states);
    nodes()
        .map(|(n, st)| {
            let vms: Vec<(String, u64)> = st
                .vms
                .iter()
                .map(|v| (v.spec.name.clone(), v.spec.memory))
                .collect();
            let others =
                || nodes().filter(|(o, s)| o.name != n.name && s.state == NodeMode::Active);
            let free: Vec<(String, u64)> = others()
                .map(|(o, s)| {
                    let free = s.free_memory();
                    (o.name.clone(), free)
                })
                .collect();
            // What the others' views show they keep (warm copies are not
            // in a view); the drain itself also asks for those.
            let specs: Vec<_> = st.vms.iter().map(|v| v.spec.clone()).collect();
            let near = match delta {
                true => ferry::agent::Near::from_views(&specs, others().map(|(_, s)| s), true),
                false => ferry::agent::Near::default(),
            };
            let (placed, left) = ferry::agent::place_near(&vms, &free, &near);
            let memory = |vm: &str| vms.iter().find(|(v, _)| v == vm).map_or(0, |(_, m)| *m);
            let bases = near.bases(&placed);
            PlanStep {
                node: n.name.clone(),
                moves: placed
                    .into_iter()
                    .zip(bases)
                    .map(|((vm, target), base)| Move {
                        memory: memory(&vm),
                        base,
                        vm,
                        target,
                    })
                    .collect(),
                unplaced: left
                    .into_iter()
                    .map(|(vm, memory)| Unplaced { vm, memory })
                    .collect(),
            }
        })
        .collect()
}
