//! A simulated cluster running on a node harness: every Pod in its own network namespace and
//! cgroup (echo backends listening on their container ports), the simulated kube-proxy for every
//! Service, and the agent in the node namespace with the kernel redirect attached to the pods'
//! cgroup, fed through its manifest folder. Used by the end-to-end tests, the conformance runner
//! and `cargo xtask demo`.

use crate::client::{ClientAnswer, ClientRequest};
use crate::cluster::{SimCluster, SimPod};
use crate::loopback::TempDir;
use crate::node::{Node, Pod, AGENT_ADDR};
use anyhow::{bail, ensure, Context, Result};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where the agent's redirect listener binds in the node (pods reach it on-link).
pub const REDIRECT_PORT: u16 = 15001;
/// The agent's admin server, on the node netns' loopback.
pub const ADMIN: &str = "127.0.0.1:15000";

/// A binary of this workspace built beside the running executable (`target/<profile>/NAME`).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("own path");
    let dir = exe.parent().expect("a folder");
    let beside = dir.join(name);
    if beside.exists() {
        return beside;
    }
    // Integration tests run from target/<profile>/deps.
    dir.parent().map_or(beside.clone(), |p| p.join(name))
}

/// Bound on a takeover: the new agent's start, the handover and the old agent's drain.
const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(30);

/// How a takeover went: the new agent's own account (its `/metrics`) and when the old one exited.
#[derive(Clone, Copy, Debug)]
pub struct AgentTakeover {
    /// From connecting to the running agent to holding its sockets.
    pub offer: Duration,
    /// From Stop to Stopped: the old agent's last accepts.
    pub stop: Duration,
    /// From the new agent's start to the old one having stopped accepting.
    pub total: Duration,
    /// From starting the new agent to the old one's exit (its drain included).
    pub old_exited: Duration,
}

pub struct Scenario {
    pub node: Node,
    pub cluster: SimCluster,
    pub manifests: TempDir,
    agent: Option<Child>,
    agent_args: Vec<String>,
    /// The agent's own cgroup, under the pods' (as a DaemonSet pod's), when `--local-sockets`
    /// needs its sockets covered by the programs; else it runs in the test's cgroup.
    agent_cgroup: Option<PathBuf>,
    pods: Vec<(SimPod, Pod)>,
    /// `--redirect` of the agents started from now on, instead of the node's addresses.
    pub redirect_override: Option<String>,
}

fn ipv4(ip: IpAddr) -> Result<Ipv4Addr> {
    match ip {
        IpAddr::V4(v4) => Ok(v4),
        IpAddr::V6(_) => bail!("the node harness is IPv4 only"),
    }
}

/// JSON documents as one multi-document YAML text (JSON is YAML).
pub fn to_yaml(documents: &[serde_json::Value]) -> String {
    documents
        .iter()
        .map(|d| serde_json::to_string_pretty(d).expect("json"))
        .collect::<Vec<_>>()
        .join("\n---\n")
}

impl Scenario {
    /// Builds the node, starts echo backends in every Pod with container ports, programs the
    /// simulated kube-proxy, writes the cluster's objects and starts the agent.
    pub fn start(name: &str, cluster: SimCluster) -> Result<Scenario> {
        Self::start_with(name, cluster, Vec::new())
    }

    /// As `start`, with extra arguments for the agent (e.g. explicit listeners).
    pub fn start_with(
        name: &str,
        cluster: SimCluster,
        agent_args: Vec<String>,
    ) -> Result<Scenario> {
        Self::start_node(name, cluster, |_| true, agent_args)
    }

