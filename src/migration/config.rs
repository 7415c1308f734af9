//! Source-side migration parameters, named as operators know them.

use super::policy::{
    completion_timeout_for, AutoConverge, ConvergencePolicy, DEFAULT_DOWNTIME_LIMIT,
    DEFAULT_PROGRESS_TIMEOUT, DEFAULT_SWITCHOVER_FLOOR,
};
use crate::codec::CodecChoice;
use crate::wire::{SessionLabel, VerifyMode};
use std::time::Duration;

/// TCP channels per migration by default.
pub const DEFAULT_CHANNELS: u16 = 4;
/// Pages per batch when nothing caps the bandwidth: 256 (1 MiB).
pub const DEFAULT_BATCH_PAGES: u32 = 256;
/// Batches in flight per channel before the sender waits for credit. Memory on
/// the receiver: channels × this × batch size. Default: 4.
pub const DEFAULT_INITIAL_CREDITS: u16 = 4;

/// How long a peer may be silent before its channel counts as dead.
pub const DEFAULT_PEER_TIMEOUT: Duration = Duration::from_secs(10);

/// The ranges outside which a parameter is refused, naming its field: wide
/// enough for any real use, narrow enough that no arithmetic on them
/// overflows (deadlines, bucket sizes, batch sizes).
pub mod ranges {
    use std::time::Duration;
    /// `max_bandwidth`: 1 Mbit/s to 8 Tbit/s, bytes/s.
    pub const BANDWIDTH: (u64, u64) = (125_000, 1_000_000_000_000);
    /// `downtime_limit`: 1 ms to 1 h.
    pub const DOWNTIME: (Duration, Duration) =
        (Duration::from_millis(1), Duration::from_secs(3600));
    /// `completion_timeout` and `progress_timeout`: 1 s to 30 days.
    pub const GIVE_UP: (Duration, Duration) =
        (Duration::from_secs(1), Duration::from_secs(30 * 86_400));
    /// `peer_timeout`: 100 ms to 1 h.
    pub const PEER: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(3600));
    /// `handoff_timeout`: 1 s to 1 h.
    pub const HANDOFF: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(3600));
}

/// A parameter out of its range: the field (as the API names it) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ConfigError {
    /// The field, snake_case (`completion_timeout`).
    pub field: &'static str,
    /// What is wrong with its value.
    pub message: String,
}

impl ConfigError {
    /// The field as a command-line flag (`--completion-timeout`).
    pub fn flag(&self) -> String {
        format!("--{}", self.field.replace('_', "-"))
    }
}

fn in_range<T: PartialOrd + std::fmt::Debug>(
    field: &'static str,
    value: T,
    (lo, hi): (T, T),
    show: impl Fn(&T) -> String,
) -> Result<(), ConfigError> {
    if value < lo || value > hi {
        return Err(ConfigError {
            field,
            message: format!(
                "{} is out of range ({} to {})",
                show(&value),
                show(&lo),
                show(&hi)
            ),
        });
    }
    Ok(())
}

/// A duration as a person reads it (`1.5s`, `300ms`, `30d`).
pub(crate) fn show_duration(d: &Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 86_400.0 {
        format!("{}d", s / 86_400.0)
    } else if s >= 1.0 {
        format!("{s}s")
    } else {
        format!("{}ms", s * 1e3)
    }
}

