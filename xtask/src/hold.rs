//! `cargo xtask hold-connections [N]`: the load-held test (`tests/tests/load_held.rs`) alone,
//! with N concurrent keep-alive connections (default: the test suite's 10,000), printing the
//! agent's memory per connection. Needs an open-file hard limit above N + 1,280 (the test raises
//! the soft limit itself, the hard one only with CAP_SYS_RESOURCE).

use crate::util::{self, step};
use anyhow::{Context, Result};

const DEFAULT_CONNECTIONS: u64 = 10_000;

pub fn run(args: &[String]) -> Result<()> {
    let connections = match args {
        [] => DEFAULT_CONNECTIONS,
        [n] => n
            .parse()
            .with_context(|| format!("`{n}`: expected a number of connections"))?,
        _ => anyhow::bail!("usage: cargo xtask hold-connections [N]"),
    };
    // The test runs the agent binary: it must be current.
    step("build the agent", || {
        util::cargo(&["build", "-p", "proxy-agent"])
    })?;
    step(
        &format!("hold {connections} connections through one agent"),
        || {
            std::env::set_var("GAMMA_HOLD_CONNECTIONS", connections.to_string());
            util::cargo_shown(&[
                "test",
                "-p",
                "gamma-tests",
                "--test",
                "load_held",
                "--",
                "--nocapture",
            ])
        },
    )
}
