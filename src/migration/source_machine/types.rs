//! What the source machine and its driver hand each other.

use crate::migration::MigrationError;
use crate::page::PageRun;
use crate::wire::ChannelId;
use crate::wire::{Header, Message};

/// One batch to send: a round and up to a batch of page runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchJob {
    /// The pre-copy round its pages belong to.
    pub round: u32,
    /// The pages.
    pub runs: Vec<PageRun>,
}

/// A batch for a channel's writer to encode and send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Work {
    /// Sent for the first time.
    New(BatchJob),
    /// Sent again under its message id after its connection failed.
    Again(u64, BatchJob),
}

impl Work {
    /// The pages it carries.
    pub fn job(&self) -> &BatchJob {
        match self {
            Work::New(j) | Work::Again(_, j) => j,
        }
    }
}

/// What a writer gets when it asks for work.
#[derive(Debug)]
pub enum Next {
    /// Encode and send this.
    Work(Work),
    /// Nothing to send now: wait for a wake-up.
    Idle,
    /// This connection is dead: stop.
    Dead,
}

/// What a writer gets when it asks to send an encoded batch.
#[derive(Debug)]
pub enum Begin {
    /// Write the batch with this header: it is in flight.
    Send(Header),
    /// No credit open: wait for an acknowledgement, then ask again.
    NoCredit(Work),
    /// The connection died meanwhile: the batch went back to the queue.
    Dead,
}

/// Something for the caller to put on the wire or start.
#[derive(Debug, Clone, PartialEq)]
pub enum Transmit {
    /// A keepalive for connection `gen` of channel `chan`.
    Echo {
        /// The channel.
        chan: ChannelId,
        /// Its connection.
        gen: u32,
        /// The frame's header and message.
        header: Header,
        /// The ECHO.
        msg: Message,
    },
    /// Connect channel `chan` again and bind it as connection `gen`.
    Rebind {
        /// The channel.
        chan: ChannelId,
        /// The connection it becomes.
        gen: u32,
    },
}

/// A control message to write now.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlTx {
    /// The channel and connection to write it on.
    pub chan: ChannelId,
    /// The connection.
    pub gen: u32,
    /// Its header.
    pub header: Header,
    /// The message.
    pub msg: Message,
}

/// What a frame from the destination was.
#[derive(Debug, PartialEq, Eq)]
pub enum Handled {
    /// A batch was acknowledged: its pages and encoded bytes.
    Acked {
        /// Guest pages it carried.
        pages: u32,
        /// Its payload's size.
        bytes: usize,
        /// Its pages, when it went out once (never sent again): the
        /// destination holds them as this one encoding of them sent them.
        once: Option<BatchJob>,
    },
    /// Anything else (a reply became an event, an echo was answered).
    Other,
    /// It came on a connection already declared dead: ignore it and stop
    /// reading that connection.
    Stale,
}

/// What the machine tells its driver.
#[derive(Debug)]
pub enum SourceEvent {
    /// The destination answered a control message (READY, COMPLETE, ABORT).
    Reply(Message),
    /// The session failed.
    Failed(MigrationError),
}

/// Counts for the report.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tallies {
    /// Connections declared dead.
    pub failures: u32,
    /// Batches sent again after a failure.
    pub resent: u64,
    /// Connections bound again.
    pub rebinds: u32,
}
