//! Session affinity (Service `sessionAffinity: ClientIP`), as kube-proxy applies it: a caller
//! (the pod's IP, not the agent's) keeps the endpoint it was sent to for as long as it calls the
//! Service again within `sessionAffinityConfig.clientIP.timeoutSeconds`; an endpoint that left
//! the Service ends the stickiness.

use ahash::AHashMap;
use gamma_engine::model::ObjectKey;
use gamma_engine::routes::backends::Backend;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Callers remembered at most (the key is client-controlled: bounded, and counted when full).
pub const MAX_ENTRIES: usize = 65_536;

type Key = (ObjectKey, u16, IpAddr);

#[derive(Default)]
struct Table {
    bindings: AHashMap<Key, Sticky>,
    /// When expired bindings were last swept out of a full table (at most once a second: a sweep
    /// walks every binding under the lock).
    swept: Option<Instant>,
}

/// How often a full table is swept of expired bindings.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

struct Sticky {
    endpoint: SocketAddr,
    last_used: Instant,
    timeout: Duration,
}

#[derive(Default)]
pub struct Affinity {
    entries: Mutex<Table>,
    /// Callers not remembered because the table was full of live entries (a metric's).
    full: Arc<AtomicU64>,
}

impl Affinity {
    /// `full` counts the callers not bound because the table was full.
    pub fn new(full: Arc<AtomicU64>) -> Self {
        Affinity {
            entries: Mutex::default(),
            full,
        }
    }

    /// The endpoint `caller` is bound to on `backend`, if the binding is live and the endpoint
    /// still serves; using it renews the binding. Live by the Service's timeout now, not the one
    /// it was bound under: a timeout lowered applies to existing callers, as kube-proxy's next
    /// rule sync applies it.
    pub fn endpoint(&self, backend: &Backend, caller: IpAddr, now: Instant) -> Option<SocketAddr> {
        let key = (backend.service.clone(), backend.port, caller);
        let mut table = self.entries.lock().expect("not poisoned");
        let sticky = table.bindings.get_mut(&key)?;
        let live = backend.affinity.filter(|timeout| {
            now.duration_since(sticky.last_used) <= *timeout
                && backend.endpoints.contains(&sticky.endpoint)
        });
        let Some(timeout) = live else {
            table.bindings.remove(&key);
            return None;
        };
        sticky.last_used = now;
        // The sweep of a full table reads it: a raised timeout keeps the binding there too.
        sticky.timeout = timeout;
        Some(sticky.endpoint)
    }

