//! `ferry bench cycle`'s results: a rolling update's runs (drain, update
//! and failback of every node in turn), their phases' times and wire bytes,
//! summarised over the repeats, and the terminal table.

use super::Spread;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;

/// The phases of a node's turn the cycle measures, in order.
pub const PHASES: [&str; 3] = ["drain", "update", "failback"];

/// One phase of one node's turn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhaseRun {
    /// The node whose turn it was.
    pub node: String,
    /// `drain`, `update` or `failback`.
    pub phase: String,
    /// From its operation's start to its end, ms.
    pub ms: f64,
    /// Wire bytes of its migrations.
    pub wire_bytes: u64,
    /// Its migrations that completed.
    pub migrations: u32,
    /// The longest pause of its migrations, ms.
    pub downtime_ms_max: f64,
    /// Its migrations that went by delta (the target kept their image).
    #[serde(default)]
    pub by_delta: u32,
}

/// One rolling update of the whole cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CycleRun {
    /// From the run's start to its end, ms.
    pub total_ms: f64,
    /// Whether every node's turn completed and every VM came back.
    pub completed: bool,
    /// Why not.
    pub error: Option<String>,
    /// Every phase of every turn, in order.
    pub phases: Vec<PhaseRun>,
}

impl CycleRun {
    /// Wire bytes of the whole run.
    pub fn wire_bytes(&self) -> u64 {
        self.phases.iter().map(|p| p.wire_bytes).sum()
    }

    /// Time and wire bytes of `phase` over every node's turn.
    pub fn of_phase(&self, phase: &str) -> (f64, u64) {
        let of = self.phases.iter().filter(|p| p.phase == phase);
        (
            of.clone().map(|p| p.ms).sum(),
            of.map(|p| p.wire_bytes).sum(),
        )
    }
}

/// One phase over every node's turn, over the completed runs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PhaseSummary {
    /// `drain`, `update` or `failback`.
    pub phase: String,
    /// Its time summed over the nodes' turns, ms.
    pub ms: Option<Spread>,
    /// Median wire bytes summed over the nodes' turns.
    pub wire_bytes: u64,
}

/// The cycle over its repeats. Field names are a contract.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CycleSummary {
    /// Runs that completed.
    pub repeats: u32,
    /// Runs that did not.
    pub failures: u32,
    /// The whole run, ms.
    pub total_ms: Option<Spread>,
    /// Median wire bytes of a whole run.
    pub wire_bytes: u64,
    /// Each phase.
    pub phases: Vec<PhaseSummary>,
    /// Time of a run in none of the phases (the coordinator's steps
    /// between them), median ms.
    pub between_ms: f64,
    /// The longest pause of any migration of any completed run, ms.
    pub downtime_ms_max: f64,
    /// Migrations by delta in a run, median.
    pub by_delta: u32,
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let v: Vec<f64> = values.collect();
    Spread::of(&v).map_or(0.0, |s| s.median)
}

/// Summarises the runs (pure).
pub fn summarize(runs: &[CycleRun]) -> CycleSummary {
    let ok: Vec<&CycleRun> = runs.iter().filter(|r| r.completed).collect();
    let phases = PHASES
        .iter()
        .map(|&phase| PhaseSummary {
            phase: phase.to_string(),
            ms: Spread::of(&ok.iter().map(|r| r.of_phase(phase).0).collect::<Vec<_>>()),
            wire_bytes: median(ok.iter().map(|r| r.of_phase(phase).1 as f64)) as u64,
        })
        .collect();
    let in_phases = |r: &CycleRun| r.phases.iter().map(|p| p.ms).sum::<f64>();
    CycleSummary {
        repeats: ok.len() as u32,
        failures: (runs.len() - ok.len()) as u32,
        total_ms: Spread::of(&ok.iter().map(|r| r.total_ms).collect::<Vec<_>>()),
        wire_bytes: median(ok.iter().map(|r| r.wire_bytes() as f64)) as u64,
        phases,
        between_ms: median(ok.iter().map(|r| (r.total_ms - in_phases(r)).max(0.0))),
        downtime_ms_max: ok
            .iter()
            .flat_map(|r| r.phases.iter().map(|p| p.downtime_ms_max))
            .fold(0.0, f64::max),
        by_delta: median(
            ok.iter()
                .map(|r| r.phases.iter().map(|p| f64::from(p.by_delta)).sum()),
        ) as u32,
    }
}

fn secs(s: Option<Spread>) -> String {
    s.map_or("-".into(), |s| {
        format!(
            "{:.2} s ({:.2}-{:.2})",
            s.median / 1000.0,
            s.min / 1000.0,
            s.max / 1000.0
        )
    })
}

