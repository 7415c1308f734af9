//! Live events for `GET /v1/events`: the node's views (the node, its VMs,
//! its migrations with their progress, its operations) compared every
//! quarter second while anyone listens, and what changed published as
//! numbered events. So each thing sends at most 4 updates a second, the
//! latest winning; a subscriber that names the last event it saw gets
//! what followed it while it is still kept, else a `resync` and the whole
//! state again.

use serde_json::Value;
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

/// How often the views are compared while anyone listens.
pub const TICK: Duration = Duration::from_millis(250);
/// Events kept for subscribers that come back (`Last-Event-ID`), and
/// their bytes at most.
const RECENT: usize = 4096;
const RECENT_BYTES: usize = 16 << 20;
/// Event streams (`/v1/events`) an agent serves at once: each holds one of
/// its API's connections.
pub const MAX_STREAMS: usize = 64;
/// Cluster streams (`/v1/cluster/events`) an agent serves at once: each
/// reads every other agent's stream, holding a connection there.
pub const MAX_CLUSTER_STREAMS: usize = 16;
/// Events a subscriber may fall behind before it is sent a `resync`.
const BEHIND: usize = 1024;

/// One event: its number, its kind (`node`, `vm`, `migration`,
/// `operation`, `resync`) and its JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Increases by one per event published, from a random start per
    /// process (so an id from an agent's earlier life resumes nothing); 0:
    /// none (a resync's frames but its last, so that one cut off mid-way
    /// is not taken for whole).
    pub id: u64,
    /// What it is about.
    pub kind: &'static str,
    /// The thing's view as JSON, or `{"<field>": ..., "gone": true}`.
    pub data: Arc<str>,
}

/// One thing's current view: its key (unique across kinds), its kind, the
/// field that names it, and its JSON.
pub struct Item {
    /// `node`, `vm/NAME`, `migration/ID` or `operation/ID`.
    pub key: String,
    /// `node`, `vm`, `migration` or `operation`.
    pub kind: &'static str,
    /// The field naming it, and its value: what a `gone` event carries.
    pub name: (&'static str, String),
    /// The view.
    pub json: String,
}

/// Where a subscriber starts: the events it missed, or (for a new one, or
/// one that missed more than is kept) a `resync` and the whole state; and
/// the last id that covers, so that later events are told apart.
pub struct Start {
    /// Events to send first.
    pub events: Vec<Event>,
    /// The last event id they cover.
    pub upto: u64,
}

#[derive(Default)]
struct State {
    /// The id the next event gets, less one.
    last_id: u64,
    /// Each thing's last published view.
    last: BTreeMap<String, (&'static str, Arc<str>)>,
    recent: VecDeque<Event>,
    /// Bytes of `recent`'s data.
    recent_bytes: usize,
}

/// The node's event publisher and its subscribers.
pub struct Hub {
    tx: broadcast::Sender<Event>,
    state: Mutex<State>,
    closed: CancellationToken,
    /// A slot per stream served.
    pub streams: Arc<tokio::sync::Semaphore>,
}

impl Default for Hub {
    fn default() -> Self {
        // Below 2^52: exact as a JavaScript number.
        let start = u64::from_le_bytes(crate::migration::auth::random_bytes::<8>()) >> 12;
        Self::starting_at(start)
    }
}

impl Hub {
    /// A hub whose first event is `last_id + 1`.
    pub(crate) fn starting_at(last_id: u64) -> Self {
        Self {
            tx: broadcast::channel(BEHIND).0,
            state: Mutex::new(State {
                last_id,
                ..State::default()
            }),
            closed: CancellationToken::new(),
            streams: Arc::new(tokio::sync::Semaphore::new(MAX_STREAMS)),
        }
    }

    /// Ends every subscriber's stream: the agent stops.
    pub fn close(&self) {
        self.closed.cancel();
    }

    /// Cancelled once the agent stops.
    pub fn closed(&self) -> CancellationToken {
        self.closed.clone()
    }

    /// A new subscriber's receiver: subscribe before [`Hub::start`], so
    /// that nothing published in between is missed.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }

    /// Whether anyone listens.
    pub fn listened(&self) -> bool {
        self.tx.receiver_count() > 0
    }

    /// Subscribers now.
    pub fn subscribers(&self) -> usize {
        self.tx.receiver_count()
    }

    /// Events published so far.
    pub fn published(&self) -> u64 {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).last_id
    }

    /// Publishes what changed between the last views and `now`: an event
    /// per thing whose view differs, and a `gone` event per thing no longer
    /// there.
    pub fn publish(&self, now: Vec<Item>) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut seen = std::collections::BTreeSet::new();
        let mut out = Vec::new();
        for item in now {
            seen.insert(item.key.clone());
            let same = st
                .last
                .get(&item.key)
                .is_some_and(|(_, j)| **j == *item.json);
            if !same {
                let data: Arc<str> = item.json.into();
                st.last.insert(item.key, (item.kind, data.clone()));
                out.push((item.kind, data));
            }
        }
        let gone: Vec<String> = st
            .last
            .keys()
            .filter(|k| !seen.contains(*k))
            .cloned()
            .collect();
        for key in gone {
            let (kind, _) = st.last.remove(&key).expect("listed above");
            let name = key.split_once('/').map_or("", |(_, n)| n);
            let field = if kind == "vm" { "name" } else { "id" };
            let data = serde_json::json!({ field: name, "gone": true }).to_string();
            out.push((kind, data.into()));
        }
        for (kind, data) in out {
            st.last_id += 1;
            let e = Event {
                id: st.last_id,
                kind,
                data,
            };
            st.recent_bytes += e.data.len();
            st.recent.push_back(e.clone());
            while st.recent.len() > RECENT || st.recent_bytes > RECENT_BYTES {
                let Some(old) = st.recent.pop_front() else {
                    break;
                };
                st.recent_bytes -= old.data.len();
            }
            // No one listening is no error: the event is kept all the same.
            let _ = self.tx.send(e);
        }
    }

