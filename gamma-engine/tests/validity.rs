//! Route validity as `kubectl get httproute -o yaml` shows it and as requests see it: invalid
//! rules dropped (PartiallyInvalid) without handing their requests to another rule, a route
//! with no valid rule refused whole, and a refused edit reported at its own generation while
//! the last good generation keeps serving.

use gamma_engine::index::Index;
#[path = "support/requests.rs"]
mod requests;

use gamma_engine::model::{Object, ObjectKey};
use gamma_engine::routes::status::ParentStatus;
use gamma_engine::routes::{LocalResponse, Plan};
use requests::{with_plan, with_plan_drawn};
use serde_json::{json, Value};

fn service() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "front", "namespace": "ns"},
        "spec": {"clusterIP": "10.96.0.1", "ports": [{"name": "http", "port": 80}]}
    })
}

fn backend_service() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "back", "namespace": "ns"},
        "spec": {"clusterIP": "10.96.0.2", "ports": [{"name": "http", "port": 80}]}
    })
}

fn route(generation: i64, rules: Value) -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "r", "namespace": "ns", "generation": generation},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "front", "port": 80}],
            "rules": rules,
        }
    })
}

/// The object as a source hands it to the index: a refused route as its refusal.
fn object(value: Value) -> Object {
    match Object::from_value(value) {
        Ok(object) => object,
        Err(e) => Object::RefusedRoute(
            e.refused_route()
                .unwrap_or_else(|| panic!("not a refused route: {e}"))
                .clone(),
        ),
    }
}

fn index_with(route_value: Value) -> Index {
    let mut index = Index::new();
    for value in [service(), backend_service(), route_value] {
        index.apply(object(value));
    }
    index.publish();
    index
}

fn route_status(index: &Index) -> Vec<ParentStatus> {
    index
        .snapshot()
        .status_of("HTTPRoute ns/r")
        .map(|s| s.to_vec())
        .unwrap_or_default()
}

fn condition<'a>(
    status: &'a [ParentStatus],
    type_: &str,
) -> Option<&'a gamma_engine::routes::status::Condition> {
    status.first().and_then(|p| p.condition(type_))
}

/// The route's Accepted condition: whether it is, and the generation it is about.
fn accepted_at(index: &Index) -> (&'static str, i64) {
    let status = route_status(index);
    let accepted = condition(&status, "Accepted").expect("an Accepted condition");
    (accepted.status, status[0].observed_generation)
}

/// What the rule matched by `path` answers: the backend it forwards to, or its local answer.
fn answer(index: &Index, path: &str) -> String {
    with_plan(
        index,
        ("ns", "front"),
        None,
        path,
        |rule, plan| match plan {
            Plan::Forward(_) => format!("rule {} forwards", rule.index),
            Plan::Respond(LocalResponse::InvalidRule(why), _) => {
                format!("rule {} answers 500: {why}", rule.index)
            }
            Plan::Respond(other, _) => format!("rule {} answers {}", rule.index, other.status()),
        },
    )
}

/// Rule 0's requests get 500 and the route is not Accepted: its only rule dropped for an
/// ExtensionRef filter.
fn assert_refused_for_its_extension_ref(index: &Index) {
    assert_eq!(
        answer(index, "/x"),
        "rule 0 answers 500 Internal Server Error"
    );
    let status = route_status(index);
    let accepted = condition(&status, "Accepted").unwrap();
    assert_eq!(
        (accepted.status, accepted.reason),
        ("False", "UnsupportedValue")
    );
    assert!(
        accepted
            .message
            .contains("the requests its rules match are answered 500"),
        "{}",
        accepted.message
    );
    assert!(
        accepted
            .message
            .contains("Dropped Rule 0: filter ExtensionRef"),
        "{}",
        accepted.message
    );
}

#[test]
fn invalid_rules_are_dropped_and_their_requests_get_500() {
    let index = index_with(route(
        3,
        json!([
            // 0: valid, and a prefix that would otherwise catch everything.
            {"backendRefs": [{"name": "back", "port": 80}]},
            // 1: its match does not convert: it matches nothing.
            {"matches": [{"path": {"type": "RegularExpression", "value": "/(unclosed"}}],
             "backendRefs": [{"name": "back", "port": 80}]},
            // 2: its filter is invalid: its matches still claim their requests.
            {"name": "moved", "matches": [{"path": {"type": "Exact", "value": "/moved"}}],
             "filters": [{"type": "RequestRedirect", "requestRedirect": {"statusCode": 399}}]},
        ]),
    ));
    assert_eq!(answer(&index, "/anything"), "rule 0 forwards");
    let moved = answer(&index, "/moved");
    assert!(
        moved.starts_with("rule 2 answers 500") && moved.contains("statusCode"),
        "{moved}"
    );
    let status = route_status(&index);
    let accepted = condition(&status, "Accepted").unwrap();
    assert_eq!(
        (accepted.status, status[0].observed_generation),
        ("True", 3)
    );
    let partially = condition(&status, "PartiallyInvalid").expect("PartiallyInvalid is set");
    assert_eq!(partially.status, "True");
    assert!(
        partially.message.starts_with("Dropped Rule 1: "),
        "{}",
        partially.message
    );
    assert!(
        partially.message.contains("regular expression"),
        "{}",
        partially.message
    );
    assert!(
        partially.message.contains("Dropped Rule 2 (moved): "),
        "{}",
        partially.message
    );
    assert!(
        !partially.message.contains("Rule 0"),
        "{}",
        partially.message
    );
}

/// Rules none of which is valid: a header regular expression that does not compile.
fn no_valid_rule() -> Value {
    json!([{"matches": [{"headers": [{"type": "RegularExpression", "name": "x", "value": "("}]}],
            "backendRefs": [{"name": "back", "port": 80}]}])
}

