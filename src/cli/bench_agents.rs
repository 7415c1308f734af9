//! What `ferry bench drain` and `ferry bench cycle` share: three agents in
//! this process on loopback with a client of theirs, the VMs they create,
//! and waiting on an operation.

use super::args::{BenchVmArgs, GuestBackend};
use super::orchestrate::{ClusterArg, Ctx};
use crate::usage;
use anyhow::{anyhow, bail, Context, Result};
use ferry::agent::request::{Amount, CreateVm};
use ferry::agent::{Cluster, NodeSpec, OpState, OperationView};
use ferry::cpu::CpuMeter;
use std::time::{Duration, Instant};

/// Three agents (a, b, c) of one cluster file in this process, and a client.
pub(crate) struct LocalAgents {
    rt: tokio::runtime::Runtime,
    agents: Vec<ferry::agent::AgentHandle>,
    /// The client of the agents.
    pub(crate) ctx: Ctx,
    /// The agents' threads' CPU.
    pub(crate) cpu: CpuMeter,
}

impl LocalAgents {
    /// Starts the agents of `file` (nodes a, b and c).
    pub(crate) fn start(file: &std::path::Path) -> Result<Self> {
        let cluster = Cluster::load(file).map_err(|e| anyhow!("{e}"))?;
        let cpu = CpuMeter::new();
        let rt = ferry::transport::runtime("ferry-agents", 2, &cpu)?;
        let agents = ["a", "b", "c"]
            .iter()
            .map(|n| rt.block_on(ferry::agent::serve_agent(cluster.clone(), n)))
            .collect::<std::io::Result<Vec<_>>>()
            .context("starting the agents")?;
        let ctx = Ctx::new(&ClusterArg {
            cluster: file.to_path_buf(),
        })?;
        Ok(Self {
            rt,
            agents,
            ctx,
            cpu,
        })
    }

    /// Stops the agents.
    pub(crate) fn stop(self) {
        for agent in self.agents {
            self.rt.block_on(agent.shutdown());
        }
    }

    /// The node named `name`.
    pub(crate) fn node(&self, name: &str) -> Result<NodeSpec> {
        Ok(self.ctx.node(name)?.clone())
    }

    /// Waits up to `limit` for operation `id` on `node` to end; returns its
    /// record, an error unless it completed.
    pub(crate) fn wait_op(
        &self,
        node: &NodeSpec,
        id: &str,
        limit: Duration,
    ) -> Result<OperationView> {
        let deadline = Instant::now() + limit;
        loop {
            let op = self.ctx.run(self.ctx.peers.operation(node, id))?;
            match op.state {
                OpState::Running if Instant::now() > deadline => {
                    bail!("operation {id} on {} still runs after {limit:?}", node.name)
                }
                OpState::Running => std::thread::sleep(Duration::from_millis(50)),
                OpState::Completed => return Ok(op),
                _ => bail!(
                    "operation {id} on {} ended {:?}: {:?}",
                    node.name,
                    op.state,
                    op.error
                ),
            }
        }
    }

    /// Creates VMs `names` on `node` as `vms` describes, the i-th with the
    /// i-th write pattern in turn and seed i + 1.
    pub(crate) fn create_vms(
        &self,
        node: &NodeSpec,
        names: &[String],
        vms: &BenchVmArgs,
        memory: u64,
    ) -> Result<()> {
        for (i, name) in names.iter().enumerate() {
            let workload = &vms.workload.0[i % vms.workload.0.len()];
            let body = CreateVm {
                name: name.clone(),
                memory: Amount::Int(memory),
                workload: Some(workload.to_string()),
                dirty_rate: Some(Amount::Int(vms.dirty_rate)),
                fill: vms.image.is_none().then(|| vms.fill.to_string()),
                guest: Some(
                    if vms.backend == GuestBackend::Kvm {
                        "kvm"
                    } else {
                        "sim"
                    }
                    .into(),
                ),
                priority: None,
                preferred_owners: None,
                image: vms.image.as_ref().map(|p| p.display().to_string()),
                seed: Some(i as u64 + 1),
            };
            self.ctx
                .run(self.ctx.peers.create_vm(node, &body))
                .with_context(|| format!("creating {name} on {}", node.name))?;
        }
        Ok(())
    }
}

/// Each VM's memory: the image's size, or --memory (default 512 MiB).
pub(crate) fn guest_memory(a: &BenchVmArgs) -> Result<u64> {
    match &a.image {
        Some(p) => {
            if !p.is_absolute() {
                return Err(usage(
                    "--image must be an absolute path: every agent reads it",
                ));
            }
            let len = std::fs::metadata(p)
                .map_err(|e| usage(format!("cannot read RAM image {}: {e}", p.display())))?
                .len();
            match a.memory {
                Some(m) if m != len => Err(usage(format!(
                    "--memory {m} differs from the image's size {len}"
                ))),
                _ => Ok(len),
            }
        }
        None => Ok(a.memory.unwrap_or(512 << 20)),
    }
}

/// The VMs as the results' meta names them, one per write pattern
/// (`512.00 MiB hot:32MiB at 50.00 MB/s, fill ...`).
pub(crate) fn guest_labels(a: &BenchVmArgs, memory: u64) -> Vec<String> {
    let content = match &a.image {
        Some(p) => format!("image {}", p.display()),
        None => format!("fill {}", a.fill),
    };
    a.workload
        .0
        .iter()
        .map(|w| {
            format!(
                "{} {w} at {}, {content}",
                ferry::units::Bytes(memory),
                ferry::units::Rate(a.dirty_rate as f64)
            )
        })
        .collect()
}

/// A fresh folder for a bench's etcd member and cluster files.
pub(crate) fn bench_dir(name: &str) -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("ferry-bench-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Seconds since the Unix epoch.
pub(crate) fn unix_time() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
