//! The bodies of the fuzz targets, in a library so that they share the fixed world and the
//! in-process agent. Whatever the input, none of them may panic or hang: a panic here is a bug
//! of the agent or a broken invariant checked below, and the message says which.

use arc_swap::ArcSwap;
use bytes::Bytes;
use gamma_engine::index::Index;
use gamma_engine::manifests::{parse, Severity};
use gamma_engine::model::{Object, ObjectKey};
use gamma_engine::routes::{Decision, Plan, RequestHead, Snapshot};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use proxy_agent::proxy::detect::{classify, Protocol};
use proxy_agent::proxy::io::Rewound;
use proxy_agent::proxy::serve::{http1, serve_http};
use proxy_agent::proxy::{
    check_request_head, Caller, ConnectionInfo, Destination, Proxy, ProxyConfig,
};
use proxy_agent::telemetry::Metrics;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WORLD: &str = include_str!("../world.yaml");

/// The objects of the fixed world with its backends on `port`. The world must load cleanly: an
/// error here is a broken fixture, not a finding.
fn world_objects(port: u16) -> Vec<Object> {
    let text = WORLD.replace("BACKEND_PORT", &port.to_string());
    let parsed = parse(Path::new("world.yaml"), &text);
    let errors: Vec<String> = parsed
        .problems
        .iter()
        .filter(|p| p.severity == Severity::Error)
        .map(ToString::to_string)
        .collect();
    assert!(
        errors.is_empty(),
        "fuzz/world.yaml does not load: {errors:?}"
    );
    parsed.objects
}

fn published(objects: impl IntoIterator<Item = Object>) -> Index {
    let mut index = Index::new();
    for object in objects {
        index.apply(object);
    }
    index.publish();
    index
}

/// Manifest loader: any text through the file source's parser into the index, published;
/// then everything deleted again, which must leave an empty table.
pub fn manifest(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return; // the folder source reads files as UTF-8 and reports the others
    };
    let parsed = parse(Path::new("fuzz.yaml"), text);
    for problem in &parsed.problems {
        let _ = problem.to_string();
    }
    let references: Vec<_> = parsed.objects.iter().map(Object::reference).collect();
    let mut index = published(parsed.objects);
    let snapshot = index.snapshot();
    let _ = snapshot.dump();
    let _ = snapshot.mesh_addresses().count();
    for reference in &references {
        index.delete(reference);
    }
    index.publish();
    let emptied = index.snapshot();
    assert!(
        emptied.by_service.is_empty() && emptied.by_address.is_empty(),
        "deleting every object left frontends in the table"
    );
}

/// The pool of objects and the incremental-equals-scratch check, shared with the property test.
#[path = "../../gamma-engine/tests/support/incremental.rs"]
pub mod incremental;

/// Applies and deletes from the shared pool, as the bytes say (each byte: which object, whether
/// to delete it, whether to publish after), then checks that the incremental index publishes what
/// one built from scratch from the surviving objects does.
pub fn index_ops(data: &[u8]) {
    let pool = incremental::pool();
    let steps: Vec<incremental::Step> = data
        .iter()
        .take(256)
        .map(|b| incremental::Step {
            object: usize::from(b >> 2),
            delete: b & 1 == 1,
            publish: b & 2 == 2,
        })
        .collect();
    let (incremental, scratch) = incremental::incremental_and_scratch(&pool, &steps);
    assert_eq!(incremental, scratch, "the incremental index went stale");
}

/// A request head, parsed as an HTTP/1 server would (httparse), into `http` parts; `None` when
/// a server would refuse it.
fn request_parts(head: &[u8]) -> Option<http::request::Parts> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut request = httparse::Request::new(&mut headers);
    if !request.parse(head).ok()?.is_complete() {
        return None;
    }
    let mut builder = Request::builder()
        .method(request.method?)
        .uri(request.path?);
    for header in request.headers.iter() {
        builder = builder.header(header.name, header.value);
    }
    builder.body(()).ok().map(|r| r.into_parts().0)
}

/// Splits the input into the request head (with its blank line) and what follows it.
fn split_head(data: &[u8]) -> (&[u8], &[u8]) {
    for end in [&b"\r\n\r\n"[..], b"\n\n"] {
        if let Some(at) = data.windows(end.len()).position(|w| w == end) {
            return data.split_at(at + end.len());
        }
    }
    (data, &[])
}

