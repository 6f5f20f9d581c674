//! Transport wrappers of a served connection: [`Watched`] counts the reads and writes that moved
//! bytes (so that draining can tell an idle connection), [`Lingering`] closes without a reset.

use super::accept::OpenConnection;
use super::socket::AcceptedSocket;
use bytes::BytesMut;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tokio_util::task::TaskTracker;

/// How long a connection the agent closed is read after its FIN before it is closed for good.
pub const LINGER: Duration = Duration::from_secs(2);

/// How much protocol detection reads at first: hyper's own first read (8 KiB), so that hyper sees
/// the reads it would have made itself. Which refusal an oversized head gets (414 or 431) depends
/// on whether hyper has the whole head when its buffer limit is reached, that is on how it was read.
const FIRST_READ: usize = 8192;

/// Read buffers kept per thread (a data-plane worker), at most.
const KEPT_BUFFERS: usize = 16;

thread_local! {
    static SPARE_BUFFERS: std::cell::RefCell<Vec<BytesMut>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A new connection's read buffer: one an ended connection left on this thread, else a new one.
/// An 8 KiB allocation is served by glibc's large-chunk path, which first consolidates its fast
/// bins, and cutting the first head out of a new buffer allocates its shared header too.
fn read_buffer() -> BytesMut {
    SPARE_BUFFERS
        .with_borrow_mut(Vec::pop)
        .unwrap_or_else(|| BytesMut::with_capacity(FIRST_READ))
}

/// Keeps an ended connection's read buffer for the next one on this thread, emptied, when it
/// offers a first read's room (8 KiB, hyper's own first read) and no more: a buffer that grew (a
/// long head's, a body's) is freed, not kept with its larger block behind that room (`capacity`
/// is the room; what earlier requests took of the block stays in front of it).
pub(super) fn give_back_read_buffer(mut buf: BytesMut) {
    buf.clear();
    // The first is true for a room beyond 8 KiB, or a block beyond it that nothing else holds
    // (rewound to its start); the second, for 8 KiB of room (rewinding a block of its own).
    if buf.try_reclaim(FIRST_READ + 1) || !buf.try_reclaim(FIRST_READ) {
        return;
    }
    SPARE_BUFFERS.with_borrow_mut(|spare| {
        if spare.len() < KEPT_BUFFERS {
            spare.push(buf);
        }
    });
}

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

/// What counts a served connection until dropped: among those a drain waits for, and (accepted
/// ones) among the open ones.
pub(super) struct Held {
    _drain: TaskTrackerToken,
    _open: Option<OpenConnection>,
}

/// An accepted connection that, dropped while draining, is not closed at once: it is shut down
/// for writing and read until the client closes its side (at most [`LINGER`]). A request the
/// client sent as the agent closed would otherwise be unread data, and closing a socket with
/// unread data sends a reset instead of a FIN. The same on any close of a connection hyper's
/// server took over (`linger_on_close`): it may answer before it read a request's body (a 404,
/// a 503 to an upload), and the reset would fail the client's upload before it read the answer.
///
/// It also holds the bytes protocol detection read (a read rather than a peek saves a syscall
/// per connection): its reads return them before reading the socket again.
pub(super) struct Lingering {
    stream: Option<Rewound<AcceptedSocket>>,
    draining: watch::Receiver<bool>,
    tracker: TaskTracker,
    /// Counts the connection, however it is served: an upgraded one outlives its HTTP task, and
    /// its pump keeps this (see [`Lingering::into_parts`]).
    held: Option<Held>,
    /// Linger on close even when not draining ([`ReadAhead::linger_on_close`]).
    always: bool,
}

impl Lingering {
    pub(super) fn new(
        stream: impl Into<AcceptedSocket>,
        draining: watch::Receiver<bool>,
        tracker: TaskTracker,
    ) -> Self {
        Self {
            stream: Some(Rewound::new(stream.into())),
            draining,
            held: Some(Held {
                _drain: tracker.token(),
                _open: None,
            }),
            tracker,
            always: false,
        }
    }

    /// Counts the connection among the open ones ([`OpenConnection`]) for as long as it is
    /// served, by whatever holds it.
    pub(super) fn counted(mut self, open: OpenConnection) -> Self {
        if let Some(held) = &mut self.held {
            held._open = Some(open);
        }
        self
    }

    fn rewound(&mut self) -> &mut Rewound<AcceptedSocket> {
        self.stream.as_mut().expect("present until dropped")
    }

    /// Reads what the socket has (waiting for it) after the bytes already read, which its reads
    /// will return first; returns all of them, or `None` when the client closed its side instead.
    pub(super) async fn read_first_bytes(&mut self) -> std::io::Result<Option<&[u8]>> {
        let rewound = self.rewound();
        if rewound.unread.capacity() == 0 {
            // Room for a whole request head of the usual size: serving it reads nothing more.
            rewound.unread = read_buffer();
        }
        let read = rewound.io.read_buf(&mut rewound.unread).await?;
        Ok((read > 0).then_some(&rewound.unread[..]))
    }

    /// The plain stream, registered with the reactor, for a byte pump (which cannot drain
    /// gracefully anyway), the bytes read from it that were not returned yet (they go first),
    /// and what counts it (a drain waits for it, it is open): the pump holds that while it runs.
    pub(super) fn into_parts(mut self) -> std::io::Result<(TcpStream, Vec<u8>, Held)> {
        let rewound = self.stream.take().expect("present until dropped");
        let held = self.held.take().expect("present until taken here");
        Ok((rewound.io.into_registered()?, rewound.unread.to_vec(), held))
    }
}

/// Set once the drain deadline passed: every caller connection still open is closed with a
/// reset ([`Lingering`]), its answer cut short. One for the process, as the deadline is.
static PAST_THE_DEADLINE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// From now on, a caller connection's close is a reset: the drain deadline passed with answers
/// in flight, and a FIN would make an HTTP/1.0 caller's (ended by the close) look whole.
pub(super) fn reset_from_now_on() {
    PAST_THE_DEADLINE.store(true, Ordering::Relaxed);
}

/// Makes the close of `socket`, a caller's, a reset: an answer cut short must not end like a
/// whole one. [`Lingering`] then closes at once rather than shutting down first (a FIN).
pub(super) fn reset_on_close(socket: std::os::fd::RawFd) {
    // SAFETY: the caller's socket is open while its connection is served (see `serve_http`).
    let socket = unsafe { std::os::fd::BorrowedFd::borrow_raw(socket) };
    super::tcp::reset_on_close(socket);
}

/// Whether the close of `socket` was made a reset ([`reset_on_close`]).
fn resets_on_close(socket: &Rewound<AcceptedSocket>) -> bool {
    let Some(socket) = socket.io.raw_fd() else {
        return false;
    };
    // SAFETY: `socket` is the descriptor of the stream held here, open.
    let socket = unsafe { std::os::fd::BorrowedFd::borrow_raw(socket) };
    rustix::net::sockopt::socket_linger(socket).is_ok_and(|l| l == Some(Duration::ZERO))
}

impl Drop for Lingering {
    fn drop(&mut self) {
        let Some(rewound) = self.stream.take() else {
            return;
        };
        if PAST_THE_DEADLINE.load(Ordering::Relaxed) {
            if let Some(socket) = rewound.io.raw_fd() {
                reset_on_close(socket);
            }
            return;
        }
        if (!self.always && !*self.draining.borrow()) || resets_on_close(&rewound) {
            return;
        }
        let mut stream = rewound.io;
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

/// A client connection's writer that can send an answer's last bytes together with the FIN
/// that closes the connection right after them: one TCP segment instead of two.
pub trait ClosingWrite: AsyncWrite + Unpin {
    /// What is written from now on is all that goes before the connection is shut down for
    /// writing (which then sends it, with the FIN).
    fn last_write_before_shutdown(&mut self);
}

/// Tests write answers into a buffer.
#[cfg(test)]
impl ClosingWrite for Vec<u8> {
    fn last_write_before_shutdown(&mut self) {}
}

/// A served connection whose bytes read ahead can be handed on: the agent's own HTTP/1.1 server
/// takes the bytes protocol detection read as its first, and gives back those of a request it
/// leaves to hyper's server, whose reads then return them first.
pub trait ReadAhead: ClosingWrite + AsyncRead + Send + 'static {
    /// The bytes read ahead and not returned yet, taken.
    fn take_unread(&mut self) -> BytesMut;
    /// Bytes to return before any read ahead or from the transport.
    fn give_back(&mut self, bytes: BytesMut);
    /// From now on, a close shuts down for writing and reads until the client's FIN, draining
    /// or not (see [`Lingering`]).
    fn linger_on_close(&mut self) {}
    /// The caller's socket's descriptor, if it is one, for `serve_http` to look at the
    /// connection's TCP state while hyper's server holds it.
    fn raw_socket(&self) -> Option<std::os::fd::RawFd> {
        None
    }
}

/// A transport whose reads return bytes read ahead first.
pub struct Rewound<I> {
    io: I,
    unread: BytesMut,
}

impl<I> Rewound<I> {
    pub fn new(io: I) -> Self {
        Rewound {
            io,
            unread: BytesMut::new(),
        }
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin + Send + 'static> ReadAhead for Rewound<I> {
    fn take_unread(&mut self) -> BytesMut {
        std::mem::take(&mut self.unread)
    }

    fn give_back(&mut self, mut bytes: BytesMut) {
        bytes.extend_from_slice(&self.unread);
        self.unread = bytes;
    }
}

/// The fuzz target's and tests' transports: nothing to hold.
impl<I: AsyncWrite + Unpin> ClosingWrite for Rewound<I> {
    fn last_write_before_shutdown(&mut self) {}
}

impl ClosingWrite for Lingering {
    fn last_write_before_shutdown(&mut self) {
        self.rewound().io.last_write_before_shutdown();
    }
}

impl ReadAhead for Lingering {
    fn take_unread(&mut self) -> BytesMut {
        self.rewound().take_unread()
    }

    fn give_back(&mut self, bytes: BytesMut) {
        self.rewound().give_back(bytes)
    }

    fn linger_on_close(&mut self) {
        self.always = true;
    }

    fn raw_socket(&self) -> Option<std::os::fd::RawFd> {
        self.stream.as_ref()?.io.raw_fd()
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Rewound<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.unread.is_empty() {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        let n = this.unread.len().min(buf.remaining());
        buf.put_slice(&this.unread.split_to(n));
        if this.unread.is_empty() {
            // All returned: the buffer goes (an idle connection keeps none).
            this.unread = BytesMut::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Rewound<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
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

impl AsyncRead for Lingering {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(self.rewound()).poll_read(cx, buf)
    }
}

impl AsyncWrite for Lingering {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(self.rewound()).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(self.rewound()).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.as_ref().is_some_and(|s| s.is_write_vectored())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(self.rewound()).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(self.rewound()).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ended_connections_read_buffer_is_the_next_ones() {
        let mut first = read_buffer();
        let start = first.as_ptr();
        first.extend_from_slice(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
        // The head cut out, as the server does, and done with when the connection ends.
        let head = first.split_to(16).freeze();
        drop(head);
        give_back_read_buffer(first);
        assert_eq!(SPARE_BUFFERS.with_borrow(Vec::len), 1, "kept");
        let mut second = read_buffer();
        assert!(second.is_empty() && second.capacity() >= FIRST_READ);
        assert_eq!(second.as_ptr(), start, "the same room, all of it");
        // A head still held (a value that outlives its connection) leaves too little room of
        // the buffer's own for a first read: freed, not kept.
        second.extend_from_slice(b"GET / HTTP/1.1\r\n");
        let held = second.split_to(16).freeze();
        give_back_read_buffer(second);
        assert_eq!(SPARE_BUFFERS.with_borrow(Vec::len), 0);
        assert_eq!(
            &held[..],
            b"GET / HTTP/1.1\r\n",
            "what was cut out is untouched"
        );
        // A long head's buffer is freed, not kept; so is one that grew, whose room left is a
        // usual one's (review: a 16 KB body read whole left 16 KiB of room in a 32 KiB block).
        give_back_read_buffer(BytesMut::with_capacity(4 * FIRST_READ));
        let mut grown = BytesMut::with_capacity(FIRST_READ);
        grown.extend_from_slice(&[b'x'; FIRST_READ]);
        grown.reserve(FIRST_READ);
        grown.extend_from_slice(&[b'x'; FIRST_READ]);
        grown.reserve(FIRST_READ);
        grown.extend_from_slice(&[b'x'; 116]);
        drop(grown.split_to(16_500).freeze());
        assert!(grown.capacity() <= 2 * FIRST_READ);
        give_back_read_buffer(grown);
        let mut half_cut = BytesMut::with_capacity(2 * FIRST_READ);
        half_cut.extend_from_slice(&[b'x'; FIRST_READ - 100]);
        drop(half_cut.split_to(FIRST_READ - 100).freeze());
        give_back_read_buffer(half_cut);
        assert_eq!(SPARE_BUFFERS.with_borrow(Vec::len), 0);
        for _ in 0..KEPT_BUFFERS + 3 {
            give_back_read_buffer(BytesMut::with_capacity(FIRST_READ));
        }
        assert_eq!(SPARE_BUFFERS.with_borrow(Vec::len), KEPT_BUFFERS);
    }

    /// An accepted connection (not registered with the reactor, as the listeners accept) and its
    /// client, on 127.0.0.1.
    async fn connected() -> (Lingering, TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let acceptor = super::super::socket::Acceptor::new(listener).unwrap();
        let (accepted, _) = acceptor.accept().await.unwrap();
        let draining = watch::channel(false).1;
        (
            Lingering::new(accepted, draining, TaskTracker::new()),
            client,
        )
    }

    #[tokio::test]
    async fn the_first_bytes_read_are_read_again_then_the_socket() {
        let (mut served, mut client) = connected().await;
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        assert_eq!(
            served.read_first_bytes().await.unwrap().unwrap(),
            b"GET / HTTP/1.1\r\n"
        );
        client.write_all(b"\r\n").await.unwrap();
        let mut head = [0u8; 5];
        served.read_exact(&mut head).await.unwrap();
        assert_eq!(&head, b"GET /");
        let mut rest = Vec::new();
        client.shutdown().await.unwrap();
        served.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b" HTTP/1.1\r\n\r\n");
    }

    #[tokio::test]
    async fn bytes_not_read_again_go_with_the_stream() {
        let (mut served, mut client) = connected().await;
        client.write_all(b"\x16\x03\x01").await.unwrap();
        served.read_first_bytes().await.unwrap().unwrap();
        let mut first = [0u8; 1];
        served.read_exact(&mut first).await.unwrap();
        let (_, unread, _) = served.into_parts().unwrap();
        assert_eq!(unread, b"\x03\x01");
    }

    #[tokio::test]
    async fn a_client_that_closes_before_a_byte_gives_none() {
        let (mut served, client) = connected().await;
        drop(client);
        assert_eq!(served.read_first_bytes().await.unwrap(), None);
    }
}
