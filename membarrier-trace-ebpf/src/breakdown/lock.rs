//! Mutex wait inside a call (`lock:contention_begin/end`, Linux 5.19): the time a caller waits
//! for a mutex (the expedited cmds' `membarrier_ipi_mutex`, spinning on its owner or asleep),
//! an rwsem, or any lock on PREEMPT_RT. A spinlock's contention is left out: it comes as often
//! from an interrupt that happens to land in the call (the scheduler tick on a runqueue lock)
//! or from the tracer's own map locks as from the call.

use aya_ebpf::{
    macros::{btf_tracepoint, tracepoint},
    programs::{BtfTracePointContext, TracePointContext},
};
use membarrier_trace_common::{Inflight, field};

use crate::{
    call::inside,
    config::FIELDS,
    util::{current_tid, now},
};

/// `contention_begin`'s flags (include/trace/events/lock.h): a spinlock or rwlock has
/// `LCB_F_SPIN` alone (or with READ/WRITE); a mutex has `LCB_F_MUTEX`, with `LCB_F_SPIN` while
/// it spins on a running owner (most of the expedited cmds' waits on two CPUs).
const LCB_F_SPIN: u32 = 1;
const LCB_F_MUTEX: u32 = 1 << 5;

#[tracepoint]
pub fn contention_begin(ctx: TracePointContext) -> u32 {
    if let Some(caller) = inside(current_tid()) {
        // Read with the helper: the compiler kept ctx + 16 in a register, which the verifier
        // refuses to dereference; this runs only for a thread inside a call. Unread, the wait
        // counts.
        let off = unsafe { core::ptr::read_volatile(&FIELDS[field::LOCK_CONTENTION_BEGIN_FLAGS]) };
        let flags = unsafe { ctx.read_at::<u32>(off as usize) }.unwrap_or(0);
        begin(caller, flags);
    }
    0
}

/// [`contention_begin`] as a BTF-typed raw tracepoint (see sched.rs): (lock, flags).
#[btf_tracepoint(function = "contention_begin")]
pub fn contention_begin_btf(ctx: BtfTracePointContext) -> i32 {
    if let Some(caller) = inside(current_tid()) {
        let flags: u64 = ctx.arg(1);
        begin(caller, flags as u32);
    }
    0
}

#[inline(always)]
fn begin(caller: &mut Inflight, flags: u32) {
    if flags & (LCB_F_SPIN | LCB_F_MUTEX) != LCB_F_SPIN {
        caller.lock_since_ns = now();
    }
}

#[tracepoint]
pub fn contention_end(_ctx: TracePointContext) -> u32 {
    end();
    0
}

/// [`contention_end`] as a BTF-typed raw tracepoint.
#[btf_tracepoint(function = "contention_end")]
pub fn contention_end_btf(_ctx: BtfTracePointContext) -> i32 {
    end();
    0
}

#[inline(always)]
fn end() {
    if let Some(caller) = inside(current_tid())
        && caller.lock_since_ns != 0
    {
        caller.mutex_wait_ns += now().wrapping_sub(caller.lock_since_ns);
        caller.lock_since_ns = 0;
    }
}
