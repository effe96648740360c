//! From the kernel to a [`crate::model::Snapshot`]: what the running kernel can do, loading
//! and attaching the eBPF programs (the probe tables, the maps' sizes), reading their maps,
//! and retiring exited processes.

pub mod btf;
pub mod collector;
pub mod kernel;
pub mod kstacks;
pub mod maps;
mod probes;
pub mod rcu;
mod read;
mod retire;
mod retired;
mod uprobe_multi;
