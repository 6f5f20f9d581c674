//! A real (CRD-only) Kubernetes API server for the tests, and the front that makes it and the fake
//! one look like one API server to the agent.
//!
//! The server is `../shared/tools/real-apiserver/` (apiextensions-apiserver on etcd, built from
//! Debian's Kubernetes source packages by `cargo xtask setup` into [`server_dir`]): real storage,
//! watch cache, schema validation and defaulting, status subresource and server-side apply. It
//! serves custom resources only, so the [`ApiFront`] sends the Gateway API groups there and every
//! other path (Services, EndpointSlices, Pods, Leases) to the in-process fake.

use crate::fake_apiserver::FakeApiServer;
use crate::loopback::TempDir;
use http_body_util::BodyExt;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// The real server's fixed address (its `main.go` binds it).
pub const ADDR: &str = "127.0.0.1:6443";
/// etcd's client and peer addresses, as `run.sh` uses them.
const ETCD_CLIENT: &str = "http://127.0.0.1:23790";
const ETCD_PEER: &str = "http://127.0.0.1:23800";

/// Where `cargo xtask setup` builds and caches the server: `$GAMMA_REAL_APISERVER`, else
/// `/var/cache/gamma-node/real-apiserver`.
pub fn server_dir() -> PathBuf {
    std::env::var_os("GAMMA_REAL_APISERVER")
        .map(Into::into)
        .unwrap_or_else(|| "/var/cache/gamma-node/real-apiserver".into())
}

/// The file in which the setup step records why the server could not be built.
pub fn build_failure_file(dir: &Path) -> PathBuf {
    dir.join("build-failed")
}

/// etcd and the API server, started by the test, stopped (by PID) on drop.
pub struct RealApiServer {
    etcd: Child,
    server: Child,
    dir: TempDir,
    pub client: kube::Client,
}

impl RealApiServer {
    /// Starts etcd (fresh data) and the server; `Err` says why the tier cannot run here (not
    /// built, its port taken). One built that does not serve panics: a failure, not a skip.
    pub async fn start() -> Result<RealApiServer, String> {
        let built = server_dir();
        let (etcd_bin, server_bin) = (
            built.join("gort/root/usr/bin/etcd"),
            built.join("crdserver"),
        );
        if !server_bin.exists() || !etcd_bin.exists() {
            let why = std::fs::read_to_string(build_failure_file(&built))
                .map(|e| format!("its build failed: {}", e.trim()))
                .unwrap_or_else(|_| "it is not built: run `cargo xtask setup`".into());
            return Err(format!("no real API server in {}: {why}", built.display()));
        }
        if std::net::TcpStream::connect(ADDR).is_ok() {
            return Err(format!("{ADDR} is taken by another process"));
        }
        let dir = TempDir::new("real-apiserver");
        let log = |name: &str| std::fs::File::create(dir.0.join(name)).expect("log file");
        let etcd = Command::new(&etcd_bin)
            .arg("--data-dir")
            .arg(dir.0.join("etcd"))
            .args([
                "--listen-client-urls",
                ETCD_CLIENT,
                "--advertise-client-urls",
                ETCD_CLIENT,
            ])
            .args([
                "--listen-peer-urls",
                ETCD_PEER,
                "--initial-advertise-peer-urls",
                ETCD_PEER,
            ])
            .args([
                "--initial-cluster",
                &format!("default={ETCD_PEER}"),
                "--name",
                "default",
            ])
            .stdout(Stdio::null())
            .stderr(log("etcd.log"))
            .spawn()
            .map_err(|e| format!("cannot start etcd: {e}"))?;
        let dummy = dir.0.join("dummy-kubeconfig");
        std::fs::write(
            &dummy,
            "apiVersion: v1\nkind: Config\nclusters: [{name: none, cluster: {server: \"https://127.0.0.1:1\"}}]\n\
             users: [{name: none, user: {}}]\ncontexts: [{name: none, context: {cluster: none, user: none}}]\n\
             current-context: none\n",
        )
        .expect("write the dummy kubeconfig");
        let server = Command::new(&server_bin)
            .env("ETCD_URL", ETCD_CLIENT)
            .env("CERT_DIR", dir.0.join("certs"))
            .env("DUMMY_KUBECONFIG", &dummy)
            .stdout(Stdio::null())
            .stderr(log("crdserver.log"))
            .spawn()
            .map_err(|e| format!("cannot start the API server: {e}"))?;
        let client = insecure_client(&format!("https://{ADDR}"))?;
        let mut real = RealApiServer {
            etcd,
            server,
            dir,
            client,
        };
        // Built but failing is the tier failing, not a reason to skip it.
        if let Err(e) = real.until_serving().await {
            panic!("the real API server did not start: {e}");
        }
        Ok(real)
    }

