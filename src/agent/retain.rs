//! Failback retention: the image each VM left this node with, kept with its
//! page hashes (`migration::retained`) as `{dir}/{vm}.retained` beside
//! `{vm}.json`, within the node's `failback_retention` budget of disk, the
//! oldest evicted first. A retained image is a cache, never a last copy: a
//! damaged or half-written one is dropped. Never counted against the node's
//! `memory_capacity`.

use crate::memory::{GuestMemory, PAGE_SIZE};
use crate::migration::retained::{self, Retained};
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
}

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
    images: Mutex<BTreeMap<String, RetainedView>>,
}

impl Retention {
    /// The images kept in `dir` by an earlier process, checked (a damaged or
    /// incomplete one is removed), evicted down to `budget`.
    pub fn open(dir: &Path, budget: u64) -> Self {
        let r = Self {
            dir: dir.to_path_buf(),
            budget,
            images: Mutex::new(BTreeMap::new()),
        };
        let Ok(entries) = std::fs::read_dir(dir) else {
            return r;
        };
        let mut files: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        files.sort();
        let mut found = BTreeMap::new();
        for path in &files {
            if path.extension().is_some_and(|e| e == "json") {
                match read_meta(path) {
                    Ok(v) => {
                        found.insert(v.vm.clone(), v);
                    }
                    Err(why) => {
                        tracing::warn!(file = %path.display(), "dropping a retained image: {why}")
                    }
                }
            }
        }
        // Whatever no good description names goes: partial writes, orphans.
        let stems: std::collections::BTreeSet<String> =
            found.keys().map(|vm| super::kept::stem(vm)).collect();
        for path in &files {
            let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
            let ours = path
                .extension()
                .is_some_and(|e| e == "json" || e == "retained");
            if !ours || !stems.contains(stem) {
                let _ = std::fs::remove_file(path);
            }
        }
        *r.images.lock().unwrap() = found;
        r.evict(0);
        r
    }

    /// What is kept, oldest first.
    pub fn view(&self) -> RetentionView {
        let images = self.images.lock().unwrap();
        let mut list: Vec<RetainedView> = images.values().cloned().collect();
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
        self.images.lock().unwrap().get(vm).cloned()
    }

    /// Opens VM `vm`'s retained image for reading, checked.
    pub fn open_image(&self, vm: &str) -> Result<Retained, retained::RetainedError> {
        Retained::open(&self.image_path(vm))
    }

    /// Keeps `mem`, the memory VM `vm` left by `migration` with, in place of
    /// any image of it kept before, evicting the oldest others to make room.
    /// Blocking (it writes the image); `None` when the budget cannot hold it.
    pub fn keep(
        &self,
        vm: &str,
        migration: &str,
        mem: &GuestMemory,
    ) -> Result<Option<RetainedView>, String> {
        self.remove(vm);
        let need = need(mem);
        if need > self.budget {
            return Ok(None);
        }
        self.evict(need);
        std::fs::create_dir_all(&self.dir).map_err(|e| format!("{}: {e}", self.dir.display()))?;
        let image = self.image_path(vm);
        let digest = retained::write(mem, &image).map_err(|e| e.to_string())?;
        let view = RetainedView {
            vm: vm.to_string(),
            migration: migration.to_string(),
            at_ms: super::node::now_ms(),
            memory: mem.len_bytes(),
            digest,
            bytes: disk_bytes(&image),
        };
        let meta = Meta {
            version: VERSION,
            view: view.clone(),
        };
        let json = serde_json::to_vec(&meta).expect("serializable");
        if let Err(e) = write_whole(&self.meta_path(vm), &json) {
            let _ = std::fs::remove_file(&image);
            return Err(e);
        }
        self.images
            .lock()
            .unwrap()
            .insert(vm.to_string(), view.clone());
        Ok(Some(view))
    }

    /// Drops VM `vm`'s image, if one is kept.
    pub fn remove(&self, vm: &str) {
        if self.images.lock().unwrap().remove(vm).is_some() {
            let _ = std::fs::remove_file(self.meta_path(vm));
            let _ = std::fs::remove_file(self.image_path(vm));
        }
    }

    /// Evicts the oldest images until `room` more bytes fit the budget.
    fn evict(&self, room: u64) {
        loop {
            let oldest = {
                let images = self.images.lock().unwrap();
                let used: u64 = images.values().map(|v| v.bytes).sum();
                if used.saturating_add(room) <= self.budget {
                    return;
                }
                images
                    .values()
                    .min_by_key(|v| v.at_ms)
                    .map(|v| v.vm.clone())
            };
            let Some(vm) = oldest else { return };
            tracing::info!(%vm, "evicting the oldest retained image to stay within failback_retention");
            self.remove(&vm);
        }
    }

    fn image_path(&self, vm: &str) -> PathBuf {
        self.dir.join(format!("{}.retained", super::kept::stem(vm)))
    }

    fn meta_path(&self, vm: &str) -> PathBuf {
        self.dir.join(format!("{}.json", super::kept::stem(vm)))
    }
}

/// The disk an image of `mem` takes at most: its non-zero pages and table.
fn need(mem: &GuestMemory) -> u64 {
    let pages = mem.pages();
    let mut nonzero = 0u64;
    let mut first = 0;
    while first < pages {
        let count = 256.min(pages - first);
        nonzero += mem.with_pages(first, count, |b| {
            b.chunks_exact(PAGE_SIZE)
                .filter(|p| !crate::memory::is_zero_page(p))
                .count() as u64
        });
        first += count;
    }
    (nonzero + 1) * PAGE_SIZE as u64 + pages * 8
}

/// The disk a file takes (its allocated blocks: holes take none).
fn disk_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}

/// Reads and checks the description at `path` and the image beside it.
fn read_meta(path: &Path) -> Result<RetainedView, String> {
    let len = std::fs::metadata(path).map_err(|e| e.to_string())?.len();
    if len > MAX_META {
        return Err(format!("description of {len} bytes, over {MAX_META}"));
    }
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    let meta = decode_meta(&bytes)?;
    if super::kept::stem(&meta.view.vm) != stem {
        return Err(format!("describes VM {:?}, not {stem:?}", meta.view.vm));
    }
    let image = path.with_extension("retained");
    let r = Retained::open(&image).map_err(|e| e.to_string())?;
    if (r.memory(), r.digest()) != (meta.view.memory, meta.view.digest) {
        return Err("the image does not match its description".into());
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
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
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
