//! From API objects (as `kubectl apply` takes them, or as a watch delivers them) to the model.

use super::*;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;

/// An object the engine keeps, or the identity of one being deleted.
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Service(Service),
    EndpointSlice(EndpointSlice),
    Pod(Pod),
    Route(Route),
    /// A route generation that does not convert (see [`RefusedRoute`]).
    RefusedRoute(RefusedRoute),
    ReferenceGrant(ReferenceGrant),
    /// The agent's own node (the Kubernetes source watches that one only).
    Node(Node),
    Namespace(Namespace),
}

impl Object {
    /// `Kind namespace/name`, for messages.
    pub fn describe(&self) -> String {
        match self {
            Object::Service(s) => format!("Service {}", s.key),
            Object::EndpointSlice(e) => format!("EndpointSlice {}", e.key),
            Object::Pod(p) => format!("Pod {}", p.key),
            Object::Route(r) => r.key().to_string(),
            Object::RefusedRoute(r) => format!("{} (refused)", r.key),
            Object::ReferenceGrant(g) => format!("ReferenceGrant {}", g.key),
            Object::Node(n) => format!("Node {}", n.name),
            Object::Namespace(n) => format!("Namespace {}", n.name),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ObjectError {
    #[error("kind {kind} ({api_version}) is not one the agent uses")]
    UnknownKind { api_version: String, kind: String },
    #[error("field `{field}`: {message}")]
    Invalid { field: String, message: String },
    #[error("internal: a filter type was not handled")]
    Unreachable,
    /// A route that does not convert, with what its status needs.
    #[error("{}", .0.reason)]
    RouteRefused(Box<RefusedRoute>),
}

impl ObjectError {
    /// The refused route generation, when the object was a route whose identity is known.
    pub fn refused_route(&self) -> Option<&RefusedRoute> {
        match self {
            ObjectError::RouteRefused(refused) => Some(refused),
            _ => None,
        }
    }
}

/// A field that does not convert, and why: the error of every conversion in the model.
pub(super) fn invalid(field: impl Into<String>, message: impl Into<String>) -> ObjectError {
    ObjectError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// Deserializes `value` as `T`, naming the field that does not fit.
fn typed<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> Result<T, ObjectError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        invalid(
            if path == "." {
                "(document)".to_string()
            } else {
                path
            },
            e.into_inner().to_string(),
        )
    })
}

impl Object {
    /// Converts one API object given as JSON/YAML value (`apiVersion`, `kind`, `metadata`, …).
    /// Kinds the engine does not need are `UnknownKind`.
    pub fn from_value(value: serde_json::Value) -> Result<Object, ObjectError> {
        let api_version = value
            .get("apiVersion")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string();
        let kind = value
            .get("kind")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string();
        match (api_version.as_str(), kind.as_str()) {
            ("v1", "Service") => service(&typed(value)?).map(Object::Service),
            ("v1", "Pod") => pod(&typed(value)?).map(Object::Pod),
            ("v1", "Node") => node(&typed(value)?).map(Object::Node),
            ("v1", "Namespace") => namespace(&typed(value)?).map(Object::Namespace),
            ("discovery.k8s.io/v1", "EndpointSlice") => {
                endpoint_slice(&typed(value)?).map(Object::EndpointSlice)
            }
            // The CRDs still serve v1beta1 HTTPRoutes (same schema), and `kubectl apply` takes
            // them: a folder may hold either.
            ("gateway.networking.k8s.io/v1" | "gateway.networking.k8s.io/v1beta1", "HTTPRoute") => {
                let route = typed(value.clone())
                    .map_err(|e| undecodable_route(RouteKind::Http, &value, e))?;
                http_route(&route, &value).map(Object::Route)
            }
            ("gateway.networking.k8s.io/v1", "GRPCRoute") => {
                let route = typed(value.clone())
                    .map_err(|e| undecodable_route(RouteKind::Grpc, &value, e))?;
                grpc_route(&route, &value).map(Object::Route)
            }
            // v1beta1 is what every release serves; v1 has the same fields.
            (
                "gateway.networking.k8s.io/v1beta1" | "gateway.networking.k8s.io/v1",
                "ReferenceGrant",
            ) => reference_grant(&typed(value)?).map(Object::ReferenceGrant),
            _ => Err(ObjectError::UnknownKind { api_version, kind }),
        }
    }
}

fn key(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Result<ObjectKey, ObjectError> {
    let name = meta
        .name
        .clone()
        .ok_or_else(|| invalid("metadata.name", "required"))?;
    Ok(ObjectKey::new(
        meta.namespace
            .clone()
            .unwrap_or_else(|| "default".to_string()),
        name,
    ))
}

/// An IP address as kube-proxy reads one (`netutils.ParseIPSloppy`): IPv4 octets with leading
/// zeros are decimal (`10.96.0.010` is 10.96.0.10). API servers took such addresses before
/// their strict validation, and clusters upgraded since still hold them: a ClusterIP refused
/// left the whole Service out of the table, its routes not accepted.
fn ip(text: &str, field: &str) -> Result<IpAddr, ObjectError> {
    let sloppy_v4 = || {
        let mut octets = [0u8; 4];
        let mut parts = text.split('.');
        for octet in &mut octets {
            let part = parts
                .next()
                .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))?;
            *octet = part.parse().ok()?;
        }
        parts.next().is_none().then_some(IpAddr::from(octets))
    };
    text.parse()
        .ok()
        .or_else(sloppy_v4)
        .ok_or_else(|| invalid(field, format!("`{text}` is not an IP address")))
}