#[test]
fn a_route_whose_rules_are_all_invalid_is_refused_at_its_generation() {
    let all_invalid = route(2, no_valid_rule());
    // Never valid: nothing served, the status says why at generation 2.
    let index = index_with(all_invalid.clone());
    assert!(index
        .snapshot()
        .frontend_of(&ObjectKey::new("ns", "front"), 80)
        .is_none_or(|f| !f.has_routes()));
    let status = route_status(&index);
    let accepted = condition(&status, "Accepted").unwrap();
    assert_eq!(
        (
            accepted.status,
            accepted.reason,
            status[0].observed_generation
        ),
        ("False", "UnsupportedValue", 2)
    );
    assert!(
        accepted.message.contains("no rule is valid"),
        "{}",
        accepted.message
    );
    assert!(
        accepted.message.contains("nothing of this route is in use"),
        "{}",
        accepted.message
    );

    // Invalid from its first generation: no earlier one to speak of.
    let first = route(1, no_valid_rule());
    let status = route_status(&index_with(first));
    let accepted = condition(&status, "Accepted").unwrap();
    assert!(
        !accepted.message.contains("earlier generation"),
        "{}",
        accepted.message
    );

    // An invalid edit of a good route: generation 1 keeps serving, generation 2 is reported.
    let good = route(1, json!([{"backendRefs": [{"name": "back", "port": 80}]}]));
    let mut index = index_with(good);
    assert_eq!(answer(&index, "/x"), "rule 0 forwards");
    index.apply(object(all_invalid));
    assert!(index.publish(), "the status changed");
    assert_eq!(answer(&index, "/x"), "rule 0 forwards");
    assert_eq!(accepted_at(&index), ("False", 2));
    let status = route_status(&index);
    let accepted = condition(&status, "Accepted").unwrap();
    assert!(
        accepted.message.contains("generation 1 stays in use"),
        "{}",
        accepted.message
    );

    // Fixed at generation 3: accepted again, the refusal gone.
    index.apply(object(route(
        3,
        json!([{"backendRefs": [{"name": "back", "port": 80}]}]),
    )));
    index.publish();
    assert_eq!(accepted_at(&index), ("True", 3));
    assert!(condition(&route_status(&index), "PartiallyInvalid").is_none());

    // Deleted: no status left.
    index.delete(&object(route(3, json!([]))).reference());
    index.publish();
    assert!(route_status(&index).is_empty());
}

/// An invalid edit that also moves the route off its Service (to a Gateway): the last good
/// generation still routes the Service, and its entry says so rather than vanish.
#[test]
fn an_invalid_edit_moving_the_route_keeps_reporting_where_the_old_one_serves() {
    // Generation 1 served on `front`, then an invalid generation 2 with `parent_refs`.
    let moved_to = |parent_refs: Value| {
        let mut index = index_with(route(
            1,
            json!([{"backendRefs": [{"name": "back", "port": 80}]}]),
        ));
        let mut moved = route(2, no_valid_rule());
        moved["spec"]["parentRefs"] = parent_refs;
        index.apply(object(moved));
        index.publish();
        index
    };
    let index = moved_to(json!([{"name": "gateway"}]));
    assert_eq!(answer(&index, "/x"), "rule 0 forwards");
    let status = route_status(&index);
    assert_eq!(status.len(), 1, "{status:?}");
    assert_eq!(status[0].parent_ref().name, "front");
    let accepted = condition(&status, "Accepted").unwrap();
    assert_eq!(
        (accepted.status, status[0].observed_generation),
        ("False", 2)
    );
    assert!(
        accepted.message.contains("generation 1 stays in use"),
        "{}",
        accepted.message
    );

    // Moved to another port of the same Service: the old port's entry stays too.
    let index = moved_to(json!([{"group": "", "kind": "Service", "name": "front", "port": 8080}]));
    let ports: Vec<Option<u16>> = route_status(&index)
        .iter()
        .map(|s| s.parent_ref().port)
        .collect();
    assert_eq!(ports, [Some(8080), Some(80)]);
}

#[test]
fn a_route_of_unsupported_filters_only_is_not_accepted_but_never_skips_them() {
    let index = index_with(route(
        1,
        json!([{"filters": [{"type": "ExtensionRef",
                             "extensionRef": {"group": "example.com", "kind": "Auth", "name": "x"}}],
                "backendRefs": [{"name": "back", "port": 80}]}]),
    ));
    assert_refused_for_its_extension_ref(&index);
    assert!(
        condition(&route_status(&index), "PartiallyInvalid").is_none(),
        "set only when some rule is valid"
    );
}

/// A backendRef's unsupported filter fails that backend's share, not the rule: the route is
/// Accepted, the backendRef invalid (`ResolvedRefs=False` names it), and not `PartiallyInvalid`,
/// whose message the spec has start with "Dropped Rule": no rule is dropped. Only when every
/// weighted backend has one is the rule dropped (all its requests get 500).
#[test]
fn a_backends_unsupported_filter_fails_its_share_not_the_rule() {
    let auth = json!([{"type": "ExtensionRef",
                       "extensionRef": {"group": "example.com", "kind": "Auth", "name": "x"}}]);
    let index = index_with(route(
        1,
        json!([{"backendRefs": [
            {"name": "back", "port": 80, "weight": 1},
            {"name": "back", "port": 80, "weight": 0, "filters": auth}]}]),
    ));
    assert_eq!(answer(&index, "/x"), "rule 0 forwards");
    assert_eq!(accepted_at(&index), ("True", 1));
    let status = route_status(&index);
    assert!(condition(&status, "PartiallyInvalid").is_none());
    let resolved = condition(&status, "ResolvedRefs").unwrap();
    assert_eq!(
        (resolved.status, resolved.reason),
        ("False", "UnsupportedValue")
    );
    assert!(
        resolved
            .message
            .starts_with("Rule 0: backendRef 1 (back): filter ExtensionRef"),
        "{}",
        resolved.message
    );

    let index = index_with(route(
        1,
        json!([{"backendRefs": [
            {"name": "back", "port": 80, "weight": 0},
            {"name": "back", "port": 80, "weight": 1, "filters": auth}]}]),
    ));
    assert_refused_for_its_extension_ref(&index);
}

