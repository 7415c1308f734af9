//! Drain on shutdown, as Windows Server 2012 R2 does for a cluster node: an
//! agent asked to stop (SIGTERM, Ctrl-C, `POST /v1/node/stop`) pauses its
//! node, live-migrates its VMs to the other nodes as `ferry node drain`
//! would, and exits once it hosts nothing. A VM that cannot be placed (no
//! room, not running: a paused last copy) keeps the agent running, named in
//! the log, until it can be moved or an operator forces the stop
//! (`ferry agent stop --force`), which discards it, named.

use super::node::{Node, NodeMode, VmState};
use super::ops::{place, DrainRequest, OpState};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How often a stopping agent looks again for room for what it could not
/// move.
pub const RETRY: Duration = Duration::from_secs(10);

/// An agent's stop, once asked.
#[derive(Debug, Default)]
pub struct Stop {
    asked: AtomicBool,
    force: AtomicBool,
    changed: tokio::sync::Notify,
}

impl Stop {
    /// Asks for the stop; `force` stops without waiting for the VMs to move.
    pub fn ask(&self, force: bool) {
        self.asked.store(true, Ordering::Release);
        if force {
            self.force.store(true, Ordering::Release);
        }
        self.changed.notify_waiters();
    }

    /// Whether a stop was asked.
    pub fn asked(&self) -> bool {
        self.asked.load(Ordering::Acquire)
    }

    /// Whether the stop was forced.
    pub fn forced(&self) -> bool {
        self.force.load(Ordering::Acquire)
    }

    /// Returns once a stop is asked.
    pub async fn wait_asked(&self) {
        loop {
            let changed = self.changed.notified();
            if self.asked() {
                return;
            }
            changed.await;
        }
    }
}

/// How a stopping agent ended its drain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopEnd {
    /// It hosts nothing: every VM moved (or there were none).
    Empty,
    /// Forced: these VMs were still here and are discarded.
    Forced(Vec<String>),
}

impl Node {
    /// Whether it hosts nothing but paused copies saved on its disk, and no
    /// migration of its own is under way.
    fn hosts_nothing(&self) -> bool {
        self.unsaved().is_empty() && self.view().migrations_in_flight == 0
    }

    /// Its VMs but the paused copies saved on its disk (which a restarted
    /// agent holds again).
    fn unsaved(&self) -> Vec<super::node::VmView> {
        let mut vms = self.vms();
        vms.retain(|v| !self.is_kept(&v.spec.name));
        vms
    }

    /// Drains the node for its agent's stop: returns once it hosts nothing,
    /// or once the stop is forced. Moves what can be placed (a drain with
    /// `allow_partial`), and looks again every [`RETRY`] for room for the
    /// rest, naming what stays and why in the log each time that changes.
    pub async fn drain_for_stop(self: &Arc<Self>) -> StopEnd {
        let stop = &self.stop;
        {
            // Not while a drain plans (it holds arrivals off meanwhile, and
            // gives the mode back if it refuses).
            let _turn = self.op_turn.lock().await;
            if self.mode() == NodeMode::Active {
                self.set_mode(NodeMode::Paused);
            }
        }
        let mut told = String::new();
        loop {
            if self.hosts_nothing() {
                return StopEnd::Empty;
            }
            if stop.forced() {
                return StopEnd::Forced(self.unsaved().into_iter().map(|v| v.spec.name).collect());
            }
            if !self.drain_running() {
                self.move_what_fits().await;
            }
            let left = self.left_behind().await;
            if !left.is_empty() && left != told {
                tracing::warn!(
                    "stopping: {left}; the agent keeps running until they can move or `ferry agent stop --force` discards them"
                );
                told = left;
            }
            let changed = self.changed.notified();
            let forced = stop.changed.notified();
            tokio::select! {
                _ = changed => {}
                _ = forced => {}
                _ = tokio::time::sleep(RETRY) => {}
            }
        }
    }

    fn drain_running(&self) -> bool {
        self.operations()
            .iter()
            .any(|o| o.kind == super::ops::OpKind::Drain && o.state == OpState::Running)
    }

    /// Starts a drain when the other nodes have room for at least one
    /// running VM.
    async fn move_what_fits(self: &Arc<Self>) {
        let running: Vec<(String, u64)> = self
            .vms()
            .into_iter()
            .filter(|v| v.state == VmState::Running)
            .map(|v| (v.spec.name, v.spec.memory))
            .collect();
        if running.is_empty() {
            return;
        }
        let (free, _) = self.free_elsewhere().await;
        if place(&running, &free).0.is_empty() {
            return;
        }
        let req = DrainRequest {
            max_concurrent: None,
            allow_partial: true,
            request_id: None,
            delta: true,
        };
        match self.drain(req).await {
            Ok(op) => tracing::info!(op = %op.id, "stopping: draining the node"),
            Err(e) => tracing::warn!(error = %e, "stopping: could not start a drain"),
        }
    }

    /// What stays, and why, in words: VMs that are not running, and running
    /// ones no other node has room for now.
    async fn left_behind(&self) -> String {
        if self.drain_running() {
            return String::new();
        }
        let vms = self.unsaved();
        let (free, excluded) = self.free_elsewhere().await;
        let running: Vec<(String, u64)> = vms
            .iter()
            .filter(|v| v.state == VmState::Running)
            .map(|v| (v.spec.name.clone(), v.spec.memory))
            .collect();
        let (_, no_room) = place(&running, &free);
        let mut why: Vec<String> = no_room
            .iter()
            .map(|(vm, mem)| {
                format!(
                    "VM {vm} ({}) fits on no active node{}",
                    crate::units::Bytes(*mem),
                    if excluded.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", excluded.join(", "))
                    }
                )
            })
            .collect();
        why.extend(vms.iter().filter_map(|v| match v.state {
            VmState::Paused => Some(format!(
                "VM {} is paused here (resolve or delete it)",
                v.spec.name
            )),
            VmState::Fenced => Some(format!(
                "VM {} is paused until this node renews its lease in etcd",
                v.spec.name
            )),
            VmState::Superseded => Some(format!(
                "VM {} is superseded here (this node's lease expired; delete it)",
                v.spec.name
            )),
            _ => None,
        }));
        why.join("; ")
    }
}
