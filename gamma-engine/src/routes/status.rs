//! Route status for Service parents: the `status.parents[]` entries this mesh writes.

use super::compile::{groups, named_by, port_protocol, winning_kind};
use super::{backends, World};
use crate::model::{DeclaredProtocol, ParentRef, RefusedRoute, Route, RouteKind};
use serde::Serialize;
use std::borrow::Cow;
use std::sync::Arc;

/// Our `controllerName` in route status.
pub const CONTROLLER_NAME: &str = "gamma-node.dev/agent";

/// The condition types this controller sets in its parent entries. Any other type found in one
/// is another controller's (a policy attached to the route, GEP-713), to be kept as it is.
pub const CONDITION_TYPES: [&str; 3] = ["Accepted", "ResolvedRefs", "PartiallyInvalid"];

/// Our entry for one parent. Kept for every route in every snapshot, so it is small: the
/// generation is said once, and the conditions of a route that is simply working (accepted,
/// every reference resolved) are one static list shared by all such routes.
#[derive(Clone, Debug)]
pub struct ParentStatus {
    /// The route's parentRefs (shared with it), and which one this is about.
    pub parents: Arc<[ParentRef]>,
    pub parent: usize,
    /// The route generation the conditions describe (each condition's `observedGeneration`).
    pub observed_generation: i64,
    pub conditions: Conditions,
}

/// A parent's conditions: those of a route that simply works, shared by all such routes (no
/// block), or its own list.
#[derive(Clone, Debug)]
pub struct Conditions(Option<Box<[Condition]>>);

impl Conditions {
    /// Accepted, every reference resolved.
    pub const WORKING: Conditions = Conditions(None);
}

impl std::ops::Deref for Conditions {
    type Target = [Condition];

    fn deref(&self) -> &[Condition] {
        self.0.as_deref().unwrap_or(&WORKING)
    }
}

impl PartialEq for Conditions {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for Conditions {}

impl From<Vec<Condition>> for Conditions {
    fn from(conditions: Vec<Condition>) -> Self {
        Conditions(Some(conditions.into_boxed_slice()))
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: &'static str,
    /// "True" or "False".
    pub status: &'static str,
    pub reason: &'static str,
    pub message: Cow<'static, str>,
}

const ATTACHED: &str = "attached to the Service frontend";
const ALL_RESOLVED: &str = "all backendRefs resolved";

/// The conditions of an accepted route whose references all resolve.
static WORKING: [Condition; 2] = [
    Condition {
        type_: "Accepted",
        status: "True",
        reason: "Accepted",
        message: Cow::Borrowed(ATTACHED),
    },
    Condition {
        type_: "ResolvedRefs",
        status: "True",
        reason: "ResolvedRefs",
        message: Cow::Borrowed(ALL_RESOLVED),
    },
];

/// Alike when about the same parentRef, at the same generation, with the same conditions.
impl PartialEq for ParentStatus {
    fn eq(&self, other: &Self) -> bool {
        self.parent_ref() == other.parent_ref()
            && self.observed_generation == other.observed_generation
            && self.conditions == other.conditions
    }
}

impl Eq for ParentStatus {}

impl ParentStatus {
    pub fn parent_ref(&self) -> &ParentRef {
        &self.parents[self.parent]
    }

    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }
}

/// As the API writes it: `controllerName`, and `observedGeneration` in each condition.
impl Serialize for ParentStatus {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Observed<'a> {
            #[serde(flatten)]
            condition: &'a Condition,
            observed_generation: i64,
        }
        let conditions = self.conditions.iter().map(|condition| Observed {
            condition,
            observed_generation: self.observed_generation,
        });
        let mut st = s.serialize_struct("ParentStatus", 3)?;
        st.serialize_field("parentRef", self.parent_ref())?;
        st.serialize_field("controllerName", CONTROLLER_NAME)?;
        st.serialize_field("conditions", &conditions.collect::<Vec<_>>())?;
        st.end()
    }
}

