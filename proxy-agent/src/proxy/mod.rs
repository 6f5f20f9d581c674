//! The data plane: per connection, detect the protocol; per request, decide with the route
//! table, run the filters, pick a backend and an endpoint, forward over pooled connections.

//!
//! One file per concern: the listeners (`explicit`, `redirected`) share `accept` (the accept loop,
//! then protocol `detect`ion, then `serve` (HTTP) or opaque `tcp`); `socket` accepts, and joins
//! the reactor only with sockets that must wait; `io` wraps the transport, `drain` closes
//! gracefully; per request, `forward` (timeouts, retries) over `upstream` pools, `mirror`; `local`
//! is every answer the agent gives itself; `workers` runs a runtime per core.

mod accept;
pub mod affinity;
pub mod body;
mod caller;
pub mod detect;
pub mod drain;
pub mod explicit;
mod forward;
pub mod header_maps;
mod header_names;
pub mod io;
pub mod local;
mod mirror;
pub mod pump;
pub mod redirected;
pub mod serve;
mod socket;
mod tcp;
pub use caller::Caller;
pub use tcp::{defer_accept, refuse_fast_open};
pub mod upstream;
pub mod workers;

use crate::telemetry::access_log;
use crate::telemetry::metrics::Metrics;
use crate::telemetry::requests::{self, RequestSeries, SeriesKey, SeriesSlot};
use arc_swap::ArcSwap;
use body::{CallerBody, ProxyBody, RequestBody};
use gamma_engine::model::ObjectKey;
use gamma_engine::routes::session::Session;
use gamma_engine::routes::{
    Backend, CompiledRule, Decision, Frontend, Plan, RequestHead, Snapshot,
};
use http::{header, HeaderMap, HeaderValue, Method, Request, Response};
use http_body_util::BodyExt as _;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use local::LocalAnswer;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Knobs of the data plane.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    pub connect_timeout: Duration,
    /// Slowloris guard: the whole request head must arrive within this time.
    pub header_read_timeout: Duration,
    /// On a port that does not declare its protocol, how long to wait for a client's first bytes
    /// before treating the connection as opaque TCP (server-first protocols send nothing).
    /// Linkerd's order: a slow HTTP client must not be mistaken for opaque TCP.
    pub detect_timeout: Duration,
    /// How long a mirrored request may take, answer included; then it is abandoned.
    pub mirror_timeout: Duration,
    /// An opaque or upgraded connection that moves no byte for this long is closed; an HTTP/2
    /// client connection gets GOAWAY (HTTP/1.1 ones: `header_read_timeout` between requests).
    pub idle_timeout: Duration,
    /// How opaque and upgraded connections move their bytes.
    pub pump: pump::Carry,
    /// Client connections open at most; one more is closed as soon as accepted (and counted),
    /// so that clients cannot exhaust the agent's descriptors.
    pub max_connections: usize,
    /// How long an idle pooled HTTP/1.1 upstream connection is kept (`upstream::PoolTimeouts`).
    pub upstream_http1_idle_timeout: Duration,
    /// How long a pooled HTTP/2 upstream connection without a stream is kept.
    pub upstream_http2_idle_timeout: Duration,
    /// Mirrored requests in flight at most; more are dropped, never queued.
    pub max_mirrors_in_flight: usize,
    /// A request body is kept while it streams, up to this size, when a retry or a mirror may
    /// need it again (and a gRPC call's, for a refused stream's resends); a larger one is neither
    /// retried nor mirrored.
    pub max_buffered_body: usize,
    /// Request head size limit: a larger head gets 431. It is also the HTTP/1 read buffer (a
    /// head that does not fit gets 431, or 414 for a request line over 64 KiB, and a close;
    /// hyper needs at least 8 KiB) and the HTTP/2 header list size (CONTINUATION frames past it
    /// end the connection).
    pub max_header_bytes: usize,
    /// HTTP/1 header lines at most (more: 431).
    pub max_headers: usize,
    /// HTTP/2 streams a client may have open at once.
    pub h2_max_concurrent_streams: u32,
    /// Answer bytes the agent buffers per HTTP/2 stream for a caller that has not read them
    /// (however large the window it grants): what a caller that never reads can hold, per stream.
    pub h2_max_send_buffer: usize,
    /// The window each HTTP/2 caller stream opens for its request body: what the agent holds of
    /// a body its backend does not take yet.
    pub h2_stream_window: u32,
    /// HTTP/2 rapid reset guard (CVE-2023-44487): streams the client reset before they were
    /// served, waiting in the accept queue; past it the connection gets GOAWAY
    /// ENHANCE_YOUR_CALM.
    pub h2_max_pending_accept_reset_streams: usize,
    /// HTTP/2 guard against clients that make the server reset streams (protocol errors) over
    /// and over; past it the connection gets GOAWAY ENHANCE_YOUR_CALM.
    pub h2_max_local_error_reset_streams: usize,
}

/// How long a connect to an endpoint may take: past Linux's first SYN retransmit (at 1 s) with
/// room for its answer, so that one dropped SYN (an accept queue full for a moment, a packet
/// lost between nodes) costs a second, as it does a direct client, not the connection. At 1 s the
/// retransmit never won against the timer: the caller got a failure and the endpoint an
/// ejection.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_millis(2_000);

impl ProxyConfig {
    /// The window of an HTTP/2 caller connection: what the agent holds of the bodies of all its
    /// streams, as many as they may be, each its window, so that streams whose backends read
    /// slowly stall themselves, never the connection's other streams (RFC 9113 §5.2). Below
    /// that (linkerd2-proxy's 1 MiB under 64 KiB per stream), 16 uploads to a paused backend
    /// took the whole window, and every other call on the gRPC channel waited for its body to
    /// be read. 16 MiB by default: a caller can have the agent hold that much of its request
    /// bodies only while their backends do not read them.
    pub fn h2_connection_window(&self) -> u32 {
        // h2's largest window (RFC 9113 §6.9.1).
        const MAX_WINDOW: u32 = (1 << 31) - 1;
        self.h2_stream_window
            .saturating_mul(self.h2_max_concurrent_streams)
            .min(MAX_WINDOW)
    }

