//! Hitless restart and upgrade: a new agent takes the listening sockets and the kernel redirect over
//! from the running one through a Unix socket (`--takeover-socket`), and the old one stops
//! accepting, finishes its in-flight requests and exits.
//!
//! ```text
//!  new agent                                   running agent (listens on the takeover socket)
//!  connect ─────────── Hello ──────────────────>
//!          <────────── Offer + descriptors ───── its listeners (admin, explicit, redirect), and
//!                                                the redirect's maps and bpf links (SCM_RIGHTS)
//!  first sync; serve on the same sockets         still accepting: both accept from one queue
//!  (the kernel programs and maps adopted, or ours loaded beside them: `redirect/takeover.rs`)
//!  Stop ─────────────────────────────────────>  stops its accept loops, closes its listener copies
//!          <────────── Stopped ─────────────────  then drains: `Connection: close`, GOAWAY, exits
//!  swap programs if ours differ; listen on the takeover socket for the next one
//! ```
//!
//! Why this leaves no window:
//! - **Accept queue.** The listener is one kernel socket held by both processes, never closed and
//!   never re-bound: a connection queued on it is accepted by whichever process calls accept(), and
//!   once the old one has stopped, by the new one. No queue to migrate, nothing reset. A
//!   client-first redirect listener the new agent does not have (another `--redirect-http`, or
//!   `off`) is served by it all the same until it stops accepting: the old programs steer there
//!   until ours are swapped in. (An agent older than these listeners closes it at once: a
//!   connection steered there in that instant is reset.)
//! - **connect() meanwhile.** The programs stay attached throughout (the new agent holds their link
//!   descriptors, so the old one exiting detaches nothing), and the listener stays in the sockmap.
//!   When the programs are swapped, ours are attached before the old connect programs are detached.
//!   No connect() ever misses the mesh and falls to kube-proxy's routing.
//! - **Redirect records.** Adopted maps are the same maps; swapped ones leave the predecessor's
//!   `CALLERS` readable by the new agent. The old agent stops accepting before any program of the
//!   new one steers, so it never accepts a connection whose record it cannot read.
//! - **Keep-alive connections on the old agent** finish their in-flight request, and are then
//!   closed the way clients expect (`proxy/listener.rs`: `Connection: close`, HTTP/2 GOAWAY, idle
//!   ones only after a quiet spell), so clients reconnect, to the new agent.
//!
//! Before Stop the takeover is undone by simply exiting: the old agent still holds everything. A
//! running agent that does not answer within the timeout is given up on: the new agent starts as
//! without one (binding its own sockets and replacing the programs, see `redirect/attach.rs`).

use crate::proxy::drain::Drain;
use crate::proxy::pump::{Flow, Paused, Pumps};
use crate::redirect::{Predecessor, Redirect, RedirectError, RedirectOffer};
use crate::telemetry::readiness::Readiness;
use serde::{Deserialize, Serialize};
use std::io::{self, IoSlice, IoSliceMut, Write as _};
use std::mem::MaybeUninit;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Version of the exchange below; both sides must speak the same one.
pub const PROTOCOL: u32 = 1;
/// At most this many descriptors in one message (listeners, 3 maps, 5 links leave ample room).
const MAX_FDS: usize = 64;
/// Largest message accepted. Most are a few hundred bytes of JSON; a paused connection carries
/// what its pump held in each direction, up to a pipe's 256 KiB, at up to 4 characters a byte
/// ("255,") in JSON: 2 MiB for both, and room to spare.
const MAX_MESSAGE: usize = 4 << 20;
/// How often a waiting session checks whether its agent is shutting down.
const POLL: Duration = Duration::from_millis(200);

/// An error of a takeover, phrased for the operator who has to act on it.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("{action}: {source}")]
    Io {
        action: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "the agent at the other end of the takeover socket ({peer}) spoke unexpectedly: {detail}. \
         Are both agents of compatible versions (takeover protocol {PROTOCOL})? Restart without a \
         takeover: stop the running agent, then start the new one"
    )]
    Protocol { peer: String, detail: String },
    #[error(
        "the running agent (pid {pid}) refused the takeover: {reason}. If it is busy with another \
         successor, wait and start this agent again; if the two cannot agree, stop the running \
         agent first (its pods use ordinary Service routing until this one has attached)"
    )]
    Refused { pid: u32, reason: String },
    #[error(
        "the process at the takeover socket runs as uid {uid}, not as this agent ({own}): \
         refusing to exchange sockets with it; check who created {path}"
    )]
    Untrusted { uid: u32, own: u32, path: PathBuf },
    #[error(transparent)]
    Redirect(#[from] RedirectError),
}

impl HandoverError {
    fn io(action: impl Into<String>, source: io::Error) -> Self {
        Self::Io {
            action: action.into(),
            source,
        }
    }
}

/// The messages, as length-prefixed JSON; descriptors travel with `Offer` only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Message {
    /// New agent → running agent: "hand me your sockets" (and, after Stopped, the live
    /// opaque and upgraded connections, if it `takes_connections`; agents before this field
    /// take none).
    Hello {
        protocol: u32,
        #[serde(default)]
        takes_connections: bool,
    },
    /// Running agent → new agent. Descriptors: `listeners` in order, then the redirect's (see
    /// [`RedirectOffer`]).
    Offer {
        protocol: u32,
        version: String,
        listeners: Vec<SocketAddr>,
        redirect: Option<RedirectOffer>,
    },
    /// New agent → running agent: "everything you served, I serve: stop accepting".
    Stop,
    /// Running agent → new agent: "none of my accept loops runs any more".
    Stopped,
    /// Running agent → new agent, after Stopped, one per connection: a paused byte pump.
    /// Descriptors: the client's socket, then the upstream's. `paired`: see [`Paused::paired`]
    /// (absent from agents before it).
    Connection {
        to_upstream: Flow,
        to_client: Flow,
        #[serde(default)]
        paired: Option<bool>,
    },
    /// Running agent → new agent: every connection was sent.
    ConnectionsDone,
    /// Running agent → new agent: no takeover now.
    Refused { reason: String },
}

