//! The restart soak: steady load from pods through the kernel redirect while the agent is
//! restarted again and again, each new agent taking over from the running one
//! (`proxy_agent::handover`). Run by `cargo xtask soak restart` (`gamma-soak`) and, shortened,
//! by `tests/tests/restart.rs`.
//!
//! The node: the seed cluster (`demo/cluster.yaml`) with the consumer route of
//! `demo/step1-consumer-route.yaml`, which adds `x-dev-feature: enabled` to ui-backend's calls to
//! catalog. Load runs in the ui-backend client pod against catalog's VIP, so every answer says
//! whether the mesh routed it (the header) or ordinary Service routing did (a window in which
//! connect() went unsteered).

use crate::cluster::{AddressPlan, SimCluster};
use crate::load::{LoadReport, LoadSpec};
use crate::loopback::TempDir;
use crate::scenario::{binary, AgentTakeover, Scenario};
use anyhow::{ensure, Context, Result};
use proxy_agent::redirect;
use proxy_common::programs;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How hard and how long.
#[derive(Clone, Debug)]
pub struct SoakConfig {
    /// Takeovers to do, spread evenly over the run.
    pub restarts: usize,
    /// How long the load runs.
    pub duration: Duration,
    /// Every n-th restart swaps the new agent's programs in (`--takeover-fresh-programs`), the path
    /// an upgrade with changed programs takes; the others adopt the running programs. 0: never.
    pub fresh_programs_every: usize,
    /// Load processes in the client pod, each with the clients below.
    pub processes: usize,
    pub keep_alive: usize,
    pub idle_keep_alive: usize,
    pub new_connection: usize,
    pub http2: usize,
    /// Upgraded connections held through every restart (see `load.rs`).
    pub long_lived: usize,
    /// Baseline: restart the old way, SIGTERM and start again without a takeover (losses
    /// expected: this shows what the takeover saves and that the soak can see it).
    pub cold: bool,
    /// Run the agents with `--local-sockets` (in a cgroup under the pods').
    pub local_sockets: bool,
}

impl Default for SoakConfig {
    fn default() -> Self {
        SoakConfig {
            restarts: 10,
            duration: Duration::from_secs(60),
            fresh_programs_every: 2,
            processes: 2,
            keep_alive: 2,
            idle_keep_alive: 1,
            new_connection: 2,
            http2: 1,
            long_lived: 2,
            cold: false,
            local_sockets: false,
        }
    }
}

/// One restart of the soak.
#[derive(Clone, Copy, Debug)]
pub enum Restart {
    Takeover {
        fresh_programs: bool,
        timing: AgentTakeover,
    },
    /// SIGTERM, then a fresh start: from the signal to the new agent ready.
    Cold { took: Duration },
}

/// What the soak saw.
#[derive(Clone, Debug)]
pub struct SoakReport {
    pub restarts: Vec<Restart>,
    pub load: LoadReport,
    /// The gamma programs on the pods' cgroup at the end, sorted.
    pub attached: Vec<String>,
    /// Whether those are what the last restart should leave: each program once; after a swap,
    /// also the predecessor's sockops and getpeername programs, kept until the agent exits.
    pub attached_as_expected: bool,
    /// Sockets whose bytes moved socket to socket (`gamma_kernel_local_moved_sockets_total`) from
    /// the last restart on: that pairing still works after the last takeover.
    pub local_moved_after_last_restart: u64,
    /// This node's opted-in pods (all of the soak's) the agent running at the end told the kernel
    /// programs
    /// (`gamma_kernel_local_pods`; 0 without `--local-sockets`).
    pub local_pods_at_end: u64,
    /// How the agent running at the end pumped its opaque and upgraded connections, the ones
    /// handed over to it included (`gamma_pumped_connections_total`): (spliced, copied).
    pub pumped_at_end: (u64, u64),
    /// The pods of the soak's cluster.
    pub pods: u64,
    pub elapsed: Duration,
}

