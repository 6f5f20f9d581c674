//! The agent between peers from other stacks, which refuse what our own echo forgives: gRPC's
//! C-core (client and server, PyPI's grpcio), a strict HTTP/2 server (hyper-h2) that treats a
//! `host` differing from `:authority` as malformed, curl over HTTP/2 prior knowledge, and nginx as
//! an HTTP/1.1 upstream of the agent's own exchange.

use gamma_tests::loopback::{
    client, echo_backend, get, route, send, Agent, AgentOptions, Manifests, OneConnection,
};
use gamma_tests::peers::{self, Nginx, Peer};
use http::{HeaderMap, Method};
use serde_json::Value;
use std::process::Command;
use std::time::Duration;

/// `None` (and the skip recorded) when the peers' venv is missing.
fn peers_or_skip(test: &str) -> Option<()> {
    match peers::unavailable() {
        None => Some(()),
        Some(reason) => {
            gamma_tests::skip(test, &reason);
            None
        }
    }
}

fn grpc_route(name: &str, parent: &str, rules: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {{name: {name}, namespace: ns}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: {parent}, port: 80}}]\n  rules:\n{rules}"
    )
}

#[test]
fn c_core_grpc_through_routes_and_direct() {
    let Some(()) = peers_or_skip("c_core_grpc_through_routes_and_direct") else {
        return;
    };
    let server = Peer::start("grpc-server", &["c-core"]).unwrap();
    let rules = "  - matches: [{method: {service: gamma.Echo, method: Echo}}]\n    filters: [{type: RequestHeaderModifier, requestHeaderModifier: {add: [{name: x-from-route, value: grpc}]}}]\n    backendRefs: [{name: grpc, port: 80}]\n  - matches: [{method: {service: gamma.Echo, method: Fail}}]\n    backendRefs: [{name: grpc, port: 80}]\n  - matches: [{method: {service: gamma.Echo, method: Gone}}]\n    backendRefs: [{name: drained, port: 80}]\n";
    let slow = "  - matches: [{path: {type: PathPrefix, value: /gamma.Echo/Slow}}]\n    timeouts: {request: 1s}\n    backendRefs: [{name: grpc, port: 80}]\n";
    let world = Manifests::default()
        .service("ns", "front", 80, &[], None)
        .service("ns", "slow", 80, &[], None)
        // Says HTTP/1.1, but a caller no route applies to keeps its own protocol.
        .service("ns", "plain", 80, &[server.addr], Some("http"))
        .service("ns", "grpc", 80, &[server.addr], None)
        .service("ns", "drained", 80, &[], None)
        .raw(&grpc_route("g", "front", rules))
        .raw(&route("deadline", "slow", slow));
    let agent = Agent::start(
        &world,
        AgentOptions {
            listeners: vec![("ns/front", 80), ("ns/slow", 80), ("ns/plain", 80)],
            caller_namespace: None,
            extra_args: Vec::new(),
        },
    )
    .unwrap();
    let call = |listener: usize, method: &str, timeout_s: u64| -> Value {
        let target = agent.listen[listener];
        peers::grpc_call(
            target,
            "front.ns.svc.cluster.local",
            method,
            Duration::from_secs(timeout_s),
            100,
        )
        .unwrap()
    };
    let echo = call(0, "Echo", 5);
    assert_eq!(echo["code"], "OK", "{echo}");
    let seen = &echo["messages"][0];
    assert_eq!(seen["bytes"], 100);
    assert_eq!(seen["x-from-route"], "grpc");
    let failed = call(0, "Fail", 5);
    assert_eq!(
        failed["code"], "NOT_FOUND",
        "the backend's status: {failed}"
    );
    assert_eq!(failed["details"], "no such thing (from the backend)");
    let gone = call(0, "Gone", 5);
    assert_eq!(gone["code"], "UNAVAILABLE", "{gone}");
    assert!(
        gone["details"]
            .as_str()
            .unwrap()
            .contains("no ready endpoint"),
        "{gone}"
    );
    let unmatched = call(0, "Nope", 5);
    assert_eq!(unmatched["code"], "UNIMPLEMENTED", "{unmatched}");
    // The route's 1 s timeout cuts a stream whose head was long sent: DEADLINE_EXCEEDED from
    // the agent (the client's own deadline is 10 s), after some messages went through.
    let cut = call(1, "Slow", 10);
    assert_eq!(cut["code"], "DEADLINE_EXCEEDED", "{cut}");
    assert!(
        cut["details"].as_str().unwrap().contains("route's timeout"),
        "{cut}"
    );
    let streamed = cut["messages"].as_array().unwrap().len();
    assert!(
        (1..50).contains(&streamed),
        "{streamed} messages before the cut"
    );
    let direct = call(2, "Echo", 5);
    assert_eq!(
        direct["code"], "OK",
        "a Direct caller stays on HTTP/2: {direct}"
    );
}

