//! HTTP semantics a caller relies on, through the agent on 127.0.0.1: route timeouts that cover
//! the response body, request bodies resent by retries and carried by mirrors (and the limit on
//! keeping them, a small one sent slowly), the CORS filter, and `Set-Cookie` added as its own
//! field line.

use bytes::Bytes;
use gamma_tests::loopback::{
    client, echo_backend, get, http2_to, route, send, Agent, AgentOptions, Manifests,
};
use gamma_tests::probe::raw_exchange;
use gamma_tests::raw_h2::{RawH2, Reply};
use http::Method;
use http_body_util::BodyExt;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn options(extra_args: &[&str]) -> AgentOptions<'static> {
    AgentOptions {
        listeners: vec![("ns/front", 80)],
        caller_namespace: None,
        extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
    }
}

/// An HTTP/1.1 backend that reads each connection's first request head and answers it with
/// `answer` (written in the given pieces, `pause` apart), then closes.
async fn scripted_backend(
    answer: &'static [&'static [u8]],
    pause: Duration,
) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = [0u8; 4096];
                let _ = stream.read(&mut head).await;
                for piece in answer {
                    if stream.write_all(piece).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(pause).await;
                }
            });
        }
    });
    addr
}

/// A backend's `Name : value` field reaches the caller as `name: value`, on both upstream
/// exchanges (the agent's own for a bodiless request, hyper's for one with a body): a proxy must
/// drop the space and relay the field (RFC 9112 §5.1). Before, both answered 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_space_before_a_backends_field_colon_is_dropped_not_refused() {
    let backend = scripted_backend(
        &[b"HTTP/1.1 200 OK\r\nX-Thing : 1\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"],
        Duration::ZERO,
    )
    .await;
    let agent = Agent::start(&front_routed_to_http1(backend), options(&[])).unwrap();
    let c = client(false);
    for (method, body) in [(Method::GET, ""), (Method::POST, "x")] {
        let answer = send(&c, method, &agent.url(0, "/"), &[], Bytes::from(body)).await;
        assert_eq!(answer.status, 200, "with body {body:?}: {}", answer.text);
        assert_eq!(answer.headers["x-thing"], "1", "with body {body:?}");
        assert_eq!(answer.text, "ok");
    }
}

