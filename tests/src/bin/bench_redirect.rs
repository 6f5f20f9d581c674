//! `gamma-bench-redirect`: how connections reach the agent, measured side by side on a node of
//! network namespaces (run by `cargo xtask bench redirect`, as root). The agent does the same
//! work in every case (the same route on the same Service); only the path to it differs:
//! - `direct`: the client dials the agent's explicit listener (no steering at all);
//! - `ebpf`: the client dials the Service VIP; cgroup/connect4 steers it to the agent (design B);
//! - `iptables`: the client dials another VIP; an iptables REDIRECT in the node sends it to the
//!   agent (the classic sidecar way).
//!
//! Scenarios: a new connection per request (connection setup + one request) and one keep-alive
//! connection (per-packet cost on an established flow). Interleaved rounds; medians; ratios.

use anyhow::{bail, Context, Result};
use gamma_tests::client::ClientRequest;
use gamma_tests::cluster::{AddressPlan, SimCluster};
use gamma_tests::node::AGENT_ADDR;
use gamma_tests::scenario::Scenario;
use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

const ROUNDS: usize = 3;
const NEW_CONNECTIONS: usize = 2_000;
const KEEP_ALIVE_REQUESTS: usize = 10_000;
const DIRECT_PORT: u16 = 18000;
const IPTABLES_PORT: u16 = 18001;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> Result<()> {
    if let Some(reason) = gamma_tests::node::require_root() {
        bail!("{reason}");
    }
    let dir = gamma_tests::workspace_root().join("bench/redirect");
    let cluster = SimCluster::from_manifests(&dir.join("cluster.yaml"), AddressPlan::default())?;
    let listeners = [DIRECT_PORT, IPTABLES_PORT]
        .iter()
        .flat_map(|port| {
            [
                "--listen".to_string(),
                format!("{AGENT_ADDR}:{port}=bench/echo:80"),
            ]
        })
        .collect();
    let scenario = Scenario::start_with("bench", cluster, listeners)?;
    scenario.apply(
        "route.yaml",
        &std::fs::read_to_string(dir.join("route.yaml"))?,
    )?;
    let plain = scenario
        .cluster
        .resolve("echo-plain", "bench")
        .context("echo-plain VIP")?;
    let routed = scenario
        .cluster
        .resolve("echo", "bench")
        .context("echo VIP")?;
    // The classic sidecar way: REDIRECT before the simulated kube-proxy sees the packet.
    let out = scenario.node.run_output(
        Command::new("iptables").args([
            "-w",
            "5",
            "-t",
            "nat",
            "-I",
            "PREROUTING",
            "1",
            "-p",
            "tcp",
            "-d",
            &plain.to_string(),
            "--dport",
            "80",
            "-j",
            "REDIRECT",
            "--to-ports",
            &IPTABLES_PORT.to_string(),
        ]),
        Duration::from_secs(10),
    )?;
    if !out.status.success() {
        bail!(
            "iptables REDIRECT: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let client = scenario
        .cluster
        .client("bench", "app=client")
        .context("client pod")?
        .clone();
    let paths = [
        ("direct", format!("http://{AGENT_ADDR}:{DIRECT_PORT}/")),
        ("ebpf", format!("http://{routed}:80/")),
        ("iptables", format!("http://{plain}:80/")),
    ];
    let mut results: BTreeMap<(&str, &str), Vec<f64>> = BTreeMap::new();
    for round in 1..=ROUNDS {
        for (scenario_name, count, keep_alive) in [
            ("new connection + request", NEW_CONNECTIONS, false),
            ("keep-alive request", KEEP_ALIVE_REQUESTS, true),
        ] {
            for (path, url) in &paths {
                let request = ClientRequest {
                    url: url.clone(),
                    method: "GET".into(),
                    count,
                    keep_alive,
                    ..Default::default()
                };
                let started = Instant::now();
                let answers = scenario.request(&client, &request)?;
                let micros = started.elapsed().as_secs_f64() * 1e6 / count as f64;
                let failed = answers.iter().filter(|a| a.status != 200).count();
                if failed > 0 {
                    bail!("{path} ({scenario_name}): {failed} of {count} requests failed");
                }
                if !answers
                    .iter()
                    .all(|a| a.headers_at_backend.iter().any(|(n, _)| n == "x-bench"))
                {
                    bail!("{path}: a request did not go through the agent's route");
                }
                results
                    .entry((scenario_name, path))
                    .or_default()
                    .push(micros);
            }
        }
        eprintln!("round {round}/{ROUNDS} done");
    }
    println!("\n| scenario | path | median µs per request | ratio to direct |");
    println!("|---|---|---|---|");
    for scenario_name in ["new connection + request", "keep-alive request"] {
        let direct = median(results[&(scenario_name, "direct")].clone());
        for (path, _) in &paths {
            let m = median(results[&(scenario_name, *path)].clone());
            println!("| {scenario_name} | {path} | {m:.1} | {:.3} |", m / direct);
        }
    }
    Ok(())
}
