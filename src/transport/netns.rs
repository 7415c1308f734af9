//! Network namespaces for a kernel-shaped test link: two namespaces joined by a
//! veth pair, a `tc` `tbf` qdisc on the sender's side, and threads that enter
//! a namespace so the sockets they create live there.
//!
//! Everything is done with `ip` and `tc` (iproute2) and torn down on drop. The
//! namespaces are named after the process (`ferry-<pid>-src`, `ferry-<pid>-dst`),
//! so [`TbfLink::new`] first removes those of ferry processes that no longer
//! exist: a run killed outright leaves nothing behind for long.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::Arc;

/// The source side's address on the veth pair.
pub const SOURCE_IP: &str = "10.213.0.1";
/// The destination side's address on the veth pair.
pub const DEST_IP: &str = "10.213.0.2";
const PREFIX: &str = "ferry-";

mod star;
pub use star::{node_ip, TbfStar, HUB_IP};

/// A named network namespace under `/run/netns`, held open.
#[derive(Debug)]
pub struct NetNs {
    name: String,
    file: File,
}

impl NetNs {
    /// Opens the existing namespace `name` (as `ip netns add` created it).
    pub fn open(name: &str) -> io::Result<Self> {
        let file = File::open(format!("/run/netns/{name}"))
            .map_err(|e| io::Error::new(e.kind(), format!("network namespace {name}: {e}")))?;
        Ok(Self {
            name: name.to_string(),
            file,
        })
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Moves the calling thread into this namespace: sockets it creates from now
    /// on live there. Other threads are not affected.
    #[allow(unsafe_code)]
    pub fn enter(&self) -> io::Result<()> {
        // SAFETY: setns only reads the descriptor, which `self.file` keeps open for
        // the duration of the call; it changes this thread's network namespace and
        // touches no memory of ours.
        let rc = unsafe { libc::setns(self.file.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc == 0 {
            Ok(())
        } else {
            let e = io::Error::last_os_error();
            Err(io::Error::new(
                e.kind(),
                format!("entering network namespace {}: {e}", self.name),
            ))
        }
    }
}

/// Runs `program args`, turning a failure into an error naming the command and
/// what it printed.
fn run(program: &str, args: &[&str]) -> io::Result<()> {
    let out = Command::new(program).args(args).output().map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot run `{program}` (is iproute2 installed?): {e}"),
        )
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Whether this process may set up a tbf link: root, with `ip` and `tc` found.
/// `Err` says what is missing.
pub fn tbf_available() -> Result<(), String> {
    #[allow(unsafe_code)]
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Err("--link tbf needs root (network namespaces and tc)".into());
    }
    for tool in ["ip", "tc"] {
        let found = Command::new(tool)
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return Err(format!("--link tbf needs `{tool}` (iproute2)"));
        }
    }
    Ok(())
}

/// Removes the namespaces left by ferry processes that are gone. Returns their
/// names.
pub fn remove_stale() -> Vec<String> {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return vec![];
    };
    let mut removed = vec![];
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(pid) = owner_pid(name) else { continue };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists()
            && run("ip", &["netns", "del", name]).is_ok()
        {
            removed.push(name.to_string());
        }
    }
    removed
}

/// The process id in a namespace name this module made (`ferry-<pid>-src`,
/// `-dst`, `-hub`, `-n<i>`).
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?;
    let (pid, side) = rest.split_once('-')?;
    let node = side
        .strip_prefix('n')
        .is_some_and(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()));
    (matches!(side, "src" | "dst" | "hub") || node).then_some(())?;
    pid.parse().ok()
}

/// A kernel-shaped link: the source's namespace and the destination's, a veth
/// pair between them, and a token-bucket filter on the source's egress (the
/// direction pages travel). Torn down on drop.
#[derive(Debug)]
pub struct TbfLink {
    source: Arc<NetNs>,
    destination: Arc<NetNs>,
    source_dev: String,
    rate: Option<u64>,
}

