//! What the binary runs: the command line, the tracing session and its tick, the command it
//! traces, the exporter's server, `calibrate`, and `symbolize` (a saved report named later).

pub mod calibrate;
pub mod cli;
pub mod exporter;
pub mod session;
pub mod spawn;
pub mod symbolize;
