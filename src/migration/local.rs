//! Faults of this side's own: a task that panicked or was cancelled, a
//! driver that asked its machine for a step out of order. Never the peer's
//! doing, and never reported to the peer as its protocol error.

use super::source_machine::Stage;
use crate::wire::ChannelId;

/// A task of this side's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Task {
    /// A destination channel's reader.
    #[error("channel {0}'s task")]
    Channel(ChannelId),
    /// A page batch's apply on the blocking pool.
    #[error("a page batch's apply task")]
    Apply,
    /// The source's encoder.
    #[error("the encoder task")]
    Encoder,
    /// A channel's bind.
    #[error("a bind task")]
    Bind,
    /// The full digest of guest memory.
    #[error("the digest task")]
    Digest,
    /// A failback's delta: the source's round-0 scan or the destination's
    /// copy of its retained image.
    #[error("the delta task")]
    Delta,
}

/// What went wrong on this side.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LocalFault {
    /// A task panicked (its text is in this side's log) or was cancelled.
    #[error("{task} {}", if *.panicked { "panicked" } else { "was cancelled" })]
    Task {
        /// Which.
        task: Task,
        /// Whether it panicked (else it was cancelled).
        panicked: bool,
    },
    /// The source's driver asked for a hand-off step its rounds machine is
    /// not at.
    #[error("{step} at {stage:?}")]
    OutOfStep {
        /// The step asked for.
        step: &'static str,
        /// Where the machine was.
        stage: Stage,
    },
    /// A state the code rules out was reached.
    #[error("unreachable: {0}")]
    Unreachable(&'static str),
}