/// An HTTP/1.1 backend that answers every request with a 100-byte body, 10 bytes every 300 ms,
/// and closes the connection after it (and says so: it is not kept for another request).
async fn dripping_backend() -> std::net::SocketAddr {
    const DRIP: &[u8] = &[b'x'; 10];
    scripted_backend(
        &[
            b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\nconnection: close\r\n\r\n",
            DRIP,
            DRIP,
            DRIP,
            DRIP,
            DRIP,
            DRIP,
            DRIP,
            DRIP,
            DRIP,
            DRIP,
        ],
        Duration::from_millis(300),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_timeout_cuts_a_response_body_that_is_too_slow() {
    let drip = dripping_backend().await;
    let rules = "  - timeouts: {request: 1s}\n    backendRefs: [{name: echo, port: 80}]\n";
    let world = front_routed_by(drip, rules);
    let agent = Agent::start(&world, options(&[])).unwrap();
    for h2 in [false, true] {
        let started = Instant::now();
        let response = client(h2)
            .request(
                http::Request::get(agent.url(0, "/"))
                    .body(http_body_util::Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
            .expect("the head arrives in time");
        assert_eq!(response.status(), 200);
        let body = tokio::time::timeout(Duration::from_secs(10), response.into_body().collect())
            .await
            .expect("the agent ends the body");
        assert!(
            body.is_err(),
            "h2={h2}: the body is cut short (HTTP/1.1: closed before its length; HTTP/2: reset)"
        );
        let took = started.elapsed();
        assert!(took < Duration::from_secs(3), "h2={h2}: cut after {took:?}");
    }
}

/// The route's timeout lets go of the backend even while the caller reads nothing: a caller
/// that stopped reading a long answer (a paused consumer) held the backend's connection, and
/// its count on the endpoint, for as long as it kept its own open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_timeout_lets_the_backend_go_while_the_caller_reads_nothing() {
    use std::io::{Read as _, Write as _};
    // An answer of 1 GiB, written until the connection fails (or 20 s).
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let backend = listener.local_addr().unwrap();
    let (wrote, written) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap_or(0) == 1 {
            head.push(byte[0]);
        }
        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1073741824\r\n\r\n");
        let chunk = vec![b'x'; 64 * 1024];
        let started = Instant::now();
        let outcome = loop {
            if let Err(e) = stream.write_all(&chunk) {
                break Ok(e.kind());
            }
            if started.elapsed() > Duration::from_secs(20) {
                break Err("still writing after 20 s");
            }
        };
        let _ = wrote.send(outcome);
    });
    let rules = "  - timeouts: {request: 1s}\n    backendRefs: [{name: echo, port: 80}]\n";
    let agent = Agent::start(&front_routed_by(backend, rules), options(&[])).unwrap();
    let mut caller = std::net::TcpStream::connect(agent.listen[0]).unwrap();
    caller
        .write_all(b"GET / HTTP/1.1\r\nHost: front\r\n\r\n")
        .unwrap();
    let mut first = [0u8; 16];
    caller.read_exact(&mut first).unwrap();
    assert!(first.starts_with(b"HTTP/1.1 200"));
    // Reads nothing more, and keeps its connection open.
    let outcome =
        tokio::task::spawn_blocking(move || written.recv_timeout(Duration::from_secs(30)))
            .await
            .unwrap()
            .expect("the backend's writer ends");
    assert!(
        outcome.is_ok(),
        "the backend's connection is closed past the timeout: {outcome:?}"
    );
    drop(caller);
}

/// `front` routed to `ns/echo` at `backend`, an HTTP/1.1 server (appProtocol `http`).
fn front_routed_to_http1(backend: std::net::SocketAddr) -> Manifests {
    front_routed_by(backend, "  - backendRefs: [{name: echo, port: 80}]\n")
}

/// `front` routed by `rules` to `ns/echo` at `backend`, an HTTP/1.1 server (appProtocol
/// `http`).
fn front_routed_by(backend: std::net::SocketAddr, rules: &str) -> Manifests {
    Manifests::front_with_rules_declared(backend, rules, Some("http"))
}

fn metric(agent: &Agent, name: &str) -> u64 {
    gamma_tests::probe::metric(agent, name).unwrap() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_are_resent_by_retries_and_carried_by_mirrors_up_to_the_limit() {
    let flaky = echo_backend([127, 0, 0, 1], "flaky").await;
    let mirror = echo_backend([127, 0, 0, 1], "mirror").await;
    let rules = "  - matches: [{path: {type: PathPrefix, value: /flaky}}]\n    retry: {codes: [503], attempts: 1}\n    backendRefs: [{name: flaky, port: 80}]\n  - matches: [{path: {type: PathPrefix, value: /mirrored}}]\n    filters: [{type: RequestMirror, requestMirror: {backendRef: {name: mirror, port: 80}}}]\n    backendRefs: [{name: flaky, port: 80}]\n";
    let world = Manifests::default()
        .service("ns", "front", 80, &[], None)
        .service("ns", "flaky", 80, &[flaky.addr], None)
        .service("ns", "mirror", 80, &[mirror.addr], None)
        .raw(&route("r", "front", rules));
    let agent = Agent::start(&world, options(&["--max-buffered-body-bytes", "4096"])).unwrap();
    let post = |h2: bool, path: &'static str, size: usize| {
        let url = agent.url(0, path);
        async move {
            send(
                &client(h2),
                Method::POST,
                &url,
                &[],
                Bytes::from(vec![b'b'; size]),
            )
            .await
        }
    };
    for h2 in [false, true] {
        // `/flaky/2`: the first attempt gets 503, the retry (with the whole body again) 200.
        let before = flaky.stats.body_bytes.load(Ordering::Relaxed);
        let answer = post(h2, "/flaky/2", 1000).await;
        assert_eq!(answer.status, 200, "h2={h2}: {}", answer.text);
        assert_eq!(answer.body["body_bytes"], 1000);
        let received = flaky.stats.body_bytes.load(Ordering::Relaxed) - before;
        assert_eq!(received, 2000, "h2={h2}: both attempts carried the body");
    }
    // Over the limit: not kept, so not retried (and counted).
    let answer = post(false, "/flaky/2", 8000).await;
    assert_eq!(answer.status, 503, "{}", answer.text);
    assert_eq!(metric(&agent, "gamma_retries_skipped_body_total"), 1);
    // A mirror carries the body once the caller has sent it all.
    let answer = post(true, "/mirrored", 3000).await;
    assert_eq!(answer.status, 200);
    let deadline = Instant::now() + Duration::from_secs(5);
    while mirror.stats.body_bytes.load(Ordering::Relaxed) < 3000 {
        assert!(Instant::now() < deadline, "the mirror never got the body");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(mirror.stats.body_bytes.load(Ordering::Relaxed), 3000);
    let answer = post(false, "/mirrored", 8000).await;
    assert_eq!(answer.status, 200, "the request itself is served");
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(&agent, "gamma_mirrors_skipped_body_total") < 1 {
        assert!(
            Instant::now() < deadline,
            "the skipped mirror was not counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(mirror.stats.requests.load(Ordering::Relaxed), 1);
}

/// A header the route's filter sets reaches the backend even when the caller's `Connection`
/// names it: connection options are the caller's received fields (RFC 9110 §7.6.1), stripped
/// before the filters run. Before, they were stripped after, and `Connection: x-added` undid the
/// route's header (and `Connection: host` a URLRewrite's hostname).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_connection_options_do_not_strip_what_the_route_sets() {
    let echo = echo_backend([127, 0, 0, 1], "echo").await;
    let world = Manifests::front_with_rules(
        echo.addr,
        "  - filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-added, value: route}]}}]\n    backendRefs: [{name: echo, port: 80}]\n",
    );
    let agent = Agent::start(&world, options(&[])).unwrap();
    let request = b"GET /x HTTP/1.1\r\nHost: front\r\nConnection: close, x-added, x-caller\r\nx-added: caller\r\nx-caller: 1\r\n\r\n";
    let addr = agent.listen[0];
    let reply =
        tokio::task::spawn_blocking(move || raw_exchange(addr, request, Duration::from_secs(5)))
            .await
            .unwrap()
            .unwrap();
    assert!(reply.text.starts_with("HTTP/1.1 200"), "{}", reply.text);
    let seen: serde_json::Value =
        serde_json::from_str(&reply.text[reply.text.find("\r\n\r\n").unwrap() + 4..]).unwrap();
    let headers = seen["headers"].to_string();
    assert!(headers.contains(r#"["x-added","route"]"#), "{headers}");
    assert!(
        !headers.contains("x-caller"),
        "a connection option was forwarded: {headers}"
    );
}

/// A caller that sent `Connection: close` and then a stray line end (or a pipelined request)
/// still reads its answer: the agent closes with bytes unread, which sends a reset, and the
/// answer must be out before it (a shutdown first). Closing without one, the reset took the
/// answer's last bytes, held for the FIN, with it: the caller read nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_is_read_whole_though_the_caller_sent_more_after_close() {
    use std::io::Write as _;
    let echo = echo_backend([127, 0, 0, 1], "echo").await;
    let agent = Agent::start(&Manifests::front_routed_to(echo.addr), options(&[])).unwrap();
    let addr = agent.listen[0];
    let read = tokio::task::spawn_blocking(move || {
        let mut caller = std::net::TcpStream::connect(addr).unwrap();
        caller
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        caller
            .write_all(b"GET /delay/200 HTTP/1.1\r\nHost: front\r\nConnection: close\r\n\r\n")
            .unwrap();
        std::thread::sleep(Duration::from_millis(50));
        caller.write_all(b"\r\n").unwrap();
        // Until the FIN or the reset that follows the answer.
        gamma_tests::probe::read_reply(&mut caller).unwrap().text
    })
    .await
    .unwrap();
    assert!(read.starts_with("HTTP/1.1 200"), "{read:?}");
}

/// An HTTP/1.1 CONNECT goes to the backend in authority form, and its 2xx answer turns both
/// connections into one tunnel (an in-cluster forward proxy behind a Service). Before, the
/// backend got `CONNECT / HTTP/1.1` and the caller a 200 followed by a close. An HTTP/2 CONNECT
/// gets 501.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_connect_is_tunnelled_to_the_backend() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_backend = listener.local_addr().unwrap();
    let (line_tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let line_tx = line_tx.clone();
            tokio::spawn(async move {
                let Some(head) = read_head(&mut stream).await else {
                    return;
                };
                let _ = line_tx.send(head.lines().next().unwrap_or_default().to_string());
                // A Transfer-Encoding on a 2xx to CONNECT frames nothing (RFC 9112 §6.3 item
                // 2: the client ignores it); it must not fail the tunnel.
                let established =
                    b"HTTP/1.1 200 Connection established\r\nTransfer-Encoding: gzip\r\n\r\n";
                if stream.write_all(established).await.is_ok() {
                    // Then an echo of the tunnel's bytes.
                    let (mut read, mut write) = stream.split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                }
            });
        }
    });
    let world = Manifests::front_routed_to(proxy_backend);
    let agent = Agent::start(&world, options(&[])).unwrap();
    let mut caller = tokio::net::TcpStream::connect(agent.listen[0])
        .await
        .unwrap();
    caller
        .write_all(b"CONNECT db.example:5432 HTTP/1.1\r\nHost: db.example:5432\r\n\r\n")
        .await
        .unwrap();
    let answer = read_head(&mut caller).await.expect("an answer");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let line = tokio::time::timeout(Duration::from_secs(5), lines.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(line, "CONNECT db.example:5432 HTTP/1.1");
    caller.write_all(b"through the tunnel").await.unwrap();
    let mut echoed = [0u8; 18];
    tokio::time::timeout(Duration::from_secs(5), caller.read_exact(&mut echoed))
        .await
        .expect("echoed through the tunnel")
        .unwrap();
    assert_eq!(&echoed, b"through the tunnel");
    // HTTP/2 has its own CONNECT (RFC 9113 §8.5), which the agent does not relay.
    let (mut sender, _connection) = http2_to(agent.listen[0]).await;
    let connect = http::Request::connect("db.example:5432")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    assert_eq!(sender.send_request(connect).await.unwrap().status(), 501);
}

/// An HTTP/2 request's `:authority` replaces a Host field sent beside it (RFC 9113 §8.3.1): routes
/// match, and the backend gets, the authority. Before, the Host field won both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_authority_wins_over_a_host_field_beside_it() {
    let a = echo_backend([127, 0, 0, 1], "a").await;
    let b = echo_backend([127, 0, 0, 1], "b").await;
    let rules = "  - matches: [{headers: [{name: host, value: other.example}]}]\n    backendRefs: [{name: b, port: 80}]\n  - backendRefs: [{name: a, port: 80}]\n";
    let world = Manifests::default()
        .service("ns", "front", 80, &[], None)
        .service("ns", "a", 80, &[a.addr], Some("http"))
        .service("ns", "b", 80, &[b.addr], Some("http"))
        .raw(&route("r", "front", rules));
    let agent = Agent::start(&world, options(&[])).unwrap();
    let (mut sender, _connection) = http2_to(agent.listen[0]).await;
    let request = http::Request::get("http://front.ns/x")
        .header("host", "other.example")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let answer = sender.send_request(request).await.unwrap();
    assert_eq!(answer.status(), 200);
    let body = http_body_util::BodyExt::collect(answer.into_body())
        .await
        .unwrap()
        .to_bytes();
    let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(seen["pod"], "a", "routed by the Host field: {seen}");
    assert_eq!(seen["host"], "front.ns", "{seen}");
}

/// A path is matched, and forwarded, as RFC 3986 says it is equivalent: `/public/../admin` and
/// `/%61dmin` are `/admin`, which is what the backend resolves them to. Before, they were
/// matched raw: the `/public` rule (or the catch-all) took them, and the backend served `/admin`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_is_routed_as_the_backend_resolves_it() {
    let public = echo_backend([127, 0, 0, 1], "public").await;
    let admin = echo_backend([127, 0, 0, 1], "admin").await;
    let rules = "  - matches: [{path: {type: PathPrefix, value: /admin}}]\n    backendRefs: [{name: admin, port: 80}]\n  - backendRefs: [{name: public, port: 80}]\n";
    let world = Manifests::default()
        .service("ns", "front", 80, &[], None)
        .service("ns", "public", 80, &[public.addr], Some("http"))
        .service("ns", "admin", 80, &[admin.addr], Some("http"))
        .raw(&route("r", "front", rules));
    let agent = Agent::start(&world, options(&[])).unwrap();
    for target in [
        "/public/../admin/x?q=1",
        "/%61dmin/x?q=1",
        "/public/%2E%2E/admin/x?q=1",
    ] {
        let request = format!("GET {target} HTTP/1.1\r\nHost: front\r\nConnection: close\r\n\r\n");
        let reply =
            raw_exchange(agent.listen[0], request.as_bytes(), Duration::from_secs(5)).unwrap();
        assert!(
            reply.text.starts_with("HTTP/1.1 200"),
            "{target}: {}",
            reply.text
        );
        assert!(
            reply.text.contains(r#""pod":"admin""#),
            "{target}: {}",
            reply.text
        );
        assert!(
            reply.text.contains(r#""path":"/admin/x""#),
            "{target}: {}",
            reply.text
        );
    }
}

/// A forward proxy behind a Service (`HTTP_PROXY=http://squid.infra:3128`): a request its
/// client sends in absolute form goes on in absolute form, bodiless or not (RFC 9112 §3.2.2:
/// clients must send it so to a proxy, and every server must take it), and the proxy's 407 keeps
/// its challenge. Before, the proxy got `GET /x` and the client a 407 without Proxy-Authenticate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_proxy_behind_a_service_gets_absolute_form_and_its_challenge_through() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let forward_proxy = listener.local_addr().unwrap();
    let (line_tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let line_tx = line_tx.clone();
            tokio::spawn(async move {
                while let Some(head) = read_head(&mut stream).await {
                    if head.to_ascii_lowercase().contains("content-length: 3") {
                        let mut body = [0u8; 3];
                        stream.read_exact(&mut body).await.unwrap();
                    }
                    let _ = line_tx.send(head.lines().next().unwrap_or_default().to_string());
                    let challenge = b"HTTP/1.1 407 Proxy Authentication Required\r\nproxy-authenticate: Basic realm=\"squid\"\r\ncontent-length: 0\r\n\r\n";
                    if stream.write_all(challenge).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let agent = Agent::start(&Manifests::front_routed_to(forward_proxy), options(&[])).unwrap();
    for (request, line) in [
        (
            &b"GET http://example.com/x?y=1 HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n"[..],
            "GET http://example.com/x?y=1 HTTP/1.1",
        ),
        (
            &b"POST http://example.com/upload HTTP/1.1\r\nHost: example.com\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc"[..],
            "POST http://example.com/upload HTTP/1.1",
        ),
    ] {
        let answer = answer_until_closed(agent.listen[0], request).await;
        assert!(answer.starts_with("HTTP/1.1 407"), "{answer}");
        assert!(
            answer.to_ascii_lowercase().contains("proxy-authenticate: basic realm=\"squid\""),
            "{answer}"
        );
        let seen = tokio::time::timeout(Duration::from_secs(5), lines.recv()).await.unwrap().unwrap();
        assert_eq!(seen, line);
    }
}

/// When the agent's own HTTP/1.1 server closes a connection its client meant to keep (here after
/// a 400: two Host fields), it reads on until the client's FIN (RFC 9112 §9.6): a next request
/// the client pipelined, still unread in the socket, would turn the close into a reset that can
/// take the answer with it. Before, the client read the 400 and then a reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_agent_closes_is_not_reset_under_a_pipelined_request() {
    let echo = echo_backend([127, 0, 0, 1], "echo").await;
    let agent = Agent::start(&Manifests::front_routed_to(echo.addr), options(&[])).unwrap();
    let addr = agent.listen[0];
    let read = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut pipelined = b"GET /a HTTP/1.1\r\nHost: front\r\nHost: other\r\n\r\n".to_vec();
        // A next request larger than one read: most of it is still in the socket at the close.
        pipelined.extend_from_slice(
            b"POST /b HTTP/1.1\r\nHost: front\r\nContent-Length: 262144\r\n\r\n",
        );
        pipelined.resize(pipelined.len() + 262_144, b'x');
        let writer = stream.try_clone().unwrap();
        let write = std::thread::spawn(move || (&writer).write_all(&pipelined).is_ok());
        let mut answer = Vec::new();
        let read = stream.read_to_end(&mut answer).map_err(|e| e.kind());
        let _ = write.join();
        // Linux reads a FIN's end of stream before a reset that follows it: the reset shows as
        // the socket's pending error.
        std::thread::sleep(Duration::from_millis(100));
        let reset = stream.take_error().unwrap().map(|e| e.kind());
        (
            read.map(|_| String::from_utf8_lossy(&answer).into_owned()),
            reset,
        )
    })
    .await
    .unwrap();
    let (read, reset) = read;
    let answer = read.expect("the answer, then the end of the stream");
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert_eq!(reset, None, "the connection was reset after the answer");
}

/// A backend that answers in something other than HTTP (a server-first protocol's greeting) and
/// keeps its connection open gets the caller a 502 at once, on the agent's own exchange as on
/// hyper's: its first bytes are parsed as they come, not only once a head's end may have come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_does_not_speak_http_fails_at_once() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let greeter = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = stream.write_all(b"220 mail.example ESMTP ready\r\n").await;
                tokio::time::sleep(Duration::from_secs(30)).await;
            });
        }
    });
    let agent = Agent::start(&Manifests::front_routed_to(greeter), options(&[])).unwrap();
    let request = b"GET /x HTTP/1.1\r\nHost: front\r\nConnection: close\r\n\r\n";
    let answer = answer_until_closed(agent.listen[0], request).await;
    assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
}

/// A message head read byte by byte (nothing past it), as text; `None` if the peer closed first.
async fn read_head(stream: &mut tokio::net::TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).await.ok()?;
        head.push(byte[0]);
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

/// An HTTP/1.1 backend answering every request with `size` bytes, as fast as it is read;
/// each answer written whole is reported on the channel.
async fn big_answer_backend(
    size: usize,
) -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<()>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (answered, answers) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let answered = answered.clone();
            tokio::spawn(async move {
                let mut head = [0u8; 4096];
                let _ = stream.read(&mut head).await;
                let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {size}\r\n\r\n");
                stream.write_all(head.as_bytes()).await?;
                let chunk = vec![b'm'; 1 << 16];
                for _ in 0..size / chunk.len() {
                    stream.write_all(&chunk).await?;
                }
                let _ = answered.send(());
                std::io::Result::Ok(())
            });
        }
    });
    (addr, answers)
}

