//! The source's rounds: pre-copy until the policy says switch over, then the
//! paused final round, SWITCHOVER and its READY, and GO and its COMPLETE.

use super::{Driver, Tally};
use crate::digest::full_digest;
use crate::memory::{DirtySnapshot, PAGE_SIZE};
use crate::migration::policy::{handoff_allowance, ConvergencePolicy, Decision};
use crate::migration::source_machine::{Rounds, Verdict};
use crate::migration::GuestStep;
use crate::migration::{MigratableGuest, MigrationConfig, MigrationError};
use crate::transport::progress::{Phase, RunContext};
use crate::wire::{Message, VerifyMode};
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
    let (mut rounds, snap) = precopy(d, config, ctx, start, tally, policy).await?;
    let paused_at = switch_over(d, config, ctx, tally, &mut rounds, snap).await?;
    hand_off(d, config, ctx, tally, &mut rounds, paused_at).await
}

/// Pre-copy rounds until the policy says switch over (after a ROUND_END
/// saying the next round is the last). Returns the rounds machine, at
/// its last round, and the snapshot to fill with that round's pages.
async fn precopy(
    d: &mut Driver,
    config: &MigrationConfig,
    ctx: &RunContext,
    start: Instant,
    tally: &mut Tally,
    policy: ConvergencePolicy,
) -> Result<(Rounds, DirtySnapshot), MigrationError> {
    let guest = d.sh.encoder.guest.clone();
    let mut rounds = Rounds::new(policy, start);
    // Forget writes from before the migration: round 0 sends every page,
    // or with a delta every page that differs from the base.
    let mut discard = DirtySnapshot::new();
    guest.snapshot_dirty(&mut discard);
    let mut snap = match (&config.base, tally.delta.used) {
        (Some(base), true) => {
            let (snap, skipped) = delta_round0(d, base).await?;
            tally.delta.pages_skipped = skipped;
            tracing::info!(
                base = %base.migration_id,
                skipped,
                sent = snap.count(),
                "failback by delta: round 0 sends only the pages that changed"
            );
            snap
        }
        _ => DirtySnapshot::all(guest.memory().pages()),
    };
    loop {
        let (round, t0) = (rounds.round(), Instant::now());
        let n = d.enqueue(&snap, round);
        rounds.begin_round(t0, n);
        ctx.progress.start_round(Phase::Precopy, round, n);
        d.drain(None).await?;
        // The count costs a dirty-log sync, as the pause's last one will.
        let synced = Instant::now();
        let dirty = guest.dirty_pages();
        let sync = synced.elapsed();
        rounds.set_pause_cost(sync + tally.rtt * 2 + handoff_allowance(guest.kind()));
        let verdict = rounds.round_drained(Instant::now(), dirty);
        tally.totals = rounds.totals().clone();
        let verdict = match verdict {
            Ok(v) => v,
            Err(e) => {
                // The round the policy gave up after still shows.
                if let Some(&log) = rounds.totals().log.last() {
                    ctx.progress.round_done(log);
                }
                return Err(e);
            }
        };
        follow(&*guest, &rounds, &verdict, ctx);
        let last = verdict.end.final_next;
        d.send_control(Message::RoundEnd(verdict.end)).await?;
        if last {
            return Ok((rounds, snap));
        }
        guest.snapshot_dirty(&mut snap);
    }
}

/// Round 0 of a delta: the pages that differ from `base`, hashed on the
/// blocking pool; the others count as sent. Returns them and how many were
/// left out.
async fn delta_round0(
    d: &Driver,
    base: &crate::migration::delta::Base,
) -> Result<(DirtySnapshot, u64), MigrationError> {
    let (sh, base) = (d.sh.clone(), base.clone());
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    tokio::task::spawn_blocking(move || {
        let e = &sh.encoder;
        crate::migration::delta::round0(e.guest.memory(), &base, &e.hashes, threads)
    })
    .await
    .map_err(|e| crate::transport::task_failed(crate::migration::Task::Delta, &e))
}

/// Throttles the guest if the verdict says so, and shows the round in the
/// progress.
fn follow(guest: &dyn MigratableGuest, rounds: &Rounds, v: &Verdict, ctx: &RunContext) {
    let conv = rounds.convergence();
    if let Decision::Throttle(p) = v.decision {
        guest.set_throttle(p);
        tracing::info!(
            round = v.log.round,
            throttle_pct = p,
            "auto-converge: throttling the guest"
        );
    }
    let dirty_bytes = v.log.dirty_pages_after * PAGE_SIZE as u64;
    ctx.progress.update(|s| {
        s.dirty_pages = v.log.dirty_pages_after;
        s.throughput_bps = conv.throughput_bps().unwrap_or(0.0);
        if v.log.ms > 0.0 {
            s.dirty_rate_bps = dirty_bytes as f64 / (v.log.ms / 1e3);
        }
        s.expected_downtime_ms = conv
            .expected_downtime(dirty_bytes)
            .map(|d| d.as_secs_f64() * 1e3);
        s.throttle_pct = conv.throttle_pct();
    });
    ctx.progress.round_done(v.log);
    tracing::debug!(
        round = v.log.round,
        pages = v.log.pages,
        ms = v.log.ms,
        dirty = v.log.dirty_pages_after,
        decision = ?v.decision,
        "round done"
    );
}

/// Pauses the guest, sends its last dirty pages on every channel, then the
/// state and the digest, and checks the READY. Returns when the guest
/// paused.
async fn switch_over(
    d: &mut Driver,
    config: &MigrationConfig,
    ctx: &RunContext,
    tally: &mut Tally,
    rounds: &mut Rounds,
    mut snap: DirtySnapshot,
) -> Result<Instant, MigrationError> {
    let guest = d.sh.encoder.guest.clone();
    let paused_at = Instant::now();
    guest.pause();
    tally.paused = true;
    tally.counter_at_pause = Some(guest.progress_counter());
    guest.set_throttle(0);
    guest.snapshot_dirty(&mut snap);
    let round = rounds.round();
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
                .map_err(|e| crate::transport::task_failed(crate::migration::Task::Digest, &e))?
        }
    };
    tally.verify = t.elapsed();
    let state = guest.save_state().map_err(|why| MigrationError::Guest {
        step: GuestStep::SaveState,
        why,
    })?;
    let cpu_ms = ctx.cpu.total().as_millis() as u64;
    let msg = rounds.switchover(digest, config.verify, state.into(), cpu_ms)?;
    d.send_control(msg).await?;
    ctx.progress.update(|s| s.phase = Phase::Handoff);
    let reply = d.reply("READY", config.handoff_timeout).await?;
    rounds.handle_ready(&reply)?;
    tally.verified = true;
    Ok(paused_at)
}

/// Commits (unless a cancel came first), sends GO and waits for COMPLETE:
/// from GO on the source never resumes the guest.
async fn hand_off(
    d: &mut Driver,
    config: &MigrationConfig,
    ctx: &RunContext,
    tally: &mut Tally,
    rounds: &mut Rounds,
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
        (step.0)().map_err(|why| MigrationError::Guest {
            step: GuestStep::BeforeGo,
            why,
        })?;
    }
    // From here on the source never resumes the guest.
    let go = rounds.go()?;
    tally.go_sent = true;
    d.send_control(go).await?;
    let reply = d
        .reply_committed("COMPLETE", config.handoff_timeout)
        .await?;
    let cpu_ms = rounds.handle_complete(&reply)?;
    tally.downtime = paused_at.elapsed();
    tally.destination_cpu_ms = Some(cpu_ms as f64);
    Ok(())
}
