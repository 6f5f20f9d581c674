//! Wiring: sources → publisher → data plane, redirect maps, status, admin; and the process
//! lifecycle (start, takeover, drain).

use crate::admin::server::{self, AdminListener, AdminState, Exposure};
use crate::handover::{self, Inherited, Offered, Successors};
use crate::proxy::drain::Drain;
use crate::proxy::explicit::{serve_explicit, AcceptModes, ExplicitTarget};
use crate::proxy::pump::{AnyMayBePaired, Pumps};
use crate::proxy::redirected::serve_redirect;
use crate::proxy::workers::{WorkerListeners, Workers};
use crate::proxy::{defer_accept, Proxy, ProxyConfig};
use crate::publisher::{Published, Publisher};
use crate::redirect::{
    self, AgentListener, CgroupDirs, KernelRedirects, MissingKernelFeatures, Redirect,
    RedirectError,
};
use crate::sources::file::{self, ManifestDir};
use crate::sources::kube::{self as kube_source, KubeConfig, KubeSource};
use crate::status::{self, StatusConfig};
use crate::telemetry::{unix_now, Metrics, Readiness};
use anyhow::{bail, Context, Result};
use futures::FutureExt as _;
use gamma_engine::{ObjectKey, Snapshot};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// `ADDR=NAMESPACE/SERVICE:PORT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenSpec {
    pub addr: SocketAddr,
    pub service: ObjectKey,
    pub port: u16,
}

impl FromStr for ListenSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let usage = || {
            format!(
                "`{s}`: expected ADDR=NAMESPACE/SERVICE:PORT, e.g. 127.0.0.1:18184=bench/echo:80"
            )
        };
        let (addr, target) = s.split_once('=').ok_or_else(usage)?;
        let addr = addr.parse().map_err(|_| usage())?;
        let (service, port) = target.rsplit_once(':').ok_or_else(usage)?;
        let (namespace, name) = service.split_once('/').ok_or_else(usage)?;
        let port = port.parse().map_err(|_| usage())?;
        Ok(ListenSpec {
            addr,
            service: ObjectKey::new(namespace, name),
            port,
        })
    }
}

/// Kernel redirect: where the redirect listener binds (pods must reach it) and which cgroup
/// holds the pods whose connections are steered.
#[derive(Clone, Debug)]
pub struct RedirectConfig {
    /// Where pods' connections are steered: at most one address per family (dual-stack).
    pub listen: Vec<SocketAddr>,
    /// Where connections to ports whose clients speak first are steered (`--redirect-http`):
    /// listeners that hand them on with their first bytes. None of a family: to `listen`'s.
    pub listen_client_first: Vec<SocketAddr>,
    pub cgroup: PathBuf,
    /// Pair the sockets of node-local connections through the agent (`Redirect::set_local_sockets`).
    pub local_sockets: bool,
}

#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub manifests: PathBuf,
    pub redirect: Option<RedirectConfig>,
    pub listen: Vec<ListenSpec>,
    pub caller_namespace: Option<String>,
    pub admin: SocketAddr,
    /// Kept present while this agent serves (`--ready-file`).
    pub ready_file: Option<PathBuf>,
    /// Listeners that serve `/metrics` alone, for a scraper on the network (`--metrics`).
    pub metrics: Vec<SocketAddr>,
    pub poll_interval: Duration,
    pub drain_timeout: Duration,
    pub proxy: ProxyConfig,
    /// The node this agent serves (`internalTrafficPolicy: Local`, topology hints).
    pub node_name: Option<String>,
    /// Follow a cluster instead of the manifest folder.
    pub kube: Option<ClusterConfig>,
    /// Hitless restart: take over from a running agent, and let a successor take over.
    pub takeover: Option<TakeoverConfig>,
    /// Data-plane worker threads (`proxy::workers`).
    pub workers: usize,
}

/// Following a cluster: what to watch, and where to report route status.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    pub source: KubeConfig,
    pub status: StatusConfig,
}

/// Hitless restart (`crate::handover`).
#[derive(Clone, Debug)]
pub struct TakeoverConfig {
    /// The Unix socket where the running agent offers its sockets.
    pub socket: PathBuf,
    /// How long a running agent may take to answer before it is given up on.
    pub timeout: Duration,
    /// Swap this binary's eBPF programs in even when they are the running agent's.
    pub fresh_programs: bool,
    /// Once taken over and drained: exit, or wait for SIGTERM.
    pub after: AfterTakeover,
}

/// What a taken-over agent does once it has drained.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AfterTakeover {
    /// Exit: a process started by hand or by a service manager that does not restart it.
    Exit,
    /// Hold nothing and wait for SIGTERM: in a Kubernetes pod (restartPolicy Always), exiting would
    /// restart the old container, which would take over back from its successor; the DaemonSet
    /// controller deletes the old pod once the new one is ready.
    Wait,
}

