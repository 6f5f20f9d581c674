//! Prometheus metrics: request counts and durations by service, route, backend and status;
//! connections; upstream endpoints in flight. Text exposition format, written by hand.

use ahash::AHashMap;
use gamma_engine::{ObjectKey, Snapshot};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// Upper bounds of the duration buckets, in seconds.
const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Empty strings stand for "none" (rendered `-`): no allocation for what a request never reached.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestLabels {
    pub service: String,
    pub route: String,
    pub backend: String,
    pub status: u16,
}

impl RequestLabels {
    /// Whether the Service port and the route these labels name are still in `snapshot` (a
    /// label that names none counts as served).
    pub fn still_served(&self, snapshot: &Snapshot) -> bool {
        let service = self.service.is_empty()
            || self
                .service
                .rsplit_once(':')
                .and_then(|(service, port)| Some((service.split_once('/')?, port.parse().ok()?)))
                .is_some_and(|((namespace, name), port)| {
                    snapshot
                        .frontend_of(&ObjectKey::new(namespace, name), port)
                        .is_some()
                });
        let route = self.route.is_empty()
            || self
                .route
                .split_once(" rule ")
                .is_some_and(|(route, _)| snapshot.statuses.contains_key(route));
        service && route
    }
}

/// Why a request was answered locally, as a metric label: a fixed set, whatever the input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    Redirect,
    CorsPreflight,
    RuleNotServable,
    UnknownFrontend,
    NoMatchingRule,
    NoReadyEndpoint,
    ConnectFailed,
    BackendTimeout,
    BackendFailed,
    RouteTimeout,
    HeadTooLarge,
    BadTarget,
}

impl Reason {
    pub const ALL: [Reason; 12] = [
        Reason::Redirect,
        Reason::CorsPreflight,
        Reason::RuleNotServable,
        Reason::UnknownFrontend,
        Reason::NoMatchingRule,
        Reason::NoReadyEndpoint,
        Reason::ConnectFailed,
        Reason::BackendTimeout,
        Reason::BackendFailed,
        Reason::RouteTimeout,
        Reason::HeadTooLarge,
        Reason::BadTarget,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Reason::Redirect => "redirect",
            Reason::CorsPreflight => "cors_preflight",
            Reason::RuleNotServable => "rule_not_servable",
            Reason::UnknownFrontend => "unknown_frontend",
            Reason::NoMatchingRule => "no_matching_rule",
            Reason::NoReadyEndpoint => "no_ready_endpoint",
            Reason::ConnectFailed => "connect_failed",
            Reason::BackendTimeout => "backend_timeout",
            Reason::BackendFailed => "backend_failed",
            Reason::RouteTimeout => "route_timeout",
            Reason::HeadTooLarge => "head_too_large",
            Reason::BadTarget => "bad_target",
        }
    }
}

#[derive(Default)]
struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }
}

/// Reads the kernel programs' counters (`None`: unreadable now).
pub type KernelCountersReader = Box<dyn Fn() -> Option<[u64; 4]> + Send + Sync>;

#[derive(Default)]
pub struct Metrics {
    requests: RwLock<AHashMap<RequestLabels, Arc<Histogram>>>,
    pub connections_accepted: AtomicU64,
    pub connections_open: AtomicI64,
    /// Connections closed at once because `--max-connections` were open.
    pub connections_refused_at_cap: AtomicU64,
    /// Callers not bound to an endpoint by session affinity because the table was full.
    pub affinity_table_full: Arc<AtomicU64>,
    /// The kernel programs' counters (steered, agent gone, record failures, getpeername
    /// rewrites), read at each scrape; set once the redirect runs.
    pub kernel_counters: std::sync::OnceLock<KernelCountersReader>,
    /// The runtimes whose live tasks `/metrics` counts (main and workers).
    pub runtimes: std::sync::Mutex<Vec<tokio::runtime::Handle>>,
    pub opaque_connections: AtomicU64,
    /// Connections to undeclared ports that sent nothing telling within the sniffing timeout.
    pub opaque_after_sniff_timeout: AtomicU64,
    pub mirrors_sent: AtomicU64,
    pub mirrors_dropped: AtomicU64,
    pub mirrors_timed_out: AtomicU64,
    /// Mirrors not sent because the request body was over the buffering limit (or never ended).
    pub mirrors_skipped_body: AtomicU64,
    /// Retries not made because the request body was over the buffering limit.
    pub retries_skipped_body: AtomicU64,
    /// Requests the agent answered itself, by `Reason` (indexed by its discriminant).
    local_answers: [AtomicU64; Reason::ALL.len()],
    pub snapshot_version: AtomicU64,
    /// Unix seconds of the last successful source sync (0: never).
    pub last_sync_unix: AtomicU64,
    /// Unix seconds since which the sources are stale: the last good table is served (0: fresh).
    pub source_stale_since_unix: AtomicU64,
    /// How this agent took over from the previous one (all 0: it started without one).
    pub takeover: TakeoverTimes,
    /// Why the kernel redirect is off: the features the kernel lacks, each with the Linux release
    /// that brings it (unset: not refused).
    pub redirect_missing_kernel_features: std::sync::OnceLock<Vec<(&'static str, &'static str)>>,
}

