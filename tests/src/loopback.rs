//! Loopback integration support: the agent binary with explicit listeners on 127.0.0.1, echo
//! backends in-process, and manifests written to a temporary folder.

use crate::echo::{self, EchoStats};
use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use std::net::{Ipv4Addr, SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The agent binary in `target/<profile>/` (cargo builds it for the workspace's tests), seen
/// from a test binary (`target/<profile>/deps/`) or from a bin of this crate (`target/<profile>/`).
pub fn agent_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe.parent().expect("target/<profile>[/deps]");
    let beside = dir.join("proxy-agent");
    if beside.exists() {
        return beside;
    }
    dir.parent().unwrap_or(dir).join("proxy-agent")
}

/// A port free right now on 127.0.0.1, released before use, for an agent to bind. Taken below the
/// kernel's ephemeral range: a port from that range can be taken, between this check and the
/// agent's bind, as the source port of any connection made meanwhile (a test beside making
/// thousands did). Below it, only another explicit bind can; the start differs per process.
pub fn free_port() -> u16 {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<usize>().ok())
        .unwrap_or(32_768);
    let span = 10_000.min(ephemeral_low.saturating_sub(1_024));
    let start = (std::process::id() as usize).wrapping_mul(7_919);
    (0..span)
        .map(|_| {
            ephemeral_low - span + start.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed)) % span
        })
        .find_map(|port| {
            let port = u16::try_from(port).ok()?;
            StdListener::bind((Ipv4Addr::LOCALHOST, port))
                .ok()
                .map(|_| port)
        })
        .expect("a free port below the ephemeral range on 127.0.0.1")
}

/// A temporary folder removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("gamma-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An echo backend on 127.0.0.x:port, serving in the test's runtime.
pub struct EchoBackend {
    pub addr: SocketAddr,
    pub stats: Arc<EchoStats>,
}

pub async fn echo_backend(ip: [u8; 4], name: &str) -> EchoBackend {
    echo_backend_at((std::net::Ipv4Addr::from(ip), 0).into(), name).await
}

/// An echo backend on `addr` (port 0: any free one).
///
/// Its accept queue holds 4,096 connections, as a server's does where the kernel allows
/// (`net.core.somaxconn`; Go's servers ask for that much): a burst of new connections from the
/// agent, such as a cold pool under hundreds of concurrent requests, then waits to be accepted.
/// tokio's `TcpListener::bind` asks for 128, which drops the SYNs beyond; a dropped SYN is
/// retried after 1 s, within the agent's connect timeout but a second late.
pub async fn echo_backend_at(addr: SocketAddr, name: &str) -> EchoBackend {
    let bind = || {
        let socket = match addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(4096)
    };
    let listener = bind().unwrap_or_else(|e| panic!("bind echo on {addr}: {e}"));
    let addr = listener.local_addr().unwrap();
    let stats = Arc::new(EchoStats::default());
    tokio::spawn(echo::serve(listener, name.to_string(), stats.clone()));
    EchoBackend { addr, stats }
}

/// A raw TCP echo on 127.0.0.1 (any free port), for opaque connections; serves until the
/// runtime ends.
pub async fn tcp_echo() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the TCP echo");
    let addr = listener.local_addr().expect("its address");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// Manifests of a loopback world.
#[derive(Default, Clone)]
pub struct Manifests {
    documents: Vec<String>,
}

