//! The collector: four jobs on the maps of one loaded object. It picks the programs a run needs
//! from the probe tables and attaches them (checking each tracepoint's layout first); loads
//! and starts them, with maps sized for the machine; retires exited processes (their rows,
//! threads and detail moved out of the kernel, summed past a bound); and reads the kernel's
//! aggregates into a [`Snapshot`].

use std::{
    collections::{HashMap, HashSet},
    path::Path,
    time::Instant,
};

use anyhow::{Context as _, Result};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap as BpfHashMap, MapData, MapError, PerCpuArray},
    programs::{BtfTracePoint, FEntry, FExit, Program, ProgramError, TracePoint},
};
use membarrier_trace_common::{
    COMM_LEN, CpuKey, EXITED_RING_BYTES, Handled, HandlerKey, Inflight, KStack, KStackKey,
    MAX_INFLIGHT, MAX_KSTACKS, MAX_PROCS, MAX_STATS, MAX_SUMMED, MAX_THREADS, MAX_WRITERS,
    MOVED_ROWS, Proc, STACK_RING_BYTES, Stats, StatsKey, SummedKey, SummedRow, THREAD_CMDS,
    ThreadCalls, ThreadKey, UNWIND_SLOTS, UnwindSlot, WakerKey, WriterKey, WriterStats, counter,
    field, proc_id, thread_cmd,
};

use crate::{
    collect::kstacks::KernelStacks,
    collect::rcu::{CustomFunc, Writers},
    collect::ring::ExitedRing,
    enrich::symbolize::{CallerNamer, Rings},
    hook::{Attach, AttachMode, Hook, Kind},
    model::{
        Absorb, ExitedRows, GraceSource, Losses, Maps, ProcKey, RawRow, Snapshot, ThreadRow,
        WriterRow, comm_str,
    },
    preflight,
};

static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("MEMBARRIER_TRACE_EBPF_OBJECT"));
/// The same programs for kernels before 5.12, built without compare-and-exchange or fetching
/// atomics, which those kernels refuse anywhere in a program (docs/design.md, "Kernels").
static EBPF_OBJECT_NO_CMPXCHG: &[u8] =
    aya::include_bytes_aligned!(env!("MEMBARRIER_TRACE_EBPF_OBJECT_NO_CMPXCHG"));

/// What to trace.
pub struct Options {
    /// Only these tgids (filtered in the kernel); empty with `follow_forks` off means everything.
    pub pids: Vec<u32>,
    /// Also trace every process a traced process forks (for `-- COMMAND`).
    pub follow_forks: bool,
    /// Attach the breakdown probes (grace period, IPIs, handler time, mutex wait).
    pub breakdown: bool,
    pub attach: AttachMode,
    /// Probe userspace RCU grace-period functions (liburcu's, and `rcu_funcs`).
    pub rcu: bool,
    pub rcu_funcs: Vec<CustomFunc>,
    /// `--stacks`: each call's user stack, unwound in userspace.
    pub stacks: bool,
    /// `--hook-floor` (benchmarks): only the hook, with programs that do nothing.
    pub hook_floor: bool,
    /// What the running kernel's BPF can do: which eBPF object loads (read once, by the caller,
    /// which also turns off what the kernel cannot do).
    pub kernel: crate::collect::kernel::Features,
}

pub struct Collector {
    // Owns the programs; dropping it detaches them.
    ebpf: Ebpf,
    stats: BpfHashMap<MapData, StatsKey, Stats>,
    counters: PerCpuArray<MapData, u64>,
    inflight: BpfHashMap<MapData, u32, Inflight>,
    procs: BpfHashMap<MapData, u32, Proc>,
    control: Array<MapData, u32>,
    ipi_cpus: BpfHashMap<MapData, CpuKey, u64>,
    wakers: BpfHashMap<MapData, WakerKey, u64>,
    handled: BpfHashMap<MapData, HandlerKey, Handled>,
    exit_names: BpfHashMap<MapData, u64, [u8; COMM_LEN]>,
    writer_rows: BpfHashMap<MapData, WriterKey, WriterStats>,
    /// Exited processes' rows, sent by the kernel as they exit.
    exited_rows: ExitedRing,
    /// Exited processes taken from it at the last retire pass.
    moved_in_use: usize,
    /// ... and in all.
    moved: u64,
    /// Exited processes' rows the kernel summed by name when that ring was full ...
    summed: BpfHashMap<MapData, SummedKey, SummedRow>,
    /// ... and what of them was taken in already.
    summed_seen: HashMap<SummedKey, SummedRow>,
    /// Exited threads' calls, drained at every retire pass.
    thread_rows: BpfHashMap<MapData, ThreadKey, ThreadCalls>,
    /// What was drained from it, per process.
    exited_threads: HashMap<ProcKey, ExitedThreads>,
    /// The probed grace-period functions (None: `--no-rcu`).
    writers: Option<Writers>,
    /// `--pid`s: their mappings are probed for grace-period functions.
    pids: Vec<u32>,
    follow_forks: bool,
    /// sched_switch_writers is attached (off-CPU time in grace periods beside fentry).
    writers_off_cpu: bool,
    /// Names grace periods' callers and unwinds `--stacks` (None: neither).
    callers: Option<CallerNamer>,
    /// `--stacks`: the stacks the kernel unwinds itself.
    kstacks: Option<KernelStacks>,
    /// Last known name of each process seen.
    comms: HashMap<ProcKey, String>,
    retired: Retired,
    started: Instant,
    tracefs: std::path::PathBuf,
    /// The kernel's BTF, read on the first fentry attach.
    btf: Option<aya::Btf>,
    grace_source: GraceSource,
    breakdown: bool,
    /// Only the hook's programs that do nothing (`--hook-floor`).
    hook_floor: bool,
    attach_mode: AttachMode,
    /// The row of the hook table that is attached.
    hook: &'static Hook,
    maps: Maps,
    /// The kernel's BTF gave the `task_struct` offsets (processes named by their leader, the
    /// process table kept by BTF-typed tracepoints).
    task_offsets_known: bool,
    /// Stats rows in use at the last retire pass.
    rows_in_use: usize,
    /// Exited threads drained at the last retire pass.
    threads_in_use: usize,
}

/// One program and where it attaches.
struct Probe {
    prog: &'static str,
    at: At,
}

enum At {
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
    /// The BTF-typed raw tracepoint `tp` (tp_btf).
    BtfTracepoint { tp: &'static str },
}

/// The record fields a tracepoint program reads, by name.
#[derive(Clone, Copy)]
enum Fields {
    /// At offsets built into the program: the layout must match.
    Fixed(&'static [(&'static str, usize)]),
    /// At the `field::*` index of the program's FIELDS, read from the format file at load.
    Loaded(&'static [(&'static str, usize)]),
}

impl Probe {
    const fn tp(
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

    const fn fentry(prog: &'static str, func: &'static str) -> Self {
        Self {
            prog,
            at: At::Btf { func, exit: false },
        }
    }

    const fn fexit(prog: &'static str, func: &'static str) -> Self {
        Self {
            prog,
            at: At::Btf { func, exit: true },
        }
    }

    /// A hook's programs, exit first (attached unarmed, then armed at once: see CONTROL in the
    /// eBPF programs; exit before enter all the same).
    /// With `floor`, the hook's programs that do nothing instead (`--hook-floor`).
    fn pair(hook: &'static Hook, floor: bool) -> [Probe; 2] {
        let (enter, exit) = if floor {
            (hook.floor_enter, hook.floor_exit)
        } else {
            (hook.enter, hook.exit)
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
            } => [
                Probe {
                    prog: exit,
                    at: At::BtfTracepoint { tp: exit_tp },
                },
                Probe {
                    prog: enter,
                    at: At::BtfTracepoint { tp: enter_tp },
                },
            ],
        }
    }
}

/// Sizes of the maps that grow with the machine's load (docs/design.md, "Bounds").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    /// Stats rows of live processes (exited ones are moved out): 0.1% of RAM, 1024 to 8192.
    pub stats: u32,
    /// Threads that have called membarrier, alive at once: `kernel.threads-max`, 16384 to
    /// 65536.
    pub inflight: u32,
    /// Processes created while tracing, alive at once: `kernel.pid_max`, 16384 to 65536.
    pub procs: u32,
}

