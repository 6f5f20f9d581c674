//! A node made of network namespaces, for end-to-end tests and `cargo xtask demo`.
//!
//! ```text
//!  netns <prefix>-node  lo: 169.254.1.1/32 (the agent address), ip_forward=1,
//!  │                    blackhole 10.96.0.0/16, simulated kube-proxy (iptables nat)
//!  ├─ <prefix>v0 169.254.1.1/32 ══ veth ══ eth0 <pod ip>/32   netns <prefix>-p0, cgroup <pods>/pod<uid>
//!  └─ <prefix>v1 ...                                          netns <prefix>-p1, ...
//! ```
//! Pods route everything to 169.254.1.1 (on-link, like Calico), so the agent in the node netns is
//! one hop away from every pod and the node forwards pod-to-pod traffic. `<pods>` is
//! `<cgroup v2 mount>/<prefix>-pods`; the mount is read from /proc/self/mountinfo because hybrid
//! systems (this one) have it at /sys/fs/cgroup/unified, not /sys/fs/cgroup.
//!
//! Nothing in the root network namespace changes: every `ip` command runs with `-n <netns>`, the
//! veth pairs are created inside the node netns with their peer placed straight into the pod netns,
//! and sysctls and iptables run in the node netns. Everything created is recorded as it is made and
//! removed, by name and in reverse order, when the [`Node`] is dropped (also on error or panic).

use std::collections::BTreeMap;
use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};

/// The node's agent address: on the node's loopback (so the agent can bind it before any pod
/// exists) and on the node side of every veth (so each pod reaches it on-link).
pub const AGENT_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The Service CIDR, blackholed in the node netns like on a node without kube-proxy rules.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// The agent's IPv6 address on a dual-stack node ([`Node::give_ipv6`]), placed as [`AGENT_ADDR`].
pub const AGENT_ADDR6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 1);
/// The IPv6 Service CIDR of a dual-stack node: blackholed, and no kube-proxy for it (a connection
/// the kernel programs do not steer fails).
pub const SERVICE_CIDR6: &str = "fd00:96::/112";

/// Bound on each setup or cleanup command (`ip`, `iptables`, `sysctl`).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on waiting for killed processes to exit and for a cgroup to empty.
const EXIT_TIMEOUT: Duration = Duration::from_secs(3);
/// Routing table (and rule priority) that lets the node's own connections to the service CIDR
/// reach iptables' nat OUTPUT (see [`Node::route_service_cidr`]).
const LOCAL_SERVICES_TABLE: &str = "96";
/// The simulated kube-proxy's chain, jumped to from PREROUTING and OUTPUT (KUBE-SERVICES).
const SERVICES_CHAIN: &str = "GN-SERVICES";
/// The mark kube-proxy uses to masquerade hairpin traffic (a pod reaching itself via a VIP).
const MASQUERADE_MARK: &str = "0x4000/0x4000";

/// Why the node harness cannot run here (not root, a tool or cgroup v2 missing), or None.
/// Tests print `SKIPPED: <reason>` and return when this is Some.
pub fn require_root() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("the node harness needs root (network namespaces, cgroups, iptables)".into());
    }
    for tool in ["ip", "iptables"] {
        if !Command::new(tool)
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return Some(format!("`{tool}` is not installed"));
        }
    }
    cgroup2_mount().err().map(|e| format!("{e:#}"))
}

/// A node: its netns, its pods, the pods' parent cgroup and its simulated kube-proxy.
#[derive(Debug)]
pub struct Node {
    run_name: String,
    prefix: String,
    place: Place,
    pods_cgroup: PathBuf,
    pods: Vec<Pod>,
    next_pod: usize,
    /// Whether the node has its IPv6 agent address and Service CIDR ([`Node::give_ipv6`]).
    ipv6: bool,
    /// Endpoint count of each DNATed VIP:port, to find its chains again.
    services: BTreeMap<(Ipv4Addr, u16), usize>,
    processes: Arc<Processes>,
    /// What to remove on drop, in creation order.
    created: Vec<Resource>,
}

/// A pod: a netns joined to the node by a veth pair, and a cgroup for its processes. A handle:
/// the [`Node`] that made it owns the resources and removes them.
#[derive(Clone, Debug)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub ip: Ipv4Addr,
    veth: String,
    place: Place,
}

/// What a node created, by name, to check that it is all gone after the node is dropped.
#[derive(Clone, Debug)]
pub struct Footprint {
    /// Name and inode (the namespace's identity) of each netns.
    netns: Vec<(String, u64)>,
    links: Vec<String>,
    cgroups: Vec<PathBuf>,
}

