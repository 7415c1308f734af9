//! Hostile and broken peers against a live receiver: every bad frame ends its
//! session with an error naming what was wrong, and the receiver keeps serving.

mod common;

use bytes::BytesMut;
use ferry::codec::Codec;
use ferry::cpu::CpuMeter;
use ferry::memory::{FillSpec, WorkloadPattern};
use ferry::migration::auth::BindSecret;
use ferry::migration::{Incoming, MigrationConfig, Outcome, Receiver, ReceiverConfig, RunContext};
use ferry::wire::{
    encode_frame, BatchEncoder, ChannelBind, Command, FrameDecoder, GuestKind, Header, Limits,
    Message, Negotiate, SessionSetup, VerifyMode,
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
    let rt = ferry::transport::runtime("hostile", 2, &CpuMeter::new()).unwrap();
    let recv = rt
        .block_on(Receiver::bind(
            "127.0.0.1:0",
            ReceiverConfig {
                max_memory: 64 << 20,
                idle_timeout: Duration::from_secs(1),
                ..ReceiverConfig::default()
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

/// Reads frames until one decodes to a message or the peer closes.
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
        let n = s.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
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
    Message::SessionSetup(SessionSetup {
        memory_bytes: memory,
        channels: 2,
        codec: 1,
        codec_level: 0,
        guest_kind: GuestKind::Sim,
        verify: VerifyMode::Fast,
        max_bandwidth: 0,
        flags: 0,
        label: None,
        proof: None,
    })
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
fn bind(s: &mut TcpStream, session: u64, channel: u16, secret: &BindSecret, nonce: [u8; 16]) {
    let header = Header {
        session_id: session,
        channel,
        ..Header::new(Command::ChannelBind)
    };
    let proof = secret.bind_proof(session, channel, &nonce);
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
    let g = common::guest(
        8 << 20,
        FillSpec::default(),
        WorkloadPattern::Uniform,
        5_000_000,
    );
    let gd: std::sync::Arc<dyn ferry::migration::MigratableGuest> = g.clone();
    let src_rt = ferry::transport::runtime("src", 1, &CpuMeter::new()).unwrap();
    let report = src_rt.block_on(ferry::migration::migrate(
        gd,
        &h.addr,
        &MigrationConfig::default(),
        &RunContext::default(),
    ));
    assert_eq!(report.outcome, Outcome::Completed, "{:?}", report.error);
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
        bind(&mut s, sid, ch, secret, nonce);
        let text = abort_text(recv(&mut s));
        assert!(text.contains(why), "{why}: {text}");
    }
    // The right proof binds, and its answer proves the secret back.
    let mut s = TcpStream::connect(&h.addr).unwrap();
    bind(&mut s, session, 1, &secret, [8; 16]);
    match recv(&mut s) {
        Some((_, Message::ChannelBindResponse(r))) => {
            assert!(secret.verify_bound(session, 1, &[8; 16], &r.proof))
        }
        other => panic!("expected CHANNEL_BIND_RESPONSE, got {other:?}"),
    }
    // The same bind recorded and played again is refused.
    let mut s = TcpStream::connect(&h.addr).unwrap();
    bind(&mut s, session, 1, &secret, [8; 16]);
    let text = abort_text(recv(&mut s));
    assert!(text.contains("replays a used nonce"), "{text}");
}

#[test]
fn a_page_index_outside_the_guest_ends_the_session_naming_the_field() {
    let mut h = start();
    let mut s = TcpStream::connect(&h.addr).unwrap();
    let (session, _) = open_session(&mut s, 1 << 20); // 256 pages
    let batch = BatchEncoder::new()
        .encode(0, Codec::Lz4, &[(300, 2)], |_, buf| {
            buf.fill(1);
            false
        })
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
        .encode(0, Codec::None, &[(0, pages)], |p, buf| {
            buf.fill(if p % 3 == 0 { 0 } else { p as u8 });
            p % 3 == 0
        })
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
