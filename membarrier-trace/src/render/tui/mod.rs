//! The live dashboard (`membarrier-trace` with a terminal on stdout): a collector feeds
//! reports into [`app::App`]; [`ui::render`] draws it.

pub mod app;
pub mod ui;

use std::time::{Duration, Instant};

use anyhow::Result;
use ratatui::crossterm::event::{self, Event, KeyEventKind};

use crate::{model::Report, preflight::exists as alive};

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
                next.saturating_duration_since(Instant::now())
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
