//! What a connection passes before it costs the receiver anything: the
//! budget of connections still in their handshake, and the counters of
//! refused connections and sessions by reason.
//!
//! A connection is *in its handshake* from its accept until its peer has
//! proved the key (or, without a key, been taken by the receiver's policy)
//! and its session was admitted, or its channel bind was proved. Until then
//! it holds a [`Ticket`] and nothing else: no session slot, no record, and at
//! most a handshake-sized frame. When the budget is full, a new connection
//! is not refused: the oldest connection of the peer address holding the
//! most tickets is evicted instead (told why in an ABORT). A flood of silent
//! or slow connections therefore costs its sender its own oldest
//! connections, while a real handshake, which takes one round trip, gets
//! through.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio_util::sync::CancellationToken;

/// Why the receiver refused a connection or a session; counted per reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The first frame or a handshake message was malformed or out of order.
    Malformed,
    /// The handshake did not finish within the handshake timeout.
    Timeout,
    /// Evicted from a full handshake budget by a newer connection.
    Evicted,
    /// The peer did not prove the key (or may not come unauthenticated).
    Unauthenticated,
    /// A channel bind to an unknown session, a wrong proof or a used nonce.
    BadBind,
    /// Authenticated, but the receiver runs its limit of sessions.
    SessionLimit,
    /// Authenticated, but refused: too large, incompatible, not admitted.
    Refused,
}

impl Refusal {
    /// Every reason, in the counters' order.
    pub const ALL: [Refusal; 7] = [
        Refusal::Malformed,
        Refusal::Timeout,
        Refusal::Evicted,
        Refusal::Unauthenticated,
        Refusal::BadBind,
        Refusal::SessionLimit,
        Refusal::Refused,
    ];

    /// Its name in `/metrics` and logs.
    pub fn name(self) -> &'static str {
        match self {
            Refusal::Malformed => "malformed",
            Refusal::Timeout => "handshake_timeout",
            Refusal::Evicted => "evicted",
            Refusal::Unauthenticated => "unauthenticated",
            Refusal::BadBind => "bad_bind",
            Refusal::SessionLimit => "session_limit",
            Refusal::Refused => "refused",
        }
    }
}

/// A receiver's counters of refusals, by reason.
#[derive(Debug, Default)]
pub struct ReceiverStats {
    refused: [AtomicU64; Refusal::ALL.len()],
}

impl ReceiverStats {
    /// Counts one refusal.
    pub fn count(&self, why: Refusal) {
        self.refused[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Refusals so far, by reason.
    pub fn refused(&self) -> Vec<(&'static str, u64)> {
        Refusal::ALL
            .iter()
            .map(|r| (r.name(), self.refused[*r as usize].load(Ordering::Relaxed)))
            .collect()
    }

    /// Refusals so far for one reason.
    pub fn refused_for(&self, why: Refusal) -> u64 {
        self.refused[why as usize].load(Ordering::Relaxed)
    }
}

struct Pending {
    id: u64,
    ip: IpAddr,
    since: Instant,
    evict: CancellationToken,
}

/// The budget of connections in their handshake.
pub(crate) struct Handshakes {
    limit: usize,
    pending: Mutex<(u64, Vec<Pending>)>,
}

/// One connection's place in the handshake budget, given back on drop.
pub(crate) struct Ticket {
    id: u64,
    owner: Arc<Handshakes>,
    /// Cancelled when a newer connection evicts this one.
    pub evicted: CancellationToken,
}

impl Handshakes {
    /// A budget of `limit` connections (at least one).
    pub(crate) fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit: limit.max(1),
            pending: Mutex::new((0, Vec::new())),
        })
    }

    /// Enters a connection from `ip`; when the budget is full, evicts the
    /// oldest connection of the address that holds the most.
    pub(crate) fn enter(self: &Arc<Self>, ip: IpAddr, now: Instant) -> Ticket {
        let mut guard = self.pending.lock().unwrap();
        let (next, pending) = &mut *guard;
        if pending.len() >= self.limit {
            let mut per_ip: HashMap<IpAddr, usize> = HashMap::new();
            for p in pending.iter() {
                *per_ip.entry(p.ip).or_default() += 1;
            }
            let victim = pending
                .iter()
                .enumerate()
                .max_by_key(|(_, p)| (per_ip[&p.ip], std::cmp::Reverse(p.since)))
                .map(|(i, _)| i)
                .expect("the budget is full, so not empty");
            pending.swap_remove(victim).evict.cancel();
        }
        *next += 1;
        let evict = CancellationToken::new();
        pending.push(Pending {
            id: *next,
            ip,
            since: now,
            evict: evict.clone(),
        });
        Ticket {
            id: *next,
            owner: self.clone(),
            evicted: evict,
        }
    }

    /// Connections in their handshake now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.pending.lock().unwrap().1.len()
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut guard = self.owner.pending.lock().unwrap();
        guard.1.retain(|p| p.id != self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn a_full_budget_evicts_the_oldest_of_the_busiest_address() {
        let h = Handshakes::new(4);
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let honest = h.enter(ip(1), at(0));
        let flood: Vec<Ticket> = (0..3).map(|i| h.enter(ip(2), at(1 + i))).collect();
        assert_eq!(h.len(), 4);
        // The fifth evicts the flood's oldest, not the honest one (older).
        let newcomer = h.enter(ip(3), at(10));
        assert!(flood[0].evicted.is_cancelled());
        assert!(!flood[1].evicted.is_cancelled() && !honest.evicted.is_cancelled());
        assert!(!newcomer.evicted.is_cancelled());
        assert_eq!(h.len(), 4);
        // A ticket given back frees its place; an evicted one was freed already.
        drop(flood);
        assert_eq!(h.len(), 2);
        drop(honest);
        drop(newcomer);
        assert_eq!(h.len(), 0);
    }

    #[test]
    fn one_address_alone_evicts_its_own_oldest() {
        let h = Handshakes::new(2);
        let t0 = Instant::now();
        let a = h.enter(ip(1), t0);
        let b = h.enter(ip(1), t0 + Duration::from_millis(1));
        let c = h.enter(ip(1), t0 + Duration::from_millis(2));
        assert!(a.evicted.is_cancelled());
        assert!(!b.evicted.is_cancelled() && !c.evicted.is_cancelled());
    }

    #[test]
    fn refusals_are_counted_by_reason() {
        let s = ReceiverStats::default();
        s.count(Refusal::Evicted);
        s.count(Refusal::Evicted);
        s.count(Refusal::Unauthenticated);
        assert_eq!(s.refused_for(Refusal::Evicted), 2);
        let all = s.refused();
        assert_eq!(all.len(), Refusal::ALL.len());
        assert!(all.contains(&("unauthenticated", 1)));
    }
}
