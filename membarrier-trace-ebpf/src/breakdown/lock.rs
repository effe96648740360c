//! Mutex wait inside a call (`lock:contention_begin/end`, Linux 5.19).

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};

use crate::{
    call::inside,
    util::{current_tid, now},
};

#[tracepoint]
pub fn contention_begin(_ctx: TracePointContext) -> u32 {
    if let Some(caller) = inside(current_tid()) {
        caller.lock_since_ns = now();
    }
    0
}

#[tracepoint]
pub fn contention_end(_ctx: TracePointContext) -> u32 {
    if let Some(caller) = inside(current_tid())
        && caller.lock_since_ns != 0
    {
        caller.mutex_wait_ns += now().wrapping_sub(caller.lock_since_ns);
        caller.lock_since_ns = 0;
    }
    0
}
