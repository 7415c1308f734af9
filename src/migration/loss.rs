//! Why a channel or a whole session lost its peer: the transport failing,
//! which failover rides out channel by channel, as opposed to a violation.

use crate::wire::{ChannelId, Command};
use std::time::Duration;

/// Why a channel was lost.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelLoss {
    /// The peer closed it inside a frame's header.
    #[error("closed inside a frame header")]
    ClosedInHeader,
    /// The peer closed it inside the payload of a `command` frame.
    #[error("closed inside a {0:?} payload")]
    ClosedInPayload(Command),
    /// The receiver closed or reset a new connection instead of answering
    /// it.
    #[error(
        "the receiver closed the connection instead of sending {what} ({}); it gave no reason: its log says why",
        closed_text(*.error)
    )]
    ClosedInsteadOf {
        /// The answer it owed.
        what: &'static str,
        /// The socket's error (a reset, say); `None`: the stream ended.
        error: Option<std::io::ErrorKind>,
    },
    /// Bound again before a control message queued for it went out.
    #[error("replaced before its control message went out")]
    Replaced,
    /// Declared dead while a control message was being written on it.
    #[error("failed while sending a control message")]
    FailedWhileSending,
    /// No channel of the session is up to carry a reply.
    #[error("no channel is up to reply on")]
    NoneUp,
    /// The connection was reset (an injected fault, or the simulation's
    /// network).
    #[error("reset")]
    Reset,
}

/// Why a session lost its peer for good.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionLoss {
    /// Every channel is lost (no cause recorded).
    #[error("every channel is lost")]
    AllLost,
    /// Every channel is lost and none rebound within the peer timeout.
    #[error("every channel is lost and none rebound within {within:?}")]
    NoneRebound {
        /// The peer timeout.
        within: Duration,
    },
    /// Every channel is lost and the peer refused the rebind of `channel`.
    #[error("every channel is lost and none can rebind (channel {channel}: {why})")]
    RebindRefused {
        /// The channel whose rebind failed last.
        channel: ChannelId,
        /// The refusal, as the peer or the socket gave it.
        why: Box<str>,
    },
    /// No frame came on any channel for `after`, since a channel was lost.
    #[error("no frame on any channel for {after:?} after {lost}")]
    Silent {
        /// The idle timeout.
        after: Duration,
        /// The loss that came before the silence.
        lost: Box<str>,
    },
}

fn closed_text(error: Option<std::io::ErrorKind>) -> String {
    error.map_or_else(|| "end of stream".into(), |kind| kind.to_string())
}
