//! eBPF programs of membarrier-trace: a module per concern, each with its own maps.
//!
//! - [`hook`]: the syscall hooks (tracepoints, fentry, raw tracepoints) and their floors.
//! - [`call`]: one call, from its thread's in-flight slot at entry to its stats row, keyed by
//!   (tgid, cmd, flags, errno), at exit.
//! - [`thread`]: each thread's in-flight slot, and its calls' way out when it goes.
//! - [`process`]: new processes' serial numbers, and names.
//! - [`exit`]: a task's exit; a process's last takes its rows out of the kernel, sent on a
//!   ring or summed by name.
//! - [`breakdown`]: while a thread is inside membarrier, what it waits for (off-CPU time, IPIs
//!   sent and their handlers' time, mutex wait, the grace period).
//! - [`rcu`]: userspace RCU writers (liburcu's grace-period functions, by uprobe).
//! - [`stacks`]: `--stacks`, unwound in the kernel with the rules userspace learned.
//! - [`config`] holds what userspace sets before load; [`util`] what they all use.
//!
//! Userspace reads the summaries; no per-event data leaves the kernel (stack samples and
//! exited processes' rows excepted, each counted).
#![no_std]
#![no_main]
// The BPF target has no compare-and-swap in core's atomics API (target_has_atomic is off), but
// the instructions exist (BPF_ATOMIC add and cmpxchg): reach them through the intrinsics.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod breakdown;
mod call;
mod config;
mod exit;
mod hook;
mod process;
mod rcu;
mod stacks;
mod thread;
mod util;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
