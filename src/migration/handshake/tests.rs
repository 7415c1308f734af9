//! The handshake machine's steps, one answer at a time.

use super::*;
use crate::codec::Codec;
use crate::wire::{Abort, AbortCode, Ready};

const KEY: &[u8] = b"a shared key of the cluster";

fn key() -> SessionKey {
    SessionKey(KEY.to_vec())
}

fn source(key: Option<SessionKey>) -> SourceHandshake {
    let setup = SessionSetup::plain(1 << 20, 2);
    SourceHandshake::new(
        setup,
        CodecChoice::Fixed(Codec::Lz4),
        key,
        [1; 16],
        Vec::new(),
    )
}

fn answer(codecs: u32) -> Message {
    Message::NegotiateResponse(NegotiateResponse {
        version: VERSION,
        capabilities: 0,
        codecs,
        page_size: PAGE_SIZE as u32,
        nonce: [2; 16],
    })
}

/// The setup the source sent, answered as a destination holding `key`.
fn setup_answer(hs: &mut SourceHandshake, key: Option<&SessionKey>, credits: u16) -> Message {
    let Some((_, Message::SessionSetup(setup))) = hs.poll_transmit() else {
        panic!("the setup is due");
    };
    let h = auth::Handshake {
        source_nonce: &[1; 16],
        dest_nonce: &[2; 16],
        negotiation: &hs.negotiation,
        binding: &[],
    };
    if let Some(k) = key {
        assert!(
            auth::verify_setup_proof(k, &h, &setup),
            "the setup is proved"
        );
    }
    Message::SessionSetupResponse(setup_response(key, &h, 9, &[3; 16], (credits, false)))
}

fn header(session_id: u64) -> Header {
    Header {
        session_id,
        ..Header::new(Command::SessionSetupResponse)
    }
}

#[test]
fn a_keyed_handshake_negotiates_proves_both_ways_and_yields_the_bind_secret() {
    let mut hs = source(Some(key()));
    let Some((h, Message::Negotiate(n))) = hs.poll_transmit() else {
        panic!("NEGOTIATE goes first");
    };
    assert_eq!(h.command, Command::Negotiate);
    assert_eq!(n.codecs & CodecId::Lz4.bit(), CodecId::Lz4.bit());
    assert!(
        hs.poll_transmit().is_none(),
        "nothing more before the answer"
    );
    assert_eq!(hs.awaiting(), Some("NEGOTIATE_RESPONSE"));
    let all = CodecId::None.bit() | CodecId::Lz4.bit() | CodecId::Zstd.bit();
    assert!(hs
        .handle(&Header::new(Command::NegotiateResponse), answer(all))
        .unwrap()
        .is_none());
    let reply = setup_answer(&mut hs, Some(&key()), 4);
    let done = hs.handle(&header(9), reply).unwrap().expect("set up");
    assert_eq!((done.session_id, done.initial_credits), (9, 4));
    assert!(done.authenticated);
    let theirs = BindSecret::derive(Some(&key()), &[1; 16], &[2; 16], 9, &[3; 16]);
    let b = auth::Bind {
        session_id: 9,
        channel: crate::wire::ChannelId(1),
        nonce: &[4; 16],
        binding: &[],
    };
    assert_eq!(done.secret.bind_proof(&b), theirs.bind_proof(&b));
    assert_eq!(hs.awaiting(), None);
    assert!(!done.delta);
}

/// A handshake whose setup offers a delta base (or not), answered with the
/// destination taking one.
fn delta_answered(offer: bool) -> Result<Established, MigrationError> {
    let mut setup = SessionSetup::plain(1 << 20, 2);
    setup.base = offer.then(|| crate::wire::DeltaBase {
        migration_id: "m-1".into(),
        digest: 7,
    });
    let mut hs = SourceHandshake::new(
        setup,
        CodecChoice::Fixed(Codec::Lz4),
        Some(key()),
        [1; 16],
        Vec::new(),
    );
    hs.poll_transmit();
    let all = CodecId::None.bit() | CodecId::Lz4.bit();
    hs.handle(&Header::new(Command::NegotiateResponse), answer(all))
        .unwrap();
    let Some((_, Message::SessionSetup(sent))) = hs.poll_transmit() else {
        panic!("the setup is due");
    };
    assert_eq!(sent.base.is_some(), offer);
    let h = auth::Handshake {
        source_nonce: &[1; 16],
        dest_nonce: &[2; 16],
        negotiation: &hs.negotiation.clone(),
        binding: &[],
    };
    assert!(
        auth::verify_setup_proof(&key(), &h, &sent),
        "the base is proved"
    );
    let reply = setup_response(Some(&key()), &h, 9, &[3; 16], (4, true));
    hs.handle(&header(9), Message::SessionSetupResponse(reply))
        .map(|done| done.expect("set up"))
}

