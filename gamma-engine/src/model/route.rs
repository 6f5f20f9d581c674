//! HTTPRoute and GRPCRoute, converted into one route model with the CRD defaults applied.
//!
//! The two Gateway API kinds share everything the engine needs (parents, rules, filters, backends);
//! a gRPC method match becomes a path match, and the kind is kept for precedence and conflicts.

use super::convert::invalid;
use super::{Meta, ObjectKey, OneOrMany};
use crate::model::ObjectError;
use compact_str::CompactString;
use gateway_api::experimental::{grpcroutes as grpc, httproutes as http_api};
use http::{HeaderName, HeaderValue, Method};
use regex::Regex;
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;
use triomphe::ThinArc;

pub const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";
/// Bounds from the CRD schema (CEL and OpenAPI): refused by an API server, so refused here too.
const MAX_RULES: usize = 16;
const MAX_MATCHES_PER_RULE: usize = 64;
const MAX_WEIGHT: i32 = 1_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum RouteKind {
    Http,
    Grpc,
}

impl RouteKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RouteKind::Http => "HTTPRoute",
            RouteKind::Grpc => "GRPCRoute",
        }
    }
}

/// Identifies a route: kind + namespace/name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct RouteKey {
    pub kind: RouteKind,
    pub key: ObjectKey,
}

impl RouteKey {
    /// Reads a key as it is displayed: `HTTPRoute namespace/name` (or `GRPCRoute …`).
    pub fn parse(shown: &str) -> Option<RouteKey> {
        let (kind, key) = shown.split_once(' ')?;
        let kind = [RouteKind::Http, RouteKind::Grpc]
            .into_iter()
            .find(|k| k.as_str() == kind)?;
        let (namespace, name) = key.split_once('/')?;
        Some(RouteKey {
            kind,
            key: ObjectKey::new(namespace, name),
        })
    }
}

impl std::fmt::Display for RouteKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.kind.as_str(), self.key)
    }
}

/// As its key: `HTTPRoute namespace/name`.
impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.id.fmt(f)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Route {
    /// Kind, namespace and name: one copy, shared with the index's maps and sets and the route
    /// status map (the index gives a new generation the copy it already holds).
    pub id: Arc<RouteKey>,
    pub meta: Meta,
    /// Shared with the route's status, which reports on each.
    pub parent_refs: Arc<[ParentRef]>,
    /// The compiled rules share the route (by `Arc`) and read their filters, backendRefs and
    /// options here instead of holding copies.
    pub rules: Box<[Rule]>,
}

impl Route {
    pub fn key(&self) -> RouteKey {
        RouteKey::clone(&self.id)
    }

    pub fn kind(&self) -> RouteKind {
        self.id.kind
    }

    pub fn namespace(&self) -> &str {
        &self.id.key.namespace
    }
}

/// A route generation that does not convert at all, though its identity does: the last good
/// generation (if any) stays in use, and the route's status reports this one as not Accepted, so
/// that an invalid edit reaches `kubectl get` instead of leaving the old status in place.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RefusedRoute {
    pub key: RouteKey,
    /// The refused object's `metadata.uid` (compared with the served route's).
    pub uid: Option<Box<str>>,
    pub generation: i64,
    /// Its parentRefs, when they convert (else none: the status has no parent to report on).
    pub parent_refs: Arc<[ParentRef]>,
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ParentRef {
    pub target: GroupKind,
    pub namespace: Option<CompactString>,
    pub name: CompactString,
    pub port: Option<u16>,
    /// Rare: boxed (one word less than an inline string).
    pub section_name: Option<Box<str>>,
}

/// As the API writes it (route status echoes it so): group and kind spelled out, fields not set
/// left out, `sectionName`.
impl Serialize for ParentRef {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("ParentRef", 6)?;
        st.serialize_field("group", self.target.group())?;
        st.serialize_field("kind", self.target.kind())?;
        match &self.namespace {
            Some(namespace) => st.serialize_field("namespace", namespace)?,
            None => st.skip_field("namespace")?,
        }
        st.serialize_field("name", &self.name)?;
        match self.port {
            Some(port) => st.serialize_field("port", &port)?,
            None => st.skip_field("port")?,
        }
        match &self.section_name {
            Some(section) => st.serialize_field("sectionName", section)?,
            None => st.skip_field("sectionName")?,
        }
        st.end()
    }
}

impl ParentRef {
    /// The Service this parentRef names, if it names a Service (group "" and kind Service).
    pub fn service(&self, route_namespace: &str) -> Option<ObjectKey> {
        (self.target == GroupKind::Service).then(|| {
            ObjectKey::new(
                self.namespace.as_deref().unwrap_or(route_namespace),
                self.name.clone(),
            )
        })
    }

    /// Whether it selects `port` by its number or name (not as one of all the Service's ports).
    pub fn names_port(&self, port: &super::ServicePort) -> bool {
        (self.port.is_some() || self.section_name.is_some()) && self.selects(port)
    }

    /// Whether this parentRef selects `port` of its Service: its port and sectionName, where
    /// given, name it.
    pub fn selects(&self, port: &super::ServicePort) -> bool {
        self.port.is_none_or(|n| n == port.port)
            && self
                .section_name
                .as_deref()
                .is_none_or(|s| port.name.as_deref() == Some(s))
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    /// The route tables' entries copy these (a path is inline, the other conditions shared).
    /// Most rules have one match and one backendRef: kept in the rule, not in a block each.
    pub matches: OneOrMany<RouteMatch>,
    /// Most rules have no filters: one thin pointer, to a list, for those that do.
    filters: Option<Box<Box<[Filter]>>>,
    pub backends: OneOrMany<BackendRef>,
    /// A name, timeouts, retry, session persistence, a dropped rule's reason: most rules have
    /// none of them, so they take one pointer until one is set; the compiled rule shares them.
    pub options: Option<Arc<RuleOptions>>,
}

/// With its name first, as written.
impl Serialize for Rule {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("Rule", 5)?;
        st.serialize_field("name", &self.name())?;
        st.serialize_field("matches", &self.matches)?;
        st.serialize_field("filters", self.filters())?;
        st.serialize_field("backends", &self.backends)?;
        st.serialize_field("options", &self.options)?;
        st.end()
    }
}

/// What a rule may have beyond matches, filters and backends.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RuleOptions {
    /// The rule's `name` (sectionName of policies and status).
    #[serde(skip)]
    pub name: Option<Box<str>>,
    pub timeouts: Timeouts,
    pub retry: Option<Retry>,
    /// Why this rule cannot be served as written (a field that does not convert, a check that
    /// fails), with the field at fault. It is dropped (Gateway API `PartiallyInvalid`) but keeps
    /// its place: when its matches converted they still claim their requests, which get 500,
    /// so that they never get another rule's answer; when they did not, it matches nothing.
    pub invalid: Option<String>,
    /// Session persistence (GEP-1619).
    pub session: Option<super::SessionPersistence>,
}

impl RuleOptions {
    /// A rule's options when it has none set.
    pub const NONE: RuleOptions = RuleOptions {
        name: None,
        timeouts: Timeouts {
            request: None,
            backend_request: None,
        },
        retry: None,
        invalid: None,
        session: None,
    };

    /// `None` when nothing is set.
    pub fn shared(self) -> Option<Arc<RuleOptions>> {
        (self != RuleOptions::NONE).then(|| Arc::new(self))
    }

    /// The options held in `slot`, or none set.
    pub fn of(slot: &Option<Arc<RuleOptions>>) -> &RuleOptions {
        slot.as_deref().unwrap_or(&RuleOptions::NONE)
    }
}

impl Rule {
    /// The stand-in for a rule that failed to convert (see [`RuleOptions::invalid`]).
    fn dropped(name: Option<Box<str>>, matches: OneOrMany<RouteMatch>, error: &Invalid) -> Rule {
        Rule {
            matches,
            filters: None,
            backends: OneOrMany::default(),
            options: RuleOptions {
                name,
                invalid: Some(error.to_string()),
                ..RuleOptions::NONE
            }
            .shared(),
        }
    }

    pub fn options(&self) -> &RuleOptions {
        RuleOptions::of(&self.options)
    }

    pub fn name(&self) -> Option<&str> {
        self.options().name.as_deref()
    }

    pub fn filters(&self) -> &[Filter] {
        self.filters.as_deref().map_or(&[], |f| f)
    }

    /// Why this rule cannot be served as written, if so (see [`RuleOptions::invalid`]).
    pub fn invalid(&self) -> Option<&str> {
        self.options().invalid.as_deref()
    }

    /// Reads each rule's session persistence from the route's JSON (see `model::session`); a
    /// rule whose configuration is invalid is dropped like any other invalid rule.
    fn sessions_from(rules: &mut [Rule], raw: &serde_json::Value) {
        for (index, rule) in rules.iter_mut().enumerate() {
            match super::session::session_persistence(raw, index) {
                Ok(session) => {
                    rule.options = RuleOptions {
                        session,
                        ..rule.options().clone()
                    }
                    .shared()
                }
                Err(e) => {
                    *rule = Rule::dropped(
                        rule.name().map(Into::into),
                        std::mem::take(&mut rule.matches),
                        &e,
                    )
                }
            }
        }
    }

    /// Why this rule is not served as written, if it is not: it failed to convert, it uses a
    /// filter this mesh does not provide (whose requests get 500, as the spec asks), or every
    /// backend it sends to does.
    pub fn dropped_because(&self) -> Option<String> {
        if let Some(reason) = self.invalid() {
            return Some(if self.matches.is_empty() {
                format!("{reason}; it matches nothing until it is fixed")
            } else {
                format!("{reason}; the requests it matches get 500")
            });
        }
        if let Some(unsupported) = unsupported(self.filters()) {
            return Some(format!(
                "filter {unsupported} is not supported by this mesh; the requests it matches get 500"
            ));
        }
        let mut weighted = self.backends.iter().filter(|b| b.weight > 0).peekable();
        let first = unsupported(weighted.peek()?.filters())?;
        weighted
            .all(|b| unsupported(b.filters()).is_some())
            .then(|| {
                format!(
                "filter {first} of its backendRefs is not supported by this mesh; the requests \
                 it matches get 500"
            )
            })
    }

