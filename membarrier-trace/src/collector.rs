//! Loads the eBPF programs, attaches them, and reads the kernel's aggregates into a
//! [`Snapshot`].

use std::{collections::HashMap, path::Path, time::Instant};

use anyhow::{Context as _, Result};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray},
    programs::{FEntry, FExit, ProgramError, TracePoint},
};
use membarrier_trace_common::{
    CallKey, CpuKey, Inflight, Stats, StatsKey, WakerKey, counter, offsets,
};

use crate::{
    hist::Histogram,
    model::{Attach, GraceSource, RawRow, Snapshot, comm_str},
    preflight,
};

static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/membarrier-trace"));

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

/// How the membarrier syscall is hooked (`--attach`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachMode {
    /// fentry where the kernel allows it, else the syscall tracepoints.
    Auto,
    /// syscalls:sys_enter/exit_membarrier.
    Tracepoint,
    /// fentry/fexit on the syscall function; an error where the kernel refuses it.
    Fentry,
}

/// The kernel function behind the syscall, for fentry.
#[cfg(target_arch = "x86_64")]
const SYSCALL_FUNC: &str = "__x64_sys_membarrier";
#[cfg(target_arch = "aarch64")]
const SYSCALL_FUNC: &str = "__arm64_sys_membarrier";
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const SYSCALL_FUNC: &str = "sys_membarrier";

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
    grace_source: GraceSource,
    breakdown: bool,
    attach_mode: AttachMode,
    attach: Attach,
}

/// A classic tracepoint program and the record fields it reads directly (name, offset).
struct Probe {
    prog: &'static str,
    category: &'static str,
    fields: &'static [(&'static str, usize)],
}

impl Probe {
    /// The program is named after its tracepoint.
    const fn new(
        category: &'static str,
        prog: &'static str,
        fields: &'static [(&'static str, usize)],
    ) -> Self {
        Self {
            prog,
            category,
            fields,
        }
    }
}

/// The probes behind the per-call breakdown: each group is attached only when the kernel has
/// its tracepoints with the record layout the programs read; otherwise its figures stay 0 and
/// the user is told.
const BREAKDOWN: &[(&str, &[Probe])] = &[
    (
        "IPI fan-out",
        &[
            Probe::new(
                "ipi",
                "ipi_send_cpu",
                &[
                    ("cpu", offsets::IPI_SEND_CPU_CPU),
                    ("callback", offsets::IPI_SEND_CALLBACK),
                ],
            ),
            Probe::new(
                "ipi",
                "ipi_send_cpumask",
                &[
                    ("cpumask", offsets::IPI_SEND_CPUMASK_CPUMASK),
                    ("callback", offsets::IPI_SEND_CALLBACK),
                ],
            ),
        ],
    ),
    (
        "IPI handler time",
        &[
            Probe::new(
                "csd",
                "csd_queue_cpu",
                &[
                    ("func", offsets::CSD_QUEUE_CPU_FUNC),
                    ("csd", offsets::CSD_QUEUE_CPU_CSD),
                ],
            ),
            Probe::new(
                "csd",
                "csd_function_entry",
                &[
                    ("func", offsets::CSD_FUNCTION_FUNC),
                    ("csd", offsets::CSD_FUNCTION_CSD),
                ],
            ),
            Probe::new(
                "csd",
                "csd_function_exit",
                &[
                    ("func", offsets::CSD_FUNCTION_FUNC),
                    ("csd", offsets::CSD_FUNCTION_CSD),
                ],
            ),
        ],
    ),
    (
        "mutex wait",
        &[
            Probe::new("lock", "contention_begin", &[]),
            Probe::new("lock", "contention_end", &[]),
        ],
    ),
    (
        "waker",
        &[Probe::new(
            "sched",
            "sched_waking",
            &[("pid", offsets::SCHED_WAKING_PID)],
        )],
    ),
];

