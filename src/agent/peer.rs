//! Calls to other agents' control APIs (and the orchestrator's calls to any
//! agent): HTTPS to each node pinned to that node's certificate from the
//! cluster file (plain HTTP only with `insecure_api`), the cluster's bearer
//! token, JSON in and out.

use super::cluster::{Cluster, NodeSpec};
use reqwest::Method;
use serde_json::Value;
use std::collections::HashMap;
use std::time::Duration;

/// A client for the agents of one cluster.
#[derive(Debug, Clone)]
pub struct Peers {
    /// Per node: its client (pinned to its certificate) and URL scheme.
    clients: HashMap<String, (reqwest::Client, &'static str)>,
    token: String,
    /// How long a kept-alive connection may sit idle before it is dropped
    /// rather than reused.
    idle: Duration,
}

/// A failed call: the agent's own error, or why it could not be reached.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PeerError {
    /// The agent answered with an error.
    #[error("node {node}: {message} ({status})")]
    Api {
        /// The node.
        node: String,
        /// The HTTP status.
        status: u16,
        /// The error's code.
        code: String,
        /// The error's message.
        message: String,
    },
    /// The agent could not be reached or answered with something other than
    /// JSON.
    #[error("node {node}: {message}")]
    Unreachable {
        /// The node.
        node: String,
        /// What went wrong.
        message: String,
    },
    /// The agent answered, but not with what the route gives (another
    /// version, or not an agent), or the request would not serialize.
    #[error("node {node}: {message}")]
    Invalid {
        /// The node.
        node: String,
        /// What did not read.
        message: String,
    },
}

impl Peers {
    /// A client with `cluster`'s token.
    pub fn new(cluster: &Cluster) -> Self {
        Self::with_token(cluster, cluster.token.clone())
    }

    /// A client presenting `token` (the read-only one, say).
    pub fn with_token(cluster: &Cluster, token: String) -> Self {
        // Half the agents' own wait for a kept-alive connection's next
        // request: a connection the agent is about to close for idleness is
        // never reused, which a client whose runtime sleeps between calls
        // (the CLI's) would otherwise do every time, the close unread.
        let idle = cluster.api.header_timeout / 2;
        let clients = cluster
            .nodes
            .iter()
            .map(|n| (n.name.clone(), client_for(n, idle)))
            .collect();
        Self {
            clients,
            token,
            idle,
        }
    }

    /// `method path` on `node`'s API with an optional JSON body.
    pub async fn call(
        &self,
        node: &NodeSpec,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, PeerError> {
        let (resp, url) = self.send(node, method, path, body).await?;
        let status = resp.status();
        let text = read_capped(resp, MAX_ANSWER)
            .await
            .and_then(|b| String::from_utf8(b).map_err(|_| "the answer is not UTF-8".into()))
            .map_err(|e| unreachable(node, format!("reading the answer from {url}: {e}")))?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|_| unreachable(node, format!("{url} answered {status} with {text:?}")))?;
        if status.is_success() {
            Ok(value)
        } else {
            Err(api_error(node, status.as_u16(), &value, &text))
        }
    }

    /// `GET path` for an answer that is bytes, not JSON, of at most `max`
    /// bytes (an error is JSON as ever).
    pub async fn get_bytes(
        &self,
        node: &NodeSpec,
        path: &str,
        max: usize,
    ) -> Result<Vec<u8>, PeerError> {
        self.bytes(node, Method::GET, path, None, max).await
    }

    /// `method path` on `node` with an optional JSON body, the answer's
    /// body as bytes (at most `max` read).
    pub async fn bytes(
        &self,
        node: &NodeSpec,
        method: Method,
        path: &str,
        body: Option<&Value>,
        max: usize,
    ) -> Result<Vec<u8>, PeerError> {
        let (resp, url) = self.send(node, method, path, body).await?;
        let status = resp.status();
        let body = read_capped(resp, max)
            .await
            .map_err(|e| unreachable(node, format!("reading the answer from {url}: {e}")))?;
        if status.is_success() {
            return Ok(body);
        }
        let text = String::from_utf8_lossy(&body);
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        Err(api_error(node, status.as_u16(), &value, &text))
    }

