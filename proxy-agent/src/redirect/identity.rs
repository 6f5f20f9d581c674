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
    fn resolve(&self, peer: SocketAddr, snapshot: &Snapshot) -> Option<(SocketAddr, Caller)> {
        let record = self.redirect.take_original(peer)?;
        let cgroup_uid = self
            .cgroups
            .path_of(record.cgroup_id)
            .as_deref()
            .and_then(pod_uid);
        let pod = snapshot.caller(peer.ip());
        let caller = match (pod, cgroup_uid) {
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
        };
        Some((record.original_dst, caller))
    }
}
