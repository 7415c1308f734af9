//! The page batch: runs of pages, a zero bitmap, and the non-zero pages
//! compressed together by the batch's codec.
//!
//! ```text
//! offset size field
//!      0    4 round
//!      4    1 codec id (0 none, 1 lz4, 2 zstd, 4 the channel's kept zstd stream)
//!      5    1 flags: bit 0 = references follow (see below); others 0
//!      6    2 run count (1..=1024)
//!      8    4 page count (1..=1024), the sum of the run lengths
//!     12    4 data length: bytes of the data alone
//!     16    4 uncompressed length: 4096 × pages sent as data
//!     20 12×n runs: first page u64, length u32; ascending, disjoint, inside the guest
//!      …    ⌈pages/8⌉ zero bitmap, bit i set = page i of the batch is zero
//!      …    ⌈pages/8⌉ reference bitmap (with flag bit 0 only), bit i set =
//!           page i is a reference; never a zero page too
//!      …    data: the pages neither zero nor references, in order
//!      … 16×r references (with flag bit 0 only), one per reference bit in
//!           order: target page u64, inside the guest; the page's tag u64
//! ```
//!
//! A reference says "this page is identical to page `target`, which you
//! hold": the receiver copies its own page after checking that its copy
//! carries the tag (`digest::ref_tag`, keyed by the session), and fails the
//! session otherwise.
//!
//! A kept stream's data is the part of its connection's zstd stream that
//! holds the batch's pages, flushed ([`crate::codec::StreamEncoder`]): it
//! decodes only in order after the connection's earlier stream batches, and
//! is never swapped for raw pages, even when it is larger.

use super::PAGE_SIZE;
use super::{DecodeError, Limits, Reader};
use crate::codec::{self, Codec, CodecError, CodecId};
use crate::page::PageIndex;
use crate::page::PageRun;
use bytes::{Bytes, BytesMut};

/// Most pages one batch may carry (4 MiB).
pub const MAX_PAGES_PER_BATCH: u32 = 1024;
/// Most runs one batch may carry.
pub const MAX_RUNS_PER_BATCH: u16 = 1024;
const FIXED: usize = 20;
const RUN: usize = 12;
/// Flag bit: a reference bitmap and references follow.
const FLAG_REFS: u8 = 1;
/// Bytes of one reference: target page, hash.
const REF: usize = 16;

/// One page of a batch, as [`PageBatch::apply`] hands it over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Page<'a> {
    /// The page is all zeros.
    Zero,
    /// The page's bytes.
    Data(&'a [u8]),
    /// The page's bytes are already in guest memory (a placed batch).
    Placed,
    /// The page is identical to page `target`, which the receiver holds
    /// with content whose keyed tag is `hash` (checked before copying).
    Same {
        /// The page to copy.
        target: PageIndex,
        /// The page's tag (`digest::ref_tag`).
        hash: u64,
    },
}

/// What [`BatchEncoder::encode_refs`]'s reader says of a page it read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Read {
    /// All zero (the buffer is dropped unread).
    Zero,
    /// Content, copied into the buffer.
    Data,
    /// Identical to page `target` of the receiver, the page's keyed tag
    /// `hash` (the buffer is dropped).
    Same {
        /// The page the receiver copies.
        target: PageIndex,
        /// The page's tag (`digest::ref_tag`).
        hash: u64,
    },
}

/// A decoded, checked page batch. Its page data is still encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageBatch {
    /// The pre-copy round it belongs to.
    pub round: u32,
    /// How `data` is encoded.
    pub codec: CodecId,
    runs: Vec<PageRun>,
    /// The zero bitmap, then the reference bitmap if there is one.
    bits: Bytes,
    /// The references (empty without).
    refs: Bytes,
    data: Bytes,
    page_count: u32,
    nonzero: u32,
    ref_count: u32,
    placed: bool,
}

impl PageBatch {
    /// Bytes of a batch's metadata (fixed fields, runs, zero bitmap), read from
    /// its first [`PageBatch::FIXED_LEN`] bytes; the run and page counts are
    /// range-checked here. What follows the metadata is the page data.
    pub fn prefix_len(fixed: &[u8]) -> Result<usize, DecodeError> {
        let mut r = Reader::new(fixed);
        r.u32("batch.round")?;
        r.u8("batch.codec")?;
        let flags = r.u8("batch.flags")?;
        let (run_count, page_count) = Self::counts(&mut r)?;
        let bitmaps = if flags & FLAG_REFS != 0 { 2 } else { 1 };
        Ok(FIXED + run_count as usize * RUN + bitmaps * page_count.div_ceil(8) as usize)
    }

