//! The probe tables (which program attaches where, for each part of a run) and attaching one:
//! each tracepoint's layout is checked first, and a refusal is one line with the verifier's
//! verdict.

use std::path::Path;

use anyhow::{Context as _, Result};
use aya::{
    Ebpf,
    programs::{BtfTracePoint, FEntry, FExit, Program, ProgramError, RawTracePoint, TracePoint},
};
use membarrier_trace_common::field;

use crate::{
    hook::{FloorPart, Hook, Kind},
    preflight,
};

/// One program and where it attaches.
pub(super) struct Probe {
    pub(super) prog: &'static str,
    pub(super) at: At,
}

pub(super) enum At {
    /// The classic tracepoint `category:prog` (named like the program), with the record fields
    /// the program reads.
    Tracepoint {
        category: &'static str,
        /// The tracepoint's name (most programs are named after theirs).
        name: &'static str,
        fields: Fields,
    },
    /// fentry, or with `exit` fexit, on a kernel function.
    Btf { func: &'static str, exit: bool },
    /// The raw tracepoint `tp`: its arguments untyped (no BTF needed).
    RawTracepoint { tp: &'static str },
    /// The BTF-typed raw tracepoint `tp` (tp_btf); `task`: the program reads a task's pid at
    /// the offset from the kernel's BTF (TASK_OFFSETS), so needs it known.
    BtfTracepoint { tp: &'static str, task: bool },
}

/// The record fields a tracepoint program reads, by name.
#[derive(Clone, Copy)]
pub(super) enum Fields {
    /// At offsets built into the program: the layout must match.
    Fixed(&'static [(&'static str, usize)]),
    /// At the `field::*` index of the program's FIELDS, read from the format file at load.
    Loaded(&'static [(&'static str, usize)]),
}

impl Probe {
    pub(super) const fn tp(
        category: &'static str,
        prog: &'static str,
        fields: &'static [(&'static str, usize)],
    ) -> Self {
        Self {
            prog,
            at: At::Tracepoint {
                category,
                name: prog,
                fields: Fields::Loaded(fields),
            },
        }
    }

    /// The raw tracepoint `tp`.
    pub(super) const fn raw_tp(prog: &'static str, tp: &'static str) -> Self {
        Self {
            prog,
            at: At::RawTracepoint { tp },
        }
    }

    /// The BTF-typed raw tracepoint `tp` (tp_btf), whose program reads no task.
    pub(super) const fn tp_btf(prog: &'static str, tp: &'static str) -> Self {
        Self {
            prog,
            at: At::BtfTracepoint { tp, task: false },
        }
    }

    /// [`Probe::tp_btf`] for a program that reads a task's pid from its arguments.
    pub(super) const fn tp_btf_task(prog: &'static str, tp: &'static str) -> Self {
        Self {
            prog,
            at: At::BtfTracepoint { tp, task: true },
        }
    }

    pub(super) const fn fentry(prog: &'static str, func: &'static str) -> Self {
        Self {
            prog,
            at: At::Btf { func, exit: false },
        }
    }

    pub(super) const fn fexit(prog: &'static str, func: &'static str) -> Self {
        Self {
            prog,
            at: At::Btf { func, exit: true },
        }
    }

    /// A hook's programs, exit first (attached unarmed, then armed at once: see CONTROL in the
    /// eBPF programs; exit before enter all the same).
    /// With `floor`, the hook's programs that do nothing instead (`--hook-floor`), or one part
    /// of the per-call path at the exit.
    pub(super) fn pair(hook: &'static Hook, floor: Option<FloorPart>) -> [Probe; 2] {
        let (enter, exit) = match floor {
            None => (hook.enter, hook.exit),
            Some(part) => (
                hook.floor_enter,
                part.exit_program().unwrap_or(hook.floor_exit),
            ),
        };
        match hook.kind {
            Kind::Tracepoint {
                category,
                enter_fields,
                exit_fields,
            } => [
                Probe {
                    prog: exit,
                    at: At::Tracepoint {
                        category,
                        name: hook.exit,
                        fields: Fields::Fixed(exit_fields),
                    },
                },
                Probe {
                    prog: enter,
                    at: At::Tracepoint {
                        category,
                        name: hook.enter,
                        fields: Fields::Fixed(enter_fields),
                    },
                },
            ],
            Kind::Fentry { func } => [Probe::fexit(exit, func), Probe::fentry(enter, func)],
            Kind::BtfTracepoint {
                enter: enter_tp,
                exit: exit_tp,
            } => [Probe::tp_btf(exit, exit_tp), Probe::tp_btf(enter, enter_tp)],
        }
    }
}

