//! The guest an engine command migrates: its memory (`--memory`, `--fill`,
//! `--image`), its backend and workload, and how it is described; and the
//! helpers the engine commands share (usage errors, `--key`, outcome names).

use crate::cli::args::*;
use crate::UsageError;
use anyhow::Result;
use ferry::memory::{FillSpec, GuestMemory, Workload, WorkloadPattern};
use ferry::migration::{MigratableGuest, Outcome};
use ferry::units::{compact_size, Bytes, Rate};
use std::sync::Arc;

pub fn usage(msg: impl Into<String>) -> anyhow::Error {
    UsageError(msg.into()).into()
}

/// The workload asked for, or the default hot set (64 MiB, at most all memory).
pub fn workload_for(g: &GuestArgs, memory_bytes: u64) -> Result<WorkloadPattern> {
    match g.workload {
        None => Ok(WorkloadPattern::Hot {
            bytes: (64u64 << 20).min(memory_bytes),
        }),
        Some(WorkloadPattern::Hot { bytes }) if bytes > memory_bytes => Err(usage(format!(
            "--workload hot:{} is larger than the guest's {}",
            compact_size(bytes),
            compact_size(memory_bytes)
        ))),
        Some(w) => Ok(w),
    }
}

/// Guest memory from `--image` or `--memory` and `--fill`, and the content mix
/// its workload writes.
pub fn build_memory(m: &MemoryArgs, announce: bool) -> Result<(GuestMemory, FillSpec)> {
    match &m.image {
        Some(path) => {
            let mem = GuestMemory::from_image(path).map_err(|e| usage(format!("{e:#}")))?;
            if let Some(bytes) = m.memory {
                if bytes != mem.len_bytes() {
                    return Err(usage(format!(
                        "--memory {} disagrees with the image's size {} ({})",
                        bytes,
                        mem.len_bytes(),
                        path.display()
                    )));
                }
            }
            Ok((mem, FillSpec::default()))
        }
        None => {
            let bytes = m.memory.unwrap_or(1 << 30);
            let mem = GuestMemory::new(bytes).map_err(|e| usage(format!("--memory: {e}")))?;
            if announce {
                eprintln!("filling {} of guest memory...", Bytes(bytes));
            }
            m.fill.fill(&mem, m.seed, 2);
            Ok((mem, m.fill.clone()))
        }
    }
}

pub fn build_guest(
    g: &GuestArgs,
    backend: GuestBackend,
    announce: bool,
) -> Result<(Arc<dyn MigratableGuest>, WorkloadPattern)> {
    if backend == GuestBackend::Kvm {
        check_kvm()?;
        if g.writers != 1 {
            return Err(usage(
                "--writers applies to --guest sim: a KVM guest runs one vCPU",
            ));
        }
    }
    if g.dirty_rate > ferry::memory::MAX_DIRTY_RATE {
        return Err(usage(format!(
            "--dirty-rate: {} is out of range (at most {}/s)",
            g.dirty_rate,
            Bytes(ferry::memory::MAX_DIRTY_RATE)
        )));
    }
    if g.mem.image.is_none() {
        workload_for(g, g.mem.memory.unwrap_or(1 << 30))?;
    }
    let (memory, content) = build_memory(&g.mem, announce)?;
    let pattern = workload_for(g, memory.len_bytes())?;
    let workload = Workload {
        pattern,
        dirty_rate: g.dirty_rate,
        content,
        writers: g.writers,
        seed: g.mem.seed,
    };
    let guest = ferry::migration::start_guest(backend.kind(), Arc::new(memory), workload)
        .map_err(anyhow::Error::msg)?;
    Ok((guest, pattern))
}

/// `--guest kvm` needs a working `/dev/kvm`: one line saying so, if not.
pub fn check_kvm() -> Result<()> {
    match ferry::migration::kvm_unavailable() {
        Some(why) => Err(anyhow::anyhow!("--guest kvm needs a working {why}")),
        None => Ok(()),
    }
}

/// Where memory content comes from: `fill zero:35,...` or `image FILE`.
pub fn content_of(m: &MemoryArgs) -> String {
    match &m.image {
        Some(p) => format!("image {}", p.display()),
        None => format!("fill {}", m.fill),
    }
}

pub fn describe_guest(
    g: &GuestArgs,
    guest: &dyn MigratableGuest,
    pattern: WorkloadPattern,
) -> String {
    let kind = match guest.kind() {
        ferry::wire::GuestKind::Sim => "synthetic guest",
        ferry::wire::GuestKind::Kvm => "KVM guest (1 vCPU)",
    };
    format!(
        "{} {kind} ({}), workload {} at {}",
        Bytes(guest.memory().len_bytes()),
        content_of(&g.mem),
        pattern,
        Rate(g.dirty_rate as f64)
    )
}

/// Reads a `--key` file, refusing one every user may read.
pub fn load_key(path: &std::path::Path) -> Result<ferry::migration::auth::SessionKey> {
    ferry::migration::auth::SessionKey::load(path).map_err(|e| usage(format!("--key: {e}")))
}

pub fn outcome_name(o: Outcome) -> &'static str {
    match o {
        Outcome::Completed => "completed",
        Outcome::Failed => "failed",
        Outcome::Cancelled => "cancelled",
        Outcome::Unresolved => "unresolved",
    }
}
