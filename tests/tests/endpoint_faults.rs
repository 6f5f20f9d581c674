//! Backends that fail the agent, through the agent binary on 127.0.0.1: one refuses
//! connections, one resets them, one closes without answering, one never answers, one dies in
//! the middle of its answer. Each gets its status (or a broken body, never a silently truncated
//! one, an HTTP/1.0 caller's, ended by the close, included); requests are retried where the route and the request allow it; failing endpoints are
//! ejected for a while; and nothing is left behind: no client connection, no upstream request,
//! no descriptor, no upstream connection to a backend the agent gave up on.

use bytes::Bytes;
use gamma_tests::loopback::{echo_backend, free_port, Agent, AgentOptions, Manifests};
use gamma_tests::probe::Resources;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use proxy_agent::proxy::upstream::CONSECUTIVE_FAILURES;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The route timeout in front of the backend that never answers.
const STALL_TIMEOUT: Duration = Duration::from_millis(500);

#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Reads the request, then resets the connection (SO_LINGER 0).
    Reset,
    /// Reads the request, then closes without a byte of answer.
    CloseBeforeAnswer,
    /// Reads the request and never answers; closes when the agent does.
    Stall,
    /// Answers 200 with a Content-Length of 100,000, sends 1,000 bytes, and closes.
    DieMidResponse,
    /// The same with a chunked body: one chunk, then the connection closes without the last.
    DieMidChunkedResponse,
}

/// A misbehaving backend: how many connections it accepted, and how many are still open.
struct Faulty {
    addr: SocketAddr,
    accepted: Arc<AtomicU64>,
    open: Arc<AtomicI64>,
}

impl Faulty {
    async fn start(ip: [u8; 4], port: u16, fault: Fault) -> Faulty {
        let listener = TcpListener::bind((Ipv4Addr::from(ip), port))
            .await
            .unwrap_or_else(|e| panic!("binding the {fault:?} backend on {ip:?}:{port}: {e}"));
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicU64::new(0));
        let open = Arc::new(AtomicI64::new(0));
        tokio::spawn({
            let (accepted, open) = (accepted.clone(), open.clone());
            async move {
                while let Ok((stream, _)) = listener.accept().await {
                    accepted.fetch_add(1, Ordering::Relaxed);
                    open.fetch_add(1, Ordering::Relaxed);
                    let open = open.clone();
                    tokio::spawn(async move {
                        misbehave(stream, fault).await;
                        open.fetch_sub(1, Ordering::Relaxed);
                    });
                }
            }
        });
        Faulty {
            addr,
            accepted,
            open,
        }
    }

    fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

async fn misbehave(mut stream: TcpStream, fault: Fault) {
    // The request head (these tests send no body to the faulty backends, but a body is fine).
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(n @ 1..) => head.extend_from_slice(&buf[..n]),
            _ => return,
        }
    }
    match fault {
        Fault::Reset => {
            let _ = stream.set_zero_linger();
        }
        Fault::CloseBeforeAnswer => {}
        Fault::Stall => while matches!(stream.read(&mut buf).await, Ok(1..)) {},
        Fault::DieMidResponse => {
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
                .await;
            let _ = stream.write_all(&[b'x'; 1000]).await;
        }
        Fault::DieMidChunkedResponse => {
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3e8\r\n")
                .await;
            let _ = stream.write_all(&[b'x'; 1000]).await;
            let _ = stream.write_all(b"\r\n").await;
        }
    }
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

/// What a client got: the status and whether the whole body arrived.
#[derive(Debug)]
struct Got {
    status: StatusCode,
    body: Result<String, String>,
    took: Duration,
}