/// What keeps the process table (serial numbers, live tasks, the filter, in-flight slots),
/// each way tried in turn. First the BTF-typed raw tracepoints, where the kernel's BTF gives
/// the offsets they read: not skipped while a map syscall holds `bpf_prog_active` (a classic
/// tracepoint program is, uncounted before 6.7), so no exit goes unseen.
pub(super) const PROCESS: Ways = &[
    &[
        Probe::tp_btf_task("task_newtask_btf", "task_newtask"),
        Probe::tp_btf("sched_process_exit_btf", "sched_process_exit"),
    ],
    &[
        Probe::tp(
            "task",
            "task_newtask",
            &[
                ("pid", field::TASK_NEWTASK_PID),
                ("clone_flags", field::TASK_NEWTASK_CLONE_FLAGS),
            ],
        ),
        Probe::tp("sched", "sched_process_exit", &[]),
    ],
];

/// A figure's ways of being measured, best first: a way's probes attach all together or not
/// at all. Where both exist, a raw tracepoint (BTF-typed or not) comes before the classic
/// tracepoint: it costs less per event (no record is built), and detaches at once, where each
/// classic one waits for grace periods under the kernel's event_mutex (about 40 ms each here,
/// one after another, at every stop).
pub(super) type Ways = &'static [&'static [Probe]];

/// The grace period where fentry on synchronize_rcu is refused: off-CPU time inside the call
/// (and inside userspace grace periods).
pub(super) const SCHED_SWITCH: Ways = &[
    &[Probe::tp_btf_task("sched_switch_btf", "sched_switch")],
    &[Probe::tp(
        "sched",
        "sched_switch",
        &[("next_pid", field::SCHED_SWITCH_NEXT_PID)],
    )],
];

/// Off-CPU time inside userspace grace periods only, beside fentry on synchronize_rcu.
pub(super) const SCHED_SWITCH_WRITERS: Ways = &[
    &[Probe::tp_btf_task(
        "sched_switch_writers_btf",
        "sched_switch",
    )],
    &[Probe {
        prog: "sched_switch_writers",
        at: At::Tracepoint {
            category: "sched",
            name: "sched_switch",
            fields: Fields::Loaded(&[("next_pid", field::SCHED_SWITCH_NEXT_PID)]),
        },
    }],
];

/// The probes behind the per-call breakdown. Each group is one figure with its ways of getting
/// it, best first; a way's probes attach all together or not at all. What the kernel lacks is
/// left out (its figures stay 0) and the user is told.
pub(super) const BREAKDOWN: &[(&str, Ways)] = &[
    (
        "IPI fan-out and handler time",
        &[
            // 6.6 and later.
            &[
                Probe::raw_tp("csd_queue_cpu_raw", "csd_queue_cpu"),
                Probe::raw_tp("csd_function_entry_raw", "csd_function_entry"),
                Probe::raw_tp("csd_function_exit_raw", "csd_function_exit"),
            ],
            &[
                Probe::tp(
                    "csd",
                    "csd_queue_cpu",
                    &[
                        ("cpu", field::CSD_QUEUE_CPU_CPU),
                        ("func", field::CSD_QUEUE_CPU_FUNC),
                        ("csd", field::CSD_QUEUE_CPU_CSD),
                    ],
                ),
                Probe::tp(
                    "csd",
                    "csd_function_entry",
                    &[
                        ("func", field::CSD_FUNCTION_ENTRY_FUNC),
                        ("csd", field::CSD_FUNCTION_ENTRY_CSD),
                    ],
                ),
                Probe::tp(
                    "csd",
                    "csd_function_exit",
                    &[
                        ("func", field::CSD_FUNCTION_EXIT_FUNC),
                        ("csd", field::CSD_FUNCTION_EXIT_CSD),
                    ],
                ),
            ],
            // Older kernels that allow fentry: the cross-call functions membarrier calls, and
            // its callbacks on the target CPUs.
            &[
                Probe::fentry("smp_call_function_many", "smp_call_function_many"),
                Probe::fexit("smp_call_function_many_exit", "smp_call_function_many"),
                Probe::fentry("on_each_cpu_cond_mask", "on_each_cpu_cond_mask"),
                Probe::fentry("smp_call_function_single", "smp_call_function_single"),
                Probe::fexit("ipi_mb_exit", "ipi_mb"),
                Probe::fentry("ipi_mb_entry", "ipi_mb"),
                Probe::fexit("ipi_sync_core_exit", "ipi_sync_core"),
                Probe::fentry("ipi_sync_core_entry", "ipi_sync_core"),
                Probe::fexit("ipi_rseq_exit", "ipi_rseq"),
                Probe::fentry("ipi_rseq_entry", "ipi_rseq"),
            ],
        ],
    ),
    (
        "mutex wait",
        &[
            &[
                Probe::tp_btf("contention_begin_btf", "contention_begin"),
                Probe::tp_btf("contention_end_btf", "contention_end"),
            ],
            &[
                Probe::tp(
                    "lock",
                    "contention_begin",
                    &[("flags", field::LOCK_CONTENTION_BEGIN_FLAGS)],
                ),
                Probe::tp("lock", "contention_end", &[]),
            ],
        ],
    ),
    (
        "waker",
        &[
            &[Probe::tp_btf_task("sched_waking_btf", "sched_waking")],
            &[Probe::tp(
                "sched",
                "sched_waking",
                &[("pid", field::SCHED_WAKING_PID)],
            )],
        ],
    ),
];

