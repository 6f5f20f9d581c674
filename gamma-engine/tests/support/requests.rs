//! Asking a published table about one request, as the data plane does (lookup, then the rule's
//! plan), for the engine's integration tests.

use gamma_engine::index::Index;
use gamma_engine::model::ObjectKey;
use gamma_engine::routes::{CompiledRule, Decision, Plan, RequestHead};
use http::{HeaderMap, Method};

/// What a GET of `path` to port 80 of `service` (namespace, name) from a caller of
/// `caller_namespace` comes to: `decide` gets the rule that matched and its plan. Panics when no
/// rule applies.
pub fn with_plan<R>(
    index: &Index,
    service: (&str, &str),
    caller_namespace: Option<&str>,
    path: &str,
    decide: impl FnOnce(&CompiledRule, Plan<'_>) -> R,
) -> R {
    with_plan_drawn(index, service, caller_namespace, path, 0, decide)
}

/// As [`with_plan`], the plan's random number `random` (it picks the backend, samples mirrors).
#[allow(dead_code)] // not every test binary that includes this file draws
pub fn with_plan_drawn<R>(
    index: &Index,
    service: (&str, &str),
    caller_namespace: Option<&str>,
    path: &str,
    random: u64,
    decide: impl FnOnce(&CompiledRule, Plan<'_>) -> R,
) -> R {
    let snapshot = index.snapshot();
    let frontend = snapshot
        .frontend_of(&ObjectKey::new(service.0, service.1), 80)
        .expect("the Service has a frontend");
    let headers = HeaderMap::new();
    let head = RequestHead {
        method: &Method::GET,
        path,
        query: None,
        headers: &headers,
        authority: Some(service.1),
    };
    let Decision::Rule { rule, matched } = frontend.lookup(caller_namespace, &head) else {
        panic!(
            "no rule applies to GET {path} on {}/{}",
            service.0, service.1
        );
    };
    let (mut parts, ()) = http::Request::get(path).body(()).unwrap().into_parts();
    decide(rule, rule.plan(&mut parts, matched, 80, random))
}
