//! The agent's own HTTP/1.1 server, for the requests most calls are: a head without a body or
//! with a small one of a known length, answered on a kept-alive connection. It reads requests
//! into one buffer per connection, handles each in the connection's own task, and writes the
//! answer's head with its first bytes (one write for a small answer).
//!
//! Everything else goes to hyper's server with the rest of the connection, at the start of the
//! request that needs it (the bytes read so far given back to the transport first): a request
//! with a chunked, larger or slow body, an upgrade or CONNECT, `Expect`, HTTP/1.0, a head that is
//! malformed, oversized or has many fields. hyper's handling and refusals of those stay as they
//! were.
//!
//! Why: below hyper's server there is 1.6 µs of user time and 1.7 µs of kernel time per
//! keep-alive request (`bench peers`: the hyper floor against the codec floor); hyper's
//! dispatcher, its buffers and timer are also most of what a new connection costs beyond ours.

use super::wire::{self, BodySize, Framing, Head, OwnRequest};
use super::LazyTimer;
use crate::proxy::body::{CallerBody, ProxyBody};
use crate::proxy::drain::{turned_true_polled_when_woken, DRAIN_IDLE_GRACE};
use crate::proxy::header_maps;
use crate::proxy::io::{ClosingWrite, ReadAhead};
use crate::proxy::{ConnectionInfo, Proxy};
use bytes::{Buf, Bytes};
use futures::FutureExt as _;
use http::header::{HeaderValue, CONNECTION};
use http::{HeaderMap, Method, Response};
use http_body::Body as _;
use http_body_util::BodyExt as _;
use hyper_util::rt::TokioIo;
use std::io::{self, IoSlice};
use std::sync::Arc;
use tokio::io::{AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::sync::watch;
use tokio::time::Instant;

/// A connection's one timer: for its heads, then for a request that runs long.
type HeadTimer<'t> = LazyTimer<&'t mut tokio::time::Sleep>;

/// Room made in the read buffer before each read: a usual request head at once.
const READ_SIZE: usize = 8192;

/// The largest head the agent reads itself: hyper's server's first read. A longer one goes to
/// hyper's server, whose refusal (414 or 431) depends on how the head came in its reads: it
/// gets it as it would have.
const OWN_HEAD: usize = 8192;

/// A connection's read buffer, given back to its worker's spares when the connection ends.
struct KeptBuffer(bytes::BytesMut);

impl Drop for KeptBuffer {
    fn drop(&mut self) {
        crate::proxy::io::give_back_read_buffer(std::mem::take(&mut self.0));
    }
}

/// Serves HTTP/1.1 on `stream` until the client is done, the connection must close, or
/// `shutdown` turns true (an idle connection then closes after [`DRAIN_IDLE_GRACE`]; the answer
/// in flight says `Connection: close`).
pub async fn serve<T: ReadAhead>(
    proxy: &Arc<Proxy>,
    mut stream: T,
    info: Arc<ConnectionInfo>,
    shutdown: watch::Receiver<bool>,
) {
    let config = &proxy.config;
    // Kept for the worker's next connection when this one ends (unless hyper's server took it).
    let mut kept = KeptBuffer(stream.take_unread());
    let buf = &mut kept.0;
    let mut out = Vec::with_capacity(512);
    let mut head_search = wire::HeadSearch::default();
    // A body read whole is a body buffered: no more than the agent buffers for a retry.
    let max_body = wire::OWN_BODY.min(config.max_buffered_body as u64);
    // One wait for the drain signal and one timer for the whole connection.
    let mut drain_flag = shutdown.clone();
    let drained = turned_true_polled_when_woken(&mut drain_flag);
    tokio::pin!(drained);
    let mut draining = false;
    let head_timer = tokio::time::sleep(config.header_read_timeout);
    tokio::pin!(head_timer);
    let mut head_timer = LazyTimer::new(head_timer);
    loop {
        // hyper's server times a head from when it starts waiting for it, idle time included.
        let head_deadline = Instant::now() + config.header_read_timeout;
        // Set only once the head must be waited for: a head already read (a new connection's
        // first, as a rule) never enters the timer wheel, where an insert wakes the worker's
        // driver (a system call) when it is due before the driver's next wake.
        let mut timed = false;
        // While draining, a connection waiting for a head closes once no byte came for a spell
        // (as hyper's path: `serve::quiet`), at the head's deadline at the latest.
        let quiet_spell = |timer: &mut HeadTimer<'_>| {
            timer.reset(head_deadline.min(Instant::now() + DRAIN_IDLE_GRACE));
        };
        let own = loop {
            let mut awaiting_body = false;
            let heads = wire::request_head(
                buf,
                &mut head_search,
                OWN_HEAD,
                config.max_headers,
                max_body,
            );
            match heads {
                Head::Own(own) => break own,
                // hyper's server refuses it (431) from here.
                Head::Partial if buf.len() > config.max_header_bytes => {
                    return hand_over(proxy, stream, std::mem::take(buf), info, shutdown).await
                }
                Head::Partial => {}
                Head::AwaitingBody => awaiting_body = true,
                Head::Hyper => {
                    return hand_over(proxy, stream, std::mem::take(buf), info, shutdown).await
                }
            }
            if buf.capacity() - buf.len() < READ_SIZE / 8 {
                buf.reserve(READ_SIZE);
            }
            // Line ends between requests are allowed (RFC 9112 §2.2): still idle.
            let idle = buf.iter().all(|b| matches!(b, b'\r' | b'\n'));
            if !timed {
                head_timer.reset(head_deadline);
                timed = true;
            }
            tokio::select! {
                biased;
                read = stream.read_buf(buf) => match read {
                    // The client closed its side mid-body: hyper's server reads what came and
                    // answers as for any body that breaks off, and a client still reading sees
                    // why.
                    Ok(0) if awaiting_body => {
                        return hand_over(proxy, stream, std::mem::take(buf), info, shutdown).await
                    }
                    Ok(0) | Err(_) => return,
                    Ok(_) if draining => quiet_spell(&mut head_timer),
                    Ok(_) => {}
                },
                // A body slower than that goes through hyper's server (which does not time it),
                // as it would have.
                () = head_timer.elapsed() => if awaiting_body {
                    return hand_over(proxy, stream, std::mem::take(buf), info, shutdown).await;
                } else {
                    return;
                },
                // While draining, an idle connection gets a last spell for a request already on
                // its way; a head begun is waited for as usual.
                () = drained.as_mut(), if idle && !draining => {
                    draining = true;
                    quiet_spell(&mut head_timer);
                }
            }
        };
        let OwnRequest {
            request,
            close,
            trailers,
        } = own;
        let to_head = request.method() == Method::HEAD;
        // Boxed: the connection's task would otherwise be sized for a request in flight (about
        // 5 KiB) while it waits for the next.
        let handling = Box::pin(proxy.handle(request.map(CallerBody::Whole), &info, false));
        let watch = (config.header_read_timeout, config.max_header_bytes);
        let timer = &mut head_timer;
        let Some(response) = unless_caller_resets(&mut stream, buf, watch, timer, handling).await
        else {
            // Dropped: its log counts it 499, its upstream exchange ends.
            return;
        };
        let client_closes = close;
        let close = close || *shutdown.borrow();
        match write_answer(&mut stream, response, to_head, close, trailers, &mut out).await {
            Ok(true) => {}
            Ok(false) => {
                if !client_closes {
                    // The agent closes a connection its client meant to keep (the answer said
                    // close: a refused request): a next request it already sent would turn the
                    // close into a reset that can take this answer with it (RFC 9112 §9.6). Read
                    // on until its FIN, as hyper's server does.
                    stream.linger_on_close();
                }
                let _ = stream.shutdown().await;
                return;
            }
            Err(e) => {
                tracing::debug!(error = %e, caller = %info.caller.ip, "answer not written whole");
                return;
            }
        }
    }
}

