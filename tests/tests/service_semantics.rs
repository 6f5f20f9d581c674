//! Service semantics the agent keeps once it picks endpoints, through the agent binary on
//! loopback: `sessionAffinity: ClientIP` binds each caller (its own address, not the agent's) to
//! one endpoint, while a Service without it spreads; a kept-alive connection to a Service that
//! went is answered 503 and closed, so that its client connects again. Endpoint filtering by node and zone is
//! decided by the engine (`gamma-engine/tests/service_semantics.rs`).

use gamma_tests::loopback::{echo_backend, Agent, AgentOptions, Manifests};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One request on a new connection made from `source`; the echo pod that answered.
async fn answered_by(source: IpAddr, to: SocketAddr) -> String {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source, 0)).unwrap();
    let mut stream = socket.connect(to).await.expect("connect to the agent");
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: svc\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let json: serde_json::Value = serde_json::from_str(body.trim())
        .unwrap_or_else(|e| panic!("not an echo answer ({e}): {answer}"));
    json["pod"].as_str().unwrap_or_default().to_string()
}

fn with_affinity(service: &str, endpoints: &[SocketAddr]) -> String {
    let addresses: Vec<String> = endpoints
        .iter()
        .map(|e| format!("{{addresses: [{}], conditions: {{ready: true}}}}", e.ip()))
        .collect();
    let port = endpoints[0].port();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {service}, namespace: ns}}\nspec:\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: 600}}}}\n  ports: [{{name: p, port: 80, targetPort: {port}}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {service}-1\n  namespace: ns\n  labels: {{kubernetes.io/service-name: {service}}}\naddressType: IPv4\nports: [{{name: p, port: {port}}}]\nendpoints: [{}]\n",
        addresses.join(", ")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_ip_affinity_binds_each_caller_and_plain_services_spread() {
    // Two endpoints on one port (an EndpointSlice port is shared by its endpoints).
    let first = echo_backend([127, 0, 0, 21], "first").await;
    let second = gamma_tests::loopback::echo_backend_at(
        SocketAddr::new([127, 0, 0, 22].into(), first.addr.port()),
        "second",
    )
    .await;
    let endpoints = [first.addr, second.addr];
    let world = Manifests::default()
        .raw(&with_affinity("sticky", &endpoints))
        .service("ns", "spread", 80, &endpoints, None);
    let agent = Agent::start(
        &world,
        AgentOptions {
            listeners: vec![("ns/sticky", 80), ("ns/spread", 80)],
            caller_namespace: None,
            extra_args: Vec::new(),
        },
    )
    .unwrap();
    let (sticky, spread) = (agent.listen[0], agent.listen[1]);

    for caller in [[127, 0, 0, 31], [127, 0, 0, 32], [127, 0, 0, 33]] {
        let caller = IpAddr::from(caller);
        let mut pods = BTreeSet::new();
        for _ in 0..20 {
            pods.insert(answered_by(caller, sticky).await);
        }
        assert_eq!(pods.len(), 1, "caller {caller} went to {pods:?}");
    }
    let mut pods = BTreeSet::new();
    for _ in 0..40 {
        pods.insert(answered_by(IpAddr::from([127, 0, 0, 31]), spread).await);
    }
    assert_eq!(
        pods,
        BTreeSet::from(["first".to_string(), "second".to_string()]),
        "without affinity one caller reaches both endpoints"
    );
}

/// `ns/front` routed to `v1` and `v2` with these weights, with cookie session persistence on `/`
/// and header session persistence on `/h`.
fn persisted_world(v1: SocketAddr, v2: SocketAddr, weights: (u32, u32)) -> Manifests {
    let backends = format!(
        "[{{name: v1, port: 80, weight: {}}}, {{name: v2, port: 80, weight: {}}}]",
        weights.0, weights.1
    );
    let rules = format!(
        "  - matches: [{{path: {{type: PathPrefix, value: /h}}}}]\n    backendRefs: {backends}\n    sessionPersistence: {{type: Header, header: {{name: x-session}}}}\n  - backendRefs: {backends}\n    sessionPersistence: {{type: Cookie, cookie: {{name: sid}}, idleTimeout: 1h}}\n"
    );
    Manifests::default()
        .service("ns", "front", 80, &[], None)
        .service("ns", "v1", 80, &[v1], None)
        .service("ns", "v2", 80, &[v2], None)
        .raw(&gamma_tests::loopback::route("r", "front", &rules))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persisted_sessions_survive_weight_changes_and_follow_their_endpoint_until_it_goes() {
    use gamma_tests::loopback::{client, get, Answer};
    let v1 = echo_backend([127, 0, 0, 41], "v1").await;
    let v2 = gamma_tests::loopback::echo_backend_at(
        SocketAddr::new([127, 0, 0, 42].into(), v1.addr.port()),
        "v2",
    )
    .await;
    let agent = Agent::start(
        &persisted_world(v1.addr, v2.addr, (1, 1)),
        AgentOptions {
            listeners: vec![("ns/front", 80)],
            caller_namespace: None,
            extra_args: Vec::new(),
        },
    )
    .unwrap();
    let c = client(false);
    let pod = |a: &Answer| a.body["pod"].as_str().unwrap_or_default().to_string();
    let session_cookie = |a: &Answer| {
        let set = a.headers["set-cookie"].to_str().unwrap().to_string();
        assert!(set.contains("; Path=/; HttpOnly"), "{set}");
        set.split(';').next().unwrap().to_string()
    };

    // New sessions spread by weight, each answer offering its session.
    let mut first: BTreeMap<String, String> = BTreeMap::new();
    for _ in 0..40 {
        let answer = get(&c, &agent.url(0, "/"), &[]).await;
        first.insert(pod(&answer), session_cookie(&answer));
    }
    assert_eq!(first.len(), 2, "both backends serve new sessions");
    let cookie = first["v1"].clone();
    let sticks = |answers: &[Answer], to: &str| answers.iter().all(|a| pod(a) == to);
    let with_cookie = || async {
        let mut answers = Vec::new();
        for _ in 0..20 {
            answers.push(get(&c, &agent.url(0, "/"), &[("cookie", cookie.as_str())]).await);
        }
        answers
    };
    assert!(
        sticks(&with_cookie().await, "v1"),
        "a session stays on its endpoint"
    );

    // v1's weight drops to 0: new sessions go to v2, v1's session stays.
    agent
        .update(&persisted_world(v1.addr, v2.addr, (0, 1)))
        .unwrap();
    assert!(sticks(&with_cookie().await, "v1"), "across a weight change");
    for _ in 0..10 {
        assert_eq!(pod(&get(&c, &agent.url(0, "/"), &[]).await), "v2");
    }

    // v1's endpoint is replaced by another: the session moves (by weight) and is offered anew,
    // naming its new endpoint, where it stays.
    let v1b = gamma_tests::loopback::echo_backend_at(
        SocketAddr::new([127, 0, 0, 43].into(), v1.addr.port()),
        "v1b",
    )
    .await;
    agent
        .update(&persisted_world(v1b.addr, v2.addr, (1, 1)))
        .unwrap();
    let moved = get(&c, &agent.url(0, "/"), &[("cookie", cookie.as_str())]).await;
    let new_owner = pod(&moved);
    assert!(["v1b", "v2"].contains(&new_owner.as_str()), "{new_owner}");
    let renewed = session_cookie(&moved);
    let owner_addr = if new_owner == "v2" { v2.addr } else { v1b.addr };
    assert!(renewed.contains(&owner_addr.to_string()), "{renewed}");
    for _ in 0..10 {
        let again = get(&c, &agent.url(0, "/"), &[("cookie", renewed.as_str())]).await;
        assert_eq!(pod(&again), new_owner, "the renewed session stays");
    }

    // Header sessions: the answer's x-session, sent back, keeps the endpoint.
    let answer = get(&c, &agent.url(0, "/h"), &[]).await;
    let token = answer.headers["x-session"].to_str().unwrap().to_string();
    let owner = pod(&answer);
    for _ in 0..10 {
        let again = get(&c, &agent.url(0, "/h"), &[("x-session", token.as_str())]).await;
        assert_eq!(pod(&again), owner);
    }
}

/// The same over HTTP/2: the 503 stream is followed by a graceful GOAWAY, so that the client
/// (a gRPC channel re-resolves its name only when its connection goes) connects again to
/// wherever the name leads now. Before, every call on the kept connection got 503 (gRPC:
/// UNAVAILABLE) for as long as the client kept it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_http2_connection_to_a_service_that_went_gets_goaway_after_its_503() {
    let echo = echo_backend([127, 0, 0, 1], "echo").await;
    let world = Manifests::front_routed_to(echo.addr);
    let agent = Agent::start_front(&world).unwrap();
    let (mut sender, mut connection) = gamma_tests::loopback::http2_to(agent.listen[0]).await;
    let get = || {
        http::Request::get("http://front/")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap()
    };
    assert_eq!(sender.send_request(get()).await.unwrap().status(), 200);
    let without_front = Manifests::default().service("ns", "echo", 80, &[echo.addr], None);
    let _agent = tokio::task::spawn_blocking(move || agent.update(&without_front).map(|()| agent))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(sender.send_request(get()).await.unwrap().status(), 503);
    tokio::time::timeout(std::time::Duration::from_secs(5), &mut connection)
        .await
        .expect("the agent ends the connection after the 503")
        .unwrap()
        .expect("with a graceful GOAWAY");
}

/// A Service deleted while a client's HTTP/1.1 connection to it stays open: the next request on
/// it gets 503 and the connection is closed, so that the client's next one goes wherever the
/// Service's name leads now (a Service made again has a new ClusterIP). Left open, every
/// request on it got 503 for as long as the client kept it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_connection_to_a_service_that_went_is_closed_after_its_503() {
    let echo = echo_backend([127, 0, 0, 1], "echo").await;
    let world = Manifests::front_routed_to(echo.addr);
    let agent = Agent::start_front(&world).unwrap();
    let mut stream = tokio::net::TcpStream::connect(agent.listen[0])
        .await
        .unwrap();
    let request = b"GET / HTTP/1.1\r\nhost: front\r\n\r\n";
    stream.write_all(request).await.unwrap();
    let mut first = vec![0u8; 4096];
    let n = stream.read(&mut first).await.unwrap();
    assert!(
        first[..n].starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&first[..n])
    );

    let without_front = Manifests::default().service("ns", "echo", 80, &[echo.addr], None);
    let _agent = tokio::task::spawn_blocking(move || agent.update(&without_front).map(|()| agent))
        .await
        .unwrap()
        .unwrap();
    stream.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(5),
        stream.read_to_end(&mut answer),
    )
    .await
    .expect("the connection is closed after the answer")
    .unwrap();
    let answer = String::from_utf8_lossy(&answer).to_lowercase();
    assert!(answer.starts_with("http/1.1 503"), "{answer}");
    assert!(answer.contains("\r\nconnection: close\r\n"), "{answer}");
}
