//! `ferry bench link|codecs|kvm|sweep`: the engine's measurements from
//! the command line.

use super::args::{CodecsArgs, GuestBackend, KvmBenchArgs, LinkArgs, SweepArgs};
use crate::{build_memory, cancel_on_signals, check_kvm, content_of, usage, workload_for};
use anyhow::{Context, Result};
use ferry::codec::Codec;
use ferry::cpu::CpuMeter;
use ferry::units::{compact_size, Bytes, Rate};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::process::ExitCode;
use std::sync::Arc;

pub(crate) fn bench_link(a: LinkArgs) -> Result<ExitCode> {
    let rt = ferry::transport::runtime("ferry-bench", 2, &CpuMeter::new())?;
    let cancel = tokio_util::sync::CancellationToken::new();
    if a.bandwidth.is_some() && a.link != "tbf" {
        return Err(usage(
            "--bandwidth shapes a --link tbf; loopback and --to measure the path as it is",
        ));
    }
    if let Some(listen) = &a.listen {
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(listen))
            .with_context(|| format!("cannot listen on {listen}"))?;
        eprintln!(
            "link sink listening on {}; Ctrl-C to stop",
            listener.local_addr()?
        );
        let stop = cancel.clone();
        rt.spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            stop.cancel();
        });
        rt.block_on(ferry::bench::serve_link_sink(listener, cancel));
        return Ok(ExitCode::SUCCESS);
    }
    // With --link tbf: the sink runs in the destination's namespace, the
    // client (`rt`, rebuilt) in the source's; `_tbf` tears them down at the end.
    let (mut rt, mut _sink_rt, mut _tbf) = (rt, None, None);
    let (addr, path) = match &a.to {
        Some(to) => (to.clone(), to.clone()),
        None if a.link == "tbf" => {
            let rate = match a.bandwidth.as_ref().map(|l| &l.0[..]) {
                None => None,
                Some(&[rate]) => rate,
                Some(_) => return Err(usage("--link tbf takes one --bandwidth")),
            };
            ferry::transport::netns::tbf_available().map_err(usage)?;
            let mut link = ferry::transport::netns::TbfLink::new()
                .context("setting up the tbf link (network namespaces, veth, tc)")?;
            link.set_rate(rate).context("shaping the tbf link")?;
            let cpu = CpuMeter::new();
            let sink_rt = ferry::transport::runtime_in(
                "ferry-sink",
                2,
                &cpu,
                Some(link.destination().clone()),
            )?;
            rt = ferry::transport::runtime_in("ferry-bench", 2, &cpu, Some(link.source().clone()))?;
            let listen = link.listen_addr();
            let listener = sink_rt.block_on(
                sink_rt.spawn(async move { tokio::net::TcpListener::bind(listen).await }),
            )??;
            let addr = listener.local_addr()?.to_string();
            sink_rt.spawn(ferry::bench::serve_link_sink(listener, cancel.clone()));
            _sink_rt = Some(sink_rt);
            _tbf = Some(link);
            (
                addr,
                format!("tbf {}", ferry::bench::sweep::link_label(rate)),
            )
        }
        None => {
            let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
            let addr = listener.local_addr()?.to_string();
            rt.spawn(ferry::bench::serve_link_sink(listener, cancel.clone()));
            (addr, "loopback".to_string())
        }
    };
    let mut runs = Vec::new();
    for i in 0..a.repeats {
        // On a runtime thread: with --link tbf that is inside the source's namespace.
        let (to, channels, bytes) = (addr.clone(), a.channels, a.bytes);
        let r = rt
            .block_on(rt.spawn(async move { ferry::bench::link_once(&to, channels, bytes).await }))?
            .with_context(|| format!("link run {} to {addr}", i + 1))?;
        runs.push(r);
    }
    cancel.cancel();
    let bps = ferry::bench::Spread::of(&runs.iter().map(|r| r.bps).collect::<Vec<_>>())
        .expect("at least one run");
    if a.json {
        let out = serde_json::json!({
            "path": path,
            "channels": a.channels,
            "bytes": runs[0].bytes,
            "repeats": a.repeats,
            "bps": bps,
            "runs": runs,
        });
        println!("{out}");
    } else {
        println!(
            "link {path}: {} channels, {} per run, {} runs",
            a.channels,
            Bytes(runs[0].bytes),
            a.repeats
        );
        println!(
            "  throughput  {} median ({} to {})",
            Rate(bps.median),
            Rate(bps.min),
            Rate(bps.max)
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn bench_codecs(a: CodecsArgs) -> Result<ExitCode> {
    let (mem, _) = build_memory(&a.mem, !a.json)?;
    let codecs: Vec<Codec> = a.codecs.0.iter().map(|c| c.1).collect();
    let results = ferry::bench::measure_codecs(&mem, &codecs, a.batch_pages, a.sample);
    let sampled = results.first().map_or(0, |r| r.guest_bytes);
    let dense = a
        .dense
        .then(|| ferry::bench::dense::measure_dense(&mem, &codecs, a.batch_pages, a.sample));
    if a.json {
        let out = serde_json::json!({
            "memory_bytes": mem.len_bytes(),
            "sampled_bytes": sampled,
            "batch_pages": a.batch_pages,
            "codecs": results,
            "dense": dense,
        });
        println!("{out}");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "codecs on {} of guest memory ({}): {} sampled in {}-page batches, one core",
        Bytes(mem.len_bytes()),
        content_of(&a.mem),
        Bytes(sampled),
        a.batch_pages
    );
    println!(
        "  {:<13} {:>7} {:>14} {:>14} {:>11}",
        "codec", "ratio", "encode/core", "decode/core", "zero pages"
    );
    for r in &results {
        println!(
            "  {:<13} {:>7.2} {:>14} {:>14} {:>10.1}%",
            r.codec,
            r.ratio,
            Rate(r.encode_bps).to_string(),
            Rate(r.decode_bps).to_string(),
            r.zero_bytes as f64 * 100.0 / r.guest_bytes.max(1) as f64
        );
    }
    if let Some(dense) = dense {
        print_dense(&dense);
    }
    Ok(ExitCode::SUCCESS)
}

/// `--dense`: each option's ratio (guest bytes over compressed bytes) and
/// encode speed on one core.
fn print_dense(dense: &[ferry::bench::dense::DenseResult]) {
    if let Some(r) = dense.first() {
        println!(
            "dense pages: {:.1}% of the non-zero pages sampled repeat an earlier one",
            r.duplicate_pages as f64 * 100.0 / r.pages.max(1) as f64
        );
    }
    println!(
        "  {:<9} {:>17} {:>17} {:>17} {:>9}",
        "codec", "per batch", "+references", "kept streams", "both"
    );
    let ratio =
        |r: &ferry::bench::dense::DenseResult, b: u64| r.guest_bytes as f64 / b.max(1) as f64;
    let cell = |ratio: f64, bps: f64| format!("{ratio:.2} {:>12}", Rate(bps).to_string());
    for r in dense {
        println!(
            "  {:<9} {:>17} {:>17} {:>17} {:>9}",
            r.codec,
            cell(ratio(r, r.batch_bytes), r.batch_encode_bps),
            cell(ratio(r, r.dedup_bytes), r.dedup_encode_bps),
            r.stream_bytes
                .zip(r.stream_encode_bps)
                .map_or("-".into(), |(b, bps)| cell(ratio(r, b), bps)),
            r.dense_bytes
                .map_or("-".into(), |b| format!("{:.2}", ratio(r, b)))
        );
    }
}

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
pub(crate) fn bench_kvm(a: KvmBenchArgs) -> Result<ExitCode> {
    check_kvm()?;
    let (mem, _) = build_memory(&a.mem, !a.json)?;
    let r = ferry::bench::kvm::measure(Arc::new(mem), a.repeats)
        .map_err(|e| anyhow::Error::new(e).context("measuring the KVM guest"))?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(ExitCode::SUCCESS);
    }
    let sp = |s: ferry::bench::Spread, unit: &str| {
        format!("{:.1} {unit} ({:.1}-{:.1})", s.median, s.min, s.max)
    };
    println!(
        "KVM guest of {} ({}), {} samples each, medians (min-max)",
        Bytes(r.memory_bytes),
        content_of(&a.mem),
        r.repeats
    );
    println!(
        "  dirty log sync, clean   {}  = {:.1} µs per GiB",
        sp(r.sync_clean_us, "µs"),
        r.sync_clean_us_per_gib
    );
    println!(
        "  dirty log sync, dirty   {}  for {:.0} pages: {:.0} ns per dirty page",
        sp(r.sync_dirty_us, "µs"),
        r.sync_dirty_pages,
        r.sync_ns_per_dirty_page
    );
    println!(
        "  page writes/s, hot 4MiB {:.2} M not harvested, {:.2} M harvested every 100 ms, {:.2} M every 10 ms",
        r.writes_per_sec_hot_unharvested / 1e6,
        r.writes_per_sec_hot_harvest_100ms / 1e6,
        r.writes_per_sec_hot_harvest_10ms / 1e6
    );
    println!(
        "  page writes/s, uniform  {:.3} M: each a first write since a harvest, {:.1} µs apiece",
        r.writes_per_sec_uniform / 1e6,
        1e6 / r.writes_per_sec_uniform.max(1.0)
    );
    println!("  pause                   {}", sp(r.pause_us, "µs"));
    println!(
        "  save vCPU state         {}, {} serialized",
        sp(r.save_us, "µs"),
        Bytes(r.state_bytes)
    );
    println!("  restore on a new VM     {}", sp(r.restore_ms, "ms"));
    println!("  resume                  {}", sp(r.resume_us, "µs"));
    Ok(ExitCode::SUCCESS)
}

#[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
pub(crate) fn bench_kvm(_: KvmBenchArgs) -> Result<ExitCode> {
    check_kvm().map(|_| ExitCode::SUCCESS)
}

pub(crate) fn bench_sweep(a: SweepArgs) -> Result<ExitCode> {
    use ferry::bench::sweep::{mark_winners, run_cell, summarize, table, SweepPlan};
    if a.backend == GuestBackend::Kvm {
        check_kvm()?;
    }
    let plan = SweepPlan {
        codecs: a.codecs.0.clone(),
        links: a.bandwidth.0.clone(),
        guests: sweep_guests(&a)?,
        repeats: a.repeats,
        channels: a.channels,
        tls: a.tls.values(),
        dense: a.dense.values(),
    };
    let (env, mut tbf) = sweep_env(&a, &plan)?;
    // Interrupted: cancel the running migration, stop, and (on drop) tear the
    // tbf link down.
    cancel_on_signals(env.cancel.clone());
    let bar =
        ProgressBar::with_draw_target(Some(plan.runs()), ProgressDrawTarget::stderr_with_hz(10));
    bar.set_style(
        ProgressStyle::with_template("sweep [{bar:30}] {pos}/{len} migrations  {msg}  eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let mut cells = Vec::new();
    'grid: for spec in &plan.guests {
        bar.set_message(format!("building guest {}", spec.label));
        let guest = spec.build(a.guest.mem.seed).map_err(usage)?;
        guest.pause();
        for &link in &plan.links {
            if let Some(t) = tbf.as_mut() {
                t.set_rate(link).context("shaping the tbf link")?;
            }
            for (tls, dense, (label, codec)) in plan.options() {
                let path = if tls { " · tls" } else { "" };
                let sparse = if dense { "" } else { " · dense off" };
                bar.set_message(format!(
                    "{} · {}{path} · {label}{sparse}",
                    spec.label,
                    ferry::bench::sweep::link_label(link)
                ));
                let env = ferry::bench::sweep::CellEnv {
                    tls,
                    dense,
                    ..env.clone()
                };
                let reports = run_cell(&guest, *codec, link, &env, || bar.inc(1))
                    .context("setting up a migration pair")?;
                if env.cancel.is_cancelled() {
                    break 'grid;
                }
                let cell = summarize(label, link, &spec.label, &reports);
                cells.push(cell.over_tls(tls).with_dense(dense));
            }
        }
    }
    if env.cancel.is_cancelled() {
        bar.abandon();
        drop(tbf);
        eprintln!("interrupted: sweep stopped, nothing written");
        return Ok(ExitCode::from(130));
    }
    bar.finish_and_clear();
    mark_winners(&mut cells);
    if let Some(dir) = &a.out {
        write_sweep(&a, &plan, dir, &cells)?;
    }
    if a.json {
        println!("{}", serde_json::json!({ "cells": cells }));
    } else {
        print!("{}", table(&cells));
    }
    let failed = cells.iter().any(|c| c.failures > 0);
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// The sweep's guests: a named set, or the one `--memory`/`--image`/
/// `--workload` describe, on the chosen backend.
fn sweep_guests(a: &SweepArgs) -> Result<Vec<ferry::bench::sweep::GuestSpec>> {
    use ferry::bench::sweep::GuestSpec;
    let memory = a.guest.mem.memory.unwrap_or(256 << 20);
    let kind = a.backend.kind();
    let guests = match a.guest_set.as_deref() {
        Some("changing") => GuestSpec::changing_set(memory),
        Some(_) => GuestSpec::standard_set(memory),
        None => {
            let g = &a.guest;
            let bytes = match &g.mem.image {
                Some(p) => std::fs::metadata(p)
                    .map_err(|e| usage(format!("cannot read RAM image {}: {e}", p.display())))?
                    .len(),
                None => memory,
            };
            let workload = workload_for(g, bytes)?;
            let label = match &g.mem.image {
                Some(p) => p
                    .file_stem()
                    .map_or("image".into(), |s| s.to_string_lossy().into_owned()),
                None => format!("{}-{}", compact_size(bytes), workload),
            };
            vec![GuestSpec {
                label,
                memory: bytes,
                fill: g.mem.fill.clone(),
                image: g.mem.image.clone(),
                workload,
                dirty_rate: g.dirty_rate,
                kind: ferry::wire::GuestKind::Sim,
            }]
        }
    };
    Ok(guests.into_iter().map(|g| g.on(kind)).collect())
}

/// Where the sweep's migrations run: loopback, or a tbf link between two
/// network namespaces (returned, so that it lives as long as the sweep).
fn sweep_env(
    a: &SweepArgs,
    plan: &ferry::bench::sweep::SweepPlan,
) -> Result<(
    ferry::bench::sweep::CellEnv,
    Option<ferry::transport::netns::TbfLink>,
)> {
    use ferry::bench::sweep::CellEnv;
    let mut env = CellEnv::loopback(plan.channels, plan.repeats);
    let mut tbf = None;
    if a.link == "tbf" {
        ferry::transport::netns::tbf_available().map_err(usage)?;
        let link = ferry::transport::netns::TbfLink::new()
            .context("setting up the tbf link (network namespaces, veth, tc)")?;
        env.path = ferry::transport::LocalPath {
            listen: link.listen_addr(),
            source_ns: Some(link.source().clone()),
            destination_ns: Some(link.destination().clone()),
        };
        env.kernel_shaped = true;
        tbf = Some(link);
    }
    Ok((env, tbf))
}

/// Writes results.json, results.csv, report.md and the charts to `dir`.
fn write_sweep(
    a: &SweepArgs,
    plan: &ferry::bench::sweep::SweepPlan,
    dir: &std::path::Path,
    cells: &[ferry::bench::sweep::Cell],
) -> Result<()> {
    use ferry::bench::sweep::{write_outputs, SweepMeta};
    let meta = SweepMeta {
        link: a.link.clone(),
        channels: plan.channels,
        repeats: plan.repeats,
        tls: a.tls.name().into(),
        dense: a.dense.name().into(),
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        unix_time: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    write_outputs(dir, &meta, cells)
        .with_context(|| format!("writing results to {}", dir.display()))?;
    let charts = ferry::bench::charts::write_charts(dir, cells)
        .map_err(|e| anyhow::anyhow!("drawing charts in {}: {e}", dir.display()))?;
    if !a.json {
        eprintln!(
            "wrote results.json, results.csv, report.md and {} charts to {}",
            charts.len(),
            dir.display()
        );
    }
    Ok(())
}
