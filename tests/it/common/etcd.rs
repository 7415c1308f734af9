//! A real etcd cluster on loopback for the tests: members as processes with
//! their own data folders and free ports, fast elections, and the faults the
//! tests inject (SIGKILL, SIGSTOP, restart).

use super::free_port;
use ferry::agent::etcd::{Etcd, EtcdConfig, EtcdTls};
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
    /// With TLS: what clients need (the CA, a client certificate).
    pub tls: Option<EtcdTls>,
}

/// Whether `etcd` runs here; with `CI` set a missing one fails the test.
pub fn available() -> bool {
    super::tool_available("etcd", "etcd (Debian's etcd-server package)")
}

/// A CA, and a certificate it signed for `names` (with `usage`): PEMs of
/// the CA, the certificate and its key.
fn signed(
    names: &[&str],
    usage: rcgen::ExtendedKeyUsagePurpose,
    ca: &rcgen::Issuer<'_, rcgen::KeyPair>,
) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let mut params = rcgen::CertificateParams::new(names).unwrap();
    params.extended_key_usages = vec![usage];
    let cert = params.signed_by(&key, ca).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// TLS material for a test cluster: a CA, etcd's certificate for
/// 127.0.0.1, a client certificate. Returns the files etcd reads and what a
/// client holds.
fn make_pki(dir: &std::path::Path) -> EtcdTls {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let ca = rcgen::Issuer::new(ca_params, ca_key);
    let (server, server_key) = signed(
        &["127.0.0.1", "localhost"],
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        &ca,
    );
    let (client, client_key) = signed(&["client"], rcgen::ExtendedKeyUsagePurpose::ClientAuth, &ca);
    for (name, pem) in [
        ("ca.pem", ca_cert.pem()),
        ("server.pem", server),
        ("server-key.pem", server_key),
    ] {
        std::fs::write(dir.join(name), pem).unwrap();
    }
    EtcdTls {
        ca: ca_cert.pem().into_bytes(),
        identity: Some((client.into_bytes(), client_key.into_bytes())),
    }
}

impl EtcdCluster {
    /// `n` members under a fresh folder, started and answering.
    pub fn start(test: &str, n: usize) -> Self {
        Self::start_with(test, n, false)
    }

    /// As [`Self::start`]; with `tls`, clients must use TLS and present a
    /// certificate the cluster's CA signed.
    pub fn start_with(test: &str, n: usize, tls: bool) -> Self {
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
        let tls = tls.then(|| make_pki(&dir));
        let mut c = Self {
            members,
            dir,
            rt,
            tls,
        };
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
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut cmd = Command::new("etcd");
        if self.tls.is_some() {
            cmd.arg("--cert-file")
                .arg(self.dir.join("server.pem"))
                .arg("--key-file")
                .arg(self.dir.join("server-key.pem"))
                .arg("--trusted-ca-file")
                .arg(self.dir.join("ca.pem"))
                .arg("--client-cert-auth");
        }
        let child = cmd
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(self.dir.join(&m.name))
            .args(["--listen-client-urls", &format!("{scheme}://{}", m.client)])
            .args([
                "--advertise-client-urls",
                &format!("{scheme}://{}", m.client),
            ])
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

    /// A client config for `endpoints` with the test's timeouts (and TLS
    /// when the cluster has it).
    pub fn config(&self, endpoints: Vec<String>) -> EtcdConfig {
        EtcdConfig {
            endpoints,
            tls: self.tls.clone(),
            request_timeout: Duration::from_millis(500),
            keepalive: Duration::from_secs(10),
            ..Default::default()
        }
    }

    /// A client of `config`.
    pub fn client_of(&self, config: &EtcdConfig) -> Etcd {
        let _guard = self.rt.enter();
        Etcd::new(config).unwrap()
    }

    /// A client of every member.
    pub fn client(&self) -> Etcd {
        self.client_of(&self.config(self.endpoints()))
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
                let one = self.client_of(&self.config(vec![m.client.clone()]));
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

/// One etcd member shared by every test of this process that needs a
/// store but not faults in it: each test's agents keep their keys under a
/// prefix of their own. `None` (the test skips) where `etcd` is missing.
///
/// It is spawned by a thread that lives as long as the process, with
/// PDEATHSIG, so it dies with the test binary; folders of earlier binaries'
/// members are removed first.
pub fn shared() -> Option<&'static str> {
    static SHARED: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    SHARED
        .get_or_init(|| available().then(start_shared))
        .as_deref()
}

/// Starts the shared member; returns its client address once it answers.
fn start_shared() -> String {
    let tmp = std::env::temp_dir();
    let stem = "ferry-etcd-shared-";
    for entry in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(stem) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    let dir = tmp.join(format!("{stem}{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (client, peer) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let (tx, rx) = std::sync::mpsc::channel();
    let (c, p) = (client.clone(), peer.clone());
    std::thread::spawn(move || {
        use std::os::unix::process::CommandExt;
        let log = std::fs::File::create(dir.join("etcd.log")).unwrap();
        let mut cmd = Command::new("etcd");
        cmd.args(["--name", "shared"])
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(["--listen-client-urls", &format!("http://{c}")])
            .args(["--advertise-client-urls", &format!("http://{c}")])
            .args(["--listen-peer-urls", &format!("http://{p}")])
            .args(["--initial-advertise-peer-urls", &format!("http://{p}")])
            .args(["--initial-cluster", &format!("shared=http://{p}")])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdout(Stdio::null())
            .stderr(log);
        // SAFETY: prctl is async-signal-safe and touches only the child.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("etcd starts");
        tx.send(()).unwrap();
        // This thread is the member's parent: it must outlive every test.
        let _ = child.wait();
        panic!("the shared etcd member exited: see {}", dir.display());
    });
    rx.recv().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let etcd = {
        let _guard = rt.enter();
        Etcd::new(&EtcdConfig {
            endpoints: vec![client.clone()],
            request_timeout: Duration::from_millis(500),
            ..Default::default()
        })
        .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while rt.block_on(etcd.put(b"/ready", b"1", None)).is_err() {
        assert!(Instant::now() < deadline, "the shared etcd did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    client
}

/// Cluster-file lines that put a test's agents on the shared member under
/// a prefix of their own; `None` where `etcd` is missing.
pub fn shared_top(test: &str) -> Option<String> {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let endpoint = shared()?;
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Some(format!(
        "etcd = [\"{endpoint}\"]\netcd_prefix = \"/ferry-test/{test}-{}-{n}/\"\n",
        std::process::id()
    ))
}

/// Whether cluster-file lines `top` name an etcd cluster of their own.
pub fn names_etcd(top: &str) -> bool {
    top.lines().any(|l| {
        let l = l.trim_start();
        l.starts_with("etcd ") || l.starts_with("etcd=")
    })
}
