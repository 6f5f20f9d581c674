//! Request series: counts and durations per (Service port, route rule, backend) and status.
//!
//! A request records into the series its table attached to the rule or backend it was routed
//! with (`gamma_engine::routes::Attached`): no lock, no map, no label string on the request path.
//! A slot is filled on its first request from [`SeriesTable`], which builds the labels and keeps
//! the series alive across snapshots until its Service or route is gone. Each status's
//! durations are sharded per thread, so that workers do not write the same cache lines; a scrape
//! adds the shards up.

use ahash::{AHashMap, AHashSet};
use gamma_engine::routes::{Attached, CompiledRule, Frontend};
use gamma_engine::{ObjectKey, Snapshot};
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// Upper bounds of the duration buckets, in seconds.
pub const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Statuses a series keeps without a lock; more (rare: a series sees a handful of codes) go to a
/// locked list.
const STATUS_SLOTS: usize = 4;

/// Shards per status: threads write the shard of their index modulo this.
const SHARDS: usize = 4;

/// A series' labels. Empty strings stand for "none" (rendered `-`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeriesKey {
    pub service: String,
    pub route: String,
    pub backend: String,
}

impl SeriesKey {
    /// Service, route and backend as shown (in `/metrics` and the access log): `-` for none.
    pub fn shown(&self) -> [&str; 3] {
        [&self.service, &self.route, &self.backend].map(|v| if v.is_empty() { "-" } else { v })
    }

    /// The frontend of this series' Service port in `snapshot`, if it is there.
    fn frontend<'s>(&self, snapshot: &'s Snapshot) -> Option<&'s Arc<Frontend>> {
        let (service, port) = self.service.rsplit_once(':')?;
        let (namespace, name) = service.split_once('/')?;
        snapshot.frontend_of(&ObjectKey::new(namespace, name), port.parse().ok()?)
    }
}

/// The route and backend labels a frontend's requests record into: its direct backend's, and
/// each rule's with its backendRefs'.
struct Served {
    direct: String,
    /// A rule's route label → its backends' names.
    rules: AHashMap<String, AHashSet<String>>,
}

impl Served {
    fn of(frontend: &Frontend) -> Served {
        let mut rules: AHashMap<String, AHashSet<String>> = AHashMap::new();
        let tables = frontend.producer.iter().chain(frontend.consumers.values());
        for rule in tables.flat_map(|table| table.rules()) {
            let backends = (0..rule.backends.len()).filter_map(|i| rule.backend(i).ok());
            rules
                .entry(route_label(rule))
                .or_default()
                .extend(backends.map(|b| b.name()));
        }
        Served {
            direct: frontend.direct.name(),
            rules,
        }
    }

    /// Whether requests of this frontend can still record into `key`: the rule it names (if
    /// any) is among the frontend's, and the backend it names among the rule's backendRefs (or
    /// is the direct backend).
    fn covers(&self, key: &SeriesKey) -> bool {
        if key.route.is_empty() {
            return key.backend.is_empty() || key.backend == self.direct;
        }
        self.rules
            .get(&key.route)
            .is_some_and(|backends| key.backend.is_empty() || backends.contains(&key.backend))
    }
}

/// One shard of a status's durations: one cache line pair of its own.
#[derive(Default)]
#[repr(align(128))]
struct Shard {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

#[derive(Default)]
struct Durations {
    shards: [Shard; SHARDS],
}

/// What a scrape reads of one status of a series.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observed {
    pub count: u64,
    pub sum_seconds: f64,
    /// Counts per bucket (not cumulative), one per bound of [`BUCKETS`]; those over the last
    /// bound are `count` less their sum.
    pub buckets: [u64; BUCKETS.len()],
}

