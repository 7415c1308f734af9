//! Watches: every change under a prefix from a revision on, across
//! reconnects (opened again on the next endpoint from the last revision
//! seen); a compacted start revision is an error that asks for a full read.

use super::proto::etcdserverpb::{
    watch_client::WatchClient, watch_request, WatchCreateRequest, WatchRequest, WatchResponse,
};
use super::proto::mvccpb::event::EventType;
use super::{prefix_end, Etcd, EtcdError, KeyValue};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

/// One change.
#[derive(Debug, Clone, PartialEq)]
pub enum WatchEvent {
    /// The key was set: its new value and revisions.
    Put(KeyValue),
    /// The key was deleted (or its lease expired), at `mod_revision`.
    Delete(KeyValue),
}

/// Changes under one prefix, in revision order.
pub struct Watcher {
    prefix: Vec<u8>,
    /// The first revision not yet delivered.
    next: i64,
    stream: Option<(mpsc::Sender<WatchRequest>, Streaming<WatchResponse>)>,
}

impl Watcher {
    /// Changes under `prefix` from revision `from` on (the revision after a
    /// full read).
    pub fn new(prefix: &[u8], from: i64) -> Self {
        Self {
            prefix: prefix.to_vec(),
            next: from.max(1),
            stream: None,
        }
    }

    /// The first revision not yet delivered.
    pub fn next_revision(&self) -> i64 {
        self.next
    }

    /// The next changes (waits for them). A broken stream is opened again
    /// from the last revision delivered, so nothing is missed or repeated.
    pub async fn next(&mut self, etcd: &Etcd) -> Result<Vec<WatchEvent>, EtcdError> {
        loop {
            if self.stream.is_none() {
                self.stream = Some(self.open(etcd).await?);
            }
            let Some((_, rx)) = self.stream.as_mut() else {
                continue;
            };
            let r = match rx.message().await {
                Ok(Some(r)) => r,
                Ok(None) | Err(_) => {
                    tracing::debug!(next = self.next, "etcd watch broke; opening it again");
                    self.stream = None;
                    continue;
                }
            };
            if r.compact_revision > 0 {
                self.stream = None;
                return Err(EtcdError::Compacted(r.compact_revision));
            }
            if r.canceled {
                self.stream = None;
                return Err(EtcdError::Refused(format!(
                    "the watch was cancelled: {}",
                    r.cancel_reason
                )));
            }
            let mut out = Vec::with_capacity(r.events.len());
            for e in r.events {
                let Some(kv) = e.kv else {
                    return Err(EtcdError::Invalid("a watch event without its key".into()));
                };
                if kv.mod_revision < self.next {
                    continue; // delivered before a reconnect
                }
                self.next = kv.mod_revision + 1;
                out.push(match EventType::try_from(e.r#type) {
                    Ok(EventType::Put) => WatchEvent::Put(kv),
                    Ok(EventType::Delete) => WatchEvent::Delete(kv),
                    Err(_) => return Err(EtcdError::Invalid(format!("event type {}", e.r#type))),
                });
            }
            if !out.is_empty() {
                return Ok(out);
            }
        }
    }

    async fn open(
        &self,
        etcd: &Etcd,
    ) -> Result<(mpsc::Sender<WatchRequest>, Streaming<WatchResponse>), EtcdError> {
        let create = WatchCreateRequest {
            key: self.prefix.clone(),
            range_end: prefix_end(&self.prefix),
            start_revision: self.next,
            progress_notify: true,
            ..Default::default()
        };
        etcd.unary(|c| {
            let (tx, rx) = mpsc::channel(4);
            let first = tx.try_send(WatchRequest {
                request_union: Some(watch_request::RequestUnion::CreateRequest(create.clone())),
            });
            let req = etcd.request(ReceiverStream::new(rx));
            let timeout = etcd.timeout;
            async move {
                first.map_err(|_| Status::internal("a fresh channel is full"))?;
                let mut s = WatchClient::new(c).watch(req).await?.into_inner();
                // The first answer says the watch exists.
                match tokio::time::timeout(timeout, s.message()).await {
                    Ok(Ok(Some(r))) if r.created => Ok((tx, s)),
                    Ok(Ok(Some(_))) => Err(Status::internal("the watch was not created")),
                    Ok(Ok(None)) => Err(Status::unavailable("the watch stream ended")),
                    Ok(Err(s)) => Err(s),
                    Err(_) => Err(Status::deadline_exceeded("no answer to the watch")),
                }
            }
        })
        .await
    }
}
