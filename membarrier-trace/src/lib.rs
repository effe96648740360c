//! membarrier-trace: exact per-process accounting of membarrier(2) calls.
//!
//! [`collector`] loads the eBPF programs and reads their in-kernel aggregates into a
//! [`model::Snapshot`]; [`model::Model`] turns snapshots into [`model::Report`]s; [`output`]
//! renders reports as text or JSON, [`tui`] as a live dashboard, [`exporter`] as Prometheus
//! metrics ([`exposition`]).

pub mod btf;
pub mod calibrate;
pub mod cli;
pub mod cmd;
pub mod collector;
pub mod exporter;
pub mod exposition;
pub mod findings;
pub mod hist;
pub mod hook;
pub mod kernel;
pub mod kstacks;
pub mod model;
pub mod output;
pub mod preflight;
pub mod procmaps;
pub mod rcu;
pub mod ring;
pub mod siblings;
pub mod symbolize;
pub mod tui;
pub mod unwind;
