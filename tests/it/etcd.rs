//! The etcd client against a real three-member etcd cluster on loopback:
//! keys, transactions (create-if-absent, as the coordinator's election),
//! leases and watches; then the store's own faults: the member in use
//! killed, the leader killed under a kept lease, a silent member, a watch
//! across a kill, and etcd's user authentication.

use crate::common;
use common::etcd::{available, EtcdCluster};
use ferry::agent::etcd::{Cmp, EtcdError, Keeper, Op, Txn, WatchEvent, Watcher};
use std::time::{Duration, Instant};

#[test]
fn keys_transactions_leases_and_watches_work_on_a_three_member_cluster() {
    if !available() {
        return;
    }
    // Timing matters here (elections, leases): not beside a migration.
    let _serial = common::serial();
    let c = EtcdCluster::start("basics", 3);
    let etcd = c.client();
    let rt = &c.rt;
    let (_, start) = rt.block_on(etcd.list(b"/t/")).unwrap();
    let mut watcher = Watcher::new(b"/t/", start + 1);
    let rev = rt.block_on(etcd.put(b"/t/a", b"1", None)).unwrap();
    assert!(rev > start);
    let kv = rt.block_on(etcd.get(b"/t/a")).unwrap().unwrap();
    assert_eq!(
        (kv.value.as_slice(), kv.mod_revision),
        (b"1".as_slice(), rev)
    );
    assert_eq!(rt.block_on(etcd.get(b"/t/none")).unwrap(), None);
    // Create-if-absent: the first wins, the second reads who holds it.
    let elect = |who: &[u8]| {
        Txn::new()
            .when(Cmp::absent(b"/t/leader"))
            .then(Op::put(b"/t/leader", who, None))
            .otherwise(Op::get(b"/t/leader"))
    };
    let first = rt.block_on(etcd.txn(&elect(b"x"))).unwrap();
    assert!(first.succeeded);
    let second = rt.block_on(etcd.txn(&elect(b"y"))).unwrap();
    assert!(!second.succeeded);
    let holder = second.reads[0].as_ref().unwrap();
    assert_eq!(holder.value, b"x");
    // A write fenced by the holder's create revision.
    let fenced = |token: i64| {
        Txn::new()
            .when(Cmp::created_at(b"/t/leader", token))
            .then(Op::put(b"/t/vm", b"placed", None))
    };
    let stale = rt
        .block_on(etcd.txn(&fenced(holder.create_revision - 1)))
        .unwrap();
    assert!(!stale.succeeded, "a stale token changes nothing");
    assert!(
        rt.block_on(etcd.txn(&fenced(holder.create_revision)))
            .unwrap()
            .succeeded
    );
    // A key bound to a lease goes with it.
    let (lease, ttl) = rt
        .block_on(etcd.lease_grant(Duration::from_secs(5)))
        .unwrap();
    assert_eq!(ttl, Duration::from_secs(5));
    rt.block_on(etcd.put(b"/t/alive", b"n1", Some(lease)))
        .unwrap();
    let mut keeper = Keeper::new(lease, ttl);
    assert!(rt.block_on(keeper.renew(&etcd)).unwrap().is_some());
    rt.block_on(etcd.lease_revoke(lease)).unwrap();
    assert_eq!(rt.block_on(etcd.get(b"/t/alive")).unwrap(), None);
    assert_eq!(
        rt.block_on(keeper.renew(&etcd)).unwrap(),
        None,
        "a revoked lease is gone"
    );
    assert_eq!(rt.block_on(etcd.delete(b"/t/a")).unwrap(), 1);
    // The watch saw every change, in order.
    let mut seen = Vec::new();
    while seen.len() < 6 {
        for e in rt.block_on(watcher.next(&etcd)).unwrap() {
            seen.push(match e {
                WatchEvent::Put(kv) => format!("put {}", String::from_utf8_lossy(&kv.key)),
                WatchEvent::Delete(kv) => format!("delete {}", String::from_utf8_lossy(&kv.key)),
            });
        }
    }
    assert_eq!(
        seen,
        [
            "put /t/a",
            "put /t/leader",
            "put /t/vm",
            "put /t/alive",
            "delete /t/alive",
            "delete /t/a"
        ]
    );
    // Out-of-range leases are refused before anything is sent.
    for bad in [Duration::ZERO, Duration::from_secs(7200)] {
        let e = rt.block_on(etcd.lease_grant(bad)).unwrap_err();
        assert!(e.to_string().contains("lease_ttl"), "{e}");
    }
}

