//! Findings: known membarrier pitfalls recognized in a report, each with its evidence in
//! numbers, what it cost, the fix in a sentence and the kernel behaviour behind it. Every rule
//! reads only the aggregates already in the report, and decides with the thresholds below
//! (docs/findings.md).

use serde_json::{Value, json};

use crate::{
    model::cmd::Kind,
    model::{CmdReport, Finding, ProcessReport, Report, Severity},
};

/// A registration taking this long waited for a grace period: one that did not takes
/// microseconds (3.9 us here; 13.9 ms when it waits).
pub const LATE_REGISTRATION_NS: u64 = 1_000_000;
/// GLOBAL calls this many at least, and their time this share of the run at least: the
/// process spends its time waiting for grace periods.
pub const GLOBAL_MIN_CALLS: u64 = 10;
pub const GLOBAL_MIN_SHARE_PCT: f64 = 10.0;

/// Expedited calls of a process spending this share of their time waiting for contended locks
/// (the kernel's `membarrier_ipi_mutex`) at least, and this much time in all: callers queue
/// behind each other. A lone caller never waits; two threads calling back to back here wait
/// 20-50% of their call time.
pub const MUTEX_MIN_SHARE_PCT: f64 = 10.0;
pub const MUTEX_MIN_WAIT_NS: u64 = 1_000_000;
/// IPIs a second to one target CPU, over the run, at least: each costs the task running there
/// an interrupt (about 1-2 us on bare metal, more in a VM: an exit per IPI), so 10,000 a second
/// take 1-2% or more of that CPU from whoever runs there.
pub const IPI_STORM_PER_CPU_PER_SEC: f64 = 10_000.0;

/// What the rules need to know about the machine besides the report.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Machine {
    /// CPUs online (0: unknown).
    pub cpus_online: u32,
    /// The kernel's nohz_full CPU list; empty when none.
    pub nohz_full: String,
}

impl Machine {
    /// From sysfs; what cannot be read is left unknown.
    pub fn read() -> Self {
        let read = |f: &str| {
            std::fs::read_to_string(format!("/sys/devices/system/cpu/{f}"))
                .map(|s| s.trim().to_string())
                .unwrap_or_default()
        };
        let nohz_full = read("nohz_full");
        Self {
            cpus_online: cpu_list_len(&read("online")),
            // "(null)" when the kernel has the feature but it is off.
            nohz_full: if nohz_full == "(null)" {
                String::new()
            } else {
                nohz_full
            },
        }
    }
}

/// CPUs in a kernel CPU list (`0-3,8,10-11`); 0 if it does not parse.
fn cpu_list_len(list: &str) -> u32 {
    let mut n = 0;
    for part in list.split(',').filter(|p| !p.is_empty()) {
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        match (lo.parse::<u32>(), hi.parse::<u32>()) {
            (Ok(lo), Ok(hi)) if hi >= lo => n += hi - lo + 1,
            _ => return 0,
        }
    }
    n
}

/// `r` with its findings, on this machine as it is now.
pub fn judged(r: Report) -> Report {
    judged_on(r, &Machine::read())
}

/// [`judged`] for a report of machine `m` (a recording's, read elsewhere).
pub fn judged_on(mut r: Report, m: &Machine) -> Report {
    r.findings = of(&r, m);
    r
}

/// The findings of a report, most severe first, then by process.
pub fn of(r: &Report, m: &Machine) -> Vec<Finding> {
    let mut out = Vec::new();
    let waited = mutex_callers(r);
    for p in &r.processes {
        for c in &p.cmds {
            late_registration(p, c, &mut out);
            unregistered_eperm(p, c, &mut out);
            global_rate(r, p, c, &mut out);
            global_unavailable(p, c, m, &mut out);
            mutex_contention(&waited, p, c, &mut out);
            ipi_storm(r, p, c, &mut out);
        }
    }
    out.sort_by(|a, b| {
        (b.severity == Severity::Critical)
            .cmp(&(a.severity == Severity::Critical))
            .then(a.pid.cmp(&b.pid))
            .then(a.rule.cmp(b.rule))
    });
    out
}