/// Runs the agent until SIGTERM or SIGINT, or until a successor took over, then drains.
pub async fn run(config: AgentConfig) -> Result<()> {
    let started = Instant::now();
    // First of all, and one registration for the agent's life: in a container the agent is pid
    // 1, whose signals without a handler are ignored, so a SIGTERM before it (during a first
    // sync that waits for an API server, or a takeover) waited for the SIGKILL; and one that
    // comes while the agent drains after a takeover is kept for the wait below.
    let mut signals = Signals::new();
    // Before binding anything: a running agent hands over the sockets this one would bind.
    let mut inherited = match config.takeover.clone() {
        Some(t) => tokio::task::spawn_blocking(move || handover::inherit(&t.socket, t.timeout))
            .await?
            .context("taking over from the running agent")?,
        None => Inherited::default(),
    };
    let mut offered = Offered::default();
    let metrics = Arc::new(Metrics::default());
    metrics
        .runtimes
        .lock()
        .expect("not poisoned")
        .push(tokio::runtime::Handle::current());
    let readiness = Arc::new(Readiness::default());
    tokio::spawn(crate::telemetry::readiness::heartbeat(readiness.clone()));
    if config.kube.is_none() && !config.manifests.is_dir() {
        bail!(
            "--manifests {}: not a directory; give the folder that holds the YAML manifests",
            config.manifests.display()
        );
    }
    let feeds = match &config.kube {
        Some(cluster) => kube_source::feeds(&cluster.source),
        None => vec![file::FEED],
    };
    let (mut publisher, updates) = Publisher::new(&feeds, metrics.clone(), readiness.clone());
    if let Some(node) = &config.node_name {
        publisher.serve_node(node);
    }
    // The admin server answers before the first sync, which may wait for an API server: /live
    // keeps the liveness probe happy and /ready says 503 until the table is complete.
    let proxy = Proxy::new(publisher.reader(), metrics.clone(), config.proxy.clone());
    // A socket the kernel pairs must never be spliced (`pump::Pairing`): until the redirect can
    // tell which are, the running agent's may all be.
    if inherited.sockets_may_be_paired() {
        proxy.pumps.tell_pairing(Arc::new(AnyMayBePaired));
    }
    let drain = Drain::default();
    if let Some(path) = &config.ready_file {
        // At once: the file of a container that ran before in this pod (a crash, a restart)
        // says nothing of this one.
        crate::telemetry::readiness::remove_ready_file(path)?;
        tokio::spawn(crate::telemetry::readiness::keep_ready_file(
            readiness.clone(),
            path.clone(),
            drain.stopped_accepting(),
        ));
    }
    // Turns true once no running agent accepts on the sockets it handed over.
    let (alone, alone_now) = tokio::sync::watch::channel(inherited.predecessor().is_none());
    let mut admin_listeners = Vec::new();
    let admin_addrs = std::iter::once((config.admin, Exposure::Admin, "the admin server")).chain(
        config
            .metrics
            .iter()
            .map(|a| (*a, Exposure::MetricsOnly, "--metrics")),
    );
    for (i, (addr, exposure, what)) in admin_addrs.enumerate() {
        // Asked before `listen` takes the inherited socket.
        let shared = inherited.holds(addr);
        let listener = match listen(&mut inherited, &mut offered, addr, what) {
            Ok(listener) => listener,
            // `--metrics` after its first address: the node's other family (the second of
            // status.hostIPs, which the node may not have; see `start_redirect`).
            Err(e) if i > 1 => {
                tracing::warn!(%addr, error = format!("{e:#}"), "no --metrics listener at this address; /metrics is served at the others");
                continue;
            }
            Err(e) => return Err(e),
        };
        admin_listeners.push(AdminListener {
            shared,
            listener,
            exposure,
        });
    }
    let serving = server::spawn(
        admin_listeners,
        AdminState {
            snapshot: publisher.reader(),
            metrics: metrics.clone(),
            endpoints: proxy.upstream.endpoints.clone(),
            readiness: readiness.clone(),
        },
        &drain,
        &alone_now,
    )
    .with_context(|| format!("serving the admin server on {}", config.admin))?;
    tracing::info!(admin = %serving[0], metrics = ?&serving[1..], "admin server listening");
    let source = Source::start(&config, updates).await?;
    tokio::select! {
        synced = first_sync(&mut publisher, &mut inherited, &alone) => {
            if let Err(stopped) = synced {
                return Err(source.failure().await.context(stopped));
            }
        }
        // Nothing serves yet but the admin server: nothing to drain. A running agent this one
        // was taking over from keeps serving (the session closes with `inherited`).
        () = signals.recv() => {
            tracing::info!("stopping before the first sync completed: nothing was served");
            return Ok(());
        }
    }

    let workers =
        Workers::start(config.workers, &proxy).context("starting the data-plane workers")?;
    tracing::info!(workers = workers.count(), "data-plane workers started");
    let mut accept_modes = AcceptModes::default();
    for spec in &config.listen {
        let listener = listen(&mut inherited, &mut offered, spec.addr, "--listen")?;
        tracing::info!(addr = %spec.addr, service = %spec.service, port = spec.port, "explicit listener");
        let target = ExplicitTarget {
            service: spec.service.clone(),
            port: spec.port,
            caller_namespace: config.caller_namespace.clone(),
        };
        accept_modes
            .add(&listener, target.clone())
            .context("keeping a copy of an explicit listener to set its accept mode")?;
        let drain = drain.clone();
        workers.serve(&listener, move |proxy, listener| {
            serve_explicit(proxy, listener, target.clone(), drain.clone())
        })?;
    }

    // Redirected traffic is accepted only now, after the first complete sync: no request ever
    // sees an empty table.
    let fresh_programs = config.takeover.as_ref().is_some_and(|t| t.fresh_programs);
    let (redirect, mut redirect_listeners) = match &config.redirect {
        None => (None, None),
        Some(r) => match start_redirect(
            r,
            &workers,
            &publisher.reader().load(),
            (&drain, &proxy.pumps),
            (&mut inherited, &mut offered),
            fresh_programs,
        ) {
            Ok((redirect, late)) => {
                // /metrics reads the programs' counters at each scrape.
                let programs = Arc::downgrade(&redirect);
                let _ = metrics
                    .kernel_counters
                    .set(Box::new(move || programs.upgrade()?.kernel_counters().ok()));
                (Some(redirect), Some(late))
            }
            Err(e) => match e.downcast_ref::<RedirectError>() {
                Some(RedirectError::MissingKernelFeatures(missing)) => {
                    redirect_refused(missing, &readiness, &metrics);
                    // A running agent's redirect is not taken over: our copies of its links and
                    // listener close here, and its programs detach when it exits (fail open).
                    drop(inherited.take_redirect());
                    for addr in r.listen.iter().chain(&r.listen_client_first) {
                        drop(inherited.listener(*addr));
                    }
                    (None, None)
                }
                _ => return Err(e),
            },
        },
    };
    // A SIGTERM since the first sync (the rollout undone, this pod deleted while it started)
    // undoes the takeover before Stop, as one during the sync does: the running agent keeps
    // everything and thaws. Taking over first would leave the node to an agent that is going,
    // which empties the shared steering as it goes alone.
    if inherited.predecessor().is_some() && signals.recv().now_or_never().is_some() {
        tracing::info!("stopping before taking over: the running agent keeps serving");
        drop(inherited);
        // What the workers accepted meanwhile on the listeners both agents share finishes here;
        // what is queued stays for the running agent.
        drain_or_reset(&drain, &proxy.pumps, config.drain_timeout).await;
        return Ok(());
    }
    // Everything serves here now: only now does the running agent stop accepting.
    finish_takeover(
        inherited,
        redirect.as_deref(),
        (&metrics, &workers, &drain),
        started,
        config.takeover.as_ref(),
    )
    .await?;
    alone.send_replace(true);
    if let Some(redirect) = &redirect {
        // The running agent, which shares the maps, may have written its own view of a table
        // change between this agent's first write and Stop: this agent's goes in last.
        reconcile_redirect(redirect, &publisher.reader().load());
    }
    let mut successors = match &config.takeover {
        Some(t) => Some(
            Successors::serve(
                &t.socket,
                offered,
                redirect.clone(),
                (drain.clone(), proxy.pumps.clone(), readiness.clone()),
            )
            .context("offering takeovers")?,
        ),
        None => {
            // No successor will take them: the listeners must close when the workers stop
            // accepting (a redirected connect then fails open), not wait in these copies while
            // the agent drains.
            drop(offered);
            None
        }
    };
    // Ready: the table is complete and every listener, the redirect included, is serving.
    readiness.synced_at.store(unix_now(), Ordering::Relaxed);
    // The consumers subscribe before the publisher runs, so that none misses a publish.
    let mut consumers = vec![tokio::spawn(prune_state(
        metrics.clone(),
        proxy.clone(),
        NewTables::new(publisher.subscribe()),
    ))];
    if !accept_modes.is_empty() {
        accept_modes.follow(&publisher.reader().load());
        // Until this agent stops accepting: a successor sets the shared sockets from then on.
        consumers.push(tokio::spawn(follow_until_stopped(
            NewTables::new(publisher.subscribe()),
            drain.stopped_accepting(),
            move |snapshot| accept_modes.follow(snapshot),
        )));
    }
    if let (Some(redirect), Some(listeners)) = (&redirect, &mut redirect_listeners) {
        listeners.offered = successors.as_ref().map(Successors::offered);
        // A family that could not open at the start (its address held meanwhile) is tried again
        // now that the running agent has let go, not only with the next table.
        let snapshot = publisher.reader().load();
        if listeners.open_needed(redirect, &snapshot) {
            reconcile_redirect(redirect, &snapshot);
        }
    }
    let mut following_tables = redirect
        .clone()
        .zip(redirect_listeners)
        .map(|(redirect, late)| {
            tokio::spawn(follow_redirect(
                redirect,
                late,
                NewTables::new(publisher.subscribe()),
                drain.stopped_accepting(),
            ))
        });
    let status = match (&config.kube, &source) {
        (Some(cluster), Source::Kube(kube)) => Some(status::spawn(
            kube.client.clone(),
            cluster.status.clone(),
            publisher.subscribe(),
        )),
        _ => None,
    };
    let mut publishing = tokio::spawn(publisher.run());
    // The publisher owns the table: if it ends while the sources run (a panic, a bug), the table
    // would stay as it is while /ready said ready. The agent stops instead, failing, so that
    // the kubelet starts it again (and its pods' connections fall back to kube-proxy meanwhile).
    let mut publisher_ended = false;
    let taken_over = tokio::select! {
        () = signals.recv() => None,
        ended = &mut publishing => {
            tracing::error!(?ended, "the route table's publisher stopped; shutting down so that the agent is started again");
            publisher_ended = true;
            None
        }
        pid = async {
            match successors.as_mut() {
                Some(s) => s.taken_over().await,
                None => std::future::pending().await,
            }
        } => Some(pid),
    };
    match taken_over {
        Some(pid) => {
            tracing::info!(successor = pid, deadline = ?config.drain_timeout, "taken over: finishing in-flight requests");
        }
        None => {
            // Table changes would steer again.
            if let Some(following) = following_tables.take() {
                following.abort();
                let _ = following.await;
            }
            // Alone unless a successor said Stop meanwhile; then it took over, and the steering
            // is its own. A successor that holds the sockets without having said Stop is refused
            // it from now on: it starts as without this agent, and writes its steering after
            // this agent emptied it.
            //
            // Alone, the accept loops, once stopped, take the connections already queued
            // (connects steered just before): closing the listener would reset them. Told before
            // a Stop can be refused, which stops them.
            let alone_from_now = || {
                stop_steering(redirect.as_deref());
                drain.sweep_queues();
            };
            let alone = match &successors {
                Some(successors) => successors.shut_down_alone(alone_from_now),
                None => {
                    alone_from_now();
                    true
                }
            };
            if alone {
                tokio::time::sleep(STEERED_IN_FLIGHT).await;
            }
            // Stopped accepting before a waiting successor is let go: it may attach its own
            // programs at once, steering into the listeners we share, with records in its own
            // map; a connection this agent accepted then had none and was closed.
            drain.stop_accepting().await;
            // Before draining: our copies of the listeners must go for them to close (fail open).
            drop(successors.take());
            tracing::info!(deadline = ?config.drain_timeout, alone, "shutting down: no new connections, finishing in-flight requests");
        }
    }
    if let Some(status) = status {
        status.shutdown().await;
    }
    source.shutdown();
    consumers.push(publishing);
    for consumer in consumers.into_iter().chain(following_tables) {
        consumer.abort();
    }
    drain_or_reset(&drain, &proxy.pumps, config.drain_timeout).await;
    let wait = config
        .takeover
        .as_ref()
        .is_some_and(|t| t.after == AfterTakeover::Wait);
    if taken_over.is_some() && wait {
        // Holding nothing, indeed: requests still running past the deadline end with their
        // workers (and the pools' connections close), and this agent's copies of the programs'
        // links go, so that they detach (fail open) should the successor die, rather than steer
        // into listeners nobody accepts on while this agent waits.
        drop(workers);
        drop(successors);
        // The pumps ask the redirect which sockets the kernel may pair: they hold it too.
        proxy.pumps.tell_pairing(Arc::new(AnyMayBePaired));
        let programs = redirect.as_ref().map(Arc::downgrade);
        drop(redirect);
        // The tasks that followed the tables let go of theirs as they end (aborted above).
        tokio::time::sleep(Duration::from_millis(50)).await;
        if programs.is_some_and(|p| p.upgrade().is_some()) {
            tracing::warn!("taken over and drained, but still holding the kernel programs: they stay attached should the successor die");
        }
        tracing::info!("taken over and drained: holding nothing, waiting for SIGTERM");
        signals.recv().await;
    }
    if publisher_ended {
        anyhow::bail!("the route table's publisher stopped (see the log above); restart the agent");
    }
    Ok(())
}

