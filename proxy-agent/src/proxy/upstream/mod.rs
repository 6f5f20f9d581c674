//! Upstream side: pooled HTTP/1.1 and HTTP/2 (h2c) connections, and endpoint choice.
//!
//! Endpoint choice is the power of two choices on in-flight requests: pick two endpoints at
//! random, send to the one with fewer requests in flight. An endpoint whose connection just
//! failed, or whose last few requests all failed without an answer, is skipped for a short while
//! (if any other is left).

pub(super) mod inline;
pub(super) mod wire;

use super::affinity::Affinity;
use super::body::{self, ProxyBody};
use ahash::AHashMap;
use gamma_engine::routes::backends::Backend;
use gamma_engine::routes::Attached;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::future::Future as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// How long an endpoint that refused a connection is avoided.
const EJECTION: Duration = Duration::from_secs(5);

/// Requests in a row that got no answer from an endpoint (reset, closed before answering, no
/// answer in time) before it is avoided like one that refuses connections. Envoy's outlier
/// detection uses 5 consecutive gateway failures; a node agent sees few requests per endpoint,
/// so it gives up sooner. A single failure is not enough: a pooled connection the endpoint
/// closed just as a request went out fails once without anything being wrong.
pub const CONSECUTIVE_FAILURES: u32 = 3;

/// HTTP/1.1 connections kept per endpoint and worker, at most, idle or in use (one more is
/// closed after its answer).
const HTTP1_IDLE_PER_ENDPOINT: usize = 256;

/// Why an upstream exchange got no answer.
#[derive(Clone, Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No connection could be made: nothing was sent.
    #[error("{0}")]
    Connect(String),
    /// No connection could be made for want of the agent's own resources (descriptors, local
    /// ports, memory): nothing was sent, and the endpoint is not to blame.
    #[error("{0}")]
    AgentShort(String),
    /// The request was (perhaps partly) sent, and no answer came.
    #[error("{0}")]
    Failed(String),
    /// The backend reset the HTTP/2 stream with this error code before answering.
    #[error("{1}")]
    Reset(u32, String),
    /// The endpoint declined the request before processing any of it (HTTP/2 REFUSED_STREAM,
    /// or a GOAWAY that leaves it out): it may be sent again (RFC 9113 §8.7). `on_error`: the
    /// endpoint ended its connection on an error (a GOAWAY with an error code), which counts
    /// against it as a failure does.
    #[error("{error}")]
    Declined { error: String, on_error: bool },
}

/// Both upstream protocols' connection pools. Each data-plane worker has its own
/// (`with_own_pools`), so a request and its upstream connection live on one thread; the
/// endpoints' in-flight counts and ejections are the agent's, shared.
#[derive(Clone)]
pub struct Upstream {
    /// The agent's own HTTP/1.1 exchanges, for requests without a body.
    pub(super) inline: inline::InlinePool,
    /// hyper's HTTP/1.1 client, for requests with a body and upgrades.
    http1: Http1Pool,
    http2: Http2Pool,
    pub endpoints: Arc<EndpointStats>,
    /// Shared by every worker, like the endpoint statistics.
    pub affinity: Arc<Affinity>,
    timeouts: PoolTimeouts,
}

/// How long the pools wait for a connect, and keep an idle connection.
#[derive(Clone, Copy, Debug)]
pub struct PoolTimeouts {
    /// How long a connect may take before the next endpoint is tried.
    pub connect: Duration,
    /// How long an idle HTTP/1.1 connection is kept.
    pub http1_idle: Duration,
    /// How long an HTTP/2 connection without a stream is kept.
    pub http2_idle: Duration,
}

impl PoolTimeouts {
    /// Below the keep-alive of the usual backends (Node's, uvicorn's and Apache's: 5 s) so that
    /// the agent closes an idle HTTP/1.1 connection first: a request written as the backend
    /// closes fails, and only an idempotent one may be sent again (linkerd keeps 3 s for the
    /// same reason; Envoy's hour is the classic "503 UC" of meshes in front of Node).
    pub const DEFAULT_HTTP1_IDLE: Duration = Duration::from_secs(3);
    /// An HTTP/2 backend closes with a GOAWAY that hands back the streams it did not take, which
    /// go again: no race to avoid, and a handshake to save.
    pub const DEFAULT_HTTP2_IDLE: Duration = Duration::from_secs(90);
}

impl Upstream {
    /// `affinity_full` counts callers session affinity could not bind (table full).
    pub fn new(timeouts: PoolTimeouts, affinity_full: Arc<AtomicU64>) -> Self {
        Self::with_endpoints(
            timeouts,
            Arc::new(EndpointStats::default()),
            Arc::new(Affinity::new(affinity_full)),
        )
    }

    /// New, empty connection pools; the same endpoint statistics and session affinity.
    pub fn with_own_pools(&self) -> Self {
        Self::with_endpoints(self.timeouts, self.endpoints.clone(), self.affinity.clone())
    }

    fn with_endpoints(
        timeouts: PoolTimeouts,
        endpoints: Arc<EndpointStats>,
        affinity: Arc<Affinity>,
    ) -> Self {
        Upstream {
            inline: inline::InlinePool::new(timeouts.connect, timeouts.http1_idle),
            http1: Http1Pool::new(timeouts.connect, timeouts.http1_idle),
            http2: Http2Pool {
                endpoints: Arc::default(),
                connect_timeout: timeouts.connect,
                idle_timeout: timeouts.http2_idle,
                reaper_started: Arc::default(),
            },
            endpoints,
            affinity,
            timeouts,
        }
    }

    /// The endpoint of `backend` for a request of `caller`. On a first attempt: `pinned` (a
    /// persisted session's endpoint) while the backend has it, else the one the Service's session
    /// affinity binds the caller to, if not ejected. Otherwise the power of two choices among the
    /// untried ones, which becomes the caller's binding if it had none: an ejection (which one
    /// caller's failures can cause) or a retry serves one attempt elsewhere, and the caller keeps
    /// its endpoint while the endpoint stays in the Service, as kube-proxy keeps it.
    pub fn pick<'b>(
        &self,
        backend: &'b Backend,
        caller: std::net::IpAddr,
        pinned: Option<SocketAddr>,
        tried: &[SocketAddr],
        random: u64,
    ) -> Option<(SocketAddr, InFlight<'b>)> {
        // The clock is read only for Services with session affinity: not on every request.
        let affinity_now = backend.affinity.map(|_| Instant::now());
        let bound = affinity_now.and_then(|now| self.affinity.endpoint(backend, caller, now));
        if tried.is_empty() {
            let preferred = pinned
                .filter(|p| backend.endpoints.contains(p))
                .or(bound)
                .and_then(|p| Some((p, self.endpoints.hold(backend, p)?)));
            if preferred.is_some() {
                return preferred;
            }
        }
        let chosen = self.endpoints.choose(backend, tried, random)?;
        if let (Some(now), None) = (affinity_now, bound) {
            self.affinity.bind(backend, caller, chosen.0, now);
        }
        Some(chosen)
    }

    /// Sends `request` to `endpoint`. HTTP/1.1 requests are in origin form with the caller's
    /// Host; HTTP/2 ones carry the caller's authority in their URI (it becomes `:authority`).
    /// An answer to an upgrade keeps hyper's `OnUpgrade` in its extensions. The answer's body
    /// holds `load` (the request's count on the endpoint) until it is dropped: a long answer (a
    /// download, a gRPC stream) is load on its endpoint until its end, not only until its head.
    pub async fn send(
        &self,
        endpoint: SocketAddr,
        h2: bool,
        request: Request<ProxyBody>,
        load: Option<OwnedInFlight>,
    ) -> Result<Response<ProxyBody>, UpstreamError> {
        let response = if h2 {
            return self.http2.send(endpoint, request, load).await;
        } else if inline::handles(&request) {
            return self.inline.send(endpoint, request, load).await;
        } else {
            let asked_upgrade = request.headers().contains_key(http::header::UPGRADE);
            let method = request.method().clone();
            let response = self.http1.send(endpoint, request).await?;
            as_own_exchange_reads(response, &method, asked_upgrade)?
        };
        Ok(response.map(|answer| body::stream_http1(answer, load)))
    }
}