/// What a C-core client does on one channel beyond a unary call, through a GRPCRoute and through
/// a Service no route applies to: a bidi stream answered message by message (nothing of a stream
/// may wait for more data or for its end), 3 MiB each way (flow control over many windows, on
/// both legs), 300 calls at once (more than the backend's 100 concurrent streams), and binary
/// trailing metadata, byte for byte.
#[test]
fn c_core_streams_large_messages_and_many_calls_through_the_agent() {
    let Some(()) = peers_or_skip("c_core_streams_large_messages_and_many_calls_through_the_agent")
    else {
        return;
    };
    let server = Peer::start("grpc-server", &["c-core"]).unwrap();
    let rules = "  - matches: [{method: {service: gamma.Echo}}]\n    backendRefs: [{name: grpc, port: 80}]\n";
    let world = Manifests::default()
        .service("ns", "front", 80, &[], None)
        .service("ns", "plain", 80, &[server.addr], None)
        .service("ns", "grpc", 80, &[server.addr], None)
        .raw(&grpc_route("g", "front", rules));
    let agent = Agent::start(
        &world,
        AgentOptions {
            listeners: vec![("ns/front", 80), ("ns/plain", 80)],
            caller_namespace: None,
            extra_args: Vec::new(),
        },
    )
    .unwrap();
    for (listener, path) in agent.listen.iter().zip(["a GRPCRoute", "no route"]) {
        let seen = peers::grpc_streams(*listener, "front.ns.svc.cluster.local").unwrap();
        let chat: Vec<String> = (0..20).map(|i| format!("c-core:m{i}")).collect();
        assert_eq!(seen["chat"], serde_json::json!(chat), "{path}: {seen}");
        assert_eq!(seen["chat_code"], "OK", "{path}: {seen}");
        assert_eq!(seen["big_equal"], true, "{path}: {seen}");
        assert_eq!(
            seen["trailers"],
            serde_json::json!({"x-trail-bin": "00ff00010203", "x-trail": "c-core"}),
            "{path}: {seen}"
        );
        assert_eq!(seen["concurrent_ok"], 300, "{path}: {seen}");
    }
}

/// A C-core channel's client-streaming uploads to a server that does not read them yet hold
/// flow-control window on the caller's connection to the agent, which every call of the channel
/// shares: a unary call beside 32 of them (2 MiB waiting, each stream's 64 KiB window full) must
/// still go through, to another backend, at once. With a connection window of 1 MiB it waited for
/// the uploads' server and missed its deadline.
#[test]
fn c_core_uploads_a_server_does_not_read_leave_the_channel_its_other_calls() {
    let Some(()) =
        peers_or_skip("c_core_uploads_a_server_does_not_read_leave_the_channel_its_other_calls")
    else {
        return;
    };
    let holding = Peer::start("grpc-server", &["holding"]).unwrap();
    let answering = Peer::start("grpc-server", &["answering"]).unwrap();
    let rules = "  - matches: [{method: {service: gamma.Echo, method: Hold}}]\n    backendRefs: [{name: holding, port: 80}]\n  - matches: [{method: {service: gamma.Echo, method: Echo}}]\n    backendRefs: [{name: answering, port: 80}]\n";
    let world = Manifests::default()
        .service("ns", "front", 80, &[], None)
        .service("ns", "holding", 80, &[holding.addr], None)
        .service("ns", "answering", 80, &[answering.addr], None)
        .raw(&grpc_route("g", "front", rules));
    let agent = Agent::start_front(&world).unwrap();
    let seen = peers::grpc_uploads(agent.listen[0], "front.ns.svc.cluster.local", 32).unwrap();
    assert_eq!(seen["unary"], "OK", "{seen}");
    assert_eq!(
        seen["uploads"],
        serde_json::json!([(16 * 16384).to_string()]),
        "every upload arrives whole once read: {seen}"
    );
}

