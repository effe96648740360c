//! Non-interactive outputs: a readable text table and JSON, both rendered from a [`Report`].

use std::{borrow::Cow, fmt::Write as _};

use crate::{
    model::cmd::{self, Kind},
    model::{
        Caller, CmdReport, CmdThread, Dropped, GraceSource, IpiVictim, ProcessReport, Report,
        Severity, StackReport,
    },
    render::units,
};

/// `s` safe to put on a terminal: control bytes (ESC, newline, DEL...) written as `\xNN`, so a
/// process name cannot move the cursor, clear the screen or forge lines in a human view.
pub fn printable(s: &str) -> Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() {
            let _ = write!(out, "\\x{:02x}", c as u32);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// A process's name for a human view: escaped, `?` when unknown, and for a per-name entry of
/// exited processes, how many.
pub fn process_name(p: &ProcessReport) -> String {
    let name = if p.comm.is_empty() {
        Cow::Borrowed("?")
    } else {
        printable(&p.comm)
    };
    match (p.pid, p.exited) {
        (0, _) => format!("{name} x{} exited", p.processes),
        (_, true) => format!("{name}, exited"),
        _ => name.into_owned(),
    }
}

/// The lost figures by cause, for a human view: empty when nothing was dropped.
pub fn dropped_causes(d: &Dropped) -> String {
    let parts: Vec<String> = [
        (d.calls_without_row, "calls without a stats row"),
        (
            d.calls_without_inflight_slot,
            "calls without an in-flight slot",
        ),
        (d.processes_not_tracked, "processes not tracked"),
        (d.detail_rows, "detail rows"),
        (d.unwind_rules, "unwinding rules"),
        (d.grace_periods_without_row, "grace periods without a row"),
        (d.callers_unreported, "callers not reported"),
    ]
    .iter()
    .filter(|(n, _)| *n > 0)
    .map(|(n, what)| format!("{n} {what}"))
    .collect();
    parts.join(", ")
}

pub fn text(r: &Report) -> String {
    let mut s = String::new();
    header(&mut s, r);
    findings(&mut s, r);
    if r.processes.is_empty() {
        let _ = writeln!(s, "no membarrier calls seen");
    }
    for p in &r.processes {
        process(&mut s, p, r.window_ns);
    }
    writers(&mut s, r);
    s
}

/// The run's lines: calls, what was missed or dropped and why, exited processes, the hook.
fn header(s: &mut String, r: &Report) {
    let _ = writeln!(
        s,
        "membarrier-trace: {:.2} s traced, {} calls ({}/s over the run, {}/s over the last {:.2} s), {} missed, {} dropped; {} on {}",
        r.duration_ns as f64 / 1e9,
        r.calls,
        units::per_sec(r.run_calls_per_sec),
        units::per_sec(r.calls_per_sec),
        r.window_ns as f64 / 1e9,
        r.missed_calls,
        r.dropped.total,
        r.time,
        printable(&r.hostname)
    );
    if r.dropped.total > 0 {
        let _ = writeln!(s, "dropped: {}", dropped_causes(&r.dropped));
    }
    if r.dropped.probe_runs_skipped > 0 {
        let _ = writeln!(
            s,
            "breakdown probe runs skipped by the kernel: {} (IPI, handler, lock or grace-period figures may be short)",
            r.dropped.probe_runs_skipped
        );
    }
    if r.dropped.hook_runs_skipped > 0 {
        let _ = writeln!(
            s,
            "syscall hook runs skipped by the kernel: {} (box-wide; calls whose enter and exit were both skipped are counted nowhere else: use --attach tracepoint for exact counts)",
            r.dropped.hook_runs_skipped
        );
    }
    if r.exited_summed > 0 {
        let _ = writeln!(
            s,
            "exited processes: {} ({} summed by name: the {} with the most calls or time in the call keep their own entries)",
            r.exited_processes,
            r.exited_summed,
            r.exited_processes - r.exited_summed
        );
    } else if r.exited_processes > 0 {
        let _ = writeln!(s, "exited processes: {}", r.exited_processes);
    }
    let _ = writeln!(
        s,
        "attached: {}; grace periods: {}",
        r.attach.describe(),
        match r.grace_period_source {
            GraceSource::Fentry => "fentry on synchronize_rcu*",
            GraceSource::Sched => "off-CPU time inside the call (sched_switch)",
            GraceSource::None => "not measured on this kernel",
        }
    );
    if r.missed_grace_periods > 0 {
        let _ = writeln!(
            s,
            "grace periods seen only half (under way at start or stop, or their thread exited): {}",
            r.missed_grace_periods
        );
    }
}

/// A process's lines: its totals, registrations, CPU, then a line per cmd with its breakdown.
fn process(s: &mut String, p: &ProcessReport, window_ns: u64) {
    let _ = writeln!(
        s,
        "\nPID {} ({}): {} calls, {}/s, {} errors",
        p.pid,
        process_name(p),
        p.calls,
        units::per_sec(p.calls_per_sec),
        p.errors
    );
    if p.registrations + p.registrations_failed > 0 {
        let failed = if p.registrations_failed > 0 {
            format!(" ({} more failed)", p.registrations_failed)
        } else {
            String::new()
        };
        let _ = writeln!(
            s,
            "  registered: {} calls{failed}, {} in all",
            p.registrations,
            units::ns(p.registration_ns)
        );
    }
    if p.cpu_ns.total() > 0 {
        let _ = writeln!(
            s,
            "  cpu: {} on the callers' CPUs + {} in IPI handlers on others; {:.2}% of a core over the last {:.2} s",
            units::ns(p.cpu_ns.caller),
            units::ns(p.cpu_ns.ipi_handler),
            p.cpu_pct,
            window_ns as f64 / 1e9
        );
    }
    if p.unregistered_eperm > 0 {
        let _ = writeln!(
            s,
            "  ! {} EPERM from expedited cmds issued without registering (REGISTER_* first)",
            p.unregistered_eperm
        );
    }
    let _ = writeln!(
        s,
        "  {:<44} {:>5} {:>10} {:>9} {:>8} {:>9} {:>9} {:>9}",
        "CMD", "FLAGS", "CALLS", "CALLS/S", "ERRORS", "P50", "P99", "MAX"
    );
    for c in &p.cmds {
        let name = match c.kind {
            Kind::GracePeriod => format!("{} (grace period)", c.cmd),
            // A known cmd with flags the kernel refuses: EINVAL, no barrier.
            Kind::Invalid if cmd::name(c.cmd_value).is_some() => {
                format!("{} (invalid flags)", c.cmd)
            }
            _ => c.cmd.clone(),
        };
        let mut line = format!(
            "  {:<44} {:>5} {:>10} {:>9} {:>8} {:>9} {:>9} {:>9}",
            name,
            cmd::flags_name(c.flags),
            c.calls,
            units::per_sec(c.calls_per_sec),
            c.errors,
            units::ns(c.latency_ns.p50),
            units::ns(c.latency_ns.p99),
            units::ns(c.latency_ns.max)
        );
        if !c.errno.is_empty() {
            let errs: Vec<String> = c.errno.iter().map(|(e, n)| format!("{e}:{n}")).collect();
            let _ = write!(line, "  {}", errs.join(" "));
        }
        let _ = writeln!(s, "{line}");
        breakdown(s, c);
    }
}

/// The "Findings" section, before the tables: rule, process, evidence, cost and fix.
fn findings(s: &mut String, r: &Report) {
    if r.findings.is_empty() {
        return;
    }
    let _ = writeln!(s, "\nFindings:");
    for f in &r.findings {
        let _ = writeln!(
            s,
            "  {} {} in PID {} ({}){}",
            match f.severity {
                Severity::Critical => "!!",
                Severity::Warning => "! ",
            },
            f.rule,
            f.pid,
            printable(&f.comm),
            f.tid.map(|t| format!(", thread {t}")).unwrap_or_default()
        );
        let _ = writeln!(s, "     evidence: {}", compact(&f.evidence));
        let _ = writeln!(s, "     cost: {}", compact(&f.cost));
        let _ = writeln!(s, "     fix: {}", f.fix);
        let _ = writeln!(s, "     why: {}", f.reference);
    }
}

/// A JSON object as `key value, key value` (nested objects inline).
fn compact(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Object(m) => m
            .iter()
            .map(|(k, v)| format!("{k} {}", compact(v)))
            .collect::<Vec<_>>()
            .join(", "),
        serde_json::Value::String(t) => printable(t).into_owned(),
        serde_json::Value::Array(a) => {
            format!("[{}]", a.iter().map(compact).collect::<Vec<_>>().join("; "))
        }
        serde_json::Value::Number(n) => match n.as_f64() {
            Some(x) if n.is_f64() => format!("{x:.2}"),
            _ => n.to_string(),
        },
        other => other.to_string(),
    }
}