fn port_number(p: i32, field: &str) -> Result<u16, ObjectError> {
    u16::try_from(p)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| invalid(field, format!("port {p} is not in 1-65535")))
}

/// The API's default `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours).
const DEFAULT_AFFINITY_SECONDS: i32 = 10_800;

pub fn service(svc: &core::Service) -> Result<Service, ObjectError> {
    let key = key(&svc.metadata)?;
    let spec = svc.spec.clone().unwrap_or_default();
    let ips: Vec<&String> = match &spec.cluster_ips {
        Some(list) if !list.is_empty() => list.iter().collect(),
        _ => spec.cluster_ip.iter().collect(),
    };
    let headless = ips.iter().any(|i| i.as_str() == "None");
    let kind = match spec.type_.as_deref() {
        Some("ExternalName") => ServiceKind::ExternalName,
        _ if headless => ServiceKind::Headless,
        Some("NodePort") => ServiceKind::NodePort,
        Some("LoadBalancer") => ServiceKind::LoadBalancer,
        None | Some("ClusterIP") => ServiceKind::ClusterIp,
        Some(other) => {
            return Err(invalid(
                "spec.type",
                format!("unknown Service type `{other}`"),
            ))
        }
    };
    let cluster_ips = if headless {
        Vec::new()
    } else {
        ips.iter()
            .filter(|i| !i.is_empty())
            .map(|i| ip(i, "spec.clusterIPs"))
            .collect::<Result<_, _>>()?
    };
    // Only TCP ports: the agent steers and serves TCP, and a UDP port may share its number
    // with a TCP one (DNS's 53) whose target port differs.
    let ports = spec
        .ports
        .iter()
        .flatten()
        .enumerate()
        .filter(|(_, p)| is_tcp(p.protocol.as_deref()))
        .map(|(i, p)| {
            let port = port_number(p.port, &format!("spec.ports[{i}].port"))?;
            let target_port = match &p.target_port {
                None => TargetPort::Number(port),
                Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n)) => {
                    TargetPort::Number(port_number(*n, &format!("spec.ports[{i}].targetPort"))?)
                }
                Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(s)) => {
                    TargetPort::Name(s.clone())
                }
            };
            Ok(ServicePort {
                name: p.name.clone().filter(|n| !n.is_empty()),
                port,
                target_port,
                app_protocol: p.app_protocol.as_deref().map(str::to_ascii_lowercase),
            })
        })
        .collect::<Result<_, ObjectError>>()?;
    let affinity = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        let seconds = spec
            .session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .filter(|s| *s > 0)
            .unwrap_or(DEFAULT_AFFINITY_SECONDS);
        std::time::Duration::from_secs(seconds as u64)
    });
    let primary_ipv4 = match spec.ip_families.iter().flatten().next().map(String::as_str) {
        Some("IPv4") => Some(true),
        Some("IPv6") => Some(false),
        _ => cluster_ips.first().map(IpAddr::is_ipv4),
    };
    Ok(Service {
        key,
        kind,
        primary_ipv4,
        cluster_ips: compact(cluster_ips),
        ports: compact(ports),
        internal_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
        affinity,
        proxied_by: svc
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(super::SERVICE_PROXY_NAME))
            .map(CompactString::from),
    })
}