/// A filter the agent cannot apply is not skipped because one before it answers (a redirect):
/// the rule's requests get the 500 its status promises (an ExtensionRef that cannot be resolved
/// "MUST NOT be skipped").
#[test]
fn an_unsupported_filter_is_not_skipped_by_a_redirect_before_it() {
    let index = index_with(route(
        1,
        json!([{"filters": [
            {"type": "RequestRedirect", "requestRedirect": {"hostname": "elsewhere"}},
            {"type": "ExtensionRef",
             "extensionRef": {"group": "example.com", "kind": "Auth", "name": "x"}}]}]),
    ));
    assert_eq!(
        answer(&index, "/x"),
        "rule 0 answers 500 Internal Server Error"
    );
}

/// A mirror's share is sampled when the filters run, so that a request not mirrored copies
/// nothing, and independently of the backend's pick: with weights 4/1 and a 1-in-5 mirror on
/// the second backend, about 1 request in 25 is mirrored (with one number for both, none was).
#[test]
fn a_mirrors_share_is_sampled_apart_from_the_backends_pick() {
    let mirror = json!({"type": "RequestMirror", "requestMirror": {
        "backendRef": {"name": "back", "port": 80}, "fraction": {"numerator": 1, "denominator": 5}}});
    let index = index_with(route(
        1,
        json!([{"backendRefs": [{"name": "back", "port": 80, "weight": 4},
                                {"name": "back", "port": 80, "weight": 1, "filters": [mirror]}]}]),
    ));
    let (mut second, mut mirrored) = (0, 0);
    for random in 0..5_000u64 {
        with_plan_drawn(&index, ("ns", "front"), None, "/x", random, |_, plan| {
            let Plan::Forward(forward) = plan else {
                panic!("forwarded: {plan:?}");
            };
            second += usize::from(forward.backend_index == 1);
            mirrored += forward.mirrors.len();
            assert!(
                forward.mirrors.is_empty() || forward.backend_index == 1,
                "only the second backend's requests"
            );
        });
    }
    assert_eq!(second, 1_000, "weights 4/1");
    assert!(
        (120..=280).contains(&mirrored),
        "{mirrored} of 1,000 mirrored"
    );
}

/// The CRD's rules for a filter list hold for a backendRef's list as for the rule's (a manifest
/// folder runs no CEL): a redirect beside a rewrite, or CORS twice (the second's headers replaced
/// the first's), drop the rule.
#[test]
fn a_backend_refs_filters_are_held_to_the_crds_rules() {
    let rewrite = json!({"type": "URLRewrite", "urlRewrite": {"path":
        {"type": "ReplaceFullPath", "replaceFullPath": "/v2"}}});
    let redirect = json!({"type": "RequestRedirect", "requestRedirect": {"scheme": "https"}});
    let cors = json!({"type": "CORS", "cors": {"allowOrigins": ["https://a.example"]}});
    for (filters, says) in [
        (json!([rewrite, redirect]), "cannot be combined"),
        (json!([cors, cors]), "CORS may appear at most once"),
    ] {
        let index = index_with(route(
            1,
            json!([{"matches": [{"path": {"type": "Exact", "value": "/other"}}],
                    "backendRefs": [{"name": "back", "port": 80}]},
                   {"matches": [{"path": {"type": "PathPrefix", "value": "/foo"}}],
                    "backendRefs": [{"name": "back", "port": 80, "filters": filters}]}]),
        ));
        let answer = answer(&index, "/foo/bar");
        assert!(answer.starts_with("rule 1 answers 500"), "{answer}");
        assert!(answer.contains(says), "{answer}");
        assert!(answer.contains("backendRefs[0].filters"), "{answer}");
    }
}

/// A path rewrite on the rule and another on one of its backendRefs are refused together: the
/// second ran on the first's result, where the matched prefix no longer is, and prepended its
/// value to the whole path (`/foo/bar` through `/v2` then `/api` became `/api/v2/bar`).
#[test]
fn a_path_rewrite_on_the_rule_and_on_a_backend_ref_is_refused() {
    let prefix = |value: &str| {
        json!({"type": "URLRewrite", "urlRewrite": {"path":
        {"type": "ReplacePrefixMatch", "replacePrefixMatch": value}}})
    };
    let index = index_with(route(
        1,
        json!([{"matches": [{"path": {"type": "Exact", "value": "/other"}}],
                "backendRefs": [{"name": "back", "port": 80}]},
               {"matches": [{"path": {"type": "PathPrefix", "value": "/foo"}}],
                "filters": [prefix("/v2")],
                "backendRefs": [{"name": "back", "port": 80, "filters": [prefix("/api")]}]}]),
    ));
    let answer = answer(&index, "/foo/bar");
    assert!(answer.starts_with("rule 1 answers 500"), "{answer}");
    assert!(answer.contains("cannot be combined"), "{answer}");
    // Nor a redirect on a backendRef, of the path or not: its Location said `/xyz/v2/bar`, or
    // `/v2/bar`.
    let redirect = json!({"type": "RequestRedirect", "requestRedirect": {"statusCode": 301}});
    let index = index_with(route(
        1,
        json!([{"matches": [{"path": {"type": "Exact", "value": "/other"}}],
                "backendRefs": [{"name": "back", "port": 80}]},
               {"matches": [{"path": {"type": "PathPrefix", "value": "/foo"}}],
                "filters": [prefix("/v2")],
                "backendRefs": [{"name": "back", "port": 80, "filters": [redirect]}]}]),
    ));
    let redirected = self::answer(&index, "/foo/bar");
    assert!(redirected.starts_with("rule 1 answers 500"), "{redirected}");
    assert!(redirected.contains("cannot be combined"), "{redirected}");
    // A rewrite of the host alone too: the Location took the rewritten host.
    let host = json!({"type": "URLRewrite", "urlRewrite": {"hostname": "elsewhere"}});
    let index = index_with(route(
        1,
        json!([{"matches": [{"path": {"type": "Exact", "value": "/other"}}],
                "backendRefs": [{"name": "back", "port": 80}]},
               {"matches": [{"path": {"type": "PathPrefix", "value": "/foo"}}],
                "filters": [host],
                "backendRefs": [{"name": "back", "port": 80, "filters": [redirect]}]}]),
    ));
    let redirected = self::answer(&index, "/foo/bar");
    assert!(redirected.starts_with("rule 1 answers 500"), "{redirected}");
}

