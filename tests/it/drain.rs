//! Drain and resume with three real agents on loopback: every VM moves to the
//! other nodes within the concurrency limit and comes back with failback; a
//! drain the other nodes cannot hold is refused before anything moves; a
//! cancelled drain leaves every guest running somewhere, none lost.

use crate::common;

use common::agents::{error_of, Agents};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// Creates `n` VMs `vm1..` of `memory` on `node`, dirtying a hot set.
fn create_vms(c: &Agents, node: &str, n: usize, memory: &str) {
    for i in 1..=n {
        let (s, v) = c.call(
            Method::POST,
            node,
            "/v1/vms",
            Some(json!({"name": format!("vm{i}"), "memory": memory, "workload": "hot:4MiB", "dirty_rate": "10MB/s"})),
        );
        assert_eq!(s, StatusCode::CREATED, "{v}");
    }
}

fn vm_names(c: &Agents, node: &str) -> Vec<String> {
    let (_, vms) = c.call(Method::GET, node, "/v1/vms", None);
    vms.as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect()
}

/// The VMs on `node` once no session into it is still ending: a cancelled
/// migration's copy on its target (`migrating-in`, never run) goes when
/// that session reads the source's ABORT, a moment after the source has
/// settled. At most 10 s.
fn settled_vm_names(c: &Agents, node: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, vms) = c.call(Method::GET, node, "/v1/vms", None);
        let vms = vms.as_array().unwrap();
        let arriving = vms.iter().any(|v| v["state"] == "migrating-in");
        if !arriving || Instant::now() > deadline {
            return vms
                .iter()
                .map(|v| v["name"].as_str().unwrap().to_string())
                .collect();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The most migrations of `node`'s records whose [start, end) overlap.
fn max_overlap(migrations: &[Value]) -> usize {
    let spans: Vec<(u64, u64)> = migrations
        .iter()
        .filter_map(|m| Some((m["started_at_ms"].as_u64()?, m["finished_at_ms"].as_u64()?)))
        .collect();
    spans
        .iter()
        .map(|&(s, _)| spans.iter().filter(|&&(a, b)| a <= s && s < b).count())
        .max()
        .unwrap_or(0)
}

#[test]
fn a_drain_moves_every_vm_within_the_limit_and_failback_brings_them_home() {
    let _serial = common::serial();
    let Some(c) = Agents::start("drain", &[("a", ""), ("b", ""), ("c", "")]) else {
        return;
    };
    create_vms(&c, "a", 5, "48MiB");
    let (s, op) = c.call(Method::POST, "a", "/v1/node/drain", None);
    assert_eq!(s, StatusCode::ACCEPTED, "{op}");
    assert_eq!(op["kind"], "drain");
    let (_, node) = c.call(Method::GET, "a", "/v1/node", None);
    assert!(
        node["state"] == "draining" || node["state"] == "paused",
        "{node}"
    );
    let done = c.wait_op("a", op["id"].as_str().unwrap());
    assert_eq!(done["state"], "completed", "{done}");
    assert_eq!(done["steps"].as_array().unwrap().len(), 5);

    // A is paused and empty; B and C hold the five, spread between them.
    let (_, node) = c.call(Method::GET, "a", "/v1/node", None);
    assert_eq!(node["state"], "paused");
    assert!(vm_names(&c, "a").is_empty());
    let (on_b, on_c) = (vm_names(&c, "b"), vm_names(&c, "c"));
    assert_eq!(on_b.len() + on_c.len(), 5, "b {on_b:?} c {on_c:?}");
    assert!(
        !on_b.is_empty() && !on_c.is_empty(),
        "spread: b {on_b:?} c {on_c:?}"
    );
    // A's own records: all five completed and verified, never more than 2 at once.
    let (_, list) = c.call(Method::GET, "a", "/v1/migrations", None);
    let list = list.as_array().unwrap().clone();
    assert_eq!(list.len(), 5);
    for m in &list {
        assert_eq!(m["state"], "completed", "{m}");
        assert_eq!(m["operation"], done["id"]);
        assert_eq!(m["report"]["verified"], true, "{m}");
    }
    let overlap = max_overlap(&list);
    assert!((1..=2).contains(&overlap), "{overlap} at once");
    // A paused node takes no VMs.
    let (s, v) = c.call(
        Method::POST,
        "a",
        "/v1/vms",
        Some(json!({"name": "late", "memory": "16MiB"})),
    );
    assert_eq!(s, StatusCode::CONFLICT, "{v}");

    // Resume with failback: the same five come back, and A takes VMs again.
    let (s, op) = c.call(
        Method::POST,
        "a",
        "/v1/node/resume",
        Some(json!({"failback": true})),
    );
    assert_eq!(s, StatusCode::ACCEPTED, "{op}");
    let done = c.wait_op("a", op["id"].as_str().unwrap());
    assert_eq!(done["state"], "completed", "{done}");
    let mut home = vm_names(&c, "a");
    home.sort();
    assert_eq!(home, ["vm1", "vm2", "vm3", "vm4", "vm5"]);
    assert!(vm_names(&c, "b").is_empty() && vm_names(&c, "c").is_empty());
    let (_, node) = c.call(Method::GET, "a", "/v1/node", None);
    assert_eq!(node["state"], "active");
    for name in &home {
        let (_, v) = c.call(Method::GET, "a", &format!("/v1/vms/{name}"), None);
        assert_eq!(v["state"], "running", "{v}");
        assert_eq!(v["workload"], "hot:4MiB", "{v}");
    }
    let (_, ops) = c.call(Method::GET, "a", "/v1/operations", None);
    let kinds: Vec<&str> = ops
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["drain", "resume"]);
}

