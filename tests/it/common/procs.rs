//! Real `ferry agent` processes of one cluster file, their API over TLS
//! (certificates from `ferry tls-cert`, pinned in the file), driven through
//! the CLI; each agent's stderr is read as it is written.

use super::free_port;
use serde_json::Value;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub fn ferry() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
}

/// Makes node `name`'s API certificate and key in `dir` with `ferry
/// tls-cert`: `{name}.pem`, `{name}-key.pem`.
fn make_cert(dir: &std::path::Path, name: &str) -> (PathBuf, PathBuf) {
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
    (cert, key)
}

/// Agent processes of one cluster file.
pub struct Procs {
    pub dir: PathBuf,
    pub file: PathBuf,
    agents: Vec<(String, Child)>,
    /// Each agent's stderr so far, read by a thread as it is written.
    logs: Vec<(String, Arc<Mutex<String>>)>,
    /// Each node's control address.
    controls: Vec<(String, String)>,
    /// Flags of the nodes that joined without a `[[node]]` entry.
    flags: Vec<(String, Vec<String>)>,
    /// Environment variables of a node's next starts.
    envs: Vec<(String, String, String)>,
}

impl Procs {
    /// Nodes `(name, memory_capacity)`, each an agent process.
    /// Their store is the shared etcd member; `None` (the test skips) where
    /// `etcd` is missing.
    pub fn start(test: &str, nodes: &[(&str, &str)]) -> Option<Self> {
        Self::start_with(test, "", nodes)
    }

    /// As [`Procs::start`], with `top` (such as an etcd cluster of the
    /// test's own) in the cluster file.
    pub fn start_with(test: &str, top: &str, nodes: &[(&str, &str)]) -> Option<Self> {
        let top = if super::etcd::names_etcd(top) {
            top.to_string()
        } else {
            format!("{}{top}", super::etcd::shared_top(test)?)
        };
        let dir = std::env::temp_dir().join(format!("ferry-procs-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        ferry::migration::auth::write_secret_file(
            &dir.join("cluster.token"),
            b"shutdown-test-token",
        )
        .unwrap();
        let mut text = format!("token_file = \"cluster.token\"\n{top}\n");
        let mut controls = Vec::new();
        for (name, capacity) in nodes {
            let control = format!("127.0.0.1:{}", free_port());
            make_cert(&dir, name);
            text += &format!(
                "[[node]]\nname = \"{name}\"\ncontrol = \"{control}\"\ndata = \"127.0.0.1:{}\"\nmemory_capacity = \"{capacity}\"\ntls_cert = \"{name}.pem\"\ntls_key = \"{name}-key.pem\"\n",
                free_port()
            );
            controls.push(control);
        }
        let file = dir.join("cluster.toml");
        std::fs::write(&file, text).unwrap();
        let mut p = Self {
            dir,
            file,
            agents: Vec::new(),
            logs: Vec::new(),
            controls: Vec::new(),
            flags: Vec::new(),
            envs: Vec::new(),
        };
        for ((name, _), control) in nodes.iter().zip(controls) {
            p.controls.push((name.to_string(), control));
            p.spawn(name);
        }
        Some(p)
    }

    /// Starts an agent of node `name`, which has no `[[node]]` entry: it
    /// joins by registering in etcd, its addresses, capacity and
    /// certificate given as flags.
    pub fn join(&mut self, name: &str, capacity: &str) {
        let control = format!("127.0.0.1:{}", free_port());
        let (cert, key) = make_cert(&self.dir, name);
        let flags = [
            "--control",
            &control,
            "--data",
            &format!("127.0.0.1:{}", free_port()),
            "--memory-capacity",
            capacity,
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ];
        self.flags
            .push((name.into(), flags.iter().map(|f| f.to_string()).collect()));
        self.controls.push((name.into(), control));
        self.spawn(name);
    }

    /// Sets `key` to `value` in the environment of node `name`'s next
    /// starts.
    pub fn set_env(&mut self, name: &str, key: &str, value: &str) {
        self.envs.push((name.into(), key.into(), value.into()));
    }

    /// Starts agent `name` (again), once its control port takes connections.
    pub fn spawn(&mut self, name: &str) {
        let flags = self
            .flags
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, f)| f.clone())
            .unwrap_or_default();
        let mut child = ferry()
            .args([
                "agent",
                "--cluster",
                self.file.to_str().unwrap(),
                "--node",
                name,
            ])
            .args(flags)
            .envs(
                self.envs
                    .iter()
                    .filter(|(n, _, _)| n == name)
                    .map(|(_, k, v)| (k, v)),
            )
            // Warnings, and the rolling update's steps (a failing test
            // prints them).
            .env("RUST_LOG", "warn,ferry::agent::rolling=info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let control = &self.controls.iter().find(|(n, _)| n == name).unwrap().1;
        let t = Instant::now();
        while std::net::TcpStream::connect(control).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("agent {name} exited: {status}");
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "agent {name} did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let log = read_log(child.stderr.take().unwrap());
        for (n, _) in self.logs.iter_mut().filter(|(n, _)| n == name) {
            *n = format!("{name}, an earlier process");
        }
        self.agents.retain(|(n, _)| n != name);
        self.logs.push((name.to_string(), log));
        self.agents.push((name.to_string(), child));
    }

