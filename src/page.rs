//! The page vocabulary every layer shares: a run of consecutive guest
//! pages, as the dirty bitmap yields them, batches carry them on the wire
//! and the receiver reads them into guest memory.

/// A guest page's number: its byte offset over the page size. Not a count
/// of pages, nor a byte offset.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PageIndex(pub u64);

impl PageIndex {
    /// The page `n` pages after this one.
    pub const fn plus(self, n: u64) -> PageIndex {
        PageIndex(self.0 + n)
    }

    /// Pages from this one up to `end` (exclusive).
    pub fn until(self, end: PageIndex) -> u64 {
        end.0.saturating_sub(self.0)
    }
}

impl std::fmt::Display for PageIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// `count` consecutive guest pages from page `first`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PageRun {
    /// The first page.
    pub first: PageIndex,
    /// How many pages.
    pub count: u32,
}

impl PageRun {
    /// `count` pages from page `first`.
    pub const fn new(first: PageIndex, count: u32) -> Self {
        Self { first, count }
    }

    /// The page after the last one.
    pub fn end(&self) -> PageIndex {
        self.first.plus(u64::from(self.count))
    }

    /// The pages, in order.
    pub fn pages(&self) -> impl Iterator<Item = PageIndex> + Clone + use<> {
        (self.first.0..self.end().0).map(PageIndex)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_spans_its_pages() {
        let r = PageRun::new(PageIndex(7), 3);
        assert_eq!(r.end(), PageIndex(10));
        let pages: Vec<u64> = r.pages().map(|p| p.0).collect();
        assert_eq!(pages, [7, 8, 9]);
        assert_eq!(PageRun::new(PageIndex(7), 0).pages().count(), 0);
        assert_eq!(PageIndex(7).until(PageIndex(10)), 3);
    }
}
