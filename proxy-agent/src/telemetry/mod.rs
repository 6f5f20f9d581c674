//! Telemetry, the bottom layer of the agent: what the agent counts (`metrics`) and whether it may
//! take traffic (`readiness`). Every other module may use it; it uses none of them.

pub mod metrics;
pub mod readiness;

pub use metrics::Metrics;
pub use readiness::{unix_now, Readiness};
