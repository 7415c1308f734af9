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
use ferry::transport::Namespace;
use std::time::{Duration, Instant};

/// Three agents (a, b, c) of one cluster file in this process, and a client.
pub(crate) struct LocalAgents {
    /// The runtimes the agents run on: one, or a's and then b's and c's.
    rts: Vec<tokio::runtime::Runtime>,
    /// Each agent, with the index of its runtime.
    agents: Vec<(usize, ferry::agent::AgentHandle)>,
    /// The client of the agents.
    pub(crate) ctx: Ctx,
    /// The agents' threads' CPU.
    pub(crate) cpu: CpuMeter,
}

impl LocalAgents {
    /// Starts the agents of `file` (nodes a, b and c) on one runtime.
    pub(crate) fn start(file: &std::path::Path) -> Result<Self> {
        Self::start_in(file, None)
    }

    /// Starts the agents of `file`: with `split`, a on a runtime whose
    /// threads live in the first namespace and b and c in the second (the
    /// two ends of a tbf link), each agent started on its runtime's own
    /// threads so its listeners are bound there.
    pub(crate) fn start_in(
        file: &std::path::Path,
        split: Option<(Namespace, Namespace)>,
    ) -> Result<Self> {
        let cluster = Cluster::load(file).map_err(|e| anyhow!("{e}"))?;
        let cpu = CpuMeter::new();
        let (rts, homes) = match split {
            None => (
                vec![ferry::transport::runtime("ferry-agents", 2, &cpu)?],
                [0, 0, 0],
            ),
            Some((a, rest)) => (
                vec![
                    ferry::transport::runtime_in("ferry-agent-a", 1, &cpu, Some(a))?,
                    ferry::transport::runtime_in("ferry-agents-bc", 2, &cpu, Some(rest))?,
                ],
                [0, 1, 1],
            ),
        };
        let mut agents = Vec::new();
        for (name, home) in ["a", "b", "c"].into_iter().zip(homes) {
            let cluster = cluster.clone();
            let agent = rts[home]
                .block_on(
                    rts[home].spawn(async move { ferry::agent::serve_agent(cluster, name).await }),
                )
                .context("starting an agent")?
                .with_context(|| format!("starting agent {name}"))?;
            agents.push((home, agent));
        }
        let ctx = Ctx::new(&ClusterArg {
            cluster: file.to_path_buf(),
        })?;
        Ok(Self {
            rts,
            agents,
            ctx,
            cpu,
        })
    }

    /// Stops the agents.
    pub(crate) fn stop(self) {
        drop(self);
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

    /// Waits up to `limit` until VM `name` runs on `node`: a migration
    /// reported completed by its source may still be settling there.
    pub(crate) fn wait_running(&self, node: &NodeSpec, name: &str, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            match self.ctx.run(self.ctx.peers.vm(node, name)) {
                Ok(v) if v.state == ferry::agent::VmState::Running => return Ok(()),
                _ if Instant::now() > deadline => {
                    bail!("{name} is not running on {} after {limit:?}", node.name)
                }
                _ => std::thread::sleep(Duration::from_millis(20)),
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

impl Drop for LocalAgents {
    /// Stops the agents, on error paths too: a runtime dropped with agents
    /// still on it would wait for their blocking work.
    fn drop(&mut self) {
        for (home, agent) in self.agents.drain(..) {
            let rt = &self.rts[home];
            let _ = rt.block_on(rt.spawn(agent.shutdown()));
        }
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
    .and_then(|m| {
        ferry::memory::GuestMemory::check_size(m).map_err(|e| usage(format!("--memory: {e}")))?;
        Ok(m)
    })
}

/// What each node must hold: `vms` VMs of `memory` (at most 16 TiB each,
/// so no overflow), at least 16 GiB.
pub(crate) fn capacity(memory: u64, vms: u32) -> u64 {
    memory.saturating_mul(u64::from(vms)).max(16 << 30)
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
    // A killed run's folder under a recycled pid: its etcd data must go.
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Seconds since the Unix epoch.
pub(crate) fn unix_time() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Where a bench's agents meet: loopback, with the node's own cap as its
/// link, or (root, Linux) node a in one network namespace and b and c in
/// another, joined by a veth pair whose a side a `tc` tbf qdisc shapes.
pub(crate) struct Topology {
    tbf: Option<ferry::transport::netns::TbfLink>,
}

impl Topology {
    /// `link` is `cap` or `tbf` (set up here, torn down on drop).
    pub(crate) fn new(link: &str) -> Result<Self> {
        if link != "tbf" {
            return Ok(Self { tbf: None });
        }
        ferry::transport::netns::tbf_available().map_err(usage)?;
        let tbf = ferry::transport::netns::TbfLink::new()
            .context("setting up the tbf link (network namespaces, veth, tc)")?;
        Ok(Self { tbf: Some(tbf) })
    }

    /// Moves the calling thread to where etcd and the bench's client live
    /// (b's and c's side); returns etcd's host and its namespace.
    pub(crate) fn enter_client_side(&self) -> Result<(&'static str, Option<String>)> {
        match &self.tbf {
            None => Ok(("127.0.0.1", None)),
            Some(t) => {
                t.destination().enter()?;
                let name = t.destination().name().to_string();
                Ok((ferry::transport::netns::DEST_IP, Some(name)))
            }
        }
    }

    /// Sets the link to `bps`; returns the cap the node itself must keep
    /// (`None` where the kernel shapes the link).
    pub(crate) fn set_link(&mut self, bps: Option<u64>) -> Result<Option<u64>> {
        match &mut self.tbf {
            None => Ok(bps),
            Some(t) => {
                t.set_rate(bps).context("shaping the tbf link")?;
                Ok(None)
            }
        }
    }

    /// The nodes' (control, data) addresses for the `n`-th cluster of a
    /// run: free loopback ports, or in the namespaces (fresh, so nothing
    /// else listens there) ports of their own per cluster.
    pub(crate) fn addrs(&self, n: u16) -> Result<Vec<(String, String)>> {
        use ferry::transport::netns::{DEST_IP, SOURCE_IP};
        if self.tbf.is_none() {
            let port = || -> Result<u16> {
                Ok(std::net::TcpListener::bind("127.0.0.1:0")?
                    .local_addr()?
                    .port())
            };
            return (0..3)
                .map(|_| {
                    Ok((
                        format!("127.0.0.1:{}", port()?),
                        format!("127.0.0.1:{}", port()?),
                    ))
                })
                .collect();
        }
        let base = 7100 + (n % 400) * 6;
        let hosts = [SOURCE_IP, DEST_IP, DEST_IP];
        Ok((0..3u16)
            .map(|i| {
                let p = base + 2 * i;
                (
                    format!("{}:{p}", hosts[i as usize]),
                    format!("{}:{}", hosts[i as usize], p + 1),
                )
            })
            .collect())
    }

    /// The namespaces of a's side and of b's and c's, when split.
    pub(crate) fn split(&self) -> Option<(Namespace, Namespace)> {
        self.tbf
            .as_ref()
            .map(|t| (t.source().clone(), t.destination().clone()))
    }
}
