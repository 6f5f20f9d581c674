//! Prometheus metrics: request counts and durations by service, route, backend and status
//! (`requests`); connections; upstream endpoints in flight; the kernel programs' counters.
//! Exposed in the Prometheus text format by `prometheus-client`, read from the atomics at each
//! scrape.

use super::requests::{SeriesTable, BUCKETS};
use crate::redirect::KernelCounters;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric as _, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

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
    RequestBodyBrokeOff,
    RequestBodyTimeout,
    RouteTimeout,
    HeadTooLarge,
    /// A request head hyper's HTTP/1.1 server could not parse, which it answered 400 itself.
    MalformedHead,
    BadTarget,
    BadHost,
    NotImplemented,
    /// An upgrade or CONNECT asked of an agent that is draining.
    Draining,
}

impl Reason {
    pub const ALL: [Reason; 18] = [
        Reason::Redirect,
        Reason::CorsPreflight,
        Reason::RuleNotServable,
        Reason::UnknownFrontend,
        Reason::NoMatchingRule,
        Reason::NoReadyEndpoint,
        Reason::ConnectFailed,
        Reason::BackendTimeout,
        Reason::BackendFailed,
        Reason::RequestBodyBrokeOff,
        Reason::RequestBodyTimeout,
        Reason::RouteTimeout,
        Reason::HeadTooLarge,
        Reason::MalformedHead,
        Reason::BadTarget,
        Reason::BadHost,
        Reason::NotImplemented,
        Reason::Draining,
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
            Reason::RequestBodyBrokeOff => "request_body_broke_off",
            Reason::RequestBodyTimeout => "request_body_timeout",
            Reason::RouteTimeout => "route_timeout",
            Reason::HeadTooLarge => "head_too_large",
            Reason::MalformedHead => "malformed_head",
            Reason::BadTarget => "bad_target",
            Reason::BadHost => "bad_host",
            Reason::NotImplemented => "not_implemented",
            Reason::Draining => "draining",
        }
    }
}

/// Reads the kernel programs' counters (`None`: unreadable now).
pub type KernelCountersReader = Box<dyn Fn() -> Option<KernelCounters> + Send + Sync>;

/// Counts one more of something a client can repeat at will, and gives the count when it is
/// worth a log line: at the 1st, 2nd, 4th… only (a line each would let a client reconnecting in
/// a loop fill the log; the counter is the signal).
pub fn count_sampled(counter: &AtomicU64) -> Option<u64> {
    let count = counter.fetch_add(1, Ordering::Relaxed) + 1;
    count.is_power_of_two().then_some(count)
}

#[derive(Default)]
pub struct Metrics {
    /// Request series; the data plane records through the slots its tables carry.
    pub requests: SeriesTable,
    /// The series of requests answered before a Service port was known.
    pub unrouted: gamma_engine::routes::Attached,
    pub connections_accepted: AtomicU64,
    pub connections_open: AtomicI64,
    /// Connections closed at once because `--max-connections` were open.
    pub connections_refused_at_cap: AtomicU64,
    /// Connections on a redirect listener without a kernel record, reset.
    pub redirected_without_record: AtomicU64,
    /// Connections whose Service (port, address) left the table, reset on accept.
    pub connections_without_frontend: AtomicU64,
    /// Opaque connections no endpoint accepted, reset.
    pub opaque_unconnected: AtomicU64,
    /// Callers not bound to an endpoint by session affinity because the table was full.
    pub affinity_table_full: Arc<AtomicU64>,
    /// The kernel programs' counters, read at each scrape; set once the redirect runs.
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
    /// How the opaque and upgraded connections' pumps carried their bytes.
    pub pumps: Arc<PumpCounts>,
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

/// Pumps started (handed-over connections included), by how they carry their bytes
/// (`crate::proxy::pump`).
#[derive(Default)]
pub struct PumpCounts {
    spliced: AtomicU64,
    copied: AtomicU64,
}

impl PumpCounts {
    pub fn count(&self, carry: crate::proxy::pump::Carry) {
        let counter = match carry {
            crate::proxy::pump::Carry::Splice => &self.spliced,
            crate::proxy::pump::Carry::Copy => &self.copied,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// (spliced, copied) so far.
    pub fn totals(&self) -> (u64, u64) {
        (
            self.spliced.load(Ordering::Relaxed),
            self.copied.load(Ordering::Relaxed),
        )
    }
}

impl Metrics {
    pub fn local_answer(&self, reason: Reason) {
        self.local_answers[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// The exposition, in the Prometheus text format.
    pub fn render(self: &Arc<Self>, upstream: UpstreamCounts) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Scrape {
            metrics: self.clone(),
            upstream,
        }));
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
            .expect("writing to a String does not fail");
        out
    }
}

/// What the upstream endpoints' shared state counts (`EndpointStats`), read at a scrape.
#[derive(Default)]
pub struct UpstreamCounts {
    pub in_flight: usize,
    pub ejections: u64,
}

/// One scrape: the metrics and what the data plane counts elsewhere.
struct Scrape {
    metrics: Arc<Metrics>,
    upstream: UpstreamCounts,
}

impl std::fmt::Debug for Scrape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Scrape")
    }
}

