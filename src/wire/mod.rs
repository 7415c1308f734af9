//! The wire format: a fixed little-endian frame header with a CRC-32, and the
//! messages of the migration protocol. Pure functions over byte buffers; every
//! length, count and index is checked before it is used or allocated from.
//!
//! ```text
//! offset size field
//!      0    4 magic "FRY1"
//!      4    1 version (2)
//!      5    1 command
//!      6    2 flags
//!      8    2 channel
//!     10    2 credits requested
//!     12    2 credits granted
//!     14    2 reserved (0)
//!     16    8 message id (session-wide, per direction)
//!     24    8 session id
//!     32    4 payload length
//!     36    4 CRC-32 of bytes 0..36 and the payload
//! ```

/// Bytes in one guest page, as the wire counts them (the same as
/// [`crate::memory::PAGE_SIZE`]; `migration` checks that at compile time).
pub const PAGE_SIZE: usize = 4096;

mod batch;
mod decode;
mod frame;
mod mac;
mod message;
pub mod patch;

pub use batch::{
    BatchEncoder, EncodedBatch, Page, PageBatch, Read, MAX_PAGES_PER_BATCH, MAX_RUNS_PER_BATCH,
};
pub use frame::{
    check_magic, encode_frame, encode_header, encode_header_uncrc, ChannelId, Frame, FrameCrc,
    FrameDecoder, Header, HEADER_LEN,
};
pub use mac::{FrameMac, FrameTag, MAC_LEN};
pub use message::{
    Abort, AbortCode, BatchAck, ChannelBind, ChannelBindResponse, Complete, DeltaBase, Echo,
    GuestKind, Message, Negotiate, NegotiateResponse, Ready, RoundEnd, SessionLabel, SessionSetup,
    SessionSetupResponse, Switchover, VerifyMode, CAPABILITIES, CAP_PAGE_PATCHES, CAP_PAGE_REFS,
    MAX_LABEL_LEN, SETUP_DELTA, SETUP_FRAME_MAC, SETUP_LABELLED, SETUP_LEAVE_PAUSED, SETUP_PROVEN,
};

/// `"FRY1"` as a little-endian u32.
pub const MAGIC: u32 = u32::from_le_bytes(*b"FRY1");
/// The protocol version this build speaks (2: mutual proofs of the key,
/// proven channel binds, keepalives and resends; 3: the proofs cover the
/// negotiation's capabilities and codecs).
pub const VERSION: u8 = 3;
/// Header flag on a page batch sent again after the channel that carried it
/// failed: the receiver applies each message id once and acknowledges a
/// resend of one it already applied without applying it again.
pub const FLAG_RESEND: u16 = 1;
/// The largest payload a frame may carry: 8 MiB.
pub const MAX_FRAME_LEN: u32 = 8 << 20;
/// Most channels in one session.
pub const MAX_CHANNELS: u16 = 64;
/// Most batches a receiver may grant a channel at once.
pub const MAX_CREDITS: u16 = 1024;
/// Longest abort message, in bytes.
pub const MAX_ABORT_MESSAGE: usize = 4096;

/// Frame commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Command {
    /// Source → destination: protocol versions, capabilities, codecs, page size.
    Negotiate = 1,
    /// Destination → source: the chosen version and common capabilities.
    NegotiateResponse = 2,
    /// Source → destination: guest size, channels, codec; creates the session.
    SessionSetup = 3,
    /// Destination → source: session id, bind token, initial credits.
    SessionSetupResponse = 4,
    /// Source → destination, first frame of channels 1..N: join a session.
    ChannelBind = 5,
    /// Destination → source: the channel is bound; credits granted.
    ChannelBindResponse = 6,
    /// Source → destination: a batch of pages.
    PageBatch = 7,
    /// Destination → source: a batch was applied; more credit.
    BatchAck = 8,
    /// Source → destination: a pre-copy round is complete.
    RoundEnd = 9,
    /// Source → destination: the guest is paused; its state and memory digest.
    Switchover = 10,
    /// Destination → source: everything applied and verified.
    Ready = 11,
    /// Source → destination: run the guest; the source never will again.
    Go = 12,
    /// Destination → source: the guest runs here.
    Complete = 13,
    /// Either way: the migration ends with an error.
    Abort = 14,
    /// Keepalive on an idle channel.
    Echo = 15,
    /// The answer to a keepalive.
    EchoResponse = 16,
}

impl Command {
    /// Decodes a command byte.
    pub fn from_u8(v: u8) -> Option<Self> {
        use Command::*;
        Some(match v {
            1 => Negotiate,
            2 => NegotiateResponse,
            3 => SessionSetup,
            4 => SessionSetupResponse,
            5 => ChannelBind,
            6 => ChannelBindResponse,
            7 => PageBatch,
            8 => BatchAck,
            9 => RoundEnd,
            10 => Switchover,
            11 => Ready,
            12 => Go,
            13 => Complete,
            14 => Abort,
            15 => Echo,
            16 => EchoResponse,
            _ => return None,
        })
    }

