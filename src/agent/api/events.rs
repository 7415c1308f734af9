//! `GET /v1/events`: the node's live events as server-sent events (see
//! `agent/events.rs`), and the task that publishes them while anyone
//! listens.

use super::session;
use super::*;
use crate::agent::events::{steady, Event, Item, Start, TICK};
use axum::response::sse::{self, KeepAlive, Sse};
use std::collections::VecDeque;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

/// The node's views now, as the events compare them.
fn items(node: &Node) -> Vec<Item> {
    let mut out = vec![Item {
        key: "node".into(),
        kind: "node",
        name: ("name", node.name().to_string()),
        json: steady(json(&node.view()), &["vms"], &[&["lease", "left_s"]]),
    }];
    for vm in node.vms() {
        out.push(Item {
            key: format!("vm/{}", vm.spec.name),
            kind: "vm",
            name: ("name", vm.spec.name.clone()),
            json: steady(json(&vm), &["pages_written"], &[]),
        });
    }
    for m in node.migrations_live() {
        out.push(Item {
            key: format!("migration/{}", m.id),
            kind: "migration",
            name: ("id", m.id.clone()),
            json: steady(json(&m), &[], &[]),
        });
    }
    for op in node.operations() {
        out.push(Item {
            key: format!("operation/{}", op.id),
            kind: "operation",
            name: ("id", op.id.clone()),
            json: steady(json(&op), &[], &[]),
        });
    }
    out
}

/// A view as JSON.
fn json<T: serde::Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or_default()
}

/// Publishes what changed every [`TICK`] while anyone listens, until
/// `stop`.
pub(crate) async fn publish(node: Arc<Node>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => {
                node.events.close();
                return;
            }
            _ = tick.tick() => {}
        }
        if node.events.listened() {
            node.events.publish(items(&node));
        }
    }
}

/// `GET /v1/events`: what changed on this node, as it changes. A
/// `Last-Event-ID` resumes after that event while it is kept; otherwise
/// (and for a subscriber that falls behind) a `resync` event and the whole
/// state come first.
pub(super) async fn events(
    State(node): State<Arc<Node>>,
    headers: axum::http::HeaderMap,
) -> Response {
    let after = last_event_id(&headers).and_then(|v| v.trim().parse::<u64>().ok());
    let Ok(permit) = node.events.streams.clone().try_acquire_owned() else {
        return busy("event streams", crate::agent::events::MAX_STREAMS).into_response();
    };
    node.metrics.event_streams[0].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let node_for_end = node.clone();
    let mut state = Stream::local(node, after);
    state.permit = Some(permit);
    let stream = futures_util::stream::unfold(state, |mut s| async move {
        let e = s.next().await?;
        Some((Ok::<_, std::convert::Infallible>(sse_event(&e)), s))
    });
    // A stream opened with the session cookie ends with its session.
    let stream =
        futures_util::StreamExt::take_until(stream, session::session_end(node_for_end, &headers));
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// A refusal: this agent already serves `max` streams of this kind.
pub(super) fn busy(what: &str, max: usize) -> ApiError {
    ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        code: "unavailable",
        message: format!("this agent serves at most {max} {what} at once: try again later"),
    }
}

/// The `Last-Event-ID` a subscriber sent back.
pub(super) fn last_event_id(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers.get("last-event-id").and_then(|v| v.to_str().ok())
}

fn sse_event(e: &Event) -> sse::Event {
    let out = sse::Event::default().event(e.kind).data(&*e.data);
    match e.id {
        0 => out,
        id => out.id(id.to_string()),
    }
}

/// One subscriber's stream of this node's events.
pub(super) struct Stream {
    node: Arc<Node>,
    rx: tokio::sync::broadcast::Receiver<Event>,
    pending: VecDeque<Event>,
    /// The last event id sent (or covered by a resync).
    upto: u64,
    /// Its slot among the node's streams (none for a cluster stream's
    /// own reader, which has a slot of its own).
    pub(super) permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Stream {
    /// A subscriber that last saw event `after` (`None`: a new one).
    pub(super) fn local(node: Arc<Node>, after: Option<u64>) -> Self {
        let rx = node.events.subscribe();
        node.events.publish(items(&node));
        let Start { events, upto } = node.events.start(after);
        Stream {
            node,
            rx,
            pending: events.into(),
            upto,
            permit: None,
        }
    }

    /// The next event to send; `None` once the agent stops.
    pub(super) async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Some(e);
            }
            let closed = self.node.events.closed();
            let got = tokio::select! {
                biased;
                _ = closed.cancelled() => return None,
                got = self.rx.recv() => got,
            };
            match got {
                Ok(e) if e.id <= self.upto => continue,
                Ok(e) => {
                    self.upto = e.id;
                    return Some(e);
                }
                Err(RecvError::Lagged(_)) => {
                    let Start { events, upto } = self.node.events.behind();
                    // What the resync covers is skipped when it arrives.
                    self.pending = events.into();
                    self.upto = upto;
                }
                Err(RecvError::Closed) => return None,
            }
        }
    }
}
