//! The route engine: GAMMA semantics compiled into an immutable table, and the pure lookup that
//! decides what happens to a request. No sockets, no clocks, no Kubernetes client.

pub mod attached;
pub mod backends;
mod compile;
pub mod cors;
pub mod filters;
pub mod matches;
pub mod precedence;
pub mod session;
pub mod status;

pub use attached::Attached;
pub use backends::{Backend, BackendError};
pub use compile::compile_service;
pub use matches::RequestHead;

use crate::model::{
    DeclaredProtocol, EndpointSlice, Filter, HeaderModifier, Node, ObjectKey, PathMatch, Retry,
    Route, RouteKey, RouteKind, RouteMatch, Rule, Service, SessionPersistence, Timeouts,
    UpstreamProtocol,
};
use ahash::AHashMap;
use compact_str::CompactString;
use cors::CorsOutcome;
use http::{HeaderMap, StatusCode};
use serde::Serialize;
use smallvec::SmallVec;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use triomphe::ThinArc;

/// Read access to the objects the engine compiles from (implemented by the index).
pub trait World {
    fn service(&self, key: &ObjectKey) -> Option<&Service>;
    fn slices(&self, service: &ObjectKey) -> Vec<&EndpointSlice>;
    /// Routes with a parentRef naming this Service.
    fn routes_on(&self, service: &ObjectKey) -> Vec<&Arc<Route>>;
    /// Whether a ReferenceGrant in `service`'s namespace lets routes of `kind` in `namespace`
    /// send to it.
    fn permits(&self, kind: RouteKind, namespace: &str, service: &ObjectKey) -> bool;
    /// The node this agent serves, once known (for internalTrafficPolicy and topology hints).
    fn node(&self) -> Option<&Node>;
}

/// Each Service's frontends (one per port).
pub type FrontendsByService = AHashMap<Arc<ObjectKey>, Arc<[Arc<Frontend>]>>;

/// The whole table at one instant. Immutable; published by swapping an `Arc`.
#[derive(Debug, Default, Serialize)]
pub struct Snapshot {
    /// Increases by one with every publish.
    pub version: u64,
    /// By Service and port (explicit listeners name a Service port). The maps are shared with
    /// the index until its next change (one copy of each at rest, not two).
    #[serde(skip)]
    pub by_service: Arc<FrontendsByService>,
    /// By ClusterIP and port: where redirected connections were going.
    #[serde(skip)]
    pub by_address: Arc<AHashMap<SocketAddr, Arc<Frontend>>>,
    /// The Pods that call: a caller's identity and namespace.
    #[serde(skip)]
    pub callers: Arc<Callers>,
    /// Route status, per route and parentRef.
    #[serde(serialize_with = "statuses_by_name")]
    pub statuses: Arc<Statuses>,
}

/// Route status by route (keyed by the index's own copy of each route's key).
pub type Statuses = BTreeMap<Arc<RouteKey>, Arc<[status::ParentStatus]>>;

/// Keyed by `HTTPRoute namespace/name`.
fn statuses_by_name<S: serde::Serializer>(
    statuses: &Arc<Statuses>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_map(
        statuses
            .iter()
            .map(|(key, status)| (key.to_string(), status)),
    )
}

/// The Pods that may call (this node's, when the agent knows its node), by IP and by UID.
#[derive(Debug, Default, PartialEq)]
pub struct Callers {
    /// Pod IP → the Pod. An IP two Pods claim names neither.
    pub by_ip: AHashMap<IpAddr, Arc<Caller>>,
    /// The UID the kubelet runs a Pod under (its cgroup's name) → the Pod, whatever its IPs: one
    /// whose IP has not reached the agent yet (it has just started), a hostNetwork one (whose IP
    /// is the node's).
    pub by_uid: AHashMap<String, Arc<Caller>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Caller {
    pub pod: ObjectKey,
    pub uid: Option<String>,
    /// The pod opted in to local sockets (`model::LOCAL_SOCKETS_ANNOTATION`: its own, else its
    /// Namespace's).
    pub local_sockets: bool,
}

impl Snapshot {
    pub fn frontend_at(&self, addr: SocketAddr) -> Option<&Arc<Frontend>> {
        self.by_address.get(&addr)
    }