async fn send(client: &HttpClient, method: &str, url: &str, body: &'static str) -> Got {
    let started = Instant::now();
    let request = Request::builder()
        .method(method)
        .uri(url)
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(5), client.request(request))
        .await
        .unwrap_or_else(|_| panic!("{method} {url}: no answer within 5 s"))
        .unwrap_or_else(|e| panic!("{method} {url}: the request failed: {e}"));
    let status = response.status();
    let body = tokio::time::timeout(Duration::from_secs(5), response.into_body().collect())
        .await
        .unwrap_or_else(|_| panic!("{method} {url}: the body neither ended nor failed within 5 s"))
        .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
        .map_err(|e| e.to_string());
    Got {
        status,
        body,
        took: started.elapsed(),
    }
}

fn route(rules: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r, namespace: ns}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: front, port: 80}}]\n  rules:\n{rules}"
    )
}

/// `path` prefix to Service `service`, with extra rule fields (timeouts, retry).
fn rule(path: &str, service: &str, extra: &str) -> String {
    format!("  - matches: [{{path: {{type: PathPrefix, value: {path}}}}}]\n    backendRefs: [{{name: {service}, port: 80}}]\n{extra}")
}

/// Whether a read ended in a reset (a connection the agent cut), not an end or an answer.
fn was_reset<T>(read: &std::io::Result<T>) -> bool {
    read.as_ref()
        .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset)
}

/// An HTTP/1.0 request for `path` on a new connection to `listener`: the connection, to read
/// its answer from (within 10 s a read).
fn http10_request(listener: SocketAddr, path: &str) -> std::net::TcpStream {
    use std::io::Write;
    let mut caller = std::net::TcpStream::connect(listener).unwrap();
    caller
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let request = format!("GET {path} HTTP/1.0\r\nHost: front\r\n\r\n");
    caller.write_all(request.as_bytes()).unwrap();
    caller
}

