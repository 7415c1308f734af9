//! `ferry bench`'s subcommands, their flags and the parsers of their lists
//! (codecs, links, labelled values).

use super::*;
use ferry::agent::request::Concurrency;

#[derive(Subcommand, Debug)]
pub(crate) enum BenchCommand {
    /// Raw TCP throughput of N connections: the ceiling a migration is compared with.
    Link(LinkArgs),
    /// Each codec's encode/decode speed per core and its ratio on guest memory.
    Codecs(CodecsArgs),
    /// Real migrations over a grid of codecs × link speeds × guests.
    Sweep(SweepArgs),
    /// Drains of a node's VMs to two others through the node's one link,
    /// for each concurrency × codec × link speed: drain time, each VM's
    /// time and pause, wire bytes, the agents' CPU.
    Drain(DrainBenchArgs),
    /// A rolling update of three nodes with VMs on each: every node drained,
    /// updated (a no-op command) and resumed with failback in turn; the
    /// total, each phase's time and wire bytes.
    Cycle(CycleBenchArgs),
    /// What a KVM guest's parts cost here: the dirty log's sync per GiB, the
    /// guest's write rate under dirty tracking, and the switchover's steps.
    Kvm(KvmBenchArgs),
    /// Guests moved back and forth between two agent processes, hundreds of
    /// times: mismatches, failures, and the agents' memory and descriptors.
    Soak(cli::soak::SoakArgs),
    /// The hostile suite against a live receiver or agent: what each hostile
    /// input got, against what ferry promises; a real migration at the end.
    Hostile(cli::hostile::HostileArgs),
    /// The protocol's deterministic simulation over many seeds: faults,
    /// outcomes and every invariant checked; `--seed N` replays one.
    Sim(cli::sim::SimArgs),
}

#[derive(Args, Debug)]
pub(crate) struct SweepArgs {
    /// The guests' backend: sim (synthetic) or kvm (KVM guests; needs
    /// /dev/kvm). Applies to every guest of the grid.
    #[arg(long = "guest", value_enum, default_value_t = GuestBackend::Sim)]
    pub(crate) backend: GuestBackend,
    #[command(flatten)]
    pub(crate) guest: GuestArgs,
    /// Use a built-in guest set instead of the guest flags: `standard` is an
    /// idle realistic mix, a busy hot set and incompressible data; `changing` is
    /// one idle guest whose page mix changes part by part (text, incompressible,
    /// binary, the realistic mix). Of --memory each, default 256MiB.
    #[arg(long, value_parser = ["standard", "changing"])]
    pub(crate) guest_set: Option<String>,
    /// Codecs to compare (`auto` included).
    #[arg(long, default_value = "none,lz4,zstd:1,zstd:3,auto", value_parser = choice_list_arg)]
    pub(crate) codecs: ChoiceList,
    /// Link speeds (`unlimited` for none), emulated as --link says.
    #[arg(long, default_value = "100Mbit,1Gbit,10Gbit,unlimited", value_parser = link_list_arg)]
    pub(crate) bandwidth: LinkList,
    /// How to emulate a link: `cap` (ferry's own bandwidth cap, over loopback)
    /// or `tbf` (root, Linux: the receiver and the sender in two network
    /// namespaces joined by a veth pair shaped by a `tc` tbf qdisc; set up and
    /// torn down by the sweep itself).
    #[arg(long, default_value = "cap", value_parser = ["cap", "tbf"])]
    pub(crate) link: String,
    /// Migrations per cell; medians and spreads are over these.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub(crate) repeats: u32,
    /// TCP channels per migration.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub(crate) channels: u16,
    /// Migrate over TLS, as agents do (`--tls` or `--tls on`), plain TCP
    /// (`off`), or both as an axis of the grid (`both`: `+tls` rows).
    #[arg(long, value_enum, num_args = 0..=1, default_value_t = Axis::Off, default_missing_value = "on")]
    pub(crate) tls: Axis,
    /// Dense pages (`on`, the default), every page's bytes (`off`), or both
    /// as an axis of the grid (`both`: `-dense` rows have them off).
    #[arg(long, value_enum, default_value_t = Axis::On)]
    pub(crate) dense: Axis,
    /// Write results.json, results.csv and report.md into this directory.
    #[arg(long, value_name = "DIR")]
    pub(crate) out: Option<PathBuf>,
    /// Print the cells as one line of JSON on stdout instead of the table.
    #[arg(long)]
    pub(crate) json: bool,
}

