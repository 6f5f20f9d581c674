//! Who sent a redirected connection: the Pod its source IP belongs to, checked against the
//! cgroup the kernel recorded at `connect()`, so a pod cannot claim another pod's namespace (and
//! its consumer routes) by faking a source IP.

use super::{pod_uid, CgroupDirs, Redirect};
use crate::proxy::redirected::OriginalDestination;
use crate::proxy::Caller;
use gamma_engine::routes::Snapshot;
use std::net::SocketAddr;
use std::sync::Arc;

pub struct KernelRedirects {
    pub redirect: Arc<Redirect>,
    pub cgroups: CgroupDirs,
}

impl OriginalDestination for KernelRedirects {
    fn resolve(
        &self,
        peer: SocketAddr,
        listener_port: u16,
        snapshot: &Snapshot,
    ) -> Option<(SocketAddr, Caller)> {
        let record = self.redirect.take_original(peer, listener_port)?;
        let cgroup_uid = self
            .cgroups
            .path_of(record.cgroup_id)
            .as_deref()
            .and_then(pod_uid);
        Some((record.original_dst, identify(peer, cgroup_uid, snapshot)))
    }
}

/// The caller `peer` is: the Pod its address belongs to if the process that connected runs in
/// that Pod's cgroup (`cgroup_uid`, from the kernel's record). The address canonical: a listener
/// on a v4-mapped address (`[::ffff:a.b.c.d]`, which `--redirect` takes) accepts IPv4 callers as
/// v4-mapped IPv6 ones, whom the table knows by their IPv4 address.
fn identify(peer: SocketAddr, cgroup_uid: Option<String>, snapshot: &Snapshot) -> Caller {
    let peer = super::addr::canonical(peer);
    let pod = snapshot.caller(peer.ip());
    match (pod, cgroup_uid) {
        (Some(pod), Some(uid)) if pod.uid.as_deref() == Some(uid.as_str()) => Caller {
            ip: peer.ip(),
            namespace: Some(pod.pod.namespace.clone()),
            pod: Some(pod.pod.to_string()),
            identity: "verified",
        },
        (Some(pod), uid) => {
            tracing::warn!(
                %peer, claimed = %pod.pod, cgroup_pod_uid = uid.as_deref().unwrap_or("-"),
                "source IP belongs to a pod the connecting process is not in; producer routes only"
            );
            Caller {
                ip: peer.ip(),
                namespace: None,
                pod: None,
                identity: "mismatch",
            }
        }
        (None, _) => Caller {
            ip: peer.ip(),
            namespace: None,
            pod: None,
            identity: "unknown",
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "6a3d0c52-7f1e-4b9a-9c2d-5e8f1a2b3c4d";

    fn with_pod() -> Arc<Snapshot> {
        let yaml = format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: p, namespace: ui, uid: {UID}}}\nspec: {{containers: [{{name: c, image: i}}]}}\nstatus: {{phase: Running, podIP: 10.1.0.5}}\n");
        crate::test_dir::snapshot_of(&yaml)
    }

    #[test]
    fn a_caller_is_verified_against_its_cgroup_whatever_form_its_address_takes() {
        let snapshot = with_pod();
        for peer in ["10.1.0.5:40000", "[::ffff:10.1.0.5]:40000"] {
            let caller = identify(peer.parse().unwrap(), Some(UID.into()), &snapshot);
            assert_eq!(caller.identity, "verified", "{peer}");
            assert_eq!(caller.namespace.as_deref(), Some("ui"));
            assert_eq!(caller.ip.to_string(), "10.1.0.5");
        }
        let other = identify(
            "10.1.0.5:1".parse().unwrap(),
            Some("other".into()),
            &snapshot,
        );
        assert_eq!((other.identity, other.namespace), ("mismatch", None));
        let unknown = identify("10.1.0.6:1".parse().unwrap(), Some(UID.into()), &snapshot);
        assert_eq!(unknown.identity, "unknown");
    }

    /// A static pod on the pod network: the kubelet runs it under its manifest's hash (its
    /// cgroup's name), which its mirror in the API carries as an annotation, not as its UID.
    /// Before, such callers were always a mismatch: producer routes only, a warning each time.
    #[test]
    fn a_static_pod_is_verified_by_its_manifest_hash() {
        let hash = "6c4a3c3f1e5b7d9a0b2c4d6e8f0a1b2c";
        let snapshot = crate::test_dir::snapshot_of(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: p, namespace: ui, uid: {UID}, annotations: {{kubernetes.io/config.mirror: {hash}, kubernetes.io/config.hash: {hash}}}}}\nspec: {{containers: [{{name: c, image: i}}]}}\nstatus: {{phase: Running, podIP: 10.1.0.5}}\n"
        ));
        let caller = identify(
            "10.1.0.5:40000".parse().unwrap(),
            Some(hash.into()),
            &snapshot,
        );
        assert_eq!(
            (caller.identity, caller.namespace.as_deref()),
            ("verified", Some("ui"))
        );
    }
}
