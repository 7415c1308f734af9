//! The agent's control API (HTTP/JSON under `/v1`, bearer token on every
//! route, Prometheus metrics at `/metrics`) and the agent's lifetime: its
//! listeners, its incoming migrations, its shutdown.
//!
//! JSON keys are the CLI's flag names in snake_case; values take the CLI's
//! unit strings, or integers (bytes, bytes per second, milliseconds for
//! durations). Errors are `{"error": {"code", "message"}}` with a fitting
//! status.

use super::cluster::Cluster;
use super::node::{Node, NodeError, VmSpec};
use super::request::{
    Amount, CreateMigration, CreateVm, Drain, MigrationParams, Resolve, Resume, Stop, Stopping,
    Switch, Update,
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

mod nodes;

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

impl Amount {
    fn size(&self, field: &str) -> Result<u64, ApiError> {
        match self {
            Amount::Int(n) => Ok(*n),
            Amount::Text(s) => {
                parse_size(s).map_err(|e| ApiError::bad_request(format!("{field}: {e}")))
            }
        }
    }

    fn rate(&self, field: &str) -> Result<u64, ApiError> {
        match self {
            Amount::Int(n) => Ok(*n),
            Amount::Text(s) => {
                parse_rate(s).map_err(|e| ApiError::bad_request(format!("{field}: {e}")))
            }
        }
    }

    fn bandwidth(&self, field: &str) -> Result<Option<u64>, ApiError> {
        match self {
            Amount::Int(0) => Ok(None),
            Amount::Int(n) => Ok(Some(*n)),
            Amount::Text(s) => {
                parse_bandwidth(s).map_err(|e| ApiError::bad_request(format!("{field}: {e}")))
            }
        }
    }

    fn duration(&self, field: &str) -> Result<Duration, ApiError> {
        match self {
            Amount::Int(ms) => Ok(Duration::from_millis(*ms)),
            Amount::Text(s) => {
                parse_duration(s).map_err(|e| ApiError::bad_request(format!("{field}: {e}")))
            }
        }
    }
}

impl Switch {
    fn on(&self, field: &str) -> Result<bool, ApiError> {
        match self {
            Switch::Bool(b) => Ok(*b),
            Switch::Text(s) if s == "on" => Ok(true),
            Switch::Text(s) if s == "off" => Ok(false),
            Switch::Text(s) => Err(ApiError::bad_request(format!(
                "{field}: {s:?} is not on or off"
            ))),
        }
    }
}

fn parse_body<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::bad_request("the request needs a JSON body"));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

impl CreateVm {
    fn spec(self) -> Result<VmSpec, ApiError> {
        if !super::node::valid_name(&self.name) {
            return Err(ApiError::bad_request(format!(
                "name {:?}: use 1 to 255 letters, digits, '-', '_' and '.'",
                self.name
            )));
        }
        let memory = self.memory.size("memory")?;
        crate::memory::GuestMemory::check_size(memory)
            .map_err(|e| ApiError::bad_request(format!("memory: {e}")))?;
        let workload = match &self.workload {
            None => WorkloadPattern::Hot {
                bytes: (64u64 << 20).min(memory),
            },
            Some(w) => w
                .parse::<WorkloadPattern>()
                .map_err(|e| ApiError::bad_request(format!("workload: {e}")))?,
        };
        let dirty_rate = match &self.dirty_rate {
            None => 100_000_000,
            Some(r) => r.rate("dirty_rate")?,
        };
        let fill = match &self.fill {
            None => FillSpec::default(),
            Some(f) => f
                .parse::<FillSpec>()
                .map_err(|e| ApiError::bad_request(format!("fill: {e}")))?,
        };
        let guest = match self.guest.as_deref() {
            None | Some("sim") => GuestKind::Sim,
            Some("kvm") => GuestKind::Kvm,
            Some(g) => {
                return Err(ApiError::bad_request(format!(
                    "guest: {g:?} is not sim or kvm"
                )))
            }
        };
        let priority = match &self.priority {
            None => super::records::Priority::default(),
            Some(p) => p
                .parse()
                .map_err(|e| ApiError::bad_request(format!("priority: {e}")))?,
        };
        let spec = VmSpec {
            name: self.name,
            memory,
            workload,
            dirty_rate,
            fill,
            guest,
            priority,
            preferred_owners: self.preferred_owners.unwrap_or_default(),
            image: self.image,
            seed: self.seed.unwrap_or(1),
        };
        spec.check().map_err(ApiError::bad_request)?;
        Ok(spec)
    }
}

