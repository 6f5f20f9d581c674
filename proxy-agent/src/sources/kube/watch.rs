//! One kube-rs watcher per kind, translated into updates for the publisher (one feed per kind).
//!
//! kube-rs lists, then watches from the list's resourceVersion, and on `410 Gone` lists again.
//! A list arrives as `Init`, `InitApply`…, `InitDone`: the keys seen between `Init` and `InitDone`
//! are the whole set, so whatever this kind applied before and is not among them was deleted
//! during a watch gap and is deleted from the index.
//!
//! After any error the watcher is dropped and, after kube-rs's default backoff (exponential with
//! jitter, 0.8 s up to 30 s), a new one lists from scratch. kube-rs would resume a broken watch
//! silently from its last resourceVersion; relisting instead gives a point (`InitDone`) at which
//! the kind is known to be complete again, which is what `/ready` reports as no longer stale. The
//! backoff's jitter spreads the relists of many nodes after an API server restart. A watch that
//! held [`WATCH_HELD`] after its list resets the backoff, so each outage is retried from the
//! shortest delay; one that fails sooner (refused, or cut by a proxy within seconds) keeps
//! backing off rather than relisting every second.

use crate::kube_api::{self as api, ApiCall, StoredRoute};
use crate::sources::{Feed, Health, Update};
use crate::telemetry::unix_now;
use futures::StreamExt;
use gamma_engine::index::ObjectRef;
use gamma_engine::model::{Object, ObjectError, ObjectKey, RouteKey, RouteKind};
use kube::api::{Api, DynamicObject};
use kube::runtime::utils::Backoff;
use kube::runtime::watcher::{self, DefaultBackoff, Event};
use kube::Client;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// The kinds the agent follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Watched {
    Service,
    EndpointSlice,
    Pod,
    HttpRoute,
    GrpcRoute,
    ReferenceGrant,
    /// This agent's Node (its zone), when the node's name is known.
    Node,
    /// Namespaces: their pods may opt in to local sockets as a whole.
    Namespace,
}

impl Watched {
    pub const ALL: [Watched; 8] = [
        Watched::Service,
        Watched::EndpointSlice,
        Watched::Pod,
        Watched::HttpRoute,
        Watched::GrpcRoute,
        Watched::ReferenceGrant,
        Watched::Node,
        Watched::Namespace,
    ];

    /// The kinds followed with this configuration: the Node only when its name is known.
    pub fn followed(config: &super::KubeConfig) -> impl Iterator<Item = Watched> + '_ {
        Watched::ALL
            .into_iter()
            .filter(|k| *k != Watched::Node || config.node_name.is_some())
    }

    /// The table entry the watcher is built from.
    pub fn call(self) -> &'static ApiCall {
        match self {
            Watched::Service => &api::SERVICES,
            Watched::EndpointSlice => &api::ENDPOINT_SLICES,
            Watched::Pod => &api::PODS,
            Watched::HttpRoute => &api::HTTP_ROUTES,
            Watched::GrpcRoute => &api::GRPC_ROUTES,
            Watched::ReferenceGrant => &api::REFERENCE_GRANTS,
            Watched::Node => &api::NODES,
            Watched::Namespace => &api::NAMESPACES,
        }
    }

    /// The publisher's name for this watcher's feed.
    pub fn feed(self) -> Feed {
        self.call().kind
    }

    /// Whether the API server may not serve the kind: a custom resource, whose CRD may not be
    /// installed (or was removed). A 404 for a built-in kind says nothing of the kind (a proxy
    /// in front of the API server answers so while its backend is down): a failure.
    fn may_be_absent(self) -> bool {
        matches!(
            self,
            Watched::HttpRoute | Watched::GrpcRoute | Watched::ReferenceGrant
        )
    }

    pub fn route_kind(self) -> Option<RouteKind> {
        match self {
            Watched::HttpRoute => Some(RouteKind::Http),
            Watched::GrpcRoute => Some(RouteKind::Grpc),
            _ => None,
        }
    }

    fn reference(self, key: ObjectKey) -> ObjectRef {
        let route = |kind| {
            ObjectRef::Route(RouteKey {
                kind,
                key: key.clone(),
            })
        };
        match self {
            Watched::Service => ObjectRef::Service(key),
            Watched::EndpointSlice => ObjectRef::EndpointSlice(key),
            Watched::Pod => ObjectRef::Pod(key),
            Watched::HttpRoute => route(RouteKind::Http),
            Watched::GrpcRoute => route(RouteKind::Grpc),
            Watched::ReferenceGrant => ObjectRef::ReferenceGrant(key),
            Watched::Node => ObjectRef::Node(key.name.into()),
            Watched::Namespace => ObjectRef::Namespace(key.name),
        }
    }
}

