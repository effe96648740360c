//! `--stacks`: unwinds the user stacks the kernel copies at each membarrier call, from the
//! mapped files' `.eh_frame` call-frame information (what the compiler emits for exceptions,
//! present whether or not the code keeps frame pointers), falling back to frame pointers for
//! code without it.

use std::{
    collections::HashMap,
    fs::File,
    io::Read as _,
    sync::Arc,
    time::{Duration, Instant},
};

use gimli::{
    BaseAddresses, CfaRule, EhFrame, EhFrameHdr, LittleEndian, RegisterRule, UnwindContext,
    UnwindSection as _, X86_64,
};
use object::{Object as _, ObjectSection as _, ObjectSegment as _};

use membarrier_trace_common::unwind_rule;

use crate::{
    enrich::procmaps::{Mapping, mappings},
    model::ProcKey,
};

/// Mapped files whose call-frame information is kept at most.
const MAX_FILES: usize = 256;

/// Frames unwound at most (the caller's first).
pub const MAX_FRAMES: usize = 64;

/// How to find the caller's frame at one address: the canonical frame address (the stack
/// pointer before the call) from the stack pointer or rbp, and where rbp was saved.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Rule {
    Frame {
        cfa_from_rbp: bool,
        cfa_offset: i64,
        /// rbp was saved at CFA + this.
        rbp_at: Option<i64>,
    },
    /// The outermost frame (the return address is undefined: `_start`, `clone`).
    Outermost,
}

/// With frame pointers: CFA = rbp + 16, the return address at CFA - 8, the caller's rbp at
/// CFA - 16.
const FRAME_POINTER: Rule = Rule::Frame {
    cfa_from_rbp: true,
    cfa_offset: 16,
    rbp_at: Some(-16),
};

/// A mapped file's call-frame information.
struct Cfi {
    data: Vec<u8>,
    /// The file, held open for naming frames after the process exits.
    file: Arc<File>,
    eh_frame: Option<(u64, std::ops::Range<usize>)>,
    eh_frame_hdr: Option<(u64, std::ops::Range<usize>)>,
    text: u64,
    /// PT_LOAD segments: (file offset, file size, virtual address).
    loads: Vec<(u64, u64, u64)>,
}

impl Cfi {
    fn load(mut file: File) -> Option<Cfi> {
        let mut data = Vec::new();
        file.read_to_end(&mut data).ok()?;
        let elf = object::File::parse(&*data).ok()?;
        let section = |name: &str| {
            let s = elf.section_by_name(name)?;
            let (off, size) = s.file_range()?;
            Some((s.address(), off as usize..(off + size) as usize))
        };
        let (eh_frame, eh_frame_hdr) = (section(".eh_frame"), section(".eh_frame_hdr"));
        let text = elf.section_by_name(".text").map_or(0, |s| s.address());
        let loads = elf
            .segments()
            .map(|s| {
                let (off, size) = s.file_range();
                (off, size, s.address())
            })
            .collect();
        Some(Cfi {
            data,
            file: Arc::new(file),
            eh_frame,
            eh_frame_hdr,
            text,
            loads,
        })
    }

    /// The ELF virtual address at file offset `off`.
    fn vaddr(&self, off: u64) -> Option<u64> {
        self.loads
            .iter()
            .find(|&&(o, size, _)| (o..o + size).contains(&off))
            .map(|&(o, _, vaddr)| off - o + vaddr)
    }

