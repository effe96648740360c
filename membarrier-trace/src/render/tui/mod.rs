//! The live dashboard (`membarrier-trace` with a terminal on stdout): a collector feeds
//! reports into [`app::App`]; [`ui::render`] draws it. [`replay`] feeds it a recording's.

pub mod app;
pub mod ui;

use std::time::{Duration, Instant};

use anyhow::Result;
use ratatui::crossterm::event::{self, Event, KeyEventKind};

use crate::{
    model::{Model, Report, findings},
    preflight::exists as alive,
    store::{Keyframes, Recording, When},
};

/// Why tracing ended.
pub enum Stop {
    /// Leave the screen at once (a signal).
    Leave,
    /// The command or the traced processes exited, or `--duration` passed: the final figures
    /// stay on screen, with this said, until the user leaves.
    Linger(String),
}

/// Where the dashboard's reports come from, and when tracing ends (signal, --duration, the
/// traced processes exiting).
pub trait Feed {
    /// Set once tracing should end.
    fn stopped(&mut self) -> Result<Option<Stop>>;
    fn report(&mut self) -> Result<Report>;
    /// The final report; tracing stops (the probes are detached).
    fn final_report(&mut self) -> Result<Report>;
}

/// When the dashboard first shows what was counted since the start.
const FIRST_FIGURES: Duration = Duration::from_millis(100);

/// Runs the dashboard until the user quits or `feed` stops with [`Stop::Leave`]. Returns the
/// final report when tracing ended by itself (then shown until the user quits). The terminal
/// is restored on every way out: return, error, and panic (ratatui's init installs a hook for
/// that).
pub fn run(feed: &mut impl Feed, interval: Duration, source: String) -> Result<Option<Report>> {
    let mut terminal = ratatui::try_init()?;
    let r = (|| -> Result<Option<Report>> {
        let mut app = app::App::new(source, interval.as_secs_f64());
        app.update(feed.report()?, alive);
        let mut next = Instant::now() + interval;
        // The figures counted so far, soon after the start: not a second later (the first
        // interval's end). No history sample: that waits for the interval.
        let mut early = Some(Instant::now() + FIRST_FIGURES);
        let mut dirty = true;
        let mut last = None;
        while !app.quit {
            if last.is_none() {
                match feed.stopped()? {
                    Some(Stop::Leave) => break,
                    Some(Stop::Linger(why)) => {
                        let report = feed.final_report()?;
                        app.end(report.clone(), why, alive);
                        last = Some(report);
                        dirty = true;
                    }
                    None => {}
                }
            }
            if dirty {
                terminal.draw(|f| ui::render(f, &app))?;
                dirty = false;
            }
            // Wake for input, for the next report, and every 50 ms to notice a stop; once
            // ended, for input only.
            let wait = if last.is_some() {
                Duration::from_secs(1)
            } else {
                next.min(early.unwrap_or(next))
                    .saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(50))
            };
            if event::poll(wait)? {
                match event::read()? {
                    Event::Key(k) if k.kind != KeyEventKind::Release => {
                        app.on_key(k);
                        dirty = true;
                    }
                    Event::Resize(..) => dirty = true,
                    _ => {}
                }
            }
            if last.is_none() && early.is_some_and(|at| Instant::now() >= at) {
                early = None;
                if Instant::now() < next {
                    app.refresh(feed.report()?, alive);
                    dirty = true;
                }
            }
            if last.is_none() && Instant::now() >= next {
                app.update(feed.report()?, alive);
                next += interval;
                dirty = true;
            }
        }
        Ok(last)
    })();
    ratatui::restore();
    r
}

/// `replay FILE`: the dashboard over a recording. The screen shows interval `at` as the live
/// dashboard showed it then (totals so far, rates over that interval, the call-rate history
/// of the intervals before it); the replay keys move `at`, every other key works as live.
pub fn replay(rec: &Recording, source: String) -> Result<()> {
    let frames = Keyframes::of(rec);
    let mut terminal = ratatui::try_init()?;
    let r = (|| -> Result<()> {
        let secs = rec.header.interval_ns as f64 / 1e9;
        let mut app = app::App::new(source, secs);
        app.replay = Some(app::Replay {
            len: rec.intervals.len(),
            ..Default::default()
        });
        show(&mut app, rec, &frames, 0);
        while !app.quit {
            terminal.draw(|f| ui::render(f, &app))?;
            if !event::poll(Duration::from_secs(1))? {
                continue;
            }
            match event::read()? {
                Event::Key(k) if k.kind != KeyEventKind::Release => app.on_key(k),
                _ => {}
            }
            let Some(rp) = app.replay.as_mut() else {
                continue;
            };
            let last = rp.len.saturating_sub(1);
            let to = match rp.go.take() {
                None => continue,
                Some(app::Go::By(n)) => rp.at.saturating_add_signed(n).min(last),
                Some(app::Go::Start) => 0,
                Some(app::Go::End) => last,
                Some(app::Go::To(text)) => match When::parse(text.trim()) {
                    Ok(when) => rec.interval_at(when).unwrap_or(0),
                    Err(e) => {
                        rp.note = Some(e);
                        continue;
                    }
                },
            };
            show(&mut app, rec, &frames, to);
        }
        Ok(())
    })();
    ratatui::restore();
    r
}

/// Feeds `app` the reports of the intervals up to `at` (as many as its history holds), as
/// the live dashboard got them, and says where it is.
fn show(app: &mut app::App, rec: &Recording, frames: &Keyframes, at: usize) {
    app.forget_figures();
    let first = at.saturating_sub(app::HISTORY - 1);
    let mut model = Model::default();
    let mut state = match first {
        0 => None,
        f => {
            let s = frames.state(rec, f - 1);
            model.report(&rec.snapshot(&s));
            Some(s)
        }
    };
    for i in first..=at.min(rec.intervals.len().saturating_sub(1)) {
        let s = match state.take() {
            Some(mut s) => {
                rec.intervals[i].apply_to(&mut s);
                s
            }
            None => frames.state(rec, i),
        };
        let snap = rec.snapshot(&s);
        let report = findings::judged_on(model.report(&snap), &rec.header.machine);
        let exited: Vec<u32> = report
            .processes
            .iter()
            .filter(|p| p.exited)
            .map(|p| p.pid)
            .collect();
        app.update(report, |pid| !exited.contains(&pid));
        state = Some(s);
    }
    if let Some(rp) = app.replay.as_mut()
        && let Some(c) = rec.intervals.get(at)
    {
        rp.at = at;
        rp.secs = c.head.elapsed_ns as f64 / 1e9;
        rp.time = crate::model::rfc3339(c.head.unix_ns);
    }
}
