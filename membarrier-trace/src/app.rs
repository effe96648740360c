//! What the binary runs: the command line, the tracing session and its tick, the command it
//! traces, the exporter's server, and `calibrate`.

pub mod calibrate;
pub mod cli;
pub mod exporter;
pub mod session;
pub mod spawn;
