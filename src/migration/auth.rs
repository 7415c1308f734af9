//! Mutual proof of a shared key, HMAC-SHA256 throughout (no home-made
//! primitives).
//!
//! ```text
//! source                                   destination
//!   NEGOTIATE(ns)                  ──▶
//!                                  ◀──   NEGOTIATE_RESPONSE(nd)
//!   SESSION_SETUP(fields, P_s)     ──▶   P_s = HMAC(K, "setup"    ns nd fields)
//!                                  ◀──   SESSION_SETUP_RESPONSE(id, token, P_d)
//!                                        P_d = HMAC(K, "response" ns nd id token)
//!   CHANNEL_BIND(id, c, nb, P_b)   ──▶   B   = HMAC(K, "bind key" ns nd id token)
//!                                        P_b = HMAC(B, "bind"     id c nb)
//!                                  ◀──   CHANNEL_BIND_RESPONSE(HMAC(B, "bound" id c nb))
//! ```
//!
//! Both nonces are fresh random values, so a recorded setup or response
//! proves nothing in another session; the destination accepts each bind
//! nonce once per session, so a recorded bind cannot be replayed. Without a
//! key, binds are proved with the session's token as the key: only the peer
//! that set the session up can add channels to it.

use crate::wire::ChannelId;
use crate::wire::SessionSetup;
use crate::wire::{Negotiate, NegotiateResponse};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use std::path::Path;

/// A shared key that proves membership of a cluster (never printed).
#[derive(Clone, PartialEq, Eq)]
pub struct SessionKey(pub Vec<u8>);

impl std::fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SessionKey(<{} bytes>)", self.0.len())
    }
}

/// The shortest secret (key, token) accepted from a file, bytes.
pub const MIN_KEY_LEN: usize = 16;

impl SessionKey {
    /// A fresh random 32-byte key, for runs that own both ends (the demo,
    /// the benchmarks).
    pub fn random() -> Self {
        Self(random_bytes::<32>().to_vec())
    }

    /// Reads a key file ([`read_secret_file`]'s rules: at least
    /// [`MIN_KEY_LEN`] bytes, its owner's alone, not through a symlink).
    pub fn load(path: &Path) -> Result<Self, String> {
        read_secret_file(path).map(Self)
    }
}

/// Reads a secret (key, token or private key) file, trailing whitespace
/// trimmed. Refuses, naming why: a symlink (the file must be where it is
/// named), a file owned by another user, one that its group or others may
/// read or write, and a secret shorter than [`MIN_KEY_LEN`] bytes.
pub fn read_secret_file(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let shown = path.display();
    let link = std::fs::symlink_metadata(path).map_err(|e| format!("{shown}: {e}"))?;
    if link.file_type().is_symlink() {
        return Err(format!(
            "{shown} is a symlink: a secret file must be the file itself"
        ));
    }
    // No following a symlink swapped in since, and the checks below are of
    // the file actually opened.
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| format!("{shown}: {e}"))?;
    let meta = f.metadata().map_err(|e| format!("{shown}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("{shown} is not a regular file"));
    }
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "{shown} may be read or written by its group or others (mode {mode:03o}); a secret must not be: chmod 600 {shown}"
        ));
    }
    let me = effective_uid();
    if meta.uid() != me {
        return Err(format!(
            "{shown} belongs to user {} and this process runs as user {me}: a secret must be its reader's own",
            meta.uid()
        ));
    }
    let mut bytes = Vec::new();
    f.by_ref()
        .take(1 << 20)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("{shown}: {e}"))?;
    while bytes.last().is_some_and(|b| b.is_ascii_whitespace()) {
        bytes.pop();
    }
    if bytes.is_empty() {
        return Err(format!("{shown} is empty"));
    }
    if bytes.len() < MIN_KEY_LEN {
        return Err(format!(
            "{shown} holds {} bytes; a secret needs at least {MIN_KEY_LEN}",
            bytes.len()
        ));
    }
    Ok(bytes)
}

/// This process's effective user id.
#[allow(unsafe_code)]
fn effective_uid() -> u32 {
    // SAFETY: geteuid takes no arguments, touches no memory of ours and
    // cannot fail (POSIX: "always successful").
    unsafe { libc::geteuid() }
}

