//! Types shared by the eBPF programs and userspace. Everything here is `#[repr(C)]` and plain
//! data, so both sides agree on the layout of the maps.
#![no_std]

/// Task command name length, as in the kernel (`TASK_COMM_LEN`).
pub const COMM_LEN: usize = 16;

/// Sub-buckets per power of two in the latency histogram, as a shift: 2^4 = 16.
pub const HIST_SUB_BITS: u32 = 4;
/// Sub-buckets per power of two.
pub const HIST_SUB: u64 = 1 << HIST_SUB_BITS;
/// Number of histogram buckets. Bucket `i < 16` holds exactly `i` ns; above that, each power of
/// two is split into 16 equal buckets, up to 2^35 ns (34 s). Larger values land in the last one.
pub const HIST_BUCKETS: usize = 512;
// The eBPF program masks the bucket index with HIST_BUCKETS - 1 for the verifier.
const _: () = assert!(HIST_BUCKETS.is_power_of_two());

/// Latency histogram bucket of `ns`: log-linear, so a bucket is at most 1/16 of its lower bound
/// wide and a percentile read from its middle is within 3.2% of the true value.
#[inline(always)]
pub fn hist_bucket(ns: u64) -> usize {
    if ns < HIST_SUB {
        return ns as usize;
    }
    let exp = log2(ns); // >= HIST_SUB_BITS
    let sub = (ns >> (exp - HIST_SUB_BITS)) & (HIST_SUB - 1);
    let idx = (exp - HIST_SUB_BITS + 1) as u64 * HIST_SUB + sub;
    if idx >= HIST_BUCKETS as u64 {
        HIST_BUCKETS - 1
    } else {
        idx as usize
    }
}

/// floor(log2(x)), 0 for 0. BPF has no count-leading-zeros instruction: LLVM expands
/// `leading_zeros` into about 40 dependent instructions, and the per-call path had two (the
/// latency's bucket, the thread's cmd counter). There, a de Bruijn multiply instead: half the
/// instructions and, unlike a binary search, no branches, which the verifier would follow
/// apart (the process exit program went past its million instructions).
#[inline(always)]
pub fn log2(x: u64) -> u32 {
    #[cfg(target_arch = "bpf")]
    return log2_de_bruijn(x);
    #[cfg(not(target_arch = "bpf"))]
    return 63u32.saturating_sub(x.leading_zeros());
}

/// A multiplier under which the 64 values `2^(b+1) - 1` have distinct top six bits.
const DE_BRUIJN: u64 = 0x03f7_9d71_b4cb_0a89;

/// The bit `b` of each `(2^(b+1) - 1) * DE_BRUIJN >> 58`.
static DE_BRUIJN_BITS: [u8; 64] = {
    let mut t = [0u8; 64];
    let mut b = 0;
    while b < 64 {
        let smeared = if b == 63 {
            u64::MAX
        } else {
            (1u64 << (b + 1)) - 1
        };
        t[(smeared.wrapping_mul(DE_BRUIJN) >> 58) as usize] = b as u8;
        b += 1;
    }
    t
};

/// [`log2`] without the instruction: every bit below the highest set, then the table.
#[inline(always)]
pub fn log2_de_bruijn(mut x: u64) -> u32 {
    x |= x >> 1;
    x |= x >> 2;
    x |= x >> 4;
    x |= x >> 8;
    x |= x >> 16;
    x |= x >> 32;
    DE_BRUIJN_BITS[(x.wrapping_mul(DE_BRUIJN) >> 58) as usize] as u32
}

/// Smallest value that lands in bucket `idx`.
pub fn hist_bucket_lower(idx: usize) -> u64 {
    let idx = idx as u64;
    if idx < HIST_SUB {
        return idx;
    }
    let exp = idx / HIST_SUB + HIST_SUB_BITS as u64 - 1;
    let sub = idx % HIST_SUB;
    (HIST_SUB + sub) << (exp - HIST_SUB_BITS as u64)
}

/// Largest value that lands in bucket `idx` (inclusive). The last bucket is open-ended: its
/// nominal bound is returned, and callers clamp with the observed maximum.
pub fn hist_bucket_upper(idx: usize) -> u64 {
    if idx + 1 >= HIST_BUCKETS {
        return (1u64 << (HIST_BUCKETS as u64 / HIST_SUB + HIST_SUB_BITS as u64 - 1)) - 1;
    }
    hist_bucket_lower(idx + 1) - 1
}

/// Aggregation key: one row per process, cmd, flags and outcome.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
pub struct StatsKey {
    pub tgid: u32,
    /// Which process of that tgid: see [`Proc::serial`].
    pub serial: u32,
    /// The `cmd` argument as the kernel's `int`, kept raw so invalid values are seen too.
    pub cmd: u32,
    pub flags: u32,
    /// 0 when the call succeeded, else the errno it returned.
    pub errno: u32,
}