#[test]
fn a_killed_leader_costs_no_lease_and_calls_move_to_the_next_member() {
    if !available() {
        return;
    }
    // Timing matters here (elections, leases): not beside a migration.
    let _serial = common::serial();
    let mut c = EtcdCluster::start("leader", 3);
    let etcd = c.client();
    let (lease, ttl) =
        c.rt.block_on(etcd.lease_grant(Duration::from_secs(5)))
            .unwrap();
    let mut keeper = Keeper::new(lease, ttl);
    c.rt.block_on(etcd.put(b"/n/a", b"alive", Some(lease)))
        .unwrap();
    assert!(c.rt.block_on(keeper.renew(&etcd)).unwrap().is_some());
    let (_, rev) = c.rt.block_on(etcd.list(b"/w/")).unwrap();
    let mut watcher = Watcher::new(b"/w/", rev + 1);
    c.rt.block_on(etcd.put(b"/w/1", b"before", None)).unwrap();
    // Kill the leader, which is also the member the client talks to when it
    // is the first; renew every third of the TTL for three TTLs.
    let leader = c.leader();
    c.kill(leader);
    let start = Instant::now();
    let mut last_ack = Instant::now();
    let mut failures = 0;
    while start.elapsed() < 3 * ttl {
        let sent = Instant::now();
        match c.rt.block_on(keeper.renew(&etcd)) {
            Ok(Some(_)) => last_ack = sent,
            Ok(None) => panic!("the lease expired with the leader"),
            Err(e) => {
                failures += 1;
                eprintln!("renewal failed: {e}");
            }
        }
        assert!(last_ack.elapsed() < ttl, "no renewal for a whole TTL");
        std::thread::sleep(ttl / 3);
    }
    assert!(failures <= 2, "{failures} renewals failed");
    let kv = c.rt.block_on(etcd.get(b"/n/a")).unwrap();
    assert!(
        kv.is_some_and(|kv| kv.lease == lease),
        "the node's key lives on"
    );
    // Writes go on through the others, and the watch missed nothing.
    c.rt.block_on(etcd.put(b"/w/2", b"after", None)).unwrap();
    let mut values = Vec::new();
    while values.len() < 2 {
        for e in c.rt.block_on(watcher.next(&etcd)).unwrap() {
            if let WatchEvent::Put(kv) = e {
                values.push(String::from_utf8(kv.value).unwrap());
            }
        }
    }
    assert_eq!(values, ["before", "after"]);
}

#[test]
fn a_silent_member_costs_a_call_one_timeout_and_no_more() {
    if !available() {
        return;
    }
    // Timing matters here (elections, leases): not beside a migration.
    let _serial = common::serial();
    let c = EtcdCluster::start("silent", 3);
    // The client knows a stopped member first, then a live one.
    let stopped = (c.leader() + 1) % 3;
    let live = (stopped + 1) % 3;
    let eps = vec![
        c.members[stopped].client.clone(),
        c.members[live].client.clone(),
    ];
    let etcd = c.client_of(&c.config(eps));
    c.signal(stopped, "-STOP");
    let start = Instant::now();
    c.rt.block_on(etcd.put(b"/s/1", b"x", None)).unwrap();
    let took = start.elapsed();
    assert!(took < Duration::from_secs(2), "{took:?}");
    // It stays on the member that answered.
    c.rt.block_on(etcd.get(b"/s/1")).unwrap();
    assert_eq!(etcd.current_endpoint(), c.members[live].client);
    c.signal(stopped, "-CONT");
    // With every endpoint gone, a call says so instead of hanging.
    let gone = c.client_of(&c.config(vec![format!("127.0.0.1:{}", common::free_port())]));
    let e = c.rt.block_on(gone.get(b"/s/1")).unwrap_err();
    assert!(matches!(e, EtcdError::Unavailable(_)), "{e}");
}

#[test]
fn etcd_user_authentication_is_used_and_checked() {
    use ferry::agent::etcd::proto::etcdserverpb::{
        auth_client::AuthClient, AuthEnableRequest, AuthRoleAddRequest, AuthUserAddRequest,
        AuthUserGrantRoleRequest,
    };
    if !available() {
        return;
    }
    // Timing matters here (elections, leases): not beside a migration.
    let _serial = common::serial();
    let c = EtcdCluster::start("auth", 1);
    // Make root (with the root role) and turn authentication on.
    c.rt.block_on(async {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", c.members[0].client))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut auth = AuthClient::new(ch);
        let user = AuthUserAddRequest {
            name: "root".into(),
            password: "root-password-0123".into(),
            ..Default::default()
        };
        auth.user_add(user).await.unwrap();
        let role = AuthRoleAddRequest {
            name: "root".into(),
        };
        auth.role_add(role).await.unwrap();
        let grant = AuthUserGrantRoleRequest {
            user: "root".into(),
            role: "root".into(),
        };
        auth.user_grant_role(grant).await.unwrap();
        auth.auth_enable(AuthEnableRequest {}).await.unwrap();
    });
    let with = |user: Option<(&str, &str)>| {
        let mut cfg = c.config(c.endpoints());
        cfg.user = user.map(|(u, p)| (u.to_string(), p.to_string()));
        c.client_of(&cfg)
    };
    let anonymous = with(None);
    let e =
        c.rt.block_on(anonymous.put(b"/a/1", b"x", None))
            .unwrap_err();
    assert!(
        matches!(&e, EtcdError::Auth(m) if m.contains("names none")),
        "refused, not unreachable: {e}"
    );
    let wrong = with(Some(("root", "not-the-password")));
    let e = c.rt.block_on(wrong.authenticate()).unwrap_err();
    assert!(matches!(e, EtcdError::Auth(_)), "{e}");
    let root = with(Some(("root", "root-password-0123")));
    c.rt.block_on(root.authenticate()).unwrap();
    c.rt.block_on(root.put(b"/a/1", b"x", None)).unwrap();
    // A client that never signed in does so when etcd first asks.
    let lazy = with(Some(("root", "root-password-0123")));
    let kv = c.rt.block_on(lazy.get(b"/a/1")).unwrap().unwrap();
    assert_eq!(kv.value, b"x");
}