/// Waits up to `deadline` for connections in flight to end, then resets those still open (the
/// opaque and upgraded ones on both sides): closed with a FIN, a peer of an EOF-delimited
/// protocol, or an HTTP/1.0 caller, would take the cut stream for a complete one. Whatever way
/// the agent stops (a successor stopped before its Stop included: its pumps ended with a FIN).
async fn drain_or_reset(drain: &Drain, pumps: &Pumps, deadline: Duration) {
    if drain.drain(deadline).await {
        tracing::info!("drained");
    } else {
        drain.reset_what_remains();
        let cut = pumps.reset_all().await;
        tracing::warn!(
            opaque_connections_reset = cut,
            "drain deadline reached with connections still open"
        );
    }
}

/// The publisher's first sync, which may wait long for an API server. A running agent that goes
/// meanwhile (a crash, a kill) leaves this one holding its listeners and programs before this one
/// accepts: connects would be steered to a listener nobody accepts on, so the programs are let
/// go.
async fn first_sync(
    publisher: &mut Publisher,
    inherited: &mut Inherited,
    alone: &tokio::sync::watch::Sender<bool>,
) -> Result<(), crate::publisher::SourcesStopped> {
    let predecessor_gone = inherited.predecessor_gone();
    tokio::pin!(predecessor_gone);
    let synced = publisher.first_sync();
    tokio::pin!(synced);
    // Polled until it resolves, never after.
    let mut gone = inherited.predecessor().is_none();
    loop {
        tokio::select! {
            synced = &mut synced => return synced,
            () = &mut predecessor_gone, if !gone => {
                gone = true;
                tracing::warn!(
                    predecessor = inherited.predecessor(),
                    "the running agent went before this one could take over from it: letting \
                     its programs go (pods take ordinary Service routing until this agent \
                     serves, with its own)"
                );
                inherited.let_go_of_redirect();
                // Nobody else answers the probes and scrapes on the sockets it handed over.
                alone.send_replace(true);
            }
        }
    }
}

