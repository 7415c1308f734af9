//! The frame header, its CRC, and a resumable frame decoder.

use super::{Command, DecodeError, MAGIC, MAX_FRAME_LEN, VERSION};
use bytes::{Buf, Bytes, BytesMut};

/// Bytes in a frame header.
pub const HEADER_LEN: usize = 40;

/// A channel's number within its session: the control channel is 0, the
/// others `1..channels` (at most [`super::MAX_CHANNELS`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChannelId(pub u16);

impl ChannelId {
    /// The control channel, which every session opens first.
    pub const CONTROL: ChannelId = ChannelId(0);

    /// Its position in a per-channel table.
    pub fn index(self) -> usize {
        usize::from(self.0)
    }

    /// Channel `i` of a session (`i` below [`super::MAX_CHANNELS`], so it fits).
    pub fn nth(i: usize) -> ChannelId {
        ChannelId(u16::try_from(i).unwrap_or(u16::MAX))
    }
}

impl std::fmt::Display for ChannelId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// A decoded frame header (the CRC is checked, not kept).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// What the payload is.
    pub command: Command,
    /// Command-specific flags.
    pub flags: u16,
    /// The channel the frame travels on.
    pub channel: ChannelId,
    /// Credits the sender asks for.
    pub credit_request: u16,
    /// Credits the sender grants its peer.
    pub credit_grant: u16,
    /// Session-wide sequence number of this direction.
    pub message_id: u64,
    /// The session (0 before setup).
    pub session_id: u64,
    /// Payload bytes after the header.
    pub payload_len: u32,
}

impl Header {
    /// A header for `command` with every other field zero.
    pub fn new(command: Command) -> Self {
        Self {
            command,
            flags: 0,
            channel: ChannelId::CONTROL,
            credit_request: 0,
            credit_grant: 0,
            message_id: 0,
            session_id: 0,
            payload_len: 0,
        }
    }

    /// Parses and checks a header, everything but the CRC (which needs the
    /// payload). The length is checked against [`MAX_FRAME_LEN`] here, before
    /// anyone allocates for the payload. Returns the header and its CRC field.
    pub fn parse(b: &[u8; HEADER_LEN]) -> Result<(Header, u32), DecodeError> {
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let magic = u32_at(0);
        if magic != MAGIC {
            return Err(DecodeError::BadMagic { found: magic });
        }
        if b[4] != VERSION {
            return Err(DecodeError::UnsupportedVersion { version: b[4] });
        }
        let command =
            Command::from_u8(b[5]).ok_or(DecodeError::UnknownCommand { command: b[5] })?;
        if u16_at(14) != 0 {
            return Err(DecodeError::Reserved {
                field: "header.reserved",
            });
        }
        let payload_len = u32_at(32);
        if payload_len > MAX_FRAME_LEN {
            return Err(DecodeError::FrameTooLong {
                len: payload_len,
                max: MAX_FRAME_LEN,
            });
        }
        let header = Header {
            command,
            flags: u16_at(6),
            channel: ChannelId(u16_at(8)),
            credit_request: u16_at(10),
            credit_grant: u16_at(12),
            message_id: u64_at(16),
            session_id: u64_at(24),
            payload_len,
        };
        Ok((header, u32_at(36)))
    }

    /// Checks the CRC of a parsed header's raw bytes and its payload.
    pub fn verify_crc(raw: &[u8; HEADER_LEN], crc: u32, payload: &[u8]) -> Result<(), DecodeError> {
        let mut c = FrameCrc::new(raw);
        c.update(payload);
        c.check(crc)
    }
}

fn frame_crc(header: &[u8; HEADER_LEN], payload: &[u8]) -> u32 {
    let mut c = FrameCrc::new(header);
    c.update(payload);
    c.value()
}

/// A frame's CRC computed piece by piece, for a payload that does not arrive
/// in one buffer (a raw batch read straight into guest memory).
#[derive(Debug, Clone)]
pub struct FrameCrc(crc32fast::Hasher);

impl FrameCrc {
    /// Starts with the header's raw bytes (its CRC field excluded).
    pub fn new(header: &[u8; HEADER_LEN]) -> Self {
        let mut h = crc32fast::Hasher::new();
        h.update(&header[..36]);
        Self(h)
    }

