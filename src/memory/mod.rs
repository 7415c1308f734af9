//! Guest memory: the mmap'd page array, its dirty bitmap, initial content and the
//! synthetic guest that dirties it.
//!
//! Guest memory is shared memory in the sense every VMM uses: the guest (the
//! synthetic writer threads, or a KVM vCPU) writes pages while the migration
//! reads them. Every access from Rust goes through 8-byte atomic words
//! (relaxed: [`GuestMemory::read_page`], [`GuestMemory::write_page`], ...), so
//! concurrent accesses are atomic ones, never a data race; no `&[u8]` is ever
//! made over guest memory (views copy, [`GuestMemory::with_pages`]). The
//! kernel's writes (`readv` into a page, a vCPU's stores) are outside the Rust
//! abstract machine, as a second process's would be. The dirty-log protocol
//! makes a torn read harmless: a writer writes a page *and then* marks it
//! dirty, the migration clears the mark *and then* copies the page, so any
//! write that overlaps a copy leaves the page marked and it is sent again.

mod bitmap;
mod fill;
mod place;
mod synthetic;
mod table;

pub use bitmap::{DirtyBitmap, DirtySnapshot, Runs};
pub use fill::{ContentKind, FillError, FillSpec, FILL_EXTENT_PAGES};
pub use place::PageFill;
pub use synthetic::{
    GuestState, SyntheticGuest, Workload, WorkloadError, WorkloadPattern, MAX_DIRTY_RATE,
    MAX_WRITERS,
};
pub use table::WordTable;

use crate::page::{PageIndex, PageRun};
use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes in one guest page.
pub const PAGE_SIZE: usize = 4096;
/// Whether a page (or any buffer whose length is a multiple of 64) is all zero.
///
/// An OR-reduce over 256-byte blocks that the compiler vectorizes, with an early
/// exit between blocks: non-zero pages usually stop in the first block.
#[inline]
pub fn is_zero_page(page: &[u8]) -> bool {
    let mut blocks = page.chunks_exact(256);
    for block in &mut blocks {
        let mut acc = 0u64;
        for w in block.chunks_exact(8) {
            acc |= u64::from_ne_bytes(w.try_into().unwrap());
        }
        if acc != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&b| b == 0)
}

/// `log2(PAGE_SIZE)`.
pub const PAGE_SHIFT: u32 = 12;
/// 8-byte words in one page.
const PAGE_WORDS: usize = PAGE_SIZE / 8;
/// Pages a view ([`GuestMemory::with_pages`]) copies at a time.
pub const VIEW_PAGES: u64 = 64;
/// The largest guest memory ferry will map: 16 TiB.
pub const MAX_MEMORY_BYTES: u64 = 16 << 40;

/// Errors creating or loading guest memory.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // variant fields are named in the messages
pub enum MemoryError {
    /// The size is zero, not a multiple of the page size, or too large.
    #[error("guest memory size {bytes} is invalid: {reason}")]
    BadSize { bytes: u64, reason: &'static str },
    /// The anonymous mapping could not be created.
    #[error("cannot map {bytes} bytes of guest memory")]
    Map {
        bytes: u64,
        #[source]
        source: std::io::Error,
    },
    /// The RAM image could not be read.
    #[error("cannot read RAM image {path}")]
    Image {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// A guest's physical memory: one anonymous, lazily backed mapping of 4 KiB pages.
///
/// Pages are accessed by index through copies in and out; many threads may read
/// and write distinct (or even the same) pages at once, as a VMM's would.
pub struct GuestMemory {
    map: memmap2::MmapRaw,
    pages: u64,
}

impl std::fmt::Debug for GuestMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestMemory")
            .field("pages", &self.pages)
            .finish()
    }
}

impl GuestMemory {
    /// Maps `bytes` of zeroed guest memory. Nothing is backed until written.
    pub fn new(bytes: u64) -> Result<Self, MemoryError> {
        let memory = Self::without_huge_pages(bytes)?;
        // Back the guest with transparent huge pages where the kernel allows, as
        // QEMU does for guest RAM: a first write then costs one fault per 2 MiB
        // instead of per 4 KiB (on this kind of VM, 18 GB/s against 3 GB/s), and
        // reading unbacked memory maps the huge zero page. Dirty tracking stays at
        // 4 KiB: the bitmap is ferry's own.
        memory.advise_huge_pages();
        Ok(memory)
    }

