//! Every Kubernetes API call the agent makes, declared once, and the shape of the route status
//! it reads back ([`StoredRoute`]).
//!
//! The watchers, the status writer and the leader election build their requests from these
//! entries, `proxy-agent --print-rbac` prints them, and `cargo xtask check-deploy` compares the
//! ClusterRole with that output: a call added here is a permission added there, and a call not
//! declared here cannot be made (the tests also check what the agent actually sent to an API
//! server against this table).

use gamma_engine::model::RouteKind;
use kube::api::DynamicObject;
use kube::core::ApiResource;
use serde_json::Value;

/// One resource the agent calls, with the verbs it uses on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApiCall {
    /// API group ("" for the core group).
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    /// The resource as RBAC names it: the plural, with `/status` for the status subresource.
    pub resource: &'static str,
    pub verbs: &'static [&'static str],
}

impl ApiCall {
    /// A resource the agent follows: listed, then watched.
    const fn followed(
        group: &'static str,
        version: &'static str,
        kind: &'static str,
        resource: &'static str,
    ) -> ApiCall {
        ApiCall {
            group,
            version,
            kind,
            resource,
            verbs: &["list", "watch"],
        }
    }
}

const GATEWAY: &str = "gateway.networking.k8s.io";

pub const SERVICES: ApiCall = ApiCall::followed("", "v1", "Service", "services");
pub const ENDPOINT_SLICES: ApiCall =
    ApiCall::followed("discovery.k8s.io", "v1", "EndpointSlice", "endpointslices");
pub const PODS: ApiCall = ApiCall::followed("", "v1", "Pod", "pods");
/// This agent's Node only (by a field selector), for its zone label.
pub const NODES: ApiCall = ApiCall::followed("", "v1", "Node", "nodes");
/// Namespaces: an annotation opts their pods in to local sockets.
pub const NAMESPACES: ApiCall = ApiCall::followed("", "v1", "Namespace", "namespaces");
pub const HTTP_ROUTES: ApiCall = ApiCall::followed(GATEWAY, "v1", "HTTPRoute", "httproutes");
pub const GRPC_ROUTES: ApiCall = ApiCall::followed(GATEWAY, "v1", "GRPCRoute", "grpcroutes");
/// ReferenceGrants: a backendRef into a third namespace needs one (v1beta1: served by every
/// release of the CRDs).
pub const REFERENCE_GRANTS: ApiCall =
    ApiCall::followed(GATEWAY, "v1beta1", "ReferenceGrant", "referencegrants");
/// Status is written with server-side apply (patch); get re-reads it after a conflict.
pub const HTTP_ROUTES_STATUS: ApiCall = ApiCall {
    resource: "httproutes/status",
    verbs: &["get", "patch"],
    ..HTTP_ROUTES
};
pub const GRPC_ROUTES_STATUS: ApiCall = ApiCall {
    resource: "grpcroutes/status",
    verbs: &["get", "patch"],
    ..GRPC_ROUTES
};
/// XMesh (experimental, cluster-scoped): the leader reports the supported features in ours.
pub const XMESHES: ApiCall = ApiCall::followed(
    "gateway.networking.x-k8s.io",
    "v1alpha1",
    "XMesh",
    "xmeshes",
);
pub const XMESHES_STATUS: ApiCall = ApiCall {
    resource: "xmeshes/status",
    verbs: &["patch"],
    ..XMESHES
};
/// The status writer's leader election (in the agent's own namespace).
pub const LEASES: ApiCall = ApiCall {
    group: "coordination.k8s.io",
    version: "v1",
    kind: "Lease",
    resource: "leases",
    verbs: &["get", "create", "update"],
};

/// The server's version (`GET /version`): the client's first request
/// (`sources::kube::client::connect`); refused, nothing is lost: it only opens the connection.
pub const SERVER_VERSION: &str = "/version";
/// Whether the server is ready (`GET /readyz`): asked when a kind's list answers 404
/// (`sources::kube::watch`); refused, the server is taken for ready.
pub const SERVER_READY: &str = "/readyz";
/// The calls outside `API_CALLS`: paths every client may read by default (the ClusterRole
/// `system:public-info-viewer`), so the agent's role grants nothing for them.
pub const PUBLIC_INFO: &[&str] = &[SERVER_VERSION, SERVER_READY];

