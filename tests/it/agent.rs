//! Real node agents on loopback, driven through their HTTP API: the token,
//! bad bodies, VMs created and migrated between agents (memory compared byte
//! for byte), both agents' records, the concurrency limit and its queue.

use crate::common;
use ferry::page::PageIndex;

use common::agents::{error_of, Agents, TOKEN};
use common::first_difference;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::time::Duration;

#[test]
fn the_api_wants_its_token_and_well_formed_bodies() {
    let _serial = common::serial();
    let Some(c) = Agents::start("api", &[("a", ""), ("b", "")]) else {
        return;
    };
    for token in [None, Some("wrong"), Some("test-token-012345678")] {
        let (s, v) = c.call_with(token, Method::GET, "a", "/v1/node", None);
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{token:?}");
        assert_eq!(error_of(&v).0, "unauthorized");
    }
    let (s, _) = c.call_with(None, Method::GET, "a", "/metrics", None);
    assert_eq!(s, StatusCode::UNAUTHORIZED, "metrics too");
    let (s, v) = c.call(Method::GET, "a", "/v1/node", None);
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["name"], "a");
    assert_eq!(v["state"], "active");
    assert_eq!(v["memory_capacity"], 1u64 << 30);
    assert_eq!(v["limits"]["max_concurrent_migrations"], 2);

    let bad = |body: &str, want: &str| {
        let (s, v) = c.call_with(Some(TOKEN), Method::POST, "a", "/v1/vms", Some(body.into()));
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {v}");
        let (code, msg) = error_of(&v);
        assert_eq!(code, "bad_request");
        assert!(msg.contains(want), "{body}: {msg}");
    };
    bad("{", "invalid JSON");
    bad("{\"name\": \"x\"}", "memory");
    bad("{\"name\": \"x\", \"memory\": \"8 parsecs\"}", "memory");
    bad(
        "{\"name\": \"x\", \"memory\": \"64MiB\", \"colour\": 1}",
        "colour",
    );
    bad("{\"name\": \"x y\", \"memory\": \"64MiB\"}", "name");
    bad(
        "{\"name\": \"x\", \"memory\": \"64MiB\", \"workload\": \"hot:1GiB\"}",
        "workload: a hot set of 1073741824 bytes is out of range",
    );
    bad(
        "{\"name\": \"x\", \"memory\": \"64MiB\", \"guest\": \"xen\"}",
        "guest",
    );
    // KVM guests where the node has /dev/kvm (tests/it/kvm.rs moves them);
    // where it has none, a clear refusal.
    let (s, v) = c.call(
        Method::POST,
        "a",
        "/v1/vms",
        Some(json!({"name": "x", "memory": "16MiB", "guest": "kvm"})),
    );
    if ferry::kvm::available().is_ok() {
        assert_eq!(s, StatusCode::CREATED, "{v}");
        assert_eq!(v["guest"], "kvm");
        let (s, _) = c.call(Method::DELETE, "a", "/v1/vms/x", None);
        assert!(s.is_success());
    } else {
        assert_eq!(s, StatusCode::NOT_IMPLEMENTED, "{v}");
        assert!(error_of(&v).1.contains("/dev/kvm"), "{v}");
    }
    let (s, v) = c.call(
        Method::POST,
        "a",
        "/v1/vms",
        Some(json!({"name": "big", "memory": "2GiB"})),
    );
    assert_eq!(
        (s, error_of(&v).0.as_str()),
        (StatusCode::CONFLICT, "insufficient_memory"),
        "{v}"
    );
    let (s, v) = c.call(Method::GET, "a", "/v1/vms/nope", None);
    assert_eq!(
        (s, error_of(&v).0.as_str()),
        (StatusCode::NOT_FOUND, "not_found")
    );
    let (s, _) = c.call(Method::GET, "a", "/v2/anything", None);
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, v) = c.call(
        Method::POST,
        "a",
        "/v1/migrations",
        Some(json!({"vm": "nope", "target": "b"})),
    );
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    let (s, v) = c.call(
        Method::POST,
        "a",
        "/v1/migrations",
        Some(json!({"vm": "nope", "target": "z"})),
    );
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(error_of(&v).1.contains("nodes: a, b"), "{v}");
    let (s, v) = c.call(
        Method::POST,
        "a",
        "/v1/migrations",
        Some(json!({"vm": "nope", "target": "b", "codec": "gzip"})),
    );
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(error_of(&v).1.contains("codec"), "{v}");

    // The data address takes only sessions that prove the cluster's key.
    let data = c.agent("b").data_addr.to_string();
    let attempt = |label: Option<ferry::wire::SessionLabel>, key: Option<&[u8]>| {
        let g = common::guest(
            8 << 20,
            ferry::memory::FillSpec::default(),
            ferry::memory::WorkloadPattern::Idle,
            0,
        );
        let config = ferry::migration::MigrationConfig {
            label,
            session_key: key.map(|k| ferry::migration::auth::SessionKey(k.to_vec())),
            ..ferry::migration::MigrationConfig::default()
        };
        let ctx = ferry::transport::RunContext {
            // Agents take TLS only; a source with a key proves it over TLS.
            tls: key.map(|_| ferry::transport::tls::TlsClient::bound_to_key()),
            ..ferry::transport::RunContext::default()
        };
        let report =
            c.rt.block_on(ferry::transport::migrate(g.clone(), &data, &config, &ctx));
        (report, g.is_running())
    };
    let label = ferry::wire::SessionLabel {
        vm: "intruder".into(),
        migration_id: "x-1".into(),
        source_node: "a".into(),
    };
    let (r, running) = attempt(None, None);
    assert!(r.error.unwrap().contains("takes TLS only"));
    assert!(running, "a refused guest keeps running");
    // The cluster's key is derived from its secret, never the API token's
    // bytes: the token alone proves nothing.
    let key = ferry::migration::auth::derive_migration_key(TOKEN.as_bytes());
    let (r, running) = attempt(Some(label.clone()), Some(TOKEN.as_bytes()));
    assert!(r.error.unwrap().contains("proof of the key is wrong"));
    assert!(running);
    let (r, running) = attempt(None, Some(&key));
    assert!(r.error.unwrap().contains("cluster's agents only"));
    assert!(running);
    let (r, running) = attempt(Some(label.clone()), Some(b"a guessed token"));
    assert!(r
        .error
        .unwrap()
        .contains("the source's proof of the key is wrong"));
    assert!(running);
    let (_, vms) = c.call(Method::GET, "b", "/v1/vms", None);
    assert!(
        vms.as_array().unwrap().is_empty(),
        "nothing was let in: {vms}"
    );
    // With the cluster's key, a labelled session is let in.
    let (r, running) = attempt(Some(label), Some(&key));
    assert_eq!(
        r.outcome,
        ferry::migration::Outcome::Completed,
        "{:?}",
        r.error
    );
    assert!(!running, "it runs on b now");
}

