//! `proxy-agent`: gamma-node's per-node GAMMA proxy.

use anyhow::{Context as _, Result};
use clap::Parser;
use proxy_agent::agent::{
    self, AfterTakeover, AgentConfig, ClusterConfig, ListenSpec, RedirectConfig, TakeoverConfig,
};
use proxy_agent::proxy::ProxyConfig;
use proxy_agent::sources::kube::KubeConfig;
use proxy_agent::status::StatusConfig;
use proxy_agent::telemetry::log_writer::{self, LogWriter};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(version, about = "Per-node GAMMA (Gateway API mesh) proxy")]
struct Cli {
    /// Folder of YAML manifests (Services, EndpointSlices, Pods, HTTPRoutes, GRPCRoutes),
    /// loaded at start and watched for changes.
    #[arg(
        long,
        value_name = "DIR",
        required_unless_present_any = ["kube", "print_rbac", "print_flags", "clear_status", "probe_ready_file"],
        conflicts_with = "kube"
    )]
    manifests: Option<PathBuf>,
    /// Follow a Kubernetes cluster (kubeconfig from KUBECONFIG or ~/.kube/config, else the
    /// in-cluster ServiceAccount) and write route status while holding the status lease.
    #[arg(long)]
    kube: bool,
    /// A request to the API server whose answer brings no byte for this long (its head, or a gap
    /// in its body) fails and is retried (a list on a connection gone silent: the API server's
    /// host lost behind a VIP; a stream stalled behind an HTTP/2 proxy). Over HTTP/2 the
    /// connection's PINGs find a silent connection first, within 30 + 15 s. Keep it longer than
    /// a watch's 290 s, which the server ends itself: shorter, quiet kinds' watches fail and are
    /// listed again.
    #[arg(long, default_value_t = 300)]
    api_read_timeout_s: u64,
    /// This node's name (default: $NODE_NAME, from the downward API): only its Pods and its Node
    /// object are watched, and `internalTrafficPolicy: Local` and topology hints pick endpoints
    /// for it.
    #[arg(long, value_name = "NAME")]
    node_name: Option<String>,
    /// This agent's Pod name (default: $POD_NAME, from the downward API): its identity in the
    /// status lease. Not the node's name: during a DaemonSet surge an old and a new agent run on
    /// one node, and only one of them may write status. Outside a Pod: the host name and the
    /// process ID.
    #[arg(long, value_name = "NAME")]
    pod_name: Option<String>,
    /// Namespace of the status lease (default: $POD_NAMESPACE, else gamma-system).
    #[arg(long, value_name = "NS")]
    lease_namespace: Option<String>,
    /// Name of the status lease.
    #[arg(long, value_name = "NAME", default_value = "gamma-node-status")]
    lease_name: String,
    /// Print the Kubernetes API calls the agent makes, as RBAC rules in JSON, and exit.
    #[arg(long)]
    print_rbac: bool,
    /// For an uninstall, once the DaemonSet is gone: take this implementation's entries out of
    /// every route's status and empty its XMeshes' status (they would go on saying that routes
    /// nothing applies are Accepted), then exit. Refused while an agent holds the status lease.
    #[arg(long, conflicts_with_all = ["manifests", "kube"])]
    clear_status: bool,
    /// Print every flag of this command line as JSON (name, whether it takes a value, its
    /// default), and exit: what `cargo xtask check-deploy` checks the manifests' args against.
    #[arg(long)]
    print_flags: bool,
    /// Explicit listener: connections to ADDR are treated as sent to that Service port.
    #[arg(long, value_name = "ADDR=NAMESPACE/SERVICE:PORT")]
    listen: Vec<ListenSpec>,
    /// Namespace of the callers on explicit listeners (default: the Service's own).
    #[arg(long, value_name = "NS")]
    caller_namespace: Option<String>,
    /// Redirect listener: where the kernel steers pods' connections to mesh Services. Needs
    /// `--cgroup`. Pods must be able to reach this address. Dual-stack: the node's IPs of both
    /// families before one port, `10.0.0.5,fd00::5:15001` (the Downward API's `status.hostIPs`
    /// then `:PORT`): connections to a Service's IPv6 ClusterIP go to the IPv6 one.
    #[arg(long, value_name = "ADDR|IPS:PORT", requires = "cgroup")]
    redirect: Option<Addresses>,
    /// Redirect listener for Service ports that declare HTTP (appProtocol or port name): their
    /// clients speak first, so the agent accepts a connection only once its request came (one
    /// wakeup per connection instead of two). Pods must be able to reach it too (an egress
    /// NetworkPolicy must allow it as it allows --redirect). Default: the --redirect addresses,
    /// port + 1; `off`: every port goes to --redirect.
    #[arg(long, value_name = "ADDR|IPS:PORT|off", requires = "redirect")]
    redirect_http: Option<ClientFirstListener>,
    /// The cgroup v2 directory holding the pods whose connections are steered (e.g. kubepods).
    #[arg(long, value_name = "DIR", requires = "redirect")]
    cgroup: Option<PathBuf>,
    /// Node-local connections through the agent (a pod's to the agent, the agent's to a backend pod
    /// on this node) move their bytes socket to socket in the kernel, skipping TCP/IP, for the pods
    /// annotated gamma-node.io/local-sockets: "true", or in a Namespace so annotated (a Pod's own
    /// annotation, whatever its value, wins). The agent must run in a cgroup under
    /// --cgroup. Per pod, because the pod must read such a connection with read(2) or recv(2): one
    /// that uses splice(2) (a Go io.Copy between two TCP connections, haproxy's splicing) would not
    /// see the moved bytes; and keep up with it: moved bytes have no flow control (a socket that
    /// does not read lets its peer queue without bound, charged to its memory cgroup). An opaque or
    /// upgraded connection with a paired socket is copied, whatever --pump says (the agent asks
    /// the kernel per connection); the others are carried as --pump says.
    #[arg(long, requires = "redirect")]
    local_sockets: bool,
    /// Admin server (health, metrics, config dump, explain). Keep it on loopback.
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin: SocketAddr,
    /// Also serve `/metrics` (and nothing else) here, for Prometheus: on the host network the
    /// admin server's loopback is the node's, which no scraper in a pod reaches. Same forms as
    /// --redirect (`$(HOST_IPS):15090`). Off by default.
    #[arg(long, value_name = "ADDR|IPS:PORT")]
    metrics: Option<Addresses>,
    /// Keep this file present while this agent serves (synced, every listener up, not taken
    /// over or stopping), absent otherwise: the pod's own readiness, where the admin server's
    /// `/ready` is the node's (both agents of a takeover share its socket). In a folder of the
    /// pod's own (an emptyDir); `--probe-ready-file` reads it.
    #[arg(long, value_name = "PATH")]
    ready_file: Option<PathBuf>,
    /// Exit 0 if this file is present, 1 if not, and do nothing else: an exec readiness probe of
    /// `--ready-file` (the image has no shell).
    #[arg(long, value_name = "PATH", conflicts_with_all = ["manifests", "kube"])]
    probe_ready_file: Option<PathBuf>,
    /// Worker threads of the data plane (default: one per core).
    #[arg(long)]
    workers: Option<usize>,
    /// How often the manifest folder is checked for changes, in milliseconds.
    #[arg(long, default_value_t = 200)]
    poll_interval_ms: u64,
    /// On SIGTERM, how long in-flight requests may take to finish, in seconds.
    #[arg(long, default_value_t = 20)]
    drain_timeout_s: u64,
    /// Hitless restart: take the sockets and eBPF programs over from the agent running with the
    /// same PATH (it then drains and exits), and offer them to a successor started with it.
    /// Without a running agent there, a normal start.
    #[arg(long, value_name = "PATH")]
    takeover_socket: Option<PathBuf>,
    /// How long a running agent may take to hand over before it is given up on (this agent then
    /// starts as without one), in milliseconds.
    #[arg(long, default_value_t = 5_000, requires = "takeover_socket")]
    takeover_timeout_ms: u64,
    /// On a takeover, load this binary's eBPF programs and swap them in even when they are the
    /// running agent's (they are swapped anyway when they differ).
    #[arg(long, requires = "takeover_socket")]
    takeover_fresh_programs: bool,
    /// Once a successor took over and this agent drained: `exit`, or `wait` for SIGTERM (in a
    /// pod, so that the container is not restarted to take over back; see deploy/).
    #[arg(long, value_enum, default_value = "exit", requires = "takeover_socket")]
    after_takeover: AfterTakeover,
    /// Slowloris guard: a client must send a whole request head within this time, in
    /// milliseconds, or its connection is closed.
    #[arg(long, default_value_t = 10_000)]
    header_read_timeout_ms: u64,
    /// On Service ports that do not declare their protocol (appProtocol or port name), how long
    /// to wait for a client's first bytes before passing the connection through as opaque TCP,
    /// in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    detect_timeout_ms: u64,
    /// How long a mirrored request may take, its answer included, before it is abandoned and its
    /// slot freed, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    mirror_timeout_ms: u64,
    /// An opaque TCP or upgraded (WebSocket, CONNECT) connection that moves no byte for this many
    /// seconds is closed; an idle HTTP/2 client connection gets GOAWAY. 0: never. 24 h: as long
    /// as kube-proxy's conntrack keeps an idle flow through a ClusterIP (Envoy's 1 h closed idle
    /// database sessions and subscriptions that live without the mesh; TCP keepalive already
    /// finds a vanished peer within 2 minutes).
    #[arg(long, default_value_t = 24 * 3600)]
    idle_timeout_s: u64,
    /// How opaque TCP and upgraded connections move their bytes: `splice` (splice(2) through a
    /// pipe, in the kernel) or `copy` (through a buffer in the agent).
    #[arg(long, value_enum, default_value_t = proxy_agent::proxy::pump::Carry::Splice)]
    pump: proxy_agent::proxy::pump::Carry,
    /// Client connections open at most; one more is closed as soon as accepted (counted in
    /// gamma_connections_refused_at_cap_total).
    #[arg(long, default_value_t = 100_000)]
    max_connections: usize,
    /// How long a connect to an endpoint may take, in milliseconds, before the next endpoint is
    /// tried and this one set aside for a while. Above 1,000: Linux resends a SYN after 1 s.
    #[arg(long, default_value_t = proxy_agent::proxy::DEFAULT_CONNECT_TIMEOUT.as_millis() as u64)]
    connect_timeout_ms: u64,
    /// Milliseconds an idle pooled HTTP/1.1 upstream connection is kept: keep it below your
    /// backends' own keep-alive timeout (a request sent as a backend closes an idle connection
    /// fails, and only an idempotent one is sent again).
    #[arg(long, default_value_t = proxy_agent::proxy::upstream::PoolTimeouts::DEFAULT_HTTP1_IDLE.as_millis() as u64)]
    upstream_http1_idle_timeout_ms: u64,
    /// Before HTTP/1.1 got its own: set both. Now HTTP/2's, with a warning.
    #[arg(long, hide = true)]
    upstream_idle_timeout_s: Option<u64>,
    /// Seconds an idle pooled HTTP/2 upstream connection (one carrying no stream) is kept.
    #[arg(long, default_value_t = proxy_agent::proxy::upstream::PoolTimeouts::DEFAULT_HTTP2_IDLE.as_secs())]
    upstream_http2_idle_timeout_s: u64,
    /// A request body is kept while it streams, up to this many bytes, when a retry or a mirror
    /// may need it again (and a gRPC call's, for a stream its backend refuses); a larger one is
    /// neither retried nor mirrored (both counted).
    #[arg(long, default_value_t = 64 * 1024)]
    max_buffered_body_bytes: usize,
    /// Log format: `text` or `json`.
    #[arg(long, default_value = "text")]
    log_format: String,
}

