//! `max_concurrent: "auto"`: how many of a drain's (or with
//! `max_concurrent_migrations = "auto"`, the node queue's) migrations run at
//! once, from the node's link, its VMs' write rates and its CPU cores, with
//! the reason in words.
//!
//! Measured on real drains (`ferry bench drain`, BENCHMARKS.md): past two at
//! once a drain gets no shorter, and each VM's migration gets as much longer
//! as the number at once, its pause with it; two beat one by 2-9% where each
//! migration's share of the link stays well above its VM's write rate (the
//! second fills the link while the first finishes its rounds and pause);
//! where two shares would not, one at a time won by up to 2.6 times, since
//! every page written meanwhile is sent again.

use crate::memory::WorkloadPattern;
use crate::units::Rate;

/// What the node knows of its outgoing link.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Link {
    /// Its `max_bandwidth`, bytes/s.
    Cap(u64),
    /// The fastest wire rate a past outgoing migration reached, bytes/s.
    Measured(u64),
    /// Neither.
    Unknown,
}

/// A share of the link must carry this many times a VM's write rate for
/// its rounds to shrink fast (each round at most half the one before).
const HEADROOM: u64 = 2;

/// The fastest write rate of VMs given as (workload, `dirty_rate`): an idle
/// VM writes nothing, whatever rate it was given.
pub fn dirtiest(vms: impl Iterator<Item = (WorkloadPattern, u64)>) -> u64 {
    vms.map(|(w, rate)| if w == WorkloadPattern::Idle { 0 } else { rate })
        .max()
        .unwrap_or(0)
}

/// Chooses how many of `vms` migrations run at once on `link`, the
/// fastest-writing VM writing `dirtiest` bytes/s, with `cores` CPU cores to
/// compress and send on; says why.
pub fn choose(link: Link, dirtiest: u64, vms: usize, cores: usize) -> (u32, String) {
    if vms <= 1 {
        return (1, "at most one VM to move: one at a time".into());
    }
    if cores <= 1 {
        // The second would fill the link with the first one's CPU.
        return (
            1,
            "one CPU core to compress and send on: one at a time".into(),
        );
    }
    let (rate, what) = match link {
        Link::Cap(r) => (r, "the node's max_bandwidth"),
        Link::Measured(r) => (r, "its fastest migration so far"),
        Link::Unknown => {
            return (
                2,
                "no link rate known yet (no max_bandwidth, no migration measured): 2 at once"
                    .into(),
            )
        }
    };
    let share = rate / 2;
    let need = dirtiest.saturating_mul(HEADROOM);
    if share < need {
        (
            1,
            format!(
                "the link carries {} ({what}): two at once would leave each {}, under twice the fastest writer's {}; one at a time",
                Rate(rate as f64),
                Rate(share as f64),
                Rate(dirtiest as f64)
            ),
        )
    } else {
        (
            2,
            format!(
                "the link carries {} ({what}): two at once leave each {}, at least twice the fastest writer's {}; 2 at once, one filling the link while the other finishes (more would only lengthen each)",
                Rate(rate as f64),
                Rate(share as f64),
                Rate(dirtiest as f64)
            ),
        )
    }
}

/// The CPU cores this process may run on (asked once: the answer reads
/// cgroup files).
pub fn cores() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1_000_000;

    #[test]
    fn two_at_once_where_each_share_outruns_the_writers_twice() {
        // The realistic drain of BENCHMARKS.md: 20 MB/s writers, 1 Gbit/s.
        let (n, why) = choose(Link::Cap(125 * MB), 20 * MB, 8, 2);
        assert_eq!(n, 2, "{why}");
        assert!(
            why.contains("max_bandwidth") && why.contains("62.50 MB/s"),
            "{why}"
        );
        assert_eq!(choose(Link::Measured(1_050 * MB), 20 * MB, 8, 2).0, 2);
        // Exactly twice is enough.
        assert_eq!(choose(Link::Cap(200 * MB), 50 * MB, 3, 2).0, 2);
    }

    #[test]
    fn one_at_a_time_where_two_shares_would_not_keep_up() {
        // 200 Mbit/s and 50 MB/s writers: one at a time won by 2.6 times.
        let (n, why) = choose(Link::Cap(25 * MB), 50 * MB, 3, 2);
        assert_eq!(n, 1, "{why}");
        assert!(why.contains("one at a time"), "{why}");
        // 1 Gbit/s and 50 MB/s: 62.5 MB/s each is under 100 MB/s.
        assert_eq!(choose(Link::Cap(125 * MB), 50 * MB, 3, 2).0, 1);
        assert_eq!(choose(Link::Cap(199 * MB), 50 * MB, 3, 2).0, 1);
    }

    #[test]
    fn concurrency_reads_and_writes_a_number_or_auto_only() {
        use crate::agent::request::Concurrency;
        let read = |t: &str| serde_json::from_str::<Concurrency>(t);
        assert_eq!(read("3").unwrap(), Concurrency::Fixed(3));
        assert_eq!(read("\"auto\"").unwrap(), Concurrency::Auto);
        for bad in ["\"AUTO\"", "1.5", "\"2\"", "-1", "true", "4294967296"] {
            let e = read(bad).unwrap_err().to_string();
            assert!(e.contains("max_concurrent"), "{bad}: {e}");
        }
        for c in [Concurrency::Fixed(7), Concurrency::Auto] {
            let text = serde_json::to_string(&c).unwrap();
            assert_eq!(read(&text).unwrap(), c, "{text}");
            assert_eq!(c.to_string().parse::<Concurrency>().unwrap(), c);
        }
        assert!("fast".parse::<Concurrency>().is_err());
    }

    #[test]
    fn idle_vms_write_nothing_whatever_their_rate() {
        let hot = "hot:4MiB".parse::<WorkloadPattern>().unwrap();
        let vms = [(WorkloadPattern::Idle, 100 * MB), (hot, 10 * MB)];
        assert_eq!(dirtiest(vms.into_iter()), 10 * MB);
        assert_eq!(dirtiest([(WorkloadPattern::Idle, 100 * MB)].into_iter()), 0);
        assert_eq!(dirtiest(std::iter::empty()), 0);
    }

    #[test]
    fn one_vm_or_an_unknown_link() {
        assert_eq!(choose(Link::Cap(MB), 0, 1, 2).0, 1);
        assert_eq!(choose(Link::Cap(MB), 0, 0, 2).0, 1);
        let (n, why) = choose(Link::Unknown, 10 * MB, 4, 2);
        assert_eq!(n, 2, "{why}");
        assert!(why.contains("no link rate known"), "{why}");
        // Idle VMs on any known link: two.
        assert_eq!(choose(Link::Measured(MB), 0, 4, 2).0, 2);
        // One core: one at a time, whatever the link.
        let (n, why) = choose(Link::Cap(125 * MB), 0, 4, 1);
        assert_eq!(n, 1, "{why}");
        assert!(why.contains("one CPU core"), "{why}");
        // Writers faster than any share without overflow.
        assert_eq!(choose(Link::Cap(u64::MAX), u64::MAX, 4, 2).0, 1);
    }
}
