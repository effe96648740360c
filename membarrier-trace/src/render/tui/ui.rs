//! Draws the dashboard from an [`App`]; reads it, changes nothing.

use ratatui::{
    Frame,
    layout::{Alignment, Constraint, Layout, Rect},
    style::{Color, Modifier, Style},
    text::{Line, Span},
    widgets::{
        Bar, BarChart, BarGroup, Block, Borders, Cell, Clear, Paragraph, Row, Sparkline, Table,
        TableState, Wrap,
    },
};

use super::app::{App, Column, Pane, Replay};
use crate::{
    model::cmd::Kind,
    model::{CmdReport, Finding, GraceSource, ProcessReport, WriterReport},
    render::text::{counts, victims},
    render::units,
};

/// Below this the dashboard cannot be laid out: a one-line note instead.
const MIN_W: u16 = 40;
const MIN_H: u16 = 10;
/// Below this height the detail pane is left out.
const DETAIL_MIN_H: u16 = 20;
/// Rows the histogram, sparkline and breakdown under the cmd list need at least.
const DETAIL_BELOW_H: u16 = 9;

/// A count in at most 7 characters: exact below 10 million, then `12.3M`, `4.56G`. A column
/// never cuts a number short.
fn count(n: u64) -> String {
    match n {
        0..10_000_000 => n.to_string(),
        10_000_000..1_000_000_000 => format!("{:.1}M", n as f64 / 1e6),
        _ => format!("{:.2}G", n as f64 / 1e9),
    }
}

/// A rate in at most 7 characters.
fn rate(r: f64) -> String {
    if r >= 10_000_000.0 {
        count(r as u64)
    } else if r >= 100.0 {
        format!("{r:.0}")
    } else {
        format!("{r:.1}")
    }
}

pub fn render(f: &mut Frame, app: &App) {
    let area = f.area();
    if area.width < MIN_W || area.height < MIN_H {
        let msg = format!(
            "terminal {}x{}: need {MIN_W}x{MIN_H}; q quits",
            area.width, area.height
        );
        f.render_widget(Paragraph::new(msg).wrap(Wrap { trim: true }), area);
        return;
    }
    let [header, body] = Layout::vertical([Constraint::Length(2), Constraint::Min(0)]).areas(area);
    render_header(f, app, header);
    // Filtered and sorted once a frame; both panes read it.
    let rows = app.rows();
    if area.height < DETAIL_MIN_H {
        render_processes(f, app, &rows, body);
    } else {
        let selected = rows
            .iter()
            .copied()
            .find(|p| Some(p.pid) == app.selected_pid);
        // Each pane as tall as its rows, as far as the other leaves room: the table gets at
        // least 45% when both want more.
        let table_want = rows.len().max(1) as u16 + 3;
        let writers = selected.map(|p| writers_of(app, p)).unwrap_or_default();
        let detail_want = selected.map_or(0, |p| p.cmds.len() as u16)
            + writers_height(writers.len())
            + 3
            + DETAIL_BELOW_H;
        let table_h =
            table_want.min((body.height * 45 / 100).max(body.height.saturating_sub(detail_want)));
        let [table, detail] =
            Layout::vertical([Constraint::Length(table_h), Constraint::Min(0)]).areas(body);
        render_processes(f, app, &rows, table);
        render_detail(f, app, selected, &writers, detail);
    }
    if app.help {
        render_help(f, area, app.replay.is_some());
    }
}

