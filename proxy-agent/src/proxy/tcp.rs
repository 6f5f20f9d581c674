//! Opaque TCP: connections that are not HTTP go to an endpoint of the Service as they are.

use super::pump::Flow;
use super::Proxy;
use gamma_engine::routes::Frontend;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use tokio::net::TcpStream;

/// `caller`: the pod's address (session affinity).
pub(super) async fn pass_through(
    proxy: &Proxy,
    downstream: TcpStream,
    frontend: &Frontend,
    caller: IpAddr,
) {
    proxy
        .metrics
        .opaque_connections
        .fetch_add(1, Ordering::Relaxed);
    let mut tried = Vec::new();
    while let Some((endpoint, held)) =
        proxy
            .upstream
            .pick(&frontend.direct, caller, None, &tried, rand::random())
    {
        tried.push(endpoint);
        let connect =
            tokio::time::timeout(proxy.config.connect_timeout, TcpStream::connect(endpoint)).await;
        match connect {
            Ok(Ok(upstream)) => {
                let _ = upstream.set_nodelay(true);
                keepalive(&upstream);
                let end = proxy
                    .pumps
                    .run(downstream, upstream, Flow::default(), Flow::default())
                    .await;
                tracing::debug!(%endpoint, ?end, "opaque connection ended");
                return;
            }
            _ => {
                proxy.upstream.endpoints.eject(&held);
                tracing::warn!(%endpoint, service = %frontend.service, "opaque TCP: connecting to the endpoint failed");
            }
        }
    }
    tracing::warn!(service = %frontend.service, port = frontend.port, "opaque TCP: no endpoint accepted the connection; closing it");
}

/// TCP keepalive on a connection the agent holds (client or upstream side): a peer that vanished
/// without a FIN (a node gone, a NAT entry expired) is noticed in minutes instead of never.
/// 60 s idle, then 6 probes 10 s apart: as Envoy's and Linkerd's defaults.
pub(super) fn keepalive(stream: &TcpStream) {
    use rustix::net::sockopt;
    let _ = sockopt::set_socket_keepalive(stream, true);
    let _ = sockopt::set_tcp_keepidle(stream, std::time::Duration::from_secs(60));
    let _ = sockopt::set_tcp_keepintvl(stream, std::time::Duration::from_secs(10));
    let _ = sockopt::set_tcp_keepcnt(stream, 6);
}