async fn start_agent(manifests: Manifests) -> Agent {
    let options = AgentOptions {
        listeners: vec![("ns/front", 80)],
        caller_namespace: None,
        extra_args: vec![],
    };
    tokio::task::spawn_blocking(move || Agent::start(&manifests, options))
        .await
        .unwrap()
        .expect("the agent starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_fault_gets_its_answer_and_nothing_leaks() {
    let good = echo_backend([127, 0, 0, 1], "good").await;
    let reset = Faulty::start([127, 0, 0, 1], 0, Fault::Reset).await;
    let closed = Faulty::start([127, 0, 0, 1], 0, Fault::CloseBeforeAnswer).await;
    let stall = Faulty::start([127, 0, 0, 1], 0, Fault::Stall).await;
    let midway = Faulty::start([127, 0, 0, 1], 0, Fault::DieMidResponse).await;
    let chunked = Faulty::start([127, 0, 0, 1], 0, Fault::DieMidChunkedResponse).await;
    let refused: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let rules = [
        rule("/refused", "refused", ""),
        rule("/reset", "reset", ""),
        rule("/closed", "closed", ""),
        rule(
            "/stall",
            "stall",
            &format!(
                "    timeouts: {{request: {}ms}}\n",
                STALL_TIMEOUT.as_millis()
            ),
        ),
        rule("/midway", "midway", ""),
        rule("/chunked", "chunked", ""),
        rule("/", "good", ""),
    ]
    .concat();
    let mut manifests = Manifests::default().service("ns", "front", 80, &[], None);
    for (name, addr) in [
        ("good", good.addr),
        ("refused", refused),
        ("reset", reset.addr),
        ("closed", closed.addr),
        ("stall", stall.addr),
        ("midway", midway.addr),
        ("chunked", chunked.addr),
    ] {
        manifests = manifests.service("ns", name, 80, &[addr], None);
    }
    let mut agent = start_agent(manifests.raw(&route(&rules))).await;
    let url = |path: &str| agent.url(0, path);
    let listener = agent.listen[0];

    // A client of its own per round, so that no keep-alive connection to the agent outlives it.
    let round = || async {
        let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
        let got = send(&client, "GET", &url("/refused"), "").await;
        assert_eq!(got.status, 503, "refused: {got:?}");
        assert!(
            got.body.as_ref().is_ok_and(|b| b.contains("connecting to")),
            "refused: {got:?}"
        );
        for path in ["/reset", "/closed"] {
            let got = send(&client, "GET", &url(path), "").await;
            assert_eq!(got.status, 502, "{path}: {got:?}");
            assert!(
                got.body.as_ref().is_ok_and(|b| b.contains("failed")),
                "{path}: {got:?}"
            );
        }
        let got = send(&client, "GET", &url("/stall"), "").await;
        assert_eq!(got.status, 504, "stall: {got:?}");
        assert!(
            got.took >= STALL_TIMEOUT && got.took < STALL_TIMEOUT * 4,
            "stall: answered after {:?}, the route's timeout is {STALL_TIMEOUT:?}",
            got.took
        );
        for path in ["/midway", "/chunked"] {
            let got = send(&client, "GET", &url(path), "").await;
            assert_eq!(
                got.status, 200,
                "{path}: the head was already on its way: {got:?}"
            );
            assert!(
                got.body.is_err(),
                "{path}: a body cut short must fail, not end: {got:?}"
            );
        }
        // An HTTP/1.0 caller's answer ends with the connection: cut short, the close is a
        // reset, not a FIN that would make it look whole.
        let cut = tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let mut got = Vec::new();
            http10_request(listener, "/chunked")
                .read_to_end(&mut got)
                .map(|_| String::from_utf8_lossy(&got).into_owned())
        })
        .await
        .unwrap();
        assert!(
            was_reset(&cut),
            "HTTP/1.0: a body cut short must fail, not end: {cut:?}"
        );
        let got = send(&client, "GET", &url("/"), "").await;
        assert_eq!(
            got.status, 200,
            "a working backend after the faults: {got:?}"
        );
    };
    // A first round fills what is kept on purpose (the pool's idle connection to `good`, the
    // agent's lazily made descriptors); the rounds after it must leave nothing more.
    round().await;
    let baseline = Resources::settle(&agent, usize::MAX, Duration::from_secs(3)).unwrap();
    const ROUNDS: usize = 5;
    for _ in 0..ROUNDS {
        round().await;
    }
    // Each round opens a connection to every faulty backend: a leak would grow by ROUNDS.
    let after = Resources::settle(&agent, baseline.fds + 2, Duration::from_secs(5)).unwrap();
    eprintln!("before the rounds: {baseline:?}; after {ROUNDS} rounds: {after:?}");
    assert!(
        after.connections_open == 0.0
            && after.upstream_in_flight == 0.0
            && after.fds <= baseline.fds + 2,
        "left behind after {ROUNDS} rounds of faults: {after:?} (before: {baseline:?})"
    );
    for (name, backend) in [
        ("stall", &stall),
        ("midway", &midway),
        ("chunked", &chunked),
    ] {
        assert_eq!(
            backend.open.load(Ordering::Relaxed),
            0,
            "the agent still holds connections to the {name} backend"
        );
    }
    assert_eq!(
        stall.accepted(),
        ROUNDS as u64 + 1,
        "one connection per stalled request, no retry"
    );
    assert!(agent.child.try_wait().unwrap().is_none(), "the agent died");
}

