//! A later migration's base: the image a target kept when the VM last left
//! it, found by asking the target, wherever the VM has been since.

use super::*;
use crate::migration::delta::Base;
use std::time::Duration;

/// How long a source waits for a target to describe its image and send its
/// pages' hashes before it sends every page instead: 10 s, and 1 s more per
/// 16 GiB of guest (its hashes are 1/512 of it), at most a minute.
fn base_wait(memory: u64) -> Duration {
    Duration::from_secs((10 + memory / (16 << 30)).min(60))
}

/// How long a source waits for a target to tag a kin's copy: 10 s, and 1 s
/// more per GiB of guest (each page read and hashed twice), at most 2
/// minutes.
fn kin_wait(memory: u64) -> Duration {
    Duration::from_secs((10 + memory / (1 << 30)).min(120))
}

impl Node {
    /// The image `target` kept of VM `vm` (of `memory` bytes) when the VM
    /// last left it, as a base for sending it there again: the target's
    /// description and its pages' hashes. `None`, and every page is sent,
    /// when the target keeps none (or one of another size), does not
    /// answer in time, or sends hashes that do not make its digest. The
    /// destination takes a base only by its migration and digest; round 0
    /// skips a page whose hash equals the base's, and the switchover digest
    /// checks the pages' hashes (see `migration::delta` on collisions).
    /// Without an image of this VM there, a VM made from a RAM image takes
    /// the newest copy `target` holds of another VM made from it
    /// (`kin_base`), compared by keyed tags.
    pub(super) async fn base_held_by(&self, vm: &str, target: &str, memory: u64) -> Option<Base> {
        let spec = self.member(target)?;
        let within = |wait: Duration, r: Result<Result<Base, String>, _>| {
            r.unwrap_or_else(|_| Err(format!("no answer within {wait:?}")))
        };
        let wait = base_wait(memory);
        let own = self.own_base(vm, (target, &spec), memory);
        let found = match within(wait, tokio::time::timeout(wait, own).await) {
            Ok(base) => Ok(base),
            Err(why) => match self.made_from(vm).filter(|_| self.spec.kin_bases) {
                Some(image) => {
                    let wait = kin_wait(memory);
                    let kin = self.kin_base((target, &spec), &image, memory);
                    within(wait, tokio::time::timeout(wait, kin).await)
                        .map_err(|kin| format!("{why}; {kin}"))
                }
                None => Err(why),
            },
        };
        self.offered(vm, target, found)
    }

    /// The image `target` kept of this very VM, as a base.
    async fn own_base(
        &self,
        vm: &str,
        (target, spec): (&str, &NodeSpec),
        memory: u64,
    ) -> Result<Base, String> {
        let incarnation = self.incarnation(vm);
        let view = self
            .peers
            .retained(spec, vm)
            .await
            .map_err(|e| e.to_string())?;
        // Only an image of this very VM: one of an earlier VM of the
        // same name holds another tenant's pages, which a crafted hash
        // collision could otherwise bring into this one.
        if incarnation == 0 || view.incarnation != incarnation {
            return Err(format!(
                "its image is of another VM of that name (incarnation {}, this one {incarnation})",
                view.incarnation
            ));
        }
        if view.memory != memory {
            return Err(format!(
                "its image is of {} bytes, the VM of {memory}",
                view.memory
            ));
        }
        let pages = memory / crate::memory::PAGE_SIZE as u64;
        let mut hashes = Vec::with_capacity(pages as usize);
        while (hashes.len() as u64) < pages {
            let first = hashes.len() as u64;
            let count = (pages - first).min(crate::agent::retain::MAX_HASHES);
            let got = self
                .peers
                .retained_hashes(spec, vm, first, count)
                .await
                .map_err(|e| e.to_string())?;
            hashes.extend(got);
        }
        let base = Base::new(view.migration, target.to_string(), hashes.into());
        if base.digest != view.digest {
            return Err("its pages' hashes do not make its digest".into());
        }
        Ok(base)
    }

    /// Says what became of a base looked for on `target`.
    fn offered(&self, vm: &str, target: &str, found: Result<Base, String>) -> Option<Base> {
        match found {
            Ok(base) => {
                let of = base.image_of.as_deref().unwrap_or(vm);
                tracing::info!(%vm, %target, base = %base.migration_id, image_of = %of, "the target keeps an image of the VM or its kin: offering it as the base");
                Some(base)
            }
            Err(why) => {
                tracing::info!(%vm, %target, "no base on the target, every page goes: {why}");
                None
            }
        }
    }

    /// The RAM image VM `vm` was made from (`VmSpec::image`), if any: its
    /// own spec's, else its record's.
    pub(super) fn made_from(&self, vm: &str) -> Option<String> {
        self.spec_says(vm, |s| s.image.clone())
    }

    /// Which VM named `vm` runs here (`VmSpec::incarnation`): its own
    /// spec's, else its record's; 0 when neither says.
    fn incarnation(&self, vm: &str) -> u64 {
        self.spec_says(vm, |s| Some(s.incarnation).filter(|&i| i != 0))
            .unwrap_or(0)
    }

    /// What `field` says of VM `vm`'s spec here, else of its record's.
    fn spec_says<T>(&self, vm: &str, field: impl Fn(&VmSpec) -> Option<T>) -> Option<T> {
        let local = {
            let st = self.state.lock().unwrap();
            st.vms.get(vm).and_then(|v| field(&v.spec))
        };
        local.or_else(|| {
            self.mirror
                .get()
                .and_then(|m| m.vm(vm))
                .and_then(|(r, _)| field(&r.spec))
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_larger_vm_waits_longer_for_its_base_up_to_a_minute() {
        let wait = |gib: u64| super::base_wait(gib << 30).as_secs();
        assert_eq!((wait(1), wait(16), wait(256), wait(4096)), (10, 11, 26, 60));
        let kin = |gib: u64| super::kin_wait(gib << 30).as_secs();
        assert_eq!((kin(0), kin(16), kin(256)), (10, 26, 120));
    }
}
