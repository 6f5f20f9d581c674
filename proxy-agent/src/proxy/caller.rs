//! Who called: the Pod a connection comes from, as far as the agent could establish it, which
//! decides whose consumer routes apply (GEP-1294: a consumer route applies to its namespace's
//! callers only).

use super::ConnectionInfo;
use compact_str::CompactString;
use gamma_engine::routes::Snapshot;
use std::net::IpAddr;
use std::sync::{Arc, OnceLock};

/// Who called, as far as the agent could establish.
#[derive(Clone, Debug)]
pub struct Caller {
    pub ip: IpAddr,
    /// The namespace whose consumer routes apply; `None`: unknown caller, producer routes only.
    pub namespace: Option<CompactString>,
    pub pod: Option<String>,
    /// How the identity was established, for the access log.
    pub identity: &'static str,
    /// A caller the table did not verify at accept, whose cgroup names a Pod: each request
    /// looks again, so that a connection opened before its Pod reached the agent (a watch
    /// behind) gets its namespace's routes once it has.
    pub unverified: Option<Arc<Unverified>>,
}

/// An unverified caller's Pod UID (of the cgroup the kernel recorded), and its connection as
/// verified since, once it is: found once per connection.
#[derive(Debug)]
pub struct Unverified {
    uid: Box<str>,
    verified: OnceLock<ConnectionInfo>,
}

impl Caller {
    /// The caller `peer` is: the Pod whose cgroup the process that connected runs in
    /// (`cgroup_uid`, from the kernel's record), whatever its address says: a Pod whose IP has
    /// not reached the agent yet (a connection opened as it starts), a hostNetwork Pod (the
    /// node's IP), an IP two Pods claim. Otherwise a source IP that belongs to a Pod the process
    /// is not in is a mismatch: a pod cannot claim another pod's namespace (and its consumer
    /// routes) by faking a source IP. The address canonical: a listener on a v4-mapped address
    /// (`[::ffff:a.b.c.d]`, which `--redirect` takes) accepts IPv4 callers as v4-mapped IPv6
    /// ones, whom the table knows by their IPv4 address.
    pub fn identify(peer: IpAddr, cgroup_uid: Option<&str>, snapshot: &Snapshot) -> Caller {
        let ip = peer.to_canonical();
        match pod_of(ip, cgroup_uid, snapshot) {
            Ok(pod) => Caller::verified(ip, pod),
            Err(identity) => Caller {
                ip,
                namespace: None,
                pod: None,
                identity,
                unverified: cgroup_uid.map(|uid| {
                    Arc::new(Unverified {
                        uid: uid.into(),
                        verified: OnceLock::new(),
                    })
                }),
            },
        }
    }

    fn verified(ip: IpAddr, pod: &gamma_engine::routes::Caller) -> Caller {
        Caller {
            ip,
            namespace: Some(pod.pod.namespace.clone()),
            pod: Some(pod.pod.to_string()),
            identity: "verified",
            unverified: None,
        }
    }
}

/// The Pod the caller at `ip` whose process runs in the cgroup of `cgroup_uid` is, or why none.
fn pod_of<'s>(
    ip: IpAddr,
    cgroup_uid: Option<&str>,
    snapshot: &'s Snapshot,
) -> Result<&'s gamma_engine::routes::Caller, &'static str> {
    match (
        cgroup_uid.and_then(|uid| snapshot.caller_by_uid(uid)),
        snapshot.caller(ip),
    ) {
        (Some(pod), _) => Ok(pod),
        // A UID two Pods claim names neither: the source IP's Pod, if the cgroup is its.
        (None, Some(pod)) if pod.uid.is_some() && pod.uid.as_deref() == cgroup_uid => Ok(pod),
        (None, Some(_)) => Err("mismatch"),
        (None, None) => Err("unknown"),
    }
}

impl ConnectionInfo {
    /// This connection as `snapshot` knows its caller: itself, or, for a caller not verified at
    /// accept whom the table verifies now, itself with that caller (from then on, without
    /// looking again).
    pub fn as_known_in(&self, snapshot: &Snapshot) -> &ConnectionInfo {
        let Some(unverified) = &self.caller.unverified else {
            return self;
        };
        if let Some(known) = unverified.verified.get() {
            return known;
        }
        match pod_of(self.caller.ip, Some(&unverified.uid), snapshot) {
            Ok(pod) => unverified.verified.get_or_init(|| ConnectionInfo {
                destination: self.destination.clone(),
                caller: Caller::verified(self.caller.ip, pod),
            }),
            Err(_) => self,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn identify(peer: SocketAddr, cgroup_uid: Option<String>, snapshot: &Snapshot) -> Caller {
        Caller::identify(peer.ip(), cgroup_uid.as_deref(), snapshot)
    }

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

    /// A connection whose caller the table did not know when it came (its Pod's watch event
    /// late) gets the caller's consumer routes once the table knows it, from its next request:
    /// before, it kept producer routes for its life (a gRPC channel, for hours).
    #[tokio::test]
    async fn a_caller_unknown_at_accept_gets_its_routes_once_known() {
        let pod = format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: client, namespace: ui, uid: {UID}}}\nspec: {{containers: [{{name: c, image: i}}]}}\nstatus: {{phase: Running}}\n");
        let consumer = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: ui}\nspec:\n  parentRefs: [{group: '', kind: Service, name: front, namespace: ns, port: 80}]\n  rules: [{filters: [{type: RequestRedirect, requestRedirect: {hostname: elsewhere, statusCode: 302}}]}]\n";
        let before =
            crate::test_dir::snapshot_of(&[crate::test_dir::FRONT, consumer].join("---\n"));
        let after =
            crate::test_dir::snapshot_of(&[crate::test_dir::FRONT, consumer, &pod].join("---\n"));
        let conn = crate::proxy::ConnectionInfo {
            destination: crate::proxy::Destination::Address {
                addr: "10.96.0.10:80".parse().unwrap(),
                service: None,
            },
            caller: Caller::identify("10.1.0.5".parse().unwrap(), Some(UID), &before),
        };
        assert_eq!(conn.caller.identity, "unknown");
        let proxy = crate::proxy::Proxy::new(
            Arc::new(arc_swap::ArcSwap::new(before)),
            Arc::new(crate::telemetry::metrics::Metrics::default()),
            crate::proxy::ProxyConfig::default(),
        );
        let request = || {
            http::Request::get("/x")
                .header("host", "front.ns")
                .body(crate::proxy::body::CallerBody::Whole(bytes::Bytes::new()))
                .unwrap()
        };
        let answer = proxy.handle(request(), &conn, false).await;
        assert_ne!(answer.status(), 302, "producer routes only, while unknown");
        proxy.snapshot.store(after.clone());
        let answer = proxy.handle(request(), &conn, false).await;
        assert_eq!(answer.status(), 302, "ui's consumer route");
        // Found once: the connection keeps what it was verified as.
        let known = conn.as_known_in(&after);
        assert_eq!(known.caller.identity, "verified");
        assert!(std::ptr::eq(known, conn.as_known_in(&after)));
    }
}
