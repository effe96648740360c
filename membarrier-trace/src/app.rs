//! What the binary runs: the command line, the tracing session and its tick, the command it
//! traces, the exporter's server, `calibrate`, `symbolize` (a saved report named later), and
//! `report` (a recording read back).

pub mod calibrate;
pub mod cli;
pub mod exporter;
pub mod report;
pub mod session;
pub mod spawn;
pub mod symbolize;
