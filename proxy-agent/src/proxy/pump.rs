//! Byte pumps: an opaque TCP connection, or an upgraded one (WebSocket, CONNECT) once its
//! handshake is done, is two sockets and the bytes between them. Every pump is registered so that
//! a successor can take it over mid-stream (`crate::handover`): paused between a read and a
//! write, it gives up both sockets and the bytes it read but has not written yet, and the
//! successor's pump writes those first and goes on. The kernel sockets never close, so the peers
//! see nothing.
//!
//! A pump also ends a connection that moved no byte for `idle_timeout` (24 h by default, as
//! kube-proxy's conntrack forgets an idle flow; TCP keepalive finds a vanished peer sooner).
//!
//! Bytes move in the kernel by default ([`Carry::Splice`]): splice(2) from one socket into a
//! pipe and from the pipe into the other, never through user space. A takeover reads what the
//! pipe holds into the pending bytes it hands over. [`Carry::Copy`] reads into a buffer and
//! writes it out (also the fallback when no pipe can be made). `cargo xtask bench pump` measures
//! both. A pump whose socket the kernel may pair (local sockets, see [`Pairing`]) copies: bytes
//! its peer moves wait where recv(2) reads and splice(2) does not.

use ahash::AHashMap;
use serde::{Deserialize, Serialize};
use std::future::{poll_fn, Future as _};
use std::io;
use std::os::fd::{AsFd as _, BorrowedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use crate::telemetry::metrics::PumpCounts;

/// Bytes read from one side and not yet written to the other are at most this many (copying).
const BUFFER: usize = 16 * 1024;

thread_local! {
    /// Where a copying pump reads into on this worker (what its destination does not take at once
    /// moves to the direction's own buffer).
    static SCRATCH: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0; BUFFER].into_boxed_slice());
}

/// How long the bytes a side sent before it reset may take to reach the other side's peer (a
/// peer that reads them slowly), before that side is reset too.
const FLUSH_BEFORE_RESET: Duration = Duration::from_secs(2);

/// The pipe size asked for when splicing: more bytes per system call than the default 64 KiB.
const PIPE_SIZE: usize = 256 * 1024;

/// How a pump moves bytes between its sockets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Carry {
    /// splice(2) through a pipe: the bytes stay in the kernel.
    #[default]
    Splice,
    /// read(2) into a buffer, write(2) out.
    Copy,
}

/// How a pump ended.
#[derive(Debug, PartialEq, Eq)]
pub enum PumpEnd {
    /// Both directions closed (each side's FIN passed on).
    Closed,
    /// No byte moved for the idle timeout.
    Idle,
    /// Handed to a successor.
    HandedOver,
    Failed(String),
}

/// One direction's state, as handed over: what was read and not yet written, and whether the
/// reading side has closed (its FIN is passed on once the bytes are written).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Flow {
    pub pending: Vec<u8>,
    pub read_closed: bool,
    pub write_shut: bool,
}

/// A paused pump: both sockets and both directions.
#[derive(Debug)]
pub struct Paused {
    pub client: std::net::TcpStream,
    pub upstream: std::net::TcpStream,
    pub to_upstream: Flow,
    pub to_client: Flow,
    /// Whether the kernel may pair either socket ([`Pairing`]): the pump that resumes it need not
    /// ask again, and could not always (the records of the programs that paired them may be gone
    /// after a few takeovers). `None`: not told (an agent from before this was handed over), asked
    /// again.
    pub paired: Option<bool>,
}

type PauseRequest = oneshot::Sender<Paused>;

/// Which of the agent's sockets the kernel may pair (`crate::redirect::Redirect` knows).
pub trait Pairing: Send + Sync {
    /// Whether the kernel may move bytes into `socket`, past its TCP receive queue.
    fn may_be_paired(&self, socket: BorrowedFd<'_>) -> bool;
}

/// No socket is paired: nothing pairs sockets for this agent.
struct NonePaired;

impl Pairing for NonePaired {
    fn may_be_paired(&self, _: BorrowedFd<'_>) -> bool {
        false
    }
}

/// Any socket may be paired, and which cannot be told (a predecessor's pairs, its records not at
/// hand).
pub struct AnyMayBePaired;

impl Pairing for AnyMayBePaired {
    fn may_be_paired(&self, _: BorrowedFd<'_>) -> bool {
        true
    }
}

/// The agent's live pumps (all workers'), for a takeover to pause.
pub struct Pumps {
    next_id: AtomicU64,
    live: Mutex<AHashMap<u64, oneshot::Sender<PauseRequest>>>,
    idle_timeout: Duration,
    carry: Carry,
    /// Asked once per pump (not again for one handed over with the answer); written when the
    /// redirect starts.
    pairing: RwLock<Arc<dyn Pairing>>,
    counts: Arc<PumpCounts>,
}

impl Pumps {
    pub fn new(idle_timeout: Duration) -> Arc<Self> {
        Self::carrying(idle_timeout, Carry::default())
    }

    pub fn carrying(idle_timeout: Duration, carry: Carry) -> Arc<Self> {
        Self::counted(idle_timeout, carry, Arc::default())
    }

