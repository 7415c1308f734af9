//! A synthetic guest that behaves like a busy VM: writer threads dirty pages at a
//! set rate in a set pattern, and can be paused, throttled and moved.
//!
//! Each writer runs 10 ms slices. A slice writes `rate × 10 ms × (1 - throttle)`
//! bytes and sleeps the rest, so a throttle of `p`% is `p`% of the guest's time
//! asleep, as QEMU's auto-converge takes vCPU time. A writer's random generator
//! is a seeded ChaCha8 stream; its seed and word position, with the counters,
//! travel in the switchover so the workload continues where it stopped.

use super::{DirtyBitmap, DirtySnapshot, FillSpec, GuestMemory, PAGE_SIZE};
use crate::page::PageIndex;
use rand_chacha::rand_core::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const SLICE: Duration = Duration::from_millis(10);

/// Where a workload's writes land.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum WorkloadPattern {
    /// No writes at all.
    Idle,
    /// Uniformly random pages over all memory.
    Uniform,
    /// Uniformly random pages inside a working set at the start of memory.
    Hot {
        /// Working-set size in bytes.
        bytes: u64,
    },
    /// A sweep over all memory, page after page, wrapping around.
    Sequential,
}

/// Why a `--workload` was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid workload {0:?}: use idle, uniform, sequential or hot:<size> (e.g. hot:64MiB)")]
pub struct WorkloadError(String);

impl FromStr for WorkloadPattern {
    type Err = WorkloadError;

    fn from_str(s: &str) -> Result<Self, WorkloadError> {
        match s.trim() {
            "idle" => Ok(Self::Idle),
            "uniform" => Ok(Self::Uniform),
            "sequential" => Ok(Self::Sequential),
            other => {
                let size = other
                    .strip_prefix("hot:")
                    .ok_or_else(|| WorkloadError(s.into()))?;
                let bytes = crate::units::parse_size(size).map_err(|_| WorkloadError(s.into()))?;
                if bytes < PAGE_SIZE as u64 {
                    return Err(WorkloadError(s.into()));
                }
                Ok(Self::Hot { bytes })
            }
        }
    }
}

impl fmt::Display for WorkloadPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Idle => f.write_str("idle"),
            Self::Uniform => f.write_str("uniform"),
            Self::Sequential => f.write_str("sequential"),
            Self::Hot { bytes } => write!(f, "hot:{}", crate::units::compact_size(*bytes)),
        }
    }
}

/// The most bytes per second a workload may write: 2^50 (about 1 PB/s),
/// which no guest reaches; it is what "unpaced" asks (a KVM guest's page
/// writes count 4 KiB each: unpaced, one writes some 900 GB/s).
pub const MAX_DIRTY_RATE: u64 = 1 << 50;
/// The most writer threads a synthetic guest runs.
pub const MAX_WRITERS: u32 = 256;

/// What the synthetic guest does while it runs.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Workload {
    /// Where writes land.
    pub pattern: WorkloadPattern,
    /// Bytes written per second, over all writers. Default: 100 MB/s.
    pub dirty_rate: u64,
    /// The kinds of content written, by weight.
    pub content: FillSpec,
    /// Writer threads (each takes its share of the rate). Default: 1.
    pub writers: u32,
    /// Seed of the writers' generators.
    pub seed: u64,
}

impl Default for Workload {
    fn default() -> Self {
        Self {
            pattern: WorkloadPattern::Hot { bytes: 64 << 20 },
            dirty_rate: 100_000_000,
            content: FillSpec::default(),
            writers: 1,
            seed: 1,
        }
    }
}

/// One writer's position, enough to continue its exact stream of writes.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WriterState {
    /// The ChaCha8 word position, as (high, low) 64-bit halves.
    pub word_pos: (u64, u64),
    /// Pages this writer has written, ever.
    pub pages_written: u64,
    /// The next page of a sequential sweep.
    pub cursor: u64,
}

/// The synthetic guest's whole state, carried in the switchover.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GuestState {
    /// The workload, as configured on the source.
    pub workload: Workload,
    /// One entry per writer.
    pub writers: Vec<WriterState>,
    /// The throttle in force at the pause.
    pub throttle_pct: u8,
}

