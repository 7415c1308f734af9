//! Simulated channel binds after a simulated handshake: each of channels
//! 1..N binds through the source's `SourceBind` and the destination's
//! `BindCheck`, with one drawn change: a proof or an answer altered, a
//! nonce replayed, a channel the session lacks, another session, or a
//! broken destination granting no credits.
//!
//! Checked: the destination takes a bind only for a channel of its session,
//! proved by its secret, with a nonce never used before; the source takes
//! an answer only proved by the same secret and granting credits in the
//! window; a channel both took has the same frame keys on both sides.

use super::Rng;
use crate::migration::auth::BindSecret;
use crate::migration::handshake::{BindCheck, SourceBind};
use crate::wire::{ChannelId, Command, Header, Message};
use std::collections::HashSet;

/// One change to one bind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    None,
    Proof,
    Answer,
    Replay,
    NoSuchChannel,
    OtherSession,
    NoCredits,
}

const CHANGES: [Change; 7] = [
    Change::None,
    Change::Proof,
    Change::Answer,
    Change::Replay,
    Change::NoSuchChannel,
    Change::OtherSession,
    Change::NoCredits,
];

/// The session both sides agreed on, as each holds it.
pub struct Session<'a> {
    pub session_id: u64,
    pub channels: u16,
    pub frame_mac: bool,
    pub source_secret: &'a BindSecret,
    pub dest_secret: &'a BindSecret,
    /// Another live session's secret on the same destination.
    pub other_secret: &'a BindSecret,
    /// Whether the two secrets are the same, as the schedule says (the
    /// same key, the nonces and token untouched).
    pub same: bool,
}

/// Binds channels 1..N of `s`; returns how many both sides took, or what
/// broke.
pub fn run(rng: &mut Rng, s: &Session) -> Result<u32, String> {
    let mut nonces = HashSet::new();
    let mut taken = 0;
    for c in 1..s.channels {
        let change = if rng.chance(60) {
            Change::None
        } else {
            CHANGES[rng.below(CHANGES.len() as u64) as usize]
        };
        if bind_one(rng, s, ChannelId(c), change, &mut nonces)? {
            taken += 1;
        }
    }
    Ok(taken)
}

/// One bind under `change`; whether both sides took it.
fn bind_one(
    rng: &mut Rng,
    s: &Session,
    ch: ChannelId,
    change: Change,
    nonces: &mut HashSet<[u8; 16]>,
) -> Result<bool, String> {
    let nonce: [u8; 16] = rng.bytes16();
    // The connection's TLS binding, as each side sees it: a relay that
    // terminates TLS shows each its own.
    let binding = if rng.chance(50) {
        rng.next_u64().to_le_bytes().to_vec()
    } else {
        Vec::new()
    };
    let relayed = rng.chance(10);
    let theirs_binding = if relayed {
        rng.next_u64().to_le_bytes().to_vec()
    } else {
        binding.clone()
    };
    let channel = if change == Change::NoSuchChannel {
        ChannelId(s.channels)
    } else {
        ch
    };
    let bind = SourceBind::new(s.session_id, channel, nonce, binding, s.frame_mac);
    let (header, msg) = bind.request(s.source_secret);
    let Message::ChannelBind(mut req) = msg else {
        return Err("a bind request that is no CHANNEL_BIND".into());
    };
    if change == Change::Proof {
        req.proof[0] ^= 1;
    }
    let credits = if change == Change::NoCredits { 0 } else { 4 };
    let secret = if change == Change::OtherSession {
        s.other_secret
    } else {
        s.dest_secret
    };
    let mut check = BindCheck {
        secret,
        channels: s.channels,
        nonces,
        frame_mac: s.frame_mac,
        credits,
    };
    if change == Change::Replay {
        // The same bind seen once already: its nonce is spent.
        let _ = check.check(&header, &req, &theirs_binding);
    }
    let before = check.nonces.len();
    let (mut answer, theirs) = match check.check(&header, &req, &theirs_binding) {
        Ok(r) => r,
        Err(e) => {
            // A refused bind leaves nothing behind: not even its nonce.
            if check.nonces.len() != before {
                return Err(format!("a refused bind ({change:?}) spent a nonce"));
            }
            // One nothing changed must be taken.
            if change == Change::None && s.same && !relayed {
                return Err(format!("a clean bind of channel {ch} was refused: {e}"));
            }
            return Ok(false);
        }
    };
    let proper =
        s.same && !relayed && matches!(change, Change::None | Change::Answer | Change::NoCredits);
    if !proper {
        return Err(format!(
            "the destination took a bind it must refuse ({change:?})"
        ));
    }
    if change == Change::Answer {
        answer.proof[0] ^= 1;
    }
    let header = Header {
        credit_grant: credits,
        ..Header::new(Command::ChannelBindResponse)
    };
    let ours = match bind.handle(
        s.source_secret,
        &header,
        Message::ChannelBindResponse(answer),
    ) {
        Ok(d) => d,
        Err(e) if change == Change::None => {
            return Err(format!("a clean bind's answer was refused: {e}"));
        }
        Err(_) => return Ok(false),
    };
    if change != Change::None {
        return Err(format!(
            "the source took an answer it must refuse ({change:?})"
        ));
    }
    let keys = |k: &Option<crate::migration::auth::FrameKeys>| {
        k.as_ref().map(|k| (k.to_dest, k.to_source))
    };
    if keys(&ours.frame_keys) != keys(&theirs.frame_keys)
        || ours.frame_keys.is_some() != s.frame_mac
    {
        return Err(format!(
            "channel {ch}'s frame keys differ between the sides"
        ));
    }
    Ok(true)
}
