//! Where the KVM guest's program, page tables and control page live in guest
//! physical memory, and the identity-mapped 4 KiB page tables that map it.
//!
//! ```text
//!  0                        data_pages                                   pages
//!  ├── data: the pages the guest program writes ──┼─ PTs ─ PDs ─ PDPTs ─ PML4 ─ code ─ control ─ TSS ┤
//! ```
//!
//! Every guest-physical page is mapped at the same virtual address with a
//! 4 KiB page, user-accessible and writable: 2 MiB mappings would make the
//! dirty log over-report. Each entry is written with its accessed bit set,
//! and the last level's entries for the pages the guest writes (data and
//! control) with their dirty bit set too, so the CPU never writes the page
//! tables and they never appear in the dirty log. The program's own pages
//! and the tables' are left clean: KVM maps a page whose guest entry is
//! already dirty writable at its first access, and logs it then, so a dirty
//! bit on the code pages would put them in the first harvest although
//! nothing wrote them.

use crate::memory::{GuestMemory, PAGE_SIZE};
use crate::page::PageIndex;

/// Entries in one page-table page.
const ENTRIES: u64 = 512;
/// Pages of guest code.
pub const CODE_PAGES: u64 = 2;
/// The smallest guest the layout fits with room for data: 2 MiB.
pub const MIN_GUEST_BYTES: u64 = 2 << 20;

const PRESENT: u64 = 1;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const ACCESSED: u64 = 1 << 5;
const DIRTY: u64 = 1 << 6;

/// The guest's physical layout, a function of its memory size alone (so the
/// destination recomputes it and checks the state agrees).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Layout {
    /// Guest pages in all.
    pub pages: u64,
    /// Pages `[0, data_pages)` are the guest program's to write.
    pub data_pages: u64,
    /// First page of the last-level page tables.
    pub pt_first: u64,
    /// Last-level page-table pages (one per 2 MiB).
    pub pt_pages: u64,
    /// Page directories (one per GiB).
    pub pd_pages: u64,
    /// Page-directory-pointer tables (one per 512 GiB).
    pub pdpt_pages: u64,
    /// The PML4 page: CR3.
    pub pml4: u64,
    /// First page of the guest program.
    pub code: u64,
    /// The control page: the counter and the host's orders.
    pub control: u64,
    /// The task-state segment and its I/O permission bitmap, which lets
    /// ring 3 write the exit port where the CPU checks it (IOPL below 3).
    pub tss: u64,
}

impl Layout {
    /// The layout of a guest of `pages` pages; `None` when too small.
    pub fn new(pages: u64) -> Option<Self> {
        if pages * (PAGE_SIZE as u64) < MIN_GUEST_BYTES {
            return None;
        }
        let pt_pages = pages.div_ceil(ENTRIES);
        let pd_pages = pt_pages.div_ceil(ENTRIES);
        let pdpt_pages = pd_pages.div_ceil(ENTRIES);
        if pdpt_pages > ENTRIES {
            return None; // beyond what one PML4 maps (256 TiB)
        }
        let system = pt_pages + pd_pages + pdpt_pages + 1 + CODE_PAGES + 2;
        let data_pages = pages.checked_sub(system)?;
        let pt_first = data_pages;
        let pml4 = pt_first + pt_pages + pd_pages + pdpt_pages;
        Some(Self {
            pages,
            data_pages,
            pt_first,
            pt_pages,
            pd_pages,
            pdpt_pages,
            pml4,
            code: pml4 + 1,
            control: pml4 + 1 + CODE_PAGES,
            tss: pml4 + 2 + CODE_PAGES,
        })
    }

    /// Guest-physical (and virtual) address of page `page`.
    pub fn gpa(page: u64) -> u64 {
        page * PAGE_SIZE as u64
    }

