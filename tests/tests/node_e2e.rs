//! End to end on a node of network namespaces, with the kernel redirect: the seed cluster
//! (`demo/cluster.yaml`), the agent in the node netns, clients in pods.
//! - a mesh VIP is redirected with the right original destination and caller namespace, and
//!   the application sees the VIP as its peer;
//! - a VIP without routes is left to kube-proxy, untouched by the agent;
//! - on a dual-stack node, a Service's IPv6 ClusterIP goes to the agent's IPv6 listener, and the
//!   caller is known by its pod's IPv6 address; an agent that listened on IPv4 only is taken over
//!   by one that listens on both; a second address the node lacks leaves the first serving (the
//!   other family's frontends counted as without a listener); no listener on a family without
//!   ClusterIPs;
//! - agent killed: traffic falls back to kube-proxy; agent restarted: redirection resumes;
//! - two rounds of 2,000 sequential connections (reused tuples in TIME_WAIT) all succeed;
//! - a process sending from another pod's IP does not get that pod's consumer routes;
//! - nor does it by reusing that pod's source port, before or after the pod, nor by connecting to
//!   the agent's redirect port directly (no record: closed);
//! - with `--local-sockets`, nothing pairs until pods opt in (an upgraded connection is spliced);
//!   once their Namespaces opt them in, the caller's connections through the agent carry their
//!   bytes socket to socket (its TCP sends only handshakes and closes), with the same answers,
//!   HTTP/1.1 and HTTP/2, and upgraded ones are copied; once the caller's pod opts out (its own
//!   annotation wins), its new connections take TCP again (an upgraded one is still copied: the
//!   agent's socket to the backend pod is paired);
//! - on a kernel without what the redirect needs (5.10), the agent attaches nothing and says why,
//!   and pods reach mesh Services through kube-proxy (`cargo xtask kernels` runs it there).

use gamma_engine::model::LOCAL_SOCKETS_ANNOTATION;
use gamma_tests::client::{ClientAnswer, ClientRequest};
use gamma_tests::cluster::{AddressPlan, SimCluster, SimPod};
use gamma_tests::probe::sample;
use gamma_tests::scenario::{to_yaml, Scenario};
use std::time::Duration;

fn scenario(test: &str) -> Option<Scenario> {
    scenario_with(test, &[])
}

fn scenario_with(test: &str, agent_args: &[&str]) -> Option<Scenario> {
    scenario_of(test, agent_args, |cluster| cluster)
}

/// [`scenario_of`], with an agent a successor can take over ([`Scenario::take_over_agent`]), and
/// the folder holding its takeover socket.
fn scenario_taken_over(
    test: &str,
    edit: impl FnOnce(SimCluster) -> SimCluster,
) -> Option<(gamma_tests::loopback::TempDir, Scenario)> {
    let dir = gamma_tests::loopback::TempDir::new("takeover");
    let socket = dir.0.join("takeover.sock");
    let takeover = ["--takeover-socket", socket.to_str().unwrap()];
    let scenario = scenario_of(test, &takeover, edit)?;
    // First in the tuple: dropped after the agent.
    Some((dir, scenario))
}

/// The demo's cluster, as `edit` makes it, with the consumer route.
fn scenario_of(
    test: &str,
    agent_args: &[&str],
    edit: impl FnOnce(SimCluster) -> SimCluster,
) -> Option<Scenario> {
    if let Some(reason) = gamma_tests::node::require_root() {
        gamma_tests::skip(test, &reason);
        return None;
    }
    let dir = gamma_tests::workspace_root().join("demo");
    let cluster = edit(
        SimCluster::from_manifests(&dir.join("cluster.yaml"), AddressPlan::default()).unwrap(),
    );
    let args = agent_args.iter().map(|a| a.to_string()).collect();
    let scenario = Scenario::start_with(test, cluster, args).unwrap();
    let route = std::fs::read_to_string(dir.join("step1-consumer-route.yaml")).unwrap();
    scenario.apply("consumer.yaml", &route).unwrap();
    Some(scenario)
}

fn client(s: &Scenario, namespace: &str) -> SimPod {
    s.cluster.client(namespace, "app=client").unwrap().clone()
}