    /// hyper's HTTP/2 server as the agent serves callers with this configuration (the hyper
    /// floor of `bench peers` serves with the same).
    pub fn h2_server(&self) -> hyper::server::conn::http2::Builder<TokioExecutor> {
        let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .max_concurrent_streams(self.h2_max_concurrent_streams)
            .max_send_buf_size(self.h2_max_send_buffer)
            .initial_stream_window_size(self.h2_stream_window)
            .initial_connection_window_size(self.h2_connection_window())
            .max_header_list_size(u32::try_from(self.max_header_bytes).unwrap_or(u32::MAX))
            .max_pending_accept_reset_streams(self.h2_max_pending_accept_reset_streams)
            .max_local_error_reset_streams(self.h2_max_local_error_reset_streams);
        builder
    }
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            header_read_timeout: Duration::from_secs(10),
            detect_timeout: Duration::from_secs(10),
            mirror_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(24 * 3600),
            pump: pump::Carry::Splice,
            max_connections: 100_000,
            upstream_http1_idle_timeout: upstream::PoolTimeouts::DEFAULT_HTTP1_IDLE,
            upstream_http2_idle_timeout: upstream::PoolTimeouts::DEFAULT_HTTP2_IDLE,
            max_mirrors_in_flight: 256,
            max_buffered_body: 64 * 1024,
            // Envoy's default is 60 KiB; 64 KiB keeps what this agent accepted so far.
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            // hyper's default is 200, Go's 250, nginx's 128: with the send buffer below, a
            // caller that reads nothing holds at most about 50 MiB per connection (and 16 MiB
            // more of request bodies its backends do not read, `h2_connection_window`).
            h2_max_concurrent_streams: 256,
            // hyper's default is 400 KiB: 1024 unread streams on one connection held 400 MiB.
            // 64 KiB beside the socket's own buffer still fills a loopback or LAN pipe.
            h2_max_send_buffer: 64 * 1024,
            // hyper's defaults are 1 MiB each: one upload to a slow backend took the connection's
            // whole window, and every other request body on it waited (a gRPC channel's calls).
            // The connection's window is every stream's (`h2_connection_window`).
            h2_stream_window: 64 * 1024,
            // h2's defaults at the time of writing, spelled out so an h2 upgrade cannot loosen
            // them silently.
            h2_max_pending_accept_reset_streams: 20,
            h2_max_local_error_reset_streams: 1024,
        }
    }
}

/// Where a connection was going.
#[derive(Clone, Debug)]
pub enum Destination {
    /// An explicit listener: a named Service port.
    Service { service: ObjectKey, port: u16 },
    /// A redirected connection: its original destination (a ClusterIP and port), and the Service
    /// that had it when the connection was accepted.
    Address {
        addr: SocketAddr,
        service: Option<ObjectKey>,
    },
}

impl Destination {
    /// A redirected connection's requests go to the Service it was accepted for: its ClusterIP,
    /// given to another Service since, is not that one's (kube-proxy's conntrack keeps an
    /// established flow on its endpoint). Its next request then finds no frontend: 503, close.
    pub fn hold_to(&mut self, frontend: &Frontend) {
        if let Destination::Address { service, .. } = self {
            service.get_or_insert_with(|| frontend.service.clone());
        }
    }
}

#[derive(Clone, Debug)]
pub struct ConnectionInfo {
    pub destination: Destination,
    pub caller: Caller,
}

pub struct Proxy {
    pub snapshot: Arc<ArcSwap<Snapshot>>,
    pub upstream: upstream::Upstream,
    pub metrics: Arc<Metrics>,
    pub config: ProxyConfig,
    mirrors: mirror::Mirrors,
    /// Opaque and upgraded connections, the agent's (all workers'): a successor takes them over.
    pub pumps: Arc<pump::Pumps>,
    /// On a data-plane worker: the workers' open connections, to spread new ones evenly.
    pub load: Option<workers::Loads>,
    /// Services whose connections fell to opaque TCP after a sniffing timeout, already logged.
    sniff_timeouts_logged: Arc<std::sync::Mutex<ahash::AHashSet<ObjectKey>>>,
}

impl Proxy {
    pub fn new(
        snapshot: Arc<ArcSwap<Snapshot>>,
        metrics: Arc<Metrics>,
        config: ProxyConfig,
    ) -> Arc<Self> {
        Arc::new(Proxy {
            snapshot,
            upstream: upstream::Upstream::new(
                upstream::PoolTimeouts {
                    connect: config.connect_timeout,
                    http1_idle: config.upstream_http1_idle_timeout,
                    http2_idle: config.upstream_http2_idle_timeout,
                },
                metrics.affinity_table_full.clone(),
            ),
            mirrors: mirror::Mirrors::new(config.max_mirrors_in_flight),
            pumps: pump::Pumps::counted(config.idle_timeout, config.pump, metrics.pumps.clone()),
            metrics,
            config,
            load: None,
            sniff_timeouts_logged: Arc::default(),
        })
    }

    /// This proxy for one data-plane worker: its own upstream connection pools and its place
    /// among the workers' loads, everything else shared.
    pub fn for_worker(&self, load: workers::Loads) -> Arc<Self> {
        Arc::new(Proxy {
            snapshot: self.snapshot.clone(),
            upstream: self.upstream.with_own_pools(),
            mirrors: self.mirrors.clone(),
            pumps: self.pumps.clone(),
            metrics: self.metrics.clone(),
            config: self.config.clone(),
            load: Some(load),
            sniff_timeouts_logged: self.sniff_timeouts_logged.clone(),
        })
    }

