//! A failback's starting memory: the retained image a session's setup
//! offers, checked and copied into the guest's memory before the setup is
//! answered, so that round 0 need carry only the pages that changed.

use crate::digest::{zero_page_hash, PageHashes};
use crate::memory::{GuestMemory, PAGE_SIZE};
use crate::migration::retained::Retained;
use crate::page::PageIndex;
use crate::wire::DeltaBase;

/// Copies `image` into `memory` and records its pages in `hashes`, if it is
/// the base the setup offers: the same size and digest, and every page
/// matching its hash as read. Returns the pages with content taken from it
/// (its zero pages are fresh memory's already). On any
/// failure the memory and hashes are as fresh (all zero) again and the
/// reason is returned: the session then sends every page.
pub(super) fn prefill(
    memory: &GuestMemory,
    hashes: &PageHashes,
    image: &Retained,
    base: &DeltaBase,
) -> Result<u64, String> {
    if image.memory() != memory.len_bytes() {
        return Err(format!(
            "the retained image holds {} bytes, the guest {}",
            image.memory(),
            memory.len_bytes()
        ));
    }
    if image.digest() != base.digest {
        return Err(format!(
            "the retained image's digest {:016x} is not the offered base's {:016x}",
            image.digest(),
            base.digest
        ));
    }
    let zero = zero_page_hash();
    let mut buf = vec![0u8; PAGE_SIZE];
    let mut taken = 0;
    for (i, &h) in image.hashes().iter().enumerate() {
        let index = PageIndex(i as u64);
        if h == zero {
            // Fresh memory is zero already.
            continue;
        }
        if let Err(e) = image.page(index, &mut buf) {
            undo(memory, hashes, &image.hashes()[..i]);
            return Err(e.to_string());
        }
        memory.write_page(index, &buf);
        hashes.set(index, h);
        taken += 1;
    }
    Ok(taken)
}

/// Zeroes the pages a failed prefill wrote.
fn undo(memory: &GuestMemory, hashes: &PageHashes, written: &[u64]) {
    let zero = zero_page_hash();
    for (i, &h) in written.iter().enumerate() {
        if h != zero {
            memory.zero_page(PageIndex(i as u64));
            hashes.set(PageIndex(i as u64), zero);
        }
    }
}
