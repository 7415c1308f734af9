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

/// Etcd of three members; agents `a` (member 0 only) and `b` (all three,
/// with node settings `b_conf`) with lease TTL `ttl`; VM `web` running on
/// `a`.
fn cut_off_cluster(test: &str, ttl: &str, b_conf: &str) -> (EtcdCluster, Agents) {
    let e = EtcdCluster::start(test, 3);
    let endpoints: Vec<String> = e.endpoints().iter().map(|m| format!("\"{m}\"")).collect();
    let top = format!(
        "etcd = [{}]\netcd_prefix = \"/{test}/\"\nlease_ttl = \"{ttl}\"",
        endpoints.join(", ")
    );
    let only0 = e.members[0].client.clone();
    let c = Agents::start_each(test, &top, &[("a", ""), ("b", b_conf)], |name, cluster| {
        if name == "a" {
            cluster.store.as_mut().unwrap().client.endpoints = vec![only0.clone()];
        }
    })
    .unwrap();
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
    quorum_get(e, &format!("/{test}/alive/a")).map(|kv| kv.lease)
}

/// VM `name`'s record in etcd.
fn record(e: &EtcdCluster, test: &str, name: &str) -> Value {
    let kv = quorum_get(e, &format!("/{test}/vms/{name}")).expect("a record");
    serde_json::from_slice(&kv.value).unwrap()
}

