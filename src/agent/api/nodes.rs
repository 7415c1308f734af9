//! The routes under `/v1/nodes/{name}` that any agent serves for any node:
//! its view, its operations, and the cluster operations handed to the
//! coordinator ([`crate::agent::relay`]).

use super::{drain, get_node, json_status, parse_body, resume, stop, update, ApiError, ApiResult};
use crate::agent::node::Node;
use crate::agent::relay::{Action, Hop};
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use reqwest::Method;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

/// `?handed=true`: the coordinator sent it; start it here.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct HandedQuery {
    #[serde(default)]
    pub(super) handed: bool,
}

/// `POST /v1/nodes/{name}/{action}`: drain, resume, update or stop node
/// `name`, through the coordinator. Answers as the node's own route does.
pub(super) async fn node_action(
    State(node): State<Arc<Node>>,
    Path((name, action)): Path<(String, String)>,
    q: Result<Query<HandedQuery>, QueryRejection>,
    body: Bytes,
) -> ApiResult {
    let Query(q) = q.map_err(|e| ApiError::bad_request(format!("query: {e}")))?;
    let action = Action::parse(&action)?;
    let value: Value = if body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        parse_body(&body)?
    };
    if !value.is_object() {
        return Err(ApiError::bad_request("the body must be a JSON object"));
    }
    // A drain's plan changes nothing: asked of the node itself, taking no
    // turn among the cluster's starts.
    if action == Action::Drain && value.get("dry_run") == Some(&Value::Bool(true)) {
        if name == node.name() {
            return drain(State(node), Bytes::from(value.to_string())).await;
        }
        return Ok(json_status(
            StatusCode::OK,
            &node.ask_node(&name, action, &value).await?,
        ));
    }
    match node.next_hop(&name, q.handed).await? {
        Hop::Coordinator(c) => {
            let answer = node.hand_to(&c, &name, action, &value).await?;
            Ok(json_status(StatusCode::ACCEPTED, &answer))
        }
        Hop::Start => {
            // One start at a time across the cluster: a drain sees the
            // node of one started just before it as draining.
            let _turn = node.cluster_turn().await?;
            if name != node.name() {
                let answer = node.ask_node(&name, action, &value).await?;
                return Ok(json_status(StatusCode::ACCEPTED, &answer));
            }
            let body = Bytes::from(value.to_string());
            let here = State(node.clone());
            match action {
                Action::Drain => drain(here, body).await,
                Action::Resume => resume(here, body).await,
                Action::Update => update(here, body).await,
                Action::Stop => stop(here, body).await,
            }
        }
    }
}

/// `GET /v1/nodes/{name}`: node `name`'s `GET /v1/node`.
pub(super) async fn node_of(State(node): State<Arc<Node>>, Path(name): Path<String>) -> ApiResult {
    if name == node.name() {
        return get_node(State(node)).await;
    }
    Ok(json_status(
        StatusCode::OK,
        &node.on_node(&name, Method::GET, "node").await?,
    ))
}

/// `GET /v1/nodes/{name}/operations`.
pub(super) async fn operations_of(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
) -> ApiResult {
    if name == node.name() {
        return Ok(json_status(StatusCode::OK, &node.operations()));
    }
    Ok(json_status(
        StatusCode::OK,
        &node.on_node(&name, Method::GET, "operations").await?,
    ))
}

/// `GET /v1/nodes/{name}/operations/{id}`.
pub(super) async fn operation_of(
    State(node): State<Arc<Node>>,
    Path((name, id)): Path<(String, String)>,
) -> ApiResult {
    if name == node.name() {
        return Ok(json_status(StatusCode::OK, &node.operation(&id)?));
    }
    let rest = format!("operations/{}", id_segment(&id)?);
    Ok(json_status(
        StatusCode::OK,
        &node.on_node(&name, Method::GET, &rest).await?,
    ))
}

/// `DELETE /v1/nodes/{name}/operations/{id}`: cancels it.
pub(super) async fn cancel_operation_of(
    State(node): State<Arc<Node>>,
    Path((name, id)): Path<(String, String)>,
) -> ApiResult {
    if name == node.name() {
        return Ok(json_status(StatusCode::OK, &node.cancel_operation(&id)?));
    }
    let rest = format!("operations/{}", id_segment(&id)?);
    Ok(json_status(
        StatusCode::OK,
        &node.on_node(&name, Method::DELETE, &rest).await?,
    ))
}

/// `here`, this node's answer about migration `id`; when it has none and
/// another node numbered it (and the request was not handed on already),
/// that node's answer to the same request.
pub(super) async fn or_elsewhere(
    node: &Node,
    id: &str,
    q: Result<Query<HandedQuery>, QueryRejection>,
    here: Result<crate::agent::node::MigrationView, crate::agent::node::NodeError>,
    method: Method,
    rest: &str,
    body: Option<&Value>,
) -> ApiResult {
    let Query(q) = q.map_err(|e| ApiError::bad_request(format!("query: {e}")))?;
    match here {
        Err(crate::agent::node::NodeError::NotFound(e)) if !q.handed => {
            let Some(owner) = node.migration_owner(id) else {
                return Err(crate::agent::node::NodeError::NotFound(e).into());
            };
            let answer = node.on_migration(&owner, method, id, rest, body).await?;
            Ok(json_status(StatusCode::OK, &answer))
        }
        here => Ok(json_status(StatusCode::OK, &here?)),
    }
}

/// An operation id as one path segment.
fn id_segment(id: &str) -> Result<String, ApiError> {
    crate::agent::client::segment(id).ok_or_else(|| ApiError {
        status: StatusCode::NOT_FOUND,
        code: "not_found",
        message: format!("no operation {id:?}"),
    })
}
