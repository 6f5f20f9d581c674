//! Incremental equals from scratch, the check shared by the property test
//! (`tests/incremental.rs`) and the fuzz target `index_ops` (`fuzz/src/lib.rs`): a fixed pool of
//! object variants that share names, namespaces, addresses and references on purpose (a route
//! replaced by one with other parents, two Pods claiming one IP, an HTTPRoute and a GRPCRoute on
//! one port, a backend that comes and goes), so that random sequences of applies and deletes reach
//! the interactions where an incremental index can go stale.

use gamma_engine::index::{Index, ObjectRef};
use gamma_engine::model::Object;
use serde_json::{json, Value};
use std::collections::BTreeMap;

fn service(namespace: &str, name: &str, ip: u8, grpc_port: bool, headless: bool) -> Value {
    let mut ports = vec![json!({"name": "http", "port": 80, "targetPort": 8080})];
    if grpc_port {
        ports
            .push(json!({"name": "grpc", "port": 7070, "targetPort": 7070, "appProtocol": "grpc"}));
    }
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "clusterIP": if headless { "None".to_string() } else { format!("10.96.0.{ip}") },
            "ports": ports,
        }
    })
}

fn slice(namespace: &str, service: &str, name: &str, ips: &[&str], ready: bool) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080}, {"name": "grpc", "port": 7070}],
        "endpoints": ips.iter().map(|ip| json!({
            "addresses": [ip], "conditions": {"ready": ready, "serving": true}
        })).collect::<Vec<_>>(),
    })
}

fn pod(namespace: &str, name: &str, ip: &str, phase: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "uid": format!("uid-{namespace}-{name}")},
        "spec": {"nodeName": "node-a"},
        "status": {"podIP": ip, "podIPs": [{"ip": ip}], "phase": phase},
    })
}

fn http_route(namespace: &str, name: &str, parent: (&str, &str), rules: Value) -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": namespace, "generation": 1},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "namespace": parent.0, "name": parent.1}],
            "rules": rules,
        }
    })
}

/// An HTTPRoute on the gRPC port only: Conflicted while a GRPCRoute is there too.
fn http_route_on_grpc_port(namespace: &str, name: &str, parent: &str) -> Value {
    let mut route = http_route(
        namespace,
        name,
        (namespace, parent),
        json!([{"backendRefs": [to("s1", 1)]}]),
    );
    route["spec"]["parentRefs"][0]["port"] = json!(7070);
    route
}

/// A ReferenceGrant in `a` for HTTPRoutes of `b`, to every Service or to one.
fn reference_grant(service: Option<&str>) -> Value {
    let mut to = json!({"group": "", "kind": "Service"});
    if let Some(name) = service {
        to["name"] = json!(name);
    }
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1beta1", "kind": "ReferenceGrant",
        "metadata": {"name": "from-b", "namespace": "a"},
        "spec": {"from": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "namespace": "b"}],
                 "to": [to]},
    })
}

/// HTTPRoute a/r0 at `generation` with no valid rule.
fn refused_generation(generation: i64) -> Value {
    let mut route = http_route(
        "a",
        "r0",
        ("a", "s0"),
        json!([{"matches": [{"path": {"type": "RegularExpression", "value": "("}}],
                "backendRefs": [to("s1", 1)]}]),
    );
    route["metadata"]["generation"] = json!(generation);
    route
}

fn grpc_route(namespace: &str, name: &str, parent: (&str, &str), backend: &str) -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "GRPCRoute",
        "metadata": {"name": name, "namespace": namespace, "generation": 1},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "namespace": parent.0, "name": parent.1,
                            "port": 7070}],
            "rules": [{"backendRefs": [{"name": backend, "port": 7070}]}],
        }
    })
}

fn to(backend: &str, weight: u32) -> Value {
    json!({"name": backend, "port": 80, "weight": weight})
}

