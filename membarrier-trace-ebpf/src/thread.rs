//! Each thread's in-flight slot, which also counts its calls, and the calls' way out when the
//! thread goes: on the `EXITED` ring, else held in `THREADS`.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    macros::map,
    maps::{HashMap, PerCpuArray, RingBuf},
};
use membarrier_trace_common::{
    EXITED_RING_BYTES, ExitedThread, Inflight, MAX_INFLIGHT, MAX_THREADS, THREAD_CMDS, ThreadCalls,
    ThreadKey, counter, exited_kind,
};

use crate::util::bump;

#[map]
pub(crate) static INFLIGHT: HashMap<u32, Inflight> = HashMap::with_max_entries(MAX_INFLIGHT, 0);

/// A zeroed slot to insert (too large for the stack); never written.
#[map]
pub(crate) static ZERO_SLOT: PerCpuArray<Inflight> = PerCpuArray::with_max_entries(1, 0);

/// Exited threads' calls (from their slots), until userspace drains them.
#[map]
pub(crate) static THREADS: HashMap<ThreadKey, ThreadCalls> =
    HashMap::with_max_entries(MAX_THREADS, 0);

/// Exited processes' rows and exited threads' calls on their way to userspace (see
/// `move_rows`, `send_thread`; a page with `--stacks`, where no rows are moved).
#[map]
pub(crate) static EXITED: RingBuf = RingBuf::with_byte_size(EXITED_RING_BYTES, 0);

/// Sends the calls of thread `tid`, whose slot is about to go, to userspace on `EXITED`, once
/// per thread, not per call. Calls delivered are cleared from the slot: what is left there when
/// the ring had no room is held (see [`hold_thread`]).
#[inline(always)]
pub(crate) fn send_thread(tid: u32, slot: &mut Inflight) {
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
pub(crate) fn thread_calls(slot: &Inflight) -> u64 {
    let mut calls = 0u64;
    for n in slot.thread.calls {
        calls += n;
    }
    calls
}

#[inline(always)]
pub(crate) fn thread_key(tid: u32, slot: &Inflight) -> ThreadKey {
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
pub(crate) fn hold_thread(tid: u32) {
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
