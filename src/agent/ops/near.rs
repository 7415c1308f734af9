//! Placing a VM where its memory already is: a node that kept the image the
//! VM last left it with, or a copy of a kin made from the same RAM image,
//! lets it send only what differs (`node/base.rs`), so a drain prefers such
//! a node among those with room.

use super::*;
use crate::agent::cluster::NodeSpec;
use crate::agent::node::{NodeView, VmSpec};
use std::collections::HashMap;

/// What a node holds that a VM sent there could start from, least first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Held {
    /// Nothing: every page travels.
    #[default]
    None,
    /// A copy of another VM made from the same RAM image, of the same size.
    Kin,
    /// The image this very VM (same incarnation) last left it with.
    Own,
}

impl Held {
    /// Whether nothing is held.
    pub fn is_none(&self) -> bool {
        *self == Held::None
    }
}

/// What each node holds for each VM about to move. A copy kept on disk
/// serves any number of arrivals (each copies it in); a copy held only in
/// memory serves one (it is taken over), so such copies are counted in
/// pools, one per node and RAM image.
#[derive(Debug, Default, Clone)]
pub struct Near {
    /// By (vm, node): what, and the pool a `Kin` draws on.
    held: HashMap<(String, String), (Held, Option<usize>)>,
    /// How many arrivals each pool serves.
    pools: Vec<usize>,
}

impl Near {
    /// What `node` holds for `vm`, pools not counted.
    pub fn of(&self, vm: &str, node: &str) -> Held {
        self.entry(vm, node).map_or(Held::None, |e| e.0)
    }

    fn entry(&self, vm: &str, node: &str) -> Option<(Held, Option<usize>)> {
        self.held.get(&(vm.to_string(), node.to_string())).copied()
    }

    /// What `node` holds for `vm` with `left` arrivals left in each pool.
    fn of_left(&self, vm: &str, node: &str, left: &[usize]) -> Held {
        match self.entry(vm, node) {
            Some((Held::Kin, Some(p))) if left[p] == 0 => Held::None,
            Some(e) => e.0,
            None => Held::None,
        }
    }

    /// Counts `vm`'s arrival on `node` against its pool, if it draws on one.
    fn take(&self, vm: &str, node: &str, left: &mut [usize]) -> Held {
        let held = self.of_left(vm, node, left);
        if let (Held::Kin, Some((_, Some(p)))) = (held, self.entry(vm, node)) {
            left[p] -= 1;
        }
        held
    }

    /// Notes that `node` holds `what` for `vm`, for any number of arrivals
    /// (the better of two notes).
    pub fn note(&mut self, vm: &str, node: &str, what: Held) {
        self.note_in(vm, node, what, None);
    }

    /// A pool of copies held in memory only, serving `copies` arrivals.
    pub fn pool(&mut self, copies: usize) -> usize {
        self.pools.push(copies);
        self.pools.len() - 1
    }

    /// Notes that `node` holds a kin's copy for `vm` from `pool`.
    pub fn note_kin(&mut self, vm: &str, node: &str, pool: usize) {
        self.note_in(vm, node, Held::Kin, Some(pool));
    }

    fn note_in(&mut self, vm: &str, node: &str, what: Held, pool: Option<usize>) {
        if what.is_none() {
            return;
        }
        let e = self
            .held
            .entry((vm.into(), node.into()))
            .or_insert((Held::None, None));
        // A pool's copy adds nothing to a copy on disk.
        if what > e.0 || (what == e.0 && pool.is_none()) {
            *e = (what, pool);
        }
    }

    /// What each VM of `placed`, in its order, finds where it goes, pools
    /// counted as [`place_near`] counts them.
    pub fn bases(&self, placed: &[(String, String)]) -> Vec<Held> {
        let mut left = self.pools.clone();
        placed
            .iter()
            .map(|(vm, node)| self.take(vm, node, &mut left))
            .collect()
    }

