//! Hostile and broken peers against a live receiver: every bad frame ends its
//! session with an error naming what was wrong, and the receiver keeps serving.

use crate::common;
use ferry::page::PageIndex;

#[path = "hostile/agents.rs"]
mod agents;
#[path = "hostile/api.rs"]
mod api;
#[path = "hostile/bench.rs"]
mod bench;
#[path = "hostile/late_go.rs"]
mod late_go;
#[path = "hostile/onpath.rs"]
mod onpath;
#[path = "hostile/patches.rs"]
mod patches;
#[path = "hostile/preauth.rs"]
mod preauth;
#[path = "hostile/refs.rs"]
mod refs;

use bytes::BytesMut;
use ferry::codec::Codec;
use ferry::cpu::CpuMeter;
use ferry::memory::{FillSpec, WorkloadPattern};
use ferry::migration::auth::BindSecret;
use ferry::migration::{MigrationConfig, Outcome};
use ferry::transport::{Incoming, Receiver, ReceiverConfig, RunContext};
use ferry::wire::{
    encode_frame, BatchEncoder, ChannelBind, ChannelId, Command, FrameDecoder, Header, Limits,
    Message, Negotiate, SessionSetup,
};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;
use tokio::sync::mpsc;

struct Harness {
    rt: tokio::runtime::Runtime,
    addr: String,
    done: mpsc::UnboundedReceiver<Incoming>,
    ctx: RunContext,
}

fn start() -> Harness {
    start_with(ReceiverConfig::default())
}

/// A receiver with `config`'s limits, a 64 MiB guest at most, giving up on
/// silent sources after 1 s.
fn start_with(config: ReceiverConfig) -> Harness {
    let rt = ferry::transport::runtime("hostile", 2, &CpuMeter::new()).unwrap();
    let recv = rt
        .block_on(Receiver::bind(
            "127.0.0.1:0",
            ReceiverConfig {
                max_memory: 64 << 20,
                idle_timeout: Duration::from_secs(1),
                ..config
            },
        ))
        .unwrap();
    let addr = recv.local_addr().unwrap().to_string();
    let ctx = RunContext::default();
    let (tx, done) = mpsc::unbounded_channel();
    rt.spawn(recv.serve(ctx.clone(), tx));
    Harness {
        rt,
        addr,
        done,
        ctx,
    }
}

impl Harness {
    fn next_session(&mut self) -> Incoming {
        self.rt
            .block_on(async {
                tokio::time::timeout(Duration::from_secs(10), self.done.recv()).await
            })
            .expect("a session ended")
            .unwrap()
    }
}

/// A real 8 MiB migration to the harness's receiver completes (it keeps
/// serving whatever else went on).
fn a_real_migration_completes(h: &Harness) {
    let g = common::guest(
        8 << 20,
        FillSpec::default(),
        WorkloadPattern::Uniform,
        5_000_000,
    );
    let gd: std::sync::Arc<dyn ferry::migration::MigratableGuest> = g.clone();
    let src_rt = ferry::transport::runtime("src", 1, &CpuMeter::new()).unwrap();
    let report = src_rt.block_on(ferry::transport::migrate(
        gd,
        &h.addr,
        &MigrationConfig::default(),
        &RunContext::default(),
    ));
    assert_eq!(report.outcome, Outcome::Completed, "{:?}", report.error);
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.ctx.cancel.cancel();
    }
}

fn send(s: &mut TcpStream, header: Header, msg: &Message) {
    let header = Header {
        command: msg.command(),
        ..header
    };
    s.write_all(&encode_frame(&header, &msg.encode_payload()))
        .unwrap();
}

