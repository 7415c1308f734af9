//! ferry moves a running virtual machine's memory from one host to another while
//! the guest keeps running (pre-copy), then switches it over with a short pause.
//!
//! The core is synchronous and free of sockets: [`memory`] (guest memory, dirty
//! bitmaps, the synthetic guest), [`codec`] (zero pages, lz4, zstd), [`wire`]
//! (frames and messages), [`digest`] (the switchover memory digest) and
//! [`migration::policy`] (convergence). The `net` feature adds the async shell:
//! [`transport`] (sessions of TCP channels, credits, the bandwidth cap) and the
//! source and destination drivers in [`migration`], and the node agent with
//! its control API in [`agent`].
#![deny(unsafe_code)]
#![warn(missing_docs)]

#[cfg(feature = "net")]
pub mod agent;
pub mod bench;
pub mod codec;
pub mod cpu;
pub mod digest;
#[cfg(feature = "fuzzing")]
pub mod fuzz;
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
pub mod kvm;
pub mod memory;
pub mod migration;
pub mod page;
#[cfg(feature = "net")]
pub mod transport;
pub mod units;
pub mod wire;
