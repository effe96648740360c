//! Loads the eBPF programs, attaches them, and reads the kernel's aggregates into a
//! [`Snapshot`].

use std::{collections::HashMap, path::Path, time::Instant};

use anyhow::{Context as _, Result};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray},
    programs::{FEntry, FExit, Program, ProgramError, TracePoint},
};
use membarrier_trace_common::{
    CallKey, CpuKey, Inflight, Stats, StatsKey, WakerKey, counter, field,
};

use crate::{
    hist::Histogram,
    hook::{Attach, AttachMode, Hook, Kind},
    model::{GraceSource, RawRow, Snapshot, comm_str},
    preflight,
};

static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("MEMBARRIER_TRACE_EBPF_OBJECT"));

/// What to trace.
pub struct Options {
    /// Only these tgids (filtered in the kernel); empty with `follow_forks` off means everything.
    pub pids: Vec<u32>,
    /// Also trace every process a traced process forks (for `-- COMMAND`).
    pub follow_forks: bool,
    /// Attach the breakdown probes (grace period, IPIs, handler time, mutex wait).
    pub breakdown: bool,
    pub attach: AttachMode,
}

pub struct Collector {
    // Owns the programs; dropping it detaches them.
    ebpf: Ebpf,
    stats: BpfHashMap<MapData, StatsKey, Stats>,
    counters: PerCpuArray<MapData, u64>,
    inflight: BpfHashMap<MapData, u32, Inflight>,
    tgids: BpfHashMap<MapData, u32, u8>,
    control: Array<MapData, u32>,
    ipi_cpus: BpfHashMap<MapData, CpuKey, u64>,
    wakers: BpfHashMap<MapData, WakerKey, u64>,
    handler_ns: BpfHashMap<MapData, CallKey, u64>,
    comms: HashMap<u32, String>,
    started: Instant,
    tracefs: std::path::PathBuf,
    /// The kernel's BTF, read on the first fentry attach.
    btf: Option<aya::Btf>,
    grace_source: GraceSource,
    breakdown: bool,
    attach_mode: AttachMode,
    /// The row of the hook table that is attached.
    hook: &'static Hook,
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
        fields: Fields,
    },
    /// fentry, or with `exit` fexit, on a kernel function.
    Btf { func: &'static str, exit: bool },
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
    fn pair(hook: &'static Hook) -> [Probe; 2] {
        match hook.kind {
            Kind::Tracepoint {
                category,
                enter_fields,
                exit_fields,
            } => [
                Probe {
                    prog: hook.exit,
                    at: At::Tracepoint {
                        category,
                        fields: Fields::Fixed(exit_fields),
                    },
                },
                Probe {
                    prog: hook.enter,
                    at: At::Tracepoint {
                        category,
                        fields: Fields::Fixed(enter_fields),
                    },
                },
            ],
            Kind::Fentry { func } => [
                Probe::fexit(hook.exit, func),
                Probe::fentry(hook.enter, func),
            ],
        }
    }
}

