//! The data model every output reads: the collector turns the kernel's maps into a
//! [`Snapshot`]; [`Model::report`] turns snapshots into [`Report`]s, which the text and JSON
//! outputs, the metrics and the dashboard only render.

pub mod cmd;
pub mod findings;
pub mod hist;

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
};

use membarrier_trace_common::{
    CpuKey, Handled, HandlerKey, IPI_HIST, MovedRow, Stats, StatsKey, SummedRow, THREAD_CMDS,
    VICTIMS_OTHER, WakerKey, WriterKey, WriterStats, thread_cmd,
};
use serde::Serialize;

pub use crate::hook::Attach;
use cmd::Kind;
pub use hist::Bucket;
use hist::Histogram;

/// A probed grace-period function; its index in the collector's list is the uprobe's cookie.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpFunc {
    /// `memb`, `mb`, `qsbr`, `bp`, `signal`, or `custom` (`--rcu-func`).
    pub flavour: &'static str,
    pub function: String,
    /// The file it is in.
    pub library: PathBuf,
}

/// One kernel stats row, summed over CPUs.
#[derive(Clone, Debug)]
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
        Self {
            key,
            count: r.count,
            sum_ns: r.sum_ns,
            min_ns: r.min_ns,
            max_ns: r.max_ns,
            hist,
            ipi_hist: Vec::new(),
            mutex_wait_sum_ns: r.mutex_wait_sum_ns,
            mutex_wait_max_ns: r.mutex_wait_max_ns,
            ..Self::new(key)
        }
    }

    /// Rows the kernel summed by name (no breakdown histograms: it sums only rows it moves).
    pub fn from_summed(key: StatsKey, r: &SummedRow) -> Self {
        Self {
            key,
            count: r.count,
            sum_ns: r.sum_ns,
            min_ns: r.min_ns,
            max_ns: r.max_ns,
            hist: Histogram::from_counts(&r.hist),
            ipi_hist: Vec::new(),
            mutex_wait_sum_ns: r.mutex_wait_sum_ns,
            mutex_wait_max_ns: r.mutex_wait_max_ns,
            ..Self::new(key)
        }
    }

    /// A kernel stats row as read.
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
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
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

/// (process, cmd, flags): the calls a cmd row of the report stands for.
pub type StackGroup = (ProcKey, u32, u32);

/// Calls with one user stack.
#[derive(Clone, Debug, Default, PartialEq)]
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
#[derive(Clone, Debug, Default)]
pub struct Stacks {
    /// By (group, frames: innermost first).
    pub stacks: HashMap<(StackGroup, Vec<u64>), StackCount>,
    /// Calls sent without a readable stack (no registers or stack bytes), or with a new stack
    /// when `symbolize::MAX_STACKS` were kept.
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
#[derive(Clone, Debug, PartialEq)]
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
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
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
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
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
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
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
    /// IPI-per-CPU, waker or csd rows that did not fit: those figures are short.
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

/// `dropped` in the report: [`Losses`] but the missed calls, with their total.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
pub struct Dropped {
    pub calls_without_row: u64,
    pub calls_without_inflight_slot: u64,
    pub processes_not_tracked: u64,
    pub detail_rows: u64,
    pub unwind_rules: u64,
    pub grace_periods_without_row: u64,
    pub callers_unreported: u64,
    /// Not in `total`: not calls, processes or rows, and common (an IPI handler's csd events
    /// arrive while the target CPU is inside another tracer program).
    pub probe_runs_skipped: u64,
    /// Not in `total`: box-wide, and the calls among them already in `missed_calls` cannot be
    /// told apart; an upper bound on calls seen nowhere.
    pub hook_runs_skipped: u64,
    pub total: u64,
}

impl From<Losses> for Dropped {
    fn from(l: Losses) -> Self {
        Self {
            calls_without_row: l.calls_without_row,
            calls_without_inflight_slot: l.calls_without_inflight_slot,
            processes_not_tracked: l.processes_not_tracked,
            detail_rows: l.detail_rows,
            unwind_rules: l.unwind_rules,
            grace_periods_without_row: l.grace_periods_without_row,
            callers_unreported: l.callers_unreported,
            probe_runs_skipped: l.probe_runs_skipped,
            hook_runs_skipped: l.hook_runs_skipped,
            total: l.calls_without_row
                + l.calls_without_inflight_slot
                + l.processes_not_tracked
                + l.detail_rows
                + l.unwind_rules
                + l.grace_periods_without_row
                + l.callers_unreported,
        }
    }
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Report {
    /// Time since tracing started.
    pub duration_ns: u64,
    /// The window `calls_per_sec` figures are measured over: the last interval, or the whole run.
    pub window_ns: u64,
    pub calls: u64,
    /// Over the window (`window_ns`).
    pub calls_per_sec: f64,
    /// Over the whole run (`duration_ns`).
    pub run_calls_per_sec: f64,
    pub missed_calls: u64,
    /// Grace periods of userspace RCU writers seen only at their return.
    pub missed_grace_periods: u64,
    pub dropped: Dropped,
    /// Processes that have exited, each counted once (per-name entries count all theirs).
    pub exited_processes: u64,
    /// Of those, how many are summed into per-name entries (pid 0): past the 1,024 kept
    /// individually, those with the fewest calls and the least time in the call.
    pub exited_summed: u64,
    /// How their rows left the kernel.
    pub exited_rows: ExitedRows,
    /// `tracepoint`, `fentry` or `raw`.
    pub attach: Attach,
    pub grace_period_source: GraceSource,
    pub maps: Maps,
    pub processes: Vec<ProcessReport>,
    /// Userspace RCU grace periods per (process, function, caller), busiest first.
    pub rcu_writers: Vec<WriterReport>,
    /// Known pitfalls seen in the figures above (filled by `findings::of`), most severe first.
    pub findings: Vec<Finding>,
}

/// A known pitfall seen in the report (`findings::of` decides).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Warning,
    Critical,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Finding {
    /// The rule's id: `late_registration`, `unregistered_eperm`, `global_rate`,
    /// `global_unavailable`, `mutex_contention`, `ipi_storm`.
    pub rule: &'static str,
    pub severity: Severity,
    pub pid: u32,
    /// The process's serial (see `Proc::serial`): which process of that pid.
    #[serde(skip)]
    pub serial: u32,
    pub comm: String,
    /// The thread or caller where one is known; null otherwise.
    pub tid: Option<u32>,
    pub caller: Option<String>,
    pub evidence: serde_json::Value,
    pub cost: serde_json::Value,
    pub fix: String,
    pub reference: &'static str,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ProcessReport {
    /// 0 for an entry summing exited processes of one name.
    pub pid: u32,
    /// Tells apart processes that had the same pid over the run: numbered from 1 in order of
    /// creation while tracing; 0 for processes that existed when tracing started.
    pub serial: u32,
    pub comm: String,
    /// The process has exited (its figures are final).
    pub exited: bool,
    /// Processes this entry stands for: 1, or for a per-name entry of exited processes (pid 0)
    /// how many were summed into it.
    pub processes: u64,
    pub calls: u64,
    /// Over the window.
    pub calls_per_sec: f64,
    pub errors: u64,
    /// Successful calls of REGISTER_* cmds, the failed ones, and the time all of them took
    /// (one-off cost, apart from barriers).
    pub registrations: u64,
    pub registrations_failed: u64,
    pub registration_ns: u64,
    /// EPERM from expedited cmds: the process issued them without registering first.
    pub unregistered_eperm: u64,
    /// Over all its calls, every cmd.
    pub latency_ns: Latency,
    /// Time its threads spent inside membarrier during the window, as a share of the window
    /// (100 = one thread's worth of wall time; several threads can exceed it).
    pub time_inside_pct: f64,
    /// CPU time its calls cost, since the start.
    pub cpu_ns: CpuCost,
    /// That CPU time over the window as a share of one core (100 = a whole core).
    pub cpu_pct: f64,
    pub cmds: Vec<CmdReport>,
}

impl ProcessReport {
    /// A process known by its grace periods alone (liburcu's qsbr writers make no membarrier
    /// calls): not in the report's `processes`, but the dashboard lists it so its writers can
    /// be selected.
    pub fn of_writer(w: &WriterReport) -> Self {
        Self::empty(w.pid, w.serial, w.comm.clone())
    }

