//! Waiting on an agent's live events (`/v1/events`, `/v1/cluster/events`)
//! instead of asking it again and again; a command falls back to asking
//! while the stream cannot be read (an agent without it, say).

use super::Ctx;
use ferry::agent::cluster::NodeSpec;
use ferry::agent::events::Frames;
use std::time::{Duration, Instant};

/// A stream sending nothing, not even a keep-alive, this long is read again.
const SILENT: Duration = Duration::from_secs(45);
/// Even with the stream up, the awaited thing is asked for this often (the
/// agent may have restarted, its new stream without it).
const ASK_EVERY: Duration = Duration::from_secs(30);
/// A stream that could not be opened is tried again after this long (an
/// agent without it is asked meanwhile, not sent two requests each time).
const REOPEN: Duration = Duration::from_secs(5);

/// One agent's event stream, read again after its last event when it ends.
pub(crate) struct Watch<'a> {
    ctx: &'a Ctx,
    node: &'a NodeSpec,
    path: &'static str,
    resp: Option<reqwest::Response>,
    frames: Frames,
    after: Option<String>,
    /// When the stream last sent anything.
    heard: Instant,
    /// When the caller last asked instead; whether it should now.
    asked: Instant,
    ask: bool,
    /// Not opened again before this.
    reopen_at: Instant,
}

impl<'a> Watch<'a> {
    /// Node `node`'s stream at `path`, opened when first read.
    pub(crate) fn new(ctx: &'a Ctx, node: &'a NodeSpec, path: &'static str) -> Self {
        Self {
            ctx,
            node,
            path,
            resp: None,
            frames: Frames::default(),
            after: None,
            heard: Instant::now(),
            asked: Instant::now(),
            ask: false,
            reopen_at: Instant::now(),
        }
    }

    /// Whether the caller should ask for what it awaits instead of
    /// trusting the stream: it resynced, something went, or it has been
    /// a while. True once per such occasion.
    pub(crate) fn ask_again(&mut self) -> bool {
        if std::mem::take(&mut self.ask) || self.asked.elapsed() > ASK_EVERY {
            self.asked = Instant::now();
            return true;
        }
        false
    }

    /// Whether the stream is open now.
    pub(crate) fn open(&self) -> bool {
        self.resp.is_some()
    }

    /// The events (kind, data) that arrive within `wait`; `None` when the
    /// stream cannot be read now (the caller asks instead).
    pub(crate) fn next(&mut self, wait: Duration) -> Option<Vec<(String, String)>> {
        if self.resp.is_none() {
            if Instant::now() < self.reopen_at {
                return None;
            }
            let open = self
                .ctx
                .peers
                .events(self.node, self.path, self.after.as_deref());
            let Ok(resp) = self.ctx.run(open) else {
                self.reopen_at = Instant::now() + REOPEN;
                return None;
            };
            self.resp = Some(resp);
            self.frames = Frames::default();
            self.heard = Instant::now();
        }
        let resp = self.resp.as_mut()?;
        let read = self.ctx.run(async {
            match tokio::time::timeout(wait, resp.chunk()).await {
                Err(_) => Ok(Some(Vec::new())),
                Ok(Ok(Some(chunk))) => Ok(Some(chunk.to_vec())),
                Ok(Ok(None)) => Ok(None),
                Ok(Err(e)) => Err(e.to_string()),
            }
        });
        let chunk = match read {
            Ok(Some(c)) => c,
            // Ended or broken: opened again (after the last event) next time.
            Ok(None) | Err(_) => {
                self.resp = None;
                return Some(Vec::new());
            }
        };
        if !chunk.is_empty() {
            self.heard = Instant::now();
        } else if self.heard.elapsed() > SILENT {
            self.resp = None;
        }
        let Ok(events) = self.frames.push(&chunk) else {
            self.resp = None;
            return None;
        };
        Some(
            events
                .into_iter()
                .map(|(id, kind, data)| {
                    if !id.is_empty() {
                        self.after = Some(id);
                    }
                    if kind == "resync" || data.contains("\"gone\":true") {
                        self.ask = true;
                    }
                    (kind, data)
                })
                .collect(),
        )
    }
}
