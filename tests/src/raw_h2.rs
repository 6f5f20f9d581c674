//! A raw HTTP/2 backend (prior knowledge, frames written by hand) that answers each request as a
//! script says, including the ways a real server declines one (RST_STREAM REFUSED_STREAM, a
//! GOAWAY before processing it) and a stream kept quiet, and counts the PINGs it receives.
//! hyper's and h2's servers decide these themselves; a test of how the agent takes them needs
//! the frames on demand.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// How the backend answers a request.
#[derive(Clone, Copy, Debug)]
pub enum Reply {
    /// `:status: 200`, no body.
    Ok,
    /// RST_STREAM REFUSED_STREAM: not processed (RFC 9113 §8.7).
    Refuse,
    /// RST_STREAM with this error code, before any answer.
    Reset(u32),
    /// GOAWAY NO_ERROR naming no stream as processed, then the connection closes: a server
    /// shutting down gracefully.
    GoAway,
    /// The same with this error code: a server that ends the connection on an error (one
    /// another stream caused), naming no stream as processed.
    GoAwayWithError(u32),
    /// `:status: 200` at once, then nothing for this long, then the body `done`.
    Quiet(Duration),
    /// As `Quiet`, and a GOAWAY NO_ERROR naming this stream the last processed, with the
    /// connection kept open for it: a server going away (its max connection age, a graceful
    /// stop) while a long stream runs.
    QuietGoingAway(Duration),
    /// `:status: 200` and a field `x-big` of this many bytes, in HEADERS and CONTINUATION
    /// frames.
    BigHeader(usize),
    /// A gRPC answer's head (`:status: 200`, `content-type: application/grpc`, and a
    /// `content-length` of 12, which gRPC servers seldom send) and a DATA frame of 6 bytes, then
    /// the connection closes: a backend pod killed mid-stream.
    PartThenClose,
}

pub struct RawH2 {
    pub addr: SocketAddr,
    /// Requests received, on every connection.
    pub requests: Arc<AtomicU32>,
    /// PINGs received, on every connection.
    pub pings: Arc<AtomicU32>,
    /// Connections accepted.
    pub connections: Arc<AtomicU32>,
    /// Connections the agent closed (their reading side ended).
    pub closed: Arc<AtomicU32>,
}

pub const DATA: u8 = 0;
pub const HEADERS: u8 = 1;
pub const RST_STREAM: u8 = 3;
pub const SETTINGS: u8 = 4;
pub const PING: u8 = 6;
pub const GOAWAY: u8 = 7;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 3;
pub const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 4;
pub const WINDOW_UPDATE: u8 = 8;
pub const CONTINUATION: u8 = 9;
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
/// `:status: 200`, HPACK static table index 8.
const STATUS_200: [u8; 1] = [0x88];

/// One HTTP/2 frame: its 9-byte head, then `payload`.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut frame = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    frame.extend([kind, flags]);
    frame.extend(stream.to_be_bytes());
    frame.extend(payload);
    frame
}

impl RawH2 {
    /// Serves on 127.0.0.1; `script` is given each request's number (from 0, across
    /// connections).
    pub async fn start(script: impl Fn(u32) -> Reply + Send + Sync + 'static) -> RawH2 {
        Self::start_with_limit(None, script).await
    }

    /// As `start`, announcing `max_streams` as its SETTINGS_MAX_CONCURRENT_STREAMS (it does not
    /// enforce it: a stream beyond it is answered as the script says).
    pub async fn start_with_limit(
        max_streams: Option<u32>,
        script: impl Fn(u32) -> Reply + Send + Sync + 'static,
    ) -> RawH2 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve_on(listener, u32::MAX, max_streams, script)
    }

    /// As `start`, on `addr` (port 0: any free one).
    pub async fn start_at(
        addr: SocketAddr,
        script: impl Fn(u32) -> Reply + Send + Sync + 'static,
    ) -> RawH2 {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        Self::serve_on(listener, u32::MAX, None, script)
    }

    /// As `start_with_limit`, accepting one connection only, with a listen queue of one: once
    /// the test filled that queue (`fill_accept_queue`), a connect to it hangs, as to a node
    /// going away.
    pub fn start_accepting_one(
        max_streams: Option<u32>,
        script: impl Fn(u32) -> Reply + Send + Sync + 'static,
    ) -> RawH2 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        Self::serve_on(socket.listen(1).unwrap(), 1, max_streams, script)
    }

    fn serve_on(
        listener: tokio::net::TcpListener,
        accept_at_most: u32,
        max_streams: Option<u32>,
        script: impl Fn(u32) -> Reply + Send + Sync + 'static,
    ) -> RawH2 {
        let addr = listener.local_addr().unwrap();
        let settings: Vec<u8> = max_streams
            .map(|max| {
                [
                    &SETTINGS_MAX_CONCURRENT_STREAMS.to_be_bytes()[..],
                    &max.to_be_bytes(),
                ]
                .concat()
            })
            .unwrap_or_default();
        let (requests, pings, connections): (Arc<AtomicU32>, Arc<AtomicU32>, Arc<AtomicU32>) =
            Default::default();
        let closed = Arc::new(AtomicU32::new(0));
        let counters = (Arc::clone(&requests), Arc::clone(&pings));
        let (accepted, ended) = (Arc::clone(&connections), Arc::clone(&closed));
        let script = Arc::new(script);
        tokio::spawn(async move {
            while accepted.load(Ordering::Relaxed) < accept_at_most {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                accepted.fetch_add(1, Ordering::Relaxed);
                let (requests, pings) = (counters.0.clone(), counters.1.clone());
                let (script, settings) = (script.clone(), settings.clone());
                let ended = ended.clone();
                tokio::spawn(async move {
                    let _ = serve(stream, &settings, &*script, &requests, &pings).await;
                    ended.fetch_add(1, Ordering::Relaxed);
                });
            }
            // Kept open, not accepting: connects queue, then hang.
            std::future::pending::<()>().await;
            drop(listener);
        });
        RawH2 {
            addr,
            requests,
            pings,
            connections,
            closed,
        }
    }
}