/// An HTTP/2 caller that opens many streams with huge flow-control windows and never reads
/// holds little of the agent's memory per stream: a 64 KiB send buffer, one read of the answer
/// and its read buffer (about 200 KiB). Before, hyper's 400 KiB send buffer per stream: 64 such
/// streams grew the agent by 33 MiB, 1,024 on one connection (the limit then) by about 500 MiB,
/// past the DaemonSet's memory limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_caller_that_never_reads_holds_little_of_the_agents_memory() {
    use gamma_tests::raw_h2::*;
    const STREAMS: u32 = 64;
    let (big, _answers) = big_answer_backend(4 << 20).await;
    let world = front_routed_to_http1(big);
    let agent = Agent::start(&world, options(&[])).unwrap();
    let rss_before = gamma_tests::probe::rss_kib(agent.child.id()).unwrap();
    let mut caller = tokio::net::TcpStream::connect(agent.listen[0])
        .await
        .unwrap();
    let mut opening = PREFACE.to_vec();
    let huge_window = [
        &SETTINGS_INITIAL_WINDOW_SIZE.to_be_bytes()[..],
        &0x7fff_ffffu32.to_be_bytes(),
    ]
    .concat();
    opening.extend(frame(SETTINGS, 0, 0, &huge_window));
    opening.extend(frame(
        WINDOW_UPDATE,
        0,
        0,
        &(0x7fff_ffffu32 - 65_535).to_be_bytes(),
    ));
    // GET http://front/ : :method GET, :scheme http, :path /, :authority front (literal,
    // not indexed).
    let get = [&[0x82, 0x86, 0x84, 0x01, 0x05][..], b"front"].concat();
    for stream in 0..STREAMS {
        opening.extend(frame(
            HEADERS,
            END_HEADERS | END_STREAM,
            2 * stream + 1,
            &get,
        ));
    }
    caller.write_all(&opening).await.unwrap();
    // The answers stream in until the caller's socket buffers and the agent's are full.
    let mut rss = rss_before;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        rss = rss.max(gamma_tests::probe::rss_kib(agent.child.id()).unwrap());
    }
    let grown = rss.saturating_sub(rss_before);
    assert!(
        grown < 20 << 10,
        "{STREAMS} unread streams grew the agent's resident memory by {grown} KiB"
    );
    drop(caller);
}

/// A mirror's answer is read and dropped as it streams, never kept whole: a mirror backend
/// answering 256 MiB leaves the agent's peak resident memory where it was. Before, the agent
/// collected each mirror's whole answer (up to 256 mirrors at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirrors_answer_is_dropped_as_it_streams() {
    const ANSWER: usize = 256 << 20;
    let echo = echo_backend([127, 0, 0, 1], "echo").await;
    let (big, mut answers) = big_answer_backend(ANSWER).await;
    let rules = "  - filters: [{type: RequestMirror, requestMirror: {backendRef: {name: big, port: 80}}}]\n    backendRefs: [{name: echo, port: 80}]\n";
    let world = Manifests::default()
        .service("ns", "front", 80, &[], None)
        .service("ns", "echo", 80, &[echo.addr], None)
        .service("ns", "big", 80, &[big], None)
        .raw(&route("r", "front", rules));
    let agent = Agent::start(&world, options(&[])).unwrap();
    let peak_before = gamma_tests::probe::peak_rss_kib(agent.child.id()).unwrap();
    let answer = get(&client(false), &agent.url(0, "/x"), &[]).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    tokio::time::timeout(Duration::from_secs(30), answers.recv())
        .await
        .expect("the mirror backend wrote its whole answer")
        .unwrap();
    // The last bytes written are read by the agent shortly after.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let grown = gamma_tests::probe::peak_rss_kib(agent.child.id()).unwrap() - peak_before;
    assert!(
        grown < 32 << 10,
        "peak resident memory grew by {grown} KiB mirroring a {ANSWER}-byte answer"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflights_are_answered_and_actual_requests_get_their_headers() {
    let echo = echo_backend([127, 0, 0, 1], "echo").await;
    let rules = "  - filters:\n    - type: CORS\n      cors: {allowOrigins: [\"https://app.example\", \"https://*.apps.example\"], allowMethods: [GET, PUT], allowHeaders: [x-a], exposeHeaders: [x-echo-pod], allowCredentials: true, maxAge: 600}\n    - type: ResponseHeaderModifier\n      responseHeaderModifier: {add: [{name: set-cookie, value: added=1}]}\n    backendRefs: [{name: echo, port: 80}]\n";
    let world = Manifests::default()
        .service("ns", "front", 80, &[], None)
        .service("ns", "echo", 80, &[echo.addr], None)
        .raw(&route("r", "front", rules));
    let agent = Agent::start(&world, options(&[])).unwrap();
    let http = client(false);
    let preflight = [
        ("origin", "https://a.apps.example"),
        ("access-control-request-method", "PUT"),
        ("access-control-request-headers", "x-a"),
    ];
    let answer = send(
        &http,
        Method::OPTIONS,
        &agent.url(0, "/x"),
        &preflight,
        Bytes::new(),
    )
    .await;
    assert_eq!(answer.status, 200);
    let h = &answer.headers;
    assert_eq!(h["access-control-allow-origin"], "https://a.apps.example");
    assert_eq!(h["access-control-allow-methods"], "GET, PUT");
    assert_eq!(h["access-control-allow-headers"], "x-a");
    assert_eq!(h["access-control-allow-credentials"], "true");
    assert_eq!(h["access-control-max-age"], "600");
    assert_eq!(
        echo.stats.requests.load(Ordering::Relaxed),
        0,
        "the agent answers"
    );
    let other = [("origin", "https://evil.example"), preflight[1]];
    let answer = send(
        &http,
        Method::OPTIONS,
        &agent.url(0, "/x"),
        &other,
        Bytes::new(),
    )
    .await;
    assert_eq!(answer.status, 200);
    assert!(!answer.headers.contains_key("access-control-allow-origin"));
    // The actual request: relayed, with the headers that let the browser read it; the
    // backend's Set-Cookie and the route's added one stay separate field lines (RFC 6265).
    let answer = get(
        &http,
        &agent.url(0, "/cookie/from=backend"),
        &[("origin", "https://app.example")],
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.headers["x-echo-pod"], "echo");
    assert_eq!(
        answer.headers["access-control-allow-origin"],
        "https://app.example"
    );
    assert_eq!(
        answer.headers["access-control-expose-headers"],
        "x-echo-pod"
    );
    let cookies: Vec<_> = answer.headers.get_all("set-cookie").iter().collect();
    assert_eq!(cookies, ["from=backend", "added=1"]);
}

/// The agent's own answer to an allowed origin's request carries the CORS filter's headers: a
/// browser reads a 503 (no endpoint) only with them, and a script saw a network error. So does a
/// redirect a rule makes after its CORS filter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_own_answers_to_an_allowed_origin_carry_cors_headers() {
    let cors = "    - type: CORS\n      cors: {allowOrigins: [\"https://app.example\"]}\n";
    let rules = format!(
        "  - matches: [{{path: {{type: PathPrefix, value: /down}}}}]\n    filters:\n{cors}    backendRefs: [{{name: empty, port: 80}}]\n\
         \x20 - matches: [{{path: {{type: PathPrefix, value: /moved}}}}]\n    filters:\n{cors}    - type: RequestRedirect\n      requestRedirect: {{hostname: elsewhere.example}}\n"
    );
    let world = Manifests::default()
        .service("ns", "front", 80, &[], None)
        .service("ns", "empty", 80, &[], None)
        .raw(&route("r", "front", &rules));
    let agent = Agent::start(&world, options(&[])).unwrap();
    for (path, status) in [("/down", 503), ("/moved", 302)] {
        let answer = get(
            &client(false),
            &agent.url(0, path),
            &[("origin", "https://app.example")],
        )
        .await;
        assert_eq!(answer.status, status, "{path}: {}", answer.text);
        assert_eq!(
            answer.headers.get("access-control-allow-origin"),
            Some(&http::HeaderValue::from_static("https://app.example")),
            "{path}: {:?}",
            answer.headers
        );
    }
}

/// An opaque connection whose backend resets it is reset for the caller too, not ended with a
/// FIN the caller would take for a complete stream; and the other way round. Before, either
/// side's reset reached the other as an orderly close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_on_one_side_of_an_opaque_connection_resets_the_other() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        // The first connection that says hello is reset; the second reports how the caller's
        // reset reached it. (Others, such as the harness checking the listener, say nothing.)
        let mut hellos = 0;
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut hello = [0u8; 5];
            if stream.read_exact(&mut hello).await.is_err() {
                continue;
            }
            hellos += 1;
            if hellos == 1 {
                gamma_tests::probe::reset_on_close(&stream);
                continue;
            }
            let mut rest = Vec::new();
            let _ = seen_tx.send(stream.read_to_end(&mut rest).await.map_err(|e| e.kind()));
        }
    });
    let world = Manifests::default().service("ns", "raw", 80, &[backend], Some("tcp"));
    let agent = Agent::start(
        &world,
        AgentOptions {
            listeners: vec![("ns/raw", 80)],
            caller_namespace: None,
            extra_args: Vec::new(),
        },
    )
    .unwrap();
    let mut caller = tokio::net::TcpStream::connect(agent.listen[0])
        .await
        .unwrap();
    caller.write_all(b"hello").await.unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), caller.read_to_end(&mut rest))
        .await
        .expect("the connection ends");
    assert_eq!(
        read.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset),
        "the backend's reset reached the caller as"
    );
    let caller = tokio::net::TcpStream::connect(agent.listen[0])
        .await
        .unwrap();
    let mut caller = caller;
    caller.write_all(b"hello").await.unwrap();
    // Read by the agent and passed on before the reset.
    tokio::time::sleep(Duration::from_millis(200)).await;
    gamma_tests::probe::reset_on_close(&caller);
    drop(caller);
    let at_backend = tokio::time::timeout(Duration::from_secs(5), seen.recv())
        .await
        .expect("the backend's side ends")
        .unwrap();
    assert_eq!(
        at_backend,
        Err(std::io::ErrorKind::ConnectionReset),
        "the caller's reset reached the backend as"
    );
}

/// `--idle-timeout-s 0` turns the idle timeout off (Envoy's convention): a quiet opaque
/// connection stays. Before, 0 became 1 s and closed every quiet database connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_timeout_of_zero_is_none() {
    let tcp_addr = gamma_tests::loopback::tcp_echo().await;
    let world = Manifests::default().service("ns", "raw", 80, &[tcp_addr], Some("tcp"));
    let agent = Agent::start(
        &world,
        AgentOptions {
            listeners: vec![("ns/raw", 80)],
            caller_namespace: None,
            extra_args: vec!["--idle-timeout-s".into(), "0".into()],
        },
    )
    .unwrap();
    let mut opaque = tokio::net::TcpStream::connect(agent.listen[0])
        .await
        .unwrap();
    opaque.write_all(b"hello").await.unwrap();
    let mut echoed = [0u8; 5];
    opaque.read_exact(&mut echoed).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    opaque.write_all(b"again").await.unwrap();
    tokio::time::timeout(Duration::from_secs(2), opaque.read_exact(&mut echoed))
        .await
        .expect("still echoing")
        .expect("still open after a quiet 1.5 s");
    assert_eq!(&echoed, b"again");
}

