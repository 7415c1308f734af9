//! Simulated session handshakes: the source's handshake machine against the
//! destination's protocol machine and its proof checks, with keys that
//! match or not, receivers' policies, peers near or far, TLS bindings, codecs,
//! broken destinations and an on-path attacker changing one field, all drawn
//! from the seed.
//!
//! Checked on every schedule: the handshake ends within its four messages;
//! the destination takes a session only proved by its own key, or keyless
//! as its policy allows; a keyed source is set up only by a destination
//! that proved the same key over an untouched exchange, and then both hold
//! the same session, bind secret and frame keys.

use super::Rng;
use crate::codec::{Codec, CodecChoice, CodecId};
use crate::migration::auth::{self, BindSecret, SessionKey};
use crate::migration::dest_state::DestMachine;
use crate::migration::handshake::{
    check_setup, setup_response, Established, SourceHandshake, Taken, Unauthenticated,
};
use crate::migration::MigrationError;
use crate::wire::{
    Abort, AbortCode, ChannelId, Command, DeltaBase, Header, Message, Negotiate, Ready,
    SessionSetup, SETUP_FRAME_MAC,
};

/// One on-path change to one message, or a broken destination's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tamper {
    None,
    /// The source's nonce in NEGOTIATE.
    SourceNonce,
    /// The destination's nonce in its answer.
    DestNonce,
    /// The guest size asked for, after the setup was proved.
    SetupSize,
    /// The bind token in the setup's answer.
    BindToken,
    /// The session id in the setup answer's header.
    SessionId,
    /// The credits granted, proof and all (a broken destination).
    Credits,
    /// The destination answers another version.
    Version,
    /// The destination ABORTs the setup.
    Abort,
    /// The destination answers the setup with READY.
    Unexpected,
    /// The setup's frame-tagging flag stripped on the way (a downgrade).
    StripMac,
    /// The credits granted changed on the way, after the proof.
    CreditsOnPath,
    /// The destination answers NEGOTIATE with a setup's answer.
    EarlyAnswer,
    /// The delta base's digest changed on the way, after the proof.
    BaseOnPath,
    /// The answer's delta bit flipped on the way, after the proof.
    DeltaOnPath,
    /// The destination says it took a delta base whether offered or not,
    /// proof and all (a broken destination).
    DeltaAlways,
    /// The capabilities NEGOTIATE asks for changed on the way.
    AskedOnPath,
    /// The capabilities NEGOTIATE_RESPONSE grants changed on the way.
    GrantedOnPath,
}

const TAMPERS: [Tamper; 18] = [
    Tamper::None,
    Tamper::SourceNonce,
    Tamper::DestNonce,
    Tamper::SetupSize,
    Tamper::BindToken,
    Tamper::SessionId,
    Tamper::Credits,
    Tamper::Version,
    Tamper::Abort,
    Tamper::Unexpected,
    Tamper::StripMac,
    Tamper::CreditsOnPath,
    Tamper::EarlyAnswer,
    Tamper::BaseOnPath,
    Tamper::DeltaOnPath,
    Tamper::DeltaAlways,
    Tamper::AskedOnPath,
    Tamper::GrantedOnPath,
];

/// A drawn handshake: each side's key, the receiver's policy, the peer,
/// the TLS bindings each side sees, the codec and the tampering.
#[derive(Debug)]
struct Schedule {
    source_key: Option<SessionKey>,
    dest_key: Option<SessionKey>,
    policy: Unauthenticated,
    loopback: bool,
    source_binding: Vec<u8>,
    dest_binding: Vec<u8>,
    codec: CodecChoice,
    /// The codecs the destination decodes (a build without some).
    dest_codecs: u32,
    /// Whether the source offers a delta base, and whether the destination
    /// holds it.
    offer: bool,
    holds: bool,
    tamper: Tamper,
}

