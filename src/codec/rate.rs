//! The link's rate as the source's sockets show it, for `auto`'s choice
//! and the link limit it weighs codecs against.

/// The link's rate as the sockets show it, from timed writes and the
/// receiver's acknowledgements summed over windows of at least
/// [`Self::WINDOW`] of wall time ([`Self::FIRST_WINDOW`] for the first), across
/// all channels.
///
/// In a window where the writers spent a real share of their time blocked in
/// writes, the send buffers were full: the link was the bottleneck, and what
/// was acknowledged is its rate. Acknowledged, not written: the first writes land
/// in empty send buffers at memory speed, and counting them would take the
/// link for many times faster than it is until the buffers had drained. (Per-write rates would be useless: a writer is
/// woken when a third of its send buffer has drained, so one write waits long
/// and the next few land in the buffer at memory speed.) A window in which they
/// did not block (the encoder was the bottleneck, or the buffers were still
/// filling) only says the link carries at least what went through: it can
/// raise the estimate, never lower it below that.
///
/// Such a window that carried about the estimate cannot tell a link with
/// room from one just filled: the encoder may be sending at the link's
/// rate without its writes ever waiting. So the estimate grows on trial
/// ([`Self::GROWTH`]), and the codec chosen for the larger figure sends
/// more. The trial succeeds when, within [`Self::TRIAL`] unblocked windows,
/// one carries 10% more than the link was known to carry: the estimate is
/// then what went through, grown on trial again if that filled it. It
/// fails when none does: the old estimate comes back. A blocked window
/// ends it either way, measuring the link from the old estimate; carrying
/// no more than 10% above it, that too is a failure. The next trial after a
/// failure waits [`Self::COOLDOWN`] windows, twice as long after each
/// failure in a row, up to [`Self::MAX_COOLDOWN`]. Without
/// this a 125 MB/s tbf link once grown to 180 MB/s stayed there for the
/// rest of a 1 GiB migration: zstd:1 filled the link at 117 MB/s without
/// blocking, `auto` took it to be CPU-bound, and sent 30,000 pages with
/// lz4 (7% more bytes, 6% more time than zstd:1 alone; `BENCHMARKS.md`).
#[derive(Debug, Clone, Copy, Default)]
pub struct SocketRate {
    started: Option<std::time::Instant>,
    acked: f64,
    secs: f64,
    rate: Option<f64>,
    /// A growth on trial: what the link was known to carry before it, and
    /// the unblocked windows it has left.
    trial: Option<(f64, u32)>,
    /// Windows before the next trial may start.
    cooldown: u32,
    /// Trials failed in a row.
    failed: u32,
}

impl SocketRate {
    /// The shortest window a rate is computed over.
    pub const WINDOW: std::time::Duration = std::time::Duration::from_millis(100);
    /// The first window: short, so that a slow link is known (and compressed
    /// for) after a few batches rather than a tenth of a second.
    pub const FIRST_WINDOW: std::time::Duration = std::time::Duration::from_millis(30);
    /// The share of a window the writers must spend blocked for it to measure
    /// the link.
    const BLOCKED: f64 = 0.1;
    /// An unblocked window that carried this share of the estimate ...
    const HEADROOM: f64 = 0.9;
    /// ... grows it by this factor, on trial.
    const GROWTH: f64 = 1.5;
    /// Unblocked windows a growth has to show its room in. Each costs what
    /// a wrong growth makes `auto` choose: five windows took half a second
    /// of lz4 in a 2.3 s migration over 1 Gbit/s ...
    const TRIAL: u32 = 3;
    /// ... by a throughput this much above the estimate before it.
    const CONFIRM: f64 = 1.1;
    /// Windows after a first failed trial before the next, doubling with
    /// each failure in a row up to the most.
    const COOLDOWN: u32 = 10;
    const MAX_COOLDOWN: u32 = 50;

    /// Records that the receiver acknowledged `bytes` of frames.
    pub fn record_ack(&mut self, bytes: f64) {
        self.acked += bytes;
    }

    /// Records that a write took `secs`, ending at
    /// `now`, on one of `channels` sockets that share the link.
    pub fn record(&mut self, secs: f64, channels: usize, now: std::time::Instant) {
        let started = *self.started.get_or_insert(now);
        self.secs += secs;
        let wall = now.saturating_duration_since(started).as_secs_f64();
        let window = if self.rate.is_none() {
            Self::FIRST_WINDOW
        } else {
            Self::WINDOW
        };
        if wall < window.as_secs_f64() {
            return;
        }
        let channels = channels.max(1) as f64;
        let blocked = self.secs / (channels * wall);
        let through = self.acked / wall;
        self.cooldown = self.cooldown.saturating_sub(1);
        if blocked >= Self::BLOCKED {
            // Mostly the newest window: the first ones still carry the send
            // buffers filling at memory speed, and should be forgotten fast.
            // A growth on trial was never measured: from the figure before it.
            let from = self.trial.map_or(self.rate, |(before, _)| Some(before));
            self.rate = Some(from.map_or(through, |o| o + 0.75 * (through - o)));
            // Blocked on trial: the link took no more than before, or more.
            match self.trial.take() {
                Some((before, _)) if through <= before * Self::CONFIRM => self.back_off(),
                Some(_) => self.failed = 0,
                None => {}
            }
        } else if let Some(o) = self.rate {
            self.rate = Some(self.unblocked(o, through));
        }
        (self.started, self.acked, self.secs) = (Some(now), 0.0, 0.0);
    }