fn render_header(f: &mut Frame, app: &App, area: Rect) {
    let r = &app.shown;
    let grace = match r.grace_period_source {
        GraceSource::Fentry => "fentry",
        GraceSource::Sched => "sched",
        GraceSource::None => "none",
    };
    // Line 1: the figures that matter most. Parts are kept in order of importance as far as
    // the width allows: missed and dropped always, whole (the line wraps before they are cut).
    let lost = Style::new().fg(if r.missed_calls + r.dropped.total > 0 {
        Color::Red
    } else {
        Color::Reset
    });
    let parts: [(u8, Span); 6] = [
        (
            3,
            Span::styled(
                "membarrier-trace ",
                Style::new().add_modifier(Modifier::BOLD),
            ),
        ),
        (2, Span::raw(format!("{} calls/s  ", rate(r.calls_per_sec)))),
        (
            0,
            Span::styled(
                format!("missed {}  dropped {}", r.missed_calls, r.dropped.total),
                lost,
            ),
        ),
        (
            4,
            Span::raw(format!("  up {:.0}s", r.duration_ns as f64 / 1e9)),
        ),
        (5, Span::raw(format!("  every {}s", app.interval_secs))),
        (
            1,
            Span::styled(
                if app.paused { "  PAUSED" } else { "" },
                Style::new().fg(Color::Yellow).add_modifier(Modifier::BOLD),
            ),
        ),
    ];
    let top = Line::from(fitting(parts, area.width));
    let bottom = match (&app.ended, &app.editing, &app.replay) {
        (_, None, Some(rp)) => replay_line(rp),
        (Some(why), _, _) => Line::from(format!("{why}; tracing stopped, q leaves"))
            .style(Style::new().fg(Color::Yellow).add_modifier(Modifier::BOLD)),
        (None, Some(text), _) => Line::from(format!("filter: {text}_  (Enter apply, Esc cancel)"))
            .style(Style::new().fg(Color::DarkGray)),
        (None, None, None) => {
            let filter = if app.filter.is_empty() {
                String::new()
            } else {
                format!("filter: {}  ", app.filter)
            };
            Line::from(format!(
                "{filter}{}, grace periods: {grace}   ? keys",
                app.source
            ))
            .style(Style::new().fg(Color::DarkGray))
        }
    };
    f.render_widget(
        Paragraph::new(vec![top, bottom]).wrap(Wrap { trim: true }),
        area,
    );
}

/// A replay's place: the interval and its time, or the time being typed after `g`.
fn replay_line(rp: &Replay) -> Line<'static> {
    let style = Style::new().fg(Color::Cyan).add_modifier(Modifier::BOLD);
    if let Some(text) = &rp.jump {
        return Line::from(format!(
            "go to: {text}_  (seconds from the start, or 2026-12-06T02:30:00Z; Enter, Esc)"
        ))
        .style(style);
    }
    let note = rp
        .note
        .as_deref()
        .map(|n| format!("  {n}"))
        .unwrap_or_default();
    Line::from(format!(
        "replay: interval {} of {}, {:.1} s, {}  <-/-> Home End g{note}",
        rp.at + 1,
        rp.len,
        rp.secs,
        rp.time
    ))
    .style(style)
}

