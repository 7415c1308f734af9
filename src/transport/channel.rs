//! One TCP channel's framed halves: checked frame reads, vectored frame writes.

use super::TokenBucket;
use crate::codec::CodecId;
use crate::memory::{GuestMemory, PageFill, PAGE_SIZE};
use crate::migration::{ChannelLoss, MigrationError};
use crate::wire::ChannelId;
use crate::wire::{
    encode_header, encode_header_uncrc, Command, Frame, FrameCrc, FrameMac, Header, Limits,
    Message, PageBatch, HEADER_LEN, MAC_LEN,
};
use bytes::BytesMut;
use std::io::IoSlice;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncBufRead, AsyncReadExt, AsyncWriteExt, BufReader, Interest};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

mod reader;
mod writer;

pub use reader::FrameReader;
pub use writer::FrameWriter;

/// What [`FrameReader::read_placing`] read.
#[derive(Debug)]
pub enum Received {
    /// A whole, CRC-checked frame.
    Frame(Frame),
    /// A raw page batch whose pages were read straight into guest memory and
    /// CRC-checked there; the batch carries its metadata only.
    Placed(Header, PageBatch),
}

/// A channel's connection: plain TCP, or TLS over it.
pub enum Conn {
    /// Plain, CRC-checked frames.
    Plain(TcpStream),
    /// TLS 1.3.
    Tls(Box<tokio_rustls::TlsStream<TcpStream>>),
}

impl Conn {
    /// Splits it into a frame reader and writer.
    pub fn split(
        self,
        channel: ChannelId,
        rx: Arc<AtomicU64>,
        buckets: Vec<Arc<TokenBucket>>,
        tx: Arc<AtomicU64>,
    ) -> (FrameReader, FrameWriter) {
        use std::os::fd::AsRawFd;
        match self {
            Conn::Plain(s) => {
                let fd = s.as_raw_fd();
                let (r, w) = s.into_split();
                (
                    FrameReader::with(ReadSide::Plain(r), channel, rx),
                    FrameWriter::with(WriteSide::Plain(w), fd, channel, buckets, tx),
                )
            }
            Conn::Tls(s) => {
                let fd = s.get_ref().0.as_raw_fd();
                let (r, w) = tokio::io::split(*s);
                (
                    FrameReader::with(ReadSide::Tls(r), channel, rx),
                    FrameWriter::with(WriteSide::Tls(w), fd, channel, buckets, tx),
                )
            }
        }
    }
}

/// The read half of a channel's connection.
#[derive(Debug)]
pub enum ReadSide {
    /// Plain TCP: pages can be read straight into guest memory.
    Plain(OwnedReadHalf),
    /// TLS: records are decrypted first.
    Tls(tokio::io::ReadHalf<tokio_rustls::TlsStream<TcpStream>>),
}

/// The write half of a channel's connection.
#[derive(Debug)]
pub enum WriteSide {
    /// Plain TCP.
    Plain(OwnedWriteHalf),
    /// TLS.
    Tls(tokio::io::WriteHalf<tokio_rustls::TlsStream<TcpStream>>),
}

impl tokio::io::AsyncRead for ReadSide {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            ReadSide::Plain(r) => std::pin::Pin::new(r).poll_read(cx, buf),
            ReadSide::Tls(r) => std::pin::Pin::new(r).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for WriteSide {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            WriteSide::Plain(w) => std::pin::Pin::new(w).poll_write(cx, buf),
            WriteSide::Tls(w) => std::pin::Pin::new(w).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            WriteSide::Plain(w) => std::pin::Pin::new(w).poll_write_vectored(cx, bufs),
            WriteSide::Tls(w) => std::pin::Pin::new(w).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            WriteSide::Plain(w) => w.is_write_vectored(),
            WriteSide::Tls(w) => w.is_write_vectored(),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            WriteSide::Plain(w) => std::pin::Pin::new(w).poll_flush(cx),
            WriteSide::Tls(w) => std::pin::Pin::new(w).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            WriteSide::Plain(w) => std::pin::Pin::new(w).poll_shutdown(cx),
            WriteSide::Tls(w) => std::pin::Pin::new(w).poll_shutdown(cx),
        }
    }
}

/// The largest payload a peer may send before it has proved the key: the
/// handshake's messages (a labelled, proven setup is under 1 KiB; an abort's
/// text at most 4 KiB) and no more, so an unproven connection never makes the
/// reader reserve more than this.
pub const HANDSHAKE_MAX_PAYLOAD: u32 = 8 << 10;

/// Read buffer of a connection before its peer is proved, and after.
const HANDSHAKE_BUFFER: usize = 4 << 10;
const SESSION_BUFFER: usize = 64 << 10;

#[cfg(test)]
mod tests {
    use super::writer::unwritten;

    #[test]
    fn unwritten_skips_what_was_written_across_parts() {
        let parts: [&[u8]; 3] = [b"head", b"payload", b"tag"];
        let flat = |w| -> Vec<u8> {
            unwritten(&parts, w)
                .iter()
                .flat_map(|s| s.to_vec())
                .collect()
        };
        assert_eq!(flat(0), b"headpayloadtag");
        assert_eq!(flat(2), b"adpayloadtag");
        assert_eq!(flat(4), b"payloadtag");
        assert_eq!(flat(10), b"dtag");
        assert_eq!(flat(13), b"g");
        assert_eq!(flat(14), b"");
    }
}
