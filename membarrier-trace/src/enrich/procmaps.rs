//! /proc/PID/maps: where each file is mapped in a process, read while it lives, and the
//! mapped files opened as root without letting the process choose another file.

use std::{fs::File, os::unix::fs::MetadataExt as _};

/// One line of /proc/PID/maps.
#[derive(Clone, Debug, PartialEq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    pub file_offset: u64,
    /// Mapped executable (`x` in its permissions).
    pub exec: bool,
    pub dev: String,
    pub inode: u64,
    /// Empty for anonymous memory; `[stack]` and the like for the kernel's. A name that is not
    /// UTF-8 is kept with U+FFFD in place of its bad bytes (for showing: the file is opened
    /// through map_files, not by this name).
    pub path: String,
}

impl Mapping {
    fn parse(line: &str) -> Option<Mapping> {
        let mut f = line.split_ascii_whitespace();
        let (start, end) = f.next()?.split_once('-')?;
        let (start, end) = (
            u64::from_str_radix(start, 16).ok()?,
            u64::from_str_radix(end, 16).ok()?,
        );
        let exec = f.next()?.contains('x');
        let file_offset = u64::from_str_radix(f.next()?, 16).ok()?;
        let dev = f.next()?.to_string();
        let inode = f.next()?.parse().ok()?;
        // Past the inode: the path (may hold spaces; empty for anonymous memory).
        let path = line
            .splitn(6, |c: char| c.is_ascii_whitespace())
            .nth(5)
            .map_or("", str::trim_start)
            .to_string();
        Some(Mapping {
            start,
            end,
            file_offset,
            exec,
            dev,
            inode,
            path,
        })
    }

    pub fn contains(&self, addr: u64) -> bool {
        (self.start..self.end).contains(&addr)
    }

    /// The mapped file, for caches: (device, inode).
    pub fn file_id(&self) -> (String, u64) {
        (self.dev.clone(), self.inode)
    }

    /// The file's name (without the kernel's " (deleted)").
    pub fn module(&self) -> &str {
        self.path.trim_end_matches(" (deleted)")
    }

    /// Opens the mapped file through the process's `map_files`, so it is the very file the
    /// process maps (in its mount namespace, or deleted since) and stays readable after the
    /// process exits. Where that is refused, by its path, but only if what opens there is the
    /// mapped file itself (same device and inode) and not a link: a traced process can rename
    /// its files and plant links, and must not make root read a file it could not.
    pub fn open(&self, pid: u32) -> Option<File> {
        File::open(format!(
            "/proc/{pid}/map_files/{:x}-{:x}",
            self.start, self.end
        ))
        .ok()
        .or_else(|| self.open_by_path())
    }

    fn open_by_path(&self) -> Option<File> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(self.module())
            .ok()?;
        self.is(&f.metadata().ok()?).then_some(f)
    }

    /// Whether `meta` is the mapped file (its device and inode).
    pub fn is(&self, meta: &std::fs::Metadata) -> bool {
        let dev = meta.dev();
        let (major, minor) = (rustix::fs::major(dev), rustix::fs::minor(dev));
        meta.ino() == self.inode && self.dev == format!("{major:02x}:{minor:02x}")
    }
}

/// The mappings of process `pid`; `None` when it is gone. A line that is not UTF-8 (a file
/// name with any bytes) costs nothing but its name's bad bytes.
pub fn mappings(pid: u32) -> Option<Vec<Mapping>> {
    let maps = std::fs::read(format!("/proc/{pid}/maps")).ok()?;
    Some(
        maps.split(|&b| b == b'\n')
            .filter_map(|line| Mapping::parse(&String::from_utf8_lossy(line)))
            .collect(),
    )
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
    fn mappings_are_parsed() {
        let maps: Vec<Mapping> = MAPS.lines().filter_map(Mapping::parse).collect();
        let at = |a| maps.iter().find(|m| m.contains(a));
        assert_eq!(
            at(0x55d0c0a01010).unwrap(),
            &Mapping {
                start: 0x55d0c0a01000,
                end: 0x55d0c0a02000,
                file_offset: 0x1000,
                exec: true,
                dev: "08:01".into(),
                inode: 1234,
                path: "/usr/bin/my prog".into(),
            }
        );
        assert_eq!(at(0x7f0000000010).unwrap().path, "");
        let lib = at(0x7f1000002fff).unwrap();
        assert_eq!(lib.module(), "/lib/liburcu-memb.so.8.1.0");
        assert_eq!(lib.file_offset, 0x2000);
        assert_eq!(at(0x7f1000003000), None);
        assert_eq!(at(0), None);
    }

    /// A mapped file whose name is not UTF-8 is listed, found by address and opened; the
    /// other mappings stay (the whole file was once dropped).
    #[test]
    fn a_name_that_is_not_utf8_keeps_every_mapping() {
        use std::os::unix::ffi::OsStrExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir
            .path()
            .join(std::ffi::OsStr::from_bytes(b"lib\xff\xfe.so"));
        std::fs::write(&path, vec![7u8; 8192]).unwrap();
        let f = File::open(&path).unwrap();
        // SAFETY: a private read-only mapping of a file we hold, unmapped below.
        let at = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                8192,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                std::os::fd::AsRawFd::as_raw_fd(&f),
                0,
            )
        };
        assert_ne!(at, libc::MAP_FAILED);
        let maps = mappings(std::process::id()).unwrap();
        let m = maps.iter().find(|m| m.contains(at as u64)).unwrap();
        assert!(m.path.contains("lib\u{fffd}\u{fffd}.so"), "{}", m.path);
        assert!(maps.len() > 5, "only {} mappings", maps.len());
        let opened = m.open(std::process::id()).unwrap();
        assert!(m.is(&opened.metadata().unwrap()));
        // By path (where map_files is refused): the mapped file itself opens; a link to it, or
        // another file put under its name, does not.
        let by_name = |p: &std::path::Path| Mapping {
            path: p.to_str().unwrap().into(),
            ..m.clone()
        };
        let plain = dir.path().join("plain.so");
        std::fs::hard_link(&path, &plain).unwrap();
        assert!(by_name(&plain).open_by_path().is_some());
        let link = dir.path().join("link.so");
        std::os::unix::fs::symlink(&plain, &link).unwrap();
        assert!(by_name(&link).open_by_path().is_none());
        std::fs::remove_file(&plain).unwrap();
        std::fs::write(&plain, b"another file").unwrap();
        assert!(by_name(&plain).open_by_path().is_none());
        unsafe { libc::munmap(at, 8192) };
    }
}