// ---------------------------------------------------------------------------------------------
// The new agent's side.

/// What a new agent got from the running one: listeners to serve on instead of binding, the
/// redirect to take over, and the session to tell the old agent to stop. Empty when there was
/// no running agent.
#[derive(Debug, Default)]
pub struct Inherited {
    listeners: Vec<TcpListener>,
    redirect: Option<Predecessor>,
    session: Option<Session>,
    /// The pid of a running agent that did not answer in time (it may still hold the ports).
    silent: Option<u32>,
}

#[derive(Debug)]
struct Session {
    stream: UnixStream,
    pid: u32,
    /// From connecting to holding the descriptors.
    offer_took: Duration,
}

/// How a takeover went, for logs and metrics, and the connections it brought.
#[derive(Debug)]
pub struct Handover {
    /// The old agent's pid.
    pub pid: u32,
    /// From connecting to the takeover socket to holding its descriptors.
    pub offer_took: Duration,
    /// From Stop to Stopped: how long both agents accepted side by side at the end. `None`: no
    /// answer in time (see [`Inherited::finish`]).
    pub stop_took: Option<Duration>,
    /// The old agent's opaque and upgraded connections, paused: this agent pumps them on.
    pub connections: Vec<Paused>,
}

/// Asks the agent listening on `path` for its sockets. No agent there (no socket, or nobody
/// listening): an empty [`Inherited`], a normal start. An agent that does not answer within
/// `timeout`: given up on, also an empty [`Inherited`] (logged). Errors: the other side refused,
/// is not trusted, or answered nonsense.
pub fn inherit(path: &Path, timeout: Duration) -> Result<Inherited, HandoverError> {
    let stream = match UnixStream::connect(path) {
        Ok(stream) => stream,
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ECONNREFUSED)) => {
            tracing::info!(socket = %path.display(), "no running agent to take over from; starting fresh");
            return Ok(Inherited::default());
        }
        Err(e) => {
            return Err(HandoverError::io(
                format!("connecting to the takeover socket {}", path.display()),
                e,
            ))
        }
    };
    let started = Instant::now();
    let peer = trusted_peer(&stream, path)?;
    let offered = stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .and_then(|()| {
            let hello = Message::Hello {
                protocol: PROTOCOL,
                takes_connections: true,
            };
            send(&stream, &hello, &[])
        })
        .and_then(|()| recv(&stream));
    let (message, fds) = match offered {
        Ok(answer) => answer,
        Err(e) if is_timeout(&e) => {
            tracing::warn!(
                pid = peer.pid,
                ?timeout,
                "the running agent did not offer its sockets in time; starting without it (its \
                 programs are replaced; its ports must be free: stop it if binding fails)"
            );
            return Ok(Inherited {
                silent: Some(peer.pid),
                ..Inherited::default()
            });
        }
        Err(e) if is_disconnect(&e) => {
            tracing::info!(
                pid = peer.pid,
                "the running agent closed the takeover socket; starting fresh"
            );
            return Ok(Inherited::default());
        }
        Err(e) => return Err(HandoverError::io("receiving the running agent's offer", e)),
    };
    let (listeners, redirect) = match message {
        Message::Offer {
            protocol: PROTOCOL,
            version,
            listeners,
            redirect,
        } => {
            tracing::info!(pid = peer.pid, %version, ?listeners, redirect = redirect.is_some(), "offered the running agent's sockets");
            (listeners, redirect)
        }
        Message::Refused { reason } => {
            return Err(HandoverError::Refused {
                pid: peer.pid,
                reason,
            })
        }
        other => return Err(peer.protocol(format!("expected an offer, got {other:?}"))),
    };
    let expected = listeners.len() + redirect.as_ref().map_or(0, RedirectOffer::fd_count);
    if fds.len() != expected {
        return Err(peer.protocol(format!(
            "{} descriptors came with an offer of {expected}",
            fds.len()
        )));
    }
    let mut fds = fds.into_iter();
    let listeners = fds
        .by_ref()
        .take(listeners.len())
        .map(|fd| listener_from(fd, &peer))
        .collect::<Result<_, _>>()?;
    let redirect = redirect
        .map(|offer| Predecessor::new(offer, fds.collect()))
        .transpose()?;
    Ok(Inherited {
        listeners,
        redirect,
        session: Some(Session {
            stream,
            pid: peer.pid,
            offer_took: started.elapsed(),
        }),
        silent: None,
    })
}

impl Inherited {
    /// The pid of the agent being taken over, if any.
    pub fn predecessor(&self) -> Option<u32> {
        self.session.as_ref().map(|s| s.pid)
    }

    /// Why binding `addr` may fail with "address in use", for the error message: a running agent
    /// that handed over other sockets, or did not answer.
    pub fn bind_hint(&self) -> Option<String> {
        if let Some(pid) = self.predecessor() {
            return Some(format!(
                "the running agent (pid {pid}) did not hand this socket over; give this agent the \
                 running one's addresses, or stop the running one first"
            ));
        }
        self.silent.map(|pid| match pid {
            // Another pid namespace (another pod): its pid means nothing here.
            0 => "the agent at the takeover socket (in another pod) did not answer and may still \
                  hold it: stop it, then start this one"
                .to_string(),
            pid => format!(
                "the agent at the takeover socket (pid {pid}) did not answer and may still hold \
                 it: stop it (kill {pid}), then start this one"
            ),
        })
    }

    /// Whether a listening socket bound to `addr` was inherited.
    pub fn holds(&self, addr: SocketAddr) -> bool {
        self.position(addr).is_some()
    }

    fn position(&self, addr: SocketAddr) -> Option<usize> {
        self.listeners
            .iter()
            .position(|l| l.local_addr().is_ok_and(|bound| bound == addr))
    }

    /// The inherited listening socket bound to `addr`, if any: serve on it instead of binding.
    pub fn listener(&mut self, addr: SocketAddr) -> Option<TcpListener> {
        let index = self.position(addr)?;
        Some(self.listeners.swap_remove(index))
    }

