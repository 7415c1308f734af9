//! Parsing and printing of sizes, rates and durations as operators write them.
//!
//! SI prefixes are decimal (`100MB/s` is 10^8 bytes per second), IEC prefixes
//! binary (`1GiB` is 2^30 bytes), and `bit` units divide by eight
//! (`1Gbit/s` is 125,000,000 bytes per second). A bare number is bytes.

use std::fmt;
use std::time::Duration;

/// Why a size, rate or duration string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {input:?}: {reason}")]
pub struct UnitError {
    what: &'static str,
    input: String,
    reason: &'static str,
}

impl UnitError {
    fn new(what: &'static str, input: &str, reason: &'static str) -> Self {
        Self {
            what,
            input: input.to_string(),
            reason,
        }
    }
}

/// Splits `"12.5MiB"` into `(12.5, "MiB")`.
fn split_number(s: &str) -> Option<(f64, &str)> {
    let s = s.trim();
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_'))
        .unwrap_or(s.len());
    if end == 0 {
        return None;
    }
    let number: String = s[..end].chars().filter(|&c| c != '_').collect();
    let value: f64 = number.parse().ok()?;
    Some((value, s[end..].trim()))
}

/// Bytes per unit for a size suffix (`""`, `B`, `k`, `KB`, `KiB`, `Mbit`, ...).
fn size_multiplier(unit: &str) -> Option<f64> {
    let (prefix, bits) = if let Some(p) = unit.strip_suffix("bit") {
        (p, true)
    } else if let Some(p) = unit.strip_suffix("bps") {
        (p, true)
    } else if let Some(p) = unit.strip_suffix('B') {
        (p, false)
    } else if let Some(p) = unit.strip_suffix('b') {
        (p, true)
    } else {
        (unit, false)
    };
    let scale = match prefix {
        "" => 1.0,
        "k" | "K" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    Some(if bits { scale / 8.0 } else { scale })
}

/// Parses a size in bytes: `4096`, `512MiB`, `1GiB`, `2GB`.
pub fn parse_size(s: &str) -> Result<u64, UnitError> {
    let (value, unit) =
        split_number(s).ok_or_else(|| UnitError::new("size", s, "expected a number"))?;
    let mult = size_multiplier(unit).ok_or_else(|| {
        UnitError::new(
            "size",
            s,
            "unknown unit (use B, KiB, MiB, GiB, KB, MB, GB, ...)",
        )
    })?;
    let bytes = value * mult;
    if !bytes.is_finite() || bytes > u64::MAX as f64 {
        return Err(UnitError::new("size", s, "too large"));
    }
    Ok(bytes.round() as u64)
}

/// Parses a rate in bytes per second: `100MB/s`, `1Gbit/s`, `1Gbit`, `50MiB`.
pub fn parse_rate(s: &str) -> Result<u64, UnitError> {
    let trimmed = s.trim();
    let body = trimmed
        .strip_suffix("/s")
        .or_else(|| trimmed.strip_suffix("ps").filter(|b| b.ends_with('B')))
        .unwrap_or(trimmed);
    parse_size(body)
        .map_err(|_| UnitError::new("rate", s, "expected e.g. 100MB/s, 1Gbit/s or 12500000"))
}

/// Parses an optional rate where `unlimited` (or `0`) means no cap.
pub fn parse_bandwidth(s: &str) -> Result<Option<u64>, UnitError> {
    match s.trim() {
        "unlimited" | "none" | "0" => Ok(None),
        other => parse_rate(other).map(|r| if r == 0 { None } else { Some(r) }),
    }
}

/// Parses a duration: `300ms`, `5s`, `2m`, `1h`, `250us`; a bare number is milliseconds.
pub fn parse_duration(s: &str) -> Result<Duration, UnitError> {
    let (value, unit) =
        split_number(s).ok_or_else(|| UnitError::new("duration", s, "expected a number"))?;
    let secs = match unit {
        "" | "ms" => value / 1e3,
        "us" | "µs" => value / 1e6,
        "s" => value,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        _ => {
            return Err(UnitError::new(
                "duration",
                s,
                "unknown unit (use us, ms, s, m, h)",
            ))
        }
    };
    Duration::try_from_secs_f64(secs).map_err(|_| UnitError::new("duration", s, "out of range"))
}

/// A byte count printed with binary units: `1.00 GiB`.
#[derive(Debug, Clone, Copy)]
pub struct Bytes(pub u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
        let mut v = self.0 as f64;
        let mut i = 0;
        while v >= 1024.0 && i + 1 < UNITS.len() {
            v /= 1024.0;
            i += 1;
        }
        if i == 0 {
            write!(f, "{} B", self.0)
        } else {
            write!(f, "{v:.2} {}", UNITS[i])
        }
    }
}

/// A size printed exactly in its largest whole binary unit: `64MiB`, `1GiB`, `1000`.
pub fn compact_size(bytes: u64) -> String {
    for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

/// A rate in bytes per second printed with decimal units: `1.25 GB/s`.
#[derive(Debug, Clone, Copy)]
pub struct Rate(pub f64);

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 5] = ["B/s", "kB/s", "MB/s", "GB/s", "TB/s"];
        let mut v = self.0;
        let mut i = 0;
        while v >= 1000.0 && i + 1 < UNITS.len() {
            v /= 1000.0;
            i += 1;
        }
        write!(f, "{v:.2} {}", UNITS[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("2GB").unwrap(), 2_000_000_000);
        assert_eq!(parse_size("64 KiB").unwrap(), 65536);
        assert_eq!(parse_size("1.5KiB").unwrap(), 1536);
        assert!(parse_size("12XB").is_err());
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("").is_err());
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("100MB/s").unwrap(), 100_000_000);
        assert_eq!(parse_rate("1Gbit/s").unwrap(), 125_000_000);
        assert_eq!(parse_rate("1Gbit").unwrap(), 125_000_000);
        assert_eq!(parse_rate("100Mbit").unwrap(), 12_500_000);
        assert_eq!(parse_rate("10Gbps").unwrap(), 1_250_000_000);
        assert_eq!(parse_rate("50MiB/s").unwrap(), 50 << 20);
        assert_eq!(parse_rate("12500000").unwrap(), 12_500_000);
        assert!(parse_rate("fast").is_err());
        assert_eq!(parse_bandwidth("unlimited").unwrap(), None);
        assert_eq!(parse_bandwidth("1Gbit").unwrap(), Some(125_000_000));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("300ms").unwrap(), Duration::from_millis(300));
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("250").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("5 parsecs").is_err());
    }

    #[test]
    fn display() {
        assert_eq!(Bytes(1 << 30).to_string(), "1.00 GiB");
        assert_eq!(Bytes(10).to_string(), "10 B");
        assert_eq!(Rate(1.25e9).to_string(), "1.25 GB/s");
        assert_eq!(compact_size(64 << 20), "64MiB");
        assert_eq!(compact_size(1 << 30), "1GiB");
        assert_eq!(compact_size(1000), "1000");
        assert_eq!(parse_size(&compact_size(3 << 20)).unwrap(), 3 << 20);
    }
}
