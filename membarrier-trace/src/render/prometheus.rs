//! The report as Prometheus metrics: the text exposition format 0.0.4, or OpenMetrics 1.0 when
//! the scraper asks for it. Pure rendering; serving and forgetting exited processes are in
//! [`crate::app::exporter`].

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::{
    model::{
        Bucket, CmdReport, CpuCost, ProcessReport, Report, WriterReport, findings::main_figure,
    },
    render::{protobuf::Proto, text::code_name},
};

/// What the series are keyed by.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum By {
    /// One set of series per process (`pid` and `comm` labels).
    #[default]
    Pid,
    /// Processes of one name summed (`comm` label only): bounded by the names on the box, and
    /// exited processes' counts stay in their name's counters.
    Comm,
}

/// Upper bounds (inclusive, ns) of the duration histogram's classic buckets: four per power of
/// two from 64 ns to 2^34 ns (17 s), at edges of the kernel's own buckets (16 per power of
/// two: 16/16, 19/16, 23/16 and 27/16 of each), so each count is exact. Neighbours are at most
/// 21% apart, so `histogram_quantile` (which interpolates inside a bucket) is within 21% of
/// the true quantile, where two per power of two could be 41% off.
pub fn duration_bounds_ns() -> Vec<u64> {
    let mut v = Vec::new();
    for e in 6..34 {
        for m in [16u64, 19, 23, 27] {
            v.push((m << e) / 16 - 1);
        }
    }
    v.push((1u64 << 34) - 1);
    v
}

/// Escapes a label value (backslash, double quote, newline), as both formats require.
fn label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// Which exposition a scrape asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exposition {
    /// The text format 0.0.4.
    Text,
    OpenMetrics,
    /// Delimited protobuf MetricFamily messages, the durations as native histograms.
    Protobuf,
}

/// A sample's value, written as the text format writes it and sent as a double in protobuf.
trait Value: std::fmt::Display {
    fn f64(&self) -> f64;
}

impl Value for u64 {
    fn f64(&self) -> f64 {
        *self as f64
    }
}

impl Value for &u64 {
    fn f64(&self) -> f64 {
        **self as f64
    }
}

impl Value for f64 {
    fn f64(&self) -> f64 {
        *self
    }
}

impl Value for &f64 {
    fn f64(&self) -> f64 {
        **self
    }
}

impl Value for i32 {
    fn f64(&self) -> f64 {
        f64::from(*self)
    }
}

/// The exposition being written: text, or protobuf (`proto`).
struct Out {
    s: String,
    openmetrics: bool,
    proto: Option<Proto>,
}

impl Out {
    /// A family's header. `name` is the sample name without a suffix (a counter's sample adds
    /// `_total`, which the 0.0.4 format also puts in the family name and OpenMetrics does not).
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        if let Some(p) = &mut self.proto {
            return p.family(name, kind, help);
        }
        let (fam, kind) = match (kind, self.openmetrics) {
            ("counter", false) => (format!("{name}_total"), kind),
            ("info", false) => (format!("{name}_info"), "gauge"),
            _ => (name.to_string(), kind),
        };
        let _ = writeln!(self.s, "# HELP {fam} {help}");
        let _ = writeln!(self.s, "# TYPE {fam} {kind}");
    }

    /// A duration histogram's samples (`NAME_bucket`, `_sum`, `_count`) from the kernel's
    /// buckets (inclusive upper bound in ns, count), on the classic bounds `les` (seconds, as
    /// written) of `bounds`.
    fn histogram(
        &mut self,
        name: &str,
        base: &str,
        (bounds, les): (&[u64], &[String]),
        buckets: &BTreeMap<u64, u64>,
        count: u64,
        sum_ns: u64,
    ) {
        if let Some(p) = &mut self.proto {
            return p.histogram(base, buckets, count, sum_ns);
        }
        // Built once per series: a scrape writes about 114 of these lines per histogram.
        let bucket = format!("{name}_bucket{{{base},le=\"");
        let mut kernel = buckets.iter().peekable();
        let mut cum = 0;
        for (b, le) in bounds.iter().zip(les) {
            while let Some((_, n)) = kernel.next_if(|(k, _)| *k <= b) {
                cum += n;
            }
            let _ = writeln!(self.s, "{bucket}{le}\"}} {cum}");
        }
        let _ = writeln!(self.s, "{bucket}+Inf\"}} {count}");
        self.sample(&format!("{name}_sum"), base, secs(sum_ns));
        self.sample(&format!("{name}_count"), base, count);
    }

    /// One sample: `name{labels} value`, `labels` as made by [`labels`].
    fn sample(&mut self, name: &str, labels: &str, value: impl Value) {
        if let Some(p) = &mut self.proto {
            return p.sample(labels, value.f64());
        }
        let _ = if labels.is_empty() {
            writeln!(self.s, "{name} {value}")
        } else {
            writeln!(self.s, "{name}{{{labels}}} {value}")
        };
    }
}