impl Scrape {
    fn requests(&self, encoder: &mut DescriptorEncoder) -> std::fmt::Result {
        let series: Vec<_> = self
            .metrics
            .requests
            .all()
            .into_iter()
            .map(|s| {
                let read = s.read();
                (s, read)
            })
            .collect();
        let labelled = series.iter().flat_map(|(s, read)| {
            read.iter().map(move |(status, observed)| {
                let [service, route, backend] = s.key.shown();
                let labels = [("service", service), ("route", route), ("backend", backend)];
                (labels, *status, observed)
            })
        });
        let mut counter = encoder.encode_descriptor(
            "gamma_requests",
            "Requests handled, by service, route, backend and status.",
            None,
            MetricType::Counter,
        )?;
        for (labels, status, observed) in labelled.clone() {
            counter
                .encode_family(&(labels, [("status", status)]))?
                .encode_counter::<NoLabelSet, _, u64>(&observed.count, None)?;
        }
        let mut grpc = encoder.encode_descriptor(
            "gamma_grpc_calls",
            "gRPC calls ended, by service, route, backend and the grpc-status they ended with \
             (from the answer's trailers, or its head when trailers-only; ended without one: \
             UNKNOWN, 2; cancelled by the caller: CANCELLED, 1).",
            None,
            MetricType::Counter,
        )?;
        for (s, _) in &series {
            let [service, route, backend] = s.key.shown();
            let labels = [("service", service), ("route", route), ("backend", backend)];
            for (status, count) in s.grpc.read() {
                grpc.encode_family(&(labels, [("grpc_status", status)]))?
                    .encode_counter::<NoLabelSet, _, u64>(&count, None)?;
            }
        }
        let mut histogram = encoder.encode_descriptor(
            "gamma_request_duration_seconds",
            "Time from request head to response head.",
            None,
            MetricType::Histogram,
        )?;
        for (labels, status, observed) in labelled {
            let buckets: [(f64, u64); BUCKETS.len()] =
                std::array::from_fn(|i| (BUCKETS[i], observed.buckets[i]));
            histogram
                .encode_family(&(labels, [("status", status)]))?
                .encode_histogram::<NoLabelSet>(
                    observed.sum_seconds,
                    observed.count,
                    &buckets,
                    None,
                )?;
        }
        Ok(())
    }
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> std::fmt::Result {
    ConstCounter::new(value).encode(encoder.encode_descriptor(
        name,
        help,
        None,
        MetricType::Counter,
    )?)
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: i64) -> std::fmt::Result {
    ConstGauge::new(value).encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let m = &*self.metrics;
        let e = &mut encoder;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        self.requests(e)?;
        if let Some(counted) = m.kernel_counters.get().and_then(|read| read()) {
            for (name, help, value) in [
                ("gamma_kernel_connects_steered", "connect() calls to a mesh Service the kernel programs sent to the agent.", counted.steered),
                ("gamma_kernel_connects_steered_client_first", "Of the steered connect() calls, those sent to the agent's client-first listener (--redirect-http: ports that declare HTTP). Rising while requests to such ports are not: pods cannot reach that port (an egress NetworkPolicy?).", counted.steered_client_first),
                ("gamma_kernel_connects_agent_gone", "connect() calls to a mesh Service left to ordinary Service routing because the agent's listener was gone (fail open).", counted.agent_gone),
                ("gamma_kernel_record_failures", "Redirect records the kernel programs could not store (the connection was left alone, or the agent lost its original destination).", counted.record_failed),
                ("gamma_kernel_getpeername_rewrites", "getpeername() calls on redirected sockets answered with the Service address.", counted.peername_rewrites),
                ("gamma_kernel_local_pairs", "Node-local connections through the agent whose two sockets the kernel programs paired (--local-sockets).", counted.local_paired),
                ("gamma_kernel_local_moved_sockets", "Paired sockets whose bytes move socket to socket (their peer was paired at their first send).", counted.local_moved),
                ("gamma_kernel_local_kept_tcp_sockets", "Sockets of opted-in pods' connections to the agent and of the agent's to them that keep TCP: no paired peer at their first send (one still in its handshake, or outside the programs' cgroup), or bytes sent before they joined.", counted.local_kept_tcp),
            ] {
                counter(e, name, help, value)?;
            }
            gauge(e, "gamma_kernel_table_version", "The route table version (gamma_snapshot_version) whose mesh Service frontends the kernel programs were last told: behind it while the agent has not yet told them.", counted.table_version as i64)?;
            gauge(e, "gamma_kernel_mesh_frontends", "Mesh Service frontends (ClusterIP:port with routes) told to the kernel programs, which steer their connections to the agent.", counted.mesh_frontends as i64)?;
            gauge(e, "gamma_redirect_frontends_without_listener", "Mesh Service frontends (ClusterIP:port with routes) of an address family the agent has no redirect listener for (--redirect): left to kube-proxy's routing, without mesh routes.", counted.frontends_without_listener as i64)?;
            gauge(e, "gamma_kernel_local_pods", "Addresses of this node's pods opted in to local sockets (annotation gamma-node.io/local-sockets set to true on the Pod, or on its Namespace and absent from the Pod) told to the kernel programs (--local-sockets): only their connections through the agent pair.", counted.local_pods as i64)?;
        }
        let mut local = e.encode_descriptor(
            "gamma_local_answers",
            "Requests the agent answered itself instead of relaying a backend's answer, by reason.",
            None,
            MetricType::Counter,
        )?;
        for (reason, count) in Reason::ALL.iter().zip(&m.local_answers) {
            local
                .encode_family(&[("reason", reason.label())])?
                .encode_counter::<NoLabelSet, _, u64>(&load(count), None)?;
        }
        for (name, help, value) in [
            ("gamma_connections_accepted", "Downstream connections accepted.", &m.connections_accepted),
            ("gamma_connections_refused_at_cap", "Downstream connections closed on accept because --max-connections were open.", &m.connections_refused_at_cap),
            ("gamma_log_lines_dropped", "Log lines dropped because the log's reader (the container runtime's pipe) did not keep up.", &super::log_writer::LINES_DROPPED),
            ("gamma_redirected_without_record", "Connections to a redirect listener without the kernel's record of where they were going (made straight to it, the record evicted, or reset by the caller before it was accepted), reset on accept.", &m.redirected_without_record),
            ("gamma_session_affinity_table_full", "Callers of ClientIP-affinity Services not bound to an endpoint because the table held its maximum of live bindings.", &*m.affinity_table_full),
            ("gamma_connections_without_frontend", "Connections reset on accept because their Service (its port, its address) is no longer in the table.", &m.connections_without_frontend),
            ("gamma_opaque_connections", "Connections passed through as opaque TCP.", &m.opaque_connections),
            ("gamma_opaque_unconnected", "Opaque TCP connections reset because no endpoint accepted them (none ready, all refusing, or the agent short of descriptors or ports).", &m.opaque_unconnected),
            ("gamma_opaque_after_sniff_timeout", "Connections to ports that do not declare their protocol passed through as opaque TCP because the client sent nothing telling within the sniffing timeout.", &m.opaque_after_sniff_timeout),
            ("gamma_mirrors_sent", "Mirrored requests sent.", &m.mirrors_sent),
            ("gamma_mirrors_dropped", "Mirrored requests dropped (concurrency bound reached).", &m.mirrors_dropped),
            ("gamma_mirrors_timed_out", "Mirrored requests abandoned after the mirror timeout (their slot freed).", &m.mirrors_timed_out),
            ("gamma_mirrors_skipped_body", "Mirrors not sent because the request body was larger than --max-buffered-body-bytes or did not end within the mirror timeout.", &m.mirrors_skipped_body),
            ("gamma_retries_skipped_body", "Retries not made because the request body was larger than --max-buffered-body-bytes.", &m.retries_skipped_body),
        ] {
            counter(e, name, help, load(value))?;
        }
        counter(
            e,
            "gamma_endpoint_ejections",
            "Endpoints set aside for a while: their connection was refused, or requests to them got no answer several times in a row.",
            self.upstream.ejections,
        )?;
        let tasks = m
            .runtimes
            .lock()
            .expect("not poisoned")
            .iter()
            .map(|r| r.metrics().num_alive_tasks() as i64)
            .sum();
        for (name, help, value) in [
            ("gamma_connections_open", "Downstream connections open.", m.connections_open.load(Ordering::Relaxed)),
            ("gamma_runtime_tasks_alive", "Tasks alive on the agent's runtimes (main and data-plane workers): connections, pumps, pooled upstream connections, timers' tasks. Returns to its idle level once connections are gone.", tasks),
            ("gamma_upstream_requests_in_flight", "Requests in flight to upstream endpoints.", self.upstream.in_flight as i64),
            ("gamma_snapshot_version", "Version of the route table in use.", load(&m.snapshot_version) as i64),
            ("gamma_last_sync_timestamp_seconds", "When the table was last published from complete sources (Unix time; 0: never): it moves only when something changed, so a quiet healthy cluster ages it; alert on gamma_source_stale_since_timestamp_seconds or /ready, not on its age.", load(&m.last_sync_unix) as i64),
            ("gamma_source_stale_since_timestamp_seconds", "Since when the sources are stale and the last good table is served (Unix time; 0: fresh).", load(&m.source_stale_since_unix) as i64),
            ("gamma_takeover_connections", "Opaque and upgraded connections the previous agent handed over to this one, mid-stream.", load(&m.takeover.connections) as i64),
        ] {
            gauge(e, name, help, value)?;
        }
        let t = &m.takeover;
        let mut takeover = e.encode_descriptor(
            "gamma_takeover_duration_seconds",
            "The takeover of the previous agent this one started with (0: none): offer (connect to sockets received), stop (Stop to Stopped), total (process start to the old agent stopped).",
            None,
            MetricType::Gauge,
        )?;
        for (phase, micros) in [
            ("offer", &t.offer_micros),
            ("stop", &t.stop_micros),
            ("total", &t.total_micros),
        ] {
            takeover
                .encode_family(&[("phase", phase)])?
                .encode_gauge(&(load(micros) as f64 / 1e6))?;
        }
        let mut pumps = e.encode_descriptor(
            "gamma_pumped_connections",
            "Opaque and upgraded connections whose bytes the agent pumped (handed-over ones included), by how: splice (in the kernel) or copy (through the agent: --pump copy, no pipe, or a socket the kernel pairs, see --local-sockets).",
            None,
            MetricType::Counter,
        )?;
        let (spliced, copied) = m.pumps.totals();
        for (carry, count) in [("splice", spliced), ("copy", copied)] {
            pumps
                .encode_family(&[("carry", carry)])?
                .encode_counter::<NoLabelSet, _, u64>(&count, None)?;
        }
        let mut missing = e.encode_descriptor(
            "gamma_redirect_missing_kernel_feature",
            "A kernel feature the redirect needs and this kernel lacks, with the Linux release that brings it: the redirect is off and pods use ordinary Service routing.",
            None,
            MetricType::Gauge,
        )?;
        for (feature, since) in m
            .redirect_missing_kernel_features
            .get()
            .into_iter()
            .flatten()
        {
            missing
                .encode_family(&[("feature", *feature), ("since", *since)])?
                .encode_gauge(&1i64)?;
        }
        Ok(())
    }
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
        let m = Arc::new(Metrics::default());
        let key = super::super::requests::SeriesKey {
            service: "ns/s:80".into(),
            route: "HTTPRoute ns/r".into(),
            backend: "ns/b:80".into(),
        };
        let series = m.requests.series(key);
        series.record(200, std::time::Duration::from_millis(3));
        series.record(200, std::time::Duration::from_millis(30));
        m.local_answer(Reason::NoMatchingRule);
        let text = m.render(UpstreamCounts::default());
        assert!(text.contains(r#"gamma_requests_total{service="ns/s:80",route="HTTPRoute ns/r",backend="ns/b:80",status="200"} 2"#), "{text}");
        assert!(
            text.contains(r#"le="0.005"} 1"#) && text.contains(r#"le="0.05"} 2"#),
            "{text}"
        );
        assert!(text.contains(r#"le="+Inf"} 2"#), "{text}");
        assert!(
            text.contains(r#"gamma_local_answers_total{reason="no_matching_rule"} 1"#),
            "{text}"
        );
        assert!(text.contains("gamma_connections_open 0"), "{text}");
    }
}
