use super::*;

fn phase(node: &str, phase: &str, ms: f64, wire_bytes: u64) -> PhaseRun {
    PhaseRun {
        node: node.into(),
        phase: phase.into(),
        ms,
        wire_bytes,
        migrations: 2,
        downtime_ms_max: ms / 100.0,
        by_delta: u32::from(phase == "failback"),
    }
}

fn run(scale: f64) -> CycleRun {
    let mut phases = Vec::new();
    for node in ["a", "b", "c"] {
        phases.push(phase(node, "drain", 1000.0 * scale, 100));
        phases.push(phase(node, "update", 10.0 * scale, 0));
        phases.push(phase(node, "failback", 800.0 * scale, 80));
    }
    CycleRun {
        total_ms: 6000.0 * scale,
        completed: true,
        error: None,
        phases,
    }
}

#[test]
fn the_summary_adds_each_phase_over_the_turns_and_keeps_the_rest_between() {
    let failed = CycleRun {
        completed: false,
        error: Some("node b's update hook failed".into()),
        ..run(100.0)
    };
    let s = summarize(&[run(1.0), run(2.0), failed]);
    assert_eq!((s.repeats, s.failures), (2, 1));
    let drain = &s.phases[0];
    assert_eq!(drain.phase, "drain");
    let d = drain.ms.unwrap();
    assert_eq!((d.median, d.min, d.max), (4500.0, 3000.0, 6000.0));
    assert_eq!(drain.wire_bytes, 300);
    assert_eq!(s.phases[2].wire_bytes, 240);
    assert_eq!(s.wire_bytes, 540);
    // 6 s and 12 s runs, of which 5.43 s and 10.86 s in phases.
    assert!(
        (s.between_ms - (9000.0 - 8145.0)).abs() < 1e-6,
        "{}",
        s.between_ms
    );
    // The failed run's pauses are not the cell's.
    assert_eq!(s.downtime_ms_max, 20.0);
    assert_eq!(s.by_delta, 3);
    let t = table(&s);
    assert!(t.contains("2 of 3 runs completed"), "{t}");
    assert!(t.contains("failback"), "{t}");
    assert!(t.contains("4.50 s (3.00-6.00)"), "{t}");
}

#[test]
fn the_files_hold_the_summary_and_every_run() {
    let dir = std::env::temp_dir().join(format!("ferry-cycle-bench-{}", std::process::id()));
    let runs = [run(1.0)];
    let meta = CycleMeta {
        vms_per_node: 2,
        guests: vec!["64MiB idle".into()],
        link_bps: Some(125_000_000),
        link: "cap".into(),
        codec: "auto".into(),
        max_concurrent: 2,
        max_concurrent_auto: true,
        delta: true,
        dense: true,
        retention_bytes: 4 << 30,
        update_ms: 0,
        repeats: 1,
        cores: 2,
        unix_time: 0,
    };
    write_outputs(&dir, &meta, &summarize(&runs), &runs).unwrap();
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("results.json")).unwrap()).unwrap();
    assert_eq!(json["runs"][0]["phases"].as_array().unwrap().len(), 9);
    assert_eq!(json["summary"]["phases"][1]["phase"], "update");
    let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
    assert!(md.contains("| b | failback | 0.80 s |"), "{md}");
    assert!(md.contains("1Gbit/s per node"), "{md}");
    assert!(
        md.contains("failback by delta on (retention 4.00 GiB)"),
        "{md}"
    );
    assert!(md.contains("updated (a no-op command)"), "{md}");
    let meta = CycleMeta {
        update_ms: 2500,
        ..meta
    };
    write_outputs(&dir, &meta, &summarize(&runs), &runs).unwrap();
    let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
    assert!(md.contains("updated (a command of 2.5 s)"), "{md}");
    std::fs::remove_dir_all(&dir).unwrap();
}
