//! gamma-engine: the Gateway API mesh (GAMMA) semantics, pure.
//!
//! Objects in, an immutable route table out, and the lookup that decides what happens to a
//! request. No sockets, clocks, async runtime or Kubernetes client: everything here is tested
//! without I/O, and the agent, the fuzz targets and the benchmarks build on it alone.
//!
//! ```text
//!  manifests::parse / model::Object::from_value     Index::apply / delete      Frontend::lookup
//!  (YAML or API JSON → Object, defaults, refusals) ─> (incremental) ─publish─> (rule by precedence,
//!                                                                                plan to forward)
//! ```
//!
//! - [`model`]: the narrow, owned view of Service, EndpointSlice, Pod, HTTPRoute and GRPCRoute the
//!   engine keeps, converted once with the CRD defaults applied and the schema's refusals enforced.
//! - [`index`]: [`Index`] takes `apply`/`delete` and recompiles only the Services a change touches;
//!   `publish` makes a new [`Snapshot`] current only when the result differs.
//! - [`routes`]: matching, precedence, filters, backends, route status; [`Snapshot`] and its
//!   lookup.
//! - [`manifests`]: manifest text → objects, with problems located by file, document and field.
//! - [`features`]: the Gateway API features this implementation supports (one list).
#![forbid(unsafe_code)]

pub mod features;
pub mod index;
pub mod manifests;
pub mod model;
pub mod routes;

pub use index::{Index, ObjectRef};
pub use model::{Object, ObjectKey};
pub use routes::{Decision, RequestHead, Snapshot};
