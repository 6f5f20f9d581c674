//! RequestMirror: fire-and-forget copies of a request's head, as the filters before the mirror
//! left it, to another backend.
//!
//! Bounded: at most `max` mirrored requests in flight; beyond that they are dropped (and
//! counted), never queued, so mirroring can never slow down or pile up behind real traffic. Each
//! has `ProxyConfig::mirror_timeout` to be answered (and its answer read), so that a mirror
//! backend that never answers cannot hold the slots.
//! A mirror's answer is read and dropped as it comes.
//! A mirror carries the request's body once the caller has sent all of it (it is kept while it
//! streams, up to `ProxyConfig::max_buffered_body`); a larger body, or one that does not end
//! within the mirror timeout, is not mirrored (and counted).

use super::body::RequestBody;
use super::forward::{strip_hop_by_hop, upstream_request};
use super::Proxy;
use gamma_engine::routes::Mirror;
use http_body_util::BodyExt as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::Semaphore;

/// Cloned for each worker: the bound is the agent's, not a worker's.
#[derive(Clone)]
pub(super) struct Mirrors {
    slots: Arc<Semaphore>,
}

impl Mirrors {
    pub fn new(max: usize) -> Self {
        Mirrors {
            slots: Arc::new(Semaphore::new(max)),
        }
    }

    /// Sends `mirrors`, each with the head its filters left, in the caller's HTTP `version`.
    pub fn send(
        &self,
        proxy: &Arc<Proxy>,
        mirrors: Vec<Mirror<'_>>,
        version: http::Version,
        body: &RequestBody,
    ) {
        // Sampled by the engine already: `mirrors` holds the copies this request makes.
        for mirror in mirrors {
            let Ok(permit) = self.slots.clone().try_acquire_owned() else {
                proxy
                    .metrics
                    .mirrors_dropped
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            };
            // A number of its own: the engine's sample also picking the endpoint sent a 1/2
            // mirror's copies to two pods all to the first (only even numbers sampled).
            let Some((endpoint, in_flight)) =
                proxy
                    .upstream
                    .endpoints
                    .choose(mirror.backend, &[], rand::random())
            else {
                continue;
            };
            // The mirror's task outlives the table's borrow.
            let in_flight = in_flight.into_owned();
            let mut head = http::Request::new(()).into_parts().0;
            head.method = mirror.head.method;
            head.uri = mirror.head.uri;
            head.version = version;
            head.headers = mirror.head.headers;
            strip_hop_by_hop(&mut head.headers, false);
            let h2 = mirror.protocol.is_h2(version == http::Version::HTTP_2);
            let mirror_body = body.for_mirror();
            let upstream = proxy.upstream.clone();
            let (metrics, timeout) = (proxy.metrics.clone(), proxy.config.mirror_timeout);
            tokio::spawn(async move {
                let _permit = permit;
                let exchange = async {
                    let Some(body) = mirror_body.whole().await else {
                        metrics.mirrors_skipped_body.fetch_add(1, Ordering::Relaxed);
                        return;
                    };
                    metrics.mirrors_sent.fetch_add(1, Ordering::Relaxed);
                    let request = upstream_request(&head, in_flight.authority(), h2, body);
                    // The task holds the count until the answer is read to its end.
                    if let Ok(response) = upstream.send(endpoint, h2, request, None).await {
                        // Read to its end, so the pooled connection can be reused, and dropped
                        // frame by frame: a mirror's answer is never kept.
                        let mut answer = response.into_body();
                        while let Some(Ok(_)) = answer.frame().await {}
                    }
                };
                if tokio::time::timeout(timeout, exchange).await.is_err() {
                    metrics.mirrors_timed_out.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    }
}
