//! Off-CPU time inside a call, and who woke the caller (`sched_switch`, `sched_waking`).

use aya_ebpf::{
    helpers::bpf_get_current_comm,
    macros::{btf_tracepoint, map, tracepoint},
    maps::HashMap,
    programs::{BtfTracePointContext, TracePointContext},
};
use membarrier_trace_common::{MAX_WAKERS, WakerKey, field};

use crate::{
    call::{inside, marked},
    util::{count, current_tid, now, record, task_pid},
};

/// Wakeups of callers inside membarrier, per (process, cmd, flags, waker comm).
#[map]
pub(crate) static WAKERS: HashMap<WakerKey, u64> = HashMap::with_max_entries(MAX_WAKERS, 0);

/// Off-CPU time inside the call (or inside a userspace grace period, outside its membarrier
/// calls): the thread switching out starts the clock, switching back in stops it. Runs on
/// every context switch: two array loads for tasks outside both.
#[tracepoint]
pub fn sched_switch(ctx: TracePointContext) -> u32 {
    off_cpu(record::<u32>(&ctx, field::SCHED_SWITCH_NEXT_PID), true);
    0
}

/// [`sched_switch`] for userspace grace periods only, where fentry on synchronize_rcu measures
/// the membarrier calls' grace period.
#[tracepoint]
pub fn sched_switch_writers(ctx: TracePointContext) -> u32 {
    off_cpu(record::<u32>(&ctx, field::SCHED_SWITCH_NEXT_PID), false);
    0
}

// The BTF-typed raw tracepoints (tp_btf) are tried first: cheaper per event than a classic
// tracepoint (no record is built), and detached without waiting under the kernel's
// event_mutex for a grace period (a classic one costs about 40 ms at stop, one after another).

/// [`sched_switch`] as a BTF-typed raw tracepoint: (preempt, prev, next[, prev_state]).
#[btf_tracepoint(function = "sched_switch")]
pub fn sched_switch_btf(ctx: BtfTracePointContext) -> i32 {
    off_cpu(task_pid(ctx.arg(2)), true);
    0
}

/// [`sched_switch_writers`] as a BTF-typed raw tracepoint.
#[btf_tracepoint(function = "sched_switch")]
pub fn sched_switch_writers_btf(ctx: BtfTracePointContext) -> i32 {
    off_cpu(task_pid(ctx.arg(2)), false);
    0
}

/// `next` is the thread switched in.
#[inline(always)]
pub(crate) fn off_cpu(next: u32, calls: bool) {
    // The tracepoint runs in the task being switched out.
    if let Some(prev) = marked(current_tid()) {
        let open = if calls {
            prev.start_ns | prev.writer.start_ns
        } else if prev.start_ns == 0 {
            prev.writer.start_ns
        } else {
            0
        };
        if open != 0 {
            prev.off_since_ns = now();
        }
    }
    if let Some(next) = marked(next)
        && next.off_since_ns != 0
    {
        let off = now().wrapping_sub(next.off_since_ns);
        if next.start_ns != 0 {
            next.blocked_ns += off;
        } else {
            next.writer.blocked_ns += off;
        }
        next.off_since_ns = 0;
    }
}

/// Who wakes a caller blocked inside membarrier (for GLOBAL, usually an RCU kthread).
/// sched_waking runs in the waker's context (sched_wakeup may run on the target CPU).
#[tracepoint]
pub fn sched_waking(ctx: TracePointContext) -> u32 {
    waking(record::<u32>(&ctx, field::SCHED_WAKING_PID));
    0
}

/// [`sched_waking`] as a BTF-typed raw tracepoint: (task woken).
#[btf_tracepoint(function = "sched_waking")]
pub fn sched_waking_btf(ctx: BtfTracePointContext) -> i32 {
    waking(task_pid(ctx.arg(0)));
    0
}

#[inline(always)]
fn waking(wakee: u32) {
    let Some(wakee) = inside(wakee) else {
        return;
    };
    let key = WakerKey {
        tgid: wakee.tgid,
        serial: wakee.serial,
        cmd: wakee.cmd,
        flags: wakee.flags,
        comm: bpf_get_current_comm().unwrap_or_default(),
    };
    count(&WAKERS, &key, 1);
}
