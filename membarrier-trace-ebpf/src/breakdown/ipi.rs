//! IPIs a call sends and what they cost their targets: the csd tracepoints where the kernel
//! has them, else fentry on the cross-call functions and the membarrier IPI callbacks.

use aya_ebpf::{
    EbpfContext as _,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_smp_processor_id,
        bpf_probe_read_kernel,
    },
    macros::{fentry, fexit, map, raw_tracepoint, tracepoint},
    maps::{Array, HashMap, PerCpuArray},
    programs::{FEntryContext, FExitContext, RawTracePointContext, TracePointContext},
};
use membarrier_trace_common::{
    COMM_LEN, CallKey, CpuKey, Handled, HandlerKey, Inflight, MAX_CPU_ROWS, MAX_CSDS, MAX_WAKERS,
    VICTIMS_OTHER, counter, field,
};

use crate::{
    call::inside,
    config::IPI_FUNCS,
    util::{add, bump, count, current_tid, now, record, upsert},
};

/// IPIs sent per (process, cmd, flags, target CPU).
#[map]
pub(crate) static IPI_CPUS: HashMap<CpuKey, u64> = HashMap::with_max_entries(MAX_CPU_ROWS, 0);

/// Who queued a membarrier IPI callback, by csd address, until the target has run it.
#[map]
pub(crate) static CSD_OWNER: HashMap<u64, CallKey> = HashMap::with_max_entries(MAX_CSDS, 0);

/// Handler runs and time on target CPUs, per (process, cmd, flags) that caused them and the
/// process they interrupted.
#[map]
pub(crate) static HANDLED: HashMap<HandlerKey, Handled> = HashMap::with_max_entries(MAX_WAKERS, 0);

/// The membarrier callback running on this CPU: [start ns, csd].
#[map]
pub(crate) static HANDLER_START: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1, 0);

/// The caller of the membarrier IPI round in flight (kernels without csd tracepoints): the
/// fentry handler probes charge their time to it. tgid 0: an untraced caller.
#[map]
pub(crate) static ROUND_OWNER: Array<CallKey> = Array::with_max_entries(1, 0);

#[inline(always)]
pub(crate) fn ipi_sent(caller: &mut Inflight, cpu: u32) {
    caller.ipis += 1;
    let key = CpuKey {
        tgid: caller.tgid,
        serial: caller.serial,
        cmd: caller.cmd,
        flags: caller.flags,
        cpu,
    };
    count(&IPI_CPUS, &key, 1);
}

/// Whether `func` is one of membarrier's IPI callbacks (any, when they are unknown). Compared
/// element by element: an array `==` became a `bcmp` that the BPF build answered "equal" for
/// anything, so every IPI a caller sent counted (a reschedule, a wakeup's), not only
/// membarrier's.
#[inline(always)]
pub(crate) fn membarrier_func(func: u64) -> bool {
    let funcs = unsafe { core::ptr::read_volatile(&IPI_FUNCS) };
    (funcs[0] | funcs[1] | funcs[2] | funcs[3]) == 0
        || funcs[0] == func
        || funcs[1] == func
        || funcs[2] == func
        || funcs[3] == func
}

/// A caller inside membarrier queues its callback for another CPU: one target, normally one
/// IPI (none when that CPU has a callback pending already; its handler runs all the same).
/// Counted here, not at `ipi:ipi_send_*`, whose callback is the generic IPI handler since
/// 6.6, not membarrier's. Also remembers whose the csd is, for the handler time.
#[tracepoint]
pub fn csd_queue_cpu(ctx: TracePointContext) -> u32 {
    queued(
        record::<u32>(&ctx, field::CSD_QUEUE_CPU_CPU),
        record::<u64>(&ctx, field::CSD_QUEUE_CPU_FUNC),
        record::<u64>(&ctx, field::CSD_QUEUE_CPU_CSD),
    );
    0
}

#[tracepoint]
pub fn csd_function_entry(ctx: TracePointContext) -> u32 {
    handler_entry(
        record::<u64>(&ctx, field::CSD_FUNCTION_ENTRY_FUNC),
        record::<u64>(&ctx, field::CSD_FUNCTION_ENTRY_CSD),
    );
    0
}

#[tracepoint]
pub fn csd_function_exit(ctx: TracePointContext) -> u32 {
    handler_exit(record::<u64>(&ctx, field::CSD_FUNCTION_EXIT_CSD));
    0
}

// The same as raw tracepoints, tried first (see breakdown/sched.rs). Not BTF-typed: tp_btf
// refuses to read an argument that points to a function (`func`).

/// [`csd_queue_cpu`]: (cpu, callsite, func, csd).
#[raw_tracepoint(tracepoint = "csd_queue_cpu")]
pub fn csd_queue_cpu_raw(ctx: RawTracePointContext) -> i32 {
    let cpu: u64 = ctx.arg(0);
    queued(cpu as u32, ctx.arg(2), ctx.arg(3));
    0
}

