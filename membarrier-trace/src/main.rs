//! The tracing loop: parses the command line, starts the collector (and the command to trace,
//! if any), and ticks until a signal, `--duration` or the traced processes' exit; then renders
//! the final report (text, JSON, folded stacks, or the dashboard throughout).

use std::{
    io::{IsTerminal as _, Read as _, Write as _},
    os::{
        fd::AsRawFd as _,
        unix::process::{CommandExt as _, ExitStatusExt as _},
    },
    path::PathBuf,
    process::{Child, Command, ExitCode},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use membarrier_trace::render::tui::{Feed as _, Stop};
use membarrier_trace::{
    app::calibrate,
    app::cli::{CalibrateCli, Cli, Format, Sub},
    app::exporter::Exporter,
    collect::collector::{Collector, Options},
    collect::kernel::Features,
    model::findings,
    model::{Model, Report},
    preflight,
    render::text,
};

/// How often exited processes' stats rows are moved out of the kernel: often enough that a box
/// starting thousands of processes a second does not fill the map in between.
const RETIRE_EVERY: Duration = Duration::from_millis(250);
/// When the stats map is filling: at 10,000 new processes a second, 500 rows a pass. (The
/// loop's tick is 50 ms: sooner would not be kept.)
const RETIRE_SOON: Duration = Duration::from_millis(50);
/// How often the traced processes' mappings are looked at for grace-period functions (dlopen).
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// A usage error found after parsing (options that do not go together): exit status 2, as
/// clap's own; every other error is a runtime failure, 1.
#[derive(Debug)]
struct Usage(String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

macro_rules! usage {
    ($($t:tt)*) => {
        return Err(Usage(format!($($t)*)).into())
    };
}

/// One line for a bad command line (clap's first line names the problem; its usage block
/// would bury it), exit status 2; --help and --version as clap prints them.
fn parse_or_exit<T: Parser>(args: &[String]) -> Result<T, ExitCode> {
    match T::try_parse_from(args) {
        Ok(cli) => Ok(cli),
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            let msg = e.to_string();
            let first = msg.lines().next().unwrap_or_default();
            let first = first.trim_start_matches("error: ");
            eprintln!("membarrier-trace: error: {first} (see --help)");
            Err(ExitCode::from(2))
        }
    }
}

/// An error as one line, whatever it carries; exit status 2 for a usage error, else 1.
fn fail(e: anyhow::Error) -> ExitCode {
    let msg = format!("{e:#}").replace('\n', " ");
    eprintln!("membarrier-trace: error: {msg}");
    ExitCode::from(if e.is::<Usage>() { 2 } else { 1 })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(calibrate::SCENARIO_ARG) {
        return calibrate::child(&args[2..]).map_or_else(fail, |()| ExitCode::SUCCESS);
    }
    match parse_or_exit::<Cli>(&args) {
        Ok(Cli {
            sub: Some(Sub::Calibrate(c)),
            ..
        }) => run_calibrate(c).map_or_else(fail, |()| ExitCode::SUCCESS),
        Ok(cli) => run(cli).unwrap_or_else(fail),
        Err(code) => code,
    }
}

fn run_calibrate(cli: CalibrateCli) -> Result<()> {
    if matches!(cli.output, Format::None | Format::Folded) {
        usage!("calibrate prints a table (text) or JSON: -o none or folded would not show it");
    }
    preflight::check_root()?;
    let tracefs = preflight::tracefs()?;
    let mut collector = Collector::load(
        &tracefs.path,
        &Options {
            pids: Vec::new(),
            follow_forks: true,
            breakdown: true,
            attach: cli.attach,
            rcu: false,
            rcu_funcs: Vec::new(),
            stacks: false,
            hook_floor: false,
            kernel: Features::of_this_kernel(),
        },
    )?;
    for note in tracefs.note().into_iter().chain(collector.start()?) {
        eprintln!("membarrier-trace: {note}");
    }
    let cpus = thread::available_parallelism().map_or(1, |n| n.get());
    let scenarios = calibrate::scenarios(cpus, cli.calls);
    let rows = calibrate::run(&mut collector, &scenarios, |name| {
        eprintln!("membarrier-trace: calibrate: {name}");
    })?;
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let about = format!(
        "Linux {}, {cpus} CPUs, {}",
        kernel.trim(),
        collector.attach_source().describe()
    );
    let mut out = std::io::stdout().lock();
    match cli.output {
        Format::Json => writeln!(
            out,
            "{}",
            serde_json::json!({"host": about, "calibration": rows})
        )?,
        Format::Text | Format::None | Format::Folded => {
            write!(out, "{}", text::calibration_text(&rows, &about))?
        }
    }
    Ok(())
}

/// SIGINT or SIGTERM, whichever came (0 until one does).
fn install_signals() -> Result<Arc<AtomicUsize>> {
    let got = Arc::new(AtomicUsize::new(0));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_usize(sig, Arc::clone(&got), sig as usize)
            .context("installing signal handlers")?;
    }
    Ok(got)
}