fn fixed_table() -> &'static Arc<Snapshot> {
    static TABLE: OnceLock<Arc<Snapshot>> = OnceLock::new();
    TABLE.get_or_init(|| published(world_objects(8080)).snapshot())
}

/// The fixed world without its routes, for inputs that bring their own.
fn world_services() -> &'static [Object] {
    static SERVICES: OnceLock<Vec<Object>> = OnceLock::new();
    SERVICES.get_or_init(|| {
        world_objects(8080)
            .into_iter()
            .filter(|o| !matches!(o, Object::Route(_)))
            .collect()
    })
}

/// Route matcher: the input is a request head, optionally followed by YAML documents (routes,
/// usually). Without them the head is looked up in the fixed world; with them, in the fixed
/// world's Services plus those documents. Every frontend and caller group is asked, and each
/// matched rule's filters run.
pub fn route_match(data: &[u8]) {
    let (head, rest) = split_head(data);
    // Only what the agent would route: hyper parsed it, and the agent did not refuse it first.
    let Some(parts) = request_parts(head) else {
        return;
    };
    let request = Request::from_parts(parts, ());
    if check_request_head(&request, ProxyConfig::default().max_header_bytes).is_err() {
        return;
    }
    let custom;
    let snapshot = match std::str::from_utf8(rest).map(str::trim) {
        Ok("") | Err(_) => fixed_table(),
        Ok(routes) => {
            let routes = parse(Path::new("routes.yaml"), routes).objects;
            custom = published(world_services().iter().cloned().chain(routes)).snapshot();
            &custom
        }
    };
    let random = data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    });
    for frontend in snapshot.by_service.values().flat_map(|f| f.iter()) {
        let callers =
            std::iter::once(None).chain(frontend.consumers.keys().map(|n| Some(n.as_str())));
        for namespace in callers {
            let mut parts = request_parts(head).expect("parsed above");
            let decision = frontend.lookup(namespace, &RequestHead::from_parts(&parts));
            let Decision::Rule { rule, matched } = decision else {
                continue;
            };
            let asterisk = parts.uri == "*";
            match rule.plan(&mut parts, matched, frontend.port, random) {
                Plan::Respond(local, _) => {
                    if let Some(location) = local.location() {
                        assert!(
                            http::HeaderValue::from_str(location).is_ok(),
                            "a redirect's Location is not a valid header value: {location:?}"
                        );
                    }
                }
                Plan::Forward(_) => {
                    // What forward.rs sends: the path and query after the endpoint's address. The
                    // backend must see the path the route matched and the filters wrote.
                    // (An absolute-form target may have an empty path: `GET http://x?q`.)
                    if asterisk {
                        continue;
                    }
                    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
                    let upstream = format!("http://127.0.0.1:8080{path}").parse::<Uri>();
                    assert!(
                        upstream
                            .as_ref()
                            .is_ok_and(|u| u.path() == parts.uri.path()),
                        "the backend would be sent {upstream:?} for the path {:?}",
                        parts.uri.path()
                    );
                }
            }
        }
    }
}

/// The agent as the http1 target sees it: a proxy on the fixed world whose backend runs in the
/// same single-threaded runtime, so that one input is one deterministic-enough exchange.
struct Harness {
    runtime: tokio::runtime::Runtime,
    proxy: Arc<Proxy>,
    /// A proxy's parts, for a fresh one (empty upstream pools) per `upstream_answer` exchange.
    snapshot: Arc<ArcSwap<Snapshot>>,
    config: ProxyConfig,
    /// The backend that answers a connection's first request with [`raw_answer`]'s bytes.
    raw_backend: SocketAddr,
    info: Arc<ConnectionInfo>,
    /// Kept so that connections never see a shutdown.
    shutdown: tokio::sync::watch::Sender<bool>,
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        // libFuzzer's `main` is C++, so the Rust runtime never set SIGPIPE to be ignored as it
        // does for the agent's binary: a vectored write (writev has no MSG_NOSIGNAL) to a
        // connection the backend closed would kill the fuzzer instead of failing with EPIPE.
        // SAFETY: setting a signal's disposition to SIG_IGN, before any other thread runs.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let port = runtime.block_on(backend());
        let raw_backend = runtime.block_on(raw_backend());
        let index = published(world_objects(port));
        let snapshot: Arc<ArcSwap<Snapshot>> = Arc::new(ArcSwap::new(index.snapshot()));
        let config = ProxyConfig {
            // Short, so that an input that leaves a request unfinished cannot stall the run.
            header_read_timeout: Duration::from_secs(1),
            ..ProxyConfig::default()
        };
        let proxy = Proxy::new(
            snapshot.clone(),
            Arc::new(Metrics::default()),
            config.clone(),
        );
        let info = Arc::new(ConnectionInfo {
            destination: Destination::Service {
                service: ObjectKey::new("ns", "front"),
                port: 80,
            },
            caller: Caller {
                ip: [127, 0, 0, 1].into(),
                namespace: Some("ns".into()),
                pod: None,
                identity: "fuzz",
                unverified: None,
            },
        });
        Harness {
            runtime,
            proxy,
            snapshot,
            config,
            raw_backend,
            info,
            shutdown: tokio::sync::watch::channel(false).0,
        }
    })
}

