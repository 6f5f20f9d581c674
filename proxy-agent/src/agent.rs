//! Wiring: sources → index → snapshot → data plane, admin, redirect; and the process lifecycle.

use crate::admin::metrics::Metrics;
use crate::admin::server::{self, AdminState, Readiness};
use crate::index::Index;
use crate::model::ObjectKey;
use crate::proxy::listener::{self, Drain, ExplicitTarget};
use crate::proxy::{Proxy, ProxyConfig};
use crate::redirect::{self, AgentListener, CgroupDirs, KernelRedirects, Redirect};
use crate::sources::file::{ManifestDir, Severity};
use crate::sources::kube::{KubeConfig, KubeSource, OnPublish};
use anyhow::{bail, Context, Result};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

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
    pub listen: SocketAddr,
    pub cgroup: PathBuf,
}

#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub manifests: PathBuf,
    pub redirect: Option<RedirectConfig>,
    pub listen: Vec<ListenSpec>,
    pub caller_namespace: Option<String>,
    pub admin: SocketAddr,
    pub poll_interval: Duration,
    pub drain_timeout: Duration,
    pub proxy: ProxyConfig,
    /// Follow a cluster instead of the manifest folder.
    pub kube: Option<KubeConfig>,
}

/// Runs the agent until SIGTERM or SIGINT, then drains.
pub async fn run(config: AgentConfig) -> Result<()> {
    let metrics = Arc::new(Metrics::default());
    let readiness = Arc::new(Readiness::default());
    let mut index = Index::new();
    let mut source = ManifestDir::new(&config.manifests);
    if config.kube.is_none() && !config.manifests.is_dir() {
        bail!(
            "--manifests {}: not a directory; give the folder that holds the YAML manifests",
            config.manifests.display()
        );
    }
    // The admin server answers before the first sync, which may wait for an API server: /live
    // keeps the liveness probe happy and /ready says 503 until the table is complete.
    let proxy = Proxy::new(index.reader(), metrics.clone(), config.proxy.clone());
    let admin = server::spawn(
        config.admin,
        AdminState {
            snapshot: index.reader(),
            metrics: metrics.clone(),
            endpoints: proxy.upstream.endpoints.clone(),
            readiness: readiness.clone(),
        },
    )
    .with_context(|| format!("binding the admin server to {}", config.admin))?;
    tracing::info!(%admin, "admin server listening");
    let kube = match &config.kube {
        Some(kube) => Some(KubeSource::start(kube.clone(), &mut index, &metrics).await?),
        None => {
            sync(&mut source, &mut index, &metrics)?;
            None
        }
    };

    let drain = Drain::default();
    for spec in &config.listen {
        let listener = tokio::net::TcpListener::bind(spec.addr)
            .await
            .with_context(|| format!("binding --listen {}", spec.addr))?;
        tracing::info!(addr = %spec.addr, service = %spec.service, port = spec.port, "explicit listener");
        let target = ExplicitTarget {
            service: spec.service.clone(),
            port: spec.port,
            caller_namespace: config.caller_namespace.clone(),
        };
        tokio::spawn(listener::serve_explicit(
            proxy.clone(),
            listener,
            target,
            drain.clone(),
        ));
    }

    // Redirected traffic is accepted only now, after the first complete sync: no request ever
    // sees an empty table.
    let redirect = match &config.redirect {
        None => None,
        Some(r) => Some(start_redirect(r, &proxy, &index, &drain)?),
    };
    // Ready: the table is complete and every listener, the redirect included, is serving.
    readiness
        .synced_at
        .store(server::unix_now(), Ordering::Relaxed);
    let (watcher, kube) = match kube {
        Some(kube) => {
            let on_publish: OnPublish = Box::new(move |index: &Index| {
                if let Some(redirect) = &redirect {
                    reconcile_redirect(redirect, index);
                }
            });
            let handle = kube.spawn(index, metrics.clone(), readiness.clone(), on_publish);
            (None, Some(handle))
        }
        None => {
            let watcher = tokio::spawn(watch_manifests(
                source,
                index,
                metrics.clone(),
                readiness.clone(),
                redirect,
                config.poll_interval,
            ));
            (Some(watcher), None)
        }
    };
    shutdown_signal().await;
    tracing::info!(deadline = ?config.drain_timeout, "shutting down: no new connections, finishing in-flight requests");
    if let Some(watcher) = watcher {
        watcher.abort();
    }
    if let Some(kube) = kube {
        kube.shutdown().await;
    }
    if drain.drain(config.drain_timeout).await {
        tracing::info!("drained");
    } else {
        tracing::warn!("drain deadline reached with connections still open");
    }
    Ok(())
}

