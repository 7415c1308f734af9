//! The page batch: runs of pages, a zero bitmap, and the non-zero pages
//! compressed together by the batch's codec.
//!
//! ```text
//! offset size field
//!      0    4 round
//!      4    1 codec id (0 none, 1 lz4, 2 zstd, 4 the channel's kept zstd stream)
//!      5    1 flags: bit 0 = references follow, bit 1 = patches follow
//!           (see below); others 0
//!      6    2 run count (1..=1024)
//!      8    4 page count (1..=1024), the sum of the run lengths
//!     12    4 data length: bytes of the data alone
//!     16    4 uncompressed length: 4096 × pages sent as data, plus the
//!           patches' lengths
//!     20 12×n runs: first page u64, length u32; ascending, disjoint, inside the guest
//!      …    ⌈pages/8⌉ zero bitmap, bit i set = page i of the batch is zero
//!      …    ⌈pages/8⌉ reference bitmap (with flag bit 0 only), bit i set =
//!           page i is a reference; never a zero page too
//!      …    ⌈pages/8⌉ patch bitmap (with flag bit 1 only), bit i set =
//!           page i is a patch; never a zero page or a reference too
//!      …    data: the pages neither zero nor references, in order, a
//!           patch as its ops (`wire::patch`) in its page's place
//!      … 16×r references (with flag bit 0 only), one per reference bit in
//!           order: target page u64, inside the guest; the page's tag u64
//!      … 18×q patches (with flag bit 1 only), one per patch bit in order:
//!           the base's first byte u64 (base and its 4096 bytes inside the
//!           guest), the base's tag u64, the patch's length u16 (4..=4096)
//! ```
//!
//! A reference says "this page is identical to page `target`, which you
//! hold": the receiver copies its own page after checking that its copy
//! carries the tag (`digest::ref_tag`, keyed by the session), and fails the
//! session otherwise. A patch says "this page is the region of 4096 bytes
//! from byte `base` of your memory, changed as these ops say": the receiver
//! checks its region's tag the same way before it builds the page.
//!
//! A kept stream's data is the part of its connection's zstd stream that
//! holds the batch's pages, flushed ([`crate::codec::StreamEncoder`]): it
//! decodes only in order after the connection's earlier stream batches, and
//! is never swapped for raw pages, even when it is larger.

