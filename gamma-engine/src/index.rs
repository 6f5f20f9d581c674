//! The index: objects in (apply/delete), an immutable `Snapshot` out.
//!
//! A change marks the Services it touches (a route's parents; a Service or its EndpointSlices,
//! and every Service whose routes use it as a backend); `publish` recompiles only those, and
//! swaps in a new snapshot only when the result differs from the current one.

use crate::model::{
    EndpointSlice, Node, Object, ObjectKey, Pod, ReferenceGrant, RefusedRoute, Route, RouteKey,
    RouteKind, Service,
};
use crate::routes::{self, status, Caller, Frontend, Snapshot, World};
use ahash::{AHashMap, AHashSet};
use compact_str::CompactString;
use std::collections::BTreeSet;
use std::sync::Arc;

/// The identity of an object to delete.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ObjectRef {
    Service(ObjectKey),
    EndpointSlice(ObjectKey),
    Pod(ObjectKey),
    /// A route, and its refused generation if any.
    Route(RouteKey),
    /// Only the refused generation of a route (the source has a good one again).
    RefusedRoute(RouteKey),
    ReferenceGrant(ObjectKey),
    Node(String),
    Namespace(CompactString),
}

impl Object {
    pub fn reference(&self) -> ObjectRef {
        match self {
            Object::Service(s) => ObjectRef::Service(s.key.clone()),
            Object::EndpointSlice(e) => ObjectRef::EndpointSlice(e.key.clone()),
            Object::Pod(p) => ObjectRef::Pod(p.key.clone()),
            Object::Route(r) => ObjectRef::Route(r.key()),
            Object::RefusedRoute(r) => ObjectRef::RefusedRoute(r.key.clone()),
            Object::ReferenceGrant(g) => ObjectRef::ReferenceGrant(g.key.clone()),
            Object::Node(n) => ObjectRef::Node(n.name.clone()),
            Object::Namespace(n) => ObjectRef::Namespace(n.name.clone()),
        }
    }
}

#[derive(Default)]
struct Store {
    services: AHashMap<ObjectKey, Service>,
    slices: AHashMap<ObjectKey, EndpointSlice>,
    slices_by_service: AHashMap<ObjectKey, SortedSet<ObjectKey>>,
    pods: AHashMap<ObjectKey, Pod>,
    /// The namespaces whose pods opt in to local sockets unless they say otherwise.
    local_sockets_namespaces: AHashSet<CompactString>,
    /// Shared with the compiled rules (which read their route's rules there). Behind a pointer
    /// anyway: a map keeps room for more entries than it holds, and a route is large.
    routes: AHashMap<RouteId, Arc<Route>>,
    /// Route generations that did not convert; the route's status reports them.
    refused: AHashMap<RouteKey, RefusedRoute>,
    grants: AHashMap<ObjectKey, ReferenceGrant>,
    /// This agent's node: its name (from the configuration), then its zone (from the Node).
    node: Option<Node>,
    /// Service → the routes naming it.
    routes_by_service: AHashMap<ObjectKey, RoutesOf>,
}

/// A route's key, one copy shared by the index's maps and sets.
type RouteId = Arc<RouteKey>;

/// The routes that name one Service.
#[derive(Default)]
struct RoutesOf {
    /// With a parentRef.
    attached: SortedSet<RouteId>,
    /// As a backend (or mirror).
    sending_to: SortedSet<RouteId>,
}

impl RoutesOf {
    fn attached(&mut self) -> &mut SortedSet<RouteId> {
        &mut self.attached
    }

    fn sending_to(&mut self) -> &mut SortedSet<RouteId> {
        &mut self.sending_to
    }
}

impl Store {
    fn attached_to(&self, service: &ObjectKey) -> impl Iterator<Item = &RouteId> {
        self.routes_by_service
            .get(service)
            .into_iter()
            .flat_map(|r| &r.attached)
    }

    fn sending_to(&self, service: &ObjectKey) -> impl Iterator<Item = &RouteId> {
        self.routes_by_service
            .get(service)
            .into_iter()
            .flat_map(|r| &r.sending_to)
    }

    /// Adds `route` to one of `service`'s sets (`which`).
    fn link(
        &mut self,
        service: ObjectKey,
        route: &RouteId,
        which: fn(&mut RoutesOf) -> &mut SortedSet<RouteId>,
    ) {
        which(self.routes_by_service.entry(service).or_default()).insert(route.clone());
    }

