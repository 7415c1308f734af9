//! Dense pages, the source's index: pages the destination is known to hold,
//! by content hash, so a page identical to one of them travels as a
//! reference instead of its bytes.
//!
//! A page enters the index when the batch that carried it is acknowledged
//! (applied on the destination), if that batch went out once: a batch sent
//! again was encoded again, and the destination may hold either copy. An
//! entry serves only the round it was made in: within a round each page is
//! sent once, and the next round starts after every batch of this one is
//! acknowledged, so a page the index names still holds, on the destination,
//! what it was sent with when a reference to it is applied. The encoder
//! confirms each hit with a full compare of the two pages' bytes in guest
//! memory and checks the target's recorded hash is the hit's; the reference
//! carries the page's keyed tag, which the destination checks against its
//! own copy of the target before copying it (a guest that rewrote the
//! target into a collision of its hash cannot forge the tag), and the
//! switchover digest covers every page.
//!
//! The index is a fixed table, direct-mapped by hash: a newer entry takes
//! the slot of an older one, so it costs 16 bytes a slot whatever the
//! guest's size, at most [`MAX_SLOTS`] slots. Slots are two atomics written
//! without a lock; a reader that sees half of a write finds a page whose
//! recorded hash is not the one it looked for, and sends the page's bytes.

use crate::memory::WordTable;
use crate::page::PageIndex;
use std::sync::atomic::Ordering;

/// Most slots: 32 MiB of index, four a page for a 2 GiB guest.
pub const MAX_SLOTS: usize = 1 << 21;
/// Fewest slots.
const MIN_SLOTS: usize = 1 << 10;
/// Pages fit in the low bits of a slot's second word; the round (plus one,
/// so that zero is an empty slot) in the high ones.
const PAGE_BITS: u32 = 40;
const PAGE_MASK: u64 = (1 << PAGE_BITS) - 1;

/// Pages the destination holds, by content hash (see the module's text).
#[derive(Debug)]
pub struct SentIndex {
    hashes: WordTable,
    tagged: WordTable,
    mask: u64,
}

impl SentIndex {
    /// An index sized to a guest of `pages` pages: four slots a page, so
    /// that most entries outlive the later pages of their round that land
    /// in the same slot (at most [`MAX_SLOTS`]).
    pub fn new(pages: u64) -> Self {
        let slots = usize::try_from(pages.saturating_mul(4))
            .unwrap_or(usize::MAX)
            .clamp(MIN_SLOTS, MAX_SLOTS)
            .next_power_of_two();
        Self {
            hashes: WordTable::new(slots),
            tagged: WordTable::new(slots),
            mask: slots as u64 - 1,
        }
    }

    /// Bytes the index holds.
    pub fn bytes(&self) -> usize {
        self.hashes.len() * 16
    }

    fn slot(&self, hash: u64) -> usize {
        // xxh3's low bits are as good as any.
        (hash & self.mask) as usize
    }

    fn tag(round: u32, page: PageIndex) -> u64 {
        // Rounds wrap after 2^24; an entry of a round that long ago fails
        // the encoder's check of the target's recorded hash, or the
        // destination's.
        let round = (u64::from(round) + 1) & ((1 << (64 - PAGE_BITS)) - 1);
        (round << PAGE_BITS) | (page.0 & PAGE_MASK)
    }

    /// Records that the destination holds page `page`, with content hashing
    /// to `hash`, as sent in round `round`.
    pub fn insert(&self, round: u32, page: PageIndex, hash: u64) {
        if page.0 > PAGE_MASK {
            return;
        }
        let i = self.slot(hash);
        self.hashes.get(i).store(hash, Ordering::Relaxed);
        self.tagged
            .get(i)
            .store(Self::tag(round, page), Ordering::Relaxed);
    }

    /// A page sent in round `round` whose content hashed to `hash`, if the
    /// index holds one. A candidate only: the caller confirms it.
    pub fn find(&self, round: u32, hash: u64) -> Option<PageIndex> {
        let i = self.slot(hash);
        if self.hashes.get(i).load(Ordering::Relaxed) != hash {
            return None;
        }
        let tagged = self.tagged.get(i).load(Ordering::Relaxed);
        let want = Self::tag(round, PageIndex(0)) >> PAGE_BITS;
        (tagged != 0 && tagged >> PAGE_BITS == want).then_some(PageIndex(tagged & PAGE_MASK))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_page_of_its_round_only() {
        let index = SentIndex::new(100);
        assert_eq!(index.bytes(), MIN_SLOTS * 16);
        index.insert(3, PageIndex(7), 0xabcd);
        assert_eq!(index.find(3, 0xabcd), Some(PageIndex(7)));
        assert_eq!(index.find(4, 0xabcd), None, "another round");
        assert_eq!(index.find(3, 0xabce), None, "another hash");
        // A newer entry of the same slot takes it.
        index.insert(3, PageIndex(9), 0xabcd + MIN_SLOTS as u64);
        assert_eq!(index.find(3, 0xabcd), None);
        assert_eq!(index.find(3, 0xabcd + MIN_SLOTS as u64), Some(PageIndex(9)));
    }

    #[test]
    fn is_bounded_whatever_the_guest() {
        assert_eq!(SentIndex::new(1 << 40).bytes(), MAX_SLOTS * 16);
        assert_eq!(SentIndex::new(0).bytes(), MIN_SLOTS * 16);
    }

    #[test]
    fn an_empty_slot_is_never_a_hit_even_for_hash_zero() {
        let index = SentIndex::new(1000);
        assert_eq!(index.find(0, 0), None);
        index.insert(0, PageIndex(0), 0);
        assert_eq!(index.find(0, 0), Some(PageIndex(0)));
    }
}
