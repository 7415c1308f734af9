//! One etcd member on loopback for `ferry demo cluster` and `ferry bench
//! soak`: the `etcd` on PATH, its data in a temporary folder, stopped and
//! removed at the end.

use anyhow::{anyhow, bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running member, killed on drop.
pub struct LocalEtcd {
    child: Child,
    data: PathBuf,
    /// Its client address, `127.0.0.1:PORT`.
    pub endpoint: String,
}

/// A port nothing listens on at `host`, in the calling thread's network
/// namespace.
fn free_port(host: &str) -> Result<u16> {
    Ok(std::net::TcpListener::bind((host, 0))?.local_addr()?.port())
}

impl LocalEtcd {
    /// Starts a member on loopback with its data under `dir`; returns once
    /// it takes writes (at most 20 s).
    pub fn start(dir: &Path) -> Result<Self> {
        Self::start_at(dir, "127.0.0.1", None)
    }

    /// As [`LocalEtcd::start`], listening on `host`, inside the network
    /// namespace `netns` when given (`ip netns exec`; the calling thread
    /// must be in it too, to pick its ports and see it ready).
    pub fn start_at(dir: &Path, host: &str, netns: Option<&str>) -> Result<Self> {
        let (client, peer) = (free_port(host)?, free_port(host)?);
        let data = dir.join("etcd");
        let log = std::fs::File::create(dir.join("etcd.log"))?;
        let mut command = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "etcd"]);
                c
            }
            None => Command::new("etcd"),
        };
        let child = command
            .args(["--name", "demo"])
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen-client-urls", &format!("http://{host}:{client}")])
            .args(["--advertise-client-urls", &format!("http://{host}:{client}")])
            .args(["--listen-peer-urls", &format!("http://{host}:{peer}")])
            .args(["--initial-advertise-peer-urls", &format!("http://{host}:{peer}")])
            .args(["--initial-cluster", &format!("demo=http://{host}:{peer}")])
            .args(["--log-level", "warn"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => anyhow!(
                    "etcd is not installed: the cluster keeps its state in etcd (Debian: apt-get install etcd-server)"
                ),
                _ => anyhow!("starting etcd: {e}"),
            })?;
        let mut member = Self {
            child,
            data,
            endpoint: format!("{host}:{client}"),
        };
        member.wait_ready(dir)?;
        Ok(member)
    }

    fn wait_ready(&mut self, dir: &Path) -> Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let config = ferry::agent::etcd::EtcdConfig {
            endpoints: vec![self.endpoint.clone()],
            request_timeout: Duration::from_millis(500),
            keepalive: Duration::from_secs(10),
            ..Default::default()
        };
        let client = {
            let _guard = rt.enter();
            ferry::agent::etcd::Etcd::new(&config)?
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if rt.block_on(client.status()).is_ok_and(|s| s.leader != 0) {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                let log = std::fs::read_to_string(dir.join("etcd.log")).unwrap_or_default();
                bail!(
                    "etcd exited ({status}): {}",
                    log.lines().last().unwrap_or("")
                );
            }
            if Instant::now() > deadline {
                bail!("etcd did not elect itself leader within 20 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for LocalEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.data).context("removing the demo's etcd data");
    }
}