impl Node {
    /// Creates the node netns (forwarding on, service CIDR blackholed, kube-proxy's chains) and
    /// the pods' parent cgroup. `run_name` only labels messages; names come from a unique prefix.
    pub fn new(run_name: &str) -> Result<Node> {
        let cgroup_root = cgroup2_mount()?;
        let prefix = unique_prefix(&cgroup_root)?;
        let processes = Arc::<Processes>::default();
        let mut node = Node {
            run_name: run_name.to_string(),
            place: Place {
                netns: format!("{prefix}-node"),
                cgroup: None,
                processes: processes.clone(),
            },
            pods_cgroup: cgroup_root.join(format!("{prefix}-pods")),
            prefix,
            pods: Vec::new(),
            next_pod: 0,
            ipv6: false,
            services: BTreeMap::new(),
            processes,
            created: Vec::new(),
        };
        // From here on, an early return drops `node`, which removes whatever was created.
        let netns = node.place.netns.clone();
        node.create_netns(&netns)?;
        node.configure_node_network()
            .with_context(|| format!("setting up {netns}"))?;
        let pods_cgroup = node.pods_cgroup.clone();
        node.create_cgroup(&pods_cgroup)?;
        node.install_kube_proxy_chains()?;
        Ok(node)
    }

    /// The prefix of every name this node uses.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The node netns's name (under /run/netns), where the agent runs.
    pub fn netns(&self) -> &str {
        &self.place.netns
    }

    /// The parent of the pods' cgroups: where to attach cgroup eBPF programs.
    pub fn pods_cgroup(&self) -> &Path {
        &self.pods_cgroup
    }

    /// The pods added so far, in order.
    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// Adds a pod with `ip`, its netns `<prefix>-p<N>`, veth `<prefix>v<N>` and cgroup
    /// `<pods cgroup>/pod<uid>` (kubelet's naming, so the agent can map a cgroup to a pod).
    pub fn add_pod(&mut self, namespace: &str, name: &str, uid: &str, ip: Ipv4Addr) -> Result<Pod> {
        ensure!(
            !uid.is_empty() && !uid.contains('/'),
            "pod uid {uid:?} cannot name a cgroup"
        );
        ensure!(
            !self.pods.iter().any(|p| p.ip == ip),
            "{ip} is already a pod's address"
        );
        // A counter, not pods.len(): a failed add_pod leaves names behind until the node drops.
        let index = self.next_pod;
        self.next_pod += 1;
        let netns = format!("{}-p{index}", self.prefix);
        let veth = format!("{}v{index}", self.prefix);
        ensure!(
            veth.len() <= 15,
            "interface name {veth} is longer than 15 bytes"
        );
        let cgroup = self.pods_cgroup.join(format!("pod{uid}"));
        self.create_pod_resources(&netns, &veth, ip, &cgroup)
            .with_context(|| {
                format!(
                    "adding pod {namespace}/{name} ({ip}) to node {}",
                    self.run_name
                )
            })?;

        let pod = Pod {
            namespace: namespace.to_string(),
            name: name.to_string(),
            uid: uid.to_string(),
            ip,
            veth,
            place: Place {
                netns,
                cgroup: Some(cgroup),
                processes: self.processes.clone(),
            },
        };
        self.pods.push(pod.clone());
        Ok(pod)
    }

