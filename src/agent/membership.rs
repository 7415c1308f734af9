//! Taking a node out of the cluster for good (`DELETE /v1/nodes/{name}`,
//! `ferry node remove`): its registration and state leave etcd, so it no
//! longer counts toward the majority restarts need. Only a node whose agent
//! is gone, and that no VM's record names, unless the operator discards
//! those VMs with `force`.

use super::etcd::{Cmp, Op, Txn};
use super::node::{Node, NodeError};
use super::records::{vm_key, VmRecord};
use serde::{Deserialize, Serialize};

/// The answer of `DELETE /v1/nodes/{name}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemovedNode {
    /// The node taken out.
    pub name: String,
    /// VMs whose records named it, deleted with `force`: they ran nowhere
    /// (its lease had expired and none was restarted elsewhere).
    #[serde(default)]
    pub discarded_vms: Vec<String>,
    /// What the operator does next.
    pub note: String,
}

/// Most VM names an error lists.
const LISTED: usize = 10;

/// Records deleted per transaction (etcd takes at most 128 operations).
const CHUNK: usize = 100;

fn changed(name: &str) -> NodeError {
    NodeError::Conflict(format!(
        "node {name} or its VMs' records changed meanwhile; try again"
    ))
}

impl Node {
    /// Removes node `name` from the cluster's store: refused while its
    /// agent holds a lease, and while VM records name it (as their node or
    /// a migration's target) unless `force` deletes those records.
    pub async fn remove_node(&self, name: &str, force: bool) -> Result<RemovedNode, NodeError> {
        let live = self.store_for("removing a node")?;
        if !super::node::valid_name(name) {
            return Err(NodeError::BadRequest(format!(
                "node name {name:?} is invalid"
            )));
        }
        if name == self.name() {
            return Err(NodeError::Conflict(format!(
                "node {name} cannot remove itself: stop its agent, then remove it from another node"
            )));
        }
        let (etcd, prefix) = (live.etcd(), live.prefix());
        let unavailable = |e| NodeError::Unavailable(format!("the cluster's store: {e}"));
        let alive_key = format!("{prefix}alive/{name}").into_bytes();
        let node_key = format!("{prefix}nodes/{name}").into_bytes();
        if let Some(kv) = etcd.get(&alive_key).await.map_err(unavailable)? {
            return Err(NodeError::Conflict(format!(
                "node {name} is alive (lease {:x}): stop its agent first (`ferry agent stop --node {name}`)",
                kv.lease
            )));
        }
        let Some(registered) = etcd.get(&node_key).await.map_err(unavailable)? else {
            return Err(NodeError::NotFound(format!(
                "node {name} is not registered in the cluster's store"
            )));
        };
        let (kvs, _) = etcd
            .list(format!("{prefix}vms/").as_bytes())
            .await
            .map_err(unavailable)?;
        let mut named = Vec::new();
        for kv in &kvs {
            let Ok(r) = super::mirror::parse_json::<VmRecord>(&kv.value) else {
                continue;
            };
            if r.node == name || r.migrating_to.as_deref() == Some(name) {
                named.push((r.spec.name, kv.mod_revision));
            }
        }
        if !named.is_empty() && !force {
            let list: Vec<&str> = named.iter().take(LISTED).map(|(n, _)| n.as_str()).collect();
            return Err(NodeError::Conflict(format!(
                "{} VM record(s) still name node {name} ({}{}): wait for their restart elsewhere, or remove with force to discard them",
                named.len(),
                list.join(", "),
                if named.len() > LISTED { ", ..." } else { "" }
            )));
        }
        // Only if nothing changed since: the node still holds no lease and
        // each discarded record is as read (in chunks etcd takes whole).
        for chunk in named.chunks(CHUNK) {
            let mut txn = Txn::new().when(Cmp::absent(&alive_key));
            for (vm, rev) in chunk {
                let key = vm_key(prefix, vm);
                txn = txn
                    .when(Cmp::modified_at(&key, *rev))
                    .then(Op::delete(&key));
            }
            if !etcd.txn(&txn).await.map_err(unavailable)?.succeeded {
                return Err(changed(name));
            }
        }
        let txn = Txn::new()
            .when(Cmp::absent(&alive_key))
            .when(Cmp::modified_at(&node_key, registered.mod_revision))
            .then(Op::delete(&node_key))
            .then(Op::delete(format!("{prefix}state/{name}").as_bytes()));
        if !etcd.txn(&txn).await.map_err(unavailable)?.succeeded {
            return Err(changed(name));
        }
        let discarded_vms: Vec<String> = named.into_iter().map(|(n, _)| n).collect();
        if !discarded_vms.is_empty() {
            tracing::warn!(node = %name, vms = ?discarded_vms, "node removed with force: these VMs' records are discarded");
        }
        tracing::warn!(node = %name, "node removed from the cluster");
        Ok(RemovedNode {
            name: name.to_string(),
            discarded_vms,
            note: format!(
                "remove node {name}'s [[node]] entry from the cluster file too: an agent started with it registers the node again"
            ),
        })
    }
}
