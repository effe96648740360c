//! Loads the eBPF programs, attaches them, and reads the kernel's aggregates into a
//! [`Snapshot`].

use std::{collections::HashMap, path::Path, time::Instant};

use anyhow::{Context as _, Result};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray},
    programs::{ProgramError, TracePoint},
};
use membarrier_trace_common::{Inflight, Stats, StatsKey, counter};

use crate::{
    hist::Histogram,
    model::{RawRow, Snapshot},
    preflight,
};

static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/membarrier-trace"));

/// What to trace.
pub struct Options {
    /// Only these tgids (filtered in the kernel); empty with `follow_forks` off means everything.
    pub pids: Vec<u32>,
    /// Also trace every process a traced process forks (for `-- COMMAND`).
    pub follow_forks: bool,
}

pub struct Collector {
    // Owns the programs; dropping it detaches them.
    ebpf: Ebpf,
    stats: BpfHashMap<MapData, StatsKey, Stats>,
    counters: PerCpuArray<MapData, u64>,
    inflight: BpfHashMap<MapData, u32, Inflight>,
    tgids: BpfHashMap<MapData, u32, u8>,
    comms: HashMap<u32, String>,
    started: Instant,
}

/// One line for a load or attach failure, with the kernel's reason.
fn attach(ebpf: &mut Ebpf, prog: &str, category: &str, name: &str) -> Result<()> {
    let tp: &mut TracePoint = ebpf
        .program_mut(prog)
        .with_context(|| format!("eBPF program {prog} missing from the object"))?
        .try_into()?;
    tp.load().map_err(|e| load_error(prog, e))?;
    tp.attach(category, name)
        .with_context(|| format!("attaching to {category}:{name}"))?;
    Ok(())
}

/// A program load failure as one line: the errno and the verifier's verdict (the last line of its
/// log before the statistics), not the whole log.
fn load_error(prog: &str, e: ProgramError) -> anyhow::Error {
    match e {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            let verdict = log
                .lines()
                .map(str::trim)
                .take_while(|l| !l.starts_with("verification time"))
                .filter(|l| !l.is_empty())
                .last()
                .unwrap_or("no verifier log")
                .to_string();
            anyhow::anyhow!("the kernel refused to load {prog}: {io_error}; verifier: {verdict}")
        }
        e => anyhow::Error::new(e).context(format!("loading {prog}")),
    }
}

/// How often the kernel skipped `prog` because another BPF program was running on that CPU
/// (`recursion_misses` in `bpf_prog_info`; aya does not expose it).
fn recursion_misses(ebpf: &Ebpf, prog: &str) -> Result<u64> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    // struct bpf_prog_info up to and including recursion_misses (at offset 208).
    const INFO_LEN: usize = 216;
    const RECURSION_MISSES_OFF: usize = 208;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    #[repr(C)]
    struct GetInfo {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let p = ebpf
        .program(prog)
        .with_context(|| format!("eBPF program {prog} missing"))?;
    let fd = p.fd()?.as_fd().as_raw_fd();
    let mut info = [0u8; INFO_LEN];
    let mut attr = GetInfo {
        bpf_fd: fd as u32,
        info_len: INFO_LEN as u32,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: attr points at a live buffer of info_len bytes.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &raw mut attr,
            std::mem::size_of::<GetInfo>(),
        )
    };
    if r != 0 {
        anyhow::bail!(
            "BPF_OBJ_GET_INFO_BY_FD: {}",
            std::io::Error::last_os_error()
        );
    }
    let bytes = &info[RECURSION_MISSES_OFF..RECURSION_MISSES_OFF + 8];
    Ok(u64::from_ne_bytes(bytes.try_into().expect("8 bytes")))
}

fn take<T>(ebpf: &mut Ebpf, name: &str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .with_context(|| format!("map {name} missing from the eBPF object"))?;
    T::try_from(map).with_context(|| format!("map {name}"))
}

impl Collector {
    /// Loads the programs. Nothing is attached until [`Collector::start`].
    pub fn load(tracefs: &Path, opts: &Options) -> Result<Self> {
        let filter = u8::from(!opts.pids.is_empty() || opts.follow_forks);
        let fork_off =
            preflight::field_offset(tracefs, "sched", "sched_process_fork", "child_pid")?;
        let mut ebpf = EbpfLoader::new()
            .override_global("FILTER_TGIDS", &filter, true)
            .override_global("FORK_CHILD_PID_OFF", &fork_off, true)
            .load(EBPF_OBJECT)
            .context("loading the eBPF object")?;
        let stats = take(&mut ebpf, "STATS")?;
        let counters = take(&mut ebpf, "COUNTERS")?;
        let inflight = take(&mut ebpf, "INFLIGHT")?;
        let tgids = take(&mut ebpf, "TGIDS")?;
        let mut c = Self {
            ebpf,
            stats,
            counters,
            inflight,
            tgids,
            comms: HashMap::new(),
            started: Instant::now(),
        };
        for &pid in &opts.pids {
            c.add_pid(pid)?;
        }
        Ok(c)
    }