    /// Forgets what was logged once for Services gone from `snapshot`: one made again under the
    /// same name gets its warning again, and short-lived Services (preview namespaces) leave
    /// nothing behind.
    pub fn forget_gone_services(&self, snapshot: &Snapshot) {
        let mut logged = self.sniff_timeouts_logged.lock().expect("not poisoned");
        logged.retain(|service| snapshot.by_service.contains_key(service));
    }

    /// Logs, once per Service, that its connections fell to opaque TCP after sniffing timed out:
    /// its routes do not apply to them. The lock is taken only on that path.
    fn sniff_timed_out(&self, frontend: &Frontend) {
        let mut logged = self.sniff_timeouts_logged.lock().expect("not poisoned");
        if logged.insert(frontend.service.clone()) {
            tracing::warn!(
                service = %frontend.service,
                port = frontend.port,
                after = ?self.config.detect_timeout,
                "a client sent nothing within the sniffing timeout: its connection is passed \
                 through as opaque TCP, without routes. Declare the port's protocol \
                 (appProtocol: http or kubernetes.io/h2c for HTTP, tcp for server-first \
                 protocols) so that it is not sniffed; logged once per Service"
            );
        }
    }

    pub fn frontend<'s>(
        &self,
        snapshot: &'s Snapshot,
        destination: &Destination,
    ) -> Option<&'s Arc<Frontend>> {
        match destination {
            Destination::Service { service, port } => snapshot.frontend_of(service, *port),
            Destination::Address { addr, service } => snapshot
                .frontend_at(*addr)
                .filter(|f| service.as_ref().is_none_or(|s| f.service == *s)),
        }
    }

    /// Handles one request end to end; never fails: errors become local responses. `draining`:
    /// the connection's agent is draining, and refuses what would turn the connection into a
    /// relay (an upgrade, CONNECT): a successor takes over only the relays running when it said
    /// Stop, and one made later would be reset at the drain's deadline; refused, the client
    /// connects again, to the successor.
    #[allow(clippy::manual_async_fn)] // see below
    pub fn handle<'s, 'c>(
        self: &'s Arc<Self>,
        mut request: Request<CallerBody>,
        conn: &'c ConnectionInfo,
        draining: bool,
    ) -> impl Future<Output = Response<ProxyBody>> + use<'s, 'c> {
        // Not an `async fn`, as `forward` is not.
        async move {
            let snapshot = self.snapshot.load_full();
            // A caller the table did not know when its connection came may be known now (its Pod
            // reached the agent since): its namespace's routes apply from this request on.
            let conn = conn.as_known_in(&snapshot);
            let mut log = AccessLog::new(&request, conn, &self.metrics);
            let grpc = is_grpc(&request);
            let head = request.method() == http::Method::HEAD;
            let version = request.version();
            let local_response = |local: &LocalAnswer, log: &mut AccessLog<'_>| {
                local_response(local, grpc, head, log, &self.metrics)
            };
            let refused =
                check_request_head(&request, self.config.max_header_bytes).and_then(|()| {
                    if draining && forward::becomes_relay(&request) {
                        Err(LocalAnswer::Draining)
                    } else {
                        Ok(())
                    }
                });
            let mut response = match refused {
                Err(refused) => {
                    let mut response = local_response(&refused, &mut log);
                    // Like hyper's own refusals: the client is confused, do not wait for more from
                    // it. On HTTP/2 the refused stream is enough: a GOAWAY would cut the other
                    // callers' streams on the connection short of new ones.
                    if version < http::Version::HTTP_2 {
                        close_after(&mut response, version);
                    }
                    response
                }
                Ok(()) => {
                    absolute_form_names_the_host(&mut request);
                    normalize_path(&mut request);
                    let frontend = self.frontend(&snapshot, &conn.destination);
                    match self
                        .proxy_frontend(frontend.map(|f| &**f), request, conn, grpc, &mut log)
                        .await
                    {
                        Ok(response) => response,
                        Err((local, rule, cors)) => {
                            let mut response = local_response(&local, &mut log);
                            let closes = match local {
                                // The Service went (or its port, or its address) while the
                                // connection stayed: the client's next one is made to wherever its
                                // name leads now.
                                LocalAnswer::UnknownFrontend(_) => true,
                                // The rest of the body is not read (RFC 9110 §15.5.9); on HTTP/2
                                // only its stream ends.
                                LocalAnswer::RequestBodyTimeout(_) => {
                                    version < http::Version::HTTP_2
                                }
                                _ => false,
                            };
                            if closes {
                                close_after(&mut response, version);
                            }
                            if grpc && version == http::Version::HTTP_2 && local.unprocessed() {
                                // gRPC clients send a refused stream again by themselves (gRPC's
                                // transparent retry), not a call answered UNAVAILABLE.
                                response.extensions_mut().insert(RefuseStream);
                                // Logged and counted with the status a plain caller would get; the
                                // call did not end (the client sends it again), so it is not
                                // counted in gamma_grpc_calls_total.
                                *response.status_mut() = local.status();
                            }
                            gamma_engine::routes::cors::add_to_answer(cors, response.headers_mut());
                            for modifier in
                                rule.into_iter().flat_map(|r| r.response_header_modifiers())
                            {
                                modifier.apply(response.headers_mut());
                            }
                            response
                        }
                    }
                }
            };
            log.status = response.status().as_u16();
            let series = log.finish();
            if grpc && response.extensions().get::<RefuseStream>().is_none() {
                // A trailers-only answer ends the call in its head; others in their trailers, but
                // for an HTTP error, which a client reads as a status of its own.
                let head_status = body::grpc_status(response.headers())
                    .or_else(|| body::grpc_status_of_http(response.status()));
                match head_status {
                    Some(status) => series.grpc.record(status),
                    None => {
                        let counts = series.grpc.clone();
                        response =
                            response.map(|b| body::CountGrpcStatus::new(b, counts).boxed_unsync());
                    }
                }
            }
            response
        }
    }

    /// Routes one request to `frontend`. A local answer comes back with the rule it was given
    /// for, if any, and the CORS filter's headers if it ran: that rule's response filters apply
    /// to it.
    #[allow(clippy::manual_async_fn)] // see below
    fn proxy_frontend<'s, 'f, 'c, 'l>(
        self: &'s Arc<Self>,
        frontend: Option<&'f Frontend>,
        request: Request<CallerBody>,
        conn: &'c ConnectionInfo,
        grpc: bool,
        log: &'l mut AccessLog<'f>,
    ) -> impl Future<Output = Result<Response<ProxyBody>, Unforwarded<'f>>> + use<'s, 'f, 'c, 'l>
    {
        // Not an `async fn`, as `forward` is not.
        async move {
            let Some(frontend) = frontend else {
                let unknown = LocalAnswer::UnknownFrontend(format!("{:?}", conn.destination));
                return Err((unknown, None, HeaderMap::new()));
            };
            log.frontend = Some(frontend);
            log.series = Some(SeriesSlot::One(&frontend.series));
            let (mut parts, body) = request.into_parts();
            let decision = frontend.lookup(
                conn.caller.namespace.as_deref(),
                &RequestHead::from_parts(&parts),
            );
            let (rule, matched) = match decision {
                Decision::Direct(backend) => {
                    log.backend = Some(backend);
                    log.series = Some(SeriesSlot::One(&frontend.direct_series));
                    let body = RequestBody::new(body, grpc, self.config.max_buffered_body);
                    let target = forward::Target {
                        backend,
                        pinned: None,
                    };
                    return forward::forward(self, target, parts, body, None, grpc, log)
                        .await
                        .map_err(|local| (local, None, HeaderMap::new()));
                }
                Decision::NoMatchingRule => {
                    let service = requests::service_label(frontend);
                    return Err((LocalAnswer::NoMatchingRule(service), None, HeaderMap::new()));
                }
                Decision::Rule { rule, matched } => (rule, matched),
            };
            log.rule = Some(rule);
            log.series = Some(SeriesSlot::Rule {
                rule,
                backend: None,
            });
            let random = rand::random::<u64>();
            // A persisted session goes back to its endpoint's backendRef, whatever the weights say.
            // The clock is read only for rules with session persistence.
            let session_policy = rule
                .session()
                .map(|policy| (policy, crate::telemetry::unix_now()));
            let resumed = session_policy
                .and_then(|(policy, now)| policy.resume(&parts.headers, now))
                .and_then(|session| {
                    let began = session.backend.map(usize::from);
                    Some((session, rule.backend_serving(session.endpoint, began)?))
                });
            let backend = resumed.map(|(_, index)| index);
            // The caller's connection options go before the route's filters run: a header a filter
            // sets is the route's, whatever the caller's `Connection` names (RFC 9110 §7.6.1 is about
            // the fields received).
            forward::strip_request_hop_by_hop(&mut parts);
            let mut plan = match rule.plan_to(&mut parts, matched, frontend.port, random, backend) {
                Plan::Respond(local, cors) => return Err((local.into(), Some(rule), cors)),
                Plan::Forward(plan) => plan,
            };
            log.backend = Some(plan.backend);
            log.series = Some(SeriesSlot::Rule {
                rule,
                backend: Some(plan.backend_index),
            });
            let backend_index = plan.backend_index;
            // A gRPC call's body is kept too (up to the limit, as it streams), for the resends of a
            // stream its backend refuses unprocessed (`forward`): gRPC servers refuse new calls
            // past their limit while behind on the last ones, and the stream's first attempt has
            // sent the body into it by then.
            let keep_body = grpc || rule.retry().is_some() || !plan.mirrors.is_empty();
            let body = RequestBody::new(body, keep_body, self.config.max_buffered_body);
            let mirrors = std::mem::take(&mut plan.mirrors);
            self.mirrors.send(self, mirrors, parts.version, &body);
            let target = forward::Target {
                backend: plan.backend,
                pinned: resumed.map(|(session, _)| session.endpoint),
            };
            let cors = std::mem::take(&mut plan.cors_headers);
            let mut response =
                match forward::forward(self, target, parts, body, Some(rule), grpc, log).await {
                    Ok(response) => response,
                    Err(local) => return Err((local, Some(rule), cors)),
                };
            if let (Some((policy, now)), Some(endpoint)) = (session_policy, log.endpoint) {
                let started = resumed
                    .filter(|(session, _)| session.endpoint == endpoint)
                    .map_or(now, |(session, _)| session.started.min(now));
                let session = Session {
                    endpoint,
                    backend: u16::try_from(backend_index)
                        .ok()
                        .filter(|_| rule.endpoint_is_shared(endpoint)),
                    started,
                    last_used: now,
                };
                let (name, value) = policy.offer(&session);
                response.headers_mut().append(name, value);
            }
            gamma_engine::routes::cors::add_to_answer(cors, response.headers_mut());
            for modifier in plan.response_headers {
                modifier.apply(response.headers_mut());
            }
            Ok(response)
        }
    }
}

