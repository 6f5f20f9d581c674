//! Serving HTTP/1.1 (with upgrades) and HTTP/2 on an accepted connection, and closing it
//! gracefully when draining: HTTP/1.1 by the agent's own server (`http1.rs`) for requests without
//! a body or with a small one, by hyper's for the rest of a connection from its first other
//! request; HTTP/2 by hyper's.

pub mod http1;
mod wire;

use super::body::{CallerBody, ProxyBody};
use super::drain::{turned_true_polled_when_woken, DRAIN_IDLE_GRACE};
use super::io::Watched;
use super::{CloseAfter, ConnectionInfo, Proxy, ProxyConfig, RefuseStream};
use crate::telemetry::metrics::Reason;
use futures::future::BoxFuture;
use http::header::{HeaderValue, CONNECTION};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::service::Service;
use hyper_util::rt::TokioTimer;
use std::future::Future;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::watch;

/// Serves HTTP/1.1 (with upgrades) or HTTP/2 on a connection whose protocol is known, until the
/// client is done or `shutdown` turns true (then in-flight requests finish). Generic over the
/// transport so that the fuzz target drives this very server over an in-memory pipe.
/// `caller_socket`: the descriptor of `io`'s socket (HTTP/1.1), looked at for a reset while a
/// request runs long; it stays open while `io` does, which outlives every request.
pub async fn serve_http<I>(
    proxy: &Arc<Proxy>,
    io: I,
    http2: bool,
    info: Arc<ConnectionInfo>,
    shutdown: watch::Receiver<bool>,
    caller_socket: Option<RawFd>,
) -> Result<(), hyper::Error>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let config = &proxy.config;
    // While draining, HTTP/1 answers say `Connection: close`, so the client sends its next request
    // on a new connection (to a successor, on a restart) instead of racing our close. HTTP/2 has
    // GOAWAY for that, and forbids the header.
    let closing = (!http2).then(|| shutdown.clone());
    let signals = Arc::new(Signals::default());
    let service = {
        let proxy = proxy.clone();
        let signals = signals.clone();
        service_fn(move |request: Request<Incoming>| {
            let proxy = proxy.clone();
            let info = info.clone();
            let closing = closing.clone();
            let signals = signals.clone();
            // Boxed: hyper keeps an HTTP/1 connection's slot for its request future for the
            // connection's whole life, so unboxed every idle keep-alive connection would hold
            // the ~5 KiB state of a request in flight; boxed it holds a pointer.
            let answer: Answer = Box::pin(async move {
                let tunnel = request.method() == Method::CONNECT;
                if request.version() == Version::HTTP_10 {
                    signals.close_delimited.store(true, Ordering::Relaxed);
                }
                let draining = closing.as_ref().is_some_and(|draining| *draining.borrow());
                let handling = proxy.handle(request.map(CallerBody::Streaming), &info, draining);
                let after = proxy.config.header_read_timeout;
                let Some(mut response) = unless_caller_resets(caller_socket, after, handling).await
                else {
                    // Dropped: its log counts it 499, its upstream exchange ends. The error ends
                    // the connection.
                    return Err(h2::Error::from(h2::Reason::CANCEL));
                };
                let upgraded = (tunnel && response.status().is_success())
                    || response.status() == StatusCode::SWITCHING_PROTOCOLS;
                if !upgraded && draining {
                    response
                        .headers_mut()
                        .insert(CONNECTION, HeaderValue::from_static("close"));
                }
                if response.extensions_mut().remove::<CloseAfter>().is_some() {
                    signals.go_away.notify_one();
                }
                if response.extensions_mut().remove::<RefuseStream>().is_some() {
                    // hyper's HTTP/2 server resets the stream with the code of an h2 error the
                    // service fails with.
                    return Err(h2::Error::from(h2::Reason::REFUSED_STREAM));
                }
                if http2 {
                    // Its HPACK table keeps values (see `own_values`).
                    super::header_maps::own_values(response.headers_mut());
                }
                Ok(response)
            });
            answer
        })
    };
    let moves = Arc::new(AtomicU64::new(0));
    let served = Served {
        config,
        io: Watched::new(io, moves.clone()),
        service,
        moves,
        shutdown,
        signals,
        caller_socket,
    };
    let served = if http2 {
        // Boxed: HTTP/2's connection state (frame codec, header tables) is the larger, and
        // HTTP/1 connections, the many, would otherwise each be sized for it.
        Box::pin(served.h2()).await
    } else {
        served.h1().await
    };
    if let Some(reason) = served.as_ref().err().and_then(answered_by_hyper) {
        proxy.metrics.local_answer(reason);
    }
    served
}

