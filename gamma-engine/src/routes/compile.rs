//! Compiling a Service's routes into frontends: attachment, producer/consumer groups, route-kind
//! conflicts, rule compilation and precedence order.

use super::backends::{self, Resolver};
use super::precedence::RankKey;
use super::{
    Attached, CompiledRule, Frontend, MirrorTarget, MirrorTargets, RareCompiled, ResolvedBackend,
    RouteTable, World,
};
use crate::model::{
    BackendRef, DeclaredProtocol, Filter, ParentRef, Route, RouteKind, RouteMatch, Service,
    ServicePort,
};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

/// Routes attached to one Service port, by caller group: `None` for producer routes (the
/// Service's namespace), `Some(ns)` for consumer routes of namespace `ns`.
pub(crate) type Groups<'a> = BTreeMap<Option<&'a str>, Vec<&'a Arc<Route>>>;

/// Whether `route` attaches to `port` of `service` through any of its parentRefs.
/// Whether `route` applies to `port` of `service`: it selects the port, and the port's
/// appProtocol or name does not state opaque TCP, which the agent passes through unparsed (the
/// route's status says so, `status::accepted`).
pub(crate) fn attaches(route: &Route, service: &Service, port: &ServicePort) -> bool {
    port.takes_routes() && parents_on(route, service).any(|p| p.selects(port))
}

/// The parentRefs of `route` to `service`.
fn parents_on<'r>(route: &'r Route, service: &'r Service) -> impl Iterator<Item = &'r ParentRef> {
    let key = &service.key;
    route
        .parent_refs
        .iter()
        .filter(move |p| p.service(route.namespace()).as_ref() == Some(key))
}

/// Whether routes of `namespace` among `routes` name `port` of `service` (parentRef `port` or
/// `sectionName`, or a parentRef to a Service whose only port it is): they say it carries what
/// routes apply to.
pub(crate) fn named_by(
    routes: &[&Arc<Route>],
    namespace: &str,
    service: &Service,
    port: &ServicePort,
) -> bool {
    let only_port = service.ports.len() == 1;
    routes
        .iter()
        .filter(|r| r.namespace() == namespace)
        .any(|r| {
            parents_on(r, service).any(|p| p.selects(port) && (only_port || p.names_port(port)))
        })
}

/// How a port's connections are told apart for every caller: by what its appProtocol or name
/// states, else by its number ([`ServicePort::declared_protocol`]) unless a producer route names
/// the port, which says it carries what routes apply to: sniffed, then. A consumer route naming
/// it makes it sniffed for its own callers only ([`Frontend::protocol_for`]): the Service's own
/// callers of a server-first protocol must not wait for the detection timeout.
pub(crate) fn port_protocol(
    port: &ServicePort,
    service: &Service,
    routes: &[&Arc<Route>],
) -> Option<DeclaredProtocol> {
    if named_by(routes, &service.key.namespace, service, port) {
        port.stated_protocol()
    } else {
        port.declared_protocol()
    }
}

pub(crate) fn groups<'a>(
    service: &Service,
    port: &ServicePort,
    routes: &[&'a Arc<Route>],
) -> Groups<'a> {
    let mut groups: Groups<'a> = BTreeMap::new();
    for route in routes
        .iter()
        .copied()
        .filter(|r| attaches(r, service, port))
    {
        let ns = route.namespace();
        let group = (ns != service.key.namespace).then_some(ns);
        groups.entry(group).or_default().push(route);
    }
    groups
}

/// Only one route kind serves a group on a port: GRPCRoute wins over HTTPRoute (GEP-1294).
pub(crate) fn winning_kind(routes: &[&Arc<Route>]) -> RouteKind {
    if routes.iter().any(|r| r.kind() == RouteKind::Grpc) {
        RouteKind::Grpc
    } else {
        RouteKind::Http
    }
}

