//! Real migrations over loopback TCP with several channels: every codec moves
//! memory byte for byte, hot sets converge, fast dirtiers are throttled, and a
//! migration that cannot converge leaves the guest running on the source.

use crate::common;

use common::*;
use ferry::codec::Codec;
use ferry::memory::{ContentKind, FillSpec, WorkloadPattern};
use ferry::migration::{MigrationConfig, Outcome};
use ferry::transport::{ReceiverConfig, RunContext};
use ferry::wire::VerifyMode;
use std::time::Duration;

const MIB: u64 = 1 << 20;

#[test]
fn every_codec_moves_memory_byte_for_byte() {
    let _serial = serial();
    for codec in [
        Codec::None,
        Codec::Lz4,
        Codec::Zstd { level: 1 },
        Codec::Zstd { level: 3 },
    ] {
        let g = guest(
            128 * MIB,
            FillSpec::default(),
            WorkloadPattern::Hot { bytes: 16 * MIB },
            30_000_000,
        );
        let (src, dst) = migrate_paused(
            &g,
            MigrationConfig {
                channels: 4,
                codec: codec.into(),
                ..MigrationConfig::default()
            },
        );
        assert_eq!(src.outcome, Outcome::Completed, "{codec}: {:?}", src.error);
        assert_eq!(
            dst.report.outcome,
            Outcome::Completed,
            "{codec}: {:?}",
            dst.report.error
        );
        assert!(src.verified && dst.report.verified, "{codec}");
        assert!(!g.is_running(), "the source never resumes after GO");
        let dm = dst.memory.as_ref().unwrap();
        assert_eq!(
            first_difference(g.memory(), dm),
            None,
            "{codec}: memories differ"
        );
        // Both sides count the same pages and bytes.
        assert_eq!(src.pages, dst.report.pages, "{codec}");
        assert_eq!(src.wire_bytes, dst.report.wire_bytes, "{codec}");
        assert_eq!(src.guest_bytes_sent, src.pages.total * 4096);
        assert!(src.pages.zero > 0, "{codec}: zero pages are detected");
        match codec {
            Codec::None => assert_eq!(src.pages.compressed, 0),
            _ => assert!(
                src.pages.compressed > 0 && src.compression_ratio > 1.5,
                "{codec}: {src:?}"
            ),
        }
        // Every compressed page is counted under the codec that did it.
        let by = src.pages.compressed_by;
        let of_codec = match codec {
            Codec::None => 0,
            Codec::Lz4 => by.lz4,
            Codec::Zstd { .. } => by.zstd,
            Codec::ZstdStream { .. } => by.zstd_stream,
        };
        assert_eq!(of_codec, src.pages.compressed, "{codec}: {by:?}");
        assert_eq!(by.lz4 + by.zstd + by.zstd_stream, of_codec, "{codec}");
        assert_eq!(src.channels, 4);
        assert_eq!(src.codec, codec.to_string());
    }
}

#[test]
fn full_verification_hashes_all_memory_and_agrees() {
    let _serial = serial();
    let g = guest(
        64 * MIB,
        FillSpec::default(),
        WorkloadPattern::Uniform,
        20_000_000,
    );
    let (src, dst) = migrate_paused(
        &g,
        MigrationConfig {
            verify: VerifyMode::Full,
            channels: 2,
            ..MigrationConfig::default()
        },
    );
    assert_eq!(src.outcome, Outcome::Completed, "{:?}", src.error);
    assert!(src.verified && dst.report.verified);
    assert_eq!(src.verify, VerifyMode::Full);
    assert!(src.verify_ms > 0.0 && dst.report.verify_ms > 0.0);
    assert_eq!(
        first_difference(g.memory(), dst.memory.as_ref().unwrap()),
        None
    );
}

#[test]
fn a_hot_set_below_link_speed_converges_in_a_few_rounds() {
    let _serial = serial();
    let g = guest(
        256 * MIB,
        FillSpec::default(),
        WorkloadPattern::Hot { bytes: 32 * MIB },
        50_000_000,
    );
    std::thread::sleep(Duration::from_millis(100));
    let (src, dst) = migrate_paused(&g, MigrationConfig::default());
    assert_eq!(src.outcome, Outcome::Completed, "{:?}", src.error);
    assert!(
        src.rounds <= 6,
        "{} rounds: {:?}",
        src.rounds,
        src.round_log
    );
    assert!(src.downtime_ms < 300.0, "downtime {} ms", src.downtime_ms);
    assert_eq!(src.throttle_pct_max, 0, "no throttling needed");
    assert!(src.dirty_rate_bps > 0.0);
    assert_eq!(
        first_difference(g.memory(), dst.memory.as_ref().unwrap()),
        None
    );
}

