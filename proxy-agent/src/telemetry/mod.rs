//! Telemetry, the bottom layer of the agent: what the agent counts (`metrics`, with the request series in `requests`), whether it may
//! take traffic (`readiness`), and how its log is written (`log_writer`, with the access log's
//! lines in `access_log`). Every other module may use it; it uses none of them.

pub mod access_log;
pub mod log_writer;
pub mod metrics;
pub mod readiness;
pub mod requests;

pub use metrics::Metrics;
pub use readiness::{unix_now, Readiness};