    /// As [`GuestMemory::new`], refusing huge pages (`MADV_NOHUGEPAGE`, so
    /// also where the system gives them unasked): memory an incoming
    /// migration fills page by page. There each huge page's first write
    /// zeroes 2 MiB of memory the host may not have backed yet; on this kind
    /// of VM receiving 1 GiB cost the destination 4.6-6.6 s of CPU so,
    /// against 0.9 s without (`BENCHMARKS.md`). The guest asks for them once
    /// it runs ([`GuestMemory::advise_huge_pages`]).
    pub fn without_huge_pages(bytes: u64) -> Result<Self, MemoryError> {
        let len = Self::check_size(bytes)?;
        let map = memmap2::MmapOptions::new()
            .len(len)
            .no_reserve_swap()
            .map_anon()
            .map_err(|source| MemoryError::Map { bytes, source })?;
        // Advice only: a failure changes nothing.
        let _ = map.advise(memmap2::Advice::NoHugePage);
        // Kept out of forked children (`MADV_DONTFORK`, as QEMU does for guest
        // RAM): an agent that forks to run a hook would otherwise copy the
        // page tables of every guest it holds and mark their pages
        // copy-on-write until the child execs, so running guests fault on
        // their writes meanwhile. Holding twelve 512 MiB guests, forking for
        // `true` took 110-930 ms (`BENCHMARKS.md`). No child of ferry reads
        // guest memory: each execs at once.
        let _ = map.advise(memmap2::Advice::DontFork);
        Ok(Self {
            map: memmap2::MmapRaw::from(map),
            pages: bytes >> PAGE_SHIFT,
        })
    }

    /// Asks the kernel to back this memory with transparent huge pages
    /// from now on (for memory already written, by collapsing it in the
    /// background), lifting a refusal. Advice only: a failure changes
    /// nothing.
    pub fn advise_huge_pages(&self) {
        let _ = self.map.advise(memmap2::Advice::HugePage);
    }

    /// Checks a guest memory size; returns it as a length.
    pub fn check_size(bytes: u64) -> Result<usize, MemoryError> {
        if bytes == 0 {
            return Err(MemoryError::BadSize {
                bytes,
                reason: "must not be zero",
            });
        }
        if !bytes.is_multiple_of(PAGE_SIZE as u64) {
            return Err(MemoryError::BadSize {
                bytes,
                reason: "must be a multiple of 4 KiB",
            });
        }
        if bytes > MAX_MEMORY_BYTES {
            return Err(MemoryError::BadSize {
                bytes,
                reason: "larger than 16 TiB",
            });
        }
        usize::try_from(bytes).map_err(|_| MemoryError::BadSize {
            bytes,
            reason: "larger than the address space",
        })
    }

    /// Loads a raw RAM image as guest memory, byte for byte. The image's
    /// size (a non-zero multiple of 4 KiB) is the guest's memory size. The
    /// file is copied into the guest's own anonymous memory when it is opened
    /// (its all-zero pages left unbacked) and never written: a file changed or
    /// truncated afterwards cannot change a migration under way, and one
    /// truncated while it is read is refused, naming it.
    pub fn from_image(path: &Path) -> Result<Self, MemoryError> {
        use std::os::unix::fs::FileExt;
        let image_err = |source| MemoryError::Image {
            path: path.display().to_string(),
            source,
        };
        let file = File::open(path).map_err(image_err)?;
        let bytes = file.metadata().map_err(image_err)?.len();
        let mem = Self::new(bytes)?;
        let mut chunk = vec![0u8; (VIEW_PAGES as usize) << PAGE_SHIFT];
        let mut first = 0u64;
        while first < mem.pages {
            let count = VIEW_PAGES.min(mem.pages - first);
            let buf = &mut chunk[..(count as usize) << PAGE_SHIFT];
            file.read_exact_at(buf, first << PAGE_SHIFT)
                .map_err(image_err)?;
            for (i, page) in buf.chunks_exact(PAGE_SIZE).enumerate() {
                if !is_zero_page(page) {
                    mem.write_page(PageIndex(first + i as u64), page);
                }
            }
            first += count;
        }
        Ok(mem)
    }

