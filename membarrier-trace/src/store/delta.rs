//! What changed between two snapshots, and back: a recording stores each interval as the
//! change from the one before ([`Interval::between`]), a reader adds them up again
//! ([`Interval::apply_to`]), and a report over a window is the difference of its ends
//! ([`window`]).
//!
//! Counts are stored as differences (a busy row's histogram gains a few buckets a second);
//! extremes (min, max), names and symbols as they are now. Adding the changes up gives back
//! each snapshot exactly.

use std::{collections::HashMap, hash::Hash};

use membarrier_trace_common::{CpuKey, Handled, HandlerKey, StatsKey, WakerKey, WriterKey};
use serde::{Deserialize, Serialize};

use crate::hook::Attach;
use crate::model::{
    Caller, ExitedRows, FLAVOURS, GpFunc, GraceSource, Losses, Maps, ProcKey, RawRow, Snapshot,
    StackCount, StackGroup, Stacks, ThreadRow, WriterRow, hist::Histogram,
};

/// One collection's change: entries new or changed (as [`Change::since`] makes them), and the
/// keys no longer there.
#[derive(Debug, Serialize, Deserialize)]
struct Changes<K, V> {
    set: Vec<(K, V)>,
    gone: Vec<K>,
}

/// How an entry changes: counts as differences, the rest as it is now.
trait Change: Clone + PartialEq {
    /// What `self` has that `before` (the same entry, earlier) had not.
    fn since(&self, before: &Self) -> Self;
    /// `self` with the change `d` (from [`Change::since`]) made.
    fn then(&mut self, d: &Self);
}

/// A value taken as it is (a name, a symbol, a number of processes).
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
#[serde(transparent)]
struct Now<T>(T);

impl<T: Clone + PartialEq> Change for Now<T> {
    fn since(&self, _: &Self) -> Self {
        self.clone()
    }
    fn then(&mut self, d: &Self) {
        *self = d.clone();
    }
}

/// A count.
#[derive(Clone, Copy, PartialEq, Debug, Serialize, Deserialize)]
#[serde(transparent)]
struct Count(u64);

impl Change for Count {
    fn since(&self, before: &Self) -> Self {
        Count(self.0.saturating_sub(before.0))
    }
    fn then(&mut self, d: &Self) {
        self.0 += d.0;
    }
}

fn minus_each(now: &[u64], before: &[u64]) -> Vec<u64> {
    let mut out: Vec<u64> = now
        .iter()
        .enumerate()
        .map(|(i, n)| n.saturating_sub(before.get(i).copied().unwrap_or(0)))
        .collect();
    while out.last() == Some(&0) {
        out.pop();
    }
    out
}

fn plus_each(to: &mut Vec<u64>, d: &[u64]) {
    if to.len() < d.len() {
        to.resize(d.len(), 0);
    }
    to.iter_mut().zip(d).for_each(|(a, b)| *a += b);
}

impl Change for RawRow {
    fn since(&self, b: &Self) -> Self {
        RawRow {
            count: self.count - b.count.min(self.count),
            sum_ns: self.sum_ns.saturating_sub(b.sum_ns),
            hist: self.hist.minus(&b.hist),
            blocked_sum_ns: self.blocked_sum_ns.saturating_sub(b.blocked_sum_ns),
            blocked_hist: self.blocked_hist.minus(&b.blocked_hist),
            ipis: self.ipis.saturating_sub(b.ipis),
            ipi_hist: minus_each(&self.ipi_hist, &b.ipi_hist),
            mutex_wait_sum_ns: self.mutex_wait_sum_ns.saturating_sub(b.mutex_wait_sum_ns),
            stacks_unsent: self.stacks_unsent.saturating_sub(b.stacks_unsent),
            stacks_sampled_out: self.stacks_sampled_out.saturating_sub(b.stacks_sampled_out),
            ..self.clone()
        }
    }
    fn then(&mut self, d: &Self) {
        self.count += d.count;
        self.sum_ns += d.sum_ns;
        self.hist.add(&d.hist);
        self.blocked_sum_ns += d.blocked_sum_ns;
        self.blocked_hist.add(&d.blocked_hist);
        self.ipis += d.ipis;
        plus_each(&mut self.ipi_hist, &d.ipi_hist);
        self.mutex_wait_sum_ns += d.mutex_wait_sum_ns;
        self.stacks_unsent += d.stacks_unsent;
        self.stacks_sampled_out += d.stacks_sampled_out;
        (self.min_ns, self.max_ns) = (d.min_ns, d.max_ns);
        self.blocked_max_ns = d.blocked_max_ns;
        self.mutex_wait_max_ns = d.mutex_wait_max_ns;
    }
}

