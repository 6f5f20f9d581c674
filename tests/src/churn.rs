//! The churn soak: steady load through `proxy-agent --kube` (the real binary against the
//! in-process fake API server, on 127.0.0.1) while routes, EndpointSlices and Pods change many
//! times a second and the API server goes away and comes back. Run by `cargo xtask soak churn`
//! (`gamma-soak churn`) and, shortened, by `tests/tests/churn.rs`.
//!
//! The world (namespace `shop`): the Service `front` (the agent's listener) is split by the
//! HTTPRoute `split` between `v1` and `v2`, each with four echo pods. Every change keeps what the
//! load needs valid (`split` has a backend with a positive weight; both Services keep a ready
//! endpoint, and every endpoint ever listed keeps running), so no request may fail: a failure is
//! the agent's. The changes, in turn:
//! - `split`: new weights (one may be 0) and a new `x-churn-gen` header value, so each answer
//!   says which generation of the route served it;
//! - `v1-a`, `v2-a`: a new set of endpoints, some not ready;
//! - `v2-b`: a second slice of `v2`, created and deleted;
//! - `extra`: another route on `front` (an Exact path the load never asks for), created and deleted;
//! - `broken`: a route on `other` that alternates between valid and an unresolved backend;
//! - Pods of this node, created and deleted (the callers' table).
//!
//! During an outage the changes go on (the API server keeps them); the agent serves its last table,
//! says it is stale, and must catch up once the server is back.

use crate::fake_apiserver::FakeApiServer;
use crate::kube_world::{pod, service, slice_named, KubeAgent, NS};
use crate::load::{self, LoadReport, LoadSpec};
use crate::loopback::{echo_backend_at, http_get, EchoBackend};
use crate::probe::rss_kib;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How hard and how long.
#[derive(Clone, Debug)]
pub struct ChurnConfig {
    pub duration: Duration,
    /// Object changes per second, spread evenly.
    pub changes_per_second: u32,
    /// API server outages, spread evenly over the run.
    pub outages: usize,
    /// How long each outage lasts.
    pub outage: Duration,
    pub keep_alive: usize,
    pub new_connection: usize,
    pub http2: usize,
}

impl Default for ChurnConfig {
    fn default() -> Self {
        ChurnConfig {
            duration: Duration::from_secs(120),
            changes_per_second: 20,
            outages: 4,
            outage: Duration::from_secs(5),
            keep_alive: 4,
            new_connection: 2,
            http2: 1,
        }
    }
}

/// One outage as the soak saw it.
#[derive(Clone, Debug)]
pub struct Outage {
    /// When it began, from the start of the load.
    pub at: Duration,
    pub lasted: Duration,
    /// `/ready` said the table was stale during the outage.
    pub stale_reported: bool,
    /// From the server's return to the agent serving the route generation made last before it.
    pub caught_up: Option<Duration>,
}

/// What the soak saw.
#[derive(Clone, Debug)]
pub struct ChurnReport {
    pub load: LoadReport,
    /// Changes made, by object: route `split`, slices, route `extra` and `broken`, Pods.
    pub changes: ChangeCounts,
    /// Snapshots the agent published during the run.
    pub published: u64,
    pub outages: Vec<Outage>,
    /// The agent's resident memory, sampled every second: (seconds since the start, KiB).
    pub rss: Vec<(f64, u64)>,
    /// From the last change to the agent serving exactly the final state.
    pub converged: Option<Duration>,
    pub elapsed: Duration,
}

#[derive(Clone, Debug, Default)]
pub struct ChangeCounts {
    pub split: u64,
    pub slices: u64,
    pub routes: u64,
    pub pods: u64,
}

impl ChangeCounts {
    pub fn total(&self) -> u64 {
        self.split + self.slices + self.routes + self.pods
    }
}

