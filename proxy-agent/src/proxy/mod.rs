//! The data plane: per connection, detect the protocol; per request, decide with the route
//! table, run the filters, pick a backend and an endpoint, forward over pooled connections.

pub mod body;
mod forward;
pub mod listener;
mod mirror;
mod tcp;
pub mod upstream;

use crate::admin::metrics::{Metrics, RequestLabels};
use crate::model::ObjectKey;
use crate::routes::{Decision, Frontend, LocalResponse, Plan, RequestHead, Snapshot};
use arc_swap::ArcSwap;
use body::ProxyBody;
use http::{header, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Knobs of the data plane.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    pub connect_timeout: Duration,
    /// Slowloris guard: the whole request head must arrive within this time.
    pub header_read_timeout: Duration,
    /// How long to wait for a client's first bytes before treating the connection as opaque TCP
    /// (server-first protocols send nothing).
    pub detect_timeout: Duration,
    /// Mirrored requests in flight at most; more are dropped, never queued.
    pub max_mirrors_in_flight: usize,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            connect_timeout: Duration::from_secs(1),
            header_read_timeout: Duration::from_secs(10),
            detect_timeout: Duration::from_millis(300),
            max_mirrors_in_flight: 256,
        }
    }
}

/// Where a connection was going.
#[derive(Clone, Debug)]
pub enum Destination {
    /// An explicit listener: a named Service port.
    Service { service: ObjectKey, port: u16 },
    /// A redirected connection: its original destination (a ClusterIP and port).
    Address(SocketAddr),
}

/// Who called, as far as the agent could establish.
#[derive(Clone, Debug)]
pub struct Caller {
    pub ip: IpAddr,
    /// The namespace whose consumer routes apply; `None`: unknown caller, producer routes only.
    pub namespace: Option<String>,
    pub pod: Option<String>,
    /// How the identity was established, for the access log.
    pub identity: &'static str,
}

#[derive(Clone, Debug)]
pub struct ConnectionInfo {
    pub destination: Destination,
    pub caller: Caller,
}

pub struct Proxy {
    pub snapshot: Arc<ArcSwap<Snapshot>>,
    pub upstream: upstream::Upstream,
    pub metrics: Arc<Metrics>,
    pub config: ProxyConfig,
    mirrors: mirror::Mirrors,
}

impl Proxy {
    pub fn new(
        snapshot: Arc<ArcSwap<Snapshot>>,
        metrics: Arc<Metrics>,
        config: ProxyConfig,
    ) -> Arc<Self> {
        Arc::new(Proxy {
            snapshot,
            upstream: upstream::Upstream::new(config.connect_timeout),
            mirrors: mirror::Mirrors::new(config.max_mirrors_in_flight),
            metrics,
            config,
        })
    }

    pub fn frontend(
        &self,
        snapshot: &Snapshot,
        destination: &Destination,
    ) -> Option<Arc<Frontend>> {
        match destination {
            Destination::Service { service, port } => snapshot.frontend_of(service, *port).cloned(),
            Destination::Address(addr) => snapshot.frontend_at(*addr).cloned(),
        }
    }

    /// Handles one request end to end; never fails: errors become local responses.
    pub async fn handle(
        self: &Arc<Self>,
        request: Request<Incoming>,
        conn: &ConnectionInfo,
    ) -> Response<ProxyBody> {
        let started = Instant::now();
        let snapshot = self.snapshot.load_full();
        let mut log = AccessLog::new(&request, conn);
        let response = match self
            .proxy_frontend(&snapshot, request, conn, &mut log)
            .await
        {
            Ok(response) => response,
            Err(local) => local_response(&local, &mut log),
        };
        log.status = response.status().as_u16();
        log.finish(started, &self.metrics);
        response
    }

