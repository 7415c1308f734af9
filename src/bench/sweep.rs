//! The compression-versus-bandwidth sweep: real migrations over a grid of
//! codecs × link speeds × guests, summarised per cell (median and spread over
//! repeats), with the winner of each link speed and guest marked.
//!
//! The grid's bookkeeping (summaries, winners, the files written) is pure and
//! tested on its own; [`run_cell`] does the migrating.

use super::Spread;
use crate::codec::CodecChoice;
use crate::memory::{ContentKind, FillSpec, WorkloadPattern};
use crate::migration::{CompressedBy, MigratableGuest, Outcome, Report};
use crate::wire::GuestKind;
use serde::Serialize;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One guest of the grid.
#[derive(Debug, Clone, PartialEq)]
pub struct GuestSpec {
    /// A short label for tables and files (`idle-mix`, `hot-64MiB`).
    pub label: String,
    /// Memory size (ignored with an image).
    pub memory: u64,
    /// Initial content.
    pub fill: FillSpec,
    /// A RAM image instead of `fill`.
    pub image: Option<PathBuf>,
    /// Write pattern.
    pub workload: WorkloadPattern,
    /// Bytes written per second.
    pub dirty_rate: u64,
    /// The backend: ferry's synthetic guest or a KVM guest.
    pub kind: GuestKind,
}

impl GuestSpec {
    /// Builds the guest, running its workload.
    pub fn build(&self, seed: u64) -> Result<Arc<dyn MigratableGuest>, String> {
        use crate::memory::{GuestMemory, Workload};
        let memory = match &self.image {
            Some(path) => GuestMemory::from_image(path).map_err(|e| e.to_string())?,
            None => {
                let m = GuestMemory::new(self.memory).map_err(|e| e.to_string())?;
                self.fill.fill(&m, seed, 2);
                m
            }
        };
        let workload = Workload {
            pattern: self.workload,
            dirty_rate: self.dirty_rate,
            content: self.fill.clone(),
            writers: 1,
            seed,
        };
        crate::migration::start_guest(self.kind, Arc::new(memory), workload)
    }

    /// The same guest on another backend, labelled `kvm-…` for KVM.
    pub fn on(mut self, kind: GuestKind) -> Self {
        if kind == GuestKind::Kvm && self.kind != GuestKind::Kvm {
            self.label = format!("kvm-{}", self.label);
        }
        self.kind = kind;
        self
    }

    /// The standard set: an idle realistic mix, a busy hot set, and
    /// incompressible data, each of `memory` bytes.
    pub fn standard_set(memory: u64) -> Vec<GuestSpec> {
        let hot = (memory / 8).max(4096) & !4095;
        vec![
            GuestSpec {
                label: "idle-mix".into(),
                memory,
                fill: FillSpec::default(),
                image: None,
                workload: WorkloadPattern::Idle,
                dirty_rate: 0,
                kind: GuestKind::Sim,
            },
            GuestSpec {
                label: format!("hot-{}", crate::units::compact_size(hot)),
                memory,
                fill: FillSpec::default(),
                image: None,
                workload: WorkloadPattern::Hot { bytes: hot },
                dirty_rate: 50_000_000,
                kind: GuestKind::Sim,
            },
            GuestSpec {
                label: "random".into(),
                memory,
                fill: FillSpec::only(ContentKind::Random),
                image: None,
                workload: WorkloadPattern::Idle,
                dirty_rate: 0,
                kind: GuestKind::Sim,
            },
        ]
    }

    /// The changing set: one idle guest whose memory runs through four
    /// differently compressible parts in turn (text-heavy, incompressible,
    /// binary, the realistic mix), so the page mix changes as the migration
    /// walks memory.
    pub fn changing_set(memory: u64) -> Vec<GuestSpec> {
        vec![GuestSpec {
            label: "changing".into(),
            memory,
            fill: CHANGING_FILL.parse().expect("valid fill"),
            image: None,
            workload: WorkloadPattern::Idle,
            dirty_rate: 0,
            kind: GuestKind::Sim,
        }]
    }
}