#[test]
fn a_drain_the_other_nodes_cannot_hold_is_refused_before_anything_moves() {
    let _serial = common::serial();
    let Some(c) = Agents::start(
        "refused",
        &[
            ("a", ""),
            ("b", "memory_capacity = \"100MiB\""),
            ("c", "memory_capacity = \"100MiB\""),
        ],
    ) else {
        return;
    };
    create_vms(&c, "a", 5, "48MiB");
    let (s, v) = c.call(
        Method::POST,
        "a",
        "/v1/node/drain",
        Some(json!({"max_concurrent": 2})),
    );
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    let (code, msg) = error_of(&v);
    assert_eq!(code, "insufficient_memory");
    assert!(msg.contains("cannot hold 1 of its VMs"), "{msg}");
    assert!(
        msg.contains("b 4 MiB free") || msg.contains("MiB free"),
        "{msg}"
    );
    assert_eq!(vm_names(&c, "a").len(), 5, "nothing moved");
    let (_, node) = c.call(Method::GET, "a", "/v1/node", None);
    assert_eq!(node["state"], "active");
    let (_, list) = c.call(Method::GET, "a", "/v1/migrations", None);
    assert!(list.as_array().unwrap().is_empty());
    // Its plan, asked through another agent, says the same and changes
    // nothing: four move, one (48 MiB) fits nowhere.
    let (s, plan) = c.call(
        Method::POST,
        "b",
        "/v1/nodes/a/drain",
        Some(json!({"dry_run": true, "max_concurrent": 2})),
    );
    assert!(s.is_success(), "{plan}");
    assert_eq!(plan["refused"], true, "{plan}");
    assert_eq!(plan["max_concurrent"], 2, "{plan}");
    assert_eq!(plan["moves"].as_array().unwrap().len(), 4, "{plan}");
    assert_eq!(plan["unplaced"].as_array().unwrap().len(), 1, "{plan}");
    assert_eq!(plan["shortfall"], 48u64 << 20, "{plan}");
    assert_eq!(plan["room"].as_array().unwrap().len(), 2, "{plan}");
    let (_, node) = c.call(Method::GET, "a", "/v1/node", None);
    assert_eq!(node["state"], "active", "a plan changes nothing");
    // Told to move what fits, it moves four and names the fifth.
    let (s, op) = c.call(
        Method::POST,
        "a",
        "/v1/node/drain",
        Some(json!({"allow_partial": true})),
    );
    assert_eq!(s, StatusCode::ACCEPTED, "{op}");
    let done = c.wait_op("a", op["id"].as_str().unwrap());
    // It is partial, not completed: a VM is still on the node.
    assert_eq!(done["state"], "partial", "{done}");
    assert_eq!(done["remaining"].as_array().unwrap().len(), 1, "{done}");
    let skipped: Vec<&Value> = done["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["state"] == "skipped")
        .collect();
    assert_eq!(skipped.len(), 1, "{done}");
    assert_eq!(
        skipped[0]["vm"], plan["unplaced"][0]["vm"],
        "the plan named the VM left behind"
    );
    assert_eq!(vm_names(&c, "a").len(), 1);
    assert_eq!(vm_names(&c, "b").len() + vm_names(&c, "c").len(), 4);
}

#[test]
fn a_cancelled_drain_stops_where_it_is_and_loses_nothing() {
    let _serial = common::serial();
    // A's outgoing migrations share 10 MB/s: each 48 MiB VM (about 10 MB
    // compressed) takes a second or more.
    let Some(c) = Agents::start(
        "cancel",
        &[("a", "max_bandwidth = \"10MB/s\""), ("b", ""), ("c", "")],
    ) else {
        return;
    };
    create_vms(&c, "a", 5, "48MiB");
    let (s, op) = c.call(
        Method::POST,
        "a",
        "/v1/node/drain",
        Some(json!({"max_concurrent": 1})),
    );
    assert_eq!(s, StatusCode::ACCEPTED, "{op}");
    let id = op["id"].as_str().unwrap().to_string();
    // Wait until the first migration moves memory, then cancel.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, list) = c.call(Method::GET, "a", "/v1/migrations", None);
        if list
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["state"] == "running")
        {
            break;
        }
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    let (s, v) = c.call(Method::DELETE, "a", &format!("/v1/operations/{id}"), None);
    assert_eq!(s, StatusCode::OK, "{v}");
    let done = c.wait_op("a", &id);
    assert_eq!(done["state"], "cancelled", "{done}");
    let steps = done["steps"].as_array().unwrap();
    let cancelled = steps.iter().filter(|s| s["state"] == "cancelled").count();
    assert_eq!(
        cancelled, 5,
        "the one in flight and the four not started: {done}"
    );
    // Every VM runs, on a, in one place only; the node stays paused.
    let on_a = vm_names(&c, "a");
    assert_eq!(on_a.len(), 5, "{on_a:?}");
    let elsewhere = [settled_vm_names(&c, "b"), settled_vm_names(&c, "c")];
    assert!(elsewhere.iter().all(Vec::is_empty), "{elsewhere:?}");
    for name in &on_a {
        let (_, v) = c.call(Method::GET, "a", &format!("/v1/vms/{name}"), None);
        assert_eq!(v["state"], "running", "{v}");
    }
    let (_, node) = c.call(Method::GET, "a", "/v1/node", None);
    assert_eq!(node["state"], "paused");
    let (s, _) = c.call(Method::DELETE, "a", &format!("/v1/operations/{id}"), None);
    assert_eq!(s, StatusCode::CONFLICT, "an ended operation");
    // The drain can be taken up again from the paused node, one at a time;
    // cancelled again, every VM still runs in exactly one place.
    let (s, op) = c.call(
        Method::POST,
        "a",
        "/v1/node/drain",
        Some(json!({"max_concurrent": 2})),
    );
    assert_eq!(s, StatusCode::ACCEPTED, "{op}");
    let (s, v) = c.call(Method::POST, "a", "/v1/node/drain", None);
    assert_eq!(s, StatusCode::CONFLICT, "one drain at a time: {v}");
    std::thread::sleep(Duration::from_millis(300));
    let id = op["id"].as_str().unwrap();
    c.call(Method::DELETE, "a", &format!("/v1/operations/{id}"), None);
    let done = c.wait_op("a", id);
    assert_ne!(done["state"], "running");
    let mut all: Vec<String> = ["a", "b", "c"]
        .iter()
        .flat_map(|n| settled_vm_names(&c, n))
        .collect();
    all.sort();
    assert_eq!(all, ["vm1", "vm2", "vm3", "vm4", "vm5"], "each VM once");
}

