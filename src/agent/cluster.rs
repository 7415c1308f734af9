//! The cluster file: one TOML file naming every node of a cluster, its
//! addresses and capacity, and the shared token, read by every agent and by
//! the orchestrator's commands.
//!
//! ```toml
//! token_file = "cluster.token"        # the API's bearer token
//! readonly_token_file = "ro.token"    # optional: GET routes and /metrics only
//! key_file = "migration.key"          # optional: migrations' key is derived from it (else from the token)
//! tls = true                           # migrations over TLS 1.3 (the default)
//! [defaults]
//! max_concurrent_migrations = 2
//! [[node]]
//! name = "a"
//! control = "127.0.0.1:7411"          # control API, HTTPS
//! data = "127.0.0.1:7511"             # incoming migrations
//! memory_capacity = "8GiB"            # what VMs on this node may use in total
//! tls_cert = "a.pem"                  # the API's certificate (`ferry tls-cert`), trusted by the others
//! tls_key = "a-key.pem"               # its private key (needed on node a only)
//! ```
//!
//! `insecure_api = true` serves the API over plain HTTP instead (a trusted,
//! isolated network: loopback demos).
//!
//! `state_dir` (top level, default `state` beside the file) holds each
//! node's folder, `{state_dir}/{node}`, where its agent keeps the paused
//! last copies of VMs across restarts; a `[[node]]` may name its own folder
//! with `state_dir`, and `ferry agent --state-dir` overrides both.
//!
//! `image_dirs = ["/srv/images"]` (optional) limits the images a VM may
//! start from (`image` in `POST /v1/vms`) to files inside those folders,
//! symbolic links resolved; without it any absolute path the agent can
//! read is taken.
//!
//! Relative paths resolve against the file's own folder; the token is the
//! token file's content with surrounding white space trimmed. Sizes and rates
//! take the CLI's unit strings (or plain integers: bytes, bytes per second).

use crate::units::{parse_bandwidth, parse_size};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Outgoing live migrations per node at once, as Hyper-V's default.
pub const DEFAULT_MAX_CONCURRENT_MIGRATIONS: u32 = 2;
/// Most outgoing migrations a node runs at once.
pub const MAX_CONCURRENT: u32 = 64;
/// The largest `memory_capacity`: 1 PiB.
pub const MAX_NODE_MEMORY: u64 = 1 << 50;

/// Errors reading a cluster file, each naming the file and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The file (or the token file it names) could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or has fields of the wrong type.
    #[error("{path} is not a valid cluster file: {message}")]
    Syntax {
        /// The file.
        path: String,
        /// The parser's message (line and column included).
        message: String,
    },
    /// A field has a value that cannot be used.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong, naming the node and field.
        message: String,
    },
}

/// A size or rate as the CLI writes it ("8GiB", "1Gbit/s") or in plain bytes.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Amount {
    Bytes(u64),
    Text(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    token_file: PathBuf,
    readonly_token_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    tls: Option<bool>,
    insecure_api: Option<bool>,
    state_dir: Option<PathBuf>,
    image_dirs: Option<Vec<PathBuf>>,
    #[serde(default)]
    defaults: RawDefaults,
    #[serde(default)]
    api: RawApi,
    #[serde(default, rename = "node")]
    nodes: Vec<RawNode>,
    // The store (`store.rs`).
    etcd: Option<Vec<String>>,
    etcd_prefix: Option<String>,
    lease_ttl: Option<String>,
    etcd_ca: Option<PathBuf>,
    etcd_cert: Option<PathBuf>,
    etcd_key: Option<PathBuf>,
    etcd_user: Option<String>,
    etcd_password_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApi {
    max_connections: Option<usize>,
    header_timeout: Option<String>,
    request_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    max_concurrent_migrations: Option<u32>,
    max_bandwidth: Option<Amount>,
    update_hook: Option<Vec<String>>,
    preview_hook: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: String,
    control: String,
    data: String,
    memory_capacity: Amount,
    max_concurrent_migrations: Option<u32>,
    max_bandwidth: Option<Amount>,
    update_hook: Option<Vec<String>>,
    preview_hook: Option<Vec<String>>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    state_dir: Option<PathBuf>,
}

/// One node of the cluster, defaults applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    /// Its name, unique in the cluster.
    pub name: String,
    /// `host:port` of its HTTP control API.
    pub control: String,
    /// `host:port` where it listens for incoming migrations.
    pub data: String,
    /// What its VMs may use in total, bytes.
    pub memory_capacity: u64,
    /// Outgoing live migrations at once; more wait in a queue.
    pub max_concurrent_migrations: u32,
    /// Cap on all its outgoing migrations together, bytes/s (`None`: no cap).
    pub max_bandwidth: Option<u64>,
    /// The program (and its first arguments) that runs a rolling update's
    /// command on this node, the command appended as the last argument; no
    /// hook, no updates.
    pub update_hook: Option<Vec<String>>,
    /// The program (and arguments) `ferry cluster update --preview` runs on
    /// this node to show what an update would install, with the update
    /// command in `FERRY_UPDATE_COMMAND`; never the update hook.
    pub preview_hook: Option<Vec<String>>,
    /// Its control API's certificate (DER), which clients pin; `None` with
    /// `insecure_api` (plain HTTP).
    pub api_cert: Option<Vec<u8>>,
    /// Its certificate's private key file, for its own agent.
    pub api_key_file: Option<PathBuf>,
    /// Where its agent keeps what must outlive its process: the paused last
    /// copies of VMs (`guests/`).
    pub state_dir: PathBuf,
}