/// The frontends (one per port) of a Service. Headless and ExternalName Services have none, nor
/// those of another proxy.
pub fn compile_service(service: &Service, world: &dyn World) -> Vec<Arc<Frontend>> {
    if !service.routable() {
        return Vec::new();
    }
    let routes = world.routes_on(&service.key);
    let resolver = Resolver::new(world);
    service
        .ports
        .iter()
        .filter_map(|port| {
            let direct = resolver.service_backend(service, port.port)?;
            let declared = port_protocol(port, service, &routes);
            let mut producer = None;
            let mut consumers = Vec::new();
            for (group, routes) in groups(service, port, &routes) {
                let names_port = named_by(
                    &routes,
                    group.unwrap_or(&service.key.namespace),
                    service,
                    port,
                );
                // A port presumed opaque stays opaque for callers whose routes do not name it
                // (`Frontend::protocol_for`): their table would never apply, and would only have
                // the port's connections steered through the agent, which dials from the node's
                // address (a NetworkPolicy or a database's host rules that admitted the pods
                // would then refuse them).
                if declared == Some(DeclaredProtocol::Opaque) && !names_port {
                    continue;
                }
                let table = table(&routes, names_port, &resolver, &service.key.namespace);
                match group {
                    None => producer = Some(table),
                    Some(ns) => consumers.push((ns.into(), table)),
                }
            }
            Some(Arc::new(Frontend {
                service: service.key.clone(),
                port: port.port,
                port_name: port.name.clone(),
                declared,
                addresses: service
                    .cluster_ips
                    .iter()
                    .map(|ip| SocketAddr::new(*ip, port.port))
                    .collect(),
                producer,
                consumers: consumers.into_iter().collect(),
                direct,
                direct_series: Attached::default(),
                series: Attached::default(),
            }))
        })
        .collect()
}

fn table(
    routes: &[&Arc<Route>],
    names_port: bool,
    resolver: &Resolver<'_>,
    parent_namespace: &str,
) -> RouteTable {
    let kind = winning_kind(routes);
    let mut ranked: Vec<(RankKey, (RouteMatch, usize))> = Vec::new();
    let mut rules = Vec::new();
    for route in routes.iter().filter(|r| r.kind() == kind) {
        for (index, rule) in route.rules.iter().enumerate() {
            let compiled = rules.len();
            rules.push(compile_rule(route, index, resolver, parent_namespace));
            for (match_index, m) in rule.matches.iter().enumerate() {
                let key = RankKey::new(
                    m,
                    route.meta.created,
                    &route.id.key.namespace,
                    &route.id.key.name,
                    index,
                    match_index,
                );
                ranked.push((key, (m.clone(), compiled)));
            }
        }
    }
    ranked.sort_by(|a, b| super::precedence::compare(&a.0, &b.0));
    RouteTable::new(
        kind,
        names_port,
        ranked.into_iter().map(|(_, entry)| entry),
        rules,
    )
}

fn compile_rule(
    route: &Arc<Route>,
    index: usize,
    resolver: &Resolver<'_>,
    parent_namespace: &str,
) -> CompiledRule {
    let rule = &route.rules[index];
    let resolve = |b: &BackendRef| resolver.resolve(b, route, parent_namespace);
    let mirror_targets = |filters: &[Filter]| -> Box<[MirrorTarget]> {
        filters
            .iter()
            .filter_map(Filter::sends_to)
            .map(|b| resolve(b).ok())
            .collect()
    };
    let mut unresolved = Vec::new();
    let mut cumulative_weight = 0u32;
    let backends: smallvec::SmallVec<[ResolvedBackend; 1]> = rule
        .backends
        .iter()
        .enumerate()
        .map(|(index, b)| {
            // Weights are at most 1,000,000 and the CRD allows 16 backendRefs: no overflow
            // from an API server (a file could list more; the sum then stops growing).
            cumulative_weight = cumulative_weight.saturating_add(b.weight);
            let backend = resolve(b)
                .map_err(|error| unresolved.push((index, error)))
                .ok();
            ResolvedBackend {
                backend,
                cumulative_weight,
            }
        })
        .collect();
    let mirrors = MirrorTargets {
        rule: mirror_targets(rule.filters()),
        backends: rule
            .backends
            .iter()
            .map(|b| mirror_targets(b.filters()))
            .collect(),
    };
    let any_mirror = !mirrors.rule.is_empty() || mirrors.backends.iter().any(|b| !b.is_empty());
    let conflict = backends::session_affinity_conflict(
        rule,
        backends.iter().filter_map(|b| b.backend.as_deref()),
    );
    let rare = RareCompiled {
        mirrors: any_mirror.then_some(mirrors),
        unresolved: unresolved.into(),
        conflict,
    };
    CompiledRule {
        route: route.clone(),
        index,
        rare: (rare != RareCompiled::default()).then(|| Box::new(rare)),
        backends,
        series: Attached::default(),
    }
}
