//! The tracer's memory of exited processes: their rows and detail, the busiest kept one by one
//! and the rest summed per name past a bound, and their threads likewise.

use std::collections::{HashMap, HashSet};

use membarrier_trace_common::{CpuKey, Handled, HandlerKey, StatsKey, WakerKey, WriterKey};

use crate::model::{Absorb, ProcKey, RawRow, ThreadRow, WriterRow};

/// Exited processes kept individually in the tracer's memory: those that matter most, half
/// chosen by calls and half by time in the call; the others are summed per name.
pub const RETIRED_KEEP: usize = 1024;
/// Names summed apart; the rest go into one `(other)` entry.
pub const RETIRED_NAMES: usize = 1024;

/// What the kernel maps held for processes that have exited, moved to userspace. Each keeps
/// its own rows as it comes; past [`RETIRED_KEEP`], [`Retired::keep_most`] sums the ones that
/// matter least into an entry per name (tgid 0, serial numbering the names), so memory stays
/// bounded however many processes come and go, the busiest keep their identity whenever they
/// exit, and every call stays counted.
#[derive(Default)]
pub(super) struct Retired {
    pub(super) rows: HashMap<StatsKey, RawRow>,
    pub(super) ipi_cpus: HashMap<CpuKey, u64>,
    pub(super) wakers: HashMap<WakerKey, u64>,
    pub(super) handled: HashMap<HandlerKey, Handled>,
    /// Processes each entry stands for.
    pub(super) exited: HashMap<ProcKey, u64>,
    pub(super) comms: HashMap<ProcKey, String>,
    pub(super) by_name: HashMap<String, ProcKey>,
    pub(super) writers: HashMap<WriterKey, WriterRow>,
}

impl Retired {
    /// Counts exited process `p`, named `comm`, and returns the entry its figures go to: its
    /// own, until [`Retired::keep_most`] says otherwise.
    pub(super) fn place(&mut self, p: ProcKey, comm: String) -> ProcKey {
        self.comms.insert(p, comm);
        *self.exited.entry(p).or_default() += 1;
        p
    }

    /// The entry summing the exited processes named `name` (past [`RETIRED_NAMES`] names,
    /// `(other)`).
    pub(super) fn name_entry(&mut self, name: String) -> ProcKey {
        let name = if self.by_name.len() < RETIRED_NAMES || self.by_name.contains_key(&name) {
            name
        } else {
            "(other)".to_string()
        };
        let next = (0, self.by_name.len() as u32 + 1);
        let to = *self.by_name.entry(name.clone()).or_insert(next);
        self.comms.insert(to, name);
        to
    }

    /// Keeps [`RETIRED_KEEP`] exited processes individually: taken in turn from the most calls
    /// down and from the most time in the call down (ties: the lower pid), so both a busy
    /// caller and a slow one keep their identity. Sums the others into their name's entry and
    /// returns where each went, for what is kept outside (threads, callers, stacks).
    pub(super) fn keep_most(&mut self) -> HashMap<ProcKey, ProcKey> {
        let singles: Vec<ProcKey> = self.exited.keys().filter(|p| p.0 != 0).copied().collect();
        if singles.len() <= RETIRED_KEEP {
            return HashMap::new();
        }
        let mut weight: HashMap<ProcKey, (u64, u64)> =
            singles.iter().map(|&p| (p, (0, 0))).collect();
        for (k, r) in &self.rows {
            if let Some(w) = weight.get_mut(&k.proc()) {
                w.0 += r.count;
                w.1 += r.sum_ns;
            }
        }
        let ranked = |by: fn(&(u64, u64)) -> u64| {
            let mut v = singles.clone();
            v.sort_unstable_by_key(|p| (std::cmp::Reverse(by(&weight[p])), *p));
            v
        };
        let (by_calls, by_time) = (ranked(|w| w.0), ranked(|w| w.1));
        let mut keep = HashSet::new();
        for (c, t) in by_calls.iter().zip(&by_time) {
            for p in [c, t] {
                if keep.len() < RETIRED_KEEP {
                    keep.insert(*p);
                }
            }
        }
        let mut demoted = HashMap::new();
        for p in singles.into_iter().filter(|p| !keep.contains(p)) {
            let name = self.comms.remove(&p).unwrap_or_default();
            let to = self.name_entry(name);
            let n = self.exited.remove(&p).unwrap_or(0);
            *self.exited.entry(to).or_default() += n;
            demoted.insert(p, to);
        }
        rekey(&mut self.rows, &demoted, |m, k, r| {
            add_retired(m, k, RawRow { key: k, ..r })
        });
        rekey(&mut self.writers, &demoted, |m, k, r| {
            add_retired(m, k, WriterRow { key: k, ..r })
        });
        rekey(&mut self.ipi_cpus, &demoted, sum_into);
        rekey(&mut self.wakers, &demoted, sum_into);
        rekey(&mut self.handled, &demoted, sum_into);
        demoted
    }
}