/// Buckets of the per-call IPI count histogram: bucket `i` = `i` IPIs, the last one = that many
/// or more.
pub const IPI_HIST: usize = 64;

/// Aggregated calls for one [`StatsKey`].
///
/// The `blocked_*` and `ipi_*` histograms only count calls with a non-zero value; userspace
/// puts the rest (`count` minus their total) in bucket 0, which saves the per-call path two
/// atomic adds for the common case.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Stats {
    /// The row's key, as in `STATS`: a thread's cached index (`Inflight::row`) is its row while
    /// this matches; a freed row's has tgid 0.
    pub key: StatsKey,
    /// [`thread_cmd`] of the key's cmd and flags, set when the row is made: the exit counts
    /// the thread's call there without working it out again.
    pub thread_cmd: u32,
    pub count: u64,
    pub sum_ns: u64,
    /// u64::MAX until the first call.
    pub min_ns: u64,
    pub max_ns: u64,
    /// The calling thread's comm when the row was created (the process may be gone by the time
    /// userspace reads /proc).
    pub comm: [u8; COMM_LEN],
    pub hist: [u64; HIST_BUCKETS],
    /// Time off CPU inside the call (or, with fentry, inside synchronize_rcu*).
    pub blocked_sum_ns: u64,
    pub blocked_max_ns: u64,
    pub blocked_hist: [u64; HIST_BUCKETS],
    /// IPIs sent while inside the call.
    pub ipis: u64,
    pub ipi_hist: [u64; IPI_HIST],
    /// Time waiting for contended locks inside the call (the expedited cmds' global mutex).
    pub mutex_wait_sum_ns: u64,
    pub mutex_wait_max_ns: u64,
    /// `--stacks`: calls whose stack was not sent (the samples ring was full).
    pub stacks_unsent: u64,
    /// `--stacks`: calls over the CPU's stack rate whose stack was not taken (1 in
    /// `STACK_SAMPLE_EVERY` is, and stands for the others).
    pub stacks_sampled_out: u64,
}

/// A thread's slot for the call between its enter and exit tracepoints: in `TID_SLOTS` at its
/// tid's place, or, where another thread holds that place, in `INFLIGHT` keyed by tid.
/// `start_ns` is 0 while the thread is not inside membarrier.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Inflight {
    /// In `TID_SLOTS`, the thread holding the slot (0: free), claimed with a 64-bit cmpxchg
    /// (the generic BPF CPU has no 32-bit one). 0 in `INFLIGHT`, whose key is the tid.
    pub tid: u64,
    pub start_ns: u64,
    pub cmd: u32,
    pub flags: u32,
    pub tgid: u32,
    /// The process's [`Proc::serial`], read when the slot was made.
    pub serial: u32,
    pub ipis: u32,
    /// The index in `ROWS` of the stats row this thread counted into last: its next call of
    /// the same key finds its row with an array load, not a `STATS` lookup.
    pub row: u32,
    /// When the thread last left the CPU inside the call (0: on CPU).
    pub off_since_ns: u64,
    pub blocked_ns: u64,
    /// When the thread started waiting for a contended lock (0: not waiting).
    pub lock_since_ns: u64,
    pub mutex_wait_ns: u64,
    /// fentry on synchronize_rcu*: entry time (0: not inside).
    pub gp_since_ns: u64,
    /// The userspace grace period (liburcu's `synchronize_rcu`) the thread is inside, kept
    /// across its membarrier calls.
    pub writer: Writer,
    /// When the slot was made: tells this thread from others that have had its tid.
    pub born_ns: u64,
    /// The thread's calls: counted in the slot the exit already holds, so attributing calls
    /// to threads costs no map lookup.
    pub thread: ThreadCalls,
    /// The process's name when the slot was made (its leader's comm): the name a stats row
    /// this thread makes starts with.
    pub process: [u8; COMM_LEN],
}

/// Per-thread call counters: one per cmd with flags 0 (QUERY .. GET_REGISTRATIONS), one for
/// PRIVATE_EXPEDITED_RSEQ with the CPU flag, one for every other (invalid) cmd and flags.
pub const THREAD_CMDS: usize = 13;

/// The counter of a thread's calls of `cmd` with `flags`: the cmds are 0 and the powers of two
/// up to GET_REGISTRATIONS (512), so the index is the bit's position plus one.
#[inline(always)]
pub fn thread_cmd(cmd: u32, flags: u32) -> usize {
    if flags == 0 && cmd & cmd.wrapping_sub(1) == 0 && cmd <= 512 {
        // log2(2 cmd) = log2(cmd) + 1, and 0 for cmd 0: no branch.
        log2(u64::from(cmd) << 1) as usize
    } else if cmd == 128 && flags == 1 {
        11
    } else {
        12
    }
}

