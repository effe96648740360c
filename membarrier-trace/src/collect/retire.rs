//! Retiring exited processes: what the kernel maps held for them moves into the tracer's
//! memory ([`super::retired`]), freeing the rows for new processes.

use std::{
    collections::{HashMap, HashSet},
    path::Path,
};

use anyhow::{Context as _, Result};
use aya::maps::{HashMap as BpfHashMap, MapData, MapError};
use membarrier_trace_common::{
    COMM_LEN, MAX_THREADS, MOVED_ROWS, Stats, StatsKey, SummedKey, SummedRow, THREAD_CMDS,
    ThreadCalls, ThreadKey, WriterKey, proc_id, thread_cmd,
};

use crate::{
    model::{ProcKey, RawRow, ThreadRow, WriterRow, comm_str},
    preflight,
};

use super::{
    collector::Collector,
    retired::{ProcKeyed, add_retired, sum_into},
};

/// Moves the entries of `dead` processes from a kernel detail map into `into`, under the entry
/// each went to (`dest`; itself when it had no stats row).
pub(super) fn retire_detail<K, V>(
    map: &mut BpfHashMap<MapData, K, V>,
    into: &mut HashMap<K, V>,
    dead: &HashSet<ProcKey>,
    dest: &HashMap<ProcKey, ProcKey>,
) -> Result<()>
where
    K: ProcKeyed + aya::Pod + Eq + std::hash::Hash,
    V: aya::Pod + Default + std::ops::AddAssign,
{
    let entries: Vec<(K, V)> = map.iter().collect::<Result<_, _>>()?;
    for (k, n) in entries {
        let p = k.proc();
        if dead.contains(&p) {
            let _ = map.remove(&k);
            sum_into(into, k.moved_to(dest.get(&p).copied().unwrap_or(p)), n);
        }
    }
    Ok(())
}

impl Collector {
    /// Whether process `p` is still alive. One created while tracing is alive while its entry
    /// in PROCS holds its serial (removed when its last task exits, replaced when its pid is
    /// reused) and its pid exists: an exit the kernel skipped leaves the entry, and its rows
    /// would never be freed. One from before, while no later process has its pid and /proc
    /// has it.
    pub(super) fn alive(&self, p: ProcKey) -> bool {
        match self.procs.get(&p.0, 0) {
            Ok(entry) if p.1 != 0 || entry.serial != 0 => {
                entry.serial == p.1 && preflight::exists(p.0)
            }
            _ => p.1 == 0 && Path::new(&format!("/proc/{}", p.0)).exists(),
        }
    }

    /// Moves what the kernel maps hold for exited processes into `self.retired`, freeing their
    /// rows for new processes; the process is gone, nothing adds to its rows any more. Cheap
    /// enough to run several times a second: it reads keys, and the rows of the dead only.
    /// Returns the processes found alive.
    pub fn retire_exited(&mut self) -> Result<HashSet<ProcKey>> {
        // First: every row the kernel moved out is in the ring before its process looks dead
        // (its PROCS entry goes after), so no row of a process read below is in a record read
        // later, and none is both.
        // Where each dead process's figures go: its own entry, or its name's.
        let mut dest: HashMap<ProcKey, ProcKey> = HashMap::new();
        let moved = self.take_moved(&mut dest);
        self.take_summed()?;
        self.moved_in_use = moved.len();
        self.moved += moved.len() as u64;
        let keys: Vec<StatsKey> = self
            .stats
            .keys()
            .collect::<Result<_, _>>()
            .context("reading the stats map")?;
        self.rows_in_use = keys.len();
        let writer_keys: Vec<WriterKey> = self
            .writer_rows
            .keys()
            .collect::<Result<_, _>>()
            .context("reading the writers map")?;
        let (live, mut dead) = self.live_and_dead(&keys, &writer_keys);
        // After the liveness checks: a process found dead has all its threads' exits in.
        let drained = self.drain_threads()?;
        // `--stacks`: the kernel unwinds from now on what the stacks thread has seen.
        if let (Some(s), Some(k)) = (&self.stacks, &mut self.kstacks) {
            k.teach(s.learned(), &live);
        }
        // The callers thread finds callers as the kernel reports them, named here; one whose
        // report was lost (a full ring) is asked for, while its process lives.
        if let Some(namer) = &mut self.callers {
            namer.name_found();
            for key in &writer_keys {
                let p = key.proc();
                if live.contains(&p) && !namer.named.contains_key(&(p, key.caller)) {
                    namer.ask(p, key.caller);
                }
            }
        }
        if dead.is_empty() && moved.is_empty() {
            self.threads_in_use = drained;
            return Ok(live);
        }
        self.retire_rows(&keys, &writer_keys, &dead, &mut dest)?;
        // The processes whose rows the kernel moved go with the dead from here (their rows
        // are retired already; a row read above belonged to a process still alive then).
        dead.extend(moved);
        self.retire_details(&dead, &dest)?;
        self.comms.retain(|p, _| !dead.contains(p));
        self.threads_in_use = drained;
        let demoted = self.retired.keep_most();
        self.demote(&demoted);
        Ok(live)
    }

