//! `ferry bench drain`'s results: each drain's runs summarised per link
//! speed × codec × concurrency, the fastest concurrency of each marked, and
//! the terminal table. The runs themselves happen in the CLI, against agents.

use super::sweep::link_label;
use super::Spread;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;

#[cfg(feature = "net")]
mod files;
#[cfg(feature = "net")]
pub use files::{write_charts, write_outputs};

/// One VM's migration in a drain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmRun {
    /// The VM.
    pub vm: String,
    /// The node it went to (empty when it did not move).
    pub target: String,
    /// Whether it moved.
    pub completed: bool,
    /// Its migration's total time, ms (from its start, queue excluded).
    pub total_ms: f64,
    /// Its pause, ms.
    pub downtime_ms: f64,
    /// Its bytes on the wire.
    pub wire_bytes: u64,
    /// Time from the drain's start until its migration started, ms.
    pub waited_ms: f64,
    /// Time from the drain's start until its migration ended, ms.
    pub ended_ms: f64,
    /// The codec its migration ended on.
    pub codec: String,
    /// Why it did not move.
    pub error: Option<String>,
}

/// One drain of a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DrainRun {
    /// From the first migration's start to the last one's end, ms; `None`
    /// when nothing moved.
    pub drain_ms: Option<f64>,
    /// Whether every VM moved.
    pub completed: bool,
    /// The agents' CPU time over the drain, ms.
    pub cpu_ms: f64,
    /// The agents' busiest quarter second, in cores.
    pub peak_cpu_cores: f64,
    /// Migrations at once the drain ran with (as the node chose, for `auto`).
    pub max_concurrent: u32,
    /// With `auto`: why the node chose it.
    pub auto: Option<String>,
    /// Each VM's migration.
    pub vms: Vec<VmRun>,
}

impl DrainRun {
    /// Wire bytes of every migration of the drain.
    pub fn wire_bytes(&self) -> u64 {
        self.vms.iter().map(|v| v.wire_bytes).sum()
    }
}

/// One link speed × codec × concurrency over its drains. Field names are a
/// contract.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DrainCell {
    /// The codec label as given (`zstd:1`).
    pub codec: String,
    /// The node's outgoing link, bytes/s; null when unlimited.
    pub link_bps: Option<u64>,
    /// Migrations at once, as given (`2`).
    pub concurrency: String,
    /// Drains that moved every VM.
    pub repeats: u32,
    /// Drains that did not.
    pub failures: u32,
    /// Drain time (first start to last end), ms.
    pub drain_ms: Option<Spread>,
    /// Median wire bytes of a whole drain.
    pub wire_bytes: u64,
    /// Median share of the link the drain kept busy: its wire bytes over
    /// drain time × link speed (null when unlimited).
    pub link_use: Option<f64>,
    /// Each VM's total time over every completed drain, ms.
    pub vm_total_ms: Option<Spread>,
    /// Each VM's pause over every completed drain, ms.
    pub downtime_ms: Option<Spread>,
    /// Median CPU time of the agents over a drain, ms.
    pub cpu_ms: f64,
    /// Median of the agents' busiest quarter second, in cores.
    pub peak_cpu_cores: f64,
    /// Fastest completed concurrency for this link speed and codec.
    pub best: bool,
    /// Every drain, each VM's migration in it.
    pub runs: Vec<DrainRun>,
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let v: Vec<f64> = values.collect();
    Spread::of(&v).map_or(0.0, |s| s.median)
}

