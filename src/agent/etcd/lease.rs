//! Leases: granted with a TTL, kept alive over one stream, revoked on a
//! clean stop. A node's liveness is its lease: the keys bound to it vanish
//! when it expires.

use super::proto::etcdserverpb::{
    lease_client::LeaseClient, LeaseGrantRequest, LeaseKeepAliveRequest, LeaseKeepAliveResponse,
    LeaseRevokeRequest,
};
use super::{Etcd, EtcdError};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

/// Longest lease ferry asks for.
pub const MAX_LEASE_TTL: Duration = Duration::from_secs(3600);

impl Etcd {
    /// A new lease of `ttl` (1 s to an hour, whole seconds); its id and the
    /// TTL etcd granted.
    pub async fn lease_grant(&self, ttl: Duration) -> Result<(i64, Duration), EtcdError> {
        if ttl < Duration::from_secs(1) || ttl > MAX_LEASE_TTL {
            return Err(EtcdError::Config(format!(
                "lease_ttl: {ttl:?} is out of range (1 s to 1 h)"
            )));
        }
        let req = LeaseGrantRequest {
            ttl: ttl.as_secs() as i64,
            id: 0,
        };
        let r = self
            .unary(|c| {
                let req = self.request(req);
                async move { LeaseClient::new(c).lease_grant(req).await }
            })
            .await?
            .into_inner();
        if !r.error.is_empty() {
            return Err(EtcdError::Refused(r.error));
        }
        if r.id <= 0 {
            return Err(EtcdError::Invalid(format!("lease id {}", r.id)));
        }
        match granted(r.ttl, ttl)? {
            Some(t) => Ok((r.id, t)),
            None => Err(EtcdError::Invalid("a lease granted for 0 s".into())),
        }
    }

    /// Ends lease `id` now: every key bound to it goes.
    pub async fn lease_revoke(&self, id: i64) -> Result<(), EtcdError> {
        self.unary(|c| {
            let req = self.request(LeaseRevokeRequest { id });
            async move { LeaseClient::new(c).lease_revoke(req).await }
        })
        .await
        .map(|_| ())
    }
}

/// A TTL etcd answered with, checked against what was asked: `None` for 0
/// or less (the lease is gone).
fn granted(ttl: i64, asked: Duration) -> Result<Option<Duration>, EtcdError> {
    if ttl <= 0 {
        return Ok(None);
    }
    // etcd may raise a TTL to its minimum, never past what was asked or
    // past ferry's own bound.
    if ttl as u64 > asked.as_secs().max(1).min(MAX_LEASE_TTL.as_secs()) {
        return Err(EtcdError::Invalid(format!(
            "lease TTL {ttl} s, asked {asked:?}"
        )));
    }
    Ok(Some(Duration::from_secs(ttl as u64)))
}

/// Renews one lease over a keepalive stream, opened again on the next
/// endpoint when it breaks.
pub struct Keeper {
    id: i64,
    ttl: Duration,
    stream: Option<(
        mpsc::Sender<LeaseKeepAliveRequest>,
        Streaming<LeaseKeepAliveResponse>,
    )>,
}

impl Keeper {
    /// A keeper of lease `id`, granted for `ttl`.
    pub fn new(id: i64, ttl: Duration) -> Self {
        Self {
            id,
            ttl,
            stream: None,
        }
    }

    /// The lease.
    pub fn id(&self) -> i64 {
        self.id
    }

    /// Renews the lease: the TTL it has again, or `None` once it has expired
    /// on the server (it never comes back).
    ///
    /// The stream is taken out while a renewal is in flight and put back
    /// only when its answer arrived, so a renewal cancelled half way never
    /// leaves an answer behind for the next one to misread.
    pub async fn renew(&mut self, etcd: &Etcd) -> Result<Option<Duration>, EtcdError> {
        let answer = match self.stream.take() {
            Some((tx, mut rx)) => {
                let asked = tx.send(LeaseKeepAliveRequest { id: self.id }).await;
                match asked {
                    Ok(()) => next(&mut rx, etcd.timeout).await.map(|r| (tx, rx, r)),
                    Err(_) => Err(Status::unavailable("the keepalive stream closed")),
                }
            }
            None => Err(Status::unavailable("no keepalive stream yet")),
        };
        let (tx, rx, r) = match answer {
            Ok(a) => a,
            // Open it again (moving across endpoints) with this renewal.
            Err(_) => self.open(etcd).await?,
        };
        if r.id != self.id {
            return Err(EtcdError::Invalid(format!(
                "a keepalive answer for lease {} renewing {}",
                r.id, self.id
            )));
        }
        let left = granted(r.ttl, self.ttl)?;
        if left.is_some() {
            self.stream = Some((tx, rx));
        }
        Ok(left)
    }

    async fn open(
        &self,
        etcd: &Etcd,
    ) -> Result<
        (
            mpsc::Sender<LeaseKeepAliveRequest>,
            Streaming<LeaseKeepAliveResponse>,
            LeaseKeepAliveResponse,
        ),
        EtcdError,
    > {
        let id = self.id;
        etcd.unary(|c| {
            let (tx, rx) = mpsc::channel(4);
            let first = tx.try_send(LeaseKeepAliveRequest { id });
            let req = etcd.request(ReceiverStream::new(rx));
            let timeout = etcd.timeout;
            async move {
                first.map_err(|_| Status::internal("a fresh channel is full"))?;
                let mut s = LeaseClient::new(c)
                    .lease_keep_alive(req)
                    .await?
                    .into_inner();
                let r = next(&mut s, timeout).await?;
                Ok((tx, s, r))
            }
        })
        .await
    }
}

/// The stream's next answer within `timeout`.
async fn next(
    rx: &mut Streaming<LeaseKeepAliveResponse>,
    timeout: Duration,
) -> Result<LeaseKeepAliveResponse, Status> {
    match tokio::time::timeout(timeout, rx.message()).await {
        Ok(Ok(Some(r))) => Ok(r),
        Ok(Ok(None)) => Err(Status::unavailable("the keepalive stream ended")),
        Ok(Err(s)) => Err(s),
        Err(_) => Err(Status::deadline_exceeded("no keepalive answer")),
    }
}