    /// The command's name as the protocol's documents spell it
    /// (`ROUND_END`).
    pub fn name(self) -> &'static str {
        use Command::*;
        match self {
            Negotiate => "NEGOTIATE",
            NegotiateResponse => "NEGOTIATE_RESPONSE",
            SessionSetup => "SESSION_SETUP",
            SessionSetupResponse => "SESSION_SETUP_RESPONSE",
            ChannelBind => "CHANNEL_BIND",
            ChannelBindResponse => "CHANNEL_BIND_RESPONSE",
            PageBatch => "PAGE_BATCH",
            BatchAck => "BATCH_ACK",
            RoundEnd => "ROUND_END",
            Switchover => "SWITCHOVER",
            Ready => "READY",
            Go => "GO",
            Complete => "COMPLETE",
            Abort => "ABORT",
            Echo => "ECHO",
            EchoResponse => "ECHO_RESPONSE",
        }
    }
}

impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A frame or message that cannot be accepted. Names the field at fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[allow(missing_docs)] // variant fields are named in the messages
pub enum DecodeError {
    /// The frame does not start with the magic.
    #[error("bad magic {found:#010x}")]
    BadMagic { found: u32 },
    /// A protocol version this build does not speak.
    #[error("unsupported protocol version {version}")]
    UnsupportedVersion { version: u8 },
    /// An unknown command byte.
    #[error("unknown command {command}")]
    UnknownCommand { command: u8 },
    /// The payload length is over the limit; nothing was allocated.
    #[error("frame payload of {len} bytes exceeds the {max} byte limit")]
    FrameTooLong { len: u32, max: u32 },
    /// A reserved field is not zero.
    #[error("reserved field {field} is not zero")]
    Reserved { field: &'static str },
    /// The CRC-32 does not match the frame.
    #[error("CRC mismatch: frame says {expected:#010x}, computed {actual:#010x}")]
    Crc { expected: u32, actual: u32 },
    /// An authenticated frame's tag does not match: the frame was changed,
    /// replayed or moved on the path, or the peer holds another key.
    #[error("frame authentication failed: the frame was changed, replayed or moved on the path")]
    Mac,
    /// The payload ended inside a field.
    #[error("payload truncated in field {field}")]
    Truncated { field: &'static str },
    /// Bytes are left after the last field.
    #[error("{extra} trailing bytes after {command:?}")]
    TrailingBytes { command: Command, extra: usize },
    /// A value is outside its allowed range.
    #[error("field {field} = {value} is out of range (limit {limit})")]
    OutOfRange {
        field: &'static str,
        value: u64,
        limit: u64,
    },
    /// Two values that must agree do not.
    #[error("field {field} declares {declared} but the frame holds {actual}")]
    Mismatch {
        field: &'static str,
        declared: u64,
        actual: u64,
    },
    /// A value is malformed (bad enum value, invalid UTF-8, unsorted runs).
    #[error("field {field} is invalid")]
    Invalid { field: &'static str },
}

/// A bounds-checked little-endian cursor over a payload.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    pub(crate) fn bytes(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() - self.pos < n {
            return Err(DecodeError::Truncated { field });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub(crate) fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.bytes(1, field)?[0])
    }

    pub(crate) fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(
            self.bytes(2, field)?.try_into().unwrap(),
        ))
    }

    pub(crate) fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(
            self.bytes(4, field)?.try_into().unwrap(),
        ))
    }

    pub(crate) fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(
            self.bytes(8, field)?.try_into().unwrap(),
        ))
    }

    pub(crate) fn position(&self) -> usize {
        self.pos
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(crate) fn finish(&self, command: Command) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            extra => Err(DecodeError::TrailingBytes { command, extra }),
        }
    }
}

/// A peer's text (an abort's reason) made safe to print: control characters
/// (newlines, escape sequences) are written escaped, so a peer cannot forge
/// log lines or drive a terminal.
pub fn escape_text(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    std::borrow::Cow::Owned(
        text.chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect(),
    )
}

/// Limits the receiver applies to what a peer sends, known after setup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Pages in the guest: every page index must be below this.
    pub guest_pages: u64,
}

impl Limits {
    /// Limits before the session has said how large the guest is: no page index
    /// is accepted.
    pub const BEFORE_SETUP: Limits = Limits { guest_pages: 0 };
}

/// Decodes a whole frame (header and payload) from the start of `data` and
/// then its message, as a receiver would. For fuzzing and tests: it must never
/// panic, whatever the bytes.
#[cfg(feature = "fuzzing")]
pub fn decode_all(data: &[u8], limits: Limits) -> Result<Option<Message>, DecodeError> {
    let mut buf = bytes::BytesMut::from(data);
    match FrameDecoder::new().decode(&mut buf)? {
        Some(frame) => Message::decode(&frame.header, frame.payload, limits).map(Some),
        None => Ok(None),
    }
}
