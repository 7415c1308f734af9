//! Dense pages, the source's second index: where content the destination
//! holds sits in guest memory, at byte granularity, so that a page sharing
//! runs of bytes with a region there (a file's text cached at another
//! offset, a library mapped twice) travels as a patch of that region.
//!
//! Pages are cut at content-defined anchors: a gear hash over the bytes
//! read so far (each step shifts it one bit, so it depends on the last 64
//! bytes), an anchor where its top bits are zero, about one in
//! [`ANCHOR_EVERY`] bytes. The same bytes make the same anchors wherever
//! they sit, so an anchor of a page found in the index names where the same
//! content was, and the shift between the two. The region at the shift most
//! of a page's anchors agree on is its candidate base.
//!
//! The index is a fixed table, direct-mapped by anchor hash, one atomic a
//! slot (the hash's top bits beside the byte address), at most
//! [`MAX_SLOTS`] slots: a newer anchor takes an older one's slot. An entry
//! is a hint only. The encoder sends a patch only against pages the dense
//! index says the destination holds from this round, whose bytes it reads
//! again and checks against their recorded hashes; the patch carries the
//! region's keyed tag, which the destination checks against its own copy.

use crate::memory::WordTable;
use crate::memory::PAGE_SIZE;
use std::sync::atomic::Ordering;

/// Bytes between anchors, on average.
pub const ANCHOR_EVERY: usize = 512;
/// Most anchors a page is looked up or indexed by.
pub const MAX_ANCHORS: usize = 16;
/// Most slots: 32 MiB of index.
pub const MAX_SLOTS: usize = 1 << 22;
const MIN_SLOTS: usize = 1 << 10;
/// Byte addresses fit in the low bits of a slot; the anchor's hash check in
/// the high ones. Guests past 2^40 bytes (1 TiB) index their first TiB.
const ADDR_BITS: u32 = 40;
const ADDR_MASK: u64 = (1 << ADDR_BITS) - 1;
/// Bytes before the first anchor of a page can be: the gear hash covers
/// the last 64 bytes, so earlier ones would depend on the page's start.
const WARM: usize = 63;

/// The gear hash's table: a random number per byte value (splitmix64).
const GEAR: [u64; 256] = {
    let mut t = [0u64; 256];
    let mut x: u64 = 0x243f_6a88_85a3_08d3;
    let mut i = 0;
    while i < 256 {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        t[i] = z ^ (z >> 31);
        i += 1;
    }
    t
};

/// One step of the gear hash. `h + h` rather than `h << 1`: one `lea` a
/// byte with the add, a chain's whole dependency.
#[inline(always)]
fn step(h: u64, b: u8) -> u64 {
    h.wrapping_add(h).wrapping_add(GEAR[usize::from(b)])
}

/// The top bits that are zero at an anchor.
const MASK: u64 = !(u64::MAX >> ANCHOR_EVERY.trailing_zeros());

/// A page's anchors: (offset in the page of the anchor's last byte, hash),
/// the first [`MAX_ANCHORS`] in page order.
///
/// A whole page is hashed as two halves side by side: a step depends on
/// the one before, so one chain runs at a cycle a byte at best, and two
/// chains share the core's ports instead. The hash depends on the last 64
/// bytes only, so the second half, warmed over the first's last 63 bytes,
/// finds exactly the anchors one chain would.
pub fn anchors(page: &[u8], out: &mut Vec<(u16, u64)>) {
    anchors_masked(page, MASK, out);
}

/// [`anchors`] with anchors where `mask`'s bits of the hash are zero (the
/// tests use denser masks to reach every case of the merge).
#[inline(always)]
fn anchors_masked(page: &[u8], mask: u64, out: &mut Vec<(u16, u64)>) {
    out.clear();
    if page.len() != PAGE_SIZE {
        return anchors_from(page, mask, out);
    }
    let (front, back) = page.split_at(PAGE_SIZE / 2);
    let mut late = [(0u16, 0u64); MAX_ANCHORS];
    let mut n_late = 0;
    let mut a = front[..WARM].iter().fold(0, |h, &b| step(h, b));
    let mut b = front[front.len() - WARM..]
        .iter()
        .fold(0, |h, &b| step(h, b));
    let pairs = front[WARM..].iter().zip(back);
    for (i, (&x, &y)) in pairs.enumerate() {
        a = step(a, x);
        b = step(b, y);
        if a & mask == 0 {
            out.push(((WARM + i) as u16, a));
            if out.len() == MAX_ANCHORS {
                return;
            }
        }
        if b & mask == 0 && n_late < MAX_ANCHORS {
            late[n_late] = ((PAGE_SIZE / 2 + i) as u16, b);
            n_late += 1;
        }
    }
    let room = MAX_ANCHORS - out.len();
    out.extend_from_slice(&late[..n_late.min(room)]);
    if n_late < room {
        // The second half's last WARM bytes, which the pairs did not reach.
        let from = PAGE_SIZE - WARM;
        for (i, &y) in back[back.len() - WARM..].iter().enumerate() {
            b = step(b, y);
            if b & mask == 0 {
                out.push(((from + i) as u16, b));
                if out.len() == MAX_ANCHORS {
                    return;
                }
            }
        }
    }
}

