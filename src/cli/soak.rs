//! `ferry bench soak`: two real `ferry agent` processes, guests with
//! dirtying workloads moved back and forth between them, hundreds of times;
//! counts mismatches (must be none) and failures, and shows each agent's
//! resident memory and open file descriptors at the start and the end
//! (which must stay flat).

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use ferry::agent::peer::PeerError;
use ferry::agent::peer::Peers;
use ferry::agent::request::{Amount, CreateMigration, CreateVm, MigrationParams};
use ferry::agent::{Cluster, MigrationState, NodeSpec};
use ferry::units::Bytes;
use serde_json::{json, Value};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

/// `ferry bench soak`.
#[derive(Args, Debug)]
pub struct SoakArgs {
    /// Migrations in all (each move of one VM counts one); rounded up to
    /// whole round trips.
    #[arg(long, default_value_t = 200)]
    pub count: u32,
    /// Stop after this long even if `--count` is not reached.
    #[arg(long, default_value = "10m", value_parser = crate::duration_arg)]
    pub duration: Duration,
    /// VMs moved at once (each node runs at most 2 migrations at a time).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub vms: u32,
    /// Memory of each VM.
    #[arg(long, default_value = "64MiB", value_parser = crate::size_arg)]
    pub memory: u64,
    /// Bytes each VM writes per second (to a hot set of a quarter of it).
    #[arg(long, default_value = "50MB/s", value_parser = crate::rate_arg)]
    pub dirty_rate: u64,
    /// Print the result as one line of JSON.
    #[arg(long)]
    pub json: bool,
}

/// An agent process and what it cost.
struct Agent {
    name: String,
    child: Child,
    spec: NodeSpec,
}

