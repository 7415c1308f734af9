//! Someone on the path between a source and a receiver without TLS: a proxy
//! that reads the frames, changes a page and fixes the CRC, and also fixes
//! the digests both ways so the switchover check agrees. Without a key the
//! frames carry a CRC only and the attack goes through (which is what the
//! README and the report say); with a key every frame is tagged and the
//! first changed frame ends the session, the guest kept on the source.

use super::common;
use super::*;
use ferry::digest::{page_hash, PageHashes};
use ferry::migration::auth::SessionKey;
use ferry::wire::{encode_header, PageBatch, HEADER_LEN, MAC_LEN, SETUP_FRAME_MAC};
use std::net::{Shutdown, TcpListener};
use std::sync::{Arc, Mutex};

/// What the proxy does to the session.
#[derive(Clone, Copy, PartialEq)]
enum Attack {
    /// Change the first raw page, and the digests to match.
    Page,
    /// Take the frame-authentication flag out of the setup.
    StripFlag,
    /// Point a later raw batch's run at pages already sent, and cut its
    /// connection before the batch's end (before its tag).
    RedirectAndCut,
    /// Grant one credit per channel instead of what the destination said:
    /// before frames are tagged, only the handshake's proofs cover it.
    Credits,
    /// Flip a capability the destination grants in NEGOTIATE_RESPONSE (a
    /// downgrade: dense pages taken away, or a grant made up).
    Capabilities,
    /// Forward every frame as it is.
    Nothing,
}

#[derive(Default)]
struct Seen {
    /// The session asked for tagged frames.
    mac: bool,
    /// The digest change the altered page makes, once made.
    delta: Option<u64>,
    /// Frames changed.
    changed: u32,
    /// The first single-run raw batch: its message id and first page.
    first_run: Option<(u64, u64)>,
    /// Whether the destination acknowledged it (applied it).
    first_acked: bool,
}

struct Frame {
    raw: [u8; HEADER_LEN],
    header: Header,
    payload: Vec<u8>,
    tag: Vec<u8>,
}

fn read_frame(s: &mut TcpStream, tagged: bool) -> Option<Frame> {
    let mut raw = [0u8; HEADER_LEN];
    s.read_exact(&mut raw).ok()?;
    let (header, _) = Header::parse(&raw).ok()?;
    let mut payload = vec![0u8; header.payload_len as usize];
    s.read_exact(&mut payload).ok()?;
    let mut tag = vec![0u8; if tagged { MAC_LEN } else { 0 }];
    s.read_exact(&mut tag).ok()?;
    Some(Frame {
        raw,
        header,
        payload,
        tag,
    })
}

/// Re-encodes `f`'s header over its changed payload: a new CRC (the tag,
/// if any, cannot be made without the key and stays as it was).
fn reseal(f: &mut Frame) {
    f.raw = encode_header(&f.header, &f.payload);
}

fn adjust_digest(f: &mut Frame, by: impl Fn(u64) -> u64) {
    let limits = Limits {
        guest_pages: 1 << 30,
    };
    let msg = match Message::decode(&f.header, f.payload.clone().into(), limits) {
        Ok(Message::Switchover(mut m)) => {
            m.digest = by(m.digest);
            Message::Switchover(m)
        }
        Ok(Message::Ready(mut m)) => {
            m.digest = by(m.digest);
            Message::Ready(m)
        }
        _ => return,
    };
    f.payload = msg.encode_payload();
    reseal(f);
}

/// Changes the first raw page of a page batch; returns the digest change.
fn change_page(f: &mut Frame) -> Option<u64> {
    let fixed = f.payload.get(..PageBatch::FIXED_LEN)?;
    if PageBatch::codec_of(fixed) != Some(ferry::codec::CodecId::None) {
        return None;
    }
    let prefix = PageBatch::prefix_len(fixed).ok()?;
    let limits = Limits {
        guest_pages: 1 << 30,
    };
    let batch = PageBatch::decode(f.payload.clone().into(), limits).ok()?;
    let index = batch.data_regions().first()?.first;
    let page = f.payload.get_mut(prefix..prefix + 4096)?;
    let hashes = PageHashes::new(index.0 + 1);
    hashes.set(index, page_hash(page));
    let before = hashes.digest();
    page[100] ^= 0x5a;
    hashes.set(index, page_hash(page));
    let delta = hashes.digest().wrapping_sub(before);
    reseal(f);
    Some(delta)
}