/// A connection whose Service is not in the table (it went between the connect and the accept,
/// or an explicit listener names none) is reset at once, as a connect to a Service without
/// endpoints fails. Before, the agent sniffed it for the detection timeout (10 s: a client of a
/// server-first protocol waits that long) and then closed it with a FIN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_to_an_unknown_service_is_reset_at_once() {
    let world = Manifests::default().service("ns", "front", 80, &[], None);
    let agent = Agent::start(
        &world,
        AgentOptions {
            listeners: vec![("ns/missing", 80)],
            caller_namespace: None,
            extra_args: Vec::new(),
        },
    )
    .unwrap();
    // The reset may come before the connect returns, or at the first read.
    let reset = async {
        let mut caller = tokio::net::TcpStream::connect(agent.listen[0]).await?;
        let mut buf = [0u8; 16];
        caller.read(&mut buf).await
    };
    let read = tokio::time::timeout(Duration::from_secs(2), reset)
        .await
        .expect("ended at once, not after the detection timeout");
    assert_eq!(
        read.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset)
    );
}

/// Idle connections do not stay forever: an HTTP/2 client connection that moved nothing for
/// `--idle-timeout-s` gets GOAWAY and ends; an opaque one is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_after_the_idle_timeout() {
    let echo = echo_backend([127, 0, 0, 1], "echo").await;
    let tcp_addr = gamma_tests::loopback::tcp_echo().await;
    let world =
        Manifests::front_routed_to(echo.addr).service("ns", "raw", 80, &[tcp_addr], Some("tcp"));
    let agent = Agent::start(
        &world,
        AgentOptions {
            listeners: vec![("ns/front", 80), ("ns/raw", 80)],
            caller_namespace: None,
            extra_args: vec!["--idle-timeout-s".into(), "1".into()],
        },
    )
    .unwrap();
    let (mut sender, connection) = http2_to(agent.listen[0]).await;
    let request = bodiless_get("http://front/");
    assert_eq!(sender.send_request(request).await.unwrap().status(), 200);
    tokio::time::timeout(Duration::from_secs(5), connection)
        .await
        .expect("the idle HTTP/2 connection is ended by the agent")
        .unwrap()
        .expect("with GOAWAY, not an error");
    let mut opaque = tokio::net::TcpStream::connect(agent.listen[1])
        .await
        .unwrap();
    opaque.write_all(b"hello").await.unwrap();
    let mut buf = [0u8; 5];
    opaque.read_exact(&mut buf).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(5), opaque.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0))),
        "the idle opaque connection is closed: {closed:?}"
    );
}

/// A small body the agent's own HTTP/1.1 server would read whole, sent slower than the
/// header-read timeout: the request goes to hyper's server (which does not time bodies) and is
/// served whole, not cut. A head that slow is closed (`bad_input`'s slowloris).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_body_slower_than_the_head_timeout_is_still_served() {
    let echo = echo_backend([127, 0, 0, 1], "echo").await;
    let world = Manifests::front_routed_to(echo.addr);
    let agent = Agent::start(&world, options(&["--header-read-timeout-ms", "300"])).unwrap();
    let mut stream = tokio::net::TcpStream::connect(agent.listen[0])
        .await
        .unwrap();
    let head = "POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\nConnection: close\r\n\r\n";
    stream
        .write_all(format!("{head}12345").as_bytes())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    stream.write_all(b"67890").await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
        .await
        .expect("answered and closed")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(answer.contains(r#""body_bytes":10"#), "{answer}");
}

/// A stream that stays quiet for a while (a gRPC watch, a slow unary call) must not draw PINGs
/// from the agent to its backend: gRPC servers (C-core's and grpc-go's defaults) count a PING
/// less than 5 minutes after the last one, with no data sent between, as a strike, and after two
/// strikes end the connection with GOAWAY ENHANCE_YOUR_CALM ("too_many_pings"), failing every
/// stream on it. Before, the agent pinged every 30 s while a stream was open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_http2_stream_draws_no_pings_to_its_backend() {
    const QUIET: Duration = Duration::from_secs(33);
    let backend = RawH2::start(|_| Reply::Quiet(QUIET)).await;
    let agent = Agent::start(&h2_backend_world(backend.addr), options(&[])).unwrap();
    let (mut sender, _connection) = http2_to(agent.listen[0]).await;
    let request = bodiless_get("http://front/watch");
    let answer = sender.send_request(request).await.unwrap();
    assert_eq!(answer.status(), 200);
    let body = tokio::time::timeout(QUIET * 2, answer.into_body().collect())
        .await
        .expect("the stream ends when the backend ends it")
        .expect("whole")
        .to_bytes();
    assert_eq!(&body[..], b"done");
    assert_eq!(
        backend.pings.load(Ordering::Relaxed),
        0,
        "PINGs sent to the backend during a quiet stream of {QUIET:?}"
    );
}

/// A GET without a body, for an HTTP/2 caller connection.
fn bodiless_get(uri: impl AsRef<str>) -> http::Request<http_body_util::Empty<Bytes>> {
    http::Request::get(uri.as_ref())
        .body(http_body_util::Empty::new())
        .unwrap()
}

/// A gRPC call without a message, for an HTTP/2 caller connection.
fn grpc_call(uri: &str) -> http::Request<http_body_util::Empty<Bytes>> {
    http::Request::post(uri)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(http_body_util::Empty::new())
        .unwrap()
}

/// A backend script: the first request is held open for `watch` (a gRPC watch), the others are
/// answered at once.
fn quiet_first(watch: Duration) -> impl Fn(u32) -> Reply + Send + Sync + 'static {
    move |n| {
        if n == 0 {
            Reply::Quiet(watch)
        } else {
            Reply::Ok
        }
    }
}

/// `front` routed to Service `h2`, whose one endpoint (`backend`) speaks HTTP/2.
fn h2_backend_world(backend: std::net::SocketAddr) -> Manifests {
    Manifests::default()
        .service("ns", "front", 80, &[], None)
        .service("ns", "h2", 80, &[backend], Some("kubernetes.io/h2c"))
        .raw(&route(
            "r",
            "front",
            "  - backendRefs: [{name: h2, port: 80}]\n",
        ))
}

/// A request an HTTP/2 backend declined before processing it (RST_STREAM REFUSED_STREAM, or
/// beyond the last stream of a GOAWAY, as a server shutting down or at its stream limit sends)
/// is sent again, with no retry policy on the route (RFC 9113 §8.7: it is safe to), and does not
/// count against the endpoint. Before, the caller got 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_an_http2_backend_declined_unprocessed_is_sent_again() {
    // INTERNAL_ERROR: a GOAWAY's code is the connection's, and what it leaves out was not
    // processed whatever the code (RFC 9113 §6.8).
    for decline in [Reply::Refuse, Reply::GoAway, Reply::GoAwayWithError(2)] {
        let backend = RawH2::start(move |n| if n == 0 { decline } else { Reply::Ok }).await;
        let agent = Agent::start(&h2_backend_world(backend.addr), options(&[])).unwrap();
        let answer = get(&client(false), &agent.url(0, "/x"), &[]).await;
        assert_eq!(answer.status, 200, "{decline:?}: {}", answer.text);
        assert_eq!(backend.requests.load(Ordering::Relaxed), 2, "{decline:?}");
    }
}

/// A request its HTTP/2 backend declines unprocessed every time gets 503 (the backend is
/// unavailable for it: nothing of it ran, RFC 9113 §8.7), not 502, which says the backend failed
/// it; after its attempts (2 without a policy) and 3 resends past them, paused (a gRPC server
/// behind on its calls refuses new ones for a moment).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_declined_unprocessed_every_time_is_unavailable() {
    let backend = RawH2::start(|_| Reply::Refuse).await;
    let agent = Agent::start(&h2_backend_world(backend.addr), options(&[])).unwrap();
    let started = std::time::Instant::now();
    let answer = get(&client(false), &agent.url(0, "/x"), &[]).await;
    assert_eq!(answer.status, 503, "{}", answer.text);
    assert_eq!(backend.requests.load(Ordering::Relaxed), 2 + 3);
    assert!(
        started.elapsed() >= Duration::from_millis(70),
        "paused 10, 20 and 40 ms: {:?}",
        started.elapsed()
    );
}

/// A persisted session stays on its endpoint when that endpoint declines a request unprocessed
/// (a stream refused once): the request goes to it again. Before, it went to the Service's other
/// endpoint, and the session moved there for good (its header naming that one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persisted_session_stays_on_an_endpoint_that_declined_once() {
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    let refusing = |flag: Arc<AtomicBool>| {
        move |_| match flag.swap(false, Ordering::Relaxed) {
            true => Reply::Refuse,
            false => Reply::Ok,
        }
    };
    let (refuse_a, refuse_b) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let a = RawH2::start_at("127.0.0.51:0".parse().unwrap(), refusing(refuse_a.clone())).await;
    let b_addr = std::net::SocketAddr::new([127, 0, 0, 52].into(), a.addr.port());
    let b = RawH2::start_at(b_addr, refusing(refuse_b.clone())).await;
    let world = Manifests::default()
        .service("ns", "front", 80, &[], None)
        .service("ns", "h2", 80, &[a.addr, b.addr], Some("kubernetes.io/h2c"))
        .raw(&route(
            "r",
            "front",
            "  - backendRefs: [{name: h2, port: 80}]\n    sessionPersistence: {type: Header, header: {name: x-session}}\n",
        ));
    let agent = Agent::start(&world, options(&[])).unwrap();
    let http = client(false);
    let first = get(&http, &agent.url(0, "/x"), &[]).await;
    assert_eq!(first.status, 200);
    let session = first.headers["x-session"].to_str().unwrap().to_string();
    let on_a = a.requests.load(Ordering::Relaxed) == 1;
    let (owner, other, refuse) = if on_a {
        (&a, &b, &refuse_a)
    } else {
        (&b, &a, &refuse_b)
    };
    refuse.store(true, Ordering::Relaxed);
    let again = get(
        &http,
        &agent.url(0, "/x"),
        &[("x-session", session.as_str())],
    )
    .await;
    assert_eq!(again.status, 200);
    assert_eq!(
        owner.requests.load(Ordering::Relaxed),
        3,
        "refused, then answered"
    );
    assert_eq!(
        other.requests.load(Ordering::Relaxed),
        0,
        "the other endpoint never"
    );
}

/// A backend that ends every connection with a GOAWAY carrying an error code declines what it
/// leaves out, which goes again, but it is failing: its endpoint is ejected as one whose
/// requests fail is (after three in a row). Not so for a graceful GOAWAY (NO_ERROR).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_backend_going_away_on_errors_is_ejected() {
    for (decline, ejected) in [(Reply::GoAwayWithError(2), true), (Reply::GoAway, false)] {
        let backend = RawH2::start(move |_| decline).await;
        let agent = Agent::start(&h2_backend_world(backend.addr), options(&[])).unwrap();
        for _ in 0..2 {
            let answer = get(&client(false), &agent.url(0, "/x"), &[]).await;
            // Declined at every send (2 + 3): nothing of it ran.
            assert_eq!(answer.status, 503, "{decline:?}: {}", answer.text);
        }
        let ejections =
            gamma_tests::probe::metric(&agent, "gamma_endpoint_ejections_total").unwrap();
        assert_eq!(
            ejections > 0.0,
            ejected,
            "{decline:?}: {ejections} ejections"
        );
    }
}

