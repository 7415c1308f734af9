//! A running KVM guest's dirty log and run control: the kernel's log
//! harvested into the guest's bitmap, pause and resume at a port exit, and
//! the auto-converge throttle.

use super::*;

impl KvmGuest {
    /// Harvests the kernel's dirty log into the guest's bitmap.
    pub(super) fn harvest(&self) {
        let sh = &self.shared;
        let mut log = sh.log.lock().unwrap();
        let t = Instant::now();
        match log.0.fetch(&sh.vm, SLOT) {
            Ok(words) => {
                let n: u64 = words.iter().map(|w| u64::from(w.count_ones())).sum();
                sh.dirty.merge_words(words);
                log.1.pages += n;
            }
            Err(e) => {
                // Without the log, every page may be dirty: say so rather
                // than lose a write.
                tracing::error!(error = %e, "KVM_GET_DIRTY_LOG failed; marking all memory dirty");
                sh.dirty.mark_all();
            }
        }
        log.1.syncs += 1;
        log.1.total += t.elapsed();
    }

    /// Fetches the kernel's dirty log into the guest's bitmap (what a
    /// snapshot does first); returns the pages the kernel reported.
    pub fn sync_dirty_log(&self) -> u64 {
        let before = self.sync_stats().pages;
        self.harvest();
        self.sync_stats().pages - before
    }

    /// Moves the dirty pages (the kernel's log and the VMM's own writes) into
    /// `out` and clears them.
    pub fn snapshot_dirty(&self, out: &mut DirtySnapshot) {
        self.harvest();
        self.shared.dirty.snapshot_and_clear(out);
    }

    /// Pages dirty now (harvests the log, keeping what it found).
    pub fn dirty_pages(&self) -> u64 {
        self.harvest();
        self.shared.dirty.count()
    }

    /// Dirty-log harvests so far.
    pub fn sync_stats(&self) -> SyncStats {
        self.shared.log.lock().unwrap().1
    }

    /// Stops the vCPU with its pending exit completed; returns once the guest
    /// no longer runs.
    pub fn pause(&self) {
        {
            let _park = self.shared.park.lock().unwrap();
            if self.shared.state.load(Ordering::Acquire) == RUNNING {
                self.shared.state.store(PAUSED, Ordering::Release);
            }
            self.shared.wake.notify_all();
        }
        self.wait_parked();
    }

    pub(super) fn wait_parked(&self) {
        let mut park = self.shared.park.lock().unwrap();
        while !park.parked {
            park = self.shared.wake.wait(park).unwrap();
        }
    }

    /// Runs the vCPU again.
    pub fn resume(&self) {
        let _park = self.shared.park.lock().unwrap();
        if self.shared.state.load(Ordering::Acquire) == PAUSED {
            self.shared.state.store(RUNNING, Ordering::Release);
        }
        self.shared.wake.notify_all();
    }

    /// Sets the share of each slice the vCPU is kept out of the guest, 0-99%.
    pub fn set_throttle(&self, pct: u8) {
        self.shared.throttle.store(pct.min(99), Ordering::Relaxed);
    }

    /// The throttle in force.
    pub fn throttle(&self) -> u8 {
        self.shared.throttle.load(Ordering::Relaxed)
    }
}
