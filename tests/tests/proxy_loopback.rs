//! The agent binary on 127.0.0.1 with explicit listeners and real echo backends: routing, every
//! filter, weights, each error status, h2c and gRPC, upgrades, opaque TCP, timeouts, retries,
//! drain on SIGTERM, and a live manifest change under load.

use gamma_tests::loopback::{
    client, echo_backend, get, header_at_backend, route, tcp_echo, Agent, AgentOptions, Manifests,
};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::time::Duration;

fn options(caller: Option<&'static str>) -> AgentOptions<'static> {
    AgentOptions {
        listeners: vec![("ns/front", 80)],
        caller_namespace: caller,
        extra_args: Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_filters_and_weights() {
    let a = echo_backend([127, 0, 0, 1], "a").await;
    let b = echo_backend([127, 0, 0, 1], "b").await;
    let rules = r#"  - matches: [{path: {type: PathPrefix, value: /api}, headers: [{name: x-env, value: canary}]}]
    filters:
    - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-set, value: s}], add: [{name: x-add, value: two}], remove: [x-gone]}}
    - {type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: x-resp, value: r}]}}
    backendRefs: [{name: b, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /old}}]
    filters: [{type: URLRewrite, urlRewrite: {hostname: rewritten.example, path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}}]
    backendRefs: [{name: a, port: 80}]
  - matches: [{path: {type: Exact, value: /moved}}]
    filters: [{type: RequestRedirect, requestRedirect: {scheme: https, hostname: example.org, statusCode: 301}}]
  - backendRefs: [{name: a, port: 80, weight: 3}, {name: b, port: 80, weight: 1}]
"#;
    let world = Manifests::default()
        .service("ns", "front", 80, &[], None)
        .service("ns", "a", 80, &[a.addr], None)
        .service("ns", "b", 80, &[b.addr], None)
        .raw(&route("r", "front", rules));
    let agent = Agent::start(&world, options(None)).unwrap();
    let c = client(false);

    let answer = get(
        &c,
        &agent.url(0, "/api/x"),
        &[("x-env", "canary"), ("x-add", "one"), ("x-gone", "1")],
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.body["pod"], "b");
    assert_eq!(header_at_backend(&answer, "x-set").as_deref(), Some("s"));
    assert_eq!(
        header_at_backend(&answer, "x-add").as_deref(),
        Some("one,two")
    );
    assert_eq!(header_at_backend(&answer, "x-gone"), None);
    assert_eq!(answer.headers["x-resp"], "r");

    let rewritten = get(&c, &agent.url(0, "/old/page?q=1"), &[]).await;
    assert_eq!(rewritten.body["pod"], "a");
    assert_eq!(rewritten.body["path"], "/new/page");
    assert_eq!(rewritten.body["query"], "q=1");
    assert_eq!(rewritten.body["host"], "rewritten.example");

    let redirect = get(&c, &agent.url(0, "/moved"), &[]).await;
    assert_eq!(redirect.status, 301);
    assert_eq!(redirect.headers["location"], "https://example.org/moved");

    let mut counts: BTreeMap<String, u32> = BTreeMap::new();
    for _ in 0..400 {
        let answer = get(&c, &agent.url(0, "/"), &[]).await;
        *counts
            .entry(answer.body["pod"].as_str().unwrap_or("?").to_string())
            .or_default() += 1;
    }
    let share_a = f64::from(counts["a"]) / 400.0;
    assert!((share_a - 0.75).abs() < 0.08, "weights 3:1 gave {counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_routes_replace_producer_routes_for_their_namespace() {
    let a = echo_backend([127, 0, 0, 1], "a").await;
    let producer = "  - filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-who, value: producer}]}}]\n    backendRefs: [{name: a, port: 80}]\n";
    let consumer = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: c, namespace: ui}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: front, namespace: ns}]\n  rules:\n  - filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-dev-feature, value: enabled}]}}]\n    backendRefs: [{name: a, namespace: ns, port: 80}]\n";
    let world = Manifests::default()
        .service("ns", "front", 80, &[], None)
        .service("ns", "a", 80, &[a.addr], None)
        .raw(&route("p", "front", producer))
        .raw(consumer);
    let from_ui = Agent::start(&world, options(Some("ui"))).unwrap();
    let from_ns = Agent::start(&world, options(None)).unwrap();
    let c = client(false);
    let ui = get(&c, &from_ui.url(0, "/"), &[]).await;
    assert_eq!(
        header_at_backend(&ui, "x-dev-feature").as_deref(),
        Some("enabled")
    );
    assert_eq!(
        header_at_backend(&ui, "x-who"),
        None,
        "consumer routes replace producer routes"
    );
    let ns = get(&c, &from_ns.url(0, "/"), &[]).await;
    assert_eq!(header_at_backend(&ns, "x-dev-feature"), None);
    assert_eq!(header_at_backend(&ns, "x-who").as_deref(), Some("producer"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_statuses_name_their_reason() {
    let a = echo_backend([127, 0, 0, 1], "a").await;
    let closed = gamma_tests::loopback::free_port();
    let rules = r#"  - matches: [{path: {type: Exact, value: /missing-backend}}]
    backendRefs: [{name: nosuch, port: 80}]
  - matches: [{path: {type: Exact, value: /zero}}]
    backendRefs: [{name: a, port: 80, weight: 0}]
  - matches: [{path: {type: Exact, value: /no-endpoints}}]
    backendRefs: [{name: empty, port: 80}]
  - matches: [{path: {type: Exact, value: /refused}}]
    backendRefs: [{name: refused, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /delay}}]
    timeouts: {request: 300ms}
    backendRefs: [{name: a, port: 80}]
  - matches: [{path: {type: Exact, value: /extension}}]
    filters: [{type: ExtensionRef, extensionRef: {group: example.com, kind: Thing, name: x}}]
    backendRefs: [{name: a, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /ok}}]
    backendRefs: [{name: a, port: 80}]
  - matches: [{path: {type: Exact, value: /moved}}]
    filters:
    - {type: RequestRedirect, requestRedirect: {hostname: elsewhere.example, statusCode: 301}}
    - {type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: x-rule, value: moved}]}}
  - matches: [{path: {type: Exact, value: /drained}}]
    filters:
    - {type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: x-rule, value: drained}]}}
    backendRefs: [{name: empty, port: 80}]
