//! `gamma-demo DIR [--nodes 2]`: the seed scenario on one machine, no cluster (run by `cargo xtask
//! demo`).
//!
//! A node made of network namespaces (with `--nodes 2`: two, the pods spread over them, each with
//! its own agent, joined by a routed link); pods of `products` (catalog-v1, catalog-v2, a client) and
//! `ui-backend` (a client); the agent with the kernel redirect. Step 1 applies a consumer route
//! in ui-backend that adds `x-dev-feature: enabled` to calls to catalog.products; step 2 applies
//! a producer route that splits catalog 90/10 between catalog-v1 and catalog-v2. Each step shows
//! the route, what came back and a verdict; the exit status is non-zero if a verdict fails.

use anyhow::{bail, Context, Result};
use gamma_tests::client::{ClientAnswer, ClientRequest};
use gamma_tests::cluster::{AddressPlan, SimCluster, SimPod};
use gamma_tests::deployment_tally;
use gamma_tests::scenario::Scenario;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Enough for the split's ±5 points to hold by chance alone all but once in millions of runs (5
/// standard deviations of 1,000 draws at 90 %; of 200, one run in 60 failed).
const CALLS: usize = 1000;

struct Demo {
    /// One per node, each running the Pods placed on it; the cluster is the same in all.
    nodes: Vec<Scenario>,
    failures: Vec<String>,
}

fn header<'a>(answer: &'a ClientAnswer, name: &str) -> Option<&'a str> {
    answer
        .headers_at_backend
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

impl Demo {
    fn cluster(&self) -> &SimCluster {
        &self.nodes[0].cluster
    }

    /// The node a Pod runs on.
    fn node_of(&self, pod: &SimPod) -> Result<&Scenario> {
        self.nodes
            .iter()
            .find(|node| node.pod(pod).is_ok())
            .with_context(|| format!("{} runs on no node", pod.name))
    }

    fn client(&self, namespace: &str) -> Result<SimPod> {
        self.cluster()
            .client(namespace, "app=client")
            .cloned()
            .with_context(|| format!("no client pod in {namespace}"))
    }

    /// `count` calls to http://catalog.products/ from the client pod of `namespace`.
    fn call_catalog(&self, namespace: &str, count: usize) -> Result<Vec<ClientAnswer>> {
        let vip = self
            .cluster()
            .resolve("catalog.products", namespace)
            .context("catalog has no ClusterIP")?;
        let request = ClientRequest {
            url: format!("http://{vip}:80/items"),
            host: Some("catalog.products".into()),
            method: "GET".into(),
            count,
            ..Default::default()
        };
        let client = self.client(namespace)?;
        let answers = self.node_of(&client)?.request(&client, &request)?;
        if let Some(failed) = answers.iter().find(|a| a.status != 200) {
            bail!(
                "a call from {namespace} failed: status {} {:?}",
                failed.status,
                failed.error
            );
        }
        Ok(answers)
    }

    fn verdict(&mut self, ok: bool, text: String) {
        println!("  {} {text}", if ok { "PASS" } else { "FAIL" });
        if !ok {
            self.failures.push(text);
        }
    }

    fn show_route(&self, file: &PathBuf) -> Result<String> {
        let yaml = std::fs::read_to_string(file)?;
        println!("  applying {}:", file.display());
        for line in yaml.lines().filter(|l| !l.starts_with('#')) {
            println!("    | {line}");
        }
        let name = file
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("route.yaml");
        for node in &self.nodes {
            node.apply(name, &yaml)?;
        }
        Ok(yaml)
    }

    fn step1(&mut self, dir: &Path) -> Result<()> {
        println!("\nStep 1: a consumer route in ui-backend adds `x-dev-feature: enabled` to its calls to catalog.products");
        self.show_route(&dir.join("step1-consumer-route.yaml"))?;
        for namespace in ["ui-backend", "products"] {
            let answers = self.call_catalog(namespace, 20)?;
            let with = answers
                .iter()
                .filter(|a| header(a, "x-dev-feature") == Some("enabled"))
                .count();
            println!("  from {namespace:<10}: {with}/{} calls arrived with x-dev-feature: enabled (e.g. {} saw {:?})",
                answers.len(), answers[0].pod, header(&answers[0], "x-dev-feature"));
            let expected = if namespace == "ui-backend" {
                answers.len()
            } else {
                0
            };
            self.verdict(
                with == expected,
                format!(
                    "{namespace}: {with} of {} calls carry the header, expected {expected}",
                    answers.len()
                ),
            );
        }
        Ok(())
    }

    fn step2(&mut self, dir: &Path) -> Result<()> {
        println!(
            "\nStep 2: a producer route splits catalog 90/10 between catalog-v1 and catalog-v2"
        );
        self.show_route(&dir.join("step2-producer-split.yaml"))?;
        for namespace in ["products", "ui-backend"] {
            let answers = self.call_catalog(namespace, CALLS)?;
            let tally: BTreeMap<String, usize> =
                deployment_tally(answers.iter().map(|a| a.pod.as_str()));
            let v1 = tally.get("catalog-v1").copied().unwrap_or(0);
            let v2 = tally.get("catalog-v2").copied().unwrap_or(0);
            let flagged = answers
                .iter()
                .filter(|a| header(a, "x-dev-feature").is_some())
                .count();
            println!("  from {namespace:<10}: catalog-v1 {v1:>4}  catalog-v2 {v2:>4}  (of {CALLS}; x-dev-feature on {flagged})");
            if self.nodes.len() > 1 {
                let mut by_node: BTreeMap<String, usize> = BTreeMap::new();
                for answer in &answers {
                    let node = self
                        .cluster()
                        .pods
                        .iter()
                        .find(|p| p.name == answer.pod)
                        .and_then(|p| self.nodes.iter().position(|n| n.pod(p).is_ok()))
                        .map_or("?".to_string(), node_name);
                    *by_node.entry(node).or_default() += 1;
                }
                println!("    answered on each node: {by_node:?}");
            }
            if namespace == "products" {
                let share = v1 as f64 / CALLS as f64;
                self.verdict((share - 0.9).abs() <= 0.05 && v2 > 0 && flagged == 0,
                    format!("products follows the producer split: {:.0}% to catalog-v1 (90% ± 5 expected), no x-dev-feature", share * 100.0));
            } else {
                self.verdict(flagged == CALLS,
                    "ui-backend keeps its consumer route (which replaces producer routes): every call carries x-dev-feature".into());
            }
        }
        Ok(())
    }
}

