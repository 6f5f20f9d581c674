//! The conformance case format (`cases.json`, see `../shared/conformance/README.md`) and how a
//! case is judged: as upstream's mesh client does, plus the rewritten path and the redirect
//! `Location`, which upstream leaves unchecked.

use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Debug, Deserialize)]
pub struct Suite {
    pub tests: Vec<Test>,
}

#[derive(Debug, Deserialize)]
pub struct Test {
    pub name: String,
    #[serde(default)]
    pub features: Vec<String>,
    #[serde(default)]
    pub manifests: Vec<String>,
    pub kind: String,
    #[serde(default)]
    pub routes: Vec<serde_json::Value>,
    pub cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
pub struct Case {
    pub subtest_name: String,
    pub client: Client,
    pub request: Request,
    pub expect: Expect,
}

#[derive(Debug, Deserialize)]
pub struct Client {
    pub app_selector: String,
    pub namespace: String,
}

#[derive(Debug, Deserialize)]
pub struct Request {
    pub protocol: String,
    pub host: String,
    pub hostname: String,
    pub port: u16,
    #[serde(default)]
    pub raw_path_with_query: Option<String>,
    #[serde(default)]
    pub method: Option<String>,
    #[serde(default)]
    pub headers: Option<BTreeMap<String, String>>,
}

impl Request {
    pub fn is_grpc(&self) -> bool {
        self.protocol == "grpc"
    }

    /// The request target: gRPC cases call the echo service's Echo method.
    pub fn path_and_query(&self) -> String {
        if self.is_grpc() {
            return ECHO_GRPC_PATH.to_string();
        }
        match self.raw_path_with_query.as_deref() {
            None | Some("") => "/".to_string(),
            Some(p) => p.to_string(),
        }
    }

    /// The request body's size: a gRPC call carries one empty message (its 5-byte prefix).
    pub fn body_len(&self) -> usize {
        if self.is_grpc() {
            5
        } else {
            0
        }
    }

    pub fn method(&self) -> String {
        if self.is_grpc() {
            "POST".to_string()
        } else {
            self.method.clone().unwrap_or_else(|| "GET".to_string())
        }
    }

    /// The authority the client sends: the URL host, unless a Host header overrides it.
    pub fn authority(&self) -> String {
        self.headers
            .iter()
            .flatten()
            .find(|(k, _)| k.eq_ignore_ascii_case("host"))
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| self.host.clone())
    }
}

/// The method the upstream echo client calls (Istio's echo `proto.EchoTestService/Echo`).
pub const ECHO_GRPC_PATH: &str = "/proto.EchoTestService/Echo";

/// A case's expectations. Every field of the cases' `expect` is named here, so that one the
/// upstream cases add is refused, not silently left unchecked.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    pub status_codes: Vec<u16>,
    pub backend: Option<String>,
    /// The answering pod's namespace (upstream's `Namespace=` check).
    pub namespace: Option<String>,
    /// The authority the backend received.
    pub expected_request_host: Option<String>,
    /// Upstream's redirect expectation as its Go test writes it; checked through
    /// `redirect_location_derived`, which spells out the Location it means.
    #[serde(default)]
    pub redirect: Option<serde_json::Value>,
    pub request_headers_at_backend: Option<BTreeMap<String, String>>,
    pub absent_request_headers_at_backend: Option<Vec<String>>,
    pub response_headers: Option<BTreeMap<String, String>>,
    pub absent_response_headers: Option<Vec<String>>,
    pub expected_path_at_backend: Option<String>,
    pub redirect_location_derived: Option<RedirectLocation>,
    /// A Service (of the test's namespace) whose pods must receive a mirrored copy of the
    /// request, body included (gamma-node's addition: upstream's mirror tests read the mirror
    /// pod's log for the same).
    #[serde(default)]
    pub mirrored_to: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct RedirectLocation {
    pub scheme: Option<String>,
    pub host: Option<String>,
    /// "80 or absent", "8080", …
    pub port: Option<String>,
    pub path: Option<String>,
}