    /// Removes `route` from one of `service`'s sets (`which`); a Service no route names leaves
    /// the map.
    fn unlink(
        &mut self,
        service: &ObjectKey,
        route: &RouteKey,
        which: fn(&mut RoutesOf) -> &mut SortedSet<RouteId>,
    ) {
        if let Some(routes) = self.routes_by_service.get_mut(service) {
            which(routes).remove(route);
            if routes.attached.is_empty() && routes.sending_to.is_empty() {
                self.routes_by_service.remove(service);
            }
        }
    }

    /// The index's own copy of `key`, or a new one.
    fn route_id(&self, key: RouteKey) -> RouteId {
        match self.routes.get_key_value(&key) {
            Some((id, _)) => id.clone(),
            None => Arc::new(key),
        }
    }
}

impl World for Store {
    fn service(&self, key: &ObjectKey) -> Option<&Service> {
        self.services.get(key)
    }

    fn slices(&self, service: &ObjectKey) -> Vec<&EndpointSlice> {
        self.slices_by_service
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(|k| self.slices.get(k))
            .collect()
    }

    fn routes_on(&self, service: &ObjectKey) -> Vec<&Arc<Route>> {
        self.attached_to(service)
            .filter_map(|k| self.routes.get(k))
            .collect()
    }

    fn node(&self) -> Option<&Node> {
        self.node.as_ref()
    }

    fn permits(&self, kind: RouteKind, namespace: &str, service: &ObjectKey) -> bool {
        // Few grants, consulted only for references across namespaces.
        self.grants
            .values()
            .any(|g| g.permits(kind, namespace, service))
    }
}

fn parents(route: &Route) -> impl Iterator<Item = ObjectKey> + '_ {
    route
        .parent_refs
        .iter()
        .filter_map(|p| p.service(route.namespace()))
}

fn backend_services(route: &Route) -> BTreeSet<ObjectKey> {
    let ns = route.namespace();
    route
        .rules
        .iter()
        .flat_map(|rule| rule.referenced_backends())
        .map(|b| ObjectKey::new(b.namespace.as_deref().unwrap_or(ns), b.name.as_str()))
        .collect()
}

pub struct Index {
    store: Store,
    /// Services whose frontends must be recompiled at the next publish.
    dirty_services: AHashSet<ObjectKey>,
    /// Routes whose status must be recomputed at the next publish.
    dirty_routes: AHashSet<RouteId>,
    callers_dirty: bool,
    tables: Tables,
    current: Arc<Snapshot>,
}

impl Default for Index {
    fn default() -> Self {
        Self::new()
    }
}

impl Index {
    pub fn new() -> Self {
        let current = Arc::new(Snapshot::default());
        Index {
            store: Store::default(),
            dirty_services: AHashSet::new(),
            dirty_routes: AHashSet::new(),
            callers_dirty: false,
            tables: Tables::default(),
            current,
        }
    }

    /// An index for the agent of node `name` (its zone comes with the Node object, if watched):
    /// `internalTrafficPolicy: Local` and topology hints pick endpoints for this node.
    pub fn for_node(name: impl Into<String>) -> Self {
        let mut index = Index::new();
        index.store.node = Some(Node {
            name: name.into(),
            zone: None,
        });
        index
    }

    /// Every Service recompiles: what the node is decides which endpoints its callers use.
    fn touch_every_service(&mut self) {
        let all: Vec<ObjectKey> = self.store.services.keys().cloned().collect();
        self.dirty_services.extend(all);
    }