    /// Gives `pod` the IPv6 address `ip6` as well, reaching the node's [`AGENT_ADDR6`] on-link;
    /// the first time, the node gets that address and a blackholed [`SERVICE_CIDR6`].
    pub fn give_ipv6(&mut self, pod: &Pod, ip6: Ipv6Addr) -> Result<()> {
        let node = self.netns().to_string();
        let agent = format!("{AGENT_ADDR6}/128");
        if !self.ipv6 {
            ip(["-n", &node, "addr", "add", &agent, "dev", "lo", "nodad"])?;
            ip(["-n", &node, "route", "add", "blackhole", SERVICE_CIDR6])?;
            self.ipv6 = true;
        }
        // Neighbour discovery answers only for an interface's own addresses (unlike ARP).
        ip([
            "-n", &node, "addr", "add", &agent, "dev", &pod.veth, "nodad",
        ])?;
        ip([
            "-n",
            &node,
            "route",
            "add",
            &format!("{ip6}/128"),
            "dev",
            &pod.veth,
        ])?;
        let netns = pod.place.netns.as_str();
        ip([
            "-n",
            netns,
            "addr",
            "add",
            &format!("{ip6}/128"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        route_default_via(netns, AGENT_ADDR6.into()).with_context(|| {
            format!(
                "giving pod {}/{} the address {ip6}",
                pod.namespace, pod.name
            )
        })
    }

    /// Whether [`Node::give_ipv6`] made this a dual-stack node.
    pub fn has_ipv6(&self) -> bool {
        self.ipv6
    }

    /// Starts `cmd` in the node netns (not in any pod's cgroup); killed when the node drops.
    pub fn spawn(&self, cmd: &mut Command) -> Result<Child> {
        self.place.spawn(cmd)
    }

    /// Creates `<pods cgroup>/agent`: where a DaemonSet's agent runs on a real node (a pod's
    /// cgroup, under the cgroup its programs attach to), e.g. for `--local-sockets`.
    pub fn add_agent_cgroup(&mut self) -> Result<PathBuf> {
        let dir = self.pods_cgroup.join("agent");
        self.create_cgroup(&dir)?;
        Ok(dir)
    }

    /// Starts `cmd` in the node netns and in `cgroup`; killed when the node drops.
    pub fn spawn_in_cgroup(&self, cgroup: &Path, cmd: &mut Command) -> Result<Child> {
        Place {
            cgroup: Some(cgroup.to_owned()),
            ..self.place.clone()
        }
        .spawn(cmd)
    }

    /// Runs `cmd` to completion in the node netns, killing it after `timeout`.
    pub fn run_output(&self, cmd: &mut Command, timeout: Duration) -> Result<Output> {
        self.place.run_output(cmd, timeout)
    }

    /// Runs `f` on a thread in the node netns (the thread stays in this process's cgroup).
    pub fn in_netns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        self.place.in_netns(f)
    }

    /// Waits until something in the node netns accepts TCP connections on `addr`.
    pub fn wait_for_listener(&self, addr: SocketAddrV4, timeout: Duration) -> Result<()> {
        self.place.wait_for_listener(addr, timeout)
    }

    /// Simulated kube-proxy: TCP to `vip:port` from pods (PREROUTING) and from the node itself
    /// (OUTPUT) is DNATed to one of `endpoints`, chosen uniformly at random with kube-proxy's
    /// chain of `statistic` rules. Replaces an earlier definition of the same VIP:port.
    pub fn dnat_service(
        &mut self,
        vip: Ipv4Addr,
        port: u16,
        endpoints: &[(Ipv4Addr, u16)],
    ) -> Result<()> {
        ensure!(
            !endpoints.is_empty(),
            "service {vip}:{port} needs at least one endpoint"
        );
        if self.services.contains_key(&(vip, port)) {
            self.remove_service(vip, port)?;
        }
        let context = || format!("DNAT of {vip}:{port} on node {}", self.run_name);
        for (index, &endpoint) in endpoints.iter().enumerate() {
            self.add_endpoint_chain(vip, port, index, endpoint)
                .with_context(context)?;
        }
        self.add_service_chain(vip, port, endpoints.len())
            .with_context(context)?;
        // Hooked last, so that no connection meets a half-built service.
        self.hook_service("-A", vip, port).with_context(context)?;
        self.services.insert((vip, port), endpoints.len());
        Ok(())
    }

    /// Removes the DNAT of `vip:port`; the VIP is blackholed again.
    pub fn remove_service(&mut self, vip: Ipv4Addr, port: u16) -> Result<()> {
        let endpoints = self
            .services
            .remove(&(vip, port))
            .ok_or_else(|| anyhow!("no service {vip}:{port}"))?;
        // Unhooked first, then the chains it jumped to.
        self.hook_service("-D", vip, port)?;
        let chains = std::iter::once(service_chain(vip, port))
            .chain((0..endpoints).map(|i| endpoint_chain(vip, port, i)));
        for chain in chains {
            self.iptables(["-F", &chain])?;
            self.iptables(["-X", &chain])?;
        }
        Ok(())
    }

    /// Joins this node to `other` by a routed link (a veth pair, `link` a /30 like
    /// `172.31.255.0/30`: .1 here, .2 there), and routes each node's pod addresses (`pods_here`,
    /// `pods_there`: CIDRs or single addresses) over it, as a CNI routes between nodes. The pair
    /// is made in this node and removed with it (its other end goes with it).
    pub fn link_to(
        &mut self,
        other: &Node,
        link: Ipv4Addr,
        pods_here: &[String],
        pods_there: &[String],
    ) -> Result<()> {
        let [a, b, c, d] = link.octets();
        let (here_addr, there_addr) =
            (Ipv4Addr::new(a, b, c, d + 1), Ipv4Addr::new(a, b, c, d + 2));
        let (here, there) = (self.netns().to_string(), other.netns().to_string());
        let (here_end, there_end) = (format!("{}n0", self.prefix), format!("{}n1", self.prefix));
        ensure!(
            here_end.len() <= 15,
            "interface name {here_end} is longer than 15 bytes"
        );
        ip([
            "-n", &here, "link", "add", &here_end, "type", "veth", "peer", "name", &there_end,
            "netns", &there,
        ])?;
        self.created.push(Resource::Link {
            netns: here.clone(),
            name: here_end.clone(),
        });
        for (netns, end, addr, peer, pods) in [
            (&here, &here_end, here_addr, there_addr, pods_there),
            (&there, &there_end, there_addr, here_addr, pods_here),
        ] {
            ip([
                "-n",
                netns,
                "addr",
                "add",
                &format!("{addr}/30"),
                "dev",
                end,
            ])?;
            ip(["-n", netns, "link", "set", end, "up"])?;
            for destination in pods {
                ip([
                    "-n",
                    netns,
                    "route",
                    "add",
                    destination,
                    "via",
                    &peer.to_string(),
                ])?;
            }
        }
        Ok(())
    }

    /// Everything this node created, by name, for [`Footprint::remaining`] after the drop.
    pub fn footprint(&self) -> Footprint {
        let mut footprint = Footprint {
            netns: Vec::new(),
            links: Vec::new(),
            cgroups: Vec::new(),
        };
        for resource in &self.created {
            match resource {
                Resource::Netns { name, inode } => footprint.netns.push((name.clone(), *inode)),
                Resource::Link { name, .. } => footprint.links.push(name.clone()),
                Resource::Cgroup(dir) => footprint.cgroups.push(dir.clone()),
            }
        }
        footprint
    }

    fn create_pod_resources(
        &mut self,
        netns: &str,
        veth: &str,
        ip: Ipv4Addr,
        cgroup: &Path,
    ) -> Result<()> {
        self.create_netns(netns)?;
        self.create_veth(veth, netns)?;
        configure_pod_side(netns, ip)?;
        self.configure_node_side(veth, ip)?;
        self.create_cgroup(cgroup)
    }

    fn create_netns(&mut self, name: &str) -> Result<()> {
        ip(["netns", "add", name])?;
        // The inode identifies the namespace itself, to tell later whether anything still holds it.
        let inode = std::fs::metadata(netns_path(name))
            .map(|m| m.ino())
            .unwrap_or(0);
        self.created.push(Resource::Netns {
            name: name.to_string(),
            inode,
        });
        Ok(())
    }

    fn create_cgroup(&mut self, dir: &Path) -> Result<()> {
        std::fs::create_dir(dir).with_context(|| format!("creating cgroup {}", dir.display()))?;
        self.created.push(Resource::Cgroup(dir.to_owned()));
        Ok(())
    }

    /// Both ends are made inside the node netns, the pod's end moved straight into the pod netns,
    /// so neither ever exists in the root netns.
    fn create_veth(&mut self, veth: &str, pod_netns: &str) -> Result<()> {
        let node = self.netns().to_string();
        ip([
            "-n", &node, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns",
            pod_netns,
        ])?;
        self.created.push(Resource::Link {
            netns: node,
            name: veth.to_string(),
        });
        Ok(())
    }

    fn configure_node_side(&self, veth: &str, pod_ip: Ipv4Addr) -> Result<()> {
        let node = self.netns();
        ip([
            "-n",
            node,
            "addr",
            "add",
            &format!("{AGENT_ADDR}/32"),
            "dev",
            veth,
        ])?;
        ip(["-n", node, "link", "set", veth, "up"])?;
        ip([
            "-n",
            node,
            "route",
            "add",
            &format!("{pod_ip}/32"),
            "dev",
            veth,
        ])
    }

    fn configure_node_network(&self) -> Result<()> {
        let node = self.netns();
        ip(["-n", node, "link", "set", "lo", "up"])?;
        ip([
            "-n",
            node,
            "addr",
            "add",
            &format!("{AGENT_ADDR}/32"),
            "dev",
            "lo",
        ])?;
        self.run_checked(Command::new("sysctl").args(["-w", "net.ipv4.ip_forward=1"]))?;
        self.route_service_cidr()
    }

    /// Pod traffic to a VIP that kube-proxy did not DNAT is forwarded by the main table into a
    /// blackhole. The node's own connections consult the route at connect(), before nat OUTPUT:
    /// a blackhole would fail them with EINVAL before any DNAT, so locally made traffic (`iif lo`)
    /// looks up a table that sends the CIDR to lo instead; nat OUTPUT then reroutes what it DNATs
    /// and what it does not is dropped, as before.
    fn route_service_cidr(&self) -> Result<()> {
        let node = self.netns();
        ip(["-n", node, "route", "add", "blackhole", SERVICE_CIDR])?;
        let src = AGENT_ADDR.to_string();
        ip([
            "-n",
            node,
            "route",
            "add",
            SERVICE_CIDR,
            "dev",
            "lo",
            "src",
            &src,
            "table",
            LOCAL_SERVICES_TABLE,
        ])?;
        let table = LOCAL_SERVICES_TABLE;
        ip([
            "-n",
            node,
            "rule",
            "add",
            "iif",
            "lo",
            "to",
            SERVICE_CIDR,
            "lookup",
            table,
            "pref",
            table,
        ])
    }

    /// kube-proxy's entry chain, and masquerading of hairpin traffic (an endpoint reaching itself
    /// through its VIP would otherwise get a reply from its own address).
    fn install_kube_proxy_chains(&self) -> Result<()> {
        self.iptables(["-N", SERVICES_CHAIN])?;
        self.iptables(["-A", "PREROUTING", "-j", SERVICES_CHAIN])?;
        self.iptables(["-A", "OUTPUT", "-j", SERVICES_CHAIN])?;
        self.iptables([
            "-A",
            "POSTROUTING",
            "-m",
            "mark",
            "--mark",
            MASQUERADE_MARK,
            "-j",
            "MASQUERADE",
        ])
    }

    fn add_endpoint_chain(
        &self,
        vip: Ipv4Addr,
        port: u16,
        index: usize,
        (ip, target): (Ipv4Addr, u16),
    ) -> Result<()> {
        let chain = endpoint_chain(vip, port, index);
        self.iptables(["-N", &chain])?;
        self.iptables([
            "-A",
            &chain,
            "-s",
            &format!("{ip}/32"),
            "-j",
            "MARK",
            "--set-xmark",
            MASQUERADE_MARK,
        ])?;
        self.iptables([
            "-A",
            &chain,
            "-p",
            "tcp",
            "-j",
            "DNAT",
            "--to-destination",
            &format!("{ip}:{target}"),
        ])
    }

    /// Rule i of n is taken with probability 1/(n-i), so each endpoint gets 1/n overall.
    fn add_service_chain(&self, vip: Ipv4Addr, port: u16, endpoints: usize) -> Result<()> {
        let chain = service_chain(vip, port);
        self.iptables(["-N", &chain])?;
        for index in 0..endpoints {
            let mut rule = vec!["-A".to_string(), chain.clone()];
            let left = endpoints - index;
            if left > 1 {
                let probability = format!("{:.10}", 1.0 / left as f64);
                rule.extend(
                    [
                        "-m",
                        "statistic",
                        "--mode",
                        "random",
                        "--probability",
                        &probability,
                    ]
                    .map(String::from),
                );
            }
            rule.extend(["-j".to_string(), endpoint_chain(vip, port, index)]);
            self.iptables(rule)?;
        }
        Ok(())
    }

    /// Appends (`-A`) or deletes (`-D`) the services chain's jump for `vip:port`.
    fn hook_service(&self, operation: &str, vip: Ipv4Addr, port: u16) -> Result<()> {
        let (destination, port_text) = (format!("{vip}/32"), port.to_string());
        let chain = service_chain(vip, port);
        self.iptables([
            operation,
            SERVICES_CHAIN,
            "-d",
            &destination,
            "-p",
            "tcp",
            "--dport",
            &port_text,
            "-j",
            &chain,
        ])
    }

    /// `iptables -t nat ARGS` in the node netns (`-w`: wait for the lock other netns share).
    fn iptables<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(&self, args: I) -> Result<()> {
        self.run_checked(
            Command::new("iptables")
                .args(["-w", "5", "-t", "nat"])
                .args(args),
        )
        .map(drop)
    }

    fn run_checked(&self, cmd: &mut Command) -> Result<String> {
        let description = format!("{cmd:?} in {}", self.netns());
        checked(
            self.place
                .run_output(cmd, crate::harness_timeout(COMMAND_TIMEOUT))?,
            &description,
        )
    }
}

impl Drop for Node {
    /// Kills what was spawned, then removes everything in reverse order of creation (so a process
    /// is gone before its netns, a link before its netns, a pod cgroup before its parent).
    /// Failures are printed: a destructor must not panic, and later steps should still run.
    fn drop(&mut self) {
        self.processes.kill_all();
        for resource in self.created.drain(..).rev() {
            if let Err(e) = resource.remove() {
                eprintln!(
                    "node harness {}: could not remove {resource:?}: {e:#}",
                    self.run_name
                );
            }
        }
    }
}

impl Pod {
    /// The pod's netns name (under /run/netns).
    pub fn netns(&self) -> &str {
        &self.place.netns
    }

    /// The pod's cgroup directory, `.../pod<uid>`.
    pub fn cgroup(&self) -> &Path {
        self.place.cgroup.as_deref().expect("a pod has a cgroup")
    }

    /// The node side of the pod's veth pair (in the node netns).
    pub fn veth(&self) -> &str {
        &self.veth
    }

    /// Starts `cmd` in the pod's netns and cgroup; killed when the node drops.
    pub fn spawn(&self, cmd: &mut Command) -> Result<Child> {
        self.place.spawn(cmd)
    }

    /// Runs `cmd` (e.g. curl) to completion in the pod's netns and cgroup, killing it after
    /// `timeout`.
    pub fn run_output(&self, cmd: &mut Command, timeout: Duration) -> Result<Output> {
        self.place.run_output(cmd, timeout)
    }

    /// Runs `cmd` in this pod's netns but in `impostor`'s cgroup: a process that sends from this
    /// pod's IP without being this pod (for tests of caller identity).
    pub fn run_output_impersonated_by(
        &self,
        impostor: &Pod,
        cmd: &mut Command,
        timeout: Duration,
    ) -> Result<Output> {
        let place = Place {
            netns: self.place.netns.clone(),
            cgroup: impostor.place.cgroup.clone(),
            processes: self.place.processes.clone(),
        };
        place.run_output(cmd, timeout)
    }

    /// Runs `f` on a thread in the pod's netns. Not in the pod's cgroup (a cgroup holds whole
    /// processes), so cgroup eBPF programs attached for pods do not see it.
    pub fn in_netns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        self.place.in_netns(f)
    }

    /// Waits until something in the pod accepts TCP connections on its address and `port`.
    pub fn wait_for_port(&self, port: u16, timeout: Duration) -> Result<()> {
        self.place
            .wait_for_listener(SocketAddrV4::new(self.ip, port), timeout)
    }
}

impl Footprint {
    /// What is still there: a netns listed by `ip netns list` or still held by a process, a link
    /// of that name in the root netns (there should never be one), a cgroup directory.
    pub fn remaining(&self) -> Vec<String> {
        let listed = ip_output(["netns", "list"]).unwrap_or_default();
        let listed: Vec<&str> = listed
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        let held = netns_inodes_in_use();
        let mut remaining = Vec::new();
        for (name, inode) in &self.netns {
            if listed.contains(&name.as_str()) {
                remaining.push(format!("netns {name} is listed"));
            }
            if held.contains(inode) {
                remaining.push(format!(
                    "netns {name} (inode {inode}) is still held by a process"
                ));
            }
        }
        for link in &self.links {
            if ip(["link", "show", link]).is_ok() {
                remaining.push(format!("link {link} exists in the root netns"));
            }
        }
        for dir in &self.cgroups {
            if dir.exists() {
                remaining.push(format!("cgroup {} exists", dir.display()));
            }
        }
        remaining
    }
}

/// Where processes go: a netns, and for pods a cgroup.
#[derive(Clone, Debug)]
struct Place {
    netns: String,
    cgroup: Option<PathBuf>,
    processes: Arc<Processes>,
}

impl Place {
    fn spawn(&self, cmd: &mut Command) -> Result<Child> {
        let child = self.spawn_untracked(cmd)?;
        self.processes.track(&child);
        Ok(child)
    }