/// Rewrites a setup response to grant one credit per channel; whether it
/// changed anything.
fn grant_one_credit(f: &mut Frame) -> bool {
    let payload = f.payload.clone().into();
    let Ok(Message::SessionSetupResponse(mut r)) =
        Message::decode(&f.header, payload, Limits::BEFORE_SETUP)
    else {
        return false;
    };
    if r.initial_credits == 1 {
        return false;
    }
    r.initial_credits = 1;
    f.payload = Message::SessionSetupResponse(r).encode_payload();
    reseal(f);
    true
}

/// Points a single-run raw batch at the pages of the first one seen, once
/// the destination applied that one (an idle guest never sends them again);
/// `false` for the first, or another kind, or too early.
fn redirect(f: &mut Frame, seen: &mut Seen) -> bool {
    let Some(fixed) = f.payload.get(..PageBatch::FIXED_LEN) else {
        return false;
    };
    let single = u16::from_le_bytes([fixed[6], fixed[7]]) == 1;
    if PageBatch::codec_of(fixed) != Some(ferry::codec::CodecId::None) || !single {
        return false;
    }
    let first = u64::from_le_bytes(f.payload[20..28].try_into().unwrap());
    match seen.first_run {
        None => {
            seen.first_run = Some((f.header.message_id, first));
            false
        }
        Some((_, to)) if to != first && seen.first_acked => {
            f.payload[20..28].copy_from_slice(&to.to_le_bytes());
            reseal(f);
            true
        }
        Some(_) => false,
    }
}

/// Forwards frames one way, changing them as `attack` says.
fn pump(mut from: TcpStream, mut to: TcpStream, up: bool, attack: Attack, seen: Arc<Mutex<Seen>>) {
    let mut tagged = false;
    while let Some(mut f) = read_frame(&mut from, tagged) {
        let mut tag_after = false;
        {
            let mut seen = seen.lock().unwrap();
            let command = f.header.command;
            match command {
                Command::SessionSetup if up => {
                    let flags = u32::from_le_bytes(f.payload[24..28].try_into().unwrap());
                    seen.mac = flags & SETUP_FRAME_MAC != 0;
                    if attack == Attack::StripFlag && seen.mac {
                        let flags = flags & !SETUP_FRAME_MAC;
                        f.payload[24..28].copy_from_slice(&flags.to_le_bytes());
                        reseal(&mut f);
                        seen.changed += 1;
                    }
                    tag_after = seen.mac;
                }
                Command::NegotiateResponse if !up && attack == Attack::Capabilities => {
                    f.payload[4] ^= 1;
                    reseal(&mut f);
                    seen.changed += 1;
                }
                Command::ChannelBind if up => tag_after = seen.mac,
                Command::SessionSetupResponse if attack == Attack::Credits => {
                    seen.changed += u32::from(grant_one_credit(&mut f));
                    tag_after = seen.mac
                }
                Command::SessionSetupResponse | Command::ChannelBindResponse => {
                    tag_after = seen.mac
                }
                // (`redirect` notes the first batch, and says whether it
                // changed this one.)
                Command::PageBatch
                    if attack == Attack::RedirectAndCut
                        && seen.changed == 0
                        && redirect(&mut f, &mut seen) =>
                {
                    seen.changed += 1;
                    // Everything but the last bytes of the pages, then cut.
                    let mut out = f.raw.to_vec();
                    out.extend_from_slice(&f.payload[..f.payload.len() - 64]);
                    let _ = to.write_all(&out);
                    let _ = to.shutdown(Shutdown::Both);
                    let _ = from.shutdown(Shutdown::Both);
                    return;
                }
                Command::PageBatch if attack == Attack::Page && seen.delta.is_none() => {
                    seen.delta = change_page(&mut f);
                    seen.changed += u32::from(seen.delta.is_some());
                }
                Command::BatchAck if !up => {
                    let payload = f.payload.clone().into();
                    if let Ok(Message::BatchAck(a)) =
                        Message::decode(&f.header, payload, Limits::BEFORE_SETUP)
                    {
                        let first = seen.first_run.map(|(id, _)| id);
                        seen.first_acked |= first == Some(a.message_id);
                    }
                }
                Command::Switchover | Command::Ready => {
                    if let Some(d) = seen.delta {
                        if up {
                            adjust_digest(&mut f, |x| x.wrapping_add(d));
                        } else {
                            adjust_digest(&mut f, |x| x.wrapping_sub(d));
                        }
                        seen.changed += 1;
                    }
                }
                _ => {}
            }
        }
        let mut out = f.raw.to_vec();
        out.extend_from_slice(&f.payload);
        out.extend_from_slice(&f.tag);
        if to.write_all(&out).is_err() {
            break;
        }
        tagged |= tag_after;
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// A frame-reading proxy to `upstream`; returns its address.
fn on_path(upstream: String, attack: Attack, seen: Arc<Mutex<Seen>>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let Ok(server) = TcpStream::connect(&upstream) else {
                return;
            };
            let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            let (sa, sb) = (seen.clone(), seen.clone());
            std::thread::spawn(move || pump(client, server, true, attack, sa));
            std::thread::spawn(move || pump(s2, c2, false, attack, sb));
        }
    });
    addr
}