/// Checks that `category:name` exists and has each field, at the offset the program reads
/// where that is built in.
pub(super) fn check_layout(
    tracefs: &Path,
    category: &str,
    name: &str,
    fields: Fields,
) -> Result<()> {
    preflight::check_tracepoint(tracefs, category, name, "not in this kernel")?;
    let (Fields::Fixed(f) | Fields::Loaded(f)) = fields;
    for (field, off) in f {
        let got = preflight::field_offset(tracefs, category, name, field)?;
        if matches!(fields, Fields::Fixed(_)) && got as usize != *off {
            anyhow::bail!("{category}:{name} has {field} at offset {got}, the program reads {off}");
        }
    }
    Ok(())
}

/// Loads and attaches one probe; a refusal is one line with the kernel's reason. `btf` is read
/// on the first fentry probe and kept.
pub(super) fn attach_probe(
    ebpf: &mut Ebpf,
    tracefs: &Path,
    btf: &mut Option<aya::Btf>,
    p: &Probe,
) -> Result<()> {
    let prog = ebpf
        .program_mut(p.prog)
        .with_context(|| format!("eBPF program {} missing from the object", p.prog))?;
    match p.at {
        At::Tracepoint {
            category,
            name,
            fields,
        } => {
            check_layout(tracefs, category, name, fields)?;
            let tp: &mut TracePoint = prog.try_into()?;
            tp.load().map_err(|e| load_error(p.prog, e))?;
            tp.attach(category, name)
                .with_context(|| format!("attaching to {category}:{name}"))?;
        }
        At::RawTracepoint { tp } => {
            let name = p.prog;
            let p: &mut RawTracePoint = prog.try_into()?;
            p.load().map_err(|e| load_error(name, e))?;
            p.attach(tp)
                .with_context(|| format!("attaching to the raw tracepoint {tp}"))?;
        }
        At::BtfTracepoint { tp, .. } => {
            let btf = kernel_btf(btf)?;
            let name = p.prog;
            let p: &mut BtfTracePoint = prog.try_into()?;
            p.load(tp, btf).map_err(|e| load_error(name, e))?;
            p.attach()
                .with_context(|| format!("attaching to the raw tracepoint {tp}"))?;
        }
        At::Btf { func, exit } => {
            let btf = kernel_btf(btf)?;
            let refused = |e: ProgramError| match e {
                ProgramError::LoadError {
                    io_error,
                    verifier_log,
                } => match verdict(&verifier_log.to_string()).map(str::to_string) {
                    // EPERM where fentry is not allowed at all: no log.
                    None => anyhow::anyhow!("fentry on {func} refused: {io_error}"),
                    Some(v) => {
                        anyhow::anyhow!("fentry on {func} refused: {io_error}; verifier: {v}")
                    }
                },
                e => anyhow::Error::new(e).context(format!("fentry on {func}")),
            };
            if exit {
                let p: &mut FExit = prog.try_into()?;
                p.load(func, btf).map_err(refused)?;
                p.attach().map_err(refused)?;
            } else {
                let p: &mut FEntry = prog.try_into()?;
                p.load(func, btf).map_err(refused)?;
                p.attach().map_err(refused)?;
            }
        }
    }
    // For whoever changes a program: the verifier's work on it, the figure that has to stay
    // far below its limit (a million instructions) on every kernel.
    if std::env::var_os("MEMBARRIER_TRACE_VERIFIER_STATS").is_some()
        && let Some(n) = prog_info(ebpf, p.prog)
    {
        eprintln!("verifier: {} {n} instructions", p.prog);
    }
    Ok(())
}

