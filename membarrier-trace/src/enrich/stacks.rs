//! `--stacks` in userspace: a thread takes each call's user stack from the `STACK_SAMPLES` ring
//! as the call returns, unwinds it (`enrich::unwind`, from the code's `.eh_frame`), counts the
//! call under its frames, hands each frame's file to the caller namer (through its
//! [`Finder`]), and keeps the unwinding rules it learned for the kernel (`collect::kstacks`
//! teaches them at the retire pass, so the kernel unwinds those stacks itself from then on).

use std::{
    collections::{HashMap, HashSet},
    os::fd::{AsFd as _, AsRawFd as _},
    sync::{Arc, Mutex, mpsc},
};

use aya::maps::{MapData, RingBuf};
use membarrier_trace_common::StackSample;

use crate::{
    enrich::symbolize::Finder,
    enrich::unwind::{Copied, Unwinder},
    model::{ProcKey, StackCount, Stacks},
    ring::{Readers, read_as},
};

/// Rules learned from the samples, for the retire pass to give the kernel (`UNWIND`): by
/// process and frame pc, packed (`unwind_rule`).
pub type Learned = Vec<(ProcKey, u64, u64)>;

/// Distinct stacks kept at most; a call with a new stack beyond them is counted unattributed.
pub const MAX_STACKS: usize = 65_536;

/// The stacks thread and what it keeps: the counts per stack, and the rules it learned.
pub struct StackCounter {
    /// The calls per (group, frames), and those without a stack.
    pub counts: Arc<Mutex<Stacks>>,
    /// Asks the thread to take in every sample sent so far, and say when it has.
    flushes: mpsc::Sender<mpsc::Sender<()>>,
    /// The rules the thread learned since the last [`StackCounter::learned`].
    learned: Arc<Mutex<Learned>>,
    reader: Readers,
}

impl StackCounter {
    /// Starts the thread on the samples' ring; `finder` places the frames for naming.
    pub fn start(mut ring: RingBuf<MapData>, finder: Finder) -> std::io::Result<Self> {
        let counts = Arc::new(Mutex::new(Stacks::default()));
        let learned = Arc::new(Mutex::new(Learned::new()));
        let mut r = Reader {
            finder,
            counts: counts.clone(),
            unwinder: Unwinder::default(),
            learned: learned.clone(),
            taught: HashSet::new(),
        };
        let (flushes, flushed) = mpsc::channel::<mpsc::Sender<()>>();
        // Unwinding is steady work, up to the stack rate: at normal priority, beside the
        // traced programs. A process that exits before its stack is read keeps what its
        // first frame and the mappings already known give.
        let fd = ring.as_fd().as_raw_fd();
        let mut reader = Readers::default();
        reader.spawn("stacks", fd, move || {
            let mut n = 0;
            while let Some(item) = ring.next() {
                n += 1;
                r.stack(&item);
            }
            while let Ok(done) = flushed.try_recv() {
                while let Some(item) = ring.next() {
                    n += 1;
                    r.stack(&item);
                }
                let _ = done.send(());
            }
            r.unwinder.forget_processes(4096);
            n
        })?;
        Ok(Self {
            counts,
            flushes,
            learned,
            reader,
        })
    }

    /// Waits (up to 2 s) until the thread has taken in every sample sent so far (woken now).
    pub fn flush(&self) {
        let (tx, rx) = mpsc::channel();
        if self.flushes.send(tx).is_ok() {
            self.reader.wake();
            let _ = rx.recv_timeout(std::time::Duration::from_secs(2));
        }
    }

    /// The unwinding rules learned since the last call, each once per (process, address).
    pub fn learned(&self) -> Learned {
        std::mem::take(&mut *self.learned.lock().unwrap())
    }

