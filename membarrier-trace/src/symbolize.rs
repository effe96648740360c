//! Names the code that called a grace-period function: blazesym (the symbolizer libbpf-tools
//! and bpftrace use) over the process's own mappings.

use crate::model::Caller;

/// Symbolizes callers with blazesym, by the process's own mappings (so it must be alive).
pub struct Symbolizer {
    inner: blazesym::symbolize::Symbolizer,
}

impl Default for Symbolizer {
    fn default() -> Self {
        Self {
            inner: blazesym::symbolize::Symbolizer::new(),
        }
    }
}

impl Symbolizer {
    /// The caller at return address `addr` in process `pid`; `None` when the process is gone.
    pub fn caller(&self, pid: u32, addr: u64) -> Option<Caller> {
        use blazesym::symbolize::{Input, Symbolized, source::Process, source::Source};
        if pid == 0 || !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            return None;
        }
        let src = Source::Process(Process::new(blazesym::Pid::from(pid)));
        // The call instruction ends at the return address: look up the byte before it, so a
        // call that is the last instruction of a function is not put in the next one.
        let looked_up = addr.saturating_sub(1);
        let sym = self
            .inner
            .symbolize_single(&src, Input::AbsAddr(looked_up))
            .ok()?;
        let mut c = Caller {
            address: addr,
            ..Default::default()
        };
        match sym {
            Symbolized::Sym(s) => {
                c.symbol = Some(s.name.to_string());
                c.offset = Some(s.offset as u64 + 1);
                c.module = s.module.map(|m| m.to_string_lossy().into_owned());
                if let Some(ci) = s.code_info {
                    c.file = Some(ci.to_path().display().to_string());
                    c.line = ci.line;
                }
            }
            Symbolized::Unknown(_) => {}
        }
        Some(c)
    }
}