"#
    .to_string();
    let world = Manifests::default()
        .service("ns", "front", 80, &[], None)
        .service("ns", "a", 80, &[a.addr], None)
        .service("ns", "empty", 80, &[], None)
        .service(
            "ns",
            "refused",
            80,
            &[format!("127.0.0.1:{closed}").parse().unwrap()],
            None,
        )
        .raw(&route("r", "front", &rules));
    let agent = Agent::start(&world, options(None)).unwrap();
    let c = client(false);
    for (path, status, reason) in [
        ("/nothing-matches", 404, "no rule"),
        ("/missing-backend", 500, "no such Service"),
        ("/zero", 500, "weight 0"),
        ("/no-endpoints", 503, "no ready endpoint"),
        ("/refused", 503, "connecting to"),
        ("/delay/2000", 504, "timeout"),
        ("/extension", 500, "ExtensionRef"),
    ] {
        let answer = get(&c, &agent.url(0, path), &[]).await;
        assert_eq!(answer.status.as_u16(), status, "{path}: {}", answer.text);
        assert!(
            answer.text.contains(reason),
            "{path}: `{}` should name `{reason}`",
            answer.text.trim()
        );
        assert_eq!(
            answer.text.trim().lines().count(),
            1,
            "one line: {}",
            answer.text
        );
    }
    // A rule's ResponseHeaderModifier applies to the answers the agent gives for it too.
    for (path, status) in [("/moved", 301), ("/drained", 503)] {
        let answer = get(&c, &agent.url(0, path), &[]).await;
        assert_eq!(answer.status.as_u16(), status, "{path}: {}", answer.text);
        assert_eq!(answer.headers["x-rule"], &path[1..], "{path}");
    }
    let answer = get(&c, &agent.url(0, "/nothing-matches"), &[]).await;
    assert!(
        !answer.headers.contains_key("x-rule"),
        "no rule, no rule filters"
    );

    // Request smuggling. Differing Content-Length values: 400. Content-Length with
    // Transfer-Encoding: chunked framing wins, Content-Length is dropped and the connection is
    // closed after the answer (RFC 9112 §6.1), so a request hidden in the body never runs.
    let exchange = |payload: &'static [u8]| {
        let mut raw = std::net::TcpStream::connect(agent.listen[0]).unwrap();
        raw.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        raw.write_all(payload).unwrap();
        let mut reply = String::new();
        let _ = raw.read_to_string(&mut reply);
        reply
    };
    let reply = exchange(
        b"POST /ok HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcd",
    );
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    let before = a.stats.requests.load(std::sync::atomic::Ordering::Relaxed);
    let reply = exchange(b"POST /ok HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /ok/smuggled HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(
        reply.matches("HTTP/1.1 ").count(),
        1,
        "one answer, the smuggled request never ran: {reply}"
    );
    assert!(!reply.contains("smuggled"), "{reply}");
    assert_eq!(
        a.stats.requests.load(std::sync::atomic::Ordering::Relaxed),
        before + 1
    );
    assert_eq!(get(&c, &agent.url(0, "/ok"), &[]).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_on_codes_and_on_refused_connections() {
    let a = echo_backend([127, 0, 0, 1], "a").await;
    let closed = gamma_tests::loopback::free_port();
    // `a` answers 503 twice, then 200: three attempts always succeed.
    let rules = "  - matches: [{path: {type: PathPrefix, value: /flaky}}]\n    retry: {attempts: 2, codes: [503]}\n    backendRefs: [{name: a, port: 80}]\n  - backendRefs: [{name: mixed, port: 80}]\n";
    // `mixed` has a dead endpoint (127.0.0.2, nothing listens) beside the live one.
    let live = echo_backend([127, 0, 0, 3], "live").await;
    let dead: std::net::SocketAddr = format!("127.0.0.2:{}", live.addr.port()).parse().unwrap();
    let _ = closed;
    let world = Manifests::default()
        .service("ns", "front", 80, &[], None)
        .service("ns", "a", 80, &[a.addr], None)
        .service("ns", "mixed", 80, &[dead, live.addr], None)
        .raw(&route("r", "front", rules));
    let agent = Agent::start(&world, options(None)).unwrap();
    let c = client(false);
    for _ in 0..5 {
        let answer = get(&c, &agent.url(0, "/flaky/3"), &[]).await;
        assert_eq!(answer.status, 200, "{}", answer.text);
    }
    for _ in 0..20 {
        let answer = get(&c, &agent.url(0, "/"), &[]).await;
        assert_eq!(
            answer.status, 200,
            "a refused connection is retried on another endpoint: {}",
            answer.text
        );
        assert_eq!(answer.body["pod"], "live");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_grpc_and_mirror() {
    let h1 = echo_backend([127, 0, 0, 1], "h1").await;
    let grpc = echo_backend([127, 0, 0, 1], "grpc").await;
    let mirror = echo_backend([127, 0, 0, 1], "mirror").await;
    let plain = echo_backend([127, 0, 0, 1], "plain").await;
    let rules = "  - matches: [{path: {type: PathPrefix, value: /proto.EchoTestService}}]\n    backendRefs: [{name: grpc, port: 80}]\n  - matches: [{path: {type: PathPrefix, value: /proto.Drained}}]\n    backendRefs: [{name: drained, port: 80}]\n  - matches: [{path: {type: PathPrefix, value: /as-caller}}]\n    backendRefs: [{name: plain, port: 80}]\n  - filters: [{type: RequestMirror, requestMirror: {backendRef: {name: mirror, port: 80}}}]\n    backendRefs: [{name: h1, port: 80}]\n";
    let world = Manifests::default()
        .service("ns", "front", 80, &[], None)
        .service("ns", "drained", 80, &[], Some("kubernetes.io/h2c"))
        .service("ns", "h1", 80, &[h1.addr], Some("http"))
        .service("ns", "plain", 80, &[plain.addr], None)
        .service("ns", "grpc", 80, &[grpc.addr], Some("kubernetes.io/h2c"))
        .service("ns", "mirror", 80, &[mirror.addr], None)
        .raw(&route("r", "front", rules));
    let agent = Agent::start(&world, options(None)).unwrap();
    let h2 = client(true);
    // HTTP/2 prior knowledge from the client; HTTP/1.1 to a backend port that says `http`, the
    // caller's HTTP/2 to one that says nothing.
    let answer = get(&h2, &agent.url(0, "/x"), &[]).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.body["pod"], "h1");
    assert_eq!(answer.body["protocol"], "HTTP/1.1");
    let answer = get(&h2, &agent.url(0, "/as-caller"), &[]).await;
    assert_eq!(answer.body["pod"], "plain");
    assert_eq!(answer.body["protocol"], "HTTP/2.0");
    let answer = get(&client(false), &agent.url(0, "/as-caller"), &[]).await;
    assert_eq!(answer.body["protocol"], "HTTP/1.1");
    // gRPC-shaped request to an h2c backend: HTTP/2 end to end.
    let answer = get(
        &h2,
        &agent.url(0, "/proto.EchoTestService/Echo"),
        &[("content-type", "application/grpc")],
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.headers["x-echo-pod"], "grpc");
    assert!(answer.text.contains("HTTP/2.0"), "{}", answer.text);
    // What the agent answers itself, a gRPC caller gets as a gRPC status (trailers-only, HTTP
    // 200); an HTTP caller of the same rule gets the HTTP error.
    let grpc_call = [
        ("content-type", "application/grpc+proto"),
        ("te", "trailers"),
    ];
    let answer = get(&h2, &agent.url(0, "/proto.Drained/Call"), &grpc_call).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.headers["content-type"], "application/grpc");
    assert_eq!(
        answer.headers["grpc-status"], "14",
        "no ready endpoint: UNAVAILABLE"
    );
    let message = answer.headers["grpc-message"].to_str().unwrap();
    assert!(message.contains("no ready endpoint"), "{message}");
    assert!(answer.text.is_empty(), "trailers-only: no body");
    let answer = get(&h2, &agent.url(0, "/proto.Drained/Call"), &[]).await;
    assert_eq!(answer.status, 503, "{}", answer.text);
    // Mirrors are fire-and-forget: wait a little for the copy to land.
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while mirror
        .stats
        .requests
        .load(std::sync::atomic::Ordering::Relaxed)
        == 0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the mirror received nothing"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_and_opaque_tcp() {
    let a = echo_backend([127, 0, 0, 1], "a").await;
    // A raw TCP echo for the opaque path.
    let tcp_addr = gamma_tests::loopback::tcp_echo().await;
    let world = Manifests::default()
        .service("ns", "front", 80, &[], None)
        .service("ns", "a", 80, &[a.addr], None)
        .service("ns", "raw", 80, &[tcp_addr], None)
        .raw(&route(
            "r",
            "front",
            "  - backendRefs: [{name: a, port: 80}]\n",
        ));
    let agent = Agent::start(
        &world,
        AgentOptions {
            listeners: vec![("ns/front", 80), ("ns/raw", 80)],
            caller_namespace: None,
            extra_args: vec![],
        },
    )
    .unwrap();
    let upgrade = tokio::task::spawn_blocking({
        let addr = agent.listen[0];
        move || {
            let mut s = upgraded(addr);
            s.write_all(b"ping-frame").unwrap();
            let mut echoed = [0u8; 10];
            s.read_exact(&mut echoed).unwrap();
            assert_eq!(&echoed, b"ping-frame");
        }
    });
    upgrade.await.unwrap();
    let opaque = tokio::task::spawn_blocking({
        let addr = agent.listen[1];
        move || {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            s.write_all(b"\x16\x03\x01 not http at all").unwrap();
            let mut echoed = [0u8; 19];
            s.read_exact(&mut echoed).unwrap();
            assert_eq!(&echoed, b"\x16\x03\x01 not http at all");
        }
    });
    opaque.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests() {
    let a = echo_backend([127, 0, 0, 1], "a").await;
    let world = Manifests::default()
        .service("ns", "front", 80, &[], None)
        .service("ns", "a", 80, &[a.addr], None)
        .raw(&route(
            "r",
            "front",
            "  - backendRefs: [{name: a, port: 80}]\n",
        ));
    let agent = Agent::start(&world, options(None)).unwrap();
    let c = client(false);
    let url = agent.url(0, "/delay/700");
    let in_flight = tokio::spawn(async move { get(&c, &url, &[]).await.status });
    tokio::time::sleep(Duration::from_millis(200)).await;
    agent.terminate();
    assert_eq!(
        in_flight.await.unwrap(),
        200,
        "the in-flight request finished"
    );
    exits_cleanly(agent, "after draining").await;
}

/// An upgraded connection counts among the open ones for as long as it lasts, as it does after a
/// takeover hands it over, and on its endpoint: `--max-connections` bounds WebSockets too. Before, it stopped counting
/// when its HTTP task ended at the upgrade (10,000 WebSockets read as none open, and let the cap
/// in again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgraded_connection_counts_against_the_connection_cap() {
    let a = echo_backend([127, 0, 0, 1], "a").await;
    let agent = Agent::start(
        &Manifests::front_routed_to(a.addr),
        AgentOptions {
            extra_args: vec!["--max-connections".into(), "1".into()],
            ..options(None)
        },
    )
    .unwrap();
    let addr = agent.listen[0];
    let admin = agent.admin;
    tokio::task::spawn_blocking(move || {
        let mut ws = upgraded(addr);
        let metrics = gamma_tests::loopback::http_get(admin, "/metrics").unwrap();
        assert_eq!(
            gamma_tests::probe::sample(&metrics, "gamma_connections_open"),
            Some(1.0),
            "the upgraded connection is open"
        );
        // And load on its endpoint for the power of two choices, as an opaque connection is
        // (it was none once its 101 was written: a backend holding 10,000 WebSockets looked idle).
        assert_eq!(
            gamma_tests::probe::sample(&metrics, "gamma_upstream_requests_in_flight"),
            Some(1.0),
            "the upgraded connection counts on its endpoint"
        );
        // At the cap: closed on accept.
        let mut second = std::net::TcpStream::connect(addr).unwrap();
        second
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        let _ = second.write_all(b"GET / HTTP/1.1\r\nHost: front\r\n\r\n");
        let mut answer = Vec::new();
        let _ = second.read_to_end(&mut answer);
        assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
        // Still carried.
        ws.write_all(b"still-here").unwrap();
        let mut echoed = [0u8; 10];
        ws.read_exact(&mut echoed).unwrap();
        assert_eq!(&echoed, b"still-here");
    })
    .await
    .unwrap();
}

/// A server that speaks first: writes `banner` on each connection it accepts, and reads nothing.
async fn banner_server(banner: &'static [u8]) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt as _;
        while let Ok((mut stream, _)) = listener.accept().await {
            let _ = stream.write_all(banner).await;
        }
    });
    addr
}