/// Anchors of `bytes` as one chain, appended to `out` up to
/// [`MAX_ANCHORS`].
#[inline(always)]
fn anchors_from(bytes: &[u8], mask: u64, out: &mut Vec<(u16, u64)>) {
    let warm = WARM.min(bytes.len());
    let mut h = bytes[..warm].iter().fold(0u64, |h, &b| step(h, b));
    for (i, &b) in bytes.iter().enumerate().skip(warm) {
        h = step(h, b);
        if h & mask == 0 {
            out.push((i as u16, h));
            if out.len() == MAX_ANCHORS {
                return;
            }
        }
    }
}

/// Where content the destination may hold sits (see the module's text).
#[derive(Debug)]
pub struct AnchorIndex {
    slots: WordTable,
    mask: u64,
}

impl AnchorIndex {
    /// An index sized to a guest of `pages` pages: about two slots an
    /// anchor, at most [`MAX_SLOTS`].
    pub fn new(pages: u64) -> Self {
        let per_page = (2 * PAGE_SIZE / ANCHOR_EVERY) as u64;
        let slots = usize::try_from(pages.saturating_mul(per_page))
            .unwrap_or(usize::MAX)
            .clamp(MIN_SLOTS, MAX_SLOTS)
            .next_power_of_two();
        Self {
            slots: WordTable::new(slots),
            mask: slots as u64 - 1,
        }
    }

    /// Bytes the index holds.
    pub fn bytes(&self) -> usize {
        self.slots.len() * 8
    }

    fn check(hash: u64) -> u64 {
        // The slot is the hash's low bits; the check is its high ones, and
        // never zero, so that an empty slot matches nothing.
        (hash >> ADDR_BITS).max(1) << ADDR_BITS
    }

    /// Records that the page at byte `page_at` has anchors `anchors`.
    pub fn insert(&self, page_at: u64, anchors: &[(u16, u64)]) {
        for &(offset, hash) in anchors {
            let at = page_at + u64::from(offset);
            if at > ADDR_MASK {
                return;
            }
            let slot = self.slots.get((hash & self.mask) as usize);
            slot.store(Self::check(hash) | at, Ordering::Relaxed);
        }
    }