/// Runs the watcher of `kind` until the receiving side is gone.
pub async fn run(
    kind: Watched,
    client: Client,
    config: watcher::Config,
    updates: mpsc::Sender<Update>,
) {
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &kind.call().api_resource());
    let mut state = KindState::new(kind, updates);
    let mut backoff = DefaultBackoff::default();
    loop {
        let mut events = std::pin::pin!(watcher::watcher(api.clone(), config.clone()));
        let error = loop {
            match events.next().await {
                Some(Ok(event)) => {
                    if state.handle(event).await.is_err() {
                        return; // the index task is gone: shutting down
                    }
                }
                Some(Err(e)) => break e,
                None => return, // a watcher stream does not end
            }
        };
        if state.watch_held() {
            // Current for a while: this outage starts from the shortest delay, not from where
            // the last one left the exponential backoff. A watch that fails right after its list
            // (refused, or cut by a proxy) keeps backing off: each retry is a whole list.
            backoff.reset();
        }
        let delay = backoff.next().unwrap_or(Duration::from_secs(30));
        let server_starting =
            api_status(&error).is_some_and(|s| s.code == 404) && !api_server_ready(&client).await;
        if state.failed(error, delay, server_starting).await.is_err() {
            return;
        }
        tokio::time::sleep(delay).await;
    }
}

/// Whether the API server says it is ready (`/readyz`, which every client may read by default):
/// one that is starting answers 404 for the custom resources it serves until it has read their
/// definitions (kubernetes/kubernetes#115241), and is not ready until then. `true` when it cannot
/// tell (no `/readyz`, not allowed to read it, or no answer). Behind a load balancer the probe
/// may reach another API server than the 404 came from: a starting one is then taken for ready
/// (the kind is absent until the next list), as before this check.
async fn api_server_ready(client: &Client) -> bool {
    let request = http::Request::get(crate::kube_api::SERVER_READY)
        .body(kube::client::Body::empty())
        .expect("a valid request");
    match client.send(request).await {
        // Not ready: it says so with 500 (a check failing). 401 or 403 (the default binding that
        // lets every client read it removed) or 404 tell nothing, nor does no answer.
        Ok(answer) => !answer.status().is_server_error(),
        Err(_) => true,
    }
}

/// The receiving side is gone.
struct Closed;

struct KindState {
    kind: Watched,
    updates: mpsc::Sender<Update>,
    /// Keys this kind has applied to the index (converted at least once, not deleted since).
    known: HashSet<ObjectKey>,
    /// Of those, the keys with a good version in the index (a refused route may have none), and
    /// the uid of the object that version is of.
    good: HashMap<ObjectKey, Option<String>>,
    /// During a list: the keys seen so far.
    listed: Option<HashSet<ObjectKey>>,
    failures: u32,
    failing_since: Option<u64>,
    /// Listed completely at least once: the index holds this kind's objects.
    listed_once: bool,
    /// Since when the API server answers 404 for this kind, which it served before.
    not_served_since: Option<Instant>,
    /// When the last list completed, and since when the outage it ended had lasted (Unix time):
    /// a watch that fails soon after is the same outage.
    current_since: Option<(Instant, Option<u64>)>,
}

/// How long a watch must hold after its list for the next failure to count as a new outage (and
/// its retries to start again from the shortest delay). A watch refused right after its list (a
/// role without `watch`) fails within milliseconds, and keeps backing off; so does one a proxy
/// cuts within this time. 30 s, as before, also kept growing the delay across API server
/// restarts a rolling control-plane upgrade spaces by 15 to 30 s (the churn soak's outages, 24 s
/// apart, were caught up ever later, the fourth never); a proxy that cuts quiet watches every 10
/// to 30 s now has each node relist that kind at each cut, from the shortest delay.
const WATCH_HELD: Duration = Duration::from_secs(10);

/// How long a kind the API server served must be answered 404 before its objects are dropped:
/// an API server starting up can answer 404 for a custom resource it serves
/// (kubernetes/kubernetes#115241), and a CRD really deleted deletes its objects first, which the
/// watch reports one by one.
const NOT_SERVED_GRACE: Duration = Duration::from_secs(60);

