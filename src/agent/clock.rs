//! The fence's clock: time that keeps counting while the host is suspended
//! (`CLOCK_BOOTTIME`), as [`Instant`]s. etcd's clock runs on during a
//! suspend of this host (or a pause of the VM it runs in), so a lease can
//! expire while `Instant`, which stops then, says little time has passed.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Time since boot, suspends included; `None` where the clock is missing.
fn since_boot() -> Option<Duration> {
    crate::cpu::clock_time(libc::CLOCK_BOOTTIME)
}

/// An `Instant` and the boot clock read together.
#[derive(Debug, Clone, Copy)]
struct Anchor {
    instant: Instant,
    boot: Duration,
}

impl Anchor {
    /// The `Instant` of boot-clock reading `boot`: the anchor plus the boot
    /// time elapsed since, suspends included.
    fn at(&self, boot: Duration) -> Instant {
        self.instant + boot.saturating_sub(self.boot)
    }
}

/// Now, by the boot clock: an `Instant` that moves on with a suspend (the
/// monotonic `Instant::now` where the boot clock is missing).
pub fn now() -> Instant {
    static ANCHOR: OnceLock<Option<Anchor>> = OnceLock::new();
    let anchor = ANCHOR.get_or_init(|| {
        since_boot().map(|boot| Anchor {
            instant: Instant::now(),
            boot,
        })
    });
    match (anchor, since_boot()) {
        (Some(a), Some(boot)) => a.at(boot),
        _ => Instant::now(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_suspend_moves_the_clock_on() {
        let a = Anchor {
            instant: Instant::now(),
            boot: Duration::from_secs(100),
        };
        // 1 s of running, then a 30 s suspend: the monotonic clock saw 1 s.
        assert_eq!(
            a.at(Duration::from_secs(131)),
            a.instant + Duration::from_secs(31)
        );
        assert_eq!(a.at(Duration::from_secs(99)), a.instant);
    }

    #[test]
    fn keeps_pace_with_the_monotonic_clock_without_a_suspend() {
        let (b0, m0) = (now(), Instant::now());
        std::thread::sleep(Duration::from_millis(50));
        let (b1, m1) = (now(), Instant::now());
        let (db, dm) = (b1 - b0, m1 - m0);
        assert!(
            db.abs_diff(dm) < Duration::from_millis(20),
            "{db:?} vs {dm:?}"
        );
    }

    #[test]
    fn a_fence_pauses_when_a_suspend_outlasts_the_margin() {
        use super::super::fence::{Fence, FenceAction};
        let a = Anchor {
            instant: Instant::now(),
            boot: Duration::from_secs(100),
        };
        let ttl = Duration::from_secs(5);
        let mut f = Fence::new(ttl, a.at(Duration::from_secs(100)));
        // Renewed at +1 s, then the host sleeps 10 s: by the boot clock the
        // deadline has passed the moment it wakes.
        assert_eq!(f.tick(a.at(Duration::from_secs(101))), None);
        assert_eq!(
            f.tick(a.at(Duration::from_secs(111))),
            Some(FenceAction::Pause)
        );
    }
}
