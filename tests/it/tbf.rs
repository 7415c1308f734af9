//! `ferry bench sweep --link tbf`, `bench drain --link tbf` and `bench cycle
//! --link tbf`: kernel-shaped links between network namespaces (a pair, or a
//! namespace per node around a bridge), set up and torn down by the bench,
//! interrupted or not. Needs root and iproute2; says so and skips otherwise
//! (fails where `CI` is set).

use crate::common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn ferry() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
}

/// Why this machine cannot run the tbf tests, if it cannot.
fn unavailable() -> Option<String> {
    ferry::transport::netns::tbf_available().err()
}

/// Network namespaces named for process `pid`.
fn namespaces_of(pid: u32) -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&format!("ferry-{pid}-")))
        .map(str::to_string)
        .collect()
}

/// `ferry bench sweep --link tbf` of one idle, incompressible guest, codec
/// `none`, one repeat per link speed.
/// `wire` bytes took `ms`: as long as a link of `bps` needs for them, and
/// no more than twice that.
/// Whether this machine can run a bench of agents across namespaces (tbf
/// and etcd); says what is missing otherwise (a failure where `CI` is set).
fn with_etcd() -> bool {
    if let Some(why) = unavailable() {
        common::missing(&why);
        return false;
    }
    common::etcd::available()
}

/// Runs a bench with `--json` to its end; its output, once it succeeded
/// and left no namespace behind.
fn run_and_clean_up(mut bench: Command) -> serde_json::Value {
    let child = bench
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(namespaces_of(pid).is_empty(), "{:?}", namespaces_of(pid));
    serde_json::from_str(text.trim()).unwrap()
}

fn assert_held_to(ms: f64, wire: f64, bps: f64) {
    let floor = wire / bps * 1e3;
    assert!(ms >= 0.9 * floor, "{ms} ms for {wire} B");
    assert!(ms <= 2.0 * floor, "{ms} ms for {wire} B");
}

fn tbf_sweep(memory: &str, bandwidth: &str) -> Command {
    let mut c = ferry();
    c.args(["bench", "sweep", "--link", "tbf", "--memory", memory])
        .args(["--fill", "random", "--workload", "idle", "--codecs", "none"])
        .args(["--bandwidth", bandwidth, "--repeats", "1"]);
    c
}

/// A process id that no process has now.
fn dead_pid() -> u32 {
    (3_000_000..)
        .find(|p| !std::path::Path::new(&format!("/proc/{p}")).exists())
        .unwrap()
}

#[test]
fn sweep_over_a_kernel_shaped_link_is_shaped_and_cleans_up() {
    if let Some(why) = unavailable() {
        common::missing(&why);
        return;
    }
    // A namespace left by a ferry that was killed outright: removed on the way in.
    let stale = format!("ferry-{}-src", dead_pid());
    let made = Command::new("ip")
        .args(["netns", "add", &stale])
        .status()
        .unwrap();
    assert!(made.success());

    let dir = std::env::temp_dir().join(format!("ferry-tbf-{}", std::process::id()));
    let child = tbf_sweep("16MiB", "100Mbit,unlimited")
        .arg("--out")
        .arg(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(namespaces_of(pid).is_empty(), "{:?}", namespaces_of(pid));
    let listed = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&listed.stdout).contains(&stale),
        "stale namespace {stale} left in place"
    );

    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("results.json")).unwrap()).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(results["meta"]["link"], "tbf");
    let cells = results["cells"].as_array().unwrap();
    let shaped = cells
        .iter()
        .find(|c| c["link_bps"] == 12_500_000)
        .expect("a 100 Mbit/s cell");
    let free = cells
        .iter()
        .find(|c| c["link_bps"].is_null())
        .expect("an unlimited cell");
    // 16 MiB of incompressible pages through 12.5 MB/s take at least 1.3 s, and
    // only the kernel can have held them back: ferry ran uncapped.
    let wire = shaped["wire_bytes"].as_f64().unwrap();
    let ms = shaped["total_ms"]["median"].as_f64().unwrap();
    assert!(wire > 16e6, "{wire}");
    assert_held_to(ms, wire, 12_500_000.0);
    let free_ms = free["total_ms"]["median"].as_f64().unwrap();
    assert!(free_ms * 3.0 < ms, "unlimited {free_ms} ms, shaped {ms} ms");
}

