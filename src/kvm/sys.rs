//! The two places the KVM guest needs `unsafe`: giving KVM guest memory as a
//! memory slot, and reading a slot's dirty log into a buffer that is reused.

#![allow(unsafe_code)]

use crate::memory::GuestMemory;
use kvm_bindings::{
    kvm_dirty_log, kvm_userspace_memory_region, kvm_xsave, KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::{VcpuFd, VmFd};
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iow_nr;

const KVMIO: u32 = 0xAE;
ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);

/// Registers all of `memory` as slot `slot` at guest-physical address 0, with
/// dirty logging on.
///
/// # Safety
/// `memory` must stay mapped for as long as `vm` exists: the caller keeps
/// both in one struct, the VM declared (and so dropped) first.
pub unsafe fn register_memory(
    vm: &VmFd,
    slot: u32,
    memory: &GuestMemory,
) -> Result<(), kvm_ioctls::Error> {
    let region = kvm_userspace_memory_region {
        slot,
        flags: KVM_MEM_LOG_DIRTY_PAGES,
        guest_phys_addr: 0,
        memory_size: memory.len_bytes(),
        userspace_addr: memory.host_addr() as u64,
    };
    // SAFETY: the region is exactly the mapping of `memory` (its host address
    // and length), which the caller keeps alive as long as the VM.
    unsafe { vm.set_user_memory_region(region) }
}

/// A slot's dirty bitmap, fetched with `KVM_GET_DIRTY_LOG` into one buffer
/// for the life of the guest (kvm-ioctls' wrapper allocates one per call).
#[derive(Debug)]
pub struct DirtyLog {
    words: Vec<u64>,
}

impl DirtyLog {
    /// A buffer for a slot of `pages` pages.
    pub fn new(pages: u64) -> Self {
        Self {
            words: vec![0; pages.div_ceil(64) as usize],
        }
    }

    /// Fetches and clears the slot's log (the kernel write-protects the
    /// pages again); returns one bit per page, 64 pages a word.
    pub fn fetch(&mut self, vm: &VmFd, slot: u32) -> Result<&[u64], kvm_ioctls::Error> {
        let log = kvm_dirty_log {
            slot,
            padding1: 0,
            __bindgen_anon_1: kvm_bindings::kvm_dirty_log__bindgen_ty_1 {
                dirty_bitmap: self.words.as_mut_ptr().cast(),
            },
        };
        // SAFETY: `vm` is a VM fd and `slot` one of its slots of at most
        // `64 × words.len()` pages (the buffer was sized for it in `new`), so
        // the kernel writes inside the buffer; it lives across the call.
        let rc = unsafe { ioctl_with_ref(vm, KVM_GET_DIRTY_LOG(), &log) };
        if rc != 0 {
            return Err(kvm_ioctls::Error::last());
        }
        Ok(&self.words)
    }
}

/// `KVM_SET_XSAVE` with the legacy 4 KiB structure.
pub fn set_xsave(vcpu: &VcpuFd, xsave: &kvm_xsave) -> Result<(), kvm_ioctls::Error> {
    // SAFETY: kvm-ioctls marks set_xsave unsafe because a buffer from
    // KVM_GET_XSAVE2 may be larger than `kvm_xsave`; ours is a whole legacy
    // structure (from KVM_GET_XSAVE), exactly what this ioctl reads.
    unsafe { vcpu.set_xsave(xsave) }
}