impl Change for WriterRow {
    fn since(&self, b: &Self) -> Self {
        WriterRow {
            count: self.count.saturating_sub(b.count),
            sum_ns: self.sum_ns.saturating_sub(b.sum_ns),
            hist: self.hist.minus(&b.hist),
            membarrier_calls: self.membarrier_calls.saturating_sub(b.membarrier_calls),
            membarrier_ns: self.membarrier_ns.saturating_sub(b.membarrier_ns),
            blocked_ns: self.blocked_ns.saturating_sub(b.blocked_ns),
            ..self.clone()
        }
    }
    fn then(&mut self, d: &Self) {
        self.count += d.count;
        self.sum_ns += d.sum_ns;
        self.hist.add(&d.hist);
        self.membarrier_calls += d.membarrier_calls;
        self.membarrier_ns += d.membarrier_ns;
        self.blocked_ns += d.blocked_ns;
        (self.min_ns, self.max_ns) = (d.min_ns, d.max_ns);
        self.thread.clone_from(&d.thread);
    }
}

impl Change for ThreadRow {
    fn since(&self, b: &Self) -> Self {
        let mut calls = self.calls;
        calls
            .iter_mut()
            .zip(&b.calls)
            .for_each(|(a, b)| *a = a.saturating_sub(*b));
        ThreadRow {
            calls,
            ..self.clone()
        }
    }
    fn then(&mut self, d: &Self) {
        self.calls
            .iter_mut()
            .zip(&d.calls)
            .for_each(|(a, b)| *a += b);
        self.threads = d.threads;
        self.name.clone_from(&d.name);
    }
}

/// Handler runs (the comm is the first victim's: kept as it is).
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
#[serde(transparent)]
struct Runs(Handled);

impl Change for Runs {
    fn since(&self, b: &Self) -> Self {
        Runs(Handled {
            runs: self.0.runs.saturating_sub(b.0.runs),
            ns: self.0.ns.saturating_sub(b.0.ns),
            comm: self.0.comm,
        })
    }
    fn then(&mut self, d: &Self) {
        self.0.runs += d.0.runs;
        self.0.ns += d.0.ns;
        self.0.comm = d.0.comm;
    }
}

impl Change for StackCount {
    fn since(&self, b: &Self) -> Self {
        StackCount {
            exact: self.exact.saturating_sub(b.exact),
            exact_ns: self.exact_ns.saturating_sub(b.exact_ns),
            sampled: self.sampled.saturating_sub(b.sampled),
            sampled_ns: self.sampled_ns.saturating_sub(b.sampled_ns),
            kernel: self.kernel.saturating_sub(b.kernel),
            complete: self.complete,
        }
    }
    fn then(&mut self, d: &Self) {
        self.exact += d.exact;
        self.exact_ns += d.exact_ns;
        self.sampled += d.sampled;
        self.sampled_ns += d.sampled_ns;
        self.kernel += d.kernel;
        self.complete = d.complete;
    }
}

/// Entries keyed, a key's repeats told apart by their order.
fn keyed<T, K: Eq + Hash + Clone, V>(
    items: &[T],
    key: impl Fn(&T) -> K,
    value: impl Fn(&T) -> V,
) -> HashMap<(K, u32), V> {
    let mut seen: HashMap<K, u32> = HashMap::new();
    items
        .iter()
        .map(|t| {
            let k = key(t);
            let nth = seen.entry(k.clone()).or_default();
            *nth += 1;
            ((k, *nth - 1), value(t))
        })
        .collect()
}