/// A Pod, with the IPs it owns: none once it has finished (Succeeded or Failed: its IP may be
/// given to a new Pod while the old object lingers) and none for a hostNetwork Pod (its IP is the
/// node's, shared by every such Pod and by the node itself).
pub fn pod(pod: &core::Pod) -> Result<Pod, ObjectError> {
    let key = key(&pod.metadata)?;
    let status = pod.status.clone().unwrap_or_default();
    let finished = matches!(status.phase.as_deref(), Some("Succeeded" | "Failed"));
    let host_network = pod
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false);
    let mut ips: Vec<IpAddr> = Vec::new();
    for (i, p) in status.pod_ips.iter().flatten().enumerate() {
        ips.push(ip(&p.ip, &format!("status.podIPs[{i}].ip"))?);
    }
    if let Some(p) = status.pod_ip.as_deref().filter(|p| !p.is_empty()) {
        let p = ip(p, "status.podIP")?;
        if !ips.contains(&p) {
            ips.insert(0, p);
        }
    }
    if finished || host_network {
        ips.clear();
    }
    Ok(Pod {
        key,
        uid: kubelet_uid(&pod.metadata),
        ips,
        node_name: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
        // Not while it terminates: its IP is freed when its sandbox goes, and may be another
        // pod's, one that did not opt in, before the agent hears of either.
        local_sockets: match pod.metadata.deletion_timestamp {
            Some(_) => Some(false),
            None => local_sockets(&pod.metadata),
        },
    })
}

