//! Opaque TCP: connections that are not HTTP go to an endpoint of the Service as they are.

use super::pump::Flow;
use super::Proxy;
use gamma_engine::routes::Frontend;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::net::TcpStream;

/// `caller`: the pod's address (session affinity); `first_bytes`: what the client sent that was
/// read already (protocol detection), sent upstream first. `frontend` is let go once an
/// endpoint accepted: a connection that lasts days must not keep its table's version alive.
pub(super) async fn pass_through(
    proxy: &Proxy,
    downstream: TcpStream,
    first_bytes: Vec<u8>,
    frontend: Arc<Frontend>,
    caller: IpAddr,
) {
    proxy
        .metrics
        .opaque_connections
        .fetch_add(1, Ordering::Relaxed);
    let mut tried = Vec::new();
    loop {
        // Each endpoint is tried once: once all were, `pick` offers tried ones again.
        let Some((endpoint, held)) = proxy
            .upstream
            .pick(&frontend.direct, caller, None, &tried, rand::random())
            .filter(|(endpoint, _)| !tried.contains(endpoint))
        else {
            break;
        };
        tried.push(endpoint);
        match super::upstream::connect_tcp(endpoint, proxy.config.connect_timeout).await {
            Ok(upstream) => {
                let _load = held.into_owned();
                drop(frontend);
                let end = proxy
                    .pumps
                    .run(
                        downstream,
                        upstream,
                        Flow {
                            pending: first_bytes,
                            ..Flow::default()
                        },
                        Flow::default(),
                    )
                    .await;
                tracing::debug!(%endpoint, ?end, "opaque connection ended");
                return;
            }
            Err(e @ super::upstream::UpstreamError::AgentShort(_)) => {
                // No other endpoint would fare better, and this one is not to blame.
                tracing::debug!(service = %frontend.service, error = %e, "opaque TCP: no connection");
                break;
            }
            Err(e) => {
                proxy.upstream.endpoints.eject(held.endpoint());
                tracing::debug!(%endpoint, service = %frontend.service, error = %e, "opaque TCP: connecting to the endpoint failed");
            }
        }
    }
    let counted = &proxy.metrics.opaque_unconnected;
    if let Some(count) = crate::telemetry::metrics::count_sampled(counted) {
        tracing::warn!(service = %frontend.service, port = frontend.port, tried = tried.len(), count, "opaque TCP: no endpoint accepted the connection; resetting it (gamma_opaque_unconnected_total counts them)");
    }
    refuse(downstream);
}

/// Closes a connection with a reset instead of a FIN. kube-proxy rejects a connection to a
/// Service that no endpoint serves, and its client sees the failure; a FIN after a connect that
/// succeeded would read as a server that had nothing to say.
fn refuse(downstream: TcpStream) {
    reset_on_close(&downstream);
}

/// Makes the socket's close a reset (RST) rather than an orderly FIN.
pub(super) fn reset_on_close(socket: impl rustix::fd::AsFd) {
    let _ = rustix::net::sockopt::set_socket_linger(socket, Some(std::time::Duration::ZERO));
}

/// TCP keepalive on a connection the agent holds (client or upstream side): a peer that vanished
/// without a FIN (a node gone, a NAT entry expired) is noticed in minutes instead of never.
/// 60 s idle, then 6 probes 10 s apart: as Envoy's and Linkerd's defaults.
pub(super) fn keepalive(socket: impl rustix::fd::AsFd) {
    use rustix::net::sockopt;
    let socket = socket.as_fd();
    let _ = sockopt::set_socket_keepalive(socket, true);
    let _ = sockopt::set_tcp_keepidle(socket, std::time::Duration::from_secs(60));
    let _ = sockopt::set_tcp_keepintvl(socket, std::time::Duration::from_secs(10));
    let _ = sockopt::set_tcp_keepcnt(socket, 6);
}

/// What every accepted connection needs (no Nagle delay, keepalive), set once on the listening
/// socket: Linux copies both to each connection it accepts, which saves five `setsockopt` calls
/// per connection.
pub(super) fn prepare_listener(listener: impl rustix::fd::AsFd) {
    let _ = rustix::net::sockopt::set_tcp_nodelay(&listener, true);
    keepalive(listener);
}

/// Takes no TCP Fast Open on a listening socket, which a host may enable for every listener
/// (`net.ipv4.tcp_fastopen` with 0x400): a steered connection would be accepted at its SYN,
/// before the caller's side is established and the kernel has recorded where it was going
/// (sockops), and then be reset as one without a record. After the socket's first `listen()`,
/// which turns it on, and before the programs steer to the socket.
pub fn refuse_fast_open(listener: impl rustix::fd::AsFd) -> std::io::Result<()> {
    set_tcp_int(listener.as_fd(), libc::TCP_FASTOPEN, 0)
}