/// The spans of `parts` (priority, span; 0 first) that fit in `width` together, taken by
/// priority and kept in their order. The first is always kept.
fn fitting<const N: usize>(parts: [(u8, Span<'static>); N], width: u16) -> Vec<Span<'static>> {
    let mut by_priority: Vec<usize> = (0..N).collect();
    by_priority.sort_by_key(|&i| parts[i].0);
    let mut keep = [false; N];
    let mut used = 0;
    for (n, i) in by_priority.into_iter().enumerate() {
        let w = parts[i].1.width();
        if n == 0 || used + w <= width as usize {
            keep[i] = true;
            used += w;
        }
    }
    parts
        .into_iter()
        .zip(keep)
        .filter(|(_, k)| *k)
        .map(|((_, span), _)| span)
        .collect()
}

fn focus_block(title: String, focused: bool) -> Block<'static> {
    let style = if focused {
        Style::new().fg(Color::Cyan)
    } else {
        Style::new()
    };
    Block::new()
        .borders(Borders::ALL)
        .border_style(style)
        .title(title)
}

fn process_cells(app: &App, p: &ProcessReport) -> Vec<String> {
    // An exited process: `x` before its pid (and dimmed).
    let pid = if app.is_exited(p.pid) {
        format!("x{}", p.pid)
    } else {
        p.pid.to_string()
    };
    // A process with findings: `!` before its name (they are in its detail pane).
    let name = crate::render::text::process_name(p);
    let name = if findings_of(app, p).next().is_some() {
        format!("!{name}")
    } else {
        name
    };
    vec![
        pid,
        name,
        rate(p.calls_per_sec),
        count(p.calls),
        count(p.errors),
        units::ns3(p.latency_ns.p50),
        units::ns3(p.latency_ns.p99),
        units::ns3(p.latency_ns.max),
        p.cmds.first().map(|c| c.cmd.clone()).unwrap_or_default(),
        // Threads inside membarrier on average (the time inside over the interval).
        format!("{:.2}", p.time_inside_pct / 100.0),
        // Share of a core its calls cost: on the callers' CPUs and in IPI handlers.
        format!("{:.1}", p.cpu_pct),
    ]
}

/// The process table's columns, most wanted first, with their least width and the spare width
/// they leave for the rest: on a narrow terminal the last ones go, PID and COMM stay. CPU%
/// comes only where COMM still gets room for a whole name (15 bytes: 18 spare).
const PROCESS_COLUMNS: [(Column, u16, u16); 11] = [
    (Column::Pid, 8, 0),
    (Column::Comm, 8, 0),
    (Column::Rate, 7, 0),
    (Column::Calls, 7, 0),
    (Column::P99, 6, 0),
    (Column::Errors, 6, 0),
    (Column::P50, 6, 0),
    (Column::Max, 6, 0),
    (Column::Inside, 7, 0),
    (Column::MainCmd, 8, 0),
    (Column::Cpu, 5, 18),
];

/// The columns that fit in `width` (inside the borders, one space between columns), in table
/// order, with their widths: what is left over widens COMM (2 parts) and MAIN CMD (3 parts).
fn process_columns(width: u16) -> Vec<(usize, u16)> {
    let mut kept = Vec::new();
    let mut used = 0u16;
    for (n, &(col, w, room)) in PROCESS_COLUMNS.iter().enumerate() {
        let need = w + u16::from(n > 0);
        if n < 2 || used + need + room <= width {
            kept.push((col, w));
            used += need;
        }
    }
    let spare = width.saturating_sub(used);
    let has_main = kept.iter().any(|(c, _)| *c == Column::MainCmd);
    Column::ALL
        .iter()
        .enumerate()
        .filter_map(|(i, c)| {
            let &(_, w) = kept.iter().find(|(k, _)| k == c)?;
            let extra = match c {
                Column::Comm if has_main => spare * 2 / 5,
                Column::Comm => spare,
                Column::MainCmd => spare - spare * 2 / 5,
                _ => 0,
            };
            Some((i, w + extra))
        })
        .collect()
}

fn render_processes(f: &mut Frame, app: &App, rows: &[&ProcessReport], area: Rect) {
    let block = focus_block(
        format!(" processes ({}; x = exited) ", rows.len()),
        app.focus == Pane::Processes,
    );
    if rows.is_empty() {
        let msg = if app.shown.processes.is_empty() {
            "no membarrier calls yet"
        } else {
            "no process matches the filter"
        };
        f.render_widget(
            Paragraph::new(msg)
                .alignment(Alignment::Center)
                .block(block),
            area,
        );
        return;
    }
    let cols = process_columns(area.width.saturating_sub(2));
    let header = Row::new(cols.iter().map(|&(i, _)| {
        let c = Column::ALL[i];
        let mark = if c == app.sort {
            if app.descending { "▼" } else { "▲" }
        } else {
            ""
        };
        Cell::from(format!("{}{mark}", c.title()))
    }))
    .style(Style::new().add_modifier(Modifier::BOLD));
    let body = rows.iter().map(|p| {
        let style = if app.is_exited(p.pid) {
            Style::new().fg(Color::DarkGray)
        } else {
            Style::new()
        };
        let mut cells = process_cells(app, p);
        Row::new(cols.iter().map(|&(i, _)| std::mem::take(&mut cells[i]))).style(style)
    });
    let widths = cols.iter().map(|&(_, w)| Constraint::Length(w));
    let table = Table::new(body, widths)
        .header(header)
        .block(block)
        .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED));
    let mut state = TableState::default()
        .with_selected(rows.iter().position(|p| Some(p.pid) == app.selected_pid));
    f.render_stateful_widget(table, area, &mut state);
}

