//! The redirect listener: connections the kernel steered to the agent, each with the Service
//! address it was going to and the pod that made it (`crate::redirect`).

use super::accept::accept_loop;
use super::drain::Drain;
use super::{Caller, ConnectionInfo, Destination, Proxy};
use gamma_engine::routes::Snapshot;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

/// The facts of a redirected connection: where it was going and who sent it.
pub trait OriginalDestination: Send + Sync {
    /// Where the connection from `peer`, accepted on the listener at `listener_port`, was going,
    /// and who made it.
    fn resolve(
        &self,
        peer: SocketAddr,
        listener_port: u16,
        snapshot: &Snapshot,
    ) -> Option<(SocketAddr, Caller)>;
}

/// Serves the redirect listener until draining; a connection without a redirect record is closed.
pub async fn serve_redirect(
    proxy: Arc<Proxy>,
    listener: TcpListener,
    redirects: Arc<dyn OriginalDestination>,
    drain: Drain,
) {
    let listener_port = match listener.local_addr() {
        Ok(addr) => addr.port(),
        Err(e) => {
            tracing::error!(error = %e, "the redirect listener has no address; not serving it");
            return;
        }
    };
    let metrics = proxy.metrics.clone();
    accept_loop(proxy, listener, drain, move |peer, snapshot| {
        let resolved = redirects.resolve(peer, listener_port, snapshot);
        if resolved.is_none() {
            // Anyone who reaches the node's port can make such connections.
            let counted = &metrics.redirected_without_record;
            if let Some(count) = crate::telemetry::metrics::count_sampled(counted) {
                tracing::warn!(%peer, count, "connections to the redirect listener without a redirect record (made straight to it, the record evicted, or reset by the caller before it was accepted) are reset");
            }
        }
        resolved.map(|(original, caller)| ConnectionInfo {
            destination: Destination::Address {
                addr: original,
                service: None,
            },
            caller,
        })
    })
    .await
}
