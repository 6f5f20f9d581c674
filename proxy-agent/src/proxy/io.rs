//! Transport wrappers of a served connection: [`Watched`] counts the reads and writes that moved
//! bytes (so that draining can tell an idle connection), [`Lingering`] closes without a reset.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

/// How long a connection the agent closed is read after its FIN before it is closed for good.
pub const LINGER: Duration = Duration::from_secs(2);

/// A served connection's transport, counting the reads and writes that moved bytes (see
/// `serve::quiet`).
pub(super) struct Watched<I> {
    io: I,
    moves: Arc<AtomicU64>,
}

/// A client connection as `serve::serve_http` serves it (what an upgrade downcasts to).
pub(super) type DownstreamIo = Watched<hyper_util::rt::TokioIo<Lingering>>;

impl<I> Watched<I> {
    pub(super) fn into_inner(self) -> I {
        self.io
    }

    pub(super) fn new(io: I, moves: Arc<AtomicU64>) -> Self {
        Watched { io, moves }
    }

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
pub(super) struct Lingering {
    stream: Option<TcpStream>,
    draining: watch::Receiver<bool>,
    tracker: TaskTracker,
}

impl Lingering {
    pub(super) fn new(
        stream: TcpStream,
        draining: watch::Receiver<bool>,
        tracker: TaskTracker,
    ) -> Self {
        Self {
            stream: Some(stream),
            draining,
            tracker,
        }
    }

    pub(super) fn tcp(&self) -> &TcpStream {
        self.stream.as_ref().expect("present until dropped")
    }

    fn tcp_mut(&mut self) -> Pin<&mut TcpStream> {
        Pin::new(self.stream.as_mut().expect("present until dropped"))
    }

    /// The plain stream, for opaque TCP (which cannot drain gracefully anyway).
    pub(super) fn into_inner(mut self) -> TcpStream {
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