/// An answer still streaming at the drain deadline (the agent stopping) is cut: an HTTP/1.0
/// caller, whose answer ends with the connection, sees a reset, not a FIN that made the cut
/// answer look whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http10_answer_cut_at_the_drain_deadline_ends_with_a_reset() {
    let streaming = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = streaming.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = streaming.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf).await;
                let head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n";
                let _ = stream.write_all(head).await;
                // Streams on, for longer than the test.
                tokio::time::sleep(Duration::from_secs(60)).await;
            });
        }
    });
    let manifests = Manifests::default()
        .service("ns", "front", 80, &[], None)
        .service("ns", "streaming", 80, &[backend], None)
        .raw(&route(&rule("/", "streaming", "")));
    let options = AgentOptions {
        listeners: vec![("ns/front", 80)],
        caller_namespace: None,
        extra_args: ["--drain-timeout-s", "1"].map(String::from).into(),
    };
    let agent = tokio::task::spawn_blocking(move || Agent::start(&manifests, options))
        .await
        .unwrap()
        .unwrap();
    let listener = agent.listen[0];
    let pid = agent.child.id();
    let cut = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut caller = http10_request(listener, "/stream");
        let mut got = [0u8; 64];
        let read = caller.read(&mut got).unwrap();
        let head = String::from_utf8_lossy(&got[..read]).into_owned();
        assert!(head.contains(" 200 OK"), "the answer's head: {head}");
        // SAFETY: kill(2) on the test's own child.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        let mut rest = Vec::new();
        caller.read_to_end(&mut rest).map(|_| rest.len())
    })
    .await
    .unwrap();
    assert!(
        was_reset(&cut),
        "a body cut at the deadline must fail, not end: {cut:?}"
    );
}

