//! The console's sign-in: a token in, an HttpOnly SameSite=Strict cookie
//! out, which every agent verifies; changes with it need the console's own
//! origin; a read-only session only reads; signing everyone out ends every
//! session on every agent.

use crate::common;
use common::agents::{Agents, READONLY_TOKEN, TOKEN};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// A request to `node` with only the headers given (no bearer token);
/// the status, the body and any `Set-Cookie`.
fn send(
    c: &Agents,
    method: Method,
    node: &str,
    path: &str,
    headers: &[(&str, String)],
    body: Option<Value>,
) -> (StatusCode, Value, Option<String>) {
    let url = format!("http://{}{path}", c.agent(node).control_addr);
    c.rt.block_on(async {
        let mut req = reqwest::Client::new().request(method, url);
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let set = resp
            .headers()
            .get("set-cookie")
            .map(|v| v.to_str().unwrap().to_string());
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
            set,
        )
    })
}

/// Signs in with `token`: the cookie's `name=value` and its attributes.
fn sign_in(c: &Agents, token: &str) -> (String, String) {
    let (s, v, set) = send(
        c,
        Method::POST,
        "a",
        "/v1/session",
        &[],
        Some(json!({"token": token})),
    );
    assert_eq!(s, StatusCode::OK, "{v}");
    let set = set.expect("a cookie");
    let (pair, attrs) = set.split_once(';').unwrap();
    (pair.to_string(), attrs.to_string())
}

