//! What outlives an agent's restart, with a real etcd: its migration
//! records, its operation journals (so `resume --failback` after a restart
//! brings back what the drain before it moved) and an operator's pause.

use crate::common;

use common::agents::Agents;
use common::etcd::{available, EtcdCluster};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

fn names(v: &Value, field: &str) -> Vec<String> {
    let mut out: Vec<String> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x[field].as_str().unwrap().to_string())
        .collect();
    out.sort();
    out
}

#[test]
fn a_restarted_agent_keeps_its_records_its_drain_and_its_pause() {
    if !available() {
        return;
    }
    let _serial = common::serial();
    let test = "durable-records";
    let e = EtcdCluster::start(test, 1);
    let top = format!(
        "etcd = [\"{}\"]\netcd_prefix = \"/{test}/\"",
        e.endpoints()[0]
    );
    let mut c = Agents::start_with(test, &top, &[("a", ""), ("b", "")]).unwrap();
    for name in ["vm1", "vm2"] {
        let (s, v) = c.call(
            Method::POST,
            "a",
            "/v1/vms",
            Some(json!({"name": name, "memory": "32MiB", "workload": "hot:2MiB", "dirty_rate": "5MB/s"})),
        );
        assert_eq!(s, StatusCode::CREATED, "{v}");
    }
    let (s, op) = c.call(Method::POST, "a", "/v1/node/drain", None);
    assert_eq!(s, StatusCode::ACCEPTED, "{op}");
    let drain = c.wait_op("a", op["id"].as_str().unwrap());
    assert_eq!(drain["state"], "completed", "{drain}");
    let (_, before) = c.call(Method::GET, "a", "/v1/migrations", None);
    assert_eq!(before.as_array().unwrap().len(), 2, "{before}");

    c.restart("a");

    // The operator's pause, the drain and its migrations are all still there.
    let (_, node) = c.call(Method::GET, "a", "/v1/node", None);
    assert_eq!(node["state"], "paused", "{node}");
    let (_, ops) = c.call(Method::GET, "a", "/v1/operations", None);
    assert_eq!(ops.as_array().unwrap().len(), 1, "{ops}");
    assert_eq!(ops[0]["id"], drain["id"]);
    assert_eq!(ops[0]["state"], "completed");
    assert_eq!(ops[0]["steps"], drain["steps"]);
    let (_, after) = c.call(Method::GET, "a", "/v1/migrations", None);
    assert_eq!(names(&after, "id"), names(&before, "id"));
    for m in after.as_array().unwrap() {
        assert_eq!(m["state"], "completed", "{m}");
        assert_eq!(m["report"]["verified"], true, "{m}");
        let (s, one) = c.call(
            Method::GET,
            "a",
            &format!("/v1/migrations/{}", m["id"].as_str().unwrap()),
            None,
        );
        assert_eq!(s, StatusCode::OK, "{one}");
    }
    // b's side of each migration is recorded too.
    let etcd = e.client();
    let (kvs, _) =
        e.rt.block_on(etcd.list(format!("/{test}/migrations/b/").as_bytes()))
            .unwrap();
    assert_eq!(kvs.len(), 2);

    // Failback after the restart brings back what the drain before it moved.
    let (s, op) = c.call(
        Method::POST,
        "a",
        "/v1/node/resume",
        Some(json!({"failback": true})),
    );
    assert_eq!(s, StatusCode::ACCEPTED, "{op}");
    let resumed = c.wait_op("a", op["id"].as_str().unwrap());
    assert_eq!(resumed["state"], "completed", "{resumed}");
    assert_ne!(resumed["id"], drain["id"]);
    let (_, vms) = c.call(Method::GET, "a", "/v1/vms", None);
    assert_eq!(names(&vms, "name"), ["vm1", "vm2"]);

    // Resumed is remembered too: a restart leaves the node active.
    c.restart("a");
    let (_, node) = c.call(Method::GET, "a", "/v1/node", None);
    assert_eq!(node["state"], "active", "{node}");
}

