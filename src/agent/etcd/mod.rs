//! The cluster's store: an etcd v3 client over gRPC (tonic, with etcd's API
//! compiled into `gen/` and committed, so the build needs no protoc). One
//! channel per endpoint; a call that finds its endpoint down or silent moves
//! to the next at once; etcd's TLS and user authentication; every answer's
//! figures checked before use.

mod lease;
mod txn;
mod watch;

pub use lease::Keeper;
pub use txn::{Cmp, Op, Txn};
pub use watch::{WatchEvent, Watcher};

#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    //! etcd's API as prost and tonic generate it (`scripts/etcd-proto`).
    pub mod mvccpb {
        include!("gen/mvccpb.rs");
    }
    pub mod authpb {
        include!("gen/authpb.rs");
    }
    pub mod etcdserverpb {
        include!("gen/etcdserverpb.rs");
    }
}

use proto::etcdserverpb::{
    auth_client::AuthClient, kv_client::KvClient, maintenance_client::MaintenanceClient,
    AuthenticateRequest, DeleteRangeRequest, PutRequest, RangeRequest, StatusRequest,
};
pub use proto::mvccpb::KeyValue;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Request, Status};

/// How to reach etcd: endpoints (`host:port`), TLS, a user.
#[derive(Clone, Default)]
pub struct EtcdConfig {
    /// Tried in order; a call moves to the next when one fails.
    pub endpoints: Vec<String>,
    /// TLS to etcd: the CA that signed its certificate, and this client's
    /// certificate and key when etcd asks for one (PEM).
    pub tls: Option<EtcdTls>,
    /// etcd's user authentication: name and password.
    pub user: Option<(String, String)>,
    /// Longest wait for one answer before trying the next endpoint.
    pub request_timeout: Duration,
    /// HTTP/2 keepalive pings: at least the server's
    /// `--grpc-keepalive-min-time` (5 s by default), or it hangs up.
    pub keepalive: Duration,
}

/// TLS material for etcd, PEM.
#[derive(Clone)]
pub struct EtcdTls {
    /// The CA that signed etcd's certificates.
    pub ca: Vec<u8>,
    /// This client's certificate and key, for etcd's `--client-cert-auth`.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

// Never print the password or the private key.
impl std::fmt::Debug for EtcdConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdConfig")
            .field("endpoints", &self.endpoints)
            .field("tls", &self.tls)
            .field("user", &self.user.as_ref().map(|(u, _)| u))
            .field("request_timeout", &self.request_timeout)
            .field("keepalive", &self.keepalive)
            .finish()
    }
}

impl std::fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdTls")
            .field("ca_bytes", &self.ca.len())
            .field("client_certificate", &self.identity.is_some())
            .finish()
    }
}

/// Largest answer read from etcd (its own request limit is 1.5 MiB; watch
/// answers batch many revisions).
pub const MAX_MESSAGE: usize = 64 << 20;

/// Why a call to etcd failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EtcdError {
    /// The configuration cannot work (an endpoint that is no address, bad PEM).
    #[error("etcd configuration: {0}")]
    Config(String),
    /// No endpoint answered in time.
    #[error("no etcd endpoint answered ({0})")]
    Unavailable(String),
    /// etcd refused the user's name or password.
    #[error("etcd refused the user: {0}")]
    Auth(String),
    /// etcd answered with an error.
    #[error("etcd: {0}")]
    Refused(String),
    /// etcd's answer does not hold what it must (a field out of range).
    #[error("etcd's answer is invalid: {0}")]
    Invalid(String),
    /// A key that must be this agent's is bound to another live lease.
    #[error("{0}")]
    Held(String),
    /// A watch's start revision was compacted away: read everything again.
    #[error("etcd compacted revisions up to {0}: the watch must start from a full read")]
    Compacted(i64),
}