    /// Adds the next piece of the payload.
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    fn value(self) -> u32 {
        self.0.finalize()
    }

    /// Checks the whole payload's CRC against the header's CRC field.
    pub fn check(self, expected: u32) -> Result<(), DecodeError> {
        let actual = self.value();
        if actual != expected {
            return Err(DecodeError::Crc { expected, actual });
        }
        Ok(())
    }
}

/// Encodes a header for `payload`: sets the length and the CRC. The payload is
/// not copied; write the two with one vectored write.
///
/// # Panics
/// If the payload is longer than [`MAX_FRAME_LEN`]: encoders size their
/// payloads, so this is a bug on our side, not a peer's.
pub fn encode_header(header: &Header, payload: &[u8]) -> [u8; HEADER_LEN] {
    let mut b = encode_header_uncrc(header, payload.len());
    let crc = frame_crc(&b, payload);
    b[36..40].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Encodes a header for a payload of `len` bytes with its CRC field zero:
/// for an authenticated frame, whose tag covers what the CRC would.
///
/// # Panics
/// If `len` is over [`MAX_FRAME_LEN`], as [`encode_header`].
pub fn encode_header_uncrc(header: &Header, len: usize) -> [u8; HEADER_LEN] {
    assert!(len <= MAX_FRAME_LEN as usize, "payload of {len} bytes");
    let mut b = [0u8; HEADER_LEN];
    b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    b[4] = VERSION;
    b[5] = header.command as u8;
    b[6..8].copy_from_slice(&header.flags.to_le_bytes());
    b[8..10].copy_from_slice(&header.channel.0.to_le_bytes());
    b[10..12].copy_from_slice(&header.credit_request.to_le_bytes());
    b[12..14].copy_from_slice(&header.credit_grant.to_le_bytes());
    b[16..24].copy_from_slice(&header.message_id.to_le_bytes());
    b[24..32].copy_from_slice(&header.session_id.to_le_bytes());
    b[32..36].copy_from_slice(&(len as u32).to_le_bytes());
    b
}

/// Encodes a whole frame into one buffer (for small control frames and tests).
pub fn encode_frame(header: &Header, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&encode_header(header, payload));
    out.extend_from_slice(payload);
    out
}

/// A frame: its header and its payload, not yet decoded into a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The checked header.
    pub header: Header,
    /// The CRC-checked payload.
    pub payload: Bytes,
}

/// Checks the magic once `prefix` (the start of a frame) holds its four
/// bytes, so a stream that is not ferry's is refused before a whole header.
pub fn check_magic(prefix: &[u8]) -> Result<(), DecodeError> {
    match prefix.get(..4) {
        Some(m) => {
            let found = u32::from_le_bytes([m[0], m[1], m[2], m[3]]);
            if found != MAGIC {
                return Err(DecodeError::BadMagic { found });
            }
            Ok(())
        }
        None => Ok(()),
    }
}

/// A resumable decoder: feed it bytes as they arrive; `Ok(None)` means it needs
/// more. The header is checked as soon as it is complete, so an oversized length
/// is refused before any memory is reserved for it.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    pending: Option<(Header, [u8; HEADER_LEN], u32)>,
}

