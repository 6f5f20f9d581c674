//! The Kubernetes source: one watcher per kind, each a feed of updates for the publisher.
//!
//! ```text
//!  watch (one task per kind: Service, EndpointSlice, Pod, HTTPRoute, GRPCRoute, ReferenceGrant,
//!         Node, Namespace) ──Update──> publisher
//! ```
//!
//! Nothing here knows routing: objects go through the engine's conversion like the manifest
//! folder's. Route status is an output (`crate::status`); this source only reports each route's
//! status as the API server stores it. Every call it makes is declared in `crate::kube_api`.

pub mod client;
pub mod watch;

pub use client::ApiTimeouts;

use crate::sources::{Feed, Updates};
use kube::runtime::watcher;
use kube::Client;
use tokio::task::JoinHandle;
use watch::Watched;

#[derive(Clone, Debug)]
pub struct KubeConfig {
    /// This node (downward API `spec.nodeName`): only its Pods are watched (callers are local).
    /// Without it every Pod is watched.
    pub node_name: Option<String>,
    /// How the client finds a connection to the API server gone silent, or an answer stalled.
    pub timeouts: ApiTimeouts,
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
    #[error("the kubeconfig's tls-server-name {0:?} is not a DNS name or IP address")]
    ServerName(String, #[source] rustls_pki_types::InvalidDnsNameError),
}

/// The feeds this source sends: one per watched kind.
pub fn feeds(config: &KubeConfig) -> Vec<Feed> {
    Watched::followed(config).map(|k| k.feed()).collect()
}

/// The running source: its client (the status writer shares it) and its watchers.
pub struct KubeSource {
    pub client: Client,
    watchers: Vec<JoinHandle<()>>,
}

/// A client of the cluster (KUBECONFIG, ~/.kube/config or in-cluster), over HTTP/2 where the
/// API server offers it, connected (`client::connect`).
pub async fn client(timeouts: ApiTimeouts) -> Result<Client, KubeError> {
    let config = kube::Config::infer().await.map_err(KubeError::Config)?;
    tracing::info!(api_server = %config.cluster_url, "connecting to the cluster");
    client::connect(config, timeouts).await
}

impl KubeSource {
    /// Connects and starts one watcher per kind, each sending to `updates`.
    pub async fn start(config: &KubeConfig, updates: Updates) -> Result<KubeSource, KubeError> {
        let client = client(config.timeouts).await?;
        if config.node_name.is_none() {
            tracing::warn!("no --node-name (or NODE_NAME): watching the Pods of every node");
        }
        let watchers = Watched::followed(config)
            .map(|kind| {
                let mut watch_config = watcher::Config::default();
                let node_only = |config: watcher::Config, field: &str, node: &str| {
                    // One node's objects, listed from the API server's watch cache (at
                    // resourceVersion 0, in one answer: a node holds a few hundred Pods at most)
                    // with its index on the field, as the kubelet lists them. A list at the
                    // latest version was read from etcd before Kubernetes 1.31: every Pod of the
                    // cluster scanned for one node's, on every node, at each relist after a
                    // control-plane restart.
                    let mut config = config.fields(&format!("{field}={node}")).any_semantic();
                    config.page_size = None; // kube-rs sends no resourceVersion 0 with a limit
                    config
                };
                match (kind, &config.node_name) {
                    (Watched::Pod, Some(node)) => {
                        watch_config = node_only(watch_config, "spec.nodeName", node);
                    }
                    (Watched::Node, Some(node)) => {
                        watch_config = node_only(watch_config, "metadata.name", node);
                    }
                    _ => {}
                }
                tokio::spawn(watch::run(
                    kind,
                    client.clone(),
                    watch_config,
                    updates.clone(),
                ))
            })
            .collect();
        Ok(KubeSource { client, watchers })
    }

    /// Stops watching.
    pub fn shutdown(self) {
        for task in self.watchers {
            task.abort();
        }
    }
}
