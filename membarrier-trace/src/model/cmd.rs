//! Decoding of membarrier's `cmd`, `flags` and errno values into the kernel's names.

use serde::Serialize;

/// `MEMBARRIER_CMD_FLAG_CPU`: only with PRIVATE_EXPEDITED_RSEQ, targets the one CPU in `cpu_id`.
pub const FLAG_CPU: u32 = 1;

pub const QUERY: i32 = 0;
pub const GLOBAL: i32 = 1;
pub const GLOBAL_EXPEDITED: i32 = 2;
pub const REGISTER_GLOBAL_EXPEDITED: i32 = 4;
pub const PRIVATE_EXPEDITED: i32 = 8;
pub const REGISTER_PRIVATE_EXPEDITED: i32 = 16;

/// Every cmd the kernel knows (include/uapi/linux/membarrier.h), with the name shown to users.
const CMDS: &[(i32, &str)] = &[
    (0, "QUERY"),
    (1, "GLOBAL"),
    (2, "GLOBAL_EXPEDITED"),
    (4, "REGISTER_GLOBAL_EXPEDITED"),
    (8, "PRIVATE_EXPEDITED"),
    (16, "REGISTER_PRIVATE_EXPEDITED"),
    (32, "PRIVATE_EXPEDITED_SYNC_CORE"),
    (64, "REGISTER_PRIVATE_EXPEDITED_SYNC_CORE"),
    (128, "PRIVATE_EXPEDITED_RSEQ"),
    (256, "REGISTER_PRIVATE_EXPEDITED_RSEQ"),
    (512, "GET_REGISTRATIONS"),
];

/// What a cmd does, which decides what its latency means.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// QUERY and GET_REGISTRATIONS: bookkeeping, no barrier.
    Query,
    /// GLOBAL: the kernel runs synchronize_rcu(); the latency is a grace period.
    GracePeriod,
    /// The expedited barriers: IPIs to the CPUs running the process (or registered processes).
    Barrier,
    /// REGISTER_*: one-off cost, may include a grace period.
    Registration,
    /// Not a cmd the kernel knows: EINVAL.
    Invalid,
}

/// The name of `cmd`, or `None` for a value the kernel does not know.
pub fn name(cmd: i32) -> Option<&'static str> {
    CMDS.iter().find(|(v, _)| *v == cmd).map(|(_, n)| *n)
}

/// The name shown for `cmd`: its kernel name, or `INVALID(<value>)`.
pub fn display_name(cmd: i32) -> String {
    match name(cmd) {
        Some(n) => n.to_string(),
        None => format!("INVALID({cmd})"),
    }
}

pub fn kind(cmd: i32) -> Kind {
    match cmd {
        0 | 512 => Kind::Query,
        1 => Kind::GracePeriod,
        2 | 8 | 32 | 128 => Kind::Barrier,
        4 | 16 | 64 | 256 => Kind::Registration,
        _ => Kind::Invalid,
    }
}

/// What a call of `cmd` with `flags` does: the kernel refuses flags other than `FLAG_CPU`,
/// and that one except with PRIVATE_EXPEDITED_RSEQ (EINVAL before any barrier).
pub fn kind_with_flags(cmd: i32, flags: u32) -> Kind {
    const PRIVATE_EXPEDITED_RSEQ: i32 = 128;
    match flags {
        0 => kind(cmd),
        FLAG_CPU if cmd == PRIVATE_EXPEDITED_RSEQ => kind(cmd),
        _ => Kind::Invalid,
    }
}

/// `flags` as text: `0`, `CPU`, or the raw value when any other bit is set.
pub fn flags_name(flags: u32) -> String {
    match flags {
        0 => "0".to_string(),
        FLAG_CPU => "CPU".to_string(),
        f => format!("{f:#x}"),
    }
}

