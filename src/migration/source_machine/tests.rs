//! The source machine's rules, one at a time (the simulation checks them
//! together on thousands of schedules).

use super::*;
use crate::page::{PageIndex, PageRun};
use crate::wire::{BatchAck, Ready, RoundEnd, MAX_CREDITS};

fn machine(channels: u16, credits: u16) -> (SourceMachine, Instant) {
    let now = Instant::now();
    let c = vec![Credits::new(credits).unwrap(); channels.into()];
    (SourceMachine::new(9, &c, Duration::from_secs(1), now), now)
}

fn pages(n: u64) -> DirtySnapshot {
    DirtySnapshot::all(n)
}

fn ack(id: u64, grant: u16) -> (Header, Message) {
    let h = Header {
        credit_grant: grant,
        ..Header::new(Command::BatchAck)
    };
    (
        h,
        Message::BatchAck(BatchAck {
            message_id: id,
            pages: 1,
        }),
    )
}

/// Takes and begins the next batch on `chan`, returning its header.
fn send(m: &mut SourceMachine, chan: ChannelId, gen: u32) -> Header {
    let Next::Work(w) = m.next_work(chan, gen) else {
        panic!("no work")
    };
    match m.begin_batch(chan, gen, w, 1, 100) {
        Begin::Send(h) => h,
        other => panic!("{other:?}"),
    }
}

#[test]
fn batches_split_by_size_and_wait_for_credit() {
    let (mut m, now) = machine(1, 1);
    assert_eq!(m.enqueue(&pages(10), 0, 4), 10);
    let h = send(&mut m, ChannelId(0), 0);
    assert_eq!((h.message_id, h.flags), (1, 0));
    let Next::Work(w) = m.next_work(ChannelId(0), 0) else {
        panic!()
    };
    assert_eq!(w.job().runs, vec![PageRun::new(PageIndex(4), 4)]);
    let Begin::NoCredit(w) = m.begin_batch(ChannelId(0), 0, w, 4, 10) else {
        panic!()
    };
    let (h, a) = ack(1, 1);
    assert_eq!(
        m.handle_frame(now, ChannelId(0), 0, &h, a).unwrap(),
        Handled::Acked {
            pages: 1,
            bytes: 100,
            once: Some(BatchJob {
                round: 0,
                runs: vec![PageRun::new(PageIndex(0), 4)]
            })
        }
    );
    assert!(matches!(
        m.begin_batch(ChannelId(0), 0, w, 4, 10),
        Begin::Send(_)
    ));
    m.check().unwrap();
}

#[test]
fn a_grant_past_the_window_and_a_stray_ack_are_the_peers_errors() {
    let (mut m, now) = machine(2, MAX_CREDITS);
    m.enqueue(&pages(2), 0, 1);
    let first = send(&mut m, ChannelId(0), 0);
    let (h, a) = ack(first.message_id, 2);
    assert!(
        m.handle_frame(now, ChannelId(0), 0, &h, a).is_err(),
        "window overflows"
    );
    let second = send(&mut m, ChannelId(1), 0);
    let (h, a) = ack(second.message_id, 1);
    let e = m.handle_frame(now, ChannelId(0), 0, &h, a).unwrap_err();
    assert!(e.to_string().contains("not in flight on it"), "{e}");
}

