//! What to write into a route's `status.parents` (pure).
//!
//! `status.parents` is an atomic list in the Gateway API CRDs (`x-kubernetes-list-type: atomic`):
//! whoever writes it writes all of it. So the list we write is every other controller's entry
//! exactly as it is on the server, followed by ours (the entries `routes::status` computes, one
//! per Service parentRef), and it is written against the resourceVersion it was computed from,
//! so that a concurrent change by another controller is never overwritten (see `writer`).

use crate::kube_api::StoredRoute;
use gamma_engine::model::ParentRef;
use gamma_engine::routes::status::{ParentStatus, CONDITION_TYPES, CONTROLLER_NAME};
use serde_json::{json, Value};

fn is_ours(entry: &Value) -> bool {
    entry.get("controllerName").and_then(Value::as_str) == Some(CONTROLLER_NAME)
}

/// A parentRef as the API writes it: optional fields omitted, `group: ""` kept (omitting it
/// would make the API server default it to the Gateway API group).
pub fn parent_ref_json(p: &ParentRef) -> Value {
    serde_json::to_value(p).unwrap_or_default()
}

/// The most conditions a parent entry may hold (the CRDs' maxItems).
const MAX_CONDITIONS: usize = 8;

/// A condition's `type`.
fn type_of(condition: &Value) -> Option<&str> {
    condition.get("type").and_then(Value::as_str)
}

/// Our entry for one parent. A condition keeps its old `lastTransitionTime` when its status
/// did not change (that is what the field means), else it is `now`. Conditions of types we do
/// not set ([`CONDITION_TYPES`]) that another controller added to the entry stay, after ours:
/// removed, they would be added again, and each side would write the route over and over.
fn entry(desired: &ParentStatus, old: Option<&Value>, now: &str) -> Value {
    let old: &[Value] = old
        .and_then(|o| o.get("conditions"))
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice);
    let foreign = old
        .iter()
        .filter(|c| type_of(c).is_some_and(|t| !CONDITION_TYPES.contains(&t)))
        .cloned();
    let ours = desired.conditions.iter().map(|c| {
        let since = old
            .iter()
            .find(|o| type_of(o) == Some(c.type_))
            .filter(|o| o.get("status").and_then(Value::as_str) == Some(c.status))
            .and_then(|o| o.get("lastTransitionTime"))
            .and_then(Value::as_str)
            .unwrap_or(now);
        json!({
            "type": c.type_,
            "status": c.status,
            "reason": c.reason,
            "message": c.message,
            "observedGeneration": desired.observed_generation,
            "lastTransitionTime": since,
        })
    });
    let conditions: Vec<Value> = ours.chain(foreign).take(MAX_CONDITIONS).collect();
    json!({
        "parentRef": parent_ref_json(desired.parent_ref()),
        "controllerName": CONTROLLER_NAME,
        "conditions": conditions,
    })
}

/// The most entries `status.parents` may hold.
const MAX_PARENTS: usize = 32;

/// The complete `status.parents` to write, or `None` when the server already says what we
/// would write. Other controllers' entries are kept as they are, in their order.
pub fn plan(desired: &[ParentStatus], server: &StoredRoute, now: &str) -> Option<Vec<Value>> {
    let (ours, others): (Vec<&Value>, Vec<&Value>) =
        server.parents.iter().partition(|e| is_ours(e));
    // The list holds 32 entries at most (the CRDs' maxItems): past that the API server refuses
    // the whole status. Other controllers' entries are theirs to keep; ours fill what is left.
    let room = MAX_PARENTS.saturating_sub(others.len());
    let wanted: Vec<Value> = desired
        .iter()
        .take(room)
        .map(|d| {
            let parent = parent_ref_json(d.parent_ref());
            let old = ours
                .iter()
                .copied()
                .find(|o| o.get("parentRef") == Some(&parent));
            entry(d, old, now)
        })
        .collect();
    if ours.len() == wanted.len() && ours.iter().zip(&wanted).all(|(a, b)| *a == b) {
        return None;
    }
    Some(others.into_iter().cloned().chain(wanted).collect())
}

/// Whether `desired` was computed from the generation the server holds. The index may lag the
/// route watcher by a batch, or keep an older generation because the newer one is invalid; in
/// both cases writing would report on a generation the route no longer has.
pub fn same_generation(desired: &[ParentStatus], server: &StoredRoute) -> bool {
    desired
        .iter()
        .all(|d| d.observed_generation == server.generation)
}

