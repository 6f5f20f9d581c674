//! RequestMirror: fire-and-forget copies of a request's head to another backend.
//!
//! Bounded: at most `max` mirrored requests in flight; beyond that they are dropped (and
//! counted), never queued, so mirroring can never slow down or pile up behind real traffic. Each
//! has `ProxyConfig::mirror_timeout` to be answered (and its answer read), so that a mirror
//! backend that never answers cannot hold the slots.
//! Bodies are not duplicated (that would mean buffering them): a mirror carries the head only.

use super::body;
use super::Proxy;
use gamma_engine::routes::Mirror;
use http::Request;
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

    pub fn send(
        &self,
        proxy: &Arc<Proxy>,
        mirrors: &[Mirror<'_>],
        parts: &http::request::Parts,
        random: u64,
    ) {
        for (i, mirror) in mirrors.iter().enumerate() {
            // A different slice of the random bits per mirror keeps their samples independent.
            let sample =
                random.rotate_left(13 * (i as u32 + 1)) % u64::from(mirror.denominator.max(1));
            if sample >= u64::from(mirror.numerator) {
                continue;
            }
            let Ok(permit) = self.slots.clone().try_acquire_owned() else {
                proxy
                    .metrics
                    .mirrors_dropped
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let Some((endpoint, in_flight)) =
                proxy
                    .upstream
                    .endpoints
                    .choose(&mirror.backend.endpoints, &[], random)
            else {
                continue;
            };
            let mut request = Request::new(body::empty());
            *request.method_mut() = parts.method.clone();
            *request.headers_mut() = parts.headers.clone();
            request.headers_mut().remove(http::header::CONTENT_LENGTH);
            request
                .headers_mut()
                .remove(http::header::TRANSFER_ENCODING);
            let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
            let Ok(uri) = format!("http://{endpoint}{path}").parse() else {
                continue;
            };
            *request.uri_mut() = uri;
            let client = proxy.upstream.client(mirror.backend.h2c).clone();
            proxy.metrics.mirrors_sent.fetch_add(1, Ordering::Relaxed);
            let (metrics, timeout) = (proxy.metrics.clone(), proxy.config.mirror_timeout);
            tokio::spawn(async move {
                let _permit = permit;
                let _in_flight = in_flight;
                let exchange = async {
                    if let Ok(response) = client.request(request).await {
                        // Drain so the pooled connection can be reused.
                        let _ = http_body_util::BodyExt::collect(response.into_body()).await;
                    }
                };
                if tokio::time::timeout(timeout, exchange).await.is_err() {
                    metrics.mirrors_timed_out.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    }
}