/// How to migrate.
#[derive(Debug, Clone)]
pub struct MigrationConfig {
    /// TCP connections, 1 to 64. Default: 4.
    pub channels: u16,
    /// The batch codec, or `auto`. Default: lz4.
    pub codec: CodecChoice,
    /// Bytes/s on the wire across all channels, switchover included. Default: none.
    pub max_bandwidth: Option<u64>,
    /// The pause to aim under. Default: 300 ms.
    pub downtime_limit: Duration,
    /// How the switchover digest is computed. Default: fast.
    pub verify: VerifyMode,
    /// Throttle the guest when rounds do not converge. Default: on.
    pub auto_converge: bool,
    /// Give up after this long. Default: 150 s per GiB of guest memory.
    pub completion_timeout: Option<Duration>,
    /// Give up when the remaining bytes stop falling for this long. Default: 150 s.
    pub progress_timeout: Duration,
    /// Leave the guest paused on the destination after the hand-off.
    pub leave_paused: bool,
    /// Pages per batch; `None` picks by the bandwidth cap.
    pub batch_pages: Option<u32>,
    /// Longest wait for the destination at each hand-off step. Default: 30 s.
    pub handoff_timeout: Duration,
    /// A channel with something outstanding that hears nothing (and whose
    /// socket takes nothing) for this long is dead: its batches go to the
    /// other channels and it rebinds. With every channel dead this long,
    /// the migration fails. Default: 10 s.
    pub peer_timeout: Duration,
    /// Who the session is for, sent in its setup (agents name the VM).
    pub label: Option<SessionLabel>,
    /// The memory the guest arrived with from the destination, offered as
    /// the session's starting point when `delta` is on (agents'
    /// failbacks). Default: none.
    pub base: Option<super::delta::Base>,
    /// Offer `base` (`--delta`). Default: on.
    pub delta: bool,
    /// Dense pages (`--dense`): a page identical to one the destination
    /// already holds from this round goes as a reference, when the
    /// destination takes them. Default: on.
    pub dense: bool,
    /// The cluster's key: a labelled setup carries a proof of it over the
    /// destination's nonce (agents' migrations).
    #[cfg(feature = "net")]
    pub session_key: Option<super::auth::SessionKey>,
    /// Runs once the destination is READY and no cancel came first, just
    /// before GO: an `Err` stops there, the guest staying on the source.
    /// (`ferry send --saved` marks its file consumed here.) Default: none.
    pub before_go: Option<BeforeGo>,
}

/// A step that must succeed before GO goes out.
#[derive(Clone)]
pub struct BeforeGo(pub std::sync::Arc<dyn Fn() -> Result<(), String> + Send + Sync>);

impl std::fmt::Debug for BeforeGo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BeforeGo")
    }
}

impl Default for MigrationConfig {
    fn default() -> Self {
        Self {
            channels: DEFAULT_CHANNELS,
            codec: CodecChoice::Auto,
            max_bandwidth: None,
            downtime_limit: DEFAULT_DOWNTIME_LIMIT,
            verify: VerifyMode::Fast,
            auto_converge: true,
            completion_timeout: None,
            progress_timeout: DEFAULT_PROGRESS_TIMEOUT,
            leave_paused: false,
            batch_pages: None,
            handoff_timeout: Duration::from_secs(30),
            peer_timeout: DEFAULT_PEER_TIMEOUT,
            label: None,
            base: None,
            delta: true,
            dense: true,
            #[cfg(feature = "net")]
            session_key: None,
            before_go: None,
        }
    }
}

impl MigrationConfig {
    /// The convergence policy for a guest of `memory_bytes`.
    pub fn policy(&self, memory_bytes: u64) -> ConvergencePolicy {
        ConvergencePolicy {
            downtime_limit: self.downtime_limit,
            switchover_floor: DEFAULT_SWITCHOVER_FLOOR.min(self.downtime_limit),
            auto_converge: self.auto_converge.then(AutoConverge::default),
            completion_timeout: self
                .completion_timeout
                .unwrap_or_else(|| completion_timeout_for(memory_bytes)),
            progress_timeout: self.progress_timeout,
        }
    }

    /// Pages per batch: as configured, or 256 unless a bandwidth cap makes 20 ms
    /// of it smaller (so the cap's bursts stay small), at least 16.
    pub fn batch_pages(&self) -> u32 {
        if let Some(n) = self.batch_pages {
            return n.clamp(1, crate::wire::MAX_PAGES_PER_BATCH);
        }
        match self.max_bandwidth {
            Some(bps) => {
                ((bps / 50 / crate::memory::PAGE_SIZE as u64) as u32).clamp(16, DEFAULT_BATCH_PAGES)
            }
            None => DEFAULT_BATCH_PAGES,
        }
    }