    /// Whether a batch's fixed fields say it carries references: such a
    /// batch is read whole, never placed.
    pub fn has_refs(fixed: &[u8]) -> bool {
        fixed.get(5).is_some_and(|f| f & FLAG_REFS != 0)
    }

    /// The codec byte of a batch's fixed fields, if it names a known codec.
    pub fn codec_of(fixed: &[u8]) -> Option<CodecId> {
        fixed.get(4).copied().and_then(CodecId::from_u8)
    }

    /// Bytes of a batch's fixed fields: enough for [`PageBatch::prefix_len`].
    pub const FIXED_LEN: usize = FIXED;

    fn counts(r: &mut Reader<'_>) -> Result<(u16, u32), DecodeError> {
        let run_count = r.u16("batch.run_count")?;
        if run_count == 0 || run_count > MAX_RUNS_PER_BATCH {
            return Err(DecodeError::OutOfRange {
                field: "batch.run_count",
                value: run_count.into(),
                limit: MAX_RUNS_PER_BATCH.into(),
            });
        }
        let page_count = r.u32("batch.page_count")?;
        if page_count == 0 || page_count > MAX_PAGES_PER_BATCH {
            return Err(DecodeError::OutOfRange {
                field: "batch.page_count",
                value: page_count.into(),
                limit: MAX_PAGES_PER_BATCH.into(),
            });
        }
        Ok((run_count, page_count))
    }

    /// Decodes and checks a batch payload against the guest's size. Allocates only
    /// the run list, after its count has been checked.
    pub fn decode(payload: Bytes, limits: Limits) -> Result<Self, DecodeError> {
        Self::decode_split(payload, 0, limits)
    }

    /// Decodes a batch whose last `elsewhere` bytes of data are not in
    /// `payload`: the metadata of a raw batch whose pages a receiver reads
    /// straight into guest memory. Every check of [`PageBatch::decode`] applies,
    /// with the data length counting those bytes. Such a batch is *placed*: its
    /// pages are already where they belong, see [`PageBatch::apply`].
    pub fn decode_split(
        payload: Bytes,
        elsewhere: usize,
        limits: Limits,
    ) -> Result<Self, DecodeError> {
        let mut r = Reader::new(&payload);
        let round = r.u32("batch.round")?;
        let codec = CodecId::from_u8(r.u8("batch.codec")?).ok_or(DecodeError::Invalid {
            field: "batch.codec",
        })?;
        let flags = r.u8("batch.flags")?;
        if flags & !FLAG_REFS != 0 {
            return Err(DecodeError::Reserved {
                field: "batch.flags",
            });
        }
        let (run_count, page_count) = Self::counts(&mut r)?;
        let data_len = r.u32("batch.data_len")?;
        let uncompressed_len = r.u32("batch.uncompressed_len")?;
        let run_bytes = r.bytes(run_count as usize * RUN, "batch.runs")?;
        let mut runs = Vec::with_capacity(run_count as usize);
        let mut next_free = 0u64;
        let mut total = 0u64;
        for run in run_bytes.chunks_exact(RUN) {
            let first = u64::from_le_bytes(run[..8].try_into().unwrap());
            let len = u32::from_le_bytes(run[8..].try_into().unwrap());
            if len == 0 {
                return Err(DecodeError::Invalid {
                    field: "batch.run.len",
                });
            }
            if first < next_free {
                return Err(DecodeError::Invalid {
                    field: "batch.run.first",
                });
            }
            let end = first.saturating_add(len.into());
            if end > limits.guest_pages {
                return Err(DecodeError::OutOfRange {
                    field: "batch.run.first",
                    value: end.saturating_sub(1),
                    limit: limits.guest_pages,
                });
            }
            next_free = end;
            total += u64::from(len);
            runs.push(PageRun::new(PageIndex(first), len));
        }
        if total != u64::from(page_count) {
            return Err(DecodeError::Mismatch {
                field: "batch.page_count",
                declared: page_count.into(),
                actual: total,
            });
        }
        let bits_len = page_count.div_ceil(8) as usize;
        let zero_bits = r.bytes(bits_len, "batch.zero_bitmap")?;
        check_tail(zero_bits, page_count, "batch.zero_bitmap")?;
        let zeros: u32 = zero_bits.iter().map(|b| b.count_ones()).sum();
        let bits_at = r.position() - bits_len;
        let ref_count = if flags & FLAG_REFS != 0 {
            let ref_bits = r.bytes(bits_len, "batch.ref_bitmap")?;
            check_tail(ref_bits, page_count, "batch.ref_bitmap")?;
            let zero_bits = &payload[bits_at..bits_at + bits_len];
            if ref_bits.iter().zip(zero_bits).any(|(r, z)| r & z != 0) {
                return Err(DecodeError::Invalid {
                    field: "batch.ref_bitmap",
                });
            }
            ref_bits.iter().map(|b| b.count_ones()).sum()
        } else {
            0
        };
        let nonzero = page_count - zeros;
        let sent = nonzero - ref_count;
        if u64::from(uncompressed_len) != u64::from(sent) * PAGE_SIZE as u64 {
            return Err(DecodeError::Mismatch {
                field: "batch.uncompressed_len",
                declared: uncompressed_len.into(),
                actual: u64::from(sent) * PAGE_SIZE as u64,
            });
        }
        // A placed batch's data is all that is elsewhere: no reference
        // may follow it.
        if elsewhere > 0 && ref_count > 0 {
            return Err(DecodeError::Invalid {
                field: "batch.data",
            });
        }
        let refs_len = ref_count as usize * REF;
        if r.remaining() < refs_len {
            return Err(DecodeError::Truncated {
                field: "batch.refs",
            });
        }
        let actual = (r.remaining() - refs_len) as u64 + elsewhere as u64;
        if u64::from(data_len) != actual {
            return Err(DecodeError::Mismatch {
                field: "batch.data_len",
                declared: data_len.into(),
                actual,
            });
        }
        if elsewhere > 0 && (codec != CodecId::None || r.remaining() != 0) {
            return Err(DecodeError::Invalid {
                field: "batch.data",
            });
        }
        if (codec == CodecId::None || sent == 0) && data_len != uncompressed_len {
            return Err(DecodeError::Mismatch {
                field: "batch.data_len",
                declared: data_len.into(),
                actual: uncompressed_len.into(),
            });
        }
        let data_at = r.position();
        let tail_at = data_at + data_len as usize - elsewhere;
        let refs = payload.slice(tail_at..);
        for entry in refs.chunks_exact(REF) {
            let target = u64::from_le_bytes(entry[..8].try_into().unwrap());
            if target >= limits.guest_pages {
                return Err(DecodeError::OutOfRange {
                    field: "batch.ref.page",
                    value: target,
                    limit: limits.guest_pages,
                });
            }
        }
        Ok(Self {
            round,
            codec,
            runs,
            bits: payload.slice(bits_at..data_at),
            refs,
            data: payload.slice(data_at..tail_at),
            page_count,
            nonzero,
            ref_count,
            placed: elsewhere > 0,
        })
    }

