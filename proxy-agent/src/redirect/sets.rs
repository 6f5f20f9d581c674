//! Keeping the kernel's set maps equal to what the route table says: `MESH_SERVICES` (the VIP:ports
//! the kernel steers) and `LOCAL_PODS` (this node's pods that opted in to `--local-sockets`).
//!
//! The kernel map is the truth: each reconciliation reads it back rather than trusting a copy, so a
//! half-applied earlier attempt is repaired by the next one.

use std::{
    collections::HashSet,
    hash::Hash,
    net::{IpAddr, SocketAddr},
};

use aya::maps::{HashMap, MapData};
use proxy_common::{maps, PodKey, ServiceKey, MAX_LOCAL_PODS, MAX_MESH_SERVICES};

use super::{addr, RedirectError};

/// What one reconciliation changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SetChange {
    pub added: usize,
    pub removed: usize,
    /// How many entries the map holds now.
    pub size: usize,
}

/// A set map of the programs: its name, for errors, and its capacity.
pub(crate) struct KernelSet<K> {
    map: HashMap<MapData, K, u8>,
    name: &'static str,
    capacity: u32,
    /// Entries after the last reconciliation (0 before the first).
    size: usize,
}

impl KernelSet<ServiceKey> {
    pub(crate) fn mesh_services(map: HashMap<MapData, ServiceKey, u8>) -> Self {
        Self {
            map,
            name: maps::MESH_SERVICES,
            capacity: MAX_MESH_SERVICES,
            size: 0,
        }
    }
}

impl KernelSet<PodKey> {
    pub(crate) fn local_pods(map: HashMap<MapData, PodKey, u8>) -> Self {
        Self {
            map,
            name: maps::LOCAL_PODS,
            capacity: MAX_LOCAL_PODS,
            size: 0,
        }
    }
}

/// The keys of `MESH_SERVICES` for `frontends`.
pub(crate) fn service_keys(frontends: impl IntoIterator<Item = SocketAddr>) -> HashSet<ServiceKey> {
    frontends
        .into_iter()
        .map(|a| ServiceKey {
            vip: addr::endpoint(a),
        })
        .collect()
}

/// The keys of `LOCAL_PODS` for `pods`.
pub(crate) fn pod_keys(pods: impl IntoIterator<Item = IpAddr>) -> HashSet<PodKey> {
    pods.into_iter()
        .map(|ip| PodKey {
            ip: addr::endpoint(SocketAddr::new(ip, 0)).ip,
        })
        .collect()
}

/// The changes that turn `current` into `wanted`: (to add, to remove).
pub(crate) fn diff<K: Copy + Eq + Hash>(
    current: &HashSet<K>,
    wanted: &HashSet<K>,
) -> (Vec<K>, Vec<K>) {
    let add = wanted.difference(current).copied().collect();
    let remove = current.difference(wanted).copied().collect();
    (add, remove)
}

impl<K: aya::Pod + Eq + Hash + std::fmt::Debug> KernelSet<K> {
    /// Makes the map hold exactly `wanted`.
    pub(crate) fn reconcile(&mut self, wanted: HashSet<K>) -> Result<SetChange, RedirectError> {
        let name = self.name;
        if wanted.len() > self.capacity as usize {
            return Err(RedirectError::SetTooLarge {
                map: name,
                wanted: wanted.len(),
                capacity: self.capacity,
            });
        }
        let current = self
            .map
            .keys()
            .collect::<Result<HashSet<_>, _>>()
            .map_err(|e| RedirectError::kernel(format!("reading {name}"), e))?;
        let (add, remove) = diff(&current, &wanted);
        // Removals first: the map then never holds more than max(current, wanted) entries.
        for key in &remove {
            self.map
                .remove(key)
                .map_err(|e| RedirectError::kernel(format!("removing {key:?} from {name}"), e))?;
        }
        for key in &add {
            self.map
                .insert(key, 1, 0)
                .map_err(|e| RedirectError::kernel(format!("adding {key:?} to {name}"), e))?;
        }
        self.size = wanted.len();
        Ok(SetChange {
            added: add.len(),
            removed: remove.len(),
            size: self.size,
        })
    }

    /// Entries after the last reconciliation (0 before the first).
    pub(crate) fn size(&self) -> usize {
        self.size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(addrs: &[&str]) -> HashSet<ServiceKey> {
        service_keys(addrs.iter().map(|a| a.parse().unwrap()))
    }

    #[test]
    fn diff_adds_missing_and_removes_extra() {
        let current = keys(&["10.0.0.1:80", "10.0.0.2:80"]);
        let wanted = keys(&["10.0.0.2:80", "[fd00::1]:80"]);
        let (add, remove) = diff(&current, &wanted);
        assert_eq!(
            add.into_iter().collect::<HashSet<_>>(),
            keys(&["[fd00::1]:80"])
        );
        assert_eq!(
            remove.into_iter().collect::<HashSet<_>>(),
            keys(&["10.0.0.1:80"])
        );
    }

    #[test]
    fn diff_of_equal_sets_is_empty() {
        let set = keys(&["10.0.0.1:80", "[::ffff:10.0.0.2]:80"]);
        assert_eq!(diff(&set, &set), (vec![], vec![]));
    }

    #[test]
    fn v4_mapped_and_v4_are_one_service() {
        assert_eq!(keys(&["10.0.0.2:80", "[::ffff:10.0.0.2]:80"]).len(), 1);
    }

    #[test]
    fn a_pod_has_one_key_per_address_whatever_its_form() {
        let pods = pod_keys(
            ["10.0.0.2", "::ffff:10.0.0.2", "fd00::2"]
                .iter()
                .map(|a| a.parse().unwrap()),
        );
        assert_eq!(pods.len(), 2);
        // What connect4 and connect6 look up: the destination's address, v4-mapped for IPv4.
        let dialled = addr::endpoint("10.0.0.2:8080".parse().unwrap());
        assert!(pods.contains(&PodKey { ip: dialled.ip }));
    }
}
