//! A star of kernel-shaped links: one network namespace per node, each joined
//! by a veth pair to a bridge in a hub namespace, with a `tc` tbf qdisc on the
//! node's side, so that every node's outgoing traffic has a link of its own
//! (`ferry bench cycle --link tbf`, where each node drains in turn).

use super::{run, tbf_available, tbf_params, NetNs, Teardown, PREFIX};
use std::io;
use std::sync::Arc;

/// The hub's address on the bridge, where etcd and the bench's client are.
pub const HUB_IP: &str = "10.213.1.254";

/// Node `i`'s address (`10.213.1.{i+1}`).
pub fn node_ip(i: usize) -> String {
    format!("10.213.1.{}", i + 1)
}

/// Namespaces of `n` nodes around a hub; torn down on drop.
#[derive(Debug)]
pub struct TbfStar {
    hub: Arc<NetNs>,
    nodes: Vec<(Arc<NetNs>, String)>,
    rate: Option<u64>,
}

impl TbfStar {
    /// Creates the hub, its bridge and `n` (1 to 8) nodes' namespaces,
    /// unshaped. Needs root.
    pub fn new(n: usize) -> io::Result<Self> {
        if !(1..=8).contains(&n) {
            return Err(io::Error::other(format!("a star of {n} nodes (1 to 8)")));
        }
        tbf_available().map_err(io::Error::other)?;
        super::remove_stale();
        let pid = std::process::id();
        let hub = format!("{PREFIX}{pid}-hub");
        let names: Vec<String> = (0..n).map(|i| format!("{PREFIX}{pid}-n{i}")).collect();
        for ns in std::iter::once(&hub).chain(&names) {
            let _ = run("ip", &["netns", "del", ns]);
        }
        let mut guard = Teardown(std::iter::once(hub.clone()).chain(names.clone()).collect());
        run("ip", &["netns", "add", &hub])?;
        run("ip", &["-n", &hub, "link", "add", "br0", "type", "bridge"])?;
        run(
            "ip",
            &[
                "-n",
                &hub,
                "addr",
                "add",
                &format!("{HUB_IP}/24"),
                "dev",
                "br0",
            ],
        )?;
        for dev in ["br0", "lo"] {
            run("ip", &["-n", &hub, "link", "set", dev, "up"])?;
        }
        let mut devs = Vec::new();
        for (i, ns) in names.iter().enumerate() {
            let (dev, port) = (format!("fy{pid}n{i}"), format!("fy{pid}h{i}"));
            run("ip", &["netns", "add", ns])?;
            run(
                "ip",
                &[
                    "link", "add", &dev, "netns", ns, "type", "veth", "peer", "name", &port,
                    "netns", &hub,
                ],
            )?;
            run("ip", &["-n", &hub, "link", "set", &port, "master", "br0"])?;
            run("ip", &["-n", &hub, "link", "set", &port, "up"])?;
            let cidr = format!("{}/24", node_ip(i));
            run("ip", &["-n", ns, "addr", "add", &cidr, "dev", &dev])?;
            for d in [dev.as_str(), "lo"] {
                run("ip", &["-n", ns, "link", "set", d, "up"])?;
            }
            devs.push(dev);
        }
        let star = TbfStar {
            hub: Arc::new(NetNs::open(&hub)?),
            nodes: names
                .iter()
                .zip(devs)
                .map(|(ns, dev)| Ok((Arc::new(NetNs::open(ns)?), dev)))
                .collect::<io::Result<_>>()?,
            rate: None,
        };
        guard.0.clear(); // `star`'s own drop tears down from here on
        let all: Vec<Arc<NetNs>> = std::iter::once(star.hub.clone())
            .chain(star.nodes.iter().map(|(ns, _)| ns.clone()))
            .collect();
        std::thread::spawn(move || all.iter().try_for_each(|ns| ns.enter()))
            .join()
            .map_err(|_| io::Error::other("namespace check thread panicked"))??;
        Ok(star)
    }

    /// The hub's namespace.
    pub fn hub(&self) -> &Arc<NetNs> {
        &self.hub
    }

    /// Node `i`'s namespace.
    pub fn node(&self, i: usize) -> &Arc<NetNs> {
        &self.nodes[i].0
    }

    /// The current rate of each node's link, bytes per second; `None` when
    /// unshaped.
    pub fn rate(&self) -> Option<u64> {
        self.rate
    }

    /// Shapes every node's egress to `rate` bytes per second, or removes the
    /// shaping (`None`). On a failure no node is left shaped.
    pub fn set_rate(&mut self, rate: Option<u64>) -> io::Result<()> {
        let result = self.nodes.iter().try_for_each(|(ns, dev)| match rate {
            None => qdisc(ns, dev, &["del"]).or_else(|e| match self.rate {
                // Nothing to remove where nothing was shaped.
                None => Ok(()),
                Some(_) => Err(e),
            }),
            Some(bps) => {
                let (rate, burst, limit) = tbf_params(bps);
                let tbf = [
                    "replace", "tbf", "rate", &rate, "burst", &burst, "limit", &limit,
                ];
                qdisc(ns, dev, &tbf)
            }
        });
        if let Err(e) = result {
            for (ns, dev) in &self.nodes {
                let _ = qdisc(ns, dev, &["del"]);
            }
            self.rate = None;
            return Err(e);
        }
        self.rate = rate;
        Ok(())
    }
}

/// `tc qdisc <verb> dev <dev> root <rest...>` in namespace `ns`.
fn qdisc(ns: &NetNs, dev: &str, verb_and_rest: &[&str]) -> io::Result<()> {
    let (verb, rest) = verb_and_rest.split_first().expect("a verb");
    let mut args = vec!["netns", "exec", ns.name(), "tc", "qdisc", verb];
    args.extend(["dev", dev, "root"]);
    args.extend(rest);
    run("ip", &args)
}

impl Drop for TbfStar {
    fn drop(&mut self) {
        Teardown(
            std::iter::once(self.hub.name().to_string())
                .chain(self.nodes.iter().map(|(ns, _)| ns.name().to_string()))
                .collect(),
        );
    }
}