impl MapSizes {
    pub fn new(ram_bytes: u64, threads_max: u64, pid_max: u64) -> Self {
        let row = std::mem::size_of::<Stats>() as u64;
        let clamp = |v: u64, lo: u32, hi: u32| v.clamp(lo.into(), hi.into()) as u32;
        Self {
            stats: clamp(ram_bytes / 1000 / row, MAX_STATS, 8192),
            inflight: clamp(threads_max, MAX_INFLIGHT, 65536),
            procs: clamp(pid_max, MAX_PROCS, 65536),
        }
    }

    fn of_this_machine() -> Self {
        let read = |path: &str| {
            std::fs::read_to_string(path)
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        // SAFETY: sysconf has no memory effects.
        let pages = unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) }.max(0) as u64;
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(0) as u64;
        Self::new(
            pages * page,
            read("/proc/sys/kernel/threads-max"),
            read("/proc/sys/kernel/pid_max"),
        )
    }

    /// Kernel memory of these three maps, the grace-period rows (WRITERS) and the exited threads
    /// (THREADS), in bytes ([`htab_bytes`]).
    pub fn kernel_bytes(&self, cpus: u64) -> u64 {
        let htab = |max, key, value| htab_bytes(max, key, value, cpus);
        htab(
            self.stats,
            std::mem::size_of::<StatsKey>(),
            std::mem::size_of::<Stats>(),
        ) + htab(self.inflight, 4, std::mem::size_of::<Inflight>())
            + htab(self.procs, 4, std::mem::size_of::<Proc>())
            + htab(
                MAX_WRITERS,
                std::mem::size_of::<WriterKey>(),
                std::mem::size_of::<WriterStats>(),
            )
            + htab(
                MAX_THREADS,
                std::mem::size_of::<ThreadKey>(),
                std::mem::size_of::<ThreadCalls>(),
            )
    }

    /// The most kernel memory all the maps take: these five, the rows summed by name
    /// (`SUMMED` and its per-CPU template), and the fixed-size others (detail maps, per-CPU
    /// counters and the row templates): under 4 MiB plus 16 KiB a CPU.
    pub fn kernel_bytes_bound(&self, cpus: u64) -> u64 {
        let summed = htab_bytes(
            MAX_SUMMED,
            size_of::<SummedKey>(),
            size_of::<SummedRow>(),
            cpus,
        ) + cpus * size_of::<SummedRow>() as u64;
        self.kernel_bytes(cpus) + summed + (4 << 20) + cpus * (16 << 10)
    }

    /// With `--stacks`, the samples ring, the unwinding rules and the kernel's stacks add
    /// theirs to the bound; without, the ring of exited processes' rows (`EXITED`).
    pub fn report(&self, cpus: u64, stacks: bool) -> Maps {
        let stacks_bytes = if stacks {
            u64::from(STACK_RING_BYTES)
                + u64::from(UNWIND_SLOTS) * size_of::<UnwindSlot>() as u64
                + 4096
                + htab_bytes(
                    MAX_KSTACKS,
                    size_of::<KStackKey>(),
                    size_of::<KStack>(),
                    cpus,
                )
        } else {
            // The ring's pages, and its header pages.
            u64::from(EXITED_RING_BYTES) + (16 << 10)
        };
        Maps {
            stats_rows: self.stats,
            inflight_slots: self.inflight,
            processes: self.procs,
            kernel_bytes_bound: self.kernel_bytes_bound(cpus) + stacks_bytes,
        }
    }
}

/// Kernel memory of a preallocated hash map (kernel/bpf/hashtab.c, htab_map_mem_usage): per
/// element a 48-byte header plus key and value, each rounded up to 8 bytes, and one spare
/// element per CPU; 16 bytes per bucket, buckets being a power of two at least the elements;
/// under 1 KiB of header and locks.
fn htab_bytes(max: u32, key: usize, value: usize, cpus: u64) -> u64 {
    let elem = (48 + key.next_multiple_of(8) + value.next_multiple_of(8)) as u64;
    elem * (u64::from(max) + cpus) + 16 * u64::from(max).next_power_of_two() + 1024
}

/// What keeps the process table (serial numbers, live tasks, the filter, in-flight slots).
const PROCESS: &[Probe] = &[
    Probe::tp(
        "task",
        "task_newtask",
        &[
            ("pid", field::TASK_NEWTASK_PID),
            ("clone_flags", field::TASK_NEWTASK_CLONE_FLAGS),
        ],
    ),
    Probe::tp("sched", "sched_process_exit", &[]),
];

/// The same as BTF-typed raw tracepoints, tried first where the kernel's BTF gives the offsets
/// they read: not skipped while a map syscall holds `bpf_prog_active` (a classic tracepoint
/// program is, uncounted before 6.7), so no exit goes unseen.
const PROCESS_BTF: &[Probe] = &[
    Probe {
        prog: "task_newtask_btf",
        at: At::BtfTracepoint { tp: "task_newtask" },
    },
    Probe {
        prog: "sched_process_exit_btf",
        at: At::BtfTracepoint {
            tp: "sched_process_exit",
        },
    },
];

/// The grace period where fentry on synchronize_rcu is refused: off-CPU time inside the call
/// (and inside userspace grace periods).
const SCHED_SWITCH: &[Probe] = &[Probe::tp(
    "sched",
    "sched_switch",
    &[("next_pid", field::SCHED_SWITCH_NEXT_PID)],
)];

/// Off-CPU time inside userspace grace periods only, beside fentry on synchronize_rcu.
const SCHED_SWITCH_WRITERS: &[Probe] = &[Probe {
    prog: "sched_switch_writers",
    at: At::Tracepoint {
        category: "sched",
        name: "sched_switch",
        fields: Fields::Loaded(&[("next_pid", field::SCHED_SWITCH_NEXT_PID)]),
    },
}];