/// This node's fields from `ferry agent`'s flags, over or instead of its
/// `[[node]]` entry.
#[derive(Debug, Clone, Default)]
pub struct JoinNode {
    /// The node.
    pub name: String,
    /// `--control`: its control API's address.
    pub control: Option<String>,
    /// `--data`: its migration listener's address.
    pub data: Option<String>,
    /// `--memory-capacity`: what its VMs may use ("64GiB").
    pub memory_capacity: Option<String>,
    /// `--tls-cert`: its control API's certificate (PEM).
    pub tls_cert: Option<PathBuf>,
    /// `--tls-key`: that certificate's key (PEM, a secret file).
    pub tls_key: Option<PathBuf>,
}

impl JoinNode {
    /// Puts the flags into the node's entry, or adds one made of them.
    fn apply(&self, nodes: &mut Vec<RawNode>) -> Result<(), String> {
        if let Some(n) = nodes.iter_mut().find(|n| n.name == self.name) {
            if let Some(c) = &self.control {
                n.control = c.clone();
            }
            if let Some(d) = &self.data {
                n.data = d.clone();
            }
            if let Some(m) = &self.memory_capacity {
                n.memory_capacity = Amount::Text(m.clone());
            }
            n.tls_cert = self.tls_cert.clone().or(n.tls_cert.take());
            n.tls_key = self.tls_key.clone().or(n.tls_key.take());
            return Ok(());
        }
        let need = |v: &Option<String>, flag: &str| {
            v.clone().ok_or_else(|| {
                format!(
                    "node {} has no [[node]] entry: give --control, --data and --memory-capacity to join by registering in etcd ({flag} is missing)",
                    self.name
                )
            })
        };
        nodes.push(RawNode {
            name: self.name.clone(),
            control: need(&self.control, "--control")?,
            data: need(&self.data, "--data")?,
            memory_capacity: Amount::Text(need(&self.memory_capacity, "--memory-capacity")?),
            max_concurrent_migrations: None,
            max_bandwidth: None,
            update_hook: None,
            preview_hook: None,
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            state_dir: None,
        });
        Ok(())
    }
}

/// A cluster file, read and checked.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// The file it was read from.
    pub path: PathBuf,
    /// The bearer token of every agent's control API.
    pub token: String,
    /// A bearer token for `GET` routes and `/metrics` only
    /// (`readonly_token_file`), for scrapers and dashboards.
    pub readonly_token: Option<String>,
    /// The key migrations between the cluster's agents are proved with:
    /// derived by HKDF from `key_file`, or from the token when there is
    /// none, so it is never the token's bytes.
    pub key: Vec<u8>,
    /// Whether the control API is plain HTTP (`insecure_api = true`);
    /// otherwise HTTPS with each node's pinned certificate.
    pub insecure_api: bool,
    /// Whether migrations between agents run over TLS 1.3 (`tls`, default
    /// true): each agent presents a certificate of its own, and the key's
    /// proofs are bound to each TLS channel.
    pub tls: bool,
    /// The control API's limits (`[api]`: `max_connections`,
    /// `header_timeout`, `request_timeout`).
    pub api: super::listen::ApiLimits,
    /// The nodes, in the file's order.
    pub nodes: Vec<NodeSpec>,
    /// Where the cluster's state lives (`etcd`, `etcd_prefix`, `lease_ttl`,
    /// `etcd_ca`/`etcd_cert`/`etcd_key`, `etcd_user`/`etcd_password_file`).
    pub store: Option<super::store::StoreConfig>,
    /// The folders VM images must be in (`image_dirs`); `None`: any path.
    pub image_dirs: Option<Vec<PathBuf>>,
}

