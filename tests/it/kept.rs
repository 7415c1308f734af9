//! Kept zstd streams over real sockets: what a receiver offers and holds of
//! them. (Resent batches on other connections' streams: `failover`.)

use crate::common;

use common::*;
use ferry::codec::{Codec, CodecChoice};
use ferry::memory::{FillSpec, WorkloadPattern};
use ferry::migration::{MigrationConfig, Outcome, Report, Shortfall};
use ferry::transport::{migrate_over_loopback, Incoming, ReceiverConfig, RunContext, StreamBudget};

const MIB: u64 = 1 << 20;

/// Migrates a 32 MiB guest with `codec` over 4 channels to a receiver
/// holding at most `streams` kept streams at once.
fn migrate(codec: CodecChoice, streams: usize) -> (Report, Option<Incoming>) {
    let g = guest(
        32 * MIB,
        FillSpec::default(),
        WorkloadPattern::Hot { bytes: 2 * MIB },
        5_000_000,
    );
    let config = MigrationConfig {
        channels: 4,
        codec,
        leave_paused: true,
        ..MigrationConfig::default()
    };
    let rx = ReceiverConfig {
        kept_streams: StreamBudget::new(streams),
        ..ReceiverConfig::default()
    };
    let (report, incoming) =
        migrate_over_loopback(g.clone(), &config, RunContext::default(), rx).unwrap();
    if report.outcome == Outcome::Completed {
        let dst = incoming.as_ref().expect("the destination reports");
        let dm = dst.memory.as_ref().unwrap();
        assert_eq!(first_difference(g.memory(), dm), None, "memories differ");
    }
    (report, incoming)
}

#[test]
fn a_receiver_holds_no_more_kept_streams_than_its_budget() {
    let _serial = serial();
    let stream = CodecChoice::Fixed(Codec::ZstdStream { level: 1 });
    // Four connections, four streams.
    let (ok, _) = migrate(stream, 4);
    assert_eq!(ok.outcome, Outcome::Completed, "{:?}", ok.error);
    assert!(ok.pages.compressed > 0, "{:?}", ok.pages);
    // Room for two of four: the third connection's first stream batch ends
    // the session, and the source's guest runs on.
    let (short, dst) = migrate(stream, 2);
    assert_eq!(short.outcome, Outcome::Failed, "{short:?}");
    let dst = dst.expect("the destination reports");
    let said = Shortfall::KeptStreams { limit: 2 }.to_string();
    assert!(
        dst.report
            .error
            .as_deref()
            .is_some_and(|e| e.contains(&said)),
        "{:?}",
        dst.report.error
    );
    // None at all: not offered, so a fixed stream is refused at once and
    // auto goes without.
    let (refused, _) = migrate(stream, 0);
    assert_eq!(refused.outcome, Outcome::Failed);
    assert!(
        refused
            .error
            .as_deref()
            .unwrap_or("")
            .contains("cannot decode zstd-stream"),
        "{:?}",
        refused.error
    );
    let (auto, _) = migrate(CodecChoice::Auto, 0);
    assert_eq!(auto.outcome, Outcome::Completed, "{:?}", auto.error);
}
