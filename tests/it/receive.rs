//! `ferry receive` as a long-running process: it keeps every guest that
//! arrives, counts them against `--max-memory`, and `--once` means one
//! migration, not one connection.

use crate::common;

use common::{free_port, parse_report};
use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

fn ferry() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
}

/// A `ferry receive` process and its report lines.
struct Receiving {
    child: Child,
    lines: BufReader<ChildStdout>,
    addr: String,
}

impl Receiving {
    fn start(extra: &[&str]) -> Self {
        let addr = format!("127.0.0.1:{}", free_port());
        let mut child = ferry()
            .args(["receive", "--listen", &addr, "--json"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap());
        let t = Instant::now();
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "receiver did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, lines, addr }
    }

    /// The next report the receiver prints.
    fn next_report(&mut self) -> serde_json::Value {
        let mut line = String::new();
        self.lines.read_line(&mut line).unwrap();
        assert!(!line.is_empty(), "the receiver exited without a report");
        parse_report(line.trim())
    }

    fn send(&self, extra: &[&str]) -> serde_json::Value {
        let out = ferry()
            .args(["send", "--to", &self.addr, "--json", "--workload", "idle"])
            .args(extra)
            .output()
            .unwrap();
        parse_report(String::from_utf8(out.stdout).unwrap().trim())
    }

    fn still_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Receiving {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn key_file(name: &str) -> std::path::PathBuf {
    let path =
        std::env::temp_dir().join(format!("ferry-receive-{name}-{}.key", std::process::id()));
    let _ = std::fs::remove_file(&path);
    ferry::migration::auth::write_secret_file(&path, b"a-receive-test-key-0123456789").unwrap();
    path
}

#[test]
fn once_means_one_migration_not_the_first_session_that_ends() {
    let key = key_file("once");
    let key = key.to_str().unwrap();
    let mut r = Receiving::start(&["--once", "--key", key, "--max-memory", "64MiB"]);
    // A source without the key is refused: no report, the receiver waits on.
    let refused = r.send(&["--memory", "8MiB"]);
    assert_eq!(refused["outcome"], "failed");
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("requires the shared key"),
        "{refused}"
    );
    // One with the key but too large is refused after its proof: reported,
    // and still not the one migration.
    let big = r.send(&["--memory", "128MiB", "--key", key]);
    assert_eq!(big["outcome"], "failed");
    let report = r.next_report();
    assert_eq!(report["outcome"], "failed");
    assert!(
        report["error"].as_str().unwrap().contains("limit"),
        "{report}"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(r.still_running(), "--once ended on a refused session");
    // The migration: reported, and then the receiver exits 0.
    let sent = r.send(&["--memory", "16MiB", "--key", key]);
    assert_eq!(sent["outcome"], "completed", "{sent}");
    let report = r.next_report();
    assert_eq!(report["outcome"], "completed");
    assert_eq!(report["session_id"], sent["session_id"]);
    let status = r.child.wait().unwrap();
    assert!(status.success(), "{status}");
}

#[test]
fn without_once_every_guest_that_arrived_is_kept_and_counted() {
    let mut r = Receiving::start(&["--max-memory", "80MiB"]);
    let mut sessions = Vec::new();
    for _ in 0..2 {
        let sent = r.send(&["--memory", "32MiB"]);
        assert_eq!(sent["outcome"], "completed", "{sent}");
        let report = r.next_report();
        assert_eq!(report["outcome"], "completed");
        sessions.push(report["session_id"].clone());
        let here = &report["guests_here"];
        assert_eq!(here["sessions"], serde_json::json!(sessions), "{report}");
        assert_eq!(here["memory_bytes"], (32 << 20) * sessions.len() as u64);
        assert_eq!(here["max_memory_bytes"], 80 << 20);
    }
    // A third of 32 MiB would pass the limit with the two held: refused.
    let third = r.send(&["--memory", "32MiB"]);
    assert_eq!(third["outcome"], "failed");
    assert!(
        third["error"].as_str().unwrap().contains("--max-memory"),
        "{third}"
    );
    let report = r.next_report();
    assert_eq!(
        report["guests_here"]["sessions"],
        serde_json::json!(sessions)
    );
    // A smaller one fits beside them.
    let small = r.send(&["--memory", "8MiB"]);
    assert_eq!(small["outcome"], "completed", "{small}");
    let report = r.next_report();
    assert_eq!(
        report["guests_here"]["sessions"].as_array().unwrap().len(),
        3
    );
    assert!(r.still_running());
}