/// The label under which the migration key is derived.
const MIGRATION_KEY_INFO: &[u8] = b"ferry v2 migration key";

/// The key a cluster's migrations are proved with, derived by HKDF-SHA256
/// under its own label from `secret` (the cluster's key file, or its API
/// token when there is none): never the same bytes as the token, so the one
/// cannot stand for the other.
pub fn derive_migration_key(secret: &[u8]) -> Vec<u8> {
    let hk = hkdf::Hkdf::<Sha256>::new(Some(b"ferry cluster"), secret);
    let mut key = vec![0u8; 32];
    hk.expand(MIGRATION_KEY_INFO, &mut key)
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    key
}

/// Writes a secret file that only its owner may read (mode 600).
pub fn write_secret_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    // An existing file keeps its mode: restrict it too.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(bytes)
}

type HmacSha256 = Hmac<Sha256>;

fn mac(key: &[u8], label: &[u8]) -> HmacSha256 {
    let mut m =
        <HmacSha256 as KeyInit>::new_from_slice(key).expect("HMAC takes keys of any length");
    m.update(b"ferry v2 ");
    m.update(label);
    m.update(b"\0");
    m
}

fn finish(m: HmacSha256) -> [u8; 32] {
    m.finalize().into_bytes().into()
}

/// A TLS channel's exported keying material (empty on plain channels), so
/// that a proof made over one TLS session fails over another.
fn bind_to(m: &mut HmacSha256, binding: &[u8]) {
    m.update(&(binding.len() as u32).to_le_bytes());
    m.update(binding);
}

/// What a session's setup proofs cover besides the key: both nonces, the
/// rest of the negotiation and channel 0's TLS keying material (empty when
/// plain).
#[derive(Debug, Clone, Copy)]
pub struct Handshake<'a> {
    /// The source's nonce, from NEGOTIATE.
    pub source_nonce: &'a [u8; 16],
    /// The destination's nonce, from NEGOTIATE_RESPONSE.
    pub dest_nonce: &'a [u8; 16],
    /// NEGOTIATE's and NEGOTIATE_RESPONSE's other fields ([`negotiation`]):
    /// a capability or codec changed on the path fails both proofs.
    pub negotiation: &'a [u8],
    /// Channel 0's TLS keying material (empty when plain).
    pub binding: &'a [u8],
}

/// Bytes of [`negotiation`].
pub const NEGOTIATION_LEN: usize = 27;

/// The fields of NEGOTIATE and NEGOTIATE_RESPONSE the proofs cover besides
/// the nonces (which they cover apart): versions, capabilities, codecs and
/// page sizes, as each side sent or read them.
pub fn negotiation(n: &Negotiate, r: &NegotiateResponse) -> [u8; NEGOTIATION_LEN] {
    let mut out = [0u8; NEGOTIATION_LEN];
    out[0] = n.min_version;
    out[1] = n.max_version;
    out[2..6].copy_from_slice(&n.capabilities.to_le_bytes());
    out[6..10].copy_from_slice(&n.codecs.to_le_bytes());
    out[10..14].copy_from_slice(&n.page_size.to_le_bytes());
    out[14] = r.version;
    out[15..19].copy_from_slice(&r.capabilities.to_le_bytes());
    out[19..23].copy_from_slice(&r.codecs.to_le_bytes());
    out[23..27].copy_from_slice(&r.page_size.to_le_bytes());
    out
}

impl Handshake<'_> {
    fn start(&self, key: &SessionKey, what: &[u8]) -> HmacSha256 {
        let mut m = mac(&key.0, what);
        m.update(self.source_nonce);
        m.update(self.dest_nonce);
        m.update(&(self.negotiation.len() as u32).to_le_bytes());
        m.update(self.negotiation);
        bind_to(&mut m, self.binding);
        m
    }
}