/// On a port that declares nothing, a first line that is not an HTTP/1 request line goes through
/// opaque though it opens with a token and a space (PROXY protocol's header, Redis's inline
/// commands), and a client that half-closes before sending a byte still reaches the server (a
/// server-first protocol's banner or dump). Before, the first got 400 from the agent and the
/// second was closed without a dial.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undeclared_port_passes_other_protocols_through() {
    let echo = tcp_echo().await;
    let banner = banner_server(b"banner\n").await;
    let routed = "  - backendRefs: [{name: echo, port: 80}]\n";
    let world = Manifests::default()
        .service("ns", "echo", 80, &[echo], None)
        .service("ns", "dump", 80, &[banner], None)
        .raw(&route("echo-route", "echo", routed))
        .raw(&route(
            "dump-route",
            "dump",
            "  - backendRefs: [{name: dump, port: 80}]\n",
        ));
    let agent = Agent::start(
        &world,
        AgentOptions {
            listeners: vec![("ns/echo", 80), ("ns/dump", 80)],
            caller_namespace: None,
            extra_args: Vec::new(),
        },
    )
    .unwrap();
    let exchange = |listener: std::net::SocketAddr, sent: &'static [u8]| {
        tokio::task::spawn_blocking(move || {
            let mut s = std::net::TcpStream::connect(listener).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(sent).unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).map(|_| got)
        })
    };
    for line in [
        &b"PROXY TCP4 10.0.0.1 10.0.0.2 40000 80\r\nhello"[..],
        b"AUTH secret\r\nPING\r\n",
    ] {
        let got = exchange(agent.listen[0], line).await.unwrap().unwrap();
        assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(line));
    }
    let dump = exchange(agent.listen[1], b"").await.unwrap().unwrap();
    assert_eq!(dump, b"banner\n");
}

