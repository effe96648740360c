//! The grace period a call waits for, timed inside `synchronize_rcu*` (fentry).

use aya_ebpf::{
    macros::{fentry, fexit},
    programs::{FEntryContext, FExitContext},
};

use crate::{
    call::inside,
    util::{current_tid, now},
};

/// Where the kernel allows fentry: the grace period measured directly, as time inside
/// synchronize_rcu() / synchronize_rcu_expedited() (an inner call is folded into the outer).
#[inline(always)]
pub(crate) fn gp_begin() {
    if let Some(caller) = inside(current_tid())
        && caller.gp_since_ns == 0
    {
        caller.gp_since_ns = now();
    }
}

#[inline(always)]
pub(crate) fn gp_end() {
    if let Some(caller) = inside(current_tid())
        && caller.gp_since_ns != 0
    {
        caller.blocked_ns += now().wrapping_sub(caller.gp_since_ns);
        caller.gp_since_ns = 0;
    }
}

#[fentry(function = "synchronize_rcu")]
pub fn synchronize_rcu_entry(_ctx: FEntryContext) -> u32 {
    gp_begin();
    0
}

#[fexit(function = "synchronize_rcu")]
pub fn synchronize_rcu_exit(_ctx: FExitContext) -> u32 {
    gp_end();
    0
}

#[fentry(function = "synchronize_rcu_expedited")]
pub fn synchronize_rcu_expedited_entry(_ctx: FEntryContext) -> u32 {
    gp_begin();
    0
}

#[fexit(function = "synchronize_rcu_expedited")]
pub fn synchronize_rcu_expedited_exit(_ctx: FExitContext) -> u32 {
    gp_end();
    0
}
