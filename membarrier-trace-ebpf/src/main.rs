//! eBPF programs of membarrier-trace.
//!
//! The per-call path: `sys_enter_membarrier` stores a timestamp per thread, `sys_exit_membarrier`
//! folds the call into a per-CPU stats row keyed by (tgid, cmd, flags, errno). Userspace reads
//! the summaries; no per-event data leaves the kernel.
#![no_std]
#![no_main]
// The BPF target has no compare-and-swap in core's atomics API (target_has_atomic is off), but
// the instructions exist (BPF_ATOMIC add and cmpxchg): reach them through the intrinsics.
#![feature(core_intrinsics)]
#![allow(internal_features)]

use core::intrinsics::{AtomicOrdering::Relaxed, atomic_cxchg, atomic_xadd};

use aya_ebpf::{
    EbpfContext as _,
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{map, tracepoint},
    maps::{HashMap, PerCpuArray},
    programs::TracePointContext,
};
use membarrier_trace_common::{
    HIST_BUCKETS, Inflight, MAX_INFLIGHT, MAX_PIDS, MAX_STATS, Stats, StatsKey, counter,
    hist_bucket,
};

/// Set by userspace before load: 1 when only the tgids in `TGIDS` are traced. Being in .rodata,
/// the verifier prunes the filter branch entirely when it is 0.
#[unsafe(no_mangle)]
static FILTER_TGIDS: u8 = 0;
/// Offset of `child_pid` in `sched:sched_process_fork`, read by userspace from the tracepoint's
/// format file (it moved between kernel versions).
#[unsafe(no_mangle)]
static FORK_CHILD_PID_OFF: u32 = 44;

// Offsets in the syscall tracepoints (fixed by the syscall tracepoint ABI: 8-byte args from 16).
const ENTER_CMD_OFF: usize = 16;
const ENTER_FLAGS_OFF: usize = 24;
const EXIT_RET_OFF: usize = 16;

#[map]
static TGIDS: HashMap<u32, u8> = HashMap::with_max_entries(MAX_PIDS, 0);

#[map]
static INFLIGHT: HashMap<u32, Inflight> = HashMap::with_max_entries(MAX_INFLIGHT, 0);

// One shared, preallocated row per key, updated with atomics. Not per-CPU: a row is 4 KiB, so
// per-CPU rows cost rows x CPUs x 4 KiB; and not BPF_F_NO_PREALLOC: allocation from a tracing
// program fails transiently (-ENOMEM) while the allocator refills its per-CPU cache, which
// dropped the first calls of new rows in testing. Rows are only contended when one process
// calls from several CPUs at once, and the expedited cmds serialize on a kernel mutex anyway.
#[map]
static STATS: HashMap<StatsKey, Stats> = HashMap::with_max_entries(MAX_STATS, 0);

