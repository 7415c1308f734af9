//! Child processes that die with the agent (update hooks): the kernel
//! SIGKILLs each when the agent's thread that started it ends, which a
//! runtime worker does only with the process, so a SIGKILLed agent leaves
//! no hook running on without it. This covers the hook itself, not what it
//! starts in turn (a hook that `exec`s its last command is covered whole).

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