/// `k="v",...` with the values escaped.
fn labels(pairs: &[(&str, &str)]) -> String {
    let mut s = String::new();
    for (k, v) in pairs {
        if !s.is_empty() {
            s.push(',');
        }
        let _ = write!(s, "{k}=\"{}\"", label(v));
    }
    s
}

/// `base` with more labels after it.
fn and(base: &str, more: &[(&str, &str)]) -> String {
    let more = labels(more);
    match (base.is_empty(), more.is_empty()) {
        (true, _) => more,
        (_, true) => base.to_string(),
        _ => format!("{base},{more}"),
    }
}

/// A process's (or a name's) figures per cmd, as the series need them.
#[derive(Default)]
struct Cmd {
    /// Calls per (flags, result).
    calls: BTreeMap<(u32, String), u64>,
    /// Kernel buckets (inclusive upper bound, calls), summed over flags.
    buckets: BTreeMap<u64, u64>,
    count: u64,
    sum_ns: u64,
    /// IPIs per target CPU (as the report names them).
    ipis: BTreeMap<String, u64>,
}

#[derive(Default)]
struct Series {
    cmds: BTreeMap<String, Cmd>,
    cpu_ns: CpuCost,
}

impl Series {
    fn add(&mut self, p: &ProcessReport) {
        for c in &p.cmds {
            self.add_cmd(c);
        }
        self.cpu_ns.caller += p.cpu_ns.caller;
        self.cpu_ns.ipi_handler += p.cpu_ns.ipi_handler;
    }

    fn add_cmd(&mut self, c: &CmdReport) {
        let cmd = self.cmds.entry(c.cmd.clone()).or_default();
        let ok = c.calls - c.errors;
        if ok > 0 {
            *cmd.calls.entry((c.flags, "ok".into())).or_default() += ok;
        }
        for (errno, n) in &c.errno {
            *cmd.calls.entry((c.flags, errno.clone())).or_default() += n;
        }
        for &Bucket { le_ns, count } in &c.histogram {
            *cmd.buckets.entry(le_ns).or_default() += count;
        }
        cmd.count += c.calls;
        cmd.sum_ns += c.latency_ns.sum;
        for (cpu, n) in &c.ipis.per_cpu {
            *cmd.ipis.entry(cpu.clone()).or_default() += n;
        }
    }
}

/// The series' identity: (pid, comm), pid empty when keyed by name.
type Who = (String, String);

