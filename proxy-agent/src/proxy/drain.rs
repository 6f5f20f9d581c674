//! Draining (shutdown, or a successor took over: `crate::handover`): stop accepting, then close
//! connections the way clients expect, so that they reconnect instead of seeing a failure or a
//! reset:
//! - HTTP/1.1: every answer from then on says `Connection: close`; a keep-alive connection idle for
//!   [`DRAIN_IDLE_GRACE`] is closed, not before (a client may be sending a request on it right as it
//!   closes); HTTP/2: GOAWAY, in-flight streams finish (`serve.rs`);
//! - a connection the agent closes is shut down for writing first and read until the client closes
//!   its side (`io::Lingering`): closing a socket with unread bytes would send a reset.
//!
//! Opaque TCP has no way to say "reconnect": it runs until it ends or the drain deadline.

use std::time::Duration;
use tokio::sync::watch;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tokio_util::task::TaskTracker;

/// While draining, an HTTP/1.1 keep-alive connection is closed once it has moved no byte for this
/// long. Long enough that a client sending back to back always gets its next answer (with
/// `Connection: close`) instead; short enough that pooled idle connections let the agent go soon.
pub const DRAIN_IDLE_GRACE: Duration = Duration::from_secs(1);
/// Stops the accept loops, signals draining to every connection and tracks them until they finish.
#[derive(Clone)]
pub struct Drain {
    /// True: accept loops return (and close their listeners).
    pub(super) stop_accepting: watch::Sender<bool>,
    /// True: connections finish their in-flight requests and close.
    draining: watch::Sender<bool>,
    pub(super) acceptors: TaskTracker,
    pub(super) tracker: TaskTracker,
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            stop_accepting: watch::channel(false).0,
            draining: watch::channel(false).0,
            acceptors: TaskTracker::new(),
            tracker: TaskTracker::new(),
        }
    }
}

impl Drain {
    /// For an accept loop outside the data plane (the admin server): a token `stop_accepting`
    /// waits for while it is held, and the flag that says to stop.
    pub fn acceptor(&self) -> (TaskTrackerToken, watch::Receiver<bool>) {
        (self.acceptors.token(), self.stop_accepting.subscribe())
    }

    /// Runs `task` on `runtime`, as one of the connections a drain waits for.
    pub fn spawn_tracked<F>(&self, runtime: &tokio::runtime::Handle, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        runtime.spawn(self.tracker.track_future(task));
    }

    pub(super) fn watch(&self) -> watch::Receiver<bool> {
        self.draining.subscribe()
    }

    /// Stops every accept loop and waits until each has returned: afterwards this process
    /// accepts nothing more (a successor may go on accepting on the same sockets).
    pub async fn stop_accepting(&self) {
        let _ = self.stop_accepting.send(true);
        self.acceptors.close();
        self.acceptors.wait().await;
    }

    /// Stops accepting, asks connections to finish their in-flight requests, and waits for
    /// them up to `deadline`. Returns whether every connection finished in time.
    pub async fn drain(&self, deadline: Duration) -> bool {
        self.stop_accepting().await;
        let _ = self.draining.send(true);
        self.tracker.close();
        tokio::time::timeout(deadline, self.tracker.wait())
            .await
            .is_ok()
    }
}

/// Returns once the flag is true (at once if it is already), or its sender is gone.
pub async fn turned_true(flag: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns must not live across an await (it is not Send).
    let _ = flag.wait_for(|set| *set).await.map(drop);
}
