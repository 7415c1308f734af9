//! Every agent's copy of its cluster's keys in etcd: read whole, then kept
//! current by a watch from the revision after that read; read whole again
//! when the watch gives up (a compaction, a long outage), so nothing is
//! missed. The coordinator decides from it; views show from it.
//!
//! Values are checked as they are read, like API input: a record that does
//! not parse or is out of range is logged and left out.

use super::etcd::{Etcd, EtcdError, KeyValue, WatchEvent, Watcher};
use super::quarantine::NodeStateRecord;
use super::records::{CoordinatorRecord, VmRecord};
use super::store::NodeRecord;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Most keys a cluster may hold: a mirror that would pass it stops growing
/// and says so.
pub const MAX_KEYS: usize = 200_000;

fn over_cap() -> EtcdError {
    EtcdError::Invalid(format!("more than {MAX_KEYS} keys under the prefix"))
}

/// The cluster's keys as last read.
pub struct Mirror {
    etcd: Arc<Etcd>,
    prefix: String,
    keys: Mutex<Keys>,
    changed: tokio::sync::watch::Sender<u64>,
}

#[derive(Default)]
struct Keys {
    kvs: BTreeMap<Vec<u8>, KeyValue>,
    /// The revision the copy is current at; 0 before the first read.
    revision: i64,
    /// The cluster held more than [`MAX_KEYS`] keys: the copy misses some,
    /// so nothing may act on it until a full read fits again.
    truncated: bool,
}

impl Mirror {
    /// A mirror of the keys under `prefix`, empty until [`Mirror::run`]
    /// has read them.
    pub fn new(etcd: Arc<Etcd>, prefix: &str) -> Self {
        Self {
            etcd,
            prefix: prefix.to_string(),
            keys: Mutex::default(),
            changed: tokio::sync::watch::channel(0).0,
        }
    }

    /// Keeps the copy current until `stop`.
    pub async fn run(&self, stop: CancellationToken) {
        loop {
            let synced = tokio::select! {
                _ = stop.cancelled() => return,
                r = self.sync() => r,
            };
            if let Err(e) = synced {
                tracing::warn!(error = %e, "reading the cluster's state from etcd failed; reading it again");
            }
            // Over the cap, read everything again now and then: keys may go.
            let wait = if self.keys.lock().unwrap().truncated {
                5000
            } else {
                200
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
            }
        }
    }

    /// Reads everything, then follows the changes until the watch fails.
    async fn sync(&self) -> Result<(), EtcdError> {
        let (kvs, revision) = self.etcd.list(self.prefix.as_bytes()).await?;
        {
            let mut k = self.keys.lock().unwrap();
            k.truncated = kvs.len() > MAX_KEYS;
            if k.truncated {
                tracing::error!("the cluster holds more than {MAX_KEYS} keys: this agent's copy is incomplete, and its coordinator acts on nothing");
            }
            k.kvs = kvs
                .into_iter()
                .take(MAX_KEYS)
                .map(|kv| (kv.key.clone(), kv))
                .collect();
            k.revision = revision;
        }
        self.changed.send_modify(|n| *n += 1);
        if self.keys.lock().unwrap().truncated {
            return Err(over_cap());
        }
        let mut watch = Watcher::new(self.prefix.as_bytes(), revision + 1);
        loop {
            let events = watch.next(&self.etcd).await?;
            {
                let mut k = self.keys.lock().unwrap();
                for e in events {
                    match e {
                        WatchEvent::Put(kv) => {
                            if k.kvs.len() >= MAX_KEYS && !k.kvs.contains_key(&kv.key) {
                                tracing::error!("the cluster holds more than {MAX_KEYS} keys: this agent's copy is incomplete, and its coordinator acts on nothing");
                                k.truncated = true;
                                drop(k);
                                self.changed.send_modify(|n| *n += 1);
                                return Err(over_cap());
                            }
                            k.revision = k.revision.max(kv.mod_revision);
                            k.kvs.insert(kv.key.clone(), kv);
                        }
                        WatchEvent::Delete(kv) => {
                            k.revision = k.revision.max(kv.mod_revision);
                            k.kvs.remove(&kv.key);
                        }
                    }
                }
            }
            self.changed.send_modify(|n| *n += 1);
        }
    }

    /// A receiver that sees every change of the copy.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The revision the copy is current at; 0 before the first read.
    pub fn revision(&self) -> i64 {
        self.keys.lock().unwrap().revision
    }

    /// Whether the copy is whole: read once, and within [`MAX_KEYS`].
    pub fn ready(&self) -> bool {
        let k = self.keys.lock().unwrap();
        k.revision > 0 && !k.truncated
    }