/// Key of `THREADS`: an exited thread of a process. With `born_ns` no two threads share a key,
/// so the kernel only ever inserts: userspace can read an entry, then delete it, and lose
/// nothing added in between.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ThreadKey {
    pub tgid: u32,
    pub serial: u32,
    pub tid: u32,
    pub _pad: u32,
    /// The slot's `born_ns`.
    pub born_ns: u64,
}

/// A thread's calls, by [`thread_cmd`], and its name: in its in-flight slot while it lives
/// (named at its first call), then in `THREADS` (named as it exited).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ThreadCalls {
    pub comm: [u8; COMM_LEN],
    pub calls: [u64; THREAD_CMDS],
}

/// A thread inside a userspace RCU grace-period function (uprobe to uretprobe).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Writer {
    /// Entry time (0: not inside).
    pub start_ns: u64,
    /// The return address at entry: the code that called the function.
    pub caller: u64,
    /// Where `caller` was on the user stack. The uretprobe replaces it there with its trampoline
    /// until the function returns: an unwinder takes `caller` for the word at this address.
    pub ra_at: u64,
    /// Which attached function (the uprobe's cookie; userspace's table).
    pub func: u32,
    /// Nested entries (a grace-period function calling another): only the outermost counts.
    pub depth: u32,
    /// Membarrier calls made inside, and their time.
    pub calls: u64,
    pub membarrier_ns: u64,
    /// Off-CPU time inside, outside membarrier calls: waiting for readers.
    pub blocked_ns: u64,
}

/// Aggregation key of grace periods: per process, thread, function and caller.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
pub struct WriterKey {
    pub tgid: u32,
    pub serial: u32,
    pub tid: u32,
    pub func: u32,
    pub caller: u64,
}

/// A caller to name while its process lives, sent through the `CALLERS` ring at a thread's
/// first grace period from it: userspace reads the process's mappings at once, not at its next
/// retire pass, which a short-lived process may not live to see.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CallerSeen {
    pub tgid: u32,
    pub serial: u32,
    pub caller: u64,
}

/// Bytes of user stack `--stacks` copies per call, from the stack pointer at the syscall: the
/// frames of the code that called membarrier (unwound in userspace from `.eh_frame`).
pub const STACK_COPY: usize = 4096;

/// One call's user stack for `--stacks`: its row, latency, user registers and stack bytes.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct StackSample {
    pub tgid: u32,
    pub serial: u32,
    pub cmd: u32,
    pub flags: u32,
    pub errno: u32,
    /// 1: taken over the CPU's stack rate, standing for the calls sampled out beside it.
    pub sampled: u32,
    pub ns: u64,
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
    /// Bytes of `stack` read (the copy stops short where the stack's mapping ends).
    pub len: u64,
    /// Inside a probed grace-period function: where its return address is on the stack and
    /// what it is (the uretprobe's trampoline is there instead); else 0.
    pub ra_at: u64,
    pub ra: u64,
    pub stack: [u8; STACK_COPY],
}

/// The stack rate per CPU: up to a budget of calls per `STACK_WINDOW_NS` (by default
/// `STACK_BUDGET`, 10,000 a second; `--stack-rate` sets it) have their stacks taken, each one exact; beyond it, 1 in `STACK_SAMPLE_EVERY`, up to
/// `STACK_SAMPLED` more per window (5,000 a second), and none after that: the calls sampled out
/// are counted, and the samples stand for them (docs/design.md, "Stacks"). A short window, so a
/// burst cannot fill the samples ring before sampling starts.
pub const STACK_WINDOW_NS: u64 = 10_000_000;
pub const STACK_BUDGET: u64 = 100;
pub const STACK_SAMPLE_EVERY: u64 = 64;
pub const STACK_SAMPLED: u64 = 50;
/// Bytes of the samples ring with `--stacks` (1,000 samples: 20 windows' worth on 2 CPUs, 3 on
/// 16); a page without.
pub const STACK_RING_BYTES: u32 = 4 << 20;

/// `--stacks` in the kernel: the rules userspace learned from the samples it unwound, by
/// (process, code address), let the kernel unwind a stack whose every frame was seen before and
/// count the call in that stack's row (`KStack`), sending nothing. A stack with a frame it has
/// no rule for, one running past the bytes a sample copies, or one longer than `KSTACK_FRAMES`
/// goes to userspace as a sample (which teaches the kernel its rules).
pub const KSTACK_FRAMES: usize = 32;
/// Slots of the kernel's unwinding rules (with `--stacks`; 1 without): a power of two, 32 bytes
/// each (2 MiB).
pub const UNWIND_SLOTS: u32 = 65_536;
/// Stacks counted in the kernel at most (with `--stacks`; 1 without): past it, calls with a new
/// stack are sent as samples.
pub const MAX_KSTACKS: u32 = 8_192;

