//! A report drawn for a reader: text and JSON, Prometheus metrics, the live dashboard, a
//! recording as an SVG picture, with
//! their units in one place.

pub mod prometheus;
pub mod protobuf;
pub mod svg;
pub mod text;
pub mod tui;
pub mod units;