/// A request the agent answers itself: why, the rule whose response filters apply, and the CORS
/// filter's headers for an allowed origin.
type Unforwarded<'f> = (LocalAnswer, Option<&'f CompiledRule>, HeaderMap);

/// What hyper lets through but the agent refuses before routing:
/// - a head over `max_header_bytes` (431): hyper's HTTP/1 limit is its read buffer, which one read
///   can overshoot by up to a buffer's worth, so the exact limit is enforced here, for both
///   protocols;
/// - a request target that is not a path (400): hyper also accepts authority-form (`GET host`)
///   for any method and absolute-form with any scheme, which would be routed on one path and
///   sent upstream with another (fuzzing found both). RFC 9112 §3.2: origin-form or absolute-form
///   `http(s)://`, authority-form for CONNECT only, asterisk-form for OPTIONS only.
pub fn check_request_head<B>(
    request: &Request<B>,
    max_header_bytes: usize,
) -> Result<(), LocalAnswer> {
    let size = head_size(request);
    if size > max_header_bytes {
        return Err(LocalAnswer::HeadTooLarge {
            size,
            limit: max_header_bytes,
        });
    }
    let uri = request.uri();
    let target_ok = match *request.method() {
        // Authority form only (RFC 9112 §3.2.3); HTTP/2 CONNECT is not relayed (below).
        Method::CONNECT => uri.scheme().is_none() && uri.authority().is_some(),
        // `OPTIONS * HTTP/1.1`, or `:path *` with a scheme and `:authority` (RFC 9113 §8.3.1).
        Method::OPTIONS if uri.path() == "*" && uri.query().is_none() => true,
        _ => {
            uri.path().starts_with('/')
                && uri.scheme_str().is_none_or(|s| s == "http" || s == "https")
        }
    };
    if !target_ok {
        return Err(LocalAnswer::BadTarget(uri.to_string()));
    }
    if request.method() == Method::CONNECT && request.version() != http::Version::HTTP_11 {
        return Err(LocalAnswer::UnsupportedMethod(
            "CONNECT over HTTP/2 (HTTP/1.1 CONNECT is tunnelled)",
        ));
    }
    // RFC 9112 §3.2: two that a route and the backend could each read differently, in any
    // version; none in HTTP/1.1. None is taken from a target in absolute form, which names the
    // host (as nginx does; its Host would be replaced by it anyway, §3.2.2).
    let mut hosts = request.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    let count = host.map_or(0, |_| 1 + hosts.count());
    let needs_host = request.version() == http::Version::HTTP_11 && uri.authority().is_none();
    if count > 1 || (count == 0 && needs_host) {
        return Err(LocalAnswer::BadHost(count));
    }
    // §3.2: a Host with an invalid value gets 400 (`a b`, `svc/x`): routed, it matched no
    // hostname as written, and the backend got the endpoint's address as its authority. Empty
    // is allowed (a target without an authority).
    if let Some(host) = host {
        if !is_host(host.as_bytes()) {
            let said = String::from_utf8_lossy(host.as_bytes()).into_owned();
            return Err(LocalAnswer::HostNotAnAuthority(said));
        }
    }
    // RFC 9112 §6.1: a transfer coding the agent does not implement gets 501. hyper reads the
    // body as chunked whenever the last coding is, and the agent forwards it re-chunked without
    // the other codings: `gzip, chunked` would reach the backend as gzip bytes with nothing to
    // say so. Only `chunked` alone is taken, as Go's server and nginx take it.
    let mut codings = request.headers().get_all(header::TRANSFER_ENCODING).iter();
    if let Some(first) = codings.next() {
        let chunked = first
            .as_bytes()
            .trim_ascii()
            .eq_ignore_ascii_case(b"chunked");
        if !chunked || codings.next().is_some() {
            let all = request.headers().get_all(header::TRANSFER_ENCODING).iter();
            let said: Vec<_> = all.map(|v| String::from_utf8_lossy(v.as_bytes())).collect();
            return Err(LocalAnswer::UnknownTransferCoding(said.join(", ")));
        }
    }
    Ok(())
}

