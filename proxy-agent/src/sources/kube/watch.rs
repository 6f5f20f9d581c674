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
//! backoff's jitter spreads the relists of many nodes after an API server restart. A complete list
//! resets the backoff, so each outage is retried from the shortest delay.

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
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

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
    let api: Api<DynamicObject> = Api::all_with(client, &kind.call().api_resource());
    let mut state = KindState {
        kind,
        updates,
        known: HashSet::new(),
        good: HashSet::new(),
        listed: None,
        failures: 0,
        failing_since: None,
    };
    let mut backoff = DefaultBackoff::default();
    loop {
        let mut events = std::pin::pin!(watcher::watcher(api.clone(), config.clone()));
        let error = loop {
            match events.next().await {
                Some(Ok(event)) => {
                    let list_complete = matches!(event, Event::InitDone);
                    if state.handle(event).await.is_err() {
                        return; // the index task is gone: shutting down
                    }
                    if list_complete {
                        // Current again: the next outage starts from the shortest delay, not
                        // from where the last one left the exponential backoff.
                        backoff.reset();
                    }
                }
                Some(Err(e)) => break e,
                None => return, // a watcher stream does not end
            }
        };
        let delay = backoff.next().unwrap_or(Duration::from_secs(30));
        if state.failed(error, delay).await.is_err() {
            return;
        }
        tokio::time::sleep(delay).await;
    }
}

/// The receiving side is gone.
struct Closed;

struct KindState {
    kind: Watched,
    updates: mpsc::Sender<Update>,
    /// Keys this kind has applied to the index (converted at least once, not deleted since).
    known: HashSet<ObjectKey>,
    /// Of those, the keys with a good version in the index (a refused route may have none).
    good: HashSet<ObjectKey>,
    /// During a list: the keys seen so far.
    listed: Option<HashSet<ObjectKey>>,
    failures: u32,
    failing_since: Option<u64>,
}

impl KindState {
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
                if self.failing_since.take().is_some() {
                    tracing::info!(
                        kind = self.kind.call().kind,
                        "listed again after {} failed attempt(s); current",
                        self.failures
                    );
                }
                self.failures = 0;
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
        if let Some(kind) = self.kind.route_kind() {
            let route = RouteKey {
                kind,
                key: key.clone(),
            };
            let server = StoredRoute::from_object(kind, object);
            self.send(Update::StoredStatus(route, Some(Arc::new(server))))
                .await?;
        }
        match convert(self.kind.call(), object) {
            Ok(converted) => {
                self.known.insert(key.clone());
                self.good.insert(key);
                self.send(Update::Apply(converted)).await?;
            }
            Err(e) => {
                let kept = if self.good.contains(&key) {
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

    /// Reports an error; a kind the API server does not serve is emptied.
    async fn failed(&mut self, error: watcher::Error, retry: Duration) -> Result<(), Closed> {
        self.failures += 1;
        self.listed = None;
        let call = self.kind.call();
        let status = api_status(&error);
        if status.is_some_and(|s| s.code == 404) {
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
        if status.is_some_and(|s| s.code == 403) {
            tracing::error!(
                "forbidden to list/watch {}: the agent's ClusterRole must grant {:?} on it \
                 (`proxy-agent --print-rbac` lists every rule); serving the last good table, retrying in {retry:?}",
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
                "watch failed: the API server is unreachable or failing; serving the last good table, retrying in {retry:?}"
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
        let mut state = KindState {
            kind: Watched::Service,
            updates: tx,
            known: HashSet::new(),
            good: HashSet::new(),
            listed: None,
            failures: 0,
            failing_since: None,
        };
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
}
