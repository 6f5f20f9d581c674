//! The XMesh status (Gateway API experimental, GEP-3949): while this agent holds the lease, every
//! XMesh whose `spec.controllerName` is ours says it is Accepted and lists the features this
//! implementation supports (`gamma_engine::features`, the one source), as upstream's conformance
//! suite reads them in `--mesh` mode. Without the experimental CRD nothing happens.

use super::writer::RETRY_AFTER;
use crate::kube_api::{XMESHES, XMESHES_STATUS};
use futures::StreamExt;
use gamma_engine::features::SUPPORTED_FEATURES;
use gamma_engine::routes::status::CONTROLLER_NAME;
use kube::api::{Api, DynamicObject, Patch, PatchParams, ResourceExt};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Client;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use tokio::sync::watch;

/// The status our XMesh should have, or `None` when it is not ours. Conditions keep their
/// `lastTransitionTime` while their status stays; `now` otherwise.
pub fn desired_status(mesh: &Value, now: &str) -> Option<Value> {
    if mesh["spec"]["controllerName"] != CONTROLLER_NAME {
        return None;
    }
    let generation = mesh["metadata"]["generation"].as_i64().unwrap_or(1);
    let (status, reason, message) = if mesh["spec"]["parametersRef"].is_null() {
        (
            "True",
            "Accepted",
            "gamma-node serves HTTPRoutes and GRPCRoutes attached to Services on every node",
        )
    } else {
        (
            "False",
            "InvalidParameters",
            "gamma-node takes no parameters: remove spec.parametersRef",
        )
    };
    let since = mesh["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == "Accepted" && c["status"] == status)
        .and_then(|c| c["lastTransitionTime"].as_str())
        .unwrap_or(now);
    let mut features: Vec<&str> = SUPPORTED_FEATURES.to_vec();
    features.sort_unstable();
    Some(json!({
        "conditions": [{
            "type": "Accepted", "status": status, "reason": reason, "message": message,
            "observedGeneration": generation, "lastTransitionTime": since,
        }],
        "supportedFeatures": features.iter().map(|f| json!({"name": f})).collect::<Vec<_>>(),
    }))
}

/// Whether the stored status already says what `desired` says.
fn up_to_date(mesh: &Value, desired: &Value) -> bool {
    mesh["status"]["conditions"] == desired["conditions"]
        && mesh["status"]["supportedFeatures"] == desired["supportedFeatures"]
}

/// Follows the XMeshes while this agent leads; writes the status of ours when it differs.
pub async fn run(client: Client, mut leader: watch::Receiver<bool>) {
    let api: Api<DynamicObject> = Api::all_with(client, &XMESHES.api_resource());
    loop {
        if leader.wait_for(|leads| *leads).await.is_err() {
            return;
        }
        let mut meshes = std::pin::pin!(
            watcher::watcher(api.clone(), watcher::Config::default()).default_backoff()
        );
        let mut absent_reported = false;
        // Meshes whose write failed, by name: tried again until written or changed.
        let mut unwritten: BTreeMap<String, DynamicObject> = BTreeMap::new();
        loop {
            tokio::select! {
                changed = leader.changed() => {
                    if changed.is_err() { return }
                    if !*leader.borrow() { break }
                }
                _ = tokio::time::sleep(RETRY_AFTER), if !unwritten.is_empty() => {
                    for mesh in std::mem::take(&mut unwritten).into_values() {
                        write_or_keep(&api, mesh, &mut unwritten).await;
                    }
                }
                event = meshes.next() => match event {
                    Some(Ok(watcher::Event::Apply(mesh) | watcher::Event::InitApply(mesh))) => {
                        write_or_keep(&api, mesh, &mut unwritten).await;
                    }
                    Some(Ok(event)) => forget_moot(&event, &mut unwritten),
                    Some(Err(e)) => {
                        if !absent_reported {
                            tracing::info!(error = %e, "XMesh ({}) is not readable: the experimental \
                                Gateway API CRDs are not installed (fine) or RBAC lacks it; \
                                supported features are not reported until it is", XMESHES.describe());
                            absent_reported = true;
                        }
                    }
                    None => break,
                },
            }
        }
    }
}

/// Empties the status of every XMesh that names this implementation (its Accepted condition
/// and supported features are all ours). Whether each was; `true` without the experimental CRD.
pub async fn clear(client: Client) -> bool {
    let api: Api<DynamicObject> = Api::all_with(client, &XMESHES.api_resource());
    let meshes = match api.list(&Default::default()).await {
        Ok(meshes) => meshes,
        Err(kube::Error::Api(s)) if s.is_not_found() => return true,
        Err(e) => {
            tracing::warn!(error = %e, "listing the XMeshes failed");
            return false;
        }
    };
    let mut cleared = true;
    for mesh in meshes.items {
        let ours = mesh.data["spec"]["controllerName"] == CONTROLLER_NAME;
        if !ours || mesh.data["status"].as_object().is_none_or(|s| s.is_empty()) {
            continue;
        }
        let name = mesh.name_any();
        let empty = json!({"status": {"conditions": null, "supportedFeatures": null}});
        match api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&empty))
            .await
        {
            Ok(_) => tracing::info!(mesh = %name, "XMesh status cleared"),
            Err(e) => {
                tracing::warn!(mesh = %name, error = %e, "clearing the XMesh status failed");
                cleared = false;
            }
        }
    }
    cleared
}