    /// The estimate after an unblocked window that carried `through`, the
    /// estimate having been `o`.
    fn unblocked(&mut self, o: f64, through: f64) -> f64 {
        // What the link is known to carry: `o`, unless it is a growth on trial.
        let mut known = o;
        if let Some((before, left)) = self.trial.take() {
            if through > before * Self::CONFIRM {
                // The room was there, as much as went through: grown on
                // trial again if that filled the estimate.
                self.failed = 0;
                if through < Self::HEADROOM * o {
                    return through;
                }
                known = through;
            } else if left > 1 {
                self.trial = Some((before, left - 1));
                return o.max(through);
            } else {
                self.back_off();
                return before.max(through);
            }
        }
        if through >= o * Self::GROWTH {
            // Measured beyond any growth: nothing to try.
            return through;
        }
        // Not blocked while sending at about the estimate: the link may have
        // room the estimate does not know of. Grow it, or an estimate taken
        // while the receiver was the bottleneck (its memory still cold, at
        // the start) would keep a fast link compressed for good: compressing
        // makes the encoder the bottleneck, whose output never blocks and
        // never says the link is faster.
        if through >= Self::HEADROOM * o && self.cooldown == 0 {
            self.trial = Some((known.max(through), Self::TRIAL));
            return o * Self::GROWTH;
        }
        o.max(through)
    }

    /// A trial failed: the next waits twice as long as the last.
    fn back_off(&mut self) {
        self.cooldown = (Self::COOLDOWN << self.failed.min(3)).min(Self::MAX_COOLDOWN);
        self.failed = self.failed.saturating_add(1);
    }