/// What a case produced, however it was produced (engine simulation or real request).
#[derive(Debug, Default)]
pub struct Observed {
    pub status: u16,
    /// The responding pod's name (empty when no backend answered).
    pub backend_pod: String,
    /// The responding pod's namespace.
    pub backend_namespace: String,
    /// The authority the backend received.
    pub host_at_backend: Option<String>,
    /// Request headers as the backend received them (lower-case names, values in order).
    pub request_headers: Vec<(String, String)>,
    pub path_at_backend: Option<String>,
    pub response_headers: Vec<(String, String)>,
    /// Services that received a copy of the request with its whole body.
    pub mirrored_to: Vec<String>,
}

impl Observed {
    fn request_header(&self, name: &str) -> Option<String> {
        let values: Vec<&str> = self
            .request_headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect();
        (!values.is_empty()).then(|| values.join(","))
    }

    fn response_header(&self, name: &str) -> Option<&str> {
        self.response_headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Every way `observed` differs from `expect`, as "expected …, got …" lines.
pub fn judge(expect: &Expect, observed: &Observed) -> Vec<String> {
    let mut failures = Vec::new();
    let status_ok = expect.status_codes.contains(&observed.status);
    if !status_ok {
        failures.push(format!(
            "status: expected one of {:?}, got {}",
            expect.status_codes, observed.status
        ));
    }
    if let Some(backend) = &expect.backend {
        if !observed.backend_pod.starts_with(backend.as_str()) {
            failures.push(format!(
                "backend: expected a pod of {backend}, got `{}`",
                observed.backend_pod
            ));
        }
    }
    // Upstream checks the namespace of an answering pod only (a redirect has none).
    if let Some(namespace) = expect.namespace.as_ref().filter(|_| status_ok) {
        if !observed.backend_pod.is_empty() && observed.backend_namespace != *namespace {
            failures.push(format!(
                "namespace: expected a pod of {namespace}, got `{}` of `{}`",
                observed.backend_pod, observed.backend_namespace
            ));
        }
    }
    if let Some(host) = &expect.expected_request_host {
        if observed.host_at_backend.as_deref() != Some(host.as_str()) {
            failures.push(format!(
                "host at the backend: expected `{host}`, got {:?}",
                observed.host_at_backend
            ));
        }
    }
    for (name, value) in expect.request_headers_at_backend.iter().flatten() {
        let got = observed.request_header(name);
        if got.as_deref() != Some(value.as_str()) {
            failures.push(format!(
                "request header {name}: expected `{value}`, got {got:?}"
            ));
        }
    }
    for name in expect.absent_request_headers_at_backend.iter().flatten() {
        if let Some(got) = observed.request_header(name) {
            failures.push(format!(
                "request header {name}: expected absent, got `{got}`"
            ));
        }
    }
    for (name, value) in expect.response_headers.iter().flatten() {
        let got = observed.response_header(name);
        if got != Some(value.as_str()) {
            failures.push(format!(
                "response header {name}: expected `{value}`, got {got:?}"
            ));
        }
    }
    for name in expect.absent_response_headers.iter().flatten() {
        if let Some(got) = observed.response_header(name) {
            failures.push(format!(
                "response header {name}: expected absent, got `{got}`"
            ));
        }
    }
    if let Some(path) = &expect.expected_path_at_backend {
        if observed.path_at_backend.as_deref() != Some(path.as_str()) {
            failures.push(format!(
                "path at backend: expected `{path}`, got {:?}",
                observed.path_at_backend
            ));
        }
    }
    if let Some(mirror) = &expect.mirrored_to {
        if !observed.mirrored_to.contains(mirror) {
            failures.push(format!(
                "mirror: expected {mirror} to receive a copy with the body, got copies at {:?}",
                observed.mirrored_to
            ));
        }
    }
    if let Some(redirect) = &expect.redirect_location_derived {
        let location = observed.response_header("location").unwrap_or_default();
        if let Some(problem) = check_location(redirect, location) {
            failures.push(problem);
        }
    }
    failures
}

fn check_location(expected: &RedirectLocation, location: &str) -> Option<String> {
    let Ok(uri) = location.parse::<http::Uri>() else {
        return Some(format!("redirect Location: `{location}` is not a URI"));
    };
    let mismatch = |what: &str, want: &str, got: &str| {
        Some(format!(
            "redirect Location {what}: expected `{want}`, got `{got}` in `{location}`"
        ))
    };
    if let Some(scheme) = &expected.scheme {
        if uri.scheme_str() != Some(scheme.as_str()) {
            return mismatch("scheme", scheme, uri.scheme_str().unwrap_or_default());
        }
    }
    if let Some(host) = &expected.host {
        if uri.host() != Some(host.as_str()) {
            return mismatch("host", host, uri.host().unwrap_or_default());
        }
    }
    if let Some(port) = &expected.port {
        let got = uri.port_u16().map(|p| p.to_string()).unwrap_or_default();
        let (wanted, absent_ok) = match port.split_once(" or absent") {
            Some((p, _)) => (p.trim().to_string(), true),
            None => (port.clone(), false),
        };
        if !(got == wanted || (absent_ok && got.is_empty())) {
            return mismatch("port", port, &got);
        }
    }
    if let Some(path) = &expected.path {
        if uri.path() != path {
            return mismatch("path", path, uri.path());
        }
    }
    None
}

/// Expected traffic shares of a weighted test, by backend Service name, from its route's
/// backendRefs (weight 0 entries have share 0 and must receive nothing).
pub fn expected_shares(test: &Test) -> BTreeMap<String, f64> {
    let mut weights: BTreeMap<String, f64> = BTreeMap::new();
    for route in &test.routes {
        for rule in route["rules"].as_array().into_iter().flatten() {
            for b in rule["backendRefs"].as_array().into_iter().flatten() {
                let w = b["weight"].as_f64().unwrap_or(1.0);
                *weights
                    .entry(b["name"].as_str().unwrap_or_default().to_string())
                    .or_default() += w;
            }
        }
    }
    let total: f64 = weights.values().sum();
    weights
        .into_iter()
        .map(|(k, w)| (k, if total > 0.0 { w / total } else { 0.0 }))
        .collect()
}

/// The Deployment a pod name belongs to: the name minus its last two `-` segments (upstream).
pub fn deployment_of(pod: &str) -> &str {
    let mut parts = pod.rsplitn(3, '-');
    let _pod_hash = parts.next();
    let _rs_hash = parts.next();
    parts.next().unwrap_or(pod)
}

/// Upstream's weighted check: every share within ±0.05, zero-weight backends unseen, and as
/// many backends seen as have weight > 0. `None` when it passes.
pub fn judge_distribution(
    expected: &BTreeMap<String, f64>,
    counts: &BTreeMap<String, usize>,
) -> Option<String> {
    let total: usize = counts.values().sum();
    for (backend, count) in counts {
        match expected.get(backend) {
            None => return Some(format!("unexpected backend {backend} ({count} of {total})")),
            Some(share) if *share == 0.0 => {
                return Some(format!("backend {backend} has weight 0 but got {count}"))
            }
            Some(share) => {
                let got = *count as f64 / total.max(1) as f64;
                if (got - share).abs() > 0.05 {
                    return Some(format!(
                        "backend {backend}: expected share {share:.3}, got {got:.3}"
                    ));
                }
            }
        }
    }
    let wanted = expected.values().filter(|s| **s > 0.0).count();
    (counts.len() != wanted).then(|| {
        format!(
            "expected {wanted} backends to receive traffic, saw {}",
            counts.len()
        )
    })
}