/// curl over HTTP/2 prior knowledge; returns the status and the body.
fn curl_h2(url: &str, host: &str) -> (u16, Value) {
    let output = Command::new("curl")
        .args(["-s", "--http2-prior-knowledge", "--max-time", "10"])
        .args(["-H", &format!("Host: {host}")])
        .args(["-w", "\n%{http_code}", url])
        .output()
        .expect("curl runs (cargo xtask setup installs it)");
    let text = String::from_utf8_lossy(&output.stdout);
    let (body, status) = text.rsplit_once('\n').expect("curl printed the status");
    (
        status.trim().parse().unwrap_or(0),
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_http2_server_gets_the_callers_authority() {
    let Some(()) = peers_or_skip("strict_http2_server_gets_the_callers_authority") else {
        return;
    };
    let strict = Peer::start("h2-server", &[]).unwrap();
    let h1 = echo_backend([127, 0, 0, 1], "h1").await;
    let rules = "  - matches: [{path: {type: PathPrefix, value: /x}}]\n    backendRefs: [{name: strict, port: 80}]\n  - matches: [{path: {type: PathPrefix, value: /rewrite}}]\n    filters: [{type: URLRewrite, urlRewrite: {hostname: rewritten.example}}]\n    backendRefs: [{name: strict, port: 80}]\n  - matches: [{path: {type: PathPrefix, value: /host-match}, headers: [{name: host, value: catalog.products}]}]\n    backendRefs: [{name: strict, port: 80}]\n  - matches: [{path: {type: PathPrefix, value: /h1}}]\n    backendRefs: [{name: h1, port: 80}]\n";
    let world = Manifests::default()
        .service("ns", "front", 80, &[], None)
        .service(
            "ns",
            "strict",
            80,
            &[strict.addr],
            Some("kubernetes.io/h2c"),
        )
        .service("ns", "h1", 80, &[h1.addr], Some("http"))
        .raw(&route("r", "front", rules));
    let agent = Agent::start_front(&world).unwrap();
    let (status, seen) = curl_h2(&agent.url(0, "/x"), "catalog.products");
    assert_eq!(status, 200, "{seen}");
    assert_eq!(seen["authority"], "catalog.products");
    assert_eq!(seen["host"], Value::Null, "no host field beside :authority");
    let (status, seen) = curl_h2(&agent.url(0, "/rewrite"), "catalog.products");
    assert_eq!(status, 200, "{seen}");
    assert_eq!(seen["authority"], "rewritten.example");
    // A Host match sees HTTP/2's :authority.
    let (status, _) = curl_h2(&agent.url(0, "/host-match"), "catalog.products");
    assert_eq!(status, 200);
    let (status, _) = curl_h2(&agent.url(0, "/host-match"), "other.products");
    assert_eq!(status, 404, "no rule matches another authority");
    // HTTP/2 cookie crumbs: relayed to an HTTP/2 upstream (hyper-h2 joins them as the RFC
    // asks of a server), joined with `; ` by the agent for an HTTP/1.1 one (RFC 9113 §8.2.3).
    let h2 = client(true);
    let crumbs = [("cookie", "a=1"), ("cookie", "b=2")];
    let answer = get(&h2, &agent.url(0, "/x"), &crumbs).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.body["cookie"], serde_json::json!(["a=1; b=2"]));
    let answer = get(&h2, &agent.url(0, "/h1"), &crumbs).await;
    let cookies: Vec<&Value> = answer.body["headers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h[0] == "cookie")
        .collect();
    assert_eq!(cookies.len(), 1, "{}", answer.text);
    assert_eq!(cookies[0][1], "a=1; b=2");
}

/// Bytes that no compression shrinks much, the same in every run.
fn noise(len: usize) -> Vec<u8> {
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn header<'h>(headers: &'h HeaderMap, name: &str) -> &'h str {
    headers
        .get(name)
        .map(|v| v.to_str().unwrap())
        .unwrap_or_default()
}

/// nginx's files: a small text, 1 MiB and 17 bytes of noise, a text nginx gzips in chunks.
struct Files {
    small: Vec<u8>,
    big: Vec<u8>,
    text: Vec<u8>,
}

impl Files {
    fn new() -> Files {
        Files {
            small: b"hello from nginx\n".to_vec(),
            big: noise((1 << 20) + 17),
            text: (0..20_000)
                .flat_map(|i| format!("line {i} of a text nginx gzips in chunks\n").into_bytes())
                .collect(),
        }
    }
}

/// nginx serving `files` as an HTTP/1.1 upstream that closes a connection after its third
/// request or an idle second, numbers a connection's requests in `x-conn-requests`, and gzips
/// `/gz/` in chunks with a trailer; and the agent routing `ns/front` to it.
fn nginx_behind_the_agent(files: &Files) -> (Nginx, Agent) {
    let server = "    keepalive_requests 3;\n    keepalive_timeout 1s;\n    etag on;\n    \
                  add_header x-conn $connection always;\n    \
                  add_header x-conn-requests $connection_requests always;\n    \
                  location /gz/ {\n      gzip on;\n      gzip_types text/plain;\n      \
                  gzip_min_length 0;\n      add_header x-conn $connection always;\n      \
                  add_header x-conn-requests $connection_requests always;\n      \
                  add_trailer x-trailer-from nginx;\n    }";
    let nginx = Nginx::start(
        "",
        server,
        &[
            ("small.txt", &files.small),
            ("big.bin", &files.big),
            ("gz/text.txt", &files.text),
        ],
    )
    .unwrap();
    let rules = "  - backendRefs: [{name: nginx, port: 80}]\n";
    let world = Manifests::default()
        .service("ns", "front", 80, &[], None)
        .service("ns", "nginx", 80, &[nginx.addr], Some("http"))
        .raw(&route("r", "front", rules));
    let agent = Agent::start_front(&world).unwrap();
    (nginx, agent)
}

/// nginx behind the agent, answering as a strict HTTP/1.1 server does: closing a connection
/// after its last allowed request (`Connection: close`) or after an idle second, a HEAD with
/// the body's length and no body, a 304, a range, chunked gzip with a trailer, a large body
/// with a length. Each answer must frame right for the connection to be used again, and nginx
/// numbers a connection's requests: the agent's kept connection shows in that count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_upstream_frames_and_reuse() {
    if let Some(reason) = peers::nginx_unavailable() {
        gamma_tests::skip("nginx_upstream_frames_and_reuse", &reason);
        return;
    }
    let files = Files::new();
    let (small, big) = (&files.small, &files.big);
    let (nginx, agent) = nginx_behind_the_agent(&files);
    let h1 = client(false);
    let url = |path: &str| agent.url(0, path);
    let gzip = [("accept-encoding", "gzip")];

    // One caller connection, one request at a time: each goes on the agent's one kept
    // connection to nginx until nginx closes it after its third.
    let mut caller = OneConnection::open(agent.listen[0]).await;
    let first = caller.send(Method::GET, "/small.txt", &[]).await;
    assert_eq!(first.status, 200, "{}", first.text);
    assert_eq!(first.bytes, *small);
    let etag = header(&first.headers, "etag").to_string();
    assert!(!etag.is_empty(), "nginx gives an ETag");
    let head = caller.send(Method::HEAD, "/big.bin", &[]).await;
    assert_eq!(head.status, 200);
    assert_eq!(
        header(&head.headers, "content-length"),
        big.len().to_string()
    );
    assert!(head.bytes.is_empty(), "a HEAD answer has no body");
    let not_modified = caller
        .send(Method::GET, "/small.txt", &[("if-none-match", &etag)])
        .await;
    assert_eq!(not_modified.status, 304);
    assert!(not_modified.bytes.is_empty());
    let whole = caller.send(Method::GET, "/big.bin", &[]).await;
    assert_eq!(whole.status, 200);
    assert!(
        whole.bytes == *big,
        "the large body arrives whole and unchanged"
    );
    let range = caller
        .send(Method::GET, "/big.bin", &[("range", "bytes=10-19")])
        .await;
    assert_eq!(range.status, 206);
    assert_eq!(range.bytes, big[10..20]);
    let chunked = caller.send(Method::GET, "/gz/text.txt", &gzip).await;
    assert_eq!(chunked.status, 200);
    assert_eq!(header(&chunked.headers, "content-encoding"), "gzip");
    let missing = caller.send(Method::GET, "/missing", &[]).await;
    assert_eq!(missing.status, 404);
    let sequence = [
        &first,
        &head,
        &not_modified,
        &whole,
        &range,
        &chunked,
        &missing,
    ];
    let counts: Vec<&str> = sequence
        .iter()
        .map(|a| header(&a.headers, "x-conn-requests"))
        .collect();
    assert_eq!(counts, ["1", "2", "3", "1", "2", "3", "1"]);
    let conns: Vec<&str> = sequence
        .iter()
        .map(|a| header(&a.headers, "x-conn"))
        .collect();
    assert!(conns[0] == conns[2] && conns[3] == conns[5], "{conns:?}");
    assert!(conns[2] != conns[3] && conns[5] != conns[6], "{conns:?}");

    // The gzip stream is nginx's, byte for byte (the same request straight to nginx), and its
    // trailer reaches an HTTP/2 caller.
    let direct = get(&h1, &format!("http://{}/gz/text.txt", nginx.addr), &gzip).await;
    assert_eq!(header(&direct.headers, "transfer-encoding"), "chunked");
    assert!(
        chunked.bytes == direct.bytes,
        "the chunked body relayed unchanged"
    );
    let h2 = client(true);
    let with_trailer = get(&h2, &url("/gz/text.txt"), &gzip).await;
    assert_eq!(with_trailer.status, 200);
    assert!(with_trailer.bytes == direct.bytes);
    let trailers = with_trailer.trailers.expect("nginx's trailer relayed");
    assert_eq!(header(&trailers, "x-trailer-from"), "nginx");

    // nginx closes a connection idle for a second: the next request finds it closed and goes
    // on a new one, without an error.
    let before = get(&h1, &url("/small.txt"), &[]).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = get(&h1, &url("/small.txt"), &[]).await;
    assert_eq!(after.status, 200, "{}", after.text);
    assert_eq!(after.bytes, *small);
    assert_eq!(header(&after.headers, "x-conn-requests"), "1");
    assert_ne!(
        header(&after.headers, "x-conn"),
        header(&before.headers, "x-conn")
    );
}

