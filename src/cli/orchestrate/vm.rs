//! `ferry vm`, `ferry migrate` and `ferry resolve`: a VM's life and moves,
//! with a progress bar per migration.

use super::*;

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
                if let Some(record) = &v.record {
                    println!("note: {record}");
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
            delta: self.delta.clone().map(Switch::Text),
            dense: self.dense.clone().map(Switch::Text),
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
    let mut watch = super::watch::Watch::new(&ctx, source, "/v1/events");
    let done = 'wait: loop {
        let events = watch.next(Duration::from_secs(1));
        // No stream, or one that may have lost the migration: ask.
        if events.is_none() || watch.ask_again() {
            let m = ctx.run(ctx.peers.migration(source, &id))?;
            if m.state.is_final() {
                break m;
            }
            show_migration(&bar, vm.spec.memory, &m);
            if events.is_none() {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        for (kind, data) in events.unwrap_or_default() {
            let Ok(m) = serde_json::from_str::<MigrationView>(&data) else {
                continue;
            };
            if kind != "migration" || m.id != id {
                continue;
            }
            if m.state.is_final() {
                break 'wait m;
            }
            show_migration(&bar, vm.spec.memory, &m);
        }
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
