//! The Service semantics kube-proxy honours, kept once the agent picks endpoints: for callers
//! no route applies to (the frontend's direct backend) and for a route's backendRefs alike.
//! From manifests, through the index of one node.

#[path = "support/requests.rs"]
mod requests;

use gamma_engine::index::{Index, ObjectRef};
use gamma_engine::model::{Object, ObjectKey};
use gamma_engine::routes::Plan;
use requests::with_plan;
use serde_json::{json, Value};
use std::time::Duration;

fn service(name: &str, ip: u8, spec: Value) -> Value {
    let mut value = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "ns"},
        "spec": {"clusterIP": format!("10.96.0.{ip}"), "ports": [{"name": "http", "port": 80}]}
    });
    for (k, v) in spec.as_object().unwrap() {
        value["spec"][k] = v.clone();
    }
    value
}

/// Endpoints of `service`: (last octet, node, zone hints).
fn slice(service: &str, endpoints: &[(u8, &str, &[&str])]) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{service}-1"), "namespace": "ns",
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080}],
        "endpoints": endpoints.iter().map(|(n, node, zones)| {
            let mut e = json!({"addresses": [format!("10.0.0.{n}")], "nodeName": node,
                               "conditions": {"ready": true}});
            if !zones.is_empty() {
                e["hints"] = json!({"forZones": zones.iter().map(|z| json!({"name": z})).collect::<Vec<_>>()});
            }
            e
        }).collect::<Vec<_>>(),
    })
}

fn node(name: &str, zone: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node",
           "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}}})
}

fn load(index: &mut Index, values: Vec<Value>) {
    for value in values {
        index.apply(Object::from_value(value.clone()).unwrap_or_else(|e| panic!("{e}: {value}")));
    }
    index.publish();
}

/// The endpoints (last octets) a caller with no route gets for `service`.
fn direct(index: &Index, service: &str) -> Vec<String> {
    let snapshot = index.snapshot();
    let frontend = snapshot
        .frontend_of(&ObjectKey::new("ns", service), 80)
        .expect("a frontend");
    frontend
        .direct
        .endpoints
        .iter()
        .map(|a| a.ip().to_string())
        .collect()
}

#[test]
fn internal_traffic_policy_local_for_direct_callers_and_backend_refs() {
    let mut index = Index::for_node("node-a");
    let route = json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "r", "namespace": "ns"},
        "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "front", "port": 80}],
                 "rules": [{"backendRefs": [{"name": "local", "port": 80}]}]},
    });
    load(
        &mut index,
        vec![
            service("local", 1, json!({"internalTrafficPolicy": "Local"})),
            slice("local", &[(1, "node-a", &[]), (2, "node-b", &[])]),
            service("front", 2, json!({})),
            route,
        ],
    );
    assert_eq!(direct(&index, "local"), ["10.0.0.1"]);
    let endpoints = with_plan(&index, ("ns", "front"), None, "/", |_, plan| {
        let Plan::Forward(forward) = plan else {
            panic!("forwarded")
        };
        let ips: Vec<String> = forward
            .backend
            .endpoints
            .iter()
            .map(|a| a.ip().to_string())
            .collect();
        ips
    });
    assert_eq!(
        endpoints,
        ["10.0.0.1"],
        "a backendRef to the Service keeps its policy"
    );

    // Another node's agent compiles the other endpoint.
    let mut other = Index::for_node("node-b");
    load(
        &mut other,
        vec![
            service("local", 1, json!({"internalTrafficPolicy": "Local"})),
            slice("local", &[(1, "node-a", &[]), (2, "node-b", &[])]),
        ],
    );
    assert_eq!(direct(&other, "local"), ["10.0.0.2"]);
}

#[test]
fn zone_hints_follow_the_nodes_zone_label() {
    let mut index = Index::for_node("node-a");
    load(
        &mut index,
        vec![
            service("close", 1, json!({"trafficDistribution": "PreferClose"})),
            slice("close", &[(1, "node-a", &["z1"]), (2, "node-b", &["z2"])]),
        ],
    );
    assert_eq!(
        direct(&index, "close"),
        ["10.0.0.1", "10.0.0.2"],
        "zone unknown yet: every endpoint"
    );
    load(&mut index, vec![node("node-b", "z1")]);
    assert_eq!(
        direct(&index, "close"),
        ["10.0.0.1", "10.0.0.2"],
        "another node's labels are not ours"
    );
    load(&mut index, vec![node("node-a", "z2")]);
    assert_eq!(
        direct(&index, "close"),
        ["10.0.0.2"],
        "the Node's zone label arrived"
    );
}

