//! The collector: loads the eBPF object a run needs (the kernel's features choose it), sizes
//! its maps for the machine, attaches the programs from the probe tables ([`super::probes`]),
//! and detaches them. Reading the maps is [`super::read`]'s, retiring exited processes
//! [`super::retire`]'s (into [`super::retired`]): both are `impl Collector` blocks of their own.

use std::{collections::HashMap, os::fd::AsFd as _, path::Path, time::Instant};

use anyhow::{Context as _, Result};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, Queue},
};
use membarrier_trace_common::{
    COMM_LEN, CpuKey, EXITED_RING_BYTES, Handled, HandlerKey, Inflight, MAX_KSTACKS, PlacesHeld,
    Proc, STACK_RING_BYTES, STACK_WINDOW_NS, Stats, StatsKey, SummedKey, SummedRow, ThreadCalls,
    ThreadKey, UNWIND_SLOTS, WakerKey, WriterKey, WriterStats, field,
};

use crate::{
    collect::kstacks::KernelStacks,
    collect::rcu::{CustomFunc, Writers},
    enrich::{stacks::StackCounter, symbolize::CallerNamer},
    hook::{Attach, AttachMode, FloorPart, Hook},
    model::{GraceSource, Maps, ProcKey},
    preflight,
    ring::ExitedRing,
};

use super::{
    maps::MapSizes,
    probes::*,
    retired::{ExitedThreads, Retired},
};

pub(super) static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(env!("MEMBARRIER_TRACE_EBPF_OBJECT"));
/// The same programs for kernels before 5.12, built without compare-and-exchange or fetching
/// atomics, which those kernels refuse anywhere in a program (docs/design.md, "Kernels").
pub(super) static EBPF_OBJECT_NO_CMPXCHG: &[u8] =
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
    /// `--stack-rate`: calls a second per CPU whose stacks are all taken.
    pub stack_rate: u64,
    /// `--debug-dir`: where else to look for debug files by build ID.
    pub debug_dirs: Vec<std::path::PathBuf>,
    /// `--hook-floor` (benchmarks): only the hook, with programs that do nothing (or one part
    /// of the per-call path).
    pub hook_floor: Option<FloorPart>,
    /// What the running kernel's BPF can do: which eBPF object loads (read once, by the caller,
    /// which also turns off what the kernel cannot do).
    pub kernel: crate::collect::kernel::Features,
}