    async fn proxy_frontend(
        self: &Arc<Self>,
        snapshot: &Snapshot,
        request: Request<Incoming>,
        conn: &ConnectionInfo,
        log: &mut AccessLog,
    ) -> Result<Response<ProxyBody>, LocalResponse> {
        let Some(frontend) = self.frontend(snapshot, &conn.destination) else {
            return Err(LocalResponse::error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "no Service frontend is known for {:?}; check that the Service exists",
                    conn.destination
                ),
            ));
        };
        log.service = format!("{}:{}", frontend.service, frontend.port);
        let (mut parts, body) = request.into_parts();
        let decision = frontend.lookup(
            conn.caller.namespace.as_deref(),
            &RequestHead::from_parts(&parts),
        );
        match decision {
            Decision::Direct(backend) => {
                log.route = "-".into();
                log.backend = backend.name();
                forward::forward(self, backend, parts, body, None, log).await
            }
            Decision::NoMatchingRule => Err(LocalResponse::error(
                StatusCode::NOT_FOUND,
                format!(
                    "no rule of the routes attached to {} matches this request",
                    log.service
                ),
            )),
            Decision::Rule { rule, matched } => {
                log.route = format!("{} rule {}", rule.route, rule.name_or_index());
                let random = rand::random::<u64>();
                match rule.plan(&mut parts, matched, frontend.port, random) {
                    Plan::Respond(local) => Err(local),
                    Plan::Forward(plan) => {
                        log.backend = plan.backend.name();
                        self.mirrors.send(self, &plan.mirrors, &parts, random);
                        let mut response =
                            forward::forward(self, plan.backend, parts, body, Some(rule), log)
                                .await?;
                        for modifier in plan.response_headers {
                            modifier.apply(response.headers_mut());
                        }
                        Ok(response)
                    }
                }
            }
        }
    }
}

fn local_response(local: &LocalResponse, log: &mut AccessLog) -> Response<ProxyBody> {
    log.reason = Some(local.reason.clone());
    let mut response = Response::new(body::full(format!("{}\n", local.reason)));
    *response.status_mut() = local.status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if let Some(location) = local
        .location
        .as_deref()
        .and_then(|l| HeaderValue::from_str(l).ok())
    {
        response.headers_mut().insert(header::LOCATION, location);
    }
    response
}

/// One structured line per request.
pub(crate) struct AccessLog {
    method: http::Method,
    path: String,
    caller_namespace: String,
    caller_pod: String,
    identity: &'static str,
    pub service: String,
    pub route: String,
    pub backend: String,
    pub endpoint: String,
    pub status: u16,
    pub attempts: u32,
    pub upstream_duration: Option<Duration>,
    pub reason: Option<String>,
}

impl AccessLog {
    fn new<B>(request: &Request<B>, conn: &ConnectionInfo) -> Self {
        AccessLog {
            method: request.method().clone(),
            path: request.uri().path().to_string(),
            caller_namespace: conn.caller.namespace.clone().unwrap_or_else(|| "-".into()),
            caller_pod: conn
                .caller
                .pod
                .clone()
                .unwrap_or_else(|| conn.caller.ip.to_string()),
            identity: conn.caller.identity,
            service: "-".into(),
            route: "-".into(),
            backend: "-".into(),
            endpoint: "-".into(),
            status: 0,
            attempts: 0,
            upstream_duration: None,
            reason: None,
        }
    }

    fn finish(self, started: Instant, metrics: &Metrics) {
        let duration = started.elapsed();
        tracing::info!(
            target: "access",
            caller_namespace = %self.caller_namespace,
            caller_pod = %self.caller_pod,
            caller_identity = self.identity,
            method = %self.method,
            path = %self.path,
            service = %self.service,
            route = %self.route,
            backend = %self.backend,
            endpoint = %self.endpoint,
            status = self.status,
            attempts = self.attempts,
            duration_us = duration.as_micros() as u64,
            upstream_us = self.upstream_duration.map_or(0, |d| d.as_micros() as u64),
            reason = self.reason.as_deref().unwrap_or("-"),
        );
        metrics.record(
            RequestLabels {
                service: self.service,
                route: self.route,
                backend: self.backend,
                status: self.status,
            },
            duration,
        );
    }
}
