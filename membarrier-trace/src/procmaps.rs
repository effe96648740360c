//! /proc/PID/maps: where each file is mapped in a process, read while it lives.

use std::fs::File;

/// One line of /proc/PID/maps.
#[derive(Clone, Debug, PartialEq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    pub file_offset: u64,
    pub dev: String,
    pub inode: u64,
    /// Empty for anonymous memory; `[stack]` and the like for the kernel's.
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
        let file_offset = u64::from_str_radix(f.nth(1)?, 16).ok()?;
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

    /// Opens the mapped file through the process, so it is the one the process maps (in its
    /// mount namespace, or deleted since) and stays readable after the process exits; by its
    /// path where that is refused.
    pub fn open(&self, pid: u32) -> Option<File> {
        File::open(format!(
            "/proc/{pid}/map_files/{:x}-{:x}",
            self.start, self.end
        ))
        .or_else(|_| File::open(&self.path))
        .ok()
    }
}

/// The mappings of process `pid`; `None` when it is gone.
pub fn mappings(pid: u32) -> Option<Vec<Mapping>> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    Some(maps.lines().filter_map(Mapping::parse).collect())
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
}
