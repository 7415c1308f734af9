//! The switchover memory digest, kept current page by page as pages move so the
//! pause only hashes the last dirty pages.
//!
//! Each page's hash is xxh3-64 of its bytes; the digest is the wrapping sum,
//! over every page that is not all zeros, of its hash mixed with its index, so
//! it can be kept per page in any order and summed at the end. A zero page
//! hashes to a constant without reading it and adds nothing, so memory that
//! never held data costs nothing to track. Memory: 8 bytes per 4 KiB page
//! (2 MiB per GiB) on each side, allocated 256 KiB at a time as pages with
//! content arrive (an announced size alone allocates only the chunk index).

use crate::memory::{GuestMemory, PAGE_SIZE};
use crate::page::PageIndex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use xxhash_rust::xxh3::xxh3_64;

/// The hash of one page, by content.
#[inline]
pub fn page_hash(page: &[u8]) -> u64 {
    xxh3_64(page)
}

/// A dense-page reference's tag of a page's bytes: keyed BLAKE3 under the
/// session's reference key, its first 8 bytes. Unlike [`page_hash`], no
/// one without the key can make two pages that share a tag, so a
/// destination that finds its copy of a target carries the tag a reference
/// names holds the very bytes the source compared.
pub fn ref_tag(key: &[u8; 32], page: &[u8]) -> u64 {
    let h = blake3::keyed_hash(key, page);
    u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("32 bytes"))
}

/// The hash of an all-zero page.
pub fn zero_page_hash() -> u64 {
    static ZERO: OnceLock<u64> = OnceLock::new();
    *ZERO.get_or_init(|| xxh3_64(&[0u8; PAGE_SIZE]))
}

/// Mixes a page hash with its index so that swapped pages change the digest.
#[inline]
fn mix(index: u64, hash: u64) -> u64 {
    let x = hash ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let x = (x ^ (x >> 32)).wrapping_mul(0xd6e8_feb8_6659_fd93);
    x ^ (x >> 32)
}

/// A page's share of the digest: nothing for a zero page.
#[inline]
fn share(index: u64, hash: u64, zero: u64) -> u64 {
    if hash == zero {
        0
    } else {
        mix(index, hash)
    }
}

/// The digest of memory whose pages hash to `hashes`, in order: what
/// [`full_digest`] gives for that memory, from the hashes alone.
pub fn digest_of_hashes(hashes: &[u64]) -> u64 {
    let zero = zero_page_hash();
    hashes.iter().enumerate().fold(0u64, |acc, (i, &h)| {
        acc.wrapping_add(share(i as u64, h, zero))
    })
}

/// Pages per chunk of the hash table: 32 Ki pages (128 MiB of guest), 256 KiB
/// of hashes.
const CHUNK_PAGES: u64 = 1 << 15;

/// Per-page hashes of guest memory as it was sent or applied.
#[derive(Debug)]
pub struct PageHashes {
    pages: u64,
    /// Chunks of hashes, each made when a page of it first gets content.
    chunks: Box<[OnceLock<Box<[AtomicU64]>>]>,
}

impl PageHashes {
    /// Hashes for `pages` pages, all starting as zero pages. Allocates 8
    /// bytes per 128 MiB of guest now; the rest as content arrives.
    pub fn new(pages: u64) -> Self {
        Self {
            pages,
            chunks: (0..pages.div_ceil(CHUNK_PAGES))
                .map(|_| OnceLock::new())
                .collect(),
        }
    }

    /// Records that page `index` now holds content hashing to `hash`.
    #[inline]
    pub fn set(&self, index: PageIndex, hash: u64) {
        let index = index.0;
        let cell = &self.chunks[(index / CHUNK_PAGES) as usize];
        let zero = zero_page_hash();
        let chunk = match cell.get() {
            Some(c) => c,
            // A zero page where nothing was ever set: already so.
            None if hash == zero => return,
            None => cell.get_or_init(|| (0..CHUNK_PAGES).map(|_| AtomicU64::new(zero)).collect()),
        };
        // Relaxed: the digest is summed after the round barrier (a channel ack or
        // the switchover message), which orders these stores before the read.
        chunk[(index % CHUNK_PAGES) as usize].store(hash, Ordering::Relaxed);
    }

    /// The hash recorded for page `index` (a zero page's where none was).
    #[inline]
    pub fn get(&self, index: PageIndex) -> u64 {
        let cell = &self.chunks[(index.0 / CHUNK_PAGES) as usize];
        cell.get().map_or_else(zero_page_hash, |c| {
            c[(index.0 % CHUNK_PAGES) as usize].load(Ordering::Relaxed)
        })
    }

    /// The digest of all pages.
    pub fn digest(&self) -> u64 {
        let zero = zero_page_hash();
        let mut acc = 0u64;
        for (c, cell) in self.chunks.iter().enumerate() {
            let Some(chunk) = cell.get() else { continue };
            let first = c as u64 * CHUNK_PAGES;
            let n = CHUNK_PAGES.min(self.pages - first) as usize;
            for (i, h) in chunk[..n].iter().enumerate() {
                acc = acc.wrapping_add(share(first + i as u64, h.load(Ordering::Relaxed), zero));
            }
        }
        acc
    }

    /// Every page's hash, in order (8 bytes per page).
    pub fn to_vec(&self) -> Vec<u64> {
        let zero = zero_page_hash();
        let mut out = Vec::with_capacity(self.pages as usize);
        for (c, cell) in self.chunks.iter().enumerate() {
            let n = CHUNK_PAGES.min(self.pages - c as u64 * CHUNK_PAGES) as usize;
            match cell.get() {
                Some(chunk) => out.extend(chunk[..n].iter().map(|h| h.load(Ordering::Relaxed))),
                None => out.resize(out.len() + n, zero),
            }
        }
        out
    }

