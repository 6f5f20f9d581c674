//! The layout the benchmark floors share with the agent's data plane: a current-thread runtime
//! per core, each accepting on its own copy of one listening socket.

use anyhow::{Context, Result};
use std::future::Future;
use std::net::SocketAddr;

/// A worker's copies of the listening sockets: HTTP/1.1 callers on `LISTEN`, and HTTP/2 callers
/// (prior knowledge) on `LISTEN_HTTP2` if the floor takes them and it was given.
pub struct Listeners {
    pub http1: tokio::net::TcpListener,
    pub http2: Option<tokio::net::TcpListener>,
}

/// Runs `serve(listeners, backends)` on a runtime per core until they all end, from the
/// arguments `LISTEN BACKEND_A BACKEND_B`, then `[LISTEN_HTTP2]` if `takes_http2`; `name` is the
/// binary's, for the usage message. Each runtime runs in a `LocalSet`, so a worker's state may be
/// `Rc` (the agent's workers do not share theirs).
pub fn run_per_core<F>(
    name: &str,
    takes_http2: bool,
    serve: impl Fn(Listeners, [SocketAddr; 2]) -> F + Copy + Send + 'static,
) -> Result<()>
where
    F: Future<Output = ()> + 'static,
{
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (listen, a, b, listen_http2) = match &args[..] {
        [listen, a, b] => (listen, a, b, None),
        [listen, a, b, http2] if takes_http2 => (listen, a, b, Some(http2)),
        _ if takes_http2 => {
            anyhow::bail!("usage: {name} LISTEN BACKEND_A BACKEND_B [LISTEN_HTTP2] (ip:port each)")
        }
        _ => anyhow::bail!("usage: {name} LISTEN BACKEND_A BACKEND_B (ip:port each)"),
    };
    let bind = |addr: &String, what: &str| -> Result<std::net::TcpListener> {
        let listener =
            std::net::TcpListener::bind(addr.parse::<SocketAddr>().context(what.to_string())?)?;
        listener.set_nonblocking(true)?;
        Ok(listener)
    };
    let listener = bind(listen, "LISTEN")?;
    let listener_http2 = listen_http2
        .map(|addr| bind(addr, "LISTEN_HTTP2"))
        .transpose()?;
    let backends: [SocketAddr; 2] = [a.parse()?, b.parse()?];
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let threads: Vec<_> = (0..workers)
        .map(|_| {
            let listener = listener.try_clone()?;
            let listener_http2 = listener_http2.as_ref().map(|l| l.try_clone()).transpose()?;
            Ok(std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime");
                let local = tokio::task::LocalSet::new();
                local.block_on(&runtime, async move {
                    let from_std = |l| tokio::net::TcpListener::from_std(l).expect("the listener");
                    let listeners = Listeners {
                        http1: from_std(listener),
                        http2: listener_http2.map(from_std),
                    };
                    serve(listeners, backends).await
                });
            }))
        })
        .collect::<Result<_>>()?;
    for thread in threads {
        let _ = thread.join();
    }
    Ok(())
}
