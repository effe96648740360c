//! What identifies code after its process is gone: the module file's GNU build ID and an
//! address as that file sees it (its ELF virtual address: what `addr2line -e` and objdump
//! take, perf's `module+0xOFF`), and the split debug files found by that build ID
//! (`DIR/.build-id/xx/yyyy.debug`, as Debian's `-dbgsym` packages install them under
//! /usr/lib/debug, or from debuginfod).

use std::{
    collections::HashMap,
    fs::File,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use object::{Object as _, ObjectSegment as _};

/// The directory Debian's `-dbgsym` packages (and most distributions') install debug files in.
pub const SYSTEM_DEBUG_DIR: &str = "/usr/lib/debug";

/// A module file's identity and layout.
#[derive(Debug, Default)]
pub struct Module {
    /// The GNU build ID, in hex.
    pub build_id: Option<String>,
    /// PT_LOAD segments: (file offset, file size, virtual address).
    loads: Vec<(u64, u64, u64)>,
}

impl Module {
    /// Read from the headers and notes only: executables can be hundreds of MiB.
    pub fn read(file: &File) -> Option<Module> {
        let cache = object::ReadCache::new(file);
        let obj = object::File::parse(&cache).ok()?;
        let build_id = obj.build_id().ok().flatten().map(hex);
        let loads = obj
            .segments()
            .map(|s| {
                let (off, size) = s.file_range();
                (off, size, s.address())
            })
            .collect();
        Some(Module { build_id, loads })
    }

    /// The virtual address of the byte at `file_offset`, by the segment that maps it.
    pub fn vaddr(&self, file_offset: u64) -> Option<u64> {
        self.loads
            .iter()
            .find(|(off, size, _)| (*off..off + size).contains(&file_offset))
            .map(|(off, _, vaddr)| file_offset - off + vaddr)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Modules read so far, by file (device, inode): each is read once however many processes map
/// it.
#[derive(Default)]
pub struct Modules(HashMap<(u64, u64), Option<Arc<Module>>>);

impl Modules {
    pub fn of(&mut self, file: &File) -> Option<Arc<Module>> {
        let meta = file.metadata().ok()?;
        if self.0.len() > 4096 {
            self.0.clear();
        }
        self.0
            .entry((meta.dev(), meta.ino()))
            .or_insert_with(|| Module::read(&reopen(file)?).map(Arc::new))
            .clone()
    }
}

/// A file of its own (its own offset) on what `file` has open: another thread may be reading
/// the same descriptor.
pub fn reopen(file: &File) -> Option<File> {
    use std::os::fd::AsRawFd as _;
    File::open(format!("/proc/self/fd/{}", file.as_raw_fd())).ok()
}

/// Finds split debug files by build ID: in the directories given (`--debug-dir`), then
/// /usr/lib/debug, then through debuginfod when `DEBUGINFOD_URLS` is set (elfutils'
/// `debuginfod-find`, which keeps what it fetched in its own cache).
pub struct DebugFiles {
    dirs: Vec<PathBuf>,
    debuginfod: bool,
    found: HashMap<String, Option<PathBuf>>,
}

/// How long one debuginfod fetch may take before the build ID is left unnamed.
const DEBUGINFOD_TIMEOUT: Duration = Duration::from_secs(20);

impl DebugFiles {
    pub fn new(dirs: &[PathBuf]) -> Self {
        let mut dirs = dirs.to_vec();
        dirs.push(PathBuf::from(SYSTEM_DEBUG_DIR));
        let debuginfod = std::env::var_os("DEBUGINFOD_URLS").is_some_and(|u| !u.is_empty());
        DebugFiles {
            dirs,
            debuginfod,
            found: HashMap::new(),
        }
    }

    /// The directories searched, given ones first.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// The debug file of `build_id` (hex), looked for once.
    pub fn find(&mut self, build_id: &str) -> Option<PathBuf> {
        if let Some(f) = self.found.get(build_id) {
            return f.clone();
        }
        let f = self.look(build_id);
        self.found.insert(build_id.to_string(), f.clone());
        f
    }

    fn look(&self, build_id: &str) -> Option<PathBuf> {
        if build_id.len() < 4 || !build_id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let (head, rest) = build_id.split_at(2);
        let local = self
            .dirs
            .iter()
            .map(|d| d.join(".build-id").join(head).join(format!("{rest}.debug")))
            .find(|p| p.is_file());
        if local.is_some() || !self.debuginfod {
            return local;
        }
        debuginfod_find(build_id)
    }
}

/// `debuginfod-find debuginfo BUILD_ID`: the path of the debug file it fetched (or had).
fn debuginfod_find(build_id: &str) -> Option<PathBuf> {
    let mut child = Command::new("debuginfod-find")
        .args(["debuginfo", build_id])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let started = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => break,
            Ok(None) if started.elapsed() < DEBUGINFOD_TIMEOUT => {
                std::thread::sleep(Duration::from_millis(20))
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take()?, &mut out).ok()?;
    let path = PathBuf::from(out.trim());
    path.is_file().then_some(path)
}

/// Whether `path`'s build ID is `build_id` (a module found by name may be another build).
pub fn has_build_id(path: &Path, build_id: &str) -> bool {
    File::open(path)
        .ok()
        .and_then(|f| Module::read(&f))
        .and_then(|m| m.build_id)
        .is_some_and(|b| b == build_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Debian binary's build ID, as `readelf -n` prints it, and a file offset's virtual
    /// address.
    #[test]
    fn reads_the_build_id_and_maps_file_offsets() {
        let path = Path::new("/usr/bin/true");
        let m = Module::read(&File::open(path).unwrap()).unwrap();
        let id = m.build_id.clone().expect("Debian links with --build-id");
        let readelf = Command::new("readelf")
            .arg("-n")
            .arg(path)
            .output()
            .unwrap();
        let notes = String::from_utf8_lossy(&readelf.stdout);
        assert!(notes.contains(&format!("Build ID: {id}")), "{notes}");
        assert!(has_build_id(path, &id));
        assert!(!has_build_id(path, "00"));
        for &(off, size, vaddr) in m.loads.iter().filter(|l| l.1 > 0) {
            assert_eq!(m.vaddr(off), Some(vaddr));
            assert_eq!(m.vaddr(off + size / 2), Some(vaddr + size / 2));
        }
        assert!(!m.loads.is_empty());
    }

    #[test]
    fn debug_files_are_found_by_build_id() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join(".build-id/ab/cdef0123.debug");
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(&f, b"").unwrap();
        let mut d = DebugFiles::new(&[dir.path().to_path_buf()]);
        assert_eq!(d.find("abcdef0123"), Some(f));
        assert_eq!(d.find("abcdef0124"), None);
        assert_eq!(d.find("../../etc"), None);
    }
}