/// An answer of hyper's HTTP/1.1 client held to the rules of the agent's own exchange
/// (`wire::answer_head`), where hyper is more lenient: a caller gets the same answer whichever of
/// the two read it (the `upstream_answer` fuzz target compares them).
fn as_own_exchange_reads(
    mut response: Response<Incoming>,
    method: &http::Method,
    asked_upgrade: bool,
) -> Result<Response<Incoming>, UpstreamError> {
    if response.status() == http::StatusCode::SWITCHING_PROTOCOLS && !asked_upgrade {
        // The caller would be told of a switch it never asked for (an HTTP/2 caller cannot even
        // be): the backend broke the exchange.
        return Err(UpstreamError::Failed(
            wire::WireError::UnaskedUpgrade.to_string(),
        ));
    }
    // Where no body follows, a Transfer-Encoding frames nothing.
    let bodiless = wire::no_body_follows(
        method == http::Method::HEAD,
        method == http::Method::CONNECT,
        response.status(),
    );
    if !bodiless && !wire::only_chunked(response.headers()) {
        return Err(UpstreamError::Failed(
            wire::WireError::UnsupportedTransferCoding.to_string(),
        ));
    }
    // hyper frames the body by the coding but leaves the length in the map: a proxy must drop
    // it (RFC 9112 §6.3 item 3), or the caller is told a length the body does not have. Where
    // no body follows (item 1, which comes first), the length is the representation's, as the
    // agent's own exchange relays it.
    if !bodiless
        && response
            .headers()
            .contains_key(http::header::TRANSFER_ENCODING)
    {
        response.headers_mut().remove(http::header::CONTENT_LENGTH);
    }
    // A reason of obs-text reads as empty: the status's usual phrase goes instead.
    let extensions = response.extensions_mut();
    if extensions
        .get::<hyper::ext::ReasonPhrase>()
        .is_some_and(|reason| reason.as_bytes().is_empty())
    {
        extensions.remove::<hyper::ext::ReasonPhrase>();
    }
    Ok(response)
}

/// Opens a TCP connection to an upstream endpoint, as the pools and the opaque pass-through do:
/// bounded in time, no Nagle delay, keepalive probes.
pub(super) async fn connect_tcp(
    endpoint: SocketAddr,
    timeout: Duration,
) -> Result<tokio::net::TcpStream, UpstreamError> {
    let connect_error = |e: &dyn std::error::Error| UpstreamError::Connect(error_chain(e));
    let stream = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(endpoint))
        .await
        .map_err(|e| connect_error(&e))?
        .map_err(|e| {
            if agent_short(&e) {
                UpstreamError::AgentShort(format!(
                    "connecting to {endpoint}: {e} (the agent's own limit: raise the open-files \
                     limit or free local ports)"
                ))
            } else {
                connect_error(&e)
            }
        })?;
    let _ = stream.set_nodelay(true);
    super::tcp::keepalive(&stream);
    Ok(stream)
}

/// A connection for HTTP exchanges with `endpoint`: as `connect_tcp`, and given up once what
/// the agent sent stays unacknowledged for [`UNACKNOWLEDGED_LIMIT`]. An endpoint whose node
/// vanished sends no reset: the kernel would resend the request for about 15 minutes
/// (`tcp_retries2`), and it would hang as long with every request put on its pooled HTTP/2
/// connection. Not for opaque relays: the limit also ends a connection whose peer keeps its
/// window shut that long, which a paused consumer of a stream may.
pub(super) async fn connect_http(
    endpoint: SocketAddr,
    timeout: Duration,
) -> Result<tokio::net::TcpStream, UpstreamError> {
    let stream = connect_tcp(endpoint, timeout).await?;
    let _ = rustix::net::sockopt::set_tcp_user_timeout(
        &stream,
        UNACKNOWLEDGED_LIMIT.as_millis() as u32,
    );
    Ok(stream)
}

/// How long data the agent sent to an endpoint may stay unacknowledged before its connection
/// fails: the keepalive's own span (`tcp::keepalive`: 60 s idle, then 6 probes 10 s apart),
/// since the limit also ends an idle connection whose probes go unanswered, which should not
/// be sooner than keepalive alone would.
const UNACKNOWLEDGED_LIMIT: Duration = Duration::from_secs(120);

/// A connect that failed before reaching the network: the agent is out of descriptors, local
/// ports or buffer memory.
fn agent_short(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EADDRNOTAVAIL)
    )
}

/// Connections kept per endpoint for another request, and the reaper that closes those idle for
/// longer than `idle_timeout` (within twice that time). Both HTTP/1.1 clients keep theirs here:
/// hyper's (`Http1Pool`) and the agent's own (`inline::InlinePool`).
pub(super) struct Kept<C> {
    shared: Arc<KeptShared<C>>,
}

impl<C> Clone for Kept<C> {
    fn clone(&self) -> Self {
        Kept {
            shared: self.shared.clone(),
        }
    }
}

struct KeptShared<C> {
    connections: Mutex<AHashMap<SocketAddr, Vec<KeptConn<C>>>>,
    idle_timeout: Duration,
    reaper_started: AtomicBool,
}

struct KeptConn<C> {
    conn: C,
    /// When it was last known in use: kept, or last seen still reading its answer by the
    /// reaper. It has been idle for no longer than since then.
    last_busy: Instant,
}

/// A connection a pool keeps.
pub(super) trait Reusable: Send + 'static {
    /// It can carry no more requests (the peer closed it, or it failed).
    fn is_closed(&self) -> bool;
    /// It can take a request now (not still reading an answer).
    fn is_ready(&self) -> bool;
}

impl<C: Reusable> Kept<C> {
    pub(super) fn new(idle_timeout: Duration) -> Self {
        Kept {
            shared: Arc::new(KeptShared {
                connections: Mutex::default(),
                idle_timeout,
                reaper_started: AtomicBool::new(false),
            }),
        }
    }

