//! Failback retention: the image each VM left this node with, kept with its
//! page hashes (`migration::retained`) as `{dir}/{vm}.retained` beside
//! `{vm}.json`, within the node's `failback_retention` budget of disk, the
//! oldest evicted first. A retained image is a cache, never a last copy: a
//! damaged or half-written one is dropped. Never counted against the node's
//! `memory_capacity`.

use crate::memory::{GuestMemory, PAGE_SIZE};
use crate::migration::retained::{self, Retained};
use crate::transport::BaseImage;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The largest description file read back.
const MAX_META: u64 = 64 << 10;
/// The description's layout.
const VERSION: u32 = 1;

/// One retained image, as `GET /v1/node` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetainedView {
    /// The VM that left.
    pub vm: String,
    /// The migration it left by.
    pub migration: String,
    /// When it left, ms since the Unix epoch.
    pub at_ms: u64,
    /// Its memory, bytes.
    pub memory: u64,
    /// The digest of the memory kept.
    pub digest: u64,
    /// Disk the image takes (zero pages take none).
    pub bytes: u64,
    /// The incarnation of the VM it is an image of (`VmSpec::incarnation`;
    /// 0: unknown, never a base).
    #[serde(default)]
    pub incarnation: u64,
    /// The RAM image that VM was made from (`VmSpec::image`), if any: a VM
    /// made from the same one may start from this image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

/// Hashes of an image's pages one answer of `GET /v1/retained/{vm}/hashes`
/// carries at most: 8 MiB of them.
pub const MAX_HASHES: u64 = 1 << 20;

/// The description beside an image.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Meta {
    version: u32,
    #[serde(flatten)]
    view: RetainedView,
}

/// Decodes the description of a retained image, checked.
pub(crate) fn decode_meta(bytes: &[u8]) -> Result<Meta, String> {
    if bytes.len() as u64 > MAX_META {
        return Err(format!(
            "description of {} bytes, over {MAX_META}",
            bytes.len()
        ));
    }
    let meta: Meta = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if meta.version != VERSION {
        return Err(format!("description version {}", meta.version));
    }
    if !super::node::valid_name(&meta.view.vm) {
        return Err(format!("vm {:?} is not a VM's name", meta.view.vm));
    }
    let m = &meta.view.migration;
    if m.is_empty() || m.len() > 128 || !m.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!("migration {m:?} is not a migration id"));
    }
    if let Some(i) = &meta.view.image {
        if i.is_empty() || i.len() > super::node::MAX_IMAGE_PATH {
            return Err(format!("image: a path of {} bytes", i.len()));
        }
    }
    if meta.view.memory == 0 || !meta.view.memory.is_multiple_of(PAGE_SIZE as u64) {
        return Err(format!(
            "memory {} is not a non-zero multiple of 4096",
            meta.view.memory
        ));
    }
    Ok(meta)
}

/// `GET /v1/node`'s `failback_retention`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RetentionView {
    /// Where the images are.
    pub dir: String,
    /// The most disk they may take, bytes (0: none are kept).
    pub budget: u64,
    /// The disk they take now.
    pub used: u64,
    /// Oldest first.
    pub images: Vec<RetainedView>,
}

/// The node's retained images.
#[derive(Debug)]
pub struct Retention {
    dir: PathBuf,
    budget: u64,
    /// The most memory an image read back may have (the node's capacity).
    max_memory: u64,
    kept: Mutex<Kept>,
    /// Held while an image is written: one at a time, as they share a disk.
    writing: Mutex<()>,
    /// Held while a kin's copy is tagged: one at a time, as they share the
    /// cores with the node's migrations.
    tagging: Mutex<()>,
}

/// What is kept, and what is being written.
#[derive(Debug, Default)]
struct Kept {
    images: BTreeMap<String, RetainedView>,
    /// Writes under way, by VM. A later write or a removal replaces or
    /// drops the entry, and the write it belonged to then discards its file.
    pending: BTreeMap<String, Pending>,
    next: u64,
}

/// A write under way: its generation and the disk it reserves.
#[derive(Debug)]
struct Pending {
    generation: u64,
    need: u64,
}

impl Kept {
    fn used(&self) -> u64 {
        let kept: u64 = self.images.values().map(|v| v.bytes).sum();
        kept.saturating_add(self.pending.values().map(|p| p.need).sum())
    }
}

/// Whether `path` is a file a write to a retention folder left half done.
fn half_written(path: &Path) -> bool {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    matches!(
        ext,
        "retained-tmp" | "meta-tmp" | "json-partial" | "json-trash" | "image-trash"
    ) || ext.starts_with("partial-")
}

