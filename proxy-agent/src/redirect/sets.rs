//! Keeping the kernel's small maps equal to what the route table says: `MESH_SERVICES` (the
//! VIP:ports the kernel steers, each with how: `STEER_ANY` or `STEER_CLIENT_FIRST`) and
//! `LOCAL_PODS` (a set: this node's pods that opted in to `--local-sockets`).
//!
//! The kernel map is the truth: each reconciliation reads it back rather than trusting a copy, so a
//! half-applied earlier attempt is repaired by the next one.

use std::{
    collections::HashMap,
    hash::Hash,
    net::{IpAddr, SocketAddr},
};

use aya::maps::MapData;
use proxy_common::{
    maps, PodKey, ServiceKey, ANY_POD_OPTED_IN, MAX_LOCAL_PODS, MAX_MESH_SERVICES, STEER_ANY,
    STEER_CLIENT_FIRST,
};

use super::{addr, RedirectError};

/// What one reconciliation changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SetChange {
    /// Entries added or changed.
    pub written: usize,
    pub removed: usize,
    /// How many entries the map holds now.
    pub size: usize,
}

/// A map of the programs from keys to one byte: its name, for errors, and its capacity.
pub(crate) struct KernelMap<K> {
    map: aya::maps::HashMap<MapData, K, u8>,
    name: &'static str,
    capacity: u32,
    /// Entries after the last reconciliation (0 before the first).
    size: usize,
}

impl KernelMap<ServiceKey> {
    pub(crate) fn mesh_services(map: aya::maps::HashMap<MapData, ServiceKey, u8>) -> Self {
        Self {
            map,
            name: maps::MESH_SERVICES,
            capacity: MAX_MESH_SERVICES,
            size: 0,
        }
    }
}

impl<K> KernelMap<K> {
    /// Entries after the last reconciliation (0 before the first).
    pub(crate) fn size(&self) -> usize {
        self.size
    }
}

impl KernelMap<PodKey> {
    pub(crate) fn local_pods(map: aya::maps::HashMap<MapData, PodKey, u8>) -> Self {
        Self {
            map,
            name: maps::LOCAL_PODS,
            // And `ANY_POD_OPTED_IN`.
            capacity: MAX_LOCAL_PODS + 1,
            size: 0,
        }
    }

    /// Makes the map hold exactly `pods`, and `ANY_POD_OPTED_IN` while it holds any. The entries
    /// written and removed count the marker; the size is the pods'.
    pub(crate) fn reconcile_pods(
        &mut self,
        pods: impl IntoIterator<Item = IpAddr>,
    ) -> Result<SetChange, RedirectError> {
        let mut wanted = pod_entries(pods);
        let pods = wanted.len();
        if pods > 0 {
            wanted.insert(ANY_POD_OPTED_IN, 1);
        }
        Ok(SetChange {
            size: pods,
            ..self.reconcile(wanted)?
        })
    }

    /// Pods after the last reconciliation (0 before the first), the marker not counted.
    pub(crate) fn pods(&self) -> usize {
        self.size.saturating_sub(1)
    }
}

/// The entries of `MESH_SERVICES` for `frontends` (with whether their clients speak first).
pub(crate) fn service_entries(
    frontends: impl IntoIterator<Item = (SocketAddr, bool)>,
) -> HashMap<ServiceKey, u8> {
    frontends
        .into_iter()
        .map(|(address, client_first)| {
            let key = ServiceKey {
                vip: addr::endpoint(address),
            };
            (
                key,
                if client_first {
                    STEER_CLIENT_FIRST
                } else {
                    STEER_ANY
                },
            )
        })
        .collect()
}

/// The entries of `LOCAL_PODS` for `pods` (the value is unused).
fn pod_entries(pods: impl IntoIterator<Item = IpAddr>) -> HashMap<PodKey, u8> {
    pods.into_iter()
        .map(|ip| {
            let key = PodKey {
                ip: addr::endpoint(SocketAddr::new(ip, 0)).ip,
            };
            (key, 1)
        })
        .collect()
}

/// The changes that turn `current` into `wanted`: (to write, to remove).
pub(crate) fn diff<K: Copy + Eq + Hash>(
    current: &HashMap<K, u8>,
    wanted: &HashMap<K, u8>,
) -> (Vec<(K, u8)>, Vec<K>) {
    let write = wanted
        .iter()
        .filter(|(key, value)| current.get(key) != Some(value))
        .map(|(key, value)| (*key, *value))
        .collect();
    let remove = current
        .keys()
        .filter(|key| !wanted.contains_key(key))
        .copied()
        .collect();
    (write, remove)
}

impl<K: aya::Pod + Eq + Hash + std::fmt::Debug> KernelMap<K> {
    /// Makes the map hold exactly `wanted`.
    pub(crate) fn reconcile(&mut self, wanted: HashMap<K, u8>) -> Result<SetChange, RedirectError> {
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
            .iter()
            .collect::<Result<HashMap<_, _>, _>>()
            .map_err(|e| RedirectError::kernel(format!("reading {name}"), e))?;
        let (write, remove) = diff(&current, &wanted);
        // Removals first: the map then never holds more than max(current, wanted) entries.
        for key in &remove {
            self.map
                .remove(key)
                .map_err(|e| RedirectError::kernel(format!("removing {key:?} from {name}"), e))?;
        }
        for (key, value) in &write {
            self.map
                .insert(key, value, 0)
                .map_err(|e| RedirectError::kernel(format!("writing {key:?} in {name}"), e))?;
        }
        self.size = wanted.len();
        Ok(SetChange {
            written: write.len(),
            removed: remove.len(),
            size: self.size,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Entries for frontends: `+` before an address means its clients speak first.
    fn entries(addrs: &[&str]) -> HashMap<ServiceKey, u8> {
        service_entries(addrs.iter().map(|a| match a.strip_prefix('+') {
            Some(a) => (a.parse().unwrap(), true),
            None => (a.parse().unwrap(), false),
        }))
    }

    #[test]
    fn diff_writes_missing_and_changed_and_removes_extra() {
        let current = entries(&["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]);
        let wanted = entries(&["10.0.0.2:80", "+10.0.0.3:80", "[fd00::1]:80"]);
        let (write, remove) = diff(&current, &wanted);
        assert_eq!(
            write.into_iter().collect::<HashMap<_, _>>(),
            entries(&["+10.0.0.3:80", "[fd00::1]:80"])
        );
        assert_eq!(
            remove
                .into_iter()
                .map(|k| (k, STEER_ANY))
                .collect::<HashMap<_, _>>(),
            entries(&["10.0.0.1:80"])
        );
    }

    #[test]
    fn diff_of_equal_maps_is_empty() {
        let map = entries(&["10.0.0.1:80", "+[::ffff:10.0.0.2]:80"]);
        assert_eq!(diff(&map, &map), (vec![], vec![]));
    }

    #[test]
    fn v4_mapped_and_v4_are_one_service() {
        assert_eq!(entries(&["10.0.0.2:80", "[::ffff:10.0.0.2]:80"]).len(), 1);
    }

    #[test]
    fn a_pod_has_one_key_per_address_whatever_its_form() {
        let pods = pod_entries(
            ["10.0.0.2", "::ffff:10.0.0.2", "fd00::2"]
                .iter()
                .map(|a| a.parse().unwrap()),
        );
        assert_eq!(pods.len(), 2);
        // What connect4 and connect6 look up: the destination's address, v4-mapped for IPv4.
        let dialled = addr::endpoint("10.0.0.2:8080".parse().unwrap());
        assert!(pods.contains_key(&PodKey { ip: dialled.ip }));
    }
}
