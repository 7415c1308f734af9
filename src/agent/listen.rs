//! The control API's listener, over TLS unless the cluster says
//! `insecure_api`: at most `max_connections` connections at
//! once (more are closed at once), each closed when it sends no complete
//! request head within the header timeout (a slow client, or an idle
//! keep-alive connection), and each request answered within the request
//! timeout (a slow body ends with 408). Connections and requests refused are
//! counted by reason for `/metrics`.

use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The control API's limits.
#[derive(Debug, Clone, Copy)]
pub struct ApiLimits {
    /// Connections open at once; more are closed on accept. Default: 256.
    pub max_connections: usize,
    /// Longest wait for a request's complete head, also between requests on
    /// a kept-alive connection. Default: 10 s.
    pub header_timeout: Duration,
    /// Longest time to read a request's body and answer it. Default: 30 s.
    pub request_timeout: Duration,
}

impl Default for ApiLimits {
    fn default() -> Self {
        Self {
            max_connections: 256,
            header_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// Why the API refused a connection or a request.
const REASONS: [&str; 9] = [
    "connection_limit",
    "tls",
    "header_timeout",
    "request_timeout",
    "unauthorized",
    "forbidden",
    "bad_request",
    "not_found",
    "conflict",
];

/// The API's refusals, by reason.
#[derive(Debug, Default)]
pub struct ApiStats {
    counts: [AtomicU64; REASONS.len()],
}

impl ApiStats {
    fn count(&self, reason: &str) {
        if let Some(i) = REASONS.iter().position(|r| *r == reason) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Refusals so far, by reason.
    pub fn refused(&self) -> Vec<(&'static str, u64)> {
        REASONS
            .iter()
            .zip(&self.counts)
            .map(|(r, c)| (*r, c.load(Ordering::Relaxed)))
            .collect()
    }

    /// Counts a finished request's refusal by its status.
    fn count_status(&self, status: StatusCode) {
        let reason = match status {
            StatusCode::UNAUTHORIZED => "unauthorized",
            StatusCode::FORBIDDEN => "forbidden",
            StatusCode::BAD_REQUEST | StatusCode::PAYLOAD_TOO_LARGE => "bad_request",
            StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED => "not_found",
            StatusCode::CONFLICT => "conflict",
            StatusCode::REQUEST_TIMEOUT => "request_timeout",
            _ => return,
        };
        self.count(reason);
    }
}

/// Answers each request within `limit`, and counts refusals by status.
pub(crate) async fn time_and_count(
    stats: Arc<ApiStats>,
    limit: Duration,
    req: Request,
    next: Next,
) -> Response {
    let response = match tokio::time::timeout(limit, next.run(req)).await {
        Ok(r) => r,
        Err(_) => {
            let body = serde_json::json!({ "error": { "code": "request_timeout", "message": format!("the request was not received and answered within {limit:?}") } });
            (StatusCode::REQUEST_TIMEOUT, axum::Json(body)).into_response()
        }
    };
    stats.count_status(response.status());
    response
}

/// Serves `app` on `listener` under `limits` until `stop`, then lets the
/// connections finish their requests (at most 5 s).
pub(crate) async fn serve_api(
    listener: TcpListener,
    app: Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: ApiLimits,
    stats: Arc<ApiStats>,
    stop: CancellationToken,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let tracker = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors, say: wait rather than spin.
                    tracing::warn!(error = %e, "control API: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            stats.count("connection_limit");
            tracing::warn!(%peer, limit = limits.max_connections, "control API: connection limit reached; closing this one");
            continue;
        };
        let (app, stats, stop, tls) = (app.clone(), stats.clone(), stop.clone(), tls.clone());
        tracker.spawn(async move {
            let _permit = permit;
            let _ = stream.set_nodelay(true);
            let Some(tls) = tls else {
                serve_connection(stream, app, limits, &stats, &stop).await;
                return;
            };
            // The TLS handshake counts against the header timeout.
            match tokio::time::timeout(limits.header_timeout, tls.accept(stream)).await {
                Ok(Ok(s)) => serve_connection(s, app, limits, &stats, &stop).await,
                Ok(Err(e)) => {
                    stats.count("tls");
                    tracing::debug!(%peer, error = %e, "control API: TLS handshake failed");
                }
                Err(_) => stats.count("header_timeout"),
            }
        });
    }
    tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await;
}

async fn serve_connection<S>(
    stream: S,
    app: Router,
    limits: ApiLimits,
    stats: &ApiStats,
    stop: &CancellationToken,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper_util::service::TowerToHyperService::new(app);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(64 << 10);
    let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    let mut conn = std::pin::pin!(conn);
    let ended = tokio::select! {
        r = conn.as_mut() => r,
        _ = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = ended {
        if e.is_timeout() {
            stats.count("header_timeout");
        }
        tracing::debug!(error = %e, "control API connection ended");
    }
}