/// Now, as the API writes `metav1.Time` (RFC 3339, whole seconds, UTC).
pub fn now_rfc3339() -> String {
    let now = k8s_openapi::jiff::Timestamp::now();
    k8s_openapi::jiff::Timestamp::from_second(now.as_second())
        .map(|t| t.to_string())
        .unwrap_or_else(|_| now.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use gamma_engine::model::{GroupKind, RouteKind};
    use gamma_engine::routes::status::Condition;

    fn parent(name: &str) -> ParentRef {
        ParentRef {
            target: GroupKind::Service,
            namespace: None,
            name: name.into(),
            port: Some(80),
            section_name: None,
        }
    }

    fn desired(accepted: bool, generation: i64) -> ParentStatus {
        let c = |type_, ok: bool| Condition {
            type_,
            status: if ok { "True" } else { "False" },
            reason: if ok { "Accepted" } else { "NoMatchingParent" },
            message: "m".into(),
        };
        ParentStatus {
            parents: [parent("echo")].into(),
            parent: 0,
            observed_generation: generation,
            conditions: vec![c("Accepted", accepted), c("ResolvedRefs", true)].into(),
        }
    }

    fn server(parents: Vec<Value>) -> StoredRoute {
        StoredRoute {
            kind: RouteKind::Http,
            namespace: "ns".into(),
            name: "r".into(),
            resource_version: "5".into(),
            generation: 1,
            parents,
        }
    }

    fn other() -> Value {
        json!({"parentRef": {"name": "gw"}, "controllerName": "example.com/gateway", "conditions": [{"type": "Accepted", "status": "True"}]})
    }

    #[test]
    fn first_write_keeps_other_controllers_entries() {
        let out = plan(&[desired(true, 1)], &server(vec![other()]), "T1").unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0], other());
        assert_eq!(out[1]["controllerName"], CONTROLLER_NAME);
        assert_eq!(
            out[1]["parentRef"],
            json!({"group": "", "kind": "Service", "name": "echo", "port": 80})
        );
        assert_eq!(out[1]["conditions"][0]["lastTransitionTime"], "T1");
        assert_eq!(out[1]["conditions"][0]["observedGeneration"], 1);
    }

    #[test]
    fn unchanged_status_is_not_written() {
        let written = plan(&[desired(true, 1)], &server(vec![other()]), "T1").unwrap();
        assert_eq!(plan(&[desired(true, 1)], &server(written), "T2"), None);
    }

    #[test]
    fn transition_time_moves_only_for_changed_conditions() {
        let written = plan(&[desired(true, 1)], &server(vec![]), "T1").unwrap();
        let out = plan(&[desired(false, 2)], &server(written), "T2").unwrap();
        let conditions = &out[0]["conditions"];
        assert_eq!(conditions[0]["status"], "False");
        assert_eq!(conditions[0]["lastTransitionTime"], "T2");
        assert_eq!(conditions[1]["lastTransitionTime"], "T1");
        assert_eq!(conditions[1]["observedGeneration"], 2);
    }

    #[test]
    fn our_entries_are_removed_when_no_service_parent_remains() {
        let written = plan(&[desired(true, 1)], &server(vec![other()]), "T1").unwrap();
        assert_eq!(plan(&[], &server(written), "T2"), Some(vec![other()]));
        assert_eq!(plan(&[], &server(vec![other()]), "T2"), None);
    }

    #[test]
    fn the_list_stays_within_its_32_entries_and_keeps_other_controllers_entries() {
        let others: Vec<Value> = (0..20)
            .map(|i| {
                let mut entry = other();
                entry["parentRef"]["name"] = json!(format!("gw-{i}"));
                entry
            })
            .collect();
        let mut many = desired(true, 1);
        many.parents = (0..13).map(|i| parent(&format!("svc-{i}"))).collect();
        let desired: Vec<ParentStatus> = (0..13)
            .map(|i| ParentStatus {
                parent: i,
                ..many.clone()
            })
            .collect();
        let written = plan(&desired, &server(others.clone()), "T1").unwrap();
        assert_eq!(written.len(), 32);
        assert_eq!(written[..20], others[..]);
        assert_eq!(
            plan(&desired, &server(written), "T2"),
            None,
            "what fits, once written, is not written again"
        );
    }

    /// A condition another controller added to our entry (a policy's, GEP-713) is kept, and
    /// an entry that differs only by it is not written again. Before, each write removed it, the
    /// other controller added it back, and so on.
    #[test]
    fn conditions_of_other_controllers_in_our_entry_are_kept() {
        let mut written = plan(&[desired(true, 1)], &server(vec![other()]), "T1").unwrap();
        let policy = json!({"type": "example.io/PolicyAffected", "status": "True",
                            "reason": "Applied", "message": "", "lastTransitionTime": "T0"});
        written[1]["conditions"]
            .as_array_mut()
            .unwrap()
            .push(policy.clone());
        assert_eq!(
            plan(&[desired(true, 1)], &server(written.clone()), "T2"),
            None
        );
        let changed = plan(&[desired(false, 2)], &server(written), "T2").unwrap();
        let conditions = changed[1]["conditions"].as_array().unwrap();
        assert_eq!(conditions.len(), 3);
        assert_eq!(conditions[0]["status"], "False");
        assert_eq!(conditions[2], policy);
    }

    #[test]
    fn generation_guard() {
        assert!(same_generation(&[desired(true, 1)], &server(vec![])));
        assert!(!same_generation(&[desired(true, 2)], &server(vec![])));
    }

    #[test]
    fn time_is_whole_seconds_utc() {
        let now = now_rfc3339();
        assert!(now.ends_with('Z') && !now.contains('.'), "{now}");
    }
}