    /// Exited processes summed into another entry (`dest`: the entry each dead process's
    /// figures went to): their stacks cannot be summed (each process's addresses are its own),
    /// so their calls join the entry's unattributed ones.
    pub fn retire(&self, dest: &HashMap<ProcKey, ProcKey>) {
        let summed = |p: &ProcKey| dest.get(p).is_some_and(|to| to != p);
        let mut st = self.counts.lock().unwrap();
        let gone: Vec<_> = st
            .stacks
            .keys()
            .filter(|((p, ..), _)| summed(p))
            .cloned()
            .collect();
        for key in gone {
            let c = st.stacks.remove(&key).unwrap_or_default();
            let ((p, cmd, flags), _) = key;
            *st.unattributed.entry((dest[&p], cmd, flags)).or_default() += c.exact + c.sampled;
        }
        let gone: Vec<_> = st
            .unattributed
            .keys()
            .filter(|(p, ..)| summed(p))
            .copied()
            .collect();
        for g in gone {
            let n = st.unattributed.remove(&g).unwrap_or(0);
            *st.unattributed.entry((dest[&g.0], g.1, g.2)).or_default() += n;
        }
    }
}

/// The thread's side.
struct Reader {
    finder: Finder,
    counts: Arc<Mutex<Stacks>>,
    unwinder: Unwinder,
    learned: Arc<Mutex<Learned>>,
    /// (process, address) whose rule was learned (bounded: forgotten past a million).
    taught: HashSet<(ProcKey, u64)>,
}

impl Reader {
    /// Unwinds and counts one call's stack.
    fn stack(&mut self, bytes: &[u8]) {
        let head = std::mem::offset_of!(StackSample, stack);
        let Some(sample) = read_as::<StackHead>(bytes) else {
            return;
        };
        let p = (sample.tgid, sample.serial);
        let group = (p, sample.cmd, sample.flags);
        let len = (sample.len as usize).min(bytes.len().saturating_sub(head));
        if sample.ip == 0 || len < 8 {
            *self
                .counts
                .lock()
                .unwrap()
                .unattributed
                .entry(group)
                .or_default() += 1;
            return;
        }
        let copied = Copied {
            ip: sample.ip,
            sp: sample.sp,
            bp: sample.bp,
            stack: &bytes[head..head + len],
            ra_at: sample.ra_at,
            ra: sample.ra,
        };
        let (frames, complete) = self.unwinder.unwind(p, &copied);
        let addrs: Vec<u64> = frames.iter().map(|f| f.pc).collect();
        // What the kernel needs to unwind this stack next time: the rule of every frame it
        // cannot go past without one (a stack stopped short keeps being sent, to be seen here).
        if self.taught.len() > 1 << 20 {
            self.taught.clear();
        }
        let mut learned = Vec::new();
        for f in &frames {
            if let Some(rule) = f.rule.and_then(|r| r.for_kernel())
                && self.taught.insert((p, f.pc))
            {
                learned.push((p, f.pc, rule));
            }
        }
        if !learned.is_empty() {
            self.learned.lock().unwrap().extend(learned);
        }
        for f in frames {
            self.finder.frame((p, f.pc), f.file);
        }
        let (sampled, ns) = (sample.sampled != 0, sample.ns);
        let c = StackCount {
            exact: u64::from(!sampled),
            exact_ns: if sampled { 0 } else { ns },
            sampled: u64::from(sampled),
            sampled_ns: if sampled { ns } else { 0 },
            complete,
            kernel: 0,
        };
        self.counts
            .lock()
            .unwrap()
            .add(group, addrs, &c, MAX_STACKS);
    }
}

/// The head of a [`StackSample`] (before the stack bytes).
#[repr(C)]
#[derive(Clone, Copy)]
struct StackHead {
    tgid: u32,
    serial: u32,
    cmd: u32,
    flags: u32,
    errno: u32,
    sampled: u32,
    ns: u64,
    ip: u64,
    sp: u64,
    bp: u64,
    len: u64,
    ra_at: u64,
    ra: u64,
}

const _: () = assert!(size_of::<StackHead>() == std::mem::offset_of!(StackSample, stack));
