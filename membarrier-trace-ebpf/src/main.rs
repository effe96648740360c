//! eBPF programs of membarrier-trace.
//!
//! The per-call path: `sys_enter_membarrier` opens the calling thread's in-flight slot,
//! `sys_exit_membarrier` folds the call into a stats row keyed by (tgid, cmd, flags, errno).
//! While a thread is inside membarrier, the sched, IPI, csd and lock probes add to its slot what
//! the call is waiting for (off-CPU time, IPIs sent, handler time on the targets, mutex wait).
//! Userspace reads the summaries; no per-event data leaves the kernel.
#![no_std]
#![no_main]
// The BPF target has no compare-and-swap in core's atomics API (target_has_atomic is off), but
// the instructions exist (BPF_ATOMIC add and cmpxchg): reach them through the intrinsics.
#![feature(core_intrinsics)]
#![allow(internal_features)]

#[cfg(not(no_cmpxchg))]
use core::intrinsics::atomic_cxchg;
use core::intrinsics::{AtomicOrdering::Relaxed, atomic_xadd};

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_NOEXIST, pt_regs},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_smp_processor_id, bpf_ktime_get_ns,
        bpf_probe_read_kernel, bpf_probe_read_kernel_buf, bpf_probe_read_user,
        generated::{
            self as helper, bpf_get_attach_cookie, bpf_get_current_task_btf, bpf_task_pt_regs,
        },
    },
    macros::{btf_tracepoint, fentry, fexit, map, tracepoint, uprobe, uretprobe},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{
        BtfTracePointContext, FEntryContext, FExitContext, ProbeContext, RetProbeContext,
        TracePointContext,
    },
};
use membarrier_trace_common::{
    CALLER_RING_BYTES, CLONE_THREAD, COMM_LEN, CallKey, CallerSeen, CpuKey, EXITED_RING_BYTES,
    ExitedThread, HIST_BUCKETS, Handled, HandlerKey, INSIDE_SLOTS, IPI_HIST, Inflight,
    KSTACK_FRAMES, KStack, KStackKey, MAX_CPU_ROWS, MAX_CSDS, MAX_EXIT_NAMES, MAX_INFLIGHT,
    MAX_KSTACKS, MAX_PROCS, MAX_STATS, MAX_SUMMED, MAX_THREADS, MAX_WAKERS, MAX_WRITERS,
    MOVED_BUCKETS, MOVED_HEADER, MOVED_ROWS, MovedProc, MovedRow, OTHER_ROW, Proc, ROW_KINDS,
    STACK_BUDGET, STACK_COPY, STACK_RING_BYTES, STACK_SAMPLE_EVERY, STACK_SAMPLED, STACK_WINDOW_NS,
    StackSample, Stats, StatsKey, SummedKey, SummedRow, THREAD_CMDS, ThreadCalls, ThreadKey,
    UNWIND_SLOTS, UnwindSlot, VICTIMS_OTHER, WakerKey, Writer, WriterKey, WriterStats, counter,
    exited_kind, field, hist_bucket, kind_key, proc_id, row_kind, thread_cmd, unwind_rule,
    unwind_slot,
};

/// Set by userspace before load: 1 when only the processes marked traced in `PROCS` are. Being
/// in .rodata, the verifier prunes the filter branch entirely when it is 0.
#[unsafe(no_mangle)]
static FILTER_TGIDS: u8 = 0;
/// Set by userspace: 1 when a traced process's children are traced too (`-- COMMAND`).
#[unsafe(no_mangle)]
static FOLLOW_FORKS: u8 = 0;
/// Set by userspace: 1 when the breakdown probes are attached, which need the INSIDE counts.
#[unsafe(no_mangle)]
static BREAKDOWN: u8 = 1;
/// Set by userspace: 1 with `--stacks` (each call's user stack is sent to userspace).
#[unsafe(no_mangle)]
static STACKS: u8 = 0;

/// Addresses of membarrier's IPI callbacks (ipi_mb, ipi_sync_core, ipi_rseq, and
/// registration's ipi_sync_rq_state) from kallsyms, so the csd probes skip every other
/// cross-CPU call with a compare; 0 for one this kernel lacks, all 0 when none is known.
#[unsafe(no_mangle)]
static IPI_FUNCS: [u64; 4] = [0; 4];

/// Offsets in `struct task_struct` of `pid`, `group_leader` and `comm`: set by userspace from
/// the kernel's BTF; all 0 where it has none.
#[unsafe(no_mangle)]
static TASK_OFFSETS: [u32; 3] = [0; 3];

/// Offsets of the breakdown tracepoints' fields, by `field::*` index: set by userspace from the
/// format files.
#[unsafe(no_mangle)]
static FIELDS: [u32; field::COUNT] = field::mainline();

// Offsets in the syscall tracepoints (fixed by the syscall tracepoint ABI: 8-byte args from 16).
const ENTER_CMD_OFF: usize = 16;
const ENTER_FLAGS_OFF: usize = 24;
const EXIT_RET_OFF: usize = 16;

/// Processes by tgid: their serial number, live tasks and whether they are traced (see `Proc`).
/// Kept by `task_newtask` and `sched_process_exit`; userspace adds the `--pid`s and the command.
/// Sized by userspace from the machine.
#[map]
static PROCS: HashMap<u32, Proc> = HashMap::with_max_entries(MAX_PROCS, 0);

/// The name of a traced process as its main thread exits, by `proc_id(tgid, serial)`: the name
/// it had last (a rename or exec just before exiting is seen by no snapshot).
#[map]
static EXIT_NAMES: LruHashMap<u64, [u8; COMM_LEN]> =
    LruHashMap::with_max_entries(MAX_EXIT_NAMES, 0);

/// [0]: the last serial number given to a process.
#[map]
static SERIAL: Array<u64> = Array::with_max_entries(1, 0);

/// [0]: armed. Userspace attaches the enter and exit programs one after the other, then arms
/// them: calls returning in between would otherwise all count as missed (at a million calls a
/// second, hundreds); armed at once, only calls truly under way at that instant are.
#[map]
static CONTROL: Array<u32> = Array::with_max_entries(1, 0);

#[map]
static INFLIGHT: HashMap<u32, Inflight> = HashMap::with_max_entries(MAX_INFLIGHT, 0);

/// A zeroed slot to insert (too large for the stack); never written.
#[map]
static ZERO_SLOT: PerCpuArray<Inflight> = PerCpuArray::with_max_entries(1, 0);

/// Exited threads' calls (from their slots), until userspace drains them.
#[map]
static THREADS: HashMap<ThreadKey, ThreadCalls> = HashMap::with_max_entries(MAX_THREADS, 0);

