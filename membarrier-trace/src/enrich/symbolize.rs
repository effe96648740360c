//! Names code addresses in traced processes: grace-period callers and `--stacks` frames, with
//! blazesym (the symbolizer libbpf-tools and bpftrace use) over the file mapped there.
//!
//! An address must be placed while its process lives (its mappings go with it), so a thread
//! does it as soon as the kernel reports it: a new caller (the `CALLERS` ring, sent at a
//! thread's first grace period from it, while that grace period is still under way), or a
//! call's user stack (the `STACK_SAMPLES` ring, sent as the call returns), which the thread
//! also unwinds and counts. A process that exits within milliseconds is named too. The retire
//! pass names what the thread found, and asks it for any live caller still unnamed (its report
//! lost to a full ring).

use std::{
    collections::{HashMap, HashSet},
    os::fd::{AsFd as _, AsRawFd as _},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::JoinHandle,
};

use aya::maps::{MapData, RingBuf};
use membarrier_trace_common::{CallerSeen, StackSample};

use crate::{
    enrich::procmaps::mappings,
    enrich::unwind::{Copied, FrameFile, Unwinder},
    model::{Caller, ProcKey, StackCount, Stacks},
    ring::{read_as, spawn},
};

/// Rules learned from the samples, for the retire pass to give the kernel (`UNWIND`): by
/// process and frame pc, packed (`unwind_rule`).
pub type Learned = Vec<(ProcKey, u64, u64)>;

/// Addresses named so far, by process and address.
pub type Callers = HashMap<(ProcKey, u64), Caller>;

/// Where an address's code is, found while its process lived; `None`: anonymous memory (JIT
/// code), the address is all there is.
type Found = HashMap<(ProcKey, u64), Option<FrameFile>>;

/// Distinct stacks kept at most; a call with a new stack beyond them is counted unattributed.
pub const MAX_STACKS: usize = 65_536;

/// Names addresses: a thread finds where each one is as the kernel reports it (the mappings
/// must be read while the process lives); the retire pass names what it found with blazesym.
pub struct CallerNamer {
    /// Addresses named so far.
    pub named: Callers,
    symbolizer: blazesym::symbolize::Symbolizer,
    found: Arc<Mutex<Found>>,
    /// `--stacks`: the counts, kept by the thread.
    pub stacks: Option<Arc<Mutex<Stacks>>>,
    /// Asks the stacks thread to take in every sample sent so far, and say when it has.
    flushes: Option<mpsc::Sender<mpsc::Sender<()>>>,
    /// `--stacks`: the rules the stacks thread learned since the last [`CallerNamer::learned`].
    learned: Arc<Mutex<Learned>>,
    asks: mpsc::Sender<(ProcKey, u64)>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

/// What the threads read: the rings it waits on.
pub struct Rings {
    pub callers: Option<RingBuf<MapData>>,
    pub stacks: Option<RingBuf<MapData>>,
}

impl CallerNamer {
    /// Starts the thread that reads the rings.
    pub fn start(rings: Rings) -> std::io::Result<Self> {
        let found = Arc::new(Mutex::new(Found::new()));
        let stacks = rings
            .stacks
            .is_some()
            .then(|| Arc::new(Mutex::new(Stacks::default())));
        let stop = Arc::new(AtomicBool::new(false));
        let (asks, asked) = mpsc::channel::<(ProcKey, u64)>();
        let learned = Arc::new(Mutex::new(Learned::new()));
        let reader = || Reader {
            found: found.clone(),
            stacks: stacks.clone(),
            seen: HashSet::new(),
            unwinder: Unwinder::default(),
            learned: learned.clone(),
            taught: HashSet::new(),
        };
        let mut threads = Vec::new();
        if let Some(mut ring) = rings.callers {
            let mut r = reader();
            // The race is with the process's exit, milliseconds away for a short-lived one:
            // the thread wakes on the report. At normal priority: SCHED_FIFO won it on a box
            // whose CPUs were all busy, but a real-time thread on the RT guest and a nice -20
            // one here (the retire pass fell behind 12,000 exiting processes) hurt the rest.
            let fd = ring.as_fd().as_raw_fd();
            threads.push(spawn("callers", stop.clone(), fd, move || {
                let mut n = 0;
                while let Some(item) = ring.next() {
                    n += 1;
                    if let Some(s) = read_as::<CallerSeen>(&item) {
                        drop(item);
                        r.find(((s.tgid, s.serial), s.caller));
                    }
                }
                while let Ok(key) = asked.try_recv() {
                    r.seen.remove(&key);
                    r.find(key);
                }
                n
            })?);
        }
        let mut flushes = None;
        if let Some(mut ring) = rings.stacks {
            let mut r = reader();
            let (tx, flushed) = mpsc::channel::<mpsc::Sender<()>>();
            flushes = Some(tx);
            // Unwinding is steady work, up to the stack rate: at normal priority, beside the
            // traced programs. A process that exits before its stack is read keeps what its
            // first frame and the mappings already known give.
            let fd = ring.as_fd().as_raw_fd();
            threads.push(spawn("stacks", stop.clone(), fd, move || {
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
            })?);
        }
        Ok(Self {
            named: Callers::new(),
            symbolizer: blazesym::symbolize::Symbolizer::new(),
            found,
            stacks,
            flushes,
            learned,
            asks,
            stop,
            threads,
        })
    }