    /// The snapshot of the last `publish` (the empty table before the first).
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.clone()
    }

    /// Every object currently held, as references (for sources that resynchronise).
    pub fn references(&self) -> Vec<ObjectRef> {
        let s = &self.store;
        s.services
            .keys()
            .cloned()
            .map(ObjectRef::Service)
            .chain(s.slices.keys().cloned().map(ObjectRef::EndpointSlice))
            .chain(s.pods.keys().cloned().map(ObjectRef::Pod))
            .chain(
                s.routes
                    .keys()
                    .map(|k| ObjectRef::Route(RouteKey::clone(k))),
            )
            .chain(s.refused.keys().cloned().map(ObjectRef::RefusedRoute))
            .chain(s.grants.keys().cloned().map(ObjectRef::ReferenceGrant))
            .chain(
                s.local_sockets_namespaces
                    .iter()
                    .cloned()
                    .map(ObjectRef::Namespace),
            )
            .collect()
    }

    fn touch_service(&mut self, key: &ObjectKey) {
        self.touch_endpoints(key);
        // Routes that use this Service as a backend, or are attached to it: their status depends
        // on the Service (its ports, type, affinity), not on its endpoints.
        let routes = self
            .store
            .sending_to(key)
            .chain(self.store.attached_to(key));
        self.dirty_routes.extend(routes.cloned());
    }

    /// The Service's endpoints changed: it recompiles, and so do the parents of the routes that
    /// send to it. No route's status changes: on a busy cluster, every node recomputed the
    /// status of every route near a Service at each change of its EndpointSlices.
    fn touch_endpoints(&mut self, key: &ObjectKey) {
        self.dirty_services.insert(key.clone());
        for route in self.store.sending_to(key) {
            if let Some(r) = self.store.routes.get(route) {
                self.dirty_services.extend(parents(r));
            }
        }
    }

    /// A ReferenceGrant of `namespace` changed: routes with a backend there are recompiled, and
    /// their status recomputed.
    fn touch_grants_of(&mut self, namespace: &str) {
        let routes: Vec<RouteId> = self
            .store
            .routes_by_service
            .iter()
            .filter(|(service, _)| service.namespace == namespace)
            .flat_map(|(_, routes)| routes.sending_to.iter().cloned())
            .collect();
        for key in routes {
            if let Some(route) = self.store.routes.get(&key) {
                self.dirty_services.extend(parents(route));
            }
            self.dirty_routes.insert(key);
        }
    }

    /// Adds or replaces an object. Nothing is published until `publish`.
    pub fn apply(&mut self, object: Object) {
        match object {
            Object::Service(service) => {
                let key = service.key.clone();
                if self.store.services.get(&key) != Some(&service) {
                    self.store.services.insert(key.clone(), service);
                    self.touch_service(&key);
                }
            }
            Object::EndpointSlice(slice) => {
                if self.store.slices.get(&slice.key) == Some(&slice) {
                    return;
                }
                let key = slice.key.clone();
                let service = slice.service.clone();
                if let Some(old) = self.store.slices.insert(key.clone(), slice) {
                    if old.service != service {
                        self.remove_slice_link(&old.service, &key);
                        self.touch_endpoints(&old.service);
                    }
                }
                self.store
                    .slices_by_service
                    .entry(service.clone())
                    .or_default()
                    .insert(key);
                self.touch_endpoints(&service);
            }
            Object::Pod(pod) => {
                if self.store.pods.get(&pod.key) != Some(&pod) {
                    self.store.pods.insert(pod.key.clone(), pod);
                    self.callers_dirty = true;
                }
            }
            Object::Route(mut route) => {
                // The new generation shares the key the index holds (one copy per route).
                if let Some((held, served)) = self.store.routes.get_key_value(&*route.id) {
                    route.id = held.clone();
                    if **served == route {
                        return;
                    }
                }
                let key = route.id.clone();
                self.unlink_route(&key);
                for parent in parents(&route) {
                    self.store.link(parent.clone(), &key, RoutesOf::attached);
                    // Their status may depend on this route (Conflicted).
                    self.dirty_routes
                        .extend(self.store.attached_to(&parent).cloned());
                    self.dirty_services.insert(parent);
                }
                for backend in backend_services(&route) {
                    self.store.link(backend, &key, RoutesOf::sending_to);
                }
                self.store.routes.insert(key.clone(), Arc::new(route));
                self.dirty_routes.insert(key);
            }
            Object::RefusedRoute(refused) => {
                if self.store.refused.get(&refused.key) != Some(&refused) {
                    let key = self.store.route_id(refused.key.clone());
                    self.store.refused.insert(refused.key.clone(), refused);
                    self.dirty_routes.insert(key);
                }
            }
            // Only this agent's node (named by its configuration) says where it runs: another
            // Node (a folder of manifests may hold several) is not its.
            Object::Node(node) => {
                let ours = self
                    .store
                    .node
                    .as_ref()
                    .is_some_and(|n| n.name == node.name);
                if ours && self.store.node.as_ref() != Some(&node) {
                    self.store.node = Some(node);
                    self.touch_every_service();
                }
            }
            Object::Namespace(namespace) => {
                let held = &mut self.store.local_sockets_namespaces;
                let changed = if namespace.local_sockets {
                    held.insert(namespace.name)
                } else {
                    held.remove(&namespace.name)
                };
                self.callers_dirty |= changed;
            }
            Object::ReferenceGrant(grant) => {
                if self.store.grants.get(&grant.key) != Some(&grant) {
                    let namespace = grant.key.namespace.clone();
                    self.store.grants.insert(grant.key.clone(), grant);
                    self.touch_grants_of(&namespace);
                }
            }
        }
    }

    /// Removes an object, if held.
    pub fn delete(&mut self, reference: &ObjectRef) {
        match reference {
            ObjectRef::Service(key) => {
                if self.store.services.remove(key).is_some() {
                    self.touch_service(key);
                }
            }
            ObjectRef::EndpointSlice(key) => {
                if let Some(old) = self.store.slices.remove(key) {
                    self.remove_slice_link(&old.service, key);
                    self.touch_endpoints(&old.service);
                }
            }
            ObjectRef::Pod(key) => {
                if self.store.pods.remove(key).is_some() {
                    self.callers_dirty = true;
                }
            }
            ObjectRef::Namespace(name) => {
                self.callers_dirty |= self.store.local_sockets_namespaces.remove(name);
            }
            ObjectRef::Route(key) => {
                if self.unlink_route(key) {
                    if let Some((id, _)) = self.store.routes.remove_entry(key) {
                        self.dirty_routes.insert(id);
                    }
                }
                self.forget_refusal(key);
            }
            ObjectRef::RefusedRoute(key) => self.forget_refusal(key),
            ObjectRef::ReferenceGrant(key) => {
                if self.store.grants.remove(key).is_some() {
                    self.touch_grants_of(&key.namespace);
                }
            }
            // The Node object went (its zone with it); the agent still runs on that node.
            ObjectRef::Node(name) => {
                if let Some(node) = self.store.node.as_mut().filter(|n| n.name == *name) {
                    if node.zone.take().is_some() {
                        self.touch_every_service();
                    }
                }
            }
        }
    }

    fn forget_refusal(&mut self, route: &RouteKey) {
        if self.store.refused.remove(route).is_some() {
            let id = self.store.route_id(route.clone());
            self.dirty_routes.insert(id);
        }
    }

    fn remove_slice_link(&mut self, service: &ObjectKey, slice: &ObjectKey) {
        if let Some(set) = self.store.slices_by_service.get_mut(service) {
            set.remove(slice);
            if set.is_empty() {
                self.store.slices_by_service.remove(service);
            }
        }
    }

    /// Removes a route from the reverse indexes, marking its parents dirty. False if not held.
    fn unlink_route(&mut self, key: &RouteKey) -> bool {
        let Some(old) = self.store.routes.get(key) else {
            return false;
        };
        let old_parents: Vec<ObjectKey> = parents(old).collect();
        let old_backends = backend_services(old);
        for parent in old_parents {
            self.store.unlink(&parent, key, RoutesOf::attached);
            // Their status may have depended on this route (Conflicted).
            self.dirty_routes
                .extend(self.store.attached_to(&parent).cloned());
            self.dirty_services.insert(parent);
        }
        for backend in old_backends {
            self.store.unlink(&backend, key, RoutesOf::sending_to);
        }
        true
    }

    /// Recompiles what changed and makes a new snapshot current if the result differs.
    /// Returns whether it did (then `snapshot()` is the new one). The cost is the recompilation of what changed
    /// plus a shallow copy of the published maps (reference counts, no deep clones).
    pub fn publish(&mut self) -> bool {
        let mut changed = false;
        for key in std::mem::take(&mut self.dirty_services) {
            let compiled = self
                .store
                .services
                .get(&key)
                .map(|s| routes::compile_service(s, &self.store))
                .unwrap_or_default();
            let old = self
                .tables
                .frontends
                .get(&key)
                .map(|f| &f[..])
                .unwrap_or_default();
            if old.len() != compiled.len() || old.iter().zip(&compiled).any(|(a, b)| a != b) {
                changed = true;
                self.tables.replace(key, compiled);
            }
        }
        for key in std::mem::take(&mut self.dirty_routes) {
            let served = self.store.routes.get(&key).map(|r| &**r);
            // A refused generation is reported unless a good one at least as new arrived since
            // (compared, not ordered, so that the result does not depend on arrival order), or
            // the served route is another object of the same name (deleted and created again
            // while a watch was down: the refusal was about the old one).
            let refused = self.store.refused.get(&key).filter(|refused| {
                served.is_none_or(|route| {
                    refused.uid == route.meta.uid && refused.generation >= route.meta.generation
                })
            });
            let new = match refused {
                Some(refused) => Some(status::refused_status(refused, served)),
                None => served.map(|r| status::route_status(r, &self.store)),
            }
            .filter(|s| !s.is_empty());
            if self.tables.statuses.get(&key).map(|s| &s[..]) != new.as_deref() {
                changed = true;
                let statuses = Arc::make_mut(&mut self.tables.statuses);
                match new {
                    Some(s) => statuses.insert(key, s.into()),
                    None => statuses.remove(&key),
                };
            }
        }
        if std::mem::take(&mut self.callers_dirty) {
            let callers = self.callers();
            if *callers != *self.tables.callers {
                changed = true;
                self.tables.callers = callers;
            }
        }
        if !changed {
            return false;
        }
        let snapshot = Snapshot {
            version: self.current.version + 1,
            by_service: self.tables.frontends.clone(),
            by_address: self.tables.by_address.clone(),
            callers: self.tables.callers.clone(),
            statuses: self.tables.statuses.clone(),
        };
        self.current = Arc::new(snapshot);
        true
    }

    /// The Pods by IP and by UID. An IP that two Pods claim (a stale object, an IP reused before
    /// the old Pod's deletion arrived) names neither by IP: its callers get the producer routes
    /// only, the same whichever Pod the watch delivered first, unless their cgroup names them. A
    /// UID two Pods claim (a static pod's manifest hash is an annotation anyone who creates pods
    /// can write) names neither either.
    fn callers(&self) -> Arc<routes::Callers> {
        let mut claims: AHashMap<std::net::IpAddr, Option<Arc<Caller>>> = AHashMap::new();
        let mut uid_claims: AHashMap<String, Option<Arc<Caller>>> = AHashMap::new();
        for pod in self.store.pods.values() {
            let caller = Arc::new(Caller {
                pod: pod.key.clone(),
                uid: pod.uid.clone(),
                local_sockets: pod.local_sockets.unwrap_or_else(|| {
                    self.store
                        .local_sockets_namespaces
                        .contains(&pod.key.namespace)
                }),
            });
            for ip in &pod.ips {
                claims
                    .entry(*ip)
                    .and_modify(|claim| *claim = None)
                    .or_insert_with(|| Some(caller.clone()));
            }
            if let Some(uid) = &pod.uid {
                uid_claims
                    .entry(uid.clone())
                    .and_modify(|claim| *claim = None)
                    .or_insert(Some(caller));
            }
        }
        Arc::new(routes::Callers {
            by_ip: undisputed(claims),
            by_uid: undisputed(uid_claims),
        })
    }
}

