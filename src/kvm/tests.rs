//! The VMM against the real `/dev/kvm`: skipped, saying so, where there is
//! none, but failed where `CI` is set (CI's machines have it).

use super::*;

fn kvm_here() -> bool {
    match available() {
        Ok(()) => true,
        Err(e) => {
            let why = format!(
                "the KVM guest needs /dev/kvm ({e}: {:?})",
                std::error::Error::source(&e)
            );
            assert!(std::env::var_os("CI").is_none(), "CI is set but {why}");
            eprintln!("SKIPPED: {why}");
            false
        }
    }
}

/// The pages the program writes in iterations `[from, to)`, and its
/// generator and cursor after them, replayed on the host.
fn replay(pattern: u64, span: u64, rng: &mut u64, cursor: &mut u64, n: u64) -> Vec<u64> {
    let mut pages = Vec::new();
    for _ in 0..n {
        let page = if pattern == program::PATTERN_SEQUENTIAL {
            let p = *cursor;
            *cursor = if p + 1 < span { p + 1 } else { 0 };
            p
        } else {
            let mut x = *rng;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *rng = x;
            ((u128::from(x) * u128::from(span)) >> 64) as u64
        };
        pages.push(page);
    }
    pages
}

fn workload(pattern: WorkloadPattern, rate: u64) -> Workload {
    Workload {
        pattern,
        dirty_rate: rate,
        seed: 7,
        ..Workload::default()
    }
}

fn dirty_set(guest: &KvmGuest) -> Vec<u64> {
    let mut snap = DirtySnapshot::new();
    guest.snapshot_dirty(&mut snap);
    let mut pages = Vec::new();
    for (first, count) in snap.runs() {
        pages.extend(first.0..first.0 + count);
    }
    pages
}

fn expected(pages: Vec<u64>, control: u64) -> Vec<u64> {
    let mut set: Vec<u64> = pages;
    set.push(control);
    set.sort_unstable();
    set.dedup();
    set
}

#[test]
fn the_dirty_log_holds_what_the_guest_wrote_and_nothing_the_host_did() {
    if !kvm_here() {
        return;
    }
    for pattern in [
        WorkloadPattern::Hot { bytes: 8 << 20 },
        WorkloadPattern::Sequential,
    ] {
        let mem = Arc::new(GuestMemory::new(32 << 20).unwrap());
        let guest = KvmGuest::start(mem.clone(), workload(pattern, 100_000_000)).unwrap();
        let l = *guest.layout();
        let (kind, span) = pattern_fields(guest.workload(), &l);
        // The host writes pages the guest never touches, while it runs.
        let untouched = l.data_pages - 1;
        mem.write_page(PageIndex(untouched), &[0x5a; PAGE_SIZE]);
        std::thread::sleep(Duration::from_millis(150));
        guest.pause();
        assert_eq!(guest.failure(), None);
        let c1 = guest.counter();
        assert!(c1 > 1000, "{pattern}: only {c1} writes in 150 ms");
        let mut rng = initial_rng(7);
        let mut cursor = 0;
        let first = expected(replay(kind, span, &mut rng, &mut cursor, c1), l.control);
        // The host's page is outside what the guest wrote, so an exact match
        // says it was not logged.
        assert!(
            !first.contains(&untouched),
            "{pattern}: reached {untouched}"
        );
        assert_eq!(dirty_set(&guest), first, "{pattern}: first snapshot");
        // The log was cleared: a second run logs only what it wrote.
        guest.resume();
        std::thread::sleep(Duration::from_millis(50));
        guest.pause();
        let c2 = guest.counter();
        assert!(c2 > c1);
        let second = replay(kind, span, &mut rng, &mut cursor, c2 - c1);
        assert_eq!(
            dirty_set(&guest),
            expected(second, l.control),
            "{pattern}: second snapshot"
        );
        // Paused: nothing more.
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(guest.counter(), c2);
        assert_eq!(dirty_set(&guest), Vec::<u64>::new());
    }
}

