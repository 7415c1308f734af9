//! The bandwidth cap is a promise: on incompressible data, the wire rate over
//! every 2-second window of the transfer stays within 5% of the cap.

use crate::common;

use common::*;
use ferry::codec::Codec;
use ferry::memory::{ContentKind, FillSpec, WorkloadPattern};
use ferry::migration::{MigrationConfig, Outcome};
use ferry::transport::{migrate_over_loopback, ReceiverConfig, RunContext};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[test]
fn the_cap_holds_within_five_percent_over_every_two_second_window() {
    let _serial = serial();
    const CAP: u64 = 30_000_000;
    let g = guest(
        112 << 20,
        FillSpec::only(ContentKind::Random),
        WorkloadPattern::Hot { bytes: 4 << 20 },
        2_000_000,
    );
    let ctx = RunContext::default();
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let wire = ctx.progress.wire_bytes.clone();
        let done = done.clone();
        std::thread::spawn(move || {
            let mut samples = vec![];
            while !done.load(Ordering::Acquire) {
                samples.push((Instant::now(), wire.load(Ordering::Relaxed)));
                std::thread::sleep(Duration::from_millis(50));
            }
            samples
        })
    };
    let config = MigrationConfig {
        codec: Codec::Lz4.into(), // random pages do not compress: they go raw
        max_bandwidth: Some(CAP),
        ..MigrationConfig::default()
    };
    let (src, dst) =
        migrate_over_loopback(g.clone(), &config, ctx, ReceiverConfig::default()).unwrap();
    done.store(true, Ordering::Release);
    let samples = sampler.join().unwrap();
    let dst = dst.expect("the destination reports the session");
    assert_eq!(src.outcome, Outcome::Completed, "{:?}", src.error);
    assert!(dst.report.verified);
    assert_eq!(src.max_bandwidth_bps, Some(CAP));
    assert!(
        src.pages.raw > src.pages.compressed * 10,
        "incompressible: {:?}",
        src.pages
    );

    // Windows that lie inside the transfer: from the first byte to the last.
    let total = src.wire_bytes;
    let start = samples.iter().position(|s| s.1 > 0).expect("bytes moved");
    let end = samples
        .iter()
        .position(|s| s.1 >= total)
        .unwrap_or(samples.len() - 1);
    let mut windows = 0;
    let mut worst: f64 = 0.0;
    for i in start..end {
        let Some(j) = (i..=end).find(|&j| samples[j].0 - samples[i].0 >= Duration::from_secs(2))
        else {
            break;
        };
        let secs = (samples[j].0 - samples[i].0).as_secs_f64();
        let rate = (samples[j].1 - samples[i].1) as f64 / secs;
        let err = (rate - CAP as f64).abs() / CAP as f64;
        worst = worst.max(err);
        assert!(
            err < 0.05,
            "window at {:.1}s: {rate:.0} B/s vs cap {CAP}",
            (samples[i].0 - samples[start].0).as_secs_f64()
        );
        windows += 1;
    }
    assert!(windows >= 10, "only {windows} windows measured");
    // The whole transfer, switchover included, is at the cap too.
    let rate = total as f64 / ((src.total_ms - src.setup_ms) / 1e3);
    assert!(
        rate <= CAP as f64 * 1.05 && rate >= CAP as f64 * 0.90,
        "average {rate:.0} B/s"
    );
    eprintln!(
        "{windows} windows, worst error {:.2}%, average {rate:.0} B/s",
        worst * 100.0
    );
}
