//! The protocol's messages: one struct per command, and their encoder
//! (`decode.rs` holds the checked decoder).

use super::{Command, PageBatch, MAX_ABORT_MESSAGE};
use bytes::Bytes;

/// The kind of guest a session moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum GuestKind {
    /// ferry's synthetic guest.
    Sim = 0,
    /// A KVM guest.
    Kvm = 1,
}

impl std::fmt::Display for GuestKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Sim => "sim",
            Self::Kvm => "kvm",
        })
    }
}

/// How the switchover digest is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum VerifyMode {
    /// Per-page hashes kept current as pages move; the pause sums them.
    #[default]
    Fast = 0,
    /// Both sides hash all of memory during the pause.
    Full = 1,
}

impl std::str::FromStr for VerifyMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fast" => Ok(Self::Fast),
            "full" => Ok(Self::Full),
            _ => Err(format!("invalid verify mode {s:?}: use fast or full")),
        }
    }
}

impl std::fmt::Display for VerifyMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Fast => "fast",
            Self::Full => "full",
        })
    }
}

/// Why a migration was aborted, as a stable number on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[repr(u16)]
pub enum AbortCode {
    /// An operator cancelled it.
    Cancelled = 1,
    /// The completion or progress timeout passed.
    Timeout = 2,
    /// The destination's memory digest differs from the source's.
    DigestMismatch = 3,
    /// The peer broke the protocol.
    Protocol = 4,
    /// Something failed inside the sender of the abort.
    Internal = 5,
    /// The receiver cannot host the guest (memory, limits).
    Resources = 6,
    /// The peer's versions, codecs or page size do not match.
    Incompatible = 7,
    /// The peer did not prove the shared key (or proved a wrong one).
    Unauthenticated = 8,
}

impl AbortCode {
    pub(super) fn from_u16(v: u16) -> Option<Self> {
        use AbortCode::*;
        Some(match v {
            1 => Cancelled,
            2 => Timeout,
            3 => DigestMismatch,
            4 => Protocol,
            5 => Internal,
            6 => Resources,
            7 => Incompatible,
            8 => Unauthenticated,
            _ => return None,
        })
    }
}

/// Source → destination, first frame of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiate {
    /// Oldest protocol version the source speaks.
    pub min_version: u8,
    /// Newest protocol version the source speaks.
    pub max_version: u8,
    /// Capability bits (`CAP_*`) the source asks for.
    pub capabilities: u32,
    /// Codecs the source can send, as a mask of `CodecId::bit`.
    pub codecs: u32,
    /// Guest page size in bytes.
    pub page_size: u32,
    /// A fresh random challenge: a destination that holds the key proves it
    /// over this in [`SessionSetupResponse::proof`].
    pub nonce: [u8; 16],
}

/// Destination → source: what both sides will use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NegotiateResponse {
    /// The version chosen.
    pub version: u8,
    /// Capabilities both support.
    pub capabilities: u32,
    /// Codecs the destination can decode.
    pub codecs: u32,
    /// Page size, echoed.
    pub page_size: u32,
    /// A fresh random challenge: a source that holds the key proves it over
    /// this in [`SessionSetup::proof`].
    pub nonce: [u8; 16],
}

/// Capability in [`Negotiate::capabilities`]: the destination applies page
/// batches that carry references (dense pages, see [`crate::wire::Read`]).
pub const CAP_PAGE_REFS: u32 = 1;
/// Capability in [`Negotiate::capabilities`]: the destination applies page
/// batches that carry patches (dense pages, see [`crate::wire::patch`]).
pub const CAP_PAGE_PATCHES: u32 = 2;
/// Every capability this build has.
pub const CAPABILITIES: u32 = CAP_PAGE_REFS | CAP_PAGE_PATCHES;

/// Flag in [`SessionSetup::flags`]: leave the guest paused on the destination
/// after the hand-off (as libvirt's `--suspend`).
pub const SETUP_LEAVE_PAUSED: u32 = 1;

