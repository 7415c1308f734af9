//! Drain on shutdown with real `ferry agent` processes: SIGTERM moves a
//! node's VMs to the other nodes and the agent exits once it hosts nothing; a
//! VM that fits nowhere keeps the agent running until `ferry agent stop
//! --force`; a node that hosts nothing exits at once. These agents serve
//! their API over TLS (certificates from `ferry tls-cert`), which the CLI and
//! the agents verify against the cluster file's pins.

use crate::common;

use common::procs::{ferry, Procs};
use serde_json::Value;
use std::time::{Duration, Instant};

#[test]
fn sigterm_moves_every_vm_away_and_the_agent_exits_once_empty() {
    let _serial = common::serial();
    let Some(mut p) = Procs::start("drain", &[("a", "1GiB"), ("b", "1GiB"), ("c", "1GiB")]) else {
        return;
    };
    for vm in ["web-1", "web-2", "web-3"] {
        p.json(&["vm", "create", vm, "--node", "a", "--memory", "32MiB"]);
    }
    p.signal("a", "-TERM");
    let status = p
        .exited("a", Duration::from_secs(60))
        .expect("a exits once empty");
    assert!(status.success(), "{status}");
    let log = p.wait_log("a", "hosts nothing: stopped", Duration::from_secs(5));
    assert!(log.contains("hosts nothing: stopped"), "{log}");
    // Every VM runs elsewhere; none was lost.
    let vms = p.vms();
    assert_eq!(vms.len(), 3, "{vms:?}");
    for (vm, node, state) in &vms {
        assert!(node == "b" || node == "c", "{vm} on {node}");
        assert_eq!(state, "running", "{vm}");
    }
}

#[test]
fn a_vm_that_fits_nowhere_keeps_its_agent_until_the_stop_is_forced() {
    let _serial = common::serial();
    let Some(mut p) = Procs::start("force", &[("a", "1GiB"), ("b", "64MiB")]) else {
        return;
    };
    p.json(&["vm", "create", "small", "--node", "a", "--memory", "16MiB"]);
    p.json(&["vm", "create", "big", "--node", "a", "--memory", "128MiB"]);
    p.signal("a", "-TERM");
    // The small one moves; the big one fits nowhere: a stays up, paused.
    let until = Instant::now() + Duration::from_secs(30);
    while !p
        .vms()
        .contains(&("small".into(), "b".into(), "running".into()))
    {
        assert!(Instant::now() < until, "small never moved: {:?}", p.vms());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        p.exited("a", Duration::from_secs(3)).is_none(),
        "a exited holding big"
    );
    // Its log says why, once the drain that moved the small one has ended.
    let log = p.wait_log("a", "fits on no active node", Duration::from_secs(5));
    assert!(
        log.contains("VM big (128.00 MiB) fits on no active node"),
        "{log}"
    );
    let status = p.json(&["node", "status"]);
    assert!(status.to_string().contains("paused"), "{status}");
    // A second SIGTERM does not kill it either.
    p.signal("a", "-TERM");
    assert!(p.exited("a", Duration::from_secs(1)).is_none());
    // Forced: it stops, naming what it discards.
    let out = p.run(&["agent", "stop", "--node", "a", "--force"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("discarding big"),
        "{out:?}"
    );
    let status = p
        .exited("a", Duration::from_secs(15))
        .expect("a stops when forced");
    assert!(status.success());
    let log = p.wait_log("a", "discarded: big", Duration::from_secs(5));
    assert!(log.contains("discarded: big"), "{log}");
}

#[test]
fn an_agent_that_hosts_nothing_exits_at_once() {
    let _serial = common::serial();
    let Some(mut p) = Procs::start("empty", &[("a", "1GiB"), ("b", "1GiB")]) else {
        return;
    };
    let t = Instant::now();
    p.signal("a", "-TERM");
    let status = p.exited("a", Duration::from_secs(5)).expect("a exits");
    assert!(status.success());
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    // And `ferry agent stop` asks the same of b.
    let out = p.run(&["agent", "stop", "--node", "b"]);
    assert!(out.status.success(), "{out:?}");
    assert!(p.exited("b", Duration::from_secs(5)).is_some());
}

#[test]
fn the_api_is_tls_only_and_a_wrong_pin_is_refused() {
    let _serial = common::serial();
    let Some(p) = Procs::start("tls", &[("a", "1GiB"), ("b", "1GiB")]) else {
        return;
    };
    // The CLI verified both certificates to get here.
    let status = p.json(&["node", "status"]);
    assert_eq!(status.as_array().unwrap().len(), 2, "{status}");
    let text = std::fs::read_to_string(&p.file).unwrap();
    let control = text
        .lines()
        .find_map(|l| l.strip_prefix("control = \""))
        .unwrap()
        .trim_end_matches('"')
        .to_string();
    // Plain HTTP gets nothing.
    ferry::transport::tls::install_default_provider();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let plain = rt.block_on(
        reqwest::Client::new()
            .get(format!("http://{control}/v1/node"))
            .send(),
    );
    assert!(plain.is_err(), "{plain:?}");
    // A cluster file that pins another certificate for node a: refused.
    let forged = text.replacen("tls_cert = \"a.pem\"", "tls_cert = \"b.pem\"", 1);
    let forged_file = p.dir.join("forged.toml");
    std::fs::write(&forged_file, forged).unwrap();
    let out = ferry()
        .args([
            "node",
            "status",
            "--json",
            "--cluster",
            forged_file.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let nodes: Value = serde_json::from_slice(&out.stdout).unwrap();
    let a = &nodes[0];
    assert_eq!(a["state"], "unreachable", "{nodes}");
    assert!(
        a["error"].as_str().unwrap().contains("not the pinned one"),
        "{a}"
    );
    assert_eq!(nodes[1]["state"], "active", "{nodes}");
}

/// An update hook does not outlive its agent: SIGKILL the agent while the
/// hook runs, and the kernel kills the hook (PDEATHSIG).
#[test]
fn an_update_hook_dies_with_its_sigkilled_agent() {
    let _serial = common::serial();
    let Some(mut p) = Procs::start_with(
        "hook-death",
        "[defaults]\nupdate_hook = [\"sh\", \"-c\"]",
        &[("a", "1GiB"), ("b", "1GiB")],
    ) else {
        return;
    };
    let pid_file = p.dir.join("hook.pid");
    let command = format!("echo $$ > {}; exec sleep 600", pid_file.display());
    let mut update = ferry()
        .args(["cluster", "update", "--run", &command, "--cluster"])
        .arg(&p.file)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(30);
    let pid = loop {
        if let Some(pid) = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
        {
            break pid;
        }
        assert!(Instant::now() < end, "the hook never ran");
        std::thread::sleep(Duration::from_millis(50));
    };
    // `exec` made the hook's shell the sleep, still the agent's child.
    let alive = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
    };
    std::thread::sleep(Duration::from_millis(200));
    assert!(alive(pid), "the hook is not running");
    p.signal("a", "-KILL");
    p.exited("a", Duration::from_secs(5)).expect("killed");
    let end = Instant::now() + Duration::from_secs(5);
    while alive(pid) {
        assert!(Instant::now() < end, "hook {pid} outlived its agent");
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = update.kill();
    let _ = update.wait();
}
