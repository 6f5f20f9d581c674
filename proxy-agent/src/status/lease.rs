//! Leader election for the status writer: a `coordination.k8s.io/v1` Lease.
//!
//! Every agent is a candidate; the holder writes route status, the others only watch. The
//! algorithm is client-go's: a lease is free when it has no holder or when its record has not
//! changed for `leaseDurationSeconds` *as observed on our own clock* (so clock skew between
//! nodes does not matter); taking and renewing are updates carrying the resourceVersion read,
//! so two candidates cannot both succeed. A holder that cannot renew for `renew_deadline`, or
//! that sees another holder, stops writing at once. On shutdown the holder releases the lease
//! so that another agent takes over at its next look instead of after a lease duration.
//!
//! Status is read from the agent's own table: a candidate whose route or Service watches are
//! behind (failing, or listing again) does not campaign, and a holder behind for longer than
//! `behind_limit` lets the lease go, so that an agent whose table is current writes status
//! (the holder's writer waits while its inputs are behind: status would freeze for the cluster).
//!
//! Unlike client-go's few replicas of a controller, every node is a candidate here: a
//! candidate that sees the lease held looks again only half a lease duration later, and reads it
//! from the API server's cache, not from etcd. With 2,000 nodes, polling at the retry period
//! would be some 900 reads of etcd a second. A released lease is then taken within about 9 s, an
//! abandoned one within 1.5 lease durations of its last renewal.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use kube::Client;
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, watch};

#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This agent's identity (its Pod name).
    pub identity: String,
    pub duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
    /// How long a holder whose inputs are behind keeps the lease (a blip of the API server puts
    /// every agent behind for a moment; the holder must not hand over at each).
    pub behind_limit: Duration,
}