impl<K: Eq + Hash + Clone, V: Change> Changes<K, V> {
    fn between(before: &HashMap<K, V>, now: &HashMap<K, V>) -> Self {
        let set = now
            .iter()
            .filter(|(k, v)| before.get(*k) != Some(*v))
            .map(|(k, v)| {
                let d = before.get(k).map_or_else(|| v.clone(), |b| v.since(b));
                (k.clone(), d)
            })
            .collect();
        let gone = before
            .keys()
            .filter(|k| !now.contains_key(*k))
            .cloned()
            .collect();
        Changes { set, gone }
    }

    fn apply_to(&self, state: &mut HashMap<K, V>) {
        for k in &self.gone {
            state.remove(k);
        }
        for (k, d) in &self.set {
            match state.get_mut(k) {
                Some(v) => v.then(d),
                None => {
                    state.insert(k.clone(), d.clone());
                }
            }
        }
    }
}

type Occurrence<K> = (K, u32);

/// A snapshot's collections keyed: what the changes are taken between.
#[derive(Default, Clone)]
pub struct Keyed {
    rows: HashMap<Occurrence<StatsKey>, RawRow>,
    comms: HashMap<ProcKey, Now<String>>,
    exited: HashMap<ProcKey, Now<u64>>,
    ipi_cpus: HashMap<Occurrence<CpuKey>, Count>,
    wakers: HashMap<Occurrence<WakerKey>, Count>,
    handled: HashMap<Occurrence<HandlerKey>, Runs>,
    writers: HashMap<Occurrence<WriterKey>, WriterRow>,
    callers: HashMap<(ProcKey, u64), Now<Caller>>,
    threads: HashMap<Occurrence<(ProcKey, u32)>, ThreadRow>,
    stacks: HashMap<(StackGroup, Vec<u64>), StackCount>,
    unattributed: HashMap<StackGroup, Count>,
    has_stacks: bool,
    gp_funcs: Vec<GpFunc>,
    /// The rest of the snapshot: small, stored whole.
    head: Head,
}

/// A snapshot's figures that are not collections, stored whole each interval.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Head {
    pub elapsed_ns: u64,
    pub unix_ns: u64,
    pub losses: Losses,
    pub maps: Maps,
    pub exited_rows: ExitedRows,
    pub grace_period_source: GraceSource,
    pub attach: Attach,
}

impl Keyed {
    pub fn head(&self) -> &Head {
        &self.head
    }

    pub fn of(s: &Snapshot) -> Keyed {
        let pairs = |m: &[(CpuKey, u64)]| keyed(m, |p| p.0, |p| Count(p.1));
        let stacks = s.stacks.clone().unwrap_or_default();
        Keyed {
            rows: keyed(&s.rows, |r| r.key, Clone::clone),
            comms: s.comms.iter().map(|(k, v)| (*k, Now(v.clone()))).collect(),
            exited: s.exited.iter().map(|(k, v)| (*k, Now(*v))).collect(),
            ipi_cpus: pairs(&s.ipi_cpus),
            wakers: keyed(&s.wakers, |p| p.0, |p| Count(p.1)),
            handled: keyed(&s.handled, |p| p.0, |p| Runs(p.1)),
            writers: keyed(&s.writers, |w| w.key, Clone::clone),
            callers: s
                .callers
                .iter()
                .map(|(k, v)| (*k, Now(v.clone())))
                .collect(),
            threads: keyed(&s.threads, |t| (t.proc, t.tid), Clone::clone),
            stacks: stacks.stacks,
            unattributed: stacks
                .unattributed
                .into_iter()
                .map(|(k, v)| (k, Count(v)))
                .collect(),
            has_stacks: s.stacks.is_some(),
            gp_funcs: s.gp_funcs.clone(),
            head: Head {
                elapsed_ns: s.elapsed_ns,
                unix_ns: s.unix_ns,
                losses: s.losses,
                maps: s.maps,
                exited_rows: s.exited_rows,
                grace_period_source: s.grace_period_source,
                attach: s.attach,
            },
        }
    }

