//! Listeners: explicit (a named Service port) and redirect (connections steered by the kernel),
//! protocol detection, HTTP/1.1 and HTTP/2 serving, and draining on shutdown.
//!
//! Draining (shutdown, or a successor took over: `crate::handover`) closes connections the way
//! clients expect, so that they reconnect instead of seeing a failure or a reset:
//! - HTTP/1.1: every answer from then on says `Connection: close`; a keep-alive connection idle for
//!   [`DRAIN_IDLE_GRACE`] is closed, not before (a client may be sending a request on it right as it
//!   closes); HTTP/2: GOAWAY, in-flight streams finish;
//! - a connection the agent closes is shut down for writing first and read until the client closes
//!   its side ([`LINGER`] at most): closing a socket with unread bytes would send a reset.
//!
//! Opaque TCP has no way to say "reconnect": it runs until it ends or the drain deadline.

use super::{tcp, Caller, ConnectionInfo, Destination, Proxy};
use gamma_engine::model::ObjectKey;
use gamma_engine::routes::Snapshot;
use http::header::{HeaderValue, CONNECTION};
use http::{Method, StatusCode};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

/// While draining, an HTTP/1.1 keep-alive connection is closed once it has moved no byte for this
/// long. Long enough that a client sending back to back always gets its next answer (with
/// `Connection: close`) instead; short enough that pooled idle connections let the agent go soon.
pub const DRAIN_IDLE_GRACE: Duration = Duration::from_secs(1);
/// How long a connection the agent closed is read after its FIN before it is closed for good.
pub const LINGER: Duration = Duration::from_secs(2);

/// Stops the accept loops, signals draining to every connection and tracks them until they finish.
#[derive(Clone)]
pub struct Drain {
    /// True: accept loops return (and close their listeners).
    stop_accepting: watch::Sender<bool>,
    /// True: connections finish their in-flight requests and close.
    draining: watch::Sender<bool>,
    acceptors: TaskTracker,
    tracker: TaskTracker,
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            stop_accepting: watch::channel(false).0,
            draining: watch::channel(false).0,
            acceptors: TaskTracker::new(),
            tracker: TaskTracker::new(),
        }
    }
}

impl Drain {
    fn watch(&self) -> watch::Receiver<bool> {
        self.draining.subscribe()
    }

    /// Stops every accept loop and waits until each has returned: afterwards this process
    /// accepts nothing more (a successor may go on accepting on the same sockets).
    pub async fn stop_accepting(&self) {
        let _ = self.stop_accepting.send(true);
        self.acceptors.close();
        self.acceptors.wait().await;
    }

