//! The syscall hooks: the `syscalls` tracepoints, fentry/fexit on the syscall, the raw
//! `sys_enter`/`sys_exit` tracepoints, and their floors (the same hooks doing nothing, to
//! measure what attaching alone costs). Each hands the call to [`crate::call`].

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_kernel},
    macros::{btf_tracepoint, fentry, fexit, tracepoint},
    programs::{BtfTracePointContext, FEntryContext, FExitContext, TracePointContext},
};

use membarrier_trace_common::{COMM_LEN, StatsKey};

use crate::{
    call::{ROWS, inside_count, on_enter, on_exit, row_index, stats_row},
    config::{ENTER_CMD_OFF, ENTER_FLAGS_OFF, EXIT_RET_OFF},
    thread::{INFLIGHT, ZERO_SLOT, new_slot, slot},
    util::{Row as _, add32, arg, current_tid, now},
};

#[tracepoint]
pub fn sys_enter_membarrier(ctx: TracePointContext) -> u32 {
    on_enter(
        arg(&ctx, ENTER_CMD_OFF) as u32,
        arg(&ctx, ENTER_FLAGS_OFF) as u32,
    );
    0
}

#[tracepoint]
pub fn sys_exit_membarrier(ctx: TracePointContext) -> u32 {
    on_exit(now(), arg(&ctx, EXIT_RET_OFF) as i64);
    0
}

/// Where the kernel allows fentry (`--attach fentry|auto`): only membarrier calls pay, the rest
/// of the box keeps the fast syscall path. The argument is the syscall's `struct pt_regs *`.
#[fentry(function = "sys_membarrier")]
pub fn membarrier_fentry(ctx: FEntryContext) -> u32 {
    let regs: *const u8 = ctx.arg(0);
    let reg =
        |off: usize| unsafe { bpf_probe_read_kernel(regs.add(off).cast::<u64>()) }.unwrap_or(0);
    on_enter(reg(PT_REGS_ARG0) as u32, reg(PT_REGS_ARG1) as u32);
    0
}

#[fexit(function = "sys_membarrier")]
pub fn membarrier_fexit(ctx: FExitContext) -> u32 {
    let end_ns = now();
    // (regs, return value)
    let ret: i64 = ctx.arg(1);
    on_exit(end_ns, ret);
    0
}

/// `--attach raw`: the raw syscall tracepoints, which every syscall on the box runs through;
/// anything but membarrier returns at the first compare. Cheaper per membarrier call than the
/// syscall tracepoints (no record is built), dearer for every other syscall. tp_btf rather
/// than raw_tp: the registers are read with direct loads, not `bpf_probe_read`. The syscall's
/// number is an argument at entry, and read from the registers at exit.
#[btf_tracepoint(function = "sys_enter")]
pub fn raw_sys_enter(ctx: BtfTracePointContext) -> i32 {
    // (regs, id)
    let id: i64 = ctx.arg(1);
    if id != NR_MEMBARRIER {
        return 0;
    }
    let regs: *const u8 = ctx.arg(0);
    let reg = |off: usize| unsafe { *regs.add(off).cast::<u64>() };
    on_enter(reg(PT_REGS_ARG0) as u32, reg(PT_REGS_ARG1) as u32);
    0
}

#[btf_tracepoint(function = "sys_exit")]
pub fn raw_sys_exit(ctx: BtfTracePointContext) -> i32 {
    // (regs, ret)
    let regs: *const u8 = ctx.arg(0);
    if i64::from(unsafe { *regs.add(PT_REGS_NR).cast::<SyscallNr>() }) != NR_MEMBARRIER {
        return 0;
    }
    let end_ns = now();
    on_exit(end_ns, ctx.arg(1));
    0
}

// Each hook's floor (`cargo xtask bench`): the same attachment with programs that do nothing
// (the raw pair still tells membarrier from the other syscalls, as any program there must).
// What the tracer's programs cost is their time over these.

#[tracepoint]
pub fn floor_sys_enter_membarrier(_ctx: TracePointContext) -> u32 {
    0
}

#[tracepoint]
pub fn floor_sys_exit_membarrier(_ctx: TracePointContext) -> u32 {
    0
}

#[fentry(function = "sys_membarrier")]
pub fn floor_membarrier_fentry(_ctx: FEntryContext) -> u32 {
    0
}

#[fexit(function = "sys_membarrier")]
pub fn floor_membarrier_fexit(_ctx: FExitContext) -> u32 {
    0
}

#[btf_tracepoint(function = "sys_enter")]
pub fn floor_raw_sys_enter(ctx: BtfTracePointContext) -> i32 {
    let id: i64 = ctx.arg(1);
    if id != NR_MEMBARRIER {
        return 0;
    }
    // Keep the compare: a membarrier call would do its work here.
    unsafe { core::ptr::read_volatile(&id) as i32 & 0 }
}

#[btf_tracepoint(function = "sys_exit")]
pub fn floor_raw_sys_exit(ctx: BtfTracePointContext) -> i32 {
    let regs: *const u8 = ctx.arg(0);
    let nr = i64::from(unsafe { *regs.add(PT_REGS_NR).cast::<SyscallNr>() });
    if nr != NR_MEMBARRIER {
        return 0;
    }
    unsafe { core::ptr::read_volatile(&nr) as i32 & 0 }
}