    /// The snapshot back, with the machine's name and kernel (kept once, in the header).
    pub fn snapshot(&self, hostname: &str, kernel: &str) -> Snapshot {
        let mut rows: Vec<_> = self.rows.iter().collect();
        rows.sort_by_key(|(k, _)| *k);
        let sorted = |m: &HashMap<Occurrence<_>, Count>| {
            let mut v: Vec<_> = m.iter().map(|((k, _), c)| (*k, c.0)).collect();
            v.sort();
            v
        };
        let mut wakers: Vec<_> = self.wakers.iter().map(|((k, _), c)| (*k, c.0)).collect();
        wakers.sort_by_key(|w| w.0);
        let mut handled: Vec<_> = self.handled.iter().map(|((k, _), h)| (*k, h.0)).collect();
        handled.sort_by_key(|h| h.0);
        let mut writers: Vec<_> = self.writers.iter().collect();
        writers.sort_by_key(|(k, _)| *k);
        let mut threads: Vec<_> = self.threads.iter().collect();
        threads.sort_by_key(|(k, _)| *k);
        let h = &self.head;
        Snapshot {
            elapsed_ns: h.elapsed_ns,
            unix_ns: h.unix_ns,
            hostname: hostname.to_string(),
            kernel: kernel.to_string(),
            rows: rows.into_iter().map(|(_, r)| r.clone()).collect(),
            losses: h.losses,
            comms: self.comms.iter().map(|(k, v)| (*k, v.0.clone())).collect(),
            exited: self.exited.iter().map(|(k, v)| (*k, v.0)).collect(),
            ipi_cpus: sorted(&self.ipi_cpus),
            wakers,
            handled,
            grace_period_source: h.grace_period_source,
            attach: h.attach,
            maps: h.maps,
            exited_rows: h.exited_rows,
            writers: writers.into_iter().map(|(_, w)| w.clone()).collect(),
            gp_funcs: self.gp_funcs.clone(),
            callers: self
                .callers
                .iter()
                .map(|(k, v)| (*k, v.0.clone()))
                .collect(),
            threads: threads.into_iter().map(|(_, t)| t.clone()).collect(),
            stacks: self.has_stacks.then(|| Stacks {
                stacks: self.stacks.clone(),
                unattributed: self.unattributed.iter().map(|(k, v)| (*k, v.0)).collect(),
            }),
        }
    }
}

/// One interval of a recording: the change from the one before.
#[derive(Debug, Serialize, Deserialize)]
pub struct Interval {
    pub head: Head,
    rows: Changes<Occurrence<StatsKey>, RawRow>,
    comms: Changes<ProcKey, Now<String>>,
    exited: Changes<ProcKey, Now<u64>>,
    ipi_cpus: Changes<Occurrence<CpuKey>, Count>,
    wakers: Changes<Occurrence<WakerKey>, Count>,
    handled: Changes<Occurrence<HandlerKey>, Runs>,
    writers: Changes<Occurrence<WriterKey>, WriterRow>,
    callers: Changes<(ProcKey, u64), Now<Caller>>,
    threads: Changes<Occurrence<(ProcKey, u32)>, ThreadRow>,
    stacks: Changes<(StackGroup, Vec<u64>), StackCount>,
    unattributed: Changes<StackGroup, Count>,
    has_stacks: bool,
    /// The probed functions, when they changed (a library was mapped): (flavour, function,
    /// file).
    gp_funcs: Option<Vec<(String, String, std::path::PathBuf)>>,
}

