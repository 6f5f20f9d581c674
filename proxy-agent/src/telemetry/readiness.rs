//! Readiness: written by the publisher (first complete sync, staleness of the sources) and the
//! agent (every listener serving), read by `/ready`.

use std::sync::atomic::AtomicU64;

/// Whether the agent may take traffic: its sources completed a first sync, and since when (if
/// ever) they are stale.
#[derive(Default)]
pub struct Readiness {
    /// Unix seconds of the first complete sync (0: not yet).
    pub synced_at: AtomicU64,
    /// Unix seconds since which the sources are stale (0: fresh).
    pub stale_since: AtomicU64,
    /// Why the kernel redirect is off although it was asked for (the kernel lacks a feature).
    pub redirect_refused: std::sync::OnceLock<String>,
    /// A successor this agent has offered its sockets to, by pid (0: in another pid namespace,
    /// as a DaemonSet's next pod is, whose pid `SO_PEERCRED` cannot name). Both agents accept on
    /// the admin listener until Stop, so a probe of the successor's pod may reach this one: it
    /// answers not ready, as the successor does until its first sync.
    handing_over_to: std::sync::Mutex<Option<u32>>,
    /// Until the first complete sync: the feeds it waits for, and how each stands.
    pub waiting_for: std::sync::Mutex<String>,
}

impl Readiness {
    /// The successor this agent is handing over to, if any (see `handing_over_to`).
    pub fn handing_over_to(&self) -> Option<u32> {
        *self.successor()
    }

    pub fn set_handing_over_to(&self, successor: Option<u32>) {
        *self.successor() = successor;
    }

    fn successor(&self) -> std::sync::MutexGuard<'_, Option<u32>> {
        self.handing_over_to
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
