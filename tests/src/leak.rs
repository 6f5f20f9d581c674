//! The leak soak: many connections opened and closed in churn through the agent (loopback, no
//! root), of every kind a node sees, polite or not: HTTP/1.1, HTTP/2, WebSocket, opaque TCP,
//! clients that vanish without a FIN (a reset, mid-request or mid-stream), and clients that
//! half-close after their request. The agent's descriptors, tasks and memory are sampled before
//! (idle, after a warm-up), at the peak, and after: descriptors and tasks must return to their
//! idle level, and no connection stays open.

use crate::loopback::{echo_backend, Agent, AgentOptions, Manifests};
use crate::probe;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Clone, Debug)]
pub struct LeakConfig {
    pub connections: usize,
    pub concurrency: usize,
}

/// The agent's resources at one instant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sample {
    pub fds: u64,
    pub rss_kib: u64,
    pub threads: u64,
    pub tasks: u64,
    pub connections_open: u64,
}

impl Sample {
    fn max(self, other: Sample) -> Sample {
        Sample {
            fds: self.fds.max(other.fds),
            rss_kib: self.rss_kib.max(other.rss_kib),
            threads: self.threads.max(other.threads),
            tasks: self.tasks.max(other.tasks),
            connections_open: self.connections_open.max(other.connections_open),
        }
    }
}

#[derive(Debug)]
pub struct LeakReport {
    pub connections: usize,
    pub baseline: Sample,
    pub peak: Sample,
    pub after: Sample,
    /// From the last connection closed to descriptors and tasks back at their idle level
    /// (`None`: they did not come back within the wait).
    pub settled_in: Option<Duration>,
    /// Connections of the kinds that must succeed and did not.
    pub failed: u64,
    pub errors: Vec<String>,
    pub elapsed: Duration,
}

impl LeakReport {
    pub fn clean(&self) -> bool {
        self.failed == 0 && self.settled_in.is_some() && self.after.connections_open == 0
    }
}

impl std::fmt::Display for LeakReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} connections in {:.1}s ({} failed); back to idle {}",
            self.connections,
            self.elapsed.as_secs_f64(),
            self.failed,
            self.settled_in
                .map_or("NEVER (within the wait)".to_string(), |d| format!(
                    "{:.1}s after the last one",
                    d.as_secs_f64()
                ))
        )?;
        writeln!(
            f,
            "{:<9} {:>6} {:>9} {:>8} {:>6} {:>12}",
            "", "fds", "RSS MiB", "threads", "tasks", "connections"
        )?;
        for (name, s) in [
            ("idle", self.baseline),
            ("peak", self.peak),
            ("after", self.after),
        ] {
            writeln!(
                f,
                "{:<9} {:>6} {:>9.1} {:>8} {:>6} {:>12}",
                name,
                s.fds,
                s.rss_kib as f64 / 1024.0,
                s.threads,
                s.tasks,
                s.connections_open
            )?;
        }
        for e in &self.errors {
            writeln!(f, "  error: {e}")?;
        }
        Ok(())
    }
}

/// `None` when the agent's metrics could not be read: no reading (as 0 it would pass for "no
/// task, no connection left").
fn sample(agent: &Agent) -> Option<Sample> {
    let pid = agent.child.id();
    let metric = |name: &str| probe::metric(agent, name).ok().map(|v| v as u64);
    Some(Sample {
        fds: probe::open_fds(pid).unwrap_or(0) as u64,
        rss_kib: probe::rss_kib(pid).unwrap_or(0),
        threads: probe::threads(pid).unwrap_or(0),
        tasks: metric("gamma_runtime_tasks_alive")?,
        connections_open: metric("gamma_connections_open")?,
    })
}

/// The kinds of connections, in turn.
const KINDS: usize = 7;

struct Targets {
    http: SocketAddr,
    opaque: SocketAddr,
}

