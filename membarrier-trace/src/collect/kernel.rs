//! What the running kernel's BPF can do, known by its version (docs/design.md, "Kernels"):
//! whatever a run asks of a kernel without it is turned off with one line naming the feature
//! and the version it came in.

/// BPF features a run may need, each with the Linux version that brought it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Features {
    /// major.minor of the running kernel.
    pub version: (u32, u32),
    /// Compare-and-exchange and fetch-and-add on map values (5.12): exact min and max
    /// latencies when calls of one row end at once, and the last task of a process found in
    /// one instruction. Without, plain stores and a claim (see the eBPF program's `update`,
    /// `last_task`).
    pub cmpxchg: bool,
    /// `bpf_get_attach_cookie` (5.15): one uprobe program for every grace-period function
    /// (RCU writers).
    pub attach_cookie: bool,
    /// `bpf_task_pt_regs` (5.15): the user registers `--stacks` unwinds from.
    pub task_pt_regs: bool,
    /// The `lock:contention_begin/end` tracepoints (5.19): mutex wait. Found by attaching; this
    /// says what to expect.
    pub lock_contention: bool,
}

impl Features {
    pub fn of_this_kernel() -> Self {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        Self::of_release(release.trim())
    }

    /// From a release string such as `5.10.0-32-cloud-amd64` or `6.18.0`; an unreadable one
    /// is taken as new (the programs' load then says what is missing).
    pub fn of_release(release: &str) -> Self {
        let mut parts = release.split(|c: char| !c.is_ascii_digit());
        let mut next = || parts.next().and_then(|p| p.parse::<u32>().ok());
        let version = match (next(), next()) {
            (Some(major), Some(minor)) => (major, minor),
            _ => (u32::MAX, 0),
        };
        Self {
            version,
            cmpxchg: version >= (5, 12),
            attach_cookie: version >= (5, 15),
            task_pt_regs: version >= (5, 15),
            lock_contention: version >= (5, 19),
        }
    }

    /// "Linux 5.10", for the lines that turn a feature off.
    pub fn name(&self) -> String {
        format!("Linux {}.{}", self.version.0, self.version.1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_from_release_strings() {
        let f = Features::of_release("5.10.0-32-cloud-amd64");
        assert_eq!(f.version, (5, 10));
        assert!(!f.cmpxchg && !f.attach_cookie && !f.task_pt_regs);
        let f = Features::of_release("5.14.0-427.el9.x86_64");
        assert!(f.cmpxchg && !f.attach_cookie);
        let f = Features::of_release("6.1.0-57-cloud-amd64");
        assert!(f.cmpxchg && f.attach_cookie && f.task_pt_regs);
        assert_eq!(f.name(), "Linux 6.1");
        assert_eq!(Features::of_release("6.18.0").version, (6, 18));
        assert!(Features::of_release("garbage").cmpxchg);
    }
}
