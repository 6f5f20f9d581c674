//! Backends: resolving a backendRef to a Service port and its endpoints, and weighted choice.

use super::{Attached, World};
use crate::model::{
    BackendRef, Endpoint, EndpointSlice, GroupKind, Node, ObjectKey, Route, RouteKind, Service,
    UpstreamProtocol,
};
use ahash::AHashMap;
use serde::Serialize;
use std::cell::RefCell;
use std::net::SocketAddr;
use std::sync::Arc;

/// A Service port traffic can be sent to, with the endpoints to send it to.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Backend {
    pub service: ObjectKey,
    pub port: u16,
    /// Ready endpoints of the port (targetPort resolved by the EndpointSlices); the
    /// serving-but-terminating ones only when none is ready.
    pub endpoints: Arc<[SocketAddr]>,
    /// The HTTP version the port says upstream connections speak; who sends decides what they
    /// speak ([`Backend::protocol_for`]), so that one backend serves them all.
    pub protocol: UpstreamProtocol,
    /// The Service's ClientIP session affinity: how long a caller keeps its endpoint.
    pub affinity: Option<std::time::Duration>,
    /// The data plane's state of each endpoint (in-flight requests, ejection), in `endpoints`'
    /// order.
    #[serde(skip)]
    pub endpoint_state: Arc<[Attached]>,
}

impl Backend {
    pub fn new(
        service: ObjectKey,
        port: u16,
        endpoints: Arc<[SocketAddr]>,
        protocol: UpstreamProtocol,
        affinity: Option<std::time::Duration>,
    ) -> Self {
        Backend {
            service,
            port,
            endpoint_state: super::attached::slots(endpoints.len()),
            endpoints,
            protocol,
            affinity,
        }
    }

    pub fn name(&self) -> String {
        format!("{}:{}", self.service, self.port)
    }

    /// The HTTP version upstream connections speak for requests routed by a route of `kind`, or
    /// by none: a caller no route applies to gets what it would get without the mesh, its own
    /// version end to end; a GRPCRoute's backends speak HTTP/2 whatever the port says (the spec
    /// lets the protocol be inferred from the route type); an HTTPRoute's, what the port says.
    pub fn protocol_for(&self, kind: Option<RouteKind>) -> UpstreamProtocol {
        match kind {
            None => UpstreamProtocol::AsCaller,
            Some(RouteKind::Grpc) => UpstreamProtocol::Http2,
            Some(RouteKind::Http) => self.protocol,
        }
    }
}

/// Why a backendRef does not resolve; its share of traffic is answered with an error.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, thiserror::Error)]
pub enum BackendError {
    #[error("backendRef {0}: kind is not a core Service")]
    InvalidKind(String),
    #[error("backendRef {0}: no such Service")]
    NotFound(String),
    #[error("backendRef {0}: the Service has no such port")]
    NoSuchPort(String),
    #[error("backendRef {0}: ExternalName Services are not valid backends")]
    NotAllowed(String),
    #[error(
        "backendRef {0}: the Service is handed to the proxy {1} by its label \
         service.kubernetes.io/service-proxy-name; the mesh, as kube-proxy, does not send to it"
    )]
    OtherProxy(String, String),
    #[error(
        "backendRef {0}: another namespace than the route's and its parent Service's needs a \
         ReferenceGrant there allowing this route's kind and namespace (the agent dials from the \
         node, where NetworkPolicy cannot tell callers apart)"
    )]
    RefNotPermitted(String),
    #[error(
        "backendRef {0}: the port's {1} asks for TLS, and the agent speaks cleartext \
         HTTP/1.1 and HTTP/2 to backends"
    )]
    UnsupportedProtocol(String, String),
}

impl BackendError {
    /// The status condition reason (`ResolvedRefs=False`) this error is reported with.
    pub fn reason(&self) -> &'static str {
        match self {
            BackendError::InvalidKind(_) => "InvalidKind",
            BackendError::UnsupportedProtocol(..) => "UnsupportedProtocol",
            BackendError::RefNotPermitted(_) => "RefNotPermitted",
            BackendError::NotFound(_) | BackendError::NoSuchPort(_) => "BackendNotFound",
            // The Service exists ("BackendNotFound" says it does not): it is not one to send to.
            BackendError::NotAllowed(_) | BackendError::OtherProxy(..) => "UnsupportedValue",
        }
    }
}

