//! Page codecs: zero-page detection and the batch payload compressors (none,
//! lz4, zstd at a level, and zstd as a stream kept across a channel's batches).

mod auto;
mod rate;
mod stream;

pub use auto::{
    AutoChooser, CANDIDATES, PROBE_BYTES, PROBE_EVERY, PROBE_EVERY_CLOSE, PROBE_EVERY_FAR,
};
pub use rate::SocketRate;
pub use stream::{StreamDecoder, StreamEncoder, STREAM_WINDOW_LOG};

use bytes::BytesMut;
use std::cell::RefCell;
use std::fmt;
use std::str::FromStr;

/// The highest zstd level accepted.
pub const MAX_ZSTD_LEVEL: i32 = 22;
/// The highest level of a kept stream: its tables are sized for an input
/// of unknown length, so higher levels would take hundreds of MiB per
/// connection (level 19: about 100 MiB; 22: 660 MiB).
pub const MAX_STREAM_LEVEL: i32 = 9;

/// How a batch's non-zero pages are encoded on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Codec {
    /// Pages as they are.
    None,
    /// LZ4 block compression (fast; about 2x on typical memory).
    #[default]
    Lz4,
    /// Zstandard at a level from 1 (fast) to 22 (small).
    Zstd {
        /// Compression level.
        level: i32,
    },
    /// zstd at a level, one stream per channel that keeps its window
    /// across batches ([`StreamEncoder`]): denser, and slower.
    ZstdStream {
        /// Compression level.
        level: i32,
    },
}

/// What a migration is asked to compress with: one codec throughout, or
/// `auto`, which picks per batch from live measurements ([`AutoChooser`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CodecChoice {
    /// The same codec for every batch.
    Fixed(Codec),
    /// Chosen per batch.
    Auto,
}

impl Default for CodecChoice {
    fn default() -> Self {
        Self::Fixed(Codec::Lz4)
    }
}

impl From<Codec> for CodecChoice {
    fn from(c: Codec) -> Self {
        Self::Fixed(c)
    }
}

impl FromStr for CodecChoice {
    type Err = CodecParseError;

    fn from_str(s: &str) -> Result<Self, CodecParseError> {
        match s.trim() {
            "auto" => Ok(Self::Auto),
            other => other
                .parse::<Codec>()
                .map(Self::Fixed)
                .map_err(|_| CodecParseError(s.to_string())),
        }
    }
}

impl fmt::Display for CodecChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Fixed(c) => c.fmt(f),
            Self::Auto => f.write_str("auto"),
        }
    }
}

/// The session-setup value that announces `auto` (batches still name their own codec).
pub const SETUP_CODEC_AUTO: u8 = 3;

/// The codec of a batch as it travels: the wire carries the id, not the level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum CodecId {
    /// Raw pages.
    None = 0,
    /// An LZ4 block.
    Lz4 = 1,
    /// A zstd frame.
    Zstd = 2,
    /// A flushed part of the channel's kept zstd stream (3 is the setup's
    /// `auto`).
    ZstdStream = 4,
}

impl CodecId {
    /// Decodes a wire codec id.
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::None),
            1 => Some(Self::Lz4),
            2 => Some(Self::Zstd),
            4 => Some(Self::ZstdStream),
            _ => None,
        }
    }

    /// The bit of this codec in a capability mask.
    pub fn bit(self) -> u32 {
        1 << (self as u8)
    }
}

impl Codec {
    /// The id this codec puts on the wire.
    pub fn id(self) -> CodecId {
        match self {
            Self::None => CodecId::None,
            Self::Lz4 => CodecId::Lz4,
            Self::Zstd { .. } => CodecId::Zstd,
            Self::ZstdStream { .. } => CodecId::ZstdStream,
        }
    }

    /// Whether a batch's bytes depend on the channel's earlier batches.
    pub fn is_stream(self) -> bool {
        matches!(self, Self::ZstdStream { .. })
    }

