//! `GET /v1/events`: a node's live events over server-sent events, with
//! ids a subscriber resumes from, a `resync` when it cannot, and at most 4
//! updates a second per migration.

use crate::common;
use common::agents::{Agents, READONLY_TOKEN, TOKEN};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// One server-sent event.
#[derive(Debug, Clone)]
struct Sse {
    id: String,
    kind: String,
    data: Value,
}

/// Node `node`'s event stream, read in the background: its events arrive
/// on the channel (which closes with the stream).
fn subscribe(c: &Agents, node: &str, last: Option<u64>) -> mpsc::Receiver<Sse> {
    stream(c, node, "/v1/events", last.map(|id| id.to_string()))
}

/// Node `node`'s stream at `path`, read in the background.
fn stream(c: &Agents, node: &str, path: &str, last: Option<String>) -> mpsc::Receiver<Sse> {
    let url = format!("http://{}{path}", c.agent(node).control_addr);
    let (tx, rx) = mpsc::channel();
    c.rt.spawn(async move {
        let mut req = reqwest::Client::new().get(url).bearer_auth(READONLY_TOKEN);
        if let Some(id) = last {
            req = req.header("Last-Event-ID", id);
        }
        let mut resp = req.send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let kind = resp.headers()["content-type"].to_str().unwrap().to_string();
        assert!(kind.starts_with("text/event-stream"), "{kind}");
        let mut buf = String::new();
        while let Ok(Some(chunk)) = resp.chunk().await {
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buf.find("\n\n") {
                let frame: String = buf.drain(..end + 2).collect();
                if let Some(e) = parse(&frame) {
                    if tx.send(e).is_err() {
                        return;
                    }
                }
            }
        }
    });
    rx
}

/// One frame's event (its id empty when it has none); `None` for a
/// keep-alive comment.
fn parse(frame: &str) -> Option<Sse> {
    let (mut id, mut kind, mut data) = (None, None, String::new());
    for line in frame.lines() {
        if let Some(v) = line.strip_prefix("id: ") {
            id = Some(v.to_string());
        } else if let Some(v) = line.strip_prefix("event: ") {
            kind = Some(v.to_string());
        } else if let Some(v) = line.strip_prefix("data: ") {
            data.push_str(v);
        }
    }
    Some(Sse {
        id: id.unwrap_or_default(),
        kind: kind?,
        data: serde_json::from_str(&data).unwrap(),
    })
}

/// Events from `rx` until one satisfies `done` (within 30 s), that one
/// included.
fn until(rx: &mpsc::Receiver<Sse>, done: impl Fn(&Sse) -> bool) -> Vec<Sse> {
    let end = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    loop {
        let left = end.saturating_duration_since(Instant::now());
        let e = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("never came; saw {seen:#?}"));
        let stop = done(&e);
        seen.push(e);
        if stop {
            return seen;
        }
    }
}

#[test]
fn a_nodes_events_follow_a_migration_and_resume_from_the_last_one_seen() {
    let _serial = common::serial();
    let Some(c) = Agents::start_with(
        "events",
        "readonly_token_file = \"readonly.token\"",
        &[("a", ""), ("b", "")],
    ) else {
        return;
    };
    let (s, _) = c.call_with(None, Method::GET, "a", "/v1/events", None);
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // A new subscriber: a resync, then the whole state (the node).
    let rx = subscribe(&c, "a", None);
    let first = until(&rx, |e| e.kind == "node");
    assert_eq!(first[0].kind, "resync", "{first:?}");
    assert_eq!(first.last().unwrap().data["name"], "a");
    c.create_busy_web();
    let made = until(&rx, |e| e.kind == "vm" && e.data["name"] == "web");
    let made_id: u64 = made.last().unwrap().id.parse().unwrap();
    // A migration of about 4 s.
    let id = c.start_slow_migration();
    let ours = |e: &Sse| e.kind == "migration" && e.data["id"] == id.as_str();
    let seen = until(&rx, |e| ours(e) && e.data["state"] == "completed");
    let ids: Vec<u64> = seen.iter().map(|e| e.id.parse().unwrap()).collect();
    assert!(
        first.last().unwrap().id.parse::<u64>().is_ok(),
        "{first:#?}"
    );
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    let progress: Vec<&Sse> = seen
        .iter()
        .filter(|e| ours(e) && e.data["state"] == "running" && e.data["progress"].is_object())
        .collect();
    assert!(progress.len() >= 4, "{progress:#?}");
    // At most 4 a second: the running ones span at least (n - 1) / 4 s.
    let (_, done) = c.call(Method::GET, "a", &format!("/v1/migrations/{id}"), None);
    let total_s = done["report"]["total_ms"].as_f64().unwrap() / 1e3;
    assert!(
        (progress.len() as f64) <= total_s * 4.0 + 2.0,
        "{} updates in {total_s} s",
        progress.len()
    );
    // The VM left: a gone event.
    until(&rx, |e| {
        e.kind == "vm" && e.data == json!({"name": "web", "gone": true})
    });
    // Back after the VM's creation: exactly what followed it, no resync.
    let again = subscribe(&c, "a", Some(made_id));
    let replay = until(&again, |e| ours(e) && e.data["state"] == "completed");
    assert_eq!(replay[0].id, (made_id + 1).to_string(), "{replay:#?}");
    assert!(replay.iter().all(|e| e.kind != "resync"));
    // From an id the node never sent: the whole state again.
    let lost = subscribe(&c, "a", Some(u64::MAX / 2));
    let resync = until(&lost, |e| e.kind == "node");
    assert_eq!(resync[0].kind, "resync");
    // At most 64 streams at once: each holds one of the API's connections.
    let held: Vec<_> = (3..64).map(|_| subscribe(&c, "a", None)).collect();
    for rx in &held {
        until(rx, |e| e.kind == "node");
    }
    let url = format!("http://{}/v1/events", c.agent("a").control_addr);
    let status = c.rt.block_on(async {
        let req = reqwest::Client::new().get(url).bearer_auth(TOKEN);
        req.timeout(Duration::from_secs(5))
            .send()
            .await
            .unwrap()
            .status()
    });
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
}

