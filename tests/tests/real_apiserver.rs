//! `proxy-agent --kube` against a real API server for the Gateway API kinds (apiextensions-apiserver
//! on etcd, with the upstream CRDs; see `tests/src/real_apiserver.rs`), the core kinds and the
//! lease staying with the in-process fake behind one front. Routes are created, edited and
//! deleted under watch; the server's defaulting gives the route the manifest loader gives; a
//! route the server refuses never arrives; status is written by server-side apply against the
//! resourceVersion it was computed from, re-read after a genuine 409, and another field
//! manager's entry is kept; invalid rules and invalid edits reach status; the lease moves. And
//! the agent's own client, straight to the real server over TLS: its watches are streams of one
//! HTTP/2 connection, and when that connection goes silent its PINGs find it and the watches
//! carry on on a new one.
//!
//! Skipped, with the reason, when the server is not built (`cargo xtask setup` builds it).

use gamma_engine::model::Object;
use gamma_tests::fake_apiserver::FakeApiServer;
use gamma_tests::kube_world::*;
use gamma_tests::loopback::{echo_backend, TempDir};
use gamma_tests::real_apiserver::{ApiFront, RealApiServer};
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CONTROLLER: &str = "gamma-node.dev/agent";
const OTHER_CONTROLLER: &str = "example.com/other-mesh";

fn http_routes(real: &RealApiServer) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", "HTTPRoute");
    Api::namespaced_with(
        real.client.clone(),
        NS,
        &ApiResource::from_gvk_with_plural(&gvk, "httproutes"),
    )
}

