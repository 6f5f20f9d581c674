//! Opaque TCP: connections that are not HTTP go to an endpoint of the Service as they are.

use super::Proxy;
use gamma_engine::routes::Frontend;
use std::sync::atomic::Ordering;
use tokio::net::TcpStream;

pub(super) async fn pass_through(proxy: &Proxy, mut downstream: TcpStream, frontend: &Frontend) {
    proxy
        .metrics
        .opaque_connections
        .fetch_add(1, Ordering::Relaxed);
    let endpoints = &frontend.direct.endpoints;
    let mut tried = Vec::new();
    while let Some((endpoint, _in_flight)) =
        proxy
            .upstream
            .endpoints
            .choose(endpoints, &tried, rand::random())
    {
        tried.push(endpoint);
        let connect =
            tokio::time::timeout(proxy.config.connect_timeout, TcpStream::connect(endpoint)).await;
        match connect {
            Ok(Ok(mut upstream)) => {
                let _ = upstream.set_nodelay(true);
                match tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await {
                    Ok((up, down)) => {
                        tracing::debug!(%endpoint, up, down, "opaque connection closed")
                    }
                    Err(e) => tracing::debug!(%endpoint, error = %e, "opaque connection ended"),
                }
                return;
            }
            _ => {
                proxy.upstream.endpoints.eject(endpoint);
                tracing::warn!(%endpoint, service = %frontend.service, "opaque TCP: connecting to the endpoint failed");
            }
        }
    }
    tracing::warn!(service = %frontend.service, port = frontend.port, "opaque TCP: no endpoint accepted the connection; closing it");
}
