//! Calls to other agents' control APIs (and the orchestrator's calls to any
//! agent): plain HTTP with the cluster's bearer token, JSON in and out.

use super::cluster::{Cluster, NodeSpec};
use reqwest::Method;
use serde_json::Value;
use std::time::Duration;

/// A client for the agents of one cluster.
#[derive(Debug, Clone)]
pub struct Peers {
    http: reqwest::Client,
    token: String,
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
}

impl Peers {
    /// A client with `cluster`'s token.
    pub fn new(cluster: &Cluster) -> Self {
        Self {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("an HTTP client without TLS builds"),
            token: cluster.token.clone(),
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
        let url = format!("http://{}{path}", node.control);
        let mut req = self.http.request(method, &url).bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(b);
        }
        let unreachable = |message: String| PeerError::Unreachable {
            node: node.name.clone(),
            message,
        };
        let resp = req
            .send()
            .await
            .map_err(|e| unreachable(format!("cannot reach {url}: {e}")))?;
        let status = resp.status();
        let text = resp
            .text()
            .await
            .map_err(|e| unreachable(format!("reading the answer from {url}: {e}")))?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|_| unreachable(format!("{url} answered {status} with {text:?}")))?;
        if status.is_success() {
            Ok(value)
        } else {
            Err(PeerError::Api {
                node: node.name.clone(),
                status: status.as_u16(),
                code: value["error"]["code"].as_str().unwrap_or("").into(),
                message: value["error"]["message"]
                    .as_str()
                    .unwrap_or(&text)
                    .to_string(),
            })
        }
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
