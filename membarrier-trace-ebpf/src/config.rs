//! Switches userspace sets before load (read-only data: the verifier prunes what a switch
//! turns off) and the control word that arms the programs.

use aya_ebpf::{macros::map, maps::Array};
use membarrier_trace_common::field;

/// Set by userspace before load: 1 when only the processes marked traced in `PROCS` are. Being
/// in .rodata, the verifier prunes the filter branch entirely when it is 0.
#[unsafe(no_mangle)]
pub(crate) static FILTER_TGIDS: u8 = 0;

/// Set by userspace: 1 when a traced process's children are traced too (`-- COMMAND`).
#[unsafe(no_mangle)]
pub(crate) static FOLLOW_FORKS: u8 = 0;

/// Set by userspace: 1 when the breakdown probes are attached, which need the INSIDE counts.
#[unsafe(no_mangle)]
pub(crate) static BREAKDOWN: u8 = 1;

/// Set by userspace: 1 with `--stacks` (each call's user stack is sent to userspace).
#[unsafe(no_mangle)]
pub(crate) static STACKS: u8 = 0;

/// Set by userspace with `--stacks`: the calls per CPU per `STACK_WINDOW_NS` whose stacks are
/// all taken before sampling starts (`--stack-rate` / 100).
#[unsafe(no_mangle)]
pub(crate) static STACK_BUDGET: u64 = membarrier_trace_common::STACK_BUDGET;

/// Set by userspace: 0 keeps every in-flight slot in `INFLIGHT`, as on kernels before 5.12 (no
/// cmpxchg to claim a place in `TID_SLOTS` with): `MEMBARRIER_TRACE_NO_TID_SLOTS`, the tests'
/// way to that path.
#[unsafe(no_mangle)]
pub(crate) static TID_PLACES: u8 = 1;

/// Addresses of membarrier's IPI callbacks (ipi_mb, ipi_sync_core, ipi_rseq, and
/// registration's ipi_sync_rq_state) from kallsyms, so the csd probes skip every other
/// cross-CPU call with a compare; 0 for one this kernel lacks, all 0 when none is known.
#[unsafe(no_mangle)]
pub(crate) static IPI_FUNCS: [u64; 4] = [0; 4];

/// Offsets in `struct task_struct` of `pid`, `group_leader` and `comm`: set by userspace from
/// the kernel's BTF; all 0 where it has none.
#[unsafe(no_mangle)]
pub(crate) static TASK_OFFSETS: [u32; 3] = [0; 3];

/// Offsets of the breakdown tracepoints' fields, by `field::*` index: set by userspace from the
/// format files.
#[unsafe(no_mangle)]
pub(crate) static FIELDS: [u32; field::COUNT] = field::mainline();

// Offsets in the syscall tracepoints (fixed by the syscall tracepoint ABI: 8-byte args from 16).
pub(crate) const ENTER_CMD_OFF: usize = 16;

pub(crate) const ENTER_FLAGS_OFF: usize = 24;

pub(crate) const EXIT_RET_OFF: usize = 16;

/// [0]: armed. Userspace attaches the enter and exit programs one after the other, then arms
/// them: calls returning in between would otherwise all count as missed (at a million calls a
/// second, hundreds); armed at once, only calls truly under way at that instant are.
#[map]
pub(crate) static CONTROL: Array<u32> = Array::with_max_entries(1, 0);

#[inline(always)]
pub(crate) fn armed() -> bool {
    CONTROL.get(0).is_some_and(|a| *a != 0)
}

#[inline(always)]
pub(crate) fn breakdown() -> bool {
    unsafe { core::ptr::read_volatile(&BREAKDOWN) != 0 }
}

#[cfg(not(no_cmpxchg))]
#[inline(always)]
pub(crate) fn tid_places() -> bool {
    unsafe { core::ptr::read_volatile(&TID_PLACES) != 0 }
}

#[inline(always)]
pub(crate) fn stacks() -> bool {
    unsafe { core::ptr::read_volatile(&STACKS) != 0 }
}

#[inline(always)]
pub(crate) fn stack_budget() -> u64 {
    unsafe { core::ptr::read_volatile(&STACK_BUDGET) }
}

#[inline(always)]
pub(crate) fn filtering() -> bool {
    unsafe { core::ptr::read_volatile(&FILTER_TGIDS) != 0 }
}

#[inline(always)]
pub(crate) fn following() -> bool {
    unsafe { core::ptr::read_volatile(&FOLLOW_FORKS) != 0 }
}
