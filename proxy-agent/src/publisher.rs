//! The publisher: the one task that owns the index.
//!
//! Sources send [`Update`]s over one channel; the publisher applies them in batches and, after
//! each batch, publishes a new snapshot if the table changed. It fans the result out twice:
//! - to the data plane through an `ArcSwap` ([`Publisher::reader`]), loaded once per connection
//!   or request without a lock;
//! - to every other consumer through a `watch` of [`Published`] ([`Publisher::subscribe`]): the
//!   kernel redirect's map reconciliation, the status writer, metrics pruning.
//!
//! It also keeps readiness (first complete sync, staleness) and the table's version in
//! telemetry. Nothing it publishes feeds back into the index.

use crate::kube_api::StoredRoute;
use crate::sources::{Feed, Health, Update, Updates};
use crate::telemetry::{unix_now, Metrics, Readiness};
use arc_swap::ArcSwap;
use gamma_engine::{Index, Snapshot};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// A batch ends after this long without updates…
const QUIET: Duration = Duration::from_millis(5);
/// …or after this long in any case, so that a steady stream of updates still publishes.
const MAX_BATCH: Duration = Duration::from_millis(100);
/// A new table at most this often. Every node publishes on every EndpointSlice change in the
/// cluster (a rollout: tens a second), and each publish costs the whole table's size (the
/// index's maps cloned, the kernel's set reconciled, metrics pruned); a change after a quiet
/// spell still goes out within `QUIET`. kube-proxy's minimum sync period is a second.
const MIN_PUBLISH_INTERVAL: Duration = Duration::from_millis(100);
/// Updates a source may send ahead of the publisher.
const CHANNEL: usize = 1024;

/// What consumers see after each publish.
#[derive(Clone, Default)]
pub struct Published {
    pub snapshot: Arc<Snapshot>,
    /// Route status as the API server stores it, keyed by the route's name as displayed
    /// (`"HTTPRoute ns/name"`, as `Snapshot::status_of` reads it); empty for sources that
    /// store none.
    pub stored_status: Arc<BTreeMap<String, Arc<StoredRoute>>>,
    /// Feeds not current now (failing, or listing again after a failure): the table may lack
    /// what they changed meanwhile. Route status read from it could say what is not so.
    pub behind: Vec<Feed>,
}

/// A feed's last report says its objects are all in the index: listed completely since its
/// last failure, or not served at all.
fn current(health: &Option<Health>) -> bool {
    matches!(health, Some(Health::Synced | Health::Absent))
}

/// Every source stopped (its channel closed) before the first complete sync.
#[derive(Debug, thiserror::Error)]
#[error("the sources stopped before the first complete sync")]
pub struct SourcesStopped;

pub struct Publisher {
    updates: mpsc::Receiver<Update>,
    index: Index,
    /// Every feed the sources declared, with its last reported health.
    feeds: BTreeMap<Feed, Option<Health>>,
    /// Shared with consumers until it changes (most publishes change no route).
    stored_status: Arc<BTreeMap<String, Arc<StoredRoute>>>,
    stored_status_changed: bool,
    data_plane: Arc<ArcSwap<Snapshot>>,
    published: watch::Sender<Published>,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    /// When the last new table went out (`MIN_PUBLISH_INTERVAL`).
    last_published: Option<Instant>,
}

impl Publisher {
    /// A publisher waiting for `feeds` (see the channel contract in `crate::sources`), and the
    /// channel the sources send to.
    pub fn new(
        feeds: &[Feed],
        metrics: Arc<Metrics>,
        readiness: Arc<Readiness>,
    ) -> (Publisher, Updates) {
        let (tx, updates) = mpsc::channel(CHANNEL);
        let publisher = Publisher {
            updates,
            index: Index::new(),
            feeds: feeds.iter().map(|&f| (f, None)).collect(),
            stored_status: Arc::default(),
            stored_status_changed: false,
            data_plane: Arc::new(ArcSwap::from_pointee(Snapshot::default())),
            published: watch::channel(Published::default()).0,
            metrics,
            readiness,
            last_published: None,
        };
        (publisher, tx)
    }

