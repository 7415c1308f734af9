//! Peers that never prove the key: they hold no session slot, no memory
//! beyond a handshake frame, no report, and cannot lock real sources out.

use super::*;
use ferry::migration::auth::SessionKey;
use ferry::transport::Refusal;

/// A receiver exactly as `config` says (no test defaults folded in).
fn start_exact(
    config: ReceiverConfig,
) -> (Harness, std::sync::Arc<ferry::transport::ReceiverStats>) {
    let rt = ferry::transport::runtime("hostile", 2, &CpuMeter::new()).unwrap();
    let recv = rt.block_on(Receiver::bind("127.0.0.1:0", config)).unwrap();
    let stats = recv.stats();
    let addr = recv.local_addr().unwrap().to_string();
    let ctx = RunContext::default();
    let (tx, done) = mpsc::unbounded_channel();
    rt.spawn(recv.serve(ctx.clone(), tx));
    (
        Harness {
            rt,
            addr,
            done,
            ctx,
        },
        stats,
    )
}

fn key() -> SessionKey {
    SessionKey(b"the-cluster-key-0123456789abcdef".to_vec())
}

/// A real 8 MiB migration over 4 channels, proving `key`.
fn keyed_migration(addr: &str, key: Option<SessionKey>) -> ferry::migration::Report {
    let g = common::guest(
        8 << 20,
        FillSpec::default(),
        WorkloadPattern::Uniform,
        5_000_000,
    );
    let gd: std::sync::Arc<dyn ferry::migration::MigratableGuest> = g.clone();
    let src_rt = ferry::transport::runtime("src", 1, &CpuMeter::new()).unwrap();
    src_rt.block_on(ferry::transport::migrate(
        gd,
        addr,
        &MigrationConfig {
            session_key: key,
            ..MigrationConfig::default()
        },
        &RunContext::default(),
    ))
}

impl Harness {
    /// Nothing more ends within `within`.
    fn no_session_within(&mut self, within: Duration) {
        let got = self
            .rt
            .block_on(async { tokio::time::timeout(within, self.done.recv()).await });
        if let Ok(Some(i)) = got {
            panic!("unexpected session report: {:?}", i.report);
        }
    }
}

#[test]
fn connections_that_never_prove_the_key_take_no_session_slot() {
    let (mut h, stats) = start_exact(ReceiverConfig {
        key: Some(key()),
        max_sessions: 2,
        ..ReceiverConfig::default()
    });
    // Sixteen peers negotiate and sit there, never proving the key.
    let mut idle: Vec<TcpStream> = (0..16)
        .map(|_| {
            let mut s = TcpStream::connect(&h.addr).unwrap();
            send(&mut s, Header::new(Command::Negotiate), &negotiate());
            assert!(matches!(
                recv(&mut s),
                Some((_, Message::NegotiateResponse(_)))
            ));
            s
        })
        .collect();
    // A real session, and a second at once, get both slots.
    let report = keyed_migration(&h.addr, Some(key()));
    assert_eq!(report.outcome, Outcome::Completed, "{:?}", report.error);
    assert!(report.authenticated);
    assert_eq!(h.next_session().report.outcome, Outcome::Completed);
    // Their setups, unproved, are refused; none leaves a report.
    for s in &mut idle {
        send(s, Header::new(Command::SessionSetup), &setup(1 << 20));
        let text = abort_text(recv(s));
        assert!(text.contains("requires the shared key"), "{text}");
    }
    h.no_session_within(Duration::from_millis(500));
    assert_eq!(stats.refused_for(Refusal::Unauthenticated), 16);
    // A source with the wrong key is told so, and leaves no report either.
    let wrong = keyed_migration(
        &h.addr,
        Some(SessionKey(b"another-key-0123456789".to_vec())),
    );
    assert_eq!(wrong.outcome, Outcome::Failed);
    assert!(wrong.error.unwrap().contains("proof of the key is wrong"));
    h.no_session_within(Duration::from_millis(500));
}