/// Flag in [`SessionSetup::flags`]: a [`SessionLabel`] follows the fixed
/// fields (set by the encoder when `label` is `Some`).
pub const SETUP_LABELLED: u32 = 2;
/// Flag in [`SessionSetup::flags`]: a proof of the key follows (set by the
/// encoder when `proof` is `Some`).
pub const SETUP_PROVEN: u32 = 4;
/// Flag in [`SessionSetup::flags`]: after the setup response (and after
/// each bind's response), every frame of the session carries a tag (see
/// [`FrameMac`](super::FrameMac)). A source with a key and without TLS sets
/// it; a receiver with a key refuses a plain session without it. Covered by
/// the setup's proof, so no one on the path can strip it.
pub const SETUP_FRAME_MAC: u32 = 8;
/// Flag in [`SessionSetup::flags`]: a [`DeltaBase`] follows the label (set
/// by the encoder when `base` is `Some`).
pub const SETUP_DELTA: u32 = 16;

/// A failback's offer (source → destination): the migration that last
/// brought this VM from the destination, and the digest of the memory it
/// brought. A destination that still holds that image takes it as the
/// session's starting memory, and round 0 then carries only the pages that
/// changed since.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeltaBase {
    /// The migration's id, as in a [`SessionLabel`] (1 to
    /// [`MAX_LABEL_LEN`] name characters).
    pub migration_id: String,
    /// The digest (see [`crate::digest`]) of the memory it brought.
    pub digest: u64,
}

/// Longest string in a [`SessionLabel`], bytes.
pub const MAX_LABEL_LEN: usize = 255;

/// Who a session is for, when agents migrate: the VM's name, the migration's
/// id and the source node, so the destination agent can host the VM under its
/// name and list the migration. Each is 1 to [`MAX_LABEL_LEN`] letters,
/// digits, '-', '_' or '.' (as names in the cluster file), sent as a length
/// byte and the bytes; anything else is refused at decoding.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SessionLabel {
    /// The VM's name.
    pub vm: String,
    /// The migration's id, as the source agent lists it.
    pub migration_id: String,
    /// The source node's name.
    pub source_node: String,
}

/// Source → destination: creates the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionSetup {
    /// Guest memory size in bytes.
    pub memory_bytes: u64,
    /// Channels the source will open, this one included.
    pub channels: u16,
    /// The codec the source sends with: a `CodecId`, or 3 for `auto`
    /// (informational: each batch names its own).
    pub codec: u8,
    /// The zstd level, when the codec is zstd.
    pub codec_level: i8,
    /// The guest's kind.
    pub guest_kind: GuestKind,
    /// The verification mode.
    pub verify: VerifyMode,
    /// The source's bandwidth cap in bytes/s, 0 for none.
    pub max_bandwidth: u64,
    /// `SETUP_*` flags ([`SETUP_LABELLED`] follows `label`,
    /// [`SETUP_PROVEN`] follows `proof`).
    pub flags: u32,
    /// Who the session is for (agents' migrations).
    pub label: Option<SessionLabel>,
    /// The image this session may start from, when the source offers one
    /// (agents' failbacks).
    pub base: Option<DeltaBase>,
    /// HMAC-SHA256 under the shared key of both nonces and this setup's
    /// fields (see `migration::auth`), when the source holds a key.
    pub proof: Option<[u8; 32]>,
}

impl SessionSetup {
    /// A plain setup: a synthetic guest of `memory_bytes` over `channels`
    /// channels, lz4, fast verify, no cap, no flags, no label and no proof;
    /// tests, fuzz seeds and the simulation change what they need.
    pub fn plain(memory_bytes: u64, channels: u16) -> Self {
        Self {
            memory_bytes,
            channels,
            codec: crate::codec::CodecId::Lz4 as u8,
            codec_level: 0,
            guest_kind: GuestKind::Sim,
            verify: VerifyMode::Fast,
            max_bandwidth: 0,
            flags: 0,
            label: None,
            base: None,
            proof: None,
        }
    }
}

/// Destination → source: the session exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionSetupResponse {
    /// The proof further channels present to bind to this session.
    pub bind_token: [u8; 16],
    /// Credits each channel starts with.
    pub initial_credits: u16,
    /// The destination's proof of the shared key over both nonces and the
    /// session id, when the setup carried the source's.
    pub proof: Option<[u8; 32]>,
    /// Whether the destination took the setup's [`DeltaBase`]: its memory
    /// now holds that image, so round 0 may leave out unchanged pages.
    pub delta: bool,
}

