//! The command line's arguments: each command's flags and the parsers of
//! their values, shared by `main.rs` and the commands in `cli/`.

use clap::{Args, Parser, Subcommand};
use ferry::codec::{Codec, CodecChoice};
use ferry::memory::{FillSpec, WorkloadPattern};
use ferry::migration::MigrationConfig;
use ferry::units::{parse_bandwidth, parse_duration, parse_rate, parse_size};
use ferry::wire::VerifyMode;
use std::path::PathBuf;
use std::time::Duration;

use super::orchestrate;
use crate::cli;

mod bench;

pub(crate) use bench::*;

/// ferry: live migration of VM memory over a multichannel TCP session.
#[derive(Parser, Debug)]
#[command(name = "ferry", version, about, long_about = None)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
    /// Migrate a running synthetic guest over loopback, inside this process.
    Demo(DemoArgs),
    /// Migrate a running synthetic guest to a `ferry receive`.
    Send(SendArgs),
    /// Wait for migrations and run the guests that arrive.
    Receive(ReceiveArgs),
    /// Measure the parts: the link's raw ceiling, the codecs on guest memory.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Write a synthetic guest's initial memory as a raw RAM image (for
    /// `--image`, and for QEMU's memory-backend-file in scripts/qemu-compare).
    Image(ImageArgs),
    /// Write a TLS certificate and key (PEM) for `receive --tls-cert/--tls-key`,
    /// the certificate being what `send --tls-ca` pins.
    TlsCert(TlsCertArgs),
    /// Run a node agent: host VMs, take migrations from the cluster's other
    /// nodes, serve the control API (HTTP, bearer token) and /metrics.
    Agent(AgentArgs),
    /// List, create and delete the cluster's VMs (through their agents).
    Vm(VmArgs),
    /// Live-migrate a VM of the cluster to another node.
    Migrate(MigrateCmd),
    /// Settle an unresolved migration: say where the VM runs, after its
    /// source node has asked the target.
    Resolve(ResolveCmd),
    /// Show, drain and resume the cluster's nodes.
    #[command(name = "node")]
    Node(NodeArgs),
    /// Cluster-wide operations: a rolling update.
    Cluster(ClusterArgs),
}

#[derive(Args, Debug)]
pub(crate) struct ClusterArgs {
    #[command(flatten)]
    pub(crate) cluster: orchestrate::ClusterArg,
    #[command(subcommand)]
    pub(crate) cmd: cli::update::ClusterCommand,
}

#[derive(Args, Debug)]
pub(crate) struct VmArgs {
    #[command(flatten)]
    pub(crate) cluster: orchestrate::ClusterArg,
    #[command(subcommand)]
    pub(crate) cmd: orchestrate::VmCommand,
}

#[derive(Args, Debug)]
pub(crate) struct MigrateCmd {
    #[command(flatten)]
    pub(crate) cluster: orchestrate::ClusterArg,
    #[command(flatten)]
    pub(crate) args: orchestrate::MigrateVmArgs,
}

#[derive(Args, Debug)]
pub(crate) struct ResolveCmd {
    #[command(flatten)]
    pub(crate) cluster: orchestrate::ClusterArg,
    #[command(flatten)]
    pub(crate) args: orchestrate::ResolveArgs,
}

#[derive(Args, Debug)]
pub(crate) struct NodeArgs {
    #[command(flatten)]
    pub(crate) cluster: orchestrate::ClusterArg,
    #[command(subcommand)]
    pub(crate) cmd: orchestrate::NodeCommand,
}

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub(crate) struct AgentArgs {
    #[command(subcommand)]
    pub(crate) sub: Option<AgentCommand>,
    /// The cluster file (nodes, addresses, token).
    #[arg(long, default_value = "cluster.toml", value_name = "FILE")]
    pub(crate) cluster: PathBuf,
    /// This node's name (its [[node]] entry, if the cluster file has one).
    #[arg(long)]
    pub(crate) node: Option<String>,
    /// This node's control API address, in place of its [[node]] entry's;
    /// with --data and --memory-capacity, a node without an entry joins
    /// the cluster by registering in etcd.
    #[arg(long, value_name = "HOST:PORT")]
    pub(crate) control: Option<String>,
    /// This node's migration listener address (see --control).
    #[arg(long, value_name = "HOST:PORT")]
    pub(crate) data: Option<String>,
    /// What this node's VMs may use together, such as 64GiB (see --control).
    #[arg(long, value_name = "SIZE")]
    pub(crate) memory_capacity: Option<String>,
    /// This node's control API certificate, PEM (`ferry tls-cert`), which
    /// the others pin from its registration.
    #[arg(long, value_name = "FILE")]
    pub(crate) tls_cert: Option<PathBuf>,
    /// That certificate's private key (a secret file).
    #[arg(long, value_name = "FILE")]
    pub(crate) tls_key: Option<PathBuf>,
    /// Where the agent keeps the paused last copies of VMs across restarts
    /// (default: the cluster file's `state_dir` for this node).
    #[arg(long, value_name = "DIR")]
    pub(crate) state_dir: Option<PathBuf>,
    /// Inject a fault into incoming migrations (tests): POINT:KIND.
    #[arg(long, hide = true, value_parser = fault_arg)]
    pub(crate) fault: Option<ferry::migration::fault::Fault>,
}

