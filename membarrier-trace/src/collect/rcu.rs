//! Userspace RCU writers: the grace-period functions (liburcu's `synchronize_rcu` of each
//! flavour, and any named with `--rcu-func`) found in the binaries the traced processes run,
//! with a uprobe and a uretprobe on each. The kernel side aggregates each grace period per
//! (process, thread, function, caller); see `rcu_gp_enter` in the eBPF programs.

use std::{
    collections::{HashMap, HashSet},
    fs::File,
    os::{
        fd::{AsFd as _, AsRawFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use aya::{
    Ebpf,
    programs::{
        UProbe,
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeScope},
    },
};
use object::{Object as _, ObjectSection as _, ObjectSymbol as _};

use super::uprobe_multi;
use crate::model::GpFunc;

/// liburcu's grace-period functions: the names since 0.11 (`urcu_<flavour>_`), then the older
/// ones, which later releases no longer export.
const LIBURCU: &[(&str, &str)] = &[
    ("urcu_memb_synchronize_rcu", "memb"),
    ("urcu_mb_synchronize_rcu", "mb"),
    ("urcu_qsbr_synchronize_rcu", "qsbr"),
    ("urcu_bp_synchronize_rcu", "bp"),
    ("urcu_signal_synchronize_rcu", "signal"),
    ("synchronize_rcu_memb", "memb"),
    ("synchronize_rcu_mb", "mb"),
    ("synchronize_rcu_qsbr", "qsbr"),
    ("synchronize_rcu_bp", "bp"),
    ("synchronize_rcu_sig", "signal"),
];

/// Where distributions install liburcu; system-wide and for `-- COMMAND` (whose libraries are
/// not mapped yet when it starts) the libraries there are probed.
const LIB_DIRS: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu",
    "/lib/x86_64-linux-gnu",
    "/usr/lib64",
    "/lib64",
    "/usr/lib",
    "/usr/local/lib",
    "/usr/local/lib64",
];

/// The return and entry programs, in the order they attach: an entry seen without its return
/// probe would leave the thread marked inside a grace period.
const PROGRAMS: [&str; 2] = ["rcu_gp_exit", "rcu_gp_enter"];

/// A `--rcu-func PATH:SYMBOL`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CustomFunc {
    pub path: PathBuf,
    pub symbol: String,
}

impl std::str::FromStr for CustomFunc {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.rsplit_once(':') {
            Some((path, symbol)) if !path.is_empty() && !symbol.is_empty() => Ok(Self {
                path: path.into(),
                symbol: symbol.into(),
            }),
            _ => Err(format!("{s:?}: expected PATH:SYMBOL")),
        }
    }
}

/// A function to probe in a file.
struct Func {
    symbol: String,
    flavour: &'static str,
    /// Where its code is in the file (uprobes are placed by file offset).
    offset: u64,
}

/// liburcu's grace-period functions, with their flavours.
fn liburcu(name: &str) -> Option<&'static str> {
    LIBURCU.iter().find(|(n, _)| *n == name).map(|&(_, f)| f)
}

/// The functions `wanted` names (with a flavour) in the ELF `file`: one name per address
/// (liburcu exports some under two names).
fn find_in(file: &File, wanted: impl Fn(&str) -> Option<&'static str>) -> Vec<Func> {
    // Read as needed: executables can be hundreds of MiB, their symbol tables are not.
    let cache = object::ReadCache::new(file);
    let Ok(obj) = object::File::parse(&cache) else {
        return Vec::new();
    };
    let mut seen = HashSet::new();
    let mut found = Vec::new();
    for sym in obj.dynamic_symbols().chain(obj.symbols()) {
        if sym.is_undefined() || sym.address() == 0 {
            continue;
        }
        let Ok(name) = sym.name() else { continue };
        let Some(flavour) = wanted(name) else {
            continue;
        };
        // The file offset: the symbol's place in its section, from the section's start.
        let offset = sym
            .section_index()
            .and_then(|i| obj.section_by_index(i).ok())
            .and_then(|sec| Some(sec.file_range()?.0 + sym.address().checked_sub(sec.address())?));
        if let Some(offset) = offset
            && seen.insert(sym.address())
        {
            found.push(Func {
                symbol: name.to_string(),
                flavour,
                offset,
            });
        }
    }
    found
}

/// The probes on grace-period functions, and what was looked at so far.
pub struct Writers {
    pub funcs: Vec<GpFunc>,
    /// Files already looked at, by (device, inode): each is probed once, for all processes.
    files: HashSet<(u64, u64)>,
    /// Functions probed, by (device, inode, offset): a `--rcu-func` that names one of liburcu's
    /// is not probed twice.
    probed: HashSet<(u64, u64, u64)>,
    /// The same files, as /proc/PID/maps names them: a mapping of one is not opened again.
    mapped: HashSet<(String, u64)>,
    /// Why a function could not be probed, said once each.
    pub notes: Vec<String>,
    /// `--rcu-func`s not probed yet.
    custom: Vec<CustomFunc>,
    /// The programs for uprobe_multi links, while the kernel takes them; else aya's
    /// perf-event uprobes.
    multi: Option<uprobe_multi::Programs>,
    /// The uprobe_multi links: closing one detaches it.
    pub links: Vec<OwnedFd>,
}

