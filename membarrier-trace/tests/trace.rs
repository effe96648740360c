//! End-to-end tests: the real eBPF programs, loaded as root, against workloads that issue a
//! known mix of membarrier calls. Run them with `cargo xtask test` (as root).

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    path::PathBuf,
    process::{Child, ChildStderr, Command, Output, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

const TRACER: &str = env!("CARGO_BIN_EXE_membarrier-trace");
const WORKLOAD: &str = env!("CARGO_BIN_EXE_membarrier-workload");
const TIMEOUT: Duration = Duration::from_secs(60);

/// The tracer, with `--attach $MT_ATTACH` when that is set (`cargo xtask vmtest` runs these
/// tests once per attach mode).
fn tracer() -> Command {
    let mut c = Command::new(TRACER);
    if let Ok(mode) = std::env::var("MT_ATTACH") {
        c.args(["--attach", &mode]);
    }
    c
}

/// Whether this kernel lets the syscall hook attach with fentry. `cargo xtask vmtest` says so
/// for each guest kernel (`MT_FENTRY=allowed|no-syscall|refused`: `no-syscall`, 5.10, allows
/// fentry but refuses the hook's read of the syscall's argument); elsewhere `--attach fentry`
/// is asked.
fn fentry_allowed() -> bool {
    std::env::var("MT_FENTRY").map_or_else(|_| fentry_any(), |v| v == "allowed")
}

/// Whether this kernel lets BPF programs attach with fentry at all (the breakdown's, the
/// hook floor's, which read no argument).
fn fentry_any() -> bool {
    static ALLOWED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ALLOWED.get_or_init(|| match std::env::var("MT_FENTRY").as_deref() {
        Ok("allowed" | "no-syscall") => true,
        Ok("refused") => false,
        _ => Command::new(TRACER)
            .args([
                "--attach",
                "fentry",
                "--no-breakdown",
                "-d",
                "0.05",
                "-o",
                "json",
            ])
            .output()
            .unwrap()
            .status
            .success(),
    })
}

/// Whether the kernel is PREEMPT_RT. `cargo xtask vmtest` says so for each guest kernel
/// (`MT_PREEMPT_RT=yes|no`); elsewhere the kernel's build string is asked.
fn preempt_rt() -> bool {
    match std::env::var("MT_PREEMPT_RT").as_deref() {
        Ok("yes") => true,
        Ok("no") => false,
        _ => std::fs::read_to_string("/proc/sys/kernel/version")
            .unwrap()
            .contains("PREEMPT_RT"),
    }
}

/// Whether the kernel may skip the hook's programs when two tasks on a CPU run them at once:
/// fentry on PREEMPT_RT, where programs are preemptible. Such calls are counted as missed.
fn hook_may_skip() -> bool {
    std::env::var("MT_ATTACH").as_deref() == Ok("fentry") && preempt_rt()
}

/// The tracer's counts for process `p` against the workload's own, per (cmd, flags, errno):
/// equal, with nothing missed; or, where the hook may skip, no row over, and the shortfall at
/// least the missed calls (`p` being the only traced process) and at most those plus the
/// hook's skipped runs (a call whose enter and exit were both skipped is seen only there).
/// Returns the shortfall.
fn assert_counts(report: &Value, p: &Value, mine: &Value) -> u64 {
    assert_threads_add_up(report, p);
    let (ours, truth) = (tracer_counts(p), workload_counts(mine));
    let missed = report["missed_calls"].as_u64().unwrap();
    let why = format!("missed {missed}, dropped {}", report["dropped"]);
    if !hook_may_skip() || ours == truth {
        assert_eq!(ours, truth, "{why}");
        assert_eq!(missed, 0, "{why}");
        assert_eq!(report["dropped"]["hook_runs_skipped"], 0, "{why}");
        return 0;
    }
    assert!(
        ours.keys().all(|k| truth.contains_key(k)),
        "{ours:?} {truth:?}"
    );
    let mut short = 0;
    for (k, &n) in &truth {
        let got = ours.get(k).copied().unwrap_or(0);
        assert!(got <= n, "{k:?}: {got} counted of {n}");
        short += n - got;
    }
    let skipped = report["dropped"]["hook_runs_skipped"].as_u64().unwrap();
    assert!(
        missed <= short && short <= missed + skipped,
        "{ours:?} vs {truth:?}: short {short}, {why}"
    );
    short
}

/// `field` summed over the objects of JSON array `items`.
fn sum_of(items: &Value, field: &str) -> u64 {
    items
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x[field].as_u64().unwrap())
        .sum()
}

/// Every call counted is a thread's: each cmd row's threads add up to its calls (at most, if
/// an exited thread's entry was dropped). Invalid cmds and flags share a thread counter.
fn assert_threads_add_up(report: &Value, p: &Value) {
    let lost = report["dropped"]["detail_rows"].as_u64().unwrap() > 0;
    for c in p["cmds"].as_array().unwrap() {
        if c["kind"] == "invalid" {
            continue;
        }
        let by_threads = sum_of(&c["threads"], "calls");
        let calls = c["calls"].as_u64().unwrap();
        if lost {
            assert!(by_threads <= calls, "{c}");
        } else {
            assert_eq!(by_threads, calls, "{}: {}", c["cmd"], c["threads"]);
        }
    }
}

/// Tests share the machine; those that churn through tens of thousands of processes (and so
/// fill a system-wide tracer's maps, or lower pid_max) take it alone.
static MACHINE: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// The tests that churn processes, and calibration: alone on the machine.
fn alone() -> std::sync::RwLockWriteGuard<'static, ()> {
    let g = MACHINE.write().unwrap_or_else(|e| e.into_inner());
    root();
    g
}

/// Every other test: root, and no churn alongside. Hold the guard for the whole test.
fn require_root() -> std::sync::RwLockReadGuard<'static, ()> {
    let g = MACHINE.read().unwrap_or_else(|e| e.into_inner());
    root();
    g
}

fn root() {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "these tests load eBPF programs: run them as root (`cargo xtask test` does)"
    );
}

/// Waits for `child` to exit, killing it after TIMEOUT so a hung tracer fails the test. Its
/// pipes are drained meanwhile: a report bigger than a pipe's buffer would block it forever.
fn wait_output(mut child: Child) -> Output {
    fn drain(r: Option<impl std::io::Read + Send + 'static>) -> thread::JoinHandle<Vec<u8>> {
        thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    }
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "timed out; stderr: {}",
                String::from_utf8_lossy(&stderr.join().unwrap())
            );
        }
        thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

/// A running tracer whose stderr has said it is attached. Killed if dropped unfinished (a
/// failed assertion must not leave a system-wide tracer running for the tests after it).
struct Tracer {
    child: Option<Child>,
    stderr: Option<thread::JoinHandle<String>>,
}

impl Drop for Tracer {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Tracer {
    fn start(args: &[&str]) -> Tracer {
        Tracer::spawn(tracer().args(args))
    }

    /// [`Tracer::start`], the tracer and its threads pinned to `cpu`.
    fn start_on_cpu(args: &[&str], cpu: usize) -> Tracer {
        use std::os::unix::process::CommandExt as _;
        let mut cmd = tracer();
        cmd.args(args);
        // SAFETY: sched_setaffinity on the child itself, between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(cpu, &mut set);
                if libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Tracer::spawn(&mut cmd)
    }

    /// Starts `cmd` and waits until it says it is attached.
    fn spawn(cmd: &mut Command) -> Tracer {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = wait_for_line(child.stderr.take().unwrap(), "membarrier-trace: tracing");
        Tracer {
            child: Some(child),
            stderr: Some(stderr),
        }
    }

    fn child(&mut self) -> &mut Child {
        self.child.as_mut().unwrap()
    }

    fn signal(&self, sig: i32) {
        unsafe { libc::kill(self.child.as_ref().unwrap().id() as i32, sig) };
    }

    /// Waits for the tracer to exit; returns its output with the whole of its stderr.
    fn finish(mut self) -> Output {
        let mut out = wait_output(self.child.take().unwrap());
        out.stderr = self.stderr.take().unwrap().join().unwrap().into_bytes();
        out
    }

    /// [`Tracer::finish`], which must succeed, and its last JSON report.
    fn report(self) -> (Output, Value) {
        let out = self.finish();
        let report = report_of(&out);
        (out, report)
    }
}

/// The last JSON report of a tracer run, which must have succeeded.
fn report_of(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    last_json_with(&String::from_utf8_lossy(&out.stdout), "processes")
}

/// Reads `stderr` in the background until a line starting with `prefix` (the tracer is
/// attached), and on to the end; the handle yields everything read.
fn wait_for_line(stderr: ChildStderr, prefix: &str) -> thread::JoinHandle<String> {
    let (tx, rx) = mpsc::channel();
    let prefix = prefix.to_string();
    let handle = thread::spawn(move || {
        let mut seen = String::new();
        let mut r = BufReader::new(stderr);
        let mut line = String::new();
        while r.read_line(&mut line).unwrap_or(0) > 0 {
            seen.push_str(&line);
            if line.starts_with(&prefix) {
                let _ = tx.send(true);
            }
            line.clear();
        }
        let _ = tx.send(false);
        seen
    });
    let started = rx.recv_timeout(TIMEOUT).unwrap_or(false);
    if !started {
        panic!("tracer did not start: {}", handle.join().unwrap());
    }
    handle
}

/// A workload held before its first call until `go`.
struct Workload {
    child: Child,
    pid: u32,
}

impl Workload {
    fn start(args: &[&str]) -> Workload {
        let mut child = Command::new(WORKLOAD)
            .args(args)
            .arg("--wait-stdin")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        let pid = line.trim().strip_prefix("ready ").unwrap().parse().unwrap();
        Workload { child, pid }
    }

    fn go(&mut self) {
        self.child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    }