/// Threads inside membarrier, counted per `tid % INSIDE_SLOTS`: the probes that run for every
/// task on the box look here first (an inlined array load) and return unless it is non-zero.
#[map]
static INSIDE: Array<u32> = Array::with_max_entries(INSIDE_SLOTS, 0);

// One shared, preallocated row per key, updated with atomics. Not per-CPU: a row is 8.8 KiB, so
// per-CPU rows cost rows x CPUs x 8.8 KiB; and not BPF_F_NO_PREALLOC: allocation from a tracing
// program fails transiently (-ENOMEM) while the allocator refills its per-CPU cache, which
// dropped the first calls of new rows in testing. Rows are only contended when one process
// calls from several CPUs at once, and the expedited cmds serialize on a kernel mutex anyway.
#[map]
static STATS: HashMap<StatsKey, Stats> = HashMap::with_max_entries(MAX_STATS, 0);

/// Template for new stats rows: the BPF stack (512 bytes) cannot hold one.
#[map]
static SCRATCH: PerCpuArray<Stats> = PerCpuArray::with_max_entries(1, 0);

/// Userspace RCU grace periods, per (process, thread, function, caller).
#[map]
static WRITERS: HashMap<WriterKey, WriterStats> = HashMap::with_max_entries(MAX_WRITERS, 0);

/// Exited processes' rows and exited threads' calls on their way to userspace (see
/// `move_rows`, `send_thread`; a page with `--stacks`, where no rows are moved).
#[map]
static EXITED: RingBuf = RingBuf::with_byte_size(EXITED_RING_BYTES, 0);

/// Before Linux 5.12: the processes whose last task was claimed (see `last_task`). Only the
/// claims of processes exiting at once matter; older ones may go.
#[cfg(no_cmpxchg)]
#[map]
static LAST_TASK: LruHashMap<u64, u8> = LruHashMap::with_max_entries(4096, 0);

/// Where an exiting process's rows are gathered: larger than the BPF stack. Per CPU is safe:
/// only the exit programs use it, which run from the `sched_process_exit` tracepoint with
/// preemption off (tracepoint probes are called so, PREEMPT_RT included), in task context.
#[map]
static MOVED_SCRATCH: PerCpuArray<MovedProc> = PerCpuArray::with_max_entries(1, 0);

/// Exited processes' rows summed under their name when `EXITED` was full (see `sum_by_name`).
#[map]
static SUMMED: HashMap<SummedKey, SummedRow> = HashMap::with_max_entries(MAX_SUMMED, 0);

/// A new `SUMMED` row: zero, min at its maximum (set at each use; nothing else writes it).
#[map]
static SUMMED_SCRATCH: PerCpuArray<SummedRow> = PerCpuArray::with_max_entries(1, 0);

/// Callers to name now (see `CallerSeen`).
#[map]
static CALLERS: RingBuf = RingBuf::with_byte_size(CALLER_RING_BYTES, 0);

/// `--stacks`: calls' user stacks, for userspace to unwind (sized by userspace: a page without).
#[map]
static STACK_SAMPLES: RingBuf = RingBuf::with_byte_size(STACK_RING_BYTES, 0);

/// `--stacks`, per CPU: [start of the rate window, stacks taken in it, calls over the rate,
/// samples taken over it].
#[map]
static STACK_RATE: PerCpuArray<[u64; 4]> = PerCpuArray::with_max_entries(1, 0);

/// `--stacks`: how to unwind each code address of each process, as userspace learned it from
/// the samples, at `unwind_slot(pc, process)` (sized by userspace: 1 without).
#[map]
static UNWIND: Array<UnwindSlot> = Array::with_max_entries(UNWIND_SLOTS, 0);

/// `--stacks`: calls per stack unwound in the kernel (sized by userspace: 1 without).
#[map]
static KSTACKS: HashMap<KStackKey, KStack> = HashMap::with_max_entries(MAX_KSTACKS, 0);

/// Per CPU, the stack being unwound: a new `KSTACKS` row is inserted from it (too large for
/// the stack).
#[map]
static KSTACK_SCRATCH: PerCpuArray<KStack> = PerCpuArray::with_max_entries(1, 0);

/// Words of user stack the kernel unwinds from: what a sample copies.
const WINDOW_WORDS: usize = STACK_COPY / 8;

/// Per CPU, the user stack being unwound in the kernel, read at once (a helper call per frame
/// cost 270 ns more a call for a 10-frame stack).
#[map]
static STACK_WINDOW: PerCpuArray<Window> = PerCpuArray::with_max_entries(1, 0);

#[repr(C)]
struct Window {
    /// Bytes read into `words`.
    len: u64,
    words: [u64; WINDOW_WORDS],
}

/// A zeroed row to insert into WRITERS (too large for the stack).
#[map]
static WRITER_SCRATCH: PerCpuArray<WriterStats> = PerCpuArray::with_max_entries(1, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// IPIs sent per (process, cmd, flags, target CPU).
#[map]
static IPI_CPUS: HashMap<CpuKey, u64> = HashMap::with_max_entries(MAX_CPU_ROWS, 0);

/// Wakeups of callers inside membarrier, per (process, cmd, flags, waker comm).
#[map]
static WAKERS: HashMap<WakerKey, u64> = HashMap::with_max_entries(MAX_WAKERS, 0);

/// Who queued a membarrier IPI callback, by csd address, until the target has run it.
#[map]
static CSD_OWNER: HashMap<u64, CallKey> = HashMap::with_max_entries(MAX_CSDS, 0);

/// Handler runs and time on target CPUs, per (process, cmd, flags) that caused them and the
/// process they interrupted.
#[map]
static HANDLED: HashMap<HandlerKey, Handled> = HashMap::with_max_entries(MAX_WAKERS, 0);

/// The membarrier callback running on this CPU: [start ns, csd].
#[map]
static HANDLER_START: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1, 0);

/// The caller of the membarrier IPI round in flight (kernels without csd tracepoints): the
/// fentry handler probes charge their time to it. tgid 0: an untraced caller.
#[map]
static ROUND_OWNER: Array<CallKey> = Array::with_max_entries(1, 0);

#[inline(always)]
fn armed() -> bool {
    CONTROL.get(0).is_some_and(|a| *a != 0)
}

#[inline(always)]
fn breakdown() -> bool {
    unsafe { core::ptr::read_volatile(&BREAKDOWN) != 0 }
}

#[inline(always)]
fn stacks() -> bool {
    unsafe { core::ptr::read_volatile(&STACKS) != 0 }
}