impl Manifests {
    /// A Service with port `port` whose endpoints are `endpoints` (all on the same port number,
    /// as an EndpointSlice requires). `app_protocol` sets the port's appProtocol.
    pub fn service(
        mut self,
        namespace: &str,
        name: &str,
        port: u16,
        endpoints: &[SocketAddr],
        app_protocol: Option<&str>,
    ) -> Self {
        let target = endpoints.first().map_or(port, |e| e.port());
        let app = app_protocol
            .map(|a| format!(", appProtocol: {a}"))
            .unwrap_or_default();
        self.documents.push(format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n  ports: [{{name: p, port: {port}, targetPort: {target}{app}}}]\n"
        ));
        if !endpoints.is_empty() {
            let addresses: Vec<String> = endpoints
                .iter()
                .map(|e| format!("{{addresses: [{}], conditions: {{ready: true}}}}", e.ip()))
                .collect();
            self.documents.push(format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  namespace: {namespace}\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\nports: [{{name: p, port: {target}}}]\nendpoints: [{}]\n",
                addresses.join(", ")
            ));
        }
        self
    }

    /// `ns/front` (no endpoints of its own) routed whole to `ns/echo` at `echo`.
    pub fn front_routed_to(echo: SocketAddr) -> Self {
        Self::front_with_rules(echo, "  - backendRefs: [{name: echo, port: 80}]\n")
    }

    /// `ns/front` (no endpoints of its own) with a route of these `rules`, and `ns/echo` at
    /// `echo` for them to send to.
    pub fn front_with_rules(echo: SocketAddr, rules: &str) -> Self {
        Self::front_with_rules_declared(echo, rules, None)
    }

    /// As [`Self::front_with_rules`], `ns/echo`'s port declaring `app_protocol` (`http`: the
    /// agent speaks HTTP/1.1 to it whatever its caller speaks).
    pub fn front_with_rules_declared(
        echo: SocketAddr,
        rules: &str,
        app_protocol: Option<&str>,
    ) -> Self {
        Manifests::default()
            .service("ns", "front", 80, &[], None)
            .service("ns", "echo", 80, &[echo], app_protocol)
            .raw(&route("r", "front", rules))
    }

    /// Any document (a route, usually).
    pub fn raw(mut self, yaml: &str) -> Self {
        self.documents.push(yaml.to_string());
        self
    }

    pub fn write(&self, dir: &Path, file: &str) {
        let path = dir.join(file);
        let tmp = dir.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, self.documents.join("---\n")).expect("write manifests");
        // Rename so the agent never reads a half-written file.
        std::fs::rename(&tmp, &path).expect("rename manifests");
    }
}

/// A running agent process; killed on drop.
pub struct Agent {
    pub child: Child,
    pub admin: SocketAddr,
    pub manifests: TempDir,
    pub listen: Vec<SocketAddr>,
}

pub struct AgentOptions<'a> {
    /// `(service, port)` per explicit listener, as `NAMESPACE/NAME`.
    pub listeners: Vec<(&'a str, u16)>,
    pub caller_namespace: Option<&'a str>,
    pub extra_args: Vec<String>,
}

impl Agent {
    /// [`Agent::start`] with one listener, for Service `ns/front` port 80, and no other option.
    pub fn start_front(manifests: &Manifests) -> Result<Agent> {
        let options = AgentOptions {
            listeners: vec![("ns/front", 80)],
            caller_namespace: None,
            extra_args: Vec::new(),
        };
        Agent::start(manifests, options)
    }

    /// Starts the agent on `manifests` and waits until `/ready` answers 200 and every listener
    /// accepts connections (at most 10 s).
    pub fn start(manifests: &Manifests, options: AgentOptions<'_>) -> Result<Agent> {
        let log = std::env::var("AGENT_LOG").unwrap_or_else(|_| "warn".into());
        Agent::start_logging(manifests, options, &log, Stdio::inherit())
    }

    /// [`Agent::start`] with its log filter (`RUST_LOG`) and where its stderr goes.
    pub fn start_logging(
        manifests: &Manifests,
        options: AgentOptions<'_>,
        log: &str,
        stderr: Stdio,
    ) -> Result<Agent> {
        let dir = TempDir::new("agent");
        manifests.write(&dir.0, "world.yaml");
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        let mut command = Command::new(agent_binary());
        command
            .arg("--manifests")
            .arg(&dir.0)
            .arg("--admin")
            .arg(admin.to_string())
            .arg("--poll-interval-ms")
            .arg("50");
        let mut listen = Vec::new();
        for (service, port) in &options.listeners {
            let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
            command
                .arg("--listen")
                .arg(format!("{addr}={service}:{port}"));
            listen.push(addr);
        }
        if let Some(ns) = options.caller_namespace {
            command.arg("--caller-namespace").arg(ns);
        }
        command.args(&options.extra_args).env("RUST_LOG", log);
        command.stdout(Stdio::null()).stderr(stderr);
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", agent_binary().display()))?;
        let agent = Agent {
            child,
            admin,
            manifests: dir,
            listen,
        };
        agent.wait_ready(Duration::from_secs(10))?;
        Ok(agent)
    }

