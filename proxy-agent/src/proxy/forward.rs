//! Forwarding one request to a backend: endpoint choice, timeouts, retries, upgrades.

use super::body::{self, AnswerEnd, ProxyBody, RequestBody};
use super::header_maps;
use super::io::DownstreamIo;
use super::local::LocalAnswer;
use super::pump::Flow;
use super::upstream::wire::HOP_BY_HOP;
use super::upstream::{inline, wire, OwnedInFlight, UpstreamError};
use super::{AccessLog, Proxy};
use gamma_engine::routes::{Backend, CompiledRule};
use http::header::{self, HeaderMap, HeaderName};
use http::{Request, Response, StatusCode, Version};
use hyper::body::Body as _;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Removes the hop-by-hop headers. `TE: trailers` is kept (as exactly that): it is the one TE
/// value HTTP/2 allows (RFC 9113 §8.2.2), gRPC requires it, and a backend sends trailers only
/// when asked (`upstream_request` adds its connection option for HTTP/1.1 backends).
pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    strip_hop_by_hop_but(headers, |_| keep_upgrade);
}

/// A request's [`strip_hop_by_hop`], where an upgrade ([`asks_upgrade`], not a tunnel) keeps its
/// `Upgrade`. Returns whether the request asks an upgrade, told in the same pass over the names:
/// most requests have no `Upgrade` to look up.
pub(super) fn strip_request_hop_by_hop(parts: &mut http::request::Parts) -> bool {
    let (version, tunnel) = (parts.version, is_tunnel(parts));
    let mut asks = false;
    strip_hop_by_hop_but(&mut parts.headers, |headers| {
        asks = asks_upgrade(version, headers);
        asks && !tunnel
    });
    asks
}

/// [`strip_hop_by_hop`]; `keep_upgrade` is asked only if the headers have an `Upgrade`.
fn strip_hop_by_hop_but(headers: &mut HeaderMap, keep_upgrade: impl FnOnce(&HeaderMap) -> bool) {
    // Which are there, in one pass over the names: most messages have none, and a removal (a
    // hashed lookup) is made only for one that is.
    let (mut present, mut upgrade) = (0u8, false);
    // Made once: the constant, used in the loop, is made and dropped for each field.
    let hop_by_hop = HOP_BY_HOP;
    for name in headers.keys() {
        match hop_by_hop.iter().position(|h| h == name) {
            Some(i) => present |= 1 << i,
            None => upgrade |= name == header::UPGRADE,
        }
    }
    if present == 0 && !upgrade {
        return;
    }
    let keep_upgrade = upgrade && keep_upgrade(headers);
    let te_present = (0..)
        .zip(&hop_by_hop)
        .any(|(i, h)| present & (1 << i) != 0 && h == header::TE);
    let te_trailers = te_present && wire::has_token(headers, &header::TE, "trailers");
    // Headers named in Connection are hop-by-hop too; its options that name no field there
    // (`close`, as a rule: RFC 9110 §7.6.1 reserves the field name `Close` so that it names
    // none, and it is not looked up) are passed over.
    let named: Vec<HeaderName> = wire::tokens(headers, &header::CONNECTION)
        .filter(|n| !n.eq_ignore_ascii_case("close") && headers.contains_key(*n))
        .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
        .filter(|n| !(keep_upgrade && n == header::UPGRADE))
        .collect();
    for name in &named {
        headers.remove(name);
    }
    for (i, name) in hop_by_hop.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
    if keep_upgrade {
        // The one connection option an upgrade relays (RFC 9110 §7.8).
        headers.insert(
            header::CONNECTION,
            http::HeaderValue::from_static("upgrade"),
        );
    } else if upgrade {
        headers.remove(header::UPGRADE);
    }
    if te_trailers {
        headers.insert(header::TE, http::HeaderValue::from_static("trailers"));
    }
}

/// An HTTP/1.1 upgrade the agent relays. Not an offer of h2c only (`curl --http2` sends one):
/// the agent serves the request over HTTP/1.1 and drops the offer with its `HTTP2-Settings`, as
/// Envoy does. Relayed, a backend that took it would carry every later request on the
/// connection unrouted (RFC 9113 §3.1 deprecates the upgrade).
/// An HTTP/1.1 CONNECT (RFC 9110 §9.3.6): a 2xx answer turns the connection into a tunnel to
/// the backend, which the agent joins byte for byte as it does an upgrade. (An HTTP/2 CONNECT is
/// answered 501: `check_request_head`.)
fn is_tunnel(parts: &http::request::Parts) -> bool {
    asks_tunnel(parts.version, &parts.method)
}

fn asks_tunnel(version: Version, method: &http::Method) -> bool {
    version == Version::HTTP_11 && method == http::Method::CONNECT
}

fn asks_upgrade(version: Version, headers: &http::HeaderMap) -> bool {
    version == Version::HTTP_11
        && wire::tokens(headers, &header::UPGRADE)
            .any(|p| !p.is_empty() && !p.eq_ignore_ascii_case("h2c"))
}

