//! The node agent: one per host, it hosts VMs, takes incoming migrations from
//! the other nodes of its cluster, runs its outgoing ones at most
//! `max_concurrent_migrations` at a time, and serves the control API.

mod api;
mod child;
pub mod client;
mod clock;
pub mod cluster;
pub mod coordinator;
pub mod durable;
pub mod etcd;
pub mod events;
pub mod fence;
#[cfg(feature = "fuzzing")]
pub mod fuzz;
pub mod ha;
pub mod histogram;
pub mod journal;
mod kept;
mod listen;
pub mod members;
mod membership;
pub mod mirror;
mod node;
mod ops;
mod ownership;
pub mod peer;
pub mod preview;
pub mod quarantine;
pub mod records;
pub mod relay;
pub mod request;
pub mod retain;
mod retarget;
pub mod rolling;
pub mod schedule;
pub mod session;
mod shutdown;
pub mod store;

pub use api::{router, serve_agent, serve_agent_with, AgentHandle};
pub use cluster::{Cluster, ClusterError, NodeSpec};
pub use listen::{ApiLimits, ApiStats};
pub use membership::RemovedNode;
pub use node::{
    Direction, Limits, MigrationState, MigrationView, Node, NodeError, NodeMode, NodeView,
    ProgressView, VmSpec, VmState, VmView,
};
pub use ops::{
    place, place_near, step_ended, DrainRequest, Held, Interruption, Near, OpKind, OpState,
    OperationView, Placement, RemainingVm, Step,
};
pub use shutdown::{Stop, StopEnd};
