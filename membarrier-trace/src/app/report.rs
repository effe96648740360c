//! `membarrier-trace report FILE`: a recording's documents over the whole run or a window, as
//! a live run prints them (text, JSON, folded stacks), or drawn (`--svg`).

use std::{io::Write as _, process::ExitCode};

use anyhow::{Result, bail};

use super::cli::{EXIT_STDOUT_CLOSED, Format, ReplayCli, ReportCli};
use crate::{
    model::{Model, Report, Snapshot, findings},
    render::{svg, text},
    store::{Recording, When, delta},
};

/// Writes a report to stdout. An error (the reader went away: EPIPE) is the caller's to end on.
pub fn emit(format: Format, report: &Report) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    match format {
        Format::Text => writeln!(out, "{}", text::text(report))?,
        Format::Json => writeln!(out, "{}", text::json(report))?,
        Format::Folded => write!(out, "{}", text::folded(report))?,
        Format::None => return Ok(()),
    };
    out.flush()
}

pub fn run(cli: &ReportCli) -> Result<ExitCode> {
    let rec = Recording::open(&cli.file)?;
    if let Some(note) = rec.note() {
        eprintln!("membarrier-trace: {note}");
    }
    let (first, last) = bounds(&rec, cli.from, cli.to)?;
    let snap = window(&rec, first, last, &cli.pids);
    if let Some(out) = &cli.svg {
        svg::write(&rec, first, last, &cli.pids, &snap, out)?;
        return Ok(ExitCode::SUCCESS);
    }
    if matches!(cli.output, Format::Folded) && snap.stacks.is_none() {
        bail!("-o folded prints stacks: this recording was made without --stacks");
    }
    // Judged by the recorded machine's CPUs, not this one's.
    let report = findings::judged_on(Model::default().report(&snap), &rec.header.machine);
    if let Err(e) = emit(cli.output, &report) {
        eprintln!("membarrier-trace: stdout closed ({e})");
        return Ok(ExitCode::from(EXIT_STDOUT_CLOSED));
    }
    Ok(ExitCode::SUCCESS)
}

/// The window `from`..`to` as interval indices: the state it starts from (None: the start of
/// tracing) and the interval it ends with.
pub fn bounds(
    rec: &Recording,
    from: Option<When>,
    to: Option<When>,
) -> Result<(Option<usize>, usize)> {
    let Some(last) = rec.intervals.len().checked_sub(1) else {
        bail!("the recording holds no interval: tracing stopped before the first (-i) was over");
    };
    let end = match to {
        None => last,
        Some(t) => match rec.interval_at(t) {
            Some(i) => i,
            None => bail!(
                "--to is before the recording's first interval ended ({:.1} s)",
                rec.intervals[0].head.elapsed_ns as f64 / 1e9
            ),
        },
    };
    let start = from.and_then(|f| rec.interval_at(f));
    if start.is_some_and(|s| s >= end) {
        bail!("--from is not before --to: the window holds no whole interval");
    }
    Ok((start, end))
}

/// The snapshot of the window after interval `first` (None: from the start) to interval
/// `last`, of `pids` only if any are given.
pub fn window(rec: &Recording, first: Option<usize>, last: usize, pids: &[u32]) -> Snapshot {
    let to = rec.state_at(Some(last));
    let state = match first {
        None => to,
        Some(_) => delta::window(&rec.state_at(first), &to),
    };
    let mut snap = rec.snapshot(&state);
    if !pids.is_empty() {
        snap.only(pids);
    }
    snap
}

/// `membarrier-trace replay FILE`: the dashboard over the recording.
pub fn replay(cli: &ReplayCli) -> Result<ExitCode> {
    use std::io::IsTerminal as _;
    if !std::io::stdout().is_terminal() {
        bail!(
            "replay draws the dashboard, and stdout is not a terminal: `report` prints the figures"
        );
    }
    let rec = Recording::open(&cli.file)?;
    if rec.intervals.is_empty() {
        bail!("the recording holds no interval: tracing stopped before the first (-i) was over");
    }
    let note = rec.note();
    let source = format!("{} on {}", rec.header.attach, rec.header.hostname);
    crate::render::tui::replay(&rec, source)?;
    if let Some(note) = note {
        eprintln!("membarrier-trace: {note}");
    }
    Ok(ExitCode::SUCCESS)
}
