//! What the robustness tests read from a running agent: its metrics, open file descriptors and
//! memory; and raw client exchanges that a well-behaved HTTP client would never send.

use crate::loopback::{http_get, Agent};
use anyhow::{Context, Result};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// The sample `name` (with its labels, if any: `gamma_takeover_duration_seconds{phase="total"}`)
/// of a `/metrics` text.
pub fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let (metric, value) = line.split_once(' ')?;
        (metric == name)
            .then(|| value.trim().parse().ok())
            .flatten()
    })
}

/// How the agent pumped its opaque and upgraded connections, from a `/metrics` text
/// (`gamma_pumped_connections_total`; 0 when absent): (spliced, copied).
pub fn pumped(metrics: &str) -> (u64, u64) {
    let carried = |how: &str| {
        let name = format!("gamma_pumped_connections_total{{carry=\"{how}\"}}");
        sample(metrics, &name).map_or(0, |n| n as u64)
    };
    (carried("splice"), carried("copy"))
}

/// One unlabelled sample of the agent's `/metrics` (e.g. `gamma_connections_open`).
pub fn metric(agent: &Agent, name: &str) -> Result<f64> {
    let text = http_get(agent.admin, "/metrics")?;
    sample(&text, name).with_context(|| format!("/metrics has no sample `{name}`"))
}

/// Open file descriptors of a process (sockets included).
pub fn open_fds(pid: u32) -> Result<usize> {
    let dir = format!("/proc/{pid}/fd");
    Ok(std::fs::read_dir(&dir)
        .with_context(|| format!("reading {dir}"))?
        .count())
}

/// Resident memory of a process in KiB (`VmRSS` of /proc/<pid>/status).
pub fn rss_kib(pid: u32) -> Result<u64> {
    status_field(pid, "VmRSS:")
}

/// Threads of a process (`Threads` of /proc/<pid>/status).
pub fn threads(pid: u32) -> Result<u64> {
    status_field(pid, "Threads:")
}

/// The number a /proc/<pid>/status line starts with (`kB` units left off).
/// Makes a socket's close a reset (RST) rather than an orderly FIN.
pub fn reset_on_close(socket: impl rustix::fd::AsFd) {
    rustix::net::sockopt::set_socket_linger(socket, Some(Duration::ZERO)).expect("SO_LINGER");
}

/// Peak resident memory of a process in KiB (`VmHWM` of /proc/<pid>/status).
pub fn peak_rss_kib(pid: u32) -> Result<u64> {
    status_field(pid, "VmHWM:")
}

fn status_field(pid: u32, field: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("{path} has no {field} line"))
}

/// The agent's connection and upstream gauges, with its open descriptors.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Resources {
    pub connections_open: f64,
    pub upstream_in_flight: f64,
    pub fds: usize,
}

impl Resources {
    pub fn of(agent: &Agent) -> Result<Resources> {
        Ok(Resources {
            connections_open: metric(agent, "gamma_connections_open")?,
            upstream_in_flight: metric(agent, "gamma_upstream_requests_in_flight")?,
            fds: open_fds(agent.child.id())?,
        })
    }

    /// Polls until no client connection and no upstream request is left and the agent holds
    /// at most `max_fds` descriptors, or `limit` passes; returns the last reading either way, so
    /// the caller's assertion shows what was left.
    pub fn settle(agent: &Agent, max_fds: usize, limit: Duration) -> Result<Resources> {
        let deadline = Instant::now() + limit;
        loop {
            let now = Resources::of(agent)?;
            let settled =
                now.connections_open == 0.0 && now.upstream_in_flight == 0.0 && now.fds <= max_fds;
            if settled || Instant::now() > deadline {
                return Ok(now);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The `Content-Length` a message head (as text) declares, if any.
pub fn content_length(head: &str) -> Option<usize> {
    head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse().ok())
            .flatten()
    })
}

/// What a raw client saw: the bytes the agent sent, and how the connection ended.
#[derive(Debug)]
pub struct RawReply {
    pub text: String,
    /// The agent closed the connection (EOF or reset) before the read timeout.
    pub closed: bool,
    /// The close was a reset (ECONNRESET) rather than an orderly FIN.
    pub reset: bool,
}

impl RawReply {
    /// Status codes of the responses in the reply, in order.
    pub fn statuses(&self) -> Vec<u16> {
        self.text
            .match_indices("HTTP/1.")
            .filter_map(|(at, _)| self.text.get(at + 9..at + 12)?.parse().ok())
            .collect()
    }
}

/// Sends `payload` on a fresh connection (as fast as the socket takes it), then reads until the
/// agent closes or `timeout` passes.
pub fn raw_exchange(addr: SocketAddr, payload: &[u8], timeout: Duration) -> Result<RawReply> {
    let mut stream = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    // A refused head may be answered and closed before the rest is sent: not an error here.
    let _ = stream.write_all(payload);
    read_reply(&mut stream)
}

/// Reads what the agent sends on `stream` until it closes or resets the connection, or the
/// stream's read timeout passes.
pub fn read_reply(stream: &mut TcpStream) -> Result<RawReply> {
    let mut bytes = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let (closed, reset) = loop {
        match stream.read(&mut buf) {
            Ok(0) => break (true, false),
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break (true, true),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                break (false, false)
            }
            Err(e) => return Err(e).context("reading the agent's reply"),
        }
    };
    Ok(RawReply {
        text: String::from_utf8_lossy(&bytes).into_owned(),
        closed,
        reset,
    })
}

/// Raises this process's soft limit on open files to `wanted` (and the hard limit too when
/// allowed: root). Children inherit it, so an agent started afterwards gets it as well.
/// Returns the soft limit in force.
pub fn raise_open_files(wanted: u64) -> Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(std::io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
        }
        if limit.rlim_cur >= wanted {
            return Ok(limit.rlim_cur);
        }
        let raised = libc::rlimit {
            rlim_cur: wanted,
            rlim_max: limit.rlim_max.max(wanted),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
            return Ok(wanted);
        }
        // Not allowed to raise the hard limit: go as far as it lets us.
        let capped = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &capped) != 0 {
            return Err(std::io::Error::last_os_error()).context("setrlimit(RLIMIT_NOFILE)");
        }
        Ok(limit.rlim_max)
    }
}