/// Another namespace's consumer route on a Service's undeclared port leaves the Service's other
/// callers as without it: a server-first protocol's banner comes at once, not after the
/// detection timeout (10 s) of sniffing for a request no route of theirs would take.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_route_leaves_other_callers_of_its_port_unsniffed() {
    let banner = banner_server(b"220 ready\r\n").await;
    let consumer = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: theirs, namespace: other}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: console, namespace: ns, port: 7000}]\n  rules:\n  - backendRefs: [{name: console, namespace: ns, port: 7000}]\n";
    let world = Manifests::default()
        .service("ns", "console", 7000, &[banner], None)
        .raw(consumer);
    let agent = Agent::start(
        &world,
        AgentOptions {
            listeners: vec![("ns/console", 7000)],
            caller_namespace: Some("third"),
            extra_args: Vec::new(),
        },
    )
    .unwrap();
    let listener = agent.listen[0];
    let greeting = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(listener).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut got = [0; 11];
        s.read_exact(&mut got).map(|()| got)
    })
    .await
    .unwrap();
    assert_eq!(&greeting.expect("the banner within 3 s"), b"220 ready\r\n");
}

/// On a port declared HTTP, a caller that another namespace's consumer routes do not apply to
/// is parsed, not passed through: a producer route added later applies to the next request of
/// its connection already open (a gRPC channel or a keep-alive pool lives for hours).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_added_later_applies_to_open_connections_of_callers_without_routes() {
    let a = echo_backend([127, 0, 0, 1], "a").await;
    let consumer = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: theirs, namespace: other}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: front, namespace: ns, port: 80}]\n  rules:\n  - backendRefs: [{name: front, namespace: ns, port: 80}]\n";
    let world = Manifests::default()
        .service("ns", "front", 80, &[a.addr], Some("http"))
        .raw(consumer);
    let agent = Agent::start(&world, options(Some("third"))).unwrap();
    let mut connection = gamma_tests::loopback::OneConnection::open(agent.listen[0]).await;
    let before = connection.send(http::Method::GET, "/", &[]).await;
    assert_eq!(before.status, 200);
    assert_eq!(header_at_backend(&before, "x-routed"), None);

    let producer = "  - filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-routed, value: producer}]}}]\n    backendRefs: [{name: front, port: 80}]\n";
    let routed = world.raw(&route("mine", "front", producer));
    let agent = tokio::task::spawn_blocking(move || agent.update(&routed).map(|()| agent))
        .await
        .unwrap()
        .unwrap();
    let after = connection.send(http::Method::GET, "/", &[]).await;
    assert_eq!(after.status, 200);
    assert_eq!(
        header_at_backend(&after, "x-routed").as_deref(),
        Some("producer"),
        "the new route applies on the open connection: {}",
        after.text
    );
    drop(agent);
}

/// An opaque connection still open at the drain deadline is reset on both sides: closed with a
/// FIN, as before, a peer of an EOF-delimited protocol took the cut stream for a complete one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_opaque_connection_cut_at_the_drain_deadline_is_reset() {
    let echo = tcp_echo().await;
    let world = Manifests::default().service("ns", "raw", 80, &[echo], Some("tcp"));
    let agent = Agent::start(
        &world,
        AgentOptions {
            listeners: vec![("ns/raw", 80)],
            caller_namespace: None,
            extra_args: vec!["--drain-timeout-s".into(), "1".into()],
        },
    )
    .unwrap();
    let addr = agent.listen[0];
    let mut socket = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"first").unwrap();
        let mut echoed = [0u8; 5];
        s.read_exact(&mut echoed).unwrap();
        s
    })
    .await
    .unwrap();
    agent.terminate();
    let read = tokio::task::spawn_blocking(move || socket.read(&mut [0u8; 16]))
        .await
        .unwrap();
    assert_eq!(
        read.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset),
        "cut at the deadline: a reset, not an end"
    );
    exits_cleanly(agent, "after the drain deadline").await;
}

/// Waits (at most 5 s) for a terminated agent to exit, and checks that it exited cleanly.
async fn exits_cleanly(mut agent: Agent, when: &'static str) {
    let status = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(status) = agent.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the agent did not exit {when}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await
    .unwrap();
    assert!(status.success(), "{status}");
}