/// Summarises one cell's drains (pure).
pub fn summarize(
    codec: &str,
    link_bps: Option<u64>,
    concurrency: &str,
    runs: &[DrainRun],
) -> DrainCell {
    let ok: Vec<&DrainRun> = runs
        .iter()
        .filter(|r| r.completed && r.drain_ms.is_some())
        .collect();
    let vms = || ok.iter().flat_map(|r| r.vms.iter());
    let link_use = link_bps.filter(|b| *b > 0).map(|b| {
        median(ok.iter().filter_map(|r| {
            let secs = r.drain_ms? / 1000.0;
            (secs > 0.0).then(|| r.wire_bytes() as f64 / (secs * b as f64))
        }))
    });
    DrainCell {
        codec: codec.to_string(),
        link_bps,
        concurrency: concurrency.to_string(),
        repeats: ok.len() as u32,
        failures: (runs.len() - ok.len()) as u32,
        drain_ms: Spread::of(&ok.iter().filter_map(|r| r.drain_ms).collect::<Vec<_>>()),
        wire_bytes: median(ok.iter().map(|r| r.wire_bytes() as f64)) as u64,
        link_use: link_use.filter(|_| !ok.is_empty()),
        vm_total_ms: Spread::of(&vms().map(|v| v.total_ms).collect::<Vec<_>>()),
        downtime_ms: Spread::of(&vms().map(|v| v.downtime_ms).collect::<Vec<_>>()),
        cpu_ms: median(ok.iter().map(|r| r.cpu_ms)),
        peak_cpu_cores: median(ok.iter().map(|r| r.peak_cpu_cores)),
        best: false,
        runs: runs.to_vec(),
    }
}

/// Marks, for each link speed and codec, the concurrency with the lowest
/// median drain time among those whose every drain completed.
pub fn mark_best(cells: &mut [DrainCell]) {
    for c in cells.iter_mut() {
        c.best = false;
    }
    let mut groups: Vec<(Option<u64>, String)> = cells
        .iter()
        .map(|c| (c.link_bps, c.codec.clone()))
        .collect();
    groups.sort();
    groups.dedup();
    for (link, codec) in groups {
        let best = cells
            .iter()
            .enumerate()
            .filter(|(_, c)| c.link_bps == link && c.codec == codec && c.failures == 0)
            .filter_map(|(i, c)| c.drain_ms.map(|s| (i, s.median)))
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(i, _)| i);
        if let Some(i) = best {
            cells[i].best = true;
        }
    }
}

/// `1.23 s`, or `failed` with no completed drain.
pub fn secs_text(s: Option<Spread>) -> String {
    s.map_or("failed".into(), |s| format!("{:.2} s", s.median / 1000.0))
}

fn ordered<T: PartialEq + Clone>(items: impl Iterator<Item = T>) -> Vec<T> {
    let mut out: Vec<T> = Vec::new();
    for i in items {
        if !out.contains(&i) {
            out.push(i);
        }
    }
    out
}

/// The terminal table: per link speed, codecs down and concurrencies
/// across, the median drain time, `*` on the fastest of each row.
pub fn table(cells: &[DrainCell]) -> String {
    let mut out = String::new();
    let mut links = ordered(cells.iter().map(|c| c.link_bps));
    links.sort_by_key(|l| l.unwrap_or(u64::MAX));
    let codecs = ordered(cells.iter().map(|c| c.codec.clone()));
    let levels = ordered(cells.iter().map(|c| c.concurrency.clone()));
    let width = codecs.iter().map(String::len).max().unwrap_or(0).max(10);
    for link in links {
        let _ = writeln!(
            out,
            "link {}: drain time (median) by migrations at once, * = fastest",
            link_label(link)
        );
        let _ = write!(out, "  {:<width$}", "codec");
        for l in &levels {
            let _ = write!(out, "{:>14}", format!("{l} at once"));
        }
        out.push('\n');
        for codec in &codecs {
            let _ = write!(out, "  {codec:<width$}");
            for l in &levels {
                let cell = cells
                    .iter()
                    .find(|c| c.link_bps == link && &c.codec == codec && &c.concurrency == l);
                let text = cell.map_or("-".into(), |c| {
                    format!(
                        "{}{}",
                        secs_text(c.drain_ms),
                        if c.best { " *" } else { "  " }
                    )
                });
                let _ = write!(out, "{text:>14}");
            }
            out.push('\n');
        }
    }
    out
}

/// What a drain bench ran on, for the files.
#[derive(Debug, Clone, Serialize)]
pub struct DrainMeta {
    /// How the link was emulated (`cap`: the node's own `max_bandwidth`).
    pub link: String,
    /// VMs drained each time.
    pub vms: u32,
    /// Their guests, as created (`512MiB hot:32MiB at 50MB/s`).
    pub guests: Vec<String>,
    /// Requested drains per cell.
    pub repeats: u32,
    /// Cores on this machine.
    pub cores: usize,
    /// When the bench ran (seconds since the Unix epoch).
    pub unix_time: u64,
}

#[cfg(test)]
mod tests;
