//! The migration's protocol without IO: the guest interface the engine
//! drives, its configuration, the convergence policy, the source's and the
//! destination's state machines and ledgers, the report, and the
//! deterministic simulation that checks them. The async drivers that move
//! their bytes live in [`crate::transport`].

mod config;
pub mod credits;
pub mod delta;
pub mod dest_ledger;
pub mod dest_session;
pub mod dest_state;
mod error;
mod guest;
mod local;
mod loss;
pub mod policy;
pub(crate) mod report;
pub mod retained;
pub mod saved;
pub mod sent;
pub mod sim;
pub mod similar;
pub mod source_machine;
mod violation;

#[cfg(feature = "net")]
pub mod auth;
pub mod fault;
#[cfg(feature = "net")]
pub mod handshake;

pub use config::{
    ranges, BeforeGo, ConfigError, MigrationConfig, DEFAULT_BATCH_PAGES, DEFAULT_CHANNELS,
    DEFAULT_INITIAL_CREDITS, DEFAULT_PEER_TIMEOUT,
};
pub use error::MigrationError;
pub use local::{LocalFault, Task};
pub use loss::{ChannelLoss, SessionLoss};
pub use violation::{AuthFailure, GuestStep, Mismatch, PatchCause, Shortfall, Violation};

// The wire counts pages as guest memory does.
const _: () = assert!(crate::memory::PAGE_SIZE == crate::wire::PAGE_SIZE);
pub use guest::{kvm_unavailable, restore_guest, start_guest, MigratableGuest};
pub use report::{
    CompressedBy, CpuMs, GuestsHere, MemoryUse, Outcome, PageCounts, Report, RoundLog, Side,
};