    /// Pumps that count how each one carried its bytes in `counts`.
    pub fn counted(idle_timeout: Duration, carry: Carry, counts: Arc<PumpCounts>) -> Arc<Self> {
        Arc::new(Pumps {
            next_id: AtomicU64::new(0),
            live: Mutex::default(),
            idle_timeout,
            carry,
            pairing: RwLock::new(Arc::new(NonePaired)),
            counts,
        })
    }

    /// From the next pump on, `pairing` tells which sockets must not be spliced.
    pub fn tell_pairing(&self, pairing: Arc<dyn Pairing>) {
        *self
            .pairing
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = pairing;
    }

    /// How a pump between `a` and `b` carries its bytes, and whether either may be paired (asked
    /// unless `known`). As configured, but copied if the kernel may pair either socket (bytes moved
    /// into `a` would be missed by a splice from it; bytes spliced into `b` would not pass its
    /// pairing as a send does). Asked whatever is configured: the answer travels with the pump to
    /// a successor, which may splice and may no longer have the records that could tell.
    fn carry_for(&self, a: &TcpStream, b: &TcpStream, known: Option<bool>) -> (Carry, bool) {
        let paired = known.unwrap_or_else(|| {
            let pairing = self
                .pairing
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            pairing.may_be_paired(a.as_fd()) || pairing.may_be_paired(b.as_fd())
        });
        let carry = if paired { Carry::Copy } else { self.carry };
        (carry, paired)
    }

    pub fn len(&self) -> usize {
        self.live.lock().expect("not poisoned").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Pumps bytes both ways until both sides have closed, the connection is idle, or a
    /// successor takes it over. `to_upstream` / `to_client`: where a predecessor left off (or
    /// bytes an upgrade's parser read ahead). Registered at once, before the first poll, so that
    /// a takeover right after finds it.
    pub fn run(
        self: &Arc<Self>,
        client: TcpStream,
        upstream: TcpStream,
        to_upstream: Flow,
        to_client: Flow,
    ) -> impl std::future::Future<Output = PumpEnd> + Send + 'static {
        self.start((client, upstream), (to_upstream, to_client), None)
    }

    /// Pumps on where a paused pump (this agent's or a predecessor's) left off.
    pub fn resume(
        self: &Arc<Self>,
        paused: Paused,
    ) -> io::Result<impl std::future::Future<Output = PumpEnd> + Send + 'static> {
        let client = TcpStream::from_std(paused.client)?;
        let upstream = TcpStream::from_std(paused.upstream)?;
        let flows = (paused.to_upstream, paused.to_client);
        Ok(self.start((client, upstream), flows, paused.paired))
    }

    fn start(
        self: &Arc<Self>,
        (client, upstream): (TcpStream, TcpStream),
        flows: (Flow, Flow),
        paired: Option<bool>,
    ) -> impl std::future::Future<Output = PumpEnd> + Send + 'static {
        let (pause_tx, pause_rx) = oneshot::channel::<PauseRequest>();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.live.lock().expect("not poisoned").insert(id, pause_tx);
        let carry = self.carry_for(&client, &upstream, paired);
        let registered = Registered {
            pumps: self.clone(),
            id,
        };
        registered.pump((client, upstream), carry, flows, pause_rx)
    }

    /// Ends every pump with a reset of both its sockets, as a pump whose side failed ends (a
    /// drain's deadline); returns how many.
    pub async fn reset_all(&self) -> usize {
        let paused = self.pause_all().await;
        for pump in &paused {
            super::tcp::reset_on_close(&pump.client);
            super::tcp::reset_on_close(&pump.upstream);
        }
        paused.len()
    }

    /// Pauses every pump and returns them (those that end meanwhile are not).
    pub async fn pause_all(&self) -> Vec<Paused> {
        let requests: Vec<_> = self
            .live
            .lock()
            .expect("not poisoned")
            .drain()
            .map(|(_, pause)| pause)
            .collect();
        let mut replies = Vec::with_capacity(requests.len());
        for pause in requests {
            let (reply_tx, reply_rx) = oneshot::channel();
            if pause.send(reply_tx).is_ok() {
                replies.push(reply_rx);
            }
        }
        let mut paused = Vec::with_capacity(replies.len());
        for reply in replies {
            if let Ok(p) = reply.await {
                paused.push(p);
            }
        }
        paused
    }
}

