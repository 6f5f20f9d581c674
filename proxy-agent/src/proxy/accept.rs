//! The accept loop every listener runs, and what happens to an accepted connection: its
//! protocol is detected, then it is served as HTTP or passed through as opaque TCP. The
//! listeners differ only in how they tell who a connection is from and where it was going
//! (`explicit.rs`, `redirected.rs`).

use super::detect::{detect, Detected, Protocol};
use super::drain::{turned_true_polled_when_woken, Drain};
use super::io::Lingering;
use super::socket::Acceptor;
use super::{serve, tcp, ConnectionInfo, Proxy};
use gamma_engine::model::DeclaredProtocol;
use gamma_engine::routes::{Frontend, Snapshot};
use hyper_util::rt::TokioIo;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// The protocol a connection speaks; `None`: close it. A port that declares its protocol is not
/// sniffed: HTTP however late the first bytes come (bounded like an idle HTTP connection, by the
/// header read timeout), opaque at once. An undeclared one is sniffed for `detect_timeout`, and
/// falls to opaque TCP when nothing told (counted, and logged once per Service), or at once when
/// the client closed its side after bytes that did not tell.
async fn protocol_of(
    proxy: &Proxy,
    stream: &mut Lingering,
    frontend: &Frontend,
    caller_namespace: Option<&str>,
) -> Option<Protocol> {
    match frontend.protocol_for(caller_namespace) {
        Some(DeclaredProtocol::Opaque) => Some(Protocol::Opaque),
        Some(DeclaredProtocol::Http) => {
            match detect(stream, proxy.config.header_read_timeout).await {
                Detected::Protocol(Protocol::Http2) => Some(Protocol::Http2),
                // Declared HTTP: whatever came is parsed as HTTP/1.1 (a garbled request gets 400).
                Detected::Protocol(_) => Some(Protocol::Http1),
                Detected::TimedOut | Detected::Closed | Detected::Ended => None,
            }
        }
        None => match detect(stream, proxy.config.detect_timeout).await {
            Detected::Protocol(protocol) => Some(protocol),
            Detected::TimedOut => {
                proxy
                    .metrics
                    .opaque_after_sniff_timeout
                    .fetch_add(1, Ordering::Relaxed);
                proxy.sniff_timed_out(frontend);
                Some(Protocol::Opaque)
            }
            // Bytes that do not tell (or none), then the client's FIN: passed through as they
            // are (`nc -N svc 7000 </dev/null` reads a server's banner or dump).
            Detected::Ended => Some(Protocol::Opaque),
            Detected::Closed => None,
        },
    }
}

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
    tcp::prepare_listener(&listener);
    let listener = match Acceptor::new(listener) {
        Ok(acceptor) => acceptor,
        Err(e) => {
            tracing::error!(error = %e, "a worker could not register its listener copy; it accepts nothing on it");
            return;
        }
    };
    let mut stop = drain.stop_accepting.subscribe();
    // One wait for the whole loop: a wait made anew per accept registered with the watch and
    // left it again, each time under the lock of its waiter list, shared by every worker.
    let stopped = turned_true_polled_when_woken(&mut stop);
    tokio::pin!(stopped);
    // Stopped and taking what the queue holds (`Drain::sweep_queues`): until it is empty, and
    // the instant before which a deferring listener may still hand on connections made before.
    let mut sweeping: Option<tokio::time::Instant> = None;
    loop {
        let (stream, peer) = if let Some(until) = sweeping {
            match listener.try_accept() {
                Ok(accepted) => accepted,
                Err(_) if tokio::time::Instant::now() < until => {
                    match tokio::time::timeout_at(until, listener.accept()).await {
                        Ok(Ok(accepted)) => accepted,
                        // EMFILE and friends: what the listener holds is still to take.
                        Ok(Err(_)) => {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue;
                        }
                        // Due: a last look at the queue.
                        Err(_) => continue,
                    }
                }
                Err(_) => return,
            }
        } else {
            tokio::select! {
                // First, and from the current value: once stopped, not one more wait.
                biased;
                () = &mut stopped => {
                    if drain.sweeps() {
                        // Connections waiting for their first bytes are not in the queue yet;
                        // closing the listener would reset them when those come.
                        let held = if tcp::defers_accept(&listener) {
                            tcp::DEFERRAL
                        } else {
                            Duration::ZERO
                        };
                        sweeping = Some(tokio::time::Instant::now() + held);
                        continue;
                    }
                    return;
                }
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
            }
        };
        // Classified first even at the cap: a redirected connection's record is taken with it,
        // not left for a later connection from the same address and port to find.
        // A refused connection is reset, not closed with a FIN its client would read as a
        // server with nothing to say (`tcp::refuse`).
        let Some(info) = classify(peer, &proxy.snapshot.load()) else {
            stream.reset_on_close();
            continue;
        };
        let open = proxy.metrics.connections_open.load(Ordering::Relaxed);
        if open >= proxy.config.max_connections as i64 {
            // Closed at once: the client fails fast and retries, instead of waiting on a backlog.
            proxy
                .metrics
                .connections_refused_at_cap
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, open, "connection refused: --max-connections reached");
            stream.reset_on_close();
            continue;
        }
        // TCP_NODELAY and keepalive come from the listener (`tcp::prepare_listener`).
        proxy
            .metrics
            .connections_accepted
            .fetch_add(1, Ordering::Relaxed);
        let proxy = proxy.clone();
        let shutdown = drain.watch();
        let tracker = drain.tracker.clone();
        let open = OpenConnection::new(&proxy);
        // Boxed: tokio moves a task's future by value through `spawn` into the task's cell, a
        // copy of its whole size (the connection's, see `future_sizes`) at each step; a box is
        // one copy (measured: 1 % more new connections a second).
        drain.tracker.spawn(Box::pin(async move {
            // Counted for as long as whatever serves it holds it: an upgraded connection's pump
            // outlives this task.
            let stream = Lingering::new(stream, shutdown.clone(), tracker).counted(open);
            serve_connection(&proxy, stream, Arc::new(info), shutdown).await;
        }));
    }
}

