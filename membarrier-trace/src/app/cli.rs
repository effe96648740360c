//! The command line: what `membarrier-trace --help`, the man page and the shell completions
//! describe (the `membarrier-trace-docs` binary writes the last two from it).

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{collect::rcu::CustomFunc, hook::AttachMode, render::prometheus::By};

/// `--version`: the version and the commit it was built from.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("MEMBARRIER_TRACE_COMMIT"),
    ")"
);

/// Exit statuses, for `--help` and the man page.
pub const EXIT_CODES: &[(&str, &str)] = &[
    (
        "0",
        "the run ended (Ctrl-C, SIGTERM, --duration, or every --pid exited)",
    ),
    (
        "1",
        "a runtime failure: not root, no such process, the kernel refused a program, the address to listen on is taken, the command cannot be run",
    ),
    (
        "2",
        "a usage error: a bad option or value, or options that do not go together",
    ),
    ("141", "stdout was closed (the reader of a pipe went away)"),
    (
        "N",
        "with -- COMMAND: the command's own exit status (128 + the signal, if one killed it)",
    ),
];

/// Exit status when stdout is closed under us: what a shell reports for a process killed by
/// SIGPIPE (128 + 13), which is what the tracer would have been without Rust's SIG_IGN.
pub const EXIT_STDOUT_CLOSED: u8 = 141;

fn exit_status() -> String {
    let mut s = String::from("Exit status:");
    for (code, what) in EXIT_CODES {
        s += &format!("\n  {code:<5}{what}");
    }
    s
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Sub {
    /// Measure what each cmd costs on this host: latency and IPIs per cmd and scenario, traced
    /// as a run traces them.
    Calibrate(CalibrateCli),
    /// Name the code a saved JSON report (`-o json`) left unnamed, from the build IDs and
    /// module offsets of its frames and callers, on a machine that has the symbols: debug files
    /// (--debug-dir, /usr/lib/debug/.build-id, debuginfod when DEBUGINFOD_URLS is set) or the
    /// same build of the module. Prints the documents back, one per line.
    Symbolize(SymbolizeCli),
    /// Trace as a run does, and keep what it sees in FILE for `report` and `replay`: one entry
    /// per interval (-i, default 1 s), what changed since the one before, deflated. A recording
    /// cut off (SIGKILL, a full disk) reads back up to its last whole interval. Prints nothing
    /// unless -o asks; `-- COMMAND` exits with the command's status, as a run does.
    Record(RecordCli),
    /// Report a recording: the documents a live run prints (text, JSON, folded stacks) over
    /// the whole run or a window of it; or draw it (--svg).
    Report(ReportCli),
    /// The dashboard over a recording: Left/Right move one interval, PageUp/PageDown ten,
    /// Home/End to the first and the last, `g` to a time (seconds from the start, or RFC 3339);
    /// every key of the live dashboard works too.
    Replay(ReplayCli),
}

/// `membarrier-trace replay`'s options.
#[derive(Args, Debug)]
pub struct ReplayCli {
    /// The recording (`membarrier-trace record FILE`).
    #[arg(value_name = "FILE")]
    pub file: std::path::PathBuf,
}

/// `membarrier-trace record`'s options.
#[derive(Args, Debug)]
pub struct RecordCli {
    /// The recording to write: a new file (an existing one is never written over).
    #[arg(value_name = "FILE")]
    pub file: std::path::PathBuf,
    #[command(flatten)]
    pub trace: TraceArgs,
}

/// `membarrier-trace report`'s options.
#[derive(Args, Debug)]
pub struct ReportCli {
    /// The recording (`membarrier-trace record FILE`).
    #[arg(value_name = "FILE")]
    pub file: std::path::PathBuf,
    #[arg(short, long, value_enum, default_value_t = Format::Text)]
    pub output: Format,
    /// The window's start: seconds from the start of tracing, or a wall-clock time (RFC 3339,
    /// e.g. 2026-12-06T02:30:00Z). Default: the start.
    #[arg(long, value_name = "T", value_parser = crate::store::When::parse)]
    pub from: Option<crate::store::When>,
    /// The window's end, as --from. Default: the end.
    #[arg(long, value_name = "T", value_parser = crate::store::When::parse)]
    pub to: Option<crate::store::When>,
    /// Only these processes (repeatable).
    #[arg(short, long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,
    /// Draw the window instead: per busy (process, cmd) and RCU writer, a latency heatmap over
    /// time with p50/p99 lines and the call rate; with stacks recorded, a flame graph of the
    /// callers. One self-contained SVG file (a new file).
    #[arg(long, value_name = "OUT.svg")]
    pub svg: Option<std::path::PathBuf>,
}

/// `membarrier-trace symbolize`'s options.
#[derive(Args, Debug)]
pub struct SymbolizeCli {
    /// The report: one JSON document per line, as `-o json` (with `-i`) writes; `-` for stdin.
    #[arg(value_name = "FILE")]
    pub file: std::path::PathBuf,
    /// Also look for debug files here, before /usr/lib/debug (repeatable): a tree of
    /// `.build-id/xx/yyyy.debug`, as -dbgsym packages install.
    #[arg(long, value_name = "DIR")]
    pub debug_dir: Vec<std::path::PathBuf>,
}

/// Exact per-process accounting of membarrier(2) calls: counts, errors and in-kernel latency
/// per process and cmd, measured with eBPF on the syscall tracepoints.
///
/// `membarrier-trace calibrate` measures what each cmd costs on this host, `membarrier-trace
/// symbolize` names a saved report's code, `record`, `report` and `replay` keep a run in a file and
/// look at it later (see their --help).
#[derive(Parser, Debug)]
#[command(name = "membarrier-trace", version = VERSION, about, after_long_help = exit_status())]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct Cli {
    #[command(subcommand)]
    pub sub: Option<Sub>,
    #[command(flatten)]
    pub trace: TraceArgs,
}