#[derive(clap::Parser)]
#[command(about = "The seed scenario on a node made of network namespaces")]
struct Cli {
    /// Folder with the scenario's manifests (default: the workspace's demo/).
    dir: Option<PathBuf>,
    /// Nodes to spread the pods over (1 or 2), each with its own agent (`--node-name`).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
    nodes: u8,
}

/// The names of the nodes of the demo: `node-a`, `node-b`.
fn node_name(index: usize) -> String {
    format!("node-{}", (b'a' + index as u8) as char)
}

/// The seed cluster on `count` nodes: its Pods dealt round-robin, the nodes linked.
fn start_nodes(cluster: &SimCluster, count: usize) -> Result<Vec<Scenario>> {
    if count == 1 {
        return Ok(vec![Scenario::start("demo", cluster.clone())?]);
    }
    let placed = |index: usize| -> std::collections::BTreeSet<String> {
        cluster
            .pods
            .iter()
            .enumerate()
            .filter(|(i, _)| i % count == index)
            .map(|(_, p)| p.name.clone())
            .collect()
    };
    let mut nodes = Vec::new();
    for index in 0..count {
        let here = placed(index);
        let args = vec!["--node-name".to_string(), node_name(index)];
        let node = Scenario::start_node(
            &format!("demo-{}", node_name(index)),
            cluster.clone(),
            move |pod| here.contains(&pod.name),
            args,
        )?;
        nodes.push(node);
    }
    let addresses = |index: usize| -> Vec<String> {
        cluster
            .pods
            .iter()
            .filter(|p| placed(index).contains(&p.name))
            .map(|p| p.ip.to_string())
            .collect()
    };
    let (first, rest) = nodes.split_at_mut(1);
    first[0].node.link_to(
        &rest[0].node,
        std::net::Ipv4Addr::new(172, 31, 255, 0),
        &addresses(0),
        &addresses(1),
    )?;
    Ok(nodes)
}

fn main() -> Result<()> {
    let cli = <Cli as clap::Parser>::parse();
    let dir = cli
        .dir
        .unwrap_or_else(|| gamma_tests::workspace_root().join("demo"));
    let count = usize::from(cli.nodes);
    if let Some(reason) = gamma_tests::node::require_root() {
        bail!("the demo builds a node out of network namespaces and loads eBPF programs: {reason}");
    }
    let cluster = SimCluster::from_manifests(&dir.join("cluster.yaml"), AddressPlan::default())?;
    if count == 1 {
        println!(
            "gamma-node demo: a node made of network namespaces, the agent with its kernel redirect"
        );
    } else {
        println!("gamma-node demo: {count} nodes made of network namespaces, joined by a routed link, each with its agent and kernel redirect");
    }
    for (i, pod) in cluster.pods.iter().enumerate() {
        let node = if count > 1 {
            format!("  on {}", node_name(i % count))
        } else {
            String::new()
        };
        println!(
            "  pod {:<10} {:<28} {}{node}",
            pod.namespace, pod.name, pod.ip
        );
    }
    for service in &cluster.services {
        println!(
            "  service {:<10} {:<12} {}",
            service.namespace, service.name, service.cluster_ip
        );
    }
    let mut demo = Demo {
        nodes: start_nodes(&cluster, count)?,
        failures: Vec::new(),
    };
    println!("\nBefore any route: calls go to catalog's endpoints untouched (kube-proxy routing)");
    let before = demo.call_catalog("ui-backend", 20)?;
    let flagged = before
        .iter()
        .filter(|a| header(a, "x-dev-feature").is_some())
        .count();
    demo.verdict(
        flagged == 0,
        format!(
            "ui-backend: {}/20 calls answered, none modified",
            before.len()
        ),
    );
    demo.step1(&dir)?;
    demo.step2(&dir)?;
    if count > 1 {
        for (index, node) in demo.nodes.iter().enumerate() {
            let metrics = node.admin_get("/metrics")?;
            let steered =
                gamma_tests::probe::sample(&metrics, "gamma_kernel_connects_steered_total")
                    .unwrap_or(0.0);
            println!(
                "  {}: its agent's kernel programs steered {steered} connections of its own pods",
                node_name(index)
            );
        }
    }
    demo.nodes.clear();
    println!("\nCleaned up: namespaces, links, cgroups and the agent are gone.");
    if demo.failures.is_empty() {
        println!("Demo: every verdict passed.");
        Ok(())
    } else {
        bail!(
            "{} verdict(s) failed:\n  {}",
            demo.failures.len(),
            demo.failures.join("\n  ")
        )
    }
}