fn setup_mac(key: &SessionKey, h: &Handshake, setup: &SessionSetup) -> HmacSha256 {
    let mut m = h.start(key, b"setup");
    m.update(&setup.memory_bytes.to_le_bytes());
    m.update(&setup.channels.to_le_bytes());
    m.update(&[
        setup.codec,
        setup.codec_level as u8,
        setup.guest_kind as u8,
        setup.verify as u8,
    ]);
    m.update(&setup.max_bandwidth.to_le_bytes());
    // The encoder sets the flags that say which parts follow.
    let flags = setup.flags
        & !(crate::wire::SETUP_LABELLED | crate::wire::SETUP_PROVEN | crate::wire::SETUP_DELTA);
    m.update(&flags.to_le_bytes());
    match &setup.label {
        Some(l) => {
            m.update(&[1]);
            for text in [&l.vm, &l.migration_id, &l.source_node] {
                m.update(&(text.len() as u32).to_le_bytes());
                m.update(text.as_bytes());
            }
        }
        None => m.update(&[0]),
    }
    match &setup.base {
        Some(b) => {
            m.update(&[1]);
            m.update(&(b.migration_id.len() as u32).to_le_bytes());
            m.update(b.migration_id.as_bytes());
            m.update(&b.digest.to_le_bytes());
        }
        None => m.update(&[0]),
    }
    m
}

/// The source's proof over the handshake and every field of its setup (the
/// `proof` field itself aside).
pub fn setup_proof(key: &SessionKey, h: &Handshake, setup: &SessionSetup) -> [u8; 32] {
    finish(setup_mac(key, h, setup))
}

/// Whether `setup` carries the proof of `key` (compared in constant time).
pub fn verify_setup_proof(key: &SessionKey, h: &Handshake, setup: &SessionSetup) -> bool {
    let Some(proof) = &setup.proof else {
        return false;
    };
    setup_mac(key, h, setup).verify_slice(proof).is_ok()
}

/// What the destination's setup response proves besides the key: the
/// session it made, the bind token and the credits it grants, so no one on
/// the path can change them before frames are tagged.
#[derive(Debug, Clone, Copy)]
pub struct Response<'a> {
    /// The session id.
    pub session_id: u64,
    /// The token further channels bind with.
    pub token: &'a [u8; 16],
    /// Credits each channel starts with.
    pub credits: u16,
    /// Whether it took the setup's delta base.
    pub delta: bool,
}

fn response_mac(key: &SessionKey, h: &Handshake, r: &Response) -> HmacSha256 {
    let mut m = h.start(key, b"response");
    m.update(&r.session_id.to_le_bytes());
    m.update(r.token);
    m.update(&r.credits.to_le_bytes());
    m.update(&[u8::from(r.delta)]);
    m
}

/// The destination's proof, in its setup response.
pub fn response_proof(key: &SessionKey, h: &Handshake, r: &Response) -> [u8; 32] {
    finish(response_mac(key, h, r))
}

/// Whether `proof` is the destination's proof of `key` (constant time).
pub fn verify_response_proof(
    key: &SessionKey,
    h: &Handshake,
    r: &Response,
    proof: &[u8; 32],
) -> bool {
    response_mac(key, h, r).verify_slice(proof).is_ok()
}

/// What one channel bind proves itself over.
#[derive(Debug, Clone, Copy)]
pub struct Bind<'a> {
    /// The session.
    pub session_id: u64,
    /// The channel being bound.
    pub channel: ChannelId,
    /// The bind's fresh nonce.
    pub nonce: &'a [u8; 16],
    /// The connection's TLS keying material (empty when plain).
    pub binding: &'a [u8],
}

/// The secret that proves channel binds of one session.
#[derive(Clone, PartialEq, Eq)]
pub struct BindSecret([u8; 32]);

impl std::fmt::Debug for BindSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BindSecret(<32 bytes>)")
    }
}

impl BindSecret {
    /// Derives a session's bind secret: from the shared key and both nonces
    /// when there is a key, from the session's token when not.
    pub fn derive(
        key: Option<&SessionKey>,
        source_nonce: &[u8; 16],
        dest_nonce: &[u8; 16],
        session_id: u64,
        token: &[u8; 16],
    ) -> Self {
        let mut m = match key {
            Some(k) => mac(&k.0, b"bind key"),
            None => mac(token, b"bind key (no shared key)"),
        };
        m.update(source_nonce);
        m.update(dest_nonce);
        m.update(&session_id.to_le_bytes());
        m.update(token);
        Self(finish(m))
    }