/// Counts a connection among the open ones until dropped: its worker's (which balances
/// accepting) and the agent's (`gamma_connections_open`, which `--max-connections` caps).
pub(super) struct OpenConnection {
    _worker: Option<super::workers::Opened>,
    metrics: Arc<crate::telemetry::metrics::Metrics>,
}

impl OpenConnection {
    pub(super) fn new(proxy: &Proxy) -> Self {
        proxy
            .metrics
            .connections_open
            .fetch_add(1, Ordering::Relaxed);
        OpenConnection {
            _worker: proxy.load.as_ref().map(|load| load.opened()),
            metrics: proxy.metrics.clone(),
        }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.metrics
            .connections_open
            .fetch_sub(1, Ordering::Relaxed);
    }
}

pub(super) async fn serve_connection(
    proxy: &Arc<Proxy>,
    mut stream: Lingering,
    mut info: Arc<ConnectionInfo>,
    shutdown: watch::Receiver<bool>,
) {
    // The frontend only: a long connection must not keep a whole old table alive.
    let frontend = proxy
        .frontend(&proxy.snapshot.load(), &info.destination)
        .cloned();
    let Some(frontend) = frontend else {
        // Its Service went between the connect and the accept (or an explicit listener names
        // none): reset at once, as a connect to a Service without endpoints fails, rather than
        // sniff a client that may be waiting for the server to speak first.
        let counted = &proxy.metrics.connections_without_frontend;
        if let Some(count) = crate::telemetry::metrics::count_sampled(counted) {
            tracing::warn!(destination = ?info.destination, count, "connection to an unknown frontend; resetting it (gamma_connections_without_frontend_total counts them)");
        }
        if let Ok((stream, _, _held)) = stream.into_parts() {
            tcp::reset_on_close(&stream);
        }
        return;
    };
    if let Some(info) = Arc::get_mut(&mut info) {
        info.destination.hold_to(&frontend);
    }
    let caller_namespace = info.caller.namespace.as_deref();
    let Some(protocol) = protocol_of(proxy, &mut stream, &frontend, caller_namespace).await else {
        return;
    };
    if protocol == Protocol::Opaque {
        // Boxed: the pump's state would otherwise size every connection's task, HTTP ones
        // included.
        let (stream, first_bytes, _held) = match stream.into_parts() {
            Ok(parts) => parts,
            Err(e) => {
                tracing::warn!(error = %e, "opaque connection: registering it failed; closing it");
                return;
            }
        };
        let pass = tcp::pass_through(proxy, stream, first_bytes, frontend, info.caller.ip);
        return Box::pin(pass).await;
    }
    // Each request finds its frontend in the table current then: a connection that lasts days
    // must not keep the table's version it was accepted with alive.
    drop(frontend);
    if protocol == Protocol::Http1 {
        return serve::http1::serve(proxy, stream, info, shutdown).await;
    }
    let caller = info.caller.ip;
    if let Err(e) = serve::serve_http(proxy, TokioIo::new(stream), true, info, shutdown, None).await
    {
        tracing::debug!(error = %e, %caller, "connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::metrics::Metrics;
    use arc_swap::ArcSwap;
    use std::sync::atomic::AtomicUsize;

    /// How many connections an accept loop on `listener` takes once stopped, told to `sweep`
    /// its queue or not.
    async fn taken_once_stopped(listener: TcpListener, sweep: bool) -> usize {
        let drain = Drain::default();
        if sweep {
            drain.sweep_queues();
        }
        drain.stop_accepting.send_replace(true);
        let proxy = Proxy::new(
            Arc::new(ArcSwap::from_pointee(Snapshot::default())),
            Arc::new(Metrics::default()),
            crate::proxy::ProxyConfig::default(),
        );
        let taken = Arc::new(AtomicUsize::new(0));
        let counted = taken.clone();
        accept_loop(proxy, listener, drain, move |_, _| {
            counted.fetch_add(1, Ordering::Relaxed);
            None
        })
        .await;
        taken.load(Ordering::Relaxed)
    }

    /// Connections the kernel queued before the loop stopped: taken when told to sweep (no
    /// successor will), left otherwise (a successor accepts on the same socket).
    #[tokio::test]
    async fn a_stopped_loop_takes_what_its_queue_holds_only_when_told_to() {
        for sweep in [false, true] {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            let _queued: Vec<_> = (0..3)
                .map(|_| std::net::TcpStream::connect(addr).unwrap())
                .collect();
            let expected = if sweep { 3 } else { 0 };
            assert_eq!(
                taken_once_stopped(listener, sweep).await,
                expected,
                "sweep: {sweep}"
            );
        }
    }

    /// One loopback connection served as a connection to `destination`, with `tables` as the
    /// agent's table: the client's end and the task serving it.
    async fn serving_one(
        tables: &Arc<ArcSwap<Snapshot>>,
        destination: super::super::Destination,
    ) -> (tokio::net::TcpStream, tokio::task::JoinHandle<()>) {
        let proxy = Proxy::new(
            tables.clone(),
            Arc::new(Metrics::default()),
            crate::proxy::ProxyConfig::default(),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let drain = Drain::default();
        let stream = Lingering::new(accepted, drain.watch(), drain.tracker.clone());
        let info = ConnectionInfo {
            destination,
            caller: super::super::Caller {
                ip: "127.0.0.1".parse().unwrap(),
                namespace: None,
                pod: None,
                identity: "test",
                unverified: None,
            },
        };
        let shutdown = drain.watch();
        let serving = tokio::spawn(async move {
            serve_connection(&proxy, stream, Arc::new(info), shutdown).await;
        });
        (client, serving)
    }

    /// A GET on `client`; the answer's head, lowercased.
    async fn exchange(client: &mut tokio::net::TcpStream) -> String {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        client
            .write_all(b"GET / HTTP/1.1\r\nhost: front.ns\r\n\r\n")
            .await
            .unwrap();
        let mut answer = [0u8; 1024];
        let read = client.read(&mut answer).await.unwrap();
        String::from_utf8_lossy(&answer[..read]).to_ascii_lowercase()
    }

    /// A connection lets go of the frontend it was accepted with once its protocol is known:
    /// one that lasts days must not keep its table's version alive (the routes, the endpoints
    /// and their state). Before, every keep-alive and opaque connection held it until it closed.
    #[tokio::test]
    async fn a_served_connection_keeps_no_frontend_alive() {
        let snapshot = crate::test_dir::snapshot_of(crate::test_dir::FRONT);
        let key = gamma_engine::ObjectKey::new("ns", "front");
        let frontend = Arc::downgrade(snapshot.frontend_of(&key, 80).unwrap());
        let tables = Arc::new(ArcSwap::new(snapshot));
        let destination = super::super::Destination::Service {
            service: key,
            port: 80,
        };
        let (mut client, serving) = serving_one(&tables, destination).await;
        // No endpoint: the agent answers itself, and the connection stays open, idle.
        let answer = exchange(&mut client).await;
        assert!(answer.starts_with("http/1.1 503"), "{answer}");
        tables.store(Arc::new(Snapshot::default()));
        assert!(
            frontend.upgrade().is_none(),
            "the open connection keeps the frontend of an old table alive"
        );
        drop(client);
        serving.await.unwrap();
    }

    /// A kept connection's requests go to the Service it was accepted for: its ClusterIP given
    /// to another Service since, the next request is answered 503 and the connection closed (the
    /// client's next one goes where the name leads), not routed by the other Service's table.
    #[tokio::test]
    async fn a_kept_connection_does_not_follow_its_clusterip_to_another_service() {
        let tables = Arc::new(ArcSwap::new(crate::test_dir::snapshot_of(
            crate::test_dir::FRONT,
        )));
        let destination = super::super::Destination::Address {
            addr: "10.96.0.10:80".parse().unwrap(),
            service: None,
        };
        let (mut client, serving) = serving_one(&tables, destination).await;
        let first = exchange(&mut client).await;
        assert!(first.starts_with("http/1.1 503"), "{first}");
        assert!(!first.contains("connection: close"), "kept: {first}");
        let other = crate::test_dir::FRONT.replace("name: front", "name: other");
        tables.store(crate::test_dir::snapshot_of(&other));
        let second = exchange(&mut client).await;
        assert!(second.starts_with("http/1.1 503"), "{second}");
        assert!(second.contains("connection: close"), "{second}");
        drop(client);
        serving.await.unwrap();
    }

    /// A deferring listener holds connections until their first bytes come (or the kernel's
    /// deferral ends): swept, it takes those too, not only what its queue holds when stopped.
    #[tokio::test]
    async fn a_swept_deferring_listener_takes_connections_still_held_by_the_kernel() {
        use std::io::Write as _;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        tcp::defer_accept(&listener, true).unwrap();
        let addr = listener.local_addr().unwrap();
        let _silent = std::net::TcpStream::connect(addr).unwrap();
        let mut late = std::net::TcpStream::connect(addr).unwrap();
        let sending = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            late.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
            late
        });
        let taken = taken_once_stopped(listener, true).await;
        let _late = sending.join().unwrap();
        assert_eq!(taken, 2, "the one that sent, and the silent one");
    }
}