/// A timer whose deadline mostly moves later (a kept-alive connection's head timer, moved at each
/// request): a later deadline is only noted, and the timer's entry in the worker's wheel is moved
/// when it fires before it; an earlier one moves the entry at once. Moving the entry per request
/// (a reset, then its registration at the next poll) took some 220 of a kept-alive request's
/// 24,700 instructions (`cargo xtask bench instructions`).
pub(super) struct LazyTimer<P> {
    sleep: std::pin::Pin<P>,
    deadline: tokio::time::Instant,
}

impl<P: std::ops::DerefMut<Target = tokio::time::Sleep>> LazyTimer<P> {
    pub(super) fn new(sleep: std::pin::Pin<P>) -> Self {
        let deadline = sleep.deadline();
        LazyTimer { sleep, deadline }
    }

    pub(super) fn reset(&mut self, deadline: tokio::time::Instant) {
        if deadline < self.sleep.deadline() || self.sleep.is_elapsed() {
            self.sleep.as_mut().reset(deadline);
        }
        self.deadline = deadline;
    }

    /// Ready once the deadline set last has passed.
    pub(super) fn poll_elapsed(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        use std::future::Future as _;
        loop {
            std::task::ready!(self.sleep.as_mut().poll(cx));
            // The entry fired at its own deadline: past the one set last unless that is later.
            if self.sleep.deadline() >= self.deadline {
                return std::task::Poll::Ready(());
            }
            self.sleep.as_mut().reset(self.deadline);
        }
    }

    pub(super) async fn elapsed(&mut self) {
        std::future::poll_fn(|cx| self.poll_elapsed(cx)).await
    }
}

/// How often the caller of a request that runs long is looked at for a reset.
const RESET_CHECK_EVERY: Duration = Duration::from_secs(1);

/// Runs `handling` and, once it has run for `after` (the head read timeout: most requests are
/// answered sooner), looks at the caller's connection (`socket`, if it is one to look at) every
/// [`RESET_CHECK_EVERY`]: a reset gives up on the request (`None`), as the agent's own server
/// does (`http1::unless_caller_resets`). hyper's server, which half-closes, reads nothing from
/// its caller while a request is in flight and never sees one: a caller that gave up on a backend
/// that hangs left its request, and its connection, in flight for as long as the backend took.
pub(super) fn unless_caller_resets<F: Future>(
    socket: Option<RawFd>,
    after: Duration,
    handling: F,
) -> UnlessCallerResets<F> {
    UnlessCallerResets {
        handling,
        socket,
        after,
        check: None,
    }
}

pin_project_lite::pin_project! {
    /// [`unless_caller_resets`]' future. Not an `async fn`: one holds the future it is given
    /// twice over (as its argument, and pinned), and a request's answer was boxed at 8,240 bytes
    /// for a request future of 4,064.
    pub(super) struct UnlessCallerResets<F> {
        #[pin]
        handling: F,
        socket: Option<RawFd>,
        after: Duration,
        // Set once the request waits: one answered at once never touches a timer.
        check: Option<LazyTimer<Box<tokio::time::Sleep>>>,
    }
}