/// Runs `handling` (a request whose body was read whole) and, once it has run for `after` (the
/// head read timeout: most requests are answered sooner), watches the caller's socket: bytes
/// sent meanwhile (a pipelined request) are kept in `buf`, up to `limit`; a FIN (a half-close)
/// leaves the answer due; a reset or an error gives up on the request (`None`), also one after a
/// FIN or a full `buf` (the connection's TCP state, looked at every second). Without it, a
/// caller that gave up on a backend that hangs left its request, and its connection, in flight
/// for as long as the backend took. `timer` is the connection's head timer, idle meanwhile: moved
/// later, as every request moves it, it is only noted (`LazyTimer`; a timer of its own per
/// request took the wheel's lock twice, and a system call when it was the worker's earliest).
async fn unless_caller_resets<T: ReadAhead, R>(
    stream: &mut T,
    buf: &mut bytes::BytesMut,
    (after, limit): (std::time::Duration, usize),
    timer: &mut HeadTimer<'_>,
    mut handling: std::pin::Pin<Box<impl std::future::Future<Output = R>>>,
) -> Option<R> {
    use std::task::Poll;
    let (mut armed, mut watching, mut half_closed) = (false, false, false);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(answer) = handling.as_mut().poll(cx) {
            return Poll::Ready(Some(answer));
        }
        if !armed {
            // Only once the request waits: one answered at once never touches the timer.
            timer.reset(Instant::now() + after);
            armed = true;
        }
        if !watching {
            if timer.poll_elapsed(cx).is_pending() {
                return Poll::Pending;
            }
            watching = true;
        }
        while !half_closed && buf.len() < limit {
            match tokio_util::io::poll_read_buf(std::pin::Pin::new(&mut *stream), cx, buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => half_closed = true,
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(_)) => return Poll::Ready(None),
            }
        }
        // Nothing more is read: whether the caller reset since is its connection's TCP state.
        match stream.raw_socket() {
            Some(socket) => super::poll_caller_reset(timer, socket, cx).map(|()| None),
            None => Poll::Pending,
        }
    })
    .await
}