/// `ferry agent stop`.
#[derive(Subcommand, Debug)]
pub(crate) enum AgentCommand {
    /// Ask a running agent to stop: it drains its node (its VMs move to the
    /// other nodes) and exits once it hosts nothing, as on SIGTERM.
    Stop {
        /// The node whose agent stops.
        #[arg(long)]
        node: String,
        /// Stop now, discarding the VMs still on the node (named in the answer).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        cluster: orchestrate::ClusterArg,
        /// Print the answer as one line of JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
pub(crate) struct TlsCertArgs {
    /// Where to write the certificate.
    #[arg(long, default_value = "ferry-cert.pem", value_name = "FILE")]
    pub(crate) cert: PathBuf,
    /// Where to write the private key (mode 600).
    #[arg(long, default_value = "ferry-key.pem", value_name = "FILE")]
    pub(crate) key: PathBuf,
}

#[derive(Args, Debug)]
pub(crate) struct ImageArgs {
    /// Image size (e.g. 512MiB, 1GiB).
    #[arg(long, default_value = "1GiB", value_parser = size_arg)]
    pub(crate) memory: u64,
    /// Content mix by weight: zero, text, binary, random.
    #[arg(long, default_value = "zero:35,text:30,binary:20,random:15")]
    pub(crate) fill: FillSpec,
    /// Seed of the content.
    #[arg(long, default_value_t = 1)]
    pub(crate) seed: u64,
    /// The file to write (zero pages become holes).
    #[arg(long, value_name = "FILE")]
    pub(crate) out: PathBuf,
}

pub(crate) fn size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}
pub(crate) fn rate_arg(s: &str) -> Result<u64, String> {
    parse_rate(s).map_err(|e| e.to_string())
}
pub(crate) fn duration_arg(s: &str) -> Result<Duration, String> {
    parse_duration(s).map_err(|e| e.to_string())
}

/// A bandwidth cap: `unlimited` or a rate.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bandwidth(pub(crate) Option<u64>);

pub(crate) fn bandwidth_arg(s: &str) -> Result<Bandwidth, String> {
    parse_bandwidth(s).map(Bandwidth).map_err(|e| e.to_string())
}

#[derive(Args, Debug)]
pub(crate) struct MemoryArgs {
    /// Guest memory size (e.g. 512MiB, 1GiB). Default: 1GiB, or the image's size.
    #[arg(long, value_parser = size_arg)]
    pub(crate) memory: Option<u64>,
    /// Initial content mix by weight: zero, text, binary, random.
    #[arg(long, default_value = "zero:35,text:30,binary:20,random:15")]
    pub(crate) fill: FillSpec,
    /// Load memory from a raw RAM image instead (its size sets --memory).
    #[arg(long, value_name = "FILE", conflicts_with = "fill")]
    pub(crate) image: Option<PathBuf>,
    /// Seed of the initial content and the workload.
    #[arg(long, default_value_t = 1)]
    pub(crate) seed: u64,
}

#[derive(Args, Debug)]
pub(crate) struct GuestArgs {
    #[command(flatten)]
    pub(crate) mem: MemoryArgs,
    /// Write pattern: idle, uniform, sequential, or hot:<size> [default: hot:64MiB,
    /// or all of a smaller guest].
    #[arg(long)]
    pub(crate) workload: Option<WorkloadPattern>,
    /// Bytes the guest writes per second (e.g. 100MB/s, 1Gbit/s).
    #[arg(long, default_value = "100MB/s", value_parser = rate_arg)]
    pub(crate) dirty_rate: u64,
    /// Guest writer threads.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub(crate) writers: u32,
}

#[derive(Args, Debug)]
pub(crate) struct MigrateArgs {
    /// TCP channels (1 to 64).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub(crate) channels: u16,
    /// Batch codec: none, lz4, zstd[:level], or auto (chosen per batch from the
    /// measured link rate and codec speeds).
    #[arg(long, default_value = "auto")]
    pub(crate) codec: CodecChoice,
    /// Cap on wire bytes/s across all channels, switchover included (e.g. 1Gbit/s).
    #[arg(long, default_value = "unlimited", value_parser = bandwidth_arg)]
    pub(crate) max_bandwidth: Bandwidth,
    /// The switchover pause to aim under.
    #[arg(long, default_value = "300ms", value_parser = duration_arg)]
    pub(crate) downtime_limit: Duration,
    /// Digest: fast (per-page hashes kept as pages move) or full (hash all memory in the pause).
    #[arg(long, default_value = "fast")]
    pub(crate) verify: VerifyMode,
    /// Throttle the guest when rounds do not converge: on or off.
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    pub(crate) auto_converge: String,
    /// Give up after this long (default: 150 s per GiB of guest memory).
    #[arg(long, value_parser = duration_arg)]
    pub(crate) completion_timeout: Option<Duration>,
    /// Give up when the remaining bytes stop falling for this long.
    #[arg(long, default_value = "150s", value_parser = duration_arg)]
    pub(crate) progress_timeout: Duration,
    /// Leave the guest paused on the destination after the hand-off.
    #[arg(long)]
    pub(crate) leave_paused: bool,
    /// A channel owing an answer that hears nothing for this long is dead:
    /// its batches go to the others and it rebinds; with every channel dead
    /// this long, the migration fails.
    #[arg(long, default_value = "10s", value_parser = duration_arg)]
    pub(crate) peer_timeout: Duration,
    /// Encrypt every channel with TLS 1.3.
    #[arg(long)]
    pub(crate) tls: bool,
    /// Dense pages: a page identical to one the destination already holds
    /// from this round goes as a reference (on or off).
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    pub(crate) dense: String,
    /// Print the report as one line of JSON on stdout.
    #[arg(long)]
    pub(crate) json: bool,
}

impl MigrateArgs {
    pub(crate) fn config(&self) -> MigrationConfig {
        MigrationConfig {
            channels: self.channels,
            codec: self.codec,
            max_bandwidth: self.max_bandwidth.0,
            downtime_limit: self.downtime_limit,
            verify: self.verify,
            auto_converge: self.auto_converge == "on",
            completion_timeout: self.completion_timeout,
            progress_timeout: self.progress_timeout,
            leave_paused: self.leave_paused,
            peer_timeout: self.peer_timeout,
            dense: self.dense == "on",
            ..MigrationConfig::default()
        }
    }
}

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub(crate) struct DemoArgs {
    #[command(subcommand)]
    pub(crate) sub: Option<DemoCommand>,
    /// The guest: sim (ferry's synthetic guest) or kvm (a real KVM guest:
    /// a small guest program on one vCPU; needs /dev/kvm).
    #[arg(long = "guest", value_enum, default_value_t = GuestBackend::Sim)]
    pub(crate) backend: GuestBackend,
    #[command(flatten)]
    pub(crate) guest: GuestArgs,
    #[command(flatten)]
    pub(crate) migrate: MigrateArgs,
}

/// Which guest backend `--guest` names.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum GuestBackend {
    /// Writer threads dirtying memory at the set rate.
    Sim,
    /// A KVM virtual machine running ferry's guest program.
    Kvm,
}