    /// Writes the memory to `path` as a raw RAM image, byte for byte (the format
    /// [`GuestMemory::from_image`] and QEMU's `memory-backend-file` read). Zero
    /// pages become holes in a sparse file. Returns the non-zero pages written.
    pub fn save_image(&self, path: &Path) -> std::io::Result<u64> {
        use std::io::{Seek, SeekFrom, Write};
        let mut file = std::io::BufWriter::with_capacity(
            1 << 20,
            File::create(path).map_err(|e| annotate(path, e))?,
        );
        file.get_ref()
            .set_len(self.len_bytes())
            .map_err(|e| annotate(path, e))?;
        let mut written = 0u64;
        let mut at = 0u64; // the file position after the last write
        let mut first = 0u64;
        while first < self.pages {
            let count = VIEW_PAGES.min(self.pages - first);
            self.with_pages(first, count, |bytes| -> std::io::Result<()> {
                for (i, page) in bytes.chunks_exact(PAGE_SIZE).enumerate() {
                    if is_zero_page(page) {
                        continue;
                    }
                    let offset = (first + i as u64) << PAGE_SHIFT;
                    if offset != at {
                        file.seek(SeekFrom::Start(offset))?;
                    }
                    file.write_all(page)?;
                    at = offset + PAGE_SIZE as u64;
                    written += 1;
                }
                Ok(())
            })
            .map_err(|e| annotate(path, e))?;
            first += count;
        }
        file.flush().map_err(|e| annotate(path, e))?;
        Ok(written)
    }

    /// Bytes of this memory resident in RAM now: pages this process backs
    /// with memory of its own (`/proc/self/pagemap`: present and mapped
    /// here only), so never-written pages a read mapped to the kernel's
    /// shared zero page do not count. Where pagemap cannot be read, what
    /// `mincore` says (which counts those too); `None` where neither tells.
    /// Asks a GiB at a time, so a large, mostly unbacked guest (a peer may
    /// declare up to the receiver's `--max-memory`) costs a bounded buffer,
    /// not one entry per page at once.
    pub fn resident_bytes(&self) -> Option<u64> {
        self.resident_by_pagemap()
            .or_else(|| self.resident_by_mincore())
    }

    fn resident_by_pagemap(&self) -> Option<u64> {
        use std::os::unix::fs::FileExt;
        /// Present in RAM.
        const PRESENT: u64 = 1 << 63;
        /// Mapped by this process alone (not the shared zero page).
        const EXCLUSIVE: u64 = 1 << 56;
        const CHUNK: u64 = 1 << 16; // pages: 256 MiB, 512 KiB of entries
        let file = std::fs::File::open("/proc/self/pagemap").ok()?;
        let base = self.map.as_ptr() as u64 / PAGE_SIZE as u64;
        let mut buf = vec![0u8; (CHUNK.min(self.pages) * 8) as usize];
        let (mut resident, mut first) = (0u64, 0u64);
        while first < self.pages {
            let count = CHUNK.min(self.pages - first);
            let bytes = &mut buf[..(count * 8) as usize];
            file.read_exact_at(bytes, (base + first) * 8).ok()?;
            resident += bytes
                .chunks_exact(8)
                .map(|e| u64::from_le_bytes(e.try_into().expect("8 bytes")))
                .filter(|e| e & PRESENT != 0 && e & EXCLUSIVE != 0)
                .count() as u64;
            first += count;
        }
        Some(resident * PAGE_SIZE as u64)
    }

    #[allow(unsafe_code)]
    fn resident_by_mincore(&self) -> Option<u64> {
        const CHUNK: u64 = 1 << 18; // pages: 1 GiB
        let mut vec = vec![0u8; CHUNK.min(self.pages) as usize];
        let mut resident = 0u64;
        let mut first = 0u64;
        while first < self.pages {
            let count = CHUNK.min(self.pages - first);
            // SAFETY: pages [first, first + count) lie inside this mapping
            // (page-aligned start, checked bounds), and `vec` has at least one
            // byte per page for the kernel to fill. mincore reads page tables
            // only, never the memory.
            let rc = unsafe {
                libc::mincore(
                    self.page_ptr(first).cast(),
                    (count as usize) << PAGE_SHIFT,
                    vec.as_mut_ptr().cast(),
                )
            };
            if rc != 0 {
                return None;
            }
            resident += vec[..count as usize]
                .iter()
                .filter(|&&b| b & 1 == 1)
                .count() as u64;
            first += count;
        }
        Some(resident * PAGE_SIZE as u64)
    }

