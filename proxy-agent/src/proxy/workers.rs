//! The data plane's threads: one worker per core, each a single-threaded tokio runtime that
//! accepts on its own copy of every listener and serves what it accepts to the end, upstream
//! connections included (`Proxy::for_worker`: connection pools per worker).
//!
//! Why: on a multi-threaded runtime a request's task and the pooled upstream connection's task
//! run on different threads, and every exchange wakes the other thread (futex, scheduler): the
//! largest cost after the kernel's own in the profile of the keep-alive benchmark. Here a
//! connection, its requests, their upstream connections and their timers never change threads.
//! The kernel spreads new connections over the workers' pending `accept()` calls. The control
//! plane (sources, index, redirect maps, takeover) stays on the main runtime, the admin server
//! on its own.

use super::Proxy;
use std::future::Future;
use std::io;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

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
        for i in 0..count.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let handle = runtime.handle().clone();
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
                proxy: proxy.for_worker(),
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
    pub fn serve<F, Fut>(&self, listener: &std::net::TcpListener, serve: F) -> io::Result<()>
    where
        F: Fn(Arc<Proxy>, TcpListener) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        for worker in &self.workers {
            let copy = listener.try_clone()?;
            let proxy = worker.proxy.clone();
            let serve = serve.clone();
            worker.handle.spawn(async move {
                // Registered with this worker's reactor: its readiness wakes this thread only.
                match TcpListener::from_std(copy) {
                    Ok(listener) => serve(proxy, listener).await,
                    Err(e) => {
                        tracing::error!(error = %e, "a worker could not take its listener copy")
                    }
                }
            });
        }
        Ok(())
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