impl GuestBackend {
    pub(crate) fn kind(self) -> ferry::wire::GuestKind {
        match self {
            Self::Sim => ferry::wire::GuestKind::Sim,
            Self::Kvm => ferry::wire::GuestKind::Kvm,
        }
    }
}

#[derive(Subcommand, Debug)]
pub(crate) enum DemoCommand {
    /// Three agents in this process on loopback: VMs on node a, a drain of a
    /// to b and c with progress bars, then a resume with failback.
    Cluster(cli::demo_cluster::DemoClusterArgs),
}

#[derive(Args, Debug)]
pub(crate) struct SendArgs {
    /// The receiver, host:port.
    #[arg(long, value_name = "ADDR")]
    pub(crate) to: String,
    /// The shared key file (mode 600): both sides prove it, and no page is
    /// sent to a receiver that cannot.
    #[arg(long, value_name = "FILE")]
    pub(crate) key: Option<PathBuf>,
    /// Migrate the guest saved in FILE (by an unresolved `ferry send`)
    /// instead of a new one.
    #[arg(long, value_name = "FILE")]
    pub(crate) saved: Option<PathBuf>,
    /// Where to save the paused guest if the migration ends unresolved
    /// [default: ferry-unresolved-SESSION.guest in this folder].
    #[arg(long, value_name = "FILE")]
    pub(crate) save_to: Option<PathBuf>,
    /// With --tls: trust only the receiver presenting this certificate
    /// (PEM). Without it, --key proves the receiver over each TLS channel.
    #[arg(long, value_name = "FILE", requires = "tls")]
    pub(crate) tls_ca: Option<PathBuf>,
    /// The guest: sim (ferry's synthetic guest) or kvm (a real KVM guest:
    /// a small guest program on one vCPU; needs /dev/kvm).
    #[arg(long = "guest", value_enum, default_value_t = GuestBackend::Sim, conflicts_with = "saved")]
    pub(crate) backend: GuestBackend,
    #[command(flatten)]
    pub(crate) guest: GuestArgs,
    #[command(flatten)]
    pub(crate) migrate: MigrateArgs,
}

