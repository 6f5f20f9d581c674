//! `cargo xtask bench [engine|peers|redirect]`: benchmarks, never timed tests.
//!
//! - `engine`: criterion benchmarks of the route engine (lookup, publish, memory per route).
//! - `peers`: `../shared/bench/peers/run.sh` with our agent in the same run as a direct
//!   connection, nginx, haproxy and envoy (knobs: ROUNDS, DURATION, WARMUP, WITH_ENVOY).
//! - `alloc`: heap allocations per request on the agent's request path, HTTP/1.1 and HTTP/2
//!   (`tests/src/bin/bench_alloc.rs`; `GAMMA_ALLOC_TRACE=1` says where they come from).
//! - `redirect`: connection setup and keep-alive through the kernel redirect against direct,
//!   and iptables REDIRECT, on a node of network namespaces (`tests/src/bin/bench_redirect.rs`).

use crate::util::{self, run_shown, step};
use anyhow::{bail, Result};
use std::process::Command;

pub fn run_bench(args: &[String]) -> Result<()> {
    match args.first().map(String::as_str).unwrap_or("engine") {
        "engine" => step("criterion: route engine", || {
            util::cargo_shown(&["bench", "-p", "gamma-engine", "--bench", "engine"])
        }),
        "peers" => peers(),
        "redirect" => redirect(),
        "alloc" => alloc(),
        other => bail!("unknown benchmark `{other}`: engine, peers, redirect or alloc"),
    }
}

fn shared_dir() -> std::path::PathBuf {
    std::env::var_os("GAMMA_SHARED")
        .map(Into::into)
        .unwrap_or_else(|| util::workspace_root().join("../shared"))
}

fn peers() -> Result<()> {
    let root = util::workspace_root();
    step("build the agent (release)", || {
        util::cargo(&["build", "--release", "-p", "proxy-agent"])
    })?;
    let script = shared_dir().join("bench/peers/run.sh");
    if !script.exists() {
        bail!(
            "{} not found: set GAMMA_SHARED to the shared folder",
            script.display()
        );
    }
    let agent = root.join("target/release/proxy-agent");
    let manifests = root.join("bench/peers/manifests");
    // Like the peers: no access log, two worker threads (2 cores), upstream keep-alive pools.
    let command = format!(
        "env RUST_LOG=warn {} --manifests {} --listen 127.0.0.1:18184=bench/echo:80 --admin 127.0.0.1:15990 --workers 2",
        agent.display(),
        manifests.display()
    );
    step("peer proxies side by side (run.sh)", || {
        run_shown(
            Command::new("bash")
                .arg(&script)
                .env("OURPROXY_CMD", command)
                .env("OURPROXY_URL", "http://127.0.0.1:18184/"),
        )
    })
}

fn redirect() -> Result<()> {
    if !util::is_root() {
        bail!("the redirect benchmark builds a node of network namespaces and loads eBPF: run it as root");
    }
    step("build (release)", || {
        util::cargo(&["build", "--release", "--bins"])
    })?;
    let root = util::workspace_root();
    step("redirect benchmark", || {
        run_shown(&mut Command::new(
            root.join("target/release/gamma-bench-redirect"),
        ))
    })
}

fn alloc() -> Result<()> {
    step("build (release)", || {
        util::cargo(&["build", "--release", "-p", "gamma-tests", "--bin", "gamma-bench-alloc"])
    })?;
    step("allocations per request", || {
        run_shown(&mut Command::new(
            util::workspace_root().join("target/release/gamma-bench-alloc"),
        ))
    })
}
