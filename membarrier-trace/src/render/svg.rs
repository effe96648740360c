//! `report FILE --svg OUT.svg`: a recording drawn. Per busy (process, cmd) and RCU writer, a
//! latency heatmap over time (x time, y latency on a log scale, a cell's colour its calls) with
//! the p50 and p99 of each column, and the call rate under it; with stacks recorded, a flame
//! graph of the callers. One self-contained SVG: no script, font or link to fetch.
//!
//! Each cell carries its calls (`data-calls`), each chart its total (`data-total`): the cells
//! of a chart add up to its calls in the window, which the tests check.

use std::{
    collections::BTreeMap, fmt::Write as _, io::Write as _, os::unix::fs::OpenOptionsExt as _,
    path::Path,
};

use anyhow::{Context as _, Result};

use crate::{
    model::{Bucket, Model, Report, Snapshot},
    render::{
        text::{folded, printable},
        units,
    },
    store::{Recording, delta},
};

/// The most columns a heatmap has: longer windows put several intervals in one.
const MAX_COLUMNS: usize = 240;
/// Charts of (process, cmd) and of RCU writers, the busiest first.
const MAX_CMDS: usize = 8;
const MAX_WRITERS: usize = 4;
/// Rows per power of two of latency.
const ROWS_PER_OCTAVE: f64 = 4.0;

const WIDTH: f64 = 1000.0;
const LEFT: f64 = 70.0;
const PLOT: f64 = WIDTH - LEFT - 20.0;
const HEAT: f64 = 160.0;
const RATE: f64 = 50.0;

/// What a chart is of.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Of {
    Cmd {
        pid: u32,
        serial: u32,
        comm: String,
        cmd: String,
        flags: u32,
    },
    Writer {
        pid: u32,
        serial: u32,
        comm: String,
        function: String,
        caller: String,
    },
}

/// One column of a chart: its calls by latency bucket.
#[derive(Default, Clone)]
struct Column {
    buckets: BTreeMap<u64, u64>,
    calls: u64,
}

/// The window's columns per chart, and what each column spans.
struct Drawn {
    charts: BTreeMap<Of, Vec<Column>>,
    columns: usize,
    /// Seconds from the start of tracing at the window's start and each column's end.
    edges: Vec<f64>,
}

/// Draws the recording's window (`first` exclusive to `last` inclusive: interval indices)
/// into `out`, a new file; `whole` is the window's snapshot (for the titles and the flame
/// graph).
pub fn write(
    rec: &Recording,
    first: Option<usize>,
    last: usize,
    pids: &[u32],
    whole: &Snapshot,
    out: &Path,
) -> Result<()> {
    let drawn = columns(rec, first, last, pids);
    let report = Model::default().report(whole);
    let svg = draw(rec, &drawn, &report, whole.stacks.is_some());
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(out)
        .with_context(|| format!("creating {} (a new file)", out.display()))?;
    f.write_all(svg.as_bytes())
        .with_context(|| format!("writing {}", out.display()))?;
    eprintln!(
        "membarrier-trace: drew {} charts over {} intervals in {}",
        drawn.charts.len(),
        last - first.map_or(0, |f| f + 1) + 1,
        out.display()
    );
    Ok(())
}