/// The rule for one code address of one process, in the `UNWIND` array at
/// [`unwind_slot`]`(pc, proc)`: an array, so the kernel finds it with an inlined load, not a
/// hash-map helper call per frame. `check` ties the words together: a slot read while userspace
/// rewrites it fails [`UnwindSlot::holds`] (a miss), never gives a wrong rule; a zeroed slot
/// holds nothing.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnwindSlot {
    /// The frame's pc: the syscall's return address, then each caller's return address, as
    /// [`StackSample`] frames are unwound in userspace.
    pub pc: u64,
    /// `proc_id(tgid, serial)`.
    pub proc: u64,
    /// [`unwind_rule`]: how to find the caller's frame from this one.
    pub rule: u64,
    pub check: u64,
}

const UNWIND_CHECK: u64 = 0x6d62_7472_6163_6531;

impl UnwindSlot {
    pub const fn new(pc: u64, proc: u64, rule: u64) -> Self {
        Self {
            pc,
            proc,
            rule,
            check: pc ^ proc ^ rule ^ UNWIND_CHECK,
        }
    }

    #[inline(always)]
    pub fn holds(&self, pc: u64, proc: u64) -> bool {
        self.pc == pc && self.proc == proc && self.check == pc ^ proc ^ self.rule ^ UNWIND_CHECK
    }
}

/// Where the rule for (pc, proc) goes in `UNWIND` (two that meet: the second is not kept).
#[inline(always)]
pub const fn unwind_slot(pc: u64, proc: u64) -> u32 {
    ((pc ^ proc.rotate_left(29)).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40) as u32
        & (UNWIND_SLOTS - 1)
}

/// A rule packed in a u64: what `.eh_frame` says at one address. The canonical frame address
/// (CFA: the stack pointer before the call) is `cfa_offset` past the stack pointer or rbp; the
/// return address is at CFA - 8; rbp was saved at CFA + `rbp_at` if saved.
pub mod unwind_rule {
    pub const CFA_FROM_SP: u64 = 0;
    pub const CFA_FROM_RBP: u64 = 1;
    /// The outermost frame (the return address is undefined: `_start`, `clone3`).
    pub const OUTERMOST: u64 = 2;
    const RBP_SAVED: u64 = 1 << 8;

    pub const fn pack(kind: u64, cfa_offset: i16, rbp_at: Option<i16>) -> u64 {
        let saved = match rbp_at {
            Some(at) => RBP_SAVED | (at as u16 as u64) << 32,
            None => 0,
        };
        kind | saved | (cfa_offset as u16 as u64) << 16
    }

    #[inline(always)]
    pub const fn kind(r: u64) -> u64 {
        r & 0xff
    }

    #[inline(always)]
    pub const fn rbp_saved(r: u64) -> bool {
        r & RBP_SAVED != 0
    }

    #[inline(always)]
    pub const fn cfa_offset(r: u64) -> i64 {
        (r >> 16) as u16 as i16 as i64
    }

    #[inline(always)]
    pub const fn rbp_at(r: u64) -> i64 {
        (r >> 32) as u16 as i16 as i64
    }
}

/// A stack counted in the kernel: its row's key and a hash of its frames.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct KStackKey {
    pub tgid: u32,
    pub serial: u32,
    pub cmd: u32,
    pub flags: u32,
    pub hash: u64,
}

/// The calls with one stack, unwound in the kernel; `exact` and `sampled` as in a sample's
/// `sampled`. `pcs[..depth]`: the frames, innermost first.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct KStack {
    pub exact: u64,
    pub exact_ns: u64,
    pub sampled: u64,
    pub sampled_ns: u64,
    pub depth: u32,
    /// 1: the unwinding reached the outermost frame.
    pub complete: u32,
    pub pcs: [u64; KSTACK_FRAMES],
}

/// Bytes of the `CALLERS` ring: 2,730 events of 24 bytes (with the ring's header) between two
/// reads by a thread that waits on it.
pub const CALLER_RING_BYTES: u32 = 64 << 10;

/// Grace periods for one [`WriterKey`].
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct WriterStats {
    pub count: u64,
    pub sum_ns: u64,
    /// u64::MAX until the first.
    pub min_ns: u64,
    pub max_ns: u64,
    pub membarrier_calls: u64,
    pub membarrier_ns: u64,
    pub blocked_ns: u64,
    /// The thread's comm when the row was created.
    pub comm: [u8; COMM_LEN],
    pub hist: [u64; HIST_BUCKETS],
}

/// A process the kernel programs know of, by tgid: one created while tracing (`serial` != 0), or one
/// userspace put in the filter (`--pid`, the `-- COMMAND` process: `serial` 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Proc {
    /// Numbers the processes created while tracing, from 1; 0 for those that existed before.
    /// A pid is only reused after its process is gone and a new one is created, which gets a
    /// new number: so (tgid, serial) names one process for the whole run, and rows of a dead
    /// process are never mixed with those of a later one with the same pid.
    pub serial: u32,
    /// With a pid filter: 1 when traced (a `--pid`, the command, or a child of a traced one).
    pub traced: u32,
    /// Its live tasks (threads), counted for `serial` != 0: the entry is removed when the last
    /// one exits. 64-bit: the BPF CPU targeted has 64-bit cmpxchg only.
    pub tasks: u64,
    /// The stats rows it has, for `serial` != 0: bit [`row_kind`] for each row of a kind the
    /// last exit can find again, plus [`OTHER_ROW`] for each other row (and grace-period
    /// row). Added to once per row, by the CPU whose insert made it.
    pub rows: u64,
}