#[test]
fn a_vm_migrates_between_agents_byte_for_byte_and_both_record_it() {
    let _serial = common::serial();
    let Some(c) = Agents::start("migrate", &[("a", ""), ("b", "")]) else {
        return;
    };
    let (s, v) = c.call(
        Method::POST,
        "a",
        "/v1/vms",
        Some(json!({"name": "vm1", "memory": "64MiB", "workload": "hot:8MiB", "dirty_rate": "20MB/s"})),
    );
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["state"], "running");
    assert_eq!(v["memory"], 64u64 << 20);
    assert_eq!(v["workload"], "hot:8MiB");
    let (s, v) = c.call(
        Method::POST,
        "a",
        "/v1/vms",
        Some(json!({"name": "vm1", "memory": "64MiB"})),
    );
    assert_eq!(s, StatusCode::CONFLICT, "a second vm1: {v}");
    let source = c.agent("a").node.guest("vm1").unwrap();
    // Let the workload write a while, so the migration has dirty pages.
    std::thread::sleep(Duration::from_millis(200));
    assert!(source.progress_counter() > 0);

    let (s, m) = c.call(
        Method::POST,
        "a",
        "/v1/migrations",
        Some(json!({"vm": "vm1", "target": "b", "codec": "lz4", "channels": 2, "leave_paused": true})),
    );
    assert_eq!(s, StatusCode::ACCEPTED, "{m}");
    let id = m["id"].as_str().unwrap().to_string();
    assert_eq!(
        (m["vm"].as_str(), m["source"].as_str(), m["target"].as_str()),
        (Some("vm1"), Some("a"), Some("b"))
    );
    let done = c.wait("a", &id);
    assert_eq!(done["state"], "completed", "{done}");
    assert_eq!(done["direction"], "outgoing");
    assert_eq!(done["report"]["outcome"], "completed");
    assert_eq!(done["report"]["verified"], true);

    // The VM is on b, paused as asked, and gone from a.
    let (s, v) = c.call(Method::GET, "b", "/v1/vms/vm1", None);
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["state"], "paused");
    assert_eq!(v["memory"], 64u64 << 20);
    assert_eq!(
        (v["workload"].as_str(), v["dirty_rate"].as_u64()),
        (Some("hot:8MiB"), Some(20_000_000))
    );
    let (s, _) = c.call(Method::GET, "a", "/v1/vms/vm1", None);
    assert_eq!(s, StatusCode::NOT_FOUND);
    let target = c.agent("b").node.guest("vm1").unwrap();
    let written = source.progress_counter();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        source.progress_counter(),
        written,
        "the source never resumes after GO"
    );
    assert_eq!(first_difference(source.memory(), target.memory()), None);

    // b lists the same migration as incoming.
    let incoming = c.wait_incoming("b", &id);
    assert_eq!(incoming["direction"], "incoming");
    assert_eq!(incoming["state"], "completed");
    assert_eq!(incoming["source"], "a");
    assert_eq!(incoming["report"]["side"], "destination");

    let (s, text) = c.call(Method::GET, "a", "/metrics", None);
    assert_eq!(s, StatusCode::OK);
    let text = text.as_str().unwrap().to_string();
    assert!(
        text.contains("ferry_migrations_total{outcome=\"completed\"} 1"),
        "{text}"
    );
    assert!(text.contains("ferry_vms_hosted 0"), "{text}");
    let (_, text) = c.call(Method::GET, "b", "/metrics", None);
    assert!(
        text.as_str().unwrap().contains("ferry_vms_hosted 1"),
        "{text}"
    );

    // A VM's name is the cluster's: node a cannot make a second vm1 (a
    // twin arriving anyway is refused: tests/it/hostile/agents.rs).
    let (s, v) = c.call(
        Method::POST,
        "a",
        "/v1/vms",
        Some(json!({"name": "vm1", "memory": "16MiB", "workload": "idle"})),
    );
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    let (_, v) = c.call(Method::GET, "b", "/v1/vms/vm1", None);
    assert_eq!(v["state"], "paused", "{v}");
}

