//! The objects the agent keeps: a narrow, owned view of the Kubernetes and Gateway API objects,
//! converted once (with the CRD defaults applied and the schema's refusals enforced) so that the
//! route engine never sees a raw API type.

mod convert;
mod one_or_many;
pub mod path;
mod route;
mod session;

pub use convert::{Object, ObjectError};
pub use one_or_many::OneOrMany;
pub use route::*;
pub use session::{SessionCarrier, SessionPersistence};

use compact_str::CompactString;
use serde::Serialize;
use std::fmt;
use std::net::IpAddr;

/// `namespace/name` of a namespaced object. Kept inline (names of up to 24 bytes need no heap):
/// keys are copied into every index and table that refers to an object.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ObjectKey {
    pub namespace: CompactString,
    pub name: CompactString,
}

impl ObjectKey {
    pub fn new(namespace: impl Into<CompactString>, name: impl Into<CompactString>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What the engine needs of a Service.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Service {
    pub key: ObjectKey,
    pub kind: ServiceKind,
    /// ClusterIPs (dual stack: one per family). Empty for headless and ExternalName Services.
    pub cluster_ips: Vec<IpAddr>,
    /// Whether its first address family (`spec.ipFamilies`, its first ClusterIP's) is IPv4: the
    /// family of the endpoints it is served by (a headless one's too, which has no ClusterIP);
    /// `None` when unknown.
    pub primary_ipv4: Option<bool>,
    pub ports: Vec<ServicePort>,
    /// `internalTrafficPolicy: Local`: pods reach only the endpoints on their own node.
    pub internal_local: bool,
    /// `sessionAffinity: ClientIP`: a caller keeps its endpoint while it calls again within this
    /// time (`sessionAffinityConfig.clientIP.timeoutSeconds`, default 3 h).
    pub affinity: Option<std::time::Duration>,
    /// The proxy its label `service.kubernetes.io/service-proxy-name` hands it to (a secondary
    /// network's, say): kube-proxy leaves such a Service alone, and so does the mesh.
    pub proxied_by: Option<CompactString>,
}

/// The label that hands a Service to another proxy than kube-proxy (and the mesh).
pub const SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum ServiceKind {
    ClusterIp,
    Headless,
    ExternalName,
    NodePort,
    LoadBalancer,
}

impl Service {
    /// GEP-1294: headless and ExternalName Services are neither parents nor backends.
    pub fn has_frontend(&self) -> bool {
        self.routable() && !self.cluster_ips.is_empty()
    }

    /// Whether the mesh may route to this Service at all: not headless nor ExternalName
    /// (GEP-1294), nor another proxy's.
    pub fn routable(&self) -> bool {
        !matches!(self.kind, ServiceKind::Headless | ServiceKind::ExternalName)
            && self.proxied_by.is_none()
    }

    pub fn port(&self, port: u16) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.port == port)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: u16,
    pub target_port: TargetPort,
    /// Lowercase: the API server keeps it as written, and the names it holds (IANA service names,
    /// KEP-3726's `kubernetes.io/…`) are case-insensitive.
    pub app_protocol: Option<String>,
}

/// What a Service port says it speaks, so that its connections are not sniffed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum DeclaredProtocol {
    /// HTTP/1.1 or HTTP/2 (told apart by the first bytes, however late they come).
    Http,
    /// Opaque TCP: passed through at once (server-first protocols need this).
    Opaque,
}

/// Protocols that are not HTTP, as appProtocol (IANA service names) or a port name's family
/// says them: passed through opaque.
const NOT_HTTP: &[&str] = &[
    "mysql",
    "postgresql",
    "postgres",
    "redis",
    "mongo",
    "mongodb",
    "memcache",
    "smtp",
    "submission",
    "imap",
    "pop3",
    "ftp",
    "ssh",
    "amqp",
    "mqtt",
    "kafka",
    "zookeeper",
    "ldap",
    "nats",
    "tls",
    "https",
];

/// Service ports passed through opaque when nothing declares them: Linkerd's default opaque
/// ports (SMTP, submission, MySQL, Galera, PostgreSQL, Redis, Elasticsearch transport,
/// memcached).
const OPAQUE_PORTS: &[u16] = &[25, 587, 3306, 4444, 5432, 6379, 9300, 11211];

