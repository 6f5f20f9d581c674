//! Two nodes, each its own network namespace with its pods, its simulated kube-proxy and its own
//! agent (`--kube --node-name`), joined by a routed link, following one (in-process, fake) API
//! server reachable from both over the link (root only; otherwise SKIPPED with the reason):
//! - a pod on node A calling a Service whose only endpoint is on node B goes through A's agent
//!   (the route's filter applies) and across the link;
//! - each agent steers only its own node's pods (the kernel counters of each say so);
//! - `internalTrafficPolicy: Local` and PreferSameNode hints pick each node's own endpoint;
//! - one status writer across the two agents: the Lease holder, whose writes are the only ones;
//! - killing node A's agent fails node A open (kube-proxy's path, no route filter) while node B's
//!   pods keep their mesh routes.
//!
//! Everything lives in the namespaces and cgroups the two nodes create and remove by name.

use gamma_tests::client::{ClientAnswer, ClientRequest};
use gamma_tests::fake_apiserver::FakeApiServer;
use gamma_tests::kube_world::LEASE_NS;
use gamma_tests::loopback::{http_get, TempDir};
use gamma_tests::node::{Node, Pod, AGENT_ADDR};
use gamma_tests::probe::sample;
use gamma_tests::scenario::{binary, run_client, ADMIN, REDIRECT_PORT};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const NS: &str = "shop";
/// Pods of node A are 10.244.1.x, of node B 10.244.2.x.
const PODS_A: &str = "10.244.1.0/24";
const PODS_B: &str = "10.244.2.0/24";
const ECHO_PORT: u16 = 8080;

struct Side {
    node: Node,
    name: &'static str,
    /// The kubeconfig of the API server, as this node's agent (Pod `agent-<node>`) reaches it.
    kubeconfig: PathBuf,
    agent: Option<Child>,
    client: Pod,
}

impl Side {
    fn pod_name(&self) -> String {
        format!("agent-{}", self.name)
    }