/// The changing guest's memory, part by part.
pub const CHANGING_FILL: &str =
    "zero:10,text:90|random|binary:80,zero:20|zero:35,text:30,binary:20,random:15";

/// What the grid is made of.
#[derive(Debug, Clone)]
pub struct SweepPlan {
    /// Codecs (or `auto`), with the label the user gave.
    pub codecs: Vec<(String, CodecChoice)>,
    /// Link speeds in bytes/s; `None` is unlimited.
    pub links: Vec<Option<u64>>,
    /// Guests.
    pub guests: Vec<GuestSpec>,
    /// Migrations per cell.
    pub repeats: u32,
    /// TCP channels per migration.
    pub channels: u16,
    /// Whether migrations run plain (`false`), over TLS (`true`), or both.
    pub tls: Vec<bool>,
    /// Whether migrations send dense pages (`true`), not (`false`), or both.
    pub dense: Vec<bool>,
}

impl SweepPlan {
    /// Migrations the whole grid runs.
    pub fn runs(&self) -> u64 {
        let cells = self.links.len() * self.guests.len() * self.options().count();
        cells as u64 * u64::from(self.repeats)
    }

    /// Each link's and guest's options, in order: path (TLS or not), dense
    /// pages or not, codec.
    pub fn options(&self) -> impl Iterator<Item = (bool, bool, &(String, CodecChoice))> + '_ {
        self.tls.iter().flat_map(move |&t| {
            self.dense
                .iter()
                .flat_map(move |&d| self.codecs.iter().map(move |c| (t, d, c)))
        })
    }
}

/// CPU medians of a cell.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CellCpu {
    /// Source side, ms.
    pub source: f64,
    /// Destination side, ms.
    pub destination: f64,
}

/// One codec × link × guest, over its repeats. Field names are a contract.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Cell {
    /// The codec label as given (`zstd:1`).
    pub codec: String,
    /// Link speed, bytes/s; null when unlimited.
    pub link_bps: Option<u64>,
    /// The guest's label.
    pub guest: String,
    /// Migrations that completed (failed ones are counted in `failures`).
    pub repeats: u32,
    /// Migrations that did not complete.
    pub failures: u32,
    /// Total time, ms.
    pub total_ms: Option<Spread>,
    /// Downtime, ms.
    pub downtime_ms: Option<Spread>,
    /// Median wire bytes.
    pub wire_bytes: u64,
    /// Median pages sent as references (dense pages).
    pub pages_referenced: u64,
    /// Pages sent (zero pages included) by the run of median total time.
    pub pages_total: u64,
    /// Pages compressed by each codec in that same run: under `auto`, what
    /// it chose. (Medians taken codec by codec need not add up to any run.)
    pub pages_compressed_by: CompressedBy,
    /// Median compression ratio.
    pub compression_ratio: f64,
    /// Median guest throughput, bytes/s.
    pub throughput_guest_bps: f64,
    /// Median wire throughput, bytes/s.
    pub throughput_wire_bps: f64,
    /// Median pre-copy rounds.
    pub rounds: f64,
    /// Median CPU time of each side.
    pub cpu_ms: CellCpu,
    /// Fastest completed codec for this link speed and guest (and path:
    /// plain or TLS).
    pub winner: bool,
    /// Whether the migrations ran over TLS.
    pub tls: bool,
    /// Whether they sent dense pages.
    pub dense: bool,
}

impl Cell {
    /// The same cell, run over TLS when `tls`.
    pub fn over_tls(self, tls: bool) -> Self {
        Self { tls, ..self }
    }

    /// The same cell, with dense pages when `dense`.
    pub fn with_dense(self, dense: bool) -> Self {
        Self { dense, ..self }
    }

