//! The GAMMA conformance cases, decided by the route engine alone (no sockets): every case's
//! backend, headers at the backend and in the response, rewritten path, redirect and status.
//! The folder is `$GAMMA_CONFORMANCE_DIR` (default `../shared/conformance`).

use gamma_engine::index::Index;
use gamma_engine::model::Object;
use gamma_engine::routes::{Decision, Plan, RequestHead, Snapshot};
use gamma_tests::cluster::{AddressPlan, SimCluster};
use gamma_tests::conformance::{
    deployment_of, expected_shares, judge, judge_distribution, Case, Observed, Suite,
};
use proxy_agent::proxy::local::LocalAnswer;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

/// Deterministic pseudo-random numbers (xorshift64*): reproducible weighted picks.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545F4914F6CDD1D)
    }
}

fn load(index: &mut Index, documents: impl IntoIterator<Item = serde_json::Value>) {
    for doc in documents {
        match Object::from_value(doc) {
            Ok(object) => index.apply(object),
            Err(gamma_engine::model::ObjectError::UnknownKind { .. }) => {}
            Err(e) => panic!("conformance manifest rejected: {e}"),
        }
    }
}

fn test_documents(dir: &Path, manifests: &[String]) -> Vec<serde_json::Value> {
    manifests
        .iter()
        .flat_map(|m| {
            let path = dir.join("manifests").join(m);
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            gamma_engine::manifests::documents(&text)
                .unwrap_or_else(|e| panic!("{}: {e:?}", path.display()))
        })
        .map(|(_, v)| v)
        .collect()
}

/// What the engine decides for one case; `random` drives the weighted and endpoint choices.
fn run_case(
    cluster: &SimCluster,
    snapshot: &Snapshot,
    case: &Case,
    rng: &mut Rng,
) -> Result<Observed, String> {
    let client = cluster
        .client(&case.client.namespace, &case.client.app_selector)
        .ok_or("no client pod")?;
    let caller = snapshot
        .caller(client.ip)
        .ok_or("client pod unknown to the engine")?;
    let request = &case.request;
    let ip = cluster
        .resolve(&request.hostname, &client.namespace)
        .ok_or_else(|| format!("cannot resolve {}", request.hostname))?;
    let mut observed = Observed::default();
    let Some(frontend) = snapshot.frontend_at(SocketAddr::new(ip, request.port)) else {
        // Not a Service frontend (a pod IP): the request goes straight to that pod, untouched.
        let pod = cluster
            .pod_by_ip(ip)
            .ok_or_else(|| format!("nothing answers at {ip}:{}", request.port))?;
        observed.status = 200;
        observed.backend_pod = pod.name.clone();
        observed.backend_namespace = pod.namespace.clone();
        return Ok(observed);
    };
    let mut builder = http::Request::builder()
        .method(request.method().as_str())
        .uri(request.path_and_query());
    for (name, value) in request
        .headers
        .iter()
        .flatten()
        .filter(|(k, _)| !k.eq_ignore_ascii_case("host"))
    {
        builder = builder.header(name, value);
    }
    if request.is_grpc() {
        builder = builder.header("content-type", "application/grpc");
    }
    let authority = if request.host.starts_with('<') {
        format!("{ip}:{}", request.port)
    } else {
        request.authority()
    };
    let (mut parts, ()) = builder
        .header("host", authority)
        .body(())
        .map_err(|e| e.to_string())?
        .into_parts();
    let head_parts = parts.clone();
    let decision = frontend.lookup(
        Some(&caller.pod.namespace),
        &RequestHead::from_parts(&head_parts),
    );
    let mut response_headers = http::HeaderMap::new();
    // What the agent answers itself, as it answers it (a gRPC caller gets a gRPC status).
    let local = |answer: LocalAnswer, mut observed: Observed| {
        match answer.grpc_status().filter(|_| request.is_grpc()) {
            Some(status) => {
                observed.status = 200;
                observed
                    .response_headers
                    .push(("grpc-status".into(), status.code().into()));
            }
            None => {
                observed.status = answer.status().as_u16();
                if let Some(location) = answer.location() {
                    observed
                        .response_headers
                        .push(("location".into(), location.to_string()));
                }
            }
        }
        Ok(observed)
    };
    let backend = match decision {
        Decision::Direct(backend) => backend,
        Decision::NoMatchingRule => {
            return local(LocalAnswer::NoMatchingRule(String::new()), observed);
        }
        Decision::Rule { rule, matched } => {
            match rule.plan(&mut parts, matched, request.port, rng.next()) {
                Plan::Respond(response, _) => return local(response.into(), observed),
                Plan::Forward(forward) => {
                    for modifier in forward.response_headers {
                        modifier.apply(&mut response_headers);
                    }
                    observed.mirrored_to = forward
                        .mirrors
                        .iter()
                        .filter(|m| !m.backend.endpoints.is_empty())
                        .map(|m| m.backend.service.name.to_string())
                        .collect();
                    forward.backend
                }
            }
        }
    };
    if backend.endpoints.is_empty() {
        return local(LocalAnswer::NoReadyEndpoint(backend.name()), observed);
    }
    let endpoint = backend.endpoints[(rng.next() % backend.endpoints.len() as u64) as usize];
    observed.status = 200;
    if let Some(pod) = cluster.pod_by_ip(endpoint.ip()) {
        observed.backend_pod = pod.name.clone();
        observed.backend_namespace = pod.namespace.clone();
    }
    observed.host_at_backend = parts
        .headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string);
    observed.request_headers = parts
        .headers
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or_default().to_string()))
        .collect();
    observed.path_at_backend = Some(parts.uri.path().to_string());
    observed.response_headers.extend(
        response_headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or_default().to_string())),
    );
    Ok(observed)
}

