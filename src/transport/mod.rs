//! The async transport: framed TCP channels with vectored writes, the shared
//! token-bucket bandwidth cap, the runtime each side of a migration runs on,
//! and the drivers that move the migration machines' bytes: the source's
//! ([`migrate`]), the receiver's ([`Receiver`]) and both in one process.

mod accept;
mod bucket;
mod channel;
mod dest;
mod gate;
mod local;
#[cfg(target_os = "linux")]
pub mod netns;
mod progress;
mod source;
pub mod tls;

pub use bucket::{BucketUser, TokenBucket};
pub use channel::{Conn, FrameReader, FrameWriter, Received, HANDSHAKE_MAX_PAYLOAD};
#[cfg(feature = "fuzzing")]
pub(crate) use dest::prefill;
pub use dest::{
    AdmitFn, BaseFn, BaseImage, Incoming, Receiver, ReceiverConfig, StreamBudget, Unauthenticated,
    CHANNEL_MEMORY,
};
pub use gate::{ReceiverStats, Refusal};
pub use local::{migrate_locally, migrate_over_loopback, LocalPath};
pub use progress::{Phase, Progress, ProgressSnapshot, RunContext};
pub use source::migrate;

use crate::cpu::CpuMeter;

/// Blocking-pool threads per runtime worker (encoders and appliers).
pub const BLOCKING_PER_WORKER: usize = 4;

/// Builds a multi-threaded tokio runtime whose threads (workers and blocking
/// pool) are counted by `cpu`.
pub fn runtime(
    name: &str,
    workers: usize,
    cpu: &CpuMeter,
) -> std::io::Result<tokio::runtime::Runtime> {
    runtime_in(name, workers, cpu, None)
}

/// A network namespace a runtime's threads enter (Linux).
#[cfg(target_os = "linux")]
pub type Namespace = std::sync::Arc<netns::NetNs>;
/// A network namespace a runtime's threads enter (Linux only).
#[cfg(not(target_os = "linux"))]
pub type Namespace = std::convert::Infallible;

/// As [`runtime`], with every thread inside network namespace `ns` (when given),
/// so the sockets the runtime's tasks open live there.
///
/// # Panics
/// A thread that cannot enter `ns` panics; [`netns::TbfLink::new`] checks that
/// threads can before handing out its namespaces.
///
/// Its blocking pool holds at most [`BLOCKING_PER_WORKER`] threads per
/// worker.
pub fn runtime_in(
    name: &str,
    workers: usize,
    cpu: &CpuMeter,
    ns: Option<Namespace>,
) -> std::io::Result<tokio::runtime::Runtime> {
    let (start, stop) = (cpu.clone(), cpu.clone());
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers.max(1))
        // The blocking pool encodes and applies batches: CPU-bound work, so
        // a few threads per core are plenty, and each keeps buffers of a
        // batch's size (a soak showed hundreds of MiB with tokio's 512).
        .max_blocking_threads(BLOCKING_PER_WORKER * workers.max(1))
        .thread_name(name)
        .on_thread_start(move || {
            #[cfg(target_os = "linux")]
            if let Some(ns) = &ns {
                ns.enter()
                    .expect("entering the runtime's network namespace");
            }
            #[cfg(not(target_os = "linux"))]
            let _ = &ns;
            start.register_current_thread()
        })
        .on_thread_stop(move || stop.unregister_current_thread())
        .enable_all()
        .build()
}

/// Connects to `addr` with TCP_NODELAY set.
pub async fn connect(addr: &str) -> std::io::Result<tokio::net::TcpStream> {
    let s = tokio::net::TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// A task of this side's that ended without its result: its panic's text
/// goes to this side's log, the error names the task only.
pub(crate) fn task_failed(
    task: crate::migration::Task,
    e: &tokio::task::JoinError,
) -> crate::migration::MigrationError {
    tracing::error!(%task, error = %e, "a task of this side's failed");
    crate::migration::MigrationError::Internal(crate::migration::LocalFault::Task {
        task,
        panicked: e.is_panic(),
    })
}
