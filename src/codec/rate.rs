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
/// raise the estimate, never lower it.
#[derive(Debug, Clone, Copy, Default)]
pub struct SocketRate {
    started: Option<std::time::Instant>,
    acked: f64,
    secs: f64,
    rate: Option<f64>,
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
    /// ... grows it by this factor.
    const GROWTH: f64 = 1.5;

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
        if blocked >= Self::BLOCKED {
            // Mostly the newest window: the first ones still carry the send
            // buffers filling at memory speed, and should be forgotten fast.
            self.rate = Some(self.rate.map_or(through, |o| o + 0.75 * (through - o)));
        } else if let Some(o) = self.rate {
            // Not blocked while sending at about the estimate: the link has
            // room the estimate does not know of. Grow it, or an estimate
            // taken while the receiver was the bottleneck (its memory still
            // cold, at the start) would keep a fast link compressed for good:
            // compressing makes the encoder the bottleneck, whose output
            // never blocks and never says the link is faster.
            self.rate = Some(if through >= Self::HEADROOM * o {
                (o * Self::GROWTH).max(through)
            } else {
                o.max(through)
            });
        }
        (self.started, self.acked, self.secs) = (Some(now), 0.0, 0.0);
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