/// The claims only one Pod made.
fn undisputed<K: std::hash::Hash + Eq>(
    claims: AHashMap<K, Option<Arc<Caller>>>,
) -> AHashMap<K, Arc<Caller>> {
    claims
        .into_iter()
        .filter_map(|(key, caller)| Some((key, caller?)))
        .collect()
}

/// The compiled state the current snapshot is made of, kept up to date change by change. Its
/// maps are shared with the current snapshot and copied at their first change after a publish
/// (`Arc::make_mut`).
#[derive(Default)]
struct Tables {
    frontends: Arc<routes::FrontendsByService>,
    by_address: Arc<AHashMap<std::net::SocketAddr, Arc<Frontend>>>,
    statuses: Arc<routes::Statuses>,
    callers: Arc<routes::Callers>,
}

impl Tables {
    /// Replaces a Service's frontends and their addresses.
    fn replace(&mut self, service: ObjectKey, compiled: Vec<Arc<Frontend>>) {
        let (frontends, by_address) = (
            Arc::make_mut(&mut self.frontends),
            Arc::make_mut(&mut self.by_address),
        );
        let mut released = Vec::new();
        if let Some(old) = frontends.remove(&service) {
            for frontend in old.iter() {
                for addr in &frontend.addresses {
                    // Another Service may have claimed the address since; leave it to it.
                    if by_address
                        .get(addr)
                        .is_some_and(|f| Arc::ptr_eq(f, frontend))
                    {
                        by_address.remove(addr);
                        released.push(*addr);
                    }
                }
            }
        }
        for frontend in &compiled {
            for addr in &frontend.addresses {
                by_address.insert(*addr, frontend.clone());
            }
        }
        if !compiled.is_empty() {
            frontends.insert(Arc::new(service), compiled.into());
        }
        // An address this Service gave up that another one claims too (two Services shared a
        // ClusterIP while a watch was behind: one deleted, its address given to the other):
        // it is the other one's now. Rare, so the whole table is searched.
        for addr in released {
            if by_address.contains_key(&addr) {
                continue;
            }
            let claimant = frontends
                .values()
                .flat_map(|ports| ports.iter())
                .find(|f| f.addresses.contains(&addr));
            if let Some(claimant) = claimant {
                by_address.insert(addr, claimant.clone());
            }
        }
    }
}

