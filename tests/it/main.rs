//! Every integration test, as one binary: real migrations over real
//! sockets, real processes, agents and KVM guests. One binary links once
//! (each test file used to link a copy of the crate on its own); the
//! modules keep the files' names, so `cargo test --test it hostile::` runs
//! what `--test hostile` ran.

mod common;

mod agent;
mod arrival;
mod bandwidth;
mod bench_cluster;
mod cli;
mod console;
mod console_load;
mod delta;
mod dense;
mod drain;
mod durable;
mod etcd;
mod events;
mod failover;
mod fence;
mod fuzz_regressions;
mod ha;
mod handoff;
mod hostile;
mod join;
mod kept;
mod kvm;
mod layers;
mod metrics;
mod migration;
mod orchestrator;
mod quorum;
mod receive;
mod relay;
mod resolve;
mod retention;
mod rolling;
mod session;
mod shutdown;
mod survive;
mod tbf;
mod tls;