/// The symbolic name of an errno value (the ones membarrier returns, and the common rest).
pub fn errno_name(errno: u32) -> String {
    const NAMES: &[(u32, &str)] = &[
        (1, "EPERM"),
        (2, "ENOENT"),
        (3, "ESRCH"),
        (4, "EINTR"),
        (5, "EIO"),
        (9, "EBADF"),
        (11, "EAGAIN"),
        (12, "ENOMEM"),
        (13, "EACCES"),
        (14, "EFAULT"),
        (16, "EBUSY"),
        (22, "EINVAL"),
        (28, "ENOSPC"),
        (38, "ENOSYS"),
        (95, "EOPNOTSUPP"),
    ];
    match NAMES.iter().find(|(v, _)| *v == errno) {
        Some((_, n)) => n.to_string(),
        None => format!("E{errno}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each known cmd with flags 0 has a thread counter of its own, RSEQ with the CPU flag
    /// another, and every invalid cmd or flags the last.
    #[test]
    fn thread_counters_by_cmd() {
        use membarrier_trace_common::{THREAD_CMDS, thread_cmd};
        let known: Vec<usize> = (0..11)
            .map(|i| thread_cmd(if i == 0 { 0 } else { 1 << (i - 1) }, 0))
            .collect();
        assert_eq!(known, (0..11).collect::<Vec<_>>());
        assert!(name(512).is_some() && name(1024).is_none());
        assert_eq!(thread_cmd(128, FLAG_CPU), 11);
        for (cmd, flags) in [(3, 0), (1024, 0), (8, 1), (0, 2), (u32::MAX, 0), (128, 3)] {
            assert_eq!(thread_cmd(cmd, flags), THREAD_CMDS - 1, "{cmd} {flags}");
        }
    }

    #[test]
    fn every_known_cmd_decodes() {
        assert_eq!(name(0), Some("QUERY"));
        assert_eq!(name(1), Some("GLOBAL"));
        assert_eq!(name(8), Some("PRIVATE_EXPEDITED"));
        assert_eq!(name(16), Some("REGISTER_PRIVATE_EXPEDITED"));
        assert_eq!(name(512), Some("GET_REGISTRATIONS"));
        for (v, _) in CMDS {
            assert_ne!(kind(*v), Kind::Invalid, "cmd {v}");
        }
        assert_eq!(CMDS.len(), 11);
    }

    #[test]
    fn unknown_cmds_stay_numeric_and_invalid() {
        for v in [3, 6, 1024, -1, i32::MIN] {
            assert_eq!(name(v), None);
            assert_eq!(kind(v), Kind::Invalid);
            assert_eq!(display_name(v), format!("INVALID({v})"));
        }
    }

    #[test]
    fn kinds() {
        assert_eq!(kind(GLOBAL), Kind::GracePeriod);
        assert_eq!(kind(PRIVATE_EXPEDITED), Kind::Barrier);
        assert_eq!(kind(32), Kind::Barrier);
        assert_eq!(kind(REGISTER_PRIVATE_EXPEDITED), Kind::Registration);
        assert_eq!(kind(QUERY), Kind::Query);
    }

    #[test]
    fn flags_and_errno() {
        assert_eq!(flags_name(0), "0");
        assert_eq!(flags_name(1), "CPU");
        assert_eq!(flags_name(3), "0x3");
        assert_eq!(flags_name(4), "0x4");
        assert_eq!(flags_name(u32::MAX), "0xffffffff");
        assert_eq!(kind_with_flags(GLOBAL, 0), Kind::GracePeriod);
        assert_eq!(kind_with_flags(GLOBAL, 1), Kind::Invalid);
        assert_eq!(
            kind_with_flags(REGISTER_PRIVATE_EXPEDITED, 4),
            Kind::Invalid
        );
        assert_eq!(kind_with_flags(128, FLAG_CPU), Kind::Barrier);
        assert_eq!(kind_with_flags(128, 3), Kind::Invalid);
        assert_eq!(errno_name(1), "EPERM");
        assert_eq!(errno_name(22), "EINVAL");
        assert_eq!(errno_name(200), "E200");
    }
}
