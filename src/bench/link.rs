//! The raw TCP ceiling of a path: N connections each write their share with
//! 1 MiB writes to a sink that reads to the end and answers with the count.

use serde::Serialize;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const WRITE: usize = 1 << 20;

/// One measurement of a path.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LinkResult {
    /// TCP connections used.
    pub channels: u16,
    /// Bytes moved over all of them.
    pub bytes: u64,
    /// From the first write to the sink's last acknowledgement.
    pub seconds: f64,
    /// `bytes / seconds`.
    pub bps: f64,
}

/// Accepts connections and swallows what they send until `cancel` fires;
/// returns once every connection's task has ended.
pub async fn serve_link_sink(listener: TcpListener, cancel: CancellationToken) {
    let conns = tokio_util::task::TaskTracker::new();
    loop {
        let (s, _) = tokio::select! {
            _ = cancel.cancelled() => break,
            a = listener.accept() => match a {
                Ok(a) => a,
                // Out of descriptors, say: try again shortly, never spin.
                Err(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        conns.spawn(swallow(s, cancel.clone()));
    }
    conns.close();
    conns.wait().await;
}

/// Reads one connection to its end, then answers with the bytes it read.
async fn swallow(mut s: tokio::net::TcpStream, cancel: CancellationToken) {
    let mut buf = vec![0u8; WRITE];
    let mut total = 0u64;
    loop {
        let n = tokio::select! {
            _ = cancel.cancelled() => return,
            n = s.read(&mut buf) => match n { Ok(n) => n, Err(_) => return },
        };
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    let _ = s.write_all(&total.to_le_bytes()).await;
}

/// Sends `bytes` (rounded up to whole 1 MiB writes per channel) over `channels`
/// connections to the sink at `addr`, all at once.
pub async fn link_once(addr: &str, channels: u16, bytes: u64) -> std::io::Result<LinkResult> {
    let channels = channels.max(1);
    let per = bytes.div_ceil(u64::from(channels)).div_ceil(WRITE as u64);
    let mut socks = Vec::new();
    for _ in 0..channels {
        socks.push(crate::transport::connect(addr).await?);
    }
    let t = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for mut s in socks {
        tasks.spawn(async move {
            let buf = vec![0x5au8; WRITE];
            for _ in 0..per {
                s.write_all(&buf).await?;
            }
            s.shutdown().await?;
            let mut count = [0u8; 8];
            s.read_exact(&mut count).await?;
            Ok::<u64, std::io::Error>(u64::from_le_bytes(count))
        });
    }
    let mut moved = 0;
    while let Some(r) = tasks.join_next().await {
        moved += r.map_err(std::io::Error::other)??;
    }
    let secs = t.elapsed().max(Duration::from_nanos(1)).as_secs_f64();
    Ok(LinkResult {
        channels,
        bytes: moved,
        seconds: secs,
        bps: moved as f64 / secs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn measures_what_arrives() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let cancel = CancellationToken::new();
        tokio::spawn(serve_link_sink(listener, cancel.clone()));
        let r = link_once(&addr, 3, 10 << 20).await.unwrap();
        cancel.cancel();
        assert_eq!(r.channels, 3);
        assert_eq!(r.bytes, 3 * 4 * WRITE as u64, "whole writes per channel");
        assert!(r.bps > 0.0 && r.seconds > 0.0);
    }
}