impl Workload {
    /// Checks it for a guest of `memory_bytes`, naming the field at fault:
    /// `dirty_rate` at most [`MAX_DIRTY_RATE`], 1 to [`MAX_WRITERS`]
    /// `writers`, a hot set of at least a page and at most the memory.
    pub fn validate(&self, memory_bytes: u64) -> Result<(), String> {
        if self.dirty_rate > MAX_DIRTY_RATE {
            return Err(format!(
                "dirty_rate: {} B/s is out of range (at most {MAX_DIRTY_RATE})",
                self.dirty_rate
            ));
        }
        if self.writers == 0 || self.writers > MAX_WRITERS {
            return Err(format!(
                "writers: {} is out of range (1 to {MAX_WRITERS})",
                self.writers
            ));
        }
        if let WorkloadPattern::Hot { bytes } = self.pattern {
            if bytes < PAGE_SIZE as u64 || bytes > memory_bytes {
                return Err(format!(
                    "workload: a hot set of {bytes} bytes is out of range (one page to the guest's {memory_bytes})"
                ));
            }
        }
        Ok(())
    }
}

const RUNNING: u8 = 0;
const PAUSED: u8 = 1;
const STOPPED: u8 = 2;

struct Shared {
    memory: Arc<GuestMemory>,
    bitmap: Arc<DirtyBitmap>,
    workload: Workload,
    state: AtomicU8,
    throttle: AtomicU8,
    pages_written: AtomicU64,
    park: Mutex<Park>,
    wake: Condvar,
}

struct Park {
    parked: u32,
    saved: Vec<WriterState>,
}

/// A running synthetic guest. Dropping it stops its writers.
pub struct SyntheticGuest {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl fmt::Debug for SyntheticGuest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SyntheticGuest")
            .field("workload", &self.shared.workload)
            .field("state", &self.shared.state.load(Ordering::Relaxed))
            .finish()
    }
}

impl SyntheticGuest {
    /// Starts a guest on `memory` with a fresh workload, running.
    pub fn start(memory: Arc<GuestMemory>, workload: Workload) -> Self {
        let writers = workload.writers.max(1) as usize;
        let state = GuestState {
            workload,
            writers: vec![WriterState::default(); writers],
            throttle_pct: 0,
        };
        Self::spawn(memory, state, RUNNING)
    }

    /// Recreates a guest from a state saved on another host, paused. Call
    /// [`resume`](Self::resume) to run it.
    pub fn restore(memory: Arc<GuestMemory>, state: GuestState) -> Self {
        Self::spawn(memory, state, PAUSED)
    }

    fn spawn(memory: Arc<GuestMemory>, mut state: GuestState, initial: u8) -> Self {
        if state.writers.is_empty() {
            state.writers.push(WriterState::default());
        }
        let n = state.writers.len() as u32;
        let bitmap = Arc::new(DirtyBitmap::new(memory.pages()));
        let shared = Arc::new(Shared {
            memory,
            bitmap,
            workload: Workload {
                writers: n,
                ..state.workload.clone()
            },
            state: AtomicU8::new(initial),
            throttle: AtomicU8::new(state.throttle_pct.min(99)),
            pages_written: AtomicU64::new(
                state
                    .writers
                    .iter()
                    .fold(0u64, |a, w| a.wrapping_add(w.pages_written)),
            ),
            park: Mutex::new(Park {
                parked: 0,
                saved: state.writers.clone(),
            }),
            wake: Condvar::new(),
        });
        let threads = state
            .writers
            .into_iter()
            .enumerate()
            .map(|(i, ws)| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("guest-writer-{i}"))
                    .spawn(move || writer(shared, i, ws))
                    .expect("spawn guest writer")
            })
            .collect();
        let guest = Self { shared, threads };
        if initial == PAUSED {
            guest.wait_parked();
        }
        guest
    }

    /// The guest's memory.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.shared.memory
    }

    /// The guest's dirty bitmap.
    pub fn bitmap(&self) -> &Arc<DirtyBitmap> {
        &self.shared.bitmap
    }

    /// The workload it runs.
    pub fn workload(&self) -> &Workload {
        &self.shared.workload
    }

    /// Drains the dirty bitmap into `out`.
    pub fn snapshot_dirty(&self, out: &mut DirtySnapshot) {
        self.shared.bitmap.snapshot_and_clear(out);
    }

    /// Pages written since the guest first started (on any host).
    pub fn pages_written(&self) -> u64 {
        self.shared.pages_written.load(Ordering::Relaxed)
    }

    /// Whether the writers are running (not paused).
    pub fn is_running(&self) -> bool {
        self.shared.state.load(Ordering::Acquire) == RUNNING
    }

    /// Stops every writer between two page writes and waits until all have.
    /// After this returns no page is written until [`resume`](Self::resume).
    pub fn pause(&self) {
        {
            let _park = self.shared.park.lock().unwrap();
            self.shared.state.store(PAUSED, Ordering::Release);
            self.shared.wake.notify_all();
        }
        self.wait_parked();
    }

    fn wait_parked(&self) {
        let mut park = self.shared.park.lock().unwrap();
        while park.parked < self.threads.len() as u32 {
            park = self.shared.wake.wait(park).unwrap();
        }
    }

    /// Lets the writers run again.
    pub fn resume(&self) {
        let _park = self.shared.park.lock().unwrap();
        self.shared.state.store(RUNNING, Ordering::Release);
        self.shared.wake.notify_all();
    }

    /// Sets the share of time the guest sleeps, 0 to 99 percent.
    pub fn set_throttle(&self, pct: u8) {
        self.shared.throttle.store(pct.min(99), Ordering::Relaxed);
    }

    /// The throttle in force.
    pub fn throttle(&self) -> u8 {
        self.shared.throttle.load(Ordering::Relaxed)
    }

    /// The state to carry to another host. Meaningful while paused.
    pub fn save_state(&self) -> GuestState {
        let park = self.shared.park.lock().unwrap();
        GuestState {
            workload: self.shared.workload.clone(),
            writers: park.saved.clone(),
            throttle_pct: self.throttle(),
        }
    }
}