/// The request's connection becomes a relay of bytes if it is answered (an upgrade, an HTTP/1.1
/// CONNECT).
pub(super) fn becomes_relay<B>(request: &http::Request<B>) -> bool {
    let version = request.version();
    asks_tunnel(version, request.method()) || asks_upgrade(version, request.headers())
}

/// What one upstream attempt ended with.
enum Attempt {
    Response(Response<ProxyBody>),
    ConnectFailed(String),
    /// No connection for want of the agent's own resources: not the endpoint's fault, and no
    /// other endpoint would fare better.
    AgentShort(String),
    TimedOut(Duration),
    /// No answer; `reset`: the HTTP/2 error code the backend reset the stream with.
    Failed {
        error: String,
        reset: Option<u32>,
    },
    /// Declined unprocessed: sent again (even without a retry policy); the endpoint's fault
    /// only `on_error` (`UpstreamError::Declined`).
    Declined {
        error: String,
        on_error: bool,
    },
}

impl Attempt {
    /// The answer this attempt gives the caller when it is the last.
    fn failure(
        self,
        endpoint: SocketAddr,
        backend: &Backend,
    ) -> Result<Response<ProxyBody>, LocalAnswer> {
        Err(match self {
            Attempt::Response(response) => return Ok(response),
            Attempt::ConnectFailed(error) | Attempt::AgentShort(error) => {
                LocalAnswer::ConnectFailed {
                    endpoint,
                    backend: backend.name(),
                    error,
                }
            }
            Attempt::TimedOut(after) => LocalAnswer::BackendTimeout {
                endpoint,
                backend: backend.name(),
                after,
            },
            Attempt::Failed { error, reset } => LocalAnswer::BackendFailed {
                endpoint,
                backend: backend.name(),
                error,
                reset,
            },
            // Declined at every resend, or once with a body that could not be kept: unprocessed,
            // as a REFUSED_STREAM says (UNAVAILABLE; an HTTP/2 gRPC caller gets its stream
            // refused, which gRPC clients send again by themselves).
            Attempt::Declined { error, .. } => LocalAnswer::BackendFailed {
                endpoint,
                backend: backend.name(),
                error,
                reset: Some(u32::from(h2::Reason::REFUSED_STREAM)),
            },
        })
    }
}

/// Where a request goes: a backend, and the endpoint a persisted session names, if any (tried
/// first while it serves).
pub(super) struct Target<'a> {
    pub backend: &'a Backend,
    pub pinned: Option<SocketAddr>,
}