/// The bytes of a host's name or address (RFC 3986 §3.2.2: unreserved, sub-delims, and `%` of
/// pct-encoded), looked up: every request's Host is checked.
const HOST_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = matches!(
            b as u8,
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'%' | b'!'
                | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b';' | b'='
        );
        b += 1;
    }
    table
};

/// Whether `value` is a Host field's: `uri-host [ ":" port ]` (RFC 9112 §3.2; RFC 3986
/// §3.2.2: a name of unreserved, percent-encoded and sub-delim characters, or a bracketed IPv6
/// literal), or empty. Checked in place: an `http::uri::Authority` would copy it, an allocation
/// per request.
fn is_host(value: &[u8]) -> bool {
    let (host, port) = match value.first() {
        Some(b'[') => match value.iter().position(|&b| b == b']') {
            Some(end) => (&value[1..end], &value[end + 1..]),
            None => return false,
        },
        _ => match value.iter().rposition(|&b| b == b':') {
            Some(colon) => (&value[..colon], &value[colon..]),
            None => (value, &value[value.len()..]),
        },
    };
    let port_ok = match port.split_first() {
        None => true,
        Some((b':', digits)) => digits.iter().all(u8::is_ascii_digit),
        Some(_) => false,
    };
    let bracketed = value.first() == Some(&b'[');
    // Bracketed: an IPv6 address, with a zone (RFC 6874, `%25eth0`), or an IPvFuture one.
    let host_ok = host
        .iter()
        .all(|&b| HOST_BYTES[usize::from(b)] || (bracketed && b == b':'));
    // Empty only as a whole: `:80` names no host (RFC 9110 §4.2.1).
    let empty_host = host.is_empty() && (bracketed || !port.is_empty());
    port_ok && host_ok && !empty_host
}

/// The size of a request head as HTTP/1.1 spells it (request line, `name: value` lines).
fn head_size<B>(request: &Request<B>) -> usize {
    let uri = request.uri();
    let target = uri.scheme_str().map_or(0, |s| s.len() + 3)
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path_and_query().map_or(0, |p| p.as_str().len());
    // "METHOD target HTTP/1.1\r\n"
    let line = request.method().as_str().len() + target + 12;
    let headers: usize = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    line + headers
}

/// A gRPC request (`content-type: application/grpc`, `application/grpc+proto`, …), whatever the
/// route kind that carries it. Not gRPC-Web (`application/grpc-web…`): its status travels in
/// the body, where a browser can read it, never in HTTP trailers, so the agent's own answers
/// and endings in gRPC's form would not reach it; it is answered as HTTP.
fn is_grpc<B>(request: &Request<B>) -> bool {
    request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.as_bytes().strip_prefix(b"application/grpc"))
        .is_some_and(|rest| matches!(rest.first(), None | Some(b'+' | b';')))
}

