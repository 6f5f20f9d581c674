//! `gamma-hyper-floor LISTEN BACKEND_A BACKEND_B`: the least a hyper-based forwarder does for
//! the peers benchmark, to show in the same table how much of the agent's cost is hyper's.
//!
//! The agent's layout (a current-thread runtime per core, copies of one listening socket, the
//! agent's upstream per worker: its own HTTP/1.1 exchange for requests without a body, hyper's
//! client for the others) and the benchmark's work (set `x-perf-added: proxy`, split 90/10),
//! nothing else: no route table, no filters, no metrics, no access log, no request timeouts, no
//! retries; of the hop-by-hop headers only `Connection` is dropped (the benchmark's clients send
//! no other).

use anyhow::Result;
use http::{HeaderValue, Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use proxy_agent::proxy::body::{self, ProxyBody};
use proxy_agent::proxy::upstream::{PoolTimeouts, Upstream, UpstreamError};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

fn main() -> Result<()> {
    gamma_tests::floor::run_per_core("gamma-hyper-floor", serve)
}

async fn serve(listener: tokio::net::TcpListener, backends: [SocketAddr; 2]) {
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
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (client, turn) = (client.clone(), turn.clone());
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            let n = turn.fetch_add(1, Ordering::Relaxed) % 10;
            let backend = backends[usize::from(n == 9)];
            forward(client.clone(), backend, request)
        });
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn forward(
    client: Upstream,
    backend: SocketAddr,
    request: Request<Incoming>,
) -> Result<Response<ProxyBody>, UpstreamError> {
    let (mut parts, incoming) = request.into_parts();
    // Origin form, as the agent sends (the clients' Host goes along).
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
