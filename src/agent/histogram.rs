//! Prometheus histograms of finished migrations: fixed buckets, observed by
//! the node, rendered in the text format by `GET /metrics`.

use std::fmt::Write;
use std::sync::Mutex;

/// A histogram over fixed upper bounds (ascending), its counts per bucket
/// and the sum of what it observed.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Observations per bucket (not cumulative); the last is above every
    /// bound. And the sum.
    counts: Mutex<(Vec<u64>, f64)>,
}

impl Histogram {
    /// An empty histogram over `bounds` (ascending, finite).
    pub fn new(bounds: &'static [f64]) -> Self {
        debug_assert!(bounds.windows(2).all(|w| w[0] < w[1]));
        Self {
            bounds,
            counts: Mutex::new((vec![0; bounds.len() + 1], 0.0)),
        }
    }

    /// Counts `v` (a value that is not finite or is negative is not).
    pub fn observe(&self, v: f64) {
        if !v.is_finite() || v < 0.0 {
            return;
        }
        let i = self.bounds.partition_point(|&b| b < v);
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        c.0[i] += 1;
        c.1 += v;
    }

    /// Appends the histogram as metric `name` with `help`: its cumulative
    /// buckets, `_sum` and `_count`.
    pub fn render(&self, out: &mut String, name: &str, help: &str) {
        let (counts, sum) = self
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut total = 0;
        for (bound, n) in self.bounds.iter().zip(&counts) {
            total += n;
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {total}");
        }
        total += counts[self.bounds.len()];
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {total}");
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {total}");
    }
}

/// Bounds of a migration's total time, seconds.
pub const DURATION_BOUNDS: &[f64] = &[
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
];
/// Bounds of a migration's pause, seconds.
pub const DOWNTIME_BOUNDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.3, 0.5, 1.0, 2.5, 5.0,
];
/// Bounds of a migration's wire bytes: 1 MiB to 64 GiB, by fours.
pub const BYTES_BOUNDS: &[f64] = &[
    1048576.0,
    4194304.0,
    16777216.0,
    67108864.0,
    268435456.0,
    1073741824.0,
    4294967296.0,
    17179869184.0,
    68719476736.0,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_count_up_to_their_bound_and_render_cumulative() {
        let h = Histogram::new(&[1.0, 2.0]);
        for v in [0.5, 1.0, 1.5, 3.0, f64::NAN, -1.0] {
            h.observe(v);
        }
        let mut out = String::new();
        h.render(&mut out, "x_seconds", "X.");
        assert_eq!(
            out,
            "# HELP x_seconds X.\n# TYPE x_seconds histogram\n\
             x_seconds_bucket{le=\"1\"} 2\nx_seconds_bucket{le=\"2\"} 3\n\
             x_seconds_bucket{le=\"+Inf\"} 4\nx_seconds_sum 6\nx_seconds_count 4\n"
        );
    }
}