/// An HTTP/2 backend that allows one stream per connection (SETTINGS_MAX_CONCURRENT_STREAMS)
/// and holds the first one open (a gRPC watch): a second request is sent at once on another
/// connection. Before, it waited in h2's queue behind the first stream, for as long as that one
/// lasted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_beyond_an_http2_backends_stream_limit_opens_another_connection() {
    const WATCH: Duration = Duration::from_secs(20);
    let backend = RawH2::start_with_limit(Some(1), quiet_first(WATCH)).await;
    call_beside_a_watch(&backend, Duration::ZERO).await;
    assert_eq!(backend.connections.load(Ordering::Relaxed), 2);
}

/// Through an agent to `backend`, on one caller connection (so one worker and its pool): a
/// first request the backend holds open (a watch), then, `settle` later, a second one that must
/// be answered while the first is still open.
async fn call_beside_a_watch(backend: &RawH2, settle: Duration) {
    let agent = Agent::start(&h2_backend_world(backend.addr), options(&[])).unwrap();
    let (mut sender, _connection) = http2_to(agent.listen[0]).await;
    let get = |path: &str| bodiless_get(format!("http://front{path}"));
    let watch = sender.send_request(get("/watch")).await.unwrap();
    assert_eq!(watch.status(), 200);
    tokio::time::sleep(settle).await;
    let call = tokio::time::timeout(Duration::from_secs(5), sender.send_request(get("/call")))
        .await
        .expect("answered while the watch stream is open")
        .unwrap();
    assert_eq!(call.status(), 200);
}

/// A pooled HTTP/2 connection whose backend sent GOAWAY while a long stream runs on it (a
/// server's max connection age, a graceful stop) takes no new request: the next one goes out on
/// a new connection. Before, hyper handed the request back unsent and the caller got 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_finding_its_pooled_http2_connection_going_away_goes_out_on_another() {
    const WATCH: Duration = Duration::from_secs(20);
    let backend = RawH2::start(|n| {
        if n == 0 {
            Reply::QuietGoingAway(WATCH)
        } else {
            Reply::Ok
        }
    })
    .await;
    // 200 ms: the agent has read the GOAWAY that follows the watch's answer.
    call_beside_a_watch(&backend, Duration::from_millis(200)).await;
    assert_eq!(backend.connections.load(Ordering::Relaxed), 2);
    assert_eq!(backend.requests.load(Ordering::Relaxed), 2);
}

/// Requests waiting for a connection to an HTTP/2 endpoint that does not answer SYNs (its
/// accept queue full, as a node going away) fail together when that one attempt times out.
/// Before, each waiter made an attempt of its own in turn: the n-th answered after n connect
/// timeouts (1 s each).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_waiting_for_a_failed_http2_connect_fail_with_it() {
    const WAITING: usize = 6;
    let stalled = tokio::net::TcpSocket::new_v4().unwrap();
    stalled.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let stalled = stalled.listen(1).unwrap();
    let addr = stalled.local_addr().unwrap();
    // Fill its accept queue: SYNs beyond it are dropped, and connects hang.
    let mut filling = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(stream)) = tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            filling.push(stream);
        }
    }
    let agent = Agent::start(&h2_backend_world(addr), options(&[])).unwrap();
    // One caller connection: every request is the same worker's, on its pool.
    let (sender, _connection) = http2_to(agent.listen[0]).await;
    let started = Instant::now();
    let calls: Vec<_> = (0..WAITING)
        .map(|i| {
            let mut sender = sender.clone();
            tokio::spawn(async move {
                let request = bodiless_get(format!("http://front/{i}"));
                sender.send_request(request).await.unwrap().status()
            })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap(), 503);
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "{WAITING} requests answered after {took:?}"
    );
    drop((stalled, filling));
}

/// A request that waited for a connect to an HTTP/2 endpoint (its one connection at the stream
/// limit) goes out on that connection when a stream ended meanwhile, though the connect failed:
/// before, every request that waited got the connect's 503 and the endpoint was ejected (one
/// dropped SYN to a pod at its stream limit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_waiting_for_a_failed_http2_connect_takes_a_stream_freed_meanwhile() {
    const WATCH: Duration = Duration::from_millis(1_500);
    let backend = RawH2::start_accepting_one(Some(1), quiet_first(WATCH));
    let agent = Agent::start(&h2_backend_world(backend.addr), options(&[])).unwrap();
    let (sender, _connection) = http2_to(agent.listen[0]).await;
    let call = |path: &'static str| {
        let mut sender = sender.clone();
        tokio::spawn(async move {
            let request = bodiless_get(format!("http://front{path}"));
            let answer = sender.send_request(request).await.unwrap();
            let status = answer.status();
            answer.into_body().collect().await.unwrap();
            status
        })
    };
    let watch = call("/watch");
    while backend.requests.load(Ordering::Relaxed) == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let filling = gamma_tests::raw_h2::fill_accept_queue(backend.addr).await;
    // No room on the one connection: a connect, which hangs until its timeout (2 s).
    let connecting = call("/connecting");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let waiting = call("/waiting");
    assert_eq!(watch.await.unwrap(), 200);
    assert_eq!(
        connecting.await.unwrap(),
        503,
        "the connect hung and failed"
    );
    assert_eq!(
        waiting.await.unwrap(),
        200,
        "sent on the watch's connection"
    );
    let ejections = gamma_tests::probe::metric(&agent, "gamma_endpoint_ejections_total").unwrap();
    assert_eq!(ejections, 1.0, "one failed connect, one ejection");
    drop(filling);
}

/// An HTTP/1.1 caller's trailers reach an HTTP/2 backend without the fields no trailer may carry
/// (a connection's, here `keep-alive`), which HTTP/2 forbids. Before, h2 refused the trailers
/// and the upstream stream never ended: the backend waited for the rest of the body, the caller
/// for its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_callers_trailers_reach_an_http2_backend_without_connection_fields() {
    let backend = echo_backend([127, 0, 0, 1], "echo").await;
    let agent = Agent::start(&h2_backend_world(backend.addr), options(&[])).unwrap();
    let request = "POST /upload HTTP/1.1\r\nHost: front\r\nTransfer-Encoding: chunked\r\n\
                   Trailer: x-sum\r\nConnection: close\r\n\r\n\
                   3\r\nabc\r\n0\r\nkeep-alive: 1\r\nx-sum: 1\r\n\r\n";
    let addr = agent.listen[0];
    let answer = tokio::task::spawn_blocking(move || {
        raw_exchange(addr, request.as_bytes(), Duration::from_secs(3)).unwrap()
    })
    .await
    .unwrap()
    .text;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains(r#""trailers":[["x-sum","1"]]"#), "{answer}");
}

/// A malformed HTTP/2 request (two Host fields) gets its 400 and the connection serves on: one
/// caller's bad stream does not send GOAWAY to every other stream of a shared gRPC channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_http2_request_leaves_its_connection_open() {
    let backend = echo_backend([127, 0, 0, 1], "echo").await;
    let agent = Agent::start(&Manifests::front_routed_to(backend.addr), options(&[])).unwrap();
    let (mut sender, _connection) = http2_to(agent.listen[0]).await;
    let two_hosts = http::Request::get("http://front/x")
        .header("host", "front")
        .header("host", "other")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    assert_eq!(sender.send_request(two_hosts).await.unwrap().status(), 400);
    let fine = bodiless_get("http://front/x");
    let answer = sender
        .send_request(fine)
        .await
        .expect("the connection serves on");
    assert_eq!(answer.status(), 200);
}

/// A backend that resets one stream (RST_STREAM INTERNAL_ERROR: its handler failed) keeps its
/// pooled HTTP/2 connection: the next request goes out on it. Before, any error on a pooled
/// connection dropped it from the pool, and each reset cost a new connection (beyond the
/// per-endpoint limit, the dropped ones staying open for their streams).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_stream_does_not_cost_its_http2_connection() {
    let backend = RawH2::start(|n| if n == 1 { Reply::Reset(2) } else { Reply::Ok }).await;
    let agent = Agent::start(&h2_backend_world(backend.addr), options(&[])).unwrap();
    let (mut sender, _connection) = http2_to(agent.listen[0]).await;
    for expected in [200, 502, 200] {
        let request = bodiless_get("http://front/x");
        assert_eq!(
            sender.send_request(request).await.unwrap().status(),
            expected
        );
    }
    assert_eq!(backend.connections.load(Ordering::Relaxed), 1);
}

/// An HTTP/2 backend's answer may carry as large a header list as a caller may send the agent
/// (64 KiB): a 20 KiB field reaches the caller. Before, the agent's HTTP/2 client kept hyper's
/// 16 KiB limit and the caller got 502 (gRPC: UNAVAILABLE), and a larger trailer was dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_backends_large_header_list_reaches_the_caller() {
    const SIZE: usize = 20 * 1024;
    let backend = RawH2::start(|_| Reply::BigHeader(SIZE)).await;
    let agent = Agent::start(&h2_backend_world(backend.addr), options(&[])).unwrap();
    let answer = get(&client(false), &agent.url(0, "/x"), &[]).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    let big = answer.headers.get("x-big").map(|v| v.len());
    assert_eq!(big, Some(SIZE));
}

/// A gRPC call whose backend connection breaks after the answer began (the pod killed
/// mid-stream) ends with UNAVAILABLE trailers, what a client of the backend itself reports for a
/// lost connection (and what watch and retry logic acts on). Before, the caller's stream was
/// reset INTERNAL_ERROR, which gRPC clients report as INTERNAL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_answer_cut_by_a_lost_backend_connection_ends_unavailable() {
    let backend = RawH2::start(|_| Reply::PartThenClose).await;
    let agent = Agent::start(&h2_backend_world(backend.addr), options(&[])).unwrap();
    let (mut sender, _connection) = http2_to(agent.listen[0]).await;
    let call = grpc_call("http://front/pkg.Catalog/Watch");
    let answer = sender.send_request(call).await.unwrap();
    assert_eq!(answer.status(), 200);
    let body = tokio::time::timeout(Duration::from_secs(5), answer.into_body().collect())
        .await
        .expect("the answer ends")
        .expect("with trailers, not a reset");
    let trailers = body.trailers().cloned().unwrap_or_default();
    assert_eq!(trailers["grpc-status"], "14", "{trailers:?}");
}