/// The agent's client (`sources::kube::client`) to the real server through a relay that counts
/// connections and can make them silent: three watches and a list share one connection (over
/// HTTP/1.1 each watch holds one); a connection gone silent (its bytes swallowed, never closed)
/// is found by the PINGs, and the watches go on over a new connection.
async fn agent_client_over_http2(real: &RealApiServer) {
    use futures::StreamExt;
    use kube::runtime::{watcher, WatchStreamExt};
    use proxy_agent::sources::kube::{client::connect, ApiTimeouts};

    let relay = SilencingRelay::start(gamma_tests::real_apiserver::ADDR).await;
    let mut config = kube::Config::new(format!("https://{}", relay.addr).parse().unwrap());
    config.accept_invalid_certs = true;
    let timeouts = ApiTimeouts {
        read: Duration::from_secs(300),
        ping_interval: Duration::from_secs(1),
        // Not shorter: a PING answered late on a busy machine would close the connection.
        ping_timeout: Duration::from_secs(3),
    };
    let agent = connect(config, timeouts).await.expect("the agent's client");
    let kind = |kind: &str, plural: &str| {
        let gvk = GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", kind);
        ApiResource::from_gvk_with_plural(&gvk, plural)
    };
    let watched: [Api<DynamicObject>; 3] = [
        Api::all_with(agent.clone(), &kind("HTTPRoute", "httproutes")),
        Api::all_with(agent.clone(), &kind("GRPCRoute", "grpcroutes")),
        Api::namespaced_with(agent.clone(), NS, &kind("HTTPRoute", "httproutes")),
    ];
    // What each watch saw, in order: "synced", "applied <name>", "error".
    let (seen, mut events) = tokio::sync::mpsc::unbounded_channel();
    let watches: Vec<_> = watched
        .into_iter()
        .enumerate()
        .map(|(i, api)| {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut stream = watcher(api, watcher::Config::default())
                    .default_backoff()
                    .boxed();
                while let Some(event) = stream.next().await {
                    let what = match event {
                        Ok(watcher::Event::InitDone) => "synced".to_string(),
                        Ok(watcher::Event::Apply(o)) => {
                            format!("applied {}", o.metadata.name.unwrap_or_default())
                        }
                        Ok(_) => continue,
                        Err(_) => "error".to_string(),
                    };
                    if seen.send((i, what)).is_err() {
                        return;
                    }
                }
            })
        })
        .collect();
    let mut log: Vec<Seen> = Vec::new();
    let mut until = async |what: &str, done: &dyn Fn(&[Seen]) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !done(&log) {
            match tokio::time::timeout_at(deadline.into(), events.recv()).await {
                Ok(Some(event)) => log.push(event),
                _ => panic!("not within 20 s: {what}; the watches saw {log:?}"),
            }
        }
        log.len()
    };
    let probe = |name: &str| {
        dynamic(&json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "front", "port": 80}]},
        }))
    };
    let saw =
        |log: &[Seen], watch: usize, what: &str| log.iter().any(|(i, w)| *i == watch && w == what);
    until("the three watches synced", &|log| {
        (0..3).all(|i| saw(log, i, "synced"))
    })
    .await;
    let routes = http_routes(real);
    routes
        .create(&PostParams::default(), &probe("h2-probe-1"))
        .await
        .expect("create a route");
    until("the route seen by both HTTPRoute watches", &|log| {
        saw(log, 0, "applied h2-probe-1") && saw(log, 2, "applied h2-probe-1")
    })
    .await;
    Api::<DynamicObject>::all_with(agent.clone(), &kind("GRPCRoute", "grpcroutes"))
        .list(&Default::default())
        .await
        .expect("a list beside the watches");
    assert_eq!(
        (relay.accepted(), relay.open()),
        (1, 1),
        "three watches and a list over one HTTP/2 connection"
    );

    // The connection goes silent: PINGs unanswered for 3 s close it, the watches fail and go on
    // over a new connection, and see what changed since.
    relay.silence_all();
    let before = until("the watches failed on the silent connection", &|log| {
        log.iter().filter(|(_, w)| w == "error").count() >= 1
    })
    .await;
    routes
        .create(&PostParams::default(), &probe("h2-probe-2"))
        .await
        .expect("create a route");
    until("the watches back on a new connection", &|log| {
        saw(&log[before..], 0, "applied h2-probe-2") && saw(&log[before..], 2, "applied h2-probe-2")
    })
    .await;
    // The silent connection closed by the client, one new one open for all the watches (more
    // may have been opened together as the watches came back, and closed once ALPN told).
    let settled = Instant::now() + Duration::from_secs(5);
    while relay.open() != 1 || relay.accepted() < 2 {
        assert!(
            Instant::now() < settled,
            "{} connections open of {} accepted: the silent one still open, or none new",
            relay.open(),
            relay.accepted()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for name in ["h2-probe-1", "h2-probe-2"] {
        routes
            .delete(name, &DeleteParams::default())
            .await
            .expect("delete the probe");
    }
    for watch in watches {
        watch.abort();
    }
}

/// What one of the watches (by index) saw.
type Seen = (usize, String);

/// A TCP relay to `upstream` that counts the connections it accepts and those still open (their
/// caller has not closed them), and can make the open ones silent: their bytes are read and
/// dropped both ways, the sockets kept open (a peer lost behind a VIP, a dropped NAT entry).
/// Connections accepted later relay as usual.
struct SilencingRelay {
    addr: std::net::SocketAddr,
    counts: Arc<RelayCounts>,
    accept: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct RelayCounts {
    accepted: AtomicUsize,
    open: AtomicUsize,
    /// One flag per connection accepted: set, its bytes are dropped.
    silenced: std::sync::Mutex<Vec<Arc<AtomicBool>>>,
}

impl SilencingRelay {
    async fn start(upstream: &'static str) -> SilencingRelay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let counts = Arc::new(RelayCounts::default());
        let counted = counts.clone();
        let accept = tokio::spawn(async move {
            // The pipes end with this task.
            let mut pipes = tokio::task::JoinSet::new();
            while let Ok((caller, _)) = listener.accept().await {
                counted.accepted.fetch_add(1, Ordering::SeqCst);
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                    continue;
                };
                counted.open.fetch_add(1, Ordering::SeqCst);
                let silent = Arc::new(AtomicBool::new(false));
                counted.silenced.lock().unwrap().push(silent.clone());
                let (caller_read, caller_write) = caller.into_split();
                let (server_read, server_write) = server.into_split();
                let (counts, silent_too) = (counted.clone(), silent.clone());
                pipes.spawn(async move {
                    pipe(caller_read, server_write, &silent).await;
                    counts.open.fetch_sub(1, Ordering::SeqCst);
                });
                pipes.spawn(async move { pipe(server_read, caller_write, &silent_too).await });
            }
        });
        SilencingRelay {
            addr,
            counts,
            accept,
        }
    }

    fn accepted(&self) -> usize {
        self.counts.accepted.load(Ordering::SeqCst)
    }

    fn open(&self) -> usize {
        self.counts.open.load(Ordering::SeqCst)
    }

    fn silence_all(&self) {
        for flag in self.counts.silenced.lock().unwrap().iter() {
            flag.store(true, Ordering::SeqCst);
        }
    }
}

/// Copies `from` to `to` until `from` ends, dropping what it reads once `silent` is set.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    silent: &AtomicBool,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if !silent.load(Ordering::SeqCst) && to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Drop for SilencingRelay {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

fn dynamic(value: &Value) -> DynamicObject {
    serde_json::from_value(value.clone()).expect("a Kubernetes object")
}

/// The route as stored, with the type meta lists leave out.
async fn stored(routes: &Api<DynamicObject>, name: &str) -> Value {
    let mut value = serde_json::to_value(routes.get(name).await.expect("get the route")).unwrap();
    value["apiVersion"] = "gateway.networking.k8s.io/v1".into();
    value["kind"] = "HTTPRoute".into();
    value
}

/// Polls the real server until `check` holds for the route (10 s).
async fn until_route(
    routes: &Api<DynamicObject>,
    name: &str,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> Value {
    until_route_within(LIMIT, routes, name, what, check).await
}

/// As [`until_route`], for up to `limit`.
async fn until_route_within(
    limit: Duration,
    routes: &Api<DynamicObject>,
    name: &str,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> Value {
    let started = Instant::now();
    loop {
        let value = stored(routes, name).await;
        if check(&value) {
            return value;
        }
        assert!(
            started.elapsed() < limit,
            "not within {limit:?}: {what}; route: {value:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn entry<'a>(route: &'a Value, controller: &str) -> Option<&'a Value> {
    route["status"]["parents"]
        .as_array()?
        .iter()
        .find(|p| p["controllerName"] == controller)
}

fn condition<'a>(route: &'a Value, type_: &str) -> Option<&'a Value> {
    entry(route, CONTROLLER)?["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

fn holds(route: &Value, type_: &str, status: &str, generation: i64) -> bool {
    condition(route, type_)
        .is_some_and(|c| c["status"] == status && c["observedGeneration"] == generation)
}

/// Replaces the route's spec (a new generation).
async fn edit(routes: &Api<DynamicObject>, name: &str, rules: Value) -> i64 {
    let mut value = stored(routes, name).await;
    value["spec"]["rules"] = rules;
    let replaced = routes
        .replace(name, &PostParams::default(), &dynamic(&value))
        .await
        .expect("replace the route");
    replaced.metadata.generation.expect("a generation")
}

fn rule_to(backend: &str) -> Value {
    json!({"backendRefs": [{"name": backend, "port": 80}]})
}

/// Another mesh's entry in `status.parents`, written by server-side apply under its own field
/// manager, as a second controller would: the whole list (ours kept) against the
/// resourceVersion it read.
async fn write_other_controllers_entry(routes: &Api<DynamicObject>, name: &str, message: &str) {
    let current = stored(routes, name).await;
    let mut parents: Vec<Value> = current["status"]["parents"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|p| p["controllerName"] != OTHER_CONTROLLER)
        .collect();
    parents.push(json!({
        "parentRef": {"group": "", "kind": "Service", "name": "front", "port": 80},
        "controllerName": OTHER_CONTROLLER,
        "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted",
                        "message": message, "observedGeneration": current["metadata"]["generation"],
                        "lastTransitionTime": "2026-01-01T00:00:00Z"}],
    }));
    let body = json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": NS,
                     "resourceVersion": current["metadata"]["resourceVersion"]},
        "status": {"parents": parents},
    });
    routes
        .patch_status(
            name,
            &PatchParams::apply("other-mesh").force(),
            &Patch::Apply(&body),
        )
        .await
        .expect("the other controller's status write");
}

