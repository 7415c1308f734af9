//! Cluster operations through any agent: `POST /v1/nodes/{name}/{action}`
//! (drain, resume, update, stop) on any agent is handed to the elected
//! coordinator, which starts it on node `name`'s agent, one start at a time
//! across the cluster, so two drains asked at once never pick each other's
//! node as a target. The operation then runs on that node's agent with its
//! journal in etcd, so neither the asking agent nor the coordinator has to
//! live until it ends. Reads and cancels of a node's operations
//! (`/v1/nodes/{name}/operations[/{id}]`) go straight to that node, and so
//! do `POST /v1/migrations` of a VM that runs on another node and the
//! reads, cancels and resolves of a migration another node numbered.

use super::cluster::NodeSpec;
use super::node::{Node, NodeError};
use super::peer::PeerError;
use reqwest::Method;
use serde_json::Value;
use std::time::Duration;

/// The longest the coordinator waits for its turn to start an operation.
pub const TURN_WAIT: Duration = Duration::from_secs(5);
/// The longest a node is given to start an operation (within the
/// coordinator's hop, itself within the API's 30 s request limit).
pub const START_WAIT: Duration = Duration::from_secs(12);
/// The longest the coordinator is given to answer a handed operation.
const HAND_WAIT: Duration = Duration::from_secs(20);

/// What a node can be asked to do through any agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// `POST /v1/node/drain`.
    Drain,
    /// `POST /v1/node/resume`.
    Resume,
    /// `POST /v1/node/update`.
    Update,
    /// `POST /v1/node/stop`.
    Stop,
}

impl Action {
    /// The action a path segment names.
    pub fn parse(text: &str) -> Result<Self, NodeError> {
        match text {
            "drain" => Ok(Self::Drain),
            "resume" => Ok(Self::Resume),
            "update" => Ok(Self::Update),
            "stop" => Ok(Self::Stop),
            _ => Err(NodeError::NotFound(format!(
                "no action {text:?} for a node: drain, resume, update or stop"
            ))),
        }
    }

    /// Its path segment.
    pub fn name(self) -> &'static str {
        match self {
            Self::Drain => "drain",
            Self::Resume => "resume",
            Self::Update => "update",
            Self::Stop => "stop",
        }
    }
}

/// Where a cluster operation asked of this agent goes next.
#[derive(Debug)]
pub enum Hop {
    /// To the coordinator, another agent.
    Coordinator(Box<NodeSpec>),
    /// This agent coordinates (or the coordinator handed it here): start it.
    Start,
}

/// No answer from `asked` within `limit`: whether node `target` started
/// the operation is not known.
fn unknown(asked: &str, target: &str, limit: Duration) -> NodeError {
    NodeError::Unavailable(format!(
        "node {asked} did not answer within {limit:?}: whether node {target} started the \
         operation is unknown; see GET /v1/nodes/{target}/operations before asking again"
    ))
}

/// A peer's answer as this API's error: the same status class, its message
/// kept (it names the node).
pub fn from_peer(e: PeerError) -> NodeError {
    match e {
        PeerError::Api {
            status, ref code, ..
        } if status == 409 && code == "insufficient_memory" => {
            NodeError::InsufficientMemory(e.to_string())
        }
        PeerError::Api { status, .. } => match status {
            400 => NodeError::BadRequest(e.to_string()),
            404 => NodeError::NotFound(e.to_string()),
            409 => NodeError::Conflict(e.to_string()),
            501 => NodeError::Unsupported(e.to_string()),
            _ => NodeError::Unavailable(e.to_string()),
        },
        PeerError::Unreachable { .. } | PeerError::Invalid { .. } => {
            NodeError::Unavailable(e.to_string())
        }
    }
}

impl Node {
    /// Where `action` on node `target` goes from here; `handed` when the
    /// coordinator sent it (it is started then, even if the role moved
    /// meanwhile: one hop, never a loop). Waits up to a lease's time for an
    /// election.
    pub async fn next_hop(&self, target: &str, handed: bool) -> Result<Hop, NodeError> {
        let mirror = self.mirror.get().ok_or_else(|| {
            NodeError::Unavailable("this agent has not read the cluster's state yet".into())
        })?;
        self.known_node(target)?;
        if handed {
            // Started only by the coordinator: one that lost the role
            // meanwhile sends the asker back to find the new one.
            return match mirror.coordinator() {
                Some((c, _)) if c.node == self.spec.name => Ok(Hop::Start),
                _ => Err(NodeError::Unavailable(format!(
                    "node {} is no longer the coordinator; ask again",
                    self.spec.name
                ))),
            };
        }
        let wait = self
            .cluster
            .store
            .as_ref()
            .map_or(Duration::from_secs(5), |s| s.lease_ttl)
            + Duration::from_secs(1);
        let deadline = tokio::time::Instant::now() + wait;
        let mut changes = mirror.subscribe();
        loop {
            if let Some((c, _)) = mirror.coordinator() {
                if c.node == self.spec.name {
                    return Ok(Hop::Start);
                }
                if let Some(spec) = self.member(&c.node) {
                    return Ok(Hop::Coordinator(Box::new(spec)));
                }
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Err(NodeError::Unavailable(format!(
                    "no coordinator was elected within {wait:?} (is etcd's quorum lost?); \
                     node {target}'s own agent still takes POST /v1/node/ACTION"
                )));
            }
            let step = left.min(Duration::from_millis(250));
            // A mirror that stopped (its sender gone) answers at once:
            // then this waits out the step instead of spinning.
            if let Ok(Err(_)) = tokio::time::timeout(step, changes.changed()).await {
                tokio::time::sleep(step).await;
            }
        }
    }