/// Every long flag of the command line, from its definition.
fn flags_json() -> serde_json::Value {
    let command = <Cli as clap::CommandFactory>::command();
    let flags: Vec<serde_json::Value> = command
        .get_arguments()
        .filter_map(|arg| {
            let name = arg.get_long()?;
            let default: Vec<String> = arg
                .get_default_values()
                .iter()
                .map(|v| v.to_string_lossy().into_owned())
                .collect();
            Some(serde_json::json!({
                "name": name,
                "takesValue": arg.get_action().takes_values(),
                "default": default.first(),
            }))
        })
        .collect();
    serde_json::Value::Array(flags)
}

/// Raises the soft limit on open files to the hard one. Container runtimes (containerd 2,
/// Docker 29) and systemd start processes at a soft limit of 1024, to be raised by those that need
/// more: each relayed connection takes two descriptors or more (six for a splicing pump), and at
/// the soft limit accepts and connects fail long before `--max-connections`.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return;
    }
    let soft = limit.rlim_cur;
    if soft >= limit.rlim_max {
        return;
    }
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } == 0 {
        tracing::info!(
            from = soft,
            to = limit.rlim_max,
            "raised the open-files limit"
        );
    } else {
        let error = std::io::Error::last_os_error();
        tracing::warn!(soft, hard = limit.rlim_max, %error, "could not raise the open-files limit");
    }
}