    async fn until_serving(&mut self) -> Result<(), String> {
        let started = Instant::now();
        loop {
            let request = http::Request::get("/apis/apiextensions.k8s.io/v1")
                .body(Vec::new())
                .unwrap();
            let error = match self.client.request_text(request).await {
                Ok(_) => return Ok(()),
                Err(e) => e,
            };
            if let Ok(Some(exit)) = self.server.try_wait() {
                return Err(format!("the API server exited ({exit}): {}", self.log()));
            }
            if started.elapsed() > crate::harness_timeout(Duration::from_secs(60)) {
                return Err(format!(
                    "the API server did not serve within 60 s ({error}): {}",
                    self.log()
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The last lines of the server's log.
    pub fn log(&self) -> String {
        let text = std::fs::read_to_string(self.dir.0.join("crdserver.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Creates every CustomResourceDefinition of a YAML file and waits until each is served.
    pub async fn install_crds(&self, file: &Path) -> Result<(), String> {
        let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
        let documents = gamma_engine::manifests::documents(&text)
            .map_err(|(n, e)| format!("{} document {n}: {e}", file.display()))?;
        for (_, crd) in documents {
            self.install_crd(&crd)
                .await
                .map_err(|e| format!("{}: {e}", file.display()))?;
        }
        Ok(())
    }

    /// Creates one CustomResourceDefinition and waits until its resource is served.
    pub async fn install_crd(&self, crd: &serde_json::Value) -> Result<(), String> {
        let request =
            http::Request::post("/apis/apiextensions.k8s.io/v1/customresourcedefinitions")
                .header("content-type", "application/json")
                .body(serde_json::to_vec(crd).unwrap())
                .unwrap();
        self.client
            .request_text(request)
            .await
            .map_err(|e| format!("creating the CRD: {e}"))?;
        let group = crd["spec"]["group"].as_str().unwrap_or_default();
        let plural = crd["spec"]["names"]["plural"].as_str().unwrap_or_default();
        let version = crd["spec"]["versions"]
            .as_array()
            .and_then(|v| v.iter().find(|v| v["storage"] == true))
            .and_then(|v| v["name"].as_str())
            .unwrap_or("v1");
        let started = Instant::now();
        loop {
            let list = http::Request::get(format!("/apis/{group}/{version}/{plural}"))
                .body(Vec::new())
                .unwrap();
            if self.client.request_text(list).await.is_ok() {
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(30) {
                return Err(format!("{plural}.{group} not served 30 s after its CRD"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for RealApiServer {
    fn drop(&mut self) {
        for child in [&mut self.server, &mut self.etcd] {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- real API server log ---\n{}", self.log());
        }
    }
}

/// A client of a self-signed HTTPS server on loopback (the test's own; nothing to verify).
fn insecure_client(url: &str) -> Result<kube::Client, String> {
    let mut config = kube::Config::new(url.parse().map_err(|e| format!("{url}: {e}"))?);
    config.accept_invalid_certs = true;
    kube::Client::try_from(config).map_err(|e| format!("client of {url}: {e}"))
}

/// One API server address for the agent: the Gateway API groups go to the real server, the
/// rest to the fake.
pub struct ApiFront {
    addr: SocketAddr,
    accept: tokio::task::JoinHandle<()>,
    hooks: Arc<Hooks>,
}

#[derive(Default)]
struct Hooks {
    /// The Gateway API requests relayed: method, path, status.
    relayed: Mutex<Vec<(String, String, u16)>>,
    /// Set: the next status write is held until the test lets it go.
    hold: Mutex<Option<Hold>>,
}

struct Hold {
    arrived: oneshot::Sender<()>,
    release: oneshot::Receiver<()>,
}

/// A status write held by the front: the test acts while it waits, then lets it go.
pub struct HeldWrite {
    arrived: oneshot::Receiver<()>,
    release: oneshot::Sender<()>,
}

impl HeldWrite {
    /// Waits until the agent's write has reached the front (bounded by `limit`).
    pub async fn arrived(&mut self, limit: Duration) -> bool {
        matches!(
            tokio::time::timeout(limit, &mut self.arrived).await,
            Ok(Ok(()))
        )
    }

    pub fn release(self) {
        let _ = self.release.send(());
    }
}

impl ApiFront {
    pub async fn start(fake: &FakeApiServer, real: &RealApiServer) -> ApiFront {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the API front");
        let addr = listener.local_addr().unwrap();
        let fake = kube::Client::try_from(kube::Config::new(
            format!("http://{}", fake.addr()).parse().unwrap(),
        ))
        .expect("a client of the fake API server");
        let real = real.client.clone();
        let hooks = Arc::new(Hooks::default());
        let shared = hooks.clone();
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (fake, real, hooks) = (fake.clone(), real.clone(), shared.clone());
                tokio::spawn(async move {
                    let service =
                        service_fn(move |request: http::Request<hyper::body::Incoming>| {
                            let (fake, real, hooks) = (fake.clone(), real.clone(), hooks.clone());
                            async move {
                                if !is_gateway_api(request.uri().path()) {
                                    return relay(fake, request).await;
                                }
                                let (method, path) = (
                                    request.method().to_string(),
                                    request.uri().path().to_string(),
                                );
                                if method == "PATCH" && path.ends_with("/status") {
                                    let hold = hooks.hold.lock().unwrap().take();
                                    if let Some(hold) = hold {
                                        let _ = hold.arrived.send(());
                                        let _ = hold.release.await;
                                    }
                                }
                                let answer = relay(real, request).await;
                                let status = answer.as_ref().map_or(0, |a| a.status().as_u16());
                                hooks.relayed.lock().unwrap().push((method, path, status));
                                answer
                            }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        ApiFront {
            addr,
            accept,
            hooks,
        }
    }

    /// Holds the next status write the agent sends, until [`HeldWrite::release`].
    pub fn hold_next_status_write(&self) -> HeldWrite {
        let (arrived, arrived_rx) = oneshot::channel();
        let (release_tx, release) = oneshot::channel();
        *self.hooks.hold.lock().unwrap() = Some(Hold { arrived, release });
        HeldWrite {
            arrived: arrived_rx,
            release: release_tx,
        }
    }

    /// The Gateway API requests relayed so far: method, path, status.
    pub fn relayed(&self) -> Vec<(String, String, u16)> {
        self.hooks.relayed.lock().unwrap().clone()
    }

    /// Method and status of the calls relayed after the first `skip` whose path `wanted` accepts,
    /// once there are `count` of them or `limit` has passed.
    pub async fn relayed_matching(
        &self,
        skip: usize,
        count: usize,
        limit: Duration,
        wanted: impl Fn(&str) -> bool,
    ) -> Vec<(String, u16)> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let calls: Vec<(String, u16)> = self.relayed()[skip..]
                .iter()
                .filter(|(_, path, _)| wanted(path))
                .map(|(method, _, status)| (method.clone(), *status))
                .collect();
            if calls.len() >= count || tokio::time::Instant::now() >= deadline {
                return calls;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A kubeconfig for the front whose user presents `token`.
    pub fn kubeconfig(&self, dir: &Path, token: &str) -> PathBuf {
        crate::fake_apiserver::kubeconfig_for(self.addr, dir, token)
    }
}

impl Drop for ApiFront {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

fn is_gateway_api(path: &str) -> bool {
    [
        "/apis/gateway.networking.k8s.io",
        "/apis/gateway.networking.x-k8s.io",
    ]
    .iter()
    .any(|group| path == *group || path.starts_with(&format!("{group}/")))
}

/// Sends one request on and streams the answer back (watches included).
async fn relay(
    to: kube::Client,
    request: http::Request<hyper::body::Incoming>,
) -> Result<http::Response<kube::client::Body>, std::io::Error> {
    let (mut parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    // The target client sets its own authority.
    parts.headers.remove(http::header::HOST);
    let request = http::Request::from_parts(parts, kube::client::Body::from(body));
    to.send(request).await.map_err(std::io::Error::other)
}