/// A superseded copy read back from disk at start never runs here, and its
/// VM is not left down: the restarted agent marks its record for a restart
/// away from this node, and the cluster starts it on another.
#[test]
fn a_superseded_copy_read_back_at_start_has_its_vm_started_elsewhere() {
    if !available() {
        return;
    }
    let _serial = common::serial();
    let test = "durable-superseded";
    let e = EtcdCluster::start(test, 1);
    let top = format!(
        "etcd = [\"{}\"]\netcd_prefix = \"/{test}/\"",
        e.endpoints()[0]
    );
    let mut c = Agents::start_with(test, &top, &[("a", ""), ("b", "")]).unwrap();
    let (s, v) = c.call(
        Method::POST,
        "a",
        "/v1/vms",
        Some(json!({"name": "web", "memory": "32MiB"})),
    );
    assert_eq!(s, StatusCode::CREATED, "{v}");
    // web's copy on a's disk, superseded, as a lapsed lease leaves it.
    let guest = c.agent("a").node.guest("web").unwrap();
    guest.pause();
    let dir = c.file.parent().unwrap().join("state/a/guests");
    std::fs::create_dir_all(&dir).unwrap();
    ferry::migration::saved::save_guest(&*guest, &dir.join("web.guest")).unwrap();
    let meta = json!({"version": 1, "spec": v, "state": "superseded"});
    std::fs::write(dir.join("web.json"), meta.to_string()).unwrap();
    drop(guest);
    c.restart("a");
    let (_, on_a) = c.call(Method::GET, "a", "/v1/vms/web", None);
    assert_eq!(on_a["state"], "superseded", "{on_a}");
    let end = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (s, on_b) = c.call(Method::GET, "b", "/v1/vms/web", None);
        if s == StatusCode::OK && on_b["state"] == "running" {
            break;
        }
        assert!(
            std::time::Instant::now() < end,
            "web never ran on b: {on_b}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let (_, on_a) = c.call(Method::GET, "a", "/v1/vms/web", None);
    assert_eq!(on_a["state"], "superseded", "{on_a}");
}

#[test]
fn a_vm_whose_record_is_invalid_stays_put_and_the_error_says_why() {
    if !available() {
        return;
    }
    let _serial = common::serial();
    let test = "durable-invalid";
    let e = EtcdCluster::start(test, 1);
    let top = format!(
        "etcd = [\"{}\"]\netcd_prefix = \"/{test}/\"",
        e.endpoints()[0]
    );
    let c = Agents::start_with(test, &top, &[("a", ""), ("b", "")]).unwrap();
    let (s, v) = c.call(
        Method::POST,
        "a",
        "/v1/vms",
        Some(json!({"name": "vm1", "memory": "8MiB"})),
    );
    assert_eq!(s, StatusCode::CREATED, "{v}");
    // Someone writes nonsense over its record.
    let key = ferry::agent::records::vm_key(&format!("/{test}/"), "vm1");
    e.rt.block_on(e.client().put(&key, b"{\"version\": 1, \"node\": 7}", None))
        .unwrap();
    let (s, m) = c.call(
        Method::POST,
        "a",
        "/v1/migrations",
        Some(json!({"vm": "vm1", "target": "b"})),
    );
    let failed = if s == StatusCode::ACCEPTED {
        c.wait("a", m["id"].as_str().unwrap())
    } else {
        m
    };
    let text = failed.to_string();
    assert!(
        text.contains("invalid") || text.contains("not a valid"),
        "{text}"
    );
    // It runs where it ran, and only there.
    let (_, v) = c.call(Method::GET, "a", "/v1/vms/vm1", None);
    assert_eq!(v["state"], "running", "{v}");
    let (s, _) = c.call(Method::GET, "b", "/v1/vms/vm1", None);
    assert_eq!(s, StatusCode::NOT_FOUND);
}
