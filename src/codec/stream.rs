//! zstd with its window kept across a channel's batches: one stream per
//! connection, flushed at the end of every batch so each decodes on arrival.
//!
//! A batch's bytes depend on every earlier batch of its stream, so a stream
//! lives exactly as long as its connection: a batch the connection lost is
//! encoded again in another connection's stream, and the receiver decodes
//! every stream batch it reads, repeats included, to stay in step.

use super::{CodecError, CodecId};
use bytes::BytesMut;
use zstd::zstd_safe::{self, zstd_sys::ZSTD_EndDirective, CParameter, DParameter};
use zstd::zstd_safe::{InBuffer, OutBuffer};

/// The window a kept stream matches back over: 2^24 bytes (16 MiB) per
/// connection, on each side. `ferry bench codecs` on real guest memory:
/// +4% ratio over per-batch zstd:1 with long-distance matching, against +6%
/// for a 128 MiB window; without it the window finds next to nothing.
pub const STREAM_WINDOW_LOG: u32 = 24;

const CODEC: CodecId = CodecId::ZstdStream;

/// A connection's compressing side.
pub struct StreamEncoder {
    cctx: zstd_safe::CCtx<'static>,
    level: i32,
}

impl StreamEncoder {
    /// A new stream at `level` (at most [`super::MAX_STREAM_LEVEL`]), with
    /// the kept window, and with long-distance matching if `long_matches`.
    ///
    /// Long-distance matching is what makes the window pay: without it the
    /// matcher's table forgets a repeat within a few hundred KiB. It runs
    /// its own rolling hash over every byte, though, and in a session that
    /// sends patches it finds little they did not (on `real-image.py`'s
    /// 1 GiB with patches, 0.8% fewer bytes for 26% more of the source's
    /// CPU; 3% fewer without them): such a session's streams go without.
    pub fn new(level: i32, long_matches: bool) -> Result<Self, CodecError> {
        if !(1..=super::MAX_STREAM_LEVEL).contains(&level) {
            return Err(CodecError::Compress { codec: CODEC });
        }
        let fail = |_| CodecError::Compress { codec: CODEC };
        let mut cctx =
            zstd_safe::CCtx::try_create().ok_or(CodecError::Compress { codec: CODEC })?;
        cctx.set_parameter(CParameter::CompressionLevel(level))
            .map_err(fail)?;
        cctx.set_parameter(CParameter::WindowLog(STREAM_WINDOW_LOG))
            .map_err(fail)?;
        cctx.set_parameter(CParameter::EnableLongDistanceMatching(long_matches))
            .map_err(fail)?;
        Ok(Self { cctx, level })
    }

    /// The level the stream was made with.
    pub fn level(&self) -> i32 {
        self.level
    }

    /// Starts the stream afresh: its window forgets everything it was
    /// given; its parameters and buffers stay.
    pub fn forget(&mut self) -> Result<(), CodecError> {
        self.cctx
            .reset(zstd_safe::ResetDirective::SessionOnly)
            .map(|_| ())
            .map_err(|_| CodecError::Compress { codec: CODEC })
    }

    /// Compresses `input` into the stream and flushes it, appending what
    /// the receiver needs to decode all of it to `out`. Returns the bytes
    /// appended. On an error the stream is unusable: its connection's
    /// receiver can no longer follow it.
    pub fn compress(&mut self, input: &[u8], out: &mut BytesMut) -> Result<usize, CodecError> {
        let start = out.len();
        let fail = |_| CodecError::Compress { codec: CODEC };
        let mut input = InBuffer::around(input);
        // Room for the whole input, a block header per 128 KiB block and a
        // frame header; grown if zstd still asks for more.
        let mut room = zstd_safe::compress_bound(input.src.len()) + 64;
        loop {
            let at = out.len();
            out.resize(at + room, 0);
            let mut buf = OutBuffer::around(&mut out[at..]);
            let left = self
                .cctx
                .compress_stream2(&mut buf, &mut input, ZSTD_EndDirective::ZSTD_e_flush)
                .map_err(fail)?;
            let used = buf.pos();
            out.truncate(at + used);
            if left == 0 && input.pos == input.src.len() {
                return Ok(out.len() - start);
            }
            room = left.max(4096);
        }
    }
}

/// A connection's decompressing side.
pub struct StreamDecoder {
    dctx: zstd_safe::DCtx<'static>,
}

impl StreamDecoder {
    /// A new decoder that refuses windows beyond [`STREAM_WINDOW_LOG`], so
    /// a peer cannot make it hold more.
    pub fn new() -> Result<Self, CodecError> {
        let corrupt = CodecError::Corrupt { codec: CODEC };
        let mut dctx = zstd_safe::DCtx::try_create().ok_or(corrupt)?;
        dctx.set_parameter(DParameter::WindowLogMax(STREAM_WINDOW_LOG))
            .map_err(|_| corrupt)?;
        Ok(Self { dctx })
    }