    /// The zstd level, for the codecs that have one.
    pub fn level(self) -> Option<i32> {
        match self {
            Self::Zstd { level } | Self::ZstdStream { level } => Some(level),
            Self::None | Self::Lz4 => None,
        }
    }
}

/// Why a codec name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid codec {0:?}: use none, lz4, zstd[:level] with level 1..=22, zstd-stream[:level] with level 1..=9, or auto"
)]
pub struct CodecParseError(String);

impl FromStr for Codec {
    type Err = CodecParseError;

    fn from_str(s: &str) -> Result<Self, CodecParseError> {
        let err = || CodecParseError(s.to_string());
        match s.trim() {
            "none" | "raw" => Ok(Self::None),
            "lz4" => Ok(Self::Lz4),
            "zstd" => Ok(Self::Zstd { level: 3 }),
            "zstd-stream" => Ok(Self::ZstdStream { level: 1 }),
            other => {
                let (stream, level) = match other.strip_prefix("zstd-stream:") {
                    Some(l) => (true, l),
                    None => (false, other.strip_prefix("zstd:").ok_or_else(err)?),
                };
                let level: i32 = level.parse().map_err(|_| err())?;
                let max = if stream {
                    MAX_STREAM_LEVEL
                } else {
                    MAX_ZSTD_LEVEL
                };
                if !(1..=max).contains(&level) {
                    return Err(err());
                }
                Ok(match stream {
                    true => Self::ZstdStream { level },
                    false => Self::Zstd { level },
                })
            }
        }
    }
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => f.write_str("none"),
            Self::Lz4 => f.write_str("lz4"),
            Self::Zstd { level } => write!(f, "zstd:{level}"),
            Self::ZstdStream { level } => write!(f, "zstd-stream:{level}"),
        }
    }
}

/// Codec failures. Small and `Copy`: this is a hot path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[allow(missing_docs)] // variant fields are named in the messages
pub enum CodecError {
    /// The compressor failed (out of memory, bad level).
    #[error("{codec:?} compression failed")]
    Compress { codec: CodecId },
    /// The compressed data is corrupt or decompresses past the declared size.
    #[error("{codec:?} payload is corrupt")]
    Corrupt { codec: CodecId },
    /// The payload decompressed to a size other than the one declared.
    #[error("{codec:?} payload decompressed to {actual} bytes, {declared} declared")]
    SizeMismatch {
        codec: CodecId,
        declared: usize,
        actual: usize,
    },
    /// A kept stream's batch arrived where no stream decodes it.
    #[error("a kept stream's batch outside a channel's stream")]
    NoStream,
}

/// Whether a page is all zero (the test lives with guest memory, which
/// uses it too).
pub use crate::memory::is_zero_page;

thread_local! {
    /// One compressor per level in use on this thread: `auto` alternates levels
    /// (a batch at one, a probe at others), and making a context costs as much
    /// as compressing a 64 KiB probe.
    static ZSTD_C: RefCell<Vec<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(Vec::new()) };
    static ZSTD_D: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
    /// This thread's own kept streams, per level: for probes, which measure
    /// a kept stream on samples, not for a channel's batches.
    static ZSTD_S: RefCell<Vec<StreamEncoder>> = const { RefCell::new(Vec::new()) };
}

/// Empties the windows of this thread's kept streams for [`compress`]
/// (their contexts and buffers stay): what a probe compressed before no
/// longer helps the next. The source calls it when a thread first probes
/// for a migration, after its warm-up: else the timed run of a sample the
/// warm-up (or an earlier migration of the same pages) gave a stream finds
/// it all in the window.
pub fn forget_streams() {
    ZSTD_S.with(|cell| {
        // A stream that cannot be reset is made anew at its next use.
        cell.borrow_mut().retain_mut(|s| s.forget().is_ok());
    });
}