/// Moves the entries of the processes in `to` under their new entry, where `put` adds them.
pub(super) fn rekey<K: ProcKeyed + Eq + std::hash::Hash, V>(
    map: &mut HashMap<K, V>,
    to: &HashMap<ProcKey, ProcKey>,
    put: impl Fn(&mut HashMap<K, V>, K, V),
) {
    let moved: Vec<K> = map
        .keys()
        .filter(|k| to.contains_key(&k.proc()))
        .copied()
        .collect();
    for k in moved {
        let v = map.remove(&k).expect("listed above");
        put(map, k.moved_to(to[&k.proc()]), v);
    }
}

/// [`rekey`]'s `put` for the detail maps, whose values add.
pub(super) fn sum_into<K: Eq + std::hash::Hash, V: Default + std::ops::AddAssign>(
    map: &mut HashMap<K, V>,
    k: K,
    v: V,
) {
    *map.entry(k).or_default() += v;
}

/// Exited threads of a process kept one by one; later ones are summed.
pub const THREADS_KEEP: usize = 32;

/// A process's exited threads: the first [`THREADS_KEEP`] by tid, the rest summed (tid 0), so
/// a process that starts threads all day costs bounded memory and every call stays counted.
#[derive(Default)]
pub(super) struct ExitedThreads {
    pub(super) by_tid: HashMap<u32, ThreadRow>,
    pub(super) others: Option<ThreadRow>,
}

impl ExitedThreads {
    pub(super) fn add(&mut self, t: ThreadRow) {
        if let Some(have) = self.by_tid.get_mut(&t.tid) {
            // A tid used again by a later thread of the process.
            have.absorb(&t);
            have.name = t.name;
        } else if self.by_tid.len() < THREADS_KEEP {
            self.by_tid.insert(t.tid, t);
        } else {
            self.sum(t);
        }
    }

    pub(super) fn sum(&mut self, t: ThreadRow) {
        match &mut self.others {
            Some(o) => o.absorb(&t),
            None => {
                self.others = Some(ThreadRow {
                    tid: 0,
                    name: "(exited threads)".into(),
                    ..t
                })
            }
        }
    }

    /// Takes in the threads of an exited process: one by one when it keeps its own entry
    /// (`own`), else all summed (an entry summing processes of a name).
    pub(super) fn absorb(&mut self, from: ExitedThreads, to: ProcKey, own: bool) {
        for t in from.by_tid.into_values().chain(from.others) {
            let t = ThreadRow { proc: to, ..t };
            if own {
                self.add(t);
            } else {
                self.sum(t);
            }
        }
    }
}

/// Adds `r`, already keyed by the entry [`Retired::place`] gave, to the retired rows.
pub(super) fn add_retired<K: Eq + std::hash::Hash, R: Absorb>(
    rows: &mut HashMap<K, R>,
    key: K,
    r: R,
) {
    match rows.entry(key) {
        std::collections::hash_map::Entry::Occupied(mut e) => e.get_mut().absorb(&r),
        std::collections::hash_map::Entry::Vacant(e) => {
            e.insert(r);
        }
    }
}

/// The keys of the kernel maps that name a process by (tgid, serial).
pub(super) trait ProcKeyed: Copy {
    fn proc(&self) -> ProcKey;
    /// The same key for process `p`.
    fn moved_to(self, p: ProcKey) -> Self;
}

macro_rules! proc_keyed {
    ($($t:ty),*) => {$(
        impl ProcKeyed for $t {
            fn proc(&self) -> ProcKey {
                (self.tgid, self.serial)
            }
            fn moved_to(self, p: ProcKey) -> Self {
                Self { tgid: p.0, serial: p.1, ..self }
            }
        }
    )*};
}
proc_keyed!(StatsKey, CpuKey, WakerKey, HandlerKey, WriterKey);

#[cfg(test)]
mod tests {
    use super::*;

