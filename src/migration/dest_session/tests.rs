use super::*;
use crate::wire::{AbortCode, Command, Negotiate, RoundEnd, SessionSetup, VerifyMode, FLAG_RESEND};
use crate::wire::{PAGE_SIZE, VERSION};
use bytes::Bytes;

const IDLE: Duration = Duration::from_secs(10);

fn session(channels: u16, leave_paused: bool) -> (DestSession, Instant) {
    let mut m = DestMachine::new(1 << 30);
    m.handle_negotiate(&Negotiate {
        min_version: VERSION,
        max_version: VERSION,
        capabilities: 0,
        codecs: 7,
        page_size: PAGE_SIZE as u32,
        nonce: [0; 16],
    })
    .unwrap();
    m.handle_setup(&SessionSetup::plain(1 << 20, channels))
        .unwrap();
    let t0 = Instant::now();
    let params = DestParams {
        channels,
        idle_timeout: IDLE,
        leave_paused,
    };
    (DestSession::new(m, params, t0, t0), t0)
}

fn header(command: Command, channel: u16, id: u64, resend: bool) -> Header {
    Header {
        channel: ChannelId(channel),
        message_id: id,
        flags: if resend { FLAG_RESEND } else { 0 },
        ..Header::new(command)
    }
}

fn round_end(round: u32, final_next: bool) -> Message {
    Message::RoundEnd(RoundEnd {
        round,
        pages: 1,
        final_next,
    })
}

fn switchover(final_round: u32, digest: u64) -> Switchover {
    Switchover {
        final_round,
        digest,
        verify: VerifyMode::Fast,
        rounds: final_round,
        dirty_rate_bps: 0,
        throttle_pct_max: 0,
        source_cpu_ms: 0,
        state: Bytes::new(),
    }
}

fn sent(s: &mut DestSession) -> Vec<Reply> {
    std::iter::from_fn(|| s.poll_transmit()).collect()
}

/// Runs a bound session to READY: ROUND_END(0, final next), SWITCHOVER(1).
fn to_ready(s: &mut DestSession, t0: Instant) {
    s.handle_control(
        t0,
        &header(Command::RoundEnd, 0, 10, false),
        round_end(0, true),
    );
    let sw = switchover(1, 42);
    let at = t0 + Duration::from_millis(100);
    s.handle_control(
        at,
        &header(Command::Switchover, 1, 11, false),
        Message::Switchover(sw.clone()),
    );
    assert_eq!(s.poll_event(), Some(DestEvent::Verify(sw.clone())));
    assert!(s.handle_digest(&sw, 42));
    s.ready();
}

#[test]
fn a_session_goes_through_ready_go_and_complete_then_lingers() {
    let (mut s, t0) = session(2, false);
    s.handle_bound(t0, ChannelId(0), 1);
    assert_eq!(s.tallies().setup, None, "one channel of two bound");
    s.handle_bound(t0 + Duration::from_millis(3), ChannelId(1), 1);
    assert_eq!(s.tallies().setup, Some(Duration::from_millis(3)));
    to_ready(&mut s, t0);
    let ready = sent(&mut s);
    assert_eq!(ready.len(), 1);
    assert_eq!(ready[0].on, ChannelId(1), "answered where it was asked");
    assert!(matches!(ready[0].msg, Message::Ready(Ready { digest: 42 })));
    // SWITCHOVER sent again (its channel failed): READY again, no new step.
    let again = header(Command::Switchover, 0, 11, true);
    s.handle_control(t0, &again, Message::Switchover(switchover(1, 42)));
    assert_eq!(
        sent(&mut s),
        vec![Reply {
            on: ChannelId(0),
            ..ready[0].clone()
        }]
    );
    assert_eq!(s.poll_event(), None);

    let go_at = t0 + Duration::from_millis(130);
    s.handle_control(go_at, &header(Command::Go, 0, 12, false), Message::Go);
    assert_eq!(s.poll_event(), Some(DestEvent::Go { resume: true }));
    assert_eq!(s.state(), DestState::Running);
    s.handle_resumed(go_at);
    s.complete(go_at, 7);
    assert_eq!(s.tallies().downtime, Duration::from_millis(130));
    assert_eq!(s.tallies().finished, Some(Duration::from_millis(130)));
    let complete = sent(&mut s);
    assert!(matches!(
        complete[..],
        [Reply {
            on: ChannelId(0),
            msg: Message::Complete(Complete {
                destination_cpu_ms: 7,
                resumed: true
            })
        }]
    ));
    assert!(matches!(s.outcome(), Some(Ok(()))));
    assert!(!s.is_ended(), "lingers for a GO sent again");
    // A GO sent again while lingering gets COMPLETE again.
    s.handle_control(go_at, &header(Command::Go, 1, 12, true), Message::Go);
    assert_eq!(sent(&mut s)[0].msg, complete[0].msg);
    assert_eq!(s.poll_timeout(), Some(go_at + IDLE + LINGER));
    s.handle_timeout(go_at + IDLE + LINGER, 0);
    assert!(s.is_ended());
    assert!(s.completed().is_none(), "a linger run out leaves nothing");
    assert!(matches!(s.take_outcome(), Some(Ok(()))));
}