#[test]
fn conformance_cases_decided_by_the_engine() {
    run_folder(&gamma_tests::conformance_dir());
}

/// Cases for upstream mesh tests the shared folder does not carry (`tests/conformance-extra`).
#[test]
fn extra_conformance_cases_decided_by_the_engine() {
    run_folder(&gamma_tests::workspace_root().join("tests/conformance-extra"));
}

fn run_folder(dir: &Path) {
    let dir = dir.to_path_buf();
    assert!(
        dir.join("cases.json").exists(),
        "{} has no cases.json: set GAMMA_CONFORMANCE_DIR (or GAMMA_SHARED) to the conformance folder",
        dir.display()
    );
    let suite: Suite =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).expect("cases.json"))
            .expect("cases.json parses");
    let cluster = SimCluster::from_manifests(
        &dir.join("manifests/mesh/manifests.yaml"),
        AddressPlan::default(),
    )
    .expect("base manifests");
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let mut failures = Vec::new();
    let mut passed = 0;
    let mut total = 0;
    for test in &suite.tests {
        let mut index = Index::new();
        load(&mut index, cluster.manifests());
        load(&mut index, test_documents(&dir, &test.manifests));
        index.publish();
        let snapshot = index.snapshot();
        for case in &test.cases {
            total += 1;
            let problems = if test.kind == "weighted_distribution" {
                let mut counts: BTreeMap<String, usize> = BTreeMap::new();
                let mut problems = Vec::new();
                for _ in 0..10_000 {
                    match run_case(&cluster, &snapshot, case, &mut rng) {
                        Ok(o) if o.status == 200 => {
                            *counts
                                .entry(deployment_of(&o.backend_pod).to_string())
                                .or_default() += 1
                        }
                        Ok(o) => problems.push(format!("status {}", o.status)),
                        Err(e) => problems.push(e),
                    }
                }
                problems.truncate(1);
                problems.extend(judge_distribution(&expected_shares(test), &counts));
                problems
            } else {
                match run_case(&cluster, &snapshot, case, &mut rng) {
                    Ok(observed) => judge(&case.expect, &observed),
                    Err(e) => vec![e],
                }
            };
            if problems.is_empty() {
                passed += 1;
            } else {
                failures.push(format!(
                    "{} / {}: {}",
                    test.name,
                    case.subtest_name,
                    problems.join("; ")
                ));
            }
        }
    }
    eprintln!(
        "engine conformance: {passed}/{total} cases passed in {} tests",
        suite.tests.len()
    );
    assert!(
        failures.is_empty(),
        "{} failing cases:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(total > 0, "no cases found in {}", dir.display());
}