/// A mirror gets the request as the filters before it left it: not what later filters make of
/// it, nor the chosen backendRef's filters, which apply only to requests forwarded to it (a
/// canary's credentials must not reach the shadow Service).
#[test]
fn a_mirror_gets_the_request_as_the_filters_before_it_left_it() {
    let set = |name: &str| {
        json!({"type": "RequestHeaderModifier",
                                 "requestHeaderModifier": {"set": [{"name": name, "value": "1"}]}})
    };
    let index = index_with(route(
        1,
        json!([{"filters": [
                    set("x-before"),
                    {"type": "RequestMirror",
                     "requestMirror": {"backendRef": {"name": "back", "port": 80}}},
                    {"type": "URLRewrite",
                     "urlRewrite": {"path": {"type": "ReplaceFullPath", "replaceFullPath": "/v2"}}}],
                "backendRefs": [{"name": "back", "port": 80, "filters": [set("authorization")]}]}]),
    ));
    with_plan(&index, ("ns", "front"), None, "/x", |_, plan| {
        let Plan::Forward(forward) = plan else {
            panic!("forwarded: {plan:?}");
        };
        let [mirror] = &forward.mirrors[..] else {
            panic!("one mirror: {:?}", forward.mirrors);
        };
        let headers = &mirror.head.headers;
        assert!(headers.contains_key("x-before"), "{headers:?}");
        assert!(!headers.contains_key("authorization"), "{headers:?}");
        assert_eq!(
            mirror.head.uri.path(),
            "/x",
            "not rewritten by the filter after it"
        );
    });
}

#[test]
fn a_refusal_is_about_its_object_not_a_namesake_created_since() {
    // Generation 4 of an old object was refused; the route was then deleted and created again
    // (a new uid) while the watch was down: the refusal is not the new route's.
    let mut refused = route(
        4,
        json!([{"matches": [{"path": {"type": "RegularExpression", "value": "("}}]}]),
    );
    refused["metadata"]["uid"] = json!("old");
    let mut recreated = route(1, json!([{"backendRefs": [{"name": "back", "port": 80}]}]));
    recreated["metadata"]["uid"] = json!("new");
    let mut index = index_with(recreated);
    index.apply(object(refused));
    index.publish();
    assert_eq!(accepted_at(&index), ("True", 1));
}

#[test]
fn an_invalid_session_persistence_drops_its_rule_and_can_refuse_the_generation() {
    let bad_session = json!({"backendRefs": [{"name": "back", "port": 80}],
                             "sessionPersistence": {"type": "Header", "header": {"name": "content-length"}}});
    // Beside a valid rule: dropped, named.
    let index = index_with(route(
        2,
        json!([{"matches": [{"path": {"type": "Exact", "value": "/ok"}}],
                                              "backendRefs": [{"name": "back", "port": 80}]},
                                             bad_session.clone()]),
    ));
    let status = route_status(&index);
    let partially = condition(&status, "PartiallyInvalid").expect("PartiallyInvalid");
    assert!(
        partially.message.contains("Dropped Rule 1")
            && partially.message.contains("sessionPersistence"),
        "{}",
        partially.message
    );
    // Alone: the generation is refused, the last good one keeps serving.
    let mut index = index_with(route(
        1,
        json!([{"backendRefs": [{"name": "back", "port": 80}]}]),
    ));
    index.apply(object(route(2, json!([bad_session]))));
    index.publish();
    assert_eq!(answer(&index, "/x"), "rule 0 forwards");
    assert_eq!(accepted_at(&index), ("False", 2));
}

/// Rules dropped for long regular expressions that do not compile: the messages quote them, and
/// the API server refuses a condition message over 32,768 characters (and with it the whole
/// status, leaving the old one in place). The message is cut to fit, whether the route is
/// refused (no valid rule) or partially invalid.
#[test]
fn a_long_condition_message_is_cut_to_what_the_api_server_stores() {
    let long_regex = format!("/(unclosed{}", "x".repeat(4_000));
    let invalid = json!({"matches": [{"headers": [{"type": "RegularExpression", "name": "x", "value": long_regex}]}],
                         "backendRefs": [{"name": "back", "port": 80}]});
    let valid = json!({"backendRefs": [{"name": "back", "port": 80}]});
    let fits = |message: &str| {
        let characters = message.chars().count();
        assert!(
            characters <= gamma_engine::routes::status::MAX_MESSAGE && message.ends_with('…'),
            "{characters} characters"
        );
    };
    let refused = index_with(route(1, json!(vec![invalid.clone(); 10])));
    let status = route_status(&refused);
    let accepted = condition(&status, "Accepted").unwrap();
    assert_eq!(accepted.status, "False", "no rule is valid");
    assert!(accepted.message.starts_with("generation 1 is invalid"));
    fits(&accepted.message);

    let mut rules = vec![valid];
    rules.extend(vec![invalid; 10]);
    let partly = index_with(route(1, json!(rules)));
    let status = route_status(&partly);
    let partially = condition(&status, "PartiallyInvalid").unwrap();
    assert!(partially.message.starts_with("Dropped Rule 1"));
    fits(&partially.message);
}