    /// Compiles for the agent of node `name` (before the first update).
    pub fn serve_node(&mut self, name: &str) {
        self.index = Index::for_node(name);
    }

    /// Where the data plane loads the current snapshot from (lock-free).
    pub fn reader(&self) -> Arc<ArcSwap<Snapshot>> {
        self.data_plane.clone()
    }

    /// Every publish, for consumers that act on changes.
    pub fn subscribe(&self) -> watch::Receiver<Published> {
        self.published.subscribe()
    }

    /// Every feed listed completely (or found not served) at least once.
    fn complete(&self) -> bool {
        self.feeds.values().all(current)
    }

    /// Feeds not current now: not listed yet, failing, or listing again after a failure.
    fn behind(&self) -> Vec<Feed> {
        self.feeds
            .iter()
            .filter(|(_, health)| !current(health))
            .map(|(feed, _)| *feed)
            .collect()
    }

    /// Applies updates until every feed has been listed once, then publishes the first table.
    /// Until then nothing is published: no request sees a partial table.
    pub async fn first_sync(&mut self) -> Result<(), SourcesStopped> {
        let started = std::time::Instant::now();
        while !self.complete() {
            self.report_waiting();
            if !self.batch().await {
                return Err(SourcesStopped);
            }
        }
        // Nothing left to wait for.
        self.report_waiting();
        self.publish();
        let absent: Vec<Feed> = self
            .feeds
            .iter()
            .filter(|(_, h)| **h == Some(Health::Absent))
            .map(|(feed, _)| *feed)
            .collect();
        tracing::info!(elapsed = ?started.elapsed(), not_served = ?absent, "first complete sync");
        Ok(())
    }

    /// Runs until every source is gone.
    pub async fn run(mut self) {
        self.report_staleness();
        while self.batch().await {
            self.publish();
            self.report_staleness();
        }
    }

    /// Receives one batch: the first update, then whatever follows within `QUIET`, and at least
    /// until `MIN_PUBLISH_INTERVAL` after the last new table.
    async fn batch(&mut self) -> bool {
        let Some(first) = self.updates.recv().await else {
            return false;
        };
        self.apply(first);
        let now = Instant::now();
        let earliest = self
            .last_published
            .map_or(now, |at| at + MIN_PUBLISH_INTERVAL);
        let deadline = (now + MAX_BATCH).max(earliest);
        loop {
            let end = (Instant::now() + QUIET).max(earliest).min(deadline);
            match tokio::time::timeout_at(end, self.updates.recv()).await {
                Ok(Some(update)) => self.apply(update),
                Ok(None) => return false,
                Err(_) => return true,
            }
        }
    }

    fn apply(&mut self, update: Update) {
        match update {
            Update::Apply(object) => self.index.apply(object),
            Update::Delete(reference) => self.index.delete(&reference),
            Update::StoredStatus(key, stored) => {
                let key = key.to_string();
                // Copied on the first change after a publish (consumers hold the last one),
                // not on every update.
                let changed = match stored {
                    Some(s) if self.stored_status.get(&key) != Some(&s) => {
                        Arc::make_mut(&mut self.stored_status).insert(key, s);
                        true
                    }
                    None if self.stored_status.contains_key(&key) => {
                        Arc::make_mut(&mut self.stored_status).remove(&key);
                        true
                    }
                    _ => false,
                };
                self.stored_status_changed |= changed;
            }
            Update::Health(feed, health) => match self.feeds.get_mut(feed) {
                Some(slot) => *slot = Some(health),
                None => tracing::error!(feed, "an update from a feed the publisher was not told of; ignored (declare it in Publisher::new)"),
            },
        }
    }