/// Groups the report's processes by `by`. Per pid, a pid held by two processes over the run
/// (reuse) shows the later one: two series may not share labels, and to Prometheus the
/// counters starting again from zero are a reset, which `rate()` handles. Entries summing
/// exited processes of one name (pid 0) count only by name.
fn group(processes: &[&ProcessReport], by: By) -> BTreeMap<Who, Series> {
    let mut out: BTreeMap<Who, Series> = BTreeMap::new();
    match by {
        By::Comm => {
            for p in processes {
                out.entry((String::new(), p.comm.clone()))
                    .or_default()
                    .add(p);
            }
        }
        By::Pid => {
            let mut latest: BTreeMap<(u32, &str), &ProcessReport> = BTreeMap::new();
            for p in processes.iter().filter(|p| p.pid != 0) {
                let e = latest.entry((p.pid, p.comm.as_str())).or_insert(p);
                if (p.exited, std::cmp::Reverse(p.serial)) < (e.exited, std::cmp::Reverse(e.serial))
                {
                    *e = p;
                }
            }
            for ((pid, comm), p) in latest {
                out.entry((pid.to_string(), comm.to_string()))
                    .or_default()
                    .add(p);
            }
        }
    }
    out
}

/// Userspace RCU grace periods per (pid, comm, function) or (comm, function): count, time and
/// time blocked. Per pid, a reused pid shows its later process, as for the calls.
fn writer_series(writers: &[&WriterReport], by: By) -> BTreeMap<String, (u64, u64, u64)> {
    let mut latest: BTreeMap<(u32, &str, &str), u32> = BTreeMap::new();
    for w in writers {
        let e = latest
            .entry((w.pid, w.comm.as_str(), w.function.as_str()))
            .or_insert(w.serial);
        *e = (*e).max(w.serial);
    }
    let mut out: BTreeMap<String, (u64, u64, u64)> = BTreeMap::new();
    for w in writers {
        let key = match by {
            By::Pid if latest[&(w.pid, w.comm.as_str(), w.function.as_str())] != w.serial => {
                continue;
            }
            By::Pid => labels(&[
                ("pid", &w.pid.to_string()),
                ("comm", &w.comm),
                ("function", &w.function),
            ]),
            By::Comm => labels(&[("comm", &w.comm), ("function", &w.function)]),
        };
        let e = out.entry(key).or_default();
        e.0 += w.grace_periods;
        e.1 += w.latency_ns.sum;
        e.2 += w.blocked_ns;
    }
    out
}

/// The exposition of `report`, over `processes` and `writers` (those of the report still
/// shown): the calls' families (per process or name), the RCU writers', then the tracer's own.
pub fn render(
    report: &Report,
    processes: &[&ProcessReport],
    writers: &[&WriterReport],
    by: By,
    exposition: Exposition,
    me: &SelfStats,
) -> Vec<u8> {
    let openmetrics = exposition == Exposition::OpenMetrics;
    let mut o = Out {
        s: String::new(),
        openmetrics,
        proto: (exposition == Exposition::Protobuf).then(Proto::default),
    };
    let series: Vec<(String, Series)> = group(processes, by)
        .into_iter()
        .map(|((pid, comm), s)| {
            let who = if by == By::Pid {
                labels(&[("pid", &pid), ("comm", &comm)])
            } else {
                labels(&[("comm", &comm)])
            };
            (who, s)
        })
        .collect();
    call_families(&mut o, &series);
    rcu_families(&mut o, writers, by);
    finding_families(&mut o, report, processes, by);
    tracer_families(&mut o, report);
    self_families(&mut o, me);
    if let Some(p) = o.proto {
        return p.finish();
    }
    if openmetrics {
        o.s.push_str("# EOF\n");
    }
    o.s.into_bytes()
}