/// A backend port whose appProtocol asks for TLS, which the agent does not originate to backends,
/// is an invalid backendRef:
/// `ResolvedRefs=False` with `UnsupportedProtocol`, and its share of requests gets 500, rather
/// than cleartext sent to a TLS port.
#[test]
fn a_backend_port_the_route_cannot_be_sent_over_is_an_unsupported_protocol() {
    // `name:N`: no appProtocol, the port named N.
    let backend_port = |app_protocol: &str| {
        let mut service = backend_service();
        match app_protocol.strip_prefix("name:") {
            Some(name) => service["spec"]["ports"][0]["name"] = json!(name),
            None => service["spec"]["ports"][0]["appProtocol"] = json!(app_protocol),
        }
        service
    };
    let grpc_route = |generation| {
        let mut route = route(
            generation,
            json!([{"backendRefs": [{"name": "back", "port": 80}]}]),
        );
        route["kind"] = json!("GRPCRoute");
        route
    };
    let resolved = |route_value: Value, app_protocol: &str| {
        let mut index = Index::new();
        for value in [service(), backend_port(app_protocol), route_value.clone()] {
            index.apply(object(value));
        }
        index.publish();
        let kind = route_value["kind"].as_str().unwrap().to_string();
        let status = index
            .snapshot()
            .status_of(&format!("{kind} ns/r"))
            .unwrap()
            .to_vec();
        let resolved = condition(&status, "ResolvedRefs").unwrap().clone();
        (resolved.status, resolved.reason)
    };
    let http = || route(1, json!([{"backendRefs": [{"name": "back", "port": 80}]}]));
    for (route_value, app_protocol, expected) in [
        (http(), "https", ("False", "UnsupportedProtocol")),
        // No appProtocol: a port named for TLS says it as plainly.
        (http(), "name:https", ("False", "UnsupportedProtocol")),
        (http(), "name:tls-admin", ("False", "UnsupportedProtocol")),
        (http(), "name:http", ("True", "ResolvedRefs")),
        (
            http(),
            "kubernetes.io/wss",
            ("False", "UnsupportedProtocol"),
        ),
        (http(), "http", ("True", "ResolvedRefs")),
        (http(), "tcp", ("True", "ResolvedRefs")),
        (grpc_route(1), "https", ("False", "UnsupportedProtocol")),
        (grpc_route(1), "http", ("True", "ResolvedRefs")),
        (grpc_route(1), "kubernetes.io/h2c", ("True", "ResolvedRefs")),
    ] {
        let kind = route_value["kind"].clone();
        assert_eq!(
            resolved(route_value, app_protocol),
            expected,
            "{kind} to {app_protocol}"
        );
    }
    let mut index = Index::new();
    for value in [service(), backend_port("https"), http()] {
        index.apply(object(value));
    }
    index.publish();
    assert!(
        answer(&index, "/x").starts_with("rule 0 answers 500"),
        "{}",
        answer(&index, "/x")
    );
}

/// The CRDs still serve HTTPRoute v1beta1 (the same schema), and `kubectl apply` takes it: a
/// folder of manifests may hold one. Before, it was "a kind not used by the agent".
#[test]
fn an_httproute_v1beta1_is_an_httproute() {
    let mut v1beta1 = route(1, json!([{"backendRefs": [{"name": "back", "port": 80}]}]));
    v1beta1["apiVersion"] = json!("gateway.networking.k8s.io/v1beta1");
    let index = index_with(v1beta1);
    assert_eq!(answer(&index, "/x"), "rule 0 forwards");
}

/// A route the generated types cannot read (here a filter type of CRDs newer than the agent's,
/// which an API server accepts) is refused like an invalid one: its status says so at its own
/// generation, and its last good generation keeps serving. Before, it was an unreadable object
/// with no status at all, and the old `Accepted=True` stood.
#[test]
fn a_route_the_agent_cannot_read_is_refused_in_its_status() {
    let good = json!([{"backendRefs": [{"name": "back", "port": 80}]}]);
    let mut index = index_with(route(1, good));
    let unreadable = json!([{"filters": [{"type": "FutureFilter"}],
                             "backendRefs": [{"name": "back", "port": 80}]}]);
    index.apply(object(route(2, unreadable)));
    index.publish();
    assert_eq!(accepted_at(&index), ("False", 2));
    assert_eq!(
        answer(&index, "/x"),
        "rule 0 forwards",
        "the last good generation serves"
    );
}

/// A path a rewrite or redirect puts in place must be an absolute path (the CRD checks only its
/// length): `v2` made a redirect's Location `http://frontv2` (another host), a space a request
/// line that does not parse. Such a rule is dropped (its requests get 500), the others serve.
#[test]
fn a_replacement_path_that_is_not_an_absolute_path_drops_its_rule() {
    let redirect =
        |path: Value| json!({"type": "RequestRedirect", "requestRedirect": {"path": path}});
    let rewrite = |path: Value| json!({"type": "URLRewrite", "urlRewrite": {"path": path}});
    let index = index_with(route(
        1,
        json!([
            {"backendRefs": [{"name": "back", "port": 80}]},
            {"matches": [{"path": {"type": "Exact", "value": "/a"}}],
             "filters": [redirect(json!({"type": "ReplaceFullPath", "replaceFullPath": "v2"}))]},
            {"matches": [{"path": {"type": "PathPrefix", "value": "/b"}}],
             "filters": [rewrite(json!({"type": "ReplacePrefixMatch", "replacePrefixMatch": "/x y"}))],
             "backendRefs": [{"name": "back", "port": 80}]},
            {"matches": [{"path": {"type": "PathPrefix", "value": "/c"}}],
             "filters": [rewrite(json!({"type": "ReplacePrefixMatch", "replacePrefixMatch": ""}))],
             "backendRefs": [{"name": "back", "port": 80}]},
        ]),
    ));
    assert!(
        answer(&index, "/a").starts_with("rule 1 answers 500"),
        "{}",
        answer(&index, "/a")
    );
    assert!(answer(&index, "/b/1").starts_with("rule 2 answers 500"));
    assert_eq!(
        answer(&index, "/c/1"),
        "rule 3 forwards",
        "an empty prefix replacement is the spec's"
    );
    assert_eq!(answer(&index, "/other"), "rule 0 forwards");
    let status = route_status(&index);
    let message = &condition(&status, "PartiallyInvalid").expect("set").message;
    let says = |text| message.contains(text);
    assert!(
        says("Dropped Rule 1: ") && says("absolute path"),
        "{message}"
    );
}

/// The index of `front` with `ports` (its only Service) and a route to `front` with these
/// `parentRefs`.
fn front_with_ports(ports: Value, parent_refs: Value) -> Index {
    let mut front = service();
    front["spec"]["ports"] = ports;
    let mut r = route(1, json!([{"backendRefs": [{"name": "back", "port": 80}]}]));
    r["spec"]["parentRefs"] = parent_refs;
    let mut index = Index::new();
    for value in [front, backend_service(), r] {
        index.apply(object(value));
    }
    index.publish();
    index
}