/// A finding of `rule` on process `p`'s row `c`, its busiest thread named; the rule fills in
/// the rest.
fn finding(p: &ProcessReport, c: &CmdReport, rule: &'static str, severity: Severity) -> Finding {
    Finding {
        rule,
        severity,
        pid: p.pid,
        serial: p.serial,
        comm: p.comm.clone(),
        tid: main_thread(c),
        caller: None,
        evidence: Value::Null,
        cost: Value::Null,
        fix: String::new(),
        reference: "",
    }
}

/// A finding's main figure, by the name its evidence gives it: what its rule's threshold is
/// about (the exporter's `membarrier_finding_figure`).
pub fn main_figure(f: &Finding) -> Option<(&'static str, f64)> {
    let keys: &[&'static str] = match f.rule {
        "late_registration" => &["latency_max_ns"],
        "unregistered_eperm" => &["eperm"],
        "global_rate" => &["share_of_run_pct"],
        "global_unavailable" => &["einval", "calls"],
        "mutex_contention" => &["share_pct"],
        "ipi_storm" => &["ipis_per_sec_per_cpu"],
        _ => &[],
    };
    keys.iter()
        .find_map(|&k| Some((k, f.evidence.get(k)?.as_f64()?)))
}

/// The busiest thread of a row, when one made most of its calls.
fn main_thread(c: &CmdReport) -> Option<u32> {
    c.threads.first().filter(|t| t.tid != 0).map(|t| t.tid)
}

/// A REGISTER_* that waited for a grace period: the kernel skips it only while the process
/// has one thread (one mm user), so registering after starting threads costs every start.
fn late_registration(p: &ProcessReport, c: &CmdReport, out: &mut Vec<Finding>) {
    if c.kind != Kind::Registration || c.latency_ns.max < LATE_REGISTRATION_NS {
        return;
    }
    out.push(Finding {
        evidence: json!({
            "cmd": c.cmd,
            "calls": c.calls,
            "latency_max_ns": c.latency_ns.max,
            "blocked_ns": c.blocked_ns.sum,
            "threshold_ns": LATE_REGISTRATION_NS,
        }),
        cost: json!({"time_ns": c.latency_ns.sum, "calls": c.calls}),
        fix: format!(
            "issue {} before the process starts its second thread: registration is then \
             immediate",
            c.cmd
        ),
        reference: "kernel/sched/membarrier.c: membarrier_register_private_expedited() and \
                    membarrier_register_global_expedited() call synchronize_rcu() unless the \
                    mm has a single user",
        ..finding(p, c, "late_registration", Severity::Warning)
    });
}

/// Expedited cmds issued without registering: each fails with EPERM, and no barrier happens.
fn unregistered_eperm(p: &ProcessReport, c: &CmdReport, out: &mut Vec<Finding>) {
    let eperm = c.errno.get("EPERM").copied().unwrap_or(0);
    if c.kind != Kind::Barrier || eperm == 0 {
        return;
    }
    out.push(Finding {
        evidence: json!({"cmd": c.cmd, "eperm": eperm, "calls": c.calls}),
        cost: json!({"calls": eperm}),
        fix: format!(
            "register (the matching MEMBARRIER_CMD_REGISTER_* of {}) once before the first \
             call: until then every call fails and orders nothing",
            c.cmd
        ),
        reference: "kernel/sched/membarrier.c: the expedited cmds return -EPERM unless the \
                    mm's membarrier_state has the matching *_READY bit, set by registering",
        ..finding(p, c, "unregistered_eperm", Severity::Critical)
    });
}

