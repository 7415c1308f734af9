//! The console's sign-in: a session cookie any agent of the cluster can
//! verify without asking another. It holds its scope, its expiry and the
//! cluster's session epoch, with an HMAC-SHA256 over them keyed by a key
//! derived from the cluster's API token (HKDF, its own label; a read
//! session's also from the read-only token). Raising the epoch (in etcd)
//! signs everyone out.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use std::time::Duration;

/// The cookie's name.
pub const COOKIE: &str = "ferry_session";
/// How long a session lasts.
pub const LIFETIME: Duration = Duration::from_secs(8 * 3600);
/// The longest cookie value read.
const MAX_LEN: usize = 256;

/// What a session may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Everything the cluster's token may.
    Admin,
    /// What the read-only token may: look.
    Read,
}

impl Scope {
    /// Its name in the cookie and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Read => "read",
        }
    }
}

/// Why a cookie is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// Not a cookie this agent makes, or altered.
    #[error("the session cookie is not valid")]
    Invalid,
    /// Past its expiry.
    #[error("the session has expired: sign in again")]
    Expired,
    /// Made before everyone was signed out.
    #[error("the session was ended (everyone was signed out): sign in again")]
    Revoked,
}

/// Makes and checks session cookies with keys derived from the cluster's
/// tokens.
pub struct Sessions {
    /// An admin session's key: from the cluster's token.
    admin: [u8; 32],
    /// A read session's key: from both tokens, so a new read-only token
    /// ends the read sessions of the old one.
    read: [u8; 32],
}

impl Sessions {
    /// Sessions of the cluster whose API token is `token` and read-only
    /// token `readonly`.
    pub fn new(token: &str, readonly: Option<&str>) -> Self {
        let key = |info: &[u8], extra: &[u8]| {
            let ikm = [token.as_bytes(), b"\0", extra].concat();
            let hk = hkdf::Hkdf::<Sha256>::new(Some(b"ferry cluster"), &ikm);
            let mut key = [0u8; 32];
            hk.expand(info, &mut key)
                .expect("32 bytes is a valid HKDF-SHA256 output length");
            key
        };
        Self {
            admin: key(b"ferry v1 console session", b""),
            read: key(
                b"ferry v1 console read session",
                readonly.unwrap_or("").as_bytes(),
            ),
        }
    }

    fn tag(&self, body: &str) -> String {
        let key = if body.starts_with("admin.") {
            &self.admin
        } else {
            &self.read
        };
        let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("any key length");
        m.update(b"ferry session v1|");
        m.update(body.as_bytes());
        hex(&m.finalize().into_bytes())
    }

    /// A cookie value for `scope` that expires at `expires_ms` (ms since
    /// the Unix epoch), made under session epoch `epoch`.
    pub fn issue(&self, scope: Scope, expires_ms: u64, epoch: u64) -> String {
        let body = format!("{}.{expires_ms}.{epoch}", scope.as_str());
        let tag = self.tag(&body);
        format!("{body}.{tag}")
    }

    /// The scope of cookie value `value` at `now_ms` under the cluster's
    /// session epoch `epoch`.
    pub fn verify(&self, value: &str, now_ms: u64, epoch: u64) -> Result<Scope, SessionError> {
        use subtle::ConstantTimeEq;
        if value.len() > MAX_LEN {
            return Err(SessionError::Invalid);
        }
        let (body, tag) = value.rsplit_once('.').ok_or(SessionError::Invalid)?;
        let want = self.tag(body);
        if !bool::from(want.as_bytes().ct_eq(tag.as_bytes())) {
            return Err(SessionError::Invalid);
        }
        let mut parts = body.split('.');
        let scope = match parts.next() {
            Some("admin") => Scope::Admin,
            Some("read") => Scope::Read,
            _ => return Err(SessionError::Invalid),
        };
        let num = |p: Option<&str>| p.and_then(|p| p.parse::<u64>().ok());
        let (Some(expires), Some(made_in), None) =
            (num(parts.next()), num(parts.next()), parts.next())
        else {
            return Err(SessionError::Invalid);
        };
        if now_ms >= expires {
            return Err(SessionError::Expired);
        }
        // Made before everyone was signed out. (One made under a later
        // epoch than this agent has read yet is the newer.)
        if made_in < epoch {
            return Err(SessionError::Revoked);
        }
        Ok(scope)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The value of cookie `name` in a `Cookie` header.
pub fn cookie<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').find_map(|c| {
        let (k, v) = c.trim().split_once('=')?;
        (k == name).then_some(v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cookie_holds_only_while_unaltered_unexpired_and_of_the_current_epoch() {
        let s = Sessions::new("cluster-token-0123456789", Some("read-token-0123456789"));
        let c = s.issue(Scope::Read, 1_000, 3);
        assert_eq!(s.verify(&c, 999, 3), Ok(Scope::Read));
        assert_eq!(s.verify(&c, 1_000, 3), Err(SessionError::Expired));
        assert_eq!(s.verify(&c, 10, 4), Err(SessionError::Revoked));
        assert_eq!(s.verify(&c, 10, 2), Ok(Scope::Read), "an agent behind");
        // Another cluster's key, or any change, is invalid.
        let other = Sessions::new("another-token-0123456789", Some("read-token-0123456789"));
        assert_eq!(other.verify(&c, 10, 3), Err(SessionError::Invalid));
        // A new read-only token ends the old one's sessions, not admin ones.
        let rotated = Sessions::new("cluster-token-0123456789", Some("new-read-token-0123456"));
        assert_eq!(rotated.verify(&c, 10, 3), Err(SessionError::Invalid));
        let admin = s.issue(Scope::Admin, 1_000, 3);
        assert_eq!(rotated.verify(&admin, 10, 3), Ok(Scope::Admin));
        let raised = c.replacen("read", "admin", 1);
        assert_eq!(s.verify(&raised, 10, 3), Err(SessionError::Invalid));
        let later = c.replacen("1000", "9999", 1);
        assert_eq!(s.verify(&later, 10, 3), Err(SessionError::Invalid));
        for bad in ["", "admin", "x.1.2.3", &"a".repeat(300)] {
            assert_eq!(s.verify(bad, 10, 3), Err(SessionError::Invalid), "{bad}");
        }
        let admin = s.issue(Scope::Admin, 1_000, 0);
        assert_eq!(s.verify(&admin, 0, 0), Ok(Scope::Admin));
    }

    #[test]
    fn the_cookie_is_found_among_others() {
        let h = "a=1; ferry_session=read.1.2.ab; b=2";
        assert_eq!(cookie(h, COOKIE), Some("read.1.2.ab"));
        assert_eq!(cookie("a=1", COOKIE), None);
    }
}
