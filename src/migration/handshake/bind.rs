//! A channel's bind to its session without IO: the source's CHANNEL_BIND,
//! proving the session's secret over a fresh nonce (and the channel's TLS
//! binding), and its check of the answer; the destination's check of a
//! bind (its session's channel, its proof, a nonce never used before) and
//! the proof it answers with.

use super::*;
use crate::wire::{ChannelBind, ChannelBindResponse, ChannelId};
use std::collections::HashSet;

/// The source's bind of one channel: the message to send, then the check
/// of its answer.
pub struct SourceBind {
    session_id: u64,
    channel: ChannelId,
    nonce: [u8; 16],
    binding: Vec<u8>,
    frame_mac: bool,
}

/// A bound channel, as either side ends its bind.
pub struct BindDone {
    /// Batches the channel may have in flight (the source's side; the
    /// destination grants its configured credits).
    pub credits: u16,
    /// The channel's frame keys, when the session's frames are tagged.
    pub frame_keys: Option<FrameKeys>,
}

impl std::fmt::Debug for SourceBind {
    /// Names no nonce or TLS keying material.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceBind")
            .field("session_id", &self.session_id)
            .field("channel", &self.channel)
            .finish()
    }
}

impl std::fmt::Debug for BindDone {
    /// Names no key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BindDone")
            .field("credits", &self.credits)
            .field("frames_tagged", &self.frame_keys.is_some())
            .finish()
    }
}

impl SourceBind {
    /// Binds `channel` of session `session_id` with a fresh `nonce`, over
    /// the connection's TLS `binding` (empty when plain); its frames are
    /// tagged after the answer when `frame_mac`.
    pub fn new(
        session_id: u64,
        channel: ChannelId,
        nonce: [u8; 16],
        binding: Vec<u8>,
        frame_mac: bool,
    ) -> Self {
        Self {
            session_id,
            channel,
            nonce,
            binding,
            frame_mac,
        }
    }

    fn bind(&self) -> auth::Bind<'_> {
        auth::Bind {
            session_id: self.session_id,
            channel: self.channel,
            nonce: &self.nonce,
            binding: &self.binding,
        }
    }

    /// The CHANNEL_BIND to send, proved with `secret`.
    pub fn request(&self, secret: &BindSecret) -> (Header, Message) {
        let header = Header {
            session_id: self.session_id,
            channel: self.channel,
            ..Header::new(Command::ChannelBind)
        };
        let proof = secret.bind_proof(&self.bind());
        let msg = Message::ChannelBind(ChannelBind {
            nonce: self.nonce,
            proof,
        });
        (header, msg)
    }

    /// Checks the answer: the destination's proof of `secret` over this
    /// bind and the credits it grants, which must lie in the window.
    pub fn handle(
        &self,
        secret: &BindSecret,
        header: &Header,
        msg: Message,
    ) -> Result<BindDone, MigrationError> {
        let r = match msg {
            Message::ChannelBindResponse(r) => r,
            Message::Abort(a) => {
                return Err(MigrationError::RemoteAbort {
                    code: a.code,
                    message: a.message,
                })
            }
            m => return Err(unexpected("CHANNEL_BIND_RESPONSE", &m)),
        };
        let credits = header.credit_grant;
        if !secret.verify_bound(&self.bind(), credits, &r.proof) {
            return Err(AuthFailure::BindAnswer {
                channel: self.channel,
            }
            .into());
        }
        if credits == 0 || credits > MAX_CREDITS {
            return Err(Violation::Credits {
                channel: Some(self.channel),
                credits,
            }
            .into());
        }
        let frame_keys = self.frame_mac.then(|| {
            let conn = auth::Connection::Bind(self.channel, &self.nonce);
            secret.frame_keys(self.session_id, conn)
        });
        Ok(BindDone {
            credits,
            frame_keys,
        })
    }
}

/// What the destination knows of a live session when a bind for it comes.
pub struct BindCheck<'a> {
    /// The session's bind secret.
    pub secret: &'a BindSecret,
    /// Its channels, the control channel included.
    pub channels: u16,
    /// The bind nonces it has taken: each proves one bind only.
    pub nonces: &'a mut HashSet<[u8; 16]>,
    /// Whether its frames are tagged.
    pub frame_mac: bool,
    /// The credits its answer grants.
    pub credits: u16,
}

impl BindCheck<'_> {
    /// Checks a CHANNEL_BIND of this session over the connection's TLS
    /// `binding`: a channel it has, the secret's proof, a fresh nonce.
    /// Returns the answer and the channel's frame keys.
    pub fn check(
        &mut self,
        h: &Header,
        b: &ChannelBind,
        binding: &[u8],
    ) -> Result<(ChannelBindResponse, BindDone), MigrationError> {
        let (channel, session) = (h.channel, h.session_id);
        if channel.0 >= self.channels {
            return Err(Violation::NoSuchChannel {
                channel,
                session,
                channels: self.channels,
            }
            .into());
        }
        let bind = auth::Bind {
            session_id: session,
            channel,
            nonce: &b.nonce,
            binding,
        };
        if !self.secret.verify_bind(&bind, &b.proof) {
            return Err(AuthFailure::BindProof { channel, session }.into());
        }
        if !self.nonces.insert(b.nonce) {
            return Err(AuthFailure::BindReplay { channel, session }.into());
        }
        let proof = self.secret.bound_proof(&bind, self.credits);
        let frame_keys = self.frame_mac.then(|| {
            let conn = auth::Connection::Bind(channel, &b.nonce);
            self.secret.frame_keys(session, conn)
        });
        let done = BindDone {
            credits: self.credits,
            frame_keys,
        };
        Ok((ChannelBindResponse { proof }, done))
    }
}