    /// The most recently used ready connection to `endpoint`; drops closed ones on the way, and
    /// those idle for the idle timeout, which the reaper (a sweep late) may not have closed yet:
    /// one is never used past it, whatever keeps the reaper.
    pub(super) fn checkout(&self, endpoint: SocketAddr) -> Option<C> {
        let mut connections = self.shared.connections.lock().expect("not poisoned");
        let list = connections.get_mut(&endpoint)?;
        let now = Instant::now();
        loop {
            let ready = list.iter().rposition(|c| c.conn.is_ready())?;
            let candidate = list.swap_remove(ready);
            let timed_out = now.duration_since(candidate.last_busy) >= self.shared.idle_timeout;
            if !timed_out && !candidate.conn.is_closed() {
                return Some(candidate.conn);
            }
        }
    }

    /// A kept connection to `endpoint` (and `true`), else a new one from `connect`.
    pub(super) async fn checkout_or<F>(
        &self,
        endpoint: SocketAddr,
        connect: impl FnOnce() -> F,
    ) -> Result<(C, bool), UpstreamError>
    where
        F: std::future::Future<Output = Result<C, UpstreamError>>,
    {
        match self.checkout(endpoint) {
            Some(conn) => Ok((conn, true)),
            // Boxed: connecting is rare next to reuse, and its state would otherwise size every
            // request's future.
            None => Ok((Box::pin(connect()).await?, false)),
        }
    }

    /// Keeps `conn` for another request to `endpoint`, unless [`HTTP1_IDLE_PER_ENDPOINT`] are
    /// kept already (it is then dropped).
    pub(super) fn checkin(&self, endpoint: SocketAddr, conn: C) {
        let started = &self.shared.reaper_started;
        if !started.load(Ordering::Relaxed) && !started.swap(true, Ordering::Relaxed) {
            tokio::spawn(reap_idle(Arc::downgrade(&self.shared)));
        }
        let mut connections = self.shared.connections.lock().expect("not poisoned");
        let list = connections.entry(endpoint).or_default();
        if list.len() < HTTP1_IDLE_PER_ENDPOINT {
            list.push(KeptConn {
                conn,
                // hyper's connections come back with their answer's body still to read: busy
                // until the reaper sees otherwise.
                last_busy: Instant::now(),
            });
        }
    }

    #[cfg(test)]
    fn endpoints_kept(&self) -> usize {
        self.shared.connections.lock().unwrap().len()
    }
}

/// Closes kept connections idle for longer than the pool's idle timeout, until the pool is gone.
/// A connection counts as idle from the last sweep that found it busy (or its checkin): never
/// later than it became idle, so that it is closed before a backend's keep-alive a little longer
/// than the timeout closes it.
async fn reap_idle<C: Reusable>(pool: Weak<KeptShared<C>>) {
    let Some(period) = pool
        .upgrade()
        .map(|p| (p.idle_timeout / 2).max(Duration::from_millis(100)))
    else {
        return;
    };
    loop {
        tokio::time::sleep(period).await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        let now = Instant::now();
        let mut connections = pool.connections.lock().expect("not poisoned");
        connections.retain(|_, list| {
            list.retain_mut(|c| {
                if c.conn.is_closed() {
                    return false;
                }
                if !c.conn.is_ready() {
                    c.last_busy = now;
                }
                now.duration_since(c.last_busy) < pool.idle_timeout
            });
            !list.is_empty()
        });
    }
}

/// HTTP/1.1 connections of hyper's client, for requests with a body and upgrades. A connection
/// goes back to the pool as soon as its answer's head arrived and is taken again once hyper says
/// it is ready (the answer's body was read to its end): nothing waits for it in between.
/// hyper-util's pooled client spawned a task per request for that, and allocated six times.
#[derive(Clone)]
pub struct Http1Pool {
    kept: Kept<http1::SendRequest<ProxyBody>>,
    connect_timeout: Duration,
}

impl Reusable for http1::SendRequest<ProxyBody> {
    fn is_closed(&self) -> bool {
        http1::SendRequest::is_closed(self)
    }

    fn is_ready(&self) -> bool {
        http1::SendRequest::is_ready(self)
    }
}

impl Http1Pool {
    pub fn new(connect_timeout: Duration, idle_timeout: Duration) -> Self {
        Http1Pool {
            kept: Kept::new(idle_timeout),
            connect_timeout,
        }
    }

    /// Sends `request` (origin form, with its Host) on an idle connection to `endpoint`, else on
    /// a new one. A request a pooled connection did not start to send (it was closing) is sent
    /// again on another.
    pub async fn send(
        &self,
        endpoint: SocketAddr,
        mut request: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        loop {
            let (mut sender, pooled) = self
                .kept
                .checkout_or(endpoint, || self.connect(endpoint))
                .await?;
            match sender.try_send_request(request).await {
                Ok(response) => {
                    // An answer framed by both a coding and a length is not to be trusted for
                    // where the next one starts (RFC 9112 §6.3 item 3): its connection is not
                    // reused, as the agent's own exchange does. Beyond the pool's limit, too, the
                    // sender is dropped: hyper closes its connection after this answer.
                    let headers = response.headers();
                    if !(headers.contains_key(http::header::TRANSFER_ENCODING)
                        && headers.contains_key(http::header::CONTENT_LENGTH))
                    {
                        self.kept.checkin(endpoint, sender);
                    }
                    return Ok(response);
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if pooled => request = unsent,
                    _ => return Err(UpstreamError::Failed(error_chain(e.error()))),
                },
            }
        }
    }

    async fn connect(
        &self,
        endpoint: SocketAddr,
    ) -> Result<http1::SendRequest<ProxyBody>, UpstreamError> {
        let stream = connect_http(endpoint, self.connect_timeout).await?;
        let (sender, connection) = http1::Builder::new()
            // `Name : value`: dropped space, field relayed (RFC 9112 §5.1: a proxy MUST).
            .allow_spaces_after_header_name_in_responses(true)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| UpstreamError::Connect(error_chain(&e)))?;
        tokio::spawn(async move {
            // With upgrades: a 101 hands the connection to the forwarder's pump.
            if let Err(e) = connection.with_upgrades().await {
                tracing::debug!(%endpoint, error = %e, "upstream HTTP/1.1 connection ended");
            }
        });
        Ok(sender)
    }
}

/// HTTP/2 connections per endpoint, shared by every request to it (multiplexed): as many as
/// the endpoint's stream limit (SETTINGS_MAX_CONCURRENT_STREAMS) needs, up to
/// `HTTP2_CONNECTIONS_PER_ENDPOINT`. A request beyond a connection's limit would wait in h2's
/// queue until one of its streams ended: behind long-lived streams (gRPC watches), forever.
/// hyper-util's pool would key them by the request URI's authority, which HTTP/2 also sends as
/// `:authority`: the agent connects to an endpoint but must send the caller's authority, so it
/// keys its HTTP/2 connections itself.
#[derive(Clone)]
struct Http2Pool {
    endpoints: Arc<Mutex<AHashMap<SocketAddr, Http2Slot>>>,
    connect_timeout: Duration,
    /// A connection with no stream for this long is closed.
    idle_timeout: Duration,
    reaper_started: Arc<AtomicBool>,
}