/// An HTTP/1 request in absolute form (`GET http://a/x`) is for the target's authority, whatever
/// its Host says (RFC 9112 §3.2.2): routes match, and the backend gets, that one. An HTTP/2
/// request's `:authority` likewise replaces a Host field sent beside it (RFC 9113 §8.3.1); it
/// stays in the URI, where HTTP/2 requests carry it.
fn absolute_form_names_the_host<B>(request: &mut Request<B>) {
    if request.version() >= http::Version::HTTP_2 {
        if request.uri().authority().is_some() {
            request.headers_mut().remove(header::HOST);
        }
        return;
    }
    let Some(authority) = request.uri().authority() else {
        return;
    };
    // Without userinfo, which a Host never carries.
    let host = match authority.port() {
        Some(port) => format!("{}:{port}", authority.host()),
        None => authority.host().to_owned(),
    };
    if let Ok(host) = HeaderValue::from_str(&host) {
        request.headers_mut().insert(header::HOST, host);
    }
}

/// Routes match, and the backend gets, the request's path as RFC 3986 says it is equivalent
/// ([`gamma_engine::routes::matches::normalize_path`]): what a backend resolves it to.
fn normalize_path<B>(request: &mut Request<B>) {
    let Some(normal) = gamma_engine::routes::matches::normalize_path(request.uri().path()) else {
        return;
    };
    if let Some(uri) = gamma_engine::routes::filters::with_path(request.uri(), &normal) {
        *request.uri_mut() = uri;
    }
}

/// Ends the connection after this answer: HTTP/1 by `Connection: close`; HTTP/2, which forbids
/// the header, by a graceful GOAWAY the connection's server sends when it sees [`CloseAfter`].
fn close_after(response: &mut Response<ProxyBody>, version: http::Version) {
    if version < http::Version::HTTP_2 {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    } else {
        response.extensions_mut().insert(CloseAfter);
    }
}

/// Marks an HTTP/2 answer to be sent as RST_STREAM REFUSED_STREAM instead: the request was not
/// processed, and the caller may send it again (RFC 9113 §8.7).
#[derive(Clone, Copy, Debug)]
pub struct RefuseStream;

/// Marks an HTTP/2 answer after which the connection is to end gracefully (GOAWAY: streams in
/// flight finish, the client opens new ones on a new connection).
#[derive(Clone, Copy, Debug)]
pub struct CloseAfter;

/// The agent's own answer: for a gRPC caller a trailers-only gRPC status (HTTP 200, no body),
/// for the others the HTTP status with the reason as text; to a HEAD, only the text's length
/// (hyper's HTTP/2 server would send the body as DATA, which clients refuse).
fn local_response(
    local: &LocalAnswer,
    grpc: bool,
    head: bool,
    log: &mut AccessLog<'_>,
    metrics: &Metrics,
) -> Response<ProxyBody> {
    metrics.local_answer(local.reason());
    let reason = local.to_string();
    if let Some(status) = local.grpc_status().filter(|_| grpc) {
        let mut response = Response::new(body::empty());
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert("grpc-status", HeaderValue::from_static(status.code()));
        if let Ok(message) = HeaderValue::from_str(&local::grpc_message(&reason)) {
            headers.insert("grpc-message", message);
        }
        log.reason = Some(reason);
        return response;
    }
    if let Some(headers) = local.headers() {
        // A CORS preflight: its headers are the answer.
        let mut response = Response::new(body::empty());
        *response.headers_mut() = headers.clone();
        return response;
    }
    let text = format!("{reason}\n");
    let mut response = if head {
        let mut response = Response::new(body::empty());
        response
            .headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(text.len()));
        response
    } else {
        Response::new(body::full(text))
    };
    log.reason = Some(reason);
    *response.status_mut() = local.status();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if let Some(location) = local.location().and_then(|l| HeaderValue::from_str(l).ok()) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    response
}

/// One structured line per request, and its count in the request series. It refers to what the
/// request was routed with; labels are spelled only for a log line that is written, or the
/// first request of a series.
/// A request's access log line and its count in the request series, written when its answer's
/// head is ready (`finish`), or when the request is dropped unanswered: its caller went away
/// (HTTP/2 RST_STREAM, a closed connection), counted as status 499 (nginx's "client closed
/// request") so that cancelled calls, often the slowest, are not missing from the series.
pub(crate) struct AccessLog<'a> {
    started: Instant,
    metrics: &'a Metrics,
    finished: bool,
    /// Whether its line is written (`RUST_LOG`): asked once per request.
    pub written: bool,
    grpc: bool,
    method: http::Method,
    uri: http::Uri,
    conn: &'a ConnectionInfo,
    pub frontend: Option<&'a Frontend>,
    pub rule: Option<&'a CompiledRule>,
    pub backend: Option<&'a Backend>,
    /// Where the request counts: the slot of the last of the above it reached.
    pub series: Option<SeriesSlot<'a>>,
    pub endpoint: Option<SocketAddr>,
    pub status: u16,
    pub attempts: u32,
    pub upstream_duration: Option<Duration>,
    pub reason: Option<String>,
}

impl<'a> AccessLog<'a> {
    fn new<B>(request: &Request<B>, conn: &'a ConnectionInfo, metrics: &'a Metrics) -> Self {
        AccessLog {
            started: Instant::now(),
            metrics,
            finished: false,
            written: access_log::enabled(),
            grpc: is_grpc(request),
            method: request.method().clone(),
            // Cheap: the parts of a parsed URI are reference-counted.
            uri: request.uri().clone(),
            conn,
            frontend: None,
            rule: None,
            backend: None,
            series: None,
            endpoint: None,
            status: 0,
            attempts: 0,
            upstream_duration: None,
            reason: None,
        }
    }

