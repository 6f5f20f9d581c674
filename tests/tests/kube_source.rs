//! `proxy-agent --kube` (the real binary, its real kube-rs client) against the in-process fake
//! API server: every kind reaches the table and leaves it; a deletion inside a watch gap is found
//! by the relist after 410; an outage keeps the last good table served while `/ready` and a
//! metric say since when it is stale; Gateway API CRDs installed after the agent started; the
//! exact route status patches, written only when they change, only by the lease holder; a
//! leader handover and a demotion; and the API calls made are exactly those `--print-rbac`
//! declares. Everything on 127.0.0.1; every wait bounded at 10 s.

use gamma_tests::fake_apiserver::{FakeApiServer, Recorded};
use gamma_tests::kube_world::*;
use gamma_tests::loopback::{agent_binary, echo_backend, http_get_full, TempDir};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

const CONTROLLER: &str = "gamma-node.dev/agent";
const LEASE: &str = "gamma-node-status";

/// Another controller's entry in a route's status, which we must leave alone.
fn foreign_entry() -> Value {
    json!({
        "parentRef": {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "edge"},
        "controllerName": "example.com/gateway-controller",
        "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted", "message": "",
                        "observedGeneration": 1, "lastTransitionTime": "2024-05-05T05:05:05Z"}],
    })
}

/// `front` (routed to `back` by HTTPRoute `to-back`), `back` with one endpoint (the echo
/// backend), a Pod on this node and one on another.
fn seed(api: &FakeApiServer, echo: SocketAddr) {
    api.apply(service("front", "10.96.0.10", 8080, None));
    api.apply(service("back", "10.96.0.11", echo.port(), None));
    api.apply(slice("back", echo));
    api.apply(pod("client", "node-a", "10.244.0.5"));
    api.apply(pod("far", "node-b", "10.244.1.5"));
    api.apply(route("HTTPRoute", "to-back", "front", "back"));
}

// --- reading what the API server received ------------------------------------------------

/// Route status writes (not the XMesh's).
fn status_patches(requests: &[Recorded]) -> Vec<&Recorded> {
    requests
        .iter()
        .filter(|r| r.verb == "patch" && r.resource.ends_with("routes/status"))
        .collect()
}

fn our_entry(parents: &Value) -> &Value {
    parents
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["controllerName"] == CONTROLLER)
        .expect("our entry")
}

fn condition<'a>(entry: &'a Value, type_: &str) -> &'a Value {
    entry["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == type_)
        .unwrap_or_else(|| panic!("no {type_} condition in {entry}"))
}

/// Waits for the agent `identity`, a candidate that saw the lease held, to take it once
/// released: it looks again within half a lease duration (7.5 s) and its jitter. Returns how
/// long that took.
fn takes_the_released_lease(api: &FakeApiServer, identity: &str) -> Duration {
    let what = format!("{identity} holds the lease");
    gamma_tests::eventually_within(Duration::from_secs(15), &what, || {
        (lease_holder(api).as_deref() == Some(identity)).then_some(())
    })
    .1
}

fn lease_holder(api: &FakeApiServer) -> Option<String> {
    api.get("leases", LEASE_NS, LEASE)?["spec"]["holderIdentity"]
        .as_str()
        .map(str::to_string)
}

