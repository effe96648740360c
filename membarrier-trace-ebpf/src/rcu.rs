//! Userspace RCU writers: uprobes on liburcu's grace-period functions, per caller.

use aya_ebpf::{
    EbpfContext as _,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_probe_read_user,
        generated::bpf_get_attach_cookie,
    },
    macros::{map, uprobe, uretprobe},
    maps::{HashMap, PerCpuArray, RingBuf},
    programs::{ProbeContext, RetProbeContext},
};
use membarrier_trace_common::{
    CALLER_RING_BYTES, CallerSeen, MAX_WRITERS, Writer, WriterKey, WriterStats, counter,
};

use crate::{
    call::{Inside, count_row, mark_inside, slot_of},
    config::armed,
    process::process,
    thread::slot,
    util::{Row as _, add, bump, now, row_of},
};

/// Userspace RCU grace periods, per (process, thread, function, caller).
#[map]
pub(crate) static WRITERS: HashMap<WriterKey, WriterStats> =
    HashMap::with_max_entries(MAX_WRITERS, 0);

/// Callers to name now (see `CallerSeen`).
#[map]
pub(crate) static CALLERS: RingBuf = RingBuf::with_byte_size(CALLER_RING_BYTES, 0);

/// A zeroed row to insert into WRITERS (too large for the stack).
#[map]
pub(crate) static WRITER_SCRATCH: PerCpuArray<WriterStats> = PerCpuArray::with_max_entries(1, 0);

/// Entry of a userspace grace-period function (liburcu's `synchronize_rcu`, or one named with
/// `--rcu-func`): opens the thread's grace period. The cookie says which function.
#[uprobe]
pub fn rcu_gp_enter(ctx: ProbeContext) -> u32 {
    if !armed() {
        return 0;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(slot) = slot_of((pid_tgid >> 32) as u32, pid_tgid as u32) else {
        return 0;
    };
    let w = unsafe { &mut (*slot).writer };
    if w.depth != 0 {
        w.depth += 1;
        return 0;
    }
    // At entry the return address is on top of the stack: the caller, no frame pointers needed.
    let sp = unsafe { (*ctx.regs).rsp };
    let caller = unsafe { bpf_probe_read_user(sp as *const u64) }.unwrap_or(0);
    let func = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) } as u32;
    *w = Writer {
        caller,
        ra_at: sp,
        func,
        depth: 1,
        ..Default::default()
    };
    // No row yet: this thread's first grace period from this caller. Userspace reads the
    // process's mappings while this one runs (the process may exit before its next look).
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    let serial = unsafe { (*slot).serial };
    let key = WriterKey {
        tgid,
        serial,
        tid,
        func,
        caller,
    };
    if unsafe { WRITERS.get(&key) }.is_none() {
        let seen = CallerSeen {
            tgid,
            serial,
            caller,
        };
        if CALLERS.output::<CallerSeen>(&seen, 0).is_err() {
            bump(counter::CALLERS_UNSENT);
        }
    }
    mark_inside(unsafe { &*slot }, tid, Inside::GracePeriod, true);
    w.start_ns = now();
    0
}

/// Return of a grace-period function: folds the grace period into its WRITERS row.
#[uretprobe]
pub fn rcu_gp_exit(_ctx: RetProbeContext) -> u32 {
    let end_ns = now();
    if !armed() {
        return 0;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    let slot = match slot(tid) {
        Some(slot) if unsafe { (*slot).tgid == tgid && (*slot).writer.depth != 0 } => unsafe {
            &mut *slot
        },
        _ => {
            if process(tgid).1 {
                bump(counter::MISSED_WRITERS);
            }
            return 0;
        }
    };
    slot.writer.depth -= 1;
    if slot.writer.depth != 0 {
        return 0;
    }
    let w = slot.writer;
    slot.writer.start_ns = 0;
    // The return address is back on the stack.
    slot.writer.ra_at = 0;
    mark_inside(slot, tid, Inside::GracePeriod, false);
    let key = WriterKey {
        tgid,
        serial: slot.serial,
        tid,
        func: w.func,
        caller: w.caller,
    };
    // A grace-period row is one thread's, named after the thread. It stays for userspace, and
    // so its process's stats rows with it (counted as a row the exit cannot move).
    let made = || count_row(tgid, key.serial, None);
    let comm = || bpf_get_current_comm().unwrap_or_default();
    let Some(row) = row_of(&WRITERS, &WRITER_SCRATCH, &key, comm, made) else {
        bump(counter::DROPPED_WRITERS);
        return 0;
    };
    let row = unsafe { &mut *row };
    row.count_one(end_ns.wrapping_sub(w.start_ns));
    add(&mut row.membarrier_calls, w.calls);
    add(&mut row.membarrier_ns, w.membarrier_ns);
    add(&mut row.blocked_ns, w.blocked_ns);
    0
}
