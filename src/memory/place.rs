//! Pages read from the network straight into guest memory: a batch's data
//! regions filled in order by `readv`, with no staging buffer.

use super::*;

/// Page runs of a [`GuestMemory`] that a receiver
/// fills in order with bytes from the network: the data pages of a raw batch,
/// read straight from the socket into the guest, without a staging buffer.
///
/// Every region is checked to lie inside the guest when the set is made; the
/// fill position only moves forward and never past the end.
#[derive(Debug)]
pub struct PageFill<'a> {
    memory: &'a GuestMemory,
    regions: &'a [PageRun],
    /// Bytes filled so far, across the regions.
    done: usize,
    total: usize,
}

impl<'a> PageFill<'a> {
    /// Regions of `memory` to fill; `None` if one lies outside the guest.
    pub fn new(memory: &'a GuestMemory, regions: &'a [PageRun]) -> Option<Self> {
        let mut total = 0usize;
        for &PageRun { first, count } in regions {
            let end = first.0.checked_add(count.into())?;
            if end > memory.pages {
                return None;
            }
            total += (count as usize) << PAGE_SHIFT;
        }
        Some(Self {
            memory,
            regions,
            done: 0,
            total,
        })
    }

    /// Bytes still to fill.
    pub fn remaining(&self) -> usize {
        self.total - self.done
    }

    /// The unfilled parts of the regions, as `(pointer, length)`, at most `max`.
    fn pending(&self, max: usize) -> Vec<(*mut u8, usize)> {
        let mut out = Vec::new();
        let mut skip = self.done;
        for &PageRun { first, count } in self.regions {
            let len = (count as usize) << PAGE_SHIFT;
            if skip >= len {
                skip -= len;
                continue;
            }
            // Inside the mapping: the region was checked in `new`, skip < len.
            let ptr = self.memory.page_ptr(first.0).wrapping_add(skip);
            out.push((ptr, len - skip));
            skip = 0;
            if out.len() == max {
                break;
            }
        }
        out
    }

    /// Copies bytes that arrived buffered; returns how many were taken (at most
    /// [`PageFill::remaining`]).
    pub fn copy_from(&mut self, mut src: &[u8]) -> usize {
        let mut taken = 0;
        for (ptr, len) in self.pending(usize::MAX) {
            if src.is_empty() {
                break;
            }
            let n = len.min(src.len());
            store_bytes(ptr, &src[..n]);
            src = &src[n..];
            taken += n;
        }
        self.done += taken;
        taken
    }

    /// One `readv(2)` from `fd` into the unfilled parts of the regions; returns
    /// the bytes read (0 at end of stream). Errors are the system call's,
    /// `WouldBlock` included, for the caller's readiness loop.
    #[allow(unsafe_code)]
    pub fn read_from(&mut self, fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<usize> {
        use std::os::fd::AsRawFd;
        // Linux's IOV_MAX.
        let iov: Vec<libc::iovec> = self
            .pending(1024)
            .into_iter()
            .map(|(ptr, len)| libc::iovec {
                iov_base: ptr.cast(),
                iov_len: len,
            })
            .collect();
        if iov.is_empty() {
            return Ok(0);
        }
        // SAFETY: every iovec covers writable bytes inside the mapping, which
        // outlives this call (see copy_from); the kernel writes at most the sum
        // of their lengths and returns how many it wrote.
        let n = unsafe { libc::readv(fd.as_raw_fd(), iov.as_ptr(), iov.len() as libc::c_int) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let n = n as usize;
        debug_assert!(n <= self.remaining());
        self.done += n;
        Ok(n)
    }

    /// Runs `f` over the filled pages in order (after the fill: checksums,
    /// tags and hashes), up to [`PageFill::BLOCK_PAGES`] at a time: their
    /// indices and a copy of their bytes, one after the other. One copy per
    /// page serves every pass over it.
    /// `scratch` holds the copies (grown to a block once, then reused).
    pub fn for_each_block(&self, scratch: &mut Vec<u8>, mut f: impl FnMut(&[PageIndex], &[u8])) {
        scratch.resize(Self::BLOCK_PAGES * PAGE_SIZE, 0);
        let bytes = scratch;
        let mut indices = Vec::with_capacity(Self::BLOCK_PAGES);
        let pages = self.regions.iter().flat_map(PageRun::pages);
        for index in pages {
            let k = indices.len();
            self.memory
                .read_page(index, &mut bytes[k * PAGE_SIZE..(k + 1) * PAGE_SIZE]);
            indices.push(index);
            if indices.len() == Self::BLOCK_PAGES {
                f(&indices, bytes);
                indices.clear();
            }
        }
        if !indices.is_empty() {
            f(&indices, &bytes[..indices.len() * PAGE_SIZE]);
        }
    }

    /// Pages per block of [`PageFill::for_each_block`] (64 KiB: large
    /// enough that a check's per-call cost vanishes, small enough for L2).
    pub const BLOCK_PAGES: usize = 16;
}

/// Stores `src` at `dst` (inside guest memory, checked by the caller) with
/// atomic stores: bytes up to an 8-byte boundary, then words, then bytes.
#[allow(unsafe_code)]
fn store_bytes(dst: *mut u8, src: &[u8]) {
    let head = dst.align_offset(8).min(src.len());
    let (bytes, rest) = src.split_at(head);
    // SAFETY (all three loops): `dst..dst + src.len()` lies inside the guest
    // mapping (PageFill::new checked the regions and pending() stays inside
    // them), which outlives this call; the words are 8-aligned by
    // construction (head brings `dst` to a boundary); atomics of any width
    // may alias guest memory (see GuestMemory::words).
    for (i, b) in bytes.iter().enumerate() {
        unsafe { std::sync::atomic::AtomicU8::from_ptr(dst.add(i)) }.store(*b, Ordering::Relaxed);
    }
    let at = unsafe { dst.add(head) };
    let mut words = rest.chunks_exact(8);
    for (i, w) in (&mut words).enumerate() {
        let word = u64::from_ne_bytes(w.try_into().expect("8 bytes"));
        unsafe { AtomicU64::from_ptr(at.add(i * 8).cast()) }.store(word, Ordering::Relaxed);
    }
    let tail = words.remainder();
    let at = unsafe { at.add(rest.len() - tail.len()) };
    for (i, b) in tail.iter().enumerate() {
        unsafe { std::sync::atomic::AtomicU8::from_ptr(at.add(i)) }.store(*b, Ordering::Relaxed);
    }
}
