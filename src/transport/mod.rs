//! The async transport: framed TCP channels with vectored writes, the shared
//! token-bucket bandwidth cap, and the runtime each side of a migration runs on.

mod bucket;
mod channel;

pub use bucket::TokenBucket;
pub use channel::{FrameReader, FrameWriter};

use crate::cpu::CpuMeter;

/// Builds a multi-threaded tokio runtime whose threads (workers and blocking
/// pool) are counted by `cpu`.
pub fn runtime(
    name: &str,
    workers: usize,
    cpu: &CpuMeter,
) -> std::io::Result<tokio::runtime::Runtime> {
    let (start, stop) = (cpu.clone(), cpu.clone());
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers.max(1))
        .thread_name(name)
        .on_thread_start(move || start.register_current_thread())
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