impl Registered {
    async fn pump(
        self,
        (mut client, mut upstream): (TcpStream, TcpStream),
        (carry, paired): (Carry, bool),
        (to_upstream, to_client): (Flow, Flow),
        pause_rx: oneshot::Receiver<PauseRequest>,
    ) -> PumpEnd {
        // `None` once it resolved without a request (a oneshot is not polled after it resolved).
        let mut pause_rx = Some(pause_rx);
        let idle_timeout = self.pumps.idle_timeout;
        let mut up = Direction::new(to_upstream, carry);
        let mut down = Direction::new(to_client, carry);
        // As carried, not as decided: without a pipe a direction copies.
        self.pumps
            .counts
            .count(if up.pipe.is_some() && down.pipe.is_some() {
                Carry::Splice
            } else {
                Carry::Copy
            });
        let idle = tokio::time::sleep(idle_timeout);
        tokio::pin!(idle);
        let exit = poll_fn(|cx| {
            if let Some(rx) = pause_rx.as_mut() {
                if let Poll::Ready(request) = Pin::new(rx).poll(cx) {
                    pause_rx = None;
                    if let Ok(reply) = request {
                        return Poll::Ready(Exit::Pause(reply));
                    }
                }
            }
            let mut moved = false;
            // A failure ends the turn: a reset that a write to a side consumed leaves that side
            // reading as at its end, which the other direction would pass on as an orderly FIN.
            let a = up.poll(cx, &mut client, &mut upstream, &mut moved);
            if let Poll::Ready(Err(e)) = a {
                return Poll::Ready(Exit::Failed(e));
            }
            let b = down.poll(cx, &mut upstream, &mut client, &mut moved);
            match (a, b) {
                (_, Poll::Ready(Err(e))) => return Poll::Ready(Exit::Failed(e)),
                (Poll::Ready(Ok(())), Poll::Ready(Ok(()))) => return Poll::Ready(Exit::Closed),
                _ => {}
            }
            if moved {
                idle.as_mut()
                    .reset(tokio::time::Instant::now() + idle_timeout);
            }
            match idle.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Exit::Idle),
                Poll::Pending => Poll::Pending,
            }
        })
        .await;
        match exit {
            Exit::Closed => PumpEnd::Closed,
            Exit::Idle => {
                // Cut short (bytes held for a side that stopped reading, or one side's FIN
                // passed on while the other's answer may still come): reset, as a failure is,
                // or the other side takes the FIN for the stream's orderly end.
                if up.mid_stream() || down.mid_stream() {
                    super::tcp::reset_on_close(&client);
                    super::tcp::reset_on_close(&upstream);
                }
                PumpEnd::Idle
            }
            Exit::Failed(e) => {
                // One side reset (or could not be written to): the other learns it as a reset
                // too, not as an orderly end it would take for a complete stream (a truncated
                // upload committed, a cut download read as whole). Envoy's TCP proxy does so.
                // After the bytes the side that reset had sent, as from the peer itself. Reset
                // on close from here on, whenever the close comes (the drain's end may drop this
                // task), and not handed to a successor (a pause request finds none).
                super::tcp::reset_on_close(&client);
                super::tcp::reset_on_close(&upstream);
                drop(pause_rx.take());
                match (was_reset(&client), was_reset(&upstream)) {
                    (false, true) => {
                        let sockets = (&mut upstream, &mut client);
                        down.flush_before_reset(sockets, FLUSH_BEFORE_RESET).await
                    }
                    (true, false) => {
                        let sockets = (&mut client, &mut upstream);
                        up.flush_before_reset(sockets, FLUSH_BEFORE_RESET).await
                    }
                    _ => {}
                }
                PumpEnd::Failed(e.to_string())
            }
            Exit::Pause(reply) => {
                let (Ok(client), Ok(upstream)) = (client.into_std(), upstream.into_std()) else {
                    return PumpEnd::Failed("a socket could not be detached".into());
                };
                let paused = Paused {
                    client,
                    upstream,
                    to_upstream: up.into_flow(),
                    to_client: down.into_flow(),
                    paired: Some(paired),
                };
                match reply.send(paused) {
                    Ok(()) => PumpEnd::HandedOver,
                    // Nobody waits any more: the sockets close with `paused`.
                    Err(_) => PumpEnd::Failed("the takeover went away".into()),
                }
            }
        }
    }
}

/// Removes a pump from the registry when it ends, however it ends.
struct Registered {
    pumps: Arc<Pumps>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.pumps
            .live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.id);
    }
}

enum Exit {
    Closed,
    Idle,
    Failed(io::Error),
    Pause(PauseRequest),
}

/// Bytes from one socket to the other: through the kernel pipe when splicing, else through a
/// buffer held only while bytes move; `start..end` of the buffer is read and not yet written
/// (when splicing, only bytes a predecessor or an upgrade's parser left, written first).
struct Direction {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    pipe: Option<Pipe>,
    read_closed: bool,
    write_shut: bool,
}

/// A pipe between the two sockets, and how many bytes it holds.
struct Pipe {
    read: std::os::fd::OwnedFd,
    write: std::os::fd::OwnedFd,
    held: usize,
    size: usize,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        use rustix::pipe::{fcntl_getpipe_size, fcntl_setpipe_size, pipe_with, PipeFlags};
        let (read, write) = pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
        // A smaller pipe still works: keep what the kernel allows.
        let _ = fcntl_setpipe_size(&write, PIPE_SIZE);
        let size = fcntl_getpipe_size(&write)?;
        Ok(Pipe {
            read,
            write,
            held: 0,
            size,
        })
    }

    /// What the pipe holds, read out (a takeover hands it over as pending bytes).
    fn drain(&mut self, into: &mut Vec<u8>) {
        let mut chunk = [0u8; BUFFER];
        while self.held > 0 {
            match rustix::io::read(&self.read, &mut chunk[..self.held.min(BUFFER)]) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    into.extend_from_slice(&chunk[..n]);
                    self.held -= n;
                }
            }
        }
    }
}

