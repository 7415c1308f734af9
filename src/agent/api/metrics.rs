//! `GET /metrics`: the node's counters and gauges in Prometheus's text format.

use super::*;
use crate::agent::node::ProgressView;

pub(super) async fn metrics(State(node): State<Arc<Node>>) -> Response {
    let m = &node.metrics;
    let (vms, running, queued, rate) = node.gauges();
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, lines: &[(String, f64)]| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for (labels, v) in lines {
            out.push_str(&format!("{name}{labels} {v}\n"));
        }
    };
    let outcomes = ["completed", "failed", "cancelled", "unresolved"];
    metric(
        "ferry_migrations_total",
        "counter",
        "Outgoing migrations finished, by outcome.",
        &outcomes
            .iter()
            .zip(&m.outcomes)
            .map(|(o, c)| {
                (
                    format!("{{outcome=\"{o}\"}}"),
                    c.load(Ordering::Relaxed) as f64,
                )
            })
            .collect::<Vec<_>>(),
    );
    metric(
        "ferry_migrations_received_total",
        "counter",
        "Incoming migrations completed on this node.",
        &[(String::new(), m.received.load(Ordering::Relaxed) as f64)],
    );
    metric(
        "ferry_migration_bytes_sent_total",
        "counter",
        "Wire bytes of finished outgoing migrations.",
        &[(String::new(), m.bytes_sent.load(Ordering::Relaxed) as f64)],
    );
    metric(
        "ferry_migration_rate_bytes_per_second",
        "gauge",
        "Wire rate of the outgoing migrations running now.",
        &[(String::new(), rate.round())],
    );
    metric(
        "ferry_migrations_running",
        "gauge",
        "Outgoing migrations running now.",
        &[(String::new(), running as f64)],
    );
    metric(
        "ferry_migration_queue_depth",
        "gauge",
        "Outgoing migrations waiting for a slot.",
        &[(String::new(), queued as f64)],
    );
    if let Some(stats) = node.refusals.get() {
        metric(
            "ferry_sessions_refused_total",
            "counter",
            "Connections and sessions the migration listener refused, by reason.",
            &stats
                .refused()
                .into_iter()
                .map(|(why, n)| (format!("{{reason=\"{why}\"}}"), n as f64))
                .collect::<Vec<_>>(),
        );
    }
    metric(
        "ferry_api_requests_refused_total",
        "counter",
        "Control API connections and requests refused, by reason.",
        &node
            .api_stats
            .refused()
            .into_iter()
            .map(|(why, n)| (format!("{{reason=\"{why}\"}}"), n as f64))
            .collect::<Vec<_>>(),
    );
    if let Some(live) = node.liveness.get() {
        let (reads, writes) = live.etcd().counts();
        metric(
            "ferry_etcd_requests_total",
            "counter",
            "Key-value requests this agent made to etcd, by kind.",
            &[
                ("{kind=\"read\"}".to_string(), reads as f64),
                ("{kind=\"write\"}".to_string(), writes as f64),
            ],
        );
    }
    metric(
        "ferry_vms_hosted",
        "gauge",
        "VMs on this node, arriving ones included.",
        &[(String::new(), vms as f64)],
    );
    metric(
        "ferry_event_streams_opened_total",
        "counter",
        "Event streams opened: this node's (/v1/events) and the cluster's (/v1/cluster/events).",
        &[
            (
                "{stream=\"node\"}".to_string(),
                m.event_streams[0].load(Ordering::Relaxed) as f64,
            ),
            (
                "{stream=\"cluster\"}".to_string(),
                m.event_streams[1].load(Ordering::Relaxed) as f64,
            ),
        ],
    );
    metric(
        "ferry_event_subscribers",
        "gauge",
        "Streams reading this node's events now (the cluster streams' readers included).",
        &[(String::new(), node.events.subscribers() as f64)],
    );
    metric(
        "ferry_events_published_total",
        "counter",
        "Events this node published (things that changed, while anyone listened).",
        &[(String::new(), node.events.published() as f64)],
    );
    node_gauges(&node, &mut metric);
    running_gauges(&node, &mut metric);
    histograms(m, &mut out);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