    /// Resolves once the running agent went before this one told it to stop (it crashed, or was
    /// killed): its end of the session closed. Pending for ever when there is none. Until Stop
    /// the running agent sends nothing, so the session only ever reads as closed.
    pub fn predecessor_gone(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let watched = self
            .session
            .as_ref()
            .and_then(|s| s.stream.try_clone().ok());
        async move {
            let Some(stream) = watched else {
                return std::future::pending().await;
            };
            let (gone, gone_rx) = tokio::sync::oneshot::channel::<()>();
            // A thread of its own, asking every half second whether anybody still waits: the
            // session is a blocking socket, and making a copy non-blocking would make it so for
            // the takeover's own exchange too.
            let watcher = std::thread::Builder::new()
                .name("predecessor-watch".into())
                .spawn(move || {
                    use rustix::event::{poll, PollFd, PollFlags, Timespec};
                    let half_second = Timespec {
                        tv_sec: 0,
                        tv_nsec: 500_000_000,
                    };
                    while !gone.is_closed() {
                        let mut fds = [PollFd::new(&stream, PollFlags::RDHUP)];
                        if poll(&mut fds, Some(&half_second)).is_err() {
                            continue;
                        }
                        let closed = PollFlags::RDHUP | PollFlags::HUP | PollFlags::ERR;
                        if fds[0].revents().intersects(closed) {
                            let _ = gone.send(());
                            return;
                        }
                    }
                });
            if watcher.is_err() || gone_rx.await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Lets go of the programs and maps inherited from a running agent that is gone
    /// ([`Self::predecessor_gone`]): nobody else holds its links, so the programs detach and
    /// pods take ordinary Service routing until this agent attaches its own, instead of being
    /// steered to a listener nobody accepts on yet. The listeners are kept: what their queues
    /// hold is served once this agent is, and an agent that stops normally may still hold its
    /// copies (binding the addresses afresh would fail).
    pub fn let_go_of_redirect(&mut self) {
        self.redirect = None;
    }

    /// The running agent's redirect, to pass to [`Redirect::take_over`].
    pub fn take_redirect(&mut self) -> Option<Predecessor> {
        self.redirect.take()
    }

    /// Whether the running agent's sockets may be paired by the kernel programs (its offer says
    /// so): then none of what this agent serves may be spliced, from its first connection on.
    pub fn sockets_may_be_paired(&self) -> bool {
        self.redirect
            .as_ref()
            .is_some_and(|p| p.offer().local_sockets)
    }

    /// Tells the old agent to stop accepting and waits (up to `timeout`) until it has. Call it
    /// once everything of this agent serves: from the answer on, this agent alone accepts.
    /// Inherited sockets nobody took (the new configuration no longer has them) are closed.
    ///
    /// No answer in time: `stop_took` is `None`; the old agent is most likely hung (and then
    /// accepts nothing), or it went away.
    pub fn finish(mut self, timeout: Duration) -> Result<Option<Handover>, HandoverError> {
        for unused in self.listeners.drain(..) {
            let addr = unused.local_addr().ok();
            tracing::warn!(
                ?addr,
                "the running agent's listener is not in this agent's configuration; closing it"
            );
        }
        let Some(session) = self.session.take() else {
            return Ok(None);
        };
        let started = Instant::now();
        let answer = session
            .stream
            .set_read_timeout(Some(timeout))
            .and_then(|()| send(&session.stream, &Message::Stop, &[]))
            .and_then(|()| recv(&session.stream));
        let stop_took = match answer {
            Ok((Message::Stopped, _)) => Some(started.elapsed()),
            // Gone: it accepts nothing any more either.
            Err(e) if is_disconnect(&e) => Some(started.elapsed()),
            Err(e) if is_timeout(&e) => {
                tracing::warn!(
                    pid = session.pid,
                    ?timeout,
                    "the old agent did not confirm it stopped accepting"
                );
                None
            }
            Ok((other, _)) => {
                return Err(HandoverError::Protocol {
                    peer: format!("pid {}", session.pid),
                    detail: format!("expected Stopped, got {other:?}"),
                })
            }
            Err(e) => return Err(HandoverError::io("asking the old agent to stop", e)),
        };
        let connections = match stop_took {
            Some(_) => receive_connections(&session.stream, session.pid),
            None => Vec::new(),
        };
        Ok(Some(Handover {
            pid: session.pid,
            offer_took: session.offer_took,
            stop_took,
            connections,
        }))
    }
}

/// The old agent's paused connections, sent after Stopped until ConnectionsDone (or until it
/// closes the session: an agent that predates connection handover sends none). The old agent no
/// longer accepts by now, so a failure here must not end this agent: it keeps what came (the
/// old agent pumps on the connections it could not send) and says why the rest did not.
fn receive_connections(stream: &UnixStream, pid: u32) -> Vec<Paused> {
    let mut connections = Vec::new();
    if let Err(e) = receive_each_connection(stream, pid, &mut connections) {
        tracing::warn!(pid, received = connections.len(), error = %e, "receiving the old agent's connections failed; it keeps the rest until its drain deadline");
    }
    connections
}

/// Adds each connection received to `connections` until the old agent says it is done.
fn receive_each_connection(
    stream: &UnixStream,
    pid: u32,
    connections: &mut Vec<Paused>,
) -> Result<(), HandoverError> {
    loop {
        match recv(stream) {
            Ok((
                Message::Connection {
                    to_upstream,
                    to_client,
                    paired,
                },
                fds,
            )) => {
                let [client, upstream]: [OwnedFd; 2] =
                    fds.try_into()
                        .map_err(|fds: Vec<_>| HandoverError::Protocol {
                            peer: format!("pid {pid}"),
                            detail: format!(
                                "a connection came with {} descriptors, not 2",
                                fds.len()
                            ),
                        })?;
                connections.push(Paused {
                    client: client.into(),
                    upstream: upstream.into(),
                    to_upstream,
                    to_client,
                    paired,
                });
            }
            Ok((Message::ConnectionsDone, _)) => return Ok(()),
            Err(e) if is_disconnect(&e) || is_timeout(&e) => return Ok(()),
            Ok((other, _)) => {
                return Err(HandoverError::Protocol {
                    peer: format!("pid {pid}"),
                    detail: format!("expected a connection, got {other:?}"),
                })
            }
            Err(e) => {
                return Err(HandoverError::io(
                    "receiving the old agent's connections",
                    e,
                ))
            }
        }
    }
}

/// A listening TCP socket received from the running agent (checked: TCP, listening).
fn listener_from(fd: OwnedFd, peer: &Peer) -> Result<TcpListener, HandoverError> {
    use rustix::net::{ipproto, sockopt};
    let inspect =
        |e: rustix::io::Errno| HandoverError::io("inspecting a listener handed over", e.into());
    let listening = sockopt::socket_acceptconn(&fd).map_err(inspect)?;
    let protocol = sockopt::socket_protocol(&fd).map_err(inspect)?;
    if !listening || protocol != Some(ipproto::TCP) {
        return Err(peer
            .protocol("a descriptor offered as a listener is not a listening TCP socket".into()));
    }
    Ok(TcpListener::from(fd))
}

// ---------------------------------------------------------------------------------------------
// The running agent's side.

/// The listening sockets a running agent hands to a successor: duplicates of its own, so they are
/// still there to offer while its accept loops own theirs.
#[derive(Debug, Default)]
pub struct Offered {
    listeners: Vec<(SocketAddr, OwnedFd)>,
    /// While a successor holds the offer, and for good once one took over or this agent shuts
    /// down (`closed`): no listener opens meanwhile (a successor would not get it, and it would
    /// hold an address the successor binds).
    frozen: bool,
    closed: bool,
    /// Told when a successor went away before Stop: a listener held back meanwhile may open.
    thawed: Arc<tokio::sync::Notify>,
}

/// A listener's copy made before it serves, kept by [`Offered::keep`] once it does.
pub struct ListenerCopy(SocketAddr, OwnedFd);

impl Offered {
    pub fn add(&mut self, listener: &TcpListener) -> io::Result<()> {
        let copy = Self::copy(listener)?;
        self.keep(copy);
        Ok(())
    }

    pub fn copy(listener: &TcpListener) -> io::Result<ListenerCopy> {
        Ok(ListenerCopy(
            listener.local_addr()?,
            listener.as_fd().try_clone_to_owned()?,
        ))
    }

    pub fn keep(&mut self, ListenerCopy(addr, fd): ListenerCopy) {
        self.listeners.push((addr, fd));
    }

    /// Whether a listener may open now (see `frozen`).
    pub fn is_frozen(&self) -> bool {
        self.frozen
    }

    /// Notified when a successor went away before Stop (see `thawed`).
    pub fn thawed(&self) -> Arc<tokio::sync::Notify> {
        self.thawed.clone()
    }

    /// Lets the copies go, for good: a successor has its own, or the listeners must close.
    fn close(&mut self) {
        self.listeners.clear();
        self.frozen = true;
        self.closed = true;
    }
}

/// Serves takeover requests of successors until one has taken over. Dropping it (on a normal
/// shutdown, before draining) stops serving, removes the socket file and closes the listener
/// copies, so that the listeners really close and pods fall back to ordinary Service routing.
pub struct Successors {
    /// Whether this agent shuts down alone or was taken over: decided once, by whichever comes
    /// first, SIGTERM or a successor's Stop.
    ending: Arc<Mutex<Ending>>,
    path: PathBuf,
    /// (device, inode) of the socket file this agent created: removed on shutdown only if still
    /// that one. `None` once a successor took over.
    file: Option<(u64, u64)>,
    offered: Arc<Mutex<Offered>>,
    closing: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
    taken_over: Option<tokio::sync::oneshot::Receiver<u32>>,
}

impl Successors {
    /// Listens on `path` (replacing the socket file of an earlier agent atomically: a successor
    /// connecting meanwhile reaches one or the other). Must run inside the agent's runtime.
    pub fn serve(
        path: &Path,
        offered: Offered,
        redirect: Option<Arc<Redirect>>,
        (drain, pumps, readiness): (Drain, Arc<Pumps>, Arc<Readiness>),
    ) -> Result<Self, HandoverError> {
        let temporary = path.with_extension(format!("{}.tmp", std::process::id()));
        let _ = std::fs::remove_file(&temporary);
        let bind = || -> io::Result<UnixListener> {
            let listener = UnixListener::bind(&temporary)?;
            // Whoever connects gets the agent's sockets and bpf links: root (the owner) only.
            std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(0o600))?;
            std::fs::rename(&temporary, path)?;
            listener.set_nonblocking(true)?;
            Ok(listener)
        };
        let listener = bind().map_err(|e| {
            let _ = std::fs::remove_file(&temporary);
            HandoverError::io(
                format!(
                    "listening on the takeover socket {} (its folder must exist and be writable)",
                    path.display()
                ),
                e,
            )
        })?;
        let meta = std::fs::metadata(path)
            .map_err(|e| HandoverError::io(format!("reading {}", path.display()), e))?;
        let listener = tokio::net::UnixListener::from_std(listener)
            .map_err(|e| HandoverError::io("registering the takeover socket", e))?;
        let offered = Arc::new(Mutex::new(offered));
        let closing = Arc::new(AtomicBool::new(false));
        let ending = Arc::new(Mutex::new(Ending::Serving));
        let (done, taken_over) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(accept_successors(
            listener,
            Arc::new(OfferState {
                ending: ending.clone(),
                path: path.to_owned(),
                offered: offered.clone(),
                redirect,
                drain,
                pumps,
                closing: closing.clone(),
                runtime: tokio::runtime::Handle::current(),
                readiness,
            }),
            done,
        ));
        tracing::info!(socket = %path.display(), "accepting takeovers");
        Ok(Self {
            ending,
            path: path.to_owned(),
            file: Some((meta.dev(), meta.ino())),
            offered,
            closing,
            task,
            taken_over: Some(taken_over),
        })
    }

    /// Decides that this agent shuts down alone, and runs `before_refusing` (stopping the
    /// kernel's steering) before any successor can hear so; `false`: a successor said Stop first,
    /// and took over (the steering is its own). From then on a successor's Stop is refused: it
    /// starts as without this agent, and writes its steering after `before_refusing` ran.
    pub fn shut_down_alone(&self, before_refusing: impl FnOnce()) -> bool {
        let mut ending = self
            .ending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *ending == Ending::TakenOver {
            return false;
        }
        *ending = Ending::Alone;
        before_refusing();
        true
    }

    /// Resolves with the successor's pid once one has taken over: this agent no longer accepts
    /// connections and should drain and exit. Never resolves otherwise.
    pub async fn taken_over(&mut self) -> u32 {
        let Some(receiver) = self.taken_over.as_mut() else {
            return std::future::pending().await;
        };
        let Ok(pid) = receiver.await else {
            return std::future::pending().await;
        };
        self.taken_over = None;
        // The successor replaces the socket file with its own: never remove it from here on.
        self.file = None;
        pid
    }
}

impl Successors {
    /// Where copies of listeners opened later go, to be offered with the others.
    pub fn offered(&self) -> Arc<Mutex<Offered>> {
        self.offered.clone()
    }
}

impl Drop for Successors {
    fn drop(&mut self) {
        self.closing.store(true, Ordering::Relaxed);
        self.task.abort();
        self.offered
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .close();
        // A successor renames its own socket over ours: that one is not ours to remove.
        let ours =
            std::fs::metadata(&self.path).is_ok_and(|m| Some((m.dev(), m.ino())) == self.file);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Ending {
    Serving,
    Alone,
    TakenOver,
}

struct OfferState {
    ending: Arc<Mutex<Ending>>,
    path: PathBuf,
    offered: Arc<Mutex<Offered>>,
    redirect: Option<Arc<Redirect>>,
    drain: Drain,
    pumps: Arc<Pumps>,
    /// Set when this agent shuts down: a session waiting for Stop ends.
    closing: Arc<AtomicBool>,
    runtime: tokio::runtime::Handle,
    readiness: Arc<Readiness>,
}

/// While a successor holds this agent's sockets and has not said Stop: `/ready` says not ready
/// (the successor answers probes on the same listener, not ready until it has synced), and no
/// listener opens ([`Offered::is_frozen`]; the offer freezes it). Undone if the successor goes
/// away before Stop.
struct HandingOver<'s> {
    readiness: &'s Readiness,
    offered: &'s Mutex<Offered>,
    committed: bool,
}

impl<'s> HandingOver<'s> {
    fn start(readiness: &'s Readiness, offered: &'s Mutex<Offered>, pid: u32) -> Self {
        readiness.set_handing_over_to(Some(pid));
        HandingOver {
            readiness,
            offered,
            committed: false,
        }
    }
}

impl Drop for HandingOver<'_> {
    fn drop(&mut self) {
        if !self.committed {
            self.readiness.set_handing_over_to(None);
            let mut offered = self
                .offered
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            offered.frozen = offered.closed;
            if !offered.frozen {
                offered.thawed.notify_one();
            }
        }
    }
}

async fn accept_successors(
    listener: tokio::net::UnixListener,
    state: Arc<OfferState>,
    done: tokio::sync::oneshot::Sender<u32>,
) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "accepting on the takeover socket failed");
                tokio::time::sleep(POLL).await;
                continue;
            }
        };
        // One session at a time, on a blocking thread: descriptor passing is plain sendmsg.
        let session_state = state.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            let stream = stream.into_std()?;
            stream.set_nonblocking(false)?;
            offer_to_successor(&stream, &session_state)
        })
        .await;
        match outcome {
            Ok(Ok(Some(pid))) => {
                let _ = done.send(pid);
                return;
            }
            Ok(Ok(None)) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "a takeover attempt failed; still serving")
            }
            Err(e) => tracing::error!(error = %e, "the takeover session panicked; still serving"),
        }
    }
}