fn splice_flags() -> rustix::pipe::SpliceFlags {
    rustix::pipe::SpliceFlags::NONBLOCK | rustix::pipe::SpliceFlags::MOVE
}

impl Direction {
    fn new(flow: Flow, carry: Carry) -> Self {
        let pipe = match carry {
            Carry::Copy => None,
            Carry::Splice => Pipe::new()
                .map_err(|e| tracing::debug!(error = %e, "no pipe for splicing: copying"))
                .ok(),
        };
        // A buffer only for the bytes handed in: copying takes one when bytes come.
        let buf = flow.pending.into_boxed_slice();
        let end = buf.len();
        Direction {
            buf,
            start: 0,
            end,
            pipe,
            read_closed: flow.read_closed,
            write_shut: flow.write_shut,
        }
    }

    /// Reads past the urgent mark into the buffer, for the next turn to write on.
    fn recv_past_mark(&mut self, from: &TcpStream, moved: &mut bool) -> io::Result<()> {
        match recv_past_mark(from, &mut self.buf) {
            Ok(0) => self.read_closed = true,
            Ok(n) => {
                (self.start, self.end) = (0, n);
                *moved = true;
            }
            // Past the mark, nothing more yet: wait for it.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        Ok(())
    }

    /// After `from` reset: passes on what `from` sent before its reset (bytes this direction
    /// holds, and those still queued on `from`, which Linux keeps readable after a reset), then
    /// waits for `to`'s peer to have taken every byte sent to it, within `limit`; the caller
    /// resets `to` next, and a reset drops what a socket still holds. A peer of the side that
    /// reset would have read all of it before the reset: through the agent, the bytes it took
    /// and had not passed on yet were lost.
    async fn flush_before_reset(
        &mut self,
        (from, to): (&mut TcpStream, &mut TcpStream),
        limit: Duration,
    ) {
        let flushed = async {
            // No FIN: the reset follows. Reading `from` ends at its end or its error.
            self.write_shut = true;
            let _ = poll_fn(|cx| self.poll(cx, from, to, &mut false)).await;
            // Until taken, or until the peer stops taking (one that waits to write its own
            // answer, which nobody reads any more, never will).
            let (mut wait, mut unsent, mut stalled) = (Duration::from_millis(5), usize::MAX, 0);
            loop {
                let now = unsent_bytes(to);
                stalled = if now < unsent { 0 } else { stalled + 1 };
                if now == 0 || stalled > 3 || !can_still_send(to) {
                    break;
                }
                unsent = now;
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_millis(50));
            }
        };
        let _ = tokio::time::timeout(limit, flushed).await;
    }

    /// Whether the stream is between its start and its end in this direction: bytes held, or
    /// its FIN read (the connection half-closed: both FINs end the pump).
    fn mid_stream(&self) -> bool {
        self.start < self.end || self.pipe.as_ref().is_some_and(|p| p.held > 0) || self.read_closed
    }

    fn into_flow(mut self) -> Flow {
        let mut pending = self.buf[self.start..self.end].to_vec();
        if let Some(pipe) = &mut self.pipe {
            pipe.drain(&mut pending);
        }
        Flow {
            pending,
            read_closed: self.read_closed,
            write_shut: self.write_shut,
        }
    }