/// Migrates an idle 8 MiB (or 32 MiB) guest in raw pages through the attacking proxy,
/// with `key` on both ends (or none), the guest left paused at the end.
/// Returns the source's report and the receiver (for its report, when the
/// session got far enough to make one).
fn attacked(
    key: Option<SessionKey>,
    attack: Attack,
) -> (
    ferry::migration::Report,
    Harness,
    Arc<ferry::memory::SyntheticGuest>,
    Arc<Mutex<Seen>>,
) {
    let h = start_with(ReceiverConfig {
        key: key.clone(),
        ..ReceiverConfig::default()
    });
    let seen = Arc::new(Mutex::new(Seen::default()));
    let proxy = on_path(h.addr.clone(), attack, seen.clone());
    // Enough batches that some pass after the first one's acknowledgement.
    let memory = if attack == Attack::RedirectAndCut {
        32 << 20
    } else {
        8 << 20
    };
    let g = common::guest(memory, FillSpec::default(), WorkloadPattern::Idle, 0);
    let gd: Arc<dyn ferry::migration::MigratableGuest> = g.clone();
    let config = MigrationConfig {
        session_key: key,
        codec: ferry::codec::CodecChoice::Fixed(Codec::None),
        channels: 2,
        leave_paused: true,
        ..MigrationConfig::default()
    };
    let src_rt = ferry::transport::runtime("src", 1, &CpuMeter::new()).unwrap();
    let report = src_rt.block_on(ferry::transport::migrate(
        gd,
        &proxy,
        &config,
        &RunContext::default(),
    ));
    (report, h, g, seen)
}

#[test]
fn without_a_key_a_changed_page_and_digest_go_through_and_the_report_says_frames_are_not_authenticated(
) {
    let _serial = common::serial();
    let (src, mut h, g, seen) = attacked(None, Attack::Page);
    let dst = h.next_session();
    // The attack is real: the destination holds a page the source never
    // had, and both sides' digest checks agreed.
    assert_eq!(src.outcome, Outcome::Completed, "{:?}", src.error);
    assert!(seen.lock().unwrap().changed >= 3);
    let mem = dst.memory.as_ref().expect("the destination's memory");
    assert!(common::first_difference(g.memory(), mem).is_some());
    assert!(!src.frames_authenticated && !dst.report.frames_authenticated);
    assert!(!src.authenticated && !src.encrypted);
}

#[test]
fn with_a_key_a_changed_frame_ends_the_session_and_the_guest_stays_on_the_source() {
    let _serial = common::serial();
    let key = SessionKey(b"on-path-attack-key-0123456789".to_vec());
    let (src, mut h, g, seen) = attacked(Some(key), Attack::Page);
    let dst = h.next_session();
    assert_eq!(seen.lock().unwrap().changed, 1, "the page was changed");
    assert_eq!(src.outcome, Outcome::Failed);
    assert_eq!(src.guest_location, "source");
    let why = dst.report.error.clone().unwrap_or_default();
    assert!(why.contains("frame authentication failed"), "{why}");
    assert!(g.is_running(), "the guest runs on at the source");
    assert!(dst.guest.is_none());
}

#[test]
fn with_a_key_the_frame_authentication_flag_cannot_be_stripped() {
    let _serial = common::serial();
    let key = SessionKey(b"on-path-attack-key-0123456789".to_vec());
    let (src, _h, g, seen) = attacked(Some(key.clone()), Attack::StripFlag);
    assert_eq!(seen.lock().unwrap().changed, 1, "the flag was stripped");
    assert_eq!(src.outcome, Outcome::Failed);
    let why = src.error.clone().unwrap_or_default();
    assert!(why.contains("proof of the key is wrong"), "{why}");
    assert!(g.is_running());
    // Through the same proxy unchanged, a keyed session tags every frame
    // (the proxy follows them) and completes, memory equal.
    let (src, mut h, g, seen) = attacked(Some(key), Attack::Nothing);
    let dst = h.next_session();
    assert_eq!(src.outcome, Outcome::Completed, "{:?}", src.error);
    assert!(seen.lock().unwrap().mac);
    assert!(src.frames_authenticated && dst.report.frames_authenticated);
    let mem = dst.memory.as_ref().expect("the destination's memory");
    assert_eq!(common::first_difference(g.memory(), mem), None);
}