/// A gRPC call with a body that its HTTP/2 backend declined unprocessed (REFUSED_STREAM) at every
/// resend (2 + 3) has its own stream refused, which gRPC clients send again by themselves
/// (transparent retry). Before, it got UNAVAILABLE, which they do not retry without a retry
/// policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declined_grpc_call_with_a_body_is_refused_to_its_caller() {
    let backend = RawH2::start(|_| Reply::Refuse).await;
    let agent = Agent::start(&h2_backend_world(backend.addr), options(&[])).unwrap();
    let (mut sender, _connection) = http2_to(agent.listen[0]).await;
    let call = http::Request::post("http://front/pkg.Catalog/Get")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(http_body_util::Full::new(Bytes::from_static(&[
            0, 0, 0, 0, 0,
        ])))
        .unwrap();
    let error = sender
        .send_request(call)
        .await
        .expect_err("the stream is refused, not answered");
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&error);
    let mut reason = None;
    while let Some(e) = source {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            reason = h2.reason();
        }
        source = e.source();
    }
    assert_eq!(reason, Some(h2::Reason::REFUSED_STREAM), "{error:?}");
    // Counted as what it was: no call ended (the client sends it again), no 200.
    let counted = |text: &str, prefix: &str, label: &str| {
        text.lines()
            .any(|l| l.starts_with(prefix) && l.contains(label) && !l.ends_with(" 0"))
    };
    // The request's series is written last.
    let text = metrics_until(&agent, "the refusal counted", |text| {
        counted(text, "gamma_requests_total{", r#"status="503""#)
    })
    .await;
    assert_eq!(
        backend.requests.load(Ordering::Relaxed),
        2 + 3,
        "its body kept"
    );
    assert!(
        !counted(&text, "gamma_grpc_calls_total{", "grpc_status="),
        "{text}"
    );
    assert!(
        !counted(&text, "gamma_requests_total{", r#"status="200""#),
        "{text}"
    );
}

/// A gRPC call whose first attempt may have run (its stream reset INTERNAL_ERROR once sent) and
/// whose retries were declined is not refused to its caller: a client's transparent resend
/// would run it again beyond the route's retries (RFC 9113 §8.7: REFUSED_STREAM says nothing
/// was processed). It ends with a status instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_declined_after_an_attempt_that_may_have_run_is_not_refused() {
    let backend = RawH2::start(|n| {
        if n == 0 {
            Reply::Reset(2)
        } else {
            Reply::Refuse
        }
    })
    .await;
    let world = Manifests::default()
        .service("ns", "front", 80, &[], None)
        .service("ns", "h2", 80, &[backend.addr], Some("kubernetes.io/h2c"))
        .raw(&route(
            "r",
            "front",
            "  - retry: {attempts: 2, backoff: 10ms}\n    backendRefs: [{name: h2, port: 80}]\n",
        ));
    let agent = Agent::start(&world, options(&[])).unwrap();
    let (mut sender, _connection) = http2_to(agent.listen[0]).await;
    let call = grpc_call("http://front/pkg.Catalog/Buy");
    let answer = sender
        .send_request(call)
        .await
        .expect("answered, not refused");
    assert_eq!(
        backend.requests.load(Ordering::Relaxed),
        3 + 3,
        "three attempts, and the resends of a declined one past them"
    );
    let status = answer.headers().get("grpc-status").cloned();
    let body = answer.into_body().collect().await.unwrap();
    let status = status.or_else(|| body.trailers()?.get("grpc-status").cloned());
    assert_eq!(
        status.as_ref().map(|s| s.to_str().unwrap()),
        Some("13"),
        "INTERNAL, as the first attempt's reset says"
    );
}

/// An HTTP/2 upstream connection that carried no stream for `--upstream-http2-idle-timeout-s` is
/// closed, as HTTP/1.1 ones are. Before, the agent kept every HTTP/2 connection it made until
/// the backend closed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_upstream_connection_is_closed() {
    let backend = RawH2::start(|_| Reply::Ok).await;
    let agent = Agent::start(
        &h2_backend_world(backend.addr),
        options(&["--upstream-http2-idle-timeout-s", "1"]),
    )
    .unwrap();
    let answer = get(&client(false), &agent.url(0, "/x"), &[]).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    let deadline = Instant::now() + Duration::from_secs(5);
    while backend.closed.load(Ordering::Relaxed) < 1 {
        assert!(
            Instant::now() < deadline,
            "the idle connection is still open"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(backend.connections.load(Ordering::Relaxed), 1);
}

/// A request its caller cancels before the answer (an HTTP/2 RST_STREAM: a gRPC deadline, a
/// client's timeout) is counted, as status 499, and logged. Before, it vanished from the
/// request series and the access log: the slowest requests were the ones missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_its_caller_cancels_is_counted() {
    let silent = silent_backend().await;
    let agent = Agent::start(&Manifests::front_routed_to(silent), options(&[])).unwrap();
    let (mut sender, _connection) = http2_to(agent.listen[0]).await;
    let request = bodiless_get("http://front/slow");
    let cancelled = tokio::time::timeout(Duration::from_millis(300), sender.send_request(request));
    assert!(cancelled.await.is_err(), "answered by a silent backend");
    metrics_until(&agent, "the cancelled request counted", counted_499).await;
}

/// A backend that accepts connections and never answers: it holds them until the runtime ends.
async fn silent_backend() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    addr
}

