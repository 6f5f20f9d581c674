//! The agent's client of the API server: kube-rs's stack (its TLS configuration, authentication,
//! base URI and extra headers, its retry of 429/503/504), on a connection pool that speaks
//! HTTP/2 where the server offers it (ALPN over TLS, as API servers do unless told not to).
//!
//! Why not kube-rs's own client: it speaks HTTP/1.1 only, so each watch held a connection of its
//! own, some ten per node (one per watched kind, the mesh status watch, the lease), each with its
//! TLS session, on the API server too (a 5,000-node cluster: 50,000 connections for these agents
//! alone). Over HTTP/2 they are streams of one connection, as client-go's are. And a connection
//! gone silent (the API server's host lost behind a VIP, a NAT entry dropped) is found by HTTP/2
//! PINGs within `ping_interval + ping_timeout` (client-go's 30 + 15 s), where over HTTP/1.1 only
//! the read timeout (300 s, longer than a watch) found it for a list, and kube-runtime's end of a
//! watch idle for 295 s for a watch. The price, as client-go's: a network blip longer than the
//! PING timeout fails every watch at once, and each kind is listed again (over HTTP/1.1 TCP's
//! retransmissions rode it out).
//!
//! A plain `http://` server (a local proxy, the tests' fake) and any server that does not offer
//! `h2` get HTTP/1.1, one connection per request in flight, as before. A configured proxy
//! (`proxy-url` in the kubeconfig, or `HTTPS_PROXY` with a kubeconfig: in a pod kube-rs ignores
//! it) goes to kube-rs's own client, which says whether this build can take it.

use super::KubeError;
use hyper::body::{Body, Frame, SizeHint};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use kube::client::ConfigExt;
use kube::Client;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tower::ServiceBuilder;

/// How the agent's client finds a connection gone silent, or an answer stalled.
#[derive(Clone, Copy, Debug)]
pub struct ApiTimeouts {
    /// A request whose answer brings no byte for this long fails (kube-rs sets none: a list on a
    /// connection gone silent waited forever, the kind frozen or never synced): its head, then
    /// each gap in its body. Over HTTP/2 the PINGs below find a silent connection first; this
    /// finds a stream stalled on a live one.
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
/// logged), so that the connection and its protocol are settled before the watches start
/// together: over TLS whether it speaks HTTP/2 is known only once a connection is up, and each
/// request made meanwhile opens one of its own (closed again once ALPN has told, but a TLS
/// handshake each). Its failure is left to the requests that follow.
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
    // The read timeout is each request's (`ReadTimeout`): over HTTP/2 the connection's bytes are
    // every stream's and its PINGs', and a stalled stream would never see it.
    let mut connector = hyper_timeout::TimeoutConnector::new(https);
    connector.set_connect_timeout(config.connect_timeout);
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
        .layer_fn(|pool| ReadTimeout {
            inner: pool,
            read: timeouts.read,
        })
        .service(pool);
    Ok(Client::new(service, config.default_namespace))
}

/// A request fails once its answer brings no byte for `read`: its head, then each gap in its
/// body (a watch's events, a list's chunks). Errors are boxed, as kube-rs's layers take them.
#[derive(Clone)]
struct ReadTimeout<S> {
    inner: S,
    read: Duration,
}

#[derive(Debug, thiserror::Error)]
#[error("the API server's answer brought no byte for {0:?} (--api-read-timeout-s)")]
struct ReadTimedOut(Duration);

impl<S, B, A> tower::Service<http::Request<B>> for ReadTimeout<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<A>>,
    S::Error: Into<tower::BoxError>,
    S::Future: Send + 'static,
    A: Body + Unpin,
{
    type Response = http::Response<IdleTimeoutBody<A>>;
    type Error = tower::BoxError;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let (answer, read) = (self.inner.call(request), self.read);
        Box::pin(async move {
            let answer = tokio::time::timeout(read, answer)
                .await
                .map_err(|_| ReadTimedOut(read))?
                .map_err(Into::into)?;
            Ok(answer.map(|body| IdleTimeoutBody {
                body,
                read,
                idle: Box::pin(tokio::time::sleep(read)),
            }))
        })
    }
}

/// An answer's body that fails once it brings nothing for `read`.
struct IdleTimeoutBody<B> {
    body: B,
    read: Duration,
    idle: Pin<Box<tokio::time::Sleep>>,
}

impl<B: Body + Unpin> Body for IdleTimeoutBody<B>
where
    B::Error: Into<tower::BoxError>,
{
    type Data = B::Data;
    type Error = tower::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        match Pin::new(&mut self.body).poll_frame(cx) {
            Poll::Ready(frame) => {
                let next = tokio::time::Instant::now() + self.read;
                self.idle.as_mut().reset(next);
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => match self.idle.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(ReadTimedOut(self.read).into()))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};
    use tower::{Service, ServiceExt};

    type Chunk = Result<Frame<bytes::Bytes>, std::io::Error>;
    type Chunks = StreamBody<futures::channel::mpsc::UnboundedReceiver<Chunk>>;
    type Server =
        tower::util::BoxService<http::Request<()>, http::Response<Chunks>, std::io::Error>;

    /// A service whose answer comes after `head_after`, its body's chunks sent through the
    /// returned sender; behind a 300 s read timeout.
    fn server(
        head_after: Duration,
    ) -> (
        ReadTimeout<Server>,
        futures::channel::mpsc::UnboundedSender<Chunk>,
    ) {
        let (chunks, body) = futures::channel::mpsc::unbounded();
        let body = std::sync::Mutex::new(Some(StreamBody::new(body)));
        let inner = tower::service_fn(move |_: http::Request<()>| {
            let body = body.lock().unwrap().take().expect("one request");
            async move {
                tokio::time::sleep(head_after).await;
                Ok::<_, std::io::Error>(http::Response::new(body))
            }
        });
        let read = Duration::from_secs(300);
        (
            ReadTimeout {
                inner: Server::new(inner),
                read,
            },
            chunks,
        )
    }

    fn chunk(text: &'static str) -> Chunk {
        Ok(Frame::data(bytes::Bytes::from_static(text.as_bytes())))
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_whose_head_does_not_come_fails_after_the_read_timeout() {
        let (mut service, _chunks) = server(Duration::from_secs(301));
        let started = tokio::time::Instant::now();
        let failed = service
            .ready()
            .await
            .unwrap()
            .call(http::Request::new(()))
            .await;
        let error = failed.err().expect("no head within 300 s").to_string();
        assert!(error.contains("no byte for 300s"), "{error}");
        assert_eq!(started.elapsed(), Duration::from_secs(300));
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_fails_once_it_brings_nothing_for_the_read_timeout_and_not_before() {
        let (mut service, chunks) = server(Duration::from_secs(10));
        let answer = service
            .ready()
            .await
            .unwrap()
            .call(http::Request::new(()))
            .await;
        let mut body = answer.expect("a head within 300 s").into_body();
        // Chunks 299 s apart, 600 s in all: each gap below the timeout.
        for _ in 0..2 {
            tokio::time::sleep(Duration::from_secs(299)).await;
            chunks.unbounded_send(chunk("event")).unwrap();
            let frame = body.frame().await.unwrap().unwrap();
            assert_eq!(frame.into_data().unwrap(), "event");
        }
        let started = tokio::time::Instant::now();
        let stalled = body.frame().await.expect("an error, not the end");
        assert!(stalled.is_err());
        assert_eq!(started.elapsed(), Duration::from_secs(300));
    }
}