/// The fuzz backend on 127.0.0.1 (HTTP/1.1 and h2c): reads the whole request, answers 200, or
/// the status named by a `/status/<code>` path segment (so inputs can drive retries); accepts
/// any upgrade (101) and echoes what follows.
async fn backend() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the fuzz backend");
    let port = listener.local_addr().expect("bound").port();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(|mut request: Request<Incoming>| async move {
                        let mut seen = format!(
                            "{} {} {:?}\n",
                            request.method(),
                            request.uri(),
                            request.version()
                        );
                        for (name, value) in request.headers() {
                            seen.push_str(&format!("{name}: {value:?}\n"));
                        }
                        if let Some(protocol) =
                            request.headers().get(http::header::UPGRADE).cloned()
                        {
                            // Accept any upgrade and echo the bytes: the agent splices both sides.
                            forwarded().push(seen);
                            let upgrade = hyper::upgrade::on(&mut request);
                            tokio::spawn(async move {
                                if let Ok(upgraded) = upgrade.await {
                                    let (mut r, mut w) = tokio::io::split(TokioIo::new(upgraded));
                                    let _ = tokio::io::copy(&mut r, &mut w).await;
                                }
                            });
                            let mut response = Response::new(Full::new(Bytes::new()));
                            *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                            response
                                .headers_mut()
                                .insert(http::header::UPGRADE, protocol);
                            response.headers_mut().insert(
                                http::header::CONNECTION,
                                http::HeaderValue::from_static("upgrade"),
                            );
                            return Ok::<_, Infallible>(response);
                        }
                        let status = request
                            .uri()
                            .path()
                            .split("/status/")
                            .nth(1)
                            .and_then(|c| c.get(..3)?.parse().ok())
                            .and_then(|c| StatusCode::from_u16(c).ok())
                            .unwrap_or(StatusCode::OK);
                        let body = request.into_body().collect().await;
                        let bytes = match body {
                            Ok(body) => {
                                let body = body.to_bytes();
                                seen.push_str(&format!(
                                    "body {:?}",
                                    String::from_utf8_lossy(&body)
                                ));
                                body.len()
                            }
                            Err(e) => {
                                seen.push_str(&format!("{BODY_CUT_SHORT}: {e}"));
                                0
                            }
                        };
                        forwarded().push(seen);
                        let mut response =
                            Response::new(Full::new(Bytes::from(format!("{bytes}\n"))));
                        *response.status_mut() = status;
                        Ok::<_, Infallible>(response)
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    port
}

/// What the fuzz backend received during the current exchange: a text per request (its method,
/// target, version, fields in order and body).
fn forwarded() -> std::sync::MutexGuard<'static, Vec<String>> {
    static FORWARDED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    locked(&FORWARDED)
}

/// The harness for one input at a time: the seed replay (`tests/tests/fuzz_corpus.rs`) runs the
/// targets on parallel threads, and what the backends received and the upstream requests in
/// flight are the whole harness's.
fn alone() -> std::sync::MutexGuard<'static, ()> {
    static HARNESS_IN_USE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    locked(&HARNESS_IN_USE)
}