/// Most folders `image_dirs` may name.
const MAX_IMAGE_DIRS: usize = 64;

/// `image_dirs`: 1 to [`MAX_IMAGE_DIRS`] absolute paths.
fn check_image_dirs(dirs: &[PathBuf]) -> Result<(), String> {
    if dirs.is_empty() || dirs.len() > MAX_IMAGE_DIRS {
        return Err(format!(
            "image_dirs: {} folders is out of range (1 to {MAX_IMAGE_DIRS}; leave it out to take any path)",
            dirs.len()
        ));
    }
    match dirs.iter().find(|d| !d.is_absolute()) {
        Some(d) => Err(format!(
            "image_dirs: {} is not an absolute path",
            d.display()
        )),
        None => Ok(()),
    }
}

impl Cluster {
    /// Whether `image` may be read as a VM's memory: inside one of
    /// `image_dirs` once links are resolved (any path without them).
    pub fn image_allowed(&self, image: &Path) -> Result<(), String> {
        let Some(dirs) = &self.image_dirs else {
            return Ok(());
        };
        let real = image
            .canonicalize()
            .map_err(|e| format!("image {}: {e}", image.display()))?;
        let inside = dirs
            .iter()
            .filter_map(|d| d.canonicalize().ok())
            .any(|d| real.starts_with(d));
        if inside {
            return Ok(());
        }
        let list: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
        Err(format!(
            "image {}: it is outside the cluster's image_dirs ({})",
            image.display(),
            list.join(", ")
        ))
    }
}

/// A PEM certificate file's first certificate, DER.
fn read_cert(path: &Path) -> Result<Vec<u8>, String> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_file(path)
        .map(|c| c.to_vec())
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// The `[api]` table, defaults applied, each value in its range.
fn api_limits(raw: &RawApi) -> Result<super::listen::ApiLimits, String> {
    use std::time::Duration;
    let mut limits = super::listen::ApiLimits::default();
    if let Some(n) = raw.max_connections {
        if !(1..=65_536).contains(&n) {
            return Err(format!("max_connections: {n} is out of range (1 to 65536)"));
        }
        limits.max_connections = n;
    }
    let duration = |field: &str, text: &str, lo: Duration, hi: Duration| {
        let d = crate::units::parse_duration(text).map_err(|e| format!("{field}: {e}"))?;
        if d < lo || d > hi {
            return Err(format!("{field}: {d:?} is out of range ({lo:?} to {hi:?})"));
        }
        Ok(d)
    };
    if let Some(t) = &raw.header_timeout {
        limits.header_timeout = duration(
            "header_timeout",
            t,
            Duration::from_millis(100),
            Duration::from_secs(600),
        )?;
    }
    if let Some(t) = &raw.request_timeout {
        limits.request_timeout = duration(
            "request_timeout",
            t,
            Duration::from_secs(1),
            Duration::from_secs(3600),
        )?;
    }
    Ok(limits)
}