/// A client of one etcd cluster.
pub struct Etcd {
    channels: Vec<(String, Channel)>,
    /// The endpoint that answered last: calls start there.
    current: AtomicUsize,
    user: Option<(String, String)>,
    token: Mutex<Option<MetadataValue<tonic::metadata::Ascii>>>,
    timeout: Duration,
    /// Key-value calls made: reads (get, list) and writes (put, delete,
    /// transactions), for `/metrics`.
    reads: std::sync::atomic::AtomicU64,
    writes: std::sync::atomic::AtomicU64,
}

/// Most endpoints a cluster file may name.
pub const MAX_ENDPOINTS: usize = 16;

impl Etcd {
    /// A client of `config`'s endpoints. Connects lazily: the first call
    /// says whether etcd is there.
    pub fn new(config: &EtcdConfig) -> Result<Self, EtcdError> {
        if config.endpoints.is_empty() || config.endpoints.len() > MAX_ENDPOINTS {
            return Err(EtcdError::Config(format!(
                "etcd: {} endpoints (1 to {MAX_ENDPOINTS})",
                config.endpoints.len()
            )));
        }
        let tls = config.tls.as_ref().map(|t| {
            let mut c = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&t.ca));
            if let Some((cert, key)) = &t.identity {
                c = c.identity(Identity::from_pem(cert, key));
            }
            c
        });
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut channels = Vec::new();
        for e in &config.endpoints {
            let bad = |why: String| EtcdError::Config(format!("etcd endpoint {e:?}: {why}"));
            let mut ep = Endpoint::from_shared(format!("{scheme}://{e}"))
                .map_err(|x| bad(x.to_string()))?
                .connect_timeout(config.request_timeout)
                .tcp_nodelay(true)
                // Pings only while streams are open (etcd counts idle ones
                // as abuse), no more often than its minimum, and a late
                // answer is not yet a dead connection.
                .http2_keep_alive_interval(config.keepalive)
                .keep_alive_timeout(Duration::from_secs(3))
                .keep_alive_while_idle(false);
            if let Some(t) = &tls {
                ep = ep.tls_config(t.clone()).map_err(|x| bad(x.to_string()))?;
            }
            channels.push((e.clone(), ep.connect_lazy()));
        }
        Ok(Self {
            channels,
            current: AtomicUsize::new(0),
            user: config.user.clone(),
            token: Mutex::new(None),
            timeout: config.request_timeout,
            reads: Default::default(),
            writes: Default::default(),
        })
    }

    /// Moves calls on to the next endpoint (the current one broke a stream).
    pub(crate) fn move_on(&self) {
        let n = self.channels.len();
        let _ = self
            .current
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| Some((c + 1) % n));
    }

    /// The endpoint calls go to first now.
    pub fn current_endpoint(&self) -> &str {
        &self.channels[self.current.load(Ordering::Relaxed) % self.channels.len()].0
    }

    /// Key-value calls made so far: `(reads, writes)`.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.reads.load(Ordering::Relaxed),
            self.writes.load(Ordering::Relaxed),
        )
    }

    /// Counts one read or one write.
    pub(crate) fn count(&self, write: bool) {
        let c = if write { &self.writes } else { &self.reads };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// `request` with this client's auth token, if it has one.
    pub(crate) fn request<T>(&self, body: T) -> Request<T> {
        let mut r = Request::new(body);
        if let Some(t) = self.token.lock().unwrap().clone() {
            r.metadata_mut().insert("token", t);
        }
        r
    }

    /// Calls `f` on each endpoint in turn from the current one until one
    /// answers; an expired auth token is renewed once. A call may thus reach
    /// etcd twice: writes are idempotent or guarded by a compare.
    pub(crate) async fn unary<T, F, Fut>(&self, f: F) -> Result<T, EtcdError>
    where
        F: Fn(Channel) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        if self.user.is_some() && self.token.lock().unwrap().is_none() {
            self.authenticate().await?;
        }
        let n = self.channels.len();
        let start = self.current.load(Ordering::Relaxed);
        let mut last = String::new();
        let mut renewed = false;
        let mut i = 0;
        while i < n {
            let k = (start + i) % n;
            let (name, channel) = &self.channels[k];
            match tokio::time::timeout(self.timeout, f(channel.clone())).await {
                Ok(Ok(v)) => {
                    self.current.store(k, Ordering::Relaxed);
                    return Ok(v);
                }
                Ok(Err(s)) if wants_auth(&s) && !renewed => {
                    renewed = true;
                    match self.authenticate_on(channel.clone()).await {
                        Ok(()) => continue,
                        Err(e @ EtcdError::Auth(_)) => return Err(e),
                        Err(e) => last = format!("{name}: {e}"),
                    }
                }
                Ok(Err(s)) if moves_on(&s) => last = format!("{name}: {}", s.message()),
                Ok(Err(s)) => return Err(EtcdError::Refused(s.message().to_string())),
                Err(_) => last = format!("{name}: no answer within {:?}", self.timeout),
            }
            tracing::debug!(endpoint = %name, error = %last, "etcd endpoint failed; trying the next");
            i += 1;
        }
        Err(EtcdError::Unavailable(last))
    }

    /// Signs in as the configured user (no-op without one), at the first
    /// endpoint that answers.
    pub async fn authenticate(&self) -> Result<(), EtcdError> {
        if self.user.is_none() {
            return Ok(());
        }
        let mut last = EtcdError::Unavailable("no endpoint".into());
        for (_, channel) in &self.channels {
            match self.authenticate_on(channel.clone()).await {
                Err(e @ EtcdError::Unavailable(_)) => last = e,
                r => return r,
            }
        }
        Err(last)
    }

    async fn authenticate_on(&self, channel: Channel) -> Result<(), EtcdError> {
        let Some((name, password)) = self.user.clone() else {
            return Err(EtcdError::Auth(
                "etcd wants a user; the cluster file names none".into(),
            ));
        };
        let req = AuthenticateRequest { name, password };
        let answer = tokio::time::timeout(self.timeout, AuthClient::new(channel).authenticate(req))
            .await
            .map_err(|_| EtcdError::Unavailable("authenticating: no answer".into()))?
            .map_err(|s| match s.code() {
                Code::Unavailable => EtcdError::Unavailable(s.message().to_string()),
                _ => EtcdError::Auth(s.message().to_string()),
            })?;
        let token = MetadataValue::try_from(answer.into_inner().token)
            .map_err(|_| EtcdError::Invalid("the auth token is not ASCII".into()))?;
        *self.token.lock().unwrap() = Some(token);
        Ok(())
    }

    /// One KV call (`call` on a client of each endpoint in turn) with this
    /// client's token, answers read up to [`MAX_MESSAGE`].
    pub(crate) async fn kv<R, T, Fut>(
        &self,
        req: &R,
        call: impl Fn(KvClient<Channel>, Request<R>) -> Fut,
    ) -> Result<T, EtcdError>
    where
        R: Clone,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let answer = self
            .unary(|c| {
                let client = KvClient::new(c).max_decoding_message_size(MAX_MESSAGE);
                call(client, self.request(req.clone()))
            })
            .await?;
        Ok(answer.into_inner())
    }

    /// The value at `key`, with its revisions.
    pub async fn get(&self, key: &[u8]) -> Result<Option<KeyValue>, EtcdError> {
        self.count(false);
        let req = RangeRequest {
            key: key.to_vec(),
            ..Default::default()
        };
        let r = self
            .kv(&req, |mut c, r| async move { c.range(r).await })
            .await?;
        Ok(r.kvs.into_iter().next())
    }

    /// Every key under `prefix`, and the store's revision they were read at.
    pub async fn list(&self, prefix: &[u8]) -> Result<(Vec<KeyValue>, i64), EtcdError> {
        self.count(false);
        let req = RangeRequest {
            key: prefix.to_vec(),
            range_end: prefix_end(prefix),
            ..Default::default()
        };
        let r = self
            .kv(&req, |mut c, r| async move { c.range(r).await })
            .await?;
        let revision = revision_of(r.header.as_ref())?;
        Ok((r.kvs, revision))
    }

    /// Sets `key` to `value` (bound to `lease` when given); the new revision.
    pub async fn put(
        &self,
        key: &[u8],
        value: &[u8],
        lease: Option<i64>,
    ) -> Result<i64, EtcdError> {
        self.count(true);
        let req = PutRequest {
            key: key.to_vec(),
            value: value.to_vec(),
            lease: lease.unwrap_or(0),
            ..Default::default()
        };
        let r = self
            .kv(&req, |mut c, r| async move { c.put(r).await })
            .await?;
        revision_of(r.header.as_ref())
    }

    /// Deletes `key`; how many keys went (0 or 1).
    pub async fn delete(&self, key: &[u8]) -> Result<i64, EtcdError> {
        self.count(true);
        let req = DeleteRangeRequest {
            key: key.to_vec(),
            ..Default::default()
        };
        let r = self
            .kv(&req, |mut c, r| async move { c.delete_range(r).await })
            .await?;
        Ok(r.deleted)
    }
}