impl Durations {
    /// The count goes up before the bucket (released), and a scrape reads the buckets
    /// (acquired) before the count: a scrape that sees an observation's bucket sees its count,
    /// so that no bucket is ever ahead of `+Inf`.
    fn observe(&self, duration: Duration) {
        let shard = &self.shards[shard_index()];
        let seconds = duration.as_secs_f64();
        shard.count.fetch_add(1, Ordering::Relaxed);
        shard
            .sum_micros
            .fetch_add(duration.as_micros() as u64, Ordering::Relaxed);
        if let Some(i) = BUCKETS.iter().position(|b| seconds <= *b) {
            shard.buckets[i].fetch_add(1, Ordering::Release);
        }
    }

    fn read(&self) -> Observed {
        let mut observed = Observed::default();
        let mut sum_micros = 0;
        for shard in &self.shards {
            for (total, bucket) in observed.buckets.iter_mut().zip(&shard.buckets) {
                *total += bucket.load(Ordering::Acquire);
            }
            observed.count += shard.count.load(Ordering::Relaxed);
            sum_micros += shard.sum_micros.load(Ordering::Relaxed);
        }
        observed.sum_seconds = sum_micros as f64 / 1e6;
        observed
    }
}

/// This thread's shard: threads take the next one as they first record.
fn shard_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    SHARD.with(|s| *s)
}

/// A status slot: free (0) until a request with a new status claims it.
#[derive(Default)]
struct StatusSlot {
    status: AtomicU16,
    durations: OnceLock<Box<Durations>>,
}

pub struct RequestSeries {
    pub key: SeriesKey,
    slots: [StatusSlot; STATUS_SLOTS],
    more: Mutex<Vec<(u16, Box<Durations>)>>,
    /// How its gRPC calls ended: an HTTP status of 200 says nothing of a gRPC call's outcome.
    pub grpc: Arc<GrpcCounts>,
}

/// gRPC calls by the `grpc-status` they ended with (0 to 16; another value counts as UNKNOWN).
#[derive(Default)]
pub struct GrpcCounts([AtomicU64; 17]);

impl GrpcCounts {
    pub const UNKNOWN: u32 = 2;

    pub fn record(&self, status: u32) {
        let slot = usize::try_from(status)
            .ok()
            .filter(|s| *s < self.0.len())
            .unwrap_or(Self::UNKNOWN as usize);
        self.0[slot].fetch_add(1, Ordering::Relaxed);
    }

    /// Each status seen, with its count.
    pub fn read(&self) -> Vec<(u32, u64)> {
        (0u32..)
            .zip(&self.0)
            .map(|(status, count)| (status, count.load(Ordering::Relaxed)))
            .filter(|(_, count)| *count > 0)
            .collect()
    }
}

impl RequestSeries {
    fn new(key: SeriesKey) -> Self {
        RequestSeries {
            key,
            slots: Default::default(),
            more: Mutex::default(),
            grpc: Arc::default(),
        }
    }

    pub fn record(&self, status: u16, duration: Duration) {
        for slot in &self.slots {
            let claimed = match slot.status.load(Ordering::Acquire) {
                0 => match slot.status.compare_exchange(
                    0,
                    status,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => true,
                    Err(other) => other == status,
                },
                other => other == status,
            };
            if claimed {
                return slot.durations.get_or_init(Box::default).observe(duration);
            }
        }
        let mut more = self.more.lock().expect("not poisoned");
        match more.iter().find(|(s, _)| *s == status) {
            Some((_, durations)) => durations.observe(duration),
            None => {
                let durations = Box::<Durations>::default();
                durations.observe(duration);
                more.push((status, durations));
            }
        }
    }

    /// Each status seen, in order, with what was observed.
    pub fn read(&self) -> Vec<(u16, Observed)> {
        let mut statuses: Vec<(u16, Observed)> = self
            .slots
            .iter()
            .filter_map(|slot| {
                let durations = slot.durations.get()?;
                Some((slot.status.load(Ordering::Acquire), durations.read()))
            })
            .collect();
        let more = self.more.lock().expect("not poisoned");
        statuses.extend(more.iter().map(|(s, d)| (*s, d.read())));
        statuses.sort_by_key(|(s, _)| *s);
        statuses
    }

