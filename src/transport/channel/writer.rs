//! A channel's write half: frames written whole with vectored writes,
//! paced by the token bucket, tagged once keyed.

use super::*;

/// Writes frames to a channel: header and payload in one vectored write, after
/// the bandwidth cap (if any) allowed their bytes.
#[derive(Debug)]
pub struct FrameWriter {
    wr: WriteSide,
    fd: std::os::fd::RawFd,
    channel: ChannelId,
    buckets: Vec<Arc<TokenBucket>>,
    bytes: Arc<AtomicU64>,
    progress: Arc<AtomicU64>,
    /// Once the session is keyed without TLS: each frame carries a tag.
    mac: Option<Box<FrameMac>>,
}

impl FrameWriter {
    /// Wraps a write half; every frame waits for each of `buckets` (the
    /// migration's cap, the node's) and is counted into `bytes`.
    pub fn new(
        wr: OwnedWriteHalf,
        channel: ChannelId,
        buckets: Vec<Arc<TokenBucket>>,
        bytes: Arc<AtomicU64>,
    ) -> Self {
        use std::os::fd::AsRawFd;
        let fd = wr.as_ref().as_raw_fd();
        Self::with(WriteSide::Plain(wr), fd, channel, buckets, bytes)
    }

    pub(super) fn with(
        wr: WriteSide,
        fd: std::os::fd::RawFd,
        channel: ChannelId,
        buckets: Vec<Arc<TokenBucket>>,
        bytes: Arc<AtomicU64>,
    ) -> Self {
        Self {
            wr,
            fd,
            channel,
            buckets,
            bytes,
            progress: Arc::default(),
            mac: None,
        }
    }

    /// From the next frame on, every frame carries a tag under `key` (this
    /// connection's, here to peer) instead of a CRC. A frame's tag counts it
    /// before it is written: a send abandoned midway leaves this writer out
    /// of step with its peer, so such a writer is never used again (every
    /// cancelled send here ends its connection).
    pub fn authenticate(&mut self, key: [u8; 32]) {
        self.mac = Some(Box::new(FrameMac::new(key)));
    }

    /// Bytes this channel's socket took so far, counted as each write
    /// returns (a stalled peer stops it moving).
    pub fn progress(&self) -> Arc<AtomicU64> {
        self.progress.clone()
    }

    /// Sets the channel number (once bound).
    pub fn set_channel(&mut self, channel: ChannelId) {
        self.channel = channel;
    }

    /// The socket's descriptor (for socket options).
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        self.fd
    }

    /// Sends one frame with `payload` (length and CRC are filled in).
    pub async fn send_raw(
        &mut self,
        header: &Header,
        payload: &[u8],
    ) -> Result<(), MigrationError> {
        let (head, tag) = match &mut self.mac {
            None => (encode_header(header, payload), None),
            Some(mac) => {
                let head = encode_header_uncrc(header, payload.len());
                let mut t = mac.begin(&head);
                t.update(payload);
                (head, Some(t.finish()))
            }
        };
        let tag: &[u8] = tag.as_ref().map_or(&[], |t| &t[..]);
        let parts: [&[u8]; 3] = [&head, payload, tag];
        let total = HEADER_LEN + payload.len() + tag.len();
        for b in &self.buckets {
            b.acquire(total as u64).await;
        }
        let mut written = 0;
        while written < total {
            let slices = unwritten(&parts, written);
            let n =
                self.wr.write_vectored(&slices).await.map_err(|e| {
                    MigrationError::io(format!("write to channel {}", self.channel), e)
                })?;
            if n == 0 {
                return Err(MigrationError::PeerClosed {
                    channel: self.channel,
                });
            }
            written += n;
            self.progress.fetch_add(n as u64, Ordering::Relaxed);
        }
        if let WriteSide::Tls(w) = &mut self.wr {
            // TLS holds records back until flushed.
            w.flush()
                .await
                .map_err(|e| MigrationError::io(format!("write to channel {}", self.channel), e))?;
        }
        self.bytes.fetch_add(total as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Encodes and sends a message.
    pub async fn send(&mut self, mut header: Header, msg: &Message) -> Result<(), MigrationError> {
        header.command = msg.command();
        header.channel = self.channel;
        self.send_raw(&header, &msg.encode_payload()).await
    }

    /// Flushes and closes the write side.
    pub async fn shutdown(&mut self) {
        let _ = self.wr.shutdown().await;
    }
}

/// What of `parts` is left after the first `written` bytes, as slices.
pub(super) fn unwritten<'a>(parts: &[&'a [u8]; 3], mut written: usize) -> [IoSlice<'a>; 3] {
    let mut out = [IoSlice::new(&[]); 3];
    let mut k = 0;
    for p in parts {
        if written >= p.len() {
            written -= p.len();
            continue;
        }
        out[k] = IoSlice::new(&p[written..]);
        written = 0;
        k += 1;
    }
    out
}