#[test]
fn session_affinity_reaches_the_backend() {
    let mut index = Index::for_node("node-a");
    load(
        &mut index,
        vec![
            service(
                "sticky",
                1,
                json!({"sessionAffinity": "ClientIP",
                "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}}),
            ),
            service("default-timeout", 2, json!({"sessionAffinity": "ClientIP"})),
            service("none", 3, json!({})),
        ],
    );
    let snapshot = index.snapshot();
    let affinity = |name: &str| {
        snapshot
            .frontend_of(&ObjectKey::new("ns", name), 80)
            .unwrap()
            .direct
            .affinity
    };
    assert_eq!(affinity("sticky"), Some(Duration::from_secs(60)));
    assert_eq!(
        affinity("default-timeout"),
        Some(Duration::from_secs(10_800))
    );
    assert_eq!(affinity("none"), None);
}

/// The endpoints (ip:port) of `service`'s frontend at `port`.
fn direct_at(index: &Index, service: &str, port: u16) -> Option<Vec<String>> {
    let snapshot = index.snapshot();
    let frontend = snapshot.frontend_of(&ObjectKey::new("ns", service), port)?;
    Some(
        frontend
            .direct
            .endpoints
            .iter()
            .map(|a| a.to_string())
            .collect(),
    )
}

#[test]
fn only_tcp_ports_are_served_each_with_its_own_target_port() {
    let mut index = Index::for_node("node-a");
    // DNS's two ports on one number: the TCP one's endpoints listen elsewhere.
    let dns_ports = json!([{"name": "dns", "port": 53, "protocol": "UDP"},
                           {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]);
    let mut dns_slice = slice("dns", &[(1, "node-a", &[])]);
    dns_slice["ports"] = json!([{"name": "dns", "port": 5353, "protocol": "UDP"},
                                {"name": "dns-tcp", "port": 5354, "protocol": "TCP"}]);
    let mut udp_slice = slice("udp", &[(2, "node-a", &[])]);
    udp_slice["ports"] = json!([{"name": "http", "port": 8080, "protocol": "UDP"}]);
    load(
        &mut index,
        vec![
            service("dns", 1, json!({"ports": dns_ports})),
            dns_slice,
            service(
                "udp",
                2,
                json!({"ports": [{"name": "http", "port": 80, "protocol": "UDP"}]}),
            ),
            udp_slice,
        ],
    );
    assert_eq!(direct_at(&index, "dns", 53).unwrap(), ["10.0.0.1:5354"]);
    assert_eq!(
        direct_at(&index, "udp", 80),
        None,
        "a UDP port has no frontend"
    );
    assert!(
        !index
            .snapshot()
            .mesh_addresses()
            .any(|(a, _)| a.ip().to_string() == "10.96.0.2"),
        "nor is it steered"
    );
}

#[test]
fn a_dual_stack_service_is_served_by_its_primary_familys_endpoints() {
    let mut index = Index::for_node("node-a");
    let v6_slice = |addresses: Value| {
        let mut v6 = slice("dual", &[]);
        v6["metadata"]["name"] = json!("dual-v6");
        v6["addressType"] = json!("IPv6");
        v6["endpoints"] = json!([{"addresses": addresses, "conditions": {"ready": true}}]);
        v6
    };
    let dual = service(
        "dual",
        1,
        json!({"clusterIPs": ["10.96.0.1", "fd00::1"], "ipFamilies": ["IPv4", "IPv6"]}),
    );
    load(
        &mut index,
        vec![
            dual,
            slice("dual", &[(1, "node-a", &[])]),
            v6_slice(json!(["fd00::10"])),
        ],
    );
    let snapshot = index.snapshot();
    for vip in ["10.96.0.1:80", "[fd00::1]:80"] {
        let frontend = snapshot.frontend_at(vip.parse().unwrap()).unwrap();
        let endpoints: Vec<String> = frontend
            .direct
            .endpoints
            .iter()
            .map(|a| a.to_string())
            .collect();
        assert_eq!(endpoints, ["10.0.0.1:8080"], "through {vip}");
    }
    // With no ready endpoint of its primary family, the other family's serve.
    load(&mut index, vec![slice("dual", &[])]);
    assert_eq!(direct_at(&index, "dual", 80).unwrap(), ["[fd00::10]:8080"]);
}

#[test]
fn an_endpoint_without_a_serving_condition_is_serving() {
    let mut index = Index::for_node("node-a");
    let mut terminating = slice("going", &[]);
    terminating["endpoints"] = json!([
        {"addresses": ["10.0.0.1"], "conditions": {"ready": false, "terminating": true}}
    ]);
    load(
        &mut index,
        vec![service("going", 1, json!({})), terminating],
    );
    assert_eq!(
        direct(&index, "going"),
        ["10.0.0.1"],
        "terminating, still serving (the API: nil means true): the fallback when none is ready"
    );
}

/// Two Services with one ClusterIP (a watch behind: one deleted, its address given to a new
/// one, seen in the wrong order): the address stays with the one left, whichever was compiled
/// last. Before, deleting the first after it was recompiled dropped the address altogether, and
/// the other Service was neither steered nor served until it changed.
#[test]
fn a_clusterip_two_services_claimed_stays_with_the_one_left() {
    let mut index = Index::new();
    load(
        &mut index,
        vec![service("a", 50, json!({})), slice("a", &[(1, "n", &[])])],
    );
    load(&mut index, vec![service("b", 50, json!({}))]);
    // `a` recompiled after `b` claimed the address (its slice went), then deleted.
    index.delete(&ObjectRef::EndpointSlice(ObjectKey::new("ns", "a-1")));
    index.publish();
    index.delete(&ObjectRef::Service(ObjectKey::new("ns", "a")));
    index.publish();
    let snapshot = index.snapshot();
    let at = snapshot
        .frontend_at("10.96.0.50:80".parse().unwrap())
        .expect("the address is b's");
    assert_eq!(at.service, ObjectKey::new("ns", "b"));
}

/// A port number or an address the API server let through (it does not check a slice's port
/// numbers; older releases took `10.001.0.5`) drops that port or endpoint, as kube-proxy skips
/// them, not the whole slice: before, the slice was refused and its last good version, endpoints
/// since removed included, stayed in use.
#[test]
fn a_bad_port_or_address_drops_only_itself_from_its_slice() {
    let mut index = Index::for_node("node-a");
    let mut odd = slice("s", &[(1, "node-a", &[]), (2, "node-a", &[])]);
    load(&mut index, vec![service("s", 1, json!({})), odd.clone()]);
    assert_eq!(direct(&index, "s"), ["10.0.0.1", "10.0.0.2"]);
    odd["ports"] = json!([{"name": "http", "port": 8080}, {"name": "admin", "port": 0}]);
    odd["endpoints"][0]["addresses"] = json!(["10.0.0.256"]);
    load(&mut index, vec![odd.clone()]);
    assert_eq!(direct(&index, "s"), ["10.0.0.2"]);
    // Leading zeros are read as kube-proxy reads them.
    odd["endpoints"][0]["addresses"] = json!(["10.001.0.5"]);
    load(&mut index, vec![odd]);
    assert_eq!(direct(&index, "s"), ["10.0.0.2", "10.1.0.5"]);
}

/// A ClusterIP with leading zeros (stored before API servers validated strictly) is read as
/// kube-proxy reads it, decimal: the Service is served. An FQDN slice's addresses are no
/// endpoints, even one that reads as an IPv4 address, as in kube-proxy.
#[test]
fn a_sloppy_clusterip_is_served_and_an_fqdn_slice_is_not() {
    let mut index = Index::for_node("node-a");
    let mut fqdn = slice("s", &[(1, "node-a", &[])]);
    fqdn["metadata"]["name"] = "s-fqdn".into();
    fqdn["addressType"] = "FQDN".into();
    load(
        &mut index,
        vec![
            service("s", 1, json!({"clusterIP": "10.96.0.010"})),
            slice("s", &[(2, "node-a", &[])]),
            fqdn,
        ],
    );
    let snapshot = index.snapshot();
    let frontend = snapshot
        .frontend_at("10.96.0.10:80".parse().unwrap())
        .expect("the Service at its ClusterIP read as decimal");
    assert_eq!(frontend.service.name, "s");
    assert_eq!(direct(&index, "s"), ["10.0.0.2"]);
}

/// A slice labelled for another proxy (`service.kubernetes.io/service-proxy-name`, a hand-made
/// slice of a Service without a selector) has no endpoints here, as kube-proxy's watch leaves it
/// out; one that gains the label loses those it had.
#[test]
fn a_slice_labelled_for_another_proxy_is_not_served() {
    let mut index = Index::for_node("node-a");
    let mut theirs = slice("s", &[(3, "node-a", &[])]);
    theirs["metadata"]["name"] = "s-theirs".into();
    load(
        &mut index,
        vec![
            service("s", 1, json!({})),
            slice("s", &[(2, "node-a", &[])]),
            theirs.clone(),
        ],
    );
    assert_eq!(direct(&index, "s"), ["10.0.0.2", "10.0.0.3"]);
    theirs["metadata"]["labels"]["service.kubernetes.io/service-proxy-name"] = "other".into();
    load(&mut index, vec![theirs]);
    assert_eq!(direct(&index, "s"), ["10.0.0.2"]);
}

/// A headless Service has no ClusterIP to tell its first family by: its `ipFamilies` does. A
/// dual-stack one (a StatefulSet's, PreferDualStack) as a backendRef listed each pod twice, once
/// per family, and about half the picks dialled the family the pods may not listen on.
#[test]
fn a_dual_stack_headless_backend_is_served_by_its_first_familys_endpoints() {
    let mut index = Index::for_node("node-a");
    let headless = service(
        "db",
        0,
        json!({"clusterIP": "None", "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "PreferDualStack"}),
    );
    let mut v6 = slice("db", &[]);
    v6["metadata"]["name"] = json!("db-v6");
    v6["addressType"] = json!("IPv6");
    v6["endpoints"] = json!([{"addresses": ["fd00::10"], "conditions": {"ready": true}}]);
    let route = json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "to-db", "namespace": "ns"},
        "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "front", "port": 80}],
                 "rules": [{"backendRefs": [{"name": "db", "port": 80}]}]},
    });
    load(
        &mut index,
        vec![
            headless,
            slice("db", &[(1, "node-a", &[])]),
            v6,
            service("front", 2, json!({})),
            route,
        ],
    );
    let snapshot = index.snapshot();
    let db = snapshot
        .backends()
        .find(|b| b.service == ObjectKey::new("ns", "db"))
        .expect("the route's backend");
    let endpoints: Vec<String> = db.endpoints.iter().map(|a| a.to_string()).collect();
    assert_eq!(endpoints, ["10.0.0.1:8080"]);
}

/// A Service labelled `service.kubernetes.io/service-proxy-name` belongs to another proxy (a
/// secondary network's): kube-proxy leaves it alone, and so does the mesh. A route to it as a
/// parent is not Accepted (nothing is steered); as a backend it does not resolve, as an
/// ExternalName Service does not.
#[test]
fn a_service_handed_to_another_proxy_is_neither_parent_nor_backend() {
    let mut index = Index::for_node("node-a");
    let mut other = service("other", 1, json!({}));
    other["metadata"]["labels"] = json!({"service.kubernetes.io/service-proxy-name": "multus"});
    let route = |name: &str, parent: &str, backend: &str| {
        json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": name, "namespace": "ns"},
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": parent, "port": 80}],
                     "rules": [{"backendRefs": [{"name": backend, "port": 80}]}]},
        })
    };
    load(
        &mut index,
        vec![
            other,
            slice("other", &[(1, "node-a", &[])]),
            service("front", 2, json!({})),
            route("onto-other", "other", "front"),
            route("to-other", "front", "other"),
            service(
                "external",
                3,
                json!({"type": "ExternalName", "externalName": "db.example.com", "clusterIP": null}),
            ),
            route("to-external", "front", "external"),
        ],
    );
    let snapshot = index.snapshot();
    assert!(snapshot
        .frontend_of(&ObjectKey::new("ns", "other"), 80)
        .is_none());
    let steered: Vec<_> = snapshot.mesh_addresses().map(|(a, _)| a.ip()).collect();
    assert_eq!(steered, ["10.96.0.2".parse::<std::net::IpAddr>().unwrap()]);
    let condition = |route: &str, type_: &str| {
        let status = snapshot
            .status_of(&format!("HTTPRoute ns/{route}"))
            .unwrap();
        let c = status[0].condition(type_).unwrap();
        (c.status, c.reason, c.message.to_string())
    };
    let (status, reason, message) = condition("onto-other", "Accepted");
    assert_eq!((status, reason), ("False", "NoMatchingParent"));
    assert!(message.contains("handed to the proxy multus"), "{message}");
    let (status, reason, message) = condition("to-other", "ResolvedRefs");
    assert_eq!((status, reason), ("False", "UnsupportedValue"));
    assert!(message.contains("the proxy multus"), "{message}");
    // Both Services exist: not "BackendNotFound", which says they do not.
    let (status, reason, message) = condition("to-external", "ResolvedRefs");
    assert_eq!((status, reason), ("False", "UnsupportedValue"));
    assert!(message.contains("ExternalName"), "{message}");
}