    /// What the nodes' views show they hold for `vms`: an image kept of the
    /// VM itself (the same incarnation, never 0, and size) is `Own`; with
    /// `kin`, one kept of another VM made from the same RAM image and of
    /// the same size is `Kin`. Warm copies are not in a view.
    pub fn from_views<'a>(
        vms: &[VmSpec],
        views: impl IntoIterator<Item = &'a NodeView>,
        kin: bool,
    ) -> Near {
        let mut near = Near::default();
        for view in views {
            let Some(kept) = &view.failback_retention else {
                continue;
            };
            for vm in vms {
                for image in kept.images.iter().filter(|i| i.memory == vm.memory) {
                    let own = image.vm == vm.name
                        && vm.incarnation != 0
                        && image.incarnation == vm.incarnation;
                    let is_kin = kin && vm.image.is_some() && image.image == vm.image;
                    let what = if own {
                        Held::Own
                    } else if is_kin {
                        Held::Kin
                    } else {
                        Held::None
                    };
                    near.note(&vm.name, &view.name, what);
                }
            }
        }
        near
    }
}

/// Places `vms` (name, memory) on `free` nodes (name, free bytes): largest
/// VM first, each on the node with room that holds the most for it (its
/// own image, then a kin's copy, as `near` says), the most free memory
/// among those, so the load spreads where nothing is held. Where that
/// would leave more VMs without room than ignoring `near`, it is ignored.
pub fn place_near(vms: &[(String, u64)], free: &[(String, u64)], near: &Near) -> Placement {
    let preferred = greedy(vms, free, near);
    if preferred.1.is_empty() {
        return preferred;
    }
    let plain = greedy(vms, free, &Near::default());
    if plain.1.len() < preferred.1.len() {
        plain
    } else {
        preferred
    }
}

fn greedy(vms: &[(String, u64)], free: &[(String, u64)], near: &Near) -> Placement {
    let mut vms = vms.to_vec();
    vms.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut free = free.to_vec();
    let mut pools = near.pools.clone();
    let mut placed = Vec::new();
    let mut left = Vec::new();
    for (vm, mem) in vms {
        let held = |node: &str| near.of_left(&vm, node, &pools);
        let best = free.iter_mut().filter(|(_, f)| *f >= mem).max_by(|a, b| {
            (held(&a.0).cmp(&held(&b.0)))
                .then(a.1.cmp(&b.1))
                .then(b.0.cmp(&a.0))
        });
        match best {
            Some((node, f)) => {
                *f -= mem;
                near.take(&vm, node, &mut pools);
                placed.push((vm, node.clone()));
            }
            None => left.push((vm, mem)),
        }
    }
    (placed, left)
}

impl Node {
    /// [`Node::near`] for a move whose arrival may start from a base
    /// (`delta`); nothing is held for one that may not.
    pub(super) async fn near_for(
        &self,
        delta: bool,
        vms: &[(String, u64)],
        active: &[(NodeSpec, NodeView)],
    ) -> Near {
        if delta {
            self.near(vms, active).await
        } else {
            Near::default()
        }
    }

    /// What the `active` nodes hold for the running VMs among `vms`: their
    /// views' images of the VMs themselves and, with this node's
    /// `kin_bases` on, the copies each says it holds (`GET /v1/bases`, so
    /// none of a node with kin bases off) of VMs made from the same RAM
    /// images, for at most [`MAX_IMAGES`] images, asked all at once, each
    /// within [`ASK_NODE`]. A node that does not answer holds nothing here.
    pub(super) async fn near(
        &self,
        vms: &[(String, u64)],
        active: &[(NodeSpec, NodeView)],
    ) -> Near {
        let specs: Vec<VmSpec> = self
            .vms()
            .into_iter()
            .filter(|v| v.state == crate::agent::node::VmState::Running)
            .map(|v| v.spec)
            .filter(|s| vms.iter().any(|(n, _)| *n == s.name))
            .collect();
        let mut near = Near::from_views(&specs, active.iter().map(|(_, v)| v), false);
        if !self.spec.kin_bases {
            return near;
        }
        let mut images: Vec<(&str, u64)> = specs
            .iter()
            .filter_map(|s| Some((s.image.as_deref()?, s.memory)))
            .collect();
        images.sort_unstable();
        images.dedup();
        images.truncate(MAX_IMAGES);
        let asked = active.iter().flat_map(|(spec, view)| {
            images.iter().map(move |&(image, memory)| async move {
                let copies = self.peers.kin_copies(spec, image, memory);
                let found = tokio::time::timeout(ASK_NODE, copies).await;
                let (mut disk, mut warm) = (false, 0);
                for c in found.ok().and_then(Result::ok).unwrap_or_default() {
                    if c.memory != memory {
                        continue;
                    }
                    match on_disk(view, &c.migration) {
                        true => disk = true,
                        false => warm += 1,
                    }
                }
                (view.name.as_str(), image, memory, (disk, warm))
            })
        });
        for (node, image, memory, (disk, warm)) in futures_util::future::join_all(asked).await {
            let kin: Vec<&VmSpec> = specs
                .iter()
                .filter(|s| s.memory == memory && s.image.as_deref() == Some(image))
                .collect();
            if disk {
                kin.iter().for_each(|s| near.note(&s.name, node, Held::Kin));
            } else if warm > 0 {
                let pool = near.pool(warm);
                kin.iter().for_each(|s| near.note_kin(&s.name, node, pool));
            }
        }
        near
    }
}

