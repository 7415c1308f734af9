//! A patch of a region the receiver does not hold with the named content,
//! or one whose ops build no page, ends the session naming the page and the
//! region; one of a region it holds is applied.

use super::*;
use ferry::digest::ref_tag;
use ferry::wire::Read as PageRead;

/// Sends page `page` of a 256-page guest as batch `id`: filled with 1s, or
/// a patch of the region at byte `base` naming `tag`, made of `ops`.
fn send_page(
    s: &mut TcpStream,
    session: u64,
    id: u64,
    page: u64,
    patch: Option<(u64, u64, &[u8])>,
) {
    let batch = BatchEncoder::new()
        .encode_refs(
            0,
            Codec::None,
            &[ferry::page::PageRun::new(PageIndex(page), 1)],
            true,
            |_, buf| match patch {
                Some((base, tag, ops)) => {
                    buf[..ops.len()].copy_from_slice(ops);
                    PageRead::Patch {
                        base,
                        tag,
                        len: ops.len(),
                    }
                }
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

fn acked(s: &mut TcpStream, id: u64) {
    match recv(s) {
        Some((_, Message::BatchAck(a))) => assert_eq!(a.message_id, id),
        other => panic!("expected the ack of batch {id}, got {other:?}"),
    }
}

/// A patch that copies the region whole, then sets its last byte to 7.
const OPS: [u8; 9] = [0, 0, 0xff, 0x0f, 1, 0, 7, 0, 0];

#[test]
fn a_patch_of_content_the_receiver_does_not_hold_ends_the_session() {
    let mut h = start();
    let mut s = TcpStream::connect(&h.addr).unwrap();
    let (session, secret) = open_session(&mut s, 1 << 20);
    let key = secret.refs_key(session);
    let ones = ref_tag(&key, &[1u8; 4096]);
    // Pages 10 and 11 hold 1s; a region across them is 1s too.
    send_page(&mut s, session, 1, 10, None);
    acked(&mut s, 1);
    send_page(&mut s, session, 2, 11, None);
    acked(&mut s, 2);
    let base = 10 * 4096 + 100;
    send_page(&mut s, session, 3, 20, Some((base, ones, &OPS)));
    acked(&mut s, 3);
    // A tag made without the session's key is refused.
    let forged = ref_tag(&[0; 32], &[1u8; 4096]);
    send_page(&mut s, session, 4, 40, Some((base, forged, &OPS)));
    let text = abort_text(recv(&mut s));
    assert!(
        text.contains(&format!(
            "page 40 was sent as a patch of the region at byte {base}"
        )) && text.contains("does not hold that content"),
        "{text}"
    );
    // Ops that reach past the page's end, over a region it holds.
    let mut s = TcpStream::connect(&h.addr).unwrap();
    let (session, secret) = open_session(&mut s, 1 << 20);
    let ones = ref_tag(&secret.refs_key(session), &[1u8; 4096]);
    send_page(&mut s, session, 1, 10, None);
    acked(&mut s, 1);
    send_page(
        &mut s,
        session,
        2,
        40,
        Some((10 * 4096, ones, &[0, 0, 1, 16])),
    );
    let text = abort_text(recv(&mut s));
    assert!(text.contains("past the page's end"), "{text}");
    for _ in 0..2 {
        let incoming = h.next_session();
        assert_eq!(incoming.report.outcome, Outcome::Failed);
        assert!(
            incoming.guest.is_none(),
            "nothing runs from a failed session"
        );
    }
}