    /// Names the addresses found since the last call.
    pub fn name_found(&mut self) {
        let found = std::mem::take(&mut *self.found.lock().unwrap());
        for (key, f) in found {
            let caller = match f {
                Some(f) => name_frame(&self.symbolizer, key.1, f),
                None => Caller {
                    address: key.1,
                    ..Default::default()
                },
            };
            self.named.insert(key, caller);
        }
    }

    /// Exited processes summed into another entry (`dest`: the entry each dead process's
    /// figures went to): their stacks cannot be summed (each process's addresses are its own),
    /// so their calls join the entry's unattributed ones, and their names are forgotten.
    pub fn retire(&mut self, dest: &HashMap<ProcKey, ProcKey>) {
        let summed = |p: &ProcKey| dest.get(p).is_some_and(|to| to != p);
        if let Some(stacks) = &self.stacks {
            let mut st = stacks.lock().unwrap();
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
        self.named.retain(|(p, _), _| !summed(p));
    }

    /// Waits (up to 2 s) until the stacks thread has taken in every sample sent so far: its
    /// next wakeup, within 100 ms.
    pub fn flush(&self) {
        if let Some(f) = &self.flushes {
            let (tx, rx) = mpsc::channel();
            if f.send(tx).is_ok() {
                let _ = rx.recv_timeout(std::time::Duration::from_secs(2));
            }
        }
    }

    /// The unwinding rules learned since the last call, each once per (process, address).
    pub fn learned(&self) -> Learned {
        std::mem::take(&mut *self.learned.lock().unwrap())
    }

    /// Asks for the caller at `addr` in the live process `p` (found within 100 ms, named at the
    /// next [`CallerNamer::name_found`] after that).
    pub fn ask(&self, p: ProcKey, addr: u64) {
        let _ = self.asks.send((p, addr));
    }
}

impl Drop for CallerNamer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The thread's side.
struct Reader {
    found: Arc<Mutex<Found>>,
    stacks: Option<Arc<Mutex<Stacks>>>,
    /// Addresses already found (bounded: forgotten past a million, costing a second look).
    seen: HashSet<(ProcKey, u64)>,
    unwinder: Unwinder,
    learned: Arc<Mutex<Learned>>,
    /// (process, address) whose rule was learned (bounded like `seen`).
    taught: HashSet<(ProcKey, u64)>,
}

impl Reader {
    /// Finds where the code at return address `key.1` in process `key.0` is.
    fn find(&mut self, key: (ProcKey, u64)) {
        if self.seen.contains(&key) {
            return;
        }
        let Some(maps) = mappings(key.0.0) else {
            return; // gone
        };
        let looked_up = key.1.saturating_sub(1);
        let f = maps
            .iter()
            .find(|m| m.contains(looked_up) && m.path.starts_with('/'))
            .map(|m| FrameFile {
                module: m.module().to_string(),
                file: m.open(key.0.0).map(Arc::new),
                file_offset: looked_up - m.start + m.file_offset,
            });
        self.remember(key, f);
    }

