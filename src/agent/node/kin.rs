//! Bases from a kin VM: a VM made from the same RAM image (`VmSpec::image`)
//! as one that left a node starts there from that VM's copy, warm or kept
//! on disk, its pages compared by tags keyed for that migration alone
//! (`migration::delta`), so no guest can pass a page of its own off as
//! another's.

use super::*;
use crate::agent::peer::PeerError;
use crate::migration::delta::{tag_pages, Base};

/// A copy a node holds of a VM that left it, as `GET /v1/bases` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KinCopy {
    /// The VM that left.
    pub vm: String,
    /// The migration it left by.
    pub migration: String,
    /// Its memory, bytes.
    pub memory: u64,
    /// When it left, ms since the Unix epoch.
    pub at_ms: u64,
    /// Held in memory (a warm copy), not only on disk.
    pub warm: bool,
}

/// Why a copy's tags cannot be given.
#[derive(Debug)]
pub enum TagError {
    /// No copy of that VM by that migration is held here.
    NotHere(String),
    /// It is, but it cannot be read.
    Unusable(String),
}

/// Most kin copies a source asks a target to tag for one migration (each
/// is read and hashed whole there).
const KIN_TRIES: usize = 3;

impl Node {
    /// The copies held here of VMs made from RAM image `image`, of `memory`
    /// bytes, newest first (a warm copy before the file of the same).
    /// None when the node's `kin_bases` is off. A VM arriving now keeps its
    /// own copy: it is not listed.
    pub fn kin_copies(&self, image: &str, memory: u64) -> Vec<KinCopy> {
        if !self.spec.kin_bases {
            return Vec::new();
        }
        let now = now_ms();
        let mut copies: Vec<KinCopy> = {
            let st = self.state.lock().unwrap();
            let arriving = |vm: &str| st.vms.get(vm).is_some_and(Vm::arriving);
            st.warm
                .iter()
                .filter(|(vm, w)| w.image.as_deref() == Some(image) && !arriving(vm))
                .filter(|(_, w)| w.memory.len_bytes() == memory)
                .map(|(vm, w)| KinCopy {
                    vm: vm.clone(),
                    migration: w.migration.clone(),
                    memory,
                    at_ms: now.saturating_sub(w.at.elapsed().as_millis() as u64),
                    warm: true,
                })
                .collect()
        };
        for v in self.retention.made_from(image, memory) {
            if !copies.iter().any(|c| c.migration == v.migration) {
                copies.push(KinCopy {
                    vm: v.vm,
                    migration: v.migration,
                    memory,
                    at_ms: v.at_ms,
                    warm: false,
                });
            }
        }
        copies.sort_by_key(|c| std::cmp::Reverse((c.at_ms, c.warm)));
        copies
    }

    /// Each page's xxh3 hash and tag under `key`, pages `first..first +
    /// count`, of the copy VM `vm` left here by `migration`: its warm copy,
    /// else its kept image. Blocking: it reads and hashes them, one copy at
    /// a time on the node.
    pub fn kin_tags(
        &self,
        (vm, migration): (&str, &str),
        key: &[u8; 32],
        (first, count): (u64, u64),
    ) -> Result<Vec<(u64, u64)>, TagError> {
        let not_here = || {
            TagError::NotHere(format!(
                "no copy of VM {vm} by migration {migration} is held on node {}",
                self.spec.name
            ))
        };
        if !self.spec.kin_bases {
            return Err(not_here());
        }
        let _turn = self.retention.tagger_turn();
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let held = || {
            let st = self.state.lock().unwrap();
            st.warm.get(vm).is_some_and(|w| w.migration == migration)
        };
        let warm = {
            let st = self.state.lock().unwrap();
            st.warm
                .get(vm)
                .filter(|w| w.migration == migration)
                .map(|w| w.memory.clone())
        };
        let end = |pages: u64| {
            first
                .checked_add(count)
                .filter(|&e| e <= pages)
                .ok_or_else(|| TagError::NotHere(format!("pages {first}+{count} of {pages}")))
        };
        if let Some(mem) = warm {
            end(mem.pages())?;
            let read = |at: u64, n: u64, buf: &mut [u8]| {
                for (i, page) in buf
                    .chunks_exact_mut(crate::memory::PAGE_SIZE)
                    .take(n as usize)
                    .enumerate()
                {
                    mem.read_page(crate::page::PageIndex(at + i as u64), page);
                }
                Ok(())
            };
            let tags =
                tag_pages(key, (first, count), threads, &read).map_err(TagError::Unusable)?;
            // Still held once read: no one took it over meanwhile.
            if !held() {
                return Err(TagError::Unusable("taken over while read".into()));
            }
            return Ok(tags);
        }
        match self.retention.get(vm) {
            Some(v) if v.migration == migration => {}
            _ => return Err(not_here()),
        }
        let image = self
            .retention
            .open_image(vm)
            .map_err(|e| TagError::Unusable(e.to_string()))?;
        end(image.memory() / crate::memory::PAGE_SIZE as u64)?;
        let read =
            |at: u64, n: u64, buf: &mut [u8]| image.pages(at, n, buf).map_err(|e| e.to_string());
        tag_pages(key, (first, count), threads, &read).map_err(TagError::Unusable)
    }