    /// The backendRefs (index and name) whose filters this mesh does not provide: in a rule that
    /// is served, the requests sent to them get 500, the others' are forwarded.
    pub fn unsupported_backends(&self) -> impl Iterator<Item = String> + '_ {
        self.backends.iter().enumerate().filter_map(|(i, b)| {
            let filter = unsupported(b.filters())?;
            Some(format!(
                "backendRef {i} ({}): filter {filter} is not supported by this mesh; the \
                 requests sent to it get 500",
                b.name
            ))
        })
    }

    /// Every backendRef this rule sends traffic to: its backendRefs, then the targets of its own
    /// filters and of its backends' filters (mirrors). The index, the status and the compiler
    /// all walk a rule's references through this one method.
    pub fn referenced_backends(&self) -> impl Iterator<Item = &BackendRef> {
        let filters = self
            .filters()
            .iter()
            .chain(self.backends.iter().flat_map(|b| b.filters()));
        self.backends
            .iter()
            .chain(filters.filter_map(Filter::sends_to))
    }
}

/// One `matches[]` entry: every condition must hold.
#[derive(Clone, Debug, PartialEq)]
pub struct RouteMatch {
    pub path: PathMatch,
    /// Everything else, in one block behind one thin pointer, shared by the route table's copy
    /// of the match: the method, header and query parameter conditions, in that order (names
    /// and values inline, so that a table scan that gets past a path reaches all it reads in
    /// one step), and for a GRPCRoute match how it ranks (by its service and method instead of
    /// its path). Most HTTPRoute matches have neither (`None`).
    rest: Option<ThinArc<Option<GrpcMethodSpecificity>, Condition>>,
}

/// A match's condition besides its path.
#[derive(Clone, Debug, PartialEq)]
pub enum Condition {
    Method(Method),
    Header(ValueMatch<HeaderKey>),
    QueryParam(ValueMatch<CompactString>),
}

impl RouteMatch {
    pub fn new(
        path: PathMatch,
        method: Option<Method>,
        headers: Vec<ValueMatch<HeaderKey>>,
        query_params: Vec<ValueMatch<CompactString>>,
        grpc: Option<GrpcMethodSpecificity>,
    ) -> Self {
        let conditions: Vec<Condition> = method
            .map(Condition::Method)
            .into_iter()
            .chain(headers.into_iter().map(Condition::Header))
            .chain(query_params.into_iter().map(Condition::QueryParam))
            .collect();
        let rest = (!conditions.is_empty() || grpc.is_some())
            .then(|| ThinArc::from_header_and_iter(grpc, conditions.into_iter()));
        RouteMatch { path, rest }
    }

    /// The match a rule without `matches` gets: PathPrefix `/`.
    pub fn any() -> Self {
        RouteMatch {
            path: PathMatch::Prefix("/".into()),
            rest: None,
        }
    }

    pub fn conditions(&self) -> &[Condition] {
        self.rest.as_ref().map_or(&[], |rest| &rest.slice)
    }

    /// How a GRPCRoute match ranks (`None` for an HTTPRoute's).
    pub fn grpc(&self) -> Option<GrpcMethodSpecificity> {
        self.rest.as_ref().and_then(|rest| rest.header.header)
    }

    pub fn method(&self) -> Option<&Method> {
        self.conditions().iter().find_map(|c| match c {
            Condition::Method(m) => Some(m),
            _ => None,
        })
    }

    pub fn headers(&self) -> impl Iterator<Item = &ValueMatch<HeaderKey>> {
        self.conditions().iter().filter_map(|c| match c {
            Condition::Header(h) => Some(h),
            _ => None,
        })
    }

    pub fn query_params(&self) -> impl Iterator<Item = &ValueMatch<CompactString>> {
        self.conditions().iter().filter_map(|c| match c {
            Condition::QueryParam(q) => Some(q),
            _ => None,
        })
    }
}

/// With every condition spelled out, as written.
impl Serialize for RouteMatch {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("RouteMatch", 5)?;
        st.serialize_field("path", &self.path)?;
        st.serialize_field("headers", &self.headers().collect::<Vec<_>>())?;
        st.serialize_field("query_params", &self.query_params().collect::<Vec<_>>())?;
        st.serialize_field("method", &self.method().map(Method::as_str))?;
        st.serialize_field("grpc", &self.grpc())?;
        st.end()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct GrpcMethodSpecificity {
    /// Characters of the matched service and method (0: not given; the CRD allows 1,024 at
    /// most, and longer ones rank as 65,535).
    pub service_len: u16,
    pub method_len: u16,
    /// A RegularExpression match that names a service or method: it has no characters of its
    /// own to count, and ranks after every exact name but before no method match at all.
    pub pattern: bool,
}

fn characters(name: Option<&str>) -> u16 {
    name.map_or(0, |n| u16::try_from(n.len()).unwrap_or(u16::MAX))
}

#[derive(Clone, Debug, Serialize)]
pub enum PathMatch {
    /// Paths are short: kept inline (no heap pointer to chase when a table is scanned).
    Exact(CompactString),
    /// Segment-wise prefix, stored with one trailing `/` if written with one (`/` as "/"): a
    /// match ignores it (`routes::matches::prefix_matches`), precedence counts it ("the largest
    /// number of characters": `/foo/` outranks `/foo`).
    Prefix(CompactString),
    /// Boxed: rarer, and larger than a path.
    Regex(#[serde(serialize_with = "serialize_regex")] Box<Regex>),
}

impl PartialEq for PathMatch {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Exact(a), Self::Exact(b)) | (Self::Prefix(a), Self::Prefix(b)) => a == b,
            (Self::Regex(a), Self::Regex(b)) => a.as_str() == b.as_str(),
            _ => false,
        }
    }
}

fn serialize_regex<S: serde::Serializer>(r: &Regex, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(r.as_str())
}

/// A header or query parameter condition. Header names are [`HeaderKey`]s (compared without
/// case); query parameter names are kept as written (case-sensitive).
#[derive(Clone, Debug, PartialEq)]
pub struct ValueMatch<N> {
    pub name: N,
    pub value: StringMatch,
}

impl<N: AsRef<str>> Serialize for ValueMatch<N> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("ValueMatch", 2)?;
        st.serialize_field("name", self.name.as_ref())?;
        st.serialize_field("value", &self.value)?;
        st.end()
    }
}

/// How a match name is read from a manifest.
pub trait MatchName: Sized + PartialEq {
    fn parse(name: &str, field: &str) -> Result<Self, Invalid>;
}

impl MatchName for CompactString {
    fn parse(name: &str, _: &str) -> Result<Self, Invalid> {
        Ok(name.into())
    }
}

/// A header name a match looks for: valid, lower case, and inline (up to 24 bytes), so that a
/// lookup reads it where the match is instead of following a pointer to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderKey(CompactString);

impl HeaderKey {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for HeaderKey {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl MatchName for HeaderKey {
    fn parse(name: &str, field: &str) -> Result<Self, Invalid> {
        header_name(name, field).map(HeaderKey::from)
    }
}

/// A `HeaderName` is valid and lower case already.
impl From<HeaderName> for HeaderKey {
    fn from(name: HeaderName) -> Self {
        HeaderKey(name.as_str().into())
    }
}

#[derive(Clone, Debug, Serialize)]
pub enum StringMatch {
    Exact(CompactString),
    /// Boxed: rarer, and larger than a value.
    Regex(#[serde(serialize_with = "serialize_regex")] Box<Regex>),
}

impl PartialEq for StringMatch {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Exact(a), Self::Exact(b)) => a == b,
            (Self::Regex(a), Self::Regex(b)) => a.as_str() == b.as_str(),
            _ => false,
        }
    }
}