    /// Hands `action` on `target` to the coordinator `to`.
    pub async fn hand_to(
        &self,
        to: &NodeSpec,
        target: &str,
        action: Action,
        body: &Value,
    ) -> Result<Value, NodeError> {
        let spec = self.known_node(target)?;
        let path = format!(
            "/v1/nodes/{}/{}?handed=true",
            super::client::segment(&spec.name).unwrap_or_default(),
            action.name()
        );
        let asked = self.peers.call(to, Method::POST, &path, Some(body));
        match tokio::time::timeout(HAND_WAIT, asked).await {
            Ok(Ok(v)) => Ok(v),
            // A coordinator of an older version, without the route: the
            // node is asked itself.
            Ok(Err(PeerError::Api {
                status: 404,
                ref message,
                ..
            })) if message.starts_with("no such route") => {
                self.ask_node(target, action, body).await
            }
            Ok(Err(e)) => Err(from_peer(e)),
            Err(_) => Err(unknown(&to.name, target, HAND_WAIT)),
        }
    }

    /// Waits at most [`TURN_WAIT`] for this coordinator's turn to start an
    /// operation.
    pub async fn cluster_turn(&self) -> Result<tokio::sync::MutexGuard<'_, ()>, NodeError> {
        tokio::time::timeout(TURN_WAIT, self.cluster_turn.lock())
            .await
            .map_err(|_| {
                NodeError::Unavailable(format!(
                    "another cluster operation has been starting for {TURN_WAIT:?}; ask again"
                ))
            })
    }

    /// Asks node `target`'s own agent (another node) for `action`.
    pub async fn ask_node(
        &self,
        target: &str,
        action: Action,
        body: &Value,
    ) -> Result<Value, NodeError> {
        let spec = self.known_node(target)?;
        let path = format!("/v1/node/{}", action.name());
        let asked = self.peers.call(&spec, Method::POST, &path, Some(body));
        match tokio::time::timeout(START_WAIT, asked).await {
            Ok(answer) => answer.map_err(from_peer),
            Err(_) => Err(unknown(target, target, START_WAIT)),
        }
    }

    /// `GET` or `DELETE` `rest` (a path under `/v1/`) on node `target`'s
    /// agent, another node.
    pub async fn on_node(
        &self,
        target: &str,
        method: Method,
        rest: &str,
    ) -> Result<Value, NodeError> {
        let spec = self.known_node(target)?;
        self.peers
            .call(&spec, method, &format!("/v1/{rest}"), None)
            .await
            .map_err(from_peer)
    }

    /// The node VM `vm` runs on, as etcd has it, when that is another node
    /// (`POST /v1/migrations` of a VM not here goes there).
    pub fn host_elsewhere(&self, vm: &str) -> Option<NodeSpec> {
        if !super::node::valid_name(vm) || self.vm(vm).is_ok() {
            return None;
        }
        let (record, _) = self.mirror.get()?.vm(vm)?;
        if record.node == self.spec.name {
            return None;
        }
        self.member(&record.node)
    }

    /// Asks `host` for the migration `body` describes, as handed on: it
    /// goes no further.
    pub async fn hand_migration(&self, host: &NodeSpec, body: &Value) -> Result<Value, NodeError> {
        self.peers
            .call(host, Method::POST, "/v1/migrations?handed=true", Some(body))
            .await
            .map_err(from_peer)
    }

    /// The other node whose agent numbered migration `id`
    /// (`{node}-{n}-{m}`): its source, where it is read, cancelled and
    /// resolved.
    pub fn migration_owner(&self, id: &str) -> Option<NodeSpec> {
        let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
        let numbered = |rest: &str| {
            let mut parts = rest.split('-');
            matches!(
                (parts.next(), parts.next(), parts.next()),
                (Some(a), Some(b), None) if digits(a) && digits(b)
            )
        };
        self.members()
            .into_iter()
            .filter(|n| n.name != self.spec.name)
            .filter(|n| {
                id.strip_prefix(n.name.as_str())
                    .and_then(|r| r.strip_prefix('-'))
                    .is_some_and(numbered)
            })
            .max_by_key(|n| n.name.len())
    }

    /// `method /v1/migrations/{id}{rest}` on `owner`, handed on: it goes
    /// no further.
    pub async fn on_migration(
        &self,
        owner: &NodeSpec,
        method: Method,
        id: &str,
        rest: &str,
        body: Option<&Value>,
    ) -> Result<Value, NodeError> {
        let id = super::client::segment(id)
            .ok_or_else(|| NodeError::NotFound(format!("no migration {id:?}")))?;
        let path = format!("/v1/migrations/{id}{rest}?handed=true");
        self.peers
            .call(owner, method, &path, body)
            .await
            .map_err(from_peer)
    }

    /// Node `name` as [`Node::member`], or a 404 naming it.
    fn known_node(&self, name: &str) -> Result<NodeSpec, NodeError> {
        self.member(name)
            .ok_or_else(|| NodeError::NotFound(format!("no node {name:?} in the cluster")))
    }
}
