//! The cluster's nodes: those of the cluster file and those that joined by
//! registering in etcd alone (`ferry agent --node NAME --control ADDR
//! --data ADDR --memory-capacity SIZE`). A node's registration, written by
//! its own agent, gives its live addresses and capacity, and the API
//! certificate of a node the file does not pin; the file's entry gives the
//! rest (hooks, limits), which only the node's own agent uses.

use super::cluster::{check_address, Cluster, NodeSpec, MAX_NODE_MEMORY};
use super::etcd::{Etcd, EtcdError};
use super::mirror::decode_node;
use super::node::Node;
use super::store::NodeRecord;
use std::collections::BTreeMap;

/// The largest API certificate a registration may hold, base64.
const MAX_CERT: usize = 16 << 10;

/// Checks a registration read from etcd, as API input is checked.
pub fn check_record(r: &NodeRecord) -> Result<(), String> {
    if !super::node::valid_name(&r.name) {
        return Err(format!("node name {:?} is not a valid name", r.name));
    }
    for (field, addr) in [("control", &r.control), ("data", &r.data)] {
        check_address(addr).map_err(|why| format!("{field} {addr:?}: {why}"))?;
    }
    if r.memory_capacity == 0 || r.memory_capacity > MAX_NODE_MEMORY {
        return Err(format!(
            "memory_capacity {} is out of range (1 byte to 1 PiB)",
            r.memory_capacity
        ));
    }
    if r.api_cert.as_ref().is_some_and(|c| c.len() > MAX_CERT) {
        return Err(format!("api_cert is over {MAX_CERT} bytes"));
    }
    Ok(())
}

/// Node `r` as the others reach it: `file`'s entry (if any) with the
/// registration's addresses and capacity; the certificate the file pins,
/// or else the registration's. `None` when it cannot be reached safely: a
/// cluster whose API is HTTPS and a node with no certificate to pin.
pub fn spec_of(r: &NodeRecord, file: Option<&NodeSpec>, cluster: &Cluster) -> Option<NodeSpec> {
    use base64::Engine;
    let cert = r
        .api_cert
        .as_ref()
        .and_then(|c| base64::engine::general_purpose::STANDARD.decode(c).ok());
    // An operator's pin in the file outranks what etcd holds.
    let api_cert = match (file.and_then(|f| f.api_cert.clone()), cert) {
        (Some(c), _) | (None, Some(c)) => Some(c),
        (None, None) if cluster.insecure_api => None,
        (None, None) => return None,
    };
    let mut spec = file.cloned().unwrap_or_else(|| NodeSpec {
        name: r.name.clone(),
        control: String::new(),
        data: String::new(),
        memory_capacity: 0,
        max_concurrent_migrations: super::cluster::DEFAULT_MAX_CONCURRENT_MIGRATIONS,
        auto_concurrency: false,
        max_bandwidth: None,
        codec: Default::default(),
        dense: true,
        kin_bases: true,
        update_hook: None,
        preview_hook: None,
        api_cert: None,
        api_key_file: None,
        state_dir: std::path::PathBuf::new(),
        failback_retention: 0,
        failback_retention_dir: std::path::PathBuf::new(),
    });
    spec.control = r.control.clone();
    spec.data = r.data.clone();
    spec.memory_capacity = r.memory_capacity;
    spec.api_cert = api_cert;
    Some(spec)
}

/// The file's nodes and `records`' (checked as [`decode_node`] does)
/// merged, in the file's order and then by name.
pub fn merge(cluster: &Cluster, records: &BTreeMap<String, NodeRecord>) -> Vec<NodeSpec> {
    let mut out: Vec<NodeSpec> = cluster
        .nodes
        .iter()
        .map(|n| {
            records
                .get(&n.name)
                .and_then(|r| spec_of(r, Some(n), cluster))
                .unwrap_or_else(|| n.clone())
        })
        .collect();
    for (name, r) in records {
        if cluster.node(name).is_none() {
            out.extend(spec_of(r, None, cluster));
        }
    }
    out
}

/// The cluster's nodes as `etcd` registers them, merged with the file's
/// (for the CLI, which has no mirror).
pub async fn read(
    cluster: &Cluster,
    etcd: &Etcd,
    prefix: &str,
) -> Result<Vec<NodeSpec>, EtcdError> {
    let dir = format!("{prefix}nodes/");
    let (kvs, _) = etcd.list(dir.as_bytes()).await?;
    let mut records = BTreeMap::new();
    for kv in kvs {
        // etcd answers keys under the prefix; a server that does not is
        // not trusted with an index.
        let Some(name) = kv.key.strip_prefix(dir.as_bytes()) else {
            continue;
        };
        let name = String::from_utf8_lossy(name).into_owned();
        match decode_node(&kv.value, &name) {
            Ok(r) => {
                records.insert(name, r);
            }
            Err(e) => tracing::warn!(node = %name, error = %e, "ignoring a bad node registration"),
        }
    }
    Ok(merge(cluster, &records))
}

impl Node {
    /// Every node of the cluster, this one included: the file's and those
    /// registered in etcd, as last read.
    pub(crate) fn members(&self) -> Vec<NodeSpec> {
        let records = self.mirror.get().map(|m| m.nodes()).unwrap_or_default();
        let mut all = merge(&self.cluster, &records);
        // This node as its own agent runs it.
        if let Some(me) = all.iter_mut().find(|n| n.name == self.spec.name) {
            *me = self.spec.clone();
        }
        all
    }

    /// Node `name` of [`Node::members`].
    pub(crate) fn member(&self, name: &str) -> Option<NodeSpec> {
        self.members().into_iter().find(|n| n.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str, control: &str, memory: u64) -> NodeRecord {
        NodeRecord {
            version: 1,
            name: name.into(),
            control: control.into(),
            data: "10.0.0.1:7512".into(),
            memory_capacity: memory,
            lease: 0,
            api_cert: None,
        }
    }

    #[test]
    fn a_registration_is_checked_as_a_cluster_file_entry_is() {
        assert_eq!(check_record(&record("d", "10.0.0.1:7411", 1 << 30)), Ok(()));
        for (r, field) in [
            (record("../d", "10.0.0.1:7411", 1 << 30), "name"),
            (record("d", "10.0.0.1", 1 << 30), "control"),
            (record("d", "10.0.0.1:7411", 0), "memory_capacity"),
            (
                record("d", "10.0.0.1:7411", MAX_NODE_MEMORY + 1),
                "memory_capacity",
            ),
        ] {
            let e = check_record(&r).unwrap_err();
            assert!(e.contains(field), "{e}");
        }
        let mut big = record("d", "10.0.0.1:7411", 1 << 30);
        big.api_cert = Some("A".repeat(MAX_CERT + 1));
        assert!(check_record(&big).unwrap_err().contains("api_cert"));
    }
}