/// nginx in front of the agent, as a strict HTTP/1.1 client of the agent's own server (nginx
/// answers 502 to an upstream answer it cannot frame): kept connections (nginx's upstream
/// keep-alive), lengths, HEAD, 304, a range, a chunked answer relayed chunked, a 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_as_a_client_of_the_agents_own_server() {
    if let Some(reason) = peers::nginx_unavailable() {
        gamma_tests::skip("nginx_as_a_client_of_the_agents_own_server", &reason);
        return;
    }
    let files = Files::new();
    let (backend, agent) = nginx_behind_the_agent(&files);
    let upstream = format!(
        "  upstream agent {{ server {}; keepalive 4; }}",
        agent.listen[0]
    );
    let front = Nginx::start(
        &upstream,
        "    location / {\n      proxy_pass http://agent;\n      proxy_http_version 1.1;\n      \
         proxy_set_header Connection \"\";\n    }",
        &[],
    )
    .unwrap();
    let h1 = client(false);
    let via = |path: &str| format!("http://{}{path}", front.addr);
    let direct = |path: &str| format!("http://{}{path}", backend.addr);
    let gzip = [("accept-encoding", "gzip")];
    for round in 0..3 {
        let small = get(&h1, &via("/small.txt"), &[]).await;
        assert_eq!(small.status, 200, "round {round}: {}", small.text);
        assert_eq!(small.bytes, files.small);
        let etag = header(&small.headers, "etag").to_string();
        let head = send(&h1, Method::HEAD, &via("/big.bin"), &[], Default::default()).await;
        assert_eq!(head.status, 200);
        assert_eq!(
            header(&head.headers, "content-length"),
            files.big.len().to_string()
        );
        let not_modified = get(&h1, &via("/small.txt"), &[("if-none-match", &etag)]).await;
        assert_eq!(not_modified.status, 304);
        let whole = get(&h1, &via("/big.bin"), &[]).await;
        assert_eq!(whole.status, 200);
        assert!(
            whole.bytes == files.big,
            "round {round}: the large body whole"
        );
        let range = get(&h1, &via("/big.bin"), &[("range", "bytes=10-19")]).await;
        assert_eq!(range.status, 206);
        assert_eq!(range.bytes, files.big[10..20]);
        let chunked = get(&h1, &via("/gz/text.txt"), &gzip).await;
        assert_eq!(chunked.status, 200, "round {round}: {}", chunked.text);
        let straight = get(&h1, &direct("/gz/text.txt"), &gzip).await;
        assert!(
            chunked.bytes == straight.bytes,
            "the chunked body through both"
        );
        let missing = get(&h1, &via("/missing"), &[]).await;
        assert_eq!(missing.status, 404);
    }
}

