//! Faults injected at chosen points of the receiving side's protocol, for
//! the tests of the hand-off rules (the hidden `--fault POINT:KIND` option of
//! `ferry receive` and `ferry agent`). The points and kinds are plain data
//! (the simulation draws them too); the code that strikes is compiled only
//! with the `faults` cargo feature, which the tests turn on and release
//! builds do not.

use std::str::FromStr;

/// Where in the protocol the receiver faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultPoint {
    /// Session set up, before the first page batch is applied.
    BeforeRound0,
    /// Half of round 0's pages applied.
    MidRound,
    /// SWITCHOVER received, before READY is sent.
    BeforeReady,
    /// READY sent, before GO arrives.
    AfterReady,
    /// GO handled (the guest resumed here), before COMPLETE is sent.
    AfterGo,
}

/// What the fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// Every connection of the session is reset (RST); the session itself
    /// lives on and takes rebinds.
    Reset,
    /// The process kills itself with SIGKILL.
    Kill,
    /// The process stops itself with SIGSTOP: silent until continued.
    Silent,
    /// The receiver gives up on the session: it discards its copy and
    /// sends ABORT, as when it runs out of resources.
    Abort,
    /// The next page batch's apply panics, as a bug of the receiver's own
    /// would: the session ends as a local fault, never blamed on the source.
    Panic,
}

/// A fault: a point and a kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// Where.
    pub point: FaultPoint,
    /// What.
    pub kind: FaultKind,
}

impl FromStr for Fault {
    type Err = String;

    /// `POINT:KIND`, e.g. `after-ready:kill`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (p, k) = s
            .split_once(':')
            .ok_or_else(|| format!("fault {s:?} is not POINT:KIND"))?;
        let point = match p {
            "before-round0" => FaultPoint::BeforeRound0,
            "mid-round" => FaultPoint::MidRound,
            "before-ready" => FaultPoint::BeforeReady,
            "after-ready" => FaultPoint::AfterReady,
            "after-go" => FaultPoint::AfterGo,
            _ => {
                return Err(format!(
                "fault point {p:?}: before-round0, mid-round, before-ready, after-ready or after-go"
            ))
            }
        };
        let kind = match k {
            "reset" => FaultKind::Reset,
            "kill" => FaultKind::Kill,
            "silent" => FaultKind::Silent,
            "abort" => FaultKind::Abort,
            "panic" => FaultKind::Panic,
            _ => {
                return Err(format!(
                    "fault kind {k:?}: reset, kill, silent, abort or panic"
                ))
            }
        };
        if kind == FaultKind::Panic
            && !matches!(point, FaultPoint::BeforeRound0 | FaultPoint::MidRound)
        {
            return Err(format!(
                "fault {s:?}: a panic strikes in a page batch's apply: before-round0 or mid-round"
            ));
        }
        Ok(Self { point, kind })
    }
}

/// Kills or stops this process (the kinds that act on the whole process).
#[cfg(all(feature = "net", feature = "faults"))]
#[allow(unsafe_code)]
pub(crate) fn strike_process(kind: FaultKind) {
    tracing::warn!(?kind, "injected fault");
    match kind {
        // Raised on this thread, so that it stops (or dies) before it takes
        // one more step; the rest of the process with it.
        // SAFETY: a signal to this thread; no memory is touched.
        FaultKind::Kill => unsafe {
            libc::raise(libc::SIGKILL);
        },
        FaultKind::Silent => unsafe {
            libc::raise(libc::SIGSTOP);
        },
        FaultKind::Reset | FaultKind::Abort | FaultKind::Panic => {}
    }
}

/// Closes a socket with an RST on its next close (SO_LINGER 0).
#[cfg(all(feature = "net", feature = "faults"))]
#[allow(unsafe_code)]
pub(crate) fn linger_zero(fd: std::os::fd::RawFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on an open socket with a correctly sized struct.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_parse_as_point_and_kind() {
        assert_eq!(
            "after-ready:kill".parse::<Fault>().unwrap(),
            Fault {
                point: FaultPoint::AfterReady,
                kind: FaultKind::Kill
            }
        );
        assert!("after-ready"
            .parse::<Fault>()
            .unwrap_err()
            .contains("POINT:KIND"));
        assert!("later:kill"
            .parse::<Fault>()
            .unwrap_err()
            .contains("fault point"));
        assert!("mid-round:boom"
            .parse::<Fault>()
            .unwrap_err()
            .contains("fault kind"));
        // A panic strikes in a batch's apply: only where batches follow.
        assert!("mid-round:panic".parse::<Fault>().is_ok());
        assert!("after-go:panic"
            .parse::<Fault>()
            .unwrap_err()
            .contains("before-round0 or mid-round"));
    }
}