impl Schedule {
    fn draw(rng: &mut Rng) -> Self {
        let key = |rng: &mut Rng| match rng.below(3) {
            0 => None,
            1 => Some(SessionKey(b"the cluster's key".to_vec())),
            _ => Some(SessionKey(b"another cluster's key".to_vec())),
        };
        let source_key = key(rng);
        // Mostly the same key on both sides, as a cluster has.
        let dest_key = if rng.chance(60) {
            source_key.clone()
        } else {
            key(rng)
        };
        let binding = |rng: &mut Rng| rng.next_u64().to_le_bytes().to_vec();
        let source_binding = if rng.chance(50) {
            binding(rng)
        } else {
            Vec::new()
        };
        // A relay that terminates TLS shows each side its own binding.
        let dest_binding = if rng.chance(85) {
            source_binding.clone()
        } else {
            binding(rng)
        };
        let codec = match rng.below(4) {
            0 => CodecChoice::Fixed(Codec::None),
            1 => CodecChoice::Fixed(Codec::Lz4),
            2 => CodecChoice::Fixed(Codec::Zstd { level: 1 }),
            _ => CodecChoice::Auto,
        };
        let policy = [
            Unauthenticated::Refuse,
            Unauthenticated::Loopback,
            Unauthenticated::Anywhere,
        ][rng.below(3) as usize];
        let tamper = if rng.chance(50) {
            Tamper::None
        } else {
            TAMPERS[rng.below(TAMPERS.len() as u64) as usize]
        };
        let all = CodecId::None.bit() | CodecId::Lz4.bit() | CodecId::Zstd.bit();
        let dest_codecs = if rng.chance(85) {
            all
        } else {
            CodecId::None.bit() | (all & rng.next_u64() as u32)
        };
        Self {
            dest_codecs,
            source_key,
            dest_key,
            policy,
            loopback: rng.chance(50),
            source_binding,
            dest_binding,
            codec,
            offer: rng.chance(50),
            holds: rng.chance(50),
            tamper,
        }
    }
}

/// What the simulated destination did.
#[derive(Default)]
struct DestSide {
    /// The session it took, and how.
    taken: Option<(u64, Taken)>,
    /// Its bind secret and the nonces, once it answered the setup.
    secret: Option<BindSecret>,
    source_nonce: [u8; 16],
    nonce: [u8; 16],
    /// Channel 0's frame keys, when it tags the session's frames.
    frame_keys: Option<auth::FrameKeys>,
    /// Whether it took the setup's delta base.
    delta: bool,
    /// What NEGOTIATE and its answer said, as it read and sent them.
    negotiation: [u8; auth::NEGOTIATION_LEN],
}

/// Runs the handshake of `seed` and checks it, then binds the channels of
/// a session set up; returns how it ended (`set up`, or the error's kind)
/// and the channels bound, or what broke.
pub fn run(seed: u64) -> Result<(&'static str, u32), String> {
    let mut rng = Rng::new(seed ^ 0x4a5e_11d0_7a3c_0001);
    let s = Schedule::draw(&mut rng);
    let mac = s.source_key.is_some() && s.source_binding.is_empty();
    let channels = 1 + rng.below(4) as u16;
    let mut setup = SessionSetup::plain(64 << 20, channels);
    setup.flags = if mac { SETUP_FRAME_MAC } else { 0 };
    setup.base = s.offer.then(|| DeltaBase {
        migration_id: "m-1".into(),
        digest: 0x5eed,
    });
    let source_nonce = rng.bytes16();
    let mut hs = SourceHandshake::new(
        setup,
        s.codec,
        s.source_key.clone(),
        source_nonce,
        s.source_binding.clone(),
    );
    let mut dest = DestMachine::new(1 << 30);
    let mut side = DestSide::default();
    let mut ended = None;
    for _ in 0..4 {
        let Some((header, msg)) = hs.poll_transmit() else {
            break;
        };
        let reply = answer(&s, &mut rng, &mut dest, &mut side, header, msg);
        let Some((h, m)) = reply else {
            break;
        };
        match hs.handle(&h, m) {
            Ok(Some(done)) => {
                ended = Some(Ok(done));
                break;
            }
            Ok(None) => {}
            Err(e) => {
                ended = Some(Err(e));
                break;
            }
        }
    }
    let ended = ended.ok_or_else(|| format!("handshake never ended: {s:?}"))?;
    check(&s, &side, &ended)?;
    let done = match ended {
        Ok(done) => done,
        Err(e) => return Ok((kind(&e), 0)),
    };
    let (Some((session_id, _)), Some(theirs)) = (side.taken, &side.secret) else {
        return Ok(("set up", 0));
    };
    if session_id != done.session_id {
        // Keyless, with the answer's session id changed on the way.
        return Ok(("set up", 0));
    }
    // The secrets agree when the keys do and the nonces and token the
    // source used are the ones the destination derived from.
    let same = s.source_key == s.dest_key
        && !matches!(
            s.tamper,
            Tamper::SourceNonce | Tamper::DestNonce | Tamper::BindToken
        );
    let other = BindSecret::derive(
        s.dest_key.as_ref(),
        &side.source_nonce,
        &side.nonce,
        session_id ^ 8,
        &[5; 16],
    );
    let session = super::binds::Session {
        session_id,
        channels,
        frame_mac: mac,
        source_secret: &done.secret,
        dest_secret: theirs,
        other_secret: &other,
        same,
    };
    let bound = super::binds::run(&mut rng, &session).map_err(|e| format!("{e}: {s:?}"))?;
    Ok(("set up", bound))
}

