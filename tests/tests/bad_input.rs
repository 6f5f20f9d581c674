//! Hostile and malformed clients against the agent binary on 127.0.0.1: request smuggling
//! variants, malformed and oversized heads, slowloris, HTTP/2 rapid reset and CONTINUATION
//! floods. Each gets a clean error or a close, nothing reaches a backend it should not, and the
//! agent keeps serving everyone else meanwhile.
//!
//! Every route sends `/smuggled...` to the backend `canary`, so a request hidden inside another
//! one shows up as a canary hit.

use bytes::Bytes;
use gamma_tests::loopback::{echo_backend, http_get, Agent, AgentOptions, EchoBackend, Manifests};
use gamma_tests::probe::{raw_exchange, sample, RawReply, Resources};
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use proxy_agent::proxy::upstream::CONSECUTIVE_FAILURES;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The agent's header read timeout in these tests (slowloris).
const HEADER_READ_TIMEOUT: Duration = Duration::from_millis(1000);

struct World {
    agent: Agent,
    a: EchoBackend,
    canary: EchoBackend,
}

impl World {
    async fn start() -> World {
        let a = echo_backend([127, 0, 0, 1], "a").await;
        let canary = echo_backend([127, 0, 0, 1], "canary").await;
        let rules = "  - matches: [{path: {type: PathPrefix, value: /smuggled}}]\n    backendRefs: [{name: canary, port: 80}]\n  - matches: [{path: {type: PathPrefix, value: /delay}}]\n    timeouts: {request: 10s, backendRequest: 300ms}\n    backendRefs: [{name: a, port: 80}]\n  - backendRefs: [{name: a, port: 80}]\n";
        let manifests = Manifests::default()
            .service("ns", "front", 80, &[], None)
            .service("ns", "a", 80, &[a.addr], None)
            .service("ns", "canary", 80, &[canary.addr], None)
            .raw(&format!(
                "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r, namespace: ns}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: front, port: 80}}]\n  rules:\n{rules}"
            ));
        let options = AgentOptions {
            listeners: vec![("ns/front", 80)],
            caller_namespace: None,
            extra_args: vec![
                "--header-read-timeout-ms".into(),
                HEADER_READ_TIMEOUT.as_millis().to_string(),
            ],
        };
        let agent = tokio::task::spawn_blocking(move || Agent::start(&manifests, options))
            .await
            .unwrap()
            .expect("the agent starts");
        World { agent, a, canary }
    }

    fn hits(backend: &EchoBackend) -> u64 {
        backend.stats.requests.load(Ordering::Relaxed)
    }

    /// A well-behaved client still gets answered, promptly.
    async fn assert_serving(&self, when: &str) {
        let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
        let started = Instant::now();
        let response = tokio::time::timeout(
            Duration::from_secs(2),
            client.request(
                Request::get(self.agent.url(0, "/ok"))
                    .body(Empty::new())
                    .unwrap(),
            ),
        )
        .await
        .unwrap_or_else(|_| panic!("{when}: a normal request got no answer within 2 s"))
        .unwrap_or_else(|e| panic!("{when}: a normal request failed: {e}"));
        assert_eq!(response.status(), 200, "{when}: a normal request");
        let _ = response.into_body().collect().await;
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{when}: a normal request took {:?}",
            started.elapsed()
        );
    }

    /// `count` requests failed their callers (answered for `reason`), and no endpoint was
    /// ejected for them.
    fn assert_callers_failed(&self, reason: &str, count: u32) {
        let metrics = http_get(self.agent.admin, "/metrics").unwrap();
        assert_eq!(
            sample(&metrics, "gamma_endpoint_ejections_total"),
            Some(0.0),
            "no endpoint was ejected"
        );
        let answers = format!("gamma_local_answers_total{{reason=\"{reason}\"}}");
        assert_eq!(
            sample(&metrics, &answers),
            Some(f64::from(count)),
            "each counted as the caller's"
        );
    }

    async fn raw(&self, payload: Vec<u8>) -> RawReply {
        let addr = self.agent.listen[0];
        tokio::task::spawn_blocking(move || raw_exchange(addr, &payload, Duration::from_secs(3)))
            .await
            .unwrap()
            .expect("raw exchange")
    }

    /// After the hostile clients are gone: no connection, upstream request or descriptor left
    /// but the upstream connections pooled idle: one for requests without a body and one for
    /// requests with one, per worker (one worker per core).
    fn assert_nothing_left(&self, baseline: Resources) {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let pooled = 2 * cores;
        let left =
            Resources::settle(&self.agent, baseline.fds + pooled, Duration::from_secs(5)).unwrap();
        assert!(
            left.connections_open == 0.0
                && left.upstream_in_flight == 0.0
                && left.fds <= baseline.fds + pooled,
            "left behind: {left:?} (before: {baseline:?})"
        );
        assert_eq!(
            Self::hits(&self.canary),
            0,
            "a smuggled request reached the canary"
        );
    }
}

