//! Telemetry, the bottom layer of the agent: what the agent counts (`metrics`, with the request series in `requests`) and whether it may
//! take traffic (`readiness`). Every other module may use it; it uses none of them.

pub mod access_log;
pub mod log_writer;
pub mod metrics;
pub mod readiness;
pub mod requests;

pub use metrics::Metrics;
pub use readiness::{unix_now, Readiness};
