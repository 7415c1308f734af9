//! `ferry node` and `ferry agent stop`: the nodes' status, their
//! operations (drain, resume, update, remove) and following one to its end.

use super::*;
use ferry::agent::step_ended;

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
            delta,
            wait,
            out,
        } => {
            let n = ctx.node(&node)?;
            let body = Drain {
                max_concurrent,
                allow_partial: Some(allow_partial),
                request_id: Some(request_id()),
                delta: delta.map(Switch::Text),
                dry_run: None,
            };
            let op = start_op(&ctx, n, "drain", &body)?;
            follow(&ctx, n, op, &wait, &out)
        }
        NodeCommand::Resume {
            node,
            failback,
            clear_quarantine,
            delta,
            wait,
            out,
        } => {
            let n = ctx.node(&node)?;
            let body = Resume {
                failback: Some(failback),
                clear_quarantine: clear_quarantine.then_some(true),
                request_id: Some(request_id()),
                delta: delta.map(Switch::Text),
            };
            let op = start_op(&ctx, n, "resume", &body)?;
            follow(&ctx, n, op, &wait, &out)
        }
        NodeCommand::Remove { node, force, out } => remove(&ctx, &node, force, &out),
    }
}

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
    if let (Some(n), Some(why)) = (
        op.params["max_concurrent"].as_u64(),
        op.params["auto"].as_str(),
    ) {
        if !out.json {
            eprintln!("{n} at once: {why}");
        }
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
    let mut migs: HashMap<String, MigrationView> = HashMap::new();
    let mut op = op;
    // The cluster's stream: the operation here, its migrations wherever
    // they run (a failback's run on the other nodes).
    let mut watch = super::watch::Watch::new(ctx, node, "/v1/cluster/events");
    let done = loop {
        let events = watch.next(Duration::from_secs(1));
        let ask = events.is_none() || watch.ask_again();
        for (kind, data) in events.unwrap_or_default() {
            let Ok(v) = serde_json::from_str::<Value>(&data) else {
                continue;
            };
            match kind.as_str() {
                "operation" if v["id"] == id.as_str() && v["node"] == node.name.as_str() => {
                    if let Ok(o) = serde_json::from_value(v) {
                        op = o;
                    }
                }
                "migration" => {
                    if let Ok(m) = serde_json::from_value::<MigrationView>(v) {
                        migs.insert(m.id.clone(), m);
                    }
                }
                _ => {}
            }
        }
        if ask {
            // No stream, or one that may have lost the operation: ask.
            op = ctx.run(ctx.peers.operation(node, &id))?;
            for s in &op.steps {
                if let ("running", Some(mid)) = (s.state.as_str(), &s.migration_id) {
                    let source = ctx.cluster.node(&s.source).unwrap_or(node);
                    if let Ok(m) = ctx.run(ctx.peers.migration(source, mid)) {
                        migs.insert(mid.clone(), m);
                    }
                }
            }
            if !watch.open() {
                std::thread::sleep(Duration::from_millis(150));
            }
        }
        // Only this operation's migrations are kept.
        migs.retain(|k, _| {
            op.steps
                .iter()
                .any(|s| s.migration_id.as_deref() == Some(k))
        });
        show_op(&op, &mp, &overall, &mut bars, &migs);
        if op.state != OpState::Running {
            break op;
        }
    };
    for (_, b) in bars {
        b.finish_and_clear();
    }
    overall.finish_and_clear();
    Ok(done)
}

/// Operation `op`'s bars: overall, and one per step whose migration runs
/// (its figures from `migs`).
fn show_op(
    op: &OperationView,
    mp: &MultiProgress,
    overall: &ProgressBar,
    bars: &mut HashMap<String, ProgressBar>,
    migs: &HashMap<String, MigrationView>,
) {
    let total = op.steps.len() as u64;
    let finished = op.steps.iter().filter(|s| step_ended(&s.state)).count() as u64;
    overall.set_position(finished);
    overall.set_message(match op.params["command"].as_str() {
        Some(cmd) => format!("running {cmd:?}"),
        None => format!("{finished}/{total} VMs"),
    });
    for s in &op.steps {
        match (s.state.as_str(), &s.migration_id) {
            ("running", Some(mid)) => {
                let Some(m) = migs.get(mid) else { continue };
                let bar = bars.entry(s.vm.clone()).or_insert_with(|| {
                    let b = mp.add(ProgressBar::new(1));
                    b.set_style(bar_style());
                    b.set_prefix(format!("{} → {}", s.vm, s.target));
                    b
                });
                show_migration(bar, s.memory, m);
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