/// The probes behind the per-call breakdown. Each group is one figure with its ways of getting
/// it, best first; a way's probes attach all together or not at all. What the kernel lacks is
/// left out (its figures stay 0) and the user is told.
const BREAKDOWN: &[(&str, &[&[Probe]])] = &[
    (
        "IPI fan-out and handler time",
        &[
            // 6.6 and later.
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
        &[&[
            Probe::tp("lock", "contention_begin", &[]),
            Probe::tp("lock", "contention_end", &[]),
        ]],
    ),
    (
        "waker",
        &[&[Probe::tp(
            "sched",
            "sched_waking",
            &[("pid", field::SCHED_WAKING_PID)],
        )]],
    ),
];

/// Checks that `category:name` exists and has each field, at the offset the program reads
/// where that is built in.
fn check_layout(tracefs: &Path, category: &str, name: &str, fields: Fields) -> Result<()> {
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

/// The offsets of the breakdown programs' fields in this kernel's records (their FIELDS), from
/// the format files; mainline's where a tracepoint is missing (its probe is then left out).
fn field_offsets(tracefs: &Path) -> [u32; field::COUNT] {
    let mut out = field::mainline();
    let probes = BREAKDOWN
        .iter()
        .flat_map(|(_, ways)| ways.iter().copied().flatten())
        .chain(SCHED_SWITCH)
        .chain(PROCESS);
    for p in probes {
        if let At::Tracepoint {
            category,
            name: tp,
            fields: Fields::Loaded(fields),
        } = p.at
        {
            for &(name, idx) in fields {
                if let Ok(off) = preflight::field_offset(tracefs, category, tp, name) {
                    out[idx] = off;
                }
            }
        }
    }
    out
}

/// Addresses of membarrier's IPI callbacks, from /proc/kallsyms (0 where not found or hidden).
fn ipi_funcs() -> [u64; 4] {
    let syms = std::fs::read_to_string("/proc/kallsyms").unwrap_or_default();
    let mut out = [0u64; 4];
    for line in syms.lines() {
        let mut parts = line.split_whitespace();
        let (Some(addr), Some(_), Some(name)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let i = match name {
            "ipi_mb" => 0,
            "ipi_sync_core" => 1,
            "ipi_rseq" => 2,
            "ipi_sync_rq_state" => 3,
            _ => continue,
        };
        out[i] = u64::from_str_radix(addr, 16).unwrap_or(0);
    }
    // One of the barriers' callbacks missing (or all hidden by kptr_restrict) would drop its
    // IPIs: then count every csd queued from inside membarrier instead. Registration's may
    // be missing (older kernels): its IPIs are then not counted.
    if out[..3].contains(&0) { [0; 4] } else { out }
}

/// Loads and attaches one probe; a refusal is one line with the kernel's reason. `btf` is read
/// on the first fentry probe and kept.
fn attach_probe(
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
        At::BtfTracepoint { tp } => {
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
fn prog_info(ebpf: &Ebpf, prog: &str) -> Option<u32> {
    ebpf.program(prog)?
        .info()
        .ok()?
        .verified_instruction_count()
}

/// Every map syscall (the snapshots' reads, the retire pass's deletes) holds its CPU's
/// `bpf_prog_active` while it runs, and while it is held the kernel skips every syscall
/// tracepoint program that starts on that CPU, without counting it before Linux 6.7. On
/// PREEMPT_RT a syscall can be preempted there: the caller that preempted the tracer then had
/// all its calls skipped until the tracer ran again (1,099 of 344,000 calls, seen nowhere, in
/// the RT guest's `snapshots_on_the_callers_cpu_lose_no_call`). So the thread that reads the
/// maps (this one) runs at SCHED_FIFO 1, above every normal task: a traced caller cannot take
/// its CPU mid-syscall. Reset on fork: the threads and the command it starts run as normal.
fn hold_the_cpu_in_map_syscalls() -> Option<String> {
    /// linux/sched.h: or'ed into the policy.
    const SCHED_RESET_ON_FORK: i32 = 0x4000_0000;
    let r = crate::preflight::set_scheduler(libc::SCHED_FIFO | SCHED_RESET_ON_FORK, 1);
    (r != 0).then(|| {
        format!(
            "PREEMPT_RT: could not run at SCHED_FIFO ({}): a traced process preempting the \
             tracer while it reads its maps may have calls skipped by the kernel, uncounted",
            std::io::Error::last_os_error()
        )
    })
}

/// The kernel's BTF, read once (fentry and tp_btf programs are typed by it).
fn kernel_btf(btf: &mut Option<aya::Btf>) -> Result<&aya::Btf> {
    if btf.is_none() {
        *btf = Some(aya::Btf::from_sys_fs().context("reading the kernel's BTF")?);
    }
    Ok(btf.as_ref().expect("read above"))
}

/// Attaches `probes` all together: on a failure the ones already attached are unloaded again
/// (a hook's exit program left attached alone would count every later call as missed).
fn attach_all(
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
fn unload(ebpf: &mut Ebpf, prog: &str) {
    if let Some(p) = ebpf.program_mut(prog) {
        unload_program(p);
    }
}

fn unload_program(p: &mut Program) {
    let _ = match p {
        Program::TracePoint(p) => p.unload(),
        Program::FEntry(p) => p.unload(),
        Program::FExit(p) => p.unload(),
        Program::BtfTracePoint(p) => p.unload(),
        Program::UProbe(p) => p.unload(),
        _ => Ok(()),
    };
}

impl Drop for Collector {
    /// Every exit detaches at once (see [`Collector::detach`]), not program by program as the
    /// programs drop.
    fn drop(&mut self) {
        self.detach();
    }
}

/// The verifier's verdict: the last line of its log before the statistics.
fn verdict(log: &str) -> Option<&str> {
    log.lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("verification time"))
        .filter(|l| !l.is_empty())
        .last()
}

/// A program load failure as one line: the errno and the verifier's verdict (the last line of its
/// log before the statistics), not the whole log.
fn load_error(prog: &str, e: ProgramError) -> anyhow::Error {
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
fn recursion_misses(prog: &Program) -> Result<u64> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
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
    let fd = prog.fd()?.as_fd().as_raw_fd();
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
fn take<T>(ebpf: &mut Ebpf, name: &str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .with_context(|| format!("map {name} missing from the eBPF object"))?;
    T::try_from(map).with_context(|| format!("map {name}"))
}

/// CPUs the kernel could bring online: what it sizes per-CPU parts of maps by.
fn possible_cpus() -> u64 {
    aya::util::nr_cpus().map_or(1, |n| n as u64)
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK (later ones to the memory cgroup):
/// lift it, as aya's template does. Should it fail, the map creation says so.
fn raise_memlock() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads a live struct.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
}

impl Collector {
    /// Loads the programs. Nothing is attached until [`Collector::start`].
    pub fn load(tracefs: &Path, opts: &Options) -> Result<Self> {
        raise_memlock();
        let filter = u8::from(!opts.pids.is_empty() || opts.follow_forks);
        let funcs = ipi_funcs();
        let sizes = MapSizes::of_this_machine();
        let task = crate::collect::btf::task_offsets();
        let task_offsets = task.map_or([0; 3], |t| [t.pid, t.group_leader, t.comm]);
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("STATS", sizes.stats)
            .map_max_entries("INFLIGHT", sizes.inflight)
            .map_max_entries("PROCS", sizes.procs)
            .override_global("FILTER_TGIDS", &filter, true)
            .override_global("FOLLOW_FORKS", &u8::from(opts.follow_forks), true)
            .override_global("IPI_FUNCS", &funcs, true)
            .override_global("FIELDS", &field_offsets(tracefs), true)
            .override_global("TASK_OFFSETS", &task_offsets, true)
            .override_global("BREAKDOWN", &u8::from(opts.breakdown), true)
            .override_global("STACKS", &u8::from(opts.stacks), true)
            .map_max_entries(
                "STACK_SAMPLES",
                if opts.stacks { STACK_RING_BYTES } else { 4096 },
            )
            .map_max_entries("UNWIND", if opts.stacks { UNWIND_SLOTS } else { 1 })
            .map_max_entries("KSTACKS", if opts.stacks { MAX_KSTACKS } else { 1 })
            // With --stacks no rows are moved at exit (their stacks stay with userspace).
            .map_max_entries("EXITED", if opts.stacks { 4096 } else { EXITED_RING_BYTES })
            .load(if opts.kernel.cmpxchg {
                EBPF_OBJECT
            } else {
                EBPF_OBJECT_NO_CMPXCHG
            })
            .context("loading the eBPF object")?;
        let stats = take(&mut ebpf, "STATS")?;
        let counters = take(&mut ebpf, "COUNTERS")?;
        let inflight = take(&mut ebpf, "INFLIGHT")?;
        let procs = take(&mut ebpf, "PROCS")?;
        let control = take(&mut ebpf, "CONTROL")?;
        let ipi_cpus = take(&mut ebpf, "IPI_CPUS")?;
        let wakers = take(&mut ebpf, "WAKERS")?;
        let handled = take(&mut ebpf, "HANDLED")?;
        let exit_names = take(&mut ebpf, "EXIT_NAMES")?;
        let writer_rows = take(&mut ebpf, "WRITERS")?;
        let thread_rows = take(&mut ebpf, "THREADS")?;
        let summed = take(&mut ebpf, "SUMMED")?;
        let exited_rows = ExitedRing::start(take(&mut ebpf, "EXITED")?)
            .context("starting the exited processes' thread")?;
        let rings = Rings {
            callers: opts.rcu.then(|| take(&mut ebpf, "CALLERS")).transpose()?,
            stacks: opts
                .stacks
                .then(|| take(&mut ebpf, "STACK_SAMPLES"))
                .transpose()?,
        };
        let kstacks = if opts.stacks {
            Some(KernelStacks::new(
                take(&mut ebpf, "UNWIND")?,
                take(&mut ebpf, "KSTACKS")?,
            ))
        } else {
            None
        };
        let writers = if opts.rcu {
            Some(Writers::load(&mut ebpf, opts.rcu_funcs.clone())?)
        } else {
            None
        };
        let callers = if opts.rcu || opts.stacks {
            Some(CallerNamer::start(rings).context("starting the addresses thread")?)
        } else {
            None
        };
        let mut c = Self {
            ebpf,
            stats,
            counters,
            inflight,
            procs,
            control,
            ipi_cpus,
            wakers,
            handled,
            exit_names,
            writer_rows,
            exited_rows,
            moved_in_use: 0,
            moved: 0,
            summed,
            summed_seen: HashMap::new(),
            thread_rows,
            exited_threads: HashMap::new(),
            writers,
            pids: opts.pids.clone(),
            follow_forks: opts.follow_forks,
            writers_off_cpu: false,
            callers,
            kstacks,
            comms: HashMap::new(),
            retired: Retired::default(),
            started: Instant::now(),
            tracefs: tracefs.to_path_buf(),
            btf: None,
            grace_source: GraceSource::None,
            breakdown: opts.breakdown,
            hook_floor: opts.hook_floor,
            attach_mode: opts.attach,
            hook: Attach::default().hook(),
            maps: sizes.report(possible_cpus(), opts.stacks),
            task_offsets_known: task.is_some(),
            rows_in_use: 0,
            threads_in_use: 0,
        };
        for &pid in &opts.pids {
            c.add_pid(pid)?;
        }
        Ok(c)
    }

    /// Adds `pid`, a process that exists now, to the in-kernel filter.
    pub fn add_pid(&mut self, pid: u32) -> Result<()> {
        let p = Proc {
            serial: 0,
            tasks: 0,
            traced: 1,
            rows: 0,
        };
        self.procs
            .insert(pid, p, 0)
            .with_context(|| format!("adding pid {pid} to the filter"))
    }

    fn attach_all(&mut self, probes: &[Probe]) -> Result<()> {
        attach_all(&mut self.ebpf, &self.tracefs, &mut self.btf, probes)
    }

    /// Where the grace-period figures come from: fentry on synchronize_rcu* where the kernel
    /// allows it, else sched_switch. Returns a note for the user when it fell back.
    fn attach_grace_period(&mut self) -> (GraceSource, Option<String>) {
        const GP: &[Probe] = &[
            Probe::fexit("synchronize_rcu_exit", "synchronize_rcu"),
            Probe::fentry("synchronize_rcu_entry", "synchronize_rcu"),
        ];
        // Optional: synchronize_rcu is the grace period GLOBAL waits for.
        const GP_EXPEDITED: &[Probe] = &[
            Probe::fexit(
                "synchronize_rcu_expedited_exit",
                "synchronize_rcu_expedited",
            ),
            Probe::fentry(
                "synchronize_rcu_expedited_entry",
                "synchronize_rcu_expedited",
            ),
        ];
        let why = match self.attach_all(GP) {
            Ok(()) => {
                let _ = self.attach_all(GP_EXPEDITED);
                return (GraceSource::Fentry, None);
            }
            Err(e) => format!("{e:#}"),
        };
        match self.attach_all(SCHED_SWITCH) {
            Ok(()) => (
                GraceSource::Sched,
                Some(format!(
                    "grace periods measured as off-CPU time from sched_switch ({why})"
                )),
            ),
            Err(e) => (
                GraceSource::None,
                Some(format!(
                    "no grace-period figures: {why}; sched_switch: {e:#}"
                )),
            ),
        }
    }

    /// Attaches the breakdown probes (grace period, IPIs, handler time, mutex wait), each group
    /// the first way the kernel allows. The returned notes say what is missing and why.
    fn attach_breakdown(&mut self) -> Vec<String> {
        let (source, note) = self.attach_grace_period();
        self.grace_source = source;
        let mut notes: Vec<String> = note.into_iter().collect();
        for (what, ways) in BREAKDOWN {
            let mut why = Vec::new();
            for probes in *ways {
                match self.attach_all(probes) {
                    Ok(()) => {
                        why.clear();
                        break;
                    }
                    Err(e) => why.push(format!("{e:#}")),
                }
            }
            if !why.is_empty() {
                notes.push(format!("no {what} figures: {}", why.join("; ")));
            }
        }
        notes
    }

    /// Attaches the programs; from here on calls are counted. Returns notes on what could not
    /// be measured on this kernel.
    pub fn start(&mut self) -> Result<Vec<String>> {
        if self.hook_floor {
            let mut notes = Vec::new();
            self.hook = self.attach_hook(&mut notes)?;
            self.started = Instant::now();
            return Ok(notes);
        }
        let mut notes = if self.breakdown {
            self.attach_breakdown()
        } else {
            Vec::new()
        };
        if preflight::preempt_rt() {
            notes.extend(hold_the_cpu_in_map_syscalls());
        }
        // Before the hook: every slot it makes is freed at its thread's exit, and every process
        // created from here on has its serial number.
        if !self.task_offsets_known || self.attach_all(PROCESS_BTF).is_err() {
            self.attach_all(PROCESS)?;
        }
        self.attach_writers(&mut notes)?;
        self.hook = self.attach_hook(&mut notes)?;
        self.control
            .set(0, 1, 0)
            .context("arming the eBPF programs")?;
        self.started = Instant::now();
        Ok(notes)
    }

    /// Probes the grace-period functions: `--rcu-func`s (an error if one cannot be), the
    /// mappings of the `--pid`s, and with `-- COMMAND` or system-wide the liburcu libraries
    /// installed on the box.
    fn attach_writers(&mut self, notes: &mut Vec<String>) -> Result<()> {
        let Some(w) = self.writers.as_mut() else {
            return Ok(());
        };
        w.probe_custom(&mut self.ebpf)?;
        if self.pids.is_empty() || self.follow_forks {
            w.probe_installed(&mut self.ebpf);
        }
        for &pid in &self.pids {
            w.probe_process(&mut self.ebpf, pid);
        }
        notes.push(w.describe());
        notes.append(&mut w.notes);
        self.attach_writers_off_cpu(notes);
        Ok(())
    }

    /// Off-CPU time inside grace periods needs sched_switch, which the breakdown attaches only
    /// where fentry on synchronize_rcu is refused: else attach a writers-only program, once a
    /// grace-period function is probed (until then it would cost every context switch for
    /// nothing).
    fn attach_writers_off_cpu(&mut self, notes: &mut Vec<String>) {
        let probed = self.writers.as_ref().is_some_and(|w| !w.funcs.is_empty());
        if !self.breakdown
            || self.writers_off_cpu
            || !probed
            || self.grace_source == GraceSource::Sched
        {
            return;
        }
        self.writers_off_cpu = true;
        if let Err(e) = self.attach_all(SCHED_SWITCH_WRITERS) {
            notes.push(format!("no off-CPU time inside grace periods: {e:#}"));
        }
    }

    /// Probes what the traced processes mapped since the last look (dlopen, a `-- COMMAND`'s
    /// children, an executable with liburcu linked in). Returns notes for the user.
    pub fn probe_new_mappings(&mut self, pids: impl IntoIterator<Item = u32>) -> Vec<String> {
        let Some(w) = self.writers.as_mut() else {
            return Vec::new();
        };
        let before = w.funcs.len();
        for pid in pids {
            w.probe_process(&mut self.ebpf, pid);
        }
        let mut notes = std::mem::take(&mut w.notes);
        if w.funcs.len() > before {
            notes.push(w.describe());
        }
        self.attach_writers_off_cpu(&mut notes);
        notes
    }

    /// Probes the grace-period functions in one file (a command's executable before it runs).
    pub fn probe_file(&mut self, path: &Path) {
        if let Some(w) = self.writers.as_mut() {
            w.probe_file(&mut self.ebpf, path);
        }
    }

    /// The traced processes alive now, by the kernel's table (with a filter: `--pid`s, the
    /// command and its children).
    pub fn traced_pids(&self) -> Vec<u32> {
        self.procs
            .iter()
            .filter_map(|e| e.ok())
            .filter(|(_, p)| p.traced != 0)
            .map(|(pid, _)| pid)
            .collect()
    }

    /// The first hook of `--attach`'s candidates that the kernel allows; a note for each one
    /// passed over on the way.
    fn attach_hook(&mut self, notes: &mut Vec<String>) -> Result<&'static Hook> {
        let rt = preflight::preempt_rt();
        let candidates = self.attach_mode.candidates(rt);
        if rt && self.attach_mode == AttachMode::Auto {
            notes.push(
                "PREEMPT_RT kernel: the syscall tracepoints first (fentry programs are \
                 preemptible there, and the kernel skips runs that overlap on a CPU)"
                    .into(),
            );
        }
        let mut refused = Vec::new();
        for &hook in &candidates {
            match self.attach_all(&Probe::pair(hook, self.hook_floor)) {
                Ok(()) => {
                    notes.extend(
                        refused
                            .into_iter()
                            .map(|why| format!("{why}: using {}", hook.describe)),
                    );
                    return Ok(hook);
                }
                Err(e) => refused.push(format!("{e:#}")),
            }
        }
        let refused = refused.join("; ");
        match candidates.as_slice() {
            [only] => anyhow::bail!(
                "--attach {}: {refused}; use --attach auto to fall back to another hook",
                only.attach.name()
            ),
            _ => anyhow::bail!("no hook on membarrier works on this kernel: {refused}"),
        }
    }

    /// How often the kernel skipped the attached programs: (the hook's, the others').
    fn runs_skipped(&self) -> Result<(u64, u64)> {
        let (mut hook, mut probes) = (0, 0);
        for (name, p) in self.ebpf.programs() {
            // Loaded: attached (a program that failed to attach is unloaded again).
            if p.fd().is_ok() {
                let n = recursion_misses(p)?;
                if name == self.hook.enter || name == self.hook.exit {
                    hook += n;
                } else {
                    probes += n;
                }
            }
        }
        Ok((hook, probes))
    }

    /// Detaches and unloads every program: tracing stops, the maps stay readable.
    pub fn detach(&mut self) {
        // Each detach waits in the kernel for a grace period (RCU-tasks for fentry, tasks-trace
        // for tracepoints on recent 6.1 kernels): seconds each on PREEMPT_RT under load. From
        // a thread per program the waits overlap instead of adding up.
        std::thread::scope(|s| {
            for (_, p) in self.ebpf.programs_mut() {
                s.spawn(move || unload_program(p));
            }
        });
    }

    pub fn attach_source(&self) -> Attach {
        self.hook.attach
    }

    fn counter(&self, idx: u32) -> Result<u64> {
        Ok(self.counters.get(&idx, 0)?.iter().sum())
    }

    /// Whether process `p` is still alive. One created while tracing is alive while its entry
    /// in PROCS holds its serial (removed when its last task exits, replaced when its pid is
    /// reused) and its pid exists: an exit the kernel skipped leaves the entry, and its rows
    /// would never be freed. One from before, while no later process has its pid and /proc
    /// has it.
    fn alive(&self, p: ProcKey) -> bool {
        match self.procs.get(&p.0, 0) {
            Ok(entry) if p.1 != 0 || entry.serial != 0 => {
                entry.serial == p.1 && preflight::exists(p.0)
            }
            _ => p.1 == 0 && Path::new(&format!("/proc/{}", p.0)).exists(),
        }
    }

    /// Moves what the kernel maps hold for exited processes into `self.retired`, freeing their
    /// rows for new processes; the process is gone, nothing adds to its rows any more. Cheap
    /// enough to run several times a second: it reads keys, and the rows of the dead only.
    /// Returns the processes found alive.
    pub fn retire_exited(&mut self) -> Result<HashSet<ProcKey>> {
        // First: every row the kernel moved out is in the ring before its process looks dead
        // (its PROCS entry goes after), so no row of a process read below is in a record read
        // later, and none is both.
        // Where each dead process's figures go: its own entry, or its name's.
        let mut dest: HashMap<ProcKey, ProcKey> = HashMap::new();
        let moved = self.take_moved(&mut dest);
        self.take_summed()?;
        self.moved_in_use = moved.len();
        self.moved += moved.len() as u64;
        let keys: Vec<StatsKey> = self
            .stats
            .keys()
            .collect::<Result<_, _>>()
            .context("reading the stats map")?;
        self.rows_in_use = keys.len();
        let writer_keys: Vec<WriterKey> = self
            .writer_rows
            .keys()
            .collect::<Result<_, _>>()
            .context("reading the writers map")?;
        let (mut live, mut dead) = (HashSet::new(), HashSet::new());
        let procs = keys
            .iter()
            .map(ProcKeyed::proc)
            .chain(writer_keys.iter().map(ProcKeyed::proc));
        for p in procs {
            if !live.contains(&p) && !dead.contains(&p) {
                if self.alive(p) {
                    live.insert(p);
                    // Named once while alive, not only by the snapshot: a report made after
                    // the exit (JSON at the end) has only the name at exit, and its program
                    // is skipped while any map syscall on that CPU holds bpf_prog_active
                    // (another tool's, preempted on PREEMPT_RT): the name fell back to the
                    // first caller's thread name.
                    if !self.comms.contains_key(&p)
                        && let Some(name) = preflight::comm(p.0)
                    {
                        self.comms.insert(p, name);
                    }
                } else {
                    dead.insert(p);
                }
            }
        }
        // After the liveness checks: a process found dead has all its threads' exits in.
        let drained = self.drain_threads()?;
        // `--stacks`: the kernel unwinds from now on what the stacks thread has seen.
        if let (Some(namer), Some(k)) = (&self.callers, &mut self.kstacks) {
            k.teach(namer.learned(), &live);
        }
        // The callers thread finds callers as the kernel reports them, named here; one whose
        // report was lost (a full ring) is asked for, while its process lives.
        if let Some(namer) = &mut self.callers {
            namer.name_found();
            for key in &writer_keys {
                let p = key.proc();
                if live.contains(&p) && !namer.named.contains_key(&(p, key.caller)) {
                    namer.ask(p, key.caller);
                }
            }
        }
        if dead.is_empty() && moved.is_empty() {
            self.threads_in_use = drained;
            return Ok(live);
        }
        for key in keys.iter().filter(|k| dead.contains(&k.proc())) {
            // Gone since the keys were read: the kernel moved it at the exit (it moves a
            // process's rows before its PROCS entry goes, so it is in the next drain).
            let row = match self.stats.get(key, 0) {
                Err(MapError::KeyNotFound) => continue,
                r => r.context("reading a stats row")?,
            };
            match self.stats.remove(key) {
                Err(MapError::KeyNotFound) => continue,
                r => r.context("freeing a stats row")?,
            }
            if row.count == 0 {
                continue;
            }
            let to = key.moved_to(self.place(&mut dest, key.proc(), &row.comm));
            add_retired(&mut self.retired.rows, to, RawRow::from_stats(to, &row));
        }
        for key in writer_keys.iter().filter(|k| dead.contains(&k.proc())) {
            let row = self
                .writer_rows
                .get(key, 0)
                .context("reading a writers row")?;
            self.writer_rows
                .remove(key)
                .context("freeing a writers row")?;
            if row.count == 0 {
                continue;
            }
            let p = key.proc();
            let to = self.place(&mut dest, p, &row.comm);
            if let Some(namer) = &mut self.callers
                && let Some(c) = namer.named.remove(&(p, key.caller))
            {
                namer.named.insert((to, key.caller), c);
            }
            let to = key.moved_to(to);
            add_retired(
                &mut self.retired.writers,
                to,
                WriterRow::from_stats(to, &row),
            );
        }
        // The processes whose rows the kernel moved go with the dead from here (their rows
        // are retired already; a row read above belonged to a process still alive then).
        dead.extend(moved);
        if let Some(namer) = &mut self.callers {
            // The kernel's stacks of the dead join the samples' first, each under its own
            // process, and are summed with them.
            if let (Some(k), Some(stacks)) = (&mut self.kstacks, &namer.stacks) {
                k.retire(&dead, &mut stacks.lock().unwrap())?;
            }
            namer.retire(&dest);
        }
        let r = &mut self.retired;
        retire_detail(&mut self.ipi_cpus, &mut r.ipi_cpus, &dead, &dest)?;
        retire_detail(&mut self.wakers, &mut r.wakers, &dead, &dest)?;
        retire_detail(&mut self.handled, &mut r.handled, &dead, &dest)?;
        for p in &dead {
            if let Some(t) = self.exited_threads.remove(p) {
                let to = dest.get(p).copied().unwrap_or(*p);
                self.exited_threads
                    .entry(to)
                    .or_default()
                    .absorb(t, to, to == *p);
            }
        }
        self.comms.retain(|p, _| !dead.contains(p));
        self.threads_in_use = drained;
        let demoted = self.retired.keep_most();
        self.demote(&demoted);
        Ok(live)
    }

    /// What is kept outside `self.retired` of exited processes [`Retired::keep_most`] summed
    /// into their name's entry follows them there: their threads (summed), the names of their
    /// grace periods' callers, their stacks (unattributed: addresses are a process's own).
    fn demote(&mut self, demoted: &HashMap<ProcKey, ProcKey>) {
        if demoted.is_empty() {
            return;
        }
        for (p, &to) in demoted {
            if let Some(t) = self.exited_threads.remove(p) {
                self.exited_threads
                    .entry(to)
                    .or_default()
                    .absorb(t, to, false);
            }
        }
        if let Some(namer) = &mut self.callers {
            let named: Vec<_> = namer
                .named
                .keys()
                .filter(|(p, _)| demoted.contains_key(p))
                .copied()
                .collect();
            for (p, caller) in named {
                if let Some(c) = namer.named.remove(&(p, caller)) {
                    namer.named.insert((demoted[&p], caller), c);
                }
            }
            namer.retire(demoted);
        }
    }

    /// Takes in the exited processes whose rows the kernel sent on `EXITED`: each placed like
    /// any exited process (`dest`), named as it exited where that was seen, its rows retired.
    /// Returns them, to be retired with the dead (threads, details, names).
    fn take_moved(&mut self, dest: &mut HashMap<ProcKey, ProcKey>) -> HashSet<ProcKey> {
        let mut procs = HashSet::new();
        for m in self.exited_rows.take() {
            let p = (m.tgid, m.serial);
            let at_exit = (m.named_at_exit != 0).then_some(m.comm);
            let to = self.place_named(dest, p, at_exit, &m.comm);
            for r in &m.row[..(m.rows as usize).min(MOVED_ROWS)] {
                let key = StatsKey {
                    tgid: to.0,
                    serial: to.1,
                    cmd: r.cmd,
                    flags: r.flags,
                    errno: r.errno,
                };
                add_retired(&mut self.retired.rows, key, RawRow::from_moved(key, r));
            }
            procs.insert(p);
        }
        procs
    }

    /// Takes in what the kernel summed by name since the last pass (it sums, at their exit, the
    /// rows of processes it could not send on a full `EXITED`): into each name's entry, with
    /// the processes counted there. Read before `STATS`, like the ring: a process summed later
    /// has no row left there.
    fn take_summed(&mut self) -> Result<()> {
        let entries: Vec<(SummedKey, SummedRow)> = self
            .summed
            .iter()
            .collect::<Result<_, _>>()
            .context("reading the summed map")?;
        for (k, cur) in entries {
            let new = match self.summed_seen.insert(k, cur) {
                Some(seen) => cur.since(&seen),
                None => cur,
            };
            if new.count == 0 && new.procs == 0 {
                continue;
            }
            let to = self.retired.name_entry(comm_str(&k.comm));
            *self.retired.exited.entry(to).or_default() += new.procs;
            let key = StatsKey {
                tgid: to.0,
                serial: to.1,
                cmd: k.cmd,
                flags: k.flags,
                errno: k.errno,
            };
            add_retired(&mut self.retired.rows, key, RawRow::from_summed(key, &new));
            // The kernel sums a process only when its last thread made all its calls and
            // sent no row of its own: one thread per process, summed with the name's others.
            let mut calls = [0; THREAD_CMDS];
            calls[thread_cmd(k.cmd, k.flags)] = new.count;
            self.exited_threads.entry(to).or_default().sum(ThreadRow {
                proc: to,
                tid: 0,
                name: String::new(),
                calls,
                threads: new.procs,
            });
        }
        Ok(())
    }

    /// Moves the exited threads' calls out of the kernel: those sent on the ring, and those
    /// put in `THREADS` when it was full. Returns how many `THREADS` held.
    fn drain_threads(&mut self) -> Result<usize> {
        let entries: Vec<(ThreadKey, ThreadCalls)> = self
            .thread_rows
            .iter()
            .collect::<Result<_, _>>()
            .context("reading the threads map")?;
        for (k, _) in &entries {
            let _ = self.thread_rows.remove(k);
        }
        let held = entries.len();
        let sent = self.exited_rows.take_threads().into_iter();
        for (k, t) in entries.into_iter().chain(sent.map(|t| (t.key, t.calls))) {
            let p = (k.tgid, k.serial);
            self.exited_threads.entry(p).or_default().add(ThreadRow {
                proc: p,
                tid: k.tid,
                name: comm_str(&t.comm),
                calls: t.calls,
                threads: 1,
            });
        }
        Ok(held)
    }

    /// One pass over the in-flight slots: the calls of the threads of processes in `live`, and
    /// how many calls and grace periods are under way now.
    fn read_slots(&self, live: &HashSet<ProcKey>) -> Result<(Vec<ThreadRow>, u64, u64)> {
        let (mut threads, mut calls, mut grace_periods) = (Vec::new(), 0, 0);
        for item in self.inflight.iter() {
            let (tid, slot) = item.context("reading the in-flight map")?;
            calls += u64::from(slot.start_ns != 0);
            grace_periods += u64::from(slot.writer.depth != 0);
            let p = (slot.tgid, slot.serial);
            if live.contains(&p) && slot.thread.calls.iter().any(|&n| n > 0) {
                threads.push(ThreadRow {
                    proc: p,
                    tid,
                    name: comm_str(&slot.thread.comm),
                    calls: slot.thread.calls,
                    threads: 1,
                });
            }
        }
        Ok((threads, calls, grace_periods))
    }

    /// The retired entry exited process `p`'s figures go to, found once per pass (`dest`). It
    /// is named as it exited, else as last seen alive, else `comm` (its row's first caller).
    fn place(
        &mut self,
        dest: &mut HashMap<ProcKey, ProcKey>,
        p: ProcKey,
        comm: &[u8; COMM_LEN],
    ) -> ProcKey {
        if let Some(to) = dest.get(&p) {
            return *to;
        }
        let id = proc_id(p.0, p.1);
        let at_exit = self.exit_names.get(&id, 0).ok();
        let _ = self.exit_names.remove(&id);
        self.place_named(dest, p, at_exit, comm)
    }

    /// [`Collector::place`] with its name at exit already known (or known to be missing).
    fn place_named(
        &mut self,
        dest: &mut HashMap<ProcKey, ProcKey>,
        p: ProcKey,
        at_exit: Option<[u8; COMM_LEN]>,
        comm: &[u8; COMM_LEN],
    ) -> ProcKey {
        if let Some(to) = dest.get(&p) {
            return *to;
        }
        let name = at_exit
            .map(|c| comm_str(&c))
            .or_else(|| self.comms.remove(&p))
            .unwrap_or_else(|| comm_str(comm));
        let to = self.retired.place(p, name);
        dest.insert(p, to);
        to
    }

    /// Whether the stats map was over a quarter full at the last retire pass: processes are
    /// coming and going fast (thousands a second), and the next pass should come sooner.
    pub fn rows_filling(&self) -> bool {
        self.rows_in_use * 4 > self.maps.stats_rows as usize
            || self.threads_in_use * 4 > MAX_THREADS as usize
            || self.moved_in_use > 1000
    }

    /// Reads the kernel's totals. With `last`, calls still inside membarrier are counted as
    /// missed: tracing stops before they return.
    pub fn snapshot(&mut self, last: bool) -> Result<Snapshot> {
        if last {
            // Nothing more is counted (calls under way stay open: counted as missed), and every
            // stack sent is taken in: the final figures add up, stacks and calls alike.
            self.control
                .set(0, 0, 0)
                .context("disarming the eBPF programs")?;
            if let Some(n) = &self.callers {
                n.flush();
            }
        }
        let elapsed_ns = self.started.elapsed().as_nanos() as u64;
        let live = self.retire_exited()?;
        let mut rows = Vec::new();
        let mut named = HashSet::new();
        for item in self.stats.iter() {
            let (key, s) = item.context("reading the stats map")?;
            // A row is created just before its first call is counted into it.
            if s.count == 0 {
                continue;
            }
            // Live processes are named by /proc, afresh each time (exec and PR_SET_NAME rename
            // them: the main thread's comm); else by the comm of the thread that made the
            // first call.
            let p = (key.tgid, key.serial);
            if named.insert(p) {
                let name = preflight::comm(key.tgid)
                    .filter(|_| live.contains(&p))
                    .unwrap_or_else(|| comm_str(&s.comm));
                self.comms.insert(p, name);
            }
            rows.push(RawRow::from_stats(key, &s));
        }
        // Every lost call once, by cause. An enter that got no slot leaves an exit without
        // one too: those are counted as dropped, not missed. A skipped exit program leaves
        // its slot open, found at the thread's next call or exit (the kernel's own count of
        // skipped runs would also count untraced processes' calls).
        let no_slot = self.counter(counter::DROPPED_INFLIGHT)?;
        let mut missed = self
            .counter(counter::EXIT_WITHOUT_SLOT)?
            .saturating_sub(no_slot)
            + self.counter(counter::EXIT_SKIPPED)?;
        let mut missed_grace_periods = self.counter(counter::MISSED_WRITERS)?;
        let (mut threads, open_calls, open_grace_periods) = self.read_slots(&live)?;
        if last {
            // Calls and grace periods still under way: tracing stops before they return.
            missed += open_calls;
            missed_grace_periods += open_grace_periods;
        }
        for t in self.exited_threads.values() {
            threads.extend(t.by_tid.values().chain(&t.others).cloned());
        }
        let mut writers = Vec::new();
        for item in self.writer_rows.iter() {
            let (key, s) = item.context("reading the writers map")?;
            let p = key.proc();
            if s.count == 0 {
                continue;
            }
            // A process that has rows here only (qsbr makes no membarrier calls) is named too.
            if !named.contains(&p) && live.contains(&p) {
                named.insert(p);
                if let Some(name) = preflight::comm(key.tgid) {
                    self.comms.insert(p, name);
                }
            }
            writers.push(WriterRow::from_stats(key, &s));
        }
        writers.extend(self.retired.writers.values().cloned());
        let (hook_runs_skipped, probe_runs_skipped) = self.runs_skipped()?;
        let losses = Losses {
            missed_calls: missed,
            missed_grace_periods,
            grace_periods_without_row: self.counter(counter::DROPPED_WRITERS)?,
            callers_unreported: self.counter(counter::CALLERS_UNSENT)?,
            calls_without_row: self.counter(counter::DROPPED_STATS)?,
            calls_without_inflight_slot: no_slot,
            processes_not_tracked: self.counter(counter::DROPPED_PROCS)?,
            detail_rows: self.counter(counter::DROPPED_DETAIL)?,
            unwind_rules: self.kstacks.as_ref().map_or(0, |k| k.rules_dropped),
            probe_runs_skipped,
            hook_runs_skipped,
        };
        let mut ipi_cpus: Vec<(CpuKey, u64)> = self.ipi_cpus.iter().collect::<Result<_, _>>()?;
        let mut wakers: Vec<(WakerKey, u64)> = self.wakers.iter().collect::<Result<_, _>>()?;
        let mut handled: Vec<(HandlerKey, Handled)> =
            self.handled.iter().collect::<Result<_, _>>()?;
        rows.extend(self.retired.rows.values().cloned());
        ipi_cpus.extend(self.retired.ipi_cpus.iter().map(|(k, v)| (*k, *v)));
        wakers.extend(self.retired.wakers.iter().map(|(k, v)| (*k, *v)));
        handled.extend(self.retired.handled.iter().map(|(k, v)| (*k, *v)));
        let mut comms = self.comms.clone();
        comms.extend(self.retired.comms.iter().map(|(k, v)| (*k, v.clone())));
        Ok(Snapshot {
            elapsed_ns,
            rows,
            losses,
            comms,
            exited: self.retired.exited.clone(),
            ipi_cpus,
            wakers,
            handled,
            grace_period_source: self.grace_source,
            attach: self.hook.attach,
            maps: self.maps,
            exited_rows: ExitedRows {
                moved_at_exit: self.moved,
                ring_full: self.counter(counter::EXITED_RING_FULL)?,
                summed_by_name: self.counter(counter::EXITED_SUMMED)?,
                kept_whole: self.counter(counter::EXITED_KEPT)?,
            },
            writers,
            gp_funcs: self
                .writers
                .as_ref()
                .map(|w| w.funcs.clone())
                .unwrap_or_default(),
            callers: self
                .callers
                .as_ref()
                .map(|n| n.named.clone())
                .unwrap_or_default(),
            stacks: self
                .callers
                .as_ref()
                .and_then(|n| n.stacks.as_ref())
                .zip(self.kstacks.as_ref())
                .map(|(s, k)| k.with_live(s.lock().unwrap().clone()))
                .transpose()?,
            threads,
        })
    }
}

/// Exited processes kept individually in the tracer's memory: those that matter most, half
/// chosen by calls and half by time in the call; the others are summed per name.
pub const RETIRED_KEEP: usize = 1024;
/// Names summed apart; the rest go into one `(other)` entry.
pub const RETIRED_NAMES: usize = 1024;

/// What the kernel maps held for processes that have exited, moved to userspace. Each keeps
/// its own rows as it comes; past [`RETIRED_KEEP`], [`Retired::keep_most`] sums the ones that
/// matter least into an entry per name (tgid 0, serial numbering the names), so memory stays
/// bounded however many processes come and go, the busiest keep their identity whenever they
/// exit, and every call stays counted.
#[derive(Default)]
struct Retired {
    rows: HashMap<StatsKey, RawRow>,
    ipi_cpus: HashMap<CpuKey, u64>,
    wakers: HashMap<WakerKey, u64>,
    handled: HashMap<HandlerKey, Handled>,
    /// Processes each entry stands for.
    exited: HashMap<ProcKey, u64>,
    comms: HashMap<ProcKey, String>,
    by_name: HashMap<String, ProcKey>,
    writers: HashMap<WriterKey, WriterRow>,
}

impl Retired {
    /// Counts exited process `p`, named `comm`, and returns the entry its figures go to: its
    /// own, until [`Retired::keep_most`] says otherwise.
    fn place(&mut self, p: ProcKey, comm: String) -> ProcKey {
        self.comms.insert(p, comm);
        *self.exited.entry(p).or_default() += 1;
        p
    }

    /// The entry summing the exited processes named `name` (past [`RETIRED_NAMES`] names,
    /// `(other)`).
    fn name_entry(&mut self, name: String) -> ProcKey {
        let name = if self.by_name.len() < RETIRED_NAMES || self.by_name.contains_key(&name) {
            name
        } else {
            "(other)".to_string()
        };
        let next = (0, self.by_name.len() as u32 + 1);
        let to = *self.by_name.entry(name.clone()).or_insert(next);
        self.comms.insert(to, name);
        to
    }

    /// Keeps [`RETIRED_KEEP`] exited processes individually: taken in turn from the most calls
    /// down and from the most time in the call down (ties: the lower pid), so both a busy
    /// caller and a slow one keep their identity. Sums the others into their name's entry and
    /// returns where each went, for what is kept outside (threads, callers, stacks).
    fn keep_most(&mut self) -> HashMap<ProcKey, ProcKey> {
        let singles: Vec<ProcKey> = self.exited.keys().filter(|p| p.0 != 0).copied().collect();
        if singles.len() <= RETIRED_KEEP {
            return HashMap::new();
        }
        let mut weight: HashMap<ProcKey, (u64, u64)> =
            singles.iter().map(|&p| (p, (0, 0))).collect();
        for (k, r) in &self.rows {
            if let Some(w) = weight.get_mut(&k.proc()) {
                w.0 += r.count;
                w.1 += r.sum_ns;
            }
        }
        let ranked = |by: fn(&(u64, u64)) -> u64| {
            let mut v = singles.clone();
            v.sort_unstable_by_key(|p| (std::cmp::Reverse(by(&weight[p])), *p));
            v
        };
        let (by_calls, by_time) = (ranked(|w| w.0), ranked(|w| w.1));
        let mut keep = HashSet::new();
        for (c, t) in by_calls.iter().zip(&by_time) {
            for p in [c, t] {
                if keep.len() < RETIRED_KEEP {
                    keep.insert(*p);
                }
            }
        }
        let mut demoted = HashMap::new();
        for p in singles.into_iter().filter(|p| !keep.contains(p)) {
            let name = self.comms.remove(&p).unwrap_or_default();
            let to = self.name_entry(name);
            let n = self.exited.remove(&p).unwrap_or(0);
            *self.exited.entry(to).or_default() += n;
            demoted.insert(p, to);
        }
        rekey(&mut self.rows, &demoted, |m, k, r| {
            add_retired(m, k, RawRow { key: k, ..r })
        });
        rekey(&mut self.writers, &demoted, |m, k, r| {
            add_retired(m, k, WriterRow { key: k, ..r })
        });
        rekey(&mut self.ipi_cpus, &demoted, sum_into);
        rekey(&mut self.wakers, &demoted, sum_into);
        rekey(&mut self.handled, &demoted, sum_into);
        demoted
    }
}

/// Moves the entries of the processes in `to` under their new entry, where `put` adds them.
fn rekey<K: ProcKeyed + Eq + std::hash::Hash, V>(
    map: &mut HashMap<K, V>,
    to: &HashMap<ProcKey, ProcKey>,
    put: impl Fn(&mut HashMap<K, V>, K, V),
) {
    let moved: Vec<K> = map
        .keys()
        .filter(|k| to.contains_key(&k.proc()))
        .copied()
        .collect();
    for k in moved {
        let v = map.remove(&k).expect("listed above");
        put(map, k.moved_to(to[&k.proc()]), v);
    }
}

/// [`rekey`]'s `put` for the detail maps, whose values add.
fn sum_into<K: Eq + std::hash::Hash, V: Default + std::ops::AddAssign>(
    map: &mut HashMap<K, V>,
    k: K,
    v: V,
) {
    *map.entry(k).or_default() += v;
}

/// Exited threads of a process kept one by one; later ones are summed.
pub const THREADS_KEEP: usize = 32;

/// A process's exited threads: the first [`THREADS_KEEP`] by tid, the rest summed (tid 0), so
/// a process that starts threads all day costs bounded memory and every call stays counted.
#[derive(Default)]
struct ExitedThreads {
    by_tid: HashMap<u32, ThreadRow>,
    others: Option<ThreadRow>,
}

impl ExitedThreads {
    fn add(&mut self, t: ThreadRow) {
        if let Some(have) = self.by_tid.get_mut(&t.tid) {
            // A tid used again by a later thread of the process.
            have.absorb(&t);
            have.name = t.name;
        } else if self.by_tid.len() < THREADS_KEEP {
            self.by_tid.insert(t.tid, t);
        } else {
            self.sum(t);
        }
    }

    fn sum(&mut self, t: ThreadRow) {
        match &mut self.others {
            Some(o) => o.absorb(&t),
            None => {
                self.others = Some(ThreadRow {
                    tid: 0,
                    name: "(exited threads)".into(),
                    ..t
                })
            }
        }
    }

    /// Takes in the threads of an exited process: one by one when it keeps its own entry
    /// (`own`), else all summed (an entry summing processes of a name).
    fn absorb(&mut self, from: ExitedThreads, to: ProcKey, own: bool) {
        for t in from.by_tid.into_values().chain(from.others) {
            let t = ThreadRow { proc: to, ..t };
            if own {
                self.add(t);
            } else {
                self.sum(t);
            }
        }
    }
}

/// Adds `r`, already keyed by the entry [`Retired::place`] gave, to the retired rows.
fn add_retired<K: Eq + std::hash::Hash, R: Absorb>(rows: &mut HashMap<K, R>, key: K, r: R) {
    match rows.entry(key) {
        std::collections::hash_map::Entry::Occupied(mut e) => e.get_mut().absorb(&r),
        std::collections::hash_map::Entry::Vacant(e) => {
            e.insert(r);
        }
    }
}

/// The keys of the kernel maps that name a process by (tgid, serial).
trait ProcKeyed: Copy {
    fn proc(&self) -> ProcKey;
    /// The same key for process `p`.
    fn moved_to(self, p: ProcKey) -> Self;
}

macro_rules! proc_keyed {
    ($($t:ty),*) => {$(
        impl ProcKeyed for $t {
            fn proc(&self) -> ProcKey {
                (self.tgid, self.serial)
            }
            fn moved_to(self, p: ProcKey) -> Self {
                Self { tgid: p.0, serial: p.1, ..self }
            }
        }
    )*};
}
proc_keyed!(StatsKey, CpuKey, WakerKey, HandlerKey, WriterKey);

/// Moves the entries of `dead` processes from a kernel detail map into `into`, under the entry
/// each went to (`dest`; itself when it had no stats row).
fn retire_detail<K, V>(
    map: &mut BpfHashMap<MapData, K, V>,
    into: &mut HashMap<K, V>,
    dead: &HashSet<ProcKey>,
    dest: &HashMap<ProcKey, ProcKey>,
) -> Result<()>
where
    K: ProcKeyed + aya::Pod + Eq + std::hash::Hash,
    V: aya::Pod + Default + std::ops::AddAssign,
{
    let entries: Vec<(K, V)> = map.iter().collect::<Result<_, _>>()?;
    for (k, n) in entries {
        let p = k.proc();
        if dead.contains(&p) {
            let _ = map.remove(&k);
            sum_into(into, k.moved_to(dest.get(&p).copied().unwrap_or(p)), n);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The figures docs/design.md gives for its development machine.
    #[test]
    fn map_sizes_and_memory_match_the_design_doc() {
        assert_eq!(
            std::mem::size_of::<Stats>(),
            8808,
            "the row size in the doc"
        );
        let s = MapSizes::new(24 << 30, 192_000, 32768);
        assert_eq!(
            s,
            MapSizes {
                stats: 2925,
                inflight: 65536,
                procs: 32768
            }
        );
        // "about 56.8 MiB", "under 62 MiB in all"
        assert_eq!(
            (s.kernel_bytes(2) as f64 / f64::from(1 << 20) * 10.0).round(),
            568.0
        );
        assert_eq!(s.kernel_bytes_bound(2) >> 20, 61);
        // The clamps: a small VM still gets the defaults, a huge box no more than the maxima.
        let small = MapSizes::new(512 << 20, 4000, 4000);
        assert_eq!(
            (small.stats, small.inflight, small.procs),
            (1024, 16384, 16384)
        );
        let huge = MapSizes::new(4 << 40, 4 << 20, 4 << 20);
        assert_eq!(
            (huge.stats, huge.inflight, huge.procs),
            (8192, 65536, 65536)
        );
    }

    fn row(tgid: u32, serial: u32, calls: u64) -> RawRow {
        RawRow {
            count: calls,
            ..RawRow::new(StatsKey {
                tgid,
                serial,
                cmd: 0,
                flags: 0,
                errno: 0,
            })
        }
    }

    fn thread(tid: u32, calls: u64) -> ThreadRow {
        let mut c = [0; membarrier_trace_common::THREAD_CMDS];
        c[0] = calls;
        ThreadRow {
            proc: (7, 1),
            tid,
            name: format!("t{tid}"),
            calls: c,
            threads: 1,
        }
    }

    /// A process's exited threads: the first THREADS_KEEP by tid, the rest summed; a tid used
    /// again adds to its entry; summed into a per-name entry, all of them are summed.
    #[test]
    fn exited_threads_are_kept_then_summed() {
        let mut t = ExitedThreads::default();
        for tid in 1..=100 {
            t.add(thread(tid, 2));
        }
        t.add(thread(1, 3));
        assert_eq!(t.by_tid.len(), THREADS_KEEP);
        assert_eq!((t.by_tid[&1].calls[0], t.by_tid[&1].threads), (5, 2));
        let o = t.others.as_ref().unwrap();
        assert_eq!((o.tid, o.threads, o.calls[0]), (0, 68, 136));
        let mut per_name = ExitedThreads::default();
        per_name.absorb(t, (0, 3), false);
        assert!(per_name.by_tid.is_empty());
        let o = per_name.others.unwrap();
        assert_eq!(
            (o.proc, o.tid, o.threads, o.calls[0]),
            ((0, 3), 0, 101, 203)
        );
    }

    /// Past RETIRED_KEEP, exited processes are summed per name, then under `(other)`: the
    /// tracer's memory stays bounded and no call or process goes uncounted. Those kept are the
    /// ones with the most calls and the most time in the call, half each, whenever they exited.
    #[test]
    fn retired_processes_are_kept_then_summed_per_name() {
        let mut r = Retired::default();
        let n = RETIRED_KEEP + RETIRED_NAMES + 50;
        // Process i: 2 + i calls, (n - i) ms in the call: the late ones call most, the early
        // ones spend the most time in the call.
        let calls = |i: u32| 2 + u64::from(i);
        let ns = |i: u32| (n as u64 - u64::from(i)) * 1_000_000;
        let mut demoted = 0;
        for i in 0..n as u32 {
            let p = (i + 1, i + 1);
            let to = r.place(p, format!("p{}", i % (RETIRED_NAMES as u32 + 10)));
            assert_eq!(to, p);
            let one = RawRow {
                sum_ns: ns(i),
                ..row(i + 1, i + 1, calls(i))
            };
            add_retired(&mut r.rows, one.key, one);
            if i % 700 == 0 {
                demoted += r.keep_most().len();
            }
        }
        demoted += r.keep_most().len();
        assert_eq!(demoted + RETIRED_KEEP, n);
        let singles: HashSet<ProcKey> = r.exited.keys().filter(|p| p.0 != 0).copied().collect();
        assert_eq!(singles.len(), RETIRED_KEEP);
        // Half the most calls (the last processes), half the most time (the first).
        let half = RETIRED_KEEP as u32 / 2;
        for i in (0..half).chain(n as u32 - half..n as u32) {
            assert!(singles.contains(&(i + 1, i + 1)), "process {i} was summed");
        }
        assert_eq!(r.exited.values().sum::<u64>(), n as u64);
        let total: u64 = (0..n as u32).map(calls).sum();
        assert_eq!(r.rows.values().map(|r| r.count).sum::<u64>(), total);
        let total_ns: u64 = (0..n as u32).map(ns).sum();
        assert_eq!(r.rows.values().map(|r| r.sum_ns).sum::<u64>(), total_ns);
        // Every row under its entry's key.
        assert!(r.rows.iter().all(|(k, row)| row.key == *k));
        assert!(
            r.rows.len() <= RETIRED_KEEP + RETIRED_NAMES + 1,
            "{}",
            r.rows.len()
        );
        assert!(r.comms.values().any(|c| c == "(other)"));
        // A summed entry is named and counts its processes.
        let other = r.comms.iter().find(|(_, c)| *c == "(other)").unwrap().0;
        assert_eq!(other.0, 0);
        assert!(r.exited[other] >= 1);
    }
}