// The per-call path's parts, one at a time (`--hook-floor=PART`, on the syscall tracepoints
// beside the empty enter): what each costs over an empty program, so the programs' cost can be
// read against what their design cannot do without (docs/bench.md, "Where the nanoseconds go").

#[tracepoint]
pub fn part_clock(_ctx: TracePointContext) -> u32 {
    let t = now();
    unsafe { core::ptr::read_volatile(&t) as u32 & 0 }
}

#[tracepoint]
pub fn part_pid_tgid(_ctx: TracePointContext) -> u32 {
    let t = bpf_get_current_pid_tgid();
    unsafe { core::ptr::read_volatile(&t) as u32 & 0 }
}

/// The thread's in-flight slot found by its tid (made on the first call), as every call's
/// enter and exit do.
#[tracepoint]
pub fn part_slot(_ctx: TracePointContext) -> u32 {
    let tid = current_tid();
    match INFLIGHT.get_ptr(&tid) {
        Some(s) => unsafe { core::ptr::read_volatile(&(*s).start_ns) as u32 & 0 },
        None => {
            if let Some(z) = ZERO_SLOT.get_ptr(0) {
                let _ = INFLIGHT.insert(&tid, unsafe { &*z }, 0);
            }
            0
        }
    }
}

/// The thread's in-flight slot found at its place in TID_SLOTS (claimed on the first call), as
/// every call's enter and exit do; `part_slot` is the INFLIGHT hash a thread whose place
/// another holds uses.
#[tracepoint]
pub fn part_place(_ctx: TracePointContext) -> u32 {
    let tid = current_tid();
    match slot(tid).or_else(|| new_slot(tid)) {
        Some(s) => unsafe { core::ptr::read_volatile(&(*s).start_ns) as u32 & 0 },
        None => 0,
    }
}

/// The call's stats row found by its key in `STATS`, as a thread's first call of a key does
/// (later ones find it at the index their slot keeps); with `count`, counted into.
#[inline(always)]
fn part_row_of(count: bool) -> u32 {
    let key = floor_key((bpf_get_current_pid_tgid() >> 32) as u32);
    if let Some(i) = row_index(&key, || [0; COMM_LEN], || {})
        && let Some(row) = ROWS.get_ptr_mut(i)
        && count
    {
        unsafe { (*row).count_one(100) };
    }
    0
}

/// The tid, the thread's slot at its place, and the call's stats row at the index the slot
/// keeps, checked against its key, as every exit finds its row (made, and its index kept, at
/// the first run).
#[tracepoint]
pub fn part_row_at_index(_ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tid = pid_tgid as u32;
    let key = floor_key((pid_tgid >> 32) as u32);
    if let Some(s) = slot(tid).or_else(|| new_slot(tid))
        && let Some(row) = stats_row(unsafe { &mut *s }, &key, || {})
    {
        return unsafe { core::ptr::read_volatile(&(*row).count) } as u32 & 0;
    }
    0
}

/// The key of the parts' own row: no process's.
#[inline(always)]
fn floor_key(tgid: u32) -> StatsKey {
    StatsKey {
        tgid,
        serial: u32::MAX,
        cmd: 8,
        flags: 0,
        errno: 0,
    }
}

#[tracepoint]
pub fn part_row(_ctx: TracePointContext) -> u32 {
    part_row_of(false)
}

#[tracepoint]
pub fn part_row_count(_ctx: TracePointContext) -> u32 {
    part_row_of(true)
}

/// An atomic add into an array element: what marking a thread inside costs where its slot is
/// not at its place, and what a lookup costs where the key is an index. (Into index 0's count,
/// which nothing reads without the breakdown. Adding 0 would be compiled as an atomic load,
/// which BPF does not have.)
#[tracepoint]
pub fn part_array_add(_ctx: TracePointContext) -> u32 {
    if let Some(n) = inside_count(0) {
        add32(n, 1);
    }
    0
}

#[cfg(bpf_target_arch = "x86_64")]
pub(crate) const NR_MEMBARRIER: i64 = 324;

#[cfg(bpf_target_arch = "x86_64")]
pub(crate) const PT_REGS_NR: usize = 120; // orig_ax
#[cfg(bpf_target_arch = "x86_64")]
pub(crate) type SyscallNr = i64;

#[cfg(not(bpf_target_arch = "x86_64"))]
pub(crate) const NR_MEMBARRIER: i64 = 283; // the generic table: aarch64, riscv64
#[cfg(not(bpf_target_arch = "x86_64"))]
pub(crate) const PT_REGS_NR: usize = 280; // aarch64: syscallno
#[cfg(not(bpf_target_arch = "x86_64"))]
pub(crate) type SyscallNr = i32;

// Offsets of the first two syscall arguments in struct pt_regs.
#[cfg(bpf_target_arch = "x86_64")]
pub(crate) const PT_REGS_ARG0: usize = 112; // di
#[cfg(bpf_target_arch = "x86_64")]
pub(crate) const PT_REGS_ARG1: usize = 104; // si
#[cfg(not(bpf_target_arch = "x86_64"))]
pub(crate) const PT_REGS_ARG0: usize = 0; // aarch64, riscv64...: regs[0]
#[cfg(not(bpf_target_arch = "x86_64"))]
pub(crate) const PT_REGS_ARG1: usize = 8;