/// GLOBAL at a rate where its grace periods take a large share of the run: the expedited
/// cmds give the same ordering with IPIs, in microseconds.
fn global_rate(r: &Report, p: &ProcessReport, c: &CmdReport, out: &mut Vec<Finding>) {
    let ok = c.calls - c.errors;
    if c.kind != Kind::GracePeriod || ok < GLOBAL_MIN_CALLS || r.duration_ns == 0 {
        return;
    }
    let share = c.latency_ns.sum as f64 * 100.0 / r.duration_ns as f64;
    if share < GLOBAL_MIN_SHARE_PCT {
        return;
    }
    out.push(Finding {
        evidence: json!({
            "calls": ok,
            "calls_per_sec": ok as f64 * 1e9 / r.duration_ns as f64,
            "latency_p50_ns": c.latency_ns.p50,
            "share_of_run_pct": share,
            "threshold": {"calls": GLOBAL_MIN_CALLS, "share_of_run_pct": GLOBAL_MIN_SHARE_PCT},
        }),
        cost: json!({"time_ns": c.latency_ns.sum, "calls": ok}),
        fix: "register once (REGISTER_PRIVATE_EXPEDITED, or REGISTER_GLOBAL_EXPEDITED across \
              processes) and use PRIVATE_EXPEDITED or GLOBAL_EXPEDITED: IPIs in microseconds \
              instead of a grace period each"
            .into(),
        reference: "kernel/sched/membarrier.c: MEMBARRIER_CMD_GLOBAL (SHARED) waits for \
                    synchronize_rcu(), milliseconds; the expedited cmds send IPIs to the CPUs \
                    running the process",
        ..finding(p, c, "global_rate", Severity::Warning)
    });
}

/// GLOBAL that cannot do what its caller relies on: with nohz_full CPUs it fails with EINVAL
/// (no barrier at all), and with one CPU online it returns at once, without a grace period
/// (correct for ordering, but code that uses it as a delay, waiting out readers, gets none).
fn global_unavailable(p: &ProcessReport, c: &CmdReport, m: &Machine, out: &mut Vec<Finding>) {
    if c.kind != Kind::GracePeriod || c.flags != 0 {
        return;
    }
    let einval = c.errno.get("EINVAL").copied().unwrap_or(0);
    let ok = c.calls - c.errors;
    if einval > 0 {
        out.push(Finding {
            evidence: json!({
                "cmd": c.cmd,
                "einval": einval,
                "calls": c.calls,
                "nohz_full": m.nohz_full,
            }),
            cost: json!({"calls": einval}),
            fix: "do not rely on GLOBAL where CPUs are nohz_full: register and use \
                  PRIVATE_EXPEDITED (or GLOBAL_EXPEDITED), and treat a failed call as an error"
                .into(),
            reference: "kernel/sched/membarrier.c: MEMBARRIER_CMD_GLOBAL returns -EINVAL when \
                        tick_nohz_full_enabled(); QUERY leaves it out of the mask then",
            ..finding(p, c, "global_unavailable", Severity::Critical)
        });
    } else if ok > 0 && m.cpus_online == 1 {
        out.push(Finding {
            evidence: json!({
                "cmd": c.cmd,
                "calls": ok,
                "cpus_online": 1,
                "latency_max_ns": c.latency_ns.max,
                "blocked_ns": c.blocked_ns.sum,
            }),
            cost: json!({"calls": ok}),
            fix: "GLOBAL waited for no grace period (one CPU online): if the code uses it to \
                  wait out readers (reclaiming memory after it), wait for an RCU grace period \
                  by other means"
                .into(),
            reference: "kernel/sched/membarrier.c: MEMBARRIER_CMD_GLOBAL calls \
                        synchronize_rcu() only if num_online_cpus() > 1",
            ..finding(p, c, "global_unavailable", Severity::Warning)
        });
    }
}

