//! Failback retention: a node keeps the image each VM left it with (a
//! sparse 0600 file with its page hashes), byte for byte what the target
//! got, lists it in `GET /v1/node`, drops it when the VM comes back, writes
//! it only while the node moves nothing, and keeps none without a budget. A
//! drained VM failed back to it sends only what changed since, unless the
//! delta is turned off.

use crate::common;

use common::agents::Agents;
use common::first_difference;
use ferry::memory::{GuestMemory, PAGE_SIZE};
use ferry::migration::retained::Retained;
use ferry::page::PageIndex;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn migrate(c: &Agents, from: &str, vm: &str, to: &str, paused: bool) -> String {
    let (s, m) = c.call(
        Method::POST,
        from,
        "/v1/migrations",
        Some(json!({"vm": vm, "target": to, "leave_paused": paused})),
    );
    assert_eq!(s, StatusCode::ACCEPTED, "{m}");
    let id = m["id"].as_str().unwrap().to_string();
    assert_eq!(c.wait(from, &id)["state"], "completed");
    id
}

/// Creates a VM on node `node` from `body`.
fn create(c: &Agents, node: &str, body: Value) {
    let (s, v) = c.call(Method::POST, node, "/v1/vms", Some(body));
    assert_eq!(s, StatusCode::CREATED, "{v}");
}

/// Creates VM `web` on node a (64 MiB writing a 4 MiB hot set at 10
/// MB/s); returns its pages.
fn create_web(c: &Agents) -> u64 {
    create(
        c,
        "a",
        json!({"name": "web", "memory": "64MiB", "workload": "hot:4MiB", "dirty_rate": "10MB/s"}),
    );
    (64u64 << 20) / PAGE_SIZE as u64
}

/// The memory a retained image holds, read page by page (each checked
/// against its hash).
fn image_memory(path: &std::path::Path) -> GuestMemory {
    let kept = Retained::open(path, 1 << 30).unwrap();
    let copy = GuestMemory::new(kept.memory()).unwrap();
    let mut page = vec![0u8; PAGE_SIZE];
    for i in 0..copy.pages() {
        kept.page(PageIndex(i), &mut page).unwrap();
        copy.write_page(PageIndex(i), &page);
    }
    copy
}