/// How long connects the kernel steered just before it stopped are given to reach the listener's
/// queue: a handshake on the node takes microseconds.
const STEERED_IN_FLIGHT: Duration = Duration::from_millis(50);

/// With no successor: the kernel stops steering to this agent, and new connects take ordinary
/// Service routing at once. Before, steering went on until the listener closed, which reset what
/// its queue held.
fn stop_steering(redirect: Option<&Redirect>) {
    let Some(redirect) = redirect else { return };
    if let Err(e) = redirect.set_mesh_services(std::iter::empty()) {
        tracing::warn!(
            error = %e,
            "emptying the steered Services failed: a connect steered until the listener \
             closes may be refused"
        );
    }
}

/// The running source: the manifest folder's polling task, or the cluster's watchers.
enum Source {
    Folder(tokio::task::JoinHandle<Result<()>>),
    Kube(KubeSource),
}

impl Source {
    async fn start(config: &AgentConfig, updates: crate::sources::Updates) -> Result<Source> {
        Ok(match &config.kube {
            Some(cluster) => Source::Kube(KubeSource::start(&cluster.source, updates).await?),
            None => Source::Folder(tokio::spawn(
                ManifestDir::new(&config.manifests).run(updates, config.poll_interval),
            )),
        })
    }

    /// Why a source stopped before the first complete sync.
    async fn failure(self) -> anyhow::Error {
        match self {
            Source::Folder(task) => match task.await {
                Ok(Err(e)) => e,
                Ok(Ok(())) => anyhow::anyhow!("the manifest folder source ended"),
                Err(e) => anyhow::Error::new(e).context("the manifest folder source failed"),
            },
            Source::Kube(_) => anyhow::anyhow!("every Kubernetes watcher stopped"),
        }
    }

    fn shutdown(self) {
        match self {
            Source::Folder(task) => task.abort(),
            Source::Kube(kube) => kube.shutdown(),
        }
    }
}

/// The kernel steers exactly the frontends that have routes: kept in step with every publish
/// until this agent stops accepting. After a takeover the successor, which shares the maps,
/// writes them alone: a table change read here afterwards would set this agent's view (an older
/// version's logic) until the successor's next change, in a quiet cluster for good. A table with
/// the first ClusterIP of a waiting address family opens its listeners first.
async fn follow_redirect(
    redirect: Arc<Redirect>,
    mut listeners: RedirectListeners,
    mut tables: NewTables,
    mut stopped: watch::Receiver<bool>,
) {
    // Told when a successor went away before Stop.
    let thawed = listeners
        .offered
        .as_ref()
        .map_or_else(Default::default, |o| {
            o.lock().unwrap_or_else(PoisonError::into_inner).thawed()
        });
    loop {
        let snapshot = tokio::select! {
            biased;
            _ = stopped.wait_for(|stopped| *stopped) => return,
            // A successor went away before Stop: what waited for it need not wait for a table.
            () = thawed.notified() => tables.current(),
            table = tables.next() => match table {
                Some(snapshot) => snapshot,
                None => return,
            },
        };
        listeners.open_needed(&redirect, &snapshot);
        reconcile_redirect(&redirect, &snapshot);
    }
}

