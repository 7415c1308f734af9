//! A real KVM guest: a minimal VMM on the rust-vmm crates that runs a small
//! 64-bit guest program on one vCPU thread, with the kernel's dirty log as the
//! migration's dirty set.
//!
//! The guest's memory is the engine's own [`GuestMemory`], registered as one
//! KVM memory slot with dirty logging on. Its top pages hold the guest's page
//! tables, its program and a control page ([`layout`]); the rest is data the
//! program writes in the workload's pattern ([`program`]). The guest runs in
//! 64-bit ring 3 (on software-assisted KVM backends ring-0 code is emulated
//! instruction by instruction, ring-3 code runs natively) and exits to the host
//! with an I/O port write after each batch; between batches the host paces it
//! to the dirty rate and takes away the auto-converge throttle's share of each
//! 10 ms slice, as QEMU's vCPU throttle does.
//!
//! ```text
//!            start / restore ──▶ Running ◀──resume── Paused ◀──pause──┐
//!                                  │  └──────────────────────────────────┘
//!                                  └─ unexpected exit ─▶ Failed (never runs again)
//! ```
//!
//! The dirty set is the kernel's `KVM_GET_DIRTY_LOG`, harvested into ferry's own
//! [`DirtyBitmap`] (which also holds the pages the VMM writes itself: KVM logs
//! only the guest's writes), so the engine sees the same snapshot-and-clear as
//! for the synthetic guest. A pause completes the pending port exit before the
//! vCPU's state is read, so the state resumes after the `out` instruction.

pub mod layout;
pub mod program;
mod run;
pub mod state;
mod sys;
mod vcpu;

use vcpu::{long_mode_ring3, vcpu_thread};

pub use layout::Layout;
pub use state::{StateError, VcpuState};