/// The selected process's cmds, its RCU `writers`, and the selected cmd's figures.
fn render_detail(
    f: &mut Frame,
    app: &App,
    selected: Option<&ProcessReport>,
    writers: &[&WriterReport],
    area: Rect,
) {
    let Some(p) = selected else {
        f.render_widget(focus_block(" detail ".into(), false), area);
        return;
    };
    // The cmd rows on top, full width; below, the selected cmd's histogram beside the call
    // rate sparkline and where its time went.
    let cmds_h = (p.cmds.len() as u16 + 3).min(area.height.saturating_sub(DETAIL_BELOW_H).max(4));
    // The process's RCU writers under its cmds, when it has any and there is room.
    // It may take rows from the histogram, down to 6.
    let room = area.height.saturating_sub(cmds_h + 6);
    let writers_h = writers_height(writers.len()).min(room);
    let writers_h = if writers_h >= 4 { writers_h } else { 0 };
    let [cmds, writers_area, below] = Layout::vertical([
        Constraint::Length(cmds_h),
        Constraint::Length(writers_h),
        Constraint::Min(0),
    ])
    .areas(area);
    render_cmds(f, app, p, cmds);
    if writers_h > 0 {
        render_writers(f, writers, writers_area);
    }
    let [hist, right] =
        Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(below);
    let [spark, breakdown] =
        Layout::vertical([Constraint::Length(3), Constraint::Min(0)]).areas(right);
    if let Some(c) = p.cmds.get(app.selected_cmd) {
        render_histogram(f, c, hist);
        render_breakdown(f, c, &findings_of(app, p).collect::<Vec<_>>(), breakdown);
    }
    let history = app.history(p.pid);
    f.render_widget(
        Sparkline::default()
            .block(Block::new().borders(Borders::ALL).title(format!(
                " calls per {}s, last {} ",
                app.interval_secs,
                history.len()
            )))
            .data(&history)
            .style(Style::new().fg(Color::Green)),
        spark,
    );
}

fn render_cmds(f: &mut Frame, app: &App, p: &ProcessReport, area: Rect) {
    let title = format!(
        " {} {}: cmds (Tab, then j/k) ",
        p.pid,
        crate::render::text::process_name(p)
    );
    let header = Row::new([
        "CMD", "CALLS", "CALLS/S", "ERRORS", "P50", "P99", "MAX", "BLOCKED", "IPI/CALL",
    ])
    .style(Style::new().add_modifier(Modifier::BOLD));
    let rows = p.cmds.iter().map(|c| {
        let name = match c.kind {
            Kind::GracePeriod => format!("{} (GP)", c.cmd),
            _ if c.flags != 0 => format!("{} f={}", c.cmd, c.flags),
            _ => c.cmd.clone(),
        };
        Row::new([
            name,
            count(c.calls),
            rate(c.calls_per_sec),
            count(c.errors),
            units::ns3(c.latency_ns.p50),
            units::ns3(c.latency_ns.p99),
            units::ns3(c.latency_ns.max),
            format!("{:.0}%", c.blocked_pct()),
            format!("{:.2}", c.ipis_per_call()),
        ])
    });
    let table = Table::new(rows, name_then(&[7, 7, 6, 6, 6, 6, 7, 8]))
        .header(header)
        .block(focus_block(title, app.focus == Pane::Cmds))
        .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED));
    let mut state = TableState::default().with_selected(Some(app.selected_cmd));
    f.render_stateful_widget(table, area, &mut state);
}

/// A detail table's columns: the first (a name) takes the room the others leave, which have
/// these widths.
fn name_then(widths: &[u16]) -> Vec<Constraint> {
    std::iter::once(Constraint::Fill(1))
        .chain(widths.iter().map(|&w| Constraint::Length(w)))
        .collect()
}

/// The entries of `items` that are process `p`'s, by (pid, serial): `id` gives an entry's.
fn of_process<'a, T>(
    items: &'a [T],
    p: &ProcessReport,
    id: impl Fn(&T) -> (u32, u32),
) -> impl Iterator<Item = &'a T> {
    let want = (p.pid, p.serial);
    items.iter().filter(move |x| id(x) == want)
}