/// `shared` locked, whatever an earlier input that panicked left in it.
fn locked<T>(shared: &'static std::sync::Mutex<T>) -> std::sync::MutexGuard<'static, T> {
    shared
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// HTTP path: the input is what a client sends on one connection (see [`exchange`]), served by
/// the agent's servers (its own HTTP/1.1 one, which gives requests it does not serve itself to
/// hyper's, or hyper's HTTP/2 one, by the same first-bytes classification as the listener).
pub fn http_connection(data: &[u8]) {
    let http2 = match classify(&data[..data.len().min(24)]) {
        Some(Protocol::Http1) => false,
        Some(Protocol::Http2) => true,
        Some(Protocol::Opaque) | None => return,
    };
    let h = harness();
    let _alone = alone();
    let info = h.info.clone();
    exchange(data, move |server, shutdown| async move {
        if http2 {
            let _ = serve_http(&h.proxy, TokioIo::new(server), true, info, shutdown, None).await;
        } else {
            http1::serve(&h.proxy, Rewound::new(server), info, shutdown).await;
        }
    });
}

/// HTTP/1.1 framing, differential: the input is served twice, by the agent's own HTTP/1.1
/// server (which reads the requests it can itself and gives the rest of the connection to
/// hyper's) and by hyper's server alone, forwarding to a Service without routes. The backend
/// must receive the same requests (method, target, fields, body) and the client the same bytes
/// (the `date` field aside). Where they differ, the two servers split or read a connection's
/// bytes differently: what request smuggling is made of, or an answer a client sees only from
/// one of them.
pub fn http1_framing(data: &[u8]) {
    if classify(&data[..data.len().min(24)]) != Some(Protocol::Http1) {
        return;
    }
    let h = harness();
    let _alone = alone();
    let info = Arc::new(ConnectionInfo {
        destination: Destination::Service {
            service: ObjectKey::new("ns", "a"),
            port: 80,
        },
        ..(*h.info).clone()
    });
    let (own_answers, own_forwarded) = {
        let info = info.clone();
        exchange(data, move |server, shutdown| async move {
            http1::serve(&h.proxy, Rewound::new(server), info, shutdown).await;
        })
    };
    let (hyper_answers, hyper_forwarded) = exchange(data, move |server, shutdown| async move {
        let _ = serve_http(&h.proxy, TokioIo::new(server), false, info, shutdown, None).await;
    });
    let (own_forwarded, hyper_forwarded) = (
        complete_requests(own_forwarded),
        complete_requests(hyper_forwarded),
    );
    assert_eq!(
        own_forwarded, hyper_forwarded,
        "the backend received other requests from the agent's own HTTP/1.1 server (left) than \
         from hyper's (right)"
    );
    let (own_answers, hyper_answers) = (without_dates(&own_answers), without_dates(&hyper_answers));
    assert!(
        own_answers == hyper_answers,
        "the client received other bytes from the agent's own HTTP/1.1 server than from \
         hyper's:\n--- own\n{}\n--- hyper\n{}",
        String::from_utf8_lossy(&own_answers),
        String::from_utf8_lossy(&hyper_answers)
    );
}

/// The requests the backend received whole. One whose body broke off (a chunk malformed, say)
/// was cut short by the agent; whether its head reached the backend first is a race.
fn complete_requests(mut forwarded: Vec<String>) -> Vec<String> {
    forwarded.retain(|request| !request.contains(BODY_CUT_SHORT));
    forwarded
}

const BODY_CUT_SHORT: &str = "body cut short";

/// `bytes` with the value of each `date` field blanked (the two servers answer at other times).
fn without_dates(bytes: &[u8]) -> Vec<u8> {
    const FIELD: &[u8] = b"\r\ndate: ";
    let mut out = Vec::with_capacity(bytes.len());
    let mut rest = bytes;
    while let Some(at) = rest.windows(FIELD.len()).position(|w| w == FIELD) {
        out.extend_from_slice(&rest[..at + FIELD.len()]);
        rest = &rest[at + FIELD.len()..];
        let end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .unwrap_or(rest.len());
        out.push(b'-');
        rest = &rest[end..];
    }
    out.extend_from_slice(rest);
    out
}

/// One connection: `data` is what the client sends, `serve` the agent's server on the other end
/// of an in-memory pipe. The client's write side stays open while requests are being answered
/// (hyper closes a connection whose client half-closes mid-request, which would cut every
/// forward short), then closes; the connection must then end promptly and leave no upstream
/// request counted in flight. Returns what the client received and what the backend did.
fn exchange<F, Fut>(data: &[u8], serve: F) -> (Vec<u8>, Vec<String>)
where
    F: FnOnce(tokio::io::DuplexStream, tokio::sync::watch::Receiver<bool>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let h = harness();
    forwarded().clear();
    h.runtime.block_on(async {
        let (client, server) = tokio::io::duplex(data.len() + 64 * 1024);
        let served = tokio::spawn(serve(server, h.shutdown.subscribe()));
        let (mut from_agent, mut to_agent) = tokio::io::split(client);
        let received = Arc::new(AtomicUsize::new(0));
        let reader = tokio::spawn({
            let received = received.clone();
            async move {
                let mut answers = Vec::new();
                let mut buf = vec![0u8; 16 * 1024];
                while let Ok(n @ 1..) = from_agent.read(&mut buf).await {
                    received.fetch_add(n, Ordering::Relaxed);
                    if show_replies() {
                        eprint!("{}", String::from_utf8_lossy(&buf[..n]));
                    }
                    answers.extend_from_slice(&buf[..n]);
                }
                answers
            }
        });
        // The pipe holds the whole input: this never waits on the agent.
        let _ = to_agent.write_all(data).await;
        settle(h, &received, &served).await;
        let _ = to_agent.shutdown().await;
        match tokio::time::timeout(Duration::from_secs(10), served).await {
            Ok(joined) => {
                if let Err(e) = joined {
                    std::panic::resume_unwind(e.into_panic());
                }
            }
            Err(_) => panic!("the connection did not end within 10 s of the client closing it"),
        }
        let answers = reader.await.unwrap_or_default();
        // Mirrors finish on their own; give them a moment before counting.
        let deadline = Instant::now() + Duration::from_secs(2);
        while h.proxy.upstream.endpoints.in_flight_total() != 0 {
            assert!(
                Instant::now() < deadline,
                "{} upstream requests still counted in flight after the connection ended",
                h.proxy.upstream.endpoints.in_flight_total()
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        (answers, std::mem::take(&mut *forwarded()))
    })
}

/// What the raw backend answers a connection's first request with: the `upstream_answer` input.
fn raw_answer() -> std::sync::MutexGuard<'static, Vec<u8>> {
    static ANSWER: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());
    locked(&ANSWER)
}

/// The answer the raw backend gives to every later request on a connection.
const SECOND_ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nsecond";

/// How long the raw backend keeps a connection with no request coming: an answer delimited by
/// the close ends then.
const RAW_IDLE: Duration = Duration::from_millis(20);

/// A backend on 127.0.0.1 that answers each connection's first request with [`raw_answer`]'s
/// bytes as they are, and later ones with [`SECOND_ANSWER`]; it closes a connection idle for
/// [`RAW_IDLE`].
async fn raw_backend() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the raw fuzz backend");
    let addr = listener.local_addr().expect("bound");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut read = Vec::new();
                let mut buf = [0u8; 4096];
                let mut answered = 0;
                loop {
                    // A whole request: its head, and the body its Content-Length announces.
                    while let Some(end) = read.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&read[..end]).to_ascii_lowercase();
                        let body = head
                            .split("content-length:")
                            .nth(1)
                            .and_then(|rest| rest.lines().next()?.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        if read.len() < end + 4 + body {
                            break;
                        }
                        read.drain(..end + 4 + body);
                        let answer = match answered {
                            0 => raw_answer().clone(),
                            _ => SECOND_ANSWER.to_vec(),
                        };
                        answered += 1;
                        if stream.write_all(&answer).await.is_err() {
                            return;
                        }
                    }
                    match tokio::time::timeout(RAW_IDLE, stream.read(&mut buf)).await {
                        Ok(Ok(n @ 1..)) => read.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
            });
        }
    });
    addr
}