    /// The processes of these rows, each checked once: alive (and named while it is) or dead.
    fn live_and_dead(
        &mut self,
        keys: &[StatsKey],
        writer_keys: &[WriterKey],
    ) -> (HashSet<ProcKey>, HashSet<ProcKey>) {
        let (mut live, mut dead) = (HashSet::new(), HashSet::new());
        let procs = keys
            .iter()
            .map(ProcKeyed::proc)
            .chain(writer_keys.iter().map(ProcKeyed::proc));
        for p in procs {
            if !live.contains(&p) && !dead.contains(&p) {
                if self.alive(p) {
                    live.insert(p);
                    // Named once while alive, not only by the snapshot: a report made after
                    // the exit (JSON at the end) has only the name at exit, and its program
                    // is skipped while any map syscall on that CPU holds bpf_prog_active
                    // (another tool's, preempted on PREEMPT_RT): the name fell back to the
                    // first caller's thread name.
                    if !self.comms.contains_key(&p)
                        && let Some(name) = preflight::comm(p.0)
                    {
                        self.comms.insert(p, name);
                    }
                } else {
                    dead.insert(p);
                }
            }
        }
        (live, dead)
    }

    /// The dead processes' rows (stats and writers) out of the kernel, each into the retired
    /// entry `place` gives it (its own, or its name's).
    fn retire_rows(
        &mut self,
        keys: &[StatsKey],
        writer_keys: &[WriterKey],
        dead: &HashSet<ProcKey>,
        dest: &mut HashMap<ProcKey, ProcKey>,
    ) -> Result<()> {
        for key in keys.iter().filter(|k| dead.contains(&k.proc())) {
            // Gone since the keys were read: the kernel moved it at the exit (it moves a
            // process's rows before its PROCS entry goes, so it is in the next drain).
            let i = match self.stats.get(key, 0) {
                Err(MapError::KeyNotFound) => continue,
                r => r.context("reading the stats map")?,
            };
            let Some(row) = self.row(key, i)? else {
                continue;
            };
            match self.stats.remove(key) {
                Err(MapError::KeyNotFound) => continue,
                r => r.context("freeing a stats row")?,
            }
            // Removed here, so this side frees it (see the kernel's `free_row`).
            // SAFETY: a row is plain integers; all zero is a valid (empty) one.
            let empty: Stats = unsafe { std::mem::zeroed() };
            self.rows.set(i, empty, 0).context("clearing a stats row")?;
            self.free_rows
                .push(i, 0)
                .context("freeing a stats row's index")?;
            if row.count == 0 {
                continue;
            }
            let to = key.moved_to(self.place(dest, key.proc(), &row.comm));
            add_retired(&mut self.retired.rows, to, RawRow::from_stats(to, &row));
        }
        for key in writer_keys.iter().filter(|k| dead.contains(&k.proc())) {
            let row = self
                .writer_rows
                .get(key, 0)
                .context("reading a writers row")?;
            self.writer_rows
                .remove(key)
                .context("freeing a writers row")?;
            if row.count == 0 {
                continue;
            }
            let p = key.proc();
            let to = self.place(dest, p, &row.comm);
            if let Some(namer) = &mut self.callers
                && let Some(c) = namer.named.remove(&(p, key.caller))
            {
                namer.named.insert((to, key.caller), c);
            }
            let to = key.moved_to(to);
            add_retired(
                &mut self.retired.writers,
                to,
                WriterRow::from_stats(to, &row),
            );
        }
        Ok(())
    }

