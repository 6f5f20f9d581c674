//! An echo backend like the upstream conformance echo server, for what tests read: it answers
//! with its name (the pod name), the method, path, host and request headers as received.
//! HTTP/1.1 and HTTP/2 (h2c) on the same port; gRPC calls get a gRPC-framed answer.
//!
//! Test hooks: `/status/<code>` answers that status, `/delay/<ms>` waits first, `/flaky/<n>`
//! succeeds every n-th time, `/cookie/<value>` sets that cookie (`Set-Cookie`),
//! `/__received/<nonce>` says (header `x-echo-received: <path> <body bytes>`) whether a request
//! carrying `x-gamma-nonce: <nonce>` arrived here (how a test sees where a mirror went), and an
//! `Upgrade` request is accepted (101) and then echoes bytes.

use bytes::{BufMut, Bytes, BytesMut};
use http::{header, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::json;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// What an echo server saw, shared with the test that runs it.
#[derive(Default)]
pub struct EchoStats {
    pub requests: AtomicU64,
    /// Request body bytes received, all requests together.
    pub body_bytes: AtomicU64,
    /// The last requests that carried `x-gamma-nonce`: nonce, path, body bytes.
    nonces: std::sync::Mutex<std::collections::VecDeque<(String, String, usize)>>,
    flaky: AtomicU64,
}

/// Serves until the listener fails; spawn it.
pub async fn serve(listener: TcpListener, name: String, stats: Arc<EchoStats>) {
    serve_in(listener, name, String::new(), stats).await
}

/// As `serve`, as a pod of `namespace`, which each answer reports (as the upstream echo's
/// `Namespace=` line does: the conformance cases check it).
pub async fn serve_in(
    listener: TcpListener,
    name: String,
    namespace: String,
    stats: Arc<EchoStats>,
) {
    let name: Arc<str> = name.into();
    let namespace: Arc<str> = namespace.into();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (name, namespace) = (name.clone(), namespace.clone());
        let stats = stats.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let (name, namespace) = (name.clone(), namespace.clone());
                let stats = stats.clone();
                async move { Ok::<_, Infallible>(answer(&name, &namespace, &stats, request).await) }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn answer(
    name: &str,
    namespace: &str,
    stats: &EchoStats,
    mut request: Request<Incoming>,
) -> Response<Full<Bytes>> {
    stats.requests.fetch_add(1, Ordering::Relaxed);
    let path = request.uri().path().to_string();
    if request.headers().contains_key(header::UPGRADE) {
        let on_upgrade = hyper::upgrade::on(&mut request);
        tokio::spawn(async move {
            if let Ok(upgraded) = on_upgrade.await {
                let (mut r, mut w) = tokio::io::split(TokioIo::new(upgraded));
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        });
        let mut response = Response::new(Full::new(Bytes::new()));
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        response
            .headers_mut()
            .insert(header::CONNECTION, "upgrade".parse().unwrap());
        response
            .headers_mut()
            .insert(header::UPGRADE, request.headers()[header::UPGRADE].clone());
        return response;
    }
    if let Some(ms) = path.strip_prefix("/delay/").and_then(|ms| ms.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let mut status = path
        .strip_prefix("/status/")
        .and_then(|c| c.parse().ok())
        .and_then(|c| StatusCode::from_u16(c).ok())
        .unwrap_or(StatusCode::OK);
    // `/flaky/<n>`: only every n-th request (counted per server) succeeds; the others get 503.
    if let Some(n) = path
        .strip_prefix("/flaky/")
        .and_then(|n| n.parse::<u64>().ok())
        .filter(|n| *n > 0)
    {
        if stats.flaky.fetch_add(1, Ordering::Relaxed) % n != n - 1 {
            status = StatusCode::SERVICE_UNAVAILABLE;
        }
    }
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| request.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default();
    let headers: Vec<(String, String)> = request
        .headers()
        .iter()
        .map(|(n, v)| {
            (
                n.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let grpc = request
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|c| c.as_bytes().starts_with(b"application/grpc"));
    let info = json!({
        "pod": name,
        "namespace": namespace,
        "method": request.method().as_str(),
        "path": path,
        "query": request.uri().query(),
        "host": host,
        "protocol": format!("{:?}", request.version()),
        "headers": headers,
    });
    let nonce = request
        .headers()
        .get("x-gamma-nonce")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let (request_body, trailers) = match request.into_body().collect().await {
        Ok(collected) => {
            let trailers: Vec<(String, String)> = collected
                .trailers()
                .into_iter()
                .flatten()
                .map(|(n, v)| (n.to_string(), String::from_utf8_lossy(v.as_bytes()).into()))
                .collect();
            (collected.to_bytes().len(), trailers)
        }
        Err(_) => (0, Vec::new()),
    };
    stats
        .body_bytes
        .fetch_add(request_body as u64, Ordering::Relaxed);
    if let Some(nonce) = nonce {
        let mut nonces = stats.nonces.lock().unwrap();
        if nonces.len() == 64 {
            nonces.pop_front();
        }
        nonces.push_back((nonce, path.clone(), request_body));
    }
    let received = path.strip_prefix("/__received/").and_then(|wanted| {
        let nonces = stats.nonces.lock().unwrap();
        let (_, path, bytes) = nonces.iter().rev().find(|(n, _, _)| n == wanted)?;
        header::HeaderValue::from_str(&format!("{path} {bytes}")).ok()
    });
    let mut info = info;
    info["body_bytes"] = json!(request_body);
    info["trailers"] = json!(trailers);
    let body = serde_json::to_vec(&info).unwrap_or_default();
    let mut response = if grpc {
        // One length-prefixed gRPC message; status in the headers (trailers-only style is not
        // needed by the tests, which read `grpc-status` from headers or trailers alike).
        let mut framed = BytesMut::with_capacity(body.len() + 5);
        framed.put_u8(0);
        framed.put_u32(body.len() as u32);
        framed.put_slice(&body);
        let mut r = Response::new(Full::new(framed.freeze()));
        r.headers_mut()
            .insert(header::CONTENT_TYPE, "application/grpc".parse().unwrap());
        r.headers_mut().insert("grpc-status", "0".parse().unwrap());
        r
    } else if let Some(n) = path.strip_prefix("/bytes/").and_then(|n| n.parse().ok()) {
        // `/bytes/<n>`: a body of n bytes, for answers larger than a flow-control window.
        Response::new(Full::new(Bytes::from(vec![b'x'; n])))
    } else {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        r.headers_mut()
            .insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
        r
    };
    *response.status_mut() = status;
    if let Some(received) = received {
        response.headers_mut().insert("x-echo-received", received);
    }
    if let Some(cookie) = path
        .strip_prefix("/cookie/")
        .and_then(|c| header::HeaderValue::from_str(c).ok())
    {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    response.headers_mut().insert(
        "x-echo-pod",
        name.parse().unwrap_or_else(|_| "invalid".parse().unwrap()),
    );
    response
}
