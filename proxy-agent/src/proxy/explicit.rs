//! The explicit listener: every connection to it is sent to one named Service port (`--listen`),
//! its callers treated as the given namespace's.

use super::accept::accept_loop;
use super::drain::Drain;
use super::{Caller, ConnectionInfo, Destination, Proxy};
use gamma_engine::model::ObjectKey;
use gamma_engine::routes::Snapshot;
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
                unverified: None,
            },
        })
    })
    .await
}

/// The explicit listeners' accept mode, kept with the table: a listener hands on a connection
/// only with its first bytes while its Service port declares HTTP (`tcp::defer_accept`), at the
/// handshake otherwise (a server-first protocol must not wait).
#[derive(Default)]
pub struct AcceptModes {
    listeners: Vec<ListenerMode>,
}

struct ListenerMode {
    listener: TcpListener,
    target: ExplicitTarget,
    /// What the socket was last set to (`None`: not yet).
    deferred: Option<bool>,
}

impl AcceptModes {
    /// Follows `listener` (a copy of it) from the next [`AcceptModes::follow`] on.
    pub fn add(&mut self, listener: &TcpListener, target: ExplicitTarget) -> std::io::Result<()> {
        self.listeners.push(ListenerMode {
            listener: listener.try_clone()?,
            target,
            deferred: None,
        });
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.listeners.is_empty()
    }

    /// Sets each listener's mode for `snapshot` where it changed.
    pub fn follow(&mut self, snapshot: &Snapshot) {
        for l in &mut self.listeners {
            let defer = snapshot
                .frontend_of(&l.target.service, l.target.port)
                .is_some_and(|frontend| frontend.client_speaks_first());
            if l.deferred == Some(defer) {
                continue;
            }
            match super::defer_accept(&l.listener, defer) {
                Ok(()) => l.deferred = Some(defer),
                Err(e) => tracing::warn!(
                    service = %l.target.service,
                    port = l.target.port,
                    defer,
                    error = %e,
                    "setting whether an explicit listener waits for a connection's first bytes failed"
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(port: &str) -> Arc<Snapshot> {
        crate::test_dir::snapshot_of(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: ns}}\nspec: \
             {{clusterIP: 10.96.0.1, ports: [{port}]}}\n"
        ))
    }

    #[test]
    fn an_explicit_listener_defers_accepting_while_its_port_declares_http() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut modes = AcceptModes::default();
        let target = ExplicitTarget {
            service: ObjectKey::new("ns", "web"),
            port: 80,
            caller_namespace: None,
        };
        modes.add(&listener, target).unwrap();
        for (port, defer) in [
            ("{name: http, port: 80}", true),
            ("{port: 80}", false),
            ("{port: 80, appProtocol: kubernetes.io/h2c}", true),
            ("{name: tcp-db, port: 80}", false),
        ] {
            modes.follow(&snapshot(port));
            assert_eq!(super::super::tcp::defers_accept(&listener), defer, "{port}");
        }
        modes.follow(&Snapshot::default());
        assert!(
            !super::super::tcp::defers_accept(&listener),
            "no such Service: not deferred"
        );
    }
}
