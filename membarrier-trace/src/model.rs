//! The data model every output reads: the collector turns the kernel's maps into a
//! [`Snapshot`]; [`Model::report`] turns snapshots into [`Report`]s, which the text and JSON
//! outputs (and later the TUI) only render.

use std::collections::{BTreeMap, HashMap};

use membarrier_trace_common::StatsKey;
use serde::Serialize;

use crate::{
    cmd::{self, Kind},
    hist::Histogram,
};

/// One kernel stats row, summed over CPUs.
#[derive(Clone, Debug)]
pub struct RawRow {
    pub key: StatsKey,
    pub count: u64,
    pub sum_ns: u64,
    pub min_ns: u64,
    pub max_ns: u64,
    pub hist: Histogram,
}

/// Everything read from the kernel at one instant; counts are totals since the tracer started.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Time since the programs were attached.
    pub elapsed_ns: u64,
    pub rows: Vec<RawRow>,
    /// Calls seen only half: an exit without its enter, plus (in the final snapshot) calls still
    /// inside membarrier when tracing stopped.
    pub missed_calls: u64,
    /// Map insertions the kernel refused because a map was full.
    pub dropped: u64,
    /// Process names by tgid.
    pub comms: HashMap<u32, String>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Report {
    /// Time since tracing started.
    pub duration_ns: u64,
    /// The window `calls_per_sec` figures are measured over: the last interval, or the whole run.
    pub window_ns: u64,
    pub calls: u64,
    pub calls_per_sec: f64,
    pub missed_calls: u64,
    pub dropped: u64,
    pub processes: Vec<ProcessReport>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ProcessReport {
    pub pid: u32,
    pub comm: String,
    pub calls: u64,
    pub calls_per_sec: f64,
    pub errors: u64,
    /// EPERM from expedited cmds: the process issued them without registering first.
    pub unregistered_eperm: u64,
    pub cmds: Vec<CmdReport>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct CmdReport {
    /// Kernel name (`PRIVATE_EXPEDITED`), or `INVALID(<value>)`.
    pub cmd: String,
    pub cmd_value: i32,
    pub kind: Kind,
    pub flags: u32,
    pub calls: u64,
    pub calls_per_sec: f64,
    pub errors: u64,
    /// Failed calls by errno name.
    pub errno: BTreeMap<String, u64>,
    /// Over every call of the row, failed ones included.
    pub latency_ns: Latency,
    pub histogram: Vec<Bucket>,
}

#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
pub struct Latency {
    pub min: u64,
    pub max: u64,
    pub sum: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
}

#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
pub struct Bucket {
    /// Inclusive upper bound of the bucket.
    pub le_ns: u64,
    pub count: u64,
}

/// Turns snapshots into reports, remembering the previous one for per-window rates.
#[derive(Default)]
pub struct Model {
    prev_calls: HashMap<(u32, u32, u32), u64>,
    prev_elapsed_ns: u64,
}

impl Model {
    pub fn report(&mut self, snap: &Snapshot) -> Report {
        let window_ns = snap.elapsed_ns.saturating_sub(self.prev_elapsed_ns);
        let per_sec = |n: u64| {
            if window_ns == 0 {
                0.0
            } else {
                n as f64 * 1e9 / window_ns as f64
            }
        };

        // (tgid, cmd, flags) -> rows of each outcome.
        let mut groups: BTreeMap<(u32, i32, u32), Vec<&RawRow>> = BTreeMap::new();
        for row in &snap.rows {
            let k = row.key;
            groups
                .entry((k.tgid, k.cmd as i32, k.flags))
                .or_default()
                .push(row);
        }

        let mut processes: BTreeMap<u32, ProcessReport> = BTreeMap::new();
        let mut next_calls = HashMap::new();
        for ((tgid, cmd_value, flags), rows) in groups {
            let mut hist = Histogram::default();
            let mut errno = BTreeMap::new();
            let (mut calls, mut errors, mut sum, mut max) = (0, 0, 0, 0);
            let mut min = u64::MAX;
            for r in &rows {
                hist.add(&r.hist.counts);
                calls += r.count;
                sum += r.sum_ns;
                max = max.max(r.max_ns);
                min = min.min(r.min_ns);
                if r.key.errno != 0 {
                    errors += r.count;
                    *errno.entry(cmd::errno_name(r.key.errno)).or_insert(0) += r.count;
                }
            }
            let min = if calls == 0 { 0 } else { min };
            let key = (tgid, cmd_value as u32, flags);
            let before = self.prev_calls.get(&key).copied().unwrap_or(0);
            next_calls.insert(key, calls);
            let row = CmdReport {
                cmd: cmd::display_name(cmd_value),
                cmd_value,
                kind: cmd::kind(cmd_value),
                flags,
                calls,
                calls_per_sec: per_sec(calls.saturating_sub(before)),
                errors,
                errno,
                latency_ns: Latency {
                    min,
                    max,
                    sum,
                    p50: hist.quantile(0.5, min, max),
                    p90: hist.quantile(0.9, min, max),
                    p99: hist.quantile(0.99, min, max),
                    p999: hist.quantile(0.999, min, max),
                },
                histogram: hist
                    .buckets(max)
                    .into_iter()
                    .map(|(le_ns, count)| Bucket { le_ns, count })
                    .collect(),
            };
            let p = processes.entry(tgid).or_insert_with(|| ProcessReport {
                pid: tgid,
                comm: snap.comms.get(&tgid).cloned().unwrap_or_default(),
                calls: 0,
                calls_per_sec: 0.0,
                errors: 0,
                unregistered_eperm: 0,
                cmds: Vec::new(),
            });
            if row.kind == Kind::Barrier {
                p.unregistered_eperm += row.errno.get("EPERM").copied().unwrap_or(0);
            }
            p.calls += row.calls;
            p.calls_per_sec += row.calls_per_sec;
            p.errors += row.errors;
            p.cmds.push(row);
        }
        self.prev_calls = next_calls;
        self.prev_elapsed_ns = snap.elapsed_ns;

        let mut processes: Vec<ProcessReport> = processes.into_values().collect();
        // Busiest first; ties by pid so the order is stable.
        processes.sort_by(|a, b| b.calls.cmp(&a.calls).then(a.pid.cmp(&b.pid)));
        for p in &mut processes {
            p.cmds
                .sort_by(|a, b| b.calls.cmp(&a.calls).then(a.cmd_value.cmp(&b.cmd_value)));
        }
        let calls = processes.iter().map(|p| p.calls).sum();
        Report {
            duration_ns: snap.elapsed_ns,
            window_ns,
            calls,
            calls_per_sec: processes.iter().map(|p| p.calls_per_sec).sum(),
            missed_calls: snap.missed_calls,
            dropped: snap.dropped,
            processes,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn row(tgid: u32, cmd: i32, errno: u32, lat: &[u64]) -> RawRow {
        let mut hist = Histogram::default();
        lat.iter().for_each(|&l| hist.record(l));
        RawRow {
            key: StatsKey {
                tgid,
                cmd: cmd as u32,
                flags: 0,
                errno,
            },
            count: lat.len() as u64,
            sum_ns: lat.iter().sum(),
            min_ns: *lat.iter().min().unwrap(),
            max_ns: *lat.iter().max().unwrap(),
            hist,
        }
    }

    pub(crate) fn snapshot() -> Snapshot {
        Snapshot {
            elapsed_ns: 2_000_000_000,
            rows: vec![
                row(42, 8, 0, &[400, 500, 600, 700]),
                row(42, 8, 1, &[100, 120]),
                row(42, 1, 0, &[12_000_000]),
                row(7, 0, 0, &[90]),
                row(7, 3, 22, &[80]),
            ],
            missed_calls: 1,
            dropped: 0,
            comms: [(42, "urcu".to_string()), (7, "other".to_string())].into(),
        }
    }

    #[test]
    fn groups_outcomes_into_cmd_rows() {
        let r = Model::default().report(&snapshot());
        assert_eq!(r.calls, 9);
        assert_eq!(r.processes.len(), 2);
        let p = &r.processes[0];
        assert_eq!(
            (p.pid, p.comm.as_str(), p.calls, p.errors),
            (42, "urcu", 7, 2)
        );
        let pe = &p.cmds[0];
        assert_eq!(pe.cmd, "PRIVATE_EXPEDITED");
        assert_eq!((pe.calls, pe.errors), (6, 2));
        assert_eq!(pe.errno, [("EPERM".to_string(), 2)].into());
        assert_eq!(pe.latency_ns.min, 100);
        assert_eq!(pe.latency_ns.max, 700);
        assert_eq!(pe.latency_ns.sum, 2420);
        assert_eq!(pe.histogram.iter().map(|b| b.count).sum::<u64>(), 6);
        assert_eq!(p.cmds[1].kind, Kind::GracePeriod);
        assert_eq!(p.cmds[1].latency_ns.p50, 12_000_000);
        let inv = r.processes[1]
            .cmds
            .iter()
            .find(|c| c.cmd_value == 3)
            .unwrap();
        assert_eq!(inv.cmd, "INVALID(3)");
        assert_eq!(inv.kind, Kind::Invalid);
        assert_eq!(inv.errno, [("EINVAL".to_string(), 1)].into());
    }

    #[test]
    fn rates_cover_the_last_window() {
        let mut m = Model::default();
        let mut s = snapshot();
        let first = m.report(&s);
        assert_eq!(first.window_ns, 2_000_000_000);
        assert_eq!(first.processes[0].cmds[0].calls_per_sec, 3.0);
        // One second later, 10 more PRIVATE_EXPEDITED calls.
        s.elapsed_ns += 1_000_000_000;
        s.rows[0] = row(42, 8, 0, &[500; 14]);
        let second = m.report(&s);
        assert_eq!(second.window_ns, 1_000_000_000);
        assert_eq!(second.processes[0].cmds[0].calls, 16);
        assert_eq!(second.processes[0].cmds[0].calls_per_sec, 10.0);
        assert_eq!(second.processes[1].calls_per_sec, 0.0);
    }

    #[test]
    fn json_shape() {
        let r = Model::default().report(&snapshot());
        let v = serde_json::to_value(&r).unwrap();
        for f in ["duration_ns", "missed_calls", "dropped", "processes"] {
            assert!(v.get(f).is_some(), "top-level {f}");
        }
        let p = &v["processes"][0];
        for f in [
            "pid",
            "comm",
            "calls",
            "errors",
            "unregistered_eperm",
            "cmds",
        ] {
            assert!(p.get(f).is_some(), "process {f}");
        }
        let c = &p["cmds"][0];
        for f in [
            "cmd",
            "cmd_value",
            "flags",
            "calls",
            "errors",
            "errno",
            "latency_ns",
            "histogram",
        ] {
            assert!(c.get(f).is_some(), "cmd {f}");
        }
        for f in ["min", "max", "sum", "p50", "p90", "p99", "p999"] {
            assert!(c["latency_ns"][f].is_u64(), "latency {f}");
        }
        assert!(c["histogram"][0]["le_ns"].is_u64());
        assert!(c["histogram"][0]["count"].is_u64());
        assert_eq!(c["errno"]["EPERM"], 2);
        assert_eq!(c["kind"], "barrier");
    }
}
