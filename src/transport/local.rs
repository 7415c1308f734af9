//! Both ends of a migration in one process, over loopback TCP (or a veth pair
//! between two network namespaces): the demo, the tests, the benches and the
//! sweep use it. Each side gets its own runtime, so each side's CPU time is its
//! own threads'.

use super::progress::RunContext;
use super::{migrate, Incoming, Receiver, ReceiverConfig};
use crate::cpu::CpuMeter;
use crate::migration::{MigratableGuest, MigrationConfig, Report};
use crate::transport::{runtime_in, Namespace};
use std::sync::Arc;

/// Where the two ends of an in-process migration meet.
#[derive(Debug, Clone)]
pub struct LocalPath {
    /// The destination's listening address (port 0 picks one).
    pub listen: String,
    /// The network namespace the source's threads run in (`None`: this one).
    pub source_ns: Option<Namespace>,
    /// The network namespace the destination's threads run in.
    pub destination_ns: Option<Namespace>,
}

impl Default for LocalPath {
    /// Loopback, in this process's namespace.
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:0".into(),
            source_ns: None,
            destination_ns: None,
        }
    }
}

/// Migrates `guest` to a receiver on `127.0.0.1` in this process. `ctx` is the
/// source's context (progress, cancellation); its CPU meter counts the source
/// runtime's threads. Returns the source's report, and the destination's result
/// unless the source failed before it set up a session.
pub fn migrate_over_loopback(
    guest: Arc<dyn MigratableGuest>,
    config: &MigrationConfig,
    ctx: RunContext,
    receiver: ReceiverConfig,
) -> std::io::Result<(Report, Option<Incoming>)> {
    migrate_locally(guest, config, ctx, receiver, &LocalPath::default())
}

/// As [`migrate_over_loopback`], over `path`: the receiver listens on
/// `path.listen`, and each side's threads run in its namespace.
pub fn migrate_locally(
    guest: Arc<dyn MigratableGuest>,
    config: &MigrationConfig,
    ctx: RunContext,
    receiver: ReceiverConfig,
    path: &LocalPath,
) -> std::io::Result<(Report, Option<Incoming>)> {
    let dest_cpu = CpuMeter::new();
    let dest_rt = runtime_in("ferry-dst", 2, &dest_cpu, path.destination_ns.clone())?;
    let dest_ctx = RunContext {
        cpu: dest_cpu,
        ..RunContext::default()
    };
    let stop_dest = dest_ctx.cancel.clone();
    // Bind on a runtime thread: block_on would run on this one, outside the
    // destination's namespace.
    let listen = path.listen.clone();
    let recv = dest_rt
        .block_on(dest_rt.spawn(async move { Receiver::bind(&listen, receiver).await }))
        .map_err(std::io::Error::other)??;
    let addr = recv.local_addr()?.to_string();
    let incoming = dest_rt.spawn(recv.receive_one(dest_ctx));

    let src_rt = runtime_in("ferry-src", 2, &ctx.cpu, path.source_ns.clone())?;
    let config = config.clone();
    let src_ctx = ctx.clone();
    let report = src_rt
        .block_on(src_rt.spawn(async move { migrate(guest, &addr, &config, &src_ctx).await }))
        .map_err(std::io::Error::other)?;
    // A source that failed before its session existed leaves the receiver with
    // nothing to report: stop it rather than wait. Otherwise the destination
    // ends its session on its own (completed, or on the source's abort).
    let session_started = report.session_id != format!("{:016x}", 0);
    if ctx.cancel.is_cancelled() {
        // Both ends are ours and were stopped together: the destination need
        // not wait out its peer timeout for a source that will not rebind
        // (the source's ABORT may sit behind a full, slow link).
        stop_dest.cancel();
    }
    let incoming = dest_rt.block_on(async {
        // A session the source never saw set up was refused before its
        // admission (or never connected): the receiver reports nothing of it.
        let wait = if session_started {
            std::time::Duration::from_secs(30)
        } else {
            std::time::Duration::ZERO
        };
        match tokio::time::timeout(wait, incoming).await {
            Ok(joined) => joined.ok().flatten(),
            Err(_) => {
                stop_dest.cancel();
                None
            }
        }
    });
    Ok((report, incoming))
}
