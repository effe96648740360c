//! Names for what the kernel hands over as addresses: callers and stack frames, placed in the
//! files a process maps while it lives, unwound and symbolized.

pub mod module;
pub mod procmaps;
pub mod stacks;
pub mod symbolize;
pub mod unwind;