/// [`Proc::rows`]: one of these per row the kernel cannot move at exit.
pub const OTHER_ROW: u64 = 1 << 40;
/// [`Proc::rows`]: the bits of the rows it can.
pub const ROW_KINDS: u64 = (1 << 36) - 1;
/// The errnos whose rows are moved at exit: 0, EPERM (expedited without registering), EINVAL.
const MOVED_ERRNOS: [u32; 3] = [0, 1, 22];

/// The bit of a stats row (cmd, flags, errno) in [`Proc::rows`], for the kinds the exit can
/// look up again: a cmd with a thread counter ([`thread_cmd`] below 12) and a common errno.
#[inline(always)]
pub fn row_kind(cmd: u32, flags: u32, errno: u32) -> Option<u32> {
    let i = thread_cmd(cmd, flags) as u32;
    let class = match errno {
        0 => 0,
        1 => 1,
        22 => 2,
        _ => return None,
    };
    (i < 12).then_some(class * 12 + i)
}

/// The (cmd, flags, errno) of [`row_kind`] `bit` (below 36): a table load, no branch, so the
/// verifier walks what follows once for a bit it does not know.
#[inline(always)]
pub fn kind_key(bit: u32) -> (u32, u32, u32) {
    KIND_KEYS[bit as usize & 63]
}

/// [`kind_key`] of each bit below 36 (the rest unused).
static KIND_KEYS: [(u32, u32, u32); 64] = {
    let mut t = [(0, 0, 0); 64];
    let mut bit = 0;
    while bit < 36 {
        let (i, class) = (bit % 12, bit / 12);
        let (cmd, flags) = match i {
            0 => (0, 0),
            11 => (128, 1),
            i => (1 << (i - 1), 0),
        };
        t[bit] = (cmd, flags, MOVED_ERRNOS[class]);
        bit += 1;
    }
    t
};

/// Buckets of a moved row's latency histogram: a window of an octave from its fastest call's
/// bucket (a short-lived process's one call, or few within a factor of 2).
pub const MOVED_BUCKETS: usize = 16;
/// Rows an exiting process can move; one with more stays whole for userspace.
pub const MOVED_ROWS: usize = 4;
/// `EXITED`: exited processes' rows and threads' calls on their way to userspace, about 5,000
/// one-call processes (400 B each: 240 for the row, 160 for the thread, with the ring's
/// headers): 0.15 s of a burst at 36,000 a second, while its thread takes them every 5 ms.
/// Userspace maps a ring's pages twice: 8 MiB added 16 MiB to the tracer's RSS.
pub const EXITED_RING_BYTES: u32 = 2 << 20;

/// A stats row moved out of `STATS` by the kernel at its process's last exit, whole: its
/// histogram within the window, and no breakdown histogram (no off-CPU time, no IPI).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MovedRow {
    pub cmd: u32,
    pub flags: u32,
    pub errno: u32,
    /// The bucket `hist[0]` stands for.
    pub first_bucket: u32,
    pub count: u64,
    pub sum_ns: u64,
    pub min_ns: u64,
    pub max_ns: u64,
    pub mutex_wait_sum_ns: u64,
    pub mutex_wait_max_ns: u64,
    pub hist: [u64; MOVED_BUCKETS],
}

/// The first word of each item on `EXITED`: what it is.
pub mod exited_kind {
    /// A [`super::MovedProc`].
    pub const PROC: u32 = 1;
    /// An [`super::ExitedThread`].
    pub const THREAD: u32 = 2;
}

/// An exited process's rows, sent on `EXITED` as it exits (only `rows` of `row` are sent), so a
/// burst of short-lived processes never fills `STATS` waiting for userspace.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MovedProc {
    /// [`exited_kind::PROC`].
    pub kind: u32,
    pub tgid: u32,
    pub serial: u32,
    pub rows: u32,
    pub named_at_exit: u32,
    pub _pad: u32,
    /// Its name at exit where its main thread's exit was seen (`named_at_exit`), else its
    /// leader's name when its first row was made.
    pub comm: [u8; COMM_LEN],
    pub row: [MovedRow; MOVED_ROWS],
}

/// An exited thread's calls, sent on `EXITED` as it exits (`THREADS` when the ring is full),
/// so a burst of short-lived threads or processes never fills `THREADS` waiting for userspace.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ExitedThread {
    /// [`exited_kind::THREAD`].
    pub kind: u32,
    pub _pad: u32,
    pub key: ThreadKey,
    pub calls: ThreadCalls,
}

