//! The processes traced: new tasks get a serial number (and, with a filter, are followed), and
//! their names.

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid,
        generated::{self as helper},
    },
    macros::{btf_tracepoint, map, tracepoint},
    maps::{Array, HashMap, LruHashMap},
    programs::{BtfTracePointContext, TracePointContext},
};
use membarrier_trace_common::{
    CLONE_THREAD, COMM_LEN, MAX_EXIT_NAMES, MAX_PROCS, Proc, counter, field,
};

use crate::{
    config::{TASK_OFFSETS, filtering, following},
    util::{add, bump, record, task_pid},
};

/// Processes by tgid: their serial number, live tasks and whether they are traced (see `Proc`).
/// Kept by `task_newtask` and `sched_process_exit`; userspace adds the `--pid`s and the command.
/// Sized by userspace from the machine.
#[map]
pub(crate) static PROCS: HashMap<u32, Proc> = HashMap::with_max_entries(MAX_PROCS, 0);

/// The name of a traced process as its main thread exits, by `proc_id(tgid, serial)`: the name
/// it had last (a rename or exec just before exiting is seen by no snapshot).
#[map]
pub(crate) static EXIT_NAMES: LruHashMap<u64, [u8; COMM_LEN]> =
    LruHashMap::with_max_entries(MAX_EXIT_NAMES, 0);

/// [0]: the last serial number given to a process.
#[map]
pub(crate) static SERIAL: Array<u64> = Array::with_max_entries(1, 0);

/// The process's serial number (0: it existed before tracing) and whether it is traced.
#[inline(always)]
pub(crate) fn process(tgid: u32) -> (u32, bool) {
    process_of(PROCS.get_ptr(&tgid))
}

/// [`process`] of an entry already looked up.
#[inline(always)]
pub(crate) fn process_of(p: Option<*const Proc>) -> (u32, bool) {
    match p {
        Some(p) => unsafe { ((*p).serial, !filtering() || (*p).traced != 0) },
        None => (0, !filtering()),
    }
}

/// The process's name, as `/proc/PID/comm` shows it: its thread-group leader's comm, read as a
/// thread's in-flight slot is made, for the rows it makes (the process may be gone when
/// userspace looks, and the thread has a name of its own). The calling thread's where the
/// offsets are unknown (a constant to the verifier). A failed read leaves zeros: no name, never
/// another's.
#[inline(always)]
pub(crate) fn process_comm() -> [u8; COMM_LEN] {
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
    on_new_task(task_pid(ctx.arg(0)), ctx.arg(1));
    0
}

#[inline(always)]
pub(crate) fn on_new_task(child: u32, clone_flags: u64) {
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