    /// Pages in the batch.
    pub fn page_count(&self) -> u32 {
        self.page_count
    }

    /// Non-zero pages in the batch.
    pub fn nonzero_pages(&self) -> u32 {
        self.nonzero
    }

    /// Pages in the batch sent as references.
    pub fn ref_pages(&self) -> u32 {
        self.ref_count
    }

    /// The batch's runs of pages.
    pub fn runs(&self) -> &[PageRun] {
        &self.runs
    }

    /// Whether the batch's pages were read straight into guest memory (see
    /// [`PageBatch::decode_split`]).
    pub fn is_placed(&self) -> bool {
        self.placed
    }

    fn is_zero(&self, i: usize) -> bool {
        self.bits[i / 8] & (1 << (i % 8)) != 0
    }

    fn is_ref(&self, i: usize) -> bool {
        let at = self.page_count.div_ceil(8) as usize + i / 8;
        self.bits.get(at).is_some_and(|b| b & (1 << (i % 8)) != 0)
    }

    /// Where the batch's data pages go, in wire order: runs of consecutive
    /// non-zero pages. A raw batch's data is these pages back to back, so a
    /// receiver can read it straight into them.
    pub fn data_regions(&self) -> Vec<PageRun> {
        let mut out: Vec<PageRun> = Vec::new();
        let mut i = 0usize;
        for run in &self.runs {
            for page in run.pages() {
                if !self.is_zero(i) && !self.is_ref(i) {
                    match out.last_mut() {
                        Some(r) if r.end() == page => r.count += 1,
                        _ => out.push(PageRun::new(page, 1)),
                    }
                }
                i += 1;
            }
        }
        out
    }

