//! Keeping `MESH_SERVICES` equal to the set of VIP:ports the route table says are meshed.
//!
//! The kernel map is the truth: each reconciliation reads it back rather than trusting a copy, so a
//! half-applied earlier attempt is repaired by the next one.

use std::{collections::HashSet, net::SocketAddr};

use aya::maps::{HashMap, MapData};
use proxy_common::{ServiceKey, MAX_MESH_SERVICES};

use super::{addr, RedirectError};

/// What one reconciliation changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MeshServicesChange {
    pub added: usize,
    pub removed: usize,
}

/// The changes that turn `current` into `wanted`: (to add, to remove).
pub(crate) fn diff(
    current: &HashSet<ServiceKey>,
    wanted: &HashSet<ServiceKey>,
) -> (Vec<ServiceKey>, Vec<ServiceKey>) {
    let add = wanted.difference(current).copied().collect();
    let remove = current.difference(wanted).copied().collect();
    (add, remove)
}

/// Makes `map` hold exactly `frontends`.
pub(crate) fn reconcile(
    map: &mut HashMap<MapData, ServiceKey, u8>,
    frontends: impl IntoIterator<Item = SocketAddr>,
) -> Result<MeshServicesChange, RedirectError> {
    let wanted: HashSet<ServiceKey> = frontends
        .into_iter()
        .map(|a| ServiceKey {
            vip: addr::endpoint(a),
        })
        .collect();
    if wanted.len() > MAX_MESH_SERVICES as usize {
        return Err(RedirectError::TooManyServices {
            wanted: wanted.len(),
            capacity: MAX_MESH_SERVICES,
        });
    }
    let current = map
        .keys()
        .collect::<Result<HashSet<_>, _>>()
        .map_err(|e| RedirectError::kernel("reading MESH_SERVICES", e))?;
    let (add, remove) = diff(&current, &wanted);
    // Removals first: the map then never holds more than max(current, wanted) entries.
    for key in &remove {
        map.remove(key).map_err(|e| {
            RedirectError::kernel(format!("removing {key:?} from MESH_SERVICES"), e)
        })?;
    }
    for key in &add {
        map.insert(key, 1, 0)
            .map_err(|e| RedirectError::kernel(format!("adding {key:?} to MESH_SERVICES"), e))?;
    }
    Ok(MeshServicesChange {
        added: add.len(),
        removed: remove.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(addrs: &[&str]) -> HashSet<ServiceKey> {
        addrs
            .iter()
            .map(|a| ServiceKey {
                vip: addr::endpoint(a.parse().unwrap()),
            })
            .collect()
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
}
