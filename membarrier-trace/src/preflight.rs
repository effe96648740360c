//! The machine as /proc, /sys and tracefs show it: checked before anything is loaded, so that
//! each problem is one clear line instead of a failure deep inside a BPF load, and read live
//! while tracing (whether a pid still exists, its name, whether it is a kernel thread).

use std::{
    ffi::CString,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

const TRACEFS_MOUNTS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

pub fn check_root() -> Result<()> {
    if !rustix::process::geteuid().is_root() {
        bail!(
            "must run as root to load eBPF programs and attach tracepoints: try `sudo membarrier-trace ...`"
        );
    }
    Ok(())
}

fn tracefs_ready(dir: &Path) -> bool {
    dir.join("events").is_dir()
}

/// Where tracefs is mounted, for the tracer.
pub struct Tracefs {
    pub path: PathBuf,
    /// The mount namespace we were started in, when the tracer moved to one of its own to mount
    /// tracefs there: a traced command goes back to it before exec.
    pub outer_ns: Option<std::os::fd::OwnedFd>,
}

impl Tracefs {
    /// What to tell the user once tracing has started: that we mounted it.
    pub fn note(&self) -> Option<String> {
        self.outer_ns.as_ref().map(|_| {
            format!(
                "mounted tracefs at {} for this run only (the system's mounts are unchanged)",
                self.path.display()
            )
        })
    }
}

/// The tracefs mount. When nothing is mounted, mounts it at /sys/kernel/tracing (as root we
/// can, and users should not have to know about it) in a mount namespace of the tracer's own:
/// the system's mounts never change, so tracers started side by side cannot unmount it under
/// one another, and it goes away with the tracer. Call before any thread is started: the
/// namespace is the calling thread's, and new threads inherit it.
pub fn tracefs() -> Result<Tracefs> {
    if let Some(path) = TRACEFS_MOUNTS
        .iter()
        .map(PathBuf::from)
        .find(|p| tracefs_ready(p))
    {
        return Ok(Tracefs {
            path,
            outer_ns: None,
        });
    }
    let target = Path::new(TRACEFS_MOUNTS[0]);
    let could_not = |what: &str| {
        anyhow::anyhow!(
            "tracefs is not mounted and could not be mounted ({what}: {}): run `mount -t tracefs tracefs /sys/kernel/tracing`",
            std::io::Error::last_os_error()
        )
    };
    let outer = fs::File::open("/proc/self/ns/mnt").map_err(|_| could_not("/proc/self/ns/mnt"))?;
    let c = |s: &str| CString::new(s).expect("no NUL");
    // SAFETY: plain system calls on constant C strings. Private before mounting: a copy of a
    // shared mount would pass our mount back to the system's namespace.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            return Err(could_not("unshare"));
        }
        if libc::mount(
            std::ptr::null(),
            c("/").as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            return Err(could_not("making mounts private"));
        }
        if !target.is_dir()
            || libc::mount(
                c("tracefs").as_ptr(),
                c(TRACEFS_MOUNTS[0]).as_ptr(),
                c("tracefs").as_ptr(),
                0,
                std::ptr::null(),
            ) != 0
            || !tracefs_ready(target)
        {
            return Err(could_not("mount"));
        }
    }
    Ok(Tracefs {
        path: target.to_path_buf(),
        outer_ns: Some(outer.into()),
    })
}

/// Fails unless the kernel has the tracepoint `category:name`.
pub fn check_tracepoint(tracefs: &Path, category: &str, name: &str, why: &str) -> Result<()> {
    if !tracefs.join("events").join(category).join(name).is_dir() {
        bail!("this kernel has no {category}:{name} tracepoint ({why})");
    }
    Ok(())
}

/// Offset of `field` in the records of tracepoint `category:name`, from its format file.
pub fn field_offset(tracefs: &Path, category: &str, name: &str, field: &str) -> Result<u32> {
    let path = tracefs
        .join("events")
        .join(category)
        .join(name)
        .join("format");
    let format =
        fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    parse_field_offset(&format, field)
        .with_context(|| format!("no field {field} in {}", path.display()))
}

fn parse_field_offset(format: &str, field: &str) -> Option<u32> {
    format.lines().find_map(|line| {
        let mut parts = line.trim().trim_start_matches("field:").split(';');
        let decl = parts.next()?;
        let name = decl.split_whitespace().last()?.split('[').next()?;
        if name != field {
            return None;
        }
        parts.find_map(|p| p.trim().strip_prefix("offset:")?.parse().ok())
    })
}

/// State letter of a process from /proc/PID/stat, or `None` when there is no such process.
fn proc_state(pid: u32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// True while `pid` exists and has not exited (a zombie counts as exited). Reads
/// /proc/PID/stat, which briefly takes a reference on the process's mm: only for checks before
/// tracing starts (see [`ExitWatch`] and [`exists`] for while it runs).
fn alive(pid: u32) -> bool {
    matches!(proc_state(pid), Some(s) if s != 'Z' && s != 'X')
}

/// Checks a `--pid` value: it must be a live process, given by its process (not thread) id.
pub fn check_pid(pid: u32) -> Result<()> {
    if !alive(pid) {
        bail!(
            "no process with pid {pid}: check the pid (ps -e), or start the program with `membarrier-trace -- COMMAND`"
        );
    }
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let tgid = status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse::<u32>().ok());
    if let Some(tgid) = tgid
        && tgid != pid
    {
        bail!(
            "{pid} is a thread of process {tgid}: pass --pid {tgid} (all its threads are traced)"
        );
    }
    Ok(())
}

