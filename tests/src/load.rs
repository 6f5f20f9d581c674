//! Steady HTTP load for soaks, made the way pods make it, and a count of everything a user would
//! notice. Concurrent clients of four kinds:
//! - keep-alive: requests back to back on one connection, a new connection when the server closes
//!   it (after `Connection: close`, or idle);
//! - idle keep-alive: the same with pauses, so that a draining agent closes the idle connection;
//! - new connection: one request per connection (`Connection: close`), so that every request is
//!   a fresh `connect()` through the kernel redirect;
//! - HTTP/2 (h2c): sequential streams on one connection, a new one after GOAWAY;
//! - long-lived: one upgraded connection (`Upgrade: websocket`, the echo backend echoes bytes
//!   after its 101) held for the whole run, exchanging a message every 100 ms; it must never
//!   break, whatever the agent does (takeovers hand it over), and every byte must come back once,
//!   in order.
//!
//! A request is re-sent once, on a new connection, only when it went out on a reused connection
//! that closed before any byte of an answer, or was refused unprocessed (HTTP/2 GOAWAY,
//! REFUSED_STREAM): RFC 9112 §9.3.1 and RFC 9113 §8.7 allow it for idempotent requests, and common
//! clients do it (Go's net/http, browsers). Those are counted as `retried`; any other error, or an
//! answer other than 200, is a failure. A connection that saw a reset (ECONNRESET) is counted once
//! in `resets`, whether or not a request failed with it.

use bytes::Bytes;
use http::{header, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// What to load, how, for how long.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LoadSpec {
    /// Where requests go: a Service VIP:port (steered to the agent by the kernel).
    pub target: SocketAddr,
    /// The Host header / authority.
    pub host: String,
    pub path: String,
    pub duration_ms: u64,
    pub keep_alive: usize,
    pub idle_keep_alive: usize,
    /// The pause of idle keep-alive clients between requests.
    pub idle_pause_ms: u64,
    pub new_connection: usize,
    pub http2: usize,
    #[serde(default)]
    pub long_lived: usize,
    /// A request header the echo backend must report (name, value): proof that the mesh routed
    /// the request (a route filter added it). An answer without it went around the agent.
    pub expect_header: Option<(String, String)>,
}

/// What the clients saw.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadReport {
    /// Requests made (a retry is not a new request).
    pub sent: u64,
    /// Answered 200 (after a retry, if one was needed).
    pub ok: u64,
    /// Not answered 200, even after the retry a client may make.
    pub failed: u64,
    /// Re-sent on a new connection (see the module comment).
    pub retried: u64,
    /// Connections that saw a reset.
    pub resets: u64,
    pub connections: u64,
    /// Answered 200 without `expect_header`: routed around the mesh.
    pub unmeshed: u64,
    /// Long-lived connections opened, and those still whole at the end.
    #[serde(default)]
    pub long_lived_opened: u64,
    #[serde(default)]
    pub long_lived_kept: u64,
    /// Bytes the long-lived connections sent and got back identical.
    #[serde(default)]
    pub long_lived_bytes: u64,
    /// The first few distinct errors.
    pub errors: Vec<String>,
    /// Why requests were retried, the first few distinct reasons.
    pub retry_reasons: Vec<String>,
}

impl LoadReport {
    pub fn add(&mut self, other: &LoadReport) {
        self.sent += other.sent;
        self.ok += other.ok;
        self.failed += other.failed;
        self.retried += other.retried;
        self.resets += other.resets;
        self.connections += other.connections;
        self.unmeshed += other.unmeshed;
        self.long_lived_opened += other.long_lived_opened;
        self.long_lived_kept += other.long_lived_kept;
        self.long_lived_bytes += other.long_lived_bytes;
        for (mine, theirs) in [
            (&mut self.errors, &other.errors),
            (&mut self.retry_reasons, &other.retry_reasons),
        ] {
            for e in theirs {
                note(mine, e.clone());
            }
        }
    }
}

const MAX_ERRORS: usize = 10;

/// Keeps the first few distinct messages.
fn note(list: &mut Vec<String>, what: String) {
    if list.len() < MAX_ERRORS && !list.contains(&what) {
        list.push(what);
    }
}
/// Bound on one exchange: a request without an answer this late is a failure.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    ok: AtomicU64,
    failed: AtomicU64,
    retried: AtomicU64,
    resets: AtomicU64,
    connections: AtomicU64,
    unmeshed: AtomicU64,
    long_lived_opened: AtomicU64,
    long_lived_kept: AtomicU64,
    long_lived_bytes: AtomicU64,
    errors: Mutex<Vec<String>>,
    retry_reasons: Mutex<Vec<String>>,
}

