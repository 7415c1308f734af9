//! The properties the fuzz targets in `fuzz/` check, callable from ordinary
//! tests too (which replay `fuzz/regressions/`). Each panics only when the
//! property fails.

use crate::codec::CodecId;
use crate::page::PageIndex;
use crate::page::PageRun;
use crate::wire::PAGE_SIZE;
use crate::wire::{Command, FrameDecoder, Header, Limits, Message, Page, PageBatch, HEADER_LEN};
use bytes::{Bytes, BytesMut};

mod receiver;
pub use receiver::receiver;

/// The guest size fuzzed batches are checked against: 1024 pages.
pub const FUZZ_GUEST_PAGES: u64 = 1024;

/// Decodes `data` as one frame and its message. Must not panic. Random bytes
/// rarely carry a valid CRC, so the payload is also decoded past the CRC check
/// as the header's command says: the fuzzer reaches every message decoder.
pub fn frame(data: &[u8]) {
    let limits = Limits {
        guest_pages: FUZZ_GUEST_PAGES,
    };
    let _ = crate::wire::decode_all(data, limits);
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
        // A kept stream's batch decodes as the first of its connection's.
        let mut stream = crate::codec::StreamDecoder::new().ok();
        let _ = b.apply_with(&mut scratch, stream.as_mut(), |page, kind| {
            assert!(page.0 < FUZZ_GUEST_PAGES, "page {page} outside the guest");
            match kind {
                Page::Data(bytes) => assert_eq!(bytes.len(), PAGE_SIZE),
                Page::Same { target, .. } => {
                    assert!(target.0 < FUZZ_GUEST_PAGES, "reference to {target}")
                }
                Page::Patch { base, ops, .. } => {
                    let end = base + PAGE_SIZE as u64;
                    assert!(
                        end <= FUZZ_GUEST_PAGES * PAGE_SIZE as u64,
                        "patch of {base}"
                    );
                    assert!(ops.len() <= PAGE_SIZE, "a patch of {} bytes", ops.len());
                    // Its ops, over any region, build a page or an error.
                    let mut out = [0u8; PAGE_SIZE];
                    let _ = crate::wire::patch::apply(&[0u8; PAGE_SIZE], ops, &mut out);
                }
                _ => {}
            }
            assert_ne!(kind, Page::Placed, "a whole payload is never placed");
            count += 1;
        });
        assert!(count == 0 || count == b.page_count());
    }
    // The receiver's direct path: metadata decoded apart from the data that it
    // reads straight into the pages the batch names (only when data follows
    // the metadata: a batch without any is decoded whole).
    if let Ok(prefix) = PageBatch::prefix_len(data) {
        if prefix < data.len() {
            let meta = Bytes::copy_from_slice(&data[..prefix]);
            if let Ok(b) = PageBatch::decode_split(meta, data.len() - prefix, limits) {
                assert!(b.is_placed());
                let regions = b.data_regions();
                let pages: u64 = regions.iter().map(|r| u64::from(r.count)).sum();
                assert_eq!(pages, u64::from(b.nonzero_pages()));
                assert_eq!(pages as usize * PAGE_SIZE, data.len() - prefix);
                for r in regions {
                    assert!(r.end() <= PageIndex(FUZZ_GUEST_PAGES));
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
) -> (
    Vec<(crate::wire::Header, Bytes)>,
    Option<crate::wire::DecodeError>,
) {
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

/// Largest output a fuzzed codec input may declare: a batch's data at most.
pub const FUZZ_MAX_OUTPUT: usize = crate::wire::MAX_PAGES_PER_BATCH as usize * PAGE_SIZE;

/// Decompresses `data` with `codec`: the first 4 bytes declare the output
/// size (as a batch declares its pages), the rest is the compressed input.
/// Any bytes as a patch (after the first 4096, the region it patches,
/// zero-padded) build a page or an error, never a panic; and the same
/// bytes as a page against that region: a patch [`crate::wire::patch::diff`]
/// makes of it rebuilds it.
pub fn patch(data: &[u8]) {
    use crate::wire::patch::{apply, diff};
    let mut base = [0u8; PAGE_SIZE];
    let n = data.len().min(PAGE_SIZE);
    base[..n].copy_from_slice(&data[..n]);
    let ops = &data[n..];
    let mut out = [0u8; PAGE_SIZE];
    let _ = apply(&base, ops, &mut out);
    let mut page = [0u8; PAGE_SIZE];
    let m = ops.len().min(PAGE_SIZE);
    page[..m].copy_from_slice(&ops[..m]);
    let mut made = [0u8; PAGE_SIZE];
    if let Some(len) = diff(&page, &base, &mut made) {
        apply(&base, &made[..len], &mut out).expect("a patch diff made applies");
        assert_eq!(out, page, "a patch diff made rebuilds its page");
    }
}

/// Must not panic or write past the declared size, whatever the input claims
/// (a compression bomb declaring a huge output fails without allocating
/// it); a success fills exactly the declared bytes.
pub fn codec(codec: CodecId, data: &[u8]) {
    let Some((head, input)) = data.split_first_chunk::<4>() else {
        return;
    };
    let declared = (u32::from_le_bytes(*head) as usize) % (FUZZ_MAX_OUTPUT + 1);
    // A guard zone after the declared size catches writes past it.
    let mut out = vec![0xa5u8; declared + 64];
    let _ = crate::codec::decompress(codec, input, &mut out[..declared]);
    assert!(
        out[declared..].iter().all(|&b| b == 0xa5),
        "{codec:?} wrote past the declared size"
    );
}

/// `data` as pieces of a kept zstd stream, each a declared size (u32, taken
/// modulo the output limit) and a length (u16) then that many bytes,
/// decoded in order by one connection's decoder: no panic, no write past a
/// declared size, and once a piece fails the stream is not used again.
pub fn kept_stream(mut data: &[u8]) {
    let Ok(mut dec) = crate::codec::StreamDecoder::new() else {
        return;
    };
    while let Some((head, rest)) = data.split_first_chunk::<6>() {
        let declared =
            (u32::from_le_bytes(head[..4].try_into().unwrap()) as usize) % (FUZZ_MAX_OUTPUT + 1);
        let len = usize::from(u16::from_le_bytes([head[4], head[5]])).min(rest.len());
        let (piece, rest) = rest.split_at(len);
        data = rest;
        let mut out = vec![0xa5u8; declared + 64];
        let r = dec.decompress(piece, &mut out[..declared]);
        assert!(
            out[declared..].iter().all(|&b| b == 0xa5),
            "a kept stream wrote past the declared size"
        );
        if r.is_err() {
            return;
        }
    }
}

/// A whole, valid session in [`receiver`]'s record format: the seed the
/// fuzzer starts from, so that it reaches every state.
pub fn receiver_seed() -> Vec<u8> {
    use crate::codec::Codec;
    use crate::digest::{page_hash, zero_page_hash, PageHashes};
    use crate::wire::{
        BatchEncoder, Negotiate, RoundEnd, SessionSetup, Switchover, VerifyMode, VERSION,
    };
    let mut out = Vec::new();
    let mut push = |m: &Message, payload: Option<&[u8]>| {
        let p = payload.map_or_else(|| m.encode_payload(), <[u8]>::to_vec);
        out.push(m.command() as u8);
        out.extend_from_slice(&(p.len() as u16).to_le_bytes());
        out.extend_from_slice(&p);
    };
    push(
        &Message::Negotiate(Negotiate {
            min_version: VERSION,
            max_version: VERSION,
            capabilities: 0,
            codecs: 7,
            page_size: PAGE_SIZE as u32,
            nonce: [1; 16],
        }),
        None,
    );
    push(
        &Message::SessionSetup(SessionSetup::plain(FUZZ_GUEST_PAGES * PAGE_SIZE as u64, 1)),
        None,
    );
    let hashes = PageHashes::new(FUZZ_GUEST_PAGES);
    for p in 0..FUZZ_GUEST_PAGES {
        hashes.set(PageIndex(p), zero_page_hash());
    }
    let content = |p: u64, buf: &mut [u8]| {
        buf.iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = (i as u64 ^ p) as u8);
    };
    let batch = |round: u32, codec: Codec, runs: &[PageRun]| {
        let b = BatchEncoder::new()
            .encode(round, codec, runs, |p, buf| {
                if p.0 % 5 == 0 {
                    buf.fill(0);
                    hashes.set(p, zero_page_hash());
                    return true;
                }
                content(p.0, buf);
                hashes.set(p, page_hash(buf));
                false
            })
            .unwrap();
        b.payload.to_vec()
    };
    let b0 = batch(
        0,
        Codec::Lz4,
        &[
            PageRun::new(PageIndex(0), 8),
            PageRun::new(PageIndex(100), 4),
        ],
    );
    let b1 = batch(1, Codec::None, &[PageRun::new(PageIndex(3), 2)]);
    let b2 = batch(
        1,
        Codec::Zstd { level: 1 },
        &[PageRun::new(PageIndex(200), 3)],
    );
    let digest = hashes.digest();
    let batch_msg = |p: &[u8]| {
        Message::PageBatch(
            PageBatch::decode(
                Bytes::copy_from_slice(p),
                Limits {
                    guest_pages: FUZZ_GUEST_PAGES,
                },
            )
            .unwrap(),
        )
    };
    push(&batch_msg(&b0), Some(&b0));
    push(
        &Message::RoundEnd(RoundEnd {
            round: 0,
            pages: 12,
            final_next: true,
        }),
        None,
    );
    push(&batch_msg(&b1), Some(&b1));
    push(&batch_msg(&b2), Some(&b2));
    push(
        &Message::Switchover(Switchover {
            final_round: 1,
            digest,
            verify: VerifyMode::Fast,
            rounds: 1,
            dirty_rate_bps: 0,
            throttle_pct_max: 0,
            source_cpu_ms: 0,
            state: Bytes::from_static(b"{}"),
        }),
        None,
    );
    push(&Message::Go, None);
    out
}

/// The messages of [`receiver_seed`] as whole frames (seeds for the frame
/// decoder), with a few it does not hold: a labelled, proven setup with a
/// delta base, its answer, a bind, an echo and an abort.
pub fn receiver_seed_frames() -> Vec<Vec<u8>> {
    use crate::wire::{
        encode_frame, Abort, AbortCode, ChannelBind, Echo, SessionLabel, SessionSetup,
    };
    let seed = receiver_seed();
    let mut out = Vec::new();
    let mut rest = &seed[..];
    while let Some((&[cmd, l0, l1], tail)) = rest.split_first_chunk::<3>() {
        let len = usize::from(u16::from_le_bytes([l0, l1]));
        let command = Command::from_u8(cmd).expect("the seed's commands");
        out.push(encode_frame(&Header::new(command), &tail[..len]));
        rest = &tail[len..];
    }
    let extra = [
        Message::SessionSetup(SessionSetup {
            memory_bytes: FUZZ_GUEST_PAGES * PAGE_SIZE as u64,
            channels: 4,
            codec: 3,
            codec_level: 0,
            guest_kind: crate::wire::GuestKind::Sim,
            verify: crate::wire::VerifyMode::Full,
            max_bandwidth: 1 << 30,
            flags: crate::wire::SETUP_LEAVE_PAUSED,
            label: Some(SessionLabel {
                vm: "web-1".into(),
                migration_id: "a-1".into(),
                source_node: "a".into(),
            }),
            base: Some(crate::wire::DeltaBase {
                migration_id: "b-1".into(),
                digest: 0x1234,
            }),
            proof: Some([7; 32]),
        }),
        Message::SessionSetupResponse(crate::wire::SessionSetupResponse {
            bind_token: [3; 16],
            initial_credits: 4,
            proof: Some([5; 32]),
            delta: true,
        }),
        Message::ChannelBind(ChannelBind {
            nonce: [1; 16],
            proof: [2; 32],
        }),
        Message::Echo(Echo { value: 9 }),
        Message::Abort(Abort {
            code: AbortCode::Protocol,
            message: "a reason".into(),
        }),
    ];
    for m in extra {
        out.push(encode_frame(&Header::new(m.command()), &m.encode_payload()));
    }
    out
}

/// Any bytes, decoded as a guest's saved state (the first byte picks the
/// kind: even for the synthetic guest, odd for KVM), never panic; a KVM state
/// that decodes fits the guest it names.
pub fn guest_state(data: &[u8]) {
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    if kind % 2 == 0 {
        let _ = serde_json::from_slice::<crate::memory::GuestState>(rest);
        return;
    }
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    {
        let pages = FUZZ_GUEST_PAGES;
        if let Ok(st) = crate::kvm::KvmGuestState::decode(rest, pages) {
            assert_eq!(st.layout.pages, pages);
            assert!(st.vcpu.msrs.len() <= crate::kvm::state::MAX_MSRS);
        }
    }
}

/// Any bytes, restored as a guest (the first byte picks the kind as for
/// [`guest_state`]) on a small memory and then run for a moment, never
/// panic: a peer's state is range-checked before a guest is made of it, and
/// a guest made of it runs and pauses with any counters it carries. KVM
/// states are restored only where `/dev/kvm` works.
pub fn guest_restore(data: &[u8]) {
    use crate::migration::restore_guest;
    use crate::wire::GuestKind;
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    let kind = if kind % 2 == 0 {
        GuestKind::Sim
    } else if crate::migration::kvm_unavailable().is_none() {
        GuestKind::Kvm
    } else {
        return;
    };
    let Ok(memory) =
        crate::memory::GuestMemory::new(FUZZ_GUEST_PAGES * crate::memory::PAGE_SIZE as u64)
    else {
        return;
    };
    if let Ok(guest) = restore_guest(kind, std::sync::Arc::new(memory), rest) {
        guest.resume();
        std::thread::sleep(std::time::Duration::from_millis(1));
        guest.pause();
        let _ = guest.save_state();
    }
}

/// Any bytes, opened as a retained image (delta failback's kept memory)
/// and read page by page (and a slice of its hash table alone), never
/// panic: a bad header, length or table is refused, a page that does not
/// match its hash is an error.
pub fn retained_image(data: &[u8]) {
    use crate::migration::retained::Retained;
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let path = std::env::temp_dir().join(format!(
        "ferry-fuzz-retained-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    if std::fs::write(&path, data).is_err() {
        return;
    }
    // A slice of its table, as `GET /v1/retained/{vm}/hashes` reads it.
    for (first, count) in [(0, u64::MAX), (1, 3), (u64::MAX, 1)] {
        if let Ok((_, h)) = Retained::read_hashes(&path, 64 << 20, first, count) {
            assert!(h.len() as u64 <= count);
        }
    }
    if let Ok(r) = Retained::open(&path, 64 << 20) {
        let mut page = vec![0u8; crate::memory::PAGE_SIZE];
        for i in 0..r.hashes().len() as u64 + 1 {
            let _ = r.page(crate::page::PageIndex(i), &mut page);
        }
        // As a failback's base: copied into fresh memory, or refused and
        // the memory left all zeros.
        #[cfg(feature = "net")]
        if let Ok(mem) = crate::memory::GuestMemory::new(r.memory()) {
            let hashes = crate::digest::PageHashes::new(mem.pages());
            let base = crate::wire::DeltaBase {
                migration_id: "m-1".into(),
                digest: r.digest(),
            };
            if crate::transport::prefill(&mem, &hashes, &r, &base).is_err() {
                assert_eq!(hashes.digest(), 0, "a refused image leaves nothing");
            }
        }
    }
    let _ = std::fs::remove_file(&path);
}