impl KindState {
    fn new(kind: Watched, updates: mpsc::Sender<Update>) -> Self {
        KindState {
            kind,
            updates,
            known: HashSet::new(),
            good: HashMap::new(),
            listed: None,
            failures: 0,
            failing_since: None,
            listed_once: false,
            not_served_since: None,
            current_since: None,
        }
    }

    /// Whether the watch held for [`WATCH_HELD`] after its last list.
    fn watch_held(&self) -> bool {
        self.current_since
            .is_some_and(|(at, _)| at.elapsed() >= WATCH_HELD)
    }

    async fn send(&self, update: Update) -> Result<(), Closed> {
        self.updates.send(update).await.map_err(|_| Closed)
    }

    async fn handle(&mut self, event: Event<DynamicObject>) -> Result<(), Closed> {
        match event {
            Event::Init => self.listed = Some(HashSet::new()),
            Event::InitApply(object) => {
                if let Some(listed) = &mut self.listed {
                    listed.insert(key_of(&object));
                }
                self.apply(&object).await?;
            }
            Event::InitDone => {
                let listed = self.listed.take().unwrap_or_default();
                let gone: Vec<ObjectKey> = self.known.difference(&listed).cloned().collect();
                if !gone.is_empty() {
                    tracing::info!(
                        kind = self.kind.call().kind,
                        count = gone.len(),
                        "deleted while the watch was interrupted; removing"
                    );
                }
                for key in gone {
                    self.delete(key).await?;
                }
                let outage = self.failing_since.take();
                self.current_since = Some((Instant::now(), outage));
                if outage.is_some() {
                    tracing::info!(
                        kind = self.kind.call().kind,
                        "listed again after {} failed attempt(s); current",
                        self.failures
                    );
                }
                self.failures = 0;
                self.listed_once = true;
                self.not_served_since = None;
                self.send(Update::Health(self.kind.feed(), Health::Synced))
                    .await?;
            }
            Event::Apply(object) => self.apply(&object).await?,
            Event::Delete(object) => self.delete(key_of(&object)).await?,
        }
        Ok(())
    }

    async fn apply(&mut self, object: &DynamicObject) -> Result<(), Closed> {
        let key = key_of(object);
        let uid = object.metadata.uid.clone();
        let converted = convert(self.kind.call(), object);
        // A namesake of an object deleted while the watch was down: the deleted object's last
        // good version must not stand in for this one's invalid one.
        if converted.is_err() && self.good.get(&key).is_some_and(|good| *good != uid) {
            self.delete(key.clone()).await?;
        }
        if let Some(kind) = self.kind.route_kind() {
            let route = RouteKey {
                kind,
                key: key.clone(),
            };
            let server = StoredRoute::from_object(kind, object);
            self.send(Update::StoredStatus(route, Some(Arc::new(server))))
                .await?;
        }
        match converted {
            Ok(converted) => {
                self.known.insert(key.clone());
                self.good.insert(key, uid);
                self.send(Update::Apply(converted)).await?;
            }
            Err(e) => {
                let kept = if self.good.contains_key(&key) {
                    "its last good version stays in use"
                } else {
                    "it is ignored"
                };
                tracing::error!(
                    object = %format!("{} {key}", self.kind.call().kind),
                    error = %e,
                    "invalid object: {kept} until it is fixed"
                );
                // A route's status says so (known: a later delete clears it).
                if let Some(refused) = e.refused_route() {
                    self.known.insert(key);
                    self.send(Update::Apply(Object::RefusedRoute(refused.clone())))
                        .await?;
                }
            }
        }
        Ok(())
    }

    async fn delete(&mut self, key: ObjectKey) -> Result<(), Closed> {
        self.known.remove(&key);
        self.good.remove(&key);
        if let Some(kind) = self.kind.route_kind() {
            let route = RouteKey {
                kind,
                key: key.clone(),
            };
            self.send(Update::StoredStatus(route, None)).await?;
        }
        self.send(Update::Delete(self.kind.reference(key))).await
    }

