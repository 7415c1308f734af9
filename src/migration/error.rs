//! The migration's error: peer faults, local decisions and the environment kept
//! apart, each with the abort code it sends.

use crate::codec::CodecError;
use crate::memory::MemoryError;
use crate::migration::local::LocalFault;
use crate::migration::loss::{ChannelLoss, SessionLoss};
use crate::migration::policy::GiveUp;
use crate::migration::violation::{AuthFailure, GuestStep, Mismatch, Shortfall, Violation};
use crate::migration::ConfigError;
use crate::wire::ChannelId;
use crate::wire::{AbortCode, DecodeError};
use std::time::Duration;

/// Why a migration failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The peer sent a malformed frame.
    #[error("malformed frame from peer: {0}")]
    Decode(#[from] DecodeError),
    /// The peer sent a well-formed message that the protocol does not allow now.
    #[error("protocol violation: {0}")]
    Protocol(#[from] Violation),
    /// The peer aborted the migration.
    #[error("peer aborted ({code:?}): {}", crate::wire::escape_text(message))]
    RemoteAbort {
        /// The peer's reason code.
        code: AbortCode,
        /// The peer's explanation.
        message: String,
    },
    /// The destination's memory differs from the source's at switchover.
    #[error("memory digest mismatch: source {source_digest:#018x}, destination {destination_digest:#018x}")]
    DigestMismatch {
        /// The source's digest.
        source_digest: u64,
        /// The destination's digest.
        destination_digest: u64,
    },
    /// The two sides cannot work together (version, codecs, page size, guest kind).
    #[error("incompatible peer: {0}")]
    Incompatible(Box<Mismatch>),
    /// The receiver cannot host the guest.
    #[error("cannot host the guest: {0}")]
    Resources(#[from] Shortfall),
    /// The peer did not prove the shared key, or this side may not take it
    /// unauthenticated.
    #[error("not authenticated: {0}")]
    Unauthenticated(#[from] AuthFailure),
    /// An operator cancelled the migration.
    #[error("cancelled")]
    Cancelled,
    /// The configuration is invalid.
    #[error("bad configuration: {0}")]
    Config(Box<ConfigError>),
    /// Pre-copy did not converge in time.
    #[error("{}", give_up_text(.0))]
    NotConverging(GiveUp),
    /// A step took longer than allowed.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: &'static str,
        /// How long.
        after: Duration,
    },
    /// The peer closed a channel.
    #[error("peer closed channel {channel}")]
    PeerClosed {
        /// The channel.
        channel: ChannelId,
    },
    /// A channel broke (closed mid-frame, silent past the peer timeout):
    /// its batches go to the others while it rebinds.
    #[error("channel {channel} lost: {why}")]
    ChannelLost {
        /// The channel.
        channel: ChannelId,
        /// What happened to it.
        why: ChannelLoss,
    },
    /// Every channel of the session is lost and none could rebind.
    #[error("the peer is unreachable: {0}")]
    SessionLost(SessionLoss),
    /// A socket operation failed.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Guest memory could not be created.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The guest backend failed (its vCPU state could not be read).
    #[error("guest: {step}: {why}")]
    Guest {
        /// The step that failed.
        step: GuestStep,
        /// The backend's account of it.
        why: String,
    },
    /// A batch failed to compress or decompress.
    #[error("page batch codec: {0}")]
    Codec(#[from] CodecError),
    /// A fault of this side's own (a task that panicked or ended early):
    /// never blamed on the peer.
    #[error("internal fault: {0}")]
    Internal(LocalFault),
}

fn give_up_text(g: &GiveUp) -> String {
    match g {
        GiveUp::CompletionTimeout(t) => format!(
            "migration did not converge within the completion timeout of {:.1} s; the guest keeps running on the source",
            t.as_secs_f64()
        ),
        GiveUp::NoProgress(t) => format!(
            "remaining bytes did not fall for {:.1} s (progress timeout); the guest keeps running on the source",
            t.as_secs_f64()
        ),
    }
}

impl From<Mismatch> for MigrationError {
    fn from(e: Mismatch) -> Self {
        Self::Incompatible(Box::new(e))
    }
}

impl From<ConfigError> for MigrationError {
    fn from(e: ConfigError) -> Self {
        Self::Config(Box::new(e))
    }
}

impl MigrationError {
    /// Wraps an IO error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }

    /// The code an abort for this error carries to the peer.
    pub fn abort_code(&self) -> AbortCode {
        match self {
            Self::Decode(_)
            | Self::Protocol(_)
            | Self::PeerClosed { .. }
            | Self::ChannelLost { .. } => AbortCode::Protocol,
            Self::SessionLost(_) => AbortCode::Timeout,
            Self::RemoteAbort { code, .. } => *code,
            Self::DigestMismatch { .. } => AbortCode::DigestMismatch,
            Self::Incompatible(_) => AbortCode::Incompatible,
            Self::Resources(_) | Self::Memory(_) => AbortCode::Resources,
            Self::Cancelled => AbortCode::Cancelled,
            Self::Unauthenticated(_) => AbortCode::Unauthenticated,
            Self::NotConverging(_) | Self::Timeout { .. } => AbortCode::Timeout,
            Self::Config(_)
            | Self::Io { .. }
            | Self::Codec(_)
            | Self::Guest { .. }
            | Self::Internal(_) => AbortCode::Internal,
        }
    }

    /// Whether this is a channel's transport failing (closed, reset, silent),
    /// which failover survives, rather than a fault in what the peer sent.
    pub fn is_channel_loss(&self) -> bool {
        matches!(
            self,
            Self::PeerClosed { .. } | Self::ChannelLost { .. } | Self::Io { .. }
        )
    }

    /// Whether the peer is at fault (as opposed to us or the environment).
    pub fn is_peer_fault(&self) -> bool {
        matches!(
            self,
            Self::Decode(_)
                | Self::Protocol(_)
                | Self::RemoteAbort { .. }
                | Self::DigestMismatch { .. }
                | Self::Incompatible(_)
                | Self::Unauthenticated(_)
        )
    }
}