/// The agent's `/metrics` once `done` holds of it, read every 50 ms for at most 5 s (then the
/// test fails, saying `what` it waited for).
async fn metrics_until(agent: &Agent, what: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = gamma_tests::loopback::http_get(agent.admin, "/metrics").unwrap();
        if done(&text) {
            return text;
        }
        assert!(Instant::now() < deadline, "not {what}: {text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One request counted with status 499 (its caller gave up on it).
fn counted_499(metrics: &str) -> bool {
    metrics
        .lines()
        .any(|l| l.starts_with("gamma_requests_total{") && l.contains(r#"status="499"} 1"#))
}

/// An HTTP/1.1 caller that gives up on a request whose backend hangs (its socket reset) ends the
/// request: counted 499, its connection closed; on the agent's own server (a bodiless GET, also
/// after the caller's FIN, a half-close that leaves the answer due) and
/// on hyper's (an HTTP/1.0 request, a chunked body, a large body the backend does not read, part
/// of it still unread in the agent's socket when the caller resets), which reads nothing from a
/// half-closing caller while a request runs. Before, the request, and the connection, stayed in
/// flight for as long as the backend took (forever for one that hangs), against
/// `--max-connections`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_caller_that_resets_ends_its_request() {
    use std::io::Write as _;
    let silent = silent_backend().await;
    // The caller is watched once its request ran for the head read timeout.
    let agent = Agent::start(
        &Manifests::front_routed_to(silent),
        options(&["--header-read-timeout-ms", "500"]),
    )
    .unwrap();
    let requests: [&[u8]; 5] = [
        b"GET /slow HTTP/1.1\r\nHost: front\r\n\r\n",
        b"GET /slow?half-closed HTTP/1.1\r\nHost: front\r\n\r\n",
        b"GET /slow HTTP/1.0\r\nHost: front\r\n\r\n",
        b"POST /slow HTTP/1.1\r\nHost: front\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        b"POST /slow HTTP/1.1\r\nHost: front\r\nContent-Length: 1073741824\r\n\r\n",
    ];
    for (n, request) in requests.into_iter().enumerate() {
        let mut caller = std::net::TcpStream::connect(agent.listen[0]).unwrap();
        caller.write_all(request).unwrap();
        if request.starts_with(b"POST") && !request.ends_with(b"0\r\n\r\n") {
            // Body until every buffer between here and the backend is full (it reads nothing):
            // a write stalls, and stalls again a second later (not an agent slow to be scheduled).
            caller
                .set_write_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            let chunk = vec![0u8; 64 * 1024];
            let mut stalls = 0;
            for _ in 0..4096 {
                if caller.write_all(&chunk).is_err() {
                    stalls += 1;
                    if stalls == 2 {
                        break;
                    }
                    std::thread::sleep(Duration::from_secs(1));
                } else {
                    stalls = 0;
                }
            }
            assert_eq!(stalls, 2, "the body filled every buffer to the backend");
        }
        if request.starts_with(b"GET /slow?half-closed") {
            caller.shutdown(std::net::Shutdown::Write).unwrap();
            // Past the head read timeout: the agent saw the FIN before the reset.
            tokio::time::sleep(Duration::from_millis(700)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        gamma_tests::probe::reset_on_close(&caller);
        drop(caller);
        let ended = |text: &str| {
            let abandoned = text
                .lines()
                .filter(|l| {
                    l.starts_with("gamma_requests_total{") && l.contains(r#"status="499"}"#)
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .sum::<u64>();
            abandoned == n as u64 + 1 && text.lines().any(|l| l == "gamma_connections_open 0")
        };
        let request = String::from_utf8_lossy(request);
        metrics_until(
            &agent,
            &format!("the abandoned request ended: {request}"),
            ended,
        )
        .await;
    }
}

/// How gRPC calls ended is counted by their grpc-status: an HTTP 200 says nothing of a gRPC
/// call's outcome. A trailers-only answer (the agent's own UNAVAILABLE for a Service without
/// endpoints) counts its head's status, another its trailers'. Before, both were only
/// `status="200"`, and a GRPCRoute whose backends were all down looked healthy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_are_counted_by_their_grpc_status() {
    let backend = RawH2::start(|_| Reply::PartThenClose).await;
    let world =
        h2_backend_world(backend.addr).service("ns", "empty", 80, &[], Some("kubernetes.io/h2c"));
    let agent = Agent::start(
        &world,
        AgentOptions {
            listeners: vec![("ns/front", 80), ("ns/empty", 80)],
            caller_namespace: None,
            extra_args: Vec::new(),
        },
    )
    .unwrap();
    for listener in &agent.listen {
        let (mut sender, _connection) = http2_to(*listener).await;
        let call = grpc_call("http://front/pkg.Catalog/Get");
        let answer = sender.send_request(call).await.unwrap();
        let _ = answer.into_body().collect().await;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = gamma_tests::loopback::http_get(agent.admin, "/metrics").unwrap();
        let unavailable: Vec<&str> = text
            .lines()
            .filter(|l| {
                l.starts_with("gamma_grpc_calls_total{") && l.ends_with(r#"grpc_status="14"} 1"#)
            })
            .collect();
        if unavailable.len() == 2 {
            assert!(
                unavailable
                    .iter()
                    .any(|l| l.contains(r#"service="ns/empty:80""#)),
                "{text}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A gRPC call a plain HTTP backend (or a proxy before it) answers 503 without a gRPC status
/// is counted UNAVAILABLE, as its client reports it (gRPC's HTTP-to-status mapping), not
/// UNKNOWN: a GRPCRoute whose backend is down shows as down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_call_answered_with_an_http_error_is_counted_as_its_client_reads_it() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while matches!(stream.read(&mut buf).await, Ok(1..)) {
                    let answer = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n";
                    if stream.write_all(answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let rules = "  - backendRefs: [{name: echo, port: 80}]\n";
    let http1 = Manifests::front_with_rules_declared(backend, rules, Some("http"));
    let agent = Agent::start(&http1, options(&[])).unwrap();
    let (mut sender, _connection) = http2_to(agent.listen[0]).await;
    let call = grpc_call("http://front/pkg.Catalog/Get");
    let answer = sender.send_request(call).await.unwrap();
    assert_eq!(answer.status(), 503);
    let _ = answer.into_body().collect().await;
    metrics_until(&agent, "one call counted UNAVAILABLE", |text| {
        text.lines().any(|l| {
            l.starts_with("gamma_grpc_calls_total{") && l.ends_with(r#"grpc_status="14"} 1"#)
        })
    })
    .await;
}

/// The agent's whole answer to `request`, sent on a connection of its own and read until the
/// agent closes it.
async fn answer_until_closed(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let request = request.to_vec();
    let reply =
        tokio::task::spawn_blocking(move || raw_exchange(addr, &request, Duration::from_secs(5)))
            .await
            .unwrap()
            .unwrap();
    assert!(reply.closed, "closed after the answer: {}", reply.text);
    reply.text
}

/// `front`, whose one rule sends `/routed` to `echo`: other paths get the agent's own 404.
fn only_routed_has_a_rule(echo: std::net::SocketAddr) -> Manifests {
    Manifests::front_with_rules(
        echo,
        "  - matches: [{path: {type: PathPrefix, value: /routed}}]\n    backendRefs: [{name: echo, port: 80}]\n",
    )
}

/// The agent's own answer to a HEAD over HTTP/2 has no body (RFC 9110 §9.3.2): the h2 crate's
/// client, like Go's, fails a stream whose HEAD answer carries DATA. Its Content-Length is the
/// one a GET would get, as over HTTP/1.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_answer_to_a_head_over_http2_has_no_body() {
    let echo = echo_backend([127, 0, 0, 1], "echo").await;
    let agent = Agent::start(&only_routed_has_a_rule(echo.addr), options(&[])).unwrap();
    let (mut sender, _connection) = http2_to(agent.listen[0]).await;
    let request = |method: Method| {
        http::Request::builder()
            .method(method)
            .uri("http://front/unrouted")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap()
    };
    let get = sender.send_request(request(Method::GET)).await.unwrap();
    assert_eq!(get.status(), 404);
    let get_length = get.into_body().collect().await.unwrap().to_bytes().len();
    let head = sender.send_request(request(Method::HEAD)).await.unwrap();
    assert_eq!(head.status(), 404);
    assert_eq!(
        head.headers()[http::header::CONTENT_LENGTH],
        get_length.to_string().as_str(),
        "the length a GET gets"
    );
    let body = head.into_body().collect().await.map(|b| b.to_bytes());
    assert!(
        body.as_ref().is_ok_and(|b| b.is_empty()),
        "no body to a HEAD: {body:?}"
    );
}

/// Trailers a backend sends reach an HTTP/1.1 caller that accepts them (`TE: trailers`): the
/// `Trailer` field that names them is end to end (RFC 9110 §6.6.2), and an HTTP/1.1 hop sends
/// only the trailer fields it names. Before, the agent stripped it as hop-by-hop, and with it
/// every trailer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_reach_an_http1_caller_that_accepts_them() {
    let backend = scripted_backend(
        &[b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-sum\r\n\r\n4\r\ndata\r\n0\r\nx-sum: 42\r\n\r\n"],
        Duration::ZERO,
    )
    .await;
    let agent = Agent::start(&Manifests::front_routed_to(backend), options(&[])).unwrap();
    for (method, body) in [("GET", ""), ("POST", "abc")] {
        let request = format!(
            "{method} /t HTTP/1.1\r\nHost: front\r\nTE: trailers\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let answer = answer_until_closed(agent.listen[0], request.as_bytes())
            .await
            .to_lowercase();
        assert!(
            answer.contains("\r\ntrailer: x-sum\r\n"),
            "{method}: {answer}"
        );
        assert!(
            answer.ends_with("\r\n0\r\nx-sum: 42\r\n\r\n"),
            "{method}: the trailer after the last chunk: {answer}"
        );
    }
}

/// A gRPC call whose backend reset its stream gets the status gRPC's mapping of HTTP/2 error
/// codes gives (PROTOCOL-HTTP2.md, "Errors"), not UNAVAILABLE for all: UNAVAILABLE tells the
/// caller that sending the call again is safe, which it may not be once the backend acted on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_call_whose_backend_reset_it_gets_grpcs_status_for_the_code() {
    // INTERNAL_ERROR, CANCEL, ENHANCE_YOUR_CALM. (REFUSED_STREAM: the caller's stream is
    // refused in turn, `a_declined_grpc_call_with_a_body_is_refused_to_its_caller`.)
    for (code, grpc_status) in [(0x2, "13"), (0x8, "1"), (0xb, "8")] {
        let backend = RawH2::start(move |_| Reply::Reset(code)).await;
        let agent = Agent::start(&h2_backend_world(backend.addr), options(&[])).unwrap();
        let (mut sender, _connection) = http2_to(agent.listen[0]).await;
        let call = grpc_call("http://front/pkg.Service/Method");
        let answer = sender.send_request(call).await.unwrap();
        assert_eq!(answer.status(), 200, "trailers-only, code {code:#x}");
        assert_eq!(
            answer.headers()["grpc-status"],
            grpc_status,
            "RST_STREAM {code:#x}"
        );
    }
}

/// Empty lines before a request line are ignored (RFC 9112 §2.2), by protocol detection on a
/// port that is sniffed and by the server after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_lines_before_a_request_are_ignored() {
    let echo = echo_backend([127, 0, 0, 1], "echo").await;
    let agent = Agent::start(&Manifests::front_routed_to(echo.addr), options(&[])).unwrap();
    let request =
        b"\r\nGET /after-an-empty-line HTTP/1.1\r\nHost: front\r\nConnection: close\r\n\r\n";
    let answer = answer_until_closed(agent.listen[0], request).await;
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(answer.contains("/after-an-empty-line"), "{answer}");
}

/// A request in absolute form names its host in its target, whatever its Host field says (RFC
/// 9112 §3.2.2): routes match that one and the backend gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absolute_form_request_is_for_the_host_its_target_names() {
    let echo = echo_backend([127, 0, 0, 1], "echo").await;
    let agent = Agent::start(&Manifests::front_routed_to(echo.addr), options(&[])).unwrap();
    let request =
        b"GET http://user@front.ns:8080/x HTTP/1.1\r\nHost: elsewhere\r\nConnection: close\r\n\r\n";
    let answer = answer_until_closed(agent.listen[0], request).await;
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(answer.contains(r#""host":"front.ns:8080""#), "{answer}");
}

/// An answer goes out in the agent's HTTP version, not its backend's (RFC 9110 §6.2): an
/// HTTP/1.0 backend's answer to a request with a body (hyper's path) reached an HTTP/1.1 caller
/// as `HTTP/1.0 200 OK`, and the caller's connection was closed after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_0_backends_answer_goes_out_as_http1_1() {
    let old = scripted_backend(
        &[b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok"],
        Duration::ZERO,
    )
    .await;
    let agent = Agent::start(&Manifests::front_routed_to(old), options(&[])).unwrap();
    let request = b"POST /x HTTP/1.1\r\nHost: front\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
    let answer = answer_until_closed(agent.listen[0], request).await;
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(answer.ends_with("\r\n\r\nok"), "{answer}");
}

/// An upload answered before its body was read (here a 404: no rule matches; as well a 503, or
/// a backend's 413) is not reset: the agent shuts its side and reads the rest of the body before
/// closing (RFC 9112 §9.6), so the client's upload ends and it reads the answer. Closed with the
/// body unread, the connection sent a reset, and the client's upload failed instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_answered_early_is_not_reset() {
    let echo = echo_backend([127, 0, 0, 1], "echo").await;
    let agent = Agent::start(&only_routed_has_a_rule(echo.addr), options(&[])).unwrap();
    let addr = agent.listen[0];
    let (written, answer) = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        const BODY: usize = 8 << 20;
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let head =
            format!("POST /unrouted HTTP/1.1\r\nHost: front\r\nContent-Length: {BODY}\r\n\r\n");
        let written = stream
            .write_all(head.as_bytes())
            .and_then(|()| stream.write_all(&vec![b'x'; BODY]));
        let mut answer = Vec::new();
        let read = stream.read_to_end(&mut answer);
        (
            written,
            (read, String::from_utf8_lossy(&answer).into_owned()),
        )
    })
    .await
    .unwrap();
    assert!(written.is_ok(), "the upload was cut: {written:?}");
    let (read, answer) = answer;
    assert!(read.is_ok(), "{read:?}: {answer}");
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
}

/// A backend whose first connection answers 503 as soon as it has the head (then reads the body
/// on, slowly), and whose later ones read the whole body its `content-length` announces and
/// answer how many bytes came.
async fn early_503_backend() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut first = true;
        while let Ok((mut stream, _)) = listener.accept().await {
            let early = std::mem::take(&mut first);
            tokio::spawn(async move {
                let Some(head) = read_head(&mut stream).await else {
                    return;
                };
                if early {
                    let _ = stream
                        .write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n")
                        .await;
                    let mut sink = [0u8; 1024];
                    while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    return;
                }
                let length = gamma_tests::probe::content_length(&head).unwrap_or(0);
                let mut body = vec![0u8; length];
                if stream.read_exact(&mut body).await.is_err() {
                    return;
                }
                let text = format!("got {length}");
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{text}",
                    text.len()
                );
                let _ = stream.write_all(answer.as_bytes()).await;
            });
        }
    });
    addr
}

/// A retry takes its body when it is decided, not after the backoff: meanwhile the first
/// attempt's connection, answered early, still reads the caller's body on, and the part it read
/// past the keeping limit could not have been sent again. Before, the retry then went with an
/// empty body under the caller's `content-length` (the backend waited for bytes that never
/// came; with a chunked caller, an empty request went through as if whole).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_sends_the_whole_body_though_the_first_attempt_read_on_during_the_backoff() {
    let backend = early_503_backend().await;
    let rules = "  - retry: {codes: [503], attempts: 1, backoff: 300ms}\n    backendRefs: [{name: echo, port: 80}]\n";
    let world = front_routed_by(backend, rules);
    let agent = Agent::start(&world, options(&["--max-buffered-body-bytes", "4096"])).unwrap();
    let mut caller = tokio::net::TcpStream::connect(agent.listen[0])
        .await
        .unwrap();
    caller
        .write_all(b"POST / HTTP/1.1\r\nhost: front\r\ncontent-length: 8000\r\n\r\n")
        .await
        .unwrap();
    caller.write_all(&[b'a'; 1000]).await.unwrap();
    // The first attempt has its 503 by now, and the retry waits out its backoff.
    tokio::time::sleep(Duration::from_millis(100)).await;
    caller.write_all(&[b'b'; 7000]).await.unwrap();
    let mut answer = vec![0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(5), caller.read(&mut answer))
        .await
        .expect("the retry is answered")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..read]);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("got 8000"), "{answer}");
}

/// Trailers from an HTTP/1.1 backend reach an HTTP/2 caller without the fields HTTP/2 forbids
/// (those of a connection) or no trailer may carry: on both of the agent's HTTP/1.1 exchanges
/// (its own, for a request without a body, and hyper's). Before, h2 refused to send them, and the
/// caller's stream was reset after its whole body came.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_from_an_http1_backend_reach_an_http2_caller_without_connection_fields() {
    let backend = scripted_backend(
        &[b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-sum\r\n\r\n5\r\nhello\r\n0\r\nkeep-alive: timeout=5\r\nconnection: keep-alive\r\nx-sum: 42\r\n\r\n"],
        Duration::ZERO,
    )
    .await;
    let world = front_routed_to_http1(backend);
    let agent = Agent::start(&world, options(&[])).unwrap();
    let (mut sender, _connection) = http2_to(agent.listen[0]).await;
    for (method, body) in [
        (Method::GET, Bytes::new()),
        (Method::POST, Bytes::from_static(b"payload")),
    ] {
        let request = http::Request::builder()
            .method(method.clone())
            .uri("http://front/t")
            .header("te", "trailers")
            .body(http_body_util::Full::new(body))
            .unwrap();
        let answer = sender.send_request(request).await.unwrap();
        assert_eq!(answer.status(), 200, "{method}");
        let body = tokio::time::timeout(Duration::from_secs(5), answer.into_body().collect())
            .await
            .expect("the answer ends")
            .unwrap_or_else(|e| panic!("{method}: reset, not ended: {e:?}"));
        let trailers = body.trailers().cloned().unwrap_or_default();
        assert_eq!(
            trailers.get("x-sum").map(|v| v.as_bytes()),
            Some(&b"42"[..]),
            "{method}"
        );
        assert!(
            !trailers.contains_key("keep-alive"),
            "{method}: {trailers:?}"
        );
        assert_eq!(body.to_bytes(), "hello", "{method}");
    }
}

/// A route's header filters do not change where a message ends: a Content-Length set on a GET
/// (which has no body) and one set on the answer are left out. Before, the backend got
/// `content-length: 40` and no body (a backend answering at once left the kept connection 40
/// bytes into the next caller's request), and a caller kept alive got the answer's length wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_filters_do_not_change_where_a_message_ends() {
    let echo = echo_backend([127, 0, 0, 1], "echo").await;
    let rules = "  - filters:\n    - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: Content-Length, value: \"40\"}, {name: x-routed, value: \"1\"}]}}\n    - {type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: content-length, value: \"2\"}]}}\n    backendRefs: [{name: echo, port: 80}]\n";
    let agent = Agent::start(&front_routed_by(echo.addr, rules), options(&[])).unwrap();
    let http = client(false);
    for _ in 0..3 {
        let answer =
            tokio::time::timeout(Duration::from_secs(5), get(&http, &agent.url(0, "/x"), &[]))
                .await
                .expect("answered");
        assert_eq!(answer.status, 200, "{}", answer.text);
        let seen: Vec<&str> = answer.body["headers"]
            .as_array()
            .unwrap_or_else(|| panic!("the echo's whole JSON: {:?}", answer.text))
            .iter()
            .map(|pair| pair[0].as_str().unwrap())
            .collect();
        assert!(seen.contains(&"x-routed"), "{seen:?}");
        assert!(!seen.contains(&"content-length"), "{seen:?}");
    }
    assert_eq!(echo.stats.body_bytes.load(Ordering::Relaxed), 0);
}

/// An HTTP/1.1 backend's answer framed by both a coding and a length does not leave its
/// connection to be reused (RFC 9112 §6.3 item 3: where the next answer starts is not to be
/// trusted), on either of the agent's exchanges. Before, hyper's (requests with a body) pooled it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_framed_two_ways_does_not_leave_its_connection_for_reuse() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    tokio::spawn({
        let accepted = accepted.clone();
        async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let mut read = Vec::new();
                    let mut buf = [0u8; 4096];
                    loop {
                        // Each request whole (head and body), then the answer; kept open.
                        let whole =
                            read.windows(4)
                                .position(|w| w == b"\r\n\r\n")
                                .and_then(|end| {
                                    let head = String::from_utf8_lossy(&read[..end]);
                                    let length =
                                        gamma_tests::probe::content_length(&head).unwrap_or(0);
                                    (read.len() >= end + 4 + length).then_some(end + 4 + length)
                                });
                        if let Some(size) = whole {
                            read.drain(..size);
                            let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n";
                            if stream.write_all(answer).await.is_err() {
                                return;
                            }
                            continue;
                        }
                        match stream.read(&mut buf).await {
                            Ok(n @ 1..) => read.extend_from_slice(&buf[..n]),
                            _ => return,
                        }
                    }
                });
            }
        }
    });
    let agent = Agent::start(&front_routed_to_http1(backend), options(&[])).unwrap();
    let http = client(false);
    for (method, body) in [(Method::POST, "payload"), (Method::GET, "")] {
        let before = accepted.load(Ordering::Relaxed);
        for _ in 0..2 {
            let answer = send(
                &http,
                method.clone(),
                &agent.url(0, "/x"),
                &[],
                Bytes::from(body),
            )
            .await;
            assert_eq!(
                (answer.status.as_u16(), answer.text.as_str()),
                (200, "ok"),
                "{method}"
            );
        }
        assert_eq!(
            accepted.load(Ordering::Relaxed) - before,
            2,
            "{method}: a connection per answer"
        );
    }
}

