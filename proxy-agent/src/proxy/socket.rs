//! Accepted sockets that join the reactor only when they must wait.
//!
//! A new connection's request is usually in its socket by the time it is accepted, and its answer
//! fits the socket's send buffer: such a connection is read, answered and closed without ever
//! waiting, so registering it with the reactor (tokio's registration, an `epoll_ctl` ADD, and
//! the DEL when it closes) is pure cost. [`Acceptor`] accepts without registering, and an
//! [`AcceptedSocket`] reads and writes its socket directly until an operation would block; only
//! then is it registered, and from then on it is a tokio `TcpStream` like any other.

use rustix::fd::AsFd;
use rustix::net::SendFlags;
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::net::{Shutdown, SocketAddr};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// A listening socket whose accepts do not register the accepted sockets.
pub(super) struct Acceptor {
    listener: AsyncFd<std::net::TcpListener>,
}

impl Acceptor {
    /// Registers `listener` with the current runtime's reactor (made non-blocking first).
    pub(super) fn new(listener: std::net::TcpListener) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        // SAFETY: a std listener owns its descriptor, which stays open and the same until the
        // listener is dropped, with the `AsyncFd` that owns it.
        let listener = unsafe { AsyncFd::register_with_interest(listener, Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        Ok(Acceptor { listener })
    }

    /// The next connection, non-blocking and close-on-exec (one `accept4`, as tokio's).
    pub(super) async fn accept(&self) -> io::Result<(AcceptedSocket, SocketAddr)> {
        loop {
            let mut ready = self.listener.readable().await?;
            if let Ok(accepted) = ready.try_io(|listener| accept_now(listener.get_ref())) {
                return accepted;
            }
        }
    }

    /// The next connection the queue holds, without waiting (`WouldBlock`: none).
    pub(super) fn try_accept(&self) -> io::Result<(AcceptedSocket, SocketAddr)> {
        accept_now(self.listener.get_ref())
    }
}

impl AsFd for Acceptor {
    fn as_fd(&self) -> rustix::fd::BorrowedFd<'_> {
        self.listener.get_ref().as_fd()
    }
}

fn accept_now(listener: &std::net::TcpListener) -> io::Result<(AcceptedSocket, SocketAddr)> {
    use rustix::net::{acceptfrom_with, SocketFlags};
    let (socket, peer) = acceptfrom_with(listener, SocketFlags::NONBLOCK | SocketFlags::CLOEXEC)?;
    let peer = peer
        .and_then(|peer| SocketAddr::try_from(peer).ok())
        .ok_or_else(|| io::Error::other("accepted a socket without an IP address"))?;
    let socket = AcceptedSocket::unregistered(std::net::TcpStream::from(socket));
    Ok((socket, peer))
}

/// An accepted TCP socket, registered with the reactor the first time it would block.
pub struct AcceptedSocket {
    state: State,
    /// Writes go with `MSG_MORE`: their last partial segment is held for the shutdown's FIN,
    /// which then rides on it (see `ClosingWrite`).
    held_for_fin: bool,
}

enum State {
    /// Non-blocking, not registered: reads and writes go straight to the socket.
    Direct(std::net::TcpStream),
    Registered(TcpStream),
    /// Registering failed (the socket is closed); every operation fails.
    Failed,
}

impl AcceptedSocket {
    /// Makes its close a reset (RST), for a connection refused on accept.
    pub(super) fn reset_on_close(&self) {
        match &self.state {
            State::Direct(socket) => super::tcp::reset_on_close(socket),
            State::Registered(socket) => super::tcp::reset_on_close(socket),
            State::Failed => {}
        }
    }

    /// `socket` must be non-blocking.
    fn unregistered(socket: std::net::TcpStream) -> Self {
        AcceptedSocket {
            state: State::Direct(socket),
            held_for_fin: false,
        }
    }

    /// See `ClosingWrite::last_write_before_shutdown`.
    pub(super) fn last_write_before_shutdown(&mut self) {
        self.held_for_fin = true;
    }