    fn run_output(&self, cmd: &mut Command, timeout: Duration) -> Result<Output> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = self.spawn_untracked(cmd)?;
        wait_output(child, timeout).with_context(|| format!("{cmd:?} in {}", self.netns))
    }

    /// Joins the cgroup and the netns between fork and exec. Not `ip netns exec`: it also
    /// remounts /sys for the new netns, which hides the cgroup tree from the process.
    fn spawn_untracked(&self, cmd: &mut Command) -> Result<Child> {
        let netns = cstring(netns_path(&self.netns).as_os_str())?;
        let procs = self
            .cgroup
            .as_ref()
            .map(|dir| cstring(dir.join("cgroup.procs").as_os_str()))
            .transpose()?;
        // SAFETY: the hook only makes raw syscalls (no allocation, no locks), as required after fork.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(procs) = &procs {
                    write_own_pid(procs)?;
                }
                join_netns(&netns)
            });
        }
        cmd.spawn()
            .with_context(|| format!("starting {cmd:?} in {}", self.netns))
    }

    fn in_netns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let netns = cstring(netns_path(&self.netns).as_os_str())?;
        // A netns is per thread: a fresh thread joins it and ends with the closure.
        let result = std::thread::scope(|scope| {
            let thread = scope.spawn(|| -> io::Result<T> {
                join_netns(&netns)?;
                Ok(f())
            });
            thread
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        });
        result.with_context(|| format!("entering netns {}", self.netns))
    }

    fn wait_for_listener(&self, addr: SocketAddrV4, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let connected = self.in_netns(|| loop {
            let attempt =
                TcpStream::connect_timeout(&SocketAddr::V4(addr), Duration::from_millis(200));
            if attempt.is_ok() || Instant::now() >= deadline {
                return attempt;
            }
            std::thread::sleep(Duration::from_millis(50));
        })?;
        connected.map(drop).with_context(|| {
            format!(
                "nothing listens on {addr} in {} after {timeout:?}",
                self.netns
            )
        })
    }
}

