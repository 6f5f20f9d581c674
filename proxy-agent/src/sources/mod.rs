//! Where objects come from: a folder of manifests (`file`) or a cluster (`kube`).
//!
//! A source translates the outside world into [`Update`]s sent to the publisher over one
//! channel, and knows nothing of routing: it holds no index and publishes nothing.
//!
//! The channel contract, for a new source (one file that sends updates):
//! - **Feeds.** A source is made of feeds, one per kind of object it follows (the Kubernetes
//!   source: one per watched kind; the manifest folder: one). Their names are given to the
//!   publisher when it is built ([`crate::publisher::Publisher::new`]); the first table is published
//!   once every feed has reported [`Health::Synced`] or [`Health::Absent`], so no request sees a
//!   partial table.
//! - **Objects.** `Apply` adds or replaces an object, `Delete` removes one. A feed that lists its
//!   kind again (after an outage) deletes what vanished before it reports `Synced`.
//! - **Health.** `Failing { since }` when a feed loses its source: the publisher keeps serving the
//!   last good objects and `/ready` reports the table as stale until the feed is `Synced` again.
//! - **Stored status.** A source that stores route status (the API server) reports each route's
//!   status as stored, so that the status writer can diff what the snapshot implies against it.
//! - Updates are applied in order and published in batches (a few milliseconds of quiet, at most
//!   100 ms): send related changes back to back.

pub mod file;
pub mod kube;

use crate::kube_api::StoredRoute;
use gamma_engine::model::{Object, RouteKey};
use gamma_engine::ObjectRef;
use std::sync::Arc;

/// The name of a feed: the kind it follows (`Service`, `HTTPRoute`, …) or the source it is
/// (`manifests`).
pub type Feed = &'static str;

/// What a source tells the publisher.
#[derive(Debug)]
pub enum Update {
    Apply(Object),
    Delete(ObjectRef),
    /// A route's status as the API server stores it, for the status writer; `None` once the
    /// route is deleted.
    StoredStatus(RouteKey, Option<Arc<StoredRoute>>),
    Health(Feed, Health),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// A complete list arrived since the last error: the feed is current.
    Synced,
    /// The source does not serve the kind (its CRD is not installed): it holds no objects.
    Absent,
    /// Failing since this Unix time; the last good objects stay.
    Failing { since: u64 },
}

/// The sending half of the publisher's channel.
pub type Updates = tokio::sync::mpsc::Sender<Update>;
