//! The vCPU's side: entering 64-bit ring 3, and the thread that runs the
//! guest program in paced batches, takes the throttle's share of each slice,
//! parks on a pause and completes a pending exit first.

use super::*;

impl Shared {
    pub(super) fn control(&self, field: u64) -> u64 {
        Layout::gpa(self.layout.control) + field
    }

    pub(super) fn counter(&self) -> u64 {
        self.memory
            .read_u64(self.control(program::control::COUNTER))
    }
}

/// Flat 64-bit mode, ring 3: paging with the guest's own 4 KiB tables,
/// code and data segments of privilege 3, and a TSS whose I/O bitmap allows
/// the exit port (the CPU consults it when IOPL is below 3, as some KVM
/// backends keep it). No GDT or IDT: KVM loads segments from the special
/// registers, and the program takes no interrupts or exceptions.
pub(super) fn long_mode_ring3(sregs: &mut kvm_bindings::kvm_sregs, layout: &Layout) {
    const CR0_PE: u64 = 1;
    const CR0_MP: u64 = 1 << 1;
    const CR0_ET: u64 = 1 << 4;
    const CR0_NE: u64 = 1 << 5;
    const CR0_WP: u64 = 1 << 16;
    const CR0_PG: u64 = 1 << 31;
    const CR4_PAE: u64 = 1 << 5;
    const CR4_OSFXSR: u64 = 1 << 9;
    const CR4_OSXMMEXCPT: u64 = 1 << 10;
    const EFER_LME: u64 = 1 << 8;
    const EFER_LMA: u64 = 1 << 10;
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: (3 << 3) | 3,
        type_: 0xb, // execute/read, accessed
        present: 1,
        dpl: 3,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    let data = kvm_segment {
        selector: (4 << 3) | 3,
        type_: 0x3, // read/write, accessed
        db: 1,
        l: 0,
        ..code
    };
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        base: Layout::gpa(layout.tss),
        limit: layout::TSS_LIMIT,
        selector: 5 << 3,
        type_: 0xb, // 64-bit TSS, busy
        present: 1,
        dpl: 0,
        db: 0,
        s: 0,
        l: 0,
        g: 0,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    sregs.cr3 = Layout::gpa(layout.pml4);
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.efer = EFER_LME | EFER_LMA;
}

/// Completes the exit KVM is waiting on (the `out` is finished, RIP moves
/// past it) without entering the guest: immediate-exit makes `KVM_RUN`
/// return `EINTR` at once.
fn complete_pending_exit(vcpu: &mut VcpuFd) {
    vcpu.set_kvm_immediate_exit(1);
    match vcpu.run() {
        Err(e) if e.errno() == libc::EINTR => {}
        Err(e) => tracing::warn!(error = %e, "completing the vCPU's pending exit"),
        Ok(exit) => tracing::warn!(?exit, "the vCPU ran while completing its exit"),
    }
    vcpu.set_kvm_immediate_exit(0);
}

/// The vCPU thread: runs the guest in paced slices, parks when paused.
pub(super) fn vcpu_thread(sh: Arc<Shared>) {
    let w = &sh.workload;
    let idle = pattern_fields(w, &sh.layout).0 == program::PATTERN_IDLE;
    let per_slice = w.dirty_rate as f64 / PAGE_SIZE as f64 * SLICE.as_secs_f64();
    let batch_field = sh.control(program::control::BATCH);
    let mut carry = 0.0f64;
    let mut batch_cap = 1024u64;
    // An `out` exit is pending (its instruction completes on the next run).
    let mut pending = false;
    loop {
        match sh.state.load(Ordering::Acquire) {
            STOPPED => return,
            PAUSED => {
                if pending {
                    complete_pending_exit(&mut sh.vcpu.lock().unwrap());
                    pending = false;
                }
                let mut park = sh.park.lock().unwrap();
                park.parked = true;
                sh.wake.notify_all();
                while sh.state.load(Ordering::Acquire) == PAUSED {
                    park = sh.wake.wait(park).unwrap();
                }
                park.parked = false;
                continue;
            }
            _ => {}
        }
        let slice_start = Instant::now();
        let share = f64::from(100 - sh.throttle.load(Ordering::Relaxed).min(99)) / 100.0;
        let allowance = SLICE.mul_f64(share);
        let mut left = if idle {
            IDLE_BATCH
        } else {
            carry += per_slice * share;
            let n = carry.floor();
            carry -= n;
            n as u64
        };
        let mut ran = Duration::ZERO;
        let mut failure = None;
        while left > 0 && ran < allowance && sh.state.load(Ordering::Acquire) == RUNNING {
            let batch = left.min(batch_cap);
            // The VMM's own write to guest memory: KVM does not log it.
            sh.memory.write_u64(batch_field, batch);
            sh.dirty.mark(PageIndex(sh.layout.control));
            let before = sh.counter();
            let t = Instant::now();
            let mut vcpu = sh.vcpu.lock().unwrap();
            let exit = vcpu.run();
            let took = t.elapsed();
            ran += took;
            sh.exits.fetch_add(1, Ordering::Relaxed);
            match exit {
                Ok(VcpuExit::IoOut(program::EXIT_PORT, _)) => pending = true,
                // A signal: the pending exit (if any) completed, the guest ran
                // until it came.
                Ok(VcpuExit::Intr) => pending = false,
                Err(e) if e.errno() == libc::EINTR => pending = false,
                Ok(other) => failure = Some(format!("unexpected exit {other:?}")),
                Err(e) => failure = Some(format!("KVM_RUN failed: {e}")),
            }
            drop(vcpu);
            if failure.is_some() {
                break;
            }
            let done = sh.counter().wrapping_sub(before);
            left -= done.min(left);
            if took > TARGET_RUN && batch_cap > 16 {
                batch_cap /= 2;
            } else if took < TARGET_RUN / 4 && batch == batch_cap && batch_cap < MAX_BATCH {
                batch_cap *= 2;
            }
        }
        if let Some(f) = failure {
            tracing::error!(failure = %f, "the KVM guest stopped");
            let mut park = sh.park.lock().unwrap();
            park.failure = Some(f);
            park.parked = true;
            sh.wake.notify_all();
            while sh.state.load(Ordering::Acquire) != STOPPED {
                park = sh.wake.wait(park).unwrap();
            }
            return;
        }
        if ran >= allowance {
            // The guest used its whole share: what it could not write is lost
            // time, not a debt to repay in a burst.
            carry = 0.0;
        }
        let end = slice_start + SLICE;
        let park = sh.park.lock().unwrap();
        let now = Instant::now();
        if end > now && sh.state.load(Ordering::Acquire) == RUNNING {
            let _ = sh.wake.wait_timeout(park, end - now).unwrap();
        }
    }
}
