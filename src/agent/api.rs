//! The agent's control API (HTTP/JSON under `/v1`, bearer token on every
//! route, Prometheus metrics at `/metrics` in `metrics.rs`), its bodies'
//! checks (`checks.rs`), and the agent's lifetime (`serve.rs`: its
//! listeners, its incoming migrations, its shutdown).
//!
//! JSON keys are the CLI's flag names in snake_case; values take the CLI's
//! unit strings, or integers (bytes, bytes per second, milliseconds for
//! durations). Errors are `{"error": {"code", "message"}}` with a fitting
//! status.

use super::cluster::Cluster;
use super::node::{Node, NodeError, VmSpec};
use super::request::{
    Amount, Concurrency, CreateMigration, CreateVm, Drain, MigrationParams, Resolve, Resume, Stop,
    Stopping, Switch, Update,
};
use crate::codec::CodecChoice;
use crate::memory::{FillSpec, WorkloadPattern};
use crate::migration::MigrationConfig;
use crate::transport::{Receiver, ReceiverConfig, RunContext};
use crate::units::{parse_bandwidth, parse_duration, parse_rate, parse_size};
use crate::wire::{GuestKind, VerifyMode};
use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

mod checks;
mod cluster_events;
mod events;
mod metrics;
mod nodes;
mod retained;
mod serve;
mod session;
mod ui;

use checks::parse_body;
pub use serve::{serve_agent, serve_agent_with, AgentHandle};

/// An API error: status, code and message.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: "bad_request",
            message: message.into(),
        }
    }
}