    /// The labels of this request's series.
    fn key(&self) -> SeriesKey {
        SeriesKey {
            service: self
                .frontend
                .map(requests::service_label)
                .unwrap_or_default(),
            route: self.rule.map(requests::route_label).unwrap_or_default(),
            backend: self.backend.map(Backend::name).unwrap_or_default(),
        }
    }

    /// Writes the line and counts the request; returns its series.
    fn finish(mut self) -> &'a RequestSeries {
        let series = self.write();
        self.finished = true;
        series
    }

    fn write(&self) -> &'a RequestSeries {
        let duration = self.started.elapsed();
        let slot = self
            .series
            .unwrap_or(SeriesSlot::One(&self.metrics.unrouted));
        let series = self.metrics.requests.attached(slot, || self.key());
        series.record(self.status, duration);
        if self.written {
            self.write_line(&series.key, duration);
        }
        series
    }

    /// The access log's line; its Service, route and backend as the series shows them.
    fn write_line(&self, key: &SeriesKey, duration: Duration) {
        use access_log::Value::{Endpoint, Ip, Number, Shown, Str};
        let caller = &self.conn.caller;
        let [service, route, backend] = key.shown();
        let micros = |d: Duration| d.as_micros() as u64;
        access_log::write(&[
            (
                "caller_namespace",
                Str(caller.namespace.as_deref().unwrap_or("-")),
            ),
            (
                "caller_pod",
                caller.pod.as_deref().map_or(Ip(caller.ip), Shown),
            ),
            ("caller_identity", Str(caller.identity)),
            ("method", Shown(self.method.as_str())),
            ("path", Str(self.uri.path())),
            ("service", Str(service)),
            ("route", Str(route)),
            ("backend", Str(backend)),
            ("endpoint", self.endpoint.map_or(Shown("-"), Endpoint)),
            ("status", Number(self.status.into())),
            ("attempts", Number(self.attempts.into())),
            ("duration_us", Number(micros(duration))),
            (
                "upstream_us",
                Number(self.upstream_duration.map_or(0, micros)),
            ),
            ("reason", Str(self.reason.as_deref().unwrap_or("-"))),
        ]);
    }
}

/// What a request dropped before its answer counts as.
const CALLER_WENT_AWAY: u16 = 499;