use crate::memory::{
    DirtyBitmap, DirtySnapshot, GuestMemory, Workload, WorkloadPattern, PAGE_SIZE,
};
use crate::page::PageIndex;
use kvm_bindings::{kvm_segment, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The pacing slice: the throttle takes its share of every slice.
const SLICE: Duration = Duration::from_millis(10);
/// Most iterations the guest runs between two exits.
const MAX_BATCH: u64 = 16_384;
/// Iterations an idle guest runs per slice (it only counts).
const IDLE_BATCH: u64 = 64;
/// A run longer than this halves the batch, shorter than a quarter of it
/// doubles it: a pause waits for at most about one run.
const TARGET_RUN: Duration = Duration::from_millis(1);
/// The memory slot of guest memory.
const SLOT: u32 = 0;
/// Version of [`KvmGuestState`]'s encoding.
const STATE_VERSION: u32 = 1;

/// Why a KVM guest could not be made or moved.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// The KVM device is missing or refuses us.
    #[error("no working KVM device at {device}")]
    Unavailable {
        /// Its path (`/dev/kvm`).
        device: String,
        /// What opening it or making a VM said.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A KVM call failed.
    #[error("cannot {what}")]
    Ioctl {
        /// What was being done.
        what: &'static str,
        /// The kernel's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory is too small for the layout.
    #[error("guest memory of {bytes} bytes is too small for a KVM guest (at least 2 MiB)")]
    TooSmall {
        /// Its size.
        bytes: u64,
    },
    /// The guest program did not assemble.
    #[error("cannot assemble the guest program: {0}")]
    Assemble(String),
    /// The vCPU's state could not be read or written.
    #[error(transparent)]
    State(#[from] StateError),
    /// A saved state (from a peer) is malformed or does not fit this memory.
    #[error("KVM guest state is invalid: {0}")]
    BadState(String),
}

fn ioctl<T>(what: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, KvmError> {
    r.map_err(|source| KvmError::Ioctl { what, source })
}

/// The environment variable naming another KVM device than `/dev/kvm` (for
/// tests of the error a host without one gives).
pub const DEVICE_ENV: &str = "FERRY_KVM_DEVICE";

/// The KVM device: `/dev/kvm`, or what [`DEVICE_ENV`] names.
pub fn device() -> String {
    std::env::var(DEVICE_ENV).unwrap_or_else(|_| "/dev/kvm".into())
}

fn open_kvm() -> Result<Kvm, KvmError> {
    let path = device();
    let c = std::ffi::CString::new(path.clone()).map_err(|_| KvmError::Unavailable {
        device: path.clone(),
        source: kvm_ioctls::Error::new(libc::EINVAL),
    })?;
    Kvm::new_with_path(&c).map_err(|source| KvmError::Unavailable {
        device: path,
        source,
    })
}

/// Checks that this host can run KVM guests: the device opens and makes a VM.
pub fn available() -> Result<(), KvmError> {
    let kvm = open_kvm()?;
    kvm.create_vm().map_err(|source| KvmError::Unavailable {
        device: device(),
        source,
    })?;
    Ok(())
}

/// Everything a KVM guest carries to another host besides its memory.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct KvmGuestState {
    /// [`STATE_VERSION`].
    pub version: u32,
    /// The workload the host paces (pattern, rate, seed).
    pub workload: Workload,
    /// The throttle in force at the pause.
    pub throttle_pct: u8,
    /// The layout, checked against the destination's memory.
    pub layout: Layout,
    /// The vCPU.
    pub vcpu: VcpuState,
}

impl KvmGuestState {
    /// Decodes a state from a peer for a guest of `pages` pages, checking
    /// everything that can be checked without KVM: the version, the layout
    /// against this memory, the number of MSRs and the FPU's registers.
    pub fn decode(saved: &[u8], pages: u64) -> Result<Self, KvmError> {
        let st: Self =
            serde_json::from_slice(saved).map_err(|e| KvmError::BadState(e.to_string()))?;
        if st.version != STATE_VERSION {
            return Err(KvmError::BadState(format!(
                "version {} (this build reads {STATE_VERSION})",
                st.version
            )));
        }
        let layout = Layout::new(pages).ok_or(KvmError::TooSmall {
            bytes: pages * PAGE_SIZE as u64,
        })?;
        if layout != st.layout {
            return Err(KvmError::BadState(format!(
                "its layout is for {} pages, this memory has {pages}",
                st.layout.pages
            )));
        }
        st.vcpu.check().map_err(KvmError::State)?;
        st.workload
            .validate(pages * PAGE_SIZE as u64)
            .map_err(KvmError::BadState)?;
        Ok(st)
    }
}

const RUNNING: u8 = 0;
const PAUSED: u8 = 1;
const STOPPED: u8 = 2;

/// Dirty-log harvests: how many and how long, for the sync cost per round.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct SyncStats {
    /// `KVM_GET_DIRTY_LOG` calls.
    pub syncs: u64,
    /// Time spent in them.
    pub total: Duration,
    /// Dirty pages they returned.
    pub pages: u64,
}

struct Shared {
    // Field order is drop order: the vCPU and the VM go before the memory
    // they map (the safety contract of sys::register_memory).
    vcpu: Mutex<VcpuFd>,
    vm: VmFd,
    kvm: Kvm,
    memory: Arc<GuestMemory>,
    layout: Layout,
    workload: Workload,
    msrs: Vec<u32>,
    log: Mutex<(sys::DirtyLog, SyncStats)>,
    /// Harvested and host-written pages not yet drained.
    dirty: DirtyBitmap,
    state: AtomicU8,
    throttle: AtomicU8,
    park: Mutex<Park>,
    wake: Condvar,
    exits: AtomicU64,
}

#[derive(Default)]
struct Park {
    parked: bool,
    failure: Option<String>,
}

/// A running KVM guest. Dropping it stops its vCPU and closes the VM.
pub struct KvmGuest {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for KvmGuest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmGuest")
            .field("workload", &self.shared.workload)
            .field("layout", &self.shared.layout)
            .finish()
    }
}

/// The control-page fields for a workload on this layout: pattern and span.
fn pattern_fields(w: &Workload, layout: &Layout) -> (u64, u64) {
    let data = layout.data_pages;
    match w.pattern {
        WorkloadPattern::Idle => (program::PATTERN_IDLE, 1),
        _ if w.dirty_rate == 0 => (program::PATTERN_IDLE, 1),
        WorkloadPattern::Uniform => (program::PATTERN_RANDOM, data),
        WorkloadPattern::Hot { bytes } => (
            program::PATTERN_RANDOM,
            (bytes / PAGE_SIZE as u64).clamp(1, data),
        ),
        WorkloadPattern::Sequential => (program::PATTERN_SEQUENTIAL, data),
    }
}

/// The first xorshift64 state for a seed (never zero).
pub fn initial_rng(seed: u64) -> u64 {
    let x = seed
        .wrapping_add(0x9e37_79b9_7f4a_7c15)
        .wrapping_mul(0xbf58_476d_1ce4_e5b9);
    if x == 0 {
        1
    } else {
        x
    }
}

impl KvmGuest {
    /// Starts a guest on `memory` (its content already loaded): writes the
    /// page tables, the program and the control page into the top of memory,
    /// creates the VM and its vCPU, and runs it.
    ///
    /// The workload's `pattern`, `dirty_rate` and `seed` apply; its `content`
    /// and `writers` do not (the program writes its counter into the pages, on
    /// one vCPU).
    pub fn start(memory: Arc<GuestMemory>, workload: Workload) -> Result<Self, KvmError> {
        let layout = Layout::new(memory.pages()).ok_or(KvmError::TooSmall {
            bytes: memory.len_bytes(),
        })?;
        layout.write_page_tables(&memory);
        let code = program::assemble(Layout::gpa(layout.code), Layout::gpa(layout.control))
            .map_err(|e| KvmError::Assemble(e.to_string()))?;
        if code.len() > (layout::CODE_PAGES as usize) * PAGE_SIZE {
            return Err(KvmError::Assemble(format!("{} bytes of code", code.len())));
        }
        let mut page = vec![0u8; PAGE_SIZE];
        for i in 0..layout::CODE_PAGES as usize {
            page.fill(0);
            let chunk = code.get(i * PAGE_SIZE..).unwrap_or_default();
            let n = chunk.len().min(PAGE_SIZE);
            page[..n].copy_from_slice(&chunk[..n]);
            memory.write_page(PageIndex(layout.code + i as u64), &page);
        }
        layout.write_tss(&memory);
        let (pattern, span) = pattern_fields(&workload, &layout);
        let ctl = Layout::gpa(layout.control);
        memory.zero_page(PageIndex(layout.control));
        memory.write_u64(ctl + program::control::PATTERN, pattern);
        memory.write_u64(ctl + program::control::SPAN, span);
        memory.write_u64(ctl + program::control::RNG, initial_rng(workload.seed));

        let (kvm, vm, vcpu) = Self::create(&memory)?;
        let mut sregs = ioctl("get special registers", vcpu.get_sregs())?;
        long_mode_ring3(&mut sregs, &layout);
        ioctl("set special registers", vcpu.set_sregs(&sregs))?;
        let regs = kvm_bindings::kvm_regs {
            rip: Layout::gpa(layout.code),
            // Bit 1 is always set; IOPL 3 lets ring 3 write the exit port.
            rflags: 0x2 | 0x3000,
            ..Default::default()
        };
        ioctl("set registers", vcpu.set_regs(&regs))?;
        let msrs = state::saved_msrs(&kvm, &vcpu)?;
        Ok(Self::spawn(
            kvm, vm, vcpu, memory, layout, workload, msrs, 0, RUNNING,
        ))
    }

    /// Recreates a guest, paused, from a state saved on another host, on
    /// `memory` that holds what the source's held at the pause.
    pub fn restore(memory: Arc<GuestMemory>, saved: &[u8]) -> Result<Self, KvmError> {
        let st = KvmGuestState::decode(saved, memory.pages())?;
        let layout = st.layout;
        let (kvm, vm, vcpu) = Self::create(&memory)?;
        let refused = st.vcpu.restore(&vcpu, &kvm)?;
        if !refused.is_empty() {
            tracing::debug!(?refused, "MSRs this host's KVM did not take");
        }
        let msrs = state::saved_msrs(&kvm, &vcpu)?;
        Ok(Self::spawn(
            kvm,
            vm,
            vcpu,
            memory,
            layout,
            st.workload,
            msrs,
            st.throttle_pct,
            PAUSED,
        ))
    }

    /// The VM with `memory` as its slot and one vCPU with the host's CPUID.
    fn create(memory: &GuestMemory) -> Result<(Kvm, VmFd, VcpuFd), KvmError> {
        let kvm = open_kvm()?;
        let vm = ioctl("create a VM", kvm.create_vm())?;
        // SAFETY: `memory` is an Arc the guest keeps in `Shared` beside the VM,
        // declared after it, so it outlives the slot.
        #[allow(unsafe_code)]
        unsafe {
            ioctl(
                "register guest memory",
                sys::register_memory(&vm, SLOT, memory),
            )?
        };
        let vcpu = ioctl("create a vCPU", vm.create_vcpu(0))?;
        // The host's supported CPUID, unchanged: software-assisted backends
        // offer a baseline x86-64 (no XSAVE or AVX), which is all the program uses.
        let cpuid = ioctl(
            "read the supported CPUID",
            kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES),
        )?;
        ioctl("set the vCPU's CPUID", vcpu.set_cpuid2(&cpuid))?;
        Ok((kvm, vm, vcpu))
    }

    #[allow(clippy::too_many_arguments)]
    fn spawn(
        kvm: Kvm,
        vm: VmFd,
        vcpu: VcpuFd,
        memory: Arc<GuestMemory>,
        layout: Layout,
        workload: Workload,
        msrs: Vec<u32>,
        throttle: u8,
        initial: u8,
    ) -> Self {
        let pages = memory.pages();
        let shared = Arc::new(Shared {
            vcpu: Mutex::new(vcpu),
            vm,
            kvm,
            memory,
            layout,
            workload,
            msrs,
            log: Mutex::new((sys::DirtyLog::new(pages), SyncStats::default())),
            dirty: DirtyBitmap::new(pages),
            state: AtomicU8::new(initial),
            throttle: AtomicU8::new(throttle.min(99)),
            park: Mutex::new(Park::default()),
            wake: Condvar::new(),
            exits: AtomicU64::new(0),
        });
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name("kvm-vcpu-0".into())
            .spawn(move || vcpu_thread(sh))
            .expect("spawn the vCPU thread");
        let guest = Self {
            shared,
            thread: Some(thread),
        };
        if initial == PAUSED {
            guest.wait_parked();
        }
        guest
    }

    /// The guest's memory.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.shared.memory
    }

    /// Its layout.
    pub fn layout(&self) -> &Layout {
        &self.shared.layout
    }

    /// The workload the host paces.
    pub fn workload(&self) -> &Workload {
        &self.shared.workload
    }

    /// The guest's counter: iterations of its loop since it first started,
    /// on any host (read from guest memory).
    pub fn counter(&self) -> u64 {
        self.shared.counter()
    }

    /// Exits to the host since this VM was made.
    pub fn exits(&self) -> u64 {
        self.shared.exits.load(Ordering::Relaxed)
    }

    /// Why the guest stopped for good, if it did (an exit the VMM does not
    /// expect: a triple fault, an internal error).
    pub fn failure(&self) -> Option<String> {
        self.shared.park.lock().unwrap().failure.clone()
    }

    /// Whether the vCPU is running (not paused, not failed).
    pub fn is_running(&self) -> bool {
        self.shared.state.load(Ordering::Acquire) == RUNNING && self.failure().is_none()
    }

    /// The state to carry to another host. Call while paused.
    pub fn save_state(&self) -> Result<KvmGuestState, KvmError> {
        let sh = &self.shared;
        let vcpu = sh.vcpu.lock().unwrap();
        let vcpu = VcpuState::capture(&vcpu, &sh.kvm, &sh.msrs)?;
        Ok(KvmGuestState {
            version: STATE_VERSION,
            workload: sh.workload.clone(),
            throttle_pct: self.throttle(),
            layout: sh.layout,
            vcpu,
        })
    }
}

impl Drop for KvmGuest {
    fn drop(&mut self) {
        {
            let _park = self.shared.park.lock().unwrap();
            self.shared.state.store(STOPPED, Ordering::Release);
            self.shared.wake.notify_all();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests;