fn quorum_get(e: &EtcdCluster, key: &str) -> Option<ferry::agent::etcd::KeyValue> {
    // Members 1 and 2 hold the quorum while member 0 is stopped.
    let quorum = e.client_of(&e.config(e.endpoints()[1..].to_vec()));
    // A read may meet the election that follows stopping member 0.
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        match e.rt.block_on(quorum.get(key.as_bytes())) {
            Ok(kv) => return kv,
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
    let (e, c) = cut_off_cluster("fence-renewed", "8s", "");
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
    let (e, mut c) = cut_off_cluster(test, "3s", "");
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
    // With two nodes, one dead is no majority: the coordinator restarted
    // nothing while a was gone. Back, a marks web's record for a restart,
    // and the coordinator starts it on b, not on a (which holds the
    // superseded copy).
    until(Duration::from_secs(10), "web runs on b", || {
        let (s, v) = c.call(Method::GET, "b", "/v1/vms/web", None);
        s == StatusCode::OK && v["state"] == "running"
    });
    let (_, on_b) = c.call(Method::GET, "b", "/v1/vms/web", None);
    assert_eq!(on_b["restarts"], 1, "{on_b}");
    assert_eq!(on_b["last_restart"]["from"], "a", "{on_b}");
    assert_eq!(on_b["last_restart"]["to"], "b", "{on_b}");
    assert_eq!(vm(&c)["state"], "superseded");
    // The superseded copy is kept on a's disk: a restarted agent holds it
    // again, still superseded.
    let saved = c.file.parent().unwrap().join("state/a/guests/web.guest");
    until(Duration::from_secs(10), "the copy is saved", || {
        saved.exists()
    });
    c.restart("a");
    let v = vm(&c);
    assert_eq!(v["state"], "superseded", "{v}");
    assert_eq!(v["pages_written"].as_u64().unwrap(), written);
    // New work is taken again, and the superseded copy goes on request
    // (without force: its record names b now), from the disk too.
    let (s, v) = c.call(
        Method::POST,
        "a",
        "/v1/vms",
        Some(json!({"name": "other", "memory": "16MiB"})),
    );
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (s, v) = c.call(Method::DELETE, "a", "/v1/vms/web", None);
    assert_eq!(s, StatusCode::OK, "{v}");
    until(Duration::from_secs(10), "the copy is removed", || {
        !saved.exists()
    });
}

/// A superseded VM whose restart found no room is failed until room comes,
/// and then starts where the room is: its one lost lease counts one restart,
/// however many tries it took.
#[test]
fn a_restart_that_waited_for_room_counts_the_lost_lease_once() {
    if !available() {
        return;
    }
    let _serial = common::serial();
    let test = "fence-no-room";
    let (e, c) = cut_off_cluster(test, "3s", "memory_capacity = \"24MiB\"");
    let (s, v) = c.call(
        Method::POST,
        "b",
        "/v1/vms",
        Some(json!({"name": "filler", "memory": "16MiB"})),
    );
    assert_eq!(s, StatusCode::CREATED, "{v}");
    e.signal(0, "-STOP");
    until(Duration::from_secs(15), "a's lease expires", || {
        alive(&e, test).is_none()
    });
    e.signal(0, "-CONT");
    until(Duration::from_secs(10), "web waits for room", || {
        record(&e, test, "web")["state"] == "failed"
    });
    let r = record(&e, test, "web");
    assert_eq!(r["restarts"], 1, "{r}");
    assert!(r["error"].as_str().unwrap().contains("free"), "{r}");
    // Tried again each round while failed: still one restart.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(record(&e, test, "web")["restarts"], 1);
    let (s, v) = c.call(Method::DELETE, "b", "/v1/vms/filler", None);
    assert_eq!(s, StatusCode::OK, "{v}");
    until(Duration::from_secs(10), "web runs on b", || {
        let (s, v) = c.call(Method::GET, "b", "/v1/vms/web", None);
        s == StatusCode::OK && v["state"] == "running"
    });
    let (_, on_b) = c.call(Method::GET, "b", "/v1/vms/web", None);
    assert_eq!(on_b["restarts"], 1, "{on_b}");
    assert_eq!(on_b["last_restart"]["to"], "b", "{on_b}");
    assert_eq!(vm(&c)["state"], "superseded");
}

#[test]
fn a_node_that_loses_its_lease_three_times_is_quarantined_until_cleared() {
    if !available() {
        return;
    }
    let _serial = common::serial();
    let test = "quarantine";
    let e = EtcdCluster::start(test, 3);
    let endpoints: Vec<String> = e.endpoints().iter().map(|m| format!("\"{m}\"")).collect();
    let top = format!(
        "etcd = [{}]\netcd_prefix = \"/{test}/\"\nlease_ttl = \"2s\"",
        endpoints.join(", ")
    );
    let only0 = e.members[0].client.clone();
    let nodes = [
        ("a", "memory_capacity = \"4GiB\""),
        ("b", "memory_capacity = \"1GiB\""),
        ("c", "memory_capacity = \"1GiB\""),
    ];
    let mut c = Agents::start_each(test, &top, &nodes, |name, cluster| {
        if name == "a" {
            cluster.store.as_mut().unwrap().client.endpoints = vec![only0.clone()];
        }
    })
    .unwrap();
    for round in 0..3 {
        let lease = alive(&e, test).expect("a is alive");
        e.signal(0, "-STOP");
        until(Duration::from_secs(15), "a's lease expires", || {
            alive(&e, test).is_none()
        });
        e.signal(0, "-CONT");
        until(Duration::from_secs(10), "a takes a new lease", || {
            alive(&e, test).is_some_and(|l| l != lease)
        });
        let (_, node) = c.call(Method::GET, "a", "/v1/node", None);
        let quarantined = node["quarantined_until_ms"].as_u64();
        assert_eq!(quarantined.is_some(), round == 2, "round {round}: {node}");
    }
    let (_, node) = c.call(Method::GET, "a", "/v1/node", None);
    let until_ms = node["quarantined_until_ms"].as_u64().unwrap();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(
        until_ms > now_ms + 7100 * 1000 && until_ms <= now_ms + 7200 * 1000,
        "{node}"
    );
    // A VM of c, which stops cleanly: it restarts on b, though a has more
    // room, and c's clean stop counts no loss.
    let (s, v) = c.call(
        Method::POST,
        "c",
        "/v1/vms",
        Some(json!({"name": "web", "memory": "16MiB"})),
    );
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let i = c.agents.iter().position(|h| h.node.name() == "c").unwrap();
    let stopped = c.agents.remove(i);
    c.rt.block_on(stopped.shutdown());
    until(Duration::from_secs(10), "web runs again", || {
        c.call(Method::GET, "b", "/v1/vms/web", None).0 == StatusCode::OK
    });
    assert_eq!(
        c.call(Method::GET, "a", "/v1/vms/web", None).0,
        StatusCode::NOT_FOUND
    );
    let etcd = e.client_of(&e.config(e.endpoints()[1..].to_vec()));
    let state =
        e.rt.block_on(etcd.get(format!("/{test}/state/c").as_bytes()));
    let state: Value = serde_json::from_slice(&state.unwrap().unwrap().value).unwrap();
    // (c may have lost a lease of its own while member 0 was stopped, with
    // a TTL this short; the one it revoked never counts.)
    let revoked = &state["clean_stop_lease"];
    assert!(revoked.is_i64(), "{state}");
    let losses = state["losses"].as_array().unwrap();
    assert!(losses.iter().all(|l| &l["lease"] != revoked), "{state}");
    // Cleared by an operator.
    let (s, v) = c.call(
        Method::POST,
        "a",
        "/v1/node/resume",
        Some(json!({"clear_quarantine": true})),
    );
    assert!(s.is_success(), "{v}");
    until(Duration::from_secs(5), "the quarantine is lifted", || {
        c.call(Method::GET, "a", "/v1/node", None).1["quarantined_until_ms"].is_null()
    });
}

/// A VM deleted while its node cannot reach etcd: `DELETE` answers within
/// a few seconds, saying its record goes in the background, and it goes
/// once the store answers again; until then the name stays taken.
#[test]
fn a_vm_deleted_while_the_store_is_away_says_its_record_goes_later() {
    if !available() {
        return;
    }
    let _serial = common::serial();
    let test = "delete-cut-off";
    // A lease long enough that a does not fence itself meanwhile.
    let (e, c) = cut_off_cluster(test, "30s", "");
    e.signal(0, "-STOP");
    let asked = Instant::now();
    let (s, v) = c.call(Method::DELETE, "a", "/v1/vms/web", None);
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(
        asked.elapsed() < Duration::from_secs(8),
        "{:?}",
        asked.elapsed()
    );
    let note = v["record"].as_str().unwrap_or_default();
    assert!(note.contains("in the background"), "{v}");
    assert_eq!(record(&e, test, "web")["node"], "a");
    let (s, v) = c.call(
        Method::POST,
        "b",
        "/v1/vms",
        Some(json!({"name": "web", "memory": "16MiB"})),
    );
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    e.signal(0, "-CONT");
    until(Duration::from_secs(15), "the record goes", || {
        quorum_get(&e, &format!("/{test}/vms/web")).is_none()
    });
}
