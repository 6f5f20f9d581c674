//! The layout the benchmark floors share with the agent's data plane: a current-thread runtime
//! per core, each accepting on its own copy of one listening socket.

use anyhow::{Context, Result};
use std::future::Future;
use std::net::SocketAddr;

/// Runs `serve(listener, backends)` on a runtime per core until they all end, from the arguments
/// `LISTEN BACKEND_A BACKEND_B`; `name` is the binary's, for the usage message. Each runtime runs
/// in a `LocalSet`, so a worker's state may be `Rc` (the agent's workers do not share theirs).
pub fn run_per_core<F>(
    name: &str,
    serve: impl Fn(tokio::net::TcpListener, [SocketAddr; 2]) -> F + Copy + Send + 'static,
) -> Result<()>
where
    F: Future<Output = ()> + 'static,
{
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, a, b] = &args[..] else {
        anyhow::bail!("usage: {name} LISTEN BACKEND_A BACKEND_B (ip:port each)");
    };
    let listen: SocketAddr = listen.parse().context("LISTEN")?;
    let backends: [SocketAddr; 2] = [a.parse()?, b.parse()?];
    let listener = std::net::TcpListener::bind(listen)?;
    listener.set_nonblocking(true)?;
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let threads: Vec<_> = (0..workers)
        .map(|_| {
            let listener = listener.try_clone()?;
            Ok(std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime");
                let local = tokio::task::LocalSet::new();
                local.block_on(&runtime, async move {
                    let listener =
                        tokio::net::TcpListener::from_std(listener).expect("the listener");
                    serve(listener, backends).await
                });
            }))
        })
        .collect::<Result<_>>()?;
    for thread in threads {
        let _ = thread.join();
    }
    Ok(())
}