/// An exited process's row summed under its name in the kernel (`SUMMED`), when `EXITED` was
/// full: its name, then the row's kind.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SummedKey {
    pub comm: [u8; COMM_LEN],
    pub cmd: u32,
    pub flags: u32,
    pub errno: u32,
}

/// The rows of exited processes of one name and kind, summed by the kernel: from the start of
/// tracing, never freed (userspace takes what was added since its last look).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SummedRow {
    /// Processes summed (counted in their first row only).
    pub procs: u64,
    pub count: u64,
    pub sum_ns: u64,
    /// u64::MAX until the first process.
    pub min_ns: u64,
    pub max_ns: u64,
    pub mutex_wait_sum_ns: u64,
    pub mutex_wait_max_ns: u64,
    pub hist: [u64; HIST_BUCKETS],
}

/// Names and kinds `SUMMED` holds: a burst has a few (each about 4 KiB).
pub const MAX_SUMMED: u32 = 128;

/// The bytes of a [`MovedProc`] before its rows.
pub const MOVED_HEADER: usize = core::mem::offset_of!(MovedProc, row);

/// Per (process, cmd, flags) and target CPU: IPIs sent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
pub struct CpuKey {
    pub tgid: u32,
    pub serial: u32,
    pub cmd: u32,
    pub flags: u32,
    pub cpu: u32,
}

/// Per (process, cmd, flags) and the comm of the task that woke the caller inside the call.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
pub struct WakerKey {
    pub tgid: u32,
    pub serial: u32,
    pub cmd: u32,
    pub flags: u32,
    pub comm: [u8; COMM_LEN],
}

/// Who queued an IPI callback (`csd`), so the target's handler time can be charged to them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CallKey {
    pub tgid: u32,
    pub serial: u32,
    pub cmd: u32,
    pub flags: u32,
}

/// Per caller (process, cmd, flags) and victim: the process whose task was running on the
/// target CPU when membarrier's IPI handler ran there, and so paid for it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
pub struct HandlerKey {
    pub tgid: u32,
    pub serial: u32,
    pub cmd: u32,
    pub flags: u32,
    /// The interrupted task's tgid (0: the CPU was idle; [`VICTIMS_OTHER`]: any, once the
    /// map had no room for a row of its own).
    pub victim: u32,
}

/// The victim of a [`HandlerKey`] row holding the handler runs of victims that found the map
/// full, so a caller's handler time stays whole however many processes it interrupts.
pub const VICTIMS_OTHER: u32 = u32::MAX;

/// Handler runs and their time for one [`HandlerKey`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
pub struct Handled {
    pub runs: u64,
    pub ns: u64,
    /// The interrupted task's comm at the row's first run.
    pub comm: [u8; COMM_LEN],
}

impl core::ops::AddAssign for Handled {
    fn add_assign(&mut self, o: Self) {
        self.runs += o.runs;
        self.ns += o.ns;
        if self.comm[0] == 0 {
            self.comm = o.comm;
        }
    }
}

/// Tracepoint record fields the breakdown programs read: indexes into their `FIELDS` array,
/// which userspace fills from each tracepoint's format file before loading (layouts differ:
/// PREEMPT_RT kernels add a field to the common header). The verifier only allows context reads
/// at constant offsets, and sees `FIELDS` (read-only data) as constants: so each layout known
/// here gets a direct read, any other a `bpf_probe_read`, and the verifier drops the branches
/// not taken.
pub mod field {
    pub const SCHED_SWITCH_NEXT_PID: usize = 0;
    pub const SCHED_WAKING_PID: usize = 1;
    pub const CSD_QUEUE_CPU_CPU: usize = 2;
    pub const CSD_QUEUE_CPU_FUNC: usize = 3;
    pub const CSD_QUEUE_CPU_CSD: usize = 4;
    pub const CSD_FUNCTION_ENTRY_FUNC: usize = 5;
    pub const CSD_FUNCTION_ENTRY_CSD: usize = 6;
    pub const CSD_FUNCTION_EXIT_FUNC: usize = 7;
    pub const CSD_FUNCTION_EXIT_CSD: usize = 8;
    pub const TASK_NEWTASK_PID: usize = 9;
    pub const TASK_NEWTASK_CLONE_FLAGS: usize = 10;
    pub const LOCK_CONTENTION_BEGIN_FLAGS: usize = 11;
    pub const COUNT: usize = 12;

    /// Per field, the offsets with a direct read: mainline's, and Debian 12's PREEMPT_RT
    /// (6.1-rt: `common_preempt_lazy_count` makes the header 12 bytes; seen in its format files).
    pub const KNOWN: [[usize; 2]; COUNT] = [
        [56, 64],
        [24, 28],
        [8, 12],
        [24, 32],
        [32, 40],
        [8, 16],
        [16, 24],
        [8, 16],
        [16, 24],
        [8, 12],
        [32, 32],
        [16, 24],
    ];