/// The grace period where fentry on synchronize_rcu is refused: off-CPU time inside the call.
const SCHED_SWITCH: &[Probe] = &[Probe::tp(
    "sched",
    "sched_switch",
    &[("next_pid", field::SCHED_SWITCH_NEXT_PID)],
)];

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
                    "ipi",
                    "ipi_send_cpu",
                    &[
                        ("cpu", field::IPI_SEND_CPU_CPU),
                        ("callback", field::IPI_SEND_CPU_CALLBACK),
                    ],
                ),
                Probe::tp(
                    "ipi",
                    "ipi_send_cpumask",
                    &[
                        ("cpumask", field::IPI_SEND_CPUMASK_CPUMASK),
                        ("callback", field::IPI_SEND_CPUMASK_CALLBACK),
                    ],
                ),
                Probe::tp(
                    "csd",
                    "csd_queue_cpu",
                    &[
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
        .chain(SCHED_SWITCH);
    for p in probes {
        if let At::Tracepoint {
            category,
            fields: Fields::Loaded(fields),
        } = p.at
        {
            for &(name, idx) in fields {
                if let Ok(off) = preflight::field_offset(tracefs, category, p.prog, name) {
                    out[idx] = off;
                }
            }
        }
    }
    out
}

/// Addresses of membarrier's IPI callbacks, from /proc/kallsyms (0 where not found or hidden).
fn ipi_funcs() -> [u64; 3] {
    let syms = std::fs::read_to_string("/proc/kallsyms").unwrap_or_default();
    let mut out = [0u64; 3];
    for line in syms.lines() {
        let mut parts = line.split_whitespace();
        let (Some(addr), Some(_), Some(name)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let i = match name {
            "ipi_mb" => 0,
            "ipi_sync_core" => 1,
            "ipi_rseq" => 2,
            _ => continue,
        };
        out[i] = u64::from_str_radix(addr, 16).unwrap_or(0);
    }
    // One missing (or all hidden by kptr_restrict) would drop that callback's time: then
    // measure every csd queued from inside membarrier instead.
    if out.contains(&0) { [0; 3] } else { out }
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
        At::Tracepoint { category, fields } => {
            check_layout(tracefs, category, p.prog, fields)?;
            let tp: &mut TracePoint = prog.try_into()?;
            tp.load().map_err(|e| load_error(p.prog, e))?;
            tp.attach(category, p.prog)
                .with_context(|| format!("attaching to {category}:{}", p.prog))?;
        }
        At::Btf { func, exit } => {
            if btf.is_none() {
                *btf = Some(aya::Btf::from_sys_fs().context("fentry needs the kernel's BTF")?);
            }
            let btf = btf.as_ref().expect("read above");
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
    Ok(())
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
    let _ = match ebpf.program_mut(prog) {
        Some(Program::TracePoint(p)) => p.unload(),
        Some(Program::FEntry(p)) => p.unload(),
        Some(Program::FExit(p)) => p.unload(),
        _ => Ok(()),
    };
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
fn recursion_misses(ebpf: &Ebpf, prog: &str) -> Result<u64> {
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
    let p = ebpf
        .program(prog)
        .with_context(|| format!("eBPF program {prog} missing"))?;
    let fd = p.fd()?.as_fd().as_raw_fd();
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
        let fork_off =
            preflight::field_offset(tracefs, "sched", "sched_process_fork", "child_pid")?;
        let funcs = ipi_funcs();
        let mut ebpf = EbpfLoader::new()
            .override_global("FILTER_TGIDS", &filter, true)
            .override_global("FORK_CHILD_PID_OFF", &fork_off, true)
            .override_global("IPI_FUNCS", &funcs, true)
            .override_global("FIELDS", &field_offsets(tracefs), true)
            .override_global("BREAKDOWN", &u8::from(opts.breakdown), true)
            .load(EBPF_OBJECT)
            .context("loading the eBPF object")?;
        let stats = take(&mut ebpf, "STATS")?;
        let counters = take(&mut ebpf, "COUNTERS")?;
        let inflight = take(&mut ebpf, "INFLIGHT")?;
        let tgids = take(&mut ebpf, "TGIDS")?;
        let control = take(&mut ebpf, "CONTROL")?;
        let ipi_cpus = take(&mut ebpf, "IPI_CPUS")?;
        let wakers = take(&mut ebpf, "WAKERS")?;
        let handler_ns = take(&mut ebpf, "HANDLER_NS")?;
        let mut c = Self {
            ebpf,
            stats,
            counters,
            inflight,
            tgids,
            control,
            ipi_cpus,
            wakers,
            handler_ns,
            comms: HashMap::new(),
            started: Instant::now(),
            tracefs: tracefs.to_path_buf(),
            btf: None,
            grace_source: GraceSource::None,
            breakdown: opts.breakdown,
            attach_mode: opts.attach,
            hook: Attach::default().hook(),
        };
        for &pid in &opts.pids {
            c.add_pid(pid)?;
        }
        Ok(c)
    }

    /// Adds `pid` to the in-kernel filter.
    pub fn add_pid(&mut self, pid: u32) -> Result<()> {
        self.tgids
            .insert(pid, 1, 0)
            .with_context(|| format!("adding pid {pid} to the filter"))?;
        if let Some(comm) = preflight::comm(pid) {
            self.comms.insert(pid, comm);
        }
        Ok(())
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
    pub fn start(&mut self, follow_forks: bool) -> Result<Vec<String>> {
        let mut notes = if self.breakdown {
            self.attach_breakdown()
        } else {
            Vec::new()
        };
        if follow_forks {
            // Its child_pid offset was read from the format file at load.
            self.attach_all(&[Probe::tp("sched", "sched_process_fork", &[])])?;
        }
        self.hook = self.attach_hook(&mut notes)?;
        self.control
            .set(0, 1, 0)
            .context("arming the eBPF programs")?;
        self.started = Instant::now();
        Ok(notes)
    }

    /// The first hook of `--attach`'s candidates that the kernel allows; a note for each one
    /// passed over on the way.
    fn attach_hook(&mut self, notes: &mut Vec<String>) -> Result<&'static Hook> {
        let candidates = self.attach_mode.candidates();
        let mut refused = Vec::new();
        for &hook in &candidates {
            match self.attach_all(&Probe::pair(hook)) {
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

    pub fn attach_source(&self) -> Attach {
        self.hook.attach
    }

    /// Frees the in-flight slots of threads that have exited. The eBPF programs keep a slot per
    /// thread between calls (cheaper than an insert and a delete per call); this bounds them.
    pub fn prune_exited_threads(&mut self) -> Result<()> {
        let gone: Vec<u32> = self
            .inflight
            .keys()
            .filter_map(|k| k.ok())
            .filter(|tid| !Path::new(&format!("/proc/{tid}")).exists())
            .collect();
        for tid in gone {
            // It may have been removed or reused meanwhile; either way the slot is not ours.
            let _ = self.inflight.remove(&tid);
        }
        Ok(())
    }

    fn counter(&self, idx: u32) -> Result<u64> {
        Ok(self.counters.get(&idx, 0)?.iter().sum())
    }

    /// Reads the kernel's totals. With `last`, calls still inside membarrier are counted as
    /// missed: tracing stops before they return.
    pub fn snapshot(&mut self, last: bool) -> Result<Snapshot> {
        let elapsed_ns = self.started.elapsed().as_nanos() as u64;
        let mut rows = Vec::new();
        let mut kernel_comms: HashMap<u32, String> = HashMap::new();
        for item in self.stats.iter() {
            let (key, s) = item.context("reading the stats map")?;
            // A row is created just before its first call is counted into it.
            if s.count == 0 {
                continue;
            }
            kernel_comms
                .entry(key.tgid)
                .or_insert_with(|| comm_str(&s.comm));
            rows.push(RawRow {
                key,
                count: s.count,
                sum_ns: s.sum_ns,
                min_ns: s.min_ns,
                max_ns: s.max_ns,
                hist: Histogram {
                    counts: s.hist.to_vec(),
                },
                blocked_sum_ns: s.blocked_sum_ns,
                blocked_max_ns: s.blocked_max_ns,
                blocked_hist: Histogram {
                    counts: s.blocked_hist.to_vec(),
                },
                ipis: s.ipis,
                ipi_hist: s.ipi_hist.to_vec(),
                mutex_wait_sum_ns: s.mutex_wait_sum_ns,
                mutex_wait_max_ns: s.mutex_wait_max_ns,
            });
        }
        // Name processes by /proc while they live (the main thread's comm); once gone, by the
        // comm of the thread that made their first call.
        for (tgid, kcomm) in kernel_comms {
            self.comms
                .entry(tgid)
                .or_insert_with(|| preflight::comm(tgid).unwrap_or(kcomm));
        }
        // A skipped enter shows up as an exit without enter (MISSED_ENTER); a skipped exit
        // leaves its enter behind, so count the exit program's skips directly.
        let mut missed_calls =
            self.counter(counter::MISSED_ENTER)? + recursion_misses(&self.ebpf, self.hook.exit)?;
        if last {
            missed_calls += self
                .inflight
                .iter()
                .filter(|e| e.as_ref().is_ok_and(|(_, call)| call.start_ns != 0))
                .count() as u64;
        }
        let dropped = self.counter(counter::DROPPED_INFLIGHT)?
            + self.counter(counter::DROPPED_STATS)?
            + self.counter(counter::DROPPED_PIDS)?
            + self.counter(counter::DROPPED_DETAIL)?;
        let ipi_cpus = self.ipi_cpus.iter().collect::<Result<_, _>>()?;
        let wakers = self.wakers.iter().collect::<Result<_, _>>()?;
        let handler_ns = self.handler_ns.iter().collect::<Result<_, _>>()?;
        Ok(Snapshot {
            elapsed_ns,
            rows,
            missed_calls,
            dropped,
            comms: self.comms.clone(),
            ipi_cpus,
            wakers,
            handler_ns,
            grace_period_source: self.grace_source,
            attach: self.hook.attach,
        })
    }
}