/// One entry per parentRef that names a Service; parentRefs to Gateways are not ours.
pub fn route_status(route: &Route, world: &dyn World) -> Vec<ParentStatus> {
    let condition = |type_, ok: bool, reason, message: Cow<'static, str>| Condition {
        type_,
        status: if ok { "True" } else { "False" },
        reason,
        message: capped(message),
    };
    let resolver = backends::Resolver::new(world);
    route
        .parent_refs
        .iter()
        .enumerate()
        .filter_map(|(index, parent)| {
            let key = parent.service(route.namespace())?;
            let (dropped, failing_backends) = invalid_rules(route, &key.namespace, &resolver);
            let no_valid_rule = !dropped.is_empty() && dropped.len() == route.rules.len();
            let resolved = resolved_refs(route, &key.namespace, world, &failing_backends);
            let (mut accepted, mut reason, mut message) = accepted(route, parent, &key, world);
            // The spec: a route none of whose rules is valid is not Accepted; one with some
            // valid rules is, and says which rules it dropped.
            if accepted && no_valid_rule {
                (accepted, reason) = (false, "UnsupportedValue");
                // Not Accepted, but not without effect: its rules' requests get 500, as a
                // dropped rule's do, so that none falls through to an answer it did not mean.
                message = format!(
                    "no rule of this route is valid, and the requests its rules match are \
                     answered 500 (not left to other routes). {}",
                    dropped.join(". ")
                )
                .into();
            }
            // "Dropped Rule" only: the spec's message MUST start so, and a rule that serves is
            // not dropped.
            let partially_invalid = accepted && !dropped.is_empty();
            let conditions =
                if accepted && message == ATTACHED && resolved.is_ok() && !partially_invalid {
                    Conditions::WORKING
                } else {
                    let resolved = match resolved {
                        Ok(()) => {
                            condition("ResolvedRefs", true, "ResolvedRefs", ALL_RESOLVED.into())
                        }
                        Err((reason, message)) => condition("ResolvedRefs", false, reason, message),
                    };
                    let mut conditions =
                        vec![condition("Accepted", accepted, reason, message), resolved];
                    if partially_invalid {
                        // Set only as True (the spec).
                        conditions.push(condition(
                            "PartiallyInvalid",
                            true,
                            "UnsupportedValue",
                            dropped.join(". ").into(),
                        ));
                    }
                    conditions.into()
                };
            Some(ParentStatus {
                parents: route.parent_refs.clone(),
                parent: index,
                observed_generation: route.meta.generation,
                conditions,
            })
        })
        .collect()
}

/// The rules dropped whole (the route is partly invalid) as a parent Service of
/// `parent_namespace` serves them, and the served rules' backendRefs that get 500 (invalid: a
/// filter the agent cannot apply), each as its status message names it.
fn invalid_rules(
    route: &Route,
    parent_namespace: &str,
    resolver: &backends::Resolver<'_>,
) -> (Vec<String>, Vec<String>) {
    let mut dropped = Vec::new();
    let mut failing_backends = Vec::new();
    for (i, rule) in route.rules.iter().enumerate() {
        let name = rule.name().map(|n| format!(" ({n})")).unwrap_or_default();
        let conflict = || {
            // Rules with session persistence only: few, and resolving costs.
            rule.options().session.as_ref()?;
            // As this parent's table resolves them (a consumer route may send to its parent's
            // namespace without a grant, and a backend it may not send to is no conflict).
            let resolve = |b| resolver.resolve(b, route, parent_namespace).ok();
            let resolved: Vec<_> = rule.backends.iter().filter_map(resolve).collect();
            backends::session_affinity_conflict(rule, resolved.iter().map(|b| &**b))
                .map(|why| format!("{why}; the requests it matches get 500"))
        };
        match rule.dropped_because().or_else(conflict) {
            Some(why) => dropped.push(format!("Dropped Rule {i}{name}: {why}")),
            None => failing_backends.extend(
                rule.unsupported_backends()
                    .map(|b| format!("Rule {i}{name}: {b}")),
            ),
        }
    }
    (dropped, failing_backends)
}