impl From<NodeError> for ApiError {
    fn from(e: NodeError) -> Self {
        let status = match e {
            NodeError::BadRequest(_) => StatusCode::BAD_REQUEST,
            NodeError::NotFound(_) => StatusCode::NOT_FOUND,
            NodeError::Conflict(_) | NodeError::InsufficientMemory(_) => StatusCode::CONFLICT,
            NodeError::Unsupported(_) => StatusCode::NOT_IMPLEMENTED,
            NodeError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        Self {
            status,
            code: e.code(),
            message: e.to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": { "code": self.code, "message": self.message } });
        (self.status, Json(body)).into_response()
    }
}

type ApiResult = Result<Response, ApiError>;

fn json_status<T: serde::Serialize>(status: StatusCode, body: &T) -> Response {
    (status, Json(body)).into_response()
}

async fn get_node(State(node): State<Arc<Node>>) -> ApiResult {
    Ok(json_status(StatusCode::OK, &node.view()))
}

async fn list_vms(State(node): State<Arc<Node>>) -> ApiResult {
    Ok(json_status(StatusCode::OK, &node.vms()))
}

async fn create_vm(State(node): State<Arc<Node>>, body: Bytes) -> ApiResult {
    let spec = parse_body::<CreateVm>(&body)?.spec()?;
    let view = node.create_vm_recorded(spec).await?;
    Ok(json_status(StatusCode::CREATED, &view))
}

async fn get_vm(State(node): State<Arc<Node>>, Path(name): Path<String>) -> ApiResult {
    Ok(json_status(StatusCode::OK, &node.vm(&name)?))
}

/// `?force=true` where a request may override a safety check.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ForceQuery {
    #[serde(default)]
    force: bool,
}

async fn delete_vm(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    q: Result<Query<ForceQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let Query(q) = q.map_err(|e| ApiError::bad_request(format!("query: {e}")))?;
    let unresolved = node.unresolved_of(&name);
    let mut view = node.delete_vm(&name, q.force)?;
    view.record = node.record_deleted(&name, unresolved).await;
    Ok(json_status(StatusCode::OK, &view))
}

async fn remove_node(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    q: Result<Query<ForceQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let Query(q) = q.map_err(|e| ApiError::bad_request(format!("query: {e}")))?;
    let removed = node.remove_node(&name, q.force).await?;
    Ok(json_status(StatusCode::OK, &removed))
}

async fn get_update_run(State(node): State<Arc<Node>>) -> ApiResult {
    Ok(json_status(StatusCode::OK, &node.update_run().await?.0))
}

async fn start_update(State(node): State<Arc<Node>>, body: Bytes) -> ApiResult {
    let req = parse_body::<super::rolling::StartUpdate>(&body)?;
    Ok(json_status(
        StatusCode::ACCEPTED,
        &node.start_update(req).await?,
    ))
}

async fn cancel_update(State(node): State<Arc<Node>>) -> ApiResult {
    Ok(json_status(StatusCode::OK, &node.cancel_update().await?))
}

async fn preview(State(node): State<Arc<Node>>, body: Bytes) -> ApiResult {
    let req = parse_body::<super::preview::PreviewRequest>(&body)?;
    Ok(json_status(StatusCode::OK, &node.preview(req).await?))
}

async fn get_schedule(State(node): State<Arc<Node>>) -> ApiResult {
    Ok(json_status(StatusCode::OK, &node.update_schedule().await?))
}

async fn set_schedule(State(node): State<Arc<Node>>, body: Bytes) -> ApiResult {
    let req = parse_body::<super::schedule::SetSchedule>(&body)?;
    let s = node.set_update_schedule(req).await?;
    Ok(json_status(StatusCode::OK, &s))
}

async fn remove_schedule(State(node): State<Arc<Node>>) -> ApiResult {
    Ok(json_status(
        StatusCode::OK,
        &node.remove_update_schedule().await?,
    ))
}

async fn list_migrations(State(node): State<Arc<Node>>) -> ApiResult {
    Ok(json_status(StatusCode::OK, &node.migrations()))
}

async fn create_migration(
    State(node): State<Arc<Node>>,
    q: Result<Query<nodes::HandedQuery>, axum::extract::rejection::QueryRejection>,
    body: Bytes,
) -> ApiResult {
    let Query(q) = q.map_err(|e| ApiError::bad_request(format!("query: {e}")))?;
    let req = parse_body::<CreateMigration>(&body)?;
    let config = req.params.config(node.migration_defaults())?;
    // A VM that runs on another node: its node runs the migration.
    if let Some(host) = node.host_elsewhere(&req.vm).filter(|_| !q.handed) {
        let value: serde_json::Value = parse_body(&body)?;
        let view = node.hand_migration(&host, &value).await?;
        return Ok(json_status(StatusCode::ACCEPTED, &view));
    }
    let view = node.request_migration(&req.vm, &req.target, config, None)?;
    Ok(json_status(StatusCode::ACCEPTED, &view))
}

type Handed = Result<Query<nodes::HandedQuery>, axum::extract::rejection::QueryRejection>;

async fn get_migration(
    State(node): State<Arc<Node>>,
    Path(id): Path<String>,
    q: Handed,
) -> ApiResult {
    let here = node.migration(&id);
    nodes::or_elsewhere(&node, &id, q, here, axum::http::Method::GET, "", None).await
}

async fn cancel_migration(
    State(node): State<Arc<Node>>,
    Path(id): Path<String>,
    q: Handed,
) -> ApiResult {
    let here = node.cancel_migration(&id);
    nodes::or_elsewhere(&node, &id, q, here, axum::http::Method::DELETE, "", None).await
}

async fn resolve_migration(
    State(node): State<Arc<Node>>,
    Path(id): Path<String>,
    q: Handed,
    body: Bytes,
) -> ApiResult {
    let b: Resolve = parse_body(&body)?;
    let here = node.resolve(&id, &b.run_on, b.force).await;
    let value: serde_json::Value = parse_body(&body)?;
    let method = axum::http::Method::POST;
    nodes::or_elsewhere(&node, &id, q, here, method, "/resolve", Some(&value)).await
}

/// An optional JSON body: empty means defaults.
fn optional_body<T: serde::de::DeserializeOwned + Default>(body: &Bytes) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    parse_body(body)
}

/// Most migrations one drain may run at once.
const MAX_DRAIN_CONCURRENCY: u32 = 64;
/// Longest update command, bytes.
const MAX_COMMAND_LEN: usize = 4096;

async fn drain(State(node): State<Arc<Node>>, body: Bytes) -> ApiResult {
    let b: Drain = optional_body(&body)?;
    if let Some(Concurrency::Fixed(n)) = b.max_concurrent {
        if n == 0 || n > MAX_DRAIN_CONCURRENCY {
            return Err(ApiError::bad_request(format!(
                "max_concurrent: {n} is out of range (1 to {MAX_DRAIN_CONCURRENCY})"
            )));
        }
    }
    let delta = b.delta.as_ref().map_or(Ok(true), |d| d.on("delta"))?;
    if b.dry_run == Some(true) {
        let plan = node.drain_plan(b.max_concurrent, delta).await?;
        return Ok(json_status(StatusCode::OK, &plan));
    }
    let op = node
        .drain(super::ops::DrainRequest {
            max_concurrent: b.max_concurrent,
            allow_partial: b.allow_partial.unwrap_or(false),
            request_id: checked_request_id(b.request_id)?,
            delta,
        })
        .await?;
    Ok(json_status(StatusCode::ACCEPTED, &op))
}

