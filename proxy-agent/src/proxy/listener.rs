//! Listeners: explicit (a named Service port) and redirect (connections steered by the kernel),
//! protocol detection, HTTP/1.1 and HTTP/2 serving, and draining on shutdown.

use super::{tcp, Caller, ConnectionInfo, Destination, Proxy};
use crate::model::ObjectKey;
use crate::routes::Snapshot;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

/// Signals shutdown to every connection and tracks them until they finish.
#[derive(Clone)]
pub struct Drain {
    signal: watch::Sender<bool>,
    tracker: TaskTracker,
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            signal: watch::channel(false).0,
            tracker: TaskTracker::new(),
        }
    }
}

impl Drain {
    fn watch(&self) -> watch::Receiver<bool> {
        self.signal.subscribe()
    }

    /// Stops accepting, asks connections to finish their in-flight requests, and waits for
    /// them up to `deadline`. Returns whether every connection finished in time.
    pub async fn drain(&self, deadline: Duration) -> bool {
        let _ = self.signal.send(true);
        self.tracker.close();
        tokio::time::timeout(deadline, self.tracker.wait())
            .await
            .is_ok()
    }
}

/// The facts of a redirected connection: where it was going and who sent it.
pub trait OriginalDestination: Send + Sync {
    fn resolve(&self, peer: SocketAddr, snapshot: &Snapshot) -> Option<(SocketAddr, Caller)>;
}

/// How an explicit listener's connections are treated.
#[derive(Clone, Debug)]
pub struct ExplicitTarget {
    pub service: ObjectKey,
    pub port: u16,
    /// Whose consumer routes apply (default: the Service's namespace, i.e. producer routes).
    pub caller_namespace: Option<String>,
}

pub async fn serve_explicit(
    proxy: Arc<Proxy>,
    listener: TcpListener,
    target: ExplicitTarget,
    drain: Drain,
) {
    let namespace = target
        .caller_namespace
        .clone()
        .unwrap_or_else(|| target.service.namespace.clone());
    accept_loop(proxy, listener, drain, move |peer, _| {
        Some(ConnectionInfo {
            destination: Destination::Service {
                service: target.service.clone(),
                port: target.port,
            },
            caller: Caller {
                ip: peer.ip(),
                namespace: Some(namespace.clone()),
                pod: None,
                identity: "explicit-listener",
            },
        })
    })
    .await
}

pub async fn serve_redirect(
    proxy: Arc<Proxy>,
    listener: TcpListener,
    redirects: Arc<dyn OriginalDestination>,
    drain: Drain,
) {
    accept_loop(proxy, listener, drain, move |peer, snapshot| {
        let resolved = redirects.resolve(peer, snapshot);
        if resolved.is_none() {
            tracing::warn!(%peer, "redirected connection without a redirect record; closing it");
        }
        resolved.map(|(original, caller)| ConnectionInfo {
            destination: Destination::Address(original),
            caller,
        })
    })
    .await
}

async fn accept_loop<F>(proxy: Arc<Proxy>, listener: TcpListener, drain: Drain, classify: F)
where
    F: Fn(SocketAddr, &Snapshot) -> Option<ConnectionInfo> + Send + Sync + 'static,
{
    let mut shutdown = drain.watch();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: wait a little rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let Some(info) = classify(peer, &proxy.snapshot.load()) else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        proxy
            .metrics
            .connections_accepted
            .fetch_add(1, Ordering::Relaxed);
        let proxy = proxy.clone();
        let shutdown = drain.watch();
        drain.tracker.spawn(async move {
            proxy
                .metrics
                .connections_open
                .fetch_add(1, Ordering::Relaxed);
            serve_connection(&proxy, stream, Arc::new(info), shutdown).await;
            proxy
                .metrics
                .connections_open
                .fetch_sub(1, Ordering::Relaxed);
        });
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    Opaque,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Classifies a connection from its first bytes; `None`: not enough bytes yet.
pub fn classify(bytes: &[u8]) -> Option<Protocol> {
    if bytes.starts_with(H2_PREFACE) {
        return Some(Protocol::Http2);
    }
    if H2_PREFACE.starts_with(bytes) && bytes.len() > 3 {
        return None; // "PRI " so far: wait for the whole preface
    }
    // HTTP/1: a method token (upper-case letters), then a space.
    let token_len = bytes.iter().take_while(|b| b.is_ascii_uppercase()).count();
    match bytes.get(token_len) {
        Some(b' ') if token_len > 0 => Some(Protocol::Http1),
        None if token_len < 16 => None,
        _ => Some(Protocol::Opaque),
    }
}

/// The connection's protocol; `None` when the peer closed (or failed) before sending a byte.
async fn detect(stream: &TcpStream, timeout: Duration) -> Option<Protocol> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = [0u8; 24];
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return None,
            Ok(Ok(n)) => n,
            // Nothing sent yet: a server-first protocol, handled as opaque TCP.
            Err(_) => return Some(Protocol::Opaque),
        };
        if let Some(p) = classify(&buf[..n]) {
            return Some(p);
        }
        // Peek returns the same bytes until more arrive; wait a little before looking again.
        if tokio::time::Instant::now() >= deadline {
            return Some(Protocol::Opaque);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn serve_connection(
    proxy: &Arc<Proxy>,
    stream: TcpStream,
    info: Arc<ConnectionInfo>,
    mut shutdown: watch::Receiver<bool>,
) {
    let Some(protocol) = detect(&stream, proxy.config.detect_timeout).await else {
        return;
    };
    let service = {
        let proxy = proxy.clone();
        let info = info.clone();
        service_fn(move |request| {
            let proxy = proxy.clone();
            let info = info.clone();
            async move { Ok::<_, Infallible>(proxy.handle(request, &info).await) }
        })
    };
    let io = TokioIo::new(stream);
    let result = match protocol {
        Protocol::Http1 => {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(proxy.config.header_read_timeout)
                .max_buf_size(64 * 1024)
                .serve_connection(io, service)
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => r,
                _ = shutdown.changed() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            }
        }
        Protocol::Http2 => {
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_concurrent_streams(1024)
                .max_header_list_size(64 * 1024)
                .serve_connection(io, service);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => r,
                _ = shutdown.changed() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            }
        }
        Protocol::Opaque => {
            let snapshot = proxy.snapshot.load_full();
            match proxy.frontend(&snapshot, &info.destination) {
                Some(frontend) => tcp::pass_through(proxy, io.into_inner(), &frontend).await,
                None => {
                    tracing::warn!(destination = ?info.destination, "opaque connection to an unknown frontend; closing it")
                }
            }
            return;
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, caller = %info.caller.ip, "connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_first_bytes() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"POST /x"), Some(Protocol::Http1));
        assert_eq!(
            classify(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
            Some(Protocol::Http2)
        );
        assert_eq!(classify(b"PRI * HT"), None);
        assert_eq!(classify(b"GE"), None);
        assert_eq!(
            classify(b"\x16\x03\x01"),
            Some(Protocol::Opaque),
            "TLS is opaque"
        );
        assert_eq!(classify(b"SSH-2.0-OpenSSH"), Some(Protocol::Opaque));
    }
}
