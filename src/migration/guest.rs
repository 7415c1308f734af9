//! The guest as the engine sees it: memory, a dirty log, pause/resume/throttle,
//! and a state to carry across.

use crate::memory::{DirtySnapshot, GuestMemory, GuestState, SyntheticGuest, Workload};
use crate::wire::GuestKind;
use std::sync::Arc;

/// What the migration engine needs from a guest backend.
pub trait MigratableGuest: Send + Sync + 'static {
    /// The backend.
    fn kind(&self) -> GuestKind;
    /// Guest memory.
    fn memory(&self) -> &Arc<GuestMemory>;
    /// Moves the dirty log into `out` and clears it (snapshot-and-clear).
    fn snapshot_dirty(&self, out: &mut DirtySnapshot);
    /// Pages dirty now, without clearing (may be approximate while running).
    fn dirty_pages(&self) -> u64;
    /// Stops the guest; returns once it no longer writes memory.
    fn pause(&self);
    /// Runs the guest again.
    fn resume(&self);
    /// Sets the share of time the guest is kept asleep, 0-99%.
    fn set_throttle(&self, pct: u8);
    /// The guest's vCPU/device state, serialized. Called while paused.
    fn save_state(&self) -> Result<Vec<u8>, String>;
    /// A counter that grows while the guest runs (pages written, for the
    /// synthetic guest), to show where it runs.
    fn progress_counter(&self) -> u64;
    /// What the guest writes and how fast, when it is a synthetic guest (an
    /// agent lists an arriving VM with its source's workload).
    fn workload(&self) -> Option<Workload> {
        None
    }
}

impl MigratableGuest for SyntheticGuest {
    fn kind(&self) -> GuestKind {
        GuestKind::Sim
    }
    fn memory(&self) -> &Arc<GuestMemory> {
        SyntheticGuest::memory(self)
    }
    fn snapshot_dirty(&self, out: &mut DirtySnapshot) {
        SyntheticGuest::snapshot_dirty(self, out)
    }
    fn dirty_pages(&self) -> u64 {
        self.bitmap().count()
    }
    fn pause(&self) {
        SyntheticGuest::pause(self)
    }
    fn resume(&self) {
        SyntheticGuest::resume(self)
    }
    fn set_throttle(&self, pct: u8) {
        SyntheticGuest::set_throttle(self, pct)
    }
    fn save_state(&self) -> Result<Vec<u8>, String> {
        serde_json::to_vec(&SyntheticGuest::save_state(self)).map_err(|e| e.to_string())
    }
    fn progress_counter(&self) -> u64 {
        self.pages_written()
    }
    fn workload(&self) -> Option<Workload> {
        Some(SyntheticGuest::workload(self).clone())
    }
}

/// Recreates a paused guest of `kind` from its saved state on `memory`.
pub fn restore_guest(
    kind: GuestKind,
    memory: Arc<GuestMemory>,
    state: &[u8],
) -> Result<Arc<dyn MigratableGuest>, String> {
    match kind {
        GuestKind::Sim => {
            let state: GuestState = serde_json::from_slice(state)
                .map_err(|e| format!("synthetic guest state is invalid: {e}"))?;
            let workload = Workload {
                writers: u32::try_from(state.writers.len()).unwrap_or(u32::MAX),
                ..state.workload.clone()
            };
            workload
                .validate(memory.len_bytes())
                .map_err(|e| format!("synthetic guest state is invalid: {e}"))?;
            Ok(Arc::new(SyntheticGuest::restore(memory, state)))
        }
        #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
        GuestKind::Kvm => match crate::kvm::KvmGuest::restore(memory, state) {
            Ok(g) => Ok(Arc::new(g)),
            Err(e) => Err(error_chain(&e)),
        },
        #[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
        GuestKind::Kvm => Err("this build has no KVM guest backend".into()),
    }
}

/// Why this host cannot run KVM guests, as "DEVICE (reason)", or `None`
/// when it can (the device opens and makes a VM).
pub fn kvm_unavailable() -> Option<String> {
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    return crate::kvm::available().err().map(|e| {
        let why = std::error::Error::source(&e)
            .map(|s| format!(" ({s})"))
            .unwrap_or_default();
        format!("{}{why}", crate::kvm::device())
    });
    #[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
    Some("/dev/kvm (KVM guests need Linux on x86-64)".into())
}

