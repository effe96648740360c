//! The data model every output reads: the collector turns the kernel's maps into a
//! [`Snapshot`] (snapshot.rs); [`Model::report`] (build.rs) turns snapshots into
//! [`Report`]s (report.rs), which the text and JSON outputs, the metrics and the dashboard
//! only render.

mod build;
pub mod cmd;
pub mod findings;
pub mod hist;
mod report;
mod snapshot;

pub use crate::hook::Attach;
pub use build::{Model, writer_reports};
pub use hist::Bucket;
pub use report::*;
pub use snapshot::*;

#[cfg(test)]
pub(crate) mod tests {
    use membarrier_trace_common::{CpuKey, Handled, HandlerKey, StatsKey, VICTIMS_OTHER, WakerKey};

    use super::{cmd::Kind, hist::Histogram, *};

    /// Wall-clock times as RFC 3339 in UTC, leap days and centuries included (checked against
    /// Python's datetime).
    #[test]
    fn rfc3339_times() {
        for (ns, want) in [
            (0, "1970-01-01T00:00:00.000Z"),
            (1_709_210_096_789_000_000, "2024-02-29T12:34:56.789Z"),
            (1_796_514_421_250_000_000, "2026-12-05T23:47:01.250Z"),
            (951_868_800_000_000_000, "2000-03-01T00:00:00.000Z"),
            (4_133_980_799_999_000_000, "2100-12-31T23:59:59.999Z"),
        ] {
            assert_eq!(rfc3339(ns), want);
        }
    }

    /// The kernel's calls of a stack join the samples' in one entry; past the bound a new
    /// stack's calls are unattributed, not lost.
    #[test]
    fn stacks_from_both_unwinders_add_into_one() {
        let g = ((7, 0), 8, 0);
        let mut st = Stacks::default();
        let sampled = StackCount {
            exact: 2,
            exact_ns: 20,
            ..Default::default()
        };
        let in_kernel = StackCount {
            exact: 5,
            exact_ns: 50,
            sampled: 1,
            sampled_ns: 9,
            complete: true,
            kernel: 6,
        };
        st.add(g, vec![1, 2], &sampled, 2);
        st.add(g, vec![1, 2], &in_kernel, 2);
        st.add(g, vec![1, 3], &sampled, 2);
        st.add(g, vec![1, 4], &in_kernel, 2);
        assert_eq!(st.stacks.len(), 2);
        assert_eq!(
            st.stacks[&(g, vec![1, 2])],
            StackCount {
                exact: 7,
                exact_ns: 70,
                sampled: 1,
                sampled_ns: 9,
                complete: true,
                kernel: 6,
            }
        );
        assert_eq!(st.unattributed[&g], 6);
    }

