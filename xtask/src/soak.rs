//! `cargo xtask soak [MINUTES]`: the tracer left running on a busy box. A system-wide tracer and
//! a `-- COMMAND` tracer run at once while short-lived processes and threads call membarrier by
//! the tens of thousands, pids wrap (pid_max is lowered for the run), processes with control
//! bytes in their names and processes renamed just before they exit come and go, and a steady
//! caller calls at full rate. Every workload counts its own calls; the soak then checks both
//! tracers' final reports against those counts, name by name: every call counted exactly once
//! or counted in a named loss, none under a wrong process, the command tracer seeing only the
//! command's processes, the tracers' memory flat and the kernel maps within their bound.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

/// pid_max for the run: every 10,000 processes and threads created wrap the pids once.
const PID_MAX: u32 = 10_000;
/// What a soak must have put the tracers through, however short.
const MIN_PROCESSES: u64 = 50_000;
const MIN_THREADS: u64 = 50_000;
/// Children and threads per round of each churning workload.
const ROUND: &str = "500";
const HOSTILE: &str = "\x1b[2J\x1b[31mEV\nIL";
/// Renamed (PR_SET_NAME) just before its last call and exit: only its exit can tell.
const RENAMED: (&str, &str) = ("soak-rename0", "soak-renamed");
/// Tracer RSS may grow this much from its second quarter to its last (the median of each
/// quarter's samples). Before that it grows to hold what it keeps of exited processes: the first
/// RETIRED_KEEP (1024) each with their own rows, then one entry per name; bounded, and reached
/// within seconds here. Medians, not single samples: RSS swings by up to 3 MiB within a second
/// (the retire pass's and each report's buffers come and go), so one sample at a trough against
/// one at a report's peak grew 4.2 MiB with no leak (CI of 48d91e7).
const RSS_SLACK_KIB: u64 = 4 << 10;

/// Calls per cmd and processes, per process name.
#[derive(Default, Clone, PartialEq, Debug)]
struct Tally {
    calls: BTreeMap<i64, u64>,
    processes: u64,
}

type ByName = BTreeMap<String, Tally>;

/// A sysctl set for the life of the guard.
struct Sysctl(PathBuf, String);

impl Sysctl {
    fn set(name: &str, v: u32) -> Result<Sysctl> {
        let path = Path::new("/proc/sys").join(name);
        let old = fs::read_to_string(&path)?;
        fs::write(&path, v.to_string()).with_context(|| format!("setting {name}"))?;
        Ok(Sysctl(path, old.trim().to_string()))
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        let _ = fs::write(&self.0, &self.1);
    }
}

/// A child whose stdout and stderr go to files in the soak's directory; killed if dropped
/// still running (a failed soak leaves nothing behind).
struct Proc {
    child: Child,
    out: PathBuf,
    err: PathBuf,
}