#[test]
fn outgoing_migrations_beyond_the_limit_wait_in_order_and_can_be_cancelled() {
    let _serial = common::serial();
    let Some(c) = Agents::start(
        "queue",
        &[("a", "max_concurrent_migrations = 1"), ("b", "")],
    ) else {
        return;
    };
    for i in 1..=4 {
        let (s, v) = c.call(
            Method::POST,
            "a",
            "/v1/vms",
            Some(json!({"name": format!("vm{i}"), "memory": "32MiB", "workload": "idle"})),
        );
        assert_eq!(s, StatusCode::CREATED, "{v}");
    }
    // 32 MiB at 100 MB/s: about a third of a second each.
    let ids: Vec<String> = (1..=4)
        .map(|i| {
            let (s, m) = c.call(
                Method::POST,
                "a",
                "/v1/migrations",
                Some(json!({"vm": format!("vm{i}"), "target": "b", "max_bandwidth": "100MB/s", "codec": "none"})),
            );
            assert_eq!(s, StatusCode::ACCEPTED, "{m}");
            m["id"].as_str().unwrap().to_string()
        })
        .collect();
    let (_, node) = c.call(Method::GET, "a", "/v1/node", None);
    assert_eq!(node["migrations_queued"], 3, "{node}");
    let (_, first) = c.call(
        Method::GET,
        "a",
        &format!("/v1/migrations/{}", ids[0]),
        None,
    );
    assert_eq!(first["state"], "running", "{first}");
    let (_, q) = c.call(
        Method::GET,
        "a",
        &format!("/v1/migrations/{}", ids[3]),
        None,
    );
    assert_eq!(q["state"], "queued");
    let (_, vm) = c.call(Method::GET, "a", "/v1/vms/vm4", None);
    assert_eq!(vm["state"], "running", "a queued VM still runs");
    let (s, cancelled) = c.call(
        Method::DELETE,
        "a",
        &format!("/v1/migrations/{}", ids[3]),
        None,
    );
    assert_eq!(s, StatusCode::OK);
    assert_eq!(cancelled["state"], "cancelled");
    let (_, text) = c.call(Method::GET, "a", "/metrics", None);
    assert!(
        text.as_str()
            .unwrap()
            .contains("ferry_migration_queue_depth 2"),
        "{text}"
    );

    let done: Vec<Value> = ids[..3].iter().map(|id| c.wait("a", id)).collect();
    for d in &done {
        assert_eq!(d["state"], "completed", "{d}");
    }
    // Never two at once, and in the order asked.
    let span = |d: &Value| {
        (
            d["started_at_ms"].as_u64().unwrap(),
            d["finished_at_ms"].as_u64().unwrap(),
        )
    };
    for w in done.windows(2) {
        let (_, end) = span(&w[0]);
        let (start, _) = span(&w[1]);
        assert!(start >= end, "overlap: {} then {}", w[0], w[1]);
        assert!(w[1]["queued_s"].as_f64().unwrap() > 0.1);
    }
    let (_, vms) = c.call(Method::GET, "b", "/v1/vms", None);
    let names: Vec<&str> = vms
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["vm1", "vm2", "vm3"]);
    let (_, vm) = c.call(Method::GET, "a", "/v1/vms/vm4", None);
    assert_eq!(vm["state"], "running", "the cancelled one stays");
    let (s, v) = c.call(
        Method::DELETE,
        "a",
        &format!("/v1/migrations/{}", ids[0]),
        None,
    );
    assert_eq!(
        s,
        StatusCode::CONFLICT,
        "an ended migration cannot be cancelled: {v}"
    );
    assert!(
        error_of(&v).1.ends_with("has already ended (completed)"),
        "{v}"
    );
}

