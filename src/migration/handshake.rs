//! The source's session handshake without IO: what it sends on channel 0
//! (NEGOTIATE, then SESSION_SETUP with its proof of the key) and the checks
//! of each answer (the version, page size and codecs chosen; the
//! destination's proof of the key; the credits granted). Its end is what the
//! binds and the session's frames need.
//!
//! ```text
//! Start ──NEGOTIATE──▶ Negotiating ──answer checked──▶ SettingUp
//!   SettingUp ──SESSION_SETUP (proved)──▶ AwaitingSetup ──answer checked──▶ Done
//!   any answer that fails its check, an ABORT, or another message ─▶ Failed
//! ```

use super::auth::{self, BindSecret, FrameKeys, SessionKey};
use super::source_machine::unexpected;
use super::{AuthFailure, MigrationError, Mismatch, Violation};
use crate::codec::{CodecChoice, CodecId};
use crate::wire::{
    Command, Header, Message, Negotiate, NegotiateResponse, SessionSetup, SessionSetupResponse,
    MAX_CREDITS, PAGE_SIZE, SETUP_FRAME_MAC, VERSION,
};

/// The source's side of a session's handshake on channel 0.
pub struct SourceHandshake {
    setup: SessionSetup,
    codec: CodecChoice,
    key: Option<SessionKey>,
    source_nonce: [u8; 16],
    /// Channel 0's TLS keying material (empty when plain).
    binding: Vec<u8>,
    /// Capabilities asked for, then those both sides have.
    capabilities: u32,
    /// Codecs asked for, then those the destination decodes of them.
    codecs: u32,
    /// What NEGOTIATE and its answer said, once answered
    /// ([`auth::negotiation`]): the proofs cover it.
    negotiation: [u8; auth::NEGOTIATION_LEN],
    step: Step,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Start,
    Negotiating,
    SettingUp { dest_nonce: [u8; 16] },
    AwaitingSetup { dest_nonce: [u8; 16] },
    Done,
    Failed,
}

/// What a finished handshake established.
pub struct Established {
    /// The session the destination opened.
    pub session_id: u64,
    /// The secret the binds of channels 1..N prove.
    pub secret: BindSecret,
    /// Batches channel 0 may have in flight (1..=[`MAX_CREDITS`]).
    pub initial_credits: u16,
    /// Whether the destination proved the key.
    pub authenticated: bool,
    /// Channel 0's frame keys, when the session's frames are tagged.
    pub frame_keys: Option<FrameKeys>,
    /// Whether the destination took the setup's delta base: its memory
    /// starts as that image.
    pub delta: bool,
    /// Capabilities both sides have (`CAP_*` bits).
    pub capabilities: u32,
    /// Codecs the destination decodes of those asked for
    /// ([`CodecId::bit`]s): with `auto`, whether it may use the kept stream.
    pub codecs: u32,
}

impl std::fmt::Debug for SourceHandshake {
    /// Names no key, nonce or TLS keying material.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceHandshake")
            .field("awaiting", &self.awaiting())
            .field("codec", &self.codec)
            .field("keyed", &self.key.is_some())
            .finish()
    }
}

impl std::fmt::Debug for Established {
    /// Names no secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Established")
            .field("session_id", &self.session_id)
            .field("initial_credits", &self.initial_credits)
            .field("authenticated", &self.authenticated)
            .field("frames_tagged", &self.frame_keys.is_some())
            .field("delta", &self.delta)
            .finish()
    }
}

impl SourceHandshake {
    /// A handshake asking for `setup` (its proof is added here) with
    /// `codec`, proving `key` when there is one, with this session's
    /// `source_nonce` over channel 0's TLS `binding`.
    pub fn new(
        setup: SessionSetup,
        codec: CodecChoice,
        key: Option<SessionKey>,
        source_nonce: [u8; 16],
        binding: Vec<u8>,
    ) -> Self {
        Self {
            setup,
            codec,
            key,
            source_nonce,
            binding,
            capabilities: 0,
            codecs: Self::wanted_codecs(codec),
            negotiation: [0; auth::NEGOTIATION_LEN],
            step: Step::Start,
        }
    }

    /// Asks for `capabilities` (`CAP_*` bits) too; the session has those
    /// the destination also has.
    pub fn with_capabilities(mut self, capabilities: u32) -> Self {
        self.capabilities = capabilities;
        self
    }

