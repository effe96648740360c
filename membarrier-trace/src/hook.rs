//! The ways of hooking the membarrier syscall, as one table. Each row is an enter and an exit
//! program attached as a pair; everything that depends on the hook (program names, where its
//! skipped calls are counted, what the outputs call it) is read from the row that was attached.

use serde::Serialize;

/// Which row of [`HOOKS`] is attached (the `attach` field of the outputs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Attach {
    /// `syscalls:sys_enter/exit_membarrier`.
    #[default]
    Tracepoint,
    /// fentry/fexit on the syscall function.
    Fentry,
    /// BTF raw tracepoints on every syscall's entry and exit, returning unless it is membarrier.
    Raw,
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
    /// BTF-typed raw tracepoints (`tp_btf`) `enter` and `exit`.
    BtfTracepoint {
        enter: &'static str,
        exit: &'static str,
    },
}

#[derive(Debug)]
pub struct Hook {
    pub attach: Attach,
    pub kind: Kind,
    /// Program names in the eBPF object.
    pub enter: &'static str,
    pub exit: &'static str,
    /// The same attachment with programs that do nothing: the hook's own cost, which
    /// `cargo xtask bench` measures (`--hook-floor`) to tell the programs' cost from it.
    pub floor_enter: &'static str,
    pub floor_exit: &'static str,
    /// What the outputs call it.
    pub describe: &'static str,
}

/// `--hook-floor[=PART]` (benchmarks): the hook with programs that do nothing, or on the
/// syscall tracepoints an exit program that does one part of the per-call path (beside the
/// empty enter), to read what each part costs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FloorPart {
    /// Nothing: the hook's own cost.
    Empty,
    /// One clock read (`bpf_ktime_get_ns`).
    Clock,
    /// `bpf_get_current_pid_tgid`.
    PidTgid,
    /// The thread's in-flight slot found at its place (an array, as the programs do).
    Place,
    /// The thread's in-flight slot found by its tid in a hash map (where another thread holds
    /// its place).
    Slot,
    /// The call's stats row found by its key (a hash map, then the rows' array), as a thread's
    /// first call of a key finds it.
    Row,
    /// The tid, the thread's slot at its place, and the stats row at the index the slot keeps,
    /// checked against its key: how every exit finds its row.
    RowAtIndex,
    /// The same, counted into.
    RowCount,
    /// An atomic add into an array element (its lookup inlined).
    ArrayAdd,
}

impl FloorPart {
    /// Its exit program, on the syscall tracepoints only; None for the hook's empty one.
    pub fn exit_program(self) -> Option<&'static str> {
        Some(match self {
            FloorPart::Empty => return None,
            FloorPart::Clock => "part_clock",
            FloorPart::PidTgid => "part_pid_tgid",
            FloorPart::Place => "part_place",
            FloorPart::Slot => "part_slot",
            FloorPart::Row => "part_row",
            FloorPart::RowAtIndex => "part_row_at_index",
            FloorPart::RowCount => "part_row_count",
            FloorPart::ArrayAdd => "part_array_add",
        })
    }
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
/// inside the same program (calls counted as missed, not lost, but no longer exact). The raw
/// syscall tracepoints last, and never by `auto`: cheapest per membarrier call of the
/// tracepoints, but every other syscall on the box runs a program too.
pub const HOOKS: &[Hook] = &[
    Hook {
        attach: Attach::Fentry,
        kind: Kind::Fentry { func: SYSCALL_FUNC },
        enter: "membarrier_fentry",
        exit: "membarrier_fexit",
        floor_enter: "floor_membarrier_fentry",
        floor_exit: "floor_membarrier_fexit",
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
        floor_enter: "floor_sys_enter_membarrier",
        floor_exit: "floor_sys_exit_membarrier",
        describe: "syscalls:sys_enter/exit_membarrier",
    },
    Hook {
        attach: Attach::Raw,
        kind: Kind::BtfTracepoint {
            enter: "sys_enter",
            exit: "sys_exit",
        },
        enter: "raw_sys_enter",
        exit: "raw_sys_exit",
        floor_enter: "floor_raw_sys_enter",
        floor_exit: "floor_raw_sys_exit",
        describe: "raw tracepoints sys_enter/sys_exit (every syscall runs a program)",
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
            Attach::Raw => "raw",
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
    /// Raw tracepoints sys_enter/sys_exit: the cheapest tracepoint per membarrier call, but
    /// every other syscall on the box pays about twice what the syscall tracepoints cost it.
    /// For boxes where membarrier dominates; never chosen by auto.
    Raw,
}

impl AttachMode {
    /// The hooks to try, in order, on a PREEMPT_RT kernel or not.
    pub fn candidates(self, preempt_rt: bool) -> Vec<&'static Hook> {
        match self {
            AttachMode::Auto if preempt_rt => {
                vec![Attach::Tracepoint.hook(), Attach::Fentry.hook()]
            }
            AttachMode::Auto => vec![Attach::Fentry.hook(), Attach::Tracepoint.hook()],
            AttachMode::Tracepoint => vec![Attach::Tracepoint.hook()],
            AttachMode::Fentry => vec![Attach::Fentry.hook()],
            AttachMode::Raw => vec![Attach::Raw.hook()],
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::ValueEnum as _;

    use super::*;

    #[test]
    fn every_attach_has_one_row_and_auto_tries_all_but_raw() {
        let all = [Attach::Tracepoint, Attach::Fentry, Attach::Raw];
        for a in all {
            assert_eq!(HOOKS.iter().filter(|h| h.attach == a).count(), 1);
            assert_eq!(a.hook().attach, a);
        }
        assert_eq!(AttachMode::Auto.candidates(false).len(), HOOKS.len() - 1);
        assert!(
            AttachMode::Auto
                .candidates(false)
                .iter()
                .all(|h| h.attach != Attach::Raw)
        );
        for a in all {
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
        assert_eq!(AttachMode::Auto.candidates(true).len(), HOOKS.len() - 1);
        // Every program name is distinct: per-hook figures are read by name.
        let mut names: Vec<_> = HOOKS
            .iter()
            .flat_map(|h| [h.enter, h.exit, h.floor_enter, h.floor_exit])
            .collect();
        let parts = <FloorPart as clap::ValueEnum>::value_variants();
        names.extend(parts.iter().filter_map(|p| p.exit_program()));
        names.sort();
        names.dedup();
        // Every part but `Empty` has a program of its own.
        assert_eq!(names.len(), 4 * HOOKS.len() + parts.len() - 1);
        assert_eq!(FloorPart::Empty.exit_program(), None);
    }
}
