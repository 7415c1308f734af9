//! `GET /metrics` against Prometheus's own checker (`promtool check
//! metrics`): the finished migrations' histograms, each running migration's
//! gauges labelled by VM, and the node's gauges.

use crate::common;
use common::agents::{Agents, READONLY_TOKEN};
use reqwest::{Method, StatusCode};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `promtool check metrics` of `text`: passes, or the test fails with what
/// it said.
fn promtool_check(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Node `node`'s metrics, scraped with the read-only token (as the README's
/// scrape configuration does).
fn scrape(c: &Agents, node: &str) -> String {
    let (s, text) = c.call_with(Some(READONLY_TOKEN), Method::GET, node, "/metrics", None);
    assert_eq!(s, StatusCode::OK, "{text}");
    text.as_str().unwrap().to_string()
}

/// The value of the sample `series` (name and labels, exactly) in `text`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn metrics_pass_promtool_with_histograms_and_a_running_migrations_gauges() {
    let _serial = common::serial();
    if !common::tool_available("promtool", "promtool (Debian's prometheus package)") {
        return;
    }
    let Some(c) = Agents::start_with(
        "metrics",
        "readonly_token_file = \"readonly.token\"",
        &[("a", ""), ("b", "")],
    ) else {
        return;
    };
    c.create_busy_web();
    let before = scrape(&c, "a");
    promtool_check(&before);
    assert_eq!(
        sample(&before, "ferry_migration_duration_seconds_count"),
        Some(0.0)
    );
    assert_eq!(
        sample(&before, "ferry_node_memory_used_bytes"),
        Some(64.0 * 1048576.0)
    );
    assert!(sample(&before, "ferry_node_lease_remaining_seconds").unwrap() > 0.0);
    let coordinators: f64 = ["a", "b"]
        .iter()
        .map(|n| sample(&scrape(&c, n), "ferry_node_coordinator").unwrap())
        .sum();
    assert_eq!(coordinators, 1.0, "exactly one node coordinates");
    // A migration slow enough to be seen running.
    let id = c.start_slow_migration();
    let labels = format!("{{vm=\"web\",migration=\"{id}\",target=\"b\"}}");
    let end = Instant::now() + Duration::from_secs(20);
    let running = loop {
        let text = scrape(&c, "a");
        let left = sample(&text, &format!("ferry_migration_remaining_bytes{labels}"));
        if left.is_some_and(|l| l > 0.0)
            && sample(
                &text,
                &format!("ferry_migration_wire_rate_bytes_per_second{labels}"),
            )
            .is_some_and(|r| r > 0.0)
        {
            break text;
        }
        assert!(Instant::now() < end, "never seen running:\n{text}");
        std::thread::sleep(Duration::from_millis(100));
    };
    promtool_check(&running);
    for gauge in [
        "ferry_migration_dirty_rate_bytes_per_second",
        "ferry_migration_throttle_ratio",
        "ferry_migration_guest_rate_bytes_per_second",
        "ferry_migration_expected_downtime_seconds",
    ] {
        assert!(
            running.contains(&format!("{gauge}{labels} ")),
            "{gauge}:\n{running}"
        );
    }
    assert_eq!(c.wait("a", &id)["state"], "completed");
    let (_, done) = c.call(Method::GET, "a", &format!("/v1/migrations/{id}"), None);
    let report = &done["report"];
    let after = scrape(&c, "a");
    promtool_check(&after);
    // The running gauges are gone with the migration; each histogram
    // counted it once, its sums the report's figures.
    assert!(!after.contains(&labels), "{after}");
    for h in ["duration_seconds", "downtime_seconds", "wire_bytes"] {
        let count = format!("ferry_migration_{h}_count");
        assert_eq!(sample(&after, &count), Some(1.0), "{h}:\n{after}");
        let inf = format!("ferry_migration_{h}_bucket{{le=\"+Inf\"}}");
        assert_eq!(sample(&after, &inf), Some(1.0), "{h}:\n{after}");
    }
    let sum = |h: &str| sample(&after, &format!("ferry_migration_{h}_sum")).unwrap();
    assert_eq!(sum("wire_bytes"), report["wire_bytes"].as_f64().unwrap());
    let total = report["total_ms"].as_f64().unwrap() / 1e3;
    assert!((sum("duration_seconds") - total).abs() < 1e-6, "{total}");
    let pause = report["downtime_ms"].as_f64().unwrap() / 1e3;
    assert!((sum("downtime_seconds") - pause).abs() < 1e-6, "{pause}");
    // The total time lands in its bucket: below 2.5 s none, by 30 s all.
    assert_eq!(
        sample(
            &after,
            "ferry_migration_duration_seconds_bucket{le=\"2.5\"}"
        ),
        Some(0.0)
    );
    assert_eq!(
        sample(&after, "ferry_migration_duration_seconds_bucket{le=\"30\"}"),
        Some(1.0)
    );
}
