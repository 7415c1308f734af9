//! Helpers shared by the integration tests: guests, loopback migrations, and
//! byte-for-byte memory comparison.
#![allow(dead_code)]

pub mod agents;
pub mod browser;
pub mod etcd;
pub mod procs;
pub mod proxy;

use ferry::memory::{FillSpec, GuestMemory, SyntheticGuest, Workload, WorkloadPattern, PAGE_SIZE};
use ferry::migration::{MigrationConfig, Report};
use ferry::transport::{migrate_over_loopback, Incoming, ReceiverConfig, RunContext};
use std::sync::{Arc, Mutex, MutexGuard};

/// A part a test needs is missing here (`/dev/kvm`, root, iproute2): with
/// `CI` set the test fails, since CI's machines have every part; elsewhere
/// it says so and the caller skips.
pub fn missing(what: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("CI is set but this test's part is missing: {what}");
    }
    eprintln!("SKIPPED: {what}");
}

/// Whether `cmd --version` runs here; with `CI` set a missing `what` fails
/// the test.
pub fn tool_available(cmd: &str, what: &str) -> bool {
    let found = std::process::Command::new(cmd)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        missing(what);
    }
    found
}

/// Migrations in one test binary run one at a time: they share two cores and
/// some tests measure time.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

pub const SEED: u64 = 7;

/// A running synthetic guest with `fill` content.
pub fn guest(
    memory: u64,
    fill: FillSpec,
    pattern: WorkloadPattern,
    dirty_rate: u64,
) -> Arc<SyntheticGuest> {
    let mem = Arc::new(GuestMemory::new(memory).unwrap());
    fill.fill(&mem, SEED, 2);
    Arc::new(SyntheticGuest::start(
        mem,
        Workload {
            pattern,
            dirty_rate,
            content: fill,
            writers: 1,
            seed: SEED,
        },
    ))
}

/// Migrates over loopback, leaving the guest paused on the destination so its
/// memory can be compared with the source's paused copy.
pub fn migrate_paused(guest: &Arc<SyntheticGuest>, config: MigrationConfig) -> (Report, Incoming) {
    let config = MigrationConfig {
        leave_paused: true,
        ..config
    };
    let (report, incoming) = migrate_over_loopback(
        guest.clone(),
        &config,
        RunContext::default(),
        ReceiverConfig::default(),
    )
    .unwrap();
    (
        report,
        incoming.expect("the destination reports every session"),
    )
}

/// Index of the first page where two memories differ.
pub fn first_difference(a: &GuestMemory, b: &GuestMemory) -> Option<u64> {
    assert_eq!(a.pages(), b.pages(), "memory sizes differ");
    a.with_pages(0, a.pages(), |x| {
        b.with_pages(0, b.pages(), |y| {
            x.chunks_exact(PAGE_SIZE)
                .zip(y.chunks_exact(PAGE_SIZE))
                .position(|(p, q)| p != q)
                .map(|i| i as u64)
        })
    })
}

/// Whether pages `[from, to)` still hold their initial fill content.
pub fn holds_initial_fill(mem: &GuestMemory, fill: &FillSpec, from: u64, to: u64) -> bool {
    const EXT: u64 = ferry::memory::FILL_EXTENT_PAGES;
    let mut buf = vec![0u8; EXT as usize * PAGE_SIZE];
    let extents = mem.pages().div_ceil(EXT);
    let mut ext = from / EXT;
    while ext * EXT < to {
        let first = ext * EXT;
        let n = EXT.min(mem.pages() - first);
        let out = &mut buf[..n as usize * PAGE_SIZE];
        fill.generate_extent(SEED, ext, extents, out);
        for i in 0..n {
            let p = first + i;
            if p < from || p >= to {
                continue;
            }
            let same = mem.with_pages(p, 1, |page| {
                page == &out[i as usize * PAGE_SIZE..(i as usize + 1) * PAGE_SIZE]
            });
            if !same {
                return false;
            }
        }
        ext += 1;
    }
    true
}

/// Parses a report line and checks it carries every contract field.
pub fn parse_report(line: &str) -> serde_json::Value {
    let v: serde_json::Value =
        serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    for key in [
        "outcome",
        "error",
        "memory_use",
        "verified",
        "verify",
        "verify_ms",
        "memory_bytes",
        "pages",
        "rounds",
        "total_ms",
        "setup_ms",
        "downtime_ms",
        "guest_bytes_sent",
        "wire_bytes",
        "compression_ratio",
        "throughput_guest_bps",
        "throughput_wire_bps",
        "dirty_rate_bps",
        "throttle_pct_max",
        "channels",
        "codec",
        "max_bandwidth_bps",
        "cpu_ms",
        "guest",
        "guest_counter_at_pause",
        "guest_counter_after_resume",
    ] {
        assert!(v.get(key).is_some(), "report lacks {key}: {line}");
    }
    for key in ["total", "zero", "raw", "compressed"] {
        assert!(v["pages"][key].is_u64(), "pages.{key}");
    }
    assert!(v["cpu_ms"].get("source").is_some() && v["cpu_ms"].get("destination").is_some());
    assert!(v["compression_ratio"].is_number());
    v
}

/// A TCP port nothing listens on now (for addresses a test must name up front).
pub fn free_port() -> u16 {
    // Not from the kernel's ephemeral range (32768 and up by default): an
    // outgoing connection of a test running beside this one could take
    // such a port between this check and its use. Below it, one counter
    // for the whole test binary hands each port out once.
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id() % SPAN;
    for _ in 0..SPAN {
        let port = (LOW + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port from {LOW} to {}", LOW + SPAN)
}