/// The tracer's options: a run's, and `record`'s.
#[derive(Args, Debug)]
pub struct TraceArgs {
    /// Trace only this process (repeatable); filtered in the kernel.
    #[arg(short, long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,
    /// Stop after this many seconds.
    #[arg(short, long, value_name = "SECS", value_parser = duration_secs, allow_negative_numbers = true)]
    pub duration: Option<f64>,
    /// Print a summary every SECS seconds (JSON: one document per line); the dashboard's refresh
    /// interval (default 1; at least 0.01).
    #[arg(short, long, value_name = "SECS", value_parser = interval_secs, allow_negative_numbers = true)]
    pub interval: Option<f64>,
    /// Only count calls and their latency: leave out the grace-period, IPI, handler and mutex
    /// probes (they run on every context switch, IPI and lock contention on the box).
    #[arg(long)]
    pub no_breakdown: bool,
    /// Leave out userspace RCU writers: no uprobes on liburcu's synchronize_rcu.
    #[arg(long)]
    pub no_rcu: bool,
    /// Each call's user stack, unwound from the code's .eh_frame (frame pointers not needed):
    /// calls and latency per stack under each cmd. Every call's stack up to 10,000 calls a
    /// second per CPU; beyond, a sample (up to 5,000 a second), and those stacks' counts are
    /// estimates.
    #[arg(long)]
    pub stacks: bool,
    /// With --stacks: calls a second per CPU whose stacks are all taken before sampling starts
    /// (counted in 10 ms windows, so a multiple of 100). Lower it to spend less on stacks.
    /// Default 10,000.
    #[arg(long, value_name = "CALLS", value_parser = stack_rate)]
    pub stack_rate: Option<u64>,
    /// Benchmarks only (`cargo xtask bench`): attach the hook with programs that do nothing,
    /// to measure the hook's own cost; nothing is counted. With a PART (`--attach tracepoint`
    /// only), the exit program does that one part of the per-call path.
    #[arg(long, hide = true, value_enum, num_args = 0..=1, default_missing_value = "empty")]
    pub hook_floor: Option<crate::hook::FloorPart>,
    /// Also look for split debug files here to name code in stripped binaries (repeatable),
    /// before /usr/lib/debug: a tree of `.build-id/xx/yyyy.debug`, as -dbgsym packages install.
    #[arg(long, value_name = "DIR")]
    pub debug_dir: Vec<std::path::PathBuf>,
    /// Also count the grace periods of this function (repeatable): e.g. QEMU's
    /// synchronize_rcu, DPDK's rte_rcu_qsbr_synchronize.
    #[arg(long, value_name = "PATH:SYMBOL")]
    pub rcu_func: Vec<CustomFunc>,
    /// How to hook the syscall: fentry on its entry function (only membarrier calls pay),
    /// the syscall tracepoints (work everywhere; every syscall on the box takes the slow path
    /// while attached), or auto: fentry where the kernel allows it.
    #[arg(long, value_enum, default_value_t = AttachMode::Auto)]
    pub attach: AttachMode,
    /// Output format; without it, a live dashboard when stdout is a terminal, else text.
    /// `none`: nothing on stdout (with --listen: a plain exporter).
    #[arg(short, long, value_enum)]
    pub output: Option<Format>,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9479), beside any
    /// output. Unauthenticated: keep it on loopback or the fleet's scrape network.
    /// `:PORT` listens on every address (IPv6 and IPv4), as node_exporter's does.
    #[arg(long, value_name = "ADDR", value_parser = listen_addr)]
    pub listen: Option<String>,
    /// Metrics per process (pid and comm labels) or per process name (comm only: fewer series,
    /// and exited processes stay counted in their name's series).
    /// [default: pid]
    #[arg(long, value_enum)]
    pub by: Option<By>,
    /// With --by pid, an exited process's series leave the metrics this long after it exited
    /// [default: 300].
    #[arg(long, value_name = "SECS", value_parser = duration_secs, allow_negative_numbers = true)]
    pub keep_exited: Option<f64>,
    /// Run COMMAND, trace it and the processes it starts, stop when it exits and exit with its
    /// status.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Format {
    Text,
    Json,
    None,
    /// With --stacks: folded stacks for flame-graph tools (flamegraph.pl, inferno, speedscope),
    /// `comm;CMD;outermost;...;innermost calls`, one line per stack.
    Folded,
}

