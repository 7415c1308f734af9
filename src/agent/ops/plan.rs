//! What a drain would do, before it does it (`"dry_run": true` on a
//! drain): each VM's target, what fits nowhere and the shortfall, and how
//! many would move at once. The same placement the drain makes, from the
//! same figures, but nothing changes.

use super::*;
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
    /// VMs still arriving here: their targets are chosen once they land.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub arriving: Vec<String>,
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

    /// The plan a drain asked for `asked` concurrency would follow now.
    pub async fn drain_plan(&self, asked: Option<Concurrency>) -> DrainPlan {
        let (max_concurrent, auto) = self.drain_concurrency(asked);
        let (free, excluded) = self.free_elsewhere().await;
        let mut vms = self.running_vms();
        let arriving = self.arriving_vms();
        vms.extend(arriving.iter().cloned());
        let (placed, left) = place(&vms, &free);
        let memory = |vm: &str| vms.iter().find(|(v, _)| v == vm).map_or(0, |(_, m)| *m);
        let moves = placed
            .into_iter()
            .map(|(vm, target)| PlannedMove {
                memory: memory(&vm),
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
            })
            .collect();
        DrainPlan {
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
        }
    }
}
