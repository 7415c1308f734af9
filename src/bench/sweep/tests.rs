//! The sweep's summaries, winners, table and output files.

use super::*;
use crate::migration::{CpuMs, PageCounts, Side};
use crate::wire::{GuestKind, VerifyMode};

fn report(total: f64, downtime: f64, outcome: Outcome) -> Report {
    Report {
        side: Side::Source,
        outcome,
        error: None,
        guest_location: "destination".into(),
        verified: true,
        verify: VerifyMode::Fast,
        verify_ms: 0.1,
        memory_bytes: 1 << 20,
        pages: PageCounts::default(),
        rounds: 2,
        total_ms: total,
        setup_ms: 1.0,
        downtime_ms: downtime,
        guest_bytes_sent: 1 << 20,
        wire_bytes: 500_000,
        compression_ratio: 2.0,
        throughput_guest_bps: 1e8,
        throughput_wire_bps: 5e7,
        dirty_rate_bps: 0.0,
        throttle_pct_max: 0,
        channels: 4,
        codec: "lz4".into(),
        max_bandwidth_bps: None,
        cpu_ms: CpuMs {
            source: Some(10.0),
            destination: Some(5.0),
        },
        guest: GuestKind::Sim,
        guest_counter_at_pause: None,
        guest_counter_after_resume: None,
        session_id: String::new(),
        authenticated: false,
        encrypted: false,
        frames_authenticated: false,
        channel_failures: 0,
        batches_resent: 0,
        channel_rebinds: 0,
        saved_to: None,
        round_log: vec![],
        memory_use: Default::default(),
        guests_here: None,
        delta: Default::default(),
    }
}

#[test]
fn summaries_take_medians_of_completed_runs() {
    let runs = [
        report(100.0, 5.0, Outcome::Completed),
        report(300.0, 7.0, Outcome::Completed),
        report(200.0, 6.0, Outcome::Completed),
        report(1.0, 1.0, Outcome::Failed),
    ];
    let c = summarize("lz4", Some(125_000_000), "idle-mix", &runs);
    assert_eq!(c.repeats, 3);
    assert_eq!(c.failures, 1);
    assert_eq!(
        c.total_ms,
        Some(Spread {
            median: 200.0,
            min: 100.0,
            max: 300.0
        })
    );
    assert_eq!(c.downtime_ms.unwrap().median, 6.0);
    assert_eq!(
        c.cpu_ms,
        CellCpu {
            source: 10.0,
            destination: 5.0
        }
    );
    assert_eq!(c.compression_ratio, 2.0);
    let none = summarize("lz4", None, "g", &[report(1.0, 1.0, Outcome::Failed)]);
    assert_eq!(none.total_ms, None);
}

#[test]
fn what_auto_chose_comes_from_one_run() {
    // Each run compressed with one codec: medians codec by codec would all
    // be 0, as if nothing had been compressed.
    let run = |total: f64, by: CompressedBy| {
        let mut r = report(total, 1.0, Outcome::Completed);
        r.pages.total = 100;
        r.pages.compressed_by = by;
        r
    };
    let one = |lz4, zstd, zstd_stream| CompressedBy {
        lz4,
        zstd,
        zstd_stream,
    };
    let runs = [
        run(300.0, one(90, 0, 0)),
        run(100.0, one(0, 90, 0)),
        run(200.0, one(0, 0, 90)),
    ];
    let c = summarize("auto", None, "g", &runs);
    assert_eq!((c.pages_total, c.pages_compressed_by), (100, one(0, 0, 90)));
}

fn cell(codec: &str, link: Option<u64>, guest: &str, total: f64, failures: u32) -> Cell {
    let mut c = summarize(
        codec,
        link,
        guest,
        &[report(total, 5.0, Outcome::Completed)],
    );
    c.failures = failures;
    c
}