/// Gives hyper's server the rest of the connection, the bytes read and not used first.
async fn hand_over<T: ReadAhead>(
    proxy: &Arc<Proxy>,
    mut stream: T,
    unread: bytes::BytesMut,
    info: Arc<ConnectionInfo>,
    shutdown: watch::Receiver<bool>,
) {
    stream.give_back(unread);
    // hyper may answer a request before reading its body, then close (RFC 9112 §9.6).
    stream.linger_on_close();
    let caller_socket = stream.raw_socket();
    let caller = info.caller.ip;
    // Boxed: hyper's connection would otherwise size every connection's task.
    let served = Box::pin(super::serve_http(
        proxy,
        TokioIo::new(stream),
        false,
        info,
        shutdown,
        caller_socket,
    ));
    if let Err(e) = served.await {
        tracing::debug!(error = %e, %caller, "connection ended with an error");
    }
}

/// Writes `response` as the answer to a request (a HEAD: `to_head`); `close`: the connection
/// closes after it. Returns whether the connection may carry another request.
async fn write_answer<W: ClosingWrite>(
    stream: &mut W,
    response: Response<ProxyBody>,
    to_head: bool,
    close: bool,
    trailers_taken: bool,
    out: &mut Vec<u8>,
) -> io::Result<bool> {
    let (mut parts, body) = response.into_parts();
    if close {
        // As hyper's server says it: one more value of the answer's Connection field.
        if !wire::has_token(&parts.headers, &CONNECTION, "close") {
            parts
                .headers
                .append(CONNECTION, HeaderValue::from_static("close"));
        }
    }
    let size = if body.is_end_stream() {
        BodySize::Empty
    } else {
        body.size_hint()
            .exact()
            .map_or(BodySize::Unknown, BodySize::Exact)
    };
    let reason = parts
        .extensions
        .get::<hyper::ext::ReasonPhrase>()
        .map(|r| r.as_bytes());
    out.clear();
    let (framing, said_close) = wire::answer_head(
        parts.status,
        reason,
        &parts.headers,
        to_head,
        size,
        wire::write_date_now,
        out,
    );
    let close = close || said_close;
    // Given back now, emptied: its values may hold the upstream's read buffer, which an idle
    // connection must not keep.
    header_maps::give_back(parts.headers);
    let whole = match framing {
        Framing::Length(0) => {
            if close {
                stream.last_write_before_shutdown();
            }
            stream.write_all(out).await?;
            true
        }
        Framing::Length(length) => send_length(stream, body, length, out, close).await?,
        Framing::Chunked { trailers } => {
            let allowed = trailers.filter(|_| trailers_taken);
            send_chunked(stream, body, allowed.as_deref(), out, close).await?
        }
    };
    Ok(whole && !close)
}

