//! What a peer did that the protocol does not allow, with the facts that say
//! so: the one cause an abort blames on the other side.

use super::credits::CreditOverflow;
use super::dest_state::DestState;
use super::fault::FaultPoint;
use crate::memory::MemoryError;
use crate::wire::ChannelId;
use crate::wire::Command;

/// A well-formed message the protocol does not allow now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// A step waited for one message and got another.
    #[error("expected {want}, got {got}")]
    Unexpected {
        /// What the step waits for.
        want: &'static str,
        /// What came.
        got: Command,
    },
    /// The destination got a message its state does not take.
    #[error("{got}{} received in state {state:?}", round_text(*.round))]
    OutOfTurn {
        /// What came.
        got: Command,
        /// The round the message names, if it names one.
        round: Option<u32>,
        /// Where the destination was.
        state: DestState,
    },
    /// A grant of credits outside `1..=MAX_CREDITS` (`channel` is `None`
    /// for the session's first connection, before channels are numbered).
    #[error("{} granted {credits} credits", channel_text(*.channel))]
    Credits {
        /// The channel.
        channel: Option<ChannelId>,
        /// The credits granted.
        credits: u16,
    },
    /// A grant that takes a channel's window past its limit.
    #[error("channel {channel}: {overflow}")]
    CreditOverflow {
        /// The channel.
        channel: ChannelId,
        /// The window's overflow.
        overflow: CreditOverflow,
    },
    /// An acknowledgement of a batch not in flight on that channel.
    #[error("acknowledgement on channel {channel} of batch {batch} not in flight on it")]
    NotInFlight {
        /// The channel the acknowledgement came on.
        channel: ChannelId,
        /// The batch's message id.
        batch: u64,
    },
    /// A message id seen before, without the resend flag.
    #[error("duplicate message id {id} ({command}) on channel {channel} (not marked as a resend)")]
    Duplicate {
        /// The channel.
        channel: ChannelId,
        /// The message id.
        id: u64,
        /// The message.
        command: Command,
    },
    /// A frame naming another session than its channel's.
    #[error("frame for session {got:016x} on channel {channel} of session {session:016x}")]
    WrongSession {
        /// The channel.
        channel: ChannelId,
        /// The session the frame names.
        got: u64,
        /// The channel's session.
        session: u64,
    },
    /// A bind to a session this receiver does not hold.
    #[error("bind of channel {channel} to unknown session {session:016x}")]
    UnknownSession {
        /// The channel.
        channel: ChannelId,
        /// The session named.
        session: u64,
    },
    /// A bind of a channel number the session does not have.
    #[error("bind of channel {channel} to session {session:016x} of {channels} channels")]
    NoSuchChannel {
        /// The channel.
        channel: ChannelId,
        /// The session.
        session: u64,
        /// How many channels it has.
        channels: u16,
    },
    /// A guest size that is not a positive multiple of the page size.
    #[error("guest memory of {bytes} bytes is not a positive multiple of the page size")]
    MemorySize {
        /// The size asked for.
        bytes: u64,
    },
    /// A ROUND_END past the last round number.
    #[error("round counter overflow")]
    RoundOverflow,
    /// A setup that asks for authenticated frames without a proven key.
    #[error("the setup asks for authenticated frames without proving a key")]
    MacWithoutKey,
    /// A page batch in a codec NEGOTIATE did not agree on.
    #[error("a page batch in {codec:?}, which the negotiation did not agree on")]
    CodecNotAgreed {
        /// The batch's codec.
        codec: crate::codec::CodecId,
    },
    /// A setup response that takes a delta base the setup did not offer.
    #[error("the destination took a delta base the setup did not offer")]
    DeltaUnoffered,
    /// A page sent as a reference to a page the destination does not hold
    /// with the content the reference names.
    #[error("page {page} was sent as a reference to page {target}, which does not hold that content here")]
    BadReference {
        /// The page the reference fills.
        page: u64,
        /// The page it names.
        target: u64,
    },
    /// A page sent as a patch of a region the destination does not hold
    /// with the content the patch names, or whose ops build no page.
    #[error("page {page} was sent as a patch of the region at byte {base}: {cause}")]
    BadPatch {
        /// The page the patch fills.
        page: u64,
        /// The region's first byte.
        base: u64,
        /// What is wrong with it.
        cause: PatchCause,
    },
}

