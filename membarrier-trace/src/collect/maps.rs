//! The sizes of the maps that grow with the machine, and the kernel memory they take.

use membarrier_trace_common::{
    EXITED_RING_BYTES, Inflight, KStack, KStackKey, MAX_INFLIGHT, MAX_KSTACKS, MAX_PROCS,
    MAX_STATS, MAX_SUMMED, MAX_THREADS, MAX_WRITERS, Proc, STACK_RING_BYTES, Stats, StatsKey,
    SummedKey, SummedRow, TID_SLOT_COUNT, ThreadCalls, ThreadKey, UNWIND_SLOTS, UnwindSlot,
    WriterKey, WriterStats,
};

use crate::model::Maps;

/// Sizes of the maps that grow with the machine's load (docs/design.md, "Bounds").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    /// Stats rows of live processes (exited ones are moved out): 0.1% of RAM, 1024 to 8192.
    pub stats: u32,
    /// Threads that have called membarrier, alive at once: `kernel.threads-max`, 16384 to
    /// 65536.
    pub inflight: u32,
    /// Processes created while tracing, alive at once: `kernel.pid_max`, 16384 to 65536.
    pub procs: u32,
}

impl MapSizes {
    pub fn new(ram_bytes: u64, threads_max: u64, pid_max: u64) -> Self {
        let row = std::mem::size_of::<Stats>() as u64;
        let clamp = |v: u64, lo: u32, hi: u32| v.clamp(lo.into(), hi.into()) as u32;
        Self {
            stats: clamp(ram_bytes / 1000 / row, MAX_STATS, 8192),
            inflight: clamp(threads_max, MAX_INFLIGHT, 65536),
            procs: clamp(pid_max, MAX_PROCS, 65536),
        }
    }

    pub(super) fn of_this_machine() -> Self {
        let read = |path: &str| {
            std::fs::read_to_string(path)
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        // SAFETY: sysconf has no memory effects.
        let pages = unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) }.max(0) as u64;
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(0) as u64;
        Self::new(
            pages * page,
            read("/proc/sys/kernel/threads-max"),
            read("/proc/sys/kernel/pid_max"),
        )
    }

    /// Kernel memory of these three maps (the stats rows with their keys and free indices), the
    /// in-flight slots at their threads' places (TID_SLOTS, an array), the grace-period rows
    /// (WRITERS) and the exited threads (THREADS), in bytes ([`htab_bytes`]).
    pub fn kernel_bytes(&self, cpus: u64) -> u64 {
        let htab = |max, key, value| htab_bytes(max, key, value, cpus);
        // The rows (ROWS, an array), their keys' indices (STATS), the free indices (FREE_ROWS).
        let stats = u64::from(self.stats);
        htab(self.stats, std::mem::size_of::<StatsKey>(), 4)
            + stats * std::mem::size_of::<Stats>() as u64
            + (stats + 1) * 4
            + htab(self.inflight, 4, std::mem::size_of::<Inflight>())
            + u64::from(TID_SLOT_COUNT) * std::mem::size_of::<Inflight>() as u64
            + htab(self.procs, 4, std::mem::size_of::<Proc>())
            + htab(
                MAX_WRITERS,
                std::mem::size_of::<WriterKey>(),
                std::mem::size_of::<WriterStats>(),
            )
            + htab(
                MAX_THREADS,
                std::mem::size_of::<ThreadKey>(),
                std::mem::size_of::<ThreadCalls>(),
            )
    }

    /// The most kernel memory all the maps take: these five, the rows summed by name
    /// (`SUMMED` and its per-CPU template), and the fixed-size others (detail maps, per-CPU
    /// counters and the row templates): under 4 MiB plus 16 KiB a CPU.
    pub fn kernel_bytes_bound(&self, cpus: u64) -> u64 {
        let summed = htab_bytes(
            MAX_SUMMED,
            size_of::<SummedKey>(),
            size_of::<SummedRow>(),
            cpus,
        ) + cpus * size_of::<SummedRow>() as u64;
        self.kernel_bytes(cpus) + summed + (4 << 20) + cpus * (16 << 10)
    }

    /// With `--stacks`, the samples ring, the unwinding rules and the kernel's stacks add
    /// theirs to the bound; without, the ring of exited processes' rows (`EXITED`).
    pub fn report(&self, cpus: u64, stacks: bool) -> Maps {
        let stacks_bytes = if stacks {
            u64::from(STACK_RING_BYTES)
                + u64::from(UNWIND_SLOTS) * size_of::<UnwindSlot>() as u64
                + 4096
                + htab_bytes(
                    MAX_KSTACKS,
                    size_of::<KStackKey>(),
                    size_of::<KStack>(),
                    cpus,
                )
        } else {
            // The ring's pages, and its header pages.
            u64::from(EXITED_RING_BYTES) + (16 << 10)
        };
        Maps {
            stats_rows: self.stats,
            inflight_slots: self.inflight,
            processes: self.procs,
            kernel_bytes_bound: self.kernel_bytes_bound(cpus) + stacks_bytes,
        }
    }
}

/// Kernel memory of a preallocated hash map (kernel/bpf/hashtab.c, htab_map_mem_usage): per
/// element a 48-byte header plus key and value, each rounded up to 8 bytes, and one spare
/// element per CPU; 16 bytes per bucket, buckets being a power of two at least the elements;
/// under 1 KiB of header and locks.
pub(super) fn htab_bytes(max: u32, key: usize, value: usize, cpus: u64) -> u64 {
    let elem = (48 + key.next_multiple_of(8) + value.next_multiple_of(8)) as u64;
    elem * (u64::from(max) + cpus) + 16 * u64::from(max).next_power_of_two() + 1024
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The figures docs/design.md gives for its development machine.
    #[test]
    fn map_sizes_and_memory_match_the_design_doc() {
        assert_eq!(
            std::mem::size_of::<Stats>(),
            8832,
            "the row size in the doc"
        );
        let s = MapSizes::new(24 << 30, 192_000, 32768);
        assert_eq!(
            s,
            MapSizes {
                stats: 2917,
                inflight: 65536,
                procs: 32768
            }
        );
        // "about 61.7 MiB", "under 67 MiB in all"
        assert_eq!(
            (s.kernel_bytes(2) as f64 / f64::from(1 << 20) * 10.0).round(),
            617.0
        );
        assert_eq!(s.kernel_bytes_bound(2) >> 20, 66);
        // The clamps: a small VM still gets the defaults, a huge box no more than the maxima.
        let small = MapSizes::new(512 << 20, 4000, 4000);
        assert_eq!(
            (small.stats, small.inflight, small.procs),
            (1024, 16384, 16384)
        );
        let huge = MapSizes::new(4 << 40, 4 << 20, 4 << 20);
        assert_eq!(
            (huge.stats, huge.inflight, huge.procs),
            (8192, 65536, 65536)
        );
    }
}
