//! Hostile and clumsy peers against live agents: sessions that do not prove
//! the key, second arrivals of a name, and what their records then say.

use super::common::agents::Agents;
use super::*;
use ferry::migration::auth::SessionKey;
use ferry::wire::SessionLabel;
use reqwest::{Method, StatusCode};
use serde_json::json;

/// Migrates a small guest labelled as VM `vm` from `source_node` to the
/// agent `target`'s data port, proving `key` (agents take TLS).
fn labelled_migration(
    a: &Agents,
    target: &str,
    vm: &str,
    source_node: &str,
    key: Vec<u8>,
) -> ferry::migration::Report {
    let g = common::guest(4 << 20, FillSpec::default(), WorkloadPattern::Idle, 0);
    let config = MigrationConfig {
        label: Some(SessionLabel {
            vm: vm.into(),
            migration_id: "impostor-1".into(),
            source_node: source_node.into(),
        }),
        session_key: Some(SessionKey(key)),
        channels: 1,
        ..MigrationConfig::default()
    };
    let addr = a.agent(target).data_addr.to_string();
    a.rt.block_on(ferry::transport::migrate(
        g,
        &addr,
        &config,
        &RunContext {
            tls: Some(ferry::transport::tls::TlsClient::bound_to_key()),
            ..RunContext::default()
        },
    ))
}

