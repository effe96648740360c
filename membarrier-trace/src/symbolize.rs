//! Names the code that called a grace-period function: blazesym (the symbolizer libbpf-tools
//! and bpftrace use) over the file mapped at the caller's address.
//!
//! A caller must be found while its process lives (its mappings go with it), so a thread does
//! it as soon as the kernel reports a new caller (the `CALLERS` ring, sent at a thread's first
//! grace period from it, while that grace period is still under way): a process that exits
//! within a few milliseconds is named too. The retire pass names what the thread found, and
//! asks it for any live caller still unnamed (its report lost to a full ring).

use std::{
    collections::HashMap,
    fs::File,
    os::fd::{AsFd as _, AsRawFd as _},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use membarrier_trace_common::CallerSeen;

use crate::model::{Caller, ProcKey};

/// Callers named so far, by process and return address.
pub type Callers = HashMap<(ProcKey, u64), Caller>;

/// Where a caller's code is, read while its process lived: the mapped file, held open so it can
/// be read after the process exits (or the file is replaced), and the offset in it.
struct Captured {
    module: Option<String>,
    file: Option<File>,
    file_offset: u64,
}

type Pending = Arc<Mutex<HashMap<(ProcKey, u64), Captured>>>;

/// Names callers: a thread finds where each one is as the kernel reports it (the mappings must
/// be read while the process lives); the retire pass names what it found with blazesym.
pub struct CallerNamer {
    /// Callers named so far.
    pub named: Callers,
    symbolizer: blazesym::symbolize::Symbolizer,
    pending: Pending,
    asks: mpsc::Sender<(ProcKey, u64)>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl CallerNamer {
    /// Starts the thread that reads where the callers `ring` reports are.
    pub fn start(mut ring: RingBuf<MapData>) -> std::io::Result<Self> {
        let pending = Pending::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (asks, asked) = mpsc::channel::<(ProcKey, u64)>();
        let thread = {
            let (pending, stop) = (pending.clone(), stop.clone());
            std::thread::Builder::new()
                .name("callers".into())
                .spawn(move || {
                    // The race is with the process's exit, milliseconds away for a short-lived
                    // one, on a box whose CPUs may all be busy: the lowest real-time priority
                    // gets the CPU at once. The work at that priority is short (read the maps,
                    // open a file), and rare (a thread's first grace period from a caller).
                    let param = libc::sched_param { sched_priority: 1 };
                    // SAFETY: this thread, a live struct. Without CAP_SYS_NICE it stays as is.
                    unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
                    let capture = |key: (ProcKey, u64)| {
                        if !pending.lock().unwrap().contains_key(&key)
                            && let Some(c) = capture(key.0.0, key.1)
                        {
                            pending.lock().unwrap().insert(key, c);
                        }
                    };
                    while !stop.load(Ordering::Relaxed) {
                        wait_readable(&ring, Duration::from_millis(100));
                        while let Some(item) = ring.next() {
                            if item.len() >= size_of::<CallerSeen>() {
                                // SAFETY: the kernel wrote a CallerSeen (plain data), checked
                                // long enough; read unaligned.
                                let s = unsafe {
                                    std::ptr::read_unaligned(item.as_ptr().cast::<CallerSeen>())
                                };
                                drop(item);
                                capture(((s.tgid, s.serial), s.caller));
                            }
                        }
                        while let Ok(key) = asked.try_recv() {
                            capture(key);
                        }
                    }
                })?
        };
        Ok(Self {
            named: Callers::new(),
            symbolizer: blazesym::symbolize::Symbolizer::new(),
            pending,
            asks,
            stop,
            thread: Some(thread),
        })
    }

    /// Names the callers found since the last call.
    pub fn name_found(&mut self) {
        let found = std::mem::take(&mut *self.pending.lock().unwrap());
        for (key, c) in found {
            let caller = name(&self.symbolizer, key.1, c);
            self.named.insert(key, caller);
        }
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
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn wait_readable(ring: &RingBuf<MapData>, timeout: Duration) {
    let mut pfd = libc::pollfd {
        fd: ring.as_fd().as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one live pollfd.
    unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
}

/// One line of /proc/PID/maps: where a file is mapped.
#[derive(Debug, PartialEq)]
struct Mapping<'a> {
    start: u64,
    end: u64,
    file_offset: u64,
    path: &'a str,
}

/// The mapping holding `addr` in a /proc/PID/maps text.
fn mapping_at(maps: &str, addr: u64) -> Option<Mapping<'_>> {
    maps.lines().find_map(|line| {
        let mut f = line.split_ascii_whitespace();
        let (start, end) = f.next()?.split_once('-')?;
        let (start, end) = (
            u64::from_str_radix(start, 16).ok()?,
            u64::from_str_radix(end, 16).ok()?,
        );
        if !(start..end).contains(&addr) {
            return None;
        }
        let file_offset = u64::from_str_radix(f.nth(1)?, 16).ok()?;
        // Past the device and inode: the path (may hold spaces; empty for anonymous memory).
        let path = line
            .splitn(6, |c: char| c.is_ascii_whitespace())
            .nth(5)
            .map_or("", str::trim_start);
        Some(Mapping {
            start,
            end,
            file_offset,
            path,
        })
    })
}

/// The call instruction ends at the return address: the byte before it is looked up, so a
/// call that is the last instruction of a function is not put in the next one.
fn looked_up(addr: u64) -> u64 {
    addr.saturating_sub(1)
}

/// Where the caller at return address `addr` in process `pid` is; `None` when the process is
/// gone.
fn capture(pid: u32, addr: u64) -> Option<Captured> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    let Some(m) = mapping_at(&maps, looked_up(addr)).filter(|m| m.path.starts_with('/')) else {
        // Anonymous (JIT) code: the address is all there is.
        return Some(Captured {
            module: None,
            file: None,
            file_offset: 0,
        });
    };
    // Opened through the process, so the file is the one it maps (in its mount namespace, or
    // deleted since) and stays readable after the process exits.
    let file = File::open(format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end))
        .or_else(|_| File::open(m.path))
        .ok();
    Some(Captured {
        module: Some(m.path.trim_end_matches(" (deleted)").to_string()),
        file,
        file_offset: looked_up(addr) - m.start + m.file_offset,
    })
}

/// Names the caller at `addr` from where it was found, with blazesym.
fn name(symbolizer: &blazesym::symbolize::Symbolizer, addr: u64, c: Captured) -> Caller {
    use blazesym::symbolize::{Input, Symbolized, source::Elf, source::Source};
    let mut caller = Caller {
        address: addr,
        module: c.module,
        ..Default::default()
    };
    let Some(file) = c.file else {
        return caller;
    };
    let src = Source::Elf(Elf::new(format!("/proc/self/fd/{}", file.as_raw_fd())));
    if let Ok(Symbolized::Sym(s)) =
        symbolizer.symbolize_single(&src, Input::FileOffset(c.file_offset))
    {
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

    const MAPS: &str = "\
55d0c0a00000-55d0c0a01000 r--p 00000000 08:01 1234 /usr/bin/my prog
55d0c0a01000-55d0c0a02000 r-xp 00001000 08:01 1234 /usr/bin/my prog
7f0000000000-7f0000010000 rw-p 00000000 00:00 0 
7f1000001000-7f1000003000 r-xp 00002000 08:01 99                         /lib/liburcu-memb.so.8.1.0 (deleted)
";

    #[test]
    fn the_mapping_holding_an_address() {
        let m = mapping_at(MAPS, 0x55d0c0a01010).unwrap();
        assert_eq!(
            m,
            Mapping {
                start: 0x55d0c0a01000,
                end: 0x55d0c0a02000,
                file_offset: 0x1000,
                path: "/usr/bin/my prog",
            }
        );
        assert_eq!(mapping_at(MAPS, 0x7f0000000010).unwrap().path, "");
        let lib = mapping_at(MAPS, 0x7f1000002fff).unwrap();
        assert_eq!(lib.path, "/lib/liburcu-memb.so.8.1.0 (deleted)");
        assert_eq!(lib.file_offset, 0x2000);
        assert_eq!(mapping_at(MAPS, 0x7f1000003000), None);
        assert_eq!(mapping_at(MAPS, 0), None);
    }
}
