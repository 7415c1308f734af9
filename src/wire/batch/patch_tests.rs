//! Batches with patches: beside references or alone, they round-trip with
//! every codec, and malformed patch sections are refused naming the field.

use super::*;

const LIMITS: Limits = Limits {
    guest_pages: 10_000,
};

/// Page `p`'s patch when it has one: a copy of the whole region, then
/// `p % 7` literal bytes at the end.
fn ops_of(p: u64) -> Vec<u8> {
    let lit = (p % 7) as u16;
    let mut ops = Vec::new();
    ops.extend_from_slice(&0u16.to_le_bytes());
    ops.extend_from_slice(&(PAGE_SIZE as u16 - lit).to_le_bytes());
    ops.extend_from_slice(&lit.to_le_bytes());
    ops.extend((0..lit).map(|i| i as u8));
    ops.extend_from_slice(&0u16.to_le_bytes());
    ops
}

/// Page `p`: zero when p % 5 == 0; a reference when p % 5 == 1 and
/// `with_refs`; a patch of the region at byte 1000 × p when p % 5 == 2;
/// else a pattern.
fn reader(with_refs: bool) -> impl FnMut(PageIndex, &mut [u8]) -> Read {
    move |PageIndex(p), buf| match p % 5 {
        0 => Read::Zero,
        1 if with_refs => Read::Same {
            target: PageIndex(p + 5000),
            hash: p * 7,
        },
        2 => {
            let ops = ops_of(p);
            buf[..ops.len()].copy_from_slice(&ops);
            Read::Patch {
                base: 1000 * p,
                tag: p * 11,
                len: ops.len(),
            }
        }
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

fn encoded(codec: Codec, with_refs: bool) -> EncodedBatch {
    BatchEncoder::new()
        .encode_refs(9, codec, &runs(), true, reader(with_refs))
        .unwrap()
}

#[test]
fn patches_round_trip_with_every_codec_beside_references_or_alone() {
    for codec in [Codec::None, Codec::Lz4, Codec::Zstd { level: 3 }] {
        for with_refs in [true, false] {
            let e = encoded(codec, with_refs);
            let refs = if with_refs { 7 } else { 0 };
            assert_eq!((e.pages, e.refs, e.patches), (33, refs, 7), "{codec}");
            assert_eq!(e.zero + e.raw + e.compressed + e.refs, 33);
            assert!(PageBatch::has_refs(&e.payload[..PageBatch::FIXED_LEN]));
            let b = PageBatch::decode(e.payload.clone(), LIMITS).unwrap();
            assert_eq!((b.ref_pages(), b.patch_pages()), (refs, 7));
            let prefix = PageBatch::prefix_len(&e.payload[..PageBatch::FIXED_LEN]).unwrap();
            let tail = refs as usize * REF + 7 * PATCH;
            assert_eq!(prefix + e.data_bytes + tail, e.payload.len());
            let mut seen = 0;
            let mut want = reader(with_refs);
            b.apply(&mut Vec::new(), |p, kind| {
                let mut buf = vec![0u8; PAGE_SIZE];
                match (want(p, &mut buf), kind) {
                    (Read::Zero, Page::Zero) => {}
                    (Read::Data, Page::Data(d)) => assert_eq!(d, &buf[..]),
                    (Read::Same { target, hash }, Page::Same { target: t, hash: h }) => {
                        assert_eq!((target, hash), (t, h));
                    }
                    (
                        Read::Patch { base, tag, len },
                        Page::Patch {
                            base: b,
                            tag: t,
                            ops,
                        },
                    ) => {
                        assert_eq!((base, tag), (b, t));
                        assert_eq!(ops, &buf[..len]);
                    }
                    (want, got) => panic!("page {p}: {want:?} sent, {got:?} came"),
                }
                seen += 1;
            })
            .unwrap();
            assert_eq!(seen, 33);
            let regions: u32 = b.data_regions().iter().map(|r| r.count).sum();
            assert_eq!(regions, 33 - 7 - refs - 7);
            assert_eq!(b.encode_for_test(), e.payload.to_vec());
        }
    }
}

fn mutated(f: impl FnOnce(&mut Vec<u8>)) -> Result<PageBatch, DecodeError> {
    let mut p = encoded(Codec::None, false).payload.to_vec();
    f(&mut p);
    PageBatch::decode(Bytes::from(p), LIMITS)
}

/// Where the patch bitmap starts in a batch without references.
fn patch_bits_at() -> usize {
    FIXED + 2 * RUN + 33usize.div_ceil(8)
}

/// Where the last patch's entry starts.
fn last_patch(p: &[u8]) -> usize {
    p.len() - PATCH
}

#[test]
fn malformed_patches_are_refused_naming_the_field() {
    let field = |r: Result<PageBatch, DecodeError>| match r.unwrap_err() {
        DecodeError::Invalid { field }
        | DecodeError::Reserved { field }
        | DecodeError::OutOfRange { field, .. }
        | DecodeError::Mismatch { field, .. }
        | DecodeError::Truncated { field, .. } => field,
        other => panic!("{other}"),
    };
    assert!(mutated(|_| {}).is_ok());
    // A page both zero and a patch (page 0 is zero), or past the last page.
    assert_eq!(
        field(mutated(|p| p[patch_bits_at()] |= 1)),
        "batch.patch_bitmap"
    );
    assert_eq!(
        field(mutated(|p| p[patch_bits_at() + 4] |= 0x80)),
        "batch.patch_bitmap"
    );
    // A region reaching past the guest's end.
    let last_byte = LIMITS.guest_pages * PAGE_SIZE as u64;
    assert_eq!(
        field(mutated(|p| {
            let at = last_patch(p);
            p[at..at + 8].copy_from_slice(&(last_byte - PAGE_SIZE as u64 + 1).to_le_bytes());
        })),
        "batch.patch.base"
    );
    assert_eq!(
        field(mutated(|p| {
            let at = last_patch(p);
            p[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        })),
        "batch.patch.base"
    );
    // A length out of range, or off by one against the data.
    for (len, name) in [
        (0u16, "batch.patch.len"),
        (3, "batch.patch.len"),
        (4097, "batch.patch.len"),
        (8, "batch.uncompressed_len"),
    ] {
        let got = field(mutated(|p| {
            let at = last_patch(p) + 16;
            p[at..at + 2].copy_from_slice(&len.to_le_bytes());
        }));
        assert_eq!(got, name, "length {len}");
    }
    // One patch short, or one too many.
    assert_eq!(
        field(mutated(|p| p.truncate(p.len() - PATCH))),
        "batch.data_len"
    );
    // Every truncation is an error, never a panic.
    let whole = encoded(Codec::Lz4, true).payload.to_vec();
    for n in 0..whole.len() {
        assert!(PageBatch::decode(Bytes::copy_from_slice(&whole[..n]), LIMITS).is_err());
    }
}

#[test]
fn a_batch_with_patches_is_never_placed() {
    let e = encoded(Codec::None, false);
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
