//! Cluster operations through any agent: a drain and a failback of node b
//! asked of another agent are handed to the coordinator and run on b, and
//! so does a migration of one of b's VMs asked elsewhere, which any agent
//! then reads; two
//! drains of one node asked at once start once; two nodes drained at once
//! through different agents both end empty.

use crate::common;

use common::agents::{error_of, Agents};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn create_vms(c: &Agents, node: &str, names: &[&str]) {
    for name in names {
        let (s, v) = c.call(
            Method::POST,
            node,
            "/v1/vms",
            Some(json!({"name": name, "memory": "16MiB", "workload": "hot:1MiB", "dirty_rate": "5MB/s"})),
        );
        assert_eq!(s, StatusCode::CREATED, "{v}");
    }
}

fn vm_names(c: &Agents, node: &str) -> Vec<String> {
    let (_, vms) = c.call(Method::GET, node, "/v1/vms", None);
    let mut names: Vec<String> = vms
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}

/// The elected coordinator, as `GET /v1/node` on `node` names it.
fn coordinator(c: &Agents, node: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, v) = c.call(Method::GET, node, "/v1/node", None);
        if let Some(name) = v["coordinator"].as_str() {
            return name.to_string();
        }
        assert!(Instant::now() < deadline, "no coordinator: {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits for operation `id` of node `of`, asked through agent `via`.
fn wait_via(c: &Agents, via: &str, of: &str, id: &str) -> Value {
    c.wait_op_at(via, &format!("/v1/nodes/{of}/operations/{id}"))
}

#[test]
fn any_agent_drains_and_fails_back_any_node_through_the_coordinator() {
    let _serial = common::serial();
    let Some(c) = Agents::start("relay", &[("a", ""), ("b", ""), ("c", "")]) else {
        return;
    };
    create_vms(&c, "b", &["r1", "r2", "r3"]);
    // Asked of an agent that is neither b nor (when it can be) the
    // coordinator: the request goes there, to the coordinator, then to b.
    let boss = coordinator(&c, "a");
    let via = ["a", "c"]
        .into_iter()
        .find(|n| *n != boss)
        .unwrap()
        .to_string();
    let (s, op) = c.call(
        Method::POST,
        &via,
        "/v1/nodes/b/drain",
        Some(json!({"max_concurrent": 1, "request_id": "relay-drain-1"})),
    );
    assert_eq!(s, StatusCode::ACCEPTED, "{op}");
    assert_eq!(
        (op["node"].as_str(), op["kind"].as_str()),
        (Some("b"), Some("drain"))
    );
    let id = op["id"].as_str().unwrap().to_string();
    // The operation is b's: its own agent has it.
    let (s, own) = c.call(Method::GET, "b", &format!("/v1/operations/{id}"), None);
    assert_eq!(s, StatusCode::OK, "{own}");
    assert_eq!(own["params"]["max_concurrent"], 1, "{own}");
    let done = wait_via(&c, &via, "b", &id);
    assert_eq!(done["state"], "completed", "{done}");
    assert!(vm_names(&c, "b").is_empty());
    let (s, view) = c.call(Method::GET, &via, "/v1/nodes/b", None);
    assert_eq!(
        (s, view["state"].as_str()),
        (StatusCode::OK, Some("paused")),
        "{view}"
    );
    // The same request again (its answer lost, say) gets the same drain.
    let (s, again) = c.call(
        Method::POST,
        &via,
        "/v1/nodes/b/drain",
        Some(json!({"max_concurrent": 1, "request_id": "relay-drain-1"})),
    );
    assert_eq!(s, StatusCode::ACCEPTED, "{again}");
    assert_eq!(
        (again["id"].as_str(), again["state"].as_str()),
        (Some(id.as_str()), Some("completed")),
        "{again}"
    );
    let (s, other) = c.call(
        Method::POST,
        &via,
        "/v1/nodes/b/resume",
        Some(json!({"request_id": "relay-drain-1"})),
    );
    assert_eq!(s, StatusCode::CONFLICT, "{other}");
    let (s, list) = c.call(Method::GET, &via, "/v1/nodes/b/operations", None);
    assert_eq!(s, StatusCode::OK, "{list}");
    assert!(
        list.as_array().unwrap().iter().any(|o| o["id"] == id),
        "{list}"
    );

    // The failback goes the same way and brings all three home.
    let (s, again) = c.call(
        Method::POST,
        &via,
        "/v1/nodes/b/resume",
        Some(json!({"failback": true})),
    );
    assert_eq!(s, StatusCode::ACCEPTED, "{again}");
    let back = wait_via(&c, &via, "b", again["id"].as_str().unwrap());
    assert_eq!(back["state"], "completed", "{back}");
    assert_eq!(vm_names(&c, "b"), ["r1", "r2", "r3"]);

    // Bad requests name what is wrong, and change nothing.
    for (path, body, status, code) in [
        (
            "/v1/nodes/zz/drain",
            None,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            "/v1/nodes/b/explode",
            None,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            "/v1/nodes/b/drain",
            Some("[1]"),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "/v1/nodes/b/drain",
            Some("{\"max_concurrent\": 0}"),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "/v1/nodes/b/update",
            Some("{}"),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "/v1/nodes/b/operations/nope",
            None,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            "/v1/nodes/b/drain",
            Some("{\"request_id\": \"a b\"}"),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        // Only the coordinator starts a handed operation.
        (
            "/v1/nodes/b/drain?handed=true",
            None,
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
        ),
    ] {
        let method = if path.contains("operations") {
            Method::GET
        } else {
            Method::POST
        };
        let (s, e) = c.call_with(
            Some(common::agents::TOKEN),
            method,
            &via,
            path,
            body.map(str::to_string),
        );
        assert_eq!((s, error_of(&e).0.as_str()), (status, code), "{path}: {e}");
    }
    let (_, view) = c.call(Method::GET, "b", "/v1/node", None);
    assert_eq!(view["state"], "active", "{view}");
    assert_eq!(vm_names(&c, "b"), ["r1", "r2", "r3"]);

    // A migration of a VM on b, asked of another agent, runs on b.
    let (s, m) = c.call(
        Method::POST,
        &via,
        "/v1/migrations",
        Some(json!({"vm": "r1", "target": "c"})),
    );
    assert_eq!(s, StatusCode::ACCEPTED, "{m}");
    assert_eq!(
        (m["source"].as_str(), m["target"].as_str()),
        (Some("b"), Some("c")),
        "{m}"
    );
    let mid = m["id"].as_str().unwrap().to_string();
    let done = c.wait("b", &mid);
    assert_eq!(done["state"], "completed", "{done}");
    assert_eq!(vm_names(&c, "c"), ["r1"]);
    // Node a, which neither sent nor took it, reads it from b (the node
    // that numbered it), and b's refusals come back through it.
    let (s, read) = c.call(Method::GET, "a", &format!("/v1/migrations/{mid}"), None);
    assert_eq!(
        (s, read["source"].as_str()),
        (StatusCode::OK, Some("b")),
        "{read}"
    );
    assert_eq!(read["state"], "completed", "{read}");
    let (s, e) = c.call(Method::DELETE, "a", &format!("/v1/migrations/{mid}"), None);
    assert_eq!(s, StatusCode::CONFLICT, "{e}");
    let (s, e) = c.call(
        Method::POST,
        "a",
        &format!("/v1/migrations/{mid}/resolve"),
        Some(json!({"run_on": "source"})),
    );
    assert_eq!(s, StatusCode::CONFLICT, "{e}");
    let (s, e) = c.call(Method::GET, "a", "/v1/migrations/zz-1-2", None);
    assert_eq!(s, StatusCode::NOT_FOUND, "{e}");
    // One of no VM anywhere is refused where it was asked.
    let (s, e) = c.call(
        Method::POST,
        &via,
        "/v1/migrations",
        Some(json!({"vm": "nowhere", "target": "b"})),
    );
    assert_eq!(s, StatusCode::NOT_FOUND, "{e}");
}

#[test]
fn two_drains_of_one_node_asked_at_once_start_once() {
    let _serial = common::serial();
    let Some(c) = Agents::start("relay-twice", &[("a", ""), ("b", "")]) else {
        return;
    };
    create_vms(&c, "b", &["t1", "t2"]);
    let answers: Vec<(StatusCode, Value)> = std::thread::scope(|s| {
        let asks: Vec<_> = (0..2)
            .map(|_| s.spawn(|| c.call(Method::POST, "b", "/v1/node/drain", None)))
            .collect();
        asks.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let started: Vec<&Value> = answers
        .iter()
        .filter(|(s, _)| *s == StatusCode::ACCEPTED)
        .map(|(_, v)| v)
        .collect();
    assert_eq!(started.len(), 1, "{answers:?}");
    let refused = answers
        .iter()
        .find(|(s, _)| *s != StatusCode::ACCEPTED)
        .unwrap();
    assert_eq!(refused.0, StatusCode::CONFLICT, "{answers:?}");
    let done = c.wait_op("b", started[0]["id"].as_str().unwrap());
    assert_eq!(done["state"], "completed", "{done}");
    assert_eq!(vm_names(&c, "a"), ["t1", "t2"]);
    let (_, ops) = c.call(Method::GET, "b", "/v1/operations", None);
    assert_eq!(ops.as_array().unwrap().len(), 1, "{ops}");
}

/// The nodes a drain's steps aimed at, the first tries included.
fn aimed_at(op: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for step in op["steps"].as_array().unwrap() {
        out.push(step["target"].as_str().unwrap_or_default().to_string());
        for t in step["tried"].as_array().into_iter().flatten() {
            out.push(t.as_str().unwrap_or_default().to_string());
        }
    }
    out
}

#[test]
fn of_two_drains_asked_at_once_the_second_never_aims_at_the_first() {
    let _serial = common::serial();
    let Some(c) = Agents::start("relay-pair", &[("a", ""), ("b", ""), ("c", "")]) else {
        return;
    };
    // a has the least room, so each of b and c would pick the other while
    // it looks active.
    let (s, v) = c.call(
        Method::POST,
        "a",
        "/v1/vms",
        Some(json!({"name": "ballast", "memory": "512MiB"})),
    );
    assert_eq!(s, StatusCode::CREATED, "{v}");
    create_vms(&c, "b", &["p1"]);
    create_vms(&c, "c", &["p2"]);
    coordinator(&c, "a");
    let answers: Vec<(StatusCode, Value)> = std::thread::scope(|s| {
        let asks: Vec<_> = ["b", "c"]
            .into_iter()
            .map(|node| {
                let c = &c;
                s.spawn(move || c.call(Method::POST, "a", &format!("/v1/nodes/{node}/drain"), None))
            })
            .collect();
        asks.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut crossed = Vec::new();
    for ((s, op), (node, other)) in answers.iter().zip([("b", "c"), ("c", "b")]) {
        assert_eq!(*s, StatusCode::ACCEPTED, "{op}");
        let done = c.wait_op(node, op["id"].as_str().unwrap());
        assert_eq!(done["state"], "completed", "{done}");
        if aimed_at(&done).iter().any(|t| t == other) {
            crossed.push(done);
        }
    }
    // The first may aim at the other node (active when it started); the
    // second saw that node draining.
    assert!(crossed.len() <= 1, "{crossed:#?}");
    assert_eq!(vm_names(&c, "a"), ["ballast", "p1", "p2"]);
    assert!(vm_names(&c, "b").is_empty() && vm_names(&c, "c").is_empty());
}
