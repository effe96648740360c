//! End-to-end tests: the real eBPF programs, loaded as root, against workloads that issue a
//! known mix of membarrier calls. Run them with `cargo xtask test` (as root). One binary, so
//! that the machine lock in `common` covers every test; a module per feature. A test is one
//! scenario read top to bottom (workload, tracer, each check with its reason): the few over 80
//! lines are long for their checks, not for logic to split.

mod attach;
mod breakdown;
mod calibrate;
mod cli;
mod common;
mod counts;
mod dashboard;
mod prometheus;
mod rcu;
mod record;
mod stacks;
mod symbols;
