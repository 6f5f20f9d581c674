//! Route engine benchmarks: lookup at 10, 1k and 10k Services (a producer and a consumer route
//! each, 5 rules per route, mixed matches); publishing one route change at 10k Services; and the
//! snapshot memory per route (counted by a global allocator, printed once).

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use gamma_engine::index::Index;
use gamma_engine::model::Object;
use gamma_engine::routes::{Decision, Frontend, RequestHead, Snapshot};
use serde_json::{json, Value};
use std::alloc::{GlobalAlloc, Layout, System};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicIsize, Ordering};

/// Counts live heap bytes and blocks, to report snapshot memory per route.
struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);
static BLOCKS: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        BLOCKS.fetch_add(1, Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        BLOCKS.fetch_sub(1, Ordering::Relaxed);
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(0x0A60_0000u32 + i as u32 + 1)
}

fn service(i: usize) -> Vec<Value> {
    service_with(i, 2)
}

/// A Service with `endpoints` ready endpoints.
fn service_with(i: usize, endpoints: usize) -> Vec<Value> {
    let name = format!("svc-{i}");
    let addresses: Vec<Value> = (0..endpoints)
        .map(|e| json!({"addresses": [format!("10.{}.{}.{}", 244 + e, i / 250, i % 250 + 1)]}))
        .collect();
    vec![
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "prod"},
               "spec": {"clusterIP": vip(i).to_string(), "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}),
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"name": format!("{name}-1"), "namespace": "prod", "labels": {"kubernetes.io/service-name": name}},
               "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
               "endpoints": addresses}),
    ]
}

/// Five rules with mixed matches: exact, prefixes, a header, a method with a query parameter.
fn route(i: usize, namespace: &str, version: u32) -> Value {
    let backend = json!([{"name": format!("svc-{i}"), "namespace": "prod", "port": 80}]);
    json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
    "metadata": {"name": format!("r-{i}"), "namespace": namespace, "creationTimestamp": "2026-01-01T00:00:00Z"},
    "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": format!("svc-{i}"), "namespace": "prod", "port": 80}],
             "rules": [
                 {"matches": [{"path": {"type": "Exact", "value": "/healthz"}}], "backendRefs": backend},
                 {"matches": [{"path": {"type": "PathPrefix", "value": format!("/api/v{version}")}, "headers": [{"name": "x-canary", "value": "1"}]}], "backendRefs": backend},
                 {"matches": [{"path": {"type": "PathPrefix", "value": "/api"}, "method": "POST", "queryParams": [{"name": "debug", "value": "1"}]}], "backendRefs": backend},
                 {"matches": [{"path": {"type": "PathPrefix", "value": "/static"}}],
                  "filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [{"name": "x-static", "value": "1"}]}}], "backendRefs": backend},
                 {"backendRefs": backend},
             ]}})
}

fn world(services: usize) -> Index {
    let mut index = Index::new();
    for i in 0..services {
        for doc in service(i).into_iter().chain([
            route(i, "prod", 1),
            route(i, &format!("team-{}", i % 10), 1),
        ]) {
            index.apply(Object::from_value(doc).expect("valid"));
        }
    }
    index.publish();
    index
}

/// The `i`th request's frontend (Services visited in a scattered order, as requests come) and
/// its caller's namespace.
fn target(snapshot: &Snapshot, i: usize, services: usize) -> (&Frontend, &'static str) {
    let addr = SocketAddr::new(IpAddr::V4(vip(i % services)), 80);
    let frontend = snapshot.frontend_at(addr).expect("frontend");
    (frontend, caller(i))
}

/// The `i`th request's caller's namespace: producer and consumer callers in turn.
fn caller(i: usize) -> &'static str {
    if i.is_multiple_of(2) {
        "prod"
    } else {
        "team-3"
    }
}

/// linkerd2-proxy's matcher (`vendor/linkerd-http-route`) over the same routes, in our engine's
/// table shape: the frontend's routes by address, the caller's namespace's consumer routes if
/// it has any (else the producer's), then `find` over them. (linkerd's proxy, one per pod, gets
/// its routes already chosen for its namespace and calls `find` over the target's.)
mod linkerd {
    use super::vip;
    use ahash::AHashMap;
    use linkerd_http_route::http::r#match::{MatchHeader, MatchPath, MatchQueryParam};
    use linkerd_http_route::http::{MatchRequest, Route, Rule};
    use std::net::{IpAddr, SocketAddr};

    pub struct Frontend {
        producer: Vec<Route<u32>>,
        consumers: AHashMap<String, Vec<Route<u32>>>,
    }

    pub type Table = AHashMap<SocketAddr, Frontend>;