/// A route to a port whose appProtocol or name states opaque TCP never applies (the agent passes
/// its connections through unparsed): `Accepted=False` says so, and the kernel does not steer it.
/// Before, the route was `Accepted=True` and its rules never ran.
#[test]
fn a_route_to_a_port_stated_opaque_is_not_accepted() {
    // appProtocol in any case (the API server keeps it as written; IANA names are
    // case-insensitive), and WebSocket over TLS (KEP-3726), encrypted as `https` is.
    for port in [
        json!({"name": "tcp", "port": 9090}),
        json!({"appProtocol": "TCP", "port": 9090}),
        json!({"appProtocol": "MySQL", "port": 9090}),
        json!({"appProtocol": "kubernetes.io/wss", "port": 9090}),
    ] {
        let index = front_with_ports(
            json!([port]),
            json!([{"group": "", "kind": "Service", "name": "front", "port": 9090}]),
        );
        let status = route_status(&index);
        let accepted = condition(&status, "Accepted").unwrap();
        assert_eq!(
            (accepted.status, accepted.reason),
            ("False", "NoMatchingParent"),
            "{port}"
        );
        assert!(accepted.message.contains("opaque"), "{}", accepted.message);
        let snapshot = index.snapshot();
        let frontend = snapshot
            .frontend_of(&ObjectKey::new("ns", "front"), 9090)
            .unwrap();
        assert!(!frontend.has_routes(), "steered for nothing: {port}");
    }
}

/// A port presumed opaque by its number alone (MySQL's, Selenium Grid's 4444: Linkerd's default
/// opaque ports) is sniffed when a route names it: the route says it carries HTTP. Attached by a
/// parentRef for all of a Service's ports, it stays opaque (a MySQL port beside an HTTP one).
#[test]
fn a_route_that_names_a_port_presumed_opaque_makes_it_sniffed() {
    use gamma_engine::model::DeclaredProtocol;
    let steered_as = |parent_ref: Value| {
        let index = front_with_ports(
            json!([{"port": 4444}, {"name": "web", "port": 8080}]),
            json!([parent_ref]),
        );
        assert_eq!(accepted_at(&index).0, "True");
        let snapshot = index.snapshot();
        let frontend = snapshot
            .frontend_of(&ObjectKey::new("ns", "front"), 4444)
            .unwrap();
        let steered = snapshot
            .mesh_addresses()
            .any(|(addr, _)| frontend.addresses.contains(&addr));
        assert_eq!(steered, frontend.has_routes());
        (frontend.has_routes(), frontend.declared)
    };
    assert_eq!(
        steered_as(json!({"group": "", "kind": "Service", "name": "front", "port": 4444})),
        (true, None)
    );
    // Opaque, and not steered: no route applies there, and the agent would dial the port's
    // endpoints from the node's address (before, it was steered, for every caller).
    assert_eq!(
        steered_as(json!({"group": "", "kind": "Service", "name": "front"})),
        (false, Some(DeclaredProtocol::Opaque))
    );
    // The Service's only port: a route to the Service names it.
    let only = front_with_ports(
        json!([{"port": 4444}]),
        json!([{"group": "", "kind": "Service", "name": "front"}]),
    );
    let snapshot = only.snapshot();
    let frontend = snapshot
        .frontend_of(&ObjectKey::new("ns", "front"), 4444)
        .unwrap();
    assert_eq!(frontend.declared, None, "sniffed");
}

/// `NoMatchingParent` names what is missing: a port that is both the number and the name asked
/// for, or any TCP port (the agent keeps no other). Before: "has no port web", of a Service whose
/// port 80 exists, and "has no port " with nothing after it.
#[test]
fn no_matching_parent_says_what_is_missing() {
    let message = |ports: Value, parent_ref: Value| {
        let index = front_with_ports(ports, json!([parent_ref]));
        let status = route_status(&index);
        let accepted = condition(&status, "Accepted").unwrap().clone();
        assert_eq!(
            (accepted.status, accepted.reason),
            ("False", "NoMatchingParent")
        );
        accepted.message
    };
    let both = message(
        json!([{"name": "http", "port": 80}]),
        json!({"group": "", "kind": "Service", "name": "front", "port": 80, "sectionName": "web"}),
    );
    assert!(
        both.ends_with("has no port that is both 80 and named web"),
        "{both}"
    );
    let udp = message(
        json!([{"name": "dns", "port": 53, "protocol": "UDP"}]),
        json!({"group": "", "kind": "Service", "name": "front"}),
    );
    assert!(udp.ends_with("has no TCP port"), "{udp}");
}

/// The index of `front` with `ports`, and a consumer route to it (from namespace `other`) with
/// this parentRef.
fn front_with_a_consumer_route(ports: Value, parent_ref: Value) -> Index {
    let mut index = front_with_ports(ports, json!([]));
    let mut consumer = route(
        1,
        json!([{"backendRefs": [{"name": "back", "namespace": "ns", "port": 80}]}]),
    );
    consumer["metadata"]["namespace"] = json!("other");
    consumer["spec"]["parentRefs"] = json!([parent_ref]);
    index.apply(object(consumer));
    index.publish();
    index
}