    /// Its row in tables and charts: the codec, marked `-dense` without
    /// dense pages and `+tls` over TLS.
    pub fn row(&self) -> String {
        let dense = if self.dense { "" } else { "-dense" };
        let tls = if self.tls { "+tls" } else { "" };
        format!("{}{dense}{tls}", self.codec)
    }
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let v: Vec<f64> = values.collect();
    Spread::of(&v).map_or(0.0, |s| s.median)
}

/// Summarises one cell's reports (pure).
pub fn summarize(codec: &str, link_bps: Option<u64>, guest: &str, reports: &[Report]) -> Cell {
    let ok: Vec<&Report> = reports
        .iter()
        .filter(|r| r.outcome == Outcome::Completed)
        .collect();
    let of = |f: fn(&Report) -> f64| median(ok.iter().map(|r| f(r)));
    let mut by_time = ok.clone();
    by_time.sort_by(|a, b| a.total_ms.total_cmp(&b.total_ms));
    let middle = by_time.get(by_time.len() / 2).copied();
    Cell {
        codec: codec.to_string(),
        link_bps,
        guest: guest.to_string(),
        repeats: ok.len() as u32,
        failures: (reports.len() - ok.len()) as u32,
        total_ms: Spread::of(&ok.iter().map(|r| r.total_ms).collect::<Vec<_>>()),
        downtime_ms: Spread::of(&ok.iter().map(|r| r.downtime_ms).collect::<Vec<_>>()),
        wire_bytes: of(|r| r.wire_bytes as f64) as u64,
        pages_referenced: of(|r| r.pages.referenced as f64) as u64,
        pages_total: middle.map_or(0, |r| r.pages.total),
        pages_compressed_by: middle.map_or_else(Default::default, |r| r.pages.compressed_by),
        compression_ratio: of(|r| r.compression_ratio),
        throughput_guest_bps: of(|r| r.throughput_guest_bps),
        throughput_wire_bps: of(|r| r.throughput_wire_bps),
        rounds: of(|r| f64::from(r.rounds)),
        cpu_ms: CellCpu {
            source: of(|r| r.cpu_ms.source.unwrap_or(0.0)),
            destination: of(|r| r.cpu_ms.destination.unwrap_or(0.0)),
        },
        winner: false,
        tls: false,
        dense: true,
    }
}

/// Marks, for each link speed, guest and path (plain or TLS), the cell with
/// the lowest median total time among those that completed every repeat
/// (ties: lower downtime).
pub fn mark_winners(cells: &mut [Cell]) {
    for c in cells.iter_mut() {
        c.winner = false;
    }
    let mut groups: Vec<(Option<u64>, String, bool)> = cells
        .iter()
        .map(|c| (c.link_bps, c.guest.clone(), c.tls))
        .collect();
    groups.sort();
    groups.dedup();
    for (link, guest, tls) in groups {
        let key = |c: &Cell| {
            (
                c.total_ms.map_or(f64::INFINITY, |s| s.median),
                c.downtime_ms.map_or(f64::INFINITY, |s| s.median),
            )
        };
        let best = cells
            .iter()
            .enumerate()
            .filter(|(_, c)| {
                let done = c.failures == 0 && c.total_ms.is_some();
                c.link_bps == link && c.guest == guest && c.tls == tls && done
            })
            .min_by(|(_, a), (_, b)| {
                key(a)
                    .partial_cmp(&key(b))
                    .unwrap_or(std::cmp::Ordering::Equal)
            })
            .map(|(i, _)| i);
        if let Some(i) = best {
            cells[i].winner = true;
        }
    }
}

/// A link speed as a label: `unlimited`, `1Gbit/s`, `12.5 MB/s`.
pub fn link_label(bps: Option<u64>) -> String {
    match bps {
        None => "unlimited".into(),
        Some(b) if (b * 8) % 1_000_000_000 == 0 => format!("{}Gbit/s", b * 8 / 1_000_000_000),
        Some(b) if (b * 8) % 1_000_000 == 0 => format!("{}Mbit/s", b * 8 / 1_000_000),
        Some(b) => crate::units::Rate(b as f64).to_string(),
    }
}