impl Proc {
    fn spawn(dir: &Path, name: &str, cmd: &mut Command) -> Result<Proc> {
        let (out, err) = (
            dir.join(format!("{name}.out")),
            dir.join(format!("{name}.err")),
        );
        let child = cmd
            .stdin(Stdio::null())
            .stdout(fs::File::create(&out)?)
            .stderr(fs::File::create(&err)?)
            .spawn()
            .with_context(|| format!("starting {cmd:?}"))?;
        Ok(Proc { child, out, err })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until stderr has a line starting with `prefix`.
    fn wait_for_err(&mut self, prefix: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let err = fs::read_to_string(&self.err).unwrap_or_default();
            if err.lines().any(|l| l.starts_with(prefix)) {
                return Ok(());
            }
            if self.child.try_wait()?.is_some() || Instant::now() > deadline {
                bail!("no {prefix:?} line; stderr:\n{err}");
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for it to exit (at most `timeout`); it must succeed. Returns its stdout.
    fn finish(mut self, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = self.child.try_wait()? {
                break s;
            }
            if Instant::now() > deadline {
                bail!("{} did not exit in {timeout:?}", self.out.display());
            }
            thread::sleep(Duration::from_millis(50));
        };
        let err = fs::read_to_string(&self.err).unwrap_or_default();
        if !status.success() {
            bail!("{} failed ({status}):\n{err}", self.out.display());
        }
        Ok(fs::read_to_string(&self.out)?)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The last JSON document in `text` with `key`.
fn last_json(text: &str, key: &str) -> Result<Value> {
    crate::bench::last_json(text.as_bytes(), key)
}

/// A workload's own count: every process it made and every call, under its name.
fn workload_tally(out: &str) -> Result<(Tally, u64)> {
    let w = last_json(out, "outcomes")?;
    let mut t = Tally {
        processes: 1 + w["children"].as_u64().context("children")?,
        ..Tally::default()
    };
    // Each child makes one QUERY call (it exits 1 if the call fails, and is then not counted
    // in `children`: its call is not known to have been made).
    *t.calls.entry(0).or_default() += t.processes - 1;
    for o in w["outcomes"].as_array().context("outcomes")? {
        *t.calls
            .entry(o["cmd"].as_i64().context("cmd")?)
            .or_default() += o["count"].as_u64().context("count")?;
    }
    Ok((t, w["threads"].as_u64().unwrap_or(0)))
}

fn add(into: &mut ByName, name: &str, t: &Tally) {
    let e = into.entry(name.to_string()).or_default();
    e.processes += t.processes;
    for (cmd, n) in &t.calls {
        *e.calls.entry(*cmd).or_default() += n;
    }
}

/// A tracer's report, summed per process name.
fn tracer_tally(report: &Value) -> Result<ByName> {
    let mut by = ByName::new();
    for p in report["processes"].as_array().context("processes")? {
        let mut t = Tally {
            processes: p["processes"].as_u64().context("processes")?,
            ..Tally::default()
        };
        for c in p["cmds"].as_array().context("cmds")? {
            *t.calls
                .entry(c["cmd_value"].as_i64().context("cmd")?)
                .or_default() += c["calls"].as_u64().context("calls")?;
        }
        add(&mut by, p["comm"].as_str().context("comm")?, &t);
    }
    Ok(by)
}

/// The medians of RSS samples in the second quarter of the run and in the last.
fn rss_quarters(rss: &[u64]) -> (u64, u64) {
    let quarter = |q: usize| median(&rss[q * rss.len() / 4..(q + 1) * rss.len() / 4]);
    (quarter(1), quarter(3))
}

/// The median of `v` (the upper one of an even count); 0 if empty.
fn median(v: &[u64]) -> u64 {
    let mut v = v.to_vec();
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

fn vm_rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The kernel's own accounting of the BPF maps `pid` holds: the sum of their fdinfo `memlock`.
fn map_memlock(pid: u32) -> u64 {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return 0;
    };
    dir.filter_map(|e| fs::read_to_string(e.ok()?.path()).ok())
        .filter(|info| info.contains("map_type:"))
        .filter_map(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("memlock:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
        .sum()
}

/// Processes and threads created on the box since boot (/proc/stat `processes`).
fn forks() -> u64 {
    fs::read_to_string("/proc/stat")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("processes "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// One tracer's figures over the run.
struct Watch {
    name: &'static str,
    pid: u32,
    rss_kib: Vec<u64>,
    maps: Vec<u64>,
}

impl Watch {
    /// While it runs (an exited one has no RSS).
    fn sample(&mut self) {
        let rss = vm_rss_kib(self.pid);
        if rss > 0 {
            self.rss_kib.push(rss);
            self.maps.push(map_memlock(self.pid));
        }
    }
}

/// Holds `tracer`'s per-name figures against the workloads' own, for the names in `truth`.
/// Each name's calls may fall short of the truth only by calls the tracer counted as lost
/// (missed or dropped, which are not per process): a name with more calls than its workloads
/// made has someone else's.
fn check(who: &str, truth: &ByName, report: &Value, problems: &mut Vec<String>) -> Result<()> {
    let seen = tracer_tally(report)?;
    let losses = report["missed_calls"].as_u64().context("missed_calls")?
        + report["dropped"]["total"].as_u64().context("dropped")?;
    let mut short = 0;
    for (name, t) in truth {
        let s = seen.get(name).cloned().unwrap_or_default();
        for (cmd, &n) in &t.calls {
            let got = s.calls.get(cmd).copied().unwrap_or(0);
            if got > n {
                problems.push(format!(
                    "{who}: {name:?} cmd {cmd}: {got} calls, the workloads made {n}"
                ));
            }
            short += n.saturating_sub(got);
        }
        for (cmd, got) in &s.calls {
            if !t.calls.contains_key(cmd) {
                problems.push(format!("{who}: {name:?} cmd {cmd}: {got} calls, made none"));
            }
        }
        if s.processes > t.processes || (losses == 0 && s.processes != t.processes) {
            problems.push(format!(
                "{who}: {name:?}: {} processes, the workloads made {}",
                s.processes, t.processes
            ));
        }
    }
    if short > losses {
        problems.push(format!(
            "{who}: {short} calls not counted, only {losses} counted as lost"
        ));
    }
    if seen.contains_key(RENAMED.0) {
        problems.push(format!(
            "{who}: processes named {:?}, renamed {:?} before exiting",
            RENAMED.0, RENAMED.1
        ));
    }
    Ok(())
}

/// Long: a script: the tracers and workloads started, the hour's loop, then each check in the
/// order docs/design.md, "Soak", lists them.
pub fn soak(root: &Path, minutes: f64) -> Result<()> {
    if !(minutes > 0.0 && minutes <= 24.0 * 60.0) {
        bail!("soak: MINUTES must be more than 0 and at most a day, not {minutes}");
    }
    let tracer = crate::dist::static_bins(root).join("membarrier-trace");
    let workload = crate::dist::static_bins(root).join("membarrier-workload");
    let dir = root.join("target/soak");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let secs = minutes * 60.0;
    let secs_arg = format!("{secs}");
    let _pid_max = Sysctl::set("kernel/pid_max", PID_MAX)?;
    let forks_at_start = forks();
    let started = Instant::now();
    eprintln!(
        "xtask: soak: {minutes} min, pid_max {PID_MAX}, output in {}",
        dir.display()
    );

    let mut system = Proc::spawn(
        &dir,
        "system-wide",
        Command::new(&tracer).args(["-o", "json", "-i", "10"]),
    )?;
    system.wait_for_err("membarrier-trace: tracing")?;
    let mut command = Proc::spawn(
        &dir,
        "command",
        Command::new(&tracer)
            .args(["-o", "json", "-i", "5", "--"])
            .arg(&workload)
            .args(["--name", "soak-cmd", "--fork-children", ROUND])
            .args(["--thread-churn", ROUND, "--repeat-secs", &secs_arg]),
    )?;
    command.wait_for_err("membarrier-trace: tracing")?;
    let steady = Proc::spawn(
        &dir,
        "steady",
        Command::new(&workload).args(["--name", "soak-steady", "--steady-secs", &secs_arg]),
    )?;
    let churn = Proc::spawn(
        &dir,
        "churn",
        Command::new(&workload)
            .args(["--name", "soak-churn", "--fork-children", ROUND])
            .args(["--thread-churn", ROUND, "--repeat-secs", &secs_arg]),
    )?;

    let mut watches = [
        Watch {
            name: "system-wide",
            pid: system.pid(),
            rss_kib: vec![],
            maps: vec![],
        },
        Watch {
            name: "command",
            pid: command.pid(),
            rss_kib: vec![],
            maps: vec![],
        },
    ];
    watches.iter_mut().for_each(Watch::sample);
    // Meanwhile, once a second: a process with a hostile name, and one renamed just before it
    // exits; the tracers' memory.
    let mut truth = ByName::new();
    let mut threads = 0;
    let mut n = 0;
    while started.elapsed().as_secs_f64() < secs {
        for (i, (name, extra)) in [
            (HOSTILE, &[][..]),
            (RENAMED.0, &["--rename", RENAMED.1][..]),
        ]
        .into_iter()
        .enumerate()
        {
            let p = Proc::spawn(
                &dir,
                &format!("named-{i}"),
                Command::new(&workload)
                    .args(["--name", name, "--query", "3"])
                    .args(extra),
            )?;
            let (t, _) = workload_tally(&p.finish(Duration::from_secs(60))?)?;
            add(&mut truth, if i == 0 { HOSTILE } else { RENAMED.1 }, &t);
        }
        n += 1;
        watches.iter_mut().for_each(Watch::sample);
        thread::sleep(Duration::from_millis(1000));
    }
    let grace = Duration::from_secs_f64(secs + 120.0);
    for (name, p) in [("soak-steady", steady), ("soak-churn", churn)] {
        let (t, th) = workload_tally(&p.finish(grace)?)?;
        add(&mut truth, name, &t);
        threads += th;
    }
    let command_out = command.finish(grace)?;
    let (cmd_truth, th) = workload_tally(&command_out)?;
    threads += th;
    add(&mut truth, "soak-cmd", &cmd_truth);
    // SAFETY: kill has no memory effects.
    unsafe { libc::kill(system.pid() as i32, libc::SIGINT) };
    let system_out = system.finish(Duration::from_secs(60))?;
    let created = forks() - forks_at_start;
    let elapsed = started.elapsed().as_secs_f64();

    let system_report = last_json(&system_out, "processes")?;
    let command_report = last_json(&command_out, "processes")?;
    let mut problems = Vec::new();
    check("system-wide", &truth, &system_report, &mut problems)?;
    let only_cmd: ByName = [("soak-cmd".to_string(), cmd_truth)].into();
    check("command", &only_cmd, &command_report, &mut problems)?;
    for name in tracer_tally(&command_report)?.keys() {
        if name != "soak-cmd" {
            problems.push(format!("command: traced a stranger named {name:?}"));
        }
    }
    let processes: u64 = truth.values().map(|t| t.processes).sum();
    if processes < MIN_PROCESSES || threads < MIN_THREADS {
        problems.push(format!(
            "only {processes} processes and {threads} threads (the soak wants {MIN_PROCESSES} and {MIN_THREADS})"
        ));
    }
    if created < 2 * u64::from(PID_MAX) {
        problems.push(format!("{created} tasks created: pids did not wrap twice"));
    }

    let mut table = String::new();
    writeln!(
        table,
        "soak: {:.1} min; {created} tasks created ({} pid wraps at pid_max {PID_MAX}); \
         {processes} processes and {threads} threads of the workloads; {n} named rounds",
        elapsed / 60.0,
        created / u64::from(PID_MAX)
    )?;
    let system_seen = tracer_tally(&system_report)?;
    let command_seen = tracer_tally(&command_report)?;
    writeln!(
        table,
        "{:<16} {:>10} {:>12} {:>12} {:>12}",
        "name", "processes", "calls made", "system-wide", "command"
    )?;
    let total = |t: Option<&Tally>| t.map_or(0, |t| t.calls.values().sum::<u64>());
    for (name, t) in &truth {
        writeln!(
            table,
            "{:<16} {:>10} {:>12} {:>12} {:>12}",
            format!("{name:?}"),
            t.processes,
            total(Some(t)),
            total(system_seen.get(name)),
            total(command_seen.get(name)),
        )?;
    }
    for (w, report) in watches.iter().zip([&system_report, &command_report]) {
        let bound = report["maps"]["kernel_bytes_bound"].as_u64().unwrap_or(0);
        let rss = &w.rss_kib;
        let (warm, last) = rss_quarters(rss);
        let first = rss.first().copied().unwrap_or(0);
        let peak = rss.iter().copied().max().unwrap_or(0);
        writeln!(
            table,
            "{}: missed {}, dropped {}\n  RSS {first} KiB at start, median {warm} in the second \
             quarter, {last} in the last, peak {peak} ({} samples, about 1 s apart); kernel maps {:?} \
             bytes (fdinfo memlock), bound {bound}",
            w.name,
            report["missed_calls"],
            report["dropped"],
            rss.len(),
            w.maps.iter().collect::<std::collections::BTreeSet<_>>(),
        )?;
        if last > warm + RSS_SLACK_KIB {
            problems.push(format!(
                "{}: RSS grew from a median of {warm} KiB in the second quarter to {last} KiB \
                 in the last: {rss:?}",
                w.name
            ));
        }
        let maps_max = w.maps.iter().copied().max().unwrap_or(0);
        if w.maps.iter().any(|&m| m != w.maps[0]) || maps_max == 0 || maps_max > bound {
            problems.push(format!(
                "{}: kernel maps {:?} bytes, bound {bound}",
                w.name, w.maps
            ));
        }
    }
    print!("{table}");
    fs::write(dir.join("table.txt"), &table)?;
    if !problems.is_empty() {
        bail!("soak failed:\n  {}", problems.join("\n  "));
    }
    println!("soak: passed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn report(missed: u64, procs: &[(&str, u64, u64)]) -> Value {
        let processes: Vec<Value> = procs
            .iter()
            .map(|&(comm, processes, calls)| {
                json!({"comm": comm, "processes": processes,
                       "cmds": [{"cmd_value": 0, "calls": calls}]})
            })
            .collect();
        json!({"missed_calls": missed, "dropped": {"total": 0}, "processes": processes})
    }

    fn problems(truth: &[(&str, u64, u64)], r: &Value) -> Vec<String> {
        let mut by = ByName::new();
        for &(name, processes, calls) in truth {
            let t = Tally {
                calls: [(0, calls)].into(),
                processes,
            };
            add(&mut by, name, &t);
        }
        let mut p = Vec::new();
        check("t", &by, r, &mut p).unwrap();
        p
    }

    #[test]
    fn the_soak_check_catches_what_it_claims_to() {
        let truth = [("a", 3, 10), ("b", 1, 5)];
        // Exact, with per-name entries split over several processes entries.
        let exact = report(
            0,
            &[("a", 1, 4), ("b", 1, 5), ("a", 2, 6), ("other", 1, 99)],
        );
        assert!(problems(&truth, &exact).is_empty());
        // A call under the wrong name: one name short, the other over.
        let moved = report(0, &[("a", 3, 9), ("b", 1, 6)]);
        assert_eq!(
            problems(&truth, &moved).len(),
            2,
            "{:?}",
            problems(&truth, &moved)
        );
        // Short and not counted as lost; then counted as missed.
        assert_eq!(
            problems(&truth, &report(0, &[("a", 3, 9), ("b", 1, 5)])).len(),
            1
        );
        assert!(problems(&truth, &report(1, &[("a", 3, 9), ("b", 1, 5)])).is_empty());
        // A process missing with nothing lost; a renamed process under its old name.
        assert_eq!(
            problems(&truth, &report(0, &[("a", 2, 10), ("b", 1, 5)])).len(),
            1
        );
        let stale = report(0, &[("a", 3, 10), ("b", 1, 5), (RENAMED.0, 1, 1)]);
        assert_eq!(problems(&truth, &stale).len(), 1);
    }

    #[test]
    fn rss_growth_is_told_from_its_swings() {
        let grew = |rss: &[u64]| {
            let (warm, last) = rss_quarters(rss);
            last > warm + RSS_SLACK_KIB
        };
        // Warming up, then swinging 3 MiB around 29 MiB, a trough a quarter in and a peak
        // at the end (the single samples CI once compared): no growth.
        let mut swings: Vec<u64> = (0..48)
            .map(|i| [28_000, 29_000, 31_000, 29_500][i % 4])
            .collect();
        swings[..4].copy_from_slice(&[24_000, 26_000, 27_000, 27_500]);
        swings[12] = 27_900;
        swings[47] = 32_900;
        assert!(!grew(&swings));
        // A leak of 200 KiB a second: 4.7 MiB between the quarters' medians (24 s apart).
        let leak: Vec<u64> = swings
            .iter()
            .enumerate()
            .map(|(i, r)| r + 200 * i as u64)
            .collect();
        assert!(grew(&leak));
        assert_eq!(rss_quarters(&[]), (0, 0));
    }
}