/// Reads frames until one decodes to a message (`Some`) or the peer closes
/// or resets the connection (`None`). Silence for 10 s fails the test: a
/// timeout is not a close.
fn recv(s: &mut TcpStream) -> Option<(Header, Message)> {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = BytesMut::new();
    let mut dec = FrameDecoder::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(f) = dec.decode(&mut buf).expect("receiver sends valid frames") {
            let m = Message::decode(&f.header, f.payload, Limits::BEFORE_SETUP).unwrap();
            return Some((f.header, m));
        }
        let n = match s.read(&mut chunk) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                panic!("no frame and no close within 10 s")
            }
            Err(_) => 0,
        };
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Whether the peer closes the connection within `within` (reading and
/// dropping whatever it sends first); `false` when it is still open then.
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let deadline = std::time::Instant::now() + within;
    let mut chunk = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return false;
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut chunk) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

fn abort_text(reply: Option<(Header, Message)>) -> String {
    match reply {
        Some((_, Message::Abort(a))) => a.message,
        other => panic!("expected ABORT, got {other:?}"),
    }
}

const SOURCE_NONCE: [u8; 16] = [1; 16];

fn negotiate() -> Message {
    Message::Negotiate(Negotiate {
        min_version: ferry::wire::VERSION,
        max_version: ferry::wire::VERSION,
        capabilities: 0,
        codecs: 7,
        page_size: 4096,
        nonce: SOURCE_NONCE,
    })
}

fn setup(memory: u64) -> Message {
    Message::SessionSetup(SessionSetup::plain(memory, 2))
}

/// Negotiates and sets up a session of `memory` bytes; returns the session id
/// and the secret that proves its binds.
fn open_session(s: &mut TcpStream, memory: u64) -> (u64, BindSecret) {
    send(s, Header::new(Command::Negotiate), &negotiate());
    let dest_nonce = match recv(s) {
        Some((_, Message::NegotiateResponse(r))) => r.nonce,
        other => panic!("expected NEGOTIATE_RESPONSE, got {other:?}"),
    };
    send(s, Header::new(Command::SessionSetup), &setup(memory));
    match recv(s) {
        Some((h, Message::SessionSetupResponse(r))) => (
            h.session_id,
            BindSecret::derive(
                None,
                &SOURCE_NONCE,
                &dest_nonce,
                h.session_id,
                &r.bind_token,
            ),
        ),
        other => panic!("expected SESSION_SETUP_RESPONSE, got {other:?}"),
    }
}

/// A CHANNEL_BIND of `channel` to `session`, proved by `secret` over `nonce`.
fn bind(s: &mut TcpStream, session: u64, channel: ChannelId, secret: &BindSecret, nonce: [u8; 16]) {
    let header = Header {
        session_id: session,
        channel,
        ..Header::new(Command::ChannelBind)
    };
    let proof = secret.bind_proof(&ferry::migration::auth::Bind {
        session_id: session,
        channel,
        nonce: &nonce,
        binding: &[],
    });
    send(
        s,
        header,
        &Message::ChannelBind(ChannelBind { nonce, proof }),
    );
}

#[test]
fn garbage_first_frames_are_refused_and_the_receiver_keeps_serving() {
    let mut h = start();
    for garbage in [
        &b"GET / HTTP/1.1\r\nHost: example\r\nAccept: */*\r\n\r\n"[..],
        &[0xffu8; 64][..],
    ] {
        let mut s = TcpStream::connect(&h.addr).unwrap();
        s.write_all(garbage).unwrap();
        let text = abort_text(recv(&mut s));
        assert!(text.contains("magic"), "{text}");
        assert!(recv(&mut s).is_none(), "closed after the abort");
    }
    // A length over the frame limit is refused from the header alone.
    let mut s = TcpStream::connect(&h.addr).unwrap();
    let mut frame = encode_frame(
        &Header::new(Command::Negotiate),
        &negotiate().encode_payload(),
    );
    frame[32..36].copy_from_slice(&u32::MAX.to_le_bytes());
    s.write_all(&frame[..40]).unwrap();
    assert!(abort_text(recv(&mut s)).contains("exceeds"));

    // A real migration still works afterwards.
    a_real_migration_completes(&h);
    assert_eq!(h.next_session().report.outcome, Outcome::Completed);
}