/// The VMs of `bench drain` and `bench cycle`.
#[derive(Args, Debug)]
pub(crate) struct BenchVmArgs {
    /// Memory of each VM [default: 512MiB, or the image's size].
    #[arg(long, value_parser = size_arg)]
    pub(crate) memory: Option<u64>,
    /// Write patterns, given to the VMs in turn (`idle,hot:64MiB`: every
    /// other VM idle): idle, uniform, sequential, hot:<size>.
    #[arg(long, default_value = "hot:32MiB", value_parser = workload_list_arg)]
    pub(crate) workload: WorkloadList,
    /// Bytes each VM writes per second.
    #[arg(long, default_value = "50MB/s", value_parser = rate_arg)]
    pub(crate) dirty_rate: u64,
    /// Initial content mix by weight: zero, text, binary, random.
    #[arg(long, default_value = "zero:35,text:30,binary:20,random:15")]
    pub(crate) fill: FillSpec,
    /// Every VM's memory from this raw RAM image instead (an absolute path;
    /// its size sets --memory), e.g. from scripts/real-image.py.
    #[arg(long, value_name = "FILE", conflicts_with = "fill")]
    pub(crate) image: Option<PathBuf>,
    /// The VMs' backend: sim (synthetic) or kvm (KVM guests; needs /dev/kvm).
    #[arg(long = "guest", value_enum, default_value_t = GuestBackend::Sim)]
    pub(crate) backend: GuestBackend,
}