/// The next frame of `body`; while `head` still holds the unsent answer head, a frame not ready
/// at once sends the head first (the client sees the answer begin while its body is slow).
async fn next_frame<W: AsyncWrite + Unpin>(
    stream: &mut W,
    body: &mut ProxyBody,
    head: &mut Vec<u8>,
) -> io::Result<Option<Result<http_body::Frame<Bytes>, ()>>> {
    if !head.is_empty() {
        if let Some(frame) = body.frame().now_or_never() {
            return Ok(frame.map(|f| f.map_err(drop)));
        }
        stream.write_all(head).await?;
        head.clear();
    }
    Ok(body.frame().await.map(|f| f.map_err(drop)))
}

/// Sends a body of `length` bytes after the head in `head`. Returns whether it went whole: a body
/// that ends early, runs over or fails leaves the connection unusable (the client sees it cut).
/// `close`: the connection is shut down after the answer (its last bytes go with the FIN).
async fn send_length<W: ClosingWrite>(
    stream: &mut W,
    mut body: ProxyBody,
    length: u64,
    head: &mut Vec<u8>,
    close: bool,
) -> io::Result<bool> {
    let mut sent = 0u64;
    let whole = loop {
        match next_frame(stream, &mut body, head).await? {
            None => break sent == length,
            Some(Err(())) => break false,
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                sent += data.len() as u64;
                if sent > length {
                    break false;
                }
                if sent == length && close {
                    stream.last_write_before_shutdown();
                }
                write_slices(stream, &mut [IoSlice::new(head), IoSlice::new(&data)]).await?;
                head.clear();
                if sent == length {
                    // Whole: its end of stream is not waited for (it may come late).
                    break true;
                }
            }
        }
    };
    if !head.is_empty() {
        stream.write_all(head).await?;
    }
    Ok(whole)
}

/// Sends a chunked body after the head in `head`, and its trailer fields that `allowed` names.
/// Returns whether it went whole (a body that fails has no last chunk: the client sees it cut).
/// `close`: as `send_length`'s.
async fn send_chunked<W: ClosingWrite>(
    stream: &mut W,
    mut body: ProxyBody,
    allowed: Option<&[http::HeaderName]>,
    head: &mut Vec<u8>,
    close: bool,
) -> io::Result<bool> {
    let mut trailers: Option<HeaderMap> = None;
    loop {
        match next_frame(stream, &mut body, head).await? {
            None => break,
            Some(Err(())) => {
                if !head.is_empty() {
                    stream.write_all(head).await?;
                }
                return Ok(false);
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) if data.has_remaining() => {
                    // The chunk's size line goes after the head, if still unsent; the body's
                    // end, if this was its last data, goes with the chunk.
                    wire::chunk_size_line(data.len(), head);
                    let last = body.is_end_stream();
                    let end: &[u8] = if last { b"\r\n0\r\n\r\n" } else { b"\r\n" };
                    let mut slices = [IoSlice::new(head), IoSlice::new(&data), IoSlice::new(end)];
                    if last && close {
                        stream.last_write_before_shutdown();
                    }
                    write_slices(stream, &mut slices).await?;
                    head.clear();
                    if last {
                        return Ok(true);
                    }
                }
                Ok(_) => {}
                Err(frame) => trailers = frame.into_trailers().ok(),
            },
        }
    }
    wire::last_chunk(trailers.as_ref(), allowed, head);
    if close {
        stream.last_write_before_shutdown();
    }
    stream.write_all(head).await?;
    head.clear();
    Ok(true)
}

