//! The page vocabulary every layer shares: a run of consecutive guest
//! pages, as the dirty bitmap yields them, batches carry them on the wire
//! and the receiver reads them into guest memory.

/// `count` consecutive guest pages from page `first`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PageRun {
    /// The first page's index.
    pub first: u64,
    /// How many pages.
    pub count: u32,
}

impl PageRun {
    /// `count` pages from page `first`.
    pub const fn new(first: u64, count: u32) -> Self {
        Self { first, count }
    }

    /// The index after the last page.
    pub fn end(&self) -> u64 {
        self.first + u64::from(self.count)
    }

    /// The pages' indices, in order.
    pub fn pages(&self) -> std::ops::Range<u64> {
        self.first..self.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_spans_its_pages() {
        let r = PageRun::new(7, 3);
        assert_eq!(r.end(), 10);
        assert_eq!(r.pages().collect::<Vec<_>>(), [7, 8, 9]);
        assert_eq!(PageRun::new(7, 0).pages().count(), 0);
    }
}