async fn resume(State(node): State<Arc<Node>>, body: Bytes) -> ApiResult {
    let b: Resume = optional_body(&body)?;
    let request_id = checked_request_id(b.request_id)?;
    if b.clear_quarantine == Some(true) {
        node.clear_quarantine().await?;
    }
    let delta = b.delta.as_ref().map_or(Ok(true), |d| d.on("delta"))?;
    let op = node
        .resume(b.failback.unwrap_or(false), delta, request_id.as_deref())
        .await?;
    Ok(json_status(StatusCode::ACCEPTED, &op))
}

async fn update(State(node): State<Arc<Node>>, body: Bytes) -> ApiResult {
    let b: Update = parse_body(&body)?;
    if b.command.trim().is_empty() {
        return Err(ApiError::bad_request("command: it is empty"));
    }
    if b.command.len() > MAX_COMMAND_LEN {
        return Err(ApiError::bad_request(format!(
            "command: {} bytes is out of range (at most {MAX_COMMAND_LEN})",
            b.command.len()
        )));
    }
    if let Some(s) = b.stage.as_deref().filter(|s| !matches!(*s, "pre" | "post")) {
        return Err(ApiError::bad_request(format!("stage {s:?}: pre or post")));
    }
    let request_id = checked_request_id(b.request_id)?;
    let op = node.update(
        b.command,
        b.force,
        b.stage.as_deref(),
        request_id.as_deref(),
    )?;
    Ok(json_status(StatusCode::ACCEPTED, &op))
}

/// Longest `request_id`.
const MAX_REQUEST_ID: usize = 128;

/// `request_id`, when given: 1 to 128 printable ASCII characters, no
/// spaces.
fn checked_request_id(id: Option<String>) -> Result<Option<String>, ApiError> {
    match id {
        Some(r)
            if r.is_empty()
                || r.len() > MAX_REQUEST_ID
                || !r.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            Err(ApiError::bad_request(format!(
                "request_id: use 1 to {MAX_REQUEST_ID} printable ASCII characters without spaces"
            )))
        }
        other => Ok(other),
    }
}

/// `POST /v1/node/stop`: the agent drains its node and exits once it hosts
/// nothing; with `force`, at once, discarding what is still here.
async fn stop(State(node): State<Arc<Node>>, body: Bytes) -> ApiResult {
    let b: Stop = optional_body(&body)?;
    node.stop.ask(b.force);
    let vms: Vec<String> = node.vms().into_iter().map(|v| v.spec.name).collect();
    tracing::warn!(force = b.force, ?vms, "asked to stop");
    let answer = Stopping {
        node: node.name().to_string(),
        stopping: true,
        force: b.force,
        vms,
    };
    Ok(json_status(StatusCode::ACCEPTED, &answer))
}

async fn list_operations(State(node): State<Arc<Node>>) -> ApiResult {
    Ok(json_status(StatusCode::OK, &node.operations()))
}

async fn get_operation(State(node): State<Arc<Node>>, Path(id): Path<String>) -> ApiResult {
    Ok(json_status(StatusCode::OK, &node.operation(&id)?))
}

async fn cancel_operation(State(node): State<Arc<Node>>, Path(id): Path<String>) -> ApiResult {
    Ok(json_status(StatusCode::OK, &node.cancel_operation(&id)?))
}

