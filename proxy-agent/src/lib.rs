//! gamma-node's per-node agent: the route engine (pure), its sources, the data plane and the
//! kernel redirect.

pub mod admin;
pub mod agent;
pub mod features;
pub mod handover;
pub mod index;
pub mod model;
pub mod proxy;
pub mod redirect;
pub mod routes;
pub mod sources;