/// Applies each new table until `stopped` turns true (or the publisher goes).
async fn follow_until_stopped(
    mut tables: NewTables,
    mut stopped: watch::Receiver<bool>,
    mut apply: impl FnMut(&Snapshot),
) {
    loop {
        tokio::select! {
            biased;
            _ = stopped.wait_for(|stopped| *stopped) => return,
            table = tables.next() => match table {
                Some(snapshot) => apply(&snapshot),
                None => return,
            },
        }
    }
}

/// The tables a consumer has not seen yet: publishes where only the stored route status changed
/// (the status writer's concern) are skipped. Made when subscribing, so that none is missed.
struct NewTables {
    published: watch::Receiver<Published>,
    seen: u64,
}

impl NewTables {
    fn new(published: watch::Receiver<Published>) -> NewTables {
        let seen = published.borrow().snapshot.version;
        NewTables { published, seen }
    }

    /// The table published last, seen or not.
    fn current(&self) -> Arc<Snapshot> {
        self.published.borrow().snapshot.clone()
    }

    /// `None` once the publisher is gone.
    async fn next(&mut self) -> Option<Arc<Snapshot>> {
        loop {
            self.published.changed().await.ok()?;
            let snapshot = self.published.borrow_and_update().snapshot.clone();
            if snapshot.version != self.seen {
                self.seen = snapshot.version;
                return Some(snapshot);
            }
        }
    }
}

/// Drops the request series of Services and routes that are gone, and the state of endpoints
/// that are gone, so that neither grows with everything that ever existed.
async fn prune_state(metrics: Arc<Metrics>, proxy: Arc<Proxy>, mut tables: NewTables) {
    while let Some(snapshot) = tables.next().await {
        let series = metrics.requests.prune(&snapshot);
        let live = snapshot.endpoints();
        let endpoints = proxy.upstream.endpoints.retain(|addr| live.contains(addr));
        let bindings = proxy.upstream.affinity.keep_only(snapshot.backends());
        proxy.forget_gone_services(&snapshot);
        if series + endpoints + bindings > 0 {
            tracing::debug!(
                series,
                endpoints,
                bindings,
                "state of removed Services, routes, endpoints and affinities dropped"
            );
        }
    }
}

/// The listening socket for `addr`: the running agent's if it handed one over, else a new one.
/// Either way a copy is kept to hand to a successor.
fn listen(
    inherited: &mut Inherited,
    offered: &mut Offered,
    addr: SocketAddr,
    what: &str,
) -> Result<std::net::TcpListener> {
    let listener = match inherited.listener(addr) {
        Some(listener) => listener,
        None => std::net::TcpListener::bind(addr).map_err(|e| {
            let in_use = e.kind() == std::io::ErrorKind::AddrInUse;
            let hint = match inherited.bind_hint() {
                _ if !in_use => String::new(),
                Some(hint) => format!(": {hint}"),
                None => {
                    ": another process holds it (an agent running without --takeover-socket?); \
                         stop it first, or give both agents the same --takeover-socket"
                        .to_string()
                }
            };
            anyhow::Error::new(e).context(format!("binding {what} {addr}{hint}"))
        })?,
    };
    widen_backlog(&listener).with_context(|| format!("listening on {what} {addr}"))?;
    listener.set_nonblocking(true)?;
    offered
        .add(&listener)
        .with_context(|| format!("keeping a copy of {what} {addr} for a successor"))?;
    Ok(listener)
}

/// Lets the kernel queue as many not yet accepted connections as it allows (`net.core.somaxconn`,
/// 4096 by default), whether the socket is new or handed over. std listens with a queue of 128: a
/// burst of connects from a node's pods beyond it (or a moment the accept loop falls behind) had
/// SYNs dropped, their callers waiting out retransmits of 1 s and more, while the programs still
/// steer to the agent. And no TCP Fast Open (`proxy::refuse_fast_open`), before they do.
fn widen_backlog(listener: &std::net::TcpListener) -> std::io::Result<()> {
    // The kernel caps the value at net.core.somaxconn.
    rustix::net::listen(listener, i32::MAX)?;
    crate::proxy::refuse_fast_open(listener)
}

/// Tells the running agent, if any, to stop accepting, then swaps in this agent's programs if it
/// brought its own (`redirect/takeover.rs`).
async fn finish_takeover(
    inherited: Inherited,
    redirect: Option<&Redirect>,
    (metrics, workers, drain): (&Metrics, &Workers, &Drain),
    started: Instant,
    takeover: Option<&TakeoverConfig>,
) -> Result<()> {
    let timeout = takeover.map_or(Duration::ZERO, |t| t.timeout);
    let Some(done) = tokio::task::spawn_blocking(move || inherited.finish(timeout))
        .await?
        .context("asking the running agent to stop accepting")?
    else {
        return Ok(());
    };
    // The old agent's opaque and upgraded connections go on here, where they left off, on the
    // data plane, each counted as a connection accepted here.
    let connections = done.connections.len();
    for paused in done.connections {
        workers.adopt(drain, move |proxy| async move {
            // Registered with the worker's reactor, where it is polled.
            if let Ok(pump) = proxy.pumps.resume(paused) {
                pump.await;
            }
        });
    }
    let micros = |d: Duration| d.as_micros() as u64;
    let times = &metrics.takeover;
    times
        .connections
        .store(connections as u64, Ordering::Relaxed);
    times
        .offer_micros
        .store(micros(done.offer_took), Ordering::Relaxed);
    times
        .stop_micros
        .store(done.stop_took.map_or(0, micros), Ordering::Relaxed);
    times
        .total_micros
        .store(micros(started.elapsed()), Ordering::Relaxed);
    if done.stop_took.is_none() {
        // A hung agent accepts nothing either: swapping now costs nothing then, and waiting longer
        // would leave this agent unable to hand over in turn.
        tracing::warn!(
            predecessor = done.pid,
            "the previous agent did not confirm it stopped accepting; going on as if it had"
        );
    }
    let kind = redirect.map(Redirect::complete_takeover);
    match kind {
        Some(Err(e)) => tracing::error!(
            error = %e,
            "this agent's programs could not be swapped in; the previous agent's keep steering \
             to this agent (restart it to retry)"
        ),
        kind => tracing::info!(
            predecessor = done.pid,
            offer = ?done.offer_took,
            stop = ?done.stop_took,
            total = ?started.elapsed(),
            connections,
            redirect = ?kind.map(Result::ok),
            "took over from the running agent"
        ),
    }
    Ok(())
}

