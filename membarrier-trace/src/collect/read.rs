//! Reading the kernel's aggregates into a [`Snapshot`]: stats rows, threads, writers,
//! breakdown detail and losses by cause.

use std::collections::HashSet;

use anyhow::{Context as _, Result};
use membarrier_trace_common::{
    CpuKey, Handled, HandlerKey, Stats, StatsKey, TID_SLOT_COUNT, WakerKey, counter,
};

use crate::{
    model::{ExitedRows, Losses, ProcKey, RawRow, Snapshot, ThreadRow, WriterRow, comm_str},
    preflight,
};

use super::{collector::Collector, retired::ProcKeyed as _};

impl Collector {
    pub(super) fn counter(&self, idx: u32) -> Result<u64> {
        Ok(self.counters.get(&idx, 0)?.iter().sum())
    }

    /// Stats row `i`, read after `STATS` gave it for `key`: None when it is no longer that
    /// key's (freed, and maybe made again for another, since).
    pub(super) fn row(&self, key: &StatsKey, i: u32) -> Result<Option<Stats>> {
        let row = self.rows.get(&i, 0).context("reading a stats row")?;
        Ok((row.key == *key).then_some(row))
    }

    /// One pass over the in-flight slots: the calls of the threads of processes in `live`, and
    /// how many calls and grace periods are under way now.
    pub(super) fn read_slots(&self, live: &HashSet<ProcKey>) -> Result<(Vec<ThreadRow>, u64, u64)> {
        let (mut threads, mut calls, mut grace_periods) = (Vec::new(), 0, 0);
        // The places held, one read, then their slots: not all 16,384 places at each report.
        let held = match &self.places_held {
            Some(m) => m.get(&0, 0).context("reading the places held")?,
            None => [0; TID_SLOT_COUNT as usize / 64],
        };
        let placed = (0..TID_SLOT_COUNT)
            .filter(|&at| held[at as usize / 64] & 1 << (at % 64) != 0)
            .filter_map(|at| match self.tid_slots.get(&at, 0) {
                Ok(slot) if slot.tid == 0 => None, // freed since
                Ok(slot) => Some(Ok((slot.tid as u32, slot))),
                Err(e) => Some(Err(e)),
            });
        for item in self.inflight.iter().chain(placed) {
            let (tid, slot) = item.context("reading the in-flight slots")?;
            calls += u64::from(slot.start_ns != 0);
            grace_periods += u64::from(slot.writer.depth != 0);
            let p = (slot.tgid, slot.serial);
            if live.contains(&p) && slot.thread.calls.iter().any(|&n| n > 0) {
                threads.push(ThreadRow {
                    proc: p,
                    tid,
                    name: comm_str(&slot.thread.comm),
                    calls: slot.thread.calls,
                    threads: 1,
                });
            }
        }
        Ok((threads, calls, grace_periods))
    }