/// What a caller of the upstream sees of an answer, error texts aside (the two clients word them
/// differently).
#[derive(Debug, PartialEq)]
enum Outcome {
    Failed,
    Answer {
        status: u16,
        reason: Option<Vec<u8>>,
        headers: Fields,
        /// The body's bytes and trailers, or where it broke off.
        body: Result<(Vec<u8>, Fields), Vec<u8>>,
    },
}

/// Header fields as a caller reads them, in order.
type Fields = Vec<(String, Vec<u8>)>;

fn fields(map: &http::HeaderMap) -> Fields {
    map.iter()
        .map(|(name, value)| (name.to_string(), value.as_bytes().to_vec()))
        .collect()
}

/// One GET to the raw backend through `proxy`'s upstream: without a body it goes through the
/// agent's own HTTP/1.1 exchange, with one through hyper's client.
async fn upstream_outcome(proxy: &Proxy, endpoint: SocketAddr, path: &str, own: bool) -> Outcome {
    let body = if own {
        proxy_agent::proxy::body::empty()
    } else {
        proxy_agent::proxy::body::full("x")
    };
    let mut request = Request::get(path).body(body).expect("a request");
    request
        .headers_mut()
        .insert(http::header::HOST, http::HeaderValue::from_static("raw"));
    let exchange = async {
        let response = match proxy.upstream.send(endpoint, false, request, None).await {
            Ok(response) => response,
            Err(_) => return Outcome::Failed,
        };
        let (parts, mut body) = response.into_parts();
        let mut data = Vec::new();
        let mut trailers = Vec::new();
        let body = loop {
            match body.frame().await {
                None => break Ok((data, trailers)),
                Some(Err(_)) => break Err(data),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(bytes) => data.extend_from_slice(&bytes),
                    Err(frame) => {
                        if let Some(map) = frame.trailers_ref() {
                            trailers.extend(fields(map));
                        }
                    }
                },
            }
        };
        Outcome::Answer {
            status: parts.status.as_u16(),
            reason: parts
                .extensions
                .get::<hyper::ext::ReasonPhrase>()
                .map(|r| r.as_bytes().to_vec()),
            headers: fields(&parts.headers),
            body,
        }
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .expect("an upstream exchange took over 5 s")
}

