//! `cargo xtask bench conns`: the agent's resident memory idle, and what each idle keep-alive
//! client connection adds (HTTP/1.1, then HTTP/2 with prior knowledge, to an HTTP/2 backend and
//! to one that declares HTTP/1.1).
//!
//! The release agent runs as its own process (two workers) on a loopback world (`ns/front`
//! routed to an echo backend in this process). After one request to warm it up, its RSS is read;
//! then `CONNECTIONS` connections are opened, each carries one request and stays open, idle, and
//! the RSS is read again. Repeated for `ROUNDS` fresh agents; medians.

use anyhow::{bail, Context, Result};
use gamma_tests::loopback::{echo_backend, Agent, AgentOptions, Manifests};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

const CONNECTIONS: usize = 2_000;
const ROUNDS: usize = 3;

/// What the held connections speak, to the caller and to the backend.
#[derive(Clone, Copy)]
struct Case {
    name: &'static str,
    h2: bool,
    /// `ns/echo`'s port declares HTTP/1.1: the agent's own exchange, whatever the caller speaks.
    http1_backend: bool,
}

const CASES: [Case; 3] = [
    Case {
        name: "HTTP/1.1 keep-alive",
        h2: false,
        http1_backend: false,
    },
    Case {
        name: "HTTP/2",
        h2: true,
        http1_backend: false,
    },
    Case {
        name: "HTTP/2 (an HTTP/1.1 backend)",
        h2: true,
        http1_backend: true,
    },
];

fn main() -> Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    let echo = runtime.block_on(echo_backend([127, 0, 0, 1], "echo"));
    let rules = "  - backendRefs: [{name: echo, port: 80}]\n";
    let mut idle = Vec::new();
    let mut per_connection = CASES.map(|_| Vec::new());
    for round in 0..ROUNDS {
        for (case, measured) in CASES.iter().zip(&mut per_connection) {
            let declared = case.http1_backend.then_some("http");
            let manifests = Manifests::front_with_rules_declared(echo.addr, rules, declared);
            let agent = Agent::start(
                &manifests,
                AgentOptions {
                    listeners: vec![("ns/front", 80)],
                    caller_namespace: None,
                    extra_args: vec!["--workers".into(), "2".into()],
                },
            )?;
            let addr = agent.listen[0];
            drop(connection(addr, case.h2)?);
            settle();
            let before = resident_kib(agent.child.id())?;
            let held: Vec<TcpStream> = (0..CONNECTIONS)
                .map(|_| connection(addr, case.h2))
                .collect::<Result<_>>()?;
            settle();
            let after = resident_kib(agent.child.id())?;
            // Signed: the allocator may hand memory back meanwhile.
            let each = (after as f64 - before as f64) / CONNECTIONS as f64;
            eprintln!(
                "round {round} {}: idle {:.1} MiB, {each:.1} KiB per idle connection",
                case.name,
                before as f64 / 1024.0
            );
            idle.push(before as f64 / 1024.0);
            measured.push(each);
            drop(held);
        }
    }
    println!(
        "\nagent RSS (2 workers), medians of {ROUNDS} rounds, {CONNECTIONS} connections held:"
    );
    let columns: Vec<String> = CASES
        .iter()
        .map(|c| format!("per idle {} connection", c.name))
        .collect();
    println!("| idle | {} |", columns.join(" | "));
    println!("|---|{}", "---|".repeat(CASES.len()));
    let each: Vec<String> = per_connection
        .iter_mut()
        .map(|m| format!("{:.1} KiB", median(m)))
        .collect();
    println!("| {:.1} MiB | {} |", median(&mut idle), each.join(" | "));
    Ok(())
}

/// Lets the agent's workers finish with what they were sent (and the allocator settle).
fn settle() {
    std::thread::sleep(Duration::from_millis(500));
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn resident_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmRSS in /proc/<agent>/status")
}

/// A connection to `addr` that carried one whole request and is left open.
fn connection(addr: SocketAddr, h2: bool) -> Result<TcpStream> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    if h2 {
        h2_request(&mut stream)?;
    } else {
        stream.write_all(b"GET / HTTP/1.1\r\nHost: front\r\n\r\n")?;
        read_http1_answer(&mut stream)?;
    }
    Ok(stream)
}

fn read_http1_answer(stream: &mut TcpStream) -> Result<()> {
    let mut data = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            bail!("the agent closed the connection before its answer was whole");
        }
        data.extend_from_slice(&chunk[..n]);
        let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&data[..end]).to_ascii_lowercase();
        if !head.starts_with("http/1.1 200") {
            bail!("unexpected answer: {head}");
        }
        let length = gamma_tests::probe::content_length(&head)
            .context("the echo answers with a content-length")?;
        if data.len() >= end + 4 + length {
            return Ok(());
        }
    }
}

/// The client preface, empty SETTINGS, and one GET on stream 1 with the header block curl sends
/// for `curl --http2-prior-knowledge http://front/` (its fields Huffman-coded and indexed, as a
/// real client's: the agent's HPACK table keeps them); read until the answer's stream ends.
fn h2_request(stream: &mut TcpStream) -> Result<()> {
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    frame(&mut out, 0x4, 0, 0, &[]);
    let block: &[u8] = &[
        0x82, 0x84, 0x86, // :method GET, :path /, :scheme http
        0x41, 0x84, 0x96, 0xc3, 0xd4, 0x9f, // :authority front, indexed, Huffman
        0x7a, 0x88, 0x25, 0xb6, 0x50, 0xc3, 0xab, 0xbc, 0xf2, 0xe1, // user-agent curl/7.88.1
        0x53, 0x03, 0x2a, 0x2f, 0x2a, // accept */*, indexed
    ];
    frame(&mut out, 0x1, 0x4 | 0x1, 1, block); // END_HEADERS | END_STREAM
    stream.write_all(&out)?;
    let mut pending = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        while pending.len() >= 9 {
            let length = usize::from(pending[0]) << 16
                | usize::from(pending[1]) << 8
                | usize::from(pending[2]);
            if pending.len() < 9 + length {
                break;
            }
            let (kind, flags) = (pending[3], pending[4]);
            let id =
                u32::from_be_bytes([pending[5], pending[6], pending[7], pending[8]]) & !(1 << 31);
            match kind {
                // SETTINGS without ACK: acknowledge, as a peer must.
                0x4 if flags & 0x1 == 0 => {
                    let mut ack = Vec::new();
                    frame(&mut ack, 0x4, 0x1, 0, &[]);
                    stream.write_all(&ack)?;
                }
                0x7 => bail!("the agent sent GOAWAY"),
                0x3 if id == 1 => bail!("the agent reset the request"),
                // HEADERS or DATA of our stream carrying END_STREAM: the answer is whole.
                0x0 | 0x1 if id == 1 && flags & 0x1 != 0 => return Ok(()),
                _ => {}
            }
            pending.drain(..9 + length);
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            bail!("the agent closed the HTTP/2 connection before its answer was whole");
        }
        pending.extend_from_slice(&chunk[..n]);
    }
}

fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let length = payload.len() as u32;
    out.extend_from_slice(&length.to_be_bytes()[1..]);
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}
