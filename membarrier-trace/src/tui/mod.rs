//! The live dashboard (`membarrier-trace` with a terminal on stdout): a collector feeds
//! reports into [`app::App`]; [`ui::render`] draws it.

pub mod app;
pub mod ui;

use std::time::{Duration, Instant};

use anyhow::Result;
use ratatui::crossterm::event::{self, Event, KeyEventKind};

use crate::{model::Report, preflight::exists as alive};

/// Where the dashboard's reports come from, and when tracing ends (signal, --duration, the
/// traced processes exiting).
pub trait Feed {
    /// True once tracing should end.
    fn stopped(&mut self) -> Result<bool>;
    fn report(&mut self) -> Result<Report>;
}

/// Runs the dashboard until the user quits or `feed` stops. The terminal is restored on every
/// way out: return, error, and panic (ratatui's init installs a hook for that).
pub fn run(feed: &mut impl Feed, interval: Duration, source: String) -> Result<()> {
    let mut terminal = ratatui::try_init()?;
    let r = (|| -> Result<()> {
        let mut app = app::App::new(source, interval.as_secs_f64());
        app.update(feed.report()?, alive);
        let mut next = Instant::now() + interval;
        let mut dirty = true;
        while !app.quit && !feed.stopped()? {
            if dirty {
                terminal.draw(|f| ui::render(f, &app))?;
                dirty = false;
            }
            // Wake for input, for the next report, and every 50 ms to notice a stop.
            let wait = next
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(50));
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
            if Instant::now() >= next {
                app.update(feed.report()?, alive);
                next += interval;
                dirty = true;
            }
        }
        Ok(())
    })();
    ratatui::restore();
    r
}