    /// Number of 4 KiB pages.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Size in bytes.
    pub fn len_bytes(&self) -> u64 {
        self.pages << PAGE_SHIFT
    }

    /// Page `index` as 512 atomic words: how Rust code reads and writes
    /// memory a guest may be writing at the same time.
    #[allow(unsafe_code)]
    fn words(&self, index: u64) -> &[AtomicU64] {
        let ptr = self.page_ptr(index);
        // SAFETY: page_ptr checked that the page lies inside the mapping,
        // which lives as long as `self`; a page starts on a 4096-byte boundary
        // of a page-aligned mapping, so the words are 8-aligned; AtomicU64 has
        // u64's size and alignment and every bit pattern is a valid value.
        // Shared references to atomics may alias freely, and no `&[u8]` or
        // `&mut` to guest memory exists anywhere (this module makes none), so
        // every concurrent access from Rust is an atomic one; writes by the
        // kernel (readv) or a vCPU are outside the abstract machine, as
        // another process's writes to shared memory are.
        unsafe { std::slice::from_raw_parts(ptr.cast::<AtomicU64>(), PAGE_WORDS) }
    }

    fn page_ptr(&self, index: u64) -> *mut u8 {
        assert!(
            index < self.pages,
            "page {index} outside guest of {} pages",
            self.pages
        );
        // The offset is inside the mapping: index < pages, and pages * PAGE_SIZE == len.
        self.map
            .as_mut_ptr()
            .wrapping_add((index as usize) << PAGE_SHIFT)
    }

    /// Copies page `index` into `dst`, a word at a time (relaxed atomic
    /// loads: a guest writing the page meanwhile gives a torn copy, never a
    /// data race; the page is dirty then and is sent again).
    ///
    /// # Panics
    /// If `index` is outside the guest or `dst` is not one page long.
    pub fn read_page(&self, index: PageIndex, dst: &mut [u8]) {
        assert_eq!(dst.len(), PAGE_SIZE);
        let (dst, _) = dst.as_chunks_mut::<8>();
        for (d, w) in dst.iter_mut().zip(self.words(index.0)) {
            *d = w.load(Ordering::Relaxed).to_ne_bytes();
        }
    }

    /// Copies page `index` into `dst` unless it is all zeros; returns whether
    /// it was (then `dst` is untouched): a zero page, a third of a typical
    /// guest, is checked where it lies and never copied.
    ///
    /// # Panics
    /// As [`GuestMemory::read_page`].
    pub fn read_page_unless_zero(&self, index: PageIndex, dst: &mut [u8]) -> bool {
        assert_eq!(dst.len(), PAGE_SIZE);
        let words = self.words(index.0);
        // Blocks of 32 words: one branch per 256 bytes.
        let zero = words.chunks_exact(32).all(|block| {
            block
                .iter()
                .fold(0u64, |acc, w| acc | w.load(Ordering::Relaxed))
                == 0
        });
        if !zero {
            self.read_page(index, dst);
        }
        zero
    }

    /// Copies `src` (one page) into page `index`, a word at a time (relaxed
    /// atomic stores).
    ///
    /// # Panics
    /// If `index` is outside the guest or `src` is not one page long.
    pub fn write_page(&self, index: PageIndex, src: &[u8]) {
        assert_eq!(src.len(), PAGE_SIZE);
        let (src, _) = src.as_chunks::<8>();
        for (s, w) in src.iter().zip(self.words(index.0)) {
            w.store(u64::from_ne_bytes(*s), Ordering::Relaxed);
        }
    }

    /// Reads the little-endian `u64` at byte `offset` (8-aligned) of guest
    /// memory (the KVM guest's control page), with a relaxed atomic load.
    ///
    /// # Panics
    /// If the word lies outside the guest or is not aligned.
    pub fn read_u64(&self, offset: u64) -> u64 {
        u64::from_le(self.word(offset).load(Ordering::Relaxed))
    }

    /// Writes the little-endian `u64` at byte `offset` (8-aligned), with a
    /// relaxed atomic store.
    ///
    /// # Panics
    /// As [`GuestMemory::read_u64`].
    pub fn write_u64(&self, offset: u64, value: u64) {
        self.word(offset).store(value.to_le(), Ordering::Relaxed)
    }