    pub fn count(&self, status: u16) -> u64 {
        self.read()
            .into_iter()
            .find(|(s, _)| *s == status)
            .map_or(0, |(_, o)| o.count)
    }
}

/// Where a request counts: a slot holding one series (a frontend's, or the agent's own for
/// requests that reached no frontend), or a compiled rule's slot, which holds the rule's series
/// and each of its backendRefs'.
#[derive(Clone, Copy)]
pub enum SeriesSlot<'a> {
    One(&'a Attached),
    Rule {
        rule: &'a CompiledRule,
        /// The backendRef the request was sent to; `None`: answered before one was chosen.
        backend: Option<usize>,
    },
}

/// A rule's series, each made on its first request: the rule's own, then one per backendRef.
struct RuleSeries {
    own: OnceLock<Arc<RequestSeries>>,
    backends: Box<[OnceLock<Arc<RequestSeries>>]>,
}

/// Every series alive, by labels: consulted when a table's slot is first used, and by scrapes.
#[derive(Default)]
pub struct SeriesTable {
    by_key: Mutex<AHashMap<SeriesKey, Arc<RequestSeries>>>,
}

impl SeriesTable {
    /// The series of `key`, made if new.
    pub fn series(&self, key: SeriesKey) -> Arc<RequestSeries> {
        let mut by_key = self.by_key.lock().expect("not poisoned");
        by_key
            .entry(key)
            .or_insert_with_key(|key| Arc::new(RequestSeries::new(key.clone())))
            .clone()
    }

    /// The series at `slot`, filled with `key()`'s the first time.
    pub fn attached<'a>(
        &self,
        slot: SeriesSlot<'a>,
        key: impl FnOnce() -> SeriesKey,
    ) -> &'a RequestSeries {
        let cell = match slot {
            SeriesSlot::One(slot) => return slot.get_or_init(|| self.series(key())),
            SeriesSlot::Rule { rule, backend } => {
                let series = rule.series.get_or_init(|| {
                    Arc::new(RuleSeries {
                        own: OnceLock::new(),
                        backends: rule.backends.iter().map(|_| OnceLock::new()).collect(),
                    })
                });
                backend.map_or(&series.own, |index| &series.backends[index])
            }
        };
        cell.get_or_init(|| self.series(key()))
    }

    /// Every series, sorted by labels (a scrape).
    pub fn all(&self) -> Vec<Arc<RequestSeries>> {
        let mut all: Vec<_> = self
            .by_key
            .lock()
            .expect("not poisoned")
            .values()
            .cloned()
            .collect();
        all.sort_by(|a, b| a.key.cmp(&b.key));
        all
    }

    /// Drops the series `snapshot` can no longer record into (its Service port, rule or
    /// backendRef gone; the agent's own, without a Service, stay); returns how many. Each
    /// frontend's labels are built once (not once per series), and outside the lock: requests
    /// that find a new table's slots empty take it. A table still holding a dropped series
    /// keeps recording into it, unseen, until it is replaced.
    pub fn prune(&self, snapshot: &Snapshot) -> usize {
        let keys: Vec<SeriesKey> = self
            .by_key
            .lock()
            .expect("not poisoned")
            .keys()
            .cloned()
            .collect();
        let mut served: AHashMap<&str, Option<Served>> = AHashMap::new();
        let dead: Vec<&SeriesKey> = keys
            .iter()
            .filter(|key| {
                if key.service.is_empty() {
                    return false;
                }
                let frontend = served
                    .entry(&key.service)
                    .or_insert_with(|| key.frontend(snapshot).map(|f| Served::of(f)));
                !frontend.as_ref().is_some_and(|f| f.covers(key))
            })
            .collect();
        if dead.is_empty() {
            return 0;
        }
        let mut by_key = self.by_key.lock().expect("not poisoned");
        dead.into_iter()
            .filter(|key| by_key.remove(*key).is_some())
            .count()
    }

    /// Requests seen with these labels and status (tests and `/explain` read it).
    pub fn count(&self, key: &SeriesKey, status: u16) -> u64 {
        let series = self.by_key.lock().expect("not poisoned").get(key).cloned();
        series.map_or(0, |s| s.count(status))
    }
}

