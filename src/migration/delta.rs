//! Failback by delta, without IO: the base a source offers (the memory a VM
//! arrived with, by its pages' hashes) and round 0's pages against it.
//!
//! A node that receives a VM keeps the hash of every page as it arrived.
//! When the VM goes back to the node it came from, and that node still holds
//! the image it sent, the source offers that arrival as the session's base;
//! going to any other node that kept an image of it, the source asks that
//! node for the image's hashes (`agent/node/base.rs`). A destination that
//! takes the base starts from the image, and round 0 sends only the pages
//! whose hash now differs. The switchover digest covers every page's hash;
//! a page whose content changed but whose xxh3 hash did not (a collision,
//! which a guest could craft) keeps the base's bytes. An agent offers only
//! an image of the same VM (`VmSpec::incarnation`), so such a page can only
//! be one that VM held before, never another VM's of the same name.

use crate::digest::{digest_of_hashes, page_hash, zero_page_hash, PageHashes};
use crate::memory::{DirtySnapshot, GuestMemory, PAGE_SIZE};
use crate::page::PageIndex;
use crate::wire::DeltaBase;
use std::sync::Arc;

/// The memory a VM arrived with: the migration that brought it and the
/// hash of each page as applied.
#[derive(Clone)]
pub struct Base {
    /// The migration that brought it (its id, as labelled).
    pub migration_id: String,
    /// The node it came from.
    pub from_node: String,
    /// Each page's hash, in order.
    pub hashes: Arc<[u64]>,
    /// The digest of those pages.
    pub digest: u64,
}

impl std::fmt::Debug for Base {
    /// Names the migration and the size, not every hash.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Base")
            .field("migration_id", &self.migration_id)
            .field("from_node", &self.from_node)
            .field("pages", &self.hashes.len())
            .field("digest", &format_args!("{:016x}", self.digest))
            .finish()
    }
}

impl Base {
    /// The base of a VM that arrived by `migration_id` from `from_node` with
    /// pages hashing to `hashes`.
    pub fn new(migration_id: String, from_node: String, hashes: Arc<[u64]>) -> Self {
        let digest = digest_of_hashes(&hashes);
        Self {
            migration_id,
            from_node,
            hashes,
            digest,
        }
    }

    /// What the session's setup offers.
    pub fn offer(&self) -> DeltaBase {
        DeltaBase {
            migration_id: self.migration_id.clone(),
            digest: self.digest,
        }
    }
}

/// Round 0 of a delta: every page whose content no longer hashes to the
/// base's (or all of them, when the sizes differ), with the unchanged
/// pages' hashes recorded in `sent` as if sent. Returns the pages to send
/// and how many were left out. Reads each page once, on `threads` threads.
///
/// A guest writing meanwhile is safe: its dirty log was cleared before this
/// scan, so a page written after it was read is sent in round 1.
pub fn round0(
    mem: &GuestMemory,
    base: &Base,
    sent: &PageHashes,
    threads: usize,
) -> (DirtySnapshot, u64) {
    let pages = mem.pages();
    if base.hashes.len() as u64 != pages {
        return (DirtySnapshot::all(pages), 0);
    }
    let words = pages.div_ceil(64);
    let threads = (threads.max(1) as u64).min(words.max(1));
    let per = words.div_ceil(threads);
    let parts: Vec<(Vec<u64>, u64)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (first, last) = ((t * per).min(words), ((t + 1) * per).min(words));
                s.spawn(move || scan(mem, &base.hashes, sent, first..last))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a round-0 scan panicked"))
            .collect()
    });
    let mut bits = Vec::with_capacity(words as usize);
    let mut skipped = 0;
    for (w, s) in parts {
        bits.extend(w);
        skipped += s;
    }
    (DirtySnapshot::from_words(bits, pages), skipped)
}

/// The bitmap words `range` of round 0: a bit for each changed page.
fn scan(
    mem: &GuestMemory,
    base: &[u64],
    sent: &PageHashes,
    range: std::ops::Range<u64>,
) -> (Vec<u64>, u64) {
    let zero = zero_page_hash();
    let pages = mem.pages();
    let mut buf = vec![0u8; PAGE_SIZE];
    let mut words = Vec::with_capacity((range.end - range.start) as usize);
    let mut skipped = 0;
    for w in range {
        let mut word = 0u64;
        for bit in 0..64 {
            let page = w * 64 + bit;
            if page >= pages {
                break;
            }
            let index = PageIndex(page);
            let now = if mem.read_page_unless_zero(index, &mut buf) {
                zero
            } else {
                page_hash(&buf)
            };
            if now == base[page as usize] {
                sent.set(index, now);
                skipped += 1;
            } else {
                word |= 1 << bit;
            }
        }
        words.push(word);
    }
    (words, skipped)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory(pages: u64) -> GuestMemory {
        GuestMemory::new(pages * PAGE_SIZE as u64).unwrap()
    }

    fn hashes_of(mem: &GuestMemory) -> Arc<[u64]> {
        let mut buf = vec![0u8; PAGE_SIZE];
        (0..mem.pages())
            .map(|p| {
                mem.read_page(PageIndex(p), &mut buf);
                page_hash(&buf)
            })
            .collect()
    }

    #[test]
    fn round0_sends_only_the_pages_that_changed_and_counts_the_rest_as_sent() {
        let mem = memory(200);
        for p in (0..200).step_by(3) {
            mem.write_page(PageIndex(p), &[p as u8 + 1; PAGE_SIZE]);
        }
        let base = Base::new("m-1".into(), "a".into(), hashes_of(&mem));
        // Changed since: a data page, a zero page given data, a data page
        // zeroed, and the last page.
        mem.write_page(PageIndex(3), &[0xee; PAGE_SIZE]);
        mem.write_page(PageIndex(4), &[0xdd; PAGE_SIZE]);
        mem.zero_page(PageIndex(6));
        mem.write_page(PageIndex(199), &[0xcc; PAGE_SIZE]);
        for threads in [1, 2, 3] {
            let sent = PageHashes::new(200);
            let (snap, skipped) = round0(&mem, &base, &sent, threads);
            let changed: Vec<u64> = (0..200).filter(|&p| snap.contains(PageIndex(p))).collect();
            assert_eq!(changed, [3, 4, 6, 199], "{threads} threads");
            assert_eq!(skipped, 196);
            // Sending the changed pages completes the digest of memory now.
            let mut buf = vec![0u8; PAGE_SIZE];
            for &p in &changed {
                mem.read_page(PageIndex(p), &mut buf);
                sent.set(PageIndex(p), page_hash(&buf));
            }
            assert_eq!(sent.digest(), digest_of_hashes(&hashes_of(&mem)));
        }
    }

    #[test]
    fn a_base_of_another_size_sends_every_page() {
        let mem = memory(100);
        let base = Base::new("m-1".into(), "a".into(), hashes_of(&memory(99)));
        let (snap, skipped) = round0(&mem, &base, &PageHashes::new(100), 2);
        assert_eq!((snap.count(), skipped), (100, 0));
    }

    #[test]
    fn the_offer_names_the_migration_and_the_digest_of_its_pages() {
        let mem = memory(10);
        mem.write_page(PageIndex(2), &[7; PAGE_SIZE]);
        let base = Base::new("m-9".into(), "b".into(), hashes_of(&mem));
        let offer = base.offer();
        assert_eq!(offer.migration_id, "m-9");
        assert_eq!(offer.digest, crate::digest::full_digest(&mem, 1));
    }
}