    /// Writes the page tables into `memory`. Returns the pages written (the
    /// caller records them: KVM does not log the host's writes).
    pub fn write_page_tables(&self, memory: &GuestMemory) -> std::ops::Range<u64> {
        let mut page = vec![0u8; PAGE_SIZE];
        let leaf = PRESENT | WRITABLE | USER | ACCESSED;
        let upper = PRESENT | WRITABLE | USER | ACCESSED;
        let written = |page: u64| page < self.data_pages || page == self.control;
        // Level by level: each table page's entries point at the level below
        // (or, for the last level, at the data pages), in order.
        let levels = [
            (self.pt_first, self.pt_pages, 0u64, self.pages, leaf),
            (
                self.pt_first + self.pt_pages,
                self.pd_pages,
                self.pt_first,
                self.pt_pages,
                upper,
            ),
            (
                self.pt_first + self.pt_pages + self.pd_pages,
                self.pdpt_pages,
                self.pt_first + self.pt_pages,
                self.pd_pages,
                upper,
            ),
            (
                self.pml4,
                1,
                self.pt_first + self.pt_pages + self.pd_pages,
                self.pdpt_pages,
                upper,
            ),
        ];
        for (level, (first, count, target_first, targets, flags)) in levels.into_iter().enumerate()
        {
            for t in 0..count {
                page.fill(0);
                for e in 0..ENTRIES {
                    let target = t * ENTRIES + e;
                    if target >= targets {
                        break;
                    }
                    let dirty = if level == 0 && written(target_first + target) {
                        DIRTY
                    } else {
                        0
                    };
                    let entry = Self::gpa(target_first + target) | flags | dirty;
                    page[(e as usize) * 8..][..8].copy_from_slice(&entry.to_le_bytes());
                }
                memory.write_page(PageIndex(first + t), &page);
            }
        }
        self.pt_first..self.pml4 + 1
    }
}

/// Bytes of the TSS before its I/O bitmap (the 64-bit TSS's size).
pub const TSS_IOMAP: u64 = 0x68;
/// The last byte of the TSS segment: the bitmap covers ports 0-255 (32
/// bytes, all allowed) and ends with the all-ones byte the CPU requires.
pub const TSS_LIMIT: u32 = (TSS_IOMAP + 32) as u32;

impl Layout {
    /// Writes the TSS page: zero but for the I/O bitmap's offset and its
    /// closing byte.
    pub fn write_tss(&self, memory: &GuestMemory) {
        let mut page = vec![0u8; PAGE_SIZE];
        page[0x66..0x68].copy_from_slice(&(TSS_IOMAP as u16).to_le_bytes());
        page[TSS_LIMIT as usize] = 0xff;
        memory.write_page(PageIndex(self.tss), &page);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Walks the tables in `memory` as the CPU would: virtual → physical.
    fn walk(memory: &GuestMemory, l: &Layout, va: u64) -> Option<u64> {
        let mut table = Layout::gpa(l.pml4);
        for level in (0..4).rev() {
            let index = (va >> (12 + 9 * level)) & 511;
            let entry = memory.read_u64(table + index * 8);
            if entry & PRESENT == 0 || entry & USER == 0 || entry & WRITABLE == 0 {
                return None;
            }
            assert_ne!(entry & ACCESSED, 0);
            let page = va >> 12;
            if level == 0 {
                let written = page < l.data_pages || page == l.control;
                assert_eq!(entry & DIRTY != 0, written, "page {page}");
            }
            table = entry & !0xfff;
        }
        Some(table | (va & 0xfff))
    }

    #[test]
    fn identity_maps_every_page_with_4k_pages() {
        for bytes in [2u64 << 20, 3 << 20, (1 << 30) + (8 << 20)] {
            let mem = GuestMemory::new(bytes).unwrap();
            let l = Layout::new(mem.pages()).unwrap();
            let written = l.write_page_tables(&mem);
            assert_eq!(written.end, l.code);
            assert!(l.control < l.pages && l.data_pages > 0);
            for page in [0, 1, l.data_pages - 1, l.pml4, l.code, l.control, l.tss] {
                let va = Layout::gpa(page) + 0x123;
                assert_eq!(walk(&mem, &l, va), Some(va), "page {page} of {bytes}");
            }
            // Past the end: not mapped.
            let beyond = Layout::gpa(l.pages.next_multiple_of(512) + 1);
            if beyond >> 12 < l.pt_pages.next_multiple_of(512) * 512 {
                assert_eq!(walk(&mem, &l, beyond), None);
            }
        }
    }

    #[test]
    fn sizes() {
        assert!(Layout::new(511).is_none());
        let l = Layout::new(131_072).unwrap(); // 512 MiB
        assert_eq!((l.pt_pages, l.pd_pages, l.pdpt_pages), (256, 1, 1));
        assert_eq!(l.data_pages, 131_072 - 256 - 1 - 1 - 1 - CODE_PAGES - 2);
        assert_eq!(l.tss, l.pages - 1);
    }
}