#[test]
fn the_linger_ends_when_the_source_closes_every_channel() {
    let (mut s, t0) = session(2, true);
    s.handle_bound(t0, ChannelId(0), 1);
    s.handle_bound(t0, ChannelId(1), 1);
    to_ready(&mut s, t0);
    s.handle_control(t0, &header(Command::Go, 0, 12, false), Message::Go);
    assert_eq!(s.poll_event(), Some(DestEvent::Go { resume: false }));
    s.complete(t0, 0);
    let closed = |c| MigrationError::PeerClosed {
        channel: ChannelId(c),
    };
    s.handle_lost(t0, ChannelId(0), 1, closed(0));
    assert!(!s.is_ended());
    // A violation after COMPLETE changes nothing: the guest is ours.
    s.handle_control(t0, &header(Command::Go, 1, 99, false), Message::Go);
    s.handle_lost(t0, ChannelId(1), 1, closed(1));
    assert!(s.is_ended());
    assert!(matches!(s.outcome(), Some(Ok(()))));
    // What it leaves answers the same GO, sent again, until the linger's
    // full deadline, and nothing else.
    let left = s.completed().expect("a record of COMPLETE");
    assert_eq!(left.until(), t0 + IDLE + LINGER);
    let again = header(Command::Go, 0, 12, true);
    assert!(matches!(
        left.answer(t0, &again, &Message::Go),
        Some(Message::Complete(_))
    ));
    assert_eq!(
        left.answer(t0, &header(Command::Go, 0, 99, true), &Message::Go),
        None
    );
    assert_eq!(
        s.tallies().failures,
        0,
        "closing after COMPLETE is no failure"
    );
}

#[test]
fn silence_on_every_channel_ends_the_session_and_tells_the_source() {
    let (mut s, t0) = session(1, false);
    s.handle_bound(t0, ChannelId(0), 1);
    // Bytes keep moving: the watchdog waits.
    let mut now = t0;
    for bytes in 1..=30u64 {
        now = s.poll_timeout().unwrap();
        s.handle_timeout(now, bytes);
    }
    assert!(!s.is_ended(), "bytes moved every check");
    // Then none for the idle timeout: at most a period past it.
    let quiet_from = now;
    while !s.is_ended() {
        now = s.poll_timeout().unwrap();
        s.handle_timeout(now, 30);
    }
    let waited = now - quiet_from;
    assert!(
        waited >= IDLE && waited <= IDLE + Duration::from_secs(1),
        "{waited:?}"
    );
    assert!(matches!(
        s.outcome(),
        Some(Err(MigrationError::Timeout { .. }))
    ));
    let abort = sent(&mut s);
    assert!(matches!(
        &abort[..],
        [Reply { on: ChannelId::CONTROL, msg: Message::Abort(a) }] if a.code == AbortCode::Timeout
    ));
    assert_eq!(s.poll_timeout(), None);
}

#[test]
fn silence_after_a_lost_channel_names_the_loss() {
    let (mut s, t0) = session(2, false);
    s.handle_bound(t0, ChannelId(0), 1);
    s.handle_bound(t0, ChannelId(1), 1);
    let lost = MigrationError::ChannelLost {
        channel: ChannelId(1),
        why: crate::migration::ChannelLoss::Reset,
    };
    s.handle_lost(t0, ChannelId(1), 1, lost);
    assert!(!s.is_ended(), "the source rebinds a lost channel");
    assert_eq!(s.tallies().failures, 1);
    assert!(!s.is_current(ChannelId(1), 1));
    s.handle_bound(t0, ChannelId(1), 2);
    assert_eq!(s.tallies().rebinds, 1);
    assert!(s.is_current(ChannelId(1), 2));
    s.handle_lost(
        t0,
        ChannelId(1),
        1,
        MigrationError::PeerClosed {
            channel: ChannelId(1),
        },
    );
    assert!(
        s.is_current(ChannelId(1), 2),
        "an old connection's end changes nothing"
    );
    while let Some(next) = s.poll_timeout() {
        s.handle_timeout(next, 0);
    }
    let e = s.take_outcome().unwrap().unwrap_err();
    assert!(
        matches!(e, MigrationError::SessionLost(SessionLoss::Silent { ref lost, .. }) if lost.contains("closed channel 1")),
        "{e}"
    );
}

