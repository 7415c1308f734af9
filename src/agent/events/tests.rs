use super::*;

fn item(key: &str, json: &str) -> Item {
    let (kind, name) = key.split_once('/').unwrap_or((key, ""));
    let kind = match kind {
        "vm" => "vm",
        "migration" => "migration",
        _ => "node",
    };
    Item {
        key: key.into(),
        kind,
        name: ("name", name.into()),
        json: json.into(),
    }
}

#[test]
fn only_what_changed_is_published_and_what_went_says_so() {
    let hub = Hub::starting_at(0);
    let mut rx = hub.subscribe();
    hub.publish(vec![item("node", "{}"), item("vm/web", "{\"a\":1}")]);
    hub.publish(vec![item("node", "{}"), item("vm/web", "{\"a\":2}")]);
    hub.publish(vec![item("node", "{}")]);
    let got: Vec<(u64, &str, String)> = std::iter::from_fn(|| rx.try_recv().ok())
        .map(|e| (e.id, e.kind, e.data.to_string()))
        .collect();
    assert_eq!(
        got,
        [
            (1, "node", "{}".into()),
            (2, "vm", "{\"a\":1}".into()),
            (3, "vm", "{\"a\":2}".into()),
            (4, "vm", "{\"gone\":true,\"name\":\"web\"}".into()),
        ]
    );
}

#[test]
fn a_subscriber_resumes_after_its_last_event_while_it_is_kept_else_resyncs() {
    let hub = Hub::starting_at(0);
    for i in 0..10 {
        hub.publish(vec![item("node", &format!("{{\"n\":{i}}}"))]);
    }
    let s = hub.start(Some(7));
    assert_eq!(s.upto, 10);
    let ids: Vec<u64> = s.events.iter().map(|e| e.id).collect();
    assert_eq!(ids, [8, 9, 10]);
    // Up to date: nothing to send.
    assert!(hub.start(Some(10)).events.is_empty());
    // New, from the future, or older than what is kept: the whole state.
    for after in [None, Some(11), Some(u64::MAX)] {
        let s = hub.start(after);
        assert_eq!(s.events[0].kind, "resync");
        assert_eq!(s.events[1].data.as_ref(), "{\"n\":9}");
        assert_eq!(s.events.len(), 2);
        // Only the last frame carries the id: one cut off before it is
        // not taken for whole.
        assert_eq!((s.events[0].id, s.events[1].id), (0, 10));
    }
    for i in 0..RECENT as u64 {
        hub.publish(vec![item("node", &format!("{{\"m\":{i}}}"))]);
    }
    assert_eq!(hub.start(Some(5)).events[0].kind, "resync");
    // Events 11 onwards are kept: one that saw 10 misses nothing.
    assert_eq!(hub.start(Some(10)).events[0].id, 11);
}

#[test]
fn ids_start_anywhere_so_an_earlier_lifes_id_resumes_nothing() {
    let (a, b) = (Hub::default(), Hub::default());
    a.publish(vec![item("node", "{}")]);
    b.publish(vec![item("node", "{}")]);
    let old = a.published();
    assert_ne!(old, b.published());
    assert_eq!(b.start(Some(old)).events[0].kind, "resync");
    assert!(old < 1 << 52);
}

#[test]
fn kept_events_stay_within_their_bytes() {
    let hub = Hub::starting_at(0);
    let big = format!("{{\"x\":\"{}\"}}", "a".repeat(1 << 20));
    for i in 0..40 {
        hub.publish(vec![item("node", &big.replace('x', &i.to_string()))]);
    }
    // 16 MiB of 1 MiB events: the first ones are gone.
    assert_eq!(hub.start(Some(5)).events[0].kind, "resync");
    assert_eq!(hub.start(Some(30)).events[0].id, 31);
}

#[test]
fn steady_views_leave_out_what_changes_on_every_look() {
    let v = serde_json::json!({"vms": [1], "lease": {"left_s": 4.4, "ttl_s": 6.0}, "x": 1});
    assert_eq!(
        steady(v, &["vms"], &[&["lease", "left_s"]]),
        "{\"lease\":{\"left_s\":4.0,\"ttl_s\":6.0},\"x\":1}"
    );
}

#[test]
fn frames_come_whole_whatever_the_chunks_and_an_endless_one_is_refused() {
    let mut f = Frames::default();
    let text =
        b": keep-alive\n\nid: 3\nevent: vm\ndata: {\"a\":1}\n\nid: 4\nevent: node\ndata: {}\n\n";
    let mut got = Vec::new();
    for chunk in text.chunks(5) {
        got.extend(f.push(chunk).unwrap());
    }
    assert_eq!(
        got,
        [
            ("3".into(), "vm".to_string(), "{\"a\":1}".to_string()),
            ("4".into(), "node".to_string(), "{}".to_string())
        ]
    );
    // An event without an id comes with an empty one.
    let got = f.push(b"event: vm\ndata: {}\n\n").unwrap();
    assert_eq!(got, [(String::new(), "vm".to_string(), "{}".to_string())]);
    let e = f.push(&vec![b'x'; MAX_FRAME + 1]).unwrap_err();
    assert!(e.contains("over"), "{e}");
}