impl Retention {
    /// The images kept in `dir` by an earlier process, checked (a damaged or
    /// incomplete one is removed), evicted down to `budget`.
    pub fn open(dir: &Path, budget: u64, max_memory: u64) -> Self {
        let r = Self {
            dir: dir.to_path_buf(),
            budget,
            max_memory,
            kept: Mutex::default(),
            writing: Mutex::default(),
            tagging: Mutex::default(),
        };
        let Ok(entries) = std::fs::read_dir(dir) else {
            return r;
        };
        let mut files: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        files.sort();
        let mut found = BTreeMap::new();
        for path in &files {
            if path.extension().is_some_and(|e| e == "json") {
                match read_meta(path, max_memory) {
                    Ok(v) => {
                        found.insert(v.vm.clone(), v);
                    }
                    // Not a description of ours: left alone.
                    Err(Unusable::NotOurs(why)) => {
                        tracing::warn!(file = %path.display(), "not a retained image's description, left alone: {why}")
                    }
                    Err(Unusable::Damaged(why)) => {
                        tracing::warn!(file = %path.display(), "dropping a retained image: {why}");
                        let _ = std::fs::remove_file(path);
                    }
                }
            }
        }
        // Whatever no good description names goes: partial writes, orphans.
        let stems: std::collections::BTreeSet<String> =
            found.keys().map(|vm| super::kept::stem(vm)).collect();
        for path in &files {
            let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
            let image = path.extension().is_some_and(|e| e == "retained");
            if half_written(path) || (image && !stems.contains(stem)) {
                let _ = std::fs::remove_file(path);
            }
        }
        r.kept.lock().unwrap().images = found;
        r.evict();
        r
    }

    /// What is kept, oldest first.
    pub fn view(&self) -> RetentionView {
        let kept = self.kept.lock().unwrap();
        let mut list: Vec<RetainedView> = kept.images.values().cloned().collect();
        list.sort_by_key(|v| v.at_ms);
        RetentionView {
            dir: self.dir.display().to_string(),
            budget: self.budget,
            used: list.iter().map(|v| v.bytes).sum(),
            images: list,
        }
    }

    /// VM `vm`'s retained image, if one is kept.
    pub fn get(&self, vm: &str) -> Option<RetainedView> {
        self.kept.lock().unwrap().images.get(vm).cloned()
    }

    /// The images kept of VMs made from RAM image `image`, of `memory`
    /// bytes each (none still being written).
    pub fn made_from(&self, image: &str, memory: u64) -> Vec<RetainedView> {
        let kept = self.kept.lock().unwrap();
        kept.images
            .values()
            .filter(|v| v.image.as_deref() == Some(image) && v.memory == memory)
            .filter(|v| !kept.pending.contains_key(&v.vm))
            .cloned()
            .collect()
    }

    /// The image some VM left by `migration` with, if kept (written).
    pub fn images_of(&self, migration: &str) -> Option<RetainedView> {
        let kept = self.kept.lock().unwrap();
        kept.images
            .values()
            .find(|v| v.migration == migration && !kept.pending.contains_key(&v.vm))
            .cloned()
    }

    /// Opens VM `vm`'s retained image for reading, checked.
    pub fn open_image(&self, vm: &str) -> Result<Retained, retained::RetainedError> {
        Retained::open(&self.image_path(vm), self.max_memory)
    }

    /// The hashes of pages `first..first + count` of VM `vm`'s image, and
    /// its memory size, reading only that slice of its table
    /// (`Retained::read_hashes`).
    pub fn image_hashes(
        &self,
        vm: &str,
        first: u64,
        count: u64,
    ) -> Result<(u64, Vec<u64>), retained::RetainedError> {
        Retained::read_hashes(&self.image_path(vm), self.max_memory, first, count)
    }

    /// The file of the image VM `vm` left by `migration` with, as a
    /// failback's base. `Err` says why there is none.
    pub fn base(&self, vm: &str, migration: &str) -> Result<BaseImage, String> {
        let kept = self.kept.lock().unwrap();
        if kept.pending.contains_key(vm) {
            return Err(format!("VM {vm}'s image is still being written"));
        }
        match kept.images.get(vm) {
            None => Err(format!("no image of VM {vm} is kept here")),
            Some(v) if v.migration != migration => Err(format!(
                "VM {vm}'s image kept here is from migration {}, not {migration}",
                v.migration
            )),
            Some(_) => {
                drop(kept);
                self.open_image(vm)
                    .map(BaseImage::File)
                    .map_err(|e| e.to_string())
            }
        }
    }