impl ChurnReport {
    /// Growth of resident memory from the end of the first quarter of the run (allocator and
    /// pools warmed up) to the highest sample of the last quarter, in KiB; `None` with too few
    /// samples.
    pub fn rss_growth_kib(&self) -> Option<i64> {
        let n = self.rss.len();
        if n < 4 {
            return None;
        }
        let warm = self.rss[n / 4].1 as i64;
        let late = self.rss[n - n / 4..].iter().map(|s| s.1).max()? as i64;
        Some(late - warm)
    }

    /// Nothing failed, every outage was seen and caught up with, the end state was reached.
    pub fn problems(&self, config: &ChurnConfig) -> Vec<String> {
        let mut problems = Vec::new();
        if self.load.failed > 0 || self.load.sent == 0 {
            problems.push(format!(
                "{} of {} requests failed: {:?}",
                self.load.failed, self.load.sent, self.load.errors
            ));
        }
        if self.load.unmeshed > 0 {
            problems.push(format!(
                "{} answers without the route's header",
                self.load.unmeshed
            ));
        }
        if self.outages.len() != config.outages {
            problems.push(format!(
                "{} outages of {}",
                self.outages.len(),
                config.outages
            ));
        }
        for (i, o) in self.outages.iter().enumerate() {
            if !o.stale_reported {
                problems.push(format!("outage {}: /ready never said stale", i + 1));
            }
            if o.caught_up.is_none() {
                problems.push(format!("outage {}: the agent never caught up", i + 1));
            }
        }
        if self.converged.is_none() {
            problems.push("the agent never reached the final state".into());
        }
        problems
    }
}

impl std::fmt::Display for ChurnReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let l = &self.load;
        let secs = self.elapsed.as_secs_f64();
        let c = &self.changes;
        writeln!(
            f,
            "requests sent: {}   ok: {}   failed: {}   reset connections: {}   retried on a new connection: {}",
            l.sent, l.ok, l.failed, l.resets, l.retried
        )?;
        writeln!(
            f,
            "changes: {} in {secs:.1}s ({:.1}/s: split route {}, EndpointSlices {}, other routes {}, Pods {}); snapshots published: {} ({:.1}/s)",
            c.total(),
            c.total() as f64 / secs,
            c.split,
            c.slices,
            c.routes,
            c.pods,
            self.published,
            self.published as f64 / secs
        )?;
        for (i, o) in self.outages.iter().enumerate() {
            writeln!(
                f,
                "  outage {} at {:.1}s for {:.1}s: stale reported: {}; caught up {}",
                i + 1,
                o.at.as_secs_f64(),
                o.lasted.as_secs_f64(),
                if o.stale_reported { "yes" } else { "NO" },
                match o.caught_up {
                    Some(d) =>
                        format!("{:.0} ms after the server came back", d.as_secs_f64() * 1e3),
                    None => "NEVER".into(),
                }
            )?;
        }
        match self.converged {
            Some(d) => writeln!(
                f,
                "final state served {:.0} ms after the last change",
                d.as_secs_f64() * 1e3
            )?,
            None => writeln!(f, "final state NEVER served")?,
        }
        // At most about 20 points, the last one always.
        let step = self.rss.len().div_ceil(20).max(1);
        let series: Vec<String> = self
            .rss
            .iter()
            .enumerate()
            .filter(|(i, _)| i % step == 0 || *i + 1 == self.rss.len())
            .map(|(_, (t, kib))| format!("{t:.0}s {:.1}", *kib as f64 / 1024.0))
            .collect();
        writeln!(f, "agent RSS (MiB) over time: {}", series.join(", "))?;
        if let Some(growth) = self.rss_growth_kib() {
            writeln!(
                f,
                "RSS growth from the first quarter to the last: {growth} KiB"
            )?;
        }
        for e in &l.errors {
            writeln!(f, "  error: {e}")?;
        }
        Ok(())
    }
}

/// The pods behind each version: same port, addresses 127.0.0.{base+i}.
const PODS_PER_VERSION: u8 = 4;

struct Version {
    name: &'static str,
    port: u16,
    addresses: Vec<String>,
    _backends: Vec<EchoBackend>,
}