    pub fn frontend_of(&self, service: &ObjectKey, port: u16) -> Option<&Arc<Frontend>> {
        self.by_service
            .get(service)?
            .iter()
            .find(|f| f.port == port)
    }

    pub fn caller(&self, ip: IpAddr) -> Option<&Arc<Caller>> {
        self.callers.by_ip.get(&ip)
    }

    /// The Pod the kubelet runs under `uid` (its cgroup's name).
    pub fn caller_by_uid(&self, uid: &str) -> Option<&Arc<Caller>> {
        self.callers.by_uid.get(uid)
    }

    /// The status of the route named `HTTPRoute namespace/name` (or `GRPCRoute …`).
    pub fn status_of(&self, route: &str) -> Option<&[status::ParentStatus]> {
        let key = RouteKey::parse(route)?;
        self.statuses.get(&key).map(|s| &s[..])
    }

    /// Frontends the kernel should steer to the agent: those with at least one route, each with
    /// whether its clients speak first ([`Frontend::client_speaks_first`]). A Service without
    /// routes behaves as without a mesh, so its traffic is left to kube-proxy.
    pub fn mesh_addresses(&self) -> impl Iterator<Item = (SocketAddr, bool)> + '_ {
        self.by_address
            .iter()
            .filter(|(_, f)| f.has_routes())
            .map(|(a, f)| (*a, f.client_speaks_first()))
    }

    /// Every endpoint some request may be sent to (Services' own, rules' backends, mirrors'):
    /// state kept per endpoint for others can go.
    pub fn endpoints(&self) -> ahash::AHashSet<SocketAddr> {
        self.backends()
            .flat_map(|b| b.endpoints.iter().copied())
            .collect()
    }

    /// Every backend some request may be sent to (Services' own, rules' backends, mirrors'),
    /// once per place that names it.
    pub fn backends(&self) -> impl Iterator<Item = &Backend> + '_ {
        self.by_service
            .values()
            .flat_map(|f| f.iter())
            .flat_map(|frontend| {
                let tables = frontend.producer.iter().chain(frontend.consumers.values());
                let routed = tables.flat_map(|t| t.rules.iter()).flat_map(|rule| {
                    let mirrors = rule.mirrors().into_iter().flat_map(|m| {
                        m.rule
                            .iter()
                            .chain(m.backends.iter().flat_map(|b| b.iter()))
                    });
                    let backends = rule.backends.iter().filter_map(|b| b.backend.as_ref());
                    backends.chain(mirrors.flatten()).map(|b| &**b)
                });
                std::iter::once(&*frontend.direct).chain(routed)
            })
    }

    /// Everything, for `/config_dump`.
    pub fn dump(&self) -> serde_json::Value {
        let mut frontends: Vec<&Arc<Frontend>> =
            self.by_service.values().flat_map(|f| f.iter()).collect();
        frontends.sort_by(|a, b| (&a.service, a.port).cmp(&(&b.service, b.port)));
        let callers: BTreeMap<String, &Caller> = self
            .callers
            .by_ip
            .iter()
            .map(|(ip, c)| (ip.to_string(), &**c))
            .collect();
        serde_json::json!({
            "version": self.version,
            "frontends": frontends,
            "callers": callers,
            "statuses": statuses_by_name(&self.statuses, serde_json::value::Serializer)
                .expect("statuses serialize"),
        })
    }
}

/// A Service port as callers see it, with the routes that apply to each caller group.
///
/// In declaration order (`repr(C)`), what a lookup reads first: the consumer tables, then the
/// producer table (about one cache line), so that a lookup in a table too large for the caches
/// waits for one line of the frontend, not for several.
#[derive(Debug, PartialEq, Serialize)]
#[repr(C)]
pub struct Frontend {
    /// Consumer routes by the callers' namespace.
    pub consumers: ConsumerTables,
    /// Producer routes (the Service's namespace): for every caller without consumer routes.
    pub producer: Option<RouteTable>,
    pub service: ObjectKey,
    pub port: u16,
    /// What the port declares it speaks (`None`: its connections are sniffed).
    pub declared: Option<DeclaredProtocol>,
    pub port_name: Option<String>,
    pub addresses: Vec<SocketAddr>,
    /// The Service's own endpoints: where traffic goes when no route applies to the caller.
    pub direct: Arc<Backend>,
    /// The data plane's state for requests sent to `direct`.
    #[serde(skip)]
    pub direct_series: Attached,
    /// The data plane's state for requests answered before a rule was chosen (none matched).
    #[serde(skip)]
    pub series: Attached,
}

