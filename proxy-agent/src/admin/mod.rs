//! The admin server: health, metrics, the current table, and explanations of decisions.
//! It runs on its own small runtime so that scraping never adds data-plane tail latency.

pub mod explain;
pub mod server;
