//! A tracing run as the loop sees it: the collector, the model, the exporter, the command, and
//! everything that can end the run; [`Session::tick`] is the loop's step.

use std::{
    os::unix::process::ExitStatusExt as _,
    process::{Child, ExitCode},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use super::spawn::{exit_code, stop_child};
use crate::{
    app::exporter::Exporter,
    collect::collector::Collector,
    model::{Model, Report, findings},
    preflight,
    render::{
        text,
        tui::{Feed, Stop},
    },
    store::Recorder,
};

/// How often exited processes' stats rows are moved out of the kernel: often enough that a box
/// starting thousands of processes a second does not fill the map in between.
pub const RETIRE_EVERY: Duration = Duration::from_millis(250);
/// When the stats map is filling: at 10,000 new processes a second, 500 rows a pass. (The
/// loop's tick is 50 ms: sooner would not be kept.)
const RETIRE_SOON: Duration = Duration::from_millis(50);
/// How often the traced processes' mappings are looked at for grace-period functions (dlopen).
pub const PROBE_EVERY: Duration = Duration::from_secs(1);

/// A tracing run: the collector and everything that can end it.
pub struct Session {
    pub collector: Collector,
    pub signal: Arc<AtomicUsize>,
    pub deadline: Option<Instant>,
    pub child: Option<Child>,
    pub exits: Option<preflight::ExitWatch>,
    pub next_retire: Instant,
    /// When to look for grace-period functions newly mapped by the traced processes.
    pub next_probe: Instant,
    /// Whose mappings to look at: the `--pid`s; None: the traced processes in the kernel's
    /// table (a command and its children). Empty system-wide (the installed libraries are).
    pub probe_pids: Option<Vec<u32>>,
    /// Under the dashboard notes wait for it to close (stderr would scribble over it).
    pub quiet_notes: bool,
    pub late_notes: Vec<String>,
    pub model: Model,
    /// `--listen`: answered from the loop, at each tick.
    pub exporter: Option<Exporter>,
    /// Set when tracing ended with a status to exit with (the command's).
    pub exit: Option<ExitCode>,
    /// Why tracing ended, when the user should be told.
    pub note: Option<String>,
    /// The program of `-- COMMAND`.
    pub command: String,
    /// `-o none --listen`: how long to go on serving the metrics once the traced processes are
    /// gone (`--keep-exited`), and until when.
    pub linger: Option<Duration>,
    pub linger_until: Option<Instant>,
    /// `record FILE`: written each `record_every`, and at the end.
    pub recorder: Option<Recorder>,
    pub record_every: Duration,
    pub next_record: Instant,
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
    pub fn tick(&mut self) -> Result<Option<Stop>> {
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
        if let Some(r) = &mut self.recorder
            && Instant::now() >= self.next_record
        {
            r.write(&self.collector.snapshot(false)?, false)?;
            // On the interval's grid, as -i's reports are; a late tick skips, not bunches.
            while self.next_record <= Instant::now() {
                self.next_record += self.record_every;
            }
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

impl Feed for Session {
    fn stopped(&mut self) -> Result<Option<Stop>> {
        self.tick()
    }

    fn report(&mut self) -> Result<Report> {
        Ok(findings::judged(
            self.model.report(&self.collector.snapshot(false)?),
        ))
    }

    fn final_report(&mut self) -> Result<Report> {
        let snap = self.collector.snapshot(true)?;
        if let Some(r) = &mut self.recorder {
            r.write(&snap, true)?;
            eprintln!(
                "membarrier-trace: recorded {} intervals in {} ({} bytes)",
                r.intervals,
                r.path().display(),
                r.bytes
            );
        }
        let report = self.model.report(&snap);
        self.collector.detach();
        Ok(findings::judged(report))
    }
}
