//! What a call waits for, for the breakdown (`BREAKDOWN`): off-CPU time, IPIs, mutex
//! wait, the grace period.

pub(crate) mod grace;
pub(crate) mod ipi;
pub(crate) mod lock;
pub(crate) mod sched;