#[derive(Args, Debug)]
pub(crate) struct DrainBenchArgs {
    /// VMs on the drained node.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub(crate) vms: u32,
    #[command(flatten)]
    pub(crate) guest: BenchVmArgs,
    /// Migrations at once, each an axis point (1 to 64, or `auto`: the
    /// node chooses, and each drain records what it chose).
    #[arg(long, default_value = "1,2,4,8", value_parser = concurrency_list_arg)]
    pub(crate) max_concurrent: ConcurrencyList,
    /// Codecs of the drained node's migrations (its `codec` setting).
    #[arg(long, default_value = "auto", value_parser = choice_list_arg)]
    pub(crate) codecs: ChoiceList,
    /// Speeds of the drained node's outgoing link (`unlimited` for none).
    #[arg(long, default_value = "1Gbit,10Gbit", value_parser = link_list_arg)]
    pub(crate) bandwidth: LinkList,
    /// How to emulate the link: `cap` (the node's `max_bandwidth`, one cap
    /// shared by all its migrations, over loopback) or `tbf` (root, Linux:
    /// node a in one network namespace, b, c and etcd in another, joined by
    /// a veth pair shaped by a `tc` tbf qdisc on a's side).
    #[arg(long, default_value = "cap", value_parser = ["cap", "tbf"])]
    pub(crate) link: String,
    /// Drains per cell; medians and spreads are over these.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub(crate) repeats: u32,
    /// Write results.json, results.csv, report.md and the charts into this
    /// directory.
    #[arg(long, value_name = "DIR")]
    pub(crate) out: Option<PathBuf>,
    /// Print the cells as one line of JSON on stdout instead of the table.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Args, Debug)]
pub(crate) struct CycleBenchArgs {
    /// VMs on each node.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=32))]
    pub(crate) vms: u32,
    #[command(flatten)]
    pub(crate) guest: BenchVmArgs,
    /// The nodes' codec (their `codec` setting).
    #[arg(long, default_value = "auto")]
    pub(crate) codec: CodecChoice,
    /// Each node's outgoing link (`unlimited` for none), shared by its
    /// migrations, emulated as --link says.
    #[arg(long, default_value = "1Gbit/s", value_parser = bandwidth_arg)]
    pub(crate) bandwidth: Bandwidth,
    /// How to emulate the links: `cap` (each node's `max_bandwidth`, over
    /// loopback) or `tbf` (root, Linux: each node in a network namespace of
    /// its own, joined to a bridge by a veth pair whose node side a `tc`
    /// tbf qdisc shapes; etcd and the bench's client at the bridge).
    #[arg(long, default_value = "cap", value_parser = ["cap", "tbf"])]
    pub(crate) link: String,
    /// Each node's migrations at once (its `max_concurrent_migrations`,
    /// 1 to 64), or `auto`: each node's queue chooses.
    #[arg(long, default_value = "2", value_parser = concurrency_arg)]
    pub(crate) max_concurrent: Concurrency,
    /// on or off: failbacks send only the pages that changed since each VM
    /// left (the rolling update's `delta`).
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    pub(crate) delta: String,
    /// on or off: dense pages in every migration (each node's `dense`).
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    pub(crate) dense: String,
    /// Each node's `failback_retention` (e.g. 4GiB, or 0), or `auto`: a
    /// quarter of its memory capacity with `--delta on`, none with it off.
    #[arg(long, default_value = "auto")]
    pub(crate) retention: String,
    /// How long each node's update takes (its command sleeps that long, as
    /// a real update's install and reboot would): `0s`, the default, is a
    /// no-op. At most 10 minutes.
    #[arg(long, default_value = "0s", value_parser = update_time_arg)]
    pub(crate) update_time: std::time::Duration,
    /// Rolling updates; medians and spreads are over these.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub(crate) repeats: u32,
    /// Write results.json and report.md into this directory.
    #[arg(long, value_name = "DIR")]
    pub(crate) out: Option<PathBuf>,
    /// Print the summary and every run as one line of JSON on stdout
    /// instead of the table.
    #[arg(long)]
    pub(crate) json: bool,
}

/// A comma-separated list of write patterns.
#[derive(Debug, Clone)]
pub(crate) struct WorkloadList(pub(crate) Vec<WorkloadPattern>);

pub(crate) fn workload_list_arg(s: &str) -> Result<WorkloadList, String> {
    labelled_list(s).map(|v| WorkloadList(v.into_iter().map(|(_, w)| w).collect()))
}

/// A comma-separated list of migrations at once, each as given.
#[derive(Debug, Clone)]
pub(crate) struct ConcurrencyList(pub(crate) Vec<(String, Concurrency)>);

pub(crate) fn concurrency_list_arg(s: &str) -> Result<ConcurrencyList, String> {
    let v: Vec<(String, Concurrency)> = labelled_list(s)?;
    for (_, c) in &v {
        concurrency_arg(&c.to_string())?;
    }
    Ok(ConcurrencyList(v))
}

/// Migrations at once: 1 to 64, or `auto`.
pub(crate) fn concurrency_arg(s: &str) -> Result<Concurrency, String> {
    match s.parse::<Concurrency>()? {
        Concurrency::Fixed(n) if !(1..=64).contains(&n) => {
            Err(format!("max-concurrent {n} is out of range (1 to 64)"))
        }
        c => Ok(c),
    }
}

/// An on/off axis of the sweep (TLS, dense pages): off, on, or both.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Axis {
    Off,
    On,
    Both,
}

impl Axis {
    /// The values it runs: `false` off, `true` on.
    pub(crate) fn values(self) -> Vec<bool> {
        match self {
            Self::Off => vec![false],
            Self::On => vec![true],
            Self::Both => vec![false, true],
        }
    }

    /// Its name, for the results' meta.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::On => "on",
            Self::Both => "both",
        }
    }
}