    /// Decodes one flushed batch of the stream into all of `out`: any other
    /// size, or a batch that ends the stream's frame, is an error, after
    /// which the decoder is unusable.
    pub fn decompress(&mut self, input: &[u8], out: &mut [u8]) -> Result<(), CodecError> {
        let declared = out.len();
        let mut input = InBuffer::around(input);
        let mut buf = OutBuffer::around(out);
        loop {
            let before = (input.pos, buf.pos());
            let hint = self
                .dctx
                .decompress_stream(&mut buf, &mut input)
                .map_err(|_| CodecError::Corrupt { codec: CODEC })?;
            if hint == 0 {
                // The source never ends the frame: a peer that does would
                // start a new one, with a window of its choosing.
                return Err(CodecError::Corrupt { codec: CODEC });
            }
            let done = input.pos == input.src.len();
            if done && buf.pos() == declared {
                // All in, all out, unless the decoder holds more.
                let mut more = [0u8; 1];
                let mut probe = OutBuffer::around(&mut more[..]);
                let mut none = InBuffer::around(&[]);
                let hint = self
                    .dctx
                    .decompress_stream(&mut probe, &mut none)
                    .map_err(|_| CodecError::Corrupt { codec: CODEC })?;
                if hint == 0 {
                    return Err(CodecError::Corrupt { codec: CODEC });
                }
                if probe.pos() == 0 {
                    return Ok(());
                }
                return Err(CodecError::SizeMismatch {
                    codec: CODEC,
                    declared,
                    actual: declared + 1,
                });
            }
            if (input.pos, buf.pos()) == before {
                break;
            }
        }
        // Stalled: out of input short of the size, or out of room with
        // input left.
        let actual = match (input.pos == input.src.len(), buf.pos() == declared) {
            (true, _) => buf.pos(),
            (false, true) => declared + 1,
            (false, false) => return Err(CodecError::Corrupt { codec: CODEC }),
        };
        Err(CodecError::SizeMismatch {
            codec: CODEC,
            declared,
            actual,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(seed: u32, len: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    }

    #[test]
    fn batches_decode_in_order_and_later_ones_find_earlier_content() {
        let (mut enc, mut dec) = (
            StreamEncoder::new(1, true).unwrap(),
            StreamDecoder::new().unwrap(),
        );
        let a = noise(7, 64 << 10);
        let mut sizes = Vec::new();
        for batch in [&a, &noise(9, 8192), &a] {
            let mut out = BytesMut::new();
            let n = enc.compress(batch, &mut out).unwrap();
            assert_eq!(n, out.len());
            sizes.push(n);
            let mut back = vec![0u8; batch.len()];
            dec.decompress(&out, &mut back).unwrap();
            assert_eq!(&back, batch);
        }
        // Noise does not compress on its own; its repeat is a match back.
        assert!(sizes[0] >= a.len(), "{sizes:?}");
        assert!(sizes[2] < a.len() / 20, "{sizes:?}");
    }

    #[test]
    fn long_matches_find_a_repeat_far_back_and_the_window_alone_does_not() {
        let a = noise(11, 256 << 10);
        let far = noise(13, 8 << 20);
        let repeat = |long| {
            let (mut enc, mut dec) = (
                StreamEncoder::new(1, long).unwrap(),
                StreamDecoder::new().unwrap(),
            );
            let mut n = 0;
            for batch in [&a, &far, &a] {
                let mut out = BytesMut::new();
                n = enc.compress(batch, &mut out).unwrap();
                let mut back = vec![0u8; batch.len()];
                dec.decompress(&out, &mut back).unwrap();
                assert_eq!(&back, batch);
            }
            n
        };
        let (with, without) = (repeat(true), repeat(false));
        assert!(with < a.len() / 20, "{with}");
        assert!(without > a.len() / 2, "{without}");
    }

    #[test]
    fn a_batch_out_of_order_or_of_the_wrong_size_is_an_error() {
        let mut enc = StreamEncoder::new(1, true).unwrap();
        let a = noise(3, 16384);
        let (mut first, mut second) = (BytesMut::new(), BytesMut::new());
        enc.compress(&a, &mut first).unwrap();
        enc.compress(&a, &mut second).unwrap();
        // The second batch alone refers to a window its decoder never saw.
        let mut back = vec![0u8; a.len()];
        assert!(StreamDecoder::new()
            .unwrap()
            .decompress(&second, &mut back)
            .is_err());
        for len in [a.len() - 1, a.len() + 1] {
            let mut out = vec![0u8; len];
            let r = StreamDecoder::new().unwrap().decompress(&first, &mut out);
            assert!(
                matches!(r, Err(CodecError::SizeMismatch { .. })),
                "{len}: {r:?}"
            );
        }
        for garbage in [&[0xffu8; 64][..], &[1, 2, 3], &[]] {
            let mut out = vec![0u8; 4096];
            assert!(StreamDecoder::new()
                .unwrap()
                .decompress(garbage, &mut out)
                .is_err());
        }
    }

    #[test]
    fn a_frame_whose_window_is_too_large_is_refused() {
        let mut cctx = zstd_safe::CCtx::create();
        cctx.set_parameter(CParameter::WindowLog(STREAM_WINDOW_LOG + 2))
            .unwrap();
        cctx.set_parameter(CParameter::CompressionLevel(1)).unwrap();
        let input = noise(5, 4096);
        let mut out = vec![0u8; 8192];
        let mut ob = OutBuffer::around(&mut out[..]);
        let mut ib = InBuffer::around(&input);
        cctx.compress_stream2(&mut ob, &mut ib, ZSTD_EndDirective::ZSTD_e_flush)
            .unwrap();
        let n = ob.pos();
        let mut back = vec![0u8; 4096];
        assert!(StreamDecoder::new()
            .unwrap()
            .decompress(&out[..n], &mut back)
            .is_err());
    }
}