/// Once a stopping agent has marked its operations interrupted, it starts
/// no other: a resume or drain asked in that moment would be cut off by
/// the exit and read back by the next process as a crash. It answers 503,
/// and the asker (a rolling update) asks the next process.
#[test]
fn a_stopping_agent_starts_no_operation_after_marking_its_own_interrupted() {
    let _serial = common::serial();
    let Some(c) = Agents::start("closing", &[("a", ""), ("b", "")]) else {
        return;
    };
    let node = c.agent("a").node.clone();
    c.rt.block_on(node.close_operations());
    for (path, body) in [
        ("/v1/node/resume", json!({"failback": true})),
        ("/v1/node/drain", json!({})),
    ] {
        let (s, v) = c.call(Method::POST, "a", path, Some(body));
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{path}: {v}");
        assert!(v.to_string().contains("is stopping"), "{path}: {v}");
    }
    let (_, ops) = c.call(Method::GET, "a", "/v1/operations", None);
    assert_eq!(ops.as_array().map(Vec::len), Some(0), "{ops}");
}

#[test]
fn an_auto_drain_chooses_from_the_link_and_the_writers_and_says_why() {
    let _serial = common::serial();
    // A's link carries 30 MB/s; its VMs write 10 MB/s each: two at once
    // would leave each 15 MB/s, under twice 10.
    let Some(c) = Agents::start(
        "auto",
        &[("a", "max_bandwidth = \"30MB/s\""), ("b", ""), ("c", "")],
    ) else {
        return;
    };
    create_vms(&c, "a", 3, "16MiB");
    for bad in [json!("fast"), json!(0), json!(65), json!(-1)] {
        let (s, v) = c.call(
            Method::POST,
            "a",
            "/v1/node/drain",
            Some(json!({ "max_concurrent": bad })),
        );
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}: {v}");
        assert!(error_of(&v).1.contains("max_concurrent"), "{bad}: {v}");
    }
    let (s, op) = c.call(
        Method::POST,
        "a",
        "/v1/node/drain",
        Some(json!({"max_concurrent": "auto"})),
    );
    assert_eq!(s, StatusCode::ACCEPTED, "{op}");
    assert_eq!(op["params"]["max_concurrent"], 1, "{op}");
    let why = op["params"]["auto"].as_str().unwrap();
    assert!(
        why.contains("30.00 MB/s") && why.contains("one at a time"),
        "{why}"
    );
    let done = c.wait_op("a", op["id"].as_str().unwrap());
    assert_eq!(done["state"], "completed", "{done}");
    let (_, list) = c.call(Method::GET, "a", "/v1/migrations", None);
    assert_eq!(max_overlap(list.as_array().unwrap()), 1, "{list}");
}

