//! Operations that outlive a node they depend on, with a real three-member
//! etcd and three `ferry agent` processes: the coordinator's agent is
//! SIGKILLed mid-drain while its node is one of the drain's targets. The
//! drain completes: the VMs bound for the dead node go to the other one,
//! those already there are restarted elsewhere by HA, each VM runs exactly
//! once, and the drained node never sends more than 2 at once.

use crate::common;

use common::etcd::{available, EtcdCluster};
use common::procs::{ferry, Procs};
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Waits until `f` holds, checking every 50 ms.
fn until(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < end, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Node `name`'s view as `node status` gives it.
fn node(p: &Procs, name: &str) -> Value {
    let nodes = p.json(&["node", "status"]);
    nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == name)
        .cloned()
        .unwrap()
}

/// Each VM's rows in `vm list` (one per node that shows it).
fn placements(p: &Procs) -> BTreeMap<String, Vec<Value>> {
    let mut by_vm: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for r in p.json(&["vm", "list"]).as_array().unwrap() {
        by_vm
            .entry(r["name"].as_str().unwrap().to_string())
            .or_default()
            .push(r.clone());
    }
    by_vm
}

#[test]
fn a_drain_completes_when_the_coordinator_and_one_of_its_targets_dies() {
    if !available() {
        return;
    }
    let _serial = common::serial();
    let test = "survive-drain";
    let e = EtcdCluster::start(test, 3);
    let endpoints: Vec<String> = e.endpoints().iter().map(|m| format!("\"{m}\"")).collect();
    // A capped link, so the drain of six VMs takes seconds; the node would
    // send 4 at once, the drain asks for 2.
    let top = format!(
        "etcd = [{}]\netcd_prefix = \"/{test}/\"\nlease_ttl = \"3s\"\n[defaults]\nmax_bandwidth = \"40MB/s\"\nmax_concurrent_migrations = 4\n",
        endpoints.join(", ")
    );
    let mut p =
        Procs::start_with(test, &top, &[("a", "1GiB"), ("b", "1GiB"), ("c", "1GiB")]).unwrap();
    let boss = p.coordinator();
    let drained = ["a", "b", "c"].into_iter().find(|n| *n != boss).unwrap();
    let other = ["a", "b", "c"]
        .into_iter()
        .find(|n| *n != boss && *n != drained)
        .unwrap();
    let names: Vec<String> = (0..6).map(|i| format!("d{i}")).collect();
    for vm in &names {
        p.json(&[
            "vm",
            "create",
            vm,
            "--node",
            drained,
            "--memory",
            "64MiB",
            "--dirty-rate",
            "5MB/s",
        ]);
    }
    let drain = ferry()
        .args([
            "node",
            "drain",
            drained,
            "--max-concurrent",
            "2",
            "--json",
            "--cluster",
        ])
        .arg(&p.file)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Once a VM has reached the coordinator's node, the coordinator dies
    // with more on their way to it.
    until(
        Duration::from_secs(30),
        "a VM reaches the coordinator's node",
        || {
            placements(&p).values().any(|rows| {
                rows.iter()
                    .any(|r| r["node"] == boss.as_str() && r["state"] == "running")
            })
        },
    );
    p.signal(&boss, "-KILL");
    p.exited(&boss, Duration::from_secs(5)).expect("killed");
    let (mut most, mut drain, mut out) = (0, Some(drain), None);
    until(Duration::from_secs(90), "the drain ends", || {
        most = most.max(node(&p, drained)["migrations_in_flight"].as_u64().unwrap());
        for (vm, rows) in placements(&p) {
            let running = rows.iter().filter(|r| r["state"] == "running").count();
            assert!(running <= 1, "{vm} runs {running} times: {rows:?}");
        }
        if drain.as_mut().unwrap().try_wait().unwrap().is_some() {
            out = Some(drain.take().unwrap().wait_with_output().unwrap());
            return true;
        }
        false
    });
    let out = out.unwrap();
    let done: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    assert!(out.status.success(), "{done} {out:?}");
    assert_eq!(done["state"], "completed", "{done}");
    assert!(most <= 2, "{most} migrations at once");
    // Some step lost the dead node as its target and went to the other.
    let steps = done["steps"].as_array().unwrap();
    let moved_on: Vec<&Value> = steps
        .iter()
        .filter(|s| {
            s["tried"]
                .as_array()
                .is_some_and(|t| t.contains(&Value::from(boss.as_str())))
        })
        .collect();
    assert!(
        !moved_on.is_empty(),
        "no step tried {boss} and moved on: {done}"
    );
    for s in &moved_on {
        assert_eq!(
            (s["target"].as_str(), s["state"].as_str()),
            (Some(other), Some("completed")),
            "{s}"
        );
    }
    // Every VM runs once, on the surviving node: those the drain left on
    // the dead node were restarted there by HA, the rest migrated.
    until(
        Duration::from_secs(20),
        "every VM runs on the survivor",
        || {
            let now = placements(&p);
            now.len() == names.len()
                && now.values().all(|rows| {
                    rows.len() == 1 && rows[0]["node"] == other && rows[0]["state"] == "running"
                })
        },
    );
    let mut restarted = 0;
    for rows in placements(&p).values() {
        let r = &rows[0];
        let restarts = r["restarts"].as_u64().unwrap();
        assert!(restarts <= 1, "{r}");
        if restarts == 1 {
            let reason = r["last_restart"]["reason"].as_str().unwrap();
            assert!(reason.contains(&boss), "{r}");
            restarted += 1;
        }
    }
    // At least the VM that ran there when it died.
    assert!(restarted >= 1, "{:?}", placements(&p));
    drop(e);
}
