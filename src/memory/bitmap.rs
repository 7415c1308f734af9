//! The atomic dirty bitmap: one bit per page, marked by writers on any thread and
//! drained by the migration with a snapshot-and-clear that never stops them.

use crate::page::PageIndex;
use std::sync::atomic::{AtomicU64, Ordering};

/// One bit per guest page, set when the page was written since the last snapshot.
///
/// Memory: `pages / 8` bytes (32 KiB per GiB of guest).
#[derive(Debug)]
pub struct DirtyBitmap {
    words: Box<[AtomicU64]>,
    pages: u64,
}

impl DirtyBitmap {
    /// A clean bitmap for `pages` pages.
    pub fn new(pages: u64) -> Self {
        let words = pages.div_ceil(64) as usize;
        Self {
            words: (0..words).map(|_| AtomicU64::new(0)).collect(),
            pages,
        }
    }

    /// Number of pages tracked.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Marks `page` dirty. Call it *after* writing the page.
    #[inline]
    pub fn mark(&self, page: PageIndex) {
        let page = page.0;
        assert!(
            page < self.pages,
            "page {page} outside bitmap of {}",
            self.pages
        );
        // Release pairs with the Acquire swap in snapshot_and_clear: the page bytes
        // written before this mark are visible to whoever drains the mark.
        self.words[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::Release);
    }

    /// Marks pages `[first, first + count)` dirty, one atomic op per 64-page word.
    pub fn mark_range(&self, first: PageIndex, count: u64) {
        let first = first.0;
        let end = first.checked_add(count).expect("page range overflows");
        assert!(
            end <= self.pages,
            "pages {first}+{count} outside bitmap of {}",
            self.pages
        );
        let mut page = first;
        while page < end {
            let bit = page % 64;
            let n = (64 - bit).min(end - page);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            self.words[(page / 64) as usize].fetch_or(mask, Ordering::Release);
            page += n;
        }
    }

    /// ORs raw bitmap words (64 pages a word, as a kernel dirty log has them)
    /// into this bitmap; bits beyond the last page are ignored.
    pub fn merge_words(&self, words: &[u64]) {
        for (i, (&w, word)) in words.iter().zip(self.words.iter()).enumerate() {
            let mut w = w;
            if i == self.words.len() - 1 && !self.pages.is_multiple_of(64) {
                w &= (1u64 << (self.pages % 64)) - 1;
            }
            if w != 0 {
                // Release, as mark(): the pages were written before the log said so.
                word.fetch_or(w, Ordering::Release);
            }
        }
    }

    /// Marks every page dirty (the start of round 0).
    pub fn mark_all(&self) {
        if self.pages > 0 {
            self.mark_range(PageIndex(0), self.pages);
        }
    }

    /// Moves the set bits into `out` and clears them here, word by word, while
    /// writers keep marking. A mark that races with the drain lands either in this
    /// snapshot or in the next one, never in neither.
    pub fn snapshot_and_clear(&self, out: &mut DirtySnapshot) {
        out.reset(self.pages);
        for (dst, word) in out.words.iter_mut().zip(self.words.iter()) {
            // A relaxed peek keeps clean words' cache lines shared: a mostly clean
            // bitmap costs a read per word, not a locked write per word.
            if word.load(Ordering::Relaxed) != 0 {
                // Acquire pairs with mark()'s Release: after this, copies of the
                // drained pages see at least the bytes written before their marks.
                *dst = word.swap(0, Ordering::Acquire);
            }
        }
    }

    /// Pages currently marked (a racy count while writers run).
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
    }
}

/// A drained set of dirty pages, reused from round to round to avoid allocation.
#[derive(Debug, Clone, Default)]
pub struct DirtySnapshot {
    words: Vec<u64>,
    pages: u64,
}

impl DirtySnapshot {
    /// An empty snapshot; sized on first use.
    pub fn new() -> Self {
        Self::default()
    }

    /// A snapshot for `pages` pages with every page set.
    pub fn all(pages: u64) -> Self {
        let mut s = Self::new();
        s.reset(pages);
        s.words.fill(u64::MAX);
        s.trim_tail();
        s
    }

    /// A snapshot built from raw bitmap words (e.g. a kernel dirty log).
    /// Bits at or beyond `pages` are ignored.
    pub fn from_words(words: Vec<u64>, pages: u64) -> Self {
        let mut s = Self { words, pages };
        s.words.resize(pages.div_ceil(64) as usize, 0);
        s.trim_tail();
        s
    }

    fn reset(&mut self, pages: u64) {
        let n = pages.div_ceil(64) as usize;
        self.words.clear();
        self.words.resize(n, 0);
        self.pages = pages;
    }

    fn trim_tail(&mut self) {
        let rem = self.pages % 64;
        if rem != 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= (1u64 << rem) - 1;
            }
        }
    }

    /// Sets one page (for tests and for merging logs).
    pub fn set(&mut self, page: PageIndex) {
        let page = page.0;
        assert!(page < self.pages);
        self.words[(page / 64) as usize] |= 1 << (page % 64);
    }

    /// Whether `page` is in the set.
    pub fn contains(&self, page: PageIndex) -> bool {
        let page = page.0;
        page < self.pages && self.words[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    /// Number of pages in the set.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// The raw words, 64 pages each, page 0 in bit 0 of word 0.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// The set as ascending runs `(first_page, count)` of consecutive pages.
    pub fn runs(&self) -> Runs<'_> {
        Runs {
            words: &self.words,
            pos: 0,
            end: self.pages,
        }
    }
}

