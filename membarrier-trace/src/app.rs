//! What the binary runs besides the tracing loop (in main.rs): the command line, the
//! exporter's server, and `calibrate`.

pub mod calibrate;
pub mod cli;
pub mod exporter;