    /// Publishes the batch's result: one store for the data plane, one send for the consumers.
    fn publish(&mut self) {
        let published = self.index.publish();
        if published {
            self.last_published = Some(Instant::now());
            let snapshot = self.index.snapshot();
            self.metrics
                .snapshot_version
                .store(snapshot.version, Ordering::Relaxed);
            // At info the first only: every node publishes on every EndpointSlice change in
            // the cluster.
            if snapshot.version <= 1 {
                tracing::info!(version = snapshot.version, "route table published");
            } else {
                tracing::debug!(version = snapshot.version, "route table published");
            }
            self.data_plane.store(snapshot);
        }
        let behind = self.behind();
        let behind_changed = behind != self.published.borrow().behind;
        if published || std::mem::take(&mut self.stored_status_changed) || behind_changed {
            self.published.send_replace(Published {
                snapshot: self.index.snapshot(),
                stored_status: self.stored_status.clone(),
                behind,
            });
        }
        if self.stale_since() == 0 {
            self.metrics
                .last_sync_unix
                .store(unix_now(), Ordering::Relaxed);
        }
    }

    /// The earliest failure among feeds failing now (0: all current).
    fn stale_since(&self) -> u64 {
        self.feeds
            .values()
            .filter_map(|h| match h {
                Some(Health::Failing { since }) => Some(*since),
                _ => None,
            })
            .min()
            .unwrap_or(0)
    }

    /// Says on `/ready` which feeds the first sync waits for (a watch its ClusterRole does not
    /// grant fails until it does, and the agent stays not ready).
    fn report_waiting(&self) {
        let waiting: Vec<String> = self
            .feeds
            .iter()
            .filter(|(_, health)| !current(health))
            .map(|(feed, health)| match health {
                Some(Health::Failing { since }) => {
                    format!("{feed} (failing since unix time {since}: the agent's log says why)")
                }
                _ => format!("{feed} (not listed yet)"),
            })
            .collect();
        *self.readiness.waiting_for.lock().expect("not poisoned") = waiting.join(", ");
    }

