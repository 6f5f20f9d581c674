//! Route status, an output: what the agent tells users through `kubectl get httproute -o yaml`.
//!
//! ```text
//!  publisher ──Published (snapshot + status as stored)──> writer (server-side apply on status.parents)
//!  lease (leader election) ──leader──────────────────────────┘
//! ```
//!
//! - `parents`: what to write into `status.parents` (pure).
//! - `writer`: writing it, while this agent holds the lease.
//! - `lease`: which agent writes (one per cluster).
//! - `mesh`: the XMesh status (supported features), by the same leader.

mod lease;
pub mod mesh;
pub mod parents;
pub mod writer;

use crate::publisher::Published;
use kube::Client;
use lease::{Elector, LeaseConfig};
use std::time::Duration;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use writer::Writer;

/// Where the status lease lives and who this agent is in it.
#[derive(Clone, Debug)]
pub struct StatusConfig {
    pub lease_namespace: String,
    pub lease_name: String,
    /// This agent's name in the lease: its Pod name, else the host name and process ID.
    pub identity: Option<String>,
}

/// The running status writer and its lease.
pub struct StatusHandle {
    writer: JoinHandle<()>,
    mesh: JoinHandle<()>,
    elector: JoinHandle<()>,
    stop: oneshot::Sender<()>,
}

/// Starts competing for the lease and, while holding it, writing what `published` says.
pub fn spawn(
    client: Client,
    config: StatusConfig,
    published: watch::Receiver<Published>,
) -> StatusHandle {
    let identity = config
        .identity
        .unwrap_or_else(|| format!("{}/{}", host_name(), std::process::id()));
    let lease = LeaseConfig::new(config.lease_namespace, config.lease_name, identity);
    let inputs = published.clone();
    let inputs_current = Box::new(move || writer::behind_input(&inputs.borrow()).is_none());
    let (elector, leader) = Elector::new(client.clone(), lease, inputs_current);
    let (stop, stopped) = oneshot::channel();
    StatusHandle {
        elector: tokio::spawn(elector.run(stopped)),
        mesh: tokio::spawn(mesh::run(client.clone(), leader.clone())),
        writer: tokio::spawn(Writer::new(client, published, leader).run()),
        stop,
    }
}

impl StatusHandle {
    /// Stops writing and releases the lease, so that another agent takes over at once.
    pub async fn shutdown(self) {
        self.writer.abort();
        self.mesh.abort();
        let _ = self.stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(3), self.elector).await;
    }
}

/// For an uninstall, once no agent runs: takes this implementation's entries out of every
/// route's status and empties its XMeshes' status, which would otherwise go on saying that
/// routes nothing applies any more are Accepted. Holds the status lease meanwhile, so that an
/// agent not yet stopped does not write them back; refused while an agent holds it.
pub async fn clear(client: Client, config: StatusConfig) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let lease = LeaseConfig::new(
        config.lease_namespace,
        config.lease_name,
        "gamma-node --clear-status".into(),
    );
    tracing::info!(namespace = %lease.namespace, name = %lease.name, "taking the status lease");
    lease::take_over_idle(client.clone(), &lease)
        .await
        .context(
            "taking the status lease (an agent that holds it would write route status back: \
             delete the DaemonSet and wait for its pods to go, then run this again)",
        )?;
    let clearing = async {
        let routes = writer::clear_routes(client.clone()).await;
        let meshes = mesh::clear(client.clone()).await;
        routes.map(|routes| routes && meshes)
    };
    let cleared = lease::holding(client.clone(), &lease, clearing)
        .await
        .context("holding the status lease while clearing; run this again")?;
    if !cleared? {
        anyhow::bail!("some status could not be cleared (see the warnings above); run this again");
    }
    tracing::info!("route and XMesh status cleared");
    Ok(())
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "gamma-node-agent".to_string())
}
