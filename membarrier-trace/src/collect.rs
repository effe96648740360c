//! From the kernel to a [`crate::model::Snapshot`]: what the running kernel can do, loading and
//! attaching the eBPF programs, reading and retiring their maps, and the rings' threads.

pub mod btf;
pub mod collector;
pub mod kernel;
pub mod kstacks;
pub mod rcu;
pub mod ring;
