//! The route status writer: while this agent holds the lease, make every route's
//! `status.parents` say what the published snapshot says.
//!
//! Writes are server-side apply patches on the status subresource under our field manager. The
//! list is atomic (see `parents`), so each patch carries the whole list and the resourceVersion
//! it was computed from: if anyone changed the route since, the API server answers 409, we read
//! the status again and recompute. `force` is needed because another controller may own the
//! list; it is safe because their entries are in what we write, unchanged, at that
//! resourceVersion.

use super::parents;
use crate::kube_api::{
    ApiCall, StoredRoute, GRPC_ROUTES, GRPC_ROUTES_STATUS, HTTP_ROUTES, HTTP_ROUTES_STATUS,
    REFERENCE_GRANTS, SERVICES,
};
use crate::publisher::Published;
use crate::sources::Feed;
use gamma_engine::model::RouteKind;
use gamma_engine::routes::status::ParentStatus;
use gamma_engine::routes::Statuses;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::Client;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Our field manager for server-side apply.
pub const FIELD_MANAGER: &str = "gamma-node";

/// Coalesces the changes of a burst into one pass.
const DEBOUNCE: Duration = Duration::from_millis(20);
/// After a failed write, when to try again even if nothing else changes.
pub(super) const RETRY_AFTER: Duration = Duration::from_secs(5);
/// The longest wait between passes that keep failing.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// The wait before trying again after `failed` passes in a row that each left a write undone:
/// doubling from [`RETRY_AFTER`] up to [`MAX_RETRY_AFTER`]. A failure that lasts (a ClusterRole
/// without `httproutes/status` after an upgrade) would otherwise have the leader try every route
/// every 5 s: some 2,000 requests a second for 10,000 routes.
fn retry_after(failed: u32) -> Duration {
    RETRY_AFTER
        .saturating_mul(1 << failed.saturating_sub(1).min(16))
        .min(MAX_RETRY_AFTER)
}
/// Conflicts in a row on one route before leaving it to the next pass.
const CONFLICT_ATTEMPTS: usize = 3;

/// The feeds route status is computed from: the routes, their parent and backend Services, and
/// the grants that permit references across namespaces.
const STATUS_INPUTS: [Feed; 4] = [
    HTTP_ROUTES.kind,
    GRPC_ROUTES.kind,
    SERVICES.kind,
    REFERENCE_GRANTS.kind,
];

/// A feed route status is read from that is not current now, if any.
pub fn behind_input(published: &Published) -> Option<&Feed> {
    published.behind.iter().find(|f| STATUS_INPUTS.contains(f))
}

fn call_for(kind: RouteKind) -> &'static ApiCall {
    match kind {
        RouteKind::Http => &HTTP_ROUTES_STATUS,
        RouteKind::Grpc => &GRPC_ROUTES_STATUS,
    }
}

/// A route as our last write left it, until the route watcher catches up.
struct Written {
    /// The watcher's resourceVersion when we wrote: once it moves, the watcher has seen our
    /// write (or something newer) and this entry is dropped.
    seen_at: String,
    route: Arc<StoredRoute>,
}

pub struct Writer {
    client: Client,
    inputs: watch::Receiver<Published>,
    leader: watch::Receiver<bool>,
    written: HashMap<String, Written>,
    /// What the last pass that wrote everything it had to was computed from.
    reconciled: Option<Reconciled>,
    /// The last pass, if it left a write undone: what it was computed from, and when it ended
    /// (the backoff counts from then).
    failed_on: Option<(Reconciled, tokio::time::Instant)>,
}

/// The inputs of a pass: the table's route status and the routes as the API server has them.
/// Both are shared until they change, so a publish that changed neither (an EndpointSlice, a
/// Pod) is told apart without looking at any route: on a large cluster most publishes are such,
/// and a pass looks at every route.
struct Reconciled {
    statuses: Arc<Statuses>,
    stored_status: Arc<BTreeMap<String, Arc<StoredRoute>>>,
}

impl Reconciled {
    fn of(inputs: &Published) -> Reconciled {
        Reconciled {
            statuses: inputs.snapshot.statuses.clone(),
            stored_status: inputs.stored_status.clone(),
        }
    }

    fn covers(&self, inputs: &Published) -> bool {
        Arc::ptr_eq(&self.statuses, &inputs.snapshot.statuses)
            && Arc::ptr_eq(&self.stored_status, &inputs.stored_status)
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Done,
    /// Not written; try again later.
    Failed,
    /// The lease was lost mid-pass.
    Demoted,
}

impl Writer {
    pub fn new(
        client: Client,
        inputs: watch::Receiver<Published>,
        leader: watch::Receiver<bool>,
    ) -> Writer {
        Writer {
            client,
            inputs,
            leader,
            written: HashMap::new(),
            reconciled: None,
            failed_on: None,
        }
    }