/// Source → destination: join (or rejoin, after a failure) the session in
/// the header as the channel in the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelBind {
    /// A fresh random nonce for this bind; the destination accepts each
    /// once per session.
    pub nonce: [u8; 16],
    /// HMAC-SHA256 under the session's bind secret of the session, channel
    /// and nonce.
    pub proof: [u8; 32],
}

/// Destination → source: the channel is bound (credits in the header).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelBindResponse {
    /// The destination's proof of the bind secret over the same fields.
    pub proof: [u8; 32],
}

/// Either way: a keepalive on an idle channel; the peer echoes the value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Echo {
    /// Any value, returned in the [`Message::EchoResponse`].
    pub value: u64,
}

/// Destination → source: a batch was applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchAck {
    /// The message id of the applied batch.
    pub message_id: u64,
    /// Pages it held.
    pub pages: u32,
}

/// Source → destination: all batches of a round are acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoundEnd {
    /// The round that ended.
    pub round: u32,
    /// Pages sent in it.
    pub pages: u64,
    /// Whether the next round is the final one, with the guest paused.
    pub final_next: bool,
}

/// Source → destination: the guest is paused and every page is applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Switchover {
    /// The final round's number.
    pub final_round: u32,
    /// The source's memory digest.
    pub digest: u64,
    /// How the digest was computed.
    pub verify: VerifyMode,
    /// Pre-copy rounds before the pause.
    pub rounds: u32,
    /// Measured dirty rate, bytes/s.
    pub dirty_rate_bps: u64,
    /// Highest auto-converge throttle applied.
    pub throttle_pct_max: u8,
    /// The source's CPU time so far.
    pub source_cpu_ms: u64,
    /// The guest's device/vCPU state, opaque to the wire.
    pub state: Bytes,
}

/// Destination → source: applied and verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready {
    /// The destination's digest.
    pub digest: u64,
}

/// Destination → source: the guest runs (or waits paused) here now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Complete {
    /// The destination's CPU time for the session.
    pub destination_cpu_ms: u64,
    /// Whether the guest was resumed (false when asked to leave it paused).
    pub resumed: bool,
}

/// Either way: the session ends with this error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Abort {
    /// What kind of failure.
    pub code: AbortCode,
    /// A human-readable explanation.
    pub message: String,
}

/// Every message of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// See [`Negotiate`].
    Negotiate(Negotiate),
    /// See [`NegotiateResponse`].
    NegotiateResponse(NegotiateResponse),
    /// See [`SessionSetup`].
    SessionSetup(SessionSetup),
    /// See [`SessionSetupResponse`].
    SessionSetupResponse(SessionSetupResponse),
    /// See [`ChannelBind`].
    ChannelBind(ChannelBind),
    /// See [`ChannelBindResponse`].
    ChannelBindResponse(ChannelBindResponse),
    /// See [`PageBatch`].
    PageBatch(PageBatch),
    /// See [`BatchAck`].
    BatchAck(BatchAck),
    /// See [`RoundEnd`].
    RoundEnd(RoundEnd),
    /// See [`Switchover`].
    Switchover(Switchover),
    /// See [`Ready`].
    Ready(Ready),
    /// Source → destination: run the guest.
    Go,
    /// See [`Complete`].
    Complete(Complete),
    /// See [`Abort`].
    Abort(Abort),
    /// See [`Echo`].
    Echo(Echo),
    /// The answer to an [`Echo`], with its value.
    EchoResponse(Echo),
}

impl Message {
    /// The command this message travels under.
    pub fn command(&self) -> Command {
        match self {
            Self::Negotiate(_) => Command::Negotiate,
            Self::NegotiateResponse(_) => Command::NegotiateResponse,
            Self::SessionSetup(_) => Command::SessionSetup,
            Self::SessionSetupResponse(_) => Command::SessionSetupResponse,
            Self::ChannelBind(_) => Command::ChannelBind,
            Self::ChannelBindResponse(_) => Command::ChannelBindResponse,
            Self::PageBatch(_) => Command::PageBatch,
            Self::BatchAck(_) => Command::BatchAck,
            Self::RoundEnd(_) => Command::RoundEnd,
            Self::Switchover(_) => Command::Switchover,
            Self::Ready(_) => Command::Ready,
            Self::Go => Command::Go,
            Self::Complete(_) => Command::Complete,
            Self::Abort(_) => Command::Abort,
            Self::Echo(_) => Command::Echo,
            Self::EchoResponse(_) => Command::EchoResponse,
        }
    }

