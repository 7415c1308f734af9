//! CPU time of a set of threads (one side of a migration), read from
//! `/proc/self/task/<tid>/schedstat`, so a side's figure is its own threads'
//! time even when both sides share one process.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The calling thread's CPU time so far (`CLOCK_THREAD_CPUTIME_ID`): what a
/// piece of work cost this thread, unlike wall time, which grows while the
/// thread waits for a core. `None` where the clock is missing.
pub fn thread_cpu_time() -> Option<Duration> {
    clock_time(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// Clock `id`'s reading (`clock_gettime`); `None` where it is missing.
#[allow(unsafe_code)]
pub fn clock_time(id: libc::clockid_t) -> Option<Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the call writes only it,
    // and an unknown `id` is an error return, not undefined behaviour.
    let rc = unsafe { libc::clock_gettime(id, &mut ts) };
    (rc == 0).then(|| Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
}

/// Times work by this thread's CPU clock, falling back to wall time.
#[derive(Debug, Clone, Copy)]
pub struct CpuTimer {
    cpu: Option<Duration>,
    wall: std::time::Instant,
}

impl CpuTimer {
    /// Starts timing.
    pub fn start() -> Self {
        Self {
            cpu: thread_cpu_time(),
            wall: std::time::Instant::now(),
        }
    }

    /// Seconds of this thread's CPU since `start` (wall seconds where the CPU
    /// clock is missing).
    pub fn secs(&self) -> f64 {
        match (self.cpu, thread_cpu_time()) {
            (Some(a), Some(b)) => b.saturating_sub(a).as_secs_f64(),
            _ => self.wall.elapsed().as_secs_f64(),
        }
    }
}

/// Sums the CPU time of the threads registered with it, live or finished.
#[derive(Debug, Clone, Default)]
pub struct CpuMeter {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug, Default)]
struct Inner {
    live: HashSet<u32>,
    finished_ns: u64,
}

/// The calling thread's id, from `/proc/thread-self` (`<pid>/task/<tid>`).
fn current_tid() -> Option<u32> {
    let link = std::fs::read_link("/proc/thread-self").ok()?;
    link.file_name()?.to_str()?.parse().ok()
}

/// CPU nanoseconds of a thread: schedstat's first field, or utime+stime in
/// clock ticks (assumed 100 Hz) where schedstat is missing.
fn thread_cpu_ns(path: &str) -> Option<u64> {
    if let Ok(s) = std::fs::read_to_string(format!("{path}/schedstat")) {
        if let Some(ns) = s.split_whitespace().next().and_then(|v| v.parse().ok()) {
            return Some(ns);
        }
    }
    let stat = std::fs::read_to_string(format!("{path}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks * 10_000_000)
}

impl CpuMeter {
    /// A meter with no threads.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts the calling thread from now on (its whole lifetime's CPU time).
    pub fn register_current_thread(&self) {
        if let Some(tid) = current_tid() {
            self.inner.lock().unwrap().live.insert(tid);
        }
    }

    /// Call on the thread itself just before it exits: keeps its time.
    pub fn unregister_current_thread(&self) {
        if let Some(tid) = current_tid() {
            let ns = thread_cpu_ns("/proc/thread-self").unwrap_or(0);
            let mut inner = self.inner.lock().unwrap();
            if inner.live.remove(&tid) {
                inner.finished_ns += ns;
            }
        }
    }

    /// CPU time of every registered thread so far.
    pub fn total(&self) -> Duration {
        let inner = self.inner.lock().unwrap();
        let live: u64 = inner
            .live
            .iter()
            .filter_map(|tid| thread_cpu_ns(&format!("/proc/self/task/{tid}")))
            .sum();
        Duration::from_nanos(inner.finished_ns + live)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cpu_timer_counts_work_not_sleep() {
        let t = CpuTimer::start();
        std::thread::sleep(Duration::from_millis(30));
        assert!(t.secs() < 0.01, "sleeping cost {} s of CPU", t.secs());
        let t = CpuTimer::start();
        let mut x = 0u64;
        let begin = std::time::Instant::now();
        while begin.elapsed() < Duration::from_millis(20) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        assert!(t.secs() > 0.005, "spinning cost {} s of CPU", t.secs());
    }

    #[test]
    fn counts_only_registered_threads() {
        let meter = CpuMeter::new();
        let m = meter.clone();
        // Spin until the thread itself has used `ms` of CPU: on a loaded
        // machine wall time says little about CPU time.
        let busy = |ms: u64| {
            let now = || thread_cpu_time().expect("Linux has thread CPU clocks");
            let start = now();
            let mut x = 0u64;
            while now().saturating_sub(start) < Duration::from_millis(ms) {
                for _ in 0..1000 {
                    x = x.wrapping_mul(31).wrapping_add(1);
                }
            }
            std::hint::black_box(x);
        };
        std::thread::spawn(move || {
            m.register_current_thread();
            busy(150);
            m.unregister_current_thread();
        })
        .join()
        .unwrap();
        std::thread::spawn(move || busy(150)).join().unwrap();
        let t = meter.total();
        // The registered thread's 150 ms, not the other's.
        assert!(
            t >= Duration::from_millis(150) && t < Duration::from_millis(290),
            "{t:?}"
        );
    }
}
