//! The explicit listener: every connection to it is sent to one named Service port (`--listen`),
//! its callers treated as the given namespace's.

use super::accept::accept_loop;
use super::drain::Drain;
use super::{Caller, ConnectionInfo, Destination, Proxy};
use gamma_engine::model::ObjectKey;
use std::net::TcpListener;
use std::sync::Arc;

/// How an explicit listener's connections are treated.
#[derive(Clone, Debug)]
pub struct ExplicitTarget {
    pub service: ObjectKey,
    pub port: u16,
    /// Whose consumer routes apply (default: the Service's namespace, i.e. producer routes).
    pub caller_namespace: Option<String>,
}

/// Serves the explicit listener until draining.
pub async fn serve_explicit(
    proxy: Arc<Proxy>,
    listener: TcpListener,
    target: ExplicitTarget,
    drain: Drain,
) {
    let namespace = target
        .caller_namespace
        .as_deref()
        .map_or_else(|| target.service.namespace.clone(), Into::into);
    accept_loop(proxy, listener, drain, move |peer, _| {
        Some(ConnectionInfo {
            destination: Destination::Service {
                service: target.service.clone(),
                port: target.port,
            },
            caller: Caller {
                ip: peer.ip(),
                namespace: Some(namespace.clone()),
                pod: None,
                identity: "explicit-listener",
            },
        })
    })
    .await
}
