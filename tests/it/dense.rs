//! Dense pages over real sockets: a page identical to one the destination
//! already holds from this round travels as a reference, one that shares
//! runs of bytes with a region it holds at another offset as a patch; the
//! destination's memory still matches the source's byte for byte, and
//! `dense: false` (or a destination that does not take references) sends
//! every page's bytes.

use crate::common;

use common::*;
use ferry::codec::Codec;
use ferry::memory::{FillSpec, WorkloadPattern, PAGE_SIZE};
use ferry::migration::{MigrationConfig, Outcome, Report};
use ferry::page::PageIndex;

const MIB: u64 = 1 << 20;

/// Migrates a 128 MiB guest whose last 16 MiB copy its first 16 MiB from
/// byte `shift` on (the first 8 MiB of which it keeps writing) with `dense`
/// on or off; checks the destination's memory against the source's.
fn migrate_with_copies(dense: bool, codec: Codec) -> Report {
    migrate_with_shifted_copies(dense, codec, 0)
}

fn migrate_with_shifted_copies(dense: bool, codec: Codec, shift: usize) -> Report {
    let g = guest(
        128 * MIB,
        FillSpec::default(),
        WorkloadPattern::Hot { bytes: 8 * MIB },
        20_000_000,
    );
    let mem = g.memory();
    let copies = 16 * MIB / PAGE_SIZE as u64;
    let last = mem.pages() - copies;
    let mut two = vec![0u8; 2 * PAGE_SIZE];
    for i in 0..copies {
        mem.read_page(PageIndex(i), &mut two[..PAGE_SIZE]);
        mem.read_page(PageIndex(i + 1), &mut two[PAGE_SIZE..]);
        mem.write_page(PageIndex(last + i), &two[shift..shift + PAGE_SIZE]);
    }
    let (src, dst) = migrate_paused(
        &g,
        MigrationConfig {
            channels: 4,
            codec: codec.into(),
            dense,
            ..MigrationConfig::default()
        },
    );
    assert_eq!(src.outcome, Outcome::Completed, "{:?}", src.error);
    assert_eq!(
        dst.report.outcome,
        Outcome::Completed,
        "{:?}",
        dst.report.error
    );
    assert!(src.verified && dst.report.verified);
    let dm = dst.memory.as_ref().unwrap();
    assert_eq!(first_difference(g.memory(), dm), None, "memories differ");
    assert_eq!(src.pages, dst.report.pages, "both sides count the same");
    src
}

#[test]
fn pages_the_destination_holds_go_as_references_and_memory_matches() {
    let _serial = serial();
    for codec in [Codec::None, Codec::Lz4] {
        let dense = migrate_with_copies(true, codec);
        let plain = migrate_with_copies(false, codec);
        // The unwritten half of the copied 16 MiB, at the least, less its
        // zero pages.
        assert!(
            dense.pages.referenced > 1000,
            "{codec}: {} pages referenced",
            dense.pages.referenced
        );
        assert_eq!(plain.pages.referenced, 0, "{codec}");
        let p = &dense.pages;
        assert_eq!(p.zero + p.raw + p.compressed + p.referenced, p.total);
        assert!(
            dense.wire_bytes < plain.wire_bytes,
            "{codec}: {} bytes dense, {} without",
            dense.wire_bytes,
            plain.wire_bytes
        );
    }
}

#[test]
fn pages_sharing_bytes_at_another_offset_go_as_patches_and_memory_matches() {
    let _serial = serial();
    for codec in [Codec::Lz4, Codec::Zstd { level: 1 }] {
        let dense = migrate_with_shifted_copies(true, codec, 1000);
        let plain = migrate_with_shifted_copies(false, codec, 1000);
        // Shifted, the copies match no page whole: no reference finds them.
        assert!(
            dense.pages.patched > 1000,
            "{codec}: {} pages patched, {} referenced",
            dense.pages.patched,
            dense.pages.referenced
        );
        assert_eq!(plain.pages.patched, 0, "{codec}");
        let p = &dense.pages;
        assert_eq!(p.zero + p.raw + p.compressed + p.referenced, p.total);
        assert!(p.patched <= p.raw + p.compressed);
        assert!(
            dense.wire_bytes < plain.wire_bytes,
            "{codec}: {} bytes dense, {} without",
            dense.wire_bytes,
            plain.wire_bytes
        );
    }
    // `none` asks for no CPU beyond a copy: no search.
    let none = migrate_with_shifted_copies(true, Codec::None, 1000);
    assert_eq!(none.pages.patched, 0);
}