/// One session with a would-be successor. `Some(pid)`: it took over (this agent has stopped
/// accepting). `None`: it went away before Stop; nothing changed here.
fn offer_to_successor(stream: &UnixStream, state: &OfferState) -> io::Result<Option<u32>> {
    let peer = match trusted_peer(stream, &state.path) {
        Ok(peer) => peer,
        Err(e) => {
            tracing::warn!(error = %e, "refusing a takeover");
            return Ok(None);
        }
    };
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let takes_connections = match recv(stream)?.0 {
        Message::Hello {
            protocol: PROTOCOL,
            takes_connections,
        } => takes_connections,
        other => {
            let reason = format!("expected Hello with protocol {PROTOCOL}, got {other:?}");
            send(
                stream,
                &Message::Refused {
                    reason: reason.clone(),
                },
                &[],
            )?;
            return Err(io::Error::new(io::ErrorKind::InvalidData, reason));
        }
    };
    let mut handing_over = HandingOver::start(&state.readiness, &state.offered, peer.pid);
    {
        // Locked before the redirect's offer is made: no listener opens between the two (one
        // opening holds it), so the offer names exactly the listeners handed over.
        let mut offered = state
            .offered
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        offered.frozen = true;
        let redirect = match state.redirect.as_ref().map(|r| r.offer()).transpose() {
            Ok(redirect) => redirect,
            Err(e) => {
                drop(offered);
                send(
                    stream,
                    &Message::Refused {
                        reason: e.to_string(),
                    },
                    &[],
                )?;
                return Ok(None);
            }
        };
        let (addrs, mut fds): (Vec<SocketAddr>, Vec<BorrowedFd<'_>>) = offered
            .listeners
            .iter()
            .map(|(addr, fd)| (*addr, fd.as_fd()))
            .unzip();
        let (redirect, redirect_fds) = redirect.unzip();
        fds.extend(redirect_fds.iter().flatten().map(AsFd::as_fd));
        let offer = Message::Offer {
            protocol: PROTOCOL,
            version: env!("CARGO_PKG_VERSION").into(),
            listeners: addrs,
            redirect,
        };
        send(stream, &offer, &fds)?;
    }
    tracing::info!(
        pid = peer.pid,
        "sockets offered to a successor; serving until it says stop"
    );
    // The successor syncs its table before it answers (minutes with a slow API server).
    loop {
        if state.closing.load(Ordering::Relaxed) {
            return Ok(None);
        }
        if readable(stream.as_fd(), POLL)? {
            break;
        }
    }
    match recv(stream) {
        Ok((Message::Stop, _)) => {
            let mut ending = state
                .ending
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if *ending == Ending::Alone {
                drop(ending);
                // Before the successor hears it is alone (the session's end): it may then steer
                // with programs of its own, whose records this agent cannot read.
                state.runtime.block_on(state.drain.stop_accepting());
                tracing::info!(
                    pid = peer.pid,
                    "a successor said stop as this agent shuts down alone; it starts without it"
                );
                return Ok(None);
            }
            *ending = Ending::TakenOver;
            handing_over.committed = true;
        }
        Ok((other, _)) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("expected Stop, got {other:?}"),
            ))
        }
        Err(e) if is_disconnect(&e) => {
            tracing::info!(pid = peer.pid, "the successor went away before taking over");
            return Ok(None);
        }
        Err(e) => return Err(e),
    }
    state.runtime.block_on(state.drain.stop_accepting());
    // Our copies go: from now on the successor's are the only ones.
    state
        .offered
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .close();
    // Committed: this agent accepts no more, so it must drain and go whatever happens to the
    // successor now. Its open connections stay here if the successor cannot hear of it.
    if let Err(e) = send(stream, &Message::Stopped, &[]) {
        tracing::warn!(pid = peer.pid, error = %e, "taken over, but the successor did not hear it; this agent drains its connections and stops");
        return Ok(Some(peer.pid));
    }
    tracing::info!(pid = peer.pid, "taken over: stopped accepting");
    if takes_connections {
        hand_over_connections(stream, state, peer.pid);
    }
    Ok(Some(peer.pid))
}

