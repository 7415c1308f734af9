//! The cluster's state in etcd, as far as it goes yet: the cluster file's
//! `etcd` settings, the key layout under the cluster's prefix, and a node's
//! registration and liveness (a lease it keeps alive, revoked on a clean
//! stop).

use super::clock;
use super::cluster::NodeSpec;
use super::etcd::{Cmp, Etcd, EtcdConfig, EtcdError, EtcdTls, Keeper, Op, Txn, MAX_ENDPOINTS};
use super::fence::{Fence, FenceHooks, FenceState};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;

/// The cluster file's store settings, as written.
#[derive(Debug, Default)]
pub(super) struct RawStore {
    pub etcd: Option<Vec<String>>,
    pub etcd_prefix: Option<String>,
    pub lease_ttl: Option<String>,
    pub etcd_ca: Option<PathBuf>,
    pub etcd_cert: Option<PathBuf>,
    pub etcd_key: Option<PathBuf>,
    pub etcd_user: Option<String>,
    pub etcd_password_file: Option<PathBuf>,
}

/// Where the cluster keeps its state, checked.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// How to reach etcd.
    pub client: EtcdConfig,
    /// Every key of this cluster starts with it (`/ferry/v1/` by default).
    pub prefix: String,
    /// A node's lease: it is taken for dead this long after its last renewal.
    pub lease_ttl: Duration,
}

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "/ferry/v1/";
/// The default lease TTL.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(5);

impl RawStore {
    /// The checked settings, `None` without `etcd`. `read_secret` reads a
    /// secret file (the password); paths resolve against `dir`.
    pub(super) fn check(
        self,
        dir: &Path,
        read_secret: impl Fn(&Path, &str) -> Result<String, String>,
    ) -> Result<Option<StoreConfig>, String> {
        let Some(endpoints) = self.etcd else {
            let stray = self.etcd_prefix.is_some()
                || self.lease_ttl.is_some()
                || self.etcd_ca.is_some()
                || self.etcd_cert.is_some()
                || self.etcd_key.is_some()
                || self.etcd_user.is_some()
                || self.etcd_password_file.is_some();
            return match stray {
                true => Err("the etcd_* settings and lease_ttl need etcd (its endpoints)".into()),
                false => Ok(None),
            };
        };
        check_endpoints(&endpoints)?;
        let prefix = self.etcd_prefix.unwrap_or_else(|| DEFAULT_PREFIX.into());
        let printable = prefix.bytes().all(|b| b.is_ascii_graphic());
        if !prefix.starts_with('/') || !prefix.ends_with('/') || prefix.len() > 128 || !printable {
            return Err(format!(
                "etcd_prefix {prefix:?}: up to 128 printable characters, starting and ending with '/'"
            ));
        }
        let lease_ttl = lease_ttl(self.lease_ttl.as_deref())?;
        let tls = etcd_tls(
            dir,
            (&self.etcd_ca, &self.etcd_cert, &self.etcd_key),
            &read_secret,
        )?;
        let user = match (self.etcd_user, &self.etcd_password_file) {
            (None, None) => None,
            (Some(u), Some(f)) => {
                let password = read_secret(f, "etcd_password_file")?;
                if u.is_empty() || password.is_empty() {
                    return Err("etcd_user and its password may not be empty".into());
                }
                Some((u, password))
            }
            _ => return Err("etcd_user and etcd_password_file go together".into()),
        };
        Ok(Some(StoreConfig {
            client: EtcdConfig {
                endpoints,
                tls,
                user,
                request_timeout: Duration::from_millis(500),
                // etcd's --grpc-keepalive-min-time defaults to 5 s: pinging
                // more often makes it hang up; twice that leaves a margin.
                keepalive: Duration::from_secs(10),
            },
            prefix,
            lease_ttl,
        }))
    }
}

/// One to `MAX_ENDPOINTS` etcd endpoints, each `host:port` with a port.
fn check_endpoints(endpoints: &[String]) -> Result<(), String> {
    if endpoints.is_empty() || endpoints.len() > MAX_ENDPOINTS {
        return Err(format!(
            "etcd: {} endpoints (1 to {MAX_ENDPOINTS})",
            endpoints.len()
        ));
    }
    for e in endpoints {
        super::cluster::check_address(e).map_err(|why| format!("etcd: {e:?}: {why}"))?;
        let port = e.rsplit_once(':').map_or("", |(_, p)| p);
        if e.contains(['/', '?', '#', '@']) || port == "0" {
            return Err(format!(
                "etcd: {e:?}: expected host:port with a port from 1"
            ));
        }
    }
    Ok(())
}