impl Interval {
    /// What changed from `before` to `now`.
    pub fn between(before: &Keyed, now: &Keyed) -> Interval {
        Interval {
            head: now.head.clone(),
            rows: Changes::between(&before.rows, &now.rows),
            comms: Changes::between(&before.comms, &now.comms),
            exited: Changes::between(&before.exited, &now.exited),
            ipi_cpus: Changes::between(&before.ipi_cpus, &now.ipi_cpus),
            wakers: Changes::between(&before.wakers, &now.wakers),
            handled: Changes::between(&before.handled, &now.handled),
            writers: Changes::between(&before.writers, &now.writers),
            callers: Changes::between(&before.callers, &now.callers),
            threads: Changes::between(&before.threads, &now.threads),
            stacks: Changes::between(&before.stacks, &now.stacks),
            unattributed: Changes::between(&before.unattributed, &now.unattributed),
            has_stacks: now.has_stacks,
            gp_funcs: (before.gp_funcs != now.gp_funcs).then(|| {
                now.gp_funcs
                    .iter()
                    .map(|f| (f.flavour.to_string(), f.function.clone(), f.library.clone()))
                    .collect()
            }),
        }
    }

    /// `state` moved on by this interval.
    pub fn apply_to(&self, state: &mut Keyed) {
        state.head = self.head.clone();
        self.rows.apply_to(&mut state.rows);
        self.comms.apply_to(&mut state.comms);
        self.exited.apply_to(&mut state.exited);
        self.ipi_cpus.apply_to(&mut state.ipi_cpus);
        self.wakers.apply_to(&mut state.wakers);
        self.handled.apply_to(&mut state.handled);
        self.writers.apply_to(&mut state.writers);
        self.callers.apply_to(&mut state.callers);
        self.threads.apply_to(&mut state.threads);
        self.stacks.apply_to(&mut state.stacks);
        self.unattributed.apply_to(&mut state.unattributed);
        state.has_stacks = self.has_stacks;
        if let Some(funcs) = &self.gp_funcs {
            // A recording is read on another machine, and may be damaged: a flavour not known
            // is `custom`.
            state.gp_funcs = funcs
                .iter()
                .map(|(flavour, function, library)| GpFunc {
                    flavour: FLAVOURS
                        .into_iter()
                        .find(|f| f == flavour)
                        .unwrap_or("custom"),
                    function: function.clone(),
                    library: library.clone(),
                })
                .collect();
        }
    }
}

/// What happened between `from` and `to` (two states of one recording, `from` earlier): calls,
/// time and histograms counted in between. A row's min and max are exact when the window set
/// them (the run's extreme moved inside it); else they are the window's histogram's bucket
/// edges, within the run's extremes. Names, symbols and the probed functions are `to`'s.
pub fn window(from: &Keyed, to: &Keyed) -> Keyed {
    window_by(from, to, &Interval::between(from, to))
}

/// [`window`] with the change from `from` to `to` already in hand (`d`: a recording's own entry
/// between two states in a row), not taken again.
pub fn window_by(from: &Keyed, to: &Keyed, d: &Interval) -> Keyed {
    let mut w = to.clone();
    w.rows = counted(&d.rows.set, |r| r.count > 0);
    window_extremes(&mut w.rows, &from.rows);
    w.writers = counted(&d.writers.set, |r| r.count > 0);
    window_extremes(&mut w.writers, &from.writers);
    w.ipi_cpus = counted(&d.ipi_cpus.set, |c| c.0 > 0);
    w.wakers = counted(&d.wakers.set, |c| c.0 > 0);
    w.handled = counted(&d.handled.set, |h| h.0.runs > 0);
    w.threads = counted(&d.threads.set, |t| t.calls.iter().any(|&n| n > 0));
    w.stacks = counted(&d.stacks.set, |s| s.exact + s.sampled > 0);
    w.unattributed = counted(&d.unattributed.set, |c| c.0 > 0);
    let (now, was) = (&to.head, &from.head);
    w.head.elapsed_ns = now.elapsed_ns.saturating_sub(was.elapsed_ns);
    w.head.losses = losses_since(&now.losses, &was.losses);
    let (a, b) = (&now.exited_rows, &was.exited_rows);
    w.head.exited_rows = ExitedRows {
        moved_at_exit: a.moved_at_exit.saturating_sub(b.moved_at_exit),
        ring_full: a.ring_full.saturating_sub(b.ring_full),
        summed_by_name: a.summed_by_name.saturating_sub(b.summed_by_name),
        kept_whole: a.kept_whole.saturating_sub(b.kept_whole),
    };
    w
}

