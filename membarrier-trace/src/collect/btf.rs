//! The few `task_struct` offsets the eBPF programs read (`pid`, `group_leader`, `comm`), from
//! the kernel's own BTF (`/sys/kernel/btf/vmlinux`): the layout differs between kernels and
//! builds, and the programs are built once, without CO-RE relocations.

/// Byte offsets in `struct task_struct`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaskOffsets {
    pub pid: u32,
    pub group_leader: u32,
    pub comm: u32,
}

/// The running kernel's offsets; None without BTF (the programs then name a process by the
/// calling thread, as before).
pub fn task_offsets() -> Option<TaskOffsets> {
    parse(&std::fs::read("/sys/kernel/btf/vmlinux").ok()?)
}

const BTF_MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;

/// One type of the BTF type section: its kind, name, and (structs and unions) its members as
/// (name offset, type id, bit offset).
struct Type {
    kind: u32,
    name: u32,
    /// The referred type (typedef, const, volatile...).
    refers: u32,
    members: Vec<(u32, u32, u32)>,
}

/// The type section walked once, then `task_struct`'s members looked up, through anonymous
/// structs and unions.
///
/// Long: one walk over BTF's kinds, an arm per kind's record size.
fn parse(data: &[u8]) -> Option<TaskOffsets> {
    let u32_at = |o: usize| -> Option<u32> {
        Some(u32::from_le_bytes(data.get(o..o + 4)?.try_into().ok()?))
    };
    if u16::from_le_bytes(data.get(0..2)?.try_into().ok()?) != BTF_MAGIC {
        return None;
    }
    let hdr = u32_at(4)? as usize;
    let (type_off, type_len) = (u32_at(8)? as usize, u32_at(12)? as usize);
    let str_off = u32_at(16)? as usize;
    let (types_at, strings_at) = (hdr + type_off, hdr + str_off);
    let name = |off: u32| -> &[u8] {
        let s = data.get(strings_at + off as usize..).unwrap_or_default();
        &s[..s.iter().position(|&b| b == 0).unwrap_or(s.len())]
    };
    // Type ids start at 1.
    let mut types = vec![Type {
        kind: 0,
        name: 0,
        refers: 0,
        members: Vec::new(),
    }];
    let mut at = types_at;
    while at < types_at + type_len {
        let (name_off, info, size_or_type) = (u32_at(at)?, u32_at(at + 4)?, u32_at(at + 8)?);
        let (kind, vlen, kind_flag) = ((info >> 24) & 0x1f, info & 0xffff, info >> 31);
        at += 12;
        let vlen = vlen as usize;
        let mut members = Vec::new();
        // What follows each kind (include/uapi/linux/btf.h).
        let extra = match kind {
            1 | 14 | 17 => 4, // INT, VAR, DECL_TAG
            3 => 12,          // ARRAY
            4 | 5 => {
                // STRUCT, UNION: name, type, offset (bitfield size in the top byte with
                // kind_flag)
                for m in 0..vlen {
                    let o = at + m * 12;
                    let off = u32_at(o + 8)?;
                    let bits = if kind_flag != 0 { off & 0xff_ffff } else { off };
                    members.push((u32_at(o)?, u32_at(o + 4)?, bits));
                }
                vlen * 12
            }
            6 | 13 => vlen * 8,   // ENUM, FUNC_PROTO
            15 | 19 => vlen * 12, // DATASEC, ENUM64
            2 | 7..=12 | 16 | 18 => 0,
            _ => return None, // a kind this parser does not know: stop rather than misread
        };
        at += extra;
        types.push(Type {
            kind,
            name: name_off,
            refers: size_or_type,
            members,
        });
    }
    let task = types.iter().find(|t| {
        t.kind == KIND_STRUCT && name(t.name) == b"task_struct" && !t.members.is_empty()
    })?;
    // A member of `t` by name, searching anonymous structs and unions too: its bit offset.
    fn find<'a>(
        types: &[Type],
        t: &Type,
        want: &[u8],
        name: &dyn Fn(u32) -> &'a [u8],
    ) -> Option<u32> {
        for &(n, ty, bits) in &t.members {
            if n != 0 {
                if name(n) == want {
                    return Some(bits);
                }
                continue;
            }
            let mut inner = types.get(ty as usize)?;
            // Through typedefs and qualifiers to the anonymous aggregate.
            while !matches!(inner.kind, KIND_STRUCT | KIND_UNION) && inner.refers != 0 {
                inner = types.get(inner.refers as usize)?;
            }
            if let Some(b) = find(types, inner, want, name) {
                return Some(bits + b);
            }
        }
        None
    }
    let at = |field: &[u8]| find(&types, task, field, &name).map(|bits| bits / 8);
    Some(TaskOffsets {
        pid: at(b"pid")?,
        group_leader: at(b"group_leader")?,
        comm: at(b"comm")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This kernel's offsets: found, inside the struct, and in the order every kernel since 2.6
    /// declares them (pid before group_leader before comm).
    #[test]
    fn task_struct_offsets_of_this_kernel() {
        let o = task_offsets().expect("this kernel has BTF");
        assert!(o.pid < o.group_leader && o.group_leader < o.comm, "{o:?}");
        assert!(o.comm < 16384, "{o:?}");
        assert_eq!(o.group_leader % 8, 0, "{o:?}");
    }

    #[test]
    fn not_btf_is_none() {
        assert_eq!(parse(b"not btf at all, long enough for a header"), None);
        assert_eq!(parse(&[]), None);
    }
}