/// Writes a report to stdout. An error (the reader went away: EPIPE) ends the run.
fn emit(format: Format, report: &Report) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    match format {
        Format::Text => writeln!(out, "{}", text::text(report))?,
        Format::Json => writeln!(out, "{}", text::json(report))?,
        Format::Folded => write!(out, "{}", text::folded(report))?,
        Format::None => return Ok(()),
    };
    out.flush()
}

/// Exit status when stdout is closed under us: what a shell reports for a process killed by
/// SIGPIPE (128 + 13), which is what the tracer would have been without Rust's SIG_IGN.
const EXIT_STDOUT_CLOSED: u8 = 141;

fn run(cli: Cli) -> Result<ExitCode> {
    preflight::check_root()?;
    for &pid in &cli.pids {
        preflight::check_pid(pid)?;
        if preflight::is_kernel_thread(pid) {
            eprintln!(
                "membarrier-trace: warning: pid {pid} is a kernel thread; kernel threads make no system calls, so it will show no calls"
            );
        }
    }
    if matches!(cli.output, Some(Format::Folded)) && !cli.stacks {
        usage!("-o folded prints stacks: add --stacks");
    }
    if cli.listen.is_none() {
        if matches!(cli.output, Some(Format::None)) {
            usage!("-o none shows nothing without --listen ADDR");
        }
        if cli.by.is_some() || cli.keep_exited.is_some() {
            usage!("--by and --keep-exited shape the metrics of --listen ADDR, which is not given");
        }
    }
    let exporter = cli
        .listen
        .as_deref()
        .map(|addr| {
            let keep = Duration::from_secs_f64(cli.keep_exited.unwrap_or(300.0));
            Exporter::bind(addr, cli.by.unwrap_or_default(), keep)
        })
        .transpose()?;
    let tracefs = preflight::tracefs()?;
    let signal = install_signals()?;
    let exits = if cli.pids.is_empty() {
        None
    } else {
        Some(preflight::ExitWatch::new(&cli.pids)?)
    };
    let follow = !cli.command.is_empty();
    // What this kernel cannot do is turned off, each with one line.
    let kernel = Features::of_this_kernel();
    let mut off = Vec::new();
    let rcu = !cli.no_rcu && kernel.attach_cookie;
    if !cli.no_rcu && !rcu {
        off.push(format!(
            "RCU writers off: their uprobes need bpf_get_attach_cookie (Linux 5.15), this is {}",
            kernel.name()
        ));
    }
    let stacks = cli.stacks && kernel.task_pt_regs;
    if cli.stacks && !stacks {
        if matches!(cli.output, Some(Format::Folded)) {
            bail!(
                "-o folded needs --stacks, which needs bpf_task_pt_regs (Linux 5.15): this is {}",
                kernel.name()
            );
        }
        off.push(format!(
            "--stacks off: it needs bpf_task_pt_regs (Linux 5.15), this is {}",
            kernel.name()
        ));
    }
    let mut collector = Collector::load(
        &tracefs.path,
        &Options {
            pids: cli.pids.clone(),
            follow_forks: follow,
            breakdown: !cli.no_breakdown,
            attach: cli.attach,
            rcu,
            rcu_funcs: cli.rcu_func.clone(),
            stacks,
            hook_floor: cli.hook_floor,
            kernel,
        },
    )?;

    let tui = cli.output.is_none() && std::io::stdout().is_terminal();
    // Under the dashboard, a command's output would scribble over it and its reads would take
    // our keys: it gets no stdin, and its output goes to a log named on exit.
    let command_log = (tui && follow).then(command_log).transpose()?;
    let mut child = None;
    let notes = if follow {
        let (c, notes) = spawn_traced(
            &cli.command,
            command_log.as_ref().map(|(f, _)| f),
            tracefs.outer_ns.as_ref().map(|fd| fd.as_raw_fd()),
            &mut collector,
        )?;
        child = Some(c);
        notes
    } else {
        collector.start()?
    };
    for note in tracefs.note().into_iter().chain(off).chain(notes) {
        eprintln!("membarrier-trace: {note}");
    }
    let what = if follow {
        format!("`{}` and its children", cli.command.join(" "))
    } else if cli.pids.is_empty() {
        "all processes".to_string()
    } else {
        format!(
            "pid {}",
            cli.pids
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    let how = collector.attach_source().describe();
    eprintln!("membarrier-trace: tracing {what} ({how}); Ctrl-C to stop");
    if let Some(e) = &exporter {
        eprintln!("membarrier-trace: metrics at http://{}/metrics", e.addr());
    }

    let started = Instant::now();
    let mut session = Session {
        collector,
        signal,
        deadline: cli.duration.map(|d| started + Duration::from_secs_f64(d)),
        child,
        exits,
        next_retire: started + RETIRE_EVERY,
        next_probe: started + PROBE_EVERY,
        probe_pids: (!follow).then(|| cli.pids.clone()),
        quiet_notes: tui,
        late_notes: Vec::new(),
        model: Model::default(),
        exporter,
        exit: None,
        note: None,
        linger: matches!(cli.output, Some(Format::None))
            .then(|| Duration::from_secs_f64(cli.keep_exited.unwrap_or(300.0))),
        linger_until: None,
        // Its program's name: the dashboard says it on one line.
        command: cli
            .command
            .first()
            .map(|c| c.rsplit('/').next().unwrap_or(c).to_string())
            .unwrap_or_default(),
    };
    if tui {
        let hook = session.collector.attach_source().describe();
        let source = if cli.no_breakdown {
            format!("{hook} (no breakdown)")
        } else {
            hook.to_string()
        };
        let interval = cli
            .interval
            .map_or(Duration::from_secs(1), Duration::from_secs_f64);
        let last = membarrier_trace::render::tui::run(&mut session, interval, source)?;
        // Quitting the dashboard also stops a command we started.
        if session.exit.is_none()
            && let Some(c) = session.child.as_mut()
        {
            session.exit = Some(stop_child(c, libc::SIGTERM));
        }
        // The figures stay on the terminal after the screen is gone.
        let last = match last {
            Some(r) => r,
            None => session.final_report()?,
        };
        if emit(Format::Text, &last).is_err() {
            eprintln!("membarrier-trace: stdout closed: no summary printed");
        }
    } else {
        let format = cli.output.unwrap_or(Format::Text);
        let interval = cli.interval.map(Duration::from_secs_f64);
        let mut next_report = interval.map(|i| started + i);
        let mut closed = None;
        while session.tick()?.is_none() {
            if let (Some(next), Some(i)) = (next_report, interval)
                && Instant::now() >= next
            {
                if let Err(e) = emit(format, &session.report()?) {
                    closed = Some(e);
                    break;
                }
                next_report = Some(next + i);
            }
            // Short ticks keep Ctrl-C and process exit responsive; the kernel does the counting.
            let mut tick = Duration::from_millis(50);
            for t in [session.deadline, next_report].into_iter().flatten() {
                tick = tick.min(t.saturating_duration_since(Instant::now()));
            }
            thread::sleep(tick);
        }
        if closed.is_none()
            && let Err(e) = emit(format, &session.final_report()?)
        {
            closed = Some(e);
        }
        if let Some(e) = closed {
            // Detach now (dropping the collector), and stop a command we started.
            if session.exit.is_none()
                && let Some(c) = session.child.as_mut()
            {
                stop_child(c, libc::SIGTERM);
            }
            drop(session);
            eprintln!("membarrier-trace: stdout closed ({e}): stopped tracing");
            return Ok(ExitCode::from(EXIT_STDOUT_CLOSED));
        }
    }
    for note in session.late_notes.iter().chain(&session.note) {
        eprintln!("membarrier-trace: {note}");
    }
    if let Some((_, log)) = &command_log {
        eprintln!(
            "membarrier-trace: the command's output is in {}",
            log.display()
        );
    }
    Ok(session.exit.unwrap_or(ExitCode::SUCCESS))
}

/// A tracing run: the collector and everything that can end it.
struct Session {
    collector: Collector,
    signal: Arc<AtomicUsize>,
    deadline: Option<Instant>,
    child: Option<Child>,
    exits: Option<preflight::ExitWatch>,
    next_retire: Instant,
    /// When to look for grace-period functions newly mapped by the traced processes.
    next_probe: Instant,
    /// Whose mappings to look at: the `--pid`s; None: the traced processes in the kernel's
    /// table (a command and its children). Empty system-wide (the installed libraries are).
    probe_pids: Option<Vec<u32>>,
    /// Under the dashboard notes wait for it to close (stderr would scribble over it).
    quiet_notes: bool,
    late_notes: Vec<String>,
    model: Model,
    /// `--listen`: answered from the loop, at each tick.
    exporter: Option<Exporter>,
    /// Set when tracing ended with a status to exit with (the command's).
    exit: Option<ExitCode>,
    /// Why tracing ended, when the user should be told.
    note: Option<String>,
    /// The program of `-- COMMAND`.
    command: String,
    /// `-o none --listen`: how long to go on serving the metrics once the traced processes are
    /// gone (`--keep-exited`), and until when.
    linger: Option<Duration>,
    linger_until: Option<Instant>,
}

impl Session {
    /// Why tracing should end because what it traces is gone: the command exited (its status
    /// kept to exit with), or every `--pid` did.
    fn traced_ended(&mut self) -> Result<Option<String>> {
        if let Some(c) = self.child.as_mut()
            && let Some(status) = c.try_wait().context("waiting for the command")?
        {
            self.exit = Some(exit_code(status));
            let how = match (status.code(), status.signal()) {
                (Some(code), _) => format!("exited with status {code}"),
                (None, Some(sig)) => format!("was killed by signal {sig}"),
                _ => "exited".into(),
            };
            let name = text::printable(&self.command);
            return Ok(Some(format!("`{name}` {how}")));
        }
        if self
            .exits
            .as_ref()
            .is_some_and(preflight::ExitWatch::all_exited)
        {
            let why = "every traced process has exited";
            self.note = Some(why.into());
            return Ok(Some(why.into()));
        }
        Ok(None)
    }

    /// The loop's tick: answers a waiting scrape, retires the exited processes and probes new
    /// mappings when their time has come, and says whether tracing should end, and why.
    fn tick(&mut self) -> Result<Option<Stop>> {
        if let Some(e) = &mut self.exporter {
            e.serve(|| self.collector.snapshot(false))?;
        }
        let sig = self.signal.load(Ordering::SeqCst) as i32;
        if sig != 0 {
            if let Some(c) = self.child.as_mut() {
                self.exit = Some(stop_child(c, sig));
            }
            return Ok(Some(Stop::Leave));
        }
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(Some(Stop::Linger("--duration is over".into())));
        }
        if let Some(why) = self.traced_ended()? {
            let Some(keep) = self.linger else {
                return Ok(Some(Stop::Linger(why)));
            };
            // A plain exporter: the calls made since the last scrape reach Prometheus only if
            // it can scrape once more.
            let until = *self.linger_until.get_or_insert_with(|| {
                eprintln!(
                    "membarrier-trace: {why}; still serving the final metrics until SIGTERM, \
                     for at most {:.0} s (--keep-exited)",
                    keep.as_secs_f64()
                );
                Instant::now() + keep
            });
            if Instant::now() >= until {
                return Ok(Some(Stop::Linger(why)));
            }
        }
        if Instant::now() >= self.next_retire {
            self.collector.retire_exited()?;
            let every = if self.collector.rows_filling() {
                RETIRE_SOON
            } else {
                RETIRE_EVERY
            };
            self.next_retire = Instant::now() + every;
        }
        if Instant::now() >= self.next_probe {
            let pids = match &self.probe_pids {
                Some(pids) => pids.clone(),
                None => self.collector.traced_pids(),
            };
            for note in self.collector.probe_new_mappings(pids) {
                if self.quiet_notes {
                    self.late_notes.push(note);
                } else {
                    eprintln!("membarrier-trace: {note}");
                }
            }
            self.next_probe = Instant::now() + PROBE_EVERY;
        }
        Ok(None)
    }
}

impl membarrier_trace::render::tui::Feed for Session {
    fn stopped(&mut self) -> Result<Option<Stop>> {
        self.tick()
    }

    fn report(&mut self) -> Result<Report> {
        Ok(findings::judged(
            self.model.report(&self.collector.snapshot(false)?),
        ))
    }

    fn final_report(&mut self) -> Result<Report> {
        let report = self.model.report(&self.collector.snapshot(true)?);
        self.collector.detach();
        Ok(findings::judged(report))
    }
}

/// A new file for a command's output, in the temporary directory: created with O_EXCL under a
/// random name, mode 0600, so no other user can choose it, plant a file or a symlink there, or
/// read it. (The name was once `membarrier-trace-PID.log`: anyone could plant a link there for
/// root to follow and truncate.)
fn command_log() -> Result<(std::fs::File, PathBuf)> {
    let dir = std::env::temp_dir();
    let (file, path) = tempfile::Builder::new()
        .prefix("membarrier-trace-")
        .suffix(".log")
        .tempfile_in(&dir)
        .and_then(|f| f.keep().map_err(|e| e.error))
        .with_context(|| format!("creating the command's log in {}", dir.display()))?;
    Ok((file, path))
}

/// Starts `argv` held just before exec, so its pid is in the filter and the programs are
/// attached before its first instruction runs (library constructors call membarrier too). It
/// runs in `outer_ns`, the mount namespace we were started in, when we left it for tracefs.
fn spawn_traced(
    argv: &[String],
    log: Option<&std::fs::File>,
    outer_ns: Option<i32>,
    collector: &mut Collector,
) -> Result<(Child, Vec<String>)> {
    // Both pipes close on exec, and on every return from here: no descriptor leaks on an
    // error path.
    let (go_r, go_w) = std::io::pipe().context("pipe")?;
    let (mut pid_r, pid_w) = std::io::pipe().context("pipe")?;
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    if let Some(f) = log {
        cmd.stdin(std::process::Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f.try_clone()?);
    }
    // Entering a mount namespace moves to its root: the command goes back to our directory
    // there (`-- ./prog` and relative paths in its arguments), resolved in that namespace.
    let cwd = outer_ns
        .and_then(|_| std::env::current_dir().ok())
        .and_then(|d| std::ffi::CString::new(d.into_os_string().into_encoded_bytes()).ok());
    let (go_r_fd, go_w_fd, pid_w_fd) = (go_r.as_raw_fd(), go_w.as_raw_fd(), pid_w.as_raw_fd());
    // SAFETY: only async-signal-safe calls (setns, chdir, close, getpid, write, read) between
    // fork and exec, on descriptors that stay open in the parent until spawn() returns.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(fd) = outer_ns
                && libc::setns(fd, libc::CLONE_NEWNS) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(dir) = &cwd
                && libc::chdir(dir.as_ptr()) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // Our copy of the go pipe's write end closed: the pipe then ends (EOF) when the
            // tracer closes its own without a go.
            libc::close(go_w_fd);
            let pid = libc::getpid();
            libc::write(pid_w_fd, (&raw const pid).cast(), 4);
            let mut b = 0u8;
            let mut n;
            loop {
                n = libc::read(go_r_fd, (&raw mut b).cast(), 1);
                if n >= 0 || *libc::__errno_location() != libc::EINTR {
                    break;
                }
            }
            // No go (the pipe closed without it): tracing could not start, and the command
            // must not run untraced, unwaited for, after we exit.
            if n != 1 {
                return Err(std::io::Error::from_raw_os_error(libc::ECANCELED));
            }
            Ok(())
        });
    }
    // spawn() returns only once the child has exec'd, which it does after our go: run it aside.
    // The pid pipe's write end goes with it, so a spawn that fails before the fork ends our
    // read below.
    let spawner = thread::spawn(move || {
        let r = cmd.spawn();
        drop(pid_w);
        r
    });
    let mut pid = [0u8; 4];
    let started = match pid_r.read_exact(&mut pid) {
        Ok(()) => {
            drop(pid_r);
            let pid = i32::from_ne_bytes(pid) as u32;
            collector.add_pid(pid).and_then(|()| {
                // An executable with liburcu linked in: probed before its first grace period.
                if let Some(exe) = in_path(&argv[0]) {
                    collector.probe_file(&exe);
                }
                collector.start()
            })
        }
        Err(_) => Ok(Vec::new()),
    };
    if started.is_ok() {
        let _ = (&go_w).write_all(&[1]);
    }
    drop(go_w);
    drop(go_r);
    let child = spawner
        .join()
        .map_err(|_| anyhow::anyhow!("spawner thread panicked"))?;
    // Tracing's error first: the command was then stopped before it ran.
    let started = started?;
    let child = child.with_context(|| format!("cannot run `{}`", argv[0]))?;
    Ok((child, started))
}

/// Where exec finds `program`: itself when it has a slash, else the first executable of that
/// name in $PATH.
fn in_path(program: &str) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    if program.contains('/') {
        return Some(program.into());
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Passes the signal we got on to the command and waits a little for it to end.
fn stop_child(child: &mut Child, sig: i32) -> ExitCode {
    if let (Some(pid), Some(sig)) = (
        rustix::process::Pid::from_raw(child.id() as i32),
        rustix::process::Signal::from_named_raw(sig),
    ) {
        let _ = rustix::process::kill_process(pid, sig);
    }
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        if let Ok(Some(status)) = child.try_wait() {
            return exit_code(status);
        }
        thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "membarrier-trace: pid {} still running after the signal; leaving it",
        child.id()
    );
    ExitCode::from(128 + sig as u8)
}

/// The command's exit status, shell style: its code, or 128 + the signal that killed it.
fn exit_code(status: std::process::ExitStatus) -> ExitCode {
    match (status.code(), status.signal()) {
        (Some(c), _) => ExitCode::from(c as u8),
        (None, Some(s)) => ExitCode::from(128 + s as u8),
        _ => ExitCode::FAILURE,
    }
}
