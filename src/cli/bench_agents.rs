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
    /// Starts the agents of `file` where `places` says: each agent on its
    /// runtime's own threads, so that its listeners are bound in that
    /// runtime's namespace.
    pub(crate) fn start_in(file: &std::path::Path, places: Places) -> Result<Self> {
        let cluster = Cluster::load(file).map_err(|e| anyhow!("{e}"))?;
        let cpu = CpuMeter::new();
        let rts = places
            .rts
            .into_iter()
            .map(|(name, workers, ns)| ferry::transport::runtime_in(name, workers, &cpu, ns))
            .collect::<std::io::Result<Vec<_>>>()?;
        let homes = places.homes;
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

/// The runtimes agents a, b and c run on: each runtime's name, workers and
/// network namespace, and which runtime each agent is on.
pub(crate) struct Places {
    rts: Vec<(&'static str, usize, Option<Namespace>)>,
    homes: [usize; 3],
}

impl Places {
    /// One runtime of two workers on loopback.
    fn loopback() -> Self {
        Self {
            rts: vec![("ferry-agents", 2, None)],
            homes: [0, 0, 0],
        }
    }
}

/// Where a bench's agents meet: loopback, with the node's own cap as its
/// link; or (root, Linux) node a in one network namespace and b and c in
/// another, joined by a veth pair whose a side a `tc` tbf qdisc shapes
/// (`pair`); or each node in a namespace of its own, every node's side
/// shaped, around a hub where etcd and the client are (`star`).
pub(crate) struct Topology {
    tbf: Option<ferry::transport::netns::TbfLink>,
    star: Option<ferry::transport::netns::TbfStar>,
}

impl Topology {
    /// `link` is `cap` or `tbf` (a pair, set up here, torn down on drop).
    pub(crate) fn new(link: &str) -> Result<Self> {
        if link != "tbf" {
            return Ok(Self {
                tbf: None,
                star: None,
            });
        }
        ferry::transport::netns::tbf_available().map_err(usage)?;
        let tbf = ferry::transport::netns::TbfLink::new()
            .context("setting up the tbf link (network namespaces, veth, tc)")?;
        Ok(Self {
            tbf: Some(tbf),
            star: None,
        })
    }

    /// `link` is `cap` or `tbf` (a star of three nodes, set up here, torn
    /// down on drop).
    pub(crate) fn star(link: &str) -> Result<Self> {
        if link != "tbf" {
            return Self::new(link);
        }
        ferry::transport::netns::tbf_available().map_err(usage)?;
        let star = ferry::transport::netns::TbfStar::new(3)
            .context("setting up the tbf links (network namespaces, a bridge, veth, tc)")?;
        Ok(Self {
            tbf: None,
            star: Some(star),
        })
    }

    /// Moves the calling thread to where etcd and the bench's client live
    /// (b's and c's side of a pair, a star's hub); returns etcd's host and
    /// its namespace.
    pub(crate) fn enter_client_side(&self) -> Result<(&'static str, Option<String>)> {
        let (ns, host) = match (&self.tbf, &self.star) {
            (Some(t), _) => (t.destination(), ferry::transport::netns::DEST_IP),
            (_, Some(s)) => (s.hub(), ferry::transport::netns::HUB_IP),
            _ => return Ok(("127.0.0.1", None)),
        };
        ns.enter()?;
        Ok((host, Some(ns.name().to_string())))
    }

    /// Sets the link (each node's, in a star) to `bps`; returns the cap the
    /// node itself must keep (`None` where the kernel shapes the link).
    pub(crate) fn set_link(&mut self, bps: Option<u64>) -> Result<Option<u64>> {
        if let Some(t) = &mut self.tbf {
            t.set_rate(bps).context("shaping the tbf link")?;
        } else if let Some(s) = &mut self.star {
            s.set_rate(bps).context("shaping the tbf links")?;
        } else {
            return Ok(bps);
        }
        Ok(None)
    }

    /// The nodes' (control, data) addresses for the `n`-th cluster of a
    /// run: free loopback ports, or in the namespaces (fresh, so nothing
    /// else listens there) ports of their own per cluster.
    pub(crate) fn addrs(&self, n: u16) -> Result<Vec<(String, String)>> {
        use ferry::transport::netns::{node_ip, DEST_IP, SOURCE_IP};
        let hosts = match (&self.tbf, &self.star) {
            (Some(_), _) => [SOURCE_IP, DEST_IP, DEST_IP].map(String::from),
            (_, Some(_)) => [0, 1, 2].map(node_ip),
            _ => {
                // All six held until all are chosen: no two the same.
                let held = (0..6)
                    .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
                    .collect::<std::io::Result<Vec<_>>>()?;
                let ports = held
                    .iter()
                    .map(|l| Ok(l.local_addr()?.port()))
                    .collect::<Result<Vec<u16>>>()?;
                return Ok(ports
                    .chunks(2)
                    .map(|p| (format!("127.0.0.1:{}", p[0]), format!("127.0.0.1:{}", p[1])))
                    .collect());
            }
        };
        let base = 7100 + (n % 400) * 6;
        Ok((0..3u16)
            .map(|i| {
                let (host, p) = (&hosts[i as usize], base + 2 * i);
                (format!("{host}:{p}"), format!("{host}:{}", p + 1))
            })
            .collect())
    }

    /// The runtimes the agents run on: in a pair, a's on a's side and one
    /// for b and c on theirs; in a star, one per node in its namespace.
    pub(crate) fn places(&self) -> Places {
        if let Some(t) = &self.tbf {
            return Places {
                rts: vec![
                    ("ferry-agent-a", 1, Some(t.source().clone())),
                    ("ferry-agents-bc", 2, Some(t.destination().clone())),
                ],
                homes: [0, 1, 1],
            };
        }
        if let Some(s) = &self.star {
            let names = ["ferry-agent-a", "ferry-agent-b", "ferry-agent-c"];
            return Places {
                rts: (0..3)
                    .map(|i| (names[i], 1, Some(s.node(i).clone())))
                    .collect(),
                homes: [0, 1, 2],
            };
        }
        Places::loopback()
    }
}
