//! Deterministic simulation of a migration session: the source's session
//! machine and the destination's protocol machine and ledgers, over an
//! in-memory network on a virtual clock, with a guest that dirties pages and
//! faults (resets, stalls, partitions, a crashing destination, an operator's
//! cancel) all drawn from one seed. A failing seed names itself and replays
//! exactly: [`run`] with the same seed takes the same steps.
//!
//! Each seed also draws a session handshake ([`handshake`]): keys, policies,
//! bindings, codecs and an on-path change to one message.
//!
//! Checked on every schedule: the machine's accounting after every step; at
//! the end, that the guest runs in exactly one place or the source keeps
//! its paused copy as unresolved; that a completed migration's memory equals
//! the source's at the pause; that a failed one leaves the source running;
//! and that the session ends within its deadlines.

#[cfg(feature = "net")]
mod binds;
mod dest;
#[cfg(feature = "net")]
pub mod handshake;
mod net;
mod source;

use source::{End, SimSource};

/// A small seeded generator (splitmix64): the same seed, the same schedule.
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A value in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// True `percent` times in a hundred.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// Sixteen bytes for a nonce or token (one draw, written twice: a
    /// simulated nonce needs to differ, not to be secret).
    pub fn bytes16(&mut self) -> [u8; 16] {
        let b = self.next_u64().to_le_bytes();
        let mut out = [0; 16];
        out[..8].copy_from_slice(&b);
        out[8..].copy_from_slice(&b);
        out
    }
}

/// The digest both sides compute over guest memory (one version per page).
fn digest(memory: &[u64]) -> u64 {
    memory
        .iter()
        .enumerate()
        .fold(0xcbf2_9ce4_8422_2325, |h, (i, v)| {
            (h ^ (i as u64).wrapping_mul(31) ^ v).wrapping_mul(0x0100_0000_01b3)
        })
}

/// How a simulated migration ended.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SimOutcome {
    /// The seed.
    pub seed: u64,
    /// `completed`, `failed`, `gave-up` (the convergence policy's verdict),
    /// `cancelled` or `unresolved`.
    pub outcome: &'static str,
    /// The source's error, if it failed.
    pub error: Option<String>,
    /// Virtual milliseconds it took.
    pub virtual_ms: u64,
    /// Faults injected.
    pub faults: u32,
    /// Batches sent again after a connection failed.
    pub resent: u64,
    /// Pre-copy rounds the policy judged.
    pub rounds: u32,
    /// The highest auto-converge throttle it asked for, percent.
    pub throttle_max: u8,
    /// How the seed's handshake schedule ended: `set up`, or why not
    /// (`unauthenticated`, `incompatible`, `protocol`, `refused: ...`).
    pub handshake: &'static str,
    /// Channels the handshake's session then bound (1..N, each proved).
    pub channels_bound: u32,
}

/// A schedule that broke an invariant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("seed {seed}: at {at_ms} ms: {what} (replay: ferry bench sim --seed {seed})")]
pub struct SimFailure {
    /// The seed that replays it.
    pub seed: u64,
    /// Virtual time of the failure.
    pub at_ms: u64,
    /// What broke.
    pub what: String,
}

/// The longest a session may take in virtual time before it counts as hung:
/// the completion timeout, the hand-off timeout and the destination's idle
/// timeout, with room.
const HUNG_MS: u64 = 120_000;

/// Runs the schedule of `seed` to its end and checks its invariants.
pub fn run(seed: u64) -> Result<SimOutcome, SimFailure> {
    let fail = |at_ms, what: String| SimFailure { seed, at_ms, what };
    #[cfg(feature = "net")]
    let (handshake, channels_bound) = handshake::run(seed).map_err(|what| fail(0, what))?;
    #[cfg(not(feature = "net"))]
    let (handshake, channels_bound) = ("not built", 0);
    let mut s = SimSource::new(seed);
    loop {
        s.step().map_err(|what| fail(s.now, what))?;
        if s.finished() {
            break;
        }
        if s.now > HUNG_MS {
            return Err(fail(s.now, format!("hung in {}", s.describe())));
        }
    }
    s.check_end().map_err(|what| fail(s.now, what))?;
    let (outcome, error) = match &s.end {
        Some(End::Completed) => ("completed", None),
        Some(End::Failed(e)) => ("failed", Some(e.clone())),
        Some(End::GaveUp(e)) => ("gave-up", Some(e.clone())),
        Some(End::Cancelled) => ("cancelled", None),
        Some(End::Unresolved(e)) => ("unresolved", Some(e.clone())),
        None => return Err(fail(s.now, "finished without an outcome".into())),
    };
    Ok(SimOutcome {
        seed,
        outcome,
        error,
        virtual_ms: s.now,
        faults: s.faults,
        resent: s.m.tallies().resent,
        rounds: s.rounds().totals().rounds,
        throttle_max: s.rounds().totals().throttle_max,
        handshake,
        channels_bound,
    })
}

/// Runs `count` seeds from `first`; returns the outcomes or the first failure.
pub fn run_many(first: u64, count: u64) -> Result<Vec<SimOutcome>, SimFailure> {
    (first..first.saturating_add(count)).map(run).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_replays_exactly() {
        for seed in [1, 2, 3, 77] {
            assert_eq!(run(seed), run(seed));
        }
    }

    #[test]
    fn thousands_of_seeded_schedules_keep_every_invariant() {
        let outcomes = run_many(0, 3000).unwrap_or_else(|e| panic!("{e}"));
        let count = |o: &str| outcomes.iter().filter(|x| x.outcome == o).count();
        // The schedules reach every ending, not one kind only.
        for o in ["completed", "failed", "cancelled", "unresolved"] {
            assert!(count(o) > 0, "no schedule ended {o}");
        }
        assert!(count("completed") > outcomes.len() / 3);
        assert!(
            outcomes.iter().any(|o| o.resent > 0),
            "no batch was ever resent"
        );
        // The real policy judged them: some took several rounds, some
        // were throttled, and it gave up on a guest outrunning its link.
        assert!(outcomes.iter().any(|o| o.rounds > 3), "never past round 3");
        assert!(
            outcomes.iter().any(|o| o.throttle_max > 0),
            "never throttled"
        );
        assert!(count("gave-up") > 0, "never gave up");
    }

    #[test]
    #[ignore = "long: cargo test --release -- --ignored sim_long"]
    fn sim_long() {
        let n = std::env::var("FERRY_SIM_SEEDS")
            .ok()
            .and_then(|s| s.parse().ok());
        run_many(1_000_000, n.unwrap_or(1_000_000)).unwrap_or_else(|e| panic!("{e}"));
    }
}
