//! Quarantine, as Windows Server 2016 does it: a node that loses its lease
//! three times within an hour takes no VMs for two hours, unless an
//! operator lifts it (`ferry node resume --clear-quarantine`). A clean stop
//! revokes its lease and never counts. Kept in `{prefix}state/{name}`;
//! each lost lease is counted once, by its id, whoever records it first:
//! the node itself when it finds its lease expired, or the coordinator
//! when it sees the node dead.

use super::etcd::{Cmp, Etcd, EtcdError, Op, Txn};
use super::mirror::{parse_json, Versioned};
use super::store::LAYOUT_VERSION;
use serde::{Deserialize, Serialize};

/// Losses within this window count toward quarantine.
pub const WINDOW_MS: u64 = 3600 * 1000;
/// Losses within the window that quarantine a node.
pub const LOSSES: usize = 3;
/// How long a quarantine lasts.
pub const QUARANTINE_MS: u64 = 2 * 3600 * 1000;
/// Most losses a record keeps (the newest).
const KEEP: usize = 16;

/// One lost lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Loss {
    /// The lease.
    pub lease: i64,
    /// When it was found lost, ms since the Unix epoch.
    pub at_ms: u64,
}

/// A node's record of lost leases and quarantine.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStateRecord {
    /// The layout's version.
    pub version: u32,
    /// Its lost leases, oldest first.
    #[serde(default)]
    pub losses: Vec<Loss>,
    /// Until when it takes no VMs, ms since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantined_until_ms: Option<u64>,
    /// The lease its agent revoked on a clean stop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clean_stop_lease: Option<i64>,
}

impl Versioned for NodeStateRecord {
    fn version(&self) -> u32 {
        self.version
    }
}

impl NodeStateRecord {
    /// Whether it is quarantined at `now_ms`.
    pub fn quarantined(&self, now_ms: u64) -> bool {
        self.quarantined_until_ms.is_some_and(|t| t > now_ms)
    }

    /// Counts lost `lease` at `now_ms` (once per lease; never a lease its
    /// agent revoked); quarantines the node on the third loss within the
    /// window. Whether anything changed.
    pub fn lost(&mut self, lease: i64, now_ms: u64) -> bool {
        if self.clean_stop_lease == Some(lease) || self.losses.iter().any(|l| l.lease == lease) {
            return false;
        }
        self.losses.push(Loss {
            lease,
            at_ms: now_ms,
        });
        if self.losses.len() > KEEP {
            self.losses.remove(0);
        }
        let recent = self
            .losses
            .iter()
            .filter(|l| l.at_ms + WINDOW_MS > now_ms)
            .count();
        if recent >= LOSSES && !self.quarantined(now_ms) {
            self.quarantined_until_ms = Some(now_ms + QUARANTINE_MS);
        }
        true
    }
}

/// The key of node `name`'s state record.
pub fn key(prefix: &str, name: &str) -> Vec<u8> {
    format!("{prefix}state/{name}").into_bytes()
}

/// Reads node `name`'s record, changes it with `change` (which says
/// whether it changed anything), and writes it back if the record did not
/// change meanwhile, and, with `token`, if the coordinator key is still at
/// it. Retries a few times on a concurrent write.
pub async fn update(
    etcd: &Etcd,
    prefix: &str,
    name: &str,
    token: Option<i64>,
    change: impl Fn(&mut NodeStateRecord) -> bool,
) -> Result<Option<NodeStateRecord>, EtcdError> {
    let key = key(prefix, name);
    for _ in 0..5 {
        let (mut r, rev) = match etcd.get(&key).await? {
            Some(kv) => (
                parse_json::<NodeStateRecord>(&kv.value).map_err(EtcdError::Invalid)?,
                kv.mod_revision,
            ),
            None => (
                NodeStateRecord {
                    version: LAYOUT_VERSION,
                    ..Default::default()
                },
                0,
            ),
        };
        if !change(&mut r) {
            return Ok(Some(r));
        }
        let mut txn = Txn::new().when(Cmp::modified_at(&key, rev));
        if let Some(t) = token {
            txn = txn.when(Cmp::created_at(&super::coordinator::key(prefix), t));
        }
        let txn = txn.then(Op::put(
            &key,
            &serde_json::to_vec(&r).expect("records serialize"),
            None,
        ));
        let done = etcd.txn(&txn).await?;
        if done.succeeded {
            return Ok(Some(r));
        }
        if token.is_some() {
            // Perhaps deposed: the next coordinator counts it.
            let holds = etcd.get(&super::coordinator::key(prefix)).await?;
            if holds.map(|kv| kv.create_revision) != token {
                return Ok(None);
            }
        }
    }
    Err(EtcdError::Unavailable(format!(
        "the state record of node {name} kept changing"
    )))
}

impl super::node::Node {
    /// `POST /v1/node/resume` with `clear_quarantine`: lifts this node's
    /// quarantine and forgets its lost leases.
    pub(super) async fn clear_quarantine(&self) -> Result<(), super::node::NodeError> {
        let live = self.store_for("clear_quarantine")?;
        update(live.etcd(), live.prefix(), self.name(), None, |r| {
            let had = r.quarantined_until_ms.is_some() || !r.losses.is_empty();
            r.quarantined_until_ms = None;
            r.losses.clear();
            had
        })
        .await
        .map_err(|e| super::node::NodeError::Unavailable(format!("the cluster's store: {e}")))?;
        tracing::warn!(node = %self.name(), "quarantine cleared by an operator");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_third_loss_within_an_hour_quarantines_for_two_hours() {
        let mut r = NodeStateRecord::default();
        let h = WINDOW_MS;
        assert!(r.lost(1, 0));
        assert!(!r.lost(1, 10), "a lease counts once");
        assert!(r.lost(2, h / 2));
        assert!(!r.quarantined(h / 2));
        assert!(r.lost(3, h - 1));
        assert!(r.quarantined(h));
        assert_eq!(r.quarantined_until_ms, Some(h - 1 + QUARANTINE_MS));
        assert!(!r.quarantined(h - 1 + QUARANTINE_MS));
        // Spread over more than an hour: no quarantine.
        let mut r = NodeStateRecord::default();
        r.lost(1, 0);
        r.lost(2, h / 2);
        r.lost(3, h + 1);
        assert!(!r.quarantined(h + 1));
        // A clean stop's lease never counts.
        let mut r = NodeStateRecord {
            clean_stop_lease: Some(7),
            ..Default::default()
        };
        assert!(!r.lost(7, 0));
        assert!(r.losses.is_empty());
    }

    #[test]
    fn it_keeps_the_newest_losses_only() {
        let mut r = NodeStateRecord::default();
        for i in 0..40 {
            r.lost(i, i as u64 * WINDOW_MS);
        }
        assert_eq!(r.losses.len(), KEEP);
        assert_eq!(r.losses[0].lease, 40 - KEEP as i64);
    }
}