    /// The codecs the destination must decode: with auto, none, lz4 and zstd.
    pub fn needed_codecs(codec: CodecChoice) -> u32 {
        match codec {
            CodecChoice::Fixed(c) => c.id().bit() | CodecId::None.bit(),
            CodecChoice::Auto => CodecId::None.bit() | CodecId::Lz4.bit() | CodecId::Zstd.bit(),
        }
    }

    /// The codecs asked for: those needed, and with auto those it could
    /// also use (the kept stream).
    pub fn wanted_codecs(codec: CodecChoice) -> u32 {
        match codec {
            CodecChoice::Fixed(_) => Self::needed_codecs(codec),
            CodecChoice::Auto => Self::needed_codecs(codec) | CodecId::ZstdStream.bit(),
        }
    }

    /// The next message to send on channel 0, if one is due.
    pub fn poll_transmit(&mut self) -> Option<(Header, Message)> {
        match self.step {
            Step::Start => {
                self.step = Step::Negotiating;
                let msg = Message::Negotiate(self.negotiate());
                Some((Header::new(Command::Negotiate), msg))
            }
            Step::SettingUp { dest_nonce } => {
                self.step = Step::AwaitingSetup { dest_nonce };
                let mut setup = self.setup.clone();
                setup.proof = self.key.as_ref().map(|k| {
                    let h = self.handshake(&dest_nonce);
                    auth::setup_proof(k, &h, &self.setup)
                });
                Some((
                    Header::new(Command::SessionSetup),
                    Message::SessionSetup(setup),
                ))
            }
            _ => None,
        }
    }

    /// The answer awaited, by its command's name (`None` once done).
    pub fn awaiting(&self) -> Option<&'static str> {
        match self.step {
            Step::Negotiating => Some("NEGOTIATE_RESPONSE"),
            Step::AwaitingSetup { .. } => Some("SESSION_SETUP_RESPONSE"),
            _ => None,
        }
    }

    /// Handles what channel 0 read: `Ok(Some(_))` once the session is set
    /// up, `Ok(None)` while more is to come; any error ends the handshake.
    pub fn handle(
        &mut self,
        header: &Header,
        msg: Message,
    ) -> Result<Option<Established>, MigrationError> {
        let r = self.step_on(header, msg);
        if r.is_err() {
            self.step = Step::Failed;
        }
        r
    }

    fn step_on(
        &mut self,
        header: &Header,
        msg: Message,
    ) -> Result<Option<Established>, MigrationError> {
        if let Message::Abort(a) = msg {
            return Err(MigrationError::RemoteAbort {
                code: a.code,
                message: a.message,
            });
        }
        match (self.step, msg) {
            (Step::Negotiating, Message::NegotiateResponse(r)) => {
                self.check_negotiated(&r)?;
                self.negotiation = auth::negotiation(&self.negotiate(), &r);
                self.capabilities &= r.capabilities;
                self.codecs &= r.codecs;
                self.step = Step::SettingUp {
                    dest_nonce: r.nonce,
                };
                Ok(None)
            }
            (Step::AwaitingSetup { dest_nonce }, Message::SessionSetupResponse(r)) => {
                let done = self.established(header.session_id, &dest_nonce, &r)?;
                self.step = Step::Done;
                Ok(Some(done))
            }
            (_, m) => Err(unexpected(self.awaiting().unwrap_or("nothing"), &m)),
        }
    }

    /// NEGOTIATE, as sent (before the answer narrows what was asked for).
    fn negotiate(&self) -> Negotiate {
        Negotiate {
            min_version: VERSION,
            max_version: VERSION,
            capabilities: self.capabilities,
            codecs: self.codecs,
            page_size: PAGE_SIZE as u32,
            nonce: self.source_nonce,
        }
    }

    fn check_negotiated(&self, r: &NegotiateResponse) -> Result<(), MigrationError> {
        if r.version != VERSION || r.page_size != PAGE_SIZE as u32 {
            return Err(Mismatch::Chosen {
                version: r.version,
                page_size: r.page_size,
            }
            .into());
        }
        let needed = Self::needed_codecs(self.codec);
        if r.codecs & needed != needed {
            return Err(Mismatch::Codec { codec: self.codec }.into());
        }
        Ok(())
    }

    /// Checks the setup's answer: with a key, the destination's proof of
    /// it (before it sees a page); the credits it grants channel 0.
    fn established(
        &self,
        session_id: u64,
        dest_nonce: &[u8; 16],
        r: &SessionSetupResponse,
    ) -> Result<Established, MigrationError> {
        let h = self.handshake(dest_nonce);
        if let Some(key) = &self.key {
            let answer = auth::Response {
                session_id,
                token: &r.bind_token,
                credits: r.initial_credits,
                delta: r.delta,
            };
            let proven = r
                .proof
                .is_some_and(|p| auth::verify_response_proof(key, &h, &answer, &p));
            if !proven {
                return Err(AuthFailure::Destination.into());
            }
        }
        if r.delta && self.setup.base.is_none() {
            return Err(Violation::DeltaUnoffered.into());
        }
        if r.initial_credits == 0 || r.initial_credits > MAX_CREDITS {
            return Err(Violation::Credits {
                channel: None,
                credits: r.initial_credits,
            }
            .into());
        }
        let secret = BindSecret::derive(
            self.key.as_ref(),
            &self.source_nonce,
            dest_nonce,
            session_id,
            &r.bind_token,
        );
        // Tagged only when keyed: a keyless secret is derived from a token
        // sent in the clear.
        let tagged = self.key.is_some() && self.setup.flags & SETUP_FRAME_MAC != 0;
        let frame_keys = tagged
            .then(|| secret.frame_keys(session_id, auth::Connection::Setup(&self.source_nonce)));
        Ok(Established {
            session_id,
            secret,
            initial_credits: r.initial_credits,
            authenticated: self.key.is_some(),
            frame_keys,
            delta: r.delta,
            capabilities: self.capabilities,
            codecs: self.codecs,
        })
    }

    fn handshake<'a>(&'a self, dest_nonce: &'a [u8; 16]) -> auth::Handshake<'a> {
        auth::Handshake {
            source_nonce: &self.source_nonce,
            dest_nonce,
            negotiation: &self.negotiation,
            binding: &self.binding,
        }
    }
}

