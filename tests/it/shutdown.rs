//! Drain on shutdown with real `ferry agent` processes: SIGTERM moves a
//! node's VMs to the other nodes and the agent exits once it hosts nothing; a
//! VM that fits nowhere keeps the agent running until `ferry agent stop
//! --force`; a node that hosts nothing exits at once. These agents serve
//! their API over TLS (certificates from `ferry tls-cert`), which the CLI and
//! the agents verify against the cluster file's pins.

use crate::common;

use common::free_port;
use serde_json::Value;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn ferry() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
}

/// Agent processes of one cluster file.
struct Procs {
    dir: PathBuf,
    file: PathBuf,
    agents: Vec<(String, Child)>,
    /// Each agent's stderr so far, read by a thread as it is written.
    logs: Vec<(String, Arc<Mutex<String>>)>,
}

impl Procs {
    /// Nodes `(name, memory_capacity)`, each an agent process.
    fn start(test: &str, nodes: &[(&str, &str)]) -> Self {
        let dir =
            std::env::temp_dir().join(format!("ferry-shutdown-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        ferry::migration::auth::write_secret_file(
            &dir.join("cluster.token"),
            b"shutdown-test-token",
        )
        .unwrap();
        let mut text = "token_file = \"cluster.token\"\n".to_string();
        let mut controls = Vec::new();
        for (name, capacity) in nodes {
            let control = format!("127.0.0.1:{}", free_port());
            let (cert, key) = (
                dir.join(format!("{name}.pem")),
                dir.join(format!("{name}-key.pem")),
            );
            let made = ferry()
                .args([
                    "tls-cert",
                    "--cert",
                    cert.to_str().unwrap(),
                    "--key",
                    key.to_str().unwrap(),
                ])
                .output()
                .unwrap();
            assert!(made.status.success(), "{made:?}");
            text += &format!(
                "[[node]]\nname = \"{name}\"\ncontrol = \"{control}\"\ndata = \"127.0.0.1:{}\"\nmemory_capacity = \"{capacity}\"\ntls_cert = \"{name}.pem\"\ntls_key = \"{name}-key.pem\"\n",
                free_port()
            );
            controls.push(control);
        }
        let file = dir.join("cluster.toml");
        std::fs::write(&file, text).unwrap();
        let (mut agents, mut logs) = (Vec::new(), Vec::new());
        for ((name, _), control) in nodes.iter().zip(&controls) {
            let mut child = ferry()
                .args(["agent", "--cluster", file.to_str().unwrap(), "--node", name])
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let t = Instant::now();
            while std::net::TcpStream::connect(control).is_err() {
                assert!(
                    t.elapsed() < Duration::from_secs(10),
                    "agent {name} did not start"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            logs.push((name.to_string(), read_log(child.stderr.take().unwrap())));
            agents.push((name.to_string(), child));
        }
        Self {
            dir,
            file,
            agents,
            logs,
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        ferry()
            .args(args)
            .args(["--cluster", self.file.to_str().unwrap()])
            .output()
            .unwrap()
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.run(&all);
        assert!(out.status.success(), "{args:?}: {out:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn agent(&mut self, name: &str) -> &mut Child {
        &mut self.agents.iter_mut().find(|(n, _)| n == name).unwrap().1
    }

    fn signal(&mut self, name: &str, sig: &str) {
        let pid = self.agent(name).id().to_string();
        Command::new("kill").args([sig, &pid]).status().unwrap();
    }

    /// Waits up to `limit` for agent `name` to exit.
    fn exited(&mut self, name: &str, limit: Duration) -> Option<std::process::ExitStatus> {
        let until = Instant::now() + limit;
        while Instant::now() < until {
            if let Some(s) = self.agent(name).try_wait().unwrap() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// What agent `name` has written on stderr so far.
    fn stderr(&self, name: &str) -> String {
        let log = &self.logs.iter().find(|(n, _)| n == name).unwrap().1;
        log.lock().unwrap().clone()
    }

    /// Waits up to `limit` for agent `name` to log `text`.
    fn wait_log(&self, name: &str, text: &str, limit: Duration) -> String {
        let until = Instant::now() + limit;
        loop {
            let log = self.stderr(name);
            if log.contains(text) || Instant::now() >= until {
                return log;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `(vm, node, state)` for every VM of the nodes still up.
    fn vms(&self) -> Vec<(String, String, String)> {
        let v = self.json(&["vm", "list"]);
        let mut all: Vec<(String, String, String)> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|v| {
                (
                    v["name"].as_str().unwrap().into(),
                    v["node"].as_str().unwrap().into(),
                    v["state"].as_str().unwrap().into(),
                )
            })
            .collect();
        all.sort();
        all
    }
}

/// Reads `pipe` to its end on a thread, into the returned buffer.
fn read_log(mut pipe: std::process::ChildStderr) -> Arc<Mutex<String>> {
    let log = Arc::new(Mutex::new(String::new()));
    let into = log.clone();
    std::thread::spawn(move || {
        use std::io::Read;
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = pipe.read(&mut buf) {
            into.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    log
}

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, c) in &mut self.agents {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn sigterm_moves_every_vm_away_and_the_agent_exits_once_empty() {
    let _serial = common::serial();
    let mut p = Procs::start("drain", &[("a", "1GiB"), ("b", "1GiB"), ("c", "1GiB")]);
    for vm in ["web-1", "web-2", "web-3"] {
        p.json(&["vm", "create", vm, "--node", "a", "--memory", "32MiB"]);
    }
    p.signal("a", "-TERM");
    let status = p
        .exited("a", Duration::from_secs(60))
        .expect("a exits once empty");
    assert!(status.success(), "{status}");
    let log = p.wait_log("a", "hosts nothing: stopped", Duration::from_secs(5));
    assert!(log.contains("hosts nothing: stopped"), "{log}");
    // Every VM runs elsewhere; none was lost.
    let vms = p.vms();
    assert_eq!(vms.len(), 3, "{vms:?}");
    for (vm, node, state) in &vms {
        assert!(node == "b" || node == "c", "{vm} on {node}");
        assert_eq!(state, "running", "{vm}");
    }
}

#[test]
fn a_vm_that_fits_nowhere_keeps_its_agent_until_the_stop_is_forced() {
    let _serial = common::serial();
    let mut p = Procs::start("force", &[("a", "1GiB"), ("b", "64MiB")]);
    p.json(&["vm", "create", "small", "--node", "a", "--memory", "16MiB"]);
    p.json(&["vm", "create", "big", "--node", "a", "--memory", "128MiB"]);
    p.signal("a", "-TERM");
    // The small one moves; the big one fits nowhere: a stays up, paused.
    let until = Instant::now() + Duration::from_secs(30);
    while !p
        .vms()
        .contains(&("small".into(), "b".into(), "running".into()))
    {
        assert!(Instant::now() < until, "small never moved: {:?}", p.vms());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        p.exited("a", Duration::from_secs(3)).is_none(),
        "a exited holding big"
    );
    // Its log says why, once the drain that moved the small one has ended.
    let log = p.wait_log("a", "fits on no active node", Duration::from_secs(5));
    assert!(
        log.contains("VM big (128.00 MiB) fits on no active node"),
        "{log}"
    );
    let status = p.json(&["node", "status"]);
    assert!(status.to_string().contains("paused"), "{status}");
    // A second SIGTERM does not kill it either.
    p.signal("a", "-TERM");
    assert!(p.exited("a", Duration::from_secs(1)).is_none());
    // Forced: it stops, naming what it discards.
    let out = p.run(&["agent", "stop", "--node", "a", "--force"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("discarding big"),
        "{out:?}"
    );
    let status = p
        .exited("a", Duration::from_secs(15))
        .expect("a stops when forced");
    assert!(status.success());
    let log = p.wait_log("a", "discarded: big", Duration::from_secs(5));
    assert!(log.contains("discarded: big"), "{log}");
}

#[test]
fn an_agent_that_hosts_nothing_exits_at_once() {
    let _serial = common::serial();
    let mut p = Procs::start("empty", &[("a", "1GiB"), ("b", "1GiB")]);
    let t = Instant::now();
    p.signal("a", "-TERM");
    let status = p.exited("a", Duration::from_secs(5)).expect("a exits");
    assert!(status.success());
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    // And `ferry agent stop` asks the same of b.
    let out = p.run(&["agent", "stop", "--node", "b"]);
    assert!(out.status.success(), "{out:?}");
    assert!(p.exited("b", Duration::from_secs(5)).is_some());
}

#[test]
fn the_api_is_tls_only_and_a_wrong_pin_is_refused() {
    let _serial = common::serial();
    let p = Procs::start("tls", &[("a", "1GiB"), ("b", "1GiB")]);
    // The CLI verified both certificates to get here.
    let status = p.json(&["node", "status"]);
    assert_eq!(status.as_array().unwrap().len(), 2, "{status}");
    let text = std::fs::read_to_string(&p.file).unwrap();
    let control = text
        .lines()
        .find_map(|l| l.strip_prefix("control = \""))
        .unwrap()
        .trim_end_matches('"')
        .to_string();
    // Plain HTTP gets nothing.
    ferry::transport::tls::install_default_provider();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let plain = rt.block_on(
        reqwest::Client::new()
            .get(format!("http://{control}/v1/node"))
            .send(),
    );
    assert!(plain.is_err(), "{plain:?}");
    // A cluster file that pins another certificate for node a: refused.
    let forged = text.replacen("tls_cert = \"a.pem\"", "tls_cert = \"b.pem\"", 1);
    let forged_file = p.dir.join("forged.toml");
    std::fs::write(&forged_file, forged).unwrap();
    let out = ferry()
        .args([
            "node",
            "status",
            "--json",
            "--cluster",
            forged_file.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let nodes: Value = serde_json::from_slice(&out.stdout).unwrap();
    let a = &nodes[0];
    assert_eq!(a["state"], "unreachable", "{nodes}");
    assert!(
        a["error"].as_str().unwrap().contains("not the pinned one"),
        "{a}"
    );
    assert_eq!(nodes[1]["state"], "active", "{nodes}");
}
