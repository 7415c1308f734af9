//! A reference to a page the receiver does not hold with the named content
//! ends the session naming both pages; one to a page it holds is applied.

use super::*;
use ferry::digest::ref_tag;
use ferry::wire::Read as PageRead;

/// Sends page `page` of a 256-page guest as batch `id`: filled with 1s, or
/// a reference to `target` naming `hash`.
fn send_page(s: &mut TcpStream, session: u64, id: u64, page: u64, same: Option<(u64, u64)>) {
    let batch = BatchEncoder::new()
        .encode_refs(
            0,
            Codec::None,
            &[ferry::page::PageRun::new(PageIndex(page), 1)],
            true,
            |_, buf| match same {
                Some((target, hash)) => PageRead::Same {
                    target: PageIndex(target),
                    hash,
                },
                None => {
                    buf.fill(1);
                    PageRead::Data
                }
            },
        )
        .unwrap();
    let header = Header {
        session_id: session,
        message_id: id,
        credit_request: 1,
        ..Header::new(Command::PageBatch)
    };
    s.write_all(&encode_frame(&header, &batch.payload)).unwrap();
}

#[test]
fn a_reference_to_content_the_receiver_does_not_hold_ends_the_session() {
    let mut h = start();
    let mut s = TcpStream::connect(&h.addr).unwrap();
    let (session, secret) = open_session(&mut s, 1 << 20);
    let ones = ref_tag(&secret.refs_key(session), &[1u8; 4096]);
    // As a source does: a reference only to a page whose batch is
    // acknowledged.
    send_page(&mut s, session, 1, 10, None);
    for (id, same) in [(1, None), (2, Some((10, ones)))] {
        if same.is_some() {
            send_page(&mut s, session, id, 20, same);
        }
        match recv(&mut s) {
            Some((_, Message::BatchAck(a))) => assert_eq!(a.message_id, id),
            other => panic!("expected the ack of batch {id}, got {other:?}"),
        }
    }
    // A tag made without the session's key is refused, as is one naming
    // the 1s for page 30, which holds nothing.
    send_page(
        &mut s,
        session,
        3,
        40,
        Some((10, ref_tag(&[0; 32], &[1u8; 4096]))),
    );
    let text = abort_text(recv(&mut s));
    assert!(
        text.contains("page 40 was sent as a reference to page 10"),
        "{text}"
    );
    let mut s = TcpStream::connect(&h.addr).unwrap();
    let (session, secret) = open_session(&mut s, 1 << 20);
    let ones = ref_tag(&secret.refs_key(session), &[1u8; 4096]);
    send_page(&mut s, session, 1, 40, Some((30, ones)));
    let text = abort_text(recv(&mut s));
    assert!(
        text.contains("page 40 was sent as a reference to page 30"),
        "{text}"
    );
    for _ in 0..2 {
        let incoming = h.next_session();
        assert_eq!(incoming.report.outcome, Outcome::Failed);
        assert!(
            incoming.guest.is_none(),
            "nothing runs from a failed session"
        );
    }
}
