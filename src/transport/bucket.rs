//! A token bucket shared by every channel of a migration: one acquire per frame.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Caps bytes per second. Starts empty; holds at most `burst` bytes of credit;
/// a frame larger than the credit goes into debt and the sender sleeps it off,
/// so waiting senders are served in the order they asked.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
    /// Senders that share the bucket now ([`TokenBucket::join`]).
    users: AtomicUsize,
}

/// A sender's place among a bucket's users, given up when dropped.
#[derive(Debug)]
pub struct BucketUser(Arc<TokenBucket>);

impl BucketUser {
    /// The bucket it shares.
    pub fn bucket(&self) -> &TokenBucket {
        &self.0
    }
}

impl Drop for BucketUser {
    fn drop(&mut self) {
        self.0.users.fetch_sub(1, Ordering::Relaxed);
    }
}

impl TokenBucket {
    /// A bucket of `rate` bytes/s holding at most `burst` bytes, empty now.
    pub fn new(rate: u64, burst: u64) -> Self {
        Self::new_at(rate, burst, Instant::now())
    }

    /// As [`new`](Self::new), empty at `now`.
    pub fn new_at(rate: u64, burst: u64, now: Instant) -> Self {
        assert!(rate > 0, "a zero rate never sends");
        Self {
            rate: rate as f64,
            burst: burst.max(1) as f64,
            state: Mutex::new((0.0, now)),
            users: AtomicUsize::new(0),
        }
    }

    /// Counts a sender among the bucket's users while the returned guard
    /// lives (a node's outgoing migrations share one bucket).
    pub fn join(self: &Arc<Self>) -> BucketUser {
        self.users.fetch_add(1, Ordering::Relaxed);
        BucketUser(self.clone())
    }

    /// The rate each of its users may count on: an even share (the whole
    /// rate while it has none).
    pub fn share(&self) -> u64 {
        self.rate() / self.users.load(Ordering::Relaxed).max(1) as u64
    }

    /// The rate, bytes/s.
    pub fn rate(&self) -> u64 {
        self.rate as u64
    }

    /// Takes `bytes` at `now` and returns how long the caller must wait before
    /// sending them.
    pub fn reserve(&self, now: Instant, bytes: u64) -> Duration {
        let mut st = self.state.lock().unwrap();
        let (tokens, last) = &mut *st;
        if now > *last {
            *tokens = (*tokens + (now - *last).as_secs_f64() * self.rate).min(self.burst);
            *last = now;
        }
        *tokens -= bytes as f64;
        if *tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-*tokens / self.rate)
        }
    }

    /// Waits until `bytes` may be sent.
    pub async fn acquire(&self, bytes: u64) {
        let wait = self.reserve(Instant::now(), bytes);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn its_users_share_the_rate_while_they_are_joined() {
        let b = Arc::new(TokenBucket::new(120, 1));
        assert_eq!(b.share(), 120);
        let one = b.join();
        assert_eq!(b.share(), 120);
        let two = b.join();
        let three = b.join();
        assert_eq!(b.share(), 40);
        drop((one, two));
        assert_eq!(b.share(), 120);
        drop(three);
        assert_eq!(b.share(), 120);
    }

    #[test]
    fn starts_empty_and_holds_the_rate() {
        let t0 = Instant::now();
        let b = TokenBucket::new_at(1_000_000, 10_000, t0);
        // Nothing banked at the start: the first 100 kB waits 100 ms.
        assert_eq!(b.reserve(t0, 100_000), Duration::from_millis(100));
        // A sender that asks 1 MB at once is scheduled behind the first.
        let w = b.reserve(t0, 1_000_000);
        assert!((w.as_secs_f64() - 1.1).abs() < 1e-9, "{w:?}");
        // Simulate senders that each send as soon as allowed: over 10 s of
        // virtual time the bytes sent stay within the rate plus one burst.
        let t0 = Instant::now();
        let b = TokenBucket::new_at(1_000_000, 10_000, t0);
        let mut now = t0;
        let mut sent = 0u64;
        while now - t0 < Duration::from_secs(10) {
            now += b.reserve(now, 65_536);
            sent += 65_536;
        }
        let rate = sent as f64 / (now - t0).as_secs_f64();
        assert!((rate - 1e6).abs() / 1e6 < 0.01, "{rate}");
    }

    #[test]
    fn idle_time_banks_at_most_the_burst() {
        let t0 = Instant::now();
        let b = TokenBucket::new_at(1_000_000, 10_000, t0);
        let later = t0 + Duration::from_secs(60);
        assert_eq!(b.reserve(later, 10_000), Duration::ZERO);
        assert!(b.reserve(later, 1) > Duration::ZERO);
    }
}