#[test]
fn the_guest_runs_on_the_destination_after_the_handoff() {
    let _serial = serial();
    let g = guest(
        32 * MIB,
        FillSpec::default(),
        WorkloadPattern::Hot { bytes: 4 * MIB },
        20_000_000,
    );
    let (src, dst) = ferry::transport::migrate_over_loopback(
        g.clone(),
        &MigrationConfig::default(),
        RunContext::default(),
        ReceiverConfig::default(),
    )
    .unwrap();
    assert_eq!(src.outcome, Outcome::Completed, "{:?}", src.error);
    assert!(!g.is_running());
    let moved = dst
        .expect("the destination reports the session")
        .guest
        .expect("the destination runs the guest");
    let at_pause = g.pages_written();
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        moved.progress_counter() > at_pause,
        "the workload continues from its counter on the destination"
    );
    assert_eq!(g.pages_written(), at_pause, "the source copy stays paused");
}

/// Fast incompressible writes into a hot set over a capped link.
fn fast_dirtier() -> std::sync::Arc<ferry::memory::SyntheticGuest> {
    guest(
        32 * MIB,
        FillSpec::only(ContentKind::Random),
        WorkloadPattern::Hot { bytes: 8 * MIB },
        200_000_000,
    )
}

/// 40 MB/s with a 50 ms limit: the 8 MiB hot set alone is a 210 ms pause, so
/// only throttling can bring the estimate under the limit.
fn capped(auto_converge: bool, timeout: Option<Duration>) -> MigrationConfig {
    MigrationConfig {
        codec: Codec::None.into(),
        max_bandwidth: Some(40_000_000),
        downtime_limit: Duration::from_millis(50),
        auto_converge,
        completion_timeout: timeout,
        ..MigrationConfig::default()
    }
}

#[test]
fn a_guest_dirtying_faster_than_the_link_is_throttled_and_completes() {
    let _serial = serial();
    let g = fast_dirtier();
    let (src, dst) = migrate_paused(&g, capped(true, Some(Duration::from_secs(60))));
    assert_eq!(src.outcome, Outcome::Completed, "{:?}", src.error);
    assert!(
        src.throttle_pct_max >= 20,
        "auto-converge throttled: {:?}",
        src.round_log
    );
    assert!(src.downtime_ms < 150.0, "downtime {} ms", src.downtime_ms);
    assert_eq!(
        first_difference(g.memory(), dst.memory.as_ref().unwrap()),
        None
    );
}

#[test]
fn without_auto_converge_it_times_out_and_the_guest_keeps_running_on_the_source() {
    let _serial = serial();
    let g = fast_dirtier();
    let fill = FillSpec::only(ContentKind::Random);
    let (src, dst) = migrate_paused(&g, capped(false, Some(Duration::from_secs(2))));
    assert_eq!(src.outcome, Outcome::Failed);
    let err = src.error.as_deref().unwrap();
    assert!(
        err.contains("completion timeout") && err.contains("keeps running on the source"),
        "{err}"
    );
    assert_eq!(src.throttle_pct_max, 0);
    assert_eq!(src.guest_location, "source");
    // The destination discarded its copy.
    assert_ne!(dst.report.outcome, Outcome::Completed);
    assert!(dst.guest.is_none());
    // The guest runs on the source, unthrottled, and memory outside the hot
    // set is exactly what it was.
    assert!(g.is_running());
    assert_eq!(g.throttle(), 0);
    let before = g.pages_written();
    std::thread::sleep(Duration::from_millis(100));
    assert!(g.pages_written() > before, "the source guest still runs");
    let hot_pages = 8 * MIB / 4096;
    assert!(holds_initial_fill(
        g.memory(),
        &fill,
        hot_pages,
        g.memory().pages()
    ));
}

