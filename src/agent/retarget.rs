//! A drain that loses a target goes on: a step whose migration failed while
//! its VM still runs on the drained node is given another node with room
//! (never one it tried), up to [`DRAIN_TRIES`] targets in all. A target
//! that dies mid-drain (its agent killed, the coordinator's own node among
//! them) or refuses the VM thus costs that VM a second move, not the drain.
//! A VM whose hand-off is unresolved is never moved again: it may run on
//! the target. A VM that was arriving when the drain began is given its
//! target once it lands.

use super::node::{name_of, Node, VmState};
use super::ops::drain::ARRIVING;
use super::ops::{place, Step};

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
        let mut free = self.free_less_sends(&steps).await;
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

    /// The active nodes' free memory less what drain steps still in flight
    /// send there (it may not be counted there yet).
    async fn free_less_sends(&self, steps: &[Step]) -> Vec<(String, u64)> {
        let (mut free, _) = self.free_elsewhere().await;
        for s in steps.iter().filter(|s| !s.is_final()) {
            if let Some((_, f)) = free.iter_mut().find(|(n, _)| *n == s.target) {
                *f = f.saturating_sub(s.memory);
            }
        }
        free
    }

    /// Gives each `arriving` step of drain `op` whose VM has landed here a
    /// target, as [`place`] picks; one whose VM did not land here, or landed
    /// stopped, is skipped, saying why.
    pub(super) async fn place_landed(&self, op: &str) {
        let steps = self.with_op(op, |v| v.steps.clone()).unwrap_or_default();
        let here = self.vms();
        let mut landed = Vec::new();
        for (i, s) in steps
            .iter()
            .enumerate()
            .filter(|(_, s)| s.state == ARRIVING)
        {
            let why = match here.iter().find(|v| v.spec.name == s.vm).map(|v| v.state) {
                Some(VmState::MigratingIn | VmState::Creating) => continue,
                Some(VmState::Running) => {
                    landed.push(i);
                    continue;
                }
                Some(other) => format!("it landed {} here: only running VMs move", name_of(&other)),
                None => "it did not arrive here".to_string(),
            };
            self.with_op(op, |v| v.steps[i].skip(why));
        }
        if landed.is_empty() {
            return;
        }
        let mut free = self.free_less_sends(&steps).await;
        for i in landed {
            let s = &steps[i];
            let (placed, _) = place(&[(s.vm.clone(), s.memory)], &free);
            let Some((_, target)) = placed.into_iter().next() else {
                self.with_op(op, |v| {
                    v.steps[i].skip("no active node has room for it".into())
                });
                continue;
            };
            if let Some((_, f)) = free.iter_mut().find(|(n, _)| *n == target) {
                *f = f.saturating_sub(s.memory);
            }
            tracing::info!(%op, vm = %s.vm, to = %target, "drain: a VM landed here; it moves on");
            self.with_op(op, |v| {
                v.steps[i].target = target;
                v.steps[i].state = "planned".into();
            });
        }
    }
}
