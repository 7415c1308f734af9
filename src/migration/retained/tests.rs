use super::*;

/// A folder of its own for each test, removed after.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("ferry-retained-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn memory(pages: u64) -> GuestMemory {
    let mem = GuestMemory::new(pages * PAGE_SIZE as u64).unwrap();
    for i in (0..pages).step_by(3) {
        mem.write_page(PageIndex(i), &[(i as u8).wrapping_add(1); PAGE_SIZE]);
    }
    mem
}

#[test]
fn an_image_reads_back_page_for_page_with_zero_pages_as_holes() {
    let dir = Dir::new("holes");
    let path = dir.path().join("web.retained");
    let mem = memory(40);
    let digest = write(&mem, &path, &|| false).unwrap();
    assert_eq!(digest, crate::digest::full_digest(&mem, 1));
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    // Sparse: 14 pages of data, a page of header and table.
    assert!(
        meta.blocks() * 512 <= 16 * PAGE_SIZE as u64,
        "{}",
        meta.blocks()
    );
    let r = Retained::open(&path, 1 << 30).unwrap();
    assert_eq!((r.memory(), r.digest()), (40 * PAGE_SIZE as u64, digest));
    let mut page = vec![0u8; PAGE_SIZE];
    let mut want = vec![0u8; PAGE_SIZE];
    for i in 0..40 {
        r.page(PageIndex(i), &mut page).unwrap();
        mem.read_page(PageIndex(i), &mut want);
        assert_eq!(page, want, "page {i}");
        assert_eq!(r.hashes()[i as usize], page_hash(&want));
    }
    assert!(r.page(PageIndex(40), &mut page).is_err());
    // A range in one read, each page checked; past the end, refused.
    let mut range = vec![0u8; 7 * PAGE_SIZE];
    r.pages(30, 7, &mut range).unwrap();
    for (i, p) in range.chunks_exact(PAGE_SIZE).enumerate() {
        mem.read_page(PageIndex(30 + i as u64), &mut want);
        assert_eq!(p, &want[..], "page {}", 30 + i);
    }
    assert!(r.pages(35, 7, &mut range).is_err());
    assert!(
        r.pages(0, 6, &mut range).is_err(),
        "a buffer of another size"
    );
    assert!(r.pages(u64::MAX, 7, &mut range).is_err());
    // Only the finished file is left.
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(names.len(), 1);
}

#[test]
fn a_damaged_image_is_refused_naming_what_is_wrong() {
    let dir = Dir::new("damaged");
    let path = dir.path().join("web.retained");
    write(&memory(8), &path, &|| false).unwrap();
    let good = std::fs::read(&path).unwrap();
    let open_with = |edit: &dyn Fn(&mut Vec<u8>)| {
        let mut bytes = good.clone();
        edit(&mut bytes);
        std::fs::write(&path, &bytes).unwrap();
        Retained::open(&path, 1 << 30)
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    assert!(open_with(&|b| b[0] = b'X').contains("not a retained"));
    assert!(open_with(&|b| b[8] = 9).contains("version 9"));
    assert!(open_with(&|b| b[16] = 1).contains("memory"));
    assert!(open_with(&|b| b.truncate(b.len() - 1)).contains("length"));
    assert!(open_with(&|b| b[HEADER as usize] ^= 1).contains("CRC"));
    assert!(open_with(&|b| b.truncate(20)).contains("too short"));
    // A page changed on disk is refused when read.
    let mut bytes = good.clone();
    let at = memory_offset(8) as usize + 3 * PAGE_SIZE + 7;
    bytes[at] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let r = Retained::open(&path, 1 << 30).unwrap();
    let mut page = vec![0u8; PAGE_SIZE];
    r.page(PageIndex(0), &mut page).unwrap();
    let e = r.page(PageIndex(3), &mut page).unwrap_err().to_string();
    assert!(e.contains("page 3 does not match"), "{e}");
    let mut range = vec![0u8; 8 * PAGE_SIZE];
    let e = r.pages(0, 8, &mut range).unwrap_err().to_string();
    assert!(e.contains("page 3 does not match"), "{e}");
}

#[test]
fn a_stopped_write_leaves_nothing_and_a_large_image_is_refused_before_its_table() {
    let dir = Dir::new("stopped");
    let path = dir.path().join("web.retained");
    assert!(write(&memory(600), &path, &|| true).is_err());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    write(&memory(8), &path, &|| false).unwrap();
    let e = Retained::open(&path, 4 * PAGE_SIZE as u64)
        .unwrap_err()
        .to_string();
    assert!(e.contains("up to 16384"), "{e}");
    let r = Retained::open(&path, 1 << 30).unwrap();
    assert!(r.page(PageIndex(0), &mut [0u8; 100]).is_err());
}

#[test]
fn a_slice_of_the_hash_table_reads_alone_its_header_still_checked() {
    let dir = Dir::new("slice");
    let path = dir.path().join("web.retained");
    write(&memory(40), &path, &|| false).unwrap();
    let all = Retained::open(&path, 1 << 30).unwrap().hashes().to_vec();
    let (memory, some) = Retained::read_hashes(&path, 1 << 30, 5, 10).unwrap();
    assert_eq!((memory, &some[..]), (40 * PAGE_SIZE as u64, &all[5..15]));
    // Cut to the end; the end itself gives none; past it is refused.
    assert_eq!(
        Retained::read_hashes(&path, 1 << 30, 30, 99).unwrap().1,
        &all[30..]
    );
    assert!(Retained::read_hashes(&path, 1 << 30, 40, 1)
        .unwrap()
        .1
        .is_empty());
    let e = Retained::read_hashes(&path, 1 << 30, 41, 1).unwrap_err();
    assert!(e.to_string().contains("first page 41"), "{e}");
    // Too large an image, or a damaged header, reads nothing.
    assert!(Retained::read_hashes(&path, 4096, 0, 1).is_err());
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(b"XERRYRET", 0).unwrap();
    let e = Retained::read_hashes(&path, 1 << 30, 0, 1).unwrap_err();
    assert!(e.to_string().contains("not a retained"), "{e}");
}