    /// The five rules of `super::route(_, _, version)`, each rule's policy its position; a rule
    /// without matches matches `PathPrefix /`, as the API server defaults it.
    fn route(version: u32) -> Route<u32> {
        let prefix = |p: &str| Some(MatchPath::Prefix(p.to_string()));
        let matches = [
            MatchRequest {
                path: Some(MatchPath::Exact("/healthz".to_string())),
                ..MatchRequest::default()
            },
            MatchRequest {
                path: prefix(&format!("/api/v{version}")),
                headers: vec![MatchHeader::Exact(
                    http::HeaderName::from_static("x-canary"),
                    http::HeaderValue::from_static("1"),
                )],
                ..MatchRequest::default()
            },
            MatchRequest {
                path: prefix("/api"),
                method: Some(http::Method::POST),
                query_params: vec![MatchQueryParam::Exact("debug".into(), "1".into())],
                ..MatchRequest::default()
            },
            MatchRequest {
                path: prefix("/static"),
                ..MatchRequest::default()
            },
            MatchRequest {
                path: prefix("/"),
                ..MatchRequest::default()
            },
        ];
        Route {
            hosts: vec![],
            rules: (0..)
                .zip(matches)
                .map(|(policy, m)| Rule {
                    matches: vec![m],
                    policy,
                })
                .collect(),
        }
    }

    /// As `super::world`: each Service a producer route and a consumer route in `team-{i % 10}`.
    pub fn world(services: usize) -> Table {
        (0..services)
            .map(|i| {
                let frontend = Frontend {
                    producer: vec![route(1)],
                    consumers: [(format!("team-{}", i % 10), vec![route(1)])].into(),
                };
                (SocketAddr::new(IpAddr::V4(vip(i)), 80), frontend)
            })
            .collect()
    }

    /// The rule `request` from a caller in `caller`'s namespace matches, as `find` picks it.
    pub fn lookup<B>(
        table: &Table,
        addr: SocketAddr,
        caller: &str,
        request: &http::Request<B>,
    ) -> Option<u32> {
        let frontend = table.get(&addr)?;
        let routes = frontend.consumers.get(caller).unwrap_or(&frontend.producer);
        linkerd_http_route::http::find(routes, request).map(|(_, rule)| *rule)
    }
}

fn lookup(c: &mut Criterion) {
    let mut group = c.benchmark_group("lookup");
    for services in [10usize, 1_000, 10_000] {
        let index = world(services);
        // As the data plane reads it: one lock-free load per request.
        let reader = arc_swap::ArcSwap::new(index.snapshot());
        let method = http::Method::GET;
        let mut headers = http::HeaderMap::new();
        headers.insert("x-canary", "1".parse().unwrap());
        headers.insert("user-agent", "bench".parse().unwrap());
        let paths = ["/api/v1/items", "/static/app.js", "/other", "/healthz"];
        let head = |i: usize| RequestHead {
            method: &method,
            path: paths[i % paths.len()],
            query: None,
            headers: &headers,
            authority: None,
        };
        let mut i = 0usize;
        group.bench_function(format!("{services}_services"), |b| {
            b.iter(|| {
                i = i.wrapping_add(7919);
                let snapshot = reader.load();
                let (frontend, caller) = target(&snapshot, i, services);
                matches!(
                    frontend.lookup(Some(caller), &head(i)),
                    Decision::Rule { .. }
                )
            })
        });
        // The first part of a lookup alone (the frontend and the caller's table, not its
        // entries): tells where the time of a lookup goes as the table outgrows the caches.
        let mut i = 0usize;
        group.bench_function(format!("{services}_services_table_only"), |b| {
            b.iter(|| {
                i = i.wrapping_add(7919);
                let snapshot = reader.load();
                let (frontend, caller) = target(&snapshot, i, services);
                frontend.table_for(Some(caller)).is_some()
            })
        });
        // The anchor, measured beside ours at each size: linkerd2-proxy's `find` over the same
        // routes, requests and order of frontends and callers.
        let table = arc_swap::ArcSwap::from_pointee(linkerd::world(services));
        let requests = paths.map(|path| {
            let mut request = http::Request::get(path).body(()).unwrap();
            *request.headers_mut() = headers.clone();
            request
        });
        // Both pick the same rule for each request, or the comparison measures something else
        // (routes that no longer attach would make ours look fast).
        let snapshot = reader.load();
        for i in (1..=40usize).map(|step| step * 7919) {
            let (frontend, caller) = target(&snapshot, i, services);
            let ours = match frontend.lookup(Some(caller), &head(i)) {
                Decision::Rule { rule, .. } => u32::try_from(rule.index).ok(),
                _ => None,
            };
            let addr = SocketAddr::new(IpAddr::V4(vip(i % services)), 80);
            let theirs =
                linkerd::lookup(&table.load(), addr, caller, &requests[i % requests.len()]);
            assert!(
                ours.is_some() && ours == theirs,
                "request {i}: our rule {ours:?}, linkerd's {theirs:?}"
            );
        }
        let mut i = 0usize;
        group.bench_function(format!("{services}_services_linkerd_find"), |b| {
            b.iter(|| {
                i = i.wrapping_add(7919);
                let table = table.load();
                let addr = SocketAddr::new(IpAddr::V4(vip(i % services)), 80);
                linkerd::lookup(&table, addr, caller(i), &requests[i % requests.len()]).is_some()
            })
        });
    }
    group.finish();
}

