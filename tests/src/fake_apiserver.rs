//! An in-process Kubernetes API server for tests, speaking enough of the real protocol for the
//! unmodified kube-rs client: JSON lists with `metadata.resourceVersion`; `?watch=true` streams
//! of ADDED/MODIFIED/DELETED/BOOKMARK events resumed from a resourceVersion, and `410 Expired`
//! for a compacted one; field selectors; get/create/update with resourceVersion preconditions;
//! the status subresource with server-side apply and merge patches. Plain HTTP on 127.0.0.1.
//!
//! Tests change the world directly (`apply`, `delete`) and flip switches: a resource not served
//! (its CRD absent), a watch gap with a deletion inside it, the whole server down and back. Every
//! request is recorded (verb, resource, field manager, body, credentials) for assertions.

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinHandle};

/// How often open watches receive a BOOKMARK.
const BOOKMARK_EVERY: Duration = Duration::from_millis(500);

/// A resource the server knows.
#[derive(Clone, Copy, Debug)]
struct Kind {
    group: &'static str,
    version: &'static str,
    plural: &'static str,
    kind: &'static str,
    /// Has a status subresource: updates of the main resource leave status alone.
    status: bool,
    /// Cluster-scoped: stored without a namespace.
    cluster: bool,
}

const fn kind(group: &'static str, plural: &'static str, kind: &'static str, status: bool) -> Kind {
    Kind {
        group,
        version: "v1",
        plural,
        kind,
        status,
        cluster: false,
    }
}

const KINDS: &[Kind] = &[
    kind("", "services", "Service", true),
    kind("", "pods", "Pod", true),
    kind("discovery.k8s.io", "endpointslices", "EndpointSlice", false),
    kind("gateway.networking.k8s.io", "httproutes", "HTTPRoute", true),
    kind("gateway.networking.k8s.io", "grpcroutes", "GRPCRoute", true),
    kind("coordination.k8s.io", "leases", "Lease", false),
    Kind {
        group: "",
        version: "v1",
        plural: "nodes",
        kind: "Node",
        status: true,
        cluster: true,
    },
    Kind {
        group: "",
        version: "v1",
        plural: "namespaces",
        kind: "Namespace",
        status: true,
        cluster: true,
    },
    Kind {
        group: "gateway.networking.k8s.io",
        version: "v1beta1",
        plural: "referencegrants",
        kind: "ReferenceGrant",
        status: false,
        cluster: false,
    },
    Kind {
        group: "gateway.networking.x-k8s.io",
        version: "v1alpha1",
        plural: "xmeshes",
        kind: "XMesh",
        status: true,
        cluster: true,
    },
];

impl Kind {
    fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    fn by_plural(plural: &str) -> Kind {
        *KINDS
            .iter()
            .find(|k| k.plural == plural)
            .unwrap_or_else(|| panic!("the fake API server does not know `{plural}`"))
    }
}

/// One request as the server saw it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    /// RBAC verb: list, watch, get, create, update, patch.
    pub verb: String,
    pub group: String,
    /// RBAC resource: the plural, `/status` appended for the subresource.
    pub resource: String,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub query: BTreeMap<String, String>,
    pub content_type: Option<String>,
    pub authorization: Option<String>,
    pub body: Option<Value>,
    /// The answer's status code.
    pub status: u16,
}

