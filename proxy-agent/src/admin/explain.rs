//! `/explain`: for a described request from a caller, which rule and backend the table picks,
//! and why every other entry lost. Computed from the same snapshot the data plane reads.

use gamma_engine::model::{Condition, RouteMatch};
use gamma_engine::routes::{Frontend, RequestHead};
use serde_json::{json, Value};

/// Why a match does not hold for a request (the first failing condition), or `None`.
fn mismatch(m: &RouteMatch, request: &RequestHead<'_>) -> Option<String> {
    let method_is =
        |method: &http::Method| format!("method is {}, the match wants {method}", request.method);
    if let Some(method) = m.method().filter(|&wanted| wanted != request.method) {
        return Some(method_is(method));
    }
    if !m.path.matches(request.path) {
        return Some(format!("path {} does not match {:?}", request.path, m.path));
    }
    let failing = m.conditions().iter().find(|c| !c.holds(request))?;
    Some(match failing {
        Condition::Method(method) => method_is(method),
        Condition::Header(h) => format!("header {} does not match", h.name.as_str()),
        Condition::QueryParam(q) => format!("query parameter {} does not match", q.name),
    })
}

pub fn explain(
    frontend: &Frontend,
    caller_namespace: Option<&str>,
    request: &RequestHead<'_>,
) -> Value {
    let consumer = caller_namespace.and_then(|ns| frontend.consumers.get(ns).map(|_| ns));
    let routes_used = match (consumer, &frontend.producer) {
        (Some(ns), _) => {
            format!("consumer routes of namespace {ns} (they replace the producer routes)")
        }
        (None, Some(_)) => "producer routes".to_string(),
        (None, None) => "none: the Service's own endpoints, as without a mesh".to_string(),
    };
    let Some(table) = frontend.table_for(caller_namespace) else {
        return json!({
            "frontend": format!("{}:{}", frontend.service, frontend.port),
            "routes": routes_used,
            "decision": {"backend": frontend.direct.name(), "endpoints": frontend.direct.endpoints.len()},
        });
    };
    let mut winner: Option<Value> = None;
    let entries: Vec<Value> = table
        .entries()
        .map(|(route_match, rule)| {
            let verdict = match (mismatch(route_match, request), &winner) {
                (Some(why), _) => format!("does not match: {why}"),
                (None, Some(_)) => "matches, but a higher-precedence entry won".to_string(),
                (None, None) => {
                    winner = Some(json!({
                        "route": rule.route.to_string(),
                        "rule": rule.name_or_index(),
                        "backends": rule.rule().backends.iter().enumerate().map(|(index, written)| json!({
                            "weight": written.weight,
                            "backend": match rule.backend(index) { Ok(b) => b.name(), Err(e) => e.to_string() },
                        })).collect::<Vec<_>>(),
                        "filters": rule.rule().filters(),
                    }));
                    "selected".to_string()
                }
            };
            json!({"route": rule.route.to_string(), "rule": rule.name_or_index(), "match": route_match, "verdict": verdict})
        })
        .collect();
    json!({
        "frontend": format!("{}:{}", frontend.service, frontend.port),
        "routes": routes_used,
        "decision": winner.unwrap_or_else(|| json!({"status": 404, "reason": "no rule matches"})),
        "entries_in_precedence_order": entries,
    })
}