#[test]
fn an_interrupted_sweep_tears_its_link_down() {
    if let Some(why) = unavailable() {
        common::missing(&why);
        return;
    }
    // About 5 s of migration at 10 Mbit/s: long enough to interrupt.
    let mut child = tbf_sweep("8MiB", "10Mbit")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let t = Instant::now();
    while namespaces_of(pid).len() < 2 {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "no namespaces appeared"
        );
        assert!(child.try_wait().unwrap().is_none(), "sweep ended early");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    let sent = Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "interrupt was not prompt"
    );
    assert!(namespaces_of(pid).is_empty(), "{:?}", namespaces_of(pid));
}

#[test]
fn bench_link_measures_the_shaped_path() {
    if let Some(why) = unavailable() {
        common::missing(&why);
        return;
    }
    let out = ferry()
        .args(["bench", "link", "--link", "tbf", "--bandwidth", "100Mbit"])
        .args(["--bytes", "8MiB", "--repeats", "1", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["path"], "tbf 100Mbit/s");
    // The payload rate sits just under the shaped rate (tbf counts headers).
    let bps = v["bps"]["median"].as_f64().unwrap();
    assert!((0.8 * 12.5e6..=1.05 * 12.5e6).contains(&bps), "{bps}");
}

#[test]
fn a_drain_bench_across_namespaces_is_shaped_by_the_kernel_and_cleans_up() {
    let _serial = common::serial();
    if !with_etcd() {
        return;
    }
    // Node a alone on one side of the link, b, c and etcd on the other.
    let mut child = ferry();
    child.args([
        "bench",
        "drain",
        "--link",
        "tbf",
        "--vms",
        "2",
        "--memory",
        "16MiB",
        "--workload",
        "idle",
        "--fill",
        "random",
        "--codecs",
        "none",
        "--max-concurrent",
        "2",
        "--bandwidth",
        "100Mbit",
        "--repeats",
        "1",
        "--json",
    ]);
    let v = run_and_clean_up(child);
    let cell = &v["cells"][0];
    assert_eq!(
        (cell["repeats"].as_u64(), cell["failures"].as_u64()),
        (Some(1), Some(0)),
        "{v}"
    );
    for vm in cell["runs"][0]["vms"].as_array().unwrap() {
        assert!(["b", "c"].contains(&vm["target"].as_str().unwrap()), "{vm}");
    }
    // 32 MiB of incompressible pages through 12.5 MB/s: at least 2.7 s, held
    // back by the kernel alone (the node has no cap of its own here).
    let wire = cell["wire_bytes"].as_f64().unwrap();
    let ms = cell["drain_ms"]["median"].as_f64().unwrap();
    assert!(wire > 32e6, "{v}");
    assert_held_to(ms, wire, 12_500_000.0);
}

#[test]
fn a_cycle_bench_gives_each_node_a_shaped_link_and_cleans_up() {
    let _serial = common::serial();
    if !with_etcd() {
        return;
    }
    // Each node in a namespace of its own, etcd at the bridge between them.
    let mut bench = ferry();
    bench
        .args(["bench", "cycle", "--link", "tbf", "--vms", "1"])
        .args(["--memory", "16MiB", "--workload", "idle"])
        .args(["--fill", "random", "--codec", "none"])
        .args(["--bandwidth", "100Mbit", "--json"]);
    let v = run_and_clean_up(bench);
    assert_eq!(v["summary"]["failures"], 0, "{v}");
    let phases = v["runs"][0]["phases"].as_array().unwrap();
    // Every node's drain (16 MiB of incompressible pages) went through its
    // own link at 12.5 MB/s: the kernel held each back, the nodes had no cap.
    let drains: Vec<_> = phases.iter().filter(|p| p["phase"] == "drain").collect();
    assert_eq!(drains.len(), 3, "{v}");
    for d in drains {
        let wire = d["wire_bytes"].as_f64().unwrap();
        assert!(wire > 16e6, "{d}");
        assert_held_to(d["ms"].as_f64().unwrap(), wire, 12_500_000.0);
    }
}