/// An upgraded connection (WebSocket) open at SIGTERM is drained like opaque TCP: it goes on
/// until it ends or the drain deadline, and the agent exits once it ended; its listener closes
/// at once (before, a copy kept for a successor kept it open without takeovers configured). Before, its pump was
/// not among the connections a drain waits for: the agent exited at once and cut it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_an_upgraded_connection_finish() {
    let a = echo_backend([127, 0, 0, 1], "a").await;
    let mut agent = Agent::start(&Manifests::front_routed_to(a.addr), options(None)).unwrap();
    let addr = agent.listen[0];
    let mut socket = tokio::task::spawn_blocking(move || upgraded(addr))
        .await
        .unwrap();
    agent.terminate();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        agent.child.try_wait().unwrap().is_none(),
        "the agent waits for the upgraded connection"
    );
    // Its listener is closed while it drains: a new connection is refused (a redirected one
    // then fails open), not queued where nobody accepts it until the agent exits and resets it.
    gamma_tests::eventually_within(
        Duration::from_secs(5),
        "a connection refused once the drain began, not accepted into a listener nobody serves",
        || {
            let refused = std::net::TcpStream::connect(addr).err().map(|e| e.kind());
            (refused == Some(std::io::ErrorKind::ConnectionRefused)).then_some(())
        },
    );
    socket = tokio::task::spawn_blocking(move || {
        socket.write_all(b"still-here").unwrap();
        let mut echoed = [0u8; 10];
        socket.read_exact(&mut echoed).unwrap();
        assert_eq!(
            &echoed, b"still-here",
            "the connection still works while draining"
        );
        socket
    })
    .await
    .unwrap();
    drop(socket);
    exits_cleanly(agent, "once the upgraded connection ended").await;
}

/// A draining agent refuses an upgrade on a kept connection (503, `Connection: close`): a
/// successor takes over only the relays running when it said Stop, and one made later was reset
/// at the drain's deadline, mid-session. Refused at its handshake, the client connects again, to
/// the successor (or, with none, on the Service's ordinary routing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_agent_refuses_an_upgrade() {
    let a = echo_backend([127, 0, 0, 1], "a").await;
    let agent = Agent::start(&Manifests::front_routed_to(a.addr), options(None)).unwrap();
    let addr = agent.listen[0];
    // A request in flight keeps the agent draining.
    let c = client(false);
    let url = agent.url(0, "/delay/3000");
    let in_flight = tokio::spawn(async move { get(&c, &url, &[]).await.status });
    let admin = agent.admin;
    let answer = tokio::task::spawn_blocking(move || {
        gamma_tests::eventually_within(Duration::from_secs(5), "the request in flight", || {
            let metrics = gamma_tests::loopback::http_get(admin, "/metrics").ok()?;
            let sample = gamma_tests::probe::sample(&metrics, "gamma_upstream_requests_in_flight");
            (sample == Some(1.0)).then_some(())
        });
        let mut kept = std::net::TcpStream::connect(addr).unwrap();
        kept.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        kept.write_all(b"GET / HTTP/1.1\r\nHost: front\r\n\r\n")
            .unwrap();
        let mut first = [0u8; 4096];
        let n = kept.read(&mut first).unwrap();
        assert!(first[..n].starts_with(b"HTTP/1.1 200"));
        agent.terminate();
        // Draining just after the listener refuses (its accept loops are waited for first);
        // the kept connection stays idle well under the drain's quiet second.
        gamma_tests::eventually_within(Duration::from_secs(1), "the drain began", || {
            std::net::TcpStream::connect(addr).is_err().then_some(())
        });
        std::thread::sleep(Duration::from_millis(100));
        kept.write_all(
            b"GET /ws HTTP/1.1\r\nHost: front\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        )
        .unwrap();
        let mut answer = Vec::new();
        let _ = kept.read_to_end(&mut answer);
        (String::from_utf8_lossy(&answer).to_lowercase(), agent)
    })
    .await
    .unwrap();
    let (answer, agent) = answer;
    assert!(answer.starts_with("http/1.1 503"), "{answer}");
    assert!(answer.contains("connection: close"), "{answer}");
    assert!(answer.contains("stopping or restarting"), "{answer}");
    assert_eq!(in_flight.await.unwrap(), 200);
    exits_cleanly(agent, "after draining").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_manifest_changes_under_load_fail_nothing() {
    let a = echo_backend([127, 0, 0, 1], "a").await;
    let b = echo_backend([127, 0, 0, 1], "b").await;
    let world = |weight_a: u32, tag: &str| {
        Manifests::default()
            .service("ns", "front", 80, &[], None)
            .service("ns", "a", 80, &[a.addr], None)
            .service("ns", "b", 80, &[b.addr], None)
            .raw(&route(
                "r",
                "front",
                &format!("  - filters: [{{type: RequestHeaderModifier, requestHeaderModifier: {{set: [{{name: x-tag, value: {tag}}}]}}}}]\n    backendRefs: [{{name: a, port: 80, weight: {weight_a}}}, {{name: b, port: 80, weight: 1}}]\n"),
            ))
    };
    let agent = Agent::start(&world(1, "v0"), options(None)).unwrap();
    let url = agent.url(0, "/");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..8 {
        let url = url.clone();
        let stop = stop.clone();
        workers.push(tokio::spawn(async move {
            let c = client(false);
            let (mut ok, mut failed) = (0u32, 0u32);
            // Bounded: stops on the flag or after 20,000 requests.
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && ok + failed < 20_000 {
                if get(&c, &url, &[]).await.status == 200 {
                    ok += 1
                } else {
                    failed += 1
                }
            }
            (ok, failed)
        }));
    }
    for version in 1..=10u32 {
        agent
            .update(&world(version, &format!("v{version}")))
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut failed) = (0, 0);
    for w in workers {
        let (o, f) = w.await.unwrap();
        ok += o;
        failed += f;
    }
    assert!(ok > 100, "load ran ({ok} requests)");
    assert_eq!(
        failed,
        0,
        "{failed} of {} requests failed during 10 route changes",
        ok + failed
    );
    let last = get(&client(false), &url, &[]).await;
    assert_eq!(header_at_backend(&last, "x-tag").as_deref(), Some("v10"));
}

/// The admin server changes nothing: every method but GET is refused on every path, and the
/// table is the same afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_server_is_read_only() {
    let a = echo_backend([127, 0, 0, 1], "a").await;
    let world = Manifests::default().service("ns", "front", 80, &[a.addr], None);
    let agent = Agent::start(&world, options(None)).unwrap();
    let version = agent.snapshot_version().unwrap();
    let paths = [
        "/live",
        "/ready",
        "/metrics",
        "/config_dump",
        "/explain",
        "/",
        "/quitquitquit",
    ];
    for path in paths {
        for method in ["POST", "PUT", "PATCH", "DELETE"] {
            let reply = gamma_tests::probe::raw_exchange(
                agent.admin,
                format!("{method} {path} HTTP/1.1\r\nHost: admin\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}").as_bytes(),
                Duration::from_secs(5),
            )
            .unwrap();
            assert_eq!(reply.statuses(), [405], "{method} {path}");
            // RFC 9110 §15.5.6: a 405 MUST say which methods are allowed.
            assert!(
                reply
                    .text
                    .to_ascii_lowercase()
                    .contains("\r\nallow: get\r\n"),
                "{method} {path}: {}",
                reply.text
            );
        }
    }
    assert_eq!(agent.snapshot_version().unwrap(), version);
    assert_eq!(
        admin_status(&agent, "/live"),
        200,
        "still serving after the refusals"
    );
}

