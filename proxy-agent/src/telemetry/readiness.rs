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
    /// as a DaemonSet's next pod is, whose pid `SO_PEERCRED` cannot name). Until Stop this agent
    /// alone answers on the admin listener both hold, for the successor's pod too: its `/ready`
    /// says not ready, so that an HTTP probe does not take the successor for ready. A pod's own
    /// readiness is its `--ready-file` ([`keep_ready_file`]), which stays while it hands over.
    handing_over_to: std::sync::Mutex<Option<u32>>,
    /// Until the first complete sync: the feeds it waits for, and how each stands.
    pub waiting_for: std::sync::Mutex<String>,
    /// The control runtime's last heartbeat, in milliseconds of [`monotonic_ms`] (0: none yet),
    /// which `/live` reads: the admin server runs on a thread of its own, and answered live while
    /// the runtime that follows the cluster and hands over to a successor could be stuck.
    pub heartbeat_ms: AtomicU64,
}

/// How long the control runtime may go without a heartbeat before `/live` says it is stuck (a
/// heartbeat a second: a runtime that misses 30 runs nothing).
pub const HEARTBEAT_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

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

/// Keeps `path` present while this process serves: its first sync done and every listener up
/// (`synced_at`), and not stopped accepting (taken over, or shutting down); absent otherwise.
/// The DaemonSet's readiness probe reads it (`--probe-ready-file`): it is the pod's own, where
/// the admin server's socket is the node's and both agents of a takeover share it. So the old
/// pod stays ready while it hands over (a DaemonSet deletes an old pod that turns not ready once
/// its successor exists, which cut the handover short whenever the successor's first sync took
/// longer than the probes' 10 s), and the new pod turns ready once it serves.
pub async fn keep_ready_file(
    readiness: std::sync::Arc<Readiness>,
    path: std::path::PathBuf,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    let mut ticks = tokio::time::interval(READY_FILE_EVERY);
    let (mut present, mut told) = (false, false);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = crate::proxy::drain::turned_true(&mut stopped) => {
                if let Err(e) = remove_ready_file(&path) {
                    tracing::warn!(error = %e, "the pod's readiness probe may say ready a little longer");
                }
                return;
            }
        }
        let ready = readiness
            .synced_at
            .load(std::sync::atomic::Ordering::Relaxed)
            != 0;
        if ready && !present {
            match std::fs::write(&path, b"ready\n") {
                Ok(()) => present = true,
                Err(e) if !std::mem::replace(&mut told, true) => tracing::warn!(
                    path = %path.display(),
                    error = %e,
                    "cannot write the ready file: the pod is not ready to its probe; give \
                     --ready-file a writable path (an emptyDir)"
                ),
                Err(_) => {}
            }
        }
    }
}

/// How often [`keep_ready_file`] looks.
const READY_FILE_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// Removes the ready file (absent already is fine).
pub fn remove_ready_file(path: &std::path::Path) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(anyhow::Error::new(e)
                .context(format!("removing the ready file {}", path.display())))
        }
        _ => Ok(()),
    }
}

/// Beats on the current runtime once a second, for ever.
pub async fn heartbeat(readiness: std::sync::Arc<Readiness>) {
    let mut ticks = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        ticks.tick().await;
        readiness
            .heartbeat_ms
            .store(monotonic_ms(), std::sync::atomic::Ordering::Relaxed);
    }
}

/// Milliseconds of a clock that only moves forward (from 1 at its first reading in this process,
/// so that 0 stays "never"), unmoved by the wall clock's steps.
pub fn monotonic_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    1 + START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