    /// Encodes the payload (not the header). Page batches are encoded by
    /// [`BatchEncoder`](super::BatchEncoder) and are re-encoded here only for tests.
    pub fn encode_payload(&self) -> Vec<u8> {
        let mut o = Vec::new();
        match self {
            Self::Negotiate(m) => {
                o.push(m.min_version);
                o.push(m.max_version);
                o.extend_from_slice(&0u16.to_le_bytes());
                o.extend_from_slice(&m.capabilities.to_le_bytes());
                o.extend_from_slice(&m.codecs.to_le_bytes());
                o.extend_from_slice(&m.page_size.to_le_bytes());
                o.extend_from_slice(&m.nonce);
            }
            Self::NegotiateResponse(m) => {
                o.push(m.version);
                o.extend_from_slice(&[0, 0, 0]);
                o.extend_from_slice(&m.capabilities.to_le_bytes());
                o.extend_from_slice(&m.codecs.to_le_bytes());
                o.extend_from_slice(&m.page_size.to_le_bytes());
                o.extend_from_slice(&m.nonce);
            }
            Self::SessionSetup(m) => {
                o.extend_from_slice(&m.memory_bytes.to_le_bytes());
                o.extend_from_slice(&m.channels.to_le_bytes());
                o.push(m.codec);
                o.push(m.codec_level as u8);
                o.push(m.guest_kind as u8);
                o.push(m.verify as u8);
                o.extend_from_slice(&0u16.to_le_bytes());
                o.extend_from_slice(&m.max_bandwidth.to_le_bytes());
                let mut flags = m.flags & !(SETUP_LABELLED | SETUP_PROVEN | SETUP_DELTA);
                if m.label.is_some() {
                    flags |= SETUP_LABELLED;
                }
                if m.base.is_some() {
                    flags |= SETUP_DELTA;
                }
                if m.proof.is_some() {
                    flags |= SETUP_PROVEN;
                }
                o.extend_from_slice(&flags.to_le_bytes());
                if let Some(l) = &m.label {
                    for text in [&l.vm, &l.migration_id, &l.source_node] {
                        push_name(&mut o, text);
                    }
                }
                if let Some(b) = &m.base {
                    push_name(&mut o, &b.migration_id);
                    o.extend_from_slice(&b.digest.to_le_bytes());
                }
                if let Some(proof) = &m.proof {
                    o.extend_from_slice(proof);
                }
            }
            Self::SessionSetupResponse(m) => {
                o.extend_from_slice(&m.bind_token);
                o.extend_from_slice(&m.initial_credits.to_le_bytes());
                o.push(u8::from(m.proof.is_some()) | u8::from(m.delta) << 1);
                if let Some(proof) = &m.proof {
                    o.extend_from_slice(proof);
                }
            }
            Self::ChannelBind(m) => {
                o.extend_from_slice(&m.nonce);
                o.extend_from_slice(&m.proof);
            }
            Self::ChannelBindResponse(m) => o.extend_from_slice(&m.proof),
            Self::Echo(m) | Self::EchoResponse(m) => o.extend_from_slice(&m.value.to_le_bytes()),
            Self::Go => {}
            Self::PageBatch(b) => o.extend_from_slice(&b.encode_for_test()),
            Self::BatchAck(m) => {
                o.extend_from_slice(&m.message_id.to_le_bytes());
                o.extend_from_slice(&m.pages.to_le_bytes());
            }
            Self::RoundEnd(m) => {
                o.extend_from_slice(&m.round.to_le_bytes());
                o.extend_from_slice(&m.pages.to_le_bytes());
                o.push(u8::from(m.final_next));
            }
            Self::Switchover(m) => {
                o.extend_from_slice(&m.final_round.to_le_bytes());
                o.extend_from_slice(&m.digest.to_le_bytes());
                o.push(m.verify as u8);
                o.push(m.throttle_pct_max);
                o.extend_from_slice(&m.rounds.to_le_bytes());
                o.extend_from_slice(&m.dirty_rate_bps.to_le_bytes());
                o.extend_from_slice(&m.source_cpu_ms.to_le_bytes());
                o.extend_from_slice(&(m.state.len() as u32).to_le_bytes());
                o.extend_from_slice(&m.state);
            }
            Self::Ready(m) => o.extend_from_slice(&m.digest.to_le_bytes()),
            Self::Complete(m) => {
                o.extend_from_slice(&m.destination_cpu_ms.to_le_bytes());
                o.push(u8::from(m.resumed));
            }
            Self::Abort(m) => {
                let msg = truncate_utf8(&m.message, MAX_ABORT_MESSAGE);
                o.extend_from_slice(&(m.code as u16).to_le_bytes());
                o.extend_from_slice(&(msg.len() as u16).to_le_bytes());
                o.extend_from_slice(msg.as_bytes());
            }
        }
        o
    }
}