/// How the agent must treat one malformed exchange.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// Refused before any backend: one answer with this status, then a close.
    Refused(u16),
    /// Forwarded once, then the connection is closed, so nothing after the body is read.
    ServedThenClosed,
    /// Forwarded as this many requests, answered in order, then closed (`Connection: close`).
    Served(usize),
    /// The head was forwarded but the body's framing is broken: at most an error answer, then
    /// a close; the backend may or may not have seen the (truncated) request.
    BrokenBody,
}

const SMUGGLED: &str = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";

fn cases() -> Vec<(&'static str, Vec<u8>, Expect)> {
    let post = |headers: &str, body: &str| {
        format!("POST /ok HTTP/1.1\r\nHost: x\r\n{headers}\r\n{body}").into_bytes()
    };
    let get = |headers: &str| format!("GET /ok HTTP/1.1\r\nHost: x\r\n{headers}\r\n").into_bytes();
    let chunked_then_smuggled = format!("0\r\n\r\n{SMUGGLED}");
    vec![
        // RFC 9112 §6.1: Transfer-Encoding wins over Content-Length, which is dropped, and the
        // connection is closed after the answer so the bytes after the chunked body never run.
        (
            "Content-Length then Transfer-Encoding",
            post("Content-Length: 40\r\nTransfer-Encoding: chunked\r\n", &chunked_then_smuggled),
            Expect::ServedThenClosed,
        ),
        (
            "Transfer-Encoding then Content-Length",
            post("Transfer-Encoding: chunked\r\nContent-Length: 40\r\n", &chunked_then_smuggled),
            Expect::ServedThenClosed,
        ),
        (
            "two different Content-Length values",
            post("Content-Length: 4\r\nContent-Length: 40\r\n", &format!("abcd{SMUGGLED}")),
            Expect::Refused(400),
        ),
        (
            "Content-Length with a sign",
            post("Content-Length: +4\r\n", &format!("abcd{SMUGGLED}")),
            Expect::Refused(400),
        ),
        // §6.3: a request whose final transfer coding is not chunked: 400, then close.
        (
            "Transfer-Encoding not ending in chunked",
            post("Transfer-Encoding: chunked, identity\r\n", &chunked_then_smuggled),
            Expect::Refused(400),
        ),
        (
            "unknown transfer coding",
            post("Transfer-Encoding: xchunked\r\n", &chunked_then_smuggled),
            Expect::Refused(400),
        ),
        // §6.1: a transfer coding the agent does not implement gets 501 (hyper would read the
        // body as chunked and the agent forward it without the other coding), then close.
        (
            "gzip then chunked",
            post("Transfer-Encoding: gzip, chunked\r\n", &chunked_then_smuggled),
            Expect::Refused(501),
        ),
        (
            "chunked twice in two fields",
            post("Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", &chunked_then_smuggled),
            Expect::Refused(501),
        ),
        (
            "whitespace between header name and colon",
            post("Transfer-Encoding : chunked\r\nContent-Length: 40\r\n", &chunked_then_smuggled),
            Expect::Refused(400),
        ),
        (
            "Transfer-Encoding in an HTTP/1.0 request",
            format!("POST /ok HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{chunked_then_smuggled}")
                .into_bytes(),
            Expect::Refused(400),
        ),
        (
            "chunk size that is not hexadecimal",
            post("Transfer-Encoding: chunked\r\n", &format!("zz\r\n{SMUGGLED}")),
            Expect::BrokenBody,
        ),
        (
            "chunk size that overflows",
            post("Transfer-Encoding: chunked\r\n", &format!("fffffffffffffffffff\r\n{SMUGGLED}")),
            Expect::BrokenBody,
        ),
        // §5.2: obs-fold in a request is refused (a server may instead unfold it; refusing is
        // the safe choice for a proxy).
        ("obs-fold continuation line", get("X-A: a\r\n b\r\n"), Expect::Refused(400)),
        ("bare CR inside a header line", get("X-A: a\rb\r\n"), Expect::Refused(400)),
        ("NUL in a header value", get("X-A: a\0b\r\n"), Expect::Refused(400)),
        ("space inside a header name", get("Bad Name: x\r\n"), Expect::Refused(400)),
        ("empty header name", get(": x\r\n"), Expect::Refused(400)),
        ("separator in a header name", get("X(A): x\r\n"), Expect::Refused(400)),
        ("control character in the request target", b"GET /o\x01k HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), Expect::Refused(400)),
        // §3.2: origin-form, or absolute-form for http(s); authority-form is for CONNECT and
        // asterisk-form for OPTIONS only. hyper takes them all; the agent refuses the others.
        (
            "authority-form target on GET",
            b"GET front:80 HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            Expect::Refused(400),
        ),
        (
            "absolute-form target with another scheme",
            b"GET gopher://x/smuggled HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            Expect::Refused(400),
        ),
        // §3.2: an HTTP/1.1 request has exactly one Host. With two, a route and the backend
        // could each read a different one.
        ("HTTP/1.1 request without Host", b"GET /ok HTTP/1.1\r\n\r\n".to_vec(), Expect::Refused(400)),
        ("two Host fields", get("Host: canary\r\n"), Expect::Refused(400)),
        (
            "two Host fields in HTTP/1.0",
            b"GET /ok HTTP/1.0\r\nHost: x\r\nHost: canary\r\n\r\n".to_vec(),
            Expect::Refused(400),
        ),
        (
            "a Host that is no host and port",
            b"GET /ok HTTP/1.1\r\nHost: a b\r\n\r\n".to_vec(),
            Expect::Refused(400),
        ),
        (
            "a Host with a path",
            b"GET /ok HTTP/1.1\r\nHost: svc/x\r\n\r\n".to_vec(),
            Expect::Refused(400),
        ),
        (
            "asterisk-form target on GET",
            b"GET * HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            Expect::Refused(400),
        ),
        // §2.2: a recipient may take a bare LF as a line end. Tolerated, but read the same way
        // as the upstream request is written (hyper writes CRLF), so the two stay in step.
        // The agent's own server serves bodiless requests and gives hyper's the connection at
        // the first with a body: pipelined, each request is answered once, in order.
        (
            "pipelined: bodiless, with a body, bodiless",
            b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\nPOST /ok HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhelloGET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(),
            Expect::Served(3),
        ),
        (
            "pipelined: a body that looks like a request, then bodiless",
            b"POST /ok HTTP/1.1\r\nHost: x\r\nContent-Length: 26\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\nGET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(),
            Expect::Served(2),
        ),
        (
            "bare LF line ends, two pipelined requests",
            b"GET /ok HTTP/1.1\nHost: x\nX-A: 1\nX-B: 2\n\nGET /ok HTTP/1.1\nHost: x\nConnection: close\n\n".to_vec(),
            Expect::Served(2),
        ),
        (
            "header value of 70 KiB",
            get(&format!("X-Big: {}\r\n", "a".repeat(70 * 1024))),
            Expect::Refused(431),
        ),
        (
            "150 header lines",
            get(&(0..150).map(|i| format!("X-H{i}: v\r\n")).collect::<String>()),
            Expect::Refused(431),
        ),
        // Five headers of 13 KiB: the head is over the limit (64 KiB) though hyper's read
        // buffer may take it in; the agent refuses it all the same.
        (
            "five header values of 13 KiB",
            get(&(0..5).map(|i| format!("X-Big-{i}: {}\r\n", "a".repeat(13 * 1024))).collect::<String>()),
            Expect::Refused(431),
        ),
        // A request line over 64 KiB: hyper's own refusal.
        (
            "request target of 70 KiB",
            format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(70 * 1024)).into_bytes(),
            Expect::Refused(414),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_smuggling_and_malformed_heads_get_an_error_or_a_close() {
    let world = World::start().await;
    world.assert_serving("before").await;
    let baseline = Resources::of(&world.agent).unwrap();
    let mut failures = Vec::new();
    for (name, payload, expect) in cases() {
        let before = World::hits(&world.a);
        let answered_before = local_answers(&world.agent);
        let reply = world.raw(payload).await;
        let forwarded = World::hits(&world.a) - before;
        // Every refusal is counted, hyper's own (its 400s and 431s) with the agent's: those once
        // hyper's connection has ended, a moment after the caller saw it close.
        let mut counted = local_answers(&world.agent) - answered_before;
        let deadline = Instant::now() + Duration::from_secs(2);
        while matches!(expect, Expect::Refused(_)) && counted < 1.0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            counted = local_answers(&world.agent) - answered_before;
        }
        let statuses = reply.statuses();
        let ok = reply.closed
            && match expect {
                Expect::Refused(status) => statuses == [status] && forwarded == 0 && counted == 1.0,
                Expect::ServedThenClosed => statuses == [200] && forwarded == 1,
                Expect::Served(n) => statuses == vec![200; n] && forwarded == n as u64,
                Expect::BrokenBody => statuses.len() <= 1 && statuses.iter().all(|s| *s >= 400),
            };
        if !ok {
            let head: String = reply.text.chars().take(300).collect();
            failures.push(format!(
                "{name}: expected {expect:?}; got statuses {statuses:?}, {forwarded} forwarded, {counted} counted, closed: {}, reset: {}, reply: {head:?}",
                reply.closed, reply.reset
            ));
        }
        if name.starts_with("bare LF") {
            // Each header arrived as its own line, not glued to its neighbour.
            assert!(
                reply.text.contains(r#"["x-a","1"]"#) && reply.text.contains(r#"["x-b","2"]"#),
                "bare LF: the backend saw other headers: {}",
                reply.text
            );
        }
    }
    assert!(
        failures.is_empty(),
        "{} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    world.assert_serving("after the malformed requests").await;
    world.assert_nothing_left(baseline);
}

/// The requests the agent answered itself, all reasons together (`gamma_local_answers_total`).
fn local_answers(agent: &Agent) -> f64 {
    let text = tokio::task::block_in_place(|| http_get(agent.admin, "/metrics")).unwrap();
    text.lines()
        .filter(|line| line.starts_with("gamma_local_answers_total{"))
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// A client still sending its request body when the rule's backendRequest timeout expires (a slow
/// upload; a gRPC client stream between its messages) gets 408: the attempt waited on the client,
/// not on the endpoint, so it does not count against the endpoint (before: 504, and three in a
/// row ejected a healthy endpoint for every caller) and is not retried. A slow endpoint still
/// gets 504.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upload_times_out_against_its_caller_not_the_endpoint() {
    let world = World::start().await;
    let addr = world.agent.listen[0];
    let exchange = |request: &'static [u8]| {
        tokio::task::spawn_blocking(move || {
            let mut stream = std::net::TcpStream::connect(addr).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(3)))
                .unwrap();
            std::io::Write::write_all(&mut stream, request).unwrap();
            // Read to the end: the agent closes the connection after its answer (the rest of
            // the body was never read).
            let mut reply = String::new();
            let closed = std::io::Read::read_to_string(&mut stream, &mut reply).is_ok();
            (reply, closed)
        })
    };
    let slow = b"POST /delay/0 HTTP/1.1\r\nHost: front\r\nContent-Length: 100000\r\n\r\nhello";
    for i in 0..CONSECUTIVE_FAILURES {
        let (reply, closed) = exchange(slow).await.unwrap();
        let says_close = reply
            .to_ascii_lowercase()
            .contains("\r\nconnection: close\r\n");
        assert!(
            reply.starts_with("HTTP/1.1 408 ")
                && reply.contains("still sending")
                && says_close
                && closed,
            "slow upload {i}: {reply:?} (closed: {closed})"
        );
    }
    let slow_endpoint =
        b"POST /delay/1000 HTTP/1.1\r\nHost: front\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello";
    let (reply, _) = exchange(slow_endpoint).await.unwrap();
    assert!(
        reply.starts_with("HTTP/1.1 504 "),
        "a slow endpoint: {reply:?}"
    );
    world.assert_callers_failed("request_body_timeout", CONSECUTIVE_FAILURES);
    world.assert_serving("after the slow uploads").await;
}

/// A client whose request body breaks off while it streams to the backend (a malformed chunk; a
/// length announced and the client's side closed before it) gets a 400 that says so. It failed
/// the request, not the endpoint: before, each counted as the endpoint's failure (502), and
/// three in a row ejected the endpoint for every caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_breaks_off_fails_its_caller_not_the_endpoint() {
    let world = World::start().await;
    let malformed_chunk = b"POST /upload HTTP/1.1\r\nHost: front\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n\r\n";
    // Over what the agent's own server reads whole with the head: it streams.
    let cut_short = b"POST /upload HTTP/1.1\r\nHost: front\r\nContent-Length: 100000\r\n\r\nhello";
    let addr = world.agent.listen[0];
    for i in 0..CONSECUTIVE_FAILURES {
        let reply = world.raw(malformed_chunk.to_vec()).await;
        assert!(
            reply.statuses() == [400] && reply.text.contains("broke off"),
            "malformed chunk {i}: {reply:?}"
        );
        let reply = tokio::task::spawn_blocking(move || {
            let mut stream = std::net::TcpStream::connect(addr).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(3)))
                .unwrap();
            std::io::Write::write_all(&mut stream, cut_short).unwrap();
            stream.shutdown(std::net::Shutdown::Write).unwrap();
            let mut reply = String::new();
            let _ = std::io::Read::read_to_string(&mut stream, &mut reply);
            reply
        })
        .await
        .unwrap();
        assert!(
            reply.starts_with("HTTP/1.1 400 ") && reply.contains("broke off"),
            "body cut short {i}: {reply:?}"
        );
    }
    world.assert_callers_failed("request_body_broke_off", 2 * CONSECUTIVE_FAILURES);
    world.assert_serving("after the broken bodies").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connections_are_closed_and_others_still_served() {
    const SLOW_CLIENTS: usize = 100;
    let world = World::start().await;
    world.assert_serving("before").await;
    let baseline = Resources::of(&world.agent).unwrap();
    let addr = world.agent.listen[0];
    let started = Instant::now();
    // Each slow client sends one header line every 200 ms, never the blank line.
    let slow: Vec<_> = (0..SLOW_CLIENTS)
        .map(|_| {
            tokio::spawn(trickled_head(
                addr,
                started,
                Duration::from_millis(200),
                |i| format!("X-Slow-{i}: 1\r\n"),
            ))
        })
        .collect();
    // Meanwhile, everyone else is served.
    for i in 0..10 {
        world
            .assert_serving(&format!("during slowloris ({i})"))
            .await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for client in slow {
        let (closed, after, reply) = client.await.unwrap();
        assert!(closed, "a slowloris connection was still open after 5 s");
        assert!(
            after >= HEADER_READ_TIMEOUT - Duration::from_millis(100)
                && after < HEADER_READ_TIMEOUT * 3,
            "closed after {after:?}; the header read timeout is {HEADER_READ_TIMEOUT:?}"
        );
        assert!(
            reply.is_empty() || reply.starts_with("HTTP/1.1 408"),
            "a slowloris connection was answered: {reply}"
        );
    }
    assert_eq!(
        World::hits(&world.a),
        10 + 1,
        "only the normal requests reached the backend"
    );
    world.assert_serving("after slowloris").await;
    world.assert_nothing_left(baseline);
}

/// Sends a request line at once (so the connection is taken for HTTP), then `line(i)` every
/// `every`, never the blank line: the head never completes. Returns whether the agent closed the
/// connection within 5 s, when (since `started`), and what it answered.
async fn trickled_head(
    addr: std::net::SocketAddr,
    started: Instant,
    every: Duration,
    line: fn(usize) -> String,
) -> (bool, Duration, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /ok HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let (mut read, mut write) = stream.into_split();
    let trickle = tokio::spawn(async move {
        for i in 0.. {
            tokio::time::sleep(every).await;
            if write.write_all(line(i).as_bytes()).await.is_err() {
                break;
            }
        }
    });
    let mut reply = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(5), read.read_to_end(&mut reply)).await;
    trickle.abort();
    (
        ended.is_ok(),
        started.elapsed(),
        String::from_utf8_lossy(&reply).into_owned(),
    )
}