fn call(s: &Scenario, from: &SimPod, service: &str, count: usize) -> Vec<ClientAnswer> {
    call_with(s, from, service, count, |_| {})
}

fn call_with(
    s: &Scenario,
    from: &SimPod,
    service: &str,
    count: usize,
    adjust: impl FnOnce(&mut ClientRequest),
) -> Vec<ClientAnswer> {
    let vip = s.cluster.resolve(service, "products").unwrap();
    let mut request = ClientRequest {
        url: format!("http://{vip}:80/items"),
        method: "GET".into(),
        count,
        ..Default::default()
    };
    adjust(&mut request);
    s.request(from, &request).unwrap()
}

/// TCP segments sent from a pod's network namespace so far (`Tcp: OutSegs` of /proc/net/snmp).
fn tcp_segments_sent(pod: &gamma_tests::node::Pod) -> u64 {
    let output = pod
        .run_output(
            std::process::Command::new("cat").arg("/proc/net/snmp"),
            Duration::from_secs(5),
        )
        .unwrap();
    let snmp = String::from_utf8(output.stdout).unwrap();
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next().unwrap(), tcp.next().unwrap());
    let column = names
        .split_whitespace()
        .position(|n| n == "OutSegs")
        .unwrap();
    values
        .split_whitespace()
        .nth(column)
        .unwrap()
        .parse()
        .unwrap()
}

fn flagged(answers: &[ClientAnswer]) -> usize {
    answers
        .iter()
        .filter(|a| {
            a.headers_at_backend
                .iter()
                .any(|(n, v)| n == "x-dev-feature" && v == "enabled")
        })
        .count()
}

/// A counter of the agent's /metrics (0 when absent).
fn counter(s: &Scenario, name: &str) -> u64 {
    sample(&s.admin_get("/metrics").unwrap(), name).map_or(0, |n| n as u64)
}

/// Opaque and upgraded connections the agent pumped: (spliced, copied).
fn pumped(s: &Scenario) -> (u64, u64) {
    gamma_tests::probe::pumped(&s.admin_get("/metrics").unwrap())
}

/// One upgraded (WebSocket) connection from `from` to catalog, a few messages echoed through the
/// agent's pump; returns how the agent pumped it: (spliced, copied).
fn upgraded_connection(s: &Scenario, from: &SimPod) -> (u64, u64) {
    let vip = s.cluster.resolve("catalog", "products").unwrap();
    let spec = gamma_tests::load::LoadSpec {
        target: (vip, 80).into(),
        host: "catalog.products".into(),
        path: "/upgrade".into(),
        duration_ms: 400,
        keep_alive: 0,
        idle_keep_alive: 0,
        idle_pause_ms: 0,
        new_connection: 0,
        http2: 0,
        long_lived: 1,
        expect_header: None,
    };
    let before = pumped(s);
    let output = s
        .pod(from)
        .unwrap()
        .run_output(
            std::process::Command::new(gamma_tests::scenario::binary("gamma-load"))
                .arg("--json")
                .arg(serde_json::to_string(&spec).unwrap()),
            Duration::from_secs(20),
        )
        .unwrap();
    let report: gamma_tests::load::LoadReport = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&output.stdout)));
    assert!(
        report.long_lived_kept == 1 && report.long_lived_bytes > 0 && report.failed == 0,
        "{report:?}"
    );
    let after = pumped(s);
    (after.0 - before.0, after.1 - before.1)
}