    fn remember(&mut self, key: (ProcKey, u64), f: Option<FrameFile>) {
        if self.seen.len() > 1 << 20 {
            self.seen.clear();
        }
        self.seen.insert(key);
        self.found.lock().unwrap().insert(key, f);
    }

    /// Unwinds and counts one call's stack.
    fn stack(&mut self, bytes: &[u8]) {
        let Some(stacks) = self.stacks.clone() else {
            return;
        };
        let head = std::mem::offset_of!(StackSample, stack);
        let Some(sample) = read_as::<StackHead>(bytes) else {
            return;
        };
        let p = (sample.tgid, sample.serial);
        let group = (p, sample.cmd, sample.flags);
        let len = (sample.len as usize).min(bytes.len().saturating_sub(head));
        if sample.ip == 0 || len < 8 {
            *stacks
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
            if !self.seen.contains(&(p, f.pc)) {
                self.remember((p, f.pc), f.file);
            }
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
        stacks.lock().unwrap().add(group, addrs, &c, MAX_STACKS);
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

/// Names the code at `addr` (a return address: the call is the byte before it) from where it
/// was found, with blazesym.
pub fn name_frame(symbolizer: &blazesym::symbolize::Symbolizer, addr: u64, f: FrameFile) -> Caller {
    use blazesym::symbolize::{Input, Symbolized, source::Elf, source::Source};
    let mut caller = Caller {
        address: addr,
        module: Some(f.module),
        ..Default::default()
    };
    let Some(file) = f.file else {
        return caller;
    };
    let path = format!("/proc/self/fd/{}", file.as_raw_fd());
    let src = Source::Elf(Elf::new(&path));
    let mut sym = symbolizer.symbolize_single(&src, Input::FileOffset(f.file_offset));
    if !matches!(sym, Ok(Symbolized::Sym(_))) {
        // Debug sections it cannot read (libc's are zlib-compressed): the symbol tables alone.
        let src = Source::Elf(Elf {
            debug_syms: false,
            ..Elf::new(&path)
        });
        sym = symbolizer.symbolize_single(&src, Input::FileOffset(f.file_offset));
    }
    if let Ok(Symbolized::Sym(s)) = sym {
        caller.symbol = Some(s.name.to_string());
        caller.offset = Some(s.offset as u64 + 1);
        if let Some(ci) = s.code_info {
            caller.file = Some(ci.to_path().display().to_string());
            caller.line = ci.line;
        }
    }
    caller
}

#[cfg(test)]
mod tests {
    use super::*;

    /// libc is stripped to its dynamic symbols on Debian: `syscall` is still named.
    #[test]
    fn names_a_function_of_a_stripped_library() {
        let maps = mappings(std::process::id()).unwrap();
        let f = libc::syscall as *const () as u64;
        let m = maps.iter().find(|m| m.contains(f)).unwrap();
        let frame = FrameFile {
            module: m.module().to_string(),
            file: m.open(std::process::id()).map(Arc::new),
            file_offset: f + 0x19 - m.start + m.file_offset,
        };
        let c = name_frame(&blazesym::symbolize::Symbolizer::new(), f + 0x1a, frame);
        assert_eq!(c.symbol.as_deref(), Some("syscall"), "{c:?}");
    }
}
