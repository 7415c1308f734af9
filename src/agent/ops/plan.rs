//! What a drain would do, before it does it (`"dry_run": true` on a
//! drain): each VM's target, what fits nowhere and the shortfall, and how
//! many would move at once. The same placement the drain makes, from the
//! same figures, but nothing changes.

use super::*;
use crate::agent::node::VmState;
use crate::agent::request::Concurrency;

/// A drain's plan, as `POST /v1/node/drain` with `"dry_run": true`
/// answers it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DrainPlan {
    /// The node it would drain.
    pub node: String,
    /// Each VM that would move, largest first, with its target.
    pub moves: Vec<PlannedMove>,
    /// The VMs that fit nowhere (their `target` empty).
    pub unplaced: Vec<PlannedMove>,
    /// The memory of `unplaced`, bytes: what the other nodes lack.
    pub shortfall: u64,
    /// Free memory on each node that would take VMs, bytes, before them.
    pub room: Vec<Room>,
    /// Nodes that take none, and why.
    pub excluded: Vec<String>,
    /// Migrations it would run at once.
    pub max_concurrent: u32,
    /// With `"auto"`: why that many.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto: Option<String>,
    /// A drain without `allow_partial` would be refused (`unplaced` is not
    /// empty).
    pub refused: bool,
    /// VMs still arriving here: counted in the room, their targets chosen
    /// once they land.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub arriving: Vec<String>,
    /// VMs the drain would leave here (paused ones, and those already
    /// leaving), each with its state: the drain ends `partial` if any is
    /// still here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub staying: Vec<Staying>,
}

/// A VM a drain would not move.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Staying {
    /// The VM.
    pub vm: String,
    /// Its state (`paused`, `migrating-out`, ...).
    pub state: String,
}

/// One VM in a plan.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlannedMove {
    /// The VM.
    pub vm: String,
    /// Its memory, bytes.
    pub memory: u64,
    /// Where it would go; empty when nowhere.
    pub target: String,
    /// What the target holds that it would start from (`own`: the image
    /// it last left there with; `kin`: a copy of a VM made from the same
    /// RAM image); absent when nothing.
    #[serde(default, skip_serializing_if = "Held::is_none")]
    pub base: Held,
}

/// A node's free memory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Room {
    /// The node.
    pub node: String,
    /// Its free memory, bytes.
    pub free: u64,
}

impl Node {
    /// How many migrations a drain asked for `asked` runs at once, and why
    /// when chosen.
    pub(super) fn drain_concurrency(&self, asked: Option<Concurrency>) -> (u32, Option<String>) {
        match asked {
            None if !self.spec.auto_concurrency => (self.spec.max_concurrent_migrations, None),
            Some(Concurrency::Fixed(n)) => (n, None),
            None | Some(Concurrency::Auto) => {
                let (n, why) = self.auto_concurrency();
                (n, Some(why))
            }
        }
    }

    /// The plan a drain asked for `asked` concurrency, and to offer bases
    /// or not (`delta`), would follow now; refused as the drain would be,
    /// when the node already drains or its agent stops.
    pub async fn drain_plan(
        &self,
        asked: Option<Concurrency>,
        delta: bool,
    ) -> Result<DrainPlan, NodeError> {
        self.refuse_if_closing()?;
        if self.mode() == NodeMode::Draining {
            return Err(NodeError::Conflict(format!(
                "node {} is already draining",
                self.spec.name
            )));
        }
        let (max_concurrent, auto) = self.drain_concurrency(asked);
        let (active, excluded) = self.elsewhere().await;
        let free = free_of(&active);
        let mut vms = self.running_vms();
        let arriving = self.arriving_vms();
        vms.extend(arriving.iter().cloned());
        let near = self.near_for(delta, &vms, &active).await;
        let (placed, left) = place_near(&vms, &free, &near);
        let memory = |vm: &str| vms.iter().find(|(v, _)| v == vm).map_or(0, |(_, m)| *m);
        let arrives = |vm: &str| arriving.iter().any(|(v, _)| v == vm);
        let bases = near.bases(&placed);
        let moves = placed
            .into_iter()
            .zip(bases)
            .filter(|((vm, _), _)| !arrives(vm))
            .map(|((vm, target), base)| PlannedMove {
                memory: memory(&vm),
                base,
                vm,
                target,
            })
            .collect();
        let unplaced: Vec<PlannedMove> = left
            .into_iter()
            .map(|(vm, memory)| PlannedMove {
                vm,
                memory,
                target: String::new(),
                base: Held::None,
            })
            .collect();
        let staying = self
            .vms()
            .into_iter()
            .filter(|v| {
                !matches!(
                    v.state,
                    VmState::Running
                        | VmState::MigratingIn
                        | VmState::Creating
                        | VmState::Superseded
                )
            })
            .map(|v| Staying {
                vm: v.spec.name.clone(),
                state: super::name_of(v.state),
            })
            .collect();
        Ok(DrainPlan {
            node: self.name().to_string(),
            moves,
            shortfall: unplaced.iter().map(|m| m.memory).sum(),
            refused: !unplaced.is_empty(),
            unplaced,
            room: free
                .into_iter()
                .map(|(node, free)| Room { node, free })
                .collect(),
            excluded,
            max_concurrent,
            auto,
            arriving: arriving.into_iter().map(|(v, _)| v).collect(),
            staying,
        })
    }
}
