//! `cargo xtask soak restart [--restarts N] [--seconds S] [--fresh-programs-every K] [--cold]`: steady load
//! from pods through the kernel redirect while the agent is restarted N times, each new agent
//! taking over from the running one (`tests/src/soak.rs`, `tests/src/bin/soak.rs`). Prints requests
//! sent / failed / reset and the restarts done; fails if anything was lost. Defaults: 10 restarts
//! over 60 s. `--cold` is the baseline: restarts the old way (SIGTERM, then a fresh start), which
//! loses requests. A shortened run is part of `cargo xtask test` (`tests/tests/restart.rs`).
//!
//! `cargo xtask soak churn [--seconds S] [--changes-per-second N] [--outages K] [--outage-seconds D]`:
//! steady load through `proxy-agent --kube` while routes, EndpointSlices and Pods change N times a
//! second and the API server goes away K times (`tests/src/churn.rs`). Prints failed requests,
//! changes made and published, each outage's catch-up and RSS over time. Defaults: 20 changes/s
//! for 120 s, 4 outages of 5 s. Loopback only, no root. Shortened in `tests/tests/churn.rs`.
//!
//! `cargo xtask soak leak [--connections N] [--concurrency C]`: N connections (100,000) of every
//! kind, polite or not, opened and closed through the agent (`tests/src/leak.rs`); prints its
//! descriptors, RSS, threads and tasks idle, at the peak and after; fails if they do not return
//! to the idle level. Loopback only, no root. Shortened in `tests/tests/leak.rs`.

use crate::util::{self, run_shown, step};
use anyhow::{bail, Result};
use std::process::Command;

pub fn run_soak(args: &[String]) -> Result<()> {
    match args.first().map(String::as_str) {
        Some("restart") => {
            if !util::is_root() {
                bail!("the restart soak builds a node of network namespaces and loads eBPF: run it as root");
            }
        }
        Some("churn" | "leak") => {}
        _ => bail!(
            "usage: cargo xtask soak restart [--restarts N] [--seconds S] \
             [--fresh-programs-every K] [--cold]\n       \
             cargo xtask soak churn [--seconds S] [--changes-per-second N] [--outages K] \
             [--outage-seconds D]\n       \
             cargo xtask soak leak [--connections N] [--concurrency C]"
        ),
    }
    step(
        "build the agent, echo backend, load client and soak",
        || util::cargo(&["build", "-p", "proxy-agent", "-p", "gamma-tests", "--bins"]),
    )?;
    let soak = util::workspace_root().join("target/debug/gamma-soak");
    step("soak", || run_shown(Command::new(&soak).args(args)))
}
