//! What the collector reads from the kernel: a [`Snapshot`] of rows (per process, cmd, flags
//! and errno), threads, writers, the breakdown's detail and the losses, with the keys that
//! tie them together.

use std::{collections::HashMap, path::PathBuf};

use membarrier_trace_common::{
    CpuKey, Handled, HandlerKey, IPI_HIST, MovedRow, Stats, StatsKey, SummedRow, THREAD_CMDS,
    WakerKey, WriterKey, WriterStats,
};
use serde::{Deserialize, Serialize};

use super::hist::Histogram;
use crate::hook::Attach;

/// A probed grace-period function; its index in the collector's list is the uprobe's cookie.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpFunc {
    /// `memb`, `mb`, `qsbr`, `bp`, `signal`, or `custom` (`--rcu-func`).
    pub flavour: &'static str,
    pub function: String,
    /// The file it is in.
    pub library: PathBuf,
}

/// The flavours a [`GpFunc`] can have (`custom`: `--rcu-func`).
pub const FLAVOURS: [&str; 6] = ["memb", "mb", "qsbr", "bp", "signal", "custom"];

/// One kernel stats row, summed over CPUs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RawRow {
    pub key: StatsKey,
    pub count: u64,
    pub sum_ns: u64,
    pub min_ns: u64,
    pub max_ns: u64,
    pub hist: Histogram,
    /// Off-CPU time inside the call: calls with none are not in `blocked_hist`.
    pub blocked_sum_ns: u64,
    pub blocked_max_ns: u64,
    pub blocked_hist: Histogram,
    pub ipis: u64,
    /// Calls by IPIs sent (index = IPIs, the last = that many or more); calls with none are not
    /// in it. Empty buckets past the last used one may be left off.
    pub ipi_hist: Vec<u64>,
    pub mutex_wait_sum_ns: u64,
    pub mutex_wait_max_ns: u64,
    /// `--stacks`: calls whose stack the kernel could not send, and calls sampled out.
    pub stacks_unsent: u64,
    pub stacks_sampled_out: u64,
}

impl RawRow {
    /// A row with only the call figures (no breakdown).
    pub fn new(key: StatsKey) -> Self {
        Self {
            key,
            count: 0,
            sum_ns: 0,
            min_ns: 0,
            max_ns: 0,
            hist: Histogram::default(),
            blocked_sum_ns: 0,
            blocked_max_ns: 0,
            blocked_hist: Histogram::default(),
            ipis: 0,
            ipi_hist: vec![0; IPI_HIST],
            mutex_wait_sum_ns: 0,
            mutex_wait_max_ns: 0,
            stacks_unsent: 0,
            stacks_sampled_out: 0,
        }
    }

    /// A row the kernel moved out at its process's exit (no breakdown histograms: it moves
    /// only rows without).
    pub fn from_moved(key: StatsKey, r: &MovedRow) -> Self {
        let mut hist = Histogram::default();
        for (i, &n) in r.hist.iter().enumerate().filter(|(_, n)| **n > 0) {
            hist.add_to(r.first_bucket as usize + i, n);
        }
        let l = [r.count, r.sum_ns, r.min_ns, r.max_ns];
        Self::latency_only(key, l, hist, [r.mutex_wait_sum_ns, r.mutex_wait_max_ns])
    }
    pub fn from_summed(key: StatsKey, r: &SummedRow) -> Self {
        let l = [r.count, r.sum_ns, r.min_ns, r.max_ns];
        let hist = Histogram::from_counts(&r.hist);
        Self::latency_only(key, l, hist, [r.mutex_wait_sum_ns, r.mutex_wait_max_ns])
    }
    /// A row the kernel kept only the latency and mutex wait of (moved at exit, or summed by
    /// name): `[count, sum, min, max]`, the histogram, `[mutex wait sum, max]`.
    fn latency_only(key: StatsKey, l: [u64; 4], hist: Histogram, mutex_wait: [u64; 2]) -> Self {
        let [count, sum_ns, min_ns, max_ns] = l;
        Self {
            key,
            count,
            sum_ns,
            min_ns,
            max_ns,
            hist,
            ipi_hist: Vec::new(),
            mutex_wait_sum_ns: mutex_wait[0],
            mutex_wait_max_ns: mutex_wait[1],
            ..Self::new(key)
        }
    }
    pub fn from_stats(key: StatsKey, s: &Stats) -> Self {
        Self {
            key,
            count: s.count,
            sum_ns: s.sum_ns,
            min_ns: s.min_ns,
            max_ns: s.max_ns,
            hist: Histogram::from_counts(&s.hist),
            blocked_sum_ns: s.blocked_sum_ns,
            blocked_max_ns: s.blocked_max_ns,
            blocked_hist: Histogram::from_counts(&s.blocked_hist),
            ipis: s.ipis,
            // Up to the last non-empty bucket: most rows have none (tracers keep thousands).
            ipi_hist: s.ipi_hist[..s.ipi_hist.iter().rposition(|&c| c > 0).map_or(0, |i| i + 1)]
                .to_vec(),
            mutex_wait_sum_ns: s.mutex_wait_sum_ns,
            mutex_wait_max_ns: s.mutex_wait_max_ns,
            stacks_unsent: s.stacks_unsent,
            stacks_sampled_out: s.stacks_sampled_out,
        }
    }
}