    pub async fn run(mut self) {
        // Passes in a row that left a write undone.
        let mut failed = 0;
        // When the next pass is due after a failed one.
        let mut due: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                changed = self.inputs.changed() => if changed.is_err() { return },
                changed = self.leader.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)),
                    if due.is_some() => {}
            }
            tokio::time::sleep(DEBOUNCE).await;
            if !*self.leader.borrow_and_update() {
                self.written.clear();
                self.reconciled = None;
                self.failed_on = None;
                due = None;
                failed = 0;
                continue;
            }
            let inputs = self.inputs.borrow_and_update().clone();
            if self.reconciled.as_ref().is_some_and(|r| r.covers(&inputs)) {
                continue;
            }
            if let Some((on, failed_at)) = &self.failed_on {
                // After a failed pass, a publish that changed neither the routes nor their
                // status (an EndpointSlice, a Pod: several a second on a busy cluster) waits for
                // the backoff, and one that changed them RETRY_AFTER at most: writes refused
                // (a ClusterRole without `httproutes/status`) are not all sent again at each.
                let backoff = *failed_at + retry_after(failed);
                let next = if on.covers(&inputs) {
                    backoff
                } else {
                    backoff.min(*failed_at + RETRY_AFTER)
                };
                if tokio::time::Instant::now() < next {
                    due = Some(next);
                    continue;
                }
            }
            if let Some(feed) = behind_input(&inputs) {
                // A route whose Service the table has not seen yet would be told it has no
                // parent: wait until the feeds status is read from are current again.
                tracing::info!(%feed, "route status not written while this feed is not current");
                due = None;
                continue;
            }
            let outcome = self.pass(&inputs).await;
            failed = match outcome {
                Outcome::Failed => failed + 1,
                Outcome::Done | Outcome::Demoted => 0,
            };
            self.failed_on = None;
            if outcome == Outcome::Failed {
                tracing::warn!(
                    "route status: some writes failed; trying again in {:?}, or in {:?} if a \
                     route or its status changes",
                    retry_after(failed),
                    RETRY_AFTER
                );
                self.failed_on = Some((Reconciled::of(&inputs), tokio::time::Instant::now()));
            }
            due = self
                .failed_on
                .as_ref()
                .map(|(_, at)| *at + retry_after(failed));
            self.reconciled = (outcome == Outcome::Done).then(|| Reconciled::of(&inputs));
        }
    }

    /// One reconciliation of every route the API server holds.
    async fn pass(&mut self, inputs: &Published) -> Outcome {
        let watched_rv: HashMap<&String, &String> = inputs
            .stored_status
            .iter()
            .map(|(k, r)| (k, &r.resource_version))
            .collect();
        self.written
            .retain(|key, w| watched_rv.get(key).is_some_and(|rv| **rv == w.seen_at));
        let mut outcome = Outcome::Done;
        for (key, watched) in inputs.stored_status.iter() {
            let desired = inputs.snapshot.status_of(key).unwrap_or_default();
            let current = self
                .written
                .get(key)
                .map_or_else(|| watched.clone(), |w| w.route.clone());
            match self.reconcile(key, desired, current, watched).await {
                Outcome::Done => {}
                Outcome::Failed => outcome = Outcome::Failed,
                Outcome::Demoted => return Outcome::Demoted,
            }
        }
        outcome
    }

    async fn reconcile(
        &mut self,
        key: &str,
        desired: &[ParentStatus],
        mut current: Arc<StoredRoute>,
        watched: &StoredRoute,
    ) -> Outcome {
        let call = call_for(current.kind);
        let api: Api<DynamicObject> = Api::namespaced_with(
            self.client.clone(),
            &current.namespace,
            &call.api_resource(),
        );
        for _ in 0..CONFLICT_ATTEMPTS {
            if !parents::same_generation(desired, &current) {
                return Outcome::Done; // the index has not caught up yet: the next pass will
            }
            let Some(parents) = parents::plan(desired, &current, &parents::now_rfc3339()) else {
                return Outcome::Done;
            };
            // Checked right before each write: a demoted leader must not write.
            if !*self.leader.borrow() {
                return Outcome::Demoted;
            }
            let body = serde_json::json!({
                "apiVersion": call.api_version(),
                "kind": call.kind,
                "metadata": {
                    "name": current.name,
                    "namespace": current.namespace,
                    "resourceVersion": current.resource_version,
                },
                "status": {"parents": parents},
            });
            let params = PatchParams::apply(FIELD_MANAGER).force();
            match api
                .patch_status(&current.name, &params, &Patch::Apply(&body))
                .await
            {
                Ok(object) => {
                    self.remember(
                        key,
                        watched,
                        StoredRoute::from_object(current.kind, &object),
                    );
                    tracing::info!(route = key, "route status written");
                    return Outcome::Done;
                }
                Err(kube::Error::Api(s)) if s.is_conflict() => {
                    tracing::debug!(
                        route = key,
                        "the route changed since it was read; reading its status again"
                    );
                    match api.get_status(&current.name).await {
                        Ok(object) => {
                            current = self.remember(
                                key,
                                watched,
                                StoredRoute::from_object(current.kind, &object),
                            );
                        }
                        // Deleted meanwhile: nothing to report on (not a failed write).
                        Err(kube::Error::Api(s)) if s.is_not_found() => return Outcome::Done,
                        Err(e) => return failed(key, &e),
                    }
                }
                // Deleted meanwhile: nothing to report on.
                Err(kube::Error::Api(s)) if s.is_not_found() => return Outcome::Done,
                Err(e) => return failed(key, &e),
            }
        }
        Outcome::Failed
    }

    fn remember(
        &mut self,
        key: &str,
        watched: &StoredRoute,
        route: StoredRoute,
    ) -> Arc<StoredRoute> {
        let route = Arc::new(route);
        self.written.insert(
            key.to_string(),
            Written {
                seen_at: watched.resource_version.clone(),
                route: route.clone(),
            },
        );
        route
    }
}