#[test]
fn a_refused_connection_fails_cleanly_with_the_guest_on_the_source() {
    let _serial = serial();
    let g = guest(
        8 * MIB,
        FillSpec::default(),
        WorkloadPattern::Uniform,
        10_000_000,
    );
    // Nothing listens on this port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cpu = ferry::cpu::CpuMeter::new();
    let rt = ferry::transport::runtime("t", 1, &cpu).unwrap();
    let ctx = RunContext::default();
    let gd: std::sync::Arc<dyn ferry::migration::MigratableGuest> = g.clone();
    let report = rt.block_on(ferry::transport::migrate(
        gd,
        &format!("127.0.0.1:{port}"),
        &MigrationConfig::default(),
        &ctx,
    ));
    assert_eq!(report.outcome, Outcome::Failed);
    assert!(report.error.unwrap().contains("connect channel 0"));
    assert!(g.is_running());
}

/// A panic in the receiver's own apply task is its local fault: the session
/// ends, the abort says "internal", the source is never told it broke the
/// protocol, and the guest runs on at the source.
#[test]
fn a_panic_on_the_receiver_is_its_own_fault_not_the_sources() {
    let _serial = serial();
    for codec in [Codec::None, Codec::Lz4] {
        let g = guest(
            16 * MIB,
            FillSpec::default(),
            WorkloadPattern::Uniform,
            10_000_000,
        );
        let receiver = ReceiverConfig {
            fault: Some("before-round0:panic".parse().unwrap()),
            ..ReceiverConfig::default()
        };
        let config = MigrationConfig {
            codec: codec.into(),
            ..MigrationConfig::default()
        };
        let (src, dst) = ferry::transport::migrate_over_loopback(
            g.clone(),
            &config,
            RunContext::default(),
            receiver,
        )
        .unwrap();
        assert_eq!(src.outcome, Outcome::Failed, "{codec}");
        let error = src.error.unwrap();
        assert!(error.contains("Internal"), "{codec}: {error}");
        assert!(error.contains("panicked"), "{codec}: {error}");
        assert!(!error.contains("protocol"), "{codec}: {error}");
        // The panic's own text stays in the receiver's log.
        assert!(!error.contains("injected"), "{codec}: {error}");
        assert!(dst.unwrap().guest.is_none(), "{codec}: no copy kept");
        assert!(g.is_running(), "{codec}");
    }
}

#[test]
fn cancelling_mid_migration_leaves_the_guest_on_the_source() {
    let _serial = serial();
    let g = guest(
        64 * MIB,
        FillSpec::only(ContentKind::Random),
        WorkloadPattern::Uniform,
        10_000_000,
    );
    let ctx = RunContext::default();
    let cancel = ctx.cancel.clone();
    let progress = ctx.progress.clone();
    let canceller = std::thread::spawn(move || {
        // Cancel once the transfer is under way.
        while progress
            .wire_bytes
            .load(std::sync::atomic::Ordering::Relaxed)
            < 8 << 20
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        cancel.cancel();
    });
    let config = MigrationConfig {
        max_bandwidth: Some(20_000_000),
        ..MigrationConfig::default()
    };
    let (src, dst) =
        ferry::transport::migrate_over_loopback(g.clone(), &config, ctx, ReceiverConfig::default())
            .unwrap();
    canceller.join().unwrap();
    let dst = dst.expect("the destination reports the session");
    assert_eq!(src.outcome, Outcome::Cancelled, "{:?}", src.error);
    assert_eq!(src.guest_location, "source");
    assert_eq!(
        dst.report.outcome,
        Outcome::Cancelled,
        "{:?}",
        dst.report.error
    );
    assert!(dst.guest.is_none());
    assert!(g.is_running());
    assert!(
        src.total_ms < 2000.0,
        "cancelled promptly: {} ms",
        src.total_ms
    );
}