    pub fn run(&self, args: &[&str]) -> Output {
        ferry()
            .args(args)
            .args(["--cluster", self.file.to_str().unwrap()])
            .output()
            .unwrap()
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.run(&all);
        assert!(out.status.success(), "{args:?}: {out:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    }

    pub fn agent(&mut self, name: &str) -> &mut Child {
        &mut self.agents.iter_mut().find(|(n, _)| n == name).unwrap().1
    }

    pub fn signal(&mut self, name: &str, sig: &str) {
        let pid = self.agent(name).id().to_string();
        Command::new("kill").args([sig, &pid]).status().unwrap();
    }

    /// Waits up to `limit` for agent `name` to exit.
    pub fn exited(&mut self, name: &str, limit: Duration) -> Option<std::process::ExitStatus> {
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
    pub fn stderr(&self, name: &str) -> String {
        let log = &self.logs.iter().find(|(n, _)| n == name).unwrap().1;
        log.lock().unwrap().clone()
    }

    /// Waits up to `limit` for agent `name` to log `text`.
    pub fn wait_log(&self, name: &str, text: &str, limit: Duration) -> String {
        let until = Instant::now() + limit;
        loop {
            let log = self.stderr(name);
            if log.contains(text) || Instant::now() >= until {
                return log;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The coordinator every live node names, once they agree.
    pub fn coordinator(&self) -> String {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let nodes = self.json(&["node", "status"]);
            let up: Vec<&Value> = nodes
                .as_array()
                .unwrap()
                .iter()
                .filter(|n| n["state"] != "unreachable")
                .collect();
            let named: Vec<&str> = up
                .iter()
                .filter_map(|n| n["coordinator"].as_str())
                .collect();
            if !named.is_empty()
                && named.len() == up.len()
                && named.windows(2).all(|w| w[0] == w[1])
            {
                return named[0].to_string();
            }
            assert!(Instant::now() < end, "no agreed coordinator: {nodes}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `(vm, node, state)` for every VM of the nodes still up.
    pub fn vms(&self) -> Vec<(String, String, String)> {
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
        // A failing test shows what each agent said (the last of it).
        if std::thread::panicking() {
            for (name, log) in &self.logs {
                let log = log.lock().unwrap();
                let mut from = log.len().saturating_sub(12_000);
                while !log.is_char_boundary(from) {
                    from += 1;
                }
                let tail = &log[from..];
                eprintln!("--- agent {name}'s log (its last 12 KB) ---\n{tail}");
            }
        }
        for (_, c) in &mut self.agents {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
