//! `cargo xtask bench pump`: how an opaque or upgraded connection's bytes move through the agent,
//! splice(2) through a kernel pipe against a copy through a buffer, side by side in one run.
//!
//! Per round and way (interleaved: copy, splice, copy, …): a client on 127.0.0.1 sends `GIB` GiB
//! through the agent's pump to a server that reads them; throughput from first byte sent to last
//! byte read, and the CPU time of the pump's thread (its runtime runs nothing else) per GiB.
//! Medians of the rounds.

use anyhow::Result;
use proxy_agent::proxy::pump::{Carry, Flow, Pumps};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

const ROUNDS: usize = 5;
const GIB: usize = 2;
const CHUNK: usize = 256 * 1024;

fn main() -> Result<()> {
    let mut results: Vec<(Carry, f64, f64)> = Vec::new();
    for round in 0..ROUNDS {
        for carry in [Carry::Copy, Carry::Splice] {
            let (gbps, cpu_ms_per_gib) = one_run(carry)?;
            eprintln!(
                "round {round} {carry:?}: {gbps:.2} GB/s, {cpu_ms_per_gib:.0} ms CPU per GiB"
            );
            results.push((carry, gbps, cpu_ms_per_gib));
        }
    }
    println!("\n{GIB} GiB per run through the pump, medians of {ROUNDS} interleaved rounds:");
    println!("| carry | throughput GB/s | pump CPU ms per GiB |");
    println!("|---|---|---|");
    let mut medians = Vec::new();
    for carry in [Carry::Copy, Carry::Splice] {
        let of = |pick: fn(&(Carry, f64, f64)) -> f64| {
            let mut v: Vec<f64> = results.iter().filter(|r| r.0 == carry).map(pick).collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (gbps, cpu) = (of(|r| r.1), of(|r| r.2));
        println!("| {carry:?} | {gbps:.2} | {cpu:.0} |");
        medians.push((gbps, cpu));
    }
    let ((copy_gbps, copy_cpu), (splice_gbps, splice_cpu)) = (medians[0], medians[1]);
    println!(
        "splice against copy: {:.2}x the throughput, {:.2}x the CPU per GiB",
        splice_gbps / copy_gbps,
        splice_cpu / copy_cpu
    );
    Ok(())
}

/// Throughput (GB/s) and the pump thread's CPU (ms per GiB) of one run.
fn one_run(carry: Carry) -> Result<(f64, f64)> {
    let (client, agent_side) = pair()?;
    let (agent_up, mut server) = pair()?;
    let pump = std::thread::spawn(move || -> Result<Duration> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let cpu = thread_cpu();
        runtime.block_on(async move {
            agent_side.set_nonblocking(true)?;
            agent_up.set_nonblocking(true)?;
            let pumps = Pumps::carrying(Duration::from_secs(60), carry);
            let end = pumps
                .run(
                    tokio::net::TcpStream::from_std(agent_side)?,
                    tokio::net::TcpStream::from_std(agent_up)?,
                    Flow::default(),
                    Flow::default(),
                )
                .await;
            anyhow::ensure!(
                end == proxy_agent::proxy::pump::PumpEnd::Closed,
                "the pump ended with {end:?}"
            );
            Ok(())
        })?;
        Ok(thread_cpu() - cpu)
    });
    let total = GIB << 30;
    let started = Instant::now();
    let sender = std::thread::spawn(move || -> Result<()> {
        let mut client = client;
        let chunk = vec![0x5au8; CHUNK];
        for _ in 0..total / CHUNK {
            client.write_all(&chunk)?;
        }
        client.shutdown(std::net::Shutdown::Write)?;
        // Until the pump passes the server's close back.
        let mut rest = Vec::new();
        client.read_to_end(&mut rest)?;
        Ok(())
    });
    let mut buf = vec![0u8; CHUNK];
    let mut received = 0usize;
    loop {
        let n = server.read(&mut buf)?;
        if n == 0 {
            break;
        }
        received += n;
    }
    let elapsed = started.elapsed();
    anyhow::ensure!(received == total, "received {received} of {total} bytes");
    drop(server);
    sender.join().expect("the sender")?;
    let cpu = pump.join().expect("the pump")?;
    let gbps = total as f64 / elapsed.as_secs_f64() / 1e9;
    Ok((gbps, cpu.as_secs_f64() * 1e3 / GIB as f64))
}

fn pair() -> Result<(TcpStream, TcpStream)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let a = TcpStream::connect(listener.local_addr()?)?;
    let (b, _) = listener.accept()?;
    Ok((a, b))
}

/// This thread's CPU time so far.
fn thread_cpu() -> Duration {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid timespec to write.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}
