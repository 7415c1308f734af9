//! A paused guest saved to a file (memory and state), so that nothing is
//! lost when a standalone migration ends unresolved: `ferry send` writes one,
//! and `ferry send --saved FILE` moves it later.
//!
//! ```text
//! offset size field
//!      0    8 magic "FERRYGST"
//!      8    4 version (2; 1: the digest counts zero pages too)
//!     12    1 guest kind
//!     13    1 flags (1: consumed: its guest was handed over by a send)
//!     14    2 reserved (0)
//!     16    8 memory bytes (a multiple of 4096)
//!     24    8 full digest of the memory
//!     32    4 state length (at most 16 MiB)
//!     36    4 when it was consumed, Unix seconds (0 until then)
//!     40    … state, then zeros up to the next 4096-byte boundary
//!      M    … memory; all-zero pages are holes in a sparse file
//! ```

use super::{restore_guest, MigratableGuest};
use crate::codec::is_zero_page;
use crate::digest::full_digest;
use crate::memory::{GuestMemory, MAX_MEMORY_BYTES, PAGE_SIZE};
use crate::page::PageIndex;
use crate::wire::GuestKind;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

const MAGIC: &[u8; 8] = b"FERRYGST";
const VERSION: u32 = 2;
const HEADER: usize = 40;
/// The largest state a saved guest may hold.
pub const MAX_STATE: usize = 16 << 20;

fn memory_offset(state_len: usize) -> u64 {
    ((HEADER + state_len) as u64).div_ceil(PAGE_SIZE as u64) * PAGE_SIZE as u64
}

/// Header flag: the file's guest was handed over (GO sent) by a send.
const CONSUMED: u8 = 1;

/// Writes paused `guest` to `path`, which must not exist: it is written to a
/// temporary file (mode 600) beside it and linked into place only when
/// whole, so a crash leaves no half-written file under the name and an
/// existing file (another guest's last copy) is never replaced.
pub fn save_guest(guest: &dyn MigratableGuest, path: &Path) -> std::io::Result<()> {
    if path.symlink_metadata().is_ok() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!(
                "{} exists: refusing to overwrite it (it may hold another guest)",
                path.display()
            ),
        ));
    }
    let mem = guest.memory();
    let state = guest.save_state().map_err(std::io::Error::other)?;
    if state.len() > MAX_STATE {
        return Err(std::io::Error::other("guest state exceeds 16 MiB"));
    }
    let digest = full_digest(mem, 2);
    let mut head = Vec::with_capacity(HEADER + state.len());
    head.extend_from_slice(MAGIC);
    head.extend_from_slice(&VERSION.to_le_bytes());
    head.push(guest.kind() as u8);
    head.extend_from_slice(&[0; 3]);
    head.extend_from_slice(&mem.len_bytes().to_le_bytes());
    head.extend_from_slice(&digest.to_le_bytes());
    head.extend_from_slice(&(state.len() as u32).to_le_bytes());
    head.extend_from_slice(&[0; 4]);
    head.extend_from_slice(&state);
    let tmp = path.with_extension(format!("partial-{}", std::process::id()));
    let written = (|| {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&head)?;
        let base = memory_offset(state.len());
        let mut page = vec![0u8; PAGE_SIZE];
        for i in 0..mem.pages() {
            mem.read_page(PageIndex(i), &mut page);
            if !is_zero_page(&page) {
                f.write_all_at(&page, base + i * PAGE_SIZE as u64)?;
            }
        }
        f.set_len(base + mem.len_bytes())?;
        f.sync_all()?;
        // A link fails if the name was taken meanwhile: nothing is replaced.
        std::fs::hard_link(&tmp, path)?;
        sync_dir(path)
    })();
    let _ = std::fs::remove_file(&tmp);
    written
}

/// Makes a new name in `path`'s folder durable.
fn sync_dir(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()
}

/// Marks the saved guest in `path` consumed: its guest was handed over (GO
/// sent), so the file must never be sent again. Durable before it returns.
pub fn mark_consumed(path: &Path) -> std::io::Result<()> {
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    f.write_all_at(&(now.min(u64::from(u32::MAX)) as u32).to_le_bytes(), 36)?;
    f.write_all_at(&[CONSUMED], 13)?;
    f.sync_all()
}