/// Sends a request to `backend` and relays the answer: endpoint choice, retries, the rule's
/// timeouts (over the answer's body too), upgrades. `grpc`: the caller speaks gRPC (a timeout in
/// the body then ends it with DEADLINE_EXCEEDED).
#[allow(clippy::manual_async_fn)] // see below
pub(super) fn forward<'p, 't, 'r, 'l, 'a>(
    proxy: &'p Arc<Proxy>,
    target: Target<'t>,
    mut parts: http::request::Parts,
    mut body: RequestBody,
    rule: Option<&'r CompiledRule>,
    grpc: bool,
    log: &'l mut AccessLog<'a>,
) -> impl std::future::Future<Output = Result<Response<ProxyBody>, LocalAnswer>> + use<'p, 't, 'r, 'l, 'a>
{
    // Not an `async fn`: one holds each argument twice (as given, and moved into its body),
    // 330 bytes here, in a future moved at each level it is awaited through.
    async move {
        let backend = target.backend;
        let request_timeout = rule.and_then(|r| r.timeouts().request);
        let attempt_timeout = rule.and_then(|r| r.timeouts().backend_request);
        let tunnel = is_tunnel(&parts);
        let upgrade = strip_request_hop_by_hop(&mut parts) || tunnel;
        let downstream_upgrade = upgrade
            .then(|| parts.extensions.remove::<hyper::upgrade::OnUpgrade>())
            .flatten();
        let protocol = backend.protocol_for(rule.map(|r| r.route.kind()));
        let h2 = !upgrade && protocol.is_h2(parts.version == Version::HTTP_2);
        let retry = rule.and_then(|r| r.retry());
        // Without a retry policy, a refused connection still gets one more try on another endpoint:
        // nothing was sent.
        let max_attempts = 1 + retry.map_or(1, |r| r.attempts);
        // Resends of a request declined unprocessed beyond those attempts (see below).
        let mut spare_resends = SPARE_RESENDS_WHEN_DECLINED;
        // The clock is read here only for what needs it: a rule's timeouts, a written access log.
        let log_written = log.written;
        let started = (request_timeout.is_some() || log_written).then(Instant::now);
        let mut attempt_started = None;
        // Inline for the usual one or two attempts: no allocation per request.
        let mut tried: smallvec::SmallVec<[SocketAddr; 2]> = smallvec::SmallVec::new();
        // How the last attempt that a backend may have processed (it failed after it was sent, timed
        // out, or answered with a status retried) ended: the request can no longer be called
        // unprocessed, and its caller hears of that attempt.
        let mut processed: Option<LocalAnswer> = None;
        // An upgrade's count on its endpoint, kept apart from its answer (a 101 has no body to hold
        // it): it goes with the relay, which is load on the endpoint for its life, as an opaque
        // connection's is (an answer that refuses the upgrade holds none while its body streams).
        let mut upgrade_load = None;
        let run = async {
            // The first attempt always has its body; a retry takes its own when it is decided.
            let mut request_body = body.next_attempt().unwrap_or_else(body::empty);
            loop {
                let caller = log.conn.caller.ip;
                let Some((endpoint, held)) =
                    proxy
                        .upstream
                        .pick(backend, caller, target.pinned, &tried, rand::random())
                else {
                    return Err(LocalAnswer::NoReadyEndpoint(backend.name()));
                };
                tried.push(endpoint);
                log.endpoint = Some(endpoint);
                log.attempts += 1;
                if attempt_timeout.is_some() {
                    attempt_started = Some(Instant::now());
                }
                // Bodiless HTTP/1.1 requests go without copying `parts`.
                let head_only =
                    !h2 && inline::handles_parts(&parts.method, &parts.headers, &request_body);
                let (state, authority) = (held.endpoint(), held.authority());
                // The count goes with the answer's body: the power of two choices sees a long answer
                // (a download, a gRPC stream) as load until its end. Dropped with a failed exchange.
                let mut load = Some(held.into_owned());
                if upgrade {
                    upgrade_load = load.take();
                }
                // A kept connection that failed stale is resent once on a new one (RFC 9112
                // §9.3.1); under a retry policy, within its attempts left and as one of them (without
                // one, a refused connect keeps its one more try elsewhere).
                let resends = match retry {
                    Some(_) => max_attempts.saturating_sub(log.attempts),
                    None => 1,
                };
                let mut resends_left = resends;
                let call = async {
                    if head_only {
                        let host = http1_host(&parts, authority);
                        let host = host.as_ref().map(|h| h.as_str());
                        return proxy
                            .upstream
                            .inline
                            .send_head(endpoint, &parts, host, load, &mut resends_left)
                            .await;
                    }
                    let request = upstream_request(&parts, authority, h2, request_body);
                    // Boxed: hyper's exchange would otherwise size every request's future.
                    Box::pin(proxy.upstream.send(endpoint, h2, request, load)).await
                };
                let attempt = attempt(call, attempt_timeout).await;
                if retry.is_some() {
                    log.attempts += resends - resends_left;
                }
                let attempt = match attempt {
                    // The caller's body broke off, or the attempt timed out waiting for the caller's
                    // next bytes (no endpoint could have answered the request incomplete): the
                    // caller failed the attempt, not the endpoint (three in a row would eject it for
                    // everyone), and a retry would wait on the caller again.
                    Attempt::Failed { error, .. } if body.caller_broke_off() => {
                        return Err(LocalAnswer::RequestBodyBrokeOff(error))
                    }
                    Attempt::TimedOut(after) if body.waiting_on_caller() => {
                        return Err(LocalAnswer::RequestBodyTimeout(after))
                    }
                    attempt => attempt,
                };
                match &attempt {
                    Attempt::Response(_) => proxy.upstream.endpoints.answered(state),
                    Attempt::TimedOut(_)
                    | Attempt::Failed { .. }
                    | Attempt::Declined { on_error: true, .. } => {
                        proxy.upstream.endpoints.failed(state)
                    }
                    Attempt::ConnectFailed(_) => proxy.upstream.endpoints.eject(state),
                    Attempt::Declined {
                        on_error: false, ..
                    }
                    | Attempt::AgentShort(_) => {}
                }
                // A request declined unprocessed (a refused stream: a gRPC server behind on its
                // calls refuses new ones past its limit, C-core's overload protection) goes again
                // beyond the attempts too, a few times, after a pause that lets the backend catch
                // up: nothing of it ran, and the caller's gRPC client, told of a refused stream,
                // failed the call UNAVAILABLE rather than send it again.
                let mut pause = None;
                let mut more = log.attempts < max_attempts;
                if !more && matches!(attempt, Attempt::Declined { .. }) && spare_resends > 0 {
                    spare_resends -= 1;
                    let used = SPARE_RESENDS_WHEN_DECLINED - spare_resends;
                    pause = Some(DECLINED_PAUSE * (1 << (used - 1)));
                    more = true;
                }
                let retry_wanted = more
                    && match &attempt {
                        Attempt::Response(response) => {
                            retry.is_some_and(|r| r.codes.contains(&response.status().as_u16()))
                        }
                        Attempt::ConnectFailed(_) => {
                            retry.is_some() || backend.endpoints.iter().any(|e| !tried.contains(e))
                        }
                        Attempt::TimedOut(_) | Attempt::Failed { .. } => retry.is_some(),
                        Attempt::Declined { .. } => true,
                        Attempt::AgentShort(_) => false,
                    };
                let resent = if retry_wanted {
                    body_for_retry(proxy, &mut body)
                } else {
                    None
                };
                if let Some(resent) = resent {
                    request_body = resent;
                    let declined = matches!(
                        attempt,
                        Attempt::Declined {
                            on_error: false,
                            ..
                        }
                    );
                    if declined && target.pinned == Some(endpoint) {
                        // A persisted session's endpoint that declined unprocessed (a stream it
                        // refused, a connection it rotates) is not given up: the session would move
                        // to another pod, its Set-Cookie naming that one (GEP-1619).
                        tried.retain(|tried| *tried != endpoint);
                    }
                    // A declined request, or a refused connect with an endpoint left untried, goes
                    // again at once: nothing was processed, and another endpoint may take it. Any
                    // other retry waits for the policy's backoff, which the spec says no retry of a
                    // failed request comes before (an endpoint refusing while its app restarts).
                    let at_once = match &attempt {
                        Attempt::Declined { .. } => true,
                        Attempt::ConnectFailed(_) => {
                            backend.endpoints.iter().any(|e| !tried.contains(e))
                        }
                        _ => false,
                    };
                    processed = match attempt {
                        Attempt::Response(retried) => Some(LocalAnswer::BackendFailed {
                            endpoint,
                            backend: backend.name(),
                            error: format!("answered {}, retried", retried.status()),
                            reset: None,
                        }),
                        Attempt::TimedOut(_) | Attempt::Failed { .. } => {
                            attempt.failure(endpoint, backend).err()
                        }
                        _ => processed,
                    };
                    if let Some(pause) = pause {
                        tokio::time::sleep(pause).await;
                    } else if !at_once {
                        backoff(retry.and_then(|r| r.backoff)).await;
                    }
                    continue;
                }
                return match (attempt, processed) {
                    // Declined after an attempt a backend may have processed (RFC 9113 §8.7): the
                    // caller hears of that attempt, not of a refusal, which a gRPC client would send
                    // again by itself beyond the route's retries.
                    (Attempt::Declined { .. }, Some(earlier)) => Err(earlier),
                    // A retry policy whose attempts all failed, the last without an answer: 503, as
                    // the Gateway API's conformance (HTTPRouteRetryConnectionError: 500 or 503) and
                    // Envoy answer; one failed exchange without a policy stays 502, and so does one
                    // whose retry could not be sent (its body was not kept).
                    (Attempt::Failed { error, reset: None }, _)
                        if retry.is_some() && log.attempts > 1 && log.attempts >= max_attempts =>
                    {
                        Err(LocalAnswer::RetriesExhausted {
                            endpoint,
                            backend: backend.name(),
                            attempts: log.attempts,
                            error,
                        })
                    }
                    (attempt, _) => attempt.failure(endpoint, backend),
                };
            }
        };
        let result = within(request_timeout, run)
            .await
            .unwrap_or_else(|limit| Err(LocalAnswer::RouteTimeout(limit)));
        body.answered();
        // Sent (mirrors send copies): the request's map serves a later head.
        header_maps::give_back(std::mem::take(&mut parts.headers));
        if log_written {
            log.upstream_duration = started.map(|s| s.elapsed());
        }
        let mut response = result?;
        let switched = response.status() == StatusCode::SWITCHING_PROTOCOLS
            || (tunnel && response.status().is_success());
        if switched {
            // Neither a 101 nor a 2xx to CONNECT has content, nor may say a length or coding (RFC
            // 9110 §8.6, §9.3.6): hyper's server refuses to send one that does, and the caller got
            // no answer.
            let headers = response.headers_mut();
            headers.remove(header::TRANSFER_ENCODING);
            headers.remove(header::CONTENT_LENGTH);
            if let Some(downstream) = downstream_upgrade {
                let upstream = hyper::upgrade::on(&mut response);
                splice_upgrade(proxy, downstream, upstream, upgrade_load);
            }
            return Ok(response);
        }
        strip_hop_by_hop(response.headers_mut(), false);
        let status = response.status();
        wire::answer_content_length(status, response.headers_mut());
        if grpc {
            // The agent may end a gRPC answer early with trailers of its own (its deadline, the
            // backend's connection lost): strict HTTP/2 clients reset a stream that falls short of
            // its length (RFC 9113 §8.1.1), and the caller would see INTERNAL instead of the status.
            // gRPC needs no length.
            response.headers_mut().remove(header::CONTENT_LENGTH);
        }
        // The answer goes out in the agent's own HTTP version, not the backend's (RFC 9110 §6.2):
        // hyper's server would write an HTTP/1.0 backend's `HTTP/1.0` status line to an HTTP/1.1
        // caller, and close its connection after the answer.
        *response.version_mut() = Version::default();
        // The timeouts cover the answer's body too.
        let body_deadline = [
            request_timeout.zip(started).map(|(t, s)| s + t),
            attempt_timeout.zip(attempt_started).map(|(t, s)| s + t),
        ]
        .into_iter()
        .flatten()
        .min();
        Ok(response.map(|b| AnswerEnd::wrap(b, body_deadline, grpc)))
    }
}