    fn word(&self, offset: u64) -> &AtomicU64 {
        assert!(
            offset.is_multiple_of(8) && offset + 8 <= self.len_bytes(),
            "word at {offset:#x} outside guest of {} bytes or unaligned",
            self.len_bytes()
        );
        &self.words(offset >> PAGE_SHIFT)[(offset as usize & (PAGE_SIZE - 1)) / 8]
    }

    /// The host address of the first byte, for registering the memory with a
    /// hypervisor (the KVM guest's memory slot). The mapping lives as long as
    /// `self`.
    pub fn host_addr(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }

    /// Fills page `index` with zeros.
    pub fn zero_page(&self, index: PageIndex) {
        for w in self.words(index.0) {
            w.store(0, Ordering::Relaxed);
        }
    }

    /// Runs `f` over a copy of the bytes of pages `[first, first + count)`,
    /// read a word at a time: a view is never a reference into memory a
    /// guest may be writing. The copy is `count` pages in a buffer of this
    /// thread's: keep views small (passes over all memory go
    /// [`VIEW_PAGES`] at a time). With the guest running the copy may be torn
    /// between pages, which only makes the result stale.
    ///
    /// # Panics
    /// If the range is outside the guest.
    pub fn with_pages<R>(&self, first: u64, count: u64, f: impl FnOnce(&[u8]) -> R) -> R {
        assert!(
            first
                .checked_add(count)
                .is_some_and(|end| end <= self.pages),
            "pages {first}+{count} outside guest of {} pages",
            self.pages
        );
        thread_local! {
            static VIEW: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let fill = |buf: &mut Vec<u8>| {
            buf.resize((count as usize) << PAGE_SHIFT, 0);
            for (i, page) in buf.chunks_exact_mut(PAGE_SIZE).enumerate() {
                self.read_page(PageIndex(first + i as u64), page);
            }
        };
        VIEW.with(|cell| match cell.try_borrow_mut() {
            Ok(mut buf) => {
                fill(&mut buf);
                f(&buf)
            }
            // A view inside a view: a buffer of its own.
            Err(_) => {
                let mut buf = Vec::new();
                fill(&mut buf);
                f(&buf)
            }
        })
    }
}

/// The process's peak resident memory (Linux: `VmHWM`); `None` where that
/// cannot be read.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line["VmHWM:".len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib << 10)
}

/// An IO error on `path`, naming it.
fn annotate(path: &Path, e: std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether the mapping at `addr` has flag `flag` in its `VmFlags` in
    /// /proc/self/smaps (`hg`: huge pages asked for; `nh`: refused).
    fn vm_flag(addr: usize, flag: &str) -> bool {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((a, b)) = range.split_once('-') {
                    if let (Ok(a), Ok(b)) =
                        (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                    {
                        inside = (a..b).contains(&addr);
                        continue;
                    }
                }
            }
            if inside {
                if let Some(flags) = line.strip_prefix("VmFlags:") {
                    return flags.split_whitespace().any(|f| f == flag);
                }
            }
        }
        panic!("no mapping at {addr:#x}");
    }

    #[test]
    fn arriving_memory_asks_for_huge_pages_only_once_told() {
        let m = GuestMemory::without_huge_pages(8 << 20).unwrap();
        let at = m.host_addr() as usize;
        assert!(!vm_flag(at, "hg") && vm_flag(at, "nh"));
        m.advise_huge_pages();
        assert!(vm_flag(at, "hg") && !vm_flag(at, "nh"));
        let m = GuestMemory::new(8 << 20).unwrap();
        assert!(vm_flag(m.host_addr() as usize, "hg"));
    }

    #[test]
    fn guest_memory_stays_out_of_forked_children() {
        // `dc`: "do not copy area on fork" in /proc/self/smaps.
        for m in [
            GuestMemory::new(8 << 20).unwrap(),
            GuestMemory::without_huge_pages(8 << 20).unwrap(),
        ] {
            assert!(vm_flag(m.host_addr() as usize, "dc"));
        }
    }

    #[test]
    fn rejects_bad_sizes() {
        assert!(GuestMemory::new(0).is_err());
        assert!(GuestMemory::new(4095).is_err());
        assert!(GuestMemory::new(MAX_MEMORY_BYTES + 4096).is_err());
    }