#[test]
fn a_failure_before_go_aborts_but_never_after() {
    // The peer's violation on a channel ends the session with an ABORT.
    let (mut s, t0) = session(1, false);
    s.handle_bound(t0, ChannelId(0), 1);
    let dup = Violation::Duplicate {
        channel: ChannelId(0),
        id: 3,
        command: Command::PageBatch,
    };
    s.handle_lost(t0, ChannelId(0), 1, dup.into());
    assert!(s.is_ended());
    assert!(matches!(
        sent(&mut s)[..],
        [Reply {
            msg: Message::Abort(_),
            ..
        }]
    ));
    assert_eq!(s.state(), DestState::Aborted);

    // The source's own ABORT is not answered.
    let (mut s, t0) = session(1, false);
    s.handle_bound(t0, ChannelId(0), 1);
    let abort = Message::Abort(Abort {
        code: AbortCode::Cancelled,
        message: "stop".into(),
    });
    s.handle_control(t0, &header(Command::Abort, 0, 5, false), abort);
    assert!(matches!(
        s.outcome(),
        Some(Err(MigrationError::RemoteAbort { .. }))
    ));
    assert!(sent(&mut s).is_empty());

    // After GO: the guest is ours; a local fault ends the session quietly.
    let (mut s, t0) = session(1, false);
    s.handle_bound(t0, ChannelId(0), 1);
    to_ready(&mut s, t0);
    sent(&mut s);
    s.handle_control(t0, &header(Command::Go, 0, 12, false), Message::Go);
    s.fail(MigrationError::Internal(
        crate::migration::LocalFault::Unreachable("after GO"),
    ));
    assert_eq!(s.state(), DestState::Running);
    assert!(sent(&mut s).is_empty(), "nothing told after GO");
    assert!(matches!(s.outcome(), Some(Err(_))));
}

#[test]
fn a_repeat_without_the_resend_flag_or_a_wrong_digest_ends_it() {
    let (mut s, t0) = session(1, false);
    s.handle_bound(t0, ChannelId(0), 1);
    let end = header(Command::RoundEnd, 0, 10, false);
    s.handle_control(t0, &end, round_end(0, false));
    s.handle_control(t0, &end, round_end(0, false));
    assert!(matches!(
        s.outcome(),
        Some(Err(MigrationError::Protocol(Violation::Duplicate { .. })))
    ));

    let (mut s, t0) = session(1, false);
    s.handle_bound(t0, ChannelId(0), 1);
    s.handle_control(t0, &end, round_end(0, true));
    let sw = switchover(1, 42);
    s.handle_control(
        t0,
        &header(Command::Switchover, 0, 11, false),
        Message::Switchover(sw.clone()),
    );
    assert!(!s.handle_digest(&sw, 41));
    s.ready();
    let out = sent(&mut s);
    assert!(
        matches!(
            out[..],
            [Reply {
                msg: Message::Abort(_),
                ..
            }]
        ),
        "{out:?}"
    );
    assert!(matches!(
        s.outcome(),
        Some(Err(MigrationError::DigestMismatch { .. }))
    ));

    // GO before READY.
    let (mut s, t0) = session(1, false);
    s.handle_bound(t0, ChannelId(0), 1);
    s.handle_control(t0, &header(Command::Go, 0, 1, false), Message::Go);
    assert!(matches!(
        s.outcome(),
        Some(Err(MigrationError::Protocol(_)))
    ));
    assert_eq!(s.poll_event(), None);
}