    /// A live process with no calls yet.
    fn empty(pid: u32, serial: u32, comm: String) -> Self {
        Self {
            pid,
            serial,
            comm,
            exited: false,
            processes: 1,
            calls: 0,
            calls_per_sec: 0.0,
            errors: 0,
            registrations: 0,
            registrations_failed: 0,
            registration_ns: 0,
            unregistered_eperm: 0,
            latency_ns: Latency::default(),
            time_inside_pct: 0.0,
            cpu_ns: CpuCost::default(),
            cpu_pct: 0.0,
            cmds: Vec::new(),
        }
    }
}

/// CPU time membarrier calls cost the machine.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
pub struct CpuCost {
    /// On the caller's CPU inside its calls (latency minus time blocked).
    pub caller: u64,
    /// In the IPI handlers its calls ran on other CPUs.
    pub ipi_handler: u64,
}

impl CpuCost {
    pub fn total(&self) -> u64 {
        self.caller + self.ipi_handler
    }
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct CmdReport {
    /// Kernel name (`PRIVATE_EXPEDITED`), or `INVALID(<value>)`.
    pub cmd: String,
    pub cmd_value: i32,
    pub kind: Kind,
    pub flags: u32,
    pub calls: u64,
    pub calls_per_sec: f64,
    pub errors: u64,
    /// Failed calls by errno name.
    pub errno: BTreeMap<String, u64>,
    /// Over every call of the row, failed ones included.
    pub latency_ns: Latency,
    pub histogram: Vec<Bucket>,
    /// Off-CPU time inside the call (the grace-period wait for GLOBAL and REGISTER_*).
    pub blocked_ns: Blocked,
    /// Latency minus blocked time, summed.
    pub on_cpu_ns: u64,
    /// Tasks that woke the caller while it was blocked inside the call, by comm.
    pub woken_by: BTreeMap<String, u64>,
    pub ipis: Ipis,
    pub mutex_wait_ns: MutexWait,
    /// The threads that made these calls, most calls first. For invalid cmds and flags, a
    /// thread's calls of all of them (they share a counter).
    pub threads: Vec<CmdThread>,
    /// `--stacks`: the calls per user stack, most calls first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stacks: Option<Vec<StackReport>>,
    /// `--stacks`: calls with no stack (not sent: the ring was full; or unreadable).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unattributed: Option<u64>,
}

/// Calls with one user stack.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct StackReport {
    pub calls: u64,
    pub latency_ns_sum: u64,
    /// The counts include calls sampled out over the stack rate, in proportion.
    pub estimated: bool,
    /// The unwinding stopped short of the outermost frame (the copy's end, or code without
    /// unwind information and frame pointers).
    pub truncated: bool,
    /// Calls of this stack the kernel unwound itself, without sending a sample (the calls
    /// they stand for over the stack rate not included).
    pub unwound_in_kernel: u64,
    /// Innermost first: the syscall's own instruction (in libc's wrapper), then each caller.
    pub frames: Vec<Caller>,
}

/// A thread's calls of one cmd.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct CmdThread {
    /// 0 for exited threads summed together (past the first 32 of a process).
    pub tid: u32,
    pub name: String,
    pub calls: u64,
    /// How many threads the entry stands for, when more than one: a `tid` 0 entry, or a tid
    /// that several threads of the process had in turn.
    #[serde(skip_serializing_if = "is_one")]
    pub threads: u64,
}

fn is_one(n: &u64) -> bool {
    *n == 1
}

impl CmdReport {
    /// Share of the row's latency spent blocked, in percent.
    pub fn blocked_pct(&self) -> f64 {
        self.blocked_ns.sum as f64 * 100.0 / self.latency_ns.sum.max(1) as f64
    }