impl Frontend {
    pub fn has_routes(&self) -> bool {
        self.producer.is_some() || !self.consumers.is_empty()
    }

    /// Whether every client of the port sends before it reads: the port declares HTTP (an HTTP
    /// request, an HTTP/2 preface, a WebSocket's upgrade request come first), whoever calls.
    /// Its connections may then wait in the kernel until their first bytes come; those of any
    /// other port may be of a protocol where the server speaks first.
    pub fn client_speaks_first(&self) -> bool {
        self.declared == Some(DeclaredProtocol::Http)
    }

    /// How a caller of `namespace`'s connections are told apart: as the port declares
    /// ([`Frontend::declared`]), except that a port presumed opaque by its number alone is
    /// sniffed for callers whose consumer routes name it. Their routes say it carries HTTP for
    /// them; the Service's other callers, of a server-first protocol perhaps, do not wait for
    /// the detection timeout. On a port not declared HTTP, a known caller no route applies to
    /// (the port has another namespace's consumer routes only) is passed through as kube-proxy
    /// would, not sniffed: a server-first protocol's clients would wait out the detection. On a
    /// port declared HTTP its connections are parsed, for a route that comes later to apply to
    /// their next request (a gRPC channel is open for hours). An unknown caller is told apart as
    /// the port says, since its Pod, once known, may have routes here; so is every caller of a
    /// port without routes (only an explicit listener brings them, served as the port declares).
    pub fn protocol_for(&self, namespace: Option<&str>) -> Option<DeclaredProtocol> {
        if self.declared != Some(DeclaredProtocol::Http)
            && namespace.is_some()
            && self.has_routes()
            && self.table_for(namespace).is_none()
        {
            return Some(DeclaredProtocol::Opaque);
        }
        match (self.declared, namespace) {
            // Routes attach to no port stated opaque: a consumer table makes it presumed.
            (Some(DeclaredProtocol::Opaque), Some(ns)) if !self.consumers.is_empty() => {
                match self.consumers.get(ns) {
                    Some(table) if table.names_port() => None,
                    _ => self.declared,
                }
            }
            (declared, _) => declared,
        }
    }

    /// The routes that apply to a caller of `namespace` (unknown caller: the producer routes).
    pub fn table_for(&self, namespace: Option<&str>) -> Option<&RouteTable> {
        // Most frontends have no consumer routes: skip the map (and its string compares).
        let consumer = match namespace {
            Some(ns) if !self.consumers.is_empty() => self.consumers.get(ns),
            _ => None,
        };
        consumer.or(self.producer.as_ref())
    }

    pub fn lookup(&self, namespace: Option<&str>, request: &RequestHead<'_>) -> Decision<'_> {
        match self.table_for(namespace) {
            None => Decision::Direct(&self.direct),
            Some(table) => {
                table
                    .lookup(request)
                    .map_or(Decision::NoMatchingRule, |(rule, matched)| Decision::Rule {
                        rule,
                        matched,
                    })
            }
        }
    }
}

/// Consumer route tables by the callers' namespace: a few per Service at most, so a sorted list
/// (namespaces inline, compared without a pointer to chase) rather than a map whose smallest
/// node holds room for eleven. The first is kept in the frontend itself: most Services have one
/// consumer namespace at most, and a lookup then reads no other block.
#[derive(Debug, Default, PartialEq)]
pub struct ConsumerTables {
    first: Option<(CompactString, RouteTable)>,
    rest: Box<[(CompactString, RouteTable)]>,
}

impl ConsumerTables {
    fn iter(&self) -> impl Iterator<Item = &(CompactString, RouteTable)> {
        self.first.iter().chain(self.rest.iter())
    }