/// Connections to `addr` until one does not complete within 200 ms: its accept queue is full,
/// and a SYN to it is dropped. Hold them for as long as it should stay full.
pub async fn fill_accept_queue(addr: SocketAddr) -> Vec<tokio::net::TcpStream> {
    let mut filling = Vec::new();
    for _ in 0..8 {
        let connect = tokio::net::TcpStream::connect(addr);
        match tokio::time::timeout(Duration::from_millis(200), connect).await {
            Ok(Ok(stream)) => filling.push(stream),
            _ => return filling,
        }
    }
    panic!("{addr} accepted 8 connections: its accept queue is not filling");
}

async fn serve(
    stream: tokio::net::TcpStream,
    settings: &[u8],
    script: &(dyn Fn(u32) -> Reply + Send + Sync),
    requests: &AtomicU32,
    pings: &AtomicU32,
) -> std::io::Result<()> {
    let (mut read, mut write) = stream.into_split();
    // Frames go out through one writer, so that a quiet stream's late body can be sent from a
    // timer of its own.
    let (out, mut frames) = mpsc::unbounded_channel::<Option<Vec<u8>>>();
    let writer = tokio::spawn(async move {
        while let Some(Some(frame)) = frames.recv().await {
            if write.write_all(&frame).await.is_err() {
                return;
            }
        }
        let _ = write.shutdown().await;
    });
    let mut preface = [0u8; 24];
    read.read_exact(&mut preface).await?;
    assert_eq!(&preface, PREFACE);
    let send = |frame: Vec<u8>| {
        let _ = out.send(Some(frame));
    };
    send(frame(SETTINGS, 0, 0, settings));
    loop {
        let mut head = [0u8; 9];
        if read.read_exact(&mut head).await.is_err() {
            break;
        }
        let length = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let (kind, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; length];
        read.read_exact(&mut payload).await?;
        match kind {
            SETTINGS if flags & ACK == 0 => send(frame(SETTINGS, ACK, 0, &[])),
            PING if flags & ACK == 0 => {
                pings.fetch_add(1, Ordering::Relaxed);
                send(frame(PING, ACK, 0, &payload));
            }
            HEADERS => match script(requests.fetch_add(1, Ordering::Relaxed)) {
                Reply::Ok => send(frame(
                    HEADERS,
                    END_HEADERS | END_STREAM,
                    stream,
                    &STATUS_200,
                )),
                Reply::BigHeader(size) => {
                    // :status 200, then a literal field without indexing, new name (RFC 7541
                    // §6.2.2), its value's length an integer with a 7-bit prefix (§5.1).
                    let mut block = vec![STATUS_200[0], 0x00, 5];
                    block.extend(b"x-big");
                    block.push(0x7f);
                    let mut rest = size - 127;
                    while rest >= 128 {
                        block.push((rest % 128) as u8 | 0x80);
                        rest /= 128;
                    }
                    block.push(rest as u8);
                    block.extend(std::iter::repeat_n(b'b', size));
                    let pieces: Vec<&[u8]> = block.chunks(16_384).collect();
                    for (i, piece) in pieces.iter().enumerate() {
                        let (kind, first) = if i == 0 {
                            (HEADERS, END_STREAM)
                        } else {
                            (CONTINUATION, 0)
                        };
                        let last = if i + 1 == pieces.len() {
                            END_HEADERS
                        } else {
                            0
                        };
                        send(frame(kind, first | last, stream, piece));
                    }
                }
                Reply::PartThenClose => {
                    // content-type (static index 31) and content-length (28), literals
                    // without indexing (RFC 7541 §6.2.2): 0x0f then the index - 15.
                    let head = [
                        &[STATUS_200[0], 0x0f, 0x10, 16][..],
                        b"application/grpc",
                        &[0x0f, 0x0d, 2],
                        b"12",
                    ]
                    .concat();
                    send(frame(HEADERS, END_HEADERS, stream, &head));
                    send(frame(DATA, 0, stream, &[0, 0, 0, 0, 1, 7]));
                    break;
                }
                Reply::Refuse => send(frame(RST_STREAM, 0, stream, &7u32.to_be_bytes())),
                Reply::Reset(code) => send(frame(RST_STREAM, 0, stream, &code.to_be_bytes())),
                reply @ (Reply::GoAway | Reply::GoAwayWithError(_)) => {
                    let code = match reply {
                        Reply::GoAwayWithError(code) => code,
                        _ => 0,
                    };
                    // Last stream processed: none.
                    let none_and_code = [[0; 4], code.to_be_bytes()].concat();
                    send(frame(GOAWAY, 0, 0, &none_and_code));
                    break;
                }
                reply @ (Reply::Quiet(quiet) | Reply::QuietGoingAway(quiet)) => {
                    send(frame(HEADERS, END_HEADERS, stream, &STATUS_200));
                    if let Reply::QuietGoingAway(_) = reply {
                        let last_and_no_error = [stream.to_be_bytes(), [0; 4]].concat();
                        send(frame(GOAWAY, 0, 0, &last_and_no_error));
                    }
                    let out = out.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(quiet).await;
                        let _ = out.send(Some(frame(DATA, END_STREAM, stream, b"done")));
                    });
                }
            },
            _ => {}
        }
    }
    let _ = out.send(None);
    let _ = writer.await;
    Ok(())
}