/// The terminal table: the whole cycle, then each phase over every node's
/// turn, medians with their spread.
pub fn table(s: &CycleSummary) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "rolling update of the cluster: {} of {} runs completed",
        s.repeats,
        s.repeats + s.failures
    );
    let _ = writeln!(
        out,
        "  {:<10}{:>26}{:>14}",
        "phase", "time (median, spread)", "wire bytes"
    );
    for p in &s.phases {
        let _ = writeln!(
            out,
            "  {:<10}{:>26}{:>14}",
            p.phase,
            secs(p.ms),
            crate::units::Bytes(p.wire_bytes).to_string()
        );
    }
    let between = format!("{:.2} s", s.between_ms / 1000.0);
    let _ = writeln!(out, "  {:<10}{:>26}{:>14}", "between", between, "-");
    let _ = writeln!(
        out,
        "  {:<10}{:>26}{:>14}",
        "total",
        secs(s.total_ms),
        crate::units::Bytes(s.wire_bytes).to_string()
    );
    let _ = writeln!(out, "  longest pause: {:.1} ms", s.downtime_ms_max);
    let _ = writeln!(out, "  migrations by delta per run: {}", s.by_delta);
    out
}

/// What a cycle bench ran on, for the files.
#[derive(Debug, Clone, Serialize)]
pub struct CycleMeta {
    /// VMs per node.
    pub vms_per_node: u32,
    /// Their guests, as created.
    pub guests: Vec<String>,
    /// Each node's outgoing link, bytes/s; null when unlimited.
    pub link_bps: Option<u64>,
    /// How the links were emulated: `cap` (each node's `max_bandwidth`, on
    /// loopback) or `tbf` (a namespace per node, its side kernel-shaped).
    pub link: String,
    /// The nodes' codec.
    pub codec: String,
    /// Each node's migrations at once (with `auto`, the most its queue may
    /// choose).
    pub max_concurrent: u32,
    /// Whether each node's queue chose (`max_concurrent_migrations = "auto"`).
    #[serde(default)]
    pub max_concurrent_auto: bool,
    /// Whether failbacks went by delta (`--delta`).
    pub delta: bool,
    /// Whether migrations sent dense pages (`--dense`).
    pub dense: bool,
    /// Each node's `failback_retention`, bytes.
    pub retention_bytes: u64,
    /// How long each update took (its command slept), ms; 0: a no-op.
    #[serde(default)]
    pub update_ms: u64,
    /// Requested runs.
    pub repeats: u32,
    /// Cores on this machine.
    pub cores: usize,
    /// When the bench ran (seconds since the Unix epoch).
    pub unix_time: u64,
}

/// Writes `results.json` (the meta, the summary and every run) and
/// `report.md` directly in `dir`.
pub fn write_outputs(
    dir: &std::path::Path,
    meta: &CycleMeta,
    summary: &CycleSummary,
    runs: &[CycleRun],
) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let json = serde_json::json!({ "meta": meta, "summary": summary, "runs": runs });
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    let mut md = String::from("# ferry maintenance-cycle bench\n\n");
    let _ = writeln!(
        md,
        "A rolling update of three nodes with {} VMs each ({}): each node in turn drained, \
         updated ({}) and resumed with failback. Links: {} per node ({}); codec {}; \
         {} migrations at once per node; failback by delta {} (retention {}); dense pages {}; {} runs; \
         {} cores.\n",
        meta.vms_per_node,
        meta.guests.join("; "),
        if meta.update_ms == 0 {
            "a no-op command".to_string()
        } else {
            format!("a command of {:.1} s", meta.update_ms as f64 / 1000.0)
        },
        super::sweep::link_label(meta.link_bps),
        meta.link,
        meta.codec,
        if meta.max_concurrent_auto {
            "auto (chosen by each node)".to_string()
        } else {
            meta.max_concurrent.to_string()
        },
        if meta.delta { "on" } else { "off" },
        crate::units::Bytes(meta.retention_bytes),
        if meta.dense { "on" } else { "off" },
        meta.repeats,
        meta.cores
    );
    let _ = writeln!(md, "```\n{}```\n", table(summary));
    md.push_str("## Every turn of the last run\n\n| node | phase | time | wire bytes | migrations | longest pause |\n|---|---|---|---|---|---|\n");
    for p in runs.last().map_or(&[][..], |r| &r.phases[..]) {
        let _ = writeln!(
            md,
            "| {} | {} | {:.2} s | {} | {} | {:.1} ms |",
            p.node,
            p.phase,
            p.ms / 1000.0,
            crate::units::Bytes(p.wire_bytes),
            p.migrations,
            p.downtime_ms_max
        );
    }
    std::fs::write(dir.join("report.md"), md)
}

#[cfg(test)]
mod tests;
