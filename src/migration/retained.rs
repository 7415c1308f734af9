//! A retained image: the memory a VM left a node with and each page's hash,
//! kept in one sparse file so that a later migration back to that node need
//! only send what changed (delta failback). The format:
//!
//! ```text
//! offset size field
//!      0    8 magic "FERRYRET"
//!      8    4 version (1)
//!     12    4 reserved (0)
//!     16    8 memory bytes (a non-zero multiple of 4096)
//!     24    8 full digest of the memory (`digest::full_digest`)
//!     32    4 CRC-32 of the hash table
//!     36    4 reserved (0)
//!     40    … the hash table: each page's xxh3-64, 8 bytes little-endian
//!      M    … memory from the next 4096-byte boundary; zero pages are holes
//! ```
//!
//! Nothing in it is trusted when read back: the header is range-checked, the
//! table's CRC is checked before any hash is used, and every page read is
//! checked against its hash ([`Retained::page`]).

use crate::digest::{digest_of_hashes, page_hash, zero_page_hash};
use crate::memory::{is_zero_page, GuestMemory, MAX_MEMORY_BYTES, PAGE_SIZE};
use crate::page::PageIndex;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"FERRYRET";
const VERSION: u32 = 1;
const HEADER: u64 = 40;
/// Pages hashed or read per step when writing or checking.
const STEP_PAGES: u64 = 256;
/// Data handed to the disk at once: an image goes out in small pieces, so
/// that what else shares the disk (etcd's log, above all) never waits
/// behind hundreds of MiB of it.
const FLUSH_BYTES: u64 = 8 << 20;

/// An image's data going out to the disk behind its writer, a window at a
/// time: each [`FLUSH_BYTES`] written are handed to the disk at once
/// (`sync_file_range`, which commits no journal, so another file's `fsync`,
/// etcd's above all, never waits behind it), and the window before is
/// waited for. At most two windows are ever dirty. What was written stays
/// in the page cache (clean, the first to go under pressure): a failback
/// soon after reads it from there.
struct Writeback {
    /// Where the next window starts.
    next: u64,
    /// The window handed to the disk and not yet waited for.
    started: Option<(u64, u64)>,
}

impl Writeback {
    fn new(from: u64) -> Self {
        Self {
            next: from,
            started: None,
        }
    }

    /// The writer has written everything before `end`.
    fn advance(&mut self, f: &File, end: u64) -> std::io::Result<()> {
        if end < self.next + FLUSH_BYTES {
            return Ok(());
        }
        let window = (self.next, end - self.next);
        self.next = end;
        if sync_range(f, window, libc::SYNC_FILE_RANGE_WRITE).is_err() {
            // A file system without it: a flush of the data instead.
            return f.sync_data();
        }
        if let Some(before) = self.started.replace(window) {
            let all = libc::SYNC_FILE_RANGE_WAIT_BEFORE
                | libc::SYNC_FILE_RANGE_WRITE
                | libc::SYNC_FILE_RANGE_WAIT_AFTER;
            sync_range(f, before, all).or_else(|_| f.sync_data())?;
        }
        Ok(())
    }
}

/// `sync_file_range(2)` of `(offset, len)` in `f` with `flags`.
#[allow(unsafe_code)]
fn sync_range(f: &File, (offset, len): (u64, u64), flags: u32) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Ok(());
    };
    // SAFETY: the descriptor is `f`'s, open for the whole call; the call
    // reads and writes no memory of ours.
    let rc = unsafe { libc::sync_file_range(f.as_raw_fd(), offset, len, flags) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Where the memory starts in a file of `pages` pages.
fn memory_offset(pages: u64) -> u64 {
    (HEADER + pages * 8).div_ceil(PAGE_SIZE as u64) * PAGE_SIZE as u64
}

/// Why a retained image cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RetainedError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What failed.
        source: std::io::Error,
    },
    /// The file is not a retained image this build reads, or is damaged.
    #[error("{path}: {why}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong, naming the field.
        why: String,
    },
    /// The write was stopped before the image was whole.
    #[error("{path}: stopped before the image was whole")]
    Stopped {
        /// The file.
        path: String,
    },
}

/// A retained image opened for reading: its header checked, its hash table
/// read and checked against its CRC.
#[derive(Debug)]
pub struct Retained {
    path: PathBuf,
    file: File,
    memory: u64,
    digest: u64,
    hashes: Vec<u64>,
}