#[test]
fn a_node_whose_limit_is_auto_sizes_its_queue_and_its_drains_from_the_link() {
    let _serial = common::serial();
    // A's link carries 30 MB/s and its VMs write 10 MB/s each: one at a
    // time. B knows no link rate yet: two.
    let auto = "max_concurrent_migrations = \"auto\"";
    let Some(c) = Agents::start(
        "auto-node",
        &[
            ("a", &format!("{auto}\nmax_bandwidth = \"30MB/s\"")),
            ("b", auto),
            ("c", ""),
        ],
    ) else {
        return;
    };
    let (_, node) = c.call(Method::GET, "a", "/v1/node", None);
    assert_eq!(node["limits"]["auto"], "auto", "{node}");
    create_vms(&c, "a", 3, "16MiB");
    let ids: Vec<String> = (1..=3)
        .map(|i| {
            let (s, m) = c.call(
                Method::POST,
                "a",
                "/v1/migrations",
                Some(json!({"vm": format!("vm{i}"), "target": "c"})),
            );
            assert_eq!(s, StatusCode::ACCEPTED, "{m}");
            m["id"].as_str().unwrap().to_string()
        })
        .collect();
    let (_, node) = c.call(Method::GET, "a", "/v1/node", None);
    assert_eq!(node["limits"]["max_concurrent_migrations"], 1, "{node}");
    let why = node["limits"]["auto"].as_str().unwrap();
    assert!(why.contains("one at a time"), "{why}");
    for id in &ids {
        assert_eq!(c.wait("a", id)["state"], "completed");
    }
    let (_, list) = c.call(Method::GET, "a", "/v1/migrations", None);
    assert_eq!(max_overlap(list.as_array().unwrap()), 1, "{list}");
    // B's drain, asked for no number, is sized by the same rule.
    for i in 1..=3 {
        let (s, v) = c.call(
            Method::POST,
            "b",
            "/v1/vms",
            Some(json!({"name": format!("idle{i}"), "memory": "16MiB", "workload": "idle"})),
        );
        assert_eq!(s, StatusCode::CREATED, "{v}");
    }
    let (s, op) = c.call(Method::POST, "b", "/v1/node/drain", None);
    assert_eq!(s, StatusCode::ACCEPTED, "{op}");
    assert_eq!(op["params"]["max_concurrent"], 2, "{op}");
    assert!(
        op["params"]["auto"]
            .as_str()
            .unwrap()
            .contains("no link rate known"),
        "{op}"
    );
    let done = c.wait_op("b", op["id"].as_str().unwrap());
    assert_eq!(done["state"], "completed", "{done}");
    let (_, list) = c.call(Method::GET, "b", "/v1/migrations", None);
    assert!(max_overlap(list.as_array().unwrap()) <= 2, "{list}");
    // The queue chose again as its migrations started, and says why: b
    // has measured its link since.
    let (_, node) = c.call(Method::GET, "b", "/v1/node", None);
    let why = node["limits"]["auto"].as_str().unwrap();
    assert!(
        why.contains("fastest migration so far") || why.contains("at most one VM"),
        "{why}"
    );
}

