//! Patches: a page sent as where it differs from a page-sized region the
//! receiver already holds (its *base*, at any byte offset in guest memory).
//!
//! ```text
//! ops:  { literal length u16, the literal bytes, copy length u16 }…
//! ```
//!
//! Positions are implicit: the page is built from its first byte on, a
//! literal's bytes at the current position, then a copy of the base's bytes
//! at the same position (the base is aligned with the page, so content the
//! two share at one shift is one long copy). The lengths cover the page
//! exactly and the ops end there.

use super::PAGE_SIZE;

/// Shortest run of equal bytes worth a copy (four bytes of lengths).
pub const MIN_COPY: usize = 24;
/// Fewest bytes a patch must copy from its base to be sent as one.
pub const MIN_COPIED: usize = 256;
/// Longest patch: one longer would cost more than the page.
pub const MAX_PATCH: usize = PAGE_SIZE;
/// Shortest patch (one empty literal, one copy of the whole page).
pub const MIN_PATCH: usize = 4;

/// Why a patch cannot be applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PatchError {
    /// A length reaches past the page's end.
    #[error("a length reaches past the page's end")]
    PastEnd,
    /// The ops end before a length is whole, or before the page is.
    #[error("its ops end early")]
    Truncated,
    /// Bytes follow the op that completes the page.
    #[error("bytes follow its last op")]
    Trailing,
}

/// Encodes `page` against `base` (both [`PAGE_SIZE`] bytes) into `out`:
/// the patch's length, if it copies at least [`MIN_COPIED`] bytes and fits
/// in [`MAX_PATCH`] bytes (and in `out`).
pub fn diff(page: &[u8], base: &[u8], out: &mut [u8]) -> Option<usize> {
    debug_assert!(page.len() == PAGE_SIZE && base.len() == PAGE_SIZE);
    let limit = out.len().min(MAX_PATCH);
    let (mut o, mut copied, mut lit_from, mut i) = (0usize, 0usize, 0usize, 0usize);
    let mut put = |o: &mut usize, bytes: &[u8]| -> Option<()> {
        let end = *o + bytes.len();
        (end <= limit).then(|| {
            out[*o..end].copy_from_slice(bytes);
            *o = end;
        })
    };
    while i < PAGE_SIZE {
        if page[i] != base[i] {
            i += 1;
            continue;
        }
        let run = page[i..]
            .iter()
            .zip(&base[i..])
            .take_while(|(a, b)| a == b)
            .count();
        if run >= MIN_COPY {
            put(&mut o, &((i - lit_from) as u16).to_le_bytes())?;
            put(&mut o, &page[lit_from..i])?;
            put(&mut o, &(run as u16).to_le_bytes())?;
            copied += run;
            lit_from = i + run;
        }
        i += run;
    }
    if lit_from < PAGE_SIZE {
        put(&mut o, &((PAGE_SIZE - lit_from) as u16).to_le_bytes())?;
        put(&mut o, &page[lit_from..])?;
        put(&mut o, &0u16.to_le_bytes())?;
    }
    (copied >= MIN_COPIED).then_some(o)
}

/// Builds the page patch `ops` makes of `base` into `out` (both
/// [`PAGE_SIZE`] bytes). Every length is checked against the page before
/// it is used.
pub fn apply(base: &[u8], ops: &[u8], out: &mut [u8]) -> Result<(), PatchError> {
    debug_assert!(base.len() == PAGE_SIZE && out.len() == PAGE_SIZE);
    let (mut at, mut pos) = (0usize, 0usize);
    let len = |at: &mut usize| -> Result<usize, PatchError> {
        let b = ops.get(*at..*at + 2).ok_or(PatchError::Truncated)?;
        *at += 2;
        Ok(usize::from(u16::from_le_bytes([b[0], b[1]])))
    };
    while pos < PAGE_SIZE {
        let lit = len(&mut at)?;
        if lit > PAGE_SIZE - pos {
            return Err(PatchError::PastEnd);
        }
        let bytes = ops.get(at..at + lit).ok_or(PatchError::Truncated)?;
        out[pos..pos + lit].copy_from_slice(bytes);
        (at, pos) = (at + lit, pos + lit);
        let copy = len(&mut at)?;
        if copy > PAGE_SIZE - pos {
            return Err(PatchError::PastEnd);
        }
        out[pos..pos + copy].copy_from_slice(&base[pos..pos + copy]);
        pos += copy;
    }
    if at != ops.len() {
        return Err(PatchError::Trailing);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(seed: u8) -> Vec<u8> {
        (0..PAGE_SIZE)
            .map(|i| b"the quick brown fox jumps over "[(i * 7 + seed as usize) % 31] ^ seed)
            .collect()
    }

    #[test]
    fn a_page_sharing_runs_with_its_base_round_trips_smaller() {
        let base = text(3);
        let mut page = base.clone();
        page[100..140].copy_from_slice(&[9; 40]);
        page[4000..].fill(1);
        let mut ops = vec![0; MAX_PATCH];
        let n = diff(&page, &base, &mut ops).expect("a patch");
        assert!(n < 200, "{n} bytes");
        let mut out = vec![0; PAGE_SIZE];
        apply(&base, &ops[..n], &mut out).unwrap();
        assert_eq!(out, page);
    }

    #[test]
    fn a_page_sharing_too_little_is_no_patch() {
        let base = text(3);
        assert_eq!(diff(&text(5), &base, &mut vec![0; MAX_PATCH]), None);
        let mut page = text(5);
        page[..200].copy_from_slice(&base[..200]);
        assert_eq!(diff(&page, &base, &mut vec![0; MAX_PATCH]), None);
        page[..300].copy_from_slice(&base[..300]);
        assert!(diff(&page, &base, &mut vec![0; MAX_PATCH]).is_some());
    }

    #[test]
    fn an_identical_page_is_one_copy() {
        let base = text(1);
        let mut ops = vec![0; MAX_PATCH];
        assert_eq!(diff(&base, &base, &mut ops), Some(MIN_PATCH));
        assert_eq!(ops[..4], [0, 0, 0, 16]);
    }

    #[test]
    fn bad_ops_are_errors_never_panics() {
        let base = text(1);
        let mut out = vec![0; PAGE_SIZE];
        let whole = [0u8, 0, 0, 16];
        assert_eq!(apply(&base, &whole, &mut out), Ok(()));
        assert_eq!(
            apply(&base, &[0, 0, 1, 16], &mut out),
            Err(PatchError::PastEnd)
        );
        assert_eq!(apply(&base, &[1, 16], &mut out), Err(PatchError::PastEnd));
        assert_eq!(
            apply(&base, &[0, 0, 0], &mut out),
            Err(PatchError::Truncated)
        );
        assert_eq!(
            apply(&base, &[5, 0, 1], &mut out),
            Err(PatchError::Truncated)
        );
        assert_eq!(apply(&base, &[], &mut out), Err(PatchError::Truncated));
        assert_eq!(
            apply(&base, &[0, 0, 0, 16, 0], &mut out),
            Err(PatchError::Trailing)
        );
        // Empty ops pairs make no progress but each costs four bytes: they
        // end with the ops.
        assert_eq!(apply(&base, &[0; 64], &mut out), Err(PatchError::Truncated));
    }
}
