//! The source's rounds: pre-copy until the policy says switch over, then the
//! paused final round, SWITCHOVER and its READY, and GO and its COMPLETE.

use super::connect::unexpected;
use super::{Driver, Tally};
use crate::digest::full_digest;
use crate::memory::{DirtySnapshot, PAGE_SIZE};
use crate::migration::policy::{Convergence, ConvergencePolicy, Decision, RoundStats};
use crate::migration::progress::{Phase, RunContext};
use crate::migration::report::{round3, RoundLog};
use crate::migration::{MigratableGuest, MigrationConfig, MigrationError};
use crate::wire::{Message, RoundEnd, Switchover, VerifyMode};
use std::time::Instant;

/// Runs the whole migration over the driver's channels.
pub(super) async fn precopy_and_handoff(
    d: &mut Driver,
    config: &MigrationConfig,
    ctx: &RunContext,
    start: Instant,
    tally: &mut Tally,
    policy: ConvergencePolicy,
) -> Result<(), MigrationError> {
    let (round, snap) = precopy(d, ctx, start, tally, policy).await?;
    let paused_at = switch_over(d, config, ctx, tally, round, snap).await?;
    hand_off(d, config, ctx, tally, paused_at).await
}

/// Pre-copy rounds until the policy says switch over (after a ROUND_END
/// saying the next round is the last). Returns that round's number and
/// the snapshot to fill with its pages.
async fn precopy(
    d: &mut Driver,
    ctx: &RunContext,
    start: Instant,
    tally: &mut Tally,
    policy: ConvergencePolicy,
) -> Result<(u32, DirtySnapshot), MigrationError> {
    let guest = d.sh.encoder.guest.clone();
    let mut conv = Convergence::new(policy);
    let mut snap = DirtySnapshot::all(guest.memory().pages());
    // Forget writes from before the migration: round 0 sends every page.
    let mut discard = DirtySnapshot::new();
    guest.snapshot_dirty(&mut discard);
    let mut round = 0u32;
    loop {
        let t0 = Instant::now();
        let n = d.enqueue(&snap, round);
        ctx.progress.start_round(Phase::Precopy, round, n);
        d.drain(None).await?;
        let stats = RoundStats {
            round,
            elapsed: start.elapsed(),
            duration: t0.elapsed(),
            bytes_sent: n * PAGE_SIZE as u64,
            dirty_bytes: guest.dirty_pages() * PAGE_SIZE as u64,
        };
        let decision = decide(&*guest, &mut conv, &stats, ctx, tally);
        let final_next = match decision {
            Decision::GiveUp(g) => return Err(MigrationError::NotConverging(g)),
            Decision::Switchover => true,
            Decision::Continue | Decision::Throttle(_) => false,
        };
        let end = RoundEnd {
            round,
            pages: n,
            final_next,
        };
        d.send_control(Message::RoundEnd(end)).await?;
        round += 1;
        if final_next {
            return Ok((round, snap));
        }
        guest.snapshot_dirty(&mut snap);
    }
}

/// Asks the policy about a finished round, throttles the guest if it says
/// so, and records the round in the tally, the log and the progress.
fn decide(
    guest: &dyn MigratableGuest,
    conv: &mut Convergence,
    stats: &RoundStats,
    ctx: &RunContext,
    tally: &mut Tally,
) -> Decision {
    let (round, duration) = (stats.round, stats.duration);
    let dirty = stats.dirty_bytes / PAGE_SIZE as u64;
    tally.rounds = round + 1;
    tally.dirty_bytes += stats.dirty_bytes;
    tally.dirty_time += duration;
    let decision = conv.decide(stats);
    if let Decision::Throttle(p) = decision {
        guest.set_throttle(p);
        tally.throttle_max = tally.throttle_max.max(p);
        tracing::info!(
            round,
            throttle_pct = p,
            "auto-converge: throttling the guest"
        );
    }
    let log = RoundLog {
        round,
        pages: stats.bytes_sent / PAGE_SIZE as u64,
        ms: round3(duration.as_secs_f64() * 1e3),
        dirty_pages_after: dirty,
        throttle_pct: conv.throttle_pct(),
    };
    tally.round_log.push(log);
    ctx.progress.update(|s| {
        s.dirty_pages = dirty;
        s.throughput_bps = conv.throughput_bps().unwrap_or(0.0);
        s.expected_downtime_ms = conv
            .expected_downtime(stats.dirty_bytes)
            .map(|d| d.as_secs_f64() * 1e3);
        s.throttle_pct = conv.throttle_pct();
    });
    ctx.progress.round_done(log);
    tracing::debug!(
        round,
        pages = log.pages,
        ?duration,
        dirty,
        ?decision,
        "round done"
    );
    decision
}