/// Each interval's report, folded into columns per chart.
fn columns(rec: &Recording, first: Option<usize>, last: usize, pids: &[u32]) -> Drawn {
    let start = first.map_or(0, |f| f + 1);
    let n = last + 1 - start;
    let per_column = n.div_ceil(MAX_COLUMNS).max(1);
    let columns = n.div_ceil(per_column);
    let mut charts: BTreeMap<Of, Vec<Column>> = BTreeMap::new();
    let mut state = rec.state_at(first);
    let secs = |ns: u64| ns as f64 / 1e9;
    let mut edges = vec![secs(state.head().elapsed_ns)];
    for i in start..=last {
        let before = state.clone();
        let change = &rec.intervals[i];
        change.apply_to(&mut state);
        // The interval's own entry is the change between the two states: not taken again.
        let mut snap = rec.snapshot(&delta::window_by(&before, &state, change));
        if !pids.is_empty() {
            snap.only(pids);
        }
        let r = Model::default().report(&snap);
        let col = (i - start) / per_column;
        if edges.len() <= col + 1 {
            edges.push(0.0);
        }
        edges[col + 1] = secs(state.head().elapsed_ns);
        for (of, calls, buckets) in series(&r) {
            let c = &mut charts
                .entry(of)
                .or_insert_with(|| vec![Column::default(); columns])[col];
            c.calls += calls;
            for b in buckets {
                *c.buckets.entry(b.le_ns).or_default() += b.count;
            }
        }
    }
    // The busiest charts only.
    let mut by_calls: Vec<(&Of, u64)> = charts
        .iter()
        .map(|(of, cols)| (of, cols.iter().map(|c| c.calls).sum()))
        .collect();
    by_calls.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let mut keep = Vec::new();
    let (mut cmds, mut writers) = (0, 0);
    for (of, _) in by_calls {
        let n = if matches!(of, Of::Cmd { .. }) {
            &mut cmds
        } else {
            &mut writers
        };
        let max = if matches!(of, Of::Cmd { .. }) {
            MAX_CMDS
        } else {
            MAX_WRITERS
        };
        if *n < max {
            *n += 1;
            keep.push(of.clone());
        }
    }
    charts.retain(|of, _| keep.contains(of));
    Drawn {
        charts,
        columns,
        edges,
    }
}

/// A report's charts: per (process, cmd, flags) and per RCU writer, calls and buckets.
fn series(r: &Report) -> Vec<(Of, u64, &[Bucket])> {
    let mut out = Vec::new();
    for p in &r.processes {
        for c in p.cmds.iter().filter(|c| c.calls > 0) {
            let of = Of::Cmd {
                pid: p.pid,
                serial: p.serial,
                comm: p.comm.clone(),
                cmd: c.cmd.clone(),
                flags: c.flags,
            };
            out.push((of, c.calls, c.histogram.as_slice()));
        }
    }
    for w in r.rcu_writers.iter().filter(|w| w.grace_periods > 0) {
        let of = Of::Writer {
            pid: w.pid,
            serial: w.serial,
            comm: w.comm.clone(),
            function: w.function.clone(),
            caller: super::text::code_name(&w.caller),
        };
        out.push((of, w.grace_periods, w.histogram.as_slice()));
    }
    out
}