    pub fn ipis_per_call(&self) -> f64 {
        self.ipis.sent as f64 / self.calls.max(1) as f64
    }
}

#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
pub struct Blocked {
    pub sum: u64,
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
}

#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Ipis {
    pub sent: u64,
    /// IPIs by target CPU number.
    pub per_cpu: BTreeMap<String, u64>,
    /// Calls by IPIs they sent (`ipis` = that many; the last bucket holds that many or more).
    pub per_call: Vec<IpiBucket>,
    /// Time the targets spent in membarrier's IPI handler for these calls.
    pub handler_ns: u64,
    /// Whose work the handlers interrupted, most interrupts first.
    pub victims: Vec<IpiVictim>,
}

/// A process that was running on a target CPU when the handler of these calls ran there.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct IpiVictim {
    /// Its tgid; 0: the CPU was idle; null: all victims past the room of the kernel's map
    /// (`HANDLED`, 4096 rows).
    pub pid: Option<u32>,
    /// The interrupted thread's name at the first interrupt.
    pub comm: String,
    /// Handler runs on its CPU time.
    pub interrupts: u64,
    pub handler_ns: u64,
}

#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
pub struct IpiBucket {
    pub ipis: u64,
    pub count: u64,
}

#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
pub struct MutexWait {
    pub sum: u64,
    pub max: u64,
}

#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
pub struct Latency {
    pub min: u64,
    pub max: u64,
    pub sum: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
}

impl Latency {
    /// Exact min, max and sum; percentiles read from `hist`.
    pub(crate) fn new(hist: &Histogram, min: u64, max: u64, sum: u64) -> Self {
        Self {
            min,
            max,
            sum,
            p50: hist.quantile(0.5, min, max),
            p90: hist.quantile(0.9, min, max),
            p99: hist.quantile(0.99, min, max),
            p999: hist.quantile(0.999, min, max),
        }
    }
}

impl Report {
    /// Before the first snapshot.
    pub fn empty() -> Self {
        Self {
            duration_ns: 0,
            window_ns: 0,
            calls: 0,
            calls_per_sec: 0.0,
            run_calls_per_sec: 0.0,
            missed_calls: 0,
            missed_grace_periods: 0,
            dropped: Dropped::default(),
            exited_processes: 0,
            exited_summed: 0,
            exited_rows: ExitedRows::default(),
            attach: Attach::Tracepoint,
            grace_period_source: GraceSource::None,
            maps: Maps::default(),
            processes: Vec::new(),
            rcu_writers: Vec::new(),
            findings: Vec::new(),
        }
    }
}

/// (tgid, serial, cmd, flags): one cmd row of one process.
type Group = (u32, u32, u32, u32);

/// A process's latency histogram and least latency over the run, and its latency and CPU time
/// summed over the window.
struct WindowSums(Histogram, u64, u64, u64);

impl Default for WindowSums {
    fn default() -> Self {
        Self(Histogram::default(), u64::MAX, 0, 0)
    }
}

/// Turns snapshots into reports, remembering the previous one for per-window rates.
#[derive(Default)]
pub struct Model {
    /// Calls, latency sum and CPU time per (process, cmd, flags) at the previous report.
    prev: HashMap<Group, (u64, u64, u64)>,
    /// Grace periods per (process, function, caller) at the previous report.
    prev_writers: HashMap<(u32, u32, u32, u64), u64>,
    prev_elapsed_ns: u64,
}

impl Model {
    pub fn report(&mut self, snap: &Snapshot) -> Report {
        let window_ns = snap.elapsed_ns.saturating_sub(self.prev_elapsed_ns);
        let per_sec = |n: u64| {
            if window_ns == 0 {
                0.0
            } else {
                n as f64 * 1e9 / window_ns as f64
            }
        };
        let mut detail = Detail::index(snap);
        let mut processes: BTreeMap<ProcKey, ProcessReport> = BTreeMap::new();
        let mut next = HashMap::new();
        // Per process: all its calls' latencies, and latency and CPU time over the window.
        let mut proc_hist: HashMap<ProcKey, WindowSums> = HashMap::new();
        for ((tgid, serial, cmd_value, flags), rows) in group_rows(snap) {
            let proc_key = (tgid, serial);
            let group = (tgid, serial, cmd_value as u32, flags);
            let (before, sum_before, cpu_before) =
                self.prev.get(&group).copied().unwrap_or((0, 0, 0));
            let (row, all, cost) = cmd_report(group, cmd_value, &rows, &mut detail, snap);
            let row = CmdReport {
                calls_per_sec: per_sec(row.calls.saturating_sub(before)),
                ..row
            };
            next.insert(group, (all.count, all.sum_ns, cost.total()));
            let ph = proc_hist.entry(proc_key).or_default();
            ph.0.add(&all.hist);
            ph.1 = ph.1.min(all.min_ns);
            ph.2 += all.sum_ns.saturating_sub(sum_before);
            ph.3 += cost.total().saturating_sub(cpu_before);
            let p = processes.entry(proc_key).or_insert_with(|| ProcessReport {
                exited: snap.exited.contains_key(&proc_key),
                processes: snap.exited.get(&proc_key).copied().unwrap_or(1),
                ..ProcessReport::empty(
                    tgid,
                    serial,
                    snap.comms.get(&proc_key).cloned().unwrap_or_default(),
                )
            });
            p.add_cmd(row, cost);
        }
        self.prev = next;
        self.prev_elapsed_ns = snap.elapsed_ns;
        let rcu_writers = self.writers_with_rates(snap, per_sec);
        let pct = |ns: u64| {
            if window_ns == 0 {
                0.0
            } else {
                ns as f64 * 100.0 / window_ns as f64
            }
        };
        for (key, p) in processes.iter_mut() {
            let WindowSums(hist, min, window_sum, window_cpu) = &proc_hist[key];
            p.latency_ns = Latency::new(hist, *min, p.latency_ns.max, p.latency_ns.sum);
            p.time_inside_pct = pct(*window_sum);
            p.cpu_pct = pct(*window_cpu);
        }
        let processes = busiest_first(processes.into_values().collect());
        let calls = processes.iter().map(|p| p.calls).sum();
        Report {
            duration_ns: snap.elapsed_ns,
            window_ns,
            calls,
            calls_per_sec: processes.iter().fold(0.0, |a, p| a + p.calls_per_sec),
            run_calls_per_sec: if snap.elapsed_ns == 0 {
                0.0
            } else {
                calls as f64 * 1e9 / snap.elapsed_ns as f64
            },
            missed_calls: snap.losses.missed_calls,
            missed_grace_periods: snap.losses.missed_grace_periods,
            dropped: snap.losses.into(),
            exited_processes: snap.exited.values().sum(),
            exited_summed: snap
                .exited
                .iter()
                .filter(|(p, _)| p.0 == 0)
                .map(|(_, n)| n)
                .sum(),
            exited_rows: snap.exited_rows,
            attach: snap.attach,
            grace_period_source: snap.grace_period_source,
            maps: snap.maps,
            processes,
            rcu_writers,
            findings: Vec::new(),
        }
    }

