//! From snapshots to reports: [`Model::report`], in its steps (the rows grouped, the detail
//! indexed, a cmd's row built, the process's totals, the rates over the window).

use std::collections::{BTreeMap, HashMap};

use membarrier_trace_common::{VICTIMS_OTHER, thread_cmd};

use super::{
    cmd::{self, Kind},
    hist::Histogram,
};

use super::{report::*, snapshot::*};

/// One cmd row of one process: the stats rows' key without the errno, and the key of the
/// detail that joins them. Ordered as the report lists them: cmd as the syscall's signed int.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Group {
    tgid: u32,
    serial: u32,
    cmd: i32,
    flags: u32,
}

impl Group {
    fn of(tgid: u32, serial: u32, cmd: u32, flags: u32) -> Self {
        let cmd = cmd as i32;
        Group {
            tgid,
            serial,
            cmd,
            flags,
        }
    }
}

/// A process's latency histogram and least latency over the run, and its latency and CPU time
/// summed over the window.
struct WindowSums(Histogram, u64, u64, u64);

impl Default for WindowSums {
    fn default() -> Self {
        Self(Histogram::default(), u64::MAX, 0, 0)
    }
}

/// Turns snapshots into reports, remembering the previous one for per-window rates.
#[derive(Default)]
pub struct Model {
    /// Calls, latency sum and CPU time per (process, cmd, flags) at the previous report.
    prev: HashMap<Group, (u64, u64, u64)>,
    /// Grace periods per (process, function, caller) at the previous report.
    prev_writers: HashMap<(u32, u32, u32, u64), u64>,
    prev_elapsed_ns: u64,
}

impl Model {
    /// The report of `snap`, its rates over the time since the previous report.
    ///
    /// Long: the report's steps (group, index the detail, each cmd's row, processes,
    /// writers, findings), each a call, and the run's totals summed between them.
    pub fn report(&mut self, snap: &Snapshot) -> Report {
        let window_ns = snap.elapsed_ns.saturating_sub(self.prev_elapsed_ns);
        let per_sec = |n: u64| {
            if window_ns == 0 {
                0.0
            } else {
                n as f64 * 1e9 / window_ns as f64
            }
        };
        let mut detail = Detail::index(snap);
        let mut processes: BTreeMap<ProcKey, ProcessReport> = BTreeMap::new();
        let mut next = HashMap::new();
        // Per process: all its calls' latencies, and latency and CPU time over the window.
        let mut proc_hist: HashMap<ProcKey, WindowSums> = HashMap::new();
        for (group, rows) in group_rows(snap) {
            let Group { tgid, serial, .. } = group;
            let proc_key = (tgid, serial);
            let (before, sum_before, cpu_before) =
                self.prev.get(&group).copied().unwrap_or((0, 0, 0));
            let (row, all, cost) = cmd_report(group, &rows, &mut detail, snap);
            let row = CmdReport {
                calls_per_sec: per_sec(row.calls.saturating_sub(before)),
                ..row
            };
            next.insert(group, (all.count, all.sum_ns, cost.total()));
            let ph = proc_hist.entry(proc_key).or_default();
            ph.0.add(&all.hist);
            ph.1 = ph.1.min(all.min_ns);
            ph.2 += all.sum_ns.saturating_sub(sum_before);
            ph.3 += cost.total().saturating_sub(cpu_before);
            let p = processes.entry(proc_key).or_insert_with(|| ProcessReport {
                exited: snap.exited.contains_key(&proc_key),
                processes: snap.exited.get(&proc_key).copied().unwrap_or(1),
                ..ProcessReport::empty(
                    tgid,
                    serial,
                    snap.comms.get(&proc_key).cloned().unwrap_or_default(),
                )
            });
            p.add_cmd(row, cost);
        }
        self.prev = next;
        self.prev_elapsed_ns = snap.elapsed_ns;
        let rcu_writers = self.writers_with_rates(snap, per_sec);
        let pct = |ns: u64| {
            if window_ns == 0 {
                0.0
            } else {
                ns as f64 * 100.0 / window_ns as f64
            }
        };
        for (key, p) in processes.iter_mut() {
            let WindowSums(hist, min, window_sum, window_cpu) = &proc_hist[key];
            p.latency_ns = Latency::new(hist, *min, p.latency_ns.max, p.latency_ns.sum);
            p.time_inside_pct = pct(*window_sum);
            p.cpu_pct = pct(*window_cpu);
        }
        let processes = busiest_first(processes.into_values().collect());
        let calls = processes.iter().map(|p| p.calls).sum();
        Report {
            schema: SCHEMA,
            time: rfc3339(snap.unix_ns),
            hostname: snap.hostname.clone(),
            kernel: snap.kernel.clone(),
            duration_ns: snap.elapsed_ns,
            window_ns,
            calls,
            calls_per_sec: processes.iter().fold(0.0, |a, p| a + p.calls_per_sec),
            run_calls_per_sec: if snap.elapsed_ns == 0 {
                0.0
            } else {
                calls as f64 * 1e9 / snap.elapsed_ns as f64
            },
            missed_calls: snap.losses.missed_calls,
            missed_grace_periods: snap.losses.missed_grace_periods,
            dropped: snap.losses.into(),
            exited_processes: snap.exited.values().sum(),
            exited_summed: snap
                .exited
                .iter()
                .filter(|(p, _)| p.0 == 0)
                .map(|(_, n)| n)
                .sum(),
            exited_rows: snap.exited_rows,
            attach: snap.attach,
            grace_period_source: snap.grace_period_source,
            maps: snap.maps,
            processes,
            rcu_writers,
            findings: Vec::new(),
        }
    }