/// A terminating Pod is not opted in to local sockets: its IP is freed when its sandbox goes,
/// and may be a new pod's (one that did not opt in, whose bytes the kernel must not pair) before
/// the agent hears of it.
#[test]
fn a_terminating_pod_is_not_opted_in_to_local_sockets() {
    let pod = |deleting: bool| {
        let mut pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "namespace": "ns", "uid": "u-1",
                         "annotations": {"gamma-node.io/local-sockets": "true"}},
            "spec": {"containers": [{"name": "c", "image": "i"}], "nodeName": "node-a"},
            "status": {"phase": "Running", "podIP": "10.1.0.5"}
        });
        if deleting {
            pod["metadata"]["deletionTimestamp"] = json!("2026-12-06T00:00:00Z");
        }
        pod
    };
    for (deleting, opted_in) in [(false, true), (true, false)] {
        let mut index = Index::for_node("node-a");
        load(&mut index, vec![pod(deleting)]);
        let snapshot = index.snapshot();
        let caller = snapshot
            .caller("10.1.0.5".parse().unwrap())
            .expect("its caller");
        assert_eq!(caller.local_sockets, opted_in, "deleting: {deleting}");
    }
}

/// A persisted session goes back through the backendRef it began through, while that one still
/// serves its endpoint: two backendRefs to one Service (the second adding a header) share every
/// endpoint, and a session begun through the second went back through the first, without its
/// header, from its second request on.
#[test]
fn a_session_goes_back_through_the_backend_ref_it_began_through() {
    let mut index = Index::for_node("node-a");
    let route = json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "r", "namespace": "ns"},
        "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "front", "port": 80}],
                 "rules": [{"backendRefs": [
                     {"name": "back", "port": 80},
                     {"name": "back", "port": 80, "filters": [{"type": "RequestHeaderModifier",
                      "requestHeaderModifier": {"set": [{"name": "x-variant", "value": "b"}]}}]}],
                  "sessionPersistence": {"type": "Cookie", "cookie": {"name": "sid"}}}]},
    });
    load(
        &mut index,
        vec![
            service("back", 1, json!({})),
            slice("back", &[(1, "node-a", &[])]),
            service("front", 2, json!({})),
            route,
        ],
    );
    let endpoint = "10.0.0.1:8080".parse().unwrap();
    with_plan(&index, ("ns", "front"), None, "/", |rule, _| {
        assert_eq!(rule.backend_serving(endpoint, Some(1)), Some(1));
        assert_eq!(rule.backend_serving(endpoint, Some(0)), Some(0));
        assert_eq!(
            rule.backend_serving(endpoint, None),
            Some(0),
            "a session of an older agent's token: the first that serves it"
        );
        assert_eq!(
            rule.backend_serving(endpoint, Some(7)),
            Some(0),
            "a backendRef since removed"
        );
        let gone = "10.0.0.9:8080".parse().unwrap();
        assert_eq!(rule.backend_serving(gone, Some(1)), None);
        assert!(
            rule.endpoint_is_shared(endpoint),
            "the token names the backendRef"
        );
        assert!(!rule.endpoint_is_shared(gone));
    });
}
