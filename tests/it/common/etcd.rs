//! A real etcd cluster on loopback for the tests: members as processes with
//! their own data folders and free ports, fast elections, and the faults the
//! tests inject (SIGKILL, SIGSTOP, restart).

use super::free_port;
use ferry::agent::etcd::{Etcd, EtcdConfig};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Member {
    pub name: String,
    /// `host:port` of its client URL.
    pub client: String,
    peer: String,
    child: Option<Child>,
}

pub struct EtcdCluster {
    pub members: Vec<Member>,
    dir: PathBuf,
    pub rt: tokio::runtime::Runtime,
}

/// Whether `etcd` runs here; with `CI` set a missing one fails the test.
pub fn available() -> bool {
    let found = Command::new("etcd")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        super::missing("etcd (Debian's etcd-server package)");
    }
    found
}

/// A client config for `endpoints` with the test's timeouts.
pub fn config(endpoints: Vec<String>) -> EtcdConfig {
    EtcdConfig {
        endpoints,
        request_timeout: Duration::from_millis(500),
        keepalive: Duration::from_secs(5),
        ..Default::default()
    }
}

impl EtcdCluster {
    /// `n` members under a fresh folder, started and answering.
    pub fn start(test: &str, n: usize) -> Self {
        let dir = std::env::temp_dir().join(format!("ferry-etcd-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client: format!("127.0.0.1:{}", free_port()),
                peer: format!("127.0.0.1:{}", free_port()),
                child: None,
            })
            .collect();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let mut c = Self { members, dir, rt };
        for i in 0..n {
            c.spawn(i, "new");
        }
        c.wait_ready();
        c
    }

    fn spawn(&mut self, i: usize, state: &str) {
        let initial: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}=http://{}", m.name, m.peer))
            .collect();
        let m = &self.members[i];
        let log = std::fs::File::create(self.dir.join(format!("{}.log", m.name))).unwrap();
        let child = Command::new("etcd")
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(self.dir.join(&m.name))
            .args(["--listen-client-urls", &format!("http://{}", m.client)])
            .args(["--advertise-client-urls", &format!("http://{}", m.client)])
            .args(["--listen-peer-urls", &format!("http://{}", m.peer)])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://{}", m.peer),
            ])
            .args(["--initial-cluster", &initial.join(",")])
            .args(["--initial-cluster-state", state])
            .args(["--initial-cluster-token", "ferry-test"])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd starts");
        self.members[i].child = Some(child);
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client.clone()).collect()
    }

    /// A client of every member.
    pub fn client(&self) -> Etcd {
        let _guard = self.rt.enter();
        Etcd::new(&config(self.endpoints())).unwrap()
    }

    /// Waits until a write goes through (a leader is elected).
    pub fn wait_ready(&self) {
        let etcd = self.client();
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.rt.block_on(etcd.put(b"/ready", b"1", None)).is_err() {
            assert!(
                Instant::now() < deadline,
                "etcd did not start: {:?}",
                self.dir
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The member that leads now.
    pub fn leader(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            for (i, m) in self.members.iter().enumerate() {
                if m.child.is_none() {
                    continue;
                }
                let one = {
                    let _guard = self.rt.enter();
                    Etcd::new(&config(vec![m.client.clone()])).unwrap()
                };
                if let Ok(s) = self.rt.block_on(one.status()) {
                    if s.leader != 0 && s.leader == s.member {
                        return i;
                    }
                }
            }
            assert!(Instant::now() < deadline, "no etcd leader");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILLs member `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGSTOPs (`stop`) or SIGCONTs member `i`.
    pub fn signal(&self, i: usize, signal: &str) {
        let pid = self.members[i].child.as_ref().expect("running").id();
        let ok = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {signal} {pid}");
    }

    /// Starts member `i` again on its data.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i, "existing");
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            if let Some(mut c) = m.child.take() {
                let _ = Command::new("kill")
                    .args(["-CONT", &c.id().to_string()])
                    .status();
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