/// `lease_ttl`: whole seconds from 2 to 600; 5 s when unset.
fn lease_ttl(text: Option<&str>) -> Result<Duration, String> {
    let Some(t) = text else {
        return Ok(DEFAULT_LEASE_TTL);
    };
    let d = crate::units::parse_duration(t).map_err(|e| format!("lease_ttl: {e}"))?;
    let whole = d.subsec_nanos() == 0;
    if !whole || d < Duration::from_secs(2) || d > Duration::from_secs(600) {
        return Err(format!(
            "lease_ttl: {d:?} is out of range (2 s to 600 s, whole seconds)"
        ));
    }
    Ok(d)
}

/// etcd's TLS: a CA, and a client certificate with its key if any.
fn etcd_tls(
    dir: &Path,
    (ca, cert_file, key_file): (&Option<PathBuf>, &Option<PathBuf>, &Option<PathBuf>),
    read_secret: impl Fn(&Path, &str) -> Result<String, String>,
) -> Result<Option<EtcdTls>, String> {
    // Certificates must hold one; the private key is a secret file
    // (its owner's alone, as every other secret).
    let cert = |p: &PathBuf, field: &str| {
        use rustls::pki_types::{pem::PemObject, CertificateDer};
        let file = dir.join(p);
        let pem = std::fs::read(&file).map_err(|e| format!("{field}: {}: {e}", file.display()))?;
        CertificateDer::from_pem_slice(&pem)
            .map_err(|e| format!("{field}: {}: no PEM certificate ({e})", file.display()))?;
        Ok::<_, String>(pem)
    };
    let key = |p: &PathBuf| {
        use rustls::pki_types::{pem::PemObject, PrivateKeyDer};
        let pem = read_secret(p, "etcd_key")?;
        PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| {
            format!(
                "etcd_key: {}: no PEM private key ({e})",
                dir.join(p).display()
            )
        })?;
        Ok::<_, String>(pem.into_bytes())
    };
    Ok(match (ca, cert_file, key_file) {
        (None, None, None) => None,
        (Some(ca), c, k) => Some(EtcdTls {
            ca: cert(ca, "etcd_ca")?,
            identity: match (c, k) {
                (Some(c), Some(k)) => Some((cert(c, "etcd_cert")?, key(k)?)),
                (None, None) => None,
                _ => return Err("etcd_cert and etcd_key go together".into()),
            },
        }),
        (None, _, _) => return Err("etcd_cert and etcd_key need etcd_ca".into()),
    })
}

/// A node's registration, `{prefix}nodes/{name}`: it stays until the node
/// is removed for good.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// The layout's version.
    pub version: u32,
    /// The node.
    pub name: String,
    /// Its control API.
    pub control: String,
    /// Its migration listener.
    pub data: String,
    /// What its VMs may use, bytes.
    pub memory_capacity: u64,
    /// The lease it holds or last held (its `alive` key's).
    #[serde(default)]
    pub lease: i64,
    /// Its control API's certificate (DER, base64), which the other agents
    /// and the CLI pin for a node that joined without a `[[node]]` entry;
    /// none with `insecure_api`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_cert: Option<String>,
}

/// A node's liveness, `{prefix}alive/{name}`, bound to its lease: gone
/// when the lease expires or is revoked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AliveRecord {
    /// The layout's version.
    pub version: u32,
    /// The lease.
    pub lease: i64,
    /// When the agent took it, ms since the Unix epoch.
    pub since_ms: u64,
}

/// The layout's version, in every value.
pub const LAYOUT_VERSION: u32 = 1;

/// A node's lease, as `GET /v1/node` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseView {
    /// The lease's id in etcd.
    pub id: i64,
    /// Its TTL, seconds.
    pub ttl_s: f64,
    /// Seconds until it would expire without another renewal, counted from
    /// when the last acknowledged renewal was sent.
    pub left_s: f64,
    /// `live`, or `fenced`: not renewed in time, the guests are paused.
    pub state: FenceState,
}

/// A node registered in etcd, holding its lease.
pub struct Liveness {
    etcd: Arc<Etcd>,
    prefix: String,
    record: NodeRecord,
    /// The TTL asked for.
    asked: Duration,
    /// The lease held now (a new one after one lapsed).
    lease: AtomicI64,
    keeper: tokio::sync::Mutex<Keeper>,
    /// When the last acknowledged renewal was sent, the TTL, and whether
    /// the node is fenced.
    fence: Mutex<Fence>,
}

/// How often the fence looks at the boot clock while it waits.
const SUSPEND_CHECK: Duration = Duration::from_millis(100);

/// How soon a failed renewal is tried again.
const RETRY: Duration = Duration::from_millis(200);