fn sync(source: &mut ManifestDir, index: &mut Index, metrics: &Metrics) -> Result<bool> {
    let problems = source
        .sync(index)
        .with_context(|| format!("reading {}", source.dir().display()))?;
    for problem in problems {
        match problem.severity {
            Severity::Warning => tracing::warn!("{problem}"),
            Severity::Error => tracing::error!("{problem}"),
        }
    }
    let published = index.publish();
    if published {
        let version = index.snapshot().version;
        metrics.snapshot_version.store(version, Ordering::Relaxed);
        tracing::info!(version, "route table published");
    }
    metrics
        .last_sync_unix
        .store(server::unix_now(), Ordering::Relaxed);
    Ok(published)
}

fn start_redirect(
    config: &RedirectConfig,
    proxy: &Arc<Proxy>,
    index: &Index,
    drain: &Drain,
) -> Result<Arc<Redirect>> {
    let listener = std::net::TcpListener::bind(config.listen)
        .with_context(|| format!("binding the redirect listener {}", config.listen))?;
    let redirect = Redirect::attach(
        &config.cgroup,
        &[AgentListener {
            listener: &listener,
            addr: config.listen,
        }],
    )
    .with_context(|| {
        format!(
            "attaching the redirect programs to {}",
            config.cgroup.display()
        )
    })?;
    let redirect = Arc::new(redirect);
    reconcile_redirect(&redirect, index);
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let root = redirect::cgroup2_mount().context("finding the cgroup v2 mount")?;
    let resolver = Arc::new(KernelRedirects {
        redirect: redirect.clone(),
        cgroups: CgroupDirs::new(root),
    });
    tracing::info!(addr = %config.listen, cgroup = %config.cgroup.display(), "redirect listener; kernel programs attached");
    tokio::spawn(listener::serve_redirect(
        proxy.clone(),
        listener,
        resolver,
        drain.clone(),
    ));
    Ok(redirect)
}

/// The kernel steers exactly the frontends that have routes (see `Snapshot::mesh_addresses`).
fn reconcile_redirect(redirect: &Redirect, index: &Index) {
    match redirect.set_mesh_services(index.snapshot().mesh_addresses()) {
        Ok(change) => tracing::info!(?change, "redirected Service frontends updated"),
        Err(e) => {
            tracing::error!(error = %e, "updating the redirected Service frontends failed; the previous set stays")
        }
    }
}

async fn watch_manifests(
    mut source: ManifestDir,
    mut index: Index,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    redirect: Option<Arc<Redirect>>,
    every: Duration,
) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        match sync(&mut source, &mut index, &metrics) {
            Ok(published) => {
                readiness.stale_since.store(0, Ordering::Relaxed);
                if let (true, Some(redirect)) = (published, &redirect) {
                    reconcile_redirect(redirect, &index);
                }
            }
            Err(e) => {
                // The folder is gone or unreadable: keep serving the last good table.
                let _ = readiness.stale_since.compare_exchange(
                    0,
                    server::unix_now(),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
                tracing::error!(error = %format!("{e:#}"), "manifest folder unreadable; serving the last good table");
            }
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_spec_parses() {
        let spec: ListenSpec = "127.0.0.1:18184=bench/echo:80".parse().unwrap();
        assert_eq!(spec.addr, "127.0.0.1:18184".parse().unwrap());
        assert_eq!(spec.service, ObjectKey::new("bench", "echo"));
        assert_eq!(spec.port, 80);
        assert!("127.0.0.1:1=echo:80".parse::<ListenSpec>().is_err());
    }
}