/// Iterator over runs of set bits; skips clean words in one compare each.
#[derive(Debug, Clone)]
pub struct Runs<'a> {
    words: &'a [u64],
    pos: u64,
    end: u64,
}

impl Iterator for Runs<'_> {
    type Item = (PageIndex, u64);

    fn next(&mut self) -> Option<(PageIndex, u64)> {
        // Find the next set bit at or after pos.
        let start = loop {
            if self.pos >= self.end {
                return None;
            }
            let w = (self.pos / 64) as usize;
            let bits = self.words[w] & (u64::MAX << (self.pos % 64));
            if bits != 0 {
                break w as u64 * 64 + u64::from(bits.trailing_zeros());
            }
            self.pos = (w as u64 + 1) * 64;
        };
        // Find the next clear bit after start.
        let mut pos = start;
        let stop = loop {
            if pos >= self.end {
                break self.end;
            }
            let w = (pos / 64) as usize;
            let clear = !self.words[w] & (u64::MAX << (pos % 64));
            if clear != 0 {
                break (w as u64 * 64 + u64::from(clear.trailing_zeros())).min(self.end);
            }
            pos = (w as u64 + 1) * 64;
        };
        self.pos = stop;
        Some((PageIndex(start), stop - start))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The runs as plain numbers, to compare with literals.
    fn raw(s: &DirtySnapshot) -> Vec<(u64, u64)> {
        s.runs().map(|(p, n)| (p.0, n)).collect()
    }

    fn runs_of(pages: u64, set: &[u64]) -> Vec<(u64, u64)> {
        let b = DirtyBitmap::new(pages);
        for &p in set {
            b.mark(PageIndex(p));
        }
        let mut s = DirtySnapshot::new();
        b.snapshot_and_clear(&mut s);
        assert_eq!(b.count(), 0);
        raw(&s)
    }

    #[test]
    fn runs_cross_words() {
        assert_eq!(runs_of(200, &[]), vec![]);
        assert_eq!(runs_of(200, &[0]), vec![(0, 1)]);
        assert_eq!(
            runs_of(200, &[62, 63, 64, 65, 199]),
            vec![(62, 4), (199, 1)]
        );
        let all: Vec<u64> = (0..200).collect();
        assert_eq!(runs_of(200, &all), vec![(0, 200)]);
        assert_eq!(runs_of(130, &[127, 128, 129]), vec![(127, 3)]);
    }

    #[test]
    fn mark_range_and_all() {
        let b = DirtyBitmap::new(300);
        b.mark_range(PageIndex(10), 150);
        assert_eq!(b.count(), 150);
        let mut s = DirtySnapshot::new();
        b.snapshot_and_clear(&mut s);
        assert_eq!(raw(&s), vec![(10, 150)]);
        b.mark_all();
        b.snapshot_and_clear(&mut s);
        assert_eq!(raw(&s), vec![(0, 300)]);
        assert_eq!(raw(&DirtySnapshot::all(300)), vec![(0, 300)]);
    }

    #[test]
    fn runs_match_a_naive_scan() {
        // A deterministic pseudo-random pattern at several densities.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for density in [1u64, 8, 50, 95] {
            let pages = 1000;
            let mut snap = DirtySnapshot::from_words(vec![], pages);
            for p in 0..pages {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if x % 100 < density {
                    snap.set(PageIndex(p));
                }
            }
            let mut naive = vec![];
            let mut p = 0;
            while p < pages {
                if snap.contains(PageIndex(p)) {
                    let s = p;
                    while p < pages && snap.contains(PageIndex(p)) {
                        p += 1;
                    }
                    naive.push((s, p - s));
                } else {
                    p += 1;
                }
            }
            assert_eq!(raw(&snap), naive);
            assert_eq!(snap.count(), naive.iter().map(|r| r.1).sum::<u64>());
        }
    }

    #[test]
    fn concurrent_marks_are_never_lost() {
        use std::sync::Arc;
        let pages = 4096;
        let b = Arc::new(DirtyBitmap::new(pages));
        let writers: Vec<_> = (0..2)
            .map(|t| {
                let b = b.clone();
                std::thread::spawn(move || {
                    for round in 0..50 {
                        for p in (t..pages).step_by(2) {
                            if (p + round) % 3 == 0 {
                                b.mark(PageIndex(p));
                            }
                        }
                    }
                })
            })
            .collect();
        let mut union = DirtySnapshot::from_words(vec![], pages);
        let mut snap = DirtySnapshot::new();
        for _ in 0..100 {
            b.snapshot_and_clear(&mut snap);
            for (i, w) in snap.words().iter().enumerate() {
                union.words[i] |= w;
            }
        }
        for w in writers {
            w.join().unwrap();
        }
        b.snapshot_and_clear(&mut snap);
        for (i, w) in snap.words().iter().enumerate() {
            union.words[i] |= w;
        }
        // Every page p with p % 3 in the rounds' reach was marked at least once.
        assert_eq!(union.count(), pages);
    }
}