/// `getsockopt(IPPROTO_TCP, option)` for an option rustix does not name.
fn get_tcp_int(socket: rustix::fd::BorrowedFd<'_>, option: libc::c_int) -> std::io::Result<i32> {
    use std::os::fd::AsRawFd as _;
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of_val(&value) as libc::socklen_t;
    // SAFETY: a valid descriptor, and an option buffer of the size given.
    let got = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            option,
            (&raw mut value).cast(),
            &mut len,
        )
    };
    if got == 0 {
        Ok(value)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `setsockopt(IPPROTO_TCP, option, value)` for an option rustix does not name.
fn set_tcp_int(
    socket: rustix::fd::BorrowedFd<'_>,
    option: libc::c_int,
    value: libc::c_int,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    // SAFETY: a valid descriptor, and an option value of the size given.
    let set = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            option,
            (&raw const value).cast(),
            std::mem::size_of_val(&value) as libc::socklen_t,
        )
    };
    if set == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// How long after its connect the kernel hands on a connection a deferring listener holds, at
/// most: the deferral (1 s), then the handshake's last ACK, answering the SYN-ACK sent again.
pub(super) const DEFERRAL: std::time::Duration = std::time::Duration::from_millis(1500);

/// Whether the listener defers accepting ([`defer_accept`]).
pub(super) fn defers_accept(listener: impl rustix::fd::AsFd) -> bool {
    get_tcp_int(listener.as_fd(), libc::TCP_DEFER_ACCEPT).is_ok_and(|seconds| seconds != 0)
}

/// Has the listener hand a connection to `accept()` only once its first bytes came
/// (`TCP_DEFER_ACCEPT`; `false`: at the handshake), for ports whose clients speak first
/// (`Frontend::client_speaks_first`). A worker is then woken once per connection, with the
/// request there to read, instead of at the handshake and again at the request, which also
/// registers the socket with the reactor (`socket.rs`): 12 % less CPU per new connection in
/// `cargo xtask bench peers`. A client still silent after a second is handed on anyway (the
/// kernel then takes the handshake's last ACK), so a server-first protocol behind a port
/// wrongly declared HTTP waits that second, and is served.
pub fn defer_accept(listener: impl rustix::fd::AsFd, on: bool) -> std::io::Result<()> {
    set_tcp_int(listener.as_fd(), libc::TCP_DEFER_ACCEPT, on.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::net::sockopt;
    use std::time::Duration;

    /// A host that enables TCP Fast Open for every listener (`net.ipv4.tcp_fastopen` 0x603) does
    /// not for the agent's: a connection accepted at its SYN has no record of its destination
    /// yet. In a network namespace of this test's thread, whose sysctl it may set (as root).
    #[test]
    fn listeners_take_no_fast_open_connections() {
        std::thread::spawn(|| {
            // SAFETY: CLONE_NEWNET alone changes only this thread's network namespace.
            let unshared = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(unshared, 0, "{}", std::io::Error::last_os_error());
            std::fs::write("/proc/sys/net/ipv4/tcp_fastopen", "1539").unwrap();
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let fast_open = || {
                use std::os::fd::AsFd as _;
                get_tcp_int(listener.as_fd(), libc::TCP_FASTOPEN).unwrap()
            };
            assert!(
                fast_open() > 0,
                "the host's setting applies to a new listener"
            );
            refuse_fast_open(&listener).unwrap();
            assert_eq!(fast_open(), 0);
        })
        .join()
        .unwrap();
    }

    #[tokio::test]
    async fn accepted_connections_inherit_the_listeners_options() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let plain = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (before, _) = listener.accept().await.unwrap();
        assert!(!sockopt::tcp_nodelay(&before).unwrap(), "off unless set");
        prepare_listener(&listener);
        let _client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(sockopt::tcp_nodelay(&accepted).unwrap());
        assert!(sockopt::socket_keepalive(&accepted).unwrap());
        assert_eq!(
            sockopt::tcp_keepidle(&accepted).unwrap(),
            Duration::from_secs(60)
        );
        assert_eq!(
            sockopt::tcp_keepintvl(&accepted).unwrap(),
            Duration::from_secs(10)
        );
        assert_eq!(sockopt::tcp_keepcnt(&accepted).unwrap(), 6);
        drop(plain);
    }

    /// Deferred, a connection is accepted once its first bytes came, not at its handshake;
    /// turned off again, at once.
    #[test]
    fn a_deferring_listener_hands_on_a_connection_with_its_first_bytes() {
        use std::io::{Read as _, Write as _};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted_within = |wait: Duration| {
            let deadline = std::time::Instant::now() + wait;
            loop {
                match listener.accept() {
                    Ok((stream, _)) => return Some(stream),
                    Err(_) if std::time::Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Err(_) => return None,
                }
            }
        };
        defer_accept(&listener, true).unwrap();
        let mut client = std::net::TcpStream::connect(addr).unwrap();
        // Well within the second after which the kernel hands it on anyway.
        assert!(
            accepted_within(Duration::from_millis(300)).is_none(),
            "accepted before any byte came"
        );
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let mut accepted =
            accepted_within(Duration::from_secs(5)).expect("accepted with its bytes");
        accepted.set_nonblocking(false).unwrap();
        let mut first = [0u8; 3];
        accepted.read_exact(&mut first).unwrap();
        assert_eq!(&first, b"GET");
        defer_accept(&listener, false).unwrap();
        let _silent = std::net::TcpStream::connect(addr).unwrap();
        assert!(accepted_within(Duration::from_secs(5)).is_some());
    }
}