    /// Moves bytes until `from` has closed and everything is written (then `to` is shut down
    /// for writing), or nothing can move now.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut TcpStream,
        to: &mut TcpStream,
        moved: &mut bool,
    ) -> Poll<io::Result<()>> {
        // Whether a read of this wakeup brought bytes: one that brings none though the socket
        // was said readable may be stopped at urgent data (below).
        let mut read_bytes = false;
        loop {
            if self.start < self.end {
                let n = ready!(Pin::new(&mut *to).poll_write(cx, &self.buf[self.start..self.end]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.start += n;
                if self.start == self.end {
                    // Written: held no longer.
                    (self.buf, self.start, self.end) = (Box::default(), 0, 0);
                }
                *moved = true;
                continue;
            }
            if let Some(pipe) = &mut self.pipe {
                if pipe.held > 0 {
                    ready!(to.poll_write_ready(cx))?;
                    let out = to.try_io(Interest::WRITABLE, || {
                        Ok(rustix::pipe::splice(
                            &pipe.read,
                            None,
                            &*to,
                            None,
                            pipe.held,
                            splice_flags(),
                        )?)
                    });
                    match out {
                        Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                        Ok(n) => {
                            pipe.held -= n;
                            *moved = true;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Poll::Ready(Err(e)),
                    }
                    continue;
                }
            }
            if self.read_closed {
                if !self.write_shut {
                    ready!(Pin::new(&mut *to).poll_shutdown(cx))?;
                    self.write_shut = true;
                }
                return Poll::Ready(Ok(()));
            }
            if let Some(pipe) = &mut self.pipe {
                ready!(from.poll_read_ready(cx))?;
                // The pipe is empty here: only the socket can make this wait.
                let input = from.try_io(Interest::READABLE, || {
                    Ok(rustix::pipe::splice(
                        &*from,
                        None,
                        &pipe.write,
                        None,
                        pipe.size,
                        splice_flags(),
                    )?)
                });
                match input {
                    // splice(2) stops at TCP urgent data (MSG_OOB: telnet's Synch, FTP's ABOR, a
                    // database's break) and says EAGAIN for as long as the urgent byte waits
                    // there, or 0 once the peer's FIN came: every byte after it was lost, or the
                    // stream stalled. A recv(2) there goes past it (without the urgent byte, as
                    // the copy pump's reads do: it cannot be passed on as urgent either).
                    // Asked (one system call) at an end, or when the wakeup's first read
                    // brought nothing: what a stop at the mark looks like; not after each burst.
                    Ok(0) if at_urgent_mark(from) => self.recv_past_mark(from, moved)?,
                    Err(e)
                        if e.kind() == io::ErrorKind::WouldBlock
                            && !read_bytes
                            && at_urgent_mark(from) =>
                    {
                        self.recv_past_mark(from, moved)?
                    }
                    Ok(0) => self.read_closed = true,
                    Ok(n) => {
                        pipe.held = n;
                        read_bytes = true;
                        *moved = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Poll::Ready(Err(e)),
                }
                continue;
            }
            // Copying reads into the worker's scratch buffer and writes on at once: a direction
            // keeps bytes of its own only when its destination did not take them all (an idle
            // relay holds none; two buffers of 16 KiB each held for a connection's life were
            // 3 GiB at 100,000 idle database connections through the agent).
            let copied = SCRATCH.with_borrow_mut(|scratch| {
                let mut read = ReadBuf::new(scratch);
                ready!(Pin::new(&mut *from).poll_read(cx, &mut read))?;
                let n = read.filled().len();
                if n == 0 {
                    return Poll::Ready(Ok(0));
                }
                let written = match Pin::new(&mut *to).poll_write(cx, &scratch[..n]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(written)) => written,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => 0,
                };
                if written < n {
                    self.buf = scratch[written..n].into();
                    (self.start, self.end) = (0, n - written);
                }
                Poll::Ready(Ok(n))
            });
            match ready!(copied)? {
                0 => self.read_closed = true,
                _ => *moved = true,
            }
        }
    }
}

/// `socket`'s TCP state (`tcpi_state` of `TCP_INFO`), if it can be read.
fn tcp_state(socket: &TcpStream) -> Option<u8> {
    use std::os::fd::AsRawFd as _;
    // Only the first byte, the state: the kernel copies as much of its `tcp_info` as asked.
    let mut info = [0u8; 8];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: TCP_INFO writes at most `len` bytes into `info`, which outlives the call.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &raw mut len,
        )
    };
    (rc == 0 && len >= 1).then_some(info[0])
}

/// `<netinet/tcp.h>`'s state of a socket reset, or closed for good.
const TCP_CLOSE: u8 = 7;

/// The socket's peer reset it (or it closed for good): a failed pump's side that went.
fn was_reset(socket: &TcpStream) -> bool {
    tcp_state(socket) == Some(TCP_CLOSE)
}

/// The socket may still send what it holds to its peer: it has not been reset (a FIN it sent or
/// got leaves its queue going).
fn can_still_send(socket: &TcpStream) -> bool {
    tcp_state(socket).is_some_and(|state| state != TCP_CLOSE)
}

/// Bytes written to `socket` that its peer has not acknowledged yet (`SIOCOUTQ`); 0 when unknown.
fn unsent_bytes(socket: &TcpStream) -> usize {
    /// `<asm-generic/sockios.h>`: `TIOCOUTQ`, which sockets answer as `SIOCOUTQ`.
    const SIOCOUTQ: libc::Ioctl = 0x5411;
    socket_ioctl(socket, SIOCOUTQ).map_or(0, |unsent| usize::try_from(unsent).unwrap_or(0))
}

/// Whether the socket's next byte to read is TCP urgent data.
fn at_urgent_mark(socket: &TcpStream) -> bool {
    /// `<asm-generic/sockios.h>` (the libc crate does not name it).
    const SIOCATMARK: libc::Ioctl = 0x8905;
    socket_ioctl(socket, SIOCATMARK).is_some_and(|at| at != 0)
}

/// What an ioctl that answers one int says of `socket` (`None`: it failed).
fn socket_ioctl(socket: &TcpStream, request: libc::Ioctl) -> Option<libc::c_int> {
    use std::os::fd::AsRawFd as _;
    let mut answer: libc::c_int = 0;
    // SAFETY: the requests passed write one int through the pointer, which outlives the call.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), request, &raw mut answer) };
    (rc == 0).then_some(answer)
}