    /// Mainline's offsets, the default before userspace sets them.
    pub const fn mainline() -> [u32; COUNT] {
        let mut out = [0; COUNT];
        let mut i = 0;
        while i < COUNT {
            out[i] = KNOWN[i][0] as u32;
            i += 1;
        }
        out
    }
}

/// Places in `TID_SLOTS`, the in-flight slots found by `tid % TID_SLOT_COUNT` (an inlined array
/// load, where a hash lookup costs about 40 ns a call: docs/bench.md). A power of two; 16,384
/// places of 280 bytes. A thread whose place is held by another goes to the `INFLIGHT` hash.
pub const TID_SLOT_COUNT: u32 = 16384;

/// `PLACES_HELD`: a bit per place in `TID_SLOTS`, set while a thread holds it, so userspace
/// reads the slots in use (one map read, then one per thread), not all 16,384 at each report.
pub type PlacesHeld = [u64; TID_SLOT_COUNT as usize / 64];

/// Size of the array of "threads inside membarrier" counters, indexed by tid modulo this: the
/// sched, IPI and lock probes, which run for every task on the box, return after one array
/// load unless a thread with that index is inside membarrier.
pub const INSIDE_SLOTS: u32 = 65536;

/// Indices into the per-CPU `COUNTERS` array: what the programs could not account for. Each
/// lost call is counted once, under one cause.
pub mod counter {
    /// Exits of traced processes with no open slot: the enter was not seen (the tracer attached
    /// mid-call, or the enter program was skipped) or got no slot (`DROPPED_INFLIGHT`, counted
    /// there). Missed calls are this minus `DROPPED_INFLIGHT`.
    pub const EXIT_WITHOUT_SLOT: u32 = 0;
    /// The in-flight map was full at enter; the call is lost.
    pub const DROPPED_INFLIGHT: u32 = 1;
    /// The stats map was full at exit; the call is lost.
    pub const DROPPED_STATS: u32 = 2;
    /// The process map was full when a process was created: with a pid filter, a child of a
    /// traced process is not traced; without, its rows are not told apart from an earlier
    /// process with the same pid. Counts processes.
    pub const DROPPED_PROCS: u32 = 3;
    /// A per-CPU IPI, waker, csd or exited-thread row did not fit; those figures are short.
    pub const DROPPED_DETAIL: u32 = 4;
    /// Calls of traced processes whose exit program was skipped (the kernel skips a program
    /// that is already running on the CPU: fentry on PREEMPT_RT, where programs are
    /// preemptible). Found when the thread's slot is still open at its next enter or at its
    /// exit; slots open at the end are counted by userspace.
    pub const EXIT_SKIPPED: u32 = 5;
    /// Grace periods seen only half: a return whose entry was not seen (the tracer attached
    /// mid-call, or the thread had no in-flight slot: counted there), or an entry whose thread
    /// exited before the return.
    pub const MISSED_WRITERS: u32 = 6;
    /// The writers map was full at a grace period's return; it is lost.
    pub const DROPPED_WRITERS: u32 = 7;
    /// The `CALLERS` ring was full: a caller whose process exits before the next retire pass
    /// keeps its raw address.
    pub const CALLERS_UNSENT: u32 = 8;
    /// Not losses: exited processes whose rows the kernel could not move out at their exit and
    /// left whole in `STATS` for userspace's retire pass: the `EXITED` ring was full ...
    pub const EXITED_RING_FULL: u32 = 9;
    /// ... or a row was not of a kind it moves (see `move_rows`).
    pub const EXITED_KEPT: u32 = 10;
    /// Not a loss: of `EXITED_RING_FULL`, one-row processes whose row the kernel summed under
    /// their name in `SUMMED` (the others stayed whole: more rows, or `SUMMED` was full).
    pub const EXITED_SUMMED: u32 = 11;
    /// Stats rows freed whose index `FREE_ROWS` refused (its lock not taken): `ROWS` holds one
    /// row fewer for each until the tracer restarts.
    pub const ROWS_NOT_FREED: u32 = 12;
    pub const COUNT: u32 = 13;
}

/// Default map sizes; userspace sizes STATS, INFLIGHT and PROCS from the machine at load
/// (docs/design.md, "Bounds").
pub const MAX_STATS: u32 = 1024;
pub const MAX_CPU_ROWS: u32 = 8192;
pub const MAX_WAKERS: u32 = 4096;
pub const MAX_CSDS: u32 = 4096;
pub const MAX_INFLIGHT: u32 = 16384;
pub const MAX_PROCS: u32 = 16384;
/// Names of processes whose main thread exited lately (an LRU: userspace reads them within a
/// retire pass, 250 ms; an entry evicted before that costs only the rename, not a call).
pub const MAX_EXIT_NAMES: u32 = 4096;
/// Grace-period rows (per process, thread, function and caller).
pub const MAX_WRITERS: u32 = 1024;
/// Exited threads' calls, until userspace's next retire pass (every 250 ms, 50 ms when busy)
/// drains them.
pub const MAX_THREADS: u32 = 16384;

