//! Each thread's in-flight slot, which also counts its calls, and the calls' way out when the
//! thread goes: on the `EXITED` ring, else held in `THREADS`.

#[cfg(not(no_cmpxchg))]
use core::intrinsics::{AtomicOrdering::Relaxed, atomic_cxchg};

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    macros::map,
    maps::{Array, HashMap, PerCpuArray, RingBuf},
};
use membarrier_trace_common::{
    EXITED_RING_BYTES, ExitedThread, Inflight, MAX_INFLIGHT, MAX_THREADS, PlacesHeld, THREAD_CMDS,
    TID_SLOT_COUNT, ThreadCalls, ThreadKey, counter, exited_kind,
};

use crate::util::bump;
#[cfg(not(no_cmpxchg))]
use crate::util::fetch_update;

/// The in-flight slots at their threads' places, `tid % TID_SLOT_COUNT`: found with an inlined
/// array load, not a hash lookup, on every enter and exit.
#[map]
pub(crate) static TID_SLOTS: Array<Inflight> = Array::with_max_entries(TID_SLOT_COUNT, 0);

/// A bit per place held (`PlacesHeld`), for userspace to read only those.
#[map]
pub(crate) static PLACES_HELD: Array<PlacesHeld> = Array::with_max_entries(1, 0);

/// The slots of threads whose place another thread holds, keyed by tid.
#[map]
pub(crate) static INFLIGHT: HashMap<u32, Inflight> = HashMap::with_max_entries(MAX_INFLIGHT, 0);

/// A zeroed slot to insert (too large for the stack); never written.
#[map]
pub(crate) static ZERO_SLOT: PerCpuArray<Inflight> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn place(tid: u32) -> Option<*mut Inflight> {
    TID_SLOTS.get_ptr_mut(tid & (TID_SLOT_COUNT - 1))
}

/// Thread `tid`'s place when it holds it. tid 0 (the idle tasks, which the IPI and sched
/// probes see) holds none: free places hold 0.
#[inline(always)]
fn held_place(tid: u32) -> Option<*mut Inflight> {
    place(tid).filter(|&s| tid != 0 && unsafe { (*s).tid } == u64::from(tid))
}

/// Thread `tid`'s slot: at its place, else in `INFLIGHT`.
#[inline(always)]
pub(crate) fn slot(tid: u32) -> Option<*mut Inflight> {
    held_place(tid).or_else(|| INFLIGHT.get_ptr_mut(&tid))
}

/// A zeroed slot for thread `tid`, which has none: its place when free, else in `INFLIGHT`
/// (None when that is full).
#[inline(always)]
pub(crate) fn new_slot(tid: u32) -> Option<*mut Inflight> {
    let zero = ZERO_SLOT.get_ptr(0)?;
    // Before Linux 5.12 (no cmpxchg) every slot is in INFLIGHT.
    #[cfg(not(no_cmpxchg))]
    if crate::config::tid_places()
        && let Some(s) = place(tid)
        && tid != 0
        && unsafe { core::ptr::read_volatile(&(*s).tid) } == 0
        && unsafe {
            atomic_cxchg::<u64, { Relaxed }, { Relaxed }>(&raw mut (*s).tid, 0, tid.into())
        }
        .1
    {
        // Held in PLACES_HELD before use, so userspace finds every slot with calls in it; a
        // bit that cannot be set (8 races lost) gives the place back.
        if mark_held(tid, true) {
            unsafe { clear(s, zero) };
            return Some(s);
        }
        unsafe { core::ptr::write_volatile(&raw mut (*s).tid, 0) };
    }
    INFLIGHT.insert(&tid, unsafe { &*zero }, 0).ok()?;
    INFLIGHT.get_ptr_mut(&tid)
}

/// Sets (`held`) or clears the bit of `tid`'s place in PLACES_HELD; false after losing 8 races
/// in a row.
#[cfg(not(no_cmpxchg))]
#[inline(always)]
fn mark_held(tid: u32, held: bool) -> bool {
    let Some(bits) = PLACES_HELD.get_ptr_mut(0) else {
        return false;
    };
    let at = (tid & (TID_SLOT_COUNT - 1)) as usize;
    // Masked again for the verifier, which does not follow the division.
    let word = unsafe { &raw mut (*bits)[(at / 64) & (TID_SLOT_COUNT as usize / 64 - 1)] };
    let bit = 1u64 << (at % 64);
    fetch_update(word, |cur| if held { cur | bit } else { cur & !bit }).is_some()
}

/// Zeroes slot `s` but its `tid` (the first word), which keeps it claimed meanwhile.
#[inline(always)]
pub(crate) unsafe fn clear(s: *mut Inflight, zero: *const Inflight) {
    const _: () = assert!(core::mem::offset_of!(Inflight, tid) == 0);
    let words = size_of::<Inflight>() / 8 - 1;
    unsafe {
        core::ptr::copy_nonoverlapping(zero.cast::<u64>().add(1), s.cast::<u64>().add(1), words)
    };
}

/// Frees thread `tid`'s slot (its calls already taken out). Its place's bit goes first: a
/// bit left set (8 races lost) only has userspace look at a free place.
#[inline(always)]
pub(crate) fn free_slot(tid: u32) {
    if let Some(s) = held_place(tid) {
        #[cfg(not(no_cmpxchg))]
        mark_held(tid, false);
        unsafe { core::ptr::write_volatile(&raw mut (*s).tid, 0) };
        return;
    }
    let _ = INFLIGHT.remove(&tid);
}

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
    let Some(slot) = self::slot(tid) else {
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