    /// One node of a cluster of several: only the Pods `here` picks run on it (the others on the
    /// other nodes, to be linked with [`Node::link_to`]); every Service's endpoints are reachable
    /// through its kube-proxy, and its agent (`agent_args` should name `--node-name`) knows the
    /// whole cluster.
    pub fn start_node(
        name: &str,
        cluster: SimCluster,
        here: impl Fn(&SimPod) -> bool,
        agent_args: Vec<String>,
    ) -> Result<Scenario> {
        let mut node = Node::new(name)?;
        let mut pods = Vec::new();
        for sim in cluster.pods.iter().filter(|p| here(p)) {
            let pod = node.add_pod(&sim.namespace, &sim.name, &sim.uid, ipv4(sim.ip)?)?;
            if let Some(ip6) = sim.ip6 {
                node.give_ipv6(&pod, ip6)?;
            }
            if !sim.container_ports.is_empty() {
                let mut echo = Command::new(binary("gamma-echo"));
                echo.arg("--name").arg(&sim.name);
                echo.arg("--namespace").arg(&sim.namespace);
                for (_, port) in &sim.container_ports {
                    echo.arg(format!("0.0.0.0:{port}"));
                }
                echo.stdout(Stdio::null()).stderr(Stdio::null());
                pod.spawn(&mut echo)?;
            }
            pods.push((sim.clone(), pod));
        }
        for (sim, pod) in &pods {
            if let Some((_, port)) = sim.container_ports.first() {
                pod.wait_for_port(*port, crate::harness_timeout(Duration::from_secs(5)))
                    .with_context(|| format!("echo in {}", sim.name))?;
            }
        }
        for service in &cluster.services {
            for (port, _, target, ips) in cluster.endpoints(service) {
                let endpoints: Vec<(Ipv4Addr, u16)> = ips
                    .iter()
                    .filter_map(|ip| ipv4(*ip).ok())
                    .map(|ip| (ip, target))
                    .collect();
                if !endpoints.is_empty() {
                    node.dnat_service(ipv4(service.cluster_ip)?, port, &endpoints)?;
                }
            }
        }
        let agent_cgroup = if agent_args.iter().any(|a| a == "--local-sockets") {
            Some(node.add_agent_cgroup()?)
        } else {
            None
        };
        let manifests = TempDir::new("scenario");
        std::fs::write(
            manifests.0.join("cluster.yaml"),
            to_yaml(&cluster.manifests()),
        )?;
        let mut scenario = Scenario {
            node,
            cluster,
            manifests,
            agent: None,
            agent_args,
            agent_cgroup,
            pods,
            redirect_override: None,
        };
        scenario.start_agent()?;
        Ok(scenario)
    }