/// Resident memory and open descriptors of a process, from /proc.
fn usage_of(pid: u32) -> (u64, u64) {
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64);
    (rss, fds)
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Runs the soak.
pub fn soak(a: SoakArgs) -> Result<ExitCode> {
    let dir = std::env::temp_dir().join(format!("ferry-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = run(&a, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run(a: &SoakArgs, dir: &std::path::Path) -> Result<ExitCode> {
    let (_etcd, cluster, agents) = start_agents(dir)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let peers = Peers::new(&cluster);
    let names: Vec<String> = (1..=a.vms).map(|i| format!("soak-{i}")).collect();
    let hot = (a.memory / 4).max(4096);
    for n in &names {
        let vm = CreateVm {
            name: n.clone(),
            memory: Amount::Int(a.memory),
            workload: Some(format!("hot:{hot}")),
            dirty_rate: Some(Amount::Int(a.dirty_rate)),
            fill: None,
            guest: None,
            priority: None,
            preferred_owners: None,
            image: None,
            seed: None,
        };
        wait_for(&rt, peers.create_vm(&agents[0].spec, &vm))?;
    }
    let soak = Soak {
        rt: &rt,
        peers: &peers,
        agents: &agents,
        names: &names,
    };
    let t = soak.trips(a)?;
    let out = t.summary(a, &agents);
    if a.json {
        println!("{out}");
    } else {
        t.print(a, &agents, out["ok"] == true);
    }
    Ok(if out["ok"] == true {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Two agents of this process's own on loopback (plain HTTP), their state
/// in a local etcd member that lives as long as the run.
fn start_agents(
    dir: &std::path::Path,
) -> Result<(super::local_etcd::LocalEtcd, Cluster, Vec<Agent>)> {
    let token: String = ferry::migration::auth::SessionKey::random()
        .0
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    ferry::migration::auth::write_secret_file(&dir.join("cluster.token"), token.as_bytes())?;
    let etcd = super::local_etcd::LocalEtcd::start(dir)?;
    let mut text = format!(
        "token_file = \"cluster.token\"\ninsecure_api = true\netcd = [\"{}\"]\n",
        etcd.endpoint
    );
    for name in ["a", "b"] {
        text += &format!(
            "[[node]]\nname = \"{name}\"\ncontrol = \"127.0.0.1:{}\"\ndata = \"127.0.0.1:{}\"\nmemory_capacity = \"64GiB\"\n",
            free_port()?,
            free_port()?
        );
    }
    let file = dir.join("cluster.toml");
    std::fs::write(&file, &text)?;
    let cluster = Cluster::load(&file).map_err(|e| anyhow!("{e}"))?;
    let exe = std::env::current_exe()?;
    let mut agents = Vec::new();
    for name in ["a", "b"] {
        let child = Command::new(&exe)
            .args(["agent", "--cluster"])
            .arg(&file)
            .args(["--node", name])
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting an agent")?;
        let spec = cluster.node(name).expect("written above").clone();
        agents.push(Agent {
            name: name.into(),
            child,
            spec,
        });
    }
    for ag in &agents {
        let until = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(&ag.spec.control).is_err() {
            if Instant::now() > until {
                bail!("agent {} did not start", ag.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok((etcd, cluster, agents))
}

/// Warm-up round trips before the baseline: each agent has sent and
/// received, and its thread pools and buffers have grown to their size.
const WARMUP: u32 = 2;

/// The soak's moves: the agents, the client and the VMs it moves.
struct Soak<'a> {
    rt: &'a tokio::runtime::Runtime,
    peers: &'a Peers,
    agents: &'a [Agent],
    names: &'a [String],
}

/// What the round trips counted (after the warm-up) and measured.
#[derive(Default)]
struct Tally {
    moved: u64,
    failed: u64,
    mismatches: u64,
    errors: Vec<String>,
    trips: u32,
    elapsed: f64,
    /// Each agent's (RSS, descriptors) after the warm-up, a quarter of the
    /// way in, and at the end.
    baseline: Vec<(u64, u64)>,
    steady: Vec<(u64, u64)>,
    end: Vec<(u64, u64)>,
}

impl Soak<'_> {
    fn measure(&self) -> Vec<(u64, u64)> {
        self.agents.iter().map(|g| usage_of(g.child.id())).collect()
    }

    /// Moves every VM there and back until `--count` or `--duration`.
    fn trips(&self, a: &SoakArgs) -> Result<Tally> {
        let round_trips = a.count.div_ceil(2 * a.vms).max(1) + WARMUP + 1;
        let start = Instant::now();
        let mut t = Tally::default();
        let mut steady = None;
        'trips: for trip in 0..round_trips {
            for (from, to) in [(0usize, 1usize), (1, 0)] {
                if trip > WARMUP && start.elapsed() > a.duration {
                    break 'trips;
                }
                self.move_all(from, to, trip > WARMUP, &mut t)?;
            }
            if trip == WARMUP {
                t.baseline = self.measure();
            } else if trip > WARMUP {
                t.trips += 1;
                if steady.is_none() && t.trips * 4 >= round_trips - WARMUP - 1 {
                    steady = Some(self.measure());
                }
            }
            if !a.json {
                let (moved, failed, mm) = (t.moved, t.failed, t.mismatches);
                eprint!("\r{moved} migrations, {failed} failed, {mm} mismatches");
            }
        }
        if !a.json {
            eprintln!();
        }
        t.end = self.measure();
        t.steady = steady.unwrap_or_else(|| t.end.clone());
        t.elapsed = start.elapsed().as_secs_f64();
        Ok(t)
    }

    /// Moves every VM from agent `from` to `to` and waits for each;
    /// `counted` is false during the warm-up.
    fn move_all(&self, from: usize, to: usize, counted: bool, t: &mut Tally) -> Result<()> {
        let (rt, agents) = (self.rt, self.agents);
        let mut ids = Vec::new();
        for n in self.names {
            let body = CreateMigration {
                vm: n.clone(),
                target: agents[to].name.clone(),
                params: MigrationParams::default(),
            };
            match wait_for(rt, self.peers.migrate(&agents[from].spec, &body)) {
                Ok(m) => ids.push(m.id),
                // Refused (or not there: an earlier move failed and left it
                // behind): a failure too.
                Err(e) => {
                    t.failed += u64::from(counted);
                    t.errors.push(e.to_string());
                }
            }
        }
        for id in ids {
            let done = loop {
                let m = wait_for(rt, self.peers.migration(&agents[from].spec, &id))?;
                if m.state.is_final() {
                    break m;
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            let completed = done.state == MigrationState::Completed;
            let verified = done.report.as_ref().is_some_and(|r| r.verified);
            let error = done.error.unwrap_or_default();
            if counted {
                t.moved += 1;
                t.failed += u64::from(!completed);
                let mismatch = (completed && !verified) || error.contains("digest mismatch");
                t.mismatches += u64::from(mismatch);
            }
            if !completed {
                t.errors.push(format!("{id}: {error}"));
            }
        }
        Ok(())
    }
}

impl Tally {
    /// Flat: descriptors end where they started (a few in flight allowed),
    /// and from the steady point on (a quarter of the way in, when the
    /// pools have grown to their size) resident memory grows by at most a
    /// tenth plus 16 MiB.
    fn flat(&self) -> bool {
        self.baseline
            .iter()
            .zip(self.steady.iter().zip(&self.end))
            .all(|(s, (m, e))| e.1 <= s.1 + 4 && e.0 <= m.0 + m.0 / 10 + (16 << 20))
    }

    /// The result as JSON (`--json`), `ok` included.
    fn summary(&self, a: &SoakArgs, agents: &[Agent]) -> Value {
        let per_agent: Vec<Value> = agents
            .iter()
            .zip(self.baseline.iter().zip(self.steady.iter().zip(&self.end)))
            .map(|(g, (s, (m, e)))| {
                json!({"node": g.name, "rss_start": s.0, "rss_steady": m.0, "rss_end": e.0,
                       "fds_start": s.1, "fds_steady": m.1, "fds_end": e.1})
            })
            .collect();
        let flat = self.flat();
        let ok = self.mismatches == 0 && self.failed == 0 && flat && self.trips > 0;
        json!({
            "migrations": self.moved,
            "round_trips": self.trips,
            "failed": self.failed,
            "mismatches": self.mismatches,
            "flat": flat,
            "ok": ok,
            "elapsed_s": (self.elapsed * 10.0).round() / 10.0,
            "vms": a.vms,
            "memory": a.memory,
            "dirty_rate": a.dirty_rate,
            "agents": per_agent,
            "errors": self.errors.iter().take(10).collect::<Vec<_>>(),
        })
    }

    /// The result as a table.
    fn print(&self, a: &SoakArgs, agents: &[Agent], ok: bool) {
        let (moved, failed, mismatches) = (self.moved, self.failed, self.mismatches);
        println!(
            "soak: {moved} migrations of {} VMs of {} ({} round trips) in {:.1} s: {failed} failed, {mismatches} mismatches",
            a.vms,
            Bytes(a.memory),
            self.trips,
            self.elapsed
        );
        println!("  node    rss start   rss steady      rss end  fds start  fds end");
        let rows = self.baseline.iter().zip(self.steady.iter().zip(&self.end));
        for (g, (s, (m, e))) in agents.iter().zip(rows) {
            println!(
                "  {:<4} {:>12} {:>12} {:>12} {:>10} {:>8}",
                g.name,
                Bytes(s.0).to_string(),
                Bytes(m.0).to_string(),
                Bytes(e.0).to_string(),
                s.1,
                e.1
            );
        }
        for e in self.errors.iter().take(5) {
            println!("  error: {e}");
        }
        println!(
            "{}",
            if ok {
                "ok: no mismatch, no failure, memory and descriptors flat"
            } else {
                "NOT ok"
            }
        );
    }
}

/// Waits for a call to an agent.
fn wait_for<T>(
    rt: &tokio::runtime::Runtime,
    call: impl std::future::Future<Output = Result<T, PeerError>>,
) -> Result<T> {
    rt.block_on(call).map_err(|e| anyhow!("{e}"))
}
