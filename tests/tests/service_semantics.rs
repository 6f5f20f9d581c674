//! Service semantics the agent keeps once it picks endpoints, through the agent binary on
//! loopback: `sessionAffinity: ClientIP` binds each caller (its own address, not the agent's) to
//! one endpoint, while a Service without it spreads. Endpoint filtering by node and zone is
//! decided by the engine (`gamma-engine/tests/service_semantics.rs`).

use gamma_tests::loopback::{echo_backend, Agent, AgentOptions, Manifests};
use std::collections::BTreeSet;
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
