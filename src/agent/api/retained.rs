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

/// `?image=&memory=`: the RAM image and size of a VM looking for a base.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct KinQuery {
    image: String,
    memory: u64,
}

/// `GET /v1/bases?image=PATH&memory=N`: the copies this node holds (warm,
/// or kept on disk) of VMs made from RAM image `PATH`, of `N` bytes, newest
/// first: bases for another VM made from it. For the cluster's token only.
pub(super) async fn get_bases(
    State(node): State<Arc<Node>>,
    q: Result<Query<KinQuery>, QueryRejection>,
) -> ApiResult {
    let Query(q) = q.map_err(|e| ApiError::bad_request(format!("query: {e}")))?;
    if q.image.len() > crate::agent::node::MAX_IMAGE_PATH {
        return Err(ApiError::bad_request(format!(
            "image: a path of {} bytes, at most {}",
            q.image.len(),
            crate::agent::node::MAX_IMAGE_PATH
        )));
    }
    Ok(json_status(
        StatusCode::OK,
        &node.kin_copies(&q.image, q.memory),
    ))
}

/// `POST /v1/bases/{vm}/tags`'s body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TagRequest {
    migration: String,
    /// 32 bytes, hex.
    key: String,
    #[serde(default)]
    first: u64,
    count: u64,
}

/// `POST /v1/bases/{vm}/tags` with `{migration, key, first, count}`: for
/// pages `first..first + count` (at most [`MAX_HASHES`]) of the copy VM
/// `vm` left this node with by `migration`, each page's xxh3 hash and its
/// keyed BLAKE3 tag under `key` (the first 8 bytes), 16 bytes a page,
/// little-endian, as `application/octet-stream`. For the cluster's token
/// only: under a key the caller chose, a tag says as much as a hash.
pub(super) async fn post_tags(
    State(node): State<Arc<Node>>,
    Path(vm): Path<String>,
    body: Result<axum::Json<TagRequest>, axum::extract::rejection::JsonRejection>,
) -> ApiResult {
    let axum::Json(r) = body.map_err(|e| ApiError::bad_request(format!("body: {e}")))?;
    let key = parse_key(&r.key)?;
    if r.count > MAX_HASHES {
        return Err(ApiError::bad_request(format!(
            "count: {} pages asked for, at most {MAX_HASHES} an answer",
            r.count
        )));
    }
    let node2 = node.clone();
    let (vm2, migration) = (vm.clone(), r.migration.clone());
    let (first, count) = (r.first, r.count);
    let tag = move || node2.kin_tags((&vm2, &migration), &key, (first, count));
    let pairs = tokio::task::spawn_blocking(tag)
        .await
        .map_err(|e| ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: "internal",
            message: format!("tagging the copy: {e}"),
        })?
        .map_err(|e| match e {
            crate::agent::node::TagError::NotHere(why) => ApiError {
                status: StatusCode::NOT_FOUND,
                code: "not_found",
                message: why,
            },
            crate::agent::node::TagError::Unusable(why) => ApiError {
                status: StatusCode::CONFLICT,
                code: "unusable",
                message: format!("VM {vm}'s copy on node {}: {why}", node.name()),
            },
        })?;
    let body: Vec<u8> = pairs
        .iter()
        .flat_map(|(h, t)| h.to_le_bytes().into_iter().chain(t.to_le_bytes()))
        .collect();
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/octet-stream")],
        body,
    )
        .into_response())
}

/// A 32-byte key from 64 hex digits.
fn parse_key(hex: &str) -> Result<[u8; 32], ApiError> {
    let bad = || ApiError::bad_request("key: not 64 hex digits".to_string());
    if hex.len() != 64 || !hex.is_ascii() {
        return Err(bad());
    }
    let mut key = [0u8; 32];
    for (i, b) in key.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(key)
}