fn counted<K: Eq + Hash + Clone, V: Clone>(
    set: &[(K, V)],
    keep: impl Fn(&V) -> bool,
) -> HashMap<K, V> {
    set.iter().filter(|(_, v)| keep(v)).cloned().collect()
}

/// A row with a latency histogram and the run's extremes: stats rows and writers' rows.
trait Extremes {
    /// (count, min, max) and the histogram.
    fn figures(&self) -> (u64, u64, u64, &Histogram);
    fn set_extremes(&mut self, min: u64, max: u64);
}

impl Extremes for RawRow {
    fn figures(&self) -> (u64, u64, u64, &Histogram) {
        (self.count, self.min_ns, self.max_ns, &self.hist)
    }
    fn set_extremes(&mut self, min: u64, max: u64) {
        (self.min_ns, self.max_ns) = (min, max);
    }
}

impl Extremes for WriterRow {
    fn figures(&self) -> (u64, u64, u64, &Histogram) {
        (self.count, self.min_ns, self.max_ns, &self.hist)
    }
    fn set_extremes(&mut self, min: u64, max: u64) {
        (self.min_ns, self.max_ns) = (min, max);
    }
}

/// Each window row's min and max (see [`extremes`]), from the same row at the window's start.
fn window_extremes<K: Eq + Hash, V: Extremes>(rows: &mut HashMap<K, V>, from: &HashMap<K, V>) {
    for (k, r) in rows.iter_mut() {
        let before = from.get(k).map(|b| {
            let (count, min, max, _) = b.figures();
            (count, min, max)
        });
        let (_, min, max, hist) = r.figures();
        let (min, max) = extremes(hist, (min, max), before);
        r.set_extremes(min, max);
    }
}

/// A window's (min, max) from its histogram, the run's extremes at its end, and (count, min,
/// max) at its start.
fn extremes(hist: &Histogram, now: (u64, u64), before: Option<(u64, u64, u64)>) -> (u64, u64) {
    let (lo, hi) = hist.range().unwrap_or(now);
    match before {
        None | Some((0, _, _)) => now,
        Some((_, bmin, bmax)) => {
            let min = if now.0 < bmin {
                now.0
            } else {
                lo.clamp(now.0, now.1)
            };
            let max = if now.1 > bmax {
                now.1
            } else {
                hi.clamp(now.0, now.1)
            };
            (min, max.max(min))
        }
    }
}

fn losses_since(a: &Losses, b: &Losses) -> Losses {
    Losses {
        missed_calls: a.missed_calls.saturating_sub(b.missed_calls),
        calls_without_row: a.calls_without_row.saturating_sub(b.calls_without_row),
        calls_without_inflight_slot: a
            .calls_without_inflight_slot
            .saturating_sub(b.calls_without_inflight_slot),
        processes_not_tracked: a
            .processes_not_tracked
            .saturating_sub(b.processes_not_tracked),
        detail_rows: a.detail_rows.saturating_sub(b.detail_rows),
        unwind_rules: a.unwind_rules.saturating_sub(b.unwind_rules),
        probe_runs_skipped: a.probe_runs_skipped.saturating_sub(b.probe_runs_skipped),
        hook_runs_skipped: a.hook_runs_skipped.saturating_sub(b.hook_runs_skipped),
        missed_grace_periods: a
            .missed_grace_periods
            .saturating_sub(b.missed_grace_periods),
        grace_periods_without_row: a
            .grace_periods_without_row
            .saturating_sub(b.grace_periods_without_row),
        callers_unreported: a.callers_unreported.saturating_sub(b.callers_unreported),
    }
}