    /// Starts the agent (again) and waits until it is ready.
    pub fn start_agent(&mut self) -> Result<()> {
        self.agent = Some(self.spawn_agent(&[])?);
        let started = Instant::now();
        while self.admin_get("/ready").is_err() {
            if let Some(status) = self
                .agent
                .as_mut()
                .and_then(|a| a.try_wait().ok().flatten())
            {
                bail!("the agent exited during start: {status}");
            }
            let limit = crate::harness_timeout(Duration::from_secs(10));
            if started.elapsed() > limit {
                bail!("the agent was not ready within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Starts a new agent, with the scenario's arguments (which must name a `--takeover-socket`)
    /// and `extra`, that takes over from the running one, and waits until the old one has drained
    /// and exited (successfully: anything else is an error).
    pub fn take_over_agent(&mut self, extra: &[&str]) -> Result<AgentTakeover> {
        let mut old = self.agent.take().context("no agent is running")?;
        let started = Instant::now();
        let mut new = self.spawn_agent(extra)?;
        let status = loop {
            if let Some(status) = old.try_wait()? {
                break status;
            }
            let failure = if let Some(status) = new.try_wait()? {
                Some(format!(
                    "the new agent exited during the takeover: {status}"
                ))
            } else if started.elapsed() > TAKEOVER_TIMEOUT {
                Some(format!(
                    "the old agent had not exited {TAKEOVER_TIMEOUT:?} after its successor started"
                ))
            } else {
                None
            };
            if let Some(failure) = failure {
                let _ = new.kill();
                let _ = new.wait();
                self.agent = Some(old);
                bail!(failure);
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let old_exited = started.elapsed();
        self.agent = Some(new);
        ensure!(status.success(), "the old agent exited with {status}");
        // Only the new agent answers on the (handed over) admin socket now.
        let metrics = self.admin_get("/metrics")?;
        let phase = |name: &str| -> Result<Duration> {
            let sample = format!("gamma_takeover_duration_seconds{{phase=\"{name}\"}}");
            let seconds = crate::probe::sample(&metrics, &sample)
                .with_context(|| format!("no takeover {name} time in /metrics"))?;
            Ok(Duration::from_secs_f64(seconds))
        };
        Ok(AgentTakeover {
            offer: phase("offer")?,
            stop: phase("stop")?,
            total: phase("total")?,
            old_exited,
        })
    }

    /// Stops the agent with SIGTERM (it drains) and starts a new one once it has exited: a restart
    /// without a takeover, as before `--takeover-socket` (the baseline of the restart soak).
    pub fn restart_agent_cold(&mut self) -> Result<Duration> {
        let mut old = self.agent.take().context("no agent is running")?;
        let started = Instant::now();
        // SAFETY: kill(2) on our own child, not yet reaped, so the pid is still its.
        if unsafe { libc::kill(old.id() as libc::pid_t, libc::SIGTERM) } != 0 {
            bail!("SIGTERM to the agent: {}", std::io::Error::last_os_error());
        }
        while old.try_wait()?.is_none() {
            if started.elapsed() > TAKEOVER_TIMEOUT {
                self.agent = Some(old);
                bail!("the agent had not exited {TAKEOVER_TIMEOUT:?} after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.start_agent()?;
        Ok(started.elapsed())
    }

    fn spawn_agent(&self, extra: &[&str]) -> Result<Child> {
        let mut command = self.agent_command(extra);
        match &self.agent_cgroup {
            Some(cgroup) => self.node.spawn_in_cgroup(cgroup, &mut command),
            None => self.node.spawn(&mut command),
        }
    }

    /// `--redirect`: the node's IPs, of both families on a dual-stack node, then the port.
    fn redirect_addresses(&self) -> String {
        if let Some(addresses) = &self.redirect_override {
            addresses.clone()
        } else if self.node.has_ipv6() {
            format!("{AGENT_ADDR},{}:{REDIRECT_PORT}", crate::node::AGENT_ADDR6)
        } else {
            SocketAddr::from((AGENT_ADDR, REDIRECT_PORT)).to_string()
        }
    }

    /// The agent command line: the scenario's arguments, then `extra`.
    fn agent_command(&self, extra: &[&str]) -> Command {
        let mut agent = Command::new(binary("proxy-agent"));
        agent
            .arg("--manifests")
            .arg(&self.manifests.0)
            .arg("--redirect")
            .arg(self.redirect_addresses())
            .arg("--cgroup")
            .arg(self.node.pods_cgroup())
            .arg("--admin")
            .arg(ADMIN)
            .arg("--poll-interval-ms")
            .arg("50")
            .args(&self.agent_args)
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("AGENT_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        agent
    }

    /// Kills the agent (SIGKILL) and waits for it to exit.
    pub fn kill_agent(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            let _ = agent.kill();
            let _ = agent.wait();
        }
    }

    pub fn admin_get(&self, path: &str) -> Result<String> {
        let admin: SocketAddr = ADMIN.parse()?;
        let path = path.to_string();
        self.node
            .in_netns(move || crate::loopback::http_get(admin, &path))?
    }

    pub fn snapshot_version(&self) -> Result<u64> {
        let dump: serde_json::Value = serde_json::from_str(&self.admin_get("/config_dump")?)?;
        dump["version"]
            .as_u64()
            .context("no version in /config_dump")
    }

    /// Writes (or replaces) a manifest file in the agent's folder and waits until the agent has
    /// published a table that includes it.
    pub fn apply(&self, file: &str, yaml: &str) -> Result<()> {
        self.change(|dir| {
            let tmp = dir.join(format!(".{file}.tmp"));
            std::fs::write(&tmp, yaml)?;
            std::fs::rename(&tmp, dir.join(file))
        })
    }

    pub fn remove(&self, file: &str) -> Result<()> {
        self.change(|dir| std::fs::remove_file(dir.join(file)))
    }

    /// Makes `edit` to the manifest folder and waits until the agent published a table with it
    /// and told the kernel programs its mesh frontends (they steer by them: a call made before
    /// would reach kube-proxy's routing).
    fn change(&self, edit: impl FnOnce(&Path) -> std::io::Result<()>) -> Result<()> {
        let before = self.snapshot_version()?;
        edit(&self.manifests.0)?;
        let started = Instant::now();
        let limit = crate::harness_timeout(Duration::from_secs(5));
        let published = loop {
            let version = self.snapshot_version()?;
            if version != before {
                break version;
            }
            if started.elapsed() > limit {
                bail!("the agent did not publish the change in time");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        // Without one (a kernel the redirect cannot run on attaches none), nothing to wait for.
        while self
            .kernel_table_version()?
            .is_some_and(|told| told < published)
        {
            if started.elapsed() > limit {
                bail!("the agent did not tell the kernel programs table {published} in time");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// The table the kernel programs were last told, if the agent runs them.
    fn kernel_table_version(&self) -> Result<Option<u64>> {
        let metrics = self.admin_get("/metrics")?;
        Ok(crate::probe::sample(&metrics, "gamma_kernel_table_version").map(|v| v as u64))
    }

    /// The harness Pods of every simulated Pod but `sim`.
    pub fn pods_except(&self, sim: &SimPod) -> Vec<&Pod> {
        self.pods
            .iter()
            .filter(|(s, _)| !s.same_pod(sim))
            .map(|(_, p)| p)
            .collect()
    }

    /// The harness Pod of a simulated Pod.
    pub fn pod(&self, sim: &SimPod) -> Result<&Pod> {
        self.pods
            .iter()
            .find(|(s, _)| s.same_pod(sim))
            .map(|(_, p)| p)
            .context("no such pod")
    }

    /// Runs `gamma-client` inside `from` (its netns and cgroup, so the kernel redirect applies).
    pub fn request(&self, from: &SimPod, request: &ClientRequest) -> Result<Vec<ClientAnswer>> {
        run_client(self.pod(from)?, request)
    }

    /// Runs `gamma-client` in `ip_of`'s netns (so from its IP) but in `impostor`'s cgroup.
    pub fn request_impersonating(
        &self,
        ip_of: &SimPod,
        impostor: &SimPod,
        request: &ClientRequest,
    ) -> Result<Vec<ClientAnswer>> {
        let output = self.pod(ip_of)?.run_output_impersonated_by(
            self.pod(impostor)?,
            &mut client_command(request),
            client_timeout(request),
        )?;
        parse_answers(output)
    }
}

/// Runs `gamma-client` inside pod `from` of any node harness.
pub fn run_client(from: &Pod, request: &ClientRequest) -> Result<Vec<ClientAnswer>> {
    let output = from.run_output(&mut client_command(request), client_timeout(request))?;
    parse_answers(output)
}

fn client_command(request: &ClientRequest) -> Command {
    let mut client = Command::new(binary("gamma-client"));
    client.args(request.to_args());
    client
}

fn client_timeout(request: &ClientRequest) -> Duration {
    crate::harness_timeout(Duration::from_secs(15 + request.count as u64 / 10))
}

fn parse_answers(output: std::process::Output) -> Result<Vec<ClientAnswer>> {
    if !output.status.success() {
        bail!(
            "gamma-client failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).context("client output"))
        .collect()
}

impl Drop for Scenario {
    fn drop(&mut self) {
        self.kill_agent();
    }
}
