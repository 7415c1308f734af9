//! A failback's starting memory: the image a session's setup offers as its
//! base, checked and taken as the guest's memory (a warm copy) or copied
//! into it (a file) before the setup is answered, so that round 0 need
//! carry only the pages that changed.

use crate::digest::{page_hash, zero_page_hash, PageHashes};
use crate::memory::{GuestMemory, PAGE_SIZE};
use crate::migration::retained::Retained;
use crate::page::PageIndex;
use crate::wire::DeltaBase;
use std::sync::Arc;

/// Pages read at once from a file: 1 MiB.
const STEP_PAGES: u64 = 256;

/// Where a base's pages come from.
pub enum BaseImage {
    /// A retained image's file: copied in, each page checked against its
    /// hash as read.
    File(Retained),
    /// A warm copy, the memory the VM left with still held as it was: taken
    /// over as the guest's memory without a copy (fresh memory's first
    /// touch costs more than the transfer it saves), its digest checked.
    /// The caller gives it up: no one else may use it.
    Memory(Arc<GuestMemory>),
}

impl std::fmt::Debug for BaseImage {
    /// Names the kind and the size, not the pages.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self {
            Self::File(_) => "File",
            Self::Memory(_) => "Memory",
        };
        write!(f, "BaseImage::{kind}({} bytes)", self.memory_bytes())
    }
}

impl BaseImage {
    fn memory_bytes(&self) -> u64 {
        match self {
            Self::File(r) => r.memory(),
            Self::Memory(m) => m.len_bytes(),
        }
    }
}

/// Copies the retained image `image` into `memory` and records its pages in
/// `hashes`, if it is the base the setup offers: the same size and digest,
/// every page matching its hash as read. Returns the pages with content
/// taken from it (its zero pages are fresh memory's already). On any
/// failure the memory and hashes are as fresh (all zero) again and the
/// reason is returned: the session then sends every page.
pub(crate) fn prefill(
    memory: &GuestMemory,
    hashes: &PageHashes,
    image: &Retained,
    base: &DeltaBase,
) -> Result<u64, String> {
    if image.memory() != memory.len_bytes() {
        return Err(format!(
            "the kept image holds {} bytes, the guest {}",
            image.memory(),
            memory.len_bytes()
        ));
    }
    // Checked first: a stale file is not read at all.
    if image.digest() != base.digest {
        return Err(format!(
            "the kept image's digest {:016x} is not the offered base's {:016x}",
            image.digest(),
            base.digest
        ));
    }
    let taken = from_file(memory, hashes, image).inspect_err(|_| undo(memory, hashes))?;
    if hashes.digest() != base.digest {
        undo(memory, hashes);
        return Err("the kept image's pages do not make its digest".into());
    }
    Ok(taken)
}

/// Takes `memory`, a warm copy of what the VM left with, as the guest's
/// memory as it is: its pages hashed into `hashes` and their digest checked
/// against the offered base's. Returns the pages with content; on a
/// mismatch `hashes` are all zero again and the reason is returned.
pub(super) fn adopt(
    memory: &GuestMemory,
    hashes: &PageHashes,
    base: &DeltaBase,
) -> Result<u64, String> {
    let mut buf = vec![0u8; PAGE_SIZE];
    let mut taken = 0;
    for i in 0..memory.pages() {
        let index = PageIndex(i);
        if !memory.read_page_unless_zero(index, &mut buf) {
            hashes.set(index, page_hash(&buf));
            taken += 1;
        }
    }
    let digest = hashes.digest();
    if digest != base.digest {
        let zero = zero_page_hash();
        for i in 0..memory.pages() {
            hashes.set(PageIndex(i), zero);
        }
        return Err(format!(
            "the warm copy's digest {digest:016x} is not the offered base's {:016x}",
            base.digest
        ));
    }
    Ok(taken)
}

fn from_file(memory: &GuestMemory, hashes: &PageHashes, image: &Retained) -> Result<u64, String> {
    let zero = zero_page_hash();
    let pages = image.hashes().len() as u64;
    let mut buf = vec![0u8; STEP_PAGES as usize * PAGE_SIZE];
    let mut taken = 0;
    let mut first = 0;
    while first < pages {
        // A step's pages in one read (its holes read as zeros, without I/O).
        let count = STEP_PAGES.min(pages - first);
        let step = &image.hashes()[first as usize..(first + count) as usize];
        if step.iter().any(|&h| h != zero) {
            let bytes = &mut buf[..count as usize * PAGE_SIZE];
            image
                .pages(first, count, bytes)
                .map_err(|e| e.to_string())?;
            for (i, (&h, page)) in step.iter().zip(bytes.chunks_exact(PAGE_SIZE)).enumerate() {
                // Fresh memory is zero already.
                if h != zero {
                    let index = PageIndex(first + i as u64);
                    memory.write_page(index, page);
                    hashes.set(index, h);
                    taken += 1;
                }
            }
        }
        first += count;
    }
    Ok(taken)
}

/// Zeroes every page a failed prefill may have written.
fn undo(memory: &GuestMemory, hashes: &PageHashes) {
    let zero = zero_page_hash();
    for (i, h) in hashes.to_vec().into_iter().enumerate() {
        if h != zero {
            memory.zero_page(PageIndex(i as u64));
            hashes.set(PageIndex(i as u64), zero);
        }
    }
}
