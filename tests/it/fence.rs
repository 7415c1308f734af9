//! Self-fencing with a real three-member etcd and in-process agents: node
//! `a` reaches etcd only through member 0, which is SIGSTOPped. It must
//! pause its guests before its lease can expire; if it renews in time they
//! run again, and once the lease has expired they are `superseded` and never
//! run again.

use crate::common;

use common::agents::{error_of, Agents};
use common::etcd::{available, EtcdCluster};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// Etcd of three members; agents `a` (member 0 only) and `b` (all three)
/// with lease TTL `ttl`; VM `web` running on `a`.
fn cut_off_cluster(test: &str, ttl: &str) -> (EtcdCluster, Agents) {
    let e = EtcdCluster::start(test, 3);
    let endpoints: Vec<String> = e.endpoints().iter().map(|m| format!("\"{m}\"")).collect();
    let top = format!(
        "etcd = [{}]\netcd_prefix = \"/{test}/\"\nlease_ttl = \"{ttl}\"",
        endpoints.join(", ")
    );
    let only0 = e.members[0].client.clone();
    let c = Agents::start_each(test, &top, &[("a", ""), ("b", "")], |name, cluster| {
        if name == "a" {
            cluster.store.as_mut().unwrap().client.endpoints = vec![only0.clone()];
        }
    });
    let (s, v) = c.call(
        Method::POST,
        "a",
        "/v1/vms",
        Some(json!({"name": "web", "memory": "16MiB", "dirty_rate": "20MB/s"})),
    );
    assert_eq!(s, StatusCode::CREATED, "{v}");
    (e, c)
}

fn vm(c: &Agents) -> Value {
    let (s, v) = c.call(Method::GET, "a", "/v1/vms/web", None);
    assert_eq!(s, StatusCode::OK, "{v}");
    v
}

/// Polls `what` until it holds, at most `limit`.
fn until(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < end, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn alive(e: &EtcdCluster, test: &str) -> Option<i64> {
    // Members 1 and 2 hold the quorum while member 0 is stopped.
    let quorum = e.client_of(&e.config(e.endpoints()[1..].to_vec()));
    let key = format!("/{test}/alive/a");
    // A read may meet the election that follows stopping member 0.
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        match e.rt.block_on(quorum.get(key.as_bytes())) {
            Ok(kv) => return kv.map(|kv| kv.lease),
            Err(err) => assert!(Instant::now() < end, "{err}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn an_agent_cut_off_from_etcd_pauses_its_guests_and_resumes_them_if_renewed_in_time() {
    if !available() {
        return;
    }
    let _serial = common::serial();
    let (e, c) = cut_off_cluster("fence-renewed", "8s");
    let lease = alive(&e, "fence-renewed").expect("a is alive");
    e.signal(0, "-STOP");
    until(Duration::from_secs(12), "a fences itself", || {
        vm(&c)["state"] == "fenced"
    });
    // Fenced before its lease could expire, and the guest stands still.
    assert_eq!(alive(&e, "fence-renewed"), Some(lease));
    let written = vm(&c)["pages_written"].as_u64().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(vm(&c)["pages_written"].as_u64().unwrap(), written);
    let (_, node) = c.call(Method::GET, "a", "/v1/node", None);
    assert_eq!(node["lease"]["state"], "fenced", "{node}");
    // No new work while fenced.
    let (s, v) = c.call(
        Method::POST,
        "a",
        "/v1/vms",
        Some(json!({"name": "other", "memory": "16MiB"})),
    );
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert!(error_of(&v).1.contains("fenced"), "{v}");
    // The member comes back in time: the same lease, renewed; the guest
    // runs again.
    e.signal(0, "-CONT");
    until(Duration::from_secs(5), "a resumes its guest", || {
        vm(&c)["state"] == "running"
    });
    assert_eq!(alive(&e, "fence-renewed"), Some(lease));
    let (_, node) = c.call(Method::GET, "a", "/v1/node", None);
    assert_eq!(node["lease"]["state"], "live", "{node}");
    assert_eq!(node["lease"]["id"].as_i64(), Some(lease), "{node}");
    until(Duration::from_secs(2), "the guest writes again", || {
        vm(&c)["pages_written"].as_u64().unwrap() > written
    });
}

#[test]
fn an_agent_whose_lease_expired_keeps_its_guests_superseded_and_never_resumes_them() {
    if !available() {
        return;
    }
    let _serial = common::serial();
    let test = "fence-expired";
    let (e, c) = cut_off_cluster(test, "3s");
    let lease = alive(&e, test).expect("a is alive");
    e.signal(0, "-STOP");
    // Sampled throughout: whenever the lease is gone, the guest is paused.
    let mut fenced_first = false;
    until(Duration::from_secs(15), "a's lease expires", || {
        let state = vm(&c)["state"].as_str().unwrap().to_string();
        let gone = alive(&e, test).is_none();
        assert!(!gone || state == "fenced", "lease gone, VM {state}");
        fenced_first |= state == "fenced";
        gone
    });
    assert!(fenced_first);
    e.signal(0, "-CONT");
    until(
        Duration::from_secs(10),
        "a learns its lease expired",
        || vm(&c)["state"] == "superseded",
    );
    // It rejoins under a new lease; the guest never runs here again.
    until(Duration::from_secs(5), "a holds a new lease", || {
        alive(&e, test).is_some_and(|l| l != lease)
    });
    let written = vm(&c)["pages_written"].as_u64().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let v = vm(&c);
    assert_eq!(v["state"], "superseded", "{v}");
    assert_eq!(v["pages_written"].as_u64().unwrap(), written);
    let (_, node) = c.call(Method::GET, "a", "/v1/node", None);
    assert_eq!(node["lease"]["state"], "live", "{node}");
    // New work is taken again, and the superseded copy goes on request.
    let (s, v) = c.call(
        Method::POST,
        "a",
        "/v1/vms",
        Some(json!({"name": "other", "memory": "16MiB"})),
    );
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (s, v) = c.call(Method::DELETE, "a", "/v1/vms/web", None);
    assert_eq!(s, StatusCode::OK, "{v}");
}