/// A small ordered set: a sorted list that grows one place at a time while it is short. The
/// index keeps one per Service (its routes, its slices), nearly all of one to three entries,
/// where a `BTreeSet`'s first node holds room for eleven.
#[derive(Debug)]
struct SortedSet<T>(Vec<T>);

impl<T> Default for SortedSet<T> {
    fn default() -> Self {
        SortedSet(Vec::new())
    }
}

impl<T: Ord> SortedSet<T> {
    fn insert(&mut self, value: T) -> bool {
        let Err(at) = self.0.binary_search(&value) else {
            return false;
        };
        if self.0.len() < 8 {
            self.0.reserve_exact(1);
        }
        self.0.insert(at, value);
        true
    }

    fn remove<Q: Ord + ?Sized>(&mut self, value: &Q) -> bool
    where
        T: std::borrow::Borrow<Q>,
    {
        let Ok(at) = self.0.binary_search_by(|v| v.borrow().cmp(value)) else {
            return false;
        };
        self.0.remove(at);
        true
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn iter(&self) -> std::slice::Iter<'_, T> {
        self.0.iter()
    }
}

impl<'a, T> IntoIterator for &'a SortedSet<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::{Index, SortedSet};

    /// An EndpointSlice change recompiles its Service and the parents of the routes sending to
    /// it, and recomputes no route's status (which endpoints do not change); a Service change
    /// recomputes the status of the routes near it.
    #[test]
    fn an_endpoint_change_leaves_route_status_alone() {
        let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: front, namespace: ns}\nspec: {clusterIP: 10.96.0.1, ports: [{name: http, port: 80}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: back, namespace: ns}\nspec: {clusterIP: 10.96.0.2, ports: [{name: http, port: 80}]}\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: ns}\nspec:\n  parentRefs: [{group: '', kind: Service, name: front, port: 80}]\n  rules: [{backendRefs: [{name: back, port: 80}]}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: back-1, namespace: ns, labels: {kubernetes.io/service-name: back}}\naddressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints: [{addresses: [10.0.0.1]}]\n";
        let objects = |yaml: &str| {
            crate::manifests::parse(std::path::Path::new("t.yaml"), yaml)
                .objects
                .into_iter()
        };
        let mut index = Index::new();
        objects(yaml).for_each(|o| index.apply(o));
        assert!(index.publish());
        let slice = yaml
            .split("---")
            .last()
            .unwrap()
            .replace("10.0.0.1", "10.0.0.2");
        objects(&slice).for_each(|o| index.apply(o));
        assert!(index.dirty_routes.is_empty(), "{:?}", index.dirty_routes);
        assert_eq!(index.dirty_services.len(), 2, "back and front recompile");
        assert!(index.publish());
        let back = yaml
            .split("---")
            .nth(1)
            .unwrap()
            .replace("port: 80", "port: 81");
        objects(&back).for_each(|o| index.apply(o));
        assert_eq!(index.dirty_routes.len(), 1, "the route's backend changed");
    }

    #[test]
    fn sorted_set_keeps_each_value_once_in_order() {
        let mut set = SortedSet::default();
        for value in [3, 1, 2, 3, 1] {
            set.insert(value);
        }
        assert_eq!(set.iter().copied().collect::<Vec<_>>(), [1, 2, 3]);
        assert!(set.remove(&2) && !set.remove(&2));
        assert_eq!(set.iter().copied().collect::<Vec<_>>(), [1, 3]);
        assert!(set.remove(&1) && set.remove(&3) && set.is_empty());
    }
}