/// Where a grace-period function was called from, for a human view.
pub fn caller(c: &Caller) -> String {
    let mut out = frame(c);
    if let Some(file) = &c.file {
        let file = file.rsplit('/').next().unwrap_or(file);
        match c.line {
            Some(line) => {
                let _ = write!(out, " ({}:{line})", printable(file));
            }
            None => {
                let _ = write!(out, " ({})", printable(file));
            }
        }
    }
    if let Some(m) = &c.module {
        let _ = write!(out, " in {}", printable(m.rsplit('/').next().unwrap_or(m)));
    }
    out
}

/// The "RCU writers" section: grace periods per process, function and caller.
fn writers(s: &mut String, r: &Report) {
    if r.rcu_writers.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "
RCU writers (userspace grace periods):"
    );
    for w in &r.rcu_writers {
        let name = if w.comm.is_empty() {
            Cow::Borrowed("?")
        } else {
            printable(&w.comm)
        };
        let _ = writeln!(
            s,
            "PID {} ({name}): {} [{}] called from {}",
            w.pid,
            printable(&w.function),
            w.flavour,
            caller(&w.caller)
        );
        let _ = writeln!(
            s,
            "  {} grace periods, p50 {}, p99 {}, max {}, {} in all: membarrier {} ({} calls), blocked {} (waiting for readers)",
            w.grace_periods,
            units::ns(w.latency_ns.p50),
            units::ns(w.latency_ns.p99),
            units::ns(w.latency_ns.max),
            units::ns(w.latency_ns.sum),
            units::ns(w.membarrier_ns),
            w.membarrier_calls,
            units::ns(w.blocked_ns)
        );
        let threads: Vec<String> = w
            .threads
            .iter()
            .map(|t| thread(&t.name, t.tid, t.grace_periods))
            .collect();
        let _ = writeln!(s, "  threads: {}", threads.join(" "));
    }
}