impl Drop for AccessLog<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.status = CALLER_WENT_AWAY;
            self.reason = Some("the caller went away before the answer".into());
            let series = self.write();
            if self.grpc {
                series.grpc.record(1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_is_a_name_or_literal_and_an_optional_port() {
        for good in [
            "",
            "front",
            "front:80",
            "front.ns.svc.cluster.local:8080",
            "10.96.0.10",
            "[fd00::1]",
            "[fd00::1]:80",
            "a_b",
            "host:",
            "xn--bcher-kva.example",
            "[fe80::1%25eth0]:8080",
            "[v1.fe80::a+b]",
            "FRONT.example.",
        ] {
            assert!(is_host(good.as_bytes()), "{good:?}");
        }
        for bad in [
            "a b",
            "svc/x",
            "a?b",
            "a#b",
            "user@host",
            "a:b:c",
            "[fd00::1",
            "[]:80",
            "[fd00::1]x",
            "host:8o",
            "a\tb",
            ":80",
            "caf\u{e9}.example",
        ] {
            assert!(!is_host(bad.as_bytes()), "{bad:?}");
        }
    }

    #[test]
    fn grpc_is_told_by_its_content_type_and_grpc_web_is_not_grpc() {
        let typed = |content_type: &str| {
            is_grpc(
                &Request::post("/s/m")
                    .header(header::CONTENT_TYPE, content_type)
                    .body(())
                    .unwrap(),
            )
        };
        for grpc in [
            "application/grpc",
            "application/grpc+proto",
            "application/grpc;v=1",
        ] {
            assert!(typed(grpc), "{grpc}");
        }
        for not in [
            "application/grpc-web",
            "application/grpc-web+proto",
            "application/grpc-web-text",
            "application/grpcx",
            "application/json",
        ] {
            assert!(!typed(not), "{not}");
        }
    }

    #[test]
    fn head_size_counts_the_head_as_http1_spells_it() {
        let request = Request::get("/abc?d=1")
            .header("host", "x")
            .header("x-a", "12345")
            .body(())
            .unwrap();
        let spelled = "GET /abc?d=1 HTTP/1.1\r\nhost: x\r\nx-a: 12345\r\n";
        assert_eq!(head_size(&request), spelled.len());
        let absolute = Request::get("http://front:80/x").body(()).unwrap();
        assert_eq!(
            head_size(&absolute),
            "GET http://front:80/x HTTP/1.1\r\n".len()
        );
    }

    #[test]
    fn request_targets_that_are_not_paths_are_refused() {
        let check = |method: &str, target: &str| {
            let request = Request::builder()
                .method(method)
                .uri(target)
                .header("host", "front.ns")
                .body(())
                .unwrap();
            check_request_head(&request, 1024).map_err(|e| e.status().as_u16())
        };
        for (method, target) in [
            ("GET", "/x?y"),
            ("GET", "http://front.ns/x"),
            ("GET", "https://front.ns?q"),
            ("OPTIONS", "*"),
            ("CONNECT", "front.ns:80"),
        ] {
            assert_eq!(check(method, target), Ok(()), "{method} {target}");
        }
        // Found by the route_match fuzz target (fuzz/corpus/route_match/regression-*).
        for (method, target) in [
            ("GET", "hx"),
            ("GET", "-htAtp://front.ns?:80/api/x"),
            ("GET", "*"),
            ("POST", "front.ns:80"),
        ] {
            assert_eq!(check(method, target), Err(400), "{method} {target}");
        }
        let long = format!("/{}", "a".repeat(1024));
        assert_eq!(check("GET", &long), Err(431));
        // HTTP/2's asterisk form: `:path *` with a scheme and an authority (RFC 9113 §8.3.1).
        let h2 = Request::options("http://front.ns*")
            .version(http::Version::HTTP_2)
            .body(())
            .unwrap();
        assert_eq!(
            check_request_head(&h2, 1024).map_err(|e| e.status().as_u16()),
            Ok(())
        );
    }

    #[test]
    fn a_request_has_one_host_and_an_http1_1_request_exactly_one() {
        let check = |version: http::Version, hosts: &[&str]| {
            let mut request = Request::get("/x").version(version);
            for host in hosts {
                request = request.header("host", *host);
            }
            check_request_head(&request.body(()).unwrap(), 1024).map_err(|e| e.status().as_u16())
        };
        use http::Version;
        assert_eq!(check(Version::HTTP_11, &["a"]), Ok(()));
        assert_eq!(check(Version::HTTP_11, &[]), Err(400));
        assert_eq!(check(Version::HTTP_11, &["a", "b"]), Err(400));
        assert_eq!(check(Version::HTTP_10, &[]), Ok(()), "HTTP/1.0 may omit it");
        assert_eq!(check(Version::HTTP_2, &[]), Ok(()), ":authority instead");
        assert_eq!(check(Version::HTTP_10, &["a", "b"]), Err(400));
        assert_eq!(check(Version::HTTP_2, &["a", "b"]), Err(400));
        let absolute = Request::get("http://front.ns/x").body(()).unwrap();
        assert_eq!(
            check_request_head(&absolute, 1024).map_err(|e| e.status().as_u16()),
            Ok(()),
            "absolute form names the host"
        );
    }
}

#[cfg(test)]
mod logged_once {
    use super::*;

    /// What was logged once for a Service is forgotten when it goes: made again, it gets its
    /// warning again, and short-lived Services leave nothing behind.
    #[test]
    fn a_gone_services_warning_is_forgotten() {
        let snapshot = crate::test_dir::snapshot_of(crate::test_dir::FRONT);
        let front = snapshot
            .frontend_of(&ObjectKey::new("ns", "front"), 80)
            .unwrap()
            .clone();
        let proxy = Proxy::new(
            Arc::new(ArcSwap::new(snapshot.clone())),
            Arc::new(Metrics::default()),
            ProxyConfig::default(),
        );
        proxy.sniff_timed_out(&front);
        proxy.forget_gone_services(&snapshot);
        assert_eq!(
            proxy.sniff_timeouts_logged.lock().unwrap().len(),
            1,
            "still there"
        );
        proxy.forget_gone_services(&Snapshot::default());
        assert!(proxy.sniff_timeouts_logged.lock().unwrap().is_empty());
    }
}

#[cfg(test)]
mod future_sizes {
    use super::*;

    fn proxy() -> Arc<Proxy> {
        let snapshot = Arc::new(ArcSwap::from_pointee(Snapshot::default()));
        Proxy::new(
            snapshot,
            Arc::new(Metrics::default()),
            ProxyConfig::default(),
        )
    }

    fn connection() -> ConnectionInfo {
        ConnectionInfo {
            destination: Destination::Address {
                addr: "10.0.0.1:80".parse().unwrap(),
                service: None,
            },
            caller: Caller {
                ip: "10.0.0.2".parse().unwrap(),
                namespace: None,
                pod: None,
                identity: "test",
                unverified: None,
            },
        }
    }

    /// A request's future is boxed and moved into its box per request, and each future it
    /// awaits is moved into it: rare paths (hyper's exchange) are boxed apart, and the functions
    /// on the path are not `async fn`s (which hold their arguments twice), so that it stays small
    /// (6,000 bytes before the rare paths were boxed; 3,528 after, grown to 4,064 by 2026-12-07;
    /// 3,464 without the `async fn`s).
    #[tokio::test]
    async fn a_request_future_stays_under_3_5_kib() {
        let (proxy, conn) = (proxy(), connection());
        let request = Request::new(CallerBody::Whole(bytes::Bytes::new()));
        let size = std::mem::size_of_val(&proxy.handle(request, &conn, false));
        assert!(size <= 3584, "the request's future grew to {size} bytes");
    }

    /// An answer to hyper's server (HTTP/2, HTTP/1.1 with bodies) is the request's future in
    /// [`serve::unless_caller_resets`], boxed per request: it holds the request's future once
    /// (as an `async fn`, twice: 8,240 bytes for a request's 4,064).
    #[tokio::test]
    async fn watching_for_a_reset_holds_the_request_future_once() {
        let (proxy, conn) = (proxy(), connection());
        let request = Request::new(CallerBody::Whole(bytes::Bytes::new()));
        let handling = proxy.handle(request, &conn, false);
        let alone = std::mem::size_of_val(&handling);
        let watched = serve::unless_caller_resets(Some(0), Duration::from_secs(1), handling);
        let size = std::mem::size_of_val(&watched);
        assert!(
            size <= alone + 64,
            "{size} bytes for a request future of {alone}"
        );
    }

    /// A connection's future is allocated and moved into its task at each accept, and held while
    /// the connection idles: what only some connections or requests need (hyper's server, HTTP/2,
    /// the opaque pump, a request in flight) is boxed apart, so that it stays small (2,504 bytes
    /// in a release build, 2,536 in this profile).
    #[tokio::test]
    async fn a_connection_future_stays_under_3_kib() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let drain = drain::Drain::default();
        let stream = io::Lingering::new(accepted, drain.watch(), drain.tracker.clone());
        let proxy = proxy();
        let serving =
            accept::serve_connection(&proxy, stream, Arc::new(connection()), drain.watch());
        let size = std::mem::size_of_val(&serving);
        assert!(size <= 3072, "the connection's future grew to {size} bytes");
    }
}
