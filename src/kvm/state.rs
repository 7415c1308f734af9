//! A vCPU's architectural state: captured at the switchover, carried in the
//! SWITCHOVER message, restored on the destination before the guest runs.
//!
//! What is kept is what a guest needs to carry on exactly: general and
//! special registers, the FPU/SSE state (XSAVE where KVM offers it), XCRs,
//! debug registers, pending events, the multiprocessor state, and every MSR
//! the kernel lists as saved and lets us read (the TSC among them, so time
//! goes on where it stopped).

use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events,
    kvm_xcrs, kvm_xsave, Msrs,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

/// At most this many MSRs travel (the kernel's own limit per call).
pub const MAX_MSRS: usize = kvm_bindings::KVM_MAX_MSR_ENTRIES;

/// The legacy FPU/SSE state, for kernels without XSAVE (kvm-bindings has no
/// serde for `kvm_fpu`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[allow(missing_docs)] // the fields of `struct kvm_fpu`
pub struct FpuState {
    pub fpr: Vec<[u8; 16]>,
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: Vec<[u8; 16]>,
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        Self {
            fpr: f.fpr.to_vec(),
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm.to_vec(),
            mxcsr: f.mxcsr,
        }
    }
}

impl FpuState {
    fn to_kvm(&self) -> Result<kvm_fpu, String> {
        let mut f = kvm_fpu {
            fcw: self.fcw,
            fsw: self.fsw,
            ftwx: self.ftwx,
            last_opcode: self.last_opcode,
            last_ip: self.last_ip,
            last_dp: self.last_dp,
            mxcsr: self.mxcsr,
            ..Default::default()
        };
        if self.fpr.len() != f.fpr.len() || self.xmm.len() != f.xmm.len() {
            return Err(format!(
                "FPU state has {} x87 and {} XMM registers (8 and 16 expected)",
                self.fpr.len(),
                self.xmm.len()
            ));
        }
        f.fpr.copy_from_slice(&self.fpr);
        f.xmm.copy_from_slice(&self.xmm);
        Ok(f)
    }
}

/// One vCPU's state.
#[derive(Debug, Serialize, Deserialize)]
#[allow(missing_docs)] // each field is the KVM structure of the same name
pub struct VcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub fpu: FpuState,
    pub xsave: Option<kvm_xsave>,
    pub xcrs: Option<kvm_xcrs>,
    pub debugregs: kvm_debugregs,
    pub events: kvm_vcpu_events,
    pub mp_state: kvm_mp_state,
    /// `(index, value)` pairs.
    pub msrs: Vec<(u32, u64)>,
}

/// Why a state could not be captured or restored.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// An ioctl failed.
    #[error("cannot {what} the vCPU's state")]
    Ioctl {
        /// What was being done (`get registers`, `set MSRs`, ...).
        what: &'static str,
        /// The kernel's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The state is malformed (from a peer).
    #[error("vCPU state is invalid: {0}")]
    Invalid(String),
}

