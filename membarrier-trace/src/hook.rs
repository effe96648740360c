//! The ways of hooking the membarrier syscall, as one table. Each row is an enter and an exit
//! program attached as a pair; everything that depends on the hook (program names, where its
//! skipped calls are counted, what the outputs call it) is read from the row that was attached.

use serde::Serialize;

/// Which row of [`HOOKS`] is attached (the `attach` field of the outputs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Attach {
    /// `syscalls:sys_enter/exit_membarrier`.
    #[default]
    Tracepoint,
    /// fentry/fexit on the syscall function.
    Fentry,
}

/// How a hook's programs attach.
#[derive(Debug)]
pub enum Kind {
    /// Classic tracepoints `category:enter` and `category:exit`, named like the programs, with
    /// the record fields (name, offset) each program reads directly.
    Tracepoint {
        category: &'static str,
        enter_fields: &'static [(&'static str, usize)],
        exit_fields: &'static [(&'static str, usize)],
    },
    /// fentry and fexit on a kernel function.
    Fentry { func: &'static str },
}

#[derive(Debug)]
pub struct Hook {
    pub attach: Attach,
    pub kind: Kind,
    /// Program names in the eBPF object.
    pub enter: &'static str,
    pub exit: &'static str,
    /// What the outputs call it.
    pub describe: &'static str,
}

/// The kernel function behind the syscall, for fentry.
#[cfg(target_arch = "x86_64")]
pub const SYSCALL_FUNC: &str = "__x64_sys_membarrier";
#[cfg(target_arch = "aarch64")]
pub const SYSCALL_FUNC: &str = "__arm64_sys_membarrier";
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
pub const SYSCALL_FUNC: &str = "sys_membarrier";

/// In the order `--attach auto` tries them: fentry first (only membarrier calls pay), then the
/// syscall tracepoints (they work everywhere, but every syscall on the box takes the slow path
/// while they are attached). On PREEMPT_RT the order is reversed: fentry programs run
/// preemptible there, and the kernel skips a run that starts while another task on the CPU is
/// inside the same program (calls counted as missed, not lost, but no longer exact).
pub const HOOKS: &[Hook] = &[
    Hook {
        attach: Attach::Fentry,
        kind: Kind::Fentry { func: SYSCALL_FUNC },
        enter: "membarrier_fentry",
        exit: "membarrier_fexit",
        describe: "fentry/fexit on the syscall",
    },
    Hook {
        attach: Attach::Tracepoint,
        kind: Kind::Tracepoint {
            category: "syscalls",
            // Fixed by the syscall tracepoint ABI: 8-byte arguments from offset 16.
            enter_fields: &[("cmd", 16), ("flags", 24)],
            exit_fields: &[("ret", 16)],
        },
        enter: "sys_enter_membarrier",
        exit: "sys_exit_membarrier",
        describe: "syscalls:sys_enter/exit_membarrier",
    },
];

impl Attach {
    pub fn hook(self) -> &'static Hook {
        HOOKS
            .iter()
            .find(|h| h.attach == self)
            .expect("every Attach has a row in HOOKS")
    }

    /// How the calls are hooked, as the outputs say it.
    pub fn describe(self) -> &'static str {
        self.hook().describe
    }

    /// The name `--attach` and the JSON `attach` field use.
    pub fn name(self) -> &'static str {
        match self {
            Attach::Tracepoint => "tracepoint",
            Attach::Fentry => "fentry",
        }
    }
}

/// `--attach`: which hooks to try.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachMode {
    /// fentry where the kernel allows it, else the syscall tracepoints.
    Auto,
    /// syscalls:sys_enter/exit_membarrier.
    Tracepoint,
    /// fentry/fexit on the syscall function; an error where the kernel refuses it.
    Fentry,
}

impl AttachMode {
    /// The hooks to try, in order, on a PREEMPT_RT kernel or not.
    pub fn candidates(self, preempt_rt: bool) -> Vec<&'static Hook> {
        match self {
            AttachMode::Auto if preempt_rt => HOOKS.iter().rev().collect(),
            AttachMode::Auto => HOOKS.iter().collect(),
            AttachMode::Tracepoint => vec![Attach::Tracepoint.hook()],
            AttachMode::Fentry => vec![Attach::Fentry.hook()],
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::ValueEnum as _;

    use super::*;

    #[test]
    fn every_attach_has_one_row_and_auto_tries_them_all() {
        for a in [Attach::Tracepoint, Attach::Fentry] {
            assert_eq!(HOOKS.iter().filter(|h| h.attach == a).count(), 1);
            assert_eq!(a.hook().attach, a);
        }
        assert_eq!(AttachMode::Auto.candidates(false).len(), HOOKS.len());
        for a in [Attach::Tracepoint, Attach::Fentry] {
            assert_eq!(serde_json::to_value(a).unwrap(), a.name());
            assert_eq!(
                AttachMode::from_str(a.name(), false)
                    .unwrap()
                    .candidates(true)[0]
                    .attach,
                a
            );
        }
        assert_eq!(AttachMode::Auto.candidates(false)[0].attach, Attach::Fentry);
        assert_eq!(
            AttachMode::Auto.candidates(true)[0].attach,
            Attach::Tracepoint
        );
        assert_eq!(AttachMode::Auto.candidates(true).len(), HOOKS.len());
        // Every program name is distinct: per-hook figures are read by name.
        let mut names: Vec<_> = HOOKS.iter().flat_map(|h| [h.enter, h.exit]).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), 2 * HOOKS.len());
    }
}