    /// Stops accepting, asks connections to finish their in-flight requests, and waits for
    /// them up to `deadline`. Returns whether every connection finished in time.
    pub async fn drain(&self, deadline: Duration) -> bool {
        self.stop_accepting().await;
        let _ = self.draining.send(true);
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
    // Held while this loop runs: `Drain::stop_accepting` waits for it.
    let _running = drain.acceptors.token();
    let mut stop = drain.stop_accepting.subscribe();
    loop {
        let (stream, peer) = tokio::select! {
            // First, and from the current value: once stopped, not one more accept.
            biased;
            () = turned_true(&mut stop) => return,
            accepted = async {
                if let Some(load) = &proxy.load {
                    load.my_turn().await;
                }
                listener.accept().await
            } => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: wait a little rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
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
        let tracker = drain.tracker.clone();
        let opened = proxy.load.as_ref().map(|load| load.opened());
        drain.tracker.spawn(async move {
            let _opened = opened;
            proxy
                .metrics
                .connections_open
                .fetch_add(1, Ordering::Relaxed);
            let stream = Lingering::new(stream, shutdown.clone(), tracker);
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
    stream: Lingering,
    info: Arc<ConnectionInfo>,
    shutdown: watch::Receiver<bool>,
) {
    let Some(protocol) = detect(stream.tcp(), proxy.config.detect_timeout).await else {
        return;
    };
    if protocol == Protocol::Opaque {
        let snapshot = proxy.snapshot.load_full();
        match proxy.frontend(&snapshot, &info.destination) {
            Some(frontend) => tcp::pass_through(proxy, stream.into_inner(), &frontend).await,
            None => {
                tracing::warn!(destination = ?info.destination, "opaque connection to an unknown frontend; closing it")
            }
        }
        return;
    }
    let caller = info.caller.ip;
    let http2 = protocol == Protocol::Http2;
    if let Err(e) = serve_http(proxy, TokioIo::new(stream), http2, info, shutdown).await {
        tracing::debug!(error = %e, %caller, "connection ended with an error");
    }
}

/// Serves HTTP/1.1 (with upgrades) or HTTP/2 on a connection whose protocol is known, until the
/// client is done or `shutdown` turns true (then in-flight requests finish). Generic over the
/// transport so that the fuzz target drives this very server over an in-memory pipe.
pub async fn serve_http<I>(
    proxy: &Arc<Proxy>,
    io: I,
    http2: bool,
    info: Arc<ConnectionInfo>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), hyper::Error>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let config = &proxy.config;
    // While draining, HTTP/1 answers say `Connection: close`, so the client sends its next request
    // on a new connection (to a successor, on a restart) instead of racing our close. HTTP/2 has
    // GOAWAY for that, and forbids the header.
    let closing = (!http2).then(|| shutdown.clone());
    let service = {
        let proxy = proxy.clone();
        service_fn(move |request| {
            let proxy = proxy.clone();
            let info = info.clone();
            let closing = closing.clone();
            async move {
                let tunnel = request.method() == Method::CONNECT;
                let mut response = proxy.handle(request, &info).await;
                let upgraded = tunnel || response.status() == StatusCode::SWITCHING_PROTOCOLS;
                if !upgraded && closing.is_some_and(|draining| *draining.borrow()) {
                    response
                        .headers_mut()
                        .insert(CONNECTION, HeaderValue::from_static("close"));
                }
                Ok::<_, Infallible>(response)
            }
        })
    };
    let moves = Arc::new(AtomicU64::new(0));
    let io = Watched {
        io,
        moves: moves.clone(),
    };
    if !http2 {
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(config.header_read_timeout)
            // hyper asserts a buffer of at least 8 KiB.
            .max_buf_size(config.max_header_bytes.max(8192))
            .max_headers(config.max_headers)
            .serve_connection(io, service)
            .with_upgrades();
        tokio::pin!(conn);
        return tokio::select! {
            r = conn.as_mut() => r,
            () = turned_true(&mut shutdown) => {
                // Answers say `Connection: close` now (above). An idle connection closes only
                // after a quiet spell; one with a request in flight gets keep-alive off at once
                // (its answer then says close, if not yet sent).
                tokio::select! {
                    r = conn.as_mut() => r,
                    () = quiet(&moves, DRAIN_IDLE_GRACE) => {
                        conn.as_mut().graceful_shutdown();
                        conn.await
                    }
                }
            }
        };
    }
    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .max_concurrent_streams(config.h2_max_concurrent_streams)
        .max_header_list_size(u32::try_from(config.max_header_bytes).unwrap_or(u32::MAX))
        .max_pending_accept_reset_streams(config.h2_max_pending_accept_reset_streams)
        .max_local_error_reset_streams(config.h2_max_local_error_reset_streams)
        .serve_connection(io, service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => r,
        () = turned_true(&mut shutdown) => {
            // GOAWAY: streams already started finish, the client opens new ones elsewhere.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    }
}

/// Returns once the flag is true (at once if it is already), or its sender is gone.
async fn turned_true(flag: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns must not live across an await (it is not Send).
    let _ = flag.wait_for(|set| *set).await.map(drop);
}

/// Returns once `moves` has not changed for `grace`.
async fn quiet(moves: &AtomicU64, grace: Duration) {
    loop {
        let seen = moves.load(Ordering::Relaxed);
        tokio::time::sleep(grace).await;
        if moves.load(Ordering::Relaxed) == seen {
            return;
        }
    }
}

/// A served connection's transport, counting the reads and writes that moved bytes (see
/// [`quiet`]).
struct Watched<I> {
    io: I,
    moves: Arc<AtomicU64>,
}

impl<I> Watched<I> {
    fn moved(&self, bytes: usize) {
        if bytes > 0 {
            self.moves.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl<I: hyper::rt::Read + Unpin> hyper::rt::Read for Watched<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        // SAFETY: `inner` views the unfilled part of `buf`; the transport fills a prefix of it
        // with initialised bytes and reports how many, and exactly those are marked filled.
        let n = unsafe {
            let mut inner = hyper::rt::ReadBuf::uninit(buf.as_mut());
            ready!(Pin::new(&mut self.io).poll_read(cx, inner.unfilled()))?;
            inner.filled().len()
        };
        // SAFETY: `n` bytes were just filled.
        unsafe { buf.advance(n) };
        self.moved(n);
        Poll::Ready(Ok(()))
    }
}

impl<I: hyper::rt::Write + Unpin> hyper::rt::Write for Watched<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let n = ready!(Pin::new(&mut self.io).poll_write(cx, buf))?;
        self.moved(n);
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let n = ready!(Pin::new(&mut self.io).poll_write_vectored(cx, bufs))?;
        self.moved(n);
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// An accepted connection that, dropped while draining, is not closed at once: it is shut down
/// for writing and read until the client closes its side (at most [`LINGER`]). A request the
/// client sent as the agent closed would otherwise be unread data, and closing a socket with
/// unread data sends a reset instead of a FIN.
struct Lingering {
    stream: Option<TcpStream>,
    draining: watch::Receiver<bool>,
    tracker: TaskTracker,
}

impl Lingering {
    fn new(stream: TcpStream, draining: watch::Receiver<bool>, tracker: TaskTracker) -> Self {
        Self {
            stream: Some(stream),
            draining,
            tracker,
        }
    }

    fn tcp(&self) -> &TcpStream {
        self.stream.as_ref().expect("present until dropped")
    }

    fn tcp_mut(&mut self) -> Pin<&mut TcpStream> {
        Pin::new(self.stream.as_mut().expect("present until dropped"))
    }

    /// The plain stream, for opaque TCP (which cannot drain gracefully anyway).
    fn into_inner(mut self) -> TcpStream {
        self.stream.take().expect("present until dropped")
    }
}

impl Drop for Lingering {
    fn drop(&mut self) {
        let Some(mut stream) = self.stream.take() else {
            return;
        };
        if !*self.draining.borrow() {
            return;
        }
        self.tracker.spawn(async move {
            let _ = stream.shutdown().await;
            let mut sink = [0u8; 4096];
            let _ = tokio::time::timeout(LINGER, async {
                while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
            })
            .await;
        });
    }
}

impl AsyncRead for Lingering {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.tcp_mut().poll_read(cx, buf)
    }
}

impl AsyncWrite for Lingering {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.tcp_mut().poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.tcp_mut().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp().is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.tcp_mut().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.tcp_mut().poll_shutdown(cx)
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
