//! membarrier-trace: exact per-process accounting of membarrier(2) calls.
//!
//! The folders are the data path:
//! - [`collect`] loads the eBPF programs, attaches them and reads the kernel's aggregates
//!   (and the rings of exited processes, callers and stack samples) into a
//!   [`model::Snapshot`];
//! - [`enrich`] names what the kernel gave as addresses: callers and stack frames, from the
//!   mapped files;
//! - [`model`] turns snapshots into [`model::Report`]s (percentiles, findings, cmd names);
//! - [`render`] draws a report: text and JSON, Prometheus metrics, the dashboard;
//! - [`store`] keeps snapshots in a recording file and reads them back (`record`, `report`);
//! - [`app`] is what the binary runs: the command line, the exporter's server, calibration.
//!
//! [`hook`] (the syscall hooks and attach modes), [`preflight`] (checks and /proc reads before
//! and while tracing), [`ring`] (the kernel's ring buffers, each read by a thread) and
//! [`siblings`] (sibling threads for the workload) are leaves every layer may use.

pub mod app;
pub mod collect;
pub mod enrich;
pub mod hook;
pub mod model;
pub mod preflight;
pub mod render;
pub mod ring;
pub mod siblings;
pub mod store;
