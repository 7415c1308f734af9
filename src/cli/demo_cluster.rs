//! `ferry demo cluster`: a local etcd member and three agents in one
//! process on loopback, VMs on node a, a drain with progress bars, and a
//! failback.

use super::orchestrate::{node, print_steps, took, watch_op, ClusterArg, Ctx, NodeCommand, Output};
use anyhow::{anyhow, Result};
use clap::Args;
use ferry::agent::request::{Amount, CreateVm, Drain, Resume};
use ferry::agent::{Cluster, OpState};
use std::process::ExitCode;

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
    /// After the failback, keep the agents and VMs running until Ctrl-C,
    /// to look around in the web console.
    #[arg(long)]
    pub stay: bool,
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
    let result = super::local_etcd::LocalEtcd::start(&dir).and_then(|etcd| {
        let settings = "[defaults]\nmax_concurrent_migrations = 2\n";
        let file = write_cluster(&dir, &etcd.endpoint, settings, 16 << 30)?;
        run(&a, &file, &etcd.endpoint)
    });
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Writes a token and a cluster file of three nodes (a, b, c) on loopback
/// into `dir`, their state in etcd at `endpoint`, each holding `capacity`
/// bytes of VMs; `settings` (TOML: top-level keys, then tables such as
/// `[defaults]`) goes between the file's top and its nodes.
pub(crate) fn write_cluster(
    dir: &std::path::Path,
    endpoint: &str,
    settings: &str,
    capacity: u64,
) -> Result<std::path::PathBuf> {
    let mut addrs = Vec::new();
    for _ in 0..3 {
        addrs.push((
            format!("127.0.0.1:{}", free_port()?),
            format!("127.0.0.1:{}", free_port()?),
        ));
    }
    write_cluster_at(dir, endpoint, settings, capacity, &addrs)
}

/// As [`write_cluster`], node i (a, b, c) at `addrs[i]` (control, data).
pub(crate) fn write_cluster_at(
    dir: &std::path::Path,
    endpoint: &str,
    settings: &str,
    capacity: u64,
    addrs: &[(String, String)],
) -> Result<std::path::PathBuf> {
    std::fs::create_dir_all(dir)?;
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
        "token_file = \"cluster.token\"\n# a demo on loopback: plain HTTP\ninsecure_api = true\n"
            .to_string();
    text += &format!("etcd = [\"{}\"]\n", endpoint);
    text += settings;
    for (name, (control, data)) in ["a", "b", "c"].iter().zip(addrs) {
        text += &format!(
            "[[node]]\nname = \"{name}\"\ncontrol = \"{control}\"\ndata = \"{data}\"\nmemory_capacity = {capacity}\n"
        );
    }
    let file = dir.join("cluster.toml");
    std::fs::write(&file, &text)?;
    Ok(file)
}

/// The demo itself: the agents, the VMs, the drain and the failback.
fn run(a: &DemoClusterArgs, file: &std::path::Path, etcd_endpoint: &str) -> Result<ExitCode> {
    let cluster = Cluster::load(file).map_err(|e| anyhow!("{e}"))?;
    let cpu = ferry::cpu::CpuMeter::new();
    let rt = ferry::transport::runtime("ferry-agents", 2, &cpu)?;
    let agents = ["a", "b", "c"]
        .iter()
        .map(|n| rt.block_on(ferry::agent::serve_agent(cluster.clone(), n)))
        .collect::<std::io::Result<Vec<_>>>()?;
    eprintln!(
        "ferry demo cluster: agents a, b and c on loopback ({}), at most 2 migrations per node at once, their state in etcd at {}",
        file.display(),
        etcd_endpoint
    );
    let ctx = Ctx::new(&ClusterArg {
        cluster: file.to_path_buf(),
    })?;
    let token_file = file.with_file_name("cluster.token");
    eprintln!(
        "the web console: http://{}/ui/ (any agent's; sign in with the token in {})",
        agents[0].control_addr,
        token_file.display()
    );
    let a_node = ctx.node("a")?.clone();
    create_vms(&ctx, &a_node, a)?;
    let show = |title: &str| status(title, file);
    let kind = if a.guest == "kvm" { "KVM" } else { "synthetic" };
    show(&format!(
        "{} {kind} VMs of {} each on node a, each writing {}:",
        a.vms, a.memory, a.dirty_rate
    ))?;
    let writes = || -> u64 {
        agents
            .iter()
            .filter_map(|h| h.node.etcd_counts())
            .map(|(_, w)| w)
            .sum()
    };
    println!("\n$ ferry node drain a");
    let before = writes();
    let op = ctx.run(ctx.peers.act_on(&a_node, "a", "drain", &Drain::default()))?;
    let drained = watch_op(&ctx, &a_node, op)?;
    print_steps(&drained);
    println!(
        "drain of node a {}{}",
        super::orchestrate::name_of(drained.state),
        took(&drained)
    );
    let moved = drained.steps.len().max(1) as f64;
    let w = writes() - before;
    println!(
        "etcd writes for the drain: {w} ({:.1} per migration)",
        w as f64 / moved
    );
    show("after the drain:")?;
    println!("\n$ ferry node resume a --failback");
    let failback = Resume {
        failback: Some(true),
        ..Resume::default()
    };
    let op = ctx.run(ctx.peers.act_on(&a_node, "a", "resume", &failback))?;
    let resumed = watch_op(&ctx, &a_node, op)?;
    print_steps(&resumed);
    println!(
        "resume of node a {}{}",
        super::orchestrate::name_of(resumed.state),
        took(&resumed)
    );
    show("after the failback:")?;
    if a.stay {
        let token = std::fs::read_to_string(&token_file)?;
        eprintln!(
            "\nthe agents keep running: open http://{}/ui/ and sign in with {token}; Ctrl-C ends the demo",
            agents[0].control_addr
        );
        rt.block_on(tokio::signal::ctrl_c())?;
    }
    // Deleted, not left for the cluster to restart as each agent stops.
    for i in 1..=a.vms {
        ctx.run(ctx.peers.delete_vm(&a_node, &format!("vm{i}"), false))?;
    }
    for agent in agents {
        rt.block_on(agent.shutdown());
    }
    let ok = drained.state == OpState::Completed && resumed.state == OpState::Completed;
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Creates the demo's VMs on node a.
fn create_vms(ctx: &Ctx, a_node: &ferry::agent::NodeSpec, a: &DemoClusterArgs) -> Result<()> {
    for i in 1..=a.vms {
        let body = CreateVm {
            name: format!("vm{i}"),
            memory: Amount::Text(a.memory.clone()),
            workload: Some("hot:32MiB".into()),
            dirty_rate: Some(Amount::Text(a.dirty_rate.clone())),
            fill: None,
            guest: Some(a.guest.clone()),
            priority: None,
            preferred_owners: None,
            image: None,
            seed: None,
        };
        ctx.run(ctx.peers.create_vm(a_node, &body))?;
    }
    Ok(())
}

/// `ferry node status` under a title.
fn status(title: &str, file: &std::path::Path) -> Result<()> {
    println!("\n{title}");
    node(
        NodeCommand::Status {
            out: Output { json: false },
        },
        &ClusterArg {
            cluster: file.to_path_buf(),
        },
    )?;
    Ok(())
}
