//! A task's exit: its slot is freed, and the last task of a process takes the process's rows
//! out of the kernel (sent on `EXITED`, or summed by name when it is full).

#[cfg(no_cmpxchg)]
use aya_ebpf::{bindings::BPF_NOEXIST, maps::LruHashMap};
use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_probe_read_kernel_buf},
    macros::{btf_tracepoint, map, tracepoint},
    maps::{HashMap, PerCpuArray},
    programs::{BtfTracePointContext, TracePointContext},
};
use membarrier_trace_common::{
    COMM_LEN, HIST_BUCKETS, MAX_SUMMED, MOVED_BUCKETS, MOVED_HEADER, MOVED_ROWS, MovedProc,
    MovedRow, Proc, ROW_KINDS, StatsKey, SummedKey, SummedRow, THREAD_CMDS, counter, exited_kind,
    kind_key, log2, proc_id,
};

#[cfg(not(no_cmpxchg))]
use crate::util::fetch_add;
use crate::{
    call::{Inside, ROWS, STATS, free_row, mark_inside, row_of_key},
    config::stacks,
    process::{EXIT_NAMES, PROCS, process_of},
    thread::{EXITED, free_slot, hold_thread, send_thread, slot, thread_calls},
    util::{add, bucket, bump, row_from, update},
};

/// Before Linux 5.12: the processes whose last task was claimed (see `last_task`). Only the
/// claims of processes exiting at once matter; older ones may go.
#[cfg(no_cmpxchg)]
#[map]
pub(crate) static LAST_TASK: LruHashMap<u64, u8> = LruHashMap::with_max_entries(4096, 0);

/// Where an exiting process's rows are gathered: larger than the BPF stack. Per CPU is safe:
/// only the exit programs use it, which run from the `sched_process_exit` tracepoint with
/// preemption off (tracepoint probes are called so, PREEMPT_RT included), in task context.
#[map]
pub(crate) static MOVED_SCRATCH: PerCpuArray<MovedProc> = PerCpuArray::with_max_entries(1, 0);

/// Exited processes' rows summed under their name when `EXITED` was full (see `sum_by_name`).
#[map]
pub(crate) static SUMMED: HashMap<SummedKey, SummedRow> = HashMap::with_max_entries(MAX_SUMMED, 0);

/// A new `SUMMED` row: zero, min at its maximum (set at each use; nothing else writes it).
#[map]
pub(crate) static SUMMED_SCRATCH: PerCpuArray<SummedRow> = PerCpuArray::with_max_entries(1, 0);

/// A task exits (in its own context): its in-flight slot is freed, and the last task of a
/// process created while tracing removes the process (its pid cannot be reused before this:
/// the process is a zombie until reaped).
#[tracepoint]
pub fn sched_process_exit(_ctx: TracePointContext) -> u32 {
    on_task_exit();
    0
}

/// [`sched_process_exit`] as a BTF-typed raw tracepoint, where the kernel has one: not skipped
/// while a map syscall holds `bpf_prog_active`, so no exit is missed (a process whose exit is
/// missed would look alive, and its rows would never be freed).
#[btf_tracepoint(function = "sched_process_exit")]
pub fn sched_process_exit_btf(_ctx: BtfTracePointContext) -> i32 {
    on_task_exit();
    0
}

