//! The store's own failures, with a real three-member etcd and three
//! `ferry agent` processes on the default 5 s lease: killing the etcd
//! leader (idle, and during a drain of 6 VMs) costs no node its lease and
//! moves no VM by a restart; losing quorum (two members down) fences every
//! node and re-places nothing, and when quorum returns every VM runs again,
//! once, where it ran.

use crate::common;

use common::etcd::{available, EtcdCluster};
use common::procs::Procs;
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

fn cluster(test: &str) -> (EtcdCluster, Procs) {
    let e = EtcdCluster::start(test, 3);
    let endpoints: Vec<String> = e.endpoints().iter().map(|m| format!("\"{m}\"")).collect();
    let top = format!(
        "etcd = [{}]\netcd_prefix = \"/{test}/\"",
        endpoints.join(", ")
    );
    let p = Procs::start_with(test, &top, &[("a", "4GiB"), ("b", "4GiB"), ("c", "4GiB")]).unwrap();
    (e, p)
}

/// Each node's lease id and state, from its own `GET /v1/node`.
fn leases(p: &Procs) -> BTreeMap<String, (i64, String)> {
    p.json(&["node", "status"])
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["name"].as_str().unwrap().to_string(),
                (
                    n["lease"]["id"].as_i64().unwrap_or(0),
                    n["lease"]["state"].as_str().unwrap_or("").to_string(),
                ),
            )
        })
        .collect()
}

/// Every VM row of `vm list`; asserts none runs on two nodes.
fn rows(p: &Procs) -> Vec<Value> {
    let rows = p.json(&["vm", "list"]).as_array().unwrap().clone();
    for r in &rows {
        let name = &r["name"];
        let running = rows
            .iter()
            .filter(|o| &o["name"] == name && o["state"] == "running")
            .count();
        assert!(running <= 1, "{name} runs twice: {rows:?}");
    }
    rows
}

fn until(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < end, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn killing_the_etcd_leader_costs_no_lease_moves_no_vm_and_fails_no_drain() {
    if !available() {
        return;
    }
    let _serial = common::serial();
    let (mut e, p) = cluster("quorum-leader");
    for i in 0..6 {
        p.json(&[
            "vm",
            "create",
            &format!("v{i}"),
            "--node",
            "a",
            "--memory",
            "256MiB",
            "--dirty-rate",
            "20MB/s",
        ]);
    }
    let before = leases(&p);
    assert!(
        before.values().all(|(id, s)| *id != 0 && s == "live"),
        "{before:?}"
    );
    // Idle.
    let leader = e.leader();
    e.kill(leader);
    let end = Instant::now() + Duration::from_secs(8);
    while Instant::now() < end {
        assert_eq!(leases(&p), before);
        std::thread::sleep(Duration::from_millis(200));
    }
    e.restart(leader);
    e.wait_ready();
    // During a drain: the leader dies once the first migrations run.
    let drain = common::procs::ferry()
        .args(["node", "drain", "a", "--json", "--cluster"])
        .arg(&p.file)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let in_flight = |p: &Procs| {
        let nodes = p.json(&["node", "status"]);
        let a = nodes
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == "a")
            .cloned();
        a.unwrap()["migrations_in_flight"].as_u64().unwrap()
    };
    until(Duration::from_secs(10), "the drain starts", || {
        in_flight(&p) > 0
    });
    let leader = e.leader();
    e.kill(leader);
    let mut most = 0;
    let mut drain = Some(drain);
    let mut out = None;
    until(Duration::from_secs(60), "the drain ends", || {
        most = most.max(in_flight(&p));
        rows(&p);
        if drain.as_mut().unwrap().try_wait().unwrap().is_some() {
            out = Some(drain.take().unwrap().wait_with_output().unwrap());
            return true;
        }
        false
    });
    let out = out.unwrap();
    assert!(out.status.success(), "{out:?}");
    let done: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(done["state"], "completed", "{done}");
    assert!(most <= 2, "{most} migrations at once");
    assert_eq!(leases(&p), before);
    let now = rows(&p);
    assert_eq!(now.len(), 6, "{now:?}");
    for r in &now {
        assert_ne!(r["node"], "a", "{r}");
        assert_eq!(r["state"], "running", "{r}");
        assert_eq!(r["restarts"], 0, "{r}");
    }
}

#[test]
fn with_quorum_lost_nodes_fence_nothing_is_replaced_and_all_runs_again_once() {
    if !available() {
        return;
    }
    let _serial = common::serial();
    let (mut e, p) = cluster("quorum-lost");
    for n in ["a", "b", "c"] {
        p.json(&[
            "vm",
            "create",
            &format!("on-{n}"),
            "--node",
            n,
            "--memory",
            "16MiB",
        ]);
    }
    let before = leases(&p);
    let placed: Vec<(String, String)> = rows(&p)
        .iter()
        .map(|r| {
            (
                r["name"].as_str().unwrap().into(),
                r["node"].as_str().unwrap().into(),
            )
        })
        .collect();
    e.kill(0);
    e.kill(1);
    // Fenced before any lease could expire; nothing runs twice or moves.
    until(Duration::from_secs(8), "every VM is fenced", || {
        rows(&p).iter().all(|r| r["state"] == "fenced")
    });
    let end = Instant::now() + Duration::from_secs(6);
    while Instant::now() < end {
        let now = rows(&p);
        assert_eq!(now.len(), 3, "{now:?}");
        assert!(now.iter().all(|r| r["state"] == "fenced"), "{now:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    e.restart(0);
    e.restart(1);
    e.wait_ready();
    // The leases lived on (a new leader extends them): the same guests run
    // again where they were, once, and none was restarted.
    until(Duration::from_secs(15), "every VM runs again", || {
        rows(&p).iter().all(|r| r["state"] == "running")
    });
    std::thread::sleep(Duration::from_secs(6));
    let now = rows(&p);
    let after: Vec<(String, String)> = now
        .iter()
        .map(|r| {
            (
                r["name"].as_str().unwrap().into(),
                r["node"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(after, placed);
    assert!(
        now.iter()
            .all(|r| r["state"] == "running" && r["restarts"] == 0),
        "{now:?}"
    );
    assert_eq!(leases(&p), before);
}