/// A kept connection that fails before any byte of answer is resent on a new one (RFC 9112
/// §9.3.1) as one of the retry policy's attempts: a backend that resets every request after its
/// first gets a request `1 + attempts` times, no more (the spec: at the maximum, an error). Before,
/// the resend came on top, and the Gateway API's HTTPRouteRetryConnectionError case (the backend
/// succeeds after 4 failures, 3 retries allowed) got a 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_connection_resent_is_one_of_the_retry_policys_attempts() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicU64::new(0));
    let counted = requests.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let requests = counted.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                // One request head per read (the agent sends the next only after the answer).
                while matches!(stream.read(&mut buf).await, Ok(1..)) {
                    if requests.fetch_add(1, Ordering::Relaxed) > 0 {
                        let _ = stream.set_zero_linger();
                        return;
                    }
                    let _ = stream
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                        .await;
                }
            });
        }
    });
    let rules = rule("/", "flaky", "    retry: {attempts: 2}\n");
    let manifests = Manifests::default()
        .service("ns", "front", 80, &[], None)
        .service("ns", "flaky", 80, &[backend], None)
        .raw(&route(&rules));
    let agent = start_agent(manifests).await;
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let first = send(&client, "GET", &agent.url(0, "/"), "").await;
    assert_eq!(first.status, 200, "{first:?}");
    // On the kept connection: reset, resent (2), retried (3), then the policy is spent.
    let got = send(&client, "GET", &agent.url(0, "/"), "").await;
    assert_eq!(got.status, 503, "{got:?}");
    assert_eq!(
        requests.load(Ordering::Relaxed),
        1 + 3,
        "one attempt and two retries"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_where_allowed_and_ejects_failing_endpoints_for_a_while() {
    // `mixed` has three endpoints on one port number (as an EndpointSlice requires), on three
    // loopback addresses: one refuses, one resets, one works.
    let good = echo_backend([127, 0, 0, 4], "good").await;
    let port = good.addr.port();
    let reset = Faulty::start([127, 0, 0, 3], port, Fault::Reset).await;
    let refused: SocketAddr = format!("127.0.0.2:{port}").parse().unwrap();
    // `lone` is a single resetting endpoint behind a retry policy.
    let lone = Faulty::start([127, 0, 0, 1], 0, Fault::Reset).await;
    let retry = "    retry: {attempts: 2, codes: [503]}\n";
    let rules = [rule("/mixed", "mixed", retry), rule("/lone", "lone", retry)].concat();
    let manifests = Manifests::default()
        .service("ns", "front", 80, &[], None)
        .service("ns", "mixed", 80, &[refused, reset.addr, good.addr], None)
        .service("ns", "lone", 80, &[lone.addr], None)
        .raw(&route(&rules));
    let agent = start_agent(manifests).await;
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();

    // Bodyless requests are retried on another endpoint: every one succeeds, and the endpoint
    // that resets is dropped after CONSECUTIVE_FAILURES failures in a row (the one that refuses
    // after its first refusal), so it stops costing attempts.
    for i in 0..30 {
        let got = send(&client, "GET", &agent.url(0, "/mixed"), "").await;
        assert_eq!(got.status, 200, "request {i}: {got:?}");
    }
    assert_eq!(
        reset.accepted(),
        u64::from(CONSECUTIVE_FAILURES),
        "the resetting endpoint is ejected after {CONSECUTIVE_FAILURES} failures in a row"
    );
    let ejections = gamma_tests::probe::metric(&agent, "gamma_endpoint_ejections_total").unwrap();
    assert!(
        ejections >= 2.0,
        "the refusing and the resetting endpoints' ejections are counted: {ejections}"
    );

    // The retry policy's attempts, for a bodyless request and for one whose body was kept
    // (under `--max-buffered-body-bytes`; `http_semantics` checks that the body is resent).
    // Run out on lost connections: 503 (the Gateway API's conformance takes 500 or 503).
    let exhausted =
        |got: &Got| got.status == 503 && got.body.as_ref().is_ok_and(|b| b.contains("3 attempts"));
    let got = send(&client, "GET", &agent.url(0, "/lone"), "").await;
    assert!(exhausted(&got), "{got:?}");
    assert_eq!(lone.accepted(), 3, "GET: one attempt and two retries");
    let got = send(&client, "POST", &agent.url(0, "/lone"), "a body").await;
    assert!(exhausted(&got), "{got:?}");
    assert_eq!(
        lone.accepted(),
        6,
        "POST with a body: one attempt and two retries"
    );

    // Ejection lasts a while (5 s), then the endpoint gets traffic again; still no request fails.
    tokio::time::sleep(Duration::from_millis(5_300)).await;
    for i in 0..30 {
        let got = send(&client, "GET", &agent.url(0, "/mixed"), "").await;
        assert_eq!(got.status, 200, "request {i} after the ejection: {got:?}");
    }
    assert!(
        reset.accepted() > u64::from(CONSECUTIVE_FAILURES),
        "the ejection ended: the endpoint was tried again"
    );
}

/// Opaque TCP to a Service whose endpoints all refuse, and to one without endpoints: the client's
/// connection is reset once each endpoint was tried once, as kube-proxy's reject would fail it,
/// rather than held open while the agent tries the same endpoints forever, or ended with a FIN
/// that reads as a server with nothing to say.
/// A retry policy's backoff also spaces the retries of a refused connection once no endpoint is
/// left untried (an app restarting in its pod refuses for a moment while its endpoint stays
/// ready): the spec says no retry of a failed request comes before the backoff. Before, the
/// retries of a lone refusing endpoint went out back to back and the caller got 503 at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_is_retried_after_the_backoff() {
    let refused: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let retry = "    retry: {attempts: 2, backoff: 300ms}\n";
    let manifests = Manifests::default()
        .service("ns", "front", 80, &[], None)
        .service("ns", "refused", 80, &[refused], None)
        .raw(&route(&rule("/", "refused", retry)));
    let agent = start_agent(manifests).await;
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let got = send(&client, "GET", &agent.url(0, "/x"), "").await;
    assert_eq!(got.status, 503, "{got:?}");
    assert!(
        got.took >= Duration::from_millis(600),
        "two retries, each after 300 ms: answered after {:?}",
        got.took
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opaque_tcp_that_no_endpoint_accepts_is_reset_after_one_try_each() {
    let port = free_port();
    let refusing: Vec<SocketAddr> = ["127.0.0.2", "127.0.0.3"]
        .iter()
        .map(|ip| format!("{ip}:{port}").parse().unwrap())
        .collect();
    let manifests = Manifests::default()
        .service("ns", "refusing", 80, &refusing, None)
        .service("ns", "empty", 80, &[], None);
    let options = AgentOptions {
        listeners: vec![("ns/refusing", 80), ("ns/empty", 80)],
        caller_namespace: None,
        extra_args: vec![],
    };
    let log = std::env::temp_dir().join(format!("gamma-opaque-refused-{}.log", std::process::id()));
    let stderr = std::fs::File::create(&log).unwrap();
    let agent = tokio::task::spawn_blocking(move || {
        Agent::start_logging(&manifests, options, "warn", stderr.into())
    })
    .await
    .unwrap()
    .expect("the agent starts");
    // A client reconnecting in a loop to the Service without endpoints: 15 connections.
    let mut connections = vec![("refusing", agent.listen[0])];
    connections.extend(std::iter::repeat_n(("empty", agent.listen[1]), 15));
    for (service, listener) in connections {
        let ended = tokio::task::spawn_blocking(move || {
            let mut client = std::net::TcpStream::connect(listener).unwrap();
            client
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            std::io::Write::write_all(&mut client, b"\x16\x03\x01 not http").unwrap();
            std::io::Read::read(&mut client, &mut [0u8; 64])
        })
        .await
        .unwrap();
        assert!(
            was_reset(&ended),
            "{service}: the client's connection is reset, got {ended:?}"
        );
    }
    let ejections = gamma_tests::probe::metric(&agent, "gamma_endpoint_ejections_total").unwrap();
    assert_eq!(
        ejections, 2.0,
        "each refusing endpoint was tried (and ejected) once"
    );
    let unconnected = gamma_tests::probe::metric(&agent, "gamma_opaque_unconnected_total");
    assert_eq!(unconnected.unwrap(), 16.0);
    // Logged at the 1st, 2nd, 4th, 8th and 16th only: not a line per connection (the log's
    // thread writes the last one a moment later).
    let lines = || {
        let text = std::fs::read_to_string(&log).unwrap();
        let lines = text.lines().filter(|l| l.contains("no endpoint accepted"));
        (lines.count(), text)
    };
    gamma_tests::eventually_within(Duration::from_secs(5), "the 16th logged", || {
        (lines().0 >= 5).then_some(())
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (count, text) = lines();
    let _ = std::fs::remove_file(&log);
    assert_eq!(count, 5, "{text}");
}

/// A request whose body streams (an HTTP/2 upload, every gRPC call; an HTTP/1.1 chunked one),
/// on a route without a retry policy, to a Service with an endpoint that refuses connections:
/// nothing was sent when the connect failed, so the request goes to another endpoint with its
/// whole body, as a bodiless one does. Before, the body was dropped with the failed attempt and
/// the caller got 503 (the first request that picked the refusing endpoint, once per ejection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_body_goes_to_another_endpoint_when_a_connect_is_refused() {
    let good = echo_backend([127, 0, 0, 4], "good").await;
    let port = good.addr.port();
    let refusing = |ip: u8| -> SocketAddr { format!("127.0.0.{ip}:{port}").parse().unwrap() };
    let rules = [rule("/h2", "pair-h2", ""), rule("/chunked", "pair-h1", "")].concat();
    let manifests = Manifests::default()
        .service("ns", "front", 80, &[], None)
        .service("ns", "pair-h2", 80, &[refusing(2), good.addr], None)
        .service("ns", "pair-h1", 80, &[refusing(3), good.addr], None)
        .raw(&route(&rules));
    let agent = start_agent(manifests).await;
    let h2: HttpClient = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    // Each request picks the refusing endpoint with even odds until it has (then it is ejected):
    // within 20, one does.
    for i in 0..20 {
        let got = send(&h2, "POST", &agent.url(0, "/h2"), "an upload").await;
        assert_eq!(got.status, 200, "HTTP/2 request {i}: {got:?}");
        assert!(
            got.body
                .as_ref()
                .is_ok_and(|b| b.contains("\"body_bytes\":9")),
            "the whole body reached the echo: {got:?}"
        );
    }
    for i in 0..20 {
        let mut stream = TcpStream::connect(agent.listen[0]).await.unwrap();
        stream
            .write_all(b"POST /chunked HTTP/1.1\r\nHost: front\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
            .await
            .expect("an answer within 5 s")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.contains("\"body_bytes\":3"),
            "chunked request {i}: {answer}"
        );
    }
    let ejections = gamma_tests::probe::metric(&agent, "gamma_endpoint_ejections_total").unwrap();
    assert!(
        ejections >= 2.0,
        "both refusing endpoints were tried: {ejections}"
    );
}

/// A backend that closes a keep-alive connection idle for `keep_alive`: as if its timer fired
/// just as a request came, the request is read and the connection closed without an answer
/// (the race, frozen at its worst moment). How many connections it accepted.
async fn closing_when_idle(keep_alive: Duration) -> (SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    let counted = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let mut idle_since = Instant::now();
                let mut pending = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match stream.read(&mut buf).await {
                            Ok(n @ 1..) => pending.extend_from_slice(&buf[..n]),
                            _ => return,
                        }
                        continue;
                    };
                    if idle_since.elapsed() >= keep_alive {
                        return;
                    }
                    let head = String::from_utf8_lossy(&pending[..end]).to_ascii_lowercase();
                    let length: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |n| n.trim().parse().unwrap());
                    while pending.len() < end + 4 + length {
                        match stream.read(&mut buf).await {
                            Ok(n @ 1..) => pending.extend_from_slice(&buf[..n]),
                            _ => return,
                        }
                    }
                    pending.drain(..end + 4 + length);
                    let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    if stream.write_all(answer).await.is_err() {
                        return;
                    }
                    idle_since = Instant::now();
                }
            });
        }
    });
    (addr, accepted)
}