/// The largest output `compress` can write for `len` input bytes.
pub fn max_compressed_len(codec: Codec, len: usize) -> usize {
    match codec {
        Codec::None => len,
        Codec::Lz4 => lz4_flex::block::get_maximum_output_size(len),
        Codec::Zstd { .. } | Codec::ZstdStream { .. } => zstd::zstd_safe::compress_bound(len),
    }
}

/// Compresses `input` and appends the result to `out`. Returns the bytes
/// appended. A kept stream compresses into the thread's own stream of its
/// level (a probe's measure of one; a channel's batches go through the
/// channel's [`StreamEncoder`]).
pub fn compress(codec: Codec, input: &[u8], out: &mut BytesMut) -> Result<usize, CodecError> {
    if let Codec::ZstdStream { level } = codec {
        return ZSTD_S.with(|cell| {
            let mut streams = cell.borrow_mut();
            let at = match streams.iter().position(|s| s.level() == level) {
                Some(at) => at,
                None => {
                    // As a session that sends patches (the default) keeps
                    // its streams: without long-distance matching.
                    streams.push(StreamEncoder::new(level, false)?);
                    streams.len() - 1
                }
            };
            let n = streams[at].compress(input, out);
            if n.is_err() {
                // Unusable after an error: the next probe makes a new one.
                streams.remove(at);
            }
            n
        });
    }
    let start = out.len();
    out.resize(start + max_compressed_len(codec, input.len()), 0);
    let n = match codec {
        Codec::None => {
            out[start..].copy_from_slice(input);
            input.len()
        }
        Codec::Lz4 => lz4_flex::block::compress_into(input, &mut out[start..]).map_err(|_| {
            CodecError::Compress {
                codec: CodecId::Lz4,
            }
        })?,
        Codec::Zstd { level } => ZSTD_C.with(|cell| {
            let mut cached = cell.borrow_mut();
            let at = match cached.iter().position(|(l, _)| *l == level) {
                Some(at) => at,
                None => {
                    let c =
                        zstd::bulk::Compressor::new(level).map_err(|_| CodecError::Compress {
                            codec: CodecId::Zstd,
                        })?;
                    if cached.len() >= 4 {
                        cached.remove(0);
                    }
                    cached.push((level, c));
                    cached.len() - 1
                }
            };
            let (_, c) = &mut cached[at];
            c.compress_to_buffer(input, &mut out[start..])
                .map_err(|_| CodecError::Compress {
                    codec: CodecId::Zstd,
                })
        })?,
        Codec::ZstdStream { .. } => unreachable!("compressed above"),
    };
    out.truncate(start + n);
    Ok(n)
}