    /// The socket's descriptor (the same once registered).
    pub(super) fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd as _;
        match &self.state {
            State::Direct(socket) => Some(socket.as_raw_fd()),
            State::Registered(socket) => Some(socket.as_raw_fd()),
            State::Failed => None,
        }
    }

    /// The socket as a registered tokio stream (the byte pumps wait on both their sockets).
    pub fn into_registered(self) -> io::Result<TcpStream> {
        match self.state {
            State::Direct(socket) => TcpStream::from_std(socket),
            State::Registered(stream) => Ok(stream),
            State::Failed => Err(failed()),
        }
    }

    /// Registers a direct socket that would block, so that the caller can wait on it.
    fn registered(&mut self) -> io::Result<&mut TcpStream> {
        if let State::Direct(_) = self.state {
            let State::Direct(socket) = std::mem::replace(&mut self.state, State::Failed) else {
                unreachable!("matched above");
            };
            self.state = State::Registered(TcpStream::from_std(socket)?);
        }
        match &mut self.state {
            State::Registered(stream) => Ok(stream),
            _ => Err(failed()),
        }
    }

    /// Runs `direct` on an unregistered socket; `None` when the socket is registered (or must be:
    /// `direct` would block), so that the caller polls the registered stream instead.
    fn poll_direct<T>(
        &mut self,
        cx: &mut Context<'_>,
        direct: impl FnOnce(&std::net::TcpStream) -> io::Result<T>,
    ) -> Poll<Option<io::Result<T>>> {
        let State::Direct(socket) = &self.state else {
            return Poll::Ready(None);
        };
        // Counted against the task's budget as tokio's own I/O is: a connection whose socket is
        // always ready still yields to the worker's other tasks, and its timeouts still fire.
        let budget = ready!(tokio::task::coop::poll_proceed(cx));
        match direct(socket) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Poll::Ready(None),
            done => {
                budget.made_progress();
                Poll::Ready(Some(done))
            }
        }
    }
}

fn failed() -> io::Error {
    io::Error::other("the connection could not be registered with the reactor")
}

impl From<TcpStream> for AcceptedSocket {
    fn from(stream: TcpStream) -> Self {
        AcceptedSocket {
            state: State::Registered(stream),
            held_for_fin: false,
        }
    }
}