/// [`csd_function_entry`]: (func, csd).
#[raw_tracepoint(tracepoint = "csd_function_entry")]
pub fn csd_function_entry_raw(ctx: RawTracePointContext) -> i32 {
    handler_entry(ctx.arg(0), ctx.arg(1));
    0
}

/// [`csd_function_exit`]: (func, csd).
#[raw_tracepoint(tracepoint = "csd_function_exit")]
pub fn csd_function_exit_raw(ctx: RawTracePointContext) -> i32 {
    handler_exit(ctx.arg(1));
    0
}

#[inline(always)]
fn queued(cpu: u32, func: u64, csd: u64) {
    let Some(caller) = inside(current_tid()) else {
        return;
    };
    if !membarrier_func(func) {
        return;
    }
    ipi_sent(caller, cpu);
    let owner = CallKey {
        tgid: caller.tgid,
        serial: caller.serial,
        cmd: caller.cmd,
        flags: caller.flags,
    };
    if CSD_OWNER.insert(&csd, &owner, 0).is_err() {
        bump(counter::DROPPED_DETAIL);
    }
}

#[inline(always)]
fn handler_entry(func: u64, csd: u64) {
    if !membarrier_func(func) || CSD_OWNER.get_ptr(&csd).is_none() {
        return;
    }
    if let Some(start) = HANDLER_START.get_ptr_mut(0) {
        unsafe { *start = [now(), csd] };
    }
}

#[inline(always)]
fn handler_exit(csd: u64) {
    let Some(start) = HANDLER_START.get_ptr_mut(0) else {
        return;
    };
    let [since, at] = unsafe { *start };
    if since == 0 || at != csd {
        return;
    }
    unsafe { *start = [0, 0] };
    let ns = now().wrapping_sub(since);
    if let Some(owner) = CSD_OWNER.get_ptr(&csd) {
        let owner = unsafe { *owner };
        // The csd is reused for other cross-CPU calls: it is ours only until it has run.
        let _ = CSD_OWNER.remove(&csd);
        handled(&owner, ns);
    }
}

/// Kernels without the ipi/csd tracepoints (before 6.6): the cross-call functions membarrier
/// calls, by fentry. The targets are the CPUs the callback is queued for, less the caller's own
/// (that one runs it locally, no IPI). The expedited cmds hold `membarrier_ipi_mutex` and wait
/// for their handlers, so one round is in flight at a time: its owner is kept for the handlers.
#[fentry(function = "smp_call_function_many")]
pub fn smp_call_function_many(ctx: FEntryContext) -> u32 {
    // (mask, func, info, wait)
    cross_call(&ctx, 1, CrossCall::Mask(0));
    0
}

/// The end of a mask's round: targets it counted are no longer awaited by
/// `smp_call_function_single` (see `MANY_COUNTED`).
#[fexit(function = "smp_call_function_many")]
pub fn smp_call_function_many_exit(_ctx: FExitContext) -> u32 {
    if let Some(c) = MANY_COUNTED.get_ptr_mut(0) {
        unsafe { *c = 0 };
    }
    0
}

#[fentry(function = "on_each_cpu_cond_mask")]
pub fn on_each_cpu_cond_mask(ctx: FEntryContext) -> u32 {
    // (cond_func, func, info, wait, mask): SYNC_CORE's on_each_cpu_mask()
    cross_call(&ctx, 1, CrossCall::Mask(4));
    0
}

#[fentry(function = "smp_call_function_single")]
pub fn smp_call_function_single(ctx: FEntryContext) -> u32 {
    // (cpu, func, info, wait): FLAG_CPU
    cross_call(&ctx, 1, CrossCall::Single(0));
    0
}

/// Argument `n` of an fentry program, read as a plain word: older verifiers (6.1) refuse a
/// direct context read of a function-pointer argument ("is not a struct").
#[inline(always)]
pub(crate) fn raw_arg(ctx: &FEntryContext, n: usize) -> u64 {
    unsafe { bpf_probe_read_kernel((ctx.as_ptr() as *const u64).add(n)) }.unwrap_or(0)
}

/// Where the targets are: the index of the argument holding them (read only for membarrier's
/// own cross calls, not for every cross call on the box).
pub(crate) enum CrossCall {
    /// A `struct cpumask *`.
    Mask(usize),
    /// A CPU number.
    Single(usize),
}