pub const API_CALLS: &[ApiCall] = &[
    SERVICES,
    ENDPOINT_SLICES,
    PODS,
    NODES,
    NAMESPACES,
    HTTP_ROUTES,
    GRPC_ROUTES,
    REFERENCE_GRANTS,
    HTTP_ROUTES_STATUS,
    GRPC_ROUTES_STATUS,
    XMESHES,
    XMESHES_STATUS,
    LEASES,
];

impl ApiCall {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// The plural, without a subresource.
    pub fn plural(&self) -> &'static str {
        self.resource.split('/').next().unwrap_or(self.resource)
    }

    /// What kube-rs needs to address the resource (dynamically typed).
    pub fn api_resource(&self) -> ApiResource {
        ApiResource {
            group: self.group.to_string(),
            version: self.version.to_string(),
            api_version: self.api_version(),
            kind: self.kind.to_string(),
            plural: self.plural().to_string(),
        }
    }

    /// `group/resource` for messages (`services` for the core group).
    pub fn describe(&self) -> String {
        if self.group.is_empty() {
            self.resource.to_string()
        } else {
            format!("{}.{}", self.plural(), self.group)
        }
    }
}

/// The table as RBAC rules: `[{"apiGroup": "", "resource": "services", "verbs": [...]}, …]`.
pub fn rbac_json() -> serde_json::Value {
    API_CALLS
        .iter()
        .map(|c| {
            serde_json::json!({
                "apiGroup": c.group,
                "resource": c.resource,
                "verbs": c.verbs,
            })
        })
        .collect()
}

/// A route as the API server stores it: what the status writer diffs against.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredRoute {
    pub kind: RouteKind,
    pub namespace: String,
    pub name: String,
    pub resource_version: String,
    pub generation: i64,
    /// `status.parents`, every controller's entries, as stored.
    pub parents: Vec<Value>,
}

impl StoredRoute {
    pub fn from_object(kind: RouteKind, object: &DynamicObject) -> StoredRoute {
        let meta = &object.metadata;
        StoredRoute {
            kind,
            namespace: meta.namespace.clone().unwrap_or_else(|| "default".into()),
            name: meta.name.clone().unwrap_or_default(),
            resource_version: meta.resource_version.clone().unwrap_or_default(),
            // As the model reads it (an object the API server returns always has one).
            generation: meta.generation.unwrap_or(1),
            parents: object
                .data
                .pointer("/status/parents")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::Resource;

    fn same_resource<K: Resource<DynamicType = ()>>(call: &ApiCall) {
        assert_eq!(call.group, K::group(&()), "{call:?}");
        assert_eq!(call.version, K::version(&()), "{call:?}");
        assert_eq!(call.kind, K::kind(&()), "{call:?}");
        assert_eq!(call.plural(), K::plural(&()), "{call:?}");
    }

    #[test]
    fn table_matches_the_typed_resources() {
        use gateway_api::experimental::{grpcroutes::GrpcRoute, httproutes::HttpRoute};
        use k8s_openapi::api::{
            coordination::v1::Lease, core::v1::Pod, core::v1::Service, discovery::v1::EndpointSlice,
        };
        same_resource::<Service>(&SERVICES);
        same_resource::<EndpointSlice>(&ENDPOINT_SLICES);
        same_resource::<Pod>(&PODS);
        same_resource::<k8s_openapi::api::core::v1::Namespace>(&NAMESPACES);
        same_resource::<HttpRoute>(&HTTP_ROUTES);
        same_resource::<GrpcRoute>(&GRPC_ROUTES);
        same_resource::<HttpRoute>(&HTTP_ROUTES_STATUS);
        same_resource::<GrpcRoute>(&GRPC_ROUTES_STATUS);
        same_resource::<Lease>(&LEASES);
    }

    #[test]
    fn rbac_rules_are_unique_and_complete() {
        let rules = rbac_json();
        let rules = rules.as_array().unwrap();
        assert_eq!(rules.len(), API_CALLS.len());
        let mut seen = std::collections::BTreeSet::new();
        for rule in rules {
            let key = (
                rule["apiGroup"].as_str().unwrap().to_string(),
                rule["resource"].as_str().unwrap().to_string(),
            );
            assert!(seen.insert(key.clone()), "{key:?} declared twice");
            assert!(!rule["verbs"].as_array().unwrap().is_empty());
        }
        assert_eq!(
            rules[0],
            serde_json::json!({"apiGroup": "", "resource": "services", "verbs": ["list", "watch"]})
        );
    }
}