#[test]
fn a_lost_connection_sends_its_batches_again_under_their_ids() {
    let (mut m, now) = machine(2, 4);
    m.enqueue(&pages(3), 0, 1);
    let ids: Vec<u64> = (0..3)
        .map(|_| send(&mut m, ChannelId(0), 0).message_id)
        .collect();
    assert!(m.handle_lost(now, ChannelId(0), 0));
    assert!(!m.handle_lost(now, ChannelId(0), 0), "once");
    assert_eq!(
        m.poll_transmit(),
        Some(Transmit::Rebind {
            chan: ChannelId(0),
            gen: 1
        })
    );
    assert!(matches!(m.next_work(ChannelId(0), 0), Next::Dead));
    let again: Vec<Header> = (0..3).map(|_| send(&mut m, ChannelId(1), 0)).collect();
    assert_eq!(again.iter().map(|h| h.message_id).collect::<Vec<_>>(), ids);
    assert!(again.iter().all(|h| h.flags == FLAG_RESEND));
    // An ack that arrives late on the dead connection counts for nothing.
    let (h, a) = ack(ids[0], 1);
    assert_eq!(
        m.handle_frame(now, ChannelId(0), 0, &h, a).unwrap(),
        Handled::Stale
    );
    assert_eq!(m.tallies().resent, 3);
    m.check().unwrap();
}

#[test]
fn control_messages_keep_to_one_connection_and_go_again_in_order() {
    let (mut m, now) = machine(2, 1);
    let end = |round| {
        Message::RoundEnd(RoundEnd {
            round,
            pages: 1,
            final_next: false,
        })
    };
    m.queue_control(end(0));
    let a = m.poll_control().unwrap();
    assert!(m.poll_control().is_none(), "one at a time");
    m.control_done(&a, true);
    // Channel 0 dies and comes back; channel 1 carries on meanwhile.
    m.queue_control(end(1));
    let b = m.poll_control().unwrap();
    assert_eq!(b.chan, ChannelId(0));
    m.control_done(&b, true);
    m.handle_lost(now, ChannelId(0), 0);
    m.handle_bound(now, ChannelId(0), 1, Credits::new(1).unwrap());
    // Both unanswered messages go again, in order, before anything new.
    m.queue_control(end(2));
    let again: Vec<ControlTx> = (0..3)
        .map(|_| {
            let t = m.poll_control().unwrap();
            m.control_done(&t, true);
            t
        })
        .collect();
    let ids: Vec<u64> = again.iter().map(|t| t.header.message_id).collect();
    assert_eq!(&ids[..2], &[a.header.message_id, b.header.message_id]);
    assert_eq!(
        again.iter().map(|t| t.header.flags).collect::<Vec<_>>(),
        [FLAG_RESEND, FLAG_RESEND, 0]
    );
    // They all went on the connection that took over, not back to channel 0.
    assert!(again
        .iter()
        .all(|t| (t.chan, t.gen) == (again[0].chan, again[0].gen)));
    // A READY proves everything before it arrived.
    let h = Header::new(Command::Ready);
    m.handle_frame(
        now,
        again[0].chan,
        again[0].gen,
        &h,
        Message::Ready(Ready { digest: 1 }),
    )
    .unwrap();
    m.handle_lost(now, again[0].chan, again[0].gen);
    assert!(!m.control_pending());
}

#[test]
fn silence_kills_a_connection_that_owes_and_idleness_gets_a_keepalive() {
    let (mut m, now) = machine(2, 2);
    m.enqueue(&pages(1), 0, 1);
    send(&mut m, ChannelId(0), 0);
    let later = now + Duration::from_millis(1_500);
    m.handle_timeout(later, &[0, 0]);
    assert!(!m.is_live(ChannelId(0), 0), "owed an ack for 1.5 s");
    assert!(m.is_live(ChannelId(1), 0));
    let mut echoes = 0;
    while let Some(t) = m.poll_transmit() {
        echoes += usize::from(matches!(
            t,
            Transmit::Echo {
                chan: ChannelId(1),
                ..
            }
        ));
    }
    assert_eq!(echoes, 1);
    // With every channel dead past the timeout, the session gives up.
    m.handle_lost(later, ChannelId(1), 0);
    m.handle_timeout(later + Duration::from_millis(1_200), &[0, 0]);
    assert!(m.gave_up());
    assert!(matches!(
        m.poll_event(),
        Some(SourceEvent::Failed(MigrationError::SessionLost(_)))
    ));
}