    pub fn get(&self, namespace: &str) -> Option<&RouteTable> {
        self.iter()
            .find(|(ns, _)| ns == namespace)
            .map(|(_, table)| table)
    }

    pub fn is_empty(&self) -> bool {
        self.first.is_none()
    }

    pub fn keys(&self) -> impl Iterator<Item = &CompactString> {
        self.iter().map(|(ns, _)| ns)
    }

    pub fn values(&self) -> impl Iterator<Item = &RouteTable> {
        self.iter().map(|(_, table)| table)
    }
}

impl FromIterator<(CompactString, RouteTable)> for ConsumerTables {
    fn from_iter<I: IntoIterator<Item = (CompactString, RouteTable)>>(tables: I) -> Self {
        let mut tables: Vec<_> = tables.into_iter().collect();
        tables.sort_by(|a, b| a.0.cmp(&b.0));
        let mut tables = tables.into_iter();
        ConsumerTables {
            first: tables.next(),
            rest: tables.collect(),
        }
    }
}

/// As a map from namespace to table (`/config_dump`).
impl Serialize for ConsumerTables {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter().map(|(ns, table)| (ns.as_str(), table)))
    }
}

/// All routes of one kind that apply to one caller group: one entry per match, sorted by
/// precedence, and the rules they compile to, each once, in a block of their own. Three words:
/// a frontend holds two tables, read first by every lookup, in one cache line with the rest.
#[derive(Debug, PartialEq)]
pub struct RouteTable {
    /// What is said of the routes as a whole, then the entries (one thin pointer: the length is
    /// in the block).
    entries: ThinArc<TableHead, TableEntry>,
    rules: Box<[CompiledRule]>,
}

#[derive(Debug, PartialEq)]
struct TableHead {
    kind: RouteKind,
    /// Whether a route of the table names the port (see [`Frontend::protocol_for`]).
    names_port: bool,
}

/// One match of a rule. A lookup scans the entries in order: each carries its match (a copy of
/// the model's: the path inline, the other conditions behind a shared thin pointer), so that
/// entries are decided without leaving the table's block, and the other conditions are read
/// only when the path holds and there are some.
#[derive(Debug, PartialEq)]
struct TableEntry {
    route_match: RouteMatch,
    /// The rule's place among the table's `rules`.
    rule: u32,
}

impl RouteTable {
    /// `entries`: each match and the index of its rule in `rules`, in precedence order.
    pub fn new(
        kind: RouteKind,
        names_port: bool,
        entries: impl IntoIterator<Item = (RouteMatch, usize)>,
        rules: Vec<CompiledRule>,
    ) -> Self {
        let entries: Vec<TableEntry> = entries
            .into_iter()
            .map(|(route_match, rule)| {
                assert!(
                    rule < rules.len(),
                    "an entry names one of the table's rules"
                );
                let rule = u32::try_from(rule).expect("a table holds fewer than 2^32 rules");
                TableEntry { route_match, rule }
            })
            .collect();
        RouteTable {
            entries: ThinArc::from_header_and_iter(
                TableHead { kind, names_port },
                entries.into_iter(),
            ),
            rules: rules.into_boxed_slice(),
        }
    }

    pub fn kind(&self) -> RouteKind {
        self.entries.header.header.kind
    }

    /// Whether a route of the table names the port it is for (parentRef `port` or
    /// `sectionName`, or a parentRef to a Service whose only port it is).
    pub fn names_port(&self) -> bool {
        self.entries.header.header.names_port
    }

    /// Each match in precedence order, with its rule.
    pub fn entries(&self) -> impl Iterator<Item = (&RouteMatch, &CompiledRule)> {
        self.entries
            .slice
            .iter()
            .map(|e| (&e.route_match, &self.rules[e.rule as usize]))
    }

    /// The compiled rules, each once.
    pub fn rules(&self) -> &[CompiledRule] {
        &self.rules
    }

    /// The first entry in precedence order whose match holds.
    pub fn lookup(&self, request: &RequestHead<'_>) -> Option<(&CompiledRule, &RouteMatch)> {
        self.entries()
            .find(|(route_match, _)| route_match.matches(request))
            .map(|(route_match, rule)| (rule, route_match))
    }
}