fn ms_text(s: Option<Spread>) -> String {
    s.map_or("failed".into(), |s| {
        if s.median >= 1000.0 {
            format!("{:.2} s", s.median / 1000.0)
        } else {
            format!("{:.0} ms", s.median)
        }
    })
}

/// The terminal table: per guest, codecs down and link speeds across, total
/// time (median) with the winner of each column starred.
pub fn table(cells: &[Cell]) -> String {
    let mut out = String::new();
    let mut guests: Vec<&str> = cells.iter().map(|c| c.guest.as_str()).collect();
    guests.dedup();
    let mut links: Vec<Option<u64>> = cells.iter().map(|c| c.link_bps).collect();
    links.sort_by_key(|l| l.unwrap_or(u64::MAX));
    links.dedup();
    let mut rows: Vec<String> = cells.iter().map(Cell::row).collect();
    let mut seen = std::collections::HashSet::new();
    rows.retain(|r| seen.insert(r.clone()));
    let width = rows.iter().map(String::len).max().unwrap_or(0).max(10);
    let mut seen_guests = std::collections::HashSet::new();
    guests.retain(|g| seen_guests.insert(*g));
    for guest in guests {
        let _ = writeln!(
            out,
            "guest {guest}: total time (median), * = fastest for the link"
        );
        let _ = write!(out, "  {:<width$}", "codec");
        for l in &links {
            let _ = write!(out, "{:>16}", link_label(*l));
        }
        out.push('\n');
        for row in &rows {
            let _ = write!(out, "  {row:<width$}");
            for l in &links {
                let cell = cells
                    .iter()
                    .find(|c| c.guest == guest && c.row() == *row && c.link_bps == *l);
                let text = cell.map_or("-".into(), |c| {
                    format!(
                        "{}{}",
                        ms_text(c.total_ms),
                        if c.winner { " *" } else { "  " }
                    )
                });
                let _ = write!(out, "{text:>16}");
            }
            out.push('\n');
        }
    }
    out
}

/// What a sweep ran on, for the files.
#[derive(Debug, Clone, Serialize)]
pub struct SweepMeta {
    /// How links were emulated (`cap`: ferry's own bandwidth cap).
    pub link: String,
    /// TCP channels per migration.
    pub channels: u16,
    /// Requested repeats per cell.
    pub repeats: u32,
    /// The path: `off` (plain TCP), `on` (TLS), or `both`.
    pub tls: String,
    /// Dense pages: `on`, `off`, or `both`.
    pub dense: String,
    /// Cores on this machine.
    pub cores: usize,
    /// When the sweep ran (seconds since the Unix epoch).
    pub unix_time: u64,
}