impl LeaseConfig {
    /// client-go's defaults (15 s, 10 s, 2 s).
    pub fn new(namespace: String, name: String, identity: String) -> LeaseConfig {
        LeaseConfig {
            namespace,
            name,
            identity,
            duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
            behind_limit: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum LeaseError {
    #[error("the lease changed since it was read (another candidate wrote it)")]
    Conflict,
    #[error(transparent)]
    Api(#[from] kube::Error),
    #[error("no answer from the API server within {0:?}")]
    TimedOut(Duration),
}

/// Takes the lease named in `config` for `config.identity` (for [`holding`] to renew), unless an
/// agent renewed it within its own duration (by this machine's
/// clock: an operator's check, not how candidates decide). Err names the holder or the race.
pub async fn take_over_idle(client: Client, config: &LeaseConfig) -> anyhow::Result<()> {
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
    let held = |holder: String| Lease {
        metadata: ObjectMeta {
            name: Some(config.name.clone()),
            namespace: Some(config.namespace.clone()),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(holder),
            lease_duration_seconds: Some(config.duration.as_secs() as i32),
            acquire_time: Some(now.clone()),
            renew_time: Some(now.clone()),
            ..LeaseSpec::default()
        }),
    };
    let Some(mut lease) = api.get_opt(&config.name).await? else {
        api.create(&PostParams::default(), &held(config.identity.clone()))
            .await?;
        return Ok(());
    };
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
    // Ours from a run cut short: taken again.
    if let Some(holder) = holder.filter(|h| *h != config.identity) {
        let duration = spec.lease_duration_seconds.unwrap_or(15).max(1) as i64;
        let renewed_since = spec
            .renew_time
            .as_ref()
            .map(|MicroTime(renewed)| now.0.duration_since(*renewed).as_secs());
        if renewed_since.is_some_and(|age| age < duration) {
            anyhow::bail!(
                "agent {holder} holds the status lease {}/{}",
                config.namespace,
                config.name
            );
        }
    }
    let transitions = spec.lease_transitions.unwrap_or(0) + 1;
    let mut ours = held(config.identity.clone());
    ours.metadata.resource_version = lease.metadata.resource_version.clone();
    if let Some(spec) = ours.spec.as_mut() {
        spec.lease_transitions = Some(transitions);
    }
    // With the resourceVersion read: an agent that took it meanwhile makes this a 409.
    api.replace(&config.name, &PostParams::default(), &ours)
        .await?;
    Ok(())
}

/// Holds the lease [`take_over_idle`] took while `work` runs, as an agent holds it (an
/// [`Elector`] of the same identity, whose first look renews it), then releases it. Err if it
/// could not be held, or was lost meanwhile: an agent may have written status since.
pub async fn holding<T>(
    client: Client,
    config: &LeaseConfig,
    work: impl std::future::Future<Output = T>,
) -> anyhow::Result<T> {
    let (elector, mut leader) = Elector::new(client, config.clone(), Box::new(|| true));
    let (stop, stopped) = oneshot::channel();
    let campaign = tokio::spawn(elector.run(stopped));
    let held = tokio::time::timeout(config.renew_deadline, leader.wait_for(|leads| *leads))
        .await
        .is_ok_and(|leads| leads.is_ok());
    let outcome = if held { Some(work.await) } else { None };
    let kept = *leader.borrow();
    let _ = stop.send(());
    let _ = campaign.await;
    match (outcome, kept) {
        (Some(outcome), true) => Ok(outcome),
        (None, _) => anyhow::bail!("the status lease could not be held"),
        (Some(_), false) => anyhow::bail!("the status lease was lost meanwhile"),
    }
}

fn from_write(e: kube::Error) -> LeaseError {
    match &e {
        kube::Error::Api(s) if s.is_conflict() || s.is_already_exists() => LeaseError::Conflict,
        _ => LeaseError::Api(e),
    }
}

/// The lease record as last read, and when (on our clock) it last changed.
struct Observed {
    record: (Option<String>, Option<MicroTime>, Option<String>),
    at: Instant,
}

pub struct Elector {
    api: Api<Lease>,
    config: LeaseConfig,
    observed: Option<Observed>,
    last_renewed: Option<Instant>,
    leader: watch::Sender<bool>,
    /// Looks at the lease that failed in a row.
    failures: u32,
    /// Whether this run of failures was told to the operator ([`operator_hint`]).
    told: bool,
    /// Whether what status is read from is current (see the module's documentation).
    inputs_current: InputsCurrent,
    /// Since when, as last looked, the inputs are behind.
    behind_since: Option<Instant>,
}

/// Asked before each look at the lease.
pub type InputsCurrent = Box<dyn Fn() -> bool + Send + Sync>;

/// What an operator must do about a failed look at the lease that no retry mends: the agent may
/// not read or write it (RBAC), or its namespace does not exist.
fn operator_hint(error: &LeaseError) -> Option<&'static str> {
    match error {
        LeaseError::Api(kube::Error::Api(status)) => match status.code {
            403 => Some(
                "grant the agent get, create and update on leases.coordination.k8s.io in the \
                 lease namespace (`proxy-agent --print-rbac`)",
            ),
            404 => Some(
                "the lease namespace may not exist: give --lease-namespace one that does (the \
                 agent's own)",
            ),
            _ => None,
        },
        _ => None,
    }
}

impl Elector {
    pub fn new(
        client: Client,
        config: LeaseConfig,
        inputs_current: InputsCurrent,
    ) -> (Elector, watch::Receiver<bool>) {
        // Typed: `api::tests` checks that `LEASES` names exactly this resource.
        let api = Api::namespaced(client, &config.namespace);
        let (leader, rx) = watch::channel(false);
        let elector = Elector {
            api,
            config,
            observed: None,
            last_renewed: None,
            leader,
            failures: 0,
            told: false,
            inputs_current,
            behind_since: None,
        };
        (elector, rx)
    }

    /// Campaigns and renews until `stop` fires, then releases the lease if held.
    pub async fn run(mut self, mut stop: oneshot::Receiver<()>) {
        loop {
            if self.stands_aside().await {
                tokio::select! {
                    _ = tokio::time::sleep(self.config.retry_period) => continue,
                    _ = &mut stop => break,
                }
            }
            // Bounded: a call that hangs (a half-open connection to the API server) must not
            // keep this agent leading past the renew deadline while another takes over.
            let outcome =
                tokio::time::timeout(self.config.renew_deadline, self.try_acquire_or_renew())
                    .await
                    .unwrap_or(Err(LeaseError::TimedOut(self.config.renew_deadline)));
            let held_by_another = matches!(outcome, Ok(false));
            self.settle(outcome);
            let period = if held_by_another {
                self.config.duration / 2
            } else {
                self.config.retry_period
            };
            // Jitter keeps candidates that started together from polling in step.
            let wait = period.mul_f64(1.0 + rand::random::<f64>() * 0.2);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = &mut stop => break,
            }
        }
        self.step_down().await;
    }

    /// Whether this agent stays out of the election for now, its inputs behind: a candidate at
    /// once, a holder once they have been for `behind_limit` (it lets the lease go then).
    async fn stands_aside(&mut self) -> bool {
        if (self.inputs_current)() {
            self.behind_since = None;
            return false;
        }
        let since = *self.behind_since.get_or_insert_with(Instant::now);
        if !*self.leader.borrow() {
            return true;
        }
        if since.elapsed() < self.config.behind_limit {
            return false;
        }
        tracing::warn!(
            lease = %self.describe(),
            behind_for = ?since.elapsed(),
            "this agent's route or Service watches are behind (its log says why): letting the \
             status lease go to an agent whose are current"
        );
        self.step_down().await;
        true
    }

    /// Stops leading, and releases the lease if this agent led.
    async fn step_down(&mut self) {
        let was_leader = self.leader.send_replace(false);
        self.last_renewed = None;
        if was_leader {
            match tokio::time::timeout(Duration::from_secs(2), self.release()).await {
                Ok(Ok(())) => tracing::info!(lease = %self.describe(), "released the status lease"),
                Ok(Err(e)) => {
                    tracing::warn!(lease = %self.describe(), error = %e, "releasing the status lease failed; another agent takes over when it expires")
                }
                Err(_) => {
                    tracing::warn!(lease = %self.describe(), "releasing the status lease timed out; another agent takes over when it expires")
                }
            }
        }
    }

    fn describe(&self) -> String {
        format!("{}/{}", self.config.namespace, self.config.name)
    }

    fn settle(&mut self, outcome: Result<bool, LeaseError>) {
        let was = *self.leader.borrow();
        if outcome.is_ok() {
            (self.failures, self.told) = (0, false);
        } else {
            self.failures += 1;
        }
        let now = match outcome {
            Ok(true) => {
                self.last_renewed = Some(Instant::now());
                true
            }
            Ok(false) => false,
            Err(e) => {
                // Still the leader until the renew deadline: a blip must not stop status writes,
                // but a leader cut off for longer may already have been replaced.
                let within = self
                    .last_renewed
                    .is_some_and(|t| t.elapsed() < self.config.renew_deadline);
                match operator_hint(&e) {
                    _ if was => {
                        tracing::warn!(lease = %self.describe(), error = %e, "renewing the status lease failed");
                    }
                    // Every agent fails alike: none leads, and no route status is written. Told
                    // once per run of failures, from the second (a lease deleted between a read
                    // and a write gives one 404).
                    Some(hint) if !self.told && self.failures > 1 => {
                        self.told = true;
                        tracing::warn!(lease = %self.describe(), error = %e, "the status lease cannot be taken, so no agent writes route status: {hint}");
                    }
                    _ => {
                        tracing::debug!(lease = %self.describe(), error = %e, "reading the status lease failed");
                    }
                }
                was && within
            }
        };
        if now != was {
            if now {
                tracing::info!(lease = %self.describe(), identity = %self.config.identity, "acquired the status lease: this agent writes route status");
            } else {
                tracing::info!(lease = %self.describe(), identity = %self.config.identity, "lost the status lease: this agent stops writing route status");
            }
            self.leader.send_replace(now);
        }
    }

    fn observe(&mut self, lease: &Lease) {
        let spec = lease.spec.clone().unwrap_or_default();
        let record = (
            spec.holder_identity,
            spec.renew_time,
            lease.metadata.resource_version.clone(),
        );
        if self.observed.as_ref().map(|o| &o.record) != Some(&record) {
            self.observed = Some(Observed {
                record,
                at: Instant::now(),
            });
        }
    }

    fn expired(&self, lease: &Lease) -> bool {
        let seconds = lease
            .spec
            .as_ref()
            .and_then(|s| s.lease_duration_seconds)
            .map_or(self.config.duration, |s| {
                Duration::from_secs(s.max(1) as u64)
            });
        self.observed
            .as_ref()
            .is_none_or(|o| o.at.elapsed() > seconds)
    }

    fn now() -> MicroTime {
        MicroTime(k8s_openapi::jiff::Timestamp::now())
    }

    /// The lease as the API server has it: its latest version for the holder, which renews it
    /// (a renewal from a stale copy would fail), the one in its cache for a candidate, which is
    /// cheap to serve to every node (a write from a stale copy fails, and is tried later).
    async fn read(&self) -> Result<Option<Lease>, kube::Error> {
        let version = if *self.leader.borrow() {
            kube::api::GetParams::default()
        } else {
            kube::api::GetParams::any()
        };
        match self.api.get_with(&self.config.name, &version).await {
            Ok(lease) => Ok(Some(lease)),
            Err(kube::Error::Api(s)) if s.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Ok(true): we hold the lease now. Ok(false): another agent does.
    async fn try_acquire_or_renew(&mut self) -> Result<bool, LeaseError> {
        let identity = self.config.identity.clone();
        let Some(mut lease) = self.read().await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.name.clone()),
                    namespace: Some(self.config.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(identity),
                    lease_duration_seconds: Some(self.config.duration.as_secs() as i32),
                    acquire_time: Some(Self::now()),
                    renew_time: Some(Self::now()),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            self.api
                .create(&PostParams::default(), &lease)
                .await
                .map_err(from_write)?;
            return Ok(true);
        };
        self.observe(&lease);
        let expired = self.expired(&lease);
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        if holder.as_deref() == Some(identity.as_str()) {
            spec.renew_time = Some(Self::now());
        } else if holder.is_some() && !expired {
            return Ok(false);
        } else {
            spec.holder_identity = Some(identity);
            spec.lease_duration_seconds = Some(self.config.duration.as_secs() as i32);
            spec.acquire_time = Some(Self::now());
            spec.renew_time = Some(Self::now());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        // `replace` sends the resourceVersion read above: it fails if anyone wrote since.
        let written = self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
            .map_err(from_write)?;
        self.observe(&written);
        Ok(true)
    }

    async fn release(&mut self) -> Result<(), LeaseError> {
        let Some(mut lease) = self.api.get_opt(&self.config.name).await? else {
            return Ok(());
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(Self::now());
        self.api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
            .map_err(from_write)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Method, Response, StatusCode};
    use http_body_util::{BodyExt, Full};
    use hyper::body::Bytes;
    use hyper_util::rt::TokioIo;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    /// An API server on 127.0.0.1 that answers each request with what `answer` makes of its
    /// method and body (`None`: it never answers, as over a half-open connection); a client of it.
    async fn api_server<F, A>(answer: F) -> Client
    where
        F: Fn(Method, Option<serde_json::Value>) -> A + Clone + Send + Sync + 'static,
        A: std::future::Future<Output = Option<(StatusCode, String)>> + Send,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let answer = answer.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |request: http::Request<hyper::body::Incoming>| {
                            let answer = answer.clone();
                            async move {
                                let method = request.method().clone();
                                let body = request.into_body().collect().await?.to_bytes();
                                let body = serde_json::from_slice(&body).ok();
                                let Some((status, body)) = answer(method, body).await else {
                                    return std::future::pending().await;
                                };
                                Ok::<_, hyper::Error>(
                                    Response::builder()
                                        .status(status)
                                        .header("content-type", "application/json")
                                        .body(Full::new(Bytes::from(body)))
                                        .unwrap(),
                                )
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Client::try_from(kube::Config::new(format!("http://{addr}").parse().unwrap())).unwrap()
    }

    type Shared<T> = Arc<std::sync::Mutex<T>>;

    /// An API server that keeps one lease, `name` in namespace `ns` with `spec`: a GET reads it,
    /// a PUT replaces it (its spec is recorded, in order).
    async fn lease_store(
        name: &str,
        spec: serde_json::Value,
    ) -> (
        Client,
        Shared<serde_json::Value>,
        Shared<Vec<serde_json::Value>>,
    ) {
        let stored = Arc::new(std::sync::Mutex::new(serde_json::json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": name, "namespace": "ns", "resourceVersion": "1"},
            "spec": spec,
        })));
        let written = Arc::new(std::sync::Mutex::new(Vec::new()));
        let client = api_server({
            let (stored, written) = (stored.clone(), written.clone());
            move |method, body: Option<serde_json::Value>| {
                let (stored, written) = (stored.clone(), written.clone());
                async move {
                    let mut stored = stored.lock().unwrap();
                    if method == Method::PUT {
                        let body = body.unwrap_or_default();
                        written.lock().unwrap().push(body["spec"].clone());
                        *stored = body;
                    }
                    Some((StatusCode::OK, stored.to_string()))
                }
            }
        })
        .await;
        (client, stored, written)
    }

    /// A look at the lease that RBAC or a missing namespace refuses is told to the operator:
    /// every agent fails alike, and no route status is ever written. It was logged at debug.
    #[test]
    fn a_lease_refused_for_want_of_rbac_or_namespace_tells_what_to_do() {
        let refused = |code: u16| {
            let mut status = kube::core::Status::failure("refused", "Refused");
            status.code = code;
            LeaseError::Api(kube::Error::Api(Box::new(status)))
        };
        assert!(operator_hint(&refused(403))
            .unwrap()
            .contains("--print-rbac"));
        assert!(operator_hint(&refused(404))
            .unwrap()
            .contains("--lease-namespace"));
        for passing in [
            refused(500),
            refused(409),
            LeaseError::Conflict,
            LeaseError::TimedOut(Duration::from_secs(1)),
        ] {
            assert!(operator_hint(&passing).is_none(), "{passing}");
        }
    }

    /// `--clear-status` holds the lease while it clears: renewed meanwhile (an agent would take
    /// a lease left unrenewed for its duration, and write status back), let go after.
    #[tokio::test]
    async fn a_lease_held_for_work_is_renewed_meanwhile_and_let_go_after() {
        let (client, _, written) = lease_store(
            "lease",
            serde_json::json!({
                "holderIdentity": "clearing", "leaseDurationSeconds": 15,
            }),
        )
        .await;
        let mut config = LeaseConfig::new("ns".into(), "lease".into(), "clearing".into());
        config.retry_period = Duration::from_millis(100);
        let work = tokio::time::sleep(Duration::from_millis(450));
        holding(client, &config, work).await.unwrap();
        let written = written.lock().unwrap();
        let (last, renewals) = written.split_last().expect("written");
        assert!(renewals.len() >= 2, "renewed while working: {written:?}");
        for renewal in renewals {
            assert_eq!(renewal["holderIdentity"], "clearing");
            assert!(renewal["renewTime"].is_string());
        }
        assert!(last["holderIdentity"].is_null(), "let go: {last}");
    }

    /// An API server that lets the lease be created, then never answers again (a connection
    /// that went half-open): the leader must step down by its renew deadline, not hang leading.
    #[tokio::test]
    async fn a_renewal_that_hangs_ends_the_leadership_by_the_renew_deadline() {
        let created = Arc::new(AtomicBool::new(false));
        let client = api_server(move |method, body| {
            let created = created.clone();
            async move {
                if created.load(Ordering::Relaxed) {
                    return None;
                }
                Some(if method == Method::POST {
                    created.store(true, Ordering::Relaxed);
                    let mut lease: serde_json::Value = body.unwrap();
                    lease["metadata"]["resourceVersion"] = "1".into();
                    (StatusCode::CREATED, lease.to_string())
                } else {
                    let missing = r#"{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404}"#;
                    (StatusCode::NOT_FOUND, missing.to_string())
                })
            }
        })
        .await;

        let config = LeaseConfig {
            renew_deadline: Duration::from_millis(300),
            retry_period: Duration::from_millis(50),
            duration: Duration::from_secs(1),
            ..LeaseConfig::new("ns".into(), "l".into(), "me".into())
        };
        let (elector, mut leader) = Elector::new(client, config, Box::new(|| true));
        let (_stop, stop) = oneshot::channel();
        tokio::spawn(elector.run(stop));
        tokio::time::timeout(Duration::from_secs(5), leader.wait_for(|l| *l))
            .await
            .expect("leads once the lease is created")
            .unwrap();
        let started = Instant::now();
        tokio::time::timeout(Duration::from_secs(5), leader.wait_for(|l| !*l))
            .await
            .expect("steps down while the renewal hangs")
            .unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "within the renew deadline and a retry: {:?}",
            started.elapsed()
        );
    }

    /// A holder whose route or Service watches stay behind lets the lease go (its writer waits
    /// meanwhile: status would freeze for the cluster while other agents are current), and
    /// campaigns again once they are current; a blip shorter than the limit keeps it.
    #[tokio::test]
    async fn a_holder_whose_inputs_stay_behind_lets_the_lease_go() {
        let (client, stored, _) = lease_store("l", serde_json::json!({})).await;
        let holder = || stored.lock().unwrap()["spec"]["holderIdentity"].clone();
        let config = LeaseConfig {
            retry_period: Duration::from_millis(20),
            behind_limit: Duration::from_millis(300),
            ..LeaseConfig::new("ns".into(), "l".into(), "me".into())
        };
        let current = Arc::new(AtomicBool::new(true));
        let inputs_current = {
            let current = current.clone();
            Box::new(move || current.load(Ordering::Relaxed))
        };
        let (elector, mut leader) = Elector::new(client, config, inputs_current);
        let (_stop, stop) = oneshot::channel();
        tokio::spawn(elector.run(stop));
        let leads = |leader: &mut watch::Receiver<bool>, wanted: bool| {
            let mut leader = leader.clone();
            async move {
                tokio::time::timeout(Duration::from_secs(5), leader.wait_for(|l| *l == wanted))
                    .await
                    .is_ok()
            }
        };
        assert!(leads(&mut leader, true).await, "leads while current");
        // A blip: kept.
        current.store(false, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(100)).await;
        current.store(true, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            *leader.borrow(),
            "a blip shorter than the limit keeps the lease"
        );
        assert_eq!(holder(), "me");

        current.store(false, Ordering::Relaxed);
        let behind = Instant::now();
        assert!(leads(&mut leader, false).await, "lets the lease go");
        assert!(behind.elapsed() >= Duration::from_millis(300));
        // Stops writing first, then releases.
        for _ in 0..100 {
            if holder().is_null() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(holder().is_null(), "released: {}", holder());
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !*leader.borrow() && holder().is_null(),
            "no campaign while behind"
        );

        current.store(true, Ordering::Relaxed);
        assert!(
            leads(&mut leader, true).await,
            "campaigns again once current"
        );
        assert_eq!(holder(), "me");
    }

    /// A candidate that sees the lease held (and renewed) by another agent looks again half a
    /// lease duration later, not every retry period: every node of a cluster is a candidate.
    #[tokio::test]
    async fn a_candidate_looks_at_a_held_lease_every_half_lease_duration() {
        let reads = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let client = api_server({
            let reads = reads.clone();
            move |_, _| {
                // Renewed by its holder between any two reads.
                let version = reads.fetch_add(1, Ordering::Relaxed) + 1;
                let lease = serde_json::json!({
                    "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": "l", "namespace": "ns",
                                 "resourceVersion": version.to_string()},
                    "spec": {"holderIdentity": "other", "leaseDurationSeconds": 1},
                });
                async move { Some((StatusCode::OK, lease.to_string())) }
            }
        })
        .await;
        let config = LeaseConfig {
            retry_period: Duration::from_millis(20),
            duration: Duration::from_millis(800),
            ..LeaseConfig::new("ns".into(), "l".into(), "me".into())
        };
        let (elector, leader) = Elector::new(client, config, Box::new(|| true));
        let (stop_sender, stop) = oneshot::channel();
        let running = tokio::spawn(elector.run(stop));
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let _ = stop_sender.send(());
        running.await.unwrap();
        assert!(!*leader.borrow());
        let reads = reads.load(Ordering::Relaxed);
        // At a retry period's pace: about 50.
        assert!((2..=4).contains(&reads), "{reads} reads in 1 s");
    }
}