    /// The rule at virtual address `addr`; `None` where the file has no CFI for it, or one
    /// this unwinder does not follow (a CFA expression: PLT stubs, signal frames).
    fn rule(&self, addr: u64) -> Option<Rule> {
        let (eh_addr, range) = self.eh_frame.clone()?;
        let eh_frame = EhFrame::new(&self.data[range], LittleEndian);
        let mut bases = BaseAddresses::default()
            .set_eh_frame(eh_addr)
            .set_text(self.text);
        let mut ctx = UnwindContext::new();
        let row = match &self.eh_frame_hdr {
            Some((hdr_addr, range)) => {
                bases = bases.set_eh_frame_hdr(*hdr_addr);
                let hdr = EhFrameHdr::new(&self.data[range.clone()], LittleEndian)
                    .parse(&bases, 8)
                    .ok()?;
                hdr.table()?
                    .unwind_info_for_address(
                        &eh_frame,
                        &bases,
                        &mut ctx,
                        addr,
                        EhFrame::cie_from_offset,
                    )
                    .ok()?
                    .clone()
            }
            None => eh_frame
                .unwind_info_for_address(&bases, &mut ctx, addr, EhFrame::cie_from_offset)
                .ok()?
                .clone(),
        };
        match row.register(X86_64::RA) {
            Some(RegisterRule::Undefined) => return Some(Rule::Outermost),
            Some(RegisterRule::Offset(-8)) => {}
            _ => return None,
        }
        let (cfa_from_rbp, cfa_offset) = match *row.cfa() {
            CfaRule::RegisterAndOffset { register, offset } if register == X86_64::RSP => {
                (false, offset)
            }
            CfaRule::RegisterAndOffset { register, offset } if register == X86_64::RBP => {
                (true, offset)
            }
            _ => return None,
        };
        let rbp_at = match row.register(X86_64::RBP) {
            Some(RegisterRule::Offset(o)) => Some(o),
            None | Some(RegisterRule::Undefined | RegisterRule::SameValue) => None,
            _ => return None,
        };
        Some(Rule::Frame {
            cfa_from_rbp,
            cfa_offset,
            rbp_at,
        })
    }
}

/// One unwound frame.
pub struct Frame {
    /// The return address (the syscall's instruction pointer for the innermost).
    pub pc: u64,
    pub file: Option<FrameFile>,
    /// How the caller's frame was found from this one: `None` where the unwinding stopped.
    pub rule: Option<Rule>,
}

impl Rule {
    /// The rule as the kernel unwinds with it (`unwind_rule`); `None` for offsets past an i16
    /// (frames over 32 KiB), which the kernel then never unwinds.
    pub fn for_kernel(self) -> Option<u64> {
        Some(match self {
            Rule::Outermost => unwind_rule::pack(unwind_rule::OUTERMOST, 0, None),
            Rule::Frame {
                cfa_from_rbp,
                cfa_offset,
                rbp_at,
            } => unwind_rule::pack(
                if cfa_from_rbp {
                    unwind_rule::CFA_FROM_RBP
                } else {
                    unwind_rule::CFA_FROM_SP
                },
                i16::try_from(cfa_offset).ok()?,
                rbp_at.map(i16::try_from).transpose().ok()?,
            ),
        })
    }
}

/// Where a frame's code is: enough to name it after the process exits.
#[derive(Clone)]
pub struct FrameFile {
    pub module: String,
    pub file: Option<Arc<File>>,
    pub file_offset: u64,
}

/// A user stack as copied by the kernel.
pub struct Copied<'a> {
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
    pub stack: &'a [u8],
    /// A return address the stack does not hold (0: none): inside a probed grace-period
    /// function, its uretprobe's trampoline is at `ra_at`, and `ra` was there before.
    pub ra_at: u64,
    pub ra: u64,
}

impl Copied<'_> {
    fn read(&self, addr: u64) -> Option<u64> {
        let off = usize::try_from(addr.checked_sub(self.sp)?).ok()?;
        let b = self.stack.get(off..off + 8)?;
        if addr == self.ra_at {
            return Some(self.ra);
        }
        Some(u64::from_le_bytes(b.try_into().ok()?))
    }
}

/// Unwinds stacks, caching each process's mappings and each file's rules.
#[derive(Default)]
pub struct Unwinder {
    /// Each process's mappings, and when they were read.
    maps: HashMap<ProcKey, (Instant, Vec<Mapping>)>,
    /// By (device, inode) of the mapped file; `None` when it cannot be read.
    files: HashMap<(String, u64), Option<Arc<Cfi>>>,
    rules: HashMap<((String, u64), u64), Option<Rule>>,
}

