//! `gamma-soak restart [--restarts N] [--seconds S] [--fresh-programs-every K] [--cold]`: the
//! restart soak of `gamma_tests::soak` (run by `cargo xtask soak restart`, as root). Prints
//! requests sent, failed and reset, and the restarts done; exits non-zero if anything was lost.
//! `--cold` restarts the old way (SIGTERM, then a fresh start): the baseline, which loses.
//!
//! `gamma-soak churn [--seconds S] [--changes-per-second N] [--outages K] [--outage-seconds D]`:
//! the churn soak of `gamma_tests::churn` (run by `cargo xtask soak churn`; loopback, no root).
//! Prints requests sent and failed, changes made and published, each outage and the agent's RSS
//! over time; exits non-zero if a request failed or the agent did not catch up.

use anyhow::{bail, Context, Result};
use gamma_tests::churn::{self, ChurnConfig};
use gamma_tests::soak::{self, SoakConfig};
use std::time::Duration;

const USAGE: &str =
    "usage: gamma-soak restart [--restarts N] [--seconds S] [--fresh-programs-every K] [--cold]\n       \
     gamma-soak churn [--seconds S] [--changes-per-second N] [--outages K] [--outage-seconds D]";

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    match args.next().as_deref() {
        Some("restart") => restart(args),
        Some("churn") => churn(args),
        _ => bail!("{USAGE}"),
    }
}

/// The value after `flag`, as a number.
fn number(flag: &str, args: &mut impl Iterator<Item = String>) -> Result<u64> {
    args.next()
        .with_context(|| format!("{flag} needs a value\n{USAGE}"))?
        .parse()
        .with_context(|| format!("{flag} takes a number\n{USAGE}"))
}

fn churn(mut args: impl Iterator<Item = String>) -> Result<()> {
    let mut config = ChurnConfig::default();
    while let Some(flag) = args.next() {
        let value = number(&flag, &mut args);
        match flag.as_str() {
            "--seconds" => config.duration = Duration::from_secs(value?),
            "--changes-per-second" => config.changes_per_second = value? as u32,
            "--outages" => config.outages = value? as usize,
            "--outage-seconds" => config.outage = Duration::from_secs(value?),
            _ => bail!("unknown argument `{flag}`\n{USAGE}"),
        }
    }
    let spacing = config.duration / (config.outages as u32 + 1);
    if config.outages > 0 && spacing <= config.outage + Duration::from_secs(2) {
        bail!(
            "{} outages of {:?} in {:?} leave no time between them: give more --seconds",
            config.outages,
            config.outage,
            config.duration
        );
    }
    eprintln!(
        "churn soak: {} changes/s for {:?} under load, {} API server outages of {:?}",
        config.changes_per_second, config.duration, config.outages, config.outage
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let report = runtime.block_on(churn::run(&config))?;
    print!("{report}");
    let problems = report.problems(&config);
    if !problems.is_empty() {
        bail!(
            "the churn soak found problems:\n  {}",
            problems.join("\n  ")
        );
    }
    println!("PASS: zero failed requests; every outage caught up; the final state served");
    Ok(())
}

fn restart(mut args: impl Iterator<Item = String>) -> Result<()> {
    let mut config = SoakConfig::default();
    while let Some(flag) = args.next() {
        if flag == "--cold" {
            config.cold = true;
            continue;
        }
        let value = number(&flag, &mut args);
        match flag.as_str() {
            "--restarts" => config.restarts = value? as usize,
            "--seconds" => config.duration = Duration::from_secs(value?),
            "--fresh-programs-every" => config.fresh_programs_every = value? as usize,
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