    /// Bytes per second over all channels; `None` until a window has shown
    /// the link to be the bottleneck.
    pub fn rate(&self) -> Option<f64> {
        self.rate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_rate_measures_the_link_only_while_it_is_the_bottleneck() {
        let ms = std::time::Duration::from_millis;
        let mut at = std::time::Instant::now();
        let mut r = SocketRate::default();
        // A write taking `secs`, after the receiver acknowledged `acked` bytes.
        let step = |r: &mut SocketRate, at: std::time::Instant, acked: f64, secs: f64| {
            r.record_ack(acked);
            r.record(secs, 4, at);
        };
        // Unblocked from the start (loopback): no estimate, so no link limit.
        for _ in 0..30 {
            at += ms(10);
            step(&mut r, at, 1e6, 1e-4);
        }
        assert_eq!(r.rate(), None);
        // 4 sockets sharing 100 MB/s: one write in four waits 40 ms for a
        // third of its buffer to drain, the others land at once.
        for i in 0..80 {
            at += ms(10);
            step(&mut r, at, 1e6, if i % 4 == 3 { 0.04 } else { 1e-4 });
        }
        let link = r.rate().unwrap();
        assert!((80e6..120e6).contains(&link), "{link}");
        // The encoder becomes the bottleneck at 20 MB/s: writes stop blocking,
        // which says nothing against the link's rate.
        for _ in 0..40 {
            at += ms(50);
            step(&mut r, at, 1e6, 1e-4);
        }
        // (The window that spans the change still saw some blocking.)
        let after = r.rate().unwrap();
        assert!(after >= 0.7 * link, "{after} fell from {link}");
        for _ in 0..40 {
            at += ms(50);
            step(&mut r, at, 1e6, 1e-4);
        }
        assert_eq!(r.rate(), Some(after));
        // Unblocked at 300 MB/s: the link carries at least that.
        for _ in 0..40 {
            at += ms(10);
            step(&mut r, at, 3e6, 1e-4);
        }
        assert!(r.rate().unwrap() >= 280e6, "{:?}", r.rate());
    }

    #[test]
    fn an_estimate_the_encoder_keeps_up_with_grows_until_writes_block() {
        // The first window saw a cold receiver: 220 MB/s. Compressing, the
        // encoder then sends 220 MB/s without ever blocking; the link (1.25
        // GB/s) has room, so the estimate must grow rather than stay put.
        let ms = std::time::Duration::from_millis;
        let mut at = std::time::Instant::now();
        let mut r = SocketRate::default();
        r.record(0.0, 4, at);
        at += ms(30);
        r.record_ack(220e6 * 0.03);
        r.record(0.05, 4, at);
        assert!((200e6..240e6).contains(&r.rate().unwrap()));
        for _ in 0..6 {
            // The encoder sends what the estimate allows, unblocked.
            let rate = r.rate().unwrap().min(1.25e9);
            at += ms(100);
            r.record_ack(rate * 0.1);
            r.record(1e-4, 4, at);
        }
        assert!(r.rate().unwrap() >= 1.0e9, "{:?}", r.rate());
    }

    /// A [`SocketRate`] that five blocked windows have shown a 125 MB/s
    /// link, the time of its last window, and that rate.
    fn known_125(at: &mut std::time::Instant) -> (SocketRate, f64) {
        let mut r = SocketRate::default();
        r.record(0.0, 4, *at);
        for _ in 0..5 {
            *at += std::time::Duration::from_millis(100);
            r.record_ack(12.5e6);
            r.record(0.2, 4, *at);
        }
        let link = r.rate().unwrap();
        assert!((120e6..130e6).contains(&link), "{link}");
        (r, link)
    }

    /// A 100 ms window in which `acked` bytes went through, blocked or not.
    fn window(r: &mut SocketRate, at: &mut std::time::Instant, acked: f64, blocked: bool) -> f64 {
        *at += std::time::Duration::from_millis(100);
        r.record_ack(acked);
        r.record(if blocked { 0.2 } else { 1e-4 }, 4, *at);
        r.rate().unwrap()
    }

    #[test]
    fn a_growth_the_throughput_does_not_follow_is_taken_back_and_tried_less_often() {
        // The encoder fills the 125 MB/s link at 117 MB/s without its writes
        // waiting: the estimate grows on trial, and comes back when nothing
        // more goes through.
        let mut at = std::time::Instant::now();
        let (mut r, link) = known_125(&mut at);
        let rates: Vec<f64> = (0..100)
            .map(|_| window(&mut r, &mut at, 11.7e6, false))
            .collect();
        let grown: Vec<usize> = (0..rates.len())
            .filter(|&i| rates[i] > 1.2 * link)
            .collect();
        // Grown for the trial's three windows, then back; the next trial
        // waits ten windows, the one after twenty, then forty.
        let trials: Vec<usize> = [0, 13, 36, 79].into_iter().flat_map(|t| t..t + 3).collect();
        assert_eq!(grown, trials, "{rates:?}");
        assert!((link * 0.99..link * 1.01).contains(&rates[3]), "{rates:?}");
    }

    #[test]
    fn writes_blocked_on_trial_measure_the_link_from_the_estimate_before_it() {
        let mut at = std::time::Instant::now();
        let (mut r, link) = known_125(&mut at);
        assert!(
            window(&mut r, &mut at, 11.7e6, false) > 1.4 * link,
            "on trial"
        );
        // The cheaper codec the growth chose fills the link: writes wait.
        let measured = window(&mut r, &mut at, 12.5e6, true);
        assert!((link * 0.97..link * 1.03).contains(&measured), "{measured}");
        // Back to filling it unblocked: a failed trial, so no new one soon.
        for _ in 0..9 {
            let rate = window(&mut r, &mut at, 11.7e6, false);
            assert!(rate < 1.1 * link, "{rate}");
        }
        assert!(
            window(&mut r, &mut at, 11.7e6, false) > 1.4 * link,
            "tried again"
        );
    }

    #[test]
    fn a_window_carrying_more_than_a_growth_is_taken_as_measured() {
        // A cold receiver showed 50 MB/s; then 300 MB/s go through unblocked.
        let mut at = std::time::Instant::now();
        let mut r = SocketRate::default();
        r.record(0.0, 4, at);
        window(&mut r, &mut at, 5e6, true);
        assert_eq!(window(&mut r, &mut at, 30e6, false), 300e6);
        // That was no trial: the next window full at 300 MB/s may grow it.
        assert_eq!(window(&mut r, &mut at, 30e6, false), 450e6);
    }

    #[test]
    fn a_slow_link_is_known_after_its_first_window_despite_the_first_burst() {
        // 16 MiB land in empty send buffers within 4 ms; then the writes
        // block while the 125 MB/s link delivers 1 MiB per 8 ms.
        let ms = std::time::Duration::from_millis;
        let start = std::time::Instant::now();
        let mut r = SocketRate::default();
        for i in 1..=16 {
            r.record(1e-5, 4, start + std::time::Duration::from_micros(i * 250));
        }
        let mut at = start + ms(4);
        while r.rate().is_none() {
            at += ms(8);
            r.record_ack(1048576.0);
            r.record(0.032, 4, at);
        }
        assert!(at - start <= ms(40), "known after {:?}", at - start);
        let rate = r.rate().unwrap();
        assert!((100e6..160e6).contains(&rate), "{rate}");
    }
}
