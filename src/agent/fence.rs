//! Self-fencing: an agent that cannot renew its lease pauses its guests
//! before the lease can expire on the server, so that by the time another
//! node may restart them they run nowhere. [`Fence`] decides when, from
//! times it is given (sans IO); the node applies its actions.
//!
//! The lease cannot expire on the server before the TTL has passed since
//! the server received the last renewal it acknowledged, which is after the
//! agent sent it. So the agent fences at that send time plus the TTL less a
//! [`margin`], by its own boot clock (monotonic, and counting a suspend of
//! the host, which etcd's clock does not skip either). A renewal etcd still answers
//! with a TTL proves the lease never expired: the guests resume. One that
//! answers "expired" proves it did: they are `superseded` and never resume.

use super::node::{Direction, MigrationState, Node, VmState};
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// Where the node's lease stands, as the agent knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FenceState {
    /// Renewed in time: the guests run.
    Live,
    /// Not renewed in time: the guests are paused, no new work is taken.
    Fenced,
}

/// What the node does on a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FenceAction {
    /// Pause every guest and take no new work.
    Pause,
    /// The lease held: resume the guests the fence paused.
    Resume,
    /// The lease expired: the guests the fence paused never resume here.
    Supersede,
}

/// How long before the earliest possible expiry the node fences: a fifth
/// of the TTL, at least 0.5 s and at most 2 s (pausing takes milliseconds;
/// the rest covers a late timer and clock rates).
pub fn margin(ttl: Duration) -> Duration {
    (ttl / 5).clamp(Duration::from_millis(500), Duration::from_secs(2))
}

/// The fencing decision for one node.
#[derive(Debug, Clone)]
pub struct Fence {
    ttl: Duration,
    /// When the last acknowledged renewal (or the grant) was sent.
    last_ack: Instant,
    state: FenceState,
}

impl Fence {
    /// A lease of `ttl` whose grant was sent at `sent`.
    pub fn new(ttl: Duration, sent: Instant) -> Self {
        Self {
            ttl,
            last_ack: sent,
            state: FenceState::Live,
        }
    }

    /// Where the lease stands.
    pub fn state(&self) -> FenceState {
        self.state
    }

    /// When the last acknowledged renewal was sent.
    pub fn last_ack(&self) -> Instant {
        self.last_ack
    }

    /// The TTL last granted.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// When the node fences unless a renewal is acknowledged first.
    pub fn deadline(&self) -> Instant {
        self.last_ack + self.ttl.saturating_sub(margin(self.ttl))
    }

    /// The time is `now`: fences once the deadline has come.
    pub fn tick(&mut self, now: Instant) -> Option<FenceAction> {
        if self.state == FenceState::Live && now >= self.deadline() {
            self.state = FenceState::Fenced;
            return Some(FenceAction::Pause);
        }
        None
    }

    /// A renewal sent at `sent` was acknowledged with `ttl` left, and the
    /// answer is read at `now`: the lease lived when etcd answered, so a
    /// fenced node resumes, unless the answer came so late that the new
    /// deadline has passed too.
    pub fn renewed(&mut self, sent: Instant, ttl: Duration, now: Instant) -> Option<FenceAction> {
        self.last_ack = self.last_ack.max(sent);
        self.ttl = ttl;
        if self.state == FenceState::Fenced && now < self.deadline() {
            self.state = FenceState::Live;
            return Some(FenceAction::Resume);
        }
        None
    }

    /// etcd says the lease expired: what ran under it is superseded. The
    /// node stays fenced until it holds a new lease.
    pub fn lapsed(&mut self) -> FenceAction {
        self.state = FenceState::Fenced;
        FenceAction::Supersede
    }

    /// A new lease of `ttl`, its grant sent at `sent`: new work is taken
    /// again (what was superseded stays so).
    pub fn new_lease(&mut self, sent: Instant, ttl: Duration) {
        *self = Self::new(ttl, sent);
    }
}

/// What the lease's keeper tells the node.
pub trait FenceHooks: Send + Sync {
    /// Applies a fencing action.
    fn apply(&self, action: FenceAction);
    /// A new lease is held: new work is taken again.
    fn rejoined(&self);
}

impl FenceHooks for Node {
    fn apply(&self, action: FenceAction) {
        // One action at a time: guests are paused and resumed outside the
        // node's lock, in the order the fence decided.
        let _one = self.fence_actions.lock().unwrap();
        match action {
            FenceAction::Pause => self.fence_pause(),
            FenceAction::Resume => self.fence_resume(),
            FenceAction::Supersede => self.supersede(),
        }
    }

