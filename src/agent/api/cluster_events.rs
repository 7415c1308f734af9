//! `GET /v1/cluster/events`: every node's live events merged into one
//! stream. This agent reads its own hub and each other agent's
//! `/v1/events` (progress stays between agents: it never becomes etcd
//! writes). Each event's data names its `node`; an event's id is the last
//! id seen of every node (`a:12,b:40`), so `Last-Event-ID` resumes each
//! node's stream where it was.

use super::events::{last_event_id, Stream};
use super::session;
use super::*;
use crate::agent::events::{encode_positions as encode, positions, Frames, MAX_CLUSTER_STREAMS};
use axum::response::sse::{self, KeepAlive, Sse};
use std::collections::{BTreeMap, BTreeSet};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A node's stream that sends nothing, not even a keep-alive, this long is
/// read again.
const SILENT: Duration = Duration::from_secs(45);
/// Waits before reading a node's stream again, doubling from the first.
const RETRY: (Duration, Duration) = (Duration::from_millis(500), Duration::from_secs(5));

/// One node's event: the node, the id in its stream, the kind, the data.
type Tagged = (String, u64, String, String);

/// `data` with `"node": name` added.
fn with_node(name: &str, data: &str) -> String {
    match serde_json::from_str::<serde_json::Value>(data) {
        Ok(serde_json::Value::Object(mut o)) => {
            o.insert("node".into(), name.into());
            serde_json::Value::Object(o).to_string()
        }
        _ => serde_json::json!({ "node": name, "data": data }).to_string(),
    }
}