/// A name as a length byte and its bytes. Encoders keep to the limit; a
/// longer string is cut at a character boundary rather than sent malformed.
fn push_name(o: &mut Vec<u8>, text: &str) {
    let text = truncate_utf8(text, MAX_LABEL_LEN);
    o.push(text.len() as u8);
    o.extend_from_slice(text.as_bytes());
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{encode_frame, DecodeError, FrameDecoder, Header, Limits};
    use bytes::BytesMut;

    pub(crate) fn samples() -> Vec<Message> {
        vec![
            Message::Negotiate(Negotiate {
                min_version: 1,
                max_version: 1,
                capabilities: 0,
                codecs: 7,
                page_size: 4096,
                nonce: [4; 16],
            }),
            Message::NegotiateResponse(NegotiateResponse {
                version: 1,
                capabilities: 0,
                codecs: 7,
                page_size: 4096,
                nonce: [5; 16],
            }),
            Message::SessionSetup(SessionSetup {
                memory_bytes: 1 << 30,
                channels: 4,
                codec: 2,
                codec_level: 3,
                guest_kind: GuestKind::Sim,
                verify: VerifyMode::Full,
                max_bandwidth: 125_000_000,
                flags: SETUP_LEAVE_PAUSED,
                label: None,
                base: None,
                proof: None,
            }),
            Message::SessionSetup(SessionSetup {
                memory_bytes: 1 << 30,
                channels: 4,
                codec: 3,
                codec_level: 0,
                guest_kind: GuestKind::Sim,
                verify: VerifyMode::Fast,
                max_bandwidth: 0,
                flags: SETUP_LABELLED | SETUP_PROVEN,
                label: Some(SessionLabel {
                    vm: "web-1".into(),
                    migration_id: "m-0042".into(),
                    source_node: "node-a.example".into(),
                }),
                base: None,
                proof: Some([9; 32]),
            }),
            Message::SessionSetup(SessionSetup {
                flags: SETUP_LABELLED | SETUP_DELTA | SETUP_PROVEN,
                label: Some(SessionLabel {
                    vm: "web-1".into(),
                    migration_id: "m-0043".into(),
                    source_node: "node-b".into(),
                }),
                base: Some(DeltaBase {
                    migration_id: "m-0042".into(),
                    digest: 0x0123_4567_89ab_cdef,
                }),
                proof: Some([9; 32]),
                ..SessionSetup::plain(1 << 30, 4)
            }),
            Message::SessionSetupResponse(SessionSetupResponse {
                bind_token: [7; 16],
                initial_credits: 8,
                proof: None,
                delta: false,
            }),
            Message::SessionSetupResponse(SessionSetupResponse {
                bind_token: [7; 16],
                initial_credits: 8,
                proof: Some([3; 32]),
                delta: true,
            }),
            Message::ChannelBind(ChannelBind {
                nonce: [9; 16],
                proof: [8; 32],
            }),
            Message::ChannelBindResponse(ChannelBindResponse { proof: [6; 32] }),
            Message::Echo(Echo { value: 41 }),
            Message::EchoResponse(Echo { value: 41 }),
            Message::BatchAck(BatchAck {
                message_id: 77,
                pages: 256,
            }),
            Message::RoundEnd(RoundEnd {
                round: 3,
                pages: 1000,
                final_next: true,
            }),
            Message::Switchover(Switchover {
                final_round: 4,
                digest: 0xdead_beef,
                verify: VerifyMode::Fast,
                rounds: 4,
                dirty_rate_bps: 100_000_000,
                throttle_pct_max: 30,
                source_cpu_ms: 1234,
                state: Bytes::from_static(b"{\"state\":1}"),
            }),
            Message::Ready(Ready { digest: 5 }),
            Message::Go,
            Message::Complete(Complete {
                destination_cpu_ms: 99,
                resumed: true,
            }),
            Message::Abort(Abort {
                code: AbortCode::DigestMismatch,
                message: "digest differs".into(),
            }),
        ]
    }

    fn frame_of(m: &Message) -> Vec<u8> {
        let payload = m.encode_payload();
        encode_frame(&Header::new(m.command()), &payload)
    }

    #[test]
    fn a_label_outside_the_name_alphabet_is_refused_naming_its_field() {
        for (vm, node, field) in [
            ("web\n1", "a", "setup.label.vm"),
            ("web-1", "\x1b[2Jnode", "setup.label.source_node"),
            ("", "a", "setup.label.vm"),
            ("web 1", "a", "setup.label.vm"),
            ("wéb", "a", "setup.label.vm"),
        ] {
            let m = Message::SessionSetup(SessionSetup {
                memory_bytes: 1 << 20,
                channels: 1,
                codec: 1,
                codec_level: 0,
                guest_kind: GuestKind::Sim,
                verify: VerifyMode::Fast,
                max_bandwidth: 0,
                flags: 0,
                label: Some(SessionLabel {
                    vm: vm.into(),
                    migration_id: "m-1".into(),
                    source_node: node.into(),
                }),
                base: None,
                proof: None,
            });
            let bytes = frame_of(&m);
            let mut buf = BytesMut::from(&bytes[..]);
            let f = FrameDecoder::new().decode(&mut buf).unwrap().unwrap();
            assert_eq!(
                Message::decode(&f.header, f.payload, Limits::BEFORE_SETUP),
                Err(DecodeError::Invalid { field }),
                "{vm:?} {node:?}"
            );
        }
    }

    #[test]
    fn every_message_round_trips() {
        for m in samples() {
            let bytes = frame_of(&m);
            let mut buf = BytesMut::from(&bytes[..]);
            let f = FrameDecoder::new().decode(&mut buf).unwrap().unwrap();
            assert_eq!(
                Message::decode(&f.header, f.payload, Limits::BEFORE_SETUP).unwrap(),
                m
            );
        }
    }

    #[test]
    fn every_truncation_and_extension_is_an_error() {
        for m in samples() {
            let payload = m.encode_payload();
            let header = Header::new(m.command());
            for cut in 0..payload.len() {
                let r = Message::decode(
                    &header,
                    Bytes::copy_from_slice(&payload[..cut]),
                    Limits::BEFORE_SETUP,
                );
                assert!(r.is_err(), "{:?} cut at {cut} decoded", m.command());
            }
            let mut long = payload.clone();
            long.push(0);
            let r = Message::decode(&header, Bytes::from(long), Limits::BEFORE_SETUP);
            assert!(r.is_err(), "{:?} with a trailing byte decoded", m.command());
        }
    }

    #[test]
    fn bad_values_name_their_field() {
        let mut setup = samples()[2].encode_payload();
        setup[8] = 0; // channels = 0
        setup[9] = 0;
        let err = Message::decode(
            &Header::new(Command::SessionSetup),
            Bytes::from(setup),
            Limits::BEFORE_SETUP,
        )
        .unwrap_err();
        assert!(err.to_string().contains("setup.channels"), "{err}");
        let abort = [1u8, 0, 2, 0, 0xff, 0xfe];
        let err = Message::decode(
            &Header::new(Command::Abort),
            Bytes::copy_from_slice(&abort),
            Limits::BEFORE_SETUP,
        )
        .unwrap_err();
        assert_eq!(
            err,
            DecodeError::Invalid {
                field: "abort.message"
            }
        );
    }

    #[test]
    fn long_abort_messages_are_truncated_on_a_char_boundary() {
        let m = Message::Abort(Abort {
            code: AbortCode::Internal,
            message: "é".repeat(3000),
        });
        let p = m.encode_payload();
        let back = Message::decode(
            &Header::new(Command::Abort),
            Bytes::from(p),
            Limits::BEFORE_SETUP,
        )
        .unwrap();
        let Message::Abort(a) = back else { panic!() };
        assert_eq!(a.message.len(), MAX_ABORT_MESSAGE);
    }
}