impl Cluster {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<Self, ClusterError> {
        let text = std::fs::read_to_string(path).map_err(|source| ClusterError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Reads and checks `path` with this node as `join` gives it: its
    /// `[[node]]` entry with the flags' fields in place of the file's, or,
    /// without one, a node of the flags alone (`ferry agent --node NAME
    /// --control ADDR --data ADDR --memory-capacity SIZE`), checked alike.
    pub fn load_joining(path: &Path, join: &JoinNode) -> Result<Self, ClusterError> {
        let text = std::fs::read_to_string(path).map_err(|source| ClusterError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse_with(&text, path, Some(join))
    }

    /// Parses a cluster file's text; `path` locates it (relative paths in it
    /// resolve against its folder) and names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ClusterError> {
        Self::parse_with(text, path, None)
    }

    fn parse_with(text: &str, path: &Path, join: Option<&JoinNode>) -> Result<Self, ClusterError> {
        let shown = path.display().to_string();
        let invalid = |message: String| ClusterError::Invalid {
            path: shown.clone(),
            message,
        };
        let mut raw: RawCluster = toml::from_str(text).map_err(|e| ClusterError::Syntax {
            path: shown.clone(),
            message: e.to_string(),
        })?;
        if let Some(j) = join {
            j.apply(&mut raw.nodes).map_err(invalid)?;
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        // Secrets: refused when every user may read them, as ssh refuses
        // an open private key.
        let read_secret = |file: &Path, what: &str| -> Result<String, ClusterError> {
            let file = dir.join(file);
            let bytes = crate::migration::auth::read_secret_file(&file)
                .map_err(|e| invalid(format!("{what}: {e}")))?;
            let text = String::from_utf8(bytes)
                .map_err(|_| invalid(format!("{what} {} is not UTF-8", file.display())))?;
            Ok(text.trim().to_string())
        };
        let token = read_secret(&raw.token_file, "token_file")?;
        let readonly_token = match &raw.readonly_token_file {
            Some(f) => Some(read_secret(f, "readonly_token_file")?),
            None => None,
        };
        if readonly_token.as_deref() == Some(token.as_str()) {
            return Err(invalid(
                "readonly_token_file holds the token itself: a read-only token must differ".into(),
            ));
        }
        let key = crate::migration::auth::derive_migration_key(
            match &raw.key_file {
                Some(f) => read_secret(f, "key_file")?,
                None => token.clone(),
            }
            .as_bytes(),
        );
        let store = super::store::RawStore {
            etcd: raw.etcd,
            etcd_prefix: raw.etcd_prefix,
            lease_ttl: raw.lease_ttl,
            etcd_ca: raw.etcd_ca,
            etcd_cert: raw.etcd_cert,
            etcd_key: raw.etcd_key,
            etcd_user: raw.etcd_user,
            etcd_password_file: raw.etcd_password_file,
        }
        .check(dir, |f, what| {
            read_secret(f, what).map_err(|e| match e {
                ClusterError::Invalid { message, .. } => message,
                other => other.to_string(),
            })
        })
        .map_err(invalid)?;
        let insecure_api = raw.insecure_api.unwrap_or(false);
        // With etcd, nodes may join by registering there alone.
        if raw.nodes.is_empty() && store.is_none() {
            return Err(invalid("no [[node]] in the cluster".into()));
        }
        let api = api_limits(&raw.api).map_err(|e| invalid(format!("api.{e}")))?;
        let default_bandwidth = match &raw.defaults.max_bandwidth {
            Some(a) => amount(a, "defaults", "max_bandwidth", true).map_err(&invalid)?,
            None => None,
        };
        let shared = NodeDefaults {
            dir,
            defaults: &raw.defaults,
            max_bandwidth: default_bandwidth,
            insecure_api,
            state_dir: raw.state_dir.as_deref().unwrap_or(Path::new("state")),
        };
        let mut nodes: Vec<NodeSpec> = Vec::with_capacity(raw.nodes.len().min(4096));
        for n in raw.nodes {
            if nodes.iter().any(|o| o.name == n.name) {
                return Err(invalid(format!("node {} is named twice", n.name)));
            }
            nodes.push(shared.node_spec(n).map_err(&invalid)?);
        }
        let image_dirs = raw
            .image_dirs
            .map(|dirs| check_image_dirs(&dirs).map(|()| dirs))
            .transpose()
            .map_err(invalid)?;
        Ok(Self {
            image_dirs,
            path: path.to_path_buf(),
            token,
            key,
            tls: raw.tls.unwrap_or(true),
            readonly_token,
            insecure_api,
            api,
            nodes,
            store,
        })
    }

    /// The node named `name`.
    pub fn node(&self, name: &str) -> Option<&NodeSpec> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The node named `name`, or an error listing the cluster's nodes.
    pub fn require_node(&self, name: &str) -> Result<&NodeSpec, String> {
        self.node(name).ok_or_else(|| {
            let names: Vec<&str> = self.nodes.iter().map(|n| n.name.as_str()).collect();
            format!(
                "no node {name:?} in {} (nodes: {})",
                self.path.display(),
                names.join(", ")
            )
        })
    }
}

/// `host:port` with a non-empty host and a port number.
pub(crate) fn check_address(addr: &str) -> Result<(), &'static str> {
    let (host, port) = addr.rsplit_once(':').ok_or("expected host:port")?;
    if host.is_empty() {
        return Err("the host is empty");
    }
    port.parse::<u16>()
        .map_err(|_| "the port is not a number from 0 to 65535")?;
    Ok(())
}

/// What every node's entry falls back on: the cluster file's folder and
/// its `[defaults]`.
struct NodeDefaults<'a> {
    dir: &'a Path,
    defaults: &'a RawDefaults,
    max_bandwidth: Option<u64>,
    insecure_api: bool,
    state_dir: &'a Path,
}

impl NodeDefaults<'_> {
    /// Checks one `[[node]]` entry, every field in its range, and fills in
    /// the defaults.
    fn node_spec(&self, n: RawNode) -> Result<NodeSpec, String> {
        let valid = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.';
        if n.name.is_empty()
            || n.name.len() > crate::wire::MAX_LABEL_LEN
            || !n.name.chars().all(valid)
        {
            return Err(format!(
                "node name {:?}: use 1 to 255 letters, digits, '-', '_' and '.'",
                n.name
            ));
        }
        let name = &n.name;
        for (field, addr) in [("control", &n.control), ("data", &n.data)] {
            check_address(addr).map_err(|why| format!("node {name}: {field} {addr:?}: {why}"))?;
        }
        let memory_capacity =
            amount(&n.memory_capacity, name, "memory_capacity", false)?.unwrap_or(0);
        if memory_capacity == 0 || memory_capacity > MAX_NODE_MEMORY {
            return Err(format!(
                "node {name}: memory_capacity {memory_capacity} is out of range (1 byte to 1 PiB)"
            ));
        }
        let max_concurrent_migrations = n
            .max_concurrent_migrations
            .or(self.defaults.max_concurrent_migrations)
            .unwrap_or(DEFAULT_MAX_CONCURRENT_MIGRATIONS);
        if max_concurrent_migrations == 0 || max_concurrent_migrations > MAX_CONCURRENT {
            return Err(format!(
                "node {name}: max_concurrent_migrations {max_concurrent_migrations} is out of range (1 to {MAX_CONCURRENT})"
            ));
        }
        let max_bandwidth = match &n.max_bandwidth {
            Some(a) => amount(a, name, "max_bandwidth", true)?,
            None => self.max_bandwidth,
        };
        let (lo, hi) = crate::migration::ranges::BANDWIDTH;
        if let Some(b) = max_bandwidth.filter(|b| *b < lo || *b > hi) {
            return Err(format!(
                "node {name}: max_bandwidth {b} B/s is out of range ({lo} to {hi})"
            ));
        }
        let update_hook = n.update_hook.or_else(|| self.defaults.update_hook.clone());
        if update_hook.as_ref().is_some_and(|h| h.is_empty()) {
            return Err(format!("node {name}: update_hook is empty"));
        }
        let preview_hook = n
            .preview_hook
            .or_else(|| self.defaults.preview_hook.clone());
        if preview_hook.as_ref().is_some_and(|h| h.is_empty()) {
            return Err(format!("node {name}: preview_hook is empty"));
        }
        let api_cert = match (&n.tls_cert, self.insecure_api) {
            (Some(c), _) => Some(
                read_cert(&self.dir.join(c))
                    .map_err(|e| format!("node {name}: tls_cert: {e}"))?,
            ),
            (None, true) => None,
            (None, false) => return Err(format!(
                "node {name}: no tls_cert: the control API is served over HTTPS (make a pair with `ferry tls-cert`), or say insecure_api = true for plain HTTP on a trusted network"
            )),
        };
        let state_dir = match &n.state_dir {
            Some(d) => self.dir.join(d),
            None => self.dir.join(self.state_dir).join(name),
        };
        Ok(NodeSpec {
            state_dir,
            api_cert,
            api_key_file: n.tls_key.as_ref().map(|k| self.dir.join(k)),
            name: n.name,
            control: n.control,
            data: n.data,
            memory_capacity,
            max_concurrent_migrations,
            max_bandwidth,
            update_hook,
            preview_hook,
        })
    }
}