    fn report_staleness(&self) {
        let since = self.stale_since();
        self.readiness.stale_since.store(since, Ordering::Relaxed);
        self.metrics
            .source_stale_since_unix
            .store(since, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gamma_engine::manifests;

    fn objects(yaml: &str) -> Vec<Update> {
        manifests::parse(std::path::Path::new("t.yaml"), yaml)
            .objects
            .into_iter()
            .map(Update::Apply)
            .collect()
    }

    const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: echo, namespace: ns}\nspec:\n  clusterIP: 10.96.0.10\n  ports: [{name: http, port: 80}]\n";

    /// `/ready` names what the first sync waits for: a watch its ClusterRole does not grant
    /// keeps the agent not ready, and the operator is told which. Before, only "the first sync
    /// has not completed".
    #[tokio::test]
    async fn the_feeds_the_first_sync_waits_for_are_named() {
        let readiness = Arc::new(Readiness::default());
        let (mut publisher, tx) =
            Publisher::new(&["a", "b"], Arc::new(Metrics::default()), readiness.clone());
        tx.send(Update::Health("a", Health::Failing { since: 7 }))
            .await
            .unwrap();
        let waiting = tokio::time::timeout(Duration::from_millis(50), publisher.first_sync()).await;
        assert!(waiting.is_err());
        assert_eq!(
            *readiness.waiting_for.lock().unwrap(),
            "a (failing since unix time 7: the agent's log says why), b (not listed yet)"
        );
        tx.send(Update::Health("a", Health::Synced)).await.unwrap();
        tx.send(Update::Health("b", Health::Synced)).await.unwrap();
        publisher.first_sync().await.unwrap();
        assert_eq!(*readiness.waiting_for.lock().unwrap(), "");
    }

    #[tokio::test]
    async fn publishes_only_after_every_feed_synced_and_only_on_change() {
        let metrics = Arc::new(Metrics::default());
        let readiness = Arc::new(Readiness::default());
        let (mut publisher, tx) = Publisher::new(&["a", "b"], metrics, readiness.clone());
        let reader = publisher.reader();
        let mut consumer = publisher.subscribe();
        for update in objects(SERVICE) {
            tx.send(update).await.unwrap();
        }
        tx.send(Update::Health("a", Health::Synced)).await.unwrap();
        // Feed `b` has not listed yet: the first sync must still be waiting.
        let waiting = tokio::time::timeout(Duration::from_millis(50), publisher.first_sync()).await;
        assert!(waiting.is_err(), "published before feed b synced");
        assert_eq!(reader.load().version, 0);
        tx.send(Update::Health("b", Health::Absent)).await.unwrap();
        publisher.first_sync().await.unwrap();
        assert_eq!(reader.load().version, 1);
        assert!(consumer.has_changed().unwrap());
        consumer.mark_unchanged();
        let task = tokio::spawn(publisher.run());
        // The same object again changes nothing: no publish, no wake-up.
        for update in objects(SERVICE) {
            tx.send(update).await.unwrap();
        }
        tokio::time::sleep(QUIET * 4).await;
        assert!(!consumer.has_changed().unwrap());
        // A failing feed is news to consumers (route status waits for it), not a new table.
        tx.send(Update::Health("a", Health::Failing { since: 7 }))
            .await
            .unwrap();
        consumer.changed().await.unwrap();
        assert_eq!(consumer.borrow_and_update().behind, ["a"]);
        for _ in 0..200 {
            if readiness.stale_since.load(Ordering::Relaxed) == 7 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(readiness.stale_since.load(Ordering::Relaxed), 7);
        assert_eq!(reader.load().version, 1);
        // A change publishes once, to both.
        for update in objects(&SERVICE.replace("port: 80", "port: 81")) {
            tx.send(update).await.unwrap();
        }
        consumer.changed().await.unwrap();
        assert_eq!(consumer.borrow().snapshot.version, 2);
        assert_eq!(reader.load().version, 2);
        drop(tx);
        task.await.unwrap();
    }

    /// A change every 10 ms for a second (a rollout's EndpointSlices) publishes about ten tables,
    /// not a hundred; the last change is in the last one; a change after a quiet spell goes out
    /// within a few milliseconds.
    #[tokio::test(start_paused = true)]
    async fn tables_go_out_at_most_every_min_publish_interval() {
        let (mut publisher, tx) =
            Publisher::new(&["a"], Arc::new(Metrics::default()), Default::default());
        let reader = publisher.reader();
        tx.send(Update::Health("a", Health::Synced)).await.unwrap();
        publisher.first_sync().await.unwrap();
        let task = tokio::spawn(publisher.run());
        let port = |i: u32| SERVICE.replace("port: 80", &format!("port: {}", 1000 + i));
        let started = Instant::now();
        for i in 0..100 {
            for update in objects(&port(i)) {
                tx.send(update).await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let published = reader.load().version - 1;
        let most = (started.elapsed().as_millis() / MIN_PUBLISH_INTERVAL.as_millis()) as u64 + 1;
        assert!(
            (most / 2..=most).contains(&published),
            "{published} tables for 100 changes in {:?}",
            started.elapsed()
        );
        tokio::time::sleep(MIN_PUBLISH_INTERVAL).await;
        let last = reader.load();
        let ports: Vec<u16> = last.by_address.keys().map(|a| a.port()).collect();
        assert_eq!(ports, [1099], "the last change is in the last table");
        // After a quiet spell: at once.
        tokio::time::sleep(MIN_PUBLISH_INTERVAL).await;
        for update in objects(SERVICE) {
            tx.send(update).await.unwrap();
        }
        tokio::time::sleep(QUIET * 2).await;
        assert_eq!(reader.load().version, last.version + 1);
        drop(tx);
        task.await.unwrap();
    }

    #[tokio::test]
    async fn first_sync_fails_when_the_sources_stop() {
        let metrics = Arc::new(Metrics::default());
        let (mut publisher, tx) = Publisher::new(&["a"], metrics, Default::default());
        drop(tx);
        assert!(publisher.first_sync().await.is_err());
    }
}