/// The destination's answer to `msg`, tampered as drawn; `None` when it
/// refused (its ABORT is what the source reads then).
fn answer(
    s: &Schedule,
    rng: &mut Rng,
    dest: &mut DestMachine,
    side: &mut DestSide,
    _header: Header,
    msg: Message,
) -> Option<(Header, Message)> {
    match msg {
        Message::Negotiate(n) => answer_negotiate(s, rng, dest, side, n),
        Message::SessionSetup(setup) => answer_setup(s, rng, dest, side, setup),
        _ => None,
    }
}

/// The ABORT a refusal sends.
fn refuse(e: MigrationError) -> Option<(Header, Message)> {
    let abort = Abort {
        code: e.abort_code(),
        message: e.to_string(),
    };
    Some((Header::new(Command::Abort), Message::Abort(abort)))
}

/// NEGOTIATE's answer: the destination's nonce and the codecs it has.
fn answer_negotiate(
    s: &Schedule,
    rng: &mut Rng,
    dest: &mut DestMachine,
    side: &mut DestSide,
    mut n: Negotiate,
) -> Option<(Header, Message)> {
    if s.tamper == Tamper::SourceNonce {
        n.nonce[0] ^= 1;
    }
    if s.tamper == Tamper::EarlyAnswer {
        let early = setup_response(
            None,
            &auth::Handshake {
                source_nonce: &n.nonce,
                dest_nonce: &[0; 16],
                negotiation: &[],
                binding: &[],
            },
            1,
            &[0; 16],
            (4, false),
        );
        let h = Header::new(Command::SessionSetupResponse);
        return Some((h, Message::SessionSetupResponse(early)));
    }
    if s.tamper == Tamper::AskedOnPath {
        n.capabilities ^= crate::wire::CAP_PAGE_REFS;
    }
    let mut r = match dest.handle_negotiate(&n) {
        Ok(r) => r,
        Err(e) => return refuse(e),
    };
    side.source_nonce = n.nonce;
    side.nonce = rng.bytes16();
    r.nonce = side.nonce;
    r.codecs &= s.dest_codecs;
    if s.tamper == Tamper::Version {
        r.version = r.version.wrapping_add(1);
    }
    side.negotiation = auth::negotiation(&n, &r);
    let mut sent = r.clone();
    if s.tamper == Tamper::DestNonce {
        sent.nonce[0] ^= 1;
    }
    if s.tamper == Tamper::GrantedOnPath {
        sent.capabilities ^= 0x80;
    }
    Some((
        Header::new(Command::NegotiateResponse),
        Message::NegotiateResponse(sent),
    ))
}