/// Forgets the writes that wait for a mesh deleted, or for any when the meshes are listed again
/// (which brings each one's current version). Before, a deleted mesh's write was tried every
/// few seconds for as long as the lease stayed.
fn forget_moot(
    event: &watcher::Event<DynamicObject>,
    unwritten: &mut BTreeMap<String, DynamicObject>,
) {
    match event {
        watcher::Event::Delete(mesh) => {
            unwritten.remove(&mesh.name_any());
        }
        watcher::Event::Init => unwritten.clear(),
        _ => {}
    }
}

/// Writes `mesh`'s status; keeps it in `unwritten` (replacing an older version) if that failed,
/// takes it out if not.
async fn write_or_keep(
    api: &Api<DynamicObject>,
    mesh: DynamicObject,
    unwritten: &mut BTreeMap<String, DynamicObject>,
) {
    if write(api, &mesh).await {
        unwritten.remove(&mesh.name_any());
    } else {
        unwritten.insert(mesh.name_any(), mesh);
    }
}

/// Writes `mesh`'s status if it is ours and differs; false if the write failed.
async fn write(api: &Api<DynamicObject>, mesh: &DynamicObject) -> bool {
    let Ok(value) = serde_json::to_value(mesh) else {
        return true;
    };
    let Some(status) = desired_status(&value, &super::parents::now_rfc3339()) else {
        return true;
    };
    if up_to_date(&value, &status) {
        return true;
    }
    let name = mesh.metadata.name.clone().unwrap_or_default();
    let body = json!({
        "apiVersion": XMESHES_STATUS.api_version(), "kind": XMESHES_STATUS.kind,
        "metadata": {"name": name},
        "status": status,
    });
    let params = PatchParams::apply(super::writer::FIELD_MANAGER).force();
    match api.patch_status(&name, &params, &Patch::Apply(&body)).await {
        Ok(_) => {
            tracing::info!(mesh = %name, "XMesh status written: Accepted, supported features");
            true
        }
        // Deleted meanwhile: nothing to report on.
        Err(kube::Error::Api(s)) if s.is_not_found() => true,
        Err(e) => {
            tracing::warn!(mesh = %name, error = %e, "writing the XMesh status failed; trying again in {RETRY_AFTER:?}");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deleted_or_relisted_mesh_is_not_written_again() {
        let mesh = |name: &str| {
            serde_json::from_value::<DynamicObject>(json!({
                "apiVersion": "gateway.networking.x-k8s.io/v1alpha1", "kind": "XMesh",
                "metadata": {"name": name}
            }))
            .unwrap()
        };
        let mut unwritten: BTreeMap<String, DynamicObject> =
            ["a", "b"].map(|n| (n.to_string(), mesh(n))).into();
        forget_moot(&watcher::Event::Delete(mesh("a")), &mut unwritten);
        assert_eq!(unwritten.keys().collect::<Vec<_>>(), ["b"]);
        forget_moot(&watcher::Event::InitDone, &mut unwritten);
        assert_eq!(unwritten.len(), 1);
        forget_moot(&watcher::Event::Init, &mut unwritten);
        assert!(unwritten.is_empty());
    }

    #[test]
    fn ours_is_accepted_with_the_sorted_features_and_others_are_left_alone() {
        let mesh = json!({"metadata": {"name": "m", "generation": 3},
                          "spec": {"controllerName": CONTROLLER_NAME}});
        let status = desired_status(&mesh, "2026-12-03T00:00:00Z").unwrap();
        assert_eq!(status["conditions"][0]["status"], "True");
        assert_eq!(status["conditions"][0]["observedGeneration"], 3);
        let names: Vec<&str> = status["supportedFeatures"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["name"].as_str().unwrap())
            .collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        assert_eq!(names, sorted, "sorted by name, as the CRD asks");
        assert_eq!(names.len(), SUPPORTED_FEATURES.len());
        assert!(names.contains(&"MeshConsumerRoute"));

        // Written once, unchanged later: the transition time is kept.
        let mut stored = mesh.clone();
        stored["status"] = status.clone();
        let again = desired_status(&stored, "2030-01-01T00:00:00Z").unwrap();
        assert!(up_to_date(&stored, &again));

        let with_parameters = json!({"metadata": {"name": "m"},
            "spec": {"controllerName": CONTROLLER_NAME,
                     "parametersRef": {"group": "", "kind": "ConfigMap", "name": "x"}}});
        let refused = desired_status(&with_parameters, "t").unwrap();
        assert_eq!(refused["conditions"][0]["reason"], "InvalidParameters");

        let other =
            json!({"metadata": {"name": "o"}, "spec": {"controllerName": "example.com/mesh"}});
        assert!(desired_status(&other, "t").is_none());
    }
}