/// The request body for another attempt, taken as soon as the retry is decided: the last
/// attempt's connection may still be sending the body (answered early), reading on from the
/// caller, and what it read past the keeping limit could not be sent again after a backoff.
/// Taking it stops that. `None` when the body cannot be sent again: kept only in part (over the
/// limit: counted), or kept nowhere and read by the last attempt (or not given back yet: an
/// HTTP/2 stream's body is dropped by hyper's own task).
fn body_for_retry(proxy: &Proxy, body: &mut RequestBody) -> Option<ProxyBody> {
    let again = body.next_attempt();
    if again.is_none() && matches!(body, RequestBody::Recorded(_)) {
        proxy
            .metrics
            .retries_skipped_body
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    again
}

/// Resends of a request declined unprocessed past its attempts, and the pause before the first
/// (doubled before each next: 10, 20, 40 ms).
const SPARE_RESENDS_WHEN_DECLINED: u32 = 3;
const DECLINED_PAUSE: Duration = Duration::from_millis(10);

/// `future`'s output, or the `limit` it ran over. Not an async fn: one keeps its arguments apart
/// from what it awaits, so it would hold `future` twice (tried: the request's future doubled).
fn within<F: std::future::Future>(
    limit: Option<Duration>,
    future: F,
) -> impl std::future::Future<Output = Result<F::Output, Duration>> {
    use futures::future::{Either, FutureExt as _};
    match limit {
        None => Either::Left(future.map(Ok)),
        Some(limit) => Either::Right(
            tokio::time::timeout(limit, future).map(move |timed| timed.map_err(|_| limit)),
        ),
    }
}

async fn backoff(wait: Option<Duration>) {
    if let Some(wait) = wait {
        tokio::time::sleep(wait).await;
    }
}

/// The request as sent to `endpoint`. Its authority is the caller's (the Host header, else the
/// HTTP/2 `:authority`, as the filters left it): HTTP/1.1 upstreams get it as Host, HTTP/2 ones
/// as `:authority` and no `host` field (RFC 9113 §8.3.1: a server may treat a differing Host as
/// malformed).
pub(super) fn upstream_request(
    parts: &http::request::Parts,
    endpoint: &http::uri::Authority,
    h2: bool,
    body: ProxyBody,
) -> Request<ProxyBody> {
    let mut request = Request::new(body);
    *request.method_mut() = parts.method.clone();
    *request.headers_mut() = parts.headers.clone();
    // The caller's authority: its Host, else its URI's (HTTP/2 callers name it there).
    let caller_authority = || {
        parts
            .headers
            .get(header::HOST)
            .and_then(|h| http::uri::Authority::try_from(h.as_bytes()).ok())
            .or_else(|| parts.uri.authority().cloned())
    };
    let authority = if h2 {
        request.headers_mut().remove(header::HOST);
        // The upstream's HPACK table keeps values: none may hold the caller's read buffer.
        super::header_maps::own_values(request.headers_mut());
        Some(caller_authority().unwrap_or_else(|| endpoint.clone()))
    } else {
        join_cookie_crumbs(request.headers_mut());
        if request.headers().contains_key(header::TE) {
            // On HTTP/1.1 a TE goes with its connection option (RFC 9110 §10.1.4).
            request
                .headers_mut()
                .append(header::CONNECTION, http::HeaderValue::from_static("te"));
        }
        // A body of no stated length (an HTTP/2 caller's, or a chunked one whose coding went
        // as hop-by-hop) goes chunked whatever the method: hyper's client sends a GET's or a
        // DELETE's without a length as no body at all, dropped unsaid.
        let body = request.body();
        if !body.is_end_stream()
            && body.size_hint().exact().is_none()
            && !parts.headers.contains_key(header::CONTENT_LENGTH)
        {
            request.headers_mut().insert(
                header::TRANSFER_ENCODING,
                http::HeaderValue::from_static("chunked"),
            );
        }
        if let Some(authority) = http1_host(parts, endpoint) {
            if let Ok(host) = authority.as_str().parse() {
                request.headers_mut().insert(header::HOST, host);
            }
        }
        None
    };
    // Shares the caller's bytes: no copy. A target in absolute form without a path
    // (`http://svc?q`) keeps `?q` for its path and query, which goes out as `/?q`: `:path` starts
    // with `/` (RFC 9113 §8.3.1; Go and nghttp2 reset a stream whose `:path` does not).
    let path_and_query = match parts.uri.path_and_query() {
        Some(pq) if pq.as_str().starts_with('?') => format!("/{}", pq.as_str())
            .parse()
            .unwrap_or_else(|_| http::uri::PathAndQuery::from_static("/")),
        Some(pq) => pq.clone(),
        None => http::uri::PathAndQuery::from_static("/"),
    };
    *request.uri_mut() = match authority {
        // A CONNECT goes out in authority form, as it came (RFC 9112 §3.2.3).
        None if is_tunnel(parts) => parts.uri.clone(),
        // HTTP/1.1 requests go out in origin form (`/path?query`), or in absolute form as they
        // came (`wire::absolute_origin`).
        None => match wire::absolute_origin(parts) {
            Some((scheme, host)) => http::Uri::builder()
                .scheme(scheme)
                .authority(host)
                .path_and_query(path_and_query.clone())
                .build()
                .unwrap_or_else(|_| path_and_query.into()),
            None => path_and_query.into(),
        },
        Some(authority) => http::Uri::builder()
            .scheme(http::uri::Scheme::HTTP)
            .authority(authority)
            .path_and_query(path_and_query)
            .build()
            .unwrap_or_else(|_| http::Uri::from_static("/")),
    };
    *request.version_mut() = if h2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    request
}

/// The Host an HTTP/1.1 upstream gets when the caller sent none: HTTP/2 callers name the
/// authority in the URI; else the endpoint's. `None`: the caller's Host goes as it is.
fn http1_host(
    parts: &http::request::Parts,
    endpoint: &http::uri::Authority,
) -> Option<http::uri::Authority> {
    if parts.headers.contains_key(header::HOST) {
        return None;
    }
    Some(parts.uri.authority().unwrap_or(endpoint).clone())
}

/// HTTP/2 splits `Cookie` into one field per pair ("crumbs"); before an HTTP/1.1 hop they are
/// joined back into one field with `; ` (RFC 9113 §8.2.3): HTTP/1.1 servers expect one.
fn join_cookie_crumbs(headers: &mut HeaderMap) {
    let mut crumbs = headers.get_all(header::COOKIE).iter();
    let (Some(first), Some(_)) = (crumbs.next(), crumbs.next()) else {
        return;
    };
    let mut joined = first.as_bytes().to_vec();
    for crumb in headers.get_all(header::COOKIE).iter().skip(1) {
        joined.extend_from_slice(b"; ");
        joined.extend_from_slice(crumb.as_bytes());
    }
    if let Ok(value) = http::HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, value);
    }
}

