//! The migration report: one JSON object per side, the same from the library,
//! the CLI's `--json` and (later) the agent's API.

#[cfg(feature = "net")]
use crate::codec::CodecId;
use crate::wire::{GuestKind, VerifyMode};
use serde::{Deserialize, Serialize};
#[cfg(feature = "net")]
use std::sync::atomic::{AtomicU64, Ordering};

/// How a migration ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// The guest runs on the destination.
    Completed,
    /// The guest runs on the source; the destination discarded its copy.
    Failed,
    /// Cancelled by an operator; the guest runs on the source.
    Cancelled,
    /// GO was sent but not acknowledged: the source holds a paused copy and
    /// does not know whether the destination runs the guest.
    Unresolved,
}

/// Which end wrote a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    /// The sending host.
    Source,
    /// The receiving host.
    Destination,
}

/// Page transmissions by kind, summed over all rounds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageCounts {
    /// All pages sent (zero pages included).
    pub total: u64,
    /// Pages sent as a zero bit.
    pub zero: u64,
    /// Pages sent uncompressed.
    pub raw: u64,
    /// Pages sent compressed.
    pub compressed: u64,
    /// Pages sent as references to identical pages the destination held
    /// (dense pages).
    #[serde(default)]
    pub referenced: u64,
    /// Pages sent as patches of a region the destination held (dense
    /// pages; counted in `raw` or `compressed` too, as their patches
    /// travel with the data).
    #[serde(default)]
    pub patched: u64,
    /// `compressed` by the codec that compressed them: under `auto`, what
    /// it chose.
    #[serde(default)]
    pub compressed_by: CompressedBy,
}

/// Pages sent compressed, by codec (the wire's codec ids: zstd's level is
/// the report's `codec` when one was asked for).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CompressedBy {
    /// LZ4 blocks.
    pub lz4: u64,
    /// zstd frames, each batch on its own.
    pub zstd: u64,
    /// Parts of a channel's kept zstd stream.
    pub zstd_stream: u64,
}

/// Page counts that many channel tasks add to at once.
#[cfg(feature = "net")]
#[derive(Debug, Default)]
pub(crate) struct PageCounter {
    total: AtomicU64,
    zero: AtomicU64,
    raw: AtomicU64,
    compressed: AtomicU64,
    referenced: AtomicU64,
    patched: AtomicU64,
    /// `compressed` by codec: lz4, zstd, zstd-stream.
    by: [AtomicU64; 3],
}

#[cfg(feature = "net")]
impl PageCounter {
    /// Adds one batch of `codec`: its pages, and how many of them were
    /// zero, raw, compressed, references and patches.
    pub(crate) fn add(
        &self,
        codec: CodecId,
        [total, zero, raw, compressed, referenced, patched]: [u64; 6],
    ) {
        self.patched.fetch_add(patched, Ordering::Relaxed);
        self.total.fetch_add(total, Ordering::Relaxed);
        self.zero.fetch_add(zero, Ordering::Relaxed);
        self.raw.fetch_add(raw, Ordering::Relaxed);
        self.compressed.fetch_add(compressed, Ordering::Relaxed);
        self.referenced.fetch_add(referenced, Ordering::Relaxed);
        let by = match codec {
            CodecId::None => return,
            CodecId::Lz4 => 0,
            CodecId::Zstd => 1,
            CodecId::ZstdStream => 2,
        };
        self.by[by].fetch_add(compressed, Ordering::Relaxed);
    }

    /// The counts so far.
    pub(crate) fn snapshot(&self) -> PageCounts {
        PageCounts {
            total: self.total.load(Ordering::Relaxed),
            zero: self.zero.load(Ordering::Relaxed),
            raw: self.raw.load(Ordering::Relaxed),
            compressed: self.compressed.load(Ordering::Relaxed),
            referenced: self.referenced.load(Ordering::Relaxed),
            patched: self.patched.load(Ordering::Relaxed),
            compressed_by: CompressedBy {
                lz4: self.by[0].load(Ordering::Relaxed),
                zstd: self.by[1].load(Ordering::Relaxed),
                zstd_stream: self.by[2].load(Ordering::Relaxed),
            },
        }
    }
}