/// HTTP/2 connections kept per endpoint and worker, at most. At this many, all at their stream
/// limit, a request waits on the least busy one, as it would with one connection.
const HTTP2_CONNECTIONS_PER_ENDPOINT: usize = 16;

/// The header list an HTTP/2 backend's answer (or trailers) may carry: as large as the request
/// heads callers may send (`ProxyConfig::max_header_bytes`).
const HTTP2_MAX_HEADER_LIST: u32 = 64 * 1024;

/// The window each stream to a backend opens for its answer: what the agent holds of an answer
/// its caller does not read. hyper's default is 2 MiB, under a 5 MiB connection window that
/// three callers reading nothing filled, stopping every answer on the connection, which many
/// callers share (RFC 9113 §5.2: streams must not interfere). 128 KiB still moves 250 MB/s per
/// stream at a 0.5 ms round trip.
const HTTP2_STREAM_WINDOW: u32 = 128 * 1024;

/// The connection window to a backend: 128 streams' windows, so that callers reading nothing
/// stall their own streams before they stall the others'.
const HTTP2_CONNECTION_WINDOW: u32 = 128 * HTTP2_STREAM_WINDOW;

type Http2Sender = http2::SendRequest<ProxyBody>;

/// An endpoint's connections; locked while one is being made, so that one is made at a time.
type Http2Slot = Arc<tokio::sync::Mutex<Http2Endpoint>>;

#[derive(Default)]
struct Http2Endpoint {
    connections: Vec<Http2Conn>,
    /// When the last connection attempt failed, and why: the requests that waited for it and
    /// found no room on the connections left fail with it rather than each waiting for an
    /// attempt of its own (an endpoint that drops SYNs would make the n-th of them wait n connect
    /// timeouts).
    connect_failed: Option<(Instant, UpstreamError)>,
}

struct Http2Conn {
    sender: Http2Sender,
    streams: Arc<StreamCount>,
    /// When the reaper first saw it without a stream (`None`: in use when last seen).
    idle_since: Option<Instant>,
}

/// Streams a connection opens before it leaves the pool: a client's stream IDs are the odd ones
/// below 2^31, 2^30 of them (RFC 9113 §5.1.1), and h2 refuses the next one (a request never sent,
/// which failed as a 502); a margin for requests already on their way to it.
const HTTP2_STREAMS_PER_CONNECTION: u32 = (1 << 30) - 4096;

/// A connection's streams in use, against the limit its endpoint set.
struct StreamCount {
    open: AtomicUsize,
    /// Streams ever opened on it, against [`HTTP2_STREAMS_PER_CONNECTION`].
    opened: AtomicU32,
    /// Polled by the connection's task; read here for the endpoint's current
    /// SETTINGS_MAX_CONCURRENT_STREAMS (hyper's `SendRequest` does not tell it). `None` once
    /// it ended: dropped then, so that requests still handed to it come back unsent.
    connection: Mutex<Option<Pin<Box<Http2Connection>>>>,
}

type Http2Connection = http2::Connection<TokioIo<tokio::net::TcpStream>, ProxyBody, TokioExecutor>;

impl StreamCount {
    /// One more stream, if the limit allows it (or `beyond_limit`) and the connection has stream
    /// IDs left.
    fn open(self: &Arc<Self>, beyond_limit: bool) -> Option<OpenStream> {
        if self.exhausted() {
            return None;
        }
        let limit = (!beyond_limit).then(|| {
            let connection = self.connection.lock().expect("not poisoned");
            connection
                .as_ref()
                .map_or(0, |c| c.current_max_send_streams())
        });
        self.open
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |open| {
                limit.is_none_or(|limit| open < limit).then_some(open + 1)
            })
            .ok()?;
        self.opened.fetch_add(1, Ordering::Relaxed);
        Some(OpenStream(self.clone()))
    }

    /// It has opened as many streams as a connection may: it serves those on, and no more.
    fn exhausted(&self) -> bool {
        self.opened.load(Ordering::Relaxed) >= HTTP2_STREAMS_PER_CONNECTION
    }
}