/// The agent lets go of an idle pooled HTTP/1.1 connection before a backend with a 5 s
/// keep-alive (Node's, uvicorn's) closes it: a POST (not to be sent twice, so not retried) that
/// comes as the backend closes is not written into the closing connection. Before, the agent
/// kept connections 90 s, and such a POST got 502 (Envoy's classic "503 UC").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_is_not_sent_into_a_connection_its_backend_is_closing() {
    // Shorter than Node's 5 s, to keep the test short; longer than the agent's default.
    let keep_alive = Duration::from_millis(3_500);
    let (with_body, with_body_accepted) = closing_when_idle(keep_alive).await;
    let (bodiless, bodiless_accepted) = closing_when_idle(keep_alive).await;
    let rules = [
        rule("/body", "with-body", ""),
        rule("/none", "bodiless", ""),
    ]
    .concat();
    let manifests = Manifests::default()
        .service("ns", "front", 80, &[], None)
        .service("ns", "with-body", 80, &[with_body], None)
        .service("ns", "bodiless", 80, &[bodiless], None)
        .raw(&route(&rules));
    let agent = start_agent(manifests).await;
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let twice = |path: &'static str, body: &'static str| {
        let (client, url) = (client.clone(), agent.url(0, path));
        async move {
            let first = send(&client, "POST", &url, body).await;
            tokio::time::sleep(keep_alive + Duration::from_millis(100)).await;
            (first, send(&client, "POST", &url, body).await)
        }
    };
    let ((first, second), (first_bodiless, second_bodiless)) =
        tokio::join!(twice("/body", "an order"), twice("/none", ""));
    for got in [first, second, first_bodiless, second_bodiless] {
        assert_eq!(got.status, 200, "{got:?}");
    }
    assert_eq!(with_body_accepted.load(Ordering::Relaxed), 2);
    assert_eq!(bodiless_accepted.load(Ordering::Relaxed), 2);
}