impl Liveness {
    /// Registers `node` and takes its lease; on failure, leaves no lease.
    pub async fn register(config: &StoreConfig, node: &NodeSpec) -> Result<Self, EtcdError> {
        let etcd = Arc::new(Etcd::new(&config.client)?);
        etcd.authenticate().await?;
        let record = NodeRecord {
            version: LAYOUT_VERSION,
            name: node.name.clone(),
            control: node.control.clone(),
            data: node.data.clone(),
            memory_capacity: node.memory_capacity,
            lease: 0,
            api_cert: node.api_cert.as_ref().map(|der| {
                use base64::Engine;
                base64::engine::general_purpose::STANDARD.encode(der)
            }),
        };
        let live = Self {
            etcd,
            prefix: config.prefix.clone(),
            record,
            asked: config.lease_ttl,
            lease: AtomicI64::new(0),
            keeper: tokio::sync::Mutex::new(Keeper::new(0, config.lease_ttl)),
            fence: Mutex::new(Fence::new(config.lease_ttl, clock::now())),
        };
        // The key of this agent's last process may outlive it by a TTL.
        let end = Instant::now() + config.lease_ttl * 2 + Duration::from_secs(1);
        loop {
            match live.take_lease().await {
                Ok(()) => return Ok(live),
                Err(EtcdError::Held(why)) if Instant::now() < end => {
                    tracing::warn!("{why}; waiting for it to expire");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(EtcdError::Held(why)) => {
                    return Err(EtcdError::Held(format!(
                        "{why}: is another `ferry agent --node {}` running?",
                        live.record.name
                    )))
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Takes a new lease and binds the node's `alive` key to it; revokes it
    /// again when the key cannot be written.
    async fn take_lease(&self) -> Result<(), EtcdError> {
        let sent = clock::now();
        let (lease, ttl) = self.etcd.lease_grant(self.asked).await?;
        let alive = AliveRecord {
            version: LAYOUT_VERSION,
            lease,
            since_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        };
        let key = format!("{}alive/{}", self.prefix, self.record.name).into_bytes();
        let node_key = format!("{}nodes/{}", self.prefix, self.record.name).into_bytes();
        let record = NodeRecord {
            lease,
            ..self.record.clone()
        };
        // Only if no other lease holds the key: two agents of one name
        // would both run its VMs.
        let txn = Txn::new()
            .when(Cmp::absent(&key))
            .then(Op::put(&key, &json(&alive), Some(lease)))
            .then(Op::put(&node_key, &json(&record), None));
        let taken = match self.etcd.txn(&txn).await {
            Ok(t) if t.succeeded => Ok(()),
            Ok(_) => Err(self.holder(&key).await),
            // Written all the same if the key is bound to the new lease.
            Err(e) => match self.etcd.get(&key).await {
                Ok(Some(kv)) if kv.lease == lease => Ok(()),
                _ => Err(e),
            },
        };
        if let Err(e) = taken {
            let _ = self.etcd.lease_revoke(lease).await;
            return Err(e);
        }
        *self.keeper.lock().await = Keeper::new(lease, ttl);
        self.lease.store(lease, Ordering::Relaxed);
        self.fence.lock().unwrap().new_lease(sent, ttl);
        Ok(())
    }

    /// Why the `alive` key at `key` cannot be taken: the lease that holds it.
    async fn holder(&self, key: &[u8]) -> EtcdError {
        match self.etcd.get(key).await {
            Ok(Some(kv)) => EtcdError::Held(format!(
                "node {}'s liveness key is held by lease {:x}",
                self.record.name, kv.lease
            )),
            Ok(None) => EtcdError::Unavailable("the liveness key changed meanwhile".into()),
            Err(e) => e,
        }
    }

    /// Renews the lease a third of its TTL after the last acknowledged
    /// renewal was sent (a failed one again within [`RETRY`]) until `stop`,
    /// fencing the node through `hooks` when that does not succeed in time
    /// (see [`super::fence`]). A lease that lapsed all the same is replaced
    /// by a new one; what ran under the old one stays superseded.
    pub async fn keep(&self, stop: CancellationToken, hooks: Arc<dyn FenceHooks>) {
        // After a failure: the wait before the next try (a renewal's is
        // always RETRY; taking a new lease backs off, so that an agent
        // whose name another took does not hammer etcd).
        let mut retry: Option<Duration> = None;
        let mut take_backoff = RETRY;
        loop {
            let at = if let Some(wait) = retry {
                clock::now() + wait
            } else {
                let f = self.fence.lock().unwrap();
                f.last_ack() + f.ttl() / 3
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(at.saturating_duration_since(clock::now())) => {}
                never = self.fence_when_due(&*hooks) => match never {},
            }
            let sent = clock::now();
            let renewed = tokio::select! {
                _ = stop.cancelled() => return,
                r = async { self.keeper.lock().await.renew(&self.etcd).await } => r,
                never = self.fence_when_due(&*hooks) => match never {},
            };
            retry = match renewed {
                Ok(Some(ttl)) => {
                    let action = self.fence.lock().unwrap().renewed(sent, ttl, clock::now());
                    if let Some(a) = action {
                        hooks.apply(a);
                    }
                    None
                }
                Ok(None) => {
                    tracing::error!(node = %self.record.name, "this node's lease lapsed in etcd; taking a new one");
                    let action = self.fence.lock().unwrap().lapsed();
                    hooks.apply(action);
                    let lost = self.lease.load(Ordering::Relaxed);
                    let taken = self.take_lease().await;
                    match &taken {
                        Ok(()) => {
                            self.count_loss(lost).await;
                            hooks.rejoined();
                            take_backoff = RETRY;
                            None
                        }
                        Err(e) => {
                            let wait = take_backoff;
                            // At most a TTL apart: a healed partition rejoins soon.
                            take_backoff = (take_backoff * 2).min(self.asked.max(RETRY));
                            tracing::warn!(node = %self.record.name, error = %e, retry_in = ?wait, "taking a new lease failed");
                            Some(wait)
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(node = %self.record.name, error = %e, "renewing the lease failed");
                    Some(RETRY)
                }
            };
        }
    }

    /// Fences the node at the fence's deadline; never returns (a renewal
    /// that ends the wait drops it).
    async fn fence_when_due(&self, hooks: &dyn FenceHooks) -> std::convert::Infallible {
        loop {
            let (deadline, fenced) = {
                let f = self.fence.lock().unwrap();
                (f.deadline(), f.state() == FenceState::Fenced)
            };
            if fenced {
                return std::future::pending().await;
            }
            // In steps: a suspend of the host stops the sleep's clock, not
            // the lease's on the server.
            let left = deadline.saturating_duration_since(clock::now());
            tokio::time::sleep(left.min(SUSPEND_CHECK)).await;
            let action = self.fence.lock().unwrap().tick(clock::now());
            if let Some(a) = action {
                hooks.apply(a);
            }
        }
    }

    /// Counts lost `lease` toward this node's quarantine.
    async fn count_loss(&self, lease: i64) {
        let now = super::node::now_ms();
        let counted =
            super::quarantine::update(&self.etcd, &self.prefix, &self.record.name, None, |r| {
                r.lost(lease, now)
            })
            .await;
        match counted {
            Ok(Some(r)) if r.quarantined(now) => {
                tracing::error!(node = %self.record.name, "this node lost its lease {} times within an hour: quarantined (`ferry node resume --clear-quarantine` lifts it)", super::quarantine::LOSSES)
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "counting the lost lease failed"),
        }
    }

    /// Ends the lease now (a clean stop): the node is known gone at once,
    /// and the stop never counts toward quarantine.
    pub async fn revoke(&self) {
        let lease = self.lease.load(Ordering::Relaxed);
        let marked =
            super::quarantine::update(&self.etcd, &self.prefix, &self.record.name, None, |r| {
                r.clean_stop_lease = Some(lease);
                true
            })
            .await;
        if let Err(e) = marked {
            tracing::warn!(error = %e, "marking the clean stop failed");
        }
        if let Err(e) = self.etcd.lease_revoke(lease).await {
            tracing::warn!(node = %self.record.name, error = %e, "revoking the lease failed");
        }
    }

    /// The store's client, shared by everything of this agent.
    pub fn etcd(&self) -> &Arc<Etcd> {
        &self.etcd
    }

    /// The cluster's key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The lease held now, and whether the node is fenced.
    pub fn lease(&self) -> (i64, bool) {
        let fenced = self.fence.lock().unwrap().state() == FenceState::Fenced;
        (self.lease.load(Ordering::Relaxed), fenced)
    }

    /// The lease as `GET /v1/node` shows it.
    pub fn view(&self) -> LeaseView {
        let f = self.fence.lock().unwrap();
        let ttl = f.ttl();
        LeaseView {
            id: self.lease.load(Ordering::Relaxed),
            ttl_s: ttl.as_secs_f64(),
            left_s: ttl
                .saturating_sub(clock::now().saturating_duration_since(f.last_ack()))
                .as_secs_f64(),
            state: f.state(),
        }
    }
}

/// A record as the JSON bytes etcd holds.
fn json(record: &impl Serialize) -> Vec<u8> {
    serde_json::to_vec(record).expect("records serialize")
}