/// Longest `--duration`/`--interval`: a year, far beyond any run, and well inside what a
/// `Duration` and `Instant` arithmetic hold.
const MAX_SECS: f64 = 366.0 * 86400.0;
/// Shortest `--interval`: below it the tracer would spend its time reading maps.
const MIN_INTERVAL_SECS: f64 = 0.01;

pub fn secs(s: &str, min: f64) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= min && v > 0.0 && v <= MAX_SECS => Ok(v),
        Ok(v) if v.is_finite() && v > MAX_SECS => Err(format!(
            "`{s}` seconds is too long: at most {MAX_SECS} (a year)"
        )),
        Ok(v) if v > 0.0 && v < min => Err(format!("`{s}` is too short: at least {min} seconds")),
        _ => Err(format!("`{s}` is not a positive number of seconds")),
    }
}

pub fn duration_secs(s: &str) -> Result<f64, String> {
    secs(s, 0.0)
}

pub fn interval_secs(s: &str) -> Result<f64, String> {
    secs(s, MIN_INTERVAL_SECS)
}

/// `--stack-rate`: from 100 (one call's stack per 10 ms window) to 1,000,000 a second, in 100s.
pub fn stack_rate(s: &str) -> Result<u64, String> {
    let rate: u64 = s
        .parse()
        .map_err(|_| format!("not a whole number of calls: {s}"))?;
    if !(100..=1_000_000).contains(&rate) || !rate.is_multiple_of(100) {
        return Err(format!(
            "{rate}: give a multiple of 100 from 100 to 1000000 (the budget is counted per 10 ms)"
        ));
    }
    Ok(rate)
}

/// `membarrier-trace calibrate`'s options.
#[derive(Args, Debug)]
pub struct CalibrateCli {
    /// Calls of each cheap scenario (the IPI scenarios make a quarter as many, GLOBAL 20).
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(4..=10_000_000))]
    pub calls: u64,
    /// How to hook the syscall (as for tracing).
    #[arg(long, value_enum, default_value_t = AttachMode::Auto)]
    pub attach: AttachMode,
    #[arg(short, long, value_enum, default_value_t = Format::Text)]
    pub output: Format,
}

/// `--listen`: HOST:PORT as given, or `:PORT` (every address).
fn listen_addr(s: &str) -> Result<String, String> {
    let port = s.rsplit_once(':').map(|(_, p)| p);
    match port.map(str::parse::<u16>) {
        Some(Ok(_)) if !s.starts_with(':') || s.len() > 1 => Ok(s.to_string()),
        _ => Err(format!(
            "`{s}` is not HOST:PORT or :PORT (e.g. 127.0.0.1:9479, or :9479 for every address)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn listen_addresses() {
        assert_eq!(listen_addr(":9479").as_deref(), Ok(":9479"));
        assert_eq!(
            listen_addr("127.0.0.1:9479").as_deref(),
            Ok("127.0.0.1:9479")
        );
        assert_eq!(listen_addr("[::1]:9479").as_deref(), Ok("[::1]:9479"));
        for bad in ["9479", ":", ":x", "host:", "host:70000"] {
            assert!(listen_addr(bad).is_err(), "{bad}");
        }
    }
}
