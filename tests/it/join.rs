//! A node that joins by registering in etcd alone (`ferry agent --node c
//! --control ADDR --data ADDR --memory-capacity SIZE --tls-cert --tls-key`,
//! no `[[node]]` entry): the other agents and the CLI find it there, pin
//! its certificate, migrate VMs to it and from it, drain onto it; stopped,
//! `ferry node remove` takes it out for good.

use crate::common;

use common::etcd::{available, EtcdCluster};
use common::procs::Procs;
use serde_json::Value;
use std::time::Duration;

fn names(v: &Value) -> Vec<String> {
    let mut out: Vec<String> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap().to_string())
        .collect();
    out.sort();
    out
}

#[test]
fn a_node_without_an_entry_joins_by_its_flags_takes_vms_and_leaves_for_good() {
    if !available() {
        return;
    }
    let _serial = common::serial();
    let test = "join";
    let e = EtcdCluster::start(test, 1);
    let top = format!(
        "etcd = [\"{}\"]\netcd_prefix = \"/{test}/\"\nlease_ttl = \"3s\"\n[defaults]\nupdate_hook = [\"sh\", \"-c\"]",
        e.endpoints()[0]
    );
    let mut p = Procs::start_with(test, &top, &[("a", "1GiB"), ("b", "1GiB")]).unwrap();
    // Without its addresses a node the file does not name cannot start.
    let out = p.run(&["agent", "--node", "c"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--control"),
        "{out:?}"
    );
    p.join("c", "1GiB");
    // The CLI finds it through etcd, over HTTPS pinned to its certificate.
    let status = p.json(&["node", "status"]);
    assert_eq!(names(&status), ["a", "b", "c"], "{status}");
    let c = status
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "c")
        .unwrap();
    assert_eq!(c["memory_capacity"], 1u64 << 30, "{c}");
    // CAU's analyzer learns the joined node's update hook from its agent.
    let out = p.run(&["cluster", "update", "--analyze", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let hook = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == "node c update_hook")
        .unwrap_or_else(|| panic!("{report}"));
    assert_eq!(hook["ok"], true, "{hook}");
    // A VM made there moves to a, and back: a's agent reaches c from its
    // copy of etcd.
    p.json(&["vm", "create", "web", "--node", "c", "--memory", "16MiB"]);
    for to in ["a", "c"] {
        let m = p.json(&["migrate", "web", "--to", to]);
        assert_eq!(m["state"], "completed", "{m}");
        let vms = p.vms();
        assert_eq!(
            vms,
            [("web".into(), to.into(), "running".into())],
            "{vms:?}"
        );
    }
    // A drain of b counts c among its targets.
    p.json(&["vm", "create", "big", "--node", "b", "--memory", "700MiB"]);
    p.json(&["vm", "create", "web2", "--node", "a", "--memory", "700MiB"]);
    let d = p.json(&["node", "drain", "b"]);
    assert_eq!(d["state"], "completed", "{d}");
    assert_eq!(d["steps"][0]["target"], "c", "a has no room: {d}");
    p.json(&["node", "resume", "b"]);
    // Stopped, it drains; then it leaves the cluster for good.
    p.signal("c", "-TERM");
    p.exited("c", Duration::from_secs(30))
        .expect("c stops once empty");
    let vms = p.vms();
    assert!(
        vms.iter().all(|(_, n, s)| n != "c" && s == "running"),
        "{vms:?}"
    );
    let removed = p.json(&["node", "remove", "c"]);
    assert_eq!(removed["name"], "c", "{removed}");
    assert_eq!(names(&p.json(&["node", "status"])), ["a", "b"]);
    drop(e);
}
