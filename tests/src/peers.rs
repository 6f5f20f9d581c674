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
    let (timeout, payload) = (timeout.as_secs_f64().to_string(), payload.to_string());
    run_client(&[
        "grpc-call",
        &target.to_string(),
        authority,
        method,
        &timeout,
        &payload,
    ])
}

/// The C-core client's harder calls on one channel to `target` (`peers.py grpc-streams`): a bidi
/// stream answered message by message, 3 MiB both ways with binary trailing metadata, 300 calls
/// at once. Returns what it saw.
pub fn grpc_streams(target: SocketAddr, authority: &str) -> Result<serde_json::Value> {
    run_client(&["grpc-streams", &target.to_string(), authority])
}

/// `uploads` client-streaming calls of 256 KiB each on one C-core channel to `target`, which the
/// server reads only after 4 s, and a unary call beside them with a 2 s deadline (`peers.py
/// grpc-uploads`). Returns `unary` (its status), `unary_ms` and `uploads` (their answers).
pub fn grpc_uploads(
    target: SocketAddr,
    authority: &str,
    uploads: usize,
) -> Result<serde_json::Value> {
    run_client(&[
        "grpc-uploads",
        &target.to_string(),
        authority,
        &uploads.to_string(),
    ])
}

/// Runs `peers.py` with `args` and parses the one JSON line it prints.
fn run_client(args: &[&str]) -> Result<serde_json::Value> {
    let started = Instant::now();
    let output = Command::new(venv().join("bin/python"))
        .arg(script())
        .args(args)
        .output()
        .with_context(|| format!("running peers.py {}", args[0]))?;
    if !output.status.success() {
        bail!(
            "peers.py {} failed after {:?}: {}",
            args[0],
            started.elapsed(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(serde_json::from_slice(&output.stdout)?)
}

/// nginx as a strict HTTP/1.1 upstream (the Debian package `cargo xtask setup` installs).
const NGINX: &str = "/usr/sbin/nginx";

/// `None` when nginx can run; otherwise why not.
pub fn nginx_unavailable() -> Option<String> {
    match Command::new(NGINX).arg("-v").stderr(Stdio::null()).status() {
        Ok(s) if s.success() => None,
        _ => Some(format!("{NGINX} does not run: run `cargo xtask setup`")),
    }
}

/// One nginx process (no master, no daemon) on a free loopback port, serving `files` from its
/// own folder with the `server` block's directives added (and `http`'s in the `http` block);
/// killed on drop.
pub struct Nginx {
    child: Child,
    pub addr: SocketAddr,
    _dir: crate::loopback::TempDir,
}

impl Nginx {
    pub fn start(http: &str, server: &str, files: &[(&str, &[u8])]) -> Result<Nginx> {
        let dir = crate::loopback::TempDir::new("nginx");
        let root = dir.0.join("www");
        for (path, bytes) in files {
            let file = root.join(path);
            std::fs::create_dir_all(file.parent().context("a file's folder")?)?;
            std::fs::write(&file, bytes)?;
        }
        let port = crate::loopback::free_port();
        let d = dir.0.display();
        let config = format!(
            "daemon off;\nmaster_process off;\nerror_log {d}/error.log warn;\npid {d}/nginx.pid;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n  access_log off;\n{http}\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  \
             fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  \
             server {{\n    listen 127.0.0.1:{port};\n    root {d}/www;\n{server}\n  }}\n}}\n"
        );
        let conf = dir.0.join("nginx.conf");
        std::fs::write(&conf, config)?;
        let child = Command::new(NGINX)
            .arg("-p")
            .arg(&dir.0)
            .arg("-e")
            .arg(dir.0.join("error.log"))
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .spawn()
            .context("starting nginx")?;
        let nginx = Nginx {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(nginx.addr).is_err() {
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(nginx._dir.0.join("error.log"));
                bail!(
                    "nginx did not listen within 10 s: {}",
                    log.unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(nginx)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
