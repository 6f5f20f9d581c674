//! `gamma-hyper-floor LISTEN BACKEND_A BACKEND_B`: the least a hyper-based forwarder does for
//! the peers benchmark, to show in the same table how much of the agent's cost is hyper's.
//!
//! The agent's layout (a current-thread runtime per core, copies of one listening socket, the
//! agent's upstream per worker: its own HTTP/1.1 exchange for requests without a body, hyper's
//! client for the others) and the benchmark's work (set `x-perf-added: proxy`, split 90/10),
//! nothing else: no route table, no filters, no metrics, no access log, no request timeouts, no
//! retries; of the hop-by-hop headers only `Connection` is dropped (the benchmark's clients send
//! no other). With a fourth address it takes HTTP/2 callers (prior knowledge) there too, so that
//! HTTP/2 has a floor as well (on a port of its own: telling the protocols apart on one port
//! would add to the HTTP/1.1 floor's cost).

use anyhow::Result;
use gamma_tests::floor::Listeners;
use http::{HeaderValue, Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use proxy_agent::proxy::body::{self, ProxyBody};
use proxy_agent::proxy::upstream::{PoolTimeouts, Upstream, UpstreamError};
use proxy_agent::proxy::ProxyConfig;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

fn main() -> Result<()> {
    gamma_tests::floor::run_per_core("gamma-hyper-floor", true, serve)
}

async fn serve(listeners: Listeners, backends: [SocketAddr; 2]) {
    // The agent's defaults.
    let client = Upstream::new(
        PoolTimeouts {
            connect: proxy_agent::proxy::DEFAULT_CONNECT_TIMEOUT,
            http1_idle: PoolTimeouts::DEFAULT_HTTP1_IDLE,
            http2_idle: PoolTimeouts::DEFAULT_HTTP2_IDLE,
        },
        Arc::default(),
    );
    // Smooth enough for 90/10: nine requests to the first backend, then one to the second.
    let turn = Arc::new(AtomicU32::new(0));
    let service = move || {
        let (client, turn) = (client.clone(), turn.clone());
        hyper::service::service_fn(move |request: Request<Incoming>| {
            let n = turn.fetch_add(1, Ordering::Relaxed) % 10;
            let backend = backends[usize::from(n == 9)];
            forward(client.clone(), backend, request)
        })
    };
    if let Some(listener) = listeners.http2 {
        let service = service.clone();
        tokio::task::spawn_local(accept(listener, move |stream| {
            let service = service();
            async move {
                // The agent's default HTTP/2 settings.
                let config = ProxyConfig::default();
                let _ = config
                    .h2_server()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            }
        }));
    }
    accept(listeners.http1, move |stream| {
        let service = service();
        async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        }
    })
    .await
}

/// Accepts connections on `listener` for ever, each served by `serve` in a task of its own.
async fn accept<F>(listener: tokio::net::TcpListener, serve: impl Fn(tokio::net::TcpStream) -> F)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(serve(stream));
    }
}

async fn forward(
    client: Upstream,
    backend: SocketAddr,
    request: Request<Incoming>,
) -> Result<Response<ProxyBody>, UpstreamError> {
    let (mut parts, incoming) = request.into_parts();
    // Origin form, as the agent sends (the clients' Host goes along, or an HTTP/2 caller's
    // `:authority` becomes it).
    if parts.version == http::Version::HTTP_2 {
        if let Some(host) = parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            parts.headers.insert(http::header::HOST, host);
        }
    }
    if let Some(path_and_query) = parts.uri.path_and_query() {
        parts.uri = path_and_query.clone().into();
    }
    // Hop-by-hop: a client's `Connection: close` is not the upstream connection's.
    parts.headers.remove(http::header::CONNECTION);
    parts
        .headers
        .insert("x-perf-added", HeaderValue::from_static("proxy"));
    // An empty body goes as none (the agent's `RequestBody` does the same).
    let body = match hyper::body::Body::is_end_stream(&incoming) {
        true => body::empty(),
        false => body::stream_http1(incoming, ()),
    };
    client
        .send(backend, false, Request::from_parts(parts, body), None)
        .await
}
