//! The data plane's threads: one worker per core, each a single-threaded tokio runtime that
//! accepts on its own copy of every listener and serves what it accepts to the end, upstream
//! connections included (`Proxy::for_worker`: connection pools per worker).
//!
//! Why: on a multi-threaded runtime a request's task and the pooled upstream connection's task
//! run on different threads, and every exchange wakes the other thread (futex, scheduler): the
//! largest cost after the kernel's own in the profile of the keep-alive benchmark. Here a
//! connection, its requests, their upstream connections and their timers never change threads.
//! A new connection on a listener wakes every worker waiting on it, and the first to call
//! `accept()` takes it, which favours whichever is least busy at that instant, not the one with
//! the fewest connections: long-lived connections piled up 64/36 on two workers. So a worker with
//! clearly more open connections than the least loaded one lets that one accept
//! ([`Loads::my_turn`]). The control plane (sources, index, redirect maps, takeover) stays on the
//! main runtime, the admin server on its own.

use super::accept::OpenConnection;
use super::drain::Drain;
use super::Proxy;
use std::future::Future;
use std::io;
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::{oneshot, Notify};

/// How many more open connections than the least loaded worker a worker may have and still
/// accept: a little slack, so that accepting does not hand off on every connection.
const SLACK: usize = 2;

/// Open connections per worker, and which worker this is.
#[derive(Clone)]
pub struct Loads {
    shared: Arc<SharedLoads>,
    mine: usize,
}

struct SharedLoads {
    open: Box<[OpenCount]>,
    /// Workers waiting for their turn. A change is told only when one waits: telling takes the
    /// lock of the waiter list, which every worker shares, and a connection opens and closes
    /// many times a second while workers seldom wait.
    waiting: AtomicUsize,
    /// Told when a count changes while a worker waits for its turn.
    changed: Notify,
}

/// A worker's count, on a cache line of its own: each worker writes its own at every
/// connection, and counts side by side would move the line between cores at each write.
#[repr(align(128))]
struct OpenCount(AtomicUsize);

impl SharedLoads {
    fn count_changed(&self) {
        // SeqCst with the count's change and `my_turn`'s: either this sees the waiter, or the
        // waiter's second look at the counts sees this change.
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.changed.notify_waiters();
        }
    }
}

/// Counts one open connection of a worker until dropped.
pub struct Opened(Loads);

impl Drop for Opened {
    fn drop(&mut self) {
        self.0.shared.open[self.0.mine]
            .0
            .fetch_sub(1, Ordering::SeqCst);
        self.0.shared.count_changed();
    }
}

/// Counts a worker waiting for its turn until dropped (also when the wait is cancelled).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Loads {
    fn new(workers: usize) -> Vec<Loads> {
        let shared = Arc::new(SharedLoads {
            open: (0..workers)
                .map(|_| OpenCount(AtomicUsize::new(0)))
                .collect(),
            waiting: AtomicUsize::new(0),
            changed: Notify::new(),
        });
        (0..workers)
            .map(|mine| Loads {
                shared: shared.clone(),
                mine,
            })
            .collect()
    }

    /// This worker took a connection; it counts until the guard is dropped.
    pub fn opened(&self) -> Opened {
        self.shared.open[self.mine].0.fetch_add(1, Ordering::SeqCst);
        self.shared.count_changed();
        Opened(self.clone())
    }

    /// Open connections of worker `i`.
    fn open(&self, i: usize) -> usize {
        self.shared.open[i].0.load(Ordering::SeqCst)
    }

    fn mine_open(&self) -> usize {
        self.open(self.mine)
    }

    fn may_accept(&self) -> bool {
        let least = (0..self.shared.open.len())
            .map(|i| self.open(i))
            .min()
            .unwrap_or(0);
        self.mine_open() <= least + SLACK
    }

    /// Returns once this worker may accept: at once unless another has clearly fewer open
    /// connections (that one is woken by the same new connection and takes it). Never waits
    /// forever: the least loaded worker always may.
    pub async fn my_turn(&self) {
        loop {
            // Made before looking: a change told after this wakes it, even before its first poll.
            let changed = self.shared.changed.notified();
            if self.may_accept() {
                return;
            }
            self.shared.waiting.fetch_add(1, Ordering::SeqCst);
            let _waiting = Waiting(&self.shared.waiting);
            // Again, now that changes are told: one made before was not.
            if self.may_accept() {
                return;
            }
            changed.await;
        }
    }
}

pub struct Workers {
    workers: Vec<Worker>,
}