/// Reads what follows the urgent mark into `buf` (grown to hold a chunk); 0 at the end.
fn recv_past_mark(socket: &TcpStream, buf: &mut Box<[u8]>) -> io::Result<usize> {
    use std::os::fd::AsRawFd as _;
    if buf.len() < BUFFER {
        *buf = vec![0; BUFFER].into_boxed_slice();
    }
    // SAFETY: `buf` is valid for writes of its length for the call's duration.
    let n = unsafe {
        libc::recv(
            socket.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    };
    match n {
        0.. => Ok(n as usize),
        _ => Err(io::Error::last_os_error()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (a.unwrap(), b.unwrap().0)
    }

    /// Copying, a direction takes its buffer when bytes come and gives it back once they are
    /// written and no more wait: an idle relay holds none.
    #[tokio::test]
    async fn a_copying_direction_holds_no_buffer_while_idle() {
        let (mut client, mut from) = pair().await;
        let (mut to, mut server) = pair().await;
        let mut direction = Direction::new(Flow::default(), Carry::Copy);
        assert!(direction.buf.is_empty(), "none before any byte");
        for round in 0..2 {
            client.write_all(b"hello").await.unwrap();
            std::future::poll_fn(|cx| {
                let mut moved = false;
                match direction.poll(cx, &mut from, &mut to, &mut moved) {
                    Poll::Pending if moved => Poll::Ready(()),
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(end) => panic!("the direction ended: {end:?}"),
                }
            })
            .await;
            let mut got = [0u8; 5];
            server.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"hello");
            assert!(
                direction.buf.is_empty(),
                "round {round}: none once idle again"
            );
        }
    }

    /// A client and a server with a pump of `pumps` between them, `ahead` going to the server
    /// first: the client, the server, and the pump's end.
    async fn pumping_between(
        pumps: &Arc<Pumps>,
        ahead: Flow,
    ) -> (TcpStream, TcpStream, tokio::task::JoinHandle<PumpEnd>) {
        let (client, agent_side) = pair().await;
        let (agent_up, server) = pair().await;
        let pumps = pumps.clone();
        let pumping = tokio::spawn(async move {
            pumps
                .run(agent_side, agent_up, ahead, Flow::default())
                .await
        });
        (client, server, pumping)
    }

    /// A server that sends its last bytes and resets (SO_LINGER 0, or a close with the client's
    /// bytes unread): its client reads every byte the server sent before the reset, as it would
    /// straight from the server. Before, the agent reset the client's side at once, dropping what
    /// it had taken from the server and not yet passed on (the client reads slowly).
    #[tokio::test]
    async fn bytes_sent_before_a_reset_reach_the_other_side_first() {
        for carry in [Carry::Splice, Carry::Copy] {
            for client_sends_unread in [false, true] {
                sent_before_reset(carry, client_sends_unread).await;
            }
        }
    }

    /// `client_sends_unread`: the client keeps sending bytes the server never reads, and the
    /// server's close (normal, not SO_LINGER 0) resets for them; the agent learns of the reset
    /// by a write to the server then, not a read.
    async fn sent_before_reset(carry: Carry, client_sends_unread: bool) {
        const SIZE: usize = 1 << 20;
        let pumps = Pumps::carrying(Duration::from_secs(60), carry);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        // A client with a small window: most of the answer waits in the agent's socket to it.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(8 * 1024).unwrap();
        let (client, accepted) = tokio::join!(
            socket.connect(listener.local_addr().unwrap()),
            listener.accept()
        );
        let (client, agent_side) = (client.unwrap(), accepted.unwrap().0);
        let (mut client, mut client_out) = client.into_split();
        let (agent_up, mut server) = pair().await;
        let pumping = {
            let pumps = pumps.clone();
            tokio::spawn(async move {
                pumps
                    .run(agent_side, agent_up, Flow::default(), Flow::default())
                    .await
            })
        };
        let (saturated, is_saturated) = tokio::sync::oneshot::channel();
        let sending = tokio::spawn(async move {
            // Until every buffer on the way to the server is full (a write makes no progress
            // for a while): the agent then holds bytes it cannot write to the server, and learns
            // of the reset by that write. The client stops writing first: a write of its own
            // waiting when the agent's reset comes would take the error, and its read then
            // ends as at a FIN (2 runs in 8 did).
            if client_sends_unread {
                let chunk = [1u8; 64 * 1024];
                let stalled = Duration::from_millis(200);
                while let Ok(Ok(())) =
                    tokio::time::timeout(stalled, client_out.write_all(&chunk)).await
                {
                }
            }
            let _ = saturated.send(());
            // Kept open: dropped, the write half would send a FIN.
            client_out
        });
        let serving = tokio::spawn(async move {
            server.write_all(&vec![7u8; SIZE]).await.unwrap();
            // Every byte taken by the agent, and the client's unread bytes waiting in the
            // server's socket (its close then resets), then an abortive close.
            while unsent_bytes(&server) > 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let _ = is_saturated.await;
            if !client_sends_unread {
                super::super::tcp::reset_on_close(&server);
            }
        });
        let mut received = 0;
        let mut chunk = [0u8; 4096];
        let ended = loop {
            match client.read(&mut chunk).await {
                Ok(0) => break "EOF".to_string(),
                Ok(n) => received += n,
                Err(e) => break e.kind().to_string(),
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        };
        serving.await.unwrap();
        drop(sending.await.unwrap());
        assert_eq!(
            (received, ended.as_str()),
            (SIZE, "connection reset"),
            "{carry:?}, client sends unread {client_sends_unread}: all, then the reset"
        );
        assert!(
            matches!(pumping.await.unwrap(), PumpEnd::Failed(_)),
            "{carry:?}"
        );
    }

    #[tokio::test]
    async fn a_paused_pump_resumes_where_it_left_off() {
        for carry in [Carry::Splice, Carry::Copy] {
            paused_pump_resumes(carry).await;
        }
    }

    async fn paused_pump_resumes(carry: Carry) {
        let pumps = Pumps::carrying(Duration::from_secs(60), carry);
        let (mut client, mut server, pumping) = pumping_between(&pumps, Flow::default()).await;
        client.write_all(b"before").await.unwrap();
        let mut got = [0u8; 6];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"before");
        while pumps.is_empty() {
            tokio::task::yield_now().await;
        }
        let mut paused = pumps.pause_all().await;
        assert_eq!(pumping.await.unwrap(), PumpEnd::HandedOver);
        assert_eq!(paused.len(), 1);
        let p = paused.pop().unwrap();
        // Bytes sent while nobody pumps wait in the kernel; the next pump carries them.
        client.write_all(b"between").await.unwrap();
        let resumed = {
            let pumps = pumps.clone();
            tokio::spawn(async move { pumps.resume(p).unwrap().await })
        };
        let mut got = [0u8; 7];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"between");
        server.write_all(b"back").await.unwrap();
        drop(server);
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(
            back, b"back",
            "the server's FIN is passed on after its bytes"
        );
        drop(client);
        assert_eq!(resumed.await.unwrap(), PumpEnd::Closed);
        assert!(pumps.is_empty());
    }

    #[tokio::test]
    async fn pending_bytes_are_written_first_and_idle_pumps_end() {
        for carry in [Carry::Splice, Carry::Copy] {
            pending_bytes_first(carry).await;
        }
    }

    async fn pending_bytes_first(carry: Carry) {
        let pumps = Pumps::carrying(Duration::from_millis(300), carry);
        let ahead = Flow {
            pending: b"read ahead ".to_vec(),
            ..Flow::default()
        };
        let (mut client, mut server, pumping) = pumping_between(&pumps, ahead).await;
        client.write_all(b"then this").await.unwrap();
        let mut got = [0u8; 20];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"read ahead then this");
        assert_eq!(pumping.await.unwrap(), PumpEnd::Idle);
    }

    /// An idle timeout that cuts a stream short resets both sides: with bytes held for a side
    /// that stopped reading, or after a client's FIN while its answer may still come. Before,
    /// both got a FIN: a truncated upload, or an empty answer, looked like an orderly end.
    #[tokio::test]
    async fn an_idle_timeout_that_cuts_a_stream_short_resets_it() {
        for carry in [Carry::Splice, Carry::Copy] {
            for half_closed in [false, true] {
                let pumps = Pumps::carrying(Duration::from_millis(300), carry);
                let (mut client, mut server, pumping) =
                    pumping_between(&pumps, Flow::default()).await;
                if half_closed {
                    client.write_all(b"query").await.unwrap();
                    client.shutdown().await.unwrap();
                } else {
                    // More than the sockets and the pipe hold: the server reads nothing.
                    let upload = vec![7u8; 8 << 20];
                    let _ = tokio::time::timeout(Duration::from_secs(2), client.write_all(&upload))
                        .await;
                }
                assert_eq!(pumping.await.unwrap(), PumpEnd::Idle, "{carry:?}");
                // The side cut short: the client waiting for its answer, the server reading the
                // upload.
                let waiting = if half_closed {
                    &mut client
                } else {
                    &mut server
                };
                let mut got = Vec::new();
                let read = waiting.read_to_end(&mut got).await;
                assert_eq!(
                    read.map_err(|e| e.kind()),
                    Err(io::ErrorKind::ConnectionReset),
                    "{carry:?}, half-closed: {half_closed}"
                );
            }
        }
    }

    /// TCP urgent data (MSG_OOB) does not stop a pump: what follows it is carried. splice(2)
    /// stops at the urgent mark; before, the splice pump stalled there, or (the peer's FIN come)
    /// took it for the stream's end and dropped the rest. The urgent byte itself is not carried
    /// (recv(2) skips it, and it could not be sent on as urgent), by either pump.
    #[tokio::test]
    async fn urgent_data_does_not_stop_a_pump() {
        use std::os::fd::AsRawFd as _;
        for carry in [Carry::Splice, Carry::Copy] {
            let pumps = Pumps::carrying(Duration::from_secs(60), carry);
            let (mut client, mut server, pumping) = pumping_between(&pumps, Flow::default()).await;
            // "!" is the urgent byte.
            // SAFETY: a send(2) of a valid buffer on our own socket.
            let sent =
                unsafe { libc::send(client.as_raw_fd(), b"ab!".as_ptr().cast(), 3, libc::MSG_OOB) };
            assert_eq!(sent, 3);
            client.write_all(b" and the rest").await.unwrap();
            client.shutdown().await.unwrap();
            let mut got = Vec::new();
            tokio::time::timeout(Duration::from_secs(5), server.read_to_end(&mut got))
                .await
                .unwrap_or_else(|_| panic!("{carry:?}: stalled after {got:?}"))
                .unwrap();
            assert_eq!(
                String::from_utf8_lossy(&got),
                "ab and the rest",
                "{carry:?}"
            );
            drop((client, server));
            let _ = pumping.await;
        }
    }

    /// Says the sockets it was given may be paired.
    struct Paired(Vec<std::os::fd::RawFd>);

    impl Pairing for Paired {
        fn may_be_paired(&self, socket: BorrowedFd<'_>) -> bool {
            use std::os::fd::AsRawFd as _;
            self.0.contains(&socket.as_raw_fd())
        }
    }

    #[tokio::test]
    async fn a_pump_copies_if_the_kernel_may_pair_either_of_its_sockets() {
        use std::os::fd::AsRawFd as _;
        let counts = Arc::new(PumpCounts::default());
        let pumps = Pumps::counted(Duration::from_secs(60), Carry::Splice, counts.clone());
        let mut carried = Vec::new();
        for paired in ["neither", "client", "upstream"] {
            let (mut client, agent_side) = pair().await;
            let (agent_up, mut server) = pair().await;
            let fds = match paired {
                "client" => vec![agent_side.as_raw_fd()],
                "upstream" => vec![agent_up.as_raw_fd()],
                _ => Vec::new(),
            };
            pumps.tell_pairing(Arc::new(Paired(fds)));
            let before = counts.totals();
            let pumping =
                tokio::spawn(pumps.run(agent_side, agent_up, Flow::default(), Flow::default()));
            client.write_all(b"ping").await.unwrap();
            let mut got = [0u8; 4];
            server.read_exact(&mut got).await.unwrap();
            server.write_all(b"pong").await.unwrap();
            client.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"pong", "{paired} paired");
            carried.push(match counts.totals() {
                (s, _) if s > before.0 => Carry::Splice,
                _ => Carry::Copy,
            });
            drop((client, server));
            assert_eq!(pumping.await.unwrap(), PumpEnd::Closed);
        }
        assert_eq!(carried, [Carry::Splice, Carry::Copy, Carry::Copy]);
        assert_eq!(counts.totals(), (1, 2));
    }

    /// A successor's records may no longer know the sockets a predecessor's programs paired: the
    /// answer travels with the paused pump, also from an agent configured to copy anyway to one
    /// that splices.
    #[tokio::test]
    async fn a_resumed_pump_keeps_the_answer_its_sockets_got() {
        let counts = Arc::new(PumpCounts::default());
        let copying = Pumps::counted(Duration::from_secs(60), Carry::Copy, counts.clone());
        let pumps = Pumps::counted(Duration::from_secs(60), Carry::Splice, counts.clone());
        let (mut client, agent_side) = pair().await;
        let (agent_up, mut server) = pair().await;
        copying.tell_pairing(Arc::new(AnyMayBePaired));
        let pumping =
            tokio::spawn(copying.run(agent_side, agent_up, Flow::default(), Flow::default()));
        let mut got = [0u8; 4];
        client.write_all(b"ping").await.unwrap();
        server.read_exact(&mut got).await.unwrap();
        let paused = copying.pause_all().await.pop().unwrap();
        assert_eq!(pumping.await.unwrap(), PumpEnd::HandedOver);
        assert_eq!(paused.paired, Some(true));
        pumps.tell_pairing(Arc::new(Paired(Vec::new())));
        let resumed = tokio::spawn(pumps.resume(paused).unwrap());
        server.write_all(b"pong").await.unwrap();
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"pong");
        drop((client, server));
        assert_eq!(resumed.await.unwrap(), PumpEnd::Closed);
        assert_eq!(counts.totals(), (0, 2), "copied before and after");
    }

    /// A takeover while the receiver reads nothing: what the pipe (or buffer) holds is handed
    /// over and arrives, in order, with everything after it.
    #[tokio::test]
    async fn bytes_held_in_the_kernel_pipe_are_handed_over() {
        const TOTAL: usize = 32 * 1024 * 1024;
        let pumps = Pumps::carrying(Duration::from_secs(60), Carry::Splice);
        let (mut client, mut server, pumping) = pumping_between(&pumps, Flow::default()).await;
        let pattern = |i: usize| (i % 251) as u8;
        let data: Vec<u8> = (0..TOTAL).map(pattern).collect();
        let written = Arc::new(AtomicU64::new(0));
        let writer = tokio::spawn({
            let written = written.clone();
            async move {
                for chunk in data.chunks(64 * 1024) {
                    client.write_all(chunk).await.unwrap();
                    written.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                }
                client
            }
        });
        // The server reads nothing yet: the buffers and the pipe fill up, until the writer
        // stalls.
        let mut last = u64::MAX;
        while written.load(Ordering::Relaxed) != last {
            last = written.load(Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut paused = pumps.pause_all().await;
        assert_eq!(pumping.await.unwrap(), PumpEnd::HandedOver);
        let p = paused.pop().unwrap();
        let held = p.to_upstream.pending.len();
        assert!(
            held > 0,
            "the pipe held bytes when the upstream could take no more"
        );
        let resumed = tokio::spawn({
            let pumps = pumps.clone();
            async move { pumps.resume(p).unwrap().await }
        });
        let mut got = vec![0u8; TOTAL];
        server.read_exact(&mut got).await.unwrap();
        assert!(
            got.iter().enumerate().all(|(i, b)| *b == pattern(i)),
            "every byte, in order ({held} were in the pipe at the takeover)"
        );
        drop(writer.await.unwrap());
        drop(server);
        assert_eq!(resumed.await.unwrap(), PumpEnd::Closed);
    }
}
