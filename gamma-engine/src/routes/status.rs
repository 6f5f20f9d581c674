//! Route status for Service parents: the `status.parents[]` entries this mesh writes.

use super::compile::{groups, winning_kind};
use super::{backends, World};
use crate::model::{ParentRef, Route, RouteKind};
use serde::Serialize;

/// Our `controllerName` in route status.
pub const CONTROLLER_NAME: &str = "gamma-node.dev/agent";

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ParentStatus {
    pub parent_ref: ParentRef,
    pub controller_name: &'static str,
    pub conditions: Vec<Condition>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: &'static str,
    /// "True" or "False".
    pub status: &'static str,
    pub reason: &'static str,
    pub message: String,
    pub observed_generation: i64,
}

impl ParentStatus {
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }
}

/// One entry per parentRef that names a Service; parentRefs to Gateways are not ours.
pub fn route_status(route: &Route, world: &dyn World) -> Vec<ParentStatus> {
    let generation = route.meta.generation;
    let condition = |type_, ok: bool, reason, message: String| Condition {
        type_,
        status: if ok { "True" } else { "False" },
        reason,
        message,
        observed_generation: generation,
    };
    let resolved = resolved_refs(route, world);
    route
        .parent_refs
        .iter()
        .filter_map(|parent| {
            let key = parent.service(&route.meta.key.namespace)?;
            let (accepted, reason, message) = accepted(route, parent, &key, world);
            let resolved = match &resolved {
                Ok(()) => condition(
                    "ResolvedRefs",
                    true,
                    "ResolvedRefs",
                    "all backendRefs resolved".into(),
                ),
                Err(e) => condition("ResolvedRefs", false, e.reason(), e.to_string()),
            };
            Some(ParentStatus {
                parent_ref: parent.clone(),
                controller_name: CONTROLLER_NAME,
                conditions: vec![condition("Accepted", accepted, reason, message), resolved],
            })
        })
        .collect()
}

fn accepted(
    route: &Route,
    parent: &ParentRef,
    key: &crate::model::ObjectKey,
    world: &dyn World,
) -> (bool, &'static str, String) {
    let Some(service) = world.service(key) else {
        return (
            false,
            "NoMatchingParent",
            format!("Service {key} does not exist"),
        );
    };
    if !service.has_frontend() {
        return (
            false,
            "NoMatchingParent",
            format!("Service {key} is headless or ExternalName: it has no frontend to route"),
        );
    }
    let ports: Vec<_> = service
        .ports
        .iter()
        .filter(|p| {
            parent.port.is_none_or(|n| n == p.port)
                && parent
                    .section_name
                    .as_ref()
                    .is_none_or(|s| p.name.as_ref() == Some(s))
        })
        .collect();
    if ports.is_empty() {
        let wanted = parent
            .section_name
            .clone()
            .or(parent.port.map(|p| p.to_string()))
            .unwrap_or_default();
        return (
            false,
            "NoMatchingParent",
            format!("Service {key} has no port {wanted}"),
        );
    }
    if route.kind == RouteKind::Http {
        let routes = world.routes_on(key);
        let conflicted = ports.iter().all(|port| {
            groups(service, port, &routes).values().any(|g| {
                g.iter().any(|r| r.key() == route.key()) && winning_kind(g) == RouteKind::Grpc
            })
        });
        if conflicted {
            return (false, "Conflicted", format!("a GRPCRoute is attached to the same port of Service {key}; GRPCRoute takes precedence"));
        }
    }
    (true, "Accepted", "attached to the Service frontend".into())
}

/// The first backendRef (or mirror backendRef) that does not resolve, if any.
fn resolved_refs(route: &Route, world: &dyn World) -> Result<(), backends::BackendError> {
    let namespace = &route.meta.key.namespace;
    let resolver = backends::Resolver::new(world);
    for reference in route.rules.iter().flat_map(|r| r.referenced_backends()) {
        resolver.resolve(reference, namespace, false)?;
    }
    Ok(())
}