/// Decompresses `input` into all of `out`; any other decompressed size is an
/// error. A kept stream's batch needs its channel's [`StreamDecoder`]: here
/// it is an error.
pub fn decompress(codec: CodecId, input: &[u8], out: &mut [u8]) -> Result<(), CodecError> {
    let declared = out.len();
    let actual = match codec {
        CodecId::None => {
            if input.len() != declared {
                return Err(CodecError::SizeMismatch {
                    codec,
                    declared,
                    actual: input.len(),
                });
            }
            out.copy_from_slice(input);
            declared
        }
        CodecId::Lz4 => lz4_flex::block::decompress_into(input, out)
            .map_err(|_| CodecError::Corrupt { codec })?,
        CodecId::Zstd => ZSTD_D.with(|cell| {
            let mut cell = cell.borrow_mut();
            if cell.is_none() {
                *cell = Some(
                    zstd::bulk::Decompressor::new().map_err(|_| CodecError::Corrupt { codec })?,
                );
            }
            cell.as_mut()
                .unwrap()
                .decompress_to_buffer(input, out)
                .map_err(|_| CodecError::Corrupt { codec })
        })?,
        CodecId::ZstdStream => return Err(CodecError::NoStream),
    };
    if actual != declared {
        return Err(CodecError::SizeMismatch {
            codec,
            declared,
            actual,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        let mut page = vec![0u8; 4096];
        assert!(is_zero_page(&page));
        for pos in [0, 1, 255, 256, 2048, 4095] {
            page[pos] = 1;
            assert!(!is_zero_page(&page), "missed byte {pos}");
            page[pos] = 0;
        }
        assert!(is_zero_page(&[0u8; 100]));
        assert!(!is_zero_page(&[0, 0, 3]));
    }

    #[test]
    fn a_probe_stream_forgets_what_a_warm_up_gave_it() {
        // Incompressible bytes: only the window can shrink them.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let sample: Vec<u8> = (0..64 << 10)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let stream = Codec::ZstdStream { level: 1 };
        let size = |out: &mut BytesMut| {
            out.clear();
            compress(stream, &sample, out).unwrap()
        };
        let mut out = BytesMut::new();
        let first = size(&mut out);
        assert!(first >= sample.len(), "{first}");
        // Again into the same window: found whole.
        assert!(size(&mut out) < sample.len() / 10);
        forget_streams();
        assert_eq!(size(&mut out), first);
    }

    #[test]
    fn parse_codecs() {
        assert_eq!("lz4".parse::<Codec>().unwrap(), Codec::Lz4);
        assert_eq!("none".parse::<Codec>().unwrap(), Codec::None);
        assert_eq!("zstd".parse::<Codec>().unwrap(), Codec::Zstd { level: 3 });
        assert_eq!(
            "zstd:19".parse::<Codec>().unwrap(),
            Codec::Zstd { level: 19 }
        );
        assert!("zstd:0".parse::<Codec>().is_err());
        assert!("zstd:23".parse::<Codec>().is_err());
        assert_eq!(
            "zstd-stream".parse::<Codec>().unwrap(),
            Codec::ZstdStream { level: 1 }
        );
        assert_eq!(
            "zstd-stream:9".parse::<Codec>().unwrap().to_string(),
            "zstd-stream:9"
        );
        assert!("zstd-stream:10".parse::<Codec>().is_err(), "memory");
        assert!("zstd-stream:0".parse::<Codec>().is_err());
        assert!("gzip".parse::<Codec>().is_err());
        assert_eq!(Codec::Zstd { level: 1 }.to_string(), "zstd:1");
        assert_eq!("auto".parse::<CodecChoice>().unwrap(), CodecChoice::Auto);
        assert_eq!(
            "zstd:2".parse::<CodecChoice>().unwrap(),
            CodecChoice::Fixed(Codec::Zstd { level: 2 })
        );
        assert!("auto:3".parse::<CodecChoice>().is_err());
        assert_eq!(CodecChoice::Auto.to_string(), "auto");
        assert!(
            "auto".parse::<Codec>().is_err(),
            "a batch codec is concrete"
        );
    }

    #[test]
    fn round_trips_and_rejects_size_mismatch() {
        let input: Vec<u8> = (0..20000u32).map(|i| (i % 251) as u8).collect();
        for codec in [
            Codec::None,
            Codec::Lz4,
            Codec::Zstd { level: 1 },
            Codec::Zstd { level: 9 },
        ] {
            let mut out = BytesMut::from(&[9u8; 3][..]); // compress appends after existing bytes
            let n = compress(codec, &input, &mut out).unwrap();
            assert_eq!(out.len(), 3 + n);
            let mut back = vec![0u8; input.len()];
            decompress(codec.id(), &out[3..], &mut back).unwrap();
            assert_eq!(back, input);
            let mut short = vec![0u8; input.len() - 1];
            assert!(
                decompress(codec.id(), &out[3..], &mut short).is_err(),
                "{codec}"
            );
            let mut long = vec![0u8; input.len() + 1];
            assert!(
                decompress(codec.id(), &out[3..], &mut long).is_err(),
                "{codec}"
            );
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut out = vec![0u8; 8192];
        for garbage in [&[0xffu8; 64][..], &[1, 2, 3], &[]] {
            assert!(decompress(CodecId::Lz4, garbage, &mut out).is_err());
            assert!(decompress(CodecId::Zstd, garbage, &mut out).is_err());
        }
    }
}