#[test]
fn a_bind_with_a_wrong_proof_unknown_session_or_replayed_nonce_is_refused() {
    let h = start();
    let mut s0 = TcpStream::connect(&h.addr).unwrap();
    let (session, secret) = open_session(&mut s0, 1 << 20);
    let stranger = BindSecret::derive(None, &[2; 16], &[3; 16], session, &[4; 16]);
    for (sid, secret, ch, nonce, why) in [
        (session, &stranger, 1u16, [5; 16], "wrong proof"),
        (session ^ 2, &secret, 1, [6; 16], "unknown session"),
        (session, &secret, 7, [7; 16], "of 2 channels"),
    ] {
        let mut s = TcpStream::connect(&h.addr).unwrap();
        bind(&mut s, sid, ChannelId(ch), secret, nonce);
        let text = abort_text(recv(&mut s));
        assert!(text.contains(why), "{why}: {text}");
    }
    // The right proof binds, and its answer proves the secret back.
    let mut s = TcpStream::connect(&h.addr).unwrap();
    bind(&mut s, session, ChannelId(1), &secret, [8; 16]);
    match recv(&mut s) {
        Some((h, Message::ChannelBindResponse(r))) => {
            let bound = ferry::migration::auth::Bind {
                session_id: session,
                channel: ChannelId(1),
                nonce: &[8; 16],
                binding: &[],
            };
            assert!(secret.verify_bound(&bound, h.credit_grant, &r.proof))
        }
        other => panic!("expected CHANNEL_BIND_RESPONSE, got {other:?}"),
    }
    // The same bind recorded and played again is refused.
    let mut s = TcpStream::connect(&h.addr).unwrap();
    bind(&mut s, session, ChannelId(1), &secret, [8; 16]);
    let text = abort_text(recv(&mut s));
    assert!(text.contains("replays a used nonce"), "{text}");
}

#[test]
fn a_page_index_outside_the_guest_ends_the_session_naming_the_field() {
    let mut h = start();
    let mut s = TcpStream::connect(&h.addr).unwrap();
    let (session, _) = open_session(&mut s, 1 << 20); // 256 pages
    let batch = BatchEncoder::new()
        .encode(
            0,
            Codec::Lz4,
            &[ferry::page::PageRun::new(PageIndex(300), 2)],
            |_, buf| {
                buf.fill(1);
                false
            },
        )
        .unwrap();
    let header = Header {
        session_id: session,
        message_id: 1,
        ..Header::new(Command::PageBatch)
    };
    s.write_all(&encode_frame(&header, &batch.payload)).unwrap();
    let text = abort_text(recv(&mut s));
    assert!(text.contains("batch.run.first"), "{text}");
    let incoming = h.next_session();
    assert_eq!(incoming.report.outcome, Outcome::Failed);
    assert!(incoming.report.error.unwrap().contains("batch.run.first"));
    assert!(
        incoming.guest.is_none(),
        "nothing runs from a failed session"
    );
}

#[test]
fn an_oversized_guest_is_refused_before_allocating() {
    let mut h = start();
    let mut s = TcpStream::connect(&h.addr).unwrap();
    send(&mut s, Header::new(Command::Negotiate), &negotiate());
    assert!(matches!(
        recv(&mut s),
        Some((_, Message::NegotiateResponse(_)))
    ));
    send(&mut s, Header::new(Command::SessionSetup), &setup(1 << 40));
    assert!(abort_text(recv(&mut s)).contains("limit"));
    assert_eq!(h.next_session().report.outcome, Outcome::Failed);
}

