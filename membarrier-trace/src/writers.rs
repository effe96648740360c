//! Userspace RCU writers in the report: the kernel's grace-period rows (per process, thread,
//! function and caller) grouped per (process, function, caller), with the caller symbolized.

use std::collections::{BTreeMap, HashMap};

use membarrier_trace_common::{WriterKey, WriterStats};
use serde::Serialize;

use crate::{
    hist::Histogram,
    model::{Bucket, Latency, ProcKey, comm_str},
    rcu::GpFunc,
};

/// One kernel grace-period row, as read.
#[derive(Clone, Debug, PartialEq)]
pub struct WriterRow {
    pub key: WriterKey,
    pub count: u64,
    pub sum_ns: u64,
    pub min_ns: u64,
    pub max_ns: u64,
    pub hist: Histogram,
    pub membarrier_calls: u64,
    pub membarrier_ns: u64,
    pub blocked_ns: u64,
    /// The thread's name when its row was made.
    pub thread: String,
}

impl WriterRow {
    pub fn from_stats(key: WriterKey, s: &WriterStats) -> Self {
        Self {
            key,
            count: s.count,
            sum_ns: s.sum_ns,
            min_ns: s.min_ns,
            max_ns: s.max_ns,
            hist: Histogram::from_counts(&s.hist),
            membarrier_calls: s.membarrier_calls,
            membarrier_ns: s.membarrier_ns,
            blocked_ns: s.blocked_ns,
            thread: comm_str(&s.comm),
        }
    }

    /// Adds `r`'s grace periods to this row (rows of processes summed together).
    pub fn absorb(&mut self, r: &WriterRow) {
        self.min_ns = if self.count == 0 {
            r.min_ns
        } else {
            self.min_ns.min(r.min_ns)
        };
        self.max_ns = self.max_ns.max(r.max_ns);
        self.count += r.count;
        self.sum_ns += r.sum_ns;
        self.hist.add(&r.hist);
        self.membarrier_calls += r.membarrier_calls;
        self.membarrier_ns += r.membarrier_ns;
        self.blocked_ns += r.blocked_ns;
    }
}

/// The code that called a grace-period function: its return address, symbolized while the
/// process lived.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Caller {
    /// The return address at entry, in the process's address space.
    pub address: u64,
    /// The function it is in (demangled); null where the module has no symbol for it.
    pub symbol: Option<String>,
    /// Bytes from the start of `symbol` to `address`.
    pub offset: Option<u64>,
    /// The executable or library.
    pub module: Option<String>,
    /// Source file and line of the call, where the module has debug info.
    pub file: Option<String>,
    pub line: Option<u32>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct WriterThread {
    pub tid: u32,
    pub name: String,
    pub grace_periods: u64,
}

/// Grace periods of one (process, function, caller).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct WriterReport {
    pub pid: u32,
    pub serial: u32,
    pub comm: String,
    /// `memb`, `mb`, `qsbr`, `bp`, `signal`, or `custom` (`--rcu-func`).
    pub flavour: String,
    pub function: String,
    pub library: String,
    pub caller: Caller,
    pub threads: Vec<WriterThread>,
    pub grace_periods: u64,
    /// Entry to return of each grace period.
    pub latency_ns: Latency,
    pub histogram: Vec<Bucket>,
    /// Membarrier calls made inside the grace periods, and their time.
    pub membarrier_calls: u64,
    pub membarrier_ns: u64,
    /// Off-CPU time inside, outside membarrier calls: waiting for readers.
    pub blocked_ns: u64,
}

/// Groups grace-period rows per (process, function, caller), busiest first.
pub fn reports(
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
            let mut all = WriterRow {
                thread: String::new(),
                ..rows[0].clone()
            };
            all.count = 0;
            all.sum_ns = 0;
            all.max_ns = 0;
            all.hist = Histogram::default();
            all.membarrier_calls = 0;
            all.membarrier_ns = 0;
            all.blocked_ns = 0;
            let mut threads: BTreeMap<u32, WriterThread> = BTreeMap::new();
            for r in &rows {
                all.absorb(r);
                let t = threads.entry(r.key.tid).or_insert_with(|| WriterThread {
                    tid: r.key.tid,
                    name: r.thread.clone(),
                    grace_periods: 0,
                });
                t.grace_periods += r.count;
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
                latency_ns: Latency::new(&all.hist, all.min_ns, all.max_ns, all.sum_ns),
                histogram: all
                    .hist
                    .buckets(all.max_ns)
                    .into_iter()
                    .map(|(le_ns, count)| Bucket { le_ns, count })
                    .collect(),
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

/// Symbolizes callers with blazesym, by the process's own mappings (so it must be alive).
pub struct Symbolizer {
    inner: blazesym::symbolize::Symbolizer,
}

impl Default for Symbolizer {
    fn default() -> Self {
        Self {
            inner: blazesym::symbolize::Symbolizer::new(),
        }
    }
}

impl Symbolizer {
    /// The caller at return address `addr` in process `pid`; `None` when the process is gone.
    pub fn caller(&self, pid: u32, addr: u64) -> Option<Caller> {
        use blazesym::symbolize::{Input, Symbolized, source::Process, source::Source};
        if pid == 0 || !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            return None;
        }
        let src = Source::Process(Process::new(blazesym::Pid::from(pid)));
        // The call instruction ends at the return address: look up the byte before it, so a
        // call that is the last instruction of a function is not put in the next one.
        let looked_up = addr.saturating_sub(1);
        let sym = self
            .inner
            .symbolize_single(&src, Input::AbsAddr(looked_up))
            .ok()?;
        let mut c = Caller {
            address: addr,
            ..Default::default()
        };
        match sym {
            Symbolized::Sym(s) => {
                c.symbol = Some(s.name.to_string());
                c.offset = Some(s.offset as u64 + 1);
                c.module = s.module.map(|m| m.to_string_lossy().into_owned());
                if let Some(ci) = s.code_info {
                    c.file = Some(ci.to_path().display().to_string());
                    c.line = ci.line;
                }
            }
            Symbolized::Unknown(_) => {}
        }
        Some(c)
    }
}