    /// The RCU writers, each with its grace periods per second over the window.
    fn writers_with_rates(
        &mut self,
        snap: &Snapshot,
        per_sec: impl Fn(u64) -> f64,
    ) -> Vec<WriterReport> {
        let mut rcu_writers =
            writer_reports(&snap.writers, &snap.gp_funcs, &snap.callers, &snap.comms);
        let mut writers_next = HashMap::new();
        for w in &mut rcu_writers {
            let key = (w.pid, w.serial, w.func, w.caller.address);
            let before = self.prev_writers.get(&key).copied().unwrap_or(0);
            w.grace_periods_per_sec = per_sec(w.grace_periods.saturating_sub(before));
            writers_next.insert(key, w.grace_periods);
        }
        self.prev_writers = writers_next;
        rcu_writers
    }
}

/// The snapshot's stats rows by (tgid, serial, cmd, flags): one per outcome (errno) each.
fn group_rows(snap: &Snapshot) -> BTreeMap<(u32, u32, i32, u32), Vec<&RawRow>> {
    let mut groups: BTreeMap<(u32, u32, i32, u32), Vec<&RawRow>> = BTreeMap::new();
    for row in &snap.rows {
        let k = row.key;
        groups
            .entry((k.tgid, k.serial, k.cmd as i32, k.flags))
            .or_default()
            .push(row);
    }
    groups
}

/// The snapshot's detail, apart from the stats rows: by group (tgid, serial, cmd, flags), or by
/// process for threads. Each group's share is taken out as its row is built.
struct Detail<'a> {
    per_cpu: HashMap<Group, BTreeMap<String, u64>>,
    wakers: HashMap<Group, BTreeMap<String, u64>>,
    threads: HashMap<ProcKey, Vec<&'a ThreadRow>>,
    handler: HashMap<Group, u64>,
    victims: HashMap<Group, Vec<IpiVictim>>,
    /// --stacks: each group's stacks.
    stacks: HashMap<StackGroup, Vec<(&'a [u64], &'a StackCount)>>,
}

impl<'a> Detail<'a> {
    fn index(snap: &'a Snapshot) -> Self {
        let mut d = Detail {
            per_cpu: HashMap::new(),
            wakers: HashMap::new(),
            threads: HashMap::new(),
            handler: HashMap::new(),
            victims: HashMap::new(),
            stacks: HashMap::new(),
        };
        for (k, n) in &snap.ipi_cpus {
            *d.per_cpu
                .entry((k.tgid, k.serial, k.cmd, k.flags))
                .or_default()
                .entry(k.cpu.to_string())
                .or_default() += n;
        }
        for (k, n) in &snap.wakers {
            *d.wakers
                .entry((k.tgid, k.serial, k.cmd, k.flags))
                .or_default()
                .entry(comm_str(&k.comm))
                .or_default() += n;
        }
        for t in &snap.threads {
            d.threads.entry(t.proc).or_default().push(t);
        }
        for (k, h) in &snap.handled {
            let group = (k.tgid, k.serial, k.cmd, k.flags);
            *d.handler.entry(group).or_default() += h.ns;
            d.victims.entry(group).or_default().push(IpiVictim {
                pid: (k.victim != VICTIMS_OTHER).then_some(k.victim),
                comm: comm_str(&h.comm),
                interrupts: h.runs,
                handler_ns: h.ns,
            });
        }
        for v in d.victims.values_mut() {
            v.sort_by(|a, b| b.interrupts.cmp(&a.interrupts).then(a.pid.cmp(&b.pid)));
        }
        for ((g, frames), c) in snap.stacks.iter().flat_map(|s| &s.stacks) {
            d.stacks.entry(*g).or_default().push((frames, c));
        }
        d
    }
}