/// A route with the fields the CRD defaults left out (match type, header match type, backendRef
/// group/kind/weight, redirect status code, the matches of a rule without any).
fn route_with_defaults_left_out(backend_port: u16) -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "to-back", "namespace": NS},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "front", "port": 80}],
            "rules": [
                {"matches": [{"path": {"value": "/v2"}, "headers": [{"name": "x-version", "value": "2"}]}],
                 "backendRefs": [{"name": "back", "port": 80}]},
                {"matches": [{"path": {"type": "Exact", "value": "/old"}}],
                 "filters": [{"type": "RequestRedirect",
                              "requestRedirect": {"path": {"type": "ReplaceFullPath", "replaceFullPath": "/new"}}}]},
                {"backendRefs": [{"name": "back", "port": 80}],
                 "filters": [{"type": "RequestHeaderModifier",
                              "requestHeaderModifier": {"set": [{"name": "x-port", "value": backend_port.to_string()}]}}]},
            ],
        },
    })
}

/// An XMesh CRD written for this test (upstream's is experimental and not in the shared
/// folder): cluster-scoped, a status subresource, the fields GEP-3949 names.
fn xmesh_crd() -> Value {
    let open = json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true});
    json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "xmeshes.gateway.networking.x-k8s.io"},
        "spec": {
            "group": "gateway.networking.x-k8s.io", "scope": "Cluster",
            "names": {"plural": "xmeshes", "singular": "xmesh", "kind": "XMesh", "listKind": "XMeshList"},
            "versions": [{
                "name": "v1alpha1", "served": true, "storage": true,
                "subresources": {"status": {}},
                "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                    "spec": {"type": "object", "required": ["controllerName"], "properties": {
                        "controllerName": {"type": "string"}, "description": {"type": "string"},
                        "parametersRef": open}},
                    "status": {"type": "object", "properties": {
                        "conditions": {"type": "array", "x-kubernetes-list-type": "map",
                                       "x-kubernetes-list-map-keys": ["type"],
                                       "items": {"type": "object", "required": ["type"],
                                                 "x-kubernetes-preserve-unknown-fields": true,
                                                 "properties": {"type": {"type": "string"}}}},
                        "supportedFeatures": {"type": "array", "items": {"type": "object",
                            "required": ["name"], "properties": {"name": {"type": "string"}}}}}}}}},
            }],
        },
    })
}