type Key = (&'static str, String, String);

struct Watch {
    id: u64,
    plural: &'static str,
    namespace: Option<String>,
    selector: Vec<Requirement>,
    bookmarks: bool,
    tx: mpsc::UnboundedSender<Bytes>,
}

#[derive(Default)]
struct State {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    /// Every change, for watches resumed from a resourceVersion.
    log: Vec<(u64, &'static str, &'static str, Value)>,
    /// Resource versions below this are compacted: watching from them answers 410.
    compacted: u64,
    not_served: BTreeSet<String>,
    /// Resources whose requests answer 500, as a failing API server (or its etcd) would.
    failing: BTreeSet<String>,
    /// Resources whose watches (not lists) answer 403, as a role granting list but not watch.
    watch_refused: BTreeSet<String>,
    /// Resources whose lists are never answered, their connection held open: an API server's
    /// host lost after it took the request.
    list_stalled: BTreeSet<String>,
    watches: Vec<Watch>,
    next_watch: u64,
    requests: Vec<Recorded>,
    /// Objects whose next status patch is refused with 409 Conflict.
    conflicts: BTreeSet<Key>,
    /// Resources whose status writes answer 403, as a role without their `/status`.
    status_refused: BTreeSet<String>,
}

#[derive(Default)]
struct Serving {
    accept: Option<JoinHandle<()>>,
    connections: Arc<Mutex<Vec<AbortHandle>>>,
}

/// A kubeconfig for a plain-HTTP API server at `addr` whose user presents `token` (recorded by the
/// fake as `Bearer TOKEN`).
pub fn kubeconfig_for(addr: SocketAddr, dir: &Path, token: &str) -> PathBuf {
    let path = dir.join(format!("kubeconfig-{token}"));
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{addr}\nusers:\n- name: agent\n  user:\n    token: {token}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: agent\n    namespace: default\ncurrent-context: fake\n",
    );
    std::fs::write(&path, text).expect("write kubeconfig");
    path
}

pub struct FakeApiServer {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    serving: Mutex<Serving>,
}