#[test]
fn a_flood_of_silent_connections_cannot_lock_sources_out() {
    let (mut h, stats) = start_exact(ReceiverConfig {
        max_pending: 16,
        ..ReceiverConfig::default()
    });
    // 64 connections that say nothing, held open: four times the budget.
    let flood: Vec<TcpStream> = (0..64)
        .map(|_| TcpStream::connect(&h.addr).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    // A real migration's five connections (channel 0 and three binds) get
    // through: each evicts the flood's oldest.
    let report = keyed_migration(&h.addr, None);
    assert_eq!(report.outcome, Outcome::Completed, "{:?}", report.error);
    assert_eq!(h.next_session().report.outcome, Outcome::Completed);
    assert!(
        stats.refused_for(Refusal::Evicted) >= 48,
        "{:?}",
        stats.refused()
    );
    drop(flood);
}

#[test]
fn a_first_frame_may_announce_only_what_the_handshake_needs() {
    let h = start();
    // A NEGOTIATE header that announces 1 MiB: refused from the header
    // alone, before any of it is read or reserved.
    let mut s = TcpStream::connect(&h.addr).unwrap();
    let mut frame = encode_frame(
        &Header::new(Command::Negotiate),
        &negotiate().encode_payload(),
    );
    frame[32..36].copy_from_slice(&(1u32 << 20).to_le_bytes());
    s.write_all(&frame[..40]).unwrap();
    let text = abort_text(recv(&mut s));
    assert!(text.contains("exceeds the 8192 byte limit"), "{text}");
    // A bind's too.
    let mut s = TcpStream::connect(&h.addr).unwrap();
    let mut frame = encode_frame(
        &Header::new(Command::ChannelBind),
        &Message::ChannelBind(ChannelBind {
            nonce: [1; 16],
            proof: [2; 32],
        })
        .encode_payload(),
    );
    frame[32..36].copy_from_slice(&(8u32 << 20).to_le_bytes());
    s.write_all(&frame[..40]).unwrap();
    let text = abort_text(recv(&mut s));
    assert!(text.contains("exceeds the 8192 byte limit"), "{text}");
}

#[test]
fn an_announced_terabyte_allocates_no_page_table_before_pages_arrive() {
    let (mut h, _) = start_exact(ReceiverConfig {
        max_memory: 1 << 40,
        idle_timeout: Duration::from_secs(1),
        ..ReceiverConfig::default()
    });
    let before = ferry::memory::peak_rss_bytes().unwrap();
    let mut s = TcpStream::connect(&h.addr).unwrap();
    let _ = open_session(&mut s, 1 << 40);
    // The session is set up: a 1 TiB guest's per-page hashes would be 2 GiB.
    std::thread::sleep(Duration::from_millis(200));
    let grew = ferry::memory::peak_rss_bytes()
        .unwrap()
        .saturating_sub(before);
    assert!(grew < 256 << 20, "setting up cost {grew} bytes");
    drop(s);
    let ended = h.next_session();
    assert!(ended.admitted);
    assert_eq!(ended.report.memory_bytes, 1 << 40);
}

#[test]
fn a_peer_s_text_is_escaped_in_reports_and_logs() {
    let mut h = start();
    let mut s = TcpStream::connect(&h.addr).unwrap();
    let (session, _) = open_session(&mut s, 1 << 20);
    let header = Header {
        session_id: session,
        message_id: 1,
        ..Header::new(Command::Abort)
    };
    send(
        &mut s,
        header,
        &Message::Abort(ferry::wire::Abort {
            code: ferry::wire::AbortCode::Protocol,
            message: "bye\n2026-12-03T00:00:00Z  INFO forged line \u{1b}[2J".into(),
        }),
    );
    let error = h.next_session().report.error.unwrap();
    assert!(!error.chars().any(char::is_control), "{error:?}");
    assert!(error.contains("bye\\n2026"), "{error}");
}