    /// The RCU writers, each with its grace periods per second over the window.
    fn writers_with_rates(
        &mut self,
        snap: &Snapshot,
        per_sec: impl Fn(u64) -> f64,
    ) -> Vec<WriterReport> {
        let mut rcu_writers =
            writer_reports(&snap.writers, &snap.gp_funcs, &snap.callers, &snap.comms);
        let mut writers_next = HashMap::new();
        for w in &mut rcu_writers {
            let key = (w.pid, w.serial, w.func, w.caller.address);
            let before = self.prev_writers.get(&key).copied().unwrap_or(0);
            w.grace_periods_per_sec = per_sec(w.grace_periods.saturating_sub(before));
            writers_next.insert(key, w.grace_periods);
        }
        self.prev_writers = writers_next;
        rcu_writers
    }
}

/// The snapshot's stats rows by (tgid, serial, cmd, flags): one per outcome (errno) each.
fn group_rows(snap: &Snapshot) -> BTreeMap<Group, Vec<&RawRow>> {
    let mut groups: BTreeMap<Group, Vec<&RawRow>> = BTreeMap::new();
    for row in &snap.rows {
        let k = row.key;
        groups
            .entry(Group::of(k.tgid, k.serial, k.cmd, k.flags))
            .or_default()
            .push(row);
    }
    groups
}

/// The snapshot's detail, apart from the stats rows: by group (tgid, serial, cmd, flags), or by
/// process for threads. Each group's share is taken out as its row is built.
struct Detail<'a> {
    per_cpu: HashMap<Group, BTreeMap<String, u64>>,
    wakers: HashMap<Group, BTreeMap<String, u64>>,
    threads: HashMap<ProcKey, Vec<&'a ThreadRow>>,
    handler: HashMap<Group, u64>,
    victims: HashMap<Group, Vec<IpiVictim>>,
    /// --stacks: each group's stacks.
    stacks: HashMap<StackGroup, Vec<(&'a [u64], &'a StackCount)>>,
}

