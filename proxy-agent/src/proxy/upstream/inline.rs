//! HTTP/1.1 exchanges the agent runs itself, for requests without a body (most of a mesh's
//! requests): the request's own task writes the head on a kept connection and reads the answer's
//! head, and the answer's body reads from that connection as the caller's side asks for it.
//! hyper's client runs each connection as a task of its own, reached per request through a
//! channel and a oneshot, and wakes between the two tasks for the head and every body read; here
//! nothing crosses tasks. Requests with a body (which may stream while the answer comes back) and
//! upgrades go through hyper's client (`Http1Pool`). The wire format is `wire.rs`.

use super::wire::{self, AnswerHead, BodyDecoder, Decoded, Framing};
use super::{connect_http, Kept, OwnedInFlight, Reusable, UpstreamError};
use crate::proxy::body::{self, BoxError, ProxyBody};
use bytes::{Bytes, BytesMut};
use http::{Method, Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt as _;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;

/// The first read's size, and the least room a read gets: hyper's client starts at the same.
const READ_SIZE: usize = 8 * 1024;

/// The largest read a long body grows to.
const MAX_READ_SIZE: usize = 64 * 1024;

/// The most room for a request head an idle kept connection holds (a longer head's is dropped).
const MAX_KEPT_HEAD_BUFFER: usize = 8 * 1024;

/// Whether `request` can go through the agent's own exchange: no body, no upgrade, not CONNECT.
pub fn handles(request: &Request<ProxyBody>) -> bool {
    handles_parts(request.method(), request.headers(), request.body())
}

/// [`handles`], for a request in parts.
pub fn handles_parts(method: &Method, headers: &http::HeaderMap, body: &ProxyBody) -> bool {
    body.is_end_stream()
        && method != Method::CONNECT
        && !headers.contains_key(http::header::UPGRADE)
}

/// A kept upstream connection with its buffers, reused for its whole life.
pub(super) struct Connection {
    stream: TcpStream,
    read: BytesMut,
    write: Vec<u8>,
    /// A long answer head grew `read` past two first reads (a body's reads are counted apart).
    head_grew: bool,
}

impl Reusable for Connection {
    /// Readable while idle: the upstream closed it (or sent what nobody asked for). Reads the
    /// readiness tokio already has: no system call unless it says readable.
    fn is_closed(&self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match self.stream.poll_read_ready(&mut cx) {
            Poll::Pending => false,
            Poll::Ready(Err(_)) => true,
            Poll::Ready(Ok(())) => {
                let mut byte = [0u8; 1];
                !matches!(self.stream.try_read(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }

    /// A connection is kept only once its answer was read to the end.
    fn is_ready(&self) -> bool {
        true
    }
}

/// An exchange that got no answer; `stale`: the connection failed before any byte came back (an
/// informational answer counts), as a kept one the upstream closed while idle does.
struct Failed {
    error: String,
    stale: bool,
}

impl Connection {
    async fn connect(endpoint: SocketAddr, timeout: Duration) -> Result<Self, UpstreamError> {
        Ok(Connection {
            stream: connect_http(endpoint, timeout).await?,
            read: BytesMut::with_capacity(READ_SIZE),
            write: Vec::with_capacity(512),
            head_grew: false,
        })
    }

    /// Sends the head in `write` and reads the answer's head.
    async fn exchange(&mut self, to_head: bool) -> Result<AnswerHead, Failed> {
        let mut received = false;
        let failed = |error: String, received: bool| Failed {
            error,
            stale: !received,
        };
        if let Err(e) = self.stream.write_all(&self.write).await {
            return Err(failed(e.to_string(), received));
        }
        // Bytes of `read` known to hold no head's end.
        let mut searched: usize = 0;
        loop {
            // Parsed on its first bytes (an upstream that does not speak HTTP fails at once), then
            // once its end may have come (or it is too long to come): a head that drips in,
            // parsed whole at each read, would cost the square of its length.
            let may_end = wire::head_ends(&self.read[searched.saturating_sub(2)..]);
            if searched == 0 || may_end || self.read.len() > wire::MAX_HEAD {
                match wire::answer_head(&mut self.read, to_head) {
                    Ok(Some(head)) => return Ok(head),
                    Ok(None) => {}
                    // Only bytes that came can be malformed: never stale.
                    Err(e) => return Err(failed(e.to_string(), received)),
                }
            }
            // What is left (after an informational answer, split off) holds no end either.
            searched = self.read.len();
            self.read.reserve(READ_SIZE);
            match tokio::io::AsyncReadExt::read_buf(&mut self.stream, &mut self.read).await {
                Ok(0) => return Err(failed(wire::WireError::ClosedEarly.to_string(), received)),
                Ok(_) => received = true,
                Err(e) => return Err(failed(e.to_string(), received)),
            }
            self.head_grew |= self.read.len() > 2 * READ_SIZE;
        }
    }
}

/// The agent's own HTTP/1.1 connections, per endpoint (one pool per data-plane worker).
#[derive(Clone)]
pub struct InlinePool {
    kept: Kept<Connection>,
    connect_timeout: Duration,
}

impl InlinePool {
    pub fn new(connect_timeout: Duration, idle_timeout: Duration) -> Self {
        InlinePool {
            kept: Kept::new(idle_timeout),
            connect_timeout,
        }
    }

    /// Sends `request` (origin form, with its Host; no body: see [`handles`]) on a kept
    /// connection to `endpoint`, else on a new one.
    pub async fn send(
        &self,
        endpoint: SocketAddr,
        request: Request<ProxyBody>,
        load: Option<OwnedInFlight>,
    ) -> Result<Response<ProxyBody>, UpstreamError> {
        let (parts, _) = request.into_parts();
        self.send_head(endpoint, &parts, None, load, &mut 1).await
    }

    /// Sends the request `parts` describe, without a body, as an HTTP/1.1 upstream gets it (see
    /// `wire::request_head`; `host` when `parts` has none), on a kept connection to `endpoint`,
    /// else on a new one. Nothing of `parts` is copied. An idempotent request that a kept
    /// connection failed before any byte of answer (the upstream closed it while idle, and the
    /// runtime had not seen that yet) goes again once, on a new connection (RFC 9112 §9.3.1), if
    /// `resends` allows one (taken from it): a route's retry policy counts it among its attempts,
    /// so that an upstream that closes on the request itself gets it no more often than the
    /// policy says. The answer's body holds `load` until it is dropped (see `Upstream::send`).
    pub async fn send_head(
        &self,
        endpoint: SocketAddr,
        parts: &http::request::Parts,
        host: Option<&str>,
        load: Option<OwnedInFlight>,
        resends: &mut u32,
    ) -> Result<Response<ProxyBody>, UpstreamError> {
        let target = parts.uri.path_and_query();
        let to_head = parts.method == Method::HEAD;
        let connect = || Connection::connect(endpoint, self.connect_timeout);
        let mut again = false;
        loop {
            let (mut conn, kept) = match again {
                false => self.kept.checkout_or(endpoint, connect).await?,
                // Boxed as a first connection is.
                true => (Box::pin(connect()).await?, false),
            };
            let headers = &parts.headers;
            let target = (wire::absolute_origin(parts), target);
            wire::request_head(&parts.method, target, headers, host, &mut conn.write);
            match conn.exchange(to_head).await {
                Ok(head) => return Ok(self.answer(endpoint, conn, head, load)),
                Err(f) if f.stale && kept && parts.method.is_idempotent() && *resends > 0 => {
                    *resends -= 1;
                    again = true;
                }
                Err(f) => return Err(UpstreamError::Failed(f.error)),
            }
        }
    }

    fn answer(
        &self,
        endpoint: SocketAddr,
        conn: Connection,
        head: AnswerHead,
        load: Option<OwnedInFlight>,
    ) -> Response<ProxyBody> {
        let mut response = Response::new(body::empty());
        *response.status_mut() = head.status;
        *response.version_mut() = head.version;
        *response.headers_mut() = head.headers;
        if let Some(reason) = head
            .reason
            .and_then(|r| hyper::ext::ReasonPhrase::try_from(r).ok())
        {
            // hyper's server writes it instead of the usual phrase, as with hyper's client.
            response.extensions_mut().insert(reason);
        }
        let mut answer = AnswerBody {
            conn: Some(conn),
            decoder: BodyDecoder::new(head.framing),
            reusable: head.reusable,
            read_size: READ_SIZE,
            pool: self.kept.clone(),
            endpoint,
            error: None,
            _load: load,
        };
        if head.framing == Framing::Empty {
            answer.finish();
        } else {
            *response.body_mut() = answer.boxed_unsync();
        }
        response
    }
}

/// An answer's body, read from its connection as the caller's side polls it; the connection goes
/// back to its pool as soon as the body's last byte is read (or is closed, if it cannot be
/// reused, or the body is dropped before its end).
///
/// An error (the upstream closed midway, a malformed chunk) is reported one poll late: hyper's
/// server closes the caller's connection at a body error without writing what it holds, so the
/// body first yields once to let it flush the head and data already given. The caller then sees
/// the answer cut short, as with hyper's client (whose body errors arrive from another task),
/// not a connection closed before any answer, which would look like a request never handled.
struct AnswerBody {
    /// `None` once the body ended.
    conn: Option<Connection>,
    decoder: BodyDecoder,
    reusable: bool,
    /// Grows while reads fill it, up to [`MAX_READ_SIZE`].
    read_size: usize,
    pool: Kept<Connection>,
    endpoint: SocketAddr,
    /// Reported at the next poll.
    error: Option<BoxError>,
    _load: Option<OwnedInFlight>,
}

impl AnswerBody {
    /// The body ended: the connection is kept if nothing is left on it.
    fn finish(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        if self.reusable && self.decoder.is_done() && conn.read.is_empty() {
            // A long body or answer head grew the read buffer, a long request head the head's:
            // an idle connection does not keep them. The read buffer's allocation is told by the
            // reads' size and the head's length, not by its capacity, which is only what is left
            // past the bytes the answer took (they keep the allocation, which the next read
            // takes back once the caller dropped them). Answers of a few reads keep theirs: they
            // would allocate it again at each exchange.
            let grown = self.read_size >= 4 * READ_SIZE || conn.head_grew;
            if grown || conn.read.capacity() > 2 * READ_SIZE {
                conn.read = BytesMut::new();
                conn.head_grew = false;
            }
            if conn.write.capacity() > MAX_KEPT_HEAD_BUFFER {
                conn.write = Vec::new();
            }
            self.pool.checkin(self.endpoint, conn);
        }
    }

    fn failed(
        &mut self,
        error: impl Into<BoxError>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.conn = None;
        self.error = Some(error.into());
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl Body for AnswerBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(error) = this.error.take() {
            return Poll::Ready(Some(Err(error)));
        }
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            let frame = match this.decoder.decode(&mut conn.read) {
                Err(e) => return this.failed(e, cx),
                Ok(None) => None,
                Ok(Some(Decoded::Data(data))) => Some(Frame::data(data)),
                Ok(Some(Decoded::Trailers(trailers))) => Some(Frame::trailers(trailers)),
                Ok(Some(Decoded::End)) => {
                    this.finish();
                    return Poll::Ready(None);
                }
            };
            if let Some(frame) = frame {
                if this.decoder.is_done() {
                    this.finish();
                }
                return Poll::Ready(Some(Ok(frame)));
            }
            conn.read.reserve(this.read_size);
            let room = conn.read.capacity() - conn.read.len();
            let read = ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut conn.stream),
                cx,
                &mut conn.read
            ));
            match read {
                Ok(0) => {
                    if let Err(e) = this.decoder.closed() {
                        return this.failed(e, cx);
                    }
                    // Delimited by the close: the connection is done with.
                    this.conn = None;
                    return Poll::Ready(None);
                }
                Ok(n) if n == room => this.read_size = (this.read_size * 2).min(MAX_READ_SIZE),
                Ok(_) => {}
                Err(e) => return this.failed(e, cx),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.error.is_none() && (self.conn.is_none() || self.decoder.is_done())
    }

    fn size_hint(&self) -> SizeHint {
        match self.decoder.remaining() {
            Some(exact) => SizeHint::with_exact(exact),
            None => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_server::answering;
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    fn pool() -> InlinePool {
        InlinePool::new(Duration::from_secs(1), Duration::from_secs(90))
    }

    fn request(method: Method) -> Request<ProxyBody> {
        let mut request = Request::new(body::empty());
        *request.method_mut() = method;
        *request.uri_mut() = "/x".parse().unwrap();
        request
            .headers_mut()
            .insert(http::header::HOST, http::HeaderValue::from_static("svc"));
        request
    }

    /// The answer's status, data and trailers.
    async fn exchange(
        pool: &InlinePool,
        endpoint: SocketAddr,
        method: Method,
    ) -> (u16, Vec<u8>, Option<http::HeaderMap>) {
        let response = pool
            .send(endpoint, request(method), None)
            .await
            .expect("an answer");
        let status = response.status().as_u16();
        let collected = response.into_body().collect().await.expect("a whole body");
        let trailers = collected.trailers().cloned();
        (status, collected.to_bytes().to_vec(), trailers)
    }

    #[tokio::test]
    async fn a_connection_is_reused_once_its_answer_was_read() {
        let (endpoint, accepted, _) =
            answering(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", false).await;
        let pool = pool();
        for _ in 0..3 {
            assert_eq!(
                exchange(&pool, endpoint, Method::GET).await,
                (200, b"ok".to_vec(), None)
            );
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        // A HEAD's answer has no body, whatever its Content-Length says.
        assert_eq!(exchange(&pool, endpoint, Method::HEAD).await.1, b"");
        assert_eq!(exchange(&pool, endpoint, Method::GET).await.1, b"ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_requests_open_no_more_connections_than_they_are() {
        let (endpoint, accepted, _) =
            answering(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", false).await;
        let pool = pool();
        for round in 0..3 {
            let tasks: Vec<_> = (0..64)
                .map(|_| {
                    let pool = pool.clone();
                    tokio::spawn(async move { exchange(&pool, endpoint, Method::GET).await.1 })
                })
                .collect();
            for task in tasks {
                assert_eq!(task.await.unwrap(), b"ok");
            }
            let opened = accepted.load(Ordering::SeqCst);
            assert!(
                opened <= 64,
                "round {round}: {opened} connections for 64 at a time"
            );
        }
    }

    #[tokio::test]
    async fn chunked_answers_keep_their_trailers_and_their_connection() {
        let answer = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\ngrpc-status: 0\r\n\r\n";
        let (endpoint, accepted, _) = answering(answer, false).await;
        let pool = pool();
        for _ in 0..2 {
            let (status, data, trailers) = exchange(&pool, endpoint, Method::GET).await;
            assert_eq!((status, &data[..]), (200, &b"abcde"[..]));
            assert_eq!(trailers.expect("trailers")["grpc-status"], "0");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn an_answer_delimited_by_the_close_ends_its_connection() {
        let (endpoint, accepted, _) = answering(b"HTTP/1.1 200 OK\r\n\r\nall of it", true).await;
        let pool = pool();
        for _ in 0..2 {
            assert_eq!(exchange(&pool, endpoint, Method::GET).await.1, b"all of it");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    /// An answer with a long body or a long head, or a long request head, leaves no grown buffer
    /// on the idle connection the pool keeps (a 1 MB answer left 64 KiB or more on it).
    #[tokio::test]
    async fn an_idle_connection_keeps_no_buffer_a_long_exchange_grew() {
        let long_body = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{}",
            1 << 20,
            "b".repeat(1 << 20)
        );
        let long_head = format!(
            "HTTP/1.1 200 OK\r\nx-long: {}\r\ncontent-length: 2\r\n\r\nok",
            "h".repeat(20 * 1024)
        );
        let short = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_string();
        // The answer, whether the request's head is long, and which buffers are dropped (a short
        // answer's read buffer is kept: dropped, it would be allocated again at each exchange).
        let cases = [
            (long_body, false, (true, false)),
            (long_head, false, (true, false)),
            (short, true, (false, true)),
        ];
        for (answer, long_request, dropped) in cases {
            let answer: &'static [u8] = Box::leak(answer.into_bytes().into_boxed_slice());
            let (endpoint, _, _) = answering(answer, false).await;
            let pool = pool();
            let mut request = request(Method::GET);
            if long_request {
                let long = http::HeaderValue::from_str(&"r".repeat(20 * 1024)).unwrap();
                request.headers_mut().insert("x-long", long);
            }
            let response = pool.send(endpoint, request, None).await.expect("an answer");
            let body = response.into_body().collect().await.expect("a whole body");
            drop(body);
            let kept = pool.kept.checkout(endpoint).expect("the connection kept");
            let held = (kept.read.capacity(), kept.write.capacity());
            assert_eq!((held.0 == 0, held.1 == 0), dropped, "room held: {held:?}");
        }
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_while_idle_is_not_used() {
        // The upstream closes after each answer, without saying so.
        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        let (endpoint, accepted, _) = answering(answer, true).await;
        let pool = pool();
        // POSTs, which are never sent again: one sent on a connection seen closed would fail.
        for _ in 0..3 {
            assert_eq!(exchange(&pool, endpoint, Method::POST).await.1, b"ok");
            // Let the runtime see the close.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
        // Not yet seen closed: a GET goes again on a new connection.
        assert_eq!(exchange(&pool, endpoint, Method::GET).await.1, b"ok");
        assert_eq!(exchange(&pool, endpoint, Method::GET).await.1, b"ok");
    }

    /// An upstream that reads a request and closes without answering gets an idempotent request
    /// twice at most: once on a kept connection, once on a new one.
    #[tokio::test]
    async fn a_request_an_upstream_closes_on_goes_again_once() {
        use tokio::io::AsyncReadExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = listener.local_addr().unwrap();
        let received = Arc::new(AtomicUsize::new(0));
        let answering = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (count, answer) = (received.clone(), answering.clone());
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let (count, answer) = (count.clone(), answer.clone());
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(1..) = stream.read(&mut buf).await {
                        count.fetch_add(1, Ordering::SeqCst);
                        if !answer.load(Ordering::SeqCst) {
                            return;
                        }
                        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if stream.write_all(ok).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let pool = pool();
        // Three kept connections.
        let gets = (0..3).map(|_| exchange(&pool, endpoint, Method::GET));
        futures::future::join_all(gets).await;
        answering.store(false, Ordering::SeqCst);
        let before = received.load(Ordering::SeqCst);
        let failed = pool.send(endpoint, request(Method::GET), None).await;
        assert!(
            matches!(failed, Err(UpstreamError::Failed(_))),
            "no answer: a failure"
        );
        assert_eq!(
            received.load(Ordering::SeqCst) - before,
            2,
            "sent twice, not more"
        );
        let before = received.load(Ordering::SeqCst);
        assert!(pool
            .send(endpoint, request(Method::POST), None)
            .await
            .is_err());
        assert_eq!(
            received.load(Ordering::SeqCst) - before,
            1,
            "a POST is not sent again"
        );
    }

    #[tokio::test]
    async fn a_body_cut_short_is_an_error_and_its_connection_is_not_kept() {
        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort";
        let (endpoint, accepted, _) = answering(answer, true).await;
        let pool = pool();
        for round in 1..=2 {
            let response = pool
                .send(endpoint, request(Method::GET), None)
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            let error = response.into_body().collect().await.unwrap_err();
            assert!(error.to_string().contains("closed"), "{error}");
            assert_eq!(accepted.load(Ordering::SeqCst), round);
        }
        let malformed = b"HTTP/1.1 200 OK\r\ncontent-length: 1, 2\r\n\r\n";
        let (endpoint, _, _) = answering(malformed, false).await;
        let Err(UpstreamError::Failed(error)) =
            pool.send(endpoint, request(Method::GET), None).await
        else {
            panic!("a malformed answer is a failed exchange");
        };
        assert!(error.contains("Content-Length"), "{error}");
    }
}
