//! `ferry agent`: runs a node agent until SIGINT or SIGTERM, or stops one
//! (`ferry agent stop`).

use crate::cli::args::*;
use crate::{orchestrate, usage};
use anyhow::{Context, Result};
use ferry::cpu::CpuMeter;
use std::path::PathBuf;
use std::process::ExitCode;

pub fn agent(a: AgentArgs) -> Result<ExitCode> {
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