impl<'a> Detail<'a> {
    fn index(snap: &'a Snapshot) -> Self {
        let mut d = Detail {
            per_cpu: HashMap::new(),
            wakers: HashMap::new(),
            threads: HashMap::new(),
            handler: HashMap::new(),
            victims: HashMap::new(),
            stacks: HashMap::new(),
        };
        for (k, n) in &snap.ipi_cpus {
            *d.per_cpu
                .entry(Group::of(k.tgid, k.serial, k.cmd, k.flags))
                .or_default()
                .entry(k.cpu.to_string())
                .or_default() += n;
        }
        for (k, n) in &snap.wakers {
            *d.wakers
                .entry(Group::of(k.tgid, k.serial, k.cmd, k.flags))
                .or_default()
                .entry(comm_str(&k.comm))
                .or_default() += n;
        }
        for t in &snap.threads {
            d.threads.entry(t.proc).or_default().push(t);
        }
        for (k, h) in &snap.handled {
            let group = Group::of(k.tgid, k.serial, k.cmd, k.flags);
            *d.handler.entry(group).or_default() += h.ns;
            d.victims.entry(group).or_default().push(IpiVictim {
                pid: (k.victim != VICTIMS_OTHER).then_some(k.victim),
                comm: comm_str(&h.comm),
                interrupts: h.runs,
                handler_ns: h.ns,
            });
        }
        for v in d.victims.values_mut() {
            v.sort_by(|a, b| b.interrupts.cmp(&a.interrupts).then(a.pid.cmp(&b.pid)));
        }
        for ((g, frames), c) in snap.stacks.iter().flat_map(|s| &s.stacks) {
            d.stacks.entry(*g).or_default().push((frames, c));
        }
        d
    }
}

/// One group's row of the report, from its stats rows (one per errno) and its detail; its rate
/// is left to the caller, which knows the window. Returns the rows summed and the CPU cost too.
///
/// Long: one row's fields, each summed over its stats rows and joined with its detail in one
/// pass; the struct it fills has that many fields.
fn cmd_report(
    group: Group,
    rows: &[&RawRow],
    detail: &mut Detail,
    snap: &Snapshot,
) -> (CmdReport, RawRow, CpuCost) {
    let Group {
        tgid,
        serial,
        cmd: cmd_value,
        flags,
    } = group;
    let proc_key = (tgid, serial);
    let mut all = RawRow::new(rows[0].key);
    let mut errno = BTreeMap::new();
    let mut errors = 0;
    for r in rows {
        all.absorb(r);
        if r.key.errno != 0 {
            errors += r.count;
            *errno.entry(cmd::errno_name(r.key.errno)).or_insert(0) += r.count;
        }
    }
    let (calls, sum, min, max) = (all.count, all.sum_ns, all.min_ns, all.max_ns);
    // The kernel only counts calls with a non-zero breakdown; the rest had none.
    all.blocked_hist
        .add_to(0, calls.saturating_sub(all.blocked_hist.total()));
    all.ipi_hist[0] += calls.saturating_sub(all.ipi_hist.iter().sum());
    let cost = CpuCost {
        caller: sum.saturating_sub(all.blocked_sum_ns),
        ipi_handler: detail.handler.get(&group).copied().unwrap_or(0),
    };
    let row = CmdReport {
        cmd: cmd::display_name(cmd_value),
        cmd_value,
        kind: cmd::kind_with_flags(cmd_value, flags),
        flags,
        calls,
        calls_per_sec: 0.0,
        errors,
        errno,
        latency_ns: Latency::new(&all.hist, min, max, sum),
        histogram: all.hist.buckets(max),
        blocked_ns: Blocked {
            sum: all.blocked_sum_ns,
            p50: all.blocked_hist.quantile(0.5, 0, all.blocked_max_ns),
            p99: all.blocked_hist.quantile(0.99, 0, all.blocked_max_ns),
            max: all.blocked_max_ns,
        },
        on_cpu_ns: cost.caller,
        woken_by: detail.wakers.remove(&group).unwrap_or_default(),
        ipis: Ipis {
            sent: all.ipis,
            per_cpu: detail.per_cpu.remove(&group).unwrap_or_default(),
            per_call: all
                .ipi_hist
                .iter()
                .enumerate()
                .filter(|(_, c)| **c > 0)
                .map(|(i, &count)| IpiBucket {
                    ipis: i as u64,
                    count,
                })
                .collect(),
            handler_ns: cost.ipi_handler,
            victims: detail.victims.remove(&group).unwrap_or_default(),
        },
        mutex_wait_ns: MutexWait {
            sum: all.mutex_wait_sum_ns,
            max: all.mutex_wait_max_ns,
        },
        threads: cmd_threads(detail.threads.get(&proc_key), cmd_value as u32, flags),
        stacks: None,
        unattributed: None,
    };
    let Some(st) = &snap.stacks else {
        return (row, all, cost);
    };
    let g = (proc_key, cmd_value as u32, flags);
    let mine = detail.stacks.remove(&g).unwrap_or_default();
    // Calls sampled out with no sample taken to stand for them have no stack.
    let orphans = if mine.iter().any(|(_, c)| c.sampled > 0) {
        0
    } else {
        all.stacks_sampled_out
    };
    let row = CmdReport {
        stacks: Some(stack_reports(
            &mine,
            all.stacks_sampled_out,
            &snap.callers,
            proc_key,
        )),
        unattributed: Some(
            all.stacks_unsent + st.unattributed.get(&g).copied().unwrap_or(0) + orphans,
        ),
        ..row
    };
    (row, all, cost)
}