/// Starts moving VM `vm` (64 MiB, busy) from `from` to `to` at 16 MB/s, so it
/// takes about four seconds; returns the migration's id.
fn slow_migration(a: &Agents, from: &str, vm: &str, to: &str) -> String {
    let (s, v) = a.call(
        Method::POST,
        from,
        "/v1/vms",
        Some(json!({"name": vm, "memory": "64MiB", "fill": "random", "workload": "hot:8MiB", "dirty_rate": "4MB/s"})),
    );
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (s, m) = a.call(
        Method::POST,
        from,
        "/v1/migrations",
        Some(json!({"vm": vm, "target": to, "max_bandwidth": "16MB/s", "codec": "none"})),
    );
    assert_eq!(s, StatusCode::ACCEPTED, "{m}");
    let id = m["id"].as_str().unwrap().to_string();
    // Wait until the target lists it as arriving.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (s, v) = a.call(Method::GET, to, &format!("/v1/vms/{vm}"), None);
        if s == StatusCode::OK && v["state"] == "migrating-in" {
            return id;
        }
        assert!(std::time::Instant::now() < deadline, "never arrived: {v}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The VM runs on `node` after the migration `id` from `from` completed.
fn runs_there(a: &Agents, from: &str, id: &str, node: &str, vm: &str) {
    let m = a.wait(from, id);
    assert_eq!(m["state"], "completed", "{m}");
    let (s, v) = a.call(Method::GET, node, &format!("/v1/vms/{vm}"), None);
    assert_eq!(s, StatusCode::OK, "{vm} is not on {node}: {v}");
    assert_eq!(v["state"], "running", "{v}");
    let (s, _) = a.call(Method::GET, from, &format!("/v1/vms/{vm}"), None);
    assert_eq!(s, StatusCode::NOT_FOUND, "{vm} is still on {from}");
}

#[test]
fn an_unauthenticated_labelled_session_cannot_touch_an_arriving_vm() {
    let _serial = common::serial();
    let Some(a) = Agents::start("hostile-label", &[("a", ""), ("b", ""), ("c", "")]) else {
        return;
    };
    let id = slow_migration(&a, "a", "web", "c");
    // Sessions naming the arriving VM, with a wrong key, and with none at
    // all, while the real one runs: refused, and they change nothing.
    for key in [b"not-the-cluster-key-000".to_vec(), Vec::new()] {
        let r = labelled_migration(&a, "c", "web", "b", key);
        assert_eq!(r.outcome, Outcome::Failed);
        let error = r.error.unwrap();
        assert!(error.contains("Unauthenticated"), "{error}");
    }
    let (_, v) = a.call(Method::GET, "c", "/v1/vms/web", None);
    assert_eq!(v["state"], "migrating-in", "{v}");
    runs_there(&a, "a", &id, "c", "web");
    // The impostor left no migration record on the target.
    let (_, list) = a.call(Method::GET, "c", "/v1/migrations", None);
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    let (_, text) = a.call(Method::GET, "c", "/metrics", None);
    let text = text.as_str().unwrap().to_string();
    assert!(
        text.contains("ferry_sessions_refused_total{reason=\"unauthenticated\"} 2"),
        "{text}"
    );
}

#[test]
fn a_second_arrival_of_the_same_name_is_refused_and_the_first_arrives() {
    let _serial = common::serial();
    let Some(a) = Agents::start("hostile-twins", &[("a", ""), ("b", ""), ("c", "")]) else {
        return;
    };
    let id = slow_migration(&a, "a", "web", "c");
    // The name is taken in the cluster: b cannot make a VM of it.
    let (s, v) = a.call(
        Method::POST,
        "b",
        "/v1/vms",
        Some(json!({"name": "web", "memory": "8MiB"})),
    );
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    // A peer that holds the key sends a twin to c meanwhile: refused.
    let key = a.agent("a").node.cluster.key.clone();
    let twin = labelled_migration(&a, "c", "web", "b", key);
    assert_eq!(twin.outcome, Outcome::Failed);
    let error = twin.error.unwrap();
    assert!(error.contains("already hosts a VM named"), "{error}");
    // a's arrives at c whole.
    runs_there(&a, "a", &id, "c", "web");
    let src = a.agent("c").node.guest("web").unwrap();
    assert_eq!(src.memory().len_bytes(), 64 << 20);
}

#[test]
fn every_out_of_range_api_value_is_refused_naming_its_field() {
    let Some(a) = Agents::start("hostile-ranges", &[("a", ""), ("b", "")]) else {
        return;
    };
    let (s, v) = a.call(
        Method::POST,
        "a",
        "/v1/vms",
        Some(json!({"name": "web", "memory": "8MiB"})),
    );
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let migration = |extra: serde_json::Value| {
        let mut body = json!({"vm": "web", "target": "b"});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body
    };
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        (
            "/v1/migrations",
            migration(json!({"completion_timeout": "4000000000000000h"})),
            "completion_timeout",
        ),
        (
            "/v1/migrations",
            migration(json!({"completion_timeout": "31d"})),
            "completion_timeout",
        ),
        (
            "/v1/migrations",
            migration(json!({"progress_timeout": 0})),
            "progress_timeout",
        ),
        (
            "/v1/migrations",
            migration(json!({"peer_timeout": "1ms"})),
            "peer_timeout",
        ),
        (
            "/v1/migrations",
            migration(json!({"peer_timeout": "2h"})),
            "peer_timeout",
        ),
        (
            "/v1/migrations",
            migration(json!({"downtime_limit": 0})),
            "downtime_limit",
        ),
        (
            "/v1/migrations",
            migration(json!({"downtime_limit": "2h"})),
            "downtime_limit",
        ),
        (
            "/v1/migrations",
            migration(json!({"max_bandwidth": 1})),
            "max_bandwidth",
        ),
        (
            "/v1/migrations",
            migration(json!({"max_bandwidth": u64::MAX})),
            "max_bandwidth",
        ),
        (
            "/v1/migrations",
            migration(json!({"channels": 65})),
            "channels",
        ),
        (
            "/v1/migrations",
            migration(json!({"channels": 0})),
            "channels",
        ),
        (
            "/v1/vms",
            json!({"name": "x", "memory": "8MiB", "dirty_rate": u64::MAX}),
            "dirty_rate",
        ),
        (
            "/v1/vms",
            json!({"name": "x", "memory": "8MiB", "dirty_rate": "5000TB/s"}),
            "dirty_rate",
        ),
        (
            "/v1/vms",
            json!({"name": "x", "memory": "8MiB", "workload": "hot:1GiB"}),
            "workload",
        ),
        (
            "/v1/vms",
            json!({"name": "x", "memory": u64::MAX}),
            "memory",
        ),
        ("/v1/vms", json!({"name": "x", "memory": 0}), "memory"),
        ("/v1/vms", json!({"name": "x\ny", "memory": "8MiB"}), "name"),
        (
            "/v1/vms",
            json!({"name": "x", "memory": "8MiB", "fill": "zero:900000,text:900000"}),
            "fill",
        ),
        (
            "/v1/node/drain",
            json!({"max_concurrent": 0}),
            "max_concurrent",
        ),
        (
            "/v1/node/drain",
            json!({"max_concurrent": 100000}),
            "max_concurrent",
        ),
        (
            "/v1/node/update",
            json!({"command": "x".repeat(5000)}),
            "command",
        ),
    ];
    for (path, body, field) in cases {
        let (s, v) = a.call(Method::POST, "a", path, Some(body.clone()));
        assert_eq!(s, StatusCode::BAD_REQUEST, "{path} {body}: {v}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains(field), "{path} {body}: {message}");
    }
    // Nothing was queued or created by any of them, and the node still works.
    let (_, list) = a.call(Method::GET, "a", "/v1/migrations", None);
    assert_eq!(list.as_array().unwrap().len(), 0, "{list}");
    let (_, node) = a.call(Method::GET, "a", "/v1/node", None);
    assert_eq!(node["state"], "active", "{node}");
    let (s, m) = a.call(
        Method::POST,
        "a",
        "/v1/migrations",
        Some(migration(json!({}))),
    );
    assert_eq!(s, StatusCode::ACCEPTED, "{m}");
    assert_eq!(a.wait("a", m["id"].as_str().unwrap())["state"], "completed");
}

#[test]
fn a_paused_last_copy_is_kept_from_deletes_drains_and_updates() {
    let _serial = common::serial();
    let Some(a) = Agents::start(
        "hostile-paused",
        &[
            ("a", ""),
            ("b", "update_hook = [\"sh\", \"-c\"]"),
            ("c", ""),
        ],
    ) else {
        return;
    };
    // A hand-off that leaves the guest paused on b: its only copy.
    let (s, v) = a.call(
        Method::POST,
        "a",
        "/v1/vms",
        Some(json!({"name": "web", "memory": "8MiB"})),
    );
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (s, m) = a.call(
        Method::POST,
        "a",
        "/v1/migrations",
        Some(json!({"vm": "web", "target": "b", "leave_paused": true})),
    );
    assert_eq!(s, StatusCode::ACCEPTED, "{m}");
    assert_eq!(a.wait("a", m["id"].as_str().unwrap())["state"], "completed");
    let (_, v) = a.call(Method::GET, "b", "/v1/vms/web", None);
    assert_eq!(v["state"], "paused", "{v}");
    // A plain delete is refused, saying what would be lost.
    let (s, v) = a.call(Method::DELETE, "b", "/v1/vms/web", None);
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("it is gone"),
        "{v}"
    );
    // A drain moves nothing and says the node is not empty: partial.
    let (s, op) = a.call(Method::POST, "b", "/v1/node/drain", Some(json!({})));
    assert_eq!(s, StatusCode::ACCEPTED, "{op}");
    let op = a.wait_op("b", op["id"].as_str().unwrap());
    assert_eq!(op["state"], "partial", "{op}");
    assert_eq!(
        op["remaining"],
        json!([{"vm": "web", "state": "paused"}]),
        "{op}"
    );
    assert!(
        op["error"].as_str().unwrap().contains("web (paused)"),
        "{op}"
    );
    // An update refuses a node that still hosts a VM, unless forced.
    let (s, v) = a.call(
        Method::POST,
        "b",
        "/v1/node/update",
        Some(json!({"command": "true"})),
    );
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("still hosts web"),
        "{v}"
    );
    let (s, op) = a.call(
        Method::POST,
        "b",
        "/v1/node/update",
        Some(json!({"command": "true", "force": true})),
    );
    assert_eq!(s, StatusCode::ACCEPTED, "{op}");
    assert_eq!(
        a.wait_op("b", op["id"].as_str().unwrap())["state"],
        "completed"
    );
    // With force, the delete goes through and names what went.
    let (s, v) = a.call(Method::DELETE, "b", "/v1/vms/web?force=true", None);
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(v["lost"].as_str().unwrap().contains("VM web"), "{v}");
    let (s, _) = a.call(Method::GET, "b", "/v1/vms/web", None);
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, v) = a.call(Method::DELETE, "a", "/v1/vms/nothing?force=maybe", None);
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
}
