//! The dashboard's state: what is shown, selected, sorted and filtered. Pure data: it takes
//! reports and keys, and rendering (`ui`) only reads it.

use std::collections::{HashMap, VecDeque};

use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

use crate::model::{ProcessReport, Report};

/// How many reports of call-rate history the sparkline keeps (a minute at the default 1 s).
pub const HISTORY: usize = 60;
/// How long a process that exited stays in the table, marked, before it ages out.
pub const AGE_OUT_NS: u64 = 60_000_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Column {
    Pid,
    Comm,
    Rate,
    Calls,
    Errors,
    P50,
    P99,
    Max,
    MainCmd,
    Inside,
    Cpu,
}

impl Column {
    pub const ALL: [Column; 11] = [
        Column::Pid,
        Column::Comm,
        Column::Rate,
        Column::Calls,
        Column::Errors,
        Column::P50,
        Column::P99,
        Column::Max,
        Column::MainCmd,
        Column::Inside,
        Column::Cpu,
    ];

    pub fn title(self) -> &'static str {
        match self {
            Column::Pid => "PID",
            Column::Comm => "COMM",
            Column::Rate => "CALLS/S",
            Column::Calls => "CALLS",
            Column::Errors => "ERRORS",
            Column::P50 => "P50",
            Column::P99 => "P99",
            Column::Max => "MAX",
            Column::MainCmd => "MAIN CMD",
            Column::Inside => "IN CALL",
            Column::Cpu => "CPU%",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pane {
    Processes,
    Cmds,
}

/// Where a replay should go next (the loop moves it, then feeds the reports up to there).
#[derive(Clone, Debug, PartialEq)]
pub enum Go {
    /// Intervals forward (or back, negative).
    By(isize),
    Start,
    End,
    /// A time as typed after `g`: seconds from the start, or RFC 3339.
    To(String),
}

/// `replay FILE`: where the screen is in the recording.
#[derive(Clone, Debug, Default)]
pub struct Replay {
    /// The interval shown (0-based) and how many there are.
    pub at: usize,
    pub len: usize,
    /// Its end: seconds from the start of tracing, and the wall-clock time.
    pub secs: f64,
    pub time: String,
    /// A time being typed after `g`, until Enter or Esc.
    pub jump: Option<String>,
    /// Set by a key, taken by the loop.
    pub go: Option<Go>,
    /// Said on the header's second line: a time that is not in the recording.
    pub note: Option<String>,
}

pub struct App {
    /// The report on screen: the latest, or the one frozen by pause.
    pub shown: Report,
    latest: Report,
    pub paused: bool,
    pub interval_secs: f64,
    /// How the calls are traced (shown in the header).
    pub source: String,
    pub sort: Column,
    pub descending: bool,
    pub filter: String,
    /// The filter being typed after `/`, until Enter or Esc.
    pub editing: Option<String>,
    pub focus: Pane,
    pub selected_pid: Option<u32>,
    /// Index into the selected process's cmds: the row selected in the cmd pane, whose
    /// histogram is drawn.
    pub selected_cmd: usize,
    pub help: bool,
    pub quit: bool,
    /// Set when tracing has ended (the command exited, ...): why, said on screen; the final
    /// figures stay until the user leaves.
    pub ended: Option<String>,
    /// Calls per report, per process, oldest first.
    history: HashMap<u32, VecDeque<u64>>,
    prev_calls: HashMap<u32, u64>,
    /// When (report duration_ns) a process was first seen gone.
    exited: HashMap<u32, u64>,
    /// Replaying a recording (`replay FILE`), not tracing.
    pub replay: Option<Replay>,
}

impl App {
    pub fn new(source: String, interval_secs: f64) -> Self {
        Self {
            shown: Report::empty(),
            latest: Report::empty(),
            paused: false,
            interval_secs,
            source,
            sort: Column::Rate,
            descending: true,
            filter: String::new(),
            editing: None,
            focus: Pane::Processes,
            selected_pid: None,
            selected_cmd: 0,
            help: false,
            quit: false,
            ended: None,
            history: HashMap::new(),
            prev_calls: HashMap::new(),
            exited: HashMap::new(),
            replay: None,
        }
    }

    /// Forgets the figures (reports, history, exits) and keeps how they are shown (sort,
    /// filter, selection): a replay that moves feeds them again.
    pub fn forget_figures(&mut self) {
        self.shown = Report::empty();
        self.latest = Report::empty();
        self.history.clear();
        self.prev_calls.clear();
        self.exited.clear();
    }

    /// Takes a new report. `alive` says whether a pid still exists; collection (and history)
    /// goes on while paused, only the screen stays.
    pub fn update(&mut self, report: Report, alive: impl Fn(u32) -> bool) {
        self.take(report, alive, true);
    }

    /// The figures so far, shown at once, with no sample in the rate history (the first
    /// interval is not over).
    pub fn refresh(&mut self, report: Report, alive: impl Fn(u32) -> bool) {
        self.take(report, alive, false);
    }

    /// `report` shown; with `sample`, each process's calls since the last sample go into its
    /// history.
    fn take(&mut self, mut report: Report, alive: impl Fn(u32) -> bool, sample: bool) {
        // Writers that make no membarrier calls (qsbr) get a row too, to select them by.
        for w in &report.rcu_writers {
            if !report
                .processes
                .iter()
                .any(|p| (p.pid, p.serial) == (w.pid, w.serial))
            {
                report.processes.push(ProcessReport::of_writer(w));
            }
        }
        for p in &report.processes {
            if sample {
                let before = self.prev_calls.insert(p.pid, p.calls).unwrap_or(0);
                let h = self.history.entry(p.pid).or_default();
                if h.len() == HISTORY {
                    h.pop_front();
                }
                h.push_back(p.calls.saturating_sub(before));
            }
            if !alive(p.pid) {
                self.exited.entry(p.pid).or_insert(report.duration_ns);
            }
        }
        self.latest = report;
        if !self.paused {
            self.shown = self.latest.clone();
        }
        self.keep_selection();
    }

    /// Tracing has ended: `report` is the final one, shown (unpaused) until the user leaves.
    pub fn end(&mut self, report: Report, why: String, alive: impl Fn(u32) -> bool) {
        self.paused = false;
        self.update(report, alive);
        self.ended = Some(why);
    }

    pub fn is_exited(&self, pid: u32) -> bool {
        self.exited.contains_key(&pid)
    }

    pub fn history(&self, pid: u32) -> Vec<u64> {
        self.history
            .get(&pid)
            .map(|h| h.iter().copied().collect())
            .unwrap_or_default()
    }

    fn aged_out(&self, pid: u32) -> bool {
        self.exited
            .get(&pid)
            .is_some_and(|&t| self.shown.duration_ns.saturating_sub(t) >= AGE_OUT_NS)
    }

    fn matches(&self, p: &ProcessReport) -> bool {
        let f = self.editing.as_deref().unwrap_or(&self.filter);
        f.is_empty() || p.comm.contains(f) || p.pid.to_string().contains(f)
    }

    /// The process table: filtered, without aged-out processes, sorted.
    pub fn rows(&self) -> Vec<&ProcessReport> {
        let mut rows: Vec<&ProcessReport> = self
            .shown
            .processes
            .iter()
            .filter(|p| self.matches(p) && !self.aged_out(p.pid))
            .collect();
        let main = |p: &ProcessReport| p.cmds.first().map(|c| c.cmd.clone()).unwrap_or_default();
        rows.sort_by(|a, b| {
            let o = match self.sort {
                Column::Pid => a.pid.cmp(&b.pid),
                Column::Comm => a.comm.cmp(&b.comm),
                Column::Rate => a.calls_per_sec.total_cmp(&b.calls_per_sec),
                Column::Calls => a.calls.cmp(&b.calls),
                Column::Errors => a.errors.cmp(&b.errors),
                Column::P50 => a.latency_ns.p50.cmp(&b.latency_ns.p50),
                Column::P99 => a.latency_ns.p99.cmp(&b.latency_ns.p99),
                Column::Max => a.latency_ns.max.cmp(&b.latency_ns.max),
                Column::MainCmd => main(a).cmp(&main(b)),
                Column::Inside => a.time_inside_pct.total_cmp(&b.time_inside_pct),
                Column::Cpu => a.cpu_pct.total_cmp(&b.cpu_pct),
            };
            let o = if self.descending { o.reverse() } else { o };
            o.then(a.pid.cmp(&b.pid))
        });
        rows
    }

    pub fn selected(&self) -> Option<&ProcessReport> {
        let pid = self.selected_pid?;
        self.rows().into_iter().find(|p| p.pid == pid)
    }

    /// Keeps a valid selection: the same pid if still listed, else the first row.
    fn keep_selection(&mut self) {
        let rows = self.rows();
        if !rows.iter().any(|p| Some(p.pid) == self.selected_pid) {
            self.selected_pid = rows.first().map(|p| p.pid);
            self.selected_cmd = 0;
        }
        let ncmds = self.selected().map_or(0, |p| p.cmds.len());
        if self.selected_cmd >= ncmds {
            self.selected_cmd = 0;
        }
    }

    fn move_selection(&mut self, down: bool) {
        match self.focus {
            Pane::Processes => {
                let rows = self.rows();
                let Some(i) = rows.iter().position(|p| Some(p.pid) == self.selected_pid) else {
                    return;
                };
                let j = if down {
                    (i + 1).min(rows.len() - 1)
                } else {
                    i.saturating_sub(1)
                };
                if j != i {
                    self.selected_pid = Some(rows[j].pid);
                    self.selected_cmd = 0;
                }
            }
            Pane::Cmds => {
                let n = self.selected().map_or(0, |p| p.cmds.len());
                self.selected_cmd = if down {
                    (self.selected_cmd + 1).min(n.saturating_sub(1))
                } else {
                    self.selected_cmd.saturating_sub(1)
                };
            }
        }
    }

    /// A replay's own keys: Left/Right (one interval), PageUp/PageDown (ten), Home/End, and
    /// `g` with a time typed after it. True if the key was one.
    fn replay_key(&mut self, key: KeyEvent) -> bool {
        let Some(r) = self.replay.as_mut() else {
            return false;
        };
        if let Some(text) = r.jump.as_mut() {
            match key.code {
                KeyCode::Enter => r.go = r.jump.take().map(Go::To),
                KeyCode::Esc => r.jump = None,
                KeyCode::Backspace => {
                    text.pop();
                }
                KeyCode::Char(c) => text.push(c),
                _ => {}
            }
            return true;
        }
        r.go = match key.code {
            KeyCode::Left => Some(Go::By(-1)),
            KeyCode::Right => Some(Go::By(1)),
            KeyCode::PageUp => Some(Go::By(-10)),
            KeyCode::PageDown => Some(Go::By(10)),
            KeyCode::Home => Some(Go::Start),
            KeyCode::End => Some(Go::End),
            KeyCode::Char('g') => {
                r.jump = Some(String::new());
                return true;
            }
            _ => return false,
        };
        r.note = None;
        true
    }

    pub fn on_key(&mut self, key: KeyEvent) {
        if key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c') {
            self.quit = true;
            return;
        }
        if let Some(text) = self.editing.as_mut() {
            match key.code {
                KeyCode::Enter => {
                    self.filter = self.editing.take().unwrap_or_default();
                }
                KeyCode::Esc => self.editing = None,
                KeyCode::Backspace => {
                    text.pop();
                }
                KeyCode::Char(c) => text.push(c),
                _ => {}
            }
            self.keep_selection();
            return;
        }
        if self.replay_key(key) {
            return;
        }
        if self.help {
            // Any key closes the help; q still quits.
            self.help = false;
            if !matches!(key.code, KeyCode::Char('q')) {
                return;
            }
        }
        match key.code {
            KeyCode::Char('q') | KeyCode::Esc => self.quit = true,
            KeyCode::Down | KeyCode::Char('j') => self.move_selection(true),
            KeyCode::Up | KeyCode::Char('k') => self.move_selection(false),
            KeyCode::Tab | KeyCode::BackTab => {
                self.focus = match self.focus {
                    Pane::Processes => Pane::Cmds,
                    Pane::Cmds => Pane::Processes,
                }
            }
            KeyCode::Char('s') => {
                let i = Column::ALL
                    .iter()
                    .position(|c| *c == self.sort)
                    .unwrap_or(0);
                self.sort = Column::ALL[(i + 1) % Column::ALL.len()];
            }
            KeyCode::Char('S') => self.descending = !self.descending,
            KeyCode::Char('/') => self.editing = Some(self.filter.clone()),
            KeyCode::Char(' ') => {
                self.paused = !self.paused;
                if !self.paused {
                    self.shown = self.latest.clone();
                }
            }
            KeyCode::Char('c') => {
                let n = self.selected().map_or(0, |p| p.cmds.len());
                if n > 0 {
                    self.selected_cmd = (self.selected_cmd + 1) % n;
                }
            }
            KeyCode::Char('?') => self.help = true,
            _ => {}
        }
        self.keep_selection();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Model, Snapshot, tests::row};

    fn key(c: char) -> KeyEvent {
        KeyEvent::new(KeyCode::Char(c), KeyModifiers::NONE)
    }

    fn snap(elapsed_s: u64, expedited_42: usize) -> Snapshot {
        Snapshot {
            elapsed_ns: elapsed_s * 1_000_000_000,
            rows: vec![
                row(42, 8, 0, &vec![500; expedited_42]),
                row(7, 1, 0, &[12_000_000]),
                row(9, 0, 22, &[300, 300, 300]),
            ],
            comms: [
                ((42, 0), "urcu".into()),
                ((7, 0), "dotnet".into()),
                ((9, 0), "java".into()),
            ]
            .into(),
            ..Snapshot::default()
        }
    }

    fn app_with(reports: &[Snapshot], alive: impl Fn(u32) -> bool + Copy) -> App {
        let mut model = Model::default();
        let mut app = App::new("test".into(), 1.0);
        for s in reports {
            app.update(model.report(s), alive);
        }
        app
    }

    fn pids(app: &App) -> Vec<u32> {
        app.rows().iter().map(|p| p.pid).collect()
    }

    #[test]
    fn sorts_by_rate_then_any_column() {
        let mut app = app_with(&[snap(1, 10)], |_| true);
        assert_eq!(pids(&app), vec![42, 9, 7]); // calls/s descending
        app.on_key(key('S'));
        assert_eq!(pids(&app), vec![7, 9, 42]);
        app.on_key(key('S'));
        // s cycles: Rate -> Calls -> Errors -> P50 ...
        app.on_key(key('s'));
        assert_eq!(app.sort, Column::Calls);
        app.on_key(key('s'));
        assert_eq!(app.sort, Column::Errors);
        assert_eq!(pids(&app)[0], 9);
        app.on_key(key('s'));
        app.on_key(key('s'));
        assert_eq!(app.sort, Column::P99);
        assert_eq!(pids(&app)[0], 7, "GLOBAL's 12 ms is the worst p99");
        for _ in 0..6 {
            app.on_key(key('s'));
        }
        assert_eq!(app.sort, Column::Comm);
        app.on_key(KeyEvent::new(KeyCode::Char('S'), KeyModifiers::SHIFT));
        assert_eq!(pids(&app), vec![7, 9, 42]); // dotnet, java, urcu
    }

    #[test]
    fn filters_by_comm_or_pid() {
        let mut app = app_with(&[snap(1, 10)], |_| true);
        app.on_key(key('/'));
        for c in "ja".chars() {
            app.on_key(key(c));
        }
        assert_eq!(pids(&app), vec![9], "filters while typing");
        app.on_key(KeyEvent::new(KeyCode::Enter, KeyModifiers::NONE));
        assert_eq!(app.filter, "ja");
        assert_eq!(app.selected_pid, Some(9));
        app.on_key(key('/'));
        app.on_key(KeyEvent::new(KeyCode::Backspace, KeyModifiers::NONE));
        app.on_key(KeyEvent::new(KeyCode::Backspace, KeyModifiers::NONE));
        app.on_key(key('4'));
        app.on_key(KeyEvent::new(KeyCode::Enter, KeyModifiers::NONE));
        assert_eq!(pids(&app), vec![42]);
        app.on_key(key('/'));
        app.on_key(KeyEvent::new(KeyCode::Esc, KeyModifiers::NONE));
        assert_eq!(app.filter, "4", "Esc cancels the edit");
        assert!(!app.quit);
    }

    #[test]
    fn rates_history_and_pause() {
        let mut model = Model::default();
        let mut app = App::new("test".into(), 1.0);
        app.update(model.report(&snap(1, 10)), |_| true);
        app.update(model.report(&snap(2, 30)), |_| true);
        assert_eq!(app.history(42), vec![10, 20]);
        assert_eq!(app.selected().unwrap().calls_per_sec, 20.0);
        app.on_key(key(' '));
        app.update(model.report(&snap(3, 70)), |_| true);
        assert!(app.paused);
        assert_eq!(app.selected().unwrap().calls, 30, "screen frozen");
        assert_eq!(app.history(42), vec![10, 20, 40], "collection goes on");
        app.on_key(key(' '));
        assert_eq!(app.selected().unwrap().calls, 70);
    }

    #[test]
    fn exited_processes_stay_marked_then_age_out() {
        let mut model = Model::default();
        let mut app = App::new("test".into(), 1.0);
        let gone = |pid: u32| pid != 7;
        app.update(model.report(&snap(1, 10)), gone);
        assert!(app.is_exited(7));
        assert!(pids(&app).contains(&7));
        app.update(model.report(&snap(60, 10)), gone);
        assert!(pids(&app).contains(&7), "59 s after exit");
        app.update(model.report(&snap(61, 10)), gone);
        assert!(!pids(&app).contains(&7), "aged out after 60 s");
    }

    #[test]
    fn selection_panes_and_keys() {
        let mut app = app_with(&[snap(1, 10)], |_| true);
        assert_eq!(app.selected_pid, Some(42));
        app.on_key(key('j'));
        assert_eq!(app.selected_pid, Some(9));
        app.on_key(KeyEvent::new(KeyCode::Down, KeyModifiers::NONE));
        app.on_key(KeyEvent::new(KeyCode::Down, KeyModifiers::NONE));
        assert_eq!(app.selected_pid, Some(7), "stops at the last row");
        app.on_key(key('k'));
        assert_eq!(app.selected_pid, Some(9));
        app.on_key(KeyEvent::new(KeyCode::Tab, KeyModifiers::NONE));
        assert_eq!(app.focus, Pane::Cmds);
        app.on_key(key('c'));
        assert_eq!(app.selected_cmd, 0, "one cmd: stays");
        app.on_key(key('?'));
        assert!(app.help);
        app.on_key(key('x'));
        assert!(!app.help && !app.quit);
        app.on_key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL));
        assert!(app.quit);
        let mut app = app_with(&[snap(1, 10)], |_| true);
        app.on_key(KeyEvent::new(KeyCode::Esc, KeyModifiers::NONE));
        assert!(app.quit);
    }
}
