//! Frame authentication: keyed BLAKE3 over each frame of one direction of
//! one connection, sent as a 16-byte tag after the payload.
//!
//! Once a keyed session without TLS is set up (channel 0 after
//! SESSION_SETUP_RESPONSE, a further channel after CHANNEL_BIND_RESPONSE),
//! every frame carries a tag over a frame counter, the header (its CRC field
//! aside) and the payload, under a key of its own for that connection and
//! direction. The CRC is then not computed (the field is zero) and not
//! checked: the tag covers everything the CRC would. The counter is implicit
//! (TCP keeps a connection's order), so a frame replayed, dropped, reordered
//! or moved to another connection or direction fails its tag.

use super::{DecodeError, HEADER_LEN};

/// Bytes of the tag after each authenticated frame's payload.
pub const MAC_LEN: usize = 16;

/// One direction of one connection: its key and the next frame's counter.
#[derive(Clone)]
pub struct FrameMac {
    key: [u8; 32],
    counter: u64,
}

impl std::fmt::Debug for FrameMac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FrameMac(<key>, frame {})", self.counter)
    }
}

impl FrameMac {
    /// Starts at frame 0 under `key` (derived for this connection and
    /// direction alone).
    pub fn new(key: [u8; 32]) -> Self {
        Self { key, counter: 0 }
    }

    /// Starts the next frame's tag over its raw header; feed the payload to
    /// the returned state, then [`FrameTag::finish`] or [`FrameTag::check`].
    pub fn begin(&mut self, header: &[u8; HEADER_LEN]) -> FrameTag {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(&self.counter.to_le_bytes());
        // The CRC field (36..40) is zero and not covered.
        h.update(&header[..36]);
        self.counter += 1;
        FrameTag(h)
    }

    /// Frames tagged so far.
    pub fn frames(&self) -> u64 {
        self.counter
    }
}

/// A frame's tag being computed, payload piece by piece.
#[derive(Debug, Clone)]
pub struct FrameTag(blake3::Hasher);

impl FrameTag {
    /// Adds the next piece of the payload.
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    /// The tag to send after the payload.
    pub fn finish(self) -> [u8; MAC_LEN] {
        let mut tag = [0u8; MAC_LEN];
        tag.copy_from_slice(&self.0.finalize().as_bytes()[..MAC_LEN]);
        tag
    }

    /// Checks the tag that followed the payload, in constant time.
    pub fn check(self, tag: &[u8; MAC_LEN]) -> Result<(), DecodeError> {
        let want = self.finish();
        let diff = want.iter().zip(tag).fold(0u8, |d, (a, b)| d | (a ^ b));
        if diff != 0 {
            return Err(DecodeError::Mac);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{encode_header, Command, Header};

    fn tag(mac: &mut FrameMac, header: &[u8; HEADER_LEN], payload: &[u8]) -> [u8; MAC_LEN] {
        let mut t = mac.begin(header);
        t.update(payload);
        t.finish()
    }

    #[test]
    fn a_tag_holds_once_and_fails_for_any_change() {
        let header = encode_header(&Header::new(Command::PageBatch), b"pages");
        let mut tx = FrameMac::new([7; 32]);
        let mut rx = FrameMac::new([7; 32]);
        let t0 = tag(&mut tx, &header, b"pages");
        let mut check = rx.begin(&header);
        check.update(b"pages");
        assert_eq!(check.check(&t0), Ok(()));
        // The same frame again (a replay) fails: the counter moved on.
        let mut replay = rx.begin(&header);
        replay.update(b"pages");
        assert_eq!(replay.check(&t0), Err(DecodeError::Mac));
        // A changed payload, header, key or tag fails.
        let fresh = |k| FrameMac::new([k; 32]);
        let mut c = fresh(7).begin(&header);
        c.update(b"pagez");
        assert_eq!(c.check(&t0), Err(DecodeError::Mac));
        let mut other = header;
        other[8] ^= 1;
        let mut c = fresh(7).begin(&other);
        c.update(b"pages");
        assert_eq!(c.check(&t0), Err(DecodeError::Mac));
        let mut c = fresh(8).begin(&header);
        c.update(b"pages");
        assert_eq!(c.check(&t0), Err(DecodeError::Mac));
        let mut bad = t0;
        bad[15] ^= 0x80;
        let mut c = fresh(7).begin(&header);
        c.update(b"pages");
        assert_eq!(c.check(&bad), Err(DecodeError::Mac));
        // The CRC field is not covered; pieces hash as the whole.
        let mut crcless = header;
        crcless[36..40].copy_from_slice(&[0; 4]);
        let mut c = fresh(7).begin(&crcless);
        c.update(b"pa");
        c.update(b"ges");
        assert_eq!(c.check(&t0), Ok(()));
    }
}