/// What is wrong with a patch ([`Violation::BadPatch`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PatchCause {
    /// Its region's bytes here do not carry the patch's tag.
    #[error("the region does not hold that content here")]
    Region,
    /// Its ops build no page.
    #[error("{0}")]
    Ops(crate::wire::patch::PatchError),
}

fn round_text(round: Option<u32>) -> String {
    round.map(|r| format!("({r})")).unwrap_or_default()
}

fn channel_text(channel: Option<ChannelId>) -> String {
    match channel {
        Some(c) => format!("channel {c}"),
        None => "the first connection".into(),
    }
}

/// Why a receiver cannot host a guest now: a limit of its own, the host's
/// admission check, or its memory.
#[derive(Debug, thiserror::Error)]
pub enum Shortfall {
    /// Too many connections that have not proved the key; this one, its
    /// peer address's oldest, was closed for a newer one.
    #[error("this receiver holds its limit of {limit} connections that have not proved the key, and closed this one, its peer address's oldest, for a newer one: try again")]
    Pending {
        /// The limit.
        limit: usize,
    },
    /// Too many sessions at once.
    #[error("this receiver is at its limit of {limit} sessions at once")]
    Sessions {
        /// The limit.
        limit: usize,
    },
    /// The channels' frames in flight would exceed the receiver's budget.
    #[error("{channels} channels may hold {bytes} bytes of frames in flight, over this receiver's limit of {limit} bytes")]
    InFlight {
        /// Channels asked for.
        channels: u16,
        /// Bytes they may hold in flight.
        bytes: u64,
        /// The receiver's limit.
        limit: u64,
    },
    /// Kept zstd streams beyond what the receiver decodes at once.
    #[error("this receiver decodes at most {limit} kept zstd streams at once")]
    KeptStreams {
        /// The limit.
        limit: usize,
    },
    /// A guest larger than the receiver takes.
    #[error("guest of {bytes} bytes exceeds this receiver's limit of {limit} bytes")]
    GuestSize {
        /// The guest's size.
        bytes: u64,
        /// The receiver's limit.
        limit: u64,
    },
    /// The host refused the guest (its memory budget, a paused node), in
    /// its own words.
    #[error("{0}")]
    Refused(String),
    /// The guest's memory could not be made.
    #[error("{0}")]
    Memory(#[source] MemoryError),
    /// A fault injected by a test (the `faults` feature).
    #[error("injected fault at {0:?}")]
    Injected(FaultPoint),
}

/// Which of the guest backend's steps failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestStep {
    /// Reading the paused guest's device and vCPU state.
    SaveState,
    /// The step that must hold before GO (a saved guest's file marked
    /// consumed).
    BeforeGo,
}

impl std::fmt::Display for GuestStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::SaveState => "saving its state",
            Self::BeforeGo => "before GO",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::MigrationError;

    #[test]
    fn violations_read_as_the_protocol_names_them() {
        let e = MigrationError::from(Violation::OutOfTurn {
            got: Command::RoundEnd,
            round: Some(3),
            state: DestState::AwaitGo,
        });
        assert_eq!(
            e.to_string(),
            "protocol violation: ROUND_END(3) received in state AwaitGo"
        );
        assert_eq!(e.abort_code(), crate::wire::AbortCode::Protocol);
        let e = Violation::Credits {
            channel: None,
            credits: 0,
        };
        assert_eq!(e.to_string(), "the first connection granted 0 credits");
        let e = Violation::Unexpected {
            want: "READY",
            got: Command::Complete,
        };
        assert_eq!(e.to_string(), "expected READY, got COMPLETE");
    }

    #[test]
    fn a_shortfall_is_a_resources_abort_and_not_the_peers_fault() {
        let e = MigrationError::from(Shortfall::Sessions { limit: 4 });
        assert_eq!(e.abort_code(), crate::wire::AbortCode::Resources);
        assert!(!e.is_peer_fault());
        assert_eq!(
            e.to_string(),
            "cannot host the guest: this receiver is at its limit of 4 sessions at once"
        );
    }
}