/// A consumer route (another namespace) naming a port presumed opaque leaves it so: the protocol
/// is the port's, for every caller, and the Service's own callers of a server-first protocol
/// (MySQL on 3306) would otherwise wait for the detection timeout on every connection.
#[test]
fn a_consumer_route_does_not_make_a_port_sniffed_for_every_caller() {
    use gamma_engine::model::DeclaredProtocol;
    let index = front_with_a_consumer_route(
        json!([{"port": 3306}, {"name": "web", "port": 8080}]),
        json!({"group": "", "kind": "Service", "name": "front", "namespace": "ns", "port": 3306}),
    );
    let snapshot = index.snapshot();
    let frontend = snapshot
        .frontend_of(&ObjectKey::new("ns", "front"), 3306)
        .unwrap();
    assert!(
        frontend.has_routes(),
        "the consumer route applies to its callers"
    );
    assert_eq!(frontend.declared, Some(DeclaredProtocol::Opaque));
    // Sniffed for the consumer route's own callers, whom it says the port carries HTTP for:
    // before, they too got it passed through unparsed, and the route (Accepted) never applied.
    assert_eq!(frontend.protocol_for(Some("other")), None);
    for others in [Some("ns"), Some("third"), None] {
        assert_eq!(
            frontend.protocol_for(others),
            Some(DeclaredProtocol::Opaque),
            "{others:?}"
        );
    }
    let status = snapshot.status_of("HTTPRoute other/r").unwrap().to_vec();
    assert_eq!(condition(&status, "Accepted").unwrap().status, "True");
}

/// A port with another namespace's consumer routes only is passed through for the callers they
/// do not apply to, as kube-proxy would, where it is not declared HTTP: a server-first
/// protocol's clients on an undeclared port waited for the detection timeout on every
/// connection. A port declared HTTP is parsed for them, so that a route that comes later
/// applies to open connections' next requests.
#[test]
fn callers_no_route_applies_to_are_passed_through() {
    use gamma_engine::model::DeclaredProtocol::{Http, Opaque};
    let index = front_with_a_consumer_route(
        json!([{"name": "http", "port": 80}, {"port": 7000}]),
        json!({"group": "", "kind": "Service", "name": "front", "namespace": "ns"}),
    );
    let snapshot = index.snapshot();
    let port = |port| {
        snapshot
            .frontend_of(&ObjectKey::new("ns", "front"), port)
            .unwrap()
    };
    assert_eq!(port(80).protocol_for(Some("other")), Some(Http));
    assert_eq!(port(7000).protocol_for(Some("other")), None, "sniffed");
    for (p, unknown, known) in [(80, Some(Http), Some(Http)), (7000, None, Some(Opaque))] {
        for others in ["ns", "third"] {
            assert_eq!(port(p).protocol_for(Some(others)), known, "{p} {others}");
        }
        assert_eq!(
            port(p).protocol_for(None),
            unknown,
            "{p}: an unknown caller"
        );
    }
}

/// Attached to all the Service's ports, a consumer route names none: a port presumed opaque
/// stays so for its callers too, and a route that applies to no other port is not accepted.
#[test]
fn a_consumer_route_for_all_ports_leaves_a_presumed_opaque_one_opaque() {
    use gamma_engine::model::DeclaredProtocol;
    let index = front_with_a_consumer_route(
        json!([{"port": 3306}, {"name": "db-admin", "port": 4444}]),
        json!({"group": "", "kind": "Service", "name": "front", "namespace": "ns"}),
    );
    let snapshot = index.snapshot();
    let frontend = snapshot
        .frontend_of(&ObjectKey::new("ns", "front"), 3306)
        .unwrap();
    assert_eq!(
        frontend.protocol_for(Some("other")),
        Some(DeclaredProtocol::Opaque)
    );
    assert!(!frontend.has_routes(), "steered for nothing");
    let status = snapshot.status_of("HTTPRoute other/r").unwrap().to_vec();
    let accepted = condition(&status, "Accepted").unwrap();
    assert_eq!(
        (accepted.status, accepted.reason),
        ("False", "NoMatchingParent")
    );
    assert!(
        accepted
            .message
            .contains("presumed opaque TCP by its number"),
        "{}",
        accepted.message
    );
}

/// A GRPCRoute `ns/g` attached to `parent_ref`, sending everything to `back`.
fn grpc_route_to_back(parent_ref: Value) -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "GRPCRoute",
        "metadata": {"name": "g", "namespace": "ns", "generation": 1},
        "spec": {
            "parentRefs": [parent_ref],
            "rules": [{"backendRefs": [{"name": "back", "port": 80}]}],
        }
    })
}

/// An HTTPRoute and a GRPCRoute on all of a Service's ports, one of which is stated opaque:
/// the GRPCRoute wins every port routes apply to, so the HTTPRoute applies nowhere. Before, the
/// opaque port, where neither applies, counted as one the HTTPRoute had not lost:
/// `Accepted=True` for a route that never ran.
#[test]
fn an_httproute_that_lost_every_routed_port_to_a_grpcroute_is_conflicted() {
    let mut index = front_with_ports(
        json!([{"name": "http", "port": 80}, {"name": "https", "port": 443}]),
        json!([{"group": "", "kind": "Service", "name": "front"}]),
    );
    index.apply(object(grpc_route_to_back(
        json!({"group": "", "kind": "Service", "name": "front"}),
    )));
    index.publish();
    let status = route_status(&index);
    let accepted = condition(&status, "Accepted").unwrap();
    assert_eq!((accepted.status, accepted.reason), ("False", "Conflicted"));
}

/// An HTTPRoute that lost some of its ports to a GRPCRoute stays Accepted on the others, and says
/// on which it is not served.
#[test]
fn an_httproute_that_lost_one_port_to_a_grpcroute_says_which() {
    let mut index = front_with_ports(
        json!([{"name": "http", "port": 80}, {"name": "grpc", "port": 7070}]),
        json!([{"group": "", "kind": "Service", "name": "front"}]),
    );
    index.apply(object(grpc_route_to_back(
        json!({"group": "", "kind": "Service", "name": "front", "port": 7070}),
    )));
    index.publish();
    let status = route_status(&index);
    let accepted = condition(&status, "Accepted").unwrap();
    assert_eq!((accepted.status, accepted.reason), ("True", "Accepted"));
    assert!(
        accepted.message.contains("not on port 7070") && !accepted.message.contains(" 80"),
        "{}",
        accepted.message
    );
}

/// An HTTPRoute without `rules` (from a folder: no API server wrote the default in) gets the
/// CRD's default: one rule for every path, without backendRefs, so its requests get 500 as they
/// do through an API server. Before, it had no rule, and they got 404 (no rule matched).
#[test]
fn an_httproute_without_rules_gets_the_crds_default_rule() {
    let mut without = route(1, json!([]));
    without["spec"].as_object_mut().unwrap().remove("rules");
    let index = index_with(without);
    assert_eq!(accepted_at(&index).0, "True");
    assert_eq!(
        answer(&index, "/anything"),
        "rule 0 answers 500 Internal Server Error"
    );
}

