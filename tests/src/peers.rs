//! Real protocol peers from other stacks (`tests/peers/peers.py`: gRPC's C-core from PyPI's
//! grpcio, a strict HTTP/2 server on hyper-h2), run from the venv `cargo xtask setup` makes.

use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The peers' venv: `$GAMMA_PEERS_VENV`, else where `cargo xtask setup` makes it.
pub fn venv() -> PathBuf {
    std::env::var_os("GAMMA_PEERS_VENV")
        .map(Into::into)
        .unwrap_or_else(|| PathBuf::from("/var/cache/gamma-node/peers-venv"))
}

/// `None` when the peers can run; otherwise why not.
pub fn unavailable() -> Option<String> {
    let python = venv().join("bin/python");
    let imports = Command::new(&python)
        .args(["-c", "import grpc, h2"])
        .stderr(Stdio::null())
        .status();
    match imports {
        Ok(s) if s.success() => None,
        _ => Some(format!(
            "{} cannot import grpc and h2: run `cargo xtask setup`",
            python.display()
        )),
    }
}

fn script() -> PathBuf {
    crate::workspace_root().join("tests/peers/peers.py")
}

/// A peer server process; killed on drop.
pub struct Peer {
    child: Child,
    pub addr: SocketAddr,
}

impl Peer {
    /// Starts `peers.py <kind> <port> <args>` on a free loopback port and waits (at most 20 s)
    /// until it says `ready`.
    pub fn start(kind: &str, args: &[&str]) -> Result<Peer> {
        let port = crate::loopback::free_port();
        let mut child = Command::new(venv().join("bin/python"))
            .arg(script())
            .arg(kind)
            .arg(port.to_string())
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the Python peer")?;
        let stdout = child.stdout.take().context("peer stdout")?;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let ready = lines
                .next()
                .and_then(Result::ok)
                .is_some_and(|l| l == "ready");
            let _ = ready_tx.send(ready);
            // Keep draining so the peer never blocks on a full pipe.
            lines.for_each(drop);
        });
        let peer = Peer {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        match ready_rx.recv_timeout(Duration::from_secs(20)) {
            Ok(true) => Ok(peer),
            _ => bail!("the {kind} peer did not get ready within 20 s"),
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One gRPC call by C-core's client to `target` with `:authority` `authority`: method
/// `gamma.Echo/<method>` with a payload of `payload` bytes and a deadline of `timeout`. Returns
/// its JSON report: `code` (the status name), `details`, `messages`.
pub fn grpc_call(
    target: SocketAddr,
    authority: &str,
    method: &str,
    timeout: Duration,
    payload: usize,
) -> Result<serde_json::Value> {
    let started = Instant::now();
    let output = Command::new(venv().join("bin/python"))
        .arg(script())
        .args(["grpc-call", &target.to_string(), authority, method])
        .arg(timeout.as_secs_f64().to_string())
        .arg(payload.to_string())
        .output()
        .context("running the gRPC client")?;
    if !output.status.success() {
        bail!(
            "the gRPC client failed after {:?}: {}",
            started.elapsed(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(serde_json::from_slice(&output.stdout)?)
}