/// A size (`rate`: a bandwidth, where 0 means none) of a node's `field`.
fn amount(a: &Amount, node: &str, field: &str, rate: bool) -> Result<Option<u64>, String> {
    match a {
        Amount::Bytes(0) if rate => Ok(None),
        Amount::Bytes(n) => Ok(Some(*n)),
        Amount::Text(s) if rate => {
            parse_bandwidth(s).map_err(|e| format!("node {node}: {field}: {e}"))
        }
        Amount::Text(s) => parse_size(s)
            .map(Some)
            .map_err(|e| format!("node {node}: {field}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with_token(token: &str) -> tempdir::Dir {
        let d = tempdir::Dir::new();
        crate::migration::auth::write_secret_file(
            &d.path().join("cluster.token"),
            token.as_bytes(),
        )
        .unwrap();
        d
    }

    /// A throwaway folder for a test's files.
    mod tempdir {
        pub struct Dir(std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                use std::sync::atomic::{AtomicU32, Ordering};
                static N: AtomicU32 = AtomicU32::new(0);
                let p = std::env::temp_dir().join(format!(
                    "ferry-cluster-test-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::create_dir_all(&p).unwrap();
                Self(p)
            }
            pub fn path(&self) -> &std::path::Path {
                &self.0
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    const EXAMPLE: &str = r#"
token_file = "cluster.token"        # bearer token for the API and shared key for migrations
insecure_api = true
[defaults]
max_concurrent_migrations = 2
[[node]]
name = "a"
control = "127.0.0.1:7411"          # HTTP control API
data = "127.0.0.1:7511"             # incoming migrations
memory_capacity = "8GiB"            # what VMs on this node may use in total
[[node]]
name = "b"
control = "127.0.0.1:7412"
data = "127.0.0.1:7512"
memory_capacity = 4294967296
max_concurrent_migrations = 3
max_bandwidth = "1Gbit/s"
update_hook = ["sh", "-c"]
"#;

    #[test]
    fn the_issue_example_reads_with_defaults_applied() {
        let d = dir_with_token("  s3cret-s3cret-s3cret\n");
        let c = Cluster::parse(EXAMPLE, &d.path().join("cluster.toml")).unwrap();
        assert_eq!(c.token, "s3cret-s3cret-s3cret");
        // The migration key is derived from the token, never the token.
        assert_eq!(
            c.key,
            crate::migration::auth::derive_migration_key(b"s3cret-s3cret-s3cret")
        );
        assert!(c.insecure_api && c.readonly_token.is_none());
        assert_eq!(c.nodes.len(), 2);
        let a = c.node("a").unwrap();
        assert_eq!(a.control, "127.0.0.1:7411");
        assert_eq!(a.data, "127.0.0.1:7511");
        assert_eq!(a.memory_capacity, 8 << 30);
        assert_eq!(a.max_concurrent_migrations, 2);
        assert_eq!(a.max_bandwidth, None);
        assert_eq!(a.update_hook, None);
        let b = c.node("b").unwrap();
        assert_eq!(b.memory_capacity, 4 << 30);
        assert_eq!(b.max_concurrent_migrations, 3);
        assert_eq!(b.max_bandwidth, Some(125_000_000));
        assert_eq!(b.update_hook, Some(vec!["sh".into(), "-c".into()]));
        assert!(c.require_node("z").unwrap_err().contains("nodes: a, b"));
    }

    #[test]
    fn a_separate_key_file_is_where_the_migration_key_comes_from() {
        let d = dir_with_token("the-token-0123456789");
        crate::migration::auth::write_secret_file(&d.path().join("k"), b"key-bytes-0123456789\n")
            .unwrap();
        let text = EXAMPLE.replace(
            "token_file = \"cluster.token\"",
            "token_file = \"cluster.token\"\nkey_file = \"k\"",
        );
        let c = Cluster::parse(&text, &d.path().join("cluster.toml")).unwrap();
        assert_eq!(c.token, "the-token-0123456789");
        assert_eq!(
            c.key,
            crate::migration::auth::derive_migration_key(b"key-bytes-0123456789")
        );
    }

    #[test]
    fn the_api_needs_certificates_unless_insecure_and_a_readonly_token_differs() {
        let d = dir_with_token("the-token-0123456789");
        let path = d.path().join("cluster.toml");
        let secure = EXAMPLE.replace("insecure_api = true\n", "");
        let e = Cluster::parse(&secure, &path).unwrap_err().to_string();
        assert!(e.contains("node a: no tls_cert"), "{e}");
        let (cert, key) = crate::transport::tls::TlsServer::generate_pem().unwrap();
        std::fs::write(d.path().join("a.pem"), cert).unwrap();
        crate::migration::auth::write_secret_file(&d.path().join("a-key.pem"), key.as_bytes())
            .unwrap();
        let with_certs = secure
            .replace(
                "name = \"a\"",
                "name = \"a\"\ntls_cert = \"a.pem\"\ntls_key = \"a-key.pem\"",
            )
            .replace("name = \"b\"", "name = \"b\"\ntls_cert = \"a.pem\"");
        let c = Cluster::parse(&with_certs, &path).unwrap();
        assert!(!c.insecure_api);
        assert!(c.node("a").unwrap().api_cert.is_some());
        assert_eq!(c.node("b").unwrap().api_key_file, None);
        // A read-only token: read, and never the token itself.
        crate::migration::auth::write_secret_file(&d.path().join("ro"), b"read-only-0123456789")
            .unwrap();
        let ro = EXAMPLE.replace(
            "insecure_api = true",
            "insecure_api = true\nreadonly_token_file = \"ro\"",
        );
        let c = Cluster::parse(&ro, &path).unwrap();
        assert_eq!(c.readonly_token.as_deref(), Some("read-only-0123456789"));
        crate::migration::auth::write_secret_file(&d.path().join("ro"), b"the-token-0123456789")
            .unwrap();
        let e = Cluster::parse(&ro, &path).unwrap_err().to_string();
        assert!(e.contains("must differ"), "{e}");
    }

    #[test]
    fn bad_files_are_refused_naming_what_is_wrong() {
        let d = dir_with_token("the-token-0123456789");
        let path = d.path().join("cluster.toml");
        let err = |text: &str| Cluster::parse(text, &path).unwrap_err().to_string();
        assert!(err("token_file = 1").contains("not a valid cluster file"));
        assert!(err("token_file = \"cluster.token\"").contains("no [[node]]"));
        assert!(err("token_file = \"missing\"\n[[node]]\nname=\"a\"\ncontrol=\"h:1\"\ndata=\"h:2\"\nmemory_capacity=1")
            .contains("No such file"));
        let with = |from: &str, to: &str| err(&EXAMPLE.replace(from, to));
        assert!(with("name = \"b\"", "name = \"a\"").contains("node a is named twice"));
        assert!(with("\"127.0.0.1:7412\"", "\"127.0.0.1\"").contains("node b: control"));
        assert!(with("\"8GiB\"", "\"8 parsecs\"").contains("node a: memory_capacity"));
        for n in ["0", "100000"] {
            assert!(with(
                "max_concurrent_migrations = 3",
                &format!("max_concurrent_migrations = {n}")
            )
            .contains("max_concurrent_migrations"));
        }
        assert!(with("\"8GiB\"", "\"2048TiB\"").contains("out of range"));
        assert!(with("\"8GiB\"", "\"8GiB\"\nmax_bandwidth = \"10B/s\"").contains("max_bandwidth"));
        assert!(
            with("name = \"b\"", &format!("name = \"{}\"", "b".repeat(300))).contains("node name")
        );
        assert!(with(
            "memory_capacity = \"8GiB\"",
            "memory_capacity = \"8GiB\"\ncolour = 1"
        )
        .contains("colour"));
        let token = d.path().join("cluster.token");
        crate::migration::auth::write_secret_file(&token, b" \n").unwrap();
        assert!(err(EXAMPLE).contains("is empty"));
        // A short secret, or one its group or others can read, is refused.
        crate::migration::auth::write_secret_file(&token, b"tok").unwrap();
        assert!(err(EXAMPLE).contains("at least 16"));
        crate::migration::auth::write_secret_file(&token, b"the-token-0123456789").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(err(EXAMPLE).contains("group or others"));
    }

    #[test]
    fn image_dirs_keep_images_inside_them_links_resolved() {
        let d = dir_with_token("the-token-0123456789");
        let path = d.path().join("cluster.toml");
        let with = |top: &str| Cluster::parse(&format!("{top}\n{EXAMPLE}"), &path);
        let images = d.path().join("images");
        std::fs::create_dir_all(&images).unwrap();
        std::fs::write(images.join("vm.img"), [0u8; 4096]).unwrap();
        std::fs::write(d.path().join("secret"), [0u8; 4096]).unwrap();
        std::os::unix::fs::symlink(d.path().join("secret"), images.join("link.img")).unwrap();
        // Without the setting any readable path goes.
        let open = with("").unwrap();
        assert!(open.image_dirs.is_none());
        assert_eq!(open.image_allowed(&d.path().join("secret")), Ok(()));
        let c = with(&format!(
            "image_dirs = [{:?}]",
            images.display().to_string()
        ))
        .unwrap();
        assert_eq!(c.image_allowed(&images.join("vm.img")), Ok(()));
        for outside in [
            d.path().join("secret"),
            images.join("link.img"),
            images.join("../secret"),
        ] {
            let e = c.image_allowed(&outside).unwrap_err();
            assert!(e.contains("outside the cluster's image_dirs"), "{e}");
        }
        assert!(c.image_allowed(&images.join("none.img")).is_err());
        for (top, field) in [
            ("image_dirs = []", "out of range"),
            ("image_dirs = [\"images\"]", "not an absolute path"),
        ] {
            let e = with(top).unwrap_err().to_string();
            assert!(e.contains(field), "{top}: {e}");
        }
    }

    #[test]
    fn the_store_settings_are_read_and_each_checked() {
        let d = dir_with_token("the-token-0123456789");
        let path = d.path().join("cluster.toml");
        let with = |top: &str| Cluster::parse(&format!("{top}\n{EXAMPLE}"), &path);
        assert!(with("").unwrap().store.is_none());
        let s = with("etcd = [\"127.0.0.1:2379\", \"127.0.0.1:22379\"]")
            .unwrap()
            .store
            .unwrap();
        assert_eq!(s.client.endpoints.len(), 2);
        assert_eq!(s.prefix, "/ferry/v1/");
        assert_eq!(s.lease_ttl, std::time::Duration::from_secs(5));
        let s = with("etcd = [\"e:2379\"]\netcd_prefix = \"/lab/\"\nlease_ttl = \"9s\"")
            .unwrap()
            .store
            .unwrap();
        assert_eq!((s.prefix.as_str(), s.lease_ttl.as_secs()), ("/lab/", 9));
        let made = rcgen::generate_simple_self_signed(vec!["etcd".to_string()]).unwrap();
        std::fs::write(d.path().join("ca.pem"), made.cert.pem()).unwrap();
        std::fs::write(d.path().join("client.pem"), made.cert.pem()).unwrap();
        std::fs::write(d.path().join("junk.pem"), "not a certificate").unwrap();
        let key = made.signing_key.serialize_pem();
        crate::migration::auth::write_secret_file(&d.path().join("client-key.pem"), key.as_bytes())
            .unwrap();
        crate::migration::auth::write_secret_file(&d.path().join("pw"), b"etcd-password-0123")
            .unwrap();
        let s = with("etcd = [\"e:2379\"]\netcd_ca = \"ca.pem\"\netcd_user = \"ferry\"\netcd_password_file = \"pw\"")
            .unwrap()
            .store
            .unwrap();
        assert_eq!(s.client.tls.unwrap().ca, made.cert.pem().into_bytes());
        let pair = "etcd = [\"e:1\"]\netcd_ca = \"ca.pem\"\netcd_cert = \"client.pem\"\netcd_key = \"client-key.pem\"";
        let identity = with(pair)
            .unwrap()
            .store
            .unwrap()
            .client
            .tls
            .unwrap()
            .identity;
        assert_eq!(identity.unwrap().1, key.trim().as_bytes());
        // The key is a secret: refused when others may read it.
        use std::os::unix::fs::PermissionsExt;
        let key_file = d.path().join("client-key.pem");
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let open = with(pair).unwrap_err().to_string();
        assert!(
            open.contains("etcd_key") && open.contains("group or others"),
            "{open}"
        );
        assert_eq!(s.client.user.unwrap().1, "etcd-password-0123");
        let err = |top: &str| with(top).unwrap_err().to_string();
        for (top, field) in [
            ("etcd = []", "etcd: 0 endpoints"),
            ("etcd = [\"nohost\"]", "etcd: \"nohost\""),
            ("lease_ttl = \"5s\"", "need etcd"),
            ("etcd = [\"e:1\"]\nlease_ttl = \"1s\"", "lease_ttl"),
            ("etcd = [\"e:1\"]\nlease_ttl = \"1h\"", "lease_ttl"),
            ("etcd = [\"e:1\"]\nlease_ttl = \"2500ms\"", "whole seconds"),
            ("etcd = [\"e:1\"]\netcd_prefix = \"ferry\"", "etcd_prefix"),
            ("etcd = [\"e:1\"]\netcd_cert = \"c.pem\"", "need etcd_ca"),
            (
                "etcd = [\"e:1\"]\netcd_ca = \"ca.pem\"\netcd_cert = \"ca.pem\"",
                "go together",
            ),
            ("etcd = [\"e:1\"]\netcd_ca = \"missing.pem\"", "etcd_ca"),
            ("etcd = [\"e:1\"]\netcd_user = \"u\"", "go together"),
            (
                "etcd = [\"e:1\"]\netcd_user = \"u\"\netcd_password_file = \"none\"",
                "etcd_password_file",
            ),
            (
                "etcd = [\"e:1\"]\netcd_user = \"\"\netcd_password_file = \"pw\"",
                "may not be empty",
            ),
            ("etcd_ca = \"ca.pem\"", "need etcd"),
            ("etcd = [\"e:1\"]\netcd_ca = \"junk.pem\"", "no PEM certificate"),
            (
                "etcd = [\"e:1\"]\netcd_ca = \"ca.pem\"\netcd_cert = \"junk.pem\"\netcd_key = \"pw\"",
                "etcd_cert",
            ),
            ("etcd = [\"e:0\"]", "a port from 1"),
            ("etcd = [\"e1/x:2379\"]", "a port from 1"),
        ] {
            assert!(err(top).contains(field), "{top}: {}", err(top));
        }
    }
}