/// One process for the whole run: (tgid, serial number; see `Proc::serial`). A pid alone can
/// name several processes over a long run.
pub type ProcKey = (u32, u32);

/// A kernel comm (NUL-padded) as text.
pub fn comm_str(comm: &[u8]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

/// Rows that sum: a stats row or a grace-period row, into another of the same key.
pub trait Absorb {
    fn absorb(&mut self, r: &Self);
}

/// The least of two rows' minimums, where a row with no count has none.
fn min_with(count: u64, min: u64, other: u64) -> u64 {
    if count == 0 { other } else { min.min(other) }
}

impl Absorb for RawRow {
    /// Adds `r`'s calls to this row (rows of one cmd with different outcomes, or of processes
    /// summed together).
    fn absorb(&mut self, r: &RawRow) {
        self.hist.add(&r.hist);
        self.blocked_hist.add(&r.blocked_hist);
        if self.ipi_hist.len() < r.ipi_hist.len() {
            self.ipi_hist.resize(r.ipi_hist.len(), 0);
        }
        for (a, b) in self.ipi_hist.iter_mut().zip(&r.ipi_hist) {
            *a += b;
        }
        self.min_ns = min_with(self.count, self.min_ns, r.min_ns);
        self.count += r.count;
        self.sum_ns += r.sum_ns;
        self.max_ns = self.max_ns.max(r.max_ns);
        self.blocked_sum_ns += r.blocked_sum_ns;
        self.blocked_max_ns = self.blocked_max_ns.max(r.blocked_max_ns);
        self.ipis += r.ipis;
        self.mutex_wait_sum_ns += r.mutex_wait_sum_ns;
        self.mutex_wait_max_ns = self.mutex_wait_max_ns.max(r.mutex_wait_max_ns);
        self.stacks_unsent += r.stacks_unsent;
        self.stacks_sampled_out += r.stacks_sampled_out;
    }
}

/// Where the grace-period (blocked) figures come from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GraceSource {
    /// fentry/fexit on synchronize_rcu*: the grace period itself.
    Fentry,
    /// sched_switch: time off CPU inside the call.
    #[default]
    Sched,
    /// Neither could be attached: no blocked figures.
    None,
}

/// Everything read from the kernel at one instant; counts are totals since the tracer started.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Time since the programs were attached.
    pub elapsed_ns: u64,
    /// The wall-clock time it was read at: ns since the Unix epoch.
    pub unix_ns: u64,
    /// The machine's name (`/proc/sys/kernel/hostname`).
    pub hostname: String,
    /// The kernel's release (`uname -r`).
    pub kernel: String,
    pub rows: Vec<RawRow>,
    pub losses: Losses,
    /// Process names.
    pub comms: HashMap<ProcKey, String>,
    /// Processes that have exited, with how many processes each entry stands for (1, or the
    /// number summed into a per-name entry with tgid 0). Live ones are not in it.
    pub exited: HashMap<ProcKey, u64>,
    pub ipi_cpus: Vec<(CpuKey, u64)>,
    pub wakers: Vec<(WakerKey, u64)>,
    /// IPI handler runs and time on the target CPUs, per caller and interrupted process.
    pub handled: Vec<(HandlerKey, Handled)>,
    pub grace_period_source: GraceSource,
    pub attach: Attach,
    pub maps: Maps,
    pub exited_rows: ExitedRows,
    /// Userspace RCU grace periods, per (process, thread, function, caller).
    pub writers: Vec<WriterRow>,
    /// The probed grace-period functions, indexed by [`WriterKey::func`].
    ///
    /// [`WriterKey::func`]: membarrier_trace_common::WriterKey::func
    pub gp_funcs: Vec<GpFunc>,
    /// Callers symbolized, by process and return address.
    pub callers: HashMap<(ProcKey, u64), Caller>,
    /// Calls per thread: the live threads', and the exited ones'.
    pub threads: Vec<ThreadRow>,
    /// `--stacks`: calls per user stack (frames named in `callers`).
    pub stacks: Option<Stacks>,
}

