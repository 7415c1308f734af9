use super::*;
use crate::page::PageIndex;
use std::sync::Arc;

/// A folder of its own for each test, removed after.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("ferry-retain-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        Self(p)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `pages` pages, `data` of them with content.
fn memory(pages: u64, data: u64, fill: u8) -> Arc<GuestMemory> {
    let mem = GuestMemory::new(pages * PAGE_SIZE as u64).unwrap();
    for i in 0..data {
        mem.write_page(PageIndex(i), &[fill ^ i as u8 | 1; PAGE_SIZE]);
    }
    Arc::new(mem)
}

const PAGE: u64 = PAGE_SIZE as u64;

#[test]
fn an_image_is_kept_listed_and_read_back_by_the_next_process() {
    let d = Dir::new("kept");
    let r = Retention::open(&d.0, 1 << 20, 1 << 30);
    assert!(r.view().images.is_empty());
    let mem = memory(64, 10, 7);
    let v = r
        .keep("web.1", "m-1", (1, None), &mem, &|| false)
        .unwrap()
        .unwrap();
    assert_eq!((v.vm.as_str(), v.migration.as_str()), ("web.1", "m-1"));
    assert_eq!(v.memory, 64 * PAGE);
    assert!(v.bytes >= 10 * PAGE && v.bytes <= 16 * PAGE, "{v:?}");
    let again = Retention::open(&d.0, 1 << 20, 1 << 30);
    assert_eq!(again.view().images, vec![v.clone()]);
    let image = again.open_image("web.1").unwrap();
    let mut page = vec![0u8; PAGE_SIZE];
    let mut want = vec![0u8; PAGE_SIZE];
    for i in 0..64 {
        image.page(PageIndex(i), &mut page).unwrap();
        mem.read_page(PageIndex(i), &mut want);
        assert_eq!(page, want);
    }
    // A name as long as names go is kept too.
    let long = "v".repeat(255);
    again
        .keep(&long, "m-9", (1, None), &memory(4, 1, 1), &|| false)
        .unwrap()
        .unwrap();
    assert!(Retention::open(&d.0, 1 << 20, 1 << 30).get(&long).is_some());
    again.remove(&long);
    // A later departure replaces it.
    let w = again
        .keep("web.1", "m-2", (1, None), &memory(64, 3, 9), &|| false)
        .unwrap()
        .unwrap();
    assert_eq!(again.view().images, vec![w]);
    again.remove("web.1");
    // Out of the way at once, deleted in the background.
    assert!(again.get("web.1").is_none());
    let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::fs::read_dir(&d.0).unwrap().count() > 0 {
        assert!(
            std::time::Instant::now() < end,
            "the files are never deleted"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

#[test]
fn the_oldest_go_first_to_stay_within_the_budget_and_a_too_large_one_is_not_kept() {
    let d = Dir::new("budget");
    // Room for two images of 8 data pages (and a page of table each).
    let r = Retention::open(&d.0, 20 * PAGE, 1 << 30);
    for (i, vm) in ["a", "b", "c"].iter().enumerate() {
        r.keep(vm, "m", (1, None), &memory(16, 8, i as u8), &|| false)
            .unwrap()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let v = r.view();
    let names: Vec<&str> = v.images.iter().map(|i| i.vm.as_str()).collect();
    assert_eq!(names, ["b", "c"], "{v:?}");
    assert!(v.used <= v.budget, "{v:?}");
    assert!(!d.0.join("a.retained").exists() && !d.0.join("a.json").exists());
    // Larger than the whole budget: kept nowhere, the others stay.
    assert_eq!(
        r.keep("big", "m", (1, None), &memory(64, 30, 1), &|| false)
            .unwrap(),
        None
    );
    assert_eq!(r.view().images.len(), 2);
    // A budget of 0 keeps nothing.
    let none = Retention::open(&d.0.join("none"), 0, 1 << 30);
    assert_eq!(
        none.keep("a", "m", (1, None), &memory(4, 1, 1), &|| false)
            .unwrap(),
        None
    );
    // A smaller budget at the next start evicts down to it.
    let smaller = Retention::open(&d.0, 12 * PAGE, 1 << 30);
    let names: Vec<String> = smaller.view().images.into_iter().map(|i| i.vm).collect();
    assert_eq!(names, ["c"]);
}

#[test]
fn damaged_and_half_written_images_are_dropped_at_start() {
    let d = Dir::new("damaged");
    let r = Retention::open(&d.0, 1 << 20, 1 << 30);
    for vm in ["good", "flipped", "orphan"] {
        r.keep(vm, "m", (1, None), &memory(8, 4, 3), &|| false)
            .unwrap()
            .unwrap();
    }
    // A flipped byte in the hash table, a description without its image, a
    // partial write, and a stranger.
    let path = d.0.join("flipped.retained");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[45] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    std::fs::remove_file(d.0.join("orphan.retained")).unwrap();
    std::fs::write(d.0.join("good.partial-77"), b"half").unwrap();
    std::fs::write(d.0.join("good.3.retained-tmp"), b"half").unwrap();
    // Not retention files: never removed, whatever the folder holds.
    std::fs::write(d.0.join("notes.txt"), b"?").unwrap();
    std::fs::write(d.0.join("huge.json"), vec![b' '; MAX_META as usize + 1]).unwrap();
    std::fs::write(d.0.join("other.json"), b"{\"name\": 1}").unwrap();
    let again = Retention::open(&d.0, 1 << 20, 1 << 30);
    let names: Vec<String> = again.view().images.into_iter().map(|i| i.vm).collect();
    assert_eq!(names, ["good"]);
    let mut left: Vec<String> = std::fs::read_dir(&d.0)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(
        left,
        [
            "good.json",
            "good.retained",
            "huge.json",
            "notes.txt",
            "other.json"
        ]
    );
}

#[test]
fn a_vm_that_comes_back_while_its_image_is_written_leaves_no_image() {
    let d = Dir::new("raced");
    let r = Retention::open(&d.0, 1 << 24, 1 << 30);
    // The arrival's removal lands between two steps of the write.
    let back = std::cell::Cell::new(false);
    let stop = || {
        if !back.get() {
            back.set(true);
            r.remove("web");
        }
        false
    };
    assert_eq!(
        r.keep("web", "m", (1, None), &memory(600, 300, 1), &stop)
            .unwrap(),
        None
    );
    assert!(back.get());
    assert!(r.view().images.is_empty());
    assert_eq!(std::fs::read_dir(&d.0).unwrap().count(), 0);
    // A stopped write keeps nothing either, and is no error.
    assert_eq!(
        r.keep("web", "m", (1, None), &memory(600, 300, 1), &|| true)
            .unwrap(),
        None
    );
    assert_eq!(std::fs::read_dir(&d.0).unwrap().count(), 0);
    // A description naming no VM is refused, whatever its length.
    let bad = format!(
        r#"{{"version":1,"vm":"{}","migration":"m","at_ms":1,"memory":4096,"digest":1,"bytes":1}}"#,
        "é".repeat(150)
    );
    assert!(decode_meta(bad.as_bytes())
        .unwrap_err()
        .contains("not a VM's name"));
}

#[test]
fn a_write_asks_once_more_after_its_last_read_and_keeps_nothing_if_told_to_stop() {
    // 600 pages: three steps of 256, each asked before it is read, and
    // one ask after the last read (a copy taken over during that read
    // would have given the file another guest's pages).
    let d = Dir::new("last-ask");
    let r = Retention::open(&d.0, 1 << 24, 1 << 30);
    let calls = std::cell::Cell::new(0);
    let after_last_read = || {
        calls.set(calls.get() + 1);
        calls.get() == 4
    };
    let kept = r.keep(
        "web",
        "m",
        (1, None),
        &memory(600, 300, 1),
        &after_last_read,
    );
    assert_eq!(kept.unwrap(), None);
    assert_eq!(calls.get(), 4);
    assert!(r.view().images.is_empty());
    assert_eq!(std::fs::read_dir(&d.0).unwrap().count(), 0);
    // Not told to stop: the same four asks, and the image is kept.
    calls.set(0);
    let never = || {
        calls.set(calls.get() + 1);
        false
    };
    let kept = r.keep("web", "m", (1, None), &memory(600, 300, 1), &never);
    assert!(kept.unwrap().is_some());
    assert_eq!(calls.get(), 4);
}

#[test]
fn a_failback_starts_from_the_file_once_it_is_whole() {
    let d = Dir::new("base");
    let r = Arc::new(Retention::open(&d.0, 1 << 30, 1 << 30));
    let mem = memory(64, 10, 4);
    assert!(r.base("web", "m-1").unwrap_err().contains("no image"));
    // The write waits at its first step until the base was asked for.
    let (asked_tx, asked_rx) = std::sync::mpsc::channel::<()>();
    let (waiting_tx, waiting_rx) = std::sync::mpsc::channel::<()>();
    let writer = {
        let (r, mem) = (r.clone(), mem.clone());
        let asked = std::sync::Mutex::new(Some((asked_rx, waiting_tx)));
        std::thread::spawn(move || {
            let stop = || {
                if let Some((rx, tx)) = asked.lock().unwrap().take() {
                    tx.send(()).unwrap();
                    rx.recv().unwrap();
                }
                false
            };
            r.keep("web", "m-1", (1, None), &mem, &stop)
        })
    };
    waiting_rx.recv().unwrap();
    let e = r.base("web", "m-1").unwrap_err();
    assert!(e.contains("still being written"), "{e}");
    asked_tx.send(()).unwrap();
    writer.join().unwrap().unwrap().unwrap();
    let Ok(BaseImage::File(f)) = r.base("web", "m-1") else {
        panic!("the file once written");
    };
    assert_eq!(f.digest(), crate::digest::full_digest(&mem, 1));
    let e = r.base("web", "m-2").err().unwrap();
    assert!(e.contains("from migration m-1, not m-2"), "{e}");
}

#[test]
fn every_image_goes_when_a_last_copy_needs_the_disk() {
    let d = Dir::new("drop-all");
    let r = Retention::open(&d.0, 1 << 20, 1 << 30);
    assert_eq!(r.drop_all(), 0);
    for vm in ["web", "db"] {
        r.keep(vm, "m", (1, None), &memory(16, 4, 3), &|| false)
            .unwrap()
            .unwrap();
    }
    assert_eq!(r.drop_all(), 2);
    assert!(r.view().images.is_empty());
    assert!(r.base("web", "m").is_err());
    // Renamed aside at once, deleted in the background.
    let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::fs::read_dir(&d.0).unwrap().count() > 0 {
        assert!(std::time::Instant::now() < end, "files left");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}
