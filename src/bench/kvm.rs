//! `ferry bench kvm`: what the KVM guest's parts cost on this host: the dirty
//! log's sync per GiB (clean and with dirty pages), the guest's write rate
//! with and without dirty tracking, and the switchover's steps (pause, vCPU
//! state, a second VM made from it, resume).

use super::Spread;
use crate::kvm::{KvmError, KvmGuest};
use crate::memory::{DirtySnapshot, GuestMemory, Workload, WorkloadPattern, PAGE_SIZE};
use crate::page::PageIndex;
use serde::Serialize;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The dirty rate asked of an unpaced guest: far above what it can write.
const UNPACED: u64 = crate::memory::MAX_DIRTY_RATE;

/// What `ferry bench kvm` measured.
#[derive(Debug, Clone, Serialize)]
pub struct KvmBench {
    /// Guest memory.
    pub memory_bytes: u64,
    /// Samples per figure.
    pub repeats: u32,
    /// `KVM_GET_DIRTY_LOG` with nothing dirty, µs per call.
    pub sync_clean_us: Spread,
    /// The same per GiB of guest memory.
    pub sync_clean_us_per_gib: f64,
    /// Dirty pages each dirty sample's sync returned (median).
    pub sync_dirty_pages: f64,
    /// `KVM_GET_DIRTY_LOG` after the guest wrote for 20 ms, µs per call.
    pub sync_dirty_us: Spread,
    /// What each dirty page added to a sync, ns (median of the samples).
    pub sync_ns_per_dirty_page: f64,
    /// Page writes per second of an unpaced guest writing a 4 MiB hot set,
    /// the log never harvested: after one write fault per page it runs free.
    pub writes_per_sec_hot_unharvested: f64,
    /// The same with the log harvested every 100 ms, as a slow round would
    /// (each harvest write-protects the pages again).
    pub writes_per_sec_hot_harvest_100ms: f64,
    /// The same with the log harvested every 10 ms.
    pub writes_per_sec_hot_harvest_10ms: f64,
    /// Page writes per second of an unpaced guest writing random pages over
    /// all its memory: nearly every write is a page's first since a harvest,
    /// so this is the rate of write-protection faults.
    pub writes_per_sec_uniform: f64,
    /// Stopping a running vCPU (pending exit completed), µs.
    pub pause_us: Spread,
    /// Capturing the vCPU's state, µs.
    pub save_us: Spread,
    /// The state's size, serialized as it travels.
    pub state_bytes: u64,
    /// A second VM made from that state (VM, memory slot, vCPU, CPUID,
    /// registers, MSRs), ms: the destination's work at SWITCHOVER.
    pub restore_ms: Spread,
    /// Resuming a paused vCPU, µs.
    pub resume_us: Spread,
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn spread(v: &[f64]) -> Spread {
    Spread::of(v).expect("at least one sample")
}

/// Page writes per second of `g` over `run`, harvesting every `every`.
fn write_rate(g: &KvmGuest, run: Duration, every: Option<Duration>) -> f64 {
    g.sync_dirty_log();
    let c0 = g.counter();
    let t = Instant::now();
    while t.elapsed() < run {
        match every {
            Some(e) => {
                std::thread::sleep(e);
                g.sync_dirty_log();
            }
            None => std::thread::sleep(run),
        }
    }
    (g.counter() - c0) as f64 / t.elapsed().as_secs_f64()
}

/// Measures on a guest of `memory` (its content as loaded), `repeats`
/// samples per figure.
pub fn measure(memory: Arc<GuestMemory>, repeats: u32) -> Result<KvmBench, KvmError> {
    let repeats = repeats.max(1);
    let bytes = memory.len_bytes();
    let gib = bytes as f64 / f64::from(1u32 << 30);
    let workload = Workload {
        pattern: WorkloadPattern::Uniform,
        dirty_rate: UNPACED,
        ..Workload::default()
    };
    // The hot set first: how fast the guest writes, and what harvests cost it.
    let hot = KvmGuest::start(
        memory.clone(),
        Workload {
            pattern: WorkloadPattern::Hot { bytes: 4 << 20 },
            ..workload.clone()
        },
    )?;
    std::thread::sleep(Duration::from_millis(100));
    let run = Duration::from_millis(500);
    let writes_per_sec_hot_unharvested = write_rate(&hot, run, None);
    let writes_per_sec_hot_harvest_100ms = write_rate(&hot, run, Some(Duration::from_millis(100)));
    let writes_per_sec_hot_harvest_10ms = write_rate(&hot, run, Some(Duration::from_millis(10)));
    drop(hot);
    let g = KvmGuest::start(memory.clone(), workload)?;
    std::thread::sleep(Duration::from_millis(100));
    let writes_per_sec_uniform = write_rate(&g, run, None);

    let (mut clean, mut dirty, mut dirty_pages, mut per_page) = (vec![], vec![], vec![], vec![]);
    let (mut pause, mut save, mut resume) = (vec![], vec![], vec![]);
    let mut snap = DirtySnapshot::new();
    let mut state_bytes = 0;
    for _ in 0..repeats {
        std::thread::sleep(Duration::from_millis(20));
        let t = Instant::now();
        g.pause();
        pause.push(us(t.elapsed()));
        let t = Instant::now();
        let state = g.save_state()?;
        save.push(us(t.elapsed()));
        state_bytes = serde_json::to_vec(&state).map_or(0, |v| v.len() as u64);
        let before = g.sync_stats();
        let pages = g.sync_dirty_log();
        let took = us(g.sync_stats().total - before.total);
        dirty.push(took);
        dirty_pages.push(pages as f64);
        g.snapshot_dirty(&mut snap); // drain ferry's bitmap too
        let before = g.sync_stats();
        g.sync_dirty_log();
        let clean_us = us(g.sync_stats().total - before.total);
        clean.push(clean_us);
        if pages > 0 {
            per_page.push((took - clean_us).max(0.0) * 1e3 / pages as f64);
        }
        let t = Instant::now();
        g.resume();
        resume.push(us(t.elapsed()));
    }
    g.pause();
    // The destination's work: a second VM from the state, on memory holding
    // the guest's program and tables (its data pages do not matter here).
    let state = serde_json::to_vec(&g.save_state()?).unwrap_or_default();
    let l = *g.layout();
    let copy = Arc::new(GuestMemory::new(bytes).map_err(|e| KvmError::BadState(e.to_string()))?);
    let mut page = vec![0u8; PAGE_SIZE];
    for p in l.pt_first..l.pages {
        memory.read_page(PageIndex(p), &mut page);
        copy.write_page(PageIndex(p), &page);
    }
    let mut restore = vec![];
    for _ in 0..repeats {
        let t = Instant::now();
        let b = KvmGuest::restore(copy.clone(), &state)?;
        restore.push(t.elapsed().as_secs_f64() * 1e3);
        drop(b);
    }
    let sync_clean_us = spread(&clean);
    Ok(KvmBench {
        memory_bytes: bytes,
        repeats,
        sync_clean_us,
        sync_clean_us_per_gib: sync_clean_us.median / gib,
        sync_dirty_pages: spread(&dirty_pages).median,
        sync_dirty_us: spread(&dirty),
        sync_ns_per_dirty_page: Spread::of(&per_page).map_or(0.0, |s| s.median),
        writes_per_sec_hot_unharvested,
        writes_per_sec_hot_harvest_100ms,
        writes_per_sec_hot_harvest_10ms,
        writes_per_sec_uniform,
        pause_us: spread(&pause),
        save_us: spread(&save),
        state_bytes,
        restore_ms: spread(&restore),
        resume_us: spread(&resume),
    })
}