impl Counters {
    fn fail(&self, what: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        note(
            &mut self.errors.lock().unwrap_or_else(|p| p.into_inner()),
            what,
        );
    }

    fn retry(&self, why: String) {
        self.retried.fetch_add(1, Ordering::Relaxed);
        note(
            &mut self.retry_reasons.lock().unwrap_or_else(|p| p.into_inner()),
            why,
        );
    }

    fn report(&self) -> LoadReport {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        LoadReport {
            sent: get(&self.sent),
            ok: get(&self.ok),
            failed: get(&self.failed),
            retried: get(&self.retried),
            resets: get(&self.resets),
            connections: get(&self.connections),
            unmeshed: get(&self.unmeshed),
            long_lived_opened: get(&self.long_lived_opened),
            long_lived_kept: get(&self.long_lived_kept),
            long_lived_bytes: get(&self.long_lived_bytes),
            errors: self
                .errors
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            retry_reasons: self
                .retry_reasons
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }
}

/// Runs every client of `spec` until its duration is over and the last requests are answered.
pub async fn run(spec: LoadSpec) -> LoadReport {
    let spec = Arc::new(spec);
    let counters = Arc::new(Counters::default());
    let deadline = Instant::now() + Duration::from_millis(spec.duration_ms);
    let mut clients = tokio::task::JoinSet::new();
    let kinds = [
        (Kind::KeepAlive, spec.keep_alive),
        (Kind::IdleKeepAlive, spec.idle_keep_alive),
        (Kind::NewConnection, spec.new_connection),
        (Kind::Http2, spec.http2),
    ];
    for (kind, count) in kinds {
        for _ in 0..count {
            clients.spawn(client(kind, spec.clone(), counters.clone(), deadline));
        }
    }
    for id in 0..spec.long_lived {
        clients.spawn(long_lived(id, spec.clone(), counters.clone(), deadline));
    }
    while clients.join_next().await.is_some() {}
    counters.report()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    KeepAlive,
    IdleKeepAlive,
    NewConnection,
    Http2,
}

/// One upgraded connection for the whole run; any break is a failure (never retried).
async fn long_lived(id: usize, spec: Arc<LoadSpec>, counters: Arc<Counters>, deadline: Instant) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fail = |what: String| counters.fail(format!("long-lived {id}: {what}"));
    let opened = async {
        let mut stream = TcpStream::connect(spec.target).await?;
        let upgrade = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            spec.path, spec.host
        );
        stream.write_all(upgrade.as_bytes()).await?;
        // The 101's head, up to its blank line (the echo sends nothing after it unasked).
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            if stream.read(&mut byte).await? == 0 {
                return Err(std::io::Error::other("closed during the upgrade"));
            }
            head.push(byte[0]);
        }
        if !head.starts_with(b"HTTP/1.1 101") {
            let head = String::from_utf8_lossy(&head).into_owned();
            return Err(std::io::Error::other(format!("not upgraded: {head}")));
        }
        Ok(stream)
    };
    let mut stream = match tokio::time::timeout(REQUEST_TIMEOUT, opened).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return fail(format!("opening: {e}")),
        Err(_) => return fail("opening: timed out".into()),
    };
    counters.long_lived_opened.fetch_add(1, Ordering::Relaxed);
    let mut seq = 0u64;
    // At least one message, however late the upgrade came (an emulated kernel can take longer
    // than a short run): a connection counted as kept has carried bytes.
    loop {
        seq += 1;
        // Lengths vary so that messages straddle reads and the pump's buffer differently.
        let message = format!("{id}:{seq}:{}\n", "m".repeat((seq as usize * 37) % 3000));
        let exchanged = async {
            stream.write_all(message.as_bytes()).await?;
            let mut echoed = vec![0u8; message.len()];
            stream.read_exact(&mut echoed).await?;
            Ok::<_, std::io::Error>(echoed)
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, exchanged).await {
            Ok(Ok(echoed)) if echoed == message.as_bytes() => {
                counters
                    .long_lived_bytes
                    .fetch_add(message.len() as u64, Ordering::Relaxed);
            }
            Ok(Ok(_)) => return fail(format!("message {seq} came back altered")),
            Ok(Err(e)) => return fail(format!("message {seq}: {e}")),
            Err(_) => return fail(format!("message {seq}: no echo within {REQUEST_TIMEOUT:?}")),
        }
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    counters.long_lived_kept.fetch_add(1, Ordering::Relaxed);
}

