//! A node's own records in etcd, written in the background by one writer in
//! the order they were made: its migration records
//! (`{prefix}migrations/{node}/{id}`), its operation journals
//! (`{prefix}operations/{node}/{id}`) and its administrative state
//! (`{prefix}admin/{node}`). Only the node writes under its name, so each is
//! a plain put; a key changed again before its write lands is written once,
//! with its latest value. A failed write is retried with backoff until it
//! lands or the agent stops; a clean stop waits for the writer to catch up.

use super::etcd::{Etcd, EtcdError};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Migration records kept per node: older ones are deleted.
pub const MAX_MIGRATIONS: usize = 256;
/// Operation journals kept per node: older ones are deleted.
pub const MAX_OPERATIONS: usize = 64;
/// The longest a retried write waits before its next try.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Which of the node's record folders a key is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Folder {
    /// `migrations/{node}/`.
    Migrations,
    /// `operations/{node}/`.
    Operations,
}

impl Folder {
    fn name(self) -> &'static str {
        match self {
            Self::Migrations => "migrations",
            Self::Operations => "operations",
        }
    }

    fn keep(self) -> usize {
        match self {
            Self::Migrations => MAX_MIGRATIONS,
            Self::Operations => MAX_OPERATIONS,
        }
    }
}

#[derive(Default)]
struct Pending {
    /// The value each waiting key gets (`None`: deleted).
    latest: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// The waiting keys, oldest change first.
    order: VecDeque<Vec<u8>>,
    /// A write is in flight.
    writing: bool,
    /// Each folder's ids, oldest first, to delete the oldest past its cap.
    kept: [VecDeque<String>; 2],
    /// Each folder's ids that no cap deletes (an unresolved hand-off, an
    /// operation still running).
    pinned: [BTreeSet<String>; 2],
}

impl Pending {
    /// Forgets and returns `folder`'s oldest ids past its cap, pinned ones
    /// spared.
    fn over_cap(&mut self, folder: Folder) -> Vec<String> {
        let i = folder as usize;
        let mut over = self.kept[i].len().saturating_sub(folder.keep());
        let pinned = &self.pinned[i];
        let mut gone = Vec::new();
        self.kept[i].retain(|id| {
            if over == 0 || pinned.contains(id) {
                return true;
            }
            over -= 1;
            gone.push(id.clone());
            false
        });
        gone
    }
}

/// The node's writer of its own records.
pub struct Journal {
    etcd: Arc<Etcd>,
    prefix: String,
    node: String,
    pending: Mutex<Pending>,
    wake: tokio::sync::Notify,
    idle: tokio::sync::Notify,
    /// How long each write waits before it goes (tests only).
    delay: Duration,
}

impl Journal {
    /// A writer of node `node`'s records under `prefix`.
    pub fn new(etcd: Arc<Etcd>, prefix: &str, node: &str) -> Self {
        Self {
            etcd,
            prefix: prefix.to_string(),
            node: node.to_string(),
            pending: Mutex::default(),
            wake: tokio::sync::Notify::new(),
            idle: tokio::sync::Notify::new(),
            delay: write_delay(),
        }
    }

    /// The folder of `folder`'s records of this node, ending in `/`.
    pub fn folder_key(&self, folder: Folder) -> String {
        format!("{}{}/{}/", self.prefix, folder.name(), self.node)
    }

    /// The key of the node's administrative state.
    pub fn admin_key(&self) -> Vec<u8> {
        format!("{}admin/{}", self.prefix, self.node).into_bytes()
    }

    /// Reads `folder`'s records as they stand, oldest first by creation,
    /// each with its id; deletes (in the background) the oldest past the
    /// cap of those `pin` does not keep.
    pub async fn load(
        &self,
        folder: Folder,
        pin: impl Fn(&str, &[u8]) -> bool,
    ) -> Result<Vec<(String, Vec<u8>)>, EtcdError> {
        let dir = self.folder_key(folder);
        let (mut kvs, _) = self.etcd.list(dir.as_bytes()).await?;
        kvs.sort_by_key(|kv| kv.create_revision);
        let mut out = Vec::new();
        for kv in kvs {
            let Some(id) = kv
                .key
                .strip_prefix(dir.as_bytes())
                .and_then(|k| std::str::from_utf8(k).ok())
            else {
                continue;
            };
            out.push((id.to_string(), kv.value));
        }
        let gone = {
            let mut p = self.pending.lock().unwrap();
            let i = folder as usize;
            p.kept[i] = out.iter().map(|(id, _)| id.clone()).collect();
            p.pinned[i] = out
                .iter()
                .filter(|(id, v)| pin(id, v))
                .map(|(id, _)| id.clone())
                .collect();
            p.over_cap(folder)
        };
        out.retain(|(id, _)| !gone.contains(id));
        for id in gone {
            self.delete(format!("{dir}{id}").into_bytes());
        }
        Ok(out)
    }

