//! Failback by delta over real sockets: a destination holding the image the
//! guest arrived with starts from it and round 0 carries only the pages
//! that changed since; a damaged, stale or missing image falls back to a
//! full transfer, verified the same; `delta = false` offers nothing. Every
//! case ends byte for byte.

use crate::common;

use common::agents::Dir;
use common::*;
use ferry::memory::{FillSpec, GuestMemory, WorkloadPattern, PAGE_SIZE};
use ferry::migration::delta::Base;
use ferry::migration::retained::{self, Retained};
use ferry::migration::{MigrationConfig, Outcome, Report};
use ferry::page::PageIndex;
use ferry::transport::{migrate_over_loopback, BaseImage, Incoming, ReceiverConfig, RunContext};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

const MIB: u64 = 1 << 20;

/// A running guest, the image of its memory written at one moment (as the
/// node it left would keep it) and the base that moment makes; the guest
/// runs on for a while afterwards.
fn left_and_ran_on(dir: &Path) -> (Arc<ferry::memory::SyntheticGuest>, PathBuf, Base) {
    let g = guest(
        64 * MIB,
        FillSpec::default(),
        WorkloadPattern::Hot { bytes: 4 * MIB },
        20_000_000,
    );
    g.pause();
    let path = dir.join("web.retained");
    retained::write(g.memory(), &path, &|| false).unwrap();
    let kept = Retained::open(&path, 1 << 30).unwrap();
    let base = Base::new("m-1".into(), "b".into(), kept.hashes().into());
    // Pages with content zeroed since: round 0 sends them as zero pages,
    // which must clear the image's copy there.
    let zero = ferry::digest::zero_page_hash();
    for (i, _) in kept
        .hashes()
        .iter()
        .enumerate()
        .filter(|(_, &h)| h != zero)
        .take(3)
    {
        g.memory().zero_page(ferry::page::PageIndex(i as u64));
    }
    g.resume();
    std::thread::sleep(Duration::from_millis(200));
    (g, path, base)
}

/// Migrates `g` offering `base`, to a receiver that finds its image in
/// `image`; the guest is left paused there.
fn failback(
    g: &Arc<ferry::memory::SyntheticGuest>,
    base: &Base,
    delta: bool,
    image: PathBuf,
) -> (Report, Incoming) {
    failback_from(g, base, delta, move || {
        Retained::open(&image, 1 << 30)
            .map(BaseImage::File)
            .map_err(|e| e.to_string())
    })
}

/// Migrates `g` offering `base`, to a receiver whose image is `image()`.
fn failback_from(
    g: &Arc<ferry::memory::SyntheticGuest>,
    base: &Base,
    delta: bool,
    image: impl Fn() -> Result<BaseImage, String> + Send + Sync + 'static,
) -> (Report, Incoming) {
    let config = MigrationConfig {
        leave_paused: true,
        base: Some(base.clone()),
        delta,
        ..MigrationConfig::default()
    };
    let receiver = ReceiverConfig {
        delta_base: Some(Arc::new(move |_setup| image())),
        ..ReceiverConfig::default()
    };
    let (src, dst) = migrate_over_loopback(g.clone(), &config, RunContext::default(), receiver)
        .expect("loopback");
    (src, dst.expect("the destination reports every session"))
}

/// Both sides completed and verified, the memories equal byte for byte.
fn arrived_whole(g: &Arc<ferry::memory::SyntheticGuest>, src: &Report, dst: &Incoming) {
    assert_eq!(src.outcome, Outcome::Completed, "{:?}", src.error);
    assert_eq!(
        dst.report.outcome,
        Outcome::Completed,
        "{:?}",
        dst.report.error
    );
    assert!(src.verified && dst.report.verified);
    let there = dst.memory.as_ref().unwrap();
    assert_eq!(first_difference(g.memory(), there), None);
}

#[test]
fn a_failback_to_the_kept_image_sends_only_what_changed() {
    let _serial = serial();
    let dir = Dir::new("delta-kept");
    let (g, path, base) = left_and_ran_on(dir.path());
    let pages = g.memory().pages();
    let (src, dst) = failback(&g, &base, true, path);
    arrived_whole(&g, &src, &dst);
    assert_eq!(src.delta.base.as_deref(), Some("m-1"));
    assert!(
        src.delta.used && dst.report.delta.used,
        "{:?}",
        dst.report.delta
    );
    // A 4 MiB hot set written for 200 ms: at most 1024 pages changed, the
    // rest were left out of round 0.
    assert!(src.delta.pages_skipped >= pages - 1024, "{:?}", src.delta);
    assert!(src.pages.total < pages / 4, "{:?}", src.pages);
    assert!(dst.report.delta.pages_skipped > 0);
    // What arrived is the next failback's base: the hashes of every page.
    let hashes = dst.hashes.as_ref().expect("a completed session's hashes");
    assert_eq!(hashes.len() as u64, pages);
    let digest = ferry::digest::full_digest(dst.memory.as_ref().unwrap(), 2);
    assert_eq!(ferry::digest::digest_of_hashes(hashes), digest);
}

/// The memory an image holds, as a node keeps it warm.
fn warm_copy(path: &Path) -> Arc<GuestMemory> {
    let kept = Retained::open(path, 1 << 30).unwrap();
    let held = Arc::new(GuestMemory::new(kept.memory()).unwrap());
    let mut page = vec![0u8; PAGE_SIZE];
    for i in 0..held.pages() {
        kept.page(PageIndex(i), &mut page).unwrap();
        held.write_page(PageIndex(i), &page);
    }
    held
}