/// Its kind and entries, each with its match and its rule.
impl Serialize for RouteTable {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        #[derive(Serialize)]
        struct Entry<'a> {
            #[serde(rename = "match")]
            route_match: &'a RouteMatch,
            rule: &'a CompiledRule,
        }
        let entries = self
            .entries()
            .map(|(route_match, rule)| Entry { route_match, rule });
        let mut st = s.serialize_struct("RouteTable", 2)?;
        st.serialize_field("kind", &self.kind())?;
        st.serialize_field("entries", &entries.collect::<Vec<_>>())?;
        st.end()
    }
}

/// Two compilations of a route are alike when they resolved alike (and the route is the same,
/// most often the same object).
impl PartialEq for CompiledRule {
    fn eq(&self, other: &Self) -> bool {
        self.index == other.index
            && self.rare == other.rare
            && self.backends == other.backends
            && (Arc::ptr_eq(&self.route, &other.route) || self.route == other.route)
    }
}

/// The route by its key, then the rule itself and what it resolved to.
impl Serialize for CompiledRule {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("CompiledRule", 5)?;
        st.serialize_field("route", &self.route.key())?;
        st.serialize_field("index", &self.index)?;
        st.serialize_field("rule", self.rule())?;
        st.serialize_field("mirrors", &self.mirrors())?;
        let backends: Vec<_> = (0..self.backends.len())
            .map(|index| self.backend(index).map(|b| b.name()))
            .collect();
        st.serialize_field("backends", &backends)?;
        st.end()
    }
}

/// A mirror's resolved backend: `None` when its backendRef does not resolve (not configured).
pub type MirrorTarget = Option<Arc<Backend>>;

/// A rule as the data plane serves it: the model's rule (its filters, backendRefs and options,
/// read in the route it shares rather than copied) with what compiling resolved for it against
/// the world.
#[derive(Debug)]
pub struct CompiledRule {
    /// The route the rule is `rules[index]` of (the index's own copy).
    pub route: Arc<Route>,
    pub index: usize,
    /// One per backendRef of the rule, in its order.
    pub backends: SmallVec<[ResolvedBackend; 1]>,
    /// What few rules have: mirror filters' targets, backendRefs that do not resolve.
    rare: Option<Box<RareCompiled>>,
    /// The data plane's state for this rule's requests: those answered before a backend was
    /// chosen and those sent to each backendRef (one slot for all: most rules never see a
    /// request through a given table).
    pub series: Attached,
}

/// The targets of a rule's mirror filters, in the order of those filters.
#[derive(Debug, PartialEq, Serialize)]
pub struct MirrorTargets {
    /// The rule's own filters'.
    pub rule: Box<[MirrorTarget]>,
    /// Each backendRef's filters', one list per backendRef in its order.
    pub backends: Box<[Box<[MirrorTarget]>]>,
}

#[derive(Debug, PartialEq)]
pub struct ResolvedBackend {
    /// `None`: the backendRef does not resolve (the rule's rare part says why).
    pub backend: Option<Arc<Backend>>,
    /// The weights of this backendRef and those before it, for `backends::pick_weighted`.
    pub cumulative_weight: u32,
}

/// What few compiled rules have.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct RareCompiled {
    pub(crate) mirrors: Option<MirrorTargets>,
    /// Why each backendRef that does not resolve does not, by its index.
    pub(crate) unresolved: Box<[(usize, BackendError)]>,
    /// Why the rule cannot be served as written, given its backends' Services (see
    /// `backends::session_affinity_conflict`).
    pub(crate) conflict: Option<String>,
}

/// What the table says about a request.
#[derive(Debug)]
pub enum Decision<'a> {
    /// No route applies to this caller: plain load balancing over the Service's endpoints.
    Direct(&'a Arc<Backend>),
    /// Routes apply, but no rule matches: 404.
    NoMatchingRule,
    Rule {
        rule: &'a CompiledRule,
        matched: &'a RouteMatch,
    },
}

