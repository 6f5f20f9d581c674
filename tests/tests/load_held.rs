//! Load held: many concurrent keep-alive connections through one agent on 127.0.0.1, a request
//! on each (twice: the connections stay usable), no error allowed; reports the agent's memory
//! per connection.
//!
//! The test suite holds 10,000 connections (about 7 s on 2 cores); `cargo xtask
//! hold-connections N` runs this same test with N through `GAMMA_HOLD_CONNECTIONS`.

use bytes::Bytes;
use gamma_tests::loopback::{echo_backend, Agent, AgentOptions, Manifests};
use gamma_tests::probe::{metric, open_fds, raise_open_files, rss_kib, Resources};
use http::{header, Request};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpSocket;
use tokio::sync::Semaphore;

/// Connections opened, and requests in flight, at once: the agent's accept queue and its
/// upstream pool stay within their ordinary sizes; what is held is the connections.
const CONCURRENCY: usize = 256;
/// Client source addresses (127.0.0.1 to 127.0.0.8), so ephemeral ports never run short.
const SOURCES: u8 = 8;

type Sender = SendRequest<Empty<Bytes>>;

async fn open(agent: SocketAddr, i: usize) -> Result<Sender, String> {
    let source = Ipv4Addr::new(127, 0, 0, 1 + (i % usize::from(SOURCES)) as u8);
    let socket = TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
    socket
        .bind((source, 0).into())
        .map_err(|e| format!("bind {source}: {e}"))?;
    let stream = socket
        .connect(agent)
        .await
        .map_err(|e| format!("connect from {source}: {e}"))?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(connection);
    Ok(sender)
}

async fn get(sender: &mut Sender) -> Result<(), String> {
    sender
        .ready()
        .await
        .map_err(|e| format!("connection closed: {e}"))?;
    let request = Request::get("/")
        .header(header::HOST, "front")
        .body(Empty::new())
        .unwrap();
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("request: {e}"))?;
    if response.status() != 200 {
        return Err(format!("status {}", response.status()));
    }
    response
        .into_body()
        .collect()
        .await
        .map(drop)
        .map_err(|e| format!("body: {e}"))
}

/// Opens connection `i` and sends a first request on it.
async fn open_and_get(agent: SocketAddr, i: usize) -> (usize, Result<Sender, String>) {
    let result = async {
        let mut sender = open(agent, i).await?;
        get(&mut sender).await?;
        Ok(sender)
    };
    (i, result.await)
}

/// Runs `f` on every connection, `CONCURRENCY` at a time; returns the errors.
async fn on_each<F, Fut>(senders: &mut [Option<Sender>], f: F) -> Vec<String>
where
    F: Fn(usize, Option<Sender>) -> Fut,
    Fut: std::future::Future<Output = (usize, Result<Sender, String>)> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(CONCURRENCY));
    let mut tasks = Vec::with_capacity(senders.len());
    for (i, slot) in senders.iter_mut().enumerate() {
        let permit = permits.clone().acquire_owned().await.unwrap();
        let work = f(i, slot.take());
        tasks.push(tokio::spawn(async move {
            let done = work.await;
            drop(permit);
            done
        }));
    }
    let mut errors = Vec::new();
    for task in tasks {
        let (i, result) = task.await.unwrap();
        match result {
            Ok(sender) => senders[i] = Some(sender),
            Err(e) => errors.push(format!("connection {i}: {e}")),
        }
    }
    errors
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_concurrent_keep_alive_connections() {
    let count: usize = std::env::var("GAMMA_HOLD_CONNECTIONS")
        .ok()
        .map(|n| n.parse().expect("GAMMA_HOLD_CONNECTIONS: a number"))
        .unwrap_or(10_000);
    // This process holds the client ends and the agent (which inherits the limit) the server
    // ends plus its upstream pool.
    let wanted = (count + CONCURRENCY + 1_024) as u64;
    let limit = raise_open_files(wanted).unwrap();
    assert!(
        limit >= wanted,
        "{count} connections need {wanted} open files; the hard limit is {limit} and this process \
         may not raise it (that takes CAP_SYS_RESOURCE): raise it (ulimit -Hn) or lower GAMMA_HOLD_CONNECTIONS"
    );
    let echo = echo_backend([127, 0, 0, 1], "echo").await;
    let manifests = Manifests::default()
        .service("ns", "front", 80, &[], None)
        .service("ns", "echo", 80, &[echo.addr], None)
        .raw("apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: ns}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: front, port: 80}]\n  rules:\n  - backendRefs: [{name: echo, port: 80}]\n");
    let options = AgentOptions {
        listeners: vec![("ns/front", 80)],
        caller_namespace: None,
        // The slowloris guard (the whole next request head within 10 s) also closes keep-alive
        // connections idle that long; opening 10,000 can take about that on a busy machine, and
        // what is measured here is holding them.
        extra_args: ["--workers", "2", "--header-read-timeout-ms", "120000"]
            .map(String::from)
            .into(),
    };
    let agent = tokio::task::spawn_blocking(move || Agent::start(&manifests, options))
        .await
        .unwrap()
        .expect("the agent starts");
    let addr = agent.listen[0];
    let pid = agent.child.id();

    // Warm up the upstream pool and the allocator with the same concurrency, then measure.
    let mut warm: Vec<Option<Sender>> = (0..CONCURRENCY).map(|_| None).collect();
    let errors = on_each(&mut warm, |i, _| open_and_get(addr, i)).await;
    assert!(errors.is_empty(), "warm-up: {errors:?}");
    drop(warm);
    let baseline = Resources::settle(&agent, usize::MAX, Duration::from_secs(5)).unwrap();
    let rss_before = rss_kib(pid).unwrap();

    let started = Instant::now();
    let mut senders: Vec<Option<Sender>> = (0..count).map(|_| None).collect();
    let mut errors = on_each(&mut senders, |i, _| open_and_get(addr, i)).await;
    let opened_in = started.elapsed();
    let held = metric(&agent, "gamma_connections_open").unwrap();
    let rss_held = rss_kib(pid).unwrap();
    let fds_held = open_fds(pid).unwrap();
    // A second request on every held connection: they are all still usable.
    errors.extend(
        on_each(&mut senders, |i, sender| async move {
            let result = async {
                let mut sender = sender.ok_or("not opened")?;
                get(&mut sender).await?;
                Ok(sender)
            };
            (i, result.await)
        })
        .await,
    );
    let both_in = started.elapsed();
    let per_connection = (rss_held.saturating_sub(rss_before) * 1024) as f64 / count as f64;
    eprintln!(
        "held {held} of {count} keep-alive connections (opened with a request each in {opened_in:.1?}, a second request on each by {both_in:.1?}); \
         agent RSS {rss_before} KiB -> {rss_held} KiB: {per_connection:.0} bytes per connection; agent fds {} -> {fds_held}; {} errors",
        baseline.fds,
        errors.len()
    );
    assert!(
        errors.is_empty(),
        "{} of {count} connections failed, first: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    assert_eq!(
        held, count as f64,
        "the agent's gamma_connections_open while all were held"
    );

    drop(senders);
    // Descriptors are not compared here: the upstream pool keeps what it keeps.
    let left = Resources::settle(&agent, usize::MAX, Duration::from_secs(10)).unwrap();
    assert!(
        left.connections_open == 0.0 && left.upstream_in_flight == 0.0,
        "after the clients closed: {left:?}"
    );
}
