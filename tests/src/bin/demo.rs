//! `gamma-demo DIR`: the seed scenario on one machine, no cluster (run by `cargo xtask demo`).
//!
//! A node made of network namespaces; pods of `products` (catalog-v1, catalog-v2, a client) and
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

const CALLS: usize = 200;

struct Demo {
    scenario: Scenario,
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
    fn client(&self, namespace: &str) -> Result<SimPod> {
        self.scenario
            .cluster
            .client(namespace, "app=client")
            .cloned()
            .with_context(|| format!("no client pod in {namespace}"))
    }

    /// `count` calls to http://catalog.products/ from the client pod of `namespace`.
    fn call_catalog(&self, namespace: &str, count: usize) -> Result<Vec<ClientAnswer>> {
        let vip = self
            .scenario
            .cluster
            .resolve("catalog.products", namespace)
            .context("catalog has no ClusterIP")?;
        let request = ClientRequest {
            url: format!("http://{vip}:80/items"),
            host: Some("catalog.products".into()),
            method: "GET".into(),
            count,
            ..Default::default()
        };
        let answers = self.scenario.request(&self.client(namespace)?, &request)?;
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
        self.scenario.apply(
            file.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("route.yaml"),
            &yaml,
        )?;
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
            println!("  from {namespace:<10}: catalog-v1 {v1:>3}  catalog-v2 {v2:>3}  (of {CALLS}; x-dev-feature on {flagged})");
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
}

fn main() -> Result<()> {
    let dir = <Cli as clap::Parser>::parse()
        .dir
        .unwrap_or_else(|| gamma_tests::workspace_root().join("demo"));
    if let Some(reason) = gamma_tests::node::require_root() {
        bail!("the demo builds a node out of network namespaces and loads eBPF programs: {reason}");
    }
    let cluster = SimCluster::from_manifests(&dir.join("cluster.yaml"), AddressPlan::default())?;
    println!(
        "gamma-node demo: a node made of network namespaces, the agent with its kernel redirect"
    );
    for pod in &cluster.pods {
        println!("  pod {:<10} {:<28} {}", pod.namespace, pod.name, pod.ip);
    }
    for service in &cluster.services {
        println!(
            "  service {:<10} {:<12} {}",
            service.namespace, service.name, service.cluster_ip
        );
    }
    let scenario = Scenario::start("demo", cluster)?;
    let mut demo = Demo {
        scenario,
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
    drop(demo.scenario);
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