/// What a rule answers itself instead of forwarding: a redirect, or why the rule cannot be
/// served as written.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LocalResponse {
    #[error("redirect to {location}")]
    Redirect {
        status: StatusCode,
        location: String,
    },
    /// A CORS preflight, answered with these headers.
    #[error("CORS preflight")]
    Preflight(HeaderMap),
    #[error("the matched rule has no backendRefs")]
    NoBackendRefs,
    #[error("every backendRef of the matched rule has weight 0")]
    AllWeightsZero,
    #[error(transparent)]
    UnresolvedBackend(BackendError),
    #[error("filter {0} is not supported by this mesh; the rule cannot be served")]
    UnsupportedFilter(String),
    #[error("the matched rule is invalid and dropped until it is fixed: {0}")]
    InvalidRule(String),
    #[error(
        "the rule redirects to another scheme or port, and the request names no host to send \
         it to (give it a Host)"
    )]
    RedirectNeedsHost,
}

impl LocalResponse {
    /// Redirects answer with their status; a rule that cannot be served, 500 (the spec's answer
    /// for invalid backendRefs and unsupported filters).
    pub fn status(&self) -> StatusCode {
        match self {
            LocalResponse::Redirect { status, .. } => *status,
            LocalResponse::Preflight(_) => StatusCode::OK,
            LocalResponse::RedirectNeedsHost => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn location(&self) -> Option<&str> {
        match self {
            LocalResponse::Redirect { location, .. } => Some(location),
            _ => None,
        }
    }
}

/// What to do with a request once its rule's filters ran.
#[derive(Debug)]
pub enum Plan<'a> {
    /// The agent answers itself, with the headers the CORS filter adds to an allowed origin's
    /// answer if it ran first (a browser reads an error or a redirect only with them).
    Respond(LocalResponse, HeaderMap),
    Forward(Forward<'a>),
}

#[derive(Debug)]
pub struct Forward<'a> {
    pub backend: &'a Arc<Backend>,
    /// The backendRef `backend` is, among the rule's `backends`.
    pub backend_index: usize,
    /// Headers the CORS filter adds to the answer (before the modifiers run).
    pub cors_headers: HeaderMap,
    /// Response header modifiers, rule level then backend level.
    pub response_headers: Vec<&'a HeaderModifier>,
    pub mirrors: Vec<Mirror<'a>>,
}

#[derive(Debug)]
pub struct Mirror<'a> {
    pub backend: &'a Arc<Backend>,
    /// What its upstream connections speak (see `Backend::protocol_for`).
    pub protocol: UpstreamProtocol,
    /// The request as the filters before the mirror left it. Filters run in their order, so
    /// later ones are not the mirror's, nor are the chosen backendRef's, which apply only to
    /// requests forwarded to it (a canary's credentials must not reach a shadow Service).
    pub head: MirroredHead,
}

#[derive(Debug)]
pub struct MirroredHead {
    pub method: http::Method,
    pub uri: http::Uri,
    pub headers: HeaderMap,
}

impl CompiledRule {
    /// The model's rule this compiles.
    pub fn rule(&self) -> &Rule {
        &self.route.rules[self.index]
    }

    /// What the rule's backendRef `index` resolved to, or why it did not.
    pub fn backend(&self, index: usize) -> Result<&Arc<Backend>, &BackendError> {
        match &self.backends[index].backend {
            Some(backend) => Ok(backend),
            None => Err(self
                .rare
                .iter()
                .flat_map(|rare| rare.unresolved.iter())
                .find_map(|(at, error)| (*at == index).then_some(error))
                .expect("an unresolved backendRef has its error")),
        }
    }

    /// Where the rule's mirror filters send, if it has any (few do).
    pub fn mirrors(&self) -> Option<&MirrorTargets> {
        self.rare.as_ref()?.mirrors.as_ref()
    }

