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
        let caller = Caller::identify(peer.ip(), cgroup_uid.as_deref(), snapshot);
        if caller.identity == "mismatch" {
            let claimed = snapshot.caller(caller.ip).map(|pod| pod.pod.to_string());
            tracing::warn!(
                %peer, claimed = claimed.as_deref().unwrap_or("-"),
                cgroup_pod_uid = cgroup_uid.as_deref().unwrap_or("-"),
                "source IP belongs to a pod the connecting process is not in; producer routes only"
            );
        }
        Some((record.original_dst, caller))
    }
}