impl SoakReport {
    /// Whether nothing was lost: every restart done, no failed request, no reset, nothing routed
    /// around the mesh.
    pub fn clean(&self, config: &SoakConfig) -> bool {
        self.restarts.len() == config.restarts
            && self.load.failed == 0
            && self.load.resets == 0
            && self.load.unmeshed == 0
            && self.load.sent > 0
            && self.load.long_lived_kept == self.load.long_lived_opened
            && self.attached_as_expected
    }
}

impl std::fmt::Display for SoakReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let l = &self.load;
        writeln!(
            f,
            "restarts done: {}   requests sent: {}   ok: {}   failed: {}   reset connections: {}",
            self.restarts.len(),
            l.sent,
            l.ok,
            l.failed,
            l.resets
        )?;
        writeln!(
            f,
            "retried on a new connection: {}   routed around the mesh: {}   connections: {}   in {:.1}s",
            l.retried,
            l.unmeshed,
            l.connections,
            self.elapsed.as_secs_f64()
        )?;
        writeln!(
            f,
            "long-lived upgraded connections kept through every restart: {} of {} opened, {} bytes echoed intact",
            l.long_lived_kept, l.long_lived_opened, l.long_lived_bytes
        )?;
        writeln!(
            f,
            "sockets moving their bytes socket to socket (--local-sockets) after the last restart: {}",
            self.local_moved_after_last_restart
        )?;
        writeln!(
            f,
            "pods told to the kernel programs at the end (--local-sockets): {} of {}",
            self.local_pods_at_end, self.pods
        )?;
        writeln!(
            f,
            "connections pumped by the agent at the end: {} spliced, {} copied",
            self.pumped_at_end.0, self.pumped_at_end.1
        )?;
        writeln!(
            f,
            "programs on the cgroup after ({}): {}",
            if self.attached_as_expected {
                "as expected"
            } else {
                "NOT as expected"
            },
            self.attached.join(" ")
        )?;
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        for (i, r) in self.restarts.iter().enumerate() {
            match r {
                Restart::Takeover {
                    fresh_programs,
                    timing: t,
                } => writeln!(
                    f,
                    "  restart {:>2} ({}): offer {:.1} ms, stop {:.2} ms, new agent start to old stopped {:.0} ms, old agent exited after {:.0} ms",
                    i + 1,
                    if *fresh_programs { "programs swapped" } else { "programs adopted" },
                    ms(t.offer),
                    ms(t.stop),
                    ms(t.total),
                    ms(t.old_exited)
                )?,
                Restart::Cold { took } => writeln!(
                    f,
                    "  restart {:>2} (cold: SIGTERM, then a fresh start): new agent ready after {:.0} ms",
                    i + 1,
                    ms(*took)
                )?,
            }
        }
        for e in &l.errors {
            writeln!(f, "  error: {e}")?;
        }
        for r in &l.retry_reasons {
            writeln!(f, "  retried after: {r}")?;
        }
        Ok(())
    }
}