/// Reads a saved guest back, paused, after checking its digest.
pub fn load_guest(path: &Path) -> Result<Arc<dyn MigratableGuest>, String> {
    let what = |e: std::io::Error| format!("{}: {e}", path.display());
    let f = std::fs::File::open(path).map_err(what)?;
    let size = f.metadata().map_err(what)?.len();
    let mut head = [0u8; HEADER];
    f.read_exact_at(&mut head, 0)
        .map_err(|_| format!("{} is too short to be a saved guest", path.display()))?;
    if &head[..8] != MAGIC {
        return Err(format!("{} is not a saved ferry guest", path.display()));
    }
    let u32_at = |o: usize| u32::from_le_bytes(head[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(head[o..o + 8].try_into().unwrap());
    let version = u32_at(8);
    if version != VERSION && version != 1 {
        return Err(format!(
            "{}: saved-guest version {version} (this build reads 1 and {VERSION})",
            path.display(),
        ));
    }
    let kind = match head[12] {
        0 => GuestKind::Sim,
        1 => GuestKind::Kvm,
        k => return Err(format!("{}: unknown guest kind {k}", path.display())),
    };
    if head[13] & CONSUMED != 0 {
        return Err(format!(
            "{} was consumed: its guest was handed over to a destination at Unix time {} (GO sent); sending it again could run it twice, so it is refused. If that migration ended unresolved, ferry saved the guest again under a new name",
            path.display(),
            u32_at(36)
        ));
    }
    let (memory_bytes, digest, state_len) = (u64_at(16), u64_at(24), u32_at(32) as usize);
    if memory_bytes == 0 || memory_bytes % PAGE_SIZE as u64 != 0 || memory_bytes > MAX_MEMORY_BYTES
    {
        return Err(format!(
            "{}: memory size {memory_bytes} is invalid",
            path.display()
        ));
    }
    if state_len > MAX_STATE {
        return Err(format!(
            "{}: state of {state_len} bytes exceeds 16 MiB",
            path.display()
        ));
    }
    let base = memory_offset(state_len);
    if size != base + memory_bytes {
        return Err(format!(
            "{}: {size} bytes where the header promises {}: truncated or damaged",
            path.display(),
            base + memory_bytes
        ));
    }
    let mut state = vec![0u8; state_len];
    f.read_exact_at(&mut state, HEADER as u64).map_err(what)?;
    let mem = Arc::new(GuestMemory::new(memory_bytes).map_err(|e| e.to_string())?);
    let mut page = vec![0u8; PAGE_SIZE];
    for i in 0..mem.pages() {
        f.read_exact_at(&mut page, base + i * PAGE_SIZE as u64)
            .map_err(what)?;
        if !is_zero_page(&page) {
            mem.write_page(PageIndex(i), &page);
        }
    }
    let computed = if version == 1 {
        crate::digest::full_digest_v1(&mem, 2)
    } else {
        full_digest(&mem, 2)
    };
    if computed != digest {
        return Err(format!(
            "{}: memory does not match its digest: damaged",
            path.display()
        ));
    }
    restore_guest(kind, mem, &state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{FillSpec, SyntheticGuest, Workload, WorkloadPattern};

    #[test]
    fn a_saved_guest_comes_back_identical_and_damage_is_refused() {
        let mem = Arc::new(GuestMemory::new(8 << 20).unwrap());
        FillSpec::default().fill(&mem, 3, 1);
        let g = SyntheticGuest::start(
            mem.clone(),
            Workload {
                pattern: WorkloadPattern::Uniform,
                dirty_rate: 10_000_000,
                content: FillSpec::default(),
                writers: 1,
                seed: 3,
            },
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
        g.pause();
        let dir = std::env::temp_dir().join(format!("ferry-saved-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("g.guest");
        save_guest(&g, &path).unwrap();
        let back = load_guest(&path).unwrap();
        assert_eq!(full_digest(back.memory(), 1), full_digest(&mem, 1));
        assert_eq!(back.save_state(), MigratableGuest::save_state(&g));
        // One flipped byte of memory, or a cut file, is refused.
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let len = f.metadata().unwrap().len();
        f.write_all_at(&[0x5a], len - 100).unwrap();
        assert!(load_guest(&path).err().unwrap().contains("digest"));
        f.set_len(len - 4096).unwrap();
        assert!(load_guest(&path).err().unwrap().contains("truncated"));
        std::fs::write(&path, b"hello").unwrap();
        assert!(load_guest(&path).err().unwrap().contains("too short"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_save_never_replaces_a_file_and_is_private_and_a_consumed_file_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let mem = Arc::new(GuestMemory::new(1 << 20).unwrap());
        let idle = Workload {
            pattern: WorkloadPattern::Idle,
            dirty_rate: 0,
            content: FillSpec::default(),
            writers: 1,
            seed: 1,
        };
        let g = SyntheticGuest::start(mem, idle);
        g.pause();
        let dir = std::env::temp_dir().join(format!("ferry-saved-once-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("g.guest");
        std::fs::write(&path, b"another guest's last copy").unwrap();
        let e = save_guest(&g, &path).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&path).unwrap(), b"another guest's last copy");
        std::fs::remove_file(&path).unwrap();
        save_guest(&g, &path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            1,
            "no temporary file left"
        );
        load_guest(&path).unwrap();
        mark_consumed(&path).unwrap();
        let e = load_guest(&path).err().unwrap();
        assert!(e.contains("was consumed"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_version_1_file_with_its_digest_still_loads() {
        let mem = Arc::new(GuestMemory::new(1 << 20).unwrap());
        FillSpec::default().fill(&mem, 5, 1);
        let idle = Workload {
            pattern: WorkloadPattern::Idle,
            dirty_rate: 0,
            content: FillSpec::default(),
            writers: 1,
            seed: 1,
        };
        let g = SyntheticGuest::start(mem.clone(), idle);
        g.pause();
        let dir = std::env::temp_dir().join(format!("ferry-saved-v1-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("g.guest");
        save_guest(&g, &path).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&1u32.to_le_bytes(), 8).unwrap();
        // The new digest under the old version is refused: the file says v1.
        assert!(load_guest(&path).err().unwrap().contains("digest"));
        let v1 = crate::digest::full_digest_v1(&mem, 1);
        f.write_all_at(&v1.to_le_bytes(), 24).unwrap();
        let back = load_guest(&path).unwrap();
        assert_eq!(full_digest(back.memory(), 1), full_digest(&mem, 1));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