/// Writes all of `slices` (vectored: one system call for a head and its body, usually).
async fn write_slices<W: AsyncWrite + Unpin>(
    stream: &mut W,
    mut slices: &mut [IoSlice<'_>],
) -> io::Result<()> {
    IoSlice::advance_slices(&mut slices, 0);
    while !slices.is_empty() {
        let n = stream.write_vectored(slices).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut slices, n);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! Each answer, written by hyper's server and by the agent's own to the same requests, must
    //! be the same bytes (but for the date's value): clients see no difference.

    use super::*;
    use crate::proxy::body::{empty, full};
    use bytes::BytesMut;
    use futures::StreamExt as _;
    use http::StatusCode;
    use http_body::Frame;
    use http_body_util::StreamBody;
    use std::convert::Infallible;

    /// The last request of every exchange: its answer shows where the one before it ended.
    const LAST: &[u8] = b"GET /last HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";

    type Answer = fn() -> Response<ProxyBody>;

    fn last() -> Response<ProxyBody> {
        Response::new(full("the end"))
    }

    fn answer_for(path: &str, answer: Answer) -> Response<ProxyBody> {
        if path == "/last" {
            last()
        } else {
            answer()
        }
    }

    async fn by_hyper(requests: &[u8], answer: Answer) -> Vec<u8> {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let service = hyper::service::service_fn(move |request: http::Request<_>| {
            let path = request.uri().path().to_string();
            async move { Ok::<_, Infallible>(answer_for(&path, answer)) }
        });
        let serving = tokio::spawn(
            hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(server), service),
        );
        client.write_all(requests).await.unwrap();
        let mut written = Vec::new();
        client.read_to_end(&mut written).await.unwrap();
        let _ = serving.await;
        written
    }

    async fn by_us(requests: &[u8], answer: Answer) -> Vec<u8> {
        let mut buf = BytesMut::from(requests);
        let (mut written, mut scratch) = (Vec::new(), Vec::new());
        loop {
            let Head::Own(own) = wire::request_head(
                &mut buf,
                &mut wire::HeadSearch::default(),
                OWN_HEAD,
                100,
                wire::OWN_BODY,
            ) else {
                break;
            };
            let to_head = own.request.method() == Method::HEAD;
            let response = answer_for(own.request.uri().path(), answer);
            let kept = write_answer(
                &mut written,
                response,
                to_head,
                own.close,
                own.trailers,
                &mut scratch,
            )
            .await
            .unwrap();
            if !kept {
                break;
            }
        }
        written
    }

    /// `date: <value>` with the value replaced.
    fn dateless(bytes: &[u8]) -> String {
        let text = String::from_utf8_lossy(bytes);
        let mut out = String::new();
        let mut rest = &*text;
        while let Some(at) = rest.find("date: ") {
            out.push_str(&rest[..at + 6]);
            out.push_str("<date>");
            rest = &rest[at + 6..];
            rest = &rest[rest.find("\r\n").unwrap_or(rest.len())..];
        }
        out.push_str(rest);
        out
    }

    fn streamed(frames: Vec<Result<Frame<Bytes>, crate::proxy::body::BoxError>>) -> ProxyBody {
        StreamBody::new(futures::stream::iter(frames)).boxed_unsync()
    }

    fn with(status: u16, headers: &[(&str, &str)], body: ProxyBody) -> Response<ProxyBody> {
        let mut response = Response::new(body);
        *response.status_mut() = StatusCode::from_u16(status).unwrap();
        for (name, value) in headers {
            response.headers_mut().append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        response
    }

    fn two_chunks() -> ProxyBody {
        streamed(vec![
            Ok(Frame::data(Bytes::from_static(b"first "))),
            Ok(Frame::data(Bytes::from_static(b"second"))),
        ])
    }

    fn chunks_and_trailers() -> ProxyBody {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-sum", HeaderValue::from_static("42"));
        trailers.insert("x-unannounced", HeaderValue::from_static("1"));
        streamed(vec![
            Ok(Frame::data(Bytes::from_static(b"data"))),
            Ok(Frame::trailers(trailers)),
        ])
    }

    fn cases() -> Vec<(&'static str, &'static [u8], Answer)> {
        const GET: &[u8] = b"GET /x HTTP/1.1\r\nhost: x\r\n\r\n";
        const GET_TRAILERS: &[u8] = b"GET /x HTTP/1.1\r\nhost: x\r\nte: trailers\r\n\r\n";
        const GET_CLOSE: &[u8] = b"GET /x HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";
        const HEAD: &[u8] = b"HEAD /x HTTP/1.1\r\nhost: x\r\n\r\n";
        vec![
            ("a whole body", GET, || Response::new(full("hello"))),
            ("an empty body", GET, || Response::new(empty())),
            (
                "fields in order, repeated ones on their own lines",
                GET,
                || {
                    let fields = [
                        ("content-type", "text/plain"),
                        ("set-cookie", "a=1"),
                        ("x-b", "2"),
                        ("set-cookie", "b=2"),
                    ];
                    with(200, &fields, full("hello"))
                },
            ),
            ("a body of unknown length: chunked", GET, || {
                Response::new(two_chunks())
            }),
            ("trailers to a client that takes them", GET_TRAILERS, || {
                with(200, &[("trailer", "x-sum")], chunks_and_trailers())
            }),
            ("trailers to a client that does not", GET, || {
                with(200, &[("trailer", "x-sum")], chunks_and_trailers())
            }),
            ("HEAD with the length a GET would have", HEAD, || {
                with(200, &[("content-length", "9")], empty())
            }),
            ("HEAD without a length", HEAD, || Response::new(empty())),
            ("204", GET, || with(204, &[], empty())),
            ("304 with a length", GET, || {
                with(304, &[("content-length", "9"), ("etag", "\"e\"")], empty())
            }),
            ("a reason phrase of the upstream's", GET, || {
                let mut response = with(404, &[], full("gone"));
                response
                    .extensions_mut()
                    .insert(hyper::ext::ReasonPhrase::from_static(b"Not Here"));
                response
            }),
            ("a status without a usual reason", GET, || {
                with(599, &[], full("odd"))
            }),
            ("the client asks to close", GET_CLOSE, || {
                Response::new(full("bye"))
            }),
            ("the answer says close", GET, || {
                with(200, &[("connection", "close")], full("bye"))
            }),
            ("the answer has other connection options", GET, || {
                with(200, &[("connection", "x-opt")], full("x"))
            }),
            ("the answer has a date", GET, || {
                with(200, &[("date", "Thu, 01 Jan 1970 00:00:00 GMT")], full("x"))
            }),
            ("the answer has its own length", GET, || {
                with(200, &[("content-length", "5")], full("hello"))
            }),
        ]
    }

    /// An answer whose length went whole is done, though its body's end of stream has not come.
    #[tokio::test]
    async fn an_answer_is_done_at_its_length() {
        let endless = StreamBody::new(
            futures::stream::iter([Ok(Frame::data(Bytes::from_static(b"hello")))])
                .chain(futures::stream::pending()),
        )
        .boxed_unsync();
        let response = with(200, &[("content-length", "5")], endless);
        let mut written = Vec::new();
        let sent = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            write_answer(&mut written, response, false, false, false, &mut Vec::new()),
        )
        .await
        .expect("not waiting for the end of stream")
        .unwrap();
        assert!(sent, "the connection goes on");
        assert!(written.ends_with(b"\r\n\r\nhello"));
    }

    /// Where the two differ on purpose: hyper's server drops the answer it has not flushed yet
    /// when the body fails (the client sees its connection close answerless); the agent's own
    /// sends what it has, and the body is cut (no last chunk), then the connection closes.
    #[tokio::test]
    async fn a_body_that_fails_is_cut_after_what_was_sent() {
        fn failing() -> Response<ProxyBody> {
            Response::new(streamed(vec![
                Ok(Frame::data(Bytes::from_static(b"partial"))),
                Err("the upstream went away".into()),
            ]))
        }
        let requests = [&b"GET /x HTTP/1.1\r\nhost: x\r\n\r\n"[..], LAST].concat();
        assert_eq!(
            dateless(&by_us(&requests, failing).await),
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ndate: <date>\r\n\r\n7\r\npartial\r\n"
        );
        assert_eq!(by_hyper(&requests, failing).await, b"");
    }

    #[tokio::test]
    async fn answers_are_written_as_hyper_writes_them() {
        let mut differ = Vec::new();
        for (name, request, answer) in cases() {
            let requests = [request, LAST].concat();
            let hyper = dateless(&by_hyper(&requests, answer).await);
            let ours = dateless(&by_us(&requests, answer).await);
            if hyper != ours {
                differ.push(format!("{name}:\n  hyper: {hyper:?}\n  ours:  {ours:?}"));
            }
        }
        assert!(differ.is_empty(), "{}", differ.join("\n"));
    }
}