    /// Reports an error; a kind the API server does not serve is emptied. `server_starting`: the
    /// error is a 404 from an API server not ready yet, which says nothing of the kind.
    async fn failed(
        &mut self,
        error: watcher::Error,
        retry: Duration,
        server_starting: bool,
    ) -> Result<(), Closed> {
        self.failures += 1;
        self.listed = None;
        let held = self.watch_held();
        if let Some((_, outage)) = self.current_since.take().filter(|_| !held) {
            // The outage the list seemed to end goes on: stale since its start.
            self.failing_since = self.failing_since.or(outage);
        }
        let call = self.kind.call();
        let status = api_status(&error);
        let not_found =
            self.kind.may_be_absent() && status.is_some_and(|s| s.code == 404) && !server_starting;
        if !not_found {
            // The grace counts 404s in a row: other failures between them (an API server down,
            // then starting again) are no sign that the kind went.
            self.not_served_since = None;
        }
        let not_served_since =
            not_found.then(|| *self.not_served_since.get_or_insert_with(Instant::now));
        let served_before = !self.known.is_empty();
        if server_starting {
            tracing::warn!(
                kind = call.kind,
                "the API server answers 404 for {} while it is not ready (starting): retrying in \
                 {retry:?}",
                call.describe()
            );
        } else if let Some(since) = not_served_since.filter(|_| served_before) {
            if since.elapsed() < NOT_SERVED_GRACE {
                tracing::warn!(
                    kind = call.kind,
                    objects = self.known.len(),
                    "the API server answers 404 for {}, which it served: keeping its objects \
                     unless it goes on for {NOT_SERVED_GRACE:?}; retrying in {retry:?}",
                    call.describe()
                );
                let since = *self.failing_since.get_or_insert_with(unix_now);
                return self
                    .send(Update::Health(self.kind.feed(), Health::Failing { since }))
                    .await;
            }
        }
        if not_served_since.is_some() {
            if self.failures == 1 {
                tracing::warn!(
                    "{} ({}) is not served by the API server: the Gateway API CRDs are not installed. \
                     Install them (v1.1 or later, standard channel; see the README's Kubernetes section); \
                     until then the agent routes no {} and keeps checking",
                    call.kind,
                    call.describe(),
                    call.kind
                );
            } else {
                tracing::debug!(kind = call.kind, ?retry, "still not served");
            }
            let known: Vec<ObjectKey> = self.known.iter().cloned().collect();
            for key in known {
                self.delete(key).await?;
            }
            self.failing_since = None;
            return self
                .send(Update::Health(self.kind.feed(), Health::Absent))
                .await;
        }
        // Before this kind's first list the agent has no table to serve: it is not ready.
        let serving = if self.listed_once {
            "serving the last good table"
        } else {
            "not ready until it is listed"
        };
        if status.is_some_and(|s| s.code == 403) {
            tracing::error!(
                "forbidden to list/watch {}: the agent's ClusterRole must grant {:?} on it \
                 (`proxy-agent --print-rbac` lists every rule); {serving}, retrying in {retry:?}",
                call.describe(),
                call.verbs
            );
        } else if status.is_some_and(|s| s.code == 410) {
            tracing::info!(
                kind = call.kind,
                "resourceVersion expired (410 Gone); listing again in {retry:?}"
            );
        } else {
            tracing::warn!(
                kind = call.kind,
                error = %error,
                attempt = self.failures,
                "watch failed: the API server is unreachable or failing; {serving}, retrying in {retry:?}"
            );
        }
        let since = *self.failing_since.get_or_insert_with(unix_now);
        self.send(Update::Health(self.kind.feed(), Health::Failing { since }))
            .await
    }
}

fn api_status(error: &watcher::Error) -> Option<&kube::core::Status> {
    match error {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => Some(s),
        watcher::Error::WatchError(s) => Some(s),
        _ => None,
    }
}

/// `namespace/name`, with the namespace defaulted as the model does.
pub fn key_of(object: &DynamicObject) -> ObjectKey {
    ObjectKey::new(
        object
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_string()),
        object.metadata.name.clone().unwrap_or_default(),
    )
}

