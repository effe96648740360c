// Empty on purpose: the userspace crate build-depends on this crate so that cargo rebuilds the
// eBPF object when this crate changes; the programs themselves are the binary in main.rs.
#![no_std]