    /// Decodes the pages and hands each to `store` with its [`Page`]. `scratch`
    /// is reused between batches.
    pub fn apply(
        &self,
        scratch: &mut Vec<u8>,
        store: impl FnMut(PageIndex, Page<'_>),
    ) -> Result<(), CodecError> {
        self.apply_with(scratch, None, store)
    }

    /// As [`PageBatch::apply`], a kept stream's data decoded by `stream`
    /// (its connection's; without one such a batch is an error).
    pub fn apply_with(
        &self,
        scratch: &mut Vec<u8>,
        stream: Option<&mut codec::StreamDecoder>,
        mut store: impl FnMut(PageIndex, Page<'_>),
    ) -> Result<(), CodecError> {
        let pages = self.decoded(scratch, stream)?;
        let mut data = pages.chunks_exact(PAGE_SIZE);
        let mut refs = self.refs.chunks_exact(REF);
        let mut i = 0usize;
        for run in &self.runs {
            for page in run.pages() {
                let kind = if self.is_zero(i) {
                    Page::Zero
                } else if self.is_ref(i) {
                    let entry = refs.next().expect("reference count checked at decode");
                    Page::Same {
                        target: PageIndex(u64::from_le_bytes(entry[..8].try_into().unwrap())),
                        hash: u64::from_le_bytes(entry[8..].try_into().unwrap()),
                    }
                } else if self.placed {
                    Page::Placed
                } else {
                    Page::Data(data.next().expect("nonzero count checked at decode"))
                };
                store(page, kind);
                i += 1;
            }
        }
        Ok(())
    }

    /// The batch's data pages, decoded (into `scratch` unless raw). A
    /// receiver that does not apply a kept stream's batch (a repeat) still
    /// decodes it, to stay in step with its stream.
    pub fn decoded<'a>(
        &'a self,
        scratch: &'a mut Vec<u8>,
        stream: Option<&mut codec::StreamDecoder>,
    ) -> Result<&'a [u8], CodecError> {
        let len = (self.nonzero - self.ref_count) as usize * PAGE_SIZE;
        if len == 0 || self.placed {
            return Ok(&[]);
        }
        if self.codec == CodecId::None {
            return Ok(&self.data);
        }
        scratch.resize(len, 0);
        match (self.codec, stream) {
            (CodecId::ZstdStream, Some(s)) => s.decompress(&self.data, &mut scratch[..])?,
            (codec, _) => codec::decompress(codec, &self.data, &mut scratch[..])?,
        }
        Ok(&scratch[..])
    }

    /// Re-encodes the batch as it arrived (for tests of the message layer).
    pub(crate) fn encode_for_test(&self) -> Vec<u8> {
        let mut o = Vec::new();
        write_fixed(&mut o, self.round, self.codec, &self.runs, self.page_count);
        if self.bits.len() > self.page_count.div_ceil(8) as usize {
            o[5] = FLAG_REFS;
        }
        o.extend_from_slice(&(self.data.len() as u32).to_le_bytes());
        let sent = self.nonzero - self.ref_count;
        o.extend_from_slice(&(sent * PAGE_SIZE as u32).to_le_bytes());
        write_runs(&mut o, &self.runs);
        o.extend_from_slice(&self.bits);
        o.extend_from_slice(&self.data);
        o.extend_from_slice(&self.refs);
        o
    }
}

/// The bits past `pages` in a batch's last bitmap byte are zero.
fn check_tail(bits: &[u8], pages: u32, field: &'static str) -> Result<(), DecodeError> {
    let tail = pages % 8;
    if tail != 0 && bits[bits.len() - 1] >> tail != 0 {
        return Err(DecodeError::Invalid { field });
    }
    Ok(())
}

fn write_fixed(o: &mut Vec<u8>, round: u32, codec: CodecId, runs: &[PageRun], pages: u32) {
    o.extend_from_slice(&round.to_le_bytes());
    o.push(codec as u8);
    o.push(0);
    o.extend_from_slice(&(runs.len() as u16).to_le_bytes());
    o.extend_from_slice(&pages.to_le_bytes());
}

fn write_runs(o: &mut Vec<u8>, runs: &[PageRun]) {
    for r in runs {
        o.extend_from_slice(&r.first.0.to_le_bytes());
        o.extend_from_slice(&r.count.to_le_bytes());
    }
}

/// A batch ready for the wire, with its page counts by kind.
#[derive(Debug, Clone)]
pub struct EncodedBatch {
    /// The `PageBatch` payload.
    pub payload: Bytes,
    /// Pages in the batch.
    pub pages: u32,
    /// Pages sent as a zero bit.
    pub zero: u32,
    /// Pages sent uncompressed.
    pub raw: u32,
    /// Pages sent compressed.
    pub compressed: u32,
    /// Pages sent as references to pages the receiver holds.
    pub refs: u32,
    /// Bytes of page data in the payload (after the runs and the bitmaps,
    /// before any references).
    pub data_bytes: usize,
    /// The codec of its page data (none when sent as they are).
    pub codec: CodecId,
}

