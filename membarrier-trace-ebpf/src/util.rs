//! What every program uses: counters of losses, atomics that every kernel has (and the
//! cmpxchg ones where it has them), map rows made on first use, histogram buckets.

use core::intrinsics::AtomicOrdering::Relaxed;
#[cfg(not(no_cmpxchg))]
use core::intrinsics::atomic_cxchg;
use core::intrinsics::atomic_xadd;

use aya_ebpf::{
    EbpfContext as _,
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::map,
    maps::{HashMap, PerCpuArray},
    programs::TracePointContext,
};
use membarrier_trace_common::{
    COMM_LEN, HIST_BUCKETS, Stats, WriterStats, counter, field, hist_bucket,
};

use crate::config::{FIELDS, TASK_OFFSETS};

#[map]
pub(crate) static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

#[inline(always)]
pub(crate) fn bump(idx: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(idx) {
        unsafe { *c += 1 };
    }
}

#[inline(always)]
pub(crate) fn now() -> u64 {
    unsafe { bpf_ktime_get_ns() }
}

/// The pid (thread id) of the `task_struct` a BTF-typed tracepoint was given, at the offset
/// userspace read from the kernel's BTF.
#[inline(always)]
pub(crate) fn task_pid(task: *const u8) -> u32 {
    let at = unsafe { core::ptr::read_volatile(&TASK_OFFSETS[0]) } as usize;
    unsafe { bpf_probe_read_kernel(task.add(at).cast::<u32>()) }.unwrap_or(0)
}

/// Reads the `u64` at `off` in the tracepoint record: a direct context load, which the verifier
/// allows for tracepoint programs and which costs far less than `bpf_probe_read`.
#[inline(always)]
pub(crate) fn arg(ctx: &TracePointContext, off: usize) -> u64 {
    unsafe { *(ctx.as_ptr() as *const u8).add(off).cast::<u64>() }
}

/// Field `idx` (a `field::*` index) of the tracepoint record, at the offset userspace read from
/// the format file: a direct read for the layouts in `field::KNOWN`, else `bpf_probe_read`.
/// `FIELDS` is constant to the verifier, which removes the branches not taken.
#[inline(always)]
pub(crate) fn record<T: Copy + Default>(ctx: &TracePointContext, idx: usize) -> T {
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
pub(crate) fn add(p: &mut u64, v: u64) {
    unsafe { atomic_xadd::<u64, u64, { Relaxed }>(p, v) };
}

#[inline(always)]
pub(crate) fn add32(p: *mut u32, v: u32) {
    unsafe { atomic_xadd::<u32, u32, { Relaxed }>(p, v) };
}

/// Stores `f(*p)` at `p` and returns the value before, or None after losing 8 races in a row.
/// The object is built for the generic BPF CPU, which has no fetch-and-add or atomic or/and; a
/// 64-bit cmpxchg it has.
#[cfg(not(no_cmpxchg))]
#[inline(always)]
pub(crate) fn fetch_update(p: *mut u64, f: impl Fn(u64) -> u64) -> Option<u64> {
    let mut cur = unsafe { core::ptr::read_volatile(p) };
    for _ in 0..8 {
        let (now, swapped) =
            unsafe { atomic_cxchg::<u64, { Relaxed }, { Relaxed }>(p, cur, f(cur)) };
        if swapped {
            return Some(cur);
        }
        cur = now;
    }
    None
}

/// Adds `v` to `*p` and returns the value before (see [`fetch_update`]).
#[cfg(not(no_cmpxchg))]
#[inline(always)]
pub(crate) fn fetch_add(p: *mut u64, v: u64) -> Option<u64> {
    fetch_update(p, |cur| cur.wrapping_add(v))
}

/// Stores `v` when `better(v, current)`, with a bounded compare-exchange retry (the verifier
/// wants bounded loops; losing 4 races in a row to the same row needs 5 CPUs in it at once).
/// Before Linux 5.12 (the object built with `no_cmpxchg`: that kernel refuses a program holding
/// the instruction anywhere, reached or not), a plain store: two CPUs ending calls of one row
/// at once can leave the lesser of their values (docs/design.md, "Kernels").
#[cfg(no_cmpxchg)]
#[inline(always)]
pub(crate) fn update(p: &mut u64, v: u64, better: impl Fn(u64, u64) -> bool) {
    if better(v, unsafe { core::ptr::read_volatile(p) }) {
        unsafe { core::ptr::write_volatile(p, v) };
    }
}

/// See above.
#[cfg(not(no_cmpxchg))]
#[inline(always)]
pub(crate) fn update(p: &mut u64, v: u64, better: impl Fn(u64, u64) -> bool) {
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
pub(crate) fn count<K>(map: &HashMap<K, u64>, key: &K, v: u64) {
    if !upsert(map, key, || v, |p| add(unsafe { &mut *p }, v)) {
        bump(counter::DROPPED_DETAIL);
    }
}

/// `bump`s `map[key]`, or creates it as `new()` (built only then); false when the map is full.
#[inline(always)]
pub(crate) fn upsert<K, V>(
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
pub(crate) fn current_tid() -> u32 {
    bpf_get_current_pid_tgid() as u32
}

/// A row made on first use from a per-CPU template (too large for the stack), which is never
/// counted into, so its histograms stay zero; counted into one call (or grace period) at a
/// time.
pub(crate) trait Row {
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

/// The row of `map` for `key`, created from `template` on first use.
#[inline(always)]
pub(crate) fn row_of<K, V: Row>(
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
pub(crate) fn row_from<K, V>(
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

/// Histogram bucket of `ns`, masked so the verifier sees the bound. The volatile read hides the
/// range LLVM already knows, so the mask survives; the verifier cannot follow the log2
/// arithmetic to see the bound itself.
#[inline(always)]
pub(crate) fn bucket(ns: u64) -> usize {
    let b = hist_bucket(ns);
    let b = unsafe { core::ptr::read_volatile(&b) };
    b & (HIST_BUCKETS - 1)
}