/// Template for new stats rows: the BPF stack (512 bytes) cannot hold one.
#[map]
static SCRATCH: PerCpuArray<Stats> = PerCpuArray::with_max_entries(1, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

#[inline(always)]
fn filtering() -> bool {
    unsafe { core::ptr::read_volatile(&FILTER_TGIDS) != 0 }
}

#[inline(always)]
fn traced(tgid: u32) -> bool {
    !filtering() || TGIDS.get_ptr(&tgid).is_some()
}

#[inline(always)]
fn bump(idx: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(idx) {
        unsafe { *c += 1 };
    }
}

/// Reads the `u64` at `off` in the tracepoint record: a direct context load, which the verifier
/// allows for tracepoint programs and which costs far less than `bpf_probe_read`.
#[inline(always)]
fn arg(ctx: &TracePointContext, off: usize) -> u64 {
    unsafe { *(ctx.as_ptr() as *const u8).add(off).cast::<u64>() }
}

#[tracepoint]
pub fn sys_enter_membarrier(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !traced((pid_tgid >> 32) as u32) {
        return 0;
    }
    let tid = pid_tgid as u32;
    let (cmd, flags) = (
        arg(&ctx, ENTER_CMD_OFF) as u32,
        arg(&ctx, ENTER_FLAGS_OFF) as u32,
    );
    // A thread keeps its INFLIGHT slot between calls (userspace prunes dead threads), so the
    // common case is a lookup and plain stores, not a hash insert and delete per call.
    if let Some(slot) = INFLIGHT.get_ptr_mut(&tid) {
        unsafe {
            (*slot).cmd = cmd;
            (*slot).flags = flags;
            // Timestamp last, so the tracer's own work here is not counted as the call's.
            (*slot).start_ns = bpf_ktime_get_ns();
        }
        return 0;
    }
    let call = Inflight {
        start_ns: unsafe { bpf_ktime_get_ns() },
        cmd,
        flags,
    };
    if INFLIGHT.insert(&tid, &call, 0).is_err() {
        bump(counter::DROPPED_INFLIGHT);
    }
    0
}

#[tracepoint]
pub fn sys_exit_membarrier(ctx: TracePointContext) -> u32 {
    let end_ns = unsafe { bpf_ktime_get_ns() };
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let call = match INFLIGHT.get_ptr_mut(&(pid_tgid as u32)) {
        // start_ns 0: the slot is idle, this exit's enter was not seen.
        Some(slot) if unsafe { (*slot).start_ns } != 0 => unsafe {
            let call = *slot;
            (*slot).start_ns = 0;
            call
        },
        _ => {
            if traced(tgid) {
                bump(counter::MISSED_ENTER);
            }
            return 0;
        }
    };
    let ret = arg(&ctx, EXIT_RET_OFF) as i64;
    let key = StatsKey {
        tgid,
        cmd: call.cmd,
        flags: call.flags,
        errno: if ret < 0 {
            ret.wrapping_neg() as u32
        } else {
            0
        },
    };
    let Some(row) = stats_row(&key) else {
        bump(counter::DROPPED_STATS);
        return 0;
    };
    let ns = end_ns.wrapping_sub(call.start_ns);
    let row = unsafe { &mut *row };
    add(&mut row.count, 1);
    add(&mut row.sum_ns, ns);
    update(&mut row.min_ns, ns, |new, cur| new < cur);
    update(&mut row.max_ns, ns, |new, cur| new > cur);
    // The volatile read hides the bucket's known range from LLVM, so the mask survives for the
    // verifier, which cannot follow the log2 arithmetic to see the bound itself.
    let b = hist_bucket(ns);
    let b = unsafe { core::ptr::read_volatile(&b) } & (HIST_BUCKETS - 1);
    add(&mut row.hist[b], 1);
    0
}

/// Atomic add (BPF_ATOMIC_ADD: the result is unused, so no fetch is needed).
#[inline(always)]
fn add(p: &mut u64, v: u64) {
    unsafe { atomic_xadd::<u64, u64, { Relaxed }>(p, v) };
}

/// Stores `v` when `better(v, current)`, with a bounded compare-exchange retry (the verifier
/// wants bounded loops; losing 4 races in a row to the same row needs 5 CPUs in it at once).
#[inline(always)]
fn update(p: &mut u64, v: u64, better: impl Fn(u64, u64) -> bool) {
    // An aligned 8-byte load is single-copy atomic; the cmpxchg below catches a stale value.
    let mut cur = unsafe { core::ptr::read_volatile(p) };
    for _ in 0..4 {
        if !better(v, cur) {
            return;
        }
        let (now, swapped) = unsafe { atomic_cxchg::<u64, { Relaxed }, { Relaxed }>(p, cur, v) };
        if swapped {
            return;
        }
        cur = now;
    }
}

/// The stats row for `key`, created on first use.
#[inline(always)]
fn stats_row(key: &StatsKey) -> Option<*mut Stats> {
    if let Some(row) = STATS.get_ptr_mut(key) {
        return Some(row);
    }
    // Slow path, once per row: SCRATCH is never counted into, so its histogram stays zero.
    let tmpl = SCRATCH.get_ptr_mut(0)?;
    unsafe {
        (*tmpl).comm = bpf_get_current_comm().unwrap_or_default();
        (*tmpl).min_ns = u64::MAX;
    }
    // NOEXIST: another CPU may have created the row meanwhile; then use theirs.
    let _ = STATS.insert(key, unsafe { &*tmpl }, BPF_NOEXIST as u64);
    STATS.get_ptr_mut(key)
}

/// Follows `-- COMMAND`'s children: a process forked by a traced one is traced too.
#[tracepoint]
pub fn sched_process_fork(ctx: TracePointContext) -> u32 {
    let child_off = unsafe { core::ptr::read_volatile(&FORK_CHILD_PID_OFF) } as usize;
    // The tracepoint runs in the parent: its tgid decides. New threads pass here too; their tids
    // in TGIDS are harmless, since a live thread's tid is never another process's tgid.
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if TGIDS.get_ptr(&tgid).is_none() {
        return 0;
    }
    let child = unsafe { ctx.read_at::<u32>(child_off) }.unwrap_or(0);
    if child == 0 {
        return 0;
    }
    if TGIDS.insert(&child, &1, 0).is_err() {
        bump(counter::DROPPED_PIDS);
    }
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