/// Upstream answers, differential: the input is what a backend answers a request with. The
/// agent's own HTTP/1.1 exchange (bodiless requests) and hyper's client (the rest) must give the
/// caller the same answer: status, reason, fields, body and trailers, or both fail. A second
/// request to the same endpoint then gets the backend's next answer on the same connection, or
/// the first answer again on a new one: never bytes left over from the first answer (on a kept
/// connection, those would be the next caller's answer).
pub fn upstream_answer(data: &[u8]) {
    let h = harness();
    let _alone = alone();
    *raw_answer() = data.to_vec();
    let run = |own: bool| {
        // Fresh pools: no connection kept from an earlier input.
        let proxy = Proxy::new(
            h.snapshot.clone(),
            Arc::new(Metrics::default()),
            h.config.clone(),
        );
        h.runtime.block_on(async {
            let first = upstream_outcome(&proxy, h.raw_backend, "/first", own).await;
            let second = upstream_outcome(&proxy, h.raw_backend, "/second", own).await;
            (first, second)
        })
    };
    let (own_first, own_second) = run(true);
    let (hyper_first, _) = run(false);
    assert_eq!(
        own_first, hyper_first,
        "the agent's own HTTP/1.1 exchange (left) and hyper's client (right) read this answer differently"
    );
    let second = Outcome::Answer {
        status: 200,
        reason: None,
        headers: vec![("content-length".into(), b"6".to_vec())],
        body: Ok((b"second".to_vec(), Vec::new())),
    };
    assert!(
        own_second == second || own_second == own_first,
        "a second request through the agent's own exchange got {own_second:?}: neither the \
         backend's next answer nor the first one again"
    );
}

/// `GAMMA_FUZZ_SHOW_REPLIES=1`: print what the agent answered (when replaying one input).
fn show_replies() -> bool {
    static SHOW: OnceLock<bool> = OnceLock::new();
    *SHOW.get_or_init(|| std::env::var_os("GAMMA_FUZZ_SHOW_REPLIES").is_some_and(|v| v == "1"))
}

/// Waits until the agent has answered what it could: no upstream request in flight and no new
/// bytes for a few hundred scheduler turns (the backend shares this thread), or nothing new for
/// 20 ms (a request waiting for body bytes that will never come), or the connection ended.
async fn settle(h: &Harness, received: &AtomicUsize, served: &tokio::task::JoinHandle<()>) {
    const QUIET_TURNS: u32 = 256;
    const QUIET_TIME: Duration = Duration::from_millis(20);
    let mut last = usize::MAX;
    let mut quiet_turns = 0;
    let mut quiet_since = Instant::now();
    while !served.is_finished() {
        let now = received.load(Ordering::Relaxed);
        if now != last {
            last = now;
            quiet_turns = 0;
            quiet_since = Instant::now();
        } else if h.proxy.upstream.endpoints.in_flight_total() == 0 {
            quiet_turns += 1;
        }
        if quiet_turns >= QUIET_TURNS || quiet_since.elapsed() >= QUIET_TIME {
            return;
        }
        tokio::task::yield_now().await;
    }
}