    #[test]
    fn pages_round_trip() {
        let mem = GuestMemory::new(16 * PAGE_SIZE as u64).unwrap();
        assert_eq!(mem.pages(), 16);
        let page = vec![0xabu8; PAGE_SIZE];
        mem.write_page(PageIndex(3), &page);
        let mut out = vec![0u8; PAGE_SIZE];
        mem.read_page(PageIndex(3), &mut out);
        assert_eq!(out, page);
        mem.read_page(PageIndex(4), &mut out);
        assert!(out.iter().all(|&b| b == 0));
        mem.zero_page(PageIndex(3));
        mem.read_page(PageIndex(3), &mut out);
        assert!(out.iter().all(|&b| b == 0));
        mem.with_pages(2, 3, |s| assert_eq!(s.len(), 3 * PAGE_SIZE));
    }

    #[test]
    fn blocks_cover_every_filled_page_in_order_across_regions() {
        let mem = GuestMemory::new(64 * PAGE_SIZE as u64).unwrap();
        for i in 0..64 {
            mem.write_page(PageIndex(i), &vec![i as u8; PAGE_SIZE]);
        }
        let regions = [(3, 10), (20, 1), (40, 20), (0, 3), (13, 7), (21, 19)]
            .map(|(f, n)| PageRun::new(PageIndex(f), n));
        let fill = PageFill::new(&mem, &regions).unwrap();
        let mut seen = Vec::new();
        fill.for_each_block(&mut Vec::new(), |indices, bytes| {
            assert!(indices.len() <= PageFill::BLOCK_PAGES);
            assert_eq!(bytes.len(), indices.len() * PAGE_SIZE);
            for (&i, page) in indices.iter().zip(bytes.chunks_exact(PAGE_SIZE)) {
                assert!(page.iter().all(|&b| b == i.0 as u8), "page {i}");
                seen.push(i.0);
            }
        });
        let want: Vec<u64> = (3..13)
            .chain([20])
            .chain(40..60)
            .chain(0..3)
            .chain(13..20)
            .chain(21..40)
            .collect();
        assert_eq!(seen, want);
    }