impl Version {
    async fn start(name: &'static str, first_octet: u8) -> Version {
        let mut backends = Vec::new();
        let mut port = 0;
        for i in 0..PODS_PER_VERSION {
            let ip = std::net::Ipv4Addr::new(127, 0, 0, first_octet + i);
            let backend = echo_backend_at((ip, port).into(), &format!("{name}-{i}")).await;
            port = backend.addr.port();
            backends.push(backend);
        }
        Version {
            name,
            port,
            addresses: backends.iter().map(|b| b.addr.ip().to_string()).collect(),
            _backends: backends,
        }
    }

    /// Endpoint `(address, ready)` for the pods in `members` (a bit set); the first member is
    /// always ready, so the Service always has a ready endpoint.
    fn endpoints(&self, members: u8, ready: u8) -> Vec<(String, bool)> {
        let first = members.trailing_zeros();
        (0..PODS_PER_VERSION as u32)
            .filter(|i| members & (1 << i) != 0)
            .map(|i| {
                (
                    self.addresses[i as usize].clone(),
                    i == first || ready & (1 << i) != 0,
                )
            })
            .collect()
    }
}

/// A small deterministic generator: the same run every time for the same seed.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The objects the churn changes, as last written: what the agent must end up serving.
struct World {
    api: Arc<FakeApiServer>,
    v1: Version,
    v2: Version,
    random: XorShift,
    /// The generation of `split` last written (the value of its `x-churn-gen` header).
    generation: Arc<AtomicU64>,
    v1_ready: BTreeSet<String>,
    v2_ready: BTreeSet<String>,
    v2_b: bool,
    extra: bool,
    broken: bool,
    pods: u64,
    counts: ChangeCounts,
}

fn split_route(generation: u64, v1_weight: u64, v2_weight: u64) -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "split", "namespace": NS},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "front", "port": 80}],
            "rules": [{
                "filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {
                    "set": [{"name": "x-mesh", "value": "churn"},
                            {"name": "x-churn-gen", "value": generation.to_string()}]}}],
                "backendRefs": [{"name": "v1", "port": 80, "weight": v1_weight},
                                {"name": "v2", "port": 80, "weight": v2_weight}],
            }],
        },
    })
}

fn simple_route(name: &str, parent: &str, path: &str, backend: &str) -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": parent, "port": 80}],
            "rules": [{"matches": [{"path": {"type": "Exact", "value": path}}],
                       "backendRefs": [{"name": backend, "port": 80}]}],
        },
    })
}

impl World {
    async fn start(api: Arc<FakeApiServer>) -> World {
        let v1 = Version::start("v1", 11).await;
        let v2 = Version::start("v2", 21).await;
        api.apply(service("front", "10.96.0.10", 8080, None));
        api.apply(service("other", "10.96.0.13", 8080, None));
        for version in [&v1, &v2] {
            let ip = if version.name == "v1" {
                "10.96.0.11"
            } else {
                "10.96.0.12"
            };
            api.apply(service(version.name, ip, version.port, None));
        }
        let mut world = World {
            api,
            v1,
            v2,
            random: XorShift(0x9e37_79b9_7f4a_7c15),
            generation: Arc::new(AtomicU64::new(0)),
            v1_ready: BTreeSet::new(),
            v2_ready: BTreeSet::new(),
            v2_b: false,
            extra: false,
            broken: false,
            pods: 0,
            counts: ChangeCounts::default(),
        };
        world.set_slice(true, 0b1111, 0b1111);
        world.set_slice(false, 0b1111, 0b1111);
        world.write_split(50, 50);
        world.counts = ChangeCounts::default();
        world
    }

    fn write_split(&mut self, v1_weight: u64, v2_weight: u64) {
        let generation = self.generation.load(Ordering::Relaxed) + 1;
        self.api
            .apply(split_route(generation, v1_weight, v2_weight));
        self.generation.store(generation, Ordering::Relaxed);
        self.counts.split += 1;
    }