    /// Checks every value against its range ([`ranges`]).
    pub fn validate(&self) -> Result<(), ConfigError> {
        in_range(
            "channels",
            self.channels,
            (1, crate::wire::MAX_CHANNELS),
            |c| c.to_string(),
        )?;
        if let Some(b) = self.max_bandwidth {
            in_range("max_bandwidth", b, ranges::BANDWIDTH, |b| {
                format!("{}/s", crate::units::Bytes(*b))
            })?;
        }
        in_range(
            "downtime_limit",
            self.downtime_limit,
            ranges::DOWNTIME,
            show_duration,
        )?;
        if let Some(t) = self.completion_timeout {
            in_range("completion_timeout", t, ranges::GIVE_UP, show_duration)?;
        }
        in_range(
            "progress_timeout",
            self.progress_timeout,
            ranges::GIVE_UP,
            show_duration,
        )?;
        in_range(
            "peer_timeout",
            self.peer_timeout,
            ranges::PEER,
            show_duration,
        )?;
        in_range(
            "handoff_timeout",
            self.handoff_timeout,
            ranges::HANDOFF,
            show_duration,
        )?;
        if let Some(n) = self.batch_pages {
            in_range(
                "batch_pages",
                n,
                (1, crate::wire::MAX_PAGES_PER_BATCH),
                |n| n.to_string(),
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_size_follows_the_cap() {
        let mut c = MigrationConfig::default();
        assert_eq!(c.batch_pages(), 256);
        c.max_bandwidth = Some(12_500_000); // 100 Mbit/s: 20 ms is 250 kB, 61 pages
        assert_eq!(c.batch_pages(), 61);
        c.max_bandwidth = Some(1_000_000);
        assert_eq!(c.batch_pages(), 16);
        c.max_bandwidth = Some(10_000_000_000);
        assert_eq!(c.batch_pages(), 256);
        assert!(MigrationConfig {
            channels: 65,
            ..c.clone()
        }
        .validate()
        .is_err());
        assert!(MigrationConfig { channels: 0, ..c }.validate().is_err());
    }

    #[test]
    fn every_value_out_of_range_is_refused_naming_its_field() {
        let ok = MigrationConfig::default();
        ok.validate().unwrap();
        // "4000000000000000h", as the hostile review sent it.
        let huge = Duration::from_secs(4_000_000_000_000_000 * 3600);
        let cases: Vec<(MigrationConfig, &str)> = vec![
            (
                MigrationConfig {
                    max_bandwidth: Some(1),
                    ..ok.clone()
                },
                "max_bandwidth",
            ),
            (
                MigrationConfig {
                    max_bandwidth: Some(u64::MAX),
                    ..ok.clone()
                },
                "max_bandwidth",
            ),
            (
                MigrationConfig {
                    downtime_limit: Duration::ZERO,
                    ..ok.clone()
                },
                "downtime_limit",
            ),
            (
                MigrationConfig {
                    completion_timeout: Some(huge),
                    ..ok.clone()
                },
                "completion_timeout",
            ),
            (
                MigrationConfig {
                    completion_timeout: Some(Duration::MAX),
                    ..ok.clone()
                },
                "completion_timeout",
            ),
            (
                MigrationConfig {
                    progress_timeout: Duration::ZERO,
                    ..ok.clone()
                },
                "progress_timeout",
            ),
            (
                MigrationConfig {
                    peer_timeout: Duration::from_millis(10),
                    ..ok.clone()
                },
                "peer_timeout",
            ),
            (
                MigrationConfig {
                    peer_timeout: Duration::MAX,
                    ..ok.clone()
                },
                "peer_timeout",
            ),
            (
                MigrationConfig {
                    handoff_timeout: Duration::ZERO,
                    ..ok.clone()
                },
                "handoff_timeout",
            ),
            (
                MigrationConfig {
                    batch_pages: Some(0),
                    ..ok.clone()
                },
                "batch_pages",
            ),
        ];
        for (c, field) in cases {
            let e = c.validate().unwrap_err();
            assert_eq!(e.field, field, "{e}");
            assert!(e.to_string().contains("out of range"), "{e}");
        }
        let e = MigrationConfig {
            completion_timeout: Some(huge),
            ..ok
        }
        .validate()
        .unwrap_err();
        assert_eq!(e.flag(), "--completion-timeout");
    }
}