#[test]
fn a_nodes_codec_applies_to_its_migrations_and_drains_that_name_none() {
    let _serial = common::serial();
    let Some(c) = Agents::start(
        "nodecodec",
        &[("a", "codec = \"lz4\""), ("b", ""), ("c", "")],
    ) else {
        return;
    };
    let (s, node) = c.call(Method::GET, "a", "/v1/node", None);
    assert_eq!(s, StatusCode::OK);
    assert_eq!(node["limits"]["codec"], "lz4", "{node}");
    for vm in ["vm1", "vm2", "vm3"] {
        let body = json!({"name": vm, "memory": "8MiB", "workload": "idle"});
        let (s, v) = c.call(Method::POST, "a", "/v1/vms", Some(body));
        assert_eq!(s, StatusCode::CREATED, "{v}");
    }
    let migrate = |body: Value| {
        let (s, m) = c.call(Method::POST, "a", "/v1/migrations", Some(body));
        assert_eq!(s, StatusCode::ACCEPTED, "{m}");
        c.wait("a", m["id"].as_str().unwrap())
    };
    // Unnamed: the node's codec; named: the request's.
    let done = migrate(json!({"vm": "vm1", "target": "b"}));
    assert_eq!(done["report"]["codec"], "lz4", "{done}");
    let done = migrate(json!({"vm": "vm2", "target": "b", "codec": "none"}));
    assert_eq!(done["report"]["codec"], "none", "{done}");
    // A drain names none either.
    let (s, op) = c.call(Method::POST, "a", "/v1/node/drain", Some(json!({})));
    assert_eq!(s, StatusCode::ACCEPTED, "{op}");
    let op = c.wait_op("a", op["id"].as_str().unwrap());
    assert_eq!(op["state"], "completed", "{op}");
    let step = &op["steps"][0];
    assert_eq!(step["vm"], "vm3", "{op}");
    let id = step["migration_id"].as_str().unwrap();
    assert_eq!(c.wait("a", id)["report"]["codec"], "lz4");
}