#[test]
fn a_session_cookie_signs_in_on_every_agent_until_everyone_is_signed_out() {
    let _serial = common::serial();
    let Some(c) = Agents::start_with(
        "session",
        "readonly_token_file = \"readonly.token\"",
        &[("a", ""), ("b", "")],
    ) else {
        return;
    };
    // A wrong token: refused, no cookie.
    let (s, _, set) = send(
        &c,
        Method::POST,
        "a",
        "/v1/session",
        &[],
        Some(json!({"token": "wrong-token-0123456789"})),
    );
    assert_eq!((s, set), (StatusCode::UNAUTHORIZED, None));
    // Signing in takes no bearer token, and any (a script's) is no bar.
    let ro = ("authorization", format!("Bearer {READONLY_TOKEN}"));
    let (s, v, _) = send(
        &c,
        Method::POST,
        "a",
        "/v1/session",
        &[ro],
        Some(json!({"token": TOKEN})),
    );
    assert_eq!(s, StatusCode::OK, "{v}");
    let (admin, attrs) = sign_in(&c, TOKEN);
    assert!(admin.starts_with("ferry_session=admin."), "{admin}");
    for a in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=28800"] {
        assert!(attrs.contains(a), "{attrs}");
    }
    assert!(!attrs.contains("Secure"), "plain HTTP: {attrs}");
    assert!(
        !admin.contains(TOKEN),
        "the token never goes into the cookie"
    );
    let cookie = |v: &str| ("cookie", v.to_string());
    let host = |n: &str| format!("http://{}", c.agent(n).control_addr);
    // Reads with the cookie alone, on any agent.
    for n in ["a", "b"] {
        let (s, v, _) = send(&c, Method::GET, n, "/v1/node", &[cookie(&admin)], None);
        assert_eq!(s, StatusCode::OK, "{n}: {v}");
    }
    // A change needs the console's own origin.
    let vm = json!({"name": "web", "memory": "16MiB", "workload": "idle"});
    let (s, v, _) = send(
        &c,
        Method::POST,
        "a",
        "/v1/vms",
        &[cookie(&admin)],
        Some(vm.clone()),
    );
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert!(v.to_string().contains("origin"), "{v}");
    let elsewhere = ("origin", "http://evil.example".to_string());
    let (s, _, _) = send(
        &c,
        Method::POST,
        "a",
        "/v1/vms",
        &[cookie(&admin), elsewhere],
        Some(vm.clone()),
    );
    assert_eq!(s, StatusCode::FORBIDDEN);
    let origin = ("origin", host("a"));
    let (s, v, _) = send(
        &c,
        Method::POST,
        "a",
        "/v1/vms",
        &[cookie(&admin), origin.clone()],
        Some(vm),
    );
    assert_eq!(s, StatusCode::CREATED, "{v}");
    // A read-only session reads, and changes nothing even from the console.
    let (reader, _) = sign_in(&c, READONLY_TOKEN);
    assert!(reader.starts_with("ferry_session=read."), "{reader}");
    let (s, _, _) = send(&c, Method::GET, "b", "/v1/vms", &[cookie(&reader)], None);
    assert_eq!(s, StatusCode::OK);
    let (s, _, _) = send(
        &c,
        Method::DELETE,
        "a",
        "/v1/vms/web",
        &[cookie(&reader), origin.clone()],
        None,
    );
    assert_eq!(s, StatusCode::FORBIDDEN);
    // An altered cookie is nothing.
    let forged = reader.replacen("=read.", "=admin.", 1);
    let (s, _, _) = send(&c, Method::GET, "a", "/v1/node", &[cookie(&forged)], None);
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // Sign-out clears this browser's cookie.
    let (s, _, set) = send(&c, Method::DELETE, "a", "/v1/session", &[], None);
    assert_eq!(s, StatusCode::OK);
    assert!(set.unwrap().contains("Max-Age=0"));
    // Everyone out: a read-only session may not, an admin one may.
    let (s, _, _) = send(
        &c,
        Method::POST,
        "a",
        "/v1/session/revoke",
        &[cookie(&reader), origin.clone()],
        None,
    );
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, v, _) = send(
        &c,
        Method::POST,
        "a",
        "/v1/session/revoke",
        &[cookie(&admin), origin],
        None,
    );
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["epoch"], 1);
    // Every earlier session ends on this agent at once, on the others once
    // their copy of etcd has the epoch; a new sign-in works.
    let (s, v, _) = send(&c, Method::GET, "a", "/v1/node", &[cookie(&admin)], None);
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
    let end = Instant::now() + Duration::from_secs(10);
    while send(&c, Method::GET, "b", "/v1/node", &[cookie(&reader)], None).0
        != StatusCode::UNAUTHORIZED
    {
        assert!(Instant::now() < end, "b still takes the old session");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (fresh, _) = sign_in(&c, TOKEN);
    let (s, _, _) = send(&c, Method::GET, "b", "/v1/node", &[cookie(&fresh)], None);
    assert_eq!(s, StatusCode::OK);
    // Bearer tokens keep working for scripts.
    let (s, _) = c.call(Method::GET, "b", "/v1/node", None);
    assert_eq!(s, StatusCode::OK);
}

#[test]
fn an_event_stream_opened_with_a_session_ends_when_everyone_is_signed_out() {
    let _serial = common::serial();
    let Some(c) = Agents::start("session-stream", &[("a", "")]) else {
        return;
    };
    let (admin, _) = sign_in(&c, TOKEN);
    let url = format!("http://{}/v1/events", c.agent("a").control_addr);
    let ended = c.rt.block_on(async {
        let mut resp = reqwest::Client::new()
            .get(&url)
            .header("cookie", &admin)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        // The whole state first: the stream is open.
        assert!(resp.chunk().await.unwrap().is_some());
        let revoke = reqwest::Client::new()
            .post(format!(
                "http://{}/v1/session/revoke",
                c.agent("a").control_addr
            ))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(revoke.status(), StatusCode::OK);
        let start = Instant::now();
        // Keep-alives may come; the end must, within the 5 s check.
        loop {
            match tokio::time::timeout(Duration::from_secs(15), resp.chunk()).await {
                Ok(Ok(Some(_))) => continue,
                Ok(_) => return Some(start.elapsed()),
                Err(_) => return None,
            }
        }
    });
    let took = ended.expect("the stream outlived the session");
    assert!(took < Duration::from_secs(12), "{took:?}");
}