/// Every variant the sequences pick from.
pub fn pool() -> Vec<Object> {
    let values = vec![
        service("a", "s0", 10, true, false),
        service("a", "s0", 10, false, false),
        service("a", "s1", 11, false, false),
        service("a", "s1", 12, true, false),
        service("a", "s2", 13, false, false),
        service("a", "s2", 13, false, true),
        service("b", "s0", 20, false, false),
        slice("a", "s0", "s0-x", &["10.0.0.1"], true),
        slice("a", "s0", "s0-x", &["10.0.0.1", "10.0.0.2"], true),
        slice("a", "s0", "s0-y", &["10.0.0.3"], false),
        slice("a", "s1", "s1-x", &["10.0.1.1"], true),
        slice("a", "s1", "s0-y", &["10.0.1.2"], true),
        slice("a", "s2", "s2-x", &["10.0.2.1"], true),
        slice("b", "s0", "s0-x", &["10.0.3.1"], true),
        pod("a", "p0", "10.1.0.1", "Running"),
        pod("b", "p1", "10.1.0.1", "Running"),
        pod("b", "p1", "10.1.0.1", "Succeeded"),
        pod("b", "p2", "10.1.0.2", "Running"),
        http_route(
            "a",
            "r0",
            ("a", "s0"),
            json!([{"backendRefs": [to("s1", 90), to("s2", 10)]}]),
        ),
        http_route(
            "a",
            "r0",
            ("a", "s1"),
            json!([
                {"matches": [{"path": {"type": "PathPrefix", "value": "/x"}}],
                 "backendRefs": [to("s2", 1)]},
                {"backendRefs": [to("s0", 1)]}
            ]),
        ),
        http_route(
            "a",
            "r1",
            ("a", "s0"),
            json!([{"backendRefs": [to("s9", 1)]}]),
        ),
        http_route(
            "b",
            "r2",
            ("a", "s0"),
            json!([{"filters": [{"type": "RequestHeaderModifier",
                                  "requestHeaderModifier": {"set": [{"name": "x-c", "value": "1"}]}}],
                    "backendRefs": [{"name": "s0", "namespace": "a", "port": 80}]}]),
        ),
        http_route(
            "b",
            "r2",
            ("b", "s0"),
            json!([{"backendRefs": [to("s0", 1)]}]),
        ),
        http_route_on_grpc_port("a", "r3", "s0"),
        // A backend in a third namespace (b's route, a's Service), and the grants that allow it.
        http_route(
            "b",
            "r4",
            ("b", "s0"),
            json!([{"backendRefs": [{"name": "s1", "namespace": "a", "port": 80}]}]),
        ),
        reference_grant(None),
        reference_grant(Some("s2")),
        // Generations of r0 that do not convert (refused): reported unless a good one is newer.
        refused_generation(1),
        refused_generation(2),
        grpc_route("a", "g0", ("a", "s0"), "s1"),
        grpc_route("a", "g0", ("a", "s1"), "s0"),
    ];
    values
        .into_iter()
        .map(|v| match Object::from_value(v.clone()) {
            Ok(object) => object,
            Err(e) => Object::RefusedRoute(
                e.refused_route()
                    .unwrap_or_else(|| panic!("{e}: {v}"))
                    .clone(),
            ),
        })
        .collect()
}

/// Everything a snapshot says, without its version.
fn observe(index: &Index) -> Value {
    let snapshot = index.snapshot();
    let mut dump = snapshot.dump();
    dump.as_object_mut().unwrap().remove("version");
    let mut steered: Vec<String> = snapshot
        .mesh_addresses()
        .map(|(a, client_first)| format!("{a} {client_first}"))
        .collect();
    steered.sort();
    let mut addresses: Vec<String> = snapshot.by_address.keys().map(|a| a.to_string()).collect();
    addresses.sort();
    json!({"dump": dump, "steered": steered, "addresses": addresses})
}

/// One step: apply or delete the pool's object `object`, then publish or not.
#[derive(Clone, Copy, Debug)]
pub struct Step {
    pub object: usize,
    pub delete: bool,
    pub publish: bool,
}

/// Runs `steps` on an index, publishing where they say and at the end, and builds another from
/// scratch from the objects that survive; returns what each publishes (incremental, scratch).
pub fn incremental_and_scratch(pool: &[Object], steps: &[Step]) -> (Value, Value) {
    let mut index = Index::new();
    let mut surviving: BTreeMap<String, Object> = BTreeMap::new();
    for step in steps {
        let object = &pool[step.object % pool.len()];
        let reference = object.reference();
        if step.delete {
            surviving.remove(&format!("{reference:?}"));
            // Deleting a route deletes its refused generation too (what a source's delete means).
            if let ObjectRef::Route(key) = &reference {
                surviving.remove(&format!("{:?}", ObjectRef::RefusedRoute(key.clone())));
            }
            index.delete(&reference);
        } else {
            surviving.insert(format!("{reference:?}"), object.clone());
            index.apply(object.clone());
        }
        if step.publish {
            index.publish();
        }
    }
    index.publish();
    let mut scratch = Index::new();
    for object in surviving.into_values() {
        scratch.apply(object);
    }
    scratch.publish();
    (observe(&index), observe(&scratch))
}