/// One `sendmsg`; `more`: a last partial segment is held until the next send or the FIN.
fn send(socket: impl AsFd, bufs: &[IoSlice<'_>], more: bool) -> io::Result<usize> {
    let flags = if more {
        SendFlags::NOSIGNAL | SendFlags::MORE
    } else {
        SendFlags::NOSIGNAL
    };
    Ok(rustix::net::sendmsg(
        socket,
        bufs,
        &mut Default::default(),
        flags,
    )?)
}

/// [`send`] on a registered stream, waiting for room.
fn poll_send(
    stream: &TcpStream,
    cx: &mut Context<'_>,
    bufs: &[IoSlice<'_>],
    more: bool,
) -> Poll<io::Result<usize>> {
    loop {
        ready!(stream.poll_write_ready(cx))?;
        match stream.try_io(Interest::WRITABLE, || send(stream, bufs, more)) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            sent => return Poll::Ready(sent),
        }
    }
}

impl AsyncRead for AcceptedSocket {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // SAFETY: `recv` only writes to the unfilled part, and exactly the bytes it reports read
        // are marked initialised and filled.
        let unfilled = unsafe { buf.unfilled_mut() };
        let read = ready!(self.poll_direct(cx, |socket| {
            let unfilled: &mut [MaybeUninit<u8>] = unfilled;
            let ((read, _), _) =
                rustix::net::recv(socket, unfilled, rustix::net::RecvFlags::empty())?;
            Ok(read.len())
        }));
        match read {
            Some(Ok(n)) => {
                // SAFETY: `recv` initialised these `n` bytes.
                unsafe { buf.assume_init(n) };
                buf.advance(n);
                Poll::Ready(Ok(()))
            }
            Some(Err(e)) => Poll::Ready(Err(e)),
            None => Pin::new(self.registered()?).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for AcceptedSocket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let more = self.held_for_fin;
        match ready!(self.poll_direct(cx, |socket| send(socket, bufs, more))) {
            Some(sent) => Poll::Ready(sent),
            None => poll_send(self.registered()?, cx, bufs, more),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.held_for_fin = false;
        match ready!(self.poll_direct(cx, |socket| socket.shutdown(Shutdown::Write))) {
            Some(shut) => Poll::Ready(shut),
            None => Pin::new(self.registered()?).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    async fn accepted() -> (AcceptedSocket, TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = Acceptor::new(listener).unwrap();
        let client = TcpStream::connect(addr).await.unwrap();
        let (socket, peer) = acceptor.accept().await.unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        (socket, client)
    }

    fn is_registered(socket: &AcceptedSocket) -> bool {
        matches!(socket.state, State::Registered(_))
    }

    #[tokio::test]
    async fn a_request_already_there_is_answered_without_registering() {
        let (mut served, mut client) = accepted().await;
        client.write_all(b"ping").await.unwrap();
        // Loopback: the bytes are in the accepted socket once the write returned.
        let mut got = [0u8; 4];
        served.read_exact(&mut got).await.unwrap();
        served.write_all(b"pong").await.unwrap();
        served.shutdown().await.unwrap();
        assert!(!is_registered(&served), "nothing had to wait");
        drop(served);
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        assert_eq!((&got, &answer[..]), (b"ping", &b"pong"[..]));
    }

    #[tokio::test]
    async fn a_read_that_would_block_registers_and_waits() {
        let (mut served, mut client) = accepted().await;
        let reading = tokio::spawn(async move {
            let mut got = [0u8; 5];
            served.read_exact(&mut got).await.unwrap();
            (served, got)
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        client.write_all(b"later").await.unwrap();
        let (served, got) = reading.await.unwrap();
        assert_eq!(&got, b"later");
        assert!(is_registered(&served));
    }

    #[tokio::test]
    async fn a_write_past_the_send_buffer_registers_and_waits_for_room() {
        let (mut served, mut client) = accepted().await;
        let big = vec![7u8; 8 << 20];
        let writing = tokio::spawn(async move {
            served.write_all(&big).await.unwrap();
            served.shutdown().await.unwrap();
            served
        });
        let mut received = Vec::new();
        client.read_to_end(&mut received).await.unwrap();
        assert_eq!(received.len(), 8 << 20);
        assert!(received.iter().all(|&b| b == 7));
        assert!(is_registered(&writing.await.unwrap()));
    }

    /// TCP segments `socket` has sent so far.
    fn segments_sent(socket: &AcceptedSocket) -> u32 {
        use std::os::fd::AsRawFd as _;
        let fd = match &socket.state {
            State::Direct(socket) => socket.as_raw_fd(),
            State::Registered(stream) => stream.as_raw_fd(),
            State::Failed => unreachable!("registration does not fail here"),
        };
        // SAFETY: `info` is a `tcp_info` of the size passed, which the kernel fills at most.
        unsafe {
            let mut info: libc::tcp_info = std::mem::zeroed();
            let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
            let got = libc::getsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&raw mut info).cast(),
                &mut len,
            );
            assert_eq!(got, 0, "TCP_INFO");
            info.tcpi_segs_out
        }
    }

    /// Segments the served side sends for an answer and its close, the request read.
    async fn segments_for_an_answer_and_its_close(last_write_marked: bool) -> u32 {
        let (mut served, mut client) = accepted().await;
        client.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        served.read_exact(&mut got).await.unwrap();
        let before = segments_sent(&served);
        if last_write_marked {
            served.last_write_before_shutdown();
        }
        served.write_all(b"pong").await.unwrap();
        served.shutdown().await.unwrap();
        let sent = segments_sent(&served) - before;
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"pong");
        sent
    }

    #[tokio::test]
    async fn an_answers_last_write_goes_with_the_fin() {
        assert_eq!(
            segments_for_an_answer_and_its_close(false).await,
            2,
            "unmarked: the answer, then the FIN"
        );
        assert_eq!(
            segments_for_an_answer_and_its_close(true).await,
            1,
            "marked: the answer and the FIN in one segment"
        );
    }

    /// A socket that never runs dry, read a byte at a time, still lets the worker's other tasks
    /// run (tokio's budget): without it, a timeout around such reads could never fire.
    #[tokio::test(flavor = "current_thread")]
    async fn reads_that_never_block_still_yield_to_other_tasks() {
        let (mut served, mut client) = accepted().await;
        const BYTES: usize = 16 << 10;
        client.write_all(&[1u8; BYTES]).await.unwrap();
        let other_ran = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let other = tokio::spawn({
            let other_ran = other_ran.clone();
            async move { other_ran.store(true, std::sync::atomic::Ordering::Relaxed) }
        });
        let mut byte = [0u8; 1];
        let mut read_before_the_other_ran = 0;
        while read_before_the_other_ran < BYTES
            && !other_ran.load(std::sync::atomic::Ordering::Relaxed)
        {
            served.read_exact(&mut byte).await.unwrap();
            read_before_the_other_ran += 1;
        }
        assert!(!is_registered(&served), "every read found bytes");
        assert!(
            read_before_the_other_ran < BYTES,
            "the other task waited for all {BYTES} reads"
        );
        other.await.unwrap();
    }

    #[tokio::test]
    async fn the_client_closing_reads_as_the_end() {
        let (mut served, client) = accepted().await;
        drop(client);
        let mut rest = Vec::new();
        served.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }
}