    fn start_agent(&mut self) {
        let mut command = Command::new(binary("proxy-agent"));
        command
            .args([
                "--kube",
                "--pod-name",
                &self.pod_name(),
                "--lease-namespace",
                LEASE_NS,
            ])
            .env("KUBECONFIG", &self.kubeconfig)
            .arg("--redirect")
            .arg(SocketAddr::from((AGENT_ADDR, REDIRECT_PORT)).to_string())
            .arg("--cgroup")
            .arg(self.node.pods_cgroup())
            .args([
                "--admin",
                ADMIN,
                "--poll-interval-ms",
                "50",
                "--node-name",
                self.name,
            ])
            .env(
                "RUST_LOG",
                std::env::var("AGENT_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let mut agent = self.node.spawn(&mut command).expect("start the agent");
        let started = Instant::now();
        while self.admin("/ready").is_none() {
            assert!(
                agent.try_wait().unwrap().is_none(),
                "the agent of {} exited during start",
                self.name
            );
            let limit = gamma_tests::harness_timeout(Duration::from_secs(10));
            assert!(
                started.elapsed() < limit,
                "{} not ready in {limit:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.agent = Some(agent);
    }

    fn kill_agent(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            let _ = agent.kill();
            let _ = agent.wait();
        }
    }

    fn admin(&self, path: &str) -> Option<String> {
        let (admin, path): (SocketAddr, String) = (ADMIN.parse().unwrap(), path.to_string());
        self.node
            .in_netns(move || http_get(admin, &path))
            .ok()?
            .ok()
    }

    fn counter(&self, name: &str) -> u64 {
        sample(&self.admin("/metrics").unwrap_or_default(), name).map_or(0, |n| n as u64)
    }

    /// `count` requests from this node's client pod to `vip`.
    fn call(&self, vip: Ipv4Addr, count: usize) -> Vec<ClientAnswer> {
        let request = ClientRequest {
            url: format!("http://{vip}:80/"),
            method: "GET".into(),
            count,
            ..Default::default()
        };
        run_client(&self.client, &request).expect("the client ran")
    }
}

impl Drop for Side {
    fn drop(&mut self) {
        self.kill_agent();
    }
}

/// The echo pod `name` on `node`, at `ip` (the node kills and reaps its processes).
fn echo_pod(node: &mut Node, name: &str, ip: Ipv4Addr) -> anyhow::Result<Pod> {
    let pod = node.add_pod(NS, name, &format!("uid-{name}"), ip)?;
    let mut echo = Command::new(binary("gamma-echo"));
    echo.args(["--name", name, &format!("0.0.0.0:{ECHO_PORT}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    pod.spawn(&mut echo)?;
    pod.wait_for_port(
        ECHO_PORT,
        gamma_tests::harness_timeout(Duration::from_secs(5)),
    )?;
    Ok(pod)
}

/// One Service, its EndpointSlice (endpoints: ip, node, node hint) and a producer route to
/// itself that marks what it routes.
fn service(name: &str, vip: Ipv4Addr, spec: &str, endpoints: &[(Ipv4Addr, &str, bool)]) -> String {
    let endpoints: Vec<String> = endpoints
        .iter()
        .map(|(ip, node, hinted)| {
            let hints = if *hinted {
                format!(", hints: {{forNodes: [{{name: {node}}}]}}")
            } else {
                String::new()
            };
            format!(
                "{{addresses: [\"{ip}\"], nodeName: {node}, conditions: {{ready: true}}{hints}}}"
            )
        })
        .collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {NS}}}\nspec: {{clusterIP: \"{vip}\", ports: [{{name: http, port: 80, targetPort: {ECHO_PORT}}}]{spec}}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, namespace: {NS}, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{name: http, port: {ECHO_PORT}}}]\nendpoints: [{}]\n---\n\
         apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: {NS}}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: {name}, port: 80}}]\n  rules:\n  - filters: [{{type: RequestHeaderModifier, requestHeaderModifier: {{set: [{{name: x-mesh, value: {name}}}]}}}}]\n    backendRefs: [{{name: {name}, port: 80}}]\n",
        endpoints.join(", ")
    )
}

fn pod_manifest(pod: &Pod, node: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: {NS}, uid: {}}}\nspec: {{nodeName: {node}}}\nstatus: {{phase: Running, podIP: \"{}\", podIPs: [{{ip: \"{}\"}}]}}\n",
        pod.name, pod.uid, pod.ip, pod.ip
    )
}

fn meshed(answers: &[ClientAnswer], service: &str) -> usize {
    answers
        .iter()
        .filter(|a| a.status == 200)
        .filter(|a| {
            a.headers_at_backend
                .iter()
                .any(|(n, v)| n == "x-mesh" && v == service)
        })
        .count()
}

fn pods(answers: &[ClientAnswer]) -> std::collections::BTreeSet<String> {
    answers.iter().map(|a| a.pod.clone()).collect()
}

#[test]
fn two_nodes_each_agent_serves_its_own_pods_with_node_local_endpoints() {
    if let Some(reason) = gamma_tests::node::require_root() {
        gamma_tests::skip("two_nodes", &reason);
        return;
    }
    let mut node_a = Node::new("two-nodes-a").unwrap();
    let mut node_b = Node::new("two-nodes-b").unwrap();
    node_a
        .link_to(
            &node_b,
            Ipv4Addr::new(172, 31, 255, 0),
            &[PODS_A.into()],
            &[PODS_B.into()],
        )
        .unwrap();
    let client_a = node_a
        .add_pod(
            NS,
            "client-a",
            "uid-client-a",
            Ipv4Addr::new(10, 244, 1, 10),
        )
        .unwrap();
    let client_b = node_b
        .add_pod(
            NS,
            "client-b",
            "uid-client-b",
            Ipv4Addr::new(10, 244, 2, 10),
        )
        .unwrap();
    let echo_a = echo_pod(&mut node_a, "echo-a", Ipv4Addr::new(10, 244, 1, 20)).unwrap();
    let echo_b = echo_pod(&mut node_b, "echo-b", Ipv4Addr::new(10, 244, 2, 20)).unwrap();
    let (remote, local, close) = (
        Ipv4Addr::new(10, 96, 0, 10),
        Ipv4Addr::new(10, 96, 0, 11),
        Ipv4Addr::new(10, 96, 0, 12),
    );
    let both = [(echo_a.ip, "node-a"), (echo_b.ip, "node-b")];
    let world = [
        service("remote", remote, "", &[(echo_b.ip, "node-b", false)]),
        service(
            "local",
            local,
            ", internalTrafficPolicy: Local",
            &both.map(|(ip, n)| (ip, n, false)),
        ),
        service(
            "close",
            close,
            ", trafficDistribution: PreferSameNode",
            &both.map(|(ip, n)| (ip, n, true)),
        ),
        pod_manifest(&client_a, "node-a"),
        pod_manifest(&client_b, "node-b"),
    ]
    .join("---\n");
    // The simulated kube-proxy of each node: every endpoint, wherever it runs.
    for node in [&mut node_a, &mut node_b] {
        node.dnat_service(remote, 80, &[(echo_b.ip, ECHO_PORT)])
            .unwrap();
        for vip in [local, close] {
            node.dnat_service(vip, 80, &[(echo_a.ip, ECHO_PORT), (echo_b.ip, ECHO_PORT)])
                .unwrap();
        }
    }
    // The API server: in this process, listening in node A's netns on its end of the link, so
    // that both nodes' agents reach it (the test's root netns is never involved).
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let listener = node_a
        .in_netns(|| std::net::TcpListener::bind("172.31.255.1:0"))
        .unwrap()
        .unwrap();
    listener.set_nonblocking(true).unwrap();
    let api = runtime.block_on(async {
        FakeApiServer::start_on(tokio::net::TcpListener::from_std(listener).unwrap())
    });
    for (_, object) in gamma_engine::manifests::documents(&world).unwrap() {
        api.apply(object);
    }
    let kubeconfigs = TempDir::new("two-nodes");
    let side = |node: Node, name: &'static str, client: Pod| Side {
        node,
        name,
        kubeconfig: api.kubeconfig(&kubeconfigs.0, &format!("agent-{name}")),
        agent: None,
        client,
    };
    let mut a = side(node_a, "node-a", client_a);
    let mut b = side(node_b, "node-b", client_b);
    // B first, so that B holds the status lease and A's death leaves it where it is.
    b.start_agent();
    let lease_holder = || {
        api.get("leases", LEASE_NS, "gamma-node-status")
            .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_string))
    };
    wait_for("B holds the lease", || {
        lease_holder().as_deref() == Some("agent-node-b")
    });
    a.start_agent();

    // Across the link, through A's agent: the route's filter applied, B's pod answered.
    let answers = a.call(remote, 10);
    assert_eq!(meshed(&answers, "remote"), 10, "{answers:?}");
    assert_eq!(pods(&answers), ["echo-b".to_string()].into());
    assert_eq!(a.counter("gamma_kernel_connects_steered_total"), 10);
    assert_eq!(
        b.counter("gamma_kernel_connects_steered_total"),
        0,
        "B steers only B's pods"
    );

    // Each node's own endpoint: internalTrafficPolicy Local, then PreferSameNode hints.
    for (service, vip) in [("local", local), ("close", close)] {
        let from_a = a.call(vip, 10);
        let from_b = b.call(vip, 10);
        assert_eq!(
            meshed(&from_a, service) + meshed(&from_b, service),
            20,
            "{service}"
        );
        assert_eq!(
            pods(&from_a),
            ["echo-a".to_string()].into(),
            "{service} from A"
        );
        assert_eq!(
            pods(&from_b),
            ["echo-b".to_string()].into(),
            "{service} from B"
        );
    }
    assert_eq!(b.counter("gamma_kernel_connects_steered_total"), 20);

    // One status writer: every route status was written by B, the holder, none by A.
    wait_for("the three routes' status", || {
        ["remote", "local", "close"].iter().all(|r| {
            api.get("httproutes", NS, r)
                .is_some_and(|route| route["status"]["parents"].is_array())
        })
    });
    let writers: std::collections::BTreeSet<Option<String>> = api
        .requests()
        .iter()
        .filter(|r| r.verb == "patch" && r.resource == "httproutes/status")
        .map(|r| r.authorization.clone())
        .collect();
    assert_eq!(writers, [Some("Bearer agent-node-b".to_string())].into());
    assert_eq!(lease_holder().as_deref(), Some("agent-node-b"));

    // A's agent dies: A's pods fail open (kube-proxy, no route filter); B's stay meshed.
    a.kill_agent();
    let from_a = a.call(remote, 5);
    assert!(from_a.iter().all(|x| x.status == 200), "{from_a:?}");
    assert_eq!(
        meshed(&from_a, "remote"),
        0,
        "node A fell back to kube-proxy"
    );
    let from_b = b.call(remote, 5);
    assert_eq!(meshed(&from_b, "remote"), 5, "node B is untouched");
    assert_eq!(
        lease_holder().as_deref(),
        Some("agent-node-b"),
        "the lease stays with B"
    );
    drop(b);
    drop(a);
    drop(runtime);
}

fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let started = Instant::now();
    while !check() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "not within 10 s: {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
