//! The agent between peers from other stacks, which refuse what our own echo forgives: gRPC's
//! C-core (client and server, PyPI's grpcio), a strict HTTP/2 server (hyper-h2) that treats a
//! `host` differing from `:authority` as malformed, and curl over HTTP/2 prior knowledge.

use gamma_tests::loopback::{client, echo_backend, route, Agent, AgentOptions, Manifests};
use gamma_tests::peers::{self, Peer};
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
    let agent = Agent::start(
        &world,
        AgentOptions {
            listeners: vec![("ns/front", 80)],
            caller_namespace: None,
            extra_args: Vec::new(),
        },
    )
    .unwrap();
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
    let answer = gamma_tests::loopback::get(&h2, &agent.url(0, "/x"), &crumbs).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.body["cookie"], serde_json::json!(["a=1; b=2"]));
    let answer = gamma_tests::loopback::get(&h2, &agent.url(0, "/h1"), &crumbs).await;
    let cookies: Vec<&Value> = answer.body["headers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h[0] == "cookie")
        .collect();
    assert_eq!(cookies.len(), 1, "{}", answer.text);
    assert_eq!(cookies[0][1], "a=1; b=2");
}