    /// Adds `pid` to the in-kernel filter.
    pub fn add_pid(&mut self, pid: u32) -> Result<()> {
        self.tgids
            .insert(pid, 1, 0)
            .with_context(|| format!("adding pid {pid} to the filter"))?;
        if let Some(comm) = preflight::comm(pid) {
            self.comms.insert(pid, comm);
        }
        Ok(())
    }

    /// Attaches the programs; from here on calls are counted.
    pub fn start(&mut self, follow_forks: bool) -> Result<()> {
        if follow_forks {
            attach(
                &mut self.ebpf,
                "sched_process_fork",
                "sched",
                "sched_process_fork",
            )?;
        }
        // Exit before enter: a call already under way when we attach is then counted as missed,
        // rather than leaving an enter that never sees its exit.
        attach(
            &mut self.ebpf,
            "sys_exit_membarrier",
            "syscalls",
            "sys_exit_membarrier",
        )?;
        attach(
            &mut self.ebpf,
            "sys_enter_membarrier",
            "syscalls",
            "sys_enter_membarrier",
        )?;
        self.started = Instant::now();
        Ok(())
    }

    /// Frees the in-flight slots of threads that have exited. The eBPF programs keep a slot per
    /// thread between calls (cheaper than an insert and a delete per call); this bounds them.
    pub fn prune_exited_threads(&mut self) -> Result<()> {
        let gone: Vec<u32> = self
            .inflight
            .keys()
            .filter_map(|k| k.ok())
            .filter(|tid| !Path::new(&format!("/proc/{tid}")).exists())
            .collect();
        for tid in gone {
            // It may have been removed or reused meanwhile; either way the slot is not ours.
            let _ = self.inflight.remove(&tid);
        }
        Ok(())
    }

    fn counter(&self, idx: u32) -> Result<u64> {
        Ok(self.counters.get(&idx, 0)?.iter().sum())
    }

    /// Reads the kernel's totals. With `last`, calls still inside membarrier are counted as
    /// missed: tracing stops before they return.
    pub fn snapshot(&mut self, last: bool) -> Result<Snapshot> {
        let elapsed_ns = self.started.elapsed().as_nanos() as u64;
        let mut rows = Vec::new();
        let mut kernel_comms: HashMap<u32, String> = HashMap::new();
        for item in self.stats.iter() {
            let (key, s) = item.context("reading the stats map")?;
            // A row is created just before its first call is counted into it.
            if s.count == 0 {
                continue;
            }
            let end = s.comm.iter().position(|&b| b == 0).unwrap_or(s.comm.len());
            kernel_comms
                .entry(key.tgid)
                .or_insert_with(|| String::from_utf8_lossy(&s.comm[..end]).into_owned());
            rows.push(RawRow {
                key,
                count: s.count,
                sum_ns: s.sum_ns,
                min_ns: s.min_ns,
                max_ns: s.max_ns,
                hist: Histogram {
                    counts: s.hist.to_vec(),
                },
            });
        }
        // Name processes by /proc while they live (the main thread's comm); once gone, by the
        // comm of the thread that made their first call.
        for (tgid, kcomm) in kernel_comms {
            self.comms
                .entry(tgid)
                .or_insert_with(|| preflight::comm(tgid).unwrap_or(kcomm));
        }
        // A skipped enter shows up as an exit without enter (MISSED_ENTER); a skipped exit
        // leaves its enter behind, so count the exit program's skips directly.
        let mut missed_calls = self.counter(counter::MISSED_ENTER)?
            + recursion_misses(&self.ebpf, "sys_exit_membarrier")?;
        if last {
            missed_calls += self
                .inflight
                .iter()
                .filter(|e| e.as_ref().is_ok_and(|(_, call)| call.start_ns != 0))
                .count() as u64;
        }
        let dropped = self.counter(counter::DROPPED_INFLIGHT)?
            + self.counter(counter::DROPPED_STATS)?
            + self.counter(counter::DROPPED_PIDS)?;
        Ok(Snapshot {
            elapsed_ns,
            rows,
            missed_calls,
            dropped,
            comms: self.comms.clone(),
        })
    }
}
