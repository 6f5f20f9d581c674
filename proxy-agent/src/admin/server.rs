//! The admin HTTP server, on its own thread and single-threaded runtime.

use super::explain::explain;
use crate::proxy::drain::{turned_true, Drain};
use crate::proxy::upstream::EndpointStats;
use crate::telemetry::metrics::UpstreamCounts;
use crate::telemetry::readiness::{monotonic_ms, HEARTBEAT_LIMIT};
use crate::telemetry::{Metrics, Readiness};
use arc_swap::ArcSwap;
use bytes::Bytes;
use gamma_engine::model::ObjectKey;
use gamma_engine::routes::{RequestHead, Snapshot};
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone)]
pub struct AdminState {
    pub snapshot: Arc<ArcSwap<Snapshot>>,
    pub metrics: Arc<Metrics>,
    pub endpoints: Arc<EndpointStats>,
    pub readiness: Arc<Readiness>,
}

/// What a listener of the admin server answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exposure {
    /// Everything: health, metrics, the table (`/config_dump`) and `/explain`. For loopback.
    Admin,
    /// `/metrics` alone, for a scraper on the network: the table and `/explain` tell how the
    /// cluster's traffic flows, which a node's neighbours need not learn.
    MetricsOnly,
}

/// A listening socket of the admin server.
pub struct AdminListener {
    pub listener: std::net::TcpListener,
    pub exposure: Exposure,
    /// Handed over by a running agent that still accepts on it until it is told to stop: served
    /// only from then on (see [`spawn`]).
    pub shared: bool,
}

/// Serves on each listener (bound by the caller, so a bad address fails at start; or handed over
/// by a predecessor), each on a thread of its own (a flood of scrapes cannot starve the kubelet's
/// probes), until `drain` stops the accept loops: a successor then answers alone (the probes
/// included), and requests already accepted are answered.
///
/// A shared listener is accepted on once `alone` turns true (the running agent stopped
/// accepting, or went): until then the kernel would hand each scrape to either process, and
/// counters from two processes alternating read as resets to `rate()`, each counting the other's
/// total as new. Its probes meanwhile get the running agent's answers ("handing over").
pub fn spawn(
    listeners: Vec<AdminListener>,
    state: AdminState,
    drain: &Drain,
    alone: &tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<Vec<SocketAddr>> {
    let mut locals = Vec::with_capacity(listeners.len());
    // Shared by every listener: a dual-stack node has two `--metrics` listeners, and the bounds
    // are the node's.
    let rendering = Arc::new(tokio::sync::Semaphore::new(RENDERS_AT_ONCE));
    let slots = Slots::default();
    for AdminListener {
        listener,
        exposure,
        shared,
    } in listeners
    {
        listener.set_nonblocking(true)?;
        locals.push(listener.local_addr()?);
        let (running, stop) = drain.acceptor();
        let alone = shared.then(|| alone.clone());
        let (state, rendering, slots) = (state.clone(), rendering.clone(), slots.clone());
        let name = match exposure {
            Exposure::Admin => "admin",
            Exposure::MetricsOnly => "metrics",
        };
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("admin runtime");
                runtime.block_on(async move {
                    let listener =
                        tokio::net::TcpListener::from_std(listener).expect("admin listener");
                    let bounds = (rendering, slots);
                    accept(listener, exposure, state, bounds, running, stop, alone).await
                });
            })?;
    }
    Ok(locals)
}

/// Connections the `--metrics` listeners serve at once: they face the node's network, where any pod
/// may open thousands; past it a connection is closed as soon as accepted.
const METRICS_CONNECTIONS: usize = 32;
/// Of them, those one source address may hold: a scraper needs one, so that a pod holding
/// connections open takes a few slots and leaves the scrapers theirs.
const METRICS_CONNECTIONS_PER_SOURCE: usize = 4;

/// Answers rendered at once by all listeners (see [`renders`]), each on a blocking pool's thread.
const RENDERS_AT_ONCE: usize = 2;

/// The `--metrics` listeners' connection slots, counted per source address.
#[derive(Clone, Default)]
struct Slots(Arc<std::sync::Mutex<std::collections::HashMap<IpAddr, usize>>>);

