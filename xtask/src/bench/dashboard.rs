//! How soon the dashboard shows figures: from typing the command in a terminal to the first
//! screen where the caller's row has a rate (issue 28: within 0.3 s).

use std::{
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::{Paths, busy_workload, median};

/// Rounds of the measurement; its median is the figure.
pub(super) const ROUNDS: usize = 5;

/// A tmux server of the bench's own, its socket in a directory only root can enter (never a
/// name in the shared /tmp that another user could plant), killed when dropped.
struct Terminal {
    _dir: tempfile::TempDir,
    sock: String,
}

impl Terminal {
    /// A 120 x 40 terminal running bash at an empty prompt.
    fn new() -> Result<Terminal> {
        let dir = tempfile::Builder::new()
            .prefix("mt-bench-tmux-")
            .tempdir()?;
        let sock = dir.path().join("sock").to_string_lossy().into_owned();
        let t = Terminal { _dir: dir, sock };
        t.tmux(&[
            "new-session",
            "-d",
            "-x",
            "120",
            "-y",
            "40",
            "bash --norc --noprofile",
        ])?;
        t.wait_for(Duration::from_secs(10), |s| {
            s.lines().any(|l| {
                let l = l.trim_end();
                l.ends_with('#') || l.ends_with('$')
            })
        })?;
        Ok(t)
    }

    fn tmux(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("tmux")
            .args(["-S", &self.sock])
            .args(args)
            .output()
            .context("tmux")?;
        if !out.status.success() {
            bail!(
                "tmux {args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Polls the screen (about every 3 ms: a `tmux capture-pane` each) until `ok`; the time
    /// of the first screen that passed.
    fn wait_for(&self, within: Duration, ok: impl Fn(&str) -> bool) -> Result<Instant> {
        let deadline = Instant::now() + within;
        loop {
            let screen = self.tmux(&["capture-pane", "-p"])?;
            let at = Instant::now();
            if ok(&screen) {
                return Ok(at);
            }
            if at > deadline {
                bail!("the dashboard showed no figures within {within:?}; screen:\n{screen}");
            }
            thread::sleep(Duration::from_millis(3));
        }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-S", &self.sock, "kill-server"])
            .stderr(Stdio::null())
            .status();
    }
}

/// Whether the processes table shows `pid`'s row with calls a second above zero.
fn row_has_rate(screen: &str, pid: &str) -> bool {
    screen.lines().any(|l| {
        let mut f = l.trim_start_matches(['│', ' ']).split_whitespace();
        f.next() == Some(pid)
            && f.nth(1).is_some_and(|rate| {
                rate.trim_end_matches(char::is_alphabetic)
                    .parse::<f64>()
                    .is_ok_and(|r| r > 0.0)
            })
    })
}

/// One measurement, in seconds: `membarrier-trace --pid P` (the default options) typed into a
/// shell beside a caller at full rate, to the first screen showing the caller's rate.
fn once(p: &Paths) -> Result<f64> {
    let mut w = busy_workload(p, "50000000")?;
    let pid = w.id().to_string();
    let r = (|| -> Result<f64> {
        let t = Terminal::new()?;
        let cmd = format!("exec {} --pid {pid}", p.tracer.display());
        let start = Instant::now();
        t.tmux(&["send-keys", &cmd, "Enter"])?;
        let shown = t.wait_for(Duration::from_secs(20), |s| row_has_rate(s, &pid))?;
        // Quit, and wait for the tracer (the pane's only process) to be gone, so the next
        // round does not start beside its stop.
        let _ = t.tmux(&["send-keys", "q"]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while t.tmux(&["has-session"]).is_ok() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        Ok((shown - start).as_secs_f64())
    })();
    let _ = w.kill();
    let _ = w.wait();
    r
}

pub(super) fn print(seconds: f64) {
    println!(
        "the dashboard's first figures (the caller's rate on screen), from the command typed in \
         tmux, median of {ROUNDS}: {:.0} ms (target: within 300)",
        seconds * 1e3
    );
}

/// The median of [`ROUNDS`] measurements, in seconds.
pub(super) fn first_figures(p: &Paths) -> Result<f64> {
    let runs = (0..ROUNDS).map(|_| once(p)).collect::<Result<Vec<_>>>()?;
    Ok(median(runs))
}

#[cfg(test)]
mod tests {
    use super::row_has_rate;

    #[test]
    fn a_row_with_a_rate_is_seen() {
        let screen = "│PID      COMM     CALLS/S CALLS   ERRORS\n\
                      │4242     membarri 3.1M    3123456 0\n";
        assert!(row_has_rate(screen, "4242"));
        assert!(!row_has_rate(screen, "424"));
        let idle = "│4242     membarri 0.0     0       0\n";
        assert!(!row_has_rate(idle, "4242"));
        assert!(!row_has_rate("│PID      COMM     CALLS/S\n", "4242"));
    }
}
