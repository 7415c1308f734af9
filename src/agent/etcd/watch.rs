//! Watches: every change under a prefix from a revision on, across
//! reconnects (opened again on the next endpoint from the last revision
//! seen); a compacted start revision is an error that asks for a full read.

use super::proto::etcdserverpb::{
    watch_client::WatchClient, watch_request, WatchCreateRequest, WatchRequest, WatchResponse,
};
use super::proto::mvccpb::event::EventType;
use super::{prefix_end, Etcd, EtcdError, KeyValue, MAX_MESSAGE};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

/// Breaks in a row without a change before [`Watcher::next`] gives up.
pub const MAX_BREAKS: u32 = 10;
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Why etcd refused to open a watch, as a status `unary` understands: an
/// auth problem renews the token, a compaction asks for a full read.
fn refusal(reason: &str, compacted: i64) -> Status {
    if compacted > 0 {
        return Status::out_of_range(format!("compacted:{compacted}"));
    }
    if reason.contains("auth") || reason.contains("user name is empty") {
        return Status::unauthenticated(reason.to_string());
    }
    Status::failed_precondition(format!("etcd refused the watch: {reason}"))
}

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
    /// from the first revision not delivered, so nothing is missed or
    /// repeated; after [`MAX_BREAKS`] breaks in a row without a change it
    /// gives up with the last error (the caller reads everything again).
    pub async fn next(&mut self, etcd: &Etcd) -> Result<Vec<WatchEvent>, EtcdError> {
        let mut breaks = 0;
        loop {
            if self.stream.is_none() {
                if breaks > 0 {
                    // Back off: 50 ms, doubling, at most 2 s.
                    let wait = Duration::from_millis(50 << breaks.min(6)).min(MAX_BACKOFF);
                    tokio::time::sleep(wait).await;
                }
                match self.open(etcd).await {
                    Ok(s) => self.stream = Some(s),
                    Err(
                        e @ (EtcdError::Compacted(_) | EtcdError::Refused(_) | EtcdError::Auth(_)),
                    ) => return Err(e),
                    Err(e) if breaks >= MAX_BREAKS => return Err(e),
                    Err(_) => {
                        breaks += 1;
                        continue;
                    }
                }
            }
            let Some((_, rx)) = self.stream.as_mut() else {
                continue;
            };
            let r = match rx.message().await {
                Ok(Some(r)) => r,
                Ok(None) | Err(_) => {
                    tracing::debug!(next = self.next, "etcd watch broke; opening it again");
                    self.stream = None;
                    etcd.move_on();
                    breaks += 1;
                    if breaks > MAX_BREAKS {
                        return Err(EtcdError::Unavailable("the watch keeps breaking".into()));
                    }
                    continue;
                }
            };
            let out = self.take(r)?;
            if !out.is_empty() {
                return Ok(out);
            }
        }
    }

    /// The new events of one answer, checked whole before any is delivered.
    fn take(&mut self, r: WatchResponse) -> Result<Vec<WatchEvent>, EtcdError> {
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
        let header = r.header.map_or(i64::MAX, |h| h.revision);
        // Events of one revision (a transaction) share it: filter on where
        // this answer starts, move on past its last revision.
        let floor = self.next;
        let mut last = None;
        let mut out = Vec::with_capacity(r.events.len());
        for e in r.events {
            let Some(kv) = e.kv else {
                return Err(EtcdError::Invalid("a watch event without its key".into()));
            };
            let rev = kv.mod_revision;
            if rev <= 0 || rev > header || last.is_some_and(|l| rev < l) {
                return Err(EtcdError::Invalid(format!("watch event revision {rev}")));
            }
            last = Some(rev);
            if rev < floor {
                continue; // delivered before a reconnect
            }
            out.push(match EventType::try_from(e.r#type) {
                Ok(EventType::Put) => WatchEvent::Put(kv),
                Ok(EventType::Delete) => WatchEvent::Delete(kv),
                Err(_) => return Err(EtcdError::Invalid(format!("event type {}", e.r#type))),
            });
        }
        if let Some(l) = last.filter(|l| *l >= floor) {
            self.next = l
                .checked_add(1)
                .ok_or(EtcdError::Invalid(format!("revision {l}")))?;
        }
        Ok(out)
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
            let mut req = etcd.request(ReceiverStream::new(rx));
            // Only a member that has a leader may serve the watch: one cut
            // off from it would stay silent.
            req.metadata_mut().insert(
                "hasleader",
                tonic::metadata::MetadataValue::from_static("true"),
            );
            let timeout = etcd.timeout;
            async move {
                first.map_err(|_| Status::internal("a fresh channel is full"))?;
                let mut s = WatchClient::new(c)
                    .max_decoding_message_size(MAX_MESSAGE)
                    .watch(req)
                    .await?
                    .into_inner();
                // The first answer says the watch exists (or why not: etcd
                // creates and cancels it at once when it refuses it).
                match tokio::time::timeout(timeout, s.message()).await {
                    Ok(Ok(Some(r))) if r.created && r.canceled => {
                        Err(refusal(&r.cancel_reason, r.compact_revision))
                    }
                    Ok(Ok(Some(r))) if r.compact_revision > 0 => {
                        Err(refusal("compacted", r.compact_revision))
                    }
                    Ok(Ok(Some(r))) if r.created => Ok((tx, s)),
                    Ok(Ok(Some(_))) => Err(Status::internal("the watch was not created")),
                    Ok(Ok(None)) => Err(Status::unavailable("the watch stream ended")),
                    Ok(Err(s)) => Err(s),
                    Err(_) => Err(Status::deadline_exceeded("no answer to the watch")),
                }
            }
        })
        .await
        .map_err(|e| match e {
            EtcdError::Refused(m) if m.starts_with("compacted:") => {
                EtcdError::Compacted(m["compacted:".len()..].parse().unwrap_or(0))
            }
            e => e,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::proto::etcdserverpb::ResponseHeader;
    use super::super::proto::mvccpb::Event;
    use super::*;

    fn event(kind: EventType, key: &str, rev: i64) -> Event {
        Event {
            r#type: kind as i32,
            kv: Some(KeyValue {
                key: key.as_bytes().to_vec(),
                mod_revision: rev,
                ..Default::default()
            }),
            prev_kv: None,
        }
    }

    fn answer(header: i64, events: Vec<Event>) -> WatchResponse {
        WatchResponse {
            header: Some(ResponseHeader {
                revision: header,
                ..Default::default()
            }),
            events,
            ..Default::default()
        }
    }

    fn keys(events: &[WatchEvent]) -> Vec<String> {
        events
            .iter()
            .map(|e| match e {
                WatchEvent::Put(kv) | WatchEvent::Delete(kv) => {
                    String::from_utf8_lossy(&kv.key).into_owned()
                }
            })
            .collect()
    }

    #[test]
    fn every_event_of_a_transaction_is_delivered_once() {
        let mut w = Watcher::new(b"/p/", 7);
        // One transaction (revision 7) of two puts, then a delete.
        let first = vec![
            event(EventType::Put, "a", 7),
            event(EventType::Put, "b", 7),
            event(EventType::Delete, "c", 8),
        ];
        let got = w.take(answer(8, first.clone())).unwrap();
        assert_eq!(keys(&got), ["a", "b", "c"]);
        assert_eq!(w.next_revision(), 9);
        // After a reconnect etcd sends them again: none is repeated.
        let mut again = first;
        again.push(event(EventType::Put, "d", 9));
        assert_eq!(keys(&w.take(answer(9, again)).unwrap()), ["d"]);
        assert_eq!(w.next_revision(), 10);
    }

    #[test]
    fn impossible_revisions_are_refused_without_delivering_or_panicking() {
        let mut w = Watcher::new(b"/p/", 1);
        let ahead = vec![
            event(EventType::Put, "a", 2),
            event(EventType::Put, "b", 12),
        ];
        assert!(matches!(
            w.take(answer(10, ahead)),
            Err(EtcdError::Invalid(_))
        ));
        assert_eq!(w.next_revision(), 1, "nothing of a bad answer counts");
        let backwards = vec![event(EventType::Put, "a", 5), event(EventType::Put, "b", 4)];
        assert!(w.take(answer(10, backwards)).is_err());
        let last = vec![event(EventType::Put, "a", i64::MAX)];
        assert!(matches!(
            w.take(answer(i64::MAX, last)),
            Err(EtcdError::Invalid(_))
        ));
        let zero = vec![event(EventType::Put, "a", 0)];
        assert!(w.take(answer(10, zero)).is_err());
    }
}