    /// Binds `caller` to `endpoint` on `backend` (whose `affinity` gives the timeout).
    pub fn bind(&self, backend: &Backend, caller: IpAddr, endpoint: SocketAddr, now: Instant) {
        let Some(timeout) = backend.affinity else {
            return;
        };
        let key = (backend.service.clone(), backend.port, caller);
        let sticky = Sticky {
            endpoint,
            last_used: now,
            timeout,
        };
        let mut table = self.entries.lock().expect("not poisoned");
        if let Some(bound) = table.bindings.get_mut(&key) {
            *bound = sticky; // rebinding does not grow the table
            return;
        }
        if table.bindings.len() >= MAX_ENTRIES {
            if table
                .swept
                .is_none_or(|at| now.duration_since(at) >= SWEEP_EVERY)
            {
                table.swept = Some(now);
                table
                    .bindings
                    .retain(|_, s| now.duration_since(s.last_used) <= s.timeout);
            }
            if table.bindings.len() >= MAX_ENTRIES {
                self.full.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        table.bindings.insert(key, sticky);
    }

    /// Keeps only the bindings to an endpoint that one of `backends` (a new table's) serves with
    /// session affinity; returns how many went. A Service whose affinity was turned off (or which
    /// was deleted) drops them: turned on again, it starts afresh, as kube-proxy's rules do.
    pub fn keep_only<'b>(&self, backends: impl Iterator<Item = &'b Backend>) -> usize {
        if self.bindings() == 0 {
            return 0; // no Service with affinity called yet: nothing to walk
        }
        let sticky: ahash::AHashSet<(&ObjectKey, u16, SocketAddr)> = backends
            .filter(|b| b.affinity.is_some())
            .flat_map(|b| b.endpoints.iter().map(move |e| (&b.service, b.port, *e)))
            .collect();
        let mut table = self.entries.lock().expect("not poisoned");
        let before = table.bindings.len();
        table
            .bindings
            .retain(|(service, port, _), bound| sticky.contains(&(service, *port, bound.endpoint)));
        before - table.bindings.len()
    }

    /// Live or expired bindings held (expired ones go when the table fills).
    pub fn bindings(&self) -> usize {
        self.entries.lock().expect("not poisoned").bindings.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gamma_engine::model::UpstreamProtocol;

    fn backend(endpoints: &[&str], affinity: Option<u64>) -> Backend {
        Backend::new(
            ObjectKey::new("ns", "svc"),
            80,
            endpoints.iter().map(|e| e.parse().unwrap()).collect(),
            UpstreamProtocol::AsCaller,
            affinity.map(Duration::from_secs),
        )
    }

    #[test]
    fn a_caller_keeps_its_endpoint_until_idle_for_the_timeout_or_the_endpoint_goes() {
        let affinity = Affinity::default();
        let b = backend(&["10.0.0.1:80", "10.0.0.2:80"], Some(10));
        let (caller, other) = ("10.1.0.1".parse().unwrap(), "10.1.0.2".parse().unwrap());
        let t0 = Instant::now();
        assert_eq!(affinity.endpoint(&b, caller, t0), None);
        affinity.bind(&b, caller, "10.0.0.2:80".parse().unwrap(), t0);
        // Each use renews: 9 s apart, three times, still bound.
        for step in 1..=3 {
            let at = t0 + Duration::from_secs(9 * step);
            assert_eq!(
                affinity.endpoint(&b, caller, at),
                Some("10.0.0.2:80".parse().unwrap())
            );
        }
        assert_eq!(affinity.endpoint(&b, other, t0), None, "per caller");
        // Idle longer than the timeout: unbound.
        assert_eq!(
            affinity.endpoint(&b, caller, t0 + Duration::from_secs(27 + 11)),
            None
        );
        // The endpoint left the Service: unbound.
        affinity.bind(&b, caller, "10.0.0.2:80".parse().unwrap(), t0);
        let shrunk = backend(&["10.0.0.1:80"], Some(10));
        assert_eq!(affinity.endpoint(&shrunk, caller, t0), None);
        assert_eq!(affinity.bindings(), 0);
        // No affinity on the Service: nothing remembered.
        affinity.bind(
            &backend(&["10.0.0.1:80"], None),
            caller,
            "10.0.0.1:80".parse().unwrap(),
            t0,
        );
        assert_eq!(affinity.bindings(), 0);
    }

    #[test]
    fn a_lowered_timeout_applies_to_callers_already_bound() {
        let affinity = Affinity::default();
        let endpoints = ["10.0.0.1:80", "10.0.0.2:80"];
        let caller = "10.1.0.1".parse().unwrap();
        let t0 = Instant::now();
        affinity.bind(
            &backend(&endpoints, Some(3600)),
            caller,
            "10.0.0.2:80".parse().unwrap(),
            t0,
        );
        let lowered = backend(&endpoints, Some(10));
        assert_eq!(
            affinity.endpoint(&lowered, caller, t0 + Duration::from_secs(11)),
            None
        );
        assert_eq!(affinity.bindings(), 0);
    }

    /// A raised timeout applies to callers already bound once they call again, also when a full
    /// table is swept: a binding made under 10 s, renewed under an hour, is live 25 s later.
    #[test]
    fn a_raised_timeout_keeps_bindings_through_the_sweep_of_a_full_table() {
        let affinity = Affinity::default();
        let endpoints = ["10.0.0.1:80", "10.0.0.2:80"];
        let (short, raised) = (
            backend(&endpoints, Some(10)),
            backend(&endpoints, Some(3600)),
        );
        let caller = "10.1.0.1".parse().unwrap();
        let to = "10.0.0.2:80".parse().unwrap();
        let t0 = Instant::now();
        affinity.bind(&short, caller, to, t0);
        assert_eq!(
            affinity.endpoint(&raised, caller, t0 + Duration::from_secs(5)),
            Some(to)
        );
        let filled = t0 + Duration::from_secs(20);
        for i in 1..MAX_ENTRIES as u32 {
            let other = std::net::Ipv4Addr::from(0x0b00_0000 + i).into();
            affinity.bind(&raised, other, to, filled);
        }
        assert_eq!(affinity.bindings(), MAX_ENTRIES);
        // A new caller sweeps the full table.
        affinity.bind(
            &raised,
            "10.2.0.1".parse().unwrap(),
            to,
            filled + Duration::from_secs(10),
        );
        assert_eq!(
            affinity.endpoint(&raised, caller, t0 + Duration::from_secs(30)),
            Some(to)
        );
    }

    /// Affinity turned off, then on again: the callers start afresh (the table without it
    /// dropped their bindings); a Service still sticky keeps them.
    #[test]
    fn a_table_without_the_affinity_drops_its_bindings() {
        let affinity = Affinity::default();
        let sticky = backend(&["10.0.0.1:80", "10.0.0.2:80"], Some(3600));
        let caller = "10.1.0.1".parse().unwrap();
        let t0 = Instant::now();
        affinity.bind(&sticky, caller, "10.0.0.2:80".parse().unwrap(), t0);
        assert_eq!(affinity.keep_only([&sticky].into_iter()), 0);
        assert_eq!(affinity.bindings(), 1);
        let off = backend(&["10.0.0.1:80", "10.0.0.2:80"], None);
        assert_eq!(affinity.keep_only([&off].into_iter()), 1);
        assert_eq!(
            affinity.endpoint(&sticky, caller, t0),
            None,
            "on again: afresh"
        );
    }
}