/// `name:count` pairs, space-separated, each name with `prefix` (`cpu1:30 cpu2:4`).
pub fn counts(map: &std::collections::BTreeMap<String, u64>, prefix: &str) -> String {
    let parts: Vec<String> = map
        .iter()
        .map(|(k, n)| format!("{prefix}{}:{n}", printable(k)))
        .collect();
    parts.join(" ")
}

/// The lines under a cmd row saying where its time went; only the parts that are non-zero.
fn breakdown(s: &mut String, c: &CmdReport) {
    let mut parts = Vec::new();
    if c.blocked_ns.sum > 0 {
        let mut p = format!(
            "blocked {} of {} in the call, summed over calls ({:.0}%), p50 {}, max {}",
            units::ns(c.blocked_ns.sum),
            units::ns(c.latency_ns.sum),
            c.blocked_pct(),
            units::ns(c.blocked_ns.p50),
            units::ns(c.blocked_ns.max)
        );
        if !c.woken_by.is_empty() {
            let _ = write!(p, "; woken by {}", counts(&c.woken_by, ""));
        }
        parts.push(p);
    }
    if c.ipis.sent > 0 {
        parts.push(format!(
            "IPIs {:.2}/call ({}), handler time {}",
            c.ipis_per_call(),
            counts(&c.ipis.per_cpu, "cpu"),
            units::ns(c.ipis.handler_ns)
        ));
    }
    if !c.ipis.victims.is_empty() {
        parts.push(format!("interrupted {}", victims(&c.ipis.victims, 4)));
    }
    if c.mutex_wait_ns.sum > 0 {
        parts.push(format!(
            "mutex wait {} (max {})",
            units::ns(c.mutex_wait_ns.sum),
            units::ns(c.mutex_wait_ns.max)
        ));
    }
    if c.threads.len() > 1 {
        parts.push(format!("threads: {}", threads(&c.threads, 4)));
    }
    if let (Some(stacks), Some(unattributed)) = (&c.stacks, c.unattributed) {
        parts.push(format!(
            "stacks: {} ({} calls unattributed){}",
            stacks.len(),
            unattributed,
            if stacks.iter().any(|s| s.estimated) {
                "; ~ = estimated from samples over the stack rate"
            } else {
                ""
            }
        ));
        for st in stacks.iter().take(3) {
            parts.push(format!(
                "  {}{} calls, {}: {}",
                if st.estimated { "~" } else { "" },
                st.calls,
                units::ns(st.latency_ns_sum),
                stack_frames(st, 8)
            ));
        }
    }
    for p in parts {
        let _ = writeln!(s, "      {p}");
    }
}

