//! The agent's client of the API server: kube-rs's stack (its TLS configuration, authentication,
//! base URI and extra headers, its retry of 429/503/504), on a connection pool that speaks
//! HTTP/2 where the server offers it (ALPN over TLS, as every real API server does).
//!
//! Why not kube-rs's own client: it speaks HTTP/1.1 only, so each watch held a connection of its
//! own, some ten per node (one per watched kind, the mesh status watch, the lease), each with its
//! TLS session, on the API server too (a 5,000-node cluster: 50,000 connections for these agents
//! alone). Over HTTP/2 they are streams of one connection, as client-go's are. And a connection
//! gone silent (the API server's host lost behind a VIP, a NAT entry dropped) is found by HTTP/2
//! PINGs within `ping_interval + ping_timeout` (client-go's 30 + 15 s), where HTTP/1.1 has only
//! the read timeout, longer than a watch (300 s), to find it.
//!
//! A plain `http://` server (a local proxy, the tests' fake) and any server that does not offer
//! `h2` get HTTP/1.1, one connection per request in flight, as before. A configured proxy
//! (`proxy-url` in the kubeconfig) goes to kube-rs's own client, which says whether this build
//! can take it.

use super::KubeError;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use kube::client::ConfigExt;
use kube::Client;
use std::time::Duration;
use tower::ServiceBuilder;

/// How the agent's client finds a connection that went silent.
#[derive(Clone, Copy, Debug)]
pub struct ApiTimeouts {
    /// A request whose connection brings no byte for this long fails (kube-rs sets none: a list
    /// on a connection gone silent waited forever, the kind frozen or never synced). Over HTTP/2
    /// the PINGs below find such a connection first.
    pub read: Duration,
    /// An HTTP/2 connection that brought no frame for this long is sent a PING...
    pub ping_interval: Duration,
    /// ...and is closed, failing its requests and watches (which are made again on a new one),
    /// if the answer does not come within this.
    pub ping_timeout: Duration,
}

impl ApiTimeouts {
    /// client-go's HTTP/2 health check (`ReadIdleTimeout`, `PingTimeout`).
    pub const PING_INTERVAL: Duration = Duration::from_secs(30);
    pub const PING_TIMEOUT: Duration = Duration::from_secs(15);

    /// The read timeout `read`, and client-go's PINGs.
    pub fn new(read: Duration) -> ApiTimeouts {
        ApiTimeouts {
            read,
            ping_interval: Self::PING_INTERVAL,
            ping_timeout: Self::PING_TIMEOUT,
        }
    }
}

/// How long `connect` waits for its first answer before leaving the rest to the requests that
/// follow.
const FIRST_ANSWER: Duration = Duration::from_secs(5);

/// [`client`], and one request alone (the server's version, `kube_api::SERVER_VERSION`,
/// logged), so that the connection and
/// its protocol are settled before the watches start together: over TLS whether it speaks HTTP/2
/// is known only once a connection is up, and each request made meanwhile opens one of its own
/// (closed again once ALPN has told, but a TLS handshake each). Its failure is left to the
/// requests that follow.
pub async fn connect(config: kube::Config, timeouts: ApiTimeouts) -> Result<Client, KubeError> {
    let client = client(config, timeouts)?;
    match tokio::time::timeout(FIRST_ANSWER, client.apiserver_version()).await {
        Ok(Ok(version)) => {
            tracing::info!(version = %version.git_version, "connected to the API server")
        }
        Ok(Err(error)) => tracing::debug!(%error, "the API server's version"),
        Err(_) => tracing::debug!("the API server's version: no answer within {FIRST_ANSWER:?}"),
    }
    Ok(client)
}

/// A client of the API server `config` names, over HTTP/2 where the server offers it.
pub fn client(config: kube::Config, timeouts: ApiTimeouts) -> Result<Client, KubeError> {
    if config.proxy_url.is_some() {
        let mut config = config;
        config.read_timeout = Some(timeouts.read);
        return Client::try_from(config).map_err(KubeError::Client);
    }
    let mut http = HttpConnector::new();
    // `https://` URIs too: TLS is the connector's layer above.
    http.enforce_http(false);
    let tls = config.rustls_client_config().map_err(KubeError::Client)?;
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http();
    let https = match &config.tls_server_name {
        Some(name) => {
            let name = rustls_pki_types::ServerName::try_from(name.clone())
                .map_err(|e| KubeError::ServerName(name.clone(), e))?;
            https.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(name))
        }
        None => https,
    };
    // ALPN offers h2 and http/1.1, in that order.
    let https = https.enable_http1().enable_http2().wrap_connector(http);
    let mut connector = hyper_timeout::TimeoutConnector::new(https);
    connector.set_connect_timeout(config.connect_timeout);
    connector.set_read_timeout(Some(timeouts.read));
    connector.set_write_timeout(config.write_timeout);
    let pool = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .http2_keep_alive_interval(timeouts.ping_interval)
        .http2_keep_alive_timeout(timeouts.ping_timeout)
        // Watches are open streams, but a connection between a list and its watch has none.
        .http2_keep_alive_while_idle(true)
        .build(connector);
    let retry = config
        .default_retry
        .then(|| tower::retry::RetryLayer::new(kube::client::retry::RetryPolicy::server_retry()));
    let service = ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(retry)
        .option_layer(config.auth_layer().map_err(KubeError::Client)?)
        .layer(config.extra_headers_layer().map_err(KubeError::Client)?)
        // The layers above (kube-rs's) take boxed errors.
        .map_err(tower::BoxError::from)
        .service(pool);
    Ok(Client::new(service, config.default_namespace))
}
