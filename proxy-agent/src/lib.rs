//! gamma-node's per-node agent. The Gateway API semantics are the engine's (`gamma_engine`);
//! this crate moves objects in and traffic through:
//!
//! ```text
//!  sources (file, kube) ──Update──> publisher (owns the Index) ──Arc<Snapshot>──> proxy (data plane)
//!                                                              └─Published──> redirect maps, status, metrics pruning
//! ```
//!
//! Modules, from the bottom up: `telemetry` (metrics, readiness; uses no other module),
//! `kube_api` (every Kubernetes call), `sources`, `publisher`, `proxy`, `redirect`, `status`,
//! `admin`, `handover`, and `agent` (wiring and lifecycle).

pub mod admin;
pub mod agent;
pub mod handover;
pub mod kube_api;
pub mod proxy;
pub mod publisher;
pub mod redirect;
pub mod sources;
pub mod status;
pub mod telemetry;

#[cfg(test)]
pub(crate) mod test_dir;
