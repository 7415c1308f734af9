//! `ferry bench hostile`: the hostile suite against a live receiver
//! (`--target ADDR`) or an agent of a cluster (`--node NAME`), as a table of
//! input and outcome; exit 1 when any outcome breaks a promise.

use super::orchestrate::ClusterArg;
use crate::{load_key, usage};
use anyhow::Result;
use clap::Args;
use ferry::bench::hostile::{run, run_api, Case, RealMigration, Target};
use std::path::PathBuf;
use std::process::ExitCode;

/// `ferry bench hostile` flags.
#[derive(Args, Debug)]
pub struct HostileArgs {
    /// A receiver's migration listener, host:port.
    #[arg(
        long,
        value_name = "ADDR",
        conflicts_with = "node",
        required_unless_present = "node"
    )]
    target: Option<String>,
    /// With --target: the key the receiver takes (a real source proves it).
    #[arg(long, value_name = "FILE", requires = "target")]
    key: Option<PathBuf>,
    /// With --target: the receiver takes TLS only.
    #[arg(long, requires = "target")]
    tls: bool,
    /// An agent of the cluster file: its listener and its API; the closing
    /// migration moves a VM to it from another node.
    #[arg(long)]
    node: Option<String>,
    #[command(flatten)]
    cluster: ClusterArg,
    /// Silent connections held open during the closing migration (1 to 4096).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..=4096))]
    flood: u16,
    /// Print the cases as one line of JSON.
    #[arg(long)]
    json: bool,
}

/// Runs the suite.
pub fn hostile(a: HostileArgs) -> Result<ExitCode> {
    let rt = tokio::runtime::Runtime::new()?;
    let cases: Vec<Case> = match (&a.target, &a.node) {
        (Some(addr), _) => {
            let target = Target {
                data: addr.clone(),
                key: a.key.as_deref().map(load_key).transpose()?,
                tls: a.tls,
                flood: a.flood.into(),
                real: RealMigration::Direct,
            };
            rt.block_on(run(&target))
        }
        (None, Some(node)) => {
            let cluster = ferry::agent::Cluster::load(&a.cluster.cluster)
                .map_err(|e| usage(e.to_string()))?;
            let spec = cluster.require_node(node).map_err(usage)?.clone();
            let from = cluster
                .nodes
                .iter()
                .find(|n| n.name != spec.name)
                .ok_or_else(|| usage("--node: the cluster needs another node to migrate from"))?
                .name
                .clone();
            let target = Target {
                data: spec.data.clone(),
                key: Some(ferry::migration::auth::SessionKey(cluster.key.clone())),
                tls: cluster.tls,
                flood: a.flood.into(),
                real: RealMigration::Agents {
                    cluster: Box::new(cluster.clone()),
                    from,
                    to: spec.name.clone(),
                },
            };
            let mut cases = rt.block_on(run_api(&cluster, &spec.name));
            cases.extend(rt.block_on(run(&target)));
            cases
        }
        (None, None) => return Err(usage("--target ADDR or --node NAME")),
    };
    if a.json {
        println!("{}", serde_json::to_string(&cases)?);
    } else {
        println!("{:<26} {:<6} INPUT → OUTCOME (PROMISE)", "CASE", "OK");
        for c in &cases {
            println!(
                "{:<26} {:<6} {} → {} ({})",
                c.case,
                if c.ok { "yes" } else { "NO" },
                c.input,
                c.outcome,
                c.expected
            );
        }
    }
    Ok(if cases.iter().all(|c| c.ok) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