fn start_redirect(
    config: &RedirectConfig,
    workers: &Workers,
    snapshot: &Snapshot,
    (drain, pumps): (&Drain, &Pumps),
    (inherited, offered): (&mut Inherited, &mut Offered),
    fresh_programs: bool,
) -> Result<(Arc<Redirect>, RedirectListeners)> {
    // Before binding or taking anything over: on a kernel that cannot run the redirect, nothing
    // steers pods here.
    redirect::check_kernel()?;
    let mut bound: Vec<(std::net::TcpListener, SocketAddr, bool)> = Vec::new();
    let mut waiting = Vec::new();
    for (i, &addr) in config.listen.iter().enumerate() {
        // The second family only where it is of use: on a cluster with ClusterIPs of it (an
        // IPv4 cluster's node may report an IPv6 ExternalIP, where nothing should listen), or
        // where the running agent listened (it steers there until the takeover ends).
        let same_family = |a: &SocketAddr| a.is_ipv4() == addr.is_ipv4();
        let family = |failed| WaitingFamily {
            listen: addr,
            client_first: config.listen_client_first.iter().copied().find(same_family),
            failed,
        };
        if i > 0 && !inherited.holds(addr) && !has_cluster_ips_of_family(snapshot, addr) {
            tracing::info!(%addr, "no redirect listener there until a Service has a ClusterIP of its address family");
            waiting.push(family(false));
            continue;
        }
        match listen(inherited, offered, addr, "the redirect listener") {
            Ok(listener) => bound.push((listener, addr, false)),
            // The first is the node's primary address. The other family's is the second of
            // status.hostIPs, which the kubelet may take from an ExternalIP the node does not
            // have, or give in a cluster that is not dual-stack: without it the agent serves on.
            Err(e) if i > 0 => {
                family_failed(addr, &e);
                waiting.push(family(true));
            }
            Err(e) => return Err(e),
        }
    }
    for &addr in &config.listen_client_first {
        if !bound
            .iter()
            .any(|(_, any, _)| any.is_ipv4() == addr.is_ipv4())
        {
            continue;
        }
        let what = "the redirect listener for ports declaring HTTP";
        let listener = listen(inherited, offered, addr, what)?;
        hand_on_with_first_bytes(&listener, addr)?;
        bound.push((listener, addr, true));
    }
    let listeners = agent_listeners(&bound);
    let predecessor = inherited.take_redirect();
    // A client-first listener of the predecessor's that this agent has not (another
    // --redirect-http, or off): its programs steer there until ours are swapped in, and what it
    // holds then would be reset if it closed. Served until this agent stops accepting (nothing
    // steers there after the swap), not offered on.
    let theirs_only: Vec<std::net::TcpListener> = predecessor
        .iter()
        .flat_map(|p| p.offer().client_first.clone())
        .filter(|addr| !config.listen_client_first.contains(addr))
        .filter_map(|addr| inherited.listener(addr))
        .inspect(|listener| {
            // An older predecessor's takes TCP Fast Open if the host gives it.
            let _ = crate::proxy::refuse_fast_open(listener);
        })
        .collect();
    let redirect = match predecessor {
        Some(predecessor) => {
            Redirect::take_over(&config.cgroup, &listeners, predecessor, fresh_programs)
        }
        None => Redirect::attach(&config.cgroup, &listeners),
    }
    .with_context(|| {
        format!(
            "attaching the redirect programs to {}",
            config.cgroup.display()
        )
    })?;
    let local_sockets = config.local_sockets && runs_under(&config.cgroup);
    if config.local_sockets && !local_sockets {
        tracing::warn!(
            cgroup = %config.cgroup.display(),
            "--local-sockets ignored: this agent does not run in a cgroup under --cgroup, so the \
             programs would pair the callers' sockets but never its own; run it under --cgroup \
             (a DaemonSet pod under kubepods is)"
        );
    }
    let redirect = Arc::new(redirect);
    // Before the programs may pair a socket: from here on, each pump asks the kernel's records.
    pumps.tell_pairing(redirect.clone());
    redirect
        .set_local_sockets(local_sockets)
        .context("setting --local-sockets in the kernel programs' config")?;
    reconcile_redirect(&redirect, snapshot);
    let root = redirect::cgroup2_mount().context("finding the cgroup v2 mount")?;
    let resolver = Arc::new(KernelRedirects {
        redirect: redirect.clone(),
        cgroups: CgroupDirs::new(root),
    });
    tracing::info!(addr = ?config.listen, client_first = ?config.listen_client_first, cgroup = %config.cgroup.display(), local_sockets, "redirect listeners; kernel programs attached");
    let late = RedirectListeners {
        waiting,
        workers: workers.listeners(),
        drain: drain.clone(),
        resolver,
        offered: None,
    };
    for listener in listeners.iter().map(|l| l.listener).chain(&theirs_only) {
        late.serve(listener)?;
    }
    Ok((redirect, late))
}

/// Whether `snapshot` has a Service with a ClusterIP of `addr`'s address family: where that
/// family's redirect listeners are of use.
fn has_cluster_ips_of_family(snapshot: &Snapshot, addr: SocketAddr) -> bool {
    snapshot
        .by_address
        .keys()
        .any(|a| a.is_ipv4() == addr.is_ipv4())
}