    /// The address range of an smaps mapping header line (`lo-hi perms ...`).
    fn mapping_range(line: &str) -> Option<(usize, usize)> {
        let (range, _) = line.split_once(' ')?;
        let (lo, hi) = range.split_once('-')?;
        Some((
            usize::from_str_radix(lo, 16).ok()?,
            usize::from_str_radix(hi, 16).ok()?,
        ))
    }
    /// The VmFlags line of the mapping that holds `addr`, from /proc/self/smaps.
    fn vm_flags(addr: usize) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((lo, hi)) = mapping_range(line) {
                inside = (lo..hi).contains(&addr);
            } else if inside && line.starts_with("VmFlags:") {
                return line.to_string();
            }
        }
        panic!("no mapping holds {addr:#x}")
    }

    #[test]
    fn memory_asks_for_huge_pages() {
        let mem = GuestMemory::new(64 << 20).unwrap();
        let flags = vm_flags(mem.map.as_ptr() as usize);
        assert!(flags.split_whitespace().any(|f| f == "hg"), "{flags}");
    }

    #[test]
    fn resident_bytes_count_what_was_touched() {
        let mem = GuestMemory::new(64 << 20).unwrap();
        assert_eq!(mem.resident_bytes(), Some(0));
        for p in 0..1024 {
            mem.write_page(PageIndex(p), &[1u8; PAGE_SIZE]);
        }
        let rss = mem.resident_bytes().unwrap();
        // 4 MiB written; huge pages may back up to the 2 MiB boundaries around it.
        assert!((4 << 20..=8 << 20).contains(&rss), "{rss}");
        assert!(peak_rss_bytes().unwrap() >= rss);
        // Pages only read map the shared zero page: not this guest's.
        let small = GuestMemory::without_huge_pages(8 << 20).unwrap();
        small.write_page(PageIndex(0), &[1u8; PAGE_SIZE]);
        let mut page = [0u8; PAGE_SIZE];
        for p in 0..small.pages() {
            small.read_page(PageIndex(p), &mut page);
        }
        assert_eq!(small.resident_bytes(), Some(PAGE_SIZE as u64));
        // Counted a GiB at a time: a page in the third GiB of a lazy guest.
        let big = GuestMemory::new(3 << 30).unwrap();
        big.write_page(PageIndex(big.pages() - 1), &[1u8; PAGE_SIZE]);
        let rss = big.resident_bytes().unwrap();
        assert!((PAGE_SIZE as u64..=2 << 20).contains(&rss), "{rss}");
    }

    #[test]
    fn large_memory_is_lazy() {
        // 64 GiB of address space costs nothing until written: one page
        // written is backed by at most one huge page.
        let mem = GuestMemory::new(64 << 30).unwrap();
        assert_eq!(mem.resident_bytes(), Some(0));
        mem.write_page(PageIndex(mem.pages() - 1), &[1u8; PAGE_SIZE]);
        let rss = mem.resident_bytes().unwrap();
        assert!((PAGE_SIZE as u64..=2 << 20).contains(&rss), "{rss}");
    }

    #[test]
    fn saved_images_load_back_byte_for_byte_and_sparse() {
        let mem = GuestMemory::new(600 * PAGE_SIZE as u64).unwrap();
        let spec: FillSpec = "zero:50,text:25,random:25".parse().unwrap();
        spec.fill(&mem, 7, 1);
        let path = std::env::temp_dir().join(format!("ferry-save-{}", std::process::id()));
        let written = mem.save_image(&path).unwrap();
        assert!(written > 0 && written < 600, "{written}");
        let back = GuestMemory::from_image(&path).unwrap();
        use std::os::unix::fs::MetadataExt;
        let blocks = std::fs::metadata(&path).unwrap().blocks() * 512;
        std::fs::remove_file(&path).unwrap();
        assert_eq!(back.len_bytes(), mem.len_bytes());
        mem.with_pages(0, 600, |a| back.with_pages(0, 600, |b| assert!(a == b)));
        // Holes for zero pages (filesystems may round up a little).
        assert!(blocks < 600 * PAGE_SIZE as u64, "{blocks} bytes allocated");
    }

    #[test]
    fn an_image_changed_or_truncated_after_opening_changes_nothing() {
        let path = std::env::temp_dir().join(format!("ferry-trunc-{}", std::process::id()));
        std::fs::write(&path, vec![7u8; 64 * PAGE_SIZE]).unwrap();
        let mem = GuestMemory::from_image(&path).unwrap();
        // Another process rewrites and then truncates the file: a mapping of
        // it would show the change, then fault (SIGBUS) on the lost pages.
        std::fs::write(&path, vec![1u8; 64 * PAGE_SIZE]).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(PAGE_SIZE as u64)
            .unwrap();
        let mut page = vec![0u8; PAGE_SIZE];
        for p in 0..64 {
            mem.read_page(PageIndex(p), &mut page);
            assert!(page.iter().all(|&b| b == 7), "page {p} changed");
        }
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn an_image_is_never_written() {
        let path = std::env::temp_dir().join(format!("ferry-cow-{}", std::process::id()));
        std::fs::write(&path, vec![5u8; 4 * PAGE_SIZE]).unwrap();
        let mem = GuestMemory::from_image(&path).unwrap();
        mem.write_page(PageIndex(1), &[9u8; PAGE_SIZE]);
        let mut out = vec![0u8; PAGE_SIZE];
        mem.read_page(PageIndex(1), &mut out);
        assert!(out.iter().all(|&b| b == 9));
        let file = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(
            file.iter().all(|&b| b == 5),
            "the guest's write reached the file"
        );
        // Sizes are checked as for anonymous memory.
        let odd = std::env::temp_dir().join(format!("ferry-odd-{}", std::process::id()));
        std::fs::write(&odd, [1u8; 100]).unwrap();
        let err = GuestMemory::from_image(&odd).unwrap_err().to_string();
        std::fs::remove_file(&odd).unwrap();
        assert!(err.contains("multiple of 4 KiB"), "{err}");
    }

    #[test]
    fn image_round_trip() {
        let dir = std::env::temp_dir().join(format!("ferry-img-{}", std::process::id()));
        let mut data = vec![0u8; 8 * PAGE_SIZE];
        data[PAGE_SIZE * 2..PAGE_SIZE * 3].fill(7);
        data[PAGE_SIZE * 7 + 5] = 9;
        std::fs::write(&dir, &data).unwrap();
        let mem = GuestMemory::from_image(&dir).unwrap();
        std::fs::remove_file(&dir).unwrap();
        assert_eq!(mem.len_bytes(), data.len() as u64);
        mem.with_pages(0, 8, |s| assert_eq!(s, &data[..]));
    }
}