    /// Rewrites `v1-a` or `v2-a` with the pods in `members`, ready per `ready`.
    fn set_slice(&mut self, is_v1: bool, members: u8, ready: u8) {
        let version = if is_v1 { &self.v1 } else { &self.v2 };
        let endpoints = version.endpoints(members, ready);
        let slice = slice_named(
            &format!("{}-a", version.name),
            version.name,
            version.port,
            &endpoints,
        );
        self.api.apply(slice);
        let ready: BTreeSet<String> = endpoints
            .iter()
            .filter(|(_, ready)| *ready)
            .map(|(address, _)| format!("{address}:{}", version.port))
            .collect();
        if is_v1 {
            self.v1_ready = ready;
        } else {
            self.v2_ready = ready;
        }
        self.counts.slices += 1;
    }

    /// One change, the `n`th of the run.
    fn change(&mut self, n: u64) {
        match n % 8 {
            0 | 4 => {
                // Weights 0..=4 each, never both 0.
                let v1 = self.random.below(5);
                let v2 = if v1 == 0 {
                    1 + self.random.below(4)
                } else {
                    self.random.below(5)
                };
                self.write_split(v1, v2);
            }
            1 | 5 => {
                let is_v1 = n % 8 == 1;
                let members = 1 + self.random.below(15) as u8;
                let ready = self.random.below(16) as u8;
                self.set_slice(is_v1, members, ready);
            }
            2 => {
                self.v2_b = !self.v2_b;
                if self.v2_b {
                    let endpoints = self.v2.endpoints(0b1010, 0b1010);
                    self.api
                        .apply(slice_named("v2-b", "v2", self.v2.port, &endpoints));
                } else {
                    self.api.delete("endpointslices", NS, "v2-b");
                }
                self.counts.slices += 1;
            }
            3 => {
                self.extra = !self.extra;
                if self.extra {
                    self.api
                        .apply(simple_route("extra", "front", "/extra", "v1"));
                } else {
                    self.api.delete("httproutes", NS, "extra");
                }
                self.counts.routes += 1;
            }
            6 => {
                self.broken = !self.broken;
                let backend = if self.broken { "missing" } else { "v2" };
                self.api
                    .apply(simple_route("broken", "other", "/", backend));
                self.counts.routes += 1;
            }
            _ => {
                // A Pod of this node comes, the one before it goes.
                self.pods += 1;
                let name = |i: u64| format!("caller-{i}");
                let ip = format!("10.244.{}.{}", (self.pods / 250) % 250, 1 + self.pods % 250);
                self.api.apply(pod(&name(self.pods), "node-a", &ip));
                if self.pods > 1 {
                    self.api.delete("pods", NS, &name(self.pods - 1));
                }
                self.counts.pods += 1;
            }
        }
    }

    /// The final state, as the agent's table must show it: (v1, v2 ready endpoints with the
    /// `v2-b` slice's, the route generation).
    fn expected(&self) -> (BTreeSet<String>, BTreeSet<String>, u64) {
        let mut v2 = self.v2_ready.clone();
        if self.v2_b {
            for (address, _) in self.v2.endpoints(0b1010, 0b1010) {
                v2.insert(format!("{address}:{}", self.v2.port));
            }
        }
        (
            self.v1_ready.clone(),
            v2,
            self.generation.load(Ordering::Relaxed),
        )
    }
}

/// The `split` generation that served a request on the agent's listener.
fn served_generation(listen: SocketAddr) -> Option<u64> {
    let body: Value = serde_json::from_str(&http_get(listen, "/churn").ok()?).ok()?;
    body["headers"]
        .as_array()?
        .iter()
        .find(|h| h[0] == "x-churn-gen")?[1]
        .as_str()?
        .parse()
        .ok()
}

fn ready_endpoints(dump: &Value, service: &str) -> BTreeSet<String> {
    crate::kube_world::endpoints_of(dump, service)
        .into_iter()
        .collect()
}

