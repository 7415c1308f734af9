//! Page content that looks like a real guest's: zero pages, text, binary
//! structures and random (incompressible) bytes, mixed in set proportions.

use super::{GuestMemory, PAGE_SIZE};
use crate::page::PageIndex;
use rand_chacha::rand_core::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::fmt;
use std::str::FromStr;

/// Pages per extent: initial content comes in 64 KiB extents of one kind, as real
/// memory holds runs of zero pages, heaps and page cache rather than a salad.
pub const FILL_EXTENT_PAGES: u64 = 16;

/// What a page holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContentKind {
    /// All zero bytes.
    Zero,
    /// English-like words and line breaks (compresses about 2-4x).
    Text,
    /// Binary structures: pointers, small integers, zero padding (about 1.5-3x).
    Binary,
    /// Uniformly random bytes (does not compress).
    Random,
}

impl ContentKind {
    /// All kinds, in the order the spec lists them.
    pub const ALL: [ContentKind; 4] = [Self::Zero, Self::Text, Self::Binary, Self::Random];

    fn name(self) -> &'static str {
        match self {
            Self::Zero => "zero",
            Self::Text => "text",
            Self::Binary => "binary",
            Self::Random => "random",
        }
    }

    /// Writes one page of this kind into `page` from `rng`.
    pub fn generate(self, rng: &mut ChaCha8Rng, page: &mut [u8]) {
        match self {
            Self::Zero => page.fill(0),
            Self::Random => rng.fill_bytes(page),
            Self::Text => generate_text(rng, page),
            Self::Binary => generate_binary(rng, page),
        }
    }
}

const WORDS: [&str; 64] = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "had",
    "they",
    "you",
    "were",
    "their",
    "one",
    "all",
    "we",
    "can",
    "her",
    "has",
    "there",
    "been",
    "if",
    "more",
    "when",
    "will",
    "would",
    "who",
    "so",
    "no",
    "memory",
    "page",
    "guest",
    "kernel",
    "migration",
    "network",
    "request",
    "server",
    "value",
    "error",
    "user",
    "data",
    "time",
    "state",
    "node",
    "cluster",
];

fn generate_text(rng: &mut ChaCha8Rng, page: &mut [u8]) {
    let mut i = 0;
    let mut bits = 0u64;
    let mut left = 0;
    while i < page.len() {
        if left == 0 {
            bits = rng.next_u64();
            left = 10;
        }
        let w = WORDS[(bits & 63) as usize].as_bytes();
        let sep = if (bits >> 6) & 15 == 0 { b'\n' } else { b' ' };
        bits >>= 6;
        left -= 1;
        let n = w.len().min(page.len() - i);
        page[i..i + n].copy_from_slice(&w[..n]);
        i += n;
        if i < page.len() {
            page[i] = sep;
            i += 1;
        }
    }
}

fn generate_binary(rng: &mut ChaCha8Rng, page: &mut [u8]) {
    // A heap-like page: 8-byte slots holding pointers into one region, small
    // counters, zero padding and the odd random word.
    let base = 0x0000_7f00_0000_0000u64 | ((rng.next_u64() & 0xff_ffff) << 16);
    let mut bits = 0u64;
    let mut left = 0;
    for slot in page.chunks_exact_mut(8) {
        if left == 0 {
            bits = rng.next_u64();
            left = 16;
        }
        let v = match bits & 3 {
            0 => base + ((bits >> 2) & 0xfff0),
            1 => (bits >> 2) & 0xff,
            2 => 0,
            _ => rng.next_u64(),
        };
        bits >>= 4;
        left -= 1;
        slot.copy_from_slice(&v.to_le_bytes());
    }
}

/// Why a `--fill` spec was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid fill {input:?}: {reason} (e.g. zero:35,text:30,binary:20,random:15 or random)")]
pub struct FillError {
    input: String,
    reason: String,
}

/// A mix of page kinds with integer weights, e.g. `zero:35,text:30,binary:20,random:15`;
/// or several mixes separated by `|`, each for an equal, consecutive share of
/// memory (`text|random`: the first half text, the second incompressible), so
/// the page mix a migration sees changes as it walks memory.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct FillSpec {
    segments: Vec<[u32; 4]>,
}

impl Default for FillSpec {
    /// A realistic idle-server mix: a third zero pages, then text, heap, and
    /// already-compressed data.
    fn default() -> Self {
        Self {
            segments: vec![[35, 30, 20, 15]],
        }
    }
}

impl TryFrom<String> for FillSpec {
    type Error = FillError;
    fn try_from(s: String) -> Result<Self, FillError> {
        s.parse()
    }
}

