//! `gamma-conformance [--cases DIR] [--test NAME]`: the GAMMA mesh conformance cases end to end:
//! eBPF redirect, agent, routes from manifests, echo pods on a node of network namespaces.
//! Prints a table and exits non-zero if any case fails. (Run by `cargo xtask conformance` and
//! by the test command.)

use anyhow::{bail, Context, Result};
use gamma_tests::client::{ClientAnswer, ClientRequest};
use gamma_tests::cluster::{AddressPlan, SimCluster};
use gamma_tests::conformance::{
    expected_shares, judge, judge_distribution, Case, Observed, Suite, Test,
};
use gamma_tests::deployment_tally;
use gamma_tests::scenario::Scenario;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Upstream: each case must pass this many times in a row …
const CONSECUTIVE: usize = 3;
/// … within this time (routes converge asynchronously).
const CONVERGENCE: Duration = Duration::from_secs(30);
const WEIGHTED_REQUESTS: usize = 500;
const WEIGHTED_ATTEMPTS: usize = 10;

struct Outcome {
    test: String,
    passed: usize,
    total: usize,
    skipped: Option<String>,
    failures: Vec<String>,
}

fn request_for(
    scenario: &Scenario,
    case: &Case,
) -> Result<(gamma_tests::cluster::SimPod, ClientRequest)> {
    let cluster = &scenario.cluster;
    let client = cluster
        .client(&case.client.namespace, &case.client.app_selector)
        .cloned()
        .context("no client pod for the case")?;
    let r = &case.request;
    let ip = cluster
        .resolve(&r.hostname, &client.namespace)
        .with_context(|| format!("cannot resolve {}", r.hostname))?;
    let authority = if r.host.starts_with('<') {
        format!("{ip}:{}", r.port)
    } else {
        r.authority()
    };
    let headers = r
        .headers
        .iter()
        .flatten()
        .filter(|(k, _)| !k.eq_ignore_ascii_case("host"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Ok((
        client,
        ClientRequest {
            url: format!("http://{ip}:{}{}", r.port, r.path_and_query()),
            host: Some(authority),
            method: r.method(),
            headers,
            grpc: r.is_grpc(),
            count: 1,
            keep_alive: false,
            source_port: None,
        },
    ))
}

/// Services (of `namespace`) among `services` whose pods got the request tagged `nonce` with a
/// body of `body_len` bytes, asking each pod's echo directly; waits up to 3 s (mirrors are
/// fire-and-forget).
fn mirrored_to(
    scenario: &Scenario,
    client: &gamma_tests::cluster::SimPod,
    services: &[&str],
    nonce: &str,
    body_len: usize,
) -> Vec<String> {
    let cluster = &scenario.cluster;
    let started = Instant::now();
    let mut found = Vec::new();
    for name in services {
        let Some(service) = cluster.service(&client.namespace, name) else {
            continue;
        };
        let targets: Vec<(std::net::IpAddr, u16)> = cluster
            .endpoints(service)
            .into_iter()
            .flat_map(|(_, _, target, ips)| ips.into_iter().map(move |ip| (ip, target)))
            .collect();
        let got_copy = || {
            targets.iter().any(|(ip, port)| {
                let probe = ClientRequest {
                    url: format!("http://{ip}:{port}/__received/{nonce}"),
                    host: None,
                    method: "GET".into(),
                    headers: Vec::new(),
                    grpc: false,
                    count: 1,
                    keep_alive: false,
                    source_port: None,
                };
                let answers = scenario.request(client, &probe).unwrap_or_default();
                answers.iter().any(|a| {
                    a.response_headers.iter().any(|(n, v)| {
                        n == "x-echo-received"
                            && v.rsplit_once(' ')
                                .is_some_and(|(_, bytes)| bytes == body_len.to_string())
                    })
                })
            })
        };
        while !got_copy() {
            if started.elapsed() > Duration::from_secs(3) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if got_copy() {
            found.push(name.to_string());
        }
    }
    found
}

fn observed(answer: &ClientAnswer) -> Observed {
    // gRPC: a successful call is status 200 with grpc-status 0 (upstream maps code 0 to 200).
    Observed {
        status: answer.status,
        backend_pod: answer.pod.clone(),
        backend_namespace: answer.namespace.clone(),
        host_at_backend: answer.host.clone(),
        request_headers: answer.headers_at_backend.clone(),
        path_at_backend: answer.path_at_backend.clone(),
        response_headers: answer.response_headers.clone(),
        mirrored_to: Vec::new(),
    }
}

/// Runs one request case until it passes `CONSECUTIVE` times in a row or `CONVERGENCE` expires.
fn run_case(scenario: &Scenario, case: &Case) -> Result<(), String> {
    let (client, mut request) = request_for(scenario, case).map_err(|e| e.to_string())?;
    let started = Instant::now();
    let mut streak = 0;
    let mut last = String::new();
    let mirror: Vec<&str> = case.expect.mirrored_to.as_deref().into_iter().collect();
    static ATTEMPTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    while started.elapsed() < CONVERGENCE {
        // A mirror case tags each attempt, to find its copy among the mirror pods' requests.
        let attempt = ATTEMPTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let nonce = format!("{}-{attempt}", std::process::id());
        if !mirror.is_empty() {
            request.headers.retain(|(n, _)| n != "x-gamma-nonce");
            request
                .headers
                .push(("x-gamma-nonce".into(), nonce.clone()));
        }
        let problems = match scenario.request(&client, &request) {
            Ok(answers) => match answers.first() {
                Some(a) if a.error.is_none() => {
                    let mut observed = observed(a);
                    if !mirror.is_empty() {
                        observed.mirrored_to = mirrored_to(
                            scenario,
                            &client,
                            &mirror,
                            &nonce,
                            case.request.body_len(),
                        );
                    }
                    judge(&case.expect, &observed)
                }
                Some(a) => vec![format!(
                    "request failed: {}",
                    a.error.clone().unwrap_or_default()
                )],
                None => vec!["no answer".into()],
            },
            Err(e) => vec![format!("{e:#}")],
        };
        if problems.is_empty() {
            streak += 1;
            if streak == CONSECUTIVE {
                return Ok(());
            }
        } else {
            streak = 0;
            last = problems.join("; ");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Err(last)
}

fn run_weighted(scenario: &Scenario, test: &Test, case: &Case) -> Result<(), String> {
    let (client, mut request) = request_for(scenario, case).map_err(|e| e.to_string())?;
    request.count = WEIGHTED_REQUESTS;
    let expected = expected_shares(test);
    let mut last = String::new();
    for _ in 0..WEIGHTED_ATTEMPTS {
        let answers = scenario
            .request(&client, &request)
            .map_err(|e| format!("{e:#}"))?;
        if let Some(bad) = answers.iter().find(|a| a.status != 200) {
            last = format!("status {} {:?}", bad.status, bad.error);
            continue;
        }
        let counts = deployment_tally(answers.iter().map(|a| a.pod.as_str()));
        match judge_distribution(&expected, &counts) {
            None => return Ok(()),
            Some(problem) => last = format!("{problem} (counts {counts:?})"),
        }
    }
    Err(last)
}

fn run_test(scenario: &Scenario, dir: &std::path::Path, test: &Test) -> Result<Outcome> {
    let mut outcome = Outcome {
        test: test.name.clone(),
        passed: 0,
        total: test.cases.len(),
        skipped: None,
        failures: Vec::new(),
    };
    let unsupported: Vec<&String> = test
        .features
        .iter()
        .filter(|f| !gamma_engine::features::supports(f))
        .collect();
    if !unsupported.is_empty() {
        outcome.skipped = Some(format!("unsupported features {unsupported:?}"));
        return Ok(outcome);
    }
    let files: Vec<String> = test
        .manifests
        .iter()
        .enumerate()
        .map(|(i, _)| format!("test-{}-{i}.yaml", test.name))
        .collect();
    for (file, manifest) in files.iter().zip(&test.manifests) {
        let yaml = std::fs::read_to_string(dir.join("manifests").join(manifest))
            .with_context(|| format!("reading {manifest}"))?;
        scenario.apply(file, &yaml)?;
    }
    for case in &test.cases {
        let result = if test.kind == "weighted_distribution" {
            run_weighted(scenario, test, case)
        } else {
            run_case(scenario, case)
        };
        match result {
            Ok(()) => outcome.passed += 1,
            Err(e) => outcome.failures.push(format!("{}: {e}", case.subtest_name)),
        }
    }
    for file in &files {
        scenario.remove(file)?;
    }
    Ok(outcome)
}

#[derive(clap::Parser)]
#[command(about = "The GAMMA conformance cases end to end on a node of network namespaces")]
struct Cli {
    /// Folder with cases.json and the manifests (default: the shared conformance folder).
    #[arg(long, value_name = "DIR")]
    cases: Option<PathBuf>,
    /// Run only this test.
    #[arg(long, value_name = "NAME")]
    test: Option<String>,
}

fn main() -> Result<()> {
    let cli = <Cli as clap::Parser>::parse();
    let dir = cli.cases.unwrap_or_else(gamma_tests::conformance_dir);
    let only = cli.test;
    if let Some(reason) = gamma_tests::node::require_root() {
        bail!("conformance runs on a node of network namespaces with eBPF: {reason}");
    }
    let suite: Suite = serde_json::from_str(
        &std::fs::read_to_string(dir.join("cases.json")).with_context(|| {
            format!(
                "reading {}/cases.json: pass --cases DIR or set GAMMA_CONFORMANCE_DIR",
                dir.display()
            )
        })?,
    )?;
    let cluster = SimCluster::from_manifests(
        &dir.join("manifests/mesh/manifests.yaml"),
        AddressPlan::default(),
    )?;
    let scenario = Scenario::start("conformance", cluster)?;
    let started = Instant::now();
    let mut outcomes = Vec::new();
    for test in suite
        .tests
        .iter()
        .filter(|t| only.as_ref().is_none_or(|n| &t.name == n))
    {
        outcomes.push(run_test(&scenario, &dir, test)?);
    }
    drop(scenario);
    println!("\n{:<45} {:>7}  result", "test", "cases");
    let mut failed = 0;
    for o in &outcomes {
        let result = match (&o.skipped, o.failures.is_empty()) {
            (Some(why), _) => format!("SKIPPED ({why})"),
            (None, true) => "PASS".to_string(),
            (None, false) => "FAIL".to_string(),
        };
        println!("{:<45} {:>3}/{:<3}  {result}", o.test, o.passed, o.total);
        for f in &o.failures {
            println!("    - {f}");
        }
        failed += o.total - o.passed;
    }
    let skipped = outcomes.iter().filter(|o| o.skipped.is_some()).count();
    println!(
        "\n{} tests, {} cases failed, {} tests skipped, in {:.1} s",
        outcomes.len(),
        failed,
        skipped,
        started.elapsed().as_secs_f64()
    );
    if only.is_some() && outcomes.is_empty() {
        bail!("no test named {}", only.unwrap_or_default());
    }
    if failed > 0 || skipped > 0 {
        bail!("conformance failed: {failed} cases failed, {skipped} tests skipped");
    }
    Ok(())
}
