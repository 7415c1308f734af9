//! The fuzz property of every record an agent reads back from etcd or from
//! its disk: any bytes decode without panicking, and a record that decodes
//! survives its own round trip (written again, it reads back the same).
//! `fuzz/fuzz_targets/records.rs` drives it; tests/it replays its seeds.

use super::durable::{decode_admin, decode_migration, decode_operation};
use super::durable::{MigrationRecord, OperationRecord};
use super::kept::decode_meta;
use super::mirror::{decode_node, decode_vm, parse_json};
use super::quarantine::NodeStateRecord;
use super::records::CoordinatorRecord;
use super::rolling::parse_run;
use super::schedule::parse_schedule;
use super::store::LAYOUT_VERSION;
use serde::Serialize;
use serde_json::json;

/// The record kinds, in the order the first input byte picks them.
pub const KINDS: [&str; 11] = [
    "vm",
    "node",
    "node_state",
    "coordinator",
    "update_run",
    "update_schedule",
    "migration",
    "operation",
    "admin",
    "kept_vm",
    "retained",
];

/// The names the decoders are asked to find in the records: a record of
/// another VM, node or id is refused, as under another key.
pub const VM: &str = "vm1";
/// The node whose records are read.
pub const NODE: &str = "a";
/// The migration's id.
pub const MIGRATION: &str = "m1";
/// The operation's id.
pub const OPERATION: &str = "op1";

/// Decodes `data[1..]` as the record kind `data[0]` picks; a record that
/// decodes is written again, and that must decode to the same bytes.
/// Whether it decoded.
pub fn records(data: &[u8]) -> bool {
    let Some((&pick, body)) = data.split_first() else {
        return false;
    };
    match usize::from(pick) % KINDS.len() {
        0 => round_trip(body, |b| decode_vm(b, VM)),
        1 => round_trip(body, |b| decode_node(b, NODE)),
        2 => round_trip(body, parse_json::<NodeStateRecord>),
        3 => round_trip(body, parse_json::<CoordinatorRecord>),
        4 => round_trip(body, parse_run),
        5 => round_trip(body, parse_schedule),
        6 => round_trip(body, |b| {
            decode_migration(b, MIGRATION, NODE).map(|view| MigrationRecord {
                version: LAYOUT_VERSION,
                view,
            })
        }),
        7 => round_trip(body, |b| {
            decode_operation(b, OPERATION, NODE).map(|op| OperationRecord {
                version: LAYOUT_VERSION,
                op,
            })
        }),
        8 => round_trip(body, decode_admin),
        9 => round_trip(body, |b| decode_meta(b, VM)),
        _ => round_trip(body, super::retain::decode_meta),
    }
}

/// Decodes `bytes`; what decodes, encoded, decodes again to the same
/// encoding.
fn round_trip<T: Serialize>(bytes: &[u8], decode: impl Fn(&[u8]) -> Result<T, String>) -> bool {
    let Ok(first) = decode(bytes) else {
        return false;
    };
    let once = serde_json::to_vec(&first).expect("a decoded record encodes");
    let again = decode(&once).expect("a record written from a decoded one decodes");
    let twice = serde_json::to_vec(&again).expect("a decoded record encodes");
    assert_eq!(once, twice, "a record changed on its round trip");
    true
}