    /// Runs the rule's filters on the request head (in place), picks a backend with `random`,
    /// and runs that backend's filters. `listener_port` is the Service port the request was sent to.
    pub fn plan(
        &self,
        parts: &mut http::request::Parts,
        matched: &RouteMatch,
        listener_port: u16,
        random: u64,
    ) -> Plan<'_> {
        self.plan_to(parts, matched, listener_port, random, None)
    }

    /// The backendRef (index) one of whose endpoints is `endpoint`: where a persisted session
    /// goes back to, whatever the weights say now (a weight set to 0 drains new sessions only).
    /// The one it began through (`began`) while it still serves the endpoint: two backendRefs
    /// may share endpoints, with different filters.
    pub fn backend_serving(
        &self,
        endpoint: std::net::SocketAddr,
        began: Option<usize>,
    ) -> Option<usize> {
        began
            .filter(|began| self.backends_serving(endpoint).any(|i| i == *began))
            .or_else(|| self.backends_serving(endpoint).next())
    }

    /// Whether more than one backendRef serves `endpoint`: a session token then names the one
    /// it began through, and only then (a token without it reads the same to agents before it).
    pub fn endpoint_is_shared(&self, endpoint: std::net::SocketAddr) -> bool {
        self.backends_serving(endpoint).nth(1).is_some()
    }

    /// The backendRefs (indices) one of whose endpoints is `endpoint`, in the rule's order.
    fn backends_serving(&self, endpoint: std::net::SocketAddr) -> impl Iterator<Item = usize> + '_ {
        self.backends
            .iter()
            .enumerate()
            .filter_map(move |(index, b)| {
                b.backend
                    .as_ref()
                    .is_some_and(|backend| backend.endpoints.contains(&endpoint))
                    .then_some(index)
            })
    }

    /// As [`Self::plan`], with the backendRef given (`Some`) instead of chosen by weight.
    pub fn plan_to(
        &self,
        parts: &mut http::request::Parts,
        matched: &RouteMatch,
        listener_port: u16,
        random: u64,
        backend: Option<usize>,
    ) -> Plan<'_> {
        if let Some(reason) = self.invalid() {
            let invalid = LocalResponse::InvalidRule(reason.to_owned());
            return Plan::Respond(invalid, HeaderMap::new());
        }
        let mut run = FilterRun {
            parts,
            matched: &matched.path,
            kind: self.route.kind(),
            listener_port,
            cors_headers: HeaderMap::new(),
            response_headers: Vec::new(),
            mirrors: Vec::new(),
            mirror_draws: random,
        };
        let mirrors = self.mirrors();
        let rule_mirrors = mirrors.map_or(&[][..], |m| &m.rule);
        if let Some(response) = run.apply(self.rule().filters(), rule_mirrors) {
            return Plan::Respond(response, run.cors_headers);
        }
        if self.backends.is_empty() {
            return Plan::Respond(LocalResponse::NoBackendRefs, run.cors_headers);
        }
        let Some(index) = backend.or_else(|| {
            backends::pick_weighted(&self.backends, |b| b.cumulative_weight.into(), random)
        }) else {
            return Plan::Respond(LocalResponse::AllWeightsZero, run.cors_headers);
        };
        let backend = match self.backend(index) {
            Ok(b) => b,
            Err(e) => {
                let unresolved = LocalResponse::UnresolvedBackend(e.clone());
                return Plan::Respond(unresolved, run.cors_headers);
            }
        };
        let backend_mirrors = mirrors.map_or(&[][..], |m| &m.backends[index]);
        if let Some(response) = run.apply(self.rule().backends[index].filters(), backend_mirrors) {
            return Plan::Respond(response, run.cors_headers);
        }
        Plan::Forward(Forward {
            backend,
            backend_index: index,
            cors_headers: run.cors_headers,
            response_headers: run.response_headers,
            mirrors: run.mirrors,
        })
    }

    /// The rule's own ResponseHeaderModifiers: they apply to the answers the agent gives for
    /// this rule too (redirects, unservable backends, timeouts), not only to relayed ones.
    pub fn response_header_modifiers(&self) -> impl Iterator<Item = &HeaderModifier> {
        self.rule().filters().iter().filter_map(|f| match f {
            Filter::ResponseHeaders(m) => Some(m),
            Filter::RequestHeaders(_)
            | Filter::Redirect(_)
            | Filter::Rewrite(_)
            | Filter::Mirror(_)
            | Filter::Cors(_)
            | Filter::Unsupported(_) => None,
        })
    }

    pub fn timeouts(&self) -> &Timeouts {
        &self.rule().options().timeouts
    }

    pub fn retry(&self) -> Option<&Retry> {
        self.rule().options().retry.as_ref()
    }

    /// Why the rule is answered 500: invalid as written, or in conflict with its backends.
    pub fn invalid(&self) -> Option<&str> {
        self.rule()
            .invalid()
            .or_else(|| self.rare.as_ref()?.conflict.as_deref())
    }

    pub fn session(&self) -> Option<&SessionPersistence> {
        self.rule().options().session.as_ref()
    }

    /// The rule's name, or `#` and its index in the route when it has none: a name may be a
    /// number (`"1"`), never `#`.
    pub fn name_or_index(&self) -> String {
        match self.rule().name() {
            Some(name) => name.to_owned(),
            None => format!("#{}", self.index),
        }
    }
}

