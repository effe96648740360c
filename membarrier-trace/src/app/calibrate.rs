//! `membarrier-trace calibrate`: what each membarrier cmd costs on this host, measured by the
//! tracer's own programs. Each scenario runs in a child process (this binary re-executed with
//! [`SCENARIO_ARG`]) that the tracer follows by pid, so every scenario has rows of its own.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    process::{Command, Stdio},
    thread,
};

use anyhow::{Context as _, Result, bail};

use crate::{
    collect::collector::Collector,
    model::cmd,
    model::{Calibration, Model, ProcessReport},
    siblings::{Siblings, pin},
};

/// argv[1] of a scenario's child process.
pub const SCENARIO_ARG: &str = "__calibrate-scenario";

/// Siblings spin on CPUs 1..; more than this many add little to the picture and much to the
/// run time.
const MAX_SIBLINGS: usize = 7;

/// One measurement: `calls` of `cmd` in a process where `siblings` threads spin on other CPUs
/// (so an expedited barrier has that many CPUs to interrupt), after `register`, in each of
/// `processes` processes.
#[derive(Clone, Debug, PartialEq)]
pub struct Scenario {
    pub name: String,
    pub cmd: i32,
    pub calls: u64,
    pub siblings: usize,
    pub register: Option<i32>,
    pub processes: u32,
}

const GLOBAL_EXPEDITED: i32 = 2;
const REGISTER_GLOBAL_EXPEDITED: i32 = 4;
const SYNC_CORE: i32 = 32;
const REGISTER_SYNC_CORE: i32 = 64;
const RSEQ: i32 = 128;
const REGISTER_RSEQ: i32 = 256;

