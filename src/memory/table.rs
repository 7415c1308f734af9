//! Large zeroed tables of atomic words for the source's indexes, in memory
//! backed by transparent huge pages.
//!
//! An index of tens of MiB written at random (the dense index, the anchor
//! table) touches a new 4 KiB page with nearly every entry early on, and a
//! read before the first write maps the zero page, so the write after it
//! faults again and shoots down the TLBs of every core. On this
//! repository's 2-vCPU VM the search for patches cost 10-47 ns a byte in a
//! migration's first batches and still 1.3-1.8 ns late in it; backed by
//! huge pages (fewer faults, and random lookups that miss the TLB less),
//! 0.7 ns. A huge page's first write still costs: it zeroes 2 MiB.

use super::GuestMemory;
use std::sync::atomic::AtomicU64;

/// Words a table keeps on the heap: below this its mapping would not hold
/// one huge page.
const HEAP_WORDS: usize = (2 << 20) / 8;

/// A zeroed table of `len` atomic words; nothing is backed until written.
#[derive(Debug)]
pub struct WordTable {
    words: Words,
    len: usize,
}

#[derive(Debug)]
enum Words {
    Heap(Box<[AtomicU64]>),
    /// The guest memory type is such a mapping already: atomic words over
    /// anonymous memory that asks for huge pages.
    Mapped(GuestMemory),
}

impl WordTable {
    /// A table of `len` zero words. Small tables, and any whose mapping the
    /// kernel refuses, live on the heap.
    pub fn new(len: usize) -> Self {
        let mapped = (len >= HEAP_WORDS)
            .then(|| {
                let bytes = (len as u64)
                    .checked_mul(8)?
                    .checked_next_multiple_of(4096)?;
                GuestMemory::new(bytes).ok()
            })
            .flatten();
        let words = match mapped {
            Some(memory) => Words::Mapped(memory),
            None => Words::Heap((0..len).map(|_| AtomicU64::new(0)).collect()),
        };
        Self { words, len }
    }

    /// The number of words.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the table has no words.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Word `i`.
    ///
    /// # Panics
    /// If `i` is not below [`WordTable::len`].
    #[inline]
    pub fn get(&self, i: usize) -> &AtomicU64 {
        assert!(i < self.len, "word {i} outside table of {}", self.len);
        match &self.words {
            Words::Heap(words) => &words[i],
            Words::Mapped(memory) => memory.word(i as u64 * 8),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn small_and_large_tables_start_zero_and_keep_what_is_stored() {
        for len in [1, 1000, HEAP_WORDS, HEAP_WORDS * 3 + 5] {
            let t = WordTable::new(len);
            assert_eq!(t.len(), len);
            assert!(matches!(
                (&t.words, len >= HEAP_WORDS),
                (Words::Heap(_), false) | (Words::Mapped(_), true)
            ));
            assert_eq!(t.get(len - 1).load(Ordering::Relaxed), 0);
            t.get(len - 1).store(7, Ordering::Relaxed);
            t.get(0).store(9, Ordering::Relaxed);
            assert_eq!(
                t.get(len - 1).load(Ordering::Relaxed),
                if len == 1 { 9 } else { 7 }
            );
        }
    }

    #[test]
    #[should_panic(expected = "outside table")]
    fn a_word_past_the_end_panics() {
        WordTable::new(HEAP_WORDS + 1).get(HEAP_WORDS + 1);
    }
}