/// `--idle-timeout-s`: 0 is never (Envoy's convention), as is anything past a century (a
/// deadline that far would overflow the clock).
fn idle_timeout(seconds: u64) -> Duration {
    const CENTURY: u64 = 100 * 365 * 24 * 3600;
    Duration::from_secs(if seconds == 0 {
        CENTURY
    } else {
        seconds.min(CENTURY)
    })
}

struct WrittenAtExit(LogWriter);

impl Drop for WrittenAtExit {
    fn drop(&mut self) {
        self.0.drain(std::time::Duration::from_secs(2));
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Some(file) = &cli.probe_ready_file {
        if file.exists() {
            return Ok(());
        }
        eprintln!(
            "not ready: {} is absent (the agent has not synced, or no longer serves)",
            file.display()
        );
        std::process::exit(1);
    }
    if cli.print_flags {
        println!("{}", serde_json::to_string_pretty(&flags_json())?);
        return Ok(());
    }
    if cli.print_rbac {
        let rules = proxy_agent::kube_api::rbac_json();
        println!("{}", serde_json::to_string_pretty(&rules)?);
        return Ok(());
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let format = match cli.log_format.as_str() {
        "json" => log_writer::Format::Json,
        _ => log_writer::Format::Text,
    };
    let log = LogWriter::spawn(std::io::stderr(), format).context("starting the log thread")?;
    proxy_agent::telemetry::access_log::install(log.clone());
    LogWriter::hold_panics_to_whole_lines();
    // The lines of an agent about to exit are written before it does.
    let _written_at_exit = WrittenAtExit(log.clone());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(log)
        .with_ansi(ansi);
    if cli.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
    raise_open_files_limit();
    // The control plane's runtime: sources, index, redirect maps, takeover. The data plane has
    // its own threads (`proxy::workers`).
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime
        .enable_all()
        .thread_name("control")
        .worker_threads(1);
    let workers = cli.workers.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    let redirect = redirect_config(&cli)?;
    let takeover = cli.takeover_socket.map(|socket| TakeoverConfig {
        socket,
        timeout: Duration::from_millis(cli.takeover_timeout_ms),
        fresh_programs: cli.takeover_fresh_programs,
        after: cli.after_takeover,
    });
    let status = StatusConfig {
        lease_namespace: cli
            .lease_namespace
            .clone()
            .or_else(|| env("POD_NAMESPACE"))
            .unwrap_or_else(|| "gamma-system".into()),
        lease_name: cli.lease_name.clone(),
        identity: cli.pod_name.clone().or_else(|| env("POD_NAME")),
    };
    let api_timeouts = proxy_agent::sources::kube::ApiTimeouts::new(Duration::from_secs(
        cli.api_read_timeout_s.max(1),
    ));
    if cli.api_read_timeout_s < 295 {
        tracing::warn!(
            seconds = cli.api_read_timeout_s,
            "--api-read-timeout-s is shorter than a watch's 290 s: watches of quiet kinds will \
             fail and be listed again"
        );
    }
    if cli.clear_status {
        return runtime.build()?.block_on(async {
            let client = proxy_agent::sources::kube::client(api_timeouts).await?;
            // Run as a pod beside the agents (`kubectl run -n …`): its own namespace's lease;
            // from a workstation, the agents' default.
            let in_a_pod = env("KUBERNETES_SERVICE_HOST").is_some();
            let lease_namespace = cli
                .lease_namespace
                .or_else(|| env("POD_NAMESPACE"))
                .or_else(|| in_a_pod.then(|| client.default_namespace().to_string()))
                .unwrap_or_else(|| "gamma-system".into());
            let status = StatusConfig {
                lease_namespace,
                ..status
            };
            proxy_agent::status::clear(client, status).await
        });
    }
    let node_name = cli.node_name.clone().or_else(|| env("NODE_NAME"));
    let upstream_http2_idle_s = match cli.upstream_idle_timeout_s {
        Some(seconds) => {
            tracing::warn!(
                "--upstream-idle-timeout-s is replaced by --upstream-http2-idle-timeout-s (set \
                 to {seconds}) and --upstream-http1-idle-timeout-ms (kept at its own value: \
                 below your backends' keep-alive)"
            );
            seconds
        }
        None => cli.upstream_http2_idle_timeout_s,
    };
    let config = AgentConfig {
        takeover,
        workers,
        manifests: cli.manifests.unwrap_or_default(),
        redirect,
        listen: cli.listen,
        caller_namespace: cli.caller_namespace,
        admin: cli.admin,
        ready_file: cli.ready_file,
        metrics: cli
            .metrics
            .map(|Addresses(addrs)| addrs)
            .unwrap_or_default(),
        poll_interval: Duration::from_millis(cli.poll_interval_ms.max(10)),
        drain_timeout: Duration::from_secs(cli.drain_timeout_s),
        proxy: ProxyConfig {
            connect_timeout: Duration::from_millis(cli.connect_timeout_ms.max(1)),
            header_read_timeout: Duration::from_millis(cli.header_read_timeout_ms.max(1)),
            detect_timeout: Duration::from_millis(cli.detect_timeout_ms.max(1)),
            mirror_timeout: Duration::from_millis(cli.mirror_timeout_ms.max(1)),
            max_buffered_body: cli.max_buffered_body_bytes,
            idle_timeout: idle_timeout(cli.idle_timeout_s),
            pump: cli.pump,
            max_connections: cli.max_connections.max(1),
            upstream_http1_idle_timeout: Duration::from_millis(cli.upstream_http1_idle_timeout_ms),
            upstream_http2_idle_timeout: Duration::from_secs(upstream_http2_idle_s),
            ..ProxyConfig::default()
        },
        node_name: node_name.clone(),
        kube: cli.kube.then_some(ClusterConfig {
            status,
            source: KubeConfig {
                node_name,
                timeouts: api_timeouts,
            },
        }),
    };
    runtime.build()?.block_on(agent::run(config))
}

/// The kernel redirect's configuration, if `--redirect` asks for one.
fn redirect_config(cli: &Cli) -> Result<Option<RedirectConfig>> {
    let (Some(Addresses(listen)), Some(cgroup)) = (&cli.redirect, &cli.cgroup) else {
        return Ok(None);
    };
    let listen_client_first = match &cli.redirect_http {
        Some(ClientFirstListener(Some(Addresses(addrs)))) => {
            let family = |a: &SocketAddr| a.is_ipv4();
            // The kernel's records are keyed by the caller and the agent's port alone: the two
            // listeners of a family need two ports, whatever their addresses.
            let shares_port = |a: &&SocketAddr| {
                listen
                    .iter()
                    .any(|l| family(l) == family(a) && l.port() == a.port())
            };
            if let Some(same) = addrs.iter().find(shares_port) {
                anyhow::bail!(
                    "--redirect-http {same} has the port of a --redirect address of its family: \
                     give it a port of its own, or `off`"
                );
            }
            if let Some(lone) = addrs
                .iter()
                .find(|a| !listen.iter().any(|l| family(l) == family(a)))
            {
                anyhow::bail!(
                    "--redirect-http {lone}: --redirect has no address of its family, where the \
                     kernel sends that family's other ports; give one, or leave this one out"
                );
            }
            addrs.clone()
        }
        Some(ClientFirstListener(None)) => Vec::new(),
        None => listen
            .iter()
            .map(|a| next_port(*a))
            .collect::<Result<_>>()?,
    };
    Ok(Some(RedirectConfig {
        listen: listen.clone(),
        listen_client_first,
        cgroup: cgroup.clone(),
        local_sockets: cli.local_sockets,
    }))
}

/// Listen addresses, at most one per address family: `IP:PORT`, `[IPv6]:PORT`, or IPs separated
/// by commas before one port, brackets optional (`10.0.0.5,fd00::5:15001`: what a Pod's
/// `status.hostIPs` gives, then the port). The same address twice counts once.
#[derive(Clone, Debug, PartialEq)]
struct Addresses(Vec<SocketAddr>);

impl std::str::FromStr for Addresses {
    type Err = String;

    /// A v4-mapped IPv6 address is its IPv4 one: the kernel sends IPv4 connections there.
    fn from_str(value: &str) -> std::result::Result<Self, String> {
        let canonical = |addr: SocketAddr| SocketAddr::new(addr.ip().to_canonical(), addr.port());
        if let Ok(addr) = value.parse::<SocketAddr>() {
            return Ok(Addresses(vec![canonical(addr)]));
        }
        let usage = "give IP:PORT, [IPv6]:PORT, or IPs separated by commas then :PORT";
        let (ips, port) = value
            .rsplit_once(':')
            .ok_or_else(|| format!("no port in {value:?}: {usage}"))?;
        let port: u16 = port
            .parse()
            .map_err(|e| format!("port {port:?} in {value:?}: {e}: {usage}"))?;
        let mut addrs: Vec<SocketAddr> = Vec::new();
        for ip in ips.split(',').map(str::trim) {
            let bare = ip.strip_prefix('[').and_then(|i| i.strip_suffix(']'));
            let ip: std::net::IpAddr = bare
                .unwrap_or(ip)
                .parse()
                .map_err(|e| format!("{ip:?} in {value:?}: {e}: {usage}"))?;
            let addr = canonical(SocketAddr::new(ip, port));
            if addrs.contains(&addr) {
                continue;
            }
            if let Some(other) = addrs.iter().find(|a| a.is_ipv4() == addr.is_ipv4()) {
                return Err(format!(
                    "{other} and {addr}: one address per family (the kernel sends each \
                     connection to the agent's address of its own family)"
                ));
            }
            addrs.push(addr);
        }
        Ok(Addresses(addrs))
    }
}

/// `--redirect-http`: addresses, or `off` (`None`).
#[derive(Clone, Debug)]
struct ClientFirstListener(Option<Addresses>);

impl std::str::FromStr for ClientFirstListener {
    type Err = String;

    fn from_str(value: &str) -> std::result::Result<Self, String> {
        match value {
            "off" => Ok(ClientFirstListener(None)),
            addrs => addrs.parse().map(|addrs| ClientFirstListener(Some(addrs))),
        }
    }
}

/// `--redirect-http`'s default for a `--redirect` address: the same IP, port + 1.
fn next_port(redirect: SocketAddr) -> Result<SocketAddr> {
    let port = redirect.port().checked_add(1).with_context(|| {
        format!("--redirect {redirect}: no port after it for --redirect-http; give it one")
    })?;
    Ok(SocketAddr::new(redirect.ip(), port))
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::Cli;
    use clap::Parser;

    #[test]
    fn print_flags_lists_every_flag_with_its_value_and_default() {
        let flags = super::flags_json();
        let flag = |name: &str| {
            flags
                .as_array()
                .unwrap()
                .iter()
                .find(|f| f["name"] == name)
                .unwrap_or_else(|| panic!("--{name} missing from {flags}"))
                .clone()
        };
        assert_eq!(flag("admin")["takesValue"], true);
        assert_eq!(flag("admin")["default"], "127.0.0.1:15000");
        assert_eq!(flag("kube")["takesValue"], false);
        assert_eq!(flag("redirect")["default"], serde_json::Value::Null);
        assert_eq!(flag("listen")["takesValue"], true);
    }

    /// An idle opaque connection (a database session, a subscription) lives as long as without
    /// the mesh: kube-proxy's conntrack keeps an idle flow 24 h (`tcpEstablishedTimeout`).
    #[test]
    fn an_idle_connection_is_kept_as_long_as_kube_proxy_keeps_its_flow() {
        let cli = Cli::try_parse_from(["proxy-agent", "--manifests", "m"]).expect("taken");
        assert_eq!(
            super::idle_timeout(cli.idle_timeout_s),
            std::time::Duration::from_secs(24 * 3600)
        );
    }

    /// A DaemonSet of an earlier version that passes the flag HTTP/2's and HTTP/1.1's idle
    /// timeouts replaced still starts.
    #[test]
    fn the_replaced_upstream_idle_flag_is_still_taken() {
        let args = [
            "proxy-agent",
            "--manifests",
            "m",
            "--upstream-idle-timeout-s",
            "30",
        ];
        let cli = Cli::try_parse_from(args).expect("taken");
        assert_eq!(cli.upstream_idle_timeout_s, Some(30));
    }

    #[test]
    fn the_client_first_redirect_listener_is_the_next_port_unless_told() {
        let client_first = |extra: &[&str]| {
            let args = [
                "proxy-agent",
                "--manifests",
                "/tmp",
                "--redirect",
                "10.0.0.1:15001",
            ];
            let cli = Cli::parse_from(
                args.iter()
                    .chain(["--cgroup", "/sys/fs/cgroup"].iter())
                    .chain(extra),
            );
            super::redirect_config(&cli).map(|c| {
                let addrs = c.unwrap().listen_client_first;
                addrs.iter().map(ToString::to_string).collect::<Vec<_>>()
            })
        };
        assert_eq!(client_first(&[]).unwrap(), ["10.0.0.1:15002"]);
        assert_eq!(
            client_first(&["--redirect-http", "10.0.0.1:16000"]).unwrap(),
            ["10.0.0.1:16000"]
        );
        assert!(client_first(&["--redirect-http", "off"])
            .unwrap()
            .is_empty());
        let lone = client_first(&["--redirect-http", "[fd00::1]:15002"]).unwrap_err();
        assert!(
            lone.to_string().contains("no address of its family"),
            "{lone}"
        );
        for same in ["10.0.0.1:15001", "10.0.0.2:15001"] {
            let same = client_first(&["--redirect-http", same]).unwrap_err();
            assert!(same.to_string().contains("a port of its own"), "{same}");
        }
        let last = Cli::parse_from([
            "proxy-agent",
            "--manifests",
            "/tmp",
            "--redirect",
            "10.0.0.1:65535",
            "--cgroup",
            "/x",
        ]);
        assert!(
            super::redirect_config(&last).is_err(),
            "no port after 65535"
        );
    }

    /// `--redirect=$(HOST_IPS):15001` in the DaemonSet: a single-stack node gives one IP (an IPv6
    /// one without brackets), a dual-stack node one of each family.
    #[test]
    fn redirect_addresses_take_the_node_ips_before_one_port() {
        let parsed = |value: &str| {
            value.parse::<super::Addresses>().map(|a| {
                let addrs = a.0.iter().map(ToString::to_string).collect::<Vec<_>>();
                addrs.join(" ")
            })
        };
        assert_eq!(parsed("10.0.0.5:15001").unwrap(), "10.0.0.5:15001");
        assert_eq!(parsed("[fd00::5]:15001").unwrap(), "[fd00::5]:15001");
        assert_eq!(parsed("fd00::5:15001").unwrap(), "[fd00::5]:15001");
        assert_eq!(
            parsed("10.0.0.5,fd00::5:15001").unwrap(),
            "10.0.0.5:15001 [fd00::5]:15001"
        );
        assert_eq!(
            parsed("fd00::5, 10.0.0.5,10.0.0.5:15001").unwrap(),
            "[fd00::5]:15001 10.0.0.5:15001"
        );
        assert_eq!(parsed("[::ffff:10.0.0.5]:15001").unwrap(), "10.0.0.5:15001");
        for bad in [
            "10.0.0.5",
            "10.0.0.5,10.0.0.6:15001",
            "10.0.0.5,::ffff:10.0.0.6:15001",
            "fd00::5,fd00::6:1",
            "x:1",
            "10.0.0.5:x",
        ] {
            assert!(parsed(bad).is_err(), "{bad}");
        }
        let cli = Cli::parse_from([
            "proxy-agent",
            "--manifests",
            "/tmp",
            "--redirect",
            "10.0.0.5,fd00::5:15001",
            "--cgroup",
            "/x",
        ]);
        let config = super::redirect_config(&cli).unwrap().unwrap();
        let strings = |addrs: &[std::net::SocketAddr]| {
            addrs.iter().map(ToString::to_string).collect::<Vec<_>>()
        };
        assert_eq!(
            strings(&config.listen_client_first),
            ["10.0.0.5:15002", "[fd00::5]:15002"]
        );
    }

    #[test]
    fn the_admin_server_listens_on_loopback_by_default() {
        let cli = Cli::parse_from(["proxy-agent", "--manifests", "/tmp"]);
        assert!(cli.admin.ip().is_loopback(), "{}", cli.admin);
    }
}