/// A connection's slot, given back when dropped.
struct Slot {
    slots: Slots,
    source: IpAddr,
}

impl Slots {
    fn take(&self, source: IpAddr) -> Option<Slot> {
        let mut held = self.0.lock().expect("not poisoned");
        let total: usize = held.values().sum();
        let by_source = held.get(&source).copied().unwrap_or(0);
        if total >= METRICS_CONNECTIONS || by_source >= METRICS_CONNECTIONS_PER_SOURCE {
            return None;
        }
        held.insert(source, by_source + 1);
        Some(Slot {
            slots: self.clone(),
            source,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = self.slots.0.lock().expect("not poisoned");
        if let Some(count) = held.get_mut(&self.source) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.source);
            }
        }
    }
}

/// How long a `--metrics` connection may take to send a request head, and live at most: a
/// scraper asks at once and again within its interval, and reconnects when closed.
const METRICS_HEAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
const METRICS_CONNECTION_LIFETIME: std::time::Duration = std::time::Duration::from_secs(120);

async fn accept(
    listener: tokio::net::TcpListener,
    exposure: Exposure,
    state: AdminState,
    (rendering, slots): (Arc<tokio::sync::Semaphore>, Slots),
    _running: tokio_util::task::task_tracker::TaskTrackerToken,
    mut stop: tokio::sync::watch::Receiver<bool>,
    alone: Option<tokio::sync::watch::Receiver<bool>>,
) {
    if let Some(mut alone) = alone {
        tokio::select! {
            biased;
            () = turned_true(&mut stop) => return,
            () = turned_true(&mut alone) => {}
        }
    }
    loop {
        let (stream, source) = tokio::select! {
            biased;
            () = turned_true(&mut stop) => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // EMFILE and friends: wait a little rather than spin.
                    tracing::warn!(error = %e, "admin: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let slot = match exposure {
            Exposure::Admin => None,
            Exposure::MetricsOnly => match slots.take(source.ip()) {
                None => continue, // closed: the scraper tries again at its next interval
                slot => slot,
            },
        };
        let (state, rendering) = (state.clone(), rendering.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let service = service_fn(move |request: Request<Incoming>| {
                let (state, rendering) = (state.clone(), rendering.clone());
                let answer = match exposure {
                    Exposure::Admin => route,
                    Exposure::MetricsOnly => metrics_only,
                };
                async move {
                    if !renders(request.uri().path()) {
                        return Ok::<_, Infallible>(answer(&state, &request));
                    }
                    // Off this thread: a large table's dump (or explanation, or the metrics)
                    // takes long enough to hold the kubelet's probes past their 1 s timeout. A
                    // few at a time: scrapers in a loop must not take the node's cores.
                    let permit = rendering.acquire_owned().await.expect("never closed");
                    let rendered = tokio::task::spawn_blocking(move || {
                        let _permit = permit;
                        answer(&state, &request)
                    })
                    .await;
                    Ok(rendered.unwrap_or_else(|e| {
                        tracing::error!(error = %e, "admin: rendering an answer failed");
                        text(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "rendering the answer failed; see the agent's log\n",
                            "text/plain",
                        )
                    }))
                }
            });
            let mut http = hyper::server::conn::http1::Builder::new();
            if exposure == Exposure::MetricsOnly {
                http.timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(METRICS_HEAD_TIMEOUT);
            }
            let serving = http.serve_connection(TokioIo::new(stream), service);
            match exposure {
                Exposure::Admin => drop(serving.await),
                Exposure::MetricsOnly => {
                    drop(tokio::time::timeout(METRICS_CONNECTION_LIFETIME, serving).await)
                }
            }
        });
    }
}

