//! A whole migration of an idle 1 GiB guest over loopback, beside the physical
//! limit of the same path: raw TCP over the same number of loopback connections;
//! the same for a KVM guest, and the KVM dirty log's sync (where /dev/kvm works).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ferry::memory::{FillSpec, GuestMemory, SyntheticGuest, Workload, WorkloadPattern};
use ferry::migration::{MigratableGuest, MigrationConfig, Outcome};
use ferry::transport::{migrate_over_loopback, ReceiverConfig, RunContext};
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

const GIB: u64 = 1 << 30;
const CHANNELS: usize = 4;

/// Moves `GIB` bytes over `CHANNELS` loopback TCP connections, 1 MiB writes.
fn raw_tcp() -> Duration {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let per = GIB as usize / CHANNELS;
    let readers = std::thread::spawn(move || {
        let socks: Vec<_> = (0..CHANNELS)
            .map(|_| listener.accept().unwrap().0)
            .collect();
        let hs: Vec<_> = socks
            .into_iter()
            .map(|mut s| {
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 1 << 20];
                    let mut got = 0;
                    while got < per {
                        let n = s.read(&mut buf).unwrap();
                        assert!(n > 0);
                        got += n;
                    }
                })
            })
            .collect();
        hs.into_iter().for_each(|h| h.join().unwrap());
    });
    let socks: Vec<_> = (0..CHANNELS)
        .map(|_| std::net::TcpStream::connect(addr).unwrap())
        .collect();
    let t = Instant::now();
    let hs: Vec<_> = socks
        .into_iter()
        .map(|mut s| {
            std::thread::spawn(move || {
                let buf = vec![7u8; 1 << 20];
                for _ in 0..per / buf.len() {
                    s.write_all(&buf).unwrap();
                }
            })
        })
        .collect();
    hs.into_iter().for_each(|h| h.join().unwrap());
    readers.join().unwrap();
    t.elapsed()
}

/// One migration of `guest` (resumed first; left paused by `config`), timed.
fn migrate_once(guest: &Arc<dyn MigratableGuest>, config: &MigrationConfig) -> Duration {
    guest.resume();
    let t = Instant::now();
    let (r, _) = migrate_over_loopback(
        guest.clone(),
        config,
        RunContext::default(),
        ReceiverConfig::default(),
    )
    .unwrap();
    let d = t.elapsed();
    assert_eq!(r.outcome, Outcome::Completed);
    d
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("loopback");
    g.throughput(Throughput::Bytes(GIB));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(20));
    g.bench_function("raw_tcp/4ch", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| raw_tcp()).sum())
    });

    let mem = Arc::new(GuestMemory::new(GIB).unwrap());
    FillSpec::default().fill(&mem, 1, 2);
    let guest = Arc::new(SyntheticGuest::start(
        mem,
        Workload {
            pattern: WorkloadPattern::Idle,
            ..Workload::default()
        },
    ));
    for codec in ["none", "lz4", "zstd:1"] {
        let config = MigrationConfig {
            codec: codec.parse().unwrap(),
            leave_paused: true,
            ..MigrationConfig::default()
        };
        let guest: Arc<dyn MigratableGuest> = guest.clone();
        g.bench_function(format!("migrate_idle_1GiB/4ch/{codec}"), |b| {
            b.iter_custom(|iters| (0..iters).map(|_| migrate_once(&guest, &config)).sum())
        });
    }
    g.finish();
    drop(guest);
    kvm(c);
}

/// The KVM guest: an idle 1 GiB one migrated (beside the synthetic one
/// above), and one harvest of its dirty log, clean and after 10 ms of writes.
fn kvm(c: &mut Criterion) {
    if let Err(e) = ferry::kvm::available() {
        eprintln!("skipping the KVM benches: {e}");
        return;
    }
    use ferry::kvm::KvmGuest;
    let mem = Arc::new(GuestMemory::new(GIB).unwrap());
    FillSpec::default().fill(&mem, 1, 2);
    let idle = Workload {
        pattern: WorkloadPattern::Idle,
        ..Workload::default()
    };
    let guest = Arc::new(KvmGuest::start(mem.clone(), idle).unwrap());
    let mut g = c.benchmark_group("loopback");
    g.throughput(Throughput::Bytes(GIB));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(20));
    let config = MigrationConfig {
        codec: "none".parse().unwrap(),
        leave_paused: true,
        ..MigrationConfig::default()
    };
    let dyn_guest: Arc<dyn MigratableGuest> = guest.clone();
    g.bench_function("migrate_idle_1GiB_kvm/4ch/none", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| migrate_once(&dyn_guest, &config)).sum())
    });
    drop(dyn_guest);
    g.finish();
    drop(guest);

    let mut g = c.benchmark_group("kvm_dirty_log");
    g.throughput(Throughput::Bytes(GIB));
    let busy = Workload {
        pattern: WorkloadPattern::Uniform,
        dirty_rate: 1 << 40,
        ..Workload::default()
    };
    let guest = KvmGuest::start(mem, busy).unwrap();
    guest.pause();
    guest.sync_dirty_log();
    g.bench_function("sync/1GiB/clean", |b| b.iter(|| guest.sync_dirty_log()));
    g.bench_function("sync/1GiB/after_10ms_of_writes", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                guest.resume();
                std::thread::sleep(Duration::from_millis(10));
                guest.pause();
                let t = Instant::now();
                guest.sync_dirty_log();
                total += t.elapsed();
            }
            total
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