impl StringMatch {
    pub fn is_match(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(v) => v == value,
            StringMatch::Regex(r) => r.is_match(value),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum Filter {
    RequestHeaders(HeaderModifier),
    ResponseHeaders(HeaderModifier),
    // The rarer filters are boxed: a rule's filters are one list, sized by its largest kind.
    Redirect(Box<RequestRedirect>),
    Rewrite(Box<UrlRewrite>),
    Mirror(Box<RequestMirror>),
    Cors(Box<CorsPolicy>),
    /// A filter this implementation does not provide (ExtensionRef, ExternalAuth). The spec
    /// forbids skipping it: the requests it applies to are answered with an error.
    Unsupported(String),
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct HeaderModifier {
    // Exact-size lists: a route is built once and kept for long.
    #[serde(serialize_with = "serialize_headers")]
    pub set: Box<[(HeaderName, HeaderValue)]>,
    #[serde(serialize_with = "serialize_headers")]
    pub add: Box<[(HeaderName, HeaderValue)]>,
    #[serde(serialize_with = "serialize_names")]
    pub remove: Box<[HeaderName]>,
}

fn serialize_headers<S: serde::Serializer>(
    h: &[(HeaderName, HeaderValue)],
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_seq(
        h.iter()
            .map(|(n, v)| (n.as_str(), v.to_str().unwrap_or("<binary>"))),
    )
}

fn serialize_names<S: serde::Serializer>(h: &[HeaderName], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(h.iter().map(HeaderName::as_str))
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum PathModifier {
    ReplaceFullPath(String),
    ReplacePrefixMatch(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RequestRedirect {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub port: Option<u16>,
    pub path: Option<PathModifier>,
    pub status: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct UrlRewrite {
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
}

/// HTTPRoute's CORS filter (GEP-1767), validated.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CorsPolicy {
    pub allow_origins: Vec<AllowedOrigin>,
    pub allow_credentials: bool,
    /// Method names as written (case-sensitive), or `*`.
    pub allow_methods: Vec<String>,
    /// Header names as written (compared without case), or `*`.
    pub allow_headers: Vec<String>,
    pub expose_headers: Vec<String>,
    /// Seconds a browser may cache a preflight answer.
    pub max_age: u32,
}

/// One entry of `allowOrigins`: `*`, or `scheme://host[:port]` whose host may start with `*`
/// (any number of DNS labels to its left).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum AllowedOrigin {
    Any,
    Origin {
        scheme: String,
        /// Lower case; `*.example.com` is kept as `*.example.com`.
        host: String,
        /// Explicit, or the scheme's default (80, 443).
        port: u16,
    },
}

impl AllowedOrigin {
    /// Parses `*` or `scheme://host[:port]` (scheme `http` or `https`); `None` if it is neither.
    pub fn parse(origin: &str) -> Option<Self> {
        if origin == "*" {
            return Some(AllowedOrigin::Any);
        }
        let (scheme, rest) = origin.split_once("://")?;
        let scheme = scheme.to_ascii_lowercase();
        let default_port = match scheme.as_str() {
            "http" => 80,
            "https" => 443,
            _ => return None,
        };
        let (host, port) = match rest.rsplit_once(':') {
            Some((host, port)) if !rest.ends_with(']') => (host, port.parse().ok()?),
            _ => (rest, default_port),
        };
        let valid_host = !host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-.*[]:".contains(c));
        valid_host.then(|| AllowedOrigin::Origin {
            scheme,
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RequestMirror {
    pub backend: BackendRef,
    /// Share of requests mirrored, numerator over denominator.
    pub numerator: u32,
    pub denominator: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct BackendRef {
    /// Short names, kept inline (no allocation each). The namespace is the route's when not
    /// given; a consumer route's backendRefs give it (they name the producer's Services).
    pub namespace: Option<CompactString>,
    pub name: CompactString,
    pub port: Option<u16>,
    pub weight: u32,
    /// A kind other than a core Service, and filters: few backendRefs have either, so both
    /// take one pointer until one is set.
    rare: Option<Box<RareBackendRef>>,
}

#[derive(Clone, Debug, PartialEq)]
struct RareBackendRef {
    kind: GroupKind,
    filters: Box<[Filter]>,
}

impl BackendRef {
    pub fn new(
        kind: GroupKind,
        namespace: Option<CompactString>,
        name: CompactString,
        port: Option<u16>,
        weight: u32,
        filters: Box<[Filter]>,
    ) -> Self {
        let rare = (kind != GroupKind::Service || !filters.is_empty())
            .then(|| Box::new(RareBackendRef { kind, filters }));
        BackendRef {
            namespace,
            name,
            port,
            weight,
            rare,
        }
    }

    pub fn kind(&self) -> &GroupKind {
        self.rare.as_ref().map_or(&GroupKind::Service, |r| &r.kind)
    }

    pub fn filters(&self) -> &[Filter] {
        self.rare.as_ref().map_or(&[], |r| &r.filters)
    }
}

/// With every field spelled out, as written.
impl Serialize for BackendRef {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("BackendRef", 6)?;
        st.serialize_field("kind", self.kind())?;
        st.serialize_field("namespace", &self.namespace)?;
        st.serialize_field("name", &self.name)?;
        st.serialize_field("port", &self.port)?;
        st.serialize_field("weight", &self.weight)?;
        st.serialize_field("filters", self.filters())?;
        st.end()
    }
}

/// A reference's group and kind (a backendRef's, a parentRef's): in a mesh nearly always a core
/// Service, kept in one word; anything else (a Gateway parent, a backend this mesh cannot send
/// to) keeps its group and kind, boxed, for status and messages.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum GroupKind {
    Service,
    Other(Box<(CompactString, CompactString)>),
}

impl GroupKind {
    pub fn new(group: &str, kind: &str) -> Self {
        if group.is_empty() && kind == "Service" {
            GroupKind::Service
        } else {
            GroupKind::Other(Box::new((group.into(), kind.into())))
        }
    }

    pub fn group(&self) -> &str {
        match self {
            GroupKind::Service => "",
            GroupKind::Other(other) => &other.0,
        }
    }

    pub fn kind(&self) -> &str {
        match self {
            GroupKind::Service => "Service",
            GroupKind::Other(other) => &other.1,
        }
    }
}

impl std::fmt::Display for GroupKind {
    /// `group/kind`, as the spec spells a reference's kind.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GroupKind::Service => f.write_str("/Service"),
            GroupKind::Other(other) => write!(f, "{}/{}", other.0, other.1),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Timeouts {
    /// Whole client transaction, retries included. `None`: no timeout (unset or `0s`).
    pub request: Option<Duration>,
    /// One upstream attempt.
    pub backend_request: Option<Duration>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Retry {
    /// Retries after the first attempt.
    pub attempts: u32,
    pub codes: Vec<u16>,
    pub backoff: Option<Duration>,
}

// ---- conversion ---------------------------------------------------------------------------

type Invalid = ObjectError;

fn port(value: Option<i32>, field: &str) -> Result<Option<u16>, Invalid> {
    value
        .map(|p| {
            u16::try_from(p)
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| invalid(field, format!("port {p} is not in 1-65535")))
        })
        .transpose()
}

/// A GEP-2257 duration (`1h30m`, `500ms`).
pub(super) fn gep2257(text: &str, field: &str) -> Result<Duration, Invalid> {
    let parsed: gateway_api::Duration = text
        .parse()
        .map_err(|e| invalid(field, format!("`{text}` is not a GEP-2257 duration ({e})")))?;
    Ok(Duration::from_millis(parsed.as_millis() as u64))
}

/// A timeout: absent or zero is none.
fn duration(value: Option<&String>, field: &str) -> Result<Option<Duration>, Invalid> {
    let Some(text) = value else { return Ok(None) };
    let d = gep2257(text, field)?;
    Ok((!d.is_zero()).then_some(d))
}

fn compile_regex(pattern: &str, field: &str) -> Result<Regex, Invalid> {
    check_regex(pattern, field)?;
    // Anchored: a regular expression match applies to the whole value, as in Envoy and linkerd.
    Regex::new(&format!("^(?:{pattern})$")).map_err(|e| invalid_regex(e, field))
}

/// A pattern must be one on its own, before it is put in a group of ours: an unbalanced one
/// (`v1)|(.*`) would close that group and open another, and match any value instead of being
/// refused.
fn check_regex(pattern: &str, field: &str) -> Result<(), Invalid> {
    Regex::new(pattern)
        .map(drop)
        .map_err(|e| invalid_regex(e, field))
}

fn invalid_regex(e: regex::Error, field: &str) -> Invalid {
    invalid(field, format!("invalid regular expression: {e}"))
}

fn header_name(name: &str, field: &str) -> Result<HeaderName, Invalid> {
    HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| invalid(field, format!("`{name}` is not a valid header name")))
}

/// A header modifier's value, without whitespace around it: a field value has none (RFC 9110
/// §5.5), and HTTP/2 peers refuse one that starts or ends with it (RFC 9113 §8.2.1: nghttp2,
/// that is curl, resets the stream). The standard CRD does not refuse it.
fn header_value(value: &str, field: &str) -> Result<HeaderValue, Invalid> {
    HeaderValue::from_str(value.trim_matches([' ', '\t']))
        .map_err(|_| invalid(field, format!("`{value}` is not a valid header value")))
}

/// An Exact or PathPrefix value, validated as the CRD does, in the form requests are matched in
/// ([`super::path::normalize_path`]): `/caf%c3%a9` as `/caf%C3%A9`, `/%7Euser` as `/~user`.
/// As written, such a value never matched the request it names.
fn matched_path(value: String, field: &str) -> Result<String, Invalid> {
    checked_path(&value, field)?;
    // The CRD refuses dot segments; encoded, they would collapse the value to its parent
    // (`/api/%2e%2e` to `/`, a catch-all) once normalized.
    if super::path::has_dot_segment(&value) {
        return Err(invalid(
            field,
            format!("`{value}` must not contain a dot segment, encoded or not"),
        ));
    }
    Ok(super::path::normalize_path(&value).unwrap_or(value))
}

/// Validates an Exact/PathPrefix path as the CRD does.
fn checked_path(value: &str, field: &str) -> Result<(), Invalid> {
    if !value.starts_with('/') {
        return Err(invalid(field, format!("`{value}` must start with `/`")));
    }
    for bad in ["//", "/./", "/../", "%2f", "%2F", "#"] {
        if value.contains(bad) {
            return Err(invalid(
                field,
                format!("`{value}` must not contain `{bad}`"),
            ));
        }
    }
    if value.ends_with("/..") || value.ends_with("/.") {
        return Err(invalid(
            field,
            format!("`{value}` must not end with `/.` or `/..`"),
        ));
    }
    Ok(())
}

fn parent_refs<P>(
    refs: Option<&Vec<P>>,
    conv: impl Fn(
        &P,
    ) -> (
        Option<&String>,
        Option<&String>,
        &String,
        Option<&String>,
        Option<i32>,
        Option<&String>,
    ),
) -> Result<Vec<ParentRef>, Invalid> {
    let mut out = Vec::new();
    for (i, r) in refs.into_iter().flatten().enumerate() {
        let (group, kind, name, namespace, p, section) = conv(r);
        out.push(ParentRef {
            target: GroupKind::new(
                group.map_or(GATEWAY_GROUP, |g| g.as_str()),
                kind.map_or("Gateway", |k| k.as_str()),
            ),
            namespace: namespace.map(|n| n.as_str().into()),
            name: name.as_str().into(),
            port: port(p, &format!("spec.parentRefs[{i}].port"))?,
            section_name: section.map(|s| s.as_str().into()),
        });
    }
    Ok(out)
}

/// `set`/`add` lists of a generated header-modifier type, as (name, value) pairs.
macro_rules! header_pairs {
    ($list:expr, $field:expr) => {
        $list
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, h)| {
                let f = format!("{}[{i}]", $field);
                Ok((header_name(&h.name, &f)?, header_value(&h.value, &f)?))
            })
            .collect::<Result<Vec<(HeaderName, HeaderValue)>, Invalid>>()
            .map(first_of_each_name)?
    };
}

/// The first entry of each header name (names compared case-insensitively): the spec's
/// `HTTPHeader.name` says later equivalent entries MUST be ignored, and the CRD's list key,
/// case-sensitive, lets `X-Env` and `x-env` both through. Compared with those kept, at most 16
/// (the CRD's limit), not through a set of clones: the first clone of a name made from text turns
/// its bytes into a shared block that the route then keeps (24 bytes and a heap block per route).
fn first_of_each_name(pairs: Vec<(HeaderName, HeaderValue)>) -> Box<[(HeaderName, HeaderValue)]> {
    let mut kept: Vec<(HeaderName, HeaderValue)> = Vec::with_capacity(pairs.len());
    for (name, value) in pairs {
        if kept.iter().all(|(seen, _)| *seen != name) {
            kept.push((name, value));
        }
    }
    kept.into_boxed_slice()
}

/// The parentRefs of either route kind (their generated types differ but have the same fields).
macro_rules! route_parent_refs {
    ($refs:expr) => {
        parent_refs($refs, |r| {
            (
                r.group.as_ref(),
                r.kind.as_ref(),
                &r.name,
                r.namespace.as_ref(),
                r.port,
                r.section_name.as_ref(),
            )
        })
    };
}

/// Converts the fields every header-modifier type of the generated API has in common. Entries
/// that set or add a hop's own field ([`hop_field`]) are left out.
macro_rules! header_modifier {
    ($m:expr, $field:expr) => {{
        let m = $m;
        let field: &str = $field;
        let hop_fields_left_out = |pairs: Box<[(HeaderName, HeaderValue)]>| {
            pairs
                .into_vec()
                .into_iter()
                .filter(|(name, _)| !hop_field(name))
                .collect()
        };
        HeaderModifier {
            set: hop_fields_left_out(header_pairs!(m.set, format!("{field}.set"))),
            add: hop_fields_left_out(header_pairs!(m.add, format!("{field}.add"))),
            // Removing one is harmless (the agent frames what it sends) or wanted: `Upgrade`
            // removed turns WebSocket upgrades off for the rule.
            remove: m
                .remove
                .iter()
                .flatten()
                .enumerate()
                .map(|(i, n)| header_name(n, &format!("{field}.remove[{i}]")))
                .collect::<Result<_, _>>()?,
        }
    }};
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1). Not `Trailer`: it
/// is end to end (§6.6.2), and an HTTP/1.1 hop sends only the trailer fields it names.
/// Not `Proxy-Authenticate` either: it is for the client that chose the proxy (RFC 9110
/// §11.7.1), and the agent is no proxy its callers chose: a forward proxy's 407 behind a Service
/// must reach its caller with its challenge.
pub const HOP_BY_HOP: [HeaderName; 5] = [
    http::header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    http::header::TE,
    http::header::TRANSFER_ENCODING,
];

/// Fields of a hop, not of the message: Content-Length and Transfer-Encoding say where a
/// message ends, the agent writes them for the body it sends; the connection's own fields
/// ([`HOP_BY_HOP`], `Upgrade`) are each hop's. A header filter changes none of them. A length a
/// filter set beside a body of another length (none at all, for a GET) desynchronised the kept
/// connection to the backend that every caller's requests share, or the caller's own; a
/// `TE: gzip` went to HTTP/1.1 backends, whose gzip-coded answer nobody decoded.
fn hop_field(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name)
        || matches!(*name, http::header::CONTENT_LENGTH | http::header::UPGRADE)
}

/// A backendRef-like reference (`backendRefs[]` and `requestMirror.backendRef`).
macro_rules! backend_ref {
    ($r:expr, $weight:expr, $filters:expr, $field:expr) => {{
        let r = $r;
        let field: &str = $field;
        let weight: Option<i32> = $weight;
        let weight = match weight {
            None => 1,
            Some(w) if (0..=MAX_WEIGHT).contains(&w) => w as u32,
            Some(w) => {
                return Err(invalid(
                    format!("{field}.weight"),
                    format!("{w} is not in 0-{MAX_WEIGHT}"),
                ))
            }
        };
        let kind = GroupKind::new(
            r.group.as_deref().unwrap_or_default(),
            r.kind.as_deref().unwrap_or("Service"),
        );
        let port = port(r.port, &format!("{field}.port"))?;
        if kind == GroupKind::Service && port.is_none() {
            return Err(invalid(
                format!("{field}.port"),
                "port is required when the backend is a Service",
            ));
        }
        BackendRef::new(
            kind,
            r.namespace.as_deref().map(CompactString::from),
            r.name.as_str().into(),
            port,
            weight,
            $filters,
        )
    }};
}

/// The filter fields HTTPRoute and GRPCRoute share, for both rule and backendRef filter types.
macro_rules! common_filter {
    ($f:expr, $field:expr, $kind:ident) => {{
        let f = $f;
        let field: &str = $field;
        match f.r#type {
            $kind::RequestHeaderModifier => Filter::RequestHeaders(header_modifier!(
                f.request_header_modifier.as_ref().ok_or_else(|| invalid(
                    format!("{field}.requestHeaderModifier"),
                    "required for type RequestHeaderModifier"
                ))?,
                &format!("{field}.requestHeaderModifier")
            )),
            $kind::ResponseHeaderModifier => Filter::ResponseHeaders(header_modifier!(
                f.response_header_modifier.as_ref().ok_or_else(|| invalid(
                    format!("{field}.responseHeaderModifier"),
                    "required for type ResponseHeaderModifier"
                ))?,
                &format!("{field}.responseHeaderModifier")
            )),
            $kind::RequestMirror => {
                let m = f.request_mirror.as_ref().ok_or_else(|| {
                    invalid(
                        format!("{field}.requestMirror"),
                        "required for type RequestMirror",
                    )
                })?;
                let (numerator, denominator) = match (&m.fraction, m.percent) {
                    (Some(_), Some(_)) => {
                        return Err(invalid(
                            format!("{field}.requestMirror"),
                            "only one of percent and fraction may be set",
                        ))
                    }
                    (Some(fr), None) => (fr.numerator, fr.denominator.unwrap_or(100)),
                    (None, Some(p)) => (p, 100),
                    (None, None) => (100, 100),
                };
                if denominator < 1 || numerator < 0 || numerator > denominator {
                    return Err(invalid(
                        format!("{field}.requestMirror"),
                        "the mirrored share must be between 0 and 1",
                    ));
                }
                Filter::Mirror(
                    RequestMirror {
                        backend: backend_ref!(
                            &m.backend_ref,
                            None,
                            Box::default(),
                            &format!("{field}.requestMirror.backendRef")
                        ),
                        numerator: numerator as u32,
                        denominator: denominator as u32,
                    }
                    .into(),
                )
            }
            $kind::ExtensionRef => {
                let e = f.extension_ref.as_ref().ok_or_else(|| {
                    invalid(
                        format!("{field}.extensionRef"),
                        "required for type ExtensionRef",
                    )
                })?;
                Filter::Unsupported(format!("ExtensionRef {}/{} {}", e.group, e.kind, e.name))
            }
            #[allow(unreachable_patterns)]
            _ => return Err(ObjectError::Unreachable),
        }
    }};
}

macro_rules! path_modifier {
    ($p:expr, $field:expr, $kind:ident) => {{
        let p = $p;
        let field: &str = $field;
        match p.r#type {
            $kind::ReplaceFullPath => {
                let v = p.replace_full_path.clone().ok_or_else(|| {
                    invalid(
                        format!("{field}.replaceFullPath"),
                        "required for type ReplaceFullPath",
                    )
                })?;
                PathModifier::ReplaceFullPath(replacement_path(
                    v,
                    &format!("{field}.replaceFullPath"),
                )?)
            }
            $kind::ReplacePrefixMatch => {
                let v = p.replace_prefix_match.clone().ok_or_else(|| {
                    invalid(
                        format!("{field}.replacePrefixMatch"),
                        "required for type ReplacePrefixMatch",
                    )
                })?;
                PathModifier::ReplacePrefixMatch(replacement_path(
                    v,
                    &format!("{field}.replacePrefixMatch"),
                )?)
            }
        }
    }};
}

/// A path a rewrite or redirect puts in place (the CRD checks only its length): absolute, and a
/// path alone. `v2` would have made a redirect's Location `http://hostv2`, a space or a `?` a
/// request line that does not parse or carries two queries. Empty: the spec's prefix
/// replacement by nothing.
fn replacement_path(value: String, field: &str) -> Result<String, Invalid> {
    let is_path = value.is_empty()
        || (value.starts_with('/')
            && !value.contains(['?', '#'])
            && value.parse::<http::uri::PathAndQuery>().is_ok());
    if is_path {
        Ok(value)
    } else {
        Err(invalid(
            field,
            format!("`{value}` is not an absolute path (it must start with `/`, without a query, a fragment or characters a URL cannot carry)"),
        ))
    }
}

/// HTTPRoute filters (rule level and backendRef level have distinct but same-shaped generated types).
macro_rules! http_filter {
    ($f:expr, $field:expr, $kind:ident, $scheme:ident, $redirect_path:ident, $rewrite_path:ident) => {{
        let f = $f;
        let field: &str = $field;
        match f.r#type {
            $kind::RequestRedirect => {
                let r = f.request_redirect.as_ref().ok_or_else(|| {
                    invalid(
                        format!("{field}.requestRedirect"),
                        "required for type RequestRedirect",
                    )
                })?;
                let status = match r.status_code.unwrap_or(302) {
                    s @ (301 | 302 | 303 | 307 | 308) => s as u16,
                    s => {
                        return Err(invalid(
                            format!("{field}.requestRedirect.statusCode"),
                            format!("{s} is not one of 301, 302, 303, 307, 308"),
                        ))
                    }
                };
                Filter::Redirect(
                    RequestRedirect {
                        scheme: r.scheme.as_ref().map(|s| match s {
                            $scheme::Http => "http".to_string(),
                            $scheme::Https => "https".to_string(),
                        }),
                        hostname: r.hostname.clone(),
                        port: port(r.port, &format!("{field}.requestRedirect.port"))?,
                        path: r
                            .path
                            .as_ref()
                            .map(|p| {
                                Ok::<_, Invalid>(path_modifier!(
                                    p,
                                    &format!("{field}.requestRedirect.path"),
                                    $redirect_path
                                ))
                            })
                            .transpose()?,
                        status,
                    }
                    .into(),
                )
            }
            $kind::UrlRewrite => {
                let r = f.url_rewrite.as_ref().ok_or_else(|| {
                    invalid(
                        format!("{field}.urlRewrite"),
                        "required for type URLRewrite",
                    )
                })?;
                Filter::Rewrite(
                    UrlRewrite {
                        hostname: r.hostname.clone(),
                        path: r
                            .path
                            .as_ref()
                            .map(|p| {
                                Ok::<_, Invalid>(path_modifier!(
                                    p,
                                    &format!("{field}.urlRewrite.path"),
                                    $rewrite_path
                                ))
                            })
                            .transpose()?,
                    }
                    .into(),
                )
            }
            $kind::Cors => {
                let c = f
                    .cors
                    .as_ref()
                    .ok_or_else(|| invalid(format!("{field}.cors"), "required for type CORS"))?;
                Filter::Cors(
                    cors_policy(
                        c.allow_origins.as_ref(),
                        c.allow_credentials.unwrap_or(false),
                        [&c.allow_methods, &c.allow_headers, &c.expose_headers],
                        c.max_age,
                        &format!("{field}.cors"),
                    )?
                    .into(),
                )
            }
            $kind::ExternalAuth => Filter::Unsupported("ExternalAuth".to_string()),
            _ => common_filter!(f, field, $kind),
        }
    }};
}

/// A CORS filter's fields (the rule's and the backendRef's generated types differ); `lists` are
/// allowMethods, allowHeaders, exposeHeaders.
fn cors_policy(
    origins: Option<&Vec<String>>,
    allow_credentials: bool,
    lists: [&Option<Vec<String>>; 3],
    max_age: Option<i32>,
    field: &str,
) -> Result<CorsPolicy, Invalid> {
    let allow_origins = indexed(origins, &format!("{field}.allowOrigins"), |o, at| {
        AllowedOrigin::parse(o).ok_or_else(|| {
            invalid(
                at,
                format!("`{o}` is not `*` nor an origin `http(s)://host[:port]`"),
            )
        })
    })?;
    let max_age = match max_age {
        // The CRD's default.
        None => 5,
        Some(age) if age >= 1 => age as u32,
        Some(_) => return Err(invalid(format!("{field}.maxAge"), "must be at least 1")),
    };
    let [methods, headers, expose] = lists.map(|l| l.clone().unwrap_or_default());
    Ok(CorsPolicy {
        allow_origins,
        allow_credentials,
        allow_methods: methods,
        allow_headers: headers,
        expose_headers: expose,
        max_age,
    })
}

/// The rules of an HTTPRoute or a GRPCRoute: their generated types differ (hence a macro), the
/// conversion does not. Each rule's matches (`match`, or `when no match` if it has none), filters
/// (a filter macro with the generated filter types), backendRefs with their filters, and
/// `timeouts and retry` (a function of the rule and its field path).
macro_rules! route_rules {
    (
        $rules:expr,
        match: $convert_match:expr,
        when no match: $any:expr,
        filter: $filter:ident!($($rule_types:ident),+),
        backend filter: $backend_filter:ident!($($backend_types:ident),+),
        timeouts and retry: $timeouts_and_retry:expr
    ) => {{
        let mut rules = Vec::new();
        for (i, rule) in $rules.into_iter().flatten().enumerate() {
            let field = format!("spec.rules[{i}]");
            let field = field.as_str();
            let name: Option<Box<str>> = rule.name.as_deref().map(Into::into);
            let mut matches =
                match indexed(rule.matches.as_ref(), &format!("{field}.matches"), $convert_match) {
                    Ok(matches) => matches,
                    Err(e) => {
                        rules.push(Rule::dropped(name, OneOrMany::default(), &e));
                        continue;
                    }
                };
            let matches: OneOrMany<RouteMatch> = if matches.is_empty() {
                OneOrMany::One($any())
            } else {
                matches.drain(..).collect()
            };
            let rest = (|| {
                let filters = indexed(rule.filters.as_ref(), &format!("{field}.filters"), |f, at| {
                    Ok($filter!(f, at, $($rule_types),+))
                })?;
                let backends =
                    indexed(rule.backend_refs.as_ref(), &format!("{field}.backendRefs"), |b, at| {
                        let filters = indexed(b.filters.as_ref(), &format!("{at}.filters"), |f, at| {
                            Ok($backend_filter!(f, at, $($backend_types),+))
                        })?;
                        Ok(backend_ref!(b, b.weight, filters.into(), at))
                    })?;
                let (timeouts, retry) = $timeouts_and_retry(rule, field)?;
                Ok::<_, Invalid>((filters, backends, timeouts, retry))
            })();
            rules.push(match rest {
                Ok((filters, backends, timeouts, retry)) => checked_rule(
                    Rule {
                        matches,
                        filters: (!filters.is_empty())
                            .then(|| Box::new(filters.into_boxed_slice())),
                        backends: backends.into_iter().collect(),
                        options: RuleOptions {
                            name,
                            timeouts,
                            retry,
                            ..RuleOptions::NONE
                        }
                        .shared(),
                    },
                    field,
                ),
                Err(e) => Rule::dropped(name, matches, &e),
            });
        }
        rules
    }};
}

/// A route's namespace and name, and the rest of its metadata.
fn meta(
    m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Result<(ObjectKey, Meta), Invalid> {
    let name = m
        .name
        .clone()
        .ok_or_else(|| invalid("metadata.name", "required"))?;
    let key = ObjectKey::new(
        m.namespace.clone().unwrap_or_else(|| "default".to_string()),
        name,
    );
    let meta = Meta {
        uid: m.uid.as_deref().map(Into::into),
        generation: m.generation.unwrap_or(1),
        created: m.creation_timestamp.as_ref().map(|t| t.0.as_second()),
    };
    Ok((key, meta))
}

/// Checks on the whole route: rule and match counts (the CRD refuses more).
fn check_rules(rules: &[Rule]) -> Result<(), Invalid> {
    if rules.len() > MAX_RULES {
        return Err(invalid(
            "spec.rules",
            format!(
                "at most {MAX_RULES} rules are allowed, found {}",
                rules.len()
            ),
        ));
    }
    let total: usize = rules.iter().map(|r| r.matches.len()).sum();
    if total > 128 {
        return Err(invalid(
            "spec.rules",
            format!("at most 128 matches in all rules are allowed, found {total}"),
        ));
    }
    Ok(())
}

/// The rule when its filter combination and match counts are allowed, else its dropped stand-in.
fn checked_rule(rule: Rule, field: &str) -> Rule {
    match check_rule(&rule, field) {
        Ok(()) => rule,
        Err(e) => Rule::dropped(rule.name().map(Into::into), rule.matches, &e),
    }
}

/// The CRD's rules for one list of filters, a rule's or a backendRef's (its CEL, which a
/// manifest folder does not run): each kind at most once, a redirect never with a rewrite.
fn check_filter_list(filters: &[Filter], field: &str) -> Result<(), Invalid> {
    let count = |pred: fn(&Filter) -> bool| filters.iter().filter(|f| pred(f)).count();
    let redirects = count(|f| matches!(f, Filter::Redirect(_)));
    let rewrites = count(|f| matches!(f, Filter::Rewrite(_)));
    for (what, n) in [
        ("RequestRedirect", redirects),
        ("URLRewrite", rewrites),
        ("CORS", count(|f| matches!(f, Filter::Cors(_)))),
        (
            "RequestHeaderModifier",
            count(|f| matches!(f, Filter::RequestHeaders(_))),
        ),
        (
            "ResponseHeaderModifier",
            count(|f| matches!(f, Filter::ResponseHeaders(_))),
        ),
    ] {
        if n > 1 {
            return Err(invalid(field, format!("{what} may appear at most once")));
        }
    }
    if redirects > 0 && rewrites > 0 {
        return Err(invalid(
            field,
            "RequestRedirect and URLRewrite cannot be combined",
        ));
    }
    Ok(())
}

fn check_rule(rule: &Rule, field: &str) -> Result<(), Invalid> {
    if rule.matches.len() > MAX_MATCHES_PER_RULE {
        return Err(invalid(
            format!("{field}.matches"),
            format!("at most {MAX_MATCHES_PER_RULE} matches are allowed"),
        ));
    }
    check_filter_list(rule.filters(), &format!("{field}.filters"))?;
    for (i, backend) in rule.backends.iter().enumerate() {
        check_filter_list(
            backend.filters(),
            &format!("{field}.backendRefs[{i}].filters"),
        )?;
    }
    let redirects = rule
        .filters()
        .iter()
        .any(|f| matches!(f, Filter::Redirect(_)));
    if redirects && !rule.backends.is_empty() {
        return Err(invalid(
            field,
            "RequestRedirect filter must not be used together with backendRefs",
        ));
    }
    let uses_prefix_replace = rule
        .filters()
        .iter()
        .chain(rule.backends.iter().flat_map(|b| b.filters()))
        .any(|f| {
            matches!(
                f,
                Filter::Redirect(r) if matches!(r.path, Some(PathModifier::ReplacePrefixMatch(_)))
            ) || matches!(
                f,
                Filter::Rewrite(r) if matches!(r.path, Some(PathModifier::ReplacePrefixMatch(_)))
            )
        });
    // A backendRef's filters run after the rule's, on the request they made: a second path
    // rewrite's ReplacePrefixMatch no longer finds the matched prefix and prepended its value to
    // the whole path (`/foo/bar` through `/v2` then `/api` became `/api/v2/bar`), and a redirect's
    // Location took the rewritten path and host where the spec takes the request's.
    let rewrites_path = |filters: &[Filter]| {
        filters
            .iter()
            .any(|f| matches!(f, Filter::Rewrite(r) if r.path.is_some()))
    };
    let rule_rewrites = rule
        .filters()
        .iter()
        .any(|f| matches!(f, Filter::Rewrite(_)));
    let redirects_in =
        |filters: &[Filter]| filters.iter().any(|f| matches!(f, Filter::Redirect(_)));
    let rule_rewrites_path = rewrites_path(rule.filters());
    let combined = rule.backends.iter().any(|b| {
        (rule_rewrites_path && rewrites_path(b.filters()))
            || (rule_rewrites && redirects_in(b.filters()))
    });
    if combined {
        return Err(invalid(
            format!("{field}.filters"),
            "a URLRewrite on the rule cannot be combined with a URLRewrite of the path, or a \
             RequestRedirect, on one of its backendRefs (the second would work on the first's \
             result); keep one",
        ));
    }
    if uses_prefix_replace
        && !(rule.matches.len() == 1 && matches!(rule.matches[0].path, PathMatch::Prefix(_)))
    {
        return Err(invalid(
            format!("{field}.filters"),
            "ReplacePrefixMatch requires exactly one match in the rule, with a PathPrefix path",
        ));
    }
    if rule
        .matches
        .iter()
        .any(|m| m.headers().count() > 16 || m.query_params().count() > 16)
    {
        return Err(invalid(
            format!("{field}.matches"),
            "at most 16 header or query parameter matches are allowed",
        ));
    }
    Ok(())
}

fn value_matches<H, N: MatchName>(
    list: Option<&Vec<H>>,
    field: &str,
    conv: impl Fn(&H) -> (&String, &String, bool),
) -> Result<Vec<ValueMatch<N>>, Invalid> {
    let mut out: Vec<ValueMatch<N>> = Vec::new();
    for (i, h) in list.into_iter().flatten().enumerate() {
        let (name, value, is_regex) = conv(h);
        let f = format!("{field}[{i}]");
        let name = N::parse(name, &f)?;
        // Only the first entry of a duplicated name counts (spec).
        if out.iter().any(|m| m.name == name) {
            continue;
        }
        let value = if is_regex {
            StringMatch::Regex(compile_regex(value, &f)?.into())
        } else {
            StringMatch::Exact(value.as_str().into())
        };
        out.push(ValueMatch { name, value });
    }
    Ok(out)
}

/// Converts each item of an optional list, naming it `{field}[i]` in errors.
fn indexed<T, U>(
    items: Option<&Vec<T>>,
    field: &str,
    mut convert: impl FnMut(&T, &str) -> Result<U, Invalid>,
) -> Result<Vec<U>, Invalid> {
    items
        .into_iter()
        .flatten()
        .enumerate()
        .map(|(i, item)| convert(item, &format!("{field}[{i}]")))
        .collect()
}

/// The route from its converted parts, once its rules are checked together. A route none of
/// whose rules converted is refused whole (its last good generation, if any, stays in use); one
/// with some valid rules is served with the others dropped.
fn assembled(
    id: Arc<RouteKey>,
    meta: Meta,
    parent_refs: Vec<ParentRef>,
    rules: Vec<Rule>,
) -> Result<Route, Invalid> {
    check_rules(&rules)?;
    if !rules.is_empty() && rules.iter().all(|r| r.invalid().is_some()) {
        let reasons: Vec<String> = rules
            .iter()
            .enumerate()
            .filter_map(|(i, r)| Some(format!("rule {i}: {}", r.invalid()?)))
            .collect();
        return Err(invalid(
            "spec.rules",
            format!("no rule is valid ({})", reasons.join("; ")),
        ));
    }
    Ok(Route {
        id,
        meta,
        parent_refs: parent_refs.into(),
        rules: rules.into_boxed_slice(),
    })
}

/// Converts a route with `convert`; when that fails but the route's identity is known, the error
/// carries a [`RefusedRoute`] for the route's status.
fn refusable(
    kind: RouteKind,
    metadata: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    parent_refs: Result<Vec<ParentRef>, Invalid>,
    convert: impl FnOnce(Arc<RouteKey>, Meta, Vec<ParentRef>) -> Result<Route, Invalid>,
) -> Result<Route, Invalid> {
    let (key, meta) = meta(metadata)?;
    let id = Arc::new(RouteKey { kind, key });
    let (uid, generation) = (meta.uid.clone(), meta.generation);
    let known_parents: Arc<[ParentRef]> = parent_refs.as_deref().unwrap_or_default().into();
    parent_refs
        .and_then(|refs| convert(id.clone(), meta, refs))
        .map_err(|error| {
            ObjectError::RouteRefused(Box::new(RefusedRoute {
                key: RouteKey::clone(&id),
                uid,
                generation,
                parent_refs: known_parents,
                reason: error.to_string(),
            }))
        })
}

/// A route the generated types cannot read (a field, a filter or a match type of CRDs newer than
/// the agent's, which an API server accepts): refused with `error`, its identity and parentRefs
/// read from the raw JSON, so that its status says why instead of nothing. `error` as it is when
/// not even those read.
pub fn undecodable_route(kind: RouteKind, raw: &serde_json::Value, error: Invalid) -> Invalid {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    let Ok(metadata) = serde_json::from_value::<ObjectMeta>(raw["metadata"].clone()) else {
        return error;
    };
    let refs = raw["spec"]["parentRefs"].clone();
    let not_read = |e: serde_json::Error| invalid("spec.parentRefs", e.to_string());
    let parent_refs = match kind {
        RouteKind::Http => {
            serde_json::from_value::<Option<Vec<http_api::HttpRouteParentRefs>>>(refs)
                .map_err(not_read)
                .and_then(|refs| route_parent_refs!(refs.as_ref()))
        }
        RouteKind::Grpc => serde_json::from_value::<Option<Vec<grpc::GrpcRouteParentRefs>>>(refs)
            .map_err(not_read)
            .and_then(|refs| route_parent_refs!(refs.as_ref())),
    };
    match refusable(kind, &metadata, parent_refs, |_, _, _| Err(error)) {
        Err(refused) => refused,
        Ok(_) => unreachable!("refused above"),
    }
}

/// An HTTPRoute; `raw` is its JSON, for the fields read from it directly (`model::session`).
pub fn http_route(route: &http_api::HttpRoute, raw: &serde_json::Value) -> Result<Route, Invalid> {
    let parent_refs = route_parent_refs!(route.spec.parent_refs.as_ref());
    refusable(
        RouteKind::Http,
        &route.metadata,
        parent_refs,
        |id, meta, refs| http_route_body(route, raw, id, meta, refs),
    )
}

/// The match of a GRPCRoute rule without matches: every method (ranked as the least specific).
fn any_grpc_method() -> RouteMatch {
    let least_specific = GrpcMethodSpecificity {
        service_len: 0,
        method_len: 0,
        pattern: false,
    };
    let RouteMatch { path, .. } = RouteMatch::any();
    RouteMatch::new(path, None, Vec::new(), Vec::new(), Some(least_specific))
}

fn http_route_body(
    route: &http_api::HttpRoute,
    raw: &serde_json::Value,
    id: Arc<RouteKey>,
    meta: Meta,
    parent_refs: Vec<ParentRef>,
) -> Result<Route, Invalid> {
    use http_api::*;
    // The CRD's default where `rules` is absent: one rule for every path, with no backendRefs
    // (its requests get 500, as through an API server, which writes the default in).
    let default_rules;
    let spec_rules = match &route.spec.rules {
        Some(rules) => rules,
        None => {
            default_rules = vec![HttpRouteRules::default()];
            &default_rules
        }
    };
    let mut rules = route_rules!(
        Some(spec_rules),
        match: http_match,
        when no match: RouteMatch::any,
        filter: http_filter!(
            HttpRouteRulesFiltersType,
            HttpRouteRulesFiltersRequestRedirectScheme,
            HttpRouteRulesFiltersRequestRedirectPathType,
            HttpRouteRulesFiltersUrlRewritePathType
        ),
        backend filter: http_filter!(
            HttpRouteRulesBackendRefsFiltersType,
            HttpRouteRulesBackendRefsFiltersRequestRedirectScheme,
            HttpRouteRulesBackendRefsFiltersRequestRedirectPathType,
            HttpRouteRulesBackendRefsFiltersUrlRewritePathType
        ),
        timeouts and retry: http_timeouts_and_retry
    );
    Rule::sessions_from(&mut rules, raw);
    assembled(id, meta, parent_refs, rules)
}

/// An HTTPRoute rule's `timeouts` and `retry` (GRPCRoute has neither).
fn http_timeouts_and_retry(
    rule: &http_api::HttpRouteRules,
    field: &str,
) -> Result<(Timeouts, Option<Retry>), Invalid> {
    let timeouts = match &rule.timeouts {
        None => Timeouts::default(),
        Some(t) => Timeouts {
            request: duration(t.request.as_ref(), &format!("{field}.timeouts.request"))?,
            backend_request: duration(
                t.backend_request.as_ref(),
                &format!("{field}.timeouts.backendRequest"),
            )?,
        },
    };
    if let (Some(req), Some(backend)) = (timeouts.request, timeouts.backend_request) {
        if backend > req {
            return Err(invalid(
                format!("{field}.timeouts.backendRequest"),
                "must not be greater than timeouts.request",
            ));
        }
    }
    let retry = rule
        .retry
        .as_ref()
        .map(|r| -> Result<Retry, Invalid> {
            let codes = r
                .codes
                .iter()
                .flatten()
                .map(|c| {
                    u16::try_from(*c)
                        .ok()
                        .filter(|c| (400..=599).contains(c))
                        .ok_or_else(|| {
                            invalid(
                                format!("{field}.retry.codes"),
                                format!("{c} is not in 400-599"),
                            )
                        })
                })
                .collect::<Result<_, _>>()?;
            let attempts = r.attempts.unwrap_or(1);
            Ok(Retry {
                attempts: u32::try_from(attempts).map_err(|_| {
                    invalid(format!("{field}.retry.attempts"), "must not be negative")
                })?,
                codes,
                backoff: duration(r.backoff.as_ref(), &format!("{field}.retry.backoff"))?,
            })
        })
        .transpose()?;
    Ok((timeouts, retry))
}

fn http_match(m: &http_api::HttpRouteRulesMatches, mf: &str) -> Result<RouteMatch, Invalid> {
    use http_api::*;
    let path = match &m.path {
        None => PathMatch::Prefix("/".into()),
        Some(p) => {
            let value = p.value.clone().unwrap_or_else(|| "/".to_string());
            match p
                .r#type
                .clone()
                .unwrap_or(HttpRouteRulesMatchesPathType::PathPrefix)
            {
                HttpRouteRulesMatchesPathType::Exact => {
                    PathMatch::Exact(matched_path(value, &format!("{mf}.path.value"))?.into())
                }
                HttpRouteRulesMatchesPathType::PathPrefix => {
                    let prefix = matched_path(value, &format!("{mf}.path.value"))?;
                    let mut kept = CompactString::from(prefix.trim_end_matches('/'));
                    if prefix.ends_with('/') {
                        kept.push('/');
                    }
                    PathMatch::Prefix(kept)
                }
                HttpRouteRulesMatchesPathType::RegularExpression => {
                    PathMatch::Regex(compile_regex(&value, &format!("{mf}.path.value"))?.into())
                }
            }
        }
    };
    let headers = value_matches(m.headers.as_ref(), &format!("{mf}.headers"), |h| {
        (
            &h.name,
            &h.value,
            matches!(
                h.r#type,
                Some(HttpRouteRulesMatchesHeadersType::RegularExpression)
            ),
        )
    })?;
    let query_params = value_matches(m.query_params.as_ref(), &format!("{mf}.queryParams"), |h| {
        (
            &h.name,
            &h.value,
            matches!(
                h.r#type,
                Some(HttpRouteRulesMatchesQueryParamsType::RegularExpression)
            ),
        )
    })?;
    let method = m.method.as_ref().map(|m| {
        serde_json::to_value(m)
            .ok()
            .and_then(|v| {
                v.as_str()
                    .and_then(|s| Method::from_bytes(s.as_bytes()).ok())
            })
            .unwrap_or(Method::GET)
    });
    Ok(RouteMatch::new(path, method, headers, query_params, None))
}

/// A GRPCRoute; `raw` is its JSON, for the fields read from it directly (`model::session`).
pub fn grpc_route(route: &grpc::GrpcRoute, raw: &serde_json::Value) -> Result<Route, Invalid> {
    let parent_refs = route_parent_refs!(route.spec.parent_refs.as_ref());
    refusable(
        RouteKind::Grpc,
        &route.metadata,
        parent_refs,
        |id, meta, refs| grpc_route_body(route, raw, id, meta, refs),
    )
}

fn grpc_route_body(
    route: &grpc::GrpcRoute,
    raw: &serde_json::Value,
    id: Arc<RouteKey>,
    meta: Meta,
    parent_refs: Vec<ParentRef>,
) -> Result<Route, Invalid> {
    use grpc::*;
    let mut rules = route_rules!(
        route.spec.rules.as_ref(),
        match: grpc_match,
        when no match: any_grpc_method,
        filter: common_filter!(GrpcRouteRulesFiltersType),
        backend filter: common_filter!(GrpcRouteRulesBackendRefsFiltersType),
        timeouts and retry: |_, _| Ok((Timeouts::default(), None))
    );
    Rule::sessions_from(&mut rules, raw);
    assembled(id, meta, parent_refs, rules)
}

fn grpc_match(m: &grpc::GrpcRouteRulesMatches, mf: &str) -> Result<RouteMatch, Invalid> {
    use grpc::*;
    let (path, grpc) = match &m.method {
        None => (
            PathMatch::Prefix("/".into()),
            GrpcMethodSpecificity {
                service_len: 0,
                method_len: 0,
                pattern: false,
            },
        ),
        Some(gm) => {
            let is_regex = matches!(
                gm.r#type,
                Some(GrpcRouteRulesMatchesMethodType::RegularExpression)
            );
            if gm.service.is_none() && gm.method.is_none() {
                return Err(invalid(
                    format!("{mf}.method"),
                    "one or both of service and method must be specified",
                ));
            }
            // The CRD's patterns for an Exact match, which an API server enforces and a folder
            // of manifests does not: a service is a dotted name, a method an identifier.
            if !is_regex {
                if let Some(service) = gm.service.as_deref().filter(|s| !is_grpc_service(s)) {
                    return Err(invalid(
                        format!("{mf}.method.service"),
                        format!("`{service}` is not a gRPC service name (pkg.Service)"),
                    ));
                }
                if let Some(method) = gm.method.as_deref().filter(|m| !is_identifier(m)) {
                    return Err(invalid(
                        format!("{mf}.method.method"),
                        format!("`{method}` is not a gRPC method name"),
                    ));
                }
            }
            // A pattern's text is not characters it matches ("characters in a matching service",
            // GRPCRoute's precedence): counted as such, `pkg\.Svc` outranked `pkg.Svc`.
            let literal = |name: Option<&str>| if is_regex { 0 } else { characters(name) };
            let named = |name: Option<&str>| name.is_some_and(|n| !n.is_empty());
            // A fully qualified name's leading dot (`.pkg.Svc`, which the CRD allows) is not in
            // the request path a client sends (`/pkg.Svc/Method`): kept, nothing matched.
            let service = match gm.service.as_deref() {
                Some(s) if !is_regex => Some(s.strip_prefix('.').unwrap_or(s)),
                s => s,
            };
            let spec = GrpcMethodSpecificity {
                service_len: literal(service),
                method_len: literal(gm.method.as_deref()),
                pattern: is_regex && (named(service) || named(gm.method.as_deref())),
            };
            let path = match (is_regex, service, gm.method.as_deref()) {
                (false, Some(s), Some(m)) => PathMatch::Exact(format!("/{s}/{m}").into()),
                (false, Some(s), None) => PathMatch::Prefix(format!("/{s}").into()),
                (false, None, Some(m)) => PathMatch::Regex(
                    compile_regex(
                        &format!("/[^/]+/{}", regex::escape(m)),
                        &format!("{mf}.method"),
                    )?
                    .into(),
                ),
                (true, s, m) => {
                    // The spec: "If left empty or omitted, will match any service" (method alike).
                    // Anchors a user writes for the part alone (`^pkg\.Svc$`) are the parts'
                    // own bounds here: left in, `^` after `/` could never match.
                    fn any(part: Option<&str>) -> &str {
                        let part = part.map(|p| p.strip_prefix('^').unwrap_or(p));
                        let part = part.map(|p| match p.strip_suffix('$') {
                            Some(rest) if !rest.ends_with('\\') => rest,
                            _ => p,
                        });
                        part.filter(|p| !p.is_empty()).unwrap_or("[^/]+")
                    }
                    let (service, method) = (any(s), any(m));
                    check_regex(service, &format!("{mf}.service"))?;
                    check_regex(method, &format!("{mf}.method"))?;
                    PathMatch::Regex(
                        compile_regex(
                            &format!("/(?:{service})/(?:{method})"),
                            &format!("{mf}.method"),
                        )?
                        .into(),
                    )
                }
                (false, None, None) => unreachable!("checked above"),
            };
            (path, spec)
        }
    };
    let headers = value_matches(m.headers.as_ref(), &format!("{mf}.headers"), |h| {
        (
            &h.name,
            &h.value,
            matches!(
                h.r#type,
                Some(GrpcRouteRulesMatchesHeadersType::RegularExpression)
            ),
        )
    })?;
    Ok(RouteMatch::new(path, None, headers, Vec::new(), Some(grpc)))
}

impl Filter {
    /// The backendRef this filter sends traffic to (a mirror's), if any. Exhaustive on purpose: a
    /// new filter kind that sends traffic somewhere must say so here.
    pub fn sends_to(&self) -> Option<&BackendRef> {
        match self {
            Filter::Mirror(m) => Some(&m.backend),
            Filter::RequestHeaders(_)
            | Filter::ResponseHeaders(_)
            | Filter::Redirect(_)
            | Filter::Rewrite(_)
            | Filter::Cors(_)
            | Filter::Unsupported(_) => None,
        }
    }
}

/// `[A-Za-z_][A-Za-z_0-9]*`: the CRD's pattern for an Exact gRPC method.
fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// `(?i)\.?[a-z_][a-z_0-9]*(\.[a-z_][a-z_0-9]*)*`: the CRD's pattern for an Exact gRPC service.
fn is_grpc_service(name: &str) -> bool {
    let name = name.strip_prefix('.').unwrap_or(name);
    name.split('.').all(is_identifier)
}

/// The first filter of `filters` this mesh does not provide.
fn unsupported(filters: &[Filter]) -> Option<&str> {
    filters.iter().find_map(|f| match f {
        Filter::Unsupported(what) => Some(&**what),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Object;

    /// `ns/r` of `kind` with these `rules`, converted (`Err`: refused whole).
    fn converted(kind: &str, rules: serde_json::Value) -> Result<Route, String> {
        let object = Object::from_value(serde_json::json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": kind,
            "metadata": {"name": "r", "namespace": "ns"},
            "spec": {"rules": rules}
        }))
        .map_err(|refused| format!("{refused:?}"))?;
        let Object::Route(route) = object else {
            panic!("not a route")
        };
        Ok(route)
    }

    fn http_route(rules: serde_json::Value) -> Route {
        converted("HTTPRoute", rules).unwrap()
    }

    fn grpc_paths(method: serde_json::Value) -> PathMatch {
        let route = converted(
            "GRPCRoute",
            serde_json::json!([{"matches": [{"method": method}]}]),
        );
        route.unwrap().rules[0].matches[0].path.clone()
    }

    #[test]
    fn grpc_regex_with_an_empty_service_or_method_matches_any() {
        let path = grpc_paths(
            serde_json::json!({"type": "RegularExpression", "service": "", "method": "Get.*"}),
        );
        assert!(path.matches("/pkg.Catalog/GetItem"));
        assert!(!path.matches("/pkg.Catalog/ListItems"));
        let path = grpc_paths(
            serde_json::json!({"type": "RegularExpression", "service": "pkg\\..*", "method": ""}),
        );
        assert!(path.matches("/pkg.Catalog/ListItems"));
        assert!(!path.matches("/other.Catalog/ListItems"));
    }

    /// "The largest number of characters" ranks prefixes as written: `/foo/` outranks `/foo`
    /// (both stored `/foo` ranked them equal), while both match `/foo` and below.
    #[test]
    fn a_prefix_written_with_a_trailing_slash_outranks_the_same_without() {
        use crate::routes::precedence::Specificity;
        let route = http_route(serde_json::json!([
            {"matches": [{"path": {"type": "PathPrefix", "value": "/foo"}}]},
            {"matches": [{"path": {"type": "PathPrefix", "value": "/foo/"}}]},
            {"matches": [{"path": {"type": "PathPrefix", "value": "/"}}]},
            {}
        ]));
        let rank = |rule: usize| Specificity::of(&route.rules[rule].matches[0]);
        assert!(rank(1) > rank(0));
        assert_eq!(rank(2), rank(3), "an omitted path is PathPrefix /");
        for path in ["/foo", "/foo/", "/foo/x"] {
            assert!(route.rules[1].matches[0].path.matches(path), "{path}");
        }
        assert!(!route.rules[1].matches[0].path.matches("/foobar"));
        assert!(route.rules[2].matches[0].path.matches("/anything"));
    }

    /// A fully qualified service name (`.pkg.Catalog`, which the CRD allows) matches what
    /// clients send (`/pkg.Catalog/Get`): its leading dot is no part of the path.
    #[test]
    fn a_grpc_service_with_a_leading_dot_matches_its_calls() {
        for (method, call) in [
            (
                serde_json::json!({"service": ".pkg.Catalog", "method": "Get"}),
                "/pkg.Catalog/Get",
            ),
            (
                serde_json::json!({"service": ".pkg.Catalog"}),
                "/pkg.Catalog/List",
            ),
        ] {
            assert!(grpc_paths(method.clone()).matches(call), "{method} {call}");
        }
    }

    #[test]
    fn exact_grpc_names_follow_the_crds_patterns() {
        assert!(is_grpc_service("pkg.v1.Catalog") && is_grpc_service(".pkg.Catalog"));
        assert!(is_grpc_service("Catalog") && is_grpc_service("_x.y_2"));
        for bad in [
            "",
            "pkg..Catalog",
            "pkg.",
            "1pkg.Catalog",
            "pkg/Catalog",
            "pkg.Cat alog",
        ] {
            assert!(!is_grpc_service(bad), "{bad:?}");
        }
        assert!(is_identifier("GetItem") && is_identifier("_get2"));
        for bad in ["", "Get.Item", "2Get", "Get-Item"] {
            assert!(!is_identifier(bad), "{bad:?}");
        }
    }

    /// `HTTPHeader.name`: entries equivalent to an earlier one (names compare case-insensitively)
    /// MUST be ignored; the CRD's case-sensitive list key lets them through.
    #[test]
    fn a_header_named_again_in_another_case_is_ignored() {
        let route = http_route(
            serde_json::json!([{"filters": [{"type": "RequestHeaderModifier",
                "requestHeaderModifier": {
                    "set": [{"name": "X-Env", "value": "a"}, {"name": "x-env", "value": "b"}],
                    "add": [{"name": "x-add", "value": "1"}, {"name": "X-ADD", "value": "2"}]}}]}]),
        );
        let Filter::RequestHeaders(modifier) = &route.rules[0].filters()[0] else {
            panic!("{:?}", route.rules[0].filters())
        };
        let values = |pairs: &[(HeaderName, HeaderValue)]| {
            pairs
                .iter()
                .map(|(n, v)| format!("{n}={}", v.to_str().unwrap()))
                .collect::<Vec<_>>()
        };
        assert_eq!(values(&modifier.set), ["x-env=a"]);
        assert_eq!(values(&modifier.add), ["x-add=1"]);
    }

    /// `/config_dump` shows a parentRef as `kubectl get -o yaml` does (route status echoes it):
    /// unset fields left out, `sectionName`. It showed `section_name` and `port: null`.
    #[test]
    fn a_parent_ref_serializes_as_the_api_writes_it() {
        let parent = ParentRef {
            target: GroupKind::Service,
            namespace: None,
            name: "front".into(),
            port: None,
            section_name: Some("web".into()),
        };
        assert_eq!(
            serde_json::to_value(&parent).unwrap(),
            serde_json::json!({"group": "", "kind": "Service", "name": "front", "sectionName": "web"})
        );
    }

    #[test]
    fn header_modifier_values_lose_the_whitespace_around_them() {
        let route = http_route(
            serde_json::json!([{"filters": [{"type": "RequestHeaderModifier",
                "requestHeaderModifier": {"set": [{"name": "x-a", "value": " v 1\t"}]}}]}]),
        );
        let shown = serde_json::to_string(&route.rules[0]).unwrap();
        assert!(shown.contains("\"v 1\""), "{shown}");
    }

    /// A header filter does not set a hop's fields: its set and add entries for Content-Length,
    /// Transfer-Encoding and the connection's own fields are left out, the others kept, and
    /// every removal.
    #[test]
    fn header_modifiers_set_no_hop_fields() {
        let route = http_route(serde_json::json!([{"filters": [
            {"type": "RequestHeaderModifier", "requestHeaderModifier": {
                "set": [{"name": "Content-Length", "value": "40"}, {"name": "x-a", "value": "1"},
                        {"name": "TE", "value": "gzip"}, {"name": "Connection", "value": "close"}],
                "add": [{"name": "transfer-encoding", "value": "chunked"},
                        {"name": "Keep-Alive", "value": "timeout=5"}],
                "remove": ["content-length", "x-b", "upgrade"]}},
            {"type": "ResponseHeaderModifier", "responseHeaderModifier": {
                "set": [{"name": "content-length", "value": "2"}]}}]}]));
        let names = |pairs: &[(HeaderName, HeaderValue)]| -> Vec<String> {
            pairs.iter().map(|(n, _)| n.to_string()).collect()
        };
        let [Filter::RequestHeaders(request), Filter::ResponseHeaders(response)] =
            route.rules[0].filters()
        else {
            panic!("two header filters: {:?}", route.rules[0].filters());
        };
        assert_eq!(names(&request.set), ["x-a"]);
        assert!(request.add.is_empty() && response.set.is_empty());
        // Removing one is harmless or wanted (no Upgrade: no WebSocket for the rule).
        let removed: Vec<&str> = request.remove.iter().map(HeaderName::as_str).collect();
        assert_eq!(removed, ["content-length", "x-b", "upgrade"]);
    }

    /// Path values are kept in the form requests are matched in (RFC 3986 §6.2.2): written
    /// with lower-case escapes or an encoded unreserved character, they never matched.
    #[test]
    fn path_values_are_kept_as_requests_are_matched() {
        use super::super::path::normalize_path;
        let route = http_route(serde_json::json!([
            {"matches": [{"path": {"type": "Exact", "value": "/caf%c3%a9"}}]},
            {"matches": [{"path": {"type": "PathPrefix", "value": "/%7Euser/"}}]},
        ]));
        let path = |rule: usize| route.rules[rule].matches[0].path.clone();
        let dotted = http_route(serde_json::json!([
            {"matches": [{"path": {"type": "PathPrefix", "value": "/api/%2e%2E"}}]},
            {"matches": [{"path": {"type": "Exact", "value": "/x/%2E/y"}}]},
            {"matches": [{"path": {"type": "PathPrefix", "value": "/v1.2/%2e.x"}}]},
        ]));
        // Encoded dot segments are refused as written ones are (they collapsed the value to its
        // parent: `/api/%2e%2E` became `/`, a catch-all); a dot within a segment is no segment.
        let invalid: Vec<_> = dotted.rules.iter().map(|r| r.invalid().is_some()).collect();
        assert_eq!(invalid, [true, true, false]);
        for (rule, sent) in [
            (0, "/caf%c3%a9"),
            (0, "/caf%C3%A9"),
            (1, "/~user/x"),
            (1, "/%7euser"),
        ] {
            let normal = normalize_path(sent).unwrap_or_else(|| sent.to_string());
            assert!(path(rule).matches(&normal), "rule {rule}: {sent}");
        }
    }

    /// An unbalanced pattern closed our anchoring group early: `v1)|(.*` became
    /// `^(?:v1)|(.*)$`, which matches any value, and the rule caught every request.
    #[test]
    fn an_unbalanced_regex_drops_its_rule_instead_of_matching_anything() {
        let route = http_route(serde_json::json!([
            {"matches": [{"headers": [{"type": "RegularExpression", "name": "x-v", "value": "v1)|(.*"}]}]},
            {"matches": [{"path": {"type": "RegularExpression", "value": "/a)|(.*"}}]},
            {"matches": [{"headers": [{"type": "RegularExpression", "name": "x-v", "value": "v(1|2)"}]}]},
        ]));
        let invalid: Vec<_> = route.rules.iter().map(|r| r.invalid().is_some()).collect();
        assert_eq!(invalid, [true, true, false]);
        for part in ["service", "method"] {
            // Its only rule: the route is refused.
            let method = serde_json::json!({"type": "RegularExpression", part: "a)|(b"});
            let reason = converted(
                "GRPCRoute",
                serde_json::json!([{"matches": [{"method": method}]}]),
            )
            .unwrap_err();
            assert!(
                reason.contains(&format!("{part}`: invalid regular expression")),
                "{reason}"
            );
        }
    }

    /// GRPCRoute ranks by the characters of a matching service, then method: an Exact match's
    /// names, not a pattern's text, which would rank `pkg\.Svc` above the exact `pkg.Svc`.
    #[test]
    fn a_grpc_regex_ranks_below_exact_names() {
        use crate::routes::precedence::Specificity;
        let route = converted(
            "GRPCRoute",
            serde_json::json!([
                {"matches": [{"method": {"type": "RegularExpression", "service": "pkg\\.Svc", "method": "Get"}}]},
                {"matches": [{"method": {"service": "pkg.Svc", "method": "Get"}}]},
                {"matches": [{"method": {"service": "pkg.Svc"}}]},
            ]),
        )
        .unwrap();
        let rank = |rule: usize| Specificity::of(&route.rules[rule].matches[0]);
        assert!(rank(1) > rank(0), "an exact method over a pattern");
        assert!(rank(2) > rank(0), "an exact service over a pattern");
        let catch_all = converted("GRPCRoute", serde_json::json!([{"backendRefs": []}])).unwrap();
        assert!(
            rank(0) > Specificity::of(&catch_all.rules[0].matches[0]),
            "a pattern over no method match"
        );
    }

    #[test]
    fn grpc_regex_parts_may_carry_their_own_anchors() {
        let path = grpc_paths(serde_json::json!(
            {"type": "RegularExpression", "service": "^pkg\\.Catalog$", "method": "^Get.*"}
        ));
        assert!(path.matches("/pkg.Catalog/GetItem"));
        assert!(!path.matches("/pkg.Catalog/ListItems"));
        assert!(!path.matches("/pkg.CatalogX/GetItem"));
        let escaped_dollar = grpc_paths(serde_json::json!(
            {"type": "RegularExpression", "service": "pkg\\$", "method": "Get"}
        ));
        assert!(escaped_dollar.matches("/pkg$/Get"));
    }
}