/// One connection of a client, with what it needs to count a reset once.
struct Conn {
    sender: Sender,
    reset: Arc<AtomicBool>,
    used: u64,
}

enum Sender {
    Http1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    Http2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

/// A failed exchange: whether it may be re-sent on a new connection, and what happened.
struct Failure {
    unprocessed: bool,
    reset: bool,
    what: String,
}

async fn client(kind: Kind, spec: Arc<LoadSpec>, counters: Arc<Counters>, deadline: Instant) {
    let mut conn: Option<Conn> = None;
    while Instant::now() < deadline {
        if conn.is_none() {
            match connect(kind, &spec, &counters).await {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    // The request this connection was for cannot be made: a failure.
                    counters.sent.fetch_add(1, Ordering::Relaxed);
                    counters.fail(format!("{kind:?}: connecting: {e}"));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            }
        }
        let c = conn.as_mut().expect("connected above");
        // A connection the server closed while we were not using it is not a failure: take a new one.
        if !ready(&mut c.sender).await {
            conn = None;
            continue;
        }
        counters.sent.fetch_add(1, Ordering::Relaxed);
        let reused = c.used > 0;
        c.used += 1;
        let close = kind == Kind::NewConnection;
        match exchange(c, &spec, close, &counters).await {
            Ok(keep) => {
                if !keep || close {
                    conn = None;
                }
            }
            Err(failure) => {
                let c = conn.take().expect("in use");
                if failure.reset && !c.reset.swap(true, Ordering::Relaxed) {
                    counters.resets.fetch_add(1, Ordering::Relaxed);
                }
                if reused && failure.unprocessed {
                    counters.retry(format!("{kind:?}: {}", failure.what));
                    retry(kind, &spec, &counters, &failure.what).await;
                } else {
                    counters.fail(format!("{kind:?}: {}", failure.what));
                }
            }
        }
        if kind == Kind::IdleKeepAlive {
            tokio::time::sleep(Duration::from_millis(spec.idle_pause_ms)).await;
        }
    }
}

/// The one retry a client makes, on a new connection.
async fn retry(kind: Kind, spec: &LoadSpec, counters: &Counters, first: &str) {
    let mut c = match connect(kind, spec, counters).await {
        Ok(c) => c,
        Err(e) => {
            return counters.fail(format!("{kind:?}: retry after `{first}`: connecting: {e}"))
        }
    };
    if !ready(&mut c.sender).await {
        return counters.fail(format!(
            "{kind:?}: retry after `{first}`: new connection closed"
        ));
    }
    if let Err(failure) = exchange(&mut c, spec, kind == Kind::NewConnection, counters).await {
        if failure.reset && !c.reset.swap(true, Ordering::Relaxed) {
            counters.resets.fetch_add(1, Ordering::Relaxed);
        }
        counters.fail(format!("{kind:?}: retry after `{first}`: {}", failure.what));
    }
}

async fn connect(kind: Kind, spec: &LoadSpec, counters: &Counters) -> Result<Conn, String> {
    let stream = TcpStream::connect(spec.target)
        .await
        .map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    counters.connections.fetch_add(1, Ordering::Relaxed);
    let io = TokioIo::new(stream);
    let reset = Arc::new(AtomicBool::new(false));
    let sender = if kind == Kind::Http2 {
        let (sender, connection) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(|e| format!("{e:?}"))?;
        spawn_driver(connection, reset.clone());
        Sender::Http2(sender)
    } else {
        let (sender, connection) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| format!("{e:?}"))?;
        spawn_driver(connection, reset.clone());
        Sender::Http1(sender)
    };
    Ok(Conn {
        sender,
        reset,
        used: 0,
    })
}

/// Runs a connection; a reset it ends with is noted on `reset` (the client counts it).
fn spawn_driver<F>(connection: F, reset: Arc<AtomicBool>)
where
    F: std::future::Future<Output = hyper::Result<()>> + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            if is_reset(&e) {
                reset.store(true, Ordering::Relaxed);
            }
        }
    });
}