/// CPU time of each side's own threads, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct CpuMs {
    /// The source's migration threads (null when unknown).
    pub source: Option<f64>,
    /// The destination's migration threads (null when unknown).
    pub destination: Option<f64>,
}

/// One pre-copy round, for the curious.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RoundLog {
    /// Round number.
    pub round: u32,
    /// Pages sent.
    pub pages: u64,
    /// Duration in ms.
    pub ms: f64,
    /// Pages dirty when it ended.
    pub dirty_pages_after: u64,
    /// Throttle in force after it, percent.
    pub throttle_pct: u8,
}

/// Everything one side knows about a migration. Field names are a contract.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Which end wrote this.
    pub side: Side,
    /// How it ended.
    pub outcome: Outcome,
    /// The error, when it did not complete.
    pub error: Option<String>,
    /// Where the guest runs (or waits, paused) now: `source`, `destination`, or
    /// `unknown` when unresolved.
    pub guest_location: String,
    /// Destination memory equals source memory at switchover, by the digest.
    pub verified: bool,
    /// How the digest was computed.
    pub verify: VerifyMode,
    /// Time this side spent computing its digest during the pause.
    pub verify_ms: f64,
    /// Guest memory size.
    pub memory_bytes: u64,
    /// Page transmissions by kind.
    pub pages: PageCounts,
    /// Pre-copy passes before the pause, round 0 included.
    pub rounds: u32,
    /// First connection to final acknowledgement (includes `setup_ms`).
    pub total_ms: f64,
    /// Connecting, negotiating and binding every channel.
    pub setup_ms: f64,
    /// The guest's pause: from stopping on the source to running on the destination.
    pub downtime_ms: f64,
    /// 4 KiB × `pages.total`.
    pub guest_bytes_sent: u64,
    /// Bytes on the wire from source to destination, headers included.
    pub wire_bytes: u64,
    /// `guest_bytes_sent / wire_bytes` (1 when nothing was sent).
    pub compression_ratio: f64,
    /// `guest_bytes_sent` per second of `total_ms`.
    pub throughput_guest_bps: f64,
    /// `wire_bytes` per second of `total_ms`.
    pub throughput_wire_bps: f64,
    /// Bytes/s of distinct pages the guest dirtied during pre-copy.
    pub dirty_rate_bps: f64,
    /// Highest auto-converge throttle applied, percent.
    pub throttle_pct_max: u8,
    /// TCP channels.
    pub channels: u16,
    /// The codec asked for.
    pub codec: String,
    /// The bandwidth cap, bytes/s (null when unlimited).
    pub max_bandwidth_bps: Option<u64>,
    /// CPU time of each side's own threads.
    pub cpu_ms: CpuMs,
    /// The guest backend.
    pub guest: GuestKind,
    /// The guest's counter (it only grows while the guest runs) when it was
    /// paused for the switchover: read on the source after the pause, and on
    /// the destination from the state that arrived. `null` when it never
    /// paused.
    pub guest_counter_at_pause: Option<u64>,
    /// Destination only: the counter read again a while after the guest
    /// resumed here ([`crate::migration::ReceiverConfig::resume_check`], one
    /// second for `ferry receive`; not part of `total_ms`). Greater than
    /// `guest_counter_at_pause` when the guest runs on. `null` when not read.
    pub guest_counter_after_resume: Option<u64>,
    /// The session id, hex.
    pub session_id: String,
    /// Both sides proved the shared key (mutual HMAC challenge–response);
    /// `false`: the peer was taken on trust (loopback or `--insecure`).
    pub authenticated: bool,
    /// Migration traffic was encrypted; `false`: plain, CRC-protected
    /// frames that anyone on the path can read.
    pub encrypted: bool,
    /// Every frame after the handshake was authenticated, by TLS or (keyed,
    /// without TLS) by a tag per frame; `false`: frames carry a CRC only,
    /// and someone on the path can change pages undetected.
    pub frames_authenticated: bool,
    /// Channels that failed during the session (each rebound, or the
    /// session went on without it).
    pub channel_failures: u32,
    /// Batches sent again on another channel after theirs failed.
    pub batches_resent: u64,
    /// Channels connected again and bound to the session after a failure.
    pub channel_rebinds: u32,
    /// Where the paused guest was saved when the migration ended unresolved
    /// (`ferry send`), so that nothing is lost.
    pub saved_to: Option<String>,
    /// Pre-copy rounds (source side; empty on the destination): at most
    /// 256, the first 16 and the latest (`rounds` counts them all).
    pub round_log: Vec<RoundLog>,
    /// Memory this process holds, read when the report is written.
    pub memory_use: MemoryUse,
    /// `ferry receive` only: every guest it holds after this session (it
    /// keeps each one that arrived until it exits). Absent elsewhere.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guests_here: Option<GuestsHere>,
    /// Whether the session started from an image the destination kept (a
    /// failback by delta), and what that saved.
    #[serde(default)]
    pub delta: DeltaUse,
}