#[derive(Args, Debug)]
pub(crate) struct LinkArgs {
    /// TCP connections (1 to 64).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub(crate) channels: u16,
    /// Bytes per run, over all connections.
    #[arg(long, default_value = "1GiB", value_parser = size_arg)]
    pub(crate) bytes: u64,
    /// Runs; the median and spread are reported.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub(crate) repeats: u32,
    /// Measure the path to a `ferry bench link --listen` on another host
    /// (default: loopback, inside this process).
    #[arg(long, value_name = "ADDR", conflicts_with = "listen")]
    pub(crate) to: Option<String>,
    /// Be the sink for `ferry bench link --to` on another host, until interrupted.
    #[arg(long, value_name = "ADDR")]
    pub(crate) listen: Option<String>,
    /// `tbf`: measure through the kernel-shaped link `bench sweep --link tbf`
    /// uses (two network namespaces, a veth pair, a tbf qdisc at --bandwidth;
    /// root, Linux) instead of loopback.
    #[arg(long, value_parser = ["loopback", "tbf"], default_value = "loopback", conflicts_with_all = ["to", "listen"])]
    pub(crate) link: String,
    /// With --link tbf: the link's rate [default: unlimited, no qdisc].
    #[arg(long, value_parser = link_list_arg)]
    pub(crate) bandwidth: Option<LinkList>,
    /// Print the result as one line of JSON on stdout.
    #[arg(long)]
    pub(crate) json: bool,
}

/// Parses a comma-separated list, keeping each item's text as given.
pub(crate) fn labelled_list<T: std::str::FromStr>(s: &str) -> Result<Vec<(String, T)>, String>
where
    T::Err: std::fmt::Display,
{
    let v = s
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(|c| {
            c.parse::<T>()
                .map(|t| (c.to_string(), t))
                .map_err(|e| e.to_string())
        })
        .collect::<Result<Vec<_>, _>>()?;
    if v.is_empty() {
        return Err("the list is empty".into());
    }
    Ok(v)
}

/// A comma-separated list of codecs, each with the label it was given as.
#[derive(Debug, Clone)]
pub(crate) struct CodecList(pub(crate) Vec<(String, Codec)>);

pub(crate) fn codec_list_arg(s: &str) -> Result<CodecList, String> {
    labelled_list(s).map(CodecList)
}

/// A comma-separated list of codecs or `auto`, each with its label as given.
#[derive(Debug, Clone)]
pub(crate) struct ChoiceList(pub(crate) Vec<(String, CodecChoice)>);

pub(crate) fn choice_list_arg(s: &str) -> Result<ChoiceList, String> {
    labelled_list(s).map(ChoiceList)
}

/// A comma-separated list of link speeds; `unlimited` for no cap.
#[derive(Debug, Clone)]
pub(crate) struct LinkList(pub(crate) Vec<Option<u64>>);

pub(crate) fn link_list_arg(s: &str) -> Result<LinkList, String> {
    let v = s
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(|c| parse_bandwidth(c).map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    if v.is_empty() {
        return Err("no link speed given".into());
    }
    Ok(LinkList(v))
}

#[derive(Args, Debug)]
pub(crate) struct KvmBenchArgs {
    #[command(flatten)]
    pub(crate) mem: MemoryArgs,
    /// Samples per figure.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub(crate) repeats: u32,
    /// Print the results as one line of JSON on stdout.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Args, Debug)]
pub(crate) struct CodecsArgs {
    #[command(flatten)]
    pub(crate) mem: MemoryArgs,
    /// Codecs to measure.
    #[arg(long, default_value = "none,lz4,zstd:1,zstd:3,zstd-stream:1", value_parser = codec_list_arg)]
    pub(crate) codecs: CodecList,
    /// Pages per batch, as the migration sends them.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub(crate) batch_pages: u32,
    /// Guest bytes measured per codec, spread evenly over memory.
    #[arg(long, default_value = "256MiB", value_parser = size_arg)]
    pub(crate) sample: u64,
    /// Also measure denser pages: duplicates sent as references, and zstd
    /// keeping its window across batches (one stream, long window).
    #[arg(long)]
    pub(crate) dense: bool,
    /// Print the results as one line of JSON on stdout.
    #[arg(long)]
    pub(crate) json: bool,
}

/// `--update-time`: a duration of at most 10 minutes.
pub(crate) fn update_time_arg(s: &str) -> Result<std::time::Duration, String> {
    let d = super::duration_arg(s)?;
    if d > std::time::Duration::from_secs(600) {
        return Err(format!("{s} is over 10 minutes"));
    }
    Ok(d)
}
