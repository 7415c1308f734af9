//! Real KVM guests: moved between two `ferry` processes and inside one,
//! memory checked byte for byte, the guest's counter going on at the
//! destination, auto-converge on a vCPU, and the guest running again on the
//! source after a failure before GO. Every test skips, saying so, where there
//! is no working `/dev/kvm`.

use crate::common;

use common::{first_difference, free_port, parse_report, serial, SEED};
use ferry::codec::Codec;
use ferry::kvm::KvmGuest;
use ferry::memory::{ContentKind, FillSpec, GuestMemory, Workload, WorkloadPattern};
use ferry::migration::fault::Fault;
use ferry::migration::{MigrationConfig, Outcome};
use ferry::transport::{migrate_over_loopback, ReceiverConfig, RunContext};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn kvm_here() -> bool {
    match ferry::kvm::available() {
        Ok(()) => true,
        Err(e) => {
            common::missing(&format!(
                "KVM guests need a working /dev/kvm ({e}: {:?})",
                std::error::Error::source(&e)
            ));
            false
        }
    }
}

fn ferry() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
}

/// A running KVM guest on `memory` bytes of the default content mix.
fn kvm_guest(memory: u64, pattern: WorkloadPattern, dirty_rate: u64) -> Arc<KvmGuest> {
    kvm_guest_of(FillSpec::default(), memory, pattern, dirty_rate)
}

fn kvm_guest_of(
    fill: FillSpec,
    memory: u64,
    pattern: WorkloadPattern,
    dirty_rate: u64,
) -> Arc<KvmGuest> {
    let mem = Arc::new(GuestMemory::new(memory).unwrap());
    fill.fill(&mem, SEED, 2);
    let workload = Workload {
        pattern,
        dirty_rate,
        seed: SEED,
        ..Workload::default()
    };
    Arc::new(KvmGuest::start(mem, workload).unwrap())
}