/// Only a port that declares HTTP is steered as one whose clients speak first (its connections may
/// wait in the kernel for their first bytes): a sniffed one may carry a server-first protocol,
/// whatever routes say, and a consumer route that makes a port sniffed for its callers does not
/// make it one.
#[test]
fn only_ports_declaring_http_are_steered_as_client_first() {
    let steered = |parent_ref: Value| -> std::collections::BTreeMap<u16, bool> {
        let index = front_with_a_consumer_route(
            json!([{"name": "http", "port": 80}, {"name": "web", "port": 8080}, {"port": 3306}]),
            parent_ref,
        );
        let snapshot = index.snapshot();
        snapshot
            .mesh_addresses()
            .map(|(address, client_first)| (address.port(), client_first))
            .collect()
    };
    // For all ports: the one presumed opaque stays so for every caller, and is not steered.
    assert_eq!(
        steered(json!({"group": "", "kind": "Service", "name": "front", "namespace": "ns"})),
        [(80, true), (8080, false)].into_iter().collect()
    );
    assert_eq!(
        steered(
            json!({"group": "", "kind": "Service", "name": "front", "namespace": "ns",
                       "port": 3306})
        ),
        [(3306, false)].into_iter().collect()
    );
}

/// GEP-1619: a rule with session persistence whose backend Service sets ClientIP session
/// affinity is rejected, with a status that says why; its requests get 500. It is served again
/// once the Service's affinity goes.
#[test]
fn session_persistence_beside_client_ip_affinity_drops_its_rule() {
    let mut affine = backend_service();
    affine["spec"]["sessionAffinity"] = json!("ClientIP");
    let rules = json!([
        {"matches": [{"path": {"type": "Exact", "value": "/ok"}}],
         "backendRefs": [{"name": "back", "port": 80}]},
        {"backendRefs": [{"name": "back", "port": 80}],
         "sessionPersistence": {"type": "Cookie", "cookie": {"name": "sid"}}},
    ]);
    let mut index = index_with(route(1, rules));
    assert_eq!(answer(&index, "/x"), "rule 1 forwards");
    index.apply(object(affine));
    index.publish();
    let status = route_status(&index);
    let partially = condition(&status, "PartiallyInvalid").expect("PartiallyInvalid");
    assert!(
        partially.message.contains("Dropped Rule 1")
            && partially.message.contains("sessionAffinity is ClientIP"),
        "{}",
        partially.message
    );
    assert!(answer(&index, "/x").starts_with("rule 1 answers 500"));
    assert_eq!(
        answer(&index, "/ok"),
        "rule 0 forwards",
        "the other rule serves"
    );
    index.apply(object(backend_service()));
    index.publish();
    assert_eq!(answer(&index, "/x"), "rule 1 forwards");
    assert!(condition(&route_status(&index), "PartiallyInvalid").is_none());
}

/// Judged per parent, as each parent's table is compiled: a consumer route whose affine backend
/// its own namespace's parent may not send to (no grant) serves its rule there, Accepted, and
/// only the parent in the backend's namespace reports the conflict.
#[test]
fn session_persistence_beside_affinity_is_judged_per_parent() {
    let mut affine = backend_service();
    affine["spec"]["sessionAffinity"] = json!("ClientIP");
    let local = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "local", "namespace": "c"},
        "spec": {"clusterIP": "10.96.0.3", "ports": [{"name": "http", "port": 80}]}
    });
    let consumer = json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "r", "namespace": "c", "generation": 1},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "front", "namespace": "ns", "port": 80},
                           {"group": "", "kind": "Service", "name": "local", "port": 80}],
            "rules": [{"backendRefs": [{"name": "back", "namespace": "ns", "port": 80}],
                       "sessionPersistence": {"type": "Cookie", "cookie": {"name": "sid"}}}],
        }
    });
    let mut index = Index::new();
    for value in [service(), affine, local, consumer] {
        index.apply(object(value));
    }
    index.publish();
    let status = index
        .snapshot()
        .status_of("HTTPRoute c/r")
        .unwrap()
        .to_vec();
    let accepted = |parent: usize| {
        let c = status[parent].condition("Accepted").unwrap();
        (c.status, c.message.to_string())
    };
    let (front, why) = accepted(0);
    assert_eq!(front, "False", "{why}");
    assert!(why.contains("sessionAffinity is ClientIP"), "{why}");
    let (local, why) = accepted(1);
    assert_eq!(local, "True", "{why}");
    let resolved = status[1].condition("ResolvedRefs").unwrap();
    assert_eq!(
        (resolved.status, resolved.reason),
        ("False", "RefNotPermitted")
    );
}

/// The same for a consumer route sending to its parent's namespace (no grant needed there): its
/// status says why, as its table answers 500. The route's only rule: not Accepted.
#[test]
fn a_consumer_routes_session_persistence_beside_client_ip_affinity_is_reported() {
    let mut affine = backend_service();
    affine["spec"]["sessionAffinity"] = json!("ClientIP");
    let consumer = json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "r", "namespace": "c", "generation": 1},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "front", "namespace": "ns", "port": 80}],
            "rules": [{"backendRefs": [{"name": "back", "namespace": "ns", "port": 80}],
                       "sessionPersistence": {"type": "Cookie", "cookie": {"name": "sid"}}}],
        }
    });
    let mut index = Index::new();
    for value in [service(), affine, consumer] {
        index.apply(object(value));
    }
    index.publish();
    let status = index
        .snapshot()
        .status_of("HTTPRoute c/r")
        .map(|s| s.to_vec())
        .unwrap_or_default();
    let accepted = condition(&status, "Accepted").expect("an Accepted condition");
    assert_eq!(accepted.status, "False");
    assert!(
        accepted.message.contains("sessionAffinity is ClientIP"),
        "{}",
        accepted.message
    );
}