/// One group's row of the report, from its stats rows (one per errno) and its detail; its rate
/// is left to the caller, which knows the window. Returns the rows summed and the CPU cost too.
fn cmd_report(
    group: Group,
    cmd_value: i32,
    rows: &[&RawRow],
    detail: &mut Detail,
    snap: &Snapshot,
) -> (CmdReport, RawRow, CpuCost) {
    let (tgid, serial, _, flags) = group;
    let proc_key = (tgid, serial);
    let mut all = RawRow::new(rows[0].key);
    let mut errno = BTreeMap::new();
    let mut errors = 0;
    for r in rows {
        all.absorb(r);
        if r.key.errno != 0 {
            errors += r.count;
            *errno.entry(cmd::errno_name(r.key.errno)).or_insert(0) += r.count;
        }
    }
    let (calls, sum, min, max) = (all.count, all.sum_ns, all.min_ns, all.max_ns);
    // The kernel only counts calls with a non-zero breakdown; the rest had none.
    all.blocked_hist
        .add_to(0, calls.saturating_sub(all.blocked_hist.total()));
    all.ipi_hist[0] += calls.saturating_sub(all.ipi_hist.iter().sum());
    let cost = CpuCost {
        caller: sum.saturating_sub(all.blocked_sum_ns),
        ipi_handler: detail.handler.get(&group).copied().unwrap_or(0),
    };
    let row = CmdReport {
        cmd: cmd::display_name(cmd_value),
        cmd_value,
        kind: cmd::kind_with_flags(cmd_value, flags),
        flags,
        calls,
        calls_per_sec: 0.0,
        errors,
        errno,
        latency_ns: Latency::new(&all.hist, min, max, sum),
        histogram: all.hist.buckets(max),
        blocked_ns: Blocked {
            sum: all.blocked_sum_ns,
            p50: all.blocked_hist.quantile(0.5, 0, all.blocked_max_ns),
            p99: all.blocked_hist.quantile(0.99, 0, all.blocked_max_ns),
            max: all.blocked_max_ns,
        },
        on_cpu_ns: cost.caller,
        woken_by: detail.wakers.remove(&group).unwrap_or_default(),
        ipis: Ipis {
            sent: all.ipis,
            per_cpu: detail.per_cpu.remove(&group).unwrap_or_default(),
            per_call: all
                .ipi_hist
                .iter()
                .enumerate()
                .filter(|(_, c)| **c > 0)
                .map(|(i, &count)| IpiBucket {
                    ipis: i as u64,
                    count,
                })
                .collect(),
            handler_ns: cost.ipi_handler,
            victims: detail.victims.remove(&group).unwrap_or_default(),
        },
        mutex_wait_ns: MutexWait {
            sum: all.mutex_wait_sum_ns,
            max: all.mutex_wait_max_ns,
        },
        threads: cmd_threads(detail.threads.get(&proc_key), cmd_value as u32, flags),
        stacks: None,
        unattributed: None,
    };
    let Some(st) = &snap.stacks else {
        return (row, all, cost);
    };
    let g = (proc_key, cmd_value as u32, flags);
    let mine = detail.stacks.remove(&g).unwrap_or_default();
    // Calls sampled out with no sample taken to stand for them have no stack.
    let orphans = if mine.iter().any(|(_, c)| c.sampled > 0) {
        0
    } else {
        all.stacks_sampled_out
    };
    let row = CmdReport {
        stacks: Some(stack_reports(
            &mine,
            all.stacks_sampled_out,
            &snap.callers,
            proc_key,
        )),
        unattributed: Some(
            all.stacks_unsent + st.unattributed.get(&g).copied().unwrap_or(0) + orphans,
        ),
        ..row
    };
    (row, all, cost)
}

impl ProcessReport {
    /// Adds one of its cmds' rows to the process's totals, and the row to its list.
    fn add_cmd(&mut self, row: CmdReport, cost: CpuCost) {
        self.cpu_ns.caller += cost.caller;
        self.cpu_ns.ipi_handler += cost.ipi_handler;
        self.latency_ns.sum += row.latency_ns.sum;
        self.latency_ns.max = self.latency_ns.max.max(row.latency_ns.max);
        if row.kind == Kind::Registration {
            self.registrations += row.calls - row.errors;
            self.registrations_failed += row.errors;
            self.registration_ns += row.latency_ns.sum;
        }
        if row.kind == Kind::Barrier {
            self.unregistered_eperm += row.errno.get("EPERM").copied().unwrap_or(0);
        }
        self.calls += row.calls;
        self.calls_per_sec += row.calls_per_sec;
        self.errors += row.errors;
        self.cmds.push(row);
    }
}

/// Busiest process first, and in each its busiest cmd first; ties by pid (and serial) or cmd,
/// so the order is stable.
fn busiest_first(mut processes: Vec<ProcessReport>) -> Vec<ProcessReport> {
    processes.sort_by(|a, b| {
        b.calls
            .cmp(&a.calls)
            .then(a.pid.cmp(&b.pid))
            .then(a.serial.cmp(&b.serial))
    });
    for p in &mut processes {
        p.cmds
            .sort_by(|a, b| b.calls.cmp(&a.calls).then(a.cmd_value.cmp(&b.cmd_value)));
    }
    processes
}

/// The threads of a process that made calls of `cmd` with `flags`, most calls first.
fn cmd_threads(threads: Option<&Vec<&ThreadRow>>, cmd: u32, flags: u32) -> Vec<CmdThread> {
    let i = thread_cmd(cmd, flags);
    let mut out: Vec<CmdThread> = threads
        .into_iter()
        .flatten()
        .filter(|t| t.calls[i] > 0)
        .map(|t| CmdThread {
            tid: t.tid,
            name: t.name.clone(),
            calls: t.calls[i],
            threads: t.threads,
        })
        .collect();
    // Summed exited threads last.
    out.sort_by(|a, b| {
        (a.tid == 0)
            .cmp(&(b.tid == 0))
            .then(b.calls.cmp(&a.calls))
            .then(a.tid.cmp(&b.tid))
    });
    out
}

