//! Unresolved migrations between real `ferry agent` processes: the target
//! faults after GO (killed, or stopped and continued), the source agent
//! reports the migration unresolved with the VM paused and whole, and
//! `POST /v1/migrations/{id}/resolve` (through `ferry resolve`) settles it only
//! after asking the target, so the VM never runs twice.

use crate::common;

use common::browser::Browser;
use common::free_port;
use serde_json::Value;
use std::path::PathBuf;
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

fn ferry() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
}

/// Agents `a` and `b` as processes; `b` injects `fault` into what it receives.
struct Pair {
    dir: PathBuf,
    file: PathBuf,
    a: Child,
    b: Option<Child>,
    a_control: String,
    b_control: String,
}

impl Pair {
    /// On the shared etcd member; `None` (the test skips) without etcd.
    fn start(test: &str, fault: &str) -> Option<Self> {
        Some(Self::start_with(
            test,
            fault,
            &common::etcd::shared_top(test)?,
        ))
    }

    /// As [`Pair::start`], on an etcd member of its own under prefix
    /// `/{test}/` (for tests that read or rewrite the records).
    fn with_own_etcd(test: &str, fault: &str) -> Option<(common::etcd::EtcdCluster, Self)> {
        if !common::etcd::available() {
            return None;
        }
        let e = common::etcd::EtcdCluster::start(test, 1);
        let top = format!(
            "etcd = [\"{}\"]\netcd_prefix = \"/{test}/\"",
            e.endpoints()[0]
        );
        let pair = Self::start_with(test, fault, &top);
        Some((e, pair))
    }

    /// As [`Pair::start`], with `top` (the etcd settings) in the file.
    fn start_with(test: &str, fault: &str, top: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("ferry-resolve-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        ferry::migration::auth::write_secret_file(
            &dir.join("cluster.token"),
            b"resolve-test-token",
        )
        .unwrap();
        let mut text = format!("token_file = \"cluster.token\"\ninsecure_api = true\n{top}\n");
        let mut controls = Vec::new();
        for name in ["a", "b"] {
            let control = format!("127.0.0.1:{}", free_port());
            text += &format!(
                "[[node]]\nname = \"{name}\"\ncontrol = \"{control}\"\ndata = \"127.0.0.1:{}\"\nmemory_capacity = \"1GiB\"\n",
                free_port()
            );
            controls.push(control);
        }
        let file = dir.join("cluster.toml");
        std::fs::write(&file, text).unwrap();
        let mut pair = Self {
            a: Self::agent(&file, "a", None, &controls[0]),
            b: None,
            a_control: controls[0].clone(),
            b_control: controls[1].clone(),
            dir,
            file,
        };
        pair.b = Some(Self::agent(&pair.file, "b", Some(fault), &controls[1]));
        pair
    }

    fn agent(file: &std::path::Path, name: &str, fault: Option<&str>, control: &str) -> Child {
        let mut cmd = ferry();
        cmd.args(["agent", "--cluster", file.to_str().unwrap(), "--node", name])
            .env("RUST_LOG", "error");
        if let Some(f) = fault {
            cmd.args(["--fault", f]);
        }
        let child = cmd.spawn().unwrap();
        let t = Instant::now();
        while std::net::TcpStream::connect(control).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "agent {name} did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        child
    }

    fn run(&self, args: &[&str]) -> Output {
        ferry()
            .args(args)
            .args(["--cluster", self.file.to_str().unwrap()])
            .output()
            .unwrap()
    }

