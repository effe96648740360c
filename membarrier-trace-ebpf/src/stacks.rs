//! `--stacks`: callers' stacks, unwound in the kernel with the rules userspace learned, or
//! sent as samples for userspace to unwind.

use aya_ebpf::{
    bindings::pt_regs,
    helpers::{
        bpf_probe_read_kernel,
        generated::{self as helper, bpf_get_current_task_btf, bpf_task_pt_regs},
    },
    macros::map,
    maps::{Array, HashMap, PerCpuArray, RingBuf},
};
use membarrier_trace_common::{
    KSTACK_FRAMES, KStack, KStackKey, MAX_KSTACKS, STACK_COPY, STACK_RING_BYTES,
    STACK_SAMPLE_EVERY, STACK_SAMPLED, STACK_WINDOW_NS, StackSample, Stats, StatsKey, UNWIND_SLOTS,
    UnwindSlot, proc_id, unwind_rule, unwind_slot,
};

use crate::config::stack_budget;
use crate::util::{add, row_from};

/// `--stacks`: calls' user stacks, for userspace to unwind (sized by userspace: a page without).
#[map]
pub(crate) static STACK_SAMPLES: RingBuf = RingBuf::with_byte_size(STACK_RING_BYTES, 0);

/// `--stacks`, per CPU: [start of the rate window, stacks taken in it, calls over the rate,
/// samples taken over it].
#[map]
pub(crate) static STACK_RATE: PerCpuArray<[u64; 4]> = PerCpuArray::with_max_entries(1, 0);

/// `--stacks`: how to unwind each code address of each process, as userspace learned it from
/// the samples, at `unwind_slot(pc, process)` (sized by userspace: 1 without).
#[map]
pub(crate) static UNWIND: Array<UnwindSlot> = Array::with_max_entries(UNWIND_SLOTS, 0);

/// `--stacks`: calls per stack unwound in the kernel (sized by userspace: 1 without).
#[map]
pub(crate) static KSTACKS: HashMap<KStackKey, KStack> = HashMap::with_max_entries(MAX_KSTACKS, 0);

/// Per CPU, the stack being unwound: a new `KSTACKS` row is inserted from it (too large for
/// the stack).
#[map]
pub(crate) static KSTACK_SCRATCH: PerCpuArray<KStack> = PerCpuArray::with_max_entries(1, 0);

/// Words of user stack the kernel unwinds from: what a sample copies.
pub(crate) const WINDOW_WORDS: usize = STACK_COPY / 8;

/// Per CPU, the user stack being unwound in the kernel, read at once (a helper call per frame
/// cost 270 ns more a call for a 10-frame stack).
#[map]
pub(crate) static STACK_WINDOW: PerCpuArray<Window> = PerCpuArray::with_max_entries(1, 0);

#[repr(C)]
pub(crate) struct Window {
    /// Bytes read into `words`.
    len: u64,
    words: [u64; WINDOW_WORDS],
}

/// `--stacks`: counts the call under its user stack, unwound here when every frame's rule is
/// known (`count_known_stack`), else sends the thread's user registers and the top of its user
/// stack for userspace to unwind (from `.eh_frame`: no frame pointers needed), count under
/// `row`'s key, and learn the rules from. Within the CPU's stack rate every call's stack is
/// taken; beyond it, 1 in `STACK_SAMPLE_EVERY` up to `STACK_SAMPLED` a window, and the others
/// are counted in the row as sampled out.
#[inline(always)]
pub(crate) fn take_stack(row: &mut Stats, key: &StatsKey, end_ns: u64, ns: u64, ra: (u64, u64)) {
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
    let sampled = rate[1] >= stack_budget();
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
///
/// Long: the verifier must see the frame walk as one bounded loop, inlined (a BPF-to-BPF
/// call would cost a frame of the 512-byte stack and reset what the verifier knows).
#[inline(always)]
pub(crate) fn count_known_stack(
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