#[test]
fn one_winner_per_link_and_guest_and_never_a_failing_cell() {
    let mut cells = vec![
        cell("none", None, "a", 100.0, 0),
        cell("lz4", None, "a", 150.0, 0),
        cell("none", Some(1), "a", 900.0, 0),
        cell("lz4", Some(1), "a", 400.0, 0),
        cell("zstd:1", Some(1), "a", 300.0, 1), // fastest but one run failed
        cell("none", Some(1), "b", 50.0, 0),
    ];
    mark_winners(&mut cells);
    let winners: Vec<(&str, Option<u64>, &str)> = cells
        .iter()
        .filter(|c| c.winner)
        .map(|c| (c.codec.as_str(), c.link_bps, c.guest.as_str()))
        .collect();
    assert_eq!(
        winners,
        [
            ("none", None, "a"),
            ("lz4", Some(1), "a"),
            ("none", Some(1), "b")
        ]
    );
    let t = table(&cells);
    assert!(
        t.contains("guest a") && t.contains("guest b") && t.contains("unlimited"),
        "{t}"
    );
    assert!(t.contains("400 ms *"), "{t}");
}

#[test]
fn plain_and_tls_cells_each_have_their_winner_and_row() {
    let mut cells = vec![
        cell("none", None, "a", 100.0, 0),
        cell("lz4", None, "a", 150.0, 0),
        cell("none", None, "a", 300.0, 0).over_tls(true),
        cell("lz4", None, "a", 200.0, 0).over_tls(true),
    ];
    mark_winners(&mut cells);
    let winners: Vec<String> = cells.iter().filter(|c| c.winner).map(Cell::row).collect();
    assert_eq!(winners, ["none", "lz4+tls"]);
    let t = table(&cells);
    assert!(t.contains("lz4+tls") && t.contains("200 ms *"), "{t}");
}

#[test]
fn cells_without_dense_pages_compete_and_say_so_in_their_row() {
    let mut cells = vec![
        cell("lz4", None, "a", 150.0, 0),
        cell("lz4", None, "a", 120.0, 0).with_dense(false),
        cell("lz4", None, "a", 200.0, 0)
            .with_dense(false)
            .over_tls(true),
    ];
    mark_winners(&mut cells);
    let winners: Vec<String> = cells.iter().filter(|c| c.winner).map(Cell::row).collect();
    assert_eq!(winners, ["lz4-dense", "lz4-dense+tls"]);
}

#[test]
fn link_labels() {
    assert_eq!(link_label(None), "unlimited");
    assert_eq!(link_label(Some(125_000_000)), "1Gbit/s");
    assert_eq!(link_label(Some(12_500_000)), "100Mbit/s");
    assert_eq!(link_label(Some(1_000_001)), "1.00 MB/s");
}

#[test]
fn outputs_are_written_and_parse() {
    let mut auto = cell("auto", None, "a", 120.0, 0);
    auto.pages_total = 1000;
    auto.pages_compressed_by = CompressedBy {
        lz4: 600,
        zstd: 0,
        zstd_stream: 250,
    };
    let mut cells = vec![
        cell("none", None, "a", 100.0, 0),
        cell("lz4", None, "a", 150.0, 0),
        auto,
    ];
    mark_winners(&mut cells);
    let dir = std::env::temp_dir().join(format!("ferry-sweep-{}", std::process::id()));
    let meta = SweepMeta {
        link: "cap".into(),
        channels: 4,
        repeats: 1,
        tls: "off".into(),
        dense: "on".into(),
        cores: 2,
        unix_time: 0,
    };
    write_outputs(&dir, &meta, &cells).unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("results.json")).unwrap()).unwrap();
    let c = &v["cells"][0];
    for key in [
        "codec",
        "link_bps",
        "guest",
        "repeats",
        "total_ms",
        "downtime_ms",
        "wire_bytes",
        "compression_ratio",
        "cpu_ms",
        "winner",
    ] {
        assert!(c.get(key).is_some(), "cell lacks {key}");
    }
    assert!(c["link_bps"].is_null());
    assert_eq!(c["total_ms"]["median"], 100.0);
    assert_eq!(c["cpu_ms"]["source"], 10.0);
    assert_eq!(c["winner"], true);
    let csv = std::fs::read_to_string(dir.join("results.csv")).unwrap();
    assert_eq!(csv.lines().count(), 4);
    assert!(
        csv.lines().nth(3).unwrap().ends_with(",1000,600,0,250"),
        "{csv}"
    );
    assert!(csv
        .lines()
        .nth(1)
        .unwrap()
        .starts_with("none,,a,1,0,100.000"));
    let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
    assert!(md.contains("| a | unlimited | none |"), "{md}");
    // What auto chose, as shares of the pages sent.
    assert!(
        md.contains("| a | unlimited | auto | 60 % | 0 % | 25 % | 15 % |"),
        "{md}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