#[inline(always)]
pub(crate) fn on_task_exit() {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let tid = pid_tgid as u32;
    // A slot still open at exit: the exit of the thread's last call was skipped (a thread
    // cannot exit inside a syscall), or the thread died inside a userspace grace period. Each
    // open one was marked in INSIDE.
    if let Some(slot) = slot(tid) {
        let slot = unsafe { &mut *slot };
        let (call, gp) = (slot.start_ns != 0, slot.writer.depth != 0);
        if call {
            bump(counter::EXIT_SKIPPED);
        }
        if gp {
            bump(counter::MISSED_WRITERS);
        }
        if call {
            mark_inside(slot, tid, Inside::Call, false);
        }
        if gp {
            mark_inside(slot, tid, Inside::GracePeriod, false);
        }
        // The thread's calls go out, named as it exits, before the slot is freed.
        slot.thread.comm = bpf_get_current_comm().unwrap_or_default();
        send_thread(tid, slot);
    }
    // One lookup serves the name and the task count.
    let p = PROCS.get_ptr_mut(&tgid);
    let (serial, traced) = process_of(p.map(|p| p.cast_const()));
    // The last task of a process made while tracing, counted once.
    let last = match p {
        Some(p) if serial != 0 => last_task(p, tgid),
        _ => false,
    };
    let rows = p.map_or(0, |p| unsafe { (*p).rows });
    // The main thread's name as it exits, for whichever side takes the rows: not for a process
    // that ends here with none (most of a box's processes, system-wide). Unread names filled
    // the LRU, and an insert into a full one can evict a name not yet read (the soak once
    // named a process renamed before its exit by its old name).
    if tid == tgid
        && traced
        && !(last && rows == 0)
        && let Ok(comm) = bpf_get_current_comm()
    {
        let _ = EXIT_NAMES.insert(&proc_id(tgid, serial), &comm, 0);
    }
    if last {
        // Its rows go before its entry: while the entry is there userspace holds the process
        // alive and touches none of its rows, so each row is taken by one side only.
        move_rows(tgid, serial, rows, tid);
        hold_thread(tid);
        free_slot(tid);
        let _ = PROCS.remove(&tgid);
    } else {
        hold_thread(tid);
        free_slot(tid);
    }
}

/// Counts a task of process `p` out; true for its last one, once.
#[cfg(not(no_cmpxchg))]
#[inline(always)]
pub(crate) fn last_task(p: *mut Proc, _tgid: u32) -> bool {
    fetch_add(unsafe { &raw mut (*p).tasks }, u64::MAX) == Some(1)
}

/// Before Linux 5.12 (no fetch-and-add): two tasks counting out at once may both see none
/// left; the one whose claim in `LAST_TASK` goes in first is the last.
#[cfg(no_cmpxchg)]
#[inline(always)]
pub(crate) fn last_task(p: *mut Proc, tgid: u32) -> bool {
    let tasks = unsafe { &raw mut (*p).tasks };
    add(unsafe { &mut *tasks }, u64::MAX);
    if unsafe { core::ptr::read_volatile(tasks) } != 0 {
        return false;
    }
    let id = proc_id(tgid, unsafe { (*p).serial });
    LAST_TASK.insert(&id, &0, BPF_NOEXIST as u64).is_ok()
}

/// The last task of process (tgid, serial) is exiting: sends its stats rows to userspace on
/// `EXITED` and frees them, so a burst of short-lived processes never fills `STATS` waiting
/// for the retire pass (about 17 us a row there, starved of CPU by the burst itself). All or
/// nothing: a process with a row it cannot move (an uncommon cmd or errno, off-CPU time or
/// IPIs, a histogram wider than the window, more than `MOVED_ROWS` rows, a grace-period row,
/// `--stacks`) or a full ring stays whole for userspace, as before. Runs once per process.
///
/// If its last thread's calls found the ring full (they are still in its slot, `tid`'s), the
/// rows are not offered to the ring: sent after the thread's calls went to THREADS, they could
/// reach userspace first. A one-row process whose last thread made all its calls is then summed
/// by name, thread and all.
#[inline(always)]
pub(crate) fn move_rows(tgid: u32, serial: u32, rows: u64, tid: u32) {
    if rows == 0 {
        if tid != tgid {
            // Its main thread's name, left when it exited before this last task: unread.
            let _ = EXIT_NAMES.remove(&proc_id(tgid, serial));
        }
        return;
    }
    if stacks() {
        return;
    }
    if rows & !ROW_KINDS != 0 || !moved(tgid, serial, rows, tid) {
        bump(counter::EXITED_KEPT);
    }
}