/// XML text: escaped, and control characters (not allowed in XML 1.0) shown as printable.
fn esc(s: &str) -> String {
    printable(s)
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The row of a latency: quarter octaves.
fn row_of(ns: u64) -> i64 {
    ((ns.max(1) as f64).log2() * ROWS_PER_OCTAVE).floor() as i64
}

/// A count's colour: pale yellow to dark red, on a log scale up to `max`.
fn colour(n: u64, max: u64) -> String {
    let t = ((n as f64).ln_1p() / (max as f64).ln_1p()).clamp(0.0, 1.0);
    let lerp = |a: f64, b: f64| (a + (b - a) * t).round() as u8;
    format!(
        "#{:02x}{:02x}{:02x}",
        lerp(255.0, 128.0),
        lerp(237.0, 0.0),
        lerp(160.0, 38.0)
    )
}

/// The `q` quantile of a column (the upper edge of the bucket holding it).
fn quantile(c: &Column, q: f64) -> Option<u64> {
    let total: u64 = c.buckets.values().sum();
    let rank = ((q * total as f64).ceil() as u64).max(1);
    let mut seen = 0;
    c.buckets.iter().find_map(|(&le, &n)| {
        seen += n;
        (seen >= rank).then_some(le)
    })
}

/// Long: the document's parts (header, each chart's title, heatmap, quantile lines, rate, axes,
/// the flame graph) follow one another down the page.
fn draw(rec: &Recording, d: &Drawn, whole: &Report, stacks: bool) -> String {
    let mut body = String::new();
    let mut y = 60.0;
    let col_w = PLOT / d.columns.max(1) as f64;
    let h = &rec.header;
    let t0 = d.edges.first().copied().unwrap_or(0.0);
    let t1 = d.edges.last().copied().unwrap_or(t0);
    // The processes' cmds first, then the writers; the busiest first in each.
    let mut charts: Vec<(&Of, &Vec<Column>, u64)> = d
        .charts
        .iter()
        .map(|(of, cols)| (of, cols, cols.iter().map(|c| c.calls).sum()))
        .collect();
    charts.sort_by(|a, b| {
        let writer = |of: &Of| matches!(of, Of::Writer { .. });
        (writer(a.0), b.2, a.0).cmp(&(writer(b.0), a.2, b.0))
    });
    for (of, cols, total) in charts {
        let (title, kind) = match of {
            Of::Cmd {
                pid,
                comm,
                cmd,
                flags,
                ..
            } => (
                format!(
                    "{} ({pid}) {cmd}{}",
                    comm,
                    if *flags != 0 {
                        format!(" flags {flags:#x}")
                    } else {
                        String::new()
                    }
                ),
                "calls",
            ),
            Of::Writer {
                pid,
                comm,
                function,
                caller,
                ..
            } => (
                format!("{comm} ({pid}) {function} from {caller}"),
                "grace periods",
            ),
        };
        let all: Vec<u64> = cols
            .iter()
            .flat_map(|c| c.buckets.keys().copied())
            .collect();
        // At least three octaves tall: a chart of one bucket still shows where it lies.
        let lo = row_of(*all.iter().min().unwrap_or(&1));
        let hi = row_of(*all.iter().max().unwrap_or(&1)).max(lo + 3 * ROWS_PER_OCTAVE as i64 - 1);
        let rows = (hi - lo + 1).max(1);
        let row_h = HEAT / rows as f64;
        // Each column's calls by row, once: the cells, and the colour scale's top.
        let cells: Vec<BTreeMap<i64, u64>> = cols
            .iter()
            .map(|c| {
                let mut by_row = BTreeMap::new();
                for (&le, &n) in &c.buckets {
                    *by_row.entry(row_of(le)).or_default() += n;
                }
                by_row
            })
            .collect();
        let max_cell = cells
            .iter()
            .flat_map(|c| c.values().copied())
            .max()
            .unwrap_or(1);
        let _ = writeln!(
            body,
            "<g class=\"chart\" data-of=\"{}\" data-total=\"{total}\">",
            esc(&title)
        );
        let _ = writeln!(
            body,
            "<text x=\"{LEFT}\" y=\"{y}\" class=\"title\">{}: {total} {}</text>",
            esc(&title),
            if total == 1 {
                kind.trim_end_matches('s')
            } else {
                kind
            }
        );
        let top = y + 8.0;
        let _ = writeln!(
            body,
            "<rect x=\"{LEFT}\" y=\"{top}\" width=\"{PLOT}\" height=\"{HEAT}\" class=\"frame\"/>"
        );
        for (x, by_row) in cells.iter().enumerate() {
            for (&row, &n) in by_row {
                let cy = top + HEAT - (row - lo + 1) as f64 * row_h;
                let from = 2f64.powf(row as f64 / ROWS_PER_OCTAVE) as u64;
                let to = 2f64.powf((row + 1) as f64 / ROWS_PER_OCTAVE) as u64;
                let _ = writeln!(
                    body,
                    "<rect class=\"cell\" x=\"{:.1}\" y=\"{cy:.1}\" width=\"{:.1}\" height=\"{row_h:.1}\" fill=\"{}\" data-calls=\"{n}\"><title>{:.1}-{:.1} s: {n} {kind} of {}-{}</title></rect>",
                    LEFT + x as f64 * col_w,
                    col_w.max(0.5),
                    colour(n, max_cell),
                    d.edges[x],
                    d.edges[x + 1],
                    units::ns(from),
                    units::ns(to)
                );
            }
        }
        // p50 and p99 of each column, at the middle of the column.
        let y_of = |ns: u64| {
            let r = (ns.max(1) as f64).log2() * ROWS_PER_OCTAVE - lo as f64;
            top + HEAT - (r.clamp(0.0, rows as f64)) * row_h
        };
        for (q, class) in [(0.5, "p50"), (0.99, "p99")] {
            let pts: Vec<String> = cols
                .iter()
                .enumerate()
                .filter_map(|(x, c)| {
                    let v = quantile(c, q)?;
                    Some(format!(
                        "{:.1},{:.1}",
                        LEFT + (x as f64 + 0.5) * col_w,
                        y_of(v)
                    ))
                })
                .collect();
            let _ = writeln!(
                body,
                "<polyline class=\"{class}\" points=\"{}\"/>",
                pts.join(" ")
            );
        }
        // The latency axis: each octave's edge that is in range, labelled every other.
        for row in (lo..=hi + 1).filter(|r| r.rem_euclid(ROWS_PER_OCTAVE as i64 * 2) == 0) {
            let ly = top + HEAT - (row - lo) as f64 * row_h;
            let ns = 2f64.powf(row as f64 / ROWS_PER_OCTAVE) as u64;
            let _ = writeln!(
                body,
                "<text x=\"{:.1}\" y=\"{:.1}\" class=\"axis\" text-anchor=\"end\">{}</text>",
                LEFT - 4.0,
                ly + 3.0,
                units::ns(ns)
            );
        }
        // The rate under it.
        let rtop = top + HEAT + 6.0;
        let rates: Vec<f64> = cols
            .iter()
            .enumerate()
            .map(|(x, c)| c.calls as f64 / (d.edges[x + 1] - d.edges[x]).max(1e-9))
            .collect();
        let rmax = rates.iter().copied().fold(0.0, f64::max).max(1e-9);
        let pts: Vec<String> = rates
            .iter()
            .enumerate()
            .map(|(x, r)| {
                format!(
                    "{:.1},{:.1}",
                    LEFT + (x as f64 + 0.5) * col_w,
                    rtop + RATE - r / rmax * RATE
                )
            })
            .collect();
        let _ = writeln!(
            body,
            "<rect x=\"{LEFT}\" y=\"{rtop}\" width=\"{PLOT}\" height=\"{RATE}\" class=\"frame\"/>\n<polyline class=\"rate\" points=\"{}\"/>\n<text x=\"{:.1}\" y=\"{:.1}\" class=\"axis\" text-anchor=\"end\">{}/s</text>\n<text x=\"{:.1}\" y=\"{:.1}\" class=\"axis\" text-anchor=\"end\">0</text>",
            pts.join(" "),
            LEFT - 4.0,
            rtop + 8.0,
            units::per_sec(rmax),
            LEFT - 4.0,
            rtop + RATE
        );
        let by = rtop + RATE + 14.0;
        let _ = writeln!(
            body,
            "<text x=\"{LEFT}\" y=\"{by}\" class=\"axis\">{t0:.1} s</text><text x=\"{:.1}\" y=\"{by}\" class=\"axis\" text-anchor=\"end\">{t1:.1} s</text>\n</g>",
            LEFT + PLOT
        );
        y = by + 36.0;
    }
    if d.charts.is_empty() {
        let _ = writeln!(
            body,
            "<text x=\"{LEFT}\" y=\"{y}\">No calls in this window.</text>"
        );
        y += 30.0;
    }
    if stacks {
        y = flame(&mut body, &folded(whole), y);
    }
    let window = format!(
        "{} to {} ({:.1} s to {:.1} s from the start)",
        crate::model::rfc3339(h.started_unix_ns + (t0 * 1e9) as u64),
        crate::model::rfc3339(h.started_unix_ns + (t1 * 1e9) as u64),
        t0,
        t1
    );
    let mut s = String::new();
    let _ = write!(
        s,
        r##"<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{:.0}" viewBox="0 0 {WIDTH} {:.0}" font-family="sans-serif" font-size="11">
<style>
.title {{ font-size: 13px; font-weight: bold; }}
.axis {{ fill: #555; font-size: 10px; }}
.frame {{ fill: #fafafa; stroke: #ccc; }}
.p50 {{ fill: none; stroke: #1f77b4; stroke-width: 1.5; }}
.p99 {{ fill: none; stroke: #2ca02c; stroke-width: 1.5; stroke-dasharray: 4 2; }}
.rate {{ fill: none; stroke: #444; stroke-width: 1.2; }}
.flame rect {{ stroke: #fff; stroke-width: 0.5; }}
</style>
<text x="{LEFT}" y="22" class="title">membarrier-trace: {} on {} (Linux {})</text>
<text x="{LEFT}" y="38" class="axis">{} · each column {:.2} s · colour: calls per cell (log) · blue: p50 · green dashed: p99</text>
"##,
        y + 10.0,
        y + 10.0,
        esc(&h.attach),
        esc(&h.hostname),
        esc(&h.kernel),
        esc(&window),
        (t1 - t0) / d.columns.max(1) as f64,
    );
    s.push_str(&body);
    s.push_str("</svg>\n");
    s
}

/// A flame graph of folded stacks (`comm;CMD;outermost;...;innermost calls`): the root at the
/// top, each frame as wide as its calls. Returns the y below it.
fn flame(body: &mut String, folded: &str, y: f64) -> f64 {
    #[derive(Default)]
    struct Node {
        calls: u64,
        children: BTreeMap<String, Node>,
    }
    let mut root = Node::default();
    for line in folded.lines() {
        let Some((path, n)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(n) = n.parse::<u64>() else { continue };
        root.calls += n;
        let mut at = &mut root;
        for f in path.split(';') {
            at = at.children.entry(f.to_string()).or_default();
            at.calls += n;
        }
    }
    if root.calls == 0 {
        return y;
    }
    const ROW: f64 = 16.0;
    let _ = writeln!(
        body,
        "<g class=\"flame\" data-total=\"{}\"><text x=\"{LEFT}\" y=\"{y}\" class=\"title\">Callers: {} calls with stacks (process; cmd; outermost frame first)</text>",
        root.calls, root.calls
    );
    let mut deepest = 0;
    let mut todo = vec![(&root, 0usize, LEFT, PLOT)];
    while let Some((node, depth, x, w)) = todo.pop() {
        deepest = deepest.max(depth);
        let mut cx = x;
        for (name, child) in &node.children {
            let cw = w * child.calls as f64 / node.calls as f64;
            let cy = y + 8.0 + depth as f64 * ROW;
            let hue = 10 + (name.bytes().map(u32::from).sum::<u32>() % 40);
            let label = if cw > 40.0 {
                let fit = (cw / 6.5) as usize;
                let t: String = name.chars().take(fit).collect();
                format!(
                    "<text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
                    cx + 3.0,
                    cy + 12.0,
                    esc(&t)
                )
            } else {
                String::new()
            };
            let _ = writeln!(
                body,
                "<g><title>{}: {} calls</title><rect x=\"{cx:.1}\" y=\"{cy:.1}\" width=\"{cw:.1}\" height=\"{:.1}\" fill=\"hsl({hue},85%,60%)\"/>{label}</g>",
                esc(name),
                child.calls,
                ROW - 1.0
            );
            todo.push((child, depth + 1, cx, cw));
            cx += cw;
        }
    }
    body.push_str("</g>\n");
    y + 8.0 + (deepest + 1) as f64 * ROW + 20.0
}