/// A head longer than the agent's own server reads (8 KiB) that comes slowly is timed from its
/// first byte: handing it to hyper's server must not start the header timer again (which gave a
/// slow head up to two spells).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_long_head_is_timed_from_its_first_byte() {
    let world = World::start().await;
    // 1 KiB of fields every 100 ms: past 8 KiB at about 0.8 of the timeout, never whole.
    let (closed, after, reply) = trickled_head(
        world.agent.listen[0],
        Instant::now(),
        Duration::from_millis(100),
        |i| format!("X-Long-{i}: {}\r\n", "v".repeat(1000)),
    )
    .await;
    assert!(closed, "the connection was still open after 5 s");
    // Timed again from the hand-over, it closed at about 1.8 × the timeout.
    assert!(
        after >= HEADER_READ_TIMEOUT - Duration::from_millis(100)
            && after < HEADER_READ_TIMEOUT * 3 / 2,
        "closed after {after:?}; the header read timeout is {HEADER_READ_TIMEOUT:?}"
    );
    assert!(
        reply.is_empty() || reply.starts_with("HTTP/1.1 408"),
        "a head that never completed was answered: {reply}"
    );
    world.assert_serving("after the slow long head").await;
}

/// HTTP/2 frames written by hand: the floods are what a real client library refuses to send.
mod h2_raw {
    pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    pub const HEADERS: u8 = 0x1;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const GOAWAY: u8 = 0x7;
    pub const CONTINUATION: u8 = 0x9;
    pub const END_STREAM: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;
    pub const CANCEL: u32 = 0x8;
    pub const ENHANCE_YOUR_CALM: u32 = 0xb;

    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut out = Vec::with_capacity(9 + payload.len());
        out.extend_from_slice(&len.to_be_bytes()[1..]);
        out.extend_from_slice(&[kind, flags]);
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// HPACK: `GET http://x/` from the static table, with `:authority` as a literal.
    pub const GET_ROOT: &[u8] = &[0x82, 0x86, 0x84, 0x01, 0x01, b'x'];