/// The key of `EXIT_NAMES`: `tgid << 32 | serial`.
pub const fn proc_id(tgid: u32, serial: u32) -> u64 {
    (tgid as u64) << 32 | serial as u64
}

/// `CLONE_THREAD` (linux/sched.h): the new task is a thread of its creator's process.
pub const CLONE_THREAD: u64 = 0x0001_0000;

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain #[repr(C)] data with no padding-sensitive invariants.
    unsafe impl aya::Pod for super::StatsKey {}
    unsafe impl aya::Pod for super::Stats {}
    unsafe impl aya::Pod for super::Inflight {}
    unsafe impl aya::Pod for super::CpuKey {}
    unsafe impl aya::Pod for super::WakerKey {}
    unsafe impl aya::Pod for super::CallKey {}
    unsafe impl aya::Pod for super::HandlerKey {}
    unsafe impl aya::Pod for super::Handled {}
    unsafe impl aya::Pod for super::Proc {}
    unsafe impl aya::Pod for super::WriterKey {}
    unsafe impl aya::Pod for super::WriterStats {}
    unsafe impl aya::Pod for super::ThreadKey {}
    unsafe impl aya::Pod for super::ThreadCalls {}
    unsafe impl aya::Pod for super::UnwindSlot {}
    unsafe impl aya::Pod for super::KStackKey {}
    unsafe impl aya::Pod for super::KStack {}
    unsafe impl aya::Pod for super::MovedProc {}
    unsafe impl aya::Pod for super::ExitedThread {}
    unsafe impl aya::Pod for super::SummedKey {}
    unsafe impl aya::Pod for super::SummedRow {}
}

#[cfg(feature = "user")]
impl SummedRow {
    /// What was added since `seen`, an earlier read of this row (each word only grows; min and
    /// max as now).
    pub fn since(&self, seen: &Self) -> Self {
        let mut hist = self.hist;
        for (h, s) in hist.iter_mut().zip(&seen.hist) {
            *h = h.saturating_sub(*s);
        }
        Self {
            procs: self.procs.saturating_sub(seen.procs),
            count: self.count.saturating_sub(seen.count),
            sum_ns: self.sum_ns.saturating_sub(seen.sum_ns),
            mutex_wait_sum_ns: self
                .mutex_wait_sum_ns
                .saturating_sub(seen.mutex_wait_sum_ns),
            hist,
            ..*self
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The de Bruijn multiply (the eBPF programs') agrees with the instruction (userspace's),
    /// at and around every power of two; and so the cmd counters are unchanged.
    #[test]
    fn log2_is_leading_zeros() {
        assert_eq!((log2(0), log2_de_bruijn(0)), (0, 0));
        let mut seen = [false; 64];
        for b in 0..64 {
            let p = 1u64 << b;
            for x in [
                p,
                p - 1,
                p + 1,
                p | (p >> 1),
                p.wrapping_mul(3) | 1,
                u64::MAX >> (63 - b),
            ] {
                if x != 0 {
                    assert_eq!(log2(x), 63 - x.leading_zeros(), "{x}");
                    assert_eq!(log2_de_bruijn(x), log2(x), "{x}");
                }
            }
            seen[DE_BRUIJN_BITS[b] as usize] = true;
        }
        assert!(seen.iter().all(|&s| s), "the table is a permutation");
        for cmd in 0..=1100u32 {
            let old = |flags| {
                if flags == 0 && cmd & cmd.wrapping_sub(1) == 0 && cmd <= 512 {
                    (32 - cmd.leading_zeros()) as usize
                } else if cmd == 128 && flags == 1 {
                    11
                } else {
                    12
                }
            };
            assert_eq!(thread_cmd(cmd, 0), old(0), "{cmd}");
            assert_eq!(thread_cmd(cmd, 1), old(1), "{cmd}");
        }
    }

    /// Every row kind the exit moves is found again from its bit; others have none.
    #[test]
    fn row_kinds_round_trip() {
        for bit in 0..36 {
            let (cmd, flags, errno) = kind_key(bit);
            assert_eq!(row_kind(cmd, flags, errno), Some(bit), "bit {bit}");
            assert!(ROW_KINDS & (1 << bit) != 0);
        }
        assert_eq!(row_kind(3, 0, 0), None, "an invalid cmd");
        assert_eq!(row_kind(8, 1, 22), None, "invalid flags");
        assert_eq!(row_kind(8, 0, 4), None, "EINTR");
        assert_eq!(ROW_KINDS & OTHER_ROW, 0);
        assert_eq!(MOVED_HEADER, 40);
        assert_eq!(size_of::<ExitedThread>(), 152);
    }
}