#[test]
fn a_node_bandwidth_limit_caps_its_migrations_together() {
    let _serial = common::serial();
    // Two incompressible 16 MiB VMs leave a together under a's 20 MB/s.
    let Some(c) = Agents::start("nodecap", &[("a", "max_bandwidth = \"20MB/s\""), ("b", "")])
    else {
        return;
    };
    for vm in ["vm1", "vm2"] {
        let (s, v) = c.call(
            Method::POST,
            "a",
            "/v1/vms",
            Some(json!({"name": vm, "memory": "16MiB", "workload": "idle", "fill": "random"})),
        );
        assert_eq!(s, StatusCode::CREATED, "{v}");
    }
    let ids: Vec<String> = ["vm1", "vm2"]
        .iter()
        .map(|vm| {
            let (s, m) = c.call(
                Method::POST,
                "a",
                "/v1/migrations",
                Some(json!({"vm": vm, "target": "b"})),
            );
            assert_eq!(s, StatusCode::ACCEPTED, "{m}");
            m["id"].as_str().unwrap().to_string()
        })
        .collect();
    let done: Vec<Value> = ids.iter().map(|id| c.wait("a", id)).collect();
    let mut wire = 0;
    let (mut first, mut last) = (u64::MAX, 0);
    for d in &done {
        assert_eq!(d["state"], "completed", "{d}");
        wire += d["report"]["wire_bytes"].as_u64().unwrap();
        first = first.min(d["started_at_ms"].as_u64().unwrap());
        last = last.max(d["finished_at_ms"].as_u64().unwrap());
    }
    // They ran together, and together stayed under the node's limit (the
    // bucket starts with a burst of 1 MiB).
    let overlap =
        done[1]["started_at_ms"].as_u64().unwrap() < done[0]["finished_at_ms"].as_u64().unwrap();
    assert!(overlap, "{done:?}");
    let rate = (wire - (1 << 20)) as f64 / ((last - first) as f64 / 1e3);
    assert!(rate <= 20e6 * 1.05, "{rate} B/s over {} ms", last - first);
    assert!(
        rate >= 20e6 * 0.7,
        "the cap, not something else, set the pace: {rate}"
    );
}

#[test]
fn agents_without_tls_tag_every_frame_of_their_migrations() {
    let _serial = common::serial();
    let Some(c) = Agents::start_with("plain-tagged", "tls = false", &[("a", ""), ("b", "")]) else {
        return;
    };
    let (s, v) = c.call(
        Method::POST,
        "a",
        "/v1/vms",
        Some(json!({"name": "vm1", "memory": "32MiB", "workload": "hot:4MiB", "dirty_rate": "10MB/s"})),
    );
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let source = c.agent("a").node.guest("vm1").unwrap();
    let (s, m) = c.call(
        Method::POST,
        "a",
        "/v1/migrations",
        Some(json!({"vm": "vm1", "target": "b", "codec": "none", "channels": 2, "leave_paused": true})),
    );
    assert_eq!(s, StatusCode::ACCEPTED, "{m}");
    let id = m["id"].as_str().unwrap().to_string();
    let done = c.wait("a", &id);
    assert_eq!(done["state"], "completed", "{done}");
    let r = &done["report"];
    assert_eq!(
        (&r["encrypted"], &r["frames_authenticated"]),
        (&json!(false), &json!(true)),
        "{r}"
    );
    let incoming = c.wait_incoming("b", &id);
    assert_eq!(
        incoming["report"]["frames_authenticated"], true,
        "{incoming}"
    );
    let target = c.agent("b").node.guest("vm1").unwrap();
    assert_eq!(first_difference(source.memory(), target.memory()), None);
}