/// [`move_rows`] for a process whose rows are all of a kind it can find: false when one of them
/// cannot go (the process stays whole); true when sent or summed, or the ring was full
/// (counted).
///
/// Long: straight-line for the verifier (a loop over the rows made 6.1 refuse the program);
/// each step is commented.
#[inline(always)]
pub(crate) fn moved(tgid: u32, serial: u32, rows: u64, tid: u32) -> bool {
    let Some(out) = MOVED_SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    let out = unsafe { &mut *out };
    // The count of rows lives in the scratch, not a register: a value the verifier does not
    // know, so each pass of the loop is walked once, not once per count so far (with a
    // register, the exit program took 532,046 instructions to verify on 6.18, and 6.1 refused
    // it past a million when one more value crossed this loop).
    let rows_so_far = &raw mut out.rows;
    unsafe { core::ptr::write_volatile(rows_so_far, 0) };
    // A pass per row, its kind the lowest bit left: `rows`, read from the process's entry, is a
    // value the verifier does not know, so it walks MOVED_ROWS passes, not one per kind (36:
    // 57,000 of the 109,000 instructions this program took to verify on 6.18, where verifying
    // it was a third of the tracer's start).
    let mut left = rows;
    for _ in 0..MOVED_ROWS {
        if left == 0 {
            break;
        }
        let n = unsafe { core::ptr::read_volatile(rows_so_far) } as usize;
        let bit = log2(left & left.wrapping_neg());
        left &= left - 1;
        let (cmd, flags, errno) = kind_key(bit);
        let key = StatsKey {
            tgid,
            serial,
            cmd,
            flags,
            errno,
        };
        let Some(row) = row_of_key(&key).and_then(|i| ROWS.get_ptr(i)) else {
            return false;
        };
        let row = unsafe { &*row };
        let (lo, hi) = (bucket(row.min_ns), bucket(row.max_ns));
        if row.blocked_sum_ns != 0 || row.ipis != 0 || hi < lo || hi - lo >= MOVED_BUCKETS {
            return false;
        }
        let first = lo.min(HIST_BUCKETS - MOVED_BUCKETS);
        let first = unsafe { core::ptr::read_volatile(&first) } & (HIST_BUCKETS - 1);
        let m: &mut MovedRow = &mut out.row[n & (MOVED_ROWS - 1)];
        m.cmd = cmd;
        m.flags = flags;
        m.errno = errno;
        m.first_bucket = first as u32;
        m.count = row.count;
        m.sum_ns = row.sum_ns;
        m.min_ns = row.min_ns;
        m.max_ns = row.max_ns;
        m.mutex_wait_sum_ns = row.mutex_wait_sum_ns;
        m.mutex_wait_max_ns = row.mutex_wait_max_ns;
        // Straight into the scratch: the window is half the BPF stack.
        let from = unsafe { row.hist.as_ptr().add(first) }.cast::<u8>();
        let to = unsafe {
            core::slice::from_raw_parts_mut(
                m.hist.as_mut_ptr().cast::<u8>(),
                size_of::<[u64; MOVED_BUCKETS]>(),
            )
        };
        if unsafe { bpf_probe_read_kernel_buf(from, to) }.is_err() {
            return false;
        }
        if n == 0 {
            out.comm = row.comm;
        }
        unsafe { core::ptr::write_volatile(rows_so_far, n as u32 + 1) };
    }
    if left != 0 {
        return false; // more than MOVED_ROWS rows
    }
    let n = unsafe { core::ptr::read_volatile(rows_so_far) } as usize;
    out.kind = exited_kind::PROC;
    out.tgid = tgid;
    out.serial = serial;
    // Its name as its main thread exited, where that was seen; else its row's (the leader's
    // when the row was made).
    let named = EXIT_NAMES.get_ptr(&proc_id(tgid, serial));
    out.named_at_exit = u32::from(named.is_some());
    if let Some(c) = named {
        out.comm = unsafe { *c };
    }
    let len = MOVED_HEADER + (n & (MOVED_ROWS - 1 | MOVED_ROWS)) * size_of::<MovedRow>();
    if n == 0 || len > size_of::<MovedProc>() {
        return false;
    }
    let bytes = unsafe { core::slice::from_raw_parts((out as *const MovedProc).cast::<u8>(), len) };
    // Only now: a value known in some paths only would have the verifier walk the loop
    // above once per path.
    let held = slot(tid).map_or(0, |t| thread_calls(unsafe { &*t }));
    if held != 0 || EXITED.output::<[u8]>(bytes, 0).is_err() {
        // The ring is full (its drain thread starved of CPU): the rows are summed under the
        // process's name, else stay whole for the retire pass. Left in `STATS`, a burst filled
        // it while the retire pass was starved too, and lost calls (CI, at 56,000 a second).
        // Only with the last thread held and all the calls its own: another thread's row is
        // out already, under the process, which would then never be retired.
        bump(counter::EXITED_RING_FULL);
        if n != 1 || held != out.row[0].count || !sum_by_name(out.comm, &out.row[0]) {
            return true;
        }
        bump(counter::EXITED_SUMMED);
        // Taken with its process: nothing left for THREADS.
        if let Some(t) = slot(tid) {
            unsafe { (*t).thread.calls = [0; THREAD_CMDS] };
        }
    }
    // Sent or summed: its name is read (kept only for rows left to the retire pass).
    if unsafe { core::ptr::read_volatile(&out.named_at_exit) } != 0 {
        let _ = EXIT_NAMES.remove(&proc_id(tgid, serial));
    }
    // The rows sent, from the scratch: a pass per row (at most MOVED_ROWS), not per kind (36),
    // each of which the verifier walks (36,000 instructions, as a loop over the kinds).
    for k in 0..MOVED_ROWS {
        if k >= n {
            break;
        }
        let m = &out.row[k];
        let key = StatsKey {
            tgid,
            serial,
            cmd: m.cmd,
            flags: m.flags,
            errno: m.errno,
        };
        // The side whose remove succeeds (this, or userspace's retire pass) frees the row.
        if let Some(i) = row_of_key(&key)
            && STATS.remove(&key).is_ok()
        {
            free_row(i);
        }
    }
    true
}

