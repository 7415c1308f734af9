//! The migration: the guest interface the engine drives, its configuration, the
//! convergence policy, the destination's protocol state machine, the report,
//! and (with the `net` feature) the source and destination drivers.

mod config;
pub mod credits;
pub mod dest_ledger;
pub mod dest_state;
mod error;
mod guest;
pub mod policy;
mod report;
pub mod saved;
pub mod sim;
pub mod source_machine;

#[cfg(feature = "net")]
mod accept;
#[cfg(feature = "net")]
pub mod auth;
#[cfg(feature = "net")]
mod dest;
pub mod fault;
#[cfg(feature = "net")]
mod gate;
#[cfg(feature = "net")]
mod local;
#[cfg(feature = "net")]
mod progress;
#[cfg(feature = "net")]
mod source;

pub use config::{
    ranges, BeforeGo, ConfigError, MigrationConfig, DEFAULT_BATCH_PAGES, DEFAULT_CHANNELS,
    DEFAULT_INITIAL_CREDITS, DEFAULT_PEER_TIMEOUT,
};
pub use error::MigrationError;
pub use guest::{kvm_unavailable, restore_guest, start_guest, MigratableGuest};
pub use report::{CpuMs, GuestsHere, MemoryUse, Outcome, PageCounts, Report, RoundLog, Side};

#[cfg(feature = "net")]
pub use dest::{AdmitFn, Incoming, Receiver, ReceiverConfig, Unauthenticated, CHANNEL_MEMORY};
#[cfg(feature = "net")]
pub use gate::{ReceiverStats, Refusal};
#[cfg(feature = "net")]
pub use local::{migrate_locally, migrate_over_loopback, LocalPath};
#[cfg(feature = "net")]
pub use progress::{Phase, Progress, ProgressSnapshot, RunContext};
#[cfg(feature = "net")]
pub use source::migrate;