// Userspace RCU writers: the kernel's grace-period rows (per process, thread, function and
// caller) grouped per (process, function, caller).

/// One kernel grace-period row, as read.
#[derive(Clone, Debug, PartialEq)]
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
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Caller {
    /// The return address at entry, in the process's address space.
    pub address: u64,
    /// The function it is in (demangled); null where the module has no symbol for it.
    pub symbol: Option<String>,
    /// Bytes from the start of `symbol` to `address`.
    pub offset: Option<u64>,
    /// The executable or library.
    pub module: Option<String>,
    /// Source file and line of the call, where the module has debug info.
    pub file: Option<String>,
    pub line: Option<u32>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct WriterThread {
    pub tid: u32,
    pub name: String,
    pub grace_periods: u64,
}

/// Grace periods of one (process, function, caller).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct WriterReport {
    pub pid: u32,
    pub serial: u32,
    pub comm: String,
    /// `memb`, `mb`, `qsbr`, `bp`, `signal`, or `custom` (`--rcu-func`).
    pub flavour: String,
    pub function: String,
    pub library: String,
    pub caller: Caller,
    pub threads: Vec<WriterThread>,
    pub grace_periods: u64,
    /// Over the window.
    pub grace_periods_per_sec: f64,
    /// Index of the function among the probed ones (the kernel rows' key).
    #[serde(skip)]
    pub func: u32,
    /// Entry to return of each grace period.
    pub latency_ns: Latency,
    pub histogram: Vec<Bucket>,
    /// Membarrier calls made inside the grace periods, and their time.
    pub membarrier_calls: u64,
    pub membarrier_ns: u64,
    /// Off-CPU time inside, outside membarrier calls: waiting for readers.
    pub blocked_ns: u64,
}

/// One cmd row's stacks, busiest first. Stacks taken over the stack rate stand for the calls
/// sampled out beside them (`sampled_out`, of the row), in proportion: their counts are
/// estimates; the others are exact.
fn stack_reports(
    stacks: &[(&[u64], &StackCount)],
    sampled_out: u64,
    callers: &HashMap<(ProcKey, u64), Caller>,
    p: ProcKey,
) -> Vec<StackReport> {
    let sampled: u64 = stacks.iter().map(|(_, c)| c.sampled).sum();
    let scale = if sampled == 0 {
        1.0
    } else {
        (sampled + sampled_out) as f64 / sampled as f64
    };
    let mut out: Vec<StackReport> = stacks
        .iter()
        .map(|(frames, c)| StackReport {
            calls: c.exact + (c.sampled as f64 * scale).round() as u64,
            latency_ns_sum: c.exact_ns + (c.sampled_ns as f64 * scale).round() as u64,
            estimated: c.sampled > 0,
            truncated: !c.complete,
            unwound_in_kernel: c.kernel,
            frames: frames
                .iter()
                .map(|&a| {
                    callers.get(&(p, a)).cloned().unwrap_or(Caller {
                        address: a,
                        ..Default::default()
                    })
                })
                .collect(),
        })
        .collect();
    out.sort_by(|a, b| {
        b.calls.cmp(&a.calls).then_with(|| {
            a.frames
                .iter()
                .map(|f| f.address)
                .cmp(b.frames.iter().map(|f| f.address))
        })
    });
    out
}

/// Groups grace-period rows per (process, function, caller), busiest first.
pub fn writer_reports(
    rows: &[WriterRow],
    funcs: &[GpFunc],
    callers: &HashMap<(ProcKey, u64), Caller>,
    comms: &HashMap<ProcKey, String>,
) -> Vec<WriterReport> {
    let mut groups: BTreeMap<(u32, u32, u32, u64), Vec<&WriterRow>> = BTreeMap::new();
    for r in rows.iter().filter(|r| r.count > 0) {
        let k = r.key;
        groups
            .entry((k.tgid, k.serial, k.func, k.caller))
            .or_default()
            .push(r);
    }
    let mut out: Vec<WriterReport> = groups
        .into_iter()
        .map(|((tgid, serial, func, caller), rows)| {
            let mut all = rows[0].clone();
            for r in &rows[1..] {
                all.absorb(r);
            }
            let mut threads: BTreeMap<u32, WriterThread> = BTreeMap::new();
            for r in &rows {
                threads
                    .entry(r.key.tid)
                    .or_insert_with(|| WriterThread {
                        tid: r.key.tid,
                        name: r.thread.clone(),
                        grace_periods: 0,
                    })
                    .grace_periods += r.count;
            }
            let f = funcs.get(func as usize);
            WriterReport {
                pid: tgid,
                serial,
                comm: comms.get(&(tgid, serial)).cloned().unwrap_or_default(),
                flavour: f.map_or("unknown", |f| f.flavour).to_string(),
                function: f.map(|f| f.function.clone()).unwrap_or_default(),
                library: f
                    .map(|f| f.library.display().to_string())
                    .unwrap_or_default(),
                caller: callers
                    .get(&((tgid, serial), caller))
                    .cloned()
                    .unwrap_or(Caller {
                        address: caller,
                        ..Default::default()
                    }),
                threads: threads.into_values().collect(),
                grace_periods: all.count,
                grace_periods_per_sec: 0.0,
                func,
                latency_ns: Latency::new(&all.hist, all.min_ns, all.max_ns, all.sum_ns),
                histogram: all.hist.buckets(all.max_ns),
                membarrier_calls: all.membarrier_calls,
                membarrier_ns: all.membarrier_ns,
                blocked_ns: all.blocked_ns,
            }
        })
        .collect();
    out.sort_by(|a, b| {
        b.grace_periods
            .cmp(&a.grace_periods)
            .then(a.pid.cmp(&b.pid))
            .then(a.caller.address.cmp(&b.caller.address))
    });
    out
}

