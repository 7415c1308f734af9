//! Both ends of a migration in one process, over loopback TCP: the demo, the
//! tests and the benches use it. Each side gets its own runtime, so each side's
//! CPU time is its own threads'.

use super::progress::RunContext;
use super::{
    migrate, Incoming, MigratableGuest, MigrationConfig, Receiver, ReceiverConfig, Report,
};
use crate::cpu::CpuMeter;
use crate::transport::runtime;
use std::sync::Arc;

/// Migrates `guest` to a receiver on `127.0.0.1` in this process. `ctx` is the
/// source's context (progress, cancellation); its CPU meter counts the source
/// runtime's threads. Returns the source's report and the destination's result.
pub fn migrate_over_loopback(
    guest: Arc<dyn MigratableGuest>,
    config: &MigrationConfig,
    ctx: RunContext,
    receiver: ReceiverConfig,
) -> std::io::Result<(Report, Incoming)> {
    let dest_cpu = CpuMeter::new();
    let dest_rt = runtime("ferry-dst", 2, &dest_cpu)?;
    let dest_ctx = RunContext {
        cpu: dest_cpu,
        ..RunContext::default()
    };
    let stop_dest = dest_ctx.cancel.clone();
    let recv = dest_rt.block_on(Receiver::bind("127.0.0.1:0", receiver))?;
    let addr = recv.local_addr()?.to_string();
    let incoming = dest_rt.spawn(recv.receive_one(dest_ctx));

    let src_rt = runtime("ferry-src", 2, &ctx.cpu)?;
    let config = config.clone();
    let src_ctx = ctx.clone();
    let report = src_rt
        .block_on(src_rt.spawn(async move { migrate(guest, &addr, &config, &src_ctx).await }))
        .map_err(std::io::Error::other)?;
    // A source that failed before connecting leaves the receiver waiting.
    let incoming = dest_rt.block_on(async {
        match tokio::time::timeout(std::time::Duration::from_secs(5), incoming).await {
            Ok(joined) => joined.ok().flatten(),
            Err(_) => {
                stop_dest.cancel();
                None
            }
        }
    });
    let incoming =
        incoming.ok_or_else(|| std::io::Error::other("the destination saw no session"))?;
    Ok((report, incoming))
}
