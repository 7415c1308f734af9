//! The engine commands' progress bars, their final summary and exit
//! status.

use crate::outcome_name;
use ferry::migration::{Outcome, Report};
use ferry::transport::{Phase, Progress};
use ferry::units::{Bytes, Rate};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Draws one progress bar per phase on stderr until `done` is set: each
/// pre-copy round (live, then with its final figures, also for rounds too
/// short to be seen live) and the switchover.
pub(crate) fn progress_ui(
    progress: Arc<Progress>,
    done: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mp = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(10));
        let style = ProgressStyle::with_template(
            "{prefix:>11} [{bar:28}] {bytes:>10}/{total_bytes:<10} {msg}",
        )
        .expect("valid template")
        .progress_chars("=> ");
        let new_bar = |prefix: String, len: u64| {
            let bar = mp.add(ProgressBar::new(len));
            bar.set_style(style.clone());
            bar.set_prefix(prefix);
            bar
        };
        // The live bar: the round it shows (None for the switchover).
        let mut live: Option<(Option<u32>, ProgressBar)> = None;
        let mut drawn = 0usize;
        loop {
            let finished = done.load(Ordering::Acquire);
            let s = progress.snapshot();
            let rounds = progress.completed_rounds();
            for r in &rounds[drawn..] {
                let bar = match live.take() {
                    Some((Some(n), bar)) if n == r.round => bar,
                    other => {
                        live = other;
                        new_bar(format!("round {}", r.round), 0)
                    }
                };
                bar.set_length(r.pages * 4096);
                bar.set_position(r.pages * 4096);
                let mut msg = format!(
                    "in {}, {} dirty after",
                    ms(r.ms),
                    Bytes(r.dirty_pages_after * 4096)
                );
                if r.throttle_pct > 0 {
                    msg += &format!(", throttle {}%", r.throttle_pct);
                }
                bar.finish_with_message(msg);
            }
            drawn = rounds.len();
            let current = match s.phase {
                Phase::Precopy if s.round as usize >= drawn => Some(Some(s.round)),
                Phase::Switchover | Phase::Handoff => Some(None),
                _ => None,
            };
            if let Some(key) = current {
                if live.as_ref().map(|l| l.0) != Some(key) {
                    let prefix = key.map_or("switchover".to_string(), |r| format!("round {r}"));
                    live = Some((key, new_bar(prefix, s.round_pages * 4096)));
                }
                let (_, bar) = live.as_ref().unwrap();
                bar.set_length(s.round_pages * 4096);
                bar.set_position(s.round_pages_done * 4096);
                let left = s.round_pages.saturating_sub(s.round_pages_done) * 4096;
                let mut msg = format!("left {}", Bytes(left));
                if s.throughput_bps > 0.0 {
                    msg += &format!("  {}", Rate(s.throughput_bps));
                }
                if let Some(d) = s.expected_downtime_ms {
                    msg += &format!("  est. downtime {d:.1} ms");
                }
                if s.throttle_pct > 0 {
                    msg += &format!("  throttle {}%", s.throttle_pct);
                }
                if key.is_none() {
                    msg = if s.phase == Phase::Handoff {
                        "guest paused: state and digest sent, READY/GO".into()
                    } else {
                        "guest paused: the last dirty pages".into()
                    };
                }
                bar.set_message(msg);
            }
            if finished {
                let bar = match live.take() {
                    Some((None, bar)) => Some(bar),
                    Some((Some(_), bar)) => {
                        bar.abandon();
                        None
                    }
                    // A switchover too short to be seen live.
                    None => s
                        .final_pages
                        .map(|n| new_bar("switchover".into(), n * 4096)),
                };
                if let (Some(bar), Some(n)) = (bar, s.final_pages) {
                    bar.set_length(n * 4096);
                    bar.set_position(n * 4096);
                    bar.finish_with_message("the last dirty pages, sent with the guest paused");
                }
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })
}