/// Checks that `category:name` exists and has each field at the offset the program reads.
fn check_layout(
    tracefs: &Path,
    category: &str,
    name: &str,
    fields: &[(&str, usize)],
) -> Result<()> {
    preflight::check_tracepoint(tracefs, category, name, "not in this kernel")?;
    for (field, off) in fields {
        let got = preflight::field_offset(tracefs, category, name, field)?;
        if got as usize != *off {
            anyhow::bail!("{category}:{name} has {field} at offset {got}, the program reads {off}");
        }
    }
    Ok(())
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

/// Loads and attaches the fentry (or, with `exit`, fexit) program `prog` on kernel function
/// `func`; a refusal is one line with the kernel's reason.
fn attach_btf(ebpf: &mut Ebpf, btf: &aya::Btf, prog: &str, func: &str, exit: bool) -> Result<()> {
    let refused = |e: ProgramError| match e {
        ProgramError::LoadError { io_error, .. } => {
            anyhow::anyhow!("fentry on {func} refused: {io_error}")
        }
        e => anyhow::Error::new(e).context(format!("fentry on {func}")),
    };
    let p = ebpf
        .program_mut(prog)
        .with_context(|| format!("eBPF program {prog} missing from the object"))?;
    if exit {
        let p: &mut FExit = p.try_into()?;
        p.load(func, btf).map_err(refused)?;
        p.attach().map_err(refused)?;
    } else {
        let p: &mut FEntry = p.try_into()?;
        p.load(func, btf).map_err(refused)?;
        p.attach().map_err(refused)?;
    }
    Ok(())
}

/// One line for a load or attach failure, with the kernel's reason.
fn attach(ebpf: &mut Ebpf, prog: &str, category: &str, name: &str) -> Result<()> {
    let tp: &mut TracePoint = ebpf
        .program_mut(prog)
        .with_context(|| format!("eBPF program {prog} missing from the object"))?
        .try_into()?;
    tp.load().map_err(|e| load_error(prog, e))?;
    tp.attach(category, name)
        .with_context(|| format!("attaching to {category}:{name}"))?;
    Ok(())
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
            let verdict = log
                .lines()
                .map(str::trim)
                .take_while(|l| !l.starts_with("verification time"))
                .filter(|l| !l.is_empty())
                .last()
                .unwrap_or("no verifier log")
                .to_string();
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

impl Collector {
    /// Loads the programs. Nothing is attached until [`Collector::start`].
    pub fn load(tracefs: &Path, opts: &Options) -> Result<Self> {
        let filter = u8::from(!opts.pids.is_empty() || opts.follow_forks);
        let fork_off =
            preflight::field_offset(tracefs, "sched", "sched_process_fork", "child_pid")?;
        let funcs = ipi_funcs();
        let mut ebpf = EbpfLoader::new()
            .override_global("FILTER_TGIDS", &filter, true)
            .override_global("FORK_CHILD_PID_OFF", &fork_off, true)
            .override_global("IPI_FUNCS", &funcs, true)
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
            grace_source: GraceSource::None,
            breakdown: opts.breakdown,
            attach_mode: opts.attach,
            attach: Attach::Tracepoint,
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

    /// Where the grace-period figures come from: fentry on synchronize_rcu* where the kernel
    /// allows it, else sched_switch. Returns a note for the user when it fell back.
    fn attach_grace_period(&mut self) -> (GraceSource, Option<String>) {
        let fentry = (|| -> Result<()> {
            let btf = aya::Btf::from_sys_fs().context("reading the kernel's BTF")?;
            attach_btf(
                &mut self.ebpf,
                &btf,
                "synchronize_rcu_exit",
                "synchronize_rcu",
                true,
            )?;
            attach_btf(
                &mut self.ebpf,
                &btf,
                "synchronize_rcu_entry",
                "synchronize_rcu",
                false,
            )?;
            // synchronize_rcu_expedited alone is optional: synchronize_rcu is the grace period.
            let func = "synchronize_rcu_expedited";
            if attach_btf(
                &mut self.ebpf,
                &btf,
                "synchronize_rcu_expedited_exit",
                func,
                true,
            )
            .is_ok()
            {
                let _ = attach_btf(
                    &mut self.ebpf,
                    &btf,
                    "synchronize_rcu_expedited_entry",
                    func,
                    false,
                );
            }
            Ok(())
        })();
        let why = match fentry {
            Ok(()) => return (GraceSource::Fentry, None),
            Err(e) => format!("{e:#}"),
        };
        let sched = self.attach_probe(&Probe::new(
            "sched",
            "sched_switch",
            &[("next_pid", offsets::SCHED_SWITCH_NEXT_PID)],
        ));
        match sched {
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

    /// Attaches a tracepoint program after checking the record layout it reads.
    fn attach_probe(&mut self, p: &Probe) -> Result<()> {
        check_layout(&self.tracefs, p.category, p.prog, p.fields)?;
        attach(&mut self.ebpf, p.prog, p.category, p.prog)
    }

    /// Attaches the breakdown probes (grace period, IPIs, handler time, mutex wait). What the
    /// kernel lacks is left out; the returned notes say what and why.
    fn attach_breakdown(&mut self) -> Vec<String> {
        let (source, note) = self.attach_grace_period();
        self.grace_source = source;
        let mut notes: Vec<String> = note.into_iter().collect();
        for (what, probes) in BREAKDOWN {
            let r = probes.iter().try_for_each(|p| self.attach_probe(p));
            if let Err(e) = r {
                notes.push(format!("no {what} figures: {e:#}"));
            }
        }
        notes
    }

    /// Attaches the programs; from here on calls are counted. Returns notes on what could not
    /// be measured on this kernel.
    pub fn start(&mut self, follow_forks: bool) -> Result<Vec<String>> {
        let notes = if self.breakdown {
            self.attach_breakdown()
        } else {
            Vec::new()
        };
        if follow_forks {
            attach(
                &mut self.ebpf,
                "sched_process_fork",
                "sched",
                "sched_process_fork",
            )?;
        }
        let mut notes = notes;
        self.attach = match self.attach_mode {
            AttachMode::Tracepoint => self.attach_tracepoints()?,
            AttachMode::Fentry => self.attach_fentry().map_err(|e| {
                anyhow::anyhow!("--attach fentry: {e:#}; use --attach tracepoint (or auto)")
            })?,
            AttachMode::Auto => match self.attach_fentry() {
                Ok(a) => a,
                Err(e) => {
                    notes.push(format!("{e:#}: using the syscall tracepoints"));
                    self.attach_tracepoints()?
                }
            },
        };
        self.control
            .set(0, 1, 0)
            .context("arming the eBPF programs")?;
        self.started = Instant::now();
        Ok(notes)
    }

    /// The syscall tracepoints: they work everywhere, but enabling them moves every task on the
    /// box to the slow syscall path.
    fn attach_tracepoints(&mut self) -> Result<Attach> {
        // Attached unarmed, then armed at once (see CONTROL in the eBPF programs). Exit before
        // enter all the same.
        attach(
            &mut self.ebpf,
            "sys_exit_membarrier",
            "syscalls",
            "sys_exit_membarrier",
        )?;
        attach(
            &mut self.ebpf,
            "sys_enter_membarrier",
            "syscalls",
            "sys_enter_membarrier",
        )?;
        Ok(Attach::Tracepoint)
    }

    /// fentry/fexit on the syscall's entry function: only membarrier calls pay. Many kernels
    /// allow it; this project's VMs answer EPERM.
    fn attach_fentry(&mut self) -> Result<Attach> {
        let btf = aya::Btf::from_sys_fs().context("fentry needs the kernel's BTF")?;
        // Exit before entry, as with the tracepoints.
        attach_btf(&mut self.ebpf, &btf, "membarrier_fexit", SYSCALL_FUNC, true)?;
        attach_btf(
            &mut self.ebpf,
            &btf,
            "membarrier_fentry",
            SYSCALL_FUNC,
            false,
        )?;
        Ok(Attach::Fentry)
    }

    pub fn attach_source(&self) -> Attach {
        self.attach
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
        let mut missed_calls = self.counter(counter::MISSED_ENTER)?
            + recursion_misses(&self.ebpf, "sys_exit_membarrier")?;
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
            attach: self.attach,
        })
    }
}