/// The processes spawned by a node and its pods, as pidfds: killing through a pidfd cannot hit
/// another process that reused the pid after the caller reaped ours.
#[derive(Debug, Default)]
struct Processes(Mutex<Vec<OwnedFd>>);

impl Processes {
    fn track(&self, child: &Child) {
        match pidfd_open(child.id()) {
            Ok(pidfd) => self
                .0
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .push(pidfd),
            Err(e) => eprintln!(
                "node harness: cannot track pid {} (not killed on drop): {e}",
                child.id()
            ),
        }
    }

    /// SIGKILLs every tracked process, waits (bounded) until they have exited, which is when they
    /// have let go of their namespaces, and reaps them so that no zombie outlives the node.
    fn kill_all(&self) {
        let tracked = std::mem::take(
            &mut *self
                .0
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        );
        for pidfd in &tracked {
            if let Err(e) = pidfd_kill(pidfd) {
                eprintln!("node harness: kill: {e}");
            }
        }
        let deadline = Instant::now() + crate::harness_timeout(EXIT_TIMEOUT);
        let mut alive = 0;
        for pidfd in &tracked {
            if wait_exit(pidfd, deadline.saturating_duration_since(Instant::now())) {
                reap(pidfd);
            } else {
                alive += 1;
            }
        }
        if alive > 0 {
            eprintln!(
                "node harness: {alive} killed process(es) still running after {EXIT_TIMEOUT:?}"
            );
        }
    }
}