/// A stack's frames, innermost first, `a <- b <- c`: the first `max`, then how many more.
fn stack_frames(st: &StackReport, max: usize) -> String {
    let mut parts: Vec<String> = st.frames.iter().take(max).map(frame).collect();
    if st.frames.len() > max {
        parts.push(format!("{} more", st.frames.len() - max));
    }
    if st.truncated {
        parts.push("...".into());
    }
    parts.join(" <- ")
}

/// A frame in a stack: `symbol+0x1c`; without a symbol, `module+0x1a2b3` (the module's own
/// address, as perf prints it: `addr2line -e` takes it); else the address.
pub fn frame(c: &Caller) -> String {
    match (&c.symbol, c.offset) {
        (Some(sym), Some(off)) => format!("{}+{off:#x}", printable(sym)),
        (Some(sym), None) => printable(sym).into_owned(),
        _ => unnamed(c),
    }
}

/// Code by name alone, as folded stacks and metric labels want it (an offset would split one
/// function): the symbol, or `module+0xOFF`, or the address.
pub fn code_name(c: &Caller) -> String {
    match &c.symbol {
        Some(sym) => printable(sym).into_owned(),
        None => unnamed(c),
    }
}

/// Code without a symbol: `module+0xOFF`, or the address.
fn unnamed(c: &Caller) -> String {
    match (&c.module, c.module_offset) {
        (Some(m), Some(off)) => {
            format!("{}+{off:#x}", printable(m.rsplit('/').next().unwrap_or(m)))
        }
        _ => format!("{:#x}", c.address),
    }
}

/// Folded stacks (`-o folded`), for flame-graph tools: per process, cmd and stack, one line
/// `comm;CMD;outermost;...;innermost calls`. Frames are named by symbol alone (offsets would
/// split one function into many boxes), or `module+0xOFF`, or the address.
pub fn folded(r: &Report) -> String {
    let mut s = String::new();
    // The format's separators: no ';' or whitespace inside a name.
    let clean = |t: &str| t.replace([';', ' ', '\n', '\t'], "_");
    for p in &r.processes {
        for c in &p.cmds {
            for st in c.stacks.iter().flatten() {
                let mut line = format!("{};{}", clean(&printable(&p.comm)), c.cmd);
                for f in st.frames.iter().rev() {
                    let _ = write!(line, ";{}", clean(&code_name(f)));
                }
                let _ = writeln!(s, "{line} {}", st.calls);
            }
        }
    }
    s
}

/// Whose CPU time IPI handlers took, most interrupts first: `comm(pid):interrupts handler`
/// (`idle` for pid 0, `others` past the kernel map's room), the first `max`, then how many
/// more.
pub fn victims(vs: &[IpiVictim], max: usize) -> String {
    let mut parts: Vec<String> = vs
        .iter()
        .take(max)
        .map(|v| {
            let who = match v.pid {
                Some(0) => "idle".to_string(),
                Some(pid) => format!("{}({pid})", printable(&v.comm)),
                None => "others".to_string(),
            };
            format!("{who}:{} {}", v.interrupts, units::ns(v.handler_ns))
        })
        .collect();
    if vs.len() > max {
        parts.push(format!("{} more", vs.len() - max));
    }
    parts.join(", ")
}

/// One thread and its count: `name(tid):n`.
fn thread(name: &str, tid: u32, n: u64) -> String {
    format!("{}({tid}):{n}", printable(name))
}

/// A cmd's threads, busiest first, `name(tid):calls` as for grace periods: the first `max`,
/// then how many more.
pub fn threads(ts: &[CmdThread], max: usize) -> String {
    let mut parts: Vec<String> = ts
        .iter()
        .take(max)
        .map(|t| {
            if t.tid == 0 {
                format!("{} exited threads:{}", t.threads, t.calls)
            } else {
                thread(&t.name, t.tid, t.calls)
            }
        })
        .collect();
    if ts.len() > max {
        parts.push(format!("{} more", ts.len() - max));
    }
    parts.join(", ")
}