/// Calls, their latency histogram, IPIs and CPU time, per (who, cmd).
fn call_families(o: &mut Out, series: &[(String, Series)]) {
    o.family(
        "membarrier_calls",
        "counter",
        "membarrier(2) calls, by cmd, flags and result (ok or the errno's name).",
    );
    for (who, s) in series {
        for (cmd, c) in &s.cmds {
            for ((flags, result), n) in &c.calls {
                let l = and(
                    who,
                    &[
                        ("cmd", cmd),
                        ("flags", &flags.to_string()),
                        ("result", result),
                    ],
                );
                o.sample("membarrier_calls_total", &l, n);
            }
        }
    }

    o.family(
        "membarrier_call_duration_seconds",
        "histogram",
        "Time inside membarrier(2), entry to return, per call.",
    );
    let bounds = duration_bounds_ns();
    let les: Vec<String> = bounds.iter().map(|&b| secs(b).to_string()).collect();
    let bounds = (&bounds[..], &les[..]);
    for (who, s) in series {
        for (cmd, c) in &s.cmds {
            let base = and(who, &[("cmd", cmd)]);
            let name = "membarrier_call_duration_seconds";
            o.histogram(name, &base, bounds, &c.buckets, c.count, c.sum_ns);
        }
    }

    o.family(
        "membarrier_ipis",
        "counter",
        "IPIs sent by membarrier(2) calls, by target CPU.",
    );
    for (who, s) in series {
        for (cmd, c) in &s.cmds {
            for (cpu, n) in &c.ipis {
                let l = and(who, &[("cmd", cmd), ("cpu", cpu)]);
                o.sample("membarrier_ipis_total", &l, n);
            }
        }
    }

    o.family(
        "membarrier_cpu_seconds",
        "counter",
        "CPU time membarrier(2) costs: on the caller's CPU inside its calls (where=caller), and \
         in the IPI handlers its calls ran on other CPUs (where=ipi_handler).",
    );
    for (who, s) in series {
        for (place, ns) in [
            ("caller", s.cpu_ns.caller),
            ("ipi_handler", s.cpu_ns.ipi_handler),
        ] {
            let l = and(who, &[("where", place)]);
            o.sample("membarrier_cpu_seconds_total", &l, secs(ns));
        }
    }
}

/// Userspace RCU grace periods by function, and their duration by caller.
fn rcu_families(o: &mut Out, writers: &[&WriterReport], by: By) {
    let gps = writer_series(writers, by);
    o.family(
        "membarrier_rcu_grace_periods",
        "counter",
        "Userspace RCU grace periods (liburcu's synchronize_rcu, --rcu-func), by function.",
    );
    for (l, (n, _, _)) in &gps {
        o.sample("membarrier_rcu_grace_periods_total", l, n);
    }
    o.family(
        "membarrier_rcu_grace_period_seconds",
        "counter",
        "Time inside those grace periods, entry to return.",
    );
    for (l, (_, ns, _)) in &gps {
        o.sample("membarrier_rcu_grace_period_seconds_total", l, secs(*ns));
    }
    o.family(
        "membarrier_rcu_grace_period_blocked_seconds",
        "counter",
        "Time off CPU inside those grace periods outside membarrier calls: waiting for readers.",
    );
    for (l, (_, _, ns)) in &gps {
        o.sample(
            "membarrier_rcu_grace_period_blocked_seconds_total",
            l,
            secs(*ns),
        );
    }
    o.family(
        "membarrier_rcu_grace_period_duration_seconds",
        "histogram",
        "Userspace RCU grace periods, entry to return, by the code that called the function \
         (its symbol, or module+0xOFF; the busiest callers of a function, the rest as \
         caller=\"other\").",
    );
    let bounds = duration_bounds_ns();
    let les: Vec<String> = bounds.iter().map(|&b| secs(b).to_string()).collect();
    for (l, h) in caller_series(writers, by) {
        let name = "membarrier_rcu_grace_period_duration_seconds";
        o.histogram(name, &l, (&bounds, &les), &h.buckets, h.count, h.sum_ns);
    }
}

/// Callers kept per (process or name, function) in the grace periods' histogram, the busiest;
/// the others sum into `caller="other"`, so a writer called from many places stays a few
/// series.
pub const TOP_CALLERS: usize = 5;

/// A grace-period histogram's figures.
#[derive(Default)]
struct Hist {
    buckets: BTreeMap<u64, u64>,
    count: u64,
    sum_ns: u64,
}

