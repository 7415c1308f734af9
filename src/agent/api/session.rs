//! The console's sign-in routes: `POST /v1/session` takes a token and sets
//! the session cookie, `DELETE /v1/session` signs out, and
//! `POST /v1/session/revoke` signs everyone out by raising the cluster's
//! session epoch (`{prefix}session/epoch` in etcd). And the check of a
//! request that comes with the cookie instead of a bearer token.

use super::*;
use crate::agent::etcd::{Cmp, Op, Txn};
use crate::agent::session::{cookie, Scope, COOKIE, LIFETIME};
use axum::http::HeaderMap;

/// `POST /v1/session`'s body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SignIn {
    token: String,
}

/// The longest token read.
const MAX_TOKEN: usize = 4096;

fn epoch_key(prefix: &str) -> Vec<u8> {
    format!("{prefix}session/epoch").into_bytes()
}

impl Node {
    /// The cluster's session epoch: etcd's as this agent's mirror last read
    /// it, or what this agent raised it to since, if higher. `None` while
    /// the mirror has not read the cluster whole (an agent just started):
    /// a session is then neither made nor taken.
    pub(crate) fn session_epoch(&self) -> Option<u64> {
        let floor = self.session_floor.load(Ordering::Relaxed);
        if self.liveness.get().is_none() {
            return Some(floor);
        }
        let m = self.mirror.get().filter(|m| m.ready())?;
        let stored = m
            .value(&epoch_key(m.prefix()))
            .and_then(|v| String::from_utf8(v).ok())
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        Some(stored.max(floor))
    }
}

fn epoch_unknown() -> ApiError {
    ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        code: "unavailable",
        message: "this agent has not read the cluster's session epoch yet: try again shortly"
            .into(),
    }
}

/// The scope of a token: the cluster's or the read-only one.
fn scope_of(node: &Node, token: &str) -> Option<Scope> {
    use subtle::ConstantTimeEq;
    let is = |want: &str| {
        token.len() == want.len() && bool::from(token.as_bytes().ct_eq(want.as_bytes()))
    };
    if is(&node.cluster.token) {
        return Some(Scope::Admin);
    }
    node.cluster
        .readonly_token
        .as_deref()
        .is_some_and(is)
        .then_some(Scope::Read)
}

/// `Set-Cookie` for `value`, kept `max_age` seconds (Secure under TLS).
fn set_cookie(node: &Node, value: &str, max_age: u64) -> String {
    let secure = if node.cluster.insecure_api {
        ""
    } else {
        "; Secure"
    };
    format!("{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}")
}

/// `POST /v1/session`: `{"token"}` in, the session cookie out.
pub(super) async fn sign_in(State(node): State<Arc<Node>>, body: Bytes) -> ApiResult {
    let b: SignIn = parse_body(&body)?;
    if b.token.len() > MAX_TOKEN {
        return Err(ApiError::bad_request(format!(
            "token: {} bytes is out of range (at most {MAX_TOKEN})",
            b.token.len()
        )));
    }
    let Some(scope) = scope_of(&node, b.token.trim()) else {
        return Err(ApiError {
            status: StatusCode::UNAUTHORIZED,
            code: "unauthorized",
            message: "that is neither the cluster's token nor its read-only token".into(),
        });
    };
    let expires = crate::agent::node::now_ms() + LIFETIME.as_millis() as u64;
    let epoch = node.session_epoch().ok_or_else(epoch_unknown)?;
    let value = node.sessions.issue(scope, expires, epoch);
    let answer = json!({ "scope": scope.as_str(), "expires_at_ms": expires });
    let mut resp = json_status(StatusCode::OK, &answer);
    let cookie = set_cookie(&node, &value, LIFETIME.as_secs());
    resp.headers_mut()
        .insert(header::SET_COOKIE, cookie.parse().expect("a valid header"));
    Ok(resp)
}

/// How often a stream opened with the session cookie checks it still holds.
const SESSION_CHECK: Duration = Duration::from_secs(5);

/// For a stream opened with the session cookie instead of a bearer token:
/// a future that ends once that cookie no longer holds (expired, or
/// everyone signed out), checked every 5 s, so a long-lived stream ends
/// with its session. Never ends for a bearer token.
pub(super) fn session_end(
    node: Arc<Node>,
    headers: &HeaderMap,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| !t.is_empty());
    let value = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|h| h.to_str().ok())
        .find_map(|h| cookie(h, COOKIE))
        .map(str::to_string);
    let Some(value) = value.filter(|_| !bearer) else {
        return Box::pin(std::future::pending());
    };
    Box::pin(async move {
        loop {
            tokio::time::sleep(SESSION_CHECK).await;
            // An epoch not known just now (etcd away): its tag and expiry
            // are still checked.
            let epoch = node.session_epoch().unwrap_or(0);
            let now = crate::agent::node::now_ms();
            if node.sessions.verify(&value, now, epoch).is_err() {
                return;
            }
        }
    })
}