/// One `calibrate` scenario's figures, from the tracer's rows of its processes.
#[derive(Clone, Debug, Serialize)]
pub struct Calibration {
    pub scenario: String,
    pub cmd: String,
    pub siblings: usize,
    pub calls: u64,
    pub errors: u64,
    /// The errno names of failed calls (a cmd this kernel lacks: EINVAL).
    pub errno: Vec<String>,
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub mean_ns: u64,
    /// The caller's on-CPU time per call (latency minus time blocked).
    pub caller_cpu_ns_per_call: u64,
    pub ipis_per_call: f64,
    /// Handler time on the target CPU per IPI.
    pub handler_ns_per_ipi: u64,
}

impl Calibration {
    /// Share of one core the caller spends at `rate` calls per second, in percent.
    pub fn caller_pct_at(&self, rate: f64) -> f64 {
        rate * self.caller_cpu_ns_per_call as f64 / 1e9 * 100.0
    }

    /// Handler time per second on each CPU interrupted, at `rate` calls per second, in µs.
    pub fn handler_us_per_cpu_at(&self, rate: f64) -> f64 {
        if self.siblings == 0 {
            return 0.0;
        }
        rate * self.ipis_per_call * self.handler_ns_per_ipi as f64 / self.siblings as f64 / 1e3
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The kernel's calls of a stack join the samples' in one entry; past the bound a new
    /// stack's calls are unattributed, not lost.
    #[test]
    fn stacks_from_both_unwinders_add_into_one() {
        let g = ((7, 0), 8, 0);
        let mut st = Stacks::default();
        let sampled = StackCount {
            exact: 2,
            exact_ns: 20,
            ..Default::default()
        };
        let in_kernel = StackCount {
            exact: 5,
            exact_ns: 50,
            sampled: 1,
            sampled_ns: 9,
            complete: true,
            kernel: 6,
        };
        st.add(g, vec![1, 2], &sampled, 2);
        st.add(g, vec![1, 2], &in_kernel, 2);
        st.add(g, vec![1, 3], &sampled, 2);
        st.add(g, vec![1, 4], &in_kernel, 2);
        assert_eq!(st.stacks.len(), 2);
        assert_eq!(
            st.stacks[&(g, vec![1, 2])],
            StackCount {
                exact: 7,
                exact_ns: 70,
                sampled: 1,
                sampled_ns: 9,
                complete: true,
                kernel: 6,
            }
        );
        assert_eq!(st.unattributed[&g], 6);
    }

    pub(crate) fn row(tgid: u32, cmd: i32, errno: u32, lat: &[u64]) -> RawRow {
        let mut hist = Histogram::default();
        lat.iter().for_each(|&l| hist.record(l));
        RawRow {
            count: lat.len() as u64,
            sum_ns: lat.iter().sum(),
            min_ns: *lat.iter().min().unwrap(),
            max_ns: *lat.iter().max().unwrap(),
            hist,
            ..RawRow::new(StatsKey {
                tgid,
                serial: 0,
                cmd: cmd as u32,
                flags: 0,
                errno,
            })
        }
    }

    pub(crate) fn snapshot() -> Snapshot {
        Snapshot {
            elapsed_ns: 2_000_000_000,
            rows: vec![
                row(42, 8, 0, &[400, 500, 600, 700]),
                row(42, 8, 1, &[100, 120]),
                row(42, 1, 0, &[12_000_000]),
                row(7, 0, 0, &[90]),
                row(7, 3, 22, &[80]),
            ],
            losses: Losses {
                missed_calls: 1,
                ..Losses::default()
            },
            comms: [((42, 0), "urcu".to_string()), ((7, 0), "other".to_string())].into(),
            ..Snapshot::default()
        }
    }

    #[test]
    fn groups_outcomes_into_cmd_rows() {
        let r = Model::default().report(&snapshot());
        assert_eq!(r.calls, 9);
        assert_eq!(r.processes.len(), 2);
        let p = &r.processes[0];
        assert_eq!(
            (p.pid, p.comm.as_str(), p.calls, p.errors),
            (42, "urcu", 7, 2)
        );
        let pe = &p.cmds[0];
        assert_eq!(pe.cmd, "PRIVATE_EXPEDITED");
        assert_eq!((pe.calls, pe.errors), (6, 2));
        assert_eq!(pe.errno, [("EPERM".to_string(), 2)].into());
        assert_eq!(pe.latency_ns.min, 100);
        assert_eq!(pe.latency_ns.max, 700);
        assert_eq!(pe.latency_ns.sum, 2420);
        assert_eq!(pe.histogram.iter().map(|b| b.count).sum::<u64>(), 6);
        assert_eq!(p.cmds[1].kind, Kind::GracePeriod);
        assert_eq!(p.cmds[1].latency_ns.p50, 12_000_000);
        let inv = r.processes[1]
            .cmds
            .iter()
            .find(|c| c.cmd_value == 3)
            .unwrap();
        assert_eq!(inv.cmd, "INVALID(3)");
        assert_eq!(inv.kind, Kind::Invalid);
        assert_eq!(inv.errno, [("EINVAL".to_string(), 1)].into());
    }

    #[test]
    fn breakdown_fills_zero_buckets_and_joins_side_maps() {
        let mut snap = snapshot();
        // Of 4 PRIVATE_EXPEDITED calls, 3 sent IPIs (1, 1, 2) and one was blocked 300 ns.
        let r0 = &mut snap.rows[0];
        r0.ipis = 4;
        r0.ipi_hist[1] = 2;
        r0.ipi_hist[2] = 1;
        r0.blocked_sum_ns = 300;
        r0.blocked_max_ns = 300;
        r0.blocked_hist.record(300);
        r0.mutex_wait_sum_ns = 50;
        r0.mutex_wait_max_ns = 50;
        snap.ipi_cpus = vec![(
            CpuKey {
                tgid: 42,
                serial: 0,
                cmd: 8,
                flags: 0,
                cpu: 1,
            },
            4,
        )];
        let mut comm = [0u8; 16];
        comm[..11].copy_from_slice(b"rcu_preempt");
        snap.wakers = vec![(
            WakerKey {
                tgid: 42,
                serial: 0,
                cmd: 1,
                flags: 0,
                comm,
            },
            1,
        )];
        let victim = |victim: u32, name: &[u8], runs: u64, ns: u64| {
            let mut comm = [0u8; 16];
            comm[..name.len()].copy_from_slice(name);
            let key = HandlerKey {
                tgid: 42,
                serial: 0,
                cmd: 8,
                flags: 0,
                victim,
            };
            (key, Handled { runs, ns, comm })
        };
        snap.handled = vec![
            victim(0, b"swapper/1", 1, 100),
            victim(7, b"spin", 3, 800),
            victim(VICTIMS_OTHER, b"", 1, 0),
        ];
        snap.grace_period_source = GraceSource::Sched;
        let r = Model::default().report(&snap);
        let pe = &r.processes[0].cmds[0];
        assert_eq!(pe.ipis.sent, 4);
        assert_eq!(pe.ipis.per_cpu, [("1".to_string(), 4)].into());
        // 6 calls in the row (4 ok + 2 EPERM): 3 without IPIs.
        let per_call: Vec<(u64, u64)> =
            pe.ipis.per_call.iter().map(|b| (b.ipis, b.count)).collect();
        assert_eq!(per_call, vec![(0, 3), (1, 2), (2, 1)]);
        assert_eq!(pe.ipis.handler_ns, 900);
        let victims: Vec<(Option<u32>, &str, u64, u64)> = pe
            .ipis
            .victims
            .iter()
            .map(|v| (v.pid, v.comm.as_str(), v.interrupts, v.handler_ns))
            .collect();
        assert_eq!(
            victims,
            [
                (Some(7), "spin", 3, 800),
                (None, "", 1, 0),
                (Some(0), "swapper/1", 1, 100)
            ]
        );
        assert_eq!(pe.blocked_ns.sum, 300);
        assert_eq!(pe.blocked_ns.p50, 0);
        assert_eq!(pe.blocked_ns.max, 300);
        assert_eq!(pe.on_cpu_ns, 2420 - 300);
        assert_eq!(pe.mutex_wait_ns, MutexWait { sum: 50, max: 50 });
        let global = &r.processes[0].cmds[1];
        assert_eq!(global.woken_by, [("rcu_preempt".to_string(), 1)].into());
        assert_eq!(r.grace_period_source, GraceSource::Sched);
    }

    #[test]
    fn rates_cover_the_last_window() {
        let mut m = Model::default();
        let mut s = snapshot();
        let first = m.report(&s);
        assert_eq!(first.window_ns, 2_000_000_000);
        assert_eq!(first.processes[0].cmds[0].calls_per_sec, 3.0);
        // One second later, 10 more PRIVATE_EXPEDITED calls.
        s.elapsed_ns += 1_000_000_000;
        s.rows[0] = row(42, 8, 0, &[500; 14]);
        let second = m.report(&s);
        assert_eq!(second.window_ns, 1_000_000_000);
        assert_eq!(second.processes[0].cmds[0].calls, 16);
        assert_eq!(second.processes[0].cmds[0].calls_per_sec, 10.0);
        assert_eq!(second.processes[1].calls_per_sec, 0.0);
        // Only the window's latency counts toward time inside: 14 x 500 ns minus the first
        // report's 2200 ns of PRIVATE_EXPEDITED, over 1 s.
        let pct = second.processes[0].time_inside_pct;
        assert!(
            (pct - (7000.0 - 2200.0) * 100.0 / 1e9).abs() < 1e-9,
            "{pct}"
        );
    }

    #[test]
    fn json_shape() {
        let r = Model::default().report(&snapshot());
        let v = serde_json::to_value(&r).unwrap();
        for f in [
            "duration_ns",
            "missed_calls",
            "dropped",
            "grace_period_source",
            "processes",
        ] {
            assert!(v.get(f).is_some(), "top-level {f}");
        }
        let p = &v["processes"][0];
        for f in [
            "pid",
            "comm",
            "calls",
            "errors",
            "unregistered_eperm",
            "cmds",
        ] {
            assert!(p.get(f).is_some(), "process {f}");
        }
        let c = &p["cmds"][0];
        for f in [
            "cmd",
            "cmd_value",
            "flags",
            "calls",
            "errors",
            "errno",
            "latency_ns",
            "histogram",
        ] {
            assert!(c.get(f).is_some(), "cmd {f}");
        }
        for f in ["min", "max", "sum", "p50", "p90", "p99", "p999"] {
            assert!(c["latency_ns"][f].is_u64(), "latency {f}");
        }
        assert!(c["histogram"][0]["le_ns"].is_u64());
        assert!(c["histogram"][0]["count"].is_u64());
        assert_eq!(c["errno"]["EPERM"], 2);
        assert_eq!(c["kind"], "barrier");
        for f in ["sum", "p50", "p99", "max"] {
            assert!(c["blocked_ns"][f].is_u64(), "blocked {f}");
        }
        for f in ["sent", "per_cpu", "per_call", "handler_ns", "victims"] {
            assert!(c["ipis"].get(f).is_some(), "ipis {f}");
        }
        assert!(c["mutex_wait_ns"]["sum"].is_u64() && c["mutex_wait_ns"]["max"].is_u64());
        assert!(p["unregistered_eperm"].is_u64());
        assert_eq!(v["grace_period_source"], "sched");
    }
}
