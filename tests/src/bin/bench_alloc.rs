//! `cargo xtask bench alloc`: heap allocations per request on the agent's request path.
//!
//! The agent's data plane (`Proxy` behind an explicit listener, with the peers benchmark's route:
//! a header set, a 90/10 split) runs in this process on its own thread, whose allocations alone
//! are counted; the client and the two echo backends run on other threads, uncounted. HTTP/1.1
//! keep-alive, HTTP/1.1 on a new connection per request (what a connection costs beyond its
//! request) and HTTP/2 (h2c) requests, each warmed up first so that pools and tables are filled,
//! then measured; and HTTP/1.1 keep-alive again with the access log on, as the DaemonSet runs the
//! agent (`info`, JSON lines, written to nowhere by the agent's log writer). With `GAMMA_ALLOC_TRACE=1` it also says where the allocations of a few
//! requests come from: their call sites, grouped by the innermost frame of the agent, the engine,
//! hyper, h2 or tokio.

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use proxy_agent::proxy::drain::Drain;
use proxy_agent::proxy::explicit::{serve_explicit, ExplicitTarget};
use proxy_agent::proxy::{Proxy, ProxyConfig};
use proxy_agent::telemetry::Metrics;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::net::TcpStream;

/// Requests measured per protocol (a tenth of them with a new connection each, which leaves the
/// client's side of each in TIME_WAIT: ephemeral ports are not unbounded).
const REQUESTS: u64 = 20_000;
const WARMUP: u64 = 2_000;

/// How the client sends its requests.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    KeepAlive,
    NewConnection,
    H2,
    /// Keep-alive, an access log line per request.
    Logged,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::KeepAlive => "HTTP/1.1 keep-alive",
            Mode::NewConnection => "HTTP/1.1, a new connection per request",
            Mode::H2 => "HTTP/2 (h2c)",
            Mode::Logged => "HTTP/1.1 keep-alive, access log on",
        }
    }

    /// Requests per measure: a tenth as many with a connection each.
    fn share(self, requests: u64) -> u64 {
        if self == Mode::NewConnection {
            requests / 10
        } else {
            requests
        }
    }
}
/// Whether the access log is on (for [`Mode::Logged`] only).
static LOGGING: AtomicBool = AtomicBool::new(false);

/// Log lines written (to nowhere): that the access log was on is checked, not assumed.
static LINES_WRITTEN: AtomicU64 = AtomicU64::new(0);

struct CountedLines;

impl std::io::Write for CountedLines {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let lines = bytes.iter().filter(|&&b| b == b'\n').count();
        LINES_WRITTEN.fetch_add(lines as u64, Ordering::Relaxed);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The agent's log writer and access log, as its `main` sets them up, on while [`LOGGING`] is.
fn log_as_deployed() -> Result<()> {
    use proxy_agent::telemetry::log_writer::{Format, LogWriter};
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::Layer as _;
    let log = LogWriter::spawn(CountedLines, Format::Json)?;
    proxy_agent::telemetry::access_log::install(log.clone());
    // Asked at each event (not once per call site, when the log was still off).
    let on = tracing_subscriber::filter::DynFilterFn::new(
        |meta: &tracing::Metadata<'_>,
         _: &tracing_subscriber::layer::Context<'_, tracing_subscriber::Registry>| {
            LOGGING.load(Ordering::Relaxed) && *meta.level() <= tracing::Level::INFO
        },
    );
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .json()
                .with_writer(log)
                .with_filter(on),
        )
        .try_init()?;
    Ok(())
}

/// Requests whose allocations are traced (`GAMMA_ALLOC_TRACE=1`).
const TRACED: u64 = 20;

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);
static TRACING: AtomicBool = AtomicBool::new(false);
/// Each traced allocation's size and where it was made.
static TRACES: Mutex<Vec<(usize, std::backtrace::Backtrace)>> = Mutex::new(Vec::new());