    /// The keys under `{prefix}{dir}/`, by the name after it, checked by
    /// `parse`.
    fn under<T>(
        &self,
        dir: &str,
        parse: impl Fn(&str, &KeyValue) -> Result<T, String>,
    ) -> BTreeMap<String, T> {
        let start = format!("{}{dir}/", self.prefix).into_bytes();
        let k = self.keys.lock().unwrap();
        let mut out = BTreeMap::new();
        for (key, kv) in k.kvs.range(start.clone()..) {
            let Some(name) = key.strip_prefix(start.as_slice()) else {
                break;
            };
            let Ok(name) = std::str::from_utf8(name) else {
                continue;
            };
            match parse(name, kv) {
                Ok(v) => {
                    out.insert(name.to_string(), v);
                }
                Err(e) => {
                    tracing::warn!(key = %String::from_utf8_lossy(key), error = %e, "ignoring a bad record in etcd")
                }
            }
        }
        out
    }

    /// The cluster's key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The value of `key` as last read.
    pub(super) fn value(&self, key: &[u8]) -> Option<Vec<u8>> {
        let k = self.keys.lock().unwrap();
        k.kvs.get(key).map(|kv| kv.value.clone())
    }

    /// The registered nodes.
    pub fn nodes(&self) -> BTreeMap<String, NodeRecord> {
        self.under("nodes", |name, kv| decode_node(&kv.value, name))
    }

    /// The nodes holding a lease now.
    pub fn alive(&self) -> BTreeSet<String> {
        self.under("alive", |_, kv| {
            if kv.lease == 0 {
                return Err("not bound to a lease".into());
            }
            Ok(())
        })
        .into_keys()
        .collect()
    }

    /// The nodes' lost leases and quarantines.
    pub fn states(&self) -> BTreeMap<String, NodeStateRecord> {
        self.under("state", |_, kv| parse_json::<NodeStateRecord>(&kv.value))
    }

    /// Whether node `name` is quarantined now.
    pub fn quarantined_until(&self, name: &str) -> Option<u64> {
        let now = super::node::now_ms();
        self.states()
            .remove(name)
            .filter(|s| s.quarantined(now))
            .and_then(|s| s.quarantined_until_ms)
    }

    /// The VMs, each with the revision its record was last written at.
    pub fn vms(&self) -> BTreeMap<String, (VmRecord, i64)> {
        self.under("vms", |name, kv| {
            Ok((decode_vm(&kv.value, name)?, kv.mod_revision))
        })
    }

    /// The VM `name`'s record, if any.
    pub fn vm(&self, name: &str) -> Option<(VmRecord, i64)> {
        let key = format!("{}vms/{name}", self.prefix).into_bytes();
        let k = self.keys.lock().unwrap();
        let kv = k.kvs.get(&key)?;
        let r = decode_vm(&kv.value, name).ok()?;
        Some((r, kv.mod_revision))
    }

    /// The elected coordinator and its token (the key's create revision).
    pub fn coordinator(&self) -> Option<(CoordinatorRecord, i64)> {
        let key = format!("{}coordinator", self.prefix).into_bytes();
        let k = self.keys.lock().unwrap();
        let kv = k.kvs.get(&key)?;
        match parse_json::<CoordinatorRecord>(&kv.value) {
            Ok(r) => Some((r, kv.create_revision)),
            Err(e) => {
                tracing::warn!(error = %e, "ignoring a bad coordinator record");
                None
            }
        }
    }
}

/// Node `name`'s registration as read from etcd, checked.
pub fn decode_node(bytes: &[u8], name: &str) -> Result<NodeRecord, String> {
    let r: NodeRecord = parse_json(bytes)?;
    if r.name != name {
        return Err(format!("record of node {:?} under {name:?}", r.name));
    }
    super::members::check_record(&r)?;
    Ok(r)
}

/// VM `name`'s record as read from etcd, checked.
pub fn decode_vm(bytes: &[u8], name: &str) -> Result<VmRecord, String> {
    let r: VmRecord = parse_json(bytes)?;
    r.check(name)?;
    Ok(r)
}

/// A record's JSON, of the layout this build reads.
pub(super) fn parse_json<T: serde::de::DeserializeOwned + Versioned>(
    bytes: &[u8],
) -> Result<T, String> {
    let r: T = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if r.version() != super::store::LAYOUT_VERSION {
        return Err(format!("layout version {}", r.version()));
    }
    Ok(r)
}

/// A record that names its layout's version.
pub(super) trait Versioned {
    /// The layout's version it was written in.
    fn version(&self) -> u32;
}

impl Versioned for NodeRecord {
    fn version(&self) -> u32 {
        self.version
    }
}