/// Polls `check` every 20 ms until it holds or `limit` passes; how long it took.
async fn wait_for(limit: Duration, mut check: impl FnMut() -> bool) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if tokio::task::block_in_place(&mut check) {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// How long the agent may take to catch up after an outage or the last change: kube-rs's first
/// retry after an error comes within about a second, then a relist of every kind.
const CATCH_UP: Duration = Duration::from_secs(15);

/// Runs the soak on the current multi-threaded tokio runtime. Everything it starts is stopped
/// when it returns.
pub async fn run(config: &ChurnConfig) -> Result<ChurnReport> {
    if config.changes_per_second == 0 {
        bail!("--changes-per-second must be at least 1");
    }
    let api = Arc::new(FakeApiServer::start().await);
    let mut world = World::start(api.clone()).await;
    world.api.apply(pod("caller-0", "node-a", "10.244.0.1"));
    let agent = tokio::task::block_in_place(|| KubeAgent::start(&api, "node-a", "churn"));
    let (admin, listen, pid) = (agent.admin, agent.listen, agent.pid());
    let published_before =
        tokio::task::block_in_place(|| agent.metric("gamma_snapshot_version")).unwrap_or(0.0);

    let started = Instant::now();
    let load = tokio::spawn(load::run(LoadSpec {
        target: listen,
        host: format!("front.{NS}"),
        path: "/churn".into(),
        duration_ms: config.duration.as_millis() as u64,
        keep_alive: config.keep_alive,
        idle_keep_alive: 0,
        idle_pause_ms: 0,
        new_connection: config.new_connection,
        http2: config.http2,
        long_lived: 0,
        expect_header: Some(("x-mesh".into(), "churn".into())),
    }));
    let sampler = tokio::spawn(async move {
        let mut samples = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            match rss_kib(pid) {
                Ok(kib) => samples.push((started.elapsed().as_secs_f64(), kib)),
                Err(_) => return samples,
            }
        }
    });

    // The outages, on their own task: the churn goes on meanwhile.
    let outages = {
        let api = api.clone();
        let generation = world.generation.clone();
        let config = config.clone();
        tokio::spawn(async move {
            let mut outages = Vec::new();
            let spacing = config.duration / (config.outages as u32 + 1);
            for i in 1..=config.outages {
                tokio::time::sleep_until((started + spacing * i as u32).into()).await;
                let at = started.elapsed();
                api.go_down().await;
                let stale_seen = wait_for(config.outage, || {
                    http_get(admin, "/ready").is_ok_and(|body| body.contains("stale"))
                })
                .await
                .is_some();
                tokio::time::sleep_until((started + at + config.outage).into()).await;
                api.come_back().await;
                let lasted = started.elapsed() - at;
                let wanted = generation.load(Ordering::Relaxed);
                let caught_up = wait_for(CATCH_UP, || {
                    served_generation(listen).is_some_and(|g| g >= wanted)
                })
                .await;
                outages.push(Outage {
                    at,
                    lasted,
                    stale_reported: stale_seen,
                    caught_up,
                });
            }
            outages
        })
    };

    let interval = Duration::from_secs(1) / config.changes_per_second;
    let mut n = 0;
    while started.elapsed() < config.duration {
        world.change(n);
        n += 1;
        tokio::time::sleep_until((started + interval * n as u32).into()).await;
    }
    let last_change = Instant::now();
    let load = load.await.context("the load task")?;
    let outages = outages.await.context("the outage task")?;
    let (v1, v2, generation) = world.expected();
    let converged = wait_for(CATCH_UP, || {
        let Ok(dump) = http_get(admin, "/config_dump") else {
            return false;
        };
        let Ok(dump) = serde_json::from_str::<Value>(&dump) else {
            return false;
        };
        ready_endpoints(&dump, "v1") == v1
            && ready_endpoints(&dump, "v2") == v2
            && served_generation(listen) == Some(generation)
    })
    .await
    .map(|_| last_change.elapsed());
    let published = tokio::task::block_in_place(|| agent.metric("gamma_snapshot_version"))
        .unwrap_or(0.0)
        - published_before;
    let elapsed = started.elapsed();
    drop(agent);
    let rss = sampler.await.context("the memory sampler")?;
    Ok(ChurnReport {
        load,
        changes: world.counts.clone(),
        published: published as u64,
        outages,
        rss,
        converged,
        elapsed,
    })
}