fn ioctl<T>(what: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, StateError> {
    r.map_err(|source| StateError::Ioctl { what, source })
}

/// The MSRs of this host worth saving: the kernel's list, less those a
/// vCPU refuses to read. Found once per guest, so a capture is one ioctl.
pub fn saved_msrs(kvm: &Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>, StateError> {
    let list = ioctl("list the MSRs of", kvm.get_msr_index_list())?;
    let mut candidates: Vec<u32> = list.as_slice().iter().copied().take(MAX_MSRS).collect();
    let mut good = Vec::with_capacity(candidates.len());
    // KVM_GET_MSRS stops at the first MSR it cannot read and says how many it
    // read: keep those, skip the one that failed, go on with the rest.
    while !candidates.is_empty() {
        let read = read_msrs(vcpu, &candidates)?;
        good.extend(read.iter().map(|&(i, _)| i));
        let skip = read.len() + 1;
        candidates.drain(..skip.min(candidates.len()));
    }
    Ok(good)
}

fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<(u32, u64)>, StateError> {
    let entries: Vec<kvm_msr_entry> = indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut msrs = Msrs::from_entries(&entries)
        .map_err(|e| StateError::Invalid(format!("too many MSRs: {e:?}")))?;
    let n = ioctl("read MSRs of", vcpu.get_msrs(&mut msrs))?;
    Ok(msrs.as_slice()[..n]
        .iter()
        .map(|e| (e.index, e.data))
        .collect())
}

impl VcpuState {
    /// Captures `vcpu`'s state. The vCPU must be stopped with no exit pending
    /// (see the VMM's pause).
    pub fn capture(vcpu: &VcpuFd, kvm: &Kvm, msrs: &[u32]) -> Result<Self, StateError> {
        let xsave = if kvm.check_extension(Cap::Xsave) {
            Some(ioctl("get XSAVE of", vcpu.get_xsave())?)
        } else {
            None
        };
        let xcrs = if kvm.check_extension(Cap::Xcrs) {
            Some(ioctl("get XCRs of", vcpu.get_xcrs())?)
        } else {
            None
        };
        let msrs = read_msrs(vcpu, msrs)?;
        Ok(Self {
            regs: ioctl("get registers of", vcpu.get_regs())?,
            sregs: ioctl("get special registers of", vcpu.get_sregs())?,
            fpu: FpuState::from(&ioctl("get the FPU of", vcpu.get_fpu())?),
            xsave,
            xcrs,
            debugregs: ioctl("get debug registers of", vcpu.get_debug_regs())?,
            events: ioctl("get events of", vcpu.get_vcpu_events())?,
            mp_state: ioctl("get the MP state of", vcpu.get_mp_state())?,
            msrs,
        })
    }

    /// Checks what can be checked without a vCPU (a state from a peer).
    pub fn check(&self) -> Result<(), StateError> {
        if self.msrs.len() > MAX_MSRS {
            return Err(StateError::Invalid(format!(
                "{} MSRs (at most {MAX_MSRS})",
                self.msrs.len()
            )));
        }
        self.fpu.to_kvm().map(|_| ()).map_err(StateError::Invalid)
    }

    /// Restores the state into `vcpu` (CPUID already set), in the order
    /// Firecracker and Cloud Hypervisor use. Returns the MSRs the vCPU
    /// refused (it stops at the first refusal; the rest are set after it).
    pub fn restore(&self, vcpu: &VcpuFd, kvm: &Kvm) -> Result<Vec<u32>, StateError> {
        self.check()?;
        ioctl("set the MP state of", vcpu.set_mp_state(self.mp_state))?;
        ioctl("set registers of", vcpu.set_regs(&self.regs))?;
        ioctl("set special registers of", vcpu.set_sregs(&self.sregs))?;
        let fpu = self.fpu.to_kvm().map_err(StateError::Invalid)?;
        ioctl("set the FPU of", vcpu.set_fpu(&fpu))?;
        if let Some(xsave) = &self.xsave {
            if kvm.check_extension(Cap::Xsave) {
                ioctl("set XSAVE of", super::sys::set_xsave(vcpu, xsave))?;
            }
        }
        if let Some(xcrs) = &self.xcrs {
            if kvm.check_extension(Cap::Xcrs) {
                ioctl("set XCRs of", vcpu.set_xcrs(xcrs))?;
            }
        }
        ioctl(
            "set debug registers of",
            vcpu.set_debug_regs(&self.debugregs),
        )?;
        let mut refused = Vec::new();
        let mut rest: &[(u32, u64)] = &self.msrs;
        while !rest.is_empty() {
            let entries: Vec<kvm_msr_entry> = rest
                .iter()
                .map(|&(index, data)| kvm_msr_entry {
                    index,
                    data,
                    ..Default::default()
                })
                .collect();
            let msrs = Msrs::from_entries(&entries)
                .map_err(|e| StateError::Invalid(format!("MSRs: {e:?}")))?;
            let n = ioctl("set MSRs of", vcpu.set_msrs(&msrs))?;
            if n < rest.len() {
                refused.push(rest[n].0);
            }
            rest = &rest[(n + 1).min(rest.len())..];
        }
        ioctl("set events of", vcpu.set_vcpu_events(&self.events))?;
        Ok(refused)
    }
}
