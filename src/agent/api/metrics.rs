//! `GET /metrics`: the node's counters and gauges in Prometheus's text format.

use super::*;

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
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}
