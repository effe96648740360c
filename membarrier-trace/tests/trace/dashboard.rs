//! The dashboard, driven in tmux.

use std::{
    thread,
    time::{Duration, Instant},
};

use crate::common::*;

/// Whether the dashboard's table has a row for `pid` with a call rate above 0.
fn has_rate(screen: &str, pid: &str) -> bool {
    screen.lines().any(|l| {
        let f: Vec<&str> = l
            .trim_matches(|c| c == '│' || c == ' ')
            .split_whitespace()
            .collect();
        f.len() > 3 && f[0] == pid && f[2].parse::<f64>().is_ok_and(|r| r > 0.0)
    })
}

/// The dashboard in a real terminal: tmux runs a shell, the shell runs the tracer.
#[test]
fn dashboard_in_tmux_shows_the_process_and_quits_on_q() {
    let _machine = require_root();
    // GLOBAL calls (a grace period each, mostly asleep) for longer than the test; killed at the
    // end.
    let mut w = Workload::start(&["--global", "100000"]);
    w.go();
    let t = Tmux::shell(120, 40);
    t.keys(&format!("{TRACER} --pid {}", w.pid));
    let pid = w.pid.to_string();
    let screen = t.wait_for("no row with the workload and a rate", &|s| {
        has_rate(s, &pid)
    });
    assert!(screen.contains("membarrier-trace"), "{screen}");
    assert!(screen.contains("GLOBAL"), "{screen}");
    t.keys("q");
    // Back at the shell, with the summary printed above the prompt.
    let screen = t.wait_for_prompt();
    assert!(
        screen.contains(&format!("PID {pid} (membarrier-work)")),
        "{screen}"
    );
    let _ = w.child.kill();
    let _ = w.child.wait();
}

/// The figures counted since the start are on screen within a moment, not at the end of the
/// first interval (10 s here): the first sample within 0.3 s of the tracer's start.
#[test]
fn dashboard_shows_the_first_figures_before_its_first_interval() {
    let _machine = require_root();
    let mut w = Workload::start(&["--global", "100000"]);
    w.go();
    let t = Tmux::shell(120, 40);
    let started = Instant::now();
    t.keys(&format!("{TRACER} -i 10 --pid {}", w.pid));
    let pid = w.pid.to_string();
    let screen = t.wait_for("no row with the workload and a rate", &|s| {
        has_rate(s, &pid)
    });
    // Well before 10 s, on a busy box too (tmux, the shell and the attach included).
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "{took:?}; screen:\n{screen}");
    t.keys("q");
    t.wait_for_prompt();
    let _ = w.child.kill();
    let _ = w.child.wait();
}

/// With `-- COMMAND`, the dashboard outlives the command: its final figures stay on screen,
/// with its exit status, until q; then the text summary is printed and the command's status
/// passed on.
#[test]
fn dashboard_stays_open_after_the_command_exits() {
    let _machine = require_root();
    let t = Tmux::shell(100, 30);
    t.keys(&format!(
        "{TRACER} -- {WORKLOAD} --query 2 --expedited 300 --exit-code 3; echo rc=$?"
    ));
    let ended = |s: &str| s.contains("exited with status 3; tracing stopped, q leaves");
    let screen = t.wait_for("the dashboard did not say the command exited", &ended);
    let row = |s: &str| {
        s.lines()
            .find(|l| l.starts_with("│") && l.contains("membarrier-work"))
            .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
    };
    // PID COMM CALLS/S CALLS: every call, counted exactly.
    let cells = row(&screen).unwrap_or_else(|| panic!("no row: {screen}"));
    assert_eq!(cells[3], "303", "{screen}");
    // Still there a while later: not closed, not updated.
    thread::sleep(Duration::from_millis(1500));
    let later = t.screen();
    assert!(ended(&later), "{later}");
    assert_eq!(row(&later), Some(cells));
    t.keys("q");
    let screen = t.wait_for_prompt();
    assert!(screen.contains("rc=3"), "{screen}");
    assert!(screen.contains("303 calls"), "{screen}");
    assert!(
        screen.contains("(membarrier-work, exited): 303 calls"),
        "{screen}"
    );
}