/// The grace periods' histograms per (who, function, caller): by pid, a reused pid shows its
/// later process, as for the calls; the top [`TOP_CALLERS`] callers of each (who, function).
fn caller_series(writers: &[&WriterReport], by: By) -> BTreeMap<String, Hist> {
    let mut latest: BTreeMap<(u32, &str, &str), u32> = BTreeMap::new();
    for w in writers {
        let e = latest
            .entry((w.pid, w.comm.as_str(), w.function.as_str()))
            .or_insert(w.serial);
        *e = (*e).max(w.serial);
    }
    // (who, function) -> caller -> histogram.
    let mut by_caller: BTreeMap<(String, String), BTreeMap<String, Hist>> = BTreeMap::new();
    for w in writers {
        let who = match by {
            By::Pid if latest[&(w.pid, w.comm.as_str(), w.function.as_str())] != w.serial => {
                continue;
            }
            By::Pid => labels(&[("pid", &w.pid.to_string()), ("comm", &w.comm)]),
            By::Comm => labels(&[("comm", &w.comm)]),
        };
        let h = by_caller
            .entry((who, w.function.clone()))
            .or_default()
            .entry(code_name(&w.caller))
            .or_default();
        for &Bucket { le_ns, count } in &w.histogram {
            *h.buckets.entry(le_ns).or_default() += count;
        }
        h.count += w.grace_periods;
        h.sum_ns += w.latency_ns.sum;
    }
    let mut out = BTreeMap::new();
    for ((who, function), callers) in by_caller {
        let mut callers: Vec<(String, Hist)> = callers.into_iter().collect();
        callers.sort_by(|a, b| b.1.count.cmp(&a.1.count).then(a.0.cmp(&b.0)));
        let mut other: Option<Hist> = None;
        for (i, (caller, h)) in callers.into_iter().enumerate() {
            if i < TOP_CALLERS {
                let l = and(&who, &[("function", &function), ("caller", &caller)]);
                out.insert(l, h);
                continue;
            }
            let o = other.get_or_insert_with(Hist::default);
            for (le, n) in h.buckets {
                *o.buckets.entry(le).or_default() += n;
            }
            o.count += h.count;
            o.sum_ns += h.sum_ns;
        }
        if let Some(o) = other {
            let l = and(&who, &[("function", &function), ("caller", "other")]);
            out.insert(l, o);
        }
    }
    out
}

/// Findings while they hold (`membarrier_finding` 1), and each one's main figure.
fn finding_families(o: &mut Out, report: &Report, processes: &[&ProcessReport], by: By) {
    let shown: std::collections::HashSet<(u32, u32)> =
        processes.iter().map(|p| (p.pid, p.serial)).collect();
    let mut held: BTreeMap<String, ()> = BTreeMap::new();
    let mut figures: BTreeMap<String, f64> = BTreeMap::new();
    for f in report
        .findings
        .iter()
        .filter(|f| shown.contains(&(f.pid, f.serial)))
    {
        let pid = f.pid.to_string();
        let cmd = f.evidence["cmd"].as_str().unwrap_or_default();
        let severity = serde_json::to_value(f.severity).unwrap_or_default();
        let severity = severity.as_str().unwrap_or_default();
        let mut who = vec![("rule", f.rule)];
        if by == By::Pid {
            who.push(("pid", &pid));
        }
        who.extend([("comm", f.comm.as_str()), ("cmd", cmd)]);
        let mut l = who.clone();
        l.push(("severity", severity));
        held.insert(labels(&l), ());
        if let Some((figure, v)) = main_figure(f) {
            let mut l = who;
            l.push(("figure", figure));
            let e = figures.entry(labels(&l)).or_insert(v);
            *e = e.max(v);
        }
    }
    o.family(
        "membarrier_finding",
        "gauge",
        "A known membarrier pitfall holds for this process and cmd (docs/findings.md): 1.",
    );
    for l in held.keys() {
        o.sample("membarrier_finding", l, 1);
    }
    o.family(
        "membarrier_finding_figure",
        "gauge",
        "The finding's main figure, named by `figure` (as in its JSON evidence).",
    );
    for (l, v) in &figures {
        o.sample("membarrier_finding_figure", l, v);
    }
}