    /// A literal header `x-flood: <n × 'a'>` without indexing (n < 127).
    pub fn literal_header(n: usize) -> Vec<u8> {
        let mut out = vec![0x00, 7];
        out.extend_from_slice(b"x-flood");
        out.push(n as u8);
        out.extend(std::iter::repeat_n(b'a', n));
        out
    }

    /// The opening of a client connection: the preface and empty SETTINGS.
    pub fn opening() -> Vec<u8> {
        let mut out = PREFACE.to_vec();
        out.extend(frame(SETTINGS, 0, 0, &[]));
        out
    }
}

/// What the agent did to a flooding HTTP/2 connection.
#[derive(Debug)]
struct FloodOutcome {
    /// The GOAWAY error code, if one came.
    goaway: Option<u32>,
    /// The agent closed the connection within the limit.
    closed: bool,
    /// How much of the flood the agent took before closing (bytes written without error).
    written: usize,
    /// Requests of the flood that reached the backend (the bystander's not counted).
    forwarded: u64,
}

/// Writes `frames` in batches of about 64 KiB while reading whatever the agent sends back; stops
/// writing when the agent closes. Returns once the agent closed or 10 s passed.
async fn flood(
    addr: std::net::SocketAddr,
    frames: impl Iterator<Item = Vec<u8>> + Send + 'static,
) -> FloodOutcome {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    let reader = tokio::spawn(async move {
        let mut bytes = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        let closed = tokio::time::timeout(Duration::from_secs(10), async {
            while let Ok(n @ 1..) = read.read(&mut buf).await {
                bytes.extend_from_slice(&buf[..n]);
            }
        })
        .await
        .is_ok();
        (closed, goaway_code(&bytes))
    });
    let writer = tokio::spawn(async move {
        let mut written = 0;
        let mut batch = Vec::new();
        for frame in std::iter::once(h2_raw::opening()).chain(frames) {
            batch.extend(frame);
            if batch.len() >= 64 * 1024 {
                if write.write_all(&batch).await.is_err() {
                    return written;
                }
                written += batch.len();
                batch.clear();
            }
        }
        if write.write_all(&batch).await.is_ok() {
            written += batch.len();
        }
        // Hold the write side open: the agent, not the client, must end the connection.
        tokio::time::sleep(Duration::from_secs(10)).await;
        drop(write);
        written
    });
    let (closed, goaway) = reader.await.unwrap();
    writer.abort();
    let written = writer.await.unwrap_or(0);
    FloodOutcome {
        goaway,
        closed,
        written,
        forwarded: 0,
    }
}