/// A Service and one of its ports.
type BackendKey = (ObjectKey, u16);

/// Resolves backendRefs against the objects. Within one compilation, every reference to the same
/// Service port, and the Service's own callers, share one `Backend`, so a frontend holds each
/// endpoint list once.
pub struct Resolver<'a> {
    world: &'a dyn World,
    cache: RefCell<AHashMap<BackendKey, Arc<Backend>>>,
}

impl<'a> Resolver<'a> {
    pub fn new(world: &'a dyn World) -> Self {
        Resolver {
            world,
            cache: RefCell::default(),
        }
    }

    /// Resolves a backendRef of `route` as compiled for a parent Service of `parent_namespace`.
    pub fn resolve(
        &self,
        reference: &BackendRef,
        route: &Route,
        parent_namespace: &str,
    ) -> Result<Arc<Backend>, BackendError> {
        let route_namespace = route.namespace();
        let namespace = reference.namespace.as_deref().unwrap_or(route_namespace);
        let key = ObjectKey::new(namespace, reference.name.as_str());
        let shown = format!(
            "{}/{}",
            key,
            reference.port.map_or("-".to_string(), |p| p.to_string())
        );
        if *reference.kind() != GroupKind::Service {
            return Err(BackendError::InvalidKind(format!(
                "{} {shown}",
                reference.kind()
            )));
        }
        // The route's and the parent Service's namespaces need no grant (consumer routes send
        // to the producer's Services: a trade-off the README states); others need that
        // namespace's consent.
        if namespace != route_namespace
            && namespace != parent_namespace
            && !self.world.permits(route.kind(), route_namespace, &key)
        {
            return Err(BackendError::RefNotPermitted(shown));
        }
        let service = self
            .world
            .service(&key)
            .ok_or_else(|| BackendError::NotFound(shown.clone()))?;
        if service.kind == crate::model::ServiceKind::ExternalName {
            return Err(BackendError::NotAllowed(shown));
        }
        if let Some(proxy) = &service.proxied_by {
            return Err(BackendError::OtherProxy(shown, proxy.to_string()));
        }
        let port = reference
            .port
            .ok_or_else(|| BackendError::NoSuchPort(shown.clone()))?;
        if let Some(tls) = service.port(port).and_then(asks_for_tls) {
            return Err(BackendError::UnsupportedProtocol(shown, tls));
        }
        self.service_backend(service, port)
            .ok_or(BackendError::NoSuchPort(shown))
    }

    /// The backend of `service`'s `port`: what a Service without routes balances over.
    pub fn service_backend(&self, service: &Service, port: u16) -> Option<Arc<Backend>> {
        let cache_key = (service.key.clone(), port);
        if let Some(backend) = self.cache.borrow().get(&cache_key) {
            return Some(backend.clone());
        }
        let service_port = service.port(port)?;
        let port_name = service_port.name.clone().unwrap_or_default();
        let mut endpoints = usable_endpoints(
            &self.world.slices(&service.key),
            &port_name,
            service.internal_local,
            self.world.node(),
        );
        if let Some(ipv4) = service.primary_ipv4 {
            keep_family(&mut endpoints, ipv4);
        }
        let backend = Arc::new(Backend::new(
            service.key.clone(),
            port,
            endpoints.into(),
            service_port.upstream_protocol(),
            service.affinity,
        ));
        self.cache.borrow_mut().insert(cache_key, backend.clone());
        Some(backend)
    }
}

/// Whether a route can be sent to a port that declares `app_protocol`: not over TLS (the agent
/// speaks cleartext to backends; TLS to them is the mesh's mTLS, not a route's). Other values
/// say too little to refuse: `tcp` and custom ones are often set loosely, and a GRPCRoute's
/// backends speak HTTP/2 whatever the port says (`Backend::protocol_for`).
fn can_send(app_protocol: &str) -> bool {
    !matches!(app_protocol, "https" | "tls" | "kubernetes.io/wss")
}