    fn json(&self, args: &[&str]) -> (i32, Value) {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.run(&all);
        if !out.status.success() {
            // Shown with the test's failure: why the command refused.
            eprintln!("ferry {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let v = serde_json::from_str(text.trim().lines().last().unwrap_or("null"))
            .unwrap_or(Value::Null);
        (out.status.code().unwrap_or(-1), v)
    }

    fn vms(&self) -> Vec<(String, String, String)> {
        let (_, v) = self.json(&["vm", "list"]);
        v.as_array()
            .unwrap()
            .iter()
            .map(|v| {
                (
                    v["name"].as_str().unwrap().to_string(),
                    v["node"].as_str().unwrap().to_string(),
                    v["state"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    /// Creates `web` on a and migrates it to b: it ends unresolved.
    fn unresolved_migration(&self) -> String {
        let (s, _) = self.json(&["vm", "create", "web", "--node", "a", "--memory", "64MiB"]);
        assert_eq!(s, 0);
        let (s, m) = self.json(&["migrate", "web", "--to", "b", "--peer-timeout", "1s"]);
        assert_eq!(s, 3, "{m}");
        assert_eq!(m["state"], "unresolved", "{m}");
        m["id"].as_str().unwrap().to_string()
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for c in [Some(&mut self.a), self.b.as_mut()].into_iter().flatten() {
            let _ = Command::new("kill")
                .args(["-CONT", &c.id().to_string()])
                .status();
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// VM `web`'s record once its migration `id` to b ended unresolved, as the
/// source left it: b may have claimed it in the instant between GO and its
/// kill (its claim races the fault), which these tests undo, so the record
/// names a, marked for the migration.
fn unclaimed(e: &common::etcd::EtcdCluster, prefix: &str, id: &str) -> Value {
    let etcd = e.client();
    let key = format!("/{prefix}/vms/web");
    let kv = e.rt.block_on(etcd.get(key.as_bytes())).unwrap().unwrap();
    let mut record: Value = serde_json::from_slice(&kv.value).unwrap();
    if record["node"] == "b" {
        record["node"] = "a".into();
        record["migrating_to"] = "b".into();
        record["migration"] = id.into();
        let json = serde_json::to_vec(&record).unwrap();
        e.rt.block_on(etcd.put(key.as_bytes(), &json, None))
            .unwrap();
    }
    record
}

#[test]
fn a_target_killed_after_go_leaves_the_vm_paused_on_the_source_until_resolved() {
    let _serial = common::serial();
    let test = "resolve-kill";
    let Some((e, mut p)) = Pair::with_own_etcd(test, "after-go:kill") else {
        return;
    };
    let id = p.unresolved_migration();
    assert!(
        p.b.as_mut().unwrap().wait().unwrap().code().is_none(),
        "b was killed"
    );
    // Had b's claim landed before its kill, the record would name b, and b
    // back without the VM would restart it there: a case of its own.
    unclaimed(&e, test, &id);
    // The source keeps the VM, paused, and says the migration is unresolved.
    let (_, m) = p.json(&["vm", "list"]);
    assert!(m.to_string().contains("\"paused\""), "{m}");
    // b cannot be asked: neither side is settled without force.
    for run_on in ["source", "destination"] {
        let out = p.run(&["resolve", &id, "--run-on", run_on]);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("cannot ask node b"),
            "{out:?}"
        );
    }
    // b comes back without the VM: it cannot run there; back to the source.
    p.b = Some(Pair::agent(&p.file, "b", None, &p.b_control));
    let out = p.run(&["resolve", &id, "--run-on", "destination"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not host web"),
        "{out:?}"
    );
    let (s, m) = p.json(&["resolve", &id, "--run-on", "source"]);
    assert_eq!(s, 0, "{m}");
    assert_eq!(m["state"], "failed");
    assert_eq!(m["resolution"]["run_on"], "source");
    assert_eq!(p.vms(), [("web".into(), "a".into(), "running".into())]);
    // Settled once only.
    let out = p.run(&["resolve", &id, "--run-on", "source"]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn a_target_stopped_after_go_runs_the_vm_once_resumed_and_resolution_follows_it() {
    let _serial = common::serial();
    let Some(p) = Pair::start("stop", "after-go:silent") else {
        return;
    };
    let id = p.unresolved_migration();
    // b stopped itself after resuming the guest; let it carry on.
    let b = p.b.as_ref().unwrap();
    Command::new("kill")
        .args(["-CONT", &b.id().to_string()])
        .status()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(20);
    while !p
        .vms()
        .contains(&("web".into(), "b".into(), "running".into()))
    {
        assert!(Instant::now() < until, "b never ran web: {:?}", p.vms());
        std::thread::sleep(Duration::from_millis(100));
    }
    // a still holds the paused copy; resolving to a would run it twice.
    assert!(p
        .vms()
        .contains(&("web".into(), "a".into(), "paused".into())));
    let out = p.run(&["resolve", &id, "--run-on", "source"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("node b hosts web"),
        "{out:?}"
    );
    // Asked of the target's own agent, which holds a record of its own of
    // the migration (incoming): it goes to the source, whose record it
    // settles (as a console signed in on b asks).
    let url = format!("http://{}/v1/migrations/{id}/resolve", p.b_control);
    ferry::transport::tls::install_default_provider();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (s, m) = rt.block_on(async {
        let resp = reqwest::Client::new()
            .post(url)
            .bearer_auth("resolve-test-token")
            .header("content-type", "application/json")
            .body(r#"{"run_on": "destination"}"#)
            .send()
            .await
            .unwrap();
        let s = resp.status().as_u16();
        (s, resp.json::<Value>().await.unwrap())
    });
    assert_eq!(s, 200, "{m}");
    assert_eq!(m["state"], "completed");
    assert_eq!(m["source"], "a", "the source's record: {m}");
    assert_eq!(p.vms(), [("web".into(), "b".into(), "running".into())]);
}

/// With etcd, the source's paused copy of an unresolved migration runs
/// again only while the VM's record still names the source for that
/// migration: once the cluster has moved the VM on (here the record is
/// rewritten as the coordinator's restart would), resolving to the source
/// is refused even with force, and the copy stays paused.
#[test]
fn resolving_to_the_source_is_refused_once_the_cluster_moved_the_vm_on() {
    let _serial = common::serial();
    let test = "resolve-moved";
    let Some((e, mut p)) = Pair::with_own_etcd(test, "after-go:kill") else {
        return;
    };
    let id = p.unresolved_migration();
    p.b.as_mut().unwrap().wait().unwrap();
    let etcd = e.client();
    let key = format!("/{test}/vms/web");
    let mut record = unclaimed(&e, test, &id);
    assert_eq!(record["node"], "a", "{record}");
    assert_eq!(record["migrating_to"], "b", "{record}");
    assert_eq!(record["migration"], id.as_str(), "{record}");
    // The cluster restarts web on b.
    record["node"] = "b".into();
    record["state"] = "restarting".into();
    record.as_object_mut().unwrap().remove("migrating_to");
    record.as_object_mut().unwrap().remove("migration");
    let json = serde_json::to_vec(&record).unwrap();
    e.rt.block_on(etcd.put(key.as_bytes(), &json, None))
        .unwrap();
    let out = p.run(&["resolve", &id, "--run-on", "source", "--force"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(stderr.contains("the cluster moved it on"), "{stderr}");
    assert_eq!(p.vms(), [("web".into(), "a".into(), "paused".into())]);
}

/// Issue 14's test 8: an agent stopped with SIGTERM and started again still
/// holds its unresolved hand-off: the migration's record (in etcd), and the
/// paused guest, saved on its disk; `resolve` settles it as before the
/// restart, and the saved copy goes once the VM runs.
#[test]
fn a_restarted_agent_still_holds_its_unresolved_hand_off_and_its_saved_guest() {
    let _serial = common::serial();
    let test = "resolve-restart";
    let Some((e, mut p)) = Pair::with_own_etcd(test, "after-go:kill") else {
        return;
    };
    let id = p.unresolved_migration();
    p.b.as_mut().unwrap().wait().unwrap();
    unclaimed(&e, test, &id);
    // The paused guest is saved, and the migration's record names it.
    let saved = p.dir.join("state/a/guests/web.guest");
    let etcd = e.client();
    let key = format!("/{test}/migrations/a/{id}");
    let t = Instant::now();
    let record = loop {
        let kv = e.rt.block_on(etcd.get(key.as_bytes())).unwrap();
        let r: Option<Value> = kv.map(|kv| serde_json::from_slice(&kv.value).unwrap());
        if let Some(r) = r.filter(|r| r["saved_guest"].is_string()) {
            break r;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "no saved guest");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(record["state"], "unresolved", "{record}");
    assert_eq!(record["saved_guest"], saved.to_str().unwrap());

    // SIGTERM: nothing else to move, and the paused copy is on disk: a exits.
    Command::new("kill")
        .args(["-TERM", &p.a.id().to_string()])
        .status()
        .unwrap();
    let t = Instant::now();
    let status = loop {
        if let Some(s) = p.a.try_wait().unwrap() {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "a did not exit");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    assert!(saved.exists());

    // Started again, a holds web paused, under the same unresolved migration.
    p.a = Pair::agent(&p.file, "a", None, &p.a_control);
    assert_eq!(p.vms(), [("web".into(), "a".into(), "paused".into())]);
    ferry::transport::tls::install_default_provider();
    let m: Value = e.rt.block_on(async {
        let url = format!("http://{}/v1/migrations/{id}", p.a_control);
        let resp = reqwest::Client::new()
            .get(url)
            .bearer_auth("resolve-test-token")
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success());
        resp.json().await.unwrap()
    });
    assert_eq!(m["state"], "unresolved", "{m}");
    assert_eq!(m["saved_guest"], saved.to_str().unwrap(), "{m}");
    // b comes back without the VM: resolved to the source, web runs on a.
    p.b = Some(Pair::agent(&p.file, "b", None, &p.b_control));
    let out = p.run(&["resolve", &id, "--run-on", "source", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let m: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(m["resolution"]["run_on"], "source");
    assert_eq!(p.vms(), [("web".into(), "a".into(), "running".into())]);
    // The copy on disk (its digest checked as it was read back) is gone
    // by the time the resolve answers: a restart never finds it stale.
    assert!(!saved.exists(), "the copy stays after the resolve");
}

#[test]
fn an_unresolved_hand_off_is_settled_from_the_console_offering_only_safe_choices() {
    let _serial = common::serial();
    let test = "resolve-console";
    let Some((e, mut p)) = Pair::with_own_etcd(test, "after-go:kill") else {
        return;
    };
    let id = p.unresolved_migration();
    let _ = p.b.as_mut().unwrap().wait();
    unclaimed(&e, test, &id);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let Some(b) = Browser::start(test).await else {
            return;
        };
        let url = format!("http://{}/ui/", p.a_control);
        b.sign_in(&url, "resolve-test-token").await;
        b.until(
            "the hand-off banner",
            "const h = document.getElementById('handoffs'); return !h.hidden && h.textContent.includes('Unresolved hand-off')",
        )
        .await;
        b.shot("handoff-banner").await;
        let resolve = "button[aria-label='Resolve the hand-off of web']";
        let open = "return document.getElementById('dialog').open";
        // b cannot be asked: only the source, forced and explained.
        b.click(resolve).await;
        b.until("the dialog", open).await;
        let body = b.text("#dialog-body").await;
        assert!(body.contains("cannot be asked") && body.contains("gone for good"), "{body}");
        assert_eq!(b.text("#dialog-ok").await, "Force it to run on node a");
        b.shot("handoff-unknown").await;
        // Not without saying b is gone for good.
        b.click("#dialog-ok").await;
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        assert_eq!(b.js(open).await, serde_json::json!(true));
        b.click("#dialog-cancel").await;
        // b back without the VM: the source is the one safe choice.
        p.b = Some(Pair::agent(&p.file, "b", None, &p.b_control));
        b.click(resolve).await;
        b.until("the dialog again", open).await;
        let body = b.text("#dialog-body").await;
        assert!(body.contains("does not host web"), "{body}");
        assert_eq!(b.text("#dialog-ok").await, "Run it on node a");
        b.click("#dialog-ok").await;
        b.until("the banner gone", "return document.getElementById('handoffs').hidden")
            .await;
        b.until(
            "the settlement announced",
            "return document.getElementById('announce').textContent.includes('settled: it runs on node a')",
        )
        .await;
        b.close().await;
    });
    assert_eq!(p.vms(), [("web".into(), "a".into(), "running".into())]);
}
