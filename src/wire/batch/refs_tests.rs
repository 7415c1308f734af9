//! Batches with references: they round-trip with every codec, a batch
//! without any is the batch the plain encoder makes, and malformed
//! reference sections are refused naming the field.

use super::*;

const LIMITS: Limits = Limits {
    guest_pages: 10_000,
};

/// Page `p`: zero when p % 5 == 0; a reference to page p + 5000 when
/// p % 5 == 1; else a pattern.
fn read(PageIndex(p): PageIndex, buf: &mut [u8]) -> Read {
    match p % 5 {
        0 => Read::Zero,
        1 => Read::Same {
            target: PageIndex(p + 5000),
            hash: p * 7,
        },
        _ => {
            for (i, b) in buf.iter_mut().enumerate() {
                *b = ((p as usize * 31 + i / 16) % 251) as u8;
            }
            Read::Data
        }
    }
}

fn runs() -> Vec<PageRun> {
    vec![
        PageRun::new(PageIndex(0), 10),
        PageRun::new(PageIndex(100), 23),
    ]
}

fn encoded(codec: Codec) -> EncodedBatch {
    BatchEncoder::new()
        .encode_refs(9, codec, &runs(), true, read)
        .unwrap()
}

#[test]
fn references_round_trip_with_every_codec() {
    for codec in [Codec::None, Codec::Lz4, Codec::Zstd { level: 3 }] {
        let e = encoded(codec);
        assert_eq!((e.pages, e.zero, e.refs), (33, 7, 7), "{codec}");
        assert_eq!(e.zero + e.raw + e.compressed + e.refs, 33);
        assert!(PageBatch::has_refs(&e.payload[..PageBatch::FIXED_LEN]));
        let b = PageBatch::decode(e.payload.clone(), LIMITS).unwrap();
        assert_eq!((b.ref_pages(), b.nonzero_pages()), (7, 26));
        // The metadata ends where the data starts.
        let prefix = PageBatch::prefix_len(&e.payload[..PageBatch::FIXED_LEN]).unwrap();
        assert_eq!(prefix + e.data_bytes + 7 * REF, e.payload.len());
        let mut seen = 0;
        b.apply(&mut Vec::new(), |p, kind| {
            let mut want = vec![0u8; PAGE_SIZE];
            match (read(p, &mut want), kind) {
                (Read::Zero, Page::Zero) => {}
                (Read::Data, Page::Data(d)) => assert_eq!(d, &want[..]),
                (Read::Same { target, hash }, Page::Same { target: t, hash: h }) => {
                    assert_eq!((target, hash), (t, h));
                }
                (want, got) => panic!("page {p}: {want:?} sent, {got:?} came"),
            }
            seen += 1;
        })
        .unwrap();
        assert_eq!(seen, 33);
        // Data regions name only the pages sent as data.
        let regions: u32 = b.data_regions().iter().map(|r| r.count).sum();
        assert_eq!(regions, 33 - 7 - 7);
        assert_eq!(b.encode_for_test(), e.payload.to_vec());
    }
}

#[test]
fn a_batch_that_found_no_reference_is_the_plain_one() {
    let plain = |p: PageIndex, buf: &mut [u8]| match read(p, buf) {
        Read::Same { .. } => {
            buf.fill(3);
            Read::Data
        }
        other => other,
    };
    for codec in [Codec::None, Codec::Lz4] {
        let with = BatchEncoder::new()
            .encode_refs(9, codec, &runs(), true, plain)
            .unwrap();
        let without = BatchEncoder::new()
            .encode_refs(9, codec, &runs(), false, plain)
            .unwrap();
        assert_eq!(with.payload, without.payload, "{codec}");
        assert_eq!(with.refs, 0);
        assert!(!PageBatch::has_refs(&with.payload));
        PageBatch::decode(with.payload, LIMITS).unwrap();
    }
}

fn mutated(f: impl FnOnce(&mut Vec<u8>)) -> Result<PageBatch, DecodeError> {
    let mut p = encoded(Codec::Lz4).payload.to_vec();
    f(&mut p);
    PageBatch::decode(Bytes::from(p), LIMITS)
}

/// Where the reference bitmap starts in [`encoded`]'s payload.
fn ref_bits_at() -> usize {
    FIXED + 2 * RUN + 33usize.div_ceil(8)
}

#[test]
fn malformed_references_are_refused_naming_the_field() {
    let field = |r: Result<PageBatch, DecodeError>| match r.unwrap_err() {
        DecodeError::Invalid { field }
        | DecodeError::Reserved { field }
        | DecodeError::OutOfRange { field, .. }
        | DecodeError::Mismatch { field, .. }
        | DecodeError::Truncated { field, .. } => field,
        other => panic!("{other}"),
    };
    // Unknown flag bits.
    assert_eq!(field(mutated(|p| p[5] |= 4)), "batch.flags");
    // A page both zero and a reference (page 0 is zero).
    assert_eq!(
        field(mutated(|p| p[ref_bits_at()] |= 1)),
        "batch.ref_bitmap"
    );
    // A bit past the last page.
    assert_eq!(
        field(mutated(|p| p[ref_bits_at() + 4] |= 0x80)),
        "batch.ref_bitmap"
    );
    // A target outside the guest.
    assert_eq!(
        field(mutated(|p| {
            let at = p.len() - REF;
            p[at..at + 8].copy_from_slice(&20_000u64.to_le_bytes());
        })),
        "batch.ref.page"
    );
    // One reference short, or one too many.
    assert_eq!(
        field(mutated(|p| p.truncate(p.len() - REF))),
        "batch.data_len"
    );
    assert_eq!(
        field(mutated(|p| p.extend_from_slice(&[0; REF]))),
        "batch.data_len"
    );
    // Every truncation is an error, never a panic.
    let whole = encoded(Codec::Lz4).payload.to_vec();
    for n in 0..whole.len() {
        assert!(PageBatch::decode(Bytes::copy_from_slice(&whole[..n]), LIMITS).is_err());
    }
}

#[test]
fn a_batch_with_references_is_never_placed() {
    let e = encoded(Codec::None);
    let prefix = PageBatch::prefix_len(&e.payload[..FIXED]).unwrap();
    let meta = e.payload.slice(..prefix);
    let err = PageBatch::decode_split(meta, e.payload.len() - prefix, LIMITS).unwrap_err();
    assert!(
        matches!(
            err,
            DecodeError::Invalid {
                field: "batch.data"
            }
        ),
        "{err}"
    );
}
