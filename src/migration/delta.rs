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
//!
//! A base may also be another VM's image, of a VM made from the same RAM
//! image (`VmSpec::image`: clones of one golden image share most pages).
//! Such a base is compared by keyed tags ([`crate::digest::ref_tag`] under
//! a key the source draws for that migration and gives the target alone),
//! never by xxh3: no guest can make its page's tag equal another VM's, so a
//! page round 0 leaves out holds exactly the bytes the destination has.

use crate::digest::{digest_of_hashes, page_hash, ref_tag, zero_page_hash, PageHashes};
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
    /// Each page's hash, in order: xxh3, or the keyed tag under `key`.
    pub hashes: Arc<[u64]>,
    /// The digest of the pages (of their xxh3 hashes, as the destination
    /// checks it).
    pub digest: u64,
    /// The key of a keyed base's tags (`None`: `hashes` are xxh3).
    pub key: Option<[u8; 32]>,
    /// The VM whose image it is, when another VM's (`None`: this VM's).
    pub image_of: Option<String>,
}

impl std::fmt::Debug for Base {
    /// Names the migration and the size, not every hash.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Base")
            .field("migration_id", &self.migration_id)
            .field("from_node", &self.from_node)
            .field("pages", &self.hashes.len())
            .field("digest", &format_args!("{:016x}", self.digest))
            .field("keyed", &self.key.is_some())
            .field("image_of", &self.image_of)
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
            key: None,
            image_of: None,
        }
    }

    /// A base that is VM `image_of`'s image, kept by `from_node` when that
    /// VM left it by `migration_id`: each page's keyed tag under `key`, and
    /// the image's (xxh3) `digest`, which the destination checks.
    pub fn keyed(
        (migration_id, from_node, image_of): (String, String, String),
        tags: Arc<[u64]>,
        key: [u8; 32],
        digest: u64,
    ) -> Self {
        Self {
            migration_id,
            from_node,
            hashes: tags,
            digest,
            key: Some(key),
            image_of: Some(image_of),
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
                s.spawn(move || scan(mem, base, sent, first..last))
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

/// Pages read at once to tag: 1 MiB.
const TAG_STEP: u64 = 256;

/// Fills `buf` with `count` pages from `first` of an image.
pub type ReadPages<'a> = dyn Fn(u64, u64, &mut [u8]) -> Result<(), String> + Sync + 'a;

/// Each page's xxh3 hash and keyed tag under `key` ([`ref_tag`]), for the
/// `count` pages from `first` of an image whose pages `read(first, count,
/// buf)` fills, on `threads` threads: what a node that kept another VM's
/// image gives a source that may use it as a base. Its first error, if any.
pub fn tag_pages(
    key: &[u8; 32],
    (first, count): (u64, u64),
    threads: usize,
    read: &ReadPages<'_>,
) -> Result<Vec<(u64, u64)>, String> {
    let steps = count.div_ceil(TAG_STEP);
    let threads = (threads.max(1) as u64).min(steps.max(1));
    let per = steps.div_ceil(threads) * TAG_STEP;
    let parts: Vec<Result<Vec<(u64, u64)>, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let start = (t * per).min(count);
                let end = ((t + 1) * per).min(count);
                s.spawn(move || tag_range(key, first + start, end - start, read))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a tagging thread panicked"))
            .collect()
    });
    let mut out = Vec::with_capacity(count as usize);
    for part in parts {
        out.extend(part?);
    }
    Ok(out)
}

/// [`tag_pages`]' work on one thread.
fn tag_range(
    key: &[u8; 32],
    first: u64,
    count: u64,
    read: &ReadPages<'_>,
) -> Result<Vec<(u64, u64)>, String> {
    let zero = (zero_page_hash(), ref_tag(key, &[0u8; PAGE_SIZE]));
    let mut buf = vec![0u8; TAG_STEP as usize * PAGE_SIZE];
    let mut out = Vec::with_capacity(count as usize);
    let mut done = 0;
    while done < count {
        let n = TAG_STEP.min(count - done);
        let bytes = &mut buf[..n as usize * PAGE_SIZE];
        read(first + done, n, bytes)?;
        out.extend(bytes.chunks_exact(PAGE_SIZE).map(|page| {
            if crate::memory::is_zero_page(page) {
                zero
            } else {
                (page_hash(page), ref_tag(key, page))
            }
        }));
        done += n;
    }
    Ok(out)
}