#[test]
fn two_processes_move_a_running_512mib_kvm_guest_and_it_runs_on() {
    if !kvm_here() {
        return;
    }
    let _serial = serial();
    let addr = format!("127.0.0.1:{}", free_port());
    let receiver = ferry()
        .args(["receive", "--listen", &addr, "--once", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "receiver did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let send = ferry()
        .args([
            "send",
            "--to",
            &addr,
            "--guest",
            "kvm",
            "--memory",
            "512MiB",
            "--workload",
            "hot:64MiB",
            "--dirty-rate",
            "100MB/s",
            "--channels",
            "4",
            "--verify",
            "full",
            "--json",
        ])
        .output()
        .unwrap();
    let recv = receiver.wait_with_output().unwrap();
    let (s_out, r_out) = (
        String::from_utf8(send.stdout).unwrap(),
        String::from_utf8(recv.stdout).unwrap(),
    );
    assert!(
        send.status.success(),
        "send: {}",
        String::from_utf8_lossy(&send.stderr)
    );
    assert!(
        recv.status.success(),
        "receive: {}",
        String::from_utf8_lossy(&recv.stderr)
    );
    let s = parse_report(s_out.trim());
    let r = parse_report(r_out.trim());
    for rep in [&s, &r] {
        assert_eq!(rep["outcome"], "completed", "{rep}");
        assert_eq!(rep["guest"], "kvm");
        assert_eq!(rep["channels"], 4);
        assert_eq!(rep["memory_bytes"], 512 * MIB);
    }
    // Both sides hashed all of memory in the pause: the same bytes.
    assert_eq!(s["verify"], "full");
    assert_eq!(r["verified"], true);
    // The counter arrived as it was at the pause and grew on the destination.
    let at_pause = s["guest_counter_at_pause"].as_u64().unwrap();
    assert!(at_pause > 0);
    assert_eq!(r["guest_counter_at_pause"], at_pause);
    let after = r["guest_counter_after_resume"].as_u64().unwrap();
    assert!(
        after > at_pause,
        "counter {at_pause} at the pause, {after} after"
    );
    assert!(s["guest_counter_after_resume"].is_null());
}

#[test]
fn a_kvm_guest_arrives_byte_for_byte_and_carries_on() {
    if !kvm_here() {
        return;
    }
    let _serial = serial();
    let g = kvm_guest(
        64 * MIB,
        WorkloadPattern::Hot { bytes: 8 * MIB },
        100_000_000,
    );
    std::thread::sleep(Duration::from_millis(100));
    let config = MigrationConfig {
        leave_paused: true,
        ..MigrationConfig::default()
    };
    let (src, dst) = migrate_over_loopback(
        g.clone(),
        &config,
        RunContext::default(),
        ReceiverConfig::default(),
    )
    .unwrap();
    let dst = dst.unwrap();
    assert_eq!(src.outcome, Outcome::Completed, "{:?}", src.error);
    assert_eq!(dst.report.guest, ferry::wire::GuestKind::Kvm);
    let moved = dst.guest.clone().unwrap();
    // Paused on both sides: the same bytes, page for page.
    assert_eq!(first_difference(g.memory(), moved.memory()), None);
    let at_pause = src.guest_counter_at_pause.unwrap();
    assert_eq!(g.counter(), at_pause);
    assert_eq!(moved.progress_counter(), at_pause);
    assert_eq!(dst.report.guest_counter_at_pause, Some(at_pause));
    // The destination's vCPU runs it on; the source's never again.
    moved.resume();
    std::thread::sleep(Duration::from_millis(200));
    assert!(moved.progress_counter() > at_pause);
    assert_eq!(g.counter(), at_pause, "the source's copy ran after GO");
    // And it moves again, from its new home (a guest restored from a
    // state is a guest like any other).
    let (again, back) = migrate_over_loopback(
        moved.clone(),
        &config,
        RunContext::default(),
        ReceiverConfig::default(),
    )
    .unwrap();
    assert_eq!(again.outcome, Outcome::Completed, "{:?}", again.error);
    let back = back.unwrap().guest.unwrap();
    assert_eq!(first_difference(moved.memory(), back.memory()), None);
    assert_eq!(
        back.progress_counter(),
        again.guest_counter_at_pause.unwrap()
    );
}

#[test]
fn a_failure_before_go_runs_the_kvm_guest_again_on_the_source() {
    if !kvm_here() {
        return;
    }
    let _serial = serial();
    let g = kvm_guest(32 * MIB, WorkloadPattern::Uniform, 50_000_000);
    let receiver = ReceiverConfig {
        fault: Some("before-ready:abort".parse::<Fault>().unwrap()),
        ..ReceiverConfig::default()
    };
    let (src, dst) = migrate_over_loopback(
        g.clone(),
        &MigrationConfig::default(),
        RunContext::default(),
        receiver,
    )
    .unwrap();
    assert_eq!(src.outcome, Outcome::Failed);
    assert_eq!(src.guest_location, "source");
    assert!(
        src.guest_counter_at_pause.is_some(),
        "it failed after the pause"
    );
    assert!(dst.unwrap().guest.is_none(), "the destination kept no copy");
    assert!(g.is_running());
    let c = g.counter();
    std::thread::sleep(Duration::from_millis(100));
    assert!(g.counter() > c, "the source's vCPU runs again");
}

/// 40 MB/s with a 50 ms limit while the guest dirties 200 MB/s of random
/// content in a 16 MiB hot set: only throttling brings the pause under it.
fn capped(auto_converge: bool, timeout: Duration) -> MigrationConfig {
    MigrationConfig {
        codec: Codec::None.into(),
        max_bandwidth: Some(40_000_000),
        downtime_limit: Duration::from_millis(50),
        auto_converge,
        completion_timeout: Some(timeout),
        ..MigrationConfig::default()
    }
}

fn fast_kvm_dirtier() -> Arc<KvmGuest> {
    kvm_guest_of(
        FillSpec::only(ContentKind::Random),
        64 * MIB,
        WorkloadPattern::Hot { bytes: 16 * MIB },
        200_000_000,
    )
}

#[test]
fn auto_converge_throttles_a_kvm_guest_that_outruns_the_link() {
    if !kvm_here() {
        return;
    }
    let _serial = serial();
    // Without throttling it cannot converge: it gives up, the guest runs on.
    let g = fast_kvm_dirtier();
    let (src, _) = migrate_over_loopback(
        g.clone(),
        &capped(false, Duration::from_secs(3)),
        RunContext::default(),
        ReceiverConfig::default(),
    )
    .unwrap();
    assert_eq!(src.outcome, Outcome::Failed);
    assert!(src.error.as_deref().unwrap().contains("completion timeout"));
    assert_eq!(src.throttle_pct_max, 0);
    assert!(g.is_running());
    assert_eq!(g.throttle(), 0);
    drop(g);
    // With auto-converge the vCPU is throttled and the migration completes.
    let g = fast_kvm_dirtier();
    let config = MigrationConfig {
        leave_paused: true,
        ..capped(true, Duration::from_secs(60))
    };
    let (src, dst) = migrate_over_loopback(
        g.clone(),
        &config,
        RunContext::default(),
        ReceiverConfig::default(),
    )
    .unwrap();
    assert_eq!(src.outcome, Outcome::Completed, "{:?}", src.error);
    assert!(src.throttle_pct_max >= 20, "throttled: {:?}", src.round_log);
    let moved = dst.unwrap().guest.unwrap();
    assert_eq!(first_difference(g.memory(), moved.memory()), None);
}

#[test]
fn guest_kvm_without_a_kvm_device_is_a_one_line_error() {
    let out = ferry()
        .env(ferry::kvm::DEVICE_ENV, "/nonexistent/kvm")
        .args(["demo", "--guest", "kvm", "--memory", "64MiB"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("--guest kvm needs a working /nonexistent/kvm"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
}

mod agents {
    //! KVM VMs on node agents: created through the API, moved byte for byte,
    //! drained away and failed back home, running wherever they land.

    use super::{common, kvm_here};
    use common::agents::Agents;
    use common::first_difference;
    use reqwest::{Method, StatusCode};
    use serde_json::{json, Value};
    use std::time::Duration;

    fn vms(c: &Agents, node: &str) -> Vec<Value> {
        let (_, v) = c.call(Method::GET, node, "/v1/vms", None);
        v.as_array().unwrap().clone()
    }

    #[test]
    fn kvm_vms_move_between_agents_drain_and_fail_back() {
        if !kvm_here() {
            return;
        }
        let _serial = common::serial();
        let Some(c) = Agents::start("kvm", &[("a", ""), ("b", ""), ("c", "")]) else {
            return;
        };
        for i in 1..=3 {
            let (s, v) = c.call(
                Method::POST,
                "a",
                "/v1/vms",
                Some(json!({"name": format!("vm{i}"), "memory": "48MiB", "workload": "hot:4MiB", "dirty_rate": "20MB/s", "guest": "kvm"})),
            );
            assert_eq!(s, StatusCode::CREATED, "{v}");
            assert_eq!(
                (v["guest"].as_str(), v["state"].as_str()),
                (Some("kvm"), Some("running"))
            );
        }
        // One VM moved by hand, left paused: the same bytes on both nodes, and
        // the source's vCPU never runs again.
        let source = c.agent("a").node.guest("vm1").unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let (s, m) = c.call(
            Method::POST,
            "a",
            "/v1/migrations",
            Some(json!({"vm": "vm1", "target": "b", "leave_paused": true})),
        );
        assert_eq!(s, StatusCode::ACCEPTED, "{m}");
        let done = c.wait("a", m["id"].as_str().unwrap());
        assert_eq!(done["state"], "completed", "{done}");
        assert_eq!(done["report"]["guest"], "kvm");
        let target = c.agent("b").node.guest("vm1").unwrap();
        assert_eq!(first_difference(source.memory(), target.memory()), None);
        let at_pause = done["report"]["guest_counter_at_pause"].as_u64().unwrap();
        assert_eq!(target.progress_counter(), at_pause);
        let (_, v) = c.call(Method::GET, "b", "/v1/vms/vm1", None);
        assert_eq!(
            (v["guest"].as_str(), v["state"].as_str()),
            (Some("kvm"), Some("paused"))
        );
        target.resume();

        // Drain a: the other two go to b and c; fail back: those two come
        // home (vm1 left before the drain and stays on b).
        let (s, op) = c.call(Method::POST, "a", "/v1/node/drain", None);
        assert_eq!(s, StatusCode::ACCEPTED, "{op}");
        let drained = c.wait_op("a", op["id"].as_str().unwrap());
        assert_eq!(drained["state"], "completed", "{drained}");
        assert!(vms(&c, "a").is_empty());
        let away: Vec<Value> = [vms(&c, "b"), vms(&c, "c")].concat();
        assert_eq!(away.len(), 3);
        for v in &away {
            assert_eq!(v["guest"], "kvm", "{v}");
        }
        let (s, op) = c.call(
            Method::POST,
            "a",
            "/v1/node/resume",
            Some(json!({"failback": true})),
        );
        assert_eq!(s, StatusCode::ACCEPTED, "{op}");
        let back = c.wait_op("a", op["id"].as_str().unwrap());
        assert_eq!(back["state"], "completed", "{back}");
        let home = vms(&c, "a");
        let mut names: Vec<&str> = home.iter().map(|v| v["name"].as_str().unwrap()).collect();
        names.sort_unstable();
        assert_eq!(names, ["vm2", "vm3"], "{home:?}");
        for v in &home {
            assert_eq!(
                (v["guest"].as_str(), v["state"].as_str()),
                (Some("kvm"), Some("running")),
                "{v}"
            );
            let g = c
                .agent("a")
                .node
                .guest(v["name"].as_str().unwrap())
                .unwrap();
            let before = g.progress_counter();
            std::thread::sleep(Duration::from_millis(50));
            assert!(g.progress_counter() > before, "{} runs at home", v["name"]);
        }
    }
}

#[test]
fn demo_cluster_drains_and_fails_back_kvm_guests() {
    if !kvm_here() {
        return;
    }
    let _serial = serial();
    let out = ferry()
        .args([
            "demo", "cluster", "--guest", "kvm", "--vms", "2", "--memory", "32MiB",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("2 KVM VMs of 32MiB each on node a"), "{text}");
    assert!(text.contains("drain of node a completed"), "{text}");
    assert!(text.contains("resume of node a completed"), "{text}");
}

#[test]
fn bench_kvm_measures_the_dirty_log_and_the_switchover_steps() {
    if !kvm_here() {
        return;
    }
    let _serial = serial();
    let out = ferry()
        .args([
            "bench",
            "kvm",
            "--memory",
            "32MiB",
            "--repeats",
            "3",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["memory_bytes"], 32 * MIB);
    for key in [
        "sync_clean_us_per_gib",
        "writes_per_sec_hot_unharvested",
        "writes_per_sec_uniform",
        "state_bytes",
    ] {
        assert!(v[key].as_f64().unwrap() > 0.0, "{key}: {v}");
    }
    for key in [
        "sync_clean_us",
        "sync_dirty_us",
        "pause_us",
        "save_us",
        "restore_ms",
        "resume_us",
    ] {
        let s = &v[key];
        let (lo, med, hi) = (
            s["min"].as_f64().unwrap(),
            s["median"].as_f64().unwrap(),
            s["max"].as_f64().unwrap(),
        );
        assert!(0.0 < lo && lo <= med && med <= hi, "{key}: {s}");
    }
    // The unpaced guest dirtied pages between samples: the log saw them.
    assert!(v["sync_dirty_pages"].as_f64().unwrap() > 0.0, "{v}");
}