    /// What else the dead leave: their stacks, callers' names, IPI targets, wakers, handled
    /// IPIs and exited threads, each into its process's retired entry.
    fn retire_details(
        &mut self,
        dead: &HashSet<ProcKey>,
        dest: &HashMap<ProcKey, ProcKey>,
    ) -> Result<()> {
        if let Some(s) = &self.stacks {
            // The kernel's stacks of the dead join the samples' first, each under its own
            // process, and are summed with them.
            if let Some(k) = &mut self.kstacks {
                k.retire(dead, &mut s.counts.lock().unwrap())?;
            }
            s.retire(dest);
        }
        if let Some(namer) = &mut self.callers {
            namer.retire(dest);
        }
        let r = &mut self.retired;
        retire_detail(&mut self.ipi_cpus, &mut r.ipi_cpus, dead, dest)?;
        retire_detail(&mut self.wakers, &mut r.wakers, dead, dest)?;
        retire_detail(&mut self.handled, &mut r.handled, dead, dest)?;
        for p in dead {
            if let Some(t) = self.exited_threads.remove(p) {
                let to = dest.get(p).copied().unwrap_or(*p);
                self.exited_threads
                    .entry(to)
                    .or_default()
                    .absorb(t, to, to == *p);
            }
        }
        Ok(())
    }

    /// What is kept outside `self.retired` of exited processes [`Retired::keep_most`] summed
    /// into their name's entry follows them there: their threads (summed), the names of their
    /// grace periods' callers, their stacks (unattributed: addresses are a process's own).
    pub(super) fn demote(&mut self, demoted: &HashMap<ProcKey, ProcKey>) {
        if demoted.is_empty() {
            return;
        }
        for (p, &to) in demoted {
            if let Some(t) = self.exited_threads.remove(p) {
                self.exited_threads
                    .entry(to)
                    .or_default()
                    .absorb(t, to, false);
            }
        }
        if let Some(namer) = &mut self.callers {
            let named: Vec<_> = namer
                .named
                .keys()
                .filter(|(p, _)| demoted.contains_key(p))
                .copied()
                .collect();
            for (p, caller) in named {
                if let Some(c) = namer.named.remove(&(p, caller)) {
                    namer.named.insert((demoted[&p], caller), c);
                }
            }
            namer.retire(demoted);
        }
        if let Some(s) = &self.stacks {
            s.retire(demoted);
        }
    }

    /// Takes in the exited processes whose rows the kernel sent on `EXITED`: each placed like
    /// any exited process (`dest`), named as it exited where that was seen, its rows retired.
    /// Returns them, to be retired with the dead (threads, details, names).
    pub(super) fn take_moved(&mut self, dest: &mut HashMap<ProcKey, ProcKey>) -> HashSet<ProcKey> {
        let mut procs = HashSet::new();
        for m in self.exited_rows.take() {
            let p = (m.tgid, m.serial);
            let at_exit = (m.named_at_exit != 0).then_some(m.comm);
            let to = self.place_named(dest, p, at_exit, &m.comm);
            for r in &m.row[..(m.rows as usize).min(MOVED_ROWS)] {
                let key = StatsKey {
                    tgid: to.0,
                    serial: to.1,
                    cmd: r.cmd,
                    flags: r.flags,
                    errno: r.errno,
                };
                add_retired(&mut self.retired.rows, key, RawRow::from_moved(key, r));
            }
            procs.insert(p);
        }
        procs
    }