thread_local! {
    /// Set on the agent's thread: only its allocations count.
    static AGENT_THREAD: Cell<bool> = const { Cell::new(false) };
    /// Set while a trace is taken (taking one allocates).
    static IN_TRACE: Cell<bool> = const { Cell::new(false) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

fn count(size: usize) {
    // `try_with`: thread-locals are gone while a thread exits.
    let agent = AGENT_THREAD.try_with(Cell::get).unwrap_or(false);
    if !agent || IN_TRACE.try_with(Cell::get).unwrap_or(true) {
        return;
    }
    ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    BYTES.fetch_add(size as u64, Ordering::Relaxed);
    if TRACING.load(Ordering::Relaxed) {
        IN_TRACE.with(|t| t.set(true));
        let trace = std::backtrace::Backtrace::force_capture();
        TRACES.lock().expect("not poisoned").push((size, trace));
        IN_TRACE.with(|t| t.set(false));
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const MANIFESTS: &str = include_str!("../../../bench/peers/manifests/bench.yaml");

fn main() -> Result<()> {
    let trace = std::env::var_os("GAMMA_ALLOC_TRACE").is_some_and(|v| v == "1");
    let others = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let (a, b) = others.block_on(async {
        let a = gamma_tests::loopback::echo_backend([127, 0, 0, 1], "18080").await;
        let b = gamma_tests::loopback::echo_backend([127, 0, 0, 1], "18081").await;
        (a.addr.port(), b.addr.port())
    });
    let manifests = MANIFESTS
        .replace("18080", &a.to_string())
        .replace("18081", &b.to_string());
    let mut index = gamma_engine::Index::new();
    for object in
        gamma_engine::manifests::parse(std::path::Path::new("echo.yaml"), &manifests).objects
    {
        index.apply(object);
    }
    index.publish();
    let snapshot = Arc::new(arc_swap::ArcSwap::new(index.snapshot()));
    let proxy = Proxy::new(
        snapshot,
        Arc::new(Metrics::default()),
        ProxyConfig::default(),
    );
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let agent_addr = listener.local_addr()?;
    std::thread::Builder::new()
        .name("agent".into())
        .spawn(move || {
            AGENT_THREAD.with(|a| a.set(true));
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("the agent's runtime");
            runtime.block_on(async move {
                let target = ExplicitTarget {
                    service: gamma_engine::ObjectKey::new("bench", "echo"),
                    port: 80,
                    caller_namespace: None,
                };
                serve_explicit(proxy, listener, target, Drain::default()).await
            })
        })?;
    println!(
        "allocations on the agent's thread per request (warm-up {WARMUP}, then {REQUESTS} measured; \
         a tenth as many with a new connection each):"
    );
    println!("| protocol | allocations / request | bytes / request |");
    println!("|---|---|---|");
    log_as_deployed()?;
    let modes = [Mode::KeepAlive, Mode::NewConnection, Mode::H2, Mode::Logged];
    for mode in modes {
        let (allocations, bytes) = others.block_on(measure(agent_addr, mode, false))?;
        println!("| {} | {allocations:.1} | {bytes:.0} |", mode.name());
    }
    if trace {
        for mode in modes {
            others.block_on(measure(agent_addr, mode, true))?;
            let traces = std::mem::take(&mut *TRACES.lock().expect("not poisoned"));
            report_sites(mode.name(), &traces);
        }
    }
    Ok(())
}

/// Sends warm-up then measured requests (on one connection, or each on its own); allocations and
/// bytes per measured request (or, tracing, takes traces of `TRACED` requests).
async fn measure(agent: std::net::SocketAddr, mode: Mode, trace: bool) -> Result<(f64, f64)> {
    LOGGING.store(mode == Mode::Logged, Ordering::SeqCst);
    let mut send: Box<dyn FnMut() -> SendFuture> = match mode {
        Mode::H2 => {
            let (sender, conn) = hyper::client::conn::http2::handshake(
                hyper_util::rt::TokioExecutor::new(),
                connect(agent).await?,
            )
            .await?;
            tokio::spawn(conn);
            Box::new(move || {
                let mut sender = sender.clone();
                Box::pin(async move { round_trip(sender.send_request(request(true)).await?).await })
            })
        }
        Mode::KeepAlive | Mode::Logged => {
            let (sender, conn) =
                hyper::client::conn::http1::handshake(connect(agent).await?).await?;
            tokio::spawn(conn);
            let sender = Arc::new(tokio::sync::Mutex::new(sender));
            Box::new(move || {
                let sender = sender.clone();
                Box::pin(async move {
                    let mut sender = sender.lock().await;
                    sender.ready().await?;
                    round_trip(sender.send_request(request(false)).await?).await
                })
            })
        }
        Mode::NewConnection => Box::new(move || {
            Box::pin(async move {
                let (mut sender, conn) =
                    hyper::client::conn::http1::handshake(connect(agent).await?).await?;
                tokio::spawn(conn);
                round_trip(sender.send_request(request(false)).await?).await
            })
        }),
    };
    for _ in 0..mode.share(WARMUP) {
        send().await?;
    }
    let measured = if trace { TRACED } else { mode.share(REQUESTS) };
    let (before, bytes_before) = (
        ALLOCATIONS.load(Ordering::SeqCst),
        BYTES.load(Ordering::SeqCst),
    );
    TRACING.store(trace, Ordering::SeqCst);
    for _ in 0..measured {
        send().await?;
    }
    TRACING.store(false, Ordering::SeqCst);
    if mode == Mode::Logged {
        // The writer thread writes within its batch window.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let lines = LINES_WRITTEN.load(Ordering::SeqCst);
        anyhow::ensure!(
            lines >= measured,
            "the access log wrote {lines} lines for {measured} requests: it was not on"
        );
    }
    let allocations = ALLOCATIONS.load(Ordering::SeqCst) - before;
    let bytes = BYTES.load(Ordering::SeqCst) - bytes_before;
    Ok((
        allocations as f64 / measured as f64,
        bytes as f64 / measured as f64,
    ))
}

async fn connect(agent: std::net::SocketAddr) -> Result<hyper_util::rt::TokioIo<TcpStream>> {
    let stream = TcpStream::connect(agent).await?;
    stream.set_nodelay(true)?;
    Ok(hyper_util::rt::TokioIo::new(stream))
}

type SendFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send>>;

/// What clients send a Service: HTTP/1.1 in origin form with a Host (hyper's client writes the
/// target as given, and an absolute one is what clients send a proxy they chose, a rarer path
/// with its own Host to make); HTTP/2 with its authority in the URI.
fn request(h2: bool) -> http::Request<Empty<Bytes>> {
    let builder = if h2 {
        http::Request::get("http://echo.bench/alloc?q=1").version(http::Version::HTTP_2)
    } else {
        http::Request::get("/alloc?q=1").header("host", "echo.bench")
    };
    builder
        .header("user-agent", "bench-alloc")
        .body(Empty::new())
        .expect("a valid request")
}

async fn round_trip(response: http::Response<hyper::body::Incoming>) -> Result<()> {
    anyhow::ensure!(response.status() == 200, "status {}", response.status());
    response.into_body().collect().await.context("the body")?;
    Ok(())
}

/// Groups traced allocations by their call site: the innermost frame of the agent or the engine,
/// with the innermost library frame (hyper, h2, tokio, http) below it when there is one.
fn report_sites(protocol: &str, traces: &[(usize, std::backtrace::Backtrace)]) {
    // Per site: allocations, bytes.
    let mut sites: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for (size, trace) in traces {
        let text = trace.to_string();
        let functions: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter_map(|l| l.split_once(": ").map(|(_, f)| f))
            .filter(|f| {
                !f.starts_with("std::")
                    && !f.starts_with("alloc::")
                    && !f.starts_with("core::")
                    && !f.contains("bench_alloc::")
            })
            .collect();
        let library = functions.iter().find(|f| {
            [
                "hyper::",
                "hyper_util::",
                "h2::",
                "tokio::",
                "http::",
                "bytes::",
            ]
            .iter()
            .any(|p| f.starts_with(p))
        });
        let ours = functions
            .iter()
            .find(|f| f.starts_with("proxy_agent::") || f.starts_with("gamma_engine::"));
        let site = match (ours, library) {
            (Some(o), Some(l)) => format!("{} ← {}", short(l), short(o)),
            (Some(o), None) => short(o),
            (None, Some(l)) => short(l),
            (None, None) => functions.first().map_or("?".to_string(), |f| short(f)),
        };
        let counts = sites.entry(site).or_default();
        counts.0 += 1;
        counts.1 += *size as u64;
    }
    let mut sorted: Vec<_> = sites.into_iter().collect();
    sorted.sort_by_key(|s| std::cmp::Reverse(s.1));
    println!(
        "\n{protocol}: where the allocations of {TRACED} requests come from (allocations and bytes per request):"
    );
    for (site, (n, bytes)) in sorted {
        let per = |v: u64| v as f64 / TRACED as f64;
        println!("  {:>5.1} {:>7.0}  {site}", per(n), per(bytes));
    }
}

/// A function path without its hash suffix and generic noise.
fn short(function: &str) -> String {
    let function = function.rsplit_once("::h").map_or(function, |(f, hash)| {
        if hash.chars().all(|c| c.is_ascii_hexdigit()) {
            f
        } else {
            function
        }
    });
    function
        .replace("{{closure}}", "{closure}")
        .chars()
        .take(140)
        .collect()
}