/// A backend that reads each request (its head, and the 1-byte body `curl -d x` sends) and
/// answers `answer`.
async fn backend_answering(answer: &'static [u8]) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut read = Vec::new();
                let mut buf = [0u8; 4096];
                let whole = |read: &[u8]| {
                    let Some(end) = read.windows(4).position(|w| w == b"\r\n\r\n") else {
                        return false;
                    };
                    let head = String::from_utf8_lossy(&read[..end]).to_ascii_lowercase();
                    !head.contains("content-length: 1") || read.ends_with(b"x")
                };
                while !whole(&read) {
                    match stream.read(&mut buf).await {
                        Ok(n @ 1..) => read.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
                let _ = stream.write_all(answer).await;
            });
        }
    });
    backend
}

/// What curl over HTTP/2 prior knowledge, strict about a stream's framing, printed (the body, a
/// line end, the status) through an agent in front of `backend`; with a body (`-d x`), the
/// request goes through hyper's client, without one through the agent's own exchange.
async fn curl_h2_through(backend: std::net::SocketAddr, with_body: bool) -> Result<String, String> {
    curl_h2_through_with(backend, with_body, &[]).await
}

/// As `curl_h2_through`, with more arguments for curl (`-D -` prints the head before the body
/// and the trailers after it).
async fn curl_h2_through_with(
    backend: std::net::SocketAddr,
    with_body: bool,
    extra: &[&str],
) -> Result<String, String> {
    let world = Manifests::front_with_rules_declared(
        backend,
        "  - backendRefs: [{name: echo, port: 80}]\n",
        Some("http"),
    );
    let agent = Agent::start_front(&world).unwrap();
    let body: &[&str] = if with_body { &["-d", "x"] } else { &[] };
    curl_h2_run(&agent.url(0, "/framed"), &[body, extra].concat()).await
}