/// Writes `results.json`, `results.csv` and `report.md` directly in `dir`.
pub fn write_outputs(dir: &Path, meta: &SweepMeta, cells: &[Cell]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let json = serde_json::json!({ "meta": meta, "cells": cells });
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(&json)?,
    )?;

    let mut csv = String::from(
        "codec,link_bps,guest,repeats,failures,total_ms_median,total_ms_min,total_ms_max,\
         downtime_ms_median,downtime_ms_min,downtime_ms_max,wire_bytes,compression_ratio,\
         throughput_guest_bps,cpu_ms_source,cpu_ms_destination,winner,tls,dense,\
         pages_total,pages_lz4,pages_zstd,pages_zstd_stream\n",
    );
    let num = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.3}"));
    for c in cells {
        let _ = writeln!(
            csv,
            "{},{},{},{},{},{},{},{},{},{},{},{},{:.3},{:.0},{:.1},{:.1},{},{},{},{},{},{},{}",
            c.codec,
            c.link_bps.map_or(String::new(), |b| b.to_string()),
            c.guest,
            c.repeats,
            c.failures,
            num(c.total_ms.map(|s| s.median)),
            num(c.total_ms.map(|s| s.min)),
            num(c.total_ms.map(|s| s.max)),
            num(c.downtime_ms.map(|s| s.median)),
            num(c.downtime_ms.map(|s| s.min)),
            num(c.downtime_ms.map(|s| s.max)),
            c.wire_bytes,
            c.compression_ratio,
            c.throughput_guest_bps,
            c.cpu_ms.source,
            c.cpu_ms.destination,
            c.winner,
            c.tls,
            c.dense,
            c.pages_total,
            c.pages_compressed_by.lz4,
            c.pages_compressed_by.zstd,
            c.pages_compressed_by.zstd_stream
        );
    }
    std::fs::write(dir.join("results.csv"), csv)?;

    let mut md = String::from("# ferry compression-versus-bandwidth sweep\n\n");
    let _ = writeln!(
        md,
        "Links emulated with ferry's `{}`; {} channels; TLS {}; dense pages {}; {} repeats per \
         cell; {} cores. Times are medians; `*` marks the fastest codec for each link and guest \
         (plain and TLS apart; `+tls` rows ran over TLS, `-dense` rows without dense pages).\n",
        meta.link, meta.channels, meta.tls, meta.dense, meta.repeats, meta.cores
    );
    let _ = writeln!(md, "```\n{}```\n", table(cells));
    md.push_str("## Winners\n\n| guest | link | codec | total | downtime | wire bytes | ratio | CPU source / destination |\n|---|---|---|---|---|---|---|---|\n");
    for c in cells.iter().filter(|c| c.winner) {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {:.2} | {:.0} / {:.0} ms |",
            c.guest,
            link_label(c.link_bps),
            c.row(),
            ms_text(c.total_ms),
            c.downtime_ms
                .map_or("-".into(), |s| format!("{:.1} ms", s.median)),
            crate::units::Bytes(c.wire_bytes),
            c.compression_ratio,
            c.cpu_ms.source,
            c.cpu_ms.destination
        );
    }
    md.push_str(&auto_chose(cells));
    let failed: Vec<&Cell> = cells.iter().filter(|c| c.failures > 0).collect();
    if !failed.is_empty() {
        md.push_str("\n## Failures\n\n");
        for c in failed {
            let _ = writeln!(
                md,
                "- {} on {} for {}: {} of {} runs failed",
                c.row(),
                link_label(c.link_bps),
                c.guest,
                c.failures,
                c.failures + c.repeats
            );
        }
    }
    std::fs::write(dir.join("report.md"), md)
}

/// `report.md`'s table of what `auto` chose in each of its cells: the
/// share of pages each codec compressed (the rest went zero, raw or as
/// references). Empty without `auto` cells.
fn auto_chose(cells: &[Cell]) -> String {
    let auto: Vec<&Cell> = cells
        .iter()
        .filter(|c| c.codec == "auto" && c.repeats > 0)
        .collect();
    if auto.is_empty() {
        return String::new();
    }
    let mut md = String::from(
        "\n## What auto chose\n\nShare of the pages sent that each codec compressed, in the run of median time.\n\n\
         | guest | link | row | lz4 | zstd | zstd-stream | not compressed |\n|---|---|---|---|---|---|---|\n",
    );
    for c in auto {
        let by = c.pages_compressed_by;
        let pct = |n: u64| 100.0 * n as f64 / c.pages_total.max(1) as f64;
        let rest = c
            .pages_total
            .saturating_sub(by.lz4 + by.zstd + by.zstd_stream);
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.0} % | {:.0} % | {:.0} % | {:.0} % |",
            c.guest,
            link_label(c.link_bps),
            c.row(),
            pct(by.lz4),
            pct(by.zstd),
            pct(by.zstd_stream),
            pct(rest)
        );
    }
    md
}