/// Builds page batches. Raw pages go straight from guest memory into the
/// payload (one copy); compressed batches stage their pages once. The payload
/// buffer is reclaimed for the next batch once the previous one has been sent
/// and dropped, so steady state allocates nothing.
#[derive(Debug, Default)]
pub struct BatchEncoder {
    pages: Vec<u8>,
    refs: Vec<u8>,
    out: BytesMut,
}

impl BatchEncoder {
    /// An encoder with empty buffers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Encodes the pages of `runs`. `read(page, buf)` returns whether page
    /// `page` is all zero, and if it is not, copies it into `buf` (one page;
    /// for a zero page `buf` is dropped unread). Non-zero pages are
    /// compressed together with `codec`; if that does not make them smaller the
    /// batch goes raw.
    ///
    /// # Panics
    /// If the runs break the wire limits (more than [`MAX_PAGES_PER_BATCH`] pages,
    /// [`MAX_RUNS_PER_BATCH`] runs, or an empty run): callers split their runs.
    pub fn encode(
        &mut self,
        round: u32,
        codec: Codec,
        runs: &[PageRun],
        mut read: impl FnMut(PageIndex, &mut [u8]) -> bool,
    ) -> Result<EncodedBatch, CodecError> {
        self.encode_refs(round, codec, runs, false, |page, buf| {
            if read(page, buf) {
                Read::Zero
            } else {
                Read::Data
            }
        })
    }

    /// As [`BatchEncoder::encode`], with `read` saying of each page whether
    /// it is zero, data or a reference ([`Read`]). With `refs`, a batch that
    /// holds a reference carries the reference bitmap and its references;
    /// without, `read` must never answer [`Read::Same`].
    ///
    /// # Panics
    /// As [`BatchEncoder::encode`]; and on a reference without `refs`.
    pub fn encode_refs(
        &mut self,
        round: u32,
        codec: Codec,
        runs: &[PageRun],
        refs: bool,
        read: impl FnMut(PageIndex, &mut [u8]) -> Read,
    ) -> Result<EncodedBatch, CodecError> {
        self.encode_stream(round, codec, runs, refs, None, read)
    }

