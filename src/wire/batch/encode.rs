//! Building page batches: pages read, classified and compressed into a payload.

use super::*;

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
    /// Pages sent as patches of regions the receiver holds (counted in
    /// `raw` or `compressed` too: their ops travel with the data).
    pub patches: u32,
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
    patches: Vec<u8>,
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
    /// it is zero, data, a reference or a patch ([`Read`]). With `refs`, a
    /// batch that holds a reference or a patch carries its bitmap and its
    /// entries; without, `read` must answer [`Read::Zero`] or [`Read::Data`].
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
        // With refs, room for the reference and patch bitmaps after the
        // zero bitmap; given back below if unused.
        let ref_bits_len = if refs { bits_len } else { 0 };
        let meta = FIXED + runs.len() * RUN + bits_len;
        let head = meta + 2 * ref_bits_len;
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
        self.patches.clear();
        let mut i = 0usize;
        let (mut zero, mut same, mut patched, mut patch_bytes) = (0u32, 0u32, 0u32, 0usize);
        for run in runs {
            for page in run.pages() {
                let kind = if direct {
                    let at = out.len();
                    out.resize(at + PAGE_SIZE, 0);
                    let kind = read(page, &mut out[at..]);
                    out.truncate(at + kept_len(kind));
                    kind
                } else {
                    let at = self.pages.len();
                    self.pages.resize(at + PAGE_SIZE, 0);
                    let kind = read(page, &mut self.pages[at..]);
                    self.pages.truncate(at + kept_len(kind));
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
                    Read::Patch { base, tag, len } => {
                        assert!(refs, "a patch in a batch without them");
                        out[meta + ref_bits_len + i / 8] |= 1 << (i % 8);
                        self.patches.extend_from_slice(&base.to_le_bytes());
                        self.patches.extend_from_slice(&tag.to_le_bytes());
                        self.patches.extend_from_slice(&(len as u16).to_le_bytes());
                        patched += 1;
                        patch_bytes += len;
                    }
                }
                i += 1;
            }
        }
        let sent = pages - zero - same;
        let raw_len = (sent - patched) as usize * PAGE_SIZE + patch_bytes;
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
        out.extend_from_slice(&self.refs);
        out.extend_from_slice(&self.patches);
        if ref_bits_len > 0 {
            // An unused bitmap is given back: what comes before it moves
            // up over it, and the payload starts further on.
            let (with_refs, with_patches) = (same > 0, patched > 0);
            out[5] =
                if with_refs { FLAG_REFS } else { 0 } | if with_patches { FLAG_PATCHES } else { 0 };
            let keep = meta
                + if with_refs && !with_patches {
                    ref_bits_len
                } else {
                    0
                };
            let unused = ref_bits_len * (usize::from(!with_refs) + usize::from(!with_patches));
            out.copy_within(0..keep, unused);
            let _ = out.split_to(unused);
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
            patches: patched,
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
            // Raw: the pages are the payload's data, before any references
            // and patches.
            let end =
                batch.payload.len() - batch.refs as usize * REF - batch.patches as usize * PATCH;
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

/// Bytes of a page's buffer a batch keeps, by what its reader said.
fn kept_len(kind: Read) -> usize {
    match kind {
        Read::Data => PAGE_SIZE,
        Read::Patch { len, .. } => len.min(PAGE_SIZE),
        Read::Zero | Read::Same { .. } => 0,
    }
}
