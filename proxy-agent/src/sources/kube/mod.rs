//! The Kubernetes source: follows a live cluster and reports on routes through their status.
//!
//! ```text
//!  watch (one task per kind) ──Update──> sync (owns the Index, batches, publishes)
//!                                          │ StatusInputs (snapshot + routes as stored)
//!  lease (leader election) ──leader──> writer (server-side apply on routes' status)
//! ```
//!
//! - `api`: every API call the agent makes, the table RBAC is checked against.
//! - `watch`: kube-rs watchers → `apply`/`delete`, relists that delete what vanished, health.
//! - `sync`: batching, publishing, first complete sync, staleness for `/ready` and `/metrics`.
//! - `status`: what to write into `status.parents` (pure); `writer`: writing it; `lease`: who.
//!
//! Nothing here knows routing: objects go through the same conversion as the file source, and
//! status comes from the snapshot the route engine computed.

pub mod api;
mod lease;
pub mod status;
mod sync;
pub mod watch;
pub mod writer;

pub use api::{ApiCall, API_CALLS};
pub use sync::OnPublish;

use crate::admin::metrics::Metrics;
use crate::admin::server::Readiness;
use crate::index::Index;
use kube::runtime::watcher;
use kube::Client;
use lease::{Elector, LeaseConfig};
use std::sync::Arc;
use std::time::Duration;
use sync::Syncer;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use watch::Watched;
use writer::Writer;

#[derive(Clone, Debug)]
pub struct KubeConfig {
    /// This node (downward API `spec.nodeName`): only its Pods are watched (callers are local),
    /// and it is the agent's identity in the status lease. Without it every Pod is watched and
    /// the host name is the identity.
    pub node_name: Option<String>,
    /// Where the status lease lives (the agent's namespace).
    pub lease_namespace: String,
    pub lease_name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error(
        "no Kubernetes client configuration. Outside a cluster set KUBECONFIG (or create \
         ~/.kube/config); inside, the pod needs its ServiceAccount token mounted"
    )]
    Config(#[source] kube::config::InferConfigError),
    #[error("building the Kubernetes client from the configuration")]
    Client(#[source] kube::Error),
    #[error("the watchers stopped before the first complete sync")]
    Stopped,
}

/// The source after its first complete sync, ready to run in the background.
pub struct KubeSource {
    client: Client,
    config: KubeConfig,
    identity: String,
    syncer: Syncer,
    watchers: Vec<JoinHandle<()>>,
}

impl KubeSource {
    /// Connects, starts the watchers and applies their updates to `index` until every kind has
    /// been listed once (a kind the API server does not serve counts as listed, empty), then
    /// publishes. Until then nothing is published: no request sees a partial table.
    pub async fn start(
        config: KubeConfig,
        index: &mut Index,
        metrics: &Metrics,
    ) -> Result<KubeSource, KubeError> {
        let client_config = kube::Config::infer().await.map_err(KubeError::Config)?;
        tracing::info!(api_server = %client_config.cluster_url, "following the cluster");
        let client = Client::try_from(client_config).map_err(KubeError::Client)?;
        let identity = config.node_name.clone().unwrap_or_else(host_name);
        if config.node_name.is_none() {
            tracing::warn!(identity, "no --node-name (or NODE_NAME): watching the Pods of every node, and using the host name in the status lease");
        }
        let (tx, rx) = mpsc::channel(1024);
        let watchers = Watched::ALL
            .iter()
            .map(|&kind| {
                let mut watch_config = watcher::Config::default();
                if let (Watched::Pod, Some(node)) = (kind, &config.node_name) {
                    watch_config = watch_config.fields(&format!("spec.nodeName={node}"));
                }
                tokio::spawn(watch::run(kind, client.clone(), watch_config, tx.clone()))
            })
            .collect();
        let mut syncer = Syncer::new(rx);
        if !syncer.first_sync(index, metrics).await {
            return Err(KubeError::Stopped);
        }
        Ok(KubeSource {
            client,
            config,
            identity,
            syncer,
            watchers,
        })
    }

    /// Keeps the index in step with the cluster, and writes route status while this agent
    /// holds the lease. `on_publish` runs after each published snapshot.
    pub fn spawn(
        self,
        index: Index,
        metrics: Arc<Metrics>,
        readiness: Arc<Readiness>,
        on_publish: OnPublish,
    ) -> KubeHandle {
        let inputs = self.syncer.status_inputs();
        let mut tasks = self.watchers;
        tasks.push(tokio::spawn(
            self.syncer.run(index, metrics, readiness, on_publish),
        ));
        let lease = LeaseConfig::new(
            self.config.lease_namespace.clone(),
            self.config.lease_name.clone(),
            self.identity,
        );
        let (elector, leader) = Elector::new(self.client.clone(), lease);
        let (stop, stopped) = oneshot::channel();
        let elector = tokio::spawn(elector.run(stopped));
        let writer = tokio::spawn(Writer::new(self.client, inputs, leader).run());
        KubeHandle {
            tasks,
            writer,
            elector,
            stop,
        }
    }
}

/// The running source.
pub struct KubeHandle {
    tasks: Vec<JoinHandle<()>>,
    writer: JoinHandle<()>,
    elector: JoinHandle<()>,
    stop: oneshot::Sender<()>,
}

impl KubeHandle {
    /// Stops writing status, releases the lease (so another agent takes over at once), stops
    /// watching.
    pub async fn shutdown(self) {
        self.writer.abort();
        let _ = self.stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(3), self.elector).await;
        for task in self.tasks {
            task.abort();
        }
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "gamma-node-agent".to_string())
}