/// One connection of kind `i % KINDS`. `Err` only for kinds that must succeed.
async fn connection(i: usize, t: &Targets) -> Result<(), String> {
    let request = b"GET /leak HTTP/1.1\r\nHost: front\r\nConnection: close\r\n\r\n";
    match i % KINDS {
        // HTTP/1.1, closed after the answer.
        0 => {
            let mut s = TcpStream::connect(t.http)
                .await
                .map_err(|e| e.to_string())?;
            s.write_all(request).await.map_err(|e| e.to_string())?;
            let mut answer = Vec::new();
            s.read_to_end(&mut answer)
                .await
                .map_err(|e| e.to_string())?;
            ok_answer(&answer)
        }
        // HTTP/2, one stream, then gone.
        1 => {
            let s = TcpStream::connect(t.http)
                .await
                .map_err(|e| e.to_string())?;
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
                    .await
                    .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            let request = http::Request::get("http://front/leak")
                .body(Empty::<Bytes>::new())
                .expect("request");
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| e.to_string())?;
            let status = response.status();
            response
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?;
            (status == 200)
                .then_some(())
                .ok_or(format!("HTTP/2: {status}"))
        }
        // WebSocket: upgraded, a message echoed, closed.
        2 => {
            let mut s = TcpStream::connect(t.http)
                .await
                .map_err(|e| e.to_string())?;
            s.write_all(b"GET /ws HTTP/1.1\r\nHost: front\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
                .await
                .map_err(|e| e.to_string())?;
            read_head(&mut s).await?;
            echo(&mut s, b"ping").await
        }
        // Opaque TCP: a message echoed, closed.
        3 => {
            let mut s = TcpStream::connect(t.opaque)
                .await
                .map_err(|e| e.to_string())?;
            echo(&mut s, b"opaque bytes").await
        }
        // Vanishes mid-request: a reset while the backend is still answering.
        4 => {
            let mut s = TcpStream::connect(t.http)
                .await
                .map_err(|e| e.to_string())?;
            let _ = s
                .write_all(b"GET /delay/20 HTTP/1.1\r\nHost: front\r\n\r\n")
                .await;
            reset(s);
            Ok(())
        }
        // Vanishes mid-stream on an opaque connection.
        5 => {
            let mut s = TcpStream::connect(t.opaque)
                .await
                .map_err(|e| e.to_string())?;
            let _ = s.write_all(b"half a message").await;
            reset(s);
            Ok(())
        }
        // Half-closes after its request, then reads the answer.
        _ => {
            let mut s = TcpStream::connect(t.http)
                .await
                .map_err(|e| e.to_string())?;
            s.write_all(request).await.map_err(|e| e.to_string())?;
            s.shutdown().await.map_err(|e| e.to_string())?;
            let mut answer = Vec::new();
            s.read_to_end(&mut answer)
                .await
                .map_err(|e| e.to_string())?;
            ok_answer(&answer)
        }
    }
}

fn ok_answer(answer: &[u8]) -> Result<(), String> {
    answer
        .starts_with(b"HTTP/1.1 200")
        .then_some(())
        .ok_or_else(|| {
            format!(
                "answer: {:?}",
                String::from_utf8_lossy(&answer[..answer.len().min(60)])
            )
        })
}

async fn read_head(s: &mut TcpStream) -> Result<(), String> {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        if s.read(&mut byte).await.map_err(|e| e.to_string())? == 0 {
            return Err("closed during the upgrade".into());
        }
        head.push(byte[0]);
    }
    head.starts_with(b"HTTP/1.1 101")
        .then_some(())
        .ok_or_else(|| format!("not upgraded: {}", String::from_utf8_lossy(&head)))
}

async fn echo(s: &mut TcpStream, message: &[u8]) -> Result<(), String> {
    s.write_all(message).await.map_err(|e| e.to_string())?;
    let mut back = vec![0u8; message.len()];
    s.read_exact(&mut back).await.map_err(|e| e.to_string())?;
    (back == message).then_some(()).ok_or("echo altered".into())
}

/// Closes with a reset (SO_LINGER 0): a client that vanished, as the agent sees it.
// Deprecated because a non-zero linger blocks the thread on drop; zero does not.
#[allow(deprecated)]
fn reset(s: TcpStream) {
    let _ = s.set_linger(Some(Duration::ZERO));
    drop(s);
}