impl FakeApiServer {
    /// Starts on 127.0.0.1 (an ephemeral port), in the current tokio runtime.
    pub async fn start() -> FakeApiServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake API server");
        Self::start_on(listener)
    }

    /// Serves on `listener` (e.g. one bound inside a test's network namespace), in the current
    /// tokio runtime.
    pub fn start_on(listener: tokio::net::TcpListener) -> FakeApiServer {
        let server = FakeApiServer {
            addr: listener.local_addr().unwrap(),
            state: Arc::new(Mutex::new(State {
                rv: 100,
                ..State::default()
            })),
            serving: Mutex::new(Serving::default()),
        };
        server.serve(listener);
        server
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A kubeconfig for this server whose user presents `token` (recorded as `Bearer TOKEN`).
    pub fn kubeconfig(&self, dir: &Path, token: &str) -> PathBuf {
        kubeconfig_for(self.addr, dir, token)
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let mut serving = self.serving.lock().unwrap();
        let connections = serving.connections.clone();
        let state = self.state.clone();
        serving.accept = Some(tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = state.clone();
                let task = tokio::spawn(async move {
                    let service = service_fn(move |request| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(handle(&state, request).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
                let mut open = connections.lock().unwrap();
                open.retain(|c| !c.is_finished());
                open.push(task.abort_handle());
            }
        }));
    }

    /// Refuses connections from now on and cuts every open one (watches included).
    pub async fn go_down(&self) {
        let (accept, connections) = {
            let mut serving = self.serving.lock().unwrap();
            let connections: Vec<AbortHandle> =
                serving.connections.lock().unwrap().drain(..).collect();
            (serving.accept.take(), connections)
        };
        if let Some(accept) = accept {
            accept.abort();
            let _ = accept.await;
        }
        for connection in connections {
            connection.abort();
        }
        self.state.lock().unwrap().watches.clear();
    }

    /// Listens again on the same address.
    pub async fn come_back(&self) {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_reuseaddr(true).unwrap();
        socket.bind(self.addr).expect("rebind the fake API server");
        self.serve(socket.listen(1024).unwrap());
    }

    /// Serve (or stop serving, as when a CRD is absent) a resource: its requests answer 404 and
    /// its open watches end.
    pub fn set_served(&self, plural: &str, served: bool) {
        let mut state = self.state.lock().unwrap();
        if served {
            state.not_served.remove(plural);
        } else {
            state.not_served.insert(plural.to_string());
            state.watches.retain(|w| w.plural != plural);
        }
    }

    /// Fail (or stop failing) a resource's requests with 500; its open watches end.
    pub fn set_failing(&self, plural: &str, failing: bool) {
        let mut state = self.state.lock().unwrap();
        if failing {
            state.failing.insert(plural.to_string());
            state.watches.retain(|w| w.plural != plural);
        } else {
            state.failing.remove(plural);
        }
    }

    /// Refuse (or stop refusing) a resource's watches with 403 while its lists still answer;
    /// its open watches end.
    pub fn refuse_watches(&self, plural: &str, refused: bool) {
        let mut state = self.state.lock().unwrap();
        if refused {
            state.watch_refused.insert(plural.to_string());
            state.watches.retain(|w| w.plural != plural);
        } else {
            state.watch_refused.remove(plural);
        }
    }

    /// Refuse (or stop refusing) writes of a resource's status with 403, as a ClusterRole that
    /// lacks its `/status` after an upgrade.
    pub fn refuse_status_writes(&self, plural: &str, refused: bool) {
        let mut state = self.state.lock().unwrap();
        if refused {
            state.status_refused.insert(plural.to_string());
        } else {
            state.status_refused.remove(plural);
        }
    }

    /// Stall (or stop stalling) a resource's lists: never answered, the connection kept open.
    pub fn stall_lists(&self, plural: &str, stalled: bool) {
        let mut state = self.state.lock().unwrap();
        if stalled {
            state.list_stalled.insert(plural.to_string());
        } else {
            state.list_stalled.remove(plural);
        }
    }

    /// Creates or replaces an object (its kind from apiVersion/kind); returns it as stored.
    pub fn apply(&self, mut object: Value) -> Value {
        let kind = *KINDS
            .iter()
            .find(|k| object["kind"] == k.kind && object["apiVersion"] == k.api_version().as_str())
            .unwrap_or_else(|| panic!("unknown kind: {}", object["kind"]));
        let namespace = match kind.cluster {
            true => String::new(),
            false => object["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string(),
        };
        object["metadata"]["namespace"] = namespace.clone().into();
        let name = object["metadata"]["name"]
            .as_str()
            .expect("a name")
            .to_string();
        let mut state = self.state.lock().unwrap();
        let key = (kind.plural, namespace, name);
        let old = state.objects.get(&key).cloned();
        if object.get("status").is_none() {
            if let Some(status) = old.as_ref().and_then(|o| o.get("status")) {
                object["status"] = status.clone();
            }
        }
        state.store(kind, key, old.as_ref(), object)
    }

    /// Deletes an object, telling the watches.
    pub fn delete(&self, plural: &str, namespace: &str, name: &str) {
        let kind = Kind::by_plural(plural);
        let mut state = self.state.lock().unwrap();
        let key = (kind.plural, namespace.to_string(), name.to_string());
        if let Some(mut object) = state.objects.remove(&key) {
            state.rv += 1;
            object["metadata"]["resourceVersion"] = state.rv.to_string().into();
            state.record_event(kind, "DELETED", object);
        }
    }

    /// A watch gap with a deletion inside it: the watches of `plural` end, the object is
    /// deleted without any watch seeing it, and history is compacted, so that resuming from any
    /// earlier resourceVersion answers 410 Expired and the client must list again.
    pub fn delete_during_gap(&self, plural: &str, namespace: &str, name: &str) {
        let kind = Kind::by_plural(plural);
        let mut state = self.state.lock().unwrap();
        state.watches.retain(|w| w.plural != kind.plural);
        let key = (kind.plural, namespace.to_string(), name.to_string());
        assert!(
            state.objects.remove(&key).is_some(),
            "{key:?} does not exist"
        );
        state.rv += 1;
        state.compacted = state.rv + 1;
        state.log.clear();
    }

    /// Ends every open watch of `plural` (all resources for `None`), as an API server does on a
    /// timeout: clients resume from their last resourceVersion.
    pub fn close_watches(&self, plural: Option<&str>) {
        let mut state = self.state.lock().unwrap();
        state
            .watches
            .retain(|w| plural.is_some_and(|p| w.plural != p));
    }

    pub fn get(&self, plural: &str, namespace: &str, name: &str) -> Option<Value> {
        let kind = Kind::by_plural(plural);
        let state = self.state.lock().unwrap();
        state
            .objects
            .get(&(kind.plural, namespace.to_string(), name.to_string()))
            .cloned()
    }

    /// Answers the next status patch of this object with 409 Conflict (as when another writer
    /// changed it since the client read it).
    pub fn refuse_next_status_patch(&self, plural: &str, namespace: &str, name: &str) {
        let kind = Kind::by_plural(plural);
        let key = (kind.plural, namespace.to_string(), name.to_string());
        self.state.lock().unwrap().conflicts.insert(key);
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.lock().unwrap().requests.clone()
    }

    /// The number of recorded requests, to look only at later ones (`requests()[n..]`).
    pub fn request_count(&self) -> usize {
        self.state.lock().unwrap().requests.len()
    }
}

impl State {
    /// Stores `object` under `key` with a new resourceVersion (none if nothing changed) and
    /// tells the watches. Generation moves when anything but metadata and status changes.
    fn store(&mut self, kind: Kind, key: Key, old: Option<&Value>, mut object: Value) -> Value {
        let spec = |o: &Value| {
            let mut o = o.clone();
            if let Some(m) = o.as_object_mut() {
                m.remove("metadata");
                m.remove("status");
            }
            o
        };
        object["apiVersion"] = kind.api_version().into();
        object["kind"] = kind.kind.into();
        let meta = |o: &Value, field: &str| o["metadata"][field].clone();
        match old {
            Some(old) => {
                let generation = meta(old, "generation").as_i64().unwrap_or(1);
                let moved = spec(old) != spec(&object);
                object["metadata"]["generation"] = (generation + i64::from(moved)).into();
                for field in ["uid", "creationTimestamp"] {
                    object["metadata"][field] = meta(old, field);
                }
                object["metadata"]["resourceVersion"] = meta(old, "resourceVersion");
                if &object == old {
                    return object;
                }
            }
            None => {
                object["metadata"]["generation"] = 1.into();
                object["metadata"]["uid"] = format!("uid-{}-{}", key.2, self.rv + 1).into();
                object["metadata"]["creationTimestamp"] = "2025-01-01T00:00:00Z".into();
            }
        }
        self.rv += 1;
        object["metadata"]["resourceVersion"] = self.rv.to_string().into();
        self.objects.insert(key, object.clone());
        self.record_event(
            kind,
            if old.is_some() { "MODIFIED" } else { "ADDED" },
            object.clone(),
        );
        object
    }

    fn record_event(&mut self, kind: Kind, event: &'static str, object: Value) {
        let line = event_line(event, &object);
        self.watches.retain(|w| {
            if w.plural != kind.plural || !matches(&object, w.namespace.as_deref(), &w.selector) {
                return true;
            }
            w.tx.send(line.clone()).is_ok()
        });
        self.log.push((self.rv, kind.plural, event, object));
    }
}

fn event_line(event: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": event, "object": object})).unwrap();
    line.push(b'\n');
    line.into()
}

/// One `field=value` / `field!=value` of a field selector.
#[derive(Clone, Debug)]
struct Requirement {
    path: Vec<String>,
    value: String,
    equal: bool,
}

fn parse_selector(selector: &str) -> Vec<Requirement> {
    selector
        .split(',')
        .filter(|r| !r.is_empty())
        .filter_map(|r| {
            let (field, value, equal) = if let Some((f, v)) = r.split_once("!=") {
                (f, v, false)
            } else {
                let (f, v) = r.split_once('=')?;
                (f, v.trim_start_matches('='), true)
            };
            Some(Requirement {
                path: field.split('.').map(str::to_string).collect(),
                value: value.to_string(),
                equal,
            })
        })
        .collect()
}

fn matches(object: &Value, namespace: Option<&str>, selector: &[Requirement]) -> bool {
    if namespace.is_some_and(|ns| object["metadata"]["namespace"] != ns) {
        return false;
    }
    selector.iter().all(|r| {
        let value = r.path.iter().fold(object, |v, p| &v[p.as_str()]);
        (value.as_str().unwrap_or_default() == r.value) == r.equal
    })
}

fn parse_query(query: Option<&str>) -> BTreeMap<String, String> {
    form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .into_owned()
        .collect()
}

type Body = BoxBody<Bytes, Infallible>;

fn reply(code: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(body).unwrap())).boxed())
        .unwrap()
}

