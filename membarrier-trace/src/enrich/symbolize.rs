//! Names code addresses in traced processes: grace-period callers and `--stacks` frames, with
//! blazesym (the symbolizer libbpf-tools and bpftrace use) over the file mapped there.
//!
//! An address must be placed while its process lives (its mappings go with it), so a thread
//! does it as soon as the kernel reports it: a new caller (the `CALLERS` ring, sent at a
//! thread's first grace period from it, while that grace period is still under way), or a
//! frame of a call's user stack (unwound and counted by `enrich::stacks`). A process that exits within milliseconds is named too. The retire
//! pass names what the thread found, and asks it for any live caller still unnamed (its report
//! lost to a full ring).

use std::{
    collections::{HashMap, HashSet},
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, mpsc},
};

use aya::maps::{MapData, RingBuf};
use membarrier_trace_common::CallerSeen;

use blazesym::symbolize::Input;

use crate::{
    enrich::module::{DebugFiles, Modules, has_build_id},
    enrich::procmaps::mappings,
    enrich::unwind::FrameFile,
    model::{Caller, ProcKey},
    ring::{Readers, read_as},
};

/// Addresses named so far, by process and address.
pub type Callers = HashMap<(ProcKey, u64), Caller>;

/// Where an address's code is, found while its process lived; `None`: anonymous memory (JIT
/// code), the address is all there is.
type Found = HashMap<(ProcKey, u64), Option<FrameFile>>;

/// Names addresses: a thread finds where each one is as the kernel reports it (the mappings
/// must be read while the process lives); the retire pass names what it found with blazesym.
pub struct CallerNamer {
    /// Addresses named so far.
    pub named: Callers,
    symbols: Symbols,
    found: Arc<Mutex<Found>>,
    asks: mpsc::Sender<(ProcKey, u64)>,
    readers: Readers,
}

impl CallerNamer {
    /// Starts the thread that reads the callers' ring (grace periods' callers), if given.
    pub fn start(
        callers: Option<RingBuf<MapData>>,
        debug_dirs: &[PathBuf],
    ) -> std::io::Result<Self> {
        let found = Arc::new(Mutex::new(Found::new()));
        let (asks, asked) = mpsc::channel::<(ProcKey, u64)>();
        let mut readers = Readers::default();
        if let Some(mut ring) = callers {
            let mut r = Finder::new(found.clone());
            // The race is with the process's exit, milliseconds away for a short-lived one:
            // the thread wakes on the report. At normal priority: SCHED_FIFO won it on a box
            // whose CPUs were all busy, but a real-time thread on the RT guest and a nice -20
            // one here (the retire pass fell behind 12,000 exiting processes) hurt the rest.
            let fd = ring.as_fd().as_raw_fd();
            readers.spawn("callers", fd, move || {
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
            })?;
        }
        Ok(Self {
            named: Callers::new(),
            symbols: Symbols::new(debug_dirs),
            found,
            asks,
            readers,
        })
    }

    /// For another thread that meets addresses (the stacks thread): it places them, named here.
    pub fn finder(&self) -> Finder {
        Finder::new(self.found.clone())
    }

    /// Names the addresses found since the last call.
    pub fn name_found(&mut self) {
        let found = std::mem::take(&mut *self.found.lock().unwrap());
        for (key, f) in found {
            let caller = match f {
                Some(f) => self.symbols.name(key.1, f),
                None => Caller {
                    address: key.1,
                    ..Default::default()
                },
            };
            self.named.insert(key, caller);
        }
    }

    /// Exited processes summed into another entry (`dest`: the entry each dead process's
    /// figures went to): their addresses are their own, so their names are forgotten.
    pub fn retire(&mut self, dest: &HashMap<ProcKey, ProcKey>) {
        self.named
            .retain(|(p, _), _| dest.get(p).is_none_or(|to| to == p));
    }

    /// Asks for the caller at `addr` in the live process `p` (found by the thread, woken now;
    /// named at the next [`CallerNamer::name_found`] after that).
    pub fn ask(&self, p: ProcKey, addr: u64) {
        let _ = self.asks.send((p, addr));
        self.readers.wake();
    }
}

/// A thread's side: finds the file each address is in (its own memory of what it found).
pub struct Finder {
    found: Arc<Mutex<Found>>,
    /// Addresses already found (bounded: forgotten past a million, costing a second look).
    seen: HashSet<(ProcKey, u64)>,
}

impl Finder {
    fn new(found: Arc<Mutex<Found>>) -> Self {
        Finder {
            found,
            seen: HashSet::new(),
        }
    }

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

    /// Where a frame's code is, as the unwinder found it: kept unless found already.
    pub fn frame(&mut self, key: (ProcKey, u64), f: Option<FrameFile>) {
        if !self.seen.contains(&key) {
            self.remember(key, f);
        }
    }

