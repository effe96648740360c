//! One membarrier call: its thread's in-flight slot at entry, its stats row (per tgid, cmd,
//! flags, errno) at exit.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid},
    macros::map,
    maps::{Array, HashMap, PerCpuArray, Queue},
};
use membarrier_trace_common::{
    COMM_LEN, INSIDE_SLOTS, IPI_HIST, Inflight, MAX_STATS, OTHER_ROW, Stats, StatsKey, THREAD_CMDS,
    counter, row_kind, thread_cmd,
};

use crate::{
    config::{armed, breakdown, stacks},
    process::{PROCS, process, process_comm},
    stacks::take_stack,
    thread::{ZERO_SLOT, clear, hold_thread, new_slot, send_thread, slot},
    util::{Row as _, add, add32, bucket, bump, now, update},
};

/// Threads inside membarrier (or a userspace grace period), per `tid % INSIDE_SLOTS`: the
/// probes that run for every task on the box look here first (an inlined array load) and
/// return unless it is non-zero. A word per index: its bytes 0 and 1 are flags only the thread
/// holding its place in `TID_SLOTS` writes, with plain stores (its call, its grace period: the
/// holder is the one thread of its place, so of its index); bytes 4..8 count, with atomic adds,
/// the threads of the index whose slot is in `INFLIGHT`.
#[map]
pub(crate) static INSIDE: Array<u64> = Array::with_max_entries(INSIDE_SLOTS, 0);

/// What a thread is inside: its flag's byte in its `INSIDE` word.
#[derive(Clone, Copy)]
#[repr(usize)]
pub(crate) enum Inside {
    Call = 0,
    GracePeriod = 1,
}

/// Marks thread `tid`, whose slot is `slot`, as inside (`on`) or out of `what`, for the
/// breakdown's probes (nothing without them): its flag when it holds its place (a plain store:
/// an atomic add at the enter and another at the exit cost about 7 ns a call here), else one
/// more or one fewer in its index's count.
#[inline(always)]
pub(crate) fn mark_inside(slot: &Inflight, tid: u32, what: Inside, on: bool) {
    if !breakdown() {
        return;
    }
    if slot.tid != 0 {
        // At its place (an INFLIGHT slot's tid is 0).
        if let Some(word) = INSIDE.get_ptr_mut(tid % INSIDE_SLOTS) {
            let flag = unsafe { word.cast::<u8>().add(what as usize) };
            unsafe { core::ptr::write_volatile(flag, u8::from(on)) };
        }
    } else if let Some(count) = inside_count(tid) {
        add32(count, if on { 1 } else { u32::MAX });
    }
}

/// The count half (bytes 4..8) of `tid`'s `INSIDE` word: the threads of its index whose slot is
/// in `INFLIGHT`.
#[inline(always)]
pub(crate) fn inside_count(tid: u32) -> Option<*mut u32> {
    let word = INSIDE.get_ptr_mut(tid % INSIDE_SLOTS)?;
    Some(unsafe { word.cast::<u32>().add(1) })
}

/// The stats rows' keys, each to its row's index in `ROWS`. Sized by userspace, as `ROWS` and
/// `FREE_ROWS` are, to the same count.
#[map]
pub(crate) static STATS: HashMap<StatsKey, u32> = HashMap::with_max_entries(MAX_STATS, 0);

// One shared, preallocated row per key, updated with atomics, at an index a thread's slot
// caches: its next call of the same key finds the row with an inlined array load and the key's
// compare, not a hash lookup of `STATS` (about 40 ns a call on this machine). Not per-CPU: a row
// is 8.8 KiB, so per-CPU rows cost rows x CPUs x 8.8 KiB. Rows are only contended when one
// process calls from several CPUs at once, and the expedited cmds serialize on a kernel mutex
// anyway.
#[map]
pub(crate) static ROWS: Array<Stats> = Array::with_max_entries(MAX_STATS, 0);

/// The indices of `ROWS` not in use: userspace puts them all in at load; a new row takes one,
/// and whichever side removes a row's `STATS` entry (the kernel at its process's exit, or
/// userspace's retire pass) gives its index back.
#[map]
pub(crate) static FREE_ROWS: Queue<u32> = Queue::with_max_entries(MAX_STATS, 0);

/// Template for new stats rows: the BPF stack (512 bytes) cannot hold one.
#[map]
pub(crate) static SCRATCH: PerCpuArray<Stats> = PerCpuArray::with_max_entries(1, 0);

/// The slot of `tid` if it is inside membarrier now. The array check keeps the common case
/// (a task that is not) to one inlined load.
#[inline(always)]
pub(crate) fn inside(tid: u32) -> Option<&'static mut Inflight> {
    marked(tid).filter(|slot| slot.start_ns != 0)
}

/// The slot of `tid` if a thread with its index in INSIDE is inside membarrier or a userspace
/// grace period (the caller checks that it is this one).
#[inline(always)]
pub(crate) fn marked(tid: u32) -> Option<&'static mut Inflight> {
    let word = INSIDE.get_ptr(tid % INSIDE_SLOTS)?;
    if unsafe { *word } == 0 {
        return None;
    }
    Some(unsafe { &mut *slot(tid)? })
}

