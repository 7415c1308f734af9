//! The hostile suite's cases against an agent's control API: no token, a
//! value out of range, the read-only token asking for a change, clients
//! that send half a request head and stop.

use super::{case, Case};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The API's cases against an agent: no token, a value out of range, a
/// read-only token asking to change something, slow clients.
pub async fn run_api(cluster: &crate::agent::Cluster, node: &str) -> Vec<Case> {
    use serde_json::json;
    let spec = cluster.node(node).expect("checked");
    let mut out = Vec::new();
    let nobody = crate::agent::peer::Peers::with_token(cluster, String::new());
    let got = nobody.get(spec, "/v1/node").await;
    let (outcome, ok) = match got {
        Err(crate::agent::peer::PeerError::Api { status: 401, .. }) => {
            ("401 unauthorized".to_string(), true)
        }
        other => (format!("{other:?}"), false),
    };
    out.push(case(
        "api_no_token",
        "GET /v1/node without a token",
        "401",
        outcome,
        ok,
    ));
    let peers = crate::agent::peer::Peers::new(cluster);
    let body = json!({"vm": "none", "target": node, "completion_timeout": "4000000000000000h"});
    let got = peers.post(spec, "/v1/migrations", &body).await;
    let (outcome, ok) = match got {
        Err(crate::agent::peer::PeerError::Api {
            status: 400,
            message,
            ..
        }) => {
            let ok = message.contains("completion_timeout");
            (format!("400: {message}"), ok)
        }
        other => (format!("{other:?}"), false),
    };
    out.push(case(
        "api_value_out_of_range",
        "completion_timeout \"4000000000000000h\"",
        "400 naming the field",
        outcome,
        ok,
    ));
    if let Some(ro) = &cluster.readonly_token {
        let reader = crate::agent::peer::Peers::with_token(cluster, ro.clone());
        let got = reader.post(spec, "/v1/node/drain", &json!({})).await;
        let (outcome, ok) = match got {
            Err(crate::agent::peer::PeerError::Api { status: 403, .. }) => {
                ("403 forbidden".to_string(), true)
            }
            other => (format!("{other:?}"), false),
        };
        out.push(case(
            "api_readonly_write",
            "POST /v1/node/drain with the read-only token",
            "403",
            outcome,
            ok,
        ));
    }
    let slow = cluster.api.max_connections.min(32);
    let mut held = Vec::new();
    for _ in 0..slow {
        if let Ok(mut s) = TcpStream::connect(&spec.control).await {
            let _ = s.write_all(b"GET /v1/node HTTP/1.1\r\n").await;
            held.push(s);
        }
    }
    let limit = cluster.api.header_timeout + Duration::from_secs(5);
    let closed = tokio::time::timeout(limit, async {
        let mut n = 0;
        for s in &mut held {
            let mut b = [0u8; 64];
            loop {
                match s.read(&mut b).await {
                    Ok(0) | Err(_) => {
                        n += 1;
                        break;
                    }
                    Ok(_) => continue,
                }
            }
        }
        n
    })
    .await
    .unwrap_or(0);
    let ok = closed == held.len();
    out.push(case(
        "api_slow_clients",
        &format!("{} clients sending half a request head", held.len()),
        "each closed within the header timeout",
        format!("{closed} of {} closed within {limit:?}", held.len()),
        ok,
    ));
    out
}
