//! `ferry demo`: a running synthetic or KVM guest migrated over loopback
//! inside this process, with progress bars and the summary (`ferry demo
//! cluster` is in `demo_cluster.rs`).

use crate::cli::args::*;
use crate::cli::guest::{build_guest, describe_guest, outcome_name, usage};
use crate::cli::progress::*;
use anyhow::{Context, Result};
use ferry::transport::{migrate_over_loopback, ReceiverConfig, RunContext};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub fn demo(a: DemoArgs) -> Result<ExitCode> {
    if let Some(DemoCommand::Cluster(c)) = a.sub {
        return crate::cli::demo_cluster::demo_cluster(c);
    }
    let mut config = a.migrate.config();
    config
        .validate()
        .map_err(|e| usage(format!("{}: {}", e.flag(), e.message)))?;
    // Both ends are in this process: they prove a one-off key to each other.
    let key = ferry::migration::auth::SessionKey::random();
    config.session_key = Some(key.clone());
    let (client_tls, tls) = if a.migrate.tls {
        (
            Some(ferry::transport::tls::TlsClient::bound_to_key()),
            Some(ferry::transport::tls::TlsServer::ephemeral().map_err(anyhow::Error::msg)?),
        )
    } else {
        (None, None)
    };
    let (guest, pattern) = build_guest(&a.guest, a.backend, true)?;
    eprintln!(
        "ferry demo: {}\n            {} channels, codec {}, over loopback",
        describe_guest(&a.guest, &*guest, pattern),
        config.channels,
        config.codec
    );
    // Let the workload reach its steady state before migrating.
    std::thread::sleep(Duration::from_millis(200));
    let ctx = RunContext {
        tls: client_tls,
        ..RunContext::default()
    };
    let done = Arc::new(AtomicBool::new(false));
    let ui = progress_ui(ctx.progress.clone(), done.clone());
    let receiver = ReceiverConfig {
        key: Some(key),
        tls,
        // Show the guest runs on there: its counter, a second after GO.
        resume_check: Some(Duration::from_secs(1)),
        ..ReceiverConfig::default()
    };
    let result = migrate_over_loopback(guest.clone(), &config, ctx, receiver);
    done.store(true, Ordering::Release);
    let _ = ui.join();
    let (mut report, incoming) = result.context("loopback migration")?;
    if let Some(i) = &incoming {
        report.guest_counter_after_resume = i.report.guest_counter_after_resume;
    }
    if a.migrate.json {
        println!("{}", report.to_json());
    } else {
        println!("migration {}", outcome_name(report.outcome));
        print!("{}", summary(&report, Some(config.downtime_limit)));
    }
    Ok(exit_for(report.outcome))
}
