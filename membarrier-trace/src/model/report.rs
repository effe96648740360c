//! What every output renders: a [`Report`] of processes and their cmds, with latencies,
//! the breakdown, threads, stacks, RCU writers and findings; and `calibrate`'s figures.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{
    cmd::Kind,
    hist::{Bucket, Histogram},
};
use crate::hook::Attach;

use super::snapshot::*;

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
    /// The JSON document's version ([`SCHEMA`]): a field's meaning never changes within one;
    /// fields are only added.
    pub schema: u32,
    /// The wall-clock time of the figures, RFC 3339 in UTC: to match them with the fleet's
    /// logs and metrics.
    pub time: String,
    pub hostname: String,
    /// The kernel's release (`uname -r`).
    pub kernel: String,
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

/// The JSON document's schema version: 2 added `schema`, `time`, `hostname`, and `build_id`
/// and `module_offset` on frames and callers.
pub const SCHEMA: u32 = 2;

/// `unix_ns` as RFC 3339 in UTC, to the millisecond: `2026-12-05T23:47:01.250Z`.
pub fn rfc3339(unix_ns: u64) -> String {
    let secs = unix_ns / 1_000_000_000;
    let ms = unix_ns / 1_000_000 % 1000;
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
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
    pub(super) fn empty(pid: u32, serial: u32, comm: String) -> Self {
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
            schema: SCHEMA,
            time: String::new(),
            hostname: String::new(),
            kernel: String::new(),
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
