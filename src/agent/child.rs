//! Child processes that die with the agent (update hooks): the kernel
//! SIGKILLs each when the agent's thread that started it ends, which a
//! runtime worker does only with the process, so a SIGKILLed agent leaves
//! no hook running on without it. This covers the hook itself, not what it
//! starts in turn (a hook that `exec`s its last command is covered whole).
//! Their output is read as they run, and only its end is kept.

/// Makes `cmd`'s process get SIGKILL when the thread spawning it dies.
#[allow(unsafe_code)]
pub fn die_with_agent(cmd: &mut tokio::process::Command) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the forked child before exec, where only
    // async-signal-safe calls are allowed: `prctl`, `getppid` and `_exit`
    // are plain system calls, and nothing is allocated or locked.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The agent died before the call took effect: no signal comes.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

/// A finished child: its exit status and the end of each output stream.
pub struct Ended {
    /// How it exited.
    pub status: std::process::ExitStatus,
    /// The last bytes of its standard output, as text.
    pub stdout: String,
    /// The last bytes of its standard error, as text.
    pub stderr: String,
}

/// Waits for `child` (spawned with both outputs piped), keeping only the
/// last `keep` bytes of each stream as it runs: a chatty command costs the
/// agent no more memory than that.
pub async fn wait_keeping_tail(
    mut child: tokio::process::Child,
    keep: usize,
) -> std::io::Result<Ended> {
    let out = child.stdout.take();
    let err = child.stderr.take();
    let (status, stdout, stderr) =
        tokio::join!(child.wait(), read_tail(out, keep), read_tail(err, keep));
    Ok(Ended {
        status: status?,
        stdout: stdout?,
        stderr: stderr?,
    })
}

/// Reads `r` to its end, keeping its last `keep` bytes.
async fn read_tail(
    r: Option<impl tokio::io::AsyncRead + Unpin>,
    keep: usize,
) -> std::io::Result<String> {
    use tokio::io::AsyncReadExt;
    let Some(mut r) = r else {
        return Ok(String::new());
    };
    let mut kept = Vec::with_capacity(keep.min(1 << 16));
    let mut chunk = vec![0u8; 8 << 10];
    loop {
        let n = r.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        kept.extend_from_slice(&chunk[..n]);
        // Trimmed in batches, so each byte is moved a bounded number of times.
        if kept.len() > keep.saturating_mul(2) {
            kept.drain(..kept.len() - keep);
        }
    }
    let from = kept.len().saturating_sub(keep);
    Ok(String::from_utf8_lossy(&kept[from..]).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_the_tail_of_a_long_output_is_kept() {
        let mut cmd = tokio::process::Command::new("sh");
        cmd.args([
            "-c",
            "head -c 1000000 /dev/zero | tr '\\0' a; printf END; echo oops >&2",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
        let ended = wait_keeping_tail(cmd.spawn().unwrap(), 100).await.unwrap();
        assert!(ended.status.success());
        assert_eq!(ended.stdout.len(), 100);
        assert!(ended.stdout.ends_with("aaEND"), "{}", ended.stdout);
        assert_eq!(ended.stderr, "oops\n");
    }
}