/// Starts a guest of `kind` on `memory` (its content already loaded),
/// running `workload`.
pub fn start_guest(
    kind: GuestKind,
    memory: Arc<GuestMemory>,
    workload: Workload,
) -> Result<Arc<dyn MigratableGuest>, String> {
    match kind {
        GuestKind::Sim => Ok(Arc::new(SyntheticGuest::start(memory, workload))),
        #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
        GuestKind::Kvm => match crate::kvm::KvmGuest::start(memory, workload) {
            Ok(g) => Ok(Arc::new(g)),
            Err(e) => Err(format!("cannot start the KVM guest: {}", error_chain(&e))),
        },
        #[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
        GuestKind::Kvm => Err("KVM guests need Linux on x86-64".into()),
    }
}

/// An error and its sources, one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
impl MigratableGuest for crate::kvm::KvmGuest {
    fn kind(&self) -> GuestKind {
        GuestKind::Kvm
    }
    fn memory(&self) -> &Arc<GuestMemory> {
        crate::kvm::KvmGuest::memory(self)
    }
    fn snapshot_dirty(&self, out: &mut DirtySnapshot) {
        crate::kvm::KvmGuest::snapshot_dirty(self, out)
    }
    fn dirty_pages(&self) -> u64 {
        crate::kvm::KvmGuest::dirty_pages(self)
    }
    fn pause(&self) {
        crate::kvm::KvmGuest::pause(self)
    }
    fn resume(&self) {
        crate::kvm::KvmGuest::resume(self)
    }
    fn set_throttle(&self, pct: u8) {
        crate::kvm::KvmGuest::set_throttle(self, pct)
    }
    fn save_state(&self) -> Result<Vec<u8>, String> {
        let state = crate::kvm::KvmGuest::save_state(self).map_err(|e| error_chain(&e))?;
        serde_json::to_vec(&state).map_err(|e| e.to_string())
    }
    fn progress_counter(&self) -> u64 {
        self.counter()
    }
    fn workload(&self) -> Option<Workload> {
        Some(crate::kvm::KvmGuest::workload(self).clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn restore(state: &str) -> Result<Arc<dyn MigratableGuest>, String> {
        let mem = Arc::new(GuestMemory::new(64 * 4096).unwrap());
        restore_guest(GuestKind::Sim, mem, state.as_bytes())
    }

    fn state(workload: &str, writer: &str) -> String {
        format!(
            r#"{{"workload":{{"pattern":{workload},"content":"zero:1,random:1","writers":1,"seed":1,{{RATE}}}},"writers":[{writer}],"throttle_pct":0}}"#
        )
    }

    #[test]
    fn a_peer_s_extreme_counters_run_on_without_overflow() {
        // Counters at their limits from a peer: the writer wraps, never panics.
        let s = state(
            r#"{"kind":"sequential"}"#,
            &format!(
                r#"{{"word_pos":[{m},{m}],"pages_written":{m},"cursor":{m}}}"#,
                m = u64::MAX
            ),
        )
        .replace("{RATE}", r#""dirty_rate":100000000"#);
        let g = restore(&s).unwrap();
        g.resume();
        std::thread::sleep(std::time::Duration::from_millis(30));
        g.pause();
        assert!(
            g.progress_counter() < 1 << 40,
            "it wrapped: {}",
            g.progress_counter()
        );
    }

    #[test]
    fn a_peer_s_out_of_range_workload_is_refused_naming_its_field() {
        let writer = r#"{"word_pos":[0,0],"pages_written":0,"cursor":0}"#;
        for (pattern, rate, field) in [
            (r#"{"kind":"uniform"}"#, u64::MAX, "dirty_rate"),
            (r#"{"kind":"hot","bytes":0}"#, 1000, "workload"),
            (
                r#"{"kind":"hot","bytes":18446744073709551615}"#,
                1000,
                "workload",
            ),
        ] {
            let s = state(pattern, writer).replace("{RATE}", &format!(r#""dirty_rate":{rate}"#));
            let e = restore(&s).err().expect("refused");
            assert!(e.contains(field), "{field}: {e}");
        }
        let none = state(r#"{"kind":"idle"}"#, "").replace("{RATE}", r#""dirty_rate":0"#);
        assert!(restore(&none).err().unwrap().contains("writers"));
    }
}