    /// As [`BatchEncoder::encode_refs`], a kept stream's pages compressed
    /// into `stream` (the connection's; without one, a kept stream's batch
    /// with data is [`CodecError::NoStream`]). An error leaves the stream
    /// unusable.
    ///
    /// # Panics
    /// As [`BatchEncoder::encode_refs`].
    pub fn encode_stream(
        &mut self,
        round: u32,
        codec: Codec,
        runs: &[PageRun],
        refs: bool,
        stream: Option<&mut codec::StreamEncoder>,
        mut read: impl FnMut(PageIndex, &mut [u8]) -> Read,
    ) -> Result<EncodedBatch, CodecError> {
        let pages: u32 = runs.iter().map(|r| r.count).sum();
        assert!(
            pages > 0 && pages <= MAX_PAGES_PER_BATCH,
            "{pages} pages in a batch"
        );
        assert!(runs.len() <= MAX_RUNS_PER_BATCH as usize && runs.iter().all(|r| r.count > 0));
        let bits_len = pages.div_ceil(8) as usize;
        // With refs, room for the reference bitmap after the zero bitmap;
        // given back below if no page is a reference.
        let ref_bits_len = if refs { bits_len } else { 0 };
        let meta = FIXED + runs.len() * RUN + bits_len;
        let head = meta + ref_bits_len;
        let raw_max = pages as usize * PAGE_SIZE;
        let out = &mut self.out;
        out.clear();
        out.reserve(head + codec::max_compressed_len(codec, raw_max).max(raw_max));
        let mut fixed = Vec::with_capacity(FIXED);
        write_fixed(&mut fixed, round, codec.id(), runs, pages);
        out.extend_from_slice(&fixed);
        out.extend_from_slice(&[0; 8]); // data_len and uncompressed_len, below
        let mut run_bytes = Vec::with_capacity(runs.len() * RUN);
        write_runs(&mut run_bytes, runs);
        out.extend_from_slice(&run_bytes);
        let bits_at = out.len();
        out.resize(head, 0);

        // Raw: pages land in the payload directly. Compressed: staged once.
        let direct = codec == Codec::None;
        self.pages.clear();
        self.refs.clear();
        let mut i = 0usize;
        let (mut zero, mut same) = (0u32, 0u32);
        for run in runs {
            for page in run.pages() {
                let kind = if direct {
                    let at = out.len();
                    out.resize(at + PAGE_SIZE, 0);
                    let kind = read(page, &mut out[at..]);
                    if kind != Read::Data {
                        out.truncate(at);
                    }
                    kind
                } else {
                    let at = self.pages.len();
                    self.pages.resize(at + PAGE_SIZE, 0);
                    let kind = read(page, &mut self.pages[at..]);
                    if kind != Read::Data {
                        self.pages.truncate(at);
                    }
                    kind
                };
                match kind {
                    Read::Data => {}
                    Read::Zero => {
                        out[bits_at + i / 8] |= 1 << (i % 8);
                        zero += 1;
                    }
                    Read::Same { target, hash } => {
                        assert!(refs, "a reference in a batch without them");
                        out[meta + i / 8] |= 1 << (i % 8);
                        self.refs.extend_from_slice(&target.0.to_le_bytes());
                        self.refs.extend_from_slice(&hash.to_le_bytes());
                        same += 1;
                    }
                }
                i += 1;
            }
        }
        let sent = pages - zero - same;
        let raw_len = sent as usize * PAGE_SIZE;
        let mut used = if sent == 0 { Codec::None } else { codec };
        let mut data_len = raw_len;
        if !direct && sent > 0 {
            data_len = match stream {
                Some(s) if codec.is_stream() => s.compress(&self.pages, out)?,
                // Only a connection's own stream makes a batch its
                // receiver can follow.
                None if codec.is_stream() => return Err(CodecError::NoStream),
                _ => codec::compress(codec, &self.pages, out)?,
            };
            // The stream's receiver must decode every byte it was given.
            if data_len >= raw_len && !codec.is_stream() {
                // Incompressible: send the pages as they are.
                out.truncate(head);
                out.extend_from_slice(&self.pages);
                used = Codec::None;
                data_len = raw_len;
            }
        }
        out[4] = used.id() as u8;
        out[12..16].copy_from_slice(&(data_len as u32).to_le_bytes());
        out[16..20].copy_from_slice(&(raw_len as u32).to_le_bytes());
        if same > 0 {
            out[5] = FLAG_REFS;
            out.extend_from_slice(&self.refs);
        } else if ref_bits_len > 0 {
            // No reference: the metadata moves up over the unused bitmap,
            // and the payload starts there.
            out.copy_within(0..meta, ref_bits_len);
            let _ = out.split_to(ref_bits_len);
        }
        let (raw, compressed) = if used == Codec::None {
            (sent, 0)
        } else {
            (0, sent)
        };
        Ok(EncodedBatch {
            payload: out.split().freeze(),
            pages,
            zero,
            raw,
            compressed,
            refs: same,
            data_bytes: data_len,
            codec: used.id(),
        })
    }