    fn mac(&self, what: &[u8], b: &Bind) -> HmacSha256 {
        let mut m = mac(&self.0, what);
        m.update(&b.session_id.to_le_bytes());
        m.update(&b.channel.0.to_le_bytes());
        m.update(b.nonce);
        bind_to(&mut m, b.binding);
        m
    }

    /// The source's proof in a CHANNEL_BIND.
    pub fn bind_proof(&self, b: &Bind) -> [u8; 32] {
        finish(self.mac(b"bind", b))
    }

    /// Whether a CHANNEL_BIND's proof holds (constant time).
    pub fn verify_bind(&self, b: &Bind, proof: &[u8; 32]) -> bool {
        self.mac(b"bind", b).verify_slice(proof).is_ok()
    }

    fn bound_mac(&self, b: &Bind, credits: u16) -> HmacSha256 {
        let mut m = self.mac(b"bound", b);
        m.update(&credits.to_le_bytes());
        m
    }

    /// The destination's proof in a CHANNEL_BIND_RESPONSE, over the bind
    /// and the `credits` its header grants.
    pub fn bound_proof(&self, b: &Bind, credits: u16) -> [u8; 32] {
        finish(self.bound_mac(b, credits))
    }

    /// Whether a CHANNEL_BIND_RESPONSE's proof holds (constant time).
    pub fn verify_bound(&self, b: &Bind, credits: u16, proof: &[u8; 32]) -> bool {
        self.bound_mac(b, credits).verify_slice(proof).is_ok()
    }
}