pub struct Collector {
    // Owns the programs; dropping it detaches them.
    pub(super) ebpf: Ebpf,
    /// The stats rows' keys, each to its index in `rows`.
    pub(super) stats: BpfHashMap<MapData, StatsKey, u32>,
    pub(super) rows: Array<MapData, Stats>,
    /// The indices of `rows` free: the retire pass gives back those it frees.
    pub(super) free_rows: Queue<MapData, u32>,
    pub(super) counters: PerCpuArray<MapData, u64>,
    pub(super) inflight: BpfHashMap<MapData, u32, Inflight>,
    pub(super) tid_slots: Array<MapData, Inflight>,
    /// Which places in `tid_slots` are held; absent from the object for kernels before 5.12,
    /// which hold none.
    pub(super) places_held: Option<Array<MapData, PlacesHeld>>,
    pub(super) procs: BpfHashMap<MapData, u32, Proc>,
    pub(super) control: Array<MapData, u32>,
    pub(super) ipi_cpus: BpfHashMap<MapData, CpuKey, u64>,
    pub(super) wakers: BpfHashMap<MapData, WakerKey, u64>,
    pub(super) handled: BpfHashMap<MapData, HandlerKey, Handled>,
    pub(super) exit_names: BpfHashMap<MapData, u64, [u8; COMM_LEN]>,
    pub(super) writer_rows: BpfHashMap<MapData, WriterKey, WriterStats>,
    /// Exited processes' rows, sent by the kernel as they exit.
    pub(super) exited_rows: ExitedRing,
    /// Exited processes taken from it at the last retire pass.
    pub(super) moved_in_use: usize,
    /// ... and in all.
    pub(super) moved: u64,
    /// Exited processes' rows the kernel summed by name when that ring was full ...
    pub(super) summed: BpfHashMap<MapData, SummedKey, SummedRow>,
    /// ... and what of them was taken in already.
    pub(super) summed_seen: HashMap<SummedKey, SummedRow>,
    /// Exited threads' calls, drained at every retire pass.
    pub(super) thread_rows: BpfHashMap<MapData, ThreadKey, ThreadCalls>,
    /// What was drained from it, per process.
    pub(super) exited_threads: HashMap<ProcKey, ExitedThreads>,
    /// The probed grace-period functions (None: `--no-rcu`).
    pub(super) writers: Option<Writers>,
    /// `--pid`s: their mappings are probed for grace-period functions.
    pub(super) pids: Vec<u32>,
    pub(super) follow_forks: bool,
    /// sched_switch_writers is attached (off-CPU time in grace periods beside fentry).
    pub(super) writers_off_cpu: bool,
    /// Names grace periods' callers and `--stacks` frames (None: neither).
    pub(super) callers: Option<CallerNamer>,
    /// The machine's name and the kernel's release, read at load.
    pub(super) hostname: String,
    pub(super) kernel_release: String,
    /// `--stacks`: unwinds and counts each call's stack sent to userspace.
    pub(super) stacks: Option<StackCounter>,
    /// `--stacks`: the stacks the kernel unwinds itself.
    pub(super) kstacks: Option<KernelStacks>,
    /// Last known name of each process seen.
    pub(super) comms: HashMap<ProcKey, String>,
    pub(super) retired: Retired,
    pub(super) started: Instant,
    pub(super) tracefs: std::path::PathBuf,
    /// The kernel's BTF, read on the first fentry attach.
    pub(super) btf: Option<aya::Btf>,
    pub(super) grace_source: GraceSource,
    pub(super) breakdown: bool,
    /// Only the hook's programs that do nothing (`--hook-floor`).
    pub(super) hook_floor: Option<FloorPart>,
    pub(super) attach_mode: AttachMode,
    /// The row of the hook table that is attached.
    pub(super) hook: &'static Hook,
    pub(super) maps: Maps,
    /// The kernel's BTF gave the `task_struct` offsets (processes named by their leader, the
    /// process table kept by BTF-typed tracepoints).
    pub(super) task_offsets_known: bool,
    /// Stats rows in use at the last retire pass.
    pub(super) rows_in_use: usize,
    /// Exited threads drained at the last retire pass.
    pub(super) threads_in_use: usize,
}