/// What one etcd member says of itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberStatus {
    /// The endpoint that answered.
    pub endpoint: String,
    /// Its member id.
    pub member: u64,
    /// The member it takes for leader (0: none).
    pub leader: u64,
    /// Its etcd version.
    pub version: String,
    /// Its alarms and errors (empty when healthy).
    pub errors: Vec<String>,
}

impl Etcd {
    /// The status of the first member that answers.
    pub async fn status(&self) -> Result<MemberStatus, EtcdError> {
        let r = self
            .unary(|c| {
                let req = self.request(StatusRequest {});
                async move { MaintenanceClient::new(c).status(req).await }
            })
            .await?
            .into_inner();
        Ok(MemberStatus {
            endpoint: self.current_endpoint().to_string(),
            member: r.header.map_or(0, |h| h.member_id),
            leader: r.leader,
            version: r.version,
            errors: r.errors,
        })
    }
}

/// Whether etcd asks for (another) sign-in: no token, or an expired one.
fn wants_auth(s: &Status) -> bool {
    s.code() == Code::Unauthenticated
        || s.message().contains("user name is empty")
        || s.message().contains("invalid auth token")
        || s.message().contains("auth store is old")
}

/// Whether a failed call should move on to the next endpoint: the endpoint
/// is down, not a member any more, or has no leader.
fn moves_on(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Aborted
            | Code::Unknown
            | Code::Cancelled
            | Code::ResourceExhausted
    ) || s.message().contains("no leader")
}

