//! The `ferry` command line: the migration engine (`demo`, `send`, `receive`, `bench`, `image`), the node agent (`agent`) and the orchestrator's commands (`vm`, `migrate`, `node`, `cluster`).

use clap::Parser;
use std::process::ExitCode;

mod cli {
    pub mod agent;
    pub mod analyze;
    pub mod args;
    pub mod bench;
    pub mod bench_agents;
    pub mod bench_cycle;
    pub mod bench_drain;
    pub mod demo;
    pub mod demo_cluster;
    pub mod files;
    pub mod guest;
    pub mod hostile;
    pub mod local_etcd;
    pub mod orchestrate;
    pub mod progress;
    pub mod receive;
    pub mod rolling;
    pub mod send;
    pub mod signals;
    pub mod sim;
    pub mod soak;
    pub mod update;
}
use cli::args::*;
use cli::bench::*;
// What the command families share, at the crate root where they name it.
use cli::guest::{
    build_guest, build_memory, check_kvm, content_of, describe_guest, load_key, outcome_name,
    usage, workload_for,
};
use cli::orchestrate;
use cli::progress::*;
use cli::signals::cancel_on_signals;

/// A usage error found after parsing: one line, exit status 2.
#[derive(Debug)]
pub(crate) struct UsageError(String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for UsageError {}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                e.exit();
            }
            // A bad flag or value: one line, exit status 2.
            // Clap's message ends at its first blank line; fold it into one line.
            let text = e.to_string();
            let line: Vec<&str> = text
                .lines()
                .map(str::trim)
                .take_while(|l| !l.is_empty())
                .collect();
            eprintln!("{}", line.join(" "));
            return ExitCode::from(2);
        }
    };
    // The demo and the benches run many sessions in-process: keep them quiet.
    let default_log = match cli.command {
        Command::Demo(_) | Command::Bench(_) => "warn",
        _ => "info",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_log));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    let result = match cli.command {
        Command::Demo(a) => cli::demo::demo(a),
        Command::Send(a) => cli::send::send(a),
        Command::Receive(a) => cli::receive::receive(a),
        Command::Bench(BenchCommand::Link(a)) => bench_link(a),
        Command::Bench(BenchCommand::Codecs(a)) => bench_codecs(a),
        Command::Bench(BenchCommand::Sweep(a)) => bench_sweep(a),
        Command::Bench(BenchCommand::Drain(a)) => cli::bench_drain::bench_drain(a),
        Command::Bench(BenchCommand::Cycle(a)) => cli::bench_cycle::bench_cycle(a),
        Command::Bench(BenchCommand::Kvm(a)) => bench_kvm(a),
        Command::Bench(BenchCommand::Soak(a)) => cli::soak::soak(a),
        Command::Bench(BenchCommand::Hostile(a)) => cli::hostile::hostile(a),
        Command::Bench(BenchCommand::Sim(a)) => cli::sim::sim(a),
        Command::Image(a) => cli::files::image(a),
        Command::TlsCert(a) => cli::files::tls_cert(a),
        Command::Agent(a) => cli::agent::agent(a),
        Command::Vm(a) => orchestrate::vm(a.cmd, &a.cluster),
        Command::Migrate(a) => orchestrate::migrate(a.args, &a.cluster),
        Command::Resolve(a) => orchestrate::resolve(a.args, &a.cluster),
        Command::Node(a) => orchestrate::node(a.cmd, &a.cluster),
        Command::Cluster(a) => cli::update::cluster(a.cmd, &a.cluster),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.downcast_ref::<UsageError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}