/// The tracer process's own resources, read at the scrape (`process_*`, as the Prometheus
/// client libraries export them).
#[derive(Clone, Copy, Debug, Default)]
pub struct SelfStats {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    pub open_fds: u64,
    pub max_fds: u64,
    pub start_time_seconds: f64,
}

fn self_families(o: &mut Out, me: &SelfStats) {
    o.family(
        "process_cpu_seconds",
        "counter",
        "Total user and system CPU time spent in seconds.",
    );
    o.sample("process_cpu_seconds_total", "", me.cpu_seconds);
    let gauges: [(&str, &str, f64); 5] = [
        (
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            me.resident_bytes as f64,
        ),
        (
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes.",
            me.virtual_bytes as f64,
        ),
        (
            "process_open_fds",
            "Number of open file descriptors.",
            me.open_fds as f64,
        ),
        (
            "process_max_fds",
            "Maximum number of open file descriptors.",
            me.max_fds as f64,
        ),
        (
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            me.start_time_seconds,
        ),
    ];
    for (name, help, v) in gauges {
        o.family(name, "gauge", help);
        o.sample(name, "", v);
    }
}

/// The tracer's own: missed calls, what it dropped by cause, and what it attached.
fn tracer_families(o: &mut Out, report: &Report) {
    o.family(
        "membarrier_trace_missed_calls",
        "counter",
        "Calls the tracer saw only in part (under way at attach, or skipped by the kernel).",
    );
    o.sample(
        "membarrier_trace_missed_calls_total",
        "",
        report.missed_calls,
    );
    o.family(
        "membarrier_trace_dropped",
        "counter",
        "What the tracer could not keep, by cause (docs/output.md, `dropped`).",
    );
    if let Ok(serde_json::Value::Object(causes)) = serde_json::to_value(report.dropped) {
        for (cause, n) in causes.iter().filter(|(k, _)| *k != "total") {
            o.sample(
                "membarrier_trace_dropped_total",
                &labels(&[("cause", cause)]),
                n.as_u64().unwrap_or(0),
            );
        }
    }
    o.family(
        "membarrier_trace",
        "info",
        "The tracer: its version, the kernel it runs on, the syscall hook attached, where grace \
         periods come from.",
    );
    let attach = serde_json::to_value(report.attach).unwrap_or_default();
    let source = serde_json::to_value(report.grace_period_source).unwrap_or_default();
    let l = labels(&[
        ("version", env!("CARGO_PKG_VERSION")),
        ("kernel", &report.kernel),
        ("attach", attach.as_str().unwrap_or_default()),
        ("grace_period_source", source.as_str().unwrap_or_default()),
    ]);
    o.sample("membarrier_trace_info", &l, 1);
}
#[cfg(test)]
mod tests {
    use super::*;
    use membarrier_trace_common::{HIST_BUCKETS, hist_bucket, hist_bucket_upper};

    #[test]
    fn bounds_are_kernel_bucket_edges_at_most_21_percent_apart() {
        let b = duration_bounds_ns();
        assert_eq!(b.len(), 113);
        for &le in &b {
            // An inclusive upper bound of some kernel bucket: the next value starts another.
            let i = hist_bucket(le);
            assert!(i + 1 < HIST_BUCKETS);
            assert_eq!(hist_bucket_upper(i), le, "{le}");
        }
        for w in b.windows(2) {
            let r = (w[1] + 1) as f64 / (w[0] + 1) as f64;
            assert!(r > 1.17 && r < 1.211, "{w:?}: {r}");
        }
    }

    #[test]
    fn labels_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert_eq!(label("plain"), "plain");
    }
}
