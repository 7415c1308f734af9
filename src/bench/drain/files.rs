//! `ferry bench drain --out DIR`: results.json, results.csv, report.md and
//! the charts of drain time against concurrency, one per link speed.

use super::{link_label, ordered, secs_text, table, DrainCell, DrainMeta};
use crate::bench::charts::{
    draw_line, finish_lines, index_label, register_font, slug, DrawResult, PALETTE, SIZE,
};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Writes `results.json`, `results.csv` and `report.md` directly in `dir`.
pub fn write_outputs(dir: &Path, meta: &DrainMeta, cells: &[DrainCell]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let json = serde_json::json!({ "meta": meta, "cells": cells });
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    std::fs::write(dir.join("results.csv"), csv(cells))?;
    std::fs::write(dir.join("report.md"), report(meta, cells))
}

fn csv(cells: &[DrainCell]) -> String {
    let mut csv = String::from(
        "codec,link_bps,concurrency,repeats,failures,drain_ms_median,drain_ms_min,drain_ms_max,\
         wire_bytes,link_use,vm_total_ms_median,vm_total_ms_max,downtime_ms_median,\
         downtime_ms_max,cpu_ms,peak_cpu_cores,best\n",
    );
    let num = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.3}"));
    for c in cells {
        let _ = writeln!(
            csv,
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{:.1},{:.2},{}",
            c.codec,
            c.link_bps.map_or(String::new(), |b| b.to_string()),
            c.concurrency,
            c.repeats,
            c.failures,
            num(c.drain_ms.map(|s| s.median)),
            num(c.drain_ms.map(|s| s.min)),
            num(c.drain_ms.map(|s| s.max)),
            c.wire_bytes,
            num(c.link_use),
            num(c.vm_total_ms.map(|s| s.median)),
            num(c.vm_total_ms.map(|s| s.max)),
            num(c.downtime_ms.map(|s| s.median)),
            num(c.downtime_ms.map(|s| s.max)),
            c.cpu_ms,
            c.peak_cpu_cores,
            c.best
        );
    }
    csv
}

fn report(meta: &DrainMeta, cells: &[DrainCell]) -> String {
    let mut md = String::from("# ferry drain bench\n\n");
    let _ = writeln!(
        md,
        "{} VMs ({}) drained from one node to two others; the link emulated with `{}`; \
         {} drains per cell; {} cores. Drain time runs from the first migration's start \
         to the last one's end; times are medians, `*` marks the fastest concurrency for \
         each link and codec.\n",
        meta.vms,
        meta.guests.join("; "),
        meta.link,
        meta.repeats,
        meta.cores
    );
    let _ = writeln!(md, "```\n{}```\n", table(cells));
    md.push_str(
        "## Every cell\n\n| link | codec | at once | drain | spread | link use | wire bytes | \
         VM total (median / max) | pause (median / max) | agents' CPU | peak |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for c in cells {
        let spread = c.drain_ms.map_or("-".into(), |s| {
            format!("{:.2}-{:.2} s", s.min / 1000.0, s.max / 1000.0)
        });
        let pair = |s: Option<crate::bench::Spread>, unit_s: bool| {
            s.map_or("-".into(), |s| match unit_s {
                true => format!("{:.2} / {:.2} s", s.median / 1000.0, s.max / 1000.0),
                false => format!("{:.1} / {:.1} ms", s.median, s.max),
            })
        };
        let _ = writeln!(
            md,
            "| {} | {} | {}{} | {} | {} | {} | {} | {} | {} | {:.2} s | {:.2} cores |",
            link_label(c.link_bps),
            c.codec,
            c.concurrency,
            if c.best { " *" } else { "" },
            secs_text(c.drain_ms),
            spread,
            c.link_use
                .map_or("-".into(), |u| format!("{:.0}%", u * 100.0)),
            crate::units::Bytes(c.wire_bytes),
            pair(c.vm_total_ms, true),
            pair(c.downtime_ms, false),
            c.cpu_ms / 1000.0,
            c.peak_cpu_cores
        );
    }
    let mut chose = String::new();
    for c in cells {
        let mut seen: Vec<(u32, &str)> = Vec::new();
        for r in &c.runs {
            if let Some(why) = &r.auto {
                if !seen.contains(&(r.max_concurrent, why)) {
                    seen.push((r.max_concurrent, why));
                }
            }
        }
        for (n, why) in seen {
            let link = link_label(c.link_bps);
            let _ = writeln!(chose, "- {link}, {}: {n} at once: {why}", c.codec);
        }
    }
    if !chose.is_empty() {
        let _ = write!(md, "\n## What `auto` chose\n\n{chose}");
    }
    let failed: Vec<&DrainCell> = cells.iter().filter(|c| c.failures > 0).collect();
    if !failed.is_empty() {
        md.push_str("\n## Failures\n\n");
        for c in failed {
            let _ = writeln!(
                md,
                "- {} at {} at once on {}: {} of {} drains did not move every VM",
                c.codec,
                c.concurrency,
                link_label(c.link_bps),
                c.failures,
                c.failures + c.repeats
            );
        }
    }
    md
}

/// Draws, per link speed, the drain time against migrations at once, a line
/// per codec, as SVG and PNG in `dir`; returns the files written.
pub fn write_charts(dir: &Path, cells: &[DrainCell]) -> DrawResult<Vec<PathBuf>> {
    register_font();
    let mut written = Vec::new();
    for link in ordered(cells.iter().map(|c| c.link_bps)) {
        let of_link: Vec<&DrainCell> = cells.iter().filter(|c| c.link_bps == link).collect();
        let name = format!("drain-time-{}", slug(&link_label(link)));
        let svg = dir.join(format!("{name}.svg"));
        let png = dir.join(format!("{name}.png"));
        drain_time(
            SVGBackend::new(&svg, SIZE).into_drawing_area(),
            link,
            &of_link,
        )?;
        drain_time(
            BitMapBackend::new(&png, SIZE).into_drawing_area(),
            link,
            &of_link,
        )?;
        written.push(svg);
        written.push(png);
    }
    Ok(written)
}

fn drain_time<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    link: Option<u64>,
    cells: &[&DrainCell],
) -> DrawResult<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let levels = ordered(cells.iter().map(|c| c.concurrency.clone()));
    let codecs = ordered(cells.iter().map(|c| c.codec.clone()));
    let secs = |c: &DrainCell| c.drain_ms.map(|s| s.median / 1000.0);
    let hi = cells
        .iter()
        .filter_map(|c| secs(c))
        .fold(0.0, f64::max)
        .max(0.1)
        * 1.2;
    let n = levels.len() as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("drain time by migrations at once: {}", link_label(link)),
            ("sans-serif", 24),
        )
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.5f64..(n - 0.5), 0f64..hi)?;
    chart
        .configure_mesh()
        .x_labels(levels.len())
        .x_label_formatter(&|x| index_label(*x, &levels))
        .x_desc("migrations at once")
        .y_desc("drain time, s")
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 15))
        .draw()?;
    for (k, codec) in codecs.iter().enumerate() {
        let color = PALETTE[k % PALETTE.len()];
        let points: Vec<(f64, f64)> = levels
            .iter()
            .enumerate()
            .filter_map(|(i, l)| {
                let c = cells
                    .iter()
                    .find(|c| &c.codec == codec && &c.concurrency == l)?;
                secs(c).map(|s| (i as f64, s))
            })
            .collect();
        draw_line(&mut chart, points, codec, color)?;
    }
    finish_lines(&mut chart, &root)
}
