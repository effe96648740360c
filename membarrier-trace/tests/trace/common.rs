//! What every test uses: the tracer and workload binaries, running them, reading their
//! reports, and the machine lock (tests that churn processes run alone).

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    path::PathBuf,
    process::{Child, ChildStderr, Command, Output, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

pub const TRACER: &str = env!("CARGO_BIN_EXE_membarrier-trace");

pub const WORKLOAD: &str = env!("CARGO_BIN_EXE_membarrier-workload");

pub const TIMEOUT: Duration = Duration::from_secs(60);

/// The tracer, with `--attach $MT_ATTACH` when that is set (`cargo xtask vmtest` runs these
/// tests once per attach mode).
pub fn tracer() -> Command {
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
pub fn fentry_allowed() -> bool {
    std::env::var("MT_FENTRY").map_or_else(|_| fentry_any(), |v| v == "allowed")
}

/// Whether this kernel lets BPF programs attach with fentry at all (the breakdown's, the
/// hook floor's, which read no argument).
pub fn fentry_any() -> bool {
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
pub fn preempt_rt() -> bool {
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
pub fn hook_may_skip() -> bool {
    std::env::var("MT_ATTACH").as_deref() == Ok("fentry") && preempt_rt()
}

/// The tracer's counts for process `p` against the workload's own, per (cmd, flags, errno):
/// equal, with nothing missed; or, where the hook may skip, no row over, and the shortfall at
/// least the missed calls (`p` being the only traced process) and at most those plus the
/// hook's skipped runs (a call whose enter and exit were both skipped is seen only there).
/// Returns the shortfall.
pub fn assert_counts(report: &Value, p: &Value, mine: &Value) -> u64 {
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
pub fn sum_of(items: &Value, field: &str) -> u64 {
    items
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x[field].as_u64().unwrap())
        .sum()
}

/// Every call counted is a thread's: each cmd row's threads add up to its calls (at most, if
/// an exited thread's entry was dropped). Invalid cmds and flags share a thread counter.
pub fn assert_threads_add_up(report: &Value, p: &Value) {
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
pub static MACHINE: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// The tests that churn processes, and calibration: alone on the machine.
pub fn alone() -> std::sync::RwLockWriteGuard<'static, ()> {
    let g = MACHINE.write().unwrap_or_else(|e| e.into_inner());
    root();
    g
}

/// Every other test: root, and no churn alongside. Hold the guard for the whole test.
pub fn require_root() -> std::sync::RwLockReadGuard<'static, ()> {
    let g = MACHINE.read().unwrap_or_else(|e| e.into_inner());
    root();
    g
}

pub fn root() {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "these tests load eBPF programs: run them as root (`cargo xtask test` does)"
    );
}

/// Waits for `child` to exit, killing it after TIMEOUT so a hung tracer fails the test. Its
/// pipes are drained meanwhile: a report bigger than a pipe's buffer would block it forever.
/// Asserts an exposition in the text format passes `promtool check metrics`, its lint.
pub fn assert_lint_clean(text: &str) {
    let mut lint = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (the prometheus package)");
    lint.stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let lint = wait_output(lint);
    assert!(
        lint.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&lint.stdout),
        String::from_utf8_lossy(&lint.stderr)
    );
}

pub fn wait_output(mut child: Child) -> Output {
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
pub struct Tracer {
    pub child: Option<Child>,
    pub stderr: Option<thread::JoinHandle<String>>,
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
    pub fn start(args: &[&str]) -> Tracer {
        Tracer::spawn(tracer().args(args))
    }

    /// [`Tracer::start`], the tracer and its threads pinned to `cpu`.
    pub fn start_on_cpu(args: &[&str], cpu: usize) -> Tracer {
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
    pub fn spawn(cmd: &mut Command) -> Tracer {
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

    pub fn child(&mut self) -> &mut Child {
        self.child.as_mut().unwrap()
    }

    pub fn signal(&self, sig: i32) {
        unsafe { libc::kill(self.child.as_ref().unwrap().id() as i32, sig) };
    }

    /// Waits for the tracer to exit; returns its output with the whole of its stderr.
    pub fn finish(mut self) -> Output {
        let mut out = wait_output(self.child.take().unwrap());
        out.stderr = self.stderr.take().unwrap().join().unwrap().into_bytes();
        out
    }

    /// [`Tracer::finish`], which must succeed, and its last JSON report.
    pub fn report(self) -> (Output, Value) {
        let out = self.finish();
        let report = report_of(&out);
        (out, report)
    }
}

/// The last JSON report of a tracer run, which must have succeeded.
pub fn report_of(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    last_json_with(&String::from_utf8_lossy(&out.stdout), "processes")
}

/// Reads `stderr` in the background until a line starting with `prefix` (the tracer is
/// attached), and on to the end; the handle yields everything read.
pub fn wait_for_line(stderr: ChildStderr, prefix: &str) -> thread::JoinHandle<String> {
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
pub struct Workload {
    pub child: Child,
    pub pid: u32,
}

impl Workload {
    pub fn start(args: &[&str]) -> Workload {
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

    pub fn go(&mut self) {
        self.child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    }

    /// Kills it before its calls (not wanted after all).
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for it (reaping it, so the tracer sees it gone) and returns its accounting.
    pub fn finish(self) -> Value {
        let out = wait_output(self.child);
        assert!(out.status.success(), "workload failed: {:?}", out.status);
        last_json_with(&String::from_utf8_lossy(&out.stdout), "outcomes")
    }
}

/// Traces `traced` by pid (`-o json`) while `others` run alongside untraced; starts them all
/// together once the tracer is attached, waits for them, and returns the tracer's output (it
/// stops by itself when the traced processes are gone), its report, and each traced
/// workload's pid and own accounting.
pub fn trace_pids(
    traced: Vec<Workload>,
    others: Vec<Workload>,
) -> (Output, Value, Vec<(u32, Value)>) {
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

pub fn last_json_with(text: &str, key: &str) -> Value {
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .rfind(|v| v.get(key).is_some())
        .unwrap_or_else(|| panic!("no JSON with {key:?} in output:\n{text}"))
}

/// The workload's own count per (cmd, flags, errno).
pub fn workload_counts(w: &Value) -> BTreeMap<(i64, u64, String), u64> {
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
pub fn tracer_counts(p: &Value) -> BTreeMap<(i64, u64, String), u64> {
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

pub fn process(report: &Value, pid: u32) -> &Value {
    report["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pid"] == pid)
        .unwrap_or_else(|| panic!("pid {pid} not in report: {report}"))
}

pub fn cmd_row(p: &Value, cmd: i64, flags: u64) -> &Value {
    p["cmds"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["cmd_value"] == cmd && c["flags"] == flags)
        .unwrap_or_else(|| panic!("cmd {cmd} flags {flags} not in {p}"))
}

pub const MIX: &[&str] = &[
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

/// Runs `cmd` to the end with its output captured.
pub fn run(cmd: &mut Command) -> Output {
    wait_output(
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    )
}

/// Runs the tracer with `args` and expects the one-line error `needle`, exit status `code`: 2
/// for a usage error, 1 for a runtime failure.
pub fn expect_error(code: i32, cmd: &mut Command, needle: &str) {
    let out = run(cmd);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains(needle), "{stderr}");
    assert!(!stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"));
    assert!(out.stdout.is_empty());
}

/// A shell in a tmux session of its own (its own server socket), killed when dropped.
pub struct Tmux {
    pub sock: String,
}

impl Tmux {
    /// A `width` x `height` terminal with bash at its `mbt$ ` prompt.
    pub fn shell(width: u16, height: u16) -> Tmux {
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

    pub fn run(&self, args: &[&str]) -> String {
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
    pub fn keys(&self, line: &str) {
        self.run(&["send-keys", line, "Enter"]);
    }

    pub fn screen(&self) -> String {
        self.run(&["capture-pane", "-p"])
    }

    pub fn wait_for(&self, what: &str, ok: &dyn Fn(&str) -> bool) -> String {
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
    pub fn wait_for_prompt(&self) -> String {
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

/// Sets a sysctl (a path under /proc/sys) or another kernel setting file for the life of the
/// guard: e.g. kernel/pid_max, so pids wrap within a test.
pub struct Sysctl(String, String);

impl Sysctl {
    pub fn set(name: &str, v: u32) -> Sysctl {
        Sysctl::file(&format!("/proc/sys/{name}"), &v.to_string())
    }

    pub fn file(path: &str, v: &str) -> Sysctl {
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
pub fn calls_named(report: &Value, comm: &str) -> (BTreeMap<i64, u64>, u64) {
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

/// Builds a C test program of tests/urcu against Debian's liburcu (`cargo xtask test` installs
/// gcc and liburcu-dev), without frame pointers, as distributions build.
pub fn build_urcu_program(src: &str, bin: &str, flags: &[&str]) -> PathBuf {
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
pub struct UrcuWriters {
    pub prog: Child,
    pub out: BufReader<std::process::ChildStdout>,
    pub stdin: Option<std::process::ChildStdin>,
    pub pid: u32,
}

/// One writer's own figures: (function, thread name, tid, grace periods, ns).
pub type OwnWriter = (String, String, u64, u64, u64);

impl UrcuWriters {
    pub fn start(bin: &std::path::Path, args: &[&str]) -> UrcuWriters {
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
    pub fn run(&mut self) -> Vec<OwnWriter> {
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
    pub fn finish(mut self) {
        drop(self.stdin.take());
        assert!(self.prog.wait().unwrap().success());
    }
}

/// A child killed on drop (a failing test does not leave it running).
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A free TCP port on loopback (bound, read and released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GET `path` from `addr` over HTTP/1.0: (status code, body), or None when nothing answers.
pub fn http_get(addr: &str, path: &str, accept: &str) -> Option<(u32, String)> {
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

/// The count of `membarrier_calls_total` of the series whose labels include `labels`, or None
/// when there is no such series.
pub fn scraped_calls(metrics: &str, labels: &str) -> Option<u64> {
    let found: Vec<u64> = metrics
        .lines()
        .filter(|l| l.starts_with("membarrier_calls_total{") && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!found.is_empty()).then(|| found.iter().sum())
}