impl Unwinder {
    /// Forgets what it knows of processes, when it holds more than `max` (they exit), and of
    /// files and rules past their bounds.
    pub fn forget_processes(&mut self, max: usize) {
        if self.maps.len() > max {
            self.maps.clear();
        }
        // Each file is held whole in memory: a box that runs many binaries over days must not
        // keep them all (read again when next met).
        if self.rules.len() > 1 << 20 || self.files.len() > MAX_FILES {
            self.rules.clear();
            self.files.clear();
        }
    }

    /// The mapping of `addr` in process `p`, its mappings read again when it is not in those
    /// known (a library loaded since); `None` when it is in none (or the process is gone).
    fn mapping(&mut self, p: ProcKey, addr: u64) -> Option<&Mapping> {
        // Read again at most once a second: an address in no mapping (garbage past a frame
        // this unwinder got wrong, or unmapped since) must not cost a read per sample.
        let stale = match self.maps.get(&p) {
            Some((at, m)) => {
                !m.iter().any(|m| m.contains(addr)) && at.elapsed() >= Duration::from_secs(1)
            }
            None => true,
        };
        if stale {
            self.maps
                .insert(p, (Instant::now(), mappings(p.0).unwrap_or_default()));
        }
        self.maps.get(&p)?.1.iter().find(|m| m.contains(addr))
    }

    fn cfi(&mut self, p: ProcKey, m: &Mapping) -> Option<Arc<Cfi>> {
        let id = m.file_id();
        if let Some(c) = self.files.get(&id) {
            return c.clone();
        }
        let cfi = m.open(p.0).and_then(Cfi::load).map(Arc::new);
        self.files.insert(id, cfi.clone());
        cfi
    }

    /// The rule at `addr` (the byte looked up: a return address minus one) in process `p`,
    /// and where its code is.
    fn rule(&mut self, p: ProcKey, addr: u64) -> (Option<Rule>, Option<FrameFile>) {
        let Some(m) = self.mapping(p, addr).cloned() else {
            return (None, None);
        };
        if !m.path.starts_with('/') {
            return (None, None);
        }
        let Some(cfi) = self.cfi(p, &m) else {
            return (None, None);
        };
        let off = addr - m.start + m.file_offset;
        let frame = FrameFile {
            module: m.module().to_string(),
            file: Some(cfi.file.clone()),
            file_offset: off,
        };
        let Some(vaddr) = cfi.vaddr(off) else {
            return (None, Some(frame));
        };
        let rule = *self
            .rules
            .entry((m.file_id(), vaddr))
            .or_insert_with(|| cfi.rule(vaddr));
        (rule, Some(frame))
    }