/// The status of a route whose newest generation was refused: not Accepted at that generation,
/// saying whether an older generation is still served.
pub fn refused_status(refused: &RefusedRoute, served: Option<&Route>) -> Vec<ParentStatus> {
    // The last good generation lives in each agent's memory: an agent started since the refused
    // edit (a reboot, an upgrade) never saw it. Said both ways, whichever agent writes.
    let still = match served {
        Some(route) => format!(
            "generation {} stays in use until this is fixed on the agents that served it; an \
             agent started since serves nothing of this route",
            route.meta.generation
        ),
        // Generation 1: there was none before it.
        None if refused.generation <= 1 => {
            "nothing of this route is in use until it is fixed".to_string()
        }
        None => "nothing of this route is in use on agents started since; an agent that served \
                 an earlier generation keeps it until this is fixed"
            .to_string(),
    };
    let message = capped(
        format!(
            "generation {} is invalid: {}; {still}",
            refused.generation, refused.reason
        )
        .into(),
    );
    let namespace = &refused.key.key.namespace;
    // A parent as a status entry tells it: its Service, port and section.
    let parent = |p: &ParentRef| {
        p.service(namespace)
            .map(|key| (key, p.port, p.section_name.clone()))
    };
    let named: Vec<_> = refused.parent_refs.iter().filter_map(parent).collect();
    let entry = |parents: &Arc<[ParentRef]>, parent: usize| ParentStatus {
        parents: parents.clone(),
        parent,
        observed_generation: refused.generation,
        conditions: vec![Condition {
            type_: "Accepted",
            status: "False",
            reason: "UnsupportedValue",
            message: message.clone(),
        }]
        .into(),
    };
    let refused_parents = refused
        .parent_refs
        .iter()
        .enumerate()
        .filter(|(_, p)| p.service(namespace).is_some())
        .map(|(index, _)| entry(&refused.parent_refs, index));
    // The Services the served generation still routes that the refused one no longer names (an
    // edit that moved the route elsewhere): their entries stay, saying so, rather than vanish
    // while their traffic still runs through the route.
    let still_routed = served.into_iter().flat_map(|route| {
        route
            .parent_refs
            .iter()
            .enumerate()
            .filter(|(_, p)| parent(p).is_some_and(|p| !named.contains(&p)))
            .map(|(index, _)| entry(&route.parent_refs, index))
    });
    refused_parents.chain(still_routed).collect()
}

/// The longest condition message the API server stores (the CRDs' `maxLength`). A longer one
/// (every rule dropped with a long regular expression quoted) would have the whole status
/// refused, and the old one would stay.
pub const MAX_MESSAGE: usize = 32_768;

/// `message`, cut to [`MAX_MESSAGE`] bytes (so as many characters at most) on a character
/// boundary, ending with "…" when cut.
fn capped(message: Cow<'static, str>) -> Cow<'static, str> {
    if message.len() <= MAX_MESSAGE {
        return message;
    }
    let mut end = MAX_MESSAGE - '…'.len_utf8();
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &message[..end]).into()
}

