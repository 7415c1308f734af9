//! Real agents on loopback for the tests: a cluster file with free ports, the
//! agents in one runtime, and calls to their HTTP API.

use super::free_port;
use ferry::agent::{serve_agent, AgentHandle, Cluster};
use reqwest::{Method, StatusCode};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub const TOKEN: &str = "test-token-0123456789";
pub const READONLY_TOKEN: &str = "read-only-token-0123456789";

/// A fresh folder for a test's files (a cluster file, images), removed at
/// the end.
pub struct Dir(PathBuf);

impl Dir {
    pub fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("ferry-agent-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes a cluster file of `nodes` (name, extra TOML lines) with free ports,
/// `top` (TOML tables such as `[api]`) before them.
fn write_cluster(dir: &Path, top: &str, nodes: &[(&str, &str)]) -> PathBuf {
    ferry::migration::auth::write_secret_file(
        &dir.join("cluster.token"),
        format!("{TOKEN}\n").as_bytes(),
    )
    .unwrap();
    // A read-only token beside it, for tests that name it in `top`.
    ferry::migration::auth::write_secret_file(
        &dir.join("readonly.token"),
        format!("{READONLY_TOKEN}\n").as_bytes(),
    )
    .unwrap();
    // In-process agents on loopback: plain HTTP (tests/it/shutdown.rs runs the
    // API over TLS).
    let mut text = format!("token_file = \"cluster.token\"\ninsecure_api = true\n{top}\n");
    for (name, extra) in nodes {
        // 1 GiB unless the extra lines say otherwise.
        let capacity = if extra.contains("memory_capacity") {
            ""
        } else {
            "memory_capacity = \"1GiB\"\n"
        };
        text.push_str(&format!(
            "[[node]]\nname = \"{name}\"\ncontrol = \"127.0.0.1:{}\"\ndata = \"127.0.0.1:{}\"\n{capacity}{extra}\n",
            free_port(),
            free_port()
        ));
    }
    let path = dir.join("cluster.toml");
    std::fs::write(&path, text).unwrap();
    path
}

pub struct Agents {
    pub rt: tokio::runtime::Runtime,
    pub agents: Vec<AgentHandle>,
    http: reqwest::Client,
    /// The cluster file the agents run from.
    pub file: PathBuf,
    _dir: Dir,
}

impl Agents {
    /// Agents of `nodes` (name, extra TOML lines) on the shared etcd
    /// member; `None` (the test skips) where `etcd` is missing.
    pub fn start(test: &str, nodes: &[(&str, &str)]) -> Option<Self> {
        Self::start_with(test, "", nodes)
    }

    /// As [`Agents::start`], with `top` (such as an `[api]` table, or an
    /// etcd cluster of the test's own) in the cluster file.
    pub fn start_with(test: &str, top: &str, nodes: &[(&str, &str)]) -> Option<Self> {
        Self::start_each(test, top, nodes, |_, _| {})
    }

    /// As [`Agents::start_with`], each agent running from the cluster file
    /// as `adjust` changes it for that node (such as fewer etcd endpoints).
    pub fn start_each(
        test: &str,
        top: &str,
        nodes: &[(&str, &str)],
        adjust: impl Fn(&str, &mut Cluster),
    ) -> Option<Self> {
        let top = if super::etcd::names_etcd(top) {
            top.to_string()
        } else {
            format!("{}{top}", super::etcd::shared_top(test)?)
        };
        let dir = Dir::new(test);
        let path = write_cluster(&dir.0, &top, nodes);
        let cluster = Cluster::load(&path).unwrap();
        ferry::transport::tls::install_default_provider();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let agents = nodes
            .iter()
            .map(|(name, _)| {
                let mut cluster = cluster.clone();
                adjust(name, &mut cluster);
                rt.block_on(serve_agent(cluster, name)).unwrap()
            })
            .collect();
        Some(Self {
            rt,
            agents,
            http: reqwest::Client::new(),
            file: path,
            _dir: dir,
        })
    }

    pub fn agent(&self, name: &str) -> &AgentHandle {
        self.agents.iter().find(|a| a.node.name() == name).unwrap()
    }

    /// One request to `node`'s API; `token` None sends none.
    pub fn call_with(
        &self,
        token: Option<&str>,
        method: Method,
        node: &str,
        path: &str,
        body: Option<String>,
    ) -> (StatusCode, Value) {
        let url = format!("http://{}{path}", self.agent(node).control_addr);
        self.rt.block_on(async {
            let mut req = self.http.request(method, url);
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            if let Some(b) = body {
                req = req.header("content-type", "application/json").body(b);
            }
            let resp = req.send().await.unwrap();
            let status = resp.status();
            let text = resp.text().await.unwrap();
            let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
            (status, value)
        })
    }

    pub fn call(
        &self,
        method: Method,
        node: &str,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        self.call_with(Some(TOKEN), method, node, path, body.map(|b| b.to_string()))
    }

    /// Creates VM `web` on node a: 64 MiB writing an 8 MiB hot set at 4
    /// MB/s.
    pub fn create_busy_web(&self) {
        let body = serde_json::json!({"name": "web", "memory": "64MiB", "workload": "hot:8MiB", "dirty_rate": "4MB/s"});
        let (s, v) = self.call(Method::POST, "a", "/v1/vms", Some(body));
        assert_eq!(s, StatusCode::CREATED, "{v}");
    }

    /// Starts moving VM `web` from node a to b at 16 MB/s without
    /// compression, slow enough to watch (about 4 s for 64 MiB); its id.
    pub fn start_slow_migration(&self) -> String {
        let body = serde_json::json!({"vm": "web", "target": "b", "max_bandwidth": "16MB/s", "codec": "none"});
        let (s, m) = self.call(Method::POST, "a", "/v1/migrations", Some(body));
        assert_eq!(s, StatusCode::ACCEPTED, "{m}");
        m["id"].as_str().unwrap().to_string()
    }

    /// Waits for operation `id` (a drain, a resume, an update) on `node` to
    /// end; returns its record.
    pub fn wait_op(&self, node: &str, id: &str) -> Value {
        self.wait_op_at(node, &format!("/v1/operations/{id}"))
    }

    /// Waits for the operation at `path` on `node`'s API to end.
    pub fn wait_op_at(&self, node: &str, path: &str) -> Value {
        let id = path.rsplit('/').next().unwrap_or_default();
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let (s, op) = self.call(Method::GET, node, path, None);
            assert_eq!(s, StatusCode::OK, "{op}");
            if op["state"] != "running" {
                return op;
            }
            assert!(
                Instant::now() < deadline,
                "operation {id} did not end: {op}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops agent `name` cleanly (its node must host nothing it cannot
    /// keep) and starts it again from the cluster file.
    pub fn restart(&mut self, name: &str) {
        let i = self
            .agents
            .iter()
            .position(|a| a.node.name() == name)
            .unwrap();
        let old = self.agents.remove(i);
        let cluster = old.node.cluster.clone();
        self.rt.block_on(old.shutdown());
        let new = self.rt.block_on(serve_agent(cluster, name)).unwrap();
        self.agents.insert(i, new);
    }

    /// Starts an agent of node `name`, which the others' cluster file does
    /// not name: it joins by registering in etcd (its own file adds its
    /// entry, `extra` TOML lines in it).
    pub fn add(&mut self, name: &str, extra: &str) {
        let mut text = std::fs::read_to_string(&self.file).unwrap();
        text.push_str(&format!(
            "\n[[node]]\nname = \"{name}\"\ncontrol = \"127.0.0.1:{}\"\ndata = \"127.0.0.1:{}\"\nmemory_capacity = \"1GiB\"\n{extra}\n",
            free_port(),
            free_port()
        ));
        let path = self.file.with_file_name(format!("cluster-{name}.toml"));
        std::fs::write(&path, text).unwrap();
        let cluster = Cluster::load(&path).unwrap();
        let new = self.rt.block_on(serve_agent(cluster, name)).unwrap();
        self.agents.push(new);
    }

    /// Waits for migration `id` on `node` to end; returns its record.
    pub fn wait(&self, node: &str, id: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (s, m) = self.call(Method::GET, node, &format!("/v1/migrations/{id}"), None);
            assert_eq!(s, StatusCode::OK, "{m}");
            if !matches!(m["state"].as_str(), Some("queued" | "running")) {
                return m;
            }
            assert!(Instant::now() < deadline, "migration {id} did not end: {m}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for `node`'s own record of incoming migration `id` to end. The
    /// target closes its record after the source has its answer, so a read
    /// right after the source's end may still see it running.
    pub fn wait_incoming(&self, node: &str, id: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (s, list) = self.call(Method::GET, node, "/v1/migrations", None);
            assert_eq!(s, StatusCode::OK, "{list}");
            let found = list.as_array().unwrap().iter().find(|m| m["id"] == id);
            let m = found.unwrap_or_else(|| panic!("{node} lists {id}: {list}"));
            if !matches!(m["state"].as_str(), Some("queued" | "running")) {
                return m.clone();
            }
            assert!(
                Instant::now() < deadline,
                "{node}'s record of {id} did not end: {m}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agents {
    fn drop(&mut self) {
        for a in self.agents.drain(..) {
            self.rt.block_on(a.shutdown());
        }
    }
}

pub fn error_of(v: &Value) -> (String, String) {
    (
        v["error"]["code"].as_str().unwrap_or_default().to_string(),
        v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    )
}