/// The first key after every key that starts with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff (or empty): to the end of the keyspace.
    vec![0]
}

/// A response header's revision, checked.
fn revision_of(h: Option<&proto::etcdserverpb::ResponseHeader>) -> Result<i64, EtcdError> {
    match h.map(|h| h.revision) {
        Some(r) if r >= 0 => Ok(r),
        Some(r) => Err(EtcdError::Invalid(format!("revision {r} is negative"))),
        None => Err(EtcdError::Invalid("no response header".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_ends_after_its_last_key() {
        assert_eq!(prefix_end(b"/ferry/v1/"), b"/ferry/v10".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }

    #[test]
    fn endpoints_are_counted_and_checked() {
        let config = |endpoints: Vec<String>| EtcdConfig {
            endpoints,
            request_timeout: Duration::from_secs(1),
            keepalive: Duration::from_secs(5),
            ..Default::default()
        };
        assert!(matches!(
            Etcd::new(&config(vec![])),
            Err(EtcdError::Config(_))
        ));
        let many = (0..17).map(|i| format!("127.0.0.1:{}", 2000 + i)).collect();
        assert!(matches!(
            Etcd::new(&config(many)),
            Err(EtcdError::Config(_))
        ));
        let bad = Etcd::new(&config(vec!["not an address".into()]));
        assert!(matches!(bad, Err(EtcdError::Config(m)) if m.contains("not an address")));
    }
}