impl Snapshot {
    /// Keeps only the figures of processes `pids` (what a live `-p` would have counted).
    pub fn only(&mut self, pids: &[u32]) {
        let keep = |tgid: u32| pids.contains(&tgid);
        self.rows.retain(|r| keep(r.key.tgid));
        self.writers.retain(|w| keep(w.key.tgid));
        self.threads.retain(|t| keep(t.proc.0));
        self.ipi_cpus.retain(|(k, _)| keep(k.tgid));
        self.wakers.retain(|(k, _)| keep(k.tgid));
        self.handled.retain(|(k, _)| keep(k.tgid));
        self.callers.retain(|(p, _), _| keep(p.0));
        if let Some(s) = &mut self.stacks {
            s.stacks.retain(|(g, _), _| keep(g.0.0));
            s.unattributed.retain(|g, _| keep(g.0.0));
        }
    }
}

/// (process, cmd, flags): the calls a cmd row of the report stands for.
pub type StackGroup = (ProcKey, u32, u32);

/// Calls with one user stack.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StackCount {
    /// Calls whose stack was taken each (within the CPU's stack rate), and their latency.
    pub exact: u64,
    pub exact_ns: u64,
    /// Calls taken over the rate, each standing for the calls sampled out beside it.
    pub sampled: u64,
    pub sampled_ns: u64,
    /// The unwinding reached the outermost frame (else it stopped short: the copy's end, or
    /// code it could not unwind).
    pub complete: bool,
    /// Of `exact` + `sampled`, the calls the kernel unwound itself (`KSTACKS`), sending no
    /// sample.
    pub kernel: u64,
}

impl StackCount {
    pub fn absorb(&mut self, c: &StackCount) {
        self.exact += c.exact;
        self.exact_ns += c.exact_ns;
        self.sampled += c.sampled;
        self.sampled_ns += c.sampled_ns;
        self.kernel += c.kernel;
        self.complete |= c.complete;
    }
}

/// The `--stacks` counts so far.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Stacks {
    /// By (group, frames: innermost first).
    pub stacks: HashMap<(StackGroup, Vec<u64>), StackCount>,
    /// Calls sent without a readable stack (no registers or stack bytes), or with a new stack
    /// when `enrich::stacks::MAX_STACKS` were kept.
    pub unattributed: HashMap<StackGroup, u64>,
}

impl Stacks {
    /// Adds `c` to stack `frames` of `g`; a new stack past `max` kept has its calls counted
    /// unattributed.
    pub fn add(&mut self, g: StackGroup, frames: Vec<u64>, c: &StackCount, max: usize) {
        let key = (g, frames);
        if let Some(have) = self.stacks.get_mut(&key) {
            have.absorb(c);
        } else if self.stacks.len() >= max {
            *self.unattributed.entry(g).or_default() += c.exact + c.sampled;
        } else {
            self.stacks.insert(key, c.clone());
        }
    }
}

/// One thread's calls by cmd (`thread_cmd` index), or several exited threads of a process
/// summed (`tid` 0).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ThreadRow {
    pub proc: ProcKey,
    pub tid: u32,
    pub name: String,
    pub calls: [u64; THREAD_CMDS],
    /// Threads this row stands for: 1, or for `tid` 0 how many were summed.
    pub threads: u64,
}

impl ThreadRow {
    /// Adds `r`'s calls to this row.
    pub fn absorb(&mut self, r: &ThreadRow) {
        for (a, b) in self.calls.iter_mut().zip(&r.calls) {
            *a += b;
        }
        self.threads += r.threads;
    }
}

/// How big the kernel maps were made for this machine (docs/design.md, "Bounds").
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Deserialize)]
pub struct Maps {
    /// Stats rows: processes alive at once times the (cmd, flags, errno) each uses.
    pub stats_rows: u32,
    /// Threads that have called membarrier, alive at once.
    pub inflight_slots: u32,
    /// Processes created while tracing, alive at once.
    pub processes: u32,
    /// The most kernel memory all the maps take, by the kernel's own accounting (what
    /// `memlock` in the maps' fdinfo sums to); preallocated, so it does not grow.
    pub kernel_bytes_bound: u64,
}

/// How exited processes' rows left the kernel; none of these is a loss.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Deserialize)]
pub struct ExitedRows {
    /// Processes whose rows the kernel moved out at their last exit (the `EXITED` ring).
    pub moved_at_exit: u64,
    /// The ring was full at their exit (its thread starved of CPU): summed under their name by
    /// the kernel (`summed_by_name`), else left whole in the stats map for the retire pass ...
    pub ring_full: u64,
    pub summed_by_name: u64,
    /// ... or a row was of a kind the kernel does not move (off-CPU time or IPIs in a call, an
    /// uncommon cmd or errno, latencies spread over more than an octave, a grace period).
    pub kept_whole: u64,
}