#[test]
fn auto_sends_incompressible_memory_raw_on_a_link_it_fills() {
    let _serial = serial();
    // Twice the same pages: the second migration's probes run on threads
    // whose probe streams saw the first's samples.
    for run in 0..2 {
        let g = guest(
            64 * MIB,
            "random:100".parse().unwrap(),
            WorkloadPattern::Idle,
            0,
        );
        let (src, dst) = migrate_paused(
            &g,
            MigrationConfig {
                codec: ferry::codec::CodecChoice::Auto,
                max_bandwidth: Some(125_000_000),
                ..MigrationConfig::default()
            },
        );
        assert_eq!(src.outcome, Outcome::Completed, "{:?}", src.error);
        assert_eq!(
            first_difference(g.memory(), dst.memory.as_ref().unwrap()),
            None
        );
        // Nothing shrinks: past the batches that measure each codec, every
        // page goes raw. (A probe once primed the kept stream with its own
        // sample, which then looked a hundred times smaller, and most pages
        // went through the stream for nothing.)
        let by = src.pages.compressed_by;
        assert!(
            src.pages.raw * 10 >= src.pages.total * 9,
            "run {run}: {by:?} {:?}",
            src.pages
        );
    }
}

#[test]
fn auto_picks_compression_on_a_slow_link_and_moves_memory_byte_for_byte() {
    let _serial = serial();
    let g = guest(
        64 * MIB,
        FillSpec::default(),
        WorkloadPattern::Hot { bytes: 4 * MIB },
        10_000_000,
    );
    let (src, dst) = migrate_paused(
        &g,
        MigrationConfig {
            codec: ferry::codec::CodecChoice::Auto,
            max_bandwidth: Some(25_000_000),
            ..MigrationConfig::default()
        },
    );
    assert_eq!(src.outcome, Outcome::Completed, "{:?}", src.error);
    assert_eq!(src.codec, "auto");
    assert_eq!(dst.report.codec, "auto");
    assert_eq!(
        first_difference(g.memory(), dst.memory.as_ref().unwrap()),
        None
    );
    // On a 25 MB/s link the realistic mix is worth compressing: after one raw
    // batch to measure `none`, nearly every batch is compressed.
    assert!(src.pages.compressed > 10 * src.pages.raw, "{:?}", src.pages);
    // What auto chose, by codec, adds up to what it compressed.
    let by = src.pages.compressed_by;
    assert_eq!(
        by.lz4 + by.zstd + by.zstd_stream,
        src.pages.compressed,
        "{by:?}"
    );
    assert!(
        src.compression_ratio > 2.0,
        "ratio {}",
        src.compression_ratio
    );
}

#[test]
fn a_source_that_fails_before_its_session_reports_why_at_once() {
    let _serial = serial();
    let g = guest(4 * MIB, FillSpec::default(), WorkloadPattern::Idle, 0);
    let t = std::time::Instant::now();
    let (src, dst) = ferry::transport::migrate_over_loopback(
        g.clone(),
        &MigrationConfig {
            channels: 0,
            ..MigrationConfig::default()
        },
        RunContext::default(),
        ReceiverConfig::default(),
    )
    .unwrap();
    assert_eq!(src.outcome, Outcome::Failed);
    assert!(
        src.error
            .as_deref()
            .unwrap()
            .contains("channels: 0 is out of range (1 to 64)"),
        "{:?}",
        src.error
    );
    assert!(dst.is_none(), "no session, so nothing on the destination");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "no wait for a session that never came"
    );
    assert!(g.is_running());
}

fn key(text: &str) -> ferry::migration::auth::SessionKey {
    ferry::migration::auth::SessionKey(text.as_bytes().to_vec())
}

