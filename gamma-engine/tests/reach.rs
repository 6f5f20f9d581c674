//! Reach is never widened: the agent dials backends from the node, where NetworkPolicy cannot
//! tell callers apart, so a backendRef into a namespace that is neither the route's nor its parent
//! Service's needs a ReferenceGrant in that namespace (GEP-1294, GEP-709). Without one its share
//! is answered 500 and the route's status says `ResolvedRefs=False RefNotPermitted`.

use gamma_engine::index::Index;
#[path = "support/requests.rs"]
mod requests;

use gamma_engine::model::Object;
use gamma_engine::routes::{LocalResponse, Plan};
use requests::with_plan;
use serde_json::{json, Value};

fn service(namespace: &str, name: &str, ip: u8) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"clusterIP": format!("10.96.0.{ip}"), "ports": [{"name": "http", "port": 80}]}
    })
}

/// A consumer route in `consumer` for `producer/front`, sending to `backend` (namespace/name).
fn route(kind: &str, backend: (&str, &str)) -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": kind,
        "metadata": {"name": "r", "namespace": "consumer"},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "namespace": "producer", "name": "front", "port": 80}],
            "rules": [{"backendRefs": [{"name": backend.1, "namespace": backend.0, "port": 80}]}],
        }
    })
}

fn grant(from_kind: &str, to_name: Option<&str>) -> Value {
    let mut to = json!({"group": "", "kind": "Service"});
    if let Some(name) = to_name {
        to["name"] = name.into();
    }
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1beta1", "kind": "ReferenceGrant",
        "metadata": {"name": "g", "namespace": "third"},
        "spec": {"from": [{"group": "gateway.networking.k8s.io", "kind": from_kind, "namespace": "consumer"}],
                 "to": [to]},
    })
}

fn object(value: Value) -> Object {
    Object::from_value(value.clone()).unwrap_or_else(|e| panic!("{e}: {value}"))
}

fn world(route_value: Value) -> Index {
    let mut index = Index::new();
    for value in [
        service("producer", "front", 1),
        service("producer", "back", 2),
        service("third", "secret", 3),
        service("third", "other", 4),
        route_value,
    ] {
        index.apply(object(value));
    }
    index.publish();
    index
}

/// What a caller of the consumer namespace gets: forwarded to a Service, or a local answer.
fn consumer_answer(index: &Index) -> String {
    with_plan(
        index,
        ("producer", "front"),
        Some("consumer"),
        "/",
        |_, plan| match plan {
            Plan::Forward(f) => format!("forwarded to {}", f.backend.service),
            Plan::Respond(LocalResponse::UnresolvedBackend(e), _) => format!("500: {e}"),
            Plan::Respond(other, _) => format!("{}", other.status()),
        },
    )
}

fn resolved_refs(index: &Index, kind: &str) -> (String, String) {
    let snapshot = index.snapshot();
    let status = snapshot.status_of(&format!("{kind} consumer/r")).unwrap();
    let condition = status[0].condition("ResolvedRefs").unwrap();
    (condition.status.to_string(), condition.reason.to_string())
}

#[test]
fn a_backend_in_the_parents_namespace_needs_no_grant() {
    let index = world(route("HTTPRoute", ("producer", "back")));
    assert_eq!(consumer_answer(&index), "forwarded to producer/back");
    assert_eq!(
        resolved_refs(&index, "HTTPRoute"),
        ("True".into(), "ResolvedRefs".into())
    );
}

#[test]
fn a_third_namespace_needs_a_grant_that_names_the_route_kind_namespace_and_service() {
    let mut index = world(route("HTTPRoute", ("third", "secret")));
    let refused = consumer_answer(&index);
    assert!(
        refused.starts_with("500: backendRef third/secret/80")
            && refused.contains("ReferenceGrant"),
        "{refused}"
    );
    assert_eq!(
        resolved_refs(&index, "HTTPRoute"),
        ("False".into(), "RefNotPermitted".into())
    );

    // Grants that do not match: another route kind, another Service.
    for wrong in [grant("GRPCRoute", None), grant("HTTPRoute", Some("other"))] {
        index.apply(object(wrong));
        index.publish();
        assert!(
            consumer_answer(&index).starts_with("500"),
            "{}",
            consumer_answer(&index)
        );
        assert_eq!(resolved_refs(&index, "HTTPRoute").1, "RefNotPermitted");
    }

    // The grant that matches (by name, then for every Service): allowed.
    for right in [grant("HTTPRoute", Some("secret")), grant("HTTPRoute", None)] {
        index.apply(object(right));
        index.publish();
        assert_eq!(consumer_answer(&index), "forwarded to third/secret");
        assert_eq!(
            resolved_refs(&index, "HTTPRoute"),
            ("True".into(), "ResolvedRefs".into())
        );
    }

    // Withdrawn: refused again.
    index.delete(&object(grant("HTTPRoute", None)).reference());
    index.publish();
    assert!(consumer_answer(&index).starts_with("500"));
    assert_eq!(resolved_refs(&index, "HTTPRoute").1, "RefNotPermitted");
}

#[test]
fn grpc_routes_need_a_grant_for_their_own_kind() {
    let mut index = world(route("GRPCRoute", ("third", "secret")));
    assert_eq!(resolved_refs(&index, "GRPCRoute").1, "RefNotPermitted");
    index.apply(object(grant("GRPCRoute", None)));
    index.publish();
    assert_eq!(resolved_refs(&index, "GRPCRoute").0, "True");
}