/// The labels of the series a request routed with these belongs to (a backend's is
/// `Backend::name`).
pub fn service_label(frontend: &Frontend) -> String {
    format!("{}:{}", frontend.service, frontend.port)
}

pub fn route_label(rule: &CompiledRule) -> String {
    format!("{} rule {}", rule.route, rule.name_or_index())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(service: &str, route: &str) -> SeriesKey {
        SeriesKey {
            service: service.into(),
            route: route.into(),
            backend: String::new(),
        }
    }

    /// A scrape during recording never shows more in the buckets than in the count (`+Inf`):
    /// Prometheus takes non-monotonic buckets for a broken histogram.
    #[test]
    fn a_scrape_never_sees_buckets_ahead_of_the_count() {
        let durations = Arc::new(Durations::default());
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writers: Vec<_> = (0..2)
            .map(|_| {
                let (durations, stop) = (durations.clone(), stop.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        durations.observe(Duration::from_micros(300));
                    }
                })
            })
            .collect();
        let started = std::time::Instant::now();
        let mut ahead = 0;
        while started.elapsed() < Duration::from_millis(300) {
            let read = durations.read();
            if read.buckets.iter().sum::<u64>() > read.count {
                ahead += 1;
            }
        }
        stop.store(true, Ordering::Relaxed);
        writers.into_iter().for_each(|w| w.join().unwrap());
        assert_eq!(ahead, 0, "scrapes with buckets ahead of the count");
    }

    #[test]
    fn statuses_past_the_slots_are_kept_too() {
        let series = RequestSeries::new(key("ns/s:80", ""));
        for status in [200, 404, 200, 500, 503, 502, 200, 302] {
            series.record(status, Duration::from_millis(3));
        }
        let read = series.read();
        let statuses: Vec<u16> = read.iter().map(|(s, _)| *s).collect();
        assert_eq!(statuses, [200, 302, 404, 500, 502, 503]);
        assert_eq!(series.count(200), 3);
        assert_eq!(series.count(302), 1);
        let (_, ok) = &read[0];
        assert_eq!(ok.buckets[2], 0, "3 ms is over 2.5 ms");
        assert_eq!(ok.buckets[3], 3, "and within 5 ms");
        assert_eq!(ok.buckets.iter().sum::<u64>(), 3);
        assert!((ok.sum_seconds - 0.009).abs() < 1e-9);
    }

    #[test]
    fn threads_write_their_own_shards_and_reads_add_them_up() {
        let series = Arc::new(RequestSeries::new(key("ns/s:80", "")));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let series = series.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        series.record(200, Duration::from_micros(100));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(series.count(200), 4000);
    }

    #[test]
    fn a_slot_is_filled_once_from_the_table() {
        let table = SeriesTable::default();
        let slot = Attached::default();
        let mut made = 0;
        for _ in 0..3 {
            table
                .attached(SeriesSlot::One(&slot), || {
                    made += 1;
                    key("ns/s:80", "")
                })
                .record(200, Duration::ZERO);
        }
        assert_eq!(made, 1);
        assert_eq!(table.count(&key("ns/s:80", ""), 200), 3);
    }

    /// The snapshot of Service `ns/s` (port 80) with route `ns/r`: one rule sending to `s`
    /// through `backend_refs` backendRefs.
    fn one_route(backend_refs: usize) -> Arc<Snapshot> {
        let refs = vec!["{name: s, port: 80}"; backend_refs].join(", ");
        let yaml = format!("apiVersion: v1\nkind: Service\nmetadata: {{name: s, namespace: ns}}\nspec:\n  clusterIP: 10.96.0.10\n  ports: [{{name: http, port: 80}}]\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r, namespace: ns}}\nspec:\n  parentRefs: [{{kind: Service, group: '', name: s, port: 80}}]\n  rules: [{{backendRefs: [{refs}]}}]\n");
        crate::test_dir::snapshot_of(&yaml)
    }

    /// A rule named `"1"` and an unnamed rule at index 1 count apart.
    #[test]
    fn a_rule_named_like_an_index_has_a_series_of_its_own() {
        let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: ns}\nspec:\n  clusterIP: 10.96.0.10\n  ports: [{name: http, port: 80}]\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: ns}\nspec:\n  parentRefs: [{kind: Service, group: '', name: s, port: 80}]\n  rules:\n  - {name: '1', matches: [{path: {value: /named}}], backendRefs: [{name: s, port: 80}]}\n  - backendRefs: [{name: s, port: 80}]\n";
        let snapshot = crate::test_dir::snapshot_of(yaml);
        let frontend = snapshot
            .frontend_of(&ObjectKey::new("ns", "s"), 80)
            .unwrap();
        let labels: Vec<String> = frontend.table_for(None).unwrap().rules()[..2]
            .iter()
            .map(route_label)
            .collect();
        assert_eq!(labels.len(), 2);
        assert_ne!(labels[0], labels[1], "{labels:?}");
    }

    /// One slot per compiled rule holds the rule's own series and each backendRef's, apart.
    #[test]
    fn a_rule_slot_keeps_its_own_series_and_each_backends_apart() {
        let snapshot = one_route(2);
        let frontend = snapshot
            .frontend_of(&ObjectKey::new("ns", "s"), 80)
            .unwrap();
        let rule = &frontend.table_for(None).unwrap().rules()[0];
        let table = SeriesTable::default();
        let labels = |backend: &str| SeriesKey {
            backend: backend.into(),
            ..key("ns/s:80", "HTTPRoute ns/r rule #0")
        };
        for (backend, label, times) in [(None, "", 1), (Some(0), "b0", 2), (Some(1), "b1", 3)] {
            for _ in 0..times {
                let slot = SeriesSlot::Rule { rule, backend };
                table
                    .attached(slot, || labels(label))
                    .record(200, Duration::ZERO);
            }
        }
        for (label, times) in [("", 1), ("b0", 2), ("b1", 3)] {
            assert_eq!(table.count(&labels(label), 200), times, "{label:?}");
        }
    }

    /// Series of Service ports, rules and backendRefs that are gone are pruned; the agent's
    /// own (no Service) stays. Before, a rule or backendRef gone from a route that stayed kept
    /// its series for as long as the route.
    #[test]
    fn series_of_removed_services_rules_and_backends_are_pruned() {
        let snapshot = one_route(1);
        let table = SeriesTable::default();
        let with_backend = |route: &str, backend: &str| SeriesKey {
            backend: backend.into(),
            ..key("ns/s:80", route)
        };
        let kept = [
            key("ns/s:80", "HTTPRoute ns/r rule #0"),
            with_backend("HTTPRoute ns/r rule #0", "ns/s:80"),
            key("ns/s:80", ""),
            with_backend("", "ns/s:80"),
            key("", ""),
        ];
        let gone = [
            key("ns/gone:80", ""),
            key("ns/s:81", ""),
            key("ns/s:80", "HTTPRoute ns/gone rule #0"),
            key("ns/s:80", "HTTPRoute ns/r rule #1"),
            with_backend("HTTPRoute ns/r rule #0", "ns/gone:80"),
        ];
        for k in kept.iter().chain(&gone) {
            table
                .series(k.clone())
                .record(200, Duration::from_millis(1));
        }
        assert_eq!(table.prune(&snapshot), gone.len());
        for k in &kept {
            assert_eq!(table.count(k, 200), 1, "{k:?}");
        }
    }
}