impl From<FillSpec> for String {
    fn from(f: FillSpec) -> String {
        f.to_string()
    }
}

impl FillSpec {
    /// A spec of only one kind.
    pub fn only(kind: ContentKind) -> Self {
        let mut weights = [0; 4];
        weights[kind as usize] = 1;
        Self {
            segments: vec![weights],
        }
    }

    /// The weight of one kind, summed over the segments (each segment's weights
    /// normalised to 1000, so segments count equally).
    pub fn weight(&self, kind: ContentKind) -> u32 {
        self.segments
            .iter()
            .map(|w| w[kind as usize] * 1000 / w.iter().sum::<u32>())
            .sum()
    }

    /// How many consecutive segments memory is split into.
    pub fn segments(&self) -> usize {
        self.segments.len()
    }

    /// The segment that item `index` of `count` (a page, an extent) falls in.
    pub fn segment_of(&self, index: u64, count: u64) -> usize {
        let n = self.segments.len() as u64;
        (index.min(count.saturating_sub(1)) * n / count.max(1)) as usize
    }

    /// Chooses a kind from 32 random bits by segment `segment`'s weights.
    pub fn pick(&self, segment: usize, r: u32) -> ContentKind {
        let weights = &self.segments[segment.min(self.segments.len() - 1)];
        let total: u32 = weights.iter().sum();
        let mut x = r % total;
        for kind in ContentKind::ALL {
            let w = weights[kind as usize];
            if x < w {
                return kind;
            }
            x -= w;
        }
        ContentKind::Zero
    }

    fn extent_rng(seed: u64, extent: u64) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(seed ^ extent.wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }

    /// Generates the initial content of extent `extent` of `extents` (16 pages
    /// each) into `out`, which holds `out.len() / PAGE_SIZE` pages.
    /// Deterministic in `seed`. Returns the extent's kind.
    pub fn generate_extent(
        &self,
        seed: u64,
        extent: u64,
        extents: u64,
        out: &mut [u8],
    ) -> ContentKind {
        let mut rng = Self::extent_rng(seed, extent);
        let kind = self.pick(self.segment_of(extent, extents), rng.next_u32());
        for page in out.chunks_exact_mut(PAGE_SIZE) {
            kind.generate(&mut rng, page);
        }
        kind
    }

    /// Writes the initial content into all of `mem`, in parallel on `threads`
    /// threads. Zero extents are not touched, so they stay unbacked.
    pub fn fill(&self, mem: &GuestMemory, seed: u64, threads: usize) {
        let extents = mem.pages().div_ceil(FILL_EXTENT_PAGES);
        let threads = threads.max(1) as u64;
        std::thread::scope(|s| {
            for t in 0..threads {
                s.spawn(move || {
                    let mut buf = vec![0u8; FILL_EXTENT_PAGES as usize * PAGE_SIZE];
                    let mut e = t;
                    while e < extents {
                        let first = e * FILL_EXTENT_PAGES;
                        let n = FILL_EXTENT_PAGES.min(mem.pages() - first);
                        let out = &mut buf[..n as usize * PAGE_SIZE];
                        if self.generate_extent(seed, e, extents, out) != ContentKind::Zero {
                            for (i, page) in out.chunks_exact(PAGE_SIZE).enumerate() {
                                mem.write_page(PageIndex(first + i as u64), page);
                            }
                        }
                        e += threads;
                    }
                });
            }
        });
    }
}

impl FromStr for FillSpec {
    type Err = FillError;

    fn from_str(s: &str) -> Result<Self, FillError> {
        let err = |reason: &str| FillError {
            input: s.to_string(),
            reason: reason.to_string(),
        };
        let mut segments = Vec::new();
        for mix in s.split('|') {
            let mut weights = [0u32; 4];
            for part in mix.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                let (name, weight) = match part.split_once(':') {
                    Some((n, w)) => (
                        n.trim(),
                        w.trim()
                            .parse::<u32>()
                            .map_err(|_| err("weights are whole numbers"))?,
                    ),
                    None => (part, 1),
                };
                let kind = ContentKind::ALL
                    .into_iter()
                    .find(|k| k.name() == name)
                    .ok_or_else(|| err(&format!("unknown kind {name:?}")))?;
                weights[kind as usize] = weights[kind as usize].saturating_add(weight);
                // A part's weights together, so no sum of them overflows.
                if weights.iter().fold(0u32, |a, w| a.saturating_add(*w)) > 1_000_000 {
                    return Err(err("the weights of a part add up to at most 1000000"));
                }
            }
            if weights.iter().sum::<u32>() == 0 {
                return Err(err(if segments.is_empty() && !s.contains('|') {
                    "no weight given"
                } else {
                    "a |-separated part has no weight"
                }));
            }
            segments.push(weights);
        }
        if segments.len() > 64 {
            return Err(err("at most 64 |-separated parts"));
        }
        Ok(Self { segments })
    }
}

