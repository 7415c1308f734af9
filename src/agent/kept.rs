//! Paused last copies kept on the node's disk, so an agent that restarts
//! still holds them: the guest of an unresolved hand-off (until `resolve`
//! settles it), of a VM left paused by a hand-off, and a superseded copy
//! (until an operator deletes it). Each is `{state_dir}/guests/{vm}.guest`
//! (the saved-guest format of `ferry send`, zero pages as holes) with
//! `{vm}.json` beside it saying what it is; both are written whole under a
//! temporary name and renamed into place, the guest first.

use super::node::{VmSpec, VmState};
use crate::migration::saved::{load_guest, save_guest};
use crate::migration::MigratableGuest;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The largest description file read back.
const MAX_META: u64 = 64 << 10;
/// The description's layout.
const VERSION: u32 = 1;

/// What a kept copy is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeptVm {
    /// The layout's version.
    pub version: u32,
    /// The VM.
    pub spec: VmSpec,
    /// `paused` or `superseded`.
    pub state: VmState,
    /// The unresolved migration whose paused copy it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<String>,
    /// That migration's target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

impl KeptVm {
    /// A description of VM `spec` kept as `state`.
    pub fn new(spec: VmSpec, state: VmState, migration: Option<(String, String)>) -> Self {
        let (migration, target) = migration.unzip();
        Self {
            version: VERSION,
            spec,
            state,
            migration,
            target,
        }
    }

    fn check(&self, file_vm: &str) -> Result<(), String> {
        if self.version != VERSION {
            return Err(format!("layout version {}", self.version));
        }
        self.spec.check()?;
        if stem(&self.spec.name) != file_vm {
            return Err(format!("describes VM {:?}", self.spec.name));
        }
        if !matches!(self.state, VmState::Paused | VmState::Superseded) {
            return Err(format!("state {:?} is not kept", self.state));
        }
        for (field, v) in [("migration", &self.migration), ("target", &self.target)] {
            if v.as_ref().is_some_and(|s| !super::node::valid_name(s)) {
                return Err(format!("{field} is not a valid name"));
            }
        }
        Ok(())
    }
}

/// A kept copy's description, read from file `{file_stem}.json`, checked.
pub fn decode_meta(bytes: &[u8], file_stem: &str) -> Result<KeptVm, String> {
    let meta: KeptVm = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    meta.check(file_stem)?;
    Ok(meta)
}

/// The folder of a node's kept copies.
pub fn folder(state_dir: &Path) -> PathBuf {
    state_dir.join("guests")
}

/// Where VM `vm`'s kept guest is.
pub fn guest_path(dir: &Path, vm: &str) -> PathBuf {
    paths(dir, vm).0
}

/// The longest VM name used whole in a file name (a name may be 255
/// bytes, a file name too, with `.guest` after it).
const WHOLE_NAME: usize = 200;

/// The files' stem for VM `vm`: its name, or for a long one its first
/// 180 bytes and a checksum of the whole (the description says which VM).
pub(super) fn stem(vm: &str) -> String {
    if vm.len() <= WHOLE_NAME {
        vm.to_string()
    } else {
        // VM names are ASCII: any byte index is a boundary.
        format!("{}-{:08x}", &vm[..180], crc32fast::hash(vm.as_bytes()))
    }
}

fn paths(dir: &Path, vm: &str) -> (PathBuf, PathBuf) {
    let stem = stem(vm);
    (
        dir.join(format!("{stem}.guest")),
        dir.join(format!("{stem}.json")),
    )
}

/// Saves paused `guest` as `meta` says, replacing an older copy of the VM.
pub fn save(dir: &Path, meta: &KeptVm, guest: &dyn MigratableGuest) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let vm = &meta.spec.name;
    let (guest_path, meta_path) = paths(dir, vm);
    let nonce = format!("{}.{}", std::process::id(), super::node::now_ms());
    // `~` is in no VM's name: a temporary file is never taken for a copy.
    let short = format!("{:08x}", crc32fast::hash(vm.as_bytes()));
    let tmp = dir.join(format!("~{short}.{nonce}.guest"));
    save_guest(guest, &tmp)?;
    std::fs::rename(&tmp, &guest_path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })?;
    let tmp = dir.join(format!("~{short}.{nonce}.json"));
    let json = serde_json::to_vec_pretty(meta).map_err(std::io::Error::other)?;
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(&json)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &meta_path)?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(guest_path)
}

/// Removes VM `vm`'s kept copy (its description first, so a crash between
/// leaves an undescribed file that is never loaded, and says so).
pub fn remove(dir: &Path, vm: &str) -> std::io::Result<()> {
    let (guest_path, meta_path) = paths(dir, vm);
    for p in [meta_path, guest_path] {
        match std::fs::remove_file(&p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

/// A kept copy read back.
pub struct Restored {
    /// What it is.
    pub meta: KeptVm,
    /// Its guest, paused.
    pub guest: Arc<dyn MigratableGuest>,
    /// Where it is.
    pub path: PathBuf,
}

/// Reads every kept copy in `dir`; one that cannot be read is named in the
/// log and left on disk.
pub fn load_all(dir: &Path) -> Vec<Restored> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let text = name.to_string_lossy();
        if text.starts_with('~') {
            // Left by a save its agent did not finish: it may hold the
            // newest state of a guest that died with that agent, so it
            // stays for the operator, who is told.
            tracing::warn!(
                file = %entry.path().display(),
                bytes = entry.metadata().map(|m| m.len()).unwrap_or(0),
                "a kept copy's unfinished save is on disk: not loaded; delete it once it is not wanted"
            );
            continue;
        }
        let Some(vm) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
            continue;
        };
        match load_one(dir, vm) {
            Ok(r) => out.push(r),
            Err(e) => tracing::error!(
                vm,
                dir = %dir.display(),
                error = %e,
                "a kept copy cannot be loaded: it stays on disk, not loaded"
            ),
        }
    }
    out
}

fn load_one(dir: &Path, file_stem: &str) -> Result<Restored, String> {
    if !super::node::valid_name(file_stem) {
        return Err("not a valid VM name".into());
    }
    let (guest_path, meta_path) = (
        dir.join(format!("{file_stem}.guest")),
        dir.join(format!("{file_stem}.json")),
    );
    let len = std::fs::metadata(&meta_path)
        .map_err(|e| e.to_string())?
        .len();
    if len > MAX_META {
        return Err(format!("{} is over {MAX_META} bytes", meta_path.display()));
    }
    let bytes = std::fs::read(&meta_path).map_err(|e| e.to_string())?;
    let meta = decode_meta(&bytes, file_stem)?;
    let guest = load_guest(&guest_path)?;
    if guest.kind() != meta.spec.guest || guest.memory().len_bytes() != meta.spec.memory {
        return Err(format!(
            "{} holds a {:?} guest of {} bytes, not the {:?} guest of {} bytes described",
            guest_path.display(),
            guest.kind(),
            guest.memory().len_bytes(),
            meta.spec.guest,
            meta.spec.memory
        ));
    }
    guest.pause();
    Ok(Restored {
        meta,
        guest,
        path: guest_path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_name_keeps_its_files_within_a_file_names_limit() {
        let long = "v".repeat(255);
        let (guest, meta) = paths(Path::new("/k"), &long);
        for p in [&guest, &meta] {
            assert!(p.file_name().unwrap().len() <= 255, "{}", p.display());
        }
        assert_ne!(stem(&long), stem(&format!("{}w", "v".repeat(254))));
        assert_eq!(stem("web-1"), "web-1");
    }
}