#[test]
fn a_go_before_switchover_is_a_protocol_error() {
    let mut h = start();
    let mut s = TcpStream::connect(&h.addr).unwrap();
    let (session, _) = open_session(&mut s, 1 << 20);
    let header = Header {
        session_id: session,
        ..Header::new(Command::Go)
    };
    send(&mut s, header, &Message::Go);
    assert!(abort_text(recv(&mut s)).contains("GO received in state"));
    let incoming = h.next_session();
    assert_eq!(incoming.report.outcome, Outcome::Failed);
    assert!(incoming.guest.is_none());
}

#[test]
fn a_source_that_goes_silent_is_given_up_on() {
    let mut h = start();
    let mut s = TcpStream::connect(&h.addr).unwrap();
    let _ = open_session(&mut s, 1 << 20);
    // Say nothing more: the receiver gives up after its idle timeout (1 s here).
    let text = abort_text(recv(&mut s));
    assert!(text.contains("no frame on any channel"), "{text}");
    let incoming = h.next_session();
    assert_eq!(incoming.report.outcome, Outcome::Failed);
    assert!(incoming.guest.is_none());
}

#[test]
fn a_frame_for_another_session_ends_the_session() {
    let mut h = start();
    let mut s = TcpStream::connect(&h.addr).unwrap();
    let (session, _) = open_session(&mut s, 1 << 20);
    let header = Header {
        session_id: session ^ 2,
        ..Header::new(Command::Go)
    };
    send(&mut s, header, &Message::Go);
    let text = abort_text(recv(&mut s));
    assert!(
        text.contains(&format!("frame for session {:016x}", session ^ 2)),
        "{text}"
    );
    let incoming = h.next_session();
    assert_eq!(incoming.report.outcome, Outcome::Failed);
    assert!(incoming.guest.is_none());
}

/// A raw batch of `pages` pages from page 0: every third page zero, the rest
/// filled with their index; its frame encoded for `session`.
fn raw_batch_frame(session: u64, pages: u32) -> Vec<u8> {
    let batch = BatchEncoder::new()
        .encode(
            0,
            Codec::None,
            &[ferry::page::PageRun::new(PageIndex(0), pages)],
            |PageIndex(p), buf| {
                buf.fill(if p % 3 == 0 { 0 } else { p as u8 });
                p % 3 == 0
            },
        )
        .unwrap();
    let header = Header {
        session_id: session,
        message_id: 1,
        ..Header::new(Command::PageBatch)
    };
    encode_frame(&header, &batch.payload)
}

