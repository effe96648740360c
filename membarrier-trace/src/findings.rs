//! Findings: known membarrier pitfalls recognized in a report, each with its evidence in
//! numbers, what it cost, the fix in a sentence and the kernel behaviour behind it. Every rule
//! reads only the aggregates already in the report, and decides with the thresholds below
//! (docs/findings.md).

use serde_json::{Value, json};

use crate::{
    cmd::Kind,
    model::{CmdReport, Finding, ProcessReport, Report, Severity},
};

/// A registration taking this long waited for a grace period: one that did not takes
/// microseconds (3.9 us here; 13.9 ms when it waits).
pub const LATE_REGISTRATION_NS: u64 = 1_000_000;
/// GLOBAL calls this many at least, and their time this share of the run at least: the
/// process spends its time waiting for grace periods.
pub const GLOBAL_MIN_CALLS: u64 = 10;
pub const GLOBAL_MIN_SHARE_PCT: f64 = 10.0;

/// The findings of a report, most severe first, then by process.
pub fn of(r: &Report) -> Vec<Finding> {
    let mut out = Vec::new();
    for p in &r.processes {
        for c in &p.cmds {
            late_registration(p, c, &mut out);
            unregistered_eperm(p, c, &mut out);
            global_rate(r, p, c, &mut out);
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

fn finding(p: &ProcessReport, rule: &'static str, severity: Severity) -> Finding {
    Finding {
        rule,
        severity,
        pid: p.pid,
        comm: p.comm.clone(),
        tid: None,
        caller: None,
        evidence: Value::Null,
        cost: Value::Null,
        fix: String::new(),
        reference: "",
    }
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
        tid: main_thread(c),
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
        ..finding(p, "late_registration", Severity::Warning)
    });
}

/// Expedited cmds issued without registering: each fails with EPERM, and no barrier happens.
fn unregistered_eperm(p: &ProcessReport, c: &CmdReport, out: &mut Vec<Finding>) {
    let eperm = c.errno.get("EPERM").copied().unwrap_or(0);
    if c.kind != Kind::Barrier || eperm == 0 {
        return;
    }
    out.push(Finding {
        tid: main_thread(c),
        evidence: json!({"cmd": c.cmd, "eperm": eperm, "calls": c.calls}),
        cost: json!({"calls": eperm}),
        fix: format!(
            "register (the matching MEMBARRIER_CMD_REGISTER_* of {}) once before the first \
             call: until then every call fails and orders nothing",
            c.cmd
        ),
        reference: "kernel/sched/membarrier.c: the expedited cmds return -EPERM unless the \
                    mm's membarrier_state has the matching *_READY bit, set by registering",
        ..finding(p, "unregistered_eperm", Severity::Critical)
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
        tid: main_thread(c),
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
        ..finding(p, "global_rate", Severity::Warning)
    });
}