fn accepted(
    route: &Route,
    parent: &ParentRef,
    key: &crate::model::ObjectKey,
    world: &dyn World,
) -> (bool, &'static str, Cow<'static, str>) {
    let Some(service) = world.service(key) else {
        return (
            false,
            "NoMatchingParent",
            format!("Service {key} does not exist").into(),
        );
    };
    if let Some(proxy) = &service.proxied_by {
        return (
            false,
            "NoMatchingParent",
            format!(
                "Service {key} is handed to the proxy {proxy} by its label {}: the mesh, as \
                 kube-proxy, leaves it to that proxy",
                crate::model::SERVICE_PROXY_NAME
            )
            .into(),
        );
    }
    if !service.has_frontend() {
        return (
            false,
            "NoMatchingParent",
            format!("Service {key} is headless or ExternalName: it has no frontend to route")
                .into(),
        );
    }
    let ports: Vec<_> = service.ports.iter().filter(|p| parent.selects(p)).collect();
    if ports.is_empty() {
        let missing = match (parent.port, parent.section_name.as_deref()) {
            (Some(port), Some(name)) => format!("no port that is both {port} and named {name}"),
            (Some(port), None) => format!("no port {port}"),
            (None, Some(name)) => format!("no port named {name}"),
            // Only TCP ports are kept: a Service of UDP or SCTP ports alone has none.
            (None, None) => "no TCP port".to_string(),
        };
        return (
            false,
            "NoMatchingParent",
            format!("Service {key} has {missing}").into(),
        );
    }
    // The ports whose connections are parsed: routes apply nowhere else.
    let routes = world.routes_on(key);
    let routed: Vec<_> = ports
        .iter()
        .filter(|p| {
            port_protocol(p, service, &routes) != Some(DeclaredProtocol::Opaque)
                || (p.takes_routes() && named_by(&routes, route.namespace(), service, p))
        })
        .collect();
    if routed.is_empty() {
        let named: Vec<String> = ports
            .iter()
            .map(|p| match &p.name {
                Some(name) => format!("{} (`{name}`)", p.port),
                None => p.port.to_string(),
            })
            .collect();
        let why = if ports.iter().any(|p| p.takes_routes()) {
            // Opaque by its number alone, which a route naming the port overrides for the
            // callers it applies to (a producer route for every caller).
            "is presumed opaque TCP by its number (a server-first protocol's), and only a route \
             naming the port makes the agent parse its connections (for the callers the route \
             applies to)"
        } else {
            "is declared opaque TCP by its appProtocol or name"
        };
        return (
            false,
            "NoMatchingParent",
            format!(
                "port {} of Service {key} {why}: the agent passes its connections through \
                 unparsed, and routes do not apply; declare it HTTP (appProtocol: http, or \
                 kubernetes.io/h2c) to route it",
                named.join(", ")
            )
            .into(),
        );
    }
    if route.kind() == RouteKind::Http {
        let lost: Vec<String> = routed
            .iter()
            .filter(|port| {
                groups(service, port, &routes).values().any(|g| {
                    g.iter().any(|r| r.key() == route.key()) && winning_kind(g) == RouteKind::Grpc
                })
            })
            .map(|port| port.port.to_string())
            .collect();
        if lost.len() == routed.len() {
            return (false, "Conflicted", format!("a GRPCRoute is attached to the same port of Service {key}; GRPCRoute takes precedence").into());
        }
        if !lost.is_empty() {
            // Served on its other ports: Accepted, saying where it is not.
            return (
                true,
                "Accepted",
                format!(
                    "{ATTACHED}, but not on port {} of Service {key}: a GRPCRoute is attached \
                     there, and GRPCRoute takes precedence",
                    lost.join(", ")
                )
                .into(),
            );
        }
    }
    (true, "Accepted", ATTACHED.into())
}

/// Whether every backendRef (and mirror backendRef) resolves for a parent Service of
/// `parent_namespace`: if not, the reason and message of `ResolvedRefs=False`, naming the first
/// that does not and each one in `failing_backends` (served rules' backendRefs with a filter the
/// agent cannot apply).
fn resolved_refs(
    route: &Route,
    parent_namespace: &str,
    world: &dyn World,
    failing_backends: &[String],
) -> Result<(), (&'static str, Cow<'static, str>)> {
    let resolver = backends::Resolver::new(world);
    let unresolved = route
        .rules
        .iter()
        .flat_map(|r| r.referenced_backends())
        .find_map(|reference| resolver.resolve(reference, route, parent_namespace).err());
    match (unresolved, failing_backends) {
        (None, []) => Ok(()),
        (Some(e), []) => Err((e.reason(), e.to_string().into())),
        // A backendRef with a filter the agent cannot apply is invalid too (its share gets 500).
        (unresolved, failing) => {
            let reason = unresolved
                .as_ref()
                .map_or("UnsupportedValue", |e| e.reason());
            let first = unresolved.map(|e| e.to_string());
            Err((
                reason,
                first
                    .into_iter()
                    .chain(failing.iter().cloned())
                    .collect::<Vec<_>>()
                    .join(". ")
                    .into(),
            ))
        }
    }
}