/// `--metrics` serves `/metrics` to the network and nothing else: the table and `/explain` stay
/// on the loopback admin server, and the listener is read-only too. Its second address (the
/// node's other family, from status.hostIPs, which the node may not have) is served if it can be.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_listener_serves_metrics_alone() {
    let a = echo_backend([127, 0, 0, 1], "a").await;
    let world = Manifests::default().service("ns", "front", 80, &[a.addr], None);
    let port = gamma_tests::loopback::free_port();
    let metrics_only: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut options = options(None);
    // 2001:db8::/32 is for documentation: no interface here has it.
    let not_here = format!("127.0.0.1,2001:db8::dead:{port}");
    options.extra_args = vec!["--metrics".into(), not_here];
    let agent = Agent::start(&world, options).unwrap();
    let url = format!("http://{}/", agent.listen[0]);
    assert_eq!(get(&client(false), &url, &[]).await.status, 200);
    let (status, body) = gamma_tests::loopback::http_get_full(metrics_only, "/metrics").unwrap();
    assert_eq!(status, 200);
    assert!(
        body.contains("gamma_requests_total{") && body.contains("service=\"ns/front:80\""),
        "the request is counted:\n{body}"
    );
    for path in [
        "/config_dump",
        "/explain?service=ns/front&port=80",
        "/ready",
        "/",
    ] {
        let (status, _) = gamma_tests::loopback::http_get_full(metrics_only, path).unwrap();
        assert_eq!(status, 404, "{path}");
    }
    let reply = gamma_tests::probe::raw_exchange(
        metrics_only,
        b"POST /metrics HTTP/1.1\r\nHost: m\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(reply.statuses(), [405]);
    assert!(
        reply
            .text
            .to_ascii_lowercase()
            .contains("\r\nallow: get\r\n"),
        "{}",
        reply.text
    );
    assert_eq!(
        admin_status(&agent, "/config_dump"),
        200,
        "still on --admin"
    );

    // It faces the node's network: connections past its cap (32, 4 per source address) are
    // closed at once, silent ones go after the head timeout, and the admin server's probes are
    // answered throughout. One pod's silent connections leave the scraper its slot.
    let connect_from = |source: [u8; 4]| async move {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind((source, 0).into()).unwrap();
        let stream = socket.connect(metrics_only).await.unwrap();
        stream.into_std().unwrap()
    };
    let closed_at_once = |mut stream: std::net::TcpStream| {
        stream.set_nonblocking(false).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        stream.read(&mut [0; 16]).is_ok_and(|read| read == 0)
    };
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(connect_from([127, 0, 0, 2]).await);
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        closed_at_once(connect_from([127, 0, 0, 2]).await),
        "closed past the source's cap"
    );
    let (status, _) = gamma_tests::loopback::http_get_full(metrics_only, "/metrics").unwrap();
    assert_eq!(status, 200, "another source is served at once");
    for source in 3..10 {
        for _ in 0..4 {
            silent.push(connect_from([127, 0, 0, source]).await);
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        closed_at_once(connect_from([127, 0, 0, 10]).await),
        "closed past the cap"
    );
    assert_eq!(admin_status(&agent, "/live"), 200);
    gamma_tests::eventually_within(Duration::from_secs(10), "silent connections closed", || {
        gamma_tests::loopback::http_get_full(metrics_only, "/metrics")
            .ok()
            .filter(|(status, _)| *status == 200)
    });
    drop(silent);
}

/// `/explain` reads its query as a form, so that `path` can carry a whole query string
/// (`%3F`, `%26`, `%3D`): a rule matching the second query parameter is explained as matched.
/// Before, only `%2F`, `%3A` and `%20` were decoded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_takes_a_path_with_its_whole_query() {
    let a = echo_backend([127, 0, 0, 1], "a").await;
    let world = Manifests::front_with_rules(
        a.addr,
        "  - matches: [{queryParams: [{name: b, value: '2'}]}]\n    backendRefs: [{name: echo, port: 80}]\n",
    );
    let agent = Agent::start(&world, options(None)).unwrap();
    let explained = gamma_tests::loopback::http_get(
        agent.admin,
        "/explain?service=ns%2Ffront&port=80&path=%2Fx%3Fa%3D1%26b%3D2",
    )
    .unwrap();
    let explained: serde_json::Value = serde_json::from_str(&explained).unwrap();
    assert_eq!(
        explained["decision"]["backends"][0]["backend"], "ns/echo:80",
        "{explained:#}"
    );
}

/// `/explain` matches a path as the data plane does, normalized: `/x/../admin` is `/admin`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_matches_the_normalized_path() {
    let a = echo_backend([127, 0, 0, 1], "a").await;
    let world = Manifests::front_with_rules(
        a.addr,
        "  - matches: [{path: {type: Exact, value: /admin}}]\n    backendRefs: [{name: echo, port: 80}]\n",
    );
    let agent = Agent::start(&world, options(None)).unwrap();
    let explained = gamma_tests::loopback::http_get(
        agent.admin,
        "/explain?service=ns%2Ffront&port=80&path=%2Fx%2F..%2F%2561dmin",
    )
    .unwrap();
    let explained: serde_json::Value = serde_json::from_str(&explained).unwrap();
    assert_eq!(
        explained["decision"]["backends"][0]["backend"], "ns/echo:80",
        "{explained:#}"
    );
}

fn admin_status(agent: &Agent, path: &str) -> u16 {
    gamma_tests::loopback::http_get_full(agent.admin, path)
        .map(|(status, _)| status)
        .unwrap_or(0)
}

