//! The page batch's round trips, its placing, and its refusals of bad input.

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
    assert_eq!(field(mutated(|p| p[5] = 4)), "batch.flags");
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