impl Writers {
    /// Nothing is attached yet. The programs are loaded for uprobe_multi links from `object`,
    /// their maps `ebpf`'s (all still in it), where the kernel takes them; else aya's are
    /// loaded at the first uprobe. `MEMBARRIER_TRACE_NO_UPROBE_MULTI` is the tests' way to
    /// the uprobes of kernels before 6.6.
    pub fn load(
        ebpf: &Ebpf,
        object: &[u8],
        btf: &mut Option<aya::Btf>,
        custom: Vec<CustomFunc>,
    ) -> Self {
        let multi = std::env::var_os("MEMBARRIER_TRACE_NO_UPROBE_MULTI")
            .is_none()
            .then(|| {
                let maps = uprobe_multi::map_fds(ebpf)?;
                uprobe_multi::load(object, &maps, btf, PROGRAMS)
            })
            .and_then(Result::ok);
        Self {
            funcs: Vec::new(),
            files: HashSet::new(),
            probed: HashSet::new(),
            mapped: HashSet::new(),
            notes: Vec::new(),
            custom,
            multi,
            links: Vec::new(),
        }
    }

    /// The programs' descriptors, where they are loaded for uprobe_multi links.
    pub fn multi_programs(&self) -> impl Iterator<Item = std::os::fd::BorrowedFd<'_>> {
        self.multi
            .iter()
            .flat_map(|m| [m.enter.as_fd(), m.exit.as_fd()])
    }

    /// Probes the liburcu libraries installed on the box.
    pub fn probe_installed(&mut self, ebpf: &mut Ebpf) {
        let mut libs: Vec<PathBuf> = LIB_DIRS
            .iter()
            .filter_map(|d| std::fs::read_dir(d).ok())
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("liburcu") && n.contains(".so"))
            })
            .collect();
        libs.sort();
        for lib in libs {
            self.probe_file(ebpf, &lib);
        }
    }

    /// Probes what process `pid` maps that has grace-period functions (shared libraries, and
    /// an executable with liburcu linked in), unless looked at before. Cheap to call again:
    /// it reads /proc/PID/maps, and opens only files it has not seen.
    pub fn probe_process(&mut self, ebpf: &mut Ebpf, pid: u32) {
        let Some(maps) = crate::enrich::procmaps::mappings(pid) else {
            return;
        };
        for m in maps {
            if !m.exec || !m.path.starts_with('/') || !self.mapped.insert((m.dev.clone(), m.inode))
            {
                continue;
            }
            // The very file the process maps (through map_files), in whatever mount namespace.
            if let Some(file) = m.open(pid) {
                self.probe_open(ebpf, &file, Path::new(m.module()));
            }
        }
    }

    /// Probes the liburcu functions in `path`, once per file.
    pub fn probe_file(&mut self, ebpf: &mut Ebpf, path: &Path) {
        if let Ok(file) = File::open(path) {
            self.probe_open(ebpf, &file, path);
        }
    }

    /// Probes the liburcu functions in the open `file`, once per file (`shown` in reports).
    fn probe_open(&mut self, ebpf: &mut Ebpf, file: &File, shown: &Path) {
        let Ok(meta) = file.metadata() else {
            return;
        };
        if !meta.is_file() || !self.files.insert((meta.dev(), meta.ino())) {
            return;
        }
        for e in self.attach(ebpf, file, shown, find_in(file, liburcu)) {
            self.notes.push(format!("{e:#}"));
        }
    }

    /// Probes the `--rcu-func`s: an error if one cannot be.
    pub fn probe_custom(&mut self, ebpf: &mut Ebpf) -> Result<()> {
        for f in std::mem::take(&mut self.custom) {
            let what = || format!("--rcu-func {}:{}", f.path.display(), f.symbol);
            let file = File::open(&f.path).with_context(what)?;
            let funcs = find_in(&file, |name| (name == f.symbol).then_some("custom"));
            if funcs.is_empty() {
                anyhow::bail!("{}: no function {} in the file", what(), f.symbol);
            }
            if let Some(e) = self.attach(ebpf, &file, &f.path, funcs).into_iter().next() {
                return Err(e.context(what()));
            }
        }
        Ok(())
    }

    /// Attaches both probes to each of `funcs` in `file` (`shown` in reports) not probed yet:
    /// one uprobe_multi link per direction for them all, else (before Linux 6.6) a uprobe
    /// each. Returns why any could not be.
    fn attach(
        &mut self,
        ebpf: &mut Ebpf,
        file: &File,
        shown: &Path,
        mut funcs: Vec<Func>,
    ) -> Vec<anyhow::Error> {
        if let Ok(meta) = file.metadata() {
            funcs.retain(|f| self.probed.insert((meta.dev(), meta.ino(), f.offset)));
        }
        if funcs.is_empty() {
            return Vec::new();
        }
        // aya and the kernel open the file again by name to attach: by our descriptor's name,
        // the very file read here, whatever a traced process does to its own names meanwhile
        // (a uprobe placed by root in another file would break every process running it).
        let path = &PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        let failed = |names: &str, e: anyhow::Error| {
            e.context(format!(
                "no grace periods from {names} in {}",
                shown.display()
            ))
        };
        if let Some(m) = &self.multi {
            let offsets: Vec<u64> = funcs.iter().map(|f| f.offset).collect();
            let cookies: Vec<u64> = (self.funcs.len() as u64..).take(funcs.len()).collect();
            // The return probe first (see PROGRAMS).
            let exit = uprobe_multi::attach(m.exit.as_fd(), path, &offsets, &cookies, true);
            let linked = exit.and_then(|exit| {
                let enter = uprobe_multi::attach(m.enter.as_fd(), path, &offsets, &cookies, false)?;
                Ok([exit, enter])
            });
            match linked {
                Ok(links) => {
                    self.links.extend(links);
                    self.add_funcs(shown, funcs.into_iter());
                    return Vec::new();
                }
                // The kernel has no uprobe_multi (before 6.6): aya's uprobes from here on.
                Err(_) if self.links.is_empty() => self.multi = None,
                Err(e) => return vec![failed(&names(&funcs), e.into())],
            }
        }
        let mut errors = Vec::new();
        for f in funcs {
            match self.attach_perf(ebpf, path, &f) {
                Ok(()) => self.add_funcs(shown, std::iter::once(f)),
                Err(e) => errors.push(failed(&f.symbol, e)),
            }
        }
        errors
    }

    fn add_funcs(&mut self, shown: &Path, funcs: impl Iterator<Item = Func>) {
        self.funcs.extend(funcs.map(|f| GpFunc {
            flavour: f.flavour,
            function: f.symbol,
            library: shown.to_path_buf(),
        }));
    }

    /// Attaches aya's perf-event uprobe and uretprobe to `f` (its cookie: the next function's
    /// index), loading the programs the first time.
    fn attach_perf(&self, ebpf: &mut Ebpf, path: &Path, f: &Func) -> Result<()> {
        let cookie = self.funcs.len() as u64;
        // The return probe first (see PROGRAMS).
        for name in PROGRAMS {
            let p: &mut UProbe = program(ebpf, name)?;
            if p.fd().is_err() {
                p.load().with_context(|| format!("loading {name}"))?;
            }
            p.attach(
                UProbeAttachPoint {
                    location: UProbeAttachLocation::AbsoluteOffset(f.offset),
                    cookie: Some(cookie),
                },
                path,
                UProbeScope::AllProcesses,
            )
            .with_context(|| format!("attaching {name}"))?;
        }
        Ok(())
    }

    /// One line for the user: what is probed.
    pub fn describe(&self) -> String {
        if self.funcs.is_empty() {
            return "no userspace RCU grace-period functions found to probe yet".into();
        }
        let mut by_lib: HashMap<&Path, Vec<&str>> = HashMap::new();
        for f in &self.funcs {
            by_lib.entry(&f.library).or_default().push(&f.function);
        }
        let mut parts: Vec<String> = by_lib
            .into_iter()
            .map(|(lib, fs)| format!("{} in {}", fs.join(", "), lib.display()))
            .collect();
        parts.sort();
        let how = if self.links.is_empty() {
            ""
        } else {
            " (uprobe_multi links)"
        };
        format!("RCU writers: probing {}{how}", parts.join("; "))
    }
}

fn names(funcs: &[Func]) -> String {
    funcs
        .iter()
        .map(|f| f.symbol.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut UProbe> {
    ebpf.program_mut(name)
        .with_context(|| format!("program {name} missing from the eBPF object"))?
        .try_into()
        .with_context(|| format!("program {name}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rcu_func_parses_path_and_symbol() {
        let f: CustomFunc = "/usr/bin/qemu-system-x86_64:synchronize_rcu"
            .parse()
            .unwrap();
        assert_eq!(f.path, Path::new("/usr/bin/qemu-system-x86_64"));
        assert_eq!(f.symbol, "synchronize_rcu");
        assert!("nosymbol".parse::<CustomFunc>().is_err());
        assert!("/lib/x.so:".parse::<CustomFunc>().is_err());
    }
}