impl TbfLink {
    /// Creates the namespaces and the veth pair, unshaped. Needs root.
    pub fn new() -> io::Result<Self> {
        tbf_available().map_err(io::Error::other)?;
        remove_stale();
        let pid = std::process::id();
        let (src_ns, dst_ns) = (format!("{PREFIX}{pid}-src"), format!("{PREFIX}{pid}-dst"));
        let (src_dev, dst_dev) = (format!("fy{pid}s"), format!("fy{pid}d"));
        // Leftovers of this pid (a reused pid, or an earlier link in this process).
        for ns in [&src_ns, &dst_ns] {
            let _ = run("ip", &["netns", "del", ns]);
        }
        let mut guard = Teardown(vec![src_ns.clone(), dst_ns.clone()]);
        run("ip", &["netns", "add", &src_ns])?;
        run("ip", &["netns", "add", &dst_ns])?;
        run(
            "ip",
            &[
                "link", "add", &src_dev, "netns", &src_ns, "type", "veth", "peer", "name",
                &dst_dev, "netns", &dst_ns,
            ],
        )?;
        for (ns, dev, ip) in [(&src_ns, &src_dev, SOURCE_IP), (&dst_ns, &dst_dev, DEST_IP)] {
            let cidr = format!("{ip}/30");
            run("ip", &["-n", ns, "addr", "add", &cidr, "dev", dev])?;
            run("ip", &["-n", ns, "link", "set", dev, "up"])?;
            run("ip", &["-n", ns, "link", "set", "lo", "up"])?;
        }
        let link = TbfLink {
            source: Arc::new(NetNs::open(&src_ns)?),
            destination: Arc::new(NetNs::open(&dst_ns)?),
            source_dev: src_dev,
            rate: None,
        };
        guard.0.clear(); // `link`'s own drop tears down from here on
                         // Prove that threads can enter them before any runtime relies on it.
        let (s, d) = (link.source.clone(), link.destination.clone());
        std::thread::spawn(move || s.enter().and_then(|()| d.enter()))
            .join()
            .map_err(|_| io::Error::other("namespace check thread panicked"))??;
        Ok(link)
    }

    /// The namespace the source runs in.
    pub fn source(&self) -> &Arc<NetNs> {
        &self.source
    }

    /// The namespace the destination runs in.
    pub fn destination(&self) -> &Arc<NetNs> {
        &self.destination
    }

    /// The address the destination listens on (port 0: any).
    pub fn listen_addr(&self) -> String {
        format!("{DEST_IP}:0")
    }

    /// The current rate in bytes per second; `None` when unshaped.
    pub fn rate(&self) -> Option<u64> {
        self.rate
    }

    /// Shapes the source's egress to `rate` bytes per second with a `tbf` qdisc,
    /// or removes the shaping (`None`).
    pub fn set_rate(&mut self, rate: Option<u64>) -> io::Result<()> {
        match rate {
            None if self.rate.is_some() => self.root_qdisc(&["del"])?,
            None => {}
            Some(bps) => {
                let (rate, burst, limit) = tbf_params(bps);
                self.root_qdisc(&[
                    "replace", "tbf", "rate", &rate, "burst", &burst, "limit", &limit,
                ])?;
            }
        }
        self.rate = rate;
        Ok(())
    }

    /// `tc qdisc <verb> dev <source veth> root <rest...>` in the source's namespace.
    fn root_qdisc(&self, verb_and_rest: &[&str]) -> io::Result<()> {
        let (verb, rest) = verb_and_rest.split_first().expect("a verb");
        let mut args = vec!["netns", "exec", self.source.name(), "tc", "qdisc", verb];
        args.extend(["dev", self.source_dev.as_str(), "root"]);
        args.extend(rest);
        run("ip", &args)
    }
}

/// `tc` arguments for a tbf of `bps` bytes per second: the rate in bit/s, a
/// bucket of 4 ms of traffic (at least 128 KiB, so that 64 KiB segmentation
/// offload packets pass whole), and a queue of 50 ms of traffic (at least twice
/// the bucket).
fn tbf_params(bps: u64) -> (String, String, String) {
    let bps = bps.max(1);
    let burst = (bps / 250).max(128 << 10);
    let limit = (bps / 20).max(2 * burst);
    (
        format!("{}bit", bps.saturating_mul(8)),
        burst.to_string(),
        limit.to_string(),
    )
}

impl Drop for TbfLink {
    fn drop(&mut self) {
        Teardown(vec![
            self.source.name().to_string(),
            self.destination.name().to_string(),
        ]);
    }
}

/// Deletes the named namespaces (and with them the veth pair) when dropped.
struct Teardown(Vec<String>);

impl Drop for Teardown {
    fn drop(&mut self) {
        for ns in &self.0 {
            if let Err(e) = run("ip", &["netns", "del", ns]) {
                tracing::warn!("tearing down the tbf link: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_their_owner() {
        assert_eq!(owner_pid("ferry-123-src"), Some(123));
        assert_eq!(owner_pid("ferry-123-dst"), Some(123));
        assert_eq!(owner_pid("ferry-123-hub"), Some(123));
        assert_eq!(owner_pid("ferry-123-n2"), Some(123));
        assert_eq!(owner_pid("ferry-123-n"), None);
        assert_eq!(owner_pid("ferry-123-other"), None);
        assert_eq!(owner_pid("ferry-x-src"), None);
        assert_eq!(owner_pid("blue"), None);
    }

    #[test]
    fn tbf_buckets_fit_offload_packets_and_scale_with_rate() {
        // 100 Mbit/s: 12.5 MB/s; the bucket floor applies.
        assert_eq!(
            tbf_params(12_500_000),
            ("100000000bit".into(), "131072".into(), "625000".into())
        );
        // 10 Gbit/s: 4 ms is 5 MB.
        let (_, burst, limit) = tbf_params(1_250_000_000);
        assert_eq!((burst.as_str(), limit.as_str()), ("5000000", "62500000"));
    }
}