/// The offsets of the breakdown programs' fields in this kernel's records (their FIELDS), from
/// the format files; mainline's where a tracepoint is missing (its probe is then left out).
pub(super) fn field_offsets(tracefs: &Path) -> [u32; field::COUNT] {
    let mut out = field::mainline();
    let probes = BREAKDOWN
        .iter()
        .flat_map(|(_, ways)| ways.iter())
        .chain(SCHED_SWITCH)
        .chain(PROCESS)
        .copied()
        .flatten();
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
pub(super) fn ipi_funcs() -> [u64; 4] {
    use std::io::BufRead as _;
    let mut out = [0u64; 4];
    let Ok(file) = std::fs::File::open("/proc/kallsyms") else {
        return out;
    };
    // Read only as far as the four (about a seventh of the file, in address order): the
    // kernel formats each line as it is read, 70 ms of system time for the whole of it here.
    let mut found = 0;
    for line in std::io::BufReader::with_capacity(1 << 16, file).lines() {
        let Ok(line) = line else { break };
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
        if out[i] == 0 {
            found += 1;
        }
        out[i] = u64::from_str_radix(addr, 16).unwrap_or(0);
        if found == out.len() {
            break;
        }
    }
    // One of the barriers' callbacks missing (or all hidden by kptr_restrict) would drop its
    // IPIs: then count every csd queued from inside membarrier instead. Registration's may
    // be missing (older kernels): its IPIs are then not counted.
    if out[..3].contains(&0) { [0; 4] } else { out }
}

/// Every map syscall (the snapshots' reads, the retire pass's deletes) holds its CPU's
/// `bpf_prog_active` while it runs, and while it is held the kernel skips every syscall
/// tracepoint program that starts on that CPU, without counting it before Linux 6.7. On
/// PREEMPT_RT a syscall can be preempted there: the caller that preempted the tracer then had
/// all its calls skipped until the tracer ran again (1,099 of 344,000 calls, seen nowhere, in
/// the RT guest's `snapshots_on_the_callers_cpu_lose_no_call`). So the thread that reads the
/// maps (this one) runs at SCHED_FIFO 1, above every normal task: a traced caller cannot take
/// its CPU mid-syscall. Reset on fork: the threads and the command it starts run as normal.
pub(super) fn hold_the_cpu_in_map_syscalls() -> Option<String> {
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

impl Drop for Collector {
    /// Every exit detaches at once (see [`Collector::detach`]), not program by program as the
    /// programs drop.
    fn drop(&mut self) {
        self.detach();
    }
}

pub(super) fn take<T>(ebpf: &mut Ebpf, name: &str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .with_context(|| format!("map {name} missing from the eBPF object"))?;
    T::try_from(map).with_context(|| format!("map {name}"))
}

/// CPUs the kernel could bring online: what it sizes per-CPU parts of maps by.
pub(super) fn possible_cpus() -> u64 {
    aya::util::nr_cpus().map_or(1, |n| n as u64)
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK (later ones to the memory cgroup):
/// lift it, as aya's template does. Should it fail, the map creation says so.
pub(super) fn raise_memlock() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads a live struct.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
}

impl Collector {
    /// The machine's name and kernel release, as snapshots carry them.
    pub fn host(&self) -> (&str, &str) {
        (&self.hostname, &self.kernel_release)
    }

    /// Loads the programs. Nothing is attached until [`Collector::start`].
    ///
    /// Long: after the object's load (`load_object`), each map taken and each thread started
    /// in turn, then the collector's 41 fields set once each.
    pub fn load(tracefs: &Path, opts: &Options) -> Result<Self> {
        raise_memlock();
        let sizes = MapSizes::of_this_machine();
        // The IPI callbacks' addresses beside task_struct's offsets. (Parsing the kernel's BTF
        // for the typed programs here too, beside aya's own parse in EbpfLoader::new, made the
        // start slower on two CPUs: both allocate hard, through one allocator.)
        let (task, funcs) = std::thread::scope(|s| {
            let funcs = s.spawn(ipi_funcs);
            let task = crate::collect::btf::task_offsets();
            (task, funcs.join().unwrap_or_default())
        });
        let mut ebpf = load_object(tracefs, opts, &sizes, task, funcs)?;
        let mut btf = None;
        // Before any map is taken out of `ebpf`: uprobe_multi's programs are relocated to them.
        let writers = opts
            .rcu
            .then(|| Writers::load(&ebpf, object(opts), &mut btf, opts.rcu_funcs.clone()));
        let stats = take(&mut ebpf, "STATS")?;
        let rows = take(&mut ebpf, "ROWS")?;
        let mut free_rows: Queue<MapData, u32> = take(&mut ebpf, "FREE_ROWS")?;
        for i in 0..sizes.stats {
            free_rows
                .push(i, 0)
                .context("filling the free rows' queue")?;
        }
        let counters = take(&mut ebpf, "COUNTERS")?;
        let inflight = take(&mut ebpf, "INFLIGHT")?;
        let tid_slots = take(&mut ebpf, "TID_SLOTS")?;
        let places_held = take(&mut ebpf, "PLACES_HELD").ok();
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
        let kstacks = if opts.stacks {
            Some(KernelStacks::new(
                take(&mut ebpf, "UNWIND")?,
                take(&mut ebpf, "KSTACKS")?,
            ))
        } else {
            None
        };
        let callers = if opts.rcu || opts.stacks {
            let ring = opts.rcu.then(|| take(&mut ebpf, "CALLERS")).transpose()?;
            Some(
                CallerNamer::start(ring, &opts.debug_dirs)
                    .context("starting the callers' thread")?,
            )
        } else {
            None
        };
        let stacks = match (&callers, opts.stacks) {
            (Some(namer), true) => Some(
                StackCounter::start(take(&mut ebpf, "STACK_SAMPLES")?, namer.finder())
                    .context("starting the stacks thread")?,
            ),
            _ => None,
        };
        let mut c = Self {
            ebpf,
            stats,
            rows,
            free_rows,
            counters,
            inflight,
            tid_slots,
            places_held,
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
            hostname: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_default(),
            kernel_release: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|h| h.trim().to_string())
                .unwrap_or_default(),
            stacks,
            kstacks,
            comms: HashMap::new(),
            retired: Retired::default(),
            started: Instant::now(),
            tracefs: tracefs.to_path_buf(),
            btf,
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

    pub(super) fn attach_all(&mut self, probes: &[Probe]) -> Result<()> {
        if !self.task_offsets_known
            && probes
                .iter()
                .any(|p| matches!(p.at, At::BtfTracepoint { task: true, .. }))
        {
            anyhow::bail!("the kernel's BTF gives no task_struct offsets");
        }
        attach_all(&mut self.ebpf, &self.tracefs, &mut self.btf, probes)
    }

    /// Attaches the first of `ways` the kernel allows; else the reasons each was refused.
    pub(super) fn attach_first(&mut self, ways: Ways) -> Result<(), String> {
        let mut why = Vec::new();
        for probes in ways {
            match self.attach_all(probes) {
                Ok(()) => return Ok(()),
                Err(e) => why.push(format!("{e:#}")),
            }
        }
        Err(why.join("; "))
    }

    /// Where the grace-period figures come from: fentry on synchronize_rcu* where the kernel
    /// allows it, else sched_switch. Returns a note for the user when it fell back.
    pub(super) fn attach_grace_period(&mut self) -> (GraceSource, Option<String>) {
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
        match self.attach_first(SCHED_SWITCH) {
            Ok(()) => (
                GraceSource::Sched,
                Some(format!(
                    "grace periods measured as off-CPU time from sched_switch ({why})"
                )),
            ),
            Err(e) => (
                GraceSource::None,
                Some(format!("no grace-period figures: {why}; sched_switch: {e}")),
            ),
        }
    }

    /// Attaches the breakdown probes (grace period, IPIs, handler time, mutex wait), each group
    /// the first way the kernel allows. The returned notes say what is missing and why.
    pub(super) fn attach_breakdown(&mut self) -> Vec<String> {
        let (source, note) = self.attach_grace_period();
        self.grace_source = source;
        let mut notes: Vec<String> = note.into_iter().collect();
        for (what, ways) in BREAKDOWN {
            if let Err(why) = self.attach_first(ways) {
                notes.push(format!("no {what} figures: {why}"));
            }
        }
        notes
    }

    /// Attaches the programs; from here on calls are counted. Returns notes on what could not
    /// be measured on this kernel.
    pub fn start(&mut self) -> Result<Vec<String>> {
        if self.hook_floor.is_some() {
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
        self.attach_first(PROCESS)
            .map_err(|why| anyhow::anyhow!("tracking processes: {why}"))?;
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
    pub(super) fn attach_writers(&mut self, notes: &mut Vec<String>) -> Result<()> {
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
    pub(super) fn attach_writers_off_cpu(&mut self, notes: &mut Vec<String>) {
        let probed = self.writers.as_ref().is_some_and(|w| !w.funcs.is_empty());
        if !self.breakdown
            || self.writers_off_cpu
            || !probed
            || self.grace_source == GraceSource::Sched
        {
            return;
        }
        self.writers_off_cpu = true;
        if let Err(why) = self.attach_first(SCHED_SWITCH_WRITERS) {
            notes.push(format!("no off-CPU time inside grace periods: {why}"));
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
    pub(super) fn attach_hook(&mut self, notes: &mut Vec<String>) -> Result<&'static Hook> {
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
    pub(super) fn runs_skipped(&self) -> Result<(u64, u64)> {
        let (mut hook, mut probes) = (0, 0);
        for fd in self.writers.iter().flat_map(Writers::multi_programs) {
            probes += recursion_misses(fd)?;
        }
        for (name, p) in self.ebpf.programs() {
            // Loaded: attached (a program that failed to attach is unloaded again).
            if let Ok(fd) = p.fd() {
                let n = recursion_misses(fd.as_fd())?;
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
        let links = self
            .writers
            .as_mut()
            .map(|w| std::mem::take(&mut w.links))
            .unwrap_or_default();
        std::thread::scope(|s| {
            for (_, p) in self.ebpf.programs_mut() {
                s.spawn(move || unload_program(p));
            }
            for link in links {
                s.spawn(move || drop(link));
            }
        });
    }

    pub fn attach_source(&self) -> Attach {
        self.hook.attach
    }
}

/// The eBPF object this kernel takes, its switches set and its maps sized before load.
fn load_object(
    tracefs: &Path,
    opts: &Options,
    sizes: &MapSizes,
    task: Option<crate::collect::btf::TaskOffsets>,
    funcs: [u64; 4],
) -> Result<Ebpf> {
    let filter = u8::from(!opts.pids.is_empty() || opts.follow_forks);
    let task_offsets = task.map_or([0; 3], |t| [t.pid, t.group_leader, t.comm]);
    EbpfLoader::new()
        .map_max_entries("STATS", sizes.stats)
        .map_max_entries("ROWS", sizes.stats)
        .map_max_entries("FREE_ROWS", sizes.stats)
        .map_max_entries("INFLIGHT", sizes.inflight)
        .map_max_entries("PROCS", sizes.procs)
        .override_global("FILTER_TGIDS", &filter, true)
        .override_global("FOLLOW_FORKS", &u8::from(opts.follow_forks), true)
        .override_global("IPI_FUNCS", &funcs, true)
        .override_global("FIELDS", &field_offsets(tracefs), true)
        .override_global("TASK_OFFSETS", &task_offsets, true)
        .override_global("BREAKDOWN", &u8::from(opts.breakdown), true)
        // Not in the object for kernels before 5.12, which has no places to claim.
        .override_global(
            "TID_PLACES",
            &u8::from(std::env::var_os("MEMBARRIER_TRACE_NO_TID_SLOTS").is_none()),
            false,
        )
        .override_global("STACKS", &u8::from(opts.stacks), true)
        .override_global(
            "STACK_BUDGET",
            &(opts.stack_rate * STACK_WINDOW_NS / 1_000_000_000),
            true,
        )
        .map_max_entries(
            "STACK_SAMPLES",
            if opts.stacks { STACK_RING_BYTES } else { 4096 },
        )
        .map_max_entries("UNWIND", if opts.stacks { UNWIND_SLOTS } else { 1 })
        .map_max_entries("KSTACKS", if opts.stacks { MAX_KSTACKS } else { 1 })
        // With --stacks no rows are moved at exit (their stacks stay with userspace).
        .map_max_entries("EXITED", if opts.stacks { 4096 } else { EXITED_RING_BYTES })
        .load(object(opts))
        .context("loading the eBPF object")
}

/// The eBPF object for this kernel.
fn object(opts: &Options) -> &'static [u8] {
    if opts.kernel.cmpxchg {
        EBPF_OBJECT
    } else {
        EBPF_OBJECT_NO_CMPXCHG
    }
}