impl Drop for SyntheticGuest {
    fn drop(&mut self) {
        {
            let _park = self.shared.park.lock().unwrap();
            self.shared.state.store(STOPPED, Ordering::Release);
            self.shared.wake.notify_all();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn writer_rng(seed: u64, index: usize, pos: (u64, u64)) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(
        seed.wrapping_add(index as u64)
            .wrapping_mul(0xa076_1d64_78bd_642f),
    );
    rng.set_word_pos((u128::from(pos.0) << 64) | u128::from(pos.1));
    rng
}

fn writer(shared: Arc<Shared>, index: usize, mut ws: WriterState) {
    let wl = &shared.workload;
    let mem = &shared.memory;
    let pages = mem.pages();
    let writers = u64::from(wl.writers.max(1));
    let mut rng = writer_rng(wl.seed, index, ws.word_pos);
    let per_slice = wl.dirty_rate as f64 / writers as f64 * SLICE.as_secs_f64();
    let mut carry = 0.0f64;
    let mut buf = vec![0u8; PAGE_SIZE];
    let mut deadline = Instant::now();
    loop {
        match shared.state.load(Ordering::Acquire) {
            STOPPED => return,
            PAUSED => {
                let pos = rng.get_word_pos();
                ws.word_pos = ((pos >> 64) as u64, pos as u64);
                let mut park = shared.park.lock().unwrap();
                park.saved[index] = ws.clone();
                park.parked += 1;
                shared.wake.notify_all();
                while shared.state.load(Ordering::Acquire) == PAUSED {
                    park = shared.wake.wait(park).unwrap();
                }
                park.parked -= 1;
                drop(park);
                deadline = Instant::now();
                continue;
            }
            _ => {}
        }
        let idle = wl.pattern == WorkloadPattern::Idle || wl.dirty_rate == 0;
        if !idle {
            let throttle = f64::from(shared.throttle.load(Ordering::Relaxed).min(99));
            // A writer that fell behind does not bank more than two slices.
            carry = (carry + per_slice * (100.0 - throttle) / 100.0)
                .min(2.0 * per_slice + PAGE_SIZE as f64);
            while carry >= PAGE_SIZE as f64 {
                if shared.state.load(Ordering::Acquire) != RUNNING {
                    break;
                }
                carry -= PAGE_SIZE as f64;
                let page = match wl.pattern {
                    WorkloadPattern::Uniform => rng.next_u64() % pages,
                    WorkloadPattern::Hot { bytes } => {
                        rng.next_u64() % (bytes / PAGE_SIZE as u64).clamp(1, pages)
                    }
                    WorkloadPattern::Sequential => {
                        // In u128: a cursor from a peer's state may be any u64.
                        let p = (u128::from(ws.cursor) * u128::from(writers) + index as u128)
                            % u128::from(pages);
                        ws.cursor = ws.cursor.wrapping_add(1);
                        p as u64
                    }
                    WorkloadPattern::Idle => unreachable!(),
                };
                let kind = wl
                    .content
                    .pick(wl.content.segment_of(page, pages), rng.next_u32());
                kind.generate(&mut rng, &mut buf);
                // Write, then mark: a migration that drains the mark copies the
                // page after this write (see the memory module doc).
                mem.write_page(PageIndex(page), &buf);
                shared.bitmap.mark(PageIndex(page));
                ws.pages_written = ws.pages_written.wrapping_add(1);
                shared.pages_written.fetch_add(1, Ordering::Relaxed);
            }
        }
        deadline += SLICE;
        let now = Instant::now();
        if deadline > now {
            // Wake early for pause/stop: wait on the condvar rather than sleep.
            let park = shared.park.lock().unwrap();
            if shared.state.load(Ordering::Acquire) == RUNNING {
                let _ = shared.wake.wait_timeout(park, deadline - now).unwrap();
            }
        } else if now - deadline > 10 * SLICE {
            // Far behind (the host was busy): do not try to catch up in a burst.
            deadline = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest(pages: u64, pattern: WorkloadPattern, rate: u64) -> SyntheticGuest {
        let mem = Arc::new(GuestMemory::new(pages * PAGE_SIZE as u64).unwrap());
        // Back the memory first, as a booted guest's is: the pacing tests time the
        // writer, not the kernel faulting in (and zeroing) 2 MiB huge pages.
        for p in 0..pages {
            mem.zero_page(PageIndex(p));
        }
        SyntheticGuest::start(
            mem,
            Workload {
                pattern,
                dirty_rate: rate,
                ..Workload::default()
            },
        )
    }

    #[test]
    fn parses_patterns() {
        assert_eq!(
            "idle".parse::<WorkloadPattern>().unwrap(),
            WorkloadPattern::Idle
        );
        assert_eq!(
            "hot:64MiB".parse::<WorkloadPattern>().unwrap(),
            WorkloadPattern::Hot { bytes: 64 << 20 }
        );
        assert!("hot:".parse::<WorkloadPattern>().is_err());
        assert!("busy".parse::<WorkloadPattern>().is_err());
    }

    #[test]
    fn hot_set_stays_hot_and_pause_stops_writes() {
        let g = guest(
            4096,
            WorkloadPattern::Hot {
                bytes: 64 * PAGE_SIZE as u64,
            },
            40_000_000,
        );
        std::thread::sleep(Duration::from_millis(100));
        g.pause();
        let mut snap = DirtySnapshot::new();
        g.snapshot_dirty(&mut snap);
        assert!(snap.count() > 0 && snap.runs().all(|(s, n)| s.0 + n <= 64));
        let written = g.pages_written();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(g.pages_written(), written, "paused guest wrote");
        g.snapshot_dirty(&mut snap);
        assert_eq!(snap.count(), 0);
        g.resume();
        std::thread::sleep(Duration::from_millis(50));
        assert!(g.pages_written() > written);
    }

    #[test]
    fn rate_and_throttle() {
        // 40 MB/s is ~9766 pages/s; over 300 ms about 2900 pages.
        let g = guest(1 << 16, WorkloadPattern::Uniform, 40_000_000);
        std::thread::sleep(Duration::from_millis(300));
        let full = g.pages_written();
        assert!((1500..4500).contains(&full), "{full} pages in 300 ms");
        g.set_throttle(90);
        let before = g.pages_written();
        std::thread::sleep(Duration::from_millis(300));
        let throttled = g.pages_written() - before;
        assert!(throttled * 3 < full, "throttled {throttled} vs {full}");
    }

    #[test]
    fn state_continues_the_same_stream() {
        // Run a sequential guest, move its state to a second memory, and check the
        // second continues the sweep where the first stopped.
        let g = guest(1 << 14, WorkloadPattern::Sequential, 20_000_000);
        std::thread::sleep(Duration::from_millis(60));
        g.pause();
        let state = g.save_state();
        assert!(state.writers[0].cursor > 0);
        let mem2 = Arc::new(GuestMemory::new(g.memory().len_bytes()).unwrap());
        let g2 = SyntheticGuest::restore(mem2, state.clone());
        assert!(!g2.is_running());
        assert_eq!(g2.save_state(), state);
        g2.resume();
        std::thread::sleep(Duration::from_millis(60));
        g2.pause();
        let mut snap = DirtySnapshot::new();
        g2.snapshot_dirty(&mut snap);
        let first = snap.runs().next().unwrap().0;
        assert_eq!(
            first,
            PageIndex(state.writers[0].cursor % g.memory().pages())
        );
        assert!(g2.pages_written() > g.pages_written());
    }
}