/// Which connection of a session frame keys are for: channel 0's first,
/// known by the source's NEGOTIATE nonce, or a bind, known by its nonce
/// (each accepted once per session).
#[derive(Debug, Clone, Copy)]
pub enum Connection<'a> {
    /// Channel 0 as the session was set up on it.
    Setup(&'a [u8; 16]),
    /// A CHANNEL_BIND of `channel` with its nonce.
    Bind(ChannelId, &'a [u8; 16]),
}

/// The frame-authentication keys of one connection, one per direction.
pub struct FrameKeys {
    /// For frames the source sends.
    pub to_dest: [u8; 32],
    /// For frames the destination sends.
    pub to_source: [u8; 32],
}

impl BindSecret {
    /// The keys that authenticate `conn`'s frames after its handshake (only
    /// meaningful when the secret came from a shared key).
    pub fn frame_keys(&self, session_id: u64, conn: Connection) -> FrameKeys {
        let key = |direction: &[u8]| {
            let mut m = mac(&self.0, b"frames");
            m.update(direction);
            m.update(&session_id.to_le_bytes());
            match conn {
                Connection::Setup(nonce) => {
                    m.update(b"setup");
                    m.update(nonce);
                }
                Connection::Bind(channel, nonce) => {
                    m.update(b"bind");
                    m.update(&channel.0.to_le_bytes());
                    m.update(nonce);
                }
            }
            finish(m)
        };
        FrameKeys {
            to_dest: key(b"to destination"),
            to_source: key(b"to source"),
        }
    }

    /// The key of the session's dense-page references (see
    /// [`crate::digest::ref_tag`]): a guest that cannot learn it cannot
    /// make two different pages carry the same reference.
    pub fn refs_key(&self, session_id: u64) -> [u8; 32] {
        let mut m = mac(&self.0, b"page references");
        m.update(&session_id.to_le_bytes());
        finish(m)
    }
}

/// Fresh random bytes from the operating system.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    use std::io::Read;
    let mut b = [0u8; N];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .expect("/dev/urandom is readable");
    b
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
            }),
            base: None,
            proof: None,
        }
    }

    #[test]
    fn a_setup_proof_holds_for_its_key_nonces_channel_and_fields_only() {
        let key = SessionKey(b"cluster key".to_vec());
        let (ns, nd) = ([1u8; 16], [7u8; 16]);
        let h = Handshake {
            source_nonce: &ns,
            dest_nonce: &nd,
            negotiation: b"asked and answered",
            binding: b"tls",
        };
        let mut s = setup();
        s.proof = Some(setup_proof(&key, &h, &s));
        assert!(verify_setup_proof(&key, &h, &s));
        assert!(!verify_setup_proof(&SessionKey(b"other".to_vec()), &h, &s));
        let other_nonce = [8u8; 16];
        let replayed = Handshake {
            dest_nonce: &other_nonce,
            ..h
        };
        assert!(
            !verify_setup_proof(&key, &replayed, &s),
            "another session's nonce"
        );
        let relayed = Handshake {
            binding: b"another TLS session",
            ..h
        };
        assert!(
            !verify_setup_proof(&key, &relayed, &s),
            "relayed through a middle"
        );
        let downgraded = Handshake {
            negotiation: b"asked and answered less",
            ..h
        };
        assert!(
            !verify_setup_proof(&key, &downgraded, &s),
            "a negotiation changed on the way"
        );
        let mut renamed = s.clone();
        renamed.label.as_mut().unwrap().vm = "web-2".into();
        assert!(!verify_setup_proof(&key, &h, &renamed));
        let mut bigger = s.clone();
        bigger.memory_bytes *= 2;
        assert!(!verify_setup_proof(&key, &h, &bigger));
        let mut wider = s.clone();
        wider.channels = 8;
        assert!(!verify_setup_proof(&key, &h, &wider));
        let mut bare = s.clone();
        bare.proof = None;
        assert!(!verify_setup_proof(&key, &h, &bare));
        // A delta base added, or its digest changed, on the way.
        let mut offered = s.clone();
        offered.base = Some(crate::wire::DeltaBase {
            migration_id: "b-1".into(),
            digest: 5,
        });
        assert!(!verify_setup_proof(&key, &h, &offered));
        offered.proof = Some(setup_proof(&key, &h, &offered));
        assert!(verify_setup_proof(&key, &h, &offered));
        offered.base.as_mut().unwrap().digest = 6;
        assert!(!verify_setup_proof(&key, &h, &offered));
        assert_eq!(format!("{key:?}"), "SessionKey(<11 bytes>)");
    }

    #[test]
    fn the_response_and_binds_prove_the_same_key_both_ways() {
        let key = SessionKey(b"cluster key".to_vec());
        let (ns, nd, token) = ([1u8; 16], [7u8; 16], [3u8; 16]);
        let h = Handshake {
            source_nonce: &ns,
            dest_nonce: &nd,
            negotiation: b"asked and answered",
            binding: b"",
        };
        let r = Response {
            session_id: 42,
            token: &token,
            credits: 16,
            delta: false,
        };
        let p = response_proof(&key, &h, &r);
        assert!(verify_response_proof(&key, &h, &r, &p));
        let other = Response {
            session_id: 43,
            ..r
        };
        assert!(!verify_response_proof(&key, &h, &other, &p));
        let more_credits = Response { credits: 64, ..r };
        assert!(
            !verify_response_proof(&key, &h, &more_credits, &p),
            "credits are proved"
        );
        let delta = Response { delta: true, ..r };
        assert!(
            !verify_response_proof(&key, &h, &delta, &p),
            "taking the delta base is proved"
        );
        let relayed = Handshake { binding: b"x", ..h };
        assert!(!verify_response_proof(&key, &relayed, &r, &p));
        assert!(!verify_response_proof(
            &SessionKey(b"x".to_vec()),
            &h,
            &r,
            &p
        ));

        let b = BindSecret::derive(Some(&key), &ns, &nd, 42, &token);
        let nb = [5u8; 16];
        let other = [6u8; 16];
        let bind = |channel, nonce, binding| Bind {
            session_id: 42,
            channel,
            nonce,
            binding,
        };
        let proof = b.bind_proof(&bind(ChannelId(2), &nb, b""));
        assert!(b.verify_bind(&bind(ChannelId(2), &nb, b""), &proof));
        assert!(
            !b.verify_bind(&bind(ChannelId(3), &nb, b""), &proof),
            "another channel"
        );
        assert!(
            !b.verify_bind(&bind(ChannelId(2), &other, b""), &proof),
            "another nonce"
        );
        assert!(
            !b.verify_bind(&bind(ChannelId(2), &nb, b"tls"), &proof),
            "another TLS session"
        );
        assert!(
            !b.verify_bound(&bind(ChannelId(2), &nb, b""), 16, &proof),
            "a bind proof is no bound proof"
        );
        let bound = b.bound_proof(&bind(ChannelId(2), &nb, b""), 16);
        assert!(b.verify_bound(&bind(ChannelId(2), &nb, b""), 16, &bound));
        assert!(
            !b.verify_bound(&bind(ChannelId(2), &nb, b""), 17, &bound),
            "credits are proved"
        );
        // Another session (nonces), or no key: another secret.
        assert_ne!(
            b,
            BindSecret::derive(Some(&key), &ns, &[9u8; 16], 42, &token)
        );
        assert_ne!(b, BindSecret::derive(None, &ns, &nd, 42, &token));
        assert_ne!(random_bytes::<16>(), random_bytes::<16>());
    }

    #[test]
    fn secret_files_must_be_their_owner_s_alone_and_long_enough() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("ferry-key-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("key");
        std::fs::write(&path, "0123456789abcdef0123\n").unwrap();
        for (mode, shown) in [
            (0o644, "644"),
            (0o640, "640"),
            (0o620, "620"),
            (0o602, "602"),
        ] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let err = SessionKey::load(&path).unwrap_err();
            assert!(
                err.contains(&format!("group or others (mode {shown})")),
                "{err}"
            );
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(SessionKey::load(&path).unwrap().0, b"0123456789abcdef0123");
        // Reached through a symlink: refused, even to a good file.
        let link = dir.join("link");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(SessionKey::load(&link).unwrap_err().contains("symlink"));
        std::fs::write(&path, "short").unwrap();
        assert!(SessionKey::load(&path).unwrap_err().contains("at least 16"));
        // Owned by another user (root can give it away to test this).
        if effective_uid() == 0 {
            std::fs::write(&path, "0123456789abcdef0123").unwrap();
            std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
            assert!(SessionKey::load(&path)
                .unwrap_err()
                .contains("belongs to user 65534"));
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_migration_key_is_derived_and_never_the_token() {
        let token = b"the-cluster-token-0123456789";
        let key = derive_migration_key(token);
        assert_eq!(key.len(), 32);
        assert_ne!(key.as_slice(), &token[..]);
        assert_eq!(key, derive_migration_key(token), "deterministic");
        assert_ne!(key, derive_migration_key(b"another-token-0123456789"));
    }

    #[test]
    fn frame_keys_differ_by_direction_connection_session_and_secret() {
        let key = SessionKey(b"frame-key-test-0123456789".to_vec());
        let secret = BindSecret::derive(Some(&key), &[1; 16], &[2; 16], 7, &[3; 16]);
        let setup = secret.frame_keys(7, Connection::Setup(&[1; 16]));
        let bind = secret.frame_keys(7, Connection::Bind(ChannelId(0), &[1; 16]));
        let bind1 = secret.frame_keys(7, Connection::Bind(ChannelId(1), &[1; 16]));
        let other_nonce = secret.frame_keys(7, Connection::Bind(ChannelId(1), &[4; 16]));
        let other_session = secret.frame_keys(8, Connection::Setup(&[1; 16]));
        let other_secret = BindSecret::derive(Some(&key), &[9; 16], &[2; 16], 7, &[3; 16])
            .frame_keys(7, Connection::Setup(&[1; 16]));
        let all = [
            &setup,
            &bind,
            &bind1,
            &other_nonce,
            &other_session,
            &other_secret,
        ];
        let mut keys: Vec<[u8; 32]> = all.iter().flat_map(|k| [k.to_dest, k.to_source]).collect();
        let n = keys.len();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), n, "every key is its own");
        let again = secret.frame_keys(7, Connection::Setup(&[1; 16]));
        assert_eq!(again.to_dest, setup.to_dest, "both ends derive the same");
    }
}