/// The findings of process `p`.
fn findings_of<'a>(app: &'a App, p: &ProcessReport) -> impl Iterator<Item = &'a Finding> {
    of_process(&app.shown.findings, p, |f| (f.pid, f.serial))
}

/// The RCU writers (grace periods per function and caller) of process `p`.
fn writers_of<'a>(app: &'a App, p: &ProcessReport) -> Vec<&'a WriterReport> {
    of_process(&app.shown.rcu_writers, p, |w| (w.pid, w.serial)).collect()
}

/// Rows a writers pane of `n` writers wants: none without writers, at most 5 rows shown.
fn writers_height(n: usize) -> u16 {
    if n == 0 { 0 } else { n.min(5) as u16 + 3 }
}

/// Each writer's caller, grace-period rate and latency, and its time's share in membarrier
/// calls and blocked waiting for readers.
fn render_writers(f: &mut Frame, writers: &[&WriterReport], area: Rect) {
    let header = Row::new([
        "CALLER", "GPS", "GPS/S", "P50", "P99", "MEMBAR", "BLOCKED", "THREADS",
    ])
    .style(Style::new().add_modifier(Modifier::BOLD));
    let share = |ns: u64, w: &WriterReport| {
        format!("{:.0}%", ns as f64 * 100.0 / w.latency_ns.sum.max(1) as f64)
    };
    let rows = writers.iter().map(|w| {
        Row::new([
            crate::render::text::caller(&w.caller),
            count(w.grace_periods),
            rate(w.grace_periods_per_sec),
            units::ns3(w.latency_ns.p50),
            units::ns3(w.latency_ns.p99),
            share(w.membarrier_ns, w),
            share(w.blocked_ns, w),
            w.threads.len().to_string(),
        ])
    });
    let title = " RCU writers: grace periods by caller ";
    f.render_widget(
        Table::new(rows, name_then(&[7, 7, 6, 6, 6, 7, 7]))
            .header(header)
            .block(Block::new().borders(Borders::ALL).title(title)),
        area,
    );
}

/// The cmd's latency histogram, one bar per power of two (more per bar when the width is
/// short), labelled with the bar's lower bound.
fn render_histogram(f: &mut Frame, c: &CmdReport, area: Rect) {
    let block = Block::new()
        .borders(Borders::ALL)
        .title(format!(" {} latency ", c.cmd));
    // (power of two of the bucket's upper bound) -> calls
    let mut by_pow: Vec<(u32, u64)> = Vec::new();
    for b in &c.histogram {
        let pow = 63 - b.le_ns.max(1).leading_zeros();
        match by_pow.last_mut() {
            Some((p, n)) if *p == pow => *n += b.count,
            _ => by_pow.push((pow, b.count)),
        }
    }
    let (Some(&(lo, _)), Some(&(hi, _))) = (by_pow.first(), by_pow.last()) else {
        f.render_widget(block, area);
        return;
    };
    const BAR_W: u16 = 5;
    let fits = (area.width.saturating_sub(2) / (BAR_W + 1)).max(1) as u32;
    let span = hi - lo + 1;
    let per_bar = span.div_ceil(fits);
    let bars: Vec<Bar> = (0..span.div_ceil(per_bar))
        .map(|i| {
            let from = lo + i * per_bar;
            let n: u64 = by_pow
                .iter()
                .filter(|(p, _)| (from..from + per_bar).contains(p))
                .map(|(_, n)| n)
                .sum();
            Bar::default()
                .value(n)
                .label(Line::from(units::bound(1u64 << from)))
        })
        .collect();
    f.render_widget(
        BarChart::default()
            .block(block)
            .bar_width(BAR_W)
            .bar_gap(1)
            .bar_style(Style::new().fg(Color::Cyan))
            .data(BarGroup::default().bars(&bars)),
        area,
    );
}