use super::PAGE_SIZE;
use super::{patch, DecodeError, Limits, Reader};
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
/// Flag bit: a patch bitmap and patches follow.
const FLAG_PATCHES: u8 = 2;
/// Bytes of one patch's entry: base, tag, length.
const PATCH: usize = 18;

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
    /// The page is the 4096 bytes of the receiver's memory from byte
    /// `base`, changed as `ops` say ([`super::patch::apply`]), if the
    /// region's keyed tag is `tag` (checked before building the page).
    Patch {
        /// The region's first byte in guest memory.
        base: u64,
        /// The region's tag (`digest::ref_tag`).
        tag: u64,
        /// The patch.
        ops: &'a [u8],
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
    /// A patch of the receiver's region from byte `base`, whose tag is
    /// `tag`: the buffer's first `len` bytes are its ops.
    Patch {
        /// The region's first byte in guest memory.
        base: u64,
        /// The region's tag (`digest::ref_tag`).
        tag: u64,
        /// The patch's length (at most a page).
        len: usize,
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
    flags: u8,
    /// The zero bitmap, then the reference and patch bitmaps if there are.
    bits: Bytes,
    /// The references, then the patches' entries (empty without).
    tail: Bytes,
    data: Bytes,
    page_count: u32,
    nonzero: u32,
    ref_count: u32,
    patch_count: u32,
    /// Bytes of the data decoded.
    uncompressed: u32,
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
        let bitmaps =
            1 + usize::from(flags & FLAG_REFS != 0) + usize::from(flags & FLAG_PATCHES != 0);
        Ok(FIXED + run_count as usize * RUN + bitmaps * page_count.div_ceil(8) as usize)
    }

    /// Whether a batch's fixed fields say it carries references or
    /// patches: such a batch is read whole, never placed.
    pub fn has_refs(fixed: &[u8]) -> bool {
        fixed
            .get(5)
            .is_some_and(|f| f & (FLAG_REFS | FLAG_PATCHES) != 0)
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
        if flags & !(FLAG_REFS | FLAG_PATCHES) != 0 {
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
        let bits_at = r.position();
        let zero_bits = r.bytes(bits_len, "batch.zero_bitmap")?;
        check_tail(zero_bits, page_count, "batch.zero_bitmap")?;
        let zeros: u32 = zero_bits.iter().map(|b| b.count_ones()).sum();
        let ref_count = Self::extra_bitmap(
            &mut r,
            &payload,
            bits_at,
            flags & FLAG_REFS,
            page_count,
            "batch.ref_bitmap",
        )?;
        let patch_count = Self::extra_bitmap(
            &mut r,
            &payload,
            bits_at,
            flags & FLAG_PATCHES,
            page_count,
            "batch.patch_bitmap",
        )?;
        let nonzero = page_count - zeros;
        // A placed batch's data is all that is elsewhere: no reference or
        // patch may follow it.
        if elsewhere > 0 && ref_count + patch_count > 0 {
            return Err(DecodeError::Invalid {
                field: "batch.data",
            });
        }
        let tail_len = ref_count as usize * REF + patch_count as usize * PATCH;
        if r.remaining() < tail_len {
            return Err(DecodeError::Truncated {
                field: if r.remaining() < ref_count as usize * REF {
                    "batch.refs"
                } else {
                    "batch.patches"
                },
            });
        }
        let data_at = r.position();
        let tail_at = payload.len() - tail_len;
        let actual = (tail_at - data_at) as u64 + elsewhere as u64;
        if u64::from(data_len) != actual {
            return Err(DecodeError::Mismatch {
                field: "batch.data_len",
                declared: data_len.into(),
                actual,
            });
        }
        let sent = nonzero - ref_count - patch_count;
        let (refs, patches) = payload[tail_at..].split_at(ref_count as usize * REF);
        let patched = Self::check_tail_entries(refs, patches, limits)?;
        let expected = u64::from(sent) * PAGE_SIZE as u64 + patched;
        if u64::from(uncompressed_len) != expected {
            return Err(DecodeError::Mismatch {
                field: "batch.uncompressed_len",
                declared: uncompressed_len.into(),
                actual: expected,
            });
        }
        if elsewhere > 0 && (codec != CodecId::None || tail_at != data_at) {
            return Err(DecodeError::Invalid {
                field: "batch.data",
            });
        }
        if (codec == CodecId::None || sent + patch_count == 0) && data_len != uncompressed_len {
            return Err(DecodeError::Mismatch {
                field: "batch.data_len",
                declared: data_len.into(),
                actual: uncompressed_len.into(),
            });
        }
        Ok(Self {
            round,
            codec,
            runs,
            flags,
            bits: payload.slice(bits_at..data_at),
            tail: payload.slice(tail_at..),
            data: payload.slice(data_at..tail_at),
            page_count,
            nonzero,
            ref_count,
            patch_count,
            uncompressed: uncompressed_len,
            placed: elsewhere > 0,
        })
    }

    /// Reads the reference or patch bitmap if `flag` says it is there:
    /// its bits past the pages clear, none set where an earlier bitmap
    /// (from `bits_at` on) has one. Its count of set bits.
    fn extra_bitmap(
        r: &mut Reader<'_>,
        payload: &[u8],
        bits_at: usize,
        flag: u8,
        pages: u32,
        field: &'static str,
    ) -> Result<u32, DecodeError> {
        if flag == 0 {
            return Ok(0);
        }
        let bits_len = pages.div_ceil(8) as usize;
        let earlier = &payload[bits_at..r.position()];
        let bits = r.bytes(bits_len, field)?;
        check_tail(bits, pages, field)?;
        let overlaps = earlier
            .chunks_exact(bits_len)
            .any(|prev| bits.iter().zip(prev).any(|(b, p)| b & p != 0));
        if overlaps {
            return Err(DecodeError::Invalid { field });
        }
        Ok(bits.iter().map(|b| b.count_ones()).sum())
    }

    /// Checks every reference's target and every patch's base and length
    /// against the guest; the patches' total length.
    fn check_tail_entries(refs: &[u8], patches: &[u8], limits: Limits) -> Result<u64, DecodeError> {
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
        let guest_bytes = limits.guest_pages.saturating_mul(PAGE_SIZE as u64);
        let mut total = 0u64;
        for entry in patches.chunks_exact(PATCH) {
            let base = u64::from_le_bytes(entry[..8].try_into().unwrap());
            if base
                .checked_add(PAGE_SIZE as u64)
                .is_none_or(|end| end > guest_bytes)
            {
                return Err(DecodeError::OutOfRange {
                    field: "batch.patch.base",
                    value: base,
                    limit: guest_bytes.saturating_sub(PAGE_SIZE as u64),
                });
            }
            let len = u16::from_le_bytes([entry[16], entry[17]]);
            if !(patch::MIN_PATCH..=patch::MAX_PATCH).contains(&usize::from(len)) {
                return Err(DecodeError::OutOfRange {
                    field: "batch.patch.len",
                    value: len.into(),
                    limit: patch::MAX_PATCH as u64,
                });
            }
            total += u64::from(len);
        }
        Ok(total)
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
        self.flags & FLAG_REFS != 0 && self.bit(1, i)
    }

    fn is_patch(&self, i: usize) -> bool {
        let bitmap = 1 + usize::from(self.flags & FLAG_REFS != 0);
        self.flags & FLAG_PATCHES != 0 && self.bit(bitmap, i)
    }

    /// Bit `i` of the batch's `bitmap`th bitmap (0 is the zero bitmap).
    fn bit(&self, bitmap: usize, i: usize) -> bool {
        let at = bitmap * self.page_count.div_ceil(8) as usize + i / 8;
        self.bits.get(at).is_some_and(|b| b & (1 << (i % 8)) != 0)
    }

    /// Pages in the batch sent as patches.
    pub fn patch_pages(&self) -> u32 {
        self.patch_count
    }

    /// Where the batch's data pages go, in wire order: runs of consecutive
    /// non-zero pages. A raw batch's data is these pages back to back, so a
    /// receiver can read it straight into them.
    pub fn data_regions(&self) -> Vec<PageRun> {
        let mut out: Vec<PageRun> = Vec::new();
        let mut i = 0usize;
        for run in &self.runs {
            for page in run.pages() {
                if !self.is_zero(i) && !self.is_ref(i) && !self.is_patch(i) {
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
        let mut data = pages;
        let mut take = |len: usize| {
            let (head, rest) = data.split_at(len);
            data = rest;
            head
        };
        let (refs, patches) = self.tail.split_at(self.ref_count as usize * REF);
        let mut refs = refs.chunks_exact(REF);
        let mut patches = patches.chunks_exact(PATCH);
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
                } else if self.is_patch(i) {
                    let entry = patches.next().expect("patch count checked at decode");
                    Page::Patch {
                        base: u64::from_le_bytes(entry[..8].try_into().unwrap()),
                        tag: u64::from_le_bytes(entry[8..16].try_into().unwrap()),
                        // Lengths checked at decode, their sum against the
                        // decoded data.
                        ops: take(u16::from_le_bytes([entry[16], entry[17]]).into()),
                    }
                } else if self.placed {
                    Page::Placed
                } else {
                    Page::Data(take(PAGE_SIZE))
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
        let len = self.uncompressed as usize;
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
        o[5] = self.flags;
        o.extend_from_slice(&(self.data.len() as u32).to_le_bytes());
        o.extend_from_slice(&self.uncompressed.to_le_bytes());
        write_runs(&mut o, &self.runs);
        o.extend_from_slice(&self.bits);
        o.extend_from_slice(&self.data);
        o.extend_from_slice(&self.tail);
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

mod encode;
pub use encode::{BatchEncoder, EncodedBatch};

#[cfg(test)]
mod refs_tests;
#[cfg(test)]
mod tests;

#[cfg(test)]
mod patch_tests;
