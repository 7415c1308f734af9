//! The routes of what a node keeps of a VM that left it: the retained
//! image's description, and its pages' hashes, which a node sending the VM
//! back here later (from wherever it runs then) offers as its base.

use super::{json_status, ApiError, ApiResult};
use crate::agent::node::Node;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use serde::Deserialize;
use std::sync::Arc;

use crate::agent::retain::MAX_HASHES;

/// `?first=&count=`: the pages whose hashes are wanted.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct HashRange {
    #[serde(default)]
    first: u64,
    count: Option<u64>,
}

fn no_image(node: &Node, vm: &str) -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        code: "not_found",
        message: format!("no image of VM {vm} is kept on node {}", node.name()),
    }
}

/// `GET /v1/retained/{vm}`: the image VM `vm` left this node with.
pub(super) async fn get_retained(
    State(node): State<Arc<Node>>,
    Path(vm): Path<String>,
) -> ApiResult {
    let view = node
        .retention
        .get(&vm)
        .ok_or_else(|| no_image(&node, &vm))?;
    Ok(json_status(StatusCode::OK, &view))
}

/// `GET /v1/retained/{vm}/hashes?first=F&count=N`: the hashes of pages
/// `F..F+N` of that image (by default from `F` to the end, at most
/// [`MAX_HASHES`]), 8 bytes each, little-endian, as
/// `application/octet-stream`. Not for the read-only token: a page's hash
/// tells whether it holds a guessed content.
pub(super) async fn get_hashes(
    State(node): State<Arc<Node>>,
    Path(vm): Path<String>,
    q: Result<Query<HashRange>, QueryRejection>,
) -> ApiResult {
    let Query(q) = q.map_err(|e| ApiError::bad_request(format!("query: {e}")))?;
    // The range is checked against the image's description before its
    // file is opened.
    let view = node
        .retention
        .get(&vm)
        .ok_or_else(|| no_image(&node, &vm))?;
    let pages = view.memory / crate::memory::PAGE_SIZE as u64;
    if q.first > pages {
        return Err(ApiError::bad_request(format!(
            "first: {} is past the image's {pages} pages",
            q.first
        )));
    }
    let count = match q.count {
        None => (pages - q.first).min(MAX_HASHES),
        Some(n) if n > MAX_HASHES => {
            return Err(ApiError::bad_request(format!(
                "count: {n} hashes asked for, at most {MAX_HASHES} an answer"
            )))
        }
        Some(n) => n.min(pages - q.first),
    };
    let node2 = node.clone();
    let vm2 = vm.clone();
    let read = move || node2.retention.image_hashes(&vm2, q.first, count);
    let (memory, hashes) = tokio::task::spawn_blocking(read)
        .await
        .map_err(|e| ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: "internal",
            message: format!("reading the image: {e}"),
        })?
        .map_err(|e| ApiError {
            status: StatusCode::CONFLICT,
            code: "unusable",
            message: format!("VM {vm}'s image on node {}: {e}", node.name()),
        })?;
    if memory != view.memory || hashes.len() as u64 != count {
        // Replaced since its description was read: ask again.
        return Err(ApiError {
            status: StatusCode::CONFLICT,
            code: "unusable",
            message: format!("VM {vm}'s image on node {} changed", node.name()),
        });
    }
    let body: Vec<u8> = hashes.iter().flat_map(|h| h.to_le_bytes()).collect();
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/octet-stream")],
        body,
    )
        .into_response())
}