    fn remember(&mut self, key: (ProcKey, u64), f: Option<FrameFile>) {
        if self.seen.len() > 1 << 20 {
            self.seen.clear();
        }
        self.seen.insert(key);
        self.found.lock().unwrap().insert(key, f);
    }
}

/// Names code from its module: its own symbols, then its split debug file found by build ID
/// (where the module has no symbol for it, or no line); every frame gets the module's build ID
/// and its address as the module's file sees it, which outlive the process and ASLR.
pub struct Symbols {
    symbolizer: blazesym::symbolize::Symbolizer,
    modules: Modules,
    debug: DebugFiles,
}

/// A symbol found for an address.
struct Named {
    symbol: String,
    /// Bytes from the symbol's start to the address named (the byte before a return address).
    offset: u64,
    file: Option<String>,
    line: Option<u32>,
}

impl Symbols {
    /// `debug_dirs` (`--debug-dir`) are searched before /usr/lib/debug.
    pub fn new(debug_dirs: &[PathBuf]) -> Self {
        let debug = DebugFiles::new(debug_dirs);
        let symbolizer = blazesym::symbolize::Symbolizer::builder()
            .set_debug_dirs(Some(debug.dirs()))
            .build();
        Symbols {
            symbolizer,
            modules: Modules::default(),
            debug,
        }
    }

    /// Names the code at `addr` (a return address: the call is the byte before it) from where
    /// it was found.
    pub fn name(&mut self, addr: u64, f: FrameFile) -> Caller {
        let mut caller = Caller {
            address: addr,
            module: Some(f.module),
            ..Default::default()
        };
        let Some(file) = f.file else {
            return caller;
        };
        let module = self.modules.of(&file);
        let vaddr = module.as_ref().and_then(|m| m.vaddr(f.file_offset));
        caller.build_id = module.and_then(|m| m.build_id.clone());
        caller.module_offset = vaddr.map(|v| v + 1);
        let path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        let mut named = self.in_file(&path, Input::FileOffset(f.file_offset));
        if named.as_ref().is_none_or(|n| n.file.is_none())
            && let (Some(id), Some(v)) = (&caller.build_id, vaddr)
            && let Some(debug) = self.debug.find(id)
            && let Some(n) = self.in_file(&debug, Input::VirtOffset(v))
        {
            named = Some(n);
        }
        fill(&mut caller, named);
        caller
    }

    /// Names a frame of a saved report from its build ID and module offset: in the build's
    /// debug file, else in `module` where that file is the same build. False where neither is
    /// here.
    pub fn name_saved(&mut self, c: &mut Caller) -> bool {
        let (Some(id), Some(off)) = (c.build_id.clone(), c.module_offset) else {
            return false;
        };
        let v = off.saturating_sub(1);
        let files = self.debug.find(&id).into_iter().chain(
            c.module
                .as_deref()
                .map(PathBuf::from)
                .filter(|m| has_build_id(m, &id)),
        );
        for f in files.collect::<Vec<_>>() {
            if let Some(n) = self.in_file(&f, Input::VirtOffset(v)) {
                fill(c, Some(n));
                return true;
            }
        }
        false
    }

    fn in_file(&self, path: &Path, input: Input<u64>) -> Option<Named> {
        use blazesym::symbolize::{Symbolized, source::Elf, source::Source};
        let src = Source::Elf(Elf::new(path));
        let mut sym = self.symbolizer.symbolize_single(&src, input);
        if !matches!(sym, Ok(Symbolized::Sym(_))) {
            // Debug sections it cannot read (libc's are zlib-compressed): the symbol tables
            // alone.
            let src = Source::Elf(Elf {
                debug_syms: false,
                ..Elf::new(path)
            });
            sym = self.symbolizer.symbolize_single(&src, input);
        }
        let Ok(Symbolized::Sym(s)) = sym else {
            return None;
        };
        let code = s.code_info.as_ref();
        Some(Named {
            symbol: s.name.to_string(),
            offset: s.offset as u64,
            file: code.map(|ci| ci.to_path().display().to_string()),
            line: code.and_then(|ci| ci.line),
        })
    }
}

/// The symbol's fields of `c`, for the return address (one byte after the address named).
fn fill(c: &mut Caller, named: Option<Named>) {
    if let Some(n) = named {
        c.symbol = Some(n.symbol);
        c.offset = Some(n.offset + 1);
        c.file = n.file;
        c.line = n.line;
    }
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
        let c = Symbols::new(&[]).name(f + 0x1a, frame);
        assert_eq!(c.symbol.as_deref(), Some("syscall"), "{c:?}");
    }
}