fn render_breakdown(f: &mut Frame, c: &CmdReport, findings: &[&Finding], area: Rect) {
    // The process's findings first: what to fix.
    let mut lines: Vec<Line> = findings
        .iter()
        .map(|x| Line::from(format!("! {}: {}", x.rule, x.fix)).style(Style::new().fg(Color::Red)))
        .collect();
    lines.extend([
        Line::from(format!(
            "blocked {} ({:.0}%), on CPU {}, summed over calls; p50 blocked {}",
            units::ns3(c.blocked_ns.sum),
            c.blocked_pct(),
            units::ns3(c.on_cpu_ns),
            units::ns3(c.blocked_ns.p50)
        )),
        Line::from(if c.ipis.per_cpu.is_empty() {
            format!(
                "IPIs {:.2}/call; handler {}",
                c.ipis_per_call(),
                units::ns3(c.ipis.handler_ns)
            )
        } else {
            format!(
                "IPIs {:.2}/call {}; handler {}",
                c.ipis_per_call(),
                counts(&c.ipis.per_cpu, "cpu"),
                units::ns3(c.ipis.handler_ns)
            )
        }),
        Line::from(format!(
            "mutex wait {} (max {})",
            units::ns3(c.mutex_wait_ns.sum),
            units::ns3(c.mutex_wait_ns.max)
        )),
    ]);
    if !c.woken_by.is_empty() {
        lines.push(Line::from(format!("woken by {}", counts(&c.woken_by, ""))));
    }
    if !c.ipis.victims.is_empty() {
        lines.push(Line::from(format!(
            "interrupted {}",
            victims(&c.ipis.victims, 3)
        )));
    }
    if !c.threads.is_empty() {
        lines.push(Line::from(format!(
            "threads: {}",
            crate::render::text::threads(&c.threads, 8)
        )));
    }
    // --stacks: the top stacks as an indented list, innermost frame first.
    if let (Some(stacks), Some(unattributed)) = (&c.stacks, c.unattributed) {
        lines.push(Line::from(format!(
            "stacks: {}, {unattributed} calls unattributed",
            stacks.len()
        )));
        for st in stacks.iter().take(3) {
            lines.push(Line::from(format!(
                "{}{} calls, {}{}",
                if st.estimated { "~" } else { "" },
                st.calls,
                units::ns3(st.latency_ns_sum),
                if st.truncated { " (truncated)" } else { "" }
            )));
            for fr in st.frames.iter().take(8) {
                lines.push(Line::from(format!("  {}", crate::render::text::frame(fr))));
            }
        }
    }
    f.render_widget(
        Paragraph::new(lines).wrap(Wrap { trim: true }).block(
            Block::new()
                .borders(Borders::ALL)
                .title(" where the time went "),
        ),
        area,
    );
}

fn render_help(f: &mut Frame, area: Rect, replay: bool) {
    let mut text = vec![
        "q, Esc, Ctrl-C   quit",
        "Up/Down, j/k     select",
        "Tab              processes <-> cmds",
        "s / S            sort column / order",
        "/                filter by comm or pid",
        "Space            pause the display",
        "c                next cmd's histogram",
        "?                this help",
    ];
    if replay {
        text.extend([
            "Left/Right       one interval back/on",
            "PgUp/PgDn        ten intervals back/on",
            "Home/End         the first/last interval",
            "g                go to a time",
        ]);
    }
    let w = 44.min(area.width);
    let h = (text.len() as u16 + 2).min(area.height);
    let popup = Rect::new(
        area.x + (area.width - w) / 2,
        area.y + (area.height - h) / 2,
        w,
        h,
    );
    f.render_widget(Clear, popup);
    f.render_widget(
        Paragraph::new(text.iter().map(|l| Line::from(*l)).collect::<Vec<_>>())
            .block(Block::new().borders(Borders::ALL).title(" keys ")),
        popup,
    );
}

#[cfg(test)]
mod tests {
    use ratatui::{Terminal, backend::TestBackend};

    use super::*;
    use crate::{
        model::{Model, Snapshot, tests::row},
        render::tui::app::App,
    };