    /// A turn to tag a copy for a kin (`Node::kin_tags`).
    pub fn tagger_turn(&self) -> std::sync::MutexGuard<'_, ()> {
        self.tagging.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A turn to write an image: writers take it before they take the memory
    /// they write, so that images go to the disk one at a time and a writer
    /// waiting for its turn holds no memory.
    pub fn writer_turn(&self) -> std::sync::MutexGuard<'_, ()> {
        self.writing.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps `mem`, the memory VM `vm` (of `incarnation`, made from RAM
    /// image `image`) left by `migration` with, in place of
    /// any image of it kept before, evicting the oldest others to make room.
    /// Blocking (it writes the image); `stop`, asked between steps and once
    /// after the last, may hold the write back and ends it early. `None` when the
    /// budget or the disk cannot hold it, or when the VM came back (or left
    /// again) before it was written.
    pub fn keep(
        &self,
        vm: &str,
        migration: &str,
        (incarnation, image): (u64, Option<String>),
        mem: &GuestMemory,
        stop: &dyn Fn() -> bool,
    ) -> Result<Option<RetainedView>, String> {
        let need = need(mem);
        let generation = {
            let mut kept = self.kept.lock().unwrap();
            self.drop_locked(&mut kept, vm);
            if need > self.budget {
                return Ok(None);
            }
            kept.next += 1;
            let g = kept.next;
            let pending = Pending {
                generation: g,
                need,
            };
            kept.pending.insert(vm.to_string(), pending);
            g
        };
        self.evict();
        let id = (migration, incarnation, image);
        let written = self.write(vm, id, mem, generation, need, stop);
        // Asked once more after the last read: a copy taken over during
        // it may have given the file another guest's pages.
        let stopped = matches!(written, Ok(Some(_))) && stop();
        let mut kept = self.kept.lock().unwrap();
        let current = kept.pending.get(vm).map(|p| p.generation) == Some(generation);
        if current {
            kept.pending.remove(vm);
        }
        let (image, meta) = (self.image_path(vm), self.meta_path(vm));
        let Some((tmp, meta_tmp, view)) = written? else {
            return Ok(None);
        };
        if !current || stopped {
            let _ = std::fs::remove_file(&tmp);
            let _ = std::fs::remove_file(&meta_tmp);
            return Ok(None);
        }
        // Into place under the lock: a newer write's files never lose to an
        // older one's.
        let placed = std::fs::rename(&tmp, &image)
            .and_then(|()| std::fs::rename(&meta_tmp, &meta))
            .and_then(|()| std::fs::File::open(&self.dir)?.sync_all());
        if let Err(e) = placed {
            for f in [&tmp, &meta_tmp, &image, &meta] {
                let _ = std::fs::remove_file(f);
            }
            return Err(format!("{}: {e}", image.display()));
        }
        kept.images.insert(vm.to_string(), view.clone());
        drop(kept);
        self.evict();
        Ok(Some(view))
    }

    /// Writes the image and its description under temporary names; their
    /// paths, or `None` when `stop` stopped it.
    fn write(
        &self,
        vm: &str,
        (migration, incarnation, image): (&str, u64, Option<String>),
        mem: &GuestMemory,
        generation: u64,
        need: u64,
        stop: &dyn Fn() -> bool,
    ) -> Result<Option<(PathBuf, PathBuf, RetainedView)>, String> {
        make_private_dir(&self.dir)?;
        if let Some(free) = free_disk(&self.dir) {
            // Room for it, and as much again for everything else on the disk.
            if free < need.saturating_mul(2) {
                return Err(format!(
                    "{} has {} free, too little to retain {}",
                    self.dir.display(),
                    crate::units::Bytes(free),
                    crate::units::Bytes(need)
                ));
            }
        }
        let stem = super::kept::stem(vm);
        let tmp = self.dir.join(format!("{stem}.{generation}.retained-tmp"));
        let meta_tmp = self.dir.join(format!("{stem}.{generation}.meta-tmp"));
        let digest = match retained::write(mem, &tmp, stop) {
            Ok(d) => d,
            Err(retained::RetainedError::Stopped { .. }) => return Ok(None),
            Err(e) => return Err(e.to_string()),
        };
        let meta = Meta {
            version: VERSION,
            view: RetainedView {
                vm: vm.to_string(),
                migration: migration.to_string(),
                at_ms: super::node::now_ms(),
                memory: mem.len_bytes(),
                digest,
                bytes: disk_bytes(&tmp),
                incarnation,
                image,
            },
        };
        let json = serde_json::to_vec(&meta).expect("serializable");
        if let Err(e) = write_whole(&meta_tmp, &json) {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        Ok(Some((tmp, meta_tmp, meta.view)))
    }

    /// Drops VM `vm`'s image, if one is kept, and any write of one under
    /// way (it discards its file when it ends).
    pub fn remove(&self, vm: &str) {
        let mut kept = self.kept.lock().unwrap();
        self.drop_locked(&mut kept, vm);
    }

    /// Drops every image kept and every write under way (a paused last
    /// copy needs the disk); how many there were.
    pub fn drop_all(&self) -> usize {
        let mut kept = self.kept.lock().unwrap();
        let vms: Vec<String> = kept
            .images
            .keys()
            .chain(kept.pending.keys())
            .cloned()
            .collect();
        let count = vms.len();
        for vm in vms {
            self.drop_locked(&mut kept, &vm);
        }
        count
    }

    fn drop_locked(&self, kept: &mut Kept, vm: &str) {
        kept.pending.remove(vm);
        if kept.images.remove(vm).is_some() {
            // Out of the way at once, deleted later: freeing a large file's
            // blocks can wait on the disk, and a VM's arrival must not.
            kept.next += 1;
            let stem = super::kept::stem(vm);
            let mut gone = Vec::new();
            for (from, ext) in [(self.meta_path(vm), "json"), (self.image_path(vm), "image")] {
                let to = self.dir.join(format!("{stem}.{}.{ext}-trash", kept.next));
                match std::fs::rename(&from, &to) {
                    Ok(()) => gone.push(to),
                    Err(_) => {
                        let _ = std::fs::remove_file(&from);
                    }
                }
            }
            std::thread::spawn(move || {
                for f in gone {
                    let _ = std::fs::remove_file(f);
                }
            });
        }
    }

    /// Evicts the oldest images until what is kept, and what writes under
    /// way reserve, fits the budget.
    fn evict(&self) {
        let mut kept = self.kept.lock().unwrap();
        while kept.used() > self.budget {
            let Some(vm) = kept
                .images
                .values()
                .min_by_key(|v| v.at_ms)
                .map(|v| v.vm.clone())
            else {
                return;
            };
            tracing::info!(%vm, "evicting the oldest retained image to stay within failback_retention");
            self.drop_locked(&mut kept, &vm);
        }
    }

    fn image_path(&self, vm: &str) -> PathBuf {
        self.dir.join(format!("{}.retained", super::kept::stem(vm)))
    }

    fn meta_path(&self, vm: &str) -> PathBuf {
        self.dir.join(format!("{}.json", super::kept::stem(vm)))
    }
}

/// The disk an image of `mem` takes at most: the memory backed now (no
/// more can hold data; all of it where the kernel does not say) and the
/// table.
fn need(mem: &GuestMemory) -> u64 {
    let data = mem
        .resident_bytes()
        .map_or(mem.len_bytes(), |r| r.min(mem.len_bytes()));
    data + mem.pages() * 8 + PAGE_SIZE as u64
}

/// The free bytes of the disk `dir` is on, where the system says.
#[allow(unsafe_code)]
// The field types differ between platforms: u64 on x86-64 Linux.
#[allow(clippy::unnecessary_cast)]
fn free_disk(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is a NUL-terminated string that outlives the call, and
    // `st` is a properly sized, writable statvfs that the call fills in; it
    // is read only when the call says it succeeded.
    let rc = unsafe { libc::statvfs(path.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it initialised `st`.
    let st = unsafe { st.assume_init() };
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// Makes `dir` (mode 700) if it does not exist.
fn make_private_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))
}

/// The disk a file takes (its allocated blocks: holes take none).
fn disk_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}

/// Why a description read back is not used.
enum Unusable {
    /// It is not a retained image's description (another program's file).
    NotOurs(String),
    /// It is, but it or its image does not check out: both go.
    Damaged(String),
}

/// Reads and checks the description at `path` and the image beside it.
fn read_meta(path: &Path, max_memory: u64) -> Result<RetainedView, Unusable> {
    let len = std::fs::metadata(path)
        .map_err(|e| Unusable::NotOurs(e.to_string()))?
        .len();
    if len > MAX_META {
        return Err(Unusable::NotOurs(format!("{len} bytes, over {MAX_META}")));
    }
    let bytes = std::fs::read(path).map_err(|e| Unusable::NotOurs(e.to_string()))?;
    let meta = decode_meta(&bytes).map_err(Unusable::NotOurs)?;
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    if super::kept::stem(&meta.view.vm) != stem {
        return Err(Unusable::NotOurs(format!(
            "describes VM {:?}, not {stem:?}",
            meta.view.vm
        )));
    }
    let image = path.with_extension("retained");
    let r = Retained::open(&image, max_memory).map_err(|e| Unusable::Damaged(e.to_string()))?;
    if (r.memory(), r.digest()) != (meta.view.memory, meta.view.digest) {
        return Err(Unusable::Damaged(
            "the image does not match its description".into(),
        ));
    }
    Ok(RetainedView {
        bytes: disk_bytes(&image),
        ..meta.view
    })
}

/// Writes `bytes` to `path` whole (mode 600): a temporary file, synced,
/// renamed into place.
fn write_whole(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("json-partial");
    let done = (|| -> std::io::Result<()> {
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    done.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("{}: {e}", path.display())
    })
}

#[cfg(test)]
mod tests;