/// Why the two sides cannot work together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Mismatch {
    /// No protocol version in common.
    #[error("source speaks versions {min}..={max}, this destination speaks {ours}")]
    Version {
        /// The source's lowest version.
        min: u8,
        /// The source's highest version.
        max: u8,
        /// The destination's version.
        ours: u8,
    },
    /// Another page size.
    #[error("page size {theirs} (this destination uses {ours})")]
    PageSize {
        /// The source's page size.
        theirs: u32,
        /// The destination's.
        ours: u32,
    },
    /// The destination answered NEGOTIATE with what the source does not speak.
    #[error("destination chose version {version} and page size {page_size}")]
    Chosen {
        /// The version it chose.
        version: u8,
        /// Its page size.
        page_size: u32,
    },
    /// The destination cannot decode the codec asked for.
    #[error("destination cannot decode {codec}")]
    Codec {
        /// The codec.
        codec: crate::codec::CodecChoice,
    },
    /// A KVM guest for a receiver without a working `/dev/kvm`.
    #[error("a KVM guest, and this receiver has no working /dev/kvm")]
    NoKvm,
    /// TLS bytes at a receiver without TLS.
    #[error("the source speaks TLS: this receiver runs without --tls")]
    SourceSpeaksTls,
    /// Plain frames at a receiver that takes TLS only.
    #[error("this receiver takes TLS only: start the source with --tls")]
    TlsOnly,
    /// The receiver's TLS handshake failed, in rustls's words.
    #[error("TLS handshake failed: {0}")]
    TlsHandshake(String),
    /// The source's TLS handshake on a channel failed, in rustls's words.
    #[error("channel {channel} to {target}: {why} (does the receiver run with --tls?)")]
    TlsConnect {
        /// The channel.
        channel: ChannelId,
        /// The receiver's address.
        target: String,
        /// rustls's account.
        why: String,
    },
    /// The guest's state cannot be restored here, in the backend's words.
    #[error("{0}")]
    GuestState(String),
}

/// Why a peer is not taken as the one holding the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthFailure {
    /// The destination's answer to a bind does not prove the session.
    #[error("the destination's answer to the bind of channel {channel} does not prove the session's secret")]
    BindAnswer {
        /// The channel.
        channel: ChannelId,
    },
    /// The destination did not prove the key.
    #[error("the destination did not prove the shared key: not sending it the guest")]
    Destination,
    /// The source proved another key.
    #[error("the source's proof of the key is wrong: it holds another key")]
    WrongKey,
    /// A keyed session without TLS whose frames are not tagged.
    #[error("this receiver takes keyed sessions without TLS only with every frame authenticated, and the source does not tag its frames (a ferry older than this receiver: upgrade it, or use --tls)")]
    UntaggedFrames,
    /// The receiver needs a key and the source proved none.
    #[error(
        "this receiver requires the shared key and the source proved none (give the source --key)"
    )]
    KeyRequired,
    /// The source proves a key the receiver has none to check against.
    #[error(
        "the source proves a key but this receiver has none to check it (give the receiver --key)"
    )]
    NoKeyToCheck,
    /// An unauthenticated session from off loopback.
    #[error("unauthenticated session from {peer} refused: without --key this receiver takes loopback peers only (or --insecure)")]
    NotLoopback {
        /// The peer's address.
        peer: String,
    },
    /// An unauthenticated session at a receiver that takes none.
    #[error("this receiver takes authenticated sessions only")]
    AuthenticatedOnly,
    /// A bind whose proof is wrong.
    #[error("bind of channel {channel} to session {session:016x} with a wrong proof")]
    BindProof {
        /// The channel.
        channel: ChannelId,
        /// The session.
        session: u64,
    },
    /// A bind that replays a nonce already used.
    #[error("bind of channel {channel} to session {session:016x} replays a used nonce")]
    BindReplay {
        /// The channel.
        channel: ChannelId,
        /// The session.
        session: u64,
    },
}
