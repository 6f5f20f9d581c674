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

use futures::task::AtomicWaker;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
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
    /// True: accept loops, once stopped, first take what their listener's queue holds
    /// ([`Drain::sweep_queues`]).
    sweep: Arc<AtomicBool>,
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            stop_accepting: watch::channel(false).0,
            draining: watch::channel(false).0,
            acceptors: TaskTracker::new(),
            tracker: TaskTracker::new(),
            sweep: Arc::default(),
        }
    }
}

impl Drain {
    /// For an accept loop outside the data plane (the admin server): a token `stop_accepting`
    /// waits for while it is held, and the flag that says to stop.
    pub fn acceptor(&self) -> (TaskTrackerToken, watch::Receiver<bool>) {
        (self.acceptors.token(), self.stop_accepting.subscribe())
    }

    /// The flag that says this agent stopped accepting (a SIGTERM, or a successor took over).
    pub fn stopped_accepting(&self) -> watch::Receiver<bool> {
        self.stop_accepting.subscribe()
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

    /// Past the drain deadline: the caller connections still open close with a reset, their
    /// answers cut short (an HTTP/1.0 answer ends with the connection: a FIN would make it look
    /// whole).
    pub fn reset_what_remains(&self) {
        super::io::reset_from_now_on();
    }

    /// Has the accept loops, when they stop, first take the connections their listeners' queues
    /// already hold, which closing the listeners would reset: with no successor accepting on the
    /// same sockets, they are this agent's to serve (a redirected connect the kernel steered
    /// just before it stopped steering is one).
    pub fn sweep_queues(&self) {
        self.sweep.store(true, Ordering::SeqCst);
    }

    pub(super) fn sweeps(&self) -> bool {
        self.sweep.load(Ordering::SeqCst)
    }

    /// Stops every accept loop and waits until each has returned: afterwards this process
    /// accepts nothing more (a successor may go on accepting on the same sockets). Connections
    /// start draining at once: at a takeover, the successor said Stop and is taking the relays
    /// running now, and a keep-alive client's next connection goes to it; one more relay made
    /// here would be reset at the deadline (an upgrade is refused from now on).
    pub async fn stop_accepting(&self) {
        // Kept whoever listens: a flag read later (`stopped_accepting`) must see it.
        self.stop_accepting.send_replace(true);
        self.acceptors.close();
        self.acceptors.wait().await;
        self.draining.send_replace(true);
    }

    /// Stops accepting, asks connections to finish their in-flight requests, and waits for
    /// them up to `deadline`. Returns whether every connection finished in time.
    pub async fn drain(&self, deadline: Duration) -> bool {
        self.stop_accepting().await;
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

/// [`turned_true`], for a long wait beside busy work: a connection's task waits for the drain
/// signal beside its server, and `select!` polls both at each of the task's wake-ups, several
/// per request; an accept loop waits for its stop beside every accept. Polling the watch's wait
/// takes the lock of its list of waiters, one list for every connection of every worker; this
/// wait is polled only when the signal woke it.
pub(super) async fn turned_true_polled_when_woken(flag: &mut watch::Receiver<bool>) {
    let wait = turned_true(flag);
    tokio::pin!(wait);
    PolledWhenWoken::new(wait).await
}

/// Polls its future only when that future woke the task (and at the first poll): two atomic
/// operations on the waiter's own memory otherwise.
struct PolledWhenWoken<'a, F> {
    inner: Pin<&'a mut F>,
    woken: Arc<Woken>,
}

struct Woken {
    /// The inner future woke (or was never polled).
    again: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Woken {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.again.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<'a, F: Future> PolledWhenWoken<'a, F> {
    fn new(inner: Pin<&'a mut F>) -> Self {
        let woken = Woken {
            again: AtomicBool::new(true),
            task: AtomicWaker::new(),
        };
        PolledWhenWoken {
            inner,
            woken: Arc::new(woken),
        }
    }
}

impl<F: Future> Future for PolledWhenWoken<'_, F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.woken.task.register(cx.waker());
        if !self.woken.again.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let waker = Waker::from(self.woken.clone());
        self.inner.as_mut().poll(&mut Context::from_waker(&waker))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Connections drain from the moment the agent stops accepting (at a takeover, the
    /// successor's Stop), not from the later `drain`: an upgrade made between the two was reset
    /// at the deadline, the successor having taken the relays of that moment only.
    #[tokio::test]
    async fn connections_drain_from_when_accepting_stops() {
        let drain = Drain::default();
        let draining = drain.watch();
        drain.stop_accepting().await;
        assert!(*draining.borrow());
    }

    #[tokio::test]
    async fn a_future_polled_when_woken_still_ends_when_its_signal_comes() {
        let (set, mut flag) = watch::channel(false);
        let wait = turned_true(&mut flag);
        tokio::pin!(wait);
        let mut signal = PolledWhenWoken::new(wait.as_mut());
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut signal).poll(&mut cx).is_pending());
        assert!(
            Pin::new(&mut signal).poll(&mut cx).is_pending(),
            "not woken: not polled"
        );
        set.send(true).unwrap();
        assert!(Pin::new(&mut signal).poll(&mut cx).is_ready());
    }
}