impl<F: Future> Future for UnlessCallerResets<F> {
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(answer) = this.handling.poll(cx) {
            return Poll::Ready(Some(answer));
        }
        let Some(socket) = *this.socket else {
            return Poll::Pending;
        };
        let after = *this.after;
        let timer = this
            .check
            .get_or_insert_with(|| LazyTimer::new(Box::pin(tokio::time::sleep(after))));
        poll_caller_reset(timer, socket, cx).map(|()| None)
    }
}

/// Ready once the caller has reset `socket`: looked at each time `timer` fires, which is then
/// set again [`RESET_CHECK_EVERY`] later.
fn poll_caller_reset(
    timer: &mut LazyTimer<impl std::ops::DerefMut<Target = tokio::time::Sleep>>,
    socket: RawFd,
    cx: &mut std::task::Context<'_>,
) -> std::task::Poll<()> {
    loop {
        std::task::ready!(timer.poll_elapsed(cx));
        if reset(socket) {
            return std::task::Poll::Ready(());
        }
        timer.reset(tokio::time::Instant::now() + RESET_CHECK_EVERY);
    }
}

/// The caller reset its connection: its TCP state is CLOSE (`tcpi_state`, the first byte of
/// `struct tcp_info`), whatever the receive queue still holds (a body not read yet, a next
/// request: a peek would return those first) and after a FIN (a half-close, CLOSE_WAIT: the
/// answer is still due). Nothing is read: hyper reads the socket.
fn reset(socket: RawFd) -> bool {
    const TCP_CLOSE: u8 = 7;
    let mut info = [0u8; 8];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: `info` is writable for `len` bytes, and the kernel writes at most that many.
    // `socket` is open while its connection is served (see `serve_http`), but for a socket whose
    // registration with the reactor failed, closed at once: its request fails on its body, and
    // a reused number reads another socket's state, a spurious 499 at worst.
    let got = unsafe {
        libc::getsockopt(
            socket,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    got == 0 && len >= 1 && info[0] == TCP_CLOSE
}

/// The answer hyper's HTTP/1.1 server sent by itself when a connection ends with `error`: a
/// request it refused before the agent saw it (431 or 414 for a head over the limits, 400 for
/// one it could not parse), counted with the agent's own answers.
fn answered_by_hyper(error: &hyper::Error) -> Option<Reason> {
    if error.is_parse_too_large() {
        Some(Reason::HeadTooLarge)
    } else if error.is_parse() {
        Some(Reason::MalformedHead)
    } else {
        None
    }
}

/// What a connection's service answers each request with.
type Answer = BoxFuture<'static, Result<Response<ProxyBody>, h2::Error>>;

/// What a connection's requests tell its server, one allocation for the connection.
#[derive(Default)]
struct Signals {
    /// An HTTP/2 answer marked `CloseAfter` asks for a GOAWAY.
    go_away: tokio::sync::Notify,
    /// An HTTP/1.0 request came: its answer of unknown length ends with the connection.
    close_delimited: AtomicBool,
}

/// A connection ready to be served: its transport (counting the bytes it moves) and its service.
struct Served<'c, I, S> {
    config: &'c ProxyConfig,
    io: Watched<I>,
    service: S,
    moves: Arc<AtomicU64>,
    shutdown: watch::Receiver<bool>,
    signals: Arc<Signals>,
    caller_socket: Option<RawFd>,
}

impl<I, S> Served<'_, I, S>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: Service<
            Request<Incoming>,
            Response = Response<ProxyBody>,
            Error = h2::Error,
            Future = Answer,
        > + Send
        + 'static,
{
    async fn h1(mut self) -> Result<(), hyper::Error> {
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(self.config.header_read_timeout)
            // hyper asserts a buffer of at least 8 KiB.
            .max_buf_size(self.config.max_header_bytes.max(8192))
            .max_headers(self.config.max_headers)
            // A client may shut its side down once its request is sent (RFC 9112 §9.6 lets it): it
            // still gets its answer. Without this, hyper closes at the EOF, answerless.
            .half_close(true)
            .serve_connection(self.io, self.service)
            .with_upgrades();
        tokio::pin!(conn);
        let served = tokio::select! {
            biased;
            r = conn.as_mut() => r,
            () = turned_true_polled_when_woken(&mut self.shutdown) => {
                // Answers say `Connection: close` now (above). An idle connection closes only after
                // a quiet spell; one with a request in flight gets keep-alive off at once (its
                // answer then says close, if not yet sent).
                tokio::select! {
                    r = conn.as_mut() => r,
                    () = quiet(&self.moves, DRAIN_IDLE_GRACE) => {
                        conn.as_mut().graceful_shutdown();
                        conn.as_mut().await
                    }
                }
            }
        };
        // An answer cut short (its body failed: the backend died, the route's timeout): an
        // HTTP/1.0 caller's answer ends with the connection, and a FIN would make it look whole
        // (a proxy in front would cache it). The close resets instead; the caller's socket is
        // still open, held by `conn`. An HTTP/1.1 caller tells a cut answer by its framing, and
        // gets the answers before it, pipelined, whole (a reset would drop what is unsent).
        let close_delimited = self.signals.close_delimited.load(Ordering::Relaxed);
        if let (Err(e), Some(socket), true) = (&served, self.caller_socket, close_delimited) {
            if e.is_user() {
                super::io::reset_on_close(socket);
            }
        }
        served
    }

    async fn h2(mut self) -> Result<(), hyper::Error> {
        let conn = self
            .config
            .h2_server()
            .serve_connection(self.io, self.service);
        tokio::pin!(conn);
        tokio::select! {
            biased;
            r = conn.as_mut() => r,
            // GOAWAY: streams already started finish, the client opens new ones elsewhere.
            () = turned_true_polled_when_woken(&mut self.shutdown) => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
            // An answer asked for it (its Service went: the client's next connection goes
            // wherever the name leads now).
            () = self.signals.go_away.notified() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
            // Idle (no byte either way, pings included) for the idle timeout: GOAWAY too, so an
            // abandoned connection does not stay forever; a quiet stream still in flight finishes.
            () = quiet(&self.moves, self.config.idle_timeout) => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        }
    }
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

#[cfg(test)]
mod tests {
    use super::LazyTimer;
    use std::time::Duration;
    use tokio::time::Instant;

    /// Whether `timer` has fired by now, without waiting.
    fn fired(timer: &mut LazyTimer<Box<tokio::time::Sleep>>) -> bool {
        let waker = futures::task::noop_waker();
        timer
            .poll_elapsed(&mut std::task::Context::from_waker(&waker))
            .is_ready()
    }

    #[tokio::test(start_paused = true)]
    async fn a_lazy_timer_fires_at_the_deadline_set_last() {
        let start = Instant::now();
        let secs = |n| start + Duration::from_secs(n);
        let mut timer = LazyTimer::new(Box::pin(tokio::time::sleep_until(secs(10))));
        // Later: the entry stays where it was, and firing there is not the deadline.
        timer.reset(secs(20));
        tokio::time::sleep_until(secs(15)).await;
        assert!(!fired(&mut timer), "fired at the deadline it had before");
        timer.elapsed().await;
        assert_eq!(Instant::now(), secs(20));
        // After it fired, later again.
        timer.reset(secs(25));
        assert!(!fired(&mut timer), "still elapsed from before");
        timer.elapsed().await;
        assert_eq!(Instant::now(), secs(25));
        // Earlier than a later one set before: the earlier one.
        timer.reset(secs(40));
        assert!(!fired(&mut timer));
        timer.reset(secs(30));
        timer.elapsed().await;
        assert_eq!(Instant::now(), secs(30));
    }
}