fn converted(value: Value) -> gamma_engine::model::Route {
    match Object::from_value(value) {
        Ok(Object::Route(route)) => route,
        other => panic!("not a route: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_and_status_against_a_real_api_server() {
    let started = Instant::now();
    let real = match RealApiServer::start().await {
        Ok(real) => real,
        Err(why) => {
            gamma_tests::skip("real_apiserver", &why);
            return;
        }
    };
    let crds = gamma_tests::shared_dir().join("gateway-api-crds");
    for file in [
        "experimental-httproutes.yaml",
        "experimental-grpcroutes.yaml",
    ] {
        real.install_crds(&crds.join(file))
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", real.log()));
    }
    real.install_crd(&xmesh_crd()).await.expect("the XMesh CRD");
    agent_client_over_http2(&real).await;
    let meshes: Api<DynamicObject> = Api::all_with(
        real.client.clone(),
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("gateway.networking.x-k8s.io", "v1alpha1", "XMesh"),
            "xmeshes",
        ),
    );
    let mesh = json!({"apiVersion": "gateway.networking.x-k8s.io/v1alpha1", "kind": "XMesh",
                      "metadata": {"name": "gamma"}, "spec": {"controllerName": CONTROLLER}});
    meshes
        .create(&PostParams::default(), &dynamic(&mesh))
        .await
        .expect("create the XMesh");
    eprintln!(
        "timing: real API server up with the CRDs in {:?}",
        started.elapsed()
    );

    let api = FakeApiServer::start().await;
    let back = echo_backend([127, 0, 0, 1], "back").await;
    api.apply(service("front", "10.96.0.10", 8080, None));
    api.apply(service("back", "10.96.0.11", back.addr.port(), None));
    api.apply(slice("back", back.addr));
    api.apply(pod("client", "node-a", "10.244.0.5"));
    let front = ApiFront::start(&api, &real).await;
    let api_routes = http_routes(&real);

    // Created under watch; the server's defaults give the route the manifest loader gives.
    let manifest = route_with_defaults_left_out(back.addr.port());
    api_routes
        .create(&PostParams::default(), &dynamic(&manifest))
        .await
        .expect("create the route");
    let agent_a = {
        let dir = TempDir::new("real-api");
        let kubeconfig = front.kubeconfig(&dir.0, "a");
        KubeAgent::spawn_with(dir, &kubeconfig, "node-a", "agent-a", &[]).until_ready("node-a")
    };
    let server_copy = stored(&api_routes, "to-back").await;
    assert_eq!(
        server_copy["spec"]["rules"][2]["matches"][0]["path"],
        json!({"type": "PathPrefix", "value": "/"}),
        "the server defaulted the match"
    );
    let (mut from_server, from_manifest) = (converted(server_copy), converted(manifest));
    from_server.meta = from_manifest.meta.clone();
    assert_eq!(
        from_server, from_manifest,
        "server defaults = loader defaults"
    );
    table(&agent_a, "the route is in the table", |d| {
        routes(d).contains("HTTPRoute shop/to-back")
    });
    assert_eq!(agent_a.answered_by().as_deref(), Some("back"));

    // The XMesh lists the supported features, sorted.
    let started_mesh = Instant::now();
    let reported = loop {
        let value =
            serde_json::to_value(meshes.get("gamma").await.expect("get the XMesh")).unwrap();
        if value["status"]["supportedFeatures"].is_array() {
            break value;
        }
        assert!(started_mesh.elapsed() < LIMIT, "no XMesh status: {value:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut expected = gamma_engine::features::SUPPORTED_FEATURES.to_vec();
    expected.sort_unstable();
    let listed: Vec<&str> = reported["status"]["supportedFeatures"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["name"].as_str())
        .collect();
    assert_eq!(listed, expected);
    assert_eq!(reported["status"]["conditions"][0]["status"], "True");

    // A route the server refuses never arrives.
    let mut refused = route("HTTPRoute", "negative", "front", "back");
    refused["spec"]["rules"][0]["backendRefs"][0]["weight"] = (-1).into();
    match api_routes
        .create(&PostParams::default(), &dynamic(&refused))
        .await
    {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 422, "{status:?}"),
        other => panic!("the server should refuse a negative weight: {other:?}"),
    }

    // Status by server-side apply under our field manager.
    let written = until_route(&api_routes, "to-back", "Accepted at generation 1", |r| {
        holds(r, "Accepted", "True", 1) && holds(r, "ResolvedRefs", "True", 1)
    })
    .await;
    let managers: Vec<&str> = written["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["subresource"] == "status")
        .filter_map(|m| m["manager"].as_str())
        .collect();
    assert_eq!(managers, ["gamma-node"], "{written:#}");

    // Another controller's entry is kept when ours is rewritten (generation 2).
    write_other_controllers_entry(&api_routes, "to-back", "first").await;
    let generation = edit(
        &api_routes,
        "to-back",
        json!([rule_to("back"), rule_to("back")]),
    )
    .await;
    let after = until_route(&api_routes, "to-back", "Accepted at generation 2", |r| {
        holds(r, "Accepted", "True", generation)
    })
    .await;
    assert_eq!(
        entry(&after, OTHER_CONTROLLER).unwrap()["conditions"][0]["message"],
        "first"
    );

    // A genuine 409: the other controller writes between our read and our write. The front
    // holds our write until it has; the server refuses it; we read again and write again.
    let before = front.relayed().len();
    let mut held = front.hold_next_status_write();
    let generation = edit(&api_routes, "to-back", json!([rule_to("back")])).await;
    assert!(
        held.arrived(LIMIT).await,
        "our status write for generation {generation}"
    );
    write_other_controllers_entry(&api_routes, "to-back", "second").await;
    held.release();
    let after = until_route(
        &api_routes,
        "to-back",
        "Accepted at generation 3 after a 409",
        |r| holds(r, "Accepted", "True", generation),
    )
    .await;
    assert_eq!(
        entry(&after, OTHER_CONTROLLER).unwrap()["conditions"][0]["message"],
        "second",
        "the entry written in between is kept"
    );
    // The front records a call once the server's answer is back, which can be after the test
    // has already read the route that call wrote.
    let status_calls = front
        .relayed_matching(before, 3, LIMIT, |path| path.ends_with("/to-back/status"))
        .await;
    assert_eq!(
        status_calls[..3.min(status_calls.len())],
        [
            ("PATCH".into(), 409),
            ("GET".into(), 200),
            ("PATCH".into(), 200)
        ],
        "{status_calls:?}"
    );

    // Invalid rules: dropped and named (the server cannot check a regular expression).
    let bad_regex = json!({"matches": [{"headers": [{"type": "RegularExpression", "name": "x", "value": "("}]}],
                           "backendRefs": [{"name": "back", "port": 80}]});
    let generation = edit(
        &api_routes,
        "to-back",
        json!([rule_to("back"), bad_regex.clone()]),
    )
    .await;
    let partial = until_route(&api_routes, "to-back", "PartiallyInvalid", |r| {
        holds(r, "Accepted", "True", generation) && holds(r, "PartiallyInvalid", "True", generation)
    })
    .await;
    let message = condition(&partial, "PartiallyInvalid").unwrap()["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(message.starts_with("Dropped Rule 1: "), "{message}");

    // An edit with no valid rule: refused at its generation, the last good one still serves.
    let good = generation;
    let generation = edit(&api_routes, "to-back", json!([bad_regex])).await;
    let refused = until_route(
        &api_routes,
        "to-back",
        "Accepted=False for the refused edit",
        |r| holds(r, "Accepted", "False", generation),
    )
    .await;
    let message = condition(&refused, "Accepted").unwrap()["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        message.contains(&format!("generation {good} stays in use")),
        "{message}"
    );
    assert_eq!(agent_a.answered_by().as_deref(), Some("back"));

    // The lease moves: b writes once a is gone.
    let agent_b = {
        let dir = TempDir::new("real-api");
        let kubeconfig = front.kubeconfig(&dir.0, "b");
        KubeAgent::spawn_with(dir, &kubeconfig, "node-b", "agent-b", &[]).until_ready("node-b")
    };
    let mut agent_a = agent_a;
    agent_a.terminate();
    let generation = edit(&api_routes, "to-back", json!([rule_to("missing")])).await;
    // b saw the lease held: it looks again within half a lease duration (7.5 s) and its jitter.
    let moved = until_route_within(
        Duration::from_secs(20),
        &api_routes,
        "to-back",
        "agent b writes",
        |r| holds(r, "ResolvedRefs", "False", generation),
    )
    .await;
    assert_eq!(
        entry(&moved, OTHER_CONTROLLER).unwrap()["conditions"][0]["message"],
        "second"
    );

    // A second route, with another controller's entry beside ours, for the uninstall below.
    api_routes
        .create(
            &PostParams::default(),
            &dynamic(&route("HTTPRoute", "second", "front", "back")),
        )
        .await
        .expect("create the second route");
    until_route(
        &api_routes,
        "second",
        "agent b writes the second route",
        |r| holds(r, "Accepted", "True", 1),
    )
    .await;
    write_other_controllers_entry(&api_routes, "second", "kept").await;

    // Deleted under watch.
    api_routes
        .delete("to-back", &DeleteParams::default())
        .await
        .expect("delete the route");
    table(&agent_b, "the route leaves the table", |d| {
        !routes(d).contains("HTTPRoute shop/to-back")
    });

    // Uninstall: the DaemonSet gone (b releases the lease as it stops), `--clear-status` takes
    // our entries out by server-side apply and empties our XMesh's status.
    let mut agent_b = agent_b;
    agent_b.terminate();
    let dir = TempDir::new("real-api");
    let kubeconfig = front.kubeconfig(&dir.0, "operator");
    let cleared = std::process::Command::new(gamma_tests::loopback::agent_binary())
        .args(["--clear-status", "--lease-namespace", LEASE_NS])
        .env("KUBECONFIG", &kubeconfig)
        .env_remove("POD_NAMESPACE")
        .output()
        .expect("run --clear-status");
    assert!(
        cleared.status.success(),
        "{}",
        String::from_utf8_lossy(&cleared.stderr)
    );
    let second = stored(&api_routes, "second").await;
    assert!(entry(&second, CONTROLLER).is_none(), "{second:#}");
    assert_eq!(
        entry(&second, OTHER_CONTROLLER).unwrap()["conditions"][0]["message"],
        "kept"
    );
    let mesh = serde_json::to_value(meshes.get("gamma").await.expect("get the XMesh")).unwrap();
    assert!(
        mesh["status"]["conditions"].is_null() && mesh["status"]["supportedFeatures"].is_null(),
        "{mesh:#}"
    );
    eprintln!("timing: real API server tier {:?}", started.elapsed());
}