    /// `GET path` of `node` for server-sent events (`/v1/events` or
    /// `/v1/cluster/events`), resuming after event `last`: the answer,
    /// whose body streams for as long as both ends live (a day at most).
    pub async fn events(
        &self,
        node: &NodeSpec,
        path: &str,
        last: Option<&str>,
    ) -> Result<reqwest::Response, PeerError> {
        let (http, scheme) = match self.clients.get(&node.name) {
            Some((c, s)) => (c.clone(), *s),
            None => client_for(node, self.idle),
        };
        let url = format!("{scheme}://{}{path}", node.control);
        let mut req = http
            .get(&url)
            .bearer_auth(&self.token)
            .timeout(Duration::from_secs(24 * 3600));
        if let Some(id) = last {
            req = req.header("Last-Event-ID", id);
        }
        // The stream may last; its answer may not.
        let resp = tokio::time::timeout(Duration::from_secs(10), req.send())
            .await
            .map_err(|_| unreachable(node, format!("no answer from {url} within 10 s")))?
            .map_err(|e| unreachable(node, format!("cannot reach {url}: {}", chain(&e))))?;
        if !resp.status().is_success() {
            let status = resp.status().as_u16();
            let text =
                String::from_utf8_lossy(&read_capped(resp, MAX_ANSWER).await.unwrap_or_default())
                    .to_string();
            let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            return Err(api_error(node, status, &value, &text));
        }
        Ok(resp)
    }

    /// Sends `method path` to `node` with the token; the answer and the URL.
    async fn send(
        &self,
        node: &NodeSpec,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(reqwest::Response, String), PeerError> {
        let (http, scheme) = match self.clients.get(&node.name) {
            Some((c, s)) => (c.clone(), *s),
            None => client_for(node, self.idle),
        };
        let url = format!("{scheme}://{}{path}", node.control);
        let mut req = http.request(method, &url).bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| unreachable(node, format!("cannot reach {url}: {}", chain(&e))))?;
        Ok((resp, url))
    }

    /// `GET path`.
    pub async fn get(&self, node: &NodeSpec, path: &str) -> Result<Value, PeerError> {
        self.call(node, Method::GET, path, None).await
    }

    /// `POST path` with `body`.
    pub async fn post(
        &self,
        node: &NodeSpec,
        path: &str,
        body: &Value,
    ) -> Result<Value, PeerError> {
        self.call(node, Method::POST, path, Some(body)).await
    }
}

/// The largest answer read from an agent.
const MAX_ANSWER: usize = 16 << 20;

/// The answer's body, refused past `max` bytes.
async fn read_capped(mut resp: reqwest::Response, max: usize) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
        if body.len() + chunk.len() > max {
            return Err(format!("the answer is over {max} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn unreachable(node: &NodeSpec, message: String) -> PeerError {
    PeerError::Unreachable {
        node: node.name.clone(),
        message,
    }
}

/// An agent's error answer: its code and message, or the text it sent.
fn api_error(node: &NodeSpec, status: u16, value: &Value, text: &str) -> PeerError {
    PeerError::Api {
        node: node.name.clone(),
        status,
        code: value["error"]["code"].as_str().unwrap_or("").into(),
        message: value["error"]["message"]
            .as_str()
            .unwrap_or(text)
            .to_string(),
    }
}

/// A client for `node`: HTTPS trusting exactly its certificate, or plain
/// HTTP when the cluster has none (`insecure_api`); connections idle for
/// `idle` are not reused.
fn client_for(node: &NodeSpec, idle: Duration) -> (reqwest::Client, &'static str) {
    crate::transport::tls::install_default_provider();
    let builder = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_idle_timeout(idle);
    match &node.api_cert {
        Some(der) => (
            builder
                .use_preconfigured_tls(crate::transport::tls::TlsClient::pinned_config(der))
                .https_only(true)
                .build()
                .expect("an HTTPS client with a pinned certificate builds"),
            "https",
        ),
        None => (builder.build().expect("an HTTP client builds"), "http"),
    }
}

/// An error and its causes, as one line (a TLS refusal sits deep inside).
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}