/// Pauses every opaque and upgraded connection and sends it to the successor. One it cannot
/// take (the session broke) is pumped on here, until the drain deadline.
fn hand_over_connections(stream: &UnixStream, state: &OfferState, pid: u32) {
    let paused = state.runtime.block_on(state.pumps.pause_all());
    let total = paused.len();
    let mut sent = 0;
    let mut failed: Option<io::Error> = None;
    for p in paused {
        if failed.is_none() {
            let message = Message::Connection {
                to_upstream: p.to_upstream.clone(),
                to_client: p.to_client.clone(),
                paired: p.paired,
            };
            match send(stream, &message, &[p.client.as_fd(), p.upstream.as_fd()]) {
                Ok(()) => {
                    sent += 1;
                    continue;
                }
                Err(e) => failed = Some(e),
            }
        }
        let _guard = state.runtime.enter();
        if let Ok(pump) = state.pumps.resume(p) {
            state.drain.spawn_tracked(&state.runtime, async move {
                pump.await;
            });
        }
    }
    match failed {
        None => {
            let _ = send(stream, &Message::ConnectionsDone, &[]);
            tracing::info!(
                pid,
                connections = sent,
                "opaque and upgraded connections handed over"
            );
        }
        Some(e) => tracing::warn!(
            pid,
            sent,
            kept = total - sent,
            error = %e,
            "handing connections over failed; the rest stay here until the drain deadline"
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// The wire.

/// The process at the other end of a Unix socket.
struct Peer {
    pid: u32,
}

impl Peer {
    fn protocol(&self, detail: String) -> HandoverError {
        HandoverError::Protocol {
            peer: format!("pid {}", self.pid),
            detail,
        }
    }
}

/// The peer's credentials, if it runs as the same user as this process (the descriptors
/// exchanged carry an agent's whole data plane).
fn trusted_peer(stream: &UnixStream, path: &Path) -> Result<Peer, HandoverError> {
    let cred = peer_credentials(stream)
        .map_err(|e| HandoverError::io("reading the takeover peer's credentials", e))?;
    let (uid, own) = (cred.uid, rustix::process::geteuid().as_raw());
    if uid != own {
        return Err(HandoverError::Untrusted {
            uid,
            own,
            path: path.to_owned(),
        });
    }
    Ok(Peer {
        pid: cred.pid as u32,
    })
}

/// The peer's `SO_PEERCRED`. Read here rather than through rustix, whose type holds a pid that
/// cannot be 0: a peer in another pid namespace (the old and new agent are different pods, and
/// not `hostPID`) is reported with pid 0.
fn peer_credentials(stream: &UnixStream) -> io::Result<libc::ucred> {
    use std::os::fd::AsRawFd as _;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` is a `ucred` of the size passed, which the kernel fills at most.
    let got = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    if got != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred)
}

/// Whether the error means the other side closed or vanished.
/// A socket timeout expired (`SO_RCVTIMEO`/`SO_SNDTIMEO` report WouldBlock).
fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
    )
}

/// Whether `fd` has something to read (or was closed) within `timeout`.
fn readable(fd: BorrowedFd<'_>, timeout: Duration) -> io::Result<bool> {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let mut fds = [PollFd::from_borrowed_fd(fd, PollFlags::IN)];
    let timeout = Timespec::try_from(timeout).map_err(io::Error::other)?;
    match poll(&mut fds, Some(&timeout)) {
        Ok(n) => Ok(n > 0),
        Err(rustix::io::Errno::INTR) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Sends one message, the descriptors attached to its first byte (SCM_RIGHTS).
fn send(stream: &UnixStream, message: &Message, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    let body = serde_json::to_vec(message).map_err(io::Error::other)?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    if fds.len() > MAX_FDS {
        return Err(io::Error::other(format!(
            "{} descriptors exceed {MAX_FDS}",
            fds.len()
        )));
    }
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other(
            "no room for the descriptors in the control buffer",
        ));
    }
    let sent = sendmsg(
        stream,
        &[IoSlice::new(&frame)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?;
    // The descriptors went with the first byte; the rest of the frame, if any, follows plainly.
    let mut rest = &frame[sent..];
    let mut writer = stream;
    while !rest.is_empty() {
        let n = writer.write(rest)?;
        rest = &rest[n..];
    }
    Ok(())
}

/// Receives one message and the descriptors that came with it (close-on-exec, owned).
fn recv(stream: &UnixStream) -> io::Result<(Message, Vec<OwnedFd>)> {
    let mut fds = Vec::new();
    let mut frame = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut wanted = 4;
    while frame.len() < wanted {
        let n = recv_chunk(
            stream,
            &mut chunk[..(wanted - frame.len()).min(4096)],
            &mut fds,
        )?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        frame.extend_from_slice(&chunk[..n]);
        if wanted == 4 && frame.len() == 4 {
            let len = u32::from_be_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize;
            if len > MAX_MESSAGE {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("a message of {len} bytes"),
                ));
            }
            wanted = 4 + len;
        }
    }
    let message = serde_json::from_slice(&frame[4..])
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok((message, fds))
}

/// One recvmsg: bytes into `buf`, descriptors onto `fds`.
fn recv_chunk(stream: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    use rustix::net::{recvmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags};
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let received = loop {
        // Received descriptors are close-on-exec.
        match recvmsg(
            stream,
            &mut [IoSliceMut::new(buf)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        ) {
            Ok(received) => break received,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = message {
            fds.extend(received);
        }
    }
    if received.flags.contains(ReturnFlags::CTRUNC) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("more than {MAX_FDS} descriptors in one message"),
        ));
    }
    Ok(received.bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_dir::{eventually, TestDir};

    #[test]
    fn messages_carry_descriptors() {
        let (a, b) = UnixStream::pair().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let offer = Message::Offer {
            protocol: PROTOCOL,
            version: "test".into(),
            listeners: vec![addr],
            redirect: None,
        };
        send(&a, &offer, &[listener.as_fd()]).unwrap();
        let (received, fds) = recv(&b).unwrap();
        assert_eq!(received, offer);
        assert_eq!(fds.len(), 1);
        let peer = Peer { pid: 0 };
        let inherited = listener_from(fds.into_iter().next().unwrap(), &peer).unwrap();
        assert_eq!(
            inherited.local_addr().unwrap(),
            addr,
            "the very same socket"
        );
        // A connection queued on it is accepted through either descriptor.
        let _client = std::net::TcpStream::connect(addr).unwrap();
        drop(listener);
        assert!(inherited.accept().is_ok());
    }

    /// A would-be successor that said Hello, got the Offer, and says nothing more.
    async fn successor_holding_the_offer(path: &Path) -> UnixStream {
        let stream = UnixStream::connect(path).unwrap();
        tokio::task::spawn_blocking(move || {
            let hello = Message::Hello {
                protocol: PROTOCOL,
                takes_connections: true,
            };
            send(&stream, &hello, &[]).unwrap();
            assert!(matches!(recv(&stream).unwrap().0, Message::Offer { .. }));
            stream
        })
        .await
        .unwrap()
    }

    /// An agent serving takeovers on `path`, offering `listener`.
    fn old_agent_offering(
        listener: &TcpListener,
        path: &Path,
        (drain, readiness): (Drain, Arc<Readiness>),
    ) -> Successors {
        let mut offered = Offered::default();
        offered.add(listener).unwrap();
        let pumps = Pumps::new(Duration::from_secs(60));
        Successors::serve(path, offered, None, (drain, pumps, readiness)).unwrap()
    }

    #[test]
    fn a_connection_paused_with_full_pipes_both_ways_fits_in_a_message() {
        let (a, b) = UnixStream::pair().unwrap();
        let full = Flow {
            pending: vec![0xff; 256 * 1024],
            ..Flow::default()
        };
        let message = Message::Connection {
            to_upstream: full.clone(),
            to_client: full,
            paired: Some(false),
        };
        // Sent from a thread: the message is larger than the socket's buffer.
        let sent = std::thread::spawn({
            let message = message.clone();
            move || send(&a, &message, &[])
        });
        let (received, _) = recv(&b).expect("received whole");
        sent.join().unwrap().unwrap();
        assert_eq!(received, message);
    }

    #[test]
    fn a_descriptor_that_is_not_a_listener_is_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        send(&a, &Message::Stop, &[socket.as_fd()]).unwrap();
        let (_, fds) = recv(&b).unwrap();
        let err = listener_from(fds.into_iter().next().unwrap(), &Peer { pid: 1 }).unwrap_err();
        assert!(matches!(err, HandoverError::Protocol { .. }), "{err}");
    }

    #[test]
    fn no_running_agent_is_a_fresh_start() {
        let dir = TestDir::new("handover-none");
        let inherited = inherit(&dir.join("absent.sock"), Duration::from_secs(1)).unwrap();
        assert!(inherited.predecessor().is_none());
        // A stale socket file with nobody listening: the same.
        let stale = dir.join("stale.sock");
        drop(UnixListener::bind(&stale).unwrap());
        assert!(inherit(&stale, Duration::from_secs(1))
            .unwrap()
            .predecessor()
            .is_none());
    }

    #[test]
    fn a_silent_agent_is_given_up_on() {
        let dir = TestDir::new("handover-mute");
        let path = dir.join("mute.sock");
        let _mute = UnixListener::bind(&path).unwrap();
        let started = Instant::now();
        let inherited = inherit(&path, Duration::from_millis(300)).unwrap();
        assert!(inherited.predecessor().is_none());
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_successor_takes_the_listeners_and_the_old_agent_stops_accepting() {
        let dir = TestDir::new("handover-ok");
        let path = dir.join("takeover.sock");
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let readiness = Arc::new(Readiness::default());
        let mut old = old_agent_offering(&listener, &path, (Drain::default(), readiness.clone()));
        drop(listener);
        let successor_path = path.clone();
        let (handover, mut inherited_listener) = tokio::task::spawn_blocking(move || {
            let mut inherited = inherit(&successor_path, Duration::from_secs(5)).unwrap();
            assert!(inherited.predecessor().is_some());
            let listener = inherited.listener(addr).expect("the listener was offered");
            (
                inherited.finish(Duration::from_secs(5)).unwrap(),
                Some(listener),
            )
        })
        .await
        .unwrap();
        let handover = handover.expect("a predecessor");
        assert_eq!(handover.pid, std::process::id());
        assert!(handover.stop_took.is_some());
        assert_eq!(old.taken_over().await, std::process::id());
        // Taken over first, a SIGTERM after is not a shutdown alone: the steering is the
        // successor's.
        assert!(!old.shut_down_alone(|| panic!("the successor's steering emptied")));
        // The old agent's copies are closed; the socket lives on in the successor.
        drop(old);
        let listener = inherited_listener.take().unwrap();
        let _client = std::net::TcpStream::connect(addr).unwrap();
        assert!(listener.accept().is_ok());
        assert!(path.exists(), "left for the successor to replace");
    }

    /// SIGTERM first, with a successor holding the sockets: the old agent stops its steering
    /// before any successor can commit, then refuses the Stop, so that the successor (which reads
    /// it as gone) writes its own steering after. Before, the old agent emptied the maps a
    /// successor had adopted and written meanwhile.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_successors_stop_after_a_shutdown_alone_is_refused() {
        let dir = TestDir::new("handover-alone");
        let path = dir.join("takeover.sock");
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let readiness = Arc::new(Readiness::default());
        let drain = Drain::default();
        let mut old = old_agent_offering(&listener, &path, (drain.clone(), readiness));
        let successor_path = path.clone();
        let inherited =
            tokio::task::spawn_blocking(move || inherit(&successor_path, Duration::from_secs(5)))
                .await
                .unwrap()
                .unwrap();
        assert!(inherited.predecessor().is_some());
        let mut steered_off = false;
        assert!(old.shut_down_alone(|| steered_off = true));
        assert!(steered_off);
        let handover =
            tokio::task::spawn_blocking(move || inherited.finish(Duration::from_secs(5)))
                .await
                .unwrap()
                .unwrap()
                .expect("a predecessor");
        assert!(handover.connections.is_empty());
        // Stopped accepting before the successor heard it was alone: the successor may then
        // steer with programs whose records this agent cannot read.
        assert!(*drain.stopped_accepting().borrow());
        assert!(
            tokio::time::timeout(Duration::from_millis(300), old.taken_over())
                .await
                .is_err(),
            "refused, the Stop took nothing over"
        );
    }

    /// Between the offer and Stop both agents accept on the admin listener: the old one says
    /// not ready, as the successor does until it has synced, so that the successor's pod is not
    /// taken for ready on the old agent's word. A successor gone before Stop undoes it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_old_agent_is_not_ready_and_opens_no_listener_while_a_successor_holds_its_sockets()
    {
        let dir = TestDir::new("handover-ready");
        let path = dir.join("takeover.sock");
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let readiness = Arc::new(Readiness::default());
        let old = old_agent_offering(&listener, &path, (Drain::default(), readiness.clone()));
        let frozen = || old.offered().lock().unwrap().is_frozen();
        assert!(!frozen());
        let stream = successor_holding_the_offer(&path).await;
        let handing_over = || readiness.handing_over_to();
        assert_eq!(handing_over(), Some(std::process::id()));
        assert!(
            frozen(),
            "a listener opened now would not be the successor's"
        );
        drop(stream);
        eventually("no longer handing over to a successor that went", || {
            handing_over().is_none() && !frozen()
        })
        .await;
        let thawed = old.offered().lock().unwrap().thawed();
        tokio::time::timeout(Duration::from_secs(5), thawed.notified())
            .await
            .expect("what waited for the successor is told it went");
    }

    /// An agent shutting down while a successor holds its offer: no listener opens there any
    /// more, also once the session has ended (it must not thaw what the shutdown froze).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_shutdown_during_an_offer_opens_no_listener_after_it() {
        let dir = TestDir::new("handover-shutdown-offer");
        let path = dir.join("takeover.sock");
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let readiness = Arc::new(Readiness::default());
        let old = old_agent_offering(&listener, &path, (Drain::default(), readiness.clone()));
        let offered = old.offered();
        let stream = successor_holding_the_offer(&path).await;
        drop(old);
        eventually("the session ended", || {
            readiness.handing_over_to().is_none()
        })
        .await;
        assert!(offered.lock().unwrap().is_frozen());
        drop(stream);
    }

    /// A successor that sends Stop and is gone before it hears Stopped: the old agent stopped
    /// accepting, so it must still count as taken over (drain, then go), not serve on without
    /// accepting anything.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_successor_gone_after_stop_still_ends_the_old_agent() {
        let dir = TestDir::new("handover-gone");
        let path = dir.join("takeover.sock");
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut old = old_agent_offering(&listener, &path, (Drain::default(), Arc::default()));
        let successor_path = path.clone();
        tokio::task::spawn_blocking(move || {
            let stream = UnixStream::connect(successor_path).unwrap();
            let hello = Message::Hello {
                protocol: PROTOCOL,
                takes_connections: true,
            };
            send(&stream, &hello, &[]).unwrap();
            assert!(matches!(recv(&stream).unwrap().0, Message::Offer { .. }));
            send(&stream, &Message::Stop, &[]).unwrap();
            stream.shutdown(std::net::Shutdown::Both).unwrap();
        })
        .await
        .unwrap();
        let pid = tokio::time::timeout(Duration::from_secs(5), old.taken_over())
            .await
            .expect("taken over, though the successor went");
        assert_eq!(pid, std::process::id());
        assert!(
            old.offered().lock().unwrap().is_frozen(),
            "taken over: no listener opens here any more"
        );
    }

    #[tokio::test]
    async fn a_normal_shutdown_removes_the_socket_and_closes_the_copies() {
        let dir = TestDir::new("handover-down");
        let path = dir.join("takeover.sock");
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let successors = old_agent_offering(&listener, &path, (Drain::default(), Arc::default()));
        assert!(path.exists());
        drop(successors);
        drop(listener);
        assert!(!path.exists());
        assert!(
            std::net::TcpStream::connect(addr).is_err(),
            "no copy keeps the listener open"
        );
    }
}