/// Every route wants `Authorization: Bearer <token>`, compared in constant
/// time: the cluster's token for everything, the read-only token for `GET`
/// (and `HEAD`) routes and `/metrics` only, but a retained image's hashes
/// and the copies kept as bases (`/v1/bases`).
async fn require_token(State(node): State<Arc<Node>>, req: Request, next: Next) -> Response {
    use subtle::ConstantTimeEq;
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let is = |want: &str| {
        given.len() == want.len() && bool::from(given.as_bytes().ct_eq(want.as_bytes()))
    };
    // Signing in and out take no token.
    let signing = req.uri().path() == "/v1/session"
        && matches!(
            *req.method(),
            axum::http::Method::POST | axum::http::Method::DELETE
        );
    // The console's files hold no data.
    let console = ui::exempt(req.method(), req.uri().path());
    if signing || console || is(&node.cluster.token) {
        return next.run(req).await;
    }
    let reads = matches!(
        *req.method(),
        axum::http::Method::GET | axum::http::Method::HEAD
    );
    // Page hashes say whether a page holds a guessed content.
    let path = req.uri().path();
    let hashes = (path.starts_with("/v1/retained/") && path.ends_with("/hashes"))
        || path == "/v1/bases"
        || path.starts_with("/v1/bases/");
    let read_only = || {
        ApiError {
            status: StatusCode::FORBIDDEN,
            code: "forbidden",
            message: "the read-only token may only read (GET routes but retained images' hashes and bases, and /metrics)".into(),
        }
        .into_response()
    };
    if node.cluster.readonly_token.as_deref().is_some_and(is) {
        if reads && !hashes {
            return next.run(req).await;
        }
        return read_only();
    }
    if given.is_empty() {
        match session::by_cookie(&node, req.headers(), !reads) {
            Some(Err(e)) => return e.into_response(),
            Some(Ok(crate::agent::session::Scope::Admin)) => return next.run(req).await,
            Some(Ok(crate::agent::session::Scope::Read)) if reads && !hashes => {
                return next.run(req).await
            }
            Some(Ok(crate::agent::session::Scope::Read)) => return read_only(),
            None => {}
        }
    }
    ApiError {
        status: StatusCode::UNAUTHORIZED,
        code: "unauthorized",
        message: "this API wants the cluster's token as a bearer token".into(),
    }
    .into_response()
}

/// The control API's routes for `node`.
pub fn router(node: Arc<Node>) -> Router {
    let stats = node.api_stats.clone();
    let limit = node.api_limits.request_timeout;
    Router::new()
        .route("/v1/node", get(get_node))
        .route("/v1/events", get(events::events))
        .route(
            "/v1/session",
            get(session::whoami)
                .post(session::sign_in)
                .delete(session::sign_out),
        )
        .route("/v1/session/revoke", axum::routing::post(session::revoke))
        .route("/v1/cluster/events", get(cluster_events::cluster_events))
        .route("/v1/vms", get(list_vms).post(create_vm))
        .route("/v1/vms/{name}", get(get_vm).delete(delete_vm))
        .route(
            "/v1/migrations",
            get(list_migrations).post(create_migration),
        )
        .route(
            "/v1/migrations/{id}",
            get(get_migration).delete(cancel_migration),
        )
        .route(
            "/v1/migrations/{id}/resolve",
            axum::routing::post(resolve_migration),
        )
        .route("/v1/nodes/{name}", get(nodes::node_of).delete(remove_node))
        .route(
            "/v1/nodes/{name}/{action}",
            axum::routing::post(nodes::node_action),
        )
        .route("/v1/nodes/{name}/operations", get(nodes::operations_of))
        .route(
            "/v1/nodes/{name}/operations/{id}",
            get(nodes::operation_of).delete(nodes::cancel_operation_of),
        )
        .route("/v1/node/drain", axum::routing::post(drain))
        .route("/v1/node/resume", axum::routing::post(resume))
        .route("/v1/node/update", axum::routing::post(update))
        .route("/v1/node/stop", axum::routing::post(stop))
        .route("/v1/node/preview", axum::routing::post(preview))
        .route("/v1/retained/{vm}", get(retained::get_retained))
        .route("/v1/retained/{vm}/hashes", get(retained::get_hashes))
        .route("/v1/bases", get(retained::get_bases))
        .route(
            "/v1/bases/{vm}/tags",
            axum::routing::post(retained::post_tags),
        )
        .route(
            "/v1/cluster/update",
            get(get_update_run).post(start_update).delete(cancel_update),
        )
        .route(
            "/v1/cluster/update/schedule",
            get(get_schedule).put(set_schedule).delete(remove_schedule),
        )
        .route("/v1/operations", get(list_operations))
        .route(
            "/v1/operations/{id}",
            get(get_operation).delete(cancel_operation),
        )
        .route("/metrics", get(metrics::metrics))
        .route("/", get(ui::to_console))
        .route("/ui", get(ui::to_console))
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
        .route("/ui/", get(ui::index))
        .route("/ui/{file}", get(ui::asset))
        .fallback(|| async {
            ApiError {
                status: StatusCode::NOT_FOUND,
                code: "not_found",
                message: "no such route; the API lives under /v1".into(),
            }
        })
        .layer(middleware::from_fn_with_state(node.clone(), require_token))
        .layer(middleware::from_fn(move |req, next| {
            super::listen::time_and_count(stats.clone(), limit, req, next)
        }))
        .with_state(node)
}