    fn rejoined(&self) {
        let superseded: Vec<String> = {
            let mut st = self.state.lock().unwrap();
            st.fenced = false;
            st.vms
                .iter()
                .filter(|(_, vm)| vm.state == VmState::Superseded)
                .map(|(name, _)| name.clone())
                .collect()
        };
        tracing::warn!(node = %self.spec.name, "holding a new lease: taking new work again");
        // Started elsewhere, unless the coordinator already did.
        for name in superseded {
            self.restart_superseded(&name);
        }
    }
}

impl Node {
    /// Pauses every guest, cancels the outgoing migrations (a guest whose
    /// migration ends without a hand-off stays paused) and takes no new
    /// work.
    fn fence_pause(&self) {
        let mut paused = Vec::new();
        let mut guests = Vec::new();
        {
            let mut st = self.state.lock().unwrap();
            st.fenced = true;
            let queued: Vec<String> = st.queue.drain(..).collect();
            for id in queued {
                if let Some(e) = st.entry(&id) {
                    e.finished_at_ms = Some(super::node::now_ms());
                    e.state = MigrationState::Cancelled;
                    e.error = Some("the node fenced itself".into());
                }
            }
            for e in &st.migrations {
                if e.direction == Direction::Outgoing && e.state == MigrationState::Running {
                    e.ctx.cancel.cancel();
                }
            }
            for (name, vm) in st.vms.iter_mut() {
                if !matches!(vm.state, VmState::Running | VmState::MigratingOut) {
                    continue;
                }
                guests.extend(vm.guest.clone());
                vm.held = true;
                paused.push(name.clone());
                if vm.state == VmState::Running {
                    vm.state = VmState::Fenced;
                }
            }
        }
        for g in guests {
            g.pause();
        }
        tracing::error!(node = %self.spec.name, ?paused, "cannot renew the lease in etcd: fenced, guests paused");
        self.changed.notify_waiters();
    }

    /// The lease held: resumes the guests the fence paused (one still
    /// migrating waits for its migration's end).
    fn fence_resume(&self) {
        let mut resumed = Vec::new();
        let mut guests = Vec::new();
        {
            let mut st = self.state.lock().unwrap();
            st.fenced = false;
            for (name, vm) in st.vms.iter_mut() {
                if vm.state == VmState::Fenced && vm.held && !vm.superseded {
                    guests.extend(vm.guest.clone());
                    vm.held = false;
                    vm.state = VmState::Running;
                    resumed.push(name.clone());
                }
            }
        }
        for g in guests {
            g.resume();
        }
        tracing::warn!(node = %self.spec.name, ?resumed, "the lease was renewed in time: guests resumed");
        self.changed.notify_waiters();
    }