#[test]
fn sessions_prove_the_key_both_ways_and_a_refused_one_allocates_nothing() {
    use ferry::transport::Unauthenticated;
    use ferry::wire::SessionLabel;
    let _serial = serial();
    let label = SessionLabel {
        vm: "web-1".into(),
        migration_id: "m-7".into(),
        source_node: "a".into(),
    };
    let run = |source_key: Option<&str>, receiver_key: Option<&str>, policy: Unauthenticated| {
        let g = guest(16 * MIB, FillSpec::default(), WorkloadPattern::Idle, 0);
        let config = MigrationConfig {
            label: Some(label.clone()),
            session_key: source_key.map(key),
            ..MigrationConfig::default()
        };
        let receiver = ReceiverConfig {
            key: receiver_key.map(key),
            unauthenticated: policy,
            ..ReceiverConfig::default()
        };
        let (src, dst) = ferry::transport::migrate_over_loopback(
            g.clone(),
            &config,
            RunContext::default(),
            receiver,
        )
        .unwrap();
        (src, dst, g)
    };
    let the_key = "the cluster's key, 32 bytes long";
    // Both hold the key: each proves it, and the label arrives.
    let (src, dst, _) = run(Some(the_key), Some(the_key), Unauthenticated::Refuse);
    let dst = dst.expect("an admitted session is reported");
    assert_eq!(src.outcome, Outcome::Completed, "{:?}", src.error);
    assert!(src.authenticated && dst.report.authenticated);
    assert!(!src.encrypted && !dst.report.encrypted);
    assert_eq!(dst.label, Some(label.clone()));
    // Every mismatch is refused before a page moves, with a reason for the
    // source; the guest keeps running, and the receiver allocated nothing
    // and keeps no report of a peer that proved nothing.
    for (source_key, receiver_key, policy, why) in [
        (
            Some("a guess at the key, 32 bytes ."),
            Some(the_key),
            Unauthenticated::Refuse,
            "the source's proof of the key is wrong",
        ),
        (
            None,
            Some(the_key),
            Unauthenticated::Loopback,
            "requires the shared key and the source proved none",
        ),
        (
            Some(the_key),
            None,
            Unauthenticated::Loopback,
            "proves a key but this receiver has none",
        ),
        (
            None,
            None,
            Unauthenticated::Refuse,
            "takes authenticated sessions only",
        ),
    ] {
        let (src, dst, g) = run(source_key, receiver_key, policy);
        assert_eq!(src.outcome, Outcome::Failed, "{why}");
        assert!(
            src.error.as_deref().unwrap().contains(why),
            "{why}: {:?}",
            src.error
        );
        assert_eq!(src.pages.total, 0, "{why}: no page was sent");
        assert!(dst.is_none(), "{why}: no report, nothing allocated");
        assert!(g.is_running(), "{why}: the guest keeps running");
    }
    // Without keys on loopback: taken, and reported as unauthenticated.
    let (src, dst, _) = run(None, None, Unauthenticated::Loopback);
    assert_eq!(src.outcome, Outcome::Completed, "{:?}", src.error);
    assert!(!src.authenticated && !dst.unwrap().report.authenticated);
}

/// An address of this host that is not loopback, if it has one.
fn outside_address() -> Option<std::net::IpAddr> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("192.0.2.1:9").ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

#[test]
fn a_keyless_receiver_takes_sources_off_loopback_only_when_insecure() {
    use ferry::transport::{Receiver, Unauthenticated};
    let _serial = serial();
    let Some(ip) = outside_address() else {
        common::missing("this host has no address besides loopback");
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let run = |policy: Unauthenticated| {
        let receiver = rt
            .block_on(Receiver::bind(
                "0.0.0.0:0",
                ReceiverConfig {
                    unauthenticated: policy,
                    ..ReceiverConfig::default()
                },
            ))
            .unwrap();
        let target = format!("{ip}:{}", receiver.local_addr().unwrap().port());
        let ctx = RunContext::default();
        let incoming = rt.spawn(receiver.receive_one(ctx.clone()));
        let g = guest(8 * MIB, FillSpec::default(), WorkloadPattern::Idle, 0);
        let gd: std::sync::Arc<dyn ferry::migration::MigratableGuest> = g.clone();
        let src = rt.block_on(ferry::transport::migrate(
            gd,
            &target,
            &MigrationConfig::default(),
            &RunContext::default(),
        ));
        // A refused peer leaves no report: stop waiting for one.
        if src.outcome != Outcome::Completed {
            std::thread::sleep(std::time::Duration::from_millis(200));
            ctx.cancel.cancel();
        }
        let dst = rt.block_on(incoming).unwrap();
        (src, dst, g)
    };
    let (src, dst, g) = run(Unauthenticated::Loopback);
    assert_eq!(src.outcome, Outcome::Failed);
    let why = format!("unauthenticated session from {ip}:");
    assert!(
        src.error.as_deref().unwrap().contains(&why),
        "{:?}",
        src.error
    );
    assert!(
        src.error
            .as_deref()
            .unwrap()
            .contains("loopback peers only"),
        "{:?}",
        src.error
    );
    assert!(dst.is_none(), "an unproved session leaves no report");
    assert!(g.is_running());
    let (src, dst, _) = run(Unauthenticated::Anywhere);
    assert_eq!(src.outcome, Outcome::Completed, "{:?}", src.error);
    assert!(!dst.unwrap().report.authenticated);
}