/// What says a backend port wants TLS, if anything: its appProtocol ([`can_send`]), else a name
/// of the `https` or `tls` family (`https`, `tls-admin`), which nobody sets loosely; the agent
/// reads such a port as TLS for its callers too (`ServicePort::stated_protocol`).
fn asks_for_tls(port: &crate::model::ServicePort) -> Option<String> {
    match (port.app_protocol.as_deref(), port.name.as_deref()) {
        (Some(app_protocol), _) => {
            (!can_send(app_protocol)).then(|| format!("appProtocol {app_protocol}"))
        }
        (None, Some(name)) => {
            matches!(port.name_family(), Some("https" | "tls")).then(|| format!("name {name}"))
        }
        (None, None) => None,
    }
}

/// Which endpoints a caller on this node may use, as kube-proxy decides it
/// (`pkg/proxy/topology.go`): with `internalTrafficPolicy: Local` only this node's; otherwise,
/// when every ready endpoint carries node hints and one is for this node, those (PreferSameNode);
/// else when every ready endpoint carries zone hints and one is for this node's zone, those
/// (PreferSameZone, PreferClose); else all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Topology<'a> {
    Local(Option<&'a str>),
    SameNode(&'a str),
    SameZone(&'a str),
    All,
}

impl<'a> Topology<'a> {
    fn of(endpoints: &[(&Endpoint, u16)], local_only: bool, node: Option<&'a Node>) -> Self {
        let node_name = node.map(|n| n.name.as_str());
        if local_only {
            return Topology::Local(node_name);
        }
        let ready = || endpoints.iter().map(|(e, _)| e).filter(|e| is_ready(e));
        let hinted = |hints: fn(&Endpoint) -> &[String], wanted: Option<&'a str>| {
            let wanted = wanted?;
            (ready().all(|e| !hints(e).is_empty())
                && ready().any(|e| hints(e).iter().any(|h| h == wanted)))
            .then_some(wanted)
        };
        if let Some(name) = hinted(|e| &e.for_nodes, node_name) {
            return Topology::SameNode(name);
        }
        if let Some(zone) = hinted(|e| &e.for_zones, node.and_then(|n| n.zone.as_deref())) {
            return Topology::SameZone(zone);
        }
        Topology::All
    }

    fn admits(self, endpoint: &Endpoint) -> bool {
        match self {
            Topology::Local(node) => node.is_some() && endpoint.node_name.as_deref() == node,
            Topology::SameNode(node) => endpoint.for_nodes.iter().any(|n| n == node),
            Topology::SameZone(zone) => endpoint.for_zones.iter().any(|z| z == zone),
            Topology::All => true,
        }
    }
}

/// `ready` as written, as kube-proxy reads it: the EndpointSlice controller never marks a
/// terminating endpoint ready unless its Service publishes not-ready addresses, and then it is
/// meant to be used (a StatefulSet's pods while they shut down).
fn is_ready(endpoint: &Endpoint) -> bool {
    endpoint.ready
}

/// The endpoints of the named port a caller on `node` is sent to, as kube-proxy picks them:
/// ready ones its topology admits ([`Topology`]); serving-but-terminating ones when none is.
/// Sorted so equal inputs compile to equal snapshots.
pub fn usable_endpoints(
    slices: &[&EndpointSlice],
    port_name: &str,
    local_only: bool,
    node: Option<&Node>,
) -> Vec<SocketAddr> {
    let endpoints: Vec<(&Endpoint, u16)> = slices
        .iter()
        .filter_map(|s| {
            s.ports
                .iter()
                .find(|p| p.name == port_name)
                .map(|p| (s, p.port))
        })
        .flat_map(|(s, port)| s.endpoints.iter().map(move |e| (e, port)))
        .collect();
    let topology = Topology::of(&endpoints, local_only, node);
    let collect = |pick: fn(&Endpoint) -> bool| {
        let mut out: Vec<SocketAddr> = endpoints
            .iter()
            .filter(|(e, _)| pick(e) && topology.admits(e))
            // The first address only: the API defines no meaning for the others, and
            // kube-proxy dials only the first.
            .filter_map(|(e, port)| Some(SocketAddr::new(*e.addresses.first()?, *port)))
            .collect();
        out.sort();
        out.dedup();
        out
    };
    let ready = collect(is_ready);
    if ready.is_empty() {
        collect(|e| e.serving && e.terminating)
    } else {
        ready
    }
}

/// A dual-stack Service's endpoints, of its primary family (`Service::primary_ipv4`) when it has
/// any: the agent makes its own connections, and a pod's primary address is the one its
/// readiness is probed on, where an IPv4-only listener still answers.
fn keep_family(endpoints: &mut Vec<SocketAddr>, ipv4: bool) {
    if endpoints.iter().any(|e| e.is_ipv4() == ipv4) {
        endpoints.retain(|e| e.is_ipv4() == ipv4);
    }
}

/// Why a rule with session persistence cannot be served with these backends: one's Service
/// sets ClientIP session affinity, and GEP-1619 has such a rule rejected ("the route MUST be
/// rejected, and a status should be set describing the incompatibility"): the two would each
/// choose the endpoint.
pub fn session_affinity_conflict<'b>(
    rule: &crate::model::Rule,
    mut backends: impl Iterator<Item = &'b Backend>,
) -> Option<String> {
    rule.options().session.as_ref()?;
    let affine = backends.find(|b| b.affinity.is_some())?;
    Some(format!(
        "sessionPersistence beside backend Service {}, whose sessionAffinity is ClientIP \
         (GEP-1619: the two may not both choose the endpoint); remove one of them",
        affine.service
    ))
}

