//! Slow and flooding clients of the control API: connections are capped,
//! closed when they send no request head in time (idle kept-alive ones too),
//! slow bodies are answered 408, and migrations go on meanwhile.

use super::common::agents::{Agents, TOKEN};
use super::*;
use reqwest::{Method, StatusCode};
use serde_json::json;
use std::time::Instant;

const API: &str =
    "[api]\nmax_connections = 16\nheader_timeout = \"1s\"\nrequest_timeout = \"2s\"\n";

fn control(a: &Agents, node: &str) -> String {
    a.agent(node).control_addr.to_string()
}

/// A counter's value in `/metrics` text.
fn counter(text: &str, line: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(line)?.trim().parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

#[test]
fn a_flooded_api_closes_slow_clients_and_migrations_go_on() {
    let _serial = common::serial();
    let Some(a) = Agents::start_with("hostile-api-flood", API, &[("a", ""), ("b", "")]) else {
        return;
    };
    let (s, v) = a.call(
        Method::POST,
        "b",
        "/v1/vms",
        Some(json!({"name": "web", "memory": "16MiB"})),
    );
    assert_eq!(s, StatusCode::CREATED, "{v}");
    // 64 clients that start a request head and never finish it.
    let flood: Vec<TcpStream> = (0..64)
        .map(|_| {
            let mut s = TcpStream::connect(control(&a, "a")).unwrap();
            let _ = s.write_all(b"GET /v1/node HTTP/1.1\r\nHost: a\r\n");
            s
        })
        .collect();
    // Migrations to the flooded node go on: its migration listener is apart.
    let (s, m) = a.call(
        Method::POST,
        "b",
        "/v1/migrations",
        Some(json!({"vm": "web", "target": "a"})),
    );
    assert_eq!(s, StatusCode::ACCEPTED, "{m}");
    assert_eq!(a.wait("b", m["id"].as_str().unwrap())["state"], "completed");
    // Every one of the flood is closed: beyond the cap at once, the rest
    // after the header timeout.
    let t = Instant::now();
    for mut s in flood {
        assert!(
            closed_within(&mut s, Duration::from_secs(5)),
            "a slow client stayed"
        );
    }
    assert!(t.elapsed() < Duration::from_secs(5));
    // The API answers again, and counted both reasons.
    let (s, text) = a.call(Method::GET, "a", "/metrics", None);
    assert_eq!(s, StatusCode::OK);
    let text = text.as_str().unwrap().to_string();
    assert!(
        counter(
            &text,
            "ferry_api_requests_refused_total{reason=\"connection_limit\"}"
        ) >= 48,
        "{text}"
    );
    assert!(
        counter(
            &text,
            "ferry_api_requests_refused_total{reason=\"header_timeout\"}"
        ) >= 16,
        "{text}"
    );
    let (_, v) = a.call(Method::GET, "a", "/v1/vms/web", None);
    assert_eq!(v["state"], "running", "{v}");
}

#[test]
fn an_idle_kept_alive_connection_and_a_slow_body_are_ended() {
    let Some(a) = Agents::start_with("hostile-api-slow", API, &[("a", "")]) else {
        return;
    };
    // One request, then silence on the kept-alive connection: closed.
    let mut s = TcpStream::connect(control(&a, "a")).unwrap();
    let req = format!("GET /v1/node HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {TOKEN}\r\n\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut first = [0u8; 12];
    s.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    assert!(
        closed_within(&mut s, Duration::from_secs(4)),
        "an idle connection stayed"
    );
    // A body promised and not sent: 408 after the request timeout.
    let mut s = TcpStream::connect(control(&a, "a")).unwrap();
    let req = format!(
        "POST /v1/vms HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"name\""
    );
    s.write_all(req.as_bytes()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(6))).unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 408");
}

#[test]
fn the_read_only_token_reads_and_changes_nothing() {
    use super::common::agents::READONLY_TOKEN;
    let Some(a) = Agents::start_with(
        "hostile-api-ro",
        "readonly_token_file = \"readonly.token\"",
        &[("a", ""), ("b", "")],
    ) else {
        return;
    };
    let ro = |method: Method, path: &str, body: Option<&str>| {
        a.call_with(
            Some(READONLY_TOKEN),
            method,
            "a",
            path,
            body.map(String::from),
        )
    };
    assert_eq!(ro(Method::GET, "/v1/node", None).0, StatusCode::OK);
    assert_eq!(ro(Method::GET, "/v1/vms", None).0, StatusCode::OK);
    assert_eq!(ro(Method::GET, "/metrics", None).0, StatusCode::OK);
    for (method, path, body) in [
        (
            Method::POST,
            "/v1/vms",
            Some(r#"{"name": "x", "memory": "8MiB"}"#),
        ),
        (Method::POST, "/v1/node/drain", Some("{}")),
        (Method::POST, "/v1/node/stop", Some(r#"{"force": true}"#)),
        (Method::DELETE, "/v1/vms/x", None),
        (Method::DELETE, "/v1/migrations/x", None),
    ] {
        let (s, v) = ro(method.clone(), path, body);
        assert_eq!(s, StatusCode::FORBIDDEN, "{method} {path}: {v}");
        assert_eq!(v["error"]["code"], "forbidden", "{v}");
    }
    // Nothing changed: no VM, the node still active, and the refusals counted.
    let (_, vms) = a.call(Method::GET, "a", "/v1/vms", None);
    assert_eq!(vms.as_array().unwrap().len(), 0);
    assert!(!a.agent("a").node.stop.asked());
    let (_, text) = a.call(Method::GET, "a", "/metrics", None);
    let text = text.as_str().unwrap().to_string();
    assert_eq!(
        counter(
            &text,
            "ferry_api_requests_refused_total{reason=\"forbidden\"}"
        ),
        5,
        "{text}"
    );
}