/// Something a node created, removed on drop.
#[derive(Debug)]
enum Resource {
    Netns { name: String, inode: u64 },
    Link { netns: String, name: String },
    Cgroup(PathBuf),
}

impl Resource {
    fn remove(&self) -> Result<()> {
        match self {
            Resource::Netns { name, .. } => ignore_missing(ip(["netns", "del", name])),
            Resource::Link { netns, name } => {
                ignore_missing(ip(["-n", netns, "link", "del", name]))
            }
            Resource::Cgroup(dir) => remove_cgroup(dir),
        }
    }
}

/// Kills whatever is in the cgroup (also grandchildren nobody tracked), waits for it to empty,
/// then removes it.
fn remove_cgroup(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    // cgroup.kill (Linux 5.14+) kills atomically, forks racing it included; older kernels get
    // SIGKILL to every pid listed, repeated below until the cgroup is empty.
    let has_kill_file = dir.join("cgroup.kill").exists();
    if has_kill_file {
        std::fs::write(dir.join("cgroup.kill"), "1").context("writing cgroup.kill")?;
    }
    let deadline = Instant::now() + crate::harness_timeout(EXIT_TIMEOUT);
    while std::fs::read_to_string(dir.join("cgroup.events"))?.contains("populated 1") {
        if !has_kill_file {
            kill_cgroup_processes(dir)?;
        }
        ensure!(
            Instant::now() < deadline,
            "processes still in {} after {EXIT_TIMEOUT:?}",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::remove_dir(dir).with_context(|| format!("removing {}", dir.display()))
}

/// SIGKILLs the processes of `dir` and of the cgroups below it.
fn kill_cgroup_processes(dir: &Path) -> Result<()> {
    let procs = std::fs::read_to_string(dir.join("cgroup.procs"))
        .with_context(|| format!("reading {}/cgroup.procs", dir.display()))?;
    for pid in procs
        .lines()
        .filter_map(|l| l.trim().parse::<libc::pid_t>().ok())
    {
        // SAFETY: kill(2) has no memory preconditions; a pid that exited meanwhile gives ESRCH.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            kill_cgroup_processes(&entry.path())?;
        }
    }
    Ok(())
}

/// The mount point of the cgroup v2 hierarchy (paths with spaces, escaped in mountinfo, are not
/// expected here).
fn cgroup2_mount() -> Result<PathBuf> {
    let mountinfo =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    mountinfo
        .lines()
        .find_map(|line| {
            // "<id> <parent> <dev> <root> <mount point> <options> [optional...] - <fstype> ..."
            let (left, right) = line.split_once(" - ")?;
            let is_cgroup2 = right.split(' ').next()? == "cgroup2";
            left.split(' ')
                .nth(4)
                .filter(|_| is_cgroup2)
                .map(PathBuf::from)
        })
        .ok_or_else(|| anyhow!("no cgroup v2 hierarchy is mounted"))
}

/// `gn` + the last 4 digits of the pid + a per-process counter: short enough for interface names
/// (`<prefix>v<N>` ≤ 15 bytes) and distinct between concurrent runs and nodes of one run.
fn unique_prefix(cgroup_root: &Path) -> Result<String> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let pid = std::process::id() % 10_000;
    for _ in 0..100 {
        let prefix = format!("gn{pid:04}{}", NEXT.fetch_add(1, Ordering::Relaxed));
        // Another process whose pid ends in the same 4 digits may hold some names.
        let taken = netns_path(&format!("{prefix}-node")).exists()
            || cgroup_root.join(format!("{prefix}-pods")).exists();
        if !taken {
            return Ok(prefix);
        }
    }
    bail!("no free name prefix for pid {pid}")
}