/// Weighted choice among `entries`, each with its cumulative weight (`[w0, w0+w1, …]`):
/// `random % total` falls in entry i with probability wi/total. Weight-0 entries are never
/// chosen. `None` when all weights are 0.
pub fn pick_weighted<T>(
    entries: &[T],
    cumulative: impl Fn(&T) -> u64,
    random: u64,
) -> Option<usize> {
    let total = cumulative(entries.last()?);
    if total == 0 {
        return None;
    }
    let point = random % total;
    Some(entries.partition_point(|e| cumulative(e) <= point))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::EndpointPort;
    use proptest::prelude::*;

    /// An endpoint `10.0.0.N` on `node`, with its readiness and hints.
    fn endpoint(n: u8, node: &str, ready: bool, zones: &[&str], nodes: &[&str]) -> Endpoint {
        Endpoint {
            addresses: Box::new([std::net::IpAddr::from([10, 0, 0, n])]),
            ready,
            serving: true,
            terminating: !ready,
            node_name: Some(node.into()),
            pod: None,
            for_zones: zones.iter().map(|z| z.to_string()).collect(),
            for_nodes: nodes.iter().map(|n| n.to_string()).collect(),
        }
    }

    fn usable(
        endpoints: Vec<Endpoint>,
        local_only: bool,
        node: Option<(&str, Option<&str>)>,
    ) -> Vec<u8> {
        let slice = EndpointSlice {
            key: ObjectKey::new("ns", "s-1"),
            service: ObjectKey::new("ns", "s"),
            ports: vec![EndpointPort {
                name: "http".into(),
                port: 8080,
            }],
            endpoints,
        };
        let node = node.map(|(name, zone)| Node {
            name: name.into(),
            zone: zone.map(Into::into),
        });
        usable_endpoints(&[&slice], "http", local_only, node.as_ref())
            .iter()
            .map(|a| match a.ip() {
                std::net::IpAddr::V4(v4) => v4.octets()[3],
                std::net::IpAddr::V6(_) => 0,
            })
            .collect()
    }

    #[test]
    fn an_endpoint_is_its_first_address_as_kube_proxy_reads_it() {
        let mut two = endpoint(1, "a", true, &[], &[]);
        two.addresses = Box::new([[10, 0, 0, 1].into(), [10, 0, 0, 9].into()]);
        assert_eq!(usable(vec![two], false, None), [1]);
    }

    /// `publishNotReadyAddresses`: the controller writes terminating endpoints ready, whatever
    /// they serve, and kube-proxy keeps using them.
    #[test]
    fn a_terminating_endpoint_written_ready_is_used_as_kube_proxy_uses_it() {
        let published = || {
            let mut e = endpoint(1, "a", true, &[], &[]);
            (e.serving, e.terminating) = (false, true);
            e
        };
        assert_eq!(
            usable(
                vec![published(), endpoint(2, "b", true, &[], &[])],
                false,
                None
            ),
            [1, 2]
        );
        assert_eq!(usable(vec![published()], false, None), [1], "the only one");
    }

    #[test]
    fn internal_traffic_policy_local_keeps_this_nodes_endpoints_only() {
        let eps = || {
            vec![
                endpoint(1, "a", true, &[], &[]),
                endpoint(2, "b", true, &[], &[]),
            ]
        };
        assert_eq!(usable(eps(), true, Some(("a", None))), [1]);
        assert_eq!(
            usable(eps(), true, Some(("c", None))),
            Vec::<u8>::new(),
            "no fallback to other nodes"
        );
        assert_eq!(
            usable(eps(), true, None),
            Vec::<u8>::new(),
            "unknown node: nothing is local"
        );
        // No ready local endpoint: the local serving-but-terminating ones.
        let terminating = vec![
            endpoint(1, "a", false, &[], &[]),
            endpoint(2, "b", true, &[], &[]),
        ];
        assert_eq!(usable(terminating, true, Some(("a", None))), [1]);
        assert_eq!(
            usable(eps(), false, Some(("c", None))),
            [1, 2],
            "Cluster: every node's"
        );
    }

    #[test]
    fn zone_hints_apply_only_when_every_ready_endpoint_has_them_and_one_is_for_this_zone() {
        let hinted = || {
            vec![
                endpoint(1, "a", true, &["z1"], &[]),
                endpoint(2, "b", true, &["z2"], &[]),
                endpoint(3, "c", true, &["z1"], &[]),
                // Not ready: its missing hints do not matter.
                endpoint(4, "d", false, &[], &[]),
            ]
        };
        assert_eq!(usable(hinted(), false, Some(("a", Some("z1")))), [1, 3]);
        assert_eq!(usable(hinted(), false, Some(("b", Some("z2")))), [2]);
        assert_eq!(
            usable(hinted(), false, Some(("x", Some("z9")))),
            [1, 2, 3],
            "no hint for this zone"
        );
        assert_eq!(
            usable(hinted(), false, Some(("x", None))),
            [1, 2, 3],
            "node without a zone label"
        );
        let mut partly = hinted();
        partly.push(endpoint(5, "e", true, &[], &[]));
        assert_eq!(
            usable(partly, false, Some(("a", Some("z1")))),
            [1, 2, 3, 5],
            "one ready endpoint without hints"
        );
    }

    #[test]
    fn node_hints_come_first_then_zone_hints() {
        let hinted = || {
            vec![
                endpoint(1, "a", true, &["z1"], &["a"]),
                endpoint(2, "b", true, &["z1"], &["b"]),
                endpoint(3, "c", true, &["z2"], &["c"]),
            ]
        };
        assert_eq!(
            usable(hinted(), false, Some(("b", Some("z1")))),
            [2],
            "PreferSameNode"
        );
        assert_eq!(
            usable(hinted(), false, Some(("x", Some("z1")))),
            [1, 2],
            "no endpoint for this node: its zone"
        );
    }

    fn cumulative(weights: &[u32]) -> Vec<u64> {
        weights
            .iter()
            .scan(0u64, |acc, w| {
                *acc += u64::from(*w);
                Some(*acc)
            })
            .collect()
    }

    #[test]
    fn all_zero_and_empty_pick_nothing() {
        assert_eq!(pick_weighted(&[], |c: &u64| *c, 5), None);
        assert_eq!(pick_weighted(&cumulative(&[0, 0]), |c| *c, 5), None);
    }

    #[test]
    fn distribution_follows_weights() {
        let c = cumulative(&[70, 0, 30]);
        let mut counts = [0u32; 3];
        let mut state = 0x9E3779B97F4A7C15u64;
        for _ in 0..10_000 {
            // xorshift: deterministic, uniform enough for a share check.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            counts[pick_weighted(&c, |c| *c, state).unwrap()] += 1;
        }
        assert_eq!(counts[1], 0, "weight 0 is never chosen");
        let share = f64::from(counts[0]) / 10_000.0;
        assert!((share - 0.7).abs() < 0.02, "share {share}");
    }

    proptest! {
        #[test]
        fn never_picks_weight_zero(weights in proptest::collection::vec(0u32..5, 1..8), random in any::<u64>()) {
            let c = cumulative(&weights);
            match pick_weighted(&c, |c| *c, random) {
                None => prop_assert!(weights.iter().all(|w| *w == 0)),
                Some(i) => prop_assert!(weights[i] > 0),
            }
        }
    }
}