impl ServicePort {
    /// The port's declared protocol: its appProtocol (KEP-3726: `http`, `kubernetes.io/h2c`,
    /// `kubernetes.io/ws`, and the common `h2c`, `grpc`, `http2`; `tcp` or a known protocol that
    /// is not HTTP for opaque), else its name as meshes read it (`http`, `http-*`, `http2`, `h2c`,
    /// `grpc`, `grpc-*`; `tcp`, `tcp-*` and the known others), else its number: the ports Linkerd
    /// treats as opaque by default, where servers speak first (SMTP, MySQL) or detection has
    /// nothing to gain. `None`: undeclared, sniffed. Sniffing a server-first protocol waits for
    /// the client's first bytes until the detection timeout (10 s) on every connection.
    pub fn declared_protocol(&self) -> Option<DeclaredProtocol> {
        self.stated_protocol().or_else(|| {
            OPAQUE_PORTS
                .contains(&self.port)
                .then_some(DeclaredProtocol::Opaque)
        })
    }

    /// The protocol the port's appProtocol or name states (not its number); `None`: neither
    /// says. A route that names the port (parentRef `port` or `sectionName`) overrides a
    /// protocol presumed from the number alone, never a stated one.
    pub fn stated_protocol(&self) -> Option<DeclaredProtocol> {
        if let Some(app_protocol) = self.app_protocol.as_deref() {
            return match app_protocol {
                "http" | "kubernetes.io/h2c" | "kubernetes.io/ws" | "h2c" | "grpc" | "http2"
                | "grpc-web" => Some(DeclaredProtocol::Http),
                // WebSocket over TLS (KEP-3726): encrypted, as `https` is.
                "tcp" | "kubernetes.io/tcp" | "kubernetes.io/wss" => Some(DeclaredProtocol::Opaque),
                known if NOT_HTTP.contains(&known) => Some(DeclaredProtocol::Opaque),
                _ => None,
            };
        }
        match self.name_family()? {
            "http" | "grpc" => Some(DeclaredProtocol::Http),
            "tcp" => Some(DeclaredProtocol::Opaque),
            _ if matches!(self.name.as_deref(), Some("http2" | "h2c")) => {
                Some(DeclaredProtocol::Http)
            }
            known if NOT_HTTP.contains(&known) => Some(DeclaredProtocol::Opaque),
            _ => None,
        }
    }

    /// Whether routes apply to the port: not when its appProtocol or name states opaque TCP,
    /// which the agent passes through unparsed.
    pub fn takes_routes(&self) -> bool {
        self.stated_protocol() != Some(DeclaredProtocol::Opaque)
    }

    /// The protocol family its name says, as meshes read port names: the part before the first
    /// `-` (`http-admin`: `http`).
    pub fn name_family(&self) -> Option<&str> {
        let name = self.name.as_deref()?;
        Some(name.split_once('-').map_or(name, |(family, _)| family))
    }

    /// Whether the port's name says gRPC-Web (`grpc-web`, `grpc-web-*`), whose family reads as
    /// `grpc`.
    fn is_grpc_web(&self) -> bool {
        self.name
            .as_deref()
            .and_then(|name| name.strip_prefix("grpc-web"))
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('-'))
    }

    /// Which HTTP version upstream connections to this port speak, by its appProtocol (KEP-3726)
    /// or else its name, as meshes read them.
    pub fn upstream_protocol(&self) -> UpstreamProtocol {
        match self.app_protocol.as_deref() {
            Some("kubernetes.io/h2c" | "h2c" | "grpc" | "http2") => UpstreamProtocol::Http2,
            Some("http" | "kubernetes.io/ws") => UpstreamProtocol::Http1,
            Some(_) => UpstreamProtocol::AsCaller,
            // gRPC-Web is gRPC for browsers, over HTTP/1.1 as often as HTTP/2: not prior knowledge.
            None if self.is_grpc_web() => UpstreamProtocol::AsCaller,
            None => match self.name_family().unwrap_or_default() {
                "grpc" | "http2" | "h2c" => UpstreamProtocol::Http2,
                "http" => UpstreamProtocol::Http1,
                _ => UpstreamProtocol::AsCaller,
            },
        }
    }
}

