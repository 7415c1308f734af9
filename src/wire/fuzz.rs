//! The properties the fuzz targets in `fuzz/` check, callable from ordinary
//! tests too (which replay `fuzz/regressions/`). Each panics only when the
//! property fails.

use super::{FrameDecoder, Header, Limits, Message, Page, PageBatch, HEADER_LEN};
use crate::memory::PAGE_SIZE;
use bytes::{Bytes, BytesMut};

/// The guest size fuzzed batches are checked against: 1024 pages.
pub const FUZZ_GUEST_PAGES: u64 = 1024;

/// Decodes `data` as one frame and its message. Must not panic. Random bytes
/// rarely carry a valid CRC, so the payload is also decoded past the CRC check
/// as the header's command says: the fuzzer reaches every message decoder.
pub fn frame(data: &[u8]) {
    let limits = Limits {
        guest_pages: FUZZ_GUEST_PAGES,
    };
    let _ = super::decode_all(data, limits);
    if let Some(raw) = data.get(..HEADER_LEN) {
        if let Ok((header, _crc)) = Header::parse(raw.try_into().unwrap()) {
            let payload = &data[HEADER_LEN..];
            let header = Header {
                payload_len: payload.len() as u32,
                ..header
            };
            let _ = Message::decode(&header, Bytes::copy_from_slice(payload), limits);
        }
    }
}

/// Decodes `data` as a page batch payload and applies it. Every page handed to
/// the store is inside the guest, and data pages are one page long.
pub fn batch(data: &[u8]) {
    let limits = Limits {
        guest_pages: FUZZ_GUEST_PAGES,
    };
    if let Ok(b) = PageBatch::decode(Bytes::copy_from_slice(data), limits) {
        let mut scratch = Vec::new();
        let mut count = 0u32;
        let _ = b.apply(&mut scratch, |page, kind| {
            assert!(page < FUZZ_GUEST_PAGES, "page {page} outside the guest");
            if let Page::Data(bytes) = kind {
                assert_eq!(bytes.len(), PAGE_SIZE);
            }
            assert_ne!(kind, Page::Placed, "a whole payload is never placed");
            count += 1;
        });
        assert!(count == 0 || count == b.page_count());
    }
    // The receiver's direct path: metadata decoded apart from the data that it
    // reads straight into the pages the batch names.
    if let Ok(prefix) = PageBatch::prefix_len(data) {
        if prefix <= data.len() {
            let meta = Bytes::copy_from_slice(&data[..prefix]);
            if let Ok(b) = PageBatch::decode_split(meta, data.len() - prefix, limits) {
                assert!(b.is_placed());
                let regions = b.data_regions();
                let pages: u64 = regions.iter().map(|&(_, n)| u64::from(n)).sum();
                assert_eq!(pages, u64::from(b.nonzero_pages()));
                assert_eq!(pages as usize * PAGE_SIZE, data.len() - prefix);
                for (first, n) in regions {
                    assert!(first + u64::from(n) <= FUZZ_GUEST_PAGES);
                }
            }
        }
    }
}

/// Feeds `data` to the resumable decoder whole and in pieces whose sizes come
/// from the data itself; both must yield the same frames and the same error.
pub fn stream(data: &[u8]) {
    let whole = decode_stream(data, &[usize::MAX]);
    let sizes: Vec<usize> = data
        .iter()
        .take(16)
        .map(|&b| usize::from(b % 61) + 1)
        .collect();
    if !sizes.is_empty() {
        assert_eq!(whole, decode_stream(data, &sizes), "split decoding differs");
    }
}

fn decode_stream(
    data: &[u8],
    sizes: &[usize],
) -> (Vec<(super::Header, Bytes)>, Option<super::DecodeError>) {
    let mut dec = FrameDecoder::new();
    let mut buf = BytesMut::new();
    let mut out = vec![];
    let mut pos = 0;
    let mut i = 0;
    while pos < data.len() {
        let n = sizes[i % sizes.len()].min(data.len() - pos);
        buf.extend_from_slice(&data[pos..pos + n]);
        pos += n;
        i += 1;
        loop {
            match dec.decode(&mut buf) {
                Ok(Some(f)) => {
                    let _ = Message::decode(&f.header, f.payload.clone(), Limits::BEFORE_SETUP);
                    out.push((f.header, f.payload));
                }
                Ok(None) => break,
                Err(e) => return (out, Some(e)),
            }
        }
    }
    (out, None)
}