impl FrameDecoder {
    /// A decoder waiting for a header.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes one frame off the front of `src` if it is complete.
    pub fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, DecodeError> {
        if self.pending.is_none() {
            if src.len() < HEADER_LEN {
                // A stream that does not open with the magic is refused on
                // its first four bytes, not left waiting for a full header.
                check_magic(src)?;
                return Ok(None);
            }
            let raw: [u8; HEADER_LEN] = src[..HEADER_LEN].try_into().unwrap();
            let (header, crc) = Header::parse(&raw)?;
            src.advance(HEADER_LEN);
            self.pending = Some((header, raw, crc));
        }
        let (header, raw, crc) = self.pending.as_ref().unwrap();
        let len = header.payload_len as usize;
        if src.len() < len {
            src.reserve(len - src.len());
            return Ok(None);
        }
        let payload = src.split_to(len).freeze();
        Header::verify_crc(raw, *crc, &payload)?;
        let header = *header;
        self.pending = None;
        Ok(Some(Frame { header, payload }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let h = Header {
            command: Command::BatchAck,
            flags: 3,
            channel: ChannelId(7),
            credit_request: 1,
            credit_grant: 9,
            message_id: 0x0102_0304_0506_0708,
            session_id: 42,
            payload_len: 0,
        };
        encode_frame(&h, b"hello payload")
    }

    #[test]
    fn round_trip_whole_byte_by_byte_and_split() {
        let bytes = sample();
        let mut buf = BytesMut::from(&bytes[..]);
        let frame = FrameDecoder::new().decode(&mut buf).unwrap().unwrap();
        assert_eq!(frame.header.channel, ChannelId(7));
        assert_eq!(frame.header.credit_grant, 9);
        assert_eq!(frame.header.message_id, 0x0102_0304_0506_0708);
        assert_eq!(frame.header.payload_len, 13);
        assert_eq!(&frame.payload[..], b"hello payload");
        assert!(buf.is_empty());

        // Byte by byte.
        let mut dec = FrameDecoder::new();
        let mut buf = BytesMut::new();
        let mut got = None;
        for (i, b) in bytes.iter().enumerate() {
            buf.extend_from_slice(&[*b]);
            let r = dec.decode(&mut buf).unwrap();
            if i + 1 < bytes.len() {
                assert!(r.is_none());
            } else {
                got = r;
            }
        }
        assert_eq!(got.unwrap(), frame);

        // Split at every offset, two frames back to back.
        let two = [bytes.clone(), bytes.clone()].concat();
        for cut in 0..two.len() {
            let mut dec = FrameDecoder::new();
            let mut buf = BytesMut::from(&two[..cut]);
            let mut frames = vec![];
            while let Some(f) = dec.decode(&mut buf).unwrap() {
                frames.push(f);
            }
            buf.extend_from_slice(&two[cut..]);
            while let Some(f) = dec.decode(&mut buf).unwrap() {
                frames.push(f);
            }
            assert_eq!(frames.len(), 2, "cut at {cut}");
        }
    }

    #[test]
    fn rejects_bad_headers() {
        let good = sample();
        let check = |mutate: &dyn Fn(&mut Vec<u8>), want: fn(&DecodeError) -> bool| {
            let mut b = good.clone();
            mutate(&mut b);
            let err = FrameDecoder::new()
                .decode(&mut BytesMut::from(&b[..]))
                .unwrap_err();
            assert!(want(&err), "got {err}");
        };
        check(&|b| b[0] = b'X', |e| {
            matches!(e, DecodeError::BadMagic { .. })
        });
        check(&|b| b[4] = 9, |e| {
            matches!(e, DecodeError::UnsupportedVersion { version: 9 })
        });
        check(&|b| b[5] = 200, |e| {
            matches!(e, DecodeError::UnknownCommand { command: 200 })
        });
        check(&|b| b[14] = 1, |e| {
            matches!(e, DecodeError::Reserved { .. })
        });
        check(&|b| b[45] ^= 1, |e| matches!(e, DecodeError::Crc { .. }));
        check(&|b| b[36] ^= 1, |e| matches!(e, DecodeError::Crc { .. }));
        // A huge length is refused from the header alone, before any payload.
        let mut b = good.clone();
        b[32..36].copy_from_slice(&u32::MAX.to_le_bytes());
        let err = FrameDecoder::new()
            .decode(&mut BytesMut::from(&b[..HEADER_LEN]))
            .unwrap_err();
        assert_eq!(
            err,
            DecodeError::FrameTooLong {
                len: u32::MAX,
                max: MAX_FRAME_LEN
            }
        );
    }

    #[test]
    fn a_stream_without_the_magic_is_refused_on_its_first_four_bytes() {
        let mut buf = BytesMut::from(&b"GET / HTTP/1.1\r\n"[..]);
        let err = FrameDecoder::new().decode(&mut buf).unwrap_err();
        assert!(matches!(err, DecodeError::BadMagic { .. }), "{err}");
        let mut short = BytesMut::from(&b"FRY"[..]);
        assert_eq!(FrameDecoder::new().decode(&mut short), Ok(None));
    }

    #[test]
    fn truncated_is_incomplete_not_an_error() {
        let bytes = sample();
        for cut in 0..bytes.len() {
            let mut buf = BytesMut::from(&bytes[..cut]);
            assert!(FrameDecoder::new().decode(&mut buf).unwrap().is_none());
        }
    }
}
