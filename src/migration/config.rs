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
    /// The cluster's key: a labelled setup carries a proof of it over the
    /// destination's nonce (agents' migrations).
    #[cfg(feature = "net")]
    pub session_key: Option<super::auth::SessionKey>,
    /// TLS 1.3 on every channel. Default: none (plain, CRC-checked frames).
    #[cfg(feature = "net")]
    pub tls: Option<crate::transport::tls::TlsClient>,
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
            #[cfg(feature = "net")]
            session_key: None,
            #[cfg(feature = "net")]
            tls: None,
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

    /// Checks the values a user can get wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.channels == 0 || self.channels > crate::wire::MAX_CHANNELS {
            return Err(format!(
                "channels must be 1 to {}, not {}",
                crate::wire::MAX_CHANNELS,
                self.channels
            ));
        }
        if self.max_bandwidth == Some(0) {
            return Err("max-bandwidth must be positive (or unlimited)".into());
        }
        if self.downtime_limit.is_zero() {
            return Err("downtime-limit must be positive".into());
        }
        if self.peer_timeout < Duration::from_millis(100) {
            return Err("peer-timeout must be at least 100ms".into());
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
}