/// How a sweep's migrations run: channels, repeats, where the two ends meet,
/// and who enforces the link speed.
#[cfg(feature = "net")]
#[derive(Debug, Clone)]
pub struct CellEnv {
    /// TCP channels per migration.
    pub channels: u16,
    /// Migrations per cell.
    pub repeats: u32,
    /// Loopback, or the namespaces of a tbf link.
    pub path: crate::transport::LocalPath,
    /// `true`: the kernel shapes the link (tbf) and ferry runs uncapped;
    /// `false`: the link speed is ferry's own bandwidth cap.
    pub kernel_shaped: bool,
    /// Cancels the running migration and the rest of the cell.
    pub cancel: tokio_util::sync::CancellationToken,
    /// Over TLS (an ephemeral certificate, the key proved over each
    /// channel's binding, as agents migrate), or plain TCP.
    pub tls: bool,
    /// Dense pages (`MigrationConfig::dense`).
    pub dense: bool,
}

#[cfg(feature = "net")]
impl CellEnv {
    /// Loopback with ferry's cap as the link.
    pub fn loopback(channels: u16, repeats: u32) -> Self {
        Self {
            channels,
            repeats,
            path: Default::default(),
            kernel_shaped: false,
            cancel: Default::default(),
            tls: false,
            dense: true,
        }
    }
}

/// Runs one cell's migrations in this process, over `env`'s path. With ferry's
/// cap as the link, `link_bps` is the migration's `max_bandwidth`; on a
/// kernel-shaped link the caller has set the link to `link_bps` already.
/// `guest` is reused across repeats: it is resumed before each and left paused
/// by each (the destination's copy is dropped). A migration that fails is a
/// report like any other; an error here means the pair itself could not be set
/// up (no runtime, no socket). A cancelled cell stops early with the reports so far.
#[cfg(feature = "net")]
pub fn run_cell(
    guest: &Arc<dyn MigratableGuest>,
    codec: CodecChoice,
    link_bps: Option<u64>,
    env: &CellEnv,
    mut after_each: impl FnMut(),
) -> std::io::Result<Vec<Report>> {
    use crate::migration::MigrationConfig;
    use crate::transport::{migrate_locally, ReceiverConfig, RunContext};
    // Both ends are ours: they prove a one-off key, as agents do.
    let key = crate::migration::auth::SessionKey::random();
    let config = MigrationConfig {
        codec,
        channels: env.channels,
        max_bandwidth: if env.kernel_shaped { None } else { link_bps },
        leave_paused: true,
        session_key: Some(key.clone()),
        dense: env.dense,
        ..MigrationConfig::default()
    };
    let tls = match env.tls {
        true => Some(crate::transport::tls::TlsServer::ephemeral().map_err(std::io::Error::other)?),
        false => None,
    };
    let mut reports = Vec::new();
    for _ in 0..env.repeats {
        if env.cancel.is_cancelled() {
            break;
        }
        guest.resume();
        // Let a busy workload reach its steady state.
        if guest
            .workload()
            .is_some_and(|w| w.pattern != WorkloadPattern::Idle)
        {
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        let ctx = RunContext {
            cancel: env.cancel.child_token(),
            tls: env.tls.then(crate::transport::tls::TlsClient::bound_to_key),
            ..RunContext::default()
        };
        let (report, _incoming) = migrate_locally(
            guest.clone(),
            &config,
            ctx,
            ReceiverConfig {
                key: Some(key.clone()),
                tls: tls.clone(),
                ..ReceiverConfig::default()
            },
            &env.path,
        )?;
        if report.outcome != Outcome::Completed {
            // A failed run leaves the guest running on the source.
            guest.pause();
        } else if report.encrypted != env.tls {
            let e = format!(
                "asked for TLS {}, migrated with {}",
                env.tls, report.encrypted
            );
            return Err(std::io::Error::other(e));
        }
        after_each();
        reports.push(report);
    }
    Ok(reports)
}

#[cfg(test)]
mod tests;