/// The error code of the first GOAWAY among the frames the agent sent.
fn goaway_code(mut bytes: &[u8]) -> Option<u32> {
    while bytes.len() >= 9 {
        let len = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]) as usize;
        if bytes.len() < 9 + len {
            break;
        }
        if bytes[3] == h2_raw::GOAWAY && len >= 8 {
            return Some(u32::from_be_bytes(bytes[13..17].try_into().unwrap()));
        }
        bytes = &bytes[9 + len..];
    }
    None
}

/// Runs a flood while a well-behaved client keeps sending requests; returns the flood's outcome
/// after checking the other client was never failed.
async fn flood_while_serving(
    world: &World,
    frames: impl Iterator<Item = Vec<u8>> + Send + 'static,
) -> FloodOutcome {
    let done = Arc::new(AtomicBool::new(false));
    let url = world.agent.url(0, "/ok");
    // Read before the bystander starts: its requests are subtracted below, all of them.
    let before = World::hits(&world.a);
    let bystander = tokio::spawn({
        let done = done.clone();
        async move {
            let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
            let (mut served, mut slowest) = (0u32, Duration::ZERO);
            // At least one request, even when the agent cuts the flood off at once; then on
            // until the flood ends (bounded: 10,000 requests at most).
            while (served == 0 || !done.load(Ordering::Relaxed)) && served < 10_000 {
                let started = Instant::now();
                let response = tokio::time::timeout(
                    Duration::from_secs(2),
                    client.request(Request::get(url.as_str()).body(Empty::new()).unwrap()),
                )
                .await
                .expect("a bystander's request got no answer within 2 s during the flood")
                .expect("a bystander's request failed during the flood");
                assert_eq!(response.status(), 200);
                let _ = response.into_body().collect().await;
                slowest = slowest.max(started.elapsed());
                served += 1;
            }
            (served, slowest)
        }
    });
    let mut outcome = flood(world.agent.listen[0], frames).await;
    done.store(true, Ordering::Relaxed);
    let (served, slowest) = bystander.await.unwrap();
    outcome.forwarded = World::hits(&world.a) - before - u64::from(served);
    eprintln!(
        "flood: the agent took {} bytes, then GOAWAY {:?} (closed: {}); {} forwarded; a bystander was served {served} times meanwhile, slowest {slowest:?}",
        outcome.written, outcome.goaway, outcome.closed, outcome.forwarded
    );
    outcome
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_rapid_reset_flood_is_cut_off() {
    use h2_raw::*;
    const STREAMS: u32 = 20_000;
    let world = World::start().await;
    world.assert_serving("before").await;
    let baseline = Resources::of(&world.agent).unwrap();
    // CVE-2023-44487: open a stream and cancel it at once, over and over. Reset streams do not
    // count against the concurrency limit, so only a reset-rate guard stops the work piling up.
    let frames = (0..STREAMS).flat_map(|i| {
        let stream = 2 * i + 1;
        [
            frame(HEADERS, END_STREAM | END_HEADERS, stream, GET_ROOT),
            frame(RST_STREAM, 0, stream, &CANCEL.to_be_bytes()),
        ]
    });
    let outcome = flood_while_serving(&world, frames).await;
    assert!(
        outcome.closed,
        "the agent kept the flooding connection open: {outcome:?}"
    );
    assert_eq!(
        outcome.goaway,
        Some(ENHANCE_YOUR_CALM),
        "the agent should end the connection with GOAWAY ENHANCE_YOUR_CALM: {outcome:?}"
    );
    assert!(
        outcome.forwarded < 1_000,
        "{} of {STREAMS} cancelled streams were forwarded to the backend",
        outcome.forwarded
    );
    world.assert_serving("after the rapid reset flood").await;
    world.assert_nothing_left(baseline);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_continuation_floods_are_cut_off() {
    use h2_raw::*;
    let world = World::start().await;
    world.assert_serving("before").await;
    let baseline = Resources::of(&world.agent).unwrap();
    // CVE-2024-27316 and friends: a header block that never ends, in CONTINUATION frames that
    // carry headers (memory) or nothing at all (CPU).
    for (name, payload) in [("headers", literal_header(100)), ("empty", Vec::new())] {
        let frames = std::iter::once(frame(HEADERS, END_STREAM, 1, GET_ROOT))
            .chain((0..100_000).map(move |_| frame(CONTINUATION, 0, 1, &payload)));
        let outcome = flood_while_serving(&world, frames).await;
        assert!(
            outcome.closed,
            "{name}: the agent kept the flooding connection open: {outcome:?}"
        );
        assert_eq!(
            outcome.goaway,
            Some(ENHANCE_YOUR_CALM),
            "{name}: the agent should end the connection with GOAWAY ENHANCE_YOUR_CALM: {outcome:?}"
        );
        assert_eq!(
            outcome.forwarded, 0,
            "{name}: the flooded header block reached the backend"
        );
    }
    world.assert_serving("after the CONTINUATION floods").await;
    world.assert_nothing_left(baseline);
}