/// Adds the row `m` of an exiting one-row process named `comm` to its name's row in `SUMMED`;
/// false, with nothing added, when `SUMMED` is full. Straight-line code for the verifier
/// (6.1's gave up on a loop over rows here, past a million instructions): a burst's processes
/// have one row each; one with more stays whole for the retire pass.
#[inline(always)]
pub(crate) fn sum_by_name(comm: [u8; COMM_LEN], m: &MovedRow) -> bool {
    let key = SummedKey {
        comm,
        cmd: m.cmd,
        flags: m.flags,
        errno: m.errno,
    };
    let new = || {
        let t = SUMMED_SCRATCH.get_ptr_mut(0)?;
        unsafe { (*t).min_ns = u64::MAX };
        Some(t)
    };
    let Some(s) = row_from(&SUMMED, &key, new, || {}) else {
        return false;
    };
    let s = unsafe { &mut *s };
    let first = m.first_bucket as usize;
    for b in 0..MOVED_BUCKETS {
        // Adding 0 costs less than a branch the verifier follows both ways.
        add(&mut s.hist[(first + b) & (HIST_BUCKETS - 1)], m.hist[b]);
    }
    add(&mut s.procs, 1);
    add(&mut s.sum_ns, m.sum_ns);
    add(&mut s.mutex_wait_sum_ns, m.mutex_wait_sum_ns);
    update(&mut s.min_ns, m.min_ns, |v, c| v < c);
    update(&mut s.max_ns, m.max_ns, |v, c| v > c);
    update(&mut s.mutex_wait_max_ns, m.mutex_wait_max_ns, |v, c| v > c);
    add(&mut s.count, m.count);
    true
}