/// The HTTP version the agent speaks to a backend port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum UpstreamProtocol {
    /// The port says HTTP/1.1: appProtocol `http` or `kubernetes.io/ws`, name `http` or `http-*`.
    Http1,
    /// The port says HTTP/2 without TLS: appProtocol `kubernetes.io/h2c`, `h2c`, `grpc` or
    /// `http2`, name `grpc`, `grpc-*`, `http2` or `h2c`; and every GRPCRoute backend.
    Http2,
    /// The port says neither: the version the caller spoke.
    AsCaller,
}

impl UpstreamProtocol {
    /// Whether a request whose caller spoke HTTP/2 (`caller_h2`) goes upstream over HTTP/2.
    pub fn is_h2(self, caller_h2: bool) -> bool {
        match self {
            UpstreamProtocol::Http1 => false,
            UpstreamProtocol::Http2 => true,
            UpstreamProtocol::AsCaller => caller_h2,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

/// An EndpointSlice: the endpoints of one Service, with ports named like the Service's ports.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EndpointSlice {
    pub key: ObjectKey,
    /// The Service this slice belongs to (label `kubernetes.io/service-name`).
    pub service: ObjectKey,
    pub ports: Vec<EndpointPort>,
    pub endpoints: Vec<Endpoint>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EndpointPort {
    /// The Service port's name ("" when the Service port is unnamed).
    pub name: String,
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Endpoint {
    pub addresses: Box<[IpAddr]>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node_name: Option<CompactString>,
    /// The Pod behind the endpoint, when the slice names it.
    pub pod: Option<CompactString>,
    /// Topology hints set by the EndpointSlice controller (`trafficDistribution`): the zones and
    /// the nodes whose callers should prefer this endpoint.
    pub for_zones: Box<[String]>,
    pub for_nodes: Box<[String]>,
}

/// The node this agent runs on, as the Node object says (its zone label).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Node {
    pub name: String,
    /// Label `topology.kubernetes.io/zone`.
    pub zone: Option<String>,
}

/// What the engine needs of a Pod: who a caller is.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Pod {
    pub key: ObjectKey,
    /// The UID the kubelet runs it under (its cgroup's name): the API's, or for a static pod's
    /// mirror its manifest hash.
    pub uid: Option<String>,
    pub ips: Vec<IpAddr>,
    pub node_name: Option<String>,
    /// Its own [`LOCAL_SOCKETS_ANNOTATION`]: `"true"` in, any other value out; `None` (not
    /// annotated): as its Namespace says ([`Namespace::local_sockets`]).
    pub local_sockets: Option<bool>,
}

/// What the engine needs of a Namespace: whether its pods opt in to local sockets by default.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Namespace {
    pub name: CompactString,
    /// Annotated [`LOCAL_SOCKETS_ANNOTATION`]` = "true"`: its pods that do not say otherwise are
    /// in.
    pub local_sockets: bool,
}

/// The annotation by which a Pod, or a Namespace for its pods, says it may be sent bytes socket to
/// socket on its node (the agent's `--local-sockets`), value `"true"`: it reads its connections
/// with read(2) or recv(2), not splice(2), and keeps up with what it is sent (such bytes have no
/// TCP flow control). A Pod's own annotation, whatever its value, wins over its Namespace's.
pub const LOCAL_SOCKETS_ANNOTATION: &str = "gamma-node.io/local-sockets";

/// A ReferenceGrant: which kinds in which namespaces may refer to objects of its own namespace
/// (GEP-709). The mesh needs one for a backendRef into a namespace that is neither the route's
/// nor its parent Service's (GEP-1294: the node agent must not widen what a pod can reach).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ReferenceGrant {
    pub key: ObjectKey,
    pub from: Vec<GrantFrom>,
    pub to: Vec<GrantTo>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GrantFrom {
    pub group: String,
    pub kind: String,
    pub namespace: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GrantTo {
    pub group: String,
    pub kind: String,
    /// `None`: every object of the kind in the grant's namespace.
    pub name: Option<String>,
}

impl ReferenceGrant {
    /// Whether a route of `kind` in `namespace` may send to Service `service` of this grant's
    /// namespace.
    pub fn permits(&self, kind: route::RouteKind, namespace: &str, service: &ObjectKey) -> bool {
        service.namespace == self.key.namespace
            && self.from.iter().any(|f| {
                f.group == route::GATEWAY_GROUP
                    && f.kind == kind.as_str()
                    && f.namespace == namespace
            })
            && self.to.iter().any(|t| {
                t.group.is_empty()
                    && t.kind == "Service"
                    && t.name.as_ref().is_none_or(|n| *n == service.name)
            })
    }
}

/// A route's metadata the engine uses for precedence and status (its namespace and name are in
/// its key, `Route::id`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Meta {
    /// `metadata.uid`: tells a route deleted and created again under its name from the old one.
    pub uid: Option<Box<str>>,
    pub generation: i64,
    /// Creation time, in seconds since the Unix epoch (the API server's resolution). Absent
    /// sorts last.
    pub created: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(name: Option<&str>, app_protocol: Option<&str>) -> ServicePort {
        ServicePort {
            name: name.map(Into::into),
            port: 80,
            target_port: TargetPort::Number(8080),
            app_protocol: app_protocol.map(Into::into),
        }
    }

    #[test]
    fn declared_protocols_from_app_protocol_then_name() {
        use DeclaredProtocol::{Http, Opaque};
        for (name, app_protocol, declared) in [
            (None, Some("http"), Some(Http)),
            (None, Some("kubernetes.io/h2c"), Some(Http)),
            (None, Some("kubernetes.io/ws"), Some(Http)),
            (Some("http"), Some("tcp"), Some(Opaque)),
            (Some("http"), Some("example.com/custom"), None),
            (Some("http"), None, Some(Http)),
            (Some("http-api"), None, Some(Http)),
            (Some("grpc-web"), None, Some(Http)),
            (Some("h2c"), None, Some(Http)),
            (Some("tcp-db"), None, Some(Opaque)),
            (Some("httpx"), None, None),
            (Some("metrics"), None, None),
            (None, None, None),
            (None, Some("mysql"), Some(Opaque)),
            (Some("http"), Some("postgresql"), Some(Opaque)),
            (Some("mysql"), None, Some(Opaque)),
            (Some("redis-cache"), None, Some(Opaque)),
            (Some("https"), None, Some(Opaque)),
            (None, Some("kubernetes.io/wss"), Some(Opaque)),
            (None, Some("grpc-web"), Some(Http)),
            (Some("grpc-web"), None, Some(Http)),
        ] {
            assert_eq!(
                port(name, app_protocol).declared_protocol(),
                declared,
                "{name:?} {app_protocol:?}"
            );
        }
    }
    #[test]
    fn server_first_ports_are_opaque_unless_declared() {
        let numbered = |number: u16, name: Option<&str>, app_protocol: Option<&str>| ServicePort {
            port: number,
            ..port(name, app_protocol)
        };
        assert_eq!(
            numbered(3306, None, None).declared_protocol(),
            Some(DeclaredProtocol::Opaque)
        );
        assert_eq!(
            numbered(25, Some("smtp-relay"), None).declared_protocol(),
            Some(DeclaredProtocol::Opaque)
        );
        assert_eq!(
            numbered(3306, Some("http"), None).declared_protocol(),
            Some(DeclaredProtocol::Http),
            "what the port declares wins"
        );
        assert_eq!(numbered(8080, None, None).declared_protocol(), None);
    }

    #[test]
    fn upstream_protocol_from_app_protocol_then_name() {
        use UpstreamProtocol::{AsCaller, Http1, Http2};
        for (name, app_protocol, protocol) in [
            (None, Some("kubernetes.io/h2c"), Http2),
            (Some("http"), Some("grpc"), Http2),
            (None, Some("http"), Http1),
            (Some("grpc"), Some("kubernetes.io/ws"), Http1),
            (Some("grpc"), Some("example.com/custom"), AsCaller),
            (Some("grpc-api"), None, Http2),
            (Some("http2"), None, Http2),
            (Some("http-web"), None, Http1),
            (Some("web"), None, AsCaller),
            (Some("grpc-web"), None, AsCaller),
            (Some("grpc-web-ui"), None, AsCaller),
            (Some("grpc-webhooks"), None, Http2),
            (None, Some("grpc-web"), AsCaller),
            (None, None, AsCaller),
        ] {
            assert_eq!(
                port(name, app_protocol).upstream_protocol(),
                protocol,
                "{name:?} {app_protocol:?}"
            );
        }
        assert!(AsCaller.is_h2(true) && !AsCaller.is_h2(false));
        assert!(Http2.is_h2(false) && !Http1.is_h2(true));
    }
}