/// The UID the kubelet runs a pod under, which names its cgroup: its own, but for a static pod's
/// mirror (annotated `kubernetes.io/config.mirror`), whose API UID is not the one the kubelet
/// runs it under: its manifest's hash, `kubernetes.io/config.hash`.
fn kubelet_uid(
    metadata: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Option<String> {
    let annotations = metadata.annotations.as_ref();
    let mirrored = annotations.is_some_and(|a| a.contains_key("kubernetes.io/config.mirror"));
    let hash = annotations.and_then(|a| a.get("kubernetes.io/config.hash"));
    match hash {
        Some(hash) if mirrored => Some(hash.clone()),
        _ => metadata.uid.clone(),
    }
}

/// An object's [`LOCAL_SOCKETS_ANNOTATION`]: `Some(true)` for `"true"`, `Some(false)` for any other
/// value, `None` without it.
fn local_sockets(
    metadata: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Option<bool> {
    metadata
        .annotations
        .as_ref()?
        .get(super::LOCAL_SOCKETS_ANNOTATION)
        .map(|v| v == "true")
}

pub fn namespace(namespace: &core::Namespace) -> Result<Namespace, ObjectError> {
    Ok(Namespace {
        name: key(&namespace.metadata)?.name,
        local_sockets: local_sockets(&namespace.metadata) == Some(true),
    })
}

pub fn reference_grant(
    grant: &gateway_api::referencegrants::ReferenceGrant,
) -> Result<ReferenceGrant, ObjectError> {
    Ok(ReferenceGrant {
        key: key(&grant.metadata)?,
        from: grant
            .spec
            .from
            .iter()
            .map(|f| GrantFrom {
                group: f.group.clone(),
                kind: f.kind.clone(),
                namespace: f.namespace.clone(),
            })
            .collect(),
        to: grant
            .spec
            .to
            .iter()
            .map(|t| GrantTo {
                group: t.group.clone(),
                kind: t.kind.clone(),
                name: t.name.clone().filter(|n| !n.is_empty()),
            })
            .collect(),
    })
}

pub fn node(node: &core::Node) -> Result<Node, ObjectError> {
    Ok(Node {
        name: key(&node.metadata)?.name.into(),
        zone: node
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("topology.kubernetes.io/zone"))
            .cloned(),
    })
}

pub fn endpoint_slice(slice: &discovery::EndpointSlice) -> Result<EndpointSlice, ObjectError> {
    let key = key(&slice.metadata)?;
    let service_name = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("kubernetes.io/service-name"))
        .ok_or_else(|| {
            invalid(
                "metadata.labels",
                "label `kubernetes.io/service-name` is required to know the Service",
            )
        })?;
    let ports = slice
        .ports
        .iter()
        .flatten()
        .enumerate()
        .filter(|(_, p)| is_tcp(p.protocol.as_deref()))
        // The API server does not check a slice's port numbers; kube-proxy skips a port it
        // cannot use and serves the others, and so does the agent (a whole slice refused would
        // keep its last good version, endpoints since removed included).
        .filter_map(|(_, p)| {
            let port = port_number(p.port?, "").ok()?;
            Some(EndpointPort {
                name: p.name.clone().unwrap_or_default(),
                port,
            })
        })
        .collect();
    // kube-proxy serves IPv4 and IPv6 slices only: an FQDN slice's `10.0.0.5` (a valid name)
    // is no endpoint there, nor here. Nor one labelled for another proxy (a hand-made slice of
    // a Service without a selector): kube-proxy's watch leaves it out by that label. Such a
    // slice is kept with no endpoints, so that one given the label loses those it had.
    let addressed_by_ip = matches!(slice.address_type.as_str(), "IPv4" | "IPv6");
    let for_another_proxy = slice
        .metadata
        .labels
        .as_ref()
        .is_some_and(|l| l.contains_key(super::SERVICE_PROXY_NAME));
    let endpoints = slice
        .endpoints
        .iter()
        .flatten()
        .filter(|_| addressed_by_ip && !for_another_proxy)
        .filter_map(|e| {
            let c = e.conditions.clone().unwrap_or_default();
            // Defaults from the API (and kube-proxy's reading): nil `ready` and nil `serving`
            // mean true.
            let ready = c.ready.unwrap_or(true);
            // Only the first address is ever dialled (`routes::backends`), read as kube-proxy
            // reads it (`10.001.0.5`, which older API servers took, is 10.1.0.5); one that does
            // not parse drops that endpoint, not the slice.
            let first = ip(e.addresses.first()?, "endpoints").ok()?;
            Some(Endpoint {
                addresses: Box::new([first]),
                ready,
                serving: c.serving.unwrap_or(true),
                terminating: c.terminating.unwrap_or(false),
                node_name: e.node_name.as_deref().map(Into::into),
                pod: e
                    .target_ref
                    .as_ref()
                    .filter(|r| r.kind.as_deref() == Some("Pod"))
                    .and_then(|r| r.name.as_deref().map(Into::into)),
                for_zones: e
                    .hints
                    .iter()
                    .flat_map(|h| h.for_zones.iter().flatten())
                    .map(|z| z.name.clone())
                    .collect(),
                for_nodes: e
                    .hints
                    .iter()
                    .flat_map(|h| h.for_nodes.iter().flatten())
                    .map(|n| n.name.clone())
                    .collect(),
            })
        })
        .collect::<Vec<_>>();
    Ok(EndpointSlice {
        key: key.clone(),
        service: ObjectKey::new(key.namespace, service_name),
        ports: compact(ports),
        endpoints: compact(endpoints),
    })
}

/// A Service or EndpointSlice port's protocol: TCP when unset (the API's default).
fn is_tcp(protocol: Option<&str>) -> bool {
    protocol.is_none_or(|p| p == "TCP")
}

/// A list built from an iterator of results (which grows by doubling: five endpoints take room
/// for eight) without its spare room: objects are kept for long.
fn compact<T>(mut list: Vec<T>) -> Vec<T> {
    list.shrink_to_fit();
    list
}
