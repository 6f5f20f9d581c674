//! Backends: resolving a backendRef to a Service port and its endpoints, and weighted choice.

use super::World;
use crate::model::{BackendRef, EndpointSlice, ObjectKey, Service, UpstreamProtocol};
use ahash::AHashMap;
use serde::Serialize;
use std::cell::RefCell;
use std::net::SocketAddr;
use std::sync::Arc;

/// A Service port traffic can be sent to, with the endpoints to send it to.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Backend {
    pub service: ObjectKey,
    pub port: u16,
    /// Ready endpoints of the port (targetPort resolved by the EndpointSlices); the
    /// serving-but-terminating ones only when none is ready.
    pub endpoints: Arc<[SocketAddr]>,
    /// The HTTP version upstream connections speak.
    pub protocol: UpstreamProtocol,
}

impl Backend {
    pub fn name(&self) -> String {
        format!("{}:{}", self.service, self.port)
    }
}

/// Why a backendRef does not resolve; its share of traffic is answered with an error.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, thiserror::Error)]
pub enum BackendError {
    #[error("backendRef {0}: kind is not a core Service")]
    InvalidKind(String),
    #[error("backendRef {0}: no such Service")]
    NotFound(String),
    #[error("backendRef {0}: the Service has no such port")]
    NoSuchPort(String),
    #[error("backendRef {0}: ExternalName Services are not valid backends")]
    NotAllowed(String),
}

impl BackendError {
    /// The status condition reason (`ResolvedRefs=False`) this error is reported with.
    pub fn reason(&self) -> &'static str {
        match self {
            BackendError::InvalidKind(_) => "InvalidKind",
            BackendError::NotFound(_)
            | BackendError::NoSuchPort(_)
            | BackendError::NotAllowed(_) => "BackendNotFound",
        }
    }
}

/// A Service port, and the protocol its backend is forced to (`None`: as the port says).
type BackendKey = (ObjectKey, u16, Option<UpstreamProtocol>);

/// Resolves backendRefs against the objects. Within one compilation, every reference to the same
/// Service port (and protocol) shares one `Backend`, so a table holds each endpoint list once.
pub struct Resolver<'a> {
    world: &'a dyn World,
    cache: RefCell<AHashMap<BackendKey, Arc<Backend>>>,
}

impl<'a> Resolver<'a> {
    pub fn new(world: &'a dyn World) -> Self {
        Resolver {
            world,
            cache: RefCell::default(),
        }
    }

    /// Resolves a backendRef written in a route of `route_namespace`. `grpc`: it is a GRPCRoute's,
    /// so HTTP/2 upstream whatever the port says.
    pub fn resolve(
        &self,
        reference: &BackendRef,
        route_namespace: &str,
        grpc: bool,
    ) -> Result<Arc<Backend>, BackendError> {
        let namespace = reference.namespace.as_deref().unwrap_or(route_namespace);
        let key = ObjectKey::new(namespace, &reference.name);
        let shown = format!(
            "{}/{}",
            key,
            reference.port.map_or("-".to_string(), |p| p.to_string())
        );
        if !(reference.group.is_empty() && reference.kind == "Service") {
            return Err(BackendError::InvalidKind(format!(
                "{}/{} {shown}",
                reference.group, reference.kind
            )));
        }
        let service = self
            .world
            .service(&key)
            .ok_or_else(|| BackendError::NotFound(shown.clone()))?;
        if service.kind == crate::model::ServiceKind::ExternalName {
            return Err(BackendError::NotAllowed(shown));
        }
        let port = reference
            .port
            .ok_or_else(|| BackendError::NoSuchPort(shown.clone()))?;
        self.service_backend(service, port, grpc.then_some(UpstreamProtocol::Http2))
            .ok_or(BackendError::NoSuchPort(shown))
    }

    /// The backend of `service`'s `port`: what a Service without routes balances over.
    /// `protocol`: what upstream connections speak whatever the port says (`None`: as it says).
    pub fn service_backend(
        &self,
        service: &Service,
        port: u16,
        protocol: Option<UpstreamProtocol>,
    ) -> Option<Arc<Backend>> {
        let cache_key = (service.key.clone(), port, protocol);
        if let Some(backend) = self.cache.borrow().get(&cache_key) {
            return Some(backend.clone());
        }
        let service_port = service.port(port)?;
        let port_name = service_port.name.clone().unwrap_or_default();
        let endpoints = ready_endpoints(&self.world.slices(&service.key), &port_name);
        let backend = Arc::new(Backend {
            service: service.key.clone(),
            port,
            endpoints: endpoints.into(),
            protocol: protocol.unwrap_or_else(|| service_port.upstream_protocol()),
        });
        self.cache.borrow_mut().insert(cache_key, backend.clone());
        Some(backend)
    }
}

/// Ready endpoints of the named port; serving-but-terminating ones when none is ready (as
/// kube-proxy does). Sorted so equal inputs compile to equal snapshots.
pub fn ready_endpoints(slices: &[&EndpointSlice], port_name: &str) -> Vec<SocketAddr> {
    let collect = |pick: fn(&crate::model::Endpoint) -> bool| {
        let mut out: Vec<SocketAddr> = slices
            .iter()
            .filter_map(|s| {
                s.ports
                    .iter()
                    .find(|p| p.name == port_name)
                    .map(|p| (s, p.port))
            })
            .flat_map(|(s, port)| {
                s.endpoints
                    .iter()
                    .filter(|e| pick(e))
                    .flat_map(move |e| e.addresses.iter().map(move |ip| SocketAddr::new(*ip, port)))
            })
            .collect();
        out.sort();
        out.dedup();
        out
    };
    let ready = collect(|e| e.ready && !e.terminating);
    if ready.is_empty() {
        collect(|e| e.serving && e.terminating)
    } else {
        ready
    }
}

/// Weighted choice: with cumulative weights `[w0, w0+w1, …]`, `random % total` falls in entry i
/// with probability wi/total. Weight-0 entries are never chosen. `None` when all weights are 0.
pub fn pick_weighted(cumulative: &[u64], random: u64) -> Option<usize> {
    let total = *cumulative.last()?;
    if total == 0 {
        return None;
    }
    let point = random % total;
    Some(cumulative.partition_point(|&c| c <= point))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cumulative(weights: &[u32]) -> Vec<u64> {
        weights
            .iter()
            .scan(0u64, |acc, w| {
                *acc += u64::from(*w);
                Some(*acc)
            })
            .collect()
    }

    #[test]
    fn all_zero_and_empty_pick_nothing() {
        assert_eq!(pick_weighted(&[], 5), None);
        assert_eq!(pick_weighted(&cumulative(&[0, 0]), 5), None);
    }

    #[test]
    fn distribution_follows_weights() {
        let c = cumulative(&[70, 0, 30]);
        let mut counts = [0u32; 3];
        let mut state = 0x9E3779B97F4A7C15u64;
        for _ in 0..10_000 {
            // xorshift: deterministic, uniform enough for a share check.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            counts[pick_weighted(&c, state).unwrap()] += 1;
        }
        assert_eq!(counts[1], 0, "weight 0 is never chosen");
        let share = f64::from(counts[0]) / 10_000.0;
        assert!((share - 0.7).abs() < 0.02, "share {share}");
    }

    proptest! {
        #[test]
        fn never_picks_weight_zero(weights in proptest::collection::vec(0u32..5, 1..8), random in any::<u64>()) {
            let c = cumulative(&weights);
            match pick_weighted(&c, random) {
                None => prop_assert!(weights.iter().all(|w| *w == 0)),
                Some(i) => prop_assert!(weights[i] > 0),
            }
        }
    }
}