/// Whether `pid` is a kernel thread (PF_KTHREAD in /proc/PID/stat's flags): it never makes a
/// system call, so tracing it alone shows nothing.
pub fn is_kernel_thread(pid: u32) -> bool {
    const PF_KTHREAD: u64 = 0x0020_0000;
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The comm (field 2) may hold spaces and parentheses: count fields after the last ')'.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(6))
        .and_then(|f| f.parse::<u64>().ok())
        .is_some_and(|flags| flags & PF_KTHREAD != 0)
}

/// Watches processes for exit through pidfds. Unlike reading /proc/PID/stat, this takes no
/// reference on the process's mm: such a reference makes the kernel see a second mm user and
/// send membarrier IPIs it would otherwise skip, changing what is being measured.
pub struct ExitWatch {
    pidfds: Vec<std::os::fd::OwnedFd>,
}

impl ExitWatch {
    pub fn new(pids: &[u32]) -> Result<Self> {
        use rustix::process::{Pid, PidfdFlags, pidfd_open};
        let pidfds = pids
            .iter()
            .map(|&pid| {
                let p = Pid::from_raw(pid as i32)
                    .with_context(|| format!("watching pid {pid}: not a pid"))?;
                pidfd_open(p, PidfdFlags::empty())
                    .map_err(|e| anyhow::anyhow!("watching pid {pid}: {e}"))
            })
            .collect::<Result<_>>()?;
        Ok(Self { pidfds })
    }

    /// True once every watched process has exited (a pidfd turns readable at exit).
    pub fn all_exited(&self) -> bool {
        use rustix::event::{PollFd, PollFlags, poll};
        let mut fds: Vec<PollFd<'_>> = self
            .pidfds
            .iter()
            .map(|fd| PollFd::new(fd, PollFlags::IN))
            .collect();
        let zero = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        poll(&mut fds, Some(&zero)).is_ok() && fds.iter().all(|f| !f.revents().is_empty())
    }
}

/// Whether a process exists (zombies included), without touching /proc: a /proc/PID/stat read
/// would take a reference on its mm and change what membarrier does.
pub fn exists(pid: u32) -> bool {
    let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return false;
    };
    match rustix::process::test_kill_process(pid) {
        Ok(()) => true,
        Err(e) => e == rustix::io::Errno::PERM,
    }
}

/// The process name of `pid` (its main thread's comm), if it is still there.
pub fn comm(pid: u32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim_end().to_string())
}

/// Whether the running kernel is PREEMPT_RT: `/sys/kernel/realtime` (the RT patches, and
/// mainline since 6.12) or the build string (`uname -v`).
pub fn preempt_rt() -> bool {
    let read = |p: &str| fs::read_to_string(p).unwrap_or_default();
    read("/sys/kernel/realtime").trim() == "1"
        || read("/proc/sys/kernel/version").contains("PREEMPT_RT")
}

/// sched_setscheduler(2) on the calling thread: `policy` at `priority`; 0, or -1 with errno
/// set. The system call itself: musl's wrapper does nothing but fail with ENOSYS (POSIX's
/// per-process meaning cannot be had from Linux's per-thread call).
pub fn set_scheduler(policy: i32, priority: i32) -> i64 {
    /// The kernel's struct sched_param.
    #[repr(C)]
    struct Param {
        sched_priority: libc::c_int,
    }
    let p = Param {
        sched_priority: priority,
    };
    // SAFETY: the kernel reads one int from `p`, valid for the call.
    unsafe { libc::syscall(libc::SYS_sched_setscheduler, 0, policy, &raw const p) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_format_files_old_and_new() {
        let new = "\tfield:__data_loc char[] parent_comm;\toffset:8;\tsize:4;\tsigned:0;\n\
                   \tfield:pid_t parent_pid;\toffset:12;\tsize:4;\tsigned:1;\n\
                   \tfield:pid_t child_pid;\toffset:20;\tsize:4;\tsigned:1;\n";
        assert_eq!(parse_field_offset(new, "child_pid"), Some(20));
        let old = "\tfield:char parent_comm[16];\toffset:8;\tsize:16;\tsigned:0;\n\
                   \tfield:pid_t parent_pid;\toffset:24;\tsize:4;\tsigned:1;\n\
                   \tfield:char child_comm[16];\toffset:28;\tsize:16;\tsigned:0;\n\
                   \tfield:pid_t child_pid;\toffset:44;\tsize:4;\tsigned:1;\n";
        assert_eq!(parse_field_offset(old, "child_pid"), Some(44));
        assert_eq!(parse_field_offset(old, "child_comm"), Some(28));
        assert_eq!(parse_field_offset(old, "nope"), None);
    }

    #[test]
    fn exit_watch_sees_a_child_exit() {
        let mut child = std::process::Command::new("sleep")
            .arg("0.2")
            .spawn()
            .unwrap();
        let w = ExitWatch::new(&[child.id()]).unwrap();
        assert!(!w.all_exited());
        std::thread::sleep(std::time::Duration::from_millis(600));
        // Exited but not reaped (a zombie) counts as exited.
        assert!(w.all_exited());
        child.wait().unwrap();
    }

    #[test]
    fn pid_checks() {
        let me = std::process::id();
        assert!(alive(me));
        assert!(exists(me));
        assert!(!exists(u32::MAX - 1));
        check_pid(me).unwrap();
        assert!(!alive(u32::MAX - 1));
        let e = check_pid(u32::MAX - 1).unwrap_err().to_string();
        assert!(e.starts_with("no process with pid"), "{e}");
    }
}