impl MigrationParams {
    fn config(&self) -> Result<MigrationConfig, ApiError> {
        let mut c = MigrationConfig::default();
        if let Some(n) = self.channels {
            c.channels = n;
        }
        if let Some(codec) = &self.codec {
            c.codec = codec
                .parse::<CodecChoice>()
                .map_err(|e| ApiError::bad_request(format!("codec: {e}")))?;
        }
        if let Some(b) = &self.max_bandwidth {
            c.max_bandwidth = b.bandwidth("max_bandwidth")?;
        }
        if let Some(d) = &self.downtime_limit {
            c.downtime_limit = d.duration("downtime_limit")?;
        }
        if let Some(v) = &self.verify {
            c.verify = v
                .parse::<VerifyMode>()
                .map_err(|e| ApiError::bad_request(format!("verify: {e}")))?;
        }
        if let Some(a) = &self.auto_converge {
            c.auto_converge = a.on("auto_converge")?;
        }
        if let Some(t) = &self.completion_timeout {
            c.completion_timeout = Some(t.duration("completion_timeout")?);
        }
        if let Some(t) = &self.peer_timeout {
            c.peer_timeout = t.duration("peer_timeout")?;
        }
        if let Some(t) = &self.progress_timeout {
            c.progress_timeout = t.duration("progress_timeout")?;
        }
        if let Some(p) = self.leave_paused {
            c.leave_paused = p;
        }
        c.validate()
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        Ok(c)
    }
}

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
    let view = node.delete_vm(&name, q.force)?;
    node.record_deleted(&name, unresolved);
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
    let config = req.params.config()?;
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
    if let Some(n) = b.max_concurrent {
        if n == 0 || n > MAX_DRAIN_CONCURRENCY {
            return Err(ApiError::bad_request(format!(
                "max_concurrent: {n} is out of range (1 to {MAX_DRAIN_CONCURRENCY})"
            )));
        }
    }
    let op = node
        .drain(super::ops::DrainRequest {
            max_concurrent: b.max_concurrent,
            allow_partial: b.allow_partial.unwrap_or(false),
            request_id: checked_request_id(b.request_id)?,
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
    let op = node
        .resume(b.failback.unwrap_or(false), request_id.as_deref())
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

async fn metrics(State(node): State<Arc<Node>>) -> Response {
    let m = &node.metrics;
    let (vms, running, queued, rate) = node.gauges();
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, lines: &[(String, f64)]| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for (labels, v) in lines {
            out.push_str(&format!("{name}{labels} {v}\n"));
        }
    };
    let outcomes = ["completed", "failed", "cancelled", "unresolved"];
    metric(
        "ferry_migrations_total",
        "counter",
        "Outgoing migrations finished, by outcome.",
        &outcomes
            .iter()
            .zip(&m.outcomes)
            .map(|(o, c)| {
                (
                    format!("{{outcome=\"{o}\"}}"),
                    c.load(Ordering::Relaxed) as f64,
                )
            })
            .collect::<Vec<_>>(),
    );
    metric(
        "ferry_migrations_received_total",
        "counter",
        "Incoming migrations completed on this node.",
        &[(String::new(), m.received.load(Ordering::Relaxed) as f64)],
    );
    metric(
        "ferry_migration_bytes_sent_total",
        "counter",
        "Wire bytes of finished outgoing migrations.",
        &[(String::new(), m.bytes_sent.load(Ordering::Relaxed) as f64)],
    );
    metric(
        "ferry_migration_rate_bytes_per_second",
        "gauge",
        "Wire rate of the outgoing migrations running now.",
        &[(String::new(), rate.round())],
    );
    metric(
        "ferry_migrations_running",
        "gauge",
        "Outgoing migrations running now.",
        &[(String::new(), running as f64)],
    );
    metric(
        "ferry_migration_queue_depth",
        "gauge",
        "Outgoing migrations waiting for a slot.",
        &[(String::new(), queued as f64)],
    );
    if let Some(stats) = node.refusals.get() {
        metric(
            "ferry_sessions_refused_total",
            "counter",
            "Connections and sessions the migration listener refused, by reason.",
            &stats
                .refused()
                .into_iter()
                .map(|(why, n)| (format!("{{reason=\"{why}\"}}"), n as f64))
                .collect::<Vec<_>>(),
        );
    }
    metric(
        "ferry_api_requests_refused_total",
        "counter",
        "Control API connections and requests refused, by reason.",
        &node
            .api_stats
            .refused()
            .into_iter()
            .map(|(why, n)| (format!("{{reason=\"{why}\"}}"), n as f64))
            .collect::<Vec<_>>(),
    );
    if let Some(live) = node.liveness.get() {
        let (reads, writes) = live.etcd().counts();
        metric(
            "ferry_etcd_requests_total",
            "counter",
            "Key-value requests this agent made to etcd, by kind.",
            &[
                ("{kind=\"read\"}".to_string(), reads as f64),
                ("{kind=\"write\"}".to_string(), writes as f64),
            ],
        );
    }
    metric(
        "ferry_vms_hosted",
        "gauge",
        "VMs on this node, arriving ones included.",
        &[(String::new(), vms as f64)],
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

/// Every route wants `Authorization: Bearer <token>`, compared in constant
/// time: the cluster's token for everything, the read-only token for `GET`
/// (and `HEAD`) routes and `/metrics` only.
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
    if is(&node.cluster.token) {
        return next.run(req).await;
    }
    if node.cluster.readonly_token.as_deref().is_some_and(is) {
        let reads = matches!(
            *req.method(),
            axum::http::Method::GET | axum::http::Method::HEAD
        );
        if reads {
            return next.run(req).await;
        }
        return ApiError {
            status: StatusCode::FORBIDDEN,
            code: "forbidden",
            message: "the read-only token may only read (GET routes and /metrics)".into(),
        }
        .into_response();
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
        .route("/metrics", get(metrics))
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

/// The API's TLS acceptor from the node's certificate and key, or `None`
/// with `insecure_api`.
fn api_tls(node: &Node) -> Result<Option<tokio_rustls::TlsAcceptor>, String> {
    let Some(cert) = &node.spec.api_cert else {
        return Ok(None);
    };
    let name = &node.spec.name;
    let key_file = node.spec.api_key_file.as_ref().ok_or_else(|| {
        format!("node {name}: the cluster file names its tls_cert but no tls_key, which its agent needs")
    })?;
    let key = crate::migration::auth::read_secret_file(key_file)
        .map_err(|e| format!("node {name}: tls_key: {e}"))?;
    let server = crate::transport::tls::TlsServer::from_der_and_pem_key(cert, &key)
        .map_err(|e| format!("node {name}: {e}"))?;
    Ok(Some(server.acceptor()))
}

/// A running agent.
#[derive(Debug)]
pub struct AgentHandle {
    /// The node it runs.
    pub node: Arc<Node>,
    /// Where its control API listens.
    pub control_addr: SocketAddr,
    /// Where it takes incoming migrations.
    pub data_addr: SocketAddr,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The task renewing the node's lease, and its own stop
    /// (it renews until the other tasks have ended).
    keep: Option<(CancellationToken, tokio::task::JoinHandle<()>)>,
    /// The writer of the node's own records, and its stop.
    journal: Option<(CancellationToken, tokio::task::JoinHandle<()>)>,
}

impl AgentHandle {
    /// The agent's stop as SIGTERM asks for it: drains the node (its VMs move
    /// to the other nodes), then shuts down once it hosts nothing, or at once
    /// when the stop is forced (`POST /v1/node/stop` with `force`), naming
    /// the VMs discarded.
    pub async fn drain_and_shutdown(self) -> super::StopEnd {
        self.node.stop.ask(false);
        let end = self.node.drain_for_stop().await;
        if let super::StopEnd::Forced(vms) = &end {
            if !vms.is_empty() {
                tracing::error!(?vms, "stopping with force: these VMs are discarded");
            }
            // Discarded on purpose: not restarted elsewhere either.
            for vm in vms {
                let unresolved = self.node.unresolved_of(vm);
                if let Err(e) = self.node.forget_record(vm, unresolved).await {
                    tracing::warn!(%vm, error = %e, "deleting the discarded VM's record failed");
                }
            }
        }
        self.shutdown().await;
        end
    }

    /// Stops taking requests and migrations and waits for the listeners to
    /// close. Outgoing migrations in flight are cancelled first, which
    /// leaves each guest running here; whatever it hosts is discarded.
    pub async fn shutdown(self) {
        self.node.cancel_all();
        self.node.close_operations().await;
        self.node.wait_idle(Duration::from_secs(30)).await;
        self.stop.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
        // What the node recorded lands before its lease goes.
        if let Some((stop, task)) = self.journal {
            if let Some(j) = self.node.journal.get() {
                if !j.flush(Duration::from_secs(10)).await {
                    tracing::error!("stopping before every record reached etcd");
                }
            }
            stop.cancel();
            let _ = task.await;
        }
        // A clean stop: the node is known gone at once.
        if let Some((stop, task)) = self.keep {
            stop.cancel();
            let _ = task.await;
        }
        if let Some(live) = self.node.liveness.get() {
            live.revoke().await;
        }
    }
}

/// Starts node `name` of `cluster`: binds its control and data addresses
/// from the cluster file and serves until [`AgentHandle::shutdown`].
pub async fn serve_agent(cluster: Cluster, name: &str) -> std::io::Result<AgentHandle> {
    serve_agent_with(cluster, name, None).await
}

/// As [`serve_agent`], injecting `fault` into incoming migrations (tests of
/// the hand-off rules; the hidden `--fault` option of `ferry agent`).
pub async fn serve_agent_with(
    cluster: Cluster,
    name: &str,
    fault: Option<crate::migration::fault::Fault>,
) -> std::io::Result<AgentHandle> {
    let Some(store) = cluster.store.clone() else {
        return Err(std::io::Error::other(format!(
            "{}: no `etcd = [\"host:port\", ...]`: agents keep the cluster's state in etcd (standalone hosts migrate with `ferry send` and `ferry receive`)",
            cluster.path.display()
        )));
    };
    // Connections in flight on both listeners and the guests' files must
    // not run out of descriptors: take all the hard limit allows.
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        tracing::warn!(error = %e, "cannot raise the descriptor limit");
    }
    let node = Node::new(cluster, name).map_err(std::io::Error::other)?;
    let stop = CancellationToken::new();
    let receiver = bind_receiver(&node, fault).await?;
    let data_addr = receiver.local_addr()?;
    let _ = node.refusals.set(receiver.stats());
    let api_tls = api_tls(&node).map_err(std::io::Error::other)?;
    let listener = tokio::net::TcpListener::bind(&node.spec.control).await?;
    let control_addr = listener.local_addr()?;
    // Registered once both listeners are bound, so a failed start leaves
    // no lease behind.
    let keep = Some(register(&store, &node).await?);
    // The journal writes until the lease is revoked, after the other tasks.
    let journal_stop = CancellationToken::new();
    let journal_task = node.journal.get().cloned().map(|j| {
        let until = journal_stop.clone();
        tokio::spawn(async move { j.run(until).await })
    });
    let tasks = spawn_tasks(&node, receiver, listener, api_tls, &stop);
    tracing::info!(node = %node.spec.name, control = %control_addr, data = %data_addr, "agent running");
    node.start_mode();
    Ok(AgentHandle {
        node,
        control_addr,
        data_addr,
        stop,
        tasks,
        keep,
        journal: journal_task.map(|t| (journal_stop, t)),
    })
}

/// Binds the node's data address: every session proves the cluster's key
/// and passes the node's admission; a guest that arrives joins the node.
async fn bind_receiver(
    node: &Arc<Node>,
    fault: Option<crate::migration::fault::Fault>,
) -> std::io::Result<Receiver> {
    let weak = Arc::downgrade(node);
    let weak_go = weak.clone();
    Receiver::bind(
        &node.spec.data,
        ReceiverConfig {
            max_memory: node.spec.memory_capacity,
            // Every session proves the cluster's key, or is refused; with
            // TLS the proofs are bound to each channel's TLS session.
            key: Some(crate::migration::auth::SessionKey(node.cluster.key.clone())),
            tls: if node.cluster.tls {
                Some(crate::transport::tls::TlsServer::ephemeral().map_err(std::io::Error::other)?)
            } else {
                None
            },
            unauthenticated: crate::transport::Unauthenticated::Refuse,
            fault,
            admit: Some(Arc::new(move |session, setup| match weak.upgrade() {
                Some(node) => node.admit_incoming(session, setup),
                None => Err("the agent is shutting down".into()),
            })),
            on_go: Some(Arc::new(move |session, _label, guest, resumed| {
                if let Some(node) = weak_go.upgrade() {
                    node.vm_arrived(session, guest, resumed);
                }
            })),
            ..ReceiverConfig::default()
        },
    )
    .await
}

/// Registers the node's lease in etcd, reads its records back and keeps
/// the lease renewed until the returned token is cancelled.
async fn register(
    store: &super::store::StoreConfig,
    node: &Arc<Node>,
) -> std::io::Result<(CancellationToken, tokio::task::JoinHandle<()>)> {
    let live = super::store::Liveness::register(store, &node.spec)
        .await
        .map_err(|e| std::io::Error::other(format!("registering in etcd: {e}")))?;
    let live = Arc::new(live);
    let _ = node.liveness.set(live.clone());
    let _ = node.journal.set(Arc::new(super::journal::Journal::new(
        live.etcd().clone(),
        live.prefix(),
        &node.spec.name,
    )));
    if let Err(e) = node.restore().await {
        live.revoke().await;
        return Err(std::io::Error::other(format!(
            "reading this node's records in etcd: {e}"
        )));
    }
    if let Err(e) = node.adopt_records().await {
        live.revoke().await;
        return Err(std::io::Error::other(format!(
            "reading this node's VMs in etcd: {e}"
        )));
    }
    // A superseded copy held again never runs here: its VM starts
    // elsewhere if its record still names this node.
    node.restart_kept_superseded();
    let until = CancellationToken::new();
    let task = tokio::spawn({
        let until = until.clone();
        let hooks: Arc<dyn super::fence::FenceHooks> = node.clone();
        async move { live.keep(until, hooks).await }
    });
    Ok((until, task))
}

/// Starts the node's tasks: keeping copies, the mirror and coordinator,
/// the receiver and what arrives through it, and the control API.
fn spawn_tasks(
    node: &Arc<Node>,
    receiver: Receiver,
    listener: tokio::net::TcpListener,
    api_tls: Option<tokio_rustls::TlsAcceptor>,
    stop: &CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(node.clone().keep_copies(stop.clone())));
    if let Some(live) = node.liveness.get().cloned() {
        let mirror = Arc::new(super::mirror::Mirror::new(
            live.etcd().clone(),
            live.prefix(),
        ));
        let _ = node.mirror.set(mirror.clone());
        tasks.push(tokio::spawn({
            let (mirror, stop) = (mirror.clone(), stop.clone());
            async move { mirror.run(stop).await }
        }));
        tasks.push(tokio::spawn(super::coordinator::run(
            node.clone(),
            live,
            mirror,
            stop.clone(),
        )));
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    let ctx = RunContext {
        cancel: stop.child_token(),
        ..RunContext::default()
    };
    tasks.push(tokio::spawn(receiver.serve(ctx, tx)));
    let n = node.clone();
    tasks.push(tokio::spawn(async move {
        while let Some(incoming) = rx.recv().await {
            n.incoming_done(incoming);
        }
    }));
    let app = router(node.clone());
    let (stats, limits) = (node.api_stats.clone(), node.api_limits);
    tasks.push(tokio::spawn(super::listen::serve_api(
        listener,
        app,
        api_tls,
        limits,
        stats,
        stop.clone(),
    )));
    tasks
}