    /// Waits for it (reaping it, so the tracer sees it gone) and returns its accounting.
    fn finish(self) -> Value {
        let out = wait_output(self.child);
        assert!(out.status.success(), "workload failed: {:?}", out.status);
        last_json_with(&String::from_utf8_lossy(&out.stdout), "outcomes")
    }
}

/// Traces `traced` by pid (`-o json`) while `others` run alongside untraced; starts them all
/// together once the tracer is attached, waits for them, and returns the tracer's output (it
/// stops by itself when the traced processes are gone), its report, and each traced
/// workload's pid and own accounting.
fn trace_pids(traced: Vec<Workload>, others: Vec<Workload>) -> (Output, Value, Vec<(u32, Value)>) {
    let mut args = vec!["-o".to_string(), "json".to_string()];
    for w in &traced {
        args.extend(["--pid".to_string(), w.pid.to_string()]);
    }
    let tracer = Tracer::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let (mut traced, mut others) = (traced, others);
    traced
        .iter_mut()
        .chain(others.iter_mut())
        .for_each(Workload::go);
    let own: Vec<(u32, Value)> = traced.into_iter().map(|w| (w.pid, w.finish())).collect();
    others.into_iter().for_each(|w| drop(w.finish()));
    let (out, report) = tracer.report();
    (out, report, own)
}

fn last_json_with(text: &str, key: &str) -> Value {
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .rfind(|v| v.get(key).is_some())
        .unwrap_or_else(|| panic!("no JSON with {key:?} in output:\n{text}"))
}

/// The workload's own count per (cmd, flags, errno).
fn workload_counts(w: &Value) -> BTreeMap<(i64, u64, String), u64> {
    w["outcomes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            let errno = match o["errno"].as_u64().unwrap() {
                0 => String::new(),
                1 => "EPERM".to_string(),
                22 => "EINVAL".to_string(),
                e => format!("E{e}"),
            };
            (
                (
                    o["cmd"].as_i64().unwrap(),
                    o["flags"].as_u64().unwrap(),
                    errno,
                ),
                o["count"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// The tracer's count per (cmd, flags, errno) for one process.
fn tracer_counts(p: &Value) -> BTreeMap<(i64, u64, String), u64> {
    let mut m = BTreeMap::new();
    for c in p["cmds"].as_array().unwrap() {
        let key = |e: &str| {
            (
                c["cmd_value"].as_i64().unwrap(),
                c["flags"].as_u64().unwrap(),
                e.to_string(),
            )
        };
        let errors = c["errors"].as_u64().unwrap();
        let ok = c["calls"].as_u64().unwrap() - errors;
        if ok > 0 {
            m.insert(key(""), ok);
        }
        let mut errno_sum = 0;
        for (e, n) in c["errno"].as_object().unwrap() {
            m.insert(key(e), n.as_u64().unwrap());
            errno_sum += n.as_u64().unwrap();
        }
        assert_eq!(errno_sum, errors, "errno breakdown sums to errors: {c}");
    }
    m
}

fn process(report: &Value, pid: u32) -> &Value {
    report["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pid"] == pid)
        .unwrap_or_else(|| panic!("pid {pid} not in report: {report}"))
}

fn cmd_row(p: &Value, cmd: i64, flags: u64) -> &Value {
    p["cmds"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["cmd_value"] == cmd && c["flags"] == flags)
        .unwrap_or_else(|| panic!("cmd {cmd} flags {flags} not in {p}"))
}

const MIX: &[&str] = &[
    "--eperm",
    "11",
    "--query",
    "3",
    "--invalid",
    "7",
    "--bad-flags",
    "2",
    "--expedited",
    "30000",
    "--threads",
    "4",
    "--global",
    "5",
];

#[test]
fn pid_filter_counts_exactly_and_ignores_others() {
    let _machine = require_root();
    // Another process making calls at the same time must not appear.
    let other = Workload::start(&["--expedited", "5000", "--query", "5", "--global", "1"]);
    let other_pid = other.pid;
    let (out, report, own) = trace_pids(vec![Workload::start(MIX)], vec![other]);
    let (w_pid, mine) = own.into_iter().next().unwrap();
    // The tracer stops by itself once every traced process has exited.
    assert!(String::from_utf8_lossy(&out.stderr).contains("every traced process has exited"));
    let procs = report["processes"].as_array().unwrap();
    assert_eq!(procs.len(), 1, "only the traced pid: {report}");
    assert_ne!(procs[0]["pid"], other_pid);
    let p = process(&report, w_pid);
    assert_eq!(p["comm"], "membarrier-work");

    // Exactly the workload's calls, per cmd, flags and errno: no more, no fewer.
    let expected = workload_counts(&mine);
    let missed = assert_counts(&report, p, &mine);
    // And that is the mix we asked for (the workload really made these calls).
    assert_eq!(expected[&(8, 0, "EPERM".into())], 11);
    assert_eq!(expected[&(0, 0, String::new())], 3);
    assert_eq!(expected[&(3, 0, "EINVAL".into())], 7);
    assert_eq!(expected[&(8, 1, "EINVAL".into())], 2);
    assert_eq!(expected[&(16, 0, String::new())], 1);
    assert_eq!(expected[&(8, 0, String::new())], 30000);
    assert_eq!(expected[&(1, 0, String::new())], 5);
    assert_eq!(
        p["calls"].as_u64().unwrap() + missed,
        30000 + 11 + 3 + 7 + 2 + 1 + 5
    );
    if missed == 0 {
        assert_eq!(p["errors"], 11 + 7 + 2);
        // PRIVATE_EXPEDITED before registering: flagged.
        assert_eq!(p["unregistered_eperm"], 11);
        // Each thread's calls, by name: the four named threads' own counts, and the main
        // thread's EPERM calls; the main thread alone registered.
        let mut want: Vec<Value> = mine["expedite_threads"].as_array().unwrap().clone();
        want.push(json!({"tid": w_pid, "name": "membarrier-work", "calls": 11}));
        want.sort_by_key(|t| (std::cmp::Reverse(t["calls"].as_u64()), t["tid"].as_u64()));
        assert_eq!(want.len(), 5);
        assert_eq!(cmd_row(p, 8, 0)["threads"], Value::Array(want));
        assert_eq!(
            cmd_row(p, 16, 0)["threads"],
            json!([{"tid": w_pid, "name": "membarrier-work", "calls": 1}])
        );
    }
    assert_eq!(report["dropped"]["total"], 0);

    // Latency is measured inside the kernel, so it never exceeds what the workload measured
    // around the same calls: per row, the sum and the max are bounded by userspace's.
    for o in mine["outcomes"].as_array().unwrap() {
        let (cmd, flags) = (o["cmd"].as_i64().unwrap(), o["flags"].as_u64().unwrap());
        let row = cmd_row(p, cmd, flags);
        let user_sum: u64 = mine["outcomes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|x| x["cmd"] == cmd && x["flags"] == flags)
            .map(|x| x["sum_ns"].as_u64().unwrap())
            .sum();
        let lat = &row["latency_ns"];
        assert!(
            lat["sum"].as_u64().unwrap() <= user_sum,
            "{cmd}: {lat} vs user sum {user_sum}"
        );
        assert!(lat["min"].as_u64().unwrap() > 0);
        assert!(lat["min"].as_u64() <= lat["p50"].as_u64());
        assert!(lat["p50"].as_u64() <= lat["p99"].as_u64());
        assert!(lat["p99"].as_u64() <= lat["max"].as_u64());
        let hist_total: u64 = row["histogram"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["count"].as_u64().unwrap())
            .sum();
        assert_eq!(hist_total, row["calls"].as_u64().unwrap());
    }
    // GLOBAL waits a grace period (milliseconds): the kernel-side p50 matches the workload's
    // own p50 within the histogram's resolution plus the syscall entry/exit around it.
    let global = mine["outcomes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["cmd"] == 1)
        .unwrap();
    let user_p50 = global["p50_ns"].as_u64().unwrap() as f64;
    let row = cmd_row(p, 1, 0);
    assert_eq!(row["kind"], "grace_period");
    let p50 = row["latency_ns"]["p50"].as_u64().unwrap() as f64;
    assert!(
        p50 <= user_p50 * 1.04 && p50 >= user_p50 * 0.9,
        "GLOBAL p50 {p50} vs workload's {user_p50}"
    );
    assert!(row["latency_ns"]["max"].as_u64().unwrap() <= global["max_ns"].as_u64().unwrap());

    // A grace period is spent blocked: off-CPU time is reported, is at most the call's latency,
    // and is most of it; something (an RCU kthread) woke the caller.
    let (blocked, lat) = (
        row["blocked_ns"]["sum"].as_u64().unwrap(),
        row["latency_ns"]["sum"].as_u64().unwrap(),
    );
    assert!(blocked <= lat, "blocked {blocked} > latency {lat}");
    assert!(blocked * 2 > lat, "blocked {blocked} is not most of {lat}");
    assert_eq!(row["on_cpu_ns"].as_u64().unwrap(), lat - blocked);
    assert!(
        row["blocked_ns"]["max"].as_u64().unwrap() <= row["latency_ns"]["max"].as_u64().unwrap()
    );
    let wakeups: u64 = row["woken_by"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert!(
        wakeups >= 5,
        "each GLOBAL call was woken: {}",
        row["woken_by"]
    );
    // fentry on synchronize_rcu where the kernel allows it, else off-CPU time.
    let source = if fentry_any() { "fentry" } else { "sched" };
    assert_eq!(report["grace_period_source"], source);
}

#[test]
fn ipis_go_to_the_running_sibling_and_not_for_a_lone_thread() {
    let _machine = require_root();
    const N: u64 = 5000;
    let mut pair = Workload::start(&["--spinner-calls", &N.to_string()]);
    let mut lone = Workload::start(&["--expedited", &N.to_string()]);
    let (pair_pid, lone_pid) = (pair.pid, lone.pid);
    // One after the other: on a 2-CPU guest the lone caller running beside the pair took the
    // spinner's CPU (326 IPIs in 5000 calls, once).
    let (p, l) = (pair_pid.to_string(), lone_pid.to_string());
    let tracer = Tracer::start(&["-o", "json", "--pid", &p, "--pid", &l]);
    pair.go();
    pair.finish();
    lone.go();
    lone.finish();
    let (_, report) = tracer.report();

    let row = cmd_row(process(&report, pair_pid), 8, 0);
    assert_eq!(row["calls"], N);
    let ipis = &row["ipis"];
    let sent = ipis["sent"].as_u64().unwrap();
    // The sibling spins on the last CPU, the caller is pinned to CPU 0 and calls only once it
    // has seen the sibling run: each call finds it running and sends it one IPI, but for the
    // rare preemption between the look and the call (5000 of 5000 here, also beside stress-ng).
    assert!((N * 9 / 10..=N).contains(&sent), "{ipis}");
    let last_cpu = (std::thread::available_parallelism().unwrap().get() - 1).to_string();
    let per_cpu = ipis["per_cpu"].as_object().unwrap();
    assert_eq!(
        per_cpu.keys().collect::<Vec<_>>(),
        vec![&last_cpu],
        "{ipis}"
    );
    assert_eq!(per_cpu[&last_cpu], sent);
    let per_call = ipis["per_call"].as_array().unwrap();
    let calls: u64 = per_call.iter().map(|b| b["count"].as_u64().unwrap()).sum();
    let weighted: u64 = per_call
        .iter()
        .map(|b| b["count"].as_u64().unwrap() * b["ipis"].as_u64().unwrap())
        .sum();
    assert_eq!(calls, N);
    assert_eq!(weighted, sent);
    assert!(ipis["handler_ns"].as_u64().unwrap() > 0, "{ipis}");
    // Whose work the handlers interrupted: the pair's own spinner, one handler run per IPI.
    let victims = ipis["victims"].as_array().unwrap();
    assert_eq!(victims[0]["pid"], pair_pid, "{ipis}");
    assert!(
        victims[0]["interrupts"].as_u64().unwrap() >= sent * 9 / 10,
        "{ipis}"
    );
    assert!(sum_of(&ipis["victims"], "interrupts") <= sent, "{ipis}");
    assert_eq!(
        sum_of(&ipis["victims"], "handler_ns"),
        ipis["handler_ns"].as_u64().unwrap()
    );
    // What its calls cost: their on-CPU time and the handler time they caused, summed.
    let p = process(&report, pair_pid);
    let sum = |f: &dyn Fn(&Value) -> u64| p["cmds"].as_array().unwrap().iter().map(f).sum::<u64>();
    assert_eq!(
        p["cpu_ns"]["ipi_handler"].as_u64().unwrap(),
        sum(&|c| c["ipis"]["handler_ns"].as_u64().unwrap())
    );
    assert_eq!(
        p["cpu_ns"]["caller"].as_u64().unwrap(),
        sum(&|c| c["on_cpu_ns"].as_u64().unwrap())
    );

    // One thread alone in its mm: the kernel skips the IPIs (mm_users == 1). Not always zero
    // here: anything that briefly takes a reference on the mm (a /proc/PID/stat reader such as
    // ps or the VM's agent) makes the kernel take the IPI path for calls in that window, and
    // one that migrates mid-call then IPIs the CPU it left. Seen: 0 to 2 in 5000.
    let lone_row = cmd_row(process(&report, lone_pid), 8, 0);
    assert_eq!(lone_row["calls"], N);
    let lone_sent = lone_row["ipis"]["sent"].as_u64().unwrap();
    assert!(lone_sent <= N / 100, "{}", lone_row["ipis"]);
    assert!(lone_sent * 50 < sent, "lone {lone_sent} vs pair {sent}");
}

#[test]
fn concurrent_expedited_callers_wait_for_the_mutex() {
    let _machine = require_root();
    // Whether two calls meet at the mutex is up to the scheduler: a PREEMPT_RT guest under
    // TCG once ran 80,000 calls without one wait. Up to three rounds, each checked in full.
    let mut waits = Vec::new();
    let lock_tracepoints = membarrier_trace::kernel::Features::of_this_kernel().lock_contention;
    for _round in 0..3 {
        let args = ["--expedited", "20000", "--threads", "2"];
        let (a, b) = (Workload::start(&args), Workload::start(&args));
        let pids = [a.pid, b.pid];
        let (out, report, _) = trace_pids(vec![a, b], vec![]);
        if !lock_tracepoints {
            // Before 5.19 (the 5.10 guest): no mutex figures, said once, none made up.
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(err.matches("no mutex wait figures: ").count(), 1, "{err}");
            for &pid in &pids {
                let row = cmd_row(process(&report, pid), 8, 0);
                assert_eq!(
                    row["mutex_wait_ns"]["sum"].as_u64().unwrap_or(0),
                    0,
                    "{row}"
                );
            }
            return;
        }
        for &pid in &pids {
            let row = cmd_row(process(&report, pid), 8, 0);
            let m = &row["mutex_wait_ns"];
            assert!(m["max"].as_u64() <= m["sum"].as_u64());
            assert!(m["sum"].as_u64().unwrap() <= row["latency_ns"]["sum"].as_u64().unwrap());
            waits.push(m["sum"].as_u64().unwrap());
        }
        if waits.iter().any(|&w| w > 0) {
            return;
        }
    }
    panic!("no mutex wait in three rounds: {waits:?}");
}

#[test]
fn command_mode_sees_every_call_and_passes_exit_status() {
    let _machine = require_root();
    let out = run(tracer()
        .args([
            "-o",
            "json",
            "--",
            WORKLOAD,
            "--query",
            "2",
            "--expedited",
            "500",
        ])
        .args(["--threads", "2", "--global", "1", "--exit-code", "3"]));
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mine = last_json_with(&stdout, "outcomes");
    let report = last_json_with(&stdout, "processes");
    let p = process(&report, mine["pid"].as_u64().unwrap() as u32);
    let missed = assert_counts(&report, p, &mine);
    // Named after exec, not after the tracer that forked it.
    assert_eq!(p["comm"], "membarrier-work");
    assert_eq!(p["calls"].as_u64().unwrap() + missed, 2 + 1 + 500 + 1);
    assert_eq!(p["unregistered_eperm"], 0);
}

#[test]
fn liburcu_memb_matches_strace() {
    let _machine = require_root();
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let bin = build_urcu_program("urcu_writer", "urcu_memb_writer", &["-lurcu-memb"]);
    let strace_log = dir.join(format!("urcu-strace-{}.log", std::process::id()));

    // strace runs the program under the tracer: both watch the very same calls, from the
    // library's constructor on.
    let out = run(Command::new(TRACER)
        .args([
            "-o",
            "json",
            "--",
            "strace",
            "-f",
            "-qq",
            "-e",
            "trace=membarrier",
            "-o",
        ])
        .arg(&strace_log)
        .arg(&bin)
        .arg("300"));
    let report = report_of(&out);

    let log = std::fs::read_to_string(&strace_log).unwrap();
    let mut strace: BTreeMap<String, u64> = BTreeMap::new();
    let mut strace_errors = 0;
    for line in log.lines() {
        if let Some(rest) = line.split("membarrier(MEMBARRIER_CMD_").nth(1) {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || *c == '_')
                .collect();
            *strace.entry(name).or_default() += 1;
        }
        if line.contains(") = -1 ") {
            strace_errors += 1;
        }
    }
    let mut ours: BTreeMap<String, u64> = BTreeMap::new();
    let mut our_errors = 0;
    for p in report["processes"].as_array().unwrap() {
        our_errors += p["errors"].as_u64().unwrap();
        for c in p["cmds"].as_array().unwrap() {
            *ours
                .entry(c["cmd"].as_str().unwrap().to_string())
                .or_default() += c["calls"].as_u64().unwrap();
        }
    }
    assert_eq!(ours, strace, "tracer vs strace; strace log:\n{log}");
    assert_eq!(our_errors, strace_errors);
    // urcu-memb: QUERY and REGISTER in the constructor, PRIVATE_EXPEDITED per grace period.
    assert_eq!(ours["QUERY"], 1);
    assert_eq!(ours["REGISTER_PRIVATE_EXPEDITED"], 1);
    assert!(ours["PRIVATE_EXPEDITED"] >= 300, "{ours:?}");
    assert_eq!(report["missed_calls"], 0);
    let _ = std::fs::remove_file(strace_log);
}

#[test]
fn sigint_prints_the_final_summary() {
    let _machine = require_root();
    let tracer = Tracer::start(&["-o", "text"]);
    let mut w = Workload::start(&["--expedited", "1000"]);
    w.go();
    let pid = w.pid;
    w.finish();
    tracer.signal(libc::SIGINT);
    let out = tracer.finish();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("membarrier-trace: "), "{text}");
    // Tracing every process: the workload's row is there, exact (1000 calls + registration).
    assert!(
        text.contains(&format!("PID {pid} (membarrier-work, exited): 1001 calls")),
        "{text}"
    );
}

#[test]
fn sigterm_in_command_mode_stops_the_command_too() {
    let _machine = require_root();
    let mut child = tracer()
        .args(["-o", "json", "--", "sleep", "30"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _stderr = wait_for_line(child.stderr.take().unwrap(), "membarrier-trace: tracing");
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let start = Instant::now();
    let out = wait_output(child);
    assert!(start.elapsed() < Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(128 + libc::SIGTERM));
    let report = last_json_with(&String::from_utf8_lossy(&out.stdout), "processes");
    assert_eq!(report["processes"].as_array().unwrap().len(), 0);
}

#[test]
fn interval_prints_one_json_document_per_line() {
    let _machine = require_root();
    let start = Instant::now();
    let out = run(tracer().args(["-o", "json", "-i", "0.25", "-d", "1.1"]));
    assert!(out.status.success());
    assert!(start.elapsed() < Duration::from_secs(10));
    let docs: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is one JSON document"))
        .collect();
    // Four interval reports and the final one.
    assert_eq!(docs.len(), 5, "{docs:?}");
    let durations: Vec<u64> = docs
        .iter()
        .map(|d| d["duration_ns"].as_u64().unwrap())
        .collect();
    assert!(durations.windows(2).all(|w| w[0] < w[1]), "{durations:?}");
    assert!(durations[4] >= 1_100_000_000);
}

#[test]
fn a_call_under_way_at_attach_is_counted_missed() {
    let _machine = require_root();
    // GLOBAL calls back to back: the thread is almost always inside one, so the tracer attaches
    // mid-call and stops mid-call. With fentry a call under way at attach is not seen at all
    // (its return does not pass the new trampoline), so the one under way at the stop counts:
    // two callers make "neither inside at that instant" (about 6% each in a TCG guest) rare.
    // More calls than any attach takes (seconds on a PREEMPT_RT guest), stopped at the end.
    let spawn = || {
        Command::new(WORKLOAD)
            .args(["--global", "1000000"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap()
    };
    let (mut a, mut b) = (spawn(), spawn());
    thread::sleep(Duration::from_millis(300));
    let (pa, pb) = (a.id().to_string(), b.id().to_string());
    let tracer = Tracer::start(&["--pid", &pa, "--pid", &pb, "-o", "json", "-d", "0.5"]);
    let out = tracer.finish();
    for w in [&mut a, &mut b] {
        let _ = w.kill();
        let _ = w.wait();
    }
    let report = report_of(&out);
    assert!(report["missed_calls"].as_u64().unwrap() >= 1, "{report}");
}

/// Runs `cmd` to the end with its output captured.
fn run(cmd: &mut Command) -> Output {
    wait_output(
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    )
}

/// Runs the tracer with `args` and expects the one-line error `needle`, exit status `code`: 2
/// for a usage error, 1 for a runtime failure.
fn expect_error(code: i32, cmd: &mut Command, needle: &str) {
    let out = run(cmd);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains(needle), "{stderr}");
    assert!(!stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"));
    assert!(out.stdout.is_empty());
}

#[test]
fn bad_input_is_one_line_and_exit_2_for_usage_1_at_runtime() {
    let _machine = require_root();
    let pid_max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let missing = (2..pid_max)
        .rev()
        .find(|p| !PathBuf::from(format!("/proc/{p}")).exists())
        .unwrap();
    expect_error(
        1,
        Command::new(TRACER).args(["--pid", &missing.to_string()]),
        &format!("no process with pid {missing}"),
    );
    expect_error(
        2,
        Command::new(TRACER).args(["-d", "0"]),
        "not a positive number",
    );
    expect_error(
        2,
        Command::new(TRACER).args(["-o", "yaml"]),
        "invalid value 'yaml'",
    );
    expect_error(
        2,
        Command::new(TRACER).args(["calibrate", "--calls", "0"]),
        "invalid value '0' for '--calls",
    );
    expect_error(
        2,
        Command::new(TRACER).args(["-o", "none"]),
        "-o none shows nothing without --listen",
    );
    expect_error(
        2,
        Command::new(TRACER).args(["--by", "comm"]),
        "--by and --keep-exited shape the metrics of --listen",
    );
    expect_error(
        2,
        Command::new(TRACER).args(["--listen", "9479"]),
        "`9479` is not HOST:PORT or :PORT",
    );
    expect_error(
        2,
        Command::new(TRACER).args(["-o", "json", "calibrate"]),
        "unexpected argument 'calibrate'",
    );
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();
    expect_error(
        1,
        Command::new(TRACER).args(["--listen", &taken]),
        &format!("listening on {taken}: Address in use (os error 98)"),
    );
    expect_error(
        1,
        Command::new(TRACER).args(["--", "/nonexistent/program"]),
        "cannot run `/nonexistent/program`",
    );
    // A thread id instead of a process id.
    let w = Command::new(WORKLOAD)
        .args(["--global", "40", "--threads", "2", "--expedited", "200000"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let tid = (0..200)
        .find_map(|_| {
            thread::sleep(Duration::from_millis(10));
            std::fs::read_dir(format!("/proc/{}/task", w.id()))
                .ok()?
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                .find(|&t| t != w.id())
        })
        .expect("workload thread");
    expect_error(
        1,
        Command::new(TRACER).args(["--pid", &tid.to_string()]),
        &format!("is a thread of process {}", w.id()),
    );
    let _ = wait_output(w);
    // Not root: drop to nobody.
    expect_error(
        1,
        Command::new("setpriv").args(["--reuid=65534", "--regid=65534", "--clear-groups", TRACER]),
        "must run as root",
    );
}

/// A shell in a tmux session of its own (its own server socket), killed when dropped.
struct Tmux {
    sock: String,
}

impl Tmux {
    /// A `width` x `height` terminal with bash at its `mbt$ ` prompt.
    fn shell(width: u16, height: u16) -> Tmux {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let t = Tmux {
            sock: format!("mbtrace-test-{}-{n}", std::process::id()),
        };
        let (w, h) = (width.to_string(), height.to_string());
        t.run(&[
            "new-session",
            "-d",
            "-x",
            &w,
            "-y",
            &h,
            "bash --norc --noprofile",
        ]);
        // Keys typed before the shell is ready can be lost: wait for its first prompt.
        t.wait_for("no shell prompt", &|s| {
            s.lines()
                .any(|l| l.trim_end().ends_with('#') || l.trim_end().ends_with('$'))
        });
        t.keys("PS1='mbt$ '; clear");
        t.wait_for("no prompt", &|s| s.lines().any(|l| l.trim_end() == "mbt$"));
        t
    }

    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .arg("-L")
            .arg(&self.sock)
            .args(args)
            .output()
            .expect("tmux");
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Types `line` and Enter.
    fn keys(&self, line: &str) {
        self.run(&["send-keys", line, "Enter"]);
    }

    fn screen(&self) -> String {
        self.run(&["capture-pane", "-p"])
    }

    fn wait_for(&self, what: &str, ok: &dyn Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let screen = self.screen();
            if ok(&screen) {
                return screen;
            }
            assert!(Instant::now() < deadline, "{what}; screen:\n{screen}");
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until the shell is back: its prompt the last line, nothing running.
    fn wait_for_prompt(&self) -> String {
        let screen = self.wait_for("the shell prompt did not come back", &|s| {
            s.lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .is_some_and(|l| l.trim_end() == "mbt$")
        });
        assert_eq!(
            self.run(&["display-message", "-p", "#{pane_current_command}"])
                .trim(),
            "bash"
        );
        screen
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.sock, "kill-server"])
            .status();
    }
}

/// The dashboard in a real terminal: tmux runs a shell, the shell runs the tracer.
#[test]
fn dashboard_in_tmux_shows_the_process_and_quits_on_q() {
    let _machine = require_root();
    // GLOBAL calls (a grace period each, mostly asleep) for longer than the test; killed at the
    // end.
    let mut w = Workload::start(&["--global", "100000"]);
    w.go();
    let t = Tmux::shell(120, 40);
    t.keys(&format!("{TRACER} --pid {}", w.pid));
    let pid = w.pid.to_string();
    let screen = t.wait_for("no row with the workload and a rate", &|s| {
        s.lines().any(|l| {
            let f: Vec<&str> = l
                .trim_matches(|c| c == '│' || c == ' ')
                .split_whitespace()
                .collect();
            f.len() > 3 && f[0] == pid && f[2].parse::<f64>().is_ok_and(|r| r > 0.0)
        })
    });
    assert!(screen.contains("membarrier-trace"), "{screen}");
    assert!(screen.contains("GLOBAL"), "{screen}");
    t.keys("q");
    // Back at the shell, with the summary printed above the prompt.
    let screen = t.wait_for_prompt();
    assert!(
        screen.contains(&format!("PID {pid} (membarrier-work)")),
        "{screen}"
    );
    let _ = w.child.kill();
    let _ = w.child.wait();
}

/// With `-- COMMAND`, the dashboard outlives the command: its final figures stay on screen,
/// with its exit status, until q; then the text summary is printed and the command's status
/// passed on.
#[test]
fn dashboard_stays_open_after_the_command_exits() {
    let _machine = require_root();
    let t = Tmux::shell(100, 30);
    t.keys(&format!(
        "{TRACER} -- {WORKLOAD} --query 2 --expedited 300 --exit-code 3; echo rc=$?"
    ));
    let ended = |s: &str| s.contains("exited with status 3; tracing stopped, q leaves");
    let screen = t.wait_for("the dashboard did not say the command exited", &ended);
    let row = |s: &str| {
        s.lines()
            .find(|l| l.starts_with("│") && l.contains("membarrier-work"))
            .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
    };
    // PID COMM CALLS/S CALLS: every call, counted exactly.
    let cells = row(&screen).unwrap_or_else(|| panic!("no row: {screen}"));
    assert_eq!(cells[3], "303", "{screen}");
    // Still there a while later: not closed, not updated.
    thread::sleep(Duration::from_millis(1500));
    let later = t.screen();
    assert!(ended(&later), "{later}");
    assert_eq!(row(&later), Some(cells));
    t.keys("q");
    let screen = t.wait_for_prompt();
    assert!(screen.contains("rc=3"), "{screen}");
    assert!(screen.contains("303 calls"), "{screen}");
    assert!(
        screen.contains("(membarrier-work, exited): 303 calls"),
        "{screen}"
    );
}

/// Under the dashboard a command's output goes to a log file, created by root in the temporary
/// directory, which other users can write to. Another user who plants a symlink or a file of
/// their own at the name the log once had (`membarrier-trace-PID.log`, the pid known in
/// advance to a wrapper that execs the tracer) must get nothing: the file the link points to
/// stays whole, theirs stays empty, and the log is a new file of root's, mode 0600, named on
/// exit. The kernel's protections against such plants are turned off, as in many containers.
#[test]
fn the_commands_log_cannot_be_planted_by_another_user() {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let _machine = require_root();
    let _links = Sysctl::set("fs/protected_symlinks", 0);
    let _regular = Sysctl::set("fs/protected_regular", 0);
    let dir = tempfile::tempdir().unwrap();
    // A shared directory like /tmp: anyone may create files, sticky.
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let victim = dir.path().join("precious");
    std::fs::write(&victim, "root's data\n").unwrap();
    let plant = dir.path().join("plant.sh");
    std::fs::write(
        &plant,
        format!(
            r#"name="$TMPDIR/membarrier-trace-$$.log"
if [ "$1" = link ]; then ln -s {victim} "$name"; else : > "$name"; chown 65534 "$name"; chmod 666 "$name"; fi
exec {TRACER} -- {WORKLOAD} --query 2
"#,
            victim = victim.display()
        ),
    )
    .unwrap();
    let t = Tmux::shell(250, 30);
    for kind in ["link", "file"] {
        t.keys("clear");
        t.keys(&format!(
            "TMPDIR={} sh {} {kind}; echo rc=$?",
            shared.display(),
            plant.display()
        ));
        t.wait_for("the dashboard did not say the command exited", &|s| {
            s.contains("exited with status 0; tracing stopped, q leaves")
        });
        t.keys("q");
        let screen = t.wait_for_prompt();
        assert!(screen.contains("rc=0"), "{kind}: {screen}");
        let log = screen
            .lines()
            .find_map(|l| l.split("the command's output is in ").nth(1))
            .unwrap_or_else(|| panic!("{kind}: no log named: {screen}"))
            .trim()
            .to_string();
        let planted: Vec<PathBuf> = std::fs::read_dir(&shared)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_str() != Some(log.as_str()))
            .collect();
        assert_eq!(planted.len(), 1, "{kind}: {planted:?} beside {log}");
        let meta = std::fs::symlink_metadata(&log).unwrap();
        assert!(meta.is_file(), "{kind}: {log} is not a plain file");
        assert_eq!(
            (meta.uid(), meta.mode() & 0o777),
            (0, 0o600),
            "{kind}: {log}"
        );
        let output = std::fs::read_to_string(&log).unwrap();
        assert!(
            output.contains("\"outcomes\""),
            "{kind}: the log has {output:?}"
        );
        // The plant got nothing, and what it points to is whole.
        if kind == "file" {
            assert_eq!(std::fs::read(&planted[0]).unwrap(), b"", "{kind}");
        }
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "root's data\n");
        std::fs::remove_file(&log).unwrap();
        std::fs::remove_file(&planted[0]).unwrap();
    }
}

/// Attaching to a process already making calls as fast as it can: only the call under way at
/// the instant tracing starts, and the one at its end, are missed. (The enter and exit programs
/// are attached one after the other; unless armed together, every call returning in between
/// counted as missed: hundreds at this rate.)
#[test]
fn attaching_mid_flight_misses_only_the_calls_under_way() {
    let _machine = require_root();
    let mut w = Command::new(WORKLOAD)
        .args(["--loop-expedited", "2000000000"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    thread::sleep(Duration::from_millis(200));
    let out = run(tracer().args(["--pid", &w.id().to_string(), "-o", "json", "-d", "1"]));
    let _ = w.kill();
    let _ = w.wait();
    let report = report_of(&out);
    let calls = report["calls"].as_u64().unwrap();
    assert!(calls > 10_000, "the workload was busy: {calls}");
    assert!(report["missed_calls"].as_u64().unwrap() <= 2, "{report}");
}

/// `--attach auto` takes fentry where the kernel allows it and falls back to the syscall
/// tracepoints, saying why, where it does not (this project's VMs answer EPERM); counts are
/// exact either way. `--attach fentry` where it is refused is a one-line error.
#[test]
fn attach_auto_falls_back_and_fentry_is_clear() {
    let _machine = require_root();
    let out = run(Command::new(TRACER).args([
        "--attach",
        "auto",
        "-o",
        "json",
        "--",
        WORKLOAD,
        "--query",
        "3",
        "--expedited",
        "50",
    ]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = last_json_with(&stdout, "processes");
    let mine = last_json_with(&stdout, "outcomes");
    let p = process(&report, mine["pid"].as_u64().unwrap() as u32);
    let missed = assert_counts(&report, p, &mine);
    assert_eq!(p["calls"].as_u64().unwrap() + missed, 3 + 1 + 50);
    let fentry = Command::new(TRACER)
        .args(["--attach", "fentry", "-d", "0.2", "-o", "json"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&fentry.stderr);
    if fentry_allowed() && preempt_rt() {
        // auto took the tracepoints and said why; fentry alone is still allowed.
        assert_eq!(report["attach"], "tracepoint", "{stderr}");
        assert!(stderr.contains("PREEMPT_RT kernel"), "{stderr}");
        assert!(fentry.status.success(), "{err}");
    } else if fentry_allowed() {
        // auto took fentry, and fentry alone runs to its end (snapshots read the hook attached).
        assert_eq!(report["attach"], "fentry", "{stderr}");
        assert!(!stderr.contains("PREEMPT_RT"), "{stderr}");
        assert!(!stderr.contains("refused"), "{stderr}");
        assert!(fentry.status.success(), "{err}");
        let r = last_json_with(&String::from_utf8_lossy(&fentry.stdout), "processes");
        assert_eq!(r["attach"], "fentry");
    } else {
        // Refused: auto said so and why, and fentry alone fails clearly.
        assert_eq!(report["attach"], "tracepoint");
        assert!(
            stderr.contains("fentry on __x64_sys_membarrier refused"),
            "{stderr}"
        );
        assert!(
            stderr.contains(": using syscalls:sys_enter/exit_membarrier"),
            "{stderr}"
        );
        assert!(
            stderr.contains("(syscalls:sys_enter/exit_membarrier)"),
            "{stderr}"
        );
        assert_eq!(fentry.status.code(), Some(1), "{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(
            err.contains("--attach fentry: fentry on __x64_sys_membarrier refused"),
            "{err}"
        );
        assert!(err.contains("use --attach auto"), "{err}");
        // With a command: the same one line, and the command does not run untraced.
        let ran = std::env::temp_dir().join(format!("mt-ran-{}", std::process::id()));
        let _ = std::fs::remove_file(&ran);
        let with_cmd = Command::new(TRACER)
            .args(["--attach", "fentry", "-o", "json", "--", "touch"])
            .arg(&ran)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&with_cmd.stderr);
        assert_eq!(with_cmd.status.code(), Some(1), "{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(
            err.contains("fentry on __x64_sys_membarrier refused"),
            "{err}"
        );
        assert!(!ran.exists(), "the command ran: {err}");
    }
    // And tracepoint is always available.
    let tp = run(Command::new(TRACER).args([
        "--attach",
        "tracepoint",
        "-o",
        "json",
        "--",
        WORKLOAD,
        "--query",
        "2",
    ]));
    let report = last_json_with(&String::from_utf8_lossy(&tp.stdout), "processes");
    assert_eq!(report["attach"], "tracepoint");
    assert_eq!(report["calls"], 2);
}

#[test]
fn raw_tracepoints_count_exactly_and_are_never_chosen_by_auto() {
    let _machine = require_root();
    let out = run(Command::new(TRACER)
        .args(["--attach", "raw", "-o", "json", "--"])
        .args([
            WORKLOAD,
            "--eperm",
            "2",
            "--query",
            "3",
            "--invalid",
            "1",
            "--bad-flags",
            "1",
            "--expedited",
            "2000",
            "--threads",
            "2",
            "--global",
            "2",
            // Other syscalls by the thousand, which the raw programs see and must pass over.
            "--loop-getppid",
            "100000",
        ]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = report_of(&out);
    assert_eq!(report["attach"], "raw");
    let mine = last_json_with(&stdout, "outcomes");
    let p = process(&report, mine["pid"].as_u64().unwrap() as u32);
    assert_eq!(
        tracer_counts(p),
        workload_counts(&mine),
        "{}",
        report["dropped"]
    );
    assert_eq!(report["missed_calls"], 0);
    assert_eq!(report["dropped"]["total"], 0);
    let auto = run(tracer().args(["--attach", "auto", "-d", "0.1", "-o", "json"]));
    assert_ne!(report_of(&auto)["attach"], "raw");
}

/// Sets a sysctl (a path under /proc/sys) or another kernel setting file for the life of the
/// guard: e.g. kernel/pid_max, so pids wrap within a test.
struct Sysctl(String, String);

impl Sysctl {
    fn set(name: &str, v: u32) -> Sysctl {
        Sysctl::file(&format!("/proc/sys/{name}"), &v.to_string())
    }

    fn file(path: &str, v: &str) -> Sysctl {
        let old = std::fs::read_to_string(path).unwrap();
        std::fs::write(path, v).unwrap_or_else(|e| panic!("writing {v} to {path}: {e}"));
        Sysctl(path.to_string(), old)
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.0, self.1.trim());
    }
}

/// Calls per (cmd) summed over every process entry of the report named `comm`, and the number
/// of processes those entries stand for.
fn calls_named(report: &Value, comm: &str) -> (BTreeMap<i64, u64>, u64) {
    let mut calls = BTreeMap::new();
    let mut procs = 0;
    for p in report["processes"].as_array().unwrap() {
        if p["comm"] != comm {
            continue;
        }
        procs += p["processes"].as_u64().unwrap();
        for c in p["cmds"].as_array().unwrap() {
            *calls.entry(c["cmd_value"].as_i64().unwrap()).or_default() +=
                c["calls"].as_u64().unwrap();
        }
    }
    (calls, procs)
}

#[test]
fn command_mode_follows_every_child_through_pid_wraps_and_no_stranger() {
    let _machine = alone();
    // 4000 pids for 100,000 + 30,000 processes: pids wrap about 30 times, so the command's dead
    // children's pids go to strangers (and the other way round) again and again.
    let _pid_max = Sysctl::set("kernel/pid_max", 4000);
    let stranger = Command::new(WORKLOAD)
        .args(["--name", "stranger", "--fork-children", "30000"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = run(tracer().args(["-o", "json", "-i", "1", "--"]).args([
        WORKLOAD,
        "--name",
        "followed",
        "--fork-children",
        "100000",
        "--thread-churn",
        "5000",
    ]));
    let stranger = wait_output(stranger);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mine = last_json_with(&stdout, "outcomes");
    assert_eq!(mine["children"], 100_000, "the workload's own count");
    let theirs = last_json_with(&String::from_utf8_lossy(&stranger.stdout), "outcomes");
    assert_eq!(theirs["children"], 30_000, "the stranger ran alongside");
    let report = last_json_with(&stdout, "processes");
    // Every call of the command's processes, exactly: the children's (one QUERY each) and the
    // threads' (one QUERY each, in the parent)...
    // On this 2-CPU machine, with the stranger forking beside it, the tracer's retire pass can
    // fall behind and the stats map fill: those calls are counted, once, as calls without a
    // row (a few hundred of 105,000 in some runs; the retire pass keeping up is issue 9's).
    let (calls, procs) = calls_named(&report, "followed");
    let no_row = report["dropped"]["calls_without_row"].as_u64().unwrap();
    assert_eq!(calls[&0] + no_row, 105_000, "{}", report["dropped"]);
    assert_eq!(calls.len(), 1);
    // ...every process counted once (the parent and its children)...
    assert!(procs <= 100_001 && procs + no_row >= 100_001, "{procs}");
    if no_row == 0 {
        assert_eq!(procs, 100_001);
    }
    // ...and nobody else's; each call is a thread's (the exited threads past the first 32 of
    // a process, and those of processes summed per name, summed).
    for p in report["processes"].as_array().unwrap() {
        assert_eq!(p["comm"], "followed", "a stranger traced: {p}");
        assert_threads_add_up(&report, p);
    }
    assert_eq!(report["dropped"]["total"], no_row, "{}", report["dropped"]);
    assert_eq!(report["missed_calls"], 0);
    assert!(report["exited_processes"].as_u64().unwrap() + no_row >= 100_000);
}

/// A burst of short-lived processes, each making one call: 40,000 at more than 20,000 a second
/// (the workload counts its own rate), then a new process making 500 calls. The stats map
/// holds about 2,900 rows here and the retire pass frees about one row every 17 us while the
/// burst starves it of CPU: before the kernel moved exited processes' rows out at their exit,
/// thousands of calls had no row (and once a whole new process's). Then 25,000 more with the
/// tracer stopped: the kernel sums what its ring has no room for by name, threads with them.
/// Every call is counted, under its process's name, and the new process whole.
#[test]
fn a_burst_of_short_lived_processes_loses_no_call() {
    let _machine = alone();
    // At nice 19, the tracer as starved of CPU as a busy box makes it: with its rings emptied by
    // the retire pass, CI lost 11,900 calls and 1,641 threads' counts once at nice 0, and here
    // at nice 19 520 to 7,769 threads' counts were lost in each of 3 runs.
    let tracer = {
        use std::os::unix::process::CommandExt as _;
        let mut cmd = tracer();
        cmd.args(["-o", "json"]);
        // SAFETY: setpriority on the child itself, between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setpriority(libc::PRIO_PROCESS, 0, 19) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Tracer::spawn(&mut cmd)
    };
    let w = run(Command::new(WORKLOAD).args([
        "--name",
        "mt-burst",
        "--fork-children",
        "40000",
        "--fork-parallel",
        "4",
    ]));
    assert!(w.status.success());
    let own = last_json_with(&String::from_utf8_lossy(&w.stdout), "children");
    assert_eq!(own["children"], 40_000);
    let rate = 40_000.0 / own["children_secs"].as_f64().unwrap();
    // Then a burst with the tracer stopped, starved as no box starves it: the ring fills at
    // about 5,000 processes; the kernel sums the rest by name (CI once lost 23,908 calls at
    // 56,000 processes a second, with the rows of 2,869 processes left in the stats map).
    tracer.signal(libc::SIGSTOP);
    let stopped = run(Command::new(WORKLOAD).args([
        "--name",
        "mt-stopped",
        "--fork-children",
        "25000",
        "--fork-parallel",
        "4",
    ]));
    tracer.signal(libc::SIGCONT);
    assert!(stopped.status.success());
    let after = run(Command::new(WORKLOAD).args(["--name", "mt-after", "--query", "500"]));
    assert!(after.status.success());
    let after_pid = last_json_with(&String::from_utf8_lossy(&after.stdout), "pid")["pid"].clone();
    tracer.signal(libc::SIGINT);
    let (_, report) = tracer.report();
    // How the rows left the kernel says why, if a call was lost.
    let how = format!(
        "{rate:.0} processes a second; dropped {}; exited rows {}",
        report["dropped"], report["exited_rows"]
    );
    assert_eq!(report["dropped"]["total"], 0, "{how}");
    let (calls, procs) = calls_named(&report, "mt-burst");
    assert_eq!(calls, [(0, 40_000)].into(), "{how}");
    assert_eq!(procs, 40_000);
    assert_eq!(
        calls_named(&report, "mt-stopped"),
        ([(0, 25_000)].into(), 25_000),
        "{how}"
    );
    // ...with its thread: every call is a thread's (CI once lost 14,953 threads' counts, held
    // in a full THREADS map for processes the kernel had summed, whose rows would never have
    // been retired).
    for p in report["processes"].as_array().unwrap() {
        if p["comm"] == "mt-burst" || p["comm"] == "mt-stopped" {
            assert_threads_add_up(&report, p);
        }
    }
    // The kernel summed most of the stopped burst; the rest of the processes that found the
    // ring full (one whose thread's row got in before the ring filled) stayed whole.
    // More than THREADS holds (16,384): summed, they take none of it.
    let summed = report["exited_rows"]["summed_by_name"].as_u64().unwrap();
    assert!(summed > 16_384, "{how}");
    assert!(
        report["exited_rows"]["ring_full"].as_u64().unwrap() >= summed,
        "{how}"
    );
    assert_eq!(calls_named(&report, "mt-after"), ([(0, 500)].into(), 1));
    // The busiest exited process keeps its own entry, though 40,000 exited before it: the
    // one-call processes are the ones summed by name (it was once the first 1,024 kept).
    let p = process(&report, after_pid.as_u64().unwrap() as u32);
    assert_eq!(
        (&p["comm"], &p["exited"]),
        (&json!("mt-after"), &json!(true))
    );
    assert!(report["exited_summed"].as_u64().unwrap() >= 65_000 - 1024);
    // Last: a slower burst would not test the claim (here: about 30,000 a second traced).
    assert!(rate >= 20_000.0, "only {rate:.0} processes a second");
    eprintln!("burst: {how}, every call counted");
}

#[test]
fn system_wide_sees_new_processes_after_thousands_have_exited() {
    let _machine = alone();
    let tracer = Tracer::start(&["-o", "json", "--no-breakdown"]);
    // More processes than the stats map has rows: only freeing exited ones lets the last in.
    let w = run(Command::new(WORKLOAD).args(["--name", "sysw-churn", "--fork-children", "12000"]));
    assert!(w.status.success());
    tracer.signal(libc::SIGINT);
    let (_, report) = tracer.report();
    let (calls, procs) = calls_named(&report, "sysw-churn");
    assert_eq!(calls, [(0, 12_000)].into(), "{}", report["dropped"]);
    assert_eq!(procs, 12_000);
    assert_eq!(report["dropped"]["calls_without_row"], 0);
}

#[test]
fn a_full_inflight_map_counts_each_call_it_loses_once() {
    let _machine = alone();
    // Each thread maps a stack and a signal stack, with guard pages: more than the default 65,530.
    let _maps = Sysctl::set("vm/max_map_count", 262_144);
    let mut w = Workload::start(&["--name", "wide", "--live-threads", "17000"]);
    let tracer = {
        // INFLIGHT is sized from kernel.threads-max at load, 16384 slots at the least: load with
        // that, then give the machine its threads back for the workload's 17,000.
        let _threads = Sysctl::set("kernel/threads-max", 16384);
        Tracer::start(&["-o", "json", "--pid", &w.pid.to_string()])
    };
    w.go();
    let pid = w.pid;
    let mine = w.finish();
    assert_eq!(mine["threads"], 17_000);
    let (_, report) = tracer.report();
    let query = cmd_row(process(&report, pid), 0, 0)["calls"]
        .as_u64()
        .unwrap();
    let dropped = &report["dropped"];
    // Each thread holds its slot until it exits, and none exits before all have called: the
    // first 16,384 calls are counted, the rest each once as a call without a slot.
    assert_eq!(query, 16_384, "{dropped}");
    assert_eq!(dropped["calls_without_inflight_slot"], 17_000 - 16_384);
    assert_eq!(dropped["total"], 17_000 - 16_384);
    assert_eq!(report["missed_calls"], 0, "not also counted as missed");
}

#[test]
fn a_rename_just_before_exit_names_the_process() {
    let _machine = require_root();
    // No report while it runs (no -i): only the kernel saw the new name.
    let out = run(tracer().args(["-o", "json", "--"]).args([
        WORKLOAD,
        "--name",
        "before-rename",
        "--query",
        "3",
        "--rename",
        "after-rename",
    ]));
    let report = report_of(&out);
    let (calls, procs) = calls_named(&report, "after-rename");
    assert_eq!(
        (calls, procs),
        ([(0, 4)].into(), 1),
        "{}",
        report["processes"]
    );
}

#[test]
fn hostile_process_names_are_escaped_in_text() {
    let _machine = require_root();
    let name = "\x1b[2J\x1b[31mEV\nIL";
    let out = run(tracer().args(["-o", "text", "--", WORKLOAD, "--query", "1", "--name", name]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains('\x1b'), "raw ESC in: {text:?}");
    assert!(
        text.contains("(\\x1b[2J\\x1b[31mEV\\x0aIL, exited)"),
        "{text}"
    );
    // JSON keeps the name as it is, escaped the JSON way.
    let out = run(tracer().args(["-o", "json", "--", WORKLOAD, "--query", "1", "--name", name]));
    let report = last_json_with(&String::from_utf8_lossy(&out.stdout), "processes");
    assert_eq!(report["processes"][0]["comm"], name);
}

#[test]
fn closed_stdout_stops_the_tracer() {
    let _machine = require_root();
    let mut tracer = Tracer::start(&["-o", "json", "-i", "0.1"]);
    let mut line = String::new();
    BufReader::new(tracer.child().stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with('{'), "{line}");
    // The reader is gone (like `| head -1`): the next write fails and the tracer detaches.
    let t = Instant::now();
    let out = tracer.finish();
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(out.status.code(), Some(141));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("stdout closed"), "{err}");
}

#[test]
fn bad_durations_are_refused_before_attaching() {
    for (args, says) in [
        (&["-d", "1e300"][..], "too long"),
        (&["-i", "1e19"][..], "too long"),
        (&["-d", "-1"][..], "not a positive number"),
        (&["-i", "0.001"][..], "too short"),
        (&["-d", "nan"][..], "not a positive number"),
    ] {
        let out = run(Command::new(TRACER).args(args));
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

/// Without tracefs the tracer mounts it in a mount namespace of its own and says so: the
/// mounts it was started among never change (tracers side by side cannot unmount it under one
/// another), and a traced command runs among them. The test itself runs in a namespace of its
/// own (unshare) where it unmounts tracefs, so the other tests keep theirs.
#[test]
fn a_missing_tracefs_is_mounted_for_the_tracer_alone() {
    let _machine = require_root();
    // The command runs in our directory: `-- ./prog` works.
    let (dir, workload) = WORKLOAD.rsplit_once('/').unwrap();
    let script = format!(
        "umount /sys/kernel/tracing 2>/dev/null; umount /sys/kernel/debug 2>/dev/null; \
         if grep -qw tracefs /proc/self/mounts; then echo still-mounted; exit 9; fi; \
         outer=$(readlink /proc/self/ns/mnt); \
         cd {dir} && \
         {TRACER} -o json --no-breakdown -- ./{workload} --query 3 >/dev/null && \
         {TRACER} -o json --no-breakdown -- sh -c \
           'echo command-tracefs-mounts=$(grep -cw tracefs /proc/self/mounts); \
            echo command-ns=$(readlink /proc/self/ns/mnt); echo command-cwd=$(pwd)' || exit $?; \
         echo outer-ns=$outer; \
         echo tracefs-mounts=$(grep -cw tracefs /proc/self/mounts)"
    );
    let out =
        run(Command::new("unshare").args(["-m", "--propagation", "private", "sh", "-c", &script]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stderr.contains(
            "mounted tracefs at /sys/kernel/tracing for this run only (the system's mounts are unchanged)"
        ),
        "{stderr}"
    );
    assert!(stdout.contains("tracefs-mounts=0"), "{stdout}");
    assert!(stdout.contains("command-tracefs-mounts=0"), "{stdout}");
    let ns = |tag: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(tag))
            .unwrap_or_else(|| panic!("no {tag} in {stdout}"))
            .to_string()
    };
    assert_eq!(
        ns("command-ns="),
        ns("outer-ns="),
        "the command runs in our mount namespace"
    );
    assert_eq!(ns("command-cwd="), dir, "and in our directory");
    let report = last_json_with(&stdout, "processes");
    assert_eq!(report["dropped"]["total"], 0);
}

/// Builds a C test program of tests/urcu against Debian's liburcu (`cargo xtask test` installs
/// gcc and liburcu-dev), without frame pointers, as distributions build.
fn build_urcu_program(src: &str, bin: &str, flags: &[&str]) -> PathBuf {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/urcu/{src}.c"));
    let bin = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(bin);
    let cc = Command::new("cc")
        .args(["-O2", "-fomit-frame-pointer", "-o"])
        .arg(&bin)
        .arg(&src)
        .args(flags)
        .arg("-lpthread")
        .output()
        .expect("cc (cargo xtask test installs gcc and liburcu-dev)");
    assert!(
        cc.status.success(),
        "{}",
        String::from_utf8_lossy(&cc.stderr)
    );
    bin
}

/// The liburcu writers program (tests/urcu/urcu_writers.c), started and waiting on stdin.
struct UrcuWriters {
    prog: Child,
    out: BufReader<std::process::ChildStdout>,
    stdin: Option<std::process::ChildStdin>,
    pid: u32,
}

/// One writer's own figures: (function, thread name, tid, grace periods, ns).
type OwnWriter = (String, String, u64, u64, u64);

impl UrcuWriters {
    fn start(bin: &std::path::Path, args: &[&str]) -> UrcuWriters {
        let mut prog = Command::new(bin)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(prog.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let pid = line.trim().strip_prefix("ready ").unwrap().parse().unwrap();
        let stdin = prog.stdin.take();
        UrcuWriters {
            prog,
            out,
            stdin,
            pid,
        }
    }

    /// Lets the writers run; returns their own figures once both are done.
    fn run(&mut self) -> Vec<OwnWriter> {
        self.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
        // "<function> <thread> <tid> <grace periods> <ns>", per writer.
        let mut own = Vec::new();
        let mut line = String::new();
        for _ in 0..2 {
            line.clear();
            self.out.read_line(&mut line).unwrap();
            let f: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(f.len(), 5, "{line}");
            own.push((
                f[0].to_string(),
                f[1].to_string(),
                f[2].parse::<u64>().unwrap(),
                f[3].parse::<u64>().unwrap(),
                f[4].parse::<u64>().unwrap(),
            ));
        }
        own
    }

    /// Lets it exit, which it must do successfully.
    fn finish(mut self) {
        drop(self.stdin.take());
        assert!(self.prog.wait().unwrap().success());
    }
}

/// Two liburcu writer functions in two named threads, traced by --pid: each one's grace
/// periods are counted exactly, attributed to it by the symbolized caller, with its thread,
/// their time within 15% below the program's own timing, and membarrier calls inside. Alone
/// on the machine: a grace period here is about 7 us, and the program's own clock around each
/// call also holds the uprobe's two traps and any preemption; beside the other tests (workloads
/// spinning on both CPUs) its time came out 74% and 83% of the program's in two CI runs (alone:
/// 96% to 99.5% in every run).
#[test]
fn rcu_writers_are_counted_per_caller_and_thread() {
    let _machine = alone();
    let bin = build_urcu_program("urcu_writers", "urcu_writers", &["-lurcu-memb"]);
    let mut prog = UrcuWriters::start(&bin, &["400", "250"]);
    let pid = prog.pid;
    let pid_arg = pid.to_string();
    let listen = format!("127.0.0.1:{}", free_port());
    let tracer = Tracer::start(&["-o", "json", "-p", &pid_arg, "--listen", &listen]);
    let own = prog.run();
    // The exporter has every grace period of the function, all callers together.
    let (_, metrics) = http_get(&listen, "/metrics", "text/plain").unwrap();
    let series = format!(
        "membarrier_rcu_grace_periods_total{{pid=\"{pid}\",comm=\"urcu_writers\",function=\"urcu_memb_synchronize_rcu\"}} "
    );
    let total: u64 = own.iter().map(|w| w.3).sum();
    assert!(
        metrics.contains(&format!("{series}{total}\n")),
        "{series}{total} not in:\n{}",
        metrics
            .lines()
            .filter(|l| l.contains("rcu"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // A long-lived writer: the tracer symbolizes its callers while it lives (within 250 ms).
    thread::sleep(Duration::from_millis(1000));
    prog.finish();
    let (out, report) = tracer.report();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("RCU writers: probing urcu_memb_synchronize_rcu in "),
        "{stderr}"
    );
    assert_eq!(report["missed_grace_periods"], 0);
    assert_eq!(report["dropped"]["total"], 0);
    let writers = report["rcu_writers"].as_array().unwrap();
    assert_eq!(writers.len(), 2, "{writers:#?}");
    for (function, thread_name, tid, n, ns) in own {
        let w = writers
            .iter()
            .find(|w| w["caller"]["symbol"] == function.as_str())
            .unwrap_or_else(|| panic!("no writer called from {function}: {writers:#?}"));
        assert_eq!(w["pid"], pid);
        assert_eq!(w["flavour"], "memb");
        assert_eq!(w["function"], "urcu_memb_synchronize_rcu");
        assert!(
            w["library"].as_str().unwrap().contains("liburcu"),
            "{}",
            w["library"]
        );
        assert!(
            w["caller"]["module"]
                .as_str()
                .unwrap()
                .ends_with("urcu_writers"),
            "{}",
            w["caller"]
        );
        assert_eq!(w["grace_periods"], n, "{function}");
        assert_eq!(
            w["threads"],
            json!([{"tid": tid, "name": thread_name, "grace_periods": n}])
        );
        // Inside the program's own clock readings around each call, and not much less.
        let sum = w["latency_ns"]["sum"].as_u64().unwrap();
        assert!(
            sum <= ns && sum * 100 >= ns * 85,
            "{function}: {sum} ns, own {ns} ns"
        );
        // liburcu-memb issues membarrier before and after waiting for readers.
        assert!(
            w["membarrier_calls"].as_u64().unwrap() >= 2 * n,
            "{function}: {}",
            w["membarrier_calls"]
        );
        assert!(w["membarrier_ns"].as_u64().unwrap() <= sum);
        assert!(w["blocked_ns"].as_u64().unwrap() <= sum);
        let hist: u64 = w["histogram"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["count"].as_u64().unwrap())
            .sum();
        assert_eq!(hist, n);
    }
}

/// `-- COMMAND` sees grace periods from the first one (the installed library is probed before
/// the command runs); a process without liburcu shows none, and no error; `--no-rcu` probes
/// nothing.
#[test]
fn rcu_writers_from_the_first_grace_period_and_none_without_liburcu() {
    let _machine = require_root();
    let bin = build_urcu_program("urcu_writer", "urcu_memb_writer", &["-lurcu-memb"]);
    let out = run(tracer().args(["-o", "json", "--"]).arg(&bin).arg("300"));
    let report = report_of(&out);
    let writers = report["rcu_writers"].as_array().unwrap();
    assert_eq!(writers.len(), 1, "{writers:#?}");
    assert_eq!(writers[0]["grace_periods"], 300);
    assert_eq!(writers[0]["threads"][0]["grace_periods"], 300);
    assert_eq!(report["missed_grace_periods"], 0);

    let out = run(tracer().args(["-o", "text", "--", WORKLOAD, "--query", "2"]));
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("RCU writers"), "{text}");
    let out = run(tracer().args(["-o", "json", "--", WORKLOAD, "--query", "2"]));
    assert_eq!(report_of(&out)["rcu_writers"], serde_json::json!([]));

    let out = run(tracer()
        .args(["-o", "json", "--no-rcu", "--"])
        .arg(&bin)
        .arg("10"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("RCU writers"), "{stderr}");
    assert_eq!(report_of(&out)["rcu_writers"], serde_json::json!([]));
}

/// liburcu's qsbr and bp flavours are found too: qsbr's grace periods, which make no membarrier
/// call (its process has no membarrier rows at all), and bp's, which make two each.
#[test]
fn rcu_writers_of_the_qsbr_and_bp_flavours() {
    let _machine = require_root();
    for (flavour, define, calls_per_gp) in [("qsbr", "-DQSBR", 0), ("bp", "-DBP", 2)] {
        let lib = format!("-lurcu-{flavour}");
        let bin = build_urcu_program("urcu_writer", &format!("urcu_{flavour}"), &[define, &lib]);
        // The program stays 200 ms after its grace periods: the caller of a process that exits
        // within milliseconds of its first grace period (200 of them take about 6 ms) is named
        // only if the callers thread reads its maps first, a race the box's load decides
        // (docs/design.md; lost in 2 CI runs of 3 while the program's two threads kept both
        // CPUs busy). This test is about the flavours, not that race.
        let out = run(tracer()
            .args(["-o", "json", "--"])
            .arg(&bin)
            .args(["200", "200"]));
        assert!(String::from_utf8_lossy(&out.stdout).contains("grace periods: 200"));
        let report = report_of(&out);
        let writers = report["rcu_writers"].as_array().unwrap();
        assert_eq!(writers.len(), 1, "{writers:#?}");
        let w = &writers[0];
        assert_eq!(w["flavour"], flavour);
        assert_eq!(w["function"], format!("urcu_{flavour}_synchronize_rcu"));
        assert!(
            w["library"]
                .as_str()
                .unwrap()
                .ends_with(&format!("liburcu-{flavour}.so")),
            "{}",
            w["library"]
        );
        assert_eq!(w["comm"], format!("urcu_{flavour}"));
        assert_eq!(
            w["caller"]["symbol"], "main",
            "{flavour}: {}; {}",
            w["caller"], report["dropped"]
        );
        assert_eq!(
            w["caller"]["module"].as_str(),
            Some(bin.to_str().unwrap()),
            "{}",
            w["caller"]
        );
        assert_eq!(w["grace_periods"], 200);
        assert_eq!(w["threads"][0]["grace_periods"], 200);
        if calls_per_gp == 0 {
            assert_eq!(w["membarrier_calls"], 0);
            assert_eq!(report["processes"], json!([]));
        } else {
            assert!(w["membarrier_calls"].as_u64().unwrap() >= calls_per_gp * 200);
        }
        assert_eq!(report["missed_grace_periods"], 0);
    }
}

/// --stacks on the two liburcu writers, built without and with frame pointers: every
/// PRIVATE_EXPEDITED call is attributed to a stack unwound to the thread's start, and the
/// stacks through each writer function hold at least its two calls per synchronize_rcu().
#[test]
fn stacks_of_liburcu_writers_without_and_with_frame_pointers() {
    let _machine = require_root();
    for (name, flags) in [
        ("urcu_writers", &["-lurcu-memb"][..]),
        (
            "urcu_writers_fp",
            &["-lurcu-memb", "-fno-omit-frame-pointer"][..],
        ),
    ] {
        let bin = build_urcu_program("urcu_writers", name, flags);
        // A pause between grace periods keeps the calls under the exact stack rate; 600 ms of
        // them, so the kernel unwinds them once the first retire pass (250 ms) taught it.
        let mut prog = UrcuWriters::start(&bin, &["600", "400", "1000"]);
        let pid_arg = prog.pid.to_string();
        // With the grace-period probes (the default): their uretprobe puts its trampoline in
        // place of synchronize_rcu()'s return address, which the unwinding must see through.
        let tracer = Tracer::start(&["-o", "json", "-p", &pid_arg, "--stacks"]);
        let own = prog.run();
        prog.finish();
        let report = tracer.report().1;
        assert_eq!(report["dropped"]["total"], 0, "{name}");
        let p = &report["processes"][0];
        let pe = p["cmds"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["cmd"] == "PRIVATE_EXPEDITED")
            .unwrap_or_else(|| panic!("{name}: {p:#}"));
        let stacks = pe["stacks"].as_array().unwrap();
        assert_eq!(pe["unattributed"], 0, "{name}");
        let calls: u64 = stacks.iter().map(|s| s["calls"].as_u64().unwrap()).sum();
        assert_eq!(calls, pe["calls"].as_u64().unwrap(), "{name}: {stacks:#?}");
        for s in stacks {
            assert_eq!(s["estimated"], false, "{name}: {s:#}");
        }
        let names = |s: &Value| -> Vec<String> {
            s["frames"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| f["symbol"].as_str().unwrap_or("?").to_string())
                .collect()
        };
        for (function, _, _, n, _) in &own {
            let through: Vec<&Value> = stacks
                .iter()
                .filter(|s| names(s).contains(function))
                .collect();
            let calls: u64 = through.iter().map(|s| s["calls"].as_u64().unwrap()).sum();
            assert!(
                calls >= 2 * n,
                "{name}: {function}: {calls} calls for {n} grace periods: {stacks:#?}"
            );
            // Unwound in userspace first, then by the kernel, into the same stacks: a kernel
            // that found other frames or stopped elsewhere would make stacks of its own.
            let in_kernel = |s: &Value| s["unwound_in_kernel"].as_u64().unwrap();
            assert!(
                through
                    .iter()
                    .any(|s| in_kernel(s) > 0 && in_kernel(s) < s["calls"].as_u64().unwrap()),
                "{name}: {function}: {stacks:#?}"
            );
            for s in through {
                let f = names(s);
                // The syscall, liburcu, the writer, then its thread's start, to the outermost.
                assert_eq!(f[0], "syscall", "{name}: {f:?}");
                let at = f.iter().position(|x| x == function).unwrap();
                assert!(
                    f[..at]
                        .iter()
                        .any(|x| x.starts_with("urcu_memb_synchronize_rcu")),
                    "{name}: {f:?}"
                );
                assert_eq!(f[at + 1], "run", "{name}: {f:?}");
                assert_eq!(s["truncated"], false, "{name}: {f:?}");
                assert!(
                    s["frames"][at]["module"].as_str().unwrap().ends_with(name),
                    "{name}: {s:#}"
                );
            }
        }
    }
}

/// --stacks above the exact rate: a second of full-speed PRIVATE_EXPEDITED calls from one
/// call site gets sampled stacks, marked estimates, that with the calls nothing could be sent
/// for still add up to every call. Its one stack is unwound in userspace from the first
/// samples, then by the kernel with the rules learned from them, and both count into it.
#[test]
fn stacks_above_the_rate_are_sampled_and_add_up() {
    let _machine = require_root();
    let out = run(tracer()
        .args(["-o", "json", "--stacks", "--no-rcu", "--"])
        .arg(WORKLOAD)
        .args(["--steady-secs", "1"]));
    let report = report_of(&out);
    let own = last_json_with(&String::from_utf8_lossy(&out.stdout), "outcomes");
    let expected = workload_counts(&own)[&(8, 0, String::new())];
    assert!(expected > 10_000, "{own}");
    let pe = report["processes"][0]["cmds"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["cmd"] == "PRIVATE_EXPEDITED")
        .unwrap()
        .clone();
    assert_eq!(pe["calls"], expected);
    let kernel = membarrier_trace::kernel::Features::of_this_kernel();
    if !kernel.task_pt_regs {
        // Before Linux 5.15 (the 5.10 guest): the run goes on without stacks, saying so once.
        let err = String::from_utf8_lossy(&out.stderr);
        let line = format!(
            "--stacks off: it needs bpf_task_pt_regs (Linux 5.15), this is {}",
            kernel.name()
        );
        assert_eq!(err.matches(&line).count(), 1, "{err}");
        assert!(pe["stacks"].as_array().is_none_or(|s| s.is_empty()), "{pe}");
        return;
    }
    let stacks = pe["stacks"].as_array().unwrap();
    let calls: u64 = stacks.iter().map(|s| s["calls"].as_u64().unwrap()).sum();
    let unattributed = pe["unattributed"].as_u64().unwrap();
    assert_eq!(calls + unattributed, expected, "{stacks:#?}");
    assert!(stacks.iter().any(|s| s["estimated"] == true), "{stacks:#?}");
    // One call site, one stack: the kernel's frames are the ones userspace found. The kernel
    // unwinds it unless it runs past the bytes a sample copies: a main thread near the top of
    // its stack (the RT guest's small environment), which userspace sees truncated there.
    assert_eq!(stacks.len(), 1, "{stacks:#?}");
    assert_eq!(
        stacks[0]["unwound_in_kernel"].as_u64().unwrap() > 0,
        stacks[0]["truncated"] == false,
        "{stacks:#?}"
    );
    let top = &stacks[0]["frames"];
    assert!(
        top.as_array()
            .unwrap()
            .iter()
            .any(|f| f["symbol"] == "membarrier_workload::call"),
        "{top:#}"
    );
}

/// Findings: each rule fires on a workload with its pitfall, with the evidence and cost in
/// numbers, and stays quiet on a healthy workload near its threshold.
#[test]
fn findings_fire_on_pitfalls_and_not_on_healthy_workloads() {
    let _machine = require_root();
    let cases: [(&[&str], Option<&str>); 6] = [
        // Registered after starting its threads: the registration waits for a grace period.
        // (One call a thread: more, back to back, would also queue on the kernel's mutex.)
        (
            &["--expedited", "2", "--threads", "2", "--register-late"],
            Some("late_registration"),
        ),
        // The same calls, registered while single-threaded: microseconds.
        (&["--expedited", "2", "--threads", "2"], None),
        (&["--eperm", "5"], Some("unregistered_eperm")),
        (&["--expedited", "5"], None),
        // GLOBAL in a loop: the process spends its life waiting for grace periods.
        (&["--global", "30"], Some("global_rate")),
        // One call under the count threshold.
        (&["--global", "9"], None),
    ];
    for (args, rule) in cases {
        let out = run(tracer()
            .args(["-o", "json", "--no-rcu", "--"])
            .arg(WORKLOAD)
            .args(args));
        let report = report_of(&out);
        let own = last_json_with(&String::from_utf8_lossy(&out.stdout), "outcomes");
        let findings = report["findings"].as_array().unwrap();
        let rules: Vec<&str> = findings
            .iter()
            .map(|f| f["rule"].as_str().unwrap())
            .collect();
        let Some(rule) = rule else {
            assert!(rules.is_empty(), "{args:?}: {findings:#?}");
            continue;
        };
        assert_eq!(rules, [rule], "{args:?}: {findings:#?}");
        let f = &findings[0];
        assert_eq!(f["pid"], own["pid"], "{f:#}");
        assert!(f["fix"].as_str().unwrap().len() > 20, "{f:#}");
        assert!(
            f["reference"].as_str().unwrap().contains("membarrier.c"),
            "{f:#}"
        );
        match rule {
            "late_registration" => {
                assert_eq!(f["evidence"]["cmd"], "REGISTER_PRIVATE_EXPEDITED");
                assert!(
                    f["evidence"]["latency_max_ns"].as_u64().unwrap() >= 1_000_000,
                    "{f:#}"
                );
                assert!(f["cost"]["time_ns"].as_u64().unwrap() >= 1_000_000, "{f:#}");
            }
            "unregistered_eperm" => {
                assert_eq!(f["severity"], "critical");
                assert_eq!(f["evidence"]["eperm"], 5);
                assert_eq!(f["cost"]["calls"], 5);
            }
            "global_rate" => {
                assert_eq!(f["evidence"]["calls"], 30);
                assert!(
                    f["evidence"]["share_of_run_pct"].as_f64().unwrap() >= 10.0,
                    "{f:#}"
                );
            }
            _ => unreachable!(),
        }
    }
}

/// Two processes of two threads each calling PRIVATE_EXPEDITED back to back, a thread of each
/// on each CPU, queue on the kernel's mutex (32-46% of their call time, 6 runs): a finding
/// for each, naming both; one caller never waits (a single-threaded process's call returns
/// before the mutex). With fewer calls (20,000) a process sometimes finished its calls within
/// a few ms, before the other got going, without waiting.
#[test]
fn mutex_contention_names_the_callers_and_a_lone_caller_has_none() {
    // Alone: beside another test's spinner (SCHED_FIFO on the last CPU) the threads pinned
    // there hardly ran, and the processes waited 7-14% of their call time (2 runs of 6).
    let _machine = alone();
    let w = WORKLOAD;
    let out = run(tracer()
        .args(["-o", "json", "--no-rcu", "--", "sh", "-c"])
        .arg(format!(
            "{w} --expedited 200000 --threads 2 --pin-threads --name mutex-a & \
         {w} --expedited 200000 --threads 2 --pin-threads --name mutex-b; wait"
        )));
    let report = report_of(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let pids: Vec<u64> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.get("outcomes").is_some())
        .map(|v| v["pid"].as_u64().unwrap())
        .collect();
    assert_eq!(pids.len(), 2, "{stdout}");
    let findings = report["findings"].as_array().unwrap();
    for pid in &pids {
        let f = findings
            .iter()
            .find(|f| f["rule"] == "mutex_contention" && f["pid"] == *pid)
            .unwrap_or_else(|| panic!("no mutex_contention for {pid}: {findings:#?}"));
        let e = &f["evidence"];
        assert_eq!(e["cmd"], "PRIVATE_EXPEDITED", "{f:#}");
        assert_eq!(e["calls"], 200000, "{f:#}");
        assert_eq!(e["threads"], 2, "{f:#}");
        assert!(e["share_pct"].as_f64().unwrap() >= 10.0, "{f:#}");
        assert_eq!(f["cost"]["time_ns"], e["mutex_wait_ns"], "{f:#}");
        let row = cmd_row(process(&report, *pid as u32), 8, 0);
        assert_eq!(e["mutex_wait_ns"], row["mutex_wait_ns"]["sum"], "{f:#}");
        // Releasing the mutex wakes the waiter, which may take an IPI of its own: not
        // membarrier's. A call reaches at most every other CPU.
        let cpus = std::thread::available_parallelism().unwrap().get() as u64;
        for b in row["ipis"]["per_call"].as_array().unwrap() {
            assert!(b["ipis"].as_u64().unwrap() < cpus, "{}", row["ipis"]);
        }
        let mut callers: Vec<u64> = e["callers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["pid"].as_u64().unwrap())
            .collect();
        callers.sort_unstable();
        let mut want = pids.clone();
        want.sort_unstable();
        assert_eq!(callers, want, "{f:#}");
    }
    // Their IPIs to each other may also be a storm (12,600 a second to each CPU, once).
    assert!(
        findings
            .iter()
            .all(|f| f["rule"] == "mutex_contention" || f["rule"] == "ipi_storm"),
        "{findings:#?}"
    );

    let out = run(tracer()
        .args(["-o", "json", "--no-rcu", "--"])
        .arg(WORKLOAD)
        .args(["--expedited", "20000"]));
    let report = report_of(&out);
    let row = cmd_row(&report["processes"][0], 8, 0);
    assert_eq!(row["calls"], 20000);
    assert_eq!(row["mutex_wait_ns"]["sum"], 0, "{row:#}");
    assert_eq!(report["findings"], serde_json::json!([]));
}

/// GLOBAL_EXPEDITED in a loop from CPU 0 against a registered process spinning on the other
/// CPU: an `ipi_storm` naming that process as the victim, with its interrupts and handler
/// time; the same calls paced under the threshold make none.
#[test]
fn ipi_storm_names_the_victim_and_a_paced_caller_has_none() {
    // Alone: the victim spins pinned to a CPU the other tests would want.
    let _machine = alone();
    let mut victim = Killed(
        Command::new(WORKLOAD)
            .args(["--victim-secs", "30", "--name", "victim"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    BufReader::new(victim.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let victim_pid: u64 = line
        .strip_prefix("victim ")
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("victim said {line:?}"));
    let storm = run(tracer()
        .args(["-o", "json", "--no-rcu", "--"])
        .arg(WORKLOAD)
        .args(["--global-expedited", "50000"]));
    // At most 8,000 a second: under the threshold of 10,000 to one CPU.
    let paced = run(tracer()
        .args(["-o", "json", "--no-rcu", "--"])
        .arg(WORKLOAD)
        .args(["--global-expedited", "4000", "--rate", "8000"]));
    drop(victim);

    let report = report_of(&storm);
    let findings = report["findings"].as_array().unwrap();
    assert_eq!(findings.len(), 1, "{findings:#?}");
    let f = &findings[0];
    assert_eq!(f["rule"], "ipi_storm", "{f:#}");
    assert_eq!(f["pid"], report["processes"][0]["pid"], "{f:#}");
    let e = &f["evidence"];
    assert_eq!(e["cmd"], "GLOBAL_EXPEDITED", "{f:#}");
    assert_eq!(e["calls"], 50000, "{f:#}");
    let last_cpu = (std::thread::available_parallelism().unwrap().get() - 1).to_string();
    assert!(
        e["ipis_per_sec_per_cpu"][&last_cpu].as_f64().unwrap() >= 10_000.0,
        "{f:#}"
    );
    let v = &e["victims"][0];
    assert_eq!(v["pid"], victim_pid, "{f:#}");
    assert_eq!(v["comm"], "victim", "{f:#}");
    // Not every call finds it running (the tracer's threads and kernel threads share its CPU:
    // 9,841 of 50,000 once), but it takes most of the interrupts.
    let all = sum_of(&e["victims"], "interrupts");
    assert!(v["interrupts"].as_u64().unwrap() * 2 > all, "{f:#}");
    assert!(v["handler_ns"].as_u64().unwrap() > 0, "{f:#}");
    let row = cmd_row(&report["processes"][0], 2, 0);
    assert_eq!(f["cost"]["ipis"], row["ipis"]["sent"], "{f:#}");
    assert_eq!(row["ipis"]["victims"][0]["pid"], victim_pid);

    let report = report_of(&paced);
    let row = cmd_row(&report["processes"][0], 2, 0);
    assert_eq!(row["calls"], 4000);
    // It did interrupt the victim, only not often enough to be a storm.
    assert!(row["ipis"]["sent"].as_u64().unwrap() >= 2000, "{row:#}");
    assert_eq!(report["findings"], serde_json::json!([]));
}

/// GLOBAL where the kernel cannot wait for a grace period: with nohz_full CPUs it fails with
/// EINVAL (a critical `global_unavailable`), with one CPU online it returns at once (a warning);
/// with the CPUs back, the same calls wait and make no finding. It takes CPUs offline and
/// needs a kernel booted with nohz_full: `cargo xtask vmtest` runs it in its guests (the
/// cloud kernel, and the same booted with `nohz_full=1`).
#[test]
#[ignore = "takes a CPU offline: runs in cargo xtask vmtest's guests"]
fn global_unavailable_where_the_kernel_cannot_wait() {
    let _machine = alone();
    let global = |n: &str| {
        let out = run(tracer()
            .args(["-o", "json", "--no-rcu", "--"])
            .arg(WORKLOAD)
            .args(["--global", n]));
        report_of(&out)
    };
    let nohz_full = std::fs::read_to_string("/sys/devices/system/cpu/nohz_full")
        .unwrap_or_default()
        .trim()
        .to_string();
    let booted_nohz = std::fs::read_to_string("/proc/cmdline")
        .unwrap()
        .contains("nohz_full=");
    let nohz = !nohz_full.is_empty() && nohz_full != "(null)";
    assert_eq!(nohz, booted_nohz, "nohz_full is {nohz_full:?}");
    if nohz {
        let report = global("5");
        let row = cmd_row(&report["processes"][0], 1, 0);
        assert_eq!(row["errno"]["EINVAL"], 5, "{row:#}");
        let findings = report["findings"].as_array().unwrap();
        assert_eq!(findings.len(), 1, "{findings:#?}");
        let f = &findings[0];
        assert_eq!(f["rule"], "global_unavailable", "{f:#}");
        assert_eq!(f["severity"], "critical", "{f:#}");
        assert_eq!(f["evidence"]["einval"], 5, "{f:#}");
        assert_eq!(f["evidence"]["nohz_full"], nohz_full, "{f:#}");
        return;
    }
    let cpus = std::thread::available_parallelism().unwrap().get();
    assert!(cpus >= 2, "needs 2 CPUs to take one offline");
    {
        // Every CPU but 0 offline, back online on drop.
        let _offline: Vec<Sysctl> = (1..cpus)
            .map(|c| Sysctl::file(&format!("/sys/devices/system/cpu/cpu{c}/online"), "0"))
            .collect();
        let report = global("5");
        let findings = report["findings"].as_array().unwrap();
        assert_eq!(findings.len(), 1, "{findings:#?}");
        let f = &findings[0];
        assert_eq!(f["rule"], "global_unavailable", "{f:#}");
        assert_eq!(f["severity"], "warning", "{f:#}");
        assert_eq!(f["evidence"]["calls"], 5, "{f:#}");
        assert_eq!(f["evidence"]["cpus_online"], 1, "{f:#}");
        // No grace period: nothing to block on.
        assert_eq!(f["evidence"]["blocked_ns"], 0, "{f:#}");
    }
    let report = global("5");
    let row = cmd_row(&report["processes"][0], 1, 0);
    assert_eq!(row["calls"], 5);
    assert_eq!(row["errors"], 0);
    assert_eq!(report["findings"], serde_json::json!([]));
}

/// `--hook-floor` (the bench's floor of each hook): every hook the kernel allows attaches its
/// programs that do nothing, the command runs to its end with its status, and nothing is
/// counted; fentry where the kernel refuses it fails with the reason.
#[test]
fn hook_floor_attaches_each_hook_and_counts_nothing() {
    let _machine = require_root();
    for hook in ["tracepoint", "raw", "fentry"] {
        let out = run(Command::new(TRACER)
            .args(["--attach", hook, "--hook-floor", "-o", "json", "--"])
            .arg(WORKLOAD)
            .args(["--expedited", "50", "--exit-code", "3"]));
        let stderr = String::from_utf8_lossy(&out.stderr);
        if hook == "fentry" && !fentry_any() {
            assert!(!out.status.success());
            assert!(stderr.contains("refused"), "{stderr}");
            continue;
        }
        assert_eq!(out.status.code(), Some(3), "{hook}: {stderr}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let report = last_json_with(&stdout, "processes");
        assert_eq!(report["attach"], hook, "{stderr}");
        assert_eq!(report["calls"], 0, "{hook}: {report:#}");
        assert_eq!(report["missed_calls"], 0, "{hook}: {report:#}");
        let mine = last_json_with(&stdout, "outcomes");
        assert_eq!(mine["outcomes"].as_array().unwrap().len(), 2, "{mine}");
    }
}

/// The tracer reading its maps on the CPU where the traced process calls, 100 times a second.
/// Each map syscall holds the CPU's `bpf_prog_active` while it runs, and the kernel skips every
/// syscall-tracepoint program that starts on that CPU meanwhile: were the tracer preempted
/// there (PREEMPT_RT kernels preempt syscalls), the caller's calls would be skipped until it ran
/// again. Every call must still be counted, none missed or skipped.
#[test]
fn snapshots_on_the_callers_cpu_lose_no_call() {
    let _machine = alone();
    let mut w = Workload::start(&["--steady-secs", "3", "--cpu", "0"]);
    let pid = w.pid.to_string();
    let tracer = Tracer::start_on_cpu(&["-o", "json", "-i", "0.01", "--pid", &pid], 0);
    w.go();
    let own = w.finish();
    let (_, report) = tracer.report();
    let p = process(&report, pid.parse().unwrap());
    let steady: u64 = own["outcomes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["cmd"] == 8)
        .map(|o| o["count"].as_u64().unwrap())
        .sum();
    assert!(steady > 10_000, "{own}");
    assert_eq!(
        (
            cmd_row(p, 8, 0)["calls"].as_u64().unwrap(),
            report["missed_calls"].as_u64().unwrap(),
            report["dropped"]["hook_runs_skipped"].as_u64().unwrap()
        ),
        (steady, 0, 0),
        "{}",
        report["dropped"]
    );
}

/// A child killed on drop (a failing test does not leave it running).
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A free TCP port on loopback (bound, read and released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GET `path` from `addr` over HTTP/1.0: (status code, body), or None when nothing answers.
fn http_get(addr: &str, path: &str, accept: &str) -> Option<(u32, String)> {
    use std::io::Read as _;
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(20))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: {accept}\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_string()))
}

/// Percent-encodes a PromQL query for a URL.
fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A Prometheus server on loopback scraping `target` every second, in its own directory; killed
/// on drop.
struct Prometheus {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target: &str) -> Prometheus {
        // A private directory (0700, a random name): root writes no file at a name others know.
        let tmp = tempfile::Builder::new()
            .prefix("mt-prometheus-")
            .tempdir()
            .unwrap();
        let dir = tmp.path().to_path_buf();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global: {{scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}}\n\
                 scrape_configs:\n  - job_name: membarrier\n    static_configs:\n      \
                 - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let log = std::fs::File::create(dir.join("log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("running prometheus (cargo xtask test installs Debian's package)");
        let p = Prometheus {
            child,
            addr,
            _dir: tmp,
        };
        let until = Instant::now() + TIMEOUT;
        while http_get(&p.addr, "/-/ready", "*/*").is_none_or(|(code, _)| code != 200) {
            assert!(Instant::now() < until, "prometheus not ready: {}", p.log());
            thread::sleep(Duration::from_millis(100));
        }
        p
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("log")).unwrap_or_default()
    }

    /// An instant query's result vector: (labels, value) per series.
    fn query(&self, promql: &str) -> Vec<(Value, f64)> {
        let path = format!("/api/v1/query?query={}", url_encode(promql));
        let (code, body) = http_get(&self.addr, &path, "*/*").expect("prometheus answers");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(code, 200, "{promql}: {v}");
        v["data"]["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let value = r["value"][1].as_str().unwrap().parse().unwrap();
                (r["metric"].clone(), value)
            })
            .collect()
    }

    /// Polls `promql` (a single series) until it equals `want`; returns what it last read.
    fn wait_for(&self, promql: &str, want: f64) -> Option<f64> {
        let until = Instant::now() + TIMEOUT;
        let mut last = None;
        while Instant::now() < until {
            last = self.query(promql).first().map(|r| r.1);
            if last == Some(want) {
                break;
            }
            thread::sleep(Duration::from_millis(250));
        }
        last
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real Prometheus server scrapes a system-wide exporter (`-o none --listen`) every second:
/// PromQL over what it stored gives the workload's own call counts per cmd, flags and result,
/// and its GLOBAL median within 25% (the classic buckets are at most 21% apart).
#[test]
fn prometheus_scrapes_exact_counts_errors_and_the_global_median() {
    let _machine = require_root();
    let listen = format!("127.0.0.1:{}", free_port());
    let mut w = Workload::start(&[
        "--eperm",
        "7",
        "--invalid",
        "5",
        "--bad-flags",
        "3",
        "--query",
        "11",
        "--expedited",
        "400",
        "--threads",
        "2",
        "--global",
        "30",
    ]);
    let tracer = Tracer::start(&["-o", "none", "--listen", &listen]);
    let prom = Prometheus::start(&listen);
    w.go();
    let mine = w.finish();
    let pid = mine["pid"].as_u64().unwrap();
    let truth = workload_counts(&mine);
    let total: u64 = truth.values().sum();
    let sel = format!("{{job=\"membarrier\",pid=\"{pid}\"}}");
    let got = prom.wait_for(&format!("sum(membarrier_calls_total{sel})"), total as f64);
    assert_eq!(got, Some(total as f64), "{}", prom.log());

    let names = [
        (0, "QUERY"),
        (1, "GLOBAL"),
        (3, "INVALID(3)"),
        (8, "PRIVATE_EXPEDITED"),
        (16, "REGISTER_PRIVATE_EXPEDITED"),
    ];
    let want: BTreeMap<(String, String, String), f64> = truth
        .iter()
        .map(|((cmd, flags, errno), &n)| {
            let name = names.iter().find(|c| c.0 == *cmd).unwrap().1;
            let result = if errno.is_empty() { "ok" } else { errno };
            (
                (name.to_string(), flags.to_string(), result.to_string()),
                n as f64,
            )
        })
        .collect();
    let scraped: BTreeMap<(String, String, String), f64> = prom
        .query(&format!(
            "sum by (cmd, flags, result) (membarrier_calls_total{sel})"
        ))
        .into_iter()
        .map(|(m, v)| {
            let l = |k: &str| m[k].as_str().unwrap().to_string();
            ((l("cmd"), l("flags"), l("result")), v)
        })
        .collect();
    assert_eq!(scraped, want);
    assert!(want.keys().any(|k| k.2 == "EINVAL") && want.keys().any(|k| k.2 == "EPERM"));

    // The histogram's count is the calls; the median of the stored buckets is the workload's.
    let global_sel = format!("{{job=\"membarrier\",pid=\"{pid}\",cmd=\"GLOBAL\"}}");
    let count = prom.query(&format!(
        "membarrier_call_duration_seconds_count{global_sel}"
    ));
    assert_eq!(count.len(), 1);
    assert_eq!(count[0].1, 30.0);
    let p50 = prom.query(&format!(
        "histogram_quantile(0.5, sum by (le) (membarrier_call_duration_seconds_bucket{global_sel}))"
    ))[0]
        .1;
    let own = mine["outcomes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["cmd"] == 1)
        .unwrap()["p50_ns"]
        .as_f64()
        .unwrap()
        / 1e9;
    assert!(
        p50 > own * 0.75 && p50 < own * 1.25,
        "PromQL p50 {p50} s vs the workload's {own} s"
    );

    // Scraped as OpenMetrics (Prometheus asks for it first), with the tracer's own series.
    let up = prom.query("up{job=\"membarrier\"}");
    assert_eq!(up[0].1, 1.0, "{}", prom.log());
    let info = prom.query("membarrier_trace_info{job=\"membarrier\"}");
    assert_eq!(info.len(), 1);
    assert!(info[0].0["attach"].as_str().is_some_and(|a| !a.is_empty()));
    assert!(!prom.query("membarrier_trace_dropped_total").is_empty());
    assert_eq!(
        prom.query(&format!("membarrier_cpu_seconds_total{sel}"))
            .len(),
        2
    );

    // The 0.0.4 text format passes promtool's lint.
    let (code, text) = http_get(&listen, "/metrics", "text/plain").unwrap();
    assert_eq!(code, 200);
    let mut lint = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    lint.stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let lint = wait_output(lint);
    assert!(
        lint.status.success(),
        "{}{}",
        String::from_utf8_lossy(&lint.stdout),
        String::from_utf8_lossy(&lint.stderr)
    );
    assert_eq!(http_get(&listen, "/nothing", "*/*").unwrap().0, 404);

    // Every query of the shipped Grafana dashboard runs (`query` asserts success), and all but
    // the IPI panel's (this workload may send none) find series.
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(docs().join("prometheus/grafana-dashboard.json")).unwrap(),
    )
    .unwrap();
    let mut queries = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let promql = expr
                .replace("$__rate_interval", "1m")
                .replace("$instance", ".*");
            // rate() needs two scrapes of a series: the first may have been the last just now.
            let until = Instant::now() + Duration::from_secs(10);
            let mut result = prom.query(&promql);
            while result.is_empty() && Instant::now() < until {
                thread::sleep(Duration::from_millis(250));
                result = prom.query(&promql);
            }
            assert!(
                !result.is_empty() || expr.contains("membarrier_ipis_total"),
                "{}: {expr} finds nothing",
                panel["title"]
            );
            queries += 1;
        }
    }
    assert!(queries >= 8);

    // SIGTERM stops a plain exporter cleanly, with nothing on stdout.
    tracer.signal(libc::SIGTERM);
    let out = tracer.finish();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.is_empty());
}

/// A plain exporter tracing `--pid`s goes on serving once they have exited, until SIGTERM:
/// else the calls made since the last scrape never reach Prometheus (a real one, scraping
/// every second, saw nothing of a 20,000-call workload that ran between two scrapes).
#[test]
fn the_exporter_serves_the_final_counts_after_the_pids_exit() {
    let _machine = require_root();
    let listen = format!("127.0.0.1:{}", free_port());
    let prom = Prometheus::start(&listen);
    let mut w = Workload::start(&["--query", "20000"]);
    let pid = w.pid.to_string();
    let mut tracer = Tracer::start(&["-o", "none", "--listen", &listen, "-p", &pid]);
    w.go();
    let mine = w.finish();
    let total: u64 = workload_counts(&mine).values().sum();
    assert_eq!(total, 20_000);
    // Still there: the traced process is gone, the metrics are not.
    let sel = format!("{{job=\"membarrier\",pid=\"{pid}\"}}");
    let got = prom.wait_for(&format!("sum(membarrier_calls_total{sel})"), total as f64);
    assert_eq!(got, Some(total as f64), "{}", prom.log());
    assert!(tracer.child().try_wait().unwrap().is_none());
    tracer.signal(libc::SIGTERM);
    let out = tracer.finish();
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "every traced process has exited; still serving the final metrics until SIGTERM"
        ),
        "{stderr}"
    );
}

/// The repository's docs/.
fn docs() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs")
}

/// The shipped recording and alerting rules load, and their unit tests (each alert raised by a
/// case that should raise it, quiet on a healthy one near its threshold) pass in promtool.
#[test]
fn prometheus_rules_pass_promtool() {
    let dir = docs().join("prometheus");
    for args in [
        &["check", "rules", "rules.yml"][..],
        &["test", "rules", "rules_test.yml"],
    ] {
        let out = run(Command::new("promtool").args(args).current_dir(&dir));
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `calibrate` runs every scenario with the calls it asked for, none failing; the IPIs per call
/// follow the siblings running (none alone, one per sibling); and its figure for one sibling
/// agrees with what the tracer measures for the same workload (the spinner pair).
#[test]
fn calibrate_measures_each_cmd_and_agrees_with_the_tracer() {
    // A measurement of this host's costs: on a quiet machine, as calibrate is meant to be run
    // (beside the other tests, twice in four CI runs the 1-sibling scenario had 1,001 and
    // 1,002 IPIs in 1,000 calls; alone, 10 runs of 10 had 1,000: see the session-8 note).
    let _machine = alone();
    let out = run(tracer().args(["calibrate", "--calls", "4000", "-o", "json"]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = last_json_with(&String::from_utf8_lossy(&out.stdout), "calibration");
    let rows = v["calibration"].as_array().unwrap();
    let cpus = std::thread::available_parallelism().unwrap().get() as u64;
    let row = |name: &str| {
        rows.iter()
            .find(|r| r["scenario"] == name)
            .unwrap_or_else(|| panic!("no {name}: {rows:#?}"))
    };
    // 2 + (cpus - 1) sibling counts + 3 more expedited + GLOBAL + 2 registrations.
    assert_eq!(
        rows.len() as u64,
        2 + (cpus - 1).min(7) + 3 + 3,
        "{rows:#?}"
    );
    for r in rows {
        let name = r["scenario"].as_str().unwrap();
        let want = if name.starts_with("REGISTER_") {
            10
        } else if name.starts_with("GLOBAL (") {
            20
        } else if r["siblings"].as_u64().unwrap() > 0 {
            1000
        } else {
            4000
        };
        assert_eq!(r["calls"], want, "{r}");
        assert_eq!(r["errors"], 0, "{r}");
        assert!(
            r["p50_ns"].as_u64().unwrap() <= r["p99_ns"].as_u64().unwrap(),
            "{r}"
        );
    }
    assert_eq!(row("PRIVATE_EXPEDITED, one thread")["ipis_per_call"], 0.0);
    for k in 1..cpus.min(8) {
        let r = row(&format!(
            "PRIVATE_EXPEDITED, {k} sibling{} running",
            if k == 1 { "" } else { "s" }
        ));
        let per_call = r["ipis_per_call"].as_f64().unwrap();
        assert!(per_call >= k as f64 * 0.9 && per_call <= k as f64, "{r}");
        assert!(r["handler_ns_per_ipi"].as_u64().unwrap() > 0, "{r}");
    }
    // A registration in a process with a second thread waits for a grace period; alone it
    // does not.
    let (alone, two) = (
        row("REGISTER_PRIVATE_EXPEDITED, one thread")["p50_ns"]
            .as_u64()
            .unwrap(),
        row("REGISTER_PRIVATE_EXPEDITED, two threads")["p50_ns"]
            .as_u64()
            .unwrap(),
    );
    assert!(two > alone * 10, "alone {alone} ns, two threads {two} ns");

    // The tracer on the spinner pair (one sibling running) measures the same cost per call.
    let mut pair = Workload::start(&["--spinner-calls", "4000"]);
    let pair_pid = pair.pid;
    let tracer = Tracer::start(&["-o", "json", "--pid", &pair_pid.to_string()]);
    pair.go();
    pair.finish();
    let (_, report) = tracer.report();
    let traced = cmd_row(process(&report, pair_pid), 8, 0);
    let cal = row("PRIVATE_EXPEDITED, 1 sibling running");
    let (a, b) = (
        traced["latency_ns"]["p50"].as_f64().unwrap(),
        cal["p50_ns"].as_f64().unwrap(),
    );
    assert!(
        a < b * 2.0 && b < a * 2.0,
        "traced p50 {a} ns, calibrate {b} ns"
    );
}

/// The count of `membarrier_calls_total` of the series whose labels include `labels`, or None
/// when there is no such series.
fn scraped_calls(metrics: &str, labels: &str) -> Option<u64> {
    let found: Vec<u64> = metrics
        .lines()
        .filter(|l| l.starts_with("membarrier_calls_total{") && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!found.is_empty()).then(|| found.iter().sum())
}

/// `--listen :PORT` serves every address, as node_exporter's `--web.listen-address` does: the
/// IPv4 and the IPv6 loopback both answer, with the same exact count. `--version` names the
/// commit it was built from.
#[test]
fn a_bare_port_listens_on_every_address_and_version_names_the_commit() {
    let _machine = require_root();
    let port = free_port();
    let tracer = Tracer::start(&[
        "-o",
        "none",
        "--listen",
        &format!(":{port}"),
        "--by",
        "comm",
    ]);
    let w = run(Command::new(WORKLOAD).args(["--name", "mt-anyaddr", "--query", "300"]));
    assert!(w.status.success());
    for addr in [format!("127.0.0.1:{port}"), format!("[::1]:{port}")] {
        let start = Instant::now();
        loop {
            let metrics = http_get(&addr, "/metrics", "text/plain").map(|(_, m)| m);
            let n = metrics
                .as_deref()
                .and_then(|m| scraped_calls(m, "comm=\"mt-anyaddr\""));
            if n == Some(300) {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(10), "{addr}: {n:?}");
            thread::sleep(Duration::from_millis(100));
        }
    }
    tracer.signal(libc::SIGTERM);
    let _ = tracer.finish();
    let v = run(Command::new(TRACER).arg("--version"));
    let said = String::from_utf8_lossy(&v.stdout);
    let commit = said
        .trim()
        .strip_prefix(concat!(
            "membarrier-trace ",
            env!("CARGO_PKG_VERSION"),
            " (commit "
        ))
        .and_then(|c| c.strip_suffix(')'))
        .unwrap_or_else(|| panic!("{said}"));
    // Built from a git checkout: its HEAD.
    assert!(
        commit.len() == 12 && commit.bytes().all(|b| b.is_ascii_hexdigit()),
        "{said}"
    );
}

/// Exited processes leave the per-pid series after --keep-exited; per name they stay, summed.
#[test]
fn exited_processes_leave_the_metrics_after_keep_exited_and_stay_by_comm() {
    let _machine = require_root();
    let (by_pid, by_comm) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let a = Tracer::start(&["-o", "none", "--listen", &by_pid, "--keep-exited", "1"]);
    let b = Tracer::start(&["-o", "none", "--listen", &by_comm, "--by", "comm"]);
    let scrape = |addr: &str| http_get(addr, "/metrics", "text/plain").unwrap().1;
    let mut pids = Vec::new();
    for _ in 0..2 {
        let mut w = Workload::start(&["--query", "5", "--name", "mt-keep-exited"]);
        w.go();
        pids.push(w.finish()["pid"].as_u64().unwrap());
    }
    // Just exited: still shown (the first scrape that sees it exited starts its clock).
    let pid_label = |pid: u64| format!("pid=\"{pid}\",comm=\"mt-keep-exited\"");
    for &pid in &pids {
        assert_eq!(scraped_calls(&scrape(&by_pid), &pid_label(pid)), Some(5));
    }
    thread::sleep(Duration::from_millis(1500));
    let later = scrape(&by_pid);
    for &pid in &pids {
        assert_eq!(scraped_calls(&later, &pid_label(pid)), None, "{pid}");
    }
    // By name: no pid label, both processes summed, and they stay.
    let comm = "{comm=\"mt-keep-exited\",cmd=\"QUERY\",flags=\"0\",result=\"ok\"}";
    assert!(scrape(&by_comm).contains(&format!("membarrier_calls_total{comm} 10\n")));
    for t in [a, b] {
        t.signal(libc::SIGTERM);
        assert!(t.finish().status.success());
    }
}