/// Whom a receiver without a key takes sessions from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Unauthenticated {
    /// Nobody: every session must prove the key.
    Refuse,
    /// Peers on loopback addresses only (the default).
    #[default]
    Loopback,
    /// Anyone (`--insecure`): for trusted, isolated links.
    Anywhere,
}

/// How a destination took a session's SESSION_SETUP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// The source proved the key.
    Proved,
    /// Neither side has a key, and the receiver's policy takes the peer.
    Unauthenticated,
}

/// The destination's check of a SESSION_SETUP: the source's proof of
/// `key` over `handshake`, or, with no key on either side, whether
/// `policy` takes `peer` (its address as shown, and whether it is on
/// loopback).
pub fn check_setup(
    key: Option<&SessionKey>,
    policy: Unauthenticated,
    (peer, loopback): (&str, bool),
    setup: &SessionSetup,
    handshake: &auth::Handshake<'_>,
) -> Result<Taken, MigrationError> {
    let tagged = setup.flags & SETUP_FRAME_MAC != 0;
    if tagged && setup.proof.is_none() {
        return Err(Violation::MacWithoutKey.into());
    }
    match (key, &setup.proof) {
        (Some(key), Some(_)) => {
            if !auth::verify_setup_proof(key, handshake, setup) {
                Err(AuthFailure::WrongKey.into())
            } else if !tagged && handshake.binding.is_empty() {
                Err(AuthFailure::UntaggedFrames.into())
            } else {
                Ok(Taken::Proved)
            }
        }
        (Some(_), None) => Err(AuthFailure::KeyRequired.into()),
        (None, Some(_)) => Err(AuthFailure::NoKeyToCheck.into()),
        (None, None) => match policy {
            Unauthenticated::Anywhere => Ok(Taken::Unauthenticated),
            Unauthenticated::Loopback if loopback => Ok(Taken::Unauthenticated),
            Unauthenticated::Loopback => Err(AuthFailure::NotLoopback {
                peer: peer.to_string(),
            }
            .into()),
            Unauthenticated::Refuse => Err(AuthFailure::AuthenticatedOnly.into()),
        },
    }
}

/// The destination's SESSION_SETUP_RESPONSE for session `session_id`:
/// the bind `token`, channel 0's `credits`, whether it took the setup's
/// delta base, and with a key its proof over `handshake` and all of these.
pub fn setup_response(
    key: Option<&SessionKey>,
    handshake: &auth::Handshake<'_>,
    session_id: u64,
    token: &[u8; 16],
    (credits, delta): (u16, bool),
) -> SessionSetupResponse {
    SessionSetupResponse {
        bind_token: *token,
        initial_credits: credits,
        proof: key.map(|k| {
            let r = auth::Response {
                session_id,
                token,
                credits,
                delta,
            };
            auth::response_proof(k, handshake, &r)
        }),
        delta,
    }
}

mod bind;

pub use bind::{BindCheck, BindDone, SourceBind};

#[cfg(test)]
mod tests;