#[test]
fn the_typed_client_reads_every_answer_as_the_api_wrote_it() {
    let _serial = common::serial();
    let Some(c) = Agents::start("typed", &[("a", ""), ("b", "")]) else {
        return;
    };
    let cluster = ferry::agent::Cluster::load(&c.file).unwrap();
    let peers = ferry::agent::peer::Peers::new(&cluster);
    let (a, b) = (cluster.node("a").unwrap(), cluster.node("b").unwrap());
    let vm = ferry::agent::request::CreateVm {
        name: "typed-1".into(),
        memory: ferry::agent::request::Amount::Text("32MiB".into()),
        workload: Some("idle".into()),
        dirty_rate: None,
        fill: None,
        guest: None,
        priority: None,
        preferred_owners: None,
        image: None,
        seed: None,
    };
    let made = c.rt.block_on(peers.create_vm(a, &vm)).unwrap();
    assert_eq!(
        (made.spec.name.as_str(), made.spec.memory),
        ("typed-1", 32 << 20)
    );
    // Read back into the API's own types and written out again, every
    // answer is the JSON the API gave: one definition, nothing lost.
    let same = |raw: Value, typed: Value, what: &str| assert_eq!(raw, typed, "{what}");
    let body = ferry::agent::request::CreateMigration {
        vm: "typed-1".into(),
        target: "b".into(),
        params: ferry::agent::request::MigrationParams {
            codec: Some("lz4".into()),
            channels: Some(2),
            ..Default::default()
        },
    };
    let id = c.rt.block_on(peers.migrate(a, &body)).unwrap().id;
    c.wait("a", &id);
    c.wait_incoming("b", &id);
    let path = format!("/v1/migrations/{id}");
    let typed = c.rt.block_on(peers.migration(a, &id)).unwrap();
    assert!(typed.report.as_ref().is_some_and(|r| r.verified));
    same(
        c.call(Method::GET, "a", &path, None).1,
        json!(typed),
        "migration",
    );
    let typed = c.rt.block_on(peers.migrations(b)).unwrap();
    same(
        c.call(Method::GET, "b", "/v1/migrations", None).1,
        json!(typed),
        "list",
    );
    let typed = c.rt.block_on(peers.vm(b, "typed-1")).unwrap();
    same(
        c.call(Method::GET, "b", "/v1/vms/typed-1", None).1,
        json!(typed),
        "vm",
    );
    // The lease's time left moves between the two reads: compare the rest.
    let node = |mut v: Value| {
        v["lease"]["left_s"].take();
        v
    };
    let typed = c.rt.block_on(peers.node(b)).unwrap();
    same(
        node(c.call(Method::GET, "b", "/v1/node", None).1),
        node(json!(typed)),
        "node",
    );
    let drain = ferry::agent::request::Drain::default();
    let op = c.rt.block_on(peers.drain(b, &drain)).unwrap();
    c.wait_op("b", &op.id);
    let typed = c.rt.block_on(peers.operation(b, &op.id)).unwrap();
    assert_eq!(typed.steps.len(), 1);
    let path = format!("/v1/operations/{}", op.id);
    same(
        c.call(Method::GET, "b", &path, None).1,
        json!(typed),
        "operation",
    );
    // A name is one path segment: it reaches no other route.
    let err = c.rt.block_on(peers.delete_vm(a, "x?force=true", false));
    assert!(
        matches!(
            err,
            Err(ferry::agent::peer::PeerError::Api { status: 404, .. })
        ),
        "{err:?}"
    );
    assert!(c.rt.block_on(peers.vm(a, "..")).is_err());
}

/// Every page of `a` and `b`, compared.
fn same_memory(a: &ferry::memory::GuestMemory, b: &ferry::memory::GuestMemory) -> bool {
    let (mut x, mut y) = (vec![0u8; 4096], vec![0u8; 4096]);
    a.pages() == b.pages()
        && (0..a.pages()).all(|i| {
            a.read_page(PageIndex(i), &mut x);
            b.read_page(PageIndex(i), &mut y);
            x == y
        })
}