#[inline(always)]
pub(crate) fn on_enter(cmd: u32, flags: u32) {
    if !armed() {
        return;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let tid = pid_tgid as u32;
    let Some(slot) = slot_of(tgid, tid) else {
        return;
    };
    if unsafe { (*slot).start_ns } != 0 {
        // Still open: the exit of this thread's last call was skipped (it stays counted as
        // inside membarrier, so it is not counted in again).
        bump(counter::EXIT_SKIPPED);
    } else {
        mark_inside(unsafe { &*slot }, tid, Inside::Call, true);
    }
    // The call's fields afresh; the thread's (identity, counters, grace period) stay. Volatile
    // stores: LLVM merges plain ones into a memset, which BPF runs as a call to a byte loop
    // (40 bytes, 40 turns), the enter's largest cost after the clock.
    let s = unsafe { &mut *slot };
    s.cmd = cmd;
    s.flags = flags;
    s.ipis = 0;
    for field in [
        &raw mut s.off_since_ns,
        &raw mut s.blocked_ns,
        &raw mut s.lock_since_ns,
        &raw mut s.mutex_wait_ns,
        &raw mut s.gp_since_ns,
    ] {
        unsafe { core::ptr::write_volatile(field, 0) };
    }
    // Timestamp last, so the tracer's own work here is not counted as the call's.
    s.start_ns = now();
}

/// The in-flight slot of thread `tid` of traced process `tgid`, made on first use.
#[inline(always)]
pub(crate) fn slot_of(tgid: u32, tid: u32) -> Option<*mut Inflight> {
    // A thread keeps its slot between calls (sched_process_exit frees it), so the common case
    // is one array load and plain stores, not an insert and delete per call. Slots are only
    // made for traced processes and carry the process's serial: a slot of this tgid needs no
    // process lookup (another tgid means a stale slot of a reused tid).
    match slot(tid) {
        Some(slot) if unsafe { (*slot).tgid } == tgid => Some(slot),
        stale => {
            let (serial, traced) = process(tgid);
            if !traced {
                return None;
            }
            let made = match stale {
                Some(old) => {
                    // A slot of another process: the tid's last thread left without passing
                    // sched_process_exit (a non-leader thread that exec'd). Its calls are
                    // kept, and the slot is this thread's, from zero (a zeroed template: a
                    // slot is too large for the stack).
                    send_thread(tid, unsafe { &mut *old });
                    hold_thread(tid);
                    unsafe { clear(old, ZERO_SLOT.get_ptr(0)?) };
                    Some(old)
                }
                None => new_slot(tid),
            };
            let Some(slot) = made else {
                bump(counter::DROPPED_INFLIGHT);
                return None;
            };
            unsafe {
                (*slot).tgid = tgid;
                (*slot).serial = serial;
                (*slot).born_ns = now();
                (*slot).thread.comm = bpf_get_current_comm().unwrap_or_default();
                (*slot).process = process_comm();
            }
            Some(slot)
        }
    }
}

/// `end_ns` is taken first thing by the caller, so the tracer's work is not counted.
///
/// Long: the per-call path, kept in one inlined function so the verifier and the JIT see
/// one branch-light body; each field's update is a line.
#[inline(always)]
pub(crate) fn on_exit(end_ns: u64, ret: i64) {
    if !armed() {
        return;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let tid = pid_tgid as u32;
    let call = match slot(tid) {
        // start_ns 0: the slot is idle, this exit's enter was not seen.
        Some(slot) if unsafe { (*slot).start_ns } != 0 => unsafe { &mut *slot },
        _ => {
            if process(tgid).1 {
                bump(counter::EXIT_WITHOUT_SLOT);
            }
            return;
        }
    };
    let ns = end_ns.wrapping_sub(call.start_ns);
    call.start_ns = 0;
    mark_inside(call, tid, Inside::Call, false);
    if call.writer.start_ns != 0 {
        // Inside a userspace grace period: its membarrier share.
        call.writer.calls += 1;
        call.writer.membarrier_ns += ns;
    }
    let key = StatsKey {
        tgid,
        serial: call.serial,
        cmd: call.cmd,
        flags: call.flags,
        errno: if ret < 0 {
            ret.wrapping_neg() as u32
        } else {
            0
        },
    };
    // A stats row is the process's: named after it, as the slot has it (read there: the reads
    // here, before the `--stacks` walk, were too much for 6.1's verifier).
    let made = || count_row(tgid, key.serial, row_kind(key.cmd, key.flags, key.errno));
    let Some(row) = stats_row(call, &key, made) else {
        bump(counter::DROPPED_STATS);
        return;
    };
    let row = unsafe { &mut *row };
    row.count_one(ns);
    // The slot is the thread's own: a plain add.
    let i = row.thread_cmd as usize;
    call.thread.calls[i.min(THREAD_CMDS - 1)] += 1;
    // The breakdown: zero for most calls, so only non-zero parts are added (userspace derives
    // the zero buckets from the count).
    if call.blocked_ns != 0 {
        add(&mut row.blocked_sum_ns, call.blocked_ns);
        update(&mut row.blocked_max_ns, call.blocked_ns, |new, cur| {
            new > cur
        });
        add(&mut row.blocked_hist[bucket(call.blocked_ns)], 1);
    }
    if call.ipis != 0 {
        add(&mut row.ipis, call.ipis as u64);
        let i = (call.ipis as usize).min(IPI_HIST - 1);
        let i = unsafe { core::ptr::read_volatile(&i) } & (IPI_HIST - 1);
        add(&mut row.ipi_hist[i], 1);
    }
    if call.mutex_wait_ns != 0 {
        add(&mut row.mutex_wait_sum_ns, call.mutex_wait_ns);
        update(
            &mut row.mutex_wait_max_ns,
            call.mutex_wait_ns,
            |new, cur| new > cur,
        );
    }
    if stacks() {
        // Inside a probed grace-period function, its return address on the stack is the
        // uretprobe's trampoline: the unwinding takes the caller recorded at entry instead
        // (`ra_at` is 0 outside one). Read from the slot, not chosen by a branch: the
        // verifier would check the walk once per choice. Last: the slot (in the array or the
        // hash, two kinds of pointer to the verifier) is not used after, so the walk is
        // checked once.
        let ra = unsafe {
            (
                core::ptr::read_volatile(&call.writer.ra_at),
                core::ptr::read_volatile(&call.writer.caller),
            )
        };
        take_stack(row, &key, end_ns, ns, ra);
    }
}

/// The call's stats row, of `key`: at the index its thread's slot holds while the row there is
/// still this key's (the thread's last call had the same cmd, flags and outcome), else found
/// or made by [`row_index`], and its index kept in the slot.
#[inline(always)]
pub(crate) fn stats_row(
    call: &mut Inflight,
    key: &StatsKey,
    made: impl FnOnce(),
) -> Option<*mut Stats> {
    if let Some(row) = ROWS.get_ptr_mut(call.row)
        && unsafe { (*row).key } == *key
    {
        return Some(row);
    }
    let i = row_index(key, || call.process, made)?;
    call.row = i;
    ROWS.get_ptr_mut(i)
}

/// The index of `key`'s row in `ROWS`, the row made on first use (named `comm()`, and
/// `made()` run by the one call that made it). None when every row is in use.
#[inline(always)]
pub(crate) fn row_index(
    key: &StatsKey,
    comm: impl FnOnce() -> [u8; COMM_LEN],
    made: impl FnOnce(),
) -> Option<u32> {
    if let Some(i) = row_of_key(key) {
        return Some(i);
    }
    // Slow path, once per row: a free index, filled from the per-CPU template (the row is too
    // large for the stack; the template is never counted into, so its histograms stay zero),
    // then its key in STATS. NOEXIST: another CPU may have made the row meanwhile; then the
    // index goes back and theirs is used.
    let i = FREE_ROWS.pop().ok()??;
    if let Some(t) = SCRATCH.get_ptr_mut(0) {
        let t = unsafe { &mut *t };
        t.start(comm());
        t.key = *key;
        t.thread_cmd = thread_cmd(key.cmd, key.flags) as u32;
        if ROWS.set(i, &*t, 0).is_ok() && STATS.insert(key, &i, BPF_NOEXIST as u64).is_ok() {
            made();
            return Some(i);
        }
    }
    free_row(i);
    row_of_key(key)
}

/// The index `STATS` gives `key`'s row.
#[inline(always)]
pub(crate) fn row_of_key(key: &StatsKey) -> Option<u32> {
    STATS.get_ptr(key).map(|i| unsafe { *i })
}

/// Gives row `i` back, its `STATS` entry removed by the caller: its key no longer any
/// thread's (a cached index finds tgid 0), its index free. An index the queue refuses (its lock
/// not taken) is counted: one row fewer until the tracer restarts.
#[inline(always)]
pub(crate) fn free_row(i: u32) {
    if let Some(row) = ROWS.get_ptr_mut(i) {
        unsafe { core::ptr::write_volatile(&raw mut (*row).key.tgid, 0) };
    }
    if FREE_ROWS.push(i, 0).is_err() {
        bump(counter::ROWS_NOT_FREED);
    }
}

/// Counts a new row of process (tgid, serial) in its `Proc::rows`, so its last exit can move
/// it out: its kind's bit, or one more row it cannot move.
#[inline(always)]
pub(crate) fn count_row(tgid: u32, serial: u32, kind: Option<u32>) {
    if serial == 0 {
        return; // not tracked from its creation: its rows are for userspace's retire pass
    }
    if let Some(p) = PROCS.get_ptr_mut(&tgid)
        && unsafe { (*p).serial } == serial
    {
        add(
            unsafe { &mut (*p).rows },
            kind.map_or(OTHER_ROW, |k| 1 << k),
        );
    }
}