/// SESSION_SETUP's answer: the checks of the setup and its proof, the
/// session taken, the bind secret and the proof of the key.
fn answer_setup(
    s: &Schedule,
    rng: &mut Rng,
    dest: &mut DestMachine,
    side: &mut DestSide,
    mut setup: SessionSetup,
) -> Option<(Header, Message)> {
    if s.tamper == Tamper::SetupSize {
        setup.memory_bytes += crate::wire::PAGE_SIZE as u64;
    }
    if s.tamper == Tamper::StripMac {
        setup.flags &= !SETUP_FRAME_MAC;
    }
    if let (Tamper::BaseOnPath, Some(b)) = (s.tamper, &mut setup.base) {
        b.digest ^= 1;
    }
    let h = auth::Handshake {
        source_nonce: &side.source_nonce,
        dest_nonce: &side.nonce,
        negotiation: &side.negotiation,
        binding: &s.dest_binding,
    };
    let peer = if s.loopback {
        "127.0.0.1:9"
    } else {
        "10.1.2.3:9"
    };
    let taken = match check_setup(
        s.dest_key.as_ref(),
        s.policy,
        (peer, s.loopback),
        &setup,
        &h,
    ) {
        Ok(t) => t,
        Err(e) => return refuse(e),
    };
    if let Err(e) = dest.handle_setup(&setup) {
        return refuse(e);
    }
    let session_id = rng.next_u64() | 1;
    side.taken = Some((session_id, taken));
    match s.tamper {
        Tamper::Abort => {
            return refuse(crate::migration::Shortfall::Refused("no room after all".into()).into())
        }
        Tamper::Unexpected => {
            return Some((
                Header::new(Command::Ready),
                Message::Ready(Ready { digest: 0 }),
            ));
        }
        _ => {}
    }
    let token: [u8; 16] = rng.bytes16();
    let credits = if s.tamper == Tamper::Credits { 0 } else { 4 };
    let key = s.dest_key.as_ref();
    // As the receiver's driver: a base taken only when offered and held
    // (a broken destination says so regardless).
    side.delta = (setup.base.is_some() && s.holds) || s.tamper == Tamper::DeltaAlways;
    let mut r = setup_response(key, &h, session_id, &token, (credits, side.delta));
    let secret = BindSecret::derive(key, &side.source_nonce, &side.nonce, session_id, &token);
    // As the receiver's driver: tagged when keyed and asked to.
    if key.is_some() && setup.flags & SETUP_FRAME_MAC != 0 {
        let conn = auth::Connection::Setup(&side.source_nonce);
        side.frame_keys = Some(secret.frame_keys(session_id, conn));
    }
    side.secret = Some(secret);
    if s.tamper == Tamper::CreditsOnPath {
        r.initial_credits = 3;
    }
    if s.tamper == Tamper::DeltaOnPath {
        r.delta = !r.delta;
    }
    if s.tamper == Tamper::BindToken {
        r.bind_token[0] ^= 1;
    }
    let header = Header {
        session_id: if s.tamper == Tamper::SessionId {
            session_id ^ 2
        } else {
            session_id
        },
        ..Header::new(Command::SessionSetupResponse)
    };
    Some((header, Message::SessionSetupResponse(r)))
}