/// A port that declares HTTP is never sniffed: a client silent for longer than the sniffing
/// timeout still gets its routes. An undeclared port falls to opaque TCP after that timeout (the
/// backend answers directly, without the route's filter), and the fall is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_http_ports_are_never_sniffed() {
    let a = echo_backend([127, 0, 0, 1], "a").await;
    let filter = "  - filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-routed, value: 'yes'}]}}]\n    backendRefs: [{name: a, port: 80}]\n";
    let world = Manifests::default()
        .service("ns", "a", 80, &[a.addr], None)
        .service("ns", "declared", 80, &[a.addr], Some("http"))
        .service("ns", "plain", 80, &[a.addr], None)
        .raw(&route("declared-route", "declared", filter))
        .raw(&route("plain-route", "plain", filter));
    let options = AgentOptions {
        listeners: vec![("ns/declared", 80), ("ns/plain", 80)],
        caller_namespace: None,
        extra_args: ["--detect-timeout-ms", "200"].map(String::from).into(),
    };
    let agent = Agent::start(&world, options).unwrap();
    let late_request = |listener: std::net::SocketAddr| {
        tokio::task::spawn_blocking(move || {
            let mut s = std::net::TcpStream::connect(listener).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            // A throttled client, or a pool that connected early: a second before the request.
            std::thread::sleep(Duration::from_secs(1));
            s.write_all(b"GET /late HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n")
                .unwrap();
            let mut answer = String::new();
            s.read_to_string(&mut answer).unwrap();
            answer
        })
    };
    let declared = late_request(agent.listen[0]).await.unwrap();
    assert!(declared.starts_with("HTTP/1.1 200"), "{declared}");
    assert!(
        declared.contains("x-routed"),
        "the route applied: {declared}"
    );
    let plain = late_request(agent.listen[1]).await.unwrap();
    assert!(plain.starts_with("HTTP/1.1 200"), "{plain}");
    assert!(
        !plain.contains("x-routed"),
        "an undeclared port fell to opaque TCP, straight to the endpoint: {plain}"
    );
    let fell =
        gamma_tests::probe::metric(&agent, "gamma_opaque_after_sniff_timeout_total").unwrap();
    assert_eq!(fell, 1.0);
}

/// A mirror samples its share of requests independently of the pick of the backend it is on.
/// Before, both read one random number: with weights 4/1 and a mirror of 1 in 5 on the second
/// backend, their residues never met and that mirror never sent a request (expected: 1 in 25).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirrors_share_does_not_depend_on_the_backend_picked() {
    let a = echo_backend([127, 0, 0, 1], "a").await;
    let b = echo_backend([127, 0, 0, 1], "b").await;
    let mirror = echo_backend([127, 0, 0, 1], "mirror").await;
    let rules = "  - backendRefs:\n    - {name: a, port: 80, weight: 4}\n    - name: b\n      port: 80\n      weight: 1\n      filters: [{type: RequestMirror, requestMirror: {backendRef: {name: mirror, port: 80}, fraction: {numerator: 1, denominator: 5}}}]\n";
    let world = Manifests::default()
        .service("ns", "front", 80, &[], None)
        .service("ns", "a", 80, &[a.addr], None)
        .service("ns", "b", 80, &[b.addr], None)
        .service("ns", "mirror", 80, &[mirror.addr], None)
        .raw(&route("r", "front", rules));
    let agent = Agent::start(&world, options(None)).unwrap();
    let http = client(false);
    // 300 requests: about 12 mirrored; none with odds of 0.96^300 (5 in a million).
    for _ in 0..300 {
        assert_eq!(get(&http, &agent.url(0, "/x"), &[]).await.status, 200);
    }
    let sent = gamma_tests::probe::metric(&agent, "gamma_mirrors_sent_total").unwrap();
    assert!(sent >= 1.0, "no request of 300 was mirrored");
}

/// A mirror's copies spread over its Service's endpoints: the endpoint is picked with a number
/// of its own. Before, the number that sampled the copy picked it too: with a 1/2 mirror to two
/// pods only even numbers were sampled, and the first candidate was always the first pod.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirrors_copies_spread_over_its_endpoints() {
    let backend = echo_backend([127, 0, 0, 1], "backend").await;
    // Two endpoints on one port (an EndpointSlice port is shared by its endpoints).
    let first = echo_backend([127, 0, 0, 41], "shadow-0").await;
    let second = gamma_tests::loopback::echo_backend_at(
        std::net::SocketAddr::new([127, 0, 0, 42].into(), first.addr.port()),
        "shadow-1",
    )
    .await;
    let shadows = [first, second];
    let rules = "  - filters: [{type: RequestMirror, requestMirror: {backendRef: {name: shadow, port: 80}, fraction: {numerator: 1, denominator: 2}}}]\n    backendRefs: [{name: backend, port: 80}]\n";
    let world = Manifests::default()
        .service("ns", "front", 80, &[], None)
        .service("ns", "backend", 80, &[backend.addr], None)
        .service(
            "ns",
            "shadow",
            80,
            &[shadows[0].addr, shadows[1].addr],
            None,
        )
        .raw(&route("r", "front", rules));
    let agent = Agent::start(&world, options(None)).unwrap();
    let http = client(false);
    // 200 requests, about 100 mirrored: one pod left without a copy has odds of 2^-100.
    for _ in 0..200 {
        assert_eq!(get(&http, &agent.url(0, "/x"), &[]).await.status, 200);
    }
    let sent = gamma_tests::probe::metric(&agent, "gamma_mirrors_sent_total").unwrap() as u64;
    let received = || {
        shadows
            .each_ref()
            .map(|s| s.stats.requests.load(std::sync::atomic::Ordering::Relaxed))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while received().iter().sum::<u64>() < sent && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let [first, second] = received();
    assert!(sent >= 20, "{sent} of 200 mirrored");
    assert!(
        first > 0 && second > 0,
        "copies per pod: {first} and {second}"
    );
}

/// A mirror backend that accepts and never answers does not hold a mirror slot past the mirror
/// timeout: the copy is abandoned and counted, the real request unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_that_never_answers_is_abandoned() {
    let a = echo_backend([127, 0, 0, 1], "a").await;
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut connections = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            connections.push(stream); // read nothing, answer nothing
        }
    });
    let rules = "  - filters: [{type: RequestMirror, requestMirror: {backendRef: {name: silent, port: 80}}}]\n    backendRefs: [{name: a, port: 80}]\n";
    let world = Manifests::default()
        .service("ns", "front", 80, &[], None)
        .service("ns", "a", 80, &[a.addr], None)
        .service("ns", "silent", 80, &[silent_addr], None)
        .raw(&route("r", "front", rules));
    let options = AgentOptions {
        listeners: vec![("ns/front", 80)],
        caller_namespace: None,
        extra_args: ["--mirror-timeout-ms", "300"].map(String::from).into(),
    };
    let agent = Agent::start(&world, options).unwrap();
    let answer = get(&client(false), &agent.url(0, "/x"), &[]).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    let metric = |name| gamma_tests::probe::metric(&agent, name).unwrap();
    assert_eq!(metric("gamma_mirrors_sent_total"), 1.0);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while metric("gamma_mirrors_timed_out_total") < 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the mirror was never abandoned"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    held.abort();
}