#[test]
fn etcd_over_tls_takes_the_clients_its_ca_signed_and_no_others() {
    if !available() {
        return;
    }
    // Timing matters here (elections, leases): not beside a migration.
    let _serial = common::serial();
    let c = EtcdCluster::start_with("tls", 1, true);
    let etcd = c.client();
    c.rt.block_on(etcd.put(b"/tls/1", b"x", None)).unwrap();
    let kv = c.rt.block_on(etcd.get(b"/tls/1")).unwrap().unwrap();
    assert_eq!(kv.value, b"x");
    // Without a client certificate etcd hangs up; with plain HTTP too.
    let mut anonymous = c.config(c.endpoints());
    if let Some(t) = anonymous.tls.as_mut() {
        t.identity = None;
    }
    // (The handshake fails, or etcd hangs up on the first request: which
    // one depends on timing.)
    let e = c.rt.block_on(c.client_of(&anonymous).get(b"/tls/1"));
    assert!(e.is_err(), "{e:?}");
    let mut plain = c.config(c.endpoints());
    plain.tls = None;
    assert!(c.rt.block_on(c.client_of(&plain).get(b"/tls/1")).is_err());
    // A CA that did not sign etcd's certificate: refused too.
    let other = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let mut stranger = c.config(c.endpoints());
    if let Some(t) = stranger.tls.as_mut() {
        t.ca = other.cert.pem().into_bytes();
    }
    assert!(c
        .rt
        .block_on(c.client_of(&stranger).get(b"/tls/1"))
        .is_err());
}

#[test]
fn agents_with_a_store_register_keep_their_lease_and_revoke_it_on_a_clean_stop() {
    use reqwest::Method;
    if !available() {
        return;
    }
    let _serial = common::serial();
    let e = EtcdCluster::start("agents", 1);
    let top = format!(
        "etcd = [\"{}\"]\netcd_prefix = \"/t1/\"\nlease_ttl = \"2s\"",
        e.members[0].client
    );
    let mut c = common::agents::Agents::start_with("store", &top, &[("a", ""), ("b", "")]).unwrap();
    let (_, view) = c.call(Method::GET, "a", "/v1/node", None);
    let lease = &view["lease"];
    assert_eq!(lease["ttl_s"], 2.0, "{view}");
    assert!(lease["left_s"].as_f64().unwrap() > 0.0, "{view}");
    let etcd = e.client();
    let record = e.rt.block_on(etcd.get(b"/t1/nodes/a")).unwrap().unwrap();
    let record: serde_json::Value = serde_json::from_slice(&record.value).unwrap();
    assert_eq!(
        (record["version"].as_u64(), record["name"].as_str()),
        (Some(1), Some("a"))
    );
    let alive = e.rt.block_on(etcd.get(b"/t1/alive/a")).unwrap().unwrap();
    assert_eq!(Some(alive.lease), lease["id"].as_i64());
    // Kept alive past its TTL.
    std::thread::sleep(Duration::from_secs(3));
    assert!(e.rt.block_on(etcd.get(b"/t1/alive/a")).unwrap().is_some());
    let (_, view) = c.call(Method::GET, "a", "/v1/node", None);
    assert!(view["lease"]["left_s"].as_f64().unwrap() > 0.0, "{view}");
    // A clean stop revokes it at once; the registration stays.
    let i = c.agents.iter().position(|h| h.node.name() == "a").unwrap();
    let a = c.agents.remove(i);
    c.rt.block_on(a.shutdown());
    assert_eq!(e.rt.block_on(etcd.get(b"/t1/alive/a")).unwrap(), None);
    assert!(e.rt.block_on(etcd.get(b"/t1/nodes/a")).unwrap().is_some());
    assert!(e.rt.block_on(etcd.get(b"/t1/alive/b")).unwrap().is_some());
}