/// A stream counted against its connection's limit until the answer's body is dropped (or the
/// request failed).
struct OpenStream(Arc<StreamCount>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Http2Pool {
    async fn send(
        &self,
        endpoint: SocketAddr,
        mut request: Request<ProxyBody>,
        load: Option<OwnedInFlight>,
    ) -> Result<Response<ProxyBody>, UpstreamError> {
        loop {
            let (mut sender, stream, pooled) = self.stream(endpoint).await?;
            let mut e = match sender.try_send_request(request).await {
                Ok(response) => {
                    return Ok(response.map(|answer| body::holding(answer, (stream, load))))
                }
                Err(e) => e,
            };
            let said = said_by_backend(e.error());
            let stream_reset = h2_error(e.error()).is_some_and(h2::Error::is_reset);
            if !stream_reset {
                // The connection failed or is closing: its next request must not find it
                // (hyper's `is_closed` turns true only once the connection's task ends, after its
                // last stream). A reset ends one stream: the connection serves on, and a backend
                // shedding load with REFUSED_STREAM keeps its limit on it.
                self.forget(endpoint, &stream.0);
            }
            let error = error_chain(e.error());
            // Handed back unsent: the pooled connection was closing (a GOAWAY, read while its
            // other streams went on). It goes out again on another connection (RFC 9113 §8.7).
            request = match e.take_message() {
                Some(unsent) if pooled => unsent,
                _ => {
                    return Err(match said {
                        BackendSaid::Refused => UpstreamError::Declined {
                            error,
                            on_error: false,
                        },
                        BackendSaid::GoingAway { on_error } => {
                            UpstreamError::Declined { error, on_error }
                        }
                        BackendSaid::Reset(code) => UpstreamError::Reset(code, error),
                        BackendSaid::Nothing => UpstreamError::Failed(error),
                    })
                }
            };
        }
    }

    /// Drops one of the endpoint's connections from the pool (it stays open for its streams).
    fn forget(&self, endpoint: SocketAddr, connection: &Arc<StreamCount>) {
        let slot = self
            .endpoints
            .lock()
            .expect("not poisoned")
            .get(&endpoint)
            .cloned();
        if let Some(slot) = slot {
            if let Ok(mut slot) = slot.try_lock() {
                slot.connections
                    .retain(|c| !Arc::ptr_eq(&c.streams, connection));
            }
        }
    }

    /// A stream on one of the endpoint's open connections with room for it, or on a new one.
    /// Requests that find no room wait for the connection being made rather than each making
    /// their own.
    /// Also says whether the connection was pooled (not made for this request).
    async fn stream(
        &self,
        endpoint: SocketAddr,
    ) -> Result<(Http2Sender, OpenStream, bool), UpstreamError> {
        let slot = {
            let mut endpoints = self.endpoints.lock().expect("not poisoned");
            if !endpoints.contains_key(&endpoint) {
                // A new endpoint: drop the slots whose connections all closed (endpoints that
                // went away), so the pool does not grow with every endpoint ever used.
                endpoints.retain(|_, slot| {
                    slot.try_lock().map_or(true, |e| {
                        e.connections.iter().any(|c| !c.sender.is_closed())
                    })
                });
            }
            endpoints.entry(endpoint).or_default().clone()
        };
        let asked = Instant::now();
        let mut slot = slot.lock().await;
        let connections = &mut slot.connections;
        connections.retain(|c| !c.sender.is_closed() && !c.streams.exhausted());
        // Streams may have ended while this request waited for a connect that failed.
        let with_room = connections
            .iter()
            .find_map(|c| Some((c.sender.clone(), c.streams.open(false)?, true)));
        if let Some(found) = with_room {
            return Ok(found);
        }
        if let Some((_, error)) = slot.connect_failed.as_ref().filter(|(at, _)| *at >= asked) {
            return Err(error.clone());
        }
        let connections = &mut slot.connections;
        if let Some(least_busy) = (connections.len() >= HTTP2_CONNECTIONS_PER_ENDPOINT)
            .then(|| {
                connections
                    .iter()
                    .min_by_key(|c| c.streams.open.load(Ordering::Relaxed))
            })
            .flatten()
        {
            let stream = least_busy.streams.open(true).expect("beyond the limit");
            return Ok((least_busy.sender.clone(), stream, true));
        }
        // Boxed: connecting is rare, and its state (the handshake's) would otherwise size every
        // request's future.
        let connection = match Box::pin(self.connect(endpoint)).await {
            Ok(connection) => connection,
            Err(e) => {
                slot.connect_failed = Some((Instant::now(), e.clone()));
                return Err(e);
            }
        };
        // A new connection's limit is h2's default until the endpoint's SETTINGS arrive; one
        // that allows none still takes this request, which waited for it.
        let stream = connection.streams.open(true).expect("beyond the limit");
        let sender = connection.sender.clone();
        slot.connections.push(connection);
        let started = &self.reaper_started;
        if !started.load(Ordering::Relaxed) && !started.swap(true, Ordering::Relaxed) {
            tokio::spawn(reap_idle_http2(
                Arc::downgrade(&self.endpoints),
                self.idle_timeout,
            ));
        }
        Ok((sender, stream, false))
    }

    async fn connect(&self, endpoint: SocketAddr) -> Result<Http2Conn, UpstreamError> {
        let connect_error = |e: &dyn std::error::Error| UpstreamError::Connect(error_chain(e));
        let stream = connect_http(endpoint, self.connect_timeout).await?;
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            // No PINGs: gRPC servers take one less than 5 minutes after the last, with no data
            // sent between, as abuse, and close the connection after two (GOAWAY
            // "too_many_pings"), failing every quiet stream on it. A peer that vanished is
            // noticed by the socket's TCP keepalive, as Envoy does by default, and by what stays
            // unacknowledged (`connect_http`).
            // Answers as large as the requests callers may send (hyper's default is 16 KiB: a
            // larger answer failed, and a larger trailer lost its fields).
            .max_header_list_size(HTTP2_MAX_HEADER_LIST)
            .initial_stream_window_size(HTTP2_STREAM_WINDOW)
            .initial_connection_window_size(HTTP2_CONNECTION_WINDOW)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| connect_error(&e))?;
        let streams = Arc::new(StreamCount {
            open: AtomicUsize::new(0),
            opened: AtomicU32::new(0),
            connection: Mutex::new(Some(Box::pin(connection))),
        });
        let polled = streams.clone();
        tokio::spawn(async move {
            let ended = std::future::poll_fn(|cx| {
                let mut connection = polled.connection.lock().expect("not poisoned");
                let Some(running) = connection.as_mut() else {
                    return std::task::Poll::Ready(Ok(()));
                };
                let poll = running.as_mut().poll(cx);
                if poll.is_ready() {
                    *connection = None;
                }
                poll
            });
            if let Err(e) = ended.await {
                tracing::debug!(%endpoint, error = %e, "upstream HTTP/2 connection ended");
            }
        });
        Ok(Http2Conn {
            sender,
            streams,
            idle_since: None,
        })
    }
}

/// Drops HTTP/2 connections that carried no stream for `idle_timeout` (within twice that time),
/// and the slots of endpoints left with none, until the pool is gone: a burst that opened
/// several connections to an endpoint, or an endpoint that left the table, does not keep them
/// open for good. A dropped connection closes once its last stream ends.
async fn reap_idle_http2(
    pool: Weak<Mutex<AHashMap<SocketAddr, Http2Slot>>>,
    idle_timeout: Duration,
) {
    let period = (idle_timeout / 2).max(Duration::from_millis(100));
    loop {
        tokio::time::sleep(period).await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        let now = Instant::now();
        pool.lock().expect("not poisoned").retain(|_, slot| {
            // A slot in use (a connection being made) is left for the next sweep.
            let Ok(mut slot) = slot.try_lock() else {
                return true;
            };
            slot.connections.retain_mut(|c| {
                if c.sender.is_closed() {
                    return false;
                }
                if c.streams.open.load(Ordering::Relaxed) > 0 {
                    c.idle_since = None;
                    return true;
                }
                now.duration_since(*c.idle_since.get_or_insert(now)) < idle_timeout
            });
            !slot.connections.is_empty()
        });
    }
}

/// What an HTTP/2 backend said of a request that got no answer, if anything.
enum BackendSaid {
    /// RST_STREAM REFUSED_STREAM: declined before any processing.
    Refused,
    /// Left out of a GOAWAY (a stream it names as processed ends with the connection, not
    /// with the GOAWAY's error, whatever its code): declined too, and the connection is closing;
    /// `on_error`: its code is not NO_ERROR.
    GoingAway {
        on_error: bool,
    },
    /// RST_STREAM with this error code.
    Reset(u32),
    Nothing,
}

fn said_by_backend(e: &hyper::Error) -> BackendSaid {
    let Some(h2) = h2_error(e).filter(|h2| h2.is_remote()) else {
        return BackendSaid::Nothing;
    };
    match h2.reason() {
        Some(h2::Reason::REFUSED_STREAM) if h2.is_reset() => BackendSaid::Refused,
        Some(code) if h2.is_go_away() => BackendSaid::GoingAway {
            on_error: code != h2::Reason::NO_ERROR,
        },
        Some(code) if h2.is_reset() => BackendSaid::Reset(code.into()),
        _ => BackendSaid::Nothing,
    }
}

/// The HTTP/2 error among `e` and its sources.
pub(super) fn h2_error<'e>(e: &'e (dyn std::error::Error + 'static)) -> Option<&'e h2::Error> {
    let mut source = Some(e);
    while let Some(error) = source {
        if let Some(h2) = error.downcast_ref::<h2::Error>() {
            return Some(h2);
        }
        source = error.source();
    }
    None
}

/// An error and its sources, on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// An endpoint's load and health, shared by every table and worker that sends to it.
pub struct EndpointState {
    /// `ip:port`, spelled once: HTTP/1.1 requests name it in their URI (the pool key).
    authority: http::uri::Authority,
    in_flight: AtomicUsize,
    /// Milliseconds since `EndpointStats::epoch` until which the endpoint is avoided (0: never).
    ejected_until: AtomicU64,
    /// Requests in a row that failed without an answer.
    failures: AtomicU32,
}

/// Every endpoint's state, by address: consulted when a backend's slot for an endpoint is first
/// used (`Backend::endpoint_state`), then the request path reads the slot, without a lock.
pub struct EndpointStats {
    epoch: Instant,
    by_address: Mutex<AHashMap<SocketAddr, Arc<EndpointState>>>,
    /// Ejections so far, every endpoint's (`/metrics`).
    ejections: AtomicU64,
}

impl Default for EndpointStats {
    fn default() -> Self {
        EndpointStats {
            epoch: Instant::now(),
            by_address: Mutex::default(),
            ejections: AtomicU64::new(0),
        }
    }
}

/// Counts a request in flight on an endpoint until dropped; says how the endpoint fared.
/// Borrowed from the table the request was routed with, while the endpoint is chosen and the
/// exchange runs: the state is shared by every worker, and a reference count to move per
/// request would be one more write to its cache line.
pub struct InFlight<'t> {
    state: &'t EndpointState,
    slot: &'t Attached,
}