/// What could not be counted, each lost call once under one cause.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Deserialize)]
pub struct Losses {
    /// Calls seen only half: an exit without its enter (the tracer attached mid-call, or the
    /// kernel skipped a program), plus (in the final snapshot) calls still inside membarrier
    /// when tracing stopped.
    pub missed_calls: u64,
    /// Calls lost because the stats map was full.
    pub calls_without_row: u64,
    /// Calls lost because the in-flight map was full at their enter.
    pub calls_without_inflight_slot: u64,
    /// Processes the process map had no room for: with `-- COMMAND`, children not followed.
    pub processes_not_tracked: u64,
    /// IPI-per-CPU, waker, csd or exited-thread rows that did not fit: those figures are
    /// short; and stats rows whose index could not be given back (the stats map a row smaller).
    pub detail_rows: u64,
    /// `--stacks`: unwinding rules the kernel was not given (their slot in `UNWIND` held another
    /// live rule): stacks through that code keep going to userspace as samples, within the rate.
    pub unwind_rules: u64,
    /// Runs of the breakdown probes the kernel skipped (another BPF program was running on
    /// the CPU; fentry on PREEMPT_RT): the grace-period, IPI, handler and mutex figures are short.
    pub probe_runs_skipped: u64,
    /// Runs of the syscall hook's own programs the kernel skipped, for any process on the box
    /// (it cannot say whose). A call whose enter or exit alone was skipped is in `missed_calls`;
    /// one whose enter and exit were both skipped is seen nowhere else. Only where the hook's
    /// programs can be preempted (fentry on PREEMPT_RT) or nested.
    pub hook_runs_skipped: u64,
    /// Userspace grace periods seen only half: under way when tracing started or (in the final
    /// snapshot) stopped, or their thread exited inside them.
    pub missed_grace_periods: u64,
    /// Grace periods lost because the writers map was full.
    pub grace_periods_without_row: u64,
    /// New callers the callers ring had no room to report: one whose process exits before the
    /// next retire pass keeps its raw address.
    pub callers_unreported: u64,
}

/// One kernel grace-period row, as read.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WriterRow {
    pub key: WriterKey,
    pub count: u64,
    pub sum_ns: u64,
    pub min_ns: u64,
    pub max_ns: u64,
    pub hist: Histogram,
    pub membarrier_calls: u64,
    pub membarrier_ns: u64,
    pub blocked_ns: u64,
    /// The thread's name when its row was made.
    pub thread: String,
}

impl WriterRow {
    pub fn from_stats(key: WriterKey, s: &WriterStats) -> Self {
        Self {
            key,
            count: s.count,
            sum_ns: s.sum_ns,
            min_ns: s.min_ns,
            max_ns: s.max_ns,
            hist: Histogram::from_counts(&s.hist),
            membarrier_calls: s.membarrier_calls,
            membarrier_ns: s.membarrier_ns,
            blocked_ns: s.blocked_ns,
            thread: comm_str(&s.comm),
        }
    }
}

impl Absorb for WriterRow {
    /// Adds `r`'s grace periods to this row (rows of processes summed together).
    fn absorb(&mut self, r: &WriterRow) {
        self.min_ns = min_with(self.count, self.min_ns, r.min_ns);
        self.max_ns = self.max_ns.max(r.max_ns);
        self.count += r.count;
        self.sum_ns += r.sum_ns;
        self.hist.add(&r.hist);
        self.membarrier_calls += r.membarrier_calls;
        self.membarrier_ns += r.membarrier_ns;
        self.blocked_ns += r.blocked_ns;
    }
}

/// The code that called a grace-period function: its return address, symbolized while the
/// process lived.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Deserialize)]
pub struct Caller {
    /// The return address at entry, in the process's address space.
    pub address: u64,
    /// The function it is in (demangled); null where the module has no symbol for it.
    pub symbol: Option<String>,
    /// Bytes from the start of `symbol` to `address`.
    pub offset: Option<u64>,
    /// The executable or library.
    pub module: Option<String>,
    /// The module's GNU build ID (hex): names the exact build, to find its symbols later
    /// (`/usr/lib/debug/.build-id/`, debuginfod, `membarrier-trace symbolize`).
    pub build_id: Option<String>,
    /// `address` as the module's file sees it: its ELF virtual address (what `addr2line -e`
    /// and objdump take; perf's `module+0xOFF`), the same under any ASLR.
    pub module_offset: Option<u64>,
    /// Source file and line of the call, where the module has debug info.
    pub file: Option<String>,
    pub line: Option<u32>,
}