/// Writes `mem` to `path` as a retained image (mode 600), through a
/// temporary file renamed into place when whole and synced; `stop` is asked
/// between steps (it may block to hold the write back), and answering true
/// ends the write (nothing left behind).
/// Returns the file's digest of the memory.
pub fn write(
    mem: &GuestMemory,
    path: &Path,
    stop: &dyn Fn() -> bool,
) -> Result<u64, RetainedError> {
    let io = |source| RetainedError::Io {
        path: path.display().to_string(),
        source,
    };
    let pages = mem.pages();
    let base = memory_offset(pages);
    let tmp = path.with_extension(format!("partial-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let written = (|| -> std::io::Result<u64> {
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        let mut table = Vec::with_capacity((pages * 8) as usize);
        let zero = zero_page_hash();
        let mut first = 0;
        let mut out = Writeback::new(base);
        while first < pages {
            out.advance(&f, base + first * PAGE_SIZE as u64)?;
            if stop() {
                return Err(std::io::Error::other(StopAsked));
            }
            let count = STEP_PAGES.min(pages - first);
            mem.with_pages(first, count, |bytes| -> std::io::Result<()> {
                for (i, page) in bytes.chunks_exact(PAGE_SIZE).enumerate() {
                    if is_zero_page(page) {
                        table.extend_from_slice(&zero.to_le_bytes());
                        continue;
                    }
                    table.extend_from_slice(&page_hash(page).to_le_bytes());
                    f.write_all_at(page, base + (first + i as u64) * PAGE_SIZE as u64)?;
                }
                Ok(())
            })?;
            first += count;
        }
        let hashes: Vec<u64> = table
            .chunks_exact(8)
            .map(|h| u64::from_le_bytes(h.try_into().expect("8 bytes")))
            .collect();
        let digest = digest_of_hashes(&hashes);
        let mut head = Vec::with_capacity(HEADER as usize);
        head.extend_from_slice(MAGIC);
        head.extend_from_slice(&VERSION.to_le_bytes());
        head.extend_from_slice(&[0; 4]);
        head.extend_from_slice(&mem.len_bytes().to_le_bytes());
        head.extend_from_slice(&digest.to_le_bytes());
        head.extend_from_slice(&crc32fast::hash(&table).to_le_bytes());
        head.extend_from_slice(&[0; 4]);
        f.write_all_at(&head, 0)?;
        f.write_all_at(&table, HEADER)?;
        f.set_len(base + mem.len_bytes())?;
        (&f).flush()?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        Ok(digest)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(|e| match e.get_ref().is_some_and(|e| e.is::<StopAsked>()) {
        true => RetainedError::Stopped {
            path: path.display().to_string(),
        },
        false => io(e),
    })
}

/// What a write's `stop` answering true ends it with (never an OS error).
#[derive(Debug, thiserror::Error)]
#[error("stopped")]
struct StopAsked;

/// A retained image's header, read and checked (the memory's size against
/// the file's length), its file open.
struct Header {
    path: String,
    file: File,
    memory: u64,
    digest: u64,
    crc: u32,
}

impl Header {
    /// Reads and checks the header of the image in `path`: an image of more
    /// than `max_memory` bytes is refused.
    fn read(path: &Path, max_memory: u64) -> Result<Self, RetainedError> {
        let name = path.display().to_string();
        let bad = |why: String| RetainedError::Invalid {
            path: name.clone(),
            why,
        };
        let io = |source| RetainedError::Io {
            path: name.clone(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        let size = file.metadata().map_err(io)?.len();
        let mut head = [0u8; HEADER as usize];
        file.read_exact_at(&mut head, 0)
            .map_err(|_| bad("too short for a retained image's header".into()))?;
        if &head[..8] != MAGIC {
            return Err(bad("not a retained ferry image".into()));
        }
        let u32_at = |o: usize| u32::from_le_bytes(head[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(head[o..o + 8].try_into().unwrap());
        if u32_at(8) != VERSION {
            return Err(bad(format!(
                "version {} (this build reads {VERSION})",
                u32_at(8)
            )));
        }
        let memory = u64_at(16);
        let most = max_memory.min(MAX_MEMORY_BYTES);
        if memory == 0 || !memory.is_multiple_of(PAGE_SIZE as u64) || memory > most {
            return Err(bad(format!(
                "memory {memory} is not a non-zero multiple of 4096 up to {most}"
            )));
        }
        let want = memory_offset(memory / PAGE_SIZE as u64) + memory;
        if size != want {
            return Err(bad(format!(
                "length {size}, but {memory} bytes of memory make {want}"
            )));
        }
        Ok(Self {
            path: name,
            file,
            memory,
            digest: u64_at(24),
            crc: u32_at(32),
        })
    }

    fn bad(&self, why: String) -> RetainedError {
        RetainedError::Invalid {
            path: self.path.clone(),
            why,
        }
    }

    fn io(&self, source: std::io::Error) -> RetainedError {
        RetainedError::Io {
            path: self.path.clone(),
            source,
        }
    }
}

impl Retained {
    /// Opens the retained image in `path`, checking its header and its hash
    /// table; reads nothing of the memory yet. An image of more than
    /// `max_memory` bytes is refused before its table is read.
    pub fn open(path: &Path, max_memory: u64) -> Result<Self, RetainedError> {
        let head = Header::read(path, max_memory)?;
        let pages = head.memory / PAGE_SIZE as u64;
        // The file's length is checked: the table is as big as the file says.
        let mut raw = vec![0u8; (pages * 8) as usize];
        head.file
            .read_exact_at(&mut raw, HEADER)
            .map_err(|e| head.io(e))?;
        if crc32fast::hash(&raw) != head.crc {
            return Err(head.bad("the hash table's CRC does not match".into()));
        }
        let hashes = raw
            .chunks_exact(8)
            .map(|h| u64::from_le_bytes(h.try_into().unwrap()))
            .collect();
        Ok(Self {
            path: path.to_path_buf(),
            file: head.file,
            memory: head.memory,
            digest: head.digest,
            hashes,
        })
    }

    /// The hashes of pages `first..first + count` of the image in `path`
    /// (`count` cut to the image's end), and the image's memory size: the
    /// header is checked, but only that slice of the table is read, so its
    /// CRC is not. Whoever uses them checks the whole table against the
    /// image's digest (a wrong hash then costs a base, never a page).
    pub fn read_hashes(
        path: &Path,
        max_memory: u64,
        first: u64,
        count: u64,
    ) -> Result<(u64, Vec<u64>), RetainedError> {
        let head = Header::read(path, max_memory)?;
        let pages = head.memory / PAGE_SIZE as u64;
        if first > pages {
            return Err(head.bad(format!("first page {first} is past its {pages} pages")));
        }
        let count = count.min(pages - first);
        let mut raw = vec![0u8; (count * 8) as usize];
        head.file
            .read_exact_at(&mut raw, HEADER + first * 8)
            .map_err(|e| head.io(e))?;
        let hashes = raw
            .chunks_exact(8)
            .map(|h| u64::from_le_bytes(h.try_into().unwrap()))
            .collect();
        Ok((head.memory, hashes))
    }

    /// The memory's size in bytes.
    pub fn memory(&self) -> u64 {
        self.memory
    }

    /// The digest of the memory as it was written.
    pub fn digest(&self) -> u64 {
        self.digest
    }

    /// Each page's hash as it was written.
    pub fn hashes(&self) -> &[u64] {
        &self.hashes
    }

    /// Reads pages `first..first + count` into `dst` (`count` pages long) in
    /// one read, and checks each against its hash: a page changed on disk
    /// since is an error, never used.
    pub fn pages(&self, first: u64, count: u64, dst: &mut [u8]) -> Result<(), RetainedError> {
        let bad = |why: String| RetainedError::Invalid {
            path: self.path.display().to_string(),
            why,
        };
        let total = self.hashes.len() as u64;
        let end = first.checked_add(count).filter(|&e| e <= total);
        let (Some(end), Some(len)) = (end, count.checked_mul(PAGE_SIZE as u64)) else {
            return Err(bad(format!("no pages {first}+{count} in {total} pages")));
        };
        if dst.len() as u64 != len {
            return Err(bad(format!(
                "{count} pages need {len} bytes, not {}",
                dst.len()
            )));
        }
        let base = memory_offset(total);
        self.file
            .read_exact_at(dst, base + first * PAGE_SIZE as u64)
            .map_err(|source| RetainedError::Io {
                path: self.path.display().to_string(),
                source,
            })?;
        for (i, page) in (first..end).zip(dst.chunks_exact(PAGE_SIZE)) {
            if page_hash(page) != self.hashes[i as usize] {
                return Err(bad(format!("page {i} does not match its hash")));
            }
        }
        Ok(())
    }

    /// Reads page `index` into `dst` (4096 bytes) and checks it against its
    /// hash: a page changed on disk since is an error, never used.
    pub fn page(&self, index: PageIndex, dst: &mut [u8]) -> Result<(), RetainedError> {
        let bad = |why: String| RetainedError::Invalid {
            path: self.path.display().to_string(),
            why,
        };
        if dst.len() < PAGE_SIZE {
            return Err(bad(format!(
                "a page needs {PAGE_SIZE} bytes, not {}",
                dst.len()
            )));
        }
        let Some(&want) = self.hashes.get(index.0 as usize) else {
            return Err(bad(format!(
                "no page {} in {} pages",
                index.0,
                self.hashes.len()
            )));
        };
        let base = memory_offset(self.hashes.len() as u64);
        self.file
            .read_exact_at(&mut dst[..PAGE_SIZE], base + index.0 * PAGE_SIZE as u64)
            .map_err(|source| RetainedError::Io {
                path: self.path.display().to_string(),
                source,
            })?;
        if page_hash(&dst[..PAGE_SIZE]) != want {
            return Err(bad(format!("page {} does not match its hash", index.0)));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