fn publish(c: &mut Criterion) {
    let mut index = world(10_000);
    let mut version = 1u32;
    c.bench_function("publish_one_route_change_10k_services", |b| {
        b.iter_batched(
            || {
                version += 1;
                Object::from_value(route(4_242, "prod", version)).unwrap()
            },
            |changed| {
                index.apply(changed);
                assert!(index.publish());
            },
            BatchSize::SmallInput,
        )
    });
}

/// Live heap of the index after building `services` Services with and without their routes;
/// the difference over the number of routes is what a route costs: the objects the index keeps
/// (before publishing) and the compiled tables (what publishing adds). Heap blocks are counted
/// too: the allocator rounds each up and keeps a header beside it, so resident memory pays for
/// many small ones more than their bytes say.
fn memory_per_route() {
    let services = 2_000;
    let measure = |with_routes: bool| {
        let before = LIVE.load(Ordering::Relaxed);
        let blocks_before = BLOCKS.load(Ordering::Relaxed);
        let mut index = Index::new();
        for i in 0..services {
            for doc in service(i) {
                index.apply(Object::from_value(doc).unwrap());
            }
            if with_routes {
                for doc in [
                    route(i, "prod", 1),
                    route(i, &format!("team-{}", i % 10), 1),
                ] {
                    index.apply(Object::from_value(doc).unwrap());
                }
            }
        }
        let objects = LIVE.load(Ordering::Relaxed) - before;
        index.publish();
        let all = LIVE.load(Ordering::Relaxed) - before;
        let blocks = BLOCKS.load(Ordering::Relaxed) - blocks_before;
        drop(index);
        (objects, all - objects, blocks)
    };
    let (objects_without, compiled_without, blocks_without) = measure(false);
    let (objects_with, compiled_with, blocks_with) = measure(true);
    let routes = (2 * services) as f64;
    let objects = (objects_with - objects_without) as f64 / routes;
    let compiled = (compiled_with - compiled_without) as f64 / routes;
    let blocks = (blocks_with - blocks_without) as f64 / routes;
    eprintln!(
        "memory: {:.0} bytes per route (5 rules): {objects:.0} objects kept, {compiled:.0} compiled, in {blocks:.0} heap blocks; {services} Services",
        objects + compiled
    );
}

/// Adds 10k Services with 5 endpoints each (50k endpoints) to `index`, or (`routes`) their
/// producer and consumer routes (20k); then publishes.
fn at_scale(index: &mut Index, routes: bool) {
    for i in 0..10_000 {
        let docs = if routes {
            vec![
                route(i, "prod", 1),
                route(i, &format!("team-{}", i % 10), 1),
            ]
        } else {
            service_with(i, 5)
        };
        for doc in docs {
            index.apply(Object::from_value(doc).unwrap());
        }
    }
    index.publish();
}

/// Resident memory the process gains holding the index at scale: the Services and endpoints,
/// then with their routes too (the same index), and the live heap of each part.
fn resident_at_scale() {
    let resident = || {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
        let pages: u64 = statm
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        pages * 4096
    };
    let mib = |bytes: u64| bytes as f64 / (1 << 20) as f64;
    let heap_mib = |bytes: isize| bytes as f64 / (1 << 20) as f64;
    let (before, live_before) = (resident(), LIVE.load(Ordering::Relaxed));
    let mut index = Index::new();
    at_scale(&mut index, false);
    let (services, services_heap) = (
        resident().saturating_sub(before),
        LIVE.load(Ordering::Relaxed) - live_before,
    );
    at_scale(&mut index, true);
    let (all, all_heap) = (
        resident().saturating_sub(before),
        LIVE.load(Ordering::Relaxed) - live_before,
    );
    drop(index);
    eprintln!(
        "resident: +{:.1} MiB holding 10k Services and 50k endpoints (published; {:.1} MiB of heap), +{:.1} MiB with their 20k routes too ({:.1} MiB of heap)",
        mib(services),
        heap_mib(services_heap),
        mib(all),
        heap_mib(all_heap)
    );
}

fn memory(_: &mut Criterion) {
    // First: memory freed by an earlier measurement would be reused without growing the RSS.
    resident_at_scale();
    memory_per_route();
}

criterion_group!(benches, memory, lookup, publish);
criterion_main!(benches);