#[test]
fn with_a_key_the_negotiation_cannot_be_narrowed_on_the_path() {
    let _serial = common::serial();
    let key = SessionKey(b"on-path-attack-key-0123456789".to_vec());
    let (src, _h, g, seen) = attacked(Some(key), Attack::Capabilities);
    assert_eq!(seen.lock().unwrap().changed, 1, "the grant was changed");
    assert_eq!(src.outcome, Outcome::Failed);
    let why = src.error.clone().unwrap_or_default();
    assert!(why.contains("proof of the key is wrong"), "{why}");
    assert!(g.is_running(), "the guest runs on at the source");
}

#[test]
fn a_keyed_receiver_without_tls_refuses_a_proven_source_that_does_not_tag_its_frames() {
    let _serial = common::serial();
    let key = SessionKey(b"on-path-attack-key-0123456789".to_vec());
    let h = start_with(ReceiverConfig {
        key: Some(key.clone()),
        ..ReceiverConfig::default()
    });
    let mut s = TcpStream::connect(&h.addr).unwrap();
    send(&mut s, Header::new(Command::Negotiate), &negotiate());
    let answer = match recv(&mut s) {
        Some((_, Message::NegotiateResponse(r))) => r,
        other => panic!("{other:?}"),
    };
    let Message::Negotiate(asked) = negotiate() else {
        unreachable!()
    };
    // An older source: the right key, every field proved, no tags asked for.
    let Message::SessionSetup(mut old) = setup(8 << 20) else {
        unreachable!()
    };
    let negotiation = ferry::migration::auth::negotiation(&asked, &answer);
    let handshake = ferry::migration::auth::Handshake {
        source_nonce: &SOURCE_NONCE,
        dest_nonce: &answer.nonce,
        negotiation: &negotiation,
        binding: &[],
    };
    old.proof = Some(ferry::migration::auth::setup_proof(&key, &handshake, &old));
    send(
        &mut s,
        Header::new(Command::SessionSetup),
        &Message::SessionSetup(old),
    );
    let why = abort_text(recv(&mut s));
    assert!(why.contains("does not tag its frames"), "{why}");
}

#[test]
fn with_a_key_no_page_is_written_before_its_frame_tag_holds() {
    let _serial = common::serial();
    // A middle rewrites a raw batch's run to pages already sent and cuts the
    // connection inside its pages: a lost channel, which the session
    // survives. Had any page been written before the tag was checked, the
    // guest would run on with those pages changed and every digest agreeing.
    let key = SessionKey(b"on-path-attack-key-0123456789".to_vec());
    let (src, mut h, g, seen) = attacked(Some(key), Attack::RedirectAndCut);
    let dst = h.next_session();
    assert_eq!(
        seen.lock().unwrap().changed,
        1,
        "a batch was redirected and cut"
    );
    assert_eq!(src.outcome, Outcome::Completed, "{:?}", src.error);
    assert!(src.channel_failures >= 1, "{src:?}");
    let mem = dst.memory.as_ref().expect("the destination's memory");
    assert_eq!(common::first_difference(g.memory(), mem), None);
}

#[test]
fn with_a_key_the_credits_a_destination_grants_cannot_be_changed_on_the_path() {
    let _serial = common::serial();
    // Without a key the changed grant goes through: the session runs on one
    // credit per channel. With one, the destination's proof covers the grant.
    let (src, _h, _g, seen) = attacked(None, Attack::Credits);
    assert_eq!(seen.lock().unwrap().changed, 1, "the grant was changed");
    assert_eq!(src.outcome, Outcome::Completed, "{:?}", src.error);
    let key = SessionKey(b"on-path-attack-key-0123456789".to_vec());
    let (src, _h, g, seen) = attacked(Some(key), Attack::Credits);
    assert_eq!(seen.lock().unwrap().changed, 1, "the grant was changed");
    assert_eq!(src.outcome, Outcome::Failed);
    let why = src.error.clone().unwrap_or_default();
    assert!(why.contains("did not prove the shared key"), "{why}");
    assert!(g.is_running(), "the guest runs on at the source");
}
