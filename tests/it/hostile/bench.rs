//! `ferry bench hostile` as an operator runs it, against a live receiver
//! process and against in-process agents: every case keeps its promise and
//! the closing migration completes.

use super::common::agents::Agents;
use super::*;
use std::process::{Command, Stdio};

fn ferry() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
}

/// Runs the suite with `args`; returns its cases, checking it exited 0.
fn bench_hostile(args: &[&str]) -> Vec<serde_json::Value> {
    let out = ferry()
        .args(["bench", "hostile", "--json", "--flood", "24"])
        .args(args)
        .output()
        .unwrap();
    let cases: Vec<serde_json::Value> =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"));
    for c in &cases {
        eprintln!("{c}");
        assert_eq!(c["ok"], true, "{c}");
    }
    assert!(out.status.success(), "{out:?}");
    cases
}

#[test]
fn the_suite_against_a_keyed_receiver_process_keeps_every_promise() {
    let _serial = common::serial();
    let dir = std::env::temp_dir().join(format!("ferry-bench-hostile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("key");
    ferry::migration::auth::write_secret_file(&key, b"hostile-suite-key-0123456789").unwrap();
    let addr = format!("127.0.0.1:{}", common::free_port());
    let mut receiver = ferry()
        .args([
            "receive",
            "--listen",
            &addr,
            "--key",
            key.to_str().unwrap(),
            "--json",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while TcpStream::connect(&addr).is_err() {
        assert!(t.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(20));
    }
    let cases = bench_hostile(&["--target", &addr, "--key", key.to_str().unwrap()]);
    let names: Vec<&str> = cases.iter().map(|c| c["case"].as_str().unwrap()).collect();
    for want in [
        "garbage",
        "oversized_first_frame",
        "unproved_labelled_session",
        "migration_during_flood",
    ] {
        assert!(names.contains(&want), "{names:?}");
    }
    let _ = receiver.kill();
    let _ = receiver.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_suite_against_an_agent_keeps_every_promise_and_the_vm_is_where_records_say() {
    let _serial = common::serial();
    let Some(a) = Agents::start_with(
        "hostile-bench",
        "readonly_token_file = \"readonly.token\"\n[api]\nheader_timeout = \"1s\"",
        &[("a", ""), ("b", "")],
    ) else {
        return;
    };
    let file = a.file.to_str().unwrap().to_string();
    let cases = bench_hostile(&["--node", "b", "--cluster", &file]);
    assert!(cases.len() >= 9, "{cases:?}");
    // The probe VM moved to b and was removed; nothing else is anywhere.
    for node in ["a", "b"] {
        let (_, vms) = a.call(reqwest::Method::GET, node, "/v1/vms", None);
        assert_eq!(vms.as_array().unwrap().len(), 0, "{node}: {vms}");
    }
}
