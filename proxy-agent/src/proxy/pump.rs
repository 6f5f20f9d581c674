//! Byte pumps: an opaque TCP connection, or an upgraded one (WebSocket, CONNECT) once its
//! handshake is done, is two sockets and the bytes between them. Every pump is registered so that
//! a successor can take it over mid-stream (`crate::handover`): paused between a read and a
//! write, it gives up both sockets and the bytes it read but has not written yet, and the
//! successor's pump writes those first and goes on. The kernel sockets never close, so the peers
//! see nothing.
//!
//! A pump also ends a connection that moved no byte for `idle_timeout` (a peer that vanished
//! without a FIN would otherwise hold it forever).

use ahash::AHashMap;
use serde::{Deserialize, Serialize};
use std::future::{poll_fn, Future as _};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

/// Bytes read from one side and not yet written to the other are at most this many.
const BUFFER: usize = 16 * 1024;

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
}

type PauseRequest = oneshot::Sender<Paused>;

/// The agent's live pumps (all workers'), for a takeover to pause.
pub struct Pumps {
    next_id: AtomicU64,
    live: Mutex<AHashMap<u64, oneshot::Sender<PauseRequest>>>,
    idle_timeout: Duration,
}

impl Pumps {
    pub fn new(idle_timeout: Duration) -> Arc<Self> {
        Arc::new(Pumps {
            next_id: AtomicU64::new(0),
            live: Mutex::default(),
            idle_timeout,
        })
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
        let (pause_tx, pause_rx) = oneshot::channel::<PauseRequest>();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.live.lock().expect("not poisoned").insert(id, pause_tx);
        let registered = Registered {
            pumps: self.clone(),
            id,
        };
        registered.pump(client, upstream, to_upstream, to_client, pause_rx)
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
        mut client: TcpStream,
        mut upstream: TcpStream,
        to_upstream: Flow,
        to_client: Flow,
        pause_rx: oneshot::Receiver<PauseRequest>,
    ) -> PumpEnd {
        // `None` once it resolved without a request (a oneshot is not polled after it resolved).
        let mut pause_rx = Some(pause_rx);
        let idle_timeout = self.pumps.idle_timeout;
        let mut up = Direction::from(to_upstream);
        let mut down = Direction::from(to_client);
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
            let a = up.poll(cx, &mut client, &mut upstream, &mut moved);
            let b = down.poll(cx, &mut upstream, &mut client, &mut moved);
            match (a, b) {
                (Poll::Ready(Err(e)), _) | (_, Poll::Ready(Err(e))) => {
                    return Poll::Ready(Exit::Failed(e))
                }
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
            Exit::Idle => PumpEnd::Idle,
            Exit::Failed(e) => PumpEnd::Failed(e.to_string()),
            Exit::Pause(reply) => {
                let (Ok(client), Ok(upstream)) = (client.into_std(), upstream.into_std()) else {
                    return PumpEnd::Failed("a socket could not be detached".into());
                };
                let paused = Paused {
                    client,
                    upstream,
                    to_upstream: up.into_flow(),
                    to_client: down.into_flow(),
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

/// Bytes from one socket to the other through a buffer; `start..end` is read and not yet written.
struct Direction {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    read_closed: bool,
    write_shut: bool,
}

impl From<Flow> for Direction {
    fn from(flow: Flow) -> Self {
        let mut buf = vec![0; BUFFER.max(flow.pending.len())].into_boxed_slice();
        buf[..flow.pending.len()].copy_from_slice(&flow.pending);
        Direction {
            buf,
            start: 0,
            end: flow.pending.len(),
            read_closed: flow.read_closed,
            write_shut: flow.write_shut,
        }
    }
}

impl Direction {
    fn into_flow(self) -> Flow {
        Flow {
            pending: self.buf[self.start..self.end].to_vec(),
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
        loop {
            if self.start < self.end {
                let n = ready!(Pin::new(&mut *to).poll_write(cx, &self.buf[self.start..self.end]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.start += n;
                *moved = true;
                continue;
            }
            if self.read_closed {
                if !self.write_shut {
                    ready!(Pin::new(&mut *to).poll_shutdown(cx))?;
                    self.write_shut = true;
                }
                return Poll::Ready(Ok(()));
            }
            self.start = 0;
            self.end = 0;
            let mut read = ReadBuf::new(&mut self.buf);
            ready!(Pin::new(&mut *from).poll_read(cx, &mut read))?;
            let n = read.filled().len();
            if n == 0 {
                self.read_closed = true;
            } else {
                self.end = n;
                *moved = true;
            }
        }
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

    #[tokio::test]
    async fn a_paused_pump_resumes_where_it_left_off() {
        let pumps = Pumps::new(Duration::from_secs(60));
        let (mut client, agent_side) = pair().await;
        let (agent_up, mut server) = pair().await;
        let pumping = {
            let pumps = pumps.clone();
            tokio::spawn(async move {
                pumps
                    .run(agent_side, agent_up, Flow::default(), Flow::default())
                    .await
            })
        };
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
            tokio::spawn(async move {
                let client = TcpStream::from_std(p.client).unwrap();
                let upstream = TcpStream::from_std(p.upstream).unwrap();
                pumps
                    .run(client, upstream, p.to_upstream, p.to_client)
                    .await
            })
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
        let pumps = Pumps::new(Duration::from_millis(300));
        let (mut client, agent_side) = pair().await;
        let (agent_up, mut server) = pair().await;
        let ahead = Flow {
            pending: b"read ahead ".to_vec(),
            ..Flow::default()
        };
        let pumping = tokio::spawn({
            let pumps = pumps.clone();
            async move {
                pumps
                    .run(agent_side, agent_up, ahead, Flow::default())
                    .await
            }
        });
        client.write_all(b"then this").await.unwrap();
        let mut got = [0u8; 20];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"read ahead then this");
        assert_eq!(pumping.await.unwrap(), PumpEnd::Idle);
    }
}