// --- tests -------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_kind_reaches_the_table_and_leaves_it() {
    let api = FakeApiServer::start().await;
    let back = echo_backend([127, 0, 0, 1], "back").await;
    seed(&api, back.addr);
    let agent = KubeAgent::start(&api, "node-a", "a");

    // The first table is complete: Services, endpoints, this node's Pods only, the route.
    let dump = agent.dump();
    assert_eq!(
        services(&dump),
        BTreeSet::from(["back".into(), "front".into()])
    );
    assert_eq!(endpoints_of(&dump, "back"), vec![back.addr.to_string()]);
    assert_eq!(callers(&dump), BTreeSet::from(["10.244.0.5".to_string()]));
    assert!(routes(&dump).contains("HTTPRoute shop/to-back"), "{dump}");
    assert_eq!(agent.answered_by().as_deref(), Some("back"));
    let pods = api
        .requests()
        .into_iter()
        .find(|r| r.resource == "pods" && r.verb == "list")
        .unwrap();
    assert_eq!(pods.query["fieldSelector"], "spec.nodeName=node-a");
    // Listed from the API server's cache, whole (at resourceVersion 0, as the kubelet lists
    // them), not from etcd.
    assert_eq!(
        pods.query.get("resourceVersion").map(String::as_str),
        Some("0")
    );
    assert_eq!(pods.query.get("limit"), None);

    // Adds, per kind.
    api.apply(service(
        "rpc",
        "10.96.0.12",
        9090,
        Some("kubernetes.io/h2c"),
    ));
    api.apply(route("GRPCRoute", "rpc-to-back", "rpc", "back"));
    api.apply(pod("client-2", "node-a", "10.244.0.6"));
    let took = table(&agent, "Service, GRPCRoute and Pod added", |d| {
        services(d).contains("rpc")
            && routes(d).contains("GRPCRoute shop/rpc-to-back")
            && callers(d).contains("10.244.0.6")
    });
    eprintln!("timing: additions in the table {took:?} after the API server had them");

    // A Namespace opts its pods in to local sockets; deleted, it no longer does.
    let local_sockets = |d: &Value| d["callers"]["10.244.0.6"]["local_sockets"] == true;
    api.apply(json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": NS, "annotations": {"gamma-node.io/local-sockets": "true"}},
    }));
    table(&agent, "the Namespace opted its pods in", local_sockets);
    api.delete("namespaces", "", NS);
    table(&agent, "the Namespace is gone", |d| !local_sockets(d));

    // An invalid version of an object: rejected with its name and field, the last good one
    // stays.
    let mut broken = service("rpc", "10.96.0.12", 9090, None);
    broken["spec"]["ports"][0]["port"] = 0.into();
    api.apply(broken);
    eventually("the invalid Service is reported", || {
        let log = agent.log();
        (log.contains("Service shop/rpc") && log.contains("spec.ports[0].port")).then_some(())
    });
    assert!(services(&agent.dump()).contains("rpc"));

    // Deletes, per kind.
    api.delete("httproutes", NS, "to-back");
    api.delete("grpcroutes", NS, "rpc-to-back");
    api.delete("endpointslices", NS, "back-1");
    api.delete("pods", NS, "client");
    api.delete("services", NS, "rpc");
    let took = table(&agent, "every deletion applied", |d| {
        routes(d).is_empty()
            && endpoints_of(d, "back").is_empty()
            && !callers(d).contains("10.244.0.5")
            && !services(d).contains("rpc")
    });
    eprintln!("timing: deletions in the table {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_inside_a_watch_gap_is_found_by_the_relist() {
    let api = FakeApiServer::start().await;
    let back = echo_backend([127, 0, 0, 1], "back").await;
    seed(&api, back.addr);
    api.apply(service("doomed", "10.96.0.13", 80, None));
    let agent = KubeAgent::start(&api, "node-a", "a");
    assert!(services(&agent.dump()).contains("doomed"));

    let lists_before = api
        .requests()
        .iter()
        .filter(|r| r.resource == "services" && r.verb == "list")
        .count();
    // The Services watch ends, `doomed` is deleted with no watch to see it, and history is
    // compacted: resuming answers 410 Expired, so the agent must list again.
    api.delete_during_gap("services", NS, "doomed");
    let took = table(&agent, "the Service deleted during the gap is gone", |d| {
        !services(d).contains("doomed")
    });
    eprintln!("timing: deletion inside a watch gap gone {took:?} after the gap");
    let requests = api.requests();
    let expired = requests.iter().any(|r| {
        r.resource == "services" && r.verb == "watch" && r.query.contains_key("resourceVersion")
    });
    let lists_after = requests
        .iter()
        .filter(|r| r.resource == "services" && r.verb == "list")
        .count();
    assert!(expired && lists_after > lists_before, "relisted after 410");
    // Nothing else moved.
    let dump = agent.dump();
    assert_eq!(
        services(&dump),
        BTreeSet::from(["back".into(), "front".into()])
    );
    assert!(routes(&dump).contains("HTTPRoute shop/to-back"));
    assert_eq!(agent.answered_by().as_deref(), Some("back"));
    // Current again once its watch resumes: a resume can meet a 410 once more (the history was
    // compacted past the relist's version), and the feed reads stale until it lists again.
    gamma_tests::eventually_within(Duration::from_secs(10), "ready, current again", || {
        (agent.ready() == (200, "ready\n".to_string())).then_some(())
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_keeps_the_last_table_and_reports_since_when_it_is_stale() {
    let api = FakeApiServer::start().await;
    let back = echo_backend([127, 0, 0, 1], "back").await;
    let other = echo_backend([127, 0, 0, 1], "other").await;
    seed(&api, back.addr);
    api.apply(service("other", "10.96.0.14", other.addr.port(), None));
    api.apply(slice("other", other.addr));
    let agent = KubeAgent::start(&api, "node-a", "a");
    assert_eq!(
        agent.metric("gamma_source_stale_since_timestamp_seconds"),
        Some(0.0)
    );

    let down_at = Instant::now();
    api.go_down().await;
    let (body, took) = eventually("/ready reports the table stale", || {
        let (status, body) = agent.ready();
        (status == 200 && body.contains("stale since")).then_some(body)
    });
    eprintln!("timing: stale reported {took:?} after the API server went down ({body:?})");
    let since = agent
        .metric("gamma_source_stale_since_timestamp_seconds")
        .unwrap();
    assert!(since > 1.7e9, "the metric gives a Unix time: {since}");
    // The last good table is still served.
    assert_eq!(agent.answered_by().as_deref(), Some("back"));
    assert!(routes(&agent.dump()).contains("HTTPRoute shop/to-back"));

    // Changes made while the agent could not see them arrive after recovery.
    api.apply(route("HTTPRoute", "to-back", "front", "other"));
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(
        agent.answered_by().as_deref(),
        Some("back"),
        "still the last good table"
    );
    api.come_back().await;
    let back_at = Instant::now();
    let (_, took) = eventually(
        "fresh again, with the change made during the outage",
        || {
            (agent.ready() == (200, "ready\n".to_string())
                && agent.answered_by().as_deref() == Some("other"))
            .then_some(())
        },
    );
    eprintln!(
        "timing: fresh {took:?} after the API server came back (outage {:?})",
        back_at - down_at
    );
    assert_eq!(
        agent.metric("gamma_source_stale_since_timestamp_seconds"),
        Some(0.0)
    );
    assert!(agent
        .log()
        .contains("the API server is unreachable or failing"));
}

/// A watch refused right after its list (a role granting list but not watch, a proxy cutting
/// streams, the API server's priority and fairness answering 429) keeps backing off: each retry
/// lists the whole kind again, from every node. And its staleness counts from the outage's
/// start, not from the last list. Before, each list reset the backoff: a full list a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_refused_after_its_list_backs_off_and_stays_stale() {
    let api = FakeApiServer::start().await;
    let back = echo_backend([127, 0, 0, 1], "back").await;
    seed(&api, back.addr);
    let agent = KubeAgent::start(&api, "node-a", "a");
    let lists = |api: &FakeApiServer| {
        api.requests()
            .iter()
            .filter(|r| r.verb == "list" && r.resource == "services")
            .count()
    };
    api.refuse_watches("services", true);
    let before = lists(&api);
    let (since, _) = eventually("the table reported stale", || {
        agent
            .metric("gamma_source_stale_since_timestamp_seconds")
            .filter(|since| *since > 0.0)
    });
    std::thread::sleep(Duration::from_secs(12));
    let relists = lists(&api) - before;
    // Backing off 0.8, 1.6, 3.2, 6.4 s (with jitter): about four; a list a second made twelve.
    assert!((2..=6).contains(&relists), "{relists} lists in 12 s");
    assert_eq!(
        agent.metric("gamma_source_stale_since_timestamp_seconds"),
        Some(since),
        "stale since the outage's start"
    );
    assert_eq!(agent.answered_by().as_deref(), Some("back"), "still served");
    api.refuse_watches("services", false);
}

/// A list taken and never answered (the API server's host lost behind a VIP: nothing tells
/// the client) fails after `--api-read-timeout-s` and is retried; kube-rs sets no read timeout,
/// and the agent stayed not ready for ever, its kind never listed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_never_answered_is_given_up_and_retried() {
    let api = FakeApiServer::start().await;
    let back = echo_backend([127, 0, 0, 1], "back").await;
    seed(&api, back.addr);
    api.stall_lists("endpointslices", true);
    let dir = TempDir::new("kube-agent");
    let kubeconfig = api.kubeconfig(&dir.0, "a");
    let agent = KubeAgent::spawn_with(
        dir,
        &kubeconfig,
        "node-a",
        "node-a",
        &["--api-read-timeout-s", "2"],
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(agent.ready().0, 503, "the list is still waited for");
    api.stall_lists("endpointslices", false);
    let agent = agent.until_ready("node-a");
    assert_eq!(agent.answered_by().as_deref(), Some("back"));
}

/// SIGTERM while the first sync waits for the API server: the agent stops at once, having served
/// nothing. Its handler was installed only after the takeover; before it, a SIGTERM killed the
/// agent outside a container, and inside one (pid 1, whose signals without a handler are
/// ignored) waited for the SIGKILL at the end of the grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_the_first_sync_stops_the_agent() {
    let api = FakeApiServer::start().await;
    api.stall_lists("services", true);
    let mut agent = KubeAgent::spawn(&api, "node-a", "a");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(agent.ready().0, 503, "the list is still waited for");
    let exit = agent.terminate();
    assert!(exit.success(), "{exit:?}");
    assert!(
        agent
            .log()
            .contains("stopping before the first sync completed"),
        "{}",
        agent.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_are_picked_up_when_the_gateway_api_crds_appear() {
    let api = FakeApiServer::start().await;
    let back = echo_backend([127, 0, 0, 1], "back").await;
    api.set_served("httproutes", false);
    api.set_served("grpcroutes", false);
    api.apply(service("front", "10.96.0.10", 8080, None));
    api.apply(service("back", "10.96.0.11", back.addr.port(), None));
    api.apply(slice("back", back.addr));
    // Ready without the CRDs: Services are followed, no route exists.
    let agent = KubeAgent::start(&api, "node-a", "a");
    assert!(routes(&agent.dump()).is_empty());
    assert_eq!(
        agent.ready(),
        (200, "ready\n".to_string()),
        "absent CRDs are not staleness"
    );
    eventually("the log says the CRDs are missing", || {
        agent
            .log()
            .contains("the Gateway API CRDs are not installed")
            .then_some(())
    });

    api.set_served("httproutes", true);
    api.set_served("grpcroutes", true);
    api.apply(route("HTTPRoute", "to-back", "front", "back"));
    let took = table(&agent, "the route, once its CRD is served", |d| {
        routes(d).contains("HTTPRoute shop/to-back")
    });
    eprintln!("timing: route picked up {took:?} after the CRDs appeared");
    assert_eq!(agent.answered_by().as_deref(), Some("back"));

    // A 404 for a kind that was served (an API server starting up can answer so for a custom
    // resource it serves): its objects stay, and so does the route.
    api.set_served("httproutes", false);
    eventually("the log tells of the 404", || {
        agent.log().contains("which it served").then_some(())
    });
    assert!(routes(&agent.dump()).contains("HTTPRoute shop/to-back"));
    assert_eq!(agent.answered_by().as_deref(), Some("back"));
    // CRDs removed: the API server deletes their objects first (the watch reports them), then
    // stops serving the kind. The routes go, the rest stays.
    api.set_served("httproutes", true);
    api.delete("httproutes", "shop", "to-back");
    table(&agent, "routes gone with their CRD", |d| {
        routes(d).is_empty()
    });
    api.set_served("httproutes", false);
    assert!(services(&agent.dump()).contains("back"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_status_is_applied_once_per_change_and_keeps_other_controllers_entries() {
    let api = FakeApiServer::start().await;
    let back = echo_backend([127, 0, 0, 1], "back").await;
    seed(&api, back.addr);
    let mut with_foreign = route("HTTPRoute", "to-back", "front", "back");
    with_foreign["status"] = json!({"parents": [foreign_entry()]});
    let stored = api.apply(with_foreign);
    api.apply(service(
        "rpc",
        "10.96.0.12",
        9090,
        Some("kubernetes.io/h2c"),
    ));
    api.apply(route("GRPCRoute", "rpc-to-back", "rpc", "back"));
    // XMeshes (experimental): ours gets the supported features, another mesh's is left alone.
    for (name, controller) in [("gamma", CONTROLLER), ("other", "example.com/other-mesh")] {
        api.apply(json!({
            "apiVersion": "gateway.networking.x-k8s.io/v1alpha1", "kind": "XMesh",
            "metadata": {"name": name, "generation": 1},
            "spec": {"controllerName": controller},
        }));
    }
    // Its first XMesh write fails: it is made again without a change to the XMesh.
    api.refuse_next_status_patch("xmeshes", "", "gamma");
    let agent = KubeAgent::start(&api, "node-a", "a");

    let (patch, took) = eventually("the HTTPRoute status patch", || {
        api.requests()
            .into_iter()
            .find(|r| r.verb == "patch" && r.resource == "httproutes/status")
    });
    eprintln!("timing: first status patch {took:?} after ready");
    assert_eq!(patch.status, 200);
    assert_eq!(patch.query["fieldManager"], "gamma-node");
    assert_eq!(patch.query["force"], "true");
    assert_eq!(
        patch.content_type.as_deref(),
        Some("application/apply-patch+yaml")
    );
    assert_eq!(patch.name.as_deref(), Some("to-back"));
    let body = patch.body.as_ref().unwrap();
    assert_eq!(body["apiVersion"], "gateway.networking.k8s.io/v1");
    assert_eq!(body["kind"], "HTTPRoute");
    assert_eq!(
        body["metadata"]["resourceVersion"],
        stored["metadata"]["resourceVersion"]
    );
    let parents = &body["status"]["parents"];
    assert_eq!(parents.as_array().unwrap().len(), 2);
    assert_eq!(
        parents[0],
        foreign_entry(),
        "another controller's entry, untouched"
    );
    let ours = our_entry(parents);
    assert_eq!(
        ours["parentRef"],
        json!({"group": "", "kind": "Service", "name": "front", "port": 80})
    );
    let accepted = condition(ours, "Accepted").clone();
    assert_eq!(accepted["status"], "True");
    assert_eq!(accepted["observedGeneration"], 1);
    assert!(accepted["lastTransitionTime"]
        .as_str()
        .unwrap()
        .ends_with('Z'));
    assert_eq!(condition(ours, "ResolvedRefs")["status"], "True");
    let grpc = eventually("the GRPCRoute status patch", || {
        api.requests()
            .into_iter()
            .find(|r| r.verb == "patch" && r.resource == "grpcroutes/status")
    })
    .0;
    assert_eq!(
        our_entry(&grpc.body.unwrap()["status"]["parents"])["parentRef"]["name"],
        "rpc"
    );

    // Nothing changes: nothing is written (our own writes come back through the watch).
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        status_patches(&api.requests()).len(),
        2,
        "no write when nothing changed"
    );
    let stored = api.get("httproutes", NS, "to-back").unwrap();
    assert_eq!(stored["status"]["parents"][0], foreign_entry());

    // A new generation with a backend that does not exist: ResolvedRefs turns False, Accepted
    // keeps its lastTransitionTime.
    let before = api.request_count();
    api.apply(route("HTTPRoute", "to-back", "front", "missing"));
    let patch = eventually("the status patch for generation 2", || {
        api.requests()[before..]
            .iter()
            .find(|r| r.verb == "patch" && r.resource == "httproutes/status")
            .cloned()
    })
    .0;
    let body = patch.body.unwrap();
    let ours = our_entry(&body["status"]["parents"]);
    let resolved = condition(ours, "ResolvedRefs");
    assert_eq!(resolved["status"], "False");
    assert_eq!(resolved["reason"], "BackendNotFound");
    assert_eq!(resolved["observedGeneration"], 2);
    assert_eq!(
        condition(ours, "Accepted")["lastTransitionTime"],
        accepted["lastTransitionTime"]
    );
    assert_eq!(condition(ours, "Accepted")["observedGeneration"], 2);
    assert_eq!(body["status"]["parents"][0], foreign_entry());

    // Someone else wrote in between (409): the agent reads the status again and retries.
    let before = api.request_count();
    api.refuse_next_status_patch("httproutes", NS, "to-back");
    api.refuse_next_status_patch("grpcroutes", NS, "rpc-to-back");
    api.apply(route("HTTPRoute", "to-back", "front", "back"));
    api.apply(route("GRPCRoute", "rpc-to-back", "rpc", "missing"));
    let requests = eventually("both routes written after a conflict", || {
        let later = api.requests()[before..].to_vec();
        let done = ["httproutes/status", "grpcroutes/status"]
            .iter()
            .all(|resource| {
                later
                    .iter()
                    .any(|r| r.resource == *resource && r.verb == "patch" && r.status == 200)
            });
        done.then_some(later)
    })
    .0;
    for resource in ["httproutes/status", "grpcroutes/status"] {
        let sequence: Vec<(&str, u16)> = requests
            .iter()
            .filter(|r| r.resource == resource)
            .map(|r| (r.verb.as_str(), r.status))
            .collect();
        assert_eq!(
            sequence,
            [("patch", 409), ("get", 200), ("patch", 200)],
            "{resource}"
        );
    }
    assert_eq!(lease_holder(&api).as_deref(), Some("node-a"));

    let (mesh, _) = eventually("the XMesh status", || {
        api.get("xmeshes", "", "gamma")
            .filter(|m| m["status"]["supportedFeatures"].is_array())
    });
    assert_eq!(mesh["status"]["conditions"][0]["type"], "Accepted");
    assert_eq!(mesh["status"]["conditions"][0]["status"], "True");
    let features: Vec<&str> = mesh["status"]["supportedFeatures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    let mut expected = gamma_engine::features::SUPPORTED_FEATURES.to_vec();
    expected.sort_unstable();
    assert_eq!(features, expected);
    let mesh_patches: Vec<(Option<String>, u16)> = api
        .requests()
        .iter()
        .filter(|r| r.resource == "xmeshes/status")
        .map(|r| (r.name.clone(), r.status))
        .collect();
    let gamma = Some("gamma".to_string());
    assert_eq!(
        mesh_patches,
        [(gamma.clone(), 409), (gamma, 200)],
        "refused once, written again, and only ours"
    );
    assert!(api.get("xmeshes", "", "other").unwrap()["status"].is_null());

    // Every call made is declared by --print-rbac, and every declared call was made.
    eventually("a lease renewal", || {
        api.requests()
            .iter()
            .any(|r| r.resource == "leases" && r.verb == "update")
            .then_some(())
    });
    let output = Command::new(agent_binary())
        .arg("--print-rbac")
        .output()
        .expect("run --print-rbac");
    assert!(output.status.success());
    let rules: Value = serde_json::from_slice(&output.stdout).expect("JSON rules");
    let declared: BTreeSet<(String, String, String)> = rules
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| {
            r["verbs"].as_array().unwrap().iter().map(move |v| {
                (
                    r["apiGroup"].as_str().unwrap().to_string(),
                    r["resource"].as_str().unwrap().to_string(),
                    v.as_str().unwrap().to_string(),
                )
            })
        })
        .collect();
    // Not the paths every client may read (`PUBLIC_INFO`: the server's version, its readiness).
    let made: BTreeSet<(String, String, String)> = api
        .requests()
        .iter()
        .filter(|r| !proxy_agent::kube_api::PUBLIC_INFO.contains(&r.resource.as_str()))
        .map(|r| (r.group.clone(), r.resource.clone(), r.verb.clone()))
        .collect();
    assert_eq!(made, declared, "calls made vs --print-rbac");
    drop(agent);
}

/// `proxy-agent --clear-status`, for an uninstall: refused while an agent holds the status lease
/// (it would write the status back); once none does, it holds the lease while our entries leave
/// every route's status (another controller's stay) and our XMesh's status is emptied. Before, a route nothing applied
/// any more went on saying it was Accepted by gamma-node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clearing_status_for_an_uninstall_leaves_only_other_controllers_entries() {
    let api = FakeApiServer::start().await;
    let back = echo_backend([127, 0, 0, 1], "back").await;
    seed(&api, back.addr);
    let mut with_foreign = route("HTTPRoute", "to-back", "front", "back");
    with_foreign["status"] = json!({"parents": [foreign_entry()]});
    api.apply(with_foreign);
    api.apply(json!({
        "apiVersion": "gateway.networking.x-k8s.io/v1alpha1", "kind": "XMesh",
        "metadata": {"name": "gamma", "generation": 1},
        "spec": {"controllerName": CONTROLLER},
    }));
    let mut agent = KubeAgent::start(&api, "node-a", "a");
    let parents = || api.get("httproutes", NS, "to-back").unwrap()["status"]["parents"].clone();
    eventually("our entry and the XMesh status", || {
        let mesh = api.get("xmeshes", "", "gamma")?;
        (parents().as_array()?.len() == 2 && mesh["status"]["supportedFeatures"].is_array())
            .then_some(())
    });
    let dir = TempDir::new("clear-status");
    let kubeconfig = api.kubeconfig(&dir.0, "operator");
    let clear = || {
        Command::new(agent_binary())
            .args(["--clear-status", "--lease-namespace", LEASE_NS])
            .env("KUBECONFIG", &kubeconfig)
            .env_remove("POD_NAMESPACE")
            .output()
            .expect("run --clear-status")
    };
    let refused = clear();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("delete the DaemonSet and wait"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert_eq!(parents().as_array().unwrap().len(), 2, "nothing cleared");
    // The DaemonSet deleted: the agent releases the lease as it stops. An earlier run cut short
    // left it held in its name: that is taken again.
    agent.terminate();
    let mut lease = api.get("leases", LEASE_NS, LEASE).unwrap();
    lease["spec"]["holderIdentity"] = "gamma-node --clear-status".into();
    lease["spec"]["renewTime"] = "2030-01-01T00:00:00.000000Z".into();
    api.apply(lease);
    let before = api.request_count();
    let cleared = clear();
    assert!(
        cleared.status.success(),
        "{}",
        String::from_utf8_lossy(&cleared.stderr)
    );
    assert_eq!(parents(), json!([foreign_entry()]));
    assert_eq!(
        lease_holder(&api),
        None,
        "held while clearing, let go after"
    );
    let calls: Vec<(String, String)> = api.requests()[before..]
        .iter()
        .map(|r| (r.resource.clone(), r.verb.clone()))
        .collect();
    let at = |call: (&str, &str)| {
        calls
            .iter()
            .position(|c| (c.0.as_str(), c.1.as_str()) == call)
    };
    let cleared_at = at(("httproutes/status", "patch")).expect("our entry taken out");
    let taken_at = at(("leases", "update")).expect("the lease taken");
    let let_go_at = calls
        .iter()
        .rposition(|c| c.0 == "leases" && c.1 == "update");
    assert!(
        taken_at < cleared_at && let_go_at > Some(cleared_at),
        "the lease held while clearing: {calls:?}"
    );
    let mesh = api.get("xmeshes", "", "gamma").unwrap();
    assert!(
        mesh["status"]["conditions"].is_null() && mesh["status"]["supportedFeatures"].is_null(),
        "{mesh}"
    );
}

/// While the Service feed fails, the table may lack Services made meanwhile: a route to one of
/// them must not be told that its parent does not exist. Status waits until the feed is current
/// again, and the route's first status is the true one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_status_waits_while_a_feed_it_is_read_from_is_failing() {
    let api = FakeApiServer::start().await;
    let back = echo_backend([127, 0, 0, 1], "back").await;
    seed(&api, back.addr);
    let agent = KubeAgent::start(&api, "node-a", "a");
    let patches_of = |name: &str| -> Vec<Value> {
        status_patches(&api.requests())
            .into_iter()
            .filter(|r| r.name.as_deref() == Some(name))
            .filter_map(|r| r.body.clone())
            .collect()
    };
    eventually("the status of the route seen before the failure", || {
        (!patches_of("to-back").is_empty()).then_some(())
    });

    api.set_failing("services", true);
    eventually("the agent reports the failing feed", || {
        let (_, body) = agent.ready();
        body.contains("stale since").then_some(())
    });
    api.apply(service("late", "10.96.0.13", back.addr.port(), None));
    api.apply(route("HTTPRoute", "to-late", "late", "back"));
    table(
        &agent,
        "the new route, from the route feed that works",
        |d| routes(d).contains("HTTPRoute shop/to-late"),
    );
    // The writer's pass would have run by now (its debounce is 20 ms).
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(
        patches_of("to-late"),
        Vec::<Value>::new(),
        "no status while the Service feed fails"
    );

    api.set_failing("services", false);
    let (first, took) = eventually("the route's status once the feed is current", || {
        patches_of("to-late").into_iter().next()
    });
    eprintln!("timing: status written {took:?} after the feed recovered");
    let ours = our_entry(&first["status"]["parents"]);
    assert_eq!(
        condition(ours, "Accepted")["status"],
        "True",
        "the first status written is the true one: {ours}"
    );
}

/// A status write the API server refuses (a ClusterRole without `httproutes/status` after an
/// upgrade) is tried again after the backoff, not at every change of the cluster: endpoint
/// churn, which changes no route's status, sends no write meanwhile. Before, every publish
/// (every EndpointSlice change on the cluster) sent every refused write again at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_status_write_waits_for_its_backoff_through_endpoint_churn() {
    let api = FakeApiServer::start().await;
    let back = echo_backend([127, 0, 0, 1], "back").await;
    api.refuse_status_writes("httproutes", true);
    seed(&api, back.addr);
    let agent = KubeAgent::start(&api, "node-a", "a");
    let refused = || {
        status_patches(&api.requests())
            .iter()
            .filter(|r| r.status == 403)
            .count()
    };
    eventually("the first refused write", || (refused() > 0).then_some(()));
    let first = refused();
    // 1.5 s of endpoint churn, well inside the first backoff (5 s): one change each 100 ms.
    for i in 0..15 {
        let ready = i % 2 == 0;
        api.apply(slice_named(
            "back-2",
            "back",
            back.addr.port(),
            &[("127.0.0.2".into(), ready)],
        ));
        std::thread::sleep(Duration::from_millis(100));
    }
    table(&agent, "the churned endpoint", |d| {
        d.to_string().contains("127.0.0.2")
    });
    assert!(
        refused() <= first + 1,
        "{} refused writes during the churn",
        refused() - first
    );
    api.refuse_status_writes("httproutes", false);
    // The retry comes 5 s after the first failure, or 10 s after a second one.
    gamma_tests::eventually_within(Duration::from_secs(20), "the write at the retry", || {
        status_patches(&api.requests())
            .iter()
            .any(|r| r.status == 200)
            .then_some(())
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_moves_to_another_agent_and_a_demoted_leader_stops_writing() {
    let api = FakeApiServer::start().await;
    let back = echo_backend([127, 0, 0, 1], "back").await;
    seed(&api, back.addr);
    let by = |token: &str| format!("Bearer {token}");
    let mut a = KubeAgent::start(&api, "node-a", "a");
    eventually("agent a holds the lease and writes", || {
        (lease_holder(&api).as_deref() == Some("node-a")
            && status_patches(&api.requests())
                .iter()
                .any(|r| r.authorization == Some(by("a"))))
        .then_some(())
    });
    let b = KubeAgent::start(&api, "node-b", "b");
    eventually("agent b reads the lease", || {
        api.requests()
            .iter()
            .any(|r| r.resource == "leases" && r.authorization == Some(by("b")))
            .then_some(())
    });
    // b is a candidate but not the holder: it does not write, even on a change.
    let before = api.request_count();
    api.apply(route("HTTPRoute", "to-back", "front", "missing"));
    eventually("a writes generation 2", || {
        status_patches(&api.requests()[before..])
            .iter()
            .any(|r| r.authorization == Some(by("a")))
            .then_some(())
    });
    table(&b, "b's table has generation 2", |d| {
        d["statuses"]["HTTPRoute shop/to-back"][0]["conditions"][1]["observedGeneration"] == 2
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(!status_patches(&api.requests())
        .iter()
        .any(|r| r.authorization == Some(by("b"))));

    // a stops (SIGTERM releases the lease): b takes it and writes.
    let stopped = Instant::now();
    a.terminate();
    assert_eq!(lease_holder(&api), None, "released on shutdown");
    let took = takes_the_released_lease(&api, "node-b");
    eprintln!(
        "timing: lease taken over {took:?} after a released it ({:?} after SIGTERM)",
        stopped.elapsed()
    );
    let before = api.request_count();
    api.apply(route("HTTPRoute", "to-back", "front", "back"));
    let (patch, took) = eventually("b writes generation 3", || {
        status_patches(&api.requests()[before..])
            .first()
            .map(|r| (*r).clone())
    });
    eprintln!("timing: new leader wrote {took:?} after the change");
    assert_eq!(patch.authorization, Some(by("b")));
    assert_eq!(
        our_entry(&patch.body.unwrap()["status"]["parents"])["conditions"][0]["observedGeneration"],
        3
    );

    // Someone else takes the lease: b notices at its next renewal and stops writing.
    let mut lease = api.get("leases", LEASE_NS, LEASE).unwrap();
    lease["spec"]["holderIdentity"] = "node-x".into();
    lease["spec"]["renewTime"] = "2030-01-01T00:00:00.000000Z".into();
    api.apply(lease);
    let taken = api.request_count();
    eventually("b reads the lease again", || {
        api.requests()[taken..]
            .iter()
            .any(|r| r.resource == "leases" && r.authorization == Some(by("b")))
            .then_some(())
    });
    eventually("b logs its demotion", || {
        b.log().contains("lost the status lease").then_some(())
    });
    let before = api.request_count();
    api.apply(route("HTTPRoute", "to-back", "front", "missing"));
    // b follows the cluster: its table has generation 4, which a leader would write.
    table(&b, "b's table follows generation 4", |d| {
        d["statuses"]["HTTPRoute shop/to-back"][0]["conditions"][1]["observedGeneration"] == 4
    });
    // Well past the writer's debounce (20 ms) from the table b holds.
    std::thread::sleep(Duration::from_millis(1000));
    assert!(
        status_patches(&api.requests()[before..]).is_empty(),
        "a demoted leader does not write"
    );
    assert_eq!(lease_holder(&api).as_deref(), Some("node-x"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_a_surge_the_old_and_new_agent_of_one_node_never_both_lead() {
    let api = FakeApiServer::start().await;
    let back = echo_backend([127, 0, 0, 1], "back").await;
    seed(&api, back.addr);
    let by = |token: &str| format!("Bearer {token}");
    let agent = |pod: &str| {
        let dir = TempDir::new("surge");
        let kubeconfig = api.kubeconfig(&dir.0, pod);
        KubeAgent::spawn_with(dir, &kubeconfig, "node-a", pod, &[]).until_ready("node-a")
    };
    let mut old = agent("gamma-node-old");
    eventually("the old agent holds the lease", || {
        (lease_holder(&api).as_deref() == Some("gamma-node-old")).then_some(())
    });
    // The new Pod of the DaemonSet starts on the same node while the old one still runs.
    let new = agent("gamma-node-new");
    eventually("the new agent reads the lease", || {
        api.requests()
            .iter()
            .any(|r| r.resource == "leases" && r.authorization == Some(by("gamma-node-new")))
            .then_some(())
    });
    let before = api.request_count();
    api.apply(route("HTTPRoute", "to-back", "front", "missing"));
    eventually("the old agent writes generation 2", || {
        status_patches(&api.requests()[before..])
            .iter()
            .any(|r| r.authorization == Some(by("gamma-node-old")))
            .then_some(())
    });
    std::thread::sleep(Duration::from_millis(1500));
    let writers: BTreeSet<Option<String>> = status_patches(&api.requests())
        .iter()
        .map(|r| r.authorization.clone())
        .collect();
    assert_eq!(
        writers,
        BTreeSet::from([Some(by("gamma-node-old"))]),
        "only the lease holder writes"
    );
    assert_eq!(lease_holder(&api).as_deref(), Some("gamma-node-old"));

    // The old Pod goes: the new one leads.
    old.terminate();
    takes_the_released_lease(&api, "gamma-node-new");
    let before = api.request_count();
    api.apply(route("HTTPRoute", "to-back", "front", "back"));
    let (patch, _) = eventually("the new agent writes generation 3", || {
        status_patches(&api.requests()[before..])
            .first()
            .map(|r| (*r).clone())
    });
    assert_eq!(patch.authorization, Some(by("gamma-node-new")));
    drop(new);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_served_before_the_first_complete_sync() {
    let api = FakeApiServer::start().await;
    let back = echo_backend([127, 0, 0, 1], "back").await;
    seed(&api, back.addr);
    api.go_down().await;
    let agent = KubeAgent::spawn(&api, "node-a", "a");
    // The admin server answers at once (the liveness probe), readiness waits for the table.
    eventually("/live answers", || {
        (http_get_full(agent.admin, "/live").ok()?.0 == 200).then_some(())
    });
    std::thread::sleep(Duration::from_millis(1000));
    let (status, body) = agent.ready();
    assert_eq!(status, 503, "{body}");
    assert!(
        std::net::TcpStream::connect(agent.listen).is_err(),
        "no listener before the first sync"
    );

    api.come_back().await;
    let (_, took) = eventually("ready once the API server answers", || {
        (agent.ready().0 == 200).then_some(())
    });
    eprintln!("timing: ready {took:?} after the API server came up");
    assert_eq!(agent.answered_by().as_deref(), Some("back"));
}