/// `GET /v1/cluster/events`.
pub(super) async fn cluster_events(
    State(node): State<Arc<Node>>,
    headers: axum::http::HeaderMap,
) -> Response {
    let mut pos = positions(last_event_id(&headers));
    // Only members have a position to resume.
    let members: BTreeSet<String> = node.members().into_iter().map(|n| n.name).collect();
    pos.retain(|name, _| members.contains(name));
    let Ok(permit) = node.cluster_streams.clone().try_acquire_owned() else {
        return super::events::busy("cluster event streams", MAX_CLUSTER_STREAMS).into_response();
    };
    node.metrics.event_streams[1].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (tx, rx) = mpsc::channel::<Tagged>(1024);
    let stop = CancellationToken::new();
    let node_for_end = node.clone();
    tokio::spawn(follow(node, pos.clone(), tx, stop.child_token()));
    // The subscriber gone, its readers stop.
    let state = (rx, (stop.drop_guard(), permit), pos);
    let stream = futures_util::stream::unfold(state, |(mut rx, held, mut pos)| async move {
        let (name, id, kind, data) = rx.recv().await?;
        let e = sse::Event::default()
            .event(kind.as_str())
            .data(with_node(&name, &data));
        // A `source` event is about the stream, not a position in it; an
        // event without an id (a resync's but its last) moves nothing.
        let e = if kind != "source" && id != 0 {
            pos.insert(name, id);
            e.id(encode(&pos))
        } else {
            // A node that left the cluster has no position to resume.
            if kind == "source" && says_left(&data) {
                pos.remove(&name);
            }
            e
        };
        Some((Ok::<_, std::convert::Infallible>(e), (rx, held, pos)))
    });
    // A stream opened with the session cookie ends with its session.
    let stream =
        futures_util::StreamExt::take_until(stream, session::session_end(node_for_end, &headers));
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// Every member's events into `tx`: this node's, and each other node's
/// from when it is a member (its registration read from etcd) until it is
/// no longer one, when its reader says it `left`. Membership is read again
/// a second after each change of this agent's copy of etcd; a node is
/// taken to have left only while that copy is whole.
async fn follow(
    node: Arc<Node>,
    mut pos: BTreeMap<String, u64>,
    tx: mpsc::Sender<Tagged>,
    stop: CancellationToken,
) {
    let me = node.name().to_string();
    tokio::spawn(local(
        node.clone(),
        pos.get(&me).copied(),
        tx.clone(),
        stop.child_token(),
    ));
    let mut readers: BTreeMap<String, CancellationToken> = BTreeMap::new();
    let mut changes = None;
    loop {
        // Before the members are read: a change meanwhile is seen next.
        if changes.is_none() {
            changes = node.mirror.get().map(|m| m.subscribe());
        }
        let names: BTreeSet<String> = node
            .members()
            .into_iter()
            .map(|n| n.name)
            .filter(|n| *n != me)
            .collect();
        let whole = node.mirror.get().is_some_and(|m| m.ready());
        readers.retain(|name, leave| {
            let stays = !whole || names.contains(name);
            if !stays {
                leave.cancel();
                // Back later, it is read from its start.
                pos.remove(name);
            }
            stays
        });
        for name in names {
            if let std::collections::btree_map::Entry::Vacant(v) = readers.entry(name) {
                let leave = CancellationToken::new();
                let after = pos.get(v.key()).copied();
                let ends = (stop.child_token(), leave.clone());
                tokio::spawn(remote(
                    node.clone(),
                    v.key().clone(),
                    after,
                    tx.clone(),
                    ends,
                ));
                v.insert(leave);
            }
        }
        let next = async {
            let changed = match changes.as_mut() {
                Some(rx) => rx.changed().await.is_ok(),
                None => false,
            };
            if !changed {
                // etcd not read yet (or no longer): look again in a while.
                tokio::time::sleep(Duration::from_secs(4)).await;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = next => {}
        }
    }
}

/// This node's events into `tx`.
async fn local(
    node: Arc<Node>,
    after: Option<u64>,
    tx: mpsc::Sender<Tagged>,
    stop: CancellationToken,
) {
    let name = node.name().to_string();
    let mut s = Stream::local(node, after);
    loop {
        let e = tokio::select! {
            _ = stop.cancelled() => return,
            e = s.next() => e,
        };
        let Some(e) = e else { return };
        let out = (name.clone(), e.id, e.kind.to_string(), e.data.to_string());
        if tx.send(out).await.is_err() {
            return;
        }
    }
}

/// Node `name`'s events into `tx`, read again (after its last event) when
/// its stream ends or goes silent, at the address it has then; a `source`
/// event says when it is not read and when it is again, and when it `left`
/// the cluster (`ends.1` cancelled), its last. Ends with `ends.0`.
async fn remote(
    node: Arc<Node>,
    name: String,
    mut after: Option<u64>,
    tx: mpsc::Sender<Tagged>,
    (stop, leave): (CancellationToken, CancellationToken),
) {
    let mut wait = RETRY.0;
    let mut down: Option<String> = None;
    let say = |after: Option<u64>, connected: bool, error: Option<&str>| {
        let data = serde_json::json!({ "connected": connected, "error": error }).to_string();
        (name.clone(), after.unwrap_or(0), "source".to_string(), data)
    };
    let closed = node.events.closed();
    loop {
        let read = async {
            let spec = node
                .member(&name)
                .ok_or_else(|| "no longer a member".to_string())?;
            let last = after.map(|a| a.to_string());
            let mut resp = node
                .peers
                .events(&spec, "/v1/events", last.as_deref())
                .await
                .map_err(|e| e.to_string())?;
            if down.take().is_some() && tx.send(say(after, true, None)).await.is_err() {
                return Ok(());
            }
            wait = RETRY.0;
            let mut frames = Frames::default();
            loop {
                let chunk = tokio::time::timeout(SILENT, resp.chunk())
                    .await
                    .map_err(|_| format!("silent for {SILENT:?}"))?
                    .map_err(|e| e.to_string())?
                    .ok_or("its stream ended")?;
                for (id, kind, data) in frames.push(&chunk)? {
                    // Only this stream says whether a node is read.
                    if kind == "source" {
                        continue;
                    }
                    let id: u64 = match id.as_str() {
                        "" => 0,
                        id => id.parse().map_err(|_| format!("event id {id:?}"))?,
                    };
                    if id != 0 {
                        after = Some(id);
                    }
                    if tx.send((name.clone(), id, kind, data)).await.is_err() {
                        return Ok(());
                    }
                }
            }
        };
        let ended: Result<(), String> = tokio::select! {
            _ = stop.cancelled() => return,
            _ = closed.cancelled() => return,
            _ = leave.cancelled() => return left(&name, &tx, &stop).await,
            r = read => r,
        };
        let Err(why) = ended else { return };
        if down.is_none() {
            if tx.send(say(after, false, Some(&why))).await.is_err() {
                return;
            }
            down = Some(why);
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = closed.cancelled() => return,
            _ = leave.cancelled() => return left(&name, &tx, &stop).await,
            _ = tokio::time::sleep(wait) => {}
        }
        wait = (wait * 2).min(RETRY.1);
    }
}

/// Whether a `source` event's data says its node left (as [`left`] writes
/// it; read as JSON, so no text inside an error message can pass for it).
fn says_left(data: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(data)
        .is_ok_and(|v| v.get("left").and_then(|l| l.as_bool()) == Some(true))
}

/// Says node `name` left the cluster: its reader's last event.
async fn left(name: &str, tx: &mpsc::Sender<Tagged>, stop: &CancellationToken) {
    let data =
        serde_json::json!({ "connected": false, "left": true, "error": "it left the cluster" });
    let e = (name.to_string(), 0, "source".to_string(), data.to_string());
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = tx.send(e) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_last_event_id_names_each_nodes_position_or_resumes_nothing() {
        let pos = positions(Some("a:12,b:40"));
        assert_eq!(encode(&pos), "a:12,b:40");
        for bad in ["a:x", "a", "../x:1", "a:1,b"] {
            assert!(positions(Some(bad)).is_empty(), "{bad}");
        }
        let many: Vec<String> = (0..=crate::agent::events::MAX_NODES)
            .map(|i| format!("n{i}:1"))
            .collect();
        assert!(positions(Some(&many.join(","))).is_empty());
        assert!(says_left(r#"{"connected":false,"left":true}"#));
        assert!(!says_left(r#"{"connected":false,"error":"\"left\":true"}"#));
        assert!(!says_left(r#"{"connected":false,"left":false}"#));
        assert_eq!(
            with_node("b", "{\"name\":\"web\"}"),
            "{\"name\":\"web\",\"node\":\"b\"}"
        );
    }
}
