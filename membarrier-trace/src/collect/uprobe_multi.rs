//! The grace-period uprobes as `uprobe_multi` links (Linux 6.6): one link per file and
//! direction for all its functions. A perf-event uprobe is detached under the kernel's
//! event_mutex, each waiting for its own grace periods (about 0.2 s here, one after another:
//! 1.3 s at every stop for the six liburcu libraries); these links detach in parallel, in about
//! 0.08 s for the same twelve probes.
//!
//! aya 0.14 has no uprobe_multi, and such a link needs its program loaded for it
//! (`expected_attach_type`), so the two programs are loaded here a second time from the same
//! object, their maps relocated to the ones aya made.

use std::{
    collections::HashSet,
    ffi::CString,
    io,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd, RawFd},
    path::Path,
};

use anyhow::{Context as _, Result};
use aya::{Ebpf, maps::Map};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_KPROBE: u32 = 2;
const BPF_TRACE_UPROBE_MULTI: u32 = 48;
const BPF_F_UPROBE_MULTI_RETURN: u32 = 1;

/// The entry and return programs, loaded for uprobe_multi links.
pub struct Programs {
    pub enter: OwnedFd,
    pub exit: OwnedFd,
}

/// Every map aya made, by name, as the programs' relocations name them.
pub fn map_fds(ebpf: &Ebpf) -> Result<Vec<(String, OwnedFd)>> {
    ebpf.maps()
        .map(|(name, map)| {
            let fd = map_data(map)
                .fd()
                .as_fd()
                .try_clone_to_owned()
                .with_context(|| format!("map {name}"))?;
            Ok((name.to_string(), fd))
        })
        .collect()
}

fn map_data(map: &Map) -> &aya::maps::MapData {
    match map {
        Map::Array(m)
        | Map::ArrayOfMaps(m)
        | Map::BloomFilter(m)
        | Map::CgroupArray(m)
        | Map::CgroupStorage(m)
        | Map::CgrpStorage(m)
        | Map::CpuMap(m)
        | Map::DevMap(m)
        | Map::DevMapHash(m)
        | Map::HashMap(m)
        | Map::HashOfMaps(m)
        | Map::InodeStorage(m)
        | Map::LpmTrie(m)
        | Map::LruHashMap(m)
        | Map::PerCpuArray(m)
        | Map::PerCpuCgroupStorage(m)
        | Map::PerCpuHashMap(m)
        | Map::PerCpuLruHashMap(m)
        | Map::PerfEventArray(m)
        | Map::ProgramArray(m)
        | Map::Queue(m)
        | Map::ReusePortSockArray(m)
        | Map::RingBuf(m)
        | Map::SockHash(m)
        | Map::SockMap(m)
        | Map::SkStorage(m)
        | Map::Stack(m)
        | Map::StackTraceMap(m)
        | Map::Unsupported(m)
        | Map::XskMap(m) => m,
    }
}

/// Loads the return and entry programs `[exit, enter]` from `object` for uprobe_multi links,
/// their maps those of `maps`.
/// Fails on kernels before 6.6 (or at the first link there, where the load is allowed).
pub fn load(
    object: &[u8],
    maps: &[(String, OwnedFd)],
    btf: &mut Option<aya::Btf>,
    [exit, enter]: [&str; 2],
) -> Result<Programs> {
    let mut obj = aya_obj::Object::parse(object).context("parsing the eBPF object")?;
    if obj.has_btf_relocations() {
        obj.relocate_btf(super::probes::kernel_btf(btf)?)
            .context("relocating by the kernel's BTF")?;
    }
    let defs: Vec<(String, RawFd, aya_obj::Map)> = maps
        .iter()
        .filter_map(|(name, fd)| Some((name.clone(), fd.as_raw_fd(), obj.maps.get(name)?.clone())))
        .collect();
    let text_sections: HashSet<usize> = obj.functions.keys().map(|(s, _)| *s).collect();
    obj.relocate_maps(
        defs.iter().map(|(n, fd, m)| (n.as_str(), *fd, m)),
        &text_sections,
    )
    .context("relocating the maps")?;
    obj.relocate_calls(&text_sections)
        .context("relocating the calls")?;
    let one = |name: &str| -> Result<OwnedFd> {
        let prog = obj
            .programs
            .get(name)
            .with_context(|| format!("program {name} missing from the eBPF object"))?;
        let insns = &obj.functions[&prog.function_key()].instructions;
        prog_load(name, insns).with_context(|| format!("loading {name} for uprobe_multi"))
    };
    Ok(Programs {
        enter: one(enter)?,
        exit: one(exit)?,
    })
}

fn prog_load(name: &str, insns: &[aya_obj::generated::bpf_insn]) -> io::Result<OwnedFd> {
    // union bpf_attr, as BPF_PROG_LOAD reads it (up to expected_attach_type).
    #[repr(C)]
    #[derive(Default)]
    struct Load {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
        prog_ifindex: u32,
        expected_attach_type: u32,
    }
    let license = c"GPL";
    let mut attr = Load {
        prog_type: BPF_PROG_TYPE_KPROBE,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        expected_attach_type: BPF_TRACE_UPROBE_MULTI,
        ..Default::default()
    };
    for (d, s) in attr.prog_name.iter_mut().zip(name.bytes().take(15)) {
        *d = s;
    }
    bpf(BPF_PROG_LOAD, &attr)
}

/// One uprobe_multi link of `prog` on the functions at file `offsets` of `path`, each with
/// its cookie; `ret`: on their returns.
pub fn attach(
    prog: BorrowedFd<'_>,
    path: &Path,
    offsets: &[u64],
    cookies: &[u64],
    ret: bool,
) -> io::Result<OwnedFd> {
    // union bpf_attr, as BPF_LINK_CREATE reads it for uprobe_multi.
    #[repr(C)]
    struct Link {
        prog_fd: u32,
        target_fd: u32,
        attach_type: u32,
        flags: u32,
        path: u64,
        offsets: u64,
        ref_ctr_offsets: u64,
        cookies: u64,
        cnt: u32,
        multi_flags: u32,
        pid: u32,
    }
    assert_eq!(offsets.len(), cookies.len());
    let path = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let attr = Link {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: 0,
        attach_type: BPF_TRACE_UPROBE_MULTI,
        flags: 0,
        path: path.as_ptr() as u64,
        offsets: offsets.as_ptr() as u64,
        ref_ctr_offsets: 0,
        cookies: cookies.as_ptr() as u64,
        cnt: offsets.len() as u32,
        multi_flags: if ret { BPF_F_UPROBE_MULTI_RETURN } else { 0 },
        pid: 0,
    };
    bpf(BPF_LINK_CREATE, &attr)
}

fn bpf<T>(cmd: libc::c_long, attr: &T) -> io::Result<OwnedFd> {
    // SAFETY: attr is a live bpf_attr prefix of size_of::<T>() bytes; the kernel zero-extends
    // the rest. Its pointers point at buffers that outlive the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *const T,
            std::mem::size_of::<T>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor the kernel just returned, owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}