/// Every process whose expedited calls waited for contended locks: the callers involved in
/// any `mutex_contention` (the mutex is one for the whole box).
fn mutex_callers(r: &Report) -> Vec<Value> {
    r.processes
        .iter()
        .filter_map(|q| {
            let rows = q
                .cmds
                .iter()
                .filter(|d| d.kind == Kind::Barrier && d.mutex_wait_ns.sum > 0);
            let (calls, waited, threads) = rows.fold((0, 0, 0), |(n, w, t), d| {
                (n + d.calls, w + d.mutex_wait_ns.sum, t.max(d.threads.len()))
            });
            (waited > 0).then(|| {
                json!({"pid": q.pid, "comm": q.comm, "threads": threads, "calls": calls,
                       "mutex_wait_ns": waited})
            })
        })
        .collect()
}

/// Expedited calls queueing on the kernel's one mutex for them: the share of their time spent
/// waiting, and the `callers` involved.
fn mutex_contention(callers: &[Value], p: &ProcessReport, c: &CmdReport, out: &mut Vec<Finding>) {
    let wait = c.mutex_wait_ns.sum;
    if c.kind != Kind::Barrier || wait < MUTEX_MIN_WAIT_NS {
        return;
    }
    let share = wait as f64 * 100.0 / c.latency_ns.sum.max(1) as f64;
    if share < MUTEX_MIN_SHARE_PCT {
        return;
    }
    out.push(Finding {
        evidence: json!({
            "cmd": c.cmd,
            "calls": c.calls,
            "threads": c.threads.len(),
            "mutex_wait_ns": wait,
            "mutex_wait_max_ns": c.mutex_wait_ns.max,
            "call_time_ns": c.latency_ns.sum,
            "share_pct": share,
            "callers": callers,
            "threshold": {"share_pct": MUTEX_MIN_SHARE_PCT, "mutex_wait_ns": MUTEX_MIN_WAIT_NS},
        }),
        cost: json!({"time_ns": wait, "calls": c.calls}),
        fix: "let one thread at a time issue the barrier and the others skip or wait on its \
              result (as Seastar did), or batch the work behind fewer barriers"
            .into(),
        reference: "kernel/sched/membarrier.c: every expedited cmd runs under one global \
                    mutex (membarrier_ipi_mutex), so concurrent callers on the whole box queue",
        ..finding(p, c, "mutex_contention", Severity::Warning)
    });
}