    fn row(tgid: u32, serial: u32, calls: u64) -> RawRow {
        RawRow {
            count: calls,
            ..RawRow::new(StatsKey {
                tgid,
                serial,
                cmd: 0,
                flags: 0,
                errno: 0,
            })
        }
    }

    fn thread(tid: u32, calls: u64) -> ThreadRow {
        let mut c = [0; membarrier_trace_common::THREAD_CMDS];
        c[0] = calls;
        ThreadRow {
            proc: (7, 1),
            tid,
            name: format!("t{tid}"),
            calls: c,
            threads: 1,
        }
    }

    /// A process's exited threads: the first THREADS_KEEP by tid, the rest summed; a tid used
    /// again adds to its entry; summed into a per-name entry, all of them are summed.
    #[test]
    fn exited_threads_are_kept_then_summed() {
        let mut t = ExitedThreads::default();
        for tid in 1..=100 {
            t.add(thread(tid, 2));
        }
        t.add(thread(1, 3));
        assert_eq!(t.by_tid.len(), THREADS_KEEP);
        assert_eq!((t.by_tid[&1].calls[0], t.by_tid[&1].threads), (5, 2));
        let o = t.others.as_ref().unwrap();
        assert_eq!((o.tid, o.threads, o.calls[0]), (0, 68, 136));
        let mut per_name = ExitedThreads::default();
        per_name.absorb(t, (0, 3), false);
        assert!(per_name.by_tid.is_empty());
        let o = per_name.others.unwrap();
        assert_eq!(
            (o.proc, o.tid, o.threads, o.calls[0]),
            ((0, 3), 0, 101, 203)
        );
    }

    /// Past RETIRED_KEEP, exited processes are summed per name, then under `(other)`: the
    /// tracer's memory stays bounded and no call or process goes uncounted. Those kept are the
    /// ones with the most calls and the most time in the call, half each, whenever they exited.
    #[test]
    fn retired_processes_are_kept_then_summed_per_name() {
        let mut r = Retired::default();
        let n = RETIRED_KEEP + RETIRED_NAMES + 50;
        // Process i: 2 + i calls, (n - i) ms in the call: the late ones call most, the early
        // ones spend the most time in the call.
        let calls = |i: u32| 2 + u64::from(i);
        let ns = |i: u32| (n as u64 - u64::from(i)) * 1_000_000;
        let mut demoted = 0;
        for i in 0..n as u32 {
            let p = (i + 1, i + 1);
            let to = r.place(p, format!("p{}", i % (RETIRED_NAMES as u32 + 10)));
            assert_eq!(to, p);
            let one = RawRow {
                sum_ns: ns(i),
                ..row(i + 1, i + 1, calls(i))
            };
            add_retired(&mut r.rows, one.key, one);
            if i % 700 == 0 {
                demoted += r.keep_most().len();
            }
        }
        demoted += r.keep_most().len();
        assert_eq!(demoted + RETIRED_KEEP, n);
        let singles: HashSet<ProcKey> = r.exited.keys().filter(|p| p.0 != 0).copied().collect();
        assert_eq!(singles.len(), RETIRED_KEEP);
        // Half the most calls (the last processes), half the most time (the first).
        let half = RETIRED_KEEP as u32 / 2;
        for i in (0..half).chain(n as u32 - half..n as u32) {
            assert!(singles.contains(&(i + 1, i + 1)), "process {i} was summed");
        }
        assert_eq!(r.exited.values().sum::<u64>(), n as u64);
        let total: u64 = (0..n as u32).map(calls).sum();
        assert_eq!(r.rows.values().map(|r| r.count).sum::<u64>(), total);
        let total_ns: u64 = (0..n as u32).map(ns).sum();
        assert_eq!(r.rows.values().map(|r| r.sum_ns).sum::<u64>(), total_ns);
        // Every row under its entry's key.
        assert!(r.rows.iter().all(|(k, row)| row.key == *k));
        assert!(
            r.rows.len() <= RETIRED_KEEP + RETIRED_NAMES + 1,
            "{}",
            r.rows.len()
        );
        assert!(r.comms.values().any(|c| c == "(other)"));
        // A summed entry is named and counts its processes.
        let other = r.comms.iter().find(|(_, c)| *c == "(other)").unwrap().0;
        assert_eq!(other.0, 0);
        assert!(r.exited[other] >= 1);
    }
}