#[test]
fn any_agents_cluster_stream_carries_every_nodes_events_and_resumes_each() {
    let _serial = common::serial();
    let Some(c) = Agents::start_with(
        "cluster-events",
        "readonly_token_file = \"readonly.token\"",
        &[("a", ""), ("b", "")],
    ) else {
        return;
    };
    // A new subscriber: each node's resync and whole state.
    let rx = stream(&c, "a", "/v1/cluster/events", None);
    let first = until(&rx, |e| e.kind == "node" && e.data["node"] == "b");
    until(&rx, |e| e.kind == "node" && e.data["node"] == "a");
    assert!(first
        .iter()
        .any(|e| e.kind == "resync" && e.data["node"] == "b"));
    // A VM made on b shows on a's stream, named as b's.
    let (s, v) = c.call(
        Method::POST,
        "b",
        "/v1/vms",
        Some(json!({"name": "db", "memory": "16MiB", "workload": "idle"})),
    );
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let made = until(&rx, |e| e.kind == "vm" && e.data["name"] == "db");
    let last = made.last().unwrap();
    assert_eq!(last.data["node"], "b");
    assert!(
        last.id.contains("a:") && last.id.contains("b:"),
        "{}",
        last.id
    );
    // Back from that event: only what followed, from either node.
    let (s, v) = c.call(
        Method::POST,
        "a",
        "/v1/vms",
        Some(json!({"name": "web", "memory": "16MiB", "workload": "idle"})),
    );
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let again = stream(&c, "a", "/v1/cluster/events", Some(last.id.clone()));
    let after = until(&again, |e| e.kind == "vm" && e.data["name"] == "web");
    assert!(after.iter().all(|e| e.kind != "resync"), "{after:#?}");
    assert!(after.iter().all(|e| e.data["name"] != "db"), "{after:#?}");
    // A node that stops: the stream says so.
    let (s, v) = c.call(Method::DELETE, "b", "/v1/vms/db", None);
    assert_eq!(s, StatusCode::OK, "{v}");
    let mut c = c;
    let i = c.agents.iter().position(|h| h.node.name() == "b").unwrap();
    let stopped = c.agents.remove(i);
    c.rt.block_on(stopped.shutdown());
    let down = until(&rx, |e| e.kind == "source" && e.data["node"] == "b");
    assert_eq!(down.last().unwrap().data["connected"], false);
}

#[test]
fn a_cluster_stream_takes_in_a_node_that_joins_and_lets_go_of_one_that_leaves() {
    let _serial = common::serial();
    let Some(mut c) = Agents::start_with(
        "cluster-events-join",
        "readonly_token_file = \"readonly.token\"",
        &[("a", ""), ("b", "")],
    ) else {
        return;
    };
    let rx = stream(&c, "a", "/v1/cluster/events", None);
    until(&rx, |e| e.kind == "node" && e.data["node"] == "b");
    // c registers in etcd after the stream opened: a's stream reads it.
    c.add("c", "");
    let (s, v) = c.call(
        Method::POST,
        "c",
        "/v1/vms",
        Some(json!({"name": "late", "memory": "16MiB", "workload": "idle"})),
    );
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let seen = until(&rx, |e| e.kind == "vm" && e.data["name"] == "late");
    assert_eq!(seen.last().unwrap().data["node"], "c");
    assert!(seen
        .iter()
        .any(|e| e.kind == "node" && e.data["node"] == "c"));
    let (s, v) = c.call(Method::DELETE, "c", "/v1/vms/late", None);
    assert_eq!(s, StatusCode::OK, "{v}");
    // Stopped and removed from the cluster, c is let go of: its last event
    // says it left, and the stream's position no longer names it.
    let i = c.agents.iter().position(|h| h.node.name() == "c").unwrap();
    let stopped = c.agents.remove(i);
    c.rt.block_on(stopped.shutdown());
    let removed = Instant::now() + Duration::from_secs(30);
    loop {
        let (s, v) = c.call(Method::DELETE, "a", "/v1/nodes/c", None);
        if s == StatusCode::OK {
            break;
        }
        assert!(Instant::now() < removed, "{s} {v}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let gone = until(&rx, |e| e.kind == "source" && e.data["left"] == true);
    assert_eq!(gone.last().unwrap().data["node"], "c");
    let (s, v) = c.call(
        Method::POST,
        "b",
        "/v1/vms",
        Some(json!({"name": "after", "memory": "16MiB", "workload": "idle"})),
    );
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let after = until(&rx, |e| e.kind == "vm" && e.data["name"] == "after");
    let id = &after.last().unwrap().id;
    assert!(id.contains("a:") && !id.contains("c:"), "{id}");
}