/// Expedited calls interrupting some CPU often enough to take a share of it from the task
/// running there: IPIs a second per target CPU over the run, and whose work the handlers
/// interrupted.
fn ipi_storm(r: &Report, p: &ProcessReport, c: &CmdReport, out: &mut Vec<Finding>) {
    if c.kind != Kind::Barrier || c.ipis.sent == 0 || r.duration_ns == 0 {
        return;
    }
    let secs = r.duration_ns as f64 / 1e9;
    let per_cpu: serde_json::Map<String, Value> = c
        .ipis
        .per_cpu
        .iter()
        .map(|(cpu, n)| (cpu.clone(), json!(*n as f64 / secs)))
        .collect();
    let top = c.ipis.per_cpu.values().max().copied().unwrap_or(0) as f64 / secs;
    if top < IPI_STORM_PER_CPU_PER_SEC {
        return;
    }
    let victims: Vec<Value> = c
        .ipis
        .victims
        .iter()
        .take(8)
        .map(|v| {
            json!({
                "pid": v.pid,
                "comm": v.comm,
                "interrupts": v.interrupts,
                "interrupts_per_sec": v.interrupts as f64 / secs,
                "handler_ns": v.handler_ns,
                "handler_ns_per_sec": v.handler_ns as f64 / secs,
            })
        })
        .collect();
    out.push(Finding {
        evidence: json!({
            "cmd": c.cmd,
            "calls": c.calls,
            "ipis": c.ipis.sent,
            "ipis_per_sec_per_cpu": per_cpu,
            "victims": victims,
            "threshold": {"ipis_per_sec_per_cpu": IPI_STORM_PER_CPU_PER_SEC},
        }),
        cost: json!({"ipis": c.ipis.sent, "handler_ns": c.ipis.handler_ns}),
        fix: "issue fewer barriers (batch the work each one publishes), or keep the threads \
              the barrier must reach off the CPUs others need (quiesce them first, as OpenVMM \
              did)"
            .into(),
        reference: "kernel/sched/membarrier.c: the expedited cmds IPI every CPU whose running \
                    task is in the target set (its mm, or registered for GLOBAL_EXPEDITED) and \
                    wait for each handler",
        ..finding(p, c, "ipi_storm", Severity::Warning)
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::model::{Model, tests::snapshot};

    fn rules(r: &Report, m: &Machine) -> Vec<&'static str> {
        of(r, m).iter().map(|f| f.rule).collect()
    }

    /// A report whose PRIVATE_EXPEDITED row (pid 42, 2,420 ns over 6 calls, 2 EPERM) is
    /// changed by `f`; its EPERM finding left out.
    fn expedited(f: impl FnOnce(&mut CmdReport)) -> Report {
        let mut r = Model::default().report(&snapshot());
        let c = &mut r.processes[0].cmds[0];
        c.errno.clear();
        c.errors = 0;
        f(c);
        r
    }

    #[test]
    fn mutex_contention_at_its_thresholds() {
        let m = Machine::default();
        let at = |wait: u64, sum: u64| {
            rules(
                &expedited(|c| {
                    c.latency_ns.sum = sum;
                    c.mutex_wait_ns.sum = wait;
                }),
                &m,
            )
        };
        assert_eq!(at(1_000_000, 10_000_000), ["mutex_contention"]);
        // Under 10% of the call time, or under 1 ms in all.
        assert!(at(999_999, 10_000_000).is_empty());
        assert!(at(999_999, 9_000_000).is_empty());
        assert!(at(1_000_000, 10_000_001).is_empty());
    }

    #[test]
    fn ipi_storm_at_its_threshold() {
        let m = Machine::default();
        // The snapshot's run is 2 s: 20,000 IPIs to one CPU are 10,000 a second.
        let at = |n: u64| {
            let r = expedited(|c| {
                c.ipis.sent = n + 10;
                c.ipis.per_cpu = [("0".to_string(), 10), ("1".to_string(), n)].into();
            });
            (rules(&r, &m), of(&r, &m))
        };
        let (fired, f) = at(20_000);
        assert_eq!(fired, ["ipi_storm"]);
        assert_eq!(f[0].evidence["ipis_per_sec_per_cpu"]["1"], 10_000.0);
        assert!(at(19_999).0.is_empty());
    }

    #[test]
    fn global_unavailable_by_einval_or_one_cpu() {
        let mut r = Model::default().report(&snapshot());
        r.processes[0].cmds.retain(|c| c.cmd == "GLOBAL");
        let two = Machine {
            cpus_online: 2,
            nohz_full: String::new(),
        };
        let one = Machine {
            cpus_online: 1,
            ..two.clone()
        };
        assert!(rules(&r, &two).is_empty());
        assert!(rules(&r, &Machine::default()).is_empty());
        let f = of(&r, &one);
        assert_eq!(f.len(), 1);
        assert_eq!(
            (f[0].rule, f[0].severity),
            ("global_unavailable", Severity::Warning)
        );
        let c = &mut r.processes[0].cmds[0];
        c.errors = c.calls;
        c.errno = [("EINVAL".to_string(), c.calls)].into();
        let f = of(&r, &two);
        assert_eq!(f.len(), 1);
        assert_eq!(
            (f[0].rule, f[0].severity),
            ("global_unavailable", Severity::Critical)
        );
    }

    #[test]
    fn cpu_lists_are_counted() {
        assert_eq!(cpu_list_len("0"), 1);
        assert_eq!(cpu_list_len("0-1"), 2);
        assert_eq!(cpu_list_len("0-3,8,10-11"), 7);
        assert_eq!(cpu_list_len(""), 0);
        assert_eq!(cpu_list_len("x"), 0);
    }
}
