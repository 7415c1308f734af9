//! The coordinator: one agent of the cluster, elected through a key that
//! is created only if absent and bound to the winner's lease. The key's
//! create revision is the coordinator's fencing token: every write it makes
//! is a transaction that checks the key still has that revision, so a
//! deposed coordinator changes nothing. It leads until its lease ends, its
//! key goes, or its agent stops (then it resigns); meanwhile it restarts
//! the VMs of dead nodes elsewhere ([`super::ha`]) and carries out the
//! rolling update ([`super::rolling`]).

use super::etcd::{Cmp, Op, Txn};
use super::mirror::Mirror;
use super::node::Node;
use super::records::CoordinatorRecord;
use super::store::{Liveness, LAYOUT_VERSION};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often a coordinator looks again without a change in etcd.
const ROUND: Duration = Duration::from_secs(1);

/// The coordinator key.
pub fn key(prefix: &str) -> Vec<u8> {
    format!("{prefix}coordinator").into_bytes()
}

/// Campaigns whenever there is no coordinator, and leads once elected,
/// until `stop`.
pub async fn run(
    node: Arc<Node>,
    live: Arc<Liveness>,
    mirror: Arc<Mirror>,
    stop: CancellationToken,
) {
    let key = key(live.prefix());
    let mut changes = mirror.subscribe();
    loop {
        let (lease, fenced) = live.lease();
        // Elected by a campaign whose answer was lost: the key is this
        // node's, bound to its lease.
        let ours = mirror
            .coordinator()
            .filter(|(r, _)| r.node == node.name() && r.lease == lease && lease != 0);
        if let (Some((_, token)), false) = (ours, fenced) {
            tracing::info!(node = %node.name(), token, "elected coordinator (found the key ours)");
            lead(&node, &live, &mirror, token, lease, &stop).await;
            resign(&live, token).await;
            tracing::info!(node = %node.name(), token, "no longer the coordinator");
        } else if !fenced
            && mirror.ready()
            && mirror.coordinator().is_none()
            && !super::rolling::my_turn(&mirror, node.name())
        {
            let record = CoordinatorRecord {
                version: LAYOUT_VERSION,
                node: node.name().to_string(),
                lease,
            };
            let json = serde_json::to_vec(&record).expect("records serialize");
            let txn = Txn::new()
                .when(Cmp::absent(&key))
                .then(Op::put(&key, &json, Some(lease)));
            match live.etcd().txn(&txn).await {
                Ok(r) if r.succeeded => {
                    let token = r.revision;
                    tracing::info!(node = %node.name(), token, "elected coordinator");
                    lead(&node, &live, &mirror, token, lease, &stop).await;
                    resign(&live, token).await;
                    tracing::info!(node = %node.name(), token, "no longer the coordinator");
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "campaigning for coordinator failed"),
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = changes.changed() => {}
            _ = tokio::time::sleep(ROUND) => {}
        }
    }
}

/// Leads while this node holds the key with `token` under `lease`.
async fn lead(
    node: &Arc<Node>,
    live: &Liveness,
    mirror: &Mirror,
    token: i64,
    lease: i64,
    stop: &CancellationToken,
) {
    let mut changes = mirror.subscribe();
    let mut ha = super::ha::Restarter::default();
    loop {
        let holds = match mirror.coordinator() {
            Some((_, rev)) => rev == token,
            // The mirror has not caught up with the election yet.
            None => mirror.revision() < token,
        };
        if !holds || live.lease() != (lease, false) || stop.is_cancelled() {
            return;
        }
        if mirror.revision() >= token && mirror.ready() {
            // Its own node's turn in a rolling update: another node leads.
            if super::rolling::my_turn(mirror, node.name()) {
                tracing::info!("handing the coordinator role over for this node's update");
                return;
            }
            // A round ends early when the agent stops or the lease changes;
            // its writes are transactions, each whole or not at all.
            let lead = tokio::select! {
                _ = stop.cancelled() => return,
                _ = lease_lost(live, lease) => return,
                lead = async {
                    ha.round(node, live, mirror, token).await;
                    super::schedule::due(node, live, mirror, token).await;
                    super::rolling::drive(node, live, mirror, token).await
                } => lead,
            };
            if lead == super::rolling::Lead::Resign {
                return;
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = changes.changed() => {}
            _ = tokio::time::sleep(ROUND) => {}
        }
    }
}

/// Gives the key up if it is still this coordinator's.
async fn resign(live: &Liveness, token: i64) {
    let key = key(live.prefix());
    let txn = Txn::new()
        .when(Cmp::created_at(&key, token))
        .then(Op::delete(&key));
    if let Err(e) = live.etcd().txn(&txn).await {
        tracing::warn!(error = %e, "resigning as coordinator failed; the key goes with the lease");
    }
}

/// Returns once the node no longer holds `lease` unfenced.
async fn lease_lost(live: &Liveness, lease: i64) {
    while live.lease() == (lease, false) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
