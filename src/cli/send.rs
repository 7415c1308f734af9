//! `ferry send`: migrates a new guest, or one saved by an unresolved send,
//! and never exits holding the only copy of a guest it could not save.

use crate::{
    build_guest, describe_guest, exit_for, load_key, outcome_name, progress_ui, summary, usage,
    SendArgs,
};
use anyhow::Result;
use ferry::cpu::CpuMeter;
use ferry::migration::{MigratableGuest, Outcome};
use ferry::transport::{migrate, RunContext};
use ferry::units::Bytes;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// `ferry send`.
pub fn send(a: SendArgs) -> Result<ExitCode> {
    let mut config = a.migrate.config();
    config
        .validate()
        .map_err(|e| usage(format!("{}: {}", e.flag(), e.message)))?;
    config.session_key = a.key.as_deref().map(load_key).transpose()?;
    if let Some(p) = a
        .save_to
        .as_deref()
        .filter(|p| p.symlink_metadata().is_ok())
    {
        return Err(usage(format!(
            "--save-to: {} exists; ferry never replaces a file that may hold a guest",
            p.display()
        )));
    }
    let mut tls = None;
    if a.migrate.tls {
        tls = Some(match &a.tls_ca {
            Some(ca) => ferry::transport::tls::TlsClient::pinned(ca).map_err(usage)?,
            None if config.session_key.is_some() => {
                ferry::transport::tls::TlsClient::bound_to_key()
            }
            None => {
                return Err(usage(
                    "--tls needs --tls-ca FILE (the receiver's certificate) or --key FILE to know the receiver by",
                ))
            }
        });
    }
    let guest: Arc<dyn MigratableGuest> = match &a.saved {
        Some(file) => {
            let g = ferry::migration::saved::load_guest(file).map_err(usage)?;
            // At GO the file's guest is handed over: never send it again.
            let path = file.clone();
            config.before_go = Some(ferry::migration::BeforeGo(Arc::new(move || {
                ferry::migration::saved::mark_consumed(&path)
                    .map_err(|e| format!("cannot mark {} consumed: {e}", path.display()))
            })));
            tracing::info!(to = %a.to, file = %file.display(), memory = %Bytes(g.memory().len_bytes()), "migrating a saved guest");
            g
        }
        None => {
            let (guest, pattern) = build_guest(&a.guest, a.backend, false)?;
            tracing::info!(to = %a.to, "migrating {}", describe_guest(&a.guest, &*guest, pattern));
            guest
        }
    };
    let cpu = CpuMeter::new();
    let rt = ferry::transport::runtime("ferry-src", 2, &cpu)?;
    let ctx = RunContext {
        cpu,
        tls,
        ..RunContext::default()
    };
    cancel_on_ctrl_c(&rt, &ctx);
    let done = Arc::new(AtomicBool::new(false));
    let ui = progress_ui(ctx.progress.clone(), done.clone());
    let target = a.to.clone();
    let g = guest.clone();
    let c2 = config.clone();
    let ctx2 = ctx.clone();
    let mut report = rt.block_on(rt.spawn(async move { migrate(g, &target, &c2, &ctx2).await }))?;
    done.store(true, Ordering::Release);
    let _ = ui.join();
    if report.outcome == Outcome::Unresolved {
        // GO went out unanswered: the guest may run on the destination, or
        // nowhere. Keep the paused copy where an operator can find it.
        let path = a.save_to.clone().unwrap_or_else(|| {
            PathBuf::from(format!("ferry-unresolved-{}.guest", report.session_id))
        });
        let saved = save_or_hold(&*guest, path);
        tracing::warn!(file = %saved.display(), "migration unresolved: the paused guest is saved; run `ferry send --saved FILE --to ADDR` if the destination does not run it");
        report.saved_to = Some(saved.display().to_string());
    }
    if a.migrate.json {
        println!("{}", report.to_json());
    } else {
        println!("migration to {} {}", a.to, outcome_name(report.outcome));
        print!("{}", summary(&report, Some(config.downtime_limit)));
    }
    Ok(exit_for(report.outcome))
}

/// Saves the paused guest to `path`; when that fails (disk full, no
/// permission), keeps trying there and in the fallback folders, saying where
/// and why each time, and does not return (or let the process exit) until
/// the guest is on disk somewhere: this process may hold its only copy.
fn save_or_hold(guest: &dyn MigratableGuest, path: PathBuf) -> PathBuf {
    let name = path
        .file_name()
        .map(PathBuf::from)
        .unwrap_or_else(|| "ferry-unresolved.guest".into());
    let mut candidates = vec![path];
    for dir in fallback_dirs() {
        candidates.push(dir.join(&name));
    }
    loop {
        for p in &candidates {
            match ferry::migration::saved::save_guest(guest, p) {
                Ok(()) => return p.clone(),
                Err(e) => eprintln!(
                    "error: cannot save the paused guest to {}: {e}",
                    p.display()
                ),
            }
        }
        eprintln!(
            "this process holds the guest's only copy here and will not exit until it is saved: free space in one of {}; retrying every {} s",
            candidates
                .iter()
                .map(|p| p.parent().unwrap_or(Path::new(".")).display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            HOLD_RETRY.as_secs()
        );
        std::thread::sleep(HOLD_RETRY);
    }
}

/// How often a held guest's save is tried again.
const HOLD_RETRY: Duration = Duration::from_secs(5);

/// Folders a held guest is saved to when its own place fails: `FERRY_SAVE_DIRS`
/// (colon-separated), else `/var/tmp`.
fn fallback_dirs() -> Vec<PathBuf> {
    match std::env::var_os("FERRY_SAVE_DIRS") {
        Some(v) => std::env::split_paths(&v).collect(),
        None => vec![PathBuf::from("/var/tmp")],
    }
}

/// The first Ctrl-C cancels, unless GO went out: then the hand-off finishes.
/// Later ones say what is going on: the process never dies holding a copy.
fn cancel_on_ctrl_c(rt: &tokio::runtime::Runtime, ctx: &RunContext) {
    let ctx = ctx.clone();
    rt.spawn(async move {
        while tokio::signal::ctrl_c().await.is_ok() {
            if ctx.request_cancel() {
                eprintln!("interrupted: cancelling (the guest stays on the source)");
            } else {
                eprintln!("interrupted: GO has gone out, so the hand-off finishes (the guest runs on the destination, or is saved here)");
            }
        }
    });
}