    /// Takes in what the kernel summed by name since the last pass (it sums, at their exit, the
    /// rows of processes it could not send on a full `EXITED`): into each name's entry, with
    /// the processes counted there. Read before `STATS`, like the ring: a process summed later
    /// has no row left there.
    pub(super) fn take_summed(&mut self) -> Result<()> {
        let entries: Vec<(SummedKey, SummedRow)> = self
            .summed
            .iter()
            .collect::<Result<_, _>>()
            .context("reading the summed map")?;
        for (k, cur) in entries {
            let new = match self.summed_seen.insert(k, cur) {
                Some(seen) => cur.since(&seen),
                None => cur,
            };
            if new.count == 0 && new.procs == 0 {
                continue;
            }
            let to = self.retired.name_entry(comm_str(&k.comm));
            *self.retired.exited.entry(to).or_default() += new.procs;
            let key = StatsKey {
                tgid: to.0,
                serial: to.1,
                cmd: k.cmd,
                flags: k.flags,
                errno: k.errno,
            };
            add_retired(&mut self.retired.rows, key, RawRow::from_summed(key, &new));
            // The kernel sums a process only when its last thread made all its calls and
            // sent no row of its own: one thread per process, summed with the name's others.
            let mut calls = [0; THREAD_CMDS];
            calls[thread_cmd(k.cmd, k.flags)] = new.count;
            self.exited_threads.entry(to).or_default().sum(ThreadRow {
                proc: to,
                tid: 0,
                name: String::new(),
                calls,
                threads: new.procs,
            });
        }
        Ok(())
    }

    /// Moves the exited threads' calls out of the kernel: those sent on the ring, and those
    /// put in `THREADS` when it was full. Returns how many `THREADS` held.
    pub(super) fn drain_threads(&mut self) -> Result<usize> {
        let entries: Vec<(ThreadKey, ThreadCalls)> = self
            .thread_rows
            .iter()
            .collect::<Result<_, _>>()
            .context("reading the threads map")?;
        for (k, _) in &entries {
            let _ = self.thread_rows.remove(k);
        }
        let held = entries.len();
        let sent = self.exited_rows.take_threads().into_iter();
        for (k, t) in entries.into_iter().chain(sent.map(|t| (t.key, t.calls))) {
            let p = (k.tgid, k.serial);
            self.exited_threads.entry(p).or_default().add(ThreadRow {
                proc: p,
                tid: k.tid,
                name: comm_str(&t.comm),
                calls: t.calls,
                threads: 1,
            });
        }
        Ok(held)
    }

    /// The retired entry exited process `p`'s figures go to, found once per pass (`dest`). It
    /// is named as it exited, else as last seen alive, else `comm` (its row's first caller).
    pub(super) fn place(
        &mut self,
        dest: &mut HashMap<ProcKey, ProcKey>,
        p: ProcKey,
        comm: &[u8; COMM_LEN],
    ) -> ProcKey {
        if let Some(to) = dest.get(&p) {
            return *to;
        }
        let id = proc_id(p.0, p.1);
        let at_exit = self.exit_names.get(&id, 0).ok();
        let _ = self.exit_names.remove(&id);
        self.place_named(dest, p, at_exit, comm)
    }

    /// [`Collector::place`] with its name at exit already known (or known to be missing).
    pub(super) fn place_named(
        &mut self,
        dest: &mut HashMap<ProcKey, ProcKey>,
        p: ProcKey,
        at_exit: Option<[u8; COMM_LEN]>,
        comm: &[u8; COMM_LEN],
    ) -> ProcKey {
        if let Some(to) = dest.get(&p) {
            return *to;
        }
        let name = at_exit
            .map(|c| comm_str(&c))
            .or_else(|| self.comms.remove(&p))
            .unwrap_or_else(|| comm_str(comm));
        let to = self.retired.place(p, name);
        dest.insert(p, to);
        to
    }

    /// Whether the stats map was over a quarter full at the last retire pass: processes are
    /// coming and going fast (thousands a second), and the next pass should come sooner.
    pub fn rows_filling(&self) -> bool {
        self.rows_in_use * 4 > self.maps.stats_rows as usize
            || self.threads_in_use * 4 > MAX_THREADS as usize
            || self.moved_in_use > 1000
    }
}