#[test]
fn a_delta_is_taken_only_when_the_setup_offered_one() {
    assert!(delta_answered(true).unwrap().delta);
    let e = delta_answered(false).unwrap_err();
    assert!(
        matches!(e, MigrationError::Protocol(Violation::DeltaUnoffered)),
        "{e}"
    );
}

#[test]
fn an_answer_for_another_session_or_another_key_is_refused() {
    for (session, k) in [(10, key()), (9, SessionKey(b"another key".to_vec()))] {
        let mut hs = source(Some(key()));
        hs.poll_transmit();
        let all = CodecId::None.bit() | CodecId::Lz4.bit();
        hs.handle(&Header::new(Command::NegotiateResponse), answer(all))
            .unwrap();
        let Some((_, Message::SessionSetup(setup))) = hs.poll_transmit() else {
            panic!("the setup is due");
        };
        assert!(setup.proof.is_some());
        let negotiation = hs.negotiation;
        let h = auth::Handshake {
            source_nonce: &[1; 16],
            dest_nonce: &[2; 16],
            negotiation: &negotiation,
            binding: &[],
        };
        let reply =
            Message::SessionSetupResponse(setup_response(Some(&k), &h, 9, &[3; 16], (4, false)));
        let e = hs.handle(&header(session), reply).unwrap_err();
        assert!(
            matches!(e, MigrationError::Unauthenticated(AuthFailure::Destination)),
            "{e}"
        );
    }
}

#[test]
fn a_codec_the_destination_cannot_decode_or_another_version_ends_it() {
    let mut hs = source(None);
    hs.poll_transmit();
    let e = hs
        .handle(
            &Header::new(Command::NegotiateResponse),
            answer(CodecId::None.bit()),
        )
        .unwrap_err();
    assert!(matches!(e, MigrationError::Incompatible(_)), "{e}");
    assert!(
        hs.poll_transmit().is_none(),
        "a failed handshake sends nothing"
    );
    let mut hs = source(None);
    hs.poll_transmit();
    let mut r = answer(u32::MAX);
    if let Message::NegotiateResponse(n) = &mut r {
        n.version = VERSION + 1;
    }
    let e = hs
        .handle(&Header::new(Command::NegotiateResponse), r)
        .unwrap_err();
    assert!(e.to_string().contains("version"), "{e}");
}

#[test]
fn credits_outside_the_window_an_abort_or_another_message_end_it() {
    for credits in [0, MAX_CREDITS + 1] {
        let mut hs = source(None);
        hs.poll_transmit();
        hs.handle(&Header::new(Command::NegotiateResponse), answer(u32::MAX))
            .unwrap();
        let reply = setup_answer(&mut hs, None, credits);
        let e = hs.handle(&header(9), reply).unwrap_err();
        assert!(matches!(e, MigrationError::Protocol(_)), "{e}");
    }
    let mut hs = source(None);
    hs.poll_transmit();
    let abort = Message::Abort(Abort {
        code: AbortCode::Resources,
        message: "no room".into(),
    });
    let e = hs.handle(&Header::new(Command::Abort), abort).unwrap_err();
    assert!(e.to_string().contains("no room"), "{e}");
    let mut hs = source(None);
    hs.poll_transmit();
    let ready = Message::Ready(Ready { digest: 0 });
    let e = hs.handle(&Header::new(Command::Ready), ready).unwrap_err();
    assert!(e.to_string().contains("NEGOTIATE_RESPONSE"), "{e}");
}