#[test]
fn batches_are_claimed_once_and_only_in_their_rounds() {
    let (mut s, t0) = session(2, false);
    s.handle_bound(t0, ChannelId(0), 1);
    let batch = |id, resend| header(Command::PageBatch, 1, id, resend);
    let reading = Claim::Receiving {
        chan: ChannelId(1),
        gen: 1,
    };
    assert_eq!(
        s.claim_batch(&batch(20, false), 0, reading).unwrap(),
        Claimed::New
    );
    assert!(s.claim_batch(&batch(20, false), 0, reading).is_err());
    assert_eq!(
        s.claim_batch(&batch(20, true), 0, reading).unwrap(),
        Claimed::Repeat
    );
    assert_eq!(
        s.settle_resend(20, 0).unwrap(),
        Settle::Wait(Some((ChannelId(1), 1)))
    );
    // Its connection ended: the resend is applied.
    s.release(ChannelId(1), 1);
    assert_eq!(s.settle_resend(20, 0).unwrap(), Settle::Apply);
    s.set_claim(20, Some(Claim::Done { round: 0 }));
    let end = |id| header(Command::RoundEnd, 0, id, false);
    s.handle_control(t0, &end(2), round_end(0, false));
    assert_eq!(
        s.claims(),
        1,
        "the last round's ids are kept for late copies"
    );
    s.handle_control(t0, &end(3), round_end(1, false));
    assert_eq!(
        s.claims(),
        0,
        "round 0's ids are forgotten once round 2 began"
    );
    // A new batch of a round already over ends the session.
    assert!(s.claim_batch(&batch(21, false), 0, reading).is_err());
}

#[test]
fn a_late_close_after_complete_keeps_the_linger_for_a_rebind() {
    // COMPLETE was lost on a stalled path; the source gave up on the
    // connection after its peer timeout, closed it, and rebinds to send
    // GO again.
    let (mut s, t0) = session(1, false);
    s.handle_bound(t0, ChannelId(0), 1);
    to_ready(&mut s, t0);
    s.handle_control(t0, &header(Command::Go, 0, 12, false), Message::Go);
    assert_eq!(s.poll_event(), Some(DestEvent::Go { resume: true }));
    s.complete(t0, 0);
    sent(&mut s);
    let late = t0 + Duration::from_secs(1);
    let closed = MigrationError::PeerClosed {
        channel: ChannelId(0),
    };
    s.handle_lost(late, ChannelId(0), 1, closed);
    assert!(s.takes_binds(), "a late close may be a failover");
    assert!(s.completed().is_none(), "the session itself lingers");
    s.handle_bound(late, ChannelId(0), 2);
    s.handle_control(late, &header(Command::Go, 0, 12, true), Message::Go);
    assert!(matches!(
        sent(&mut s)[..],
        [Reply {
            msg: Message::Complete(_),
            ..
        }]
    ));
    // The source read it and closes at once: the linger ends.
    let closed = MigrationError::PeerClosed {
        channel: ChannelId(0),
    };
    s.handle_lost(late + Duration::from_millis(2), ChannelId(0), 2, closed);
    assert!(s.is_ended(), "{:?}", s.poll_timeout());
}

#[test]
fn a_bind_that_fails_ends_the_session_only_before_complete() {
    let (mut s, t0) = session(1, false);
    s.handle_bound(t0, ChannelId(0), 1);
    to_ready(&mut s, t0);
    s.handle_control(t0, &header(Command::Go, 0, 12, false), Message::Go);
    s.poll_event();
    s.complete(t0, 0);
    let closed = || MigrationError::PeerClosed {
        channel: ChannelId(0),
    };
    s.handle_bind_failed(closed());
    assert!(s.takes_binds(), "the source may bind again to send GO");
    let (mut s, t0) = session(1, false);
    s.handle_bound(t0, ChannelId(0), 1);
    s.handle_bind_failed(closed());
    assert!(s.is_ended());
    assert!(matches!(s.outcome(), Some(Err(_))));
}

#[test]
fn a_switchover_out_of_turn_ends_the_session_before_any_digest() {
    let (mut s, t0) = session(1, false);
    s.handle_bound(t0, ChannelId(0), 1);
    let sw = Message::Switchover(switchover(0, 42));
    s.handle_control(t0, &header(Command::Switchover, 0, 3, false), sw);
    assert_eq!(s.poll_event(), None, "no digest asked for");
    assert!(matches!(
        s.outcome(),
        Some(Err(MigrationError::Protocol(Violation::OutOfTurn { .. })))
    ));
}

#[test]
fn a_rebind_leaves_the_old_connections_claims_until_its_task_ends() {
    let (mut s, t0) = session(2, false);
    s.handle_bound(t0, ChannelId(1), 1);
    let reading = Claim::Receiving {
        chan: ChannelId(1),
        gen: 1,
    };
    let h = header(Command::PageBatch, 1, 30, false);
    assert_eq!(s.claim_batch(&h, 0, reading).unwrap(), Claimed::New);
    // The old connection may still be placing the batch's pages.
    s.handle_bound(t0, ChannelId(1), 2);
    assert_eq!(
        s.settle_resend(30, 0).unwrap(),
        Settle::Wait(Some((ChannelId(1), 1)))
    );
    s.release(ChannelId(1), 1);
    assert_eq!(s.settle_resend(30, 0).unwrap(), Settle::Apply);
}
