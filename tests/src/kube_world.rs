//! The world of the Kubernetes-source tests: objects as the API server holds them (namespace
//! `shop`), `proxy-agent --kube` started against the fake API server, and readers of its table
//! (`/config_dump`).

use crate::fake_apiserver::FakeApiServer;
use crate::loopback::{agent_binary, free_port, http_get, http_get_full, TempDir};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const NS: &str = "shop";
pub const LIMIT: Duration = Duration::from_secs(10);
pub const LEASE_NS: &str = "gamma-system";

/// Polls `check` until it gives a value; panics after `LIMIT`. Returns the value and how long
/// it took.
pub fn eventually<T>(what: &str, check: impl FnMut() -> Option<T>) -> (T, Duration) {
    crate::eventually_within(LIMIT, what, check)
}

// --- objects -----------------------------------------------------------------------------

pub fn service(
    name: &str,
    cluster_ip: &str,
    target_port: u16,
    app_protocol: Option<&str>,
) -> Value {
    let mut port = json!({"name": "p", "port": 80, "targetPort": target_port});
    if let Some(app) = app_protocol {
        port["appProtocol"] = app.into();
    }
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"clusterIP": cluster_ip, "clusterIPs": [cluster_ip], "ports": [port]},
    })
}

/// The EndpointSlice `{service}-1` with one ready endpoint.
pub fn slice(service: &str, endpoint: SocketAddr) -> Value {
    slice_named(
        &format!("{service}-1"),
        service,
        endpoint.port(),
        &[(endpoint.ip().to_string(), true)],
    )
}

/// An EndpointSlice of `service`: every endpoint (address, ready) on `port`.
pub fn slice_named(name: &str, service: &str, port: u16, endpoints: &[(String, bool)]) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(address, ready)| json!({"addresses": [address], "conditions": {"ready": ready}}))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": NS,
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "p", "port": port}],
        "endpoints": endpoints,
    })
}

pub fn pod(name: &str, node: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "uid": format!("uid-{name}")},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "i"}]},
        "status": {"podIP": ip, "podIPs": [{"ip": ip}]},
    })
}

pub fn route(kind: &str, name: &str, parent: &str, backend: &str) -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": kind,
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": parent, "port": 80}],
            "rules": [{"backendRefs": [{"name": backend, "port": 80}]}],
        },
    })
}

// --- the agent ---------------------------------------------------------------------------

pub struct KubeAgent {
    pub child: Child,
    pub admin: SocketAddr,
    pub listen: SocketAddr,
    pub log: PathBuf,
    _dir: TempDir,
}

impl KubeAgent {
    /// Starts `proxy-agent --kube` as `node` (its Pod named after the node), presenting `token`
    /// to the API server, with an explicit listener for `shop/front:80`. Does not wait.
    pub fn spawn(api: &FakeApiServer, node: &str, token: &str) -> KubeAgent {
        let dir = TempDir::new("kube-agent");
        let kubeconfig = api.kubeconfig(&dir.0, token);
        KubeAgent::spawn_with(dir, &kubeconfig, node, node, &[])
    }

    /// Starts `proxy-agent --kube` as Pod `pod` on `node`, with the API server of `kubeconfig`
    /// and `extra` arguments.
    pub fn spawn_with(
        dir: TempDir,
        kubeconfig: &Path,
        node: &str,
        pod: &str,
        extra: &[&str],
    ) -> KubeAgent {
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = dir.0.join("agent.log");
        let child = Command::new(agent_binary())
            .args(["--kube", "--node-name", node, "--pod-name", pod])
            .args(["--lease-namespace", LEASE_NS])
            .arg("--admin")
            .arg(admin.to_string())
            .arg("--listen")
            .arg(format!("{listen}={NS}/front:80"))
            .args(["--caller-namespace", NS, "--drain-timeout-s", "1"])
            .args(extra)
            .env("KUBECONFIG", kubeconfig)
            .env_remove("NODE_NAME")
            .env_remove("POD_NAME")
            .env_remove("POD_NAMESPACE")
            .env(
                "RUST_LOG",
                std::env::var("AGENT_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start proxy-agent");
        KubeAgent {
            child,
            admin,
            listen,
            log,
            _dir: dir,
        }
    }

    pub fn start(api: &FakeApiServer, node: &str, token: &str) -> KubeAgent {
        KubeAgent::spawn(api, node, token).until_ready(node)
    }

    /// Waits until the agent reports ready.
    pub fn until_ready(self, node: &str) -> KubeAgent {
        let agent = self;
        let (_, took) = eventually("the agent is ready", || {
            (agent.ready().0 == 200).then_some(())
        });
        eprintln!("timing: {node} ready {took:?} after start");
        agent
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn ready(&self) -> (u16, String) {
        http_get_full(self.admin, "/ready").unwrap_or((0, String::new()))
    }

    pub fn dump(&self) -> Value {
        serde_json::from_str(&http_get(self.admin, "/config_dump").unwrap()).unwrap()
    }

    pub fn metric(&self, name: &str) -> Option<f64> {
        crate::probe::sample(&http_get(self.admin, "/metrics").ok()?, name)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The echo backend's name that answered a request on the `front` listener.
    pub fn answered_by(&self) -> Option<String> {
        let body = http_get(self.listen, "/").ok()?;
        let body: Value = serde_json::from_str(&body).ok()?;
        body["pod"].as_str().map(str::to_string)
    }

    /// Sends SIGTERM and waits for the agent to exit: how it did.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        eventually("the agent exits on SIGTERM", || {
            self.child.try_wait().ok().flatten()
        })
        .0
    }
}

impl Drop for KubeAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- agent log ---\n{}", self.log());
        }
    }
}

// --- reading the table -------------------------------------------------------------------

pub fn services(dump: &Value) -> BTreeSet<String> {
    dump["frontends"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|f| f["service"]["name"].as_str().unwrap().to_string())
        .collect()
}

pub fn endpoints_of(dump: &Value, service: &str) -> Vec<String> {
    dump["frontends"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|f| f["service"]["name"] == service)
        .flat_map(|f| {
            f["direct"]["endpoints"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .map(|e| e.as_str().unwrap().to_string())
        .collect()
}

pub fn callers(dump: &Value) -> BTreeSet<String> {
    dump["callers"]
        .as_object()
        .map(|c| c.keys().cloned().collect())
        .unwrap_or_default()
}

/// Routes with a Service parent (each has a status entry in the table).
pub fn routes(dump: &Value) -> BTreeSet<String> {
    dump["statuses"]
        .as_object()
        .map(|c| c.keys().cloned().collect())
        .unwrap_or_default()
}

/// Waits until `check` holds on the agent's table.
pub fn table(agent: &KubeAgent, what: &str, check: impl Fn(&Value) -> bool) -> Duration {
    eventually(what, || check(&agent.dump()).then_some(())).1
}
