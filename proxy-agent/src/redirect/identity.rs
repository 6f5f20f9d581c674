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

/// The caller `peer` is: the Pod whose cgroup the process that connected runs in (`cgroup_uid`,
/// from the kernel's record), whatever its address says: a Pod whose IP has not reached the agent
/// yet (a connection opened as it starts, a gRPC channel kept for its life, stayed producer-only
/// for good), a hostNetwork Pod (the node's IP), an IP two Pods claim. Otherwise a source IP
/// that belongs to a Pod the process is not in is a mismatch: a pod cannot claim another pod's
/// namespace (and its consumer routes) by faking a source IP. The address canonical: a listener
/// on a v4-mapped address (`[::ffff:a.b.c.d]`, which `--redirect` takes) accepts IPv4 callers as
/// v4-mapped IPv6 ones, whom the table knows by their IPv4 address.
fn identify(peer: SocketAddr, cgroup_uid: Option<String>, snapshot: &Snapshot) -> Caller {
    let peer = super::addr::canonical(peer);
    let of_cgroup = cgroup_uid
        .as_deref()
        .and_then(|uid| snapshot.caller_by_uid(uid));
    let verified = |pod: &gamma_engine::routes::Caller| Caller {
        ip: peer.ip(),
        namespace: Some(pod.pod.namespace.clone()),
        pod: Some(pod.pod.to_string()),
        identity: "verified",
    };
    match (of_cgroup, snapshot.caller(peer.ip())) {
        (Some(pod), _) => verified(pod),
        // A UID two Pods claim names neither: the source IP's Pod, if the cgroup is its.
        (None, Some(pod)) if pod.uid.is_some() && pod.uid == cgroup_uid => verified(pod),
        (None, Some(pod)) => {
            tracing::warn!(
                %peer, claimed = %pod.pod, cgroup_pod_uid = cgroup_uid.as_deref().unwrap_or("-"),
                "source IP belongs to a pod the connecting process is not in; producer routes only"
            );
            Caller {
                ip: peer.ip(),
                namespace: None,
                pod: None,
                identity: "mismatch",
            }
        }
        (None, None) => Caller {
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
        let unknown = identify(
            "10.1.0.6:1".parse().unwrap(),
            Some("other".into()),
            &snapshot,
        );
        assert_eq!(unknown.identity, "unknown");
    }

    /// A Pod is known by its cgroup before its IP reaches the agent (the kubelet reports it once
    /// the pod runs), with a hostNetwork Pod's IP (the node's, never in the table), and at an IP
    /// two Pods claim: its own namespace. A connection opened meanwhile kept producer routes
    /// only for its whole life.
    #[test]
    fn a_caller_is_known_by_its_cgroup_whatever_its_address() {
        let pod = |name: &str, uid: &str, status: &str, spec: &str| {
            format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: ui, uid: {uid}}}\nspec: {{containers: [{{name: c, image: i}}]{spec}}}\nstatus: {{phase: Running{status}}}\n")
        };
        let snapshot = crate::test_dir::snapshot_of(
            &[
                pod("starting", UID, "", ""),
                pod("host", "h-1", ", podIP: 192.168.0.9", ", hostNetwork: true"),
                pod("stale", "s-1", ", podIP: 10.1.0.7", ""),
                pod("new", "n-1", ", podIP: 10.1.0.7", ""),
            ]
            .join("---\n"),
        );
        for (peer, uid, name) in [
            ("10.1.0.5:40000", UID, "ui/starting"),
            ("192.168.0.9:40000", "h-1", "ui/host"),
            ("10.1.0.7:40000", "n-1", "ui/new"),
        ] {
            let caller = identify(peer.parse().unwrap(), Some(uid.into()), &snapshot);
            assert_eq!(
                (caller.identity, caller.pod.as_deref()),
                ("verified", Some(name)),
                "{peer}"
            );
        }
        // No cgroup to tell: the address alone verifies nothing.
        let caller = identify("192.168.0.9:1".parse().unwrap(), None, &snapshot);
        assert_eq!((caller.identity, caller.namespace), ("unknown", None));
    }

    /// A Pod that claims another's UID (a mirror pod's manifest hash is an annotation whoever
    /// creates pods can write) takes neither its identity nor its namespace: a UID two Pods claim
    /// names neither, and the source IP's Pod is verified by its cgroup as before.
    #[test]
    fn a_uid_two_pods_claim_names_neither() {
        let snapshot = crate::test_dir::snapshot_of(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: victim, namespace: ui, uid: {UID}}}\nspec: {{containers: [{{name: c, image: i}}]}}\nstatus: {{phase: Running, podIP: 10.1.0.5}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {{name: claimer, namespace: other, uid: u-2, annotations: {{kubernetes.io/config.mirror: {UID}, kubernetes.io/config.hash: {UID}}}}}\nspec: {{containers: [{{name: c, image: i}}]}}\nstatus: {{phase: Running, podIP: 10.1.0.9}}\n"
        ));
        let caller = identify(
            "10.1.0.5:40000".parse().unwrap(),
            Some(UID.into()),
            &snapshot,
        );
        assert_eq!(
            (caller.identity, caller.pod.as_deref()),
            ("verified", Some("ui/victim"))
        );
        let caller = identify(
            "10.1.0.6:40000".parse().unwrap(),
            Some(UID.into()),
            &snapshot,
        );
        assert_eq!((caller.identity, caller.namespace), ("unknown", None));
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
