//! The orchestrator's commands as users run them, against three real
//! `ferry agent` processes: `vm create|list|delete`, `migrate`, `node
//! status|drain|resume` (waiting, `--json`, `--detach`), their exit statuses,
//! and an agent stopped with SIGTERM.

use crate::common;

use common::free_port;
use serde_json::Value;
use std::path::PathBuf;
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

fn ferry() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
}

/// Three agents (`a`, `b`, `c`) as processes, killed at the end.
struct Cluster {
    dir: PathBuf,
    file: PathBuf,
    agents: Vec<(String, Child, String)>,
}

impl Cluster {
    /// On the shared etcd member; `None` (the test skips) without etcd.
    fn start(test: &str, b_capacity: &str) -> Option<Self> {
        Self::start_with(test, b_capacity, "")
    }

    /// As `start`, with `defaults` lines in the file's `[defaults]`.
    fn start_with(test: &str, b_capacity: &str, defaults: &str) -> Option<Self> {
        let etcd = common::etcd::shared_top(test)?;
        let dir = std::env::temp_dir().join(format!("ferry-orch-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        ferry::migration::auth::write_secret_file(
            &dir.join("cluster.token"),
            b"orchestrator-test-token\n",
        )
        .unwrap();
        let mut text = format!(
            "token_file = \"cluster.token\"\ninsecure_api = true\n{etcd}[defaults]\n{defaults}\n"
        );
        let mut controls = Vec::new();
        for (name, cap) in [("a", "1GiB"), ("b", b_capacity), ("c", "256MiB")] {
            let control = format!("127.0.0.1:{}", free_port());
            text += &format!(
                "[[node]]\nname = \"{name}\"\ncontrol = \"{control}\"\ndata = \"127.0.0.1:{}\"\nmemory_capacity = \"{cap}\"\n",
                free_port()
            );
            controls.push((name, control));
        }
        let file = dir.join("cluster.toml");
        std::fs::write(&file, text).unwrap();
        let agents = controls
            .into_iter()
            .map(|(name, control)| {
                let child = ferry()
                    .args(["agent", "--cluster", file.to_str().unwrap(), "--node", name])
                    .env("RUST_LOG", "warn")
                    .spawn()
                    .unwrap();
                (name.to_string(), child, control)
            })
            .collect::<Vec<_>>();
        for (name, _, control) in &agents {
            let t = Instant::now();
            while std::net::TcpStream::connect(control).is_err() {
                assert!(
                    t.elapsed() < Duration::from_secs(10),
                    "agent {name} did not start"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Some(Self { dir, file, agents })
    }

    /// `ferry ARGS --cluster FILE`.
    fn run(&self, args: &[&str]) -> Output {
        ferry()
            .args(args)
            .args(["--cluster", self.file.to_str().unwrap()])
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "ferry {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Node `node`'s `/metrics`, over plain HTTP.
    fn metrics(&self, node: &str) -> String {
        use std::io::{Read, Write};
        let (_, _, control) = self.agents.iter().find(|(n, _, _)| n == node).unwrap();
        let mut s = std::net::TcpStream::connect(control).unwrap();
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: {control}\r\nAuthorization: Bearer orchestrator-test-token\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        let text = self.ok(&all);
        serde_json::from_str(text.trim().lines().last().unwrap()).unwrap()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, child, _) in &mut self.agents {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn vms_on(c: &Cluster) -> Vec<(String, String)> {
    let v = c.json(&["vm", "list"]);
    let mut out: Vec<(String, String)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["name"].as_str().unwrap().into(),
                v["node"].as_str().unwrap().into(),
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn vms_migrate_drain_and_come_back_through_the_command_line() {
    let Some(c) = Cluster::start("cli", "1GiB") else {
        return;
    };
    for i in 1..=3 {
        let name = format!("vm{i}");
        let v = c.json(&[
            "vm",
            "create",
            &name,
            "--node",
            "a",
            "--memory",
            "64MiB",
            "--workload",
            "hot:8MiB",
            "--dirty-rate",
            "20MB/s",
        ]);
        assert_eq!(v["state"], "running");
    }
    let text = c.ok(&["vm", "list"]);
    assert!(text.contains("vm1") && text.contains("hot:8MiB"), "{text}");

    // One migration, waited for.
    let m = c.json(&["migrate", "vm1", "--to", "b", "--codec", "lz4"]);
    assert_eq!(m["state"], "completed", "{m}");
    assert_eq!(m["report"]["verified"], true);
    assert_eq!(m["report"]["codec"], "lz4");
    // Detached: the id at once, then the agent's record.
    let id = c.ok(&["migrate", "vm2", "--to", "c", "--detach"]);
    let id = id.trim();
    assert!(id.starts_with("a-"), "{id}");
    let t = Instant::now();
    while vms_on(&c)
        .iter()
        .all(|(n, node)| !(n == "vm2" && node == "c"))
    {
        assert!(t.elapsed() < Duration::from_secs(30), "vm2 never reached c");
        std::thread::sleep(Duration::from_millis(50));
    }
    // A VM no node runs is an error (1); a node not in the file a usage error (2).
    let out = c.run(&["migrate", "nope", "--to", "b"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no node"),
        "{out:?}"
    );
    let out = c.run(&["migrate", "vm3", "--to", "z"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");

    // Drain a: vm3 goes to b or c; a ends paused.
    let op = c.json(&["node", "drain", "a"]);
    assert_eq!(op["state"], "completed", "{op}");
    let status = c.json(&["node", "status"]);
    let a = status
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "a")
        .unwrap();
    assert_eq!(a["state"], "paused");
    assert!(vms_on(&c).iter().all(|(_, node)| node != "a"));
    let text = c.ok(&["node", "status"]);
    assert!(text.contains("paused"), "{text}");
    // Resume with failback: vm3 comes home; vm1 and vm2 stay where they were sent.
    let op = c.json(&["node", "resume", "a", "--failback"]);
    assert_eq!(op["state"], "completed", "{op}");
    assert_eq!(
        vms_on(&c),
        [
            ("vm1".into(), "b".into()),
            ("vm2".into(), "c".into()),
            ("vm3".into(), "a".into())
        ]
    );
    let v = c.json(&["vm", "delete", "vm2"]);
    assert_eq!(v["name"], "vm2");
    assert_eq!(vms_on(&c).len(), 2);
    // The waits read a's live events rather than asking again and again:
    // its own stream for the migration, the cluster's for the drain and
    // the failback (whose migrations ran on b and c).
    let text = c.metrics("a");
    for (stream, at_least) in [("node", 1.0), ("cluster", 2.0)] {
        let series = format!("ferry_event_streams_opened_total{{stream=\"{stream}\"}} ");
        let n: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix(&series))
            .unwrap_or_else(|| panic!("{series}\n{text}"))
            .parse()
            .unwrap();
        assert!(n >= at_least, "{series}{n}");
    }
}

#[test]
fn a_drain_that_cannot_fit_fails_with_the_shortfall_and_an_agent_stops_on_sigterm() {
    let Some(mut c) = Cluster::start("refuse", "64MiB") else {
        return;
    };
    for i in 1..=3 {
        c.ok(&[
            "vm",
            "create",
            &format!("vm{i}"),
            "--node",
            "a",
            "--memory",
            "128MiB",
            "--workload",
            "idle",
        ]);
    }
    let out = c.run(&["node", "drain", "a"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot drain node a") && err.contains("short"),
        "{err}"
    );
    assert_eq!(vms_on(&c).len(), 3);
    let op = c.ok(&["node", "drain", "a", "--allow-partial", "--detach"]);
    assert!(op.trim().starts_with("a-drain-"), "{op}");

    // SIGTERM: the agent stops cleanly.
    let (_, child, _) = c.agents.iter_mut().find(|(n, _, _)| n == "b").unwrap();
    let pid = child.id() as i32;
    assert_eq!(sigterm(pid), 0);
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "agent b ignored SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
}

/// SIGTERM to `pid` (a child of this test), by kill(1).
fn sigterm(pid: i32) -> i32 {
    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .map_or(-1, |s| s.code().unwrap_or(-1))
}

#[test]
fn a_rolling_update_runs_node_by_node_and_stops_at_the_first_failure() {
    let dir = std::env::temp_dir().join(format!("ferry-orch-log-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("updated.log");
    let _ = std::fs::remove_file(&log);
    let Some(c) = Cluster::start_with("update", "1GiB", "update_hook = [\"sh\", \"-c\"]") else {
        return;
    };
    for (vm, node) in [("vm1", "a"), ("vm2", "b"), ("vm3", "b")] {
        c.ok(&[
            "vm",
            "create",
            vm,
            "--node",
            node,
            "--memory",
            "32MiB",
            "--workload",
            "hot:4MiB",
            "--dirty-rate",
            "10MB/s",
        ]);
    }
    // The plan: order, and where each VM would go; nothing moves.
    let plan = c.json(&["cluster", "update", "--run", "true", "--dry-run"]);
    let nodes: Vec<&str> = plan["plan"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["node"].as_str().unwrap())
        .collect();
    assert_eq!(nodes, ["a", "b", "c"]);
    assert_eq!(
        plan["plan"][1]["moves"].as_array().unwrap().len(),
        2,
        "{plan}"
    );
    let text = c.ok(&["cluster", "update", "--run", "true", "--dry-run"]);
    assert!(text.contains("1. node a") && text.contains("vm1"), "{text}");

    // Every node in turn: drained, updated, failed back.
    let cmd = format!("echo \"$FERRY_NODE\" >> {}", log.display());
    let r = c.json(&["cluster", "update", "--run", &cmd]);
    assert_eq!(r["state"], "completed", "{r}");
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "a\nb\nc\n");
    for n in r["nodes"].as_array().unwrap() {
        assert_eq!(n["update"]["update"]["exit_code"], 0, "{n}");
        assert_eq!(n["resume"]["state"], "completed", "{n}");
    }
    assert_eq!(
        vms_on(&c),
        [
            ("vm1".into(), "a".into()),
            ("vm2".into(), "b".into()),
            ("vm3".into(), "b".into())
        ],
        "every VM back home"
    );

    // A hook that fails on b stops the update there: b stays paused, c is
    // never touched, and the output is recorded.
    let cmd = format!(
        "echo \"$FERRY_NODE\" >> {0}; echo oops >&2; test \"$FERRY_NODE\" != b",
        log.display()
    );
    let out = c.run(&["cluster", "update", "--run", &cmd, "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["state"], "failed");
    assert_eq!(r["stopped_at"], "b");
    assert_eq!(r["nodes"][1]["update"]["update"]["stderr"], "oops\n", "{r}");
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "a\nb\nc\na\nb\n");
    let status = c.json(&["node", "status"]);
    let states: Vec<&str> = status
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["active", "paused", "active"]);
    assert!(
        vms_on(&c).iter().all(|(_, node)| node != "b"),
        "b was drained"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_cluster_demo_drains_and_fails_back_in_one_command() {
    let out = ferry()
        .args(["demo", "cluster", "--vms", "3", "--memory", "32MiB"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("drain of node a completed"), "{text}");
    assert!(text.contains("resume of node a completed"), "{text}");
    assert_eq!(text.matches(" a → ").count(), 3, "{text}");
    assert_eq!(text.matches(" → a ").count(), 3, "{text}");
}

/// A client's kept-alive connection is never reused just as the agent
/// closes it for idleness: calls spaced at about the API's header timeout
/// all succeed (a rolling update once failed to start with "connection
/// closed before message completed" after its client sat idle 10 s).
#[test]
fn calls_spaced_at_the_header_timeout_never_meet_a_closing_connection() {
    let top = "[api]\nheader_timeout = \"200ms\"\n";
    let Some(c) = common::agents::Agents::start_with("idle-reuse", top, &[("a", "")]) else {
        return;
    };
    let cluster = ferry::agent::Cluster::load(&c.file).unwrap();
    let peers = ferry::agent::peer::Peers::new(&cluster);
    let node = cluster.node("a").unwrap().clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut failed = Vec::new();
    // Gaps past the server's timeout (each reused connection would meet
    // its close), then short ones (reuse still works).
    let gaps = (0..10u64).map(|i| 210 + i * 10).chain([20; 10]);
    for (i, gap) in gaps.enumerate() {
        if let Err(e) = rt.block_on(peers.node(&node)) {
            failed.push(format!("call {i}: {e}"));
        }
        std::thread::sleep(std::time::Duration::from_millis(gap));
    }
    assert!(failed.is_empty(), "{failed:#?}");
}