/// Waits until VM `vm` is arriving on `node` (at most 20 s).
fn wait_arriving(c: &Agents, node: &str, vm: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, v) = c.call(Method::GET, node, &format!("/v1/vms/{vm}"), None);
        if v["state"] == "migrating-in" {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{vm} never arrived on {node}: {v}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Drains `node` while `vm` arrives there: the step waits as `arriving`.
fn drain_while_arriving(c: &Agents, node: &str, vm: &str) -> String {
    let (s, op) = c.call(Method::POST, node, "/v1/node/drain", None);
    assert_eq!(s, StatusCode::ACCEPTED, "{op}");
    let step = &op["steps"][0];
    assert_eq!(
        (&step["vm"], &step["state"]),
        (&json!(vm), &json!("arriving")),
        "{op}"
    );
    op["id"].as_str().unwrap().to_string()
}

#[test]
fn a_vm_arriving_on_a_draining_node_moves_on_once_it_lands() {
    let _serial = common::serial();
    // a's migrations are held to 5 MB/s: the VM arrives for a second or two.
    let Some(c) = Agents::start(
        "arriving",
        &[("a", "max_bandwidth = \"5MB/s\""), ("b", ""), ("c", "")],
    ) else {
        return;
    };
    create_vms(&c, "a", 1, "48MiB");
    let migrate = |c: &Agents| {
        let (s, m) = c.call(
            Method::POST,
            "a",
            "/v1/migrations",
            Some(json!({"vm": "vm1", "target": "b"})),
        );
        assert_eq!(s, StatusCode::ACCEPTED, "{m}");
        wait_arriving(c, "b", "vm1");
        m["id"].as_str().unwrap().to_string()
    };
    // An arrival that is cancelled never lands: its step is skipped, and
    // the drain completes with the VM still on its source.
    let id = migrate(&c);
    let op = drain_while_arriving(&c, "b", "vm1");
    let (s, v) = c.call(Method::DELETE, "a", &format!("/v1/migrations/{id}"), None);
    assert_eq!(s, StatusCode::OK, "{v}");
    let done = c.wait_op("b", &op);
    assert_eq!(done["state"], "completed", "{done}");
    assert_eq!(done["steps"][0]["state"], "skipped", "{done}");
    assert_eq!(
        done["steps"][0]["error"], "it did not arrive here",
        "{done}"
    );
    assert_eq!(vm_names(&c, "a"), ["vm1"]);
    let (s, v) = c.call(
        Method::POST,
        "b",
        "/v1/node/resume",
        Some(json!({"failback": false})),
    );
    assert!(s.is_success(), "{v}");
    c.wait_op("b", v["id"].as_str().unwrap());
    // One that lands moves on to an active node.
    let id = migrate(&c);
    let op = drain_while_arriving(&c, "b", "vm1");
    let arrived = c.wait("a", &id);
    assert_eq!(arrived["state"], "completed", "{arrived}");
    let done = c.wait_op("b", &op);
    assert_eq!(done["state"], "completed", "{done}");
    let step = &done["steps"][0];
    assert_eq!(step["state"], "completed", "{done}");
    let to = step["target"].as_str().unwrap();
    assert!(["a", "c"].contains(&to), "{done}");
    assert_eq!(vm_names(&c, to), ["vm1"]);
    assert!(settled_vm_names(&c, "b").is_empty());
}