#[test]
fn a_warm_copy_is_taken_over_as_the_guests_memory_without_a_copy() {
    let _serial = serial();
    let dir = Dir::new("delta-memory");
    let (g, path, base) = left_and_ran_on(dir.path());
    let held = warm_copy(&path);
    let image = std::sync::Mutex::new(Some(held.clone()));
    let take = move || Ok(BaseImage::Memory(image.lock().unwrap().take().unwrap()));
    let (src, dst) = failback_from(&g, &base, true, take);
    arrived_whole(&g, &src, &dst);
    assert!(
        src.delta.used && dst.report.delta.used,
        "{:?}",
        dst.report.delta
    );
    assert!(src.delta.pages_skipped > g.memory().pages() / 2);
    assert!(
        Arc::ptr_eq(dst.memory.as_ref().unwrap(), &held),
        "taken over, not copied"
    );
    // A copy that is not the base (one page changed) is declined by its
    // digest, and the guest still arrives whole in fresh memory.
    let other = warm_copy(&path);
    other.write_page(PageIndex(5), &[0x77; PAGE_SIZE]);
    g.resume();
    let image = std::sync::Mutex::new(Some(other.clone()));
    let take = move || Ok(BaseImage::Memory(image.lock().unwrap().take().unwrap()));
    let (src, dst) = failback_from(&g, &base, true, take);
    arrived_whole(&g, &src, &dst);
    assert!(!src.delta.used);
    assert!(!Arc::ptr_eq(dst.memory.as_ref().unwrap(), &other));
    let why = dst.report.delta.declined.clone().unwrap_or_default();
    assert!(why.contains("digest"), "{why}");
}

#[test]
fn a_damaged_image_is_declined_and_every_page_sent() {
    let _serial = serial();
    let dir = Dir::new("delta-damaged");
    let (g, path, base) = left_and_ran_on(dir.path());
    // One byte of the last page with content, changed on disk: its hash
    // no longer matches when the image is read.
    let kept = Retained::open(&path, 1 << 30).unwrap();
    let zero = ferry::digest::zero_page_hash();
    let last = kept.hashes().iter().rposition(|&h| h != zero).unwrap() as u64;
    let offset =
        std::fs::metadata(&path).unwrap().len() - kept.memory() + last * PAGE_SIZE as u64 + 17;
    drop(kept);
    flip(&path, offset);
    let (src, dst) = failback(&g, &base, true, path);
    arrived_whole(&g, &src, &dst);
    assert!(!src.delta.used && !dst.report.delta.used);
    let why = dst.report.delta.declined.as_deref().unwrap_or_default();
    assert!(why.contains("hash"), "{why}");
    assert_eq!(src.round_log[0].pages, g.memory().pages());
}

#[test]
fn a_stale_image_or_none_at_all_is_declined() {
    let _serial = serial();
    let dir = Dir::new("delta-stale");
    let (g, path, base) = left_and_ran_on(dir.path());
    // The image written again after the guest ran on: not the base offered.
    g.pause();
    retained::write(g.memory(), &path, &|| false).unwrap();
    g.resume();
    let (src, dst) = failback(&g, &base, true, path);
    arrived_whole(&g, &src, &dst);
    assert!(!src.delta.used);
    let why = dst.report.delta.declined.clone().unwrap_or_default();
    assert!(why.contains("digest"), "{why}");
    // A receiver without the image.
    g.resume();
    let (src, dst) = failback(&g, &base, true, dir.path().join("none.retained"));
    arrived_whole(&g, &src, &dst);
    assert!(!src.delta.used && dst.report.delta.declined.is_some());
}

#[test]
fn an_idle_guest_fails_back_with_nothing_to_send() {
    let _serial = serial();
    let dir = Dir::new("delta-idle");
    let g = guest(32 * MIB, FillSpec::default(), WorkloadPattern::Idle, 0);
    g.pause();
    let path = dir.path().join("web.retained");
    retained::write(g.memory(), &path, &|| false).unwrap();
    let kept = Retained::open(&path, 1 << 30).unwrap();
    let base = Base::new("m-1".into(), "b".into(), kept.hashes().into());
    g.resume();
    // Round 0 sends nothing, and the pause follows at once.
    let (src, dst) = failback(&g, &base, true, path);
    arrived_whole(&g, &src, &dst);
    assert!(src.delta.used);
    assert_eq!(src.round_log[0].pages, 0, "{:?}", src.round_log);
    assert_eq!(src.rounds, 1, "{:?}", src.round_log);
}

#[test]
fn delta_off_offers_no_base() {
    let _serial = serial();
    let dir = Dir::new("delta-off");
    let (g, path, base) = left_and_ran_on(dir.path());
    let (src, dst) = failback(&g, &base, false, path);
    arrived_whole(&g, &src, &dst);
    assert_eq!(src.delta.base, None);
    assert_eq!(dst.report.delta, Default::default());
    assert_eq!(src.round_log[0].pages, g.memory().pages());
}

/// Flips one byte of `path` at `offset`.
fn flip(path: &Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, offset).unwrap();
    f.write_all_at(&[b[0] ^ 0x5a], offset).unwrap();
}