impl ProcessReport {
    /// Adds one of its cmds' rows to the process's totals, and the row to its list.
    fn add_cmd(&mut self, row: CmdReport, cost: CpuCost) {
        self.cpu_ns.caller += cost.caller;
        self.cpu_ns.ipi_handler += cost.ipi_handler;
        self.latency_ns.sum += row.latency_ns.sum;
        self.latency_ns.max = self.latency_ns.max.max(row.latency_ns.max);
        if row.kind == Kind::Registration {
            self.registrations += row.calls - row.errors;
            self.registrations_failed += row.errors;
            self.registration_ns += row.latency_ns.sum;
        }
        if row.kind == Kind::Barrier {
            self.unregistered_eperm += row.errno.get("EPERM").copied().unwrap_or(0);
        }
        self.calls += row.calls;
        self.calls_per_sec += row.calls_per_sec;
        self.errors += row.errors;
        self.cmds.push(row);
    }
}

/// Busiest process first, and in each its busiest cmd first; ties by pid (and serial) or cmd,
/// so the order is stable.
fn busiest_first(mut processes: Vec<ProcessReport>) -> Vec<ProcessReport> {
    processes.sort_by(|a, b| {
        b.calls
            .cmp(&a.calls)
            .then(a.pid.cmp(&b.pid))
            .then(a.serial.cmp(&b.serial))
    });
    for p in &mut processes {
        p.cmds
            .sort_by(|a, b| b.calls.cmp(&a.calls).then(a.cmd_value.cmp(&b.cmd_value)));
    }
    processes
}

/// The threads of a process that made calls of `cmd` with `flags`, most calls first.
fn cmd_threads(threads: Option<&Vec<&ThreadRow>>, cmd: u32, flags: u32) -> Vec<CmdThread> {
    let i = thread_cmd(cmd, flags);
    let mut out: Vec<CmdThread> = threads
        .into_iter()
        .flatten()
        .filter(|t| t.calls[i] > 0)
        .map(|t| CmdThread {
            tid: t.tid,
            name: t.name.clone(),
            calls: t.calls[i],
            threads: t.threads,
        })
        .collect();
    // Summed exited threads last.
    out.sort_by(|a, b| {
        (a.tid == 0)
            .cmp(&(b.tid == 0))
            .then(b.calls.cmp(&a.calls))
            .then(a.tid.cmp(&b.tid))
    });
    out
}

// Userspace RCU writers: the kernel's grace-period rows (per process, thread, function and
// caller) grouped per (process, function, caller).