/// The scenarios for a machine with `cpus` CPUs, scaled by `calls` (calls of each cheap one).
///
/// Long: a table, one entry per scenario.
pub fn scenarios(cpus: usize, calls: u64) -> Vec<Scenario> {
    let s = |name: String, cmd, calls, siblings, register, processes| Scenario {
        name,
        cmd,
        calls,
        siblings,
        register,
        processes,
    };
    let most = cpus.saturating_sub(1).min(MAX_SIBLINGS);
    let mut v = vec![
        s("QUERY".into(), cmd::QUERY, calls, 0, None, 1),
        s(
            "PRIVATE_EXPEDITED, one thread".into(),
            cmd::PRIVATE_EXPEDITED,
            calls,
            0,
            Some(cmd::REGISTER_PRIVATE_EXPEDITED),
            1,
        ),
    ];
    for k in 1..=most {
        v.push(s(
            format!("PRIVATE_EXPEDITED, {k} sibling{} running", plural(k)),
            cmd::PRIVATE_EXPEDITED,
            calls / 4,
            k,
            Some(cmd::REGISTER_PRIVATE_EXPEDITED),
            1,
        ));
    }
    let all = format!("{most} sibling{} running", plural(most));
    v.extend([
        s(
            format!("GLOBAL_EXPEDITED, {all}"),
            GLOBAL_EXPEDITED,
            calls / 4,
            most,
            Some(REGISTER_GLOBAL_EXPEDITED),
            1,
        ),
        s(
            format!("PRIVATE_EXPEDITED_SYNC_CORE, {all}"),
            SYNC_CORE,
            calls / 4,
            most,
            Some(REGISTER_SYNC_CORE),
            1,
        ),
        s(
            format!("PRIVATE_EXPEDITED_RSEQ, {all}"),
            RSEQ,
            calls / 4,
            most,
            Some(REGISTER_RSEQ),
            1,
        ),
        s(
            "GLOBAL (a grace period)".into(),
            cmd::GLOBAL,
            20,
            0,
            None,
            1,
        ),
        s(
            "REGISTER_PRIVATE_EXPEDITED, one thread".into(),
            cmd::REGISTER_PRIVATE_EXPEDITED,
            1,
            0,
            None,
            10,
        ),
        s(
            "REGISTER_PRIVATE_EXPEDITED, two threads".into(),
            cmd::REGISTER_PRIVATE_EXPEDITED,
            1,
            1,
            None,
            10,
        ),
    ]);
    v
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// Runs every scenario under `collector` (loaded with a filter and started) and reads the
/// figures for each.
pub fn run(
    collector: &mut Collector,
    scenarios: &[Scenario],
    progress: impl Fn(&str),
) -> Result<Vec<Calibration>> {
    let exe = std::env::current_exe().context("finding this program to run the scenarios")?;
    let mut pids = Vec::new();
    for (i, s) in scenarios.iter().enumerate() {
        progress(&s.name);
        let mut mine = Vec::new();
        for _ in 0..s.processes {
            let mut child = Command::new(&exe)
                .args([SCENARIO_ARG, &i.to_string(), &s.calls.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .context("starting a scenario")?;
            let mut line = String::new();
            BufReader::new(child.stdout.as_mut().context("scenario stdout")?)
                .read_line(&mut line)?;
            if line.trim() != "ready" {
                bail!("scenario {:?} did not start", s.name);
            }
            collector.add_pid(child.id())?;
            child
                .stdin
                .take()
                .context("scenario stdin")?
                .write_all(b"go\n")?;
            let status = child.wait()?;
            if !status.success() {
                bail!("scenario {:?} failed: {status}", s.name);
            }
            mine.push(child.id());
        }
        pids.push(mine);
    }
    let report = Model::default().report(&collector.snapshot(true)?);
    Ok(scenarios
        .iter()
        .zip(pids)
        .map(|(s, pids)| {
            let procs: Vec<&ProcessReport> = report
                .processes
                .iter()
                .filter(|p| pids.contains(&p.pid))
                .collect();
            figures(s, &procs)
        })
        .collect())
}

/// A scenario's figures from its processes' rows of its cmd (every flags and outcome).
fn figures(s: &Scenario, procs: &[&ProcessReport]) -> Calibration {
    let mut hist = crate::model::hist::Histogram::default();
    let (mut calls, mut errors, mut sum, mut on_cpu, mut ipis, mut handler) = (0, 0, 0, 0, 0, 0);
    let (mut min, mut max) = (u64::MAX, 0);
    let mut errno = Vec::new();
    for c in procs
        .iter()
        .flat_map(|p| &p.cmds)
        .filter(|c| c.cmd_value == s.cmd)
    {
        calls += c.calls;
        errors += c.errors;
        sum += c.latency_ns.sum;
        on_cpu += c.on_cpu_ns;
        ipis += c.ipis.sent;
        handler += c.ipis.handler_ns;
        min = min.min(c.latency_ns.min);
        max = max.max(c.latency_ns.max);
        for b in &c.histogram {
            hist.add_to(membarrier_trace_common::hist_bucket(b.le_ns), b.count);
        }
        errno.extend(c.errno.keys().cloned());
    }
    errno.sort();
    errno.dedup();
    let per = |n: u64, d: u64| n.checked_div(d).unwrap_or(0);
    Calibration {
        scenario: s.name.clone(),
        cmd: cmd::display_name(s.cmd),
        siblings: s.siblings,
        calls,
        errors,
        errno,
        p50_ns: hist.quantile(0.5, min, max),
        p99_ns: hist.quantile(0.99, min, max),
        mean_ns: per(sum, calls),
        caller_cpu_ns_per_call: per(on_cpu, calls),
        ipis_per_call: if calls == 0 {
            0.0
        } else {
            ipis as f64 / calls as f64
        },
        handler_ns_per_ipi: per(handler, ipis),
    }
}

fn membarrier(cmd: i32, flags: u32) -> i64 {
    // SAFETY: membarrier takes no pointers.
    unsafe { libc::syscall(libc::SYS_membarrier, cmd, flags, 0) }
}

/// The child's side: `membarrier-trace __calibrate-scenario INDEX CALLS`. Says `ready`, waits
/// for a line, runs the scenario and exits.
pub fn child(args: &[String]) -> Result<()> {
    let index: usize = args.first().context("scenario index")?.parse()?;
    let calls: u64 = args.get(1).context("calls")?.parse()?;
    let cpus = thread::available_parallelism().map_or(1, |n| n.get());
    let s = Scenario {
        calls,
        ..scenarios(cpus, 0)
            .into_iter()
            .nth(index)
            .context("no such scenario")?
    };
    println!("ready");
    std::io::stdout().flush()?;
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;

    pin(0);
    let siblings = Siblings::start(&(1..=s.siblings).collect::<Vec<_>>(), false);
    if let Some(r) = s.register {
        membarrier(r, 0);
    }
    for _ in 0..s.calls {
        // Each call once every sibling has been seen running, so it interrupts them all.
        siblings.seen_running();
        membarrier(s.cmd, 0);
    }
    drop(siblings);
    Ok(())
}