/// Request filters of a rule and then of its chosen backend, run in order on one request head,
/// collecting the response header modifiers and mirrors they ask for.
struct FilterRun<'a, 'p, 'm> {
    parts: &'p mut http::request::Parts,
    matched: &'m PathMatch,
    /// The kind of route the rule is of.
    kind: RouteKind,
    listener_port: u16,
    cors_headers: HeaderMap,
    response_headers: Vec<&'a HeaderModifier>,
    mirrors: Vec<Mirror<'a>>,
    /// Where each mirror's sampling draw comes from: advanced once per mirror filter.
    mirror_draws: u64,
}

/// SplitMix64's step: a number for each mirror's sample, independent in practice of the one
/// that picked the backend (the same bits would tie the two: with weights 96/4 and a 1 % mirror
/// on the 4, their residues never met).
fn next_draw(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl<'a> FilterRun<'a, '_, '_> {
    /// Applies `filters`, whose mirror filters go to `mirror_targets` in order; returns a
    /// response when a filter answers the request itself.
    fn apply(
        &mut self,
        filters: &'a [Filter],
        mirror_targets: &'a [MirrorTarget],
    ) -> Option<LocalResponse> {
        // Checked before any filter runs: one that answers (a redirect, a CORS preflight) must
        // not skip it, which would serve requests a filter the agent cannot apply was meant for.
        if let Some(what) = filters.iter().find_map(|f| match f {
            Filter::Unsupported(what) => Some(what),
            _ => None,
        }) {
            return Some(LocalResponse::UnsupportedFilter(what.clone()));
        }
        let (parts, matched) = (&mut *self.parts, self.matched);
        let mut mirror_targets = mirror_targets.iter();
        for filter in filters {
            match filter {
                Filter::RequestHeaders(m) => m.apply(&mut parts.headers),
                Filter::ResponseHeaders(m) => self.response_headers.push(m),
                Filter::Rewrite(r) => r.apply(parts, matched),
                Filter::Redirect(r) => {
                    let location =
                        r.location(&parts.uri, &parts.headers, matched, self.listener_port);
                    let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::FOUND);
                    return Some(match location {
                        Some(location) => LocalResponse::Redirect { status, location },
                        None => LocalResponse::RedirectNeedsHost,
                    });
                }
                Filter::Mirror(m) => {
                    // Sampled here, so that a request not mirrored copies nothing.
                    let sampled = next_draw(&mut self.mirror_draws)
                        % u64::from(m.denominator.max(1))
                        < u64::from(m.numerator);
                    if let (Some(Some(backend)), true) = (mirror_targets.next(), sampled) {
                        self.mirrors.push(Mirror {
                            backend,
                            protocol: backend.protocol_for(Some(self.kind)),
                            head: MirroredHead {
                                method: parts.method.clone(),
                                uri: parts.uri.clone(),
                                headers: parts.headers.clone(),
                            },
                        });
                    }
                }
                Filter::Cors(policy) => match policy.evaluate(&parts.method, &parts.headers) {
                    CorsOutcome::NotCors => {}
                    CorsOutcome::Preflight(headers) => {
                        return Some(LocalResponse::Preflight(headers));
                    }
                    CorsOutcome::Actual(headers) => self.cors_headers.extend(headers),
                },
                Filter::Unsupported(_) => {}
            }
        }
        None
    }
}
