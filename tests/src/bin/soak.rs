//! `gamma-soak restart [--restarts N] [--seconds S] [--fresh-programs-every K] [--cold]`: the
//! restart soak of `gamma_tests::soak` (run by `cargo xtask soak restart`, as root). Prints
//! requests sent, failed and reset, and the restarts done; exits non-zero if anything was lost.
//! `--cold` restarts the old way (SIGTERM, then a fresh start): the baseline, which loses.

use anyhow::{bail, Context, Result};
use gamma_tests::soak::{self, SoakConfig};
use std::time::Duration;

const USAGE: &str =
    "usage: gamma-soak restart [--restarts N] [--seconds S] [--fresh-programs-every K] [--cold]";

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    match args.next().as_deref() {
        Some("restart") => {}
        _ => bail!("{USAGE}"),
    }
    let mut config = SoakConfig::default();
    while let Some(flag) = args.next() {
        if flag == "--cold" {
            config.cold = true;
            continue;
        }
        let mut value = || -> Result<u64> {
            args.next()
                .with_context(|| format!("{flag} needs a value\n{USAGE}"))?
                .parse()
                .with_context(|| format!("{flag} takes a number\n{USAGE}"))
        };
        match flag.as_str() {
            "--restarts" => config.restarts = value()? as usize,
            "--seconds" => config.duration = Duration::from_secs(value()?),
            "--fresh-programs-every" => config.fresh_programs_every = value()? as usize,
            _ => bail!("unknown argument `{flag}`\n{USAGE}"),
        }
    }
    if let Some(reason) = gamma_tests::node::require_root() {
        bail!("{reason}");
    }
    // A restart needs a moment: starting the agent and its first sync, then the old one's drain.
    let spacing = config.duration / (config.restarts as u32 + 1);
    if spacing < Duration::from_secs(2) {
        bail!(
            "{} restarts in {:?} leaves {spacing:?} between them: give more --seconds (at least 2 s per restart)",
            config.restarts,
            config.duration
        );
    }
    if config.cold {
        eprintln!(
            "restart soak, baseline: {} cold restarts (SIGTERM, then a fresh start) over {:?} of load",
            config.restarts, config.duration
        );
    } else {
        eprintln!(
            "restart soak: {} takeovers over {:?} of load (every {}th swaps the programs)",
            config.restarts, config.duration, config.fresh_programs_every
        );
    }
    let report = soak::run("soak", &config)?;
    print!("{report}");
    if !report.clean(&config) {
        bail!("the soak lost something (see above)");
    }
    println!("PASS: zero failed requests, zero reset connections");
    Ok(())
}
