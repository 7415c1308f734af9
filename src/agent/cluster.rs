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

mod checks;

use super::request::Concurrency;
use crate::codec::CodecChoice;
use crate::units::{parse_bandwidth, parse_size};
pub(crate) use checks::check_address;
use checks::{amount, api_limits, check_image_dirs, NodeDefaults};
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
    max_concurrent_migrations: Option<Concurrency>,
    max_bandwidth: Option<Amount>,
    codec: Option<String>,
    dense: Option<bool>,
    kin_bases: Option<bool>,
    update_hook: Option<Vec<String>>,
    preview_hook: Option<Vec<String>>,
    failback_retention: Option<Amount>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: String,
    control: String,
    data: String,
    memory_capacity: Amount,
    max_concurrent_migrations: Option<Concurrency>,
    max_bandwidth: Option<Amount>,
    codec: Option<String>,
    dense: Option<bool>,
    kin_bases: Option<bool>,
    update_hook: Option<Vec<String>>,
    preview_hook: Option<Vec<String>>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    failback_retention: Option<Amount>,
    failback_retention_dir: Option<PathBuf>,
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
    /// Outgoing live migrations at once; more wait in a queue. With
    /// `auto_concurrency`, the most the queue's choice may be.
    pub max_concurrent_migrations: u32,
    /// `max_concurrent_migrations = "auto"`: the queue chooses its limit
    /// from the link and the moving VMs' write rates (see
    /// [`super::ops::auto`]).
    pub auto_concurrency: bool,
    /// Cap on all its outgoing migrations together, bytes/s (`None`: no cap).
    pub max_bandwidth: Option<u64>,
    /// The codec of its outgoing migrations where a request names none
    /// (drains and failbacks included). Default: `auto`.
    pub codec: CodecChoice,
    /// Dense pages in its outgoing migrations where a request does not say
    /// (`dense`). Default: on.
    pub dense: bool,
    /// Kin bases (`kin_bases`): a VM made from a RAM image sent from here
    /// may start on its target from the copy the target holds of another
    /// VM made from that image, and this node lists and tags its copies for
    /// that. Default: on.
    pub kin_bases: bool,
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
    /// The disk the images of VMs that left it may take (`failback_retention`,
    /// 0, none kept, until a delta failback reads them).
    pub failback_retention: u64,
    /// Where those images are (default `{state_dir}/retained`).
    pub failback_retention_dir: PathBuf,
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
            codec: None,
            dense: None,
            kin_bases: None,
            update_hook: None,
            preview_hook: None,
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            state_dir: None,
            failback_retention: None,
            failback_retention_dir: None,
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

#[cfg(test)]
mod tests;
