//! The accept loop every listener runs, and what happens to an accepted connection: its
//! protocol is detected, then it is served as HTTP or passed through as opaque TCP. The
//! listeners differ only in how they tell who a connection is from and where it was going
//! (`explicit.rs`, `redirected.rs`).

use super::detect::{detect, Protocol};
use super::drain::{turned_true, Drain};
use super::io::Lingering;
use super::{serve, tcp, ConnectionInfo, Proxy};
use gamma_engine::routes::Snapshot;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Accepts until draining; `classify` names each connection (or refuses it: `None` closes it).
pub(super) async fn accept_loop<F>(
    proxy: Arc<Proxy>,
    listener: TcpListener,
    drain: Drain,
    classify: F,
) where
    F: Fn(SocketAddr, &Snapshot) -> Option<ConnectionInfo> + Send + Sync + 'static,
{
    // Held while this loop runs: `Drain::stop_accepting` waits for it.
    let _running = drain.acceptors.token();
    let mut stop = drain.stop_accepting.subscribe();
    loop {
        let (stream, peer) = tokio::select! {
            // First, and from the current value: once stopped, not one more accept.
            biased;
            () = turned_true(&mut stop) => return,
            accepted = async {
                if let Some(load) = &proxy.load {
                    load.my_turn().await;
                }
                listener.accept().await
            } => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: wait a little rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let Some(info) = classify(peer, &proxy.snapshot.load()) else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        proxy
            .metrics
            .connections_accepted
            .fetch_add(1, Ordering::Relaxed);
        let proxy = proxy.clone();
        let shutdown = drain.watch();
        let tracker = drain.tracker.clone();
        let opened = proxy.load.as_ref().map(|load| load.opened());
        drain.tracker.spawn(async move {
            let _opened = opened;
            proxy
                .metrics
                .connections_open
                .fetch_add(1, Ordering::Relaxed);
            let stream = Lingering::new(stream, shutdown.clone(), tracker);
            serve_connection(&proxy, stream, Arc::new(info), shutdown).await;
            proxy
                .metrics
                .connections_open
                .fetch_sub(1, Ordering::Relaxed);
        });
    }
}

async fn serve_connection(
    proxy: &Arc<Proxy>,
    stream: Lingering,
    info: Arc<ConnectionInfo>,
    shutdown: watch::Receiver<bool>,
) {
    let Some(protocol) = detect(stream.tcp(), proxy.config.detect_timeout).await else {
        return;
    };
    if protocol == Protocol::Opaque {
        let snapshot = proxy.snapshot.load_full();
        match proxy.frontend(&snapshot, &info.destination) {
            Some(frontend) => tcp::pass_through(proxy, stream.into_inner(), &frontend).await,
            None => {
                tracing::warn!(destination = ?info.destination, "opaque connection to an unknown frontend; closing it")
            }
        }
        return;
    }
    let caller = info.caller.ip;
    let http2 = protocol == Protocol::Http2;
    if let Err(e) = serve::serve_http(proxy, TokioIo::new(stream), http2, info, shutdown).await {
        tracing::debug!(error = %e, %caller, "connection ended with an error");
    }
}