/// Phases of the takeover an agent started with, in microseconds (`crate::handover`).
#[derive(Default)]
pub struct TakeoverTimes {
    /// From connecting to the running agent to holding its sockets.
    pub offer_micros: AtomicU64,
    /// From Stop to Stopped: the old agent's last accepts.
    pub stop_micros: AtomicU64,
    /// From this process's start to the old agent having stopped accepting.
    pub total_micros: AtomicU64,
    /// Opaque and upgraded connections the old agent handed over (pumped on here).
    pub connections: AtomicU64,
}

impl Metrics {
    pub fn record(&self, labels: RequestLabels, duration: Duration) {
        if let Some(h) = self.requests.read().expect("not poisoned").get(&labels) {
            h.observe(duration);
            return;
        }
        self.requests
            .write()
            .expect("not poisoned")
            .entry(labels)
            .or_default()
            .observe(duration);
    }

    pub fn local_answer(&self, reason: Reason) {
        self.local_answers[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Keeps the request series `keep` says yes to; returns how many were dropped.
    pub fn retain_requests(&self, mut keep: impl FnMut(&RequestLabels) -> bool) -> usize {
        let mut requests = self.requests.write().expect("not poisoned");
        let before = requests.len();
        requests.retain(|labels, _| keep(labels));
        before - requests.len()
    }

    /// Requests seen with these labels (tests and `/explain` read it).
    pub fn count(&self, labels: &RequestLabels) -> u64 {
        self.requests
            .read()
            .expect("not poisoned")
            .get(labels)
            .map_or(0, |h| h.count.load(Ordering::Relaxed))
    }

    pub fn render(&self, upstream_in_flight: usize) -> String {
        let mut out = String::new();
        let requests = self.requests.read().expect("not poisoned");
        let mut series: Vec<(&RequestLabels, &Arc<Histogram>)> = requests.iter().collect();
        series.sort_by(|a, b| a.0.cmp(b.0));
        out.push_str("# HELP gamma_requests_total Requests handled, by service, route, backend and status.\n# TYPE gamma_requests_total counter\n");
        for (l, h) in &series {
            let _ = writeln!(
                out,
                "gamma_requests_total{{{}}} {}",
                labels(l),
                h.count.load(Ordering::Relaxed)
            );
        }
        out.push_str("# HELP gamma_request_duration_seconds Time from request head to response head.\n# TYPE gamma_request_duration_seconds histogram\n");
        for (l, h) in &series {
            let base = labels(l);
            let mut cumulative = 0;
            for (bound, bucket) in BUCKETS.iter().zip(&h.buckets) {
                cumulative += bucket.load(Ordering::Relaxed);
                let _ = writeln!(
                    out,
                    "gamma_request_duration_seconds_bucket{{{base},le=\"{bound}\"}} {cumulative}"
                );
            }
            let count = h.count.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "gamma_request_duration_seconds_bucket{{{base},le=\"+Inf\"}} {count}"
            );
            let _ = writeln!(
                out,
                "gamma_request_duration_seconds_sum{{{base}}} {}",
                h.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
            );
            let _ = writeln!(
                out,
                "gamma_request_duration_seconds_count{{{base}}} {count}"
            );
        }
        if let Some(counted) = self.kernel_counters.get().and_then(|read| read()) {
            let helps = [
                ("gamma_kernel_connects_steered_total", "connect() calls to a mesh Service the kernel programs sent to the agent."),
                ("gamma_kernel_connects_agent_gone_total", "connect() calls to a mesh Service left to ordinary Service routing because the agent's listener was gone (fail open)."),
                ("gamma_kernel_record_failures_total", "Redirect records the kernel programs could not store (the connection was left alone, or the agent lost its original destination)."),
                ("gamma_kernel_getpeername_rewrites_total", "getpeername() calls on redirected sockets answered with the Service address."),
            ];
            for ((name, help), value) in helps.iter().zip(counted) {
                let _ = writeln!(
                    out,
                    "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
                );
            }
        }
        out.push_str("# HELP gamma_local_answers_total Requests the agent answered itself instead of relaying a backend's answer, by reason.\n# TYPE gamma_local_answers_total counter\n");
        for (reason, count) in Reason::ALL.iter().zip(&self.local_answers) {
            let _ = writeln!(
                out,
                "gamma_local_answers_total{{reason=\"{}\"}} {}",
                reason.label(),
                count.load(Ordering::Relaxed)
            );
        }
        for (name, help, kind, value) in [
            (
                "gamma_connections_accepted_total",
                "Downstream connections accepted.",
                "counter",
                self.connections_accepted.load(Ordering::Relaxed) as i64,
            ),
            (
                "gamma_connections_open",
                "Downstream connections open.",
                "gauge",
                self.connections_open.load(Ordering::Relaxed),
            ),
            (
                "gamma_connections_refused_at_cap_total",
                "Downstream connections closed on accept because --max-connections were open.",
                "counter",
                self.connections_refused_at_cap.load(Ordering::Relaxed) as i64,
            ),
            (
                "gamma_session_affinity_table_full_total",
                "Callers of ClientIP-affinity Services not bound to an endpoint because the table held its maximum of live bindings.",
                "counter",
                self.affinity_table_full.load(Ordering::Relaxed) as i64,
            ),
            (
                "gamma_runtime_tasks_alive",
                "Tasks alive on the agent's runtimes (main and data-plane workers): connections, pumps, pooled upstream connections, timers' tasks. Returns to its idle level once connections are gone.",
                "gauge",
                self.runtimes
                    .lock()
                    .expect("not poisoned")
                    .iter()
                    .map(|r| r.metrics().num_alive_tasks() as i64)
                    .sum(),
            ),
            (
                "gamma_opaque_connections_total",
                "Connections passed through as opaque TCP.",
                "counter",
                self.opaque_connections.load(Ordering::Relaxed) as i64,
            ),
            (
                "gamma_opaque_after_sniff_timeout_total",
                "Connections to ports that do not declare their protocol passed through as opaque TCP because the client sent nothing telling within the sniffing timeout.",
                "counter",
                self.opaque_after_sniff_timeout.load(Ordering::Relaxed) as i64,
            ),
            (
                "gamma_mirrors_sent_total",
                "Mirrored requests sent.",
                "counter",
                self.mirrors_sent.load(Ordering::Relaxed) as i64,
            ),
            (
                "gamma_mirrors_dropped_total",
                "Mirrored requests dropped (concurrency bound reached).",
                "counter",
                self.mirrors_dropped.load(Ordering::Relaxed) as i64,
            ),
            (
                "gamma_mirrors_timed_out_total",
                "Mirrored requests abandoned after the mirror timeout (their slot freed).",
                "counter",
                self.mirrors_timed_out.load(Ordering::Relaxed) as i64,
            ),
            (
                "gamma_mirrors_skipped_body_total",
                "Mirrors not sent because the request body was larger than --max-buffered-body-bytes or did not end within the mirror timeout.",
                "counter",
                self.mirrors_skipped_body.load(Ordering::Relaxed) as i64,
            ),
            (
                "gamma_retries_skipped_body_total",
                "Retries not made because the request body was larger than --max-buffered-body-bytes.",
                "counter",
                self.retries_skipped_body.load(Ordering::Relaxed) as i64,
            ),
            (
                "gamma_upstream_requests_in_flight",
                "Requests in flight to upstream endpoints.",
                "gauge",
                upstream_in_flight as i64,
            ),
            (
                "gamma_snapshot_version",
                "Version of the route table in use.",
                "gauge",
                self.snapshot_version.load(Ordering::Relaxed) as i64,
            ),
            (
                "gamma_last_sync_timestamp_seconds",
                "When the sources last synced (Unix time; 0: never).",
                "gauge",
                self.last_sync_unix.load(Ordering::Relaxed) as i64,
            ),
            (
                "gamma_source_stale_since_timestamp_seconds",
                "Since when the sources are stale and the last good table is served (Unix time; 0: fresh).",
                "gauge",
                self.source_stale_since_unix.load(Ordering::Relaxed) as i64,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
        out.push_str("# HELP gamma_takeover_duration_seconds The takeover of the previous agent this one started with (0: none): offer (connect to sockets received), stop (Stop to Stopped), total (process start to the old agent stopped).\n# TYPE gamma_takeover_duration_seconds gauge\n");
        let t = &self.takeover;
        for (phase, micros) in [
            ("offer", &t.offer_micros),
            ("stop", &t.stop_micros),
            ("total", &t.total_micros),
        ] {
            let _ = writeln!(
                out,
                "gamma_takeover_duration_seconds{{phase=\"{phase}\"}} {}",
                micros.load(Ordering::Relaxed) as f64 / 1e6
            );
        }
        let _ = writeln!(
            out,
            "# HELP gamma_takeover_connections Opaque and upgraded connections the previous agent handed over to this one, mid-stream.\n# TYPE gamma_takeover_connections gauge\ngamma_takeover_connections {}",
            t.connections.load(Ordering::Relaxed)
        );
        out.push_str("# HELP gamma_redirect_missing_kernel_feature A kernel feature the redirect needs and this kernel lacks, with the Linux release that brings it: the redirect is off and pods use ordinary Service routing.\n# TYPE gamma_redirect_missing_kernel_feature gauge\n");
        for (feature, since) in self
            .redirect_missing_kernel_features
            .get()
            .into_iter()
            .flatten()
        {
            let _ = writeln!(
                out,
                "gamma_redirect_missing_kernel_feature{{feature=\"{}\",since=\"{since}\"}} 1",
                escape(feature),
            );
        }
        out
    }
}

fn labels(l: &RequestLabels) -> String {
    format!(
        "service=\"{}\",route=\"{}\",backend=\"{}\",status=\"{}\"",
        escape(&l.service),
        escape(&l.route),
        escape(&l.backend),
        l.status
    )
}

/// A label value; empty (no Service, route or backend was reached) reads `-`.
fn escape(v: &str) -> String {
    if v.is_empty() {
        return "-".to_string();
    }
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_distinct_and_listed_once() {
        let labels: std::collections::BTreeSet<_> = Reason::ALL.iter().map(|r| r.label()).collect();
        assert_eq!(labels.len(), Reason::ALL.len());
        for (i, reason) in Reason::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, i, "Reason::ALL is in declaration order");
        }
    }

    #[test]
    fn renders_counts_and_buckets() {
        let m = Metrics::default();
        let l = RequestLabels {
            service: "ns/s:80".into(),
            route: "HTTPRoute ns/r".into(),
            backend: "ns/b:80".into(),
            status: 200,
        };
        m.record(l.clone(), Duration::from_millis(3));
        m.record(l.clone(), Duration::from_millis(30));
        assert_eq!(m.count(&l), 2);
        let text = m.render(0);
        assert!(text.contains(r#"gamma_requests_total{service="ns/s:80",route="HTTPRoute ns/r",backend="ns/b:80",status="200"} 2"#), "{text}");
        assert!(
            text.contains(r#"le="0.005"} 1"#) && text.contains(r#"le="0.05"} 2"#),
            "{text}"
        );
    }

    #[test]
    fn series_of_removed_services_and_routes_are_pruned() {
        let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: ns}\nspec:\n  clusterIP: 10.96.0.10\n  ports: [{name: http, port: 80}]\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: ns}\nspec:\n  parentRefs: [{kind: Service, group: '', name: s, port: 80}]\n  rules: [{backendRefs: [{name: s, port: 80}]}]\n";
        let mut index = gamma_engine::Index::new();
        for object in gamma_engine::manifests::parse(std::path::Path::new("t.yaml"), yaml).objects {
            index.apply(object);
        }
        index.publish();
        let snapshot = index.snapshot();
        let labels = |service: &str, route: &str| RequestLabels {
            service: service.into(),
            route: route.into(),
            backend: String::new(),
            status: 200,
        };
        let m = Metrics::default();
        for l in [
            labels("ns/s:80", "HTTPRoute ns/r rule 0"),
            labels("ns/s:80", ""),
            labels("", ""),
            labels("ns/gone:80", ""),
            labels("ns/s:81", ""),
            labels("ns/s:80", "HTTPRoute ns/gone rule 0"),
        ] {
            m.record(l, Duration::from_millis(1));
        }
        assert_eq!(m.retain_requests(|l| l.still_served(&snapshot)), 3);
        assert_eq!(m.count(&labels("ns/s:80", "HTTPRoute ns/r rule 0")), 1);
        assert_eq!(m.count(&labels("ns/gone:80", "")), 0);
    }
}
