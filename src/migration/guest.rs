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
    fn save_state(&self) -> Vec<u8>;
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
    fn save_state(&self) -> Vec<u8> {
        serde_json::to_vec(&SyntheticGuest::save_state(self)).expect("guest state serializes")
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
            if state.writers.len() > 256 {
                return Err(format!(
                    "synthetic guest state has {} writers (at most 256)",
                    state.writers.len()
                ));
            }
            Ok(Arc::new(SyntheticGuest::restore(memory, state)))
        }
        GuestKind::Kvm => Err("this build has no KVM guest backend".into()),
    }
}