#[inline(always)]
pub(crate) fn cross_call(ctx: &FEntryContext, func_arg: usize, to: CrossCall) {
    if !membarrier_func(raw_arg(ctx, func_arg)) {
        return;
    }
    let Some(owner) = ROUND_OWNER.get_ptr_mut(0) else {
        return;
    };
    let Some(caller) = inside(current_tid()) else {
        // Not a traced caller: its handlers are nobody's.
        unsafe { *owner = CallKey::default() };
        return;
    };
    unsafe {
        *owner = CallKey {
            tgid: caller.tgid,
            serial: caller.serial,
            cmd: caller.cmd,
            flags: caller.flags,
        }
    };
    let me = unsafe { bpf_get_smp_processor_id() };
    match to {
        CrossCall::Single(n) => {
            let cpu = raw_arg(ctx, n) as u32;
            // Counted already: a mask's round with one target left calls this for it
            // (smp_call_function_many before 5.11 does).
            if let Some(c) = MANY_COUNTED.get_ptr_mut(0)
                && cpu < 64
                && unsafe { *c } >> cpu & 1 != 0
            {
                unsafe { *c &= !(1u64 << cpu) };
                return;
            }
            if cpu != me {
                ipi_sent(caller, cpu);
            }
        }
        CrossCall::Mask(n) => {
            let mask = raw_arg(ctx, n);
            // Only the first 64 CPUs (the first word of the mask).
            let mut bits = unsafe { bpf_probe_read_kernel(mask as *const u64) }.unwrap_or(0);
            if me < 64 {
                bits &= !(1u64 << me);
            }
            for cpu in 0..64u32 {
                if bits >> cpu & 1 != 0 {
                    ipi_sent(caller, cpu);
                }
            }
            if let Some(c) = MANY_COUNTED.get_ptr_mut(0) {
                unsafe { *c = bits };
            }
        }
    }
}

/// Per CPU, the targets `smp_call_function_many` counted in the round under way there (it
/// runs with preemption off), until its fexit: before 5.11 it sends a lone target's IPI
/// through `smp_call_function_single`, which would count it again (the 5.10 guest: 2 IPIs a
/// call where 1 was sent).
#[map]
pub(crate) static MANY_COUNTED: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// The membarrier callbacks themselves, on the target CPU (fentry/fexit): handler time for the
/// round's owner. Used where the csd tracepoints are missing.
#[inline(always)]
pub(crate) fn handler_begin() {
    if let Some(start) = HANDLER_START.get_ptr_mut(0) {
        unsafe { *start = [now(), 0] };
    }
}

#[inline(always)]
pub(crate) fn handler_end() {
    let Some(start) = HANDLER_START.get_ptr_mut(0) else {
        return;
    };
    let since = unsafe { (*start)[0] };
    if since == 0 {
        return;
    }
    unsafe { *start = [0, 0] };
    let Some(owner) = ROUND_OWNER.get_ptr(0) else {
        return;
    };
    let owner = unsafe { *owner };
    if owner.tgid != 0 {
        handled(&owner, now().wrapping_sub(since));
    }
}

/// One handler run of `owner`'s, `ns` long, charged to the task it interrupted: in the
/// handler (hardirq, or the target's own flush of its queue) the current task is the one whose
/// CPU time it took.
#[inline(always)]
pub(crate) fn handled(owner: &CallKey, ns: u64) {
    let mut key = HandlerKey {
        tgid: owner.tgid,
        serial: owner.serial,
        cmd: owner.cmd,
        flags: owner.flags,
        victim: (bpf_get_current_pid_tgid() >> 32) as u32,
    };
    let bump_row = |p: *mut Handled| unsafe {
        add(&mut (*p).runs, 1);
        add(&mut (*p).ns, ns);
    };
    let row = |comm| Handled { runs: 1, ns, comm };
    // The comm is read only when the row is made.
    let victim_row = || row(bpf_get_current_comm().unwrap_or_default());
    if upsert(&HANDLED, &key, victim_row, bump_row) {
        return;
    }
    // The map is full (a caller interrupting many short-lived processes): the caller's row
    // for all other victims keeps its handler time whole.
    key.victim = VICTIMS_OTHER;
    if !upsert(&HANDLED, &key, || row([0; COMM_LEN]), bump_row) {
        bump(counter::DROPPED_DETAIL);
    }
}

#[fentry(function = "ipi_mb")]
pub fn ipi_mb_entry(_ctx: FEntryContext) -> u32 {
    handler_begin();
    0
}

#[fexit(function = "ipi_mb")]
pub fn ipi_mb_exit(_ctx: FExitContext) -> u32 {
    handler_end();
    0
}

#[fentry(function = "ipi_sync_core")]
pub fn ipi_sync_core_entry(_ctx: FEntryContext) -> u32 {
    handler_begin();
    0
}

#[fexit(function = "ipi_sync_core")]
pub fn ipi_sync_core_exit(_ctx: FExitContext) -> u32 {
    handler_end();
    0
}

#[fentry(function = "ipi_rseq")]
pub fn ipi_rseq_entry(_ctx: FEntryContext) -> u32 {
    handler_begin();
    0
}

#[fexit(function = "ipi_rseq")]
pub fn ipi_rseq_exit(_ctx: FExitContext) -> u32 {
    handler_end();
    0
}