impl fmt::Display for FillSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, weights) in self.segments.iter().enumerate() {
            if i > 0 {
                f.write_str("|")?;
            }
            let mut first = true;
            for kind in ContentKind::ALL {
                let w = weights[kind as usize];
                if w > 0 {
                    if !first {
                        f.write_str(",")?;
                    }
                    write!(f, "{}:{w}", kind.name())?;
                    first = false;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_specs() {
        let s: FillSpec = "zero:35,text:30,binary:20,random:15".parse().unwrap();
        assert_eq!(s, FillSpec::default());
        assert_eq!(
            "random".parse::<FillSpec>().unwrap(),
            FillSpec::only(ContentKind::Random)
        );
        assert_eq!(s.to_string(), "zero:35,text:30,binary:20,random:15");
        assert!("zero:x".parse::<FillSpec>().is_err());
        assert!("gold:3".parse::<FillSpec>().is_err());
        assert!("zero:0".parse::<FillSpec>().is_err());
    }

    #[test]
    fn segments_split_memory_in_order() {
        let s: FillSpec = "text|random".parse().unwrap();
        assert_eq!(s.to_string(), "text:1|random:1");
        assert_eq!(s.segments(), 2);
        assert_eq!((s.segment_of(0, 100), s.segment_of(49, 100)), (0, 0));
        assert_eq!((s.segment_of(50, 100), s.segment_of(99, 100)), (1, 1));
        assert!("text|".parse::<FillSpec>().is_err());
        assert!("|".parse::<FillSpec>().is_err());
        let mem = GuestMemory::new(512 * PAGE_SIZE as u64).unwrap();
        s.fill(&mem, 3, 2);
        let ratio = |first: u64| {
            mem.with_pages(first, 256, |b| {
                b.len() as f64 / lz4_flex::block::compress(b).len() as f64
            })
        };
        assert!(ratio(0) > 1.8, "first half compresses: {}", ratio(0));
        assert!(ratio(256) < 1.01, "second half does not: {}", ratio(256));
        // Serialised as the string users write.
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(json, "\"text:1|random:1\"");
        assert_eq!(serde_json::from_str::<FillSpec>(&json).unwrap(), s);
    }

    #[test]
    fn weights_that_would_overflow_are_refused() {
        let many = vec!["zero:1000000"; 5000].join(",");
        let e = many.parse::<FillSpec>().unwrap_err();
        assert!(e.to_string().contains("at most 1000000"), "{e}");
        assert!("zero:600000,text:600000".parse::<FillSpec>().is_err());
        let s: FillSpec = "zero:500000,text:500000".parse().unwrap();
        assert_eq!(s.weight(ContentKind::Zero), 500);
        // Deserialised from a peer's state, the same rules apply.
        assert!(serde_json::from_str::<FillSpec>(&format!("{many:?}")).is_err());
    }

    #[test]
    fn kinds_compress_as_labelled() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut page = vec![0u8; PAGE_SIZE * 16];
        let mut ratio = |kind: ContentKind| {
            for p in page.chunks_exact_mut(PAGE_SIZE) {
                kind.generate(&mut rng, p);
            }
            page.len() as f64 / lz4_flex::block::compress(&page).len() as f64
        };
        assert!(ratio(ContentKind::Zero) > 100.0);
        let text = ratio(ContentKind::Text);
        assert!(text > 1.8, "text ratio {text}");
        let bin = ratio(ContentKind::Binary);
        assert!(bin > 1.2 && bin < text * 2.0, "binary ratio {bin}");
        assert!(ratio(ContentKind::Random) < 1.01);
    }

    #[test]
    fn fill_is_deterministic_and_mixed() {
        let mem = GuestMemory::new(1024 * PAGE_SIZE as u64).unwrap();
        FillSpec::default().fill(&mem, 42, 2);
        let other = GuestMemory::new(1024 * PAGE_SIZE as u64).unwrap();
        FillSpec::default().fill(&other, 42, 1);
        mem.with_pages(0, 1024, |a| other.with_pages(0, 1024, |b| assert!(a == b)));
        let zero = mem.with_pages(0, 1024, |s| {
            s.chunks_exact(PAGE_SIZE)
                .filter(|p| crate::memory::is_zero_page(p))
                .count()
        });
        assert!((200..600).contains(&zero), "{zero} zero pages of 1024");
    }
}