/// Most RAM images whose copies a drain asks each node for.
const MAX_IMAGES: usize = 16;

/// Whether `view` lists a kept file of the copy left by `migration`.
fn on_disk(view: &NodeView, migration: &str) -> bool {
    view.failback_retention
        .as_ref()
        .is_some_and(|r| r.images.iter().any(|i| i.migration == migration))
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 1 << 30;

    fn list(l: &[(&str, u64)]) -> Vec<(String, u64)> {
        l.iter().map(|(n, m)| (n.to_string(), *m)).collect()
    }

    #[test]
    fn a_vm_goes_where_its_memory_is_held_when_there_is_room() {
        let free = list(&[("a", 2 * G), ("b", 8 * G), ("c", 4 * G)]);
        let vms = list(&[("own", G), ("kin", G), ("none", G), ("big", 3 * G)]);
        let mut near = Near::default();
        near.note("own", "c", Held::Kin);
        near.note("own", "a", Held::Own);
        near.note("kin", "c", Held::Kin);
        near.note("kin", "c", Held::None);
        // a holds big's image but has no room for it.
        near.note("big", "a", Held::Own);
        let (placed, left) = place_near(&vms, &free, &near);
        assert!(left.is_empty());
        let to = |vm: &str| placed.iter().find(|(v, _)| v == vm).unwrap().1.clone();
        assert_eq!(to("own"), "a", "its own image beats a kin's copy");
        assert_eq!(to("kin"), "c", "a kin's copy beats more free memory");
        assert_eq!(to("big"), "b", "no room where it is held");
        assert_eq!(to("none"), "b", "nothing held: the most free memory");
        assert_eq!(
            near.of("kin", "c"),
            Held::Kin,
            "a lesser note keeps the better"
        );
    }

    #[test]
    fn a_held_copy_never_costs_a_vm_its_room() {
        let free = list(&[("a", 6 * G), ("b", 5 * G), ("c", 3 * G)]);
        let vms = list(&[
            ("p", 2 * G),
            ("q", 4 * G),
            ("r", 3 * G),
            ("s", 3 * G),
            ("t", 2 * G),
        ]);
        let mut near = Near::default();
        near.note("q", "b", Held::Kin);
        near.note("t", "b", Held::Own);
        // Preferring b for both would leave one VM without room.
        assert_eq!(greedy(&vms, &free, &near).1.len(), 1);
        let (placed, left) = place_near(&vms, &free, &near);
        assert!(left.is_empty(), "{left:?}");
        assert_eq!(placed.len(), 5);
        // Where it costs no room, the preference holds.
        let vms = list(&[("q", 4 * G), ("t", 2 * G)]);
        let (placed, _) = place_near(&vms, &free, &near);
        assert_eq!(placed, [("q".into(), "b".into()), ("t".into(), "a".into())]);
    }

    #[test]
    fn a_copy_held_in_memory_only_serves_one_arrival() {
        let free = list(&[("a", 8 * G), ("b", 4 * G), ("c", 4 * G)]);
        let vms = list(&[("v1", G), ("v2", G), ("v3", G), ("v4", G)]);
        let mut near = Near::default();
        // b holds two warm copies of their image; c one kept on disk.
        let warm = near.pool(2);
        for (vm, _) in &vms {
            near.note_kin(vm, "b", warm);
        }
        let (placed, left) = place_near(&vms, &free, &near);
        assert!(left.is_empty());
        let bases = near.bases(&placed);
        let to_b: Vec<_> = placed.iter().filter(|(_, n)| n == "b").collect();
        assert_eq!(to_b.len(), 2, "{placed:?}");
        assert_eq!(bases.iter().filter(|h| **h == Held::Kin).count(), 2);
        assert!(placed
            .iter()
            .zip(&bases)
            .all(|((_, n), h)| (n == "b") == (*h == Held::Kin)));
        // A copy on disk serves them all; a pool's note adds nothing to it.
        for (vm, _) in &vms {
            near.note(vm, "c", Held::Kin);
            near.note_kin(vm, "c", warm);
        }
        let (placed, _) = place_near(&vms, &free, &near);
        let bases = near.bases(&placed);
        assert_eq!(bases, [Held::Kin; 4], "{placed:?}");
        assert_eq!(
            placed.iter().filter(|(_, n)| n == "b").count(),
            2,
            "{placed:?}"
        );
    }

    fn vm(name: &str, memory: u64, incarnation: u64, image: Option<&str>) -> VmSpec {
        VmSpec {
            name: name.into(),
            memory,
            workload: crate::memory::WorkloadPattern::Idle,
            dirty_rate: 0,
            fill: Default::default(),
            guest: crate::wire::GuestKind::Sim,
            priority: Default::default(),
            preferred_owners: Vec::new(),
            image: image.map(str::to_string),
            seed: 1,
            incarnation,
        }
    }

    /// A node's view keeping images of (vm, memory, incarnation, image).
    fn view(node: &str, kept: &[(&str, u64, u64, Option<&str>)]) -> NodeView {
        let images: Vec<serde_json::Value> = kept
            .iter()
            .map(|(vm, memory, incarnation, image)| {
                json!({"vm": vm, "migration": format!("m-{vm}"), "at_ms": 1, "memory": memory,
                       "digest": 7, "bytes": 4096, "incarnation": incarnation, "image": image})
            })
            .collect();
        serde_json::from_value(json!({
            "name": node, "state": "active", "memory_capacity": G, "memory_used": 0,
            "vms": [], "migrations_in_flight": 0, "migrations_queued": 0,
            "limits": {"max_concurrent_migrations": 2, "max_bandwidth": null},
            "failback_retention": {"dir": "/x", "budget": G, "used": 0, "images": images}
        }))
        .unwrap()
    }

    #[test]
    fn only_an_image_of_the_vm_itself_is_its_own_and_only_one_of_its_image_is_kin() {
        let (m, golden) = (64 << 20, Some("/golden.img"));
        let vms = [
            vm("web", m, 5, None),
            vm("db", m, 6, golden),
            vm("old", m, 0, None),
            vm("small", m / 2, 8, golden),
        ];
        let views = [
            view("a", &[("web", m, 5, None), ("old", m, 0, None)]),
            view("b", &[("web", m, 9, None), ("x", m, 1, golden)]),
            view("c", &[("db", m / 2, 6, golden)]),
        ];
        let near = Near::from_views(&vms, &views, true);
        assert_eq!(near.of("web", "a"), Held::Own);
        assert_eq!(near.of("web", "b"), Held::None, "another VM of that name");
        assert_eq!(
            near.of("old", "a"),
            Held::None,
            "incarnation 0 is never a base"
        );
        assert_eq!(near.of("db", "b"), Held::Kin, "made from the same image");
        assert_eq!(
            near.of("db", "c"),
            Held::None,
            "its own image, of another size"
        );
        assert_eq!(near.of("small", "c"), Held::Kin, "db's copy is of its size");
        assert_eq!(near.of("small", "b"), Held::None, "of another size");
        let no_kin = Near::from_views(&vms, &views, false);
        assert_eq!(no_kin.of("db", "b"), Held::None);
        assert_eq!(no_kin.of("web", "a"), Held::Own);
    }
}
