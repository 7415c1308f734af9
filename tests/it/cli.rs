//! The `ferry` binary as users run it: `send` and `receive` as two processes,
//! `demo`, JSON reports on stdout, and one-line errors with exit status 2.

use crate::common;

use common::{free_port, parse_report};
use std::process::{Command, Stdio};
use std::time::Duration;

fn ferry() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
}

/// Runs `ferry` with `args` and checks it succeeded, showing its stderr if not.
fn run_ok(args: &[&str]) -> std::process::Output {
    let out = ferry().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ferry {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Waits until something accepts connections on `addr`.
fn wait_listening(addr: &str, what: &str) {
    let t = std::time::Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(t.elapsed() < Duration::from_secs(10), "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn send_and_receive_as_separate_processes() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let receiver = ferry()
        .args(["receive", "--listen", &addr, "--once", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until it listens.
    wait_listening(&addr, "receiver did not start");
    let send = ferry()
        .args([
            "send",
            "--to",
            &addr,
            "--memory",
            "64MiB",
            "--workload",
            "hot:8MiB",
            "--dirty-rate",
            "20MB/s",
            "--channels",
            "3",
            "--codec",
            "zstd:1",
            "--verify",
            "full",
            "--max-bandwidth",
            "1Gbit/s",
            "--json",
        ])
        .output()
        .unwrap();
    let recv = receiver.wait_with_output().unwrap();
    let send_out = String::from_utf8(send.stdout).unwrap();
    let recv_out = String::from_utf8(recv.stdout).unwrap();
    assert!(
        send.status.success(),
        "send failed: {}",
        String::from_utf8_lossy(&send.stderr)
    );
    assert!(
        recv.status.success(),
        "receive failed: {}",
        String::from_utf8_lossy(&recv.stderr)
    );
    assert_eq!(
        send_out.lines().count(),
        1,
        "exactly one JSON line: {send_out}"
    );
    assert_eq!(
        recv_out.lines().count(),
        1,
        "exactly one JSON line: {recv_out}"
    );
    let s = parse_report(send_out.trim());
    let r = parse_report(recv_out.trim());
    assert_eq!(s["outcome"], "completed");
    assert_eq!(r["outcome"], "completed");
    assert_eq!(r["verified"], true);
    assert_eq!(s["verify"], "full");
    assert_eq!(s["channels"], 3);
    assert_eq!(s["codec"], "zstd:1");
    assert_eq!(s["max_bandwidth_bps"], 125_000_000);
    assert_eq!(s["memory_bytes"], 64 << 20);
    assert_eq!(s["pages"], r["pages"], "both sides count the same pages");
    assert_eq!(s["wire_bytes"], r["wire_bytes"]);
    assert!(s["cpu_ms"]["source"].as_f64().unwrap() > 0.0);
    assert!(
        s["cpu_ms"]["destination"].as_f64().unwrap() > 0.0,
        "the destination reports its CPU time"
    );
    assert_eq!(
        s["guest_bytes_sent"].as_u64().unwrap(),
        s["pages"]["total"].as_u64().unwrap() * 4096
    );
    // Each process reports what it holds: its guest's memory, and the rest.
    for (side, rep) in [("source", &s), ("destination", &r)] {
        let m = &rep["memory_use"];
        let resident = m["guest_resident_bytes"].as_u64().unwrap();
        let peak = m["peak_rss_bytes"].as_u64().unwrap();
        let overhead = m["overhead_bytes"].as_u64().unwrap();
        assert!(resident > 16 << 20 && resident <= 64 << 20, "{side}: {m}");
        assert_eq!(overhead, peak - resident, "{side}: {m}");
        assert!(overhead > 0 && overhead < 256 << 20, "{side}: {m}");
    }
}

#[test]
fn demo_prints_one_json_line() {
    let out = run_ok(&[
        "demo",
        "--memory",
        "32MiB",
        "--workload",
        "hot:2MiB",
        "--dirty-rate",
        "10MB/s",
        "--json",
    ]);
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    let r = parse_report(stdout.trim());
    assert_eq!(r["outcome"], "completed");
    assert_eq!(r["verified"], true);
    assert_eq!(r["codec"], "auto", "auto is the default codec");
    assert_eq!(r["channels"], 4);
    assert!(r["max_bandwidth_bps"].is_null());
}

#[test]
fn demo_prints_a_readable_summary() {
    let out = ferry()
        .args(["demo", "--memory", "16MiB", "--workload", "idle"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.starts_with("migration completed"), "{stdout}");
    for word in ["downtime", "rounds", "verified", "throughput", "cpu"] {
        assert!(stdout.contains(word), "summary lacks {word}: {stdout}");
    }
}

fn assert_usage_error(args: &[&str], needle: &str) {
    let out = ferry().args(args).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{args:?}");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "one line for {args:?}: {stderr}"
    );
    assert!(stderr.contains(needle), "{args:?}: {stderr}");
    assert!(out.stdout.is_empty());
}

#[test]
fn bad_flags_and_values_are_one_line_errors_with_status_2() {
    assert_usage_error(&["demo", "--codec", "gzip"], "gzip");
    assert_usage_error(&["demo", "--memory", "lots"], "lots");
    assert_usage_error(&["demo", "--channels", "65"], "65");
    assert_usage_error(&["demo", "--max-bandwidth", "fast"], "fast");
    assert_usage_error(&["demo", "--fill", "gold:3"], "gold");
    assert_usage_error(&["demo", "--workload", "busy"], "busy");
    assert_usage_error(&["demo", "--no-such-flag"], "--no-such-flag");
    assert_usage_error(&["send", "--memory", "1GiB"], "--to");
    assert_usage_error(
        &["demo", "--memory", "4MiB", "--workload", "hot:8MiB"],
        "larger than",
    );
    // Values that parse but are out of range name their flag.
    for (flag, value) in [
        ("--completion-timeout", "4000000000000000h"),
        ("--completion-timeout", "31d"),
        ("--peer-timeout", "2h"),
        ("--progress-timeout", "0s"),
        ("--downtime-limit", "0ms"),
        ("--max-bandwidth", "1B/s"),
        ("--dirty-rate", "5000TB/s"),
    ] {
        assert_usage_error(&["demo", "--memory", "8MiB", flag, value], flag);
    }
    for (flag, value) in [
        ("--max-sessions", "0"),
        ("--handshake-timeout", "1h"),
        ("--peer-timeout", "1ms"),
        ("--max-memory", "1KiB"),
    ] {
        assert_usage_error(&["receive", "--listen", "127.0.0.1:0", flag, value], flag);
    }
    assert_usage_error(&["bench", "cycle", "--update-time", "11m"], "--update-time");
    assert_usage_error(
        &["bench", "cycle", "--update-time", "soon"],
        "--update-time",
    );
}

#[test]
fn an_image_sets_the_memory_size_and_a_disagreeing_memory_is_an_error() {
    let path = std::env::temp_dir().join(format!("ferry-cli-image-{}", std::process::id()));
    let mut data = vec![0u8; 2 << 20];
    for (i, b) in data.iter_mut().enumerate().skip(4096) {
        *b = (i % 253) as u8;
    }
    std::fs::write(&path, &data).unwrap();
    let p = path.to_str().unwrap();
    assert_usage_error(&["demo", "--image", p, "--memory", "4MiB"], "disagrees");
    let out = ferry()
        .args(["demo", "--image", p, "--workload", "idle", "--json"])
        .output()
        .unwrap();
    std::fs::remove_file(&path).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = parse_report(String::from_utf8(out.stdout).unwrap().trim());
    assert_eq!(r["memory_bytes"], 2 << 20);
    assert_eq!(r["outcome"], "completed");
    assert!(
        r["pages"]["zero"].as_u64().unwrap() >= 1,
        "the image's zero page"
    );
}

#[test]
fn a_send_with_no_receiver_exits_1_with_a_failed_report() {
    // Port 1: privileged and unassigned, so no test of this suite (whose
    // ports come from the ephemeral range) can be listening there.
    let out = ferry()
        .args(["send", "--to", "127.0.0.1:1", "--memory", "8MiB", "--json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let r = parse_report(String::from_utf8(out.stdout).unwrap().trim());
    assert_eq!(r["outcome"], "failed");
    assert_eq!(r["guest_location"], "source");
    assert!(r["error"].as_str().unwrap().contains("connect"), "{r}");
}

#[test]
fn bench_link_measures_loopback_and_a_remote_sink() {
    let out = run_ok(&[
        "bench",
        "link",
        "--channels",
        "2",
        "--bytes",
        "32MiB",
        "--repeats",
        "3",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["path"], "loopback");
    assert_eq!(v["channels"], 2);
    assert_eq!(v["repeats"], 3);
    assert_eq!(v["bytes"], 32 << 20);
    assert_eq!(v["runs"].as_array().unwrap().len(), 3);
    let bps = &v["bps"];
    assert!(bps["min"].as_f64().unwrap() <= bps["median"].as_f64().unwrap());
    assert!(bps["median"].as_f64().unwrap() <= bps["max"].as_f64().unwrap());
    assert!(bps["min"].as_f64().unwrap() > 0.0);

    // A sink in one process, the sender in another.
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut sink = ferry()
        .args(["bench", "link", "--listen", &addr])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_listening(&addr, "sink did not start");
    let out = ferry()
        .args([
            "bench",
            "link",
            "--to",
            &addr,
            "--bytes",
            "16MiB",
            "--repeats",
            "1",
            "--json",
        ])
        .output()
        .unwrap();
    sink.kill().unwrap();
    let _ = sink.wait();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["path"], addr);
    assert_eq!(v["bytes"], 16 << 20);
}

#[test]
fn bench_codecs_reports_each_codec_on_the_given_memory() {
    let out = run_ok(&[
        "bench",
        "codecs",
        "--memory",
        "16MiB",
        "--fill",
        "text",
        "--codecs",
        "none,lz4,zstd:3",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["memory_bytes"], 16 << 20);
    assert_eq!(v["sampled_bytes"], 16 << 20);
    let codecs = v["codecs"].as_array().unwrap();
    let names: Vec<&str> = codecs
        .iter()
        .map(|c| c["codec"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["none", "lz4", "zstd:3"]);
    let ratio = |i: usize| codecs[i]["ratio"].as_f64().unwrap();
    assert!(
        ratio(0) < 1.01 && ratio(1) > 1.8 && ratio(2) > ratio(1),
        "{v}"
    );
    for c in codecs {
        assert!(c["encode_bps"].as_f64().unwrap() > 0.0 && c["decode_bps"].as_f64().unwrap() > 0.0);
    }
    assert!(v["dense"].is_null(), "only with --dense: {v}");
    // Denser pages: text repeats, so references and a kept stream both
    // shrink it; only zstd keeps a stream.
    let out = run_ok(&[
        "bench",
        "codecs",
        "--memory",
        "16MiB",
        "--fill",
        "text",
        "--codecs",
        "lz4,zstd:1",
        "--dense",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let dense = v["dense"].as_array().unwrap();
    assert_eq!(dense.len(), 2, "{v}");
    let bytes = |i: usize, k: &str| dense[i][k].as_u64().unwrap();
    for i in 0..2 {
        assert!(bytes(i, "dedup_bytes") <= bytes(i, "batch_bytes"), "{v}");
        assert!(bytes(i, "pages") > 0, "{v}");
    }
    assert!(dense[0]["stream_bytes"].is_null(), "{v}");
    assert!(bytes(1, "stream_bytes") < bytes(1, "batch_bytes"), "{v}");
    let out = run_ok(&[
        "bench", "codecs", "--memory", "16MiB", "--fill", "text", "--codecs", "zstd:1", "--dense",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("kept stream") && text.contains("repeat an earlier one"),
        "{text}"
    );
    assert_usage_error(&["bench", "codecs", "--codecs", "lz4,brotli"], "brotli");
    assert_usage_error(
        &["bench", "codecs", "--image", "/nonexistent/ram.img"],
        "/nonexistent/ram.img",
    );
    assert_usage_error(
        &["bench", "sweep", "--image", "/nonexistent/ram.img"],
        "/nonexistent/ram.img",
    );
    assert_usage_error(
        &["demo", "--image", "/nonexistent/ram.img"],
        "/nonexistent/ram.img",
    );
}

/// A one-cell sweep of an idle 8 MiB guest with `codec`, with `axis` (a
/// flag taking `both`) on and off; its JSON.
fn sweep_both(codec: &str, axis: &str) -> serde_json::Value {
    let out = run_ok(&[
        "bench",
        "sweep",
        "--memory",
        "8MiB",
        "--workload",
        "idle",
        "--codecs",
        codec,
        "--bandwidth",
        "unlimited",
        "--repeats",
        "1",
        "--channels",
        "2",
        axis,
        "both",
        "--json",
    ]);
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn bench_sweep_over_tls_runs_both_paths_as_an_axis() {
    let v = sweep_both("none", "--tls");
    let cells = v["cells"].as_array().unwrap();
    // Each path is a cell of its own, each its own winner; a run that did
    // not migrate as asked (TLS or plain) fails the sweep.
    let paths: Vec<(bool, u64, bool)> = cells
        .iter()
        .map(|c| {
            let tls = c["tls"].as_bool().unwrap();
            (tls, c["repeats"].as_u64().unwrap(), c["winner"] == true)
        })
        .collect();
    assert_eq!(paths, [(false, 1, true), (true, 1, true)]);
}

#[test]
fn bench_sweep_with_and_without_dense_pages_runs_both_as_an_axis() {
    let v = sweep_both("lz4", "--dense");
    let cells: Vec<(bool, u64)> = v["cells"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["dense"].as_bool().unwrap(),
                c["repeats"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(cells, [(false, 1), (true, 1)]);
    assert_eq!(v["cells"][0]["pages_referenced"], 0, "{v}");
}

#[test]
fn bench_sweep_runs_a_small_grid_and_writes_its_results() {
    let dir = std::env::temp_dir().join(format!("ferry-sweep-cli-{}", std::process::id()));
    let out = run_ok(&[
        "bench",
        "sweep",
        "--memory",
        "8MiB",
        "--workload",
        "idle",
        "--codecs",
        "none,zstd",
        "--bandwidth",
        "50MB/s,unlimited",
        "--repeats",
        "2",
        "--channels",
        "2",
        "--out",
        dir.to_str().unwrap(),
    ]);
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(
        table.contains("guest 8MiB-idle") && table.contains("unlimited") && table.contains('*'),
        "{table}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("results.json")).unwrap()).unwrap();
    let cells = v["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 4, "2 codecs × 2 links × 1 guest");
    let labels: std::collections::BTreeSet<&str> =
        cells.iter().map(|c| c["codec"].as_str().unwrap()).collect();
    assert_eq!(labels, ["none", "zstd"].into(), "codec labels as given");
    for link in [serde_json::json!(50_000_000), serde_json::Value::Null] {
        let winners = cells
            .iter()
            .filter(|c| c["link_bps"] == link && c["winner"] == true)
            .count();
        assert_eq!(winners, 1, "one winner for link {link}");
    }
    for c in cells {
        assert_eq!(c["repeats"], 2);
        assert_eq!(c["guest"], "8MiB-idle");
        let t = &c["total_ms"];
        assert!(t["min"].as_f64().unwrap() <= t["median"].as_f64().unwrap());
        assert!(c["wire_bytes"].as_u64().unwrap() > 0);
        assert!(c["cpu_ms"]["source"].as_f64().unwrap() > 0.0);
    }
    // Over a 50 MB/s cap, compression wins on the realistic mix.
    let capped_winner = cells
        .iter()
        .find(|c| c["link_bps"] == 50_000_000 && c["winner"] == true)
        .unwrap();
    assert_eq!(capped_winner["codec"], "zstd");
    assert!(
        std::fs::read_to_string(dir.join("results.csv"))
            .unwrap()
            .lines()
            .count()
            == 5
    );
    assert!(std::fs::read_to_string(dir.join("report.md"))
        .unwrap()
        .contains("## Winners"));
    // Charts, as SVG and PNG, for the one guest.
    for chart in ["total-time", "wire-bytes", "cpu"] {
        let svg = std::fs::read_to_string(dir.join(format!("{chart}-8MiB-idle.svg"))).unwrap();
        assert!(
            svg.contains("<svg") && svg.contains("<text"),
            "{chart}.svg has text"
        );
        let png = std::fs::read(dir.join(format!("{chart}-8MiB-idle.png"))).unwrap();
        assert!(
            png.starts_with(b"\x89PNG") && png.len() > 10_000,
            "{chart}.png"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn demo_with_the_auto_codec() {
    let out = run_ok(&[
        "demo",
        "--memory",
        "16MiB",
        "--workload",
        "idle",
        "--codec",
        "auto",
        "--max-bandwidth",
        "200MB/s",
        "--json",
    ]);
    let r = parse_report(String::from_utf8(out.stdout).unwrap().trim());
    assert_eq!(r["outcome"], "completed");
    assert_eq!(r["codec"], "auto");
    assert_usage_error(&["demo", "--codec", "auto:3"], "auto:3");
}

#[test]
fn image_writes_a_ram_image_that_image_flags_read() {
    let path = std::env::temp_dir().join(format!("ferry-cli-image-{}", std::process::id()));
    let p = path.to_str().unwrap();
    let out = run_ok(&["image", "--memory", "8MiB", "--seed", "3", "--out", p]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("non-zero pages"), "{said}");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 8 << 20);
    // The same content as the fill it came from: the demo's guest is built from
    // the image, and the migration verifies it arrived.
    let out = run_ok(&["demo", "--image", p, "--workload", "idle", "--json"]);
    std::fs::remove_file(&path).unwrap();
    let r = parse_report(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(r["outcome"], "completed");
    assert_eq!(r["memory_bytes"], 8 << 20);
    assert!(r["pages"]["zero"].as_u64().unwrap() > 0);
    assert_usage_error(&["image", "--memory", "0", "--out", p], "--memory");
}

#[test]
fn a_short_soak_moves_guests_back_and_forth_with_nothing_lost_or_leaked() {
    // Its agents keep their state in an etcd member it starts.
    if !crate::common::etcd::available() {
        return;
    }
    let out = ferry()
        .args([
            "bench", "soak", "--count", "12", "--vms", "2", "--memory", "16MiB", "--json",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(v["migrations"], 12, "{v}");
    assert_eq!(
        (v["failed"].as_u64(), v["mismatches"].as_u64()),
        (Some(0), Some(0)),
        "{v}"
    );
    assert_eq!(v["ok"], true, "{v}");
    for agent in v["agents"].as_array().unwrap() {
        assert!(
            agent["fds_end"].as_u64() <= Some(agent["fds_start"].as_u64().unwrap() + 4),
            "{v}"
        );
        assert!(agent["rss_start"].as_u64().unwrap() > 0, "{v}");
    }
}

#[test]
fn tls_with_a_pinned_certificate_from_the_command_line() {
    let dir = std::env::temp_dir().join(format!("ferry-cli-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let out = ferry()
        .args(["tls-cert", "--cert"])
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    // TLS with a certificate made at start needs a key to be known by.
    let out = ferry()
        .args(["receive", "--listen", "127.0.0.1:0", "--tls"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let receiver = ferry()
        .args([
            "receive",
            "--listen",
            &addr,
            "--once",
            "--json",
            "--tls",
            "--tls-cert",
        ])
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(std::time::Instant::now() < until);
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = ferry()
        .args([
            "send", "--to", &addr, "--memory", "16MiB", "--json", "--tls", "--tls-ca",
        ])
        .arg(&cert)
        .output()
        .unwrap();
    let src: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    assert_eq!(src["outcome"], "completed", "{src}");
    assert_eq!(
        (src["encrypted"].as_bool(), src["authenticated"].as_bool()),
        (Some(true), Some(false))
    );
    let dst = receiver.wait_with_output().unwrap();
    let dst: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&dst.stdout).trim()).unwrap();
    assert_eq!(dst["outcome"], "completed");
    assert_eq!(dst["encrypted"], true);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The systemd unit the README's setup installs: its `ExecStart` is a
/// command line `ferry agent` takes (it gets as far as reading the cluster
/// file), and stopping waits for the drain however long it takes.
#[test]
fn an_agent_refuses_a_cluster_file_without_etcd() {
    let dir = std::env::temp_dir().join(format!("ferry-no-etcd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    ferry::migration::auth::write_secret_file(&dir.join("t"), b"a-token-0123456789").unwrap();
    let file = dir.join("cluster.toml");
    let node = format!(
        "token_file = \"t\"\ninsecure_api = true\n[[node]]\nname = \"a\"\ncontrol = \"127.0.0.1:{}\"\ndata = \"127.0.0.1:{}\"\nmemory_capacity = \"1GiB\"\n",
        free_port(),
        free_port()
    );
    std::fs::write(&file, &node).unwrap();
    let path = file.to_str().unwrap();
    assert_usage_error(
        &["agent", "--cluster", path, "--node", "a"],
        "names no etcd",
    );
    // With etcd named (nothing listens there) the file is taken: the agent
    // goes on to register, and says why it cannot.
    let etcd = format!("127.0.0.1:{}", free_port());
    std::fs::write(&file, format!("etcd = [\"{etcd}\"]\n{node}")).unwrap();
    let out = ferry()
        .args(["agent", "--cluster", path, "--node", "a"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("registering in etcd"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_systemd_unit_runs_an_agent_and_waits_for_its_drain() {
    let unit = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/ferry-agent.service"),
    )
    .unwrap();
    let line = |key: &str| {
        unit.lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in the unit"))
            .to_string()
    };
    assert_eq!(line("TimeoutStopSec="), "infinity");
    let exec = line("ExecStart=");
    let mut args: Vec<&str> = exec.split_whitespace().collect();
    assert_eq!(args.remove(0), "/usr/local/bin/ferry");
    let dir = std::env::temp_dir().join(format!("ferry-unit-{}", std::process::id()));
    let file = dir.join("cluster.toml");
    let args: Vec<String> = args
        .iter()
        .map(|a| match *a {
            "/etc/ferry/cluster.toml" => file.display().to_string(),
            "%H" => "somehost".to_string(),
            a => a.to_string(),
        })
        .collect();
    let out = ferry().args(&args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    // Not a usage error: the arguments parsed, the file is missing.
    assert!(stderr.contains(&file.display().to_string()), "{stderr}");
    assert!(!stderr.contains("Usage:"), "{stderr}");
}

#[test]
fn bench_sim_runs_seeds_and_replays_one() {
    let out = run_ok(&["bench", "sim", "--seeds", "200", "--first", "5"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("200 schedules in "), "{text}");
    assert!(text.contains("every invariant held"), "{text}");
    assert!(text.contains("completed"), "{text}");
    // One seed replays to the same outcome every time.
    let one = |seed: &str| -> serde_json::Value {
        let out = run_ok(&["bench", "sim", "--seed", seed]);
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let (a, b) = (one("12"), one("12"));
    assert_eq!(a, b);
    assert_eq!(a["seed"], 12);
    assert!(a["virtual_ms"].as_u64().unwrap() > 0, "{a}");
    // A count out of range is the usage error naming the flag.
    assert_usage_error(&["bench", "sim", "--seeds", "0"], "--seeds");
}