/// A body of these frames and no stated length (hyper's server then sends it chunked, with
/// trailers if asked).
struct Frames(std::collections::VecDeque<hyper::body::Frame<Bytes>>);

impl hyper::body::Body for Frames {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        std::task::Poll::Ready(self.get_mut().0.pop_front().map(Ok))
    }
}

/// A caller that takes trailers (`TE: trailers`) gets those of an HTTP/1.1 backend that sends
/// them only when asked, as hyper's server does (and RFC 9110 §6.5 lets any server do): the
/// agent asks on HTTP/1.1 with TE's connection option. On both of the agent's HTTP/1.1 exchanges
/// and from callers of both versions. Before, TE went only to HTTP/2 backends, and these trailers
/// were dropped by the backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_taking_trailers_gets_those_an_http1_backend_sends_only_when_asked() {
    use hyper::body::Frame;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let answer = hyper::service::service_fn(|_request| async {
                let mut trailers = http::HeaderMap::new();
                trailers.insert("x-sum", http::HeaderValue::from_static("42"));
                let frames = [
                    Frame::data(Bytes::from_static(b"hello")),
                    Frame::trailers(trailers),
                ];
                http::Response::builder()
                    .header("trailer", "x-sum")
                    .body(Frames(frames.into()))
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), answer),
            );
        }
    });
    let agent = Agent::start(&front_routed_to_http1(backend), options(&[])).unwrap();
    for h2 in [false, true] {
        for (method, body) in [
            (Method::GET, Bytes::new()),
            (Method::POST, Bytes::from_static(b"payload")),
        ] {
            let mut request = http::Request::builder()
                .method(method.clone())
                .uri(agent.url(0, "/t"))
                .header("te", "trailers");
            if !h2 {
                request = request.header("connection", "te");
            }
            let request = request.body(http_body_util::Full::new(body)).unwrap();
            let answer = client(h2).request(request).await.unwrap();
            assert_eq!(answer.status(), 200, "h2={h2} {method}");
            let body = tokio::time::timeout(Duration::from_secs(5), answer.into_body().collect())
                .await
                .expect("the answer ends")
                .unwrap();
            let trailers = body.trailers().cloned().unwrap_or_default();
            assert_eq!(
                trailers.get("x-sum").map(|v| v.as_bytes()),
                Some(&b"42"[..]),
                "h2={h2} {method}"
            );
            assert_eq!(body.to_bytes(), "hello", "h2={h2} {method}");
        }
    }
}

/// A request counts in flight on its endpoint until its answer's end, not its head: the power of
/// two choices then sees a long answer (a download, a gRPC stream) as load on its endpoint. On
/// both HTTP/1.1 exchanges and for both callers' versions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_counts_in_flight_until_its_answers_end() {
    let drip = dripping_backend().await;
    let world = front_routed_to_http1(drip);
    let agent = Agent::start(&world, options(&[])).unwrap();
    for (h2, body) in [(false, ""), (true, ""), (false, "with a body")] {
        let request = http::Request::post(agent.url(0, "/"))
            .body(http_body_util::Full::new(Bytes::from_static(
                body.as_bytes(),
            )))
            .unwrap();
        let answer = client(h2).request(request).await.unwrap();
        assert_eq!(answer.status(), 200);
        let in_flight = metric(&agent, "gamma_upstream_requests_in_flight");
        assert_eq!(
            in_flight, 1,
            "h2={h2} {body:?}: the answer's body still comes"
        );
        let collected = tokio::time::timeout(Duration::from_secs(10), answer.into_body().collect())
            .await
            .expect("the body ends")
            .unwrap();
        assert_eq!(collected.to_bytes().len(), 100);
        let deadline = Instant::now() + Duration::from_secs(5);
        while metric(&agent, "gamma_upstream_requests_in_flight") != 0 {
            assert!(Instant::now() < deadline, "h2={h2} {body:?}: never ended");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// An HTTP/2 connection to the agent over plain TCP, with the client's own initial stream
/// window (h2's client, which does not read what the test does not ask for).
async fn h2_connection(addr: std::net::SocketAddr, window: u32) -> h2::client::SendRequest<Bytes> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, connection) = h2::client::Builder::new()
        .initial_window_size(window)
        .handshake(tcp)
        .await
        .unwrap();
    tokio::spawn(connection);
    send.ready().await.unwrap()
}

fn h2_request(method: Method, path: &str) -> http::Request<()> {
    http::Request::builder()
        .method(method)
        .uri(format!("http://front{path}"))
        .body(())
        .unwrap()
}

/// Uploads whose backend reads slowly stall their own streams, not the caller's others (RFC 9113
/// §5.2): with hyper's defaults one upload's body took the connection's whole window (with 1 MiB
/// under 64 KiB per stream, 16 did), and a small request body on the same connection (a gRPC
/// channel's next call) waited for the uploads. The small one goes to another backend: only the
/// caller's connection is shared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_uploads_do_not_stall_the_connections_other_request_bodies() {
    let a = echo_backend([127, 0, 0, 1], "a").await;
    let b = echo_backend([127, 0, 0, 1], "b").await;
    let world = Manifests::default()
        .service("ns", "front", 80, &[], None)
        .service("ns", "a", 80, &[a.addr], None)
        .service("ns", "b", 80, &[b.addr], None)
        .raw(&route(
            "r",
            "front",
            "  - matches: [{path: {type: PathPrefix, value: /small}}]\n    backendRefs: [{name: b, port: 80}]\n  - backendRefs: [{name: a, port: 80}]\n",
        ));
    let agent = Agent::start(&world, options(&[])).unwrap();
    let mut send = h2_connection(agent.listen[0], 1024 * 1024).await;
    // The backend reads these bodies only after 5 s. Many: each stalled stream holds its whole
    // window of the connection's (with 1 MiB under 64 KiB per stream, 16 took it all).
    let body = Bytes::from(vec![b'u'; 8 * 1024 * 1024]);
    let mut uploads = Vec::new();
    for _ in 0..24 {
        send = send.ready().await.unwrap();
        let (answer, mut upload) = send
            .send_request(h2_request(Method::POST, "/delay/5000"), false)
            .unwrap();
        upload.send_data(body.clone(), true).unwrap();
        uploads.push((answer, upload));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut send = send.ready().await.unwrap();
    let (answer, mut body) = send
        .send_request(h2_request(Method::POST, "/small"), false)
        .unwrap();
    body.send_data(Bytes::from_static(b"hello"), true).unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(2), answer)
        .await
        .expect("the small request is answered while the upload waits")
        .unwrap();
    assert_eq!(answer.status(), 200);
}

/// Callers that read nothing of large answers stall their own streams, not the answers of other
/// callers multiplexed on the same backend connection: with hyper's defaults (2 MiB per stream
/// under 5 MiB per connection) three such callers stopped every answer from that endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_reading_nothing_do_not_stall_others_on_the_backend_connection() {
    let a = echo_backend([127, 0, 0, 1], "a").await;
    let world = Manifests::default().service("ns", "front", 80, &[a.addr], None);
    // One worker: every caller shares its connection to the backend.
    let agent = Agent::start(&world, options(&["--workers", "1"])).unwrap();
    let mut stalled = Vec::new();
    for _ in 0..4 {
        let mut send = h2_connection(agent.listen[0], 16 * 1024).await;
        let (answer, _) = send
            .send_request(h2_request(Method::GET, "/bytes/4000000"), true)
            .unwrap();
        // The head is read, never the body.
        stalled.push((send, answer.await.unwrap()));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut send = h2_connection(agent.listen[0], 1024 * 1024).await;
    let (answer, _) = send
        .send_request(h2_request(Method::GET, "/bytes/100000"), true)
        .unwrap();
    let read = async {
        let mut body = answer.await.unwrap().into_body();
        let mut bytes = 0;
        while let Some(chunk) = body.data().await {
            let chunk = chunk.unwrap();
            bytes += chunk.len();
            let _ = body.flow_control().release_capacity(chunk.len());
        }
        bytes
    };
    let bytes = tokio::time::timeout(Duration::from_secs(2), read)
        .await
        .expect("another caller's answer flows while theirs wait");
    assert_eq!(bytes, 100_000);
    drop(stalled);
}