/// Runs the soak (as root: it builds a node of network namespaces). Everything it creates is
/// removed when it returns.
pub fn run(name: &str, config: &SoakConfig) -> Result<SoakReport> {
    let started = Instant::now();
    let demo = crate::workspace_root().join("demo");
    let mut cluster =
        SimCluster::from_manifests(&demo.join("cluster.yaml"), AddressPlan::default())?;
    let sockets = TempDir::new("takeover");
    let socket = sockets.0.join("agent.sock");
    let mut args = vec![
        "--takeover-socket".to_string(),
        socket.display().to_string(),
        // Bounds a soak stuck on a connection that never ends.
        "--drain-timeout-s".into(),
        "10".into(),
    ];
    if config.local_sockets {
        args.push("--local-sockets".into());
        cluster = cluster.with_local_sockets(None);
    }
    let mut scenario = Scenario::start_with(name, cluster, args)?;
    let route = std::fs::read_to_string(demo.join("step1-consumer-route.yaml"))?;
    scenario.apply("consumer.yaml", &route)?;
    let vip = scenario
        .cluster
        .resolve("catalog", "products")
        .context("catalog's VIP")?;
    let client = scenario
        .cluster
        .client("ui-backend", "app=client")
        .context("the ui-backend client pod")?
        .clone();
    let spec = LoadSpec {
        target: (vip, 80).into(),
        host: "catalog.products".into(),
        path: "/soak".into(),
        duration_ms: config.duration.as_millis() as u64,
        keep_alive: config.keep_alive,
        idle_keep_alive: config.idle_keep_alive,
        // Longer than the agent's idle grace while draining: these connections are closed idle.
        idle_pause_ms: 1_500,
        new_connection: config.new_connection,
        http2: config.http2,
        long_lived: config.long_lived,
        expect_header: Some(("x-dev-feature".into(), "enabled".into())),
    };
    let pod = scenario.pod(&client)?.clone();
    let mut load = Vec::with_capacity(config.processes);
    for _ in 0..config.processes {
        let mut command = Command::new(binary("gamma-load"));
        command
            .arg("--json")
            .arg(serde_json::to_string(&spec)?)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        load.push(pod.spawn(&mut command)?);
    }
    let load_started = Instant::now();
    let mut restarts = Vec::with_capacity(config.restarts);
    let every = config.duration / (config.restarts as u32 + 1);
    for i in 1..=config.restarts {
        let due = every * i as u32;
        std::thread::sleep(due.saturating_sub(load_started.elapsed()));
        let fresh_programs =
            config.fresh_programs_every > 0 && i % config.fresh_programs_every == 0;
        let extra: &[&str] = if fresh_programs {
            &["--takeover-fresh-programs"]
        } else {
            &[]
        };
        let restart = if config.cold {
            scenario
                .restart_agent_cold()
                .map(|took| Restart::Cold { took })
        } else {
            scenario
                .take_over_agent(extra)
                .map(|timing| Restart::Takeover {
                    fresh_programs,
                    timing,
                })
        };
        restarts.push(restart.with_context(|| format!("restart {i}"))?);
    }
    let moved_at_last_restart = local_moved(&scenario)?;
    let mut total = LoadReport::default();
    for child in load {
        let output = child.wait_with_output()?;
        ensure!(
            output.status.success(),
            "gamma-load exited with {}",
            output.status
        );
        let report: LoadReport = serde_json::from_slice(&output.stdout).with_context(|| {
            format!(
                "gamma-load printed {:?}",
                String::from_utf8_lossy(&output.stdout)
            )
        })?;
        total.add(&report);
    }
    let mut attached: Vec<String> = redirect::attached_programs(scenario.node.pods_cgroup())?
        .into_iter()
        .map(|p| p.name)
        .collect();
    attached.sort();
    let mut expected: Vec<String> = programs::ALL.iter().map(|p| p.to_string()).collect();
    if let Some(Restart::Takeover {
        fresh_programs: true,
        ..
    }) = restarts.last()
    {
        let kept = [
            programs::SOCKOPS,
            programs::GETPEERNAME4,
            programs::GETPEERNAME6,
        ];
        expected.extend(kept.map(String::from));
    }
    expected.sort();
    let local_moved_after_last_restart =
        local_moved(&scenario)?.saturating_sub(moved_at_last_restart);
    Ok(SoakReport {
        restarts,
        load: total,
        attached_as_expected: attached == expected,
        attached,
        local_moved_after_last_restart,
        local_pods_at_end: metric(&scenario, "gamma_kernel_local_pods")?,
        pumped_at_end: crate::probe::pumped(&scenario.admin_get("/metrics")?),
        pods: scenario.cluster.pods.len() as u64,
        elapsed: started.elapsed(),
    })
}

/// The running agent's count of sockets whose bytes moved (0 without `--local-sockets`).
fn local_moved(scenario: &Scenario) -> Result<u64> {
    metric(scenario, "gamma_kernel_local_moved_sockets_total")
}

/// The running agent's value of a metric's sample (0 when absent).
fn metric(scenario: &Scenario, name: &str) -> Result<u64> {
    let metrics = scenario.admin_get("/metrics")?;
    Ok(crate::probe::sample(&metrics, name).unwrap_or(0.0) as u64)
}