#[test]
fn the_destination_takes_a_setup_only_proved_or_as_its_policy_allows() {
    let (lo, far) = (("127.0.0.1:7000", true), ("10.0.0.1:7000", false));
    let h = auth::Handshake {
        source_nonce: &[1; 16],
        dest_nonce: &[2; 16],
        negotiation: &[],
        binding: &[],
    };
    let mut setup = SessionSetup::plain(1 << 20, 1);
    setup.flags = SETUP_FRAME_MAC;
    setup.proof = Some(auth::setup_proof(&key(), &h, &setup));
    let taken = check_setup(Some(&key()), Unauthenticated::Refuse, lo, &setup, &h);
    assert_eq!(taken.unwrap(), Taken::Proved);
    let other = SessionKey(b"another key".to_vec());
    let e = check_setup(Some(&other), Unauthenticated::Refuse, lo, &setup, &h);
    assert!(matches!(
        e,
        Err(MigrationError::Unauthenticated(AuthFailure::WrongKey))
    ));
    let e = check_setup(None, Unauthenticated::Anywhere, lo, &setup, &h);
    assert!(matches!(
        e,
        Err(MigrationError::Unauthenticated(AuthFailure::NoKeyToCheck))
    ));
    let plain = SessionSetup::plain(1 << 20, 1);
    let e = check_setup(Some(&key()), Unauthenticated::Anywhere, lo, &plain, &h);
    assert!(matches!(
        e,
        Err(MigrationError::Unauthenticated(AuthFailure::KeyRequired))
    ));
    for (policy, at, ok) in [
        (Unauthenticated::Loopback, lo, true),
        (Unauthenticated::Loopback, far, false),
        (Unauthenticated::Anywhere, far, true),
        (Unauthenticated::Refuse, lo, false),
    ] {
        let r = check_setup(None, policy, at, &plain, &h);
        assert_eq!(r.is_ok(), ok, "{policy:?} from {at:?}");
    }
}

#[test]
fn a_bind_answer_is_taken_only_proved_with_credits_in_the_window() {
    let secret = BindSecret::derive(Some(&key()), &[1; 16], &[2; 16], 9, &[3; 16]);
    let ch = crate::wire::ChannelId(2);
    let bind = SourceBind::new(9, ch, [4; 16], Vec::new(), true);
    let (h, Message::ChannelBind(req)) = bind.request(&secret) else {
        panic!("a bind goes out");
    };
    let mut nonces = std::collections::HashSet::new();
    for (credits, ok) in [
        (4, true),
        (0, false),
        (MAX_CREDITS, true),
        (MAX_CREDITS + 1, false),
    ] {
        nonces.clear();
        let mut check = BindCheck {
            secret: &secret,
            channels: 3,
            nonces: &mut nonces,
            frame_mac: true,
            credits,
        };
        let (answer, theirs) = check.check(&h, &req, &[]).expect("a proved bind");
        let header = Header {
            credit_grant: credits,
            ..Header::new(Command::ChannelBindResponse)
        };
        let r = bind.handle(&secret, &header, Message::ChannelBindResponse(answer));
        assert_eq!(r.is_ok(), ok, "{credits} credits: {r:?}");
        if let Ok(ours) = r {
            let k = |d: &BindDone| d.frame_keys.as_ref().map(|k| (k.to_dest, k.to_source));
            assert_eq!(k(&ours), k(&theirs));
        }
    }
    // The same nonce again is a replay; a channel the session lacks is refused.
    let mut check = BindCheck {
        secret: &secret,
        channels: 3,
        nonces: &mut nonces,
        frame_mac: true,
        credits: 4,
    };
    let e = check.check(&h, &req, &[]).unwrap_err();
    assert!(
        matches!(
            e,
            MigrationError::Unauthenticated(AuthFailure::BindReplay { .. })
        ),
        "{e}"
    );
    let far = Header {
        channel: crate::wire::ChannelId(3),
        ..h
    };
    assert!(matches!(
        check.check(&far, &req, &[]),
        Err(MigrationError::Protocol(_))
    ));
}

#[test]
fn auto_asks_for_the_kept_stream_and_uses_it_only_if_the_destination_decodes_it() {
    let stream = CodecId::ZstdStream.bit();
    let needed = CodecId::None.bit() | CodecId::Lz4.bit() | CodecId::Zstd.bit();
    for (answered, has) in [(needed | stream, true), (needed, false)] {
        let mut hs = SourceHandshake::new(
            SessionSetup::plain(1 << 20, 2),
            CodecChoice::Auto,
            None,
            [1; 16],
            Vec::new(),
        );
        let Some((_, Message::Negotiate(n))) = hs.poll_transmit() else {
            panic!("NEGOTIATE goes first");
        };
        assert_eq!(n.codecs, needed | stream, "asked for, not needed");
        hs.handle(&Header::new(Command::NegotiateResponse), answer(answered))
            .expect("a destination without the stream still takes auto");
        let reply = setup_answer(&mut hs, None, 4);
        let done = hs.handle(&header(9), reply).unwrap().expect("set up");
        assert_eq!(done.codecs & stream != 0, has);
    }
    // A fixed kept stream needs it.
    let mut hs = SourceHandshake::new(
        SessionSetup::plain(1 << 20, 2),
        CodecChoice::Fixed(Codec::ZstdStream { level: 1 }),
        None,
        [1; 16],
        Vec::new(),
    );
    hs.poll_transmit();
    assert!(hs
        .handle(&Header::new(Command::NegotiateResponse), answer(needed))
        .is_err());
}
