//! Cluster-Aware Updating as a cluster role, with a real three-member etcd
//! and three `ferry agent` processes: the coordinator carries the rolling
//! update, hands its role over before its own node's turn, and a
//! coordinator killed mid-update leaves the run to the next one, which
//! carries on from the run's journal in etcd.

use crate::common;

use common::etcd::{available, EtcdCluster};
use common::procs::Procs;
use serde_json::Value;
use std::time::{Duration, Instant};

fn cluster(test: &str) -> (EtcdCluster, Procs) {
    let e = EtcdCluster::start(test, 3);
    let endpoints: Vec<String> = e.endpoints().iter().map(|m| format!("\"{m}\"")).collect();
    let top = format!(
        "etcd = [{}]\netcd_prefix = \"/{test}/\"\nlease_ttl = \"3s\"\n[defaults]\nupdate_hook = [\"sh\", \"-c\"]\npreview_hook = [\"sh\", \"-c\", \"echo would install on $FERRY_NODE: $FERRY_UPDATE_COMMAND\"]",
        endpoints.join(", ")
    );
    let p = Procs::start_with(test, &top, &[("a", "1GiB"), ("b", "1GiB"), ("c", "1GiB")]).unwrap();
    for n in ["a", "b", "c"] {
        p.json(&[
            "vm",
            "create",
            &format!("vm-{n}"),
            "--node",
            n,
            "--memory",
            "32MiB",
        ]);
    }
    (e, p)
}