/// A client-first listener hands a connection on only with its first bytes (`TCP_DEFER_ACCEPT`).
fn hand_on_with_first_bytes(listener: &std::net::TcpListener, addr: SocketAddr) -> Result<()> {
    defer_accept(listener, true)
        .with_context(|| format!("setting {addr} to hand on connections with their first bytes"))
}

/// Listeners bound with the address pods are sent to and whether only client-first ports are.
type BoundListeners = [(std::net::TcpListener, SocketAddr, bool)];

fn agent_listeners(bound: &BoundListeners) -> Vec<AgentListener<'_>> {
    bound
        .iter()
        .map(|(listener, addr, client_first)| AgentListener {
            listener,
            addr: *addr,
            client_first: *client_first,
        })
        .collect()
}

/// A `--redirect` address family without listeners yet: no Service had a ClusterIP of it when
/// the agent started (a dual-stack cluster before its first dual-stack Service), or they could
/// not open (`failed`: said once in the log; tried again with each table).
#[derive(Debug)]
struct WaitingFamily {
    listen: SocketAddr,
    client_first: Option<SocketAddr>,
    failed: bool,
}

/// Serves the redirect listeners on the workers, and opens those of a waiting address family once
/// a table has a ClusterIP of it, telling the programs: no restart when a cluster's first Service
/// of that family comes.
struct RedirectListeners {
    waiting: Vec<WaitingFamily>,
    workers: WorkerListeners,
    drain: Drain,
    resolver: Arc<KernelRedirects>,
    /// Where copies for a successor go (`None` without a takeover socket: nothing keeps them).
    offered: Option<Arc<Mutex<Offered>>>,
}

impl RedirectListeners {
    /// Accepts redirected connections on `listener` on every worker.
    fn serve(&self, listener: &std::net::TcpListener) -> std::io::Result<()> {
        self.serve_copies(self.workers.copies(listener)?);
        Ok(())
    }

    /// Accepts redirected connections on each worker's copy of a listener.
    fn serve_copies(&self, copies: Vec<std::net::TcpListener>) {
        let (drain, resolver) = (self.drain.clone(), self.resolver.clone());
        self.workers.serve_copies(copies, move |proxy, listener| {
            serve_redirect(proxy, listener, resolver.clone(), drain.clone())
        });
    }

    /// Before `snapshot` is told to the programs: opens the families it has ClusterIPs of (`true`
    /// if any opened). One that cannot open waits on, with the reason in the log (the frontends
    /// of its family stay with kube-proxy, counted in
    /// `gamma_redirect_frontends_without_listener`).
    fn open_needed(&mut self, redirect: &Redirect, snapshot: &Snapshot) -> bool {
        let mut opened = false;
        for family in std::mem::take(&mut self.waiting) {
            if !has_cluster_ips_of_family(snapshot, family.listen) {
                self.waiting.push(family);
                continue;
            }
            match self.open(redirect, &family) {
                Ok(true) => {
                    opened = true;
                    tracing::info!(
                        addr = %family.listen,
                        client_first = ?family.client_first,
                        "a Service has a ClusterIP of this address family: redirect listeners open"
                    );
                }
                // A successor holds the offer: it opens them if it takes over, this agent as
                // soon as it goes away if not.
                Ok(false) => self.waiting.push(family),
                Err(e) => {
                    if !family.failed {
                        family_failed(family.listen, &e);
                    }
                    self.waiting.push(WaitingFamily {
                        failed: true,
                        ..family
                    });
                }
            }
        }
        opened
    }