/// The agent starts at the soft open-files limit container runtimes give (1024 under containerd
/// 2) and raises it to the hard limit: each relayed connection takes two descriptors or more.
/// Before, it kept the soft limit, and accepts and connects failed (EMFILE) after a few hundred
/// connections, far below `--max-connections`.
#[test]
fn the_agent_raises_its_open_files_limit_to_the_hard_one() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed. This test runs in
    // a process of its own (nextest), and the agent inherits the lowered soft limit.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
        0
    );
    let hard = limit.rlim_max;
    assert!(hard > 512, "the hard limit is {hard}: nothing to raise to");
    limit.rlim_cur = 512;
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
    let agent =
        Agent::start_front(&Manifests::default().service("ns", "front", 80, &[], None)).unwrap();
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", agent.child.id())).unwrap();
    let open_files: Vec<&str> = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a Max open files line")
        .split_whitespace()
        .collect();
    assert_eq!(
        open_files[3],
        hard.to_string(),
        "soft limit after start: {limits}"
    );
}

/// The agent's log goes to a pipe (the container runtime's) that may stop being read: the
/// access log's lines are then dropped, never waited for by the workers serving requests.
/// Before, each request's line was written by its worker, and requests stalled once the pipe's
/// 64 KiB filled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_go_on_while_nobody_reads_the_agents_log() {
    const REQUESTS: usize = 2000;
    let echo = echo_backend([127, 0, 0, 1], "echo").await;
    let options = AgentOptions {
        listeners: vec![("ns/front", 80)],
        caller_namespace: None,
        extra_args: Vec::new(),
    };
    let world = Manifests::front_routed_to(echo.addr);
    // stderr piped and never read: its handle stays in `agent.child`.
    let agent =
        Agent::start_logging(&world, options, "info", std::process::Stdio::piped()).unwrap();
    let c = client(false);
    let url = agent.url(0, "/x");
    let served = tokio::time::timeout(Duration::from_secs(60), async {
        for _ in 0..REQUESTS {
            assert_eq!(get(&c, &url, &[]).await.status, 200);
        }
    })
    .await;
    assert!(served.is_ok(), "requests stalled behind the unread log");
}

/// A WebSocket connection to `front` through the agent at `addr`, its 101 read (3 s read
/// timeout).
fn upgraded(addr: std::net::SocketAddr) -> std::net::TcpStream {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: front\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .unwrap();
    let mut head = [0u8; 512];
    let n = s.read(&mut head).unwrap();
    let head = String::from_utf8_lossy(&head[..n]);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s
}

/// As the DaemonSet runs the agent (`RUST_LOG=info`, `--log-format=json`), and in text: one
/// access line per request, in the form `tracing`'s formatter gives (the agent formats these
/// lines itself), telling the route, backend and endpoint a request went to, or why it got
/// none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_request_gets_an_access_line_in_the_logs_form() {
    let echo = echo_backend([127, 0, 0, 1], "echo").await;
    let world = Manifests::front_with_rules(
        echo.addr,
        "  - matches: [{path: {type: PathPrefix, value: /x}}]\n    backendRefs: [{name: echo, port: 80}]\n",
    );
    for json in [true, false] {
        let mut options = options(None);
        if json {
            options.extra_args.push("--log-format=json".into());
        }
        let mut agent =
            Agent::start_logging(&world, options, "info", std::process::Stdio::piped()).unwrap();
        let stderr = agent.child.stderr.take().unwrap();
        let (lines, access) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if line.contains("caller_identity") && lines.send(line).is_err() {
                    return;
                }
            }
        });
        let c = client(false);
        assert_eq!(
            get(&c, &agent.url(0, "/x/a%20b?q=1"), &[]).await.status,
            200
        );
        assert_eq!(get(&c, &agent.url(0, "/nope"), &[]).await.status, 404);
        let next = || {
            access
                .recv_timeout(Duration::from_secs(5))
                .expect("an access line")
        };
        let (served, refused) = (next(), next());
        if json {
            let served: serde_json::Value = serde_json::from_str(&served).unwrap();
            assert_eq!(served["level"], "INFO");
            assert_eq!(served["target"], "access");
            let f = &served["fields"];
            assert_eq!(f["caller_pod"], "127.0.0.1");
            assert_eq!(f["method"], "GET");
            assert_eq!(f["path"], "/x/a%20b");
            assert_eq!(f["service"], "ns/front:80");
            assert_eq!(f["route"], "HTTPRoute ns/r rule #0");
            assert_eq!(f["backend"], "ns/echo:80");
            assert_eq!(f["endpoint"], echo.addr.to_string());
            assert_eq!(f["status"], 200);
            assert_eq!(f["attempts"], 1);
            assert!(f["duration_us"].as_u64().unwrap() >= f["upstream_us"].as_u64().unwrap());
            assert_eq!(f["reason"], "-");
            let refused: serde_json::Value = serde_json::from_str(&refused).unwrap();
            let f = &refused["fields"];
            assert_eq!(
                (&f["status"], &f["route"], &f["endpoint"]),
                (&404.into(), &"-".into(), &"-".into())
            );
            assert_ne!(f["reason"], "-", "a refusal says why");
        } else {
            let fields = format!(
                " INFO access: caller_namespace=\"ns\" caller_pod=127.0.0.1 \
                 caller_identity=\"explicit-listener\" method=GET path=\"/x/a%20b\" \
                 service=\"ns/front:80\" route=\"HTTPRoute ns/r rule #0\" backend=\"ns/echo:80\" \
                 endpoint={} status=200 attempts=1 duration_us=",
                echo.addr
            );
            assert!(served.contains(&fields), "{served}");
            assert!(served.ends_with("reason=\"-\""), "{served}");
            assert!(refused.contains(" status=404 "), "{refused}");
        }
    }
}
