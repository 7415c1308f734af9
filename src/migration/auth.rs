//! Proof of a cluster's key in a labelled session's setup: HMAC-SHA256 over
//! the destination's fresh nonce and the fields that say what the session is
//! (the guest's size and kind, the VM, the migration, the source node), so a
//! peer without the key is refused before any page is accepted, and a
//! recorded setup cannot be replayed to another session.

use crate::wire::SessionSetup;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// A key that proves membership of a cluster (never printed).
#[derive(Clone, PartialEq, Eq)]
pub struct SessionKey(pub Vec<u8>);

impl std::fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SessionKey(<{} bytes>)", self.0.len())
    }
}

fn mac(key: &[u8], nonce: &[u8; 16], setup: &SessionSetup) -> Hmac<Sha256> {
    let mut m =
        <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes keys of any length");
    m.update(b"ferry session setup v1\0");
    m.update(nonce);
    m.update(&setup.memory_bytes.to_le_bytes());
    m.update(&[setup.guest_kind as u8]);
    if let Some(l) = &setup.label {
        for text in [&l.vm, &l.migration_id, &l.source_node] {
            m.update(&(text.len() as u32).to_le_bytes());
            m.update(text.as_bytes());
        }
    }
    m
}

/// The proof a source puts in `setup.label.proof`.
pub fn session_proof(key: &SessionKey, nonce: &[u8; 16], setup: &SessionSetup) -> [u8; 32] {
    let out = mac(&key.0, nonce, setup).finalize().into_bytes();
    let mut proof = [0u8; 32];
    proof.copy_from_slice(&out);
    proof
}

/// Whether `setup` carries a proof of `key` over `nonce` (compared in
/// constant time).
pub fn verify_session_proof(key: &SessionKey, nonce: &[u8; 16], setup: &SessionSetup) -> bool {
    let Some(label) = &setup.label else {
        return false;
    };
    mac(&key.0, nonce, setup).verify_slice(&label.proof).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{GuestKind, SessionLabel, VerifyMode};

    fn setup() -> SessionSetup {
        SessionSetup {
            memory_bytes: 1 << 30,
            channels: 4,
            codec: 3,
            codec_level: 0,
            guest_kind: GuestKind::Sim,
            verify: VerifyMode::Fast,
            max_bandwidth: 0,
            flags: 0,
            label: Some(SessionLabel {
                vm: "web-1".into(),
                migration_id: "a-1".into(),
                source_node: "a".into(),
                proof: [0; 32],
            }),
        }
    }

    #[test]
    fn a_proof_holds_for_its_key_nonce_and_fields_only() {
        let key = SessionKey(b"cluster key".to_vec());
        let nonce = [7u8; 16];
        let mut s = setup();
        s.label.as_mut().unwrap().proof = session_proof(&key, &nonce, &s);
        assert!(verify_session_proof(&key, &nonce, &s));
        assert!(!verify_session_proof(
            &SessionKey(b"other".to_vec()),
            &nonce,
            &s
        ));
        assert!(
            !verify_session_proof(&key, &[8u8; 16], &s),
            "another session's nonce"
        );
        let mut renamed = s.clone();
        renamed.label.as_mut().unwrap().vm = "web-2".into();
        assert!(!verify_session_proof(&key, &nonce, &renamed));
        let mut bigger = s.clone();
        bigger.memory_bytes *= 2;
        assert!(!verify_session_proof(&key, &nonce, &bigger));
        let mut bare = s.clone();
        bare.label = None;
        assert!(!verify_session_proof(&key, &nonce, &bare));
        assert_eq!(format!("{key:?}"), "SessionKey(<11 bytes>)");
    }
}