/// Converts through the same path as the file source (typed `k8s-openapi` / `gateway-api`
/// objects, CRD defaults, schema checks), so that an invalid object is refused with the field
/// at fault. Lists omit apiVersion and kind on their items: they are set from the table.
fn convert(call: &ApiCall, object: &DynamicObject) -> Result<Object, ObjectError> {
    let mut value = serde_json::to_value(object).map_err(|e| ObjectError::Invalid {
        field: "(document)".into(),
        message: e.to_string(),
    })?;
    if let Some(map) = value.as_object_mut() {
        map.insert("apiVersion".into(), call.api_version().into());
        map.insert("kind".into(), call.kind.into());
    }
    Object::from_value(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(value: serde_json::Value) -> DynamicObject {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn converts_list_items_without_type_meta() {
        let svc = object(serde_json::json!({
            "metadata": {"name": "echo", "namespace": "ns", "resourceVersion": "7"},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80}]}
        }));
        let converted = convert(Watched::Service.call(), &svc).unwrap();
        assert_eq!(converted.describe(), "Service ns/echo");
    }

    #[test]
    fn invalid_object_names_the_field() {
        let svc = object(serde_json::json!({
            "metadata": {"name": "echo", "namespace": "ns"},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 0}]}
        }));
        let error = convert(Watched::Service.call(), &svc).unwrap_err();
        assert!(error.to_string().contains("spec.ports[0].port"), "{error}");
    }

    #[tokio::test]
    async fn relist_deletes_what_disappeared_and_keeps_invalid_objects() {
        let (tx, mut rx) = mpsc::channel(64);
        let mut state = KindState::new(Watched::Service, tx);
        let svc = |name: &str, port: u16| {
            object(serde_json::json!({
                "metadata": {"name": name, "namespace": "ns"},
                "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": port}]}
            }))
        };
        for name in ["a", "b", "c"] {
            state.handle(Event::Apply(svc(name, 80))).await.ok();
        }
        // Relist: `a` unchanged, `b` gone, `c` now invalid (its last good version stays).
        state.handle(Event::Init).await.ok();
        state.handle(Event::InitApply(svc("a", 80))).await.ok();
        state.handle(Event::InitApply(svc("c", 0))).await.ok();
        state.handle(Event::InitDone).await.ok();
        drop(state);
        let mut deleted = Vec::new();
        while let Some(update) = rx.recv().await {
            if let Update::Delete(r) = update {
                deleted.push(r);
            }
        }
        assert_eq!(deleted, vec![ObjectRef::Service(ObjectKey::new("ns", "b"))]);
    }

    fn http_route(uid: &str, path_type: &str) -> DynamicObject {
        object(serde_json::json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": "r", "namespace": "ns", "uid": uid, "generation": 1},
            "spec": {
                "parentRefs": [{"group": "", "kind": "Service", "name": "front", "port": 80}],
                "rules": [{"matches": [{"path": {"type": path_type, "value": "/("}}],
                           "backendRefs": [{"name": "back", "port": 80}]}]
            }
        }))
    }

    /// The updates sent so far, as `Delete`, `Apply` (a route applied or refused) and health.
    fn drain(rx: &mut mpsc::Receiver<Update>) -> Vec<String> {
        std::iter::from_fn(|| rx.try_recv().ok())
            .filter_map(|update| match update {
                Update::Delete(r) => Some(format!("delete {r:?}")),
                Update::Apply(Object::RefusedRoute(_)) => Some("refused".into()),
                Update::Apply(o) => Some(format!("apply {}", o.describe())),
                Update::Health(_, health) => Some(format!("{health:?}")),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn an_invalid_namesake_of_a_deleted_route_does_not_keep_the_deleted_ones_rules() {
        let (tx, mut rx) = mpsc::channel(64);
        let mut state = KindState::new(Watched::HttpRoute, tx);
        state
            .handle(Event::Apply(http_route("old", "PathPrefix")))
            .await
            .ok();
        // Deleted and made again, now invalid (a regex that does not compile), while the watch
        // was down: the relist shows only the new object.
        state.handle(Event::Init).await.ok();
        state
            .handle(Event::InitApply(http_route("new", "RegularExpression")))
            .await
            .ok();
        state.handle(Event::InitDone).await.ok();
        let updates = drain(&mut rx);
        let route = ObjectRef::Route(RouteKey {
            kind: RouteKind::Http,
            key: ObjectKey::new("ns", "r"),
        });
        assert_eq!(
            updates[1..3],
            [format!("delete {route:?}"), "refused".to_string()],
            "{updates:?}"
        );
        // A new version of the same object that is invalid keeps its last good one.
        state
            .handle(Event::Apply(http_route("new2", "PathPrefix")))
            .await
            .ok();
        state
            .handle(Event::Apply(http_route("new2", "RegularExpression")))
            .await
            .ok();
        let updates = drain(&mut rx);
        assert!(
            !updates.iter().any(|u| u.starts_with("delete")),
            "{updates:?}"
        );
    }

    /// The HTTPRoute watch's state with one route applied, and what it sends.
    async fn with_a_route() -> (KindState, mpsc::Receiver<Update>) {
        let (tx, rx) = mpsc::channel(64);
        let mut state = KindState::new(Watched::HttpRoute, tx);
        state
            .handle(Event::Apply(http_route("a", "PathPrefix")))
            .await
            .ok();
        (state, rx)
    }

    /// `state` fails with `error` (from a ready API server).
    async fn fail(state: &mut KindState, error: watcher::Error) {
        state
            .failed(error, Duration::from_secs(1), false)
            .await
            .ok();
    }

    /// The route kept, the kind failing.
    fn kept_and_failing(updates: &[String]) {
        assert!(
            !updates.iter().any(|u| u.starts_with("delete")),
            "{updates:?}"
        );
        assert!(
            updates.last().unwrap().starts_with("Failing"),
            "{updates:?}"
        );
    }

    #[tokio::test]
    async fn a_404_for_a_kind_that_was_served_keeps_its_objects_for_a_while() {
        let (mut state, mut rx) = with_a_route().await;
        fail(&mut state, not_found()).await;
        kept_and_failing(&drain(&mut rx));
        // Still 404 after the grace: the kind is gone, and its objects with it.
        state.not_served_since = Some(Instant::now() - NOT_SERVED_GRACE);
        fail(&mut state, not_found()).await;
        let updates = drain(&mut rx);
        assert!(
            updates.iter().any(|u| u.starts_with("delete")),
            "{updates:?}"
        );
        assert_eq!(updates.last().unwrap(), "Absent", "{updates:?}");
        // Never served: absent at once.
        let (tx, mut rx) = mpsc::channel(64);
        let mut state = KindState::new(Watched::HttpRoute, tx);
        fail(&mut state, not_found()).await;
        assert_eq!(drain(&mut rx), ["Absent"]);
    }

    /// A 404 for a built-in kind is a failure however long it lasts, before the first list too:
    /// it was taken for an uninstalled CRD, and a proxy in front of the API server answering
    /// 404 while its backend was down emptied the table, which `/ready` called fresh.
    #[tokio::test]
    async fn a_404_for_a_built_in_kind_is_a_failure_not_an_absent_kind() {
        let (tx, mut rx) = mpsc::channel(64);
        let mut state = KindState::new(Watched::Service, tx);
        fail(&mut state, not_found()).await;
        let updates = drain(&mut rx);
        assert!(updates[0].starts_with("Failing"), "{updates:?}");
        state
            .handle(Event::Apply(
                serde_json::from_value(serde_json::json!({
                    "apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": "s", "namespace": "ns"},
                    "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}
                }))
                .unwrap(),
            ))
            .await
            .ok();
        state.not_served_since = Some(Instant::now() - NOT_SERVED_GRACE);
        fail(&mut state, not_found()).await;
        kept_and_failing(&drain(&mut rx));
    }

    fn not_found() -> watcher::Error {
        let mut status = kube::core::Status::failure("the server could not find it", "NotFound");
        status.code = 404;
        watcher::Error::InitialListFailed(kube::Error::Api(Box::new(status)))
    }

    /// A 404 from an API server that is starting (not ready) says nothing of the kind: failing,
    /// not absent, even before the kind was first listed, so that the agent is not ready with a
    /// table that lacks every route (and a successor does not take over with one). Before, it
    /// was absent at once.
    #[tokio::test]
    async fn a_404_from_a_starting_api_server_is_a_failure_not_an_absent_kind() {
        let (tx, mut rx) = mpsc::channel(64);
        let mut state = KindState::new(Watched::HttpRoute, tx);
        state
            .failed(not_found(), Duration::from_secs(1), true)
            .await
            .ok();
        let updates = drain(&mut rx);
        assert_eq!(updates.len(), 1, "{updates:?}");
        assert!(updates[0].starts_with("Failing"), "{updates:?}");
        assert_eq!(state.not_served_since, None, "no 404 of a ready server yet");
    }

    /// The grace counts 404s in a row: other failures between two 404s (the API server down for
    /// a while, then starting again) start it anew. Before, the second 404 found the first one's
    /// time and deleted every route at once.
    #[tokio::test]
    async fn another_failure_between_404s_starts_the_grace_anew() {
        let (mut state, mut rx) = with_a_route().await;
        fail(&mut state, not_found()).await;
        // Long ago, then the API server went away (no status at all).
        state.not_served_since = Some(Instant::now() - NOT_SERVED_GRACE);
        fail(
            &mut state,
            watcher::Error::InitialListFailed(kube::Error::TlsRequired),
        )
        .await;
        fail(&mut state, not_found()).await;
        kept_and_failing(&drain(&mut rx));
    }
}