/// `image`: a VM's memory is the image, byte for byte, and a size that
/// disagrees or a relative path is refused; `seed`: the same seed gives
/// the same content on any node, another seed other content.
#[test]
fn a_vm_starts_from_its_image_or_from_its_seed() {
    let Some(c) = Agents::start("image", &[("a", ""), ("b", "")]) else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("ferry-image-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("ram.img");
    let src = ferry::memory::GuestMemory::new(8 << 20).unwrap();
    ferry::memory::FillSpec::default().fill(&src, 7, 1);
    src.save_image(&path).unwrap();
    let image = path.to_str().unwrap();
    let idle = |name: &str, extra: Value| {
        let mut body = json!({"name": name, "memory": "8MiB", "workload": "idle", "dirty_rate": 0});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body
    };
    let (s, v) = c.call(
        Method::POST,
        "a",
        "/v1/vms",
        Some(idle("img", json!({"image": image}))),
    );
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["image"], image, "{v}");
    let guest = c.agent("a").node.guest("img").unwrap();
    assert!(same_memory(guest.memory(), &src));
    // The image's size is the memory's.
    let (s, v) = c.call(
        Method::POST,
        "b",
        "/v1/vms",
        Some(json!({"name": "big", "memory": "16MiB", "image": image})),
    );
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(error_of(&v).1.contains("disagrees with image"), "{v}");
    let (s, v) = c.call(
        Method::POST,
        "b",
        "/v1/vms",
        Some(json!({"name": "rel", "memory": "8MiB", "image": "ram.img"})),
    );
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(error_of(&v).1.contains("absolute path"), "{v}");
    // Seeds.
    for (name, node, seed) in [("s1", "a", 5), ("s2", "b", 5), ("s3", "b", 6)] {
        let (s, v) = c.call(
            Method::POST,
            node,
            "/v1/vms",
            Some(idle(name, json!({"seed": seed}))),
        );
        assert_eq!(s, StatusCode::CREATED, "{v}");
        assert_eq!(v["seed"], seed, "{v}");
    }
    let mem = |node: &str, vm: &str| c.agent(node).node.guest(vm).unwrap().memory().clone();
    assert!(same_memory(&mem("a", "s1"), &mem("b", "s2")));
    assert!(!same_memory(&mem("a", "s1"), &mem("b", "s3")));
    let _ = std::fs::remove_dir_all(&dir);
}

/// `image_dirs`: an image inside one of them starts; one outside, or a
/// link out of them, is refused naming the setting.
#[test]
fn images_outside_the_clusters_image_dirs_are_refused() {
    let dir = std::env::temp_dir().join(format!("ferry-image-dirs-{}", std::process::id()));
    let inside = dir.join("images");
    std::fs::create_dir_all(&inside).unwrap();
    let top = format!("image_dirs = [{:?}]\n", inside.to_str().unwrap());
    let Some(c) = Agents::start_with("image-dirs", &top, &[("a", "")]) else {
        return;
    };
    let src = ferry::memory::GuestMemory::new(4 << 20).unwrap();
    for p in [inside.join("ok.img"), dir.join("outside.img")] {
        src.save_image(&p).unwrap();
    }
    std::os::unix::fs::symlink(dir.join("outside.img"), inside.join("link.img")).unwrap();
    let create = |name: &str, image: &std::path::Path| {
        c.call(
            Method::POST,
            "a",
            "/v1/vms",
            Some(json!({"name": name, "memory": "4MiB", "workload": "idle", "image": image.to_str().unwrap()})),
        )
    };
    let (s, v) = create("in", &inside.join("ok.img"));
    assert_eq!(s, StatusCode::CREATED, "{v}");
    for (name, image) in [
        ("out", dir.join("outside.img")),
        ("link", inside.join("link.img")),
    ] {
        let (s, v) = create(name, &image);
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        assert!(error_of(&v).1.contains("image_dirs"), "{v}");
    }
    let (_, vms) = c.call(Method::GET, "a", "/v1/vms", None);
    assert_eq!(vms.as_array().unwrap().len(), 1, "{vms}");
    let _ = std::fs::remove_dir_all(&dir);
}