/// `GET /v1/session`: what this request's credentials give (`admin` or
/// `read`) and how they came (`token` or `cookie`): the console asks on
/// load, as its cookie is not readable from script.
pub(super) async fn whoami(State(node): State<Arc<Node>>, headers: HeaderMap) -> ApiResult {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .filter(|t| !t.is_empty());
    // As the token check takes them: an empty bearer token is none.
    let (scope, via) = match bearer {
        Some(t) => (scope_of(&node, t), "token"),
        None => (
            by_cookie(&node, &headers, false).and_then(Result::ok),
            "cookie",
        ),
    };
    // The middleware let the request through, so one of them holds.
    let scope = scope.ok_or_else(|| ApiError {
        status: StatusCode::UNAUTHORIZED,
        code: "unauthorized",
        message: "not signed in".into(),
    })?;
    Ok(json_status(
        StatusCode::OK,
        &json!({ "scope": scope.as_str(), "via": via }),
    ))
}

/// `DELETE /v1/session`: signs this browser out (its cookie cleared).
pub(super) async fn sign_out(State(node): State<Arc<Node>>) -> Response {
    let mut resp = json_status(StatusCode::OK, &json!({ "signed_out": true }));
    let cookie = set_cookie(&node, "", 0);
    resp.headers_mut()
        .insert(header::SET_COOKIE, cookie.parse().expect("a valid header"));
    resp
}

/// `POST /v1/session/revoke`: signs everyone out, raising the cluster's
/// session epoch in etcd (every cookie made before is refused by every
/// agent once its mirror has read the new epoch, by this one at once).
pub(super) async fn revoke(State(node): State<Arc<Node>>) -> ApiResult {
    let unavailable = |why: String| ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        code: "unavailable",
        message: format!("cannot raise the session epoch: {why}"),
    };
    let Some(live) = node.liveness.get() else {
        return Err(unavailable("this agent has no etcd".into()));
    };
    let key = epoch_key(live.prefix());
    for _ in 0..8 {
        let current = live
            .etcd()
            .get(&key)
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        let (now, when) = match &current {
            Some(kv) => (
                String::from_utf8_lossy(&kv.value)
                    .trim()
                    .parse::<u64>()
                    .unwrap_or(0),
                Cmp::modified_at(&key, kv.mod_revision),
            ),
            None => (0, Cmp::absent(&key)),
        };
        let known = node.session_epoch().unwrap_or(0);
        let Some(next) = now.max(known).checked_add(1) else {
            return Err(unavailable("the epoch is at its largest".into()));
        };
        let txn = Txn::new()
            .when(when)
            .then(Op::put(&key, next.to_string().as_bytes(), None));
        let r = live
            .etcd()
            .txn(&txn)
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        if r.succeeded {
            node.session_floor.fetch_max(next, Ordering::Relaxed);
            tracing::warn!(epoch = next, "everyone was signed out of the console");
            return Ok(json_status(StatusCode::OK, &json!({ "epoch": next })));
        }
    }
    Err(unavailable(
        "the epoch kept changing under this agent".into(),
    ))
}

/// Whether a request with the session cookie comes from the console's own
/// origin: `Sec-Fetch-Site: same-origin`, or an `Origin` that is this
/// agent's own address.
fn same_origin(node: &Node, headers: &HeaderMap) -> bool {
    let text = |h: &str| headers.get(h).and_then(|v| v.to_str().ok());
    if text("sec-fetch-site") == Some("same-origin") {
        return true;
    }
    let scheme = if node.cluster.insecure_api {
        "http"
    } else {
        "https"
    };
    match (text("origin"), text("host")) {
        (Some(origin), Some(host)) => origin == format!("{scheme}://{host}"),
        _ => false,
    }
}

/// What a request that came with the session cookie instead of a bearer
/// token may do: `Ok(scope)`, or the refusal. Changes need the console's
/// own origin.
pub(super) fn by_cookie(
    node: &Node,
    headers: &HeaderMap,
    changes: bool,
) -> Option<Result<Scope, ApiError>> {
    let value = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|h| h.to_str().ok())
        .find_map(|h| cookie(h, COOKIE))?;
    let Some(epoch) = node.session_epoch() else {
        return Some(Err(epoch_unknown()));
    };
    let checked = node
        .sessions
        .verify(value, crate::agent::node::now_ms(), epoch);
    Some(match checked {
        Err(e) => Err(ApiError {
            status: StatusCode::UNAUTHORIZED,
            code: "unauthorized",
            message: e.to_string(),
        }),
        Ok(_) if changes && !same_origin(node, headers) => Err(ApiError {
            status: StatusCode::FORBIDDEN,
            code: "forbidden",
            message: "a change made with the session cookie must come from the console's own origin (an Origin or Sec-Fetch-Site header)".into(),
        }),
        Ok(scope) => Ok(scope),
    })
}