/// Runs one upstream exchange within the attempt's timeout.
fn attempt(
    call: impl std::future::Future<Output = Result<Response<ProxyBody>, UpstreamError>>,
    timeout: Option<Duration>,
) -> impl std::future::Future<Output = Attempt> {
    // Not an async fn: it would hold `call` twice, as its argument and as awaited.
    use futures::FutureExt as _;
    within(timeout, call).map(|timed| match timed {
        Err(limit) => Attempt::TimedOut(limit),
        Ok(Ok(response)) => Attempt::Response(response),
        Ok(Err(UpstreamError::Connect(e))) => Attempt::ConnectFailed(e),
        Ok(Err(UpstreamError::AgentShort(e))) => Attempt::AgentShort(e),
        Ok(Err(UpstreamError::Failed(error))) => Attempt::Failed { error, reset: None },
        Ok(Err(UpstreamError::Reset(code, error))) => Attempt::Failed {
            error,
            reset: Some(code),
        },
        Ok(Err(UpstreamError::Declined { error, on_error })) => {
            Attempt::Declined { error, on_error }
        }
    })
}

/// After a 101, the two upgraded connections are joined byte for byte (WebSocket and friends)
/// by a pump, which a successor can take over; bytes hyper read past either handshake go first.
fn splice_upgrade(
    proxy: &Arc<Proxy>,
    downstream: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    load: Option<OwnedInFlight>,
) {
    let proxy = proxy.clone();
    tokio::spawn(async move {
        let _load = load;
        let (Ok(down), Ok(up)) = tokio::join!(downstream, upstream) else {
            tracing::debug!("an upgrade did not complete");
            return;
        };
        let down = match down.downcast::<DownstreamIo>() {
            Ok(down) => down,
            Err(down) => {
                // Not a TCP client (the fuzz target's pipe): copied, not handed over.
                let (mut down, mut up) = (TokioIo::new(down), TokioIo::new(up));
                let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                return;
            }
        };
        // The upstream pool's connections are always TCP (`Http1Pool::connect`).
        let Ok(up) = up.downcast::<TokioIo<tokio::net::TcpStream>>() else {
            tracing::warn!("an upgraded upstream connection is not TCP; closing it");
            return;
        };
        // Relayed as opaque bytes from now on: a peer may keep its window shut for as long as
        // its protocol allows (`upstream::connect_http`).
        let _ = rustix::net::sockopt::set_tcp_user_timeout(up.io.inner(), 0);
        // `_held`: a drain waits for the pump (the HTTP task that upgraded it has ended).
        let (client, unread, _held) = match down.io.into_inner().into_inner().into_parts() {
            Ok(parts) => parts,
            Err(e) => {
                tracing::warn!(error = %e, "upgraded connection: registering it failed; closing it");
                return;
            }
        };
        let to_upstream = Flow {
            // hyper's buffered bytes came first, then those it had not read yet.
            pending: [&down.read_buf[..], &unread].concat(),
            ..Flow::default()
        };
        let to_client = Flow {
            pending: up.read_buf.to_vec(),
            ..Flow::default()
        };
        let end = proxy
            .pumps
            .run(client, up.io.into_inner(), to_upstream, to_client)
            .await;
        tracing::debug!(?end, "upgraded connection ended");
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint() -> http::uri::Authority {
        super::super::upstream::authority_of("10.0.0.1:8080".parse().unwrap())
    }

    /// Whether a request asks an upgrade, and what of its connection's fields it keeps, for each
    /// shape of request that names one (or looks as if).
    #[test]
    fn a_request_asks_an_upgrade_and_keeps_its_upgrade_field_only_when_relayed() {
        // A shape's name, method, version and fields; whether it asks an upgrade; what is left.
        type Fields = &'static [(&'static str, &'static str)];
        let shapes: [(&str, http::Method, Version, Fields, bool, Fields); 7] = [
            (
                "plain",
                http::Method::GET,
                Version::HTTP_11,
                &[],
                false,
                &[],
            ),
            (
                "websocket",
                http::Method::GET,
                Version::HTTP_11,
                &[("connection", "Upgrade"), ("upgrade", "websocket")],
                true,
                &[("connection", "upgrade"), ("upgrade", "websocket")],
            ),
            (
                "an h2c offer, dropped",
                http::Method::GET,
                Version::HTTP_11,
                &[
                    ("connection", "Upgrade, HTTP2-Settings"),
                    ("upgrade", "h2c"),
                    ("http2-settings", "AAMAAABkAAQCAAAAAAIAAAAA"),
                ],
                false,
                &[],
            ),
            (
                "no Connection",
                http::Method::GET,
                Version::HTTP_11,
                &[("upgrade", "websocket")],
                true,
                &[("connection", "upgrade"), ("upgrade", "websocket")],
            ),
            (
                "HTTP/1.0",
                http::Method::GET,
                Version::HTTP_10,
                &[("connection", "Upgrade"), ("upgrade", "websocket")],
                false,
                &[],
            ),
            (
                "a tunnel",
                http::Method::CONNECT,
                Version::HTTP_11,
                &[("connection", "Upgrade"), ("upgrade", "websocket")],
                true,
                &[],
            ),
            (
                "a tunnel without",
                http::Method::CONNECT,
                Version::HTTP_11,
                &[("x-other", "1")],
                false,
                &[("x-other", "1")],
            ),
        ];
        for (shape, method, version, fields, asks, left) in shapes {
            let mut request = Request::builder().method(method).uri("/");
            for (name, value) in fields {
                request = request.header(*name, *value);
            }
            let (mut parts, ()) = request.body(()).unwrap().into_parts();
            parts.version = version;
            assert_eq!(strip_request_hop_by_hop(&mut parts), asks, "{shape}");
            let mut kept: Vec<_> = parts
                .headers
                .iter()
                .map(|(name, value)| (name.as_str(), value.to_str().unwrap()))
                .collect();
            kept.sort();
            assert_eq!(kept, left, "{shape}");
        }
    }

    #[test]
    fn cookie_crumbs_are_joined_for_http1_upstreams_only() {
        let (mut parts, ()) = Request::get("http://catalog/x")
            .header(header::COOKIE, "a=1")
            .header(header::COOKIE, "b=2")
            .body(())
            .unwrap()
            .into_parts();
        parts.version = Version::HTTP_2;
        let endpoint = endpoint();
        let h1 = upstream_request(&parts, &endpoint, false, body::empty());
        let cookies: Vec<_> = h1.headers().get_all(header::COOKIE).iter().collect();
        assert_eq!(cookies, ["a=1; b=2"]);
        // Origin form on the wire, the caller's authority as Host.
        assert_eq!(h1.uri(), "/x");
        assert_eq!(h1.headers()[header::HOST], "catalog");
        let h2 = upstream_request(&parts, &endpoint, true, body::empty());
        assert_eq!(h2.headers().get_all(header::COOKIE).iter().count(), 2);
    }

    /// `GET http://catalog?x=1 HTTP/1.1`: a target without a path; `:path` must start with `/`.
    #[test]
    fn a_target_without_a_path_goes_out_with_one() {
        let (mut parts, ()) = Request::get("http://catalog?x=1")
            .header(header::HOST, "catalog")
            .body(())
            .unwrap()
            .into_parts();
        parts.version = Version::HTTP_11;
        let endpoint = endpoint();
        for h2 in [true, false] {
            let request = upstream_request(&parts, &endpoint, h2, body::empty());
            assert_eq!(
                request.uri().path_and_query().map(|pq| pq.as_str()),
                Some("/?x=1"),
                "h2: {h2}"
            );
        }
    }

    /// The agent's own HTTP/1.1 exchange writes a bodiless request's head from the caller's
    /// parts; hyper's client gets the request `upstream_request` builds. Both say the same.
    #[test]
    fn http1_heads_written_from_parts_say_what_the_built_request_says() {
        let endpoint = endpoint();
        let lines = |head: Vec<u8>| {
            let text = String::from_utf8(head).unwrap();
            let mut lines: Vec<String> = text.split("\r\n").map(str::to_owned).collect();
            lines[1..].sort();
            lines
        };
        for (version, host) in [(Version::HTTP_2, None), (Version::HTTP_11, Some("catalog"))] {
            let mut request = Request::get("http://catalog:8080/x?y=1")
                .header(header::COOKIE, "a=1")
                .header(header::TE, "trailers")
                .header("x-c", "3")
                .header(header::COOKIE, "b=2");
            if let Some(host) = host {
                request = request.header(header::HOST, host);
            }
            let (mut parts, ()) = request.body(()).unwrap().into_parts();
            parts.version = version;
            let built = upstream_request(&parts, &endpoint, false, body::empty());
            let mut from_built = Vec::new();
            let origin = built
                .uri()
                .scheme_str()
                .zip(built.uri().authority().map(|a| a.as_str()));
            let target = (origin, built.uri().path_and_query());
            wire::request_head(
                built.method(),
                target,
                built.headers(),
                None,
                &mut from_built,
            );
            let mut from_parts = Vec::new();
            let added_host = http1_host(&parts, &endpoint);
            let added_host = added_host.as_ref().map(|h| h.as_str());
            let target = (wire::absolute_origin(&parts), parts.uri.path_and_query());
            wire::request_head(
                &parts.method,
                target,
                &parts.headers,
                added_host,
                &mut from_parts,
            );
            assert_eq!(lines(from_parts), lines(from_built), "{version:?}");
        }
    }

    #[test]
    fn each_hop_by_hop_field_goes_alone_and_the_others_stay() {
        let end_to_end = [("x-a", "1"), ("accept", "*/*"), ("host", "catalog")];
        let map = |extra: &[(&str, &str)]| {
            let mut headers = HeaderMap::new();
            for (name, value) in end_to_end.iter().chain(extra) {
                headers.append(
                    HeaderName::from_bytes(name.as_bytes()).unwrap(),
                    value.parse().unwrap(),
                );
            }
            headers
        };
        let mut untouched = map(&[]);
        strip_hop_by_hop(&mut untouched, false);
        assert_eq!(untouched, map(&[]));
        for name in HOP_BY_HOP.iter().chain([&header::UPGRADE]) {
            let mut headers = map(&[(name.as_str(), "x")]);
            strip_hop_by_hop(&mut headers, false);
            assert_eq!(headers, map(&[]), "{name}");
        }
        // A field the Connection field names goes with it.
        let mut named = map(&[("x-hop", "1"), ("connection", "x-hop")]);
        strip_hop_by_hop(&mut named, false);
        assert_eq!(named, map(&[]));
    }

    #[test]
    fn te_trailers_survives_with_its_connection_option_on_http1() {
        let (mut parts, ()) = Request::post("http://catalog/pkg.Catalog/Get")
            .header(header::TE, "trailers, deflate")
            .header(header::CONNECTION, "x-hop")
            .header("x-hop", "1")
            .header(header::TRANSFER_ENCODING, "chunked")
            .body(())
            .unwrap()
            .into_parts();
        strip_hop_by_hop(&mut parts.headers, false);
        assert_eq!(parts.headers[header::TE], "trailers");
        for gone in ["x-hop", "connection", "transfer-encoding"] {
            assert!(!parts.headers.contains_key(gone), "{gone}");
        }
        let endpoint = endpoint();
        let h2 = upstream_request(&parts, &endpoint, true, body::empty());
        assert_eq!(h2.headers()[header::TE], "trailers");
        assert!(!h2.headers().contains_key(header::CONNECTION));
        let h1 = upstream_request(&parts, &endpoint, false, body::empty());
        assert_eq!(h1.headers()[header::TE], "trailers");
        assert_eq!(h1.headers()[header::CONNECTION], "te");
        let (mut other, ()) = Request::get("http://catalog/")
            .header(header::TE, "gzip")
            .body(())
            .unwrap()
            .into_parts();
        strip_hop_by_hop(&mut other.headers, false);
        assert!(!other.headers.contains_key(header::TE));
    }
}