/// The schedule's invariants, given how the destination and the source ended.
fn check(
    s: &Schedule,
    side: &DestSide,
    ended: &Result<Established, MigrationError>,
) -> Result<(), String> {
    let same_key = s.source_key.is_some() && s.source_key == s.dest_key;
    // The source's own view of the exchange reaches the destination intact
    // in every tamper but these.
    // Stripping the tagging flag changes the setup only where it was set:
    // keyed without TLS.
    let mac = s.source_key.is_some() && s.source_binding.is_empty();
    let stripped = s.tamper == Tamper::StripMac && mac;
    let base_changed = s.tamper == Tamper::BaseOnPath && s.offer;
    let exchange_intact = !matches!(
        s.tamper,
        Tamper::SourceNonce
            | Tamper::DestNonce
            | Tamper::SetupSize
            | Tamper::AskedOnPath
            | Tamper::GrantedOnPath
    ) && !stripped
        && !base_changed
        && s.source_binding == s.dest_binding;
    let needed = SourceHandshake::needed_codecs(s.codec);
    let codecs = needed & s.dest_codecs == needed;
    let keyless_taken = s.source_key.is_none()
        && s.dest_key.is_none()
        && match s.policy {
            Unauthenticated::Anywhere => true,
            Unauthenticated::Loopback => s.loopback,
            Unauthenticated::Refuse => false,
        };
    // Nothing changed, the codecs there, and a key or a policy that takes
    // the peer: then it must be set up.
    let clean =
        s.tamper == Tamper::None && codecs && ((same_key && exchange_intact) || keyless_taken);
    if let (true, Err(e)) = (clean, ended) {
        return Err(format!("a clean handshake failed ({e}): {s:?}"));
    }
    if let Some((_, taken)) = side.taken {
        let fine = match taken {
            Taken::Proved => same_key && exchange_intact,
            Taken::Unauthenticated => keyless_taken,
        };
        if !fine {
            return Err(format!(
                "the destination took a session it must refuse ({taken:?}): {s:?}"
            ));
        }
    }
    let Ok(done) = ended else {
        return Ok(());
    };
    let Some((session_id, _)) = side.taken else {
        return Err(format!(
            "the source was set up by a destination that took nothing: {s:?}"
        ));
    };
    if s.source_key.is_some() {
        // A keyed source trusts only an untouched, proved exchange.
        let answer_intact = !matches!(
            s.tamper,
            Tamper::BindToken | Tamper::SessionId | Tamper::CreditsOnPath | Tamper::DeltaOnPath
        );
        if !(same_key && exchange_intact && answer_intact) {
            return Err(format!(
                "a keyed source was set up over a broken exchange: {s:?}"
            ));
        }
        if !done.authenticated || done.session_id != session_id {
            return Err(format!(
                "set up for session {} as {done:?}, not {session_id}: {s:?}",
                done.session_id
            ));
        }
        let theirs = side.secret.as_ref().ok_or("no secret on the destination")?;
        let b = auth::Bind {
            session_id,
            channel: ChannelId(1),
            nonce: &[7; 16],
            binding: &[],
        };
        if done.secret.bind_proof(&b) != theirs.bind_proof(&b) {
            return Err(format!("the two sides hold different bind secrets: {s:?}"));
        }
        // Channel 0 tagged as asked (keyed without TLS), with the same keys.
        let keys = |k: &Option<auth::FrameKeys>| k.as_ref().map(|k| (k.to_dest, k.to_source));
        if done.frame_keys.is_some() != mac || keys(&done.frame_keys) != keys(&side.frame_keys) {
            return Err(format!(
                "channel 0's frame keys differ between the sides: {s:?}"
            ));
        }
    }
    if done.initial_credits == 0 {
        return Err(format!("set up with no credits: {s:?}"));
    }
    // Round 0 leaves pages out only when the source offered a base, and,
    // keyed, only when the destination really took it.
    if done.delta && !s.offer {
        return Err(format!("set up as a delta the source never offered: {s:?}"));
    }
    if s.source_key.is_some() && done.delta != side.delta {
        return Err(format!(
            "the source's delta ({}) is not the destination's ({}): {s:?}",
            done.delta, side.delta
        ));
    }
    if !codecs {
        return Err(format!("set up with a codec the destination lacks: {s:?}"));
    }
    Ok(())
}

/// A handshake error's kind, for the tally.
fn kind(e: &MigrationError) -> &'static str {
    match e {
        MigrationError::Unauthenticated(_) => "unauthenticated",
        MigrationError::Incompatible(_) => "incompatible",
        MigrationError::Protocol(_) => "protocol",
        MigrationError::RemoteAbort { code, .. } => match code {
            AbortCode::Unauthenticated => "refused: unauthenticated",
            AbortCode::Incompatible => "refused: incompatible",
            _ => "refused",
        },
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_of_handshakes_keep_their_invariants() {
        let mut ends = std::collections::BTreeMap::new();
        let mut bound = 0;
        for seed in 0..20_000 {
            let (end, binds) = run(seed).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
            *ends.entry(end).or_insert(0u32) += 1;
            bound += binds;
        }
        assert!(bound > 1000, "only {bound} channels bound");
        // Every way of ending is reached.
        for want in [
            "set up",
            "unauthenticated",
            "incompatible",
            "protocol",
            "refused: unauthenticated",
        ] {
            assert!(ends.contains_key(want), "{want} never happened: {ends:?}");
        }
    }
}