    /// Up to `max` bytes of the last batch's non-zero pages, uncompressed, into
    /// `out`: a sample for measuring other codecs on the pages being sent now.
    /// The pages are spread evenly over the batch, so the sample holds its mix
    /// of content rather than whatever kind its first pages happen to be.
    pub fn sample_into(&self, batch: &EncodedBatch, max: usize, out: &mut Vec<u8>) {
        out.clear();
        let pages: &[u8] = if !self.pages.is_empty() {
            // Compressed (or tried and sent raw): the pages were staged.
            &self.pages
        } else if batch.compressed == 0 {
            // Raw: the pages are the payload's data, before any references.
            let end = batch.payload.len() - batch.refs as usize * REF;
            &batch.payload[end - batch.data_bytes..end]
        } else {
            return;
        };
        let total = pages.len() / PAGE_SIZE;
        let n = (max / PAGE_SIZE).min(total);
        for k in 0..n {
            let p = k * total / n;
            out.extend_from_slice(&pages[p * PAGE_SIZE..(p + 1) * PAGE_SIZE]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        guest_pages: 10_000,
    };

    /// Page `p`'s content in these tests: zero when p % 3 == 0, else a pattern.
    fn content(PageIndex(p): PageIndex, buf: &mut [u8]) -> bool {
        if p.is_multiple_of(3) {
            buf.fill(0);
            return true;
        }
        for (i, b) in buf.iter_mut().enumerate() {
            *b = ((p as usize * 31 + i / 16) % 251) as u8;
        }
        false
    }

    fn runs(r: &[(u64, u32)]) -> Vec<PageRun> {
        r.iter()
            .map(|&(f, n)| PageRun::new(PageIndex(f), n))
            .collect()
    }

    fn encoded(codec: Codec, runs: &[PageRun]) -> EncodedBatch {
        BatchEncoder::new().encode(5, codec, runs, content).unwrap()
    }

    #[test]
    fn round_trip_every_codec() {
        let runs = [
            PageRun::new(PageIndex(0), 10),
            PageRun::new(PageIndex(100), 1),
            PageRun::new(PageIndex(200), 50),
        ];
        for codec in [Codec::None, Codec::Lz4, Codec::Zstd { level: 3 }] {
            let e = encoded(codec, &runs);
            assert_eq!(e.pages, 61);
            assert_eq!(e.zero + e.raw + e.compressed, 61);
            let b = PageBatch::decode(e.payload.clone(), LIMITS).unwrap();
            assert_eq!(b.round, 5);
            assert_eq!(b.runs(), &runs);
            let mut seen = vec![];
            b.apply(&mut Vec::new(), |p, data| {
                let mut want = vec![0u8; PAGE_SIZE];
                let zero = content(p, &mut want);
                assert_eq!(data == Page::Zero, zero, "page {p}");
                if let Page::Data(d) = data {
                    assert_eq!(d, &want[..]);
                }
                seen.push(p);
            })
            .unwrap();
            assert_eq!(seen.len(), 61);
        }
    }

    #[test]
    fn raw_data_can_be_placed_region_by_region() {
        // Pages 0, 3, 6 and 9 are zero: the data pages form these regions.
        let runs = [
            PageRun::new(PageIndex(0), 10),
            PageRun::new(PageIndex(10), 2),
            PageRun::new(PageIndex(200), 3),
        ];
        let e = encoded(Codec::None, &runs);
        let fixed = &e.payload[..PageBatch::FIXED_LEN];
        let prefix = PageBatch::prefix_len(fixed).unwrap();
        assert_eq!(PageBatch::codec_of(fixed), Some(CodecId::None));
        let data = e.payload.len() - prefix;
        let b = PageBatch::decode_split(e.payload.slice(..prefix), data, LIMITS).unwrap();
        assert!(b.is_placed());
        let regions = b.data_regions();
        let want: Vec<PageRun> = [(1, 2), (4, 2), (7, 2), (10, 2), (200, 1), (202, 1)]
            .into_iter()
            .map(|(f, n)| PageRun::new(PageIndex(f), n))
            .collect();
        assert_eq!(regions, want);
        // The wire data is exactly those pages, in that order.
        let mut want = Vec::new();
        for r in &regions {
            for p in r.pages() {
                let mut page = vec![0u8; PAGE_SIZE];
                content(p, &mut page);
                want.extend_from_slice(&page);
            }
        }
        assert_eq!(&e.payload[prefix..], &want[..]);
        let mut kinds = vec![];
        b.apply(&mut Vec::new(), |p, k| {
            let want = if p.0 % 3 == 0 {
                Page::Zero
            } else {
                Page::Placed
            };
            assert_eq!(k, want, "page {p}");
            kinds.push(p);
        })
        .unwrap();
        assert_eq!(kinds.len(), 15);
        // A wrong split is a length mismatch; a compressed batch cannot be split.
        assert!(PageBatch::decode_split(e.payload.slice(..prefix), data - 1, LIMITS).is_err());
        let z = encoded(Codec::Lz4, &runs);
        let zp = PageBatch::prefix_len(&z.payload).unwrap();
        let zl = z.payload.len() - zp;
        assert!(PageBatch::decode_split(z.payload.slice(..zp), zl, LIMITS).is_err());
    }

    #[test]
    fn incompressible_pages_go_raw_and_all_zero_batches_carry_no_data() {
        let mut x = 1u64;
        let e = BatchEncoder::new()
            .encode(0, Codec::Lz4, &runs(&[(0, 4)]), |_, buf| {
                for b in buf.iter_mut() {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    *b = (x >> 56) as u8;
                }
                false
            })
            .unwrap();
        assert_eq!((e.raw, e.compressed), (4, 0));
        assert_eq!(
            PageBatch::decode(e.payload, LIMITS).unwrap().codec,
            CodecId::None
        );
        let e = encoded(Codec::Zstd { level: 1 }, &runs(&[(0, 1), (3, 1)]));
        assert_eq!(e.zero, 2);
        assert_eq!(e.payload.len(), FIXED + 2 * RUN + 1);
    }

    fn mutated(f: impl FnOnce(&mut Vec<u8>)) -> Result<PageBatch, DecodeError> {
        let mut p = encoded(Codec::Lz4, &runs(&[(1, 4), (10, 2)]))
            .payload
            .to_vec();
        f(&mut p);
        PageBatch::decode(Bytes::from(p), LIMITS)
    }

    #[test]
    fn rejects_bad_batches_naming_the_field() {
        let field = |r: Result<PageBatch, DecodeError>| match r.unwrap_err() {
            DecodeError::OutOfRange { field, .. }
            | DecodeError::Mismatch { field, .. }
            | DecodeError::Invalid { field }
            | DecodeError::Truncated { field }
            | DecodeError::Reserved { field } => field,
            e => panic!("unexpected {e}"),
        };
        assert_eq!(field(mutated(|p| p[4] = 9)), "batch.codec");
        assert_eq!(field(mutated(|p| p[5] = 2)), "batch.flags");
        assert_eq!(
            field(mutated(|p| p[6..8].copy_from_slice(&0u16.to_le_bytes()))),
            "batch.run_count"
        );
        assert_eq!(
            field(mutated(|p| p[6..8].copy_from_slice(&5000u16.to_le_bytes()))),
            "batch.run_count"
        );
        assert_eq!(
            field(mutated(|p| p[8..12].copy_from_slice(&5000u32.to_le_bytes()))),
            "batch.page_count"
        );
        assert_eq!(
            field(mutated(|p| p[8..12].copy_from_slice(&7u32.to_le_bytes()))),
            "batch.page_count"
        );
        // First run starts past the guest's end.
        assert_eq!(
            field(mutated(
                |p| p[20..28].copy_from_slice(&9_999u64.to_le_bytes())
            )),
            "batch.run.first"
        );
        assert_eq!(
            field(mutated(
                |p| p[20..28].copy_from_slice(&u64::MAX.to_le_bytes())
            )),
            "batch.run.first"
        );
        // Second run overlaps the first.
        assert_eq!(
            field(mutated(|p| p[32..40].copy_from_slice(&2u64.to_le_bytes()))),
            "batch.run.first"
        );
        assert_eq!(
            field(mutated(|p| p[28..32].copy_from_slice(&0u32.to_le_bytes()))),
            "batch.run.len"
        );
        assert_eq!(field(mutated(|p| p[16] ^= 1)), "batch.uncompressed_len");
        assert_eq!(field(mutated(|p| p[12] ^= 1)), "batch.data_len");
        assert_eq!(field(mutated(|p| p[44] |= 0x80)), "batch.zero_bitmap");
        assert_eq!(field(mutated(|p| p.truncate(30))), "batch.runs");
    }

    #[test]
    fn corrupt_data_fails_at_apply_with_a_size_error() {
        // Claim one more non-zero page than the data holds: flip a zero bit off.
        let e = encoded(Codec::Lz4, &runs(&[(0, 6)]));
        let mut p = e.payload.to_vec();
        let bits_at = FIXED + RUN;
        assert_eq!(p[bits_at] & 1, 1, "page 0 is zero");
        p[bits_at] &= !1;
        let len = u32::from_le_bytes(p[16..20].try_into().unwrap()) + PAGE_SIZE as u32;
        p[16..20].copy_from_slice(&len.to_le_bytes());
        let b = PageBatch::decode(Bytes::from(p), LIMITS).unwrap();
        assert!(b.apply(&mut Vec::new(), |_, _| {}).is_err());
    }

    #[test]
    fn samples_spread_over_the_batch() {
        let mut enc = BatchEncoder::new();
        // Pages 1..=40 minus every third (zero): 27 non-zero pages, raw.
        let e = enc
            .encode(0, Codec::None, &runs(&[(1, 40)]), content)
            .unwrap();
        let mut out = Vec::new();
        enc.sample_into(&e, 4 * PAGE_SIZE, &mut out);
        assert_eq!(out.len(), 4 * PAGE_SIZE);
        let data = &e.payload[e.payload.len() - e.data_bytes..];
        // Pages 0, 6, 13 and 20 of the 27, not the first four.
        for (k, p) in [0usize, 6, 13, 20].into_iter().enumerate() {
            assert_eq!(
                &out[k * PAGE_SIZE..(k + 1) * PAGE_SIZE],
                &data[p * PAGE_SIZE..(p + 1) * PAGE_SIZE]
            );
        }
        enc.sample_into(&e, 1 << 20, &mut out);
        assert_eq!(out.len(), 27 * PAGE_SIZE, "no more than the batch has");
    }

    #[test]
    fn every_truncation_is_an_error() {
        let e = encoded(Codec::Zstd { level: 1 }, &runs(&[(1, 4), (10, 2)]));
        for cut in 0..e.payload.len() {
            assert!(
                PageBatch::decode(e.payload.slice(..cut), LIMITS).is_err(),
                "cut {cut}"
            );
        }
    }
}

#[cfg(test)]
mod refs_tests;