fn agent_requests(s: &Scenario) -> u64 {
    let metrics = s.admin_get("/metrics").unwrap();
    metrics
        .lines()
        .filter(|l| l.starts_with("gamma_requests_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[test]
fn mesh_vip_is_redirected_with_destination_caller_and_peer() {
    let Some(s) = scenario("mesh_vip_is_redirected_with_destination_caller_and_peer") else {
        return;
    };
    let answers = call(&s, &client(&s, "ui-backend"), "catalog", 10);
    let vip = s.cluster.resolve("catalog", "products").unwrap();
    for a in &answers {
        assert_eq!(a.status, 200, "{a:?}");
        assert_eq!(
            a.peer.as_deref(),
            Some(format!("{vip}:80").as_str()),
            "getpeername shows the VIP"
        );
    }
    assert_eq!(
        flagged(&answers),
        10,
        "the consumer route of the caller's namespace applied"
    );
    assert_eq!(agent_requests(&s), 10, "all went through the agent");
    // The kernel programs counted each steered connect and each getpeername they answered.
    assert_eq!(counter(&s, "gamma_kernel_connects_steered_total"), 10);
    assert!(counter(&s, "gamma_kernel_getpeername_rewrites_total") >= 10);
    assert_eq!(counter(&s, "gamma_kernel_record_failures_total"), 0);
    let dump = s.admin_get("/config_dump").unwrap();
    assert!(dump.contains("\"ui-backend\""), "caller namespace known");
}

/// Dual-stack: a connection to a Service's IPv6 ClusterIP goes to the agent's IPv6 listener,
/// and its caller is known by its pod's IPv6 address (the consumer route of its namespace, not
/// of another's). The IPv6 Service CIDR has no kube-proxy here: a connection not steered fails.
#[test]
fn an_ipv6_cluster_ip_is_steered_to_the_agents_ipv6_listener() {
    let test = "an_ipv6_cluster_ip_is_steered_to_the_agents_ipv6_listener";
    let Some(s) = scenario_of(test, &[], SimCluster::dual_stack) else {
        return;
    };
    let vip6 = s.cluster.resolve6("catalog", "products").unwrap();
    let to_vip6 = |r: &mut ClientRequest| r.url = format!("http://[{vip6}]:80/items");
    let answers = call_with(&s, &client(&s, "ui-backend"), "catalog", 5, to_vip6);
    for a in &answers {
        assert_eq!(a.status, 200, "{a:?}");
        let peer = format!("[{vip6}]:80");
        assert_eq!(a.peer.as_deref(), Some(peer.as_str()), "getpeername");
    }
    assert_eq!(flagged(&answers), 5, "ui-backend's consumer route");
    let answers = call_with(&s, &client(&s, "products"), "catalog", 5, to_vip6);
    assert!(answers.iter().all(|a| a.status == 200), "{answers:?}");
    assert_eq!(flagged(&answers), 0, "not ui-backend's route");
    // And the IPv4 ClusterIP as before, also from an IPv6 socket (connect6 with the v4-mapped
    // address, sent to the IPv4 listener).
    let answers = call(&s, &client(&s, "ui-backend"), "catalog", 2);
    assert_eq!(flagged(&answers), 2, "{answers:?}");
    let vip4 = s.cluster.resolve("catalog", "products").unwrap();
    let to_mapped = |r: &mut ClientRequest| r.url = format!("http://[::ffff:{vip4}]:80/items");
    let answers = call_with(&s, &client(&s, "ui-backend"), "catalog", 2, to_mapped);
    assert_eq!(flagged(&answers), 2, "{answers:?}");
    let mapped_peer = format!("[::ffff:{vip4}]:80");
    assert!(
        answers
            .iter()
            .all(|a| a.peer.as_deref() == Some(mapped_peer.as_str())),
        "{answers:?}"
    );
    // `catalog` has ui-backend's consumer route only, on a port declared HTTP: products' calls
    // were steered and parsed too (a route for them that comes later applies to their open
    // connections), served without routes.
    assert_eq!(agent_requests(&s), 14);
    assert_eq!(counter(&s, "gamma_kernel_record_failures_total"), 0);
}

/// `status.hostIPs` may name an address of the other family that the node does not have (an
/// ExternalIP): the agent serves on with the first, and counts the frontends it cannot steer.
#[test]
fn a_second_address_the_node_lacks_leaves_the_first_serving() {
    let name = "a_second_address_the_node_lacks_leaves_the_first_serving";
    let Some(mut s) = scenario_of(name, &[], SimCluster::dual_stack) else {
        return;
    };
    let port = gamma_tests::scenario::REDIRECT_PORT;
    let agent = gamma_tests::node::AGENT_ADDR;
    s.redirect_override = Some(format!("{agent},fd00:dead::1:{port}"));
    s.restart_agent_cold().unwrap();
    let answers = call(&s, &client(&s, "ui-backend"), "catalog", 3);
    assert_eq!(flagged(&answers), 3, "{answers:?}");
    // catalog's IPv6 ClusterIP:80, which has routes, is left to kube-proxy.
    assert_eq!(counter(&s, "gamma_redirect_frontends_without_listener"), 1);
}

/// On a cluster with no ClusterIP of the second family, the agent does not listen on the node's
/// address of it (an IPv4 cluster's node may report a public IPv6 address). When a Service gets
/// one (a dual-stack cluster's first dual-stack Service), the agent opens its listeners and steers
/// it, without a restart; a successor takes them over with the others.
#[test]
fn the_second_familys_listener_opens_with_its_first_cluster_ip() {
    let name = "the_second_familys_listener_opens_with_its_first_cluster_ip";
    let Some((_dir, mut s)) = scenario_taken_over(name, SimCluster::dual_stack_pods) else {
        return;
    };
    let ui = client(&s, "ui-backend");
    assert_eq!(flagged(&call(&s, &ui, "catalog", 2)), 2);
    let (agent6, port) = (
        gamma_tests::node::AGENT_ADDR6,
        gamma_tests::scenario::REDIRECT_PORT,
    );
    let dial_agent6 = |s: &Scenario| {
        s.node
            .in_netns(|| std::net::TcpStream::connect((agent6, port)).map(|_| ()))
            .unwrap()
            .map_err(|e| e.kind())
    };
    assert_eq!(
        dial_agent6(&s),
        Err(std::io::ErrorKind::ConnectionRefused),
        "nothing listens on the IPv6 address"
    );
    assert_eq!(counter(&s, "gamma_redirect_frontends_without_listener"), 0);
    let ipv4_frontends = counter(&s, "gamma_kernel_mesh_frontends");
    assert!(ipv4_frontends > 0);

    s.cluster = s.cluster.clone().dual_stack_services();
    let manifests = to_yaml(&s.cluster.manifests());
    s.apply("cluster.yaml", &manifests).unwrap();
    gamma_tests::eventually_within(
        gamma_tests::harness_timeout(Duration::from_secs(5)),
        "the agent steers the IPv6 ClusterIPs too",
        || (counter(&s, "gamma_kernel_mesh_frontends") == 2 * ipv4_frontends).then_some(()),
    );
    assert_eq!(dial_agent6(&s), Ok(()), "the IPv6 listener is open");
    let vip6 = s.cluster.resolve6("catalog", "products").unwrap();
    let to_vip6 = |r: &mut ClientRequest| r.url = format!("http://[{vip6}]:80/items");
    let answers = call_with(&s, &ui, "catalog", 3, to_vip6);
    assert_eq!(
        flagged(&answers),
        3,
        "steered, with the consumer route: {answers:?}"
    );
    assert_eq!(counter(&s, "gamma_redirect_frontends_without_listener"), 0);

    s.take_over_agent(&[]).unwrap();
    let answers = call_with(&s, &ui, "catalog", 3, to_vip6);
    assert_eq!(flagged(&answers), 3, "after a takeover: {answers:?}");
    assert_eq!(flagged(&call(&s, &ui, "catalog", 2)), 2, "and IPv4 still");
}

/// A node made dual-stack under an agent that listened on its IPv4 address only: its successor
/// takes over (its programs swapped in, as they steer to a listener the old ones do not know)
/// and steers IPv6 ClusterIPs too.
#[test]
fn an_agent_listening_on_ipv4_only_is_taken_over_by_a_dual_stack_one() {
    let name = "an_agent_listening_on_ipv4_only_is_taken_over_by_a_dual_stack_one";
    let Some((_dir, mut s)) = scenario_taken_over(name, SimCluster::dual_stack) else {
        return;
    };
    let ui = client(&s, "ui-backend");
    let ipv4_only = format!(
        "{}:{}",
        gamma_tests::node::AGENT_ADDR,
        gamma_tests::scenario::REDIRECT_PORT
    );
    s.redirect_override = Some(ipv4_only);
    s.restart_agent_cold().unwrap();
    assert_eq!(flagged(&call(&s, &ui, "catalog", 2)), 2, "IPv4 as before");
    s.redirect_override = None;
    s.take_over_agent(&[]).unwrap();
    let vip6 = s.cluster.resolve6("catalog", "products").unwrap();
    let to_vip6 = |r: &mut ClientRequest| r.url = format!("http://[{vip6}]:80/items");
    let answers = call_with(&s, &ui, "catalog", 3, to_vip6);
    assert_eq!(flagged(&answers), 3, "{answers:?}");
    assert_eq!(flagged(&call(&s, &ui, "catalog", 2)), 2, "and IPv4 still");
}

/// A caller in the ui-backend pod that connects to catalog and sends its request only when told
/// to ([`SilentCaller::send`]).
struct SilentCaller {
    process: std::process::Child,
    lines: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
}

impl SilentCaller {
    /// Connected once this returns.
    fn connect(s: &Scenario) -> SilentCaller {
        use std::io::BufRead as _;
        let vip = s.cluster.resolve("catalog", "products").unwrap();
        let ui = s.pod(&client(s, "ui-backend")).unwrap().clone();
        let script = format!(
            "import socket, sys\n\
             c = socket.create_connection(('{vip}', 80), timeout=10)\n\
             print('connected', flush=True)\n\
             sys.stdin.readline()\n\
             c.sendall(b'GET /items HTTP/1.1\\r\\nHost: catalog\\r\\nConnection: close\\r\\n\\r\\n')\n\
             answer = b''\n\
             while chunk := c.recv(65536): answer += chunk\n\
             print(answer.decode(errors='replace'), flush=True)\n"
        );
        let mut process = ui
            .spawn(
                std::process::Command::new("python3")
                    .args(["-c", &script])
                    .stdin(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::piped()),
            )
            .unwrap();
        let mut lines = std::io::BufReader::new(process.stdout.take().unwrap()).lines();
        assert_eq!(lines.next().unwrap().unwrap(), "connected");
        SilentCaller { process, lines }
    }

    /// Sends the request; the answer's lines.
    fn send(mut self) -> Vec<String> {
        use std::io::Write as _;
        writeln!(self.process.stdin.take().unwrap()).unwrap();
        let answer = self.lines.by_ref().map_while(Result::ok).collect();
        let _ = self.process.wait();
        answer
    }
}

/// A connection to a Service port that declares HTTP (catalog's is named `http`) is steered to
/// the agent's client-first listener, where it waits in the kernel until its request comes (the
/// agent is woken once, with the request there), and is then served as any other.
#[test]
fn a_port_declaring_http_is_accepted_with_its_first_bytes() {
    let Some(s) = scenario("a_port_declaring_http_is_accepted_with_its_first_bytes") else {
        return;
    };
    let caller = SilentCaller::connect(&s);
    let client_first_port = gamma_tests::scenario::REDIRECT_PORT + 1;
    let waiting = |state: &str| {
        let output = s
            .node
            .run_output(
                std::process::Command::new("ss").args([
                    "-Htn",
                    "state",
                    state,
                    &format!("( sport = :{client_first_port} )"),
                ]),
                Duration::from_secs(5),
            )
            .unwrap();
        String::from_utf8(output.stdout).unwrap().lines().count()
    };
    // Connected on the caller's side, not yet on the agent's: the kernel holds it.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(waiting("syn-recv"), 1, "held at the client-first listener");
    assert_eq!(counter(&s, "gamma_connections_accepted_total"), 0);
    let answer = caller.send();
    assert!(answer[0].starts_with("HTTP/1.1 200"), "{answer:?}");
    assert!(
        answer.iter().any(|l| l.contains("x-dev-feature")),
        "the caller's consumer route applied: {answer:?}"
    );
    assert_eq!(counter(&s, "gamma_connections_accepted_total"), 1);
    assert_eq!(
        counter(&s, "gamma_kernel_connects_steered_client_first_total"),
        1
    );
}

/// A successor without the running agent's client-first listener (`--redirect-http off` here;
/// another address, or an older version) serves what that listener holds from before its
/// programs were swapped in: a connection still waiting for its first bytes there is answered,
/// not reset when the listener closes.
#[test]
fn a_successor_without_the_client_first_listener_serves_what_it_held() {
    let name = "a_successor_without_the_client_first_listener_serves_what_it_held";
    let Some((_dir, mut s)) = scenario_taken_over(name, |cluster| cluster) else {
        return;
    };
    let caller = SilentCaller::connect(&s);
    s.take_over_agent(&["--redirect-http", "off"]).unwrap();
    let answer = caller.send();
    assert!(
        answer
            .first()
            .is_some_and(|l| l.starts_with("HTTP/1.1 200")),
        "{answer:?}"
    );
    assert!(
        answer.iter().any(|l| l.contains("x-dev-feature")),
        "the caller's consumer route applied: {answer:?}"
    );
}

#[test]
fn vip_without_routes_is_left_to_kube_proxy() {
    let Some(s) = scenario("vip_without_routes_is_left_to_kube_proxy") else {
        return;
    };
    let answers = call(&s, &client(&s, "ui-backend"), "catalog-v1", 10);
    assert!(
        answers
            .iter()
            .all(|a| a.status == 200 && a.pod.starts_with("catalog-v1")),
        "{answers:?}"
    );
    assert_eq!(flagged(&answers), 0);
    assert_eq!(agent_requests(&s), 0, "the agent saw none of it");
}

#[test]
fn agent_down_fails_open_and_restart_resumes() {
    let Some(mut s) = scenario("agent_down_fails_open_and_restart_resumes") else {
        return;
    };
    let ui = client(&s, "ui-backend");
    assert_eq!(flagged(&call(&s, &ui, "catalog", 5)), 5);
    s.kill_agent();
    // Fail open: the very next calls reach catalog through kube-proxy, unmodified (no wait:
    // the agent's listener is gone with it, and the programs leave what they cannot steer).
    let answers = call(&s, &ui, "catalog", 5);
    assert!(answers.iter().all(|a| a.status == 200), "{answers:?}");
    assert_eq!(flagged(&answers), 0);
    s.start_agent().unwrap();
    assert_eq!(
        flagged(&call(&s, &ui, "catalog", 5)),
        5,
        "redirection resumed"
    );
    // The restarted agent loaded its programs afresh: they counted its 5 connects only (those
    // made while no agent ran met no program at all).
    assert_eq!(counter(&s, "gamma_kernel_connects_steered_total"), 5);
    assert_eq!(counter(&s, "gamma_kernel_connects_agent_gone_total"), 0);
}

#[test]
fn two_rounds_of_sequential_connections_all_succeed() {
    let Some(s) = scenario("two_rounds_of_sequential_connections_all_succeed") else {
        return;
    };
    let ui = client(&s, "ui-backend");
    for round in 1..=2 {
        let answers = call(&s, &ui, "catalog", 2_000);
        let failed: Vec<_> = answers.iter().filter(|a| a.status != 200).collect();
        assert!(
            failed.is_empty(),
            "round {round}: {} failed, e.g. {:?}",
            failed.len(),
            failed.first()
        );
        assert_eq!(flagged(&answers), 2_000);
    }
}

#[test]
fn a_process_using_another_pods_ip_gets_no_consumer_routes() {
    let Some(s) = scenario("a_process_using_another_pods_ip_gets_no_consumer_routes") else {
        return;
    };
    let ui = client(&s, "ui-backend");
    let products = client(&s, "products");
    let vip = s.cluster.resolve("catalog", "products").unwrap();
    let request = ClientRequest {
        url: format!("http://{vip}:80/"),
        method: "GET".into(),
        count: 5,
        ..Default::default()
    };
    // From ui-backend's IP, but a process of the products pod's cgroup.
    let answers = s.request_impersonating(&ui, &products, &request).unwrap();
    assert!(answers.iter().all(|a| a.status == 200), "{answers:?}");
    assert_eq!(
        flagged(&answers),
        0,
        "the ui-backend consumer route must not apply to an impostor"
    );
    assert_eq!(
        flagged(&s.request(&ui, &request).unwrap()),
        5,
        "the real pod still gets it"
    );
}

#[test]
fn a_reused_source_port_carries_no_identity_over() {
    let Some(s) = scenario("a_reused_source_port_carries_no_identity_over") else {
        return;
    };
    let ui = client(&s, "ui-backend");
    let products = client(&s, "products");
    let vip = s.cluster.resolve("catalog", "products").unwrap();
    let from_port = |url: String| ClientRequest {
        url,
        method: "GET".into(),
        count: 1,
        source_port: Some(41_234),
        ..Default::default()
    };
    let via_vip = from_port(format!("http://{vip}:80/"));
    let real = |what: &str| {
        let answers = s.request(&ui, &via_vip).unwrap();
        assert_eq!(
            flagged(&answers),
            1,
            "{what}: the real pod gets its route: {answers:?}"
        );
    };
    let impostor =
        |request: &ClientRequest| s.request_impersonating(&ui, &products, request).unwrap();

    // The same ip:port, alternately the pod's and an impostor's: each connection is judged by the
    // cgroup that made it, not by what the port carried before.
    real("first");
    let answers = impostor(&via_vip);
    assert!(
        answers[0].status == 200 && flagged(&answers) == 0,
        "impostor after the pod: {answers:?}"
    );
    real("after the impostor");
    // Straight to the agent's redirect port, from the port the pod just used: no record of its
    // own, and none left over from the pod's connection (taken when the agent accepted it).
    let direct = from_port(format!(
        "http://{}:{}/",
        gamma_tests::node::AGENT_ADDR,
        gamma_tests::scenario::REDIRECT_PORT
    ));
    let answers = impostor(&direct);
    assert!(
        answers[0].status == 0 && answers[0].error.is_some(),
        "a connection without a redirect record is closed unanswered: {answers:?}"
    );
    real("last");
}

/// The running kernel's (major, minor), from /proc/sys/kernel/osrelease: an oracle independent of
/// the agent's own probes.
fn kernel_version() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut parts = release.trim().split(['.', '-']).map(|p| p.parse().unwrap());
    (parts.next().unwrap(), parts.next().unwrap())
}

#[test]
fn redirect_follows_what_the_kernel_supports() {
    let Some(s) = scenario("redirect_follows_what_the_kernel_supports") else {
        return;
    };
    let answers = call(&s, &client(&s, "ui-backend"), "catalog", 5);
    assert!(
        answers
            .iter()
            .all(|a| a.status == 200 && a.pod.starts_with("catalog")),
        "{answers:?}"
    );
    let ready = s.admin_get("/ready").unwrap();
    let metrics = s.admin_get("/metrics").unwrap();
    let missing: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("gamma_redirect_missing_kernel_feature{"))
        .collect();
    // Lookup-and-delete on LRU maps, the newest feature the redirect needs, came in 5.14.
    if kernel_version() >= (5, 14) {
        assert_eq!(flagged(&answers), 5, "redirected: {answers:?}");
        assert_eq!(ready, "ready\n");
        assert!(missing.is_empty(), "{missing:?}");
    } else {
        assert_eq!(flagged(&answers), 0, "no mesh route without the redirect");
        assert_eq!(
            agent_requests(&s),
            0,
            "kube-proxy carried it, not the agent"
        );
        assert!(
            ready.starts_with("ready, without the kernel redirect")
                && ready.contains("lookup-and-delete on LRU hash maps (Linux 5.14)"),
            "{ready}"
        );
        assert!(
            missing
                .iter()
                .any(|l| l.contains("lookup-and-delete") && l.contains("since=\"5.14\"")),
            "{missing:?}"
        );
    }
}

#[test]
fn local_sockets_move_the_bytes_of_connections_through_the_agent() {
    let test = "local_sockets_move_the_bytes_of_connections_through_the_agent";
    let Some(s) = scenario_with(test, &["--local-sockets"]) else {
        return;
    };
    let ui = client(&s, "ui-backend");
    // No pod opted in: nothing pairs, and the pumps splice.
    assert_eq!(counter(&s, "gamma_kernel_local_pods"), 0);
    assert_eq!(upgraded_connection(&s, &ui), (1, 0), "spliced");
    // Every pod of the node opts in, by its Namespace's annotation, and the agent tells the
    // programs so.
    let namespaces: std::collections::BTreeSet<_> =
        s.cluster.pods.iter().map(|p| p.namespace.clone()).collect();
    let opted_in: Vec<_> = namespaces
        .iter()
        .map(|name| {
            serde_json::json!({
                "apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": name, "annotations": {LOCAL_SOCKETS_ANNOTATION: "true"}},
            })
        })
        .collect();
    s.apply("namespaces.yaml", &to_yaml(&opted_in)).unwrap();
    wait_for_local_pods(&s, s.cluster.pods.len() as u64);
    let caller = s.pod(&ui).unwrap();
    let others: Vec<_> = s.pods_except(&ui);
    let segments = |pods: &[&gamma_tests::node::Pod]| -> u64 {
        pods.iter().map(|p| tcp_segments_sent(p)).sum()
    };
    // Over TCP, each of the 50 requests is a segment at least from the caller, and each answer one
    // from a backend pod; paired, only the handshakes and the closes are. A connection whose first
    // send raced its peer's handshake keeps TCP (rare, and allowed): a few tries until `paired`
    // says the (caller, backend pods) segments are as expected.
    let tries = |paired: &dyn Fn(u64, u64) -> bool| {
        let mut kept_alive = Vec::new();
        let mut sent = Vec::new();
        for _ in 0..3 {
            let before = (segments(&[caller]), segments(&others));
            kept_alive = call_with(&s, &ui, "catalog", 50, |r| r.keep_alive = true);
            let after = (segments(&[caller]), segments(&others));
            sent.push((after.0 - before.0, after.1 - before.1));
            if paired(after.0 - before.0, after.1 - before.1) {
                break;
            }
        }
        (kept_alive, sent)
    };
    let (kept_alive, sent) = tries(&|caller, backends| caller < 20 && backends < 20);
    assert!(
        sent.iter()
            .any(|&(caller, backends)| caller < 20 && backends < 20),
        "TCP segments (caller, backend pods) for 50 requests on one connection, per try: {sent:?}"
    );
    let new_connections = call(&s, &ui, "catalog", 20);
    let grpc = call_with(&s, &ui, "catalog", 10, |r| r.grpc = true);
    for answers in [&kept_alive, &new_connections, &grpc] {
        assert!(
            answers.iter().all(|a| a.status == 200),
            "{:?}",
            answers.iter().find(|a| a.status != 200)
        );
        assert_eq!(
            flagged(answers),
            answers.len(),
            "the consumer route applied"
        );
    }
    // And the upgrade's request before the pods opted in.
    let requests = 50 * sent.len() as u64 + 30 + 1;
    assert_eq!(agent_requests(&s), requests, "all went through the agent");
    // A pair per connection to the agent (one per try, 20, 1) and per connection to a backend.
    let pairs = counter(&s, "gamma_kernel_local_pairs_total");
    assert!(
        pairs >= sent.len() as u64 + 22,
        "{pairs} connections paired"
    );
    assert_eq!(
        upgraded_connection(&s, &ui),
        (0, 1),
        "copied: its sockets pair"
    );
    // The caller's pod opts out by its own annotation, which wins over its Namespace's: its
    // connections to the agent take TCP again (the agent's to the backend pods still pair, new
    // ones too).
    let opted_out = s.cluster.clone().with_local_sockets(Some(&ui));
    s.apply("cluster.yaml", &to_yaml(&opted_out.manifests()))
        .unwrap();
    wait_for_local_pods(&s, s.cluster.pods.len() as u64 - 1);
    let (answers, sent) = tries(&|caller, backends| caller >= 50 && backends < 20);
    assert!(answers.iter().all(|a| a.status == 200));
    assert_eq!(
        flagged(&answers),
        answers.len(),
        "the consumer route applied"
    );
    assert!(
        sent.iter().all(|&(caller, _)| caller >= 50)
            && sent.iter().any(|&(_, backends)| backends < 20),
        "TCP segments (caller, backend pods) for 50 requests on one connection, per try: {sent:?}"
    );
    assert_eq!(
        upgraded_connection(&s, &ui),
        (0, 1),
        "copied: the agent's socket to the backend pod pairs"
    );
}

/// Waits until the agent has told the kernel programs `pods` opted-in pods.
fn wait_for_local_pods(s: &Scenario, pods: u64) {
    gamma_tests::eventually_within(
        gamma_tests::harness_timeout(Duration::from_secs(5)),
        "the agent tells the programs which pods opted in",
        || (counter(s, "gamma_kernel_local_pods") == pods).then_some(()),
    );
}
