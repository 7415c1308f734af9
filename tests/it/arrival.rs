//! A VM deleted on its target the moment its migration ends, with the
//! target's claim of the record and the source's write of the hand-off
//! still on their way: the guest goes with its record, and the name is free
//! again; it never runs on with no record, nor leaves a record naming a
//! node that has no guest.

use crate::common;

use common::agents::Agents;
use reqwest::{Method, StatusCode};
use serde_json::json;
use std::time::{Duration, Instant};

/// Creates a small writing VM `name` on node `on`.
fn create(c: &Agents, on: &str, name: &str) {
    let (s, v) = c.call(
        Method::POST,
        on,
        "/v1/vms",
        Some(json!({"name": name, "memory": "16MiB", "workload": "hot:4MiB", "dirty_rate": "10MB/s"})),
    );
    assert_eq!(s, StatusCode::CREATED, "{v}");
}

/// Deletes VM `name` on node `on` at once: a 409 while the node still
/// settles its arrival, then 200; the guest is gone from the node, and so
/// is its record (the answer does not say it goes in the background).
fn delete_at_once(c: &Agents, on: &str, name: &str) {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let (s, v) = c.call(Method::DELETE, on, &format!("/v1/vms/{name}"), None);
        if s == StatusCode::OK {
            assert!(v.get("record").is_none(), "{v}");
            break;
        }
        assert_eq!(s, StatusCode::CONFLICT, "{v}");
        assert!(Instant::now() < end, "never deleted: {v}");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(c.agent(on).node.guest(name).is_none());
}

#[test]
fn a_vm_deleted_as_it_arrives_goes_with_its_record() {
    let _serial = common::serial();
    let Some(c) = Agents::start("arrival", &[("a", ""), ("b", "")]) else {
        return;
    };
    for round in 0..6 {
        let name = format!("vm{round}");
        create(&c, "a", &name);
        let (s, m) = c.call(
            Method::POST,
            "a",
            "/v1/migrations",
            Some(json!({"vm": name, "target": "b"})),
        );
        assert_eq!(s, StatusCode::ACCEPTED, "{m}");
        let id = m["id"].as_str().unwrap().to_string();
        let done = c.wait("a", &id);
        assert_eq!(done["state"], "completed", "{done}");
        delete_at_once(&c, "b", &name);
        // The name is free again as soon as DELETE answers.
        let (s, v) = c.call(
            Method::POST,
            "a",
            "/v1/vms",
            Some(json!({"name": name, "memory": "16MiB", "workload": "idle"})),
        );
        assert_eq!(s, StatusCode::CREATED, "{v}");
        let (s, v) = c.call(Method::GET, "b", &format!("/v1/vms/{name}"), None);
        assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    }
}

/// The same after a drain: each VM deleted where the drain moved it, at
/// once, then the drained node resumed and the names used again there.
#[test]
fn vms_deleted_as_a_drain_lands_them_go_with_their_records() {
    let _serial = common::serial();
    let Some(c) = Agents::start("arrival-drain", &[("a", ""), ("b", ""), ("c", "")]) else {
        return;
    };
    let names = ["d1", "d2", "d3", "d4"];
    for _ in 0..3 {
        for name in names {
            create(&c, "a", name);
        }
        let (s, op) = c.call(Method::POST, "a", "/v1/node/drain", None);
        assert_eq!(s, StatusCode::ACCEPTED, "{op}");
        let done = c.wait_op("a", op["id"].as_str().unwrap());
        assert_eq!(done["state"], "completed", "{done}");
        for step in done["steps"].as_array().unwrap() {
            let (name, on) = (
                step["vm"].as_str().unwrap(),
                step["target"].as_str().unwrap(),
            );
            delete_at_once(&c, on, name);
        }
        let (s, v) = c.call(
            Method::POST,
            "a",
            "/v1/node/resume",
            Some(json!({"failback": false})),
        );
        assert!(s.is_success(), "{v}");
        let resumed = c.wait_op("a", v["id"].as_str().unwrap());
        assert_eq!(resumed["state"], "completed", "{resumed}");
        // The names are free again: the next round creates them on a.
    }
}