fn text(
    status: StatusCode,
    body: impl Into<Bytes>,
    content_type: &'static str,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}

/// 405 for a method other than GET, saying which it takes (RFC 9110 §15.5.6: MUST).
fn only_get(body: &'static str) -> Response<Full<Bytes>> {
    let mut response = text(StatusCode::METHOD_NOT_ALLOWED, body, "text/plain");
    response
        .headers_mut()
        .insert(header::ALLOW, header::HeaderValue::from_static("GET"));
    response
}

/// Whether answering `path` renders the table or the metrics, which takes time with their size
/// (the probes and the 404s read a few flags).
fn renders(path: &str) -> bool {
    matches!(path, "/metrics" | "/config_dump" | "/explain")
}

fn route(state: &AdminState, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    if request.method() != Method::GET {
        return only_get("the admin server is read-only\n");
    }
    match request.uri().path() {
        "/live" => live(&state.readiness, monotonic_ms()),
        "/ready" => ready(&state.readiness),
        "/metrics" => metrics(state),
        "/config_dump" => {
            let dump = state.snapshot.load().dump();
            text(
                StatusCode::OK,
                serde_json::to_vec_pretty(&dump).unwrap_or_default(),
                "application/json",
            )
        }
        "/explain" => explain_request(state, request.uri().query().unwrap_or_default()),
        _ => text(
            StatusCode::NOT_FOUND,
            "endpoints: /live /ready /metrics /config_dump /explain\n",
            "text/plain",
        ),
    }
}

fn metrics(state: &AdminState) -> Response<Full<Bytes>> {
    text(
        StatusCode::OK,
        state.metrics.render(UpstreamCounts {
            in_flight: state.endpoints.in_flight_total(),
            ejections: state.endpoints.ejections(),
        }),
        "text/plain; version=0.0.4",
    )
}

/// A `--metrics` listener's answers: `/metrics`, and 404 for what stays on loopback.
fn metrics_only(state: &AdminState, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => metrics(state),
        (_, "/metrics") => only_get("GET /metrics only\n"),
        _ => text(
            StatusCode::NOT_FOUND,
            "this listener serves /metrics only; the admin server's other endpoints are on \
             --admin (loopback)\n",
            "text/plain",
        ),
    }
}

/// Live unless the control runtime has missed its heartbeats for [`HEARTBEAT_LIMIT`] (stuck:
/// the kubelet restarts the agent; its pods' connections fall back meanwhile).
fn live(readiness: &Readiness, now_ms: u64) -> Response<Full<Bytes>> {
    let beat = readiness.heartbeat_ms.load(Ordering::Relaxed);
    let silent = Duration::from_millis(now_ms.saturating_sub(beat));
    if beat != 0 && silent > HEARTBEAT_LIMIT {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "not live: the control runtime (the cluster's watches, the table, takeovers) has \
                 not run for {} s\n",
                silent.as_secs()
            ),
            "text/plain",
        );
    }
    text(StatusCode::OK, "live\n", "text/plain")
}

fn ready(readiness: &Readiness) -> Response<Full<Bytes>> {
    let synced = readiness.synced_at.load(Ordering::Relaxed);
    let stale = readiness.stale_since.load(Ordering::Relaxed);
    if synced == 0 {
        let waiting = readiness.waiting_for.lock().expect("not poisoned");
        let why = if waiting.is_empty() {
            // Synced: the listeners (and the kernel redirect, or a takeover) come next.
            "starting its listeners".to_string()
        } else {
            format!("the first sync of the sources has not completed; waiting for {waiting}")
        };
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
            "text/plain",
        );
    }
    if let Some(pid) = readiness.handing_over_to() {
        let which = match pid {
            0 => "in another pid namespace".to_string(),
            pid => format!("pid {pid}"),
        };
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "not ready: handing over to a successor ({which}), which says ready once it has \
                 synced\n"
            ),
            "text/plain",
        );
    }
    if let Some(reason) = readiness.redirect_refused.get() {
        // Ready like a stale table: the agent serves what it can, pods keep ordinary Service
        // routing, and a rollout is not held up on nodes it can do nothing about.
        return text(
            StatusCode::OK,
            format!("ready, without the kernel redirect: {reason}\n"),
            "text/plain",
        );
    }
    if stale > 0 {
        // Still serving the last good table: ready, but say since when it is stale.
        return text(
            StatusCode::OK,
            format!("ready (stale since unix {stale}: serving the last good table)\n"),
            "text/plain",
        );
    }
    text(StatusCode::OK, "ready\n", "text/plain")
}