struct Worker {
    handle: tokio::runtime::Handle,
    proxy: Arc<Proxy>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Workers {
    /// Starts `count` worker threads (at least one), each with `proxy` for its own pools.
    pub fn start(count: usize, proxy: &Proxy) -> io::Result<Workers> {
        let mut workers = Vec::new();
        let loads = Loads::new(count.max(1));
        for (i, load) in loads.into_iter().enumerate() {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let handle = runtime.handle().clone();
            proxy
                .metrics
                .runtimes
                .lock()
                .expect("not poisoned")
                .push(handle.clone());
            let (stop, stopped) = oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name(format!("worker-{i}"))
                .spawn(move || {
                    // The runtime's tasks run while this thread waits here.
                    runtime.block_on(async {
                        let _ = stopped.await;
                    });
                })?;
            // The worker's clients spawn their connection tasks and timers on the runtime
            // current where they are used: only ever this worker's.
            workers.push(Worker {
                handle,
                proxy: proxy.for_worker(load),
                stop: Some(stop),
                thread: Some(thread),
            });
        }
        Ok(Workers { workers })
    }

    pub fn count(&self) -> usize {
        self.workers.len()
    }

    /// Runs `serve` on every worker with the worker's proxy and its own copy of `listener`
    /// (one socket: the copies share its accept queue).
    pub fn serve<F, Fut>(&self, listener: &TcpListener, serve: F) -> io::Result<()>
    where
        F: Fn(Arc<Proxy>, TcpListener) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.listeners().serve(listener, serve)
    }

    /// A handle that serves listeners opened later (as [`Self::serve`]) while the workers run.
    pub fn listeners(&self) -> WorkerListeners {
        WorkerListeners {
            workers: self
                .workers
                .iter()
                .map(|w| (w.handle.clone(), w.proxy.clone()))
                .collect(),
        }
    }

    /// Runs a connection handed over by a predecessor (`serve`: how it goes on, given the
    /// worker's proxy) on the worker with the fewest open connections, counted as one it
    /// accepted: among the worker's and the agent's open connections (balancing,
    /// `--max-connections`), and waited for by a drain.
    pub fn adopt<F, Fut>(&self, drain: &Drain, serve: F)
    where
        F: FnOnce(Arc<Proxy>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let least_loaded = self
            .workers
            .iter()
            .min_by_key(|w| w.proxy.load.as_ref().map_or(0, Loads::mine_open));
        let Some(worker) = least_loaded else { return };
        let proxy = worker.proxy.clone();
        let open = OpenConnection::new(&proxy);
        drain.spawn_tracked(&worker.handle, async move {
            let _open = open;
            serve(proxy).await;
        });
    }
}

/// Serves listeners on the workers ([`Workers::listeners`]); once the workers stopped, what it
/// spawns is dropped with their runtimes.
#[derive(Clone)]
pub struct WorkerListeners {
    workers: Vec<(tokio::runtime::Handle, Arc<Proxy>)>,
}

impl WorkerListeners {
    /// See [`Workers::serve`].
    pub fn serve<F, Fut>(&self, listener: &TcpListener, serve: F) -> io::Result<()>
    where
        F: Fn(Arc<Proxy>, TcpListener) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.serve_copies(self.copies(listener)?, serve);
        Ok(())
    }

    /// A copy of `listener` for each worker, for [`Self::serve_copies`]: what can fail, apart.
    pub fn copies(&self, listener: &TcpListener) -> io::Result<Vec<TcpListener>> {
        self.workers.iter().map(|_| listener.try_clone()).collect()
    }

    /// Runs `serve` on every worker with the worker's proxy and its copy.
    pub fn serve_copies<F, Fut>(&self, copies: Vec<TcpListener>, serve: F)
    where
        F: Fn(Arc<Proxy>, TcpListener) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        for ((handle, proxy), copy) in self.workers.iter().zip(copies) {
            // Registered by the accept loop, on this worker's reactor: its readiness wakes this
            // thread only.
            handle.spawn(serve.clone()(proxy.clone(), copy));
        }
    }
}

impl Drop for Workers {
    /// Stops the runtimes (their remaining tasks are dropped) and waits for the threads.
    fn drop(&mut self) {
        for worker in &mut self.workers {
            if let Some(stop) = worker.stop.take() {
                let _ = stop.send(());
            }
        }
        for worker in &mut self.workers {
            if let Some(thread) = worker.thread.take() {
                let _ = thread.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_worker_with_clearly_more_connections_waits_for_the_others() {
        let loads = Loads::new(2);
        let (busy, idle) = (&loads[0], &loads[1]);
        let mut held: Vec<Opened> = (0..=SLACK).map(|_| busy.opened()).collect();
        assert!(!busy.may_accept(), "{} open, the other 0", SLACK + 1);
        assert!(idle.may_accept(), "the least loaded worker always may");
        let waiting = tokio::spawn({
            let busy = busy.clone();
            async move { busy.my_turn().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished());
        // The other worker takes one: within the slack again.
        held.push(idle.opened());
        tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("woken when the loads changed")
            .unwrap();
        assert_eq!(busy.shared.waiting.load(Ordering::SeqCst), 0);
        // A wait given up (its accept loop stopped) leaves no waiter counted.
        held.extend((0..SLACK).map(|_| busy.opened()));
        let given_up = tokio::time::timeout(Duration::from_millis(20), busy.my_turn()).await;
        assert!(given_up.is_err(), "still too many more than the other");
        assert_eq!(busy.shared.waiting.load(Ordering::SeqCst), 0);
        // Closing connections also counts.
        drop(std::mem::take(&mut held));
        assert!(busy.may_accept() && idle.may_accept());
    }
}