/// `node`'s retained images once `want` of them are listed.
fn retained(c: &Agents, node: &str, want: usize) -> Value {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, v) = c.call(Method::GET, node, "/v1/node", None);
        let r = v["failback_retention"].clone();
        if r["images"].as_array().map(Vec::len) == Some(want) {
            return r;
        }
        assert!(Instant::now() < end, "{node} retains {r}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `node`'s retained images once one of VM `vm` is listed.
fn retained_of(c: &Agents, node: &str, vm: &str) -> Value {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, v) = c.call(Method::GET, node, "/v1/node", None);
        let r = v["failback_retention"].clone();
        if r["images"]
            .as_array()
            .is_some_and(|l| l.iter().any(|i| i["vm"] == vm))
        {
            return r;
        }
        assert!(Instant::now() < end, "{node} retains {r}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_node_keeps_the_image_a_vm_left_with_until_it_comes_back() {
    let _serial = common::serial();
    let Some(c) = Agents::start(
        "retention",
        &[
            ("a", "failback_retention = \"256MiB\""),
            ("b", "failback_retention = \"256MiB\""),
            ("c", "failback_retention = 0"),
        ],
    ) else {
        return;
    };
    create(
        &c,
        "a",
        json!({"name": "web", "memory": "32MiB", "workload": "hot:8MiB", "dirty_rate": "20MB/s"}),
    );
    std::thread::sleep(Duration::from_millis(100));
    let r = retained(&c, "a", 0);
    assert_eq!(r["budget"], 256u64 << 20, "{r}");
    let id = migrate(&c, "a", "web", "b", true);
    let r = retained(&c, "a", 1);
    // The memory it left with stays warm for its failback, counted as used
    // and as reclaimable: it gives way to any VM that needs the room.
    let (_, v) = c.call(Method::GET, "a", "/v1/node", None);
    assert_eq!(v["memory_used"], 32u64 << 20, "{v}");
    assert_eq!(v["memory_reclaimable"], 32u64 << 20, "{v}");
    let image = &r["images"][0];
    assert_eq!(
        (image["vm"].as_str(), image["migration"].as_str()),
        (Some("web"), Some(id.as_str()))
    );
    assert_eq!(image["memory"], 32u64 << 20);
    assert!(image["bytes"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(r["used"], image["bytes"]);
    // Byte for byte what b got (paused there), each page checked against
    // its hash; a private file.
    let path = std::path::Path::new(r["dir"].as_str().unwrap()).join("web.retained");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let copy = image_memory(&path);
    let on_b = c.agent("b").node.guest("web").unwrap();
    assert_eq!(first_difference(on_b.memory(), &copy), None);
    let kept = Retained::open(&path, 1 << 30).unwrap();
    assert_eq!(kept.digest(), image["digest"].as_u64().unwrap());
    // A VM that comes back: its image on a is past, and b keeps the one it
    // left b with.
    create(&c, "a", json!({"name": "app", "memory": "16MiB"}));
    migrate(&c, "a", "app", "b", false);
    retained(&c, "a", 2);
    let app = path.with_file_name("app.retained");
    assert!(app.exists());
    migrate(&c, "b", "app", "a", false);
    let r = retained(&c, "a", 1);
    assert_eq!(r["images"][0]["vm"], "web", "{r}");
    assert!(!app.exists());
    retained(&c, "b", 1);
    // A node with no budget keeps nothing.
    migrate(&c, "a", "app", "c", false);
    let r = retained(&c, "c", 0);
    assert_eq!(r["budget"], 0);
    migrate(&c, "c", "app", "b", false);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(retained(&c, "c", 0)["used"], 0);
}

/// Runs operation `path` on node `node` with `body` and waits for it to end.
fn op(c: &Agents, node: &str, path: &str, body: Value) -> Value {
    let (s, op) = c.call(Method::POST, node, path, Some(body));
    assert_eq!(s, StatusCode::ACCEPTED, "{op}");
    let done = c.wait_op(node, op["id"].as_str().unwrap());
    assert_eq!(done["state"], "completed", "{done}");
    done
}

/// The report of the migration operation `done`'s only step ran, from the
/// node that sent it.
fn step_report(c: &Agents, done: &Value) -> Value {
    let step = &done["steps"][0];
    let path = format!("/v1/migrations/{}", step["migration_id"].as_str().unwrap());
    let (s, m) = c.call(Method::GET, step["source"].as_str().unwrap(), &path, None);
    assert_eq!(s, StatusCode::OK, "{m}");
    m["report"].clone()
}

#[test]
fn a_drained_vm_fails_back_by_delta_unless_told_not_to() {
    let _serial = common::serial();
    let Some(c) = Agents::start(
        "delta-failback",
        &[
            ("a", "failback_retention = \"256MiB\""),
            ("b", "failback_retention = \"256MiB\""),
        ],
    ) else {
        return;
    };
    let pages = create_web(&c);
    let drained = op(&c, "a", "/v1/node/drain", json!({}));
    let away = step_report(&c, &drained);
    retained(&c, "a", 1);
    std::thread::sleep(Duration::from_millis(300));
    // Back by delta: only the pages it wrote on b travel in round 0.
    let back = step_report(
        &c,
        &op(&c, "a", "/v1/node/resume", json!({"failback": true})),
    );
    let delta = &back["delta"];
    assert_eq!(delta["used"], true, "{back}");
    // Its base: the migration the drain moved it by.
    assert_eq!(delta["base"], drained["steps"][0]["migration_id"], "{back}");
    assert!(
        delta["pages_skipped"].as_u64().unwrap() > pages / 2,
        "{back}"
    );
    assert!(
        back["round_log"][0]["pages"].as_u64().unwrap() < pages / 4,
        "{back}"
    );
    let (full, sent) = (
        away["wire_bytes"].as_u64().unwrap(),
        back["wire_bytes"].as_u64().unwrap(),
    );
    assert!(sent * 4 < full, "{sent} of {full} bytes");
    assert_eq!(back["verified"], true);
    // The same cycle with the delta off on both legs: every page travels.
    let drained = op(&c, "a", "/v1/node/drain", json!({"delta": "off"}));
    assert_eq!(step_report(&c, &drained)["delta"]["base"], Value::Null);
    retained(&c, "a", 1);
    let back = step_report(
        &c,
        &op(
            &c,
            "a",
            "/v1/node/resume",
            json!({"failback": true, "delta": "off"}),
        ),
    );
    assert_eq!(back["delta"]["base"], Value::Null, "{back}");
    assert_eq!(back["round_log"][0]["pages"], pages, "{back}");
    // A wrong switch is refused, naming the field.
    let (s, v) = c.call(
        Method::POST,
        "a",
        "/v1/node/drain",
        Some(json!({"delta": "maybe"})),
    );
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(v.to_string().contains("delta"), "{v}");
}

#[test]
fn a_warm_copy_gives_way_to_a_vm_that_needs_the_room() {
    let _serial = common::serial();
    let Some(c) = Agents::start(
        "warm-room",
        &[
            (
                "a",
                "failback_retention = \"256MiB\"\nmemory_capacity = \"48MiB\"",
            ),
            ("b", ""),
        ],
    ) else {
        return;
    };
    create(&c, "a", json!({"name": "web", "memory": "32MiB"}));
    migrate(&c, "a", "web", "b", false);
    let (_, v) = c.call(Method::GET, "a", "/v1/node", None);
    assert_eq!(v["memory_reclaimable"], 32u64 << 20, "{v}");
    // Written once the node moves nothing.
    retained(&c, "a", 1);
    // 40 MiB fits only without the warm copy: it goes, and the VM is made.
    create(&c, "a", json!({"name": "big", "memory": "40MiB"}));
    let (_, v) = c.call(Method::GET, "a", "/v1/node", None);
    assert_eq!(
        (v["memory_used"].as_u64(), v["memory_reclaimable"].as_u64()),
        (Some(40 << 20), Some(0)),
        "{v}"
    );
    // Its file is still kept: the failback goes by delta from it.
    c.call(Method::DELETE, "a", "/v1/vms/big", None);
    let back = c.call(
        Method::POST,
        "b",
        "/v1/migrations",
        Some(json!({"vm": "web", "target": "a"})),
    );
    assert_eq!(back.0, StatusCode::ACCEPTED, "{}", back.1);
    let done = c.wait("b", back.1["id"].as_str().unwrap());
    assert_eq!(done["report"]["delta"]["used"], true, "{done}");
}

#[test]
fn a_node_writes_images_only_while_it_moves_nothing() {
    let _serial = common::serial();
    let Some(c) = Agents::start(
        "retention-quiet",
        &[
            (
                "a",
                "failback_retention = \"80MiB\"\nmax_bandwidth = \"20MB/s\"",
            ),
            ("b", "failback_retention = \"256MiB\""),
        ],
    ) else {
        return;
    };
    for name in ["web", "app", "db"] {
        create(
            &c,
            "a",
            json!({"name": name, "memory": "32MiB", "workload": "hot:4MiB", "dirty_rate": "5MB/s"}),
        );
    }
    // One at a time through a narrow link: the first VM's image could be
    // written while the other two move, but waits for them.
    op(&c, "a", "/v1/node/drain", json!({"max_concurrent": 1}));
    // Warm copies stay within the budget too: two of the three, the oldest
    // dropped, and an image of each.
    let r = retained(&c, "a", 2);
    let (_, list) = c.call(Method::GET, "a", "/v1/migrations", None);
    let last_end = list
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["finished_at_ms"].as_u64().unwrap())
        .max()
        .unwrap();
    for image in r["images"].as_array().unwrap() {
        let at = image["at_ms"].as_u64().unwrap();
        assert!(
            at >= last_end,
            "{image} written before the drain ended at {last_end}"
        );
    }
    let (_, v) = c.call(Method::GET, "a", "/v1/node", None);
    assert_eq!(v["memory_reclaimable"], 64u64 << 20, "{v}");
}

#[test]
fn a_vm_sent_to_any_node_that_kept_its_image_goes_by_delta() {
    use common::agents::READONLY_TOKEN;
    let _serial = common::serial();
    let kept = "failback_retention = \"256MiB\"";
    let Some(c) = Agents::start_with(
        "delta-anywhere",
        "readonly_token_file = \"readonly.token\"",
        &[("a", kept), ("b", kept), ("c", kept)],
    ) else {
        return;
    };
    let pages = create_web(&c);
    // a → b → c: a keeps the image the VM left it with.
    let left_a = migrate(&c, "a", "web", "b", false);
    retained(&c, "a", 1);
    let (s, v) = c.call(Method::GET, "a", "/v1/retained/web", None);
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["migration"], left_a.as_str(), "{v}");
    migrate(&c, "b", "web", "c", false);
    retained(&c, "b", 1);
    // The hashes: for the cluster's token only, every range checked.
    let hashes = |token: &str, query: &str| {
        c.call_with(
            Some(token),
            Method::GET,
            "a",
            &format!("/v1/retained/web/hashes{query}"),
            None,
        )
    };
    assert_eq!(hashes(READONLY_TOKEN, "").0, StatusCode::FORBIDDEN);
    let (s, v) = hashes(common::agents::TOKEN, &format!("?first={}", pages + 1));
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(v.to_string().contains("first"), "{v}");
    let (s, v) = hashes(common::agents::TOKEN, "?count=x");
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let (s, v) = hashes(common::agents::TOKEN, "?count=1048577");
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(v.to_string().contains("count"), "{v}");
    let (s, _) = c.call(Method::GET, "a", "/v1/retained/nothing/hashes", None);
    assert_eq!(s, StatusCode::NOT_FOUND);
    // c → a: c never held a's image, yet only what changed travels, the
    // base being the image a kept.
    let back = migrate(&c, "c", "web", "a", true);
    let (_, m) = c.call(Method::GET, "c", &format!("/v1/migrations/{back}"), None);
    let report = &m["report"];
    assert_eq!(report["delta"]["used"], true, "{report}");
    assert_eq!(report["delta"]["base"], left_a.as_str(), "{report}");
    assert!(
        report["delta"]["pages_skipped"].as_u64().unwrap() > pages / 2,
        "{report}"
    );
    assert!(
        report["round_log"][0]["pages"].as_u64().unwrap() < pages / 4,
        "{report}"
    );
    assert_eq!(report["verified"], true);
    let (_, first) = c.call(Method::GET, "a", &format!("/v1/migrations/{left_a}"), None);
    let (full, sent) = (
        first["report"]["wire_bytes"].as_u64().unwrap(),
        report["wire_bytes"].as_u64().unwrap(),
    );
    eprintln!("a to b: {full} bytes; c back to a by delta: {sent} bytes");
    assert!(sent * 4 < full, "{sent} of {full} bytes");
    // Byte for byte what c sent: the image c kept of it.
    let r = retained(&c, "c", 1);
    let path = std::path::Path::new(r["dir"].as_str().unwrap()).join("web.retained");
    let copy = image_memory(&path);
    let on_a = c.agent("a").node.guest("web").unwrap();
    assert_eq!(first_difference(on_a.memory(), &copy), None);
}

/// A drain sends each VM where its memory already is, when that node has
/// room: b's VM goes back to a, which kept its image, though c has more
/// free memory; its plan says so; and it travels by delta. With the delta
/// off, nothing is held and the roomiest node takes it.
#[test]
fn a_drain_sends_a_vm_where_its_image_is_kept() {
    let _serial = common::serial();
    let kept = "failback_retention = \"256MiB\"";
    let roomy = "failback_retention = \"256MiB\"\nmemory_capacity = \"64GiB\"";
    let Some(c) = Agents::start("near", &[("a", kept), ("b", kept), ("c", roomy)]) else {
        return;
    };
    let pages = create_web(&c);
    let left_a = migrate(&c, "a", "web", "b", false);
    retained(&c, "a", 1);
    let plan = |body: Value| {
        let (s, v) = c.call(Method::POST, "b", "/v1/node/drain", Some(body));
        assert_eq!(s, StatusCode::OK, "{v}");
        v["moves"][0].clone()
    };
    let off = plan(json!({"dry_run": true, "delta": "off"}));
    assert_eq!(
        (&off["target"], &off["base"]),
        (&json!("c"), &Value::Null),
        "{off}"
    );
    let near = plan(json!({"dry_run": true}));
    assert_eq!(
        (&near["target"], &near["base"]),
        (&json!("a"), &json!("own")),
        "{near}"
    );
    let drained = op(&c, "b", "/v1/node/drain", json!({}));
    assert_eq!(drained["steps"][0]["target"], "a", "{drained}");
    let report = step_report(&c, &drained);
    assert_eq!(report["delta"]["used"], true, "{report}");
    assert_eq!(report["delta"]["base"], left_a.as_str(), "{report}");
    assert!(
        report["round_log"][0]["pages"].as_u64().unwrap() < pages / 4,
        "{report}"
    );
    assert_eq!(report["verified"], true, "{report}");
}

/// A VM deleted and created again under its name is another VM: the image
/// a node kept of the first is never the second's base, even with the same
/// content, so no page of one can stand in for the other's.
#[test]
fn an_image_of_an_earlier_vm_of_the_same_name_is_never_a_base() {
    let _serial = common::serial();
    let kept = "failback_retention = \"256MiB\"";
    let Some(c) = Agents::start_with("incarnation", "", &[("a", kept), ("b", kept)]) else {
        return;
    };
    let body = json!({"name": "web", "memory": "64MiB", "workload": "idle"});
    create(&c, "a", body.clone());
    let first = |node: &str| {
        let (s, v) = c.call(Method::GET, node, "/v1/vms/web", None);
        assert_eq!(s, StatusCode::OK, "{v}");
        v["incarnation"].as_u64().unwrap()
    };
    let was = first("a");
    assert_ne!(was, 0);
    migrate(&c, "a", "web", "b", false);
    retained(&c, "a", 1);
    let (_, image) = c.call(Method::GET, "a", "/v1/retained/web", None);
    assert_eq!(image["incarnation"], was, "{image}");
    // The arrived VM is still the same one.
    assert_eq!(first("b"), was);
    // Deleted, and a VM of that name and the same content made again.
    let (s, v) = c.call(Method::DELETE, "b", "/v1/vms/web", None);
    assert_eq!(s, StatusCode::OK, "{v}");
    create(&c, "b", body);
    let now = first("b");
    assert!(now != 0 && now != was, "{now} {was}");
    // To a: a keeps an image of the first VM, which is not this one's.
    let id = migrate(&c, "b", "web", "a", false);
    let (_, m) = c.call(Method::GET, "b", &format!("/v1/migrations/{id}"), None);
    let report = &m["report"];
    assert_eq!(report["delta"]["used"], false, "{report}");
    assert_eq!(report["delta"]["base"], Value::Null, "{report}");
    assert_eq!(report["delta"]["pages_skipped"], 0, "{report}");
    assert_eq!(report["verified"], true);
    assert_eq!(first("a"), now);
}

/// A VM made from a RAM image that comes back to a node leaves the image it
/// left it with there: no longer its own base, but a copy for its kin,
/// which the next VM made from that image starts from.
#[test]
fn a_vm_back_home_leaves_its_image_there_for_its_kin() {
    let _serial = common::serial();
    let kept = "failback_retention = \"256MiB\"";
    let Some(c) = Agents::start("kin-home", &[("a", kept), ("b", kept)]) else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("ferry-kin-home-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("golden.img");
    let golden = GuestMemory::new(32 << 20).unwrap();
    ferry::memory::FillSpec::default().fill(&golden, 5, 1);
    golden.save_image(&path).unwrap();
    let image = path.to_str().unwrap();
    for (node, vm) in [("a", "one"), ("b", "two")] {
        let body = json!({"name": vm, "memory": "32MiB", "workload": "hot:2MiB",
                          "dirty_rate": "10MB/s", "image": image});
        create(&c, node, body);
    }
    let left = migrate(&c, "a", "one", "b", false);
    retained(&c, "a", 1);
    let back = migrate(&c, "b", "one", "a", false);
    assert_eq!(report(&c, "b", &back)["delta"]["base"], left.as_str());
    // Back home, one's image stays on a.
    let kept = retained(&c, "a", 1);
    assert_eq!(kept["images"][0]["vm"], "one", "{kept}");
    assert_eq!(kept["images"][0]["migration"], left.as_str(), "{kept}");
    // two starts from it.
    let id = migrate(&c, "b", "two", "a", false);
    let r = report(&c, "b", &id);
    assert_eq!(r["delta"]["used"], true, "{r}");
    assert_eq!(r["delta"]["base"], left.as_str(), "{r}");
    assert_eq!(r["delta"]["base_vm"], "one", "{r}");
    assert_eq!(r["verified"], true, "{r}");
    // one leaves again: the copy it left with before is no base of its own.
    let again = migrate(&c, "a", "one", "b", false);
    let (s, v) = c.call(Method::GET, "a", "/v1/retained/one", None);
    assert!(
        s == StatusCode::NOT_FOUND || v["migration"] == again.as_str(),
        "{s} {v}"
    );
    // Its new image written, one comes home again and it stays; deleting
    // the VM drops it.
    let kept = retained_of(&c, "a", "one");
    assert_eq!(kept["images"][0]["migration"], again.as_str(), "{kept}");
    migrate(&c, "b", "one", "a", false);
    let kept = retained(&c, "a", 1);
    assert_eq!(kept["images"][0]["migration"], again.as_str(), "{kept}");
    let (s, v) = c.call(Method::DELETE, "a", "/v1/vms/one", None);
    assert_eq!(s, StatusCode::OK, "{v}");
    retained(&c, "a", 0);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Migration `id`'s report on node `node`.
fn report(c: &Agents, node: &str, id: &str) -> Value {
    let (_, m) = c.call(Method::GET, node, &format!("/v1/migrations/{id}"), None);
    m["report"].clone()
}

/// VMs made from one RAM image are kin: one sent to a node that holds a
/// copy of another starts from it, the pages compared by tags keyed for
/// that migration, and sends only what differs; its memory arrives byte for
/// byte. The kin's kept file is copied in (its warm copy stays); a warm copy
/// alone is taken over. A VM made from no image, or sent to a node with kin
/// bases off, takes no kin's copy; the copies and their tags are for the
/// cluster's token only. A drain prefers a node that holds such a copy.
#[test]
fn a_vm_starts_from_the_copy_a_node_holds_of_its_kin() {
    use common::agents::{READONLY_TOKEN, TOKEN};
    let _serial = common::serial();
    let kept = "failback_retention = \"256MiB\"";
    // b cannot write images (its folder cannot be made): warm copies only.
    let warm = "failback_retention = \"256MiB\"\nfailback_retention_dir = \"/proc/ferry-none\"";
    let off = "failback_retention = \"256MiB\"\nkin_bases = false";
    let roomy = format!("{kept}\nmemory_capacity = \"64GiB\"");
    let Some(c) = Agents::start_with(
        "kin",
        "readonly_token_file = \"readonly.token\"",
        &[("a", kept), ("b", warm), ("c", &roomy), ("d", off)],
    ) else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("ferry-kin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("golden.img");
    let golden = GuestMemory::new(32 << 20).unwrap();
    ferry::memory::FillSpec::default().fill(&golden, 11, 1);
    golden.save_image(&path).unwrap();
    let image = path.to_str().unwrap();
    let pages = (32u64 << 20) / PAGE_SIZE as u64;
    let vm = |name: &str, workload: &str, image: Option<&str>| {
        let mut body =
            json!({"name": name, "memory": "32MiB", "workload": workload, "dirty_rate": "10MB/s"});
        if let Some(i) = image {
            body["image"] = json!(i);
        }
        create(&c, "a", body);
    };
    vm("one", "idle", Some(image));
    vm("two", "hot:2MiB", Some(image));
    vm("three", "idle", None);
    vm("four", "hot:2MiB", Some(image));
    vm("five", "idle", Some(image));
    // one goes to b, c and d and back: each holds the copy it left with.
    let to_b = migrate(&c, "a", "one", "b", false);
    let left_b = migrate(&c, "b", "one", "a", false);
    // A drain of a would send one VM made from the image to b, for the
    // warm copy only b's answer shows (it serves one arrival), though c
    // has more room; the others go to c with nothing held.
    let (s, plan) = c.call(
        Method::POST,
        "a",
        "/v1/node/drain",
        Some(json!({"dry_run": true})),
    );
    assert_eq!(s, StatusCode::OK, "{plan}");
    let moves = plan["moves"].as_array().unwrap();
    let to = |node: &str| moves.iter().filter(|m| m["target"] == node).count();
    assert_eq!((to("b"), to("c")), (1, 4), "{plan}");
    for m in moves {
        let base = if m["target"] == "b" {
            json!("kin")
        } else {
            Value::Null
        };
        assert_eq!(m["base"], base, "{plan}");
        if m["target"] == "b" {
            assert_ne!(m["vm"], "three", "{plan}");
        }
    }
    migrate(&c, "a", "one", "c", false);
    let left_c = migrate(&c, "c", "one", "a", false);
    retained(&c, "c", 1);
    migrate(&c, "a", "one", "d", false);
    migrate(&c, "d", "one", "a", false);
    let query = format!(
        "/v1/bases?image={}&memory={}",
        image.replace('/', "%2F"),
        32 << 20
    );
    let bases = |node: &str| {
        let (s, v) = c.call(Method::GET, node, &query, None);
        assert_eq!(s, StatusCode::OK, "{v}");
        v
    };
    let v = bases("b");
    assert_eq!(
        (&v[0]["vm"], &v[0]["warm"]),
        (&json!("one"), &json!(true)),
        "{v}"
    );
    assert_eq!(v[0]["migration"], left_b.as_str(), "{v}");
    assert_eq!(bases("d"), json!([]));
    let (s, _) = c.call_with(Some(READONLY_TOKEN), Method::GET, "b", &query, None);
    assert_eq!(s, StatusCode::FORBIDDEN);
    let tags = |token: &str, body: Value| {
        let path = "/v1/bases/one/tags";
        c.call_with(Some(token), Method::POST, "b", path, Some(body.to_string()))
    };
    let key = "ab".repeat(32);
    let ask = json!({"migration": left_b, "key": key, "count": 4});
    assert_eq!(tags(READONLY_TOKEN, ask.clone()).0, StatusCode::FORBIDDEN);
    for (bad, field) in [
        (json!({"migration": left_b, "key": "ab", "count": 4}), "key"),
        (
            json!({"migration": left_b, "key": key, "count": 1048577}),
            "count",
        ),
    ] {
        let (s, v) = tags(TOKEN, bad);
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        assert!(v.to_string().contains(field), "{v}");
    }
    let (s, v) = tags(
        TOKEN,
        json!({"migration": "m-none", "key": key, "count": 4}),
    );
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    let (s, v) = tags(
        TOKEN,
        json!({"migration": left_b, "key": key, "first": pages, "count": 1}),
    );
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    let (s, v) = tags(TOKEN, ask);
    assert_eq!(s, StatusCode::OK, "{v}");
    // two, writing, goes to b: it takes one's warm copy over.
    let two = migrate(&c, "a", "two", "b", true);
    let r = report(&c, "a", &two);
    assert_eq!(r["delta"]["used"], true, "{r}");
    assert_eq!(r["delta"]["base"], left_b.as_str(), "{r}");
    assert_eq!(r["delta"]["base_vm"], "one", "{r}");
    assert!(
        r["delta"]["pages_skipped"].as_u64().unwrap() > pages / 2,
        "{r}"
    );
    assert_eq!(r["verified"], true, "{r}");
    assert_eq!(bases("b"), json!([]));
    let full = report(&c, "a", &to_b)["wire_bytes"].as_u64().unwrap();
    let sent = r["wire_bytes"].as_u64().unwrap();
    eprintln!("one a to b: {full} bytes; two a to b from one's copy: {sent} bytes");
    assert!(sent * 3 < full, "{sent} of {full} bytes");
    // Byte for byte what a sent: the image a kept of two.
    // (one's image, if a wrote it before one came back, stays there too.)
    let kept_a = retained_of(&c, "a", "two");
    let two_image = kept_a["images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["vm"] == "two");
    assert_eq!(two_image.unwrap()["image"], image, "{kept_a}");
    let at = std::path::Path::new(kept_a["dir"].as_str().unwrap()).join("two.retained");
    let on_b = c.agent("b").node.guest("two").unwrap();
    assert_eq!(first_difference(on_b.memory(), &image_memory(&at)), None);
    // four goes to c: one's file there is copied in, its warm copy stays.
    let four = migrate(&c, "a", "four", "c", false);
    let r = report(&c, "a", &four);
    assert_eq!(r["delta"]["used"], true, "{r}");
    assert_eq!(r["delta"]["base"], left_c.as_str(), "{r}");
    assert_eq!(r["delta"]["base_vm"], "one", "{r}");
    assert!(
        r["delta"]["pages_skipped"].as_u64().unwrap() > pages / 2,
        "{r}"
    );
    assert_eq!(r["verified"], true, "{r}");
    let v = bases("c");
    assert_eq!(
        (&v[0]["vm"], &v[0]["warm"]),
        (&json!("one"), &json!(true)),
        "{v}"
    );
    // d, with kin bases off, lends nothing.
    let five = migrate(&c, "a", "five", "d", false);
    let r = report(&c, "a", &five);
    assert_eq!(
        (&r["delta"]["used"], &r["delta"]["base"]),
        (&json!(false), &Value::Null),
        "{r}"
    );
    // three, made from no image, takes nothing of its neighbours'.
    let three = migrate(&c, "a", "three", "c", false);
    let r = report(&c, "a", &three);
    assert_eq!(
        (&r["delta"]["used"], &r["delta"]["base"]),
        (&json!(false), &Value::Null),
        "{r}"
    );
    assert_eq!(r["verified"], true, "{r}");
    let _ = std::fs::remove_dir_all(&dir);
}