/// The pod's side of its veth pair: its address, and everything routed via the node on-link.
fn configure_pod_side(netns: &str, ip_addr: Ipv4Addr) -> Result<()> {
    ip(["-n", netns, "link", "set", "lo", "up"])?;
    ip([
        "-n",
        netns,
        "addr",
        "add",
        &format!("{ip_addr}/32"),
        "dev",
        "eth0",
    ])?;
    ip(["-n", netns, "link", "set", "eth0", "up"])?;
    route_default_via(netns, AGENT_ADDR.into())
}

/// The pod's default route of `agent`'s family: to the node's agent address, on-link.
fn route_default_via(netns: &str, agent: std::net::IpAddr) -> Result<()> {
    let agent = agent.to_string();
    ip([
        "-n", netns, "route", "add", "default", "via", &agent, "dev", "eth0", "onlink",
    ])
}

fn service_chain(vip: Ipv4Addr, port: u16) -> String {
    format!("GN-SVC-{:08x}-{port}", u32::from(vip))
}

fn endpoint_chain(vip: Ipv4Addr, port: u16, index: usize) -> String {
    format!("GN-SEP-{:08x}-{port}-{index}", u32::from(vip))
}

fn netns_path(name: &str) -> PathBuf {
    Path::new("/run/netns").join(name)
}