/// [`InFlight`], for what outlives the table's borrow: an answer's body, a mirror's task.
pub struct OwnedInFlight(Arc<EndpointState>);

impl EndpointState {
    fn new(addr: SocketAddr) -> Self {
        EndpointState {
            authority: authority_of(addr),
            in_flight: AtomicUsize::new(0),
            ejected_until: AtomicU64::new(0),
            failures: AtomicU32::new(0),
        }
    }
}

/// `ip:port` as a URI authority.
pub fn authority_of(addr: SocketAddr) -> http::uri::Authority {
    http::uri::Authority::try_from(addr.to_string()).expect("an address is an authority")
}

impl<'t> InFlight<'t> {
    /// The endpoint's `ip:port`.
    pub fn authority(&self) -> &'t http::uri::Authority {
        &self.state.authority
    }

    /// The endpoint's state, to say how it fared once the count went with the answer.
    pub fn endpoint(&self) -> &'t EndpointState {
        self.state
    }

    /// The same count, held beyond the table's borrow.
    pub fn into_owned(self) -> OwnedInFlight {
        let state = self
            .slot
            .get_shared::<EndpointState>()
            .expect("filled when the endpoint was held");
        // The count moves to the owned handle: not decremented here.
        std::mem::forget(self);
        OwnedInFlight(state)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.state.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl OwnedInFlight {
    /// The endpoint's `ip:port`.
    pub fn authority(&self) -> &http::uri::Authority {
        &self.0.authority
    }
}

impl Drop for OwnedInFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl EndpointStats {
    /// The state of `backend`'s `index`th endpoint.
    fn state<'b>(&self, backend: &'b Backend, index: usize) -> &'b EndpointState {
        backend.endpoint_state[index].get_or_init(|| self.by_address(backend, index))
    }

    /// The state of `backend`'s `index`th endpoint, to hold while a request is in flight.
    fn held<'b>(&self, backend: &'b Backend, index: usize) -> InFlight<'b> {
        let state = self.state(backend, index);
        state.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight {
            state,
            slot: &backend.endpoint_state[index],
        }
    }

    fn by_address(&self, backend: &Backend, index: usize) -> Arc<EndpointState> {
        let mut by_address = self.by_address.lock().expect("not poisoned");
        let addr = backend.endpoints[index];
        let state = by_address.entry(addr);
        state
            .or_insert_with(|| Arc::new(EndpointState::new(addr)))
            .clone()
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn ejected(&self, e: &EndpointState) -> bool {
        let until = e.ejected_until.load(Ordering::Relaxed);
        // The clock is read only for endpoints ejected once.
        until != 0 && until > self.now_ms()
    }

    /// Avoid the endpoint for a while: its connection failed.
    pub fn eject(&self, endpoint: &EndpointState) {
        let until = self.now_ms() + EJECTION.as_millis() as u64;
        endpoint.ejected_until.store(until, Ordering::Relaxed);
        self.ejections.fetch_add(1, Ordering::Relaxed);
    }

    /// The endpoint answered (whatever the status): its run of failures is over.
    pub fn answered(&self, endpoint: &EndpointState) {
        if endpoint.failures.load(Ordering::Relaxed) != 0 {
            endpoint.failures.store(0, Ordering::Relaxed);
        }
    }

    /// A request got no answer; the [`CONSECUTIVE_FAILURES`]th in a row ejects the endpoint.
    pub fn failed(&self, endpoint: &EndpointState) {
        if endpoint.failures.fetch_add(1, Ordering::Relaxed) + 1 >= CONSECUTIVE_FAILURES {
            endpoint.failures.store(0, Ordering::Relaxed);
            self.eject(endpoint);
        }
    }

    /// Counts a request in flight on `addr` of `backend`, chosen by other means (a session, an
    /// affinity binding), unless it is not the backend's or is ejected.
    pub fn hold<'b>(&self, backend: &'b Backend, addr: SocketAddr) -> Option<InFlight<'b>> {
        let index = backend.endpoints.iter().position(|e| *e == addr)?;
        if self.ejected(self.state(backend, index)) {
            return None;
        }
        Some(self.held(backend, index))
    }

    /// Chooses an endpoint of `backend` (power of two choices), skipping ejected ones and
    /// `exclude` (those already tried) unless nothing else is left. `random` supplies the
    /// randomness.
    pub fn choose<'b>(
        &self,
        backend: &'b Backend,
        exclude: &[SocketAddr],
        random: u64,
    ) -> Option<(SocketAddr, InFlight<'b>)> {
        let index = match self.two_preferred(backend, exclude, random) {
            Some(index) => index,
            None => self.choose_with_fallbacks(backend, exclude, random)?,
        };
        Some((backend.endpoints[index], self.held(backend, index)))
    }

    /// The common case, without allocating: two random endpoints, both untried and not
    /// ejected; the one with fewer requests in flight. `None` if either is not.
    fn two_preferred(
        &self,
        backend: &Backend,
        exclude: &[SocketAddr],
        random: u64,
    ) -> Option<usize> {
        let n = backend.endpoints.len() as u64;
        if n == 0 {
            return None;
        }
        let a = (random % n) as usize;
        let b = ((random >> 32) % n) as usize;
        let (state_a, state_b) = (self.state(backend, a), self.state(backend, b));
        let preferred = |i: usize, state: &EndpointState| {
            !exclude.contains(&backend.endpoints[i]) && !self.ejected(state)
        };
        if !(preferred(a, state_a) && preferred(b, state_b)) {
            return None;
        }
        let load = |state: &EndpointState| state.in_flight.load(Ordering::Relaxed);
        Some(if load(state_b) < load(state_a) { b } else { a })
    }

    /// Untried endpoints if any (else all), healthy ones among them if any (else all), then the
    /// power of two choices.
    fn choose_with_fallbacks(
        &self,
        backend: &Backend,
        exclude: &[SocketAddr],
        random: u64,
    ) -> Option<usize> {
        let all = 0..backend.endpoints.len();
        let untried: Vec<usize> = all
            .clone()
            .filter(|i| !exclude.contains(&backend.endpoints[*i]))
            .collect();
        let pick_from = if untried.is_empty() {
            all.collect()
        } else {
            untried
        };
        let healthy: Vec<usize> = pick_from
            .iter()
            .copied()
            .filter(|i| !self.ejected(self.state(backend, *i)))
            .collect();
        let pool = if healthy.is_empty() {
            pick_from
        } else {
            healthy
        };
        match pool.len() {
            0 => None,
            1 => Some(pool[0]),
            n => {
                let a = pool[(random % n as u64) as usize];
                let b = pool[((random >> 32) % n as u64) as usize];
                let load = |i: usize| self.state(backend, i).in_flight.load(Ordering::Relaxed);
                Some(if load(b) < load(a) { b } else { a })
            }
        }
    }

    /// Forgets the endpoints `keep` refuses (gone from the table) with nothing in flight;
    /// returns how many. One with answers still streaming is kept until they end: it may come
    /// back (a readiness probe failed for a moment under load), and a fresh state would count
    /// its long answers as nothing.
    pub fn retain(&self, mut keep: impl FnMut(&SocketAddr) -> bool) -> usize {
        let mut by_address = self.by_address.lock().expect("not poisoned");
        let before = by_address.len();
        by_address.retain(|addr, state| keep(addr) || state.in_flight.load(Ordering::Relaxed) > 0);
        before - by_address.len()
    }

    /// Endpoints ejected so far (an endpoint ejected twice counts twice).
    pub fn ejections(&self) -> u64 {
        self.ejections.load(Ordering::Relaxed)
    }

    pub fn in_flight_total(&self) -> usize {
        self.by_address
            .lock()
            .expect("not poisoned")
            .values()
            .map(|e| e.in_flight.load(Ordering::Relaxed))
            .sum()
    }
}

