//! A source whose GO stalled gives up on that connection just as GO gets
//! through: its close lands right behind GO, the receiver takes it for an
//! orderly close and reports at once. The source rebinds and sends GO again:
//! what the completed session left answers it with COMPLETE, to a proved
//! bind only, until the linger's deadline.

use super::*;
use ferry::memory::{GuestMemory, SyntheticGuest, Workload};
use ferry::migration::MigratableGuest;
use ferry::wire::{Echo, RoundEnd, Switchover, VerifyMode, FLAG_RESEND};

const MEMORY: u64 = 1 << 20;

/// A paused guest of zero pages (what a receiver holds when no batch came):
/// its state and its memory's digest.
fn zero_guest() -> (bytes::Bytes, u64) {
    let mem = std::sync::Arc::new(GuestMemory::new(MEMORY).unwrap());
    let workload = Workload {
        pattern: WorkloadPattern::Idle,
        dirty_rate: 0,
        ..Workload::default()
    };
    let g = SyntheticGuest::start(mem.clone(), workload);
    g.pause();
    let state = MigratableGuest::save_state(&g).unwrap();
    (state.into(), ferry::digest::full_digest(&mem, 1))
}

/// Takes a one-channel session through READY, GO and COMPLETE on `s`;
/// returns the session, its bind secret and GO's message id.
fn to_complete(s: &mut TcpStream) -> (u64, BindSecret, u64) {
    send(s, Header::new(Command::Negotiate), &negotiate());
    let dest_nonce = match recv(s) {
        Some((_, Message::NegotiateResponse(r))) => r.nonce,
        other => panic!("expected NEGOTIATE_RESPONSE, got {other:?}"),
    };
    let setup = Message::SessionSetup(SessionSetup::plain(MEMORY, 1));
    send(s, Header::new(Command::SessionSetup), &setup);
    let (session, token) = match recv(s) {
        Some((h, Message::SessionSetupResponse(r))) => (h.session_id, r.bind_token),
        other => panic!("expected SESSION_SETUP_RESPONSE, got {other:?}"),
    };
    let secret = BindSecret::derive(None, &SOURCE_NONCE, &dest_nonce, session, &token);
    let header = |id| Header {
        session_id: session,
        message_id: id,
        ..Header::new(Command::Go)
    };
    let end = RoundEnd {
        round: 0,
        pages: 0,
        final_next: true,
    };
    send(s, header(1), &Message::RoundEnd(end));
    let (state, digest) = zero_guest();
    let switchover = Switchover {
        final_round: 1,
        digest,
        verify: VerifyMode::Full,
        rounds: 1,
        dirty_rate_bps: 0,
        throttle_pct_max: 0,
        source_cpu_ms: 0,
        state,
    };
    send(s, header(2), &Message::Switchover(switchover));
    assert!(matches!(recv(s), Some((_, Message::Ready(_)))));
    send(s, header(3), &Message::Go);
    assert!(matches!(recv(s), Some((_, Message::Complete(_)))));
    (session, secret, 3)
}

/// Binds channel 0 of `session` over `nonce` on a new connection; returns it
/// with the receiver's answer.
fn rebind(h: &Harness, session: u64, secret: &BindSecret, nonce: u8) -> (TcpStream, Message) {
    let mut s = TcpStream::connect(&h.addr).unwrap();
    bind(&mut s, session, ChannelId(0), secret, [nonce; 16]);
    let answer = recv(&mut s).expect("an answer to the bind").1;
    (s, answer)
}

#[test]
fn a_go_sent_again_after_an_early_report_gets_complete_until_the_linger_ends() {
    let mut h = start();
    let mut s = TcpStream::connect(&h.addr).unwrap();
    let (session, secret, go_id) = to_complete(&mut s);
    let completed_at = std::time::Instant::now();
    // The close right behind GO: the session reports at once.
    drop(s);
    let incoming = h.next_session();
    assert_eq!(incoming.report.outcome, Outcome::Completed);
    assert!(incoming.guest.is_some(), "the guest runs here");
    let go_again = Header {
        session_id: session,
        message_id: go_id,
        flags: FLAG_RESEND,
        ..Header::new(Command::Go)
    };

    // The source binds again and sends GO again: COMPLETE again.
    let (mut s, answer) = rebind(&h, session, &secret, 7);
    assert!(
        matches!(answer, Message::ChannelBindResponse(_)),
        "{answer:?}"
    );
    send(&mut s, go_again, &Message::Go);
    assert!(matches!(recv(&mut s), Some((_, Message::Complete(_)))));
    let echo = Header {
        session_id: session,
        ..Header::new(Command::Echo)
    };
    send(&mut s, echo, &Message::Echo(Echo { value: 5 }));
    assert!(matches!(recv(&mut s), Some((_, Message::EchoResponse(e))) if e.value == 5));

    // Only a proved bind reaches the record: a spent nonce does not.
    let (_, answer) = rebind(&h, session, &secret, 7);
    assert!(matches!(answer, Message::Abort(_)), "{answer:?}");

    // One connection per channel: a new bind of channel 0 stops the one
    // before it (a proved peer cannot pile connections up on a record).
    let (mut s2, answer) = rebind(&h, session, &secret, 9);
    assert!(
        matches!(answer, Message::ChannelBindResponse(_)),
        "{answer:?}"
    );
    assert!(closed_within(&mut s, Duration::from_secs(2)));
    send(&mut s2, go_again, &Message::Go);
    assert!(matches!(recv(&mut s2), Some((_, Message::Complete(_)))));

    // At the linger's deadline (the idle timeout, 1 s here, and 5 s) the
    // record's connection closes and the record is gone.
    let deadline = completed_at + Duration::from_secs(1) + ferry::migration::dest_session::LINGER;
    let left = deadline.saturating_duration_since(std::time::Instant::now());
    assert!(closed_within(&mut s2, left + Duration::from_secs(2)));
    let (_, answer) = rebind(&h, session, &secret, 8);
    let text = abort_text(Some((Header::new(Command::Abort), answer)));
    assert!(text.contains("unknown session"), "{text}");
    // Nothing else came of it: no second report.
    assert!(h.done.try_recv().is_err());
}