/// Writes `bytes` in small uneven pieces with pauses, so the receiver sees
/// the frame arrive part by part (headers, metadata and pages split).
fn dribble(s: &mut TcpStream, bytes: &[u8]) {
    s.set_nodelay(true).unwrap();
    let mut at = 0;
    let mut step = 7;
    while at < bytes.len() {
        let n = step.min(bytes.len() - at);
        s.write_all(&bytes[at..at + n]).unwrap();
        at += n;
        step = step * 3 % 9001 + 1;
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn a_raw_batch_arriving_in_pieces_is_placed_and_acknowledged() {
    let mut h = start();
    let mut s = TcpStream::connect(&h.addr).unwrap();
    let (session, _) = open_session(&mut s, 1 << 20);
    dribble(&mut s, &raw_batch_frame(session, 40));
    match recv(&mut s) {
        Some((_, Message::BatchAck(a))) => assert_eq!((a.message_id, a.pages), (1, 40)),
        other => panic!("expected BATCH_ACK, got {other:?}"),
    }
    drop(s);
    assert_eq!(h.next_session().report.outcome, Outcome::Failed);
}

#[test]
fn a_raw_batch_with_a_corrupt_page_ends_the_session_on_its_crc() {
    let mut h = start();
    let mut s = TcpStream::connect(&h.addr).unwrap();
    let (session, _) = open_session(&mut s, 1 << 20);
    let mut frame = raw_batch_frame(session, 40);
    let last = frame.len() - 100; // inside the last data page
    frame[last] ^= 0x40;
    dribble(&mut s, &frame);
    let text = abort_text(recv(&mut s));
    assert!(text.contains("CRC mismatch"), "{text}");
    let incoming = h.next_session();
    assert_eq!(incoming.report.outcome, Outcome::Failed);
    assert!(incoming.guest.is_none());
}

#[test]
fn a_raw_batch_for_another_session_is_refused_before_its_pages() {
    let mut h = start();
    let mut s = TcpStream::connect(&h.addr).unwrap();
    let (session, _) = open_session(&mut s, 1 << 20);
    let frame = raw_batch_frame(session ^ 4, 40);
    // Only the header and metadata: the refusal must not wait for the pages.
    s.write_all(&frame[..100]).unwrap();
    let text = abort_text(recv(&mut s));
    assert!(
        text.contains(&format!("frame for session {:016x}", session ^ 4)),
        "{text}"
    );
    assert_eq!(h.next_session().report.outcome, Outcome::Failed);
}

/// A page batch payload built field by field (see the layout in
/// `ferry::wire`'s batch module), so that it can lie.
fn batch_payload(
    codec: u8,
    runs: &[(u64, u32)],
    bitmap: &[u8],
    uncompressed: u32,
    data: &[u8],
) -> Vec<u8> {
    let pages: u32 = runs.iter().map(|r| r.1).sum();
    let mut p = Vec::new();
    p.extend_from_slice(&0u32.to_le_bytes());
    p.push(codec);
    p.push(0);
    p.extend_from_slice(&(runs.len() as u16).to_le_bytes());
    p.extend_from_slice(&pages.to_le_bytes());
    p.extend_from_slice(&(data.len() as u32).to_le_bytes());
    p.extend_from_slice(&uncompressed.to_le_bytes());
    for (first, n) in runs {
        p.extend_from_slice(&first.to_le_bytes());
        p.extend_from_slice(&n.to_le_bytes());
    }
    p.extend_from_slice(bitmap);
    p.extend_from_slice(data);
    p
}

fn batch_frame(session: u64, message_id: u64, payload: &[u8]) -> Vec<u8> {
    let header = Header {
        session_id: session,
        message_id,
        ..Header::new(Command::PageBatch)
    };
    encode_frame(&header, payload)
}

/// Sends `frame` in a fresh session and returns the abort's text and the
/// session's recorded error.
fn one_bad_frame(h: &mut Harness, frame: impl Fn(u64) -> Vec<u8>) -> (String, String) {
    let mut s = TcpStream::connect(&h.addr).unwrap();
    let (session, _) = open_session(&mut s, 1 << 20);
    s.write_all(&frame(session)).unwrap();
    let text = abort_text(recv(&mut s));
    let incoming = h.next_session();
    assert_eq!(incoming.report.outcome, Outcome::Failed);
    assert!(
        incoming.guest.is_none(),
        "nothing runs from a failed session"
    );
    (text, incoming.report.error.unwrap())
}

#[test]
fn an_unsupported_version_or_unknown_command_is_named() {
    let mut h = start();
    for (byte, value, why) in [
        (4usize, 9u8, "unsupported protocol version 9"),
        (5, 99, "unknown command 99"),
    ] {
        let (text, error) = one_bad_frame(&mut h, |session| {
            let mut f = encode_frame(
                &Header {
                    session_id: session,
                    ..Header::new(Command::RoundEnd)
                },
                &[0; 13],
            );
            f[byte] = value;
            f
        });
        assert!(
            text.contains(why) && error.contains(why),
            "{why}: {text} / {error}"
        );
    }
}

#[test]
fn a_decompressed_size_mismatch_and_a_compression_bomb_are_refused_within_limits() {
    let mut h = start();
    // Two pages declared, one page of LZ4 data.
    let page = vec![7u8; 4096];
    let mut one = bytes::BytesMut::new();
    ferry::codec::compress(Codec::Lz4, &page, &mut one).unwrap();
    let (text, _) = one_bad_frame(&mut h, |session| {
        batch_frame(session, 1, &batch_payload(1, &[(0, 2)], &[0], 8192, &one))
    });
    assert!(text.contains("decompressed to"), "{text}");
    // A tiny zstd frame that declares and expands to 1 GiB, sent as two
    // pages' worth (made in pieces, so that making it costs no memory).
    let mut enc = zstd::stream::Encoder::new(Vec::new(), 19).unwrap();
    enc.set_pledged_src_size(Some(1 << 30)).unwrap();
    let chunk = vec![0u8; 1 << 20];
    for _ in 0..1024 {
        std::io::Write::write_all(&mut enc, &chunk).unwrap();
    }
    let bomb = enc.finish().unwrap();
    assert!(bomb.len() < 256 << 10, "{} bytes", bomb.len());
    let before = ferry::memory::peak_rss_bytes().unwrap();
    let (text, _) = one_bad_frame(&mut h, |session| {
        batch_frame(session, 1, &batch_payload(2, &[(0, 2)], &[0], 8192, &bomb))
    });
    assert!(text.contains("Zstd"), "{text}");
    let grew = ferry::memory::peak_rss_bytes()
        .unwrap()
        .saturating_sub(before);
    assert!(grew < 256 << 20, "the bomb cost {grew} bytes");
}

#[test]
fn a_duplicate_message_id_is_refused_and_a_marked_resend_is_acknowledged_once() {
    let mut h = start();
    let mut s = TcpStream::connect(&h.addr).unwrap();
    let (session, _) = open_session(&mut s, 1 << 20);
    let frame = raw_batch_frame(session, 4);
    s.write_all(&frame).unwrap();
    assert!(matches!(recv(&mut s), Some((_, Message::BatchAck(_)))));
    // The same id again, flagged as a resend: acknowledged, not applied again.
    let mut resend = frame.clone();
    resend[6..8].copy_from_slice(&ferry::wire::FLAG_RESEND.to_le_bytes());
    let payload = resend[40..].to_vec();
    let (head, _) = ferry::wire::Header::parse(resend[..40].try_into().unwrap()).unwrap();
    let resend = encode_frame(&head, &payload);
    s.write_all(&resend).unwrap();
    match recv(&mut s) {
        Some((_, Message::BatchAck(a))) => assert_eq!(a.message_id, 1),
        other => panic!("expected BATCH_ACK, got {other:?}"),
    }
    // Unflagged, it is a replay.
    s.write_all(&frame).unwrap();
    let text = abort_text(recv(&mut s));
    assert!(text.contains("duplicate message id 1"), "{text}");
    assert_eq!(h.next_session().report.outcome, Outcome::Failed);
}

#[test]
fn a_truncated_frame_ends_the_session_naming_it() {
    let mut h = start();
    let mut s = TcpStream::connect(&h.addr).unwrap();
    let (session, _) = open_session(&mut s, 1 << 20);
    let frame = raw_batch_frame(session, 8);
    s.write_all(&frame[..frame.len() / 2]).unwrap();
    drop(s);
    // The channel is lost; no other comes back within the idle timeout.
    let incoming = h.next_session();
    assert_eq!(incoming.report.outcome, Outcome::Failed);
    let error = incoming.report.error.unwrap();
    assert!(
        error.contains("closed inside a PageBatch payload"),
        "{error}"
    );
    assert!(incoming.guest.is_none());
}

#[test]
fn silent_connections_are_evicted_oldest_first_and_closed_after_the_handshake_timeout() {
    let h = start_with(ReceiverConfig {
        handshake_timeout: Duration::from_millis(1500),
        max_pending: 8,
        ..ReceiverConfig::default()
    });
    // Eight connections that say nothing fill the handshake budget; a ninth
    // evicts the oldest, which is told why.
    let mut quiet: Vec<TcpStream> = (0..8)
        .map(|_| {
            let s = TcpStream::connect(&h.addr).unwrap();
            std::thread::sleep(Duration::from_millis(5));
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    let _ninth = TcpStream::connect(&h.addr).unwrap();
    let t = std::time::Instant::now();
    let text = abort_text(recv(&mut quiet[0]));
    assert!(text.contains("limit of 8 connections"), "{text}");
    assert!(t.elapsed() < Duration::from_millis(1000), "evicted at once");
    assert!(
        !closed_within(&mut quiet[1], Duration::from_millis(200)),
        "the others stay"
    );
    // The rest are closed after the handshake timeout.
    for q in &mut quiet[1..] {
        assert!(closed_within(q, Duration::from_secs(5)));
    }
}

#[test]
fn sessions_over_the_limits_are_refused_before_allocating() {
    let mut h = start_with(ReceiverConfig {
        max_sessions: 1,
        max_inflight_bytes: 8 * ferry::transport::CHANNEL_MEMORY,
        ..ReceiverConfig::default()
    });
    let mut first = TcpStream::connect(&h.addr).unwrap();
    let _ = open_session(&mut first, 1 << 20);
    // The second proves itself (loopback, no key) and is then refused.
    let mut second = TcpStream::connect(&h.addr).unwrap();
    send(&mut second, Header::new(Command::Negotiate), &negotiate());
    assert!(matches!(
        recv(&mut second),
        Some((_, Message::NegotiateResponse(_)))
    ));
    send(
        &mut second,
        Header::new(Command::SessionSetup),
        &setup(1 << 20),
    );
    assert!(abort_text(recv(&mut second)).contains("limit of 1 sessions"));
    let refused = h.next_session();
    assert!(!refused.admitted && refused.memory.is_none());
    drop(first);
    let ended = h.next_session();
    assert!(ended.admitted);
    assert_eq!(ended.report.outcome, Outcome::Failed);
    // Sixteen channels could hold more frames than the limit of eight's.
    let mut s = TcpStream::connect(&h.addr).unwrap();
    send(&mut s, Header::new(Command::Negotiate), &negotiate());
    assert!(matches!(
        recv(&mut s),
        Some((_, Message::NegotiateResponse(_)))
    ));
    let Message::SessionSetup(mut wide) = setup(1 << 20) else {
        unreachable!()
    };
    wide.channels = 16;
    send(
        &mut s,
        Header::new(Command::SessionSetup),
        &Message::SessionSetup(wide),
    );
    let text = abort_text(recv(&mut s));
    assert!(text.contains("16 channels may hold"), "{text}");
    let incoming = h.next_session();
    assert!(incoming.memory.is_none(), "nothing allocated");
}

#[test]
fn a_source_that_stops_reading_cannot_stall_the_receiver() {
    let mut h = start();
    let mut s = TcpStream::connect(&h.addr).unwrap();
    let (session, _) = open_session(&mut s, 1 << 20);
    // Batches keep coming; their acknowledgements are never read.
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        for id in 1..=2000u64 {
            let mut f = raw_batch_frame(session, 1);
            f[16..24].copy_from_slice(&id.to_le_bytes());
            let payload = f[40..].to_vec();
            let (head, _) = ferry::wire::Header::parse(f[..40].try_into().unwrap()).unwrap();
            if w.write_all(&encode_frame(&head, &payload)).is_err() {
                break;
            }
        }
    });
    // Meanwhile another migration completes.
    a_real_migration_completes(&h);
    writer.join().unwrap();
    let mut outcomes = [h.next_session().report, h.next_session().report];
    outcomes.sort_by_key(|r| r.outcome == Outcome::Completed);
    assert_eq!(outcomes[1].outcome, Outcome::Completed);
    // The reader that never read is given up on once it stops sending.
    assert_eq!(outcomes[0].outcome, Outcome::Failed);
    assert!(
        outcomes[0]
            .error
            .as_deref()
            .unwrap()
            .contains("no frame on any channel"),
        "{:?}",
        outcomes[0].error
    );
    drop(s);
}