    /// Reads the kernel's totals. With `last`, calls still inside membarrier are counted as
    /// missed: tracing stops before they return.
    ///
    /// Long: the read's steps are calls (retire, rows, slots, writers, losses); what stays is
    /// the Snapshot's fields, each from its map.
    pub fn snapshot(&mut self, last: bool) -> Result<Snapshot> {
        if last {
            // Nothing more is counted (calls under way stay open: counted as missed), and every
            // stack sent is taken in: the final figures add up, stacks and calls alike.
            self.control
                .set(0, 0, 0)
                .context("disarming the eBPF programs")?;
            if let Some(s) = &self.stacks {
                s.flush();
            }
        }
        let elapsed_ns = self.started.elapsed().as_nanos() as u64;
        let live = self.retire_exited()?;
        let mut named = HashSet::new();
        let mut rows = self.read_rows(&live, &mut named)?;
        // Every lost call once, by cause. An enter that got no slot leaves an exit without
        // one too: those are counted as dropped, not missed. A skipped exit program leaves
        // its slot open, found at the thread's next call or exit (the kernel's own count of
        // skipped runs would also count untraced processes' calls).
        let no_slot = self.counter(counter::DROPPED_INFLIGHT)?;
        let mut missed = self
            .counter(counter::EXIT_WITHOUT_SLOT)?
            .saturating_sub(no_slot)
            + self.counter(counter::EXIT_SKIPPED)?;
        let mut missed_grace_periods = self.counter(counter::MISSED_WRITERS)?;
        let (mut threads, open_calls, open_grace_periods) = self.read_slots(&live)?;
        if last {
            // Calls and grace periods still under way: tracing stops before they return.
            missed += open_calls;
            missed_grace_periods += open_grace_periods;
        }
        for t in self.exited_threads.values() {
            threads.extend(t.by_tid.values().chain(&t.others).cloned());
        }
        let mut writers = self.read_writers(&live, &mut named)?;
        writers.extend(self.retired.writers.values().cloned());
        let losses = self.losses(missed, missed_grace_periods, no_slot)?;
        let mut ipi_cpus: Vec<(CpuKey, u64)> = self.ipi_cpus.iter().collect::<Result<_, _>>()?;
        let mut wakers: Vec<(WakerKey, u64)> = self.wakers.iter().collect::<Result<_, _>>()?;
        let mut handled: Vec<(HandlerKey, Handled)> =
            self.handled.iter().collect::<Result<_, _>>()?;
        rows.extend(self.retired.rows.values().cloned());
        ipi_cpus.extend(self.retired.ipi_cpus.iter().map(|(k, v)| (*k, *v)));
        wakers.extend(self.retired.wakers.iter().map(|(k, v)| (*k, *v)));
        handled.extend(self.retired.handled.iter().map(|(k, v)| (*k, *v)));
        let mut comms = self.comms.clone();
        comms.extend(self.retired.comms.iter().map(|(k, v)| (*k, v.clone())));
        Ok(Snapshot {
            elapsed_ns,
            unix_ns: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64),
            hostname: self.hostname.clone(),
            kernel: self.kernel_release.clone(),
            rows,
            losses,
            comms,
            exited: self.retired.exited.clone(),
            ipi_cpus,
            wakers,
            handled,
            grace_period_source: self.grace_source,
            attach: self.hook.attach,
            maps: self.maps,
            exited_rows: ExitedRows {
                moved_at_exit: self.moved,
                ring_full: self.counter(counter::EXITED_RING_FULL)?,
                summed_by_name: self.counter(counter::EXITED_SUMMED)?,
                kept_whole: self.counter(counter::EXITED_KEPT)?,
            },
            writers,
            gp_funcs: self
                .writers
                .as_ref()
                .map(|w| w.funcs.clone())
                .unwrap_or_default(),
            callers: self
                .callers
                .as_ref()
                .map(|n| n.named.clone())
                .unwrap_or_default(),
            stacks: self
                .stacks
                .as_ref()
                .zip(self.kstacks.as_ref())
                .map(|(s, k)| k.with_live(s.counts.lock().unwrap().clone()))
                .transpose()?,
            threads,
        })
    }

    /// The stats rows with calls, each live process named afresh from /proc.
    fn read_rows(
        &mut self,
        live: &HashSet<ProcKey>,
        named: &mut HashSet<ProcKey>,
    ) -> Result<Vec<RawRow>> {
        let mut rows = Vec::new();
        for item in self.stats.iter() {
            let (key, i) = item.context("reading the stats map")?;
            // A row is created just before its first call is counted into it; one whose key is
            // another's was freed (and made again) since its key was read.
            let Some(s) = self.row(&key, i)? else {
                continue;
            };
            if s.count == 0 {
                continue;
            }
            // Live processes are named by /proc, afresh each time (exec and PR_SET_NAME rename
            // them: the main thread's comm); else by the comm of the thread that made the
            // first call.
            let p = (key.tgid, key.serial);
            if named.insert(p) {
                let name = preflight::comm(key.tgid)
                    .filter(|_| live.contains(&p))
                    .unwrap_or_else(|| comm_str(&s.comm));
                self.comms.insert(p, name);
            }
            rows.push(RawRow::from_stats(key, &s));
        }
        Ok(rows)
    }

    /// The RCU writers' rows with grace periods; a process with rows only here is named too.
    fn read_writers(
        &mut self,
        live: &HashSet<ProcKey>,
        named: &mut HashSet<ProcKey>,
    ) -> Result<Vec<WriterRow>> {
        let mut writers = Vec::new();
        for item in self.writer_rows.iter() {
            let (key, s) = item.context("reading the writers map")?;
            let p = key.proc();
            if s.count == 0 {
                continue;
            }
            // A process that has rows here only (qsbr makes no membarrier calls) is named too.
            if !named.contains(&p) && live.contains(&p) {
                named.insert(p);
                if let Some(name) = preflight::comm(key.tgid) {
                    self.comms.insert(p, name);
                }
            }
            writers.push(WriterRow::from_stats(key, &s));
        }
        Ok(writers)
    }

    /// Everything lost, by cause: the kernel's counters beside the figures read above.
    fn losses(&mut self, missed: u64, missed_grace_periods: u64, no_slot: u64) -> Result<Losses> {
        let (hook_runs_skipped, probe_runs_skipped) = self.runs_skipped()?;
        Ok(Losses {
            missed_calls: missed,
            missed_grace_periods,
            grace_periods_without_row: self.counter(counter::DROPPED_WRITERS)?,
            callers_unreported: self.counter(counter::CALLERS_UNSENT)?,
            calls_without_row: self.counter(counter::DROPPED_STATS)?,
            calls_without_inflight_slot: no_slot,
            processes_not_tracked: self.counter(counter::DROPPED_PROCS)?,
            // With the stats rows whose index could not be freed (never seen: the queue's lock
            // fails only past a deadlock check or a quarter-second wait).
            detail_rows: self.counter(counter::DROPPED_DETAIL)?
                + self.counter(counter::ROWS_NOT_FREED)?,
            unwind_rules: self.kstacks.as_ref().map_or(0, |k| k.rules_dropped),
            probe_runs_skipped,
            hook_runs_skipped,
        })
    }
}