/// Adds one metric: its name, type, help and labelled values.
type Metric<'a> = dyn FnMut(&str, &str, &str, &[(String, f64)]) + 'a;

/// The node's memory, lease and whether it coordinates the cluster.
fn node_gauges(node: &Node, metric: &mut Metric) {
    let view = node.view();
    metric(
        "ferry_node_memory_used_bytes",
        "gauge",
        "Memory this node's VMs use, warm copies of VMs that left included.",
        &[(String::new(), view.memory_used as f64)],
    );
    metric(
        "ferry_node_memory_capacity_bytes",
        "gauge",
        "Memory this node offers its VMs.",
        &[(String::new(), view.memory_capacity as f64)],
    );
    if let Some(lease) = &view.lease {
        metric(
            "ferry_node_lease_remaining_seconds",
            "gauge",
            "Time left on this node's lease in etcd without another renewal.",
            &[(String::new(), lease.left_s)],
        );
    }
    if node.liveness.get().is_some() {
        let me = view.coordinator.as_deref() == Some(node.name());
        metric(
            "ferry_node_coordinator",
            "gauge",
            "1 while this node is the cluster's elected coordinator, else 0.",
            &[(String::new(), f64::from(u8::from(me)))],
        );
    }
}

/// One figure of a running migration's progress.
type Figure<'a> = &'a dyn Fn(&ProgressView) -> f64;

/// Each running outgoing migration's figures, labelled by VM.
fn running_gauges(node: &Node, metric: &mut Metric) {
    let running = node.running_out();
    let series = |f: Figure| -> Vec<(String, f64)> {
        running
            .iter()
            .map(|(id, vm, target, p)| {
                let labels = format!(
                    "{{vm=\"{}\",migration=\"{}\",target=\"{}\"}}",
                    label(vm),
                    label(id),
                    label(target)
                );
                (labels, f(p))
            })
            .collect()
    };
    let gauges: [(&str, &str, Figure); 6] = [
        ("ferry_migration_remaining_bytes", "Guest bytes a running migration still has to send (this round's and those dirtied since).", &|p| p.bytes_left as f64),
        ("ferry_migration_dirty_rate_bytes_per_second", "What the guest of a running migration dirtied in its last round, per second.", &|p| p.dirty_rate_bps),
        ("ferry_migration_throttle_ratio", "Auto-converge throttle of a running migration's guest (0 to 1).", &|p| f64::from(p.throttle_pct) / 100.0),
        ("ferry_migration_guest_rate_bytes_per_second", "Guest bytes a running migration sends per second.", &|p| p.throughput_bps.round()),
        ("ferry_migration_wire_rate_bytes_per_second", "Wire bytes a running migration sends per second.", &|p| p.wire_bps.round()),
        ("ferry_migration_expected_downtime_seconds", "The pause a running migration expects if its guest stopped now.", &|p| p.expected_downtime_ms.map_or(f64::NAN, |ms| ms / 1e3)),
    ];
    for (name, help, f) in gauges {
        metric(name, "gauge", help, &series(f));
    }
}

/// The finished migrations' histograms.
fn histograms(m: &crate::agent::node::Metrics, out: &mut String) {
    m.duration.render(
        out,
        "ferry_migration_duration_seconds",
        "Total time of each finished outgoing migration.",
    );
    m.downtime.render(
        out,
        "ferry_migration_downtime_seconds",
        "The guest's pause in each completed outgoing migration.",
    );
    m.wire_bytes.render(
        out,
        "ferry_migration_wire_bytes",
        "Wire bytes of each finished outgoing migration.",
    );
}

/// A label's value, escaped for the text format.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