/// `/explain?service=NS/NAME&port=P&caller_namespace=NS&method=GET&path=/x&header=name:value`
/// (or `address=IP:PORT` instead of service and port).
fn explain_request(state: &AdminState, query: &str) -> Response<Full<Bytes>> {
    let mut service = None;
    let mut port = None;
    let mut address = None;
    let mut caller = None;
    let mut method = Method::GET;
    let mut path = "/".to_string();
    let mut headers = http::HeaderMap::new();
    // Decoded as a form: `path=/x%3Fa%3D1%26b%3D2` carries a whole query to explain.
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        let v = v.into_owned();
        match &*k {
            "service" => service = v.split_once('/').map(|(ns, n)| ObjectKey::new(ns, n)),
            "port" => port = v.parse::<u16>().ok(),
            "address" => address = v.parse::<SocketAddr>().ok(),
            "caller_namespace" => caller = Some(v),
            "method" => method = Method::from_bytes(v.as_bytes()).unwrap_or(Method::GET),
            "path" => path = v,
            "header" => {
                if let Some((n, val)) = v.split_once(':') {
                    if let (Ok(n), Ok(val)) = (
                        http::HeaderName::from_bytes(n.trim().as_bytes()),
                        http::HeaderValue::from_str(val.trim()),
                    ) {
                        headers.append(n, val);
                    }
                }
            }
            _ => {}
        }
    }
    let snapshot = state.snapshot.load();
    let frontend = match (address, service, port) {
        (Some(a), _, _) => snapshot.frontend_at(a),
        (None, Some(s), Some(p)) => snapshot.frontend_of(&s, p),
        _ => {
            return text(
                StatusCode::BAD_REQUEST,
                "give address=IP:PORT, or service=NS/NAME and port=PORT\n",
                "text/plain",
            )
        }
    };
    let Some(frontend) = frontend else {
        return text(
            StatusCode::NOT_FOUND,
            "no such Service frontend in the current table\n",
            "text/plain",
        );
    };
    let uri: http::Uri = path.parse().unwrap_or_else(|_| http::Uri::from_static("/"));
    // Matched as the data plane matches it: after RFC 3986 normalization (`/x/../admin`).
    let normal = gamma_engine::routes::matches::normalize_path(uri.path());
    let head = RequestHead {
        method: &method,
        path: normal.as_deref().unwrap_or(uri.path()),
        query: uri.query(),
        headers: &headers,
        authority: uri.authority().map(|a| a.as_str()),
    };
    let body = explain(frontend, caller.as_deref(), &head);
    text(
        StatusCode::OK,
        serde_json::to_vec_pretty(&body).unwrap_or_default(),
        "application/json",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_live_once_the_control_runtime_stops_beating() {
        let readiness = Readiness::default();
        assert_eq!(
            live(&readiness, 1_000_000).status(),
            StatusCode::OK,
            "no beat yet"
        );
        readiness.heartbeat_ms.store(1_000_000, Ordering::Relaxed);
        let after = |d: Duration| 1_000_000 + d.as_millis() as u64;
        assert_eq!(
            live(&readiness, after(Duration::from_secs(5))).status(),
            StatusCode::OK
        );
        let stuck = live(&readiness, after(HEARTBEAT_LIMIT + Duration::from_secs(1)));
        assert_eq!(stuck.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(format!("{:?}", stuck.body()).contains("has not run for 31 s"));
    }

    #[test]
    fn a_source_address_holds_a_few_metrics_connections_and_leaves_the_rest() {
        let slots = Slots::default();
        let pod: IpAddr = [10, 0, 0, 7].into();
        let pods_slots: Vec<Slot> = std::iter::from_fn(|| slots.take(pod)).take(100).collect();
        assert_eq!(pods_slots.len(), METRICS_CONNECTIONS_PER_SOURCE);
        let scraper: IpAddr = [10, 0, 0, 9].into();
        let scrape = slots.take(scraper).expect("the scraper gets a slot");
        // Many sources still fill them all, and a slot given back is free again.
        let others: Vec<Slot> = (1..=255u8)
            .filter_map(|last| slots.take([10, 1, 0, last].into()))
            .collect();
        assert_eq!(
            others.len(),
            METRICS_CONNECTIONS - METRICS_CONNECTIONS_PER_SOURCE - 1
        );
        assert!(slots.take(scraper).is_none(), "all taken");
        drop(scrape);
        assert!(slots.take(scraper).is_some());
        drop((pods_slots, others));
        assert!(slots.0.lock().unwrap().is_empty(), "every slot given back");
    }

    /// `GET path` on a new connection to `addr`, answered within 10 s: its status line.
    fn status_line(addr: SocketAddr, path: &str) -> std::io::Result<String> {
        use std::io::{BufRead, Write};
        let mut stream = std::net::TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(stream, "GET {path} HTTP/1.1\r\nHost: admin\r\n\r\n")?;
        let mut line = String::new();
        std::io::BufReader::new(stream).read_line(&mut line)?;
        Ok(line.trim_end().to_string())
    }

    fn empty_state() -> AdminState {
        AdminState {
            snapshot: Arc::default(),
            metrics: Arc::default(),
            endpoints: Arc::default(),
            readiness: Arc::default(),
        }
    }

    /// A scrape or a dump that takes long (a large table; here the metrics' lock held) must not
    /// hold the kubelet's probes behind it on the admin thread: they time out in 1 s, and a
    /// liveness probe failing restarts the agent.
    #[test]
    fn probes_are_answered_while_a_scrape_renders() {
        let state = empty_state();
        let drain = Drain::default();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let listener = AdminListener {
            listener,
            exposure: Exposure::Admin,
            shared: false,
        };
        let (_, alone) = tokio::sync::watch::channel(true);
        let addr = spawn(vec![listener], state.clone(), &drain, &alone).unwrap()[0];
        let held = state.metrics.runtimes.lock().unwrap();
        let scrape = std::thread::spawn(move || status_line(addr, "/metrics"));
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(
            status_line(addr, "/live").expect("/live answers while /metrics renders"),
            "HTTP/1.1 200 OK"
        );
        drop(held);
        assert_eq!(scrape.join().unwrap().unwrap(), "HTTP/1.1 200 OK");
    }

    /// A dual-stack node has a `--metrics` listener per address: the connection slots are the
    /// node's, so that a source address holding its share on one has none left on the other.
    #[test]
    fn metrics_listeners_share_their_connection_slots() {
        let state = empty_state();
        let drain = Drain::default();
        let metrics_only = |ip: &str| AdminListener {
            listener: std::net::TcpListener::bind((ip, 0)).unwrap(),
            exposure: Exposure::MetricsOnly,
            shared: false,
        };
        let (_, alone) = tokio::sync::watch::channel(true);
        let listeners = vec![metrics_only("127.0.0.1"), metrics_only("127.0.0.2")];
        let addrs = spawn(listeners, state, &drain, &alone).unwrap();
        let held: Vec<std::net::TcpStream> = (0..METRICS_CONNECTIONS_PER_SOURCE)
            .map(|_| std::net::TcpStream::connect(addrs[0]).unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(200));
        let refused = status_line(addrs[1], "/metrics");
        assert!(
            refused.as_deref().map_or(true, str::is_empty),
            "closed as accepted: {refused:?}"
        );
        drop(held);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(
            status_line(addrs[1], "/metrics").unwrap(),
            "HTTP/1.1 200 OK"
        );
    }

    /// A DaemonSet's next pod is in another pid namespace: `SO_PEERCRED` names it pid 0, which
    /// was taken for "no successor", so the old agent said ready to the new pod's probes.
    #[test]
    fn not_ready_while_handing_over_to_a_successor_whatever_its_pid() {
        let readiness = Readiness::default();
        readiness.synced_at.store(1, Ordering::Relaxed);
        assert_eq!(ready(&readiness).status(), StatusCode::OK);
        for (pid, says) in [(0, "in another pid namespace"), (4321, "pid 4321")] {
            readiness.set_handing_over_to(Some(pid));
            let answer = ready(&readiness);
            assert_eq!(answer.status(), StatusCode::SERVICE_UNAVAILABLE);
            let body = format!("{:?}", answer.body());
            assert!(body.contains(says), "{body}");
        }
        readiness.set_handing_over_to(None);
        assert_eq!(ready(&readiness).status(), StatusCode::OK);
    }
}