/// Runs the soak; the agent and its backends run on loopback for its duration.
pub async fn run(config: &LeakConfig) -> anyhow::Result<LeakReport> {
    let started = Instant::now();
    let echo = echo_backend([127, 0, 0, 1], "echo").await;
    let raw_addr = crate::loopback::tcp_echo().await;
    let world =
        Manifests::front_routed_to(echo.addr).service("ns", "raw", 80, &[raw_addr], Some("tcp"));
    let agent = tokio::task::block_in_place(|| {
        Agent::start(
            &world,
            AgentOptions {
                listeners: vec![("ns/front", 80), ("ns/raw", 80)],
                caller_namespace: None,
                // Pooled upstream connections go after 1 s idle, so "after" can be compared with
                // "idle" without waiting HTTP/2's default 90 s.
                extra_args: ["--upstream-http1-idle-timeout-ms", "1000"]
                    .into_iter()
                    .chain(["--upstream-http2-idle-timeout-s", "1"])
                    .map(String::from)
                    .collect(),
            },
        )
    })?;
    let targets = Arc::new(Targets {
        http: agent.listen[0],
        opaque: agent.listen[1],
    });
    let try_sample = |agent: &Agent| tokio::task::block_in_place(|| sample(agent));
    let sample_now = |agent: &Agent| try_sample(agent).expect("the agent's metrics read");
    // Warm-up: every kind once per client, then idle.
    let warm = (0..config.concurrency * KINDS).map(|i| {
        let targets = targets.clone();
        async move { connection(i, &targets).await }
    });
    futures_join_all(warm).await;
    // Idle: no connection open and the same descriptors and tasks for a second (pooled upstream
    // connections have gone after their 1 s).
    let mut baseline = sample_now(&agent);
    let settling = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        let now = sample_now(&agent);
        let still = now.fds == baseline.fds && now.tasks == baseline.tasks;
        baseline = now;
        if (still && now.connections_open == 0) || settling.elapsed() > Duration::from_secs(15) {
            break;
        }
    }

    let next = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..config.concurrency {
        let (next, failed, errors, targets) = (
            next.clone(),
            failed.clone(),
            errors.clone(),
            targets.clone(),
        );
        let total = config.connections;
        clients.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return;
                }
                let outcome =
                    tokio::time::timeout(Duration::from_secs(10), connection(i, &targets))
                        .await
                        .unwrap_or_else(|_| Err("no answer within 10 s".into()));
                if let Err(e) = outcome {
                    failed.fetch_add(1, Ordering::Relaxed);
                    let mut errors = errors.lock().expect("not poisoned");
                    if errors.len() < 10 {
                        errors.push(format!("kind {}: {e}", i % KINDS));
                    }
                }
            }
        });
    }
    let mut peak = baseline;
    while !clients.is_empty() {
        tokio::select! {
            _ = clients.join_next() => {}
            () = tokio::time::sleep(Duration::from_millis(200)) => peak = try_sample(&agent).map_or(peak, |now| peak.max(now)),
        }
    }
    let done = Instant::now();
    let mut after = sample_now(&agent);
    let mut settled_in = None;
    while done.elapsed() < Duration::from_secs(30) {
        after = sample_now(&agent);
        if after.fds <= baseline.fds && after.tasks <= baseline.tasks && after.connections_open == 0
        {
            settled_in = Some(done.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let errors = errors.lock().expect("not poisoned").clone();
    Ok(LeakReport {
        connections: config.connections,
        baseline,
        peak: peak.max(after),
        after,
        settled_in,
        failed: failed.load(Ordering::Relaxed),
        errors,
        elapsed: started.elapsed(),
    })
}

async fn futures_join_all<F: std::future::Future + Send + 'static>(futures: impl Iterator<Item = F>)
where
    F::Output: Send,
{
    let mut set = tokio::task::JoinSet::new();
    for f in futures {
        set.spawn(f);
    }
    while set.join_next().await.is_some() {}
}