/// `ferry cluster update status`, read until `done` says it is what the
/// test waits for (at most `limit` seconds).
fn status_until(p: &Procs, limit: u64, done: impl Fn(&Value) -> bool) -> Value {
    let end = Instant::now() + Duration::from_secs(limit);
    loop {
        let s = p.json(&["cluster", "update", "status"]);
        if done(&s) {
            return s;
        }
        assert!(Instant::now() < end, "not within {limit} s: {s}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The run once it has ended.
fn ended(p: &Procs, limit: u64) -> Value {
    status_until(p, limit, |s| s["state"] != "running")
}

/// The nodes the update command ran on, in order.
fn updated(p: &Procs) -> Vec<String> {
    std::fs::read_to_string(p.dir.join("updated"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn command(p: &Procs, sleep: &str) -> String {
    format!(
        "echo $FERRY_NODE >> {}; sleep {sleep}",
        p.dir.join("updated").display()
    )
}

#[test]
fn a_rolling_update_hands_the_coordinator_role_over_before_its_own_node() {
    if !available() {
        return;
    }
    let _serial = common::serial();
    let (_e, p) = cluster("rolling-resign");
    let first = p.coordinator();
    let r = p.json(&["cluster", "update", "--run", &command(&p, "0.2")]);
    assert_eq!(r["state"], "completed", "{r}");
    let nodes = r["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3, "{r}");
    for n in nodes {
        assert_eq!(n["update"]["update"]["exit_code"], 0, "{n}");
        assert_eq!(n["resume"]["state"], "completed", "{n}");
    }
    assert_eq!(updated(&p), ["a", "b", "c"]);
    // The first coordinator handed its role over for its own node's turn:
    // another carried that turn (a coordinator never drives its own).
    let carried: Vec<&str> = r["coordinators"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert!(carried.iter().any(|c| *c != first), "{r}");
    // Failback brought every VM home.
    let home: Vec<(String, String, String)> = ["a", "b", "c"]
        .iter()
        .map(|n| (format!("vm-{n}"), n.to_string(), "running".to_string()))
        .collect();
    assert_eq!(p.vms(), home);
    let status = p.json(&["cluster", "update", "status"]);
    assert_eq!(status["state"], "completed", "{status}");
    assert_eq!(status["id"], r["id"]);

    // Cancelled, a run stops once the current node's turn ends.
    let started = p.json(&["cluster", "update", "--run", "sleep 1", "--detach"]);
    assert_ne!(started["id"], r["id"]);
    let out = p.run(&["cluster", "update", "--run", "true"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is running"),
        "{out:?}"
    );
    p.json(&["cluster", "update", "cancel"]);
    let run = ended(&p, 30);
    assert_eq!(run["state"], "cancelled", "{run}");
    assert_eq!(run["nodes"][2]["phase"], "pending", "{run}");
}

#[test]
fn a_rolling_update_carries_on_after_its_coordinator_is_killed() {
    if !available() {
        return;
    }
    let _serial = common::serial();
    let (_e, mut p) = cluster("rolling-kill");
    let boss = p.coordinator();
    let mut order: Vec<String> = ["a", "b", "c"]
        .iter()
        .filter(|n| **n != boss)
        .map(|n| n.to_string())
        .collect();
    order.push(boss.clone());
    let started = p.json(&[
        "cluster",
        "update",
        "--run",
        &command(&p, "3"),
        "--node-order",
        &order.join(","),
        "--detach",
    ]);
    assert_eq!(started["state"], "running", "{started}");
    // The coordinator dies while the first node runs its update command.
    status_until(&p, 30, |s| {
        s["nodes"][0]["phase"] == "updating" && s["nodes"][0]["update"].is_string()
    });
    p.signal(&boss, "-KILL");
    p.exited(&boss, Duration::from_secs(5)).expect("killed");
    // Its host comes back, as systemd would bring it.
    p.spawn(&boss);
    let run = ended(&p, 120);
    assert_eq!(run["state"], "completed", "{run}");
    for t in run["nodes"].as_array().unwrap() {
        assert_eq!(t["phase"], "done", "{t}");
    }
    // Each node was updated once, in order.
    assert_eq!(updated(&p), order);
    let carried = run["coordinators"].as_array().unwrap();
    assert_eq!(carried[0], boss.as_str(), "{run}");
    assert!(carried.iter().any(|c| c != boss.as_str()), "{run}");
    // Every VM runs once (the killed node's was restarted by the cluster).
    let vms = p.vms();
    let mut names: Vec<&str> = vms.iter().map(|(v, _, _)| v.as_str()).collect();
    names.dedup();
    assert_eq!(names, ["vm-a", "vm-b", "vm-c"], "{vms:?}");
    assert!(vms.iter().all(|(_, _, s)| s == "running"), "{vms:?}");
}

/// An update command that restarts the node's own agent (here it sends
/// the agent SIGTERM, and the test starts it again as systemd would)
/// succeeds once the agent is back within `--stop-after`; one that kills
/// it (SIGKILL: no clean stop) fails the node's turn.
#[test]
fn an_update_that_restarts_its_own_agent_succeeds_once_the_agent_is_back_and_a_crash_fails() {
    if !available() {
        return;
    }
    let _serial = common::serial();
    let (_e, mut p) = cluster("rolling-restart");
    let boss = p.coordinator();
    let node = ["a", "b", "c"].into_iter().find(|n| *n != boss).unwrap();
    let started = p.json(&[
        "cluster",
        "update",
        "--run",
        "kill -TERM $PPID; sleep 30",
        "--node-order",
        node,
        "--stop-after",
        "60s",
        "--detach",
    ]);
    assert_eq!(started["stop_after_ms"], 60_000, "{started}");
    let status = p
        .exited(node, Duration::from_secs(30))
        .expect("the update command stopped the agent");
    assert!(status.success(), "{status}");
    // From here on the node's records reach etcd half a second late: the
    // crash below lands well before, unless the update command waits for
    // its operation's record.
    p.set_env(node, "FERRY_FAULT_JOURNAL_DELAY_MS", "500");
    p.spawn(node);
    let run = ended(&p, 60);
    assert_eq!(run["state"], "completed", "{run}");
    assert_eq!(run["nodes"][0]["phase"], "done", "{run}");
    // Resumed with failback: the node's VM is home and running.
    let vms = p.vms();
    assert!(
        vms.contains(&(
            format!("vm-{node}"),
            node.to_string(),
            "running".to_string()
        )),
        "{vms:?}"
    );
    // An update command that kills its agent instead (a crash, not a
    // clean stop) fails the node's turn, even with the agent back in time.
    p.json(&[
        "cluster",
        "update",
        "--run",
        "kill -KILL $PPID; sleep 30",
        "--node-order",
        node,
        "--stop-after",
        "60s",
        "--detach",
    ]);
    let status = p
        .exited(node, Duration::from_secs(30))
        .expect("the update command killed the agent");
    assert!(!status.success(), "{status}");
    p.spawn(node);
    let run = ended(&p, 60);
    assert_eq!(run["state"], "failed", "{run}");
    assert_eq!(run["nodes"][0]["phase"], "failed", "{run}");
    // Read back by the node's next process, not guessed by the coordinator.
    assert!(
        run.to_string()
            .contains("ended without a clean stop while it ran"),
        "{run}"
    );
}

/// A clean stop of the node's agent after its update operation started but
/// before the command ran (the command waits for the operation's record to
/// reach etcd, slowed down here) ends the operation as not run: the turn
/// fails instead of counting the stop as the command's restart.
#[test]
fn a_stop_before_the_update_command_runs_fails_the_turn() {
    if !available() {
        return;
    }
    let _serial = common::serial();
    let e = EtcdCluster::start("rolling-unrun", 3);
    let endpoints: Vec<String> = e.endpoints().iter().map(|m| format!("\"{m}\"")).collect();
    let top = format!(
        "etcd = [{}]\netcd_prefix = \"/rolling-unrun/\"\nlease_ttl = \"3s\"\n[defaults]\nupdate_hook = [\"sh\", \"-c\"]",
        endpoints.join(", ")
    );
    let mut p = Procs::start_with("rolling-unrun", &top, &[("a", "1GiB"), ("b", "1GiB")]).unwrap();
    let node = if p.coordinator() == "a" { "b" } else { "a" };
    // The node's records reach etcd 2 s late from here on.
    p.signal(node, "-TERM");
    p.exited(node, Duration::from_secs(30)).expect("stopped");
    p.set_env(node, "FERRY_FAULT_JOURNAL_DELAY_MS", "2000");
    p.spawn(node);
    p.json(&[
        "cluster",
        "update",
        "--run",
        &command(&p, "0"),
        "--node-order",
        node,
        "--detach",
    ]);
    // Its update operation exists (the coordinator recorded its id): stop
    // the agent while the command still waits for the record.
    status_until(&p, 60, |s| s["nodes"][0]["update"].is_string());
    p.signal(node, "-TERM");
    let status = p.exited(node, Duration::from_secs(30)).expect("stopped");
    assert!(status.success(), "{status}");
    p.spawn(node);
    let run = ended(&p, 60);
    assert_eq!(run["state"], "failed", "{run}");
    assert!(run.to_string().contains("not run"), "{run}");
    assert!(updated(&p).is_empty(), "the command ran: {:?}", updated(&p));
}

/// A rolling update on a schedule starts by itself, once for its slot,
/// and says which slot; a schedule that does not parse is refused naming
/// what is wrong.
#[test]
fn a_scheduled_rolling_update_starts_by_itself() {
    if !available() {
        return;
    }
    let _serial = common::serial();
    let (_e, p) = cluster("rolling-schedule");
    let out = p.run(&[
        "cluster",
        "update",
        "--run",
        "true",
        "--schedule",
        "funday 03:00",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("day \"funday\""),
        "{out:?}"
    );
    let s = p.json(&[
        "cluster",
        "update",
        "--run",
        &command(&p, "0.1"),
        "--schedule",
        "every 3s",
    ]);
    let slot = s["next_at_ms"].as_u64().unwrap();
    assert!(p.json(&["cluster", "update", "status"])["id"].is_null());
    // It starts by itself; the schedule goes once it has.
    let s = status_until(&p, 30, |s| s["id"].is_string());
    assert_eq!(s["scheduled_for_ms"], slot, "{s}");
    let id = s["id"].as_str().unwrap().to_string();
    let removed = p.json(&["cluster", "update", "unschedule"]);
    assert_eq!(removed["last_run"], id.as_str(), "{removed}");
    let run = ended(&p, 60);
    assert_eq!(run["state"], "completed", "{run}");
    assert_eq!(run["id"], id.as_str());
    assert!(run["schedule"].is_null(), "{run}");
    assert_eq!(updated(&p), ["a", "b", "c"]);
}

/// CAU's failure policy: a failed phase is tried again up to
/// `--max-retries-per-node` times, and a node whose turn still fails is
/// left paused while the run goes on, up to `--max-failed-nodes`.
#[test]
fn failed_nodes_are_retried_then_passed_within_the_limits() {
    if !available() {
        return;
    }
    let _serial = common::serial();
    let (_e, p) = cluster("rolling-failures");
    // Each node's command fails once, then works; b's fails always.
    let flag = p.dir.join("tried");
    let cmd = format!(
        "echo $FERRY_NODE >> {updated}; [ $FERRY_NODE != b ] && test -e {flag}-$FERRY_NODE || {{ touch {flag}-$FERRY_NODE; exit 1; }}",
        updated = p.dir.join("updated").display(),
        flag = flag.display()
    );
    let out = p.run(&[
        "cluster",
        "update",
        "--run",
        &cmd,
        "--max-retries-per-node",
        "1",
        "--max-failed-nodes",
        "1",
        "--require-all-nodes-online",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let status = p.json(&["cluster", "update", "status"]);
    assert_eq!(status["state"], "failed", "{status}");
    let turns = status["nodes"].as_array().unwrap();
    let phase = |i: usize| turns[i]["phase"].as_str().unwrap();
    assert_eq!((phase(0), phase(1), phase(2)), ("done", "failed", "done"));
    for t in turns {
        assert_eq!(t["attempts"], 1, "{t}");
        assert_eq!(t["discarded"].as_array().unwrap().len(), 1, "{t}");
    }
    assert!(
        status["error"].as_str().unwrap().contains("node b"),
        "{status}"
    );
    // Twice each: a failed try, then the retry.
    assert_eq!(updated(&p), ["a", "a", "b", "b", "c", "c"]);
    // b is left paused; a and c took their VMs back.
    let nodes = p.json(&["node", "status"]);
    let state = |n: &str| {
        nodes
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == n)
            .unwrap()["state"]
            .clone()
    };
    assert_eq!(state("b"), "paused", "{nodes}");
    assert_eq!(state("a"), "active", "{nodes}");
    // Too many allowed failures, or too many retries, are refused.
    let out = p.run(&[
        "cluster",
        "update",
        "--run",
        "true",
        "--max-failed-nodes",
        "3",
    ]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("max_failed_nodes"),
        "{out:?}"
    );
}

/// CAU's analyzer and preview, and its pre- and post-update commands: the
/// analyzer finds the cluster ready (and says why not once a node is
/// down), the preview runs each node's preview hook (never the update
/// hook), and each node runs the pre-update command before its drain and
/// the post-update command after its resume.
#[test]
fn analyze_preview_and_pre_and_post_update_commands() {
    if !available() {
        return;
    }
    let _serial = common::serial();
    let (e, mut p) = cluster("rolling-analyze");
    let a = p.json(&["cluster", "update", "--analyze"]);
    assert_eq!(a["ready"], true, "{a}");
    let checks = a["checks"].as_array().unwrap();
    let etcd_ok = checks
        .iter()
        .filter(|c| c["check"].as_str().unwrap().starts_with("etcd ") && c["ok"] == true)
        .count();
    assert_eq!(etcd_ok, e.endpoints().len(), "{a}");
    let out = p.run(&[
        "cluster",
        "update",
        "--run",
        "apt-get -y upgrade",
        "--preview",
    ]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    for n in ["a", "b", "c"] {
        assert!(
            text.contains(&format!("would install on {n}: apt-get -y upgrade")),
            "{text}"
        );
    }
    assert!(updated(&p).is_empty(), "the preview ran no update");
    let marker = p.dir.join("updated");
    let log = |what: &str| format!("echo {what}$FERRY_NODE >> {}", marker.display());
    let r = p.json(&[
        "cluster",
        "update",
        "--run",
        &log(""),
        "--pre-update",
        &log("pre-"),
        "--post-update",
        &log("post-"),
    ]);
    assert_eq!(r["state"], "completed", "{r}");
    let status = p.json(&["cluster", "update", "status"]);
    for t in status["nodes"].as_array().unwrap() {
        assert!(t["pre"].is_string() && t["post"].is_string(), "{t}");
    }
    let expect: Vec<String> = ["a", "b", "c"]
        .iter()
        .flat_map(|n| [format!("pre-{n}"), n.to_string(), format!("post-{n}")])
        .collect();
    assert_eq!(updated(&p), expect);
    // A node down: not ready, and the analyzer says which.
    p.signal("c", "-KILL");
    p.exited("c", Duration::from_secs(5)).unwrap();
    let out = p.run(&["cluster", "update", "--analyze"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with("FAIL") && l.contains("node c online")),
        "{text}"
    );
}

/// Issue 14's number: how long a rolling update waits when its coordinator
/// dies, from the SIGKILL to the next coordinator's first write of the run,
/// with the default 5 s lease, over 5 runs. `cargo test --release --test it
/// rolling::measure -- --ignored --nocapture`
#[test]
#[ignore]
fn measure_the_time_from_a_coordinators_death_to_its_update_going_on() {
    let _serial = common::serial();
    let test = "rolling-measure";
    let e = EtcdCluster::start(test, 3);
    let endpoints: Vec<String> = e.endpoints().iter().map(|m| format!("\"{m}\"")).collect();
    let top = format!(
        "etcd = [{}]\netcd_prefix = \"/{test}/\"\n[defaults]\nupdate_hook = [\"sh\", \"-c\"]",
        endpoints.join(", ")
    );
    let mut p =
        Procs::start_with(test, &top, &[("a", "1GiB"), ("b", "1GiB"), ("c", "1GiB")]).unwrap();
    let mut took = Vec::new();
    for _ in 0..5 {
        let boss = p.coordinator();
        let node = ["a", "b", "c"].into_iter().find(|n| *n != boss).unwrap();
        p.json(&[
            "cluster",
            "update",
            "--run",
            "sleep 2",
            "--node-order",
            node,
            "--detach",
        ]);
        status_until(&p, 30, |s| s["nodes"][0]["phase"] == "updating");
        p.signal(&boss, "-KILL");
        let killed = Instant::now();
        p.exited(&boss, Duration::from_secs(5)).expect("killed");
        status_until(&p, 30, |s| {
            s["coordinators"]
                .as_array()
                .and_then(|c| c.last())
                .is_some_and(|c| c != boss.as_str())
        });
        took.push(killed.elapsed().as_secs_f64());
        ended(&p, 60);
        p.spawn(&boss);
    }
    took.sort_by(f64::total_cmp);
    eprintln!(
        "coordinator death to its update going on, lease TTL 5 s, 5 runs: median {:.2} s, min {:.2} s, max {:.2} s",
        took[2], took[0], took[4]
    );
}