/// Takes this implementation's entries out of every route's `status.parents` (other
/// controllers' stay): one pass of the writer as leader of a table with no route, over every
/// route the API server holds. Whether each was cleared.
pub async fn clear_routes(client: Client) -> anyhow::Result<bool> {
    use anyhow::Context as _;
    let mut stored = BTreeMap::new();
    for (kind, call) in [
        (RouteKind::Http, &HTTP_ROUTES),
        (RouteKind::Grpc, &GRPC_ROUTES),
    ] {
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &call.api_resource());
        let routes = match api.list(&Default::default()).await {
            Ok(routes) => routes,
            // The CRD is not installed: no route of the kind to clear.
            Err(kube::Error::Api(s)) if s.is_not_found() => continue,
            Err(e) => return Err(e).with_context(|| format!("listing {}", call.describe())),
        };
        for object in &routes.items {
            let route = StoredRoute::from_object(kind, object);
            let key = format!("{} {}/{}", call.kind, route.namespace, route.name);
            stored.insert(key, Arc::new(route));
        }
    }
    let inputs = Published {
        stored_status: Arc::new(stored),
        ..Published::default()
    };
    let (_leading, leader) = watch::channel(true);
    let mut writer = Writer::new(client, watch::channel(inputs.clone()).1, leader);
    Ok(writer.pass(&inputs).await == Outcome::Done)
}

fn failed(key: &str, error: &kube::Error) -> Outcome {
    tracing::warn!(route = key, error = %error, "writing route status failed");
    Outcome::Failed
}

#[cfg(test)]
mod tests {
    use super::*;
    use gamma_engine::routes::Snapshot;

    /// Passes that keep failing are tried again less and less often: 5 s, 10 s, 20 s… up to
    /// 5 min.
    #[test]
    fn failing_passes_back_off() {
        let waits: Vec<u64> = [1, 2, 3, 4, 7, 8, 40]
            .map(|n| retry_after(n).as_secs())
            .into();
        assert_eq!(waits, [5, 10, 20, 40, 300, 300, 300]);
    }

    /// A publish that changed neither the table's route status nor the routes the API server
    /// holds (an EndpointSlice, a Pod) needs no pass; one that changed either does.
    #[test]
    fn only_a_publish_that_changed_status_or_routes_is_reconciled_again() {
        let inputs = Published::default();
        let reconciled = Reconciled::of(&inputs);
        let endpoints_only = Published {
            snapshot: Arc::new(Snapshot {
                version: 2,
                statuses: inputs.snapshot.statuses.clone(),
                ..Snapshot::default()
            }),
            ..inputs.clone()
        };
        assert!(reconciled.covers(&endpoints_only));
        let new_status = Published {
            snapshot: Arc::new(Snapshot::default()),
            ..inputs.clone()
        };
        assert!(!reconciled.covers(&new_status));
        let route_written = Published {
            stored_status: Arc::new(BTreeMap::new()),
            ..inputs
        };
        assert!(!reconciled.covers(&route_written));
    }
}