#[derive(Args, Debug)]
pub(crate) struct ReceiveArgs {
    /// Address to listen on, host:port.
    #[arg(long, value_name = "ADDR")]
    pub(crate) listen: String,
    /// Exit after one migration (completed or failed; sessions refused
    /// before admission do not count).
    #[arg(long)]
    pub(crate) once: bool,
    /// Most guest memory held at once: every guest that arrived (each keeps
    /// running here until ferry exits) and those arriving.
    #[arg(long, default_value = "1TiB", value_parser = size_arg)]
    pub(crate) max_memory: u64,
    /// The shared key file (mode 600): every source must prove it. Without
    /// one, only sources on loopback addresses are taken.
    #[arg(long, value_name = "FILE")]
    pub(crate) key: Option<PathBuf>,
    /// Without --key, take unauthenticated sources from any address (for
    /// trusted, isolated links).
    #[arg(long, conflicts_with = "key")]
    pub(crate) insecure: bool,
    /// Take TLS 1.3 channels only.
    #[arg(long)]
    pub(crate) tls: bool,
    /// With --tls: the certificate to present (PEM) [default: one made at
    /// start, which sources know through --key].
    #[arg(long, value_name = "FILE", requires_all = ["tls", "tls_key"])]
    pub(crate) tls_cert: Option<PathBuf>,
    /// With --tls: the certificate's private key (PEM).
    #[arg(long, value_name = "FILE", requires_all = ["tls", "tls_cert"])]
    pub(crate) tls_key: Option<PathBuf>,
    /// Give up on a session when no byte arrives on any of its channels for
    /// this long.
    #[arg(long, default_value = "10s", value_parser = duration_arg)]
    pub(crate) peer_timeout: Duration,
    /// Sessions received at once; more are refused.
    #[arg(long, default_value_t = 16)]
    pub(crate) max_sessions: usize,
    /// Kept zstd streams decoded at once over all sessions (16 MiB each);
    /// 0 declines the codec.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u16).range(0..=1024))]
    pub(crate) kept_streams: u16,
    /// Longest wait for a connection's first frame and a session's setup.
    #[arg(long, default_value = "10s", value_parser = duration_arg)]
    pub(crate) handshake_timeout: Duration,
    /// Inject a fault (tests of the hand-off rules): POINT:KIND.
    #[arg(long, hide = true, value_parser = fault_arg)]
    pub(crate) fault: Option<ferry::migration::fault::Fault>,
    /// Print each report as one line of JSON on stdout.
    #[arg(long)]
    pub(crate) json: bool,
}

/// A fault to inject (`POINT:KIND`), refused by a build without the hooks:
/// they are compiled into test builds only (cargo's `faults` feature).
fn fault_arg(s: &str) -> Result<ferry::migration::fault::Fault, String> {
    if !cfg!(feature = "faults") {
        return Err(
            "fault injection is compiled into test builds only (cargo's `faults` feature)".into(),
        );
    }
    s.parse()
}