    pub(crate) fn row(tgid: u32, cmd: i32, errno: u32, lat: &[u64]) -> RawRow {
        let mut hist = Histogram::default();
        lat.iter().for_each(|&l| hist.record(l));
        RawRow {
            count: lat.len() as u64,
            sum_ns: lat.iter().sum(),
            min_ns: *lat.iter().min().unwrap(),
            max_ns: *lat.iter().max().unwrap(),
            hist,
            ..RawRow::new(StatsKey {
                tgid,
                serial: 0,
                cmd: cmd as u32,
                flags: 0,
                errno,
            })
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
            losses: Losses {
                missed_calls: 1,
                ..Losses::default()
            },
            comms: [((42, 0), "urcu".to_string()), ((7, 0), "other".to_string())].into(),
            ..Snapshot::default()
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
    fn breakdown_fills_zero_buckets_and_joins_side_maps() {
        let mut snap = snapshot();
        // Of 4 PRIVATE_EXPEDITED calls, 3 sent IPIs (1, 1, 2) and one was blocked 300 ns.
        let r0 = &mut snap.rows[0];
        r0.ipis = 4;
        r0.ipi_hist[1] = 2;
        r0.ipi_hist[2] = 1;
        r0.blocked_sum_ns = 300;
        r0.blocked_max_ns = 300;
        r0.blocked_hist.record(300);
        r0.mutex_wait_sum_ns = 50;
        r0.mutex_wait_max_ns = 50;
        snap.ipi_cpus = vec![(
            CpuKey {
                tgid: 42,
                serial: 0,
                cmd: 8,
                flags: 0,
                cpu: 1,
            },
            4,
        )];
        let mut comm = [0u8; 16];
        comm[..11].copy_from_slice(b"rcu_preempt");
        snap.wakers = vec![(
            WakerKey {
                tgid: 42,
                serial: 0,
                cmd: 1,
                flags: 0,
                comm,
            },
            1,
        )];
        let victim = |victim: u32, name: &[u8], runs: u64, ns: u64| {
            let mut comm = [0u8; 16];
            comm[..name.len()].copy_from_slice(name);
            let key = HandlerKey {
                tgid: 42,
                serial: 0,
                cmd: 8,
                flags: 0,
                victim,
            };
            (key, Handled { runs, ns, comm })
        };
        snap.handled = vec![
            victim(0, b"swapper/1", 1, 100),
            victim(7, b"spin", 3, 800),
            victim(VICTIMS_OTHER, b"", 1, 0),
        ];
        snap.grace_period_source = GraceSource::Sched;
        let r = Model::default().report(&snap);
        let pe = &r.processes[0].cmds[0];
        assert_eq!(pe.ipis.sent, 4);
        assert_eq!(pe.ipis.per_cpu, [("1".to_string(), 4)].into());
        // 6 calls in the row (4 ok + 2 EPERM): 3 without IPIs.
        let per_call: Vec<(u64, u64)> =
            pe.ipis.per_call.iter().map(|b| (b.ipis, b.count)).collect();
        assert_eq!(per_call, vec![(0, 3), (1, 2), (2, 1)]);
        assert_eq!(pe.ipis.handler_ns, 900);
        let victims: Vec<(Option<u32>, &str, u64, u64)> = pe
            .ipis
            .victims
            .iter()
            .map(|v| (v.pid, v.comm.as_str(), v.interrupts, v.handler_ns))
            .collect();
        assert_eq!(
            victims,
            [
                (Some(7), "spin", 3, 800),
                (None, "", 1, 0),
                (Some(0), "swapper/1", 1, 100)
            ]
        );
        assert_eq!(pe.blocked_ns.sum, 300);
        assert_eq!(pe.blocked_ns.p50, 0);
        assert_eq!(pe.blocked_ns.max, 300);
        assert_eq!(pe.on_cpu_ns, 2420 - 300);
        assert_eq!(pe.mutex_wait_ns, MutexWait { sum: 50, max: 50 });
        let global = &r.processes[0].cmds[1];
        assert_eq!(global.woken_by, [("rcu_preempt".to_string(), 1)].into());
        assert_eq!(r.grace_period_source, GraceSource::Sched);
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
        // Only the window's latency counts toward time inside: 14 x 500 ns minus the first
        // report's 2200 ns of PRIVATE_EXPEDITED, over 1 s.
        let pct = second.processes[0].time_inside_pct;
        assert!(
            (pct - (7000.0 - 2200.0) * 100.0 / 1e9).abs() < 1e-9,
            "{pct}"
        );
    }

    #[test]
    fn json_shape() {
        let r = Model::default().report(&snapshot());
        let v = serde_json::to_value(&r).unwrap();
        for f in [
            "duration_ns",
            "missed_calls",
            "dropped",
            "grace_period_source",
            "processes",
        ] {
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
        for f in ["sum", "p50", "p99", "max"] {
            assert!(c["blocked_ns"][f].is_u64(), "blocked {f}");
        }
        for f in ["sent", "per_cpu", "per_call", "handler_ns", "victims"] {
            assert!(c["ipis"].get(f).is_some(), "ipis {f}");
        }
        assert!(c["mutex_wait_ns"]["sum"].is_u64() && c["mutex_wait_ns"]["max"].is_u64());
        assert!(p["unregistered_eperm"].is_u64());
        assert_eq!(v["grace_period_source"], "sched");
    }
}