/// Inodes of every netns some thread of some process is in.
fn netns_inodes_in_use() -> Vec<u64> {
    let Ok(processes) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    processes
        .flatten()
        .filter_map(|p| std::fs::read_dir(p.path().join("task")).ok())
        .flat_map(|tasks| tasks.flatten())
        .filter_map(|task| std::fs::metadata(task.path().join("ns/net")).ok())
        .map(|meta| meta.ino())
        .collect()
}

/// `ip ARGS`, bounded; its stderr is the error.
fn ip<const N: usize>(args: [&str; N]) -> Result<()> {
    ip_output(args).map(drop)
}

/// `ip ARGS`, bounded; its stdout, or its stderr as the error.
fn ip_output<const N: usize>(args: [&str; N]) -> Result<String> {
    let mut cmd = Command::new("ip");
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().context("starting ip")?;
    checked(
        wait_output(child, crate::harness_timeout(COMMAND_TIMEOUT))?,
        &format!("ip {}", args.join(" ")),
    )
}

fn checked(output: Output, description: &str) -> Result<String> {
    ensure!(
        output.status.success(),
        "{description}: {} {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Cleanup of something already gone (e.g. a link removed with its netns) is not an error.
fn ignore_missing(result: Result<()>) -> Result<()> {
    match result {
        Err(e)
            if ["No such file", "Cannot find device", "does not exist"]
                .iter()
                .any(|m| format!("{e}").contains(m)) =>
        {
            Ok(())
        }
        other => other,
    }
}

/// Collects a child's output; after `timeout` kills it and fails.
fn wait_output(child: Child, timeout: Duration) -> Result<Output> {
    // Opened before the waiting thread can reap the child, so it names this very process.
    let pidfd = pidfd_open(child.id()).context("pidfd_open")?;
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || sender.send(child.wait_with_output()));
    match receiver.recv_timeout(timeout) {
        Ok(output) => Ok(output?),
        Err(_) => {
            pidfd_kill(&pidfd)?;
            bail!("timed out after {timeout:?} (killed)")
        }
    }
}

fn cstring(s: &OsStr) -> Result<CString> {
    CString::new(s.as_bytes()).with_context(|| format!("{s:?} contains a NUL byte"))
}

/// Moves the calling process into a cgroup. Async-signal-safe: runs between fork and exec.
fn write_own_pid(cgroup_procs: &CStr) -> io::Result<()> {
    let mut digits = [0u8; 10];
    // SAFETY: getpid has no preconditions.
    let pid = decimal(unsafe { libc::getpid() } as u32, &mut digits);
    let fd = open(cgroup_procs, libc::O_WRONLY)?;
    // SAFETY: writes `pid.len()` bytes from a live buffer to an open fd.
    if unsafe { libc::write(fd.as_raw_fd(), pid.as_ptr().cast(), pid.len()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Moves the calling thread into a netns. Async-signal-safe: runs between fork and exec.
fn join_netns(netns: &CStr) -> io::Result<()> {
    let fd = open(netns, libc::O_RDONLY)?;
    // SAFETY: setns on an open nsfs fd; CLONE_NEWNET only changes this thread's netns.
    if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn open(path: &CStr, flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: `path` is NUL-terminated; the returned fd is owned by nobody else.
    let fd = unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is valid.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `n` in decimal, written at the end of `buf` without allocating.
fn decimal(mut n: u32, buf: &mut [u8; 10]) -> &[u8] {
    let mut start = buf.len();
    loop {
        start -= 1;
        buf[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[start..];
        }
    }
}

fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// SIGKILL through a pidfd; a process that already exited is not an error.
fn pidfd_kill(pidfd: &OwnedFd) -> io::Result<()> {
    // SAFETY: a valid pidfd, a signal number, no siginfo, no flags.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<()>(),
            0,
        )
    };
    let error = io::Error::last_os_error();
    if rc == 0 || error.raw_os_error() == Some(libc::ESRCH) {
        return Ok(());
    }
    Err(error)
}

/// Collects an exited child's status. A caller that already waited for it gets ECHILD here, and
/// one that waits after the node dropped gets ECHILD there: either way, no zombie is left.
fn reap(pidfd: &OwnedFd) {
    // SAFETY: siginfo_t is plain data; waitid fills it.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pidfd of a child, a valid siginfo_t to fill, and WNOHANG.
    unsafe {
        libc::waitid(
            libc::P_PIDFD,
            pidfd.as_raw_fd() as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG,
        )
    };
}

/// Whether the process has exited, waiting up to `timeout` (a pidfd becomes readable on exit).
fn wait_exit(pidfd: &OwnedFd, timeout: Duration) -> bool {
    let mut poll = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let millis = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut poll, 1, millis) > 0 }
}