    /// Whether the image VM `vm` (made from RAM `image`, of `incarnation`)
    /// left this node with stays, now that the VM is back, as a copy for
    /// its kin: only with kin bases on, an image of this very VM made from
    /// that RAM image, and no other VM's kept copy of it here already (one
    /// copy on disk serves any number of arrivals).
    pub(super) fn home_copy_for_kin(
        &self,
        vm: &str,
        image: Option<&str>,
        incarnation: u64,
    ) -> bool {
        let (Some(image), true) = (image, self.spec.kin_bases) else {
            return false;
        };
        let Some(kept) = self.retention.get(vm) else {
            return false;
        };
        kept.image.as_deref() == Some(image)
            && incarnation != 0
            && kept.incarnation == incarnation
            && !self
                .retention
                .made_from(image, kept.memory)
                .iter()
                .any(|other| other.vm != vm)
    }

    /// A base for VM `vm` (of `memory` bytes, made from RAM image `image`)
    /// on `target` from the newest copy `target` holds of another VM made
    /// from that image: its pages' tags under a key drawn now, and its
    /// digest from their hashes. A copy another arrival took over (or
    /// dropped) meanwhile gives way to the next one.
    pub(super) async fn kin_base(
        &self,
        (target, spec): (&str, &NodeSpec),
        image: &str,
        memory: u64,
    ) -> Result<Base, String> {
        let copies = self
            .peers
            .kin_copies(spec, image, memory)
            .await
            .map_err(|e| e.to_string())?;
        let mut last = None;
        let mut tried: Vec<String> = Vec::new();
        for copy in copies.into_iter().filter(|c| c.memory == memory) {
            if tried.len() == KIN_TRIES || tried.contains(&copy.migration) {
                continue;
            }
            tried.push(copy.migration.clone());
            match self.kin_tags_of((target, spec), copy, memory).await {
                Ok(base) => return Ok(base),
                // Gone, or taken over while read: another may still be there.
                Err(
                    e @ PeerError::Api {
                        status: 404 | 409, ..
                    },
                ) => last = Some(e),
                Err(e) => return Err(e.to_string()),
            }
        }
        Err(match last {
            Some(e) => format!("{} copies of kin tried, the last: {e}", tried.len()),
            None => format!(
                "nor of another VM made from {image} of {}",
                crate::units::Bytes(memory)
            ),
        })
    }

    /// `copy`'s pages' tags on `target` under a key drawn now, as a base.
    async fn kin_tags_of(
        &self,
        (target, spec): (&str, &NodeSpec),
        copy: KinCopy,
        memory: u64,
    ) -> Result<Base, PeerError> {
        let key = crate::migration::auth::random_bytes::<32>();
        let pages = memory / crate::memory::PAGE_SIZE as u64;
        let mut pairs: Vec<(u64, u64)> = Vec::with_capacity(pages as usize);
        while (pairs.len() as u64) < pages {
            let first = pairs.len() as u64;
            let count = (pages - first).min(crate::agent::retain::MAX_HASHES);
            let got = self
                .peers
                .kin_tags(spec, (&copy.vm, &copy.migration), &key, (first, count))
                .await?;
            pairs.extend(got);
        }
        let (hashes, tags): (Vec<u64>, Vec<u64>) = pairs.into_iter().unzip();
        let digest = crate::digest::digest_of_hashes(&hashes);
        let ids = (copy.migration, target.to_string(), copy.vm);
        Ok(Base::keyed(ids, tags.into(), key, digest))
    }
}