/// The instructions the verifier processed for `prog` (Linux 5.16+).
pub(super) fn prog_info(ebpf: &Ebpf, prog: &str) -> Option<u32> {
    ebpf.program(prog)?
        .info()
        .ok()?
        .verified_instruction_count()
}

/// The kernel's BTF, read once (fentry and tp_btf programs are typed by it).
pub(super) fn kernel_btf(btf: &mut Option<aya::Btf>) -> Result<&aya::Btf> {
    if btf.is_none() {
        *btf = Some(aya::Btf::from_sys_fs().context("reading the kernel's BTF")?);
    }
    Ok(btf.as_ref().expect("read above"))
}

/// Attaches `probes` all together: on a failure the ones already attached are unloaded again
/// (a hook's exit program left attached alone would count every later call as missed).
pub(super) fn attach_all(
    ebpf: &mut Ebpf,
    tracefs: &Path,
    btf: &mut Option<aya::Btf>,
    probes: &[Probe],
) -> Result<()> {
    for (i, p) in probes.iter().enumerate() {
        if let Err(e) = attach_probe(ebpf, tracefs, btf, p) {
            for done in &probes[..=i] {
                unload(ebpf, done.prog);
            }
            return Err(e);
        }
    }
    Ok(())
}

/// Detaches and unloads a program loaded by [`attach_probe`] (a no-op when it is not loaded).
pub(super) fn unload(ebpf: &mut Ebpf, prog: &str) {
    if let Some(p) = ebpf.program_mut(prog) {
        unload_program(p);
    }
}

pub(super) fn unload_program(p: &mut Program) {
    let _ = match p {
        Program::TracePoint(p) => p.unload(),
        Program::FEntry(p) => p.unload(),
        Program::FExit(p) => p.unload(),
        Program::BtfTracePoint(p) => p.unload(),
        Program::UProbe(p) => p.unload(),
        Program::RawTracePoint(p) => p.unload(),
        _ => Ok(()),
    };
}

/// The verifier's verdict: the last line of its log before the statistics.
pub(super) fn verdict(log: &str) -> Option<&str> {
    log.lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("verification time"))
        .filter(|l| !l.is_empty())
        .last()
}

/// A program load failure as one line: the errno and the verifier's verdict (the last line of its
/// log before the statistics), not the whole log.
pub(super) fn load_error(prog: &str, e: ProgramError) -> anyhow::Error {
    match e {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            let verdict = verdict(&log).unwrap_or("no verifier log");
            anyhow::anyhow!("the kernel refused to load {prog}: {io_error}; verifier: {verdict}")
        }
        e => anyhow::Error::new(e).context(format!("loading {prog}")),
    }
}

/// How often the kernel skipped `prog` because another BPF program was running on that CPU
/// (`recursion_misses` in `bpf_prog_info`; aya does not expose it).
pub(super) fn recursion_misses(prog: std::os::fd::BorrowedFd<'_>) -> Result<u64> {
    use std::os::fd::AsRawFd as _;
    // struct bpf_prog_info up to and including recursion_misses (at offset 208).
    const INFO_LEN: usize = 216;
    const RECURSION_MISSES_OFF: usize = 208;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    #[repr(C)]
    struct GetInfo {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let fd = prog.as_raw_fd();
    let mut info = [0u8; INFO_LEN];
    let mut attr = GetInfo {
        bpf_fd: fd as u32,
        info_len: INFO_LEN as u32,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: attr points at a live buffer of info_len bytes.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &raw mut attr,
            std::mem::size_of::<GetInfo>(),
        )
    };
    if r != 0 {
        anyhow::bail!(
            "BPF_OBJ_GET_INFO_BY_FD: {}",
            std::io::Error::last_os_error()
        );
    }
    let bytes = &info[RECURSION_MISSES_OFF..RECURSION_MISSES_OFF + 8];
    Ok(u64::from_ne_bytes(bytes.try_into().expect("8 bytes")))
}