pub(crate) fn ms(x: f64) -> String {
    if x >= 1000.0 {
        format!("{:.2} s", x / 1000.0)
    } else {
        format!("{x:.1} ms")
    }
}

pub(crate) fn summary(r: &Report, limit: Option<Duration>) -> String {
    let mut out = String::new();
    let where_ = match r.outcome {
        Outcome::Completed => "the guest now runs on the destination",
        Outcome::Unresolved => {
            "GO was sent but not acknowledged: the guest is paused on the source"
        }
        _ => "the guest keeps running on the source",
    };
    out += &format!("  outcome     {}: {where_}\n", outcome_name(r.outcome));
    if let Some(e) = &r.error {
        out += &format!("  error       {e}\n");
    }
    out += &format!(
        "  verified    {} ({} digest, {})\n",
        if r.verified {
            "yes, memory identical"
        } else {
            "no"
        },
        r.verify,
        ms(r.verify_ms)
    );
    let limit = limit
        .map(|l| format!(" (limit {})", ms(l.as_secs_f64() * 1e3)))
        .unwrap_or_default();
    out += &format!(
        "  time        total {}, setup {}, downtime {}{limit}\n",
        ms(r.total_ms),
        ms(r.setup_ms),
        ms(r.downtime_ms)
    );
    out += &format!(
        "  rounds      {} pre-copy + final; pages {} (zero {}, raw {}, compressed {})\n",
        r.rounds, r.pages.total, r.pages.zero, r.pages.raw, r.pages.compressed
    );
    out += &format!(
        "  data        {} of guest memory as {} on the wire (ratio {:.2}, {})\n",
        Bytes(r.guest_bytes_sent),
        Bytes(r.wire_bytes),
        r.compression_ratio,
        r.codec
    );
    let cap = r
        .max_bandwidth_bps
        .map(|b| format!(", cap {}", Rate(b as f64)))
        .unwrap_or_default();
    out += &format!(
        "  throughput  {} guest, {} wire over {} channels{cap}\n",
        Rate(r.throughput_guest_bps),
        Rate(r.throughput_wire_bps),
        r.channels
    );
    out += &format!(
        "  guest       {}, dirty rate {}, max throttle {}%\n",
        r.guest,
        Rate(r.dirty_rate_bps),
        r.throttle_pct_max
    );
    if let Some(at) = r.guest_counter_at_pause {
        let after = r
            .guest_counter_after_resume
            .map(|c| format!(", {c} a second after it resumed here"))
            .unwrap_or_default();
        out += &format!("  counter     {at} at the pause{after}\n");
    }
    let cpu = |v: Option<f64>| v.map(ms).unwrap_or_else(|| "n/a".into());
    out += &format!(
        "  cpu         source {}, destination {}\n",
        cpu(r.cpu_ms.source),
        cpu(r.cpu_ms.destination)
    );
    out += &format!(
        "  security    {}, {}\n",
        if r.authenticated {
            "authenticated (both sides proved the key)"
        } else {
            "NOT authenticated (no key)"
        },
        match (r.encrypted, r.frames_authenticated) {
            (true, _) => "encrypted (TLS 1.3)",
            (false, true) => "NOT encrypted, every frame authenticated (keyed BLAKE3)",
            (false, false) => "NOT encrypted, frames NOT authenticated (CRC only)",
        }
    );
    if let Some(file) = &r.saved_to {
        out += &format!("  saved       the paused guest is in {file}\n");
    }
    if r.channel_failures > 0 {
        out += &format!(
            "  failover    {} channel failures, {} batches resent\n",
            r.channel_failures, r.batches_resent
        );
    }
    out
}

pub(crate) fn exit_for(outcome: Outcome) -> ExitCode {
    match outcome {
        Outcome::Completed => ExitCode::SUCCESS,
        Outcome::Unresolved => ExitCode::from(3),
        Outcome::Failed | Outcome::Cancelled => ExitCode::from(1),
    }
}
