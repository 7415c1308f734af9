use super::*;

fn vm(name: &str, total_ms: f64, downtime_ms: f64, wire_bytes: u64) -> VmRun {
    VmRun {
        vm: name.into(),
        target: "b".into(),
        completed: true,
        total_ms,
        downtime_ms,
        wire_bytes,
        waited_ms: 0.0,
        ended_ms: total_ms,
        codec: "lz4".into(),
        error: None,
    }
}

fn run(drain_ms: f64, vms: Vec<VmRun>) -> DrainRun {
    DrainRun {
        drain_ms: Some(drain_ms),
        completed: true,
        cpu_ms: 1000.0,
        peak_cpu_cores: 1.5,
        max_concurrent: 2,
        auto: None,
        vms,
    }
}

#[test]
fn a_cell_summarises_its_completed_drains_and_counts_the_rest() {
    let failed = DrainRun {
        completed: false,
        ..run(100.0, vec![vm("vm1", 1.0, 1.0, 1)])
    };
    let runs = [
        run(
            2000.0,
            vec![vm("vm1", 1000.0, 5.0, 100), vm("vm2", 1500.0, 7.0, 150)],
        ),
        run(
            4000.0,
            vec![vm("vm1", 3000.0, 9.0, 100), vm("vm2", 3500.0, 11.0, 150)],
        ),
        failed,
    ];
    let c = summarize("lz4", Some(125), "2", &runs);
    assert_eq!((c.repeats, c.failures), (2, 1));
    let d = c.drain_ms.unwrap();
    assert_eq!((d.median, d.min, d.max), (3000.0, 2000.0, 4000.0));
    assert_eq!(c.wire_bytes, 250);
    // 250 bytes in 2 s and in 4 s of a 125 B/s link: all of it, and half.
    assert!(
        (c.link_use.unwrap() - 0.75).abs() < 1e-9,
        "{:?}",
        c.link_use
    );
    let v = c.vm_total_ms.unwrap();
    assert_eq!((v.median, v.max), (2250.0, 3500.0));
    assert_eq!(c.downtime_ms.unwrap().max, 11.0);
    assert_eq!(c.peak_cpu_cores, 1.5);
}

#[test]
fn an_unlimited_link_has_no_share_and_a_cell_with_no_drain_no_time() {
    let c = summarize(
        "none",
        None,
        "1",
        &[run(1000.0, vec![vm("vm1", 900.0, 3.0, 9)])],
    );
    assert_eq!(c.link_use, None);
    let none = summarize("none", Some(1000), "1", &[]);
    assert_eq!(
        (none.drain_ms, none.link_use, none.repeats),
        (None, None, 0)
    );
    assert_eq!(secs_text(none.drain_ms), "failed");
}

#[test]
fn the_fastest_concurrency_of_each_link_and_codec_is_marked_if_it_never_failed() {
    let cell = |link, codec: &str, at: &str, ms: f64, failures| DrainCell {
        failures,
        ..summarize(codec, link, at, &[run(ms, vec![vm("vm1", ms, 1.0, 1)])])
    };
    let mut cells = vec![
        cell(Some(1), "lz4", "1", 900.0, 0),
        cell(Some(1), "lz4", "2", 500.0, 0),
        cell(Some(1), "lz4", "4", 400.0, 1),
        cell(Some(1), "zstd:1", "1", 300.0, 0),
        cell(None, "lz4", "1", 100.0, 0),
        cell(None, "lz4", "2", 200.0, 0),
    ];
    mark_best(&mut cells);
    let best: Vec<(Option<u64>, &str, &str)> = cells
        .iter()
        .filter(|c| c.best)
        .map(|c| (c.link_bps, c.codec.as_str(), c.concurrency.as_str()))
        .collect();
    assert_eq!(
        best,
        [
            (Some(1), "lz4", "2"),
            (Some(1), "zstd:1", "1"),
            (None, "lz4", "1")
        ]
    );
    let t = table(&cells);
    assert!(t.contains("link unlimited:"), "{t}");
    assert!(t.contains("2 at once"), "{t}");
    assert!(t.contains("0.50 s *"), "{t}");
    assert!(
        t.lines().any(|l| l.contains("zstd:1") && l.contains('-')),
        "{t}"
    );
}

#[cfg(feature = "net")]
#[test]
fn the_files_hold_every_cell_and_a_chart_per_link() {
    let dir = std::env::temp_dir().join(format!("ferry-drain-bench-{}", std::process::id()));
    let mut cells = vec![
        summarize(
            "lz4",
            Some(125_000_000),
            "1",
            &[run(800.0, vec![vm("vm1", 700.0, 4.0, 64)])],
        ),
        summarize(
            "lz4",
            Some(125_000_000),
            "2",
            &[run(600.0, vec![vm("vm1", 500.0, 4.0, 64)])],
        ),
        summarize(
            "lz4",
            None,
            "1",
            &[DrainRun {
                completed: false,
                ..run(1.0, vec![])
            }],
        ),
    ];
    mark_best(&mut cells);
    let meta = DrainMeta {
        link: "cap".into(),
        vms: 1,
        guests: vec!["64MiB idle".into()],
        repeats: 1,
        cores: 2,
        unix_time: 0,
    };
    write_outputs(dir.as_path(), &meta, &cells).unwrap();
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.as_path().join("results.json")).unwrap())
            .unwrap();
    assert_eq!(json["cells"].as_array().unwrap().len(), 3);
    assert_eq!(json["cells"][1]["best"], true);
    assert_eq!(json["meta"]["vms"], 1);
    let csv = std::fs::read_to_string(dir.as_path().join("results.csv")).unwrap();
    assert_eq!(csv.lines().count(), 4);
    assert!(csv.starts_with("codec,link_bps,concurrency,"), "{csv}");
    let md = std::fs::read_to_string(dir.as_path().join("report.md")).unwrap();
    assert!(md.contains("| 1Gbit/s | lz4 | 2 * | 0.60 s |"), "{md}");
    assert!(md.contains("## Failures"), "{md}");
    let charts = write_charts(dir.as_path(), &cells).unwrap();
    assert_eq!(charts.len(), 4);
    for c in charts {
        assert!(
            std::fs::metadata(&c).unwrap().len() > 1000,
            "{}",
            c.display()
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