    /// Reads the node's administrative state as it stands.
    pub async fn load_admin(&self) -> Result<Option<Vec<u8>>, EtcdError> {
        Ok(self.etcd.get(&self.admin_key()).await?.map(|kv| kv.value))
    }

    /// Writes record `id` of `folder`, `pinned` when no cap may delete it;
    /// the oldest unpinned past the folder's cap go.
    pub fn record(&self, folder: Folder, id: &str, value: Vec<u8>, pinned: bool) {
        let dir = self.folder_key(folder);
        self.put(format!("{dir}{id}").into_bytes(), value);
        let gone = {
            let mut p = self.pending.lock().unwrap();
            let i = folder as usize;
            if !p.kept[i].iter().any(|k| k == id) {
                p.kept[i].push_back(id.to_string());
            }
            if pinned {
                p.pinned[i].insert(id.to_string());
            } else {
                p.pinned[i].remove(id);
            }
            p.over_cap(folder)
        };
        for old in gone {
            self.delete(format!("{dir}{old}").into_bytes());
        }
    }

    /// Writes `key` as `value`.
    pub fn put(&self, key: Vec<u8>, value: Vec<u8>) {
        self.queue(key, Some(value));
    }

    /// Deletes `key`.
    pub fn delete(&self, key: Vec<u8>) {
        self.queue(key, None);
    }

    fn queue(&self, key: Vec<u8>, value: Option<Vec<u8>>) {
        let mut p = self.pending.lock().unwrap();
        if p.latest.insert(key.clone(), value).is_none() {
            p.order.push_back(key);
        }
        drop(p);
        self.wake.notify_one();
    }

    /// Writes what is queued, in order, until `stop`.
    pub async fn run(&self, stop: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let next = {
                let mut p = self.pending.lock().unwrap();
                let next = p.order.front().cloned().and_then(|k| {
                    let v = p.latest.get(&k).cloned()?;
                    Some((k, v))
                });
                p.writing = next.is_some();
                next
            };
            let Some((key, value)) = next else {
                self.idle.notify_waiters();
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = self.wake.notified() => continue,
                }
            };
            let wrote = tokio::select! {
                _ = stop.cancelled() => return,
                r = async {
                    tokio::time::sleep(self.delay).await;
                    self.write(&key, value.as_deref()).await
                } => r,
            };
            match wrote {
                Ok(()) => {
                    backoff = Duration::from_millis(100);
                    let mut p = self.pending.lock().unwrap();
                    // Changed again meanwhile: written again, in its turn.
                    if p.latest.get(&key) == Some(&value) {
                        p.latest.remove(&key);
                        p.order.pop_front();
                    } else {
                        p.order.pop_front();
                        p.order.push_back(key);
                    }
                }
                Err(e) => {
                    tracing::warn!(key = %String::from_utf8_lossy(&key), error = %e, retry_in = ?backoff, "writing a record to etcd failed");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    async fn write(&self, key: &[u8], value: Option<&[u8]>) -> Result<(), EtcdError> {
        match value {
            Some(v) => self.etcd.put(key, v, None).await.map(|_| ()),
            None => self.etcd.delete(key).await.map(|_| ()),
        }
    }

    /// Whether every queued write has landed.
    pub fn caught_up(&self) -> bool {
        let p = self.pending.lock().unwrap();
        p.order.is_empty() && !p.writing
    }

    /// Waits until every queued write has landed, at most `limit`; false
    /// when some had not.
    pub async fn flush(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let idle = self.idle.notified();
            if self.caught_up() {
                return true;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                return self.caught_up();
            }
        }
    }
}

/// Each write's wait: none, except in the tests' builds (the `faults`
/// feature), where `FERRY_FAULT_JOURNAL_DELAY_MS` (at most 10,000) slows
/// the writer down to widen the window between a record and etcd.
fn write_delay() -> Duration {
    #[cfg(feature = "faults")]
    if let Some(ms) = std::env::var("FERRY_FAULT_JOURNAL_DELAY_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        return Duration::from_millis(ms.min(10_000));
    }
    Duration::ZERO
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_spares_pinned_records_and_takes_the_oldest_others() {
        let mut p = Pending::default();
        let i = Folder::Migrations as usize;
        p.kept[i] = (0..MAX_MIGRATIONS + 2).map(|n| n.to_string()).collect();
        p.pinned[i].insert("0".into());
        assert_eq!(p.over_cap(Folder::Migrations), ["1", "2"]);
        assert_eq!(p.kept[i].len(), MAX_MIGRATIONS);
        assert_eq!(p.kept[i].front().map(String::as_str), Some("0"));
        // All pinned: none goes, whatever the count.
        p.pinned[i] = p.kept[i].iter().cloned().collect();
        p.kept[i].push_back("new".into());
        p.pinned[i].insert("new".into());
        assert!(p.over_cap(Folder::Migrations).is_empty());
        assert_eq!(p.over_cap(Folder::Operations), Vec::<String>::new());
    }
}