/// Whether the connection can take a request (false: the server closed it meanwhile).
async fn ready(sender: &mut Sender) -> bool {
    match sender {
        Sender::Http1(s) => s.ready().await.is_ok(),
        Sender::Http2(s) => s.ready().await.is_ok(),
    }
}

/// One request and its answer. `Ok(keep)`: answered (counted); `keep` is false when the server
/// asked to close the connection.
async fn exchange(
    conn: &mut Conn,
    spec: &LoadSpec,
    close: bool,
    counters: &Counters,
) -> Result<bool, Failure> {
    if conn.reset.load(Ordering::Relaxed) {
        // The connection was reset before this request: counted when the driver saw it.
        return Err(Failure {
            unprocessed: true,
            reset: true,
            what: "connection reset".into(),
        });
    }
    let answer = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let response = match &mut conn.sender {
            Sender::Http1(s) => {
                let mut request =
                    Request::get(spec.path.as_str()).header(header::HOST, spec.host.as_str());
                if close {
                    request = request.header(header::CONNECTION, "close");
                }
                s.send_request(request.body(Empty::new()).expect("valid request"))
                    .await
            }
            Sender::Http2(s) => {
                let uri = format!("http://{}{}", spec.host, spec.path);
                s.send_request(Request::get(uri).body(Empty::new()).expect("valid request"))
                    .await
            }
        }
        .map_err(|e| Failure {
            unprocessed: unprocessed(&e),
            reset: is_reset(&e),
            what: format!("{e:?}"),
        })?;
        let status = response.status();
        let keep = !response
            .headers()
            .get(header::CONNECTION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| Failure {
                unprocessed: false,
                reset: is_reset(&e),
                what: format!("reading the body: {e:?}"),
            })?
            .to_bytes();
        Ok((status, keep, body))
    })
    .await
    .unwrap_or_else(|_| {
        Err(Failure {
            unprocessed: false,
            reset: false,
            what: format!("no answer within {REQUEST_TIMEOUT:?}"),
        })
    });
    let (status, keep, body) = answer?;
    if status != StatusCode::OK {
        counters.fail(format!("status {status}"));
        return Ok(keep);
    }
    counters.ok.fetch_add(1, Ordering::Relaxed);
    if let Some((name, value)) = &spec.expect_header {
        if !echoed_header(&body, name, value) {
            counters.unmeshed.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(keep)
}

/// Whether the echo backend's answer lists request header `name: value`.
fn echoed_header(body: &[u8], name: &str, value: &str) -> bool {
    let echoed: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    echoed["headers"].as_array().is_some_and(|headers| {
        headers
            .iter()
            .any(|h| h[0].as_str() == Some(name) && h[1].as_str() == Some(value))
    })
}

/// Errors after which the server cannot have processed the request: not sent, connection closed
/// before any byte of an answer, reset, or refused by HTTP/2 (GOAWAY, REFUSED_STREAM).
fn unprocessed(e: &hyper::Error) -> bool {
    if e.is_canceled() || e.is_incomplete_message() || is_reset(e) {
        return true;
    }
    sources(e).any(|source| {
        source.downcast_ref::<h2::Error>().is_some_and(|h2| {
            h2.reason() == Some(h2::Reason::REFUSED_STREAM)
                || (h2.is_go_away() && h2.reason() == Some(h2::Reason::NO_ERROR))
        }) || source
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn is_reset(e: &(dyn std::error::Error + 'static)) -> bool {
    sources(e).any(|source| {
        source
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionReset)
            || source
                .downcast_ref::<h2::Error>()
                .and_then(h2::Error::get_io)
                .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionReset)
    })
}

/// `e` and its sources.
fn sources<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(e), |e| e.source())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_add_up() {
        let one = LoadReport {
            sent: 3,
            ok: 2,
            failed: 1,
            errors: vec!["a".into()],
            ..Default::default()
        };
        let mut total = LoadReport::default();
        total.add(&one);
        total.add(&one);
        assert_eq!((total.sent, total.ok, total.failed), (6, 4, 2));
        assert_eq!(total.errors, vec!["a".to_string()], "distinct errors");
    }

    #[test]
    fn finds_the_echoed_header() {
        let body = br#"{"pod":"x","headers":[["x-dev-feature","enabled"],["host","a"]]}"#;
        assert!(echoed_header(body, "x-dev-feature", "enabled"));
        assert!(!echoed_header(body, "x-dev-feature", "disabled"));
        assert!(!echoed_header(b"not json", "x-dev-feature", "enabled"));
    }
}