#[test]
fn a_vcpu_moved_to_a_second_vm_carries_on_exactly() {
    if !kvm_here() {
        return;
    }
    let mem = Arc::new(GuestMemory::new(16 << 20).unwrap());
    let a = KvmGuest::start(mem.clone(), workload(WorkloadPattern::Uniform, 100_000_000)).unwrap();
    std::thread::sleep(Duration::from_millis(60));
    a.pause();
    a.set_throttle(30);
    let state = a.save_state().unwrap();
    let bytes = serde_json::to_vec(&state).unwrap();
    let at_pause = a.counter();
    // A copy of the memory, as a destination would hold after the switchover.
    let mem2 = Arc::new(GuestMemory::new(mem.len_bytes()).unwrap());
    for p in 0..mem.pages() {
        mem.with_pages(p, 1, |b| mem2.write_page(PageIndex(p), b));
    }
    let b = KvmGuest::restore(mem2.clone(), &bytes).unwrap();
    assert!(!b.is_running());
    assert_eq!(b.counter(), at_pause);
    assert_eq!(b.throttle(), 30);
    b.resume();
    std::thread::sleep(Duration::from_millis(60));
    b.pause();
    assert_eq!(b.failure(), None);
    let after = b.counter();
    assert!(after > at_pause, "{after} <= {at_pause}");
    // The source's copy never ran again.
    assert_eq!(a.counter(), at_pause);
    // And the second VM went on with the same stream of pages.
    let (kind, span) = pattern_fields(a.workload(), a.layout());
    let mut rng = initial_rng(7);
    let mut cursor = 0;
    replay(kind, span, &mut rng, &mut cursor, at_pause);
    let next = replay(kind, span, &mut rng, &mut cursor, after - at_pause);
    assert_eq!(dirty_set(&b), expected(next, b.layout().control));
    // A state for other memory is refused.
    let small = Arc::new(GuestMemory::new(8 << 20).unwrap());
    let err = KvmGuest::restore(small, &bytes).unwrap_err().to_string();
    assert!(err.contains("layout"), "{err}");
    assert!(KvmGuest::restore(mem2, b"{}").is_err());
}

#[test]
fn pacing_and_the_throttle() {
    if !kvm_here() {
        return;
    }
    // 40 MB/s is ~9766 writes/s: ~2900 in 300 ms.
    let mem = Arc::new(GuestMemory::new(16 << 20).unwrap());
    let g = KvmGuest::start(mem, workload(WorkloadPattern::Uniform, 40_000_000)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let full = g.counter();
    assert!((1500..4500).contains(&full), "{full} writes in 300 ms");
    g.set_throttle(90);
    let before = g.counter();
    std::thread::sleep(Duration::from_millis(300));
    let throttled = g.counter() - before;
    assert!(throttled * 3 < full, "throttled {throttled} vs {full}");
    // An idle guest's counter still grows, and it dirties only its control page.
    let mem = Arc::new(GuestMemory::new(8 << 20).unwrap());
    let idle = KvmGuest::start(mem, workload(WorkloadPattern::Idle, 0)).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    idle.pause();
    assert!(idle.counter() > 0);
    assert_eq!(dirty_set(&idle), vec![idle.layout().control]);
}

#[test]
fn runs_whatever_memory_held_before() {
    if !kvm_here() {
        return;
    }
    // All-ones memory under the TSS once made the port exit fault (an I/O
    // bitmap of ones): the layout writes every page the CPU reads.
    let mem = Arc::new(GuestMemory::new(8 << 20).unwrap());
    for p in 0..mem.pages() {
        mem.write_page(PageIndex(p), &[0xff; PAGE_SIZE]);
    }
    let g = KvmGuest::start(mem, workload(WorkloadPattern::Uniform, 100_000_000)).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let c = g.counter();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(g.failure(), None);
    assert!(g.counter() > c && c > 0, "{c} then {}", g.counter());
}