#[inline(always)]
fn filtering() -> bool {
    unsafe { core::ptr::read_volatile(&FILTER_TGIDS) != 0 }
}

#[inline(always)]
fn following() -> bool {
    unsafe { core::ptr::read_volatile(&FOLLOW_FORKS) != 0 }
}

/// The process's serial number (0: it existed before tracing) and whether it is traced.
#[inline(always)]
fn process(tgid: u32) -> (u32, bool) {
    process_of(PROCS.get_ptr(&tgid))
}

/// [`process`] of an entry already looked up.
#[inline(always)]
fn process_of(p: Option<*const Proc>) -> (u32, bool) {
    match p {
        Some(p) => unsafe { ((*p).serial, !filtering() || (*p).traced != 0) },
        None => (0, !filtering()),
    }
}

#[inline(always)]
fn bump(idx: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(idx) {
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn now() -> u64 {
    unsafe { bpf_ktime_get_ns() }
}

/// Reads the `u64` at `off` in the tracepoint record: a direct context load, which the verifier
/// allows for tracepoint programs and which costs far less than `bpf_probe_read`.
#[inline(always)]
fn arg(ctx: &TracePointContext, off: usize) -> u64 {
    unsafe { *(ctx.as_ptr() as *const u8).add(off).cast::<u64>() }
}

/// Field `idx` (a `field::*` index) of the tracepoint record, at the offset userspace read from
/// the format file: a direct read for the layouts in `field::KNOWN`, else `bpf_probe_read`.
/// `FIELDS` is constant to the verifier, which removes the branches not taken.
#[inline(always)]
fn record<T: Copy + Default>(ctx: &TracePointContext, idx: usize) -> T {
    let at = |off: usize| unsafe { *(ctx.as_ptr() as *const u8).add(off).cast::<T>() };
    let off = unsafe { core::ptr::read_volatile(&FIELDS[idx]) } as usize;
    let [a, b] = field::KNOWN[idx];
    if off == a {
        at(a)
    } else if off == b {
        at(b)
    } else {
        unsafe { ctx.read_at::<T>(off) }.unwrap_or_default()
    }
}

/// Atomic add (BPF_ATOMIC_ADD: the result is unused, so no fetch is needed).
#[inline(always)]
fn add(p: &mut u64, v: u64) {
    unsafe { atomic_xadd::<u64, u64, { Relaxed }>(p, v) };
}

#[inline(always)]
fn add32(p: *mut u32, v: u32) {
    unsafe { atomic_xadd::<u32, u32, { Relaxed }>(p, v) };
}

/// Adds `v` to `*p` and returns the value before, or None after losing 8 races in a row. The
/// object is built for the generic BPF CPU, which has no fetch-and-add; a 64-bit cmpxchg it has.
#[cfg(not(no_cmpxchg))]
#[inline(always)]
fn fetch_add(p: *mut u64, v: u64) -> Option<u64> {
    let mut cur = unsafe { core::ptr::read_volatile(p) };
    for _ in 0..8 {
        let (now, swapped) =
            unsafe { atomic_cxchg::<u64, { Relaxed }, { Relaxed }>(p, cur, cur.wrapping_add(v)) };
        if swapped {
            return Some(cur);
        }
        cur = now;
    }
    None
}

/// Stores `v` when `better(v, current)`, with a bounded compare-exchange retry (the verifier
/// wants bounded loops; losing 4 races in a row to the same row needs 5 CPUs in it at once).
/// Before Linux 5.12 (the object built with `no_cmpxchg`: that kernel refuses a program holding
/// the instruction anywhere, reached or not), a plain store: two CPUs ending calls of one row
/// at once can leave the lesser of their values (docs/design.md, "Kernels").
#[cfg(no_cmpxchg)]
#[inline(always)]
fn update(p: &mut u64, v: u64, better: impl Fn(u64, u64) -> bool) {
    if better(v, unsafe { core::ptr::read_volatile(p) }) {
        unsafe { core::ptr::write_volatile(p, v) };
    }
}

/// See above.
#[cfg(not(no_cmpxchg))]
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

/// Adds `v` to `map[key]`, creating the entry; a full map is counted, not hidden.
#[inline(always)]
fn count<K>(map: &HashMap<K, u64>, key: &K, v: u64) {
    if !upsert(map, key, || v, |p| add(unsafe { &mut *p }, v)) {
        bump(counter::DROPPED_DETAIL);
    }
}

/// `bump`s `map[key]`, or creates it as `new()` (built only then); false when the map is full.
#[inline(always)]
fn upsert<K, V>(
    map: &HashMap<K, V>,
    key: &K,
    new: impl FnOnce() -> V,
    bump: impl Fn(*mut V),
) -> bool {
    if let Some(p) = map.get_ptr_mut(key) {
        bump(p);
        return true;
    }
    if map.insert(key, &new(), BPF_NOEXIST as u64).is_ok() {
        return true;
    }
    match map.get_ptr_mut(key) {
        Some(p) => bump(p), // another CPU created it meanwhile
        None => return false,
    }
    true
}

#[inline(always)]
fn inside_counter(tid: u32) -> Option<*mut u32> {
    INSIDE.get_ptr_mut(tid % INSIDE_SLOTS)
}

/// The slot of `tid` if it is inside membarrier now. The array check keeps the common case
/// (a task that is not) to one inlined load.
#[inline(always)]
fn inside(tid: u32) -> Option<&'static mut Inflight> {
    marked(tid).filter(|slot| slot.start_ns != 0)
}

/// The slot of `tid` if a thread with its index in INSIDE is inside membarrier or a userspace
/// grace period.
#[inline(always)]
fn marked(tid: u32) -> Option<&'static mut Inflight> {
    let n = inside_counter(tid)?;
    if unsafe { *n } == 0 {
        return None;
    }
    Some(unsafe { &mut *INFLIGHT.get_ptr_mut(&tid)? })
}

#[inline(always)]
fn current_tid() -> u32 {
    bpf_get_current_pid_tgid() as u32
}

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

#[cfg(bpf_target_arch = "x86_64")]
const NR_MEMBARRIER: i64 = 324;
#[cfg(bpf_target_arch = "x86_64")]
const PT_REGS_NR: usize = 120; // orig_ax
#[cfg(bpf_target_arch = "x86_64")]
type SyscallNr = i64;
#[cfg(not(bpf_target_arch = "x86_64"))]
const NR_MEMBARRIER: i64 = 283; // the generic table: aarch64, riscv64
#[cfg(not(bpf_target_arch = "x86_64"))]
const PT_REGS_NR: usize = 280; // aarch64: syscallno
#[cfg(not(bpf_target_arch = "x86_64"))]
type SyscallNr = i32;

