//! The command to trace (`-- COMMAND`): started held before exec so it is traced from its first
//! instruction, its output kept in a file only root can choose, and stopped with the tracer.

use std::{
    io::{Read as _, Write as _},
    os::{
        fd::AsRawFd as _,
        unix::process::{CommandExt as _, ExitStatusExt as _},
    },
    path::PathBuf,
    process::{Child, Command, ExitCode},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use crate::collect::collector::Collector;

/// A new file for a command's output, in the temporary directory: created with O_EXCL under a
/// random name, mode 0600, so no other user can choose it, plant a file or a symlink there, or
/// read it. (The name was once `membarrier-trace-PID.log`: anyone could plant a link there for
/// root to follow and truncate.)
pub fn command_log() -> Result<(std::fs::File, PathBuf)> {
    let dir = std::env::temp_dir();
    let (file, path) = tempfile::Builder::new()
        .prefix("membarrier-trace-")
        .suffix(".log")
        .tempfile_in(&dir)
        .and_then(|f| f.keep().map_err(|e| e.error))
        .with_context(|| format!("creating the command's log in {}", dir.display()))?;
    Ok((file, path))
}

/// Starts `argv` held just before exec, so its pid is in the filter and the programs are
/// attached before its first instruction runs (library constructors call membarrier too). It
/// runs in `outer_ns`, the mount namespace we were started in, when we left it for tracefs.
///
/// Long: the fork, the child's few steps before exec and the parent's wait for it to be held
/// read best in one place: the child may only make async-signal-safe calls.
pub fn spawn_traced(
    argv: &[String],
    log: Option<&std::fs::File>,
    outer_ns: Option<i32>,
    collector: &mut Collector,
) -> Result<(Child, Vec<String>)> {
    // Both pipes close on exec, and on every return from here: no descriptor leaks on an
    // error path.
    let (go_r, go_w) = std::io::pipe().context("pipe")?;
    let (mut pid_r, pid_w) = std::io::pipe().context("pipe")?;
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    if let Some(f) = log {
        cmd.stdin(std::process::Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f.try_clone()?);
    }
    // Entering a mount namespace moves to its root: the command goes back to our directory
    // there (`-- ./prog` and relative paths in its arguments), resolved in that namespace.
    let cwd = outer_ns
        .and_then(|_| std::env::current_dir().ok())
        .and_then(|d| std::ffi::CString::new(d.into_os_string().into_encoded_bytes()).ok());
    let (go_r_fd, go_w_fd, pid_w_fd) = (go_r.as_raw_fd(), go_w.as_raw_fd(), pid_w.as_raw_fd());
    // SAFETY: only async-signal-safe calls (setns, chdir, close, getpid, write, read) between
    // fork and exec, on descriptors that stay open in the parent until spawn() returns.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(fd) = outer_ns
                && libc::setns(fd, libc::CLONE_NEWNS) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(dir) = &cwd
                && libc::chdir(dir.as_ptr()) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // Our copy of the go pipe's write end closed: the pipe then ends (EOF) when the
            // tracer closes its own without a go.
            libc::close(go_w_fd);
            let pid = libc::getpid();
            libc::write(pid_w_fd, (&raw const pid).cast(), 4);
            let mut b = 0u8;
            let mut n;
            loop {
                n = libc::read(go_r_fd, (&raw mut b).cast(), 1);
                if n >= 0 || *libc::__errno_location() != libc::EINTR {
                    break;
                }
            }
            // No go (the pipe closed without it): tracing could not start, and the command
            // must not run untraced, unwaited for, after we exit.
            if n != 1 {
                return Err(std::io::Error::from_raw_os_error(libc::ECANCELED));
            }
            Ok(())
        });
    }
    // spawn() returns only once the child has exec'd, which it does after our go: run it aside.
    // The pid pipe's write end goes with it, so a spawn that fails before the fork ends our
    // read below.
    let spawner = thread::spawn(move || {
        let r = cmd.spawn();
        drop(pid_w);
        r
    });
    let mut pid = [0u8; 4];
    let started = match pid_r.read_exact(&mut pid) {
        Ok(()) => {
            drop(pid_r);
            let pid = i32::from_ne_bytes(pid) as u32;
            collector.add_pid(pid).and_then(|()| {
                // An executable with liburcu linked in: probed before its first grace period.
                if let Some(exe) = in_path(&argv[0]) {
                    collector.probe_file(&exe);
                }
                collector.start()
            })
        }
        Err(_) => Ok(Vec::new()),
    };
    if started.is_ok() {
        let _ = (&go_w).write_all(&[1]);
    }
    drop(go_w);
    drop(go_r);
    let child = spawner
        .join()
        .map_err(|_| anyhow::anyhow!("spawner thread panicked"))?;
    // Tracing's error first: the command was then stopped before it ran.
    let started = started?;
    let child = child.with_context(|| format!("cannot run `{}`", argv[0]))?;
    Ok((child, started))
}

/// Where exec finds `program`: itself when it has a slash, else the first executable of that
/// name in $PATH.
fn in_path(program: &str) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    if program.contains('/') {
        return Some(program.into());
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Passes the signal we got on to the command and waits a little for it to end.
pub fn stop_child(child: &mut Child, sig: i32) -> ExitCode {
    if let (Some(pid), Some(sig)) = (
        rustix::process::Pid::from_raw(child.id() as i32),
        rustix::process::Signal::from_named_raw(sig),
    ) {
        let _ = rustix::process::kill_process(pid, sig);
    }
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        if let Ok(Some(status)) = child.try_wait() {
            return exit_code(status);
        }
        thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "membarrier-trace: pid {} still running after the signal; leaving it",
        child.id()
    );
    ExitCode::from(128 + sig as u8)
}

/// The command's exit status, shell style: its code, or 128 + the signal that killed it.
pub fn exit_code(status: std::process::ExitStatus) -> ExitCode {
    match (status.code(), status.signal()) {
        (Some(c), _) => ExitCode::from(c as u8),
        (None, Some(s)) => ExitCode::from(128 + s as u8),
        _ => ExitCode::FAILURE,
    }
}