pub fn json(r: &Report) -> String {
    // Serializing plain structs of numbers, strings and maps with string keys cannot fail.
    serde_json::to_string(r).expect("report serializes")
}

/// `calibrate`'s table: each scenario's latency, on-CPU time and IPIs per call, and what it
/// costs at 1,000 calls a second.
pub fn calibration_text(rows: &[crate::model::Calibration], about: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "membarrier's cost on this host: {about}");
    let _ = writeln!(
        s,
        "{:<46} {:>7} {:>8} {:>8} {:>8} {:>9} {:>8} {:>11} {:>12}",
        "SCENARIO",
        "CALLS",
        "P50",
        "P99",
        "CPU/CALL",
        "IPIS/CALL",
        "HANDLER",
        "CORE%@1k/s",
        "US/S/CPU@1k/s"
    );
    for r in rows {
        let _ = write!(
            s,
            "{:<46} {:>7} {:>8} {:>8} {:>8} {:>9.2} {:>8} {:>11.3} {:>12.1}",
            r.scenario,
            r.calls,
            units::ns(r.p50_ns),
            units::ns(r.p99_ns),
            units::ns(r.caller_cpu_ns_per_call),
            r.ipis_per_call,
            units::ns(r.handler_ns_per_ipi),
            r.caller_pct_at(1000.0),
            r.handler_us_per_cpu_at(1000.0)
        );
        if r.errors > 0 {
            let _ = write!(s, "  ! {} failed: {}", r.errors, r.errno.join(","));
        }
        s.push('\n');
    }
    let _ = writeln!(
        s,
        "CPU/CALL: the caller's time on CPU inside a call (a grace period's wait is off CPU). HANDLER: one IPI's handler time on the CPU it interrupts.\n\
         CORE%@1k/s: share of one core the caller spends at 1,000 calls a second; US/S/CPU@1k/s: handler time per second on each CPU interrupted at that rate. Both scale with the rate."
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Model, Snapshot, tests::snapshot};

    #[test]
    fn control_bytes_are_escaped() {
        assert_eq!(printable("urcu"), "urcu");
        assert_eq!(
            printable("\x1b[2J\x1b[31mEV\nIL\x7f"),
            "\\x1b[2J\\x1b[31mEV\\x0aIL\\x7f"
        );
    }

    /// Code without a symbol as perf prints it, `module+0xOFF` (the module's own address),
    /// in text, frames and folded stacks; the address where even the module is unknown.
    #[test]
    fn unnamed_code_is_module_plus_offset() {
        let mut c = Caller {
            address: 0x5596_1d2c_a2b3,
            module: Some("/usr/sbin/knotd".into()),
            build_id: Some("ab12".into()),
            module_offset: Some(0x1a2b3),
            ..Default::default()
        };
        assert_eq!(frame(&c), "knotd+0x1a2b3");
        assert_eq!(caller(&c), "knotd+0x1a2b3 in knotd");
        c.symbol = Some("zone_reload".into());
        c.offset = Some(0x1c);
        assert_eq!(frame(&c), "zone_reload+0x1c");
        let anon = Caller {
            address: 0x7f00_0000_1000,
            ..Default::default()
        };
        assert_eq!(frame(&anon), "0x7f0000001000");
    }

    #[test]
    fn units() {
        assert_eq!(units::ns(412), "412ns");
        assert_eq!(units::ns(1_250), "1.25us");
        assert_eq!(units::ns(12_300_000), "12.30ms");
        assert_eq!(units::ns(1_500_000_000), "1.50s");
    }

    #[test]
    fn text_table() {
        let t = text(&Model::default().report(&snapshot()));
        assert!(
            t.starts_with("membarrier-trace: 2.00 s traced, 9 calls"),
            "{t}"
        );
        assert!(t.contains("1 missed, 0 dropped"));
        assert!(t.contains("PID 42 (urcu): 7 calls"));
        assert!(t.contains("% of a core over the last 2.00 s"), "{t}");
        assert!(t.contains("GLOBAL (grace period)"));
        assert!(t.contains("EPERM:2"));
        assert!(t.contains("! 2 EPERM from expedited cmds issued without registering"));
        assert!(t.contains("INVALID(3)"));
    }

    /// --stacks: exact stacks, sampled ones scaled to the calls sampled out beside them, and
    /// the unattributed calls add up to the row's calls; text and folded output show them.
    #[test]
    fn stacks_add_up_and_fold() {
        use crate::model::{StackCount, Stacks};
        let mut snap = snapshot();
        snap.rows[0].stacks_sampled_out = 1; // PRIVATE_EXPEDITED, 4 + 2 calls with EPERM
        let g = ((42, 0), 8, 0);
        snap.stacks = Some(Stacks {
            stacks: [
                (
                    (g, vec![0x10, 0x20]),
                    StackCount {
                        exact: 3,
                        exact_ns: 1500,
                        complete: true,
                        ..Default::default()
                    },
                ),
                (
                    (g, vec![0x10, 0x30]),
                    StackCount {
                        sampled: 1,
                        sampled_ns: 700,
                        ..Default::default()
                    },
                ),
            ]
            .into(),
            unattributed: [(g, 1)].into(),
        });
        snap.callers.insert(
            ((42, 0), 0x10),
            Caller {
                address: 0x10,
                symbol: Some("syscall".into()),
                offset: Some(0x1a),
                ..Default::default()
            },
        );
        let r = Model::default().report(&snap);
        let pe = &r.processes[0]
            .cmds
            .iter()
            .find(|c| c.cmd_value == 8)
            .unwrap();
        let stacks = pe.stacks.as_ref().unwrap();
        let got: Vec<(u64, u64, bool, bool)> = stacks
            .iter()
            .map(|s| (s.calls, s.latency_ns_sum, s.estimated, s.truncated))
            .collect();
        assert_eq!(got, [(3, 1500, false, false), (2, 1400, true, true)]);
        assert_eq!(pe.unattributed, Some(1));
        assert_eq!(pe.calls, 6);
        let t = text(&r);
        assert!(
            t.contains("stacks: 2 (1 calls unattributed); ~ = estimated"),
            "{t}"
        );
        assert!(
            t.contains("~2 calls, 1.40us: syscall+0x1a <- 0x30 <- ..."),
            "{t}"
        );
        assert_eq!(
            folded(&r),
            "urcu;PRIVATE_EXPEDITED;0x20;syscall 3\nurcu;PRIVATE_EXPEDITED;0x30;syscall 2\n"
        );
        // Without --stacks, nothing of it.
        let plain = Model::default().report(&snapshot());
        assert!(plain.processes[0].cmds[0].stacks.is_none());
        assert!(!json(&plain).contains("unattributed"));
    }

    /// Findings come first in text, before the tables, with their numbers and fix.
    #[test]
    fn findings_come_first() {
        let mut r = Model::default().report(&snapshot());
        r.findings = crate::model::findings::of(&r, &crate::model::findings::Machine::default());
        // PID 42's PRIVATE_EXPEDITED row has 2 EPERM.
        assert_eq!(r.findings.len(), 1, "{:#?}", r.findings);
        assert_eq!(r.findings[0].rule, "unregistered_eperm");
        let t = text(&r);
        let at = t.find("Findings:").unwrap();
        assert!(at < t.find("PID 42").unwrap(), "{t}");
        assert!(t.contains("!! unregistered_eperm in PID 42 (urcu)"), "{t}");
        assert!(
            t.contains("evidence: calls 6, cmd PRIVATE_EXPEDITED, eperm 2"),
            "{t}"
        );
        assert!(json(&r).contains("\"findings\":[{\"rule\":\"unregistered_eperm\""));
    }

    #[test]
    fn text_empty() {
        let t = text(&Model::default().report(&Snapshot::default()));
        assert!(t.contains("no membarrier calls seen"));
        // An empty float sum is -0.0 in Rust; it must not show as such.
        assert!(
            json(&Model::default().report(&Snapshot::default())).contains("\"calls_per_sec\":0.0")
        );
    }

    #[test]
    fn json_is_one_line() {
        let j = json(&Model::default().report(&snapshot()));
        assert!(!j.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&j).unwrap();
        assert_eq!(v["processes"][0]["pid"], 42);
    }
}
