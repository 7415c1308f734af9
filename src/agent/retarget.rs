//! A drain that loses a target goes on: a step whose migration failed while
//! its VM still runs on the drained node is given another node with room
//! (never one it tried), up to [`DRAIN_TRIES`] targets in all. A target
//! that dies mid-drain (its agent killed, the coordinator's own node among
//! them) or refuses the VM thus costs that VM a second move, not the drain.
//! A VM whose hand-off is unresolved is never moved again: it may run on
//! the target.

use super::node::{Node, VmState};
use super::ops::place;

/// Most targets a drain tries for one VM.
pub const DRAIN_TRIES: usize = 3;

impl Node {
    /// Gives each failed step of drain `op` whose VM still runs here another
    /// target, as [`place`] picks among the active nodes' free memory less
    /// what this drain already sends to each.
    pub(super) async fn retarget_failed(&self, op: &str) {
        let steps = self.with_op(op, |v| v.steps.clone()).unwrap_or_default();
        let running: Vec<String> = self
            .vms()
            .into_iter()
            .filter(|v| v.state == VmState::Running)
            .map(|v| v.spec.name)
            .collect();
        let again: Vec<usize> = (0..steps.len())
            .filter(|&i| {
                let s = &steps[i];
                s.state == "failed"
                    && s.migration_id.is_some()
                    && s.tried.len() + 1 < DRAIN_TRIES
                    && running.contains(&s.vm)
            })
            .collect();
        if again.is_empty() {
            return;
        }
        let (mut free, _) = self.free_elsewhere().await;
        // What this drain sends there may not be counted there yet.
        for s in steps.iter().filter(|s| !s.is_final()) {
            if let Some((_, f)) = free.iter_mut().find(|(n, _)| *n == s.target) {
                *f = f.saturating_sub(s.memory);
            }
        }
        for i in again {
            let s = &steps[i];
            let open: Vec<(String, u64)> = free
                .iter()
                .filter(|(n, _)| *n != s.target && !s.tried.contains(n))
                .cloned()
                .collect();
            let (placed, _) = place(&[(s.vm.clone(), s.memory)], &open);
            let Some((_, target)) = placed.into_iter().next() else {
                continue;
            };
            if let Some((_, f)) = free.iter_mut().find(|(n, _)| *n == target) {
                *f = f.saturating_sub(s.memory);
            }
            tracing::warn!(%op, vm = %s.vm, from = %s.target, to = %target, error = ?s.error, "drain: a step failed; trying another node");
            self.with_op(op, |v| {
                let step = &mut v.steps[i];
                let why = step.error.take().unwrap_or_else(|| "failed".into());
                step.error = Some(format!("to {}: {why}; now to {target}", step.target));
                step.tried.push(std::mem::replace(&mut step.target, target));
                step.state = "planned".into();
                step.migration_id = None;
                step.started_at_ms = None;
                step.finished_at_ms = None;
            });
        }
    }
}