    /// The return addresses of `s` in process `p`, innermost (the syscall's own instruction
    /// pointer) first, each with where its code is (for naming) and the rule it was unwound
    /// with (for the kernel to unwind it next time); and whether the unwinding reached the
    /// outermost frame.
    pub fn unwind(&mut self, p: ProcKey, s: &Copied) -> (Vec<Frame>, bool) {
        let mut frames = Vec::new();
        let (mut pc, mut sp, mut bp) = (s.ip, s.sp, s.bp);
        for depth in 0..MAX_FRAMES {
            // A return address is just past its call: the call instruction is the byte before.
            let looked_up = if depth == 0 { pc } else { pc.saturating_sub(1) };
            let (rule, file) = self.rule(p, looked_up);
            // No CFI: frame pointers, if rbp points into the copied stack.
            let rule = rule.or_else(|| (bp > sp && s.read(bp).is_some()).then_some(FRAME_POINTER));
            frames.push(Frame { pc, file, rule });
            let Some(Rule::Frame {
                cfa_from_rbp,
                cfa_offset,
                rbp_at,
            }) = rule
            else {
                // The outermost frame (complete), or code it cannot unwind (stopped short).
                return (frames, rule.is_some());
            };
            let cfa = (if cfa_from_rbp { bp } else { sp }).wrapping_add_signed(cfa_offset);
            let Some(ra) = s.read(cfa.wrapping_sub(8)) else {
                return (frames, false);
            };
            if let Some(at) = rbp_at {
                match s.read(cfa.wrapping_add_signed(at)) {
                    Some(v) => bp = v,
                    None => return (frames, false),
                }
            }
            // The stack grows down: a caller's frame is above. Anything else is garbage.
            if ra == 0 || cfa <= sp {
                return (frames, ra == 0);
            }
            sp = cfa;
            pc = ra;
        }
        (frames, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_for_the_kernel() {
        use unwind_rule::*;
        let fp = FRAME_POINTER.for_kernel().unwrap();
        assert_eq!(
            (kind(fp), cfa_offset(fp), rbp_saved(fp), rbp_at(fp)),
            (CFA_FROM_RBP, 16, true, -16)
        );
        let leaf = Rule::Frame {
            cfa_from_rbp: false,
            cfa_offset: 8,
            rbp_at: None,
        }
        .for_kernel()
        .unwrap();
        assert_eq!(
            (kind(leaf), cfa_offset(leaf), rbp_saved(leaf)),
            (CFA_FROM_SP, 8, false)
        );
        assert_eq!(Rule::Outermost.for_kernel().map(kind), Some(OUTERMOST));
        // An offset the kernel's rule cannot hold: no rule, the stack stays userspace's.
        let huge = Rule::Frame {
            cfa_from_rbp: false,
            cfa_offset: 1 << 20,
            rbp_at: None,
        };
        assert_eq!(huge.for_kernel(), None);
    }

    /// Unwinds this test's own stack, copied as the kernel would, with this binary's
    /// `.eh_frame` (a release build: no frame pointers): the frames are this function's
    /// callers, found by name.
    #[test]
    #[inline(never)]
    fn unwinds_its_own_stack_from_eh_frame() {
        let (ip, sp, bp): (u64, u64, u64);
        let mut stack = vec![0u8; 64 << 10];
        // SAFETY: reads three registers; then copies the live stack above sp, which this
        // thread owns, stopping before the end of its mapping.
        unsafe {
            std::arch::asm!("lea {ip}, [rip]", "mov {sp}, rsp", "mov {bp}, rbp",
                ip = out(reg) ip, sp = out(reg) sp, bp = out(reg) bp);
        }
        let me = std::process::id();
        // The top of this thread's own stack. Not the end of the mapping that holds sp: the
        // kernel merges neighbouring anonymous mappings, so that can run on into another test
        // thread's stack, which that thread unmaps as it ends (a copy that raced with it
        // crashed the test binary once in about 40 runs).
        // SAFETY: attr is initialised by pthread_getattr_np before it is read, then destroyed.
        let end = unsafe {
            let mut attr: libc::pthread_attr_t = std::mem::zeroed();
            assert_eq!(libc::pthread_getattr_np(libc::pthread_self(), &mut attr), 0);
            let (mut addr, mut size) = (std::ptr::null_mut(), 0);
            assert_eq!(libc::pthread_attr_getstack(&attr, &mut addr, &mut size), 0);
            libc::pthread_attr_destroy(&mut attr);
            addr as u64 + size as u64
        };
        let mapped = mappings(me)
            .unwrap()
            .into_iter()
            .find(|m| m.contains(sp))
            .unwrap()
            .end;
        let len = stack.len().min((end.min(mapped) - sp) as usize);
        // SAFETY: [sp, sp + len) is inside this thread's own stack.
        unsafe { std::ptr::copy_nonoverlapping(sp as *const u8, stack.as_mut_ptr(), len) };
        let copied = Copied {
            ip,
            sp,
            bp,
            stack: &stack[..len],
            ra_at: 0,
            ra: 0,
        };
        let (frames, _) = Unwinder::default().unwind((me, 0), &copied);
        assert!(frames.len() >= 3, "{} frames", frames.len());
        let mut symbols = crate::enrich::symbolize::Symbols::new(&[]);
        let names: Vec<String> = frames
            .iter()
            .filter_map(|f| symbols.name(f.pc, f.file.clone()?).symbol)
            .collect();
        assert!(
            names.iter().any(|n| n.contains("unwinds_its_own_stack")),
            "{names:?}"
        );
        // The test harness's frames above it: the unwinding went past this function.
        assert!(
            names
                .iter()
                .any(|n| n.contains("run_test") || n.contains("call_once")),
            "{names:?}"
        );
    }
}