/// One cmd row's stacks, busiest first. Stacks taken over the stack rate stand for the calls
/// sampled out beside them (`sampled_out`, of the row), in proportion: their counts are
/// estimates; the others are exact.
fn stack_reports(
    stacks: &[(&[u64], &StackCount)],
    sampled_out: u64,
    callers: &HashMap<(ProcKey, u64), Caller>,
    p: ProcKey,
) -> Vec<StackReport> {
    let sampled: u64 = stacks.iter().map(|(_, c)| c.sampled).sum();
    let scale = if sampled == 0 {
        1.0
    } else {
        (sampled + sampled_out) as f64 / sampled as f64
    };
    let mut out: Vec<StackReport> = stacks
        .iter()
        .map(|(frames, c)| StackReport {
            calls: c.exact + (c.sampled as f64 * scale).round() as u64,
            latency_ns_sum: c.exact_ns + (c.sampled_ns as f64 * scale).round() as u64,
            estimated: c.sampled > 0,
            truncated: !c.complete,
            unwound_in_kernel: c.kernel,
            frames: frames
                .iter()
                .map(|&a| {
                    callers.get(&(p, a)).cloned().unwrap_or(Caller {
                        address: a,
                        ..Default::default()
                    })
                })
                .collect(),
        })
        .collect();
    out.sort_by(|a, b| {
        b.calls.cmp(&a.calls).then_with(|| {
            a.frames
                .iter()
                .map(|f| f.address)
                .cmp(b.frames.iter().map(|f| f.address))
        })
    });
    out
}

/// Groups grace-period rows per (process, function, caller), busiest first.
pub fn writer_reports(
    rows: &[WriterRow],
    funcs: &[GpFunc],
    callers: &HashMap<(ProcKey, u64), Caller>,
    comms: &HashMap<ProcKey, String>,
) -> Vec<WriterReport> {
    let mut groups: BTreeMap<(u32, u32, u32, u64), Vec<&WriterRow>> = BTreeMap::new();
    for r in rows.iter().filter(|r| r.count > 0) {
        let k = r.key;
        groups
            .entry((k.tgid, k.serial, k.func, k.caller))
            .or_default()
            .push(r);
    }
    let mut out: Vec<WriterReport> = groups
        .into_iter()
        .map(|((tgid, serial, func, caller), rows)| {
            let mut all = rows[0].clone();
            for r in &rows[1..] {
                all.absorb(r);
            }
            let mut threads: BTreeMap<u32, WriterThread> = BTreeMap::new();
            for r in &rows {
                threads
                    .entry(r.key.tid)
                    .or_insert_with(|| WriterThread {
                        tid: r.key.tid,
                        name: r.thread.clone(),
                        grace_periods: 0,
                    })
                    .grace_periods += r.count;
            }
            let f = funcs.get(func as usize);
            WriterReport {
                pid: tgid,
                serial,
                comm: comms.get(&(tgid, serial)).cloned().unwrap_or_default(),
                flavour: f.map_or("unknown", |f| f.flavour).to_string(),
                function: f.map(|f| f.function.clone()).unwrap_or_default(),
                library: f
                    .map(|f| f.library.display().to_string())
                    .unwrap_or_default(),
                caller: callers
                    .get(&((tgid, serial), caller))
                    .cloned()
                    .unwrap_or(Caller {
                        address: caller,
                        ..Default::default()
                    }),
                threads: threads.into_values().collect(),
                grace_periods: all.count,
                grace_periods_per_sec: 0.0,
                func,
                latency_ns: Latency::new(&all.hist, all.min_ns, all.max_ns, all.sum_ns),
                histogram: all.hist.buckets(all.max_ns),
                membarrier_calls: all.membarrier_calls,
                membarrier_ns: all.membarrier_ns,
                blocked_ns: all.blocked_ns,
            }
        })
        .collect();
    out.sort_by(|a, b| {
        b.grace_periods
            .cmp(&a.grace_periods)
            .then(a.pid.cmp(&b.pid))
            .then(a.caller.address.cmp(&b.caller.address))
    });
    out
}
