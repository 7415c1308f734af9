//! `ferry bench sim`: the migration protocol's deterministic simulation, run
//! over many seeds (or one, replayed), with what the schedules ended in.

use anyhow::Result;
use clap::Args;
use std::process::ExitCode;
use std::time::Instant;

/// Seeds to run.
#[derive(Args, Debug)]
pub(crate) struct SimArgs {
    /// How many seeded schedules to run.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000_000))]
    seeds: u64,
    /// The first seed.
    #[arg(long, default_value_t = 0)]
    first: u64,
    /// Replay this one seed and print how it ended.
    #[arg(long, conflicts_with_all = ["seeds", "first"])]
    seed: Option<u64>,
}

pub(crate) fn sim(a: SimArgs) -> Result<ExitCode> {
    if let Some(seed) = a.seed {
        return Ok(match ferry::migration::sim::run(seed) {
            Ok(o) => {
                println!("{}", serde_json::to_string_pretty(&o)?);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("ferry: {e}");
                ExitCode::FAILURE
            }
        });
    }
    let t = Instant::now();
    let mut ends = std::collections::BTreeMap::<&str, u64>::new();
    let mut handshakes = std::collections::BTreeMap::<&str, u64>::new();
    let (mut faults, mut resent, mut rounds, mut throttled) = (0u64, 0u64, 0u64, 0u64);
    let mut bound = 0u64;
    for seed in a.first..a.first.saturating_add(a.seeds) {
        match ferry::migration::sim::run(seed) {
            Ok(o) => {
                *ends.entry(o.outcome).or_default() += 1;
                *handshakes.entry(o.handshake).or_default() += 1;
                bound += u64::from(o.channels_bound);
                faults += u64::from(o.faults);
                resent += o.resent;
                rounds += u64::from(o.rounds);
                throttled += u64::from(o.throttle_max > 0);
            }
            Err(e) => {
                eprintln!("ferry: {e}");
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{} schedules in {secs:.1} s ({:.0} per second), every invariant held",
        a.seeds,
        a.seeds as f64 / secs
    );
    for (end, n) in ends {
        println!("  {end:<11} {n}");
    }
    println!("  faults injected {faults}, batches resent {resent}");
    println!("  pre-copy rounds {rounds}, schedules throttled {throttled}");
    let shakes: Vec<String> = handshakes.iter().map(|(k, n)| format!("{k} {n}")).collect();
    println!("  handshakes: {}", shakes.join(", "));
    println!("  channels bound after them {bound}");
    Ok(ExitCode::SUCCESS)
}