fn failure(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    reply(
        code,
        &json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code.as_u16(),
        }),
    )
}

/// A watch response body: lines pushed by the server as things change.
struct Lines(mpsc::UnboundedReceiver<Bytes>);

impl hyper::body::Body for Lines {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|line| line.map(|l| Ok(Frame::data(l))))
    }
}

/// What a request addresses.
struct Target {
    kind: Kind,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segments.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        rest => (None, rest),
    };
    let (plural, name, subresource) = match rest {
        [plural] => (*plural, None, None),
        [plural, name] => (*plural, Some(name.to_string()), None),
        [plural, name, sub] => (*plural, Some(name.to_string()), Some(sub.to_string())),
        _ => return None,
    };
    let kind = *KINDS
        .iter()
        .find(|k| k.group == group && k.version == version && k.plural == plural)?;
    Some(Target {
        kind,
        namespace,
        name,
        subresource,
    })
}

async fn handle(shared: &Arc<Mutex<State>>, request: Request<Incoming>) -> Response<Body> {
    let (head, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let body: Option<Value> = serde_json::from_slice(&body).ok();
    let query = parse_query(head.uri.query());
    let header = |name: &str| {
        head.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let target = parse_path(head.uri.path());
    let watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    let verb = match (&head.method, target.as_ref().and_then(|t| t.name.as_ref())) {
        (&Method::GET, None) if watch => "watch",
        (&Method::GET, None) => "list",
        (&Method::GET, Some(_)) => "get",
        (&Method::POST, _) => "create",
        (&Method::PUT, _) => "update",
        (&Method::PATCH, _) => "patch",
        (&Method::DELETE, _) => "delete",
        _ => "unknown",
    };
    let stalled = verb == "list"
        && target.as_ref().is_some_and(|t| {
            let state = shared.lock().unwrap();
            state.list_stalled.contains(t.kind.plural)
        });
    if stalled {
        // Taken, never answered: the connection stays open and silent.
        std::future::pending::<()>().await;
    }
    let mut state = shared.lock().unwrap();
    let response = match &target {
        None => failure(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        ),
        Some(t) if state.not_served.contains(t.kind.plural) => failure(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        ),
        Some(t) if state.failing.contains(t.kind.plural) => failure(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "etcdserver: request timed out",
        ),
        Some(t)
            if t.subresource.as_deref() == Some("status")
                && state.status_refused.contains(t.kind.plural) =>
        {
            failure(
                StatusCode::FORBIDDEN,
                "Forbidden",
                "cannot patch resource's status in API group at the cluster scope",
            )
        }
        Some(t) if verb == "watch" && state.watch_refused.contains(t.kind.plural) => failure(
            StatusCode::FORBIDDEN,
            "Forbidden",
            "cannot watch resource in API group at the cluster scope",
        ),
        Some(t) => match verb {
            "watch" => {
                let (response, watch) = state.watch(t, &query);
                if let Some((id, timeout)) = watch {
                    tokio::spawn(keep_watch(shared.clone(), t.kind, id, timeout));
                }
                response
            }
            "list" => state.list(t, &query),
            "get" => state.get(t),
            "create" => state.create(t, body.clone()),
            "update" => state.update(t, body.clone()),
            "patch" => state.patch(t, header("content-type").as_deref(), body.clone()),
            _ => failure(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                "not supported by the fake",
            ),
        },
    };
    state.requests.push(Recorded {
        method: head.method.to_string(),
        verb: verb.to_string(),
        group: target
            .as_ref()
            .map(|t| t.kind.group.to_string())
            .unwrap_or_default(),
        resource: target
            .as_ref()
            .map(|t| match &t.subresource {
                Some(sub) => format!("{}/{sub}", t.kind.plural),
                None => t.kind.plural.to_string(),
            })
            .unwrap_or_else(|| head.uri.path().to_string()),
        namespace: target.as_ref().and_then(|t| t.namespace.clone()),
        name: target.as_ref().and_then(|t| t.name.clone()),
        query,
        content_type: header("content-type"),
        authorization: header("authorization"),
        body,
        status: response.status().as_u16(),
    });
    drop(state);
    response
}

impl State {
    fn selected(
        &self,
        target: &Target,
        query: &BTreeMap<String, String>,
    ) -> (Vec<Requirement>, Vec<Value>) {
        let selector = parse_selector(query.get("fieldSelector").map_or("", String::as_str));
        let items = self
            .objects
            .iter()
            .filter(|((plural, _, _), o)| {
                *plural == target.kind.plural && matches(o, target.namespace.as_deref(), &selector)
            })
            .map(|(_, o)| o.clone())
            .collect();
        (selector, items)
    }

    fn list(&self, target: &Target, query: &BTreeMap<String, String>) -> Response<Body> {
        let (_, items) = self.selected(target, query);
        reply(
            StatusCode::OK,
            &json!({
                "apiVersion": target.kind.api_version(),
                "kind": format!("{}List", target.kind.kind),
                "metadata": {"resourceVersion": self.rv.to_string()},
                "items": items,
            }),
        )
    }

    /// The response, and the watch to keep (id, timeout) unless it ended at once.
    fn watch(
        &mut self,
        target: &Target,
        query: &BTreeMap<String, String>,
    ) -> (Response<Body>, Option<(u64, Duration)>) {
        let (selector, current) = self.selected(target, query);
        let (tx, rx) = mpsc::unbounded_channel();
        let from = query
            .get("resourceVersion")
            .filter(|rv| !rv.is_empty() && *rv != "0")
            .map(|rv| rv.parse::<u64>().unwrap_or(0));
        let response = Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/json")
            .body(Lines(rx).boxed())
            .unwrap();
        match from {
            Some(rv) if rv < self.compacted => {
                // As the real server does: 200, then one ERROR event, then the end.
                let status = json!({
                    "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": format!("too old resource version: {rv} ({})", self.compacted),
                    "reason": "Expired", "code": 410,
                });
                let _ = tx.send(event_line("ERROR", &status));
                return (response, None);
            }
            Some(rv) => {
                for (at, plural, event, object) in &self.log {
                    if *at > rv
                        && *plural == target.kind.plural
                        && matches(object, target.namespace.as_deref(), &selector)
                    {
                        let _ = tx.send(event_line(event, object));
                    }
                }
            }
            None => {
                for object in &current {
                    let _ = tx.send(event_line("ADDED", object));
                }
            }
        }
        self.next_watch += 1;
        let id = self.next_watch;
        self.watches.push(Watch {
            id,
            plural: target.kind.plural,
            namespace: target.namespace.clone(),
            selector,
            bookmarks: query
                .get("allowWatchBookmarks")
                .is_some_and(|v| v == "true"),
            tx,
        });
        let timeout = query
            .get("timeoutSeconds")
            .and_then(|t| t.parse().ok())
            .map_or(Duration::from_secs(290), Duration::from_secs);
        (response, Some((id, timeout)))
    }

    fn get(&self, target: &Target) -> Response<Body> {
        let key = (
            target.kind.plural,
            target.namespace.clone().unwrap_or_default(),
            target.name.clone().unwrap_or_default(),
        );
        match self.objects.get(&key) {
            Some(object) => reply(StatusCode::OK, object),
            None => not_found(target),
        }
    }

    fn create(&mut self, target: &Target, body: Option<Value>) -> Response<Body> {
        let Some(mut object) = body else {
            return failure(StatusCode::BAD_REQUEST, "BadRequest", "no JSON body");
        };
        let namespace = target.namespace.clone().unwrap_or_default();
        object["metadata"]["namespace"] = namespace.clone().into();
        let Some(name) = object["metadata"]["name"].as_str().map(str::to_string) else {
            return failure(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid",
                "metadata.name: Required value",
            );
        };
        let key = (target.kind.plural, namespace, name.clone());
        if self.objects.contains_key(&key) {
            return failure(
                StatusCode::CONFLICT,
                "AlreadyExists",
                &format!("{} \"{name}\" already exists", target.kind.plural),
            );
        }
        let stored = self.store(target.kind, key, None, object);
        reply(StatusCode::CREATED, &stored)
    }

    fn existing(&self, target: &Target) -> Result<(Key, Value), Box<Response<Body>>> {
        let key = (
            target.kind.plural,
            target.namespace.clone().unwrap_or_default(),
            target.name.clone().unwrap_or_default(),
        );
        match self.objects.get(&key) {
            Some(o) => Ok((key, o.clone())),
            None => Err(Box::new(not_found(target))),
        }
    }

    fn update(&mut self, target: &Target, body: Option<Value>) -> Response<Body> {
        let (key, old) = match self.existing(target) {
            Ok(found) => found,
            Err(response) => return *response,
        };
        let Some(mut object) = body else {
            return failure(StatusCode::BAD_REQUEST, "BadRequest", "no JSON body");
        };
        if let Err(response) = precondition(&old, &object, target) {
            return *response;
        }
        if target.kind.status {
            match old.get("status") {
                Some(status) => object["status"] = status.clone(),
                None => {
                    if let Some(m) = object.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
        }
        object["metadata"]["namespace"] = key.1.clone().into();
        let stored = self.store(target.kind, key, Some(&old), object);
        reply(StatusCode::OK, &stored)
    }

    fn patch(
        &mut self,
        target: &Target,
        content_type: Option<&str>,
        body: Option<Value>,
    ) -> Response<Body> {
        let (key, old) = match self.existing(target) {
            Ok(found) => found,
            Err(response) => return *response,
        };
        let Some(patch) = body else {
            return failure(StatusCode::BAD_REQUEST, "BadRequest", "no JSON body");
        };
        let status_only = target.subresource.as_deref() == Some("status");
        if status_only && self.conflicts.remove(&key) {
            return failure(
                StatusCode::CONFLICT,
                "Conflict",
                "Operation cannot be fulfilled: the object has been modified; please apply your changes to the latest version and try again",
            );
        }
        if let Err(response) = precondition(&old, &patch, target) {
            return *response;
        }
        let mut object = old.clone();
        match content_type {
            // Server-side apply: maps merge, lists are replaced (status.parents is atomic).
            Some("application/apply-patch+yaml") => {
                if status_only {
                    apply_merge(&mut object["status"], &patch["status"]);
                } else {
                    let mut patch = patch.clone();
                    if let Some(m) = patch.as_object_mut() {
                        m.remove("status");
                    }
                    apply_merge(&mut object, &patch);
                }
            }
            Some("application/merge-patch+json") => {
                if status_only {
                    merge_patch(&mut object["status"], &patch["status"]);
                } else {
                    merge_patch(&mut object, &patch);
                }
            }
            other => {
                return failure(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "UnsupportedMediaType",
                    &format!("the fake does not take {other:?}"),
                )
            }
        }
        let stored = self.store(target.kind, key, Some(&old), object);
        reply(StatusCode::OK, &stored)
    }
}

/// Sends bookmarks on an open watch and ends it at its timeout; returns once it is closed.
async fn keep_watch(state: Arc<Mutex<State>>, kind: Kind, id: u64, timeout: Duration) {
    let end = tokio::time::Instant::now() + timeout;
    loop {
        tokio::time::sleep(BOOKMARK_EVERY).await;
        let mut state = state.lock().unwrap();
        let rv = state.rv;
        let Some(at) = state.watches.iter().position(|w| w.id == id) else {
            return;
        };
        if tokio::time::Instant::now() >= end {
            state.watches.remove(at);
            return;
        }
        let watch = &state.watches[at];
        if watch.bookmarks {
            // Every event of this resource up to `rv` is already in this watch's queue.
            let bookmark = json!({
                "kind": kind.kind, "apiVersion": kind.api_version(),
                "metadata": {"resourceVersion": rv.to_string()},
            });
            if watch.tx.send(event_line("BOOKMARK", &bookmark)).is_err() {
                state.watches.remove(at);
                return;
            }
        }
    }
}

/// A `metadata.resourceVersion` in the request must be the stored one.
fn precondition(old: &Value, request: &Value, target: &Target) -> Result<(), Box<Response<Body>>> {
    match request["metadata"]["resourceVersion"].as_str() {
        Some(rv) if Some(rv) != old["metadata"]["resourceVersion"].as_str() => Err(Box::new(failure(
            StatusCode::CONFLICT,
            "Conflict",
            &format!(
                "Operation cannot be fulfilled on {} \"{}\": the object has been modified; please apply your changes to the latest version and try again",
                target.kind.plural,
                target.name.clone().unwrap_or_default()
            ),
        ))),
        _ => Ok(()),
    }
}

fn not_found(target: &Target) -> Response<Body> {
    failure(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!(
            "{} \"{}\" not found",
            target.kind.plural,
            target.name.clone().unwrap_or_default()
        ),
    )
}

/// Server-side apply, as far as the fake needs it: objects merge key by key, anything else
/// (lists included) is replaced.
fn apply_merge(target: &mut Value, patch: &Value) {
    match (target.as_object_mut(), patch.as_object()) {
        (Some(t), Some(p)) => {
            for (k, v) in p {
                apply_merge(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        _ if !patch.is_null() => *target = patch.clone(),
        _ => {}
    }
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Some(p) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let t = target.as_object_mut().unwrap();
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}