/// Pauses the guest, sends its last dirty pages on every channel, then the
/// state and the digest, and checks the READY. Returns when the guest
/// paused.
async fn switch_over(
    d: &mut Driver,
    config: &MigrationConfig,
    ctx: &RunContext,
    tally: &mut Tally,
    round: u32,
    mut snap: DirtySnapshot,
) -> Result<Instant, MigrationError> {
    let guest = d.sh.encoder.guest.clone();
    let paused_at = Instant::now();
    guest.pause();
    tally.paused = true;
    tally.counter_at_pause = Some(guest.progress_counter());
    guest.set_throttle(0);
    guest.snapshot_dirty(&mut snap);
    let n = d.enqueue(&snap, round);
    ctx.progress.start_round(Phase::Switchover, round, n);
    let final_deadline = Instant::now() + config.handoff_timeout;
    d.drain(Some(final_deadline)).await?;
    let t = Instant::now();
    let digest = match config.verify {
        VerifyMode::Fast => d.sh.encoder.hashes.digest(),
        VerifyMode::Full => {
            let mem = guest.memory().clone();
            tokio::task::spawn_blocking(move || full_digest(&mem, 2))
                .await
                .map_err(|e| MigrationError::Internal(format!("digest task: {e}")))?
        }
    };
    tally.verify = t.elapsed();
    let state = guest.save_state().map_err(MigrationError::Guest)?;
    d.send_control(Message::Switchover(Switchover {
        final_round: round,
        digest,
        verify: config.verify,
        rounds: tally.rounds,
        dirty_rate_bps: if tally.dirty_time.is_zero() {
            0
        } else {
            (tally.dirty_bytes as f64 / tally.dirty_time.as_secs_f64()) as u64
        },
        throttle_pct_max: tally.throttle_max,
        source_cpu_ms: ctx.cpu.total().as_millis() as u64,
        state: state.into(),
    }))
    .await?;
    ctx.progress.update(|s| s.phase = Phase::Handoff);
    match d.reply("READY", config.handoff_timeout).await? {
        Message::Ready(r) if r.digest == digest => tally.verified = true,
        Message::Ready(r) => {
            return Err(MigrationError::DigestMismatch {
                source_digest: digest,
                destination_digest: r.digest,
            })
        }
        m => return Err(unexpected("READY", &m)),
    }
    Ok(paused_at)
}

/// Commits (unless a cancel came first), sends GO and waits for COMPLETE:
/// from GO on the source never resumes the guest.
async fn hand_off(
    d: &mut Driver,
    config: &MigrationConfig,
    ctx: &RunContext,
    tally: &mut Tally,
    paused_at: Instant,
) -> Result<(), MigrationError> {
    // A cancel that came first keeps the guest here; once committed, cancels
    // are refused and the hand-off finishes.
    if ctx.cancel.is_cancelled() || !ctx.progress.commit() {
        return Err(MigrationError::Cancelled);
    }
    // A step that must hold before the guest is handed over (a saved
    // guest's file marked consumed): failing, GO does not go out.
    if let Some(step) = &config.before_go {
        (step.0)().map_err(|e| MigrationError::Guest(format!("before GO: {e}")))?;
    }
    // From here on the source never resumes the guest.
    tally.go_sent = true;
    d.send_control(Message::Go).await?;
    match d
        .reply_committed("COMPLETE", config.handoff_timeout)
        .await?
    {
        Message::Complete(c) => {
            tally.downtime = paused_at.elapsed();
            tally.destination_cpu_ms = Some(c.destination_cpu_ms as f64);
            Ok(())
        }
        m => Err(unexpected("COMPLETE", &m)),
    }
}