    /// The lease expired: whatever this node holds may run elsewhere now,
    /// so it never runs here again, whether it runs, is fenced, paused,
    /// being created, arriving or leaving; each is marked, and stays paused
    /// once its migration ends.
    fn supersede(&self) {
        let mut superseded = Vec::new();
        let mut guests = Vec::new();
        {
            let mut st = self.state.lock().unwrap();
            st.fenced = true;
            for (name, vm) in st.vms.iter_mut() {
                vm.superseded = true;
                guests.extend(vm.guest.clone());
                if matches!(
                    vm.state,
                    VmState::Running | VmState::Fenced | VmState::Paused
                ) {
                    vm.state = VmState::Superseded;
                }
                superseded.push(name.clone());
            }
        }
        for g in guests {
            g.pause();
        }
        tracing::error!(node = %self.spec.name, ?superseded, "this node's lease expired: its guests are superseded and never resume here (`ferry vm delete` removes them)");
        self.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::rand_core::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// A number in `lo..hi`.
    fn range(rng: &mut ChaCha8Rng, lo: u64, hi: u64) -> u64 {
        lo + rng.next_u64() % (hi - lo)
    }

    /// True with probability `p`.
    fn chance(rng: &mut ChaCha8Rng, p: f64) -> bool {
        (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }

    #[test]
    fn fences_at_the_deadline_and_resumes_on_a_renewal() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(5);
        let mut f = Fence::new(ttl, t0);
        assert_eq!(f.deadline(), t0 + Duration::from_secs(4));
        assert_eq!(f.tick(t0 + Duration::from_millis(3999)), None);
        assert_eq!(
            f.tick(t0 + Duration::from_secs(4)),
            Some(FenceAction::Pause)
        );
        assert_eq!(f.tick(t0 + Duration::from_secs(5)), None);
        // An answer read after the deadline it brings leaves it fenced.
        let late = t0 + Duration::from_millis(100);
        assert_eq!(f.renewed(late, ttl, late + ttl), None);
        assert_eq!(f.state(), FenceState::Fenced);
        let sent = t0 + Duration::from_millis(4500);
        assert_eq!(f.renewed(sent, ttl, sent), Some(FenceAction::Resume));
        assert_eq!(f.state(), FenceState::Live);
        assert_eq!(f.deadline(), sent + Duration::from_secs(4));
        // An older renewal answered late never moves the deadline back.
        assert_eq!(f.renewed(t0, ttl, sent), None);
        assert_eq!(f.last_ack(), sent);
        assert_eq!(f.lapsed(), FenceAction::Supersede);
        assert_eq!(f.state(), FenceState::Fenced);
        f.new_lease(sent, ttl);
        assert_eq!(f.state(), FenceState::Live);
    }

    #[test]
    fn the_margin_is_a_fifth_of_the_ttl_within_bounds() {
        assert_eq!(margin(Duration::from_secs(2)), Duration::from_millis(500));
        assert_eq!(margin(Duration::from_secs(5)), Duration::from_secs(1));
        assert_eq!(margin(Duration::from_secs(600)), Duration::from_secs(2));
    }

    /// The invariant over seeded schedules of renewals that are lost,
    /// delayed (now and then for longer than the TTL) or answered late, with
    /// an agent that wakes as its keeper does (to renew a third of the TTL
    /// after the last ack, 200 ms after a failure, at the fence's deadline,
    /// each wake late by up to half the margin): whenever the lease expires
    /// on the server, the node was fenced before; it resumes only on an
    /// answer that the lease lives, and learns of an expiry only fenced.
    #[test]
    fn fenced_before_the_server_can_expire_the_lease() {
        let ms = Duration::from_millis;
        for seed in 0..5000u64 {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let ttl = Duration::from_secs(range(&mut rng, 2, 31));
            let t0 = Instant::now();
            let mut f = Fence::new(ttl, t0);
            let mut expires = t0 + ttl;
            let mut fenced_since: Option<Instant> = None;
            // A renewal in flight: when sent, and when and how it is answered
            // (`None`: it times out; `Some(None)`: etcd says it expired).
            #[allow(clippy::type_complexity)]
            let mut pending: Option<(Instant, Instant, Option<Option<Duration>>)> = None;
            let mut retry_at: Option<Instant> = None;
            let mut now = t0;
            for _ in 0..300 {
                let slack = (margin(ttl) / 2).mul_f64(range(&mut rng, 0, 1001) as f64 / 1000.0);
                let due = retry_at.unwrap_or(f.last_ack() + f.ttl() / 3);
                let mut next = match pending {
                    Some((_, at, _)) => at,
                    None => due.max(now),
                };
                if f.state() == FenceState::Live {
                    next = next.min(f.deadline().max(now) + slack);
                }
                now = next;
                assert!(
                    now < expires || fenced_since.is_some_and(|t| t <= expires),
                    "seed {seed}: the lease expires at {:?}, the node is live",
                    expires - t0
                );
                if f.tick(now) == Some(FenceAction::Pause) {
                    fenced_since = Some(now);
                }
                match pending.take() {
                    Some((sent, at, answer)) if at == now => match answer {
                        Some(Some(left)) => {
                            if f.renewed(sent, left, now) == Some(FenceAction::Resume) {
                                fenced_since = None;
                            }
                            retry_at = None;
                        }
                        Some(None) => {
                            assert!(now >= expires, "seed {seed}");
                            assert!(fenced_since.is_some(), "seed {seed}");
                            assert_eq!(f.lapsed(), FenceAction::Supersede);
                            break;
                        }
                        None => retry_at = Some(now + ms(200)),
                    },
                    Some(p) => pending = Some(p),
                    None if now >= due => {
                        // Sent now: lost (the call times out), or received
                        // after a delay and answered after another.
                        let long = chance(&mut rng, 0.05);
                        let d = |rng: &mut ChaCha8Rng| {
                            ms(range(rng, 0, if long { 40_000 } else { 1500 }))
                        };
                        if chance(&mut rng, 0.3) {
                            pending = Some((now, now + ms(500), None));
                            continue;
                        }
                        let there = now + d(&mut rng);
                        let back = there + d(&mut rng);
                        if there < expires {
                            expires = there + ttl;
                            pending = Some((now, back, Some(Some(ttl))));
                        } else {
                            pending = Some((now, back.max(expires), Some(None)));
                        }
                    }
                    None => {}
                }
            }
        }
    }
}