/// A failback by delta as one side saw it. Field names are a contract.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeltaUse {
    /// The migration whose image was offered as the session's base
    /// (`null`: none was).
    pub base: Option<String>,
    /// The VM whose image the base is, when another VM's made from the same
    /// RAM image (`null`: this VM's own, or none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_vm: Option<String>,
    /// Whether the destination started from that image.
    pub used: bool,
    /// Pages round 0 left out as unchanged (the destination: pages with
    /// content it took from the image).
    pub pages_skipped: u64,
    /// The destination's reason for not using an offered base.
    pub declined: Option<String>,
}

/// The guests a receiver holds, and the memory they take of its limit.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GuestsHere {
    /// Their session ids (hex), in order of arrival.
    pub sessions: Vec<String>,
    /// Their memory, bytes.
    pub memory_bytes: u64,
    /// The receiver's limit on the memory of the guests it holds and
    /// receives (`--max-memory`), bytes.
    pub max_memory_bytes: u64,
}

/// Resident memory of the process that wrote a report. The figures are the
/// whole process's: with both ends in one process (`demo`) they cover both.
/// `null` where the platform does not tell.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct MemoryUse {
    /// Peak resident memory of the process (`VmHWM`).
    pub peak_rss_bytes: Option<u64>,
    /// This side's guest memory resident now.
    pub guest_resident_bytes: Option<u64>,
    /// `peak_rss_bytes - guest_resident_bytes`: what ferry itself cost (buffers,
    /// bitmaps, digests, threads, the binary) on top of guest memory.
    pub overhead_bytes: Option<u64>,
}

impl MemoryUse {
    /// Reads the process's peak and `guest`'s resident memory now.
    pub fn measure(guest: Option<&crate::memory::GuestMemory>) -> Self {
        let peak = crate::memory::peak_rss_bytes();
        let resident = guest.and_then(|g| g.resident_bytes());
        Self {
            peak_rss_bytes: peak,
            guest_resident_bytes: resident,
            overhead_bytes: peak
                .zip(resident.or(Some(0)))
                .map(|(p, r)| p.saturating_sub(r)),
        }
    }
}

impl Report {
    /// Fills the derived figures from the counted ones.
    pub fn finish_derived(&mut self) {
        self.guest_bytes_sent = self.pages.total * crate::memory::PAGE_SIZE as u64;
        self.compression_ratio = if self.wire_bytes == 0 {
            1.0
        } else {
            round3(self.guest_bytes_sent as f64 / self.wire_bytes as f64)
        };
        let secs = self.total_ms / 1e3;
        if secs > 0.0 {
            self.throughput_guest_bps = (self.guest_bytes_sent as f64 / secs).round();
            self.throughput_wire_bps = (self.wire_bytes as f64 / secs).round();
        }
        self.guest_location = match self.outcome {
            Outcome::Completed => "destination",
            Outcome::Unresolved => "unknown",
            Outcome::Failed | Outcome::Cancelled => "source",
        }
        .into();
    }

    /// One line of compact JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("report serializes")
    }
}

/// Rounds to three decimals (microsecond precision for milliseconds).
pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