    /// The region a page with anchors `anchors` most likely shares bytes
    /// with: the first byte of the page-sized region at the shift most of
    /// its found anchors agree on (ties to the first found). A candidate
    /// only: the caller checks the region's pages and bytes.
    pub fn base_for(&self, anchors: &[(u16, u64)]) -> Option<u64> {
        let mut votes: [(u64, u32); MAX_ANCHORS] = [(0, 0); MAX_ANCHORS];
        let mut n = 0;
        for &(offset, hash) in anchors {
            let entry = self
                .slots
                .get((hash & self.mask) as usize)
                .load(Ordering::Relaxed);
            if entry & !ADDR_MASK != Self::check(hash) {
                continue;
            }
            let Some(base) = (entry & ADDR_MASK).checked_sub(offset.into()) else {
                continue;
            };
            match votes[..n].iter_mut().find(|(b, _)| *b == base) {
                Some(v) => v.1 += 1,
                None if n < MAX_ANCHORS => {
                    votes[n] = (base, 1);
                    n += 1;
                }
                None => {}
            }
        }
        let mut best: Option<(u64, u32)> = None;
        for &(base, count) in &votes[..n] {
            if best.is_none_or(|(_, c)| count > c) {
                best = Some((base, count));
            }
        }
        best.map(|(base, _)| base)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Text-like bytes that do not repeat within a few pages.
    fn text(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b"etaoin shrdlu cmfwyp vbgkqjxz\n"[(x % 30) as usize]
            })
            .collect()
    }

    #[test]
    fn two_chains_find_the_anchors_one_chain_finds() {
        // Masks of 2 to 9 top bits: from anchors every few bytes (both
        // halves past MAX_ANCHORS) to the real density, on text and on
        // pages whose halves differ in density, so that every case of the
        // merge occurs: the first half full, the second cut to the room
        // left, the second half's tail needed, and pages of other lengths.
        let (mut two, mut one) = (Vec::new(), Vec::new());
        let mut seen = [false; 5];
        let mut back = Vec::new();
        let mut pages: Vec<Vec<u8>> = (0..48).map(|s| text(PAGE_SIZE, s + 1)).collect();
        for s in 0..16 {
            let mut page = text(PAGE_SIZE, 100 + s);
            // One half made of a single repeated byte: its hash settles on
            // one value, anchor everywhere or nowhere.
            let half = if s % 2 == 0 {
                0..PAGE_SIZE / 2
            } else {
                PAGE_SIZE / 2..PAGE_SIZE
            };
            page[half].fill(s as u8 * 17);
            pages.push(page);
        }
        pages.push(text(PAGE_SIZE - 1, 7));
        pages.push(text(100, 8));
        for bits in 2..=9u32 {
            let mask = !(u64::MAX >> bits);
            for page in &pages {
                anchors_masked(page, mask, &mut two);
                one.clear();
                anchors_from(page, mask, &mut one);
                assert_eq!(two, one, "{bits} bits, {} bytes", page.len());
                let half = PAGE_SIZE as u16 / 2;
                let front = two.iter().filter(|(o, _)| *o < half).count();
                seen[0] |= front == MAX_ANCHORS;
                seen[1] |= front < MAX_ANCHORS && two.len() == MAX_ANCHORS;
                seen[2] |= two
                    .last()
                    .is_some_and(|&(o, _)| usize::from(o) >= PAGE_SIZE - WARM);
                seen[3] |= page.len() != PAGE_SIZE && !two.is_empty();
                // The second half has more anchors than the first left
                // room for (its own, found by one chain over it and the
                // 63 bytes before it).
                if page.len() == PAGE_SIZE {
                    back.clear();
                    anchors_from(&page[PAGE_SIZE / 2 - WARM..], mask, &mut back);
                    seen[4] |= front < MAX_ANCHORS && front + back.len() > MAX_ANCHORS;
                }
            }
        }
        assert_eq!(seen, [true; 5]);
        // The real mask finds the real anchors.
        anchors(&pages[0], &mut two);
        one.clear();
        anchors_from(&pages[0], MASK, &mut one);
        assert_eq!(two, one);
    }

    #[test]
    fn the_same_bytes_make_the_same_anchors_at_any_offset() {
        let content = text(3 * PAGE_SIZE, 7);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        anchors(&content[1000..1000 + PAGE_SIZE], &mut a);
        anchors(&content[1300..1300 + PAGE_SIZE], &mut b);
        assert!(a.len() >= 3, "{} anchors", a.len());
        // Past b's warm-up, every anchor of b is one of a's, 300 bytes on.
        let shifted: Vec<_> = a
            .iter()
            .filter(|(o, _)| usize::from(*o) >= 300 + WARM)
            .map(|&(o, h)| (o - 300, h))
            .collect();
        let late: Vec<_> = b.iter().copied().take(shifted.len()).collect();
        assert_eq!(shifted, late);
    }

    #[test]
    fn a_shifted_copy_finds_the_region_it_came_from() {
        let content = text(4 * PAGE_SIZE, 11);
        let index = AnchorIndex::new(1000);
        let mut a = Vec::new();
        // Pages 10 and 11 of the guest hold content's first two pages.
        for p in 0..2 {
            anchors(&content[p * PAGE_SIZE..(p + 1) * PAGE_SIZE], &mut a);
            index.insert((10 + p as u64) * PAGE_SIZE as u64, &a);
        }
        // A page holding content from byte 1500 on was there at byte
        // 10 × 4096 + 1500.
        anchors(&content[1500..1500 + PAGE_SIZE], &mut a);
        assert_eq!(index.base_for(&a), Some(10 * PAGE_SIZE as u64 + 1500));
        // Other content finds nothing.
        anchors(&text(PAGE_SIZE, 99), &mut a);
        assert_eq!(index.base_for(&a), None);
    }

    #[test]
    fn is_bounded_whatever_the_guest() {
        assert_eq!(AnchorIndex::new(1 << 40).bytes(), MAX_SLOTS * 8);
        assert_eq!(AnchorIndex::new(0).bytes(), MIN_SLOTS * 8);
        // An empty slot matches no hash, zero's included.
        assert_eq!(AnchorIndex::new(10).base_for(&[(100, 0)]), None);
    }

    #[test]
    fn a_page_has_at_most_its_share_of_anchors() {
        let mut a = Vec::new();
        anchors(&[0u8; PAGE_SIZE], &mut a);
        // A constant page's hash settles: all or nothing, capped.
        assert!(a.len() <= MAX_ANCHORS);
        anchors(&text(PAGE_SIZE, 3), &mut a);
        assert!((2..=MAX_ANCHORS).contains(&a.len()), "{} anchors", a.len());
    }
}
