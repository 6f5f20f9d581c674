//! The task that owns the index: applies the watchers' updates in batches, publishes after each
//! batch, and keeps readiness (first complete sync, staleness) and the status writer's inputs.

use super::status::ServerRoute;
use super::watch::{Health, Update, Watched};
use super::writer::StatusInputs;
use crate::admin::metrics::Metrics;
use crate::admin::server::{unix_now, Readiness};
use crate::index::Index;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// A batch ends after this long without updates…
const QUIET: Duration = Duration::from_millis(5);
/// …or after this long in any case, so that a steady stream of updates still publishes.
const MAX_BATCH: Duration = Duration::from_millis(100);

/// Called after each publish (the agent reconciles the kernel redirect there).
pub type OnPublish = Box<dyn FnMut(&Index) + Send>;

pub struct Syncer {
    updates: mpsc::Receiver<Update>,
    health: BTreeMap<Watched, Health>,
    /// Kinds listed completely (or found not served) at least once.
    listed: BTreeSet<Watched>,
    routes: BTreeMap<String, Arc<ServerRoute>>,
    routes_changed: bool,
    status: watch::Sender<StatusInputs>,
}

impl Syncer {
    pub fn new(updates: mpsc::Receiver<Update>) -> Syncer {
        Syncer {
            updates,
            health: BTreeMap::new(),
            listed: BTreeSet::new(),
            routes: BTreeMap::new(),
            routes_changed: false,
            status: watch::channel(StatusInputs::default()).0,
        }
    }

    pub fn status_inputs(&self) -> watch::Receiver<StatusInputs> {
        self.status.subscribe()
    }

    /// Every kind listed completely (or found not served) at least once.
    fn complete(&self) -> bool {
        Watched::ALL.iter().all(|k| self.listed.contains(k))
    }

    /// Applies updates until every kind has been listed once, then publishes the first table.
    /// Returns `false` if the watchers are gone.
    pub async fn first_sync(&mut self, index: &mut Index, metrics: &Metrics) -> bool {
        let started = std::time::Instant::now();
        while !self.complete() {
            if !self.batch(index).await {
                return false;
            }
        }
        self.publish(index, metrics, None);
        let absent: Vec<&str> = self
            .health
            .iter()
            .filter(|(_, h)| **h == Health::Absent)
            .map(|(k, _)| k.call().kind)
            .collect();
        tracing::info!(elapsed = ?started.elapsed(), not_served = ?absent, "first complete sync with the API server");
        true
    }

    /// Runs until the watchers are gone.
    pub async fn run(
        mut self,
        mut index: Index,
        metrics: Arc<Metrics>,
        readiness: Arc<Readiness>,
        mut on_publish: OnPublish,
    ) {
        self.report_staleness(&metrics, &readiness);
        while self.batch(&mut index).await {
            self.publish(&mut index, &metrics, Some(&mut on_publish));
            self.report_staleness(&metrics, &readiness);
        }
    }

    /// Receives one batch: the first update, then whatever follows within `QUIET`.
    async fn batch(&mut self, index: &mut Index) -> bool {
        let Some(first) = self.updates.recv().await else {
            return false;
        };
        self.apply(first, index);
        let deadline = Instant::now() + MAX_BATCH;
        loop {
            let quiet = (Instant::now() + QUIET).min(deadline);
            match tokio::time::timeout_at(quiet, self.updates.recv()).await {
                Ok(Some(update)) => self.apply(update, index),
                Ok(None) => return false,
                Err(_) => return true,
            }
        }
    }

    fn apply(&mut self, update: Update, index: &mut Index) {
        match update {
            Update::Apply(object) => index.apply(object),
            Update::Delete(reference) => index.delete(&reference),
            Update::Route(key, server) => {
                let key = key.to_string();
                let changed = match server {
                    Some(s) => self.routes.insert(key, s.clone()).as_ref() != Some(&s),
                    None => self.routes.remove(&key).is_some(),
                };
                self.routes_changed |= changed;
            }
            Update::Health(kind, health) => {
                if matches!(health, Health::Synced | Health::Absent) {
                    self.listed.insert(kind);
                }
                self.health.insert(kind, health);
            }
        }
    }

    fn publish(
        &mut self,
        index: &mut Index,
        metrics: &Metrics,
        on_publish: Option<&mut OnPublish>,
    ) {
        let published = index.publish();
        if published {
            let version = index.snapshot().version;
            metrics.snapshot_version.store(version, Ordering::Relaxed);
            tracing::info!(version, "route table published");
            if let Some(f) = on_publish {
                f(index);
            }
        }
        if published || std::mem::take(&mut self.routes_changed) {
            self.status.send_replace(StatusInputs {
                snapshot: index.snapshot(),
                routes: Arc::new(self.routes.clone()),
            });
        }
        if self.stale_since() == 0 {
            metrics.last_sync_unix.store(unix_now(), Ordering::Relaxed);
        }
    }

    /// The earliest failure among kinds failing now (0: all current).
    fn stale_since(&self) -> u64 {
        self.health
            .values()
            .filter_map(|h| match h {
                Health::Failing { since } => Some(*since),
                _ => None,
            })
            .min()
            .unwrap_or(0)
    }

    fn report_staleness(&self, metrics: &Metrics, readiness: &Readiness) {
        let since = self.stale_since();
        readiness.stale_since.store(since, Ordering::Relaxed);
        metrics
            .source_stale_since_unix
            .store(since, Ordering::Relaxed);
    }
}