    fn app() -> App {
        let mut model = Model::default();
        let mut app = App::new("tracepoints".into(), 1.0);
        let mut pe = row(4242, 8, 0, &[450, 520, 610, 700, 2_100, 15_000]);
        pe.ipis = 5;
        pe.ipi_hist[1] = 5;
        let snap = |s: u64, pe: crate::model::RawRow| Snapshot {
            elapsed_ns: s * 1_000_000_000,
            rows: vec![
                pe,
                row(4242, 1, 0, &[9_000_000, 12_000_000]),
                row(77, 0, 0, &[400]),
            ],
            comms: [
                ((4242, 0), "urcu-writer".into()),
                ((77, 0), "dotnet".into()),
            ]
            .into(),
            ipi_cpus: vec![(
                membarrier_trace_common::CpuKey {
                    tgid: 4242,
                    serial: 0,
                    cmd: 8,
                    flags: 0,
                    cpu: 1,
                },
                5,
            )],
            grace_period_source: GraceSource::Sched,
            threads: [(4243, "writer-a", 4), (4244, "writer-b", 2)]
                .map(|(tid, name, n)| {
                    let mut calls = [0; membarrier_trace_common::THREAD_CMDS];
                    calls[membarrier_trace_common::thread_cmd(8, 0)] = n;
                    crate::model::ThreadRow {
                        proc: (4242, 0),
                        tid,
                        name: name.into(),
                        calls,
                        threads: 1,
                    }
                })
                .to_vec(),
            writers: vec![writer()],
            gp_funcs: vec![crate::model::GpFunc {
                flavour: "memb",
                function: "urcu_memb_synchronize_rcu".into(),
                library: "/usr/lib/x86_64-linux-gnu/liburcu-memb.so.8".into(),
            }],
            callers: [(
                ((4242, 0), 0x401234),
                crate::model::Caller {
                    address: 0x401234,
                    symbol: Some("writer_a".into()),
                    offset: Some(0x1c),
                    module: Some("/opt/urcu-writer".into()),
                    ..Default::default()
                },
            )]
            .into(),
            ..Snapshot::default()
        };
        app.update(model.report(&snap(1, pe.clone())), |p| p != 77);
        app
    }

    /// Three grace periods of 10 ms from writer_a: 6 membarrier calls (30 us in all), 24 ms
    /// waiting for readers.
    fn writer() -> crate::model::WriterRow {
        let mut hist = crate::model::hist::Histogram::default();
        [9_000_000, 10_000_000, 11_000_000]
            .iter()
            .for_each(|&l| hist.record(l));
        crate::model::WriterRow {
            key: membarrier_trace_common::WriterKey {
                tgid: 4242,
                serial: 0,
                tid: 4243,
                func: 0,
                caller: 0x401234,
            },
            count: 3,
            sum_ns: 30_000_000,
            min_ns: 9_000_000,
            max_ns: 11_000_000,
            hist,
            membarrier_calls: 6,
            membarrier_ns: 30_000,
            blocked_ns: 24_000_000,
            thread: "writer-a".into(),
        }
    }

    fn draw(app: &App, w: u16, h: u16) -> TestBackend {
        let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
        t.draw(|f| render(f, app)).unwrap();
        t.backend().clone()
    }

    #[test]
    fn dashboard_80x24() {
        insta::assert_snapshot!(draw(&app(), 80, 24));
    }

    #[test]
    fn dashboard_120x40_with_help() {
        let mut app = app();
        app.help = true;
        insta::assert_snapshot!(draw(&app, 120, 40));
    }

    #[test]
    fn empty_state() {
        let app = App::new("tracepoints".into(), 1.0);
        insta::assert_snapshot!(draw(&app, 80, 24));
    }

    #[test]
    fn short_terminal_drops_the_detail() {
        insta::assert_snapshot!(draw(&app(), 80, 14));
    }

    #[test]
    fn tiny_terminals_do_not_panic() {
        for (w, h) in [(20, 5), (1, 1), (39, 9), (40, 10), (0, 0)] {
            draw(&app(), w, h);
        }
        insta::assert_snapshot!(draw(&app(), 20, 5));
    }