/// One valid record of each kind, as [`records`] takes it (the kind's
/// byte first), named as [`KINDS`] names them: the fuzzer's seeds.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let spec = json!({"name": VM, "memory": 67_108_864u64, "workload": "hot:8MiB",
        "dirty_rate": 20_000_000u64, "fill": "zero:35,text:30,binary:20,random:15",
        "guest": "sim", "priority": "high", "preferred_owners": ["b"], "seed": 7});
    let records = [
        json!({"version": 1, "spec": spec, "node": NODE, "migrating_to": "b",
            "migration": MIGRATION, "state": "running", "restarts": 1,
            "last_restart": {"at_ms": 1_790_000_000_000u64,
                "reason": "node c's lease expired", "from": "c", "to": NODE}}),
        json!({"version": 1, "name": NODE, "control": "127.0.0.1:7411",
            "data": "127.0.0.1:7412", "memory_capacity": 1u64 << 30, "lease": 7_587_000_001i64}),
        json!({"version": 1, "losses": [{"lease": 5, "at_ms": 1_790_000_000_000u64}],
            "quarantined_until_ms": 1_790_007_200_000u64, "clean_stop_lease": 6}),
        json!({"version": 1, "node": NODE, "lease": 7_587_000_001i64}),
        json!({"version": 1, "id": "u1", "command": "apt-get -y upgrade", "failback": true,
            "stop_after_ms": 600_000, "max_failed_nodes": 1, "max_retries_per_node": 1,
            "require_all_nodes_online": false, "state": "running",
            "started_at_ms": 1_790_000_000_000u64, "coordinators": ["a"],
            "nodes": [{"node": NODE, "phase": "draining", "since_ms": 1_790_000_000_000u64,
                "drain": OPERATION, "attempts": 1},
                {"node": "b", "phase": "pending", "since_ms": 0}]}),
        json!({"version": 1, "schedule": "sun 03:00",
            "request": {"command": "apt-get -y upgrade", "failback": "immediate"},
            "next_at_ms": 1_790_000_000_000u64, "last_run": "u1"}),
        json!({"version": 1, "id": MIGRATION, "vm": VM, "source": NODE, "target": "b",
            "direction": "outgoing", "state": "unresolved", "created_at_ms": 1_790_000_000_000u64,
            "started_at_ms": 1_790_000_000_010u64, "finished_at_ms": 1_790_000_003_000u64,
            "queued_s": 0.01, "operation": OPERATION, "error": "the target did not confirm",
            "saved_guest": "/var/lib/ferry/guests/vm1.guest"}),
        json!({"version": 1, "id": OPERATION, "kind": "drain", "node": NODE, "state": "running",
            "params": {"max_concurrent": 2, "failback": null}, "started_at_ms": 1_790_000_000_000u64,
            "steps": [{"vm": VM, "memory": 67_108_864u64, "source": NODE, "target": "b",
                "state": "running", "migration_id": MIGRATION, "tried": ["c"]}],
            "remaining": [{"vm": "vm2", "state": "running"}], "interrupted": false}),
        json!({"version": 1, "state": "paused"}),
        json!({"version": 1, "spec": spec, "state": "paused", "migration": MIGRATION, "target": "b"}),
        json!({"version": 1, "vm": VM, "migration": MIGRATION, "at_ms": 1_790_000_000_000u64,
            "memory": 67_108_864u64, "digest": 1234567u64, "bytes": 20_971_520u64}),
    ];
    KINDS
        .iter()
        .zip(records)
        .enumerate()
        .map(|(i, (kind, r))| {
            let mut data = vec![i as u8];
            data.extend(serde_json::to_vec(&r).expect("JSON encodes"));
            (*kind, data)
        })
        .collect()
}

/// Any bytes, as a peer's event stream (cut into chunks the bytes choose),
/// a merged stream's `Last-Event-ID`, and a session cookie, never panic:
/// frames come out whole or the stream is refused, positions read back as
/// written, and no cookie but one made with the key verifies.
pub fn live_events(data: &[u8]) {
    use super::events::{encode_positions, positions, Frames};
    use super::session::Sessions;
    let mut frames = Frames::default();
    let mut rest = data;
    while let Some((&n, tail)) = rest.split_first() {
        let (chunk, next) = tail.split_at((n as usize).min(tail.len()));
        if frames.push(chunk).is_err() {
            break;
        }
        rest = next;
    }
    let text = String::from_utf8_lossy(data);
    let pos = positions(Some(&text));
    assert_eq!(positions(Some(&encode_positions(&pos))), pos);
    let sessions = Sessions::new("fuzz-token-0123456789", Some("fuzz-read-token-0123"));
    assert!(
        sessions.verify(&text, 0, 0).is_err(),
        "a cookie made without the key"
    );
    let _ = super::session::cookie(&text, super::session::COOKIE);
}
