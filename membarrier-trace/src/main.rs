//! The tracing loop: parses the command line, starts the collector (and the command to trace,
//! if any), and ticks until a signal, `--duration` or the traced processes' exit; then renders
//! the final report (text, JSON, folded stacks, or the dashboard throughout).

use std::{
    io::{IsTerminal as _, Write as _},
    os::fd::AsRawFd as _,
    process::ExitCode,
    sync::{Arc, atomic::AtomicUsize},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use membarrier_trace::render::tui::Feed as _;
use membarrier_trace::{
    app::calibrate,
    app::cli::{CalibrateCli, Cli, EXIT_STDOUT_CLOSED, Format, Sub, TraceArgs},
    app::exporter::Exporter,
    app::report::emit,
    app::session::{PROBE_EVERY, RETIRE_EVERY, Session},
    app::spawn::{command_log, spawn_traced, stop_child},
    collect::collector::{Collector, Options},
    collect::kernel::Features,
    hook::AttachMode,
    model::Model,
    preflight,
    render::text,
    store::Recorder,
};

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
        Ok(Cli {
            sub: Some(Sub::Symbolize(s)),
            ..
        }) => membarrier_trace::app::symbolize::run(&s).unwrap_or_else(fail),
        Ok(Cli {
            sub: Some(Sub::Record(r)),
            ..
        }) => run(r.trace, Some(r.file)).unwrap_or_else(fail),
        Ok(Cli {
            sub: Some(Sub::Report(r)),
            ..
        }) => membarrier_trace::app::report::run(&r).unwrap_or_else(fail),
        Ok(Cli {
            sub: Some(Sub::Replay(r)),
            ..
        }) => membarrier_trace::app::report::replay(&r).unwrap_or_else(fail),
        Ok(cli) => run(cli.trace, None).unwrap_or_else(fail),
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
            stack_rate: membarrier_trace_common::STACK_BUDGET * 100,
            debug_dirs: Vec::new(),
            hook_floor: None,
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

/// Long: the run's steps in their order (options, kernel, what is traced, load, attach, the
/// dashboard or the loop, the command's status), each a call; what stays inline is the
/// ordering between them that the comments explain.
fn run(mut cli: TraceArgs, record: Option<std::path::PathBuf>) -> Result<ExitCode> {
    check_options(&cli, record.is_some())?;
    // A recording prints nothing unless asked: it runs for an hour beside other work.
    let mut recorder = record.as_deref().map(Recorder::create).transpose()?;
    if recorder.is_some() && cli.output.is_none() {
        cli.output = Some(Format::None);
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
    let kernel = Features::of_this_kernel();
    let (rcu, stacks, off) = kernel_features(&cli, &kernel)?;
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
            stack_rate: cli
                .stack_rate
                .unwrap_or(membarrier_trace_common::STACK_BUDGET * 100),
            debug_dirs: cli.debug_dir.clone(),
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
    let what = traced_what(&cli);
    let how = collector.attach_source().describe();
    eprintln!("membarrier-trace: tracing {what} ({how}); Ctrl-C to stop");
    if let Some(e) = &exporter {
        eprintln!("membarrier-trace: metrics at http://{}/metrics", e.addr());
    }
    let record_every = Duration::from_secs_f64(cli.interval.unwrap_or(1.0));
    if let Some(r) = &mut recorder {
        r.begin(&recording_header(&cli, &collector, how, record_every))?;
        eprintln!("membarrier-trace: recording to {}", r.path().display());
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
        linger: (matches!(cli.output, Some(Format::None)) && cli.listen.is_some())
            .then(|| Duration::from_secs_f64(cli.keep_exited.unwrap_or(300.0))),
        linger_until: None,
        recorder,
        record_every,
        next_record: started + record_every,
        // Its program's name: the dashboard says it on one line.
        command: cli
            .command
            .first()
            .map(|c| c.rsplit('/').next().unwrap_or(c).to_string())
            .unwrap_or_default(),
    };
    let ran = if tui {
        run_dashboard(&mut session, &cli).map(|()| None)
    } else {
        run_loop(&mut session, &cli, started)
    };
    // A failure mid-run (a full disk under the recording, a map that cannot be read) also
    // stops the command we started: it is not left running untraced.
    if ran.is_err()
        && session.exit.is_none()
        && let Some(c) = session.child.as_mut()
    {
        stop_child(c, libc::SIGTERM);
    }
    if let Some(e) = ran? {
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
/// What a recording says of its run, first.
fn recording_header(
    cli: &TraceArgs,
    collector: &Collector,
    how: &str,
    every: Duration,
) -> membarrier_trace::store::Header {
    let (hostname, kernel) = collector.host();
    membarrier_trace::store::Header {
        format: membarrier_trace::store::FORMAT,
        version: membarrier_trace::app::cli::VERSION.to_string(),
        hostname: hostname.to_string(),
        kernel: kernel.to_string(),
        attach: if cli.no_breakdown {
            format!("{how} (no breakdown)")
        } else {
            how.to_string()
        },
        interval_ns: every.as_nanos() as u64,
        started_unix_ns: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
        args: std::env::args().collect(),
        machine: membarrier_trace::model::findings::Machine::read(),
    }
}

/// The command line's checks that need no kernel: root, the `--pid`s, and options that only
/// go together (a usage error, exit status 2).
fn check_options(cli: &TraceArgs, recording: bool) -> Result<()> {
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
    if cli.stack_rate.is_some() && !cli.stacks {
        usage!("--stack-rate sets the rate of --stacks, which is not given");
    }
    if cli.hook_floor.is_some_and(|p| p.exit_program().is_some())
        && cli.attach != AttachMode::Tracepoint
    {
        usage!("--hook-floor with a part runs on the syscall tracepoints: add --attach tracepoint");
    }
    if cli.listen.is_none() {
        if matches!(cli.output, Some(Format::None)) && !recording {
            usage!("-o none shows nothing without --listen ADDR");
        }
        if cli.by.is_some() || cli.keep_exited.is_some() {
            usage!("--by and --keep-exited shape the metrics of --listen ADDR, which is not given");
        }
    }
    Ok(())
}

/// What this kernel cannot do is turned off, each with one line: whether RCU writers and
/// `--stacks` stay on, and the lines.
fn kernel_features(cli: &TraceArgs, kernel: &Features) -> Result<(bool, bool, Vec<String>)> {
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
    Ok((rcu, stacks, off))
}

/// What is traced, for the line that says tracing started.
fn traced_what(cli: &TraceArgs) -> String {
    if !cli.command.is_empty() {
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
    }
}

/// The dashboard until the user quits; then the last report stays on the terminal as text.
fn run_dashboard(session: &mut Session, cli: &TraceArgs) -> Result<()> {
    let hook = session.collector.attach_source().describe();
    let source = if cli.no_breakdown {
        format!("{hook} (no breakdown)")
    } else {
        hook.to_string()
    };
    let interval = cli
        .interval
        .map_or(Duration::from_secs(1), Duration::from_secs_f64);
    let last = membarrier_trace::render::tui::run(session, interval, source)?;
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
    Ok(())
}

/// Reports on stdout (`-i`, and the final one) while the session ticks. Returns the error when
/// stdout was closed under us (tracing stops then).
fn run_loop(
    session: &mut Session,
    cli: &TraceArgs,
    started: Instant,
) -> Result<Option<std::io::Error>> {
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
    Ok(closed)
}