    fn text(b: &TestBackend) -> Vec<String> {
        let buf = b.buffer();
        (0..buf.area.height)
            .map(|y| {
                (0..buf.area.width)
                    .map(|x| buf[(x, y)].symbol())
                    .collect::<String>()
            })
            .collect()
    }

    /// Losses are shown whole at every width, and rows keep PID and COMM: other columns go.
    #[test]
    fn narrow_terminals_keep_losses_pid_and_comm() {
        let mut model = Model::default();
        let mut app = App::new("tracepoints".into(), 1.0);
        let snap = Snapshot {
            elapsed_ns: 1_000_000_000,
            rows: vec![row(4_194_303, 8, 0, &[500; 3])],
            comms: [((4_194_303, 0), "urcu-writer".into())].into(),
            losses: crate::model::Losses {
                missed_calls: 123_456_789,
                calls_without_row: 9952,
                ..Default::default()
            },
            ..Snapshot::default()
        };
        app.update(model.report(&snap), |_| true);
        for w in [40, 50, 63, 64, 80, 200] {
            let lines = text(&draw(&app, w, 24));
            let all = lines.concat();
            assert!(all.contains("missed 123456789"), "{w}: {lines:#?}");
            assert!(all.contains("dropped 9952"), "{w}: {lines:#?}");
            let row = lines.iter().find(|l| l.contains("4194303")).unwrap();
            assert!(row.contains("urcu-wri"), "{w}: {row}");
            assert!(w < 80 || row.contains("PRIVATE_"), "{w}: {row}");
        }
        insta::assert_snapshot!(draw(&app, 40, 12));
    }

    /// A qsbr writer makes no membarrier calls: it still gets a row, and its writers pane.
    #[test]
    fn a_writer_without_membarrier_calls_has_a_row_and_its_writers() {
        let mut model = Model::default();
        let mut app = App::new("tracepoints".into(), 1.0);
        let mut w = writer();
        w.key.tgid = 5151;
        let snap = Snapshot {
            elapsed_ns: 1_000_000_000,
            writers: vec![w],
            gp_funcs: vec![crate::model::GpFunc {
                flavour: "qsbr",
                function: "urcu_qsbr_synchronize_rcu".into(),
                library: "/usr/lib/x86_64-linux-gnu/liburcu-qsbr.so.8".into(),
            }],
            comms: [((5151, 0), "qsbr-writer".into())].into(),
            ..Snapshot::default()
        };
        let report = model.report(&snap);
        assert!(report.processes.is_empty(), "not a membarrier caller");
        app.update(report, |_| true);
        let rows: Vec<(u32, u64)> = app.rows().iter().map(|p| (p.pid, p.calls)).collect();
        assert_eq!(rows, [(5151, 0)]);
        assert_eq!(app.selected_pid, Some(5151));
        let lines = text(&draw(&app, 100, 30));
        let all = lines.concat();
        assert!(all.contains("qsbr-writer"), "{lines:#?}");
        assert!(all.contains("RCU writers"), "{lines:#?}");
        assert!(
            all.contains("urcu_qsbr_synchronize_rcu") || all.contains("0x401234"),
            "{lines:#?}"
        );
    }

    #[test]
    fn labels() {
        assert_eq!(units::bound(512), "512ns");
        assert_eq!(units::bound(16_384), "16us");
        assert_eq!(units::bound(8_388_608), "8ms");
        assert_eq!(units::bound(2_147_483_648), "2s");
        assert_eq!(units::ns3(687), "687ns");
        assert_eq!(count(9_999_999), "9999999");
        assert_eq!(count(13_068_190), "13.1M");
        assert_eq!(count(4_560_000_000), "4.56G");
        assert_eq!(rate(1_131_014.0), "1131014");
        assert_eq!(rate(12_500_000.0), "12.5M");
        assert_eq!(units::ns3(15_000), "15.0us");
        assert_eq!(units::ns3(11_800_000), "11.8ms");
        assert_eq!(units::ns3(1_250), "1.25us");
        assert_eq!(units::ns3(250_000_000), "250ms");
    }
}
