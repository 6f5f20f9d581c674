//! `cargo xtask soak restart [--restarts N] [--seconds S] [--fresh-programs-every K] [--cold]`: steady load
//! from pods through the kernel redirect while the agent is restarted N times, each new agent
//! taking over from the running one (`tests/src/soak.rs`, `tests/src/bin/soak.rs`). Prints requests
//! sent / failed / reset and the restarts done; fails if anything was lost. Defaults: 10 restarts
//! over 60 s. `--cold` is the baseline: restarts the old way (SIGTERM, then a fresh start), which
//! loses requests. A shortened run is part of `cargo xtask test` (`tests/tests/restart.rs`).

use crate::util::{self, run, step};
use anyhow::{bail, Result};
use std::process::Command;

pub fn run_soak(args: &[String]) -> Result<()> {
    match args.first().map(String::as_str) {
        Some("restart") => {}
        _ => bail!(
            "usage: cargo xtask soak restart [--restarts N] [--seconds S] \
             [--fresh-programs-every K] [--cold]"
        ),
    }
    if !util::is_root() {
        bail!("the soak builds a node of network namespaces and loads eBPF: run it as root");
    }
    step(
        "build the agent, echo backend, load client and soak",
        || util::cargo(&["build", "-p", "proxy-agent", "-p", "gamma-tests", "--bins"]),
    )?;
    let soak = util::workspace_root().join("target/debug/gamma-soak");
    step("restart soak", || run(Command::new(&soak).args(args)))
}