    /// Where a subscriber that last saw event `after` starts.
    pub fn start(&self, after: Option<u64>) -> Start {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(after) = after {
            let oldest = st.recent.front().map_or(st.last_id + 1, |e| e.id);
            // Kept from right after it (or nothing happened since).
            if after <= st.last_id && after + 1 >= oldest {
                let events = st.recent.iter().filter(|e| e.id > after).cloned().collect();
                return Start {
                    events,
                    upto: st.last_id,
                };
            }
        }
        let reason = match after {
            None => "a new subscriber: the whole state".to_string(),
            Some(a) => format!("event {a} is no longer kept: the whole state"),
        };
        Self::resync(&st, &reason)
    }

    /// A subscriber that fell behind: a `resync` and the whole state.
    pub fn behind(&self) -> Start {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        Self::resync(&st, "this subscriber fell behind: the whole state")
    }

    /// A `resync` and every thing's view; only the last carries an id
    /// (`last_id`), so a subscriber cut off before it asks for all again.
    fn resync(st: &State, reason: &str) -> Start {
        let id = st.last_id;
        let mut events = vec![Event {
            id: 0,
            kind: "resync",
            data: serde_json::json!({ "reason": reason }).to_string().into(),
        }];
        events.extend(st.last.values().map(|(kind, data)| Event {
            id: 0,
            kind,
            data: data.clone(),
        }));
        if let Some(last) = events.last_mut() {
            last.id = id;
        }
        Start { events, upto: id }
    }
}

/// `v` without what changes on every look and says nothing to a watcher:
/// the fields `drop`, and numbers in `round` rounded to whole ones.
pub fn steady(mut v: Value, drop: &[&str], round: &[&[&str]]) -> String {
    if let Some(o) = v.as_object_mut() {
        for f in drop {
            o.remove(*f);
        }
    }
    for path in round {
        if let Some(n) = v.pointer_mut(&format!("/{}", path.join("/"))) {
            if let Some(f) = n.as_f64() {
                *n = serde_json::json!(f.round());
            }
        }
    }
    v.to_string()
}

/// Most nodes a merged stream's `Last-Event-ID` may name.
pub const MAX_NODES: usize = 1024;

/// The per-node ids of a `Last-Event-ID` (`a:12,b:40`); anything else
/// resumes nothing.
pub fn positions(text: Option<&str>) -> BTreeMap<String, u64> {
    let parse = |t: &str| -> Option<BTreeMap<String, u64>> {
        let mut out = BTreeMap::new();
        for part in t.split(',').filter(|p| !p.is_empty()) {
            let (name, id) = part.trim().split_once(':')?;
            if !crate::agent::node::valid_name(name) || out.len() >= MAX_NODES {
                return None;
            }
            out.insert(name.to_string(), id.parse().ok()?);
        }
        Some(out)
    };
    text.and_then(parse).unwrap_or_default()
}

/// A merged stream's event id: each node's last id (`a:12,b:40`).
pub fn encode_positions(pos: &BTreeMap<String, u64>) -> String {
    let parts: Vec<String> = pos.iter().map(|(n, id)| format!("{n}:{id}")).collect();
    parts.join(",")
}

/// Server-sent events read from a byte stream, frame by frame.
#[derive(Default)]
pub struct Frames {
    buf: Vec<u8>,
    /// How far `buf` was searched for a frame's end.
    searched: usize,
}

/// The longest frame read: a peer sending more without an end is refused.
pub const MAX_FRAME: usize = 4 << 20;

impl Frames {
    /// Takes `chunk`; the whole events it completes, as (id, kind, data),
    /// the id empty for an event without one. A frame longer than
    /// [`MAX_FRAME`] is an error naming it.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<(String, String, String)>, String> {
        self.buf.extend_from_slice(chunk);
        let mut out = Vec::new();
        loop {
            let from = self.searched.saturating_sub(1);
            let Some(at) = self.buf[from..].windows(2).position(|w| w == b"\n\n") else {
                self.searched = self.buf.len();
                break;
            };
            let end = from + at;
            let frame: Vec<u8> = self.buf.drain(..end + 2).collect();
            self.searched = 0;
            if let Some(e) = parse_frame(&String::from_utf8_lossy(&frame)) {
                out.push(e);
            }
        }
        if self.buf.len() > MAX_FRAME {
            return Err(format!("an event of over {MAX_FRAME} bytes"));
        }
        Ok(out)
    }
}

/// One frame's event; `None` for a comment (a keep-alive) or a frame
/// without a kind or data.
fn parse_frame(frame: &str) -> Option<(String, String, String)> {
    let (mut id, mut kind, mut data) = (None, None, None::<String>);
    for line in frame.lines() {
        if let Some(v) = line.strip_prefix("id:") {
            id = Some(v.trim().to_string());
        } else if let Some(v) = line.strip_prefix("event:") {
            kind = Some(v.trim().to_string());
        } else if let Some(v) = line.strip_prefix("data:") {
            let v = v.strip_prefix(' ').unwrap_or(v);
            data = Some(match data {
                Some(d) => d + "\n" + v,
                None => v.to_string(),
            });
        }
    }
    Some((id.unwrap_or_default(), kind?, data?))
}

#[cfg(test)]
mod tests;
