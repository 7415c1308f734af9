//! One TCP channel's framed halves: checked frame reads, vectored frame writes.

use super::TokenBucket;
use crate::migration::MigrationError;
use crate::wire::{encode_header, Frame, Header, Message, HEADER_LEN};
use bytes::BytesMut;
use std::io::IoSlice;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// Reads whole, CRC-checked frames from a channel.
#[derive(Debug)]
pub struct FrameReader {
    rd: BufReader<OwnedReadHalf>,
    channel: u16,
    bytes: Arc<AtomicU64>,
    buf: BytesMut,
}

impl FrameReader {
    /// Wraps a read half; counts bytes read into `bytes`.
    pub fn new(rd: OwnedReadHalf, channel: u16, bytes: Arc<AtomicU64>) -> Self {
        Self {
            rd: BufReader::with_capacity(64 << 10, rd),
            channel,
            bytes,
            buf: BytesMut::new(),
        }
    }

    /// The channel number.
    pub fn channel(&self) -> u16 {
        self.channel
    }

    /// Sets the channel number (once bound).
    pub fn set_channel(&mut self, channel: u16) {
        self.channel = channel;
    }

    /// Counts into `bytes` from now on, carrying over what was counted so far
    /// (a bound channel joins its session's counter).
    pub fn share_counter(&mut self, bytes: Arc<AtomicU64>) {
        bytes.fetch_add(self.bytes.load(Ordering::Relaxed), Ordering::Relaxed);
        self.bytes = bytes;
    }

    /// The next frame; `None` on a clean close between frames. A close inside a
    /// frame, a bad header or a bad CRC is an error. The payload is allocated
    /// only after the header's length has been checked.
    pub async fn read_frame(&mut self) -> Result<Option<Frame>, MigrationError> {
        let mut raw = [0u8; HEADER_LEN];
        let mut got = 0;
        while got < HEADER_LEN {
            let n = self.rd.read(&mut raw[got..]).await.map_err(|e| {
                MigrationError::io(format!("read from channel {}", self.channel), e)
            })?;
            if n == 0 {
                if got == 0 {
                    return Ok(None);
                }
                return Err(MigrationError::Protocol(format!(
                    "channel {} closed inside a frame header",
                    self.channel
                )));
            }
            got += n;
        }
        let (header, crc) = Header::parse(&raw)?;
        // Read into a buffer that is reclaimed once earlier payloads are
        // dropped, without zeroing it first; only the checked length is reserved.
        let len = header.payload_len as usize;
        self.buf.clear();
        self.buf.reserve(len);
        while self.buf.len() < len {
            let want = (len - self.buf.len()) as u64;
            let n = (&mut self.rd)
                .take(want)
                .read_buf(&mut self.buf)
                .await
                .map_err(|e| {
                    MigrationError::io(format!("read from channel {}", self.channel), e)
                })?;
            if n == 0 {
                return Err(MigrationError::Protocol(format!(
                    "channel {} closed inside a {:?} payload",
                    self.channel, header.command
                )));
            }
        }
        let payload = self.buf.split_to(len);
        Header::verify_crc(&raw, crc, &payload)?;
        self.bytes
            .fetch_add((HEADER_LEN + payload.len()) as u64, Ordering::Relaxed);
        Ok(Some(Frame {
            header,
            payload: payload.freeze(),
        }))
    }
}

/// Writes frames to a channel: header and payload in one vectored write, after
/// the bandwidth cap (if any) allowed their bytes.
#[derive(Debug)]
pub struct FrameWriter {
    wr: OwnedWriteHalf,
    channel: u16,
    bucket: Option<Arc<TokenBucket>>,
    bytes: Arc<AtomicU64>,
}

impl FrameWriter {
    /// Wraps a write half; counts bytes written into `bytes`.
    pub fn new(
        wr: OwnedWriteHalf,
        channel: u16,
        bucket: Option<Arc<TokenBucket>>,
        bytes: Arc<AtomicU64>,
    ) -> Self {
        Self {
            wr,
            channel,
            bucket,
            bytes,
        }
    }

    /// Sets the channel number (once bound).
    pub fn set_channel(&mut self, channel: u16) {
        self.channel = channel;
    }

    /// Sends one frame with `payload` (length and CRC are filled in).
    pub async fn send_raw(
        &mut self,
        header: &Header,
        payload: &[u8],
    ) -> Result<(), MigrationError> {
        let head = encode_header(header, payload);
        let total = HEADER_LEN + payload.len();
        if let Some(b) = &self.bucket {
            b.acquire(total as u64).await;
        }
        let mut written = 0;
        while written < total {
            let slices = if written < HEADER_LEN {
                [IoSlice::new(&head[written..]), IoSlice::new(payload)]
            } else {
                [
                    IoSlice::new(&payload[written - HEADER_LEN..]),
                    IoSlice::new(&[]),
                ]
            };
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