/// A test upstream on 127.0.0.1, for both HTTP/1.1 pools' tests.
#[cfg(test)]
mod test_server {
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Gives `answer` to every request head it reads (its head only, to a HEAD); `close_after`:
    /// it closes each connection after its answer without saying so. Counts connections accepted
    /// and still open.
    pub async fn answering(
        answer: &'static [u8],
        close_after: bool,
    ) -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (accepted, open) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let counts = (accepted.clone(), open.clone());
        let head_len = answer
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map_or(answer.len(), |at| at + 4);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                counts.0.fetch_add(1, Ordering::SeqCst);
                counts.1.fetch_add(1, Ordering::SeqCst);
                let open = counts.1.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    'read: while let Ok(n @ 1..) = stream.read(&mut buf).await {
                        head.extend_from_slice(&buf[..n]);
                        while let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                            let to_head = head.starts_with(b"HEAD ");
                            head.drain(..end + 4);
                            let answer = if to_head { &answer[..head_len] } else { answer };
                            if stream.write_all(answer).await.is_err() || close_after {
                                break 'read;
                            }
                        }
                    }
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        (addr, accepted, open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_dir::eventually;
    use gamma_engine::model::UpstreamProtocol;
    use gamma_engine::ObjectKey;

    fn addr(n: u8) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, n], 80))
    }

    fn backend(endpoints: &[SocketAddr]) -> Backend {
        let key = ObjectKey::new("ns", "svc");
        Backend::new(key, 80, endpoints.into(), UpstreamProtocol::AsCaller, None)
    }

    /// A connection that opened as many streams as its stream IDs allow opens no more, even
    /// beyond its endpoint's limit, and leaves the pool (h2 refuses the next ID: a 502 for a
    /// request never sent); those open serve on.
    #[test]
    fn a_connection_out_of_stream_ids_opens_no_more() {
        let streams = Arc::new(StreamCount {
            open: AtomicUsize::new(0),
            opened: AtomicU32::new(HTTP2_STREAMS_PER_CONNECTION - 1),
            connection: Mutex::new(None),
        });
        let last = streams.open(true).expect("one ID left");
        assert!(streams.exhausted());
        assert!(streams.open(true).is_none());
        drop(last);
        assert!(
            streams.open(true).is_none(),
            "an ended stream gives no ID back"
        );
    }

    /// A SYN dropped because the endpoint's accept queue is full for a moment is resent after
    /// 1 s: the connect still succeeds (at 1 s it never did: the timer fired with the
    /// retransmit).
    #[tokio::test]
    async fn a_connect_outlasts_one_dropped_syn() {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        // A queue of one, filled: the next SYN is dropped until it is accepted.
        let listener = socket.listen(0).unwrap();
        let addr = listener.local_addr().unwrap();
        let _queued = tokio::net::TcpStream::connect(addr).await.unwrap();
        let accepting = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let first = listener.accept().await.unwrap();
            let second = listener.accept().await.unwrap();
            (first, second)
        });
        let started = std::time::Instant::now();
        let connected = connect_tcp(addr, crate::proxy::DEFAULT_CONNECT_TIMEOUT).await;
        assert!(connected.is_ok(), "{:?}", connected.err());
        assert!(
            started.elapsed() >= Duration::from_millis(900),
            "the first SYN was dropped, not answered: {:?}",
            started.elapsed()
        );
        drop(accepting.await.unwrap());
    }

    #[test]
    fn prefers_fewer_in_flight() {
        let stats = EndpointStats::default();
        let backend = backend(&[addr(1), addr(2)]);
        // Random value whose two halves pick both endpoints.
        let both = 1u64 << 32;
        let (first, _held) = stats.choose(&backend, &[], both).unwrap();
        let (second, _) = stats.choose(&backend, &[], both).unwrap();
        assert_ne!(first, second, "the busy endpoint is avoided");
    }

    #[test]
    fn skips_ejected_and_excluded_unless_nothing_else() {
        let stats = EndpointStats::default();
        let backend = backend(&[addr(1), addr(2)]);
        let held = stats.hold(&backend, addr(1)).unwrap();
        stats.eject(held.endpoint());
        drop(held);
        assert!(stats.hold(&backend, addr(1)).is_none(), "ejected");
        for r in 0..8u64 {
            assert_eq!(
                stats.choose(&backend, &[], r * 0x1_0000_0001).unwrap().0,
                addr(2)
            );
        }
        assert_eq!(
            stats.choose(&backend, &[addr(2)], 0).unwrap().0,
            addr(1),
            "ejected beats nothing"
        );
        assert!(stats.choose(&self::backend(&[]), &[], 0).is_none());
    }

    #[test]
    fn state_is_shared_by_every_table_sending_to_an_endpoint() {
        let stats = EndpointStats::default();
        let (old, new) = (backend(&[addr(1), addr(2)]), backend(&[addr(2), addr(1)]));
        let held = stats.hold(&old, addr(1)).unwrap();
        stats.eject(held.endpoint());
        for r in 0..8u64 {
            assert_eq!(
                stats.choose(&new, &[], r * 0x1_0000_0001).unwrap().0,
                addr(2),
                "the new table's slot finds the ejection"
            );
        }
    }

    #[test]
    fn endpoints_gone_from_the_table_are_forgotten() {
        let stats = EndpointStats::default();
        let backend = backend(&[addr(1), addr(2)]);
        let _held = stats.hold(&backend, addr(1)).unwrap();
        drop(stats.hold(&backend, addr(2)));
        assert_eq!(stats.retain(|a| *a == addr(1)), 1);
        assert_eq!(stats.by_address.lock().unwrap().len(), 1);
        assert_eq!(
            stats.in_flight_total(),
            1,
            "the request in flight still counts"
        );
    }

    /// An endpoint gone from the table with an answer still streaming keeps its state: back in
    /// a later table (its readiness probe failed for a moment), its count includes that answer.
    #[test]
    fn an_endpoint_gone_with_answers_streaming_keeps_its_count() {
        let stats = EndpointStats::default();
        let streaming = stats
            .hold(&backend(&[addr(1)]), addr(1))
            .unwrap()
            .into_owned();
        assert_eq!(stats.retain(|_| false), 0, "kept while its answer streams");
        let again = backend(&[addr(1)]);
        let held = stats.hold(&again, addr(1)).unwrap();
        assert_eq!(stats.in_flight_total(), 2);
        drop(streaming);
        drop(held);
        assert_eq!(stats.retain(|_| false), 1);
    }

    #[test]
    fn a_count_held_beyond_the_table_is_the_same_count() {
        let stats = EndpointStats::default();
        let backend = backend(&[addr(1)]);
        let held = stats.hold(&backend, addr(1)).unwrap();
        assert_eq!(stats.in_flight_total(), 1);
        let owned = held.into_owned();
        drop(backend);
        assert_eq!(stats.in_flight_total(), 1, "moved, not doubled or dropped");
        assert_eq!(owned.authority(), "127.0.0.1:80");
        drop(owned);
        assert_eq!(stats.in_flight_total(), 0);
    }

    /// A caller bound by session affinity keeps its endpoint across a retry elsewhere and an
    /// ejection (which another caller's failures can cause): one attempt goes elsewhere, the
    /// binding stays, as kube-proxy keeps it while the endpoint is in the Service.
    #[test]
    fn a_retry_or_an_ejection_does_not_move_a_callers_binding() {
        let up = Upstream::new(
            PoolTimeouts {
                connect: Duration::from_secs(1),
                http1_idle: Duration::from_secs(1),
                http2_idle: Duration::from_secs(1),
            },
            Arc::default(),
        );
        let key = ObjectKey::new("ns", "svc");
        let hour = Some(Duration::from_secs(3600));
        let both = [addr(1), addr(2)];
        let b = Backend::new(key, 80, both.into(), UpstreamProtocol::AsCaller, hour);
        let caller = "10.1.0.1".parse().unwrap();
        let (bound, held) = up.pick(&b, caller, None, &[], 0).unwrap();
        let other = if bound == addr(1) { addr(2) } else { addr(1) };
        assert_eq!(up.pick(&b, caller, None, &[bound], 0).unwrap().0, other);
        assert_eq!(
            up.pick(&b, caller, None, &[], 0).unwrap().0,
            bound,
            "after a retry"
        );
        up.endpoints.eject(held.endpoint());
        drop(held);
        assert_eq!(
            up.pick(&b, caller, None, &[], 0).unwrap().0,
            other,
            "while ejected"
        );
        assert_eq!(
            up.affinity.endpoint(&b, caller, Instant::now()),
            Some(bound),
            "the binding outlives the ejection"
        );
    }

    #[test]
    fn consecutive_failures_eject_and_an_answer_forgives() {
        let stats = EndpointStats::default();
        let backend = backend(&[addr(1), addr(2)]);
        let only_2 = |stats: &EndpointStats| {
            (0..8u64).all(|r| stats.choose(&backend, &[], r * 0x1_0000_0001).unwrap().0 == addr(2))
        };
        let on_1 = || stats.hold(&backend, addr(1)).unwrap();
        for _ in 1..CONSECUTIVE_FAILURES {
            stats.failed(on_1().endpoint());
        }
        stats.answered(on_1().endpoint());
        stats.failed(on_1().endpoint());
        assert!(!only_2(&stats), "an answer in between resets the count");
        for _ in 1..CONSECUTIVE_FAILURES {
            stats.failed(on_1().endpoint());
        }
        assert!(only_2(&stats), "failures in a row eject the endpoint");
    }

    const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

    async fn get_ok(pool: &Http1Pool, endpoint: SocketAddr) {
        let request = Request::get("/")
            .header(http::header::HOST, "svc")
            .body(super::super::body::empty())
            .unwrap();
        let response = pool.send(endpoint, request).await.expect("an answer");
        let body = http_body_util::BodyExt::collect(response.into_body()).await;
        assert_eq!(&body.unwrap().to_bytes()[..], b"ok");
    }

    #[tokio::test]
    async fn http1_connections_are_reused_once_read_and_closed_when_idle() {
        let (endpoint, accepted, open) = test_server::answering(OK, false).await;
        let pool = Http1Pool::new(Duration::from_secs(1), Duration::from_millis(200));
        for _ in 0..3 {
            get_ok(&pool, endpoint).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "one connection, reused");
        eventually("the idle connection closed", || {
            open.load(Ordering::SeqCst) == 0
        })
        .await;
        eventually("the pool emptied", || pool.kept.endpoints_kept() == 0).await;
        get_ok(&pool, endpoint).await;
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            2,
            "a new one after the idle one went"
        );
    }

    struct Open;

    impl Reusable for Open {
        fn is_closed(&self) -> bool {
            false
        }

        fn is_ready(&self) -> bool {
            true
        }
    }

    /// A connection idle past the idle timeout is not used, even before the reaper closed it:
    /// a backend whose keep-alive is a little longer may be closing it right then.
    #[tokio::test(flavor = "current_thread")]
    async fn a_connection_idle_past_the_timeout_is_not_used_before_the_reaper_closes_it() {
        let kept = Kept::new(Duration::from_millis(100));
        let endpoint = addr(1);
        kept.checkin(endpoint, Open);
        assert!(kept.checkout(endpoint).is_some(), "used again at once");
        kept.checkin(endpoint, Open);
        // Blocks the only thread: the reaper cannot run.
        std::thread::sleep(Duration::from_millis(150));
        assert!(kept.checkout(endpoint).is_none(), "idle past the timeout");
    }

    /// HTTP connections give up on a vanished endpoint after `UNACKNOWLEDGED_LIMIT`; opaque
    /// relays keep the kernel's default (none).
    #[tokio::test]
    async fn http_connections_bound_what_stays_unacknowledged() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = listener.local_addr().unwrap();
        let http = connect_http(endpoint, Duration::from_secs(1))
            .await
            .unwrap();
        let opaque = connect_tcp(endpoint, Duration::from_secs(1)).await.unwrap();
        let user_timeout = |s| rustix::net::sockopt::tcp_user_timeout(s).unwrap();
        assert_eq!(user_timeout(&http), UNACKNOWLEDGED_LIMIT.as_millis() as u32);
        assert_eq!(user_timeout(&opaque), 0);
    }

    #[tokio::test]
    async fn an_http1_connection_the_server_closed_is_not_reused() {
        let (endpoint, accepted, open) = test_server::answering(OK, true).await;
        let pool = Http1Pool::new(Duration::from_secs(1), Duration::from_secs(90));
        get_ok(&pool, endpoint).await;
        eventually("the server closed", || open.load(Ordering::SeqCst) == 0).await;
        get_ok(&pool, endpoint).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }
}