// Offsets of the first two syscall arguments in struct pt_regs.
#[cfg(bpf_target_arch = "x86_64")]
const PT_REGS_ARG0: usize = 112; // di
#[cfg(bpf_target_arch = "x86_64")]
const PT_REGS_ARG1: usize = 104; // si
#[cfg(not(bpf_target_arch = "x86_64"))]
const PT_REGS_ARG0: usize = 0; // aarch64, riscv64...: regs[0]
#[cfg(not(bpf_target_arch = "x86_64"))]
const PT_REGS_ARG1: usize = 8;

#[inline(always)]
fn on_enter(cmd: u32, flags: u32) {
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
    } else if breakdown()
        && let Some(n) = inside_counter(tid)
    {
        add32(n, 1);
    }
    // The call's fields afresh; the thread's (identity, counters, grace period) stay.
    let s = unsafe { &mut *slot };
    s.cmd = cmd;
    s.flags = flags;
    s.ipis = 0;
    s.off_since_ns = 0;
    s.blocked_ns = 0;
    s.lock_since_ns = 0;
    s.mutex_wait_ns = 0;
    s.gp_since_ns = 0;
    // Timestamp last, so the tracer's own work here is not counted as the call's.
    s.start_ns = now();
}

/// The in-flight slot of thread `tid` of traced process `tgid`, made on first use.
#[inline(always)]
fn slot_of(tgid: u32, tid: u32) -> Option<*mut Inflight> {
    // A thread keeps its INFLIGHT slot between calls (sched_process_exit frees it), so the
    // common case is one lookup and plain stores, not a hash insert and delete per call. Slots
    // are only made for traced processes and carry the process's serial: a slot of this tgid
    // needs no process lookup (another tgid means a stale slot of a reused tid).
    match INFLIGHT.get_ptr_mut(&tid) {
        Some(slot) if unsafe { (*slot).tgid } == tgid => Some(slot),
        stale => {
            let (serial, traced) = process(tgid);
            if !traced {
                return None;
            }
            if let Some(old) = stale {
                // A slot of another process: the tid's last thread left without passing
                // sched_process_exit (a non-leader thread that exec'd). Its calls are kept.
                send_thread(tid, unsafe { &mut *old });
                hold_thread(tid);
            }
            // From a zeroed template: a slot is too large for the stack.
            let zero = ZERO_SLOT.get_ptr(0)?;
            if INFLIGHT.insert(&tid, unsafe { &*zero }, 0).is_err() {
                bump(counter::DROPPED_INFLIGHT);
                return None;
            }
            let slot = INFLIGHT.get_ptr_mut(&tid)?;
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
#[inline(always)]
fn on_exit(end_ns: u64, ret: i64) {
    if !armed() {
        return;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let tid = pid_tgid as u32;
    let call = match INFLIGHT.get_ptr_mut(&tid) {
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
    if breakdown()
        && let Some(n) = inside_counter(tid)
    {
        add32(n, u32::MAX); // -1
    }
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
    let Some(row) = row_of(&STATS, &SCRATCH, &key, || call.process, made) else {
        bump(counter::DROPPED_STATS);
        return;
    };
    let row = unsafe { &mut *row };
    row.count_one(ns);
    if stacks() {
        // Inside a probed grace-period function, its return address on the stack is the
        // uretprobe's trampoline: the unwinding takes the caller recorded at entry instead
        // (`ra_at` is 0 outside one). Read from the slot, not chosen by a branch: the
        // verifier would check the walk once per choice.
        let ra = unsafe {
            (
                core::ptr::read_volatile(&call.writer.ra_at),
                core::ptr::read_volatile(&call.writer.caller),
            )
        };
        take_stack(row, &key, end_ns, ns, ra);
    }
    // The slot is the thread's own: a plain add.
    let i = thread_cmd(call.cmd, call.flags);
    let i = unsafe { core::ptr::read_volatile(&i) }.min(THREAD_CMDS - 1);
    call.thread.calls[i] += 1;
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
}

/// `--stacks`: counts the call under its user stack, unwound here when every frame's rule is
/// known (`count_known_stack`), else sends the thread's user registers and the top of its user
/// stack for userspace to unwind (from `.eh_frame`: no frame pointers needed), count under
/// `row`'s key, and learn the rules from. Within the CPU's stack rate every call's stack is
/// taken; beyond it, 1 in `STACK_SAMPLE_EVERY` up to `STACK_SAMPLED` a window, and the others
/// are counted in the row as sampled out.
#[inline(always)]
fn take_stack(row: &mut Stats, key: &StatsKey, end_ns: u64, ns: u64, ra: (u64, u64)) {
    let Some(rate) = STACK_RATE.get_ptr_mut(0) else {
        return;
    };
    // Per CPU: plain stores. Where programs are preemptible (PREEMPT_RT) two exits on one CPU
    // may race here; that can only miscount the window's budget: each call still ends in
    // exactly one of sampled out, unsent or sent.
    let rate = unsafe { &mut *rate };
    if end_ns.wrapping_sub(rate[0]) >= STACK_WINDOW_NS {
        rate[0] = end_ns;
        rate[1] = 0;
        rate[3] = 0;
    }
    let sampled = rate[1] >= STACK_BUDGET;
    if sampled {
        rate[2] += 1;
        if rate[2] % STACK_SAMPLE_EVERY != 0 || rate[3] >= STACK_SAMPLED {
            add(&mut row.stacks_sampled_out, 1);
            return;
        }
        rate[3] += 1;
    } else {
        rate[1] += 1;
    }
    // The registers the thread entered the kernel with (the syscall leaves them as they were).
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as *const pt_regs;
    let (ip, sp, bp) = unsafe {
        (
            bpf_probe_read_kernel(&(*regs).rip).unwrap_or(0),
            bpf_probe_read_kernel(&(*regs).rsp).unwrap_or(0),
            bpf_probe_read_kernel(&(*regs).rbp).unwrap_or(0),
        )
    };
    if count_known_stack(key, sampled, ns, (ip, sp, bp), ra) {
        return;
    }
    let Some(mut entry) = STACK_SAMPLES.reserve::<StackSample>(0) else {
        add(&mut row.stacks_unsent, 1);
        return;
    };
    let e = unsafe { &mut *entry.as_mut_ptr() };
    e.tgid = key.tgid;
    e.serial = key.serial;
    e.cmd = key.cmd;
    e.flags = key.flags;
    e.errno = key.errno;
    e.sampled = sampled as u32;
    e.ns = ns;
    e.ip = ip;
    e.sp = sp;
    e.bp = bp;
    (e.ra_at, e.ra) = ra;
    // A read that runs past the stack's mapping fails whole: shorter ones then.
    e.len = 0;
    let dst = e.stack.as_mut_ptr() as *mut aya_ebpf::cty::c_void;
    let src = e.sp as *const aya_ebpf::cty::c_void;
    for len in [STACK_COPY, STACK_COPY / 4, STACK_COPY / 16] {
        if unsafe { helper::bpf_probe_read_user(dst, len as u32, src) } == 0 {
            e.len = len as u64;
            break;
        }
    }
    entry.submit(0);
}

/// `--stacks`: unwinds the user stack from (`ip`, `sp`, `bp`) with the rules userspace learned
/// for this process (`UNWIND`) and counts the call in its stack's `KSTACKS` row. False, with
/// nothing counted, where userspace must see the stack: a frame without a rule, a frame past
/// the bytes a sample copies (userspace would stop there), a stack deeper than
/// `KSTACK_FRAMES`, or a new stack when `KSTACKS` is full. The frames and where they stop are
/// the ones userspace finds from a sample, so both count into one stack. `ra` is at `ra_at`
/// (in a grace-period function, where its uretprobe's trampoline is on the stack).
#[inline(always)]
fn count_known_stack(
    key: &StatsKey,
    sampled: bool,
    ns: u64,
    (ip, sp, bp): (u64, u64, u64),
    (ra_at, ra): (u64, u64),
) -> bool {
    let (Some(s), Some(w)) = (KSTACK_SCRATCH.get_ptr_mut(0), STACK_WINDOW.get_ptr_mut(0)) else {
        return false;
    };
    let (s, w) = unsafe { (&mut *s, &mut *w) };
    // The bytes a sample would copy, read at once (a read that runs past the stack's mapping
    // fails whole: shorter ones then): userspace unwinds from exactly these, so the kernel
    // reads nothing past them either, and each word is a plain load.
    w.len = 0;
    for len in [STACK_COPY, STACK_COPY / 4, STACK_COPY / 16] {
        let dst = w.words.as_mut_ptr() as *mut aya_ebpf::cty::c_void;
        if unsafe { helper::bpf_probe_read_user(dst, len as u32, sp as *const _) } == 0 {
            w.len = len as u64;
            break;
        }
    }
    // The caller recorded at entry, in the copy in place of the uretprobe's trampoline: once
    // here, not a compare per word read (6.1's verifier gave up on that walk).
    let off = ra_at.wrapping_sub(sp);
    if off.wrapping_add(8) <= unsafe { core::ptr::read_volatile(&w.len) } && off % 8 == 0 {
        let i = (off / 8) as usize;
        w.words[unsafe { core::ptr::read_volatile(&i) } & (WINDOW_WORDS - 1)] = ra;
    }
    // The length read back from the map, after that compare: a value the verifier does not
    // know, so it checks the walk once, not once per length or per side of a compare (52,000
    // instructions verified on 6.18 rather than 117,000 or 136,000; 6.1's verifier gave up).
    let wlen = unsafe { core::ptr::read_volatile(&w.len) };
    let word = |at: u64| -> Option<u64> {
        let off = at.wrapping_sub(sp);
        if off.wrapping_add(8) > wlen || off % 8 != 0 {
            return None;
        }
        // Through memory: else the compiler indexes by `off` itself, whose alignment the
        // verifier does not know.
        let i = (off / 8) as usize;
        Some(w.words[unsafe { core::ptr::read_volatile(&i) } & (WINDOW_WORDS - 1)])
    };
    let (mut pc, mut sp_now, mut bp) = (ip, sp, bp);
    let proc = proc_id(key.tgid, key.serial);
    // FNV-1a over the frames.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut depth = 0;
    let mut complete = 0;
    for i in 0..KSTACK_FRAMES {
        s.pcs[i] = pc;
        hash = (hash ^ pc).wrapping_mul(0x0100_0000_01b3);
        let Some(slot) = UNWIND.get(unwind_slot(pc, proc)) else {
            return false;
        };
        if !slot.holds(pc, proc) {
            return false;
        }
        let rule = slot.rule;
        let kind = unwind_rule::kind(rule);
        if kind == unwind_rule::OUTERMOST {
            depth = i + 1;
            complete = 1;
            break;
        }
        let base = if kind == unwind_rule::CFA_FROM_RBP {
            bp
        } else {
            sp_now
        };
        let cfa = base.wrapping_add(unwind_rule::cfa_offset(rule) as u64);
        // A frame that does not go up; one past the copy fails the word read below.
        if cfa <= sp_now {
            return false;
        }
        let Some(ra) = word(cfa - 8) else {
            return false;
        };
        if unwind_rule::rbp_saved(rule) {
            match word(cfa.wrapping_add(unwind_rule::rbp_at(rule) as u64)) {
                Some(v) => bp = v,
                None => return false,
            }
        }
        if ra == 0 {
            depth = i + 1;
            complete = 1;
            break;
        }
        sp_now = cfa;
        pc = ra;
    }
    if depth == 0 {
        return false;
    }
    let k = KStackKey {
        tgid: key.tgid,
        serial: key.serial,
        cmd: key.cmd,
        flags: key.flags,
        hash,
    };
    // A new row from the scratch, which holds the frames.
    let Some(row) = row_from(
        &KSTACKS,
        &k,
        || {
            s.exact = 0;
            s.exact_ns = 0;
            s.sampled = 0;
            s.sampled_ns = 0;
            s.depth = depth as u32;
            s.complete = complete;
            Some(&raw mut *s)
        },
        || {},
    ) else {
        return false;
    };
    let row = unsafe { &mut *row };
    if sampled {
        add(&mut row.sampled, 1);
        add(&mut row.sampled_ns, ns);
    } else {
        add(&mut row.exact, 1);
        add(&mut row.exact_ns, ns);
    }
    true
}

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
    if breakdown()
        && let Some(n) = inside_counter(pid_tgid as u32)
    {
        add32(n, 1);
    }
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
    let slot = match INFLIGHT.get_ptr_mut(&tid) {
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
    if breakdown()
        && let Some(n) = inside_counter(tid)
    {
        add32(n, u32::MAX); // -1
    }
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

/// A row made on first use from a per-CPU template (too large for the stack), which is never
/// counted into, so its histograms stay zero; counted into one call (or grace period) at a
/// time.
trait Row {
    /// Fills in what a new row starts with: its name (the process's or the thread's), min at
    /// its maximum.
    fn start(&mut self, comm: [u8; COMM_LEN]);
    /// Counts one of `ns` into the latency figures.
    fn count_one(&mut self, ns: u64);
}

/// [`Row`] for the row types, which share these fields' names.
macro_rules! row {
    ($($t:ty),*) => {$(
        impl Row for $t {
            #[inline(always)]
            fn start(&mut self, comm: [u8; COMM_LEN]) {
                self.comm = comm;
                self.min_ns = u64::MAX;
            }

            #[inline(always)]
            fn count_one(&mut self, ns: u64) {
                add(&mut self.count, 1);
                add(&mut self.sum_ns, ns);
                update(&mut self.min_ns, ns, |new, cur| new < cur);
                update(&mut self.max_ns, ns, |new, cur| new > cur);
                add(&mut self.hist[bucket(ns)], 1);
            }
        }
    )*};
}
row!(Stats, WriterStats);

/// The process's name, as `/proc/PID/comm` shows it: its thread-group leader's comm, read as a
/// thread's in-flight slot is made, for the rows it makes (the process may be gone when
/// userspace looks, and the thread has a name of its own). The calling thread's where the
/// offsets are unknown (a constant to the verifier). A failed read leaves zeros: no name, never
/// another's.
#[inline(always)]
fn process_comm() -> [u8; COMM_LEN] {
    let off = unsafe { core::ptr::read_volatile(&TASK_OFFSETS) };
    if off[2] == 0 {
        return bpf_get_current_comm().unwrap_or_default();
    }
    let mut comm = [0u8; COMM_LEN];
    let task = unsafe { helper::bpf_get_current_task() } as *const u8;
    let mut leader: u64 = 0;
    unsafe {
        helper::bpf_probe_read_kernel(
            (&raw mut leader).cast(),
            8,
            task.add(off[1] as usize).cast(),
        );
        helper::bpf_probe_read_kernel(
            comm.as_mut_ptr().cast(),
            COMM_LEN as u32,
            (leader as *const u8).add(off[2] as usize).cast(),
        );
    }
    comm
}

/// The row of `map` for `key`, created from `template` on first use.
#[inline(always)]
fn row_of<K, V: Row>(
    map: &HashMap<K, V>,
    template: &PerCpuArray<V>,
    key: &K,
    comm: impl FnOnce() -> [u8; COMM_LEN],
    made: impl FnOnce(),
) -> Option<*mut V> {
    row_from(
        map,
        key,
        || {
            let tmpl = template.get_ptr_mut(0)?;
            unsafe { (*tmpl).start(comm()) };
            Some(tmpl)
        },
        made,
    )
}

/// `map[key]`, or a new row copied from `*new()`: a per-CPU template filled in then (rows too
/// large for the BPF stack), and `made()` run by the one call that made it. None when the map
/// is full. (`made` runs inside: a flag returned past here would split the `--stacks` walk
/// that follows into one verification per value, too much for 6.1's verifier.)
#[inline(always)]
fn row_from<K, V>(
    map: &HashMap<K, V>,
    key: &K,
    new: impl FnOnce() -> Option<*mut V>,
    made: impl FnOnce(),
) -> Option<*mut V> {
    if let Some(row) = map.get_ptr_mut(key) {
        return Some(row);
    }
    // Slow path, once per row. NOEXIST: another CPU may have created the row meanwhile; then
    // use theirs.
    if map
        .insert(key, unsafe { &*new()? }, BPF_NOEXIST as u64)
        .is_ok()
    {
        made();
    }
    map.get_ptr_mut(key)
}

/// Counts a new row of process (tgid, serial) in its `Proc::rows`, so its last exit can move
/// it out: its kind's bit, or one more row it cannot move.
#[inline(always)]
fn count_row(tgid: u32, serial: u32, kind: Option<u32>) {
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

/// Histogram bucket of `ns`, masked so the verifier sees the bound. The volatile read hides the
/// range LLVM already knows, so the mask survives; the verifier cannot follow the log2
/// arithmetic to see the bound itself.
#[inline(always)]
fn bucket(ns: u64) -> usize {
    let b = hist_bucket(ns);
    let b = unsafe { core::ptr::read_volatile(&b) };
    b & (HIST_BUCKETS - 1)
}

/// Off-CPU time inside the call (or inside a userspace grace period, outside its membarrier
/// calls): the thread switching out starts the clock, switching back in stops it. Runs on
/// every context switch: two array loads for tasks outside both.
#[tracepoint]
pub fn sched_switch(ctx: TracePointContext) -> u32 {
    off_cpu(&ctx, true);
    0
}

/// [`sched_switch`] for userspace grace periods only, where fentry on synchronize_rcu measures
/// the membarrier calls' grace period.
#[tracepoint]
pub fn sched_switch_writers(ctx: TracePointContext) -> u32 {
    off_cpu(&ctx, false);
    0
}

#[inline(always)]
fn off_cpu(ctx: &TracePointContext, calls: bool) {
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
    if let Some(next) = marked(record::<u32>(ctx, field::SCHED_SWITCH_NEXT_PID))
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
    let Some(wakee) = inside(record::<u32>(&ctx, field::SCHED_WAKING_PID)) else {
        return 0;
    };
    let key = WakerKey {
        tgid: wakee.tgid,
        serial: wakee.serial,
        cmd: wakee.cmd,
        flags: wakee.flags,
        comm: bpf_get_current_comm().unwrap_or_default(),
    };
    count(&WAKERS, &key, 1);
    0
}

#[inline(always)]
fn ipi_sent(caller: &mut Inflight, cpu: u32) {
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
fn membarrier_func(func: u64) -> bool {
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
    let Some(caller) = inside(current_tid()) else {
        return 0;
    };
    if !membarrier_func(record::<u64>(&ctx, field::CSD_QUEUE_CPU_FUNC)) {
        return 0;
    }
    ipi_sent(caller, record::<u32>(&ctx, field::CSD_QUEUE_CPU_CPU));
    let owner = CallKey {
        tgid: caller.tgid,
        serial: caller.serial,
        cmd: caller.cmd,
        flags: caller.flags,
    };
    if CSD_OWNER
        .insert(&record::<u64>(&ctx, field::CSD_QUEUE_CPU_CSD), &owner, 0)
        .is_err()
    {
        bump(counter::DROPPED_DETAIL);
    }
    0
}

#[tracepoint]
pub fn csd_function_entry(ctx: TracePointContext) -> u32 {
    if !membarrier_func(record::<u64>(&ctx, field::CSD_FUNCTION_ENTRY_FUNC)) {
        return 0;
    }
    let csd = record::<u64>(&ctx, field::CSD_FUNCTION_ENTRY_CSD);
    if CSD_OWNER.get_ptr(&csd).is_none() {
        return 0;
    }
    if let Some(start) = HANDLER_START.get_ptr_mut(0) {
        unsafe { *start = [now(), csd] };
    }
    0
}

#[tracepoint]
pub fn csd_function_exit(ctx: TracePointContext) -> u32 {
    let Some(start) = HANDLER_START.get_ptr_mut(0) else {
        return 0;
    };
    let [since, csd] = unsafe { *start };
    if since == 0 || csd != record::<u64>(&ctx, field::CSD_FUNCTION_EXIT_CSD) {
        return 0;
    }
    unsafe { *start = [0, 0] };
    let ns = now().wrapping_sub(since);
    if let Some(owner) = CSD_OWNER.get_ptr(&csd) {
        let owner = unsafe { *owner };
        // The csd is reused for other cross-CPU calls: it is ours only until it has run.
        let _ = CSD_OWNER.remove(&csd);
        handled(&owner, ns);
    }
    0
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
fn raw_arg(ctx: &FEntryContext, n: usize) -> u64 {
    unsafe { bpf_probe_read_kernel((ctx.as_ptr() as *const u64).add(n)) }.unwrap_or(0)
}

/// Where the targets are: the index of the argument holding them (read only for membarrier's
/// own cross calls, not for every cross call on the box).
enum CrossCall {
    /// A `struct cpumask *`.
    Mask(usize),
    /// A CPU number.
    Single(usize),
}

#[inline(always)]
fn cross_call(ctx: &FEntryContext, func_arg: usize, to: CrossCall) {
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
static MANY_COUNTED: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// The membarrier callbacks themselves, on the target CPU (fentry/fexit): handler time for the
/// round's owner. Used where the csd tracepoints are missing.
#[inline(always)]
fn handler_begin() {
    if let Some(start) = HANDLER_START.get_ptr_mut(0) {
        unsafe { *start = [now(), 0] };
    }
}

#[inline(always)]
fn handler_end() {
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
fn handled(owner: &CallKey, ns: u64) {
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

#[tracepoint]
pub fn contention_begin(_ctx: TracePointContext) -> u32 {
    if let Some(caller) = inside(current_tid()) {
        caller.lock_since_ns = now();
    }
    0
}

#[tracepoint]
pub fn contention_end(_ctx: TracePointContext) -> u32 {
    if let Some(caller) = inside(current_tid())
        && caller.lock_since_ns != 0
    {
        caller.mutex_wait_ns += now().wrapping_sub(caller.lock_since_ns);
        caller.lock_since_ns = 0;
    }
    0
}

/// Where the kernel allows fentry: the grace period measured directly, as time inside
/// synchronize_rcu() / synchronize_rcu_expedited() (an inner call is folded into the outer).
#[inline(always)]
fn gp_begin() {
    if let Some(caller) = inside(current_tid())
        && caller.gp_since_ns == 0
    {
        caller.gp_since_ns = now();
    }
}

#[inline(always)]
fn gp_end() {
    if let Some(caller) = inside(current_tid())
        && caller.gp_since_ns != 0
    {
        caller.blocked_ns += now().wrapping_sub(caller.gp_since_ns);
        caller.gp_since_ns = 0;
    }
}

#[fentry(function = "synchronize_rcu")]
pub fn synchronize_rcu_entry(_ctx: FEntryContext) -> u32 {
    gp_begin();
    0
}

#[fexit(function = "synchronize_rcu")]
pub fn synchronize_rcu_exit(_ctx: FExitContext) -> u32 {
    gp_end();
    0
}

#[fentry(function = "synchronize_rcu_expedited")]
pub fn synchronize_rcu_expedited_entry(_ctx: FEntryContext) -> u32 {
    gp_begin();
    0
}

#[fexit(function = "synchronize_rcu_expedited")]
pub fn synchronize_rcu_expedited_exit(_ctx: FExitContext) -> u32 {
    gp_end();
    0
}

/// A task is created (in its creator's context, before it first runs). A thread is counted in
/// its process's live tasks; a process gets a new serial number, and with a filter, is traced
/// when its creator is and children are followed. Every new process passes here, so an entry
/// left for a dead process with the same pid is overwritten, never inherited.
#[tracepoint]
pub fn task_newtask(ctx: TracePointContext) -> u32 {
    on_new_task(
        record::<u32>(&ctx, field::TASK_NEWTASK_PID),
        record::<u64>(&ctx, field::TASK_NEWTASK_CLONE_FLAGS),
    );
    0
}

/// [`task_newtask`] as a BTF-typed raw tracepoint, where the kernel has one: unlike a classic
/// tracepoint program it is not skipped while a map syscall on its CPU holds
/// `bpf_prog_active` (uncounted before Linux 6.7), so no process goes untracked.
#[btf_tracepoint(function = "task_newtask")]
pub fn task_newtask_btf(ctx: BtfTracePointContext) -> i32 {
    // (task, clone_flags)
    let task: *const u8 = ctx.arg(0);
    let pid_at = unsafe { core::ptr::read_volatile(&TASK_OFFSETS[0]) } as usize;
    let child = unsafe { bpf_probe_read_kernel(task.add(pid_at).cast::<u32>()) }.unwrap_or(0);
    on_new_task(child, ctx.arg(1));
    0
}

#[inline(always)]
fn on_new_task(child: u32, clone_flags: u64) {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if clone_flags & CLONE_THREAD != 0 {
        if let Some(p) = PROCS.get_ptr_mut(&tgid)
            && unsafe { (*p).serial } != 0
        {
            add(unsafe { &mut (*p).tasks }, 1);
        }
        return;
    }
    let traced = if filtering() {
        following() && process(tgid).1
    } else {
        true
    };
    if !traced {
        // Not ours; nor is whatever entry a dead process with this pid left.
        let _ = PROCS.remove(&child);
        return;
    }
    let Some(last) = SERIAL.get_ptr_mut(0) else {
        return;
    };
    // A number no earlier process of this tgid had, whatever the other CPUs do (a plain add,
    // which every kernel has): two processes created at once may read the same value, but they
    // are two tgids; a later one with this tgid was created after this read, and its add came
    // after it. 0 stays "existed before tracing".
    add(unsafe { &mut *last }, 1);
    let serial = (unsafe { core::ptr::read_volatile(last) } as u32).max(1);
    let p = Proc {
        serial,
        tasks: 1,
        traced: 1,
        rows: 0,
    };
    if PROCS.insert(&child, &p, 0).is_err() {
        let _ = PROCS.remove(&child);
        bump(counter::DROPPED_PROCS);
    }
}

/// Sends the calls of thread `tid`, whose slot is about to go, to userspace on `EXITED`, once
/// per thread, not per call. Calls delivered are cleared from the slot: what is left there when
/// the ring had no room is held (see [`hold_thread`]).
#[inline(always)]
fn send_thread(tid: u32, slot: &mut Inflight) {
    if thread_calls(slot) == 0 {
        return; // grace periods only, or no call counted
    }
    let sent = ExitedThread {
        kind: exited_kind::THREAD,
        _pad: 0,
        key: thread_key(tid, slot),
        calls: slot.thread,
    };
    if EXITED.output::<ExitedThread>(&sent, 0).is_ok() {
        slot.thread.calls = [0; THREAD_CMDS];
    }
}

/// The calls a thread's slot holds: straight-line, cheaper for the verifier than a loop that
/// returns early.
#[inline(always)]
fn thread_calls(slot: &Inflight) -> u64 {
    let mut calls = 0u64;
    for n in slot.thread.calls {
        calls += n;
    }
    calls
}

#[inline(always)]
fn thread_key(tid: u32, slot: &Inflight) -> ThreadKey {
    ThreadKey {
        tgid: slot.tgid,
        serial: slot.serial,
        tid,
        _pad: 0,
        born_ns: slot.born_ns,
    }
}

/// Puts the calls still in thread `tid`'s slot (the ring had no room for them, and they were
/// not summed with its process) into THREADS, for the retire pass to drain; an insert only (see
/// `ThreadKey`). Before its process's entry goes, so a process found dead has all its threads
/// in. The slot is looked up again, so no pointer lives across the process's rows' move (6.1's
/// verifier would walk that move once per kind of pointer).
#[inline(always)]
fn hold_thread(tid: u32) {
    let Some(slot) = INFLIGHT.get_ptr(&tid) else {
        return;
    };
    let slot = unsafe { &*slot };
    if thread_calls(slot) != 0
        && THREADS
            .insert(&thread_key(tid, slot), &slot.thread, BPF_NOEXIST as u64)
            .is_err()
    {
        bump(counter::DROPPED_DETAIL);
    }
}

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
fn on_task_exit() {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let tid = pid_tgid as u32;
    // A slot still open at exit: the exit of the thread's last call was skipped (a thread
    // cannot exit inside a syscall), or the thread died inside a userspace grace period. Each
    // open one was counted into INSIDE.
    if let Some(slot) = INFLIGHT.get_ptr_mut(&tid) {
        let slot = unsafe { &mut *slot };
        let (call, gp) = (slot.start_ns != 0, slot.writer.depth != 0);
        if call {
            bump(counter::EXIT_SKIPPED);
        }
        if gp {
            bump(counter::MISSED_WRITERS);
        }
        if breakdown()
            && (call || gp)
            && let Some(n) = inside_counter(tid)
        {
            add32(n, (u32::from(call) + u32::from(gp)).wrapping_neg());
        }
        // The thread's calls go out, named as it exits, before the slot is freed.
        slot.thread.comm = bpf_get_current_comm().unwrap_or_default();
        send_thread(tid, slot);
    }
    // One lookup serves the name and the task count.
    let p = PROCS.get_ptr_mut(&tgid);
    if tid == tgid {
        let (serial, traced) = process_of(p.map(|p| p.cast_const()));
        if traced && let Ok(comm) = bpf_get_current_comm() {
            let _ = EXIT_NAMES.insert(&proc_id(tgid, serial), &comm, 0);
        }
    }
    if let Some(p) = p
        && unsafe { (*p).serial } != 0
        && last_task(p, tgid)
    {
        // Its rows go before its entry: while the entry is there userspace holds the process
        // alive and touches none of its rows, so each row is taken by one side only.
        let (serial, rows) = unsafe { ((*p).serial, (*p).rows) };
        move_rows(tgid, serial, rows, tid);
        hold_thread(tid);
        let _ = INFLIGHT.remove(&tid);
        let _ = PROCS.remove(&tgid);
    } else {
        hold_thread(tid);
        let _ = INFLIGHT.remove(&tid);
    }
}

/// Counts a task of process `p` out; true for its last one, once.
#[cfg(not(no_cmpxchg))]
#[inline(always)]
fn last_task(p: *mut Proc, _tgid: u32) -> bool {
    fetch_add(unsafe { &raw mut (*p).tasks }, u64::MAX) == Some(1)
}

/// Before Linux 5.12 (no fetch-and-add): two tasks counting out at once may both see none
/// left; the one whose claim in `LAST_TASK` goes in first is the last.
#[cfg(no_cmpxchg)]
#[inline(always)]
fn last_task(p: *mut Proc, tgid: u32) -> bool {
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
fn move_rows(tgid: u32, serial: u32, rows: u64, tid: u32) {
    if rows == 0 || stacks() {
        return;
    }
    if rows & !ROW_KINDS != 0 || !moved(tgid, serial, rows, tid) {
        bump(counter::EXITED_KEPT);
    }
}

/// [`move_rows`] for a process whose rows are all of a kind it can find: false when one of them
/// cannot go (the process stays whole); true when sent or summed, or the ring was full
/// (counted).
#[inline(always)]
fn moved(tgid: u32, serial: u32, rows: u64, tid: u32) -> bool {
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
    for bit in 0..36u32 {
        if rows & (1 << bit) == 0 {
            continue;
        }
        let n = unsafe { core::ptr::read_volatile(rows_so_far) } as usize;
        if n >= MOVED_ROWS {
            return false;
        }
        let (cmd, flags, errno) = kind_key(bit);
        let key = StatsKey {
            tgid,
            serial,
            cmd,
            flags,
            errno,
        };
        let Some(row) = STATS.get_ptr(&key) else {
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
    let held = INFLIGHT
        .get_ptr(&tid)
        .map_or(0, |t| thread_calls(unsafe { &*t }));
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
        if let Some(t) = INFLIGHT.get_ptr_mut(&tid) {
            unsafe { (*t).thread.calls = [0; THREAD_CMDS] };
        }
    }
    for bit in 0..36u32 {
        if rows & (1 << bit) != 0 {
            let (cmd, flags, errno) = kind_key(bit);
            let _ = STATS.remove(&StatsKey {
                tgid,
                serial,
                cmd,
                flags,
                errno,
            });
        }
    }
    true
}
/// Adds the row `m` of an exiting one-row process named `comm` to its name's row in `SUMMED`;
/// false, with nothing added, when `SUMMED` is full. Straight-line code for the verifier
/// (6.1's gave up on a loop over rows here, past a million instructions): a burst's processes
/// have one row each; one with more stays whole for the retire pass.
#[inline(always)]
fn sum_by_name(comm: [u8; COMM_LEN], m: &MovedRow) -> bool {
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
