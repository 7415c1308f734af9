//! `ferry bench drain` and `ferry bench cycle` as users run them: real
//! drains and a real rolling update between three in-process agents, with
//! their results, files and limits checked.

use crate::common;

use serde_json::Value;
use std::process::Command;

fn ferry() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
}

/// Each drain's VMs as (started, ended) ms from the drain's start.
fn spans(run: &Value) -> Vec<(f64, f64)> {
    run["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["waited_ms"].as_f64().unwrap(),
                v["ended_ms"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// The most migrations of one drain that were moving memory at once.
fn most_at_once(spans: &[(f64, f64)]) -> usize {
    spans
        .iter()
        .map(|&(start, _)| {
            spans
                .iter()
                .filter(|&&(s, e)| s <= start && start < e)
                .count()
        })
        .max()
        .unwrap_or(0)
}

#[test]
fn bench_drain_runs_real_drains_per_concurrency_and_writes_its_results() {
    // Real migrations: one at a time in this binary, as the others.
    let _serial = common::serial();
    // Its agents keep their state in an etcd member it starts.
    if !common::etcd::available() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("ferry-drain-cli-{}", std::process::id()));
    let out = ferry()
        .args([
            "bench",
            "drain",
            "--vms",
            "3",
            "--memory",
            "16MiB",
            "--workload",
            "idle,hot:4MiB",
            "--dirty-rate",
            "10MB/s",
            "--max-concurrent",
            "1,3,auto",
            "--codecs",
            "lz4",
            "--bandwidth",
            "100MB/s",
            "--repeats",
            "1",
            "--json",
            "--out",
        ])
        .arg(&dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(text.trim()).unwrap();
    let cells = v["cells"].as_array().unwrap();
    let levels: Vec<&str> = cells
        .iter()
        .map(|c| c["concurrency"].as_str().unwrap())
        .collect();
    assert_eq!(levels, ["1", "3", "auto"], "{v}");
    for c in cells {
        assert_eq!(
            (c["repeats"].as_u64(), c["failures"].as_u64()),
            (Some(1), Some(0)),
            "{c}"
        );
        assert!(c["drain_ms"]["median"].as_f64().unwrap() > 0.0, "{c}");
        // Three VMs of 16 MiB, half of them random-free text: compressed,
        // but never nothing.
        assert!(c["wire_bytes"].as_u64().unwrap() > 3 << 20, "{c}");
        let run = &c["runs"][0];
        for vm in run["vms"].as_array().unwrap() {
            assert_eq!(vm["completed"], true, "{vm}");
            assert!(["b", "c"].contains(&vm["target"].as_str().unwrap()), "{vm}");
            assert_eq!(vm["codec"], "lz4", "{vm}");
        }
        let at_once = most_at_once(&spans(run));
        match c["concurrency"].as_str().unwrap() {
            "1" => assert_eq!(at_once, 1, "one at a time: {run}"),
            "3" => assert!(at_once >= 2, "three allowed, {at_once} at once: {run}"),
            // 50 MB/s each of two is over twice the 10 MB/s writers: two.
            _ => {
                assert_eq!(run["max_concurrent"], 2, "{run}");
                assert!(run["auto"].as_str().unwrap().contains("2 at once"), "{run}");
                assert!(at_once <= 2, "{at_once} at once: {run}");
            }
        }
        let share = c["link_use"].as_f64().unwrap();
        assert!(share > 0.0 && share < 1.2, "the node's cap is shared: {c}");
    }
    let csv = std::fs::read_to_string(dir.join("results.csv")).unwrap();
    assert_eq!(csv.lines().count(), 4, "{csv}");
    let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
    assert!(md.contains("## What `auto` chose"), "{md}");
    assert!(md.contains("3 VMs (16.00 MiB idle"), "{md}");
    let charts = std::fs::read_dir(&dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("drain-time-")
        })
        .count();
    assert_eq!(charts, 2, "an SVG and a PNG for the one link");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bench_drain_refuses_bad_axes_naming_the_flag() {
    for (args, needle) in [
        (&["--max-concurrent", "0"][..], "out of range"),
        (&["--max-concurrent", "2,65"][..], "65"),
        (&["--vms", "0"][..], "--vms"),
        (&["--codecs", "gzip"][..], "gzip"),
        (&["--image", "relative.img"][..], "absolute"),
    ] {
        let out = ferry()
            .args(["bench", "drain"])
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn bench_cycle_updates_every_node_in_turn_and_brings_every_vm_home() {
    let _serial = common::serial();
    if !common::etcd::available() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("ferry-cycle-cli-{}", std::process::id()));
    let out = ferry()
        .args([
            "bench",
            "cycle",
            "--vms",
            "2",
            "--memory",
            "16MiB",
            "--workload",
            "idle",
            "--bandwidth",
            "200MB/s",
            "--repeats",
            "1",
            "--max-concurrent",
            "auto",
            "--json",
            "--out",
        ])
        .arg(&dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(text.trim()).unwrap();
    let s = &v["summary"];
    assert_eq!(
        (s["repeats"].as_u64(), s["failures"].as_u64()),
        (Some(1), Some(0)),
        "{v}"
    );
    let phases = v["runs"][0]["phases"].as_array().unwrap();
    let order: Vec<(&str, &str)> = phases
        .iter()
        .map(|p| (p["node"].as_str().unwrap(), p["phase"].as_str().unwrap()))
        .collect();
    let mut expected = Vec::new();
    for node in ["a", "b", "c"] {
        for phase in ["drain", "update", "failback"] {
            expected.push((node, phase));
        }
    }
    assert_eq!(order, expected, "{v}");
    for p in phases {
        let moved = p["migrations"].as_u64().unwrap();
        let wire = p["wire_bytes"].as_u64().unwrap();
        match p["phase"].as_str().unwrap() {
            // Each node's two VMs leave, with all their pages ...
            "drain" => {
                assert_eq!(moved, 2, "{p}");
                assert!(wire > 1 << 20, "{p}");
            }
            // ... and come back by delta: idle, they changed nothing.
            "failback" => {
                assert_eq!((moved, p["by_delta"].as_u64()), (2, Some(2)), "{p}");
                assert!(wire < 1 << 20, "{p}");
            }
            _ => assert_eq!((moved, p["wire_bytes"].as_u64()), (0, Some(0)), "{p}"),
        }
    }
    let total = s["total_ms"]["median"].as_f64().unwrap();
    let in_phases: f64 = phases.iter().map(|p| p["ms"].as_f64().unwrap()).sum();
    assert!(
        total >= in_phases * 0.99,
        "phases {in_phases} ms of a {total} ms run: {v}"
    );
    let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
    assert!(md.contains("| c | failback |"), "{md}");
    assert!(md.contains("auto (chosen by each node)"), "{md}");
    let results: Value =
        serde_json::from_slice(&std::fs::read(dir.join("results.json")).unwrap()).unwrap();
    assert_eq!(results["meta"]["max_concurrent_auto"], true, "{results}");
    std::fs::remove_dir_all(&dir).unwrap();
}