    /// Opens `family`'s listeners and tells the programs; `false` while a successor holds the
    /// offer. Whatever can fail comes before the programs are told, so that they never steer to
    /// a listener nobody accepts on.
    fn open(&self, redirect: &Redirect, family: &WaitingFamily) -> Result<bool> {
        // Held to the end: a successor offered the programs' new addresses in the meantime gets
        // their listeners with them.
        let mut offered = self
            .offered
            .as_ref()
            .map(|o| o.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        if offered.as_ref().is_some_and(|o| o.is_frozen()) {
            return Ok(false);
        }
        let bind = |addr: SocketAddr, client_first: bool| -> Result<std::net::TcpListener> {
            let listener = std::net::TcpListener::bind(addr)
                .with_context(|| format!("binding the redirect listener {addr}"))?;
            widen_backlog(&listener)?;
            listener.set_nonblocking(true)?;
            if client_first {
                hand_on_with_first_bytes(&listener, addr)?;
            }
            Ok(listener)
        };
        let mut opened = vec![(bind(family.listen, false)?, family.listen, false)];
        if let Some(addr) = family.client_first {
            opened.push((bind(addr, true)?, addr, true));
        }
        let mut copies = Vec::with_capacity(opened.len());
        for (listener, addr, _) in &opened {
            let copy = || -> std::io::Result<_> {
                let offer = offered.is_some().then(|| Offered::copy(listener));
                Ok((offer.transpose()?, self.workers.copies(listener)?))
            };
            copies.push(copy().with_context(|| format!("copying the listener {addr}"))?);
        }
        redirect
            .add_listeners(&agent_listeners(&opened))
            .context("telling the programs about the listeners")?;
        for (offer, workers) in copies {
            if let (Some(offered), Some(offer)) = (offered.as_mut(), offer) {
                offered.keep(offer);
            }
            self.serve_copies(workers);
        }
        Ok(true)
    }
}

fn family_failed(addr: SocketAddr, error: &anyhow::Error) {
    tracing::warn!(
        %addr,
        error = format!("{error:#}"),
        "no redirect listener for this address family (tried again with each table): pods' \
         connections to ClusterIPs of this family keep kube-proxy's routing, without mesh routes"
    );
}

/// Whether this process's cgroup is `cgroup` or below it: where the programs attached to `cgroup`
/// see its sockets.
fn runs_under(cgroup: &std::path::Path) -> bool {
    redirect::own_cgroup_id().is_ok_and(|own| CgroupDirs::new(cgroup).path_of(own).is_some())
}

/// The kernel cannot run the redirect: the agent serves on without it (pods keep ordinary Service
/// routing) and says why in the log, `/ready` and `/metrics`.
fn redirect_refused(missing: &MissingKernelFeatures, readiness: &Readiness, metrics: &Metrics) {
    tracing::error!(error = %missing, "kernel redirect off");
    let _ = readiness.redirect_refused.set(missing.to_string());
    let _ = metrics
        .redirect_missing_kernel_features
        .set(missing.missing.iter().map(|f| (f.name, f.since)).collect());
}

/// The kernel steers exactly the frontends that have routes (see `Snapshot::mesh_addresses`), and
/// with local sockets on, knows this node's pods that opted in to them
/// (`model::LOCAL_SOCKETS_ANNOTATION`): of the Pods whose addresses tell the agent who calls (from
/// Kubernetes with a node name, those of its node, without one every node's; a folder's, all of
/// them), those annotated, or in an annotated Namespace and not annotated themselves. Only their
/// connections through the agent pair: a caller's to the agent, the agent's to a backend.
/// Connections made before the Pod is known keep TCP.
fn reconcile_redirect(redirect: &Redirect, snapshot: &Snapshot) {
    match redirect.set_mesh_services(snapshot.mesh_addresses()) {
        Ok(change) => {
            redirect.told_table(snapshot.version);
            // Most tables change endpoints or pods, not which frontends are steered.
            if change.written + change.removed == 0 {
                tracing::debug!(?change, "redirected Service frontends unchanged")
            } else {
                tracing::info!(?change, "redirected Service frontends updated")
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "updating the redirected Service frontends failed; the previous set stays")
        }
    }
    // While off, the programs do not read the set: it is left as it is (during an adopting
    // takeover both agents follow the one shared config, and the running one may read it before
    // the successor turns pairing on).
    match redirect.local_sockets() {
        Ok(true) => {}
        Ok(false) => return,
        Err(e) => {
            tracing::error!(error = %e, "reading whether local sockets are on failed; the opted-in pods told the kernel stay as they were");
            return;
        }
    }
    let opted_in = snapshot
        .callers
        .by_ip
        .iter()
        .filter(|(_, caller)| caller.local_sockets)
        .map(|(ip, _)| *ip);
    match redirect.set_local_pods(opted_in) {
        Ok(change) => tracing::debug!(
            ?change,
            "this node's opted-in pods updated for local sockets"
        ),
        Err(e) => tracing::error!(
            error = %e,
            "updating this node's opted-in pods for local sockets failed; the previous set stays \
             (connections of pods missing from it keep TCP)"
        ),
    }
}

/// SIGTERM and SIGINT, from their registration on: one that comes while nobody waits is kept
/// for the next `recv`.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Signals {
        use tokio::signal::unix::{signal, SignalKind};
        Signals {
            term: signal(SignalKind::terminate()).expect("SIGTERM handler"),
            int: signal(SignalKind::interrupt()).expect("SIGINT handler"),
        }
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {},
            _ = self.int.recv() => {},
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A publish of table `version`.
    fn table(version: u64) -> Published {
        Published {
            snapshot: Arc::new(Snapshot {
                version,
                ..Snapshot::default()
            }),
            stored_status: Arc::default(),
            behind: Vec::new(),
        }
    }

    #[tokio::test]
    async fn consumers_see_every_new_table_and_skip_status_only_publishes() {
        let (tx, rx) = watch::channel(table(1));
        let mut tables = NewTables::new(rx);
        // Published before the consumer looks: not missed.
        tx.send_replace(table(2));
        assert_eq!(tables.next().await.unwrap().version, 2);
        // Only the stored status changed (same table): skipped; the next table is seen.
        tx.send_replace(table(2));
        let waited = tokio::time::timeout(Duration::from_millis(50), tables.next()).await;
        assert!(waited.is_err(), "a status-only publish woke the consumer");
        tx.send_replace(table(3));
        assert_eq!(tables.next().await.unwrap().version, 3);
        drop(tx);
        assert!(tables.next().await.is_none());
    }

    #[tokio::test]
    async fn the_redirect_follows_tables_only_until_the_agent_stops_accepting() {
        let (tx, rx) = watch::channel(table(1));
        let (stop, stopped) = watch::channel(false);
        let applied = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = applied.clone();
        let follower = tokio::spawn(follow_until_stopped(
            NewTables::new(rx),
            stopped,
            move |s| seen.lock().unwrap().push(s.version),
        ));
        tx.send_replace(table(2));
        tokio::time::sleep(Duration::from_millis(20)).await;
        stop.send_replace(true);
        tokio::time::timeout(Duration::from_secs(1), follower)
            .await
            .expect("it stops following")
            .unwrap();
        tx.send_replace(table(3));
        assert_eq!(*applied.lock().unwrap(), [2]);
    }

    /// The listen queue is the kernel's cap, not std's 128 (`ss` reads it: a listener's Send-Q).
    #[test]
    fn listeners_queue_as_many_connections_as_the_kernel_allows() {
        let listener = listen(
            &mut Inherited::default(),
            &mut Offered::default(),
            "127.0.0.1:0".parse().unwrap(),
            "a test listener",
        )
        .unwrap();
        let port = listener.local_addr().unwrap().port();
        let Ok(out) = std::process::Command::new("ss")
            .args(["-Hltn", &format!("sport = :{port}")])
            .output()
        else {
            eprintln!("SKIPPED: no `ss` (iproute2) to read the listen queue with");
            return;
        };
        let line = String::from_utf8(out.stdout).unwrap();
        let queue: u32 = line.split_whitespace().nth(2).unwrap().parse().unwrap();
        let cap: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(queue, cap, "{line}");
    }

    #[test]
    fn listen_spec_parses() {
        let spec: ListenSpec = "127.0.0.1:18184=bench/echo:80".parse().unwrap();
        assert_eq!(spec.addr, "127.0.0.1:18184".parse().unwrap());
        assert_eq!(spec.service, ObjectKey::new("bench", "echo"));
        assert_eq!(spec.port, 80);
        assert!("127.0.0.1:1=echo:80".parse::<ListenSpec>().is_err());
    }
}