/// What curl over HTTP/2 prior knowledge with `args` printed to `url` (what it printed, a line
/// end, the status), or why it failed.
async fn curl_h2_run(url: &str, args: &[&str]) -> Result<String, String> {
    let mut curl = Command::new("curl");
    curl.args(["-s", "-S", "--http2-prior-knowledge", "--max-time", "10"])
        .args(args)
        .args(["-w", "\n%{http_code}", url]);
    let output = tokio::task::spawn_blocking(move || {
        curl.output()
            .expect("curl runs (cargo xtask setup installs it)")
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.success() {
        Ok(text)
    } else {
        Err(format!(
            "curl: {:?}, printed {text:?}, said {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// A backend answering with both Content-Length and a chunked coding: the coding frames the body
/// (RFC 9112 §6.3), and the agent must not pass the length on beside a body of another length.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_over_http2_gets_an_answer_framed_by_its_coding_not_a_stale_length() {
    let backend = backend_answering(
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(
        curl_h2_through(backend, true).await,
        Ok("hello\n200".into())
    );
}

/// An HTTP/1.1 backend may repeat its length (RFC 9112 §6.3 takes `5, 5` and two fields of `5`
/// as 5), and may send one on a 204; on HTTP/2 a list or a second field makes the stream
/// malformed for curl, and so does a 204's length other than 0 (RFC 9110 §8.6). Before, both
/// went out as the backend wrote them and curl failed the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_over_http2_gets_one_content_length_and_none_on_a_204() {
    let answers: [(&[u8], &str); 3] = [
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\nhello",
            "hello\n200",
        ),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
            "hello\n200",
        ),
        (
            b"HTTP/1.1 204 No Content\r\nContent-Length: 2\r\n\r\n",
            "\n204",
        ),
    ];
    for (answer, printed) in answers {
        let backend = backend_answering(answer).await;
        for with_body in [false, true] {
            assert_eq!(
                curl_h2_through(backend, with_body).await.as_deref(),
                Ok(printed),
                "{} (with a body: {with_body})",
                String::from_utf8_lossy(answer)
            );
        }
    }
}

/// An HTTP/1.1 backend's chunked answer whose trailer section carries, beside a checksum, fields
/// HTTP/2 forbids (`keep-alive`, `connection`: RFC 9113 §8.2.2) and one no trailer may carry
/// (`content-length`, RFC 9110 §6.5.1): curl gets the body and the checksum, on a stream ended
/// cleanly. Before, h2 refused to send such trailers and reset the stream after the whole body:
/// curl failed the transfer (`HTTP/2 stream was not closed cleanly`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_over_http2_gets_an_http1_backends_trailers_without_connection_fields() {
    let backend = backend_answering(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-checksum\r\n\r\n5\r\nhello\r\n0\r\nx-checksum: 5d41\r\nkeep-alive: timeout=5\r\nconnection: keep-alive\r\ncontent-length: 5\r\n\r\n",
    )
    .await;
    for with_body in [false, true] {
        let printed = curl_h2_through_with(backend, with_body, &["-D", "-"]).await;
        let printed = printed.unwrap_or_else(|e| panic!("with a body: {with_body}: {e}"));
        let lower = printed.to_ascii_lowercase();
        assert!(
            printed.contains("\r\n\r\nhello") && printed.ends_with("\n200"),
            "with a body: {with_body}: {printed:?}"
        );
        assert!(
            lower.contains("x-checksum: 5d41"),
            "the trailer reached curl (with a body: {with_body}): {printed:?}"
        );
        for forbidden in ["keep-alive:", "connection:", "content-length:"] {
            assert!(
                !lower.contains(forbidden),
                "{forbidden} relayed (with a body: {with_body}): {printed:?}"
            );
        }
    }
}

/// A gRPC answer whose head said `content-length: 12`, cut after 6 bytes by a lost backend
/// connection, reaches curl (which holds an HTTP/2 stream to its length, as grpc-go's and h2's
/// transports do; C-core does not) as the 6 bytes and the agent's UNAVAILABLE trailers, on a
/// stream ended cleanly. Before, the length was passed on and curl failed the stream short of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_over_http2_gets_a_cut_grpc_answer_without_its_stale_length() {
    use gamma_tests::raw_h2::{RawH2, Reply};
    let backend = RawH2::start(|_| Reply::PartThenClose).await;
    let world = Manifests::default()
        .service("ns", "front", 80, &[], None)
        .service("ns", "grpc", 80, &[backend.addr], Some("kubernetes.io/h2c"))
        .raw(&grpc_route(
            "g",
            "front",
            "  - backendRefs: [{name: grpc, port: 80}]\n",
        ));
    let agent = Agent::start_front(&world).unwrap();
    let printed = curl_h2_run(
        &agent.url(0, "/pkg.Catalog/Watch"),
        &[
            "-D",
            "-",
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            "--data-binary",
            "",
        ],
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let lower = printed.to_ascii_lowercase();
    assert!(lower.contains("grpc-status: 14"), "{printed:?}");
    assert!(!lower.contains("content-length"), "{printed:?}");
    assert!(printed.ends_with("\n200"), "{printed:?}");
}

/// An HTTP/2 caller's GET with a body of no stated length (curl uploading from its standard
/// input) reaches an HTTP/1.1 backend whole, chunked: hyper's client sends a GET without a
/// length as one without a body, and the body was dropped unsaid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_over_http2_sends_a_get_body_of_unknown_length_on() {
    use std::io::Write;
    let echo = echo_backend([127, 0, 0, 1], "plain").await;
    let world = Manifests::front_with_rules_declared(
        echo.addr,
        "  - backendRefs: [{name: echo, port: 80}]\n",
        Some("http"),
    );
    let agent = Agent::start_front(&world).unwrap();
    let url = agent.url(0, "/upload");
    let output = tokio::task::spawn_blocking(move || {
        let mut curl = Command::new("curl")
            .args(["-s", "-S", "--http2-prior-knowledge", "--max-time", "10"])
            .args([
                "-X",
                "GET",
                "-T",
                "-",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &url,
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("curl runs (cargo xtask setup installs it)");
        let mut stdin = curl.stdin.take().unwrap();
        stdin.write_all(b"hello").unwrap();
        drop(stdin);
        curl.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "200",
        "curl said {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        echo.stats
            .body_bytes
            .load(std::sync::atomic::Ordering::Relaxed),
        5
    );
}

/// `curl --http2` to an `http://` URL offers an upgrade to h2c (`Upgrade: h2c`, with its
/// `HTTP2-Settings`). The agent answers it over HTTP/1.1 and relays the request without the
/// offer: relayed without the `HTTP2-Settings` it needs, a backend that takes such upgrades (our
/// echo does, as Go's h2c handler would with the settings) switched the connection, and curl
/// read back its own HTTP/2 preface.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_offering_h2c_is_answered_over_http1_without_the_offer_relayed() {
    let echo = echo_backend([127, 0, 0, 1], "echo").await;
    let agent = Agent::start_front(&Manifests::front_routed_to(echo.addr)).unwrap();
    let url = agent.url(0, "/offer");
    let output = tokio::task::spawn_blocking(move || {
        Command::new("curl")
            .args(["-s", "--http2", "--max-time", "10"])
            .args(["-w", "\n%{http_code} %{http_version}", &url])
            .output()
            .expect("curl runs (cargo xtask setup installs it)")
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    let (body, status) = text.rsplit_once('\n').expect("curl printed the status");
    assert_eq!(
        status,
        "200 1.1",
        "curl: {text:?}, said {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let seen: Value = serde_json::from_str(body).expect("the echo's JSON");
    let relayed: Vec<&str> = seen["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|pair| pair[0].as_str().unwrap())
        .collect();
    for offer in ["upgrade", "http2-settings", "connection"] {
        assert!(!relayed.contains(&offer), "{offer} relayed: {seen}");
    }
}

/// gRPC's C-core client as the caller of a call whose backend fails it: for a reset stream it
/// gets gRPC's status for the HTTP/2 error code (INTERNAL_ERROR: INTERNAL, CANCEL: CANCELLED),
/// not UNAVAILABLE, which would tell it the call is safe to send again; for an answer cut by a
/// lost backend connection, UNAVAILABLE, what a client of the backend itself would report.
#[test]
fn c_core_gets_grpcs_status_for_a_backend_failing_the_call() {
    use gamma_tests::raw_h2::{RawH2, Reply};
    let Some(()) = peers_or_skip("c_core_gets_grpcs_status_for_a_backend_failing_the_call") else {
        return;
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    for (reply, status) in [
        (Reply::Reset(0x2), "INTERNAL"),
        (Reply::Reset(0x8), "CANCELLED"),
        (Reply::PartThenClose, "UNAVAILABLE"),
    ] {
        let backend = runtime.block_on(RawH2::start(move |_| reply));
        let world = Manifests::default()
            .service("ns", "front", 80, &[], None)
            .service(
                "ns",
                "resets",
                80,
                &[backend.addr],
                Some("kubernetes.io/h2c"),
            )
            .raw(&grpc_route(
                "g",
                "front",
                "  - backendRefs: [{name: resets, port: 80}]\n",
            ));
        let agent = Agent::start_front(&world).unwrap();
        let answer = peers::grpc_call(
            agent.listen[0],
            "front.ns.svc.cluster.local",
            "Echo",
            Duration::from_secs(5),
            10,
        )
        .unwrap();
        assert_eq!(answer["code"], status, "{reply:?}: {answer}");
    }
}