/// The bitmap words `range` of round 0: a bit for each changed page.
fn scan(
    mem: &GuestMemory,
    base: &Base,
    sent: &PageHashes,
    range: std::ops::Range<u64>,
) -> (Vec<u64>, u64) {
    let zero = zero_page_hash();
    let zero_tag = base.key.map(|k| ref_tag(&k, &[0u8; PAGE_SIZE]));
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
            let is_zero = mem.read_page_unless_zero(index, &mut buf);
            let now = if is_zero { zero } else { page_hash(&buf) };
            let compared = match (base.key, zero_tag) {
                (Some(key), Some(z)) => {
                    if is_zero {
                        z
                    } else {
                        ref_tag(&key, &buf)
                    }
                }
                _ => now,
            };
            if compared == base.hashes[page as usize] {
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

    fn tags_of(mem: &GuestMemory, key: &[u8; 32]) -> Arc<[u64]> {
        let mut buf = vec![0u8; PAGE_SIZE];
        (0..mem.pages())
            .map(|p| {
                mem.read_page(PageIndex(p), &mut buf);
                ref_tag(key, &buf)
            })
            .collect()
    }

    #[test]
    fn another_vms_image_is_compared_by_keyed_tags_and_leaves_xxh3_hashes_as_sent() {
        // Another VM's image: the same pages but two.
        let other = memory(100);
        for p in 0..100 {
            other.write_page(PageIndex(p), &[p as u8 + 1; PAGE_SIZE]);
        }
        let mem = memory(100);
        let mut buf = vec![0u8; PAGE_SIZE];
        for p in 0..100 {
            other.read_page(PageIndex(p), &mut buf);
            mem.write_page(PageIndex(p), &buf);
        }
        mem.write_page(PageIndex(7), &[0xab; PAGE_SIZE]);
        mem.zero_page(PageIndex(50));
        let key = [9u8; 32];
        let ids = ("m-2".to_string(), "c".to_string(), "db".to_string());
        let digest = digest_of_hashes(&hashes_of(&other));
        let base = Base::keyed(ids.clone(), tags_of(&other, &key), key, digest);
        assert_eq!(base.offer().digest, crate::digest::full_digest(&other, 1));
        let sent = PageHashes::new(100);
        let (snap, skipped) = round0(&mem, &base, &sent, 2);
        let changed: Vec<u64> = (0..100).filter(|&p| snap.contains(PageIndex(p))).collect();
        assert_eq!((changed.as_slice(), skipped), (&[7, 50][..], 98));
        for &p in &changed {
            mem.read_page(PageIndex(p), &mut buf);
            sent.set(PageIndex(p), page_hash(&buf));
        }
        assert_eq!(sent.digest(), digest_of_hashes(&hashes_of(&mem)));
        // Tags under another key match nothing: every page goes.
        let stale = Base::keyed(ids, tags_of(&other, &[8u8; 32]), key, digest);
        let (snap, skipped) = round0(&mem, &stale, &PageHashes::new(100), 2);
        assert_eq!((snap.count(), skipped), (100, 0));
    }

    #[test]
    fn tagging_an_image_gives_each_pages_hash_and_keyed_tag_in_order() {
        let mem = memory(600);
        for p in (0..600).step_by(7) {
            mem.write_page(PageIndex(p), &[p as u8 | 1; PAGE_SIZE]);
        }
        let key = [3u8; 32];
        let read = |first: u64, count: u64, buf: &mut [u8]| {
            for (i, page) in buf.chunks_exact_mut(PAGE_SIZE).enumerate() {
                mem.read_page(PageIndex(first + i as u64), page);
            }
            assert_eq!(buf.len() as u64, count * PAGE_SIZE as u64);
            Ok(())
        };
        let (hashes, tags) = (hashes_of(&mem), tags_of(&mem, &key));
        for threads in [1, 2, 3] {
            let got = tag_pages(&key, (10, 580), threads, &read).unwrap();
            let want: Vec<(u64, u64)> = (10..590).map(|p| (hashes[p], tags[p])).collect();
            assert_eq!(got, want, "{threads} threads");
        }
        let failing = |first: u64, _: u64, _: &mut [u8]| {
            if first >= 256 {
                Err(format!("page {first} unreadable"))
            } else {
                Ok(())
            }
        };
        let err = tag_pages(&key, (0, 600), 2, &failing).unwrap_err();
        assert!(err.contains("unreadable"), "{err}");
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