    /// Bytes of hashes allocated so far.
    pub fn allocated_bytes(&self) -> u64 {
        let made = self.chunks.iter().filter(|c| c.get().is_some()).count() as u64;
        made * CHUNK_PAGES * 8
    }
}

/// The digest of all of `mem`, hashed now on `threads` threads (`--verify full`).
pub fn full_digest(mem: &GuestMemory, threads: usize) -> u64 {
    hash_all(mem, threads, false)
}

/// The digest as ferry 0.1's first saved-guest files hold it: zero pages
/// counted too (their mixed hash added like any other page's).
pub fn full_digest_v1(mem: &GuestMemory, threads: usize) -> u64 {
    hash_all(mem, threads, true)
}

fn hash_all(mem: &GuestMemory, threads: usize, zero_pages_count: bool) -> u64 {
    let pages = mem.pages();
    let threads = (threads.max(1) as u64).min(pages.max(1));
    let per = pages.div_ceil(threads);
    std::thread::scope(|s| {
        let parts: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let first = t * per;
                    let count = per.min(pages.saturating_sub(first));
                    if count == 0 {
                        return 0u64;
                    }
                    let zero = zero_page_hash();
                    let mut acc = 0u64;
                    let mut at = first;
                    while at < first + count {
                        let n = crate::memory::VIEW_PAGES.min(first + count - at);
                        acc = mem.with_pages(at, n, |bytes| {
                            bytes
                                .chunks_exact(PAGE_SIZE)
                                .enumerate()
                                .fold(acc, |acc, (i, p)| {
                                    let (index, hash) = (at + i as u64, page_hash(p));
                                    acc.wrapping_add(if zero_pages_count {
                                        mix(index, hash)
                                    } else {
                                        share(index, hash, zero)
                                    })
                                })
                        });
                        at += n;
                    }
                    acc
                })
            })
            .collect();
        parts
            .into_iter()
            .fold(0u64, |acc, h| acc.wrapping_add(h.join().unwrap()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incremental_equals_full() {
        let mem = GuestMemory::new(64 * PAGE_SIZE as u64).unwrap();
        let hashes = PageHashes::new(64);
        assert_eq!(hashes.digest(), full_digest(&mem, 2));
        let mut page = vec![0u8; PAGE_SIZE];
        for i in [0u64, 5, 63] {
            page.fill(i as u8 + 1);
            mem.write_page(PageIndex(i), &page);
            hashes.set(PageIndex(i), page_hash(&page));
        }
        assert_eq!(hashes.digest(), full_digest(&mem, 2));
        assert_eq!(full_digest(&mem, 1), full_digest(&mem, 3));
        // A swapped pair of pages changes the digest.
        let mut a = vec![0u8; PAGE_SIZE];
        mem.read_page(PageIndex(0), &mut a);
        mem.read_page(PageIndex(5), &mut page);
        mem.write_page(PageIndex(0), &page);
        mem.write_page(PageIndex(5), &a);
        assert_ne!(hashes.digest(), full_digest(&mem, 2));
    }

    #[test]
    fn the_table_grows_only_where_pages_have_content() {
        // A 1 TiB guest announced: only the chunk index is allocated.
        let hashes = PageHashes::new(1 << 28);
        assert_eq!(hashes.allocated_bytes(), 0);
        // Zero pages anywhere allocate nothing; a page with content, one chunk.
        hashes.set(PageIndex(5), zero_page_hash());
        hashes.set(PageIndex((1 << 28) - 1), zero_page_hash());
        assert_eq!(hashes.allocated_bytes(), 0);
        assert_eq!(hashes.digest(), 0);
        hashes.set(PageIndex(1 << 20), 42);
        assert_eq!(hashes.allocated_bytes(), CHUNK_PAGES * 8);
        assert_eq!(hashes.digest(), mix(1 << 20, 42));
        // Back to zero: the digest is that of an empty guest again.
        hashes.set(PageIndex(1 << 20), zero_page_hash());
        assert_eq!(hashes.digest(), 0);
    }

    #[test]
    fn the_table_reads_back_in_order_with_zero_pages_where_nothing_was_set() {
        let pages = 2 * CHUNK_PAGES + 5;
        let hashes = PageHashes::new(pages);
        hashes.set(PageIndex(3), 11);
        hashes.set(PageIndex(2 * CHUNK_PAGES + 4), 12);
        let all = hashes.to_vec();
        assert_eq!(all.len() as u64, pages);
        assert_eq!((all[3], all[2 * CHUNK_PAGES as usize + 4]), (11, 12));
        assert_eq!(
            all.iter().filter(|&&h| h == zero_page_hash()).count() as u64,
            pages - 2
        );
        assert_eq!(digest_of_hashes(&all), hashes.digest());
    }

    #[test]
    fn a_partial_last_chunk_is_summed_to_the_guest_end_only() {
        let pages = CHUNK_PAGES + 3;
        let mem = GuestMemory::new(pages * PAGE_SIZE as u64).unwrap();
        let hashes = PageHashes::new(pages);
        let page = vec![9u8; PAGE_SIZE];
        mem.write_page(PageIndex(pages - 1), &page);
        hashes.set(PageIndex(pages - 1), page_hash(&page));
        assert_eq!(hashes.digest(), full_digest(&mem, 2));
    }
}