    fn wait_ready(&self, limit: Duration) -> Result<()> {
        let started = Instant::now();
        loop {
            // Ready says every listener serves. Not probed by connecting: a connection that
            // closes without a byte reaches an undeclared port's endpoints, as a client's would.
            if http_get_status(self.admin, "/ready").is_ok_and(|s| s == 200) {
                return Ok(());
            }
            if started.elapsed() > limit {
                bail!("the agent was not ready within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Rewrites the agent's manifests and waits until the snapshot version moves.
    pub fn update(&self, manifests: &Manifests) -> Result<()> {
        let before = self.snapshot_version()?;
        manifests.write(&self.manifests.0, "world.yaml");
        let started = Instant::now();
        while self.snapshot_version()? == before {
            if started.elapsed() > Duration::from_secs(5) {
                bail!("the agent did not publish the change within 5 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    pub fn snapshot_version(&self) -> Result<u64> {
        let dump = http_get(self.admin, "/config_dump")?;
        let value: serde_json::Value = serde_json::from_str(&dump)?;
        value["version"]
            .as_u64()
            .context("config_dump has no version")
    }

    pub fn url(&self, i: usize, path: &str) -> String {
        format!("http://{}{path}", self.listen[i])
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        // SAFETY: kill(2) with a pid we own.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A blocking GET on loopback returning the body (admin endpoints).
pub fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    let (status, body) = http_get_full(addr, path)?;
    if status != 200 {
        bail!("GET {path}: {status}: {body}");
    }
    Ok(body)
}

fn http_get_status(addr: SocketAddr, path: &str) -> Result<u16> {
    http_get_full(addr, path).map(|(s, _)| s)
}

/// A blocking GET on loopback: status and body.
pub fn http_get_full(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no status line")?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// A client for the agent's listeners (bodies are small and whole).
pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// HTTP/2 with prior knowledge (`h2`), else HTTP/1.1.
pub fn client(h2: bool) -> HttpClient {
    Client::builder(TokioExecutor::new())
        .http2_only(h2)
        .build_http()
}

/// An answer read whole: `body` is its JSON (the echo's), `Null` if it is not JSON.
pub struct Answer {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: Value,
    pub text: String,
    pub bytes: Bytes,
    pub trailers: Option<http::HeaderMap>,
}

pub async fn get(client: &HttpClient, url: &str, headers: &[(&str, &str)]) -> Answer {
    send(client, Method::GET, url, headers, Bytes::new()).await
}

/// Sends one request and reads its answer whole; panics if it cannot be sent.
pub async fn send(
    client: &HttpClient,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Answer {
    let mut builder = Request::builder().method(method).uri(url);
    for (n, v) in headers {
        builder = builder.header(*n, *v);
    }
    let response = client
        .request(builder.body(Full::new(body)).unwrap())
        .await
        .expect("request sent");
    read_answer(response).await
}

/// One HTTP/1.1 connection, its requests sent one after another on it: for tests that count
/// what one caller connection does (a pooled client may open another connection when a request
/// follows an answer closely, before the first is back in its pool).
pub struct OneConnection {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    /// Sent as `Host`.
    addr: SocketAddr,
}

impl OneConnection {
    pub async fn open(addr: SocketAddr) -> Self {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .expect("connected");
        let (sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .expect("handshake");
        tokio::spawn(connection);
        OneConnection { sender, addr }
    }

    /// Sends one request (its target as `path`) and reads its answer whole.
    pub async fn send(&mut self, method: Method, path: &str, headers: &[(&str, &str)]) -> Answer {
        let host = self.addr.to_string();
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header("host", host);
        for (n, v) in headers {
            builder = builder.header(*n, *v);
        }
        self.sender
            .ready()
            .await
            .expect("the connection takes a request");
        let response = self
            .sender
            .send_request(builder.body(Full::new(Bytes::new())).unwrap())
            .await
            .expect("request sent");
        read_answer(response).await
    }
}

async fn read_answer(response: http::Response<hyper::body::Incoming>) -> Answer {
    let status = response.status();
    let headers = response.headers().clone();
    let collected = response.into_body().collect().await.expect("body");
    let trailers = collected.trailers().cloned();
    let bytes = collected.to_bytes();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    Answer {
        status,
        headers,
        body: serde_json::from_str(&text).unwrap_or(Value::Null),
        text,
        bytes,
        trailers,
    }
}

/// A request header as the echo backend received it.
pub fn header_at_backend(answer: &Answer, name: &str) -> Option<String> {
    answer.body["headers"]
        .as_array()?
        .iter()
        .find(|h| h[0] == name)
        .and_then(|h| h[1].as_str().map(str::to_string))
}

/// An HTTPRoute in namespace `ns` on Service `parent` port 80, with `rules` (YAML lines).
pub fn route(name: &str, parent: &str, rules: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: ns}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: {parent}, port: 80}}]\n  rules:\n{rules}"
    )
}

/// An HTTP/2 (prior knowledge) client connection to `addr`, driven by a task of its own.
pub async fn http2_to<B>(
    addr: SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<B>,
    tokio::task::JoinHandle<hyper::Result<()>>,
)
where
    B: hyper::body::Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    (sender, tokio::spawn(connection))
}
